"""Tracing speed: voxel scooping is linear in foreground voxels, and how it compares with the peers.

(a) Linearity. Probability maps of rendered multi-neuron scenes (the stand-in map of
    ``benchmarks/accuracy.py``, intensity 1): a base tile of ``TILE`` voxels holding
    ``NEURONS_PER_TILE`` random neurons, and volumes of 2 x 2 and 4 x 4 such tiles in y, x, each
    tile an independent scene (its own seed), so the foreground fraction stays about the same
    while the volume grows 4x and 16x. ``trace_block`` is timed on each (median of
    ``--repeats`` runs after a numba warm-up); foreground voxels (the hysteresis mask) per
    second should stay flat. A last row pads the base tile with empty space to the largest
    mosaic's size: the same foreground in 16x the volume, which separates the cost of the
    foreground from the cost of whole-volume passes.
(b) Against the peers. One random neuron rendered in a 128 x 256 x 256 (z, y, x) block,
    its stand-in probability map, and three tracers on the same data in one run:

    - voxel scooping: ``trace_block(prob)`` (hysteresis, distance transform, labelling,
      scooping, pruning, bridging, smoothing: everything from the array in memory to the graph);
    - kimimaro on the same binary mask (``trace.hysteresis(prob, 128, 64)``, every 26-connected
      component kept): ``run_peer.run_kimimaro`` with threshold 0.5, no smoothing, the
      accuracy benchmark's TEASAR settings (component selection, TEASAR and postprocessing);
    - Rivulet2 on the same image (the probability map as float32, threshold 63.5 = the
      tracer's ``low``, no smoothing): ``run_peer.run_rivulet2``.

    The peers run in their own interpreter (``.peers``, ``make peers``) through
    ``benchmarks/peers/run_peer.py``'s functions, called by this script in ``--peer-worker``
    mode: the image is read and the peer's modules imported before the clock starts, so the
    times compared exclude interpreter start-up, imports and file I/O on both sides. kimimaro
    and ours are warmed up by one untimed run and report the median of ``--repeats`` runs;
    Rivulet2 (tens of seconds to minutes a run, nothing to compile) is timed once. Every tracer
    is single-threaded here. Each output is also scored against the gold (length F1 at
    tau = 3.94 xy voxels) so that speed is not bought by tracing nothing.

Prints a table and writes ``benchmarks/results/trace_speed.json``::

    make peers && .venv/bin/python benchmarks/trace_speed.py      # or: make trace-speed

Targets (issue 6): at least as fast as kimimaro, at least 20x faster than Rivulet2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_PYTHON = REPO / ".peers" / "bin" / "python"

TILE = (64, 256, 256)
NEURONS_PER_TILE = 3
VOXEL = (1.0, 0.5, 0.5)
BLOCK = (128, 256, 256)  # (z, y, x): "256 x 256 x 128" in x, y, z
HIGH, LOW = 128, 64  # trace_block's default hysteresis thresholds
PEER_TIMEOUT = 1800  # seconds for one peer worker (Rivulet2 may take minutes)


# --------------------------------------------------------------------------- data


def _standin(scene) -> np.ndarray:
    """The accuracy benchmark's stand-in probability map of a rendered scene."""
    sys.path.insert(0, str(HERE))
    from accuracy import rendered_signal, standin_probability

    signal, total = rendered_signal(scene)
    return standin_probability(signal, total, scene.params, [scene.params.seed, 0])


def tiled_probability(tiles: int, seed: int = 0) -> np.ndarray:
    """A ``tiles`` x ``tiles`` mosaic (in y, x) of independent multi-neuron stand-in maps of ``TILE``."""
    from neurotrace_dask.config import SynthConfig
    from neurotrace_dask.synth import random_scene

    rows = []
    for ty in range(tiles):
        row = []
        for tx in range(tiles):
            params = SynthConfig(voxel_size=VOXEL, intensity=1.0, seed=1000 * seed + 10 * ty + tx)
            row.append(_standin(random_scene(NEURONS_PER_TILE, TILE, params)))
        rows.append(np.concatenate(row, axis=2))
    return np.concatenate(rows, axis=1)


def single_neuron(seed: int = 7):
    """One random neuron centred in a ``BLOCK`` volume: (scene, stand-in probability map)."""
    from neurotrace_dask.config import SynthConfig
    from neurotrace_dask.synth import random_morphology, scene_from_swc

    size = np.asarray(BLOCK) * np.asarray(VOXEL)
    cell = random_morphology(seed, extent=tuple(0.9 * size))
    scene = scene_from_swc(cell, SynthConfig(voxel_size=VOXEL, intensity=1.0, seed=seed), shape=BLOCK)
    return scene, _standin(scene)


# --------------------------------------------------------------------------- timing


def time_ours(prob: np.ndarray, repeats: int) -> tuple[list[float], object]:
    """Seconds of ``trace_block(prob)`` for each of ``repeats`` runs after one untimed run."""
    from neurotrace_dask.trace import trace_block

    frags = trace_block(prob, voxel_size=VOXEL)  # warm-up (numba, caches)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        frags = trace_block(prob, voxel_size=VOXEL)
        times.append(time.perf_counter() - started)
    return times, frags


