"""A short soak (``benchmarks/soak.py``): the pipeline again and again on one cluster of worker
processes, a worker killed with SIGKILL mid-run and all restarted, within the memory bounds and
leaving no temporary files; and the soak's checks themselves fail when they should."""

from __future__ import annotations

import doctest
from dataclasses import replace

import pytest

from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def soak():
    with benchmark_module("soak") as module:
        yield module


def test_docstring_examples(soak):
    result = doctest.testmod(soak)
    assert result.attempted > 0 and result.failed == 0


def sample(soak, iteration: int, *, scheduler_mb=500.0, worker_mb=550.0, **changes):
    workers = [{"address": f"tcp://w{i}", "pid": 100 + i, "rss_mb": worker_mb, "age": 1} for i in range(2)]
    base = soak.Sample(iteration=iteration, seconds=10.0, killed=None, kill_during_run=None, kill_stage=None,
                       kill_busy=None, cycle_end=iteration % 2 == 0, restarted_after=iteration % 2 == 0,
                       restart_seconds=2.0, guard_wait_s=0.0,
                       scheduler_mb=scheduler_mb, scheduler_in_process=True, workers=workers,
                       peak_this_process_mb=scheduler_mb, peak_worker_mb=1400.0, fds=50, sockets=24, threads=17,
                       children_live=3, children_zombie=0, tmp_entries=36, leftovers=[], stages_complete=True,
                       neurons_sha256="abc", length_f1=0.8)  # fmt: skip
    return replace(base, **changes)


def steady(soak, n=9, **changes):
    baseline = {"children_live": 3, "children_zombie": 0, "fds": 42, "sockets": 18, "threads": 15, "tmp_entries": 36,
                "scheduler_mb": 260.0}  # fmt: skip
    result = soak.SoakResult(baseline=baseline)
    result.samples = [sample(soak, i + 1, **changes) for i in range(n)]
    return result


def test_checks_pass_on_a_steady_soak(soak):
    checks = soak.verdicts(steady(soak), set(), set(soak.DASK_FIXED))
    assert all(c["ok"] for c in checks.values()), checks


@pytest.mark.parametrize("what", ["scheduler", "workers", "files", "sockets", "threads"])
def test_checks_catch_growth(soak, what):
    result = steady(soak)
    for s in result.samples:  # 60 MB, 60 MB, 2 files, 5 sockets or 2 threads more per iteration
        if what == "scheduler":
            s.scheduler_mb += 60 * s.iteration
        elif what == "workers":
            s.workers[1]["rss_mb"] += 60 * s.iteration
        elif what == "files":
            s.fds += 2 * s.iteration
        elif what == "sockets":
            s.fds += 5 * s.iteration
            s.sockets += 5 * s.iteration
        else:
            s.threads += 2 * s.iteration
    name = {"scheduler": "scheduler_rss", "workers": "worker_rss_cycle_end", "files": "fds_files",
            "sockets": "fds_sockets"}.get(what, what)  # fmt: skip
    checks = soak.verdicts(result, set(), set())
    assert not checks[name]["ok"]
    assert all(c["ok"] for n, c in checks.items() if n != name)


def test_checks_catch_leaks_and_broken_runs(soak):
    result = steady(soak)
    result.samples[4].leftovers = ["traced.partial"]
    result.samples[5].children_zombie = 1
    result.samples[6].neurons_sha256 = "other"
    result.samples[7].tmp_entries = 60
    checks = soak.verdicts(result, {"input"}, {"input", *soak.DASK_FIXED, "tmpk3x9/junk.bin"})
    failed = {n for n, c in checks.items() if not c["ok"]}
    assert failed == {"run_folders_finished", "child_processes", "same_output", "tmp_during_run", "tmp_after_close"}
    assert checks["tmp_after_close"]["leaked"] == ["tmpk3x9/junk.bin"]


def test_a_killed_worker_that_never_comes_back_fails(soak):
    result = steady(soak)
    result.samples[0] = replace(result.samples[0], killed=100, kill_during_run=True, kill_stage="trace")  # alive
    assert not soak.verdicts(result, set(), set())["workers_replaced"]["ok"]


def test_short_soak(soak, tmp_path):
    """Six runs of the pipeline on the demo's neuron, tracing the raw image (the network's
    prediction alone takes 6-7 s a run here): the worker running the trace task SIGKILLed in
    run 2, every worker restarted after run 3, seconds after the kill (the race that
    open_client's lost-worker timeout fixes)."""
    lines: list[str] = []
    result, checks, info = soak.soak_in_private_tmp(
        tmp_path / "tmp", iterations=6, restart_every=3, kill_every=2, raw=True, kill_stages=["trace"],
        kill_delay=(0.0, 0.1), log=lines.append)  # fmt: skip
    table = "\n".join(lines)
    failed = {name: check for name, check in checks.items() if not check["ok"]}
    assert not failed, f"{failed}\n{table}"
    assert [s.iteration for s in result.samples] == [1, 2, 3, 4, 5, 6]
    assert [s.restarted_after for s in result.samples] == [False, False, True, False, False, False], table
    assert [bool(s.killed) for s in result.samples] == [False, True, False, False, False, False], table
    killed = result.samples[1]
    # The pipeline lost the worker running its trace task mid-run and still finished.
    assert killed.kill_during_run and killed.kill_stage == "trace" and killed.kill_busy, table
    assert killed.killed not in {w["pid"] for w in killed.workers}  # the nanny replaced it
    before, after = ({w["pid"] for w in result.samples[i].workers} for i in (2, 3))
    assert not before & after  # the restart replaced both workers
    assert killed.length_f1 is not None and killed.length_f1 == result.samples[0].length_f1
