"""Blocked, distributed prediction reproduces whole-volume prediction; resumable; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from neurotrace_dask.config import ClusterConfig, LocalClusterConfig, PredictConfig, SynthConfig
from neurotrace_dask.errors import ConfigError, InputError, OutputError
from neurotrace_dask.io.omezarr import open_image
from neurotrace_dask.model import ModelSpec, build_model, load_checkpoint, save_checkpoint
from neurotrace_dask.predict import _starts, predict, predict_array
from neurotrace_dask.synth import random_scene, render, render_to_zarr

SPEC = ModelSpec(width=4, modules_per_stage=1)
ONE_PASS = dict(patch=(256, 256, 256))  # every read region in one pass: isolates blocking


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", build_model(SPEC, seed=0).eval(), SPEC,
                           voxel_size=(1.0, 0.33, 0.33))  # fmt: skip


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A rendered scene (40 x 88 x 104: no block shape below divides it) as OME-Zarr."""
    out = tmp_path_factory.mktemp("img") / "scene"
    render_to_zarr(random_scene(2, (40, 88, 104), SynthConfig(seed=1)), out, chunks=(8, 24, 24))
    return out / "image.ome.zarr"


@pytest.fixture(scope="module")
def whole(image, checkpoint):
    volume = open_image(image)[0][0][...]
    return predict_array(volume, load_checkpoint(checkpoint), PredictConfig(**ONE_PASS))


def stored(path):
    return open_image(path)[0][0][...]


@pytest.mark.parametrize("block", [(16, 24, 24), (8, 48, 40), (24, 72, 96)])
def test_blocked_prediction_equals_whole_volume(tmp_path, image, checkpoint, whole, client, block):
    config = PredictConfig(checkpoint=checkpoint, block=block, **ONE_PASS)
    result = predict(image, tmp_path / "prob.ome.zarr", config, client=client)
    assert result.blocks > 1 and result.computed == result.blocks
    blocked = stored(result.out)
    assert blocked.dtype == np.uint8 and blocked.shape == whole.shape
    assert np.abs(blocked.astype(int) - whole).max() <= 2
    assert np.ptp(whole) > 40  # the network's output varies: the comparison means something


def test_patches_blend_close_to_one_pass(image, checkpoint, whole):
    # Patches (for reads larger than ``patch``) are blended, not exact: a patch sees less
    # context than the whole block. With an overlap of 32 they stay within a few levels.
    volume = open_image(image)[0][0][...]
    patched = predict_array(volume, load_checkpoint(checkpoint), PredictConfig(patch=(32, 64, 64), patch_overlap=32))
    difference = np.abs(patched.astype(int) - whole)
    assert difference.max() <= 4 and difference.mean() < 0.2


def test_two_worker_processes_and_a_single_thread_agree(tmp_path, image, checkpoint, whole):
    config = PredictConfig(checkpoint=checkpoint, block=(16, 48, 48), **ONE_PASS)
    for name, local in [("procs", LocalClusterConfig(n_workers=2, threads_per_worker=1, processes=True)),
                        ("thread", LocalClusterConfig(n_workers=1, threads_per_worker=1, processes=False))]:  # fmt: skip
        cluster = ClusterConfig(local=local, dashboard_address="127.0.0.1:0")
        result = predict(image, tmp_path / f"{name}.ome.zarr", config, cluster=cluster)
        assert np.abs(stored(result.out).astype(int) - whole).max() <= 2, name


def test_metadata_records_checkpoint_and_normalisation(tmp_path, image, checkpoint, client):
    result = predict(image, tmp_path / "p.ome.zarr", PredictConfig(checkpoint=checkpoint, block=(40, 96, 104)),
                     client=client)  # fmt: skip
    attrs = zarr.open_group(str(result.out), mode="r").attrs["neurotrace"]
    assert attrs["complete"] and attrs["checkpoint"]["sha256"] == load_checkpoint(checkpoint).sha256
    assert attrs["normalisation"]["low"] == result.normalisation.low
    assert open_image(result.out)[1] == open_image(image)[1]  # same voxel size
    assert "Mvoxel/s" in result.summary()


