"""The README's tutorial, measured: ``neurotrace run`` on the raw DIADEM OP_5 stack, scored as a user sees it.

Runs the pipeline (:func:`neurotrace_dask.pipeline.run`, package defaults, one checkpoint) on
``../shared/data/diadem_op/stacks/OP_5.tif`` exactly as the README's tutorial does, then scores
what a user gets against the gold SWC at the DIADEM OP threshold (tau = 3.94 xy voxels):

- all neurons written (``traced/neurons.swc``): length F1, recall, precision, number of trees;
- the neuron at the gold root (``benchmarks/accuracy.py``'s :func:`neuron_at_root`): length F1,
  DIADEM, cable and tips against the gold's.

Writes ``tutorial_op5.json`` and ``tutorial_op5.png`` (the image's maximum projection with the
gold and the neuron at the root over it, and the probability map) to ``--out`` (default
``benchmarks/results``)::

    .venv/bin/python benchmarks/tutorial_op5.py                                  # the shipped default
    .venv/bin/python benchmarks/tutorial_op5.py --checkpoint checkpoints/NAME.json --tag NAME
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import OP_VOXEL, SHARED, TAU_XY_VOXELS, count_tips, neuron_at_root  # noqa: E402

from neurotrace_dask.config import ClusterConfig, Config, ConvertConfig, LocalClusterConfig  # noqa: E402
from neurotrace_dask.evaluate import evaluate  # noqa: E402
from neurotrace_dask.io.swc import SWC, read_swc  # noqa: E402
from neurotrace_dask.pipeline import default_checkpoint, run  # noqa: E402


def _edges(ax, swc: SWC, color: str, width: float, origin: tuple[int, int]) -> None:
    child = np.flatnonzero(swc.parent_index >= 0)
    a, b = swc.zyx[swc.parent_index[child]], swc.zyx[child]
    for (_, ya, xa), (_, yb, xb) in zip(a, b):
        ax.plot([xa - origin[1], xb - origin[1]], [ya - origin[0], yb - origin[0]], color, lw=width)


def figure(image: np.ndarray, prob: np.ndarray, gold: SWC, root: SWC | None, everything: SWC, path: Path,
           title: str) -> None:  # fmt: skip
    """The image's MIP (gamma 0.5) with the gold (cyan), all neurons (yellow) and the neuron at the root (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = (0, 0)  # the whole field: cable beyond the gold's extent shows where it runs
    mip = image.max(axis=0).astype(np.float64)
    mip = np.power(mip / max(1.0, float(mip.max())), 0.5)
    fig, axes = plt.subplots(1, 2, figsize=(16, 8.6))
    axes[0].imshow(mip, cmap="gray")
    _edges(axes[0], everything, "y-", 0.6, lo)
    _edges(axes[0], gold, "c-", 2.5, lo)
    if root is not None:
        _edges(axes[0], root, "r-", 1.0, lo)
    axes[0].set_title("OP_5: gold (cyan), all neurons (yellow), the neuron at the gold root (red)")
    axes[1].imshow(prob.max(axis=0), cmap="magma", vmin=0, vmax=255)
    axes[1].set_title("p(neurite) x 255, maximum projection")
    for ax in axes:
        ax.set_xlim(0, image.shape[2])
        ax.set_ylim(image.shape[1], 0)
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="NAME.json (default: the shipped one)")
    parser.add_argument("--tag", default="", help="suffix of the output names")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    stack, gold_path = SHARED / "diadem_op" / "stacks" / "OP_5.tif", SHARED / "diadem_op" / "gold" / "OP_5.swc"
    if not stack.is_file():
        print(f"{stack}: not found (this benchmark needs ../shared/data)", file=sys.stderr)
        return 2
    import tifffile

    config = Config(convert=ConvertConfig(voxel_size=OP_VOXEL),
                    cluster=ClusterConfig(local=LocalClusterConfig(n_workers=1, threads_per_worker=2)))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run(stack, Path(tmp) / "op5_run", config, checkpoint=args.checkpoint, gold=gold_path)
        seconds = time.perf_counter() - started
        everything = read_swc(result.out / "traced" / "neurons.swc")
        prob = np.asarray(result.probability())
    checkpoint = Path(args.checkpoint or default_checkpoint()).name
    gold = read_swc(gold_path)
    tau = TAU_XY_VOXELS * OP_VOXEL[2]
    pooled = evaluate(gold, everything, voxel_size_zyx=OP_VOXEL, tau=tau)
    root = neuron_at_root(everything, gold, OP_VOXEL)
    at_root = evaluate(gold, root, voxel_size_zyx=OP_VOXEL, tau=tau) if root is not None else None
    report = {
        "checkpoint": checkpoint, "seconds": round(seconds, 1), "trees": everything.n_trees,
        "all": {"f1": pooled.length.f1, "recall": pooled.length.recall, "precision": pooled.length.precision,
                "cable_um": everything.cable_length(OP_VOXEL)},
        "neuron_at_root": None if at_root is None else {
            "f1": at_root.length.f1, "recall": at_root.length.recall, "precision": at_root.length.precision,
            "diadem": at_root.diadem.score, "cable_um": root.cable_length(OP_VOXEL), "tips": count_tips(root)},
        "gold": {"cable_um": gold.cable_length(OP_VOXEL), "tips": count_tips(gold)},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"tutorial_op5{'_' + args.tag if args.tag else ''}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    r = report["neuron_at_root"] or {}
    title = (f"neuron at the gold root: {r.get('cable_um', 0):.0f} um, {r.get('tips', 0)} tips (gold "
             f"{report['gold']['cable_um']:.0f} um, {report['gold']['tips']} tips), length F1 {r.get('f1', 0):.2f}; "
             f"{report['trees']} neurons in all")  # fmt: skip
    figure(tifffile.imread(stack), prob, gold, root, everything, args.out / f"{name}.png", title)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
