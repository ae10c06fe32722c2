"""One command end to end: convert -> predict -> trace + stitch -> report (-> evaluate).

A run folder explains itself::

    OUT/image.ome.zarr     the converted image (with its pyramid)
    OUT/prob.ome.zarr      p(neurite) as uint8 (not with --raw)
    OUT/traced/            neurons/NNNN.swc, neurons.csv, neurons.swc, review.csv, fragments/
    OUT/report.html        projections, neurons overlaid, per-neuron statistics, review list
    OUT/metrics.json       against a gold SWC, when one is given
    OUT/run.json           resolved config, versions, per-stage fingerprints and timings

Each stage is skipped when its output is complete and its inputs and parameters are
unchanged (a fingerprint in ``run.json``), and resumes its done blocks when it was cut
short. A finished stage whose inputs or parameters changed is refused unless ``overwrite``.

Examples
--------
>>> from neurotrace_dask.pipeline import run
>>> run("cell.tif", "cell_run").summary()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import ClusterConfig, Config
from .errors import ConfigError, OutputError

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["RunResult", "default_checkpoint", "plan", "run", "status"]

STATE = "run.json"
#: Throughputs measured by the benchmarks on a 2-core machine (README), used by ``--dry-run``:
#: voxels per second per core for prediction (small model, CPU) and for blocked tracing.
PREDICT_VOXELS_PER_CORE_S = 0.64e6
TRACE_VOXELS_PER_CORE_S = 5e6
CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


#: The shipped checkpoint used when none is given: the best of the model card (checkpoints/README.md).
DEFAULT_CHECKPOINT = "voxresnet_small_default.json"


def default_checkpoint() -> Path | None:
    """The shipped checkpoint prediction uses when none is given, if the checkpoints are there."""
    path = CHECKPOINTS / DEFAULT_CHECKPOINT
    return path if path.is_file() else None


@dataclass
class StageRecord:
    """One stage of a run: ``ran`` or ``skipped`` (complete, unchanged), its seconds and summary."""

    name: str
    status: str
    seconds: float
    summary: str = ""
    resumed: int = 0  # blocks found done by an interrupted earlier run


@dataclass
class RunResult:
    """What :func:`run` did and wrote."""

    out: Path
    stages: list[StageRecord] = field(default_factory=list)
    metrics: dict[str, Any] | None = None

    @property
    def neurons(self) -> Path:
        return self.out / "traced" / "neurons"

    @property
    def report(self) -> Path:
        return self.out / "report.html"

    def image(self, level: int = 0) -> Any:
        """The converted image as a lazy dask array (a pyramid ``level``); nothing is read yet."""
        return _lazy(self.out / "image.ome.zarr", level)

    def probability(self) -> Any:
        """p(neurite) x 255 as a lazy dask array (not for a ``raw`` run)."""
        return _lazy(self.out / "prob.ome.zarr", 0)

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{s.name:8s} {s.status:7s} {s.seconds:7.1f} s  {s.summary.splitlines()[0] if s.summary else ''}"
                 + (f" (resumed: {s.resumed} block(s) done before)" if s.resumed else "") for s in self.stages]  # fmt: skip
        if self.metrics:
            length = self.metrics["length"]
            lines.append(f"against the gold standard: length F1 {length['f1']:.3f} (precision "
                         f"{length['precision']:.3f}, recall {length['recall']:.3f}); {self.out / 'metrics.json'}")  # fmt: skip
        lines += [f"neurons: {self.neurons}/ (one SWC each), index {self.out / 'traced' / 'neurons.csv'}",
                  f"report:  {self.report}"]  # fmt: skip
        return "\n".join(lines)


def _lazy(path: Path, level: int) -> Any:
    import dask.array as da

    from .io.omezarr import open_image

    return da.from_zarr(open_image(path)[0][level])


def _fingerprint(**parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_state(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str), encoding="utf-8")
    tmp.replace(out / STATE)


def _versions() -> dict[str, str]:
    import dask
    import numpy
    import torch
    import zarr

    return {"neurotrace_dask": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "dask": dask.__version__, "zarr": zarr.__version__, "torch": torch.__version__}  # fmt: skip


def run(
    input: str | Path,
    out: str | Path,
    config: Config | None = None,
    *,
    raw: bool = False,
    checkpoint: str | Path | None = None,
    seeds: str | Path | None = None,
    gold: str | Path | None = None,
    overwrite: bool = False,
    client: Client | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Run the whole pipeline on one input; see the module docstring for the run folder.

    Parameters
    ----------
    input : path
        Anything ``neurotrace convert`` reads: TIFF, a folder of slices, HDF5, Zarr.
    out : path
        The run folder (created; an existing one is resumed).
    config : Config
        All stages' options (``convert``, ``predict``, ``trace``, ``cluster``).
    raw : bool
        Trace the image itself (no network, no probability map).
    checkpoint : path, optional
        Network weights (``NAME.json``); default ``predict.checkpoint``, else the shipped
        :func:`default_checkpoint`.
    seeds, gold : path, optional
        Seed voxels for tracing (CSV z,y,x); a gold SWC to evaluate against (voxel
        coordinates of the image, or with a ``voxel_size_um`` header).
    overwrite : bool
        Redo finished stages whose inputs or parameters changed.
    client : distributed.Client, optional
        An open client (left open); else one cluster from ``config.cluster`` serves all stages.
    progress : callable, optional
        Called with one line as each stage starts.
    """
    from .cluster import open_client
    from .evaluate import evaluate
    from .io.convert import convert
    from .io.omezarr import is_complete, open_image, refuse_constant
    from .io.swc import read_swc
    from .model import load_checkpoint
    from .predict import predict
    from .report import write_report
    from .trace import read_seeds, trace_volume

    config = config or Config()
    out = Path(out).resolve()
    input = Path(input).resolve() if Path(input).exists() else input
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (out / STATE).is_file():
        raise OutputError(f"{out}: exists and is not a neurotrace run folder; choose another --out")
    # Every small input is checked before any work starts or anything is written.
    sha = None
    if not raw:
        checkpoint = checkpoint or config.predict.checkpoint or default_checkpoint()
        if checkpoint is None:
            raise ConfigError("no checkpoint: pass --checkpoint NAME.json, or --raw to trace without the network")
        sha = load_checkpoint(checkpoint).sha256
    if seeds is not None:
        read_seeds(seeds)
    elif config.trace.keep == "seeded":
        raise ConfigError("trace.keep 'seeded' needs --seeds (a CSV of seed voxels)")
    gold_swc = read_swc(gold) if gold is not None else None
    out.mkdir(parents=True, exist_ok=True)
    state = _read_state(out)
    state.setdefault("stages", {})
    state.update(config=config.model_dump(mode="json"), versions=_versions(), input=str(input), raw=raw)
    _write_state(out, state)
    say = progress or (lambda line: None)
    result = RunResult(out)

    def stage(name: str, fingerprint: str, done: Callable[[], bool], work: Callable[[bool], Any]) -> None:
        record = state["stages"].get(name, {})
        if record.get("complete") and record.get("fingerprint") == fingerprint and done():
            result.stages.append(StageRecord(name, "skipped", 0.0, record.get("summary", "")))
            return
        if record.get("complete") and record.get("fingerprint") != fingerprint and not overwrite:
            raise OutputError(f"{out}: stage {name} was run with other inputs or parameters; "
                              "pass --overwrite to redo it")  # fmt: skip
        say(f"{name} ...")
        state["stages"][name] = {"fingerprint": fingerprint, "complete": False}
        _write_state(out, state)
        started = time.perf_counter()
        # Same fingerprint, not complete: an interrupted run of this very stage; let it resume.
        outcome = work(overwrite or record.get("fingerprint") == fingerprint)
        seconds = time.perf_counter() - started
        summary = outcome.summary()
        resumed = int(getattr(outcome, "resumed", getattr(outcome, "blocks_skipped", 0)))
        state["stages"][name] = {"fingerprint": fingerprint, "complete": True, "seconds": seconds, "summary": summary,
                                 "resumed_blocks": resumed}  # fmt: skip
        _write_state(out, state)
        result.stages.append(StageRecord(name, "ran", seconds, summary, resumed))

    image, prob, traced = out / "image.ome.zarr", out / "prob.ome.zarr", out / "traced"
    with open_client(config.cluster if client is None else None, client) as active:
        convert_config = config.convert.model_dump(mode="json", exclude={"overwrite"})
        fp_convert = _fingerprint(input=str(input), convert=convert_config)
        stage("convert", fp_convert, lambda: is_complete(image),
              lambda again: convert(input, image, config.convert.model_copy(update={"overwrite": again}),
                                    client=active))  # fmt: skip
        refuse_constant(image, input)
        if raw:
            fp_predict = fp_convert
        else:
            fp_predict = _fingerprint(image=fp_convert, checkpoint=sha,
                                      predict=config.predict.model_dump(mode="json", exclude={"overwrite", "checkpoint"}))  # fmt: skip
            predict_config = config.predict.model_copy(update={"checkpoint": Path(checkpoint)})
            stage("predict", fp_predict, lambda: is_complete(prob),
                  lambda again: predict(image, prob, predict_config.model_copy(update={"overwrite": again}),
                                        client=active))  # fmt: skip
        fp_trace = _fingerprint(source=fp_predict, raw=raw, seeds=str(seeds),
                                trace=config.trace.model_dump(mode="json", exclude={"overwrite"}))  # fmt: skip
        stage("trace", fp_trace, lambda: (traced / "neurons.csv").is_file(),
              lambda again: trace_volume(image if raw else prob, traced,
                                         config.trace.model_copy(update={"overwrite": again}), raw=raw, seeds=seeds,
                                         client=active))  # fmt: skip
        if gold_swc is not None:
            _, voxel = open_image(image)
            merged = traced / "neurons.swc"
            test = read_swc(merged) if merged.is_file() else None
            if test is not None:
                result.metrics = evaluate(gold_swc, test, voxel_size_zyx=voxel).to_dict()
                (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1, default=float), encoding="utf-8")
        started = time.perf_counter()
        say("report ...")
        write_report(out, image=image, traced=traced, probability=None if raw else prob, metrics=result.metrics,
                     stages=[asdict(s) for s in result.stages])  # fmt: skip
        result.stages.append(StageRecord("report", "ran", time.perf_counter() - started, f"wrote {result.report}"))
    state["stages"]["report"] = {"complete": True, "seconds": result.stages[-1].seconds}
    _write_state(out, state)
    return result


