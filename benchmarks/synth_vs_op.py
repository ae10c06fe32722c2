"""Check the renderer against reality: DIADEM OP stacks vs their gold SWCs rendered by `synth`.

For each OP stack, the gold tracing is rendered at the OP voxel size on the stack's grid,
and the same statistics are measured on the real and the synthetic image along the same
gold centrelines:

- background: median and robust noise (1.4826 MAD) of voxels over 5 um from the gold cable;
- centreline: median of the brightest voxel within one voxel of each gold sample point;
- contrast: centreline minus background, in units of the background noise (when it is not 0);
- width: median full width at half maximum (um) of xy profiles across fibres running in xy.

Prints a table and writes ``benchmarks/results/synth_vs_op.json``. Needs ``../shared/data``.

    .venv/bin/python benchmarks/synth_vs_op.py [--config synth.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from neurotrace_dask.config import load_config
from neurotrace_dask.io.swc import SWC, read_swc
from neurotrace_dask.synth import render, scene_from_morphologies

ROOT = Path(__file__).resolve().parent
OP = ROOT.parent.parent / "shared" / "data" / "diadem_op"
VOXEL = (1.0, 0.3296, 0.3296)


def centreline_samples(gold: SWC, spacing: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Points every ``spacing`` voxels along the gold edges, and the unit direction (um) there."""
    child = np.flatnonzero(gold.parent_index >= 0)
    a, b = gold.zyx[gold.parent_index[child]], gold.zyx[child]
    k = np.maximum(1, np.ceil(np.linalg.norm(b - a, axis=1) / spacing).astype(int))
    edge = np.repeat(np.arange(child.size), k)
    t = (np.arange(edge.size) - np.repeat(np.cumsum(k) - k, k)) / k[edge]
    points = a[edge] + t[:, None] * (b - a)[edge]
    direction = (b - a)[edge] * VOXEL
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
    return points, direction


def statistics(image: np.ndarray, gold: SWC) -> dict[str, float]:
    points, direction = centreline_samples(gold)
    inside = np.all((points >= 0) & (points <= np.array(image.shape) - 1), axis=1)
    points, direction = points[inside], direction[inside]
    cable = np.zeros(image.shape, bool)
    cable[tuple(np.rint(points).astype(int).T)] = True
    far = ndimage.distance_transform_edt(~cable, sampling=VOXEL) > 5.0
    background = image[far].astype(np.float64)
    bg = float(np.median(background))
    noise = float(1.4826 * np.median(np.abs(background - bg)))
    peak = ndimage.maximum_filter(image, size=3)[tuple(np.rint(points).astype(int).T)]
    centre = float(np.median(peak))
    return {
        "background": bg,
        "noise": noise,
        "centreline": centre,
        "contrast": (centre - bg) / noise if noise > 0 else None,  # noise-free background: undefined
        "fwhm_um": fwhm(image, points, direction, bg),
    }


def fwhm(image: np.ndarray, points: np.ndarray, direction: np.ndarray, bg: float, n: int = 400) -> float:
    """Median FWHM across fibres that run within 30 degrees of the xy plane."""
    flat = np.flatnonzero(np.abs(direction[:, 0]) < 0.5)
    chosen = flat[np.linspace(0, flat.size - 1, min(n, flat.size)).astype(int)]
    offsets = np.arange(-12, 12.01, 0.25)  # pixels
    widths = []
    for i in chosen:
        z, y, x = points[i]
        normal = np.array([-direction[i, 2], direction[i, 1]])  # perpendicular in (y, x)
        normal /= max(np.linalg.norm(normal), 1e-9)
        ys, xs = y + offsets * normal[0], x + offsets * normal[1]
        profile = ndimage.map_coordinates(image[int(round(z))].astype(np.float64), [ys, xs], order=1) - bg
        centre = profile.size // 2
        top = centre - 12 + int(np.argmax(profile[centre - 12 : centre + 13]))  # within 3 px of the trace
        half = profile[top] / 2
        if half <= 0:
            continue
        left = top - np.argmax(profile[top::-1] < half)
        right = top + np.argmax(profile[top:] < half)
        if profile[left] >= half or profile[right] >= half:  # never fell to half: a neighbour fibre
            continue
        widths.append((right - left) * 0.25 * VOXEL[1])
    return float(np.median(widths)) if widths else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML with a synth: section to try other physics")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "synth_vs_op.json")
    args = parser.parse_args()
    if not OP.is_dir():
        print(f"skipped: {OP} not found (the shared DIADEM data)", file=sys.stderr)
        return 0
    params = load_config(args.config, {"synth": {"voxel_size": list(VOXEL), "bits": 8}}).synth
    rows = []
    for n in range(1, 6):
        real = tifffile.imread(OP / "stacks" / f"OP_{n}.tif")
        gold = read_swc(OP / "gold" / f"OP_{n}.swc")
        gold_um = SWC.from_arrays(gold.zyx * VOXEL, gold.parent_index, radius=gold.radius * VOXEL[2], types=gold.types)
        synthetic, _ = render(scene_from_morphologies([gold_um], real.shape, params))
        for source, image in (("real", real), ("synth", synthetic)):
            rows.append({"stack": f"OP_{n}", "source": source, **statistics(image, gold)})
    header = f"{'stack':6} {'source':6} {'background':>10} {'noise':>7} {'centreline':>10} {'contrast':>9} {'FWHM um':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        contrast = "n/a" if r["contrast"] is None else f"{r['contrast']:.1f}"
        print(f"{r['stack']:6} {r['source']:6} {r['background']:10.1f} {r['noise']:7.2f} {r['centreline']:10.1f} "
              f"{contrast:>9} {r['fwhm_um']:8.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"voxel_size": VOXEL, "params": params.model_dump(mode="json"), "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
