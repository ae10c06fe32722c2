"""Blocked tracing + stitching at scale: throughput, worker memory, and kimimaro chunked as the peer.

A multi-neuron synthetic scene is written as a probability map to OME-Zarr, block by block
on Dask (chunks holding only zeros are never stored). The probability map is a stand-in
until trained weights are measured here: each neuron's label mask blurred by a 1-voxel
Gaussian, times 255. Then, for each volume size:

- ``neurotrace trace`` by blocks + stitch (``trace_volume``) on a fresh LocalCluster of
  ``--workers`` single-threaded processes, timed end to end (reading Zarr included):
  voxels per second per worker core, and each worker's peak RSS; then once more on the
  same workers ("warm": without each fresh worker process's one-off imports and
  compiled-code loading, as every block after the first of a long run sees it). Both
  ``--repeat`` times (this machine is noisy): medians, and every run in the JSON;
- the same at a quarter of the size (a quarter of the neurons, each smaller, so sparser
  blocks), and that quarter map tiled 2 x 2: four times the volume with the same blocks, to
  show that worker memory does not grow with the volume;
- kimimaro chunked the igneous way (``benchmarks/peers/kimimaro_chunked.py``: chunks of the
  same shape overlapping by one voxel, ``fix_borders``, ``simple_merge`` + ``consolidate`` +
  ``postprocess``) on the mask ``prob >= trace.low``, in the peers' venv, one process: its
  compute time excludes reading its chunk files;
- the stitch alone, rerun on the fragment records: seconds and peak allocation (tracemalloc);
- length-F1 of both against the scene's gold SWC.

Prints a table and writes ``benchmarks/results/trace_scale.json``::

    .venv/bin/python benchmarks/trace_scale.py                      # 512 x 1024 x 1024 and a quarter
    .venv/bin/python benchmarks/trace_scale.py --shape 256 512 512  # quicker
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

from neurotrace_dask.blocks import BlockGrid
from neurotrace_dask.cluster import open_client, run_tasks
from neurotrace_dask.config import ClusterConfig, LocalClusterConfig, SynthConfig, TraceConfig
from neurotrace_dask.evaluate import evaluate
from neurotrace_dask.io.omezarr import mark_complete, plan_layout, write_image_metadata
from neurotrace_dask.io.swc import read_swc
from neurotrace_dask.synth import Scene, random_scene, render
from neurotrace_dask.stitch import join_fragments
from neurotrace_dask.trace import Fragments, block_faces, trace_volume

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".peers" / "bin" / "python"
VOXEL = (1.0, 0.5, 0.5)
CHUNKS = (64, 128, 128)


def _prob_block(region: tuple[slice, ...], *, scene: Scene, store: str) -> int:
    """Render the label mask of ``region`` (with a 4-voxel halo), blur, write; foreground voxels."""
    halo = 4
    read = tuple(slice(max(s.start - halo, 0), min(s.stop + halo, n)) for s, n in zip(region, scene.shape))
    _, mask = render(scene, read)
    prob = (ndimage.gaussian_filter((mask > 0).astype(np.float32), 1.0) * 255).round().astype(np.uint8)
    crop = tuple(slice(s.start - r.start, s.stop - r.start) for s, r in zip(region, read))
    prob = prob[crop]
    if prob.any():
        zarr.open_array(store, mode="r+")[region] = prob
    return int((prob >= 64).sum())


def write_probability(scene: Scene, path: Path, client) -> float:
    """The stand-in probability map as OME-Zarr; returns the foreground fraction (>= 64)."""
    layout = plan_layout(scene.shape, np.uint8, VOXEL, levels=1, chunks=CHUNKS)
    write_image_metadata(path, layout, name="p(neurite), stand-in: blurred label mask")
    grid = BlockGrid(scene.shape, (128, 256, 256), align=CHUNKS)
    counts = run_tasks(client, _prob_block, [b.write for b in grid], total=len(grid), description="render",
                       scene=scene, store=str(path / "0"))  # fmt: skip
    mark_complete(path)
    return sum(counts) / math.prod(scene.shape)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(prob: Path, out: Path, block: int, workers: int, repeat: int) -> dict:
    """Trace ``prob`` ``repeat`` times, each on a fresh cluster ("cold") and then again on the
    same workers ("warm"); medians of both, every run's seconds, the highest worker peak RSS."""
    cluster = ClusterConfig(local=LocalClusterConfig(n_workers=workers, threads_per_worker=1, processes=True))
    config = TraceConfig(block=(block,) * 3, overwrite=True)
    cold, warm, rss = [], [], []
    for _ in range(repeat):
        with open_client(cluster) as client:
            start = time.perf_counter()
            result = trace_volume(prob, out, config, client=client)
            cold.append(time.perf_counter() - start)
            rss = max(rss, sorted(client.run(_peak_rss_mb).values()), key=lambda r: max(r, default=0))
            # Again on the same workers: without the one-off start-up of each fresh worker
            # process (imports, compiled-code cache), as the blocks after the first of a long run see it.
            start = time.perf_counter()
            trace_volume(prob, out, config, client=client)
            warm.append(time.perf_counter() - start)
    # The stitch alone, again, from the fragment records: its time and peak allocations.
    tracemalloc.start()
    start = time.perf_counter()
    records = (Fragments.load(p) for p in sorted((out / "fragments").glob("*.npz")))
    neurons = join_fragments(records)
    stitch_s = time.perf_counter() - start
    stitch_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    seconds, warm_seconds, voxels = float(np.median(cold)), float(np.median(warm)), math.prod(result.shape)
    return {"seconds": seconds, "seconds_all": cold, "blocks": result.blocks, "empty_blocks": result.empty,
            "neurons": result.neurons, "worker_peak_rss_mb": rss, "voxels_per_s_per_core": voxels / seconds / workers,
            "warm_seconds": warm_seconds, "warm_seconds_all": warm,
            "warm_voxels_per_s_per_core": voxels / warm_seconds / workers, "stitch_seconds": stitch_s,
            "stitch_peak_mb": stitch_mb, "stitch_nodes": neurons.fragments.n_nodes}  # fmt: skip


