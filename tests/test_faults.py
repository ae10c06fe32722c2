"""Faults: a worker killed mid-run, and the whole run killed and rerun, change nothing in the outputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import zarr

from neurotrace_dask.cluster import open_client
from neurotrace_dask.config import (
    ClusterConfig,
    ConvertConfig,
    LocalClusterConfig,
    PredictConfig,
    SynthConfig,
    TraceConfig,
)
from neurotrace_dask.io.convert import convert
from neurotrace_dask.pipeline import status
from neurotrace_dask.predict import predict
from neurotrace_dask.synth import random_scene, render, render_to_zarr
from neurotrace_dask.trace import trace_volume

NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))
BLOCK = (16, 32, 32)  # many small blocks: a run lasts long enough to be interrupted
TWO_WORKERS = ClusterConfig(local=LocalClusterConfig(n_workers=2, threads_per_worker=1, processes=True))


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
                "--block", *map(str, BLOCK), "--halo", "8", "--workers", "1", "--threads", "1"]  # fmt: skip

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


# --------------------------------------------------------------------------- helpers for the tests below


def write_tiff(path: Path, shape: tuple[int, int, int]) -> Path:
    """A rendered uint16 scene as an ImageJ TIFF (voxel size 1 x 0.5 x 0.5 um in its metadata)."""
    data, _ = render(random_scene(3, shape, SynthConfig(voxel_size=(1, 0.5, 0.5), seed=9, bits=16)))
    tifffile.imwrite(path, data, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 1.0, "unit": "um"})  # fmt: skip
    return path


def arrays(store: Path) -> dict[str, np.ndarray]:
    """Every array of an OME-Zarr store (each pyramid level), read whole."""
    return {name: array[...] for name, array in sorted(zarr.open_group(str(store), mode="r").arrays())}


def metadata(store: Path) -> dict[str, bytes]:
    """The bytes of every ``zarr.json`` of a store (group and arrays)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("zarr.json"))}


