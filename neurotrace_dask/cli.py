"""The ``neurotrace`` command.

Every user-caused problem ends as one ``error: ...`` line on stderr and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from . import __version__
from .config import dump_config, load_config
from .errors import NeurotraceError, storage_error

app = typer.Typer(
    name="neurotrace",
    help="Reconstruct neurons from optical microscopy volumes, from one cell to a whole brain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
swc_app = typer.Typer(help="Inspect SWC files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(swc_app, name="swc")

_state = {"debug": False}

Triple = tuple[int, int, int]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")]
SchedulerOption = Annotated[
    Optional[str], typer.Option("--scheduler", help="Address of a running Dask scheduler (tcp://host:8786).")
]
SlurmOption = Annotated[bool, typer.Option("--slurm", help="Run on SLURM as the config's cluster.slurm says.")]
WorkersOption = Annotated[
    Optional[int], typer.Option("--workers", help="Local cluster: workers (processes; threads for convert).", min=1)
]
ThreadsOption = Annotated[Optional[int], typer.Option("--threads", help="Local cluster: threads per worker.", min=1)]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
SEEDS_HELP = "CSV of seed voxels (z,y,x, or as its header names them): each becomes the root of its tree."
KEEP_HELP = "Neurons written: all, seeded (grown from --seeds) or largest."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"neurotrace_dask {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Reconstruct neurons from optical microscopy volumes, from one cell to a whole brain."""
    _state["debug"] = debug


def _cluster_overrides(scheduler: str | None, slurm: bool, workers: int | None, threads: int | None) -> dict[str, Any]:
    if scheduler and slurm:
        raise NeurotraceError("--scheduler and --slurm exclude each other")
    cluster: dict[str, Any] = {}
    if scheduler:
        cluster.update(kind="address", address=scheduler)
    elif slurm:
        cluster["kind"] = "slurm"
    local = {k: v for k, v in {"n_workers": workers, "threads_per_worker": threads}.items() if v is not None}
    if local:
        cluster["local"] = local
    return cluster


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None and v is not False}


