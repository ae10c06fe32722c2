"""Pure helpers of the accuracy benchmark: weak-branch selection and the stand-in probability map."""

from __future__ import annotations

import doctest
import math

import numpy as np
from scipy import ndimage
import pytest

from neurotrace_dask.config import SynthConfig
from neurotrace_dask.io.swc import SWC
from tests.conftest import benchmark_module



@pytest.fixture(scope="module")
def acc():
    with benchmark_module("accuracy") as module:
        yield module


def star() -> SWC:
    """A soma (two type-1 nodes) with a long primary branch that forks, and a short side branch.

    Rows: 0-1 soma; 1 -> 2 -> 3 -> 4 (branch point at 4); 4 -> 5 -> 6 and 4 -> 7; 1 -> 8.
    """
    zyx = [[5, 5, 2], [5, 5, 3], [5, 5, 6], [5, 5, 9], [5, 5, 12], [5, 8, 15], [5, 11, 18], [5, 2, 15], [5, 2, 3]]
    parent = [-1, 0, 1, 2, 3, 4, 5, 4, 1]
    return SWC.from_arrays(zyx, parent, types=[1, 1, 3, 3, 3, 3, 3, 3, 3])


def test_docstring_examples(acc):
    result = doctest.testmod(acc)
    assert result.attempted > 0 and result.failed == 0


def test_gold_branches_sections_and_soma(acc):
    branches = [b.tolist() for b in acc.gold_branches(star())]
    # The soma edge 0-1 is no branch; node 1 (two children) starts two sections.
    assert sorted(branches) == [[1, 2, 3, 4], [1, 8], [4, 5, 6], [4, 7]]


def test_gold_branches_cover_all_non_soma_cable(acc):
    gold = star()
    total = sum(np.linalg.norm(np.diff(gold.zyx[b], axis=0), axis=1).sum() for b in acc.gold_branches(gold))
    soma_edge = np.linalg.norm(gold.zyx[1] - gold.zyx[0])
    assert math.isclose(total, gold.cable_length() - soma_edge)


def test_weakest_third_rounds_up_and_skips_nan(acc):
    assert acc.weakest(np.array([3.0, 1.0, 2.0, 4.0])).tolist() == [1, 2]  # ceil(4/3) = 2
    assert acc.weakest(np.array([np.nan, np.nan])).tolist() == []
    assert acc.weakest(np.array([2.0, 2.0, 2.0])).tolist() == [0]  # ties: by index


def test_weak_branches_are_the_dim_ones(acc):
    gold = star()
    light = np.full((10, 14, 20), 50.0, np.float32)
    light[:, :4, :] = 5.0  # the y < 4 half is dim: the branches 4 -> 7 and 1 -> 8 run there
    sub, info = acc.weak_subforest(gold, light, (1.0, 1.0, 1.0))
    assert info["branches"] == 4 and info["weak_branches"] == 2
    assert sub.n_trees == 2
    # The weak sub-forest holds exactly the two dim branches' cable.
    expected = np.linalg.norm(gold.zyx[7] - gold.zyx[4]) + np.linalg.norm(gold.zyx[8] - gold.zyx[1])
    assert math.isclose(sub.cable_length(), expected)


def test_weak_recall_counts_only_weak_cable(acc):
    gold = star()
    branches = acc.gold_branches(gold)
    weak = acc.subforest(gold, [b for b in branches if b.tolist() == [1, 8]])
    # A test that traces everything but the branch 1 -> 8 (3 voxels along y from node 1):
    # only its first half voxel, next to node 1, lies within tau.
    test = SWC.from_arrays(gold.zyx[[1, 2, 3, 4, 5, 6]], [-1, 0, 1, 2, 3, 4])
    assert acc.weak_recall(weak, test, (1.0, 1.0, 1.0), tau=0.5) == pytest.approx(0.5 / 3)
    assert acc.weak_recall(weak, gold, (1.0, 1.0, 1.0), tau=0.5) == 1.0
    assert math.isnan(acc.weak_recall(None, gold, (1.0, 1.0, 1.0), tau=0.5))