def plan(input: str | Path, config: Config | None = None, *, raw: bool = False) -> str:
    """The ``--dry-run`` plan: blocks per stage, memory per worker and time, from measured rates.

    Examples
    --------
    >>> print(plan("cell.tif"))  # doctest: +SKIP
    """
    from .blocks import BlockGrid
    from .io.omezarr import default_chunks
    from .io.volumes import open_volume
    from .model import STRIDE

    config = config or Config()
    source = open_volume(input, channel=config.convert.channel)
    shape = tuple(int(n) for n in source.shape)
    chunks = config.convert.chunks or default_chunks(shape, source.dtype)
    voxels = math.prod(shape)
    cores = _cores(config.cluster)
    lines = [f"input {input}: shape {shape} {source.dtype}, {voxels / 1e9:.2f} Gvoxel; {cores} worker core(s)"]
    if not raw:
        grid = BlockGrid.for_storage(shape, config.predict.block, chunks_or_shards=chunks, stride=STRIDE,
                                     halo=config.predict.halo)  # fmt: skip
        read = math.prod(min(b + 2 * config.predict.halo, n) for b, n in zip(grid.write_shape, shape, strict=True))
        memory = 0.5 + read * 4 * 60 / 2**30  # measured ~3.5 GB at a 128x320x320 pass (float32 activations)
        lines.append(f"predict: {len(grid)} block(s) of {grid.write_shape}, ~{memory:.1f} GiB per worker thread, "
                     f"~{voxels / PREDICT_VOXELS_PER_CORE_S / cores / 60:.1f} min on CPU")  # fmt: skip
    block = config.trace.block or (shape if voxels <= 2**27 else (256, 256, 256))
    grid = BlockGrid(shape, block, halo=config.trace.halo, align=chunks if config.trace.block else 1)
    read = math.prod(min(b + 2 * config.trace.halo, n) for b, n in zip(grid.write_shape, shape, strict=True))
    lines.append(f"trace:   {len(grid)} block(s) of {grid.write_shape}, ~{0.3 + read * 24 / 2**30:.1f} GiB per worker "
                 f"thread, at most ~{voxels / TRACE_VOXELS_PER_CORE_S / cores / 60:.1f} min (empty blocks cost nothing)")  # fmt: skip
    lines.append("rates: benchmarks/results/predict_large.json and trace_scale.json on 2 cores; a GPU predicts faster")
    return "\n".join(lines)


