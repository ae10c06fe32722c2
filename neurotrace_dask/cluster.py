"""Dask clients and the one way every stage runs its block tasks.

:func:`get_client` returns a client for a local cluster (default), an existing
scheduler, or a SLURM allocation. :func:`run_tasks` submits one task per block as
futures (so resource annotations survive; no graph fusion), keeps a bounded number in
flight, and shows progress.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster, as_completed
from tqdm.auto import tqdm

from .config import ClusterConfig, SlurmConfig
from .errors import ConfigError, NeurotraceError, storage_error

__all__ = ["get_client", "make_slurm_cluster", "open_client", "run_tasks"]


def make_slurm_cluster(config: SlurmConfig, dashboard_address: str = "127.0.0.1:8787"):
    """A ``dask_jobqueue.SLURMCluster`` from :class:`SlurmConfig` (no jobs submitted yet).

    Workers get ``--lifetime`` / ``--lifetime-stagger`` so they retire before the
    walltime kills them, and distributed reschedules their tasks elsewhere.

    Examples
    --------
    >>> cluster = make_slurm_cluster(SlurmConfig(walltime="01:00:00"))  # doctest: +SKIP
    >>> "#SBATCH -t 01:00:00" in cluster.job_script()  # doctest: +SKIP
    True
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("cluster.kind 'slurm' needs dask-jobqueue: pip install 'neurotrace-dask[slurm]'") from None
    worker_args = []
    if config.lifetime:
        worker_args += ["--lifetime", config.lifetime]
        if config.lifetime_stagger:
            worker_args += ["--lifetime-stagger", config.lifetime_stagger]
    return SLURMCluster(
        queue=config.queue,
        account=config.account,
        cores=config.cores,
        processes=config.processes,
        memory=config.memory,
        walltime=config.walltime,
        local_directory=config.local_directory,
        log_directory=config.log_directory,
        job_extra_directives=list(config.job_extra_directives),
        job_script_prologue=list(config.job_script_prologue),
        worker_extra_args=worker_args,
        scheduler_options={"dashboard_address": dashboard_address},
    )


