"""VoxResNet, input normalisation, and checkpoints that load without running code.

The network is VoxResNet (Chen, Dou, Yu, Qin, Heng 2016, "VoxResNet: deep voxelwise
residual networks for volumetric brain segmentation") in 3-D:

- a stem at full resolution: conv3-norm-ReLU-conv3;
- three stages, each norm-ReLU-conv3 with stride 2 then ``modules_per_stage`` VoxRes
  modules (norm-ReLU-conv3-norm-ReLU-conv3 plus an identity skip);
- four auxiliary classifiers, one on the stem output and one after each stage: norm-ReLU
  then a 1x1x1 convolution (stem) or a transposed convolution with kernel = stride = 2, 4, 8
  straight to ``classes`` maps at full resolution;
- fusion by **summing** the four logit maps (the paper's "C1+C2+C3+C4"): no extra weights,
  and each auxiliary map stays a logit map in its own right for deep supervision.

The output is ``classes`` (background, neurite) logits on the input's grid. The total stride
is :data:`STRIDE` = 8: every spatial axis of the input must be a multiple of 8, else
``forward`` raises ``ValueError`` (the predictor pads or aligns its blocks). ``forward(x)``
returns the fused logits in eval mode and ``(fused, [aux1, aux2, aux3, aux4])`` in training
mode; ``return_aux=`` overrides either. Norm layers are BatchNorm by default; GroupNorm and
InstanceNorm are available, but they normalise over the block they see, so their output
depends on the block shape (see :attr:`ModelSpec.halo`).

Two shipped sizes (:data:`PRESETS`), float32 weights; FLOPs are 2 x multiply-adds of the
convolutions per input voxel (norms, ReLUs and sums not counted), computed by
:func:`flops_per_voxel` and checked against ``torch.utils.flop_counter`` in the tests:

========  =====  ================  ==========  ===========  ================
preset    width  widths per stage  parameters  weights      FLOPs per voxel
========  =====  ================  ==========  ===========  ================
small     8      8, 16, 16, 16     121,472     0.49 MB      13,103
base      16     16, 32, 32, 32    446,840     1.79 MB      51,100
========  =====  ================  ==========  ===========  ================

Prediction by blocks gives the whole-volume answer when each block's read region starts on
the stride grid (a multiple of 8 in volume coordinates), its write region does too, and the
halo is at least :attr:`ModelSpec.halo` (65 voxels for both presets; rounded up to 72 for
the grid). The receptive field falls off steeply, so much smaller halos are usually within
quantisation. At inference a float32 CPU forward pass peaks at about 130 (small) and 220
(base) bytes per input voxel. On CPU, float32 3-D convolutions go straight to oneDNN (torch's
own choice sends small ones to a path 10x slower); keep torch threads x Dask threads per
worker at most the cores, since OpenMP threads that share a core stall each other.

Input intensities are mapped by :func:`normalise` with a :class:`Normalisation` measured per
volume by :func:`measure_normalisation` on a bounded sample, so 8-bit and 16-bit data look alike
to the network. Two methods: ``robust`` (new checkpoints) maps the background (the median) to 0
and the signal level (a high percentile of the voxels that stand clearly above the noise) to 1,
which holds on sparse, background-subtracted stacks (OP_5: 67% zeros) as on noisy ones;
``percentile`` (the first checkpoints) maps two percentiles of all voxels, which on a sparse
stack puts the 99.9th percentile in the background haze and saturates every neurite.

A checkpoint is a pair of files: ``NAME.safetensors`` (the weights; a plain tensor container,
so loading it never runs code) and ``NAME.json`` (format ``neurotrace-checkpoint/1``: the
:class:`ModelSpec`, the normalisation policy, the voxel size trained at, a free-form training
summary, package version, date, and the weights' sha256). See :func:`save_checkpoint` and
:func:`load_checkpoint`.

Examples
--------
>>> import torch
>>> net = build_model(PRESETS["small"], seed=0).eval()
>>> count_parameters(net), flops_per_voxel(PRESETS["small"])
(121472, 13103.0)
>>> with torch.inference_mode():
...     logits = net(torch.zeros(1, 1, 16, 24, 32))
>>> tuple(logits.shape)
(1, 2, 16, 24, 32)
>>> norm = measure_normalisation(np.array([[[0, 100, 200, 300]]], dtype=np.uint16), (0, 100))
>>> normalise(np.array([0, 150, 300], dtype=np.uint16), norm).tolist()
[0.0, 0.5, 1.0]
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save
from torch import nn

from neurotrace_dask import __version__
from neurotrace_dask.errors import ConfigError, InputError, OutputError

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FORMAT",
    "DEFAULT_CLIP",
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_PERCENTILES",
    "NORMALISATION_METHODS",
    "PRESETS",
    "ROBUST_PERCENTILES",
    "STRIDE",
    "Checkpoint",
    "ModelSpec",
    "Normalisation",
    "VoxResNet",
    "build_model",
    "count_parameters",
    "deep_supervision_loss",
    "flops_per_voxel",
    "foreground_probability",
    "load_checkpoint",
    "measure_normalisation",
    "normalise",
    "preset",
    "save_checkpoint",
]

STRIDE = 8
"""Total downsampling of VoxResNet: input spatial shapes must be multiples of this."""

CHECKPOINT_FORMAT = "neurotrace-checkpoint/1"
"""The ``format`` value of checkpoint metadata this version writes and reads."""

ARCHITECTURES = ("voxresnet",)
"""Architecture names a :class:`ModelSpec` (and a checkpoint) may name."""

DEFAULT_PERCENTILES = (1.0, 99.9)
"""Intensity percentiles mapped to 0 and 1 by the ``percentile`` method."""

ROBUST_PERCENTILES = (50.0, 99.0)
"""The ``robust`` method's background percentile (of all voxels) and signal percentile (of the
voxels above the noise)."""

NORMALISATION_METHODS = ("percentile", "robust")
"""How :func:`measure_normalisation` finds ``low`` and ``high``."""

_NOISE_K = 3.0  # a voxel stands above the noise beyond the background + 3 robust sd ...
_MIN_CONTRAST = 0.1  # ... and beyond a tenth of the brightest structure (haze on zero-floored stacks)
_ROBUST_MAX = 99.99  # percentile taken as the brightest structure: one hot pixel does not set it

DEFAULT_CLIP = (-1.0, 2.0)
"""Range normalised intensities are clipped to by default."""

DEFAULT_MAX_SAMPLES = 2**24
"""Most voxels :func:`measure_normalisation` reads by default (16.8M)."""

_N_STAGES = 3
_KERNEL_VOXELS = 27  # 3x3x3


# ----------------------------------------------------------------------------- spec


class ModelSpec(BaseModel):
    """Architecture of a network: everything needed to rebuild it before loading weights.

    Parameters
    ----------
    architecture : {"voxresnet"}
        Network family.
    in_channels : int
        Input channels (1 for a single fluorescence channel).
    classes : int
        Output classes; class 1 is "neurite" for :func:`foreground_probability`.
    width : int
        Base number of channels.
    multipliers : 4 ints
        Channels of the stem and the three stages as multiples of ``width`` (the paper's
        32, 64, 64, 64 is ``width=32, multipliers=(1, 2, 2, 2)``).
    modules_per_stage : int
        VoxRes modules after each stride-2 convolution (the paper uses 2).
    norm : {"batch", "group", "instance"}
        Normalisation layers. Only ``"batch"`` (an affine map in eval mode) makes block-wise
        prediction independent of the block shape.
    groups : int
        Groups of GroupNorm; must divide every stage's channels when ``norm="group"``.

    Examples
    --------
    >>> spec = ModelSpec(width=8)
    >>> spec.widths, spec.stride, spec.halo
    ((8, 16, 16, 16), 8, 65)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: Literal["voxresnet"] = "voxresnet"
    in_channels: Annotated[int, Field(gt=0)] = 1
    classes: Annotated[int, Field(ge=2)] = 2
    width: Annotated[int, Field(gt=0)] = 16
    multipliers: tuple[
        Annotated[int, Field(gt=0)],
        Annotated[int, Field(gt=0)],
        Annotated[int, Field(gt=0)],
        Annotated[int, Field(gt=0)],
    ] = (1, 2, 2, 2)
    modules_per_stage: Annotated[int, Field(ge=0)] = 2
    norm: Literal["batch", "group", "instance"] = "batch"
    groups: Annotated[int, Field(gt=0)] = 4

    @model_validator(mode="after")
    def _groups_divide(self) -> ModelSpec:
        if self.norm == "group" and any(c % self.groups for c in self.widths):
            raise ValueError(f"groups={self.groups} must divide every stage's channels {self.widths}")
        return self

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """Channels of the stem and the three stages."""
        a, b, c, d = (self.width * m for m in self.multipliers)
        return a, b, c, d

    @property
    def stride(self) -> int:
        """Total stride (:data:`STRIDE`)."""
        return STRIDE

    @property
    def halo(self) -> int:
        """Context in voxels, each side, that makes block-wise output exact.

        For a block whose write region starts and ends on the stride grid and which is read
        with this much context on every side (rounded up to a multiple of :data:`STRIDE`, so
        the read region starts on the grid too), the output on the write region equals that
        of the whole volume up to float rounding, with ``norm="batch"``. It is the reach of
        the coarsest branch's receptive field, which falls off steeply: most of the
        influence is much closer, and smaller halos are usually good enough.
        """
        return max(_reach(self, branch) for branch in range(_N_STAGES + 1))


