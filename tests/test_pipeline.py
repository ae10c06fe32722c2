"""``neurotrace run``: the stages end to end, skipping, resuming, refusing, the plan and the status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurotrace_dask.config import ClusterConfig, Config, LocalClusterConfig, SynthConfig, TraceConfig
from neurotrace_dask.errors import ConfigError, OutputError
from neurotrace_dask.io.swc import read_swc
from neurotrace_dask.model import ModelSpec, build_model, save_checkpoint
from neurotrace_dask.pipeline import plan, run, status
from neurotrace_dask.synth import random_morphology, render_to_zarr, scene_from_swc

NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))
LOCAL = ClusterConfig(local=LocalClusterConfig(n_workers=1, threads_per_worker=2, processes=False))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A rendered neuron as an ImageJ TIFF, with its gold SWC."""
    out = tmp_path_factory.mktemp("synth") / "cell"
    scene = scene_from_swc(random_morphology(1, extent=(20, 60, 60)), SynthConfig(voxel_size=(1, 0.5, 0.5), seed=1))
    render_to_zarr(scene, out, tiff=True)
    return out / "image.tif", out / "gold.swc"


def test_raw_run_skips_done_stages_and_refuses_changes(tmp_path, stack):
    tiff, gold = stack
    out = tmp_path / "run"
    result = run(tiff, out, Config(cluster=LOCAL), raw=True, gold=gold)
    assert [s.name for s in result.stages] == ["convert", "trace", "report"]
    assert all(s.status == "ran" for s in result.stages)
    assert result.metrics["length"]["f1"] >= 0.7
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert read_swc(out / "traced" / "neurons.swc").n_nodes > 10
    state = json.loads((out / "run.json").read_text())
    assert state["versions"]["neurotrace_dask"] and state["config"]["trace"]["low"] == 64.0
    # Nothing changed: every stage is skipped.
    again = run(tiff, out, Config(cluster=LOCAL), raw=True)
    assert [s.status for s in again.stages[:2]] == ["skipped", "skipped"]
    # Other trace parameters: refused, then redone with overwrite (convert still skipped).
    changed = Config(cluster=LOCAL, trace=TraceConfig(low=50))
    with pytest.raises(OutputError, match="stage trace was run with other inputs or parameters"):
        run(tiff, out, changed, raw=True)
    redone = run(tiff, out, changed, raw=True, overwrite=True)
    assert [s.status for s in redone.stages[:2]] == ["skipped", "ran"]
    assert "trace    done" in status(out)


def test_run_with_a_checkpoint_predicts(tmp_path, stack):
    tiff, _ = stack
    spec = ModelSpec(width=4, modules_per_stage=1)
    ckpt = save_checkpoint(tmp_path / "tiny", build_model(spec, seed=0).eval(), spec, voxel_size=(1, 0.5, 0.5))
    result = run(tiff, tmp_path / "run", Config(cluster=LOCAL), checkpoint=ckpt)
    assert [s.name for s in result.stages] == ["convert", "predict", "trace", "report"]
    probability, image = result.probability(), result.image()
    assert probability.shape == image.shape and probability.dtype == np.uint8
    assert int(probability.max().compute()) > 0  # lazy until computed


def test_refusals_and_plan(tmp_path, stack, monkeypatch):
    tiff, _ = stack
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    with pytest.raises(OutputError, match="not a neurotrace run folder"):
        run(tiff, foreign, Config(cluster=LOCAL), raw=True)
    assert (foreign / "thesis.txt").read_text() == "precious"
    monkeypatch.setattr("neurotrace_dask.pipeline.default_checkpoint", lambda: None)
    with pytest.raises(ConfigError, match="--raw"):
        run(tiff, tmp_path / "new", Config(cluster=LOCAL))
    text = plan(tiff, Config(cluster=LOCAL))
    assert "predict: 1 block(s)" in text and "trace:   1 block(s)" in text and "GiB per worker" in text


def test_cli_run_dry_run_and_status(tmp_path, stack):
    tiff, _ = stack
    dry = subprocess.run([NEUROTRACE, "run", str(tiff), "--out", str(tmp_path / "r"), "--dry-run",
                          "--block", "32", "64", "64"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "trace:" in dry.stdout and not (tmp_path / "r").exists()
    missing = subprocess.run([NEUROTRACE, "status", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "run folder" in missing.stderr


def test_napari_paths_cover_every_edge_once(stack):
    from neurotrace_dask.io.swc import napari_paths

    _, gold = stack
    swc = read_swc(gold)
    paths = napari_paths(swc, scale_zyx=(1, 0.5, 0.5))
    assert sum(len(p) - 1 for p in paths) == swc.n_nodes - swc.n_trees  # each edge in one path
    length = sum(float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) for p in paths)
    assert length == pytest.approx(swc.cable_length((1, 0.5, 0.5)))
