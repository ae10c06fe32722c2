"""``neurotrace convert``: any supported stack -> OME-Zarr, streamed block by block on Dask.

Each task reads one slab of the input (aligned to whole output shards or chunks of every
level it writes, so there is exactly one writer per storage object), writes it, builds
the first pyramid levels from it in memory, and marks its block done. Any coarser levels
are then built pass by pass from the level below. Everything is written
under ``OUT.partial`` and renamed to ``OUT`` only when complete; an interrupted run
resumes there (same input and parameters) or is refused (different ones).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zarr
from distributed import Client

from ..blocks import Block, BlockGrid, DoneMarkers, layout_hash
from ..cluster import open_client, run_tasks
from ..config import ClusterConfig, ConvertConfig
from ..errors import InputError, OutputError, storage_error
from .omezarr import (
    ImageLayout,
    downsample_mean,
    mark_complete,
    plan_layout,
    prepare_partial,
    replace_store,
    write_image_metadata,
    write_region,
)
from .volumes import SUPPORTED_DTYPES, VolumeSource, format_region, open_volume

__all__ = ["ConvertResult", "convert", "plan_tasks", "task_block_shape"]

DONE_FOLDER = "neurotrace_done"
STATS = "value_range"  # per level-0 block: the lowest and highest voxel written


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote."""

    path: Path
    source: str
    layout: ImageLayout
    voxel_size_source: str
    blocks_written: int
    blocks_skipped: int
    seconds: float
    notes: tuple[str, ...] = field(default=())

    def summary(self) -> str:
        """A few human-readable lines: levels, chunking, voxel size, time."""
        lines = [f"wrote {self.path}  (from {self.source})"]
        for level in range(self.layout.levels):
            shards = self.layout.shards[level]
            lines.append(
                f"  level {level}: shape {self.layout.shapes[level]} {self.layout.dtype}, chunks {self.layout.chunks[level]}"
                + (f", shards {shards}" if shards else "")
                + f", voxel {tuple(round(v, 4) for v in self.layout.voxel_sizes[level])} um"
            )
        lines.append(f"  voxel size from {self.voxel_size_source}")
        lines.append(
            f"  {self.blocks_written} blocks written, {self.blocks_skipped} already done, {self.seconds:.1f} s"
        )
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def task_block_shape(shape: tuple[int, int, int], unit: tuple[int, int, int], itemsize: int, task_bytes: int):
    """Block shape of one conversion task: whole storage units, about ``task_bytes`` big.

    Grows along x, then y, then z (the order TIFF pages are laid out), doubling while
    the block stays within ``task_bytes``; worker memory is bounded by this, never by
    the volume.

    Examples
    --------
    >>> task_block_shape((1000, 4096, 4096), (64, 128, 128), 2, 64 << 20)
    (64, 128, 4096)
    """
    block = list(unit)
    for axis in (2, 1, 0):
        while block[axis] < shape[axis] and math.prod(block) * 2 * itemsize <= task_bytes:
            block[axis] *= 2
        block[axis] = min(block[axis], math.ceil(shape[axis] / unit[axis]) * unit[axis])
        if block[axis] < shape[axis]:
            break
    return tuple(block)


def _check_paths(source: VolumeSource, out: Path, overwrite: bool) -> None:
    inp = Path(source.path).resolve()
    if out == inp or inp in out.parents:
        raise OutputError(f"{out}: output would be written inside the input {inp}")
    if out in inp.parents:
        raise OutputError(f"{out}: the input {inp} lies inside this output; choose another output path")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists already; pass --overwrite to replace it")
    if out.exists() and not (out / "zarr.json").exists():
        raise OutputError(f"{out}: exists and is not a Zarr store; refusing to replace it even with --overwrite")


def _output_dtype(source: VolumeSource, rescale: str | None) -> np.dtype:
    dtype = np.dtype(source.dtype).newbyteorder("=")  # sources read in native byte order
    if dtype.kind not in "iuf":
        raise InputError(f"{source.name}: dtype {dtype} is not an image intensity type (need integers or floats)")
    if rescale is not None:
        return np.dtype(rescale)
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{source.name}: dtype {dtype} is not supported (uint8 or uint16); pass --rescale uint8 or --rescale uint16"
        )
    return dtype


def _read_finite(source: VolumeSource, block: Block) -> np.ndarray:
    """Read a block; floating-point input must be finite (NaN and Inf have no intensity)."""
    data = source.read(block.write)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(f"{source.name}: contains NaN or Inf values (in region {format_region(block.write)})")
    return data


def _value_range_task(block: Block, *, source: VolumeSource) -> tuple[float, float]:
    data = _read_finite(source, block)
    return float(data.min()), float(data.max())


