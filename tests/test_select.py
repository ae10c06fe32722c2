"""DHPR selection: criteria, the seed's rule, the diverse/hard variant, pools, CSV, the CLI."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurotrace_dask.config import SelectConfig, SynthConfig
from neurotrace_dask.errors import InputError, OutputError
from neurotrace_dask.model import ModelSpec, build_model, save_checkpoint
from neurotrace_dask.select import (
    open_pool,
    read_subset,
    sample_criteria,
    select,
    select_samples,
    write_pool,
    write_selection,
)

NEUROTRACE = str(Path(sys.executable).with_name("neurotrace"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _sample(n_lines: int, signal: float, noise: float, seed: int = 0, shape=(16, 32, 32)):
    """``n_lines`` bright lines of ``signal`` over a background with Gaussian ``noise``."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for i in range(n_lines):
        label[2 + (3 * i) % (shape[0] - 4), 3 + (5 * i) % (shape[1] - 6), :] = 1
    image = 20 + signal * label + rng.normal(0, noise, shape)
    return image.clip(0, 255).astype(np.uint8), label


def test_criteria_measure_density_noise_and_low_snr():
    dense_noisy = sample_criteria(*_sample(10, 15, 8), density_scale=1000)
    sparse_clean = sample_criteria(*_sample(1, 100, 1), density_scale=1000)
    assert dense_noisy["density"] > sparse_clean["density"]
    assert dense_noisy["noise"] > 5 > 2 > sparse_clean["noise"]
    assert dense_noisy["low_snr_ratio"] > 0.2 and sparse_clean["low_snr_ratio"] == 0.0
    assert sample_criteria(*_sample(40, 15, 8), density_scale=10)["density"] == 1.0  # clipped


def test_dhpr_ranks_a_noisy_dense_sample_above_a_clean_sparse_one():
    samples = [_sample(1, 100, 1, seed=0), _sample(10, 15, 8, seed=1), _sample(2, 60, 2, seed=2),
               _sample(6, 20, 6, seed=3)]  # fmt: skip
    crit = [sample_criteria(*s, density_scale=1000) for s in samples]
    order, score = select_samples(crit, 2, method="dhpr")
    assert order == [1, 3]  # the noisier half, densest + least SNR first
    assert score[1] > score[0]


def test_dhpr_keeps_the_noisier_half_and_tops_up():
    crit = [{"density": 1.0, "noise": 1.0, "low_snr_ratio": 1.0},  # dense but quiet: gated out
            {"density": 0.1, "noise": 5.0, "low_snr_ratio": 0.1},
            {"density": 0.2, "noise": 6.0, "low_snr_ratio": 0.2},
            {"density": 0.0, "noise": 0.5, "low_snr_ratio": 0.0}]  # fmt: skip
    assert select_samples(crit, 2)[0] == [2, 1]
    assert select_samples(crit, 3)[0] == [2, 1, 0]  # topped up from the quiet half by score
    assert select_samples(crit, 10)[0] == [2, 1, 0, 3]


def test_dhpr_plus_prefers_diverse_and_hard_samples():
    base = {"density": 0.5, "noise": 5.0, "low_snr_ratio": 0.5, "mean": 10.0, "std": 5.0, "p99": 40.0,
            "contrast": 2.0}  # fmt: skip
    crit = [dict(base) for _ in range(3)] + [dict(base, mean=50.0, p99=90.0, density=0.45)]
    crit += [dict(base, noise=1.0) for _ in range(4)]  # the quiet half
    assert select_samples(crit, 2, method="dhpr")[0][1] in (1, 2)  # plain DHPR takes a near-duplicate
    assert select_samples(crit, 2, method="dhpr+", diversity=0.8)[0] == [0, 3]
    hard = [0.0, 0.0, 5.0, 0.0] + [0.0] * 4
    assert select_samples(crit, 1, method="dhpr+", hardness=hard)[0] == [2]


def test_random_is_seeded():
    crit = [{"density": 0.1, "noise": float(i), "low_snr_ratio": 0.0} for i in range(20)]
    a = select_samples(crit, 5, method="random", seed=1)[0]
    assert a == select_samples(crit, 5, method="random", seed=1)[0] != select_samples(crit, 5, method="random", seed=2)[0]
    assert len(set(a)) == 5


