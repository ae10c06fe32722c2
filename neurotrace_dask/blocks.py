"""Block planning: the grid of blocks a stage works on, its layout hash, and done markers.

A huge volume is processed block by block. Each :class:`Block` owns a *write* region
(the voxels it produces; write regions tile the volume exactly once) and reads a larger
*read* region (the write region grown by a halo, clipped to the volume) so that filters
and models see context at the block edges.

Block shapes are rounded up to a multiple of ``align`` on each axis, which callers set to
the least common multiple of the output's storage chunk (or shard) shape and the model's
stride (see :func:`aligned_block_shape` and :meth:`BlockGrid.for_storage`). Every write
region then starts on a chunk/shard boundary, so each task writes only its own chunks or
shards and no two tasks ever write the same storage object.

Resuming is by a per-block done marker (:class:`DoneMarkers`, a tiny Zarr array beside the
output) plus a hash of the layout (:func:`layout_hash`): a store made for another layout or
other parameters is refused rather than silently mixed with new results.

This module is pure planning: it imports neither Dask nor any model code.

Examples
--------
>>> grid = BlockGrid((100, 300, 300), block_shape=100, halo=8, align=64)
>>> grid.write_shape, grid.grid_shape, len(grid)
((128, 128, 128), (1, 3, 3), 9)
>>> grid[4].write
(slice(0, 100, None), slice(128, 256, None), slice(128, 256, None))
>>> grid[4].read
(slice(0, 100, None), slice(120, 264, None), slice(120, 264, None))
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np

from neurotrace_dask.errors import ConfigError, OutputError

__all__ = [
    "Block",
    "BlockGrid",
    "DoneMarkers",
    "Int3",
    "Int3Like",
    "Region",
    "aligned_block_shape",
    "layout_hash",
]

Int3: TypeAlias = tuple[int, int, int]
"""A per-axis (z, y, x) triple of integers."""

Int3Like: TypeAlias = int | Sequence[int]
"""An int (same on every axis) or a sequence of three ints."""

Region: TypeAlias = tuple[slice, slice, slice]
"""A (z, y, x) box of voxels as three ``slice(start, stop)`` with step ``None``."""

# Bumped whenever the meaning of the hashed payload changes, so old stores are refused.
_LAYOUT_HASH_VERSION = 1
# Key under which the done-marker array keeps its metadata in the Zarr attributes.
_MARKER_ATTR = "neurotrace_done_markers"


def _as_int3(value: Int3Like, name: str, *, minimum: int) -> Int3:
    """Normalise an int or a 3-sequence of ints to a 3-tuple, each ``>= minimum``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer or 3 integers, got {value!r}")
    try:
        items = [operator.index(value)] * 3  # type: ignore[arg-type]
    except TypeError:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
            raise ConfigError(
                f"{name} must be an integer or 3 integers, got {value!r}"
            ) from None
        if len(value) != 3:
            raise ConfigError(
                f"{name} must have 3 values (z, y, x), got {len(value)}: {tuple(value)!r}"
            ) from None
        try:
            if any(isinstance(v, bool) for v in value):
                raise TypeError
            items = [operator.index(v) for v in value]
        except TypeError:
            raise ConfigError(f"{name} must be integers, got {tuple(value)!r}") from None
    if any(v < minimum for v in items):
        what = "positive" if minimum == 1 else f">= {minimum}"
        raise ConfigError(f"{name} must be {what} on every axis, got {tuple(items)}")
    return (items[0], items[1], items[2])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def aligned_block_shape(block_shape: Int3Like, *multiples: Int3Like) -> Int3:
    """Round a block shape up, per axis, to the least common multiple of ``multiples``.

    Use it to make blocks start on storage chunk/shard boundaries (one writer per storage
    object) and on the model's output stride. The result is not clipped to any volume;
    :class:`BlockGrid` clips the last block along each axis.

    Parameters
    ----------
    block_shape
        Requested block shape: an int (cube) or 3 ints (z, y, x), all positive.
    *multiples
        Any number of per-axis multiples (each an int or 3 ints, all positive), e.g. the
        chunk or shard shape and the model stride. None given means no rounding.

    Returns
    -------
    tuple of int
        The aligned block shape (z, y, x).

    Raises
    ------
    ConfigError
        If a value is not positive or has the wrong length.

    Examples
    --------
    >>> aligned_block_shape(100, 64, 8)
    (128, 128, 128)
    >>> aligned_block_shape((30, 256, 256), (1, 128, 128), (4, 1, 1))
    (32, 256, 256)
    """
    block = _as_int3(block_shape, "block_shape", minimum=1)
    lcm = [1, 1, 1]
    for i, m in enumerate(multiples):
        axes = _as_int3(m, f"multiple #{i + 1}", minimum=1)
        lcm = [math.lcm(a, b) for a, b in zip(lcm, axes, strict=True)]
    z, y, x = (_round_up(b, m) for b, m in zip(block, lcm, strict=True))
    return (z, y, x)