def test_standin_follows_snr_and_is_deterministic(acc):
    params = SynthConfig()
    unit = acc._gaussian_norm(1.0) * math.sqrt(params.background_photons + params.read_noise**2)
    signal = np.zeros((16, 32, 64), np.float32)
    signal[8:, :, 32:] = 6 * unit  # a slab at 6 smoothed noise units
    signal[8:, :, :8] = 20 * unit  # and one at 20
    total = signal + params.background_photons
    p = acc.standin_probability(signal, total, params, [1])
    assert p.dtype == np.uint8
    assert np.array_equal(p, acc.standin_probability(signal, total, params, [1]))
    assert not np.array_equal(p, acc.standin_probability(signal, total, params, [2]))
    # 16 per noise unit (raw_to_probability's mapping with the TraceConfig defaults), so
    # 6 units read 96 on average; background stays below the tracer's low threshold (64, 4 units)
    # but for a rare voxel; the bright slab saturates.
    assert abs(float(p[12:, :, 36:].mean()) - 96) < 3
    assert np.mean(p[:4, :, 12:28] >= 64) < 1e-3
    assert np.mean(p[12:, :, :4] == 255) > 0.95


def test_gaussian_norm_matches_smoothed_white_noise(acc):
    noise = np.random.default_rng(0).standard_normal((64, 64, 64))
    from scipy import ndimage

    inner = ndimage.gaussian_filter(noise, 1.0)[8:-8, 8:-8, 8:-8]  # away from the mirrored edges
    assert inner.std() == pytest.approx(acc._gaussian_norm(1.0), rel=0.03)


def test_weak_ceiling_share_of_cable_above_each_threshold():
    with benchmark_module("weak_ceiling") as ceiling:
        assert doctest.testmod(ceiling).failed == 0
        # A 20-voxel line along x (0.5 um voxels): the first half at 80, the second at 40.
        line = SWC.from_arrays([[4, 4, 2], [4, 4, 22]], [-1, 0])
        prob = np.zeros((9, 9, 30), np.uint8)
        prob[4, 4, :12] = 80
        prob[4, 4, 12:] = 40
        # 3x3x3 maxima: the 80 reaches one voxel past its end (x 12), so 11 of 20 voxels' length.
        shares = ceiling.ceiling(prob, line, np.array([1.0, 0.5, 0.5]), thresholds=(64.0, 32.0, 100.0))
        assert shares == pytest.approx([0.525, 1.0, 0.0], abs=0.02)


def test_weak_ceiling_missed_signal_splits_the_missed_cable_by_expected_signal():
    with benchmark_module("weak_ceiling") as ceiling:
        voxel = np.array([1.0, 0.5, 0.5])
        line = SWC.from_arrays([[4, 4, 2], [4, 4, 22]], [-1, 0])  # 10 um of weak cable
        expected = np.zeros((9, 9, 30), np.uint8)
        expected[4, 4, :12] = 80  # its first half holds signal, the second little
        expected[4, 4, 12:] = 40
        traced = SWC.from_arrays([[4, 4, 2], [4, 4, 7]], [-1, 0])  # the trace covers x 2-7 (+ tau)
        missed = ceiling.missed_signal(line, traced, expected, voxel, tau=1.0, thresholds=(64.0, 32.0))
        # Missed: x beyond 9 (7 + 1 um / 0.5 um); the 80 reaches x 12 in the 3x3x3 maximum.
        assert missed[1] == pytest.approx(13 / 20, abs=0.03)
        assert missed[0] == pytest.approx(3 / 20, abs=0.03)
        assert ceiling.missed_signal(line, line, expected, voxel, tau=1.0) == [0.0, 0.0, 0.0]


def test_gap_limits_choice_keeps_precision():
    with benchmark_module("gap_limits") as gaps:
        assert doctest.testmod(gaps).failed == 0
        # The looser setting finds more (higher F1) but loses precision in one cell: the next best wins.
        rows = [{"setting": s, "series": series, "intensity": i, "f1": f, "precision": p}
                for s, f, p_op, p_ren in [((6.0, 32.0), 0.80, 0.97, 0.99), ((12.0, 24.0), 0.82, 0.968, 0.99),
                                          ((15.0, 20.0), 0.85, 0.97, 0.98)]
                for series, p in (("OP", p_op), ("rendered", p_ren)) for i in (1.0, 0.25)]  # fmt: skip
        assert gaps.choose(rows, baseline=(6.0, 32.0)) == (12.0, 24.0)
        assert gaps.choose(rows, baseline=(6.0, 32.0), slack=0.02) == (15.0, 20.0)
        from neurotrace_dask.config import TraceConfig

        assert gaps.SWEEPS["link"][1][0] == (TraceConfig().extend_min_mean,)  # baseline: links as any extension