def get_client(config: ClusterConfig | None = None) -> Client:
    """A Dask client as ``config`` says: local (default), scheduler address, or SLURM.

    The caller closes it (and its cluster, for local and SLURM) when done; prefer
    :func:`open_client`, which does that.

    Examples
    --------
    >>> from neurotrace_dask.config import ClusterConfig, LocalClusterConfig
    >>> client = get_client(ClusterConfig(local=LocalClusterConfig(processes=False, n_workers=1)))
    >>> len(client.scheduler_info()["workers"])
    1
    >>> client.close(); client.cluster.close()
    """
    config = config or ClusterConfig()
    if config.kind == "address":
        try:
            return Client(config.address, timeout=config.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {config.address} ({exc})") from None
    if config.kind == "slurm":
        cluster = make_slurm_cluster(config.slurm, config.dashboard_address)
        if config.slurm.adapt_maximum_jobs:
            cluster.adapt(minimum_jobs=config.slurm.adapt_minimum_jobs, maximum_jobs=config.slurm.adapt_maximum_jobs)
        else:
            cluster.scale(jobs=config.slurm.jobs)
        return Client(cluster)
    local = config.local
    processes = local.processes is not False  # None: a command that did not choose gets processes
    # Worker processes talk over TCP: keep scheduler, workers and their dashboards on
    # local.host (loopback by default) so nothing is exposed to the network by accident.
    network = {"host": local.host} if processes else {}
    dashboard_host = config.dashboard_address.rsplit(":", 1)[0]
    # distributed sets MALLOC_TRIM_THRESHOLD_ in worker processes, which fixes glibc's mmap
    # threshold low: every chunk buffer then page-faults fresh memory, and Zarr writes ran
    # 2.5x slower than in this process (measured). Block tasks have bounded memory anyway.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
            warnings.catch_warnings():  # fmt: skip
        # A busy dashboard port (another cluster on this machine) only moves the dashboard,
        # whose link the client reports: not worth three lines of warning before any output.
        warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
        cluster = LocalCluster(
            n_workers=local.n_workers,
            threads_per_worker=local.threads_per_worker,
            processes=processes,
            memory_limit=local.memory_limit,
            resources=local.resources or None,
            dashboard_address=config.dashboard_address,
            worker_dashboard_address=f"{dashboard_host}:0",
            silence_logs=logging.ERROR,
            **network,
        )
    return Client(cluster)


@contextmanager
def open_client(config: ClusterConfig | None = None, client: Client | None = None) -> Iterator[Client]:
    """Use ``client`` if given (left open), else make one from ``config`` and close it after."""
    if client is not None:
        yield client
        return
    client = get_client(config)
    # distributed closes a local worker's nanny for good when a worker of that name dies while
    # an earlier one's 15 s "lost worker" timer runs (dask/distributed#7312): two deaths 15 s
    # apart cost the cluster a worker. Local workers restart in seconds, so wait far longer.
    local = (config or ClusterConfig()).kind == "local"
    try:
        with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"} if local else {}):
            yield client
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


def _total_threads(client: Client) -> int:
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return max(1, sum(w.get("nthreads", 1) for w in workers.values())) if workers else max(1, os.cpu_count() or 1)


def run_tasks(
    client: Client,
    function: Callable[..., Any],
    items: Iterable[Any],
    *,
    total: int | None = None,
    description: str = "blocks",
    tasks_per_thread: int = 4,
    resources: dict[str, float] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``function(item, **kwargs)`` for every item as Dask futures, with progress.

    At most ``tasks_per_thread`` x (worker threads) tasks are in flight, so a grid of
    millions of blocks never sits in the scheduler at once. The first task error is
    raised here, after the remaining in-flight tasks are cancelled.

    Returns
    -------
    list
        The results, in the order of ``items``.

    Examples
    --------
    >>> from neurotrace_dask.config import ClusterConfig, LocalClusterConfig
    >>> with open_client(ClusterConfig(local=LocalClusterConfig(processes=False, n_workers=1))) as c:
    ...     run_tasks(c, pow, [1, 2, 3], exp=2, description="squares")
    [1, 4, 9]
    """
    items = iter(enumerate(items))
    window = tasks_per_thread * _total_threads(client)
    results: dict[int, Any] = {}
    pending = as_completed()

    def submit_next() -> bool:
        try:
            index, item = next(items)
        except StopIteration:
            return False
        future = client.submit(_call, function, index, item, kwargs, resources=resources, pure=False)
        pending.add(future)
        return True

    for _ in range(window):
        if not submit_next():
            break
    with tqdm(total=total, desc=description, unit="task", disable=None, leave=False) as bar:
        for future in pending:
            try:
                index, value, error = future.result()
                if error is not None:
                    raise error
            except BaseException:
                for other in list(pending.futures):
                    other.cancel()
                raise
            results[index] = value
            bar.update(1)
            submit_next()
    return [results[i] for i in range(len(results))]


def _call(
    function: Callable[..., Any], index: int, item: Any, kwargs: dict[str, Any]
) -> tuple[int, Any, NeurotraceError | OSError | None]:
    # A user-facing error (bad input found mid-run, a full disk) comes back as a value: raised
    # as a task failure, distributed would log it with a traceback on every worker's stderr.
    try:
        return index, function(item, **kwargs), None
    except (NeurotraceError, OSError) as exc:  # OSError: a full disk or a read-only folder
        if isinstance(exc, OSError) and storage_error(exc) is None:
            raise
        # Only the error itself travels: its context may be a library exception that does
        # not unpickle (imagecodecs' DeflateError), which would replace the message with a crash.
        exc.__context__ = exc.__cause__ = None
        return index, None, exc.with_traceback(None)