@dataclass(frozen=True)
class Block:
    """One block of a :class:`BlockGrid`.

    Attributes
    ----------
    id : int
        Stable id: the C-order index of the block in the grid (``0 .. len(grid) - 1``).
    index : tuple of int
        Grid position (iz, iy, ix).
    write : tuple of slice
        Region this block owns and writes, in volume voxel coordinates.
    read : tuple of slice
        Region to read: ``write`` grown by the halo on every side, clipped to the volume.

    Examples
    --------
    >>> block = BlockGrid((10, 10, 10), block_shape=4, halo=1)[1]
    >>> block.index, block.write[2], block.read[2], block.crop[2], block.shape
    ((0, 0, 1), slice(4, 8, None), slice(3, 9, None), slice(1, 5, None), (4, 4, 4))
    """

    id: int
    index: Int3
    write: Region
    read: Region

    def __hash__(self) -> int:
        # slice objects are unhashable before Python 3.12; hash their bounds instead.
        return hash((self.id, self.index, _bounds(self.write), _bounds(self.read)))

    @property
    def crop(self) -> Region:
        """Slices that cut the write region out of an array covering the read region.

        Examples
        --------
        >>> volume = np.arange(1000).reshape(10, 10, 10)
        >>> block = BlockGrid(volume.shape, block_shape=4, halo=2)[5]
        >>> bool((volume[block.read][block.crop] == volume[block.write]).all())
        True
        """
        z, y, x = (
            slice(w.start - r.start, w.stop - r.start)
            for w, r in zip(self.write, self.read, strict=True)
        )
        return (z, y, x)

    @property
    def shape(self) -> Int3:
        """Shape of the write region (z, y, x)."""
        z, y, x = (s.stop - s.start for s in self.write)
        return (z, y, x)

    @property
    def read_shape(self) -> Int3:
        """Shape of the read region (z, y, x)."""
        z, y, x = (s.stop - s.start for s in self.read)
        return (z, y, x)


def _bounds(region: Region) -> tuple[tuple[int, int], ...]:
    return tuple((s.start, s.stop) for s in region)


