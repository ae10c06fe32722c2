"""Voxel-scooping tracer: geometry on drawn tubes, weak-signal features, a rendered neuron, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from neurotrace_dask.config import SynthConfig
from neurotrace_dask.evaluate import evaluate
from neurotrace_dask.io.swc import read_swc
from neurotrace_dask.synth import random_morphology, render, render_to_zarr, scene_from_swc
from neurotrace_dask.trace import extend_tips, raw_to_probability, trace_block

NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NEUROTRACE, *args], capture_output=True, text=True, timeout=300)


def tube(shape, p0, p1, radius, value=200, out=None):
    """Draw a cylinder (flat ends) from p0 to p1 into a uint8 volume."""
    vol = np.zeros(shape, np.uint8) if out is None else out
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    axis = p1 - p0
    t = ((grid - p0) @ axis) / (axis @ axis)
    d = np.linalg.norm(grid - p0 - t[..., None] * axis, axis=-1)
    vol[(d <= radius) & (t >= 0) & (t <= 1)] = value
    return vol


def ball(vol, centre, radius, value=220):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    vol[np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius] = value
    return vol


def branch_points(frags) -> int:
    degree = np.bincount(frags.edges.ravel(), minlength=frags.n_nodes)
    return int((degree >= 3).sum())


def test_straight_tube_centreline_length_radius():
    vol = tube((20, 24, 70), (10, 12, 5), (10, 12, 64), 2.0)
    frags = trace_block(vol, high=128, low=64)
    swc = frags.to_swc()
    assert swc.n_trees == 1
    assert np.abs(frags.positions[:, :2] - [10, 12]).max() <= 1.0  # on the centreline
    assert abs(swc.cable_length() - 59) <= 0.1 * 59
    assert abs(np.median(frags.radius) - 2.0) <= 0.3 * 2.0
    assert not frags.soma.any() and frags.bridges.size == 0
    assert frags.confidence.max() <= 1.0 and np.median(frags.confidence) > 0.5


def test_y_tube_has_one_branch_point():
    vol = tube((16, 60, 60), (8, 30, 4), (8, 30, 30), 2.0)
    tube(vol.shape, (8, 30, 30), (8, 8, 54), 2.0, out=vol)
    tube(vol.shape, (8, 30, 30), (8, 52, 54), 2.0, out=vol)
    frags = trace_block(vol)
    assert frags.to_swc().n_trees == 1
    assert branch_points(frags) == 1


def test_two_tubes_two_trees_and_soma_root():
    vol = tube((16, 40, 60), (8, 10, 5), (8, 10, 55), 1.5)
    tube(vol.shape, (8, 30, 5), (8, 30, 55), 1.5, out=vol)
    assert trace_block(vol).to_swc().n_trees == 2

    vol = np.zeros((24, 30, 70), np.uint8)
    ball(vol, (12, 15, 15), 6)
    tube(vol.shape, (12, 15, 20), (12, 15, 64), 1.5, out=vol)
    frags = trace_block(vol)
    swc = frags.to_swc()
    assert swc.n_trees == 1 and frags.soma.sum() == 1
    root = swc.roots[0]
    assert swc.types[root] == 1 and np.allclose(swc.zyx[root], (12, 15, 15), atol=1)
    assert (swc.types == 1).sum() == 1


def test_hysteresis_keeps_attached_dim_segments_only():
    vol = tube((16, 40, 70), (8, 10, 5), (8, 10, 30), 1.5, value=200)
    tube(vol.shape, (8, 10, 31), (8, 10, 64), 1.5, value=90, out=vol)  # dim, attached
    tube(vol.shape, (8, 30, 5), (8, 30, 64), 1.5, value=90, out=vol)  # dim, isolated
    frags = trace_block(vol, high=150, low=64)
    swc = frags.to_swc()
    assert swc.n_trees == 1
    assert swc.zyx[:, 2].max() >= 60 and swc.zyx[:, 1].max() < 15
    assert abs(swc.cable_length() - 59) <= 6


@pytest.mark.parametrize("gap_value, kept", [(40, True), (0, False)])
def test_a_dim_stretch_beyond_a_gap_joins_when_bridged(gap_value, kept):
    # Hysteresis after bridging: a dim stretch (90: >= low, never >= high) cut off from its
    # bright neurite by a darker gap is kept when a bridge reaches it (the gap at 40 passes
    # the default bar of 32), and dropped when none does (a gap of 0). A dim stretch that no
    # bridge reaches is never kept.
    vol = tube((16, 40, 80), (8, 10, 5), (8, 10, 30), 1.5, value=200)
    vol = np.maximum(vol, tube(vol.shape, (8, 10, 31), (8, 10, 33), 1.5, value=gap_value))
    tube(vol.shape, (8, 10, 34), (8, 10, 70), 1.5, value=90, out=vol)
    tube(vol.shape, (8, 30, 5), (8, 30, 70), 1.5, value=90, out=vol)  # dim, isolated
    frags = trace_block(vol, high=150, low=64, extend=False)  # bridging alone (tip extension: below)
    swc = frags.to_swc()
    assert swc.n_trees == 1 and swc.zyx[:, 1].max() < 15
    assert frags.bridges.size == int(kept)
    assert (swc.zyx[:, 2].max() >= 66) == kept and swc.zyx[:, 2].min() <= 8
    assert frags.active.all()
    # Classic hysteresis (raw images): the dim stretch never counts.
    classic = trace_block(vol, high=150, low=64, bridge_dim=False, extend=False)
    assert classic.to_swc().n_trees == 1 and classic.positions[:, 2].max() <= 32


def smoothed_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """White noise smoothed by a Gaussian of sigma 1 voxel, in units of its own deviation."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 1.0)
    return noise / noise.std()