def run_peer_worker(method: str, image: Path, out: Path, threshold: float, components: int, repeats: int,
                    warmup: int) -> dict:  # fmt: skip
    """Run this script in ``--peer-worker`` mode under the peers' interpreter; its JSON reply."""
    command = [str(PEER_PYTHON), str(Path(__file__).resolve()), "--peer-worker", method, str(image), str(out),
               f"{threshold}", str(components), str(repeats), str(warmup)]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PEER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"method": method, "status": f"failed: timeout after {PEER_TIMEOUT} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"method": method, "status": f"failed: exit {done.returncode}: {done.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


def peer_worker(argv: list[str]) -> int:
    """``--peer-worker METHOD IMAGE OUT THRESHOLD COMPONENTS REPEATS WARMUP`` (peers' interpreter).

    Reads the image, imports the peer, then times ``run_peer.RUNNERS[METHOD]`` ``WARMUP +
    REPEATS`` times (the first ``WARMUP`` untimed), writes the last result to OUT with
    ``run_peer.write_swc`` and prints one JSON line.
    """
    import tifffile

    method, image, out, threshold, components, repeats, warmup = argv
    sys.path.insert(0, str(HERE / "peers"))
    import run_peer

    args = run_peer.parse_args([method, image, out, "--threshold", threshold, "--smooth", "0",
                                "--components", components])  # fmt: skip
    img = np.squeeze(tifffile.imread(image))
    started = time.perf_counter()
    if method == "kimimaro":
        import cc3d  # noqa: F401
        import kimimaro  # noqa: F401
    elif method == "rivulet2":
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=SyntaxWarning)
        run_peer._rivulet_compat()
        import rivuletpy.trace  # noqa: F401
        import rivuletpy.utils.io  # noqa: F401
    import_seconds = time.perf_counter() - started
    reply: dict[str, object] = {"method": method, "import_seconds": import_seconds, "status": "ok"}
    times = []
    rows: list = []
    try:
        for i in range(int(warmup) + int(repeats)):
            started = time.perf_counter()
            rows = run_peer.RUNNERS[method](img, args)
            if i >= int(warmup):
                times.append(time.perf_counter() - started)
        run_peer.write_swc(out, rows, [f"trace_speed.py peer worker: {method} threshold={threshold}"])
    except Exception as exc:  # noqa: BLE001 - recorded
        reply["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    reply.update(times=times, seconds=float(np.median(times)) if times else None, nodes=len(rows),
                 peak_rss_mb=run_peer.peak_rss_mb())  # fmt: skip
    print(json.dumps(reply), flush=True)
    return 0


# --------------------------------------------------------------------------- parts


def _timed_row(label: str, prob: np.ndarray, repeats: int) -> dict:
    from neurotrace_dask.trace import hysteresis

    fg = int(hysteresis(prob, HIGH, LOW).sum())
    times, frags = time_ours(prob, repeats)
    seconds = float(np.median(times))
    print(f"  {label} {prob.shape}: {fg} foreground voxels, {seconds:.2f} s "
          f"({fg / seconds / 1e6:.3f} M foreground voxels/s)", file=sys.stderr, flush=True)  # fmt: skip
    return {"volume": label, "shape": list(prob.shape), "voxels": int(prob.size), "foreground": fg,
            "foreground_fraction": fg / prob.size, "times": times, "seconds": seconds,
            "foreground_per_second": fg / seconds, "voxels_per_second": prob.size / seconds,
            "nodes": frags.n_nodes}  # fmt: skip


def linearity(tiles: list[int], repeats: int) -> list[dict]:
    """Part (a): trace_block on mosaics of ``tiles`` x ``tiles`` base tiles, and on the base tile
    alone padded with empty space to the largest mosaic's size (same foreground, more volume)."""
    rows = []
    base = None
    for n in tiles:
        prob = tiled_probability(n)
        if n == 1:
            base = prob
        rows.append(_timed_row(f"{n}x{n} tiles", prob, repeats))
        del prob
    if base is not None and max(tiles) > 1:
        n = max(tiles)
        padded = np.zeros((TILE[0], n * TILE[1], n * TILE[2]), np.uint8)
        padded[:, : TILE[1], : TILE[2]] = base
        rows.append(_timed_row(f"1 tile padded to {n}x{n}", padded, repeats))
    first = rows[0]
    for row in rows:
        # 1.0 is linear in foreground voxels: time grows exactly as the foreground does.
        row["time_ratio"] = row["seconds"] / first["seconds"]
        row["foreground_ratio"] = row["foreground"] / first["foreground"]
        row["voxel_ratio"] = row["voxels"] / first["voxels"]
        row["linearity"] = row["time_ratio"] / row["foreground_ratio"]
    return rows