def test_noise_draws_spread_and_target():
    with benchmark_module("noise_draws") as draws:
        assert doctest.testmod(draws).failed == 0
        assert draws.DRAWS[0] == 0  # the draw accuracy.py scores is one of them
        rows = [{"draw": d, "series": s, "intensity": i, "f1": 0.95, "precision": p, "weak_recall": w}
                for d, w in ((0, 0.79), (1, 0.80), (2, 0.84)) for s, p in (("OP", 0.99), ("rendered", 0.90))
                for i in (1.0, 0.25)]  # fmt: skip
        over = {(r["series"], r["intensity"]): r for r in draws.spread(rows)}
        assert over["OP", 0.25]["weak_recall"] == pytest.approx(0.81) and over["OP", 0.25]["draws"] == 3
        assert over["OP", 0.25]["weak_recall_sd"] == pytest.approx(np.std([0.79, 0.80, 0.84], ddof=1))
        assert over["OP", 0.25]["target_met"] is True
        assert over["rendered", 0.25]["target_met"] is False  # precision 0.90
        assert over["OP", 1.0]["target_met"] is None  # not the target's intensity
        assert draws.target_met(rows[0]) is None and draws.target_met(rows[1]) is False  # OP 0.25: 0.79


def test_results_json_default_and_missing_data(acc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["script"])
    monkeypatch.setattr(acc, "SHARED", tmp_path)  # present
    assert acc.results_json("Title.\n\nMore.", "x.json") == acc.HERE / "results" / "x.json"
    monkeypatch.setattr(acc, "SHARED", tmp_path / "missing")
    assert acc.results_json("Title.", "x.json") is None
    assert "is missing" in capsys.readouterr().err


# --------------------------------------------------------------------------- the neuron at the gold root


def three_trees() -> SWC:
    """Three trees, rows interleaved and listed child before parent, so picking one must renumber.

    Tree A (rows 0, 3, 5): a line along x at y 0 from x 20 to x 40 (root row 5 at x 20).
    Tree B (rows 1, 2, 4, 6): a fork at y 10 (root row 6 at x 0; x 0 -> 10, then two branches).
    Tree C (row 7): a lone node at z 6 above the origin.
    """
    zyx = [[0, 0, 30], [0, 10, 10], [0, 14, 14], [0, 0, 40], [0, 6, 14], [0, 0, 20], [0, 10, 0], [6, 0, 0]]
    parent = [5, 6, 1, 0, 1, -1, -1, -1]
    return SWC.from_arrays(zyx, parent, types=[3, 3, 3, 3, 3, 3, 1, 3])


def assert_valid_renumbering(tree: SWC) -> None:
    """Rows 0..n-1, ids 1..n, one root at row 0 and every parent before its child."""
    parent = tree.parent_index
    assert tree.n_trees == 1 and parent[0] == -1
    assert np.all(parent[1:] >= 0) and np.all(parent[1:] < np.arange(1, tree.n_nodes))
    assert tree.ids.tolist() == list(range(1, tree.n_nodes + 1))


def test_neuron_at_root_picks_the_tree_nearest_the_gold_root(acc):
    test = three_trees()
    iso = (1.0, 1.0, 1.0)
    gold = SWC.from_arrays([[0, 1, 22], [0, 1, 39]], [-1, 0])  # root next to tree A's root
    tree = acc.neuron_at_root(test, gold, iso)
    assert sorted(tree.zyx[:, 2].tolist()) == [20.0, 30.0, 40.0]
    assert_valid_renumbering(tree)
    assert tree.cable_length() == 20.0