@app.command()
def info() -> None:
    """Print versions, threads and GPU presence."""
    import dask
    import distributed
    import numba
    import numpy
    import tifffile
    import torch
    import zarr

    typer.echo(f"neurotrace_dask {__version__}")
    typer.echo(f"python          {platform.python_version()} ({platform.platform()})")
    for module in (numpy, dask, distributed, zarr, tifffile, numba, torch):
        typer.echo(f"{module.__name__:<15} {module.__version__}")
    typer.echo(f"cpu cores       {os.cpu_count()}")
    typer.echo(f"torch threads   {torch.get_num_threads()}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        typer.echo(f"gpu             {torch.cuda.device_count()} CUDA device(s): {names}")
    else:
        typer.echo("gpu             none (CPU only)")


@config_app.command("show")
def config_show(
    file: Annotated[Optional[Path], typer.Argument(help="YAML config file; defaults when omitted.")] = None,
) -> None:
    """Print the merged configuration (defaults + FILE) as YAML."""
    typer.echo(dump_config(load_config(file)), nl=False)


@app.command()
def convert(
    input: Annotated[str, typer.Argument(help="TIFF/BigTIFF, folder of 2D TIFFs, file.h5:/dataset, or Zarr.")],
    out: Annotated[Path, typer.Argument(help="Output OME-Zarr folder (e.g. image.ome.zarr).")],
    config: ConfigOption = None,
    voxel_size: Annotated[
        Optional[tuple[float, float, float]],
        typer.Option("--voxel-size", help="Voxel size Z Y X in micrometres (overrides file metadata)."),
    ] = None,
    channel: Annotated[Optional[int], typer.Option("--channel", help="Channel to take from multichannel input.")] = None,
    chunks: Annotated[Optional[Triple], typer.Option("--chunks", help="Chunk shape Z Y X (default ~1-2 MB).")] = None,
    shards: Annotated[Optional[Triple], typer.Option("--shards", help="Shard shape Z Y X, a multiple of chunks.")] = None,
    levels: Annotated[Optional[int], typer.Option("--levels", help="Pyramid levels incl. full resolution.")] = None,
    rescale: Annotated[
        Optional[str], typer.Option("--rescale", help="Map other dtypes linearly onto uint8 or uint16.")
    ] = None,
    overwrite: OverwriteOption = False,
    scheduler: SchedulerOption = None,
    slurm: SlurmOption = False,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Convert an image stack to a multiscale OME-Zarr (NGFF 0.5, Zarr v3), streaming."""
    from .io.convert import convert as run_convert

    overrides = {
        "convert": _drop_none(
            dict(voxel_size=voxel_size, channel=channel, chunks=chunks, shards=shards, levels=levels,
                 rescale=rescale, overwrite=overwrite)
        ),
        "cluster": _cluster_overrides(scheduler, slurm, workers, threads),
    }
    cfg = load_config(config, overrides)
    result = run_convert(input, out, cfg.convert, cluster=cfg.cluster)
    typer.echo(result.summary())


@app.command()
def predict(
    image: Annotated[Path, typer.Argument(help="OME-Zarr image (from neurotrace convert).")],
    out: Annotated[Path, typer.Option("--out", help="Probability OME-Zarr to write (uint8 = 255 p).")],
    checkpoint: Annotated[
        Optional[Path], typer.Option("--checkpoint", help="Checkpoint NAME.json (weights in NAME.safetensors).")
    ] = None,
    config: ConfigOption = None,
    block: Annotated[Optional[Triple], typer.Option("--block", help="Write block Z Y X per task.")] = None,
    halo: Annotated[Optional[int], typer.Option("--halo", help="Context voxels around each block.", min=0)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")] = None,
    overwrite: OverwriteOption = False,
    scheduler: SchedulerOption = None,
    slurm: SlurmOption = False,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Predict neurite probability over overlapping blocks on Dask (resumable)."""
    from .predict import predict as run_predict

    overrides = {
        "predict": _drop_none(
            dict(checkpoint=checkpoint, block=block, halo=halo, device=device, overwrite=overwrite)
        ),
        "cluster": _cluster_overrides(scheduler, slurm, workers, threads),
    }
    cfg = load_config(config, overrides)
    typer.echo(run_predict(image, out, cfg.predict, cluster=cfg.cluster).summary())


@app.command()
def trace(
    image: Annotated[Path, typer.Argument(help="Probability OME-Zarr (uint8, from predict), or a raw image with --raw.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: neurons/NNNN.swc, neurons.csv, review.csv.")],
    raw: Annotated[bool, typer.Option("--raw", help="The input is a raw image: threshold it locally first.")] = False,
    seeds: Annotated[Optional[Path], typer.Option("--seeds", help=SEEDS_HELP)] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help=KEEP_HELP)] = None,
    block: Annotated[Optional[Triple], typer.Option("--block", help="Voxels Z Y X traced per task.")] = None,
    high: Annotated[Optional[float], typer.Option("--high", help="Hysteresis high threshold (0-255).")] = None,
    low: Annotated[Optional[float], typer.Option("--low", help="Hysteresis low threshold (0-255).")] = None,
    config: ConfigOption = None,
    overwrite: OverwriteOption = False,
    scheduler: SchedulerOption = None,
    slurm: SlurmOption = False,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Trace neurons by voxel scooping, block by block on Dask, and stitch them (resumable)."""
    from .trace import trace_volume

    overrides = {
        "trace": _drop_none(dict(block=block, high=high, low=low, keep=keep, overwrite=overwrite)),
        "cluster": _cluster_overrides(scheduler, slurm, workers, threads),
    }
    cfg = load_config(config, overrides)
    typer.echo(trace_volume(image, out, cfg.trace, raw=raw, seeds=seeds, cluster=cfg.cluster).summary())


@app.command("run")
def run_pipeline(
    input: Annotated[Path, typer.Argument(help="TIFF stack, folder of 2D slices, file.h5:/dataset, or Zarr.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder (created, or resumed).")],
    config: ConfigOption = None,
    voxel_size: Annotated[
        Optional[tuple[float, float, float]], typer.Option("--voxel-size", help="Voxel size Z Y X in um.")
    ] = None,
    block: Annotated[Optional[Triple], typer.Option("--block", help="Voxels Z Y X per task (predict and trace).")] = None,
    checkpoint: Annotated[
        Optional[Path], typer.Option("--checkpoint", help="Network weights NAME.json (default: the shipped one).")
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Trace the image itself, without the network.")] = False,
    seeds: Annotated[Optional[Path], typer.Option("--seeds", help=SEEDS_HELP)] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help=KEEP_HELP)] = None,
    gold: Annotated[Optional[Path], typer.Option("--gold", help="Gold-standard SWC to evaluate against.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (blocks, memory, time) and stop.")] = False,
    overwrite: OverwriteOption = False,
    scheduler: SchedulerOption = None,
    slurm: SlurmOption = False,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Convert -> predict -> trace + stitch -> report, each stage resumable and skipped when done."""
    from .pipeline import plan, run

    overrides: dict[str, Any] = {
        "convert": _drop_none(dict(voxel_size=voxel_size)),
        "predict": _drop_none(dict(block=block)),
        "trace": _drop_none(dict(block=block, keep=keep)),
        "cluster": _cluster_overrides(scheduler, slurm, workers, threads),
    }
    cfg = load_config(config, overrides)
    if dry_run:
        typer.echo(plan(input, cfg, raw=raw))
        return
    result = run(input, out, cfg, raw=raw, checkpoint=checkpoint, seeds=seeds, gold=gold, overwrite=overwrite,
                 progress=lambda line: typer.echo(line, err=True))  # fmt: skip
    typer.echo(result.summary())


@app.command("status")
def run_status(out: Annotated[Path, typer.Argument(help="A run folder made by neurotrace run.")]) -> None:
    """Show which stages of a run are done, and how many blocks of one in progress."""
    from .pipeline import status

    typer.echo(status(out))


@swc_app.command("check")
def swc_check(file: Annotated[Path, typer.Argument(help="SWC file to validate.")]) -> None:
    """Validate an SWC file and print a summary (nodes, trees, cable length)."""
    from .io.swc import read_swc

    swc = read_swc(file)
    typer.echo(f"{file}: {swc.n_nodes} nodes, {swc.n_trees} tree(s), cable length {swc.cable_length():.1f} (file units)")


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder: image.ome.zarr, mask.ome.zarr, gold.swc, synth.json.")],
    swc: Annotated[
        Optional[list[Path]], typer.Option("--swc", help="Morphology to render (repeat for several neurons).")
    ] = None,
    units: Annotated[str, typer.Option("--units", help="Units of --swc files: auto, um, nm or 8nm.")] = "auto",
    random: Annotated[Optional[int], typer.Option("--random", help="Render N random neurons.", min=1)] = None,
    shape: Annotated[Optional[Triple], typer.Option("--shape", help="Volume shape Z Y X (fitted to one --swc).")] = None,
    config: ConfigOption = None,
    voxel_size: Annotated[
        Optional[tuple[float, float, float]], typer.Option("--voxel-size", help="Voxel size Z Y X in micrometres.")
    ] = None,
    intensity: Annotated[
        Optional[float], typer.Option("--intensity", help="Signal scale (1, 0.5, 0.25, 0.125: weak neurites).")
    ] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="8 or 16.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (same seed, same volume).")] = None,
    chunks: Annotated[Optional[Triple], typer.Option("--chunks", help="Chunk shape Z Y X (default ~1-2 MB).")] = None,
    tiff: Annotated[bool, typer.Option("--tiff", help="Also write image.tif (ImageJ) for other tools.")] = False,
    overwrite: OverwriteOption = False,
    scheduler: SchedulerOption = None,
    slurm: SlurmOption = False,
    workers: WorkersOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Render neurons (SWC files or random ones) as a fluorescence volume with its ground truth."""
    from .cluster import open_client
    from .synth import load_morphology, random_scene, render_to_zarr, scene_from_morphologies, scene_from_swc

    overrides = {
        "synth": _drop_none(dict(voxel_size=voxel_size, intensity=intensity, bits=bits, seed=seed)),
        "cluster": _cluster_overrides(scheduler, slurm, workers, threads),
    }
    cfg = load_config(config, overrides)
    if swc and random:
        raise NeurotraceError("--swc and --random exclude each other")
    if swc:
        cells = [load_morphology(path, units) for path in swc]  # type: ignore[arg-type]
        if len(cells) == 1:
            scene = scene_from_swc(cells[0], cfg.synth, shape=shape)
        elif shape is None:
            raise NeurotraceError("several --swc files need --shape: they are rendered as found, in one volume")
        else:
            scene = scene_from_morphologies(cells, shape, cfg.synth)
    else:
        scene = random_scene(random or 1, shape or (64, 256, 256), cfg.synth)
    with open_client(cfg.cluster) as client:
        result = render_to_zarr(scene, out, chunks=chunks, client=client, overwrite=overwrite, tiff=tiff)
    typer.echo(result.summary())


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")] = Path("demo_out"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier demo's outputs.")] = False,
) -> None:
    """The whole pipeline on an embedded default: a rendered neuron, traced and scored against its gold SWC."""
    from .demo import run_demo

    typer.echo(run_demo(out, overwrite=overwrite))


@app.command()
def train(
    config: ConfigOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder: best/last checkpoints, log.jsonl, tb/.")] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue a run from its last.json (with its optimiser state).")
    ] = None,
    init: Annotated[
        Optional[Path], typer.Option("--init", help="Fine-tune from this checkpoint NAME.json (transfer learning).")
    ] = None,
    pool: Annotated[Optional[Path], typer.Option("--pool", help="Candidate pool (.zarr) to train on.")] = None,
    subset: Annotated[
        Optional[Path], typer.Option("--subset", help="CSV from neurotrace select: train on those samples only.")
    ] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Total optimiser steps.", min=1)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (same seed, same weights).", min=0)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads.", min=1)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    overwrite: OverwriteOption = False,
) -> None:
    """Train or fine-tune the network on labelled volumes, a candidate pool and synthetic data."""
    if resume is not None and init is not None:
        raise NeurotraceError("--resume and --init exclude each other")
    from .train import train as run_train

    values = dict(out=out, init=init, pool=pool, subset=subset, steps=steps, seed=seed, threads=threads,
                  device=device, overwrite=overwrite)  # fmt: skip
    overrides = _drop_none(values)
    if not progress:
        overrides["progress"] = False
    cfg = load_config(config, {"train": overrides})
    result = run_train(cfg.train, synth=cfg.synth.model_copy(update={"voxel_size": cfg.train.voxel_size}),
                       trace=cfg.trace, resume=resume)  # fmt: skip
    typer.echo(result.summary())


@app.command("select")
def select_samples(
    pool: Annotated[Path, typer.Argument(help="Candidate pool (.zarr, from neurotrace_dask.select.write_pool).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for criteria.csv and selected.csv.")],
    k: Annotated[Optional[int], typer.Option("--k", "-k", help="Samples to select.", min=1)] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="dhpr (the seed's), dhpr+ or random.")] = None,
    checkpoint: Annotated[
        Optional[Path], typer.Option("--checkpoint", help="dhpr+: model whose loss measures hardness.")
    ] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="random: the draw.", min=0)] = None,
    config: ConfigOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Choose training samples by DHPR: density + low-SNR ratio among the noisier half (or dhpr+, random)."""
    from .select import select as run_select
    from .select import write_selection

    cfg = load_config(config, {"select": _drop_none(dict(k=k, method=method, checkpoint=checkpoint, seed=seed))})
    selection = run_select(pool, cfg.select)
    criteria, chosen = write_selection(selection, out, overwrite=overwrite)
    typer.echo(f"{selection.summary()}\n  {criteria}\n  {chosen}")


