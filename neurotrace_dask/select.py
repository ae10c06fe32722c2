"""Training-set selection: the seed's DHPR rule and an improved, diversity- and hardness-aware one.

A *candidate pool* is a Zarr group of small labelled samples (:func:`write_pool`,
:func:`open_pool`): ``image/NAME`` and ``label/NAME`` arrays plus a record per sample
(source, intensity, ...). Selection measures, per sample (:func:`sample_criteria`):

- **signal density**: foreground voxels / ``density_scale``, clipped to 1;
- **background noise**: standard deviation of the background (voxels over one voxel away
  from the foreground, so the blurred edge of a neurite does not count as noise);
- **low-SNR ratio**: the fraction of foreground voxels whose SNR
  ``(I - background mean) / noise`` is below ``snr_threshold``.

Rules (:func:`select_samples`):

``dhpr``
    The seed's rule: keep the samples noisier than the median, rank them by density +
    low-SNR ratio, take the top ``k`` (topped up from the quieter half, in the same order,
    when the noisy half holds fewer than ``k``).
``dhpr+``
    The same gate and priority, plus the model's *hardness* (its loss on the sample,
    rescaled to 0..1, times ``hardness_weight``) when a checkpoint is given, and
    *diversity*: samples are taken greedily by ``(1 - diversity) x priority + diversity x
    distance`` where distance is the farthest-point criterion (distance to the nearest
    sample taken, in standardised image features: mean, spread, 99th percentile, noise,
    density, low-SNR ratio, contrast), both rescaled to 0..1. Near-duplicates stop crowding
    out the rest of the pool.
``random``
    ``k`` samples drawn uniformly with ``seed``: the control.

:func:`write_selection` writes ``criteria.csv`` (every sample, every number, the rank of
the selected ones) and ``selected.csv`` (the chosen names in order), which ``train.subset``
reads.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> label = np.zeros((8, 16, 16), np.uint8); label[4, 8, :] = 1
>>> image = (rng.normal(10, 2, label.shape) + 40 * label).clip(0, 255).astype(np.uint8)
>>> c = sample_criteria(image, label, density_scale=100)
>>> round(c["density"], 2), c["low_snr_ratio"]
(0.16, 0.0)
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from scipy import ndimage

from .config import SelectConfig
from .errors import ConfigError, InputError, OutputError

__all__ = [
    "POOL_FORMAT",
    "Pool",
    "Selection",
    "open_pool",
    "read_subset",
    "sample_criteria",
    "select",
    "select_samples",
    "write_pool",
    "write_selection",
]

POOL_FORMAT = "neurotrace-pool/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FEATURES = ("mean", "std", "p99", "noise", "density", "low_snr_ratio", "contrast")
"""Image features of the diversity criterion of ``dhpr+``."""


# --------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class Pool:
    """A candidate pool opened lazily: names, per-sample records, and the arrays.

    Attributes
    ----------
    path : Path
        The Zarr group.
    voxel_size : (z, y, x)
        Micrometres, shared by every sample.
    samples : list of dict
        One record per sample (``name``, ``source``, ``intensity``, ...), in pool order.
    """

    path: Path
    voxel_size: tuple[float, float, float]
    samples: list[dict[str, Any]]
    _group: Any = field(repr=False)

    @property
    def names(self) -> list[str]:
        """Sample names in pool order."""
        return [s["name"] for s in self.samples]

    def image(self, name: str) -> zarr.Array:
        """The image of a sample (a Zarr array: slicing reads only what is asked)."""
        return self._group[f"image/{name}"]

    def label(self, name: str) -> zarr.Array:
        """The label mask of a sample (non-zero = neurite)."""
        return self._group[f"label/{name}"]


def write_pool(
    path: str | os.PathLike[str],
    samples: Iterable[tuple[str, np.ndarray, np.ndarray, Mapping[str, Any]]],
    *,
    voxel_size: Sequence[float],
    overwrite: bool = False,
) -> Path:
    """Write a candidate pool: one ``(name, image, label, record)`` per sample.

    Written to ``PATH.partial`` and renamed when complete, so a half-written pool never
    looks finished.

    Parameters
    ----------
    path : path
        Output Zarr group (``pool.zarr``).
    samples : iterable
        ``name`` (letters, digits, ``_.-``), ``image`` (uint8/uint16, z y x), ``label``
        (same shape, non-zero = neurite), ``record`` (JSON-ready facts: source, intensity).
    voxel_size : 3 floats
        Micrometres (z, y, x).
    overwrite : bool
        Replace an existing pool.

    Examples
    --------
    >>> import tempfile
    >>> img, lab = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    >>> p = write_pool(f"{tempfile.mkdtemp()}/pool.zarr", [("a", img, lab, {"source": "test"})],
    ...                voxel_size=(1, 1, 1))
    >>> open_pool(p).names
    ['a']
    """
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists already (use overwrite to replace it)")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    group = zarr.open_group(str(partial), mode="w")
    records = []
    for name, image, label, record in samples:
        if not _NAME.match(name):
            raise ValueError(f"pool sample name {name!r} must be letters, digits, '_', '.' or '-'")
        image, label = np.asarray(image), np.asarray(label)
        if image.ndim != 3 or image.shape != label.shape:
            raise ValueError(f"sample {name}: image {image.shape} and label {label.shape} must be equal 3-D shapes")
        group.create_array(f"image/{name}", data=image, chunks=image.shape)
        group.create_array(f"label/{name}", data=(label > 0).astype(np.uint8), chunks=label.shape)
        records.append({"name": name, "shape": list(image.shape), **dict(record)})
    if len({r["name"] for r in records}) != len(records):
        raise ValueError("pool sample names must be unique")
    group.attrs["neurotrace_pool"] = {"format": POOL_FORMAT, "voxel_size": [float(v) for v in voxel_size],
                                      "samples": records}  # fmt: skip
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def open_pool(path: str | os.PathLike[str]) -> Pool:
    """Open a pool written by :func:`write_pool`; one-line :class:`InputError` if it is not one."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: candidate pool not found (a Zarr folder written by select.write_pool)")
    try:
        group = zarr.open_group(str(p), mode="r")
        meta = dict(group.attrs).get("neurotrace_pool")
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a pool"
        raise InputError(f"{p}: not a readable Zarr group ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != POOL_FORMAT:
        raise InputError(f"{p}: not a neurotrace candidate pool (no {POOL_FORMAT!r} record)")
    vz, vy, vx = (float(v) for v in meta["voxel_size"])
    return Pool(p, (vz, vy, vx), list(meta["samples"]), group)


def read_subset(path: str | os.PathLike[str], pool: Pool | None = None) -> list[str]:
    """Names listed in a CSV with a ``name`` column (rows with ``selected`` false skipped).

    Raises :class:`InputError` when the file is missing, has no ``name`` column, or names a
    sample the pool lacks.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: subset CSV not found")
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            raise InputError(f"{p}: a subset CSV needs a 'name' column")
        names = [row["name"] for row in reader
                 if str(row.get("selected", "true")).strip().lower() not in ("false", "0", "no", "")]  # fmt: skip
    if not names:
        raise InputError(f"{p}: selects no sample")
    if pool is not None:
        known = set(pool.names)
        missing = [n for n in names if n not in known]
        if missing:
            raise InputError(f"{p}: sample {missing[0]!r} is not in the pool {pool.path}")
    return names


# --------------------------------------------------------------------------- criteria


def sample_criteria(
    image: npt.ArrayLike,
    label: npt.ArrayLike,
    *,
    density_scale: float = 50000.0,
    snr_threshold: float = 2.0,
) -> dict[str, float]:
    """The DHPR criteria of one sample, and the image features of ``dhpr+``.

    Parameters
    ----------
    image : (z, y, x) array
        Raw intensities.
    label : (z, y, x) array
        Non-zero = neurite.
    density_scale : float
        Foreground voxels at which the density reaches 1 (the seed: 50,000 in 120^3 patches).
    snr_threshold : float
        A foreground voxel with ``(I - background mean) / noise`` below this is low-SNR.

    Returns
    -------
    dict
        ``density``, ``noise``, ``low_snr_ratio``, ``fg_voxels``, and the features ``mean``,
        ``std``, ``p99``, ``contrast`` (median foreground SNR).

    Examples
    --------
    >>> img = np.full((4, 8, 8), 10, np.uint8); lab = np.zeros_like(img); lab[2, 4, 4] = 1
    >>> sample_criteria(img, lab)["fg_voxels"]
    1
    """
    image = np.asarray(image, dtype=np.float64)
    fg = np.asarray(label) > 0
    if image.shape != fg.shape:
        raise ValueError(f"image {image.shape} and label {fg.shape} differ in shape")
    near = ndimage.binary_dilation(fg, iterations=1) if fg.any() else fg
    background = image[~near]
    if background.size == 0:
        background = image.ravel()
    bg_mean, noise = float(background.mean()), float(background.std())
    n_fg = int(fg.sum())
    snr = (image[fg] - bg_mean) / max(noise, 1e-6)
    return {
        "density": min(n_fg / density_scale, 1.0),
        "noise": noise,
        "low_snr_ratio": float(np.mean(snr < snr_threshold)) if n_fg else 0.0,
        "fg_voxels": n_fg,
        "mean": float(image.mean()),
        "std": float(image.std()),
        "p99": float(np.percentile(image, 99)),
        "contrast": float(np.median(snr)) if n_fg else 0.0,
    }


# --------------------------------------------------------------------------- rules


def _unit(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min()) if values.size else 0.0
    return (values - values.min()) / span if span > 0 else np.zeros_like(values, dtype=float)


def select_samples(
    criteria: Sequence[Mapping[str, float]],
    k: int,
    *,
    method: str = "dhpr",
    hardness: Sequence[float] | None = None,
    diversity: float = 0.5,
    hardness_weight: float = 1.0,
    seed: int = 0,
) -> tuple[list[int], np.ndarray]:
    """Choose ``k`` samples from their criteria; return their indices in order and the scores.

    Parameters
    ----------
    criteria : sequence of dict
        One :func:`sample_criteria` result per sample.
    k : int
        Samples to take (all of them when the pool is smaller).
    method : {"dhpr", "dhpr+", "random"}
        The rule (see the module docstring).
    hardness : sequence of float, optional
        ``dhpr+``: the model's loss on each sample.
    diversity, hardness_weight : float
        ``dhpr+`` weights.
    seed : int
        ``random``: the draw.

    Returns
    -------
    order : list of int
        Indices of the chosen samples, best first.
    score : ndarray
        The priority of every sample (density + low-SNR ratio, + hardness for ``dhpr+``).

    Examples
    --------
    >>> crit = [{"density": 0.9, "noise": 5.0, "low_snr_ratio": 0.5},   # dense and noisy
    ...         {"density": 0.1, "noise": 1.0, "low_snr_ratio": 0.0},   # sparse and clean
    ...         {"density": 0.2, "noise": 4.0, "low_snr_ratio": 0.1}]
    >>> select_samples(crit, 2)[0]
    [0, 2]
    """
    n = len(criteria)
    k = min(int(k), n)
    if k <= 0:
        return [], np.zeros(n)
    density = np.array([c["density"] for c in criteria], float)
    noise = np.array([c["noise"] for c in criteria], float)
    low = np.array([c["low_snr_ratio"] for c in criteria], float)
    score = density + low
    if method == "random":
        rng = np.random.default_rng(seed)
        return [int(i) for i in rng.choice(n, size=k, replace=False)], score
    if method not in ("dhpr", "dhpr+"):
        raise ConfigError(f"unknown selection method {method!r} (known: dhpr, dhpr+, random)")
    noisy = noise > np.median(noise)
    if method == "dhpr+" and hardness is not None:
        score = score + hardness_weight * _unit(np.asarray(hardness, float))
    # Noisy half first by score, then the rest by score: the seed's rule, topped up if short.
    ranked = sorted(range(n), key=lambda i: (not noisy[i], -score[i], i))
    if method == "dhpr":
        return ranked[:k], score
    gate = [i for i in ranked if noisy[i]]
    candidates = gate if len(gate) >= k else ranked
    features = np.array([[c.get(f, 0.0) for f in FEATURES] for c in criteria], float)
    features = (features - features.mean(0)) / np.where(features.std(0) > 0, features.std(0), 1.0)
    priority = _unit(score[candidates])
    chosen = [int(np.argmax(priority))]
    dist = np.linalg.norm(features[candidates] - features[candidates[chosen[0]]], axis=1)
    while len(chosen) < k:
        value = (1 - diversity) * priority + diversity * _unit(dist)
        value[chosen] = -np.inf
        best = int(np.argmax(value))
        chosen.append(best)
        dist = np.minimum(dist, np.linalg.norm(features[candidates] - features[candidates[best]], axis=1))
    return [candidates[i] for i in chosen], score


@dataclass
class Selection:
    """What :func:`select` decided: every sample's criteria and the chosen names in order."""

    method: str
    k: int
    rows: list[dict[str, Any]]
    selected: list[str]

    def summary(self) -> str:
        """One paragraph for the command line."""
        rows = {r["name"]: r for r in self.rows}
        chosen = [rows[n] for n in self.selected]
        mean = {key: float(np.mean([r[key] for r in chosen])) if chosen else math.nan
                for key in ("density", "noise", "low_snr_ratio")}  # fmt: skip
        return (f"{self.method}: selected {len(self.selected)} of {len(self.rows)} samples "
                f"(mean density {mean['density']:.3f}, noise {mean['noise']:.2f}, "
                f"low-SNR ratio {mean['low_snr_ratio']:.3f})")  # fmt: skip


def _hardness(pool: Pool, checkpoint: Path) -> list[float]:
    """The checkpoint's cross-entropy + Dice loss on each sample (cropped to the stride)."""
    import torch

    from .model import load_checkpoint
    from .train import segmentation_loss

    ckpt = load_checkpoint(checkpoint)
    losses = []
    for name in pool.names:
        image = np.asarray(pool.image(name)[...])
        label = np.asarray(pool.label(name)[...]) > 0
        crop = tuple(slice(0, n // 8 * 8) for n in image.shape)
        if any(s.stop == 0 for s in crop):
            raise InputError(f"{pool.path}: sample {name} is smaller than 8 voxels on an axis")
        from .model import normalise

        x = normalise(image[crop], ckpt.measure_normalisation(image))
        with torch.inference_mode():
            logits = ckpt.model(torch.from_numpy(x)[None, None])
            loss, _ = segmentation_loss(logits, [], torch.from_numpy(label[crop].astype(np.int64))[None])
        losses.append(float(loss))
    return losses


def select(pool: str | os.PathLike[str] | Pool, config: SelectConfig | None = None) -> Selection:
    """Measure every sample of a pool and choose ``config.k`` of them with ``config.method``.

    Examples
    --------
    >>> import tempfile
    >>> rng = np.random.default_rng(0)
    >>> lab = np.zeros((8, 16, 16), np.uint8); lab[4, 8] = 1
    >>> samples = [(f"s{i}", rng.poisson(5 + 20 * lab * i).astype(np.uint8), lab, {}) for i in range(4)]
    >>> p = write_pool(f"{tempfile.mkdtemp()}/pool.zarr", samples, voxel_size=(1, 1, 1))
    >>> select(p, SelectConfig(k=2, method="random")).selected
    ['s2', 's3']
    """
    config = config or SelectConfig()
    pool = pool if isinstance(pool, Pool) else open_pool(pool)
    rows = []
    for record in pool.samples:
        name = record["name"]
        crit = sample_criteria(pool.image(name)[...], pool.label(name)[...],
                               density_scale=config.density_scale, snr_threshold=config.snr_threshold)  # fmt: skip
        rows.append({"name": name, "source": record.get("source", ""), "intensity": record.get("intensity", ""),
                     **crit})  # fmt: skip
    hardness = None
    if config.method == "dhpr+" and config.checkpoint is not None:
        hardness = _hardness(pool, config.checkpoint)
        for row, h in zip(rows, hardness):
            row["hardness"] = h
    order, score = select_samples(rows, config.k, method=config.method, hardness=hardness,
                                  diversity=config.diversity, hardness_weight=config.hardness_weight,
                                  seed=config.seed)  # fmt: skip
    noise = np.array([r["noise"] for r in rows])
    for i, row in enumerate(rows):
        row["noisy_half"] = bool(noise[i] > np.median(noise))
        row["score"] = float(score[i])
        row["rank"] = ""
        row["selected"] = False
    for rank, i in enumerate(order, start=1):
        rows[i]["rank"] = rank
        rows[i]["selected"] = True
    return Selection(config.method, config.k, rows, [rows[i]["name"] for i in order])


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot be written: {e.strerror or e}") from None


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: f"{row[c]:.6g}" if isinstance(row.get(c), float) else row.get(c, "") for c in columns})
    return buffer.getvalue()


def write_selection(selection: Selection, out: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``OUT/criteria.csv`` (every sample) and ``OUT/selected.csv`` (chosen, in order).

    Examples
    --------
    >>> import tempfile
    >>> sel = Selection("dhpr", 1, [{"name": "a", "density": 0.5, "noise": 1.0, "low_snr_ratio": 0.0,
    ...                              "score": 0.5, "rank": 1, "selected": True}], ["a"])
    >>> crit, chosen = write_selection(sel, tempfile.mkdtemp())
    >>> chosen.read_text().splitlines()[0]
    'name,rank,score,density,noise,low_snr_ratio'
    """
    folder = Path(out)
    criteria, chosen = folder / "criteria.csv", folder / "selected.csv"
    if not overwrite:
        for p in (criteria, chosen):
            if p.exists():
                raise OutputError(f"{p}: exists already (use --overwrite to replace it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot be created: {e.strerror or e}") from None
    keys = ["name", "source", "intensity", "selected", "rank", "score", "density", "noise", "low_snr_ratio",
            "fg_voxels", "noisy_half", "mean", "std", "p99", "contrast", "hardness"]  # fmt: skip
    present = [c for c in keys if any(c in r for r in selection.rows)]
    _atomic_text(criteria, _csv(selection.rows, present))
    rows = {r["name"]: r for r in selection.rows}
    _atomic_text(chosen, _csv([rows[n] for n in selection.selected],
                              ["name", "rank", "score", "density", "noise", "low_snr_ratio"]))  # fmt: skip
    meta = {"method": selection.method, "k": selection.k, "selected": len(selection.selected)}
    _atomic_text(folder / "selection.json", json.dumps(meta, indent=2) + "\n")
    return criteria, chosen