def test_neuron_at_root_nearest_node_mid_tree(acc):
    test = three_trees()
    # The gold root lies by tree B's node at (0, 10, 10), the middle of the fork, not by any root
    # (tree B's root is 10 away, tree A's 11.2 away).
    gold = SWC.from_arrays([[0, 10, 11], [0, 20, 11]], [-1, 0])
    tree = acc.neuron_at_root(test, gold, (1.0, 1.0, 1.0))
    assert tree.n_nodes == 4
    assert_valid_renumbering(tree)
    assert tree.zyx[0].tolist() == [0.0, 10.0, 0.0]  # rooted where it was, at row 6's node
    assert tree.types[0] == 1 and acc.count_tips(tree) == 2
    assert tree.cable_length() == pytest.approx(test.cable_length() - 20.0)  # all but tree A


def test_neuron_at_root_measures_in_micrometres(acc):
    test = three_trees()
    # Tree C's lone node is at (6, 0, 0), tree B's root at (0, 10, 0).
    gold = SWC.from_arrays([[0, 4, 0], [0, 4, 5]], [-1, 0])
    # Voxels: C sqrt(36 + 16) = 7.2 away, B 6: B. Thin 0.5 um z slices: C sqrt(9 + 16) = 5 um, B 6 um: C.
    assert acc.neuron_at_root(test, gold, (1.0, 1.0, 1.0)).n_nodes == 4
    near_c = acc.neuron_at_root(test, gold, (0.5, 1.0, 1.0))
    assert near_c.n_nodes == 1 and near_c.zyx.tolist() == [[6.0, 0.0, 0.0]] and near_c.parent_index.tolist() == [-1]
    gold = SWC.from_arrays([[0, 3, 0], [0, 3, 5]], [-1, 0])
    # Voxels: C sqrt(36 + 9) = 6.7, B 7: C. Deep 2 um z voxels: C sqrt(144 + 9) = 12.4 um, B 7 um: B.
    assert acc.neuron_at_root(test, gold, (1.0, 1.0, 1.0)).n_nodes == 1
    assert acc.neuron_at_root(test, gold, (2.0, 1.0, 1.0)).n_nodes == 4


def test_neuron_at_root_uses_the_root_of_the_longest_gold_tree(acc):
    test = three_trees()
    # The gold's first root sits on tree A, but its second tree (by tree B) holds more cable.
    gold = SWC.from_arrays([[0, 0, 20], [0, 0, 25], [0, 10, 0], [0, 10, 30]], [-1, 0, -1, 2])
    assert acc.gold_root(gold, (1.0, 1.0, 1.0)) == 2
    assert acc.neuron_at_root(test, gold, (1.0, 1.0, 1.0)).n_nodes == 4
    single = SWC.from_arrays([[0, 0, 20], [0, 0, 25]], [-1, 0])
    assert acc.neuron_at_root(test, single, (1.0, 1.0, 1.0)).n_nodes == 3
    empty = SWC.from_arrays(np.zeros((0, 3)), np.zeros(0, np.int64))
    assert acc.neuron_at_root(empty, gold, (1.0, 1.0, 1.0)) is None


def test_neuron_at_root_matches_the_tree_split_on_a_big_forest(acc):
    # 20000 nodes in 50 trees, parents in random rows (children often before parents).
    rng = np.random.default_rng(3)
    n, k = 20000, 50
    order = rng.permutation(n)  # order[i]: the row of the i-th node of a random recursive forest
    parent_rank = np.where(np.arange(n) < k, -1, (rng.random(n) * np.arange(n)).astype(np.int64))
    parent = np.full(n, -1, np.int64)
    parent[order] = np.where(parent_rank < 0, -1, order[np.maximum(parent_rank, 0)])
    test = SWC.from_arrays(rng.random((n, 3)) * 100, parent)
    gold = SWC.from_arrays([[50, 50, 50], [50, 50, 60]], [-1, 0])
    voxel = (2.0, 0.5, 0.5)
    tree = acc.neuron_at_root(test, gold, voxel)
    assert_valid_renumbering(tree)
    d = np.linalg.norm((test.zyx - [50, 50, 50]) * voxel, axis=1)
    # The tree SWC.trees() splits off that holds the nearest node (a slow but plain way to find it).
    (expected,) = [t for t in test.trees() if np.linalg.norm((t.zyx - [50, 50, 50]) * voxel, axis=1).min() == d.min()]
    assert tree.n_nodes == expected.n_nodes and tree.cable_length() == pytest.approx(expected.cable_length())
    assert acc.count_tips(tree) == acc.count_tips(expected)
    assert sum(acc.count_tips(t) for t in test.trees()) == acc.count_tips(test)