def test_all_background_blocks_are_skipped(tmp_path, checkpoint, client):
    from neurotrace_dask.io.convert import convert
    from neurotrace_dask.config import ConvertConfig
    import tifffile

    volume = np.zeros((16, 64, 64), np.uint8)
    volume[:, :32, :32] = np.random.default_rng(0).integers(0, 255, (16, 32, 32))
    tifffile.imwrite(tmp_path / "v.tif", volume)
    convert(tmp_path / "v.tif", tmp_path / "v.ome.zarr", ConvertConfig(chunks=(8, 16, 16), levels=1), client=client)
    config = PredictConfig(checkpoint=checkpoint, block=(8, 16, 16), halo=8)
    result = predict(tmp_path / "v.ome.zarr", tmp_path / "p.ome.zarr", config, client=client)
    assert 0 < result.skipped_background < result.blocks
    probability = stored(result.out)
    assert (probability[:, 48:, 48:] == 0).all() and probability[:, :16, :16].any()


def test_resume_skips_done_blocks_and_a_changed_layout_is_refused(tmp_path, image, checkpoint, whole, client):
    from neurotrace_dask.blocks import BlockGrid, DoneMarkers

    out = tmp_path / "p.ome.zarr"
    config = PredictConfig(checkpoint=checkpoint, block=(16, 24, 24), **ONE_PASS)
    # Interrupt: run, then forget the completion by moving the result back to .partial with half its markers.
    first = predict(image, out, config, client=client)
    partial = out.with_name(out.name + ".partial")
    out.rename(partial)
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs["neurotrace"] = {**group.attrs["neurotrace"], "complete": False}
    digest = group.attrs["neurotrace"]["layout_hash"]
    grid = BlockGrid.for_storage((40, 88, 104), (16, 24, 24), chunks_or_shards=(8, 24, 24), stride=8, halo=24)
    markers = DoneMarkers.open(partial / "neurotrace_done", grid, digest)
    for block in list(grid)[: len(grid) // 2]:
        markers.mark_done(block)
    resumed = predict(image, out, config, client=client)
    assert resumed.resumed == len(grid) // 2 and resumed.computed == first.blocks - len(grid) // 2
    assert np.abs(stored(out).astype(int) - whole).max() <= 2
    # A different layout over a leftover partial store is refused, and the partial is kept.
    out.rename(partial)
    with pytest.raises(OutputError, match="other input or parameters"):
        predict(image, tmp_path / "p.ome.zarr", config.model_copy(update={"block": (8, 48, 48)}), client=client)
    assert partial.exists()


def test_bad_inputs_are_one_line_errors(tmp_path, image, checkpoint, client):
    with pytest.raises(ConfigError, match="no checkpoint"):
        predict(image, tmp_path / "p.ome.zarr", PredictConfig(), client=client)
    with pytest.raises(InputError):
        predict(tmp_path / "missing.ome.zarr", tmp_path / "p.ome.zarr", PredictConfig(checkpoint=checkpoint))
    with pytest.raises(OutputError, match="overlap"):
        predict(image, image / "p.ome.zarr", PredictConfig(checkpoint=checkpoint))
    (tmp_path / "taken.ome.zarr").mkdir()
    with pytest.raises(OutputError, match="exists already"):
        predict(image, tmp_path / "taken.ome.zarr", PredictConfig(checkpoint=checkpoint))
    with pytest.raises(InputError, match="3-D"):
        predict_array(np.zeros((4, 4)), load_checkpoint(checkpoint))


def test_patch_origins_are_stride_aligned_and_cover_the_axis():
    for size, patch, overlap in [(104, 48, 16), (64, 64, 8), (200, 72, 24), (16, 8, 0)]:
        starts = _starts(size, patch, overlap)
        assert all(s % 8 == 0 for s in starts) and starts[-1] == size - patch
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + patch] = True
        assert covered.all()