def test_tip_extension_follows_a_dim_continuation():
    # A bright tube goes on at 50: below low (64) everywhere, so no foreground and no bridge
    # reaches it, but above extend_min_mean (44) along its course. The march follows it and
    # stops near its end (short of it by about half its look-ahead), not in the fainter rest.
    vol = tube((16, 32, 120), (8, 16, 5), (8, 16, 40), 1.5, value=200)
    tube(vol.shape, (8, 16, 41), (8, 16, 60), 1.5, value=50, out=vol)
    tube(vol.shape, (8, 16, 61), (8, 16, 115), 1.5, value=20, out=vol)  # too dim to follow
    assert trace_block(vol, extend=False).positions[:, 2].max() <= 41
    frags = trace_block(vol)
    assert 52 <= frags.positions[:, 2].max() <= 60 and np.abs(frags.positions[:, :2] - [8, 16]).max() < 1
    assert frags.to_swc().n_trees == 1 and frags.active.all()
    assert trace_block(vol, extend_min_mean=60).positions[:, 2].max() <= 41  # below the bar: not kept
    assert trace_block(vol, extend_length=0).positions[:, 2].max() <= 41
    # In a large block the tracer crops to the foreground's box, grown by the march's reach:
    # the same extension.
    padded = np.zeros((40, 140, 300), np.uint8)
    padded[10:26, 50:82, 100:220] = vol
    cropped = trace_block(padded)
    assert cropped.n_nodes == frags.n_nodes and np.allclose(cropped.positions - [10, 50, 100], frags.positions)


def test_tip_extension_links_fragments_and_lists_the_link_for_review():
    # Two bright tubes 20 um apart (beyond bridging's 6 um) joined by a dim stretch at 50.
    vol = tube((16, 32, 100), (8, 16, 5), (8, 16, 35), 1.5, value=200)
    tube(vol.shape, (8, 16, 36), (8, 16, 55), 1.5, value=50, out=vol)
    tube(vol.shape, (8, 16, 56), (8, 16, 95), 1.5, value=200, out=vol)
    assert trace_block(vol, extend=False).to_swc().n_trees == 2
    frags = trace_block(vol)
    assert frags.to_swc().n_trees == 1
    assert frags.bridges.size == 1 and 15 <= frags.bridges["length_um"][0] <= 25
    assert 35 <= frags.bridges["x"][0] <= 56 and frags.bridges["mean_probability"][0] >= 44


