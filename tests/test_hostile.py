"""The hostile-input catalogue (docs/hostile_input.md), each case through the real command line.

Every case must end as: exit code 2, one ``error: ...`` line on stderr (the last; progress lines
may come before it) naming the input and the problem, no traceback, and every file that existed
before left byte-for-byte as it was.
The catalogue in the docs and the cases here are kept equal by :func:`test_catalogue_is_documented`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

ROOT = Path(__file__).resolve().parent.parent
NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))
CATALOGUE = ROOT / "docs" / "hostile_input.md"
SHIPPED = ROOT / "checkpoints" / "voxresnet_small_random.json"
CLUSTER = ["--workers", "1", "--threads", "1"]

#: case id -> function(folder) returning (arguments after ``neurotrace``, words the error must hold).
CASES: dict[str, Callable[[Path], tuple[list[str], list[str]]]] = {}


def case(function: Callable[[Path], tuple[list[str], list[str]]]) -> Callable[[Path], tuple[list[str], list[str]]]:
    CASES[function.__name__.replace("_", "-")] = function
    return function


def stack(folder: Path, name: str = "stack.tif", shape=(8, 32, 32), dtype=np.uint16, value=None, **kwargs) -> Path:
    path = folder / name
    data = np.full(shape, value, dtype) if value is not None else \
        np.random.default_rng(0).integers(0, 200, shape).astype(dtype)  # fmt: skip
    tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "ZYX"[-data.ndim:]}, **kwargs)
    return path


def zarr_array(folder: Path, data: np.ndarray, chunks=(4, 16, 16), name: str = "in.zarr") -> Path:
    path = folder / name
    array = zarr.create_array(str(path), shape=data.shape, chunks=chunks[-data.ndim:], dtype=data.dtype)
    array[...] = data
    return path


def image(folder: Path, value=None) -> Path:
    """A finished OME-Zarr image, as ``neurotrace convert`` writes it."""
    from neurotrace_dask.config import ClusterConfig, ConvertConfig, LocalClusterConfig
    from neurotrace_dask.io.convert import convert

    out = folder / "image.ome.zarr"
    convert(stack(folder, "source.tif", shape=(16, 64, 64), value=value), out, ConvertConfig(chunks=(8, 32, 32), levels=1),
            cluster=ClusterConfig(local=LocalClusterConfig(processes=False, n_workers=1, threads_per_worker=1)))  # fmt: skip
    (folder / "source.tif").unlink()
    return out


def run_with_config(d: Path, yaml: str) -> list[str]:
    (d / "conf.yaml").write_text(yaml)
    return ["run", str(stack(d)), "--out", str(d / "run"), "--config", str(d / "conf.yaml")]


def chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file() and "c" in p.relative_to(store).parts)


# --- files that are not what they claim ------------------------------------------------------


@case
def missing_input(d):
    return ["convert", str(d / "nothing.tif"), str(d / "out.ome.zarr")], ["nothing.tif", "does not exist"]


@case
def not_an_image(d):
    (d / "notes.tif").write_text("these are my notes, not a stack\n")
    return ["convert", str(d / "notes.tif"), str(d / "out.ome.zarr")], ["notes.tif", "not a TIFF"]


@case
def empty_file(d):
    (d / "empty.tif").write_bytes(b"")
    return ["convert", str(d / "empty.tif"), str(d / "out.ome.zarr")], ["empty.tif", "empty"]


@case
def truncated_tiff(d):
    path = stack(d)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["convert", str(path), str(d / "out.ome.zarr")], ["stack.tif", "truncated"]


@case
def corrupt_compressed_tiff(d):
    path = stack(d, shape=(8, 64, 64), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        start = tif.pages[3].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[start : start + 64] = bytes(range(64))  # the fourth page's compressed strip becomes noise
    path.write_bytes(bytes(data))
    return ["convert", str(path), str(d / "out.ome.zarr"), *CLUSTER], ["stack.tif", "cannot read"]


@case
def giant_declared_tiff(d):
    # An uncompressed 32x32 page whose header claims 60000 x 60000 pixels.
    path = stack(d, shape=(1, 32, 32))
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        offsets = [tags["ImageWidth"].valueoffset, tags["ImageLength"].valueoffset]
        types = [tags["ImageWidth"].dtype, tags["ImageLength"].dtype]
    data = bytearray(path.read_bytes())
    for offset, kind in zip(offsets, types, strict=True):
        size = 2 if kind == 3 else 4  # SHORT or LONG
        data[offset : offset + size] = (60000).to_bytes(size, "little")
    path.write_bytes(bytes(data))
    return ["convert", str(path), str(d / "out.ome.zarr")], ["stack.tif"]


@case
def giant_declared_zarr(d):
    path = d / "huge.zarr"
    zarr.create_array(str(path), shape=(10**6, 10**6, 10**6), chunks=(64, 64, 64), dtype="uint16")
    return ["convert", str(path), str(d / "out.ome.zarr")], ["huge.zarr", "voxels"]


@case
def corrupt_zarr_chunk(d):
    path = zarr_array(d, np.random.default_rng(0).integers(0, 200, (8, 32, 32)).astype(np.uint16))
    chunk_files(path)[1].write_bytes(b"\x00garbage" * 7)
    return ["convert", str(path), str(d / "out.ome.zarr"), *CLUSTER], ["in.zarr", "cannot read"]


@case
def truncated_zarr_chunk(d):
    path = zarr_array(d, np.random.default_rng(0).integers(0, 200, (8, 32, 32)).astype(np.uint16))
    chunk = chunk_files(path)[0]
    chunk.write_bytes(chunk.read_bytes()[:20])
    return ["convert", str(path), str(d / "out.ome.zarr"), *CLUSTER], ["in.zarr", "cannot read"]


@case
def corrupt_zarr_metadata(d):
    path = zarr_array(d, np.zeros((8, 32, 32), np.uint16))
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array", "shape": [8, 3')
    return ["convert", str(path), str(d / "out.ome.zarr")], ["in.zarr", "Zarr"]


@case
def corrupt_chunk_while_tracing(d):
    store = image(d)
    chunk_files(store / "0")[2].write_bytes(b"\x01rubbish" * 9)
    return ["trace", str(store), "--out", str(d / "traced"), "--raw", *CLUSTER], ["image.ome.zarr", "cannot read"]


@case
def corrupt_chunk_while_predicting(d):
    store = image(d)
    chunk_files(store / "0")[2].write_bytes(b"\x01rubbish" * 9)
    return (["predict", str(store), "--out", str(d / "prob.ome.zarr"), "--checkpoint", str(SHIPPED), *CLUSTER],
            ["image.ome.zarr", "cannot read"])  # fmt: skip


# --- shapes and values ---------------------------------------------------------------------


@case
def one_dimensional_array(d):
    return ["convert", str(zarr_array(d, np.zeros(100, np.uint16))), str(d / "out.ome.zarr")], ["in.zarr", "1D"]


@case
def five_dimensional_array(d):
    path = zarr_array(d, np.zeros((2, 3, 4, 16, 16), np.uint16), chunks=(1, 1, 4, 16, 16))
    return ["convert", str(path), str(d / "out.ome.zarr")], ["in.zarr"]


@case
def zero_sized_axis(d):
    path = zarr_array(d, np.zeros((0, 32, 32), np.uint16))
    return ["convert", str(path), str(d / "out.ome.zarr")], ["in.zarr", "empty axis"]


@case
def float_without_rescale(d):
    path = stack(d, dtype=np.float32)
    return ["convert", str(path), str(d / "out.ome.zarr")], ["stack.tif", "float32", "--rescale"]


@case
def complex_dtype(d):
    path = zarr_array(d, np.zeros((4, 16, 16), np.complex64))
    return ["convert", str(path), str(d / "out.ome.zarr"), "--rescale", "uint16"], ["in.zarr", "complex64"]


@case
def boolean_dtype(d):
    path = zarr_array(d, np.zeros((4, 16, 16), bool))
    return ["convert", str(path), str(d / "out.ome.zarr"), "--rescale", "uint8"], ["in.zarr", "bool"]


def non_finite(d: Path, name: str, value: float) -> list[str]:
    """``convert --rescale`` of a float stack holding one ``value`` (NaN or Inf)."""
    data = np.ones((8, 32, 32), np.float32)
    data[3, 4, 5] = value
    tifffile.imwrite(d / name, data, photometric="minisblack", metadata={"axes": "ZYX"})
    return ["convert", str(d / name), str(d / "out.ome.zarr"), "--rescale", "uint16", *CLUSTER]


@case
def nan_in_float_input(d):
    return non_finite(d, "nan.tif", np.nan), ["nan.tif", "NaN"]


@case
def infinity_in_float_input(d):
    return non_finite(d, "inf.tif", np.inf), ["inf.tif", "Inf"]


@case
def rgb_without_channel(d):
    path = d / "rgb.tif"
    tifffile.imwrite(path, np.zeros((4, 16, 16, 3), np.uint8), photometric="rgb")
    return ["convert", str(path), str(d / "out.ome.zarr")], ["rgb.tif", "--channel"]


@case
def empty_volume(d):
    return ["run", str(stack(d, value=0)), "--out", str(d / "run"), "--raw", *CLUSTER], ["stack.tif", "every voxel is 0"]


@case
def saturated_volume(d):
    path = stack(d, value=65535)
    return ["run", str(path), "--out", str(d / "run"), "--raw", *CLUSTER], ["stack.tif", "every voxel is 65535"]


@case
def empty_image_traced(d):
    return ["trace", str(image(d, value=0)), "--out", str(d / "traced"), "--raw", *CLUSTER], \
        ["image.ome.zarr", "every voxel is 0"]  # fmt: skip


# --- SWC, seeds, checkpoints, configuration -------------------------------------------------


@case
def malformed_swc(d):
    (d / "bad.swc").write_text("# test\n1 1 0 0 0 1 -1\n2 3 1.0 2.0 oops 1 1\n")
    return ["swc", "check", str(d / "bad.swc")], ["bad.swc", "line 3"]


@case
def swc_with_cycle(d):
    (d / "loop.swc").write_text("1 3 0 0 0 1 2\n2 3 1 0 0 1 1\n")
    return ["swc", "check", str(d / "loop.swc")], ["loop.swc", "cycle"]


@case
def malformed_gold_swc(d):
    (d / "gold.swc").write_text("1 1 0 0 0 1 -1\n1 3 1 1 1 1 -1\n")
    return ["run", str(stack(d)), "--out", str(d / "run"), "--raw", "--gold", str(d / "gold.swc"), *CLUSTER], \
        ["gold.swc", "duplicate"]  # fmt: skip


@case
def malformed_seeds(d):
    (d / "seeds.csv").write_text("z,y,x\n1,2,three\n")
    return ["run", str(stack(d)), "--out", str(d / "run"), "--raw", "--seeds", str(d / "seeds.csv"), *CLUSTER], \
        ["seeds.csv"]  # fmt: skip


@case
def pickled_checkpoint(d):
    (d / "model.pt").write_bytes(b"\x80\x04\x95" + b"\x00" * 32)
    return ["run", str(stack(d)), "--out", str(d / "run"), "--checkpoint", str(d / "model.pt"), *CLUSTER], \
        ["model.pt", "pickle"]  # fmt: skip


@case
def tampered_checkpoint(d):
    spec = json.loads(SHIPPED.read_text())
    (d / "net.json").write_text(json.dumps(spec))
    weights = bytearray(SHIPPED.with_suffix(".safetensors").read_bytes())
    weights[-100] ^= 0xFF  # one flipped byte in the last tensor
    (d / "net.safetensors").write_bytes(bytes(weights))
    return ["run", str(stack(d)), "--out", str(d / "run"), "--checkpoint", str(d / "net.json"), *CLUSTER], \
        ["net", "sha256"]  # fmt: skip


@case
def mismatched_checkpoint(d):
    spec = json.loads(SHIPPED.read_text())
    spec["architecture"]["width"] *= 2  # the weights are for the other width
    (d / "net.json").write_text(json.dumps(spec))
    (d / "net.safetensors").write_bytes(SHIPPED.with_suffix(".safetensors").read_bytes())
    return ["run", str(stack(d)), "--out", str(d / "run"), "--checkpoint", str(d / "net.json"), *CLUSTER], \
        ["net"]  # fmt: skip


#: Configuration files: case -> (the YAML, words the error must hold).
CONFIG_CASES = {
    "config-unknown-key": ("trace:\n  treshold: 0.5\n", ["treshold"]),
    "config-out-of-range": ("trace:\n  halo: -4\n", ["trace.halo"]),
    "config-wrong-type": ("predict:\n  block: lots\n", ["predict.block"]),
    "config-not-yaml": ("trace: [unclosed\n", ["conf.yaml"]),
}
for _name, (_yaml, _words) in CONFIG_CASES.items():
    CASES[_name] = lambda d, yaml=_yaml, words=_words: (run_with_config(d, yaml), words)


# --- outputs that would destroy something ---------------------------------------------------


@case
def output_inside_input_folder(d):
    (d / "slices").mkdir()
    for i in range(3):
        stack(d / "slices", f"{i}.tif", shape=(32, 32), dtype=np.uint8)
    return ["convert", str(d / "slices"), str(d / "slices" / "out.ome.zarr")], ["inside the input"]


@case
def output_is_the_input(d):
    store = image(d)
    return ["predict", str(store), "--out", str(store), "--checkpoint", str(SHIPPED)], ["image.ome.zarr"]


@case
def trace_output_is_the_input(d):
    store = image(d)
    return ["trace", str(store), "--out", str(store), "--raw"], ["image.ome.zarr"]


@case
def run_folder_not_ours(d):
    (d / "thesis").mkdir()
    (d / "thesis" / "chapter1.tex").write_text("precious")
    return ["run", str(stack(d)), "--out", str(d / "thesis"), "--raw"], ["thesis", "not a neurotrace run folder"]


@case
def existing_output(d):
    (d / "out.ome.zarr").mkdir()
    (d / "out.ome.zarr" / "keep.txt").write_text("mine")
    return ["convert", str(stack(d)), str(d / "out.ome.zarr")], ["out.ome.zarr", "exists"]


@case
def output_is_a_file(d):
    (d / "run").write_text("a file, not a folder")
    return ["run", str(stack(d)), "--out", str(d / "run"), "--raw"], ["run", "not a folder"]


# --- the test --------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name, tmp_path):
    arguments, words = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    result = subprocess.run([NEUROTRACE, *arguments], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr}"
    # Progress lines ("convert ...") may come first; the error is one line, and the last.
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing file was changed or removed"


def test_catalogue_is_documented():
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", CATALOGUE.read_text(encoding="utf-8"), re.MULTILINE))
    assert documented == set(CASES), (documented ^ set(CASES))
