"""What limits weak-branch recall: how much of the weak cable a threshold foreground can hold.

The tracer follows the foreground ``p >= low`` (hysteresis seeded at ``high``). A weak branch
whose probability lies below ``low`` cannot be traced, whatever the tracer does along the
foreground; gap bridging only spans short dark stretches. This script measures, on the
STAND-IN probability maps of ``benchmarks/accuracy.py`` (the gold neurites' own light plus the
image's noise, 16 per noise unit: ``low`` = 64 is 4 noise units; no background, no untraced
fibres), for every case and intensity of that benchmark:

- the *ceiling*: the share of the weak branches' cable (the dimmest third of each case's gold
  branches, as ``accuracy.py`` defines them) where the map, at its brightest within one voxel
  (3x3x3), reaches 64, 48 and 32 -- sampled every 0.25 um along the gold centreline;
- the tracer's weak-branch recall, length F1 and precision with the package defaults;
- at intensity 0.25 (the issue's target), the same scores with ``low`` lowered to 48 and 40:
  whether a lower threshold buys weak recall without losing precision;
- of the false cable (farther than tau from the gold), the share within 2 tau: a trace beside the
  neurite (shifted, or a hair on it) rather than one through empty noise.

and what a share reaching a threshold is worth, from the same map without its noise (the
*expected* map, ``accuracy.standin_probability`` with no seed):

- the share of the weak cable where the expected map's 3x3x3 maximum reaches 64, 48 and 32:
  where the map holds that much signal on average, not by a lucky draw;
- *noise alone*: the share of voxels with no expected signal at all whose 3x3x3 maximum
  reaches 64, 48 and 32 in the noisy map (how often a threshold is crossed by chance);
- of the weak cable the tracer misses (farther than tau from its trace), the share where the
  expected map reaches 64 (signal the tracer could have followed) and 32 (the rest lies below
  2 noise units on average), each as a share of all the weak cable.

Needs ``../shared/data`` (the DIADEM OP stacks and the morphologies); about 10 minutes on 2 cores::

    .venv/bin/python benchmarks/weak_ceiling.py     # table + benchmarks/results/weak_ceiling.json
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from neurotrace_dask.config import TraceConfig
from neurotrace_dask.evaluate import evaluate
from neurotrace_dask.io.swc import SWC
from neurotrace_dask.trace import trace_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (the benchmark's cases, weak branches and stand-in maps)

CEILINGS = (64.0, 48.0, 32.0)
LOWER_LOWS = (48.0, 40.0)
TARGET_INTENSITY = 0.25
STEP_UM = 0.25
SCORES = ("weak_recall", "f1", "precision", "false_within_2tau")


def cable_samples(swc: SWC, voxel: np.ndarray, step_um: float = STEP_UM) -> tuple[np.ndarray, np.ndarray]:
    """Points along every edge (voxel coordinates) and the cable length (um) each stands for.

    Examples
    --------
    >>> line = SWC.from_arrays([[0, 0, 0], [0, 0, 4]], [-1, 0])
    >>> points, weights = cable_samples(line, np.array([1.0, 0.5, 0.5]), step_um=0.5)
    >>> len(points), float(weights.sum())
    (4, 2.0)
    """
    child = np.flatnonzero(swc.parent_index >= 0)
    a, b = swc.zyx[swc.parent_index[child]], swc.zyx[child]
    length = np.linalg.norm((b - a) * voxel, axis=1)
    count = np.maximum(1, np.ceil(length / step_um).astype(np.int64))
    edge = np.repeat(np.arange(len(child)), count)
    t = (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + 0.5) / count[edge]
    return a[edge] + t[:, None] * (b - a)[edge], (length / count)[edge]


def _brightest_along(prob: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``prob``'s 3x3x3 maximum at the voxels nearest ``points``."""
    index = np.clip(np.rint(points).astype(np.int64), 0, np.asarray(prob.shape) - 1)
    return ndimage.maximum_filter(prob, size=3)[tuple(index.T)]


def ceiling(prob: np.ndarray, weak: SWC, voxel: np.ndarray, thresholds: tuple[float, ...] = CEILINGS) -> list[float]:
    """Share of the weak cable where ``prob``'s 3x3x3 maximum reaches each threshold."""
    points, weights = cable_samples(weak, voxel)
    brightest = _brightest_along(prob, points)
    return [float(weights[brightest >= t].sum() / weights.sum()) for t in thresholds]


def noise_alone(prob: np.ndarray, expected: np.ndarray, thresholds: tuple[float, ...] = CEILINGS) -> list[float]:
    """Share of the voxels with no expected signal (``expected == 0``) where ``prob``'s 3x3x3 maximum
    reaches each threshold: how often noise alone crosses it.

    Examples
    --------
    >>> expected = np.zeros((4, 4, 4), np.uint8); expected[0] = 200
    >>> prob = np.zeros((4, 4, 4), np.uint8); prob[3, 0, 0] = 40
    >>> noise_alone(prob, expected, thresholds=(32.0, 64.0))  # 8 of the 48 empty voxels see the 40
    [0.16666666666666666, 0.0]
    """
    brightest = ndimage.maximum_filter(prob, size=3)[expected == 0]
    return [float(np.mean(brightest >= t)) for t in thresholds]