def _reach(spec: ModelSpec, branch: int) -> int:
    """Context needed by one classifier branch, for write regions aligned to the stride.

    Follows the input interval an output interval depends on back through the layers (conv
    3x3x3 stride 1: +-1; stride 2 with padding 1: ``[2i-1, 2i+1]``; upsampling with kernel =
    stride = ``2**branch``: ``o // 2**branch``), from the first and last voxel of an aligned
    write region, and returns the larger of the two overhangs.
    """
    first, last = 8 * STRIDE, 16 * STRIDE - 1  # an aligned write region
    lo, hi = first >> branch, last >> branch
    for _ in range(branch):
        lo, hi = lo - 2 * spec.modules_per_stage, hi + 2 * spec.modules_per_stage
        lo, hi = 2 * lo - 1, 2 * hi + 1
    lo, hi = lo - 2, hi + 2  # the stem's two convolutions
    return max(first - lo, hi - last)


PRESETS: Mapping[str, ModelSpec] = MappingProxyType({
    "small": ModelSpec(width=8),
    "base": ModelSpec(width=16),
})
"""Shipped sizes: ``small`` (fast CPU demos) and ``base`` (default for training)."""


def preset(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a shipped size.

    Examples
    --------
    >>> preset("base").width
    16
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model size {name!r} (known: {', '.join(PRESETS)})") from None


# ----------------------------------------------------------------------------- network


def _norm(spec: ModelSpec, channels: int) -> nn.Module:
    if spec.norm == "batch":
        return nn.BatchNorm3d(channels)
    if spec.norm == "group":
        return nn.GroupNorm(spec.groups, channels)
    return nn.InstanceNorm3d(channels, affine=True)


# torch picks its CPU convolution backend with a rule made for 2-D images: a 3-D
# convolution with N*C*D*H <= 20480 (batch 1, 16 channels, 32^3, say) goes to the im2col
# path, about 10x slower than oneDNN. Calling oneDNN directly makes the small model 2-3x
# faster on CPU; results agree to float rounding. Autograd works through it.
_ONEDNN = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()


class _Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs float32 CPU inputs through oneDNN whatever their size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ONEDNN and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32 \
                and torch.backends.mkldnn.enabled:
            return torch.mkldnn_convolution(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super().forward(x)


class _Upsample(nn.ConvTranspose3d):
    """Transposed convolution with kernel = stride, computed as one matrix product.

    With kernel = stride each output voxel receives exactly one kernel tap per input channel,
    so the layer is a per-voxel linear map to ``out_channels x stride^3`` values laid out as
    a ``stride^3`` cell. torch's CPU transposed convolution is far slower for 8^3 kernels.
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        n, c, d, h, w = x.shape
        s, o = self.stride[0], self.out_channels
        y = x.flatten(2).transpose(1, 2) @ self.weight.reshape(c, o * s**3)  # (n, dhw, o*s^3)
        y = y.view(n, d, h, w, o, s, s, s).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(n, o, d * s, h * s, w * s)
        return y if self.bias is None else y + self.bias.view(1, o, 1, 1, 1)


def _conv3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv3d:
    # No bias: every 3x3x3 conv output goes through a norm layer before it is used.
    return _Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class _VoxRes(nn.Sequential):
    """norm-ReLU-conv-norm-ReLU-conv with an identity skip."""

    def __init__(self, spec: ModelSpec, c: int) -> None:
        super().__init__(
            _norm(spec, c), nn.ReLU(inplace=True), _conv3(c, c),
            _norm(spec, c), nn.ReLU(inplace=True), _conv3(c, c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class _Head(nn.Sequential):
    """Auxiliary classifier: norm-ReLU, then logits upsampled ``scale`` times."""

    def __init__(self, spec: ModelSpec, c: int, scale: int) -> None:
        to_logits: nn.Module
        if scale == 1:
            to_logits = nn.Conv3d(c, spec.classes, 1)
        else:
            to_logits = _Upsample(c, spec.classes, scale, stride=scale)
        super().__init__(_norm(spec, c), nn.ReLU(inplace=True), to_logits)


class VoxResNet(nn.Module):
    """VoxResNet with four deeply supervised auxiliary classifiers fused by summation.

    Parameters
    ----------
    spec : ModelSpec, optional
        Architecture (default ``ModelSpec()``).

    Notes
    -----
    Constructed directly, the layers get torch's default initialisation; :func:`build_model`
    gives the documented one (and a seed).

    Examples
    --------
    >>> net = VoxResNet(ModelSpec(width=2, modules_per_stage=1))
    >>> fused, aux = net(torch.rand(2, 1, 8, 8, 16))  # training mode: auxiliary outputs too
    >>> tuple(fused.shape), [tuple(a.shape) for a in aux][-1]
    ((2, 2, 8, 8, 16), (2, 2, 8, 8, 16))
    """

    def __init__(self, spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.spec = spec = ModelSpec() if spec is None else spec
        c = spec.widths
        self.stem = nn.Sequential(
            _conv3(spec.in_channels, c[0]), _norm(spec, c[0]), nn.ReLU(inplace=True), _conv3(c[0], c[0])
        )
        self.stages = nn.ModuleList(
            nn.Sequential(
                _norm(spec, c[i]), nn.ReLU(inplace=True), _conv3(c[i], c[i + 1], stride=2),
                *(_VoxRes(spec, c[i + 1]) for _ in range(spec.modules_per_stage)),
            )
            for i in range(_N_STAGES)
        )
        self.heads = nn.ModuleList(_Head(spec, c[i], 2**i) for i in range(_N_STAGES + 1))

    def forward(
        self, x: torch.Tensor, return_aux: bool | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``(N, classes, Z, Y, X)`` for input ``(N, in_channels, Z, Y, X)``.

        ``Z, Y, X`` must be multiples of :data:`STRIDE`. With ``return_aux`` (default:
        ``self.training``) the result is ``(fused, [aux1, aux2, aux3, aux4])``, the auxiliary
        logits at full resolution from the finest to the coarsest branch.
        """
        if x.ndim != 5 or x.shape[1] != self.spec.in_channels:
            raise ValueError(
                f"VoxResNet expects input of shape (N, {self.spec.in_channels}, Z, Y, X), got {tuple(x.shape)}"
            )
        if any(n % STRIDE for n in x.shape[2:]):
            raise ValueError(
                f"input spatial shape {tuple(x.shape[2:])} is not a multiple of the model stride "
                f"{STRIDE} on every axis; pad or align the block"
            )
        if return_aux is None:
            return_aux = self.training
        f = self.stem(x)
        aux = [self.heads[0](f)]
        fused = aux[0]
        for stage, head in zip(self.stages, self.heads[1:]):
            f = stage(f)
            logits = head(f)
            if return_aux:
                aux.append(logits)
                fused = fused + logits
            else:  # accumulate in place: one full-resolution logit map alive, not four
                fused += logits
        return (fused, aux) if return_aux else fused


def build_model(spec: ModelSpec | None = None, *, seed: int | None = None) -> VoxResNet:
    """A freshly initialised :class:`VoxResNet` (in training mode, as torch modules start).

    Convolutions get He (Kaiming) normal weights, norm layers weight 1 and bias 0. ``seed``
    makes the weights reproducible without touching torch's global random state.

    Examples
    --------
    >>> a, b = build_model(PRESETS["small"], seed=1), build_model(PRESETS["small"], seed=1)
    >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    True
    """
    # Built on the meta device and initialised here: torch's default initialisation would
    # draw from (and advance) the global random state.
    with torch.device("meta"):
        model = VoxResNet(spec)
    model.to_empty(device="cpu")
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            if isinstance(m, nn.BatchNorm3d):
                m.reset_running_stats()
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (weights and biases; not BatchNorm running statistics).

    Examples
    --------
    >>> count_parameters(build_model(PRESETS["base"]))
    446840
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_voxel(spec: ModelSpec) -> float:
    """Floating-point operations per input voxel of one forward pass (2 x multiply-adds).

    Counted analytically from the layer shapes for convolutions and transposed convolutions
    (as ``torch.utils.flop_counter`` counts them); exact for every input shape the model
    accepts, since each stage works on exactly 1/8 of the voxels of the one before.

    Examples
    --------
    >>> flops_per_voxel(PRESETS["base"])
    51100.0
    """
    c, n, k = spec.widths, spec.classes, _KERNEL_VOXELS
    macs = k * spec.in_channels * c[0] + k * c[0] * c[0]  # stem
    for i in range(1, _N_STAGES + 1):
        macs += (k * c[i - 1] * c[i] + spec.modules_per_stage * 2 * k * c[i] * c[i]) / 8**i
    # Each head gives every full-resolution voxel exactly one kernel tap per input channel.
    macs += sum(ci * n for ci in c)
    return 2.0 * macs


def deep_supervision_loss(
    fused: torch.Tensor,
    aux: Sequence[torch.Tensor],
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    aux_weight: float = 0.5,
) -> torch.Tensor:
    """Cross-entropy of the fused logits plus ``aux_weight`` x the mean over auxiliary logits.

    ``target`` holds class indices ``(N, Z, Y, X)`` (int64); ``class_weights`` (one per class)
    counters the rarity of neurite voxels.

    Examples
    --------
    >>> net = build_model(ModelSpec(width=2, modules_per_stage=0), seed=0)
    >>> fused, aux = net(torch.rand(1, 1, 16, 16, 16))
    >>> loss = deep_supervision_loss(fused, aux, torch.zeros(1, 16, 16, 16, dtype=torch.long))
    >>> loss.ndim, bool(loss > 0)
    (0, True)
    """
    loss = F.cross_entropy(fused, target, weight=class_weights)
    if aux:
        loss = loss + aux_weight * sum(F.cross_entropy(a, target, weight=class_weights) for a in aux) / len(aux)
    return loss


def foreground_probability(logits: torch.Tensor) -> torch.Tensor:
    """p(neurite) ``(N, Z, Y, X)`` from logits ``(N, classes, Z, Y, X)`` (softmax, class 1).

    Examples
    --------
    >>> foreground_probability(torch.tensor([[0.0, 0.0]]).reshape(1, 2, 1, 1, 1)).item()
    0.5
    """
    return torch.softmax(logits, dim=1)[:, 1]


# ----------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class Normalisation:
    """How raw intensities map to network input: ``low`` -> 0, ``high`` -> 1, then clipped.

    Parameters
    ----------
    low, high : float
        Raw intensities (the volume's units) mapped to 0 and 1; ``high > low``.
    percentiles : (float, float)
        The percentiles ``low`` and ``high`` were measured at (see ``method``).
    clip : (float, float) or None
        Range the normalised values are clipped to: bright somata and saturated spots stay
        bounded, dim neurites keep their full resolution. ``None`` disables clipping.
    method : {"percentile", "robust"}
        How they were measured (see :func:`measure_normalisation`).
    noise : float, optional
        The robust standard deviation of the background (``robust`` only; for reports).

    Examples
    --------
    >>> n = Normalisation(10.0, 110.0)
    >>> Normalisation.from_dict(n.to_dict()) == n
    True
    """

    low: float
    high: float
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    clip: tuple[float, float] | None = DEFAULT_CLIP
    method: str = "percentile"
    noise: float | None = None

    def __post_init__(self) -> None:
        if self.method not in NORMALISATION_METHODS:
            raise ValueError(f"normalisation method must be one of {NORMALISATION_METHODS}, got {self.method!r}")
        low, high = float(self.low), float(self.high)
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"normalisation needs finite low < high, got low={self.low!r}, high={self.high!r}")
        p = tuple(float(v) for v in self.percentiles)
        if len(p) != 2 or not 0 <= p[0] < p[1] <= 100:
            raise ValueError(f"percentiles must be two increasing values in [0, 100], got {self.percentiles!r}")
        clip = None if self.clip is None else tuple(float(v) for v in self.clip)
        if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
            raise ValueError(f"clip must be None or two increasing values, got {self.clip!r}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "percentiles", p)
        object.__setattr__(self, "clip", clip)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (recorded with every output made with it)."""
        d = {
            "low": self.low,
            "high": self.high,
            "percentiles": list(self.percentiles),
            "clip": None if self.clip is None else list(self.clip),
        }
        if self.method != "percentile":
            d.update(method=self.method, noise=self.noise)
        return d

    def describe(self) -> str:
        """One line for logs and reports: what was measured and how it maps.

        Examples
        --------
        >>> Normalisation(12.0, 98.0, ROBUST_PERCENTILES, method="robust", noise=7.4).describe()
        'background 12, noise 7.4, signal 98 -> 1 (robust)'
        """
        if self.method == "robust":
            return f"background {self.low:.4g}, noise {self.noise or 0:.2g}, signal {self.high:.4g} -> 1 (robust)"
        lo, hi = self.percentiles
        return f"{self.low:.4g} -> 0, {self.high:.4g} -> 1 (percentiles {lo:g}, {hi:g})"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalisation:
        """Inverse of :meth:`to_dict`; ``ValueError`` on missing or invalid values."""
        unknown = set(d) - {"low", "high", "percentiles", "clip", "method", "noise"}
        if unknown:
            raise ValueError(f"unknown normalisation key {sorted(unknown)[0]!r}")
        try:
            return cls(d["low"], d["high"], tuple(d.get("percentiles", DEFAULT_PERCENTILES)),
                       None if d.get("clip", DEFAULT_CLIP) is None else tuple(d.get("clip", DEFAULT_CLIP)),
                       d.get("method", "percentile"), None if d.get("noise") is None else float(d["noise"]))
        except KeyError as e:
            raise ValueError(f"normalisation lacks {e.args[0]!r}") from None
        except TypeError as e:
            raise ValueError(f"invalid normalisation: {e}") from None


def _chunk_shape(volume: Any) -> tuple[int, ...] | None:
    """Storage chunk shape of a Zarr/HDF5 array (``.chunks``) or a Dask array (``.chunksize``)."""
    chunks = getattr(volume, "chunksize", None) or getattr(volume, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == len(volume.shape) and all(isinstance(c, int) for c in chunks):
        return tuple(max(1, min(c, n)) for c, n in zip(chunks, volume.shape))
    return None


def _sample(volume: Any, max_samples: int) -> np.ndarray:
    """At most ``max_samples`` voxels of ``volume``, spread over all of it, as a flat array."""
    shape = tuple(int(n) for n in volume.shape)
    if math.prod(shape) <= max_samples:
        return np.asarray(volume[...]).ravel()
    chunks = _chunk_shape(volume)
    if chunks is not None and math.prod(chunks) * 16 <= max_samples:
        # Whole storage chunks on an even lattice: each read decodes one chunk, so the I/O is
        # the sample itself (a voxel stride would decode every chunk of a huge volume).
        grid = [math.ceil(n / c) for n, c in zip(shape, chunks)]
        tiles = max_samples // math.prod(chunks)
        step = 1
        while math.prod(math.ceil(g / step) for g in grid) > tiles:
            step += 1
        picks = [((np.arange(math.ceil(g / step)) + 0.5) * g / math.ceil(g / step)).astype(int) for g in grid]
        parts = [
            np.asarray(volume[tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, chunks, shape))]).ravel()
            for idx in np.stack(np.meshgrid(*picks, indexing="ij"), -1).reshape(-1, len(shape))
        ]
        return np.concatenate(parts)
    stride = max(1, math.floor((math.prod(shape) / max_samples) ** (1 / len(shape))))
    while math.prod(math.ceil(n / stride) for n in shape) > max_samples:
        stride += 1
    return np.asarray(volume[(slice(None, None, stride),) * len(shape)]).ravel()


def measure_normalisation(
    volume: npt.ArrayLike,
    percentiles: tuple[float, float] | None = None,
    *,
    method: str = "percentile",
    clip: tuple[float, float] | None = DEFAULT_CLIP,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> Normalisation:
    """Measure how a volume's intensities map to network input, from a bounded sample.

    Reads at most ``max_samples`` voxels, never the whole of a big volume: all of it when
    small enough; otherwise whole storage chunks on an even lattice when the array is chunked
    (Zarr, HDF5, Dask) with chunks small enough for at least 16 of them; otherwise every
    ``s``-th voxel along each axis. Non-finite values are ignored.

    ``method="percentile"`` maps the two ``percentiles`` of all voxels to 0 and 1.
    ``method="robust"`` maps the background to 0 and the signal level to 1:

    1. background ``low``: the ``percentiles[0]``-th percentile (the median) of all voxels;
    2. noise: 1.4826 x the median absolute deviation from it;
    3. the voxels above the noise: brighter than ``low`` + 3 noise, + a tenth of the
       brightest structure (the 99.99th percentile less ``low``), + one grey level for
       integer data. The tenth keeps the haze of a zero-floored stack out;
    4. signal ``high``: the ``percentiles[1]``-th percentile of those voxels.

    A volume without such voxels, or a flat one, gets ``high = low + 1`` so that
    :func:`normalise` stays finite.

    Parameters
    ----------
    volume : array-like
        A numpy array or anything with ``shape`` and numpy-style slicing (Zarr, HDF5, Dask).
    percentiles : (float, float), optional
        See above; default :data:`DEFAULT_PERCENTILES` (``percentile``) or
        :data:`ROBUST_PERCENTILES` (``robust``).
    method : {"percentile", "robust"}
        See above.
    clip : (float, float) or None
        Stored in the result; see :class:`Normalisation`.
    max_samples : int
        Most voxels read.

    Raises
    ------
    ValueError
        If the volume is empty or holds no finite value, or ``method`` is unknown.

    Examples
    --------
    >>> v = np.arange(1000, dtype=np.uint16).reshape(10, 10, 10)
    >>> n = measure_normalisation(v, (1, 99))
    >>> round(n.low, 2), round(n.high, 2)
    (9.99, 989.01)

    A sparse stack: 99% background at 0 with a faint haze, a few bright neurite voxels.

    >>> rng = np.random.default_rng(0)
    >>> v = (rng.random((20, 100, 100)) < 0.2).astype(np.uint8) * 3  # haze at 3
    >>> v[10, 50, :] = 200; v[5, :, 30] = 180
    >>> n = measure_normalisation(v, method="robust")
    >>> n.low, n.noise, n.high
    (0.0, 0.0, 200.0)
    """
    if method not in NORMALISATION_METHODS:
        raise ValueError(f"normalisation method must be one of {NORMALISATION_METHODS}, got {method!r}")
    if percentiles is None:
        percentiles = ROBUST_PERCENTILES if method == "robust" else DEFAULT_PERCENTILES
    if not hasattr(volume, "shape") or not hasattr(volume, "__getitem__"):
        volume = np.asarray(volume)
    if max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    if math.prod(volume.shape) == 0:
        raise ValueError(f"cannot measure a normalisation on an empty volume of shape {tuple(volume.shape)}")
    sample = _sample(volume, int(max_samples))
    if sample.dtype.kind in "fc":
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            raise ValueError("cannot measure a normalisation: the volume holds no finite value")
    p = (float(percentiles[0]), float(percentiles[1]))
    noise = None
    if method == "robust":
        sample = sample.astype(np.float64, copy=False)
        low = float(np.percentile(sample, p[0]))
        noise = 1.4826 * float(np.median(np.abs(sample - low)))
        brightest = float(np.percentile(sample, _ROBUST_MAX))
        step = 1.0 if volume.dtype.kind in "iub" else 0.0
        above = sample[sample > low + max(_NOISE_K * noise, _MIN_CONTRAST * (brightest - low), step)]
        high = float(np.percentile(above, p[1])) if above.size else low
    else:
        low, high = (float(v) for v in np.percentile(sample, p))
    if not high > low:
        high = low + 1.0
    return Normalisation(low, high, p, clip, method, noise)


def normalise(block: npt.ArrayLike, norm: Normalisation) -> np.ndarray:
    """Map a block of raw intensities to float32 network input with ``norm``.

    Computed in float64 (slab by slab, to bound memory) and rounded once to float32, so the
    same image stored as uint8 or as uint16 (x 257) gives the same result to float32 rounding.

    Examples
    --------
    >>> normalise(np.array([0, 5, 10, 40], dtype=np.uint8), Normalisation(0, 10)).tolist()
    [0.0, 0.5, 1.0, 2.0]
    """
    block = np.asarray(block)
    out = np.empty(block.shape, dtype=np.float32)
    scale = 1.0 / (norm.high - norm.low)
    if block.ndim == 0:
        slabs: list[Any] = [()]
    else:
        step = max(1, (1 << 22) // max(1, math.prod(block.shape[1:])))  # ~32 MB of float64
        slabs = [slice(i, i + step) for i in range(0, block.shape[0], step)]
    for s in slabs:
        x = np.subtract(block[s], norm.low, dtype=np.float64)
        x *= scale
        if norm.clip is not None:
            np.clip(x, norm.clip[0], norm.clip[1], out=x)
        out[s] = x
    return out


# ----------------------------------------------------------------------------- checkpoints


class _NormalisationPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["percentile", "robust"] = "percentile"  # checkpoints before "robust" name none
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    clip: tuple[float, float] | None = DEFAULT_CLIP


class _Weights(BaseModel):
    model_config = ConfigDict(extra="allow")
    file: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Metadata(BaseModel):
    # Unknown extra keys are kept (a newer writer may add some), but everything read is checked.
    model_config = ConfigDict(extra="allow")
    format: str
    architecture: ModelSpec
    normalisation: _NormalisationPolicy
    voxel_size_um: tuple[
        Annotated[float, Field(gt=0, allow_inf_nan=False)],
        Annotated[float, Field(gt=0, allow_inf_nan=False)],
        Annotated[float, Field(gt=0, allow_inf_nan=False)],
    ]
    training: dict[str, Any] = Field(default_factory=dict)
    weights: _Weights


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode) and everything recorded with it.

    Attributes
    ----------
    model : VoxResNet
        The network with its weights, in eval mode, on the requested device.
    spec : ModelSpec
        Its architecture.
    metadata : dict
        The whole JSON metadata as read.
    sha256 : str
        Hex digest of the weights file (checked against the metadata).
    path : Path
        The metadata (``.json``) file.
    """

    model: VoxResNet
    spec: ModelSpec
    metadata: dict[str, Any]
    sha256: str
    path: Path

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """Voxel size ``(z, y, x)`` in micrometres the model was trained at."""
        z, y, x = (float(v) for v in self.metadata["voxel_size_um"])
        return z, y, x

    @property
    def percentiles(self) -> tuple[float, float]:
        """Percentiles of the normalisation policy the model was trained with."""
        lo, hi = self.metadata["normalisation"]["percentiles"]
        return float(lo), float(hi)

    @property
    def clip(self) -> tuple[float, float] | None:
        """Clip range of the normalisation policy the model was trained with."""
        clip = self.metadata["normalisation"].get("clip", DEFAULT_CLIP)
        return None if clip is None else (float(clip[0]), float(clip[1]))

    @property
    def normalisation_method(self) -> str:
        """Method of the normalisation policy the model was trained with."""
        return str(self.metadata["normalisation"].get("method", "percentile"))

    def measure_normalisation(self, volume: npt.ArrayLike, *, max_samples: int = DEFAULT_MAX_SAMPLES) -> Normalisation:
        """:func:`measure_normalisation` of ``volume`` with this checkpoint's policy."""
        return measure_normalisation(volume, self.percentiles, method=self.normalisation_method, clip=self.clip,
                                     max_samples=max_samples)  # fmt: skip


_REFUSED_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar"}


def _checkpoint_paths(path: str | os.PathLike[str], *, writing: bool = False) -> tuple[Path, Path]:
    """``(NAME.json, NAME.safetensors)`` from ``NAME``, ``NAME.json`` or ``NAME.safetensors``."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        stem = p.with_suffix("")
    elif writing:
        if p.suffix.lower() in _REFUSED_SUFFIXES or p.is_dir():
            raise ValueError(f"{p}: name a checkpoint NAME, NAME.json or NAME.safetensors (not a folder or {p.suffix})")
        stem = p
    elif p.is_dir():
        raise InputError(f"{p}: is a folder; give a checkpoint as NAME, NAME.json or NAME.safetensors")
    elif p.suffix.lower() in _REFUSED_SUFFIXES or p.is_file():
        raise InputError(
            f"{p}: not a neurotrace checkpoint (expected NAME.json + NAME.safetensors; "
            "pickled PyTorch files are never loaded, since unpickling can run code)"
        )
    else:
        stem = p
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a reader never sees half a file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OutputError(f"{path}: cannot be written: {e.strerror or e}") from None


def save_checkpoint(
    path: str | os.PathLike[str],
    model: VoxResNet,
    spec: ModelSpec | None = None,
    *,
    voxel_size: Sequence[float],
    training: Mapping[str, Any] | None = None,
    percentiles: tuple[float, float] | None = None,
    clip: tuple[float, float] | None = DEFAULT_CLIP,
    normalisation: str = "percentile",
    overwrite: bool = False,
) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.json``; return the ``.json`` path.

    Both files are written to temporary names and renamed, the weights first: a folder with
    weights but no metadata is an interrupted save, never a loadable checkpoint.

    Parameters
    ----------
    path : path
        ``NAME``, ``NAME.json`` or ``NAME.safetensors``.
    model : VoxResNet
        The network; its weights are saved as float tensors on the CPU.
    spec : ModelSpec, optional
        Its architecture (default ``model.spec``; must equal it when given).
    voxel_size : 3 floats
        ``(z, y, x)`` micrometres of the data the model was trained on.
    training : dict, optional
        Free-form JSON-ready summary of the training data and run (data sets, epochs, loss).
    percentiles, clip, normalisation
        Normalisation policy applied to every volume the model sees: percentiles, clip range
        and method of :func:`measure_normalisation` (percentiles default to the method's).
    overwrite : bool
        Replace an existing checkpoint of that name.

    Raises
    ------
    OutputError
        If the checkpoint exists (without ``overwrite``) or cannot be written.
    ValueError
        If ``spec`` does not match the model, or ``path``, ``voxel_size`` or ``training`` is
        invalid.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> net = build_model(ModelSpec(width=2, modules_per_stage=1), seed=0)
    >>> meta = save_checkpoint(f"{folder}/tiny", net, voxel_size=(1.0, 0.3, 0.3))
    >>> load_checkpoint(meta).spec == net.spec
    True
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    if not isinstance(model, VoxResNet):
        raise TypeError(f"save_checkpoint saves a VoxResNet, got {type(model).__name__}")
    spec = model.spec if spec is None else spec
    if spec != model.spec:
        raise ValueError(f"spec {spec!r} does not match the model's {model.spec!r}")
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise ValueError(f"voxel_size must be 3 positive numbers (z, y, x), got {voxel_size!r}")
    if percentiles is None:
        percentiles = ROBUST_PERCENTILES if normalisation == "robust" else DEFAULT_PERCENTILES
    policy = Normalisation(0.0, 1.0, percentiles, clip, normalisation)  # validates the policy
    json_path, weights_path = _checkpoint_paths(path, writing=True)
    if not overwrite:
        for p in (json_path, weights_path):
            if p.exists():
                raise OutputError(f"{p}: exists already (use overwrite to replace it)")

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = _safetensors_save(tensors, metadata={"format": CHECKPOINT_FORMAT})
    sha = hashlib.sha256(data).hexdigest()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "architecture": spec.model_dump(mode="json"),
        "normalisation": {
            "method": policy.method,
            "percentiles": list(policy.percentiles),
            "clip": None if policy.clip is None else list(policy.clip),
        },
        "voxel_size_um": list(vs),
        "training": dict(training or {}),
        "weights": {"file": weights_path.name, "sha256": sha, "bytes": len(data),
                    "parameters": count_parameters(model)},
        "software": {"neurotrace_dask": __version__, "torch": torch.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        text = json.dumps(meta, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"training summary is not JSON-ready: {e}") from None
    _atomic_write(weights_path, data)
    _atomic_write(json_path, text.encode())
    return json_path


def _shape(t: torch.Size | Sequence[int]) -> str:
    return str(tuple(int(n) for n in t))


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`; never runs code from the files.

    Parameters
    ----------
    path : path
        ``NAME``, ``NAME.json`` or ``NAME.safetensors``.
    device : str or torch.device
        Where the model goes.

    Raises
    ------
    InputError
        One line naming the file and the problem: a missing file, metadata that is not
        valid JSON or of another format version, an unknown or invalid architecture, a
        truncated or corrupt weights file, weights whose sha256 differs from the one
        recorded, or weight tensors whose names or shapes do not match the architecture.
    """
    json_path, weights_path = _checkpoint_paths(path)
    if not json_path.is_file():
        raise InputError(f"{json_path}: checkpoint metadata not found")
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{json_path}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{json_path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{json_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{json_path}: not checkpoint metadata (a JSON object is expected)")
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise InputError(
            f"{json_path}: unsupported checkpoint format {raw.get('format')!r} (this version reads {CHECKPOINT_FORMAT!r})"
        )
    arch = raw.get("architecture")
    name = arch.get("architecture", "voxresnet") if isinstance(arch, dict) else None
    if isinstance(arch, dict) and name not in ARCHITECTURES:
        raise InputError(f"{json_path}: unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    try:
        meta = _Metadata.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(k) for k in err["loc"])
        raise InputError(f"{json_path}: invalid metadata at {where!r}: {err['msg']}") from None
    spec = meta.architecture

    if not weights_path.is_file():
        raise InputError(f"{weights_path}: checkpoint weights not found (named by {json_path.name})")
    try:
        data = weights_path.read_bytes()
    except OSError as e:
        raise InputError(f"{weights_path}: cannot be read: {e.strerror or e}") from None
    try:
        # safetensors parses a JSON header and raw little-endian arrays: no code is executed.
        tensors = _safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{weights_path}: not a valid safetensors file, truncated or corrupt ({reason})") from None
    sha = hashlib.sha256(data).hexdigest()
    if sha != meta.weights.sha256:
        raise InputError(
            f"{weights_path}: sha256 {sha[:16]}... differs from {meta.weights.sha256[:16]}... recorded in "
            f"{json_path.name} (the file was changed or replaced)"
        )

    with torch.device("meta"):  # shapes only: no memory, no draw from the random state
        model = VoxResNet(spec)
    expected = model.state_dict()
    for key, ref in expected.items():
        got = tensors.get(key)
        if got is None:
            raise InputError(
                f"{weights_path}: tensor {key!r} {_shape(ref.shape)} needed by the architecture in "
                f"{json_path.name} is missing"
            )
        if got.shape != ref.shape:
            raise InputError(
                f"{weights_path}: tensor {key!r} has shape {_shape(got.shape)} but the architecture in "
                f"{json_path.name} needs {_shape(ref.shape)}"
            )
        if ref.is_floating_point() and not (got.is_floating_point() and bool(torch.isfinite(got).all())):
            raise InputError(f"{weights_path}: tensor {key!r} is not finite floating point ({got.dtype})")
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise InputError(
            f"{weights_path}: unexpected tensor {extra[0]!r} {_shape(tensors[extra[0]].shape)} "
            f"(not in the architecture in {json_path.name})"
        )
    state = {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device).eval()
    return Checkpoint(model=model, spec=spec, metadata=raw, sha256=sha, path=json_path)
