"""Tests for neurotrace_dask.blocks: grid geometry, layout hash, done markers."""

from __future__ import annotations

import doctest
import math
import multiprocessing
import os
import pickle
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from neurotrace_dask import blocks
from neurotrace_dask.blocks import (
    Block,
    BlockGrid,
    DoneMarkers,
    aligned_block_shape,
    layout_hash,
)
from neurotrace_dask.errors import ConfigError, OutputError

axis3 = st.tuples

shapes = axis3(*[st.integers(1, 60)] * 3)
block_shapes = axis3(*[st.integers(1, 40)] * 3)
halos = st.one_of(st.integers(0, 5), axis3(*[st.integers(0, 5)] * 3))
aligns = st.one_of(st.integers(1, 8), axis3(*[st.integers(1, 8)] * 3))


def _grid(shape, block, halo, align) -> BlockGrid:
    grid = BlockGrid(shape, block, halo=halo, align=align)
    assume(len(grid) <= 3000)  # keep each example fast
    return grid


def _as3(v):
    return (v, v, v) if isinstance(v, int) else tuple(v)


# --------------------------------------------------------------------------- geometry


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(shapes, block_shapes, halos, aligns)
def test_grid_geometry(shape, block, halo, align):
    grid = _grid(shape, block, halo, align)
    halo3, align3 = _as3(halo), _as3(align)
    ws = grid.write_shape
    assert ws == tuple(-(-b // a) * a for b, a in zip(block, align3))
    assert grid.grid_shape == tuple(math.ceil(n / w) for n, w in zip(shape, ws))

    volume = np.arange(math.prod(shape)).reshape(shape)
    counter = np.zeros(shape, dtype=np.int32)
    blocks_seen = list(grid)
    assert [b.id for b in blocks_seen] == list(range(len(grid)))
    assert [b.index for b in blocks_seen] == list(np.ndindex(*grid.grid_shape))

    for b in blocks_seen:
        assert grid[b.id] == b
        assert grid.block_at(b.index) == b
        counter[b.write] += 1
        for w, r, n, h, size, i, g in zip(
            b.write, b.read, shape, halo3, ws, b.index, grid.grid_shape
        ):
            # write inside read; read = write grown by halo, clipped to [0, n)
            assert r.start <= w.start < w.stop <= r.stop
            assert r.start == max(0, w.start - h) and r.stop == min(n, w.stop + h)
            # starts on the aligned block grid; full size except possibly the last
            assert w.start % size == 0 and w.start == i * size
            if i < g - 1:
                assert w.stop - w.start == size
            else:
                assert w.stop == n and 0 < w.stop - w.start <= size
        assert b.shape == tuple(s.stop - s.start for s in b.write)
        read_data = volume[b.read]
        assert read_data.shape == b.read_shape
        np.testing.assert_array_equal(read_data[b.crop], volume[b.write])
    assert (counter == 1).all()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(shapes, block_shapes, aligns, st.data())
def test_blocks_touching(shape, block, align, data):
    grid = _grid(shape, block, 0, align)
    region = tuple(
        slice(*sorted(data.draw(st.tuples(st.integers(0, n), st.integers(0, n)))))
        for n in shape
    )
    expected = [
        b.id
        for b in grid
        if all(max(w.start, r.start) < min(w.stop, r.stop) for w, r in zip(b.write, region))
    ]
    assert [b.id for b in grid.blocks_touching(region)] == expected


def test_block_larger_than_volume_is_one_clipped_block():
    grid = BlockGrid((5, 7, 9), 100, halo=3, align=64)
    assert grid.write_shape == (128, 128, 128)
    assert len(grid) == 1 and grid.grid_shape == (1, 1, 1)
    (b,) = list(grid)
    assert b.write == b.read == (slice(0, 5), slice(0, 7), slice(0, 9))
    assert b.crop == (slice(0, 5), slice(0, 7), slice(0, 9))


def test_getitem_and_block_at_bounds():
    grid = BlockGrid((8, 8, 8), 4)
    assert grid[-1] == grid[7] and grid[np.int64(3)].id == 3
    with pytest.raises(IndexError):
        grid[8]
    with pytest.raises(IndexError):
        grid.block_at((2, 0, 0))


def test_grid_and_block_are_hashable_and_picklable():
    grid = BlockGrid((8, 8, 8), 4, halo=1)
    assert pickle.loads(pickle.dumps(grid)) == grid
    assert hash(grid) == hash(BlockGrid((8, 8, 8), (4, 4, 4), halo=(1, 1, 1)))
    assert len(set(grid) | set(grid)) == len(grid)
    assert pickle.loads(pickle.dumps(grid[3])) == grid[3]
    assert isinstance(grid[3], Block)
    with pytest.raises(AttributeError):
        grid.halo = (0, 0, 0)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("block", "multiples", "expected"),
    [
        (100, (64, 8), (128, 128, 128)),
        (128, (64, 8), (128, 128, 128)),
        (100, (), (100, 100, 100)),
        ((30, 256, 256), ((1, 128, 128), (4, 1, 1)), (32, 256, 256)),
        ((1, 1, 1), ((6, 4, 3), 2), (6, 4, 6)),
        ((100, 100, 100), ((1, 96, 96), 16), (112, 192, 192)),
    ],
)
def test_aligned_block_shape(block, multiples, expected):
    assert aligned_block_shape(block, *multiples) == expected


def test_for_storage():
    grid = BlockGrid.for_storage((300, 300, 300), 100, (1, 64, 64), stride=(1, 8, 8), halo=4)
    assert grid.align == (1, 64, 64)
    assert grid.write_shape == (100, 128, 128)
    assert grid.halo == (4, 4, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shape=(0, 10, 10), block_shape=4),
        dict(shape=(-1, 10, 10), block_shape=4),
        dict(shape=(10, 10), block_shape=4),
        dict(shape=(10, 10, 10, 10), block_shape=4),
        dict(shape=(10, 10, 10), block_shape=0),
        dict(shape=(10, 10, 10), block_shape=(4, -4, 4)),
        dict(shape=(10, 10, 10), block_shape=(4, 4)),
        dict(shape=(10, 10, 10), block_shape=4.5),
        dict(shape=(10, 10, 10), block_shape="444"),
        dict(shape=(10, 10, 10), block_shape=4, halo=-1),
        dict(shape=(10, 10, 10), block_shape=4, halo=(1, 1)),
        dict(shape=(10, 10, 10), block_shape=4, align=0),
        dict(shape=(10, 10, 10), block_shape=4, align=(1, 2, 0)),
        dict(shape=(10, 10, 10), block_shape=True),
    ],
)
def test_validation_errors(kwargs):
    with pytest.raises(ConfigError) as info:
        BlockGrid(**kwargs)
    assert "\n" not in str(info.value)


