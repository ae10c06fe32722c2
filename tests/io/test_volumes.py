"""Opening every supported input kind, and the one-line errors for bad ones."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from neurotrace_dask.errors import InputError
from neurotrace_dask.io.volumes import open_volume

REGION = (slice(2, 9), slice(5, 40), slice(0, 33))


def test_imagej_tiff_with_voxel_size(tiff16, stack16):
    source = open_volume(tiff16)
    assert source.shape == stack16.shape and source.dtype == "uint16"
    assert source.voxel_size == pytest.approx((2.0, 0.25, 0.25))
    np.testing.assert_array_equal(source.read(REGION), stack16[REGION])


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_bigtiff_and_compressed(tmp_path, stack16, compression):
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, stack16, bigtiff=True, compression=compression, tile=(32, 32) if compression else None)
    np.testing.assert_array_equal(open_volume(path).read(REGION), stack16[REGION])


def test_big_endian_tiff(tmp_path, stack16):
    path = tmp_path / "be.tif"
    tifffile.imwrite(path, stack16, byteorder=">")
    data = open_volume(path).read(REGION)
    assert data.dtype == np.dtype("uint16") and data.dtype.isnative
    np.testing.assert_array_equal(data, stack16[REGION])


def test_ome_tiff_voxel_size(tmp_path, stack16):
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, stack16, metadata={"axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3,
                                              "PhysicalSizeZ": 1.5, "PhysicalSizeZUnit": "nm"})
    assert open_volume(path).voxel_size == pytest.approx((1.5e-3, 0.3, 0.3))


def test_hyperstack_channel(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (6, 3, 20, 24), dtype=np.uint8)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(InputError, match=r"has 3 channels; choose one with --channel \(0-2\)"):
        open_volume(path)
    np.testing.assert_array_equal(open_volume(path, channel=2).read((slice(0, 6), slice(0, 20), slice(0, 24))),
                                  data[:, 2])
    with pytest.raises(InputError, match="out of range"):
        open_volume(path, channel=3)


def test_rgb_needs_channel(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, data, photometric="rgb")
    with pytest.raises(InputError, match="colour samples"):
        open_volume(path)
    np.testing.assert_array_equal(open_volume(path, channel=1).read((slice(0, 4), slice(0, 16), slice(0, 16))),
                                  data[..., 1])


def test_time_series_refused(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, np.zeros((3, 4, 8, 8), np.uint8), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(InputError, match="time series"):
        open_volume(path)


def test_2d_input_is_one_slice(tmp_path):
    plane = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10)
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, plane)
    source = open_volume(path)
    assert source.shape == (1, 12, 10)
    assert any("one z-slice" in note for note in source.notes)
    np.testing.assert_array_equal(source.read((slice(0, 1), slice(0, 12), slice(0, 10)))[0], plane)


def test_slices_natural_order(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(12):
        tifffile.imwrite(folder / f"img_{i}.tif", np.full((8, 9), i, np.uint8))
    (folder / "notes.txt").write_text("not a slice")
    source = open_volume(folder)
    assert source.shape == (12, 8, 9)
    assert list(source.read((slice(0, 12), slice(0, 1), slice(0, 1))).ravel()) == list(range(12))


def test_slices_of_different_shapes_name_the_file(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(5):
        tifffile.imwrite(folder / f"{i}.tif", np.zeros((8, 9 if i != 3 else 10), np.uint8))
    with pytest.raises(InputError, match=r"3\.tif: slice is \(8, 10\)"):
        open_volume(folder)


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no .tif"):
        open_volume(tmp_path)


def test_hdf5(tmp_path, stack16):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("vol/raw", data=stack16).attrs["element_size_um"] = [1.0, 0.2, 0.2]
        f.create_dataset("other", data=np.zeros((4, 4, 4), np.uint8))
    source = open_volume(f"{path}:/vol/raw")
    assert source.voxel_size == (1.0, 0.2, 0.2)
    np.testing.assert_array_equal(source.read(REGION), stack16[REGION])
    with pytest.raises(InputError, match="name the dataset"):
        open_volume(path)
    with pytest.raises(InputError, match="no dataset 'missing'"):
        open_volume(f"{path}:missing")


def test_zarr_array(tmp_path, stack16):
    path = tmp_path / "a.zarr"
    zarr.create_array(str(path), data=stack16, chunks=(5, 32, 32))
    np.testing.assert_array_equal(open_volume(path).read(REGION), stack16[REGION])


def test_zero_sized_axis(tmp_path):
    path = tmp_path / "empty.zarr"
    zarr.create_array(str(path), shape=(0, 8, 8), dtype="uint8")
    with pytest.raises(InputError, match="empty axis"):
        open_volume(path)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: p.write_bytes(b"GIF89a not an image at all"), "not a TIFF, HDF5 or Zarr"),
        (lambda p: p.write_bytes(b"II*\x00\xff\xff\xff\x7f" + b"\x00" * 20), "TIFF"),
    ],
)
def test_bad_files(tmp_path, make, needle):
    path = tmp_path / "input.tif"
    make(path)
    with pytest.raises(InputError) as info:
        open_volume(path)
    assert needle in str(info.value) and "input.tif" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff(tmp_path, stack16, compression):
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, stack16, compression=compression)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(InputError, match="cut.tif: .*truncated"):
        open_volume(cut)


def test_extra_axis_is_refused_not_dropped(tmp_path):
    path = tmp_path / "angles.tif"
    tifffile.imwrite(path, np.zeros((3, 5, 16, 16), np.uint8), photometric="minisblack", metadata={"axes": "AZYX"})
    with pytest.raises(InputError, match="axis A has 3 entries"):
        open_volume(path)


def test_pages_written_one_by_one_read_as_a_stack(tmp_path):
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        for i in range(6):
            tif.write(np.full((16, 16), i, np.uint8), contiguous=False)
    source = open_volume(path)
    assert source.shape == (6, 16, 16)
    assert list(source.read((slice(1, 6), slice(0, 1), slice(0, 1))).ravel()) == [1, 2, 3, 4, 5]


def test_page_of_another_shape_is_named(tmp_path):
    path = tmp_path / "odd.tif"
    with tifffile.TiffWriter(path) as tif:
        for i in range(6):
            tif.write(np.zeros((16, 17) if i == 4 else (16, 16), np.uint8), contiguous=False)
    with pytest.raises(InputError, match="odd.tif: pages differ from page 4"):
        open_volume(path)


def test_resolution_tags(tmp_path):
    dpi = tmp_path / "dpi.tif"
    tifffile.imwrite(dpi, np.zeros((3, 8, 8), np.uint8), photometric="minisblack", resolution=(72, 72),
                     resolutionunit=2)
    assert open_volume(dpi).voxel_size is None  # screen dpi, not a calibration
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, np.zeros((3, 8, 8), np.uint8), photometric="minisblack", resolution=(2e4, 2e4),
                     resolutionunit=3)
    source = open_volume(cm)
    assert source.voxel_size == pytest.approx((1.0, 0.5, 0.5)) and not source.z_spacing_known


def test_ome_zarr_input_units(tmp_path):
    group = zarr.open_group(str(tmp_path / "nm.zarr"), mode="w")
    group.create_array("0", data=np.zeros((4, 8, 8), np.uint8))
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    scale = [{"type": "scale", "scale": [1000, 300, 300]}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [
        {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": scale}]}]}
    assert open_volume(tmp_path / "nm.zarr").voxel_size == pytest.approx((1.0, 0.3, 0.3))
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": ["z", "y", "x"], "datasets": [{"path": "7"}]}]}
    with pytest.raises(InputError, match="names level '7'"):
        open_volume(tmp_path / "nm.zarr")
    group.attrs["ome"] = {"version": "0.5", "multiscales": "oops"}
    with pytest.raises(InputError, match="without readable OME multiscales"):
        open_volume(tmp_path / "nm.zarr")


def test_dangling_hdf5_link(tmp_path):
    path = tmp_path / "l.h5"
    with h5py.File(path, "w") as f:
        f["a"] = h5py.SoftLink("/nowhere")
    with pytest.raises(InputError, match="no dataset 'a'"):
        open_volume(f"{path}:a")


def test_zarr_with_generic_dimension_names(tmp_path, stack16):
    path = tmp_path / "xr.zarr"
    zarr.create_array(str(path), data=stack16, dimension_names=["dim_0", "dim_1", "dim_2"])
    assert open_volume(path).shape == stack16.shape
