"""How ``trace.bridge_short`` was chosen: dark gaps the network leaves at boutons and junctions.

The default network's maps of DIADEM OP_1-OP_4 (the stacks it trained on; OP_5, a test stack, is
shown but not used to choose) at intensity 1 and 0.25, dimmed as ``benchmarks/accuracy.py`` dims
them, are traced with ``trace_block`` at each ``bridge_short`` (um; bridges that short need no
probability along them). Scores, at tau = 3.94 xy voxels: length F1 of all output, and of the
neuron at the gold root (``accuracy.neuron_at_root``) with its tips over the gold's. The default is
the value with the best mean root F1 on OP_1-OP_4 among those that keep the mean all-output F1
within 0.005 of ``bridge_short`` 0.

Writes ``bridge_short.json`` to ``--out`` (default ``benchmarks/results``)::

    .venv/bin/python benchmarks/bridge_short.py            # about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from accuracy import OP_VOXEL, SHARED, TAU_XY_VOXELS, count_tips, neuron_at_root  # noqa: E402

from neurotrace_dask.config import SynthConfig  # noqa: E402
from neurotrace_dask.evaluate import evaluate  # noqa: E402
from neurotrace_dask.io.swc import read_swc  # noqa: E402
from neurotrace_dask.synth import dim_real_image  # noqa: E402
from neurotrace_dask.trace import trace_block  # noqa: E402

VALUES = (0.0, 2.0, 3.0, 4.0)
CHOOSING = (1, 2, 3, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=HERE.parent / "checkpoints" / "voxresnet_small_default.json")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    from neurotrace_dask.model import load_checkpoint
    from neurotrace_dask.predict import predict_array

    checkpoint = load_checkpoint(args.checkpoint)
    tau = TAU_XY_VOXELS * OP_VOXEL[2]
    rows = []
    for n in (*CHOOSING, 5):
        real = tifffile.imread(SHARED / "diadem_op" / "stacks" / f"OP_{n}.tif")
        gold = read_swc(SHARED / "diadem_op" / "gold" / f"OP_{n}.swc")
        for intensity in (1.0, 0.25):
            prob = predict_array(dim_real_image(real, intensity, SynthConfig(seed=n)), checkpoint)
            for value in VALUES:
                swc = trace_block(prob, voxel_size=OP_VOXEL, bridge_short=value).to_swc()
                root = neuron_at_root(swc, gold, OP_VOXEL)
                rows.append({"stack": f"OP_{n}", "intensity": intensity, "bridge_short": value,
                             "f1": evaluate(gold, swc, voxel_size_zyx=OP_VOXEL, tau=tau).length.f1,
                             "root_f1": evaluate(gold, root, voxel_size_zyx=OP_VOXEL, tau=tau).length.f1,
                             "tips_ratio": count_tips(root) / count_tips(gold), "trees": swc.n_trees})  # fmt: skip
            print(f"OP_{n} at {intensity:g}: root F1 " + ", ".join(
                f"{r['bridge_short']:g} um {r['root_f1']:.3f}" for r in rows[-len(VALUES):]), flush=True)  # fmt: skip
    table = {}
    for value in VALUES:
        for group, stacks in (("choosing", CHOOSING), ("OP_5", (5,))):
            mine = [r for r in rows if r["bridge_short"] == value and int(r["stack"][3:]) in stacks]
            table[f"{group} {value:g}"] = {k: float(np.mean([r[k] for r in mine])) for k in ("f1", "root_f1")}
            print(f"{group:8s} bridge_short {value:g} um: mean F1 {table[f'{group} {value:g}']['f1']:.3f}, "
                  f"root F1 {table[f'{group} {value:g}']['root_f1']:.3f}")  # fmt: skip
    base = table["choosing 0"]["f1"]
    allowed = [v for v in VALUES if table[f"choosing {v:g}"]["f1"] >= base - 0.005]
    chosen = max(allowed, key=lambda v: table[f"choosing {v:g}"]["root_f1"])
    print(f"chosen: bridge_short {chosen:g} um")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bridge_short.json").write_text(json.dumps({"checkpoint": args.checkpoint.name, "chosen": chosen,
                                                            "means": table, "rows": rows}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
