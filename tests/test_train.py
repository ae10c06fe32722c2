"""Training: losses, augmentation, determinism, resume, fine-tuning, validation, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from neurotrace_dask.config import AugmentConfig, SynthConfig, TrainConfig, TrainVolume, load_config
from neurotrace_dask.errors import ConfigError, InputError, OutputError
from neurotrace_dask.io.swc import write_swc
from neurotrace_dask.model import ModelSpec, build_model, load_checkpoint, save_checkpoint
from neurotrace_dask.select import write_pool
from neurotrace_dask.synth import random_morphology, render, scene_from_swc
from neurotrace_dask.io.swc import SWC
from neurotrace_dask.train import (CENTRELINE, IGNORED, NEURITE, _open_volume, augment, class_weights,
                                   segmentation_loss, soft_dice_loss, train)  # fmt: skip

NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY = ModelSpec(width=2, modules_per_stage=0)
NO_AUGMENT = AugmentConfig(flip=False, rotate90=False, scale=(1, 1), gamma=(1, 1), offset=0, noise=0,
                           shot_noise=0, dim_probability=0)  # fmt: skip


def _line_sample(shape=(16, 24, 24), seed=0):
    """A noisy image with a bright line through it, and its mask."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[shape[0] // 2 - 1 : shape[0] // 2 + 1, shape[1] // 2 - 1 : shape[1] // 2 + 1, :] = 1
    image = rng.poisson(5 + 60 * label).clip(0, 255).astype(np.uint8)
    return image, label


@pytest.fixture
def tiny_init(tmp_path) -> Path:
    return save_checkpoint(tmp_path / "tiny", build_model(TINY, seed=0), voxel_size=(1, 1, 1))


@pytest.fixture
def pool(tmp_path) -> Path:
    samples = [(f"s{i}", *_line_sample(seed=i), {"source": "test", "intensity": 1.0}) for i in range(3)]
    return write_pool(tmp_path / "pool.zarr", samples, voxel_size=(1, 1, 1))


def _config(tmp_path, init, pool, **kw) -> TrainConfig:
    values = dict(init=init, pool=pool, patch=(16, 16, 16), batch_size=2, steps=4, threads=1, progress=False,
                  tensorboard=False, log_every=1, val_every=2, out=tmp_path / "run", augment=NO_AUGMENT)  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


def _weights(path: Path) -> str:
    return json.loads(Path(path).read_text())["weights"]["sha256"]


def _losses(run: Path) -> list[float]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line and "validation" not in line]


# --------------------------------------------------------------------------- losses


def test_class_weights_follow_foreground_fraction():
    target = torch.zeros(1, 4, 5, 5, dtype=torch.long)
    target[0, 0, :2] = 1  # 10 of 100 voxels
    w = class_weights(target)
    assert w[1] / w[0] == pytest.approx(9.0)
    assert class_weights(torch.zeros(1, 4, 4, 4, dtype=torch.long)).tolist() == pytest.approx([0.1, 1.9])


def test_dice_and_deep_supervision():
    target = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    target[0, 2:4] = 1
    perfect = torch.stack([1 - target, target], 1).float() * 40 - 20
    assert float(soft_dice_loss(perfect, target)) < 1e-3
    wrong = -perfect
    loss_fused, _ = segmentation_loss(perfect, [], target)
    loss_aux, _ = segmentation_loss(perfect, [wrong], target, aux_weight=0.5)
    assert float(loss_aux) > float(loss_fused) + 1


def test_ignored_voxels_count_in_no_term_and_skeleton_recall_asks_for_the_centreline():
    labels = torch.zeros(1, 4, 8, 8, dtype=torch.long)
    labels[0, 1:3, 3:5, :] = NEURITE
    labels[0, 2, 4, :] = CENTRELINE
    target = (labels > 0).long()
    right = torch.stack([1 - target, target], 1).float() * 40 - 20
    base, parts = segmentation_loss(right, [], labels, class_weight="none", skeleton_weight=1.0)
    assert parts["ce"] < 1e-6 and parts["skeleton"] < 0.2
    # A wrong call where the label says "left out" costs nothing.
    wrong_there = right.clone()
    labels_ignored = labels.clone()
    labels_ignored[0, :, 0, :] = IGNORED
    wrong_there[0, :, :, 0, :] = -wrong_there[0, :, :, 0, :]
    ignored, _ = segmentation_loss(wrong_there, [], labels_ignored, class_weight="none", skeleton_weight=1.0)
    counted, _ = segmentation_loss(wrong_there, [], labels, class_weight="none", skeleton_weight=1.0)
    assert float(ignored) == pytest.approx(float(base), abs=1e-4) and float(counted) > float(base) + 0.05
    # Missing the centreline costs the skeleton term; a map wider than the label does not.
    missed = right.clone()
    missed[0, :, 2, 4, :] = -missed[0, :, 2, 4, :]
    assert segmentation_loss(missed, [], labels, class_weight="none", skeleton_weight=1.0)[1]["skeleton"] > 0.8
    wide = torch.stack([torch.zeros_like(target), torch.ones_like(target)], 1).float() * 40 - 20
    assert segmentation_loss(wide, [], labels, class_weight="none", skeleton_weight=1.0)[1]["skeleton"] < 0.2