def test_empty_axis_message():
    with pytest.raises(ConfigError, match="volume has an empty axis"):
        BlockGrid((10, 0, 10), 4)


def test_aligned_block_shape_validation():
    with pytest.raises(ConfigError):
        aligned_block_shape(0, 8)
    with pytest.raises(ConfigError):
        aligned_block_shape(16, (8, 8))
    with pytest.raises(ConfigError):
        aligned_block_shape(16, 0)


# --------------------------------------------------------------------------- layout hash

_HASH_ARGS = dict(shape=(40, 50, 60), block_shape=(16, 16, 16), halo=2, align=(1, 8, 8))
_HASH_PARAMS = dict(threshold=0.25, model={"name": "unet", "sha": "abc"}, sigmas=[1, 2])


def test_layout_hash_stable_in_process():
    h = layout_hash(BlockGrid(**_HASH_ARGS), **_HASH_PARAMS)
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)
    assert h == layout_hash(BlockGrid(**_HASH_ARGS), **dict(reversed(_HASH_PARAMS.items())))
    # numpy scalars hash like the plain values they stand for
    assert h == layout_hash(
        BlockGrid(**_HASH_ARGS),
        threshold=np.float64(0.25),
        model={"sha": "abc", "name": "unet"},
        sigmas=np.array([1, 2]),
    )


