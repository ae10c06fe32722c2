"""A full disk and a read-only output folder: one clear error, and no store left looking complete.

Each command runs in its own mount namespace (``unshare``) with its output on a real tmpfs,
either tiny (the kernel answers ENOSPC) or mounted read-only (EROFS); what the command left
there is copied out before the namespace ends.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from neurotrace_dask.io.omezarr import is_complete

NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))
CLUSTER = ["--workers", "1", "--threads", "1"]
SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "voxresnet_small_random.json"


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -rm and tmpfs mounts (Linux user namespaces)")


def on_small_disk(tmp_path: Path, options: str, arguments: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``neurotrace ARGUMENTS`` with a tmpfs (mount ``options``) at ``tmp_path/disk``.

    Returns the finished process and a copy of what it left on that disk.
    """
    disk, left = tmp_path / "disk", tmp_path / "left"
    disk.mkdir()
    script = f'mount -t tmpfs -o {options} tmpfs "{disk}" || exit 99; "$@"; rc=$?; cp -a "{disk}" "{left}"; exit $rc'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", NEUROTRACE, *arguments],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 99, result.stderr
    return result, left


def assert_one_error(result: subprocess.CompletedProcess, *words: str) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture(scope="module")
def noise_tiff(tmp_path_factory) -> Path:
    # Incompressible: 4 MB of random 16-bit voxels cannot fit on a 512 kB disk.
    path = tmp_path_factory.mktemp("input") / "noise.tif"
    data = np.random.default_rng(1).integers(0, 65535, (32, 256, 256)).astype(np.uint16)
    tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "ZYX"})
    return path


@pytest.fixture(scope="module")
def noise_image(noise_tiff, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image") / "noise.ome.zarr"
    done = subprocess.run([NEUROTRACE, "convert", str(noise_tiff), str(out), "--chunks", "16", "64", "64", *CLUSTER],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_convert_onto_a_full_disk(noise_tiff, tmp_path):
    result, left = on_small_disk(tmp_path, "size=512k",
                                 ["convert", str(noise_tiff), str(tmp_path / "disk" / "out.ome.zarr"), *CLUSTER])  # fmt: skip
    assert_one_error(result, "out.ome.zarr", "No space left on device")
    assert not (left / "out.ome.zarr").exists()
    assert not is_complete(left / "out.ome.zarr.partial")  # resumable once there is space, never mistaken as done


def test_predict_onto_a_full_disk(noise_image, tmp_path):
    result, left = on_small_disk(tmp_path, "size=96k",
                                 ["predict", str(noise_image), "--out", str(tmp_path / "disk" / "prob.ome.zarr"),
                                  "--checkpoint", str(SHIPPED), "--block", "16", "64", "64", *CLUSTER])  # fmt: skip
    assert_one_error(result, "prob.ome.zarr", "No space left on device")
    assert not (left / "prob.ome.zarr").exists()
    assert not is_complete(left / "prob.ome.zarr.partial")


def test_trace_onto_a_full_disk(noise_image, tmp_path):
    result, left = on_small_disk(tmp_path, "size=8k", ["trace", str(noise_image), "--out", str(tmp_path / "disk" / "t"),
                                                       "--raw", "--block", "16", "64", "64", *CLUSTER])  # fmt: skip
    assert_one_error(result, "No space left on device")
    assert not (left / "t").exists()


def test_run_into_a_read_only_folder(noise_tiff, tmp_path):
    result, left = on_small_disk(tmp_path, "ro", ["run", str(noise_tiff), "--out", str(tmp_path / "disk" / "run"),
                                                  "--raw", *CLUSTER])  # fmt: skip
    assert_one_error(result, "Read-only file system", "run")
    assert list(left.iterdir()) == []


def test_trace_into_a_read_only_folder(noise_image, tmp_path):
    result, left = on_small_disk(tmp_path, "ro", ["trace", str(noise_image), "--out", str(tmp_path / "disk" / "traced"),
                                                  "--raw", *CLUSTER])  # fmt: skip
    assert_one_error(result, "Read-only file system", "traced")
    assert list(left.iterdir()) == []
