"""Prediction throughput and memory: blocked Dask prediction vs the bare forward vs MONAI.

For each volume (a rendered scene, written as OME-Zarr), in this one process and machine:

- **bare forward** (the limit): the network over the volume's voxels as non-overlapping
  blocks of the block shape, no halo, no I/O, all cores;
- **blocked Dask** (``neurotrace_dask.predict``): a local cluster with one single-threaded
  worker process per core (torch threads = worker threads), reading from and writing to
  Zarr, halo and normalisation included; peak RSS of each worker is sampled;
- **MONAI** ``sliding_window_inference`` with the same network, the same patch (our read
  region: block + 2 halo) and the same overlap (2 halo per axis), Gaussian blending, in memory.

Throughput is output voxels per second; ratios are to the bare forward measured in the same
run. FLOPs per voxel (``model.flops_per_voxel``) give the implied GFLOP/s and the fraction of
the CPU's peak (cores x clock x FP32 FLOPs per cycle from its vector units).
Writes ``benchmarks/results/predict.json``::

    .venv/bin/python benchmarks/predict.py                     # 128x256x256 and 256^3, small model
    .venv/bin/python benchmarks/predict.py --volumes 256,256,256 1024,512,512 --preset base
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import torch

from neurotrace_dask.cluster import open_client
from neurotrace_dask.config import ClusterConfig, LocalClusterConfig, PredictConfig, SynthConfig
from neurotrace_dask.io.omezarr import open_image
from neurotrace_dask.model import PRESETS, build_model, flops_per_voxel, load_checkpoint, normalise, save_checkpoint
from neurotrace_dask.predict import predict
from neurotrace_dask.synth import random_scene, render_to_zarr

HERE = Path(__file__).resolve().parent


def peak_flops() -> tuple[float, str]:
    """FP32 peak of this CPU: cores x clock x FLOPs per cycle (2 FMA units of the widest vectors)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)] or [2000.0]
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags and "fma" in flags else 8
    cores = psutil.cpu_count(logical=False) or 1  # SMT siblings share the vector units
    return cores * max(mhz) * 1e6 * per_cycle, f"{cores} cores x {max(mhz):.0f} MHz x {per_cycle} FLOP/cycle"


