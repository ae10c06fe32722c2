"""Neurite probability maps: the network mapped over overlapping blocks of an OME-Zarr image.

One Dask task per output block (aligned to the output's chunks or shards and to the
model's stride, so every storage unit has one writer). Each task reads its block plus a
halo straight from Zarr, normalises it, runs the network (in one pass when the read
region fits ``patch``, else as overlapping patches blended with a centre-weighted window,
the last patch shifted back to the edge), crops the write region and writes
``round(255 * p)`` as uint8. Then it marks its block done, so a rerun resumes.

Why blocks give the whole-volume answer: a read region always starts ``halo`` (a multiple
of the stride) before a stride-aligned write region, so every block sees the stride grid
in the same phase as the whole volume would; outside the volume the image is mirrored, so
a block at the edge sees what the whole volume sees there; and the network's reach beyond
``halo`` is small (see :attr:`neurotrace_dask.model.ModelSpec.halo`).

:func:`predict_array` is the pure core on a numpy volume (what notebooks and the tests use
as the whole-volume reference); :func:`predict` is the distributed, resumable stage.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from distributed import Client

from .blocks import Block, BlockGrid, DoneMarkers, layout_hash
from .cluster import open_client, run_tasks
from .config import ClusterConfig, PredictConfig
from .errors import ConfigError, InputError, OutputError, storage_error
from .io.omezarr import (
    is_complete,
    mark_complete,
    open_image,
    plan_layout,
    prepare_partial,
    read_region,
    refuse_constant,
    replace_store,
    write_image_metadata,
    written_by_us,
)
from .model import STRIDE, Checkpoint, Normalisation, load_checkpoint, normalise

__all__ = ["PredictResult", "predict", "predict_array", "resolve_device"]

DONE_FOLDER = "neurotrace_done"
Triple = tuple[int, int, int]
# Channels-last 3-D convolutions run about 1.7x faster on CPU (oneDNN) and suit GPUs too.
_LAYOUT = torch.channels_last_3d


# --------------------------------------------------------------------------- pure core


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("predict.device is 'cuda' but torch sees no GPU (install a CUDA build of torch)")
    return torch.device(device)


def _starts(size: int, patch: int, overlap: int) -> list[int]:
    """Patch origins along one axis: stride-aligned steps, the last one shifted back to the edge."""
    if patch >= size:
        return [0]
    step = max(STRIDE, (patch - overlap) // STRIDE * STRIDE)
    starts = list(range(0, size - patch, step))
    return starts + [size - patch]


def _window(shape: Triple, overlap: int) -> np.ndarray:
    """Centre-weighted blending weights: 1 inside, ramping down over ``overlap`` to the faces."""
    axes = []
    for n in shape:
        i = np.arange(n, dtype=np.float32)
        ramp = np.minimum(i + 0.5, n - i - 0.5) / max(overlap, 1)
        axes.append(np.clip(ramp, 1e-3, 1.0))
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


@torch.inference_mode()
def _infer(model: torch.nn.Module, x: np.ndarray, config: PredictConfig, device: torch.device) -> np.ndarray:
    """p(neurite) over a normalised volume whose every axis is a multiple of the stride."""
    patch = tuple(min(p // STRIDE * STRIDE or STRIDE, n) for p, n in zip(config.patch, x.shape))
    if math.prod(x.shape) <= math.prod(config.patch):
        patch = x.shape  # the whole region in one pass
    starts = [_starts(n, p, config.patch_overlap) for n, p in zip(x.shape, patch)]
    origins = [(z, y, xx) for z in starts[0] for y in starts[1] for xx in starts[2]]
    single = len(origins) == 1
    total = np.zeros(x.shape, np.float32)
    weights = np.zeros(x.shape, np.float32)
    window = np.ones(patch, np.float32) if single else _window(patch, config.patch_overlap)  # type: ignore[arg-type]
    amp = config.amp and device.type == "cuda"
    for i in range(0, len(origins), config.batch_size):
        batch = origins[i : i + config.batch_size]
        regions = [tuple(slice(o, o + p) for o, p in zip(origin, patch)) for origin in batch]
        inputs = torch.from_numpy(np.stack([x[r] for r in regions])[:, None]).to(device, memory_format=_LAYOUT)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(inputs)
        probability = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
        for r, p in zip(regions, probability):
            total[r] += p * window
            weights[r] += window
    return total / weights


def _mirror(indices: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into ``0 .. n-1`` about the volume's edges (edge voxels not repeated)."""
    if n == 1:
        return np.zeros_like(indices)
    period = 2 * (n - 1)
    folded = np.mod(indices, period)
    return np.where(folded < n, folded, period - folded)


