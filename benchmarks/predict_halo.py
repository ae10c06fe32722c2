"""How much context (``predict.halo``) blocked prediction needs with the shipped, trained weights.

The halo is what keeps blocked prediction from reaching the bare forward's throughput: each
block reads (block + 2 halo) voxels to write its block. The tests hold blocked output within
2/255 of whole-volume output at the default halo (32) for small random models; this script
measures the same deviation for a trained checkpoint on a real stack, halo by halo, and the
cost of each halo against one whole-volume pass in the same process (CPU, this machine's
threads)::

    .venv/bin/python benchmarks/predict_halo.py [--checkpoint checkpoints/NAME.json] [--crop Z Y X]

Input: ``../shared/data/diadem_op/stacks/OP_5.tif`` (cropped to ``--crop`` from its corner to bound
memory). The reference is the whole crop in one pass (mirrored outside the volume, as
``predict`` does); blocks of ``--block`` voxels are then predicted with each halo and compared
with it. Prints a table and writes ``benchmarks/results/predict_halo.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from neurotrace_dask.config import PredictConfig
from neurotrace_dask.model import load_checkpoint
from neurotrace_dask.predict import _aligned_halo, _predict_region

HERE = Path(__file__).resolve().parent
STACK = HERE.parent.parent / "shared" / "data" / "diadem_op" / "stacks" / "OP_5.tif"


def blocked(model, volume, norm, block, halo, config) -> tuple[np.ndarray, float, int]:
    """The volume predicted block by block with ``halo``; seconds, voxels read."""
    out = np.zeros(volume.shape, np.uint8)
    read = 0
    started = time.perf_counter()
    for corner in itertools.product(*[range(0, n, b) for n, b in zip(volume.shape, block, strict=True)]):
        write = tuple(slice(c, min(c + b, n)) for c, b, n in zip(corner, block, volume.shape, strict=True))
        out[write] = _predict_region(model, volume, write, norm, halo, config, torch.device("cpu"))
        read += math.prod(s.stop - s.start + 2 * halo for s in write)
    return out, time.perf_counter() - started, read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=HERE.parent / "checkpoints" / "voxresnet_small_random.json")
    parser.add_argument("--crop", type=int, nargs=3, default=(76, 384, 384), metavar=("Z", "Y", "X"))
    parser.add_argument("--block", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--halos", type=int, nargs="+", default=[0, 8, 16, 24, 32])
    parser.add_argument("--json", type=Path, default=HERE / "results" / "predict_halo.json")
    args = parser.parse_args()
    if not STACK.exists():
        print(f"skipped: {STACK} is not here (see ../shared/data/README.md)")
        return 0
    volume = tifffile.imread(STACK)[tuple(slice(0, n) for n in args.crop)]
    checkpoint = load_checkpoint(args.checkpoint)
    model = checkpoint.model.eval()
    norm = checkpoint.measure_normalisation(volume)
    # One pass over everything: a patch as large as the padded volume.
    padded = tuple(n + 2 * _aligned_halo(max(args.halos)) + 8 for n in volume.shape)
    config = PredictConfig(device="cpu", patch=padded, skip_background=False)
    whole = tuple(slice(0, n) for n in volume.shape)
    started = time.perf_counter()
    reference = _predict_region(model, volume, whole, norm, _aligned_halo(max(args.halos)), config, torch.device("cpu"))
    whole_seconds = time.perf_counter() - started
    whole_read = math.prod(n + 2 * _aligned_halo(max(args.halos)) for n in volume.shape)
    # Deviation is measured away from the volume's faces, where only the halo differs.
    margin = tuple(slice(min(8, n // 4), n - min(8, n // 4)) for n in volume.shape)
    rows = []
    for halo in args.halos:
        aligned = _aligned_halo(halo)
        out, seconds, read = blocked(model, volume, norm, tuple(args.block), aligned, config)
        diff = np.abs(out.astype(np.int16) - reference.astype(np.int16))[margin]
        rows.append({"halo": aligned, "max_diff": int(diff.max()), "p999_diff": float(np.percentile(diff, 99.9)),
                     "share_over_2": float((diff > 2).mean()), "seconds": seconds,
                     "read_over_write": read / volume.size,
                     "throughput_vs_whole": (volume.size / seconds) / (whole_read / whole_seconds)})  # fmt: skip
    print(f"{args.checkpoint.name} on OP_5 cropped to {volume.shape}, blocks {tuple(args.block)}; "
          f"whole pass {whole_seconds:.1f} s")
    print("| halo | max |diff| (1/255) | 99.9th pct | share > 2/255 | read / write voxels | seconds | output voxels/s vs whole pass |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['halo']} | {r['max_diff']} | {r['p999_diff']:.1f} | {r['share_over_2']:.2e} | "
              f"{r['read_over_write']:.2f} | {r['seconds']:.1f} | {r['throughput_vs_whole']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "shape": list(volume.shape),
                                     "block": list(args.block), "threads": torch.get_num_threads(),
                                     "whole_seconds": whole_seconds, "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
