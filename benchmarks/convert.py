"""Conversion memory and throughput: does peak memory stay flat as the stack grows?

Generates uint16 BigTIFF stacks of about 0.5 GB and 2 GB (fibres on a Poisson background, written
page by page), then for each one, in separate processes:

- baseline: a plain ``tifffile.imread`` of the whole file (wall time, peak RSS);
- ``neurotrace convert`` with default settings on a local cluster (wall time of the whole command,
  peak RSS summed over the command and its worker processes, sampled every 20 ms);
- both again with a cold page cache (the file read from disk), where dropping the cache is allowed.

Targets (issue 3): peak RSS of the two conversions within 1.3x of each other, and conversion
throughput at least half of the plain read's. For context it also reports the conversion time the
command itself prints (without interpreter and cluster start-up) and the speed of Blosc-Zstd
encoding alone on all cores, the CPU bound of writing compressed chunks. Prints a table and
writes ``benchmarks/results/convert.json``.

    python benchmarks/convert.py [--sizes-gb 0.5 2] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile

RESULTS = Path(__file__).resolve().parent / "results" / "convert.json"
PLANE = (1024, 1024)


def write_stack(path: Path, n_slices: int, seed: int = 0) -> None:
    """A uint16 stack written one page at a time (never whole in memory)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: PLANE[0], : PLANE[1]]
    phases = rng.uniform(0, 2 * np.pi, 8)

    def pages():
        for z in range(n_slices):
            page = rng.poisson(120, PLANE).astype(np.float32)
            for k, phase in enumerate(phases):
                centre = PLANE[0] / 2 + 300 * np.sin(xx / (90 + 17 * k) + phase + z / 50)
                page += 2500 * np.exp(-((yy - centre) ** 2) / 8.0)
            yield page.astype(np.uint16)

    tifffile.imwrite(path, pages(), shape=(n_slices, *PLANE), dtype=np.uint16, bigtiff=True,
                     photometric="minisblack", metadata={"axes": "ZYX"})


def compression_ceiling_mb_s(path: Path, sample_slices: int = 64) -> float:
    """Blosc-Zstd (level 1, byte shuffle) encoding alone, one thread per core: the CPU bound of
    any converter that writes compressed chunks on this machine."""
    from concurrent.futures import ThreadPoolExecutor

    from numcodecs import Blosc

    data = tifffile.imread(path, key=range(sample_slices))
    chunks = [np.ascontiguousarray(data[:, y:y + 128, x:x + 128])
              for y in range(0, PLANE[0], 128) for x in range(0, PLANE[1], 128)]
    codec = Blosc("zstd", 1, Blosc.SHUFFLE)
    with ThreadPoolExecutor(psutil.cpu_count()) as pool:
        start = time.perf_counter()
        list(pool.map(codec.encode, chunks))
        elapsed = time.perf_counter() - start
    return data.nbytes / 2**20 / elapsed


