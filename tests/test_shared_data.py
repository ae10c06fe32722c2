"""Real data from ../shared/data: DIADEM OP stacks convert exactly; real SWCs read and round-trip."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from neurotrace_dask.config import ConvertConfig
from neurotrace_dask.io.convert import convert
from neurotrace_dask.io.omezarr import open_image
from neurotrace_dask.io.swc import read_swc, write_swc

from .conftest import SHARED_DATA

OP = SHARED_DATA / "diadem_op"
MORPHOLOGIES = SHARED_DATA / "morphologies"
needs_op = pytest.mark.skipif(not OP.exists(), reason="../shared/data/diadem_op is absent")
needs_morphologies = pytest.mark.skipif(not MORPHOLOGIES.exists(), reason="../shared/data/morphologies is absent")


@needs_op
def test_diadem_op1_converts_exactly(tmp_path, client):
    stack = OP / "stacks" / "OP_1.tif"
    result = convert(stack, tmp_path / "op1.ome.zarr", ConvertConfig(voxel_size=(1.0, 0.3296, 0.3296)), client=client)
    arrays, voxel_size = open_image(tmp_path / "op1.ome.zarr")
    assert voxel_size == pytest.approx((1.0, 0.3296, 0.3296))
    np.testing.assert_array_equal(arrays[0][:], tifffile.imread(stack))
    assert result.layout.shapes[0] == (60, 512, 512) and arrays[0].dtype == np.uint8


@needs_op
@pytest.mark.parametrize("name, nodes", [("OP_1", 1496), ("OP_2", 235), ("OP_3", 171), ("OP_4", 1383), ("OP_5", 135)])
def test_diadem_gold_tracings_read(name, nodes):
    gold = read_swc(OP / "gold" / f"{name}.swc")
    assert gold.n_nodes == nodes and gold.n_trees == 1


@needs_morphologies
def test_real_morphologies_round_trip(tmp_path):
    with open(MORPHOLOGIES / "MANIFEST.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows
    for row in rows:
        path = MORPHOLOGIES / row["file"]
        swc = read_swc(path)
        assert (swc.n_nodes, swc.n_trees) == (int(row["nodes"]), int(row["roots"])), path.name
        again = read_swc(write_swc(tmp_path / path.name, swc))
        assert again.n_nodes == swc.n_nodes and again.n_trees == swc.n_trees, path.name
        assert again.cable_length() == pytest.approx(swc.cable_length(), rel=1e-6), path.name