def _cores(cluster: ClusterConfig) -> int:
    import os

    if cluster.kind == "local":
        local = cluster.local
        workers = local.n_workers or 1
        threads = local.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        return workers * threads
    return 1


def status(out: str | Path) -> str:
    """Which stages of a run folder are done, and how many blocks of a stage in progress.

    Examples
    --------
    >>> print(status("cell_run"))  # doctest: +SKIP
    """
    import zarr

    out = Path(out)
    state = _read_state(out)
    if not state:
        raise OutputError(f"{out}: not a neurotrace run folder (no {STATE})")
    lines = [f"{out}: input {state.get('input')}{' (traced raw)' if state.get('raw') else ''}"]
    stages = ["convert", "trace", "report"] if state.get("raw") else ["convert", "predict", "trace", "report"]
    # Each stage's done-marker store (convert: its level-0 pass, the bulk of its work).
    markers = {"convert": out / "image.ome.zarr.partial" / "neurotrace_done" / "level0",
               "predict": out / "prob.ome.zarr.partial" / "neurotrace_done", "trace": out / "traced.partial" / "done.zarr"}  # fmt: skip
    for name in stages:
        record = state["stages"].get(name)
        if record is None:
            lines.append(f"  {name:8s} not started")
        elif record.get("complete"):
            lines.append(f"  {name:8s} done ({record.get('seconds', 0):.1f} s)")
        else:
            done = "in progress"
            try:  # one stored chunk per done block
                array = zarr.open_array(markers[name], mode="r")
                done = f"in progress: {array.nchunks_initialized} of {array.shape[0]} blocks done"
            except Exception:  # not started yet
                pass
            lines.append(f"  {name:8s} {done}")
    return "\n".join(lines)
