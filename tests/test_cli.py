"""The ``neurotrace`` command as a user runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from neurotrace_dask import __version__
from neurotrace_dask.io.omezarr import open_image
from neurotrace_dask.io.swc import SWC, write_swc

NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([NEUROTRACE, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_version_and_help():
    assert run("--version").stdout.strip() == f"neurotrace_dask {__version__}"
    commands = ["info", "convert", "demo", "evaluate", "synth", "predict", "trace"]
    for command in ([], ["config", "show"], ["swc", "check"], *([c] for c in commands)):
        result = run(*command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, command


def test_info():
    result = run("info")
    assert result.returncode == 0
    assert "torch" in result.stdout and "gpu" in result.stdout and "cpu cores" in result.stdout


def test_config_show_merges_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("convert:\n  levels: 5\n")
    shown = yaml.safe_load(run("config", "show", str(path)).stdout)
    assert shown["convert"]["levels"] == 5 and shown["cluster"]["kind"] == "local"


def test_bad_config_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("convert:\n  levles: 5\n")
    result = run("config", "show", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: unknown key 'convert.levles'"


def test_convert_flags_override_config(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (6, 40, 50), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "in.tif", data)
    config = tmp_path / "c.yaml"
    config.write_text("convert:\n  levels: 3\n  voxel_size: [2, 1, 1]\n")
    out = tmp_path / "out.ome.zarr"
    result = run("convert", str(tmp_path / "in.tif"), str(out), "--config", str(config), "--levels", "2",
                 "--voxel-size", "1.5", "0.5", "0.5", "--chunks", "4", "16", "16", "--workers", "1", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "level 1" in result.stdout and "level 2" not in result.stdout
    arrays, voxel_size = open_image(out)
    assert len(arrays) == 2 and voxel_size == (1.5, 0.5, 0.5)
    np.testing.assert_array_equal(arrays[0][:], data)
    again = run("convert", str(tmp_path / "in.tif"), str(out))
    assert again.returncode == 2 and "exists already; pass --overwrite" in again.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["convert", "missing.tif", "out.ome.zarr"], "missing.tif: does not exist"),
        (["convert", "rgb.tif", "out.ome.zarr"], "choose one with --channel"),
        (["convert", "in.tif", "out.ome.zarr", "--scheduler", "tcp://127.0.0.1:9", "--slurm"], "exclude each other"),
        (["swc", "check", "bad.swc"], "bad.swc line 3: z is not a number"),
        (["evaluate", "missing.swc", "bad.swc"], "missing.swc does not exist"),
        (["evaluate", "bad.swc", "bad.swc", "--tau", "-1"], "--tau must be a positive number"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, needle):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((2, 8, 8), np.uint8))
    (tmp_path / "bad.swc").write_text("# header\n1 1 0 0 0 1 -1 \n2 3 1 1 x 1 1\n")
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "out.ome.zarr").exists()


def test_debug_shows_traceback(tmp_path):
    result = run("--debug", "convert", "missing.tif", "out.ome.zarr", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_demo(tmp_path):
    result = run("demo", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "against the gold standard: length F1" in result.stdout
    run_folder = tmp_path / "demo" / "run"
    assert (run_folder / "report.html").is_file() and (run_folder / "metrics.json").is_file()
    arrays, voxel_size = open_image(run_folder / "image.ome.zarr")
    assert voxel_size == (1.0, 0.5, 0.5)
    again = run("demo", "--out", str(tmp_path / "demo"))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_bad_slice_found_mid_run_is_one_line(tmp_path):
    # The headers agree, so the run starts; the cut slice fails inside a worker task.
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(5):
        tifffile.imwrite(folder / f"s{i}.tif", np.full((64, 64), i, np.uint8))
    cut = folder / "s3.tif"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size - 2000])
    result = run("convert", str(folder), str(tmp_path / "out.ome.zarr"), "--workers", "1", "--threads", "1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "s3.tif" in lines[0], result.stderr
    assert not (tmp_path / "out.ome.zarr").exists()


def test_busy_dashboard_port_is_not_the_users_concern(tmp_path):
    # Another cluster on this machine holds the dashboard port: the dashboard moves quietly.
    import socket

    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))
        holder.listen(1)
    except OSError:
        pass  # someone holds it already: the same situation
    tifffile.imwrite(tmp_path / "stack.tif", np.full((6, 32, 32), 7, np.uint8))
    try:
        result = run("convert", str(tmp_path / "stack.tif"), str(tmp_path / "out.ome.zarr"), "--workers", "1")
    finally:
        holder.close()
    assert result.returncode == 0, result.stderr
    assert "already in use" not in result.stderr and "Warning" not in result.stderr, result.stderr


def test_evaluate(tmp_path):
    # Gold: a straight line of 20 voxels; test: its first half. Voxel size from the headers.
    line = np.stack([np.zeros(21), np.zeros(21), np.arange(21.0)], axis=1)  # z, y, x
    write_swc(tmp_path / "gold.swc", SWC.from_arrays(line, np.arange(-1, 20)), voxel_size_zyx=(2, 0.5, 0.5))
    write_swc(tmp_path / "test.swc", SWC.from_arrays(line[:11], np.arange(-1, 10)), voxel_size_zyx=(2, 0.5, 0.5))
    out = tmp_path / "metrics.json"
    result = run("evaluate", "gold.swc", "test.swc", "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "length F1" in result.stdout and "DIADEM" in result.stdout and "ESA" in result.stdout
    assert "from the SWC header" in result.stderr
    metrics = json.loads(out.read_text())
    assert metrics["voxel_size_zyx"] == [2.0, 0.5, 0.5] and metrics["gold"]["n_nodes"] == 21
    assert metrics["length"]["precision"] == 1.0 and metrics["length"]["tau"] == 1.0
    assert metrics["length"]["recall"] == pytest.approx(6 / 10, abs=1e-3)  # 5 um of 10, plus tau
    assert metrics["inputs"] == {"gold": "gold.swc", "test": "test.swc"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    again = run("evaluate", "gold.swc", "test.swc", "--json", str(out), cwd=tmp_path)
    assert again.returncode == 2 and "exists already; pass --overwrite" in again.stderr
    flags = run("evaluate", "gold.swc", "test.swc", "--voxel-size", "1", "1", "1", "--tau", "3",
                "--json", str(out), "--overwrite", cwd=tmp_path)
    assert flags.returncode == 0, flags.stderr
    assert json.loads(out.read_text())["length"]["tau"] == 3.0 and flags.stderr == ""

    (tmp_path / "plain.swc").write_text("1 1 0 0 0 1 -1\n2 3 5 0 0 1 1\n")
    plain = run("evaluate", "plain.swc", "plain.swc", cwd=tmp_path)
    assert plain.returncode == 0 and "using 1 1 1 um" in plain.stderr
