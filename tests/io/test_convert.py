"""Conversion to OME-Zarr: content, metadata, readers, resume, and refusals."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from neurotrace_dask.config import ConvertConfig
from neurotrace_dask.errors import InputError, OutputError
from neurotrace_dask.io.convert import convert, task_block_shape
from neurotrace_dask.io.omezarr import downsample_mean, is_complete, open_image, write_region


def _files(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_levels_content_and_metadata(tmp_path, tiff16, stack16, client):
    out = tmp_path / "img.ome.zarr"
    cfg = ConvertConfig(chunks=(8, 16, 16), shards=(16, 32, 32), levels=3, task_bytes=1 << 20)
    result = convert(tiff16, out, cfg, client=client)
    assert is_complete(out) and not Path(f"{out}.partial").exists()
    arrays, voxel_size = open_image(out)
    assert voxel_size == pytest.approx((2.0, 0.25, 0.25))
    np.testing.assert_array_equal(arrays[0][:], stack16)
    # Anisotropic voxels: y and x are halved first, z is kept.
    assert result.layout.factors[1] == (1, 2, 2)
    np.testing.assert_array_equal(arrays[1][:], downsample_mean(stack16, (1, 2, 2)))
    np.testing.assert_array_equal(arrays[2][:], downsample_mean(arrays[1][:], result.layout.factors[2]))
    assert arrays[0].shards == (16, 32, 32) and arrays[0].chunks == (8, 16, 16)
    assert arrays[0].metadata.dimension_names == ("z", "y", "x")
    codec = arrays[0].compressors[0]
    assert codec.cname.value == "zstd"


def test_ngff_readers_accept_it(tmp_path, tiff16, client):
    out = tmp_path / "img.ome.zarr"
    convert(tiff16, out, ConvertConfig(levels=2), client=client)
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image

    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["ome"]["version"] == "0.5"
    image = Image.from_zarr(group)  # validates against the NGFF 0.5 models
    assert [a.name for a in image.attributes.ome.multiscales[0].axes] == ["z", "y", "x"]
    node = next(iter(Reader(parse_url(str(out)))()))
    assert [tuple(level.shape) for level in node.data] == [(20, 70, 90), (20, 35, 45)]
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale == pytest.approx([2.0, 0.25, 0.25])


def test_deterministic_bytes(tmp_path, tiff16, client):
    cfg = ConvertConfig(chunks=(8, 32, 32), levels=2, task_bytes=1 << 20)
    convert(tiff16, tmp_path / "a.ome.zarr", cfg, client=client)
    convert(tiff16, tmp_path / "b.ome.zarr", cfg, client=client)
    assert _files(tmp_path / "a.ome.zarr") == _files(tmp_path / "b.ome.zarr")


def test_existing_output_kept_without_overwrite(tmp_path, tiff16, client):
    out = tmp_path / "img.ome.zarr"
    convert(tiff16, out, ConvertConfig(levels=1), client=client)
    before = _files(out)
    with pytest.raises(OutputError, match="exists already; pass --overwrite"):
        convert(tiff16, out, ConvertConfig(levels=2), client=client)
    assert _files(out) == before
    convert(tiff16, out, ConvertConfig(levels=2, overwrite=True), client=client)
    assert len(open_image(out)[0]) == 2


def test_output_inside_input_folder(tmp_path, client):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"{i}.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(OutputError, match="inside the input"):
        convert(folder, folder / "out.ome.zarr", client=client)
    assert sorted(os.listdir(folder)) == ["0.tif", "1.tif", "2.tif"]


def test_refuses_to_replace_a_non_zarr_folder(tmp_path, tiff16, client):
    out = tmp_path / "results"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a Zarr store"):
        convert(tiff16, out, ConvertConfig(overwrite=True), client=client)
    assert (out / "precious.txt").read_text() == "keep me"


def test_float_input_needs_rescale(tmp_path, client):
    data = np.linspace(-1.0, 3.0, 4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with pytest.raises(InputError, match="float32 is not supported.*--rescale"):
        convert(path, tmp_path / "o.ome.zarr", client=client)
    convert(path, tmp_path / "o.ome.zarr", ConvertConfig(rescale="uint8", levels=1), client=client)
    level0 = open_image(tmp_path / "o.ome.zarr")[0][0][:]
    assert level0.dtype == np.uint8 and level0.min() == 0 and level0.max() == 255
    np.testing.assert_array_equal(level0, np.rint((data - -1.0) * 255 / 4.0).astype(np.uint8))


def test_nan_input_refused(tmp_path, client):
    data = np.ones((4, 16, 16), np.float32)
    data[2, 3, 4] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with pytest.raises(InputError, match="NaN or Inf"):
        convert(path, tmp_path / "o.ome.zarr", ConvertConfig(rescale="uint16"), client=client)
    assert not (tmp_path / "o.ome.zarr").exists()


def test_interrupted_conversion_resumes(tmp_path, client):
    folder = tmp_path / "slices"
    folder.mkdir()
    data = np.random.default_rng(3).integers(0, 255, (40, 128, 128), dtype=np.uint8)
    for i, plane in enumerate(data):
        tifffile.imwrite(folder / f"s{i}.tif", plane)
    # 10 level-0 tasks of 4 slices: more than the 8 in flight, so some finish before the last starts.
    cfg = ConvertConfig(chunks=(2, 128, 128), levels=2, task_bytes=1 << 16)
    out = tmp_path / "o.ome.zarr"
    # Open the input first, then break the last slice: the run fails part-way through.
    last = folder / "s39.tif"
    good = last.read_bytes()
    from neurotrace_dask.io import convert as convert_module

    real_open = convert_module.open_volume

    def open_then_break(*args, **kwargs):
        source = real_open(*args, **kwargs)
        last.write_bytes(b"II*\x00garbage")
        return source

    convert_module.open_volume = open_then_break
    try:
        with pytest.raises(InputError, match="s39.tif: cannot read slice"):
            convert(folder, out, cfg, client=client)
    finally:
        convert_module.open_volume = real_open
    assert not out.exists()
    assert not is_complete(f"{out}.partial")
    last.write_bytes(good)
    with pytest.raises(OutputError, match="interrupted conversion"):
        convert(folder, out, ConvertConfig(chunks=(4, 16, 16), levels=2), client=client)
    result = convert(folder, out, cfg, client=client)
    np.testing.assert_array_equal(open_image(out)[0][0][:], data)
    fresh_run = convert(folder, tmp_path / "fresh.ome.zarr", cfg, client=client)
    assert result.blocks_skipped >= 2
    assert result.blocks_written + result.blocks_skipped == fresh_run.blocks_written
    assert _files(tmp_path / "fresh.ome.zarr").keys() == _files(out).keys()
    fresh, resumed = _files(tmp_path / "fresh.ome.zarr"), _files(out)
    assert {k: v for k, v in fresh.items() if k != "zarr.json"} == {k: v for k, v in resumed.items() if k != "zarr.json"}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (3, 1, 4), (1, 1, 1)])
def test_downsample_mean_is_the_rounded_window_mean(dtype, factors):
    """Every window's mean (partial windows at the far edges), rounded half up for integers."""
    rng = np.random.default_rng(1)
    block = rng.integers(0, 256 if dtype == np.uint8 else 40000, (5, 7, 9)).astype(dtype)
    out = downsample_mean(block, factors)
    assert out.dtype == block.dtype and out.shape == tuple(-(-n // f) for n, f in zip(block.shape, factors))
    for index in np.ndindex(*out.shape):
        window = block[tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors))].astype(np.float64)
        mean = window.sum() / window.size
        if block.dtype.kind == "f":
            assert np.isclose(out[index], mean, rtol=1e-6), index
        else:
            assert out[index] == np.floor(mean + 0.5), index