def _mirrored_read(source: Any, bounds: list[tuple[int, int]], name: str | None = None) -> np.ndarray:
    """Read ``bounds`` (which may reach outside the volume) with the outside mirrored.

    Mirrored about the volume's faces, not the block's: a block at the edge sees exactly
    what the whole volume sees there. ``name`` (the store) makes a failed read an
    :class:`InputError` naming it.
    """
    indices = [_mirror(np.arange(a, b), n) for (a, b), n in zip(bounds, source.shape)]
    inside = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    data = read_region(source, inside, name) if name else np.asarray(source[inside])
    if all(a >= 0 and b <= n for (a, b), n in zip(bounds, source.shape)):
        return data
    return data[np.ix_(*(i - s.start for i, s in zip(indices, inside)))]


def _read_bounds(write: tuple[slice, ...], halo: int) -> list[tuple[int, int]]:
    """The write region grown by ``halo``, its far end extended to a multiple of the stride."""
    bounds = []
    for s in write:
        a, b = s.start - halo, s.stop + halo
        bounds.append((a, a + -(-(b - a) // STRIDE) * STRIDE))
    return bounds


def _predict_region(
    model: torch.nn.Module, source: Any, write: tuple[slice, ...], norm: Normalisation, halo: int,
    config: PredictConfig, device: torch.device, name: str | None = None,
) -> np.ndarray | None:  # fmt: skip
    """uint8 probabilities of one write region; ``None`` when its input is all background."""
    bounds = _read_bounds(write, halo)
    raw = _mirrored_read(source, bounds, name)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise InputError(f"image contains NaN or Inf values near {[(s.start, s.stop) for s in write]}")
    if config.skip_background and float(raw.max()) <= norm.low:
        return None
    probability = _infer(model, normalise(raw, norm), config, device)
    crop = tuple(slice(halo, halo + s.stop - s.start) for s in write)
    return np.rint(probability[crop] * 255).astype(np.uint8)


def predict_array(
    volume: np.ndarray,
    checkpoint: Checkpoint,
    config: PredictConfig | None = None,
    *,
    norm: Normalisation | None = None,
) -> np.ndarray:
    """Predict a whole in-memory volume in one block: uint8 ``round(255 * p(neurite))``.

    The reference the distributed :func:`predict` reproduces block by block (within 2/255
    per voxel with the default halo; blocks that :func:`predict` skips as all background
    stay 0 there). The checkpoint's model is moved to the configured device, in eval mode.

    Parameters
    ----------
    volume : (z, y, x) ndarray
        Raw intensities (uint8, uint16 or float).
    checkpoint : Checkpoint
        From :func:`neurotrace_dask.model.load_checkpoint`.
    config : PredictConfig, optional
        Halo, patch size and overlap, device.
    norm : Normalisation, optional
        Default: measured on ``volume`` with the checkpoint's policy.

    Examples
    --------
    >>> from neurotrace_dask.model import Checkpoint, ModelSpec, build_model
    >>> spec = ModelSpec(width=2, modules_per_stage=1)
    >>> ckpt = Checkpoint(build_model(spec, seed=0).eval(), spec, {"voxel_size_um": [1, 1, 1],
    ...     "normalisation": {"percentiles": [1, 99.9]}}, "0" * 64, Path("x.json"))
    >>> predict_array(np.random.default_rng(0).random((10, 20, 30)), ckpt).shape
    (10, 20, 30)
    """
    config = config or PredictConfig()
    volume = np.asarray(volume)
    if volume.ndim != 3 or 0 in volume.shape:
        raise InputError(f"need a non-empty 3-D volume (z, y, x), got shape {volume.shape}")
    norm = norm or checkpoint.measure_normalisation(volume)
    device = resolve_device(config.device)
    model = checkpoint.model.to(device, memory_format=_LAYOUT).eval()
    halo = _aligned_halo(config.halo)
    write = tuple(slice(0, n) for n in volume.shape)
    result = _predict_region(model, volume, write, norm, halo, config.model_copy(update={"skip_background": False}),
                             device)  # fmt: skip
    assert result is not None
    return result


def _aligned_halo(halo: int) -> int:
    return -(-halo // STRIDE) * STRIDE


# --------------------------------------------------------------------------- distributed stage


@dataclass(frozen=True)
class PredictResult:
    """What :func:`predict` wrote."""

    out: Path
    image: Path
    checkpoint: Path
    shape: Triple
    blocks: int
    computed: int
    skipped_background: int
    resumed: int
    normalisation: Normalisation
    seconds: float

    @property
    def voxels_per_second(self) -> float:
        return math.prod(self.shape) / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        """A few lines for the terminal."""
        z, y, x = self.shape
        lines = [
            f"wrote {self.out}: p(neurite) as uint8 on the {z}x{y}x{x} grid of {self.image}",
            f"  checkpoint {self.checkpoint}",
            f"  normalisation: {self.normalisation.describe()}",
            f"  {self.blocks} block(s): {self.computed} computed, {self.skipped_background} all background, "
            f"{self.resumed} done before; {self.seconds:.1f} s ({self.voxels_per_second / 1e6:.2f} Mvoxel/s)",
        ]
        return "\n".join(lines)


def predict(
    image: str | Path,
    out: str | Path,
    config: PredictConfig | None = None,
    *,
    cluster: ClusterConfig | None = None,
    client: Client | None = None,
) -> PredictResult:
    """Predict neurite probability for a whole OME-Zarr image, block by block on Dask.

    Parameters
    ----------
    image : path
        An OME-Zarr image written by ``neurotrace convert`` (level 0 is used).
    out : path
        The probability OME-Zarr to write (uint8, same grid and chunks as the image).
    config : PredictConfig
        Checkpoint, block, halo, patch, device, overwrite.
    cluster, client
        Where to run: an open ``client`` (left open), else a cluster made from ``cluster``.

    Returns
    -------
    PredictResult

    Examples
    --------
    >>> cfg = PredictConfig(checkpoint="checkpoints/small.json")
    >>> predict("image.ome.zarr", "prob.ome.zarr", cfg).summary()  # doctest: +SKIP
    """
    started = time.perf_counter()
    config = config or PredictConfig()
    if config.checkpoint is None:
        raise ConfigError("no checkpoint given: pass --checkpoint NAME.json (or set predict.checkpoint)")
    image, out = Path(image).resolve(), Path(out).resolve()
    _check_paths(image, out, config.overwrite)
    arrays, voxel_size = open_image(image)
    refuse_constant(image)
    source = arrays[0]
    if source.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{image}: dtype {source.dtype} is not supported (uint8 or uint16 from neurotrace convert)")
    checkpoint = load_checkpoint(config.checkpoint)
    try:
        norm = checkpoint.measure_normalisation(source)
    except Exception as exc:  # the sample's chunks do not decode
        raise InputError(f"{image}: cannot read the intensity sample (corrupt or missing chunk? "
                         f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from None  # fmt: skip
    chunks = tuple(int(c) for c in source.chunks)
    shards = getattr(source, "shards", None)
    unit = tuple(int(s) for s in shards) if shards else chunks
    halo = _aligned_halo(config.halo)
    grid = BlockGrid.for_storage(source.shape, config.block, chunks_or_shards=unit, stride=STRIDE, halo=halo)
    layout = plan_layout(source.shape, np.uint8, voxel_size, levels=1, chunks=chunks, shards=unit if shards else None)
    device = resolve_device(config.device)
    digest = layout_hash(grid, image=str(image), checkpoint=checkpoint.sha256, normalisation=norm.to_dict(),
                         patch=config.patch, patch_overlap=config.patch_overlap, device=device.type,
                         amp=config.amp and device.type == "cuda", skip_background=config.skip_background)  # fmt: skip
    partial = out.with_name(out.name + ".partial")
    try:
        resumed = prepare_partial(partial, digest, config.overwrite, what="prediction")
        if not resumed:
            extra = {"layout_hash": digest, "image": str(image), "checkpoint": {"path": str(checkpoint.path),
                     "sha256": checkpoint.sha256, "architecture": checkpoint.spec.model_dump(mode="json")},
                     "normalisation": norm.to_dict(), "predict": config.model_dump(mode="json")}  # fmt: skip
            write_image_metadata(partial, layout, name="p(neurite)", extra=extra)
        todo: list[Block] = []
        outcomes: list[str] = []
        if not is_complete(partial):  # complete: interrupted just before the final rename
            markers = DoneMarkers.open(partial / DONE_FOLDER, grid, digest)
            todo = markers.pending(grid)
            with open_client(_gpu_cluster(cluster, device) if client is None else cluster, client) as active:
                resources = {"GPU": 1} if device.type == "cuda" and _workers_have_gpus(active) else None
                outcomes = run_tasks(active, _predict_task, todo, total=len(todo), description="predict",
                                     tasks_per_thread=(cluster or ClusterConfig()).tasks_per_thread,
                                     resources=resources, image=str(image), store=str(partial / "0"),
                                     checkpoint=str(checkpoint.path), sha256=checkpoint.sha256, norm=norm, halo=halo,
                                     config=config, markers=markers)  # fmt: skip
            mark_complete(partial)
        shutil.rmtree(partial / DONE_FOLDER, ignore_errors=True)
        replace_store(partial, out)
    except OSError as exc:  # a full disk, a read-only folder: one line naming the output
        error = storage_error(exc, out)
        if error is None:
            raise
        raise error from None
    skipped = sum(1 for o in outcomes if o == "background")
    return PredictResult(out, image, checkpoint.path, tuple(source.shape), len(grid), len(todo) - skipped, skipped,
                         len(grid) - len(todo), norm, time.perf_counter() - started)  # fmt: skip


def _check_paths(image: Path, out: Path, overwrite: bool) -> None:
    for path in (out, out.with_name(out.name + ".partial")):
        if path == image or image in path.parents or path in image.parents:
            raise OutputError(f"{path}: output and input {image} overlap; choose another output path")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists already; pass --overwrite to replace it")
    if out.exists() and not written_by_us(out):
        raise OutputError(f"{out}: exists and was not written by neurotrace; refusing to replace it even with --overwrite")


def _gpu_cluster(cluster: ClusterConfig | None, device: torch.device) -> ClusterConfig | None:
    """On a GPU, a local cluster is one single-threaded worker holding the GPU as a resource."""
    cluster = cluster or ClusterConfig()
    if device.type != "cuda" or cluster.kind != "local":
        return cluster
    local = cluster.local.model_copy(update={"n_workers": 1, "threads_per_worker": 1, "resources": {"GPU": 1}})
    return cluster.model_copy(update={"local": local})


def _workers_have_gpus(client: Client) -> bool:
    workers = client.scheduler_info(n_workers=-1).get("workers", {}).values()
    return bool(workers) and all(w.get("resources", {}).get("GPU", 0) > 0 for w in workers)


_MODELS: dict[tuple[str, str, str], torch.nn.Module] = {}
_MODELS_LOCK = threading.Lock()


def _worker_model(path: str, sha256: str, device: torch.device) -> torch.nn.Module:
    """The network, loaded once per worker process (not per task) and checked against the hash."""
    key = (path, sha256, str(device))
    with _MODELS_LOCK:
        if key not in _MODELS:
            checkpoint = load_checkpoint(path, device=device)
            if checkpoint.sha256 != sha256:
                raise InputError(f"{path}: weights changed while predicting (sha256 differs); rerun")
            _MODELS[key] = checkpoint.model.to(memory_format=_LAYOUT).eval()
        return _MODELS[key]


def _predict_task(
    block: Block, *, image: str, store: str, checkpoint: str, sha256: str, norm: Normalisation, halo: int,
    config: PredictConfig, markers: DoneMarkers,
) -> str:  # fmt: skip
    device = resolve_device(config.device)
    if device.type == "cpu":
        # A worker runs one task per thread at once: one torch thread each keeps the torch
        # threads equal to the worker's threads (torch's setting is per calling thread).
        torch.set_num_threads(1)
    model = _worker_model(checkpoint, sha256, device)
    arrays, _ = open_image(image)
    probability = _predict_region(model, arrays[0], block.write, norm, halo, config, device, image)
    if probability is not None:
        zarr.open_array(store, mode="r+")[block.write] = probability
    markers.mark_done(block)
    return "background" if probability is None else "computed"