def assert_same_arrays(a: Path, b: Path) -> None:
    left, right = arrays(a), arrays(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        np.testing.assert_array_equal(left[name], right[name], err_msg=f"{a.name} level {name}")


class WorkerKiller(threading.Thread):
    """SIGKILL one Dask worker process as soon as a done marker appears in ``markers``.

    ``done_at_kill`` is how many markers there were then (``None``: never killed); stop it
    with ``stop.set()`` once the stage returned, so a late wake-up kills nothing.
    """

    def __init__(self, pid: int, markers: Path) -> None:
        super().__init__(daemon=True)
        self.pid, self.markers = pid, markers
        self.stop = threading.Event()
        self.done_at_kill: int | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            done = len(list(self.markers.glob("*")))
            if done:
                os.kill(self.pid, signal.SIGKILL)  # the nanny starts a new worker; its tasks run again
                self.done_at_kill = done
                return
            time.sleep(0.01)


def run_killing_a_worker(client, markers: Path, stage) -> tuple[object, WorkerKiller]:
    """Run ``stage()`` on ``client`` while a :class:`WorkerKiller` kills a worker mid-stage."""
    client.wait_for_workers(2, timeout=120)  # a worker killed by an earlier test is back
    pids = list(client.run(os.getpid).values())
    killer = WorkerKiller(pids[0], markers)
    killer.start()
    try:
        result = stage()
    finally:
        killer.stop.set()
        killer.join()
    assert killer.done_at_kill is not None, "no worker was killed"
    assert set(client.run(os.getpid).values()) != set(pids)  # a worker really died (and was replaced)
    return result, killer


# --------------------------------------------------------------------------- a worker killed mid-stage


@pytest.fixture(scope="module")
def two_workers():
    """Two single-threaded worker processes under nannies (a killed one is restarted), shared by the tests below."""
    with open_client(TWO_WORKERS) as client:
        yield client


def test_a_worker_killed_mid_prediction(image, checkpoint, two_workers, tmp_path):
    client = two_workers
    config = PredictConfig(checkpoint=checkpoint, block=(16, 64, 64), halo=8)  # 48 blocks, quick with a small halo
    calm = predict(image, tmp_path / "calm.ome.zarr", config, client=client)
    out = tmp_path / "prob.ome.zarr"
    markers = tmp_path / "prob.ome.zarr.partial" / "neurotrace_done" / "c"
    result, killer = run_killing_a_worker(client, markers, lambda: predict(image, out, config, client=client))
    assert killer.done_at_kill < result.blocks == calm.blocks == 48  # killed mid-stage
    assert result.resumed == 0
    assert_same_arrays(out, tmp_path / "calm.ome.zarr")
    assert metadata(out) == metadata(tmp_path / "calm.ome.zarr")


@pytest.fixture(scope="module")
def tiff16(tmp_path_factory):
    return write_tiff(tmp_path_factory.mktemp("tiff") / "scene.tif", (48, 256, 256))


def test_a_worker_killed_mid_conversion(tiff16, two_workers, tmp_path):
    client = two_workers
    # Chunks of 8 x 32 x 32 and 64 KiB tasks: 96 level-0 tasks, each also building level 1 in
    # memory, then a pass of 3 tasks for level 2 (chunks alone don't make small tasks: task_bytes does).
    config = ConvertConfig(chunks=(8, 32, 32), levels=3, task_bytes=64 << 10)
    calm = convert(tiff16, tmp_path / "calm.ome.zarr", config, client=client)
    out = tmp_path / "image.ome.zarr"
    markers = tmp_path / "image.ome.zarr.partial" / "neurotrace_done" / "level0" / "c"
    result, killer = run_killing_a_worker(client, markers, lambda: convert(tiff16, out, config, client=client))
    assert calm.blocks_written == result.blocks_written == 99 and result.blocks_skipped == 0
    assert killer.done_at_kill < 96  # killed while level 0 was being written
    assert result.layout.levels == 3
    assert_same_arrays(out, tmp_path / "calm.ome.zarr")
    assert metadata(out) == metadata(tmp_path / "calm.ome.zarr")
    assert not (out / "neurotrace_done").exists()


# --------------------------------------------------------------------------- the whole pipeline killed in each stage

RUN_CONFIG = """\
convert: {chunks: [16, 32, 32], levels: 3, task_bytes: 65536}  # 32 + 8 + 1 conversion tasks
predict: {block: [16, 32, 32], halo: 8}                          # 64 blocks
trace: {block: [16, 32, 32]}                                     # 64 blocks
"""


@pytest.fixture(scope="module")
def killed_run(checkpoint, tmp_path_factory):
    """``neurotrace run`` undisturbed, then the same command SIGKILLed in convert, predict and trace in turn, rerun.

    The undisturbed run is made at the same path and moved away (outputs name their inputs'
    paths). Returns the folders, ``status`` after each kill, and the last rerun.
    """
    folder = tmp_path_factory.mktemp("killed_run")
    tiff = write_tiff(folder / "scene.tif", (32, 128, 256))
    (folder / "run.yaml").write_text(RUN_CONFIG)
    out, calm = folder / "run", folder / "calm"
    command = [NEUROTRACE, "run", str(tiff), "--out", str(out), "--config", str(folder / "run.yaml"),
               "--checkpoint", str(checkpoint), "--workers", "1", "--threads", "2"]  # fmt: skip
    undisturbed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert undisturbed.returncode == 0, undisturbed.stderr
    out.rename(calm)
    stages = {
        "convert": (out / "image.ome.zarr", out / "image.ome.zarr.partial" / "neurotrace_done" / "level0" / "c"),
        "predict": (out / "prob.ome.zarr", out / "prob.ome.zarr.partial" / "neurotrace_done" / "c"),
        "trace": (out / "traced", out / "traced.partial" / "done.zarr" / "c"),
    }
    statuses = {}
    for name, (output, markers) in stages.items():
        with open(folder / f"killed_in_{name}.log", "wb") as log:  # a file, not a pipe nobody reads
            process = subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
            kill_after(process, markers, 3)
        assert not output.exists(), f"{name} had finished when the run was killed"
        statuses[name] = status(out)  # what `neurotrace status RUN` prints
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    return SimpleNamespace(out=out, calm=calm, statuses=statuses, final=final)


def test_the_whole_run_killed_in_each_stage_and_rerun(killed_run):
    out, calm = killed_run.out, killed_run.calm
    for name, text in killed_run.statuses.items():
        assert re.search(rf"^  {name} +in progress", text, re.M), text
    for name in ("predict", "trace"):
        done, total = map(int, re.search(rf"{name} +in progress: (\d+) of (\d+) blocks done",
                                          killed_run.statuses[name]).groups())  # fmt: skip
        assert 0 < done < total == 64
    # Each rerun resumed the stage it found cut short, and said how many blocks were done.
    stages = json.loads((out / "run.json").read_text())["stages"]
    for name in ("convert", "predict", "trace"):
        assert stages[name]["complete"] and stages[name]["resumed_blocks"] > 0, stages[name]
    assert re.search(r"^trace +ran .*\(resumed: [1-9]\d* block\(s\) done before\)", killed_run.final.stdout, re.M)
    assert re.search(r"^convert +skipped", killed_run.final.stdout, re.M)
    assert re.search(r"^predict +skipped", killed_run.final.stdout, re.M)
    assert re.search(r"^trace +ran", killed_run.final.stdout, re.M)
    # Byte-identical neurons, identical arrays, and nothing left over.
    assert outputs(out / "traced") == outputs(calm / "traced")
    assert sorted(os.listdir(out / "traced" / "fragments")) == sorted(os.listdir(calm / "traced" / "fragments"))
    for store in ("image.ome.zarr", "prob.ome.zarr"):
        assert_same_arrays(out / store, calm / store)
        assert metadata(out / store) == metadata(calm / store)
    assert len(arrays(out / "image.ome.zarr")) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in calm.iterdir())  # no *.partial left