def test_swc_volumes_get_centrelines_and_untraced_fibres_left_out(tmp_path):
    # A bright fibre the gold does not trace, 10 voxels from the traced one.
    image = np.zeros((12, 40, 40), np.uint8)
    image[5:7, 9:12, 2:38] = 200  # traced
    image[5:7, 29:32, 2:38] = 180  # untraced
    tifffile.imwrite(tmp_path / "img.tif", image)
    gold = SWC.from_arrays(np.array([[6, 10, x] for x in range(2, 38, 4)], float), np.arange(-1, 8), radius=np.full(9, 1.5))
    write_swc(tmp_path / "gold.swc", gold)
    spec = TrainVolume(image=tmp_path / "img.tif", swc=tmp_path / "gold.swc", voxel_size=(1, 0.5, 0.5))
    volume = _open_volume(spec, 0, "robust", np.random.default_rng(0), (1, 1, 1), ignore_untraced=2.0)
    x, label = volume.patch([0, 0, 0], [12, 40, 40], seed=0)
    assert (label[6, 10, 4:36] == CENTRELINE).all()
    assert (label[5:7, 29:32, 4:36] == IGNORED).all()
    assert not (label[:, :, :] == IGNORED)[:, 5:15].any()  # near the gold: background stays background
    assert abs(float(x[0, 0, 0])) < 1e-6 and 0.8 < float(x[6, 10, 20]) <= 1.0  # robust normalisation
    plain = _open_volume(spec, 0, "robust", np.random.default_rng(0), (1, 1, 1))
    assert not (plain.patch([0, 0, 0], [12, 40, 40], seed=0)[1] == IGNORED).any()


# --------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_image_and_label_aligned():
    rng = np.random.default_rng(0)
    label = (rng.random((8, 16, 16)) > 0.8).astype(np.uint8)
    geometric = NO_AUGMENT.model_copy(update={"flip": True, "rotate90": True})
    for seed in range(8):
        x, y = augment(label.astype(np.float32), label, geometric, np.random.default_rng(seed))
        assert np.array_equal(x, y.astype(np.float32))
        assert x.shape == label.shape