def missed_signal(weak: SWC, test: SWC, expected: np.ndarray, voxel: np.ndarray, tau: float,
                  thresholds: tuple[float, ...] = CEILINGS) -> list[float]:  # fmt: skip
    """Share of the weak cable farther than ``tau`` um from ``test`` where ``expected``'s 3x3x3
    maximum reaches each threshold (missed cable that held that much signal on average)."""
    points, weights = cable_samples(weak, voxel)
    test_points, _ = cable_samples(test, voxel)
    distance, _ = cKDTree(test_points * voxel).query(points * voxel)
    brightest = _brightest_along(expected, points)
    missed = distance > tau
    return [float(weights[missed & (brightest >= t)].sum() / weights.sum()) for t in thresholds]


def near_misses(gold: SWC, test: SWC, voxel: np.ndarray, tau: float) -> float:
    """Of the test cable farther than ``tau`` um from the gold, the share within ``2 tau``: misplaced, not invented."""
    gold_points, _ = cable_samples(gold, voxel)
    test_points, weights = cable_samples(test, voxel)
    distance, _ = cKDTree(gold_points * voxel).query(test_points * voxel)
    false = distance > tau
    return float(weights[false & (distance <= 2 * tau)].sum() / weights[false].sum()) if false.any() else math.nan


def scores(case: accuracy.Case, **trace_options: float) -> dict[str, float]:
    """Length F1, precision, weak-branch recall and near misses of the tracer on the case's stand-in map."""
    test = trace_block(case.standin, voxel_size=case.voxel_size, **trace_options).to_swc()
    length = evaluate(case.gold, test, voxel_size_zyx=case.voxel_size, tau=case.tau).to_dict()["length"]
    voxel = np.asarray(case.voxel_size)
    missed = missed_signal(case.weak_gold, test, case.expected, voxel, case.tau)
    return {"f1": length["f1"], "precision": length["precision"],
            "weak_recall": accuracy.weak_recall(case.weak_gold, test, case.voxel_size, case.tau),
            "false_within_2tau": near_misses(case.gold, test, voxel, case.tau),
            **{f"missed_expected_ge_{t:g}": m for t, m in zip(CEILINGS, missed, strict=True)}}  # fmt: skip


def mean_rows(rows: list[dict], keys: list[str], by: tuple[str, ...]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    return [{**dict(zip(by, key, strict=True)), "cases": len(g), **{k: float(np.nanmean([r[k] for r in g])) for k in keys}}
            for key, g in groups.items()]  # fmt: skip


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(column: str, v: object) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:g}" if column in ("intensity", "low") else f"{v:.3f}"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join([*lines, *("| " + " | ".join(cell(c, r[c]) for c in columns) + " |" for r in rows)])


def main() -> int:
    out = accuracy.results_json(__doc__, "weak_ceiling.json")
    if out is None:
        return 1
    low = TraceConfig().low
    started = time.perf_counter()
    cases = itertools.chain(accuracy.op_cases([1, 2, 3, 4, 5], accuracy.INTENSITIES),
                            accuracy.rendered_cases([*accuracy.MORPHOLOGIES, "random"], accuracy.INTENSITIES))  # one at a time
    share_keys = [f"weak_ge_{t:g}" for t in CEILINGS]
    expected_keys = [f"expected_ge_{t:g}" for t in CEILINGS]
    noise_keys = [f"noise_ge_{t:g}" for t in CEILINGS]
    missed_keys = [f"missed_expected_ge_{t:g}" for t in (CEILINGS[0], CEILINGS[-1])]
    per_case, lowered = [], []
    for case in cases:
        voxel = np.asarray(case.voxel_size)
        row = {"case": case.name, "series": case.series, "intensity": case.intensity,
               **dict(zip(share_keys, ceiling(case.standin, case.weak_gold, voxel), strict=True)),
               **dict(zip(expected_keys, ceiling(case.expected, case.weak_gold, voxel), strict=True)),
               **dict(zip(noise_keys, noise_alone(case.standin, case.expected), strict=True)), **scores(case)}  # fmt: skip
        per_case.append(row)
        print(f"{case.name} {case.intensity:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)),
              file=sys.stderr, flush=True)  # fmt: skip
        if case.intensity == TARGET_INTENSITY:
            for value in (low, *LOWER_LOWS):
                result = row if value == low else scores(case, low=value)
                lowered.append({"series": case.series, "low": value, "case": case.name,
                                **{k: result[k] for k in SCORES}})  # fmt: skip
    score_keys = list(SCORES)
    by_intensity = mean_rows(per_case, share_keys + expected_keys + noise_keys + missed_keys + score_keys,
                             ("series", "intensity"))  # fmt: skip
    by_low = mean_rows(lowered, score_keys, ("series", "low"))
    print(f"Stand-in maps: share of the weak cable whose 3x3x3 maximum reaches 64 (low), 48, 32, "
          f"beside the tracer's weak recall (defaults: low {low:g}), series means:\n")  # fmt: skip
    print(table(by_intensity, ["series", "intensity", "cases", *share_keys, *score_keys]))
    print("\nThe same shares on the expected map (no noise), noise alone (voxels with no expected signal), and "
          "the weak cable the tracer misses where the expected map reaches 64 and 32:\n")  # fmt: skip
    print(table(by_intensity, ["series", "intensity", *expected_keys, *noise_keys, "weak_recall", *missed_keys]))
    print(f"\nAt intensity {TARGET_INTENSITY:g}, lowering low (the rest of the defaults kept):\n")
    print(table(by_low, ["series", "low", "cases", *score_keys]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"by_intensity": by_intensity, "lower_low": by_low, "cases": per_case,
                                     "lower_low_cases": lowered, "seconds": time.perf_counter() - started,
                                     "code": accuracy.code_state()}, indent=1) + "\n")  # fmt: skip
    print(f"\nwrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
