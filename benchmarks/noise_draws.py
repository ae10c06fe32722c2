"""How much one noise draw moves the stand-in's scores: the benchmark's cases, several draws.

``benchmarks/accuracy.py`` scores each case on one draw of the stand-in map's noise. The
weak-branch recall of a series is the mean over five (OP) or four (rendered) cases of the
recall of a few short, dim branches, so a single draw can move it by a few hundredths,
as much as a change of the tracer. This script traces the stand-in maps of the benchmark's
own cases (the five DIADEM OP stacks and its four rendered cells) at its four intensities
with the package defaults, for ``DRAWS`` noise draws (stand-in seed offsets; offset 0 is
the draw ``accuracy.py`` scores, the image and the gold are the same in every draw), and
reports each draw's series means and their mean and standard deviation over draws, with
the issue's target (F1 >= 0.90, weak recall >= 0.8, precision >= 0.95 at intensity 0.25)
checked on each draw and on the mean.

Needs ``../shared/data``; about 10 minutes on 2 cores::

    .venv/bin/python benchmarks/noise_draws.py     # table + benchmarks/results/noise_draws.json
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (cases, stand-in maps, weak branches, the target)
from gap_limits import scores  # noqa: E402
from weak_ceiling import mean_rows, table  # noqa: E402

DRAWS = (0, 1000, 2000, 3000, 4000)
SCORES = ("f1", "precision", "weak_recall")


def spread(means: list[dict]) -> list[dict]:
    """Mean and standard deviation over draws of each series and intensity's means.

    Examples
    --------
    >>> rows = [{"draw": d, "series": "OP", "intensity": 0.25, "f1": f, "precision": 0.99, "weak_recall": w}
    ...         for d, f, w in [(0, 0.92, 0.78), (1000, 0.94, 0.82)]]
    >>> row = spread(rows)[0]
    >>> round(row["weak_recall"], 3), round(row["weak_recall_sd"], 3), row["draws"], row["target_met"]
    (0.8, 0.028, 2, True)
    """
    out = []
    for key, group in itertools.groupby(sorted(means, key=lambda r: (r["series"], -r["intensity"])),
                                        key=lambda r: (r["series"], r["intensity"])):  # fmt: skip
        group = list(group)
        row = {"series": key[0], "intensity": key[1], "draws": len(group)}
        for name in SCORES:
            values = [r[name] for r in group]
            row[name], row[f"{name}_sd"] = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        row["target_met"] = target_met(row)
        out.append(row)
    return out


def target_met(row: dict) -> bool | None:
    """The issue's target on one row of series means (None away from the target's intensity)."""
    if row["intensity"] != accuracy.TARGET_INTENSITY:
        return None
    return row["f1"] >= accuracy.TARGET_F1 and row["weak_recall"] >= accuracy.TARGET_WEAK_RECALL and \
        row["precision"] >= accuracy.TARGET_PRECISION  # fmt: skip


def main() -> int:
    out = accuracy.results_json(__doc__, "noise_draws.json")
    if out is None:
        return 1
    started = time.perf_counter()
    per_case = []
    for draw in DRAWS:
        cases = itertools.chain(
            accuracy.op_cases([1, 2, 3, 4, 5], accuracy.INTENSITIES, standin_seed=draw),
            accuracy.rendered_cases([*accuracy.MORPHOLOGIES, "random"], accuracy.INTENSITIES, standin_seed=draw))
        for case in cases:  # one at a time
            per_case.append({"draw": draw, "case": case.name, "series": case.series, "intensity": case.intensity,
                             **scores(case)})  # fmt: skip
        print(f"draw {draw} done", file=sys.stderr, flush=True)
    means = mean_rows(per_case, list(SCORES), ("draw", "series", "intensity"))
    for row in means:
        row["target_met"] = target_met(row)
    over = spread(means)
    print("Stand-in maps of the benchmark's cases, series means per noise draw (package defaults):\n")
    print(table(sorted(means, key=lambda r: (r["series"], -r["intensity"], r["draw"])),
                ["draw", "series", "intensity", "cases", *SCORES, "target_met"]))  # fmt: skip
    print(f"\nOver the {len(DRAWS)} draws (mean, standard deviation):\n")
    print(table(over, ["series", "intensity", "draws", *(f"{s}{sd}" for s in SCORES for sd in ("", "_sd")),
                       "target_met"]))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"draws": DRAWS, "over_draws": over, "means": means, "cases": per_case,
                               "seconds": time.perf_counter() - started, "code": accuracy.code_state()},
                              indent=1) + "\n")  # fmt: skip
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