def test_tip_extension_links_across_a_dimmer_gap_than_it_would_keep_alone():
    # The same two tubes across a gap at 28: a march stops there at the usual level (44 less
    # 8), but one that goes on and reaches the other fragment joins it (extend_link_min_mean).
    # The same dim stretch leading nowhere is not kept.
    def tubes(far: bool) -> np.ndarray:
        vol = tube((16, 32, 100), (8, 16, 5), (8, 16, 35), 1.5, value=200)
        tube(vol.shape, (8, 16, 36), (8, 16, 53), 1.5, value=28, out=vol)
        if far:
            tube(vol.shape, (8, 16, 54), (8, 16, 95), 1.5, value=200, out=vol)
        return vol

    linked = trace_block(tubes(far=True))
    assert linked.to_swc().n_trees == 1 and linked.bridges.size == 1
    assert 15 <= linked.bridges["length_um"][0] <= 22
    apart = trace_block(tubes(far=True), extend_link_min_mean=44)
    assert apart.to_swc().n_trees == 2 and apart.bridges.size == 0
    x = apart.positions[:, 2]
    assert not ((x > 37) & (x < 52)).any()  # nothing in the gap
    assert trace_block(tubes(far=False)).positions[:, 2].max() <= 36


def test_failed_link_keeps_the_extension_a_lone_march_would_have():
    # A tip goes on at 60 for 14 voxels, then at 30 for 160 voxels to another fragment. At a
    # link level of 36 the march runs on (its stop, 28, is below 30) and reaches the fragment,
    # but too dimly on average to link: what stays is the extension the usual march (stop 36)
    # keeps, the same as with no fragment at the far end. At 34 it links.
    def extend(far: bool, link: float) -> tuple[float, int]:
        n = 10 + 14 + 160 + 20
        prob = np.zeros((5, 5, n), np.uint8)
        prob[1:4, 1:4, :10], prob[1:4, 1:4, 10:24], prob[1:4, 1:4, 24:184] = 200, 60, 30
        pos = [[2.0, 2, 1], [2, 2, 5], [2, 2, 9]]
        edges = [[0, 1], [1, 2]]
        if far:
            prob[1:4, 1:4, 184:] = 200
            pos, edges = pos + [[2, 2, 185], [2, 2, 192], [2, 2, 199]], edges + [[3, 4], [4, 5]]
        fixed = np.isin(np.arange(len(pos)), [0, 5])
        new, _, _, links = extend_tips(prob, prob >= 64, np.array(pos), np.ones(3), np.array(edges), fixed,
                                       min_mean=44, max_length=n, link_min_mean=link)  # fmt: skip
        return float(new[:, 2].max()), len(links)

    alone = extend(far=False, link=36)
    assert 18 <= alone[0] <= 24 and alone[1] == 0
    assert extend(far=True, link=36) == alone
    reach, links = extend(far=True, link=34)
    assert links == 1 and reach > 180


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tip_extension_does_not_wander_into_noise(seed):
    # A bright tube ending in smoothed noise (16 per noise unit): no march is kept beyond its blur.
    shape = (16, 32, 120)
    signal = 12.0 * tube(shape, (8, 16, 5), (8, 16, 40), 1.5, value=1)
    prob = np.clip(np.rint(16 * (signal + smoothed_noise(shape, seed))), 0, 255).astype(np.uint8)
    with_extension, without = trace_block(prob), trace_block(prob, extend=False)
    assert with_extension.to_swc().cable_length() <= without.to_swc().cable_length() + 1.0
    assert with_extension.positions[:, 2].max() < 45