def comparison(repeats: int, with_rivulet: bool) -> dict:
    """Part (b): ours, kimimaro and Rivulet2 on one neuron in a ``BLOCK`` block."""
    import tifffile
    from scipy import ndimage

    from neurotrace_dask.evaluate import evaluate
    from neurotrace_dask.io.swc import read_swc
    from neurotrace_dask.trace import hysteresis

    scene, prob = single_neuron()
    mask = hysteresis(prob, HIGH, LOW)
    components = int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1])
    tau = 3.94 * VOXEL[2]
    result: dict[str, object] = {"shape": list(prob.shape), "voxel_size": VOXEL, "foreground": int(mask.sum()),
                                 "components": components, "gold_cable_um": scene.gold.cable_length(VOXEL)}  # fmt: skip

    def f1(swc) -> float:
        return evaluate(scene.gold, swc, voxel_size_zyx=VOXEL, tau=tau).length.f1

    times, frags = time_ours(prob, repeats)
    ours = {"method": "neurotrace (trace_block)", "status": "ok", "times": times, "seconds": float(np.median(times)),
            "nodes": frags.n_nodes, "length_f1": f1(frags.to_swc())}  # fmt: skip
    print(f"  ours: {ours['seconds']:.3f} s, F1 {ours['length_f1']:.3f}", file=sys.stderr, flush=True)
    peers = []
    if not PEER_PYTHON.exists():
        result["note"] = "peers not installed (make peers): no comparison"
    else:
        with tempfile.TemporaryDirectory(prefix="trace-speed-") as tmp:
            folder = Path(tmp)
            tifffile.imwrite(folder / "mask.tif", mask.astype(np.uint8))
            tifffile.imwrite(folder / "prob.tif", prob.astype(np.float32))
            jobs = [("kimimaro", folder / "mask.tif", 0.5, repeats, 1)]
            if with_rivulet:
                jobs.append(("rivulet2", folder / "prob.tif", LOW - 0.5, 1, 0))
            for method, image, threshold, n, warmup in jobs:
                out = folder / f"{method}.swc"
                reply = run_peer_worker(method, image, out, threshold, components, n, warmup)
                if reply.get("status") == "ok" and out.exists():
                    reply["length_f1"] = f1(read_swc(out))
                peers.append(reply)
                print(f"  {method}: {reply.get('seconds')} s, F1 {reply.get('length_f1')}, {reply.get('status')}",
                      file=sys.stderr, flush=True)  # fmt: skip
    result["tracers"] = [ours, *peers]
    for reply in peers:
        if reply.get("status") == "ok" and reply.get("seconds"):
            result[f"{reply['method']}_over_ours"] = reply["seconds"] / ours["seconds"]
    return result


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    import numba
    import scipy

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "numba": numba.__version__, "load_average_start": os.getloadavg()}  # fmt: skip


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer-worker":
        return peer_worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4],
                        help="mosaic sizes for the linearity part (default 1 2 4: 1x, 4x, 16x the base tile)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median) for ours and kimimaro")
    parser.add_argument("--no-rivulet", action="store_true", help="leave Rivulet2 out (it takes minutes)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "trace_speed.json")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from accuracy import code_state

    report: dict[str, object] = {"machine": machine(), "code": code_state(), "tile": TILE,
                                 "neurons_per_tile": NEURONS_PER_TILE, "voxel_size": VOXEL,
                                 "hysteresis": [HIGH, LOW]}  # fmt: skip
    print("(a) linearity in foreground voxels", file=sys.stderr, flush=True)
    report["linearity"] = linearity(args.tiles, args.repeats)
    print(f"(b) one neuron in {BLOCK} (z, y, x)", file=sys.stderr, flush=True)
    report["comparison"] = comparison(args.repeats, not args.no_rivulet)
    report["machine"]["load_average_end"] = os.getloadavg()  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"wrote {args.out}")
    return 0


def table(report: dict) -> str:
    """The report as two markdown tables."""
    lines = ["| volume | shape (z, y, x) | foreground voxels | trace_block s | M foreground voxels/s | time ratio "
             "| foreground ratio | voxel ratio | time / foreground ratio |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["linearity"]:
        lines.append(f"| {r['volume']} | {' x '.join(map(str, r['shape']))} | {r['foreground']} | {r['seconds']:.2f} | "
                     f"{r['foreground_per_second'] / 1e6:.3f} | {r['time_ratio']:.2f} | {r['foreground_ratio']:.2f} | "
                     f"{r['voxel_ratio']:.0f} | {r['linearity']:.2f} |")  # fmt: skip
    c = report["comparison"]
    lines += ["", f"One neuron, {' x '.join(map(str, c['shape']))} (z, y, x), {c['foreground']} foreground voxels:", "",
              "| tracer | input | seconds (median) | runs | seconds / ours | length F1 | status |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    inputs = {"kimimaro": "same binary mask", "rivulet2": "same probability image"}
    ours = c["tracers"][0]["seconds"]
    for t in c["tracers"]:
        seconds = t.get("seconds")
        f1 = t.get("length_f1")
        lines.append(f"| {t['method']} | {inputs.get(t['method'], 'probability map')} | "
                     f"{'n/a' if seconds is None else f'{seconds:.3f}'} | {len(t.get('times', []))} | "
                     f"{'n/a' if seconds is None else f'{seconds / ours:.1f}'} | "
                     f"{'n/a' if f1 is None else f'{f1:.3f}'} | {t['status']} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