@dataclass(frozen=True, init=False)
class BlockGrid:
    """A grid of blocks covering a 3D volume, with halo and storage alignment.

    Parameters
    ----------
    shape
        Volume shape (z, y, x); every axis at least 1. An int means a cube.
    block_shape
        Requested write-region shape; rounded up to a multiple of ``align`` per axis.
        It may exceed the volume (one block along that axis, clipped).
    halo
        Voxels of context added on every side of the write region to form the read region
        (an int or 3 ints, ``>= 0``). The read region is clipped to the volume.
    align
        Per-axis multiple for the block shape (an int or 3 ints, ``>= 1``); pass the lcm of
        the output's chunk or shard shape and the model stride, or use :meth:`for_storage`.

    Attributes
    ----------
    write_shape : tuple of int
        The aligned block shape: every block has exactly this shape except the last one
        along an axis, which is clipped to the volume.
    grid_shape : tuple of int
        Number of blocks along each axis.

    Raises
    ------
    ConfigError
        If a value has the wrong length or sign, or the volume has an empty axis.

    Examples
    --------
    >>> grid = BlockGrid((10, 20, 30), block_shape=(10, 8, 16), halo=2)
    >>> grid.grid_shape, len(grid)
    ((1, 3, 2), 6)
    >>> [b.shape for b in grid][:3]
    [(10, 8, 16), (10, 8, 14), (10, 8, 16)]
    >>> grid.block_at((0, 2, 1)).id
    5
    """

    shape: Int3
    block_shape: Int3
    halo: Int3
    align: Int3
    write_shape: Int3 = field(compare=False)
    grid_shape: Int3 = field(compare=False)

    def __init__(
        self,
        shape: Int3Like,
        block_shape: Int3Like,
        halo: Int3Like = 0,
        align: Int3Like = 1,
    ) -> None:
        vol = _as_int3(shape, "shape", minimum=0)
        if 0 in vol:
            raise ConfigError(f"volume has an empty axis: shape {vol}")
        block = _as_int3(block_shape, "block_shape", minimum=1)
        halo3 = _as_int3(halo, "halo", minimum=0)
        align3 = _as_int3(align, "align", minimum=1)
        write = aligned_block_shape(block, align3)
        gz, gy, gx = (-(-n // b) for n, b in zip(vol, write, strict=True))
        # Frozen dataclass: assign through object.__setattr__ once, here only.
        for name, value in (
            ("shape", vol),
            ("block_shape", block),
            ("halo", halo3),
            ("align", align3),
            ("write_shape", write),
            ("grid_shape", (gz, gy, gx)),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def for_storage(
        cls,
        shape: Int3Like,
        block_shape: Int3Like,
        chunks_or_shards: Int3Like,
        stride: Int3Like = 1,
        halo: Int3Like = 0,
    ) -> BlockGrid:
        """Make a grid whose blocks align to the output's chunks/shards and the model stride.

        Parameters
        ----------
        shape, block_shape, halo
            As for :class:`BlockGrid`.
        chunks_or_shards
            The output array's shard shape if it is sharded, else its chunk shape: the unit
            of one write, which must have exactly one writer.
        stride
            The model's output stride (an int or 3 ints).

        Examples
        --------
        >>> BlockGrid.for_storage((512, 512, 512), 100, chunks_or_shards=64, stride=8).write_shape
        (128, 128, 128)
        """
        align = aligned_block_shape(1, chunks_or_shards, stride)
        return cls(shape, block_shape, halo=halo, align=align)

    def __len__(self) -> int:
        gz, gy, gx = self.grid_shape
        return gz * gy * gx

    def __iter__(self) -> Iterator[Block]:
        """Yield the blocks in id (C) order."""
        for i, index in enumerate(itertools.product(*(range(g) for g in self.grid_shape))):
            yield self._make(i, (index[0], index[1], index[2]))

    def __getitem__(self, block_id: int) -> Block:
        """Return the block with this id (negative ids count from the end, like a list)."""
        i = operator.index(block_id)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block id {block_id} out of range for {n} blocks")
        iz, iy, ix = np.unravel_index(i, self.grid_shape)
        return self._make(i, (int(iz), int(iy), int(ix)))

    def block_at(self, index: Sequence[int]) -> Block:
        """Return the block at grid position ``index`` = (iz, iy, ix).

        Examples
        --------
        >>> BlockGrid((8, 8, 8), 4).block_at((1, 0, 1)).id
        5
        """
        idx = tuple(operator.index(i) for i in index)
        if len(idx) != 3 or not all(0 <= i < g for i, g in zip(idx, self.grid_shape)):
            raise IndexError(f"grid index {tuple(index)} out of range for {self.grid_shape}")
        i = int(np.ravel_multi_index(idx, self.grid_shape))
        return self._make(i, (idx[0], idx[1], idx[2]))

    def blocks_touching(self, region: Sequence[slice]) -> list[Block]:
        """Return the blocks whose write region overlaps ``region``, in id order.

        ``region`` is three slices in volume coordinates (``None`` bounds mean the volume
        edge, steps are not allowed); it is clipped to the volume.

        Examples
        --------
        >>> grid = BlockGrid((8, 8, 8), 4)
        >>> [b.id for b in grid.blocks_touching((slice(0, 1), slice(3, 5), slice(None)))]
        [0, 1, 2, 3]
        """
        if len(region) != 3:
            raise ValueError(f"region must have 3 slices, got {len(region)}")
        ranges = []
        for s, n, b in zip(region, self.shape, self.write_shape, strict=True):
            start, stop, step = s.indices(n)
            if step != 1:
                raise ValueError(f"region slices must have step 1, got {s}")
            if stop <= start:
                return []
            ranges.append(range(start // b, -(-stop // b)))
        return [self.block_at(idx) for idx in itertools.product(*ranges)]

    def _make(self, block_id: int, index: Int3) -> Block:
        write = []
        read = []
        for i, n, b, h in zip(index, self.shape, self.write_shape, self.halo, strict=True):
            start, stop = i * b, min((i + 1) * b, n)
            write.append(slice(start, stop))
            read.append(slice(max(0, start - h), min(n, stop + h)))
        return Block(
            id=block_id,
            index=index,
            write=(write[0], write[1], write[2]),
            read=(read[0], read[1], read[2]),
        )


def _json_default(obj: Any) -> Any:
    # Stages often pass numpy scalars/arrays or paths; hash their plain-JSON equivalent.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def layout_hash(grid: BlockGrid, **params: Any) -> str:
    """Return a stable digest of a grid's layout plus a stage's parameters.

    The digest covers the volume shape, the aligned block shape, the halo, the alignment
    and every keyword parameter. It is a sha256 over canonical JSON (sorted keys), so it is
    the same in every process and Python run. Two requested block shapes that align to the
    same ``write_shape`` give the same layout and therefore the same hash.

    Parameters
    ----------
    grid
        The block grid.
    **params
        JSON-serialisable parameters that change what a block produces (thresholds, model
        checksum, ...). numpy scalars/arrays and paths are accepted too.

    Returns
    -------
    str
        16 lowercase hex characters.

    Raises
    ------
    ConfigError
        If a parameter cannot be serialised to JSON.

    Examples
    --------
    >>> grid = BlockGrid((64, 64, 64), 32, halo=4)
    >>> h = layout_hash(grid, threshold=0.5)
    >>> len(h), h == layout_hash(grid, threshold=0.5), h == layout_hash(grid, threshold=0.6)
    (16, True, False)
    """
    payload = {
        "version": _LAYOUT_HASH_VERSION,
        "shape": list(grid.shape),
        "block_shape": list(grid.write_shape),
        "halo": list(grid.halo),
        "align": list(grid.align),
        "params": params,
    }
    try:
        text = json.dumps(
            payload, sort_keys=True, separators=(",", ":"), default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"layout parameters are not JSON-serialisable: {exc}") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class DoneMarkers:
    """Per-block done markers: a tiny Zarr v3 array, one uint8 per block (1 = done).

    The store records the layout hash in its attributes; :meth:`open` refuses a store made
    for another layout or other parameters unless ``overwrite=True``.

    Layout choice: a 1-D array of ``len(grid)`` bytes with ``chunks=(1,)`` and no sharding,
    so every block's marker is its own storage object (``c/<block id>``). Concurrent tasks
    marking different blocks therefore never write the same object (one writer per chunk),
    and a chunk of one element is written whole, without a read-modify-write. Sharding or
    bigger chunks would put several blocks in one object and lose marks under concurrency.
    Unwritten chunks read as the fill value 0 (not done), so a fresh store costs one small
    metadata file. Markers are only ever written as 1, so the set of stored chunk keys *is*
    the set of done blocks: :meth:`done_ids` lists keys instead of reading thousands of
    one-byte objects.

    The object holds only the path, the expected hash and the block count; the Zarr array is
    opened lazily in each process and not pickled, so it is cheap to send to Dask workers.
    Mark a block only after its output has been written.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> grid = BlockGrid((10, 10, 10), block_shape=5)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "done.zarr"
    >>> markers = DoneMarkers.open(path, grid, layout_hash(grid))
    >>> markers.mark_done(3)
    >>> markers.is_done(3), markers.count_done(), [b.id for b in markers.pending(grid)][:3]
    (True, 1, [0, 1, 2])
    """

    def __init__(self, path: str | os.PathLike[str], layout_hash: str, n_blocks: int) -> None:
        """Refer to an existing marker store without checking it; prefer :meth:`open`."""
        self.path = os.fspath(path)
        self.layout_hash = layout_hash
        self.n_blocks = int(n_blocks)
        self._array: Any = None  # zarr.Array, opened lazily per process

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        grid: BlockGrid,
        layout_hash: str,
        *,
        overwrite: bool = False,
    ) -> DoneMarkers:
        """Open the marker store at ``path``, creating it if missing.

        Parameters
        ----------
        path
            Where the marker array lives (a directory, or a URL zarr understands).
        grid
            The block grid; the store holds one marker per block.
        layout_hash
            :func:`layout_hash` of the grid and the stage parameters.
        overwrite
            Start again: delete whatever is at ``path`` and create an empty store, even if
            the existing one matches (the output is being rewritten from scratch).

        Raises
        ------
        OutputError
            If the store exists but was made for another layout or parameters, or ``path``
            holds something that is not a marker store, and ``overwrite`` is false.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "done.zarr"
        >>> grid = BlockGrid((8, 8, 8), 4)
        >>> DoneMarkers.open(path, grid, layout_hash(grid)).count_done()
        0
        >>> DoneMarkers.open(path, grid, layout_hash(grid, sigma=2.0))
        Traceback (most recent call last):
        ...
        neurotrace_dask.errors.OutputError: ...; use --overwrite to start again
        """
        import zarr

        markers = cls(path, layout_hash, len(grid))
        if not overwrite:
            try:
                existing = zarr.open_array(markers.path, mode="r", zarr_format=3)
            except FileNotFoundError as exc:  # incl. zarr's ArrayNotFoundError
                if _holds_something(markers.path):
                    raise OutputError(
                        f"{markers.path} exists and is not a done-marker store; "
                        "use --overwrite to start again"
                    ) from exc
                existing = None
            except Exception as exc:  # a group, Zarr v2, corrupt metadata, ...
                raise OutputError(
                    f"{markers.path} exists and is not a done-marker store ({exc}); "
                    "use --overwrite to start again"
                ) from exc
            if existing is not None:
                markers._check(existing)
                return markers
        try:
            markers._array = zarr.create_array(
                markers.path,
                shape=(markers.n_blocks,),
                chunks=(1,),  # one object per block: see the class docstring
                dtype="uint8",
                fill_value=0,
                compressors=None,  # a one-byte chunk does not compress
                filters=None,
                chunk_key_encoding={"name": "default", "separator": "/"},
                dimension_names=("block",),
                attributes={
                    _MARKER_ATTR: {
                        "layout_hash": layout_hash,
                        "n_blocks": markers.n_blocks,
                        "grid_shape": list(grid.grid_shape),
                    }
                },
                zarr_format=3,
                overwrite=overwrite,
            )
        except OSError as exc:
            raise OutputError(f"{markers.path}: cannot create done markers ({exc})") from exc
        return markers

    def __getstate__(self) -> dict[str, Any]:
        # Ship only the path and expectations; each process reopens the array itself.
        return {"path": self.path, "layout_hash": self.layout_hash, "n_blocks": self.n_blocks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["layout_hash"], state["n_blocks"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"DoneMarkers({self.path!r}, layout_hash={self.layout_hash!r}, "
            f"n_blocks={self.n_blocks})"
        )

    def mark_done(self, block: int | Block) -> None:
        """Record that a block's output is complete (safe from many processes at once).

        Examples
        --------
        >>> markers.mark_done(grid[0])  # doctest: +SKIP
        """
        i = self._index(block)
        self._zarr()[i] = 1

    def is_done(self, block: int | Block) -> bool:
        """Whether a block (id or :class:`Block`) is marked done."""
        i = self._index(block)
        return bool(self._zarr()[i])

    def done_ids(self) -> np.ndarray:
        """Return the ids of the done blocks, sorted, as an int64 array.

        Lists the store's chunk keys (one per done block) rather than reading each chunk.

        Examples
        --------
        >>> markers.done_ids()  # doctest: +SKIP
        array([0, 3])
        """
        arr = self._zarr()
        ids = _stored_chunk_ids(arr)
        if ids is None:  # unexpected keys: fall back to reading every marker
            return np.flatnonzero(arr[:]).astype(np.int64)
        ids = ids[(ids >= 0) & (ids < self.n_blocks)]
        return np.unique(ids)

    def count_done(self) -> int:
        """Number of blocks marked done."""
        return int(self.done_ids().size)

    def pending(self, grid: BlockGrid) -> list[Block]:
        """Blocks of ``grid`` not yet marked done, in id order.

        Examples
        --------
        >>> todo = markers.pending(grid)  # doctest: +SKIP
        """
        if len(grid) != self.n_blocks:
            raise OutputError(
                f"{self.path} has {self.n_blocks} block markers but the grid has "
                f"{len(grid)} blocks; use --overwrite to start again"
            )
        done = np.zeros(self.n_blocks, dtype=bool)
        done[self.done_ids()] = True
        return [grid[int(i)] for i in np.flatnonzero(~done)]

    @property
    def all_done(self) -> bool:
        """Whether every block is marked done (a property: ``if markers.all_done:``)."""
        return self.count_done() == self.n_blocks

    def _index(self, block: int | Block) -> int:
        i = block.id if isinstance(block, Block) else operator.index(block)
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block id {i} out of range for {self.n_blocks} blocks")
        return i

    def _zarr(self) -> Any:
        if self._array is None:
            import zarr

            try:
                arr = zarr.open_array(self.path, mode="r+", zarr_format=3)
            except FileNotFoundError as exc:
                raise OutputError(f"{self.path}: done-marker store is missing") from exc
            # Guard against a store reset for another layout since this object was made.
            self._check(arr)
            self._array = arr
        return self._array

    def _check(self, arr: Any) -> None:
        meta = arr.attrs.get(_MARKER_ATTR)
        if not isinstance(meta, dict):
            raise OutputError(
                f"{self.path} exists and is not a done-marker store; "
                "use --overwrite to start again"
            )
        old = meta.get("layout_hash")
        if old != self.layout_hash or tuple(arr.shape) != (self.n_blocks,):
            raise OutputError(
                f"{self.path} was made for a different block layout or parameters "
                f"(hash {old}, now {self.layout_hash}); use --overwrite to start again"
            )


def _holds_something(path: str) -> bool:
    """Whether a local ``path`` exists and is not an empty directory."""
    if "://" in path:
        return False  # remote: zarr already found no array there
    if os.path.isdir(path):
        return any(os.scandir(path))
    return os.path.exists(path)


def _stored_chunk_ids(arr: Any) -> np.ndarray | None:
    """Ids of the chunks stored for a 1-D ``chunks=(1,)`` array, from a key listing.

    Returns ``None`` if a key does not look like ``c/<int>`` so the caller can fall back.
    """
    # zarr's stores list keys asynchronously; zarr.core.sync.sync is how zarr's own
    # synchronous API drives them on its event loop.
    from zarr.core.sync import sync

    store = arr.store_path.store
    prefix = arr.store_path.path
    prefix = f"{prefix}/c/" if prefix else "c/"

    async def _list() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    ids = []
    for key in sync(_list()):
        tail = key[len(prefix) :] if key.startswith(prefix) else key
        if not tail.isdigit():
            return None
        ids.append(int(tail))
    return np.asarray(ids, dtype=np.int64)