def test_dim_chains_are_followed_and_far_specks_change_nothing():
    # A bright tube, then three dim dashes (90) across darker gaps (40), each gap bridged
    # in turn: the last dash lies beyond bridging reach of the bright part, reached only
    # through the others. Dim specks far from all of it can never be kept, so they are not
    # traced: the result is the same with and without them.
    vol = tube((16, 60, 90), (8, 10, 5), (8, 10, 30), 1.5, value=200)
    vol = np.maximum(vol, tube(vol.shape, (8, 10, 31), (8, 10, 85), 1.5, value=40))
    for start, stop in [(34, 45), (49, 60), (64, 82)]:
        tube(vol.shape, (8, 10, start), (8, 10, stop), 1.5, value=90, out=vol)
    specks = np.zeros_like(vol)
    rng = np.random.default_rng(0)
    for z, y, x in zip(rng.integers(2, 14, 40), rng.integers(30, 58, 40), rng.integers(2, 88, 40), strict=True):
        specks[z, y, x : x + rng.integers(1, 8)] = 90
    frags = trace_block(np.maximum(vol, specks), high=150, low=64)
    assert frags.to_swc().n_trees == 1 and frags.bridges.size == 3
    assert frags.positions[:, 2].max() >= 78
    alone = trace_block(vol, high=150, low=64)
    np.testing.assert_array_equal(np.unique(frags.positions, axis=0), np.unique(alone.positions, axis=0))
    assert trace_block(specks, high=150, low=64).n_nodes == 0


def gapped_tube(gap_value=60):
    vol = tube((16, 30, 70), (8, 15, 5), (8, 15, 30), 1.5)
    tube(vol.shape, (8, 15, 34), (8, 15, 64), 1.5, out=vol)
    gap = tube(vol.shape, (8, 15, 31), (8, 15, 33), 1.5, value=gap_value)
    return np.maximum(vol, gap)


def test_gap_bridging_joins_and_records():
    vol = gapped_tube()
    frags = trace_block(vol, high=150, low=100, bridge_min_mean=50)
    assert frags.to_swc().n_trees == 1
    assert frags.bridges.size == 1
    b = frags.bridges[0]
    assert 30 <= b["x"] <= 34 and 3 <= b["length_um"] <= 6 and b["mean_probability"] >= 50
    # Disabled, or a gap too dark for the bars: two trees, nothing recorded.
    for options in ({"bridge_distance": 0}, {"bridge_min_mean": 200, "bridge_facing_min_mean": 200}):
        frags = trace_block(vol, high=150, low=100, **options)
        assert frags.to_swc().n_trees == 2 and frags.bridges.size == 0
    # Background (0) in the gap never bridges at the default bar.
    assert trace_block(gapped_tube(0), high=150, low=100, bridge_min_mean=50).to_swc().n_trees == 2


def test_facing_tips_bridge_longer_dimmer_gaps():
    # A neurite broken in two by a 7-voxel gap lit at 28 (beyond the general 6 um and under its
    # bar of 32; within the facing tips' 9 um and 24), and the same tip aimed at the side of a
    # crossing neurite instead.
    vol = tube((16, 40, 70), (8, 20, 5), (8, 20, 28), 1.5)
    tube(vol.shape, (8, 20, 36), (8, 20, 64), 1.5, out=vol)
    vol = np.maximum(vol, tube(vol.shape, (8, 20, 29), (8, 20, 35), 1.5, value=28))
    frags = trace_block(vol, high=150, low=100, extend=False)
    assert frags.to_swc().n_trees == 1 and frags.bridges.size == 1
    assert 6 < frags.bridges[0]["length_um"] <= 9
    for options in ({"bridge_facing_distance": 6.0}, {"bridge_facing_min_mean": 32.0}):
        assert trace_block(vol, high=150, low=100, extend=False, **options).to_swc().n_trees == 2
    side = tube((16, 40, 70), (8, 20, 5), (8, 20, 28), 1.5)
    tube(side.shape, (8, 2, 36), (8, 38, 36), 1.5, out=side)
    side = np.maximum(side, tube(side.shape, (8, 20, 29), (8, 20, 34), 1.5, value=28))
    assert trace_block(side, high=150, low=100, extend=False).to_swc().n_trees == 2


