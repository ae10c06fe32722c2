"""Shared fixtures: one in-process Dask client for the session, small generated stacks."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile

from neurotrace_dask.cluster import open_client
from neurotrace_dask.config import ClusterConfig, LocalClusterConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """Import ``benchmarks/NAME.py`` (not a package) for its tests, and forget it after."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="session")
def client():
    """An in-process cluster (quick to start) made the way the package makes clusters."""
    local = LocalClusterConfig(n_workers=1, threads_per_worker=2, processes=False)
    with open_client(ClusterConfig(local=local, dashboard_address="127.0.0.1:0")) as c:
        yield c


@pytest.fixture
def stack16() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 4000, (20, 70, 90)).astype(np.uint16)


@pytest.fixture
def tiff16(tmp_path, stack16) -> Path:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack16, imagej=True, resolution=(1 / 0.25, 1 / 0.25),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"})
    return path
