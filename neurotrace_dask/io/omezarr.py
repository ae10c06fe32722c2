"""OME-Zarr (NGFF 0.5 on Zarr v3) image stores: layout, metadata, pyramid, completion.

The metadata is written by ``ome-zarr-py``; the arrays are plain Zarr v3 arrays with
Blosc-Zstd compression, optional sharding and dimension names ``z, y, x``. A store
carries a completion marker in its attributes (``attributes.neurotrace.complete``) so
that a half-written store never looks finished.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .. import __version__
from ..errors import ConfigError, InputError, OutputError
from .volumes import MAX_VOXELS

__all__ = [
    "ImageLayout",
    "default_chunks",
    "downsample_mean",
    "is_complete",
    "mark_complete",
    "open_image",
    "plan_layout",
    "prepare_partial",
    "pyramid_factors",
    "replace_store",
    "write_image_metadata",
    "write_region",
    "written_by_us",
]

Triple = tuple[int, int, int]
AXES = ("z", "y", "x")


def default_chunks(shape: Triple, dtype: np.dtype | str, target_bytes: int = 2 << 20) -> Triple:
    """Chunk shape of about 1-2 MB.

    A 128-cube, halved along its longest axis until it fits ``target_bytes``, clipped to
    the volume; for thin volumes (a few slices, 2D) the other axes then grow back.

    Examples
    --------
    >>> default_chunks((1000, 4000, 4000), "uint8")
    (128, 128, 128)
    >>> default_chunks((1000, 4000, 4000), "uint16")
    (64, 128, 128)
    >>> default_chunks((1, 4000, 4000), "uint8")
    (1, 1024, 2048)
    >>> default_chunks((10, 50, 60), "uint8")
    (10, 50, 60)
    """
    itemsize = np.dtype(dtype).itemsize
    chunks = [128, 128, 128]
    while math.prod(chunks) * itemsize > target_bytes:
        chunks[chunks.index(max(chunks))] //= 2
    chunks = [min(c, n) for c, n in zip(chunks, shape)]
    while math.prod(chunks) * itemsize * 2 <= target_bytes:
        growable = [axis for axis in range(3) if chunks[axis] < shape[axis]]
        if not growable:
            break
        axis = min(growable, key=lambda a: (chunks[a], -a))  # ties: grow x, the contiguous axis
        chunks[axis] = min(2 * chunks[axis], shape[axis])
    return tuple(chunks)  # type: ignore[return-value]


def pyramid_factors(
    voxel_size: tuple[float, float, float], levels: int, shape: Triple | None = None
) -> list[Triple]:
    """Per-level downsampling factors (relative to the previous level).

    Anisotropic volumes are first downsampled along their finer axes only, until the
    voxels are roughly isotropic (within 1.5x); then all axes are halved together.
    Axes already down to one voxel are left alone.

    Examples
    --------
    >>> pyramid_factors((1.0, 0.33, 0.33), 4)
    [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    >>> pyramid_factors((1.0, 1.0, 1.0), 2, shape=(1, 64, 64))
    [(1, 2, 2)]
    """
    size = list(voxel_size)
    extent = list(shape) if shape is not None else [2**62] * 3
    factors: list[Triple] = []
    for _ in range(levels - 1):
        live = [s for s, n in zip(size, extent) if n > 1] or size
        coarsest, finest = max(live), min(live)
        if coarsest / finest <= 1.5:
            step = tuple(2 if n > 1 else 1 for n in extent)
        else:
            step = tuple(2 if s * 1.5 < coarsest and n > 1 else 1 for s, n in zip(size, extent))
        factors.append(step)  # type: ignore[arg-type]
        size = [s * f for s, f in zip(size, step)]
        extent = [math.ceil(n / f) for n, f in zip(extent, step)]
    return factors


def auto_levels(shape: Triple, voxel_size: tuple[float, float, float], max_size: int = 512) -> int:
    """Number of levels (full resolution included) until every axis is at most ``max_size``.

    Examples
    --------
    >>> auto_levels((100, 2048, 2048), (1.0, 0.5, 0.5))
    3
    """
    levels = 1
    while levels < 12:
        factors = pyramid_factors(voxel_size, levels, shape)
        extent = list(shape)
        for step in factors:
            extent = [math.ceil(n / f) for n, f in zip(extent, step)]
        if max(extent) <= max_size:
            break
        levels += 1
    return levels


@dataclass(frozen=True)
class ImageLayout:
    """Shapes, chunks, shards and voxel sizes of every pyramid level of one image.

    Examples
    --------
    >>> layout = plan_layout((100, 1000, 1000), "uint8", (1.0, 0.5, 0.5), levels=2)
    >>> layout.shapes
    ((100, 1000, 1000), (100, 500, 500))
    """

    shapes: tuple[Triple, ...]
    dtype: str
    chunks: tuple[Triple, ...]
    shards: tuple[Triple | None, ...]
    factors: tuple[Triple, ...]
    voxel_sizes: tuple[tuple[float, float, float], ...]

    @property
    def levels(self) -> int:
        return len(self.shapes)

    def write_unit(self, level: int) -> Triple:
        """The storage unit one task must own whole: the shard, or the chunk when unsharded."""
        return self.shards[level] or self.chunks[level]


def plan_layout(
    shape: Triple,
    dtype: np.dtype | str,
    voxel_size: tuple[float, float, float],
    *,
    levels: int | None = None,
    chunks: Triple | None = None,
    shards: Triple | None = None,
) -> ImageLayout:
    """Plan every level of a pyramid: shapes, storage chunks and shards, voxel sizes.

    Examples
    --------
    >>> plan_layout((64, 64, 64), "uint16", (1, 1, 1), levels=1, chunks=(32, 32, 32)).chunks
    ((32, 32, 32),)
    """
    levels = levels if levels is not None else auto_levels(shape, voxel_size)
    steps = [(1, 1, 1)] + pyramid_factors(voxel_size, levels, shape)
    if shards is not None:
        base = tuple(min(c, n) for c, n in zip(chunks or default_chunks(shape, dtype), shape))
        if any(s < n and s % c for s, c, n in zip(shards, base, shape)):
            raise ConfigError(f"convert.shards {tuple(shards)} must be a multiple of the chunks {base}; set --chunks too")
    shapes, voxel_sizes, chunk_list, shard_list = [], [], [], []
    current_shape, current_size = tuple(shape), tuple(voxel_size)
    for step in steps:
        current_shape = tuple(math.ceil(n / f) for n, f in zip(current_shape, step))
        current_size = tuple(v * f for v, f in zip(current_size, step))
        level_chunks = tuple(min(c, n) for c, n in zip(chunks or default_chunks(current_shape, dtype), current_shape))
        level_shards = None
        if shards is not None:
            # Shards must stay a multiple of the chunks, also where a level is smaller than both.
            level_shards = tuple(
                max(c, min(s, math.ceil(n / c) * c)) for s, c, n in zip(shards, level_chunks, current_shape)
            )
            level_shards = tuple(s - s % c for s, c in zip(level_shards, level_chunks))
        shapes.append(current_shape)
        voxel_sizes.append(current_size)
        chunk_list.append(level_chunks)
        shard_list.append(level_shards)
    return ImageLayout(
        tuple(shapes), str(np.dtype(dtype)), tuple(chunk_list), tuple(shard_list), tuple(steps), tuple(voxel_sizes)
    )


def write_image_metadata(
    path: str | Path,
    layout: ImageLayout,
    *,
    name: str,
    compression_level: int = 1,
    extra: dict | None = None,
) -> zarr.Group:
    """Create the group, one empty array per level, and the NGFF 0.5 metadata.

    The store is marked incomplete; call :func:`mark_complete` once every level holds
    its data. ``extra`` goes into ``attributes.neurotrace`` (provenance, layout hash).
    """
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for level in range(layout.levels):
        group.create_array(
            str(level),
            shape=layout.shapes[level],
            dtype=layout.dtype,
            chunks=layout.chunks[level],
            shards=layout.shards[level],
            compressors=BloscCodec(cname="zstd", clevel=compression_level, shuffle=BloscShuffle.shuffle),
            fill_value=0,
            dimension_names=AXES,
        )
    # Imported here: ome_zarr pulls in dask.array and takes half a second, which every
    # worker process reading a block would otherwise pay.
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    datasets = [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": list(layout.voxel_sizes[level])}]}
        for level in range(layout.levels)
    ]
    write_multiscales_metadata(
        group,
        datasets,
        fmt=FormatV05(),
        axes=[{"name": a, "type": "space", "unit": "micrometer"} for a in AXES],
        name=name,
    )
    group.attrs["neurotrace"] = {"complete": False, "version": __version__, **(extra or {})}
    return group


def mark_complete(path: str | Path, **facts: object) -> None:
    """Set the completion marker, with ``facts`` (e.g. ``value_range``): the last thing written to a store."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["neurotrace"] = {**group.attrs.get("neurotrace", {}), **facts, "complete": True}


def constant_value(path: str | Path) -> float | None:
    """The one value every voxel of an image holds, if ``neurotrace convert`` found it constant."""
    try:
        low, high = zarr.open_group(str(path), mode="r").attrs.get("neurotrace", {}).get("value_range")
    except (TypeError, ValueError):  # no recorded range (another writer, or an older store)
        return None
    return float(low) if low == high else None


def refuse_constant(path: str | Path, name: str | Path | None = None) -> None:
    """Raise :class:`InputError` (naming ``name``, default ``path``) when every voxel of the image is one value."""
    value = constant_value(path)
    if value is not None:
        raise InputError(f"{name or path}: every voxel is {value:g} (an empty or saturated volume, or the wrong "
                         "--channel?); nothing to trace")  # fmt: skip


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a store this package finished writing."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        return False
    return bool(group.attrs.get("neurotrace", {}).get("complete", False))


def open_image(path: str | Path) -> tuple[list[zarr.Array], tuple[float, float, float]]:
    """Open a finished OME-Zarr image: its level arrays and full-resolution voxel size (um).

    Raises
    ------
    InputError
        If the store is missing, not OME-Zarr, or was never completed.
    """
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        raise InputError(f"{path}: not an OME-Zarr image (cannot open as a Zarr group)") from None
    multiscales = group.attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise InputError(f"{path}: Zarr group without OME-Zarr multiscales metadata")
    if not group.attrs.get("neurotrace", {}).get("complete", True):
        raise InputError(f"{path}: store is incomplete (an interrupted run?); rerun the command that writes it")
    datasets = multiscales[0]["datasets"]
    arrays = [group[d["path"]] for d in datasets]
    if math.prod(arrays[0].shape) > MAX_VOXELS:
        raise InputError(f"{path}: declares {math.prod(arrays[0].shape):.3g} voxels (shape {arrays[0].shape}), more "
                         f"than the {MAX_VOXELS:.3g} this tool takes; a corrupt header?")  # fmt: skip
    scale = datasets[0]["coordinateTransformations"][0]["scale"]
    return arrays, tuple(float(v) for v in scale[-3:])  # type: ignore[return-value]


def read_region(array: zarr.Array, region: Sequence[slice], name: str | Path) -> np.ndarray:
    """Read ``array[region]``; a corrupt or unreadable chunk is an :class:`InputError` naming ``name``.

    Examples
    --------
    >>> import tempfile
    >>> a = zarr.create_array(tempfile.mkdtemp(), shape=(4, 4), chunks=(2, 2), dtype="uint8", fill_value=3)
    >>> read_region(a, (slice(0, 2), slice(1, 3)), "a.zarr").tolist()
    [[3, 3], [3, 3]]
    """
    try:
        return np.asarray(array[tuple(region)])
    except Exception as exc:  # a codec or store failure on this region's chunks
        where = ", ".join(f"{s.start}:{s.stop}" for s in region)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"{name}: cannot read [{where}] (corrupt or missing chunk? {type(exc).__name__}: {first})") from None