def test_layout_hash_stable_across_processes():
    h = layout_hash(BlockGrid(**_HASH_ARGS), **_HASH_PARAMS)
    code = (
        "from neurotrace_dask.blocks import BlockGrid, layout_hash;"
        f"print(layout_hash(BlockGrid(**{_HASH_ARGS!r}), **{_HASH_PARAMS!r}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # prove no dependence on hash()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == h


@pytest.mark.parametrize(
    ("change", "params"),
    [
        (dict(shape=(41, 50, 60)), _HASH_PARAMS),
        (dict(block_shape=(16, 24, 16)), _HASH_PARAMS),
        (dict(halo=3), _HASH_PARAMS),
        (dict(halo=(2, 2, 3)), _HASH_PARAMS),
        (dict(align=(1, 8, 16)), _HASH_PARAMS),
        ({}, dict(_HASH_PARAMS, threshold=0.26)),
        ({}, dict(_HASH_PARAMS, extra=None)),
        ({}, {k: v for k, v in _HASH_PARAMS.items() if k != "sigmas"}),
        ({}, dict(_HASH_PARAMS, model={"name": "unet", "sha": "abd"})),
    ],
)
def test_layout_hash_changes(change, params):
    base = layout_hash(BlockGrid(**_HASH_ARGS), **_HASH_PARAMS)
    assert layout_hash(BlockGrid(**dict(_HASH_ARGS, **change)), **params) != base


def test_layout_hash_rejects_unserialisable():
    with pytest.raises(ConfigError, match="JSON"):
        layout_hash(BlockGrid(8, 4), fn=object())


# --------------------------------------------------------------------------- done markers


@pytest.fixture
def grid() -> BlockGrid:
    return BlockGrid((20, 20, 20), 5)  # 64 blocks


def test_markers_roundtrip(tmp_path, grid):
    path = tmp_path / "done.zarr"
    h = layout_hash(grid, p=1)
    markers = DoneMarkers.open(path, grid, h)
    assert markers.count_done() == 0 and not markers.all_done
    assert markers.done_ids().size == 0
    assert [b.id for b in markers.pending(grid)] == list(range(len(grid)))

    for i in (0, 5, 63):
        markers.mark_done(i)
    markers.mark_done(grid[7])  # a Block works too
    markers.mark_done(5)  # idempotent
    assert markers.is_done(5) and markers.is_done(grid[7]) and not markers.is_done(6)

    again = DoneMarkers.open(str(path), grid, h)
    np.testing.assert_array_equal(again.done_ids(), [0, 5, 7, 63])
    assert again.count_done() == 4
    assert [b.id for b in again.pending(grid)] == [
        i for i in range(len(grid)) if i not in {0, 5, 7, 63}
    ]
    for b in again.pending(grid):
        again.mark_done(b)
    assert again.all_done and again.pending(grid) == []

    with pytest.raises(IndexError):
        again.mark_done(len(grid))


def test_markers_refuse_other_layout(tmp_path, grid):
    path = tmp_path / "done.zarr"
    markers = DoneMarkers.open(path, grid, layout_hash(grid, p=1))
    markers.mark_done(3)
    new_hash = layout_hash(grid, p=2)
    with pytest.raises(OutputError, match="--overwrite") as info:
        DoneMarkers.open(path, grid, new_hash)
    msg = str(info.value)
    assert str(path) in msg and new_hash in msg and markers.layout_hash in msg
    assert "\n" not in msg
    # a different number of blocks is refused too, even with the same hash string
    with pytest.raises(OutputError, match="--overwrite"):
        DoneMarkers.open(path, BlockGrid((20, 20, 20), 10), markers.layout_hash)
    # the refused open changed nothing
    assert DoneMarkers.open(path, grid, markers.layout_hash).done_ids().tolist() == [3]


def test_markers_overwrite_resets(tmp_path, grid):
    path = tmp_path / "done.zarr"
    old = DoneMarkers.open(path, grid, layout_hash(grid, p=1))
    old.mark_done(3)
    new_hash = layout_hash(grid, p=2)
    fresh = DoneMarkers.open(path, grid, new_hash, overwrite=True)
    assert fresh.count_done() == 0
    assert DoneMarkers.open(path, grid, new_hash).count_done() == 0
    # overwrite resets even a matching store: the output is being redone from scratch
    fresh.mark_done(1)
    assert DoneMarkers.open(path, grid, new_hash, overwrite=True).count_done() == 0
    # a stale object made for the old layout refuses to mark the reset store
    stale = DoneMarkers(path, old.layout_hash, len(grid))
    with pytest.raises(OutputError, match="different block layout"):
        stale.mark_done(0)


def test_markers_refuse_foreign_path(tmp_path, grid):
    import zarr

    h = layout_hash(grid)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a done-marker store"):
        DoneMarkers.open(junk, grid, h)
    other = tmp_path / "other.zarr"
    zarr.create_array(other, shape=(len(grid),), dtype="uint8", zarr_format=3)
    with pytest.raises(OutputError, match="not a done-marker store"):
        DoneMarkers.open(other, grid, h)
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    with pytest.raises(OutputError, match="--overwrite"):
        DoneMarkers.open(tmp_path / "group.zarr", grid, h)
    assert DoneMarkers.open(junk, grid, h, overwrite=True).count_done() == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert DoneMarkers.open(empty, grid, h).count_done() == 0


def test_markers_pending_checks_grid(tmp_path, grid):
    markers = DoneMarkers.open(tmp_path / "done.zarr", grid, layout_hash(grid))
    with pytest.raises(OutputError):
        markers.pending(BlockGrid((20, 20, 20), 10))


def test_markers_pickle(tmp_path, grid):
    path = tmp_path / "done.zarr"
    markers = DoneMarkers.open(path, grid, layout_hash(grid))
    markers.mark_done(2)  # opens and caches the zarr array in this process
    payload = pickle.dumps(markers)
    assert len(payload) < 500  # path + hash + count, no zarr array
    clone = pickle.loads(payload)
    assert clone.is_done(2)
    clone.mark_done(9)
    assert markers.done_ids().tolist() == [2, 9]


def test_markers_concurrent_processes(tmp_path):
    grid = BlockGrid((8, 20, 20), (8, 5, 2))  # 40 blocks
    assert len(grid) == 40
    markers = DoneMarkers.open(tmp_path / "done.zarr", grid, layout_hash(grid))
    ctx = multiprocessing.get_context("spawn")  # separate processes, like Dask workers
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        # chunksize=1 interleaves ids across the two workers; each task unpickles markers
        list(pool.map(markers.mark_done, range(40), chunksize=1))
    assert markers.done_ids().tolist() == list(range(40))
    assert markers.all_done


def test_done_ids_falls_back_to_reading(tmp_path, grid, monkeypatch):
    markers = DoneMarkers.open(tmp_path / "done.zarr", grid, layout_hash(grid))
    for i in (4, 8):
        markers.mark_done(i)
    monkeypatch.setattr(blocks, "_stored_chunk_ids", lambda arr: None)
    assert markers.done_ids().tolist() == [4, 8]


# --------------------------------------------------------------------------- docs


def test_docstring_examples():
    result = doctest.testmod(blocks, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10 and result.failed == 0
