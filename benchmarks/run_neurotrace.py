"""Run this project's tracer on a raw 3-D TIFF the way ``benchmarks/peers/run_peer.py`` runs a peer.

    .venv/bin/python benchmarks/run_neurotrace.py raw IMAGE.tif OUT.swc --voxel-size Z Y X

METHOD ``raw`` is voxel scooping on the raw image (``trace.raw_to_probability`` then
``trace.trace_block``, package defaults). The SWC is in voxel coordinates (x column, y row,
z slice). The last stdout line is the same JSON as the peers' wrapper: method, seconds (the
tracing from the image in memory, file I/O excluded), peak_rss_mb (VmHWM of this process),
nodes, status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import tifffile


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["raw"])
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--voxel-size", type=float, nargs=3, required=True)
    args = parser.parse_args()
    from neurotrace_dask.io.swc import write_swc
    from neurotrace_dask.trace import raw_to_probability, trace_block

    image = tifffile.imread(args.image)
    reply = {"method": f"neurotrace-{args.method}", "status": "ok"}
    started = time.perf_counter()
    try:
        probability = raw_to_probability(image, voxel_size=args.voxel_size)
        swc = trace_block(probability, voxel_size=args.voxel_size).to_swc()
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