def write_region(array: zarr.Array, region: Sequence[slice], data: np.ndarray) -> None:
    """Write ``data`` to ``array[region]``, storing exactly what a plain assignment stores.

    Zarr leaves a chunk that holds only the fill value unstored, and finds such chunks
    with a NaN-aware comparison per chunk that costs about as much as compressing it
    (and runs in Zarr's one event-loop thread). When the fill value is 0 and every chunk
    ``region`` touches holds a non-zero voxel of ``data``, no chunk can be left out, so
    the test is skipped.

    Examples
    --------
    >>> import tempfile
    >>> a = zarr.create_array(tempfile.mkdtemp(), shape=(4, 4), chunks=(2, 2), dtype="uint8", fill_value=0)
    >>> data = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.uint8)
    >>> write_region(a, (slice(0, 2), slice(0, 4)), data)
    >>> a.nchunks_initialized  # the all-zero chunk [0:2, 2:4] is not stored
    1
    """
    # Local cut points of the chunk grid along each axis, for a region starting anywhere.
    cuts = [
        [0, *range(c - s.start % c, s.stop - s.start, c), s.stop - s.start]
        for s, c in zip(region, array.chunks)
    ]
    chunks = itertools.product(*[[slice(a, b) for a, b in zip(axis, axis[1:])] for axis in cuts])
    # A positive minimum (the usual camera offset) answers for every chunk at once.
    if array.fill_value == 0 and (data.min() > 0 or all(data[chunk].any() for chunk in chunks)):
        array = array.with_config({"write_empty_chunks": True})
    array[tuple(region)] = data


