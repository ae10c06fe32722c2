"""Reconstruction metrics on hand-computed cases, a literal port of Vaa3D, and the DIADEM OP_1 gold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from neurotrace_dask.evaluate import (
    default_tau,
    diadem_score,
    evaluate,
    length_scores,
    morphometrics,
    neuron_distance,
    node_scores,
    swc_header_units,
)
from neurotrace_dask.io.swc import SWC, read_swc, write_swc

from .conftest import SHARED_DATA

OP_1 = SHARED_DATA / "diadem_op" / "gold" / "OP_1.swc"
OP_VOXEL = (1.0, 0.3296, 0.3296)


def polyline(*points_xyz: tuple[float, float, float], step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One unbranched chain through the given (x, y, z) points, with nodes about ``step`` apart.

    Returns zyx positions and parent rows (each node's parent is the previous one).
    """
    pts = [np.asarray(points_xyz[0], float)]
    for a, b in zip(points_xyz[:-1], points_xyz[1:]):
        a, b = np.asarray(a, float), np.asarray(b, float)
        n = max(1, int(round(np.linalg.norm(b - a) / step)))
        pts += [a + (b - a) * k / n for k in range(1, n + 1)]
    xyz = np.array(pts)
    return xyz[:, ::-1], np.arange(-1, len(xyz) - 1)


def line(x0: float, x1: float, y: float = 0.0, z: float = 0.0, step: float = 1.0) -> SWC:
    zyx, parents = polyline((x0, y, z), (x1, y, z), step=step)
    return SWC.from_arrays(zyx, parents)


def forest(*chains: tuple[np.ndarray, np.ndarray], attach: list[int | None] | None = None) -> SWC:
    """Join chains into one SWC; chain i's first node hangs off row ``attach[i]`` (None: a new root)."""
    zyx, parents, offset = [], [], 0
    for i, (z, p) in enumerate(chains):
        p = p + offset
        hang = None if attach is None else attach[i]
        p[0] = -1 if hang is None else hang
        zyx.append(z)
        parents.append(p)
        offset += len(z)
    return SWC.from_arrays(np.concatenate(zyx), np.concatenate(parents))


