"""A run folder's ``report.html``: projections, traced neurons, per-neuron statistics, review list.

Everything is computed from the run's outputs with bounded memory: maximum-intensity
projections are Dask reductions over the OME-Zarr stores (the image's smallest pyramid level
at most ``max_pixels`` wide; the probability map pooled by blocks), and the SWCs and CSVs
are small. The page embeds its figures as PNG, so it is one self-contained file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path

import numpy as np

from .io.omezarr import open_image
from .io.swc import read_swc

__all__ = ["maximum_projection", "write_report"]


def maximum_projection(path: str | Path, max_pixels: int = 1024) -> tuple[np.ndarray, float]:
    """Maximum-intensity projection along z of an OME-Zarr image, at most ``max_pixels`` wide.

    Uses the finest pyramid level that fits, then max-pools (in y, x) on Dask if still too
    big. Returns the projection and its pixel size in level-0 voxels.

    Examples
    --------
    >>> import tempfile, zarr
    >>> from neurotrace_dask.io.omezarr import plan_layout, write_image_metadata, mark_complete
    >>> p = tempfile.mkdtemp() + "/a.ome.zarr"
    >>> _ = write_image_metadata(p, plan_layout((4, 64, 64), np.uint8, (1, 1, 1), levels=1), name="x")
    >>> zarr.open_array(p + "/0", mode="r+")[2, 5, 7] = 9; mark_complete(p)
    >>> mip, scale = maximum_projection(p, max_pixels=32)
    >>> mip.shape, int(mip.max()), scale
    ((32, 32), 9, 2.0)
    """
    import dask.array as da

    arrays, _ = open_image(path)
    base = arrays[0].shape
    level = next((a for a in arrays if max(a.shape[1:]) <= max_pixels), arrays[-1])
    stack = da.from_zarr(level)
    factor = max(1, math.ceil(max(level.shape[1:]) / max_pixels))
    mip = stack.max(axis=0)
    if factor > 1:
        mip = da.coarsen(np.max, mip, {0: factor, 1: factor}, trim_excess=True)
    return np.asarray(mip.compute()), base[2] / level.shape[2] * factor


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(path: Path, limit: int | None = None) -> str:
    if not path.is_file():
        return "<p>(none)</p>"
    with path.open(encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) <= 1:
        return "<p>(none)</p>"
    head, body = rows[0], rows[1 : None if limit is None else limit + 1]
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    more = f"<p>... {len(rows) - 1 - len(body)} more in {path.name}</p>" if len(rows) - 1 > len(body) else ""
    return f"<table><tr>{cells}</tr>{lines}</table>{more}"


def write_report(out: str | Path, *, image: Path, traced: Path, probability: Path | None = None,
                 metrics: dict | None = None, stages: list[dict] | None = None) -> Path:  # fmt: skip
    """Write ``OUT/report.html`` for a run; returns its path.

    Parameters
    ----------
    out : path
        The run folder.
    image, probability : path
        OME-Zarr stores of the image and (unless traced raw) the probability map.
    traced : path
        The trace output folder (``neurons/``, ``neurons.csv``, ``review.csv``).
    metrics : dict, optional
        An evaluation against a gold standard (``Evaluation.to_dict()``).
    stages : list of dict, optional
        Per-stage records (name, status, seconds) for the timing table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    panels = [("image", image)] + ([("p(neurite)", probability)] if probability is not None else [])
    mips = [(name, *maximum_projection(path)) for name, path in panels]
    figure, axes = plt.subplots(1, len(mips) + 1, figsize=(6 * (len(mips) + 1), 6))
    for ax, (name, mip, _) in zip(axes, mips, strict=False):
        ax.imshow(mip, cmap="gray", vmax=np.percentile(mip, 99.9) or None)
        ax.set_title(f"{name}: maximum projection")
        ax.axis("off")
    name, mip, scale = mips[0]
    ax = axes[-1]
    ax.imshow(mip, cmap="gray", vmax=np.percentile(mip, 99.9) or None)
    colours = plt.get_cmap("tab20")
    for i, path in enumerate(sorted((traced / "neurons").glob("*.swc"))):
        swc = read_swc(path)
        zyx = swc.zyx / scale
        child = np.flatnonzero(swc.parent_index >= 0)
        parent = swc.parent_index[child]
        segments = np.stack([zyx[child][:, [2, 1]], zyx[parent][:, [2, 1]]], axis=1)
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection(segments, colors=[colours(i % 20)], linewidths=1.0))
    ax.set_title("traced neurons over the image")
    ax.axis("off")
    figure_png = _png(figure)
    plt.close(figure)
    timing = ""
    if stages:
        timing = "<table><tr><th>stage</th><th>status</th><th>seconds</th></tr>" + "".join(
            f"<tr><td>{html.escape(s['name'])}</td><td>{html.escape(s['status'])}</td><td>{s['seconds']:.1f}</td></tr>"
            for s in stages) + "</table>"  # fmt: skip
    scores = ""
    if metrics:
        length = metrics.get("length", {})
        scores = (f"<h2>Against the gold standard</h2><p>length F1 {length.get('f1', float('nan')):.3f} "
                  f"(precision {length.get('precision', float('nan')):.3f}, recall {length.get('recall', float('nan')):.3f},"
                  f" tau {length.get('tau', float('nan')):g} um); all metrics in metrics.json</p>")  # fmt: skip
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>neurotrace run: {html.escape(out.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%}}</style>
</head><body><h1>neurotrace run: {html.escape(str(out))}</h1>
<img src="data:image/png;base64,{figure_png}" style="max-width:100%">
{scores}<h2>Stages</h2>{timing}
<h2>Neurons</h2>{_table(traced / "neurons.csv")}
<h2>Review first</h2><p>Ranked by risk: bridged gaps, loops broken, low-confidence stretches.</p>{_table(traced / "review.csv", 30)}
</body></html>"""
    path = out / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