def bare_forward(model: torch.nn.Module, volume: np.ndarray, block: tuple[int, int, int], norm) -> float:
    """Seconds for the network over the volume as non-overlapping blocks (padded to the stride)."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = model.to(memory_format=torch.channels_last_3d)
    started = time.perf_counter()
    with torch.inference_mode():
        for z in range(0, volume.shape[0], block[0]):
            for y in range(0, volume.shape[1], block[1]):
                for x in range(0, volume.shape[2], block[2]):
                    part = normalise(volume[z : z + block[0], y : y + block[1], x : x + block[2]], norm)
                    pad = [(0, -n % 8) for n in part.shape]
                    tensor = torch.from_numpy(np.pad(part, pad)[None, None]).to(memory_format=torch.channels_last_3d)
                    torch.softmax(model(tensor), dim=1)
    return time.perf_counter() - started


def monai_sliding_window(model: torch.nn.Module, volume: np.ndarray, roi: tuple[int, ...], halo: int, norm) -> float:
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    overlap = [2 * halo / r for r in roi]
    started = time.perf_counter()
    with torch.inference_mode():
        tensor = torch.from_numpy(normalise(volume, norm)[None, None]).to(memory_format=torch.channels_last_3d)
        sliding_window_inference(tensor, roi, 1, lambda x: torch.softmax(model(x), dim=1), overlap=overlap,
                                 mode="gaussian")  # fmt: skip
    return time.perf_counter() - started


@contextmanager
def worker_memory(pids: list[int]) -> Iterator[dict[int, int]]:
    """Peak RSS (bytes) of each of the cluster's worker processes, sampled every 50 ms while inside."""
    processes, peak, stop = [psutil.Process(p) for p in pids], {p: 0 for p in pids}, threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for process in processes:
                try:
                    peak[process.pid] = max(peak[process.pid], process.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description="Prediction throughput and memory.")
    parser.add_argument("--volumes", nargs="+", default=["128,256,256", "256,256,256"], help="Z,Y,X shapes")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--block", default="64,256,256")
    parser.add_argument("--halo", type=int, default=PredictConfig().halo)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "predict.json")
    args = parser.parse_args()
    block = tuple(int(v) for v in args.block.split(","))
    spec = PRESETS[args.preset]
    model = build_model(spec, seed=0).eval()
    flops = flops_per_voxel(spec)
    peak, peak_text = peak_flops()
    rows = []
    cores = len(os.sched_getaffinity(0))
    cluster = ClusterConfig(local=LocalClusterConfig(n_workers=cores, threads_per_worker=1, processes=True),
                            dashboard_address="127.0.0.1:0")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="neurotrace-predict-bench-") as tmp, open_client(cluster) as client:
        checkpoint = save_checkpoint(Path(tmp) / "bench", model, spec, voxel_size=(1.0, 0.33, 0.33))
        pids = list(client.run(os.getpid).values())
        for text in args.volumes:
            shape = tuple(int(v) for v in text.split(","))
            folder = Path(tmp) / f"scene_{'x'.join(map(str, shape))}"
            render_to_zarr(random_scene(max(1, math.prod(shape) // 4_000_000), shape, SynthConfig(seed=1)), folder,
                           client=client)  # fmt: skip
            image = folder / "image.ome.zarr"
            volume = open_image(image)[0][0][...]
            norm = load_checkpoint(checkpoint).measure_normalisation(volume)
            bare = bare_forward(model, volume, block, norm)
            # CPU like the other two, and every block computed (no background skipping) for equal work.
            config = PredictConfig(checkpoint=checkpoint, block=block, halo=args.halo, device="cpu",
                                   skip_background=False)  # fmt: skip
            with worker_memory(pids) as worker_peak:
                result = predict(image, Path(tmp) / f"prob_{text}.ome.zarr", config, client=client)
            roi = tuple(min(b + 2 * args.halo, n) for b, n in zip(block, shape))
            monai = monai_sliding_window(model, volume, roi, args.halo, norm)
            voxels = math.prod(shape)
            row = {
                "shape": shape,
                "voxels": voxels,
                "bare_forward_voxels_per_s": voxels / bare,
                "blocked_dask_voxels_per_s": voxels / result.seconds,
                "monai_voxels_per_s": voxels / monai,
                "blocked_over_bare": bare / result.seconds,
                "blocked_over_monai": monai / result.seconds,
                "worker_peak_rss_mb": max(worker_peak.values()) / 2**20,
                "blocks": result.blocks,
            }
            rows.append(row)
            print(f"{text}: bare {row['bare_forward_voxels_per_s'] / 1e6:.2f}, blocked "
                  f"{row['blocked_dask_voxels_per_s'] / 1e6:.2f}, MONAI {row['monai_voxels_per_s'] / 1e6:.2f} Mvoxel/s; "
                  f"worker peak {row['worker_peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    header = (f"{'volume':>14} {'bare Mvox/s':>11} {'blocked Mvox/s':>14} {'MONAI Mvox/s':>12} "
              f"{'blocked/bare':>12} {'blocked/MONAI':>13} {'worker peak MB':>14}")  # fmt: skip
    print(f"model {args.preset}: {flops:,.0f} FLOPs per voxel; block {block}, halo {args.halo}; CPU peak {peak / 1e9:.0f} "
          f"GFLOP/s ({peak_text})")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>14} {r['bare_forward_voxels_per_s'] / 1e6:11.2f} "
              f"{r['blocked_dask_voxels_per_s'] / 1e6:14.2f} {r['monai_voxels_per_s'] / 1e6:12.2f} "
              f"{r['blocked_over_bare']:12.2f} {r['blocked_over_monai']:13.2f} {r['worker_peak_rss_mb']:14.0f}")  # fmt: skip
    for r in rows:
        achieved = flops * r["bare_forward_voxels_per_s"]
        r["bare_gflops"] = achieved / 1e9
        r["bare_fraction_of_peak"] = achieved / peak
    print(f"bare forward: {rows[-1]['bare_gflops']:.0f} GFLOP/s = {rows[-1]['bare_fraction_of_peak']:.1%} of peak")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "flops_per_voxel": flops, "block": block,
                                    "halo": args.halo, "cpu_peak_flops": peak, "cpu": peak_text,
                                    "rows": rows}, indent=1))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