def test_cli_predicts_and_gives_one_line_errors(tmp_path, image, checkpoint, whole):
    from .test_cli import run

    out = tmp_path / "prob.ome.zarr"
    result = run("predict", str(image), "--out", str(out), "--checkpoint", str(checkpoint), "--block", "40", "96", "104",
                 "--workers", "1", "--threads", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 block(s): 1 computed" in result.stdout
    assert np.abs(stored(out).astype(int) - whole).max() <= 2  # default patch: one pass, equals the reference
    again = run("predict", str(image), "--out", str(out), "--checkpoint", str(checkpoint))
    assert again.returncode == 2 and again.stderr.strip() == f"error: {out}: exists already; pass --overwrite to replace it"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    broken = run("predict", str(image), "--out", str(tmp_path / "q.ome.zarr"), "--checkpoint", str(bad))
    assert broken.returncode == 2 and str(bad) in broken.stderr and len(broken.stderr.strip().splitlines()) == 1


def test_default_halo_keeps_the_shipped_architecture_within_2_levels():
    """The default halo is enough for the 'small' preset (random weights: a harsh case)."""
    import torch

    from neurotrace_dask.blocks import BlockGrid
    from neurotrace_dask.model import PRESETS, Checkpoint
    from neurotrace_dask.predict import _aligned_halo, _predict_region

    spec = PRESETS["small"]
    ckpt = Checkpoint(build_model(spec, seed=0).eval(), spec, {"normalisation": {"percentiles": [1, 99.9]}},
                      "0" * 64, None)  # fmt: skip
    volume, _ = render(random_scene(2, (24, 64, 80), SynthConfig(seed=1)))
    config = PredictConfig(patch=(512, 512, 512), skip_background=False)
    norm = ckpt.measure_normalisation(volume)
    whole = predict_array(volume, ckpt, config, norm=norm)
    blocked = np.zeros_like(whole)
    for block in BlockGrid(volume.shape, (8, 32, 32), align=8):
        blocked[block.write] = _predict_region(ckpt.model, volume, block.write, norm, _aligned_halo(config.halo),
                                               config, torch.device("cpu"))  # fmt: skip
    assert np.ptp(whole) > 40 and np.abs(blocked.astype(int) - whole).max() <= 2


def test_reads_outside_the_volume_mirror_the_volume_not_the_block():
    from neurotrace_dask.predict import _mirrored_read

    volume = np.arange(97 * 3 * 2).reshape(97, 3, 2)
    padded = np.pad(volume, ((40, 40), (40, 40), (0, 0)), mode="reflect")
    # A one-voxel last block with a halo of 24, its far end extended to a multiple of 8.
    for bounds in ([(72, 128), (-24, 27), (0, 2)], [(-30, 10), (0, 3), (0, 2)], [(90, 130), (-5, 8), (0, 2)]):
        expected = padded[tuple(slice(a + p, b + p) for (a, b), p in zip(bounds, (40, 40, 0)))]
        assert np.array_equal(_mirrored_read(volume, bounds), expected), bounds


def test_an_interrupted_rename_finishes_without_recomputing(tmp_path, image, checkpoint, whole, client):
    out = tmp_path / "p.ome.zarr"
    config = PredictConfig(checkpoint=checkpoint, block=(24, 48, 48), **ONE_PASS)
    predict(image, out, config, client=client)
    out.rename(out.with_name(out.name + ".partial"))  # complete, markers gone, not yet renamed
    again = predict(image, out, config, client=client)
    assert again.computed == 0 and np.abs(stored(out).astype(int) - whole).max() <= 2


def test_overwrite_never_replaces_a_store_it_did_not_write(tmp_path, image, checkpoint, client):
    foreign = tmp_path / "theirs.ome.zarr"
    zarr.open_group(str(foreign), mode="w").attrs["owner"] = "someone else"
    with pytest.raises(OutputError, match="not written by neurotrace"):
        predict(image, foreign, PredictConfig(checkpoint=checkpoint, overwrite=True), client=client)
    assert zarr.open_group(str(foreign), mode="r").attrs["owner"] == "someone else"