def _rescale(data: np.ndarray, low: float, high: float, dtype: np.dtype) -> np.ndarray:
    top = np.iinfo(dtype).max
    scale = top / (high - low) if high > low else 0.0
    return np.rint((data.astype(np.float64) - low) * scale).clip(0, top).astype(dtype)


def _write_levels(
    block: Block,
    *,
    source: VolumeSource,
    store: str,
    value_range: tuple[float, float] | None,
    factors: tuple[tuple[int, int, int], ...],
    markers: DoneMarkers,
) -> int:
    """Read one input slab, write it to level 0, and build levels 1..len(factors) from it in memory."""
    data = _read_finite(source, block)
    if value_range is not None:
        data = _rescale(data, *value_range, zarr.open_array(f"{store}/0", mode="r").dtype)
    region = block.write
    write_region(zarr.open_array(f"{store}/0", mode="r+"), region, data)
    # This block's own row (one chunk per block: one writer per object) of the value range.
    zarr.open_array(f"{store}/{DONE_FOLDER}/{STATS}", mode="r+")[block.id] = (data.min(), data.max())
    for level, step in enumerate(factors, start=1):
        data = downsample_mean(data, step)
        # The block is aligned to whole storage units of every level it builds, so the
        # downsampled slab is exactly this task's own shards/chunks of that level.
        region = tuple(slice(s.start // f, s.start // f + n) for s, f, n in zip(region, step, data.shape))
        write_region(zarr.open_array(f"{store}/{level}", mode="r+"), region, data)
    markers.mark_done(block.id)
    return block.id


def _write_level(block: Block, *, store: str, level: int, factors: tuple[int, int, int], markers: DoneMarkers) -> int:
    """Build one block of a pyramid level from the level below, read back from the store."""
    below = zarr.open_array(f"{store}/{level - 1}", mode="r")
    region = tuple(
        slice(s.start * f, min(s.stop * f, n)) for s, f, n in zip(block.write, factors, below.shape)
    )
    data = downsample_mean(below[region], factors)
    write_region(zarr.open_array(f"{store}/{level}", mode="r+"), block.write, data)
    markers.mark_done(block.id)
    return block.id


def _threaded(cluster: ClusterConfig | None) -> ClusterConfig:
    """A local cluster whose ``processes`` is left to the command runs threads of this process.

    Conversion tasks spend their time where the GIL is released (file reads, numpy,
    Blosc), so threads keep pace with processes, and skipping worker start-up and their
    imports saves 1-2 s a command.
    """
    cluster = cluster or ClusterConfig()
    if cluster.kind != "local" or cluster.local.processes is not None:
        return cluster
    return cluster.model_copy(update={"local": cluster.local.model_copy(update={"processes": False})})


def plan_tasks(layout: ImageLayout, task_bytes: int) -> tuple[int, list[BlockGrid]]:
    """Task grids of a conversion, and how many levels the level-0 tasks build themselves.

    Level-0 tasks build as many pyramid levels in memory as they can while their block,
    aligned to whole storage units of each such level, stays within ``task_bytes``; each
    remaining level is one more pass over the level below. Returns ``(in_task_levels,
    grids)`` where ``grids[0]`` is the level-0 grid and ``grids[k]`` the pass for level
    ``in_task_levels + k - 1``.
    """
    itemsize = np.dtype(layout.dtype).itemsize
    align = layout.write_unit(0)
    built = 1
    scale = (1, 1, 1)
    for level in range(1, layout.levels):
        scale = tuple(a * b for a, b in zip(scale, layout.factors[level]))
        unit = tuple(u * f for u, f in zip(layout.write_unit(level), scale))
        candidate = tuple(math.lcm(a, b) for a, b in zip(align, unit))
        if math.prod(candidate) * itemsize > task_bytes:
            break
        align, built = candidate, level + 1
    grids = [BlockGrid(layout.shapes[0], task_block_shape(layout.shapes[0], align, itemsize, task_bytes), 0, align)]
    for level in range(built, layout.levels):
        unit = layout.write_unit(level)
        shape = layout.shapes[level]
        grids.append(BlockGrid(shape, task_block_shape(shape, unit, itemsize, task_bytes), 0, unit))
    return built, grids


def convert(
    input: str | Path,
    out: str | Path,
    config: ConvertConfig | None = None,
    *,
    cluster: ClusterConfig | None = None,
    client: Client | None = None,
) -> ConvertResult:
    """Convert an image stack to a multiscale OME-Zarr image, streaming on Dask.

    Parameters
    ----------
    input
        TIFF/BigTIFF, a folder of 2D TIFF slices, ``file.h5:/dataset``, or a Zarr array.
    out
        The ``.ome.zarr`` folder to write.
    config
        Chunks, shards, levels, voxel size, channel, rescaling, overwrite.
    cluster, client
        Where to run: an open ``client`` (left open), else a cluster made from ``cluster``
        (a local one runs threads of this process unless ``cluster.local.processes`` is set).

    Returns
    -------
    ConvertResult

    Examples
    --------
    >>> import numpy as np, tifffile, tempfile, os
    >>> from neurotrace_dask.config import ClusterConfig, LocalClusterConfig
    >>> folder = tempfile.mkdtemp()
    >>> tifffile.imwrite(f"{folder}/cell.tif", np.ones((8, 64, 64), np.uint16))
    >>> local = ClusterConfig(local=LocalClusterConfig(processes=False, n_workers=1))
    >>> result = convert(f"{folder}/cell.tif", f"{folder}/cell.ome.zarr", ConvertConfig(voxel_size=(1, .5, .5)), cluster=local)
    >>> result.layout.shapes[0]
    (8, 64, 64)
    """
    started = time.perf_counter()
    config = config or ConvertConfig()
    source = open_volume(input, channel=config.channel)
    out = Path(out).resolve()
    _check_paths(source, out, config.overwrite)
    dtype = _output_dtype(source, config.rescale)
    notes = list(source.notes)
    if config.voxel_size is not None:
        voxel_size, voxel_origin = tuple(config.voxel_size), "--voxel-size"
    elif source.voxel_size is not None:
        voxel_size, voxel_origin = source.voxel_size, "file metadata"
        if not source.z_spacing_known:
            voxel_origin = "file metadata for y and x; z assumed 1 um"
            notes.append("the file gives no z spacing; assumed 1 um, pass --voxel-size Z Y X to set it")
    else:
        voxel_size, voxel_origin = (1.0, 1.0, 1.0), "default (1 um; the file has none)"
        notes.append("no voxel size in the file; assumed 1 x 1 x 1 um, pass --voxel-size Z Y X to set it")

    layout = plan_layout(
        source.shape, dtype, voxel_size, levels=config.levels, chunks=config.chunks, shards=config.shards
    )
    built, grids = plan_tasks(layout, config.task_bytes)
    digest = layout_hash(
        grids[0],
        source=asdict(source),
        layout=asdict(layout),
        rescale=config.rescale,
        compression_level=config.compression_level,
        task_bytes=config.task_bytes,
    )
    partial = out.with_name(out.name + ".partial")
    store = str(partial)
    try:
        resumed = prepare_partial(partial, digest, config.overwrite, what="conversion")
        if not resumed:
            write_image_metadata(
                partial, layout, name=Path(source.name).name, compression_level=config.compression_level,
                extra={"layout_hash": digest, "source": source.name, "voxel_size_from": voxel_origin},
            )
        written = skipped = 0
        tasks_per_thread = (cluster or ClusterConfig()).tasks_per_thread
        with open_client(_threaded(cluster), client) as active:
            value_range = None
            if config.rescale is not None:
                ranges = run_tasks(active, _value_range_task, grids[0], total=len(grids[0]),
                                   description="value range", tasks_per_thread=tasks_per_thread, source=source)
                value_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
            stats = partial / DONE_FOLDER / STATS
            if not stats.exists():
                zarr.create_array(str(stats), shape=(len(grids[0]), 2), chunks=(1, 2), dtype="float64",
                                  fill_value=np.nan)  # fmt: skip
            for step, grid in enumerate(grids):
                level = 0 if step == 0 else built + step - 1
                markers = DoneMarkers.open(partial / DONE_FOLDER / f"level{level}", grid, digest)
                todo = markers.pending(grid)
                skipped += len(grid) - len(todo)
                written += len(todo)
                if level == 0:
                    task = _write_levels
                    kwargs = {"source": source, "value_range": value_range, "factors": layout.factors[1:built]}
                    description = f"levels 0-{built - 1}" if built > 1 else "level 0"
                else:
                    task, kwargs = _write_level, {"level": level, "factors": layout.factors[level]}
                    description = f"level {level}"
                run_tasks(active, task, todo, total=len(todo), description=description,
                          tasks_per_thread=tasks_per_thread, store=store, markers=markers, **kwargs)
        ranges = zarr.open_array(str(partial / DONE_FOLDER / STATS), mode="r")[...]
        low, high = (float(v) for v in (ranges[:, 0].min(), ranges[:, 1].max()))
        if low == high:
            notes.append(f"every voxel is {low:g}: an empty or saturated volume, or the wrong --channel?")
        mark_complete(partial, value_range=[low, high])
        shutil.rmtree(partial / DONE_FOLDER)
        replace_store(partial, out)
    except OSError as exc:  # a full disk, a read-only folder: one line naming the output
        error = storage_error(exc, out)
        if error is None:
            raise
        raise error from None
    return ConvertResult(
        out, source.name, layout, voxel_origin, written, skipped, time.perf_counter() - started, tuple(notes)
    )
