from pathlib import Path

import pytest

from neurotrace_dask.config import Config, dump_config, load_config
from neurotrace_dask.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides():
    cfg = load_config(overrides={"convert": {"levels": 2, "chunks": [8, 16, 16]}})
    assert cfg.convert.levels == 2
    assert cfg.convert.chunks == (8, 16, 16)
    assert cfg.cluster.kind == "local"
    assert cfg.cluster.dashboard_address.startswith("127.0.0.1")


def test_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("convert:\n  levels: 4\n  compression_level: 7\n")
    cfg = load_config(path, {"convert": {"levels": 2}})
    assert (cfg.convert.levels, cfg.convert.compression_level) == (2, 7)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("convert:\n  chunkz: [1, 2, 3]\n", "unknown key 'convert.chunkz'"),
        ("clusterr: {}\n", "unknown key 'clusterr'"),
        ("convert:\n  levels: many\n", "convert.levels"),
        ("convert:\n  chunks: [0, 2, 3]\n", "convert.chunks.0"),
        ("convert:\n  voxel_size: [1, .nan, 1]\n", "convert.voxel_size.1"),
        ("convert:\n  chunks: [8, 8, 8]\n  shards: [12, 16, 16]\n", "multiple of convert.chunks"),
        ("cluster:\n  kind: address\n", "cluster.address is not set"),
        ("- just\n- a list\n", "must be a mapping"),
        ("convert: {levels: [\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_key(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert needle in message and "bad.yaml" in message and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["default.yaml", "slurm.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config)


def test_dump_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "slurm.yaml")
    path = tmp_path / "again.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_default_yaml_matches_defaults():
    # configs/default.yaml documents the defaults; it must not drift from the code.
    assert load_config(CONFIGS / "default.yaml") == Config()