@pytest.fixture
def pool(tmp_path) -> Path:
    specs = [(1, 100, 1), (10, 15, 8), (2, 60, 2), (6, 20, 6), (8, 12, 7), (1, 80, 1)]
    samples = [(f"s{i}", *_sample(*spec, seed=i), {"source": "test", "intensity": 1.0}) for i, spec in enumerate(specs)]
    return write_pool(tmp_path / "pool.zarr", samples, voxel_size=(1, 1, 1))


def test_pool_round_trip_and_errors(tmp_path, pool):
    p = open_pool(pool)
    assert p.names == [f"s{i}" for i in range(6)] and p.voxel_size == (1, 1, 1)
    assert p.image("s1").shape == (16, 32, 32) and set(np.unique(p.label("s1")[...])) == {0, 1}
    with pytest.raises(OutputError, match="exists already"):
        write_pool(pool, [], voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="name"):
        write_pool(tmp_path / "bad.zarr", [("a/b", *_sample(1, 1, 1), {})], voxel_size=(1, 1, 1))
    with pytest.raises(InputError, match="not found"):
        open_pool(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="plain"):
        open_pool(tmp_path / "plain")


def test_selection_csv(tmp_path, pool):
    selection = select(pool, SelectConfig(k=2, density_scale=1000))
    criteria, chosen = write_selection(selection, tmp_path / "sel")
    rows = list(csv.DictReader(criteria.open()))
    assert len(rows) == 6 and {"density", "noise", "low_snr_ratio", "score", "selected", "rank"} <= set(rows[0])
    picked = [r["name"] for r in sorted((r for r in rows if r["selected"] == "True"), key=lambda r: int(r["rank"]))]
    assert picked == selection.selected == [r["name"] for r in csv.DictReader(chosen.open())]
    assert selection.selected == ["s1", "s4"]
    assert read_subset(chosen, open_pool(pool)) == ["s1", "s4"]
    assert read_subset(criteria) == ["s1", "s4"]  # the `selected` column is honoured
    with pytest.raises(OutputError, match="exists already"):
        write_selection(selection, tmp_path / "sel")
    (tmp_path / "other.csv").write_text("name\nzzz\n")
    with pytest.raises(InputError, match="'zzz' is not in the pool"):
        read_subset(tmp_path / "other.csv", open_pool(pool))


def test_hardness_from_a_checkpoint(tmp_path, pool):
    ckpt = save_checkpoint(tmp_path / "m", build_model(ModelSpec(width=2, modules_per_stage=0), seed=0),
                           voxel_size=(1, 1, 1))  # fmt: skip
    selection = select(pool, SelectConfig(k=3, method="dhpr+", checkpoint=ckpt, density_scale=1000))
    assert len(selection.selected) == 3
    assert all(r["hardness"] > 0 for r in selection.rows)


def test_cli_select(tmp_path, pool):
    ok = subprocess.run([NEUROTRACE, "select", str(pool), "--out", str(tmp_path / "sel"), "-k", "2"],
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "dhpr: selected 2 of 6" in ok.stdout and (tmp_path / "sel" / "selected.csv").is_file()
    bad = subprocess.run([NEUROTRACE, "select", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope.zarr" in bad.stderr


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data (DIADEM OP) is not present")
def test_dimmer_op_crops_have_more_low_snr_signal():
    import tifffile

    from neurotrace_dask.io.swc import read_swc
    from neurotrace_dask.synth import dim_real_image
    from neurotrace_dask.train import _swc_reader

    op = SHARED / "diadem_op"
    real = tifffile.imread(op / "stacks" / "OP_3.tif")
    gold = read_swc(op / "gold" / "OP_3.swc")
    region = (slice(10, 50), slice(140, 230), slice(100, 420))
    mask = _swc_reader(gold, real.shape, (1.0, 0.3296, 0.3296))(region)
    crop = np.ascontiguousarray(real[region])
    ratios = [sample_criteria(dim_real_image(crop, i, SynthConfig(seed=3)), mask)["low_snr_ratio"]
              for i in (1.0, 0.25, 0.125)]  # fmt: skip
    assert ratios[0] < ratios[1] < ratios[2]