def test_count_tips_on_small_trees(acc):
    assert acc.count_tips(star()) == 3  # rows 6, 7 and 8; the root (one child) is no tip
    assert acc.count_tips(SWC.from_arrays([[0, 0, 0]], [-1])) == 1  # a lone node
    assert acc.count_tips(SWC.from_arrays([[0, 0, 0], [0, 0, 1]], [-1, 0])) == 1
    assert acc.count_tips(SWC.from_arrays([[0, 0, 1], [0, 0, 0], [0, 0, 2]], [-1, 0, 0])) == 2  # root mid-line
    assert acc.count_tips(three_trees()) == 4  # A's end, B's two branch ends, C's lone node
    assert acc.count_tips(None) == 0


def test_run_from_dict_loads_a_report_without_the_root_fields(acc):
    old = {"method": "neurotrace-raw", "case": "OP_1", "series": "OP", "intensity": 0.25, "k": None,
           "threshold": None, "status": "ok", "seconds": 3.5, "peak_rss_mb": 100.0, "tuning": False,
           "weak_recall": 0.7, "scores": {"length": {"f1": 0.8, "recall": 0.75, "precision": 0.9},
                                           "diadem": {"score": 0.6}}}  # fmt: skip
    run = acc._run_from_dict(old)
    assert run.root_scores == {} and math.isnan(run.tips) and math.isnan(run.gold_tips) and math.isnan(run.trees)
    h = acc.headline(run)
    assert h["f1"] == 0.8 and math.isnan(h["root_f1"]) and math.isnan(h["tips_ratio"])  # unknown, not 0
    assert math.isnan(acc.root_target_rows([run])[0]["root_f1"])
    # A report with them (NaN written as null) comes back as written.
    new = {**old, "root_scores": old["scores"], "root_weak_recall": None, "tips": 6, "gold_tips": 4, "trees": 3}
    run = acc._run_from_dict(new)
    assert acc.headline(run)["root_f1"] == 0.8 and acc.headline(run)["tips_ratio"] == 1.5
    assert math.isnan(run.root_weak_recall)


def test_failed_run_scores_zero_for_the_root_neuron(acc):
    run = acc.Run("rivulet2", "OP_1", "OP", 0.125, 4.0, 1.0, "failed: timeout after 300 CPU s", gold_tips=40)
    h = acc.headline(run)
    assert h["root_f1"] == h["root_precision"] == h["root_diadem"] == 0.0
    assert math.isnan(h["tips_ratio"])  # no neuron to count tips on: left out of the median
    row = acc.root_target_rows([run])[0]
    assert row["root_f1"] == 0.0 and row["target_met"] is False
    text = acc.markdown([run], {}, {}, {}, (1.0, 0.125))
    assert "Neuron at the gold root: mean length F1" in text and "Tips of the neuron at the root" in text


def test_map_width_measures_a_map_twice_as_wide_as_the_fibre():
    with benchmark_module("map_width") as widths_module:
        assert doctest.testmod(widths_module).failed == 0
        # A fibre along x on the OP grid with a Gaussian profile (FWHM about 1 um in y), and a map
        # that calls a band twice its half-maximum width neurite.
        shape = (9, 40, 80)
        z, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        r2 = ((z - 4) * 1.0) ** 2 + ((y - 20) * 0.3296) ** 2
        profile = 200 * np.exp(-r2 / (2 * 0.42**2))
        image = np.repeat(profile[:, :, None], shape[2], axis=2).astype(np.uint8)
        gold = SWC.from_arrays(np.array([[4, 20, x] for x in range(5, 76, 5)], float), np.arange(-1, 14))
        half = image >= 100
        wide = ndimage.binary_dilation(half, iterations=1, structure=np.ones((1, 3, 1), bool))
        wide = ndimage.binary_dilation(wide, iterations=1, structure=np.ones((1, 3, 1), bool))
        w = widths_module.widths(image, np.where(wide, 255, 0).astype(np.uint8), gold)
        assert 1.4 < w["ratio"] < 2.6 and 0.2 < w["image_um"] < 1.5
        same = widths_module.widths(image, np.where(half, 255, 0).astype(np.uint8), gold)
        assert same["ratio"] == pytest.approx(1.0)
