"""How wide is the network's neurite map, against the neurite in the image?

For each DIADEM OP stack, as stored (sparse, background-subtracted: what a user's run sees) and
dimmed to each ``--intensity`` as ``benchmarks/accuracy.py`` dims it, along the gold centreline
(samples every half voxel):

- *image width*: the voxels within ``REACH_UM`` of the centreline that hold at least half of the
  image's peak near them (the 3x3x3 maximum at their nearest centreline sample, less the
  background): the neurite's full width at half maximum, blur included;
- *map width*: the voxels within ``REACH_UM`` with ``p >= 0.5`` (128 of 255) in the map;

each as an equivalent tube diameter, ``2 sqrt(V / (pi L))`` for the volume ``V`` (um^3) per cable
length ``L`` (um). Their ratio says how much wider than the neurite the map is (1: as wide).
Near crossings and untraced fibres the counts include other structure alike for both.

Writes ``map_width.json`` to ``--out`` (default ``benchmarks/results``) and prints a table::

    .venv/bin/python benchmarks/map_width.py --checkpoint checkpoints/A.json checkpoints/B.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import OP_VOXEL, SHARED  # noqa: E402

from neurotrace_dask.config import SynthConfig  # noqa: E402
from neurotrace_dask.io.swc import SWC, read_swc  # noqa: E402
from neurotrace_dask.synth import dim_real_image  # noqa: E402

REACH_UM = 4.0  # around the centreline: wider than any OP neurite with its blur, narrower than most gaps between fibres


def centreline(gold: SWC, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean mask of the voxels the gold's edges pass through (samples every half voxel).

    Examples
    --------
    >>> line = centreline(SWC.from_arrays([[1, 1, 0], [1, 1, 4]], [-1, 0]), (3, 3, 5))
    >>> int(line.sum()), bool(line[1, 1].all())
    (5, True)
    """
    child = np.flatnonzero(gold.parent_index >= 0)
    a, b = gold.zyx[gold.parent_index[child]], gold.zyx[child]
    steps = np.maximum(1, np.ceil(2 * np.linalg.norm(b - a, axis=1)).astype(int))
    t = np.concatenate([np.linspace(0, 1, s + 1) for s in steps])
    edge = np.repeat(np.arange(child.size), steps + 1)
    points = np.rint(a[edge] + t[:, None] * (b - a)[edge]).astype(int)
    points = points[np.all((points >= 0) & (points < np.asarray(shape)), axis=1)]
    mask = np.zeros(shape, bool)
    mask[tuple(points.T)] = True
    return mask


def widths(image: np.ndarray, prob: np.ndarray, gold: SWC) -> dict[str, float]:
    """Equivalent tube diameters (um) of the image's half-maximum neurite and of the map ``p >= 0.5``."""
    line = centreline(gold, image.shape)
    voxel = np.asarray(OP_VOXEL)
    distance, nearest = ndimage.distance_transform_edt(~line, sampling=voxel, return_indices=True)
    near = distance <= REACH_UM
    background = float(np.median(image))
    peak = ndimage.maximum_filter(image, size=3).astype(np.float64) - background
    half = image.astype(np.float64) - background >= 0.5 * peak[tuple(nearest)]
    cable = float(gold.cable_length(OP_VOXEL))
    volume = float(np.prod(voxel))

    def diameter(mask: np.ndarray) -> float:
        return float(2 * np.sqrt(np.count_nonzero(mask & near) * volume / (np.pi * cable)))

    image_width, map_width = diameter(half), diameter(prob >= 128)
    return {"image_um": image_width, "map_um": map_width, "ratio": map_width / image_width}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True)
    parser.add_argument("--intensity", nargs="+", default=["stored", "1", "0.25"],
                        help="'stored' (the stack as it is) or a dimming intensity, each")
    parser.add_argument("--stacks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from neurotrace_dask.model import load_checkpoint
    from neurotrace_dask.predict import predict_array

    rows = []
    for n in args.stacks:
        real = tifffile.imread(SHARED / "diadem_op" / "stacks" / f"OP_{n}.tif")
        gold = read_swc(SHARED / "diadem_op" / "gold" / f"OP_{n}.swc")
        for intensity in args.intensity:
            image = real if intensity == "stored" else dim_real_image(real, float(intensity), SynthConfig(seed=n))
            for path in args.checkpoint:
                prob = predict_array(image, load_checkpoint(path))
                rows.append({"stack": f"OP_{n}", "intensity": intensity, "checkpoint": path.stem,
                             **widths(image, prob, gold)})  # fmt: skip
                r = rows[-1]
                print(f"OP_{n} {intensity:>6s}  {path.stem:32s} image {r['image_um']:.2f} um  map {r['map_um']:.2f} um"
                      f"  ratio {r['ratio']:.2f}", flush=True)  # fmt: skip
    for path in args.checkpoint:
        for intensity in args.intensity:
            mine = [r["ratio"] for r in rows if r["checkpoint"] == path.stem and r["intensity"] == intensity]
            print(f"{path.stem:32s} {intensity:>6s}: median map/image width {np.median(mine):.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "map_width.json").write_text(json.dumps({"reach_um": REACH_UM, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