@pytest.mark.parametrize("shards", [None, (8, 16, 16)])
@pytest.mark.parametrize("region", [(slice(0, 16), slice(0, 32), slice(0, 40)), (slice(3, 13), slice(5, 30), slice(7, 38))])
@pytest.mark.parametrize("background", ["zero", "offset", "alternating"])
def test_write_region_stores_what_assignment_stores(tmp_path, shards, region, background):
    # Same objects, same bytes: all-zero chunks stay unstored, the others are written alike.
    shape = [s.stop - s.start for s in region]
    data = {"zero": np.zeros(shape, np.uint16), "offset": np.ones(shape, np.uint16),
            "alternating": (np.arange(np.prod(shape)) % 2).reshape(shape).astype(np.uint16)}[background]  # fmt: skip
    data[:2, :3, :4] = 7  # signal in one corner
    stores = []
    for name in ("plain", "fast"):
        array = zarr.create_array(tmp_path / name, shape=(16, 32, 40), chunks=(4, 8, 8), shards=shards,
                                  dtype="uint16", fill_value=0)  # fmt: skip
        if name == "plain":
            array[region] = data
        else:
            write_region(array, region, data)
        stores.append(_files(tmp_path / name))
    assert stores[0] == stores[1]


def test_local_convert_runs_threads_unless_told():
    from neurotrace_dask.config import ClusterConfig, LocalClusterConfig
    from neurotrace_dask.io.convert import _threaded

    assert _threaded(None).local.processes is False
    assert _threaded(ClusterConfig(local=LocalClusterConfig(processes=True))).local.processes is True
    assert _threaded(ClusterConfig(kind="address", address="tcp://h:8786")).local.processes is None