def tile_probability(prob: Path, out: Path, tiles: tuple[int, int, int] = (1, 2, 2)) -> tuple[int, ...]:
    """``prob`` repeated ``tiles`` times along (z, y, x) as a new map: the volume grows, the
    content of its blocks does not (copied stored chunk by stored chunk); returns the shape."""
    source = zarr.open_array(prob / "0", mode="r")
    shape = tuple(n * t for n, t in zip(source.shape, tiles, strict=True))
    layout = plan_layout(shape, np.uint8, VOXEL, levels=1, chunks=source.chunks)
    write_image_metadata(out, layout, name="p(neurite), stand-in tiled")
    target = zarr.open_array(out / "0", mode="r+")
    for region in BlockGrid(source.shape, (128, 256, 256), align=source.chunks):
        data = np.asarray(source[region.write])
        if data.any():
            for tile in itertools.product(*(range(t) for t in tiles)):
                at = tuple(slice(r.start + k * n, r.stop + k * n)
                           for r, k, n in zip(region.write, tile, source.shape, strict=True))  # fmt: skip
                target[at] = data
    mark_complete(out)
    return shape


def export_chunks(prob: Path, folder: Path, block: int, low: float) -> int:
    """Mask chunks for kimimaro, overlapping their high-side neighbours by one voxel; non-empty only."""
    array = zarr.open_array(prob / "0", mode="r")
    grid = BlockGrid(array.shape, block)
    n = 0
    for b in grid:
        region, _ = block_faces(b, array.shape)
        mask = np.asarray(array[region]) >= low
        if mask.any():
            np.savez(folder / f"{b.id:08d}.npz", mask=mask, origin=np.array([r.start for r in region]))
            n += 1
    return n


