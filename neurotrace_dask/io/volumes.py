"""Open any supported input volume lazily as a (z, y, x) source.

Supported: multipage TIFF / BigTIFF (ImageJ hyperstacks and OME-TIFF included), a folder
of 2D TIFF slices (natural sort order), an HDF5 dataset (``file.h5:/path``), and an
existing Zarr array or OME-Zarr image. :func:`open_volume` reads only headers and
metadata; :meth:`VolumeSource.read` reads one region. A source is a small picklable
record that reopens its file on every read, because tifffile and h5py handles cannot
be sent to Dask workers.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import zarr
from natsort import natsorted

from ..errors import InputError

__all__ = ["SUPPORTED_DTYPES", "VolumeSource", "open_volume"]

SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
#: Larger declared volumes are refused as corrupt headers: 2^50 voxels is about 200 whole mouse
#: brains at 1 x 0.3 x 0.3 um (one is about 5e12 voxels).
MAX_VOXELS = 2**50
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")

Region = tuple[slice, slice, slice]

# Micrometres per unit, for the unit names microscopes and ImageJ write.
_UNIT_UM = {
    "um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3,
    "cm": 1e4, "m": 1e6, "pixel": None, "px": None, "": None,
}


@dataclass(frozen=True)
class VolumeSource:
    """A lazily readable 3D volume with axes (z, y, x).

    Attributes
    ----------
    path
        The input as the user named it.
    kind
        ``"tiff"``, ``"slices"``, ``"hdf5"`` or ``"zarr"``.
    shape, dtype
        Of the (z, y, x) volume after channel selection.
    voxel_size
        Micrometres (z, y, x) from the file's metadata, or ``None`` when it has none.
    selection
        For each axis of the file's native array: ``"z"``, ``"y"``, ``"x"`` or a fixed
        integer index (a chosen channel, a squeezed length-1 axis).
    key
        The HDF5 dataset or Zarr array inside ``path``; for TIFF, ``"generic"`` when the
        pages are read as one stack ignoring per-page shape metadata.
    files
        The slice files of a ``"slices"`` source, in z order.
    notes
        Things the user should be told (2D input read as one slice, ...).
    z_spacing_known
        False when ``voxel_size`` has y and x from the file but z was assumed to be 1 um.

    Examples
    --------
    >>> import numpy as np, tifffile, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "stack.tif")
    >>> tifffile.imwrite(path, np.zeros((4, 8, 8), np.uint8), photometric="minisblack")
    >>> source = open_volume(path)
    >>> source.shape, source.read((slice(0, 2), slice(0, 8), slice(0, 8))).shape
    ((4, 8, 8), (2, 8, 8))
    """

    path: str
    kind: str
    shape: tuple[int, int, int]
    dtype: str
    voxel_size: tuple[float, float, float] | None
    selection: tuple[str | int, ...] = ("z", "y", "x")
    key: str | None = None
    files: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())
    z_spacing_known: bool = True

    @property
    def name(self) -> str:
        """The input as the user would name it (``file.h5:/key`` for HDF5)."""
        return f"{self.path}:{self.key}" if self.kind == "hdf5" else self.path

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def read(self, region: Region) -> np.ndarray:
        """Read one (z, y, x) region as a C-contiguous array in native byte order."""
        try:
            if self.kind == "slices":
                data = self._read_slices(region)
            else:
                with self._open_native() as native:
                    data = self._select(native, region)
        except InputError:
            raise
        except Exception as exc:  # any reader failure is a bad-input problem of this file
            raise InputError(f"{self.name}: cannot read region {format_region(region)} ({_short(exc)})") from None
        return np.ascontiguousarray(data, dtype=np.dtype(self.dtype).newbyteorder("="))

    def _select(self, native, region: Region) -> np.ndarray:
        by_axis = dict(zip("zyx", region))
        index = tuple(by_axis[s] if isinstance(s, str) else s for s in self.selection)
        data = np.asarray(native[index])
        order = [s for s in self.selection if isinstance(s, str)]
        if "z" not in order:  # a 2D file read as one z-slice
            data = data[np.newaxis][by_axis["z"]]
            order.insert(0, "z")
        return np.transpose(data, [order.index(a) for a in "zyx"])

    def _open_native(self):
        if self.kind == "tiff":
            return _TiffArray(self.path, generic=self.key == "generic")
        if self.kind == "hdf5":
            return _Hdf5Array(self.path, self.key)
        return _ZarrArray(self.path, self.key)

    def _read_slices(self, region: Region) -> np.ndarray:
        zs, ys, xs = region
        out = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), self.dtype)
        for i, name in enumerate(self.files[zs]):
            try:
                with _TiffArray(name) as plane:
                    out[i] = self._select(plane, (slice(0, 1), ys, xs))[0]
            except Exception as exc:
                raise InputError(f"{name}: cannot read slice ({_short(exc)})") from None
        return out


class _TiffArray:
    """Context manager giving a sliceable view of a TIFF's first series.

    Uncompressed contiguous data is read with plain positioned reads of just the rows a
    region needs (as fast as ``tifffile.imread``, unlike a memory map's page faults);
    anything else goes through tifffile's Zarr store, which decodes only the strips or
    tiles a region touches.
    """

    def __init__(self, path: str, generic: bool = False):
        self.path, self.generic = path, generic

    def __enter__(self):
        self._tif = _open_tifffile(self.path, self.generic)
        series = _main_series(self._tif) or self._tif.series[0]
        if series.dataoffset is not None:
            stored = np.dtype(series.dtype).newbyteorder(self._tif.byteorder)
            self.array = _ContiguousArray(self._tif.filehandle, series.dataoffset, tuple(series.shape), stored)
        else:
            self.array = zarr.open_array(series.aszarr(), mode="r")
        return self

    def __exit__(self, *exc) -> None:
        self.array = None
        self._tif.close()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, index):
        return self.array[index]


class _ContiguousArray:
    """An uncompressed C-ordered array at a byte offset of an open file, read on indexing.

    Indexing takes one int or slice (step 1) per axis. Leading axes are walked one index
    at a time until the inner axes are taken whole (one read) or only a plane's rows and
    columns remain (one read of the rows), so at most a row's unused columns are read.
    """

    def __init__(self, handle, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.handle, self.offset, self.shape, self.dtype = handle, offset, shape, dtype

    def __getitem__(self, index: tuple) -> np.ndarray:
        bounds = [(i, i + 1) if isinstance(i, (int, np.integer)) else i.indices(n)[:2] for i, n in zip(index, self.shape)]
        out = np.empty([b - a for a, b in bounds], self.dtype)
        self._fill(out, self.offset, self.shape, bounds)
        squeeze = tuple(axis for axis, i in enumerate(index) if isinstance(i, (int, np.integer)))
        return out.squeeze(axis=squeeze) if squeeze else out

    def _fill(self, out: np.ndarray, offset: int, shape: tuple[int, ...], bounds: list[tuple[int, int]]) -> None:
        stride = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        (start, stop), inner = bounds[0], bounds[1:]
        inner_whole = all(a == 0 and b == n for (a, b), n in zip(inner, shape[1:]))
        if not inner_whole and len(shape) > 2:
            for k, i in enumerate(range(start, stop)):
                self._fill(out[k], offset + i * stride, shape[1:], inner)
            return
        # Rows start..stop are contiguous in the file: one read, straight into `out` when whole.
        rows = out if inner_whole else np.empty((stop - start, *shape[1:]), self.dtype)
        self.handle.seek(offset + start * stride)
        if self.handle.readinto(rows) != rows.nbytes:
            raise OSError(f"file ends early at byte {self.handle.tell()}")
        if not inner_whole:
            out[...] = rows[(slice(None),) + tuple(slice(a, b) for a, b in inner)]


class _Hdf5Array:
    def __init__(self, path: str, key: str | None):
        self.path, self.key = path, key

    def __enter__(self):
        import h5py

        self._file = h5py.File(self.path, "r")
        return self._file[self.key]

    def __exit__(self, *exc) -> None:
        self._file.close()


class _ZarrArray:
    def __init__(self, path: str, key: str | None):
        self.path, self.key = path, key

    def __enter__(self):
        return zarr.open_array(self.path if self.key is None else os.path.join(self.path, self.key), mode="r")

    def __exit__(self, *exc) -> None:
        pass


def format_region(region: Region) -> str:
    """``[z0:z1, y0:y1, x0:x1]``, for messages."""
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _choose_axes(path: str, axes: str, shape: tuple[int, ...], channel: int | None) -> tuple[tuple[str | int, ...], list[str]]:
    """Map a file's native axes onto (z, y, x) plus fixed indices.

    ``axes`` uses tifffile's letters: Z depth, Y/X plane, C channel, S samples (RGB),
    T time, and I/Q/others for unlabelled page sequences (read as depth).
    """
    notes: list[str] = []
    if 0 in shape:
        raise InputError(f"{path}: volume has an empty axis (axes {axes}, shape {shape})")
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"{path}: cannot find y and x axes (axes {axes}, shape {shape})")
    selection: list[str | int] = []
    depth_axes = [i for i, a in enumerate(axes) if a not in "YXCST" and shape[i] > 1]
    if len(depth_axes) > 1 and "Z" in axes:
        depth_axes = [axes.index("Z")] if shape[axes.index("Z")] > 1 else depth_axes
    if len(depth_axes) > 1:
        raise InputError(f"{path}: more than one depth-like axis (axes {axes}, shape {shape})")
    channel_axes = [i for i, a in enumerate(axes) if a in "CS" and shape[i] > 1]
    if len(channel_axes) > 1:
        raise InputError(f"{path}: both channels and colour samples (axes {axes}, shape {shape}); not supported")
    for i, (letter, size) in enumerate(zip(axes, shape)):
        if letter == "Y":
            selection.append("y")
        elif letter == "X":
            selection.append("x")
        elif i in depth_axes:
            selection.append("z")
        elif i in channel_axes:
            kind = "colour samples (RGB)" if letter == "S" else "channels"
            if channel is None:
                raise InputError(f"{path}: has {size} {kind}; choose one with --channel (0-{size - 1})")
            if channel >= size:
                raise InputError(f"{path}: --channel {channel} out of range, the file has {size} {kind}")
            selection.append(channel)
        elif letter == "T" and size > 1:
            raise InputError(f"{path}: is a time series ({size} time points); save one time point as its own stack")
        elif size > 1:
            raise InputError(f"{path}: axis {letter} has {size} entries (axes {axes}, shape {shape}); "
                             "only z, y, x and one channel axis are supported")
        else:
            selection.append(0)
    if channel is not None and not channel_axes:
        if channel != 0:
            raise InputError(f"{path}: --channel {channel} given but the file has a single channel")
    if "z" not in selection:
        notes.append(f"{path}: 2D image, read as a volume of one z-slice")
    return tuple(selection), notes


def _unit_um(unit: str | None) -> float | None:
    if unit is None:
        return None
    # ImageJ writes the micro sign escaped as the six characters "\u00B5".
    return _UNIT_UM.get(unit.strip().lower().replace("\\u00b5", "\u00b5"), None)


def _tiff_voxel_size(tif: tifffile.TiffFile) -> tuple[tuple[float, float, float] | None, bool]:
    """Voxel size (z, y, x) in um from OME or ImageJ metadata or calibrated resolution
    tags, and whether the z spacing came from the file (else 1 um is assumed).

    Inch-based resolution tags are taken as uncalibrated: they are scanner and screen
    dpi, not microscope calibration.
    """
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            sizes = []
            for axis in "ZYX":
                value = pixels.get(f"PhysicalSize{axis}")
                scale = _unit_um(pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m"))
                sizes.append(float(value) * scale if value is not None and scale else None)
            if sizes[1] and sizes[2]:
                return (sizes[0] or 1.0, sizes[1], sizes[2]), sizes[0] is not None
        except (ET.ParseError, StopIteration, ValueError):
            pass
    page = tif.pages.first
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    meta = tif.imagej_metadata or {}
    if tif.is_imagej:
        scale = _unit_um(meta.get("unit"))
    else:
        unit_tag = page.tags.get("ResolutionUnit")
        scale = 1e4 if unit_tag is not None and int(unit_tag.value) == 3 else None  # centimetre
    if scale is None or xres is None or yres is None:
        return None, False
    try:
        x = scale * xres.value[1] / xres.value[0]
        y = scale * yres.value[1] / yres.value[0]
    except ZeroDivisionError:
        return None, False
    if tif.is_imagej and "spacing" in meta:
        return (float(meta["spacing"]) * scale, y, x), True
    return (1.0, y, x), False


def _check_tiff_length(path: str, tif: tifffile.TiffFile, series) -> None:
    size = os.path.getsize(path)
    if series.dataoffset is not None:
        end = series.dataoffset + series.nbytes
    else:
        page = series.pages[-1] if len(series.pages) else None
        page = page.aspage() if page is not None else None
        end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0) if page else 0
    if end > size:
        raise InputError(f"{path}: truncated TIFF (data runs to byte {end}, file has {size})")


class _TiffWarnings(logging.Handler):
    """Collects what tifffile logs while parsing: it reports a broken page chain as a
    warning and carries on with the pages it could read, which would silently shorten
    a truncated stack."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _TiffWarnings:
        self._logger = logging.getLogger("tifffile")
        self._logger.addHandler(self)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate

    def corruption(self) -> str | None:
        bad = ("invalid page offset", "truncat", "corrupt", "invalid tag", "not a valid")
        return next((m for m in self.messages if any(b in m.lower() for b in bad)), None)


def _open_tifffile(path: str, generic: bool) -> tifffile.TiffFile:
    # Only ever switch shaped metadata off: forcing it on misreads ImageJ and OME files.
    return tifffile.TiffFile(path, is_shaped=False) if generic else tifffile.TiffFile(path)


def _main_series(tif: tifffile.TiffFile):
    """The one image series of a stack, or None when pages of other shapes follow it.

    Thumbnails (reduced pages) are not counted.
    """
    full = [series for series in tif.series if not getattr(series.keyframe, "is_reduced", False)]
    return full[0] if len(full) == 1 else None


def _open_tiff(path: str, channel: int | None) -> VolumeSource:
    # Files written one page per call carry a shape per page, which tifffile reports as
    # one series per page; their pages read as one stack when shape metadata is ignored
    # ("generic" mode). A page of another shape is an error: reading only the first
    # series would silently drop and reorder slices.
    try:
        for generic in (False, True):
            with _TiffWarnings() as warnings, _open_tifffile(path, generic) as tif:
                if not tif.series:
                    raise InputError(f"{path}: TIFF holds no image")
                if warnings.corruption():
                    raise InputError(f"{path}: corrupt or truncated TIFF ({warnings.corruption().splitlines()[0]})")
                series = _main_series(tif)
                if series is None and generic:
                    first, other = tif.series[0], tif.series[1]
                    raise InputError(
                        f"{path}: pages differ from page {other.keyframe.index} ({other.shape} {other.dtype} "
                        f"after {first.shape} {first.dtype}); expected a stack of equal pages"
                    )
                if series is None:
                    continue
                _check_tiff_length(path, tif, series)
                selection, notes = _choose_axes(path, series.axes, series.shape, channel)
                voxel_size, z_known = _tiff_voxel_size(tif)
                break
    except InputError:
        raise
    except tifffile.TiffFileError as exc:
        raise InputError(f"{path}: not a readable TIFF ({_short(exc)})") from None
    except (OSError, ValueError, IndexError, KeyError, struct.error) as exc:
        raise InputError(f"{path}: corrupt TIFF ({_short(exc)})") from None
    key = "generic" if generic else None
    return _finish(path, "tiff", series.shape, selection, str(series.dtype), voxel_size, notes, key, z_known)


def _finish(path, kind, native_shape, selection, dtype, voxel_size, notes, key=None, z_known=True) -> VolumeSource:
    sizes = {"z": 1} | {s: n for s, n in zip(selection, native_shape) if isinstance(s, str)}
    shape = (sizes["z"], sizes["y"], sizes["x"])
    if 0 in shape:
        name = f"{path}:{key}" if kind == "hdf5" else path
        raise InputError(f"{name}: volume has an empty axis (shape z,y,x = {shape})")
    if math.prod(shape) > MAX_VOXELS:
        name = f"{path}:{key}" if kind == "hdf5" else path
        raise InputError(f"{name}: declares {math.prod(shape):.3g} voxels (shape z,y,x = {shape}), more than the "
                         f"{MAX_VOXELS:.3g} this tool takes; a corrupt header?")  # fmt: skip
    return VolumeSource(path, kind, shape, dtype, voxel_size, selection, key, (), tuple(notes), z_known)


def _open_slices(folder: Path, channel: int | None) -> VolumeSource:
    files = natsorted(str(p) for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{folder}: folder holds no .tif/.tiff slices")
    first = _open_tiff(files[0], channel)
    if first.shape[0] != 1:
        raise InputError(f"{files[0]}: expected 2D slices in {folder}, found a stack of {first.shape[0]}")
    plane = None
    for name in files:
        try:
            with tifffile.TiffFile(name) as tif:
                shape = tif.series[0].shape
                dtype = tif.series[0].dtype
        except Exception as exc:
            raise InputError(f"{name}: not a readable TIFF slice ({_short(exc)})") from None
        if plane is None:
            plane = (shape, dtype)
        elif (shape, dtype) != plane:
            raise InputError(f"{name}: slice is {shape} {dtype}, but {Path(files[0]).name} is {plane[0]} {plane[1]}")
    return VolumeSource(
        str(folder), "slices", (len(files), first.shape[1], first.shape[2]), first.dtype, first.voxel_size,
        first.selection, None, tuple(files), (), first.voxel_size is None,
    )


def _split_hdf5(path: str) -> tuple[str, str | None] | None:
    match = re.match(r"^(.*?\.(?:h5|hdf5|hdf|he5))(?::(.*))?$", path, flags=re.IGNORECASE)
    if not match:
        return None
    return match.group(1), match.group(2)


def _open_hdf5(file: str, key: str | None, channel: int | None) -> VolumeSource:
    import h5py

    if not os.path.exists(file):
        raise InputError(f"{file}: does not exist")
    try:
        with h5py.File(file, "r") as h5:
            if not key:
                candidates: list[str] = []
                h5.visititems(lambda name, obj: candidates.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim >= 2 else None)
                if len(candidates) != 1:
                    raise InputError(f"{file}: name the dataset as {file}:/path (found {', '.join(candidates) or 'none'})")
                key = candidates[0]
            dataset = h5.get(key)  # None for a missing name or a dangling link
            if not isinstance(dataset, h5py.Dataset):
                raise InputError(f"{file}: no dataset '{key}'")
            axes = _guess_axes(f"{file}:{key}", dataset.shape)
            selection, notes = _choose_axes(f"{file}:{key}", axes, dataset.shape, channel)
            voxel_size = _attr_voxel_size(dataset.attrs)
            dtype = str(dataset.dtype)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{file}: not a readable HDF5 file ({_short(exc)})") from None
    return _finish(file, "hdf5", dataset.shape, selection, dtype, voxel_size, notes, key=key)


def _attr_voxel_size(attrs) -> tuple[float, float, float] | None:
    # ilastik / Fiji HDF5 convention: element_size_um in (z, y, x) order.
    value = attrs.get("element_size_um")
    if value is None or len(value) != 3:
        return None
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _guess_axes(name: str, shape: tuple[int, ...]) -> str:
    """Axes of an HDF5/Zarr array that carries no axis names: zyx, yx, czyx or zyxc."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "ZYX"
    if len(shape) == 4:
        if shape[0] <= 8 < shape[-1]:
            return "CZYX"
        if shape[-1] <= 8 < shape[0]:
            return "ZYXC"
    raise InputError(f"{name}: cannot tell the axes of a {len(shape)}D array of shape {shape}; expected z,y,x")


def _ome_level0(path: str, group: zarr.Group) -> tuple[str, str | None, tuple[float, float, float] | None]:
    """Path, axes letters and voxel size (um) of level 0 of an OME-Zarr image group."""
    attrs = dict(group.attrs)
    try:
        image = attrs.get("ome", attrs)["multiscales"][0]
        dataset = image["datasets"][0]
        key = str(dataset["path"])
        axes = [a["name"] if isinstance(a, dict) else a for a in image.get("axes", [])]
        units = [a.get("unit") if isinstance(a, dict) else None for a in image.get("axes", [])]
        scales = [t["scale"] for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise InputError(f"{path}: Zarr group without readable OME multiscales metadata; name an array inside it") from None
    voxel_size = None
    if scales and axes and all(a in axes for a in "zyx"):
        sizes = []
        for name in "zyx":
            i = axes.index(name)
            factor = _unit_um(units[i]) if units[i] else 1.0
            if factor is None:
                raise InputError(f"{path}: axis {name} has unit '{units[i]}', which is not a length this tool knows")
            sizes.append(float(scales[0][i]) * factor)
        voxel_size = tuple(sizes)
    return key, "".join(a.upper() for a in axes) or None, voxel_size  # type: ignore[return-value]


def _open_zarr(path: str, channel: int | None) -> VolumeSource:
    try:
        node = zarr.open(path, mode="r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable Zarr store ({_short(exc)})") from None
    key, axes, voxel_size = None, None, None
    if isinstance(node, zarr.Group):
        key, axes, voxel_size = _ome_level0(path, node)
        try:
            array = node[key]
        except KeyError:
            raise InputError(f"{path}: OME metadata names level '{key}', which is not in the store") from None
    else:
        array = node
        dims = getattr(array.metadata, "dimension_names", None)
        # Named dimensions are used when they are the usual single letters (z, y, x, c, t).
        if dims and all(d and d.lower() in "zyxct" and len(d) == 1 for d in dims):
            axes = "".join(d.upper() for d in dims)
    axes = axes or _guess_axes(path, array.shape)
    selection, notes = _choose_axes(path, axes, array.shape, channel)
    return _finish(path, "zarr", array.shape, selection, str(array.dtype), voxel_size, notes, key=key)


def open_volume(path: str | os.PathLike, *, channel: int | None = None) -> VolumeSource:
    """Open an input volume lazily, reading only its headers.

    Parameters
    ----------
    path
        A TIFF/BigTIFF file, a folder of 2D TIFF slices, ``file.h5:/dataset``, or a
        Zarr array / OME-Zarr image folder.
    channel
        The channel (or RGB sample) to take from multichannel input.

    Raises
    ------
    InputError
        One line naming the file and the problem.

    Examples
    --------
    >>> import numpy as np, tifffile, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "rgb.tif")
    >>> tifffile.imwrite(path, np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")
    >>> open_volume(path, channel=1).shape
    (2, 8, 8)
    """
    text = os.fspath(path)
    hdf5 = _split_hdf5(text)
    if hdf5 is not None:
        return _open_hdf5(hdf5[0], hdf5[1], channel)
    p = Path(text)
    if not p.exists():
        raise InputError(f"{text}: does not exist")
    if p.is_dir():
        if (p / "zarr.json").exists() or (p / ".zarray").exists() or (p / ".zgroup").exists():
            return _open_zarr(text, channel)
        return _open_slices(p, channel)
    if p.stat().st_size == 0:
        raise InputError(f"{text}: file is empty")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] in (b"II", b"MM"):
        return _open_tiff(text, channel)
    if magic == b"\x89HDF":
        return _open_hdf5(text, None, channel)
    raise InputError(f"{text}: not a TIFF, HDF5 or Zarr input (unrecognised file header)")