def test_task_blocks_are_bounded():
    # Whole-brain plane, uint16: one task stays near the byte budget whatever the volume size.
    for shape in [(100, 2000, 2000), (20000, 40000, 30000)]:
        block = task_block_shape(shape, (64, 128, 128), 2, 64 << 20)
        assert np.prod(block) * 2 <= 64 << 20
        assert all(b % u == 0 for b, u in zip(block, (64, 128, 128)))


@pytest.mark.parametrize(
    "task_bytes, shards, built",
    [(1 << 16, None, 2), (1 << 18, None, 2), (1 << 16, (16, 64, 64), 1), (1 << 20, (16, 64, 64), 2)],
)
def test_pyramid_equals_whole_volume_pyramid(tmp_path, client, task_bytes, shards, built):
    # However the levels are split between in-task building and later passes, and with many
    # tasks writing to one sharded store, every level equals the mean pyramid of the whole volume.
    from neurotrace_dask.io.convert import plan_tasks
    from neurotrace_dask.io.omezarr import plan_layout

    data = np.random.default_rng(5).integers(0, 60000, (33, 150, 141)).astype(np.uint16)
    path = tmp_path / "in.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    cfg = ConvertConfig(chunks=(8, 32, 32), shards=shards, levels=4, voxel_size=(1.0, 0.5, 0.5), task_bytes=task_bytes)
    layout = plan_layout(data.shape, data.dtype, (1.0, 0.5, 0.5), levels=4, chunks=(8, 32, 32), shards=shards)
    in_task_levels, grids = plan_tasks(layout, task_bytes)
    assert in_task_levels == built and len(grids[0]) > 1  # levels built in tasks and by passes, many writers
    result = convert(path, tmp_path / "o.ome.zarr", cfg, client=client)
    arrays, _ = open_image(tmp_path / "o.ome.zarr")
    expected = data
    for level, array in enumerate(arrays):
        if level:
            expected = downsample_mean(expected, result.layout.factors[level])
        assert array.shards == layout.shards[level]
        np.testing.assert_array_equal(array[:], expected, err_msg=f"level {level}")


def test_big_endian_input_is_uint16(tmp_path, stack16, client):
    import h5py

    path = tmp_path / "be.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = stack16.astype(">u2")
    convert(f"{path}:raw", tmp_path / "o.ome.zarr", ConvertConfig(levels=1), client=client)
    level0 = open_image(tmp_path / "o.ome.zarr")[0][0]
    assert level0.dtype == np.uint16
    np.testing.assert_array_equal(level0[:], stack16)


@pytest.mark.parametrize("dtype", [bool, np.complex64])
def test_non_intensity_dtypes_refused_even_with_rescale(tmp_path, client, dtype):
    path = tmp_path / "weird.zarr"
    zarr.create_array(str(path), data=np.zeros((4, 8, 8), dtype))
    with pytest.raises(InputError, match="not an image intensity type"):
        convert(path, tmp_path / "o.ome.zarr", ConvertConfig(rescale="uint8"), client=client)


def test_foreign_partial_folder_is_kept(tmp_path, tiff16, client):
    partial = tmp_path / "img.ome.zarr.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by neurotrace"):
        convert(tiff16, tmp_path / "img.ome.zarr", ConvertConfig(overwrite=True), client=client)
    assert (partial / "notes.txt").read_text() == "mine"


def test_replacing_output_touches_nothing_else(tmp_path, tiff16, client):
    out = tmp_path / "img.ome.zarr"
    neighbour = tmp_path / "img.ome.zarr.old"
    neighbour.mkdir()
    (neighbour / "notes.txt").write_text("mine")
    convert(tiff16, out, ConvertConfig(levels=1), client=client)
    convert(tiff16, out, ConvertConfig(levels=2, overwrite=True), client=client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.ome.zarr", "img.ome.zarr.old", "stack.tif"]
    assert (neighbour / "notes.txt").read_text() == "mine"


def test_missing_z_spacing_is_said(tmp_path, stack16, client):
    path = tmp_path / "cm.tif"
    tifffile.imwrite(path, stack16, photometric="minisblack", resolution=(2e4, 2e4), resolutionunit=3)
    result = convert(path, tmp_path / "o.ome.zarr", ConvertConfig(levels=1), client=client)
    assert result.layout.voxel_sizes[0] == pytest.approx((1.0, 0.5, 0.5))
    assert any("no z spacing" in note for note in result.notes)


def test_shards_must_fit_the_chunks(tmp_path, tiff16, client):
    from neurotrace_dask.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of the chunks"):
        convert(tiff16, tmp_path / "o.ome.zarr", ConvertConfig(shards=(8, 32, 32)), client=client)