def _evaluation_voxel_size(gold: Path, test: Path, gold_swc: Any, test_swc: Any) -> tuple[float, float, float]:
    """Voxel size from the SWC headers (as write_swc records it), else 1 um; says which on stderr."""
    from .errors import InputError
    from .evaluate import swc_header_units

    (gv, gu), (tv, tu) = swc_header_units(gold_swc), swc_header_units(test_swc)
    if "um" in (gu, tu):
        if gu != tu:
            raise InputError(f"{gold} is in {gu or 'voxel'} units but {test} in {tu or 'voxel'} units (SWC headers)")
        typer.echo("positions are in micrometres (SWC headers): voxel size 1 1 1 um", err=True)
        return (1.0, 1.0, 1.0)
    if gv and tv and any(abs(a - b) > 1e-9 * max(a, b) for a, b in zip(gv, tv)):
        raise InputError(
            f"{gold} and {test} record different voxel sizes ({' '.join(map(str, gv))} vs "
            f"{' '.join(map(str, tv))}); pass --voxel-size Z Y X"
        )
    if gv or tv:
        voxel = gv or tv
        typer.echo(f"voxel size {' '.join(f'{v:g}' for v in voxel)} um (z y x), from the SWC header", err=True)
        return voxel
    typer.echo("no --voxel-size given and none recorded in the SWC headers: using 1 1 1 um", err=True)
    return (1.0, 1.0, 1.0)


