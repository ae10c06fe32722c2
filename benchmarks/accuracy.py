"""The weak-neurite benchmark: every tracer against gold as the signal dims.

Cases
    The five DIADEM OP stacks with their gold SWCs, and volumes rendered by
    ``neurotrace_dask.synth`` from real morphologies in ``../shared/data/morphologies``
    (plus one random neuron), each at intensity 1, 0.5, 0.25 and 0.125. OP images are
    dimmed by ``synth.dim_real_image``: the real light scaled, then the same background,
    shot and read noise as the renderer adds, so both series share one noise model.
Methods
    Every tracer of this project (``neurotrace-raw``: voxel scooping on the raw image, run
    by ``benchmarks/run_neurotrace.py`` with the package defaults, no tuning here) and the
    peers, run side by side from their own virtual environment (``make peers``):
    kimimaro on a thresholded mask, Rivulet2, and APP2 when an ``app2`` executable is on
    PATH. A peer that is not installed is skipped with a note.
Fair thresholds
    Every peer gets the same input, the image minus its background (a Gaussian of sigma
    ``BACKGROUND_UM``, clipped at 0: without it, low-frequency autofluorescence above a
    global threshold turns the mask into a sponge), and a threshold from one rule: median
    + k x 1.4826 x MAD of that input smoothed by a Gaussian of sigma 1 voxel. k is chosen per method from
    ``K_CHOICES`` per series as the best mean length-F1 on its tuning cases (OP_1 for the
    OP series, the first morphology for the rendered one, at intensities 1 and 0.25), then
    used for every case of that series. Tuning
    cases are marked in the results. A peer run longer than ``PEER_TIMEOUT`` seconds
    counts as failed (F1 0) and says so.
Scores
    ``neurotrace_dask.evaluate`` at tolerance tau = 3.94 xy voxels (the DIADEM OP xy
    threshold): length F1, recall, precision, the DIADEM score; wall seconds and peak RSS
    of the tracer process.

Writes ``accuracy.json``, ``accuracy.md`` and ``accuracy.png`` to ``--out``
(default ``benchmarks/results``)::

    make peers && .venv/bin/python benchmarks/accuracy.py            # full: about an hour on 2 cores
    .venv/bin/python benchmarks/accuracy.py --quick                  # OP_5 + one rendered cell, 2 intensities
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from neurotrace_dask.config import SynthConfig
from neurotrace_dask.evaluate import evaluate
from neurotrace_dask.io.swc import SWC, read_swc
from neurotrace_dask.synth import dim_real_image, load_morphology, random_morphology, render, scene_from_swc

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data"
PEER_PYTHON = REPO / ".peers" / "bin" / "python"
RUN_PEER = HERE / "peers" / "run_peer.py"
RUN_OURS = HERE / "run_neurotrace.py"
PEERS = ("kimimaro", "rivulet2", "app2")  # thresholded by the rule below, k tuned

INTENSITIES = (1.0, 0.5, 0.25, 0.125)
K_CHOICES = (2.0, 4.0, 8.0)
OP_VOXEL = (1.0, 0.3296, 0.3296)
RENDER_VOXEL = (1.0, 0.4, 0.4)
MORPHOLOGIES = ("nmo_swcvis_granule.swc", "bmtk_Pvalb_469628681_m.swc", "nmo_swcvis_bipolar.swc")
TAU_XY_VOXELS = 3.94
BACKGROUND_UM = 10.0  # scale of the background removed before thresholding
PEER_TIMEOUT = 300  # seconds per run: a longer run counts as failed (stated in the report)
TUNING_INTENSITIES = (1.0, 0.25)


@dataclass(eq=False)
class Case:
    """One image with its gold standard."""

    name: str
    series: str  # "OP" or "rendered"
    intensity: float
    image: np.ndarray
    gold: SWC
    voxel_size: tuple[float, float, float]
    tuning: bool = False
    raw_input: Path | None = None  # set by prepare()
    peer_input: Path | None = None
    median_mad: tuple[float, float] = (math.nan, math.nan)

    @property
    def tau(self) -> float:
        return TAU_XY_VOXELS * self.voxel_size[2]


@dataclass
class Run:
    """One method on one case."""

    method: str
    case: str
    series: str
    intensity: float
    k: float
    threshold: float
    status: str
    seconds: float = math.nan
    peak_rss_mb: float = math.nan
    scores: dict = field(default_factory=dict)
    tuning: bool = False


# --------------------------------------------------------------------------- cases


def op_cases(numbers: list[int], intensities: tuple[float, ...]) -> Iterator[Case]:
    folder = SHARED / "diadem_op"
    for n in numbers:
        real = tifffile.imread(folder / "stacks" / f"OP_{n}.tif")
        gold = read_swc(folder / "gold" / f"OP_{n}.swc")
        for intensity in intensities:
            image = dim_real_image(real, intensity, SynthConfig(seed=n))
            yield Case(f"OP_{n}", "OP", intensity, image, gold, OP_VOXEL, tuning=n == 1 and intensity in TUNING_INTENSITIES)


def rendered_cases(names: list[str], intensities: tuple[float, ...]) -> Iterator[Case]:
    for i, name in enumerate(names):
        if name == "random":
            cell = random_morphology(5)
        else:
            cell = load_morphology(SHARED / "morphologies" / name)
        for intensity in intensities:
            params = SynthConfig(voxel_size=RENDER_VOXEL, intensity=intensity, seed=100 + i, margin=5.0)
            scene = scene_from_swc(cell, params)
            image, _ = render(scene)
            tuning = i == 0 and intensity in TUNING_INTENSITIES
            yield Case(Path(name).stem, "rendered", intensity, image, scene.gold, RENDER_VOXEL, tuning=tuning)


def subtract_background(image: np.ndarray, voxel_size: tuple[float, float, float]) -> np.ndarray:
    """float32 image minus its Gaussian-smoothed (sigma BACKGROUND_UM) version, clipped at 0.

    Standard preprocessing before a global threshold: without it, low-frequency background
    above the threshold joins the neuron into one sponge-like mask.
    """
    data = image.astype(np.float32)
    background = ndimage.gaussian_filter(data, [BACKGROUND_UM / v for v in voxel_size])
    return np.clip(data - background, 0, None)


# --------------------------------------------------------------------------- methods


def _reply(command: list[str]) -> dict:
    """Run a tracer process; its last JSON line, or a failure status."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PEER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timeout after {PEER_TIMEOUT} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"status": f"failed: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def peer(name: str) -> Callable[[Case, Path, float], dict]:
    """A peer tracer run by ``benchmarks/peers/run_peer.py`` in the ``.peers`` venv, on the peers' input."""

    def run(case: Case, out: Path, thr: float) -> dict:
        return _reply([str(PEER_PYTHON), str(RUN_PEER), name, str(case.peer_input), str(out), "--threshold",
                       f"{thr:.4f}", "--smooth", "1"])  # fmt: skip

    return run


