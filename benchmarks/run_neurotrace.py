"""Run this project's tracer on a 3-D TIFF the way ``benchmarks/peers/run_peer.py`` runs a peer.

    .venv/bin/python benchmarks/run_neurotrace.py raw IMAGE.tif OUT.swc --voxel-size Z Y X
    .venv/bin/python benchmarks/run_neurotrace.py prob PROB.tif OUT.swc --voxel-size Z Y X
    .venv/bin/python benchmarks/run_neurotrace.py cnn IMAGE.tif OUT.swc --voxel-size Z Y X --checkpoint NAME.json

METHOD ``raw`` is voxel scooping on the raw image (``trace.raw_to_probability`` then
``trace.trace_block``, package defaults); ``prob`` traces a uint8 0-255 probability map as
it is (``trace.trace_block``); ``cnn`` predicts the probability with a checkpoint
(``predict.predict_array``, default prediction settings) and traces that. The SWC is in voxel
coordinates (x column, y row, z slice). The last stdout line is the same JSON as the peers'
wrapper: method, seconds (from the image in memory to the traced SWC, file I/O and loading
the checkpoint excluded; for ``cnn`` also ``predict_seconds``, the prediction's share),
peak_rss_mb (VmHWM of this process), nodes, status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import tifffile


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["raw", "prob", "cnn"])
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--voxel-size", type=float, nargs=3, required=True)
    parser.add_argument("--checkpoint", type=Path, help="NAME.json of the network (method cnn)")
    args = parser.parse_args()
    if args.method == "cnn" and args.checkpoint is None:
        parser.error("method cnn needs --checkpoint")
    from neurotrace_dask.io.swc import write_swc
    from neurotrace_dask.trace import raw_to_probability, trace_block

    image = tifffile.imread(args.image)
    reply: dict[str, object] = {"method": f"neurotrace-{args.method}", "status": "ok"}
    try:
        checkpoint = None
        if args.method == "cnn":
            from neurotrace_dask.model import load_checkpoint

            checkpoint = load_checkpoint(args.checkpoint)
        started = time.perf_counter()
        if args.method == "raw":
            probability = raw_to_probability(image, voxel_size=args.voxel_size)
        elif args.method == "cnn":
            from neurotrace_dask.predict import predict_array

            probability = predict_array(image, checkpoint)
            reply["predict_seconds"] = time.perf_counter() - started
        else:
            if image.dtype.name != "uint8":
                raise ValueError(f"a probability map must be uint8 (0-255), got {image.dtype}")
            probability = image
        # A raw image's map holds background structure above ``low``: classic hysteresis (see trace_block).
        swc = trace_block(probability, voxel_size=args.voxel_size, bridge_dim=args.method != "raw" and None,
                           extend=args.method != "raw" and None).to_swc()
        reply["seconds"] = time.perf_counter() - started
        reply["nodes"] = swc.n_nodes
        if swc.n_nodes == 0:
            reply["status"] = "failed: nothing traced"
        else:
            write_swc(args.out, swc, voxel_size_zyx=args.voxel_size)
    except Exception as exc:  # recorded by the benchmark, like a peer's failure
        reply["status"] = f"failed: {type(exc).__name__}: {exc}"
    reply["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