def test_a_short_dark_gap_closes_when_bridge_short_allows():
    # A neurite whose map breaks for 3 voxels with nothing at all in the break, as the network
    # leaves it at a bright bouton (the tips lie 5 um apart): joined only with bridge_short of
    # 5 um or more, and only when aimed.
    vol = tube((16, 40, 70), (8, 20, 5), (8, 20, 30), 1.5)
    tube(vol.shape, (8, 20, 34), (8, 20, 64), 1.5, out=vol)
    assert trace_block(vol, extend=False).to_swc().n_trees == 2
    assert trace_block(vol, extend=False, bridge_short=4.0).to_swc().n_trees == 2
    frags = trace_block(vol, extend=False, bridge_short=5.0)
    assert frags.to_swc().n_trees == 1 and frags.bridges[0]["mean_probability"] == 0
    side = tube((16, 40, 70), (8, 20, 5), (8, 20, 30), 1.5)
    tube(side.shape, (8, 24, 30), (8, 38, 60), 1.5, out=side)  # as near, but beside the tip
    assert trace_block(side, extend=False, bridge_short=5.0, bridge_angle=30).to_swc().n_trees == 2


def test_review_lists_only_bridges_that_stay():
    # Two dim pieces (never >= high) bridged to each other and to nothing bright are dropped,
    # and so is their bridge: the review list holds only what the output shows.
    vol = tube((16, 30, 70), (8, 15, 5), (8, 15, 30), 1.5, value=120)
    tube(vol.shape, (8, 15, 34), (8, 15, 64), 1.5, value=120, out=vol)
    vol = np.maximum(vol, tube(vol.shape, (8, 15, 31), (8, 15, 33), 1.5, value=60))
    frags = trace_block(vol, high=150, low=100)
    assert frags.n_nodes == 0 and frags.bridges.size == 0
    vol[8, 15, 10] = 200  # one bright voxel: now both pieces and the bridge stay
    frags = trace_block(vol, high=150, low=100)
    assert frags.to_swc().n_trees == 1 and frags.bridges.size == 1


@pytest.mark.parametrize("behind, joined", [(False, True), (True, False)])
def test_gap_bridging_respects_direction(behind, joined):
    # A tube ending at x=30 (pointing +x) and a soma 5 voxels away: ahead of the tip, or
    # beside and behind it (a turn of about 117 degrees). Dim signal (60) fills the gap.
    vol = tube((20, 40, 50), (10, 20, 4), (10, 20, 30), 1.5)
    centre = (10, 20 + 7, 27) if behind else (10, 20, 38)
    dim = tube(vol.shape, (10, 20, 30), centre, 1.5, value=60)
    vol = np.maximum(vol, dim)
    ball(vol, centre, 3.5)
    frags = trace_block(vol, high=150, low=100, bridge_distance=8, bridge_angle=90, bridge_min_mean=50)
    assert frags.soma.sum() == 1
    assert (frags.to_swc().n_trees == 1) == joined
    assert frags.bridges.size == int(joined)


