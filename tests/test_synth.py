"""Synthetic volumes: physics, determinism, block-by-block rendering, ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from neurotrace_dask.config import SynthConfig
from neurotrace_dask.errors import InputError, OutputError
from neurotrace_dask.io.omezarr import open_image
from neurotrace_dask.io.swc import SWC, read_swc
from neurotrace_dask.synth import (
    dim_real_image,
    load_morphology,
    random_morphology,
    random_scene,
    render,
    render_to_zarr,
    scene_from_morphologies,
    scene_from_swc,
)

from .conftest import SHARED_DATA

ISO = dict(voxel_size=(1.0, 1.0, 1.0))
QUIET = dict(  # no randomness in brightness: for exact physics checks
    branch_brightness_sigma=0.0, path_variation=0.0, gap_rate=0.0, weak_terminal_fraction=0.0,
    autofluorescence_photons=0.0,
)  # fmt: skip


def straight_line(length: float = 40.0, radius: float = 1.0, z: float = 10.0) -> SWC:
    """A straight neurite along x in micrometres, no soma."""
    xs = np.arange(0, length + 1, 4.0)
    zyx = np.stack([np.full_like(xs, z), np.full_like(xs, 12.0), xs + 5], axis=1)
    return SWC.from_arrays(zyx, [-1, *range(len(xs) - 1)], radius=radius, types=3)


def test_same_seed_same_volume_and_other_seed_differs():
    a, mask_a = render(random_scene(2, (24, 80, 80), SynthConfig(seed=4)))
    b, mask_b = render(random_scene(2, (24, 80, 80), SynthConfig(seed=4)))
    c, _ = render(random_scene(2, (24, 80, 80), SynthConfig(seed=5)))
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(a, c)


def test_any_region_equals_the_whole_render_across_noise_tiles():
    scene = random_scene(2, (70, 140, 90), SynthConfig(seed=1))
    whole, mask = render(scene)
    for region in [(slice(0, 70), slice(60, 70), slice(0, 90)), (slice(63, 66), slice(1, 139), slice(64, 65))]:
        part, part_mask = render(scene, region)
        assert np.array_equal(part, whole[region]) and np.array_equal(part_mask, mask[region])


def test_block_by_block_zarr_equals_in_memory_render(tmp_path):
    scene = random_scene(3, (40, 100, 120), SynthConfig(seed=2, bits=16))
    result = render_to_zarr(scene, tmp_path / "s", chunks=(16, 32, 32), block_bytes=16 * 32 * 32 * 2, tiff=True)
    assert result.blocks > 2
    image, mask = render(scene)
    arrays, voxel = open_image(result.image)
    assert voxel == scene.voxel_size and arrays[0].dtype == np.uint16
    assert np.array_equal(arrays[0][...], image)
    assert np.array_equal(open_image(result.mask)[0][0][...], mask)
    gold = read_swc(result.gold)
    assert gold.n_trees == 3 and gold.n_nodes == scene.gold.n_nodes  # written depth-first: compare as sets
    assert np.allclose(np.sort(gold.zyx, axis=0), np.sort(scene.gold.zyx, axis=0), atol=1e-4)
    import tifffile

    assert np.array_equal(tifffile.imread(result.tiff), image)


def test_render_on_a_dask_cluster_matches(tmp_path, client):
    scene = random_scene(2, (32, 64, 64), SynthConfig(seed=3))
    result = render_to_zarr(scene, tmp_path / "s", chunks=(16, 32, 32), block_bytes=16 * 32 * 32, client=client)
    assert np.array_equal(open_image(result.image)[0][0][...], render(scene)[0])


def test_existing_output_is_refused_and_kept_unless_overwrite(tmp_path):
    out = tmp_path / "s"
    render_to_zarr(random_scene(1, (16, 32, 32), SynthConfig(seed=1)), out)
    first = read_swc(out / "gold.swc")
    with pytest.raises(OutputError, match="already exists"):
        render_to_zarr(random_scene(1, (16, 32, 32), SynthConfig(seed=2)), out)
    assert np.array_equal(read_swc(out / "gold.swc").xyz, first.xyz)
    render_to_zarr(random_scene(1, (16, 32, 32), SynthConfig(seed=2)), out, overwrite=True)
    assert not np.array_equal(read_swc(out / "gold.swc").xyz, first.xyz)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no partial or replaced folders left


def test_intensity_scales_the_signal_and_keeps_the_noise_model():
    cell = straight_line()
    means = {}
    for intensity in (1.0, 0.5, 0.25):
        params = SynthConfig(**ISO, **QUIET, intensity=intensity, read_noise=0.0, bits=16)
        image, mask = render(scene_from_morphologies([cell], (20, 24, 60), params))
        background = image[:, :4].astype(float)  # far from the line
        means[intensity] = image[mask > 0].mean() - background.mean()
        assert background.mean() == pytest.approx(params.background_photons * 65535 / 64, rel=0.05)
    assert means[0.5] / means[1.0] == pytest.approx(0.5, rel=0.05)
    assert means[0.25] / means[1.0] == pytest.approx(0.25, rel=0.08)


def test_psf_is_wider_in_z_than_in_xy():
    params = SynthConfig(voxel_size=(0.25, 0.25, 0.25), **QUIET, psf_sigma_xy=0.3, psf_sigma_z=0.9, radius_floor=0.5,
                         background_photons=0, read_noise=0, signal_photons=2000, bits=16)  # fmt: skip
    cell = straight_line(length=10, radius=0.05, z=5.0)
    image, _ = render(scene_from_morphologies([cell], (40, 100, 70), params))
    column = image[:, :, 35].astype(float)
    z, y = np.unravel_index(np.argmax(column), column.shape)
    along_z = column[:, y] > column[z, y] / 2
    along_y = column[z, :] > column[z, y] / 2
    assert along_z.sum() >= 2.5 * along_y.sum()


def test_mask_follows_the_gold_and_has_a_radius_floor():
    params = SynthConfig(**ISO, **QUIET, radius_floor=0.6)
    scene = scene_from_swc(straight_line(radius=0.01), params)
    _, mask = render(scene)
    inside = np.rint(scene.gold.zyx).astype(int)
    assert (mask[tuple(inside.T)] == 1).all()
    # A 0.01 um neurite is drawn 0.6 voxel thick: one voxel across, not zero, not three.
    assert 1 <= (mask.sum(axis=(0, 2)) > 0).sum() <= 2


def test_gold_is_in_voxel_coordinates():
    params = SynthConfig(voxel_size=(2.0, 0.5, 0.5))
    cell = straight_line()
    scene = scene_from_morphologies([cell], (20, 50, 100), params)
    assert np.allclose(scene.gold.zyx * params.voxel_size, cell.zyx)
    assert np.allclose(scene.gold.radius, cell.radius / 0.5)


def test_soma_is_bright_and_weak_branches_exist():
    params = SynthConfig(**ISO, read_noise=0, weak_terminal_fraction=1.0, weak_terminal_factor=0.1)
    scene = scene_from_swc(random_morphology(2), params)
    soma = scene.b0[-1]  # the root sphere
    assert soma == params.soma_brightness
    assert np.median(scene.b0[:-1]) < 0.5  # every terminal branch dimmed


def test_gaps_darken_short_stretches():
    cell = straight_line(length=400)
    params = SynthConfig(**ISO, **{**QUIET, "gap_rate": 3.0}, gap_depth=0.0, gap_length=4.0)
    scene = scene_from_morphologies([cell], (20, 24, 410), params)
    dark = scene.b0 == 0
    assert 0 < dark.mean() < 0.2


def test_random_morphology_is_deterministic_and_grows_within_its_box():
    a, b = random_morphology(9), random_morphology(9)
    assert np.array_equal(a.zyx, b.zyx)
    extent = (30.0, 80.0, 80.0)
    cell = random_morphology(1, extent=extent)
    assert (np.abs(cell.zyx) <= np.array(extent) / 2 + 1.01).all()
    assert cell.n_trees == 1 and (np.bincount(cell.parent_index[cell.parent_index >= 0]) >= 2).sum() > 3


def test_random_scene_labels_every_neuron_and_they_cross():
    scene = random_scene(4, (32, 128, 128), SynthConfig(seed=6))
    _, mask = render(scene)
    assert set(np.unique(mask)) == {0, 1, 2, 3, 4}
    assert scene.gold.n_trees == 4 and scene.gold_labels.tolist() == [1, 2, 3, 4]


def test_dim_real_image_keeps_dtype_and_scales():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 255, (8, 32, 32)).astype(np.uint8)
    half = dim_real_image(real, 0.5, SynthConfig(background_photons=0, read_noise=0))
    assert half.dtype == np.uint8
    assert half.mean() == pytest.approx(real.mean() / 2, rel=0.05)
    with pytest.raises(InputError):
        dim_real_image(real.astype(np.float32), 0.5)


def test_bad_scene_inputs():
    with pytest.raises(InputError, match="at least one neuron"):
        scene_from_morphologies([], (4, 4, 4))
    with pytest.raises(InputError, match="shape"):
        scene_from_morphologies([straight_line()], (0, 4, 4))


@pytest.mark.skipif(not (SHARED_DATA / "morphologies").is_dir(), reason="needs ../shared/data/morphologies")
def test_hemibrain_skeletons_are_read_in_8nm_voxels():
    folder = SHARED_DATA / "morphologies"
    hemibrain = load_morphology(folder / "navis_hemibrainDA1PN_1734350788.swc")
    raw = read_swc(folder / "navis_hemibrainDA1PN_1734350788.swc")
    assert hemibrain.cable_length() == pytest.approx(raw.cable_length() * 0.008)
    allen = load_morphology(folder / "bmtk_Pvalb_469628681_m.swc")
    assert 1000 < allen.cable_length() < 2000  # micrometres already (MANIFEST: 1528)


def test_cli_renders_a_random_scene_and_refuses_to_overwrite(tmp_path):
    from .test_cli import run

    out = tmp_path / "scene"
    result = run("synth", str(out), "--random", "2", "--shape", "24", "64", "64", "--seed", "3", "--intensity",
                 "0.5", "--bits", "16", "--tiff", "--workers", "1", "--threads", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 neuron(s)" in result.stdout
    expected, _ = render(random_scene(2, (24, 64, 64), SynthConfig(seed=3, intensity=0.5, bits=16)))
    assert np.array_equal(open_image(out / "image.ome.zarr")[0][0][...], expected)
    assert read_swc(out / "gold.swc").n_trees == 2 and (out / "image.tif").exists()
    again = run("synth", str(out), "--random", "1")
    assert again.returncode == 2 and again.stderr.strip() == f"error: {out}: already exists (pass --overwrite to replace it)"


def test_cli_renders_an_swc_file(tmp_path):
    from neurotrace_dask.io.swc import write_swc

    from .test_cli import run

    write_swc(tmp_path / "cell.swc", straight_line())
    result = run("synth", str(tmp_path / "out"), "--swc", str(tmp_path / "cell.swc"), "--voxel-size", "1", "1", "1",
                 "--workers", "1", "--threads", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    gold = read_swc(tmp_path / "out" / "gold.swc")
    assert gold.cable_length() == pytest.approx(straight_line().cable_length())
    missing = run("synth", str(tmp_path / "x"), "--swc", str(tmp_path / "none.swc"))
    assert missing.returncode == 2 and "none.swc" in missing.stderr and "Traceback" not in missing.stderr


def test_a_foreign_partial_folder_is_not_deleted(tmp_path):
    partial = tmp_path / "s.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by neurotrace"):
        render_to_zarr(random_scene(1, (16, 32, 32)), tmp_path / "s")
    assert (partial / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_synth_did_not_write(tmp_path):
    mine = tmp_path / "my_data"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(OutputError, match="not written by neurotrace synth"):
        render_to_zarr(random_scene(1, (16, 32, 32)), mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious"