def run_kimimaro(prob: Path, work: Path, block: int, low: float) -> dict:
    chunks = work / "chunks"
    chunks.mkdir()
    n = export_chunks(prob, chunks, block, low)
    out = work / "kimimaro.swc"
    start = time.perf_counter()
    proc = subprocess.run([str(PEERS), str(ROOT / "benchmarks/peers/kimimaro_chunked.py"), str(chunks), str(out),
                           "--anisotropy", *map(str, VOXEL)], capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"}
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok", "seconds": reply["seconds"], "wall_seconds": wall, "chunks": n, "swc": out}


def f1(gold, path: Path) -> float:
    test = read_swc(path)
    return evaluate(gold, test, voxel_size_zyx=VOXEL).to_dict()["length"]["f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=3, type=int, default=(512, 1024, 1024), metavar=("Z", "Y", "X"))
    parser.add_argument("--neurons", type=int, default=16, help="neurons in the full-size volume")
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of ours per map (medians reported)")
    parser.add_argument("--no-peer", action="store_true", help="skip kimimaro")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/trace_scale.json")
    args = parser.parse_args()
    full = tuple(args.shape)
    quarter = (full[0], full[1] // 2, full[2] // 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="trace_scale_") as tmp:
        for shape, n_neurons in ((quarter, max(1, args.neurons // 4)), (full, args.neurons)):
            work = Path(tmp) / "x".join(map(str, shape))
            work.mkdir()
            # Thick neurites (0.6-1.2 um) so that the stand-in mask holds whole arbors.
            scene = random_scene(n_neurons, shape, SynthConfig(voxel_size=VOXEL, seed=7), radius=(0.6, 1.2))
            with open_client(ClusterConfig(local=LocalClusterConfig(n_workers=args.workers, threads_per_worker=1))) as c:
                start = time.perf_counter()
                fraction = write_probability(scene, work / "prob.ome.zarr", c)
                render_s = time.perf_counter() - start
            ours = run_ours(work / "prob.ome.zarr", work / "traced", args.block, args.workers, args.repeat)
            ours["f1"] = f1(scene.gold, work / "traced" / "neurons.swc")
            row = {"shape": shape, "voxels": math.prod(shape), "neurons": n_neurons, "foreground_fraction": fraction,
                   "render_seconds": render_s, "ours": ours}  # fmt: skip
            if shape == quarter:  # memory control: 4x the volume, the same blocks
                tiled_shape = tile_probability(work / "prob.ome.zarr", work / "tiled.ome.zarr")
                tiled = run_ours(work / "tiled.ome.zarr", work / "tiled", args.block, args.workers, args.repeat)
                row["tiled_2x2"] = {"shape": tiled_shape, **tiled}
            if not args.no_peer and PEERS.exists():
                peer = run_kimimaro(work / "prob.ome.zarr", work, args.block, TraceConfig().low)
                if peer["status"] == "ok":
                    peer["f1"] = f1(scene.gold, peer.pop("swc"))
                    peer["voxels_per_s"] = math.prod(shape) / peer["seconds"]
                    row["speed_ratio_vs_kimimaro_per_core"] = peer["seconds"] / (ours["seconds"] * args.workers)
                row["kimimaro"] = peer
            rows.append(row)
            shutil.rmtree(work)
    print(f"\n{'shape':>16} {'fg %':>6} {'ours s':>7} {'Mvox/s/core':>11} {'warm s':>7} {'warm Mvox/s/core':>16} "
          f"{'worker RSS MB':>15} {'F1':>5} {'kimimaro s':>10} {'F1':>5} {'ratio':>6}")  # fmt: skip
    for r in rows:
        o, k = r["ours"], r.get("kimimaro", {})
        print(f"{'x'.join(map(str, r['shape'])):>16} {100 * r['foreground_fraction']:6.3f} {o['seconds']:7.2f} "
              f"{o['voxels_per_s_per_core'] / 1e6:11.1f} {o['warm_seconds']:7.2f} "
              f"{o['warm_voxels_per_s_per_core'] / 1e6:16.1f} {max(o['worker_peak_rss_mb']):15.0f} {o['f1']:5.3f} "
              f"{k.get('seconds', float('nan')):10.1f} {k.get('f1', float('nan')):5.3f} "
              f"{r.get('speed_ratio_vs_kimimaro_per_core', float('nan')):6.2f}")  # fmt: skip
    growth = max(rows[1]["ours"]["worker_peak_rss_mb"]) / max(rows[0]["ours"]["worker_peak_rss_mb"])
    tiled = rows[0]["tiled_2x2"]
    tiled_growth = max(tiled["worker_peak_rss_mb"]) / max(rows[0]["ours"]["worker_peak_rss_mb"])
    print(f"worker peak RSS, 4x the volume: x{growth:.2f} (denser scene), x{tiled_growth:.2f} (the quarter map tiled "
          f"2x2: {max(tiled['worker_peak_rss_mb']):.0f} MB, {tiled['voxels_per_s_per_core'] / 1e6:.1f} Mvox/s/core, "
          f"warm {tiled['warm_voxels_per_s_per_core'] / 1e6:.1f})")
    print("ratio = kimimaro seconds / (ours seconds x workers)")
    for r in rows:
        o = r["ours"]
        print(f"stitch of {'x'.join(map(str, r['shape']))}: {o['stitch_nodes']} nodes, {o['stitch_seconds']:.2f} s, "
              f"peak {o['stitch_peak_mb']:.1f} MB allocated")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "rss_growth_4x_volume": growth,
                                     "rss_growth_4x_volume_same_blocks": tiled_growth, "workers": args.workers,
                                     "block": args.block, "python": sys.version.split()[0]}, indent=1, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
