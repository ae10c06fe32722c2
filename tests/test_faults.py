"""Faults: a worker killed mid-run, and the whole run killed and rerun, change nothing in the outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neurotrace_dask.cluster import open_client
from neurotrace_dask.config import ClusterConfig, LocalClusterConfig, SynthConfig, TraceConfig
from neurotrace_dask.synth import random_scene, render_to_zarr
from neurotrace_dask.trace import trace_volume

NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))
BLOCK = (16, 32, 32)  # many small blocks: a run lasts long enough to be interrupted


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "scene"
    render_to_zarr(random_scene(3, (48, 256, 256), SynthConfig(voxel_size=(1, 0.5, 0.5), seed=9)), out,
                  chunks=BLOCK)  # blocks align to chunks
    return out / "image.ome.zarr"


@pytest.fixture(scope="module")
def undisturbed(image, tmp_path_factory):
    out = tmp_path_factory.mktemp("calm") / "traced"
    trace_volume(image, out, TraceConfig(block=BLOCK), raw=True,
                 cluster=ClusterConfig(local=LocalClusterConfig(n_workers=1, threads_per_worker=2, processes=False)))
    return out


def outputs(folder: Path) -> dict[str, bytes]:
    files = [folder / "neurons.swc", folder / "neurons.csv", folder / "review.csv", *sorted((folder / "neurons").glob("*"))]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def kill_after(process: subprocess.Popen, markers: Path, blocks: int) -> None:
    """SIGKILL ``process`` (and its workers) once ``blocks`` done markers exist in ``markers``."""
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None and len(list(markers.glob("*"))) < blocks:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def test_a_worker_killed_mid_trace(image, undisturbed, tmp_path):
    cluster = ClusterConfig(local=LocalClusterConfig(n_workers=2, threads_per_worker=1, processes=True))
    with open_client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        fragments = tmp_path / "traced.partial" / "fragments"

        def kill_when_started() -> None:
            deadline = time.time() + 120
            while time.time() < deadline and not (fragments.is_dir() and any(fragments.iterdir())):
                time.sleep(0.05)
            os.kill(pids[0], signal.SIGKILL)  # the nanny starts a new worker; its tasks run again

        killer = threading.Thread(target=kill_when_started)
        killer.start()
        trace_volume(image, tmp_path / "traced", TraceConfig(block=BLOCK), raw=True, client=client)
        killer.join()
        assert set(client.run(os.getpid).values()) != set(pids)  # a worker really died
    assert outputs(tmp_path / "traced") == outputs(undisturbed)


def test_the_whole_run_killed_and_rerun(image, undisturbed, tmp_path):
    out = tmp_path / "traced"
    command = [NEUROTRACE, "trace", str(image), "--out", str(out), "--raw", "--block", *map(str, BLOCK),
               "--workers", "1", "--threads", "1"]  # fmt: skip
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    markers = tmp_path / "traced.partial" / "done.zarr" / "c"
    kill_after(first, markers, 20)
    assert not out.exists() and markers.is_dir()  # nothing half-written looks finished
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "done before" in rerun.stdout and " 0 done before" not in rerun.stdout
    assert outputs(out) == outputs(undisturbed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from neurotrace_dask.model import ModelSpec, build_model, save_checkpoint

    spec = ModelSpec(width=4, modules_per_stage=1)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", build_model(spec, seed=0).eval(), spec,
                           voxel_size=(1.0, 0.5, 0.5))  # fmt: skip


def test_prediction_killed_and_rerun(image, checkpoint, tmp_path):
    import numpy as np
    import zarr

    def command(out: Path) -> list[str]:
        return [NEUROTRACE, "predict", str(image), "--out", str(out), "--checkpoint", str(checkpoint),
                "--block", *map(str, BLOCK), "--workers", "1", "--threads", "1"]  # fmt: skip

    calm = subprocess.run(command(tmp_path / "calm.ome.zarr"), capture_output=True, text=True, timeout=300)
    assert calm.returncode == 0, calm.stderr
    out = tmp_path / "prob.ome.zarr"
    first = subprocess.Popen(command(out), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_after(first, tmp_path / "prob.ome.zarr.partial" / "neurotrace_done" / "c", 10)
    assert not out.exists()
    rerun = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert " 0 done before" not in rerun.stdout
    a = zarr.open_array(out / "0", mode="r")[...]
    b = zarr.open_array(tmp_path / "calm.ome.zarr" / "0", mode="r")[...]
    np.testing.assert_array_equal(a, b)
