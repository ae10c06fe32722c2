"""Clients for real: a local cluster, a scheduler started by the test, and a SLURM job script."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from neurotrace_dask.cluster import get_client, make_slurm_cluster, open_client, run_tasks
from neurotrace_dask.config import ClusterConfig, LocalClusterConfig, SlurmConfig, load_config
from neurotrace_dask.errors import ConfigError

DASK = str(Path(sys.executable).with_name("dask"))


def _square(x: int) -> int:
    return x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def test_a_worker_dying_soon_after_a_restart_comes_back():
    # distributed's 15 s lost-worker timer, armed by the restart, used to close the nanny of a
    # worker that died again just before it fired: the cluster stayed one worker short.
    import os
    import signal

    config = ClusterConfig(local=LocalClusterConfig(n_workers=2, threads_per_worker=1), dashboard_address="127.0.0.1:0")
    with open_client(config) as client:
        client.restart()
        time.sleep(14)
        os.kill(next(iter(client.run(os.getpid).values())), signal.SIGKILL)
        deadline = time.time() + 40
        while time.time() < deadline and len(client.scheduler_info()["workers"]) < 2:
            time.sleep(0.5)
        time.sleep(3)  # past the old timer's firing: the worker must still be there
        assert len(client.scheduler_info()["workers"]) == 2
        assert len(client.cluster.workers) == 2


def test_local_processes_cluster():
    config = ClusterConfig(local=LocalClusterConfig(n_workers=2, threads_per_worker=1), dashboard_address="127.0.0.1:0")
    with open_client(config) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        assert all(w["host"] == "127.0.0.1" for w in workers.values())
        assert run_tasks(client, _square, range(30), tasks_per_thread=2) == [x * x for x in range(30)]
        cluster = client.cluster
    assert cluster.status.name == "closed"


@pytest.mark.parametrize("processes", [False, True])
def test_everything_listens_on_localhost_by_default(processes):
    config = ClusterConfig(local=LocalClusterConfig(n_workers=1, processes=processes),
                           dashboard_address="127.0.0.1:0")
    with open_client(config) as client:
        me = psutil.Process()
        listening = [c.laddr.ip for p in [me, *me.children(recursive=True)] for c in p.net_connections()
                     if c.status == psutil.CONN_LISTEN]
        assert run_tasks(client, pow, [3], exp=2) == [9]
    assert listening and set(listening) == {"127.0.0.1"}


def test_run_tasks_raises_first_error(client):
    with pytest.raises(ValueError, match="three"):
        run_tasks(client, _fail_on_three, range(10))


@pytest.mark.skipif(not Path(DASK).exists(), reason="the dask command-line tool is not installed")
def test_existing_scheduler_by_address(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
         "--scheduler-file", str(scheduler_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    worker = None
    try:
        deadline = time.time() + 30
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        import json

        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen(
            [DASK, "worker", address, "--nthreads", "1", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        config = load_config(overrides={"cluster": {"kind": "address", "address": address}})
        with open_client(config.cluster) as client:
            client.wait_for_workers(1, timeout=30)
            # A builtin: the external processes cannot import this test module.
            assert run_tasks(client, pow, [2, 3], exp=2) == [4, 9]
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)


def test_unreachable_scheduler_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        get_client(ClusterConfig(kind="address", address="tcp://127.0.0.1:9", connect_timeout="2s"))


def test_slurm_job_script_from_example_config():
    pytest.importorskip("dask_jobqueue")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "slurm.yaml").cluster.slurm
    cluster = make_slurm_cluster(config, dashboard_address="127.0.0.1:0")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -t 08:00:00" in script
    assert "#SBATCH -p compute" in script and "#SBATCH -A my-lab" in script
    assert "#SBATCH --exclusive" in script and "module load cuda" in script
    assert "--lifetime 7h45m" in script and "--lifetime-stagger 10m" in script
    assert "--nworkers 4" in script


def test_slurm_without_jobqueue_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(ConfigError, match=r"pip install 'neurotrace-dask\[slurm\]'"):
        make_slurm_cluster(SlurmConfig())


def test_open_client_leaves_given_client_open(client):
    with open_client(client=client) as same:
        assert same is client
    assert client.status == "running"