@app.command()
def evaluate(
    gold: Annotated[Path, typer.Argument(help="Gold-standard SWC (voxel coordinates).")],
    test: Annotated[Path, typer.Argument(help="SWC to score against it.")],
    voxel_size: Annotated[
        Optional[tuple[float, float, float]],
        typer.Option("--voxel-size", help="Voxel size Z Y X in micrometres (default: from the SWC headers, else 1)."),
    ] = None,
    tau: Annotated[
        Optional[float], typer.Option("--tau", help="Length/node match tolerance in um (default: 2 x the xy voxel).")
    ] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write all metrics as JSON to this file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json file.")] = False,
) -> None:
    """Score TEST against GOLD: length and node precision/recall/F1, Vaa3D ESA/DSA/PDS, DIADEM, counts."""
    import json
    import math
    import uuid

    from .errors import ConfigError, OutputError
    from .evaluate import evaluate as run_evaluate
    from .io.swc import read_swc

    if voxel_size is not None and not all(math.isfinite(v) and v > 0 for v in voxel_size):
        raise ConfigError(f"--voxel-size must be 3 positive numbers (Z Y X), got {' '.join(map(str, voxel_size))}")
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"--tau must be a positive number of micrometres, got {tau}")
    if json_out is not None:
        if json_out.resolve() in (gold.resolve(), test.resolve()):
            raise OutputError(f"{json_out}: would overwrite an input SWC")
        if json_out.exists() and not overwrite:
            raise OutputError(f"{json_out}: exists already; pass --overwrite to replace it")
        if not json_out.parent.is_dir():
            raise OutputError(f"{json_out}: folder {json_out.parent} does not exist")

    gold_swc, test_swc = read_swc(gold), read_swc(test)
    voxel = tuple(voxel_size) if voxel_size is not None else _evaluation_voxel_size(gold, test, gold_swc, test_swc)
    result = run_evaluate(gold_swc, test_swc, voxel_size_zyx=voxel, tau=tau)
    typer.echo(f"gold: {gold}\ntest: {test}\n")
    typer.echo(result.table())

    if json_out is not None:
        record = {"inputs": {"gold": str(gold), "test": str(test)}, **result.to_dict()}
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
        tmp = json_out.with_name(f".{json_out.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, json_out)  # a reader never sees half a file
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"{json_out} cannot be written: {e.strerror or e}") from None


def _quiet_cut_short_reads() -> None:
    """Keep the error line last: reads cut short by the error leave zarr's event loop with pending
    tasks and never-awaited coroutines, which asyncio and the garbage collector would report at exit.
    They are not the user's concern."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


def main() -> None:
    """Console entry point: one-line errors unless ``--debug``."""
    try:
        app()
    except NeurotraceError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        _quiet_cut_short_reads()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if _state["debug"]:
            raise
        error = storage_error(exc) if isinstance(exc, OSError) else None
        if error is not None:  # a full disk or a read-only folder: the user's to fix
            typer.echo(f"error: {error}", err=True)
            _quiet_cut_short_reads()
            sys.exit(error.exit_code)
        first = str(exc).strip().splitlines()
        message = f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__
        typer.echo(f"error: unexpected {message} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)
