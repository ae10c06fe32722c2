"""The recipe of the shipped checkpoints: pool, DHPR selection, three trainings, the model card's numbers.

Stages (each one a sub-command; ``all`` runs them in order):

``pool``
    The candidate pool ``build/pool.zarr``: samples of ``SAMPLE`` voxels on the DIADEM OP grid
    (1.0 x 0.3296 x 0.3296 um), each centred on a random point of its neuron's cable, at an
    intensity cycling through 1, 0.5, 0.25, 0.125:

    - rendered by ``synth`` from ``../shared/data/morphologies`` (``CROPS_PER_CELL`` each), except
      the cells ``benchmarks/accuracy.py`` scores (held out), plus ``RANDOM_CELLS`` random neurons;
    - crops of DIADEM OP_1-OP_4 (``CROPS_PER_OP`` each) dimmed by ``synth.dim_real_image``, masks
      rendered from the gold SWCs (radius-aware). OP_5 is held out for validation.
``select``
    ``neurotrace select`` rules on the pool, ``K`` samples each: ``dhpr`` (the seed's), ``random``
    and ``dhpr+`` (without hardness: no model exists yet) in ``build/select_*``.
``train``
    ``configs/train.yaml`` four times, identical but for ``train.subset``: ``dhpr`` (K samples),
    ``full`` (the whole pool), ``random`` (K samples), and ``dhpr_plus`` (K samples by the
    diversity-aware rule). ``--parallel`` runs them side by side, one thread each.
``card``
    Each model's best checkpoint copied to ``checkpoints/`` and scored: CNN + voxel scooping
    (package defaults) on the whole of OP_5 at intensity 1, 0.5, 0.25, 0.125 (dimmed exactly as
    ``benchmarks/accuracy.py`` does) and on held-out rendered cells, length-F1 at tau = 3.94 xy
    voxels; the raw-image tracer for reference. Writes ``checkpoints/validation.json``.

Run from the repository root::

    .venv/bin/python benchmarks/train_checkpoints.py all --parallel     # about 1-1.5 h on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from neurotrace_dask.config import PredictConfig, SelectConfig, SynthConfig, TraceConfig, load_config
from neurotrace_dask.io.swc import read_swc
from neurotrace_dask.select import select, write_pool, write_selection
from neurotrace_dask.synth import dim_real_image, load_morphology, random_morphology, render, scene_from_swc

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
BUILD = REPO / "build"
POOL = BUILD / "pool.zarr"
CHECKPOINTS = REPO / "checkpoints"
CONFIG = REPO / "configs" / "train.yaml"

VOXEL = (1.0, 0.3296, 0.3296)
SAMPLE = (40, 128, 128)
INTENSITIES = (1.0, 0.5, 0.25, 0.125)
HELD_OUT_CELLS = ("nmo_swcvis_granule.swc", "bmtk_Pvalb_469628681_m.swc", "nmo_swcvis_bipolar.swc")  # accuracy.py's
CROPS_PER_CELL = 4
RANDOM_CELLS = 20
CROPS_PER_OP = 20
K = 32
# The seed's density scale is 50,000 foreground voxels in a 120^3 patch; scaled to our sample size.
DENSITY_SCALE = 50000.0 * (SAMPLE[0] * SAMPLE[1] * SAMPLE[2]) / 120**3
MODELS = {"dhpr": "build/select_dhpr/selected.csv", "full": None, "random": "build/select_random/selected.csv",
          "dhpr_plus": "build/select_dhpr_plus/selected.csv"}
TAU_XY = 3.94


def _crop(centre: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    lo = [int(np.clip(round(c) - s // 2, 0, max(0, n - s))) for c, s, n in zip(centre, SAMPLE, shape)]
    return tuple(slice(a, min(a + s, n)) for a, s, n in zip(lo, SAMPLE, shape))


def pool_samples():
    rng = np.random.default_rng(2024)
    i = 0
    cells = sorted(p for p in (SHARED / "morphologies").glob("*.swc") if p.name not in HELD_OUT_CELLS)
    sources = [(p.stem, load_morphology(p)) for p in cells]
    sources += [(f"random{j}", random_morphology(1000 + j)) for j in range(RANDOM_CELLS)]
    for name, cell in sources:
        crops = CROPS_PER_CELL if not name.startswith("random") else 1
        for c in range(crops):
            intensity = INTENSITIES[i % len(INTENSITIES)]
            params = SynthConfig(voxel_size=VOXEL, intensity=intensity, seed=3000 + i, margin=5.0)
            scene = scene_from_swc(cell, params)
            centre = scene.gold.zyx[rng.integers(scene.gold.n_nodes)]
            region = _crop(centre, scene.shape)
            image, mask = render(scene, region)
            if image.shape != SAMPLE:  # a cell flatter than the sample: mirror it out to size
                pad = [(0, t - n) for n, t in zip(image.shape, SAMPLE)]
                image = np.pad(image, pad, mode="reflect")
                mask = np.pad(mask, pad, mode="reflect")
            yield (f"r{i:03d}_{name[:40]}", image, mask,
                   {"source": f"rendered:{name}", "intensity": intensity, "seed": 3000 + i})  # fmt: skip
            i += 1
    from neurotrace_dask.train import _swc_reader

    for n in range(1, 5):
        real = tifffile.imread(SHARED / "diadem_op" / "stacks" / f"OP_{n}.tif")
        gold = read_swc(SHARED / "diadem_op" / "gold" / f"OP_{n}.swc")
        masks = _swc_reader(gold, real.shape, VOXEL)
        for c in range(CROPS_PER_OP):
            intensity = INTENSITIES[i % len(INTENSITIES)]
            region = _crop(gold.zyx[rng.integers(gold.n_nodes)], real.shape)
            image = dim_real_image(np.ascontiguousarray(real[region]), intensity, SynthConfig(seed=3000 + i))
            mask = masks(region)
            if image.shape != SAMPLE:
                pad = [(0, t - m) for m, t in zip(image.shape, SAMPLE)]
                image, mask = np.pad(image, pad, mode="reflect"), np.pad(mask, pad, mode="reflect")
            yield (f"op{n}_{c:02d}", image, mask, {"source": f"OP_{n}", "intensity": intensity,
                                                    "region": [[s.start, s.stop] for s in region]})  # fmt: skip
            i += 1


def stage_pool() -> None:
    started = time.perf_counter()
    write_pool(POOL, pool_samples(), voxel_size=VOXEL, overwrite=True)
    print(f"pool: {POOL} in {time.perf_counter() - started:.0f} s")


def stage_select() -> None:
    for method in ("dhpr", "random", "dhpr+"):
        sel = select(POOL, SelectConfig(method=method, k=K, density_scale=DENSITY_SCALE, seed=0))
        write_selection(sel, BUILD / f"select_{method.replace('+', '_plus')}", overwrite=True)
        print(sel.summary())


def stage_train(parallel: bool) -> None:
    procs = []
    for name, subset in MODELS.items():
        out = BUILD / "runs" / name
        command = [str(Path(sys.executable).parent / "neurotrace"), "train", "--config", str(CONFIG), "--out", str(out),
                   "--overwrite", "--no-progress"]  # fmt: skip
        if subset:
            command += ["--subset", subset]
        log = (BUILD / f"train_{name}.log").open("w")
        print(" ".join(command))
        procs.append(subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        if not parallel:
            procs[-1].wait()
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"training failed: {p.args}")


def _cases():
    op = SHARED / "diadem_op"
    real = tifffile.imread(op / "stacks" / "OP_5.tif")
    gold = read_swc(op / "gold" / "OP_5.swc")
    for intensity in INTENSITIES:
        yield "OP_5", intensity, dim_real_image(real, intensity, SynthConfig(seed=5)), gold, VOXEL
    for j, name in enumerate(HELD_OUT_CELLS[:1]):
        cell = load_morphology(SHARED / "morphologies" / name)
        for intensity in INTENSITIES:
            scene = scene_from_swc(cell, SynthConfig(voxel_size=VOXEL, intensity=intensity, seed=100 + j, margin=5.0))
            yield Path(name).stem, intensity, render(scene)[0], scene.gold, VOXEL


def stage_card() -> None:
    import torch

    from neurotrace_dask.evaluate import evaluate
    from neurotrace_dask.model import load_checkpoint
    from neurotrace_dask.predict import predict_array
    from neurotrace_dask.trace import raw_to_probability, trace_block, trace_options

    torch.set_num_threads(2)
    kw = trace_options(TraceConfig())
    from neurotrace_dask.select import open_pool, read_subset

    pool = open_pool(POOL)
    records = {r["name"]: r for r in pool.samples}
    models = {}
    for name, subset in MODELS.items():
        best = BUILD / "runs" / name / "best"
        if not best.with_suffix(".json").is_file():
            print(f"skipped {name}: {best}.json not found (train it first)")
            continue
        shutil.copy2(best.with_suffix(".safetensors"), CHECKPOINTS / f"voxresnet_small_{name}.safetensors")
        meta = json.loads(best.with_suffix(".json").read_text())
        meta["weights"]["file"] = f"voxresnet_small_{name}.safetensors"
        # Runs made before the training summary listed its samples: add them (facts from the pool and CSV).
        summary = meta["training"]["data"]["pool"]
        names = read_subset(REPO / subset, pool) if subset else pool.names
        summary.setdefault("names", names)
        summary.setdefault("sources", sorted({str(records[n].get("source")) for n in names}))
        (CHECKPOINTS / f"voxresnet_small_{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
        models[name] = load_checkpoint(CHECKPOINTS / f"voxresnet_small_{name}.json")
    card = CHECKPOINTS / "validation.json"
    # Rows already measured are kept (the weights they were measured with are recorded by sha256).
    shas = {name: ckpt.sha256 for name, ckpt in models.items()}
    rows = [r for r in (json.loads(card.read_text())["rows"] if card.is_file() else [])
            if r["model"] == "raw" or shas.get(r["model"]) == r.get("sha256")]  # fmt: skip
    done = {(r["case"], r["intensity"], r["model"]) for r in rows}
    for case, intensity, image, gold, voxel in _cases():
        tau = TAU_XY * voxel[2]
        probs, seconds = {}, {}
        if (case, intensity, "raw") not in done:
            probs["raw"], seconds["raw"] = raw_to_probability(image, voxel_size=voxel), 0.0
        for name, ckpt in models.items():
            if (case, intensity, name) in done:
                continue
            t = time.perf_counter()
            probs[name] = predict_array(image, ckpt, PredictConfig(device="cpu", halo=16))
            seconds[name] = time.perf_counter() - t
        for name, prob in probs.items():
            dim = name != "raw" and None  # classic hysteresis, no extension for a raw image's map
            frag = trace_block(prob, voxel_size=voxel, **{**kw, "bridge_dim": dim, "extend": dim})
            f1 = 0.0
            scores = {}
            if frag.n_nodes:
                scores = evaluate(gold, frag.to_swc(), voxel_size_zyx=voxel, tau=tau).to_dict()["length"]
                f1 = scores["f1"]
            rows.append({"case": case, "intensity": intensity, "model": name, "f1": f1,
                         "recall": scores.get("recall", 0.0), "precision": scores.get("precision", 0.0),
                         "predict_seconds": round(seconds[name], 1), "sha256": shas.get(name)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            card.write_text(json.dumps({"tau_xy_voxels": TAU_XY, "rows": rows}, indent=1) + "\n")
    print("| model | case | " + " | ".join(f"{i:g}" for i in INTENSITIES) + " |")
    for case in dict.fromkeys(r["case"] for r in rows):
        for name in ["raw", *models]:
            f1 = [next(r["f1"] for r in rows if (r["case"], r["model"], r["intensity"]) == (case, name, i))
                  for i in INTENSITIES]  # fmt: skip
            print(f"| {name} | {case} | " + " | ".join(f"{v:.3f}" for v in f1) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["pool", "select", "train", "card", "all"])
    parser.add_argument("--parallel", action="store_true", help="train the models side by side")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} not found (the shared data)", file=sys.stderr)
        return 0
    BUILD.mkdir(exist_ok=True)
    load_config(CONFIG)  # fail early on a bad recipe
    if args.stage in ("pool", "all"):
        stage_pool()
    if args.stage in ("select", "all"):
        stage_select()
    if args.stage in ("train", "all"):
        stage_train(args.parallel)
    if args.stage in ("card", "all"):
        stage_card()
    return 0


if __name__ == "__main__":
    sys.exit(main())