def test_status_counts_the_blocks_of_an_interrupted_conversion(killed_run):
    assert re.search(r"convert +in progress: \d+ of \d+ blocks done", killed_run.statuses["convert"])


def _die_inside_the_first_chunk_write(marker: str) -> None:
    """On a worker: the first chunk write of the cluster writes zarr's temporary file, then SIGKILLs its process."""
    import zarr.storage._local as local

    original = local._put

    def put(path, value, exclusive=False):
        if "/c/" in str(path):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return original(path, value, exclusive)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(f".{'0123456789abcdef' * 2}.partial").write_bytes(value.as_buffer_like())
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, value, exclusive)

    local._put = put


def test_a_worker_killed_inside_a_chunk_write_leaves_no_temporary_file(tiff16, tmp_path):
    # zarr writes a chunk to KEY.<uuid>.partial, then renames it: a worker killed in between
    # leaves that file; the block is redone elsewhere and the finished store must not keep it.
    cluster = ClusterConfig(local=LocalClusterConfig(n_workers=2, threads_per_worker=1, processes=True))
    with open_client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        client.run(_die_inside_the_first_chunk_write, str(tmp_path / "killed-once"))
        out = tmp_path / "image.ome.zarr"
        convert(tiff16, out, ConvertConfig(chunks=(8, 32, 32), levels=2, task_bytes=64 << 10), client=client)
        assert (tmp_path / "killed-once").exists() and set(client.run(os.getpid).values()) != pids
    assert [p.name for p in out.rglob("*.partial")] == []
    np.testing.assert_array_equal(zarr.open_array(out / "0", mode="r")[...], tifffile.imread(tiff16))