def ours(method: str) -> Callable[[Case, Path, float], dict]:
    """This project's tracer (``benchmarks/run_neurotrace.py``) on the raw image, its own defaults."""

    def run(case: Case, out: Path, thr: float) -> dict:
        return _reply([sys.executable, str(RUN_OURS), method, str(case.raw_input), str(out), "--voxel-size",
                       *map(str, case.voxel_size)])  # fmt: skip

    return run


def available_methods(wanted: list[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    """The methods that can run here, and a note for each that cannot."""
    methods: dict[str, Callable] = {}
    notes: dict[str, str] = {}
    for name in wanted:
        if name == "neurotrace-raw":
            methods[name] = ours("raw")
        elif name in PEERS:
            if not PEER_PYTHON.exists():
                notes[name] = "skipped: peers not installed (run `make peers`)"
            elif name == "app2" and not (shutil.which("app2") or shutil.which("vaa3d")):
                notes[name] = "skipped: no app2 or vaa3d executable on PATH"
            else:
                methods[name] = peer(name)
        else:
            notes[name] = "skipped: unknown method"
    return methods, notes


def prepare(case: Case, folder: Path) -> None:
    """Write the raw image and the peers' input (background removed) once per case; note the
    latter's smoothed median and MAD."""
    case.raw_input = folder / f"{case.name}_{case.intensity:g}_raw.tif"
    tifffile.imwrite(case.raw_input, case.image)
    prepared = subtract_background(case.image, case.voxel_size)
    case.peer_input = folder / f"{case.name}_{case.intensity:g}.tif"
    tifffile.imwrite(case.peer_input, prepared)
    smooth = ndimage.gaussian_filter(prepared, 1.0)
    median = float(np.median(smooth))
    case.median_mad = (median, float(np.median(np.abs(smooth - median))))


def run_one(method: str, function: Callable, case: Case, k: float, folder: Path) -> Run:
    median, mad = case.median_mad
    thr = median + k * 1.4826 * mad
    stem = f"{case.name}_{case.intensity:g}_{method}_k{k:g}"
    out = folder / f"{stem}.swc"
    started = time.perf_counter()
    reply = function(case, out, thr)
    run = Run(method, case.name, case.series, case.intensity, k, thr, reply.get("status", "failed: no status"),
              reply.get("seconds", time.perf_counter() - started), reply.get("peak_rss_mb", math.nan),
              tuning=case.tuning)  # fmt: skip
    if run.status == "ok":
        try:
            test = read_swc(out)
        except Exception as exc:  # a peer's unreadable output is its failure, recorded
            run.status = f"failed: unreadable SWC ({exc})"
            return run
        result = evaluate(case.gold, test, voxel_size_zyx=case.voxel_size, tau=case.tau).to_dict()
        run.scores = result
    return run


def headline(run: Run) -> dict[str, float]:
    """The scores the table shows: length F1/recall/precision and DIADEM (0 for a failed run)."""
    if not run.scores:
        return {"f1": 0.0, "recall": 0.0, "precision": 0.0, "diadem": 0.0}
    length = run.scores["length"]
    return {"f1": length["f1"], "recall": length["recall"], "precision": length["precision"],
            "diadem": run.scores["diadem"]["score"]}  # fmt: skip


# --------------------------------------------------------------------------- report


def markdown(runs: list[Run], chosen_k: dict[str, float], notes: dict[str, str]) -> str:
    lines = ["# Weak-neurite accuracy benchmark", "",
             f"tau = {TAU_XY_VOXELS} xy voxels; peers get the image minus a {BACKGROUND_UM:g} um Gaussian background; "
             "threshold = median + k * 1.4826 * MAD of that, smoothed (sigma 1 voxel); "
             f"k from {K_CHOICES} tuned per method and series on the tuning cases (marked *) at intensities "
             f"{TUNING_INTENSITIES}; a peer run over {PEER_TIMEOUT} s counts as failed.", ""]  # fmt: skip
    for method_series, k in chosen_k.items():
        lines.append(f"- {method_series}: k = {k:g}")
    for method in sorted({r.method for r in runs} - set(PEERS)):
        lines.append(f"- {method}: the package's defaults on the raw image (no per-benchmark tuning)")
    for method, note in notes.items():
        lines.append(f"- {method}: {note}")
    lines += ["", "| method | case | intensity | length F1 | recall | precision | DIADEM | seconds | peak RSS MB | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(runs, key=lambda r: (r.method, r.series, r.case, -r.intensity)):
        h = headline(r)
        star = "*" if r.tuning else ""
        lines.append(f"| {r.method} | {r.case}{star} | {r.intensity:g} | {h['f1']:.3f} | {h['recall']:.3f} | "
                     f"{h['precision']:.3f} | {h['diadem']:.3f} | {r.seconds:.1f} | {r.peak_rss_mb:.0f} | {r.status} |")  # fmt: skip
    lines += ["", "Mean length F1 by series and intensity:", "", "| method | series | " +
              " | ".join(f"{i:g}" for i in INTENSITIES) + " |", "|---|---|" + "---|" * len(INTENSITIES)]  # fmt: skip
    for method, series, means in mean_f1(runs):
        lines.append(f"| {method} | {series} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def mean_f1(runs: list[Run]) -> Iterator[tuple[str, str, list[float]]]:
    for method in sorted({r.method for r in runs}):
        for series in ("OP", "rendered"):
            means = []
            for intensity in INTENSITIES:
                values = [headline(r)["f1"] for r in runs if (r.method, r.series, r.intensity) == (method, series, intensity)]
                means.append(float(np.mean(values)) if values else math.nan)
            if not all(math.isnan(m) for m in means):
                yield method, series, means


def figure(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for method, series, means in mean_f1(runs):
        ax = axes[0 if series == "OP" else 1]
        ax.plot(INTENSITIES, means, marker="o", label=method)
    for ax, title in zip(axes, ("DIADEM OP (real, dimmed)", "rendered morphologies")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(INTENSITIES, [f"{i:g}" for i in INTENSITIES])
        ax.set_xlabel("signal intensity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"length F1 (tau = {TAU_XY_VOXELS} xy voxels)")
    axes[0].set_ylim(0, 1)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _finite(value):
    """The report with NaN as null (valid JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description="Weak-neurite accuracy benchmark.")
    parser.add_argument("--methods", default="neurotrace-raw,kimimaro,rivulet2,app2")
    parser.add_argument("--quick", action="store_true", help="OP_5 and one rendered cell at intensities 1 and 0.25")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (timings are noisier above 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} not found (the shared DIADEM data and morphologies)", file=sys.stderr)
        return 0
    methods, notes = available_methods(args.methods.split(","))
    for name, note in notes.items():
        print(f"{name}: {note}", file=sys.stderr)
    intensities = (1.0, 0.25) if args.quick else INTENSITIES
    numbers = [5] if args.quick else [1, 2, 3, 4, 5]
    names = ["nmo_swcvis_granule.swc"] if args.quick else [*MORPHOLOGIES, "random"]
    cases = list(op_cases(numbers, intensities)) + list(rendered_cases(names, intensities))
    if args.quick:
        for case in cases:
            case.tuning = case.intensity == 1.0
    print(f"{len(cases)} cases x {len(methods)} methods", file=sys.stderr)
    runs: list[Run] = []
    chosen_k: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="neurotrace-accuracy-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        folder = Path(tmp)
        for case in cases:
            prepare(case, folder)

        def one(job: tuple[str, Case, float]) -> Run:
            r = run_one(job[0], methods[job[0]], job[1], job[2], folder)
            print(f"{r.method:14} {r.case:28} {r.intensity:<6g} k={r.k:<3g} F1={headline(r)['f1']:.3f} "
                  f"{r.seconds:7.1f} s  {r.status}", file=sys.stderr, flush=True)  # fmt: skip
            return r

        def go(jobs: list[tuple[str, Case, float]]) -> list[Run]:
            return list(pool.map(one, jobs))

        tuning = [c for c in cases if c.tuning]
        tuned = [m for m in methods if m in PEERS]
        trials = go([(m, c, k) for m in tuned for k in K_CHOICES for c in tuning])
        for method in tuned:
            for series in ("OP", "rendered"):
                mine = [r for r in trials if (r.method, r.series) == (method, series)]
                if not mine:
                    continue
                scores = {k: np.mean([headline(r)["f1"] for r in mine if r.k == k]) for k in K_CHOICES}
                chosen_k[f"{method} {series}"] = k = max(K_CHOICES, key=lambda k: (scores[k], -k))
                runs += [r for r in mine if r.k == k]
        runs += go([(m, c, chosen_k[f"{m} {c.series}"]) for m in tuned for c in cases if not c.tuning])
        runs += go([(m, c, math.nan) for m in methods if m not in PEERS for c in cases])
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"tau_xy_voxels": TAU_XY_VOXELS, "k_choices": K_CHOICES, "chosen_k": chosen_k, "notes": notes,
              "intensities": intensities, "runs": [r.__dict__ for r in runs]}  # fmt: skip
    stem = "accuracy_quick" if args.quick else "accuracy"
    (args.out / f"{stem}.json").write_text(json.dumps(_finite(report), indent=1, allow_nan=False))
    (args.out / f"{stem}.md").write_text(markdown(runs, chosen_k, notes))
    figure(runs, args.out / f"{stem}.png")
    print(markdown(runs, chosen_k, notes))
    print(f"wrote {args.out / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