def drop_page_cache() -> bool:
    """Empty the OS page cache (needs root); False where that is not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_sampled(command: list[str]) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS in bytes summed over it and its children, output)."""
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while process.poll() is None:
        total = 0
        try:
            for member in [process, *process.children(recursive=True)]:
                try:
                    total += member.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        peak = max(peak, total)
        time.sleep(0.02)
    elapsed = time.perf_counter() - start
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"command failed ({process.returncode}): {' '.join(command)}\n{output}")
    return elapsed, peak, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the stacks (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nt-bench-convert-"))
    workdir.mkdir(parents=True, exist_ok=True)
    neurotrace = str(Path(sys.executable).with_name("neurotrace"))
    read_code = "import sys, tifffile; tifffile.imread(sys.argv[1])"
    rows = []
    try:
        for size_gb in args.sizes_gb:
            n_slices = max(1, round(size_gb * 2**30 / (PLANE[0] * PLANE[1] * 2)))
            tiff = workdir / f"stack_{size_gb:g}gb.tif"
            write_stack(tiff, n_slices)
            nbytes = n_slices * PLANE[0] * PLANE[1] * 2
            # Same page-cache state for both: a warm-up read, then baseline, conversion, baseline again.
            run_sampled([sys.executable, "-c", read_code, str(tiff)])
            read_times, read_peaks = [], []
            t, p, _ = run_sampled([sys.executable, "-c", read_code, str(tiff)])
            read_times.append(t), read_peaks.append(p)
            out = workdir / f"stack_{size_gb:g}gb.ome.zarr"
            convert_time, convert_peak, output = run_sampled(
                [neurotrace, "convert", str(tiff), str(out), "--voxel-size", "1", "0.3", "0.3", "--overwrite"]
            )
            t, p, _ = run_sampled([sys.executable, "-c", read_code, str(tiff)])
            read_times.append(t), read_peaks.append(p)
            read_time = min(read_times)
            cold = {}
            if drop_page_cache():
                # Cold: the file comes from disk, as a stack bigger than the cache would.
                cold["read_s"] = run_sampled([sys.executable, "-c", read_code, str(tiff)])[0]
                shutil.rmtree(out)
                drop_page_cache()
                cold["convert_s"] = run_sampled(
                    [neurotrace, "convert", str(tiff), str(out), "--voxel-size", "1", "0.3", "0.3"])[0]
            # The command's own account of its conversion, without interpreter and cluster start-up.
            inner = float(re.search(r"already done, ([0-9.]+) s", output).group(1))
            ceiling = compression_ceiling_mb_s(tiff)
            rows.append({
                "size_gb": round(nbytes / 2**30, 3), "shape": [n_slices, *PLANE], "dtype": "uint16",
                "read_s": round(read_time, 2), "read_peak_rss_mb": round(max(read_peaks) / 2**20),
                "convert_s": round(convert_time, 2), "convert_peak_rss_mb": round(convert_peak / 2**20),
                "read_mb_s": round(nbytes / 2**20 / read_time), "convert_mb_s": round(nbytes / 2**20 / convert_time),
                "throughput_ratio": round(read_time / convert_time, 3),
                "convert_inside_s": inner, "convert_inside_mb_s": round(nbytes / 2**20 / inner),
                "zstd_ceiling_mb_s": round(ceiling),
                "inside_vs_ceiling": round(nbytes / 2**20 / inner / ceiling, 3),
                "output_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20),
                "cold_read_s": round(cold["read_s"], 2) if cold else None,
                "cold_convert_s": round(cold["convert_s"], 2) if cold else None,
                "cold_throughput_ratio": round(cold["read_s"] / cold["convert_s"], 3) if cold else None,
            })
            shutil.rmtree(out)
            tiff.unlink()
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    rss_ratio = max(r["convert_peak_rss_mb"] for r in rows) / min(r["convert_peak_rss_mb"] for r in rows)
    summary = {
        "peak_rss_ratio_largest_vs_smallest": round(rss_ratio, 3),
        "peak_rss_target": "<= 1.3",
        "min_throughput_ratio": min(r["throughput_ratio"] for r in rows),
        "throughput_target": ">= 0.5 of a plain tifffile.imread",
        "min_inside_vs_zstd_ceiling": min(r["inside_vs_ceiling"] for r in rows),
        "min_cold_throughput_ratio": min((r["cold_throughput_ratio"] for r in rows if r["cold_throughput_ratio"]),
                                         default=None),
    }
    header = f"{'size GB':>8} {'read s':>7} {'read MB/s':>10} {'read RSS MB':>12} {'convert s':>10} " \
             f"{'conv MB/s':>10} {'conv RSS MB':>12} {'tput ratio':>11} {'inside MB/s':>12} " \
             f"{'zstd MB/s':>10} {'vs zstd':>8} {'out MB':>7}"
    print(header)
    for r in rows:
        print(f"{r['size_gb']:>8} {r['read_s']:>7} {r['read_mb_s']:>10} {r['read_peak_rss_mb']:>12} "
              f"{r['convert_s']:>10} {r['convert_mb_s']:>10} {r['convert_peak_rss_mb']:>12} "
              f"{r['throughput_ratio']:>11} {r['convert_inside_mb_s']:>12} {r['zstd_ceiling_mb_s']:>10} "
              f"{r['inside_vs_ceiling']:>8} {r['output_mb']:>7}")
    print(f"peak RSS ratio (largest / smallest stack): {summary['peak_rss_ratio_largest_vs_smallest']} (target <= 1.3)")
    print(f"throughput vs plain tifffile read: min {summary['min_throughput_ratio']} (target >= 0.5)")
    print(f"conversion (inside the command) vs Blosc-Zstd encoding alone: min {summary['min_inside_vs_zstd_ceiling']}")
    for r in rows:
        if r["cold_read_s"] is not None:
            print(f"cold page cache, {r['size_gb']} GB: read {r['cold_read_s']} s, convert {r['cold_convert_s']} s, "
                  f"ratio {r['cold_throughput_ratio']}")
    if summary["min_cold_throughput_ratio"] is None:
        print("cold-cache runs skipped: cannot drop the page cache here (needs root)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "convert", "date": time.strftime("%Y-%m-%d"), "machine": {
            "cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version()},
        "rows": rows, "summary": summary,
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