def subchain(start_row: int, *points_xyz: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A chain leaving from an existing node (its first point is dropped: it is that node)."""
    zyx, parents = polyline(*points_xyz)
    return zyx[1:], parents[1:] - 1


def y_tree(with_second_arm: bool = True, with_twig: bool = True) -> SWC:
    """Root (0,0) - trunk - b1 (20,0); arm 1 to tip (35,15); arm 2 to b2 (35,-15), which splits to
    tips (50,-15) and (45,-30). DIADEM weights: root 3, b1 3, t1 1, b2 2, t2 1, t3 1 (total 11)."""
    trunk = polyline((0, 0, 0), (20, 0, 0))
    b1 = len(trunk[0]) - 1
    arm1 = subchain(b1, (20, 0, 0), (35, 15, 0))
    chains, attach = [trunk, arm1], [None, b1]
    if with_second_arm:
        arm2 = subchain(b1, (20, 0, 0), (35, -15, 0))
        b2 = len(trunk[0]) + len(arm1[0]) + len(arm2[0]) - 1
        chains += [arm2, subchain(b2, (35, -15, 0), (50, -15, 0))]
        attach += [b1, b2]
        if with_twig:
            chains.append(subchain(b2, (35, -15, 0), (45, -30, 0)))
            attach.append(b2)
    return forest(*chains, attach=attach)


def shifted(swc: SWC, dzyx: tuple[float, float, float]) -> SWC:
    return SWC.from_arrays(swc.zyx + np.asarray(dzyx), swc.parent_index)


EMPTY = SWC.from_arrays(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))


# ----------------------------------------------------------------------------- identical, shifted


@pytest.mark.parametrize("voxel", [(1.0, 1.0, 1.0), (3.0, 0.5, 0.5)])
def test_identical_trees_score_perfectly(voxel):
    tree = y_tree()
    e = evaluate(tree, tree, voxel_size_zyx=voxel)
    assert (e.length.precision, e.length.recall, e.length.f1) == (1.0, 1.0, 1.0)
    assert (e.nodes.precision, e.nodes.recall, e.nodes.f1) == (1.0, 1.0, 1.0)
    assert e.distance.esa == pytest.approx(0, abs=1e-12) and e.distance.dsa == 0 and e.distance.pds == 0
    assert e.diadem.score == 1.0 and e.diadem.total_weight == 11
    assert e.gold == e.test
    assert e.gold.n_branch_points == 2 and e.gold.n_tips == 3 and e.gold.n_trees == 1
    assert e.gold.cable_length == pytest.approx(tree.cable_length(scale_zyx=voxel))


def test_shift_within_and_beyond_tau():
    gold = line(0, 30)
    near = length_scores(gold, line(0, 30, y=1.5), tau=2.0)
    assert (near.recall, near.precision) == (1.0, 1.0)
    far = length_scores(gold, line(0, 30, y=2.5), tau=2.0)
    assert (far.recall, far.precision, far.f1) == (0.0, 0.0, 0.0)
    assert far.gold_length == far.test_length == 30.0
    # Node scores follow: every resampled node has its shifted twin within tau, or none is.
    assert node_scores(gold, line(0, 30, y=1.5), threshold=2.0).f1 == 1.0
    assert node_scores(gold, line(0, 30, y=2.5), threshold=2.0).f1 == 0.0


@pytest.mark.parametrize("shift, dsa, pds", [(1.5, 0.0, 0.0), (3.0, 3.0, 1.0)])
def test_perpendicular_shift_gives_esa_equal_to_shift(shift, dsa, pds):
    d = neuron_distance(line(0, 10), line(0, 10, y=shift))
    assert d.esa == pytest.approx(shift) and d.esa_12 == pytest.approx(shift) and d.esa_21 == pytest.approx(shift)
    assert d.dsa == pytest.approx(dsa) and d.pds == pds
    assert d.n_points_12 == 10 * 2  # ten 1-unit edges, N = int(1 + 1 + 0.5) = 2 points each


def test_anisotropic_voxel_scales_distances():
    # One voxel along z is 3 um: beyond tau = 2 um, and ESA = 3 um.
    gold, test = line(0, 20), line(0, 20, z=1)
    aniso = evaluate(gold, test, voxel_size_zyx=(3.0, 1.0, 1.0))
    assert aniso.length.tau == 2.0 and aniso.length.recall == 0.0
    assert aniso.distance.esa == pytest.approx(3.0)
    assert aniso.gold.cable_length == 20.0
    iso = evaluate(gold, test)
    assert iso.length.recall == 1.0 and iso.distance.esa == pytest.approx(1.0)
    # In-plane voxel size scales x-y lengths and the default tolerance.
    half = evaluate(gold, gold, voxel_size_zyx=(1.0, 0.5, 0.5))
    assert half.gold.cable_length == 10.0 and half.length.tau == default_tau((1, 0.5, 0.5)) == 1.0


# ----------------------------------------------------------------------------- missing parts


def test_missing_branch_costs_its_share_of_cable():
    # Trunk 0..20 along x; a perpendicular branch of 8 from x = 10. The test lacks the branch.
    trunk = polyline((0, 0, 0), (20, 0, 0))
    gold = forest(trunk, subchain(10, (10, 0, 0), (10, 8, 0)), attach=[None, 10])
    test = forest(trunk)
    # The first tau of the missing branch is within tau of the trunk, so it counts as found.
    s = length_scores(gold, test, tau=1.0)
    assert s.precision == 1.0
    assert s.recall == pytest.approx((20 + 1.0) / 28, abs=1e-3)
    assert s.gold_matched_length == pytest.approx(21.0, abs=0.03)
    tiny = length_scores(gold, test, tau=0.01)
    assert tiny.recall == pytest.approx(20 / 28, abs=1e-3) and tiny.precision == 1.0
    # The gold cable near the trunk but off it is missed by nodes too; precision stays 1.
    n = node_scores(gold, test, threshold=1.0)
    assert n.precision == 1.0 and n.recall < 1.0
    # And the reverse: extra test cable lowers precision only.
    extra = length_scores(test, gold, tau=0.01)
    assert extra.recall == 1.0 and extra.precision == pytest.approx(20 / 28, abs=1e-3)


def test_multiple_trees():
    gold = forest(polyline((0, 0, 0), (10, 0, 0)), polyline((0, 20, 0), (10, 20, 0)))
    test = line(0, 10)
    e = evaluate(gold, test)
    assert e.gold.n_trees == 2 and e.test.n_trees == 1
    assert e.length.recall == 0.5 and e.length.precision == 1.0
    assert e.length.f1 == pytest.approx(2 / 3)
    # DIADEM: each line scores its root and its tip (weight 1 each); one line is found.
    assert e.diadem.total_weight == 4 and e.diadem.matched_weight == 2 and e.diadem.score == 0.5
    assert e.nodes.recall == pytest.approx(0.5) and e.nodes.precision == 1.0
    # Vaa3D: from the missing line (distance 20 to the other) every point is apart.
    assert e.distance.pds_12 == pytest.approx(0.5) and e.distance.pds_21 == 0.0
    # Both forests at once, nothing missing.
    assert evaluate(gold, gold).length.f1 == 1.0


# ----------------------------------------------------------------------------- empty and tiny


def test_empty_test_reconstruction():
    gold = y_tree()
    e = evaluate(gold, EMPTY)
    assert (e.length.precision, e.length.recall, e.length.f1) == (0.0, 0.0, 0.0)
    assert (e.nodes.precision, e.nodes.recall, e.nodes.f1) == (0.0, 0.0, 0.0)
    assert math.isnan(e.distance.esa) and math.isnan(e.distance.dsa) and math.isnan(e.distance.pds)
    assert e.diadem.score == 0.0 and e.diadem.total_weight == 11
    assert e.test.n_nodes == 0 and e.test.cable_length == 0.0
    d = e.to_dict()
    assert d["distance"]["esa"] is None
    json.dumps(d, allow_nan=False)  # JSON-ready: no NaN, no numpy types
    assert "nan" in e.table()


def test_one_node_test_reconstruction():
    gold = line(0, 10)
    far = evaluate(gold, SWC.from_arrays([[0, 50, 50]], [-1]))
    assert (far.length.recall, far.length.precision) == (0.0, 0.0)  # no test cable: precision 0
    assert far.nodes.recall == 0.0 and far.diadem.score == 0.0
    assert far.test.n_tips == 1 and far.test.n_branch_points == 0
    # A lone node is a point to be near: Vaa3D-style distances use it as such.
    on = evaluate(gold, SWC.from_arrays([[0, 0, 5]], [-1]))
    assert on.nodes.precision == 1.0 and on.nodes.n_test == 1
    assert on.distance.esa_21 == 0.0 and on.distance.esa_12 == pytest.approx(2.5)
    assert on.length.recall == pytest.approx(4 / 10, abs=1e-3)  # x in 3..7 lies within 2 of it


# ----------------------------------------------------------------------------- Vaa3D


def test_neuron_distance_hand_case():
    # A: (0,0,0)-(3,0,0): len 3, N = int(4.5) = 4 points x = 0, 1, 2, 3.
    # B: (0,1,0)-(1.4,1,0): len 1.4, N = int(2.9) = 2 points x = 0, 1.4.
    a = SWC.from_arrays([[0, 0, 0], [0, 0, 3]], [-1, 0])
    b = SWC.from_arrays([[0, 1, 0], [0, 1, 1.4]], [-1, 0])
    d = neuron_distance(a, b, threshold=1.5)
    d12 = [1.0, 1.0, math.sqrt(0.6**2 + 1), math.sqrt(1.6**2 + 1)]  # last one >= 1.5: apart
    assert d.n_points_12 == 4 and d.n_points_21 == 2
    assert d.esa_12 == pytest.approx(np.mean(d12)) and d.esa_21 == pytest.approx(1.0)
    assert d.esa == pytest.approx((np.mean(d12) + 1.0) / 2)
    assert d.dsa == pytest.approx(d12[3])  # only direction 1->2 has apart points: Vaa3D takes it alone
    assert d.pds == pytest.approx((1 / 4 + 0) / 2)
    assert d.max_distance == pytest.approx(1.0)  # the smaller of the two directional maxima


def _vaa3d_reference(p1: SWC, p2: SWC, d_thres: float) -> tuple[float, float, float]:
    """A literal port of Vaa3D neuron_sim_scores.cpp (dist_directional_swc_1_2, dist_pt_to_line_seg,
    neuron_score_rounding_nearest_neighbor), loops and float32 intermediates included."""

    def seg_dist(p0, a, b):
        if (a == b).all():
            return float(np.linalg.norm(p0 - a))
        if (p0 == a).all() or (p0 == b).all():
            return 0.0
        d12, d01 = b - a, a - p0
        v12, d012 = np.float32(d12 @ d12), np.float32(d12 @ d01)
        t = np.float32(-d012 / v12)
        if t < 0 or t > 1:
            return float(min(np.linalg.norm(p0 - a), np.linalg.norm(p0 - b)))
        return float(np.linalg.norm(a + d12 * float(t) - p0))

    def directional(s1, s2):
        x1, x2 = s1.xyz, s2.xyz
        segs = [(x2[i], x2[p]) for i, p in enumerate(s2.parent_index) if p >= 0]
        total = big_sum = 0.0
        n = n_big = 0
        for i, p in enumerate(s1.parent_index):
            if p < 0:
                continue
            a, b = x1[i], x1[p]
            length = float(np.linalg.norm(a - b))
            N = int(1 + length + 0.5)
            diff = np.zeros(3) if N <= 1 else (1.0 / (N - 1)) * (b - a)
            for j in range(N):
                cur = min(seg_dist(a + diff * j, sa, sb) for sa, sb in segs)
                total += cur
                n += 1
                if cur >= d_thres:
                    big_sum += cur
                    n_big += 1
        return total, n, big_sum, n_big

    s12, n1, b12, n1b = directional(p1, p2)
    s21, n2, b21, n2b = directional(p2, p1)
    esa = (s12 / n1 + s21 / n2) / 2
    if n1b and n2b:
        dsa = (b12 / n1b + b21 / n2b) / 2
    else:
        dsa = b12 / n1b if n1b else (b21 / n2b if n2b else 0.0)
    return esa, dsa, (n1b / n1 + n2b / n2) / 2


def _random_tree(rng: np.random.Generator, n: int, scale: float) -> SWC:
    parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)])
    zyx = np.zeros((n, 3))
    for i in range(1, n):
        zyx[i] = zyx[parents[i]] + rng.normal(0, scale, 3)
    zyx[5] = zyx[parents[5]] + 0.2  # an edge shorter than 0.5: Vaa3D samples just its node
    return SWC.from_arrays(zyx, parents)


@pytest.mark.parametrize("seed", [0, 1])
def test_neuron_distance_matches_literal_vaa3d_port(seed):
    rng = np.random.default_rng(seed)
    a, b = _random_tree(rng, 40, 3.0), _random_tree(rng, 25, 4.0)
    b = shifted(b, (0.5, 1.0, -1.0))
    esa, dsa, pds = _vaa3d_reference(a, b, 2.0)
    d = neuron_distance(a, b)
    assert d.threshold == 2.0
    assert d.esa == pytest.approx(esa, rel=1e-6)
    assert d.dsa == pytest.approx(dsa, rel=1e-6)
    assert d.pds == pytest.approx(pds, abs=1e-9)


# ----------------------------------------------------------------------------- DIADEM


def test_diadem_missing_branch_costs_exactly_its_weight():
    gold = y_tree()
    # Arm 2 (b2 weight 2, its two tips 1 + 1) missing: 11 - 4. b1 is still matched, by the
    # test's continuation node at the same place.
    no_arm = diadem_score(gold, y_tree(with_second_arm=False))
    assert (no_arm.total_weight, no_arm.matched_weight) == (11, 7) and no_arm.score == pytest.approx(7 / 11)
    assert no_arm.n_nodes == 6 and no_arm.n_matched == 3
    # Just the twig from b2 missing: its tip (weight 1).
    no_twig = diadem_score(gold, y_tree(with_twig=False))
    assert no_twig.matched_weight == 10 and no_twig.score == pytest.approx(10 / 11)
    # Extra test structure is not penalised.
    assert diadem_score(y_tree(with_second_arm=False), gold).score == 1.0


def test_diadem_window_and_path_length():
    gold = y_tree()
    # A shift of 3 px in x-y and 4 slices in z is inside the OP window (3.94 px, 5 slices) ...
    assert diadem_score(gold, shifted(gold, (4, 3, 0))).score == 1.0
    # ... 6 slices are not: nothing matches (the tree is flat, so no other test node is near).
    assert diadem_score(gold, shifted(gold, (6, 0, 0))).score == 0.0
    assert diadem_score(gold, shifted(gold, (6, 0, 0)), z_threshold=6.5).score == 1.0
    # In x-y the window is a disc of 3.94 px: a straight line shifted sideways by 5 px is lost.
    assert diadem_score(line(0, 30), line(0, 30, y=5)).score == 0.0
    assert diadem_score(line(0, 30), line(0, 30, y=5), xy_threshold=5.5).score == 1.0
    # A zigzag arm (same ends, much longer path) loses its tip (weight 1) on path length; the
    # root (weight 1: one tip below it) is still found.
    trunk = polyline((0, 0, 0), (20, 0, 0))
    b1 = len(trunk[0]) - 1
    zigzag = subchain(b1, (20, 0, 0), (24, 12, 0), (28, 3, 0), (31, 15, 0), (35, 15, 0))
    detour = forest(trunk, zigzag, attach=[None, b1])
    straight = forest(trunk, subchain(b1, (20, 0, 0), (35, 15, 0)), attach=[None, b1])
    assert diadem_score(straight, straight).score == 1.0
    result = diadem_score(straight, detour)
    assert result.total_weight == 2 and result.matched_weight == 1 and result.n_matched == 1
    assert diadem_score(straight, detour, path_tolerance=1.0).score == 1.0


def test_diadem_unmatched_root_does_not_cascade():
    gold = y_tree()
    # The test starts 10 px along the trunk: the root (weight 3) is missed, the rest is found.
    rows = gold.zyx[:, 2] >= 10
    keep = np.flatnonzero(rows)
    new_row = -np.ones(gold.n_nodes, dtype=np.int64)
    new_row[keep] = np.arange(keep.size)
    parent = gold.parent_index[keep]
    test = SWC.from_arrays(gold.zyx[keep], np.where(parent >= 0, new_row[parent], -1))
    d = diadem_score(gold, test)
    assert d.matched_weight == 8 and d.score == pytest.approx(8 / 11)


def test_node_scores_are_one_to_one():
    # Two test lines on top of each other cannot both match the one gold line.
    gold = line(0, 10)
    test = forest(polyline((0, 0, 0), (10, 0, 0)), polyline((0, 0.1, 0), (10, 0.1, 0)))
    s = node_scores(gold, test, threshold=1.0)
    assert s.recall == 1.0 and s.precision == pytest.approx(0.5)
    # Resampling makes node density irrelevant: dense and sparse nodes along the same line agree.
    assert node_scores(line(0, 10, step=0.25), line(0, 10, step=5.0), threshold=1.0).f1 == 1.0


# ----------------------------------------------------------------------------- API details


def test_morphometrics_and_output_formats():
    m = morphometrics(y_tree(), voxel_size_zyx=(2.0, 1.0, 1.0))
    assert (m.n_trees, m.n_branch_points, m.n_tips) == (1, 2, 3)
    e = evaluate(y_tree(), y_tree(with_twig=False))
    d = e.to_dict()
    assert set(d) == {"length", "nodes", "distance", "diadem", "gold", "test", "voxel_size_zyx"}
    assert isinstance(d["gold"]["n_nodes"], int) and isinstance(d["length"]["f1"], float)
    assert d["voxel_size_zyx"] == [1.0, 1.0, 1.0]
    table = e.table()
    for needle in ("length F1", "node F1", "ESA", "DSA", "PDS", "DIADEM", "branch points", "cable length"):
        assert needle in table


@pytest.mark.parametrize(
    "kwargs",
    [dict(voxel_size_zyx=(1, 0, 1)), dict(voxel_size_zyx=(1, 1)), dict(tau=0.0), dict(tau=float("nan")),
     dict(diadem_path_tolerance=-1)],
)
def test_bad_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        evaluate(line(0, 5), line(0, 5), **kwargs)


def test_header_voxel_size_round_trip(tmp_path):
    write_swc(tmp_path / "a.swc", line(0, 5), voxel_size_zyx=(2, 0.5, 0.25))
    assert swc_header_units(read_swc(tmp_path / "a.swc")) == ((2.0, 0.5, 0.25), "voxel")
    write_swc(tmp_path / "b.swc", line(0, 5), units="um")
    assert swc_header_units(read_swc(tmp_path / "b.swc")) == (None, "um")


# ----------------------------------------------------------------------------- real gold standard


def _without_subtree(swc: SWC, row: int) -> SWC:
    """``swc`` without node ``row`` and everything below it."""
    parent = swc.parent_index
    drop = np.zeros(swc.n_nodes, dtype=bool)
    drop[row] = True
    while True:  # mark children of dropped nodes until nothing changes
        grow = ~drop & (parent >= 0) & drop[np.maximum(parent, 0)]
        if not grow.any():
            break
        drop |= grow
    keep = np.flatnonzero(~drop)
    new_row = -np.ones(swc.n_nodes, dtype=np.int64)
    new_row[keep] = np.arange(keep.size)
    return SWC.from_arrays(swc.zyx[keep], np.where(parent[keep] >= 0, new_row[parent[keep]], -1))


@pytest.mark.skipif(not OP_1.exists(), reason=f"shared DIADEM data not found at {OP_1}")
def test_diadem_op1_gold_against_itself_and_perturbed_copies():
    gold = read_swc(OP_1)
    same = evaluate(gold, gold, voxel_size_zyx=OP_VOXEL)
    assert same.length.f1 == same.nodes.f1 == same.diadem.score == 1.0
    assert same.distance.esa == pytest.approx(0, abs=1e-9)
    assert (same.gold.n_nodes, same.gold.n_trees) == (1496, 1)

    # Shifted by one pixel in x (0.33 um < tau = 0.66 um) plus small jitter: all found.
    rng = np.random.default_rng(0)
    moved = SWC.from_arrays(gold.zyx + [0, 0, 1] + rng.normal(0, 0.05, gold.zyx.shape), gold.parent_index)
    e = evaluate(gold, moved, voxel_size_zyx=OP_VOXEL)
    assert e.length.recall == 1.0 and e.length.precision > 0.999
    assert 0.15 < e.distance.esa < 0.35 and e.distance.pds < 0.01  # at most 1 px (0.33 um) apart
    assert e.diadem.score > 0.95

    # Without the subtree of a branch point's child: recall and DIADEM drop, precision stays 1.
    children = np.bincount(gold.parent_index[gold.parent_index >= 0], minlength=gold.n_nodes)
    branch = np.flatnonzero(children >= 2)[len(np.flatnonzero(children >= 2)) // 2]
    cut_at = int(np.flatnonzero(gold.parent_index == branch)[1])
    pruned = _without_subtree(gold, cut_at)
    lost = gold.cable_length(OP_VOXEL) - pruned.cable_length(OP_VOXEL)
    p = evaluate(gold, pruned, voxel_size_zyx=OP_VOXEL)
    assert p.length.precision == 1.0
    assert 1 - p.length.recall == pytest.approx(lost / gold.cable_length(OP_VOXEL), abs=0.01)
    assert p.diadem.score < 1.0 and p.diadem.matched_weight < p.diadem.total_weight
