"""Training and fine-tuning VoxResNet on labelled volumes, candidate pools and synthetic data.

Data
    :class:`~neurotrace_dask.config.TrainVolume` entries (an image with a mask, or with a gold
    SWC rendered to a radius-aware mask patch by patch with ``synth``'s tube model), the
    samples of a candidate pool (:mod:`neurotrace_dask.select`, optionally only those a
    ``neurotrace select`` CSV chose), and patches rendered on the fly by ``synth`` (a
    ``synthetic_fraction`` of the batch). Patches are read straight from the file (Zarr,
    TIFF pages, HDF5): no volume is ever loaded whole for training. Each volume is normalised
    as :func:`~neurotrace_dask.predict.predict` will normalise it (``train.normalisation``,
    measured on the whole volume from a bounded sample, and recorded in the checkpoint), so
    training and inference see the same intensities.
Labels
    Codes per voxel: 0 background, 1 neurite, 2 neurite centreline (gold SWCs and renders:
    the tubes drawn at :data:`CENTRELINE_RADIUS_UM`), 3 left out of the loss (bright voxels
    far from the gold's mask, with ``ignore_untraced``: fibres the gold does not trace).
Sampling
    With probability ``foreground_bias`` a patch is centred (with jitter of a quarter patch)
    on a random neurite voxel of its volume (gold cable points, or a bounded random sample of
    mask voxels found by a chunked scan); otherwise anywhere. Beyond the volume's faces the
    image and mask are mirrored, as the predictor does.
Augmentation
    Flips of every axis, 90-degree rotations in y-x (z voxels are longer), contrast scale,
    gamma, brightness offset, additive and shot noise, and dimming of the signal towards the
    background with fresh shot noise while the label stays: the network learns that a dim,
    noisy neurite is still a neurite.
Loss
    Cross-entropy (``class_weight: foreground`` weights it by the batch's foreground fraction
    ``f``: background ``f``, neurite ``1 - f``, ``f`` floored at ``min_foreground_fraction``,
    the seed's rule) plus ``dice_weight`` x soft Dice of the neurite class plus
    ``skeleton_weight`` x skeleton recall (the share of the centreline voxels found, soft), on
    the fused logits plus ``aux_weight`` x the mean over the four auxiliary heads (deep
    supervision). Voxels coded 3 count in none of the terms.
Optimisation
    SGD (lr 0.01, momentum 0.9, weight decay 3e-4: the seed's) or AdamW, with a constant,
    cosine or polynomial schedule after a linear warm-up; AMP (float16 autocast with a grad
    scaler) on GPU.
Validation
    Every ``val_every`` steps and at the end: each validation volume is predicted whole by
    :func:`~neurotrace_dask.predict.predict_array`, scored by voxel Dice (``p >= 0.5``) against
    its mask, traced by :func:`~neurotrace_dask.trace.trace_block` with the ``trace`` section's
    settings and scored by length-F1 (tau = 3.94 xy voxels, the DIADEM OP threshold) against
    its gold SWC. The score is the mean length-F1 (mean Dice without gold SWCs).
Outputs (``train.out``)
    ``best`` and ``last`` checkpoints (``NAME.json`` + ``NAME.safetensors``, the JSON holding the
    data summary, the configuration and the validation history), ``last.optim.safetensors``
    (optimiser and grad-scaler state, step: what ``--resume`` needs; safetensors + JSON, never
    pickle), ``log.jsonl`` (losses and validations) and, when ``tensorboard`` is installed,
    TensorBoard logs in ``tb/``.
Determinism
    The weights start from ``seed``; every batch is drawn from a generator seeded by
    ``(seed, step)``, so the same configuration gives identical weights on CPU, and a run
    resumed from ``last`` continues exactly as if uninterrupted.

Examples
--------
>>> import tempfile
>>> from neurotrace_dask.config import TrainConfig
>>> cfg = TrainConfig(preset="small", steps=2, batch_size=1, patch=(16, 16, 16), synthetic_fraction=1.0,
...                   progress=False, tensorboard=False, out=Path(tempfile.mkdtemp()) / "run")
>>> result = train(cfg, synth=SynthConfig(voxel_size=(1, 1, 1)))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from scipy import ndimage

from .config import AugmentConfig, PredictConfig, SynthConfig, TraceConfig, TrainConfig, TrainVolume
from .errors import ConfigError, InputError, OutputError
from .model import (
    Checkpoint,
    Normalisation,
    VoxResNet,
    build_model,
    load_checkpoint,
    measure_normalisation,
    normalise,
    preset,
    save_checkpoint,
)
from .predict import _mirror  # one mirroring rule for training patches and prediction halos
from .synth import label_mask

__all__ = [
    "CENTRELINE_RADIUS_UM",
    "TAU_XY_VOXELS",
    "TrainResult",
    "augment",
    "class_weights",
    "segmentation_loss",
    "skeleton_recall_loss",
    "soft_dice_loss",
    "train",
    "validate",
]

TAU_XY_VOXELS = 3.94
"""Length-F1 tolerance of the validation, in xy voxels (the DIADEM OP xy threshold)."""

NEURITE, CENTRELINE, IGNORED = 1, 2, 3  # label codes of training patches (0: background)
CENTRELINE_RADIUS_UM = 0.5
"""Radius (um) of the tubes drawn as centrelines: half a z step of the OP grid, so a centreline
between two slices still marks one of them."""
_UNTRACED_LEVEL = 0.25  # of the undimmed volume's signal level: brighter voxels are fibres
_MAX_FG_POINTS = 20000  # neurite voxels kept per volume for the foreground-biased sampler
_NORM_SAMPLE_BLOCKS = 64  # blocks of 32^3 read to measure a large volume's normalisation
Int3 = tuple[int, int, int]


# --------------------------------------------------------------------------- losses


def class_weights(target: torch.Tensor, min_fraction: float = 0.05) -> torch.Tensor:
    """The seed's class weights from the foreground fraction ``f``: ``(2f, 2(1 - f))``.

    ``f`` is floored at ``min_fraction`` (and capped at 0.5), so an empty patch does not get
    an unbounded neurite weight.

    Examples
    --------
    >>> t = torch.zeros(1, 10, 10, 1, dtype=torch.long); t[0, :2, :5] = 1   # 10% neurite
    >>> class_weights(t).tolist()
    [0.20000000298023224, 1.7999999523162842]
    """
    f = float(target.float().mean()) if target.numel() else 0.0
    f = min(max(f, min_fraction), 0.5)
    return torch.tensor([2 * f, 2 * (1 - f)], dtype=torch.float32, device=target.device)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
                   valid: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``1 - soft Dice`` of the neurite class (softmax class 1) over the whole batch (``valid`` voxels).

    Examples
    --------
    >>> logits = torch.zeros(1, 2, 2, 2, 2); logits[:, 1] = 20; logits[:, 0] = -20
    >>> round(float(soft_dice_loss(logits, torch.ones(1, 2, 2, 2, dtype=torch.long))), 3)
    0.0
    """
    p = torch.softmax(logits.float(), dim=1)[:, 1]
    t = target.float()
    if valid is not None:
        p, t = p * valid, t * valid
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def skeleton_recall_loss(logits: torch.Tensor, centreline: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 -`` the soft share of the centreline voxels called neurite (Kirchhoff et al. 2024).

    Only recall along the centreline is asked for, so, unlike a class-weighted cross-entropy,
    it never rewards a map wider than the neurite; it rewards one that does not break.

    Examples
    --------
    Two of four centreline voxels found, two undecided (p = 0.5): (2 + 1 + 1) / (4 + 1) found.

    >>> logits = torch.zeros(1, 2, 1, 1, 4); logits[0, 1, 0, 0, :2] = 20
    >>> line = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    >>> round(float(skeleton_recall_loss(logits, line)), 3)
    0.2
    """
    p = torch.softmax(logits.float(), dim=1)[:, 1]
    s = centreline.float()
    return 1 - ((p * s).sum() + eps) / (s.sum() + eps)


def segmentation_loss(
    fused: torch.Tensor,
    aux: Sequence[torch.Tensor],
    labels: torch.Tensor,
    *,
    class_weight: str = "foreground",
    min_foreground_fraction: float = 0.05,
    dice_weight: float = 1.0,
    aux_weight: float = 0.5,
    skeleton_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy + Dice + skeleton recall on the fused logits, plus ``aux_weight`` x their mean over ``aux``.

    ``labels`` holds the codes of the module docstring (0/1 alone: a plain binary target).
    Returns the loss and its parts (``ce``, ``dice``, ``skeleton`` of the fused output) as floats.

    Examples
    --------
    >>> logits = torch.zeros(1, 2, 8, 8, 8)
    >>> loss, parts = segmentation_loss(logits, [], torch.zeros(1, 8, 8, 8, dtype=torch.long))
    >>> round(parts["ce"], 3), bool(loss > 0)
    (0.693, True)
    """
    valid = labels != IGNORED
    target = ((labels == NEURITE) | (labels == CENTRELINE)).long()
    centreline = labels == CENTRELINE
    weights = class_weights(target[valid], min_foreground_fraction) if class_weight == "foreground" else None
    ce_target = target.masked_fill(~valid, -100)  # cross_entropy's ignore_index
    zero = fused.new_zeros((), dtype=torch.float32)

    def one(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ce = F.cross_entropy(logits.float(), ce_target, weight=weights, ignore_index=-100) if valid.any() else zero
        dice = soft_dice_loss(logits, target, valid=valid)
        skeleton = skeleton_recall_loss(logits, centreline) if skeleton_weight > 0 and centreline.any() else zero
        return ce + dice_weight * dice + skeleton_weight * skeleton, ce, dice, skeleton

    loss, ce, dice, skeleton = one(fused)
    if aux and aux_weight > 0:
        loss = loss + aux_weight * sum(one(a)[0] for a in aux) / len(aux)
    return loss, {"ce": float(ce.detach()), "dice": float(dice.detach()), "skeleton": float(skeleton.detach())}


# --------------------------------------------------------------------------- augmentation


def augment(image: np.ndarray, label: np.ndarray, config: AugmentConfig, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Augment one normalised patch and its label (see the module docstring).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x, y = augment(np.zeros((8, 16, 16), np.float32), np.zeros((8, 16, 16), np.uint8), AugmentConfig(), rng)
    >>> x.shape, y.shape, x.dtype
    ((8, 16, 16), (8, 16, 16), dtype('float32'))
    """
    x, y = image.astype(np.float32, copy=True), label
    if config.flip:
        for axis in range(3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
    if config.rotate90:
        k = int(rng.integers(4)) if x.shape[1] == x.shape[2] else 2 * int(rng.integers(2))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(1, 2))
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    background = float(np.median(x))
    if rng.random() < config.dim_probability:
        # Signal towards the background, plus the shot noise a dimmer signal would carry.
        d = float(np.exp(rng.uniform(np.log(config.dim_min), 0.0)))
        signal = np.maximum(x - background, 0)
        x = x - (1 - d) * signal
        x += np.sqrt(signal * d * (1 - d)) * rng.standard_normal(x.shape, np.float32) * np.float32(0.5)
    scale = rng.uniform(*config.scale)
    x = background + (x - background) * np.float32(scale)
    gamma = float(np.exp(rng.uniform(np.log(config.gamma[0]), np.log(config.gamma[1]))))
    positive = np.clip(x, 0, None)
    x = np.where(x > 0, np.power(positive, gamma, dtype=np.float32), x)
    x += np.float32(rng.uniform(-config.offset, config.offset))
    if config.shot_noise > 0:
        x += np.sqrt(np.clip(x, 0, None)) * np.float32(rng.uniform(0, config.shot_noise)) \
            * rng.standard_normal(x.shape, np.float32)
    if config.noise > 0:
        x += np.float32(rng.uniform(0, config.noise)) * rng.standard_normal(x.shape, np.float32)
    return x.astype(np.float32), y


# --------------------------------------------------------------------------- data


def _mirrored(read: Callable[[tuple[slice, ...]], np.ndarray], shape: Int3, lo: Sequence[int], size: Sequence[int]
              ) -> np.ndarray:  # fmt: skip
    """Read ``[lo, lo + size)`` with everything outside the volume mirrored about its faces."""
    indices = [_mirror(np.arange(a, a + s), n) for a, s, n in zip(lo, size, shape)]
    inside = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    data = read(inside)
    if all(a >= 0 and a + s <= n for a, s, n in zip(lo, size, shape)):
        return data
    return data[np.ix_(*(i - s.start for i, s in zip(indices, inside)))]


@dataclass(eq=False)
class _Volume:
    """One training/validation volume, read lazily patch by patch."""

    name: str
    shape: Int3
    voxel_size: tuple[float, float, float]
    read_image: Callable[[tuple[slice, ...]], np.ndarray]
    read_label: Callable[[tuple[slice, ...]], np.ndarray]
    intensity: float = 1.0
    norm: Normalisation | None = None
    fg_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    gold: Any = None  # SWC in this volume's voxel coordinates, when known
    dim_seed: int = 0
    read_centreline: Callable[[tuple[slice, ...]], np.ndarray] | None = None
    untraced_level: float | None = None  # raw intensity above which voxels far from the gold are left out
    untraced_distance: float = 0.0  # um from the gold's mask

    def image(self, region: tuple[slice, ...], seed: int | None = None) -> np.ndarray:
        data = self.read_image(region)
        if self.intensity < 1:
            from .synth import dim_real_image

            data = dim_real_image(data, self.intensity, SynthConfig(seed=self.dim_seed if seed is None else seed))
        return data

    def patch(self, lo: Sequence[int], size: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A normalised image patch and its label codes (see the module docstring)."""
        raw = _mirrored(lambda r: self.image(r, seed), self.shape, lo, size)
        neurite = _mirrored(self.read_label, self.shape, lo, size) > 0
        label = neurite.astype(np.uint8)
        if self.read_centreline is not None:
            label[_mirrored(self.read_centreline, self.shape, lo, size) > 0] = CENTRELINE
        if self.untraced_level is not None:
            bright = _mirrored(self.read_image, self.shape, lo, size) >= self.untraced_level
            far = ndimage.distance_transform_edt(~neurite, sampling=self.voxel_size) > self.untraced_distance
            label[bright & far] = IGNORED
        assert self.norm is not None
        return normalise(raw, self.norm), label


def _offset_reader(read: Callable[[tuple[slice, ...]], np.ndarray], start: Sequence[int]) -> Callable:
    return lambda r: read(tuple(slice(s.start + o, s.stop + o) for s, o in zip(r, start)))


def _swc_reader(gold: Any, shape: Int3, voxel_size: Sequence[float], radius_um: float | None = None) -> Callable:
    """Mask patches of a gold SWC (voxel coordinates): the renderer's radius-aware tubes
    (or tubes of ``radius_um``: the centrelines)."""
    from .io.swc import SWC
    from .synth import scene_from_morphologies

    vs = np.asarray(voxel_size, float)
    gold_um = SWC.from_arrays(gold.zyx * vs, gold.parent_index, radius=gold.radius * vs[2], types=gold.types)
    scene = scene_from_morphologies([gold_um], shape, SynthConfig(voxel_size=tuple(vs)))
    return lambda r: label_mask(scene, r, radius_um=radius_um)


def _cable_points(gold: Any, shape: Int3) -> np.ndarray:
    """Voxels along every edge of a gold SWC (about one per voxel), inside the volume."""
    child = np.flatnonzero(gold.parent_index >= 0)
    a, b = gold.zyx[gold.parent_index[child]], gold.zyx[child]
    steps = np.maximum(1, np.ceil(np.linalg.norm(b - a, axis=1)).astype(int))
    pts = [gold.zyx]
    for n in range(1, int(steps.max(initial=1))):
        m = steps > n
        pts.append(a[m] + (b[m] - a[m]) * (n / steps[m])[:, None])
    p = np.rint(np.concatenate(pts)).astype(np.int64)
    return p[np.all((p >= 0) & (p < np.asarray(shape)), axis=1)]


def _scan_foreground(read: Callable, shape: Int3, rng: np.random.Generator) -> np.ndarray:
    """A bounded random sample of mask voxels, found slab by slab (never the whole mask)."""
    slab = max(1, (1 << 22) // max(1, shape[1] * shape[2]))
    n_slabs = -(-shape[0] // slab)
    per = max(1, _MAX_FG_POINTS // n_slabs)
    found = []
    for z in range(0, shape[0], slab):
        idx = np.argwhere(read((slice(z, min(z + slab, shape[0])), slice(0, shape[1]), slice(0, shape[2]))) > 0)
        if len(idx) > per:
            idx = idx[rng.choice(len(idx), per, replace=False)]
        idx[:, 0] += z
        found.append(idx)
    return np.concatenate(found) if found else np.zeros((0, 3), np.int64)


def _measure(volume: _Volume, method: str, rng: np.random.Generator, *, dimmed: bool = True) -> Normalisation:
    """The predictor's normalisation of a volume (as dimmed, or as stored), from all of it or a bounded sample."""
    read = volume.image if dimmed else volume.read_image
    shape = volume.shape
    if math.prod(shape) <= 1 << 24:
        sample = read(tuple(slice(0, n) for n in shape))
    else:
        size = [min(32, n) for n in shape]
        parts = []
        for _ in range(_NORM_SAMPLE_BLOCKS):
            lo = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
            parts.append(read(tuple(slice(a, a + s) for a, s in zip(lo, size))).ravel())
        sample = np.concatenate(parts)
    return measure_normalisation(sample, method=method)


def _open_volume(spec: TrainVolume, index: int, method: str, rng: np.random.Generator,
                 default_voxel: Sequence[float], ignore_untraced: float = 0.0) -> _Volume:  # fmt: skip
    """A :class:`_Volume` from a config entry: lazily read image, mask from file or gold SWC
    (with its centrelines, and untraced fibres left out when ``ignore_untraced`` > 0)."""
    from .io.swc import SWC, read_swc
    from .io.volumes import open_volume

    source = open_volume(spec.image)
    shape: Int3 = tuple(int(n) for n in source.shape)  # type: ignore[assignment]
    read_image: Callable = source.read
    start = (0, 0, 0)
    if spec.region is not None:
        bounds = [(max(0, a), min(n, b)) for (a, b), n in zip(spec.region, shape)]
        if any(b <= a for a, b in bounds):
            raise ConfigError(f"region {spec.region} is empty in {spec.image} of shape {shape}")
        start = tuple(a for a, _ in bounds)
        shape = tuple(b - a for a, b in bounds)  # type: ignore[assignment]
        read_image = _offset_reader(source.read, start)
    voxel = tuple(spec.voxel_size or source.voxel_size or default_voxel)
    gold = None
    if spec.swc is not None:
        full = read_swc(spec.swc)
        zyx = full.zyx - np.asarray(start, float)
        gold = SWC.from_arrays(zyx, full.parent_index, radius=full.radius, types=full.types)
    if spec.label is not None:
        label_source = open_volume(spec.label)
        if tuple(label_source.shape) != tuple(source.shape):
            raise InputError(f"{spec.label}: label shape {label_source.shape} differs from image {source.shape}")
        read_label = _offset_reader(label_source.read, start)
    else:
        read_label = _swc_reader(gold, shape, voxel)
    volume = _Volume(f"{Path(spec.image).name}@{spec.intensity:g}", shape, voxel, read_image, read_label,  # type: ignore[arg-type]
                     spec.intensity, gold=_crop_swc(gold, shape) if gold is not None else None,
                     dim_seed=1000 + index)  # fmt: skip
    volume.norm = _measure(volume, method, rng)
    if spec.label is None:
        volume.read_centreline = _swc_reader(gold, shape, voxel, CENTRELINE_RADIUS_UM)
        if ignore_untraced > 0:
            stored = _measure(volume, "robust", rng, dimmed=False)
            volume.untraced_level = stored.low + _UNTRACED_LEVEL * (stored.high - stored.low)
            volume.untraced_distance = float(ignore_untraced)
    volume.fg_points = _cable_points(gold, shape) if gold is not None else _scan_foreground(read_label, shape, rng)
    return volume


def _crop_swc(gold: Any, shape: Int3) -> Any:
    """The gold SWC's nodes inside the volume (edges to removed parents cut): for scoring crops."""
    from .io.swc import SWC

    inside = np.all((gold.zyx >= -0.5) & (gold.zyx <= np.asarray(shape) - 0.5), axis=1)
    if inside.all():
        return gold
    keep = np.flatnonzero(inside)
    row = np.full(gold.n_nodes, -1, np.int64)
    row[keep] = np.arange(keep.size)
    parent = gold.parent_index[keep]
    parent = np.where(parent >= 0, row[np.maximum(parent, 0)], -1)
    return SWC.from_arrays(gold.zyx[keep], parent, radius=gold.radius[keep], types=gold.types[keep])


def _pool_volumes(config: TrainConfig, rng: np.random.Generator) -> tuple[list[_Volume], dict]:
    from .select import open_pool, read_subset

    assert config.pool is not None
    pool = open_pool(config.pool)
    names = read_subset(config.subset, pool) if config.subset is not None else pool.names
    records = {s["name"]: s for s in pool.samples}
    volumes = []
    for name in names:
        image, label = pool.image(name), pool.label(name)
        vol = _Volume(name, tuple(int(n) for n in image.shape), pool.voxel_size,  # type: ignore[arg-type]
                      lambda r, a=image: np.asarray(a[r]), lambda r, a=label: np.asarray(a[r]))  # fmt: skip
        vol.norm = _measure(vol, config.normalisation, rng)
        vol.fg_points = _scan_foreground(vol.read_label, vol.shape, rng)
        volumes.append(vol)
    sources: dict[str, int] = {}
    intensities: dict[str, int] = {}
    for name in names:
        r = records[name]
        key = str(r.get("source", "?")).split(":")[0]
        sources[key] = sources.get(key, 0) + 1
        intensities[str(r.get("intensity", "?"))] = intensities.get(str(r.get("intensity", "?")), 0) + 1
    summary = {"pool": str(config.pool), "pool_samples": len(pool.names), "samples": len(names),
               "subset": None if config.subset is None else str(config.subset), "by_source": sources,
               "by_intensity": intensities, "sample_shape": pool.samples[0].get("shape") if pool.samples else None,
               "sources": sorted({str(records[n].get("source", "?")) for n in names}), "names": names}  # fmt: skip
    return volumes, summary


def _synthetic_patch(shape: Int3, synth: SynthConfig, n_neurons: int, rng: np.random.Generator,
                     method: str = "robust") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A patch rendered on the fly: random neurons at a random weak-to-bright intensity, labels with centrelines."""
    from .synth import random_scene, render

    intensity = float(np.exp(rng.uniform(np.log(0.125), 0.0)))
    params = synth.model_copy(update={"seed": int(rng.integers(2**31)), "intensity": intensity})
    # Rendered with a margin so the normalisation sees a volume, not only the patch.
    big = tuple(n * 2 for n in shape)
    scene = random_scene(n_neurons, big, params)  # type: ignore[arg-type]
    image, mask = render(scene)
    norm = measure_normalisation(image, method=method)
    lo = [int(rng.integers(0, b - s + 1)) for b, s in zip(big, shape)]
    region = tuple(slice(a, a + s) for a, s in zip(lo, shape))
    label = (mask[region] > 0).astype(np.uint8)
    label[label_mask(scene, region, radius_um=CENTRELINE_RADIUS_UM) > 0] = CENTRELINE
    return normalise(image[region], norm), label


def _draw_patch(volume: _Volume, patch: Int3, bias: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = np.asarray(patch)
    shape = np.asarray(volume.shape)
    if len(volume.fg_points) and rng.random() < bias:
        centre = volume.fg_points[rng.integers(len(volume.fg_points))] + rng.integers(-(size // 4), size // 4 + 1)
        lo = centre - size // 2
    else:
        lo = np.array([rng.integers(0, max(1, n - s + 1)) for n, s in zip(shape, size)])
    lo = np.where(shape >= size, np.clip(lo, 0, np.maximum(shape - size, 0)), (shape - size) // 2)
    return volume.patch([int(v) for v in lo], patch, seed=int(rng.integers(2**31)))


def _batch(volumes: list[_Volume], config: TrainConfig, synth: SynthConfig, rng: np.random.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    xs, ys = [], []
    for _ in range(config.batch_size):
        if not volumes or rng.random() < config.synthetic_fraction:
            x, y = _synthetic_patch(config.patch, synth, config.synthetic_neurons, rng, config.normalisation)
        else:
            x, y = _draw_patch(volumes[int(rng.integers(len(volumes)))], config.patch, config.foreground_bias, rng)
        x, y = augment(x, y, config.augment, rng)
        xs.append(x)
        ys.append(y.astype(np.int64))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys))


# --------------------------------------------------------------------------- validation


def validate(
    model: VoxResNet,
    volumes: Sequence[Any],
    *,
    trace: TraceConfig | None = None,
    device: str = "cpu",
    normalisation: str = "robust",
) -> dict[str, Any]:
    """Voxel Dice and, with gold SWCs, length-F1 after tracing, of a model on whole volumes.

    ``volumes`` are :class:`~neurotrace_dask.config.TrainVolume` entries (normalised by the
    ``normalisation`` method) or volumes opened from them. The model is copied, so the training model's state and memory layout stay
    as they are. Returns ``{"score", "dice", "f1", "volumes": [...]}``.
    """
    from .evaluate import evaluate
    from .predict import predict_array
    from .trace import trace_block, trace_options

    trace = trace or TraceConfig()
    rng = np.random.default_rng(0)
    opened = [v if isinstance(v, _Volume) else _open_volume(v, i, normalisation, rng, (1.0, 1.0, 1.0))
              for i, v in enumerate(volumes)]  # fmt: skip
    net = copy.deepcopy(model).eval()
    spec = net.spec
    ckpt = Checkpoint(net, spec, {"voxel_size_um": [1, 1, 1], "normalisation": {"percentiles": [1, 99.9]}},
                      "0" * 64, Path("in-training"))  # fmt: skip
    rows = []
    for v in opened:
        whole = tuple(slice(0, n) for n in v.shape)
        image = v.image(whole)
        prob = predict_array(image, ckpt, PredictConfig(device=device), norm=v.norm)
        mask = v.read_label(whole) > 0
        pred = prob >= 128
        dice = float(2 * (pred & mask).sum() / max(1, pred.sum() + mask.sum()))
        row: dict[str, Any] = {"name": v.name, "dice": dice}
        if v.gold is not None:
            frag = trace_block(prob, voxel_size=v.voxel_size, **trace_options(trace))
            if frag.n_nodes:
                result = evaluate(v.gold, frag.to_swc(), voxel_size_zyx=v.voxel_size,
                                  tau=TAU_XY_VOXELS * v.voxel_size[2]).to_dict()  # fmt: skip
                length = result["length"]
                row.update(f1=length["f1"], recall=length["recall"], precision=length["precision"])
            else:
                row.update(f1=0.0, recall=0.0, precision=0.0)
        rows.append(row)
    f1s = [r["f1"] for r in rows if "f1" in r]
    dice_mean = float(np.mean([r["dice"] for r in rows])) if rows else math.nan
    f1_mean = float(np.mean(f1s)) if f1s else math.nan
    return {"score": f1_mean if f1s else dice_mean, "dice": dice_mean, "f1": f1_mean, "volumes": rows}


# --------------------------------------------------------------------------- state


def _lr_factor(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if config.schedule == "poly":
        return (1 - min(t, 1.0)) ** 0.9
    return 1.0


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)  # fmt: skip
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _state_path(checkpoint: Path) -> Path:
    stem = checkpoint.with_suffix("") if checkpoint.suffix in (".json", ".safetensors") else checkpoint
    return stem.with_name(stem.name + ".optim.safetensors")


def _save_state(path: Path, optimizer: torch.optim.Optimizer, scaler: Any, step: int, extra: dict) -> None:
    """Optimiser state as safetensors (tensors) + a JSON header: resumable without pickle."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"_step": torch.tensor([step], dtype=torch.int64)}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    header = {"format": "neurotrace-train-state/1", "step": step, "param_groups": sd["param_groups"],
              "scalars": scalars, "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
              **extra}  # fmt: skip
    data = _st_save(tensors, metadata={"neurotrace": json.dumps(header)})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_state(path: Path, optimizer: torch.optim.Optimizer, scaler: Any) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: optimiser state not found (written next to last.json by neurotrace train)")
    data = path.read_bytes()
    try:
        tensors = _st_load(data)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["neurotrace"])
    except (SafetensorError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: not a valid optimiser state ({type(e).__name__})") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in header["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    except (ValueError, KeyError) as e:
        raise InputError(f"{path}: optimiser state does not fit this model or optimiser ({e})") from None
    if scaler is not None and header.get("scaler"):
        scaler.load_state_dict(header["scaler"])
    return header


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes
    ----------
    out : Path
        The run folder.
    steps : int
        Steps done in all (a resumed run counts the earlier ones).
    seconds : float
        Wall time of this call.
    best, last : Path
        Checkpoint metadata files.
    best_score : float
        Best validation score (nan without validation volumes).
    history : list of dict
        Validation records.
    """

    out: Path
    steps: int
    seconds: float
    best: Path
    last: Path
    best_score: float
    history: list[dict[str, Any]]

    def summary(self) -> str:
        """A few lines for the command line."""
        lines = [f"trained {self.steps} steps in {self.seconds:.0f} s -> {self.out}",
                 f"  last: {self.last}", f"  best: {self.best} (validation score {self.best_score:.3f})"]  # fmt: skip
        return "\n".join(lines)


def _json_ready(config: TrainConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")


def train(
    config: TrainConfig,
    *,
    synth: SynthConfig | None = None,
    trace: TraceConfig | None = None,
    resume: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train (or fine-tune, or resume) a VoxResNet as ``config`` says; see the module docstring.

    Parameters
    ----------
    config : TrainConfig
        The ``train`` section.
    synth : SynthConfig, optional
        Physics of on-the-fly synthetic patches (the ``synth`` section).
    trace : TraceConfig, optional
        Tracer settings for the validation's length-F1 (the ``trace`` section).
    resume : path, optional
        A ``last`` checkpoint of an earlier run (with ``last.optim.safetensors`` next to it):
        continue from its step with its optimiser state, up to ``config.steps``.

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        No training data, or a resumed checkpoint of another architecture.
    OutputError
        ``config.out`` holds a run already (without ``overwrite`` or ``resume``).

    Examples
    --------
    >>> import tempfile
    >>> cfg = TrainConfig(preset="small", steps=1, batch_size=1, patch=(16, 16, 16), synthetic_fraction=1.0,
    ...                   progress=False, tensorboard=False, out=Path(tempfile.mkdtemp()) / "run")
    >>> train(cfg, synth=SynthConfig(voxel_size=(1, 1, 1))).steps
    1
    """
    started = time.perf_counter()
    synth = synth or SynthConfig(voxel_size=config.voxel_size)
    trace = trace or TraceConfig()
    out = Path(config.out)
    last_json = out / "last.json"
    if resume is None and last_json.exists() and not config.overwrite:
        raise OutputError(f"{out}: holds a training run already (use --overwrite, or --resume {last_json})")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no GPU")
    torch.manual_seed(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    # Model: fresh, fine-tuned from --init, or resumed.
    init_from = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        model, spec = ckpt.model, ckpt.spec
        prior = ckpt.metadata.get("training", {})
    elif config.init is not None:
        ckpt = load_checkpoint(config.init)
        model, spec = ckpt.model, ckpt.spec
        init_from = {"checkpoint": str(config.init), "sha256": ckpt.sha256}
        prior = {}
    else:
        spec = preset(config.preset)
        model = build_model(spec, seed=config.seed)
        prior = {}
    model = model.to(device).train()
    optimizer = _optimizer(model, config)
    amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp) if device.type == "cuda" else None
    step = 0
    best_score = -math.inf
    history: list[dict[str, Any]] = list(prior.get("validation_history", []))
    if resume is not None:
        header = _load_state(_state_path(Path(resume)), optimizer, scaler)
        step = int(header["step"])
        best_score = float(header.get("best_score") if header.get("best_score") is not None else -math.inf)
        init_from = prior.get("init")

    # Data.
    rng = np.random.default_rng([config.seed, 1 << 20])
    volumes: list[_Volume] = []
    data: dict[str, Any] = {}
    if config.pool is not None:
        pool_volumes, data["pool"] = _pool_volumes(config, rng)
        volumes += pool_volumes
    if config.volumes:
        volumes += [_open_volume(v, i, config.normalisation, rng, config.voxel_size, config.ignore_untraced)
                    for i, v in enumerate(config.volumes)]  # fmt: skip
        data["volumes"] = [{"image": str(v.image), "truth": str(v.label or v.swc), "intensity": v.intensity,
                            "region": v.region} for v in config.volumes]  # fmt: skip
    if config.synthetic_fraction > 0:
        data["synthetic"] = {"fraction": config.synthetic_fraction, "neurons_per_patch": config.synthetic_neurons,
                             "intensity": "log-uniform 0.125-1", "synth": synth.model_dump(mode="json")}  # fmt: skip
    if not volumes and config.synthetic_fraction == 0:
        raise ConfigError("no training data: set train.volumes, train.pool or train.synthetic_fraction")
    validation = [_open_volume(v, 100 + i, config.normalisation, rng, config.voxel_size)
                  for i, v in enumerate(config.validation)]  # fmt: skip
    data["validation"] = [{"image": str(v.image), "swc": str(v.swc) if v.swc else None, "intensity": v.intensity,
                           "region": v.region} for v in config.validation]  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a" if resume is not None else "w", encoding="utf-8")
    writer = None
    if config.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard is optional
            writer = None

    def save(name: str, val: dict | None) -> Path:
        training = {
            "steps": step, "seconds": round(time.perf_counter() - started + prior.get("seconds", 0.0), 1),
            "device": str(device), "threads": torch.get_num_threads(), "data": data, "init": init_from,
            "config": _json_ready(config), "validation": val, "validation_history": history,
            "best_score": None if not math.isfinite(best_score) else best_score,
        }  # fmt: skip
        return save_checkpoint(out / name, model, spec, voxel_size=config.voxel_size, training=training,
                               normalisation=config.normalisation, overwrite=True)  # fmt: skip

    def log_record(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, disable=not config.progress, desc="train", unit="step")
    best_path = out / "best.json"
    last_val: dict | None = None
    def draw(at: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch(volumes, config, synth, np.random.default_rng([config.seed, at]))

    # The next batch is drawn in a thread while this one trains (reading, dimming and rendering
    # release the GIL); each batch depends only on (seed, step), so the weights do not change.
    loader = ThreadPoolExecutor(1, thread_name_prefix="batches")
    upcoming = loader.submit(draw, step)
    try:
        while step < config.steps:
            x, y = upcoming.result()
            if step + 1 < config.steps:
                upcoming = loader.submit(draw, step + 1)
            x, y = x.to(device), y.to(device)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(config, step)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                fused, aux = model(x, return_aux=True)
            loss, parts = segmentation_loss(fused, aux, y, class_weight=config.class_weight,
                                            min_foreground_fraction=config.min_foreground_fraction,
                                            dice_weight=config.dice_weight, aux_weight=config.aux_weight,
                                            skeleton_weight=config.skeleton_weight)  # fmt: skip
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged at step {step} (loss {float(loss)}); lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and amp:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                record = {"step": step, "loss": float(loss.detach()), **parts, "lr": optimizer.param_groups[0]["lr"],
                          "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
                log_record(record)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                if writer is not None:
                    for key in ("loss", "ce", "dice", "skeleton", "lr"):
                        writer.add_scalar(f"train/{key}", record[key], step)
            if validation and (step % config.val_every == 0 or step == config.steps):
                last_val = validate(model, validation, trace=trace, device=str(device), normalisation=config.normalisation)
                last_val["step"] = step
                history.append({k: last_val[k] for k in ("step", "score", "dice", "f1")})
                log_record({"validation": last_val})
                if writer is not None:
                    for key in ("score", "dice", "f1"):
                        if math.isfinite(last_val[key]):
                            writer.add_scalar(f"val/{key}", last_val[key], step)
                if last_val["score"] > best_score:
                    best_score = last_val["score"]
                    best_path = save("best", last_val)
            if step % config.val_every == 0 or step == config.steps:
                last_path = save("last", last_val)
                _save_state(_state_path(last_path), optimizer, scaler, step,
                            {"best_score": best_score if math.isfinite(best_score) else None})  # fmt: skip
    finally:
        loader.shutdown(cancel_futures=True)
        bar.close()
        log.close()
        if writer is not None:
            writer.close()
    last_path = out / "last.json"
    if not validation:  # without validation, the last weights are the best we know
        best_path = save("best", None)
    if not last_path.exists():
        last_path = save("last", last_val)
    return TrainResult(out, step, time.perf_counter() - started, best_path, last_path,
                       best_score if math.isfinite(best_score) else math.nan, history)  # fmt: skip
