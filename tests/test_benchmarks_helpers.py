"""Pure helpers of the accuracy benchmark: weak-branch selection and the stand-in probability map."""

from __future__ import annotations

import doctest
import math

import numpy as np
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