def test_deterministic_and_origin():
    vol = tube((16, 60, 60), (8, 30, 4), (8, 30, 30), 2.0)
    tube(vol.shape, (8, 30, 30), (8, 8, 54), 2.0, out=vol)
    a, b = trace_block(vol), trace_block(vol.copy())
    for name in ("positions", "radius", "confidence", "edges", "on_face", "soma"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    shifted = trace_block(vol, origin=(100, 200, 300))
    np.testing.assert_allclose(shifted.positions, a.positions + (100, 200, 300))


def test_seeds_and_on_face():
    vol = tube((16, 30, 40), (8, 15, 0), (8, 15, 39), 2.0)  # runs through both x faces
    frags = trace_block(vol, seeds=[[8, 15, 20]])
    assert frags.on_face.sum() >= 2 and frags.to_swc().n_trees == 1
    assert np.min(np.linalg.norm(frags.positions - [8, 15, 20], axis=1)) <= 1.0


def test_rendered_neuron_raw_path_f1():
    scene = scene_from_swc(random_morphology(0), SynthConfig(voxel_size=(1, 0.5, 0.5), intensity=1.0))
    image, _ = render(scene)
    prob = raw_to_probability(image, voxel_size=scene.voxel_size)
    frags = trace_block(prob, voxel_size=scene.voxel_size)
    scores = evaluate(scene.gold, frags.to_swc(), voxel_size_zyx=scene.voxel_size, tau=2.0).to_dict()
    assert scores["length"]["f1"] >= 0.85  # measured 0.98 (seeds 0-3: 0.94-0.98)
    assert frags.soma.sum() == 1


def test_cli_trace(tmp_path):
    scene = scene_from_swc(random_morphology(2), SynthConfig(voxel_size=(1, 0.5, 0.5)))
    render_to_zarr(scene, tmp_path / "synth")
    image = tmp_path / "synth" / "image.ome.zarr"
    seeds = tmp_path / "seeds.csv"
    z, y, x = np.rint(scene.gold.zyx[0]).astype(int)
    seeds.write_text(f"z,y,x\n{z},{y},{x}\n")
    out = tmp_path / "traced"
    result = run("trace", str(image), "--out", str(out), "--raw", "--seeds", str(seeds))
    assert result.returncode == 0, result.stderr
    assert "neuron(s)" in result.stdout
    assert (out / "neurons.swc").is_file() and (out / "review.csv").read_text().startswith("rank,kind,neuron,z,y,x")
    assert (out / "neurons.csv").read_text().startswith("id,has_soma,soma_z")
    trees = sorted((out / "neurons").glob("*.swc"))
    assert trees and trees[0].name == "0001.swc"
    assert sum(read_swc(t).n_trees for t in trees) == read_swc(out / "neurons.swc").n_trees
    assert "voxel" in (out / "neurons.swc").read_text().lower()

    again = run("trace", str(image), "--out", str(out), "--raw")
    assert again.returncode == 2 and again.stderr.strip() == f"error: {out}: exists already; pass --overwrite to replace it"
    assert run("trace", str(image), "--out", str(out), "--raw", "--overwrite").returncode == 0
    missing = run("trace", str(tmp_path / "nope.ome.zarr"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("error: ") and "nope.ome.zarr" in missing.stderr
    # Thresholds that contradict each other are a one-line config error.
    bad = run("trace", str(image), "--out", str(tmp_path / "o3"), "--high", "10", "--low", "20")
    assert bad.returncode == 2 and "trace.low" in bad.stderr


def test_a_loop_is_traced_once_without_hanging():
    # A ring of radius 15 in one plane: must end as a tree (cycle broken), cable about 2 pi r.
    vol = np.zeros((12, 48, 48), np.uint8)
    for angle in np.linspace(0, 2 * np.pi, 400, endpoint=False):
        centre = (6, 24 + 15 * np.sin(angle), 24 + 15 * np.cos(angle))
        ball(vol, centre, 1.6, value=200)
    swc = trace_block(vol, high=128, low=64).to_swc()
    assert swc.n_trees == 1
    assert 0.8 * 2 * np.pi * 15 <= swc.cable_length() <= 1.15 * 2 * np.pi * 15
    positions = np.round(swc.zyx, 3)
    assert len(np.unique(positions, axis=0)) == swc.n_nodes  # no duplicated nodes


@pytest.mark.parametrize("value", [0, 255])
def test_empty_and_all_foreground_blocks(value):
    vol = np.full((16, 20, 24), value, np.uint8)
    frags = trace_block(vol, high=128, low=64)
    if value == 0:
        assert frags.n_nodes == 0 and frags.edges.shape[0] == 0
    else:  # one solid block: one compact tree, nothing outside the block
        swc = frags.to_swc()
        assert swc.n_trees == 1
        assert (frags.positions >= 0).all() and (frags.positions <= np.array(vol.shape) - 1).all()


def test_single_voxel_is_not_a_neuron():
    vol = np.zeros((9, 9, 9), np.uint8)
    vol[4, 4, 4] = 255
    assert trace_block(vol, high=128, low=64).n_nodes == 0  # shorter than min_length, no soma


def test_anisotropic_voxels_measure_in_micrometres():
    # A tube along z, 40 slices of 2 um: 78 um of cable, traced in z steps.
    vol = tube((44, 16, 16), (2, 8, 8), (41, 8, 8), 2.0)
    swc = trace_block(vol, voxel_size=(2.0, 0.5, 0.5), high=128, low=64).to_swc()
    assert swc.n_trees == 1
    assert abs(swc.cable_length(scale_zyx=(2.0, 0.5, 0.5)) - 78) <= 0.1 * 78


@pytest.mark.parametrize("fill", [0.002, 0.05])
@pytest.mark.parametrize("voxel", [(1.0, 1.0, 1.0), (2.5, 0.5, 0.75), (0.3, 0.3, 0.3), (1.0, 0.33, 0.33)])
def test_distance_transform_is_edt_bit_for_bit(fill, voxel):
    """The distance transform (shell search below SPARSE_FILL where the voxel size is exact in
    float32, edt otherwise) gives edt's float32 values: deep balls, thin tubes, the border."""
    import edt

    from neurotrace_dask.trace import SPARSE_FILL, _distance, _exact_spacing, _shell_distance

    rng = np.random.default_rng(3)
    shape = (40, 90, 90)
    mask = np.zeros(shape, bool)
    z, y, x = np.ogrid[:40, :90, :90]
    mask |= (z - 20) ** 2 + (y - 45) ** 2 + (x - 45) ** 2 <= 7**2  # 7 voxels deep
    while mask.mean() < fill:  # tubes, some cut by the border
        a, b = rng.integers(0, 40), rng.integers(0, 90)
        mask[max(a - 1, 0):a + 1, max(b - 1, 0):b + 1, :] = True
    assert (mask.mean() < SPARSE_FILL) == (fill < SPARSE_FILL)
    expected = edt.edt(mask, anisotropy=voxel, black_border=False, parallel=1)
    inside, depth = _distance(mask, np.asarray(voxel))
    np.testing.assert_array_equal(inside, np.flatnonzero(mask))
    np.testing.assert_array_equal(depth, expected.ravel()[inside])
    if _exact_spacing(voxel):  # the search itself, whichever path the fill picks
        coords = np.stack(np.unravel_index(inside, shape), axis=1)
        np.testing.assert_array_equal(_shell_distance(mask, coords, np.asarray(voxel)), expected.ravel()[inside])


def test_sparse_components_match_cc3d():
    """Components of a sparse mask (csgraph) are cc3d's, numbered alike."""
    import cc3d

    from neurotrace_dask.trace import SPARSE_FILL, _components26

    rng = np.random.default_rng(5)
    for _ in range(20):
        mask = np.zeros((40, 50, 60), bool)
        for _ in range(rng.integers(1, 6)):  # random walks: long, branching, touching the border
            at = rng.integers(0, (40, 50, 60))
            for _ in range(rng.integers(5, 40)):
                mask[tuple(at)] = True
                at = np.clip(at + rng.integers(-1, 2, 3), 0, (39, 49, 59))
        where = np.flatnonzero(mask)
        assert where.size < SPARSE_FILL * mask.size
        labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        assert _components26(mask, where)[0] == n
        np.testing.assert_array_equal(_components26(mask, where)[1], labels.ravel()[where])


def test_trace_block_defaults_are_the_config_defaults():
    """``trace_block``'s keyword defaults (what benchmarks and notebooks call) match ``TraceConfig``."""
    import inspect

    from neurotrace_dask.config import TraceConfig

    config = TraceConfig()
    shared = {name: p.default for name, p in inspect.signature(trace_block).parameters.items()
              if name in TraceConfig.model_fields}  # fmt: skip
    assert len(shared) >= 10
    assert shared == {name: getattr(config, name) for name in shared}