def test_dimming_weakens_the_signal_but_keeps_the_label():
    image = np.zeros((8, 16, 16), np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[4, 8] = 1
    image[label > 0] = 1.0
    dim = NO_AUGMENT.model_copy(update={"dim_probability": 1.0, "dim_min": 0.125})
    values = [float(augment(image, label, dim, np.random.default_rng(s))[0][label > 0].mean()) for s in range(20)]
    assert max(values) < 1.0 and min(values) < 0.5
    assert np.array_equal(augment(image, label, dim, np.random.default_rng(0))[1], label)


# --------------------------------------------------------------------------- training


def test_loss_decreases_on_a_tiny_overfit_problem(tmp_path, tiny_init, pool):
    cfg = _config(tmp_path, tiny_init, pool, steps=40, optimizer="adamw", lr=0.01, val_every=40)
    result = train(cfg)
    losses = _losses(cfg.out)
    assert result.steps == 40 and len(losses) == 40
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    meta = json.loads(result.last.read_text())
    assert meta["training"]["data"]["pool"]["samples"] == 3
    assert meta["training"]["init"]["sha256"] == load_checkpoint(tiny_init).sha256  # fine-tuned from --init
    assert _weights(result.last) != load_checkpoint(tiny_init).sha256


def test_same_seed_same_weights(tmp_path, tiny_init, pool):
    a = train(_config(tmp_path, tiny_init, pool, out=tmp_path / "a", seed=3))
    b = train(_config(tmp_path, tiny_init, pool, out=tmp_path / "b", seed=3))
    c = train(_config(tmp_path, tiny_init, pool, out=tmp_path / "c", seed=4))
    assert _weights(a.last) == _weights(b.last) != _weights(c.last)


def test_resume_continues_from_the_optimiser_state(tmp_path, tiny_init, pool):
    whole = train(_config(tmp_path, tiny_init, pool, out=tmp_path / "whole", steps=4))
    half = train(_config(tmp_path, tiny_init, pool, out=tmp_path / "half", steps=2))
    state = tmp_path / "half" / "last.optim.safetensors"
    assert state.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    resumed = train(_config(tmp_path, tiny_init, pool, out=tmp_path / "half", steps=4), resume=half.last)
    assert resumed.steps == 4
    assert _weights(resumed.last) == _weights(whole.last)
    # Without the optimiser state (a fresh momentum buffer), the result differs.
    fresh = train(_config(tmp_path, half.last, pool, out=tmp_path / "fresh", steps=2))
    assert _weights(fresh.last) != _weights(whole.last)


def test_existing_run_is_refused(tmp_path, tiny_init, pool):
    cfg = _config(tmp_path, tiny_init, pool, steps=1)
    train(cfg)
    with pytest.raises(OutputError, match="holds a training run"):
        train(cfg)
    with pytest.raises(ConfigError, match="no training data"):
        train(_config(tmp_path, tiny_init, None, out=tmp_path / "other"))
    with pytest.raises(InputError, match="nope.zarr: candidate pool not found"):
        train(_config(tmp_path, tiny_init, tmp_path / "nope.zarr", out=tmp_path / "other"))


def test_volumes_with_swc_labels_and_validation(tmp_path, tiny_init):
    # A rendered neuron as a TIFF with its gold SWC: labels rendered from the SWC patch by patch,
    # validation traces the prediction and scores length-F1.
    scene = scene_from_swc(random_morphology(2, extent=(10, 30, 30), total_length=(60, 80)),
                           SynthConfig(voxel_size=(1, 1, 1), margin=3))  # fmt: skip
    image, mask = render(scene)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    write_swc(tmp_path / "gold.swc", scene.gold)
    volume = TrainVolume(image=tmp_path / "img.tif", swc=tmp_path / "gold.swc", voxel_size=(1, 1, 1))
    masked = TrainVolume(image=tmp_path / "img.tif", label=tmp_path / "mask.tif", voxel_size=(1, 1, 1), intensity=0.5)
    cfg = _config(tmp_path, tiny_init, None, volumes=[volume, masked], validation=[volume], steps=2)
    result = train(cfg)
    meta = json.loads(result.best.read_text())["training"]
    record = meta["validation"]["volumes"][0]
    assert 0 <= record["f1"] <= 1 and 0 <= record["dice"] <= 1
    assert meta["validation_history"][-1]["step"] == 2
    assert len(meta["data"]["volumes"]) == 2


def test_train_yaml_is_valid():
    cfg = load_config(REPO / "configs" / "train.yaml")
    assert cfg.train.preset == "small" and cfg.train.threads == 1
    assert cfg.train.validation and all(v.swc for v in cfg.train.validation)


def test_default_recipe_never_sees_a_test_case():
    cfg = load_config(REPO / "configs" / "train_default.yaml").train
    assert cfg.normalisation == "robust" and cfg.skeleton_weight > 0 and cfg.schedule == "cosine"
    assert cfg.steps >= 10000 and cfg.ignore_untraced > 0
    seen = [v.image.name for v in cfg.volumes + cfg.validation]
    assert "OP_5.tif" not in seen  # OP_5 is a test stack of benchmarks/accuracy.py
    # The validation half of OP_4 and the training half do not overlap.
    train_half = [v.region for v in cfg.volumes if v.image.name == "OP_4.tif"]
    assert train_half and all(r[1][0] >= v.region[1][1] for r in train_half for v in cfg.validation)


def test_patch_must_fit_the_stride():
    with pytest.raises(ValueError, match="multiple of the model stride"):
        TrainConfig(patch=(12, 16, 16))


# --------------------------------------------------------------------------- CLI


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([NEUROTRACE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_train_and_one_line_errors(tmp_path, tiny_init, pool):
    assert "--resume" in _run("train", "--help").stdout
    config = tmp_path / "t.yaml"
    config.write_text("train:\n  patch: [16, 16, 16]\n  batch_size: 1\n  augment: {dim_probability: 0}\n")
    ok = _run("train", "--config", str(config), "--init", str(tiny_init), "--pool", str(pool), "--steps", "2",
              "--threads", "1", "--out", str(tmp_path / "run"), "--no-progress")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "run" / "best.json").is_file() and "trained 2 steps" in ok.stdout
    bad = _run("train", "--config", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.yaml" in bad.stderr
    both = _run("train", "--resume", "a.json", "--init", "b.json", "--pool", str(pool))
    assert both.returncode == 2 and "exclude each other" in both.stderr


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (DIADEM OP) is not present")
def test_op_gold_renders_to_a_mask_on_its_grid(tmp_path):
    from neurotrace_dask.io.swc import read_swc
    from neurotrace_dask.train import _swc_reader

    gold = read_swc(SHARED / "diadem_op" / "gold" / "OP_5.swc")
    region = (slice(0, 76), slice(120, 280), slice(184, 504))
    mask = _swc_reader(gold, (76, 512, 512), (1.0, 0.3296, 0.3296))(region)
    assert mask.shape == (76, 160, 320)
    # Every gold node inside the region lies on the mask.
    zyx = np.rint(gold.zyx).astype(int) - [0, 120, 184]
    inside = np.all((zyx >= 0) & (zyx < mask.shape), axis=1)
    assert mask[tuple(zyx[inside].T)].mean() > 0.95