def downsample_mean(block: np.ndarray, factors: Triple) -> np.ndarray:
    """Mean over ``factors``-sized windows; partial windows at the far edges average what they hold.

    Integer means are rounded half up, in exact integer arithmetic.

    Examples
    --------
    >>> downsample_mean(np.array([[[0, 2, 4, 5]]], np.uint8), (1, 1, 2))
    array([[[1, 5]]], dtype=uint8)
    """
    small_unsigned = block.dtype.kind == "u" and block.dtype.itemsize <= 2
    accumulator = np.uint32 if small_unsigned else np.float64
    total = block
    counts = np.ones((1, 1, 1), accumulator)
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = total.shape[axis]
        # f strided adds per axis, accumulating in a wider type: far cheaper than a
        # reshape-and-sum over a float copy. The k = 0 part has the output's length.
        parts = [total[(slice(None),) * axis + (slice(k, None, f),)] for k in range(min(f, n))]
        if len(parts) > 1 and parts[1].shape == parts[0].shape:
            summed = np.add(parts[0], parts[1], dtype=accumulator)
            parts = parts[2:]
        else:
            summed = parts[0].astype(accumulator)
            parts = parts[1:]
        for part in parts:
            summed[(slice(None),) * axis + (slice(0, part.shape[axis]),)] += part
        total = summed
        per_axis = np.minimum(f, n - np.arange(0, n, f)).astype(accumulator)
        counts = counts * per_axis.reshape([-1 if a == axis else 1 for a in range(3)])
    if total is block:
        return block.copy()
    if counts.min() == counts.max():
        counts = counts.flat[0]  # no partial window: divide by a scalar
    if small_unsigned:
        total += counts // 2
        total //= counts
        return total.astype(block.dtype)
    mean = total / counts
    return (np.floor(mean + 0.5) if block.dtype.kind in "iu" else mean).astype(block.dtype)


