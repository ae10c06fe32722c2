"""How long and how dim a gap the tracer closes: the defaults, chosen on held-out maps.

Two rules of ``trace_block`` close gaps under limits looser than those of an ordinary bridge
(a tip aimed at a fragment's side: 6 um, mean 32):

- ``facing``: two tips that point at each other link across ``bridge_facing_distance`` um at
  a mean of ``bridge_facing_min_mean``;
- ``link``: a tip extension that reaches another fragment joins it at a mean of
  ``extend_link_min_mean`` (an extension that joins nothing needs ``extend_min_mean``, 44).

This script chose those defaults without looking at the accuracy benchmark's cases: it traces
STAND-IN probability maps (as ``benchmarks/accuracy.py`` makes them) of *held-out* cases,

- the five DIADEM OP stacks with other noise (stand-in seed offset ``OP_SEED_OFFSET``), and
- five rendered cells the benchmark does not score (four shared morphologies and a random
  neuron of another seed),

at the benchmark's four intensities with each candidate setting of one sweep, and keeps the
setting with the highest mean length F1 over both series and all intensities among those
whose mean precision stays within ``SLACK`` of the sweep's baseline (the rule off) at every
series and intensity (:func:`choose`). The sweeps run in order: ``facing`` with linking
extensions off, then ``link`` at the facing setting just chosen.

Needs ``../shared/data``; about 15 minutes on 2 cores::

    .venv/bin/python benchmarks/gap_limits.py     # tables + benchmarks/results/gap_limits.json
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from neurotrace_dask.evaluate import evaluate
from neurotrace_dask.trace import trace_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402  (cases, stand-in maps, weak branches)
from weak_ceiling import mean_rows, table  # noqa: E402

OP_SEED_OFFSET = 1000
HELD_OUT_CELLS = ("bmtk_Nr5a1_471087815_m.swc", "bmtk_Rorb_325404214_m.swc", "navis_hemibrainDA1PN_1734350788.swc",
                  "nmo_swcvis_motorneuron.swc", "random")  # fmt: skip
HELD_OUT_RANDOM_SEED = 11
# Each sweep: its trace_block parameters, the baseline (the rule off), then the candidates.
SWEEPS = {
    "facing": (("bridge_facing_distance", "bridge_facing_min_mean"),
               [(6.0, 32.0), (9.0, 24.0), (12.0, 28.0), (12.0, 24.0), (12.0, 20.0), (12.0, 16.0), (15.0, 24.0),
                (15.0, 20.0), (18.0, 20.0)]),
    "link": (("extend_link_min_mean",), [(44.0,), (40.0,), (36.0,), (32.0,), (28.0,), (24.0,)]),
}  # fmt: skip
SLACK = 0.005
SCORES = ("f1", "precision", "weak_recall")


def choose(rows: list[dict], baseline: tuple, slack: float = SLACK) -> tuple:
    """The setting with the best mean F1 whose precision is within ``slack`` of ``baseline``'s everywhere.

    ``rows`` are means per ``setting``, ``series`` and ``intensity`` with ``f1`` and ``precision``.

    Examples
    --------
    >>> rows = [{"setting": s, "series": "OP", "intensity": 1.0, "f1": f, "precision": p}
    ...         for s, f, p in [((6, 32), 0.90, 0.96), ((12, 24), 0.92, 0.958), ((15, 20), 0.95, 0.94)]]
    >>> choose(rows, baseline=(6, 32))
    (12, 24)
    """
    base = {(r["series"], r["intensity"]): r["precision"] for r in rows if r["setting"] == baseline}
    settings = sorted({r["setting"] for r in rows})
    allowed = [s for s in settings
               if all(r["precision"] >= base[r["series"], r["intensity"]] - slack for r in rows if r["setting"] == s)]
    return max(allowed, key=lambda s: np.mean([r["f1"] for r in rows if r["setting"] == s]))


def held_out_cases() -> itertools.chain:
    """The held-out cases, built one at a time (OP stacks with other noise, then the other cells)."""
    return itertools.chain(
        accuracy.op_cases([1, 2, 3, 4, 5], accuracy.INTENSITIES, standin_seed=OP_SEED_OFFSET),
        accuracy.rendered_cases(list(HELD_OUT_CELLS), accuracy.INTENSITIES, random_seed=HELD_OUT_RANDOM_SEED))


def scores(case: accuracy.Case, **options: float) -> dict[str, float]:
    """Length F1, precision and weak-branch recall of ``trace_block`` on the case's stand-in map."""
    test = trace_block(case.standin, voxel_size=case.voxel_size, **options).to_swc()
    length = evaluate(case.gold, test, voxel_size_zyx=case.voxel_size, tau=case.tau).to_dict()["length"]
    return {"f1": length["f1"], "precision": length["precision"],
            "weak_recall": accuracy.weak_recall(case.weak_gold, test, case.voxel_size, case.tau)}  # fmt: skip


def sweep(cases: Iterable[accuracy.Case], name: str, fixed: dict[str, float]) -> tuple[tuple, list[dict], list[dict]]:
    """Run one sweep over ``cases`` with ``fixed`` options; return the chosen setting, the means and the rows."""
    params, settings = SWEEPS[name]
    per_case = []
    for case in cases:  # one at a time
        for setting in settings:
            options = {**fixed, **dict(zip(params, setting))}
            per_case.append({"sweep": name, "setting": setting, "case": case.name, "series": case.series,
                             "intensity": case.intensity, **scores(case, **options)})  # fmt: skip
        print(f"{name}: {case.name} {case.intensity:g} done", file=sys.stderr, flush=True)
    means = mean_rows(per_case, list(SCORES), ("setting", "series", "intensity"))
    chosen = choose(means, baseline=settings[0])
    label = ", ".join(params)
    for row in means:
        row["sweep"], row[label] = name, " / ".join(f"{v:g}" for v in row["setting"])
    print(f"\nHeld-out stand-in maps, series means per {label} (baseline {settings[0]}; {fixed}):\n")
    print(table(sorted(means, key=lambda r: (r["series"], -r["intensity"], r["setting"])),
                [label, "series", "intensity", "cases", *SCORES]))  # fmt: skip
    print(f"\nchosen: {label} = {chosen} (best mean F1 with precision within {SLACK} of {settings[0]} at every "
          "series and intensity)")  # fmt: skip
    return chosen, means, per_case


def main() -> int:
    out = accuracy.results_json(__doc__, "gap_limits.json")
    if out is None:
        return 1
    started = time.perf_counter()
    fixed = {"extend_link_min_mean": SWEEPS["link"][1][0][0]}  # linking extensions off while facing is chosen
    doc: dict = {"slack": SLACK, "chosen": {}, "means": [], "cases": []}
    for name in SWEEPS:
        chosen, means, per_case = sweep(held_out_cases(), name, fixed)
        params = SWEEPS[name][0]
        fixed.update(zip(params, chosen))
        doc["chosen"][name] = dict(zip(params, chosen))
        doc["means"] += means
        doc["cases"] += per_case
    out.parent.mkdir(parents=True, exist_ok=True)
    doc.update(seconds=time.perf_counter() - started, code=accuracy.code_state())
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
