"""How far and how dim a gap two facing tips may bridge: the defaults, chosen on held-out maps.

``trace_block`` links two tips that point at each other under limits of their own
(``bridge_facing_distance`` um, ``bridge_facing_min_mean``), looser than those of a tip aimed
at a fragment's side (6 um, 32). This script chose those defaults without looking at the
accuracy benchmark's cases: it traces STAND-IN probability maps (as ``benchmarks/accuracy.py``
makes them) of *held-out* cases,

- the five DIADEM OP stacks with other noise (stand-in seed offset ``OP_SEED_OFFSET``), and
- five rendered cells the benchmark does not score (four shared morphologies and a random
  neuron of another seed),

at the benchmark's four intensities with each candidate setting, and keeps the setting with
the highest mean length F1 over both series and all intensities among those whose mean
precision stays within ``SLACK`` of the setting without facing-tip bridges (6 um, 32) at every
series and intensity (:func:`choose`).

Needs ``../shared/data``; about 10 minutes on 2 cores::

    .venv/bin/python benchmarks/facing_bridges.py     # table + benchmarks/results/facing_bridges.json
"""

from __future__ import annotations

import itertools
import json
import sys
import time
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
NO_FACING = (6.0, 32.0)  # the general limits: facing tips get nothing extra
SETTINGS = (NO_FACING, (9.0, 24.0), (12.0, 28.0), (12.0, 24.0), (12.0, 20.0), (12.0, 16.0), (15.0, 24.0), (15.0, 20.0),
            (18.0, 20.0))  # fmt: skip
SLACK = 0.005
SCORES = ("f1", "precision", "weak_recall")


def choose(rows: list[dict], baseline: tuple[float, float] = NO_FACING, slack: float = SLACK) -> tuple[float, float]:
    """The setting with the best mean F1 whose precision is within ``slack`` of ``baseline``'s everywhere.

    ``rows`` are means per ``setting``, ``series`` and ``intensity`` with ``f1`` and ``precision``.

    Examples
    --------
    >>> rows = [{"setting": s, "series": "OP", "intensity": 1.0, "f1": f, "precision": p}
    ...         for s, f, p in [((6, 32), 0.90, 0.96), ((12, 24), 0.92, 0.958), ((15, 20), 0.95, 0.94)]]
    >>> choose(rows)
    (12, 24)
    """
    base = {(r["series"], r["intensity"]): r["precision"] for r in rows if r["setting"] == baseline}
    settings = sorted({r["setting"] for r in rows})
    allowed = [s for s in settings
               if all(r["precision"] >= base[r["series"], r["intensity"]] - slack for r in rows if r["setting"] == s)]
    return max(allowed, key=lambda s: np.mean([r["f1"] for r in rows if r["setting"] == s]))


def held_out_cases() -> itertools.chain:
    return itertools.chain(
        accuracy.op_cases([1, 2, 3, 4, 5], accuracy.INTENSITIES, standin_seed=OP_SEED_OFFSET),
        accuracy.rendered_cases(list(HELD_OUT_CELLS), accuracy.INTENSITIES, random_seed=HELD_OUT_RANDOM_SEED))


def scores(case: accuracy.Case, setting: tuple[float, float]) -> dict[str, float]:
    distance, min_mean = setting
    test = trace_block(case.standin, voxel_size=case.voxel_size, bridge_facing_distance=distance,
                       bridge_facing_min_mean=min_mean).to_swc()  # fmt: skip
    length = evaluate(case.gold, test, voxel_size_zyx=case.voxel_size, tau=case.tau).to_dict()["length"]
    return {"f1": length["f1"], "precision": length["precision"],
            "weak_recall": accuracy.weak_recall(case.weak_gold, test, case.voxel_size, case.tau)}  # fmt: skip


def main() -> int:
    out = accuracy.results_json(__doc__, "facing_bridges.json")
    if out is None:
        return 1
    started = time.perf_counter()
    per_case = []
    for case in held_out_cases():  # one at a time
        for setting in SETTINGS:
            per_case.append({"setting": setting, "case": case.name, "series": case.series,
                             "intensity": case.intensity, **scores(case, setting)})  # fmt: skip
        print(f"{case.name} {case.intensity:g} done", file=sys.stderr, flush=True)
    means = mean_rows(per_case, list(SCORES), ("setting", "series", "intensity"))
    chosen = choose(means)
    for row in means:
        row["facing"] = "{:g} um, {:g}".format(*row["setting"])
    print(f"Held-out stand-in maps, series means per facing-tip setting (distance, least mean); "
          f"no facing-tip bridges: {NO_FACING[0]:g} um, {NO_FACING[1]:g}:\n")  # fmt: skip
    print(table(sorted(means, key=lambda r: (r["series"], -r["intensity"], r["setting"])),
                ["facing", "series", "intensity", "cases", *SCORES]))  # fmt: skip
    print(f"\nchosen: {chosen[0]:g} um at a mean of {chosen[1]:g} (best mean F1 with precision within {SLACK} "
          f"of no facing-tip bridges at every series and intensity)")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"chosen": chosen, "slack": SLACK, "means": means, "cases": per_case,
                                     "seconds": time.perf_counter() - started, "code": accuracy.code_state()},
                                    indent=1) + "\n")  # fmt: skip
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