def written_by_us(path: Path) -> bool:
    """Whether ``path`` is a Zarr store this package wrote (so it may be deleted)."""
    try:
        return "neurotrace" in zarr.open_group(str(path), mode="r").attrs
    except Exception:
        return False


def prepare_partial(partial: Path, digest: str, overwrite: bool, *, what: str) -> bool:
    """Get ``partial`` (an ``OUT.partial`` store) ready; whether an interrupted run can resume there.

    A store of ours with the same layout hash resumes (its done markers, if any, say what is
    left). Another one is refused unless ``overwrite`` (then deleted); anything not written
    by this package is never deleted.
    """
    if not partial.exists():
        partial.parent.mkdir(parents=True, exist_ok=True)
        return False
    if not written_by_us(partial):
        raise OutputError(f"{partial}: exists and was not written by neurotrace; move it away first")
    previous = zarr.open_group(str(partial), mode="r").attrs["neurotrace"].get("layout_hash")
    if previous == digest:
        return True
    if not overwrite:
        raise OutputError(
            f"{partial}: an interrupted {what} with other input or parameters is there; pass --overwrite to discard it"
        )
    shutil.rmtree(partial)
    return False


#: zarr writes each chunk to ``KEY.<uuid4 hex>.partial`` and renames it; a worker killed in
#: between leaves that file behind (its block is rewritten elsewhere, the file stays).
_INTERRUPTED_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_interrupted_writes(store: str | Path) -> int:
    """Delete the temporary files of chunk writes cut short in ``store``; how many there were.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()); (folder / f"0.{'a' * 32}.partial").write_bytes(b"x")
    1
    >>> remove_interrupted_writes(folder), sorted(folder.iterdir())
    (1, [])
    """
    removed = 0
    for root, _, files in os.walk(store):
        for name in files:
            if _INTERRUPTED_WRITE.search(name):
                os.unlink(os.path.join(root, name))
                removed += 1
    return removed


def replace_store(partial: Path, out: Path) -> None:
    """Move the finished store into place; an existing output is removed only after."""
    remove_interrupted_writes(partial)
    if not out.exists():
        partial.rename(out)
        return
    # A fresh name: never collides with (and deletes) anything of the user's.
    old = out.with_name(f"{out.name}.replaced-{uuid.uuid4().hex[:8]}")
    out.rename(old)
    partial.rename(out)
    shutil.rmtree(old)
