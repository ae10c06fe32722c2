"""Tests for neurotrace_dask.model: VoxResNet shapes and learning, normalisation, checkpoints."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save as safetensors_save
from torch.utils.flop_counter import FlopCounterMode

from neurotrace_dask import __version__, model
from neurotrace_dask.errors import ConfigError, InputError, OutputError
from neurotrace_dask.model import (
    CHECKPOINT_FORMAT,
    PRESETS,
    ROBUST_PERCENTILES,
    STRIDE,
    ModelSpec,
    Normalisation,
    VoxResNet,
    build_model,
    count_parameters,
    deep_supervision_loss,
    flops_per_voxel,
    foreground_probability,
    load_checkpoint,
    measure_normalisation,
    normalise,
    preset,
    save_checkpoint,
)

TINY = ModelSpec(width=2, modules_per_stage=1)


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: tiny tensors gain nothing from more, and OpenMP threads that share a busy
    # core wait on each other (100x slower when another process holds a core).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise_norms(net: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm layers non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("shape", [(8, 8, 8), (16, 24, 32), (24, 8, 16)])
def test_output_has_input_shape(shape):
    net = build_model(TINY, seed=0).eval()
    with torch.inference_mode():
        out = net(torch.rand(2, 1, *shape))
    assert out.shape == (2, 2, *shape) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_training_mode_returns_aux_at_full_resolution():
    net = build_model(TINY, seed=0).train()
    fused, aux = net(torch.rand(1, 1, 16, 24, 32))
    assert fused.shape == (1, 2, 16, 24, 32)
    assert len(aux) == 4 and all(a.shape == fused.shape for a in aux)
    # Fusion is the sum of the four auxiliary maps.
    torch.testing.assert_close(fused, aux[0] + aux[1] + aux[2] + aux[3])
    # return_aux overrides the mode either way.
    assert isinstance(net(torch.rand(1, 1, 16, 16, 16), return_aux=False), torch.Tensor)
    net.eval()
    with torch.no_grad():
        fused_eval, aux_eval = net(torch.rand(1, 1, 8, 8, 8), return_aux=True)
    torch.testing.assert_close(fused_eval, sum(aux_eval))


@pytest.mark.parametrize("shape", [(17, 24, 32), (16, 20, 32), (16, 24, 4)])
def test_shape_not_multiple_of_stride_is_refused(shape):
    net = build_model(TINY).eval()
    with pytest.raises(ValueError, match=rf"not a multiple of the model stride {STRIDE}"):
        net(torch.zeros(1, 1, *shape))


def test_wrong_input_layout_is_refused():
    net = build_model(TINY).eval()
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 1, Z, Y, X\)"):
        net(torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"got \(1, 3, 8, 8, 8\)"):
        net(torch.zeros(1, 3, 8, 8, 8))


@pytest.mark.parametrize("norm", ["group", "instance"])
def test_other_norms_run(norm):
    spec = ModelSpec(width=4, modules_per_stage=1, norm=norm, groups=2)
    net = build_model(spec, seed=0).eval()
    with torch.inference_mode():
        assert net(torch.rand(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_spec_validation_and_presets():
    with pytest.raises(ValueError, match="groups=3 must divide"):
        ModelSpec(width=4, norm="group", groups=3)
    with pytest.raises(ValueError):
        ModelSpec(architecture="unet")
    with pytest.raises(ValueError):
        ModelSpec(widht=4)  # unknown keys are errors
    assert preset("small") == PRESETS["small"] == ModelSpec(width=8)
    with pytest.raises(ConfigError, match="unknown model size 'huge' \\(known: small, base\\)"):
        preset("huge")
    assert ModelSpec.model_validate(PRESETS["base"].model_dump(mode="json")) == PRESETS["base"]


def test_fast_layers_match_torch_reference():
    """The oneDNN convolution and the matrix-product upsampling compute what torch's layers do."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 8, 16, 8, generator=g)
    conv = model._Conv3d(4, 6, 3, stride=2, padding=1, bias=True)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv3d(x, conv.weight, conv.bias, 2, 1))
    for scale in (2, 4, 8):
        up = model._Upsample(4, 3, scale, stride=scale)
        expected = torch.nn.functional.conv_transpose3d(x, up.weight, up.bias, stride=scale)
        got = up(x)
        torch.testing.assert_close(got, expected)
        got.sum().backward()  # differentiable
        assert up.weight.grad is not None


def test_cpu_fallback_without_onednn(monkeypatch):
    net = build_model(TINY, seed=0).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.inference_mode():
        fast = net(x)
        monkeypatch.setattr(model, "_ONEDNN", False)
        torch.testing.assert_close(net(x), fast, rtol=1e-4, atol=1e-5)


def test_build_model_seed_is_reproducible_and_local():
    state = torch.random.get_rng_state()
    a, b = build_model(TINY, seed=3), build_model(TINY, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model(TINY, seed=4)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_halo_makes_block_output_exact():
    """A block read with ``spec.halo`` context (on the stride grid) equals the whole volume."""
    net = build_model(TINY, seed=1).eval()
    randomise_norms(net)
    halo = -(-TINY.halo // STRIDE) * STRIDE
    assert TINY.halo == 37 and halo == 40
    assert PRESETS["small"].halo == PRESETS["base"].halo == 65
    x = torch.rand(1, 1, 8, 16, 256, generator=torch.Generator().manual_seed(0)) * 2
    with torch.inference_mode():
        whole = net(x)
        w0, w1 = 96, 160
        block = net(x[..., w0 - halo : w1 + halo])[..., halo : halo + w1 - w0]
        torch.testing.assert_close(block, whole[..., w0:w1], rtol=0, atol=1e-5)
        # One stride less context is not enough: the bound is tight to within the stride.
        short = halo - STRIDE
        block = net(x[..., w0 - short : w1 + short])[..., short : short + w1 - w0]
        assert (block - whole[..., w0:w1]).abs().max() > 1e-5


def test_deep_supervision_learns_a_bright_line():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.normal(0.0, 0.3, (4, 1, 16, 16, 16)).astype(np.float32)
    labels = np.zeros((4, 16, 16, 16), dtype=np.int64)
    for i in range(4):  # one line per volume along a random axis
        z, y = rng.integers(3, 13, 2)
        sl = [(z, y, slice(None)), (z, slice(None), y), (slice(None), z, y), (z, y, slice(None))][i]
        images[i, 0][sl] += 1.0
        labels[i][sl] = 1
    x, target = torch.from_numpy(images), torch.from_numpy(labels)
    weights = torch.tensor([1.0, float((labels == 0).sum() / (labels == 1).sum()) ** 0.5])
    net = build_model(ModelSpec(width=4, modules_per_stage=1), seed=0).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        fused, aux = net(x)
        loss = deep_supervision_loss(fused, aux, target, class_weights=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    net.eval()
    with torch.no_grad():
        p = foreground_probability(net(x))
    assert p.shape == target.shape
    assert p[target == 1].mean() > p[target == 0].mean() + 0.3


# ----------------------------------------------------------------------------- size and cost


def _docstring_table() -> dict[str, tuple[int, tuple[int, ...], int, float, float]]:
    rows = {}
    for line in model.__doc__.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s+(\d+(?:, \d+){3})\s+([\d,]+)\s+([\d.]+) MB\s+([\d,]+)\s*$", line)
        if m:
            widths = tuple(int(w) for w in m[3].split(", "))
            rows[m[1]] = (int(m[2]), widths, int(m[4].replace(",", "")), float(m[5]), float(m[6].replace(",", "")))
    return rows


def test_docstring_sizes_are_current():
    table = _docstring_table()
    assert set(table) == set(PRESETS)
    for name, spec in PRESETS.items():
        width, widths, params, megabytes, flops = table[name]
        assert (width, widths) == (spec.width, spec.widths), name
        net = build_model(spec)
        assert count_parameters(net) == params, name
        assert round(params * 4 / 1e6, 2) == megabytes, name
        assert params * 4 < 10e6  # under 10 MB of float32 weights
        assert round(flops_per_voxel(spec)) == flops, name


@pytest.mark.parametrize(
    "spec, shape",
    [
        (PRESETS["small"], (32, 32, 32)),
        (PRESETS["base"], (32, 32, 32)),
        (ModelSpec(width=3, multipliers=(1, 2, 3, 4), modules_per_stage=1, in_channels=2, classes=3), (16, 24, 32)),
    ],
)
def test_flops_per_voxel_matches_flop_counter(spec, shape, monkeypatch):
    monkeypatch.setattr(model, "_ONEDNN", False)  # the flop counter does not see oneDNN calls
    net = build_model(spec).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(torch.zeros(1, spec.in_channels, *shape))
    assert counter.get_total_flops() / np.prod(shape) == pytest.approx(flops_per_voxel(spec), rel=1e-12)


def test_count_parameters_trainable_only():
    net = build_model(TINY)
    total = count_parameters(net)
    net.stem.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == total - sum(p.numel() for p in net.stem.parameters())


# ----------------------------------------------------------------------------- normalisation


class CountingArray:
    """A sliceable array that counts the voxels read through it."""

    def __init__(self, array, chunks=None):
        self.array, self.read = array, 0
        self.shape, self.dtype = array.shape, array.dtype
        if chunks is not None:
            self.chunks = chunks

    def __getitem__(self, key):
        out = np.asarray(self.array[key])
        self.read += out.size
        return out


def test_uint8_and_uint16_normalise_alike():
    rng = np.random.default_rng(0)
    img8 = rng.gamma(1.5, 20.0, (24, 40, 40)).clip(0, 255).astype(np.uint8)
    img8[5, 10:30, 20] = 250
    img16 = img8.astype(np.uint16) * 257
    n8, n16 = measure_normalisation(img8), measure_normalisation(img16)
    assert n16.low == pytest.approx(257 * n8.low) and n16.high == pytest.approx(257 * n8.high)
    a, b = normalise(img8, n8), normalise(img16, n16)
    assert a.dtype == b.dtype == np.float32 and a.shape == img8.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert a.min() >= -1 and a.max() <= 2 and 0 < np.median(a) < 1


def test_normalise_values_and_clip():
    n = Normalisation(100.0, 300.0, clip=(-1.0, 2.0))
    block = np.array([0, 100, 200, 300, 900], dtype=np.uint16)
    assert normalise(block, n).tolist() == [-0.5, 0.0, 0.5, 1.0, 2.0]
    assert normalise(block, Normalisation(100.0, 300.0, clip=None)).tolist() == [-0.5, 0.0, 0.5, 1.0, 4.0]
    # Large blocks go slab by slab; the result does not depend on it.
    big = np.random.default_rng(1).integers(0, 1000, (40, 300, 400)).astype(np.uint16)
    expected = np.clip((big.astype(np.float64) - 100) / 200, -1, 2).astype(np.float32)
    np.testing.assert_array_equal(normalise(big, n), expected)


def test_normalisation_dict_round_trip_and_validation():
    n = Normalisation(3, 1000.5, (0.5, 99.5), None)
    d = n.to_dict()
    assert json.loads(json.dumps(d)) == d == {"low": 3.0, "high": 1000.5, "percentiles": [0.5, 99.5], "clip": None}
    assert Normalisation.from_dict(d) == n
    with pytest.raises(ValueError, match="lacks 'high'"):
        Normalisation.from_dict({"low": 1})
    with pytest.raises(ValueError, match="unknown normalisation key 'scale'"):
        Normalisation.from_dict({"low": 1, "high": 2, "scale": 3})
    with pytest.raises(ValueError, match="finite low < high"):
        Normalisation(5, 5)
    with pytest.raises(ValueError, match="percentiles"):
        Normalisation(0, 1, (99, 1))
    with pytest.raises(ValueError, match="clip"):
        Normalisation(0, 1, clip=(2, 1))


def test_measure_flat_and_float_volumes():
    flat = measure_normalisation(np.full((4, 4, 4), 7, np.uint8))
    assert (flat.low, flat.high) == (7.0, 8.0)
    v = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    v[0, 0, :2] = [np.nan, np.inf]
    n = measure_normalisation(v, (0, 100))
    assert (n.low, n.high) == (2.0, 63.0)
    with pytest.raises(ValueError, match="no finite value"):
        measure_normalisation(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="empty"):
        measure_normalisation(np.zeros((0, 4, 4)))


def test_measure_reads_whole_chunks_of_a_big_zarr_array():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 4000, (64, 128, 128), dtype=np.uint16)
    z = zarr.create_array(store={}, shape=data.shape, chunks=(16, 16, 16), dtype=data.dtype)
    z[:] = data
    counted = CountingArray(z, chunks=z.chunks)
    n = measure_normalisation(counted, (1, 99.9), max_samples=2**16)
    assert 0 < counted.read <= 2**16  # 16 whole chunks of a 1M-voxel array
    full = np.percentile(data, [1, 99.9])
    assert n.low == pytest.approx(full[0], rel=0.1) and n.high == pytest.approx(full[1], rel=0.01)
    # Zarr's own .chunks is found without the wrapper, and gives the same sample.
    assert measure_normalisation(z, (1, 99.9), max_samples=2**16) == n


def test_measure_strides_unchunked_arrays():
    data = np.random.default_rng(3).integers(0, 255, (50, 70, 90), dtype=np.uint8)
    counted = CountingArray(data)
    n = measure_normalisation(counted, max_samples=10_000)
    assert 0 < counted.read <= 10_000
    assert n.high == pytest.approx(np.percentile(data, 99.9), abs=3)
    # Chunks too big for 16 of them in the budget: voxel stride as well.
    counted = CountingArray(data, chunks=(50, 70, 90))
    measure_normalisation(counted, max_samples=10_000)
    assert 0 < counted.read <= 10_000
    # Small volumes are read whole.
    small = CountingArray(data[:10])
    measure_normalisation(small, max_samples=10**6)
    assert small.read == data[:10].size


def test_measure_dask_array():
    data = np.random.default_rng(4).integers(0, 4000, (32, 64, 64), dtype=np.uint16)
    arr = da.from_array(data, chunks=(8, 16, 16))
    n = measure_normalisation(arr, (0, 100), max_samples=2**14)
    assert 0 <= n.low < n.high <= 4000


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def saved(tmp_path) -> tuple[Path, VoxResNet]:
    net = build_model(TINY, seed=5)
    randomise_norms(net)
    meta = save_checkpoint(tmp_path / "tiny", net, voxel_size=(1.0, 0.3, 0.3),
                           training={"volumes": 3, "source": "synth"}, percentiles=(0.5, 99.5))
    return meta, net


def rewrite_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def rewrite_weights(meta_path: Path, data: bytes) -> None:
    """Replace the weights and record their sha256, so only the content is wrong."""
    meta_path.with_suffix(".safetensors").write_bytes(data)
    meta = json.loads(meta_path.read_text())
    meta["weights"]["sha256"] = hashlib.sha256(data).hexdigest()
    meta_path.write_text(json.dumps(meta))


def test_checkpoint_round_trip(saved, tmp_path):
    meta_path, net = saved
    assert meta_path == tmp_path / "tiny.json" and (tmp_path / "tiny.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.json", "tiny.safetensors"]  # no temporaries
    x = torch.rand(1, 1, 16, 16, 24)
    with torch.inference_mode():
        expected = net.eval()(x)
    for name in ("tiny", "tiny.json", "tiny.safetensors"):
        ckpt = load_checkpoint(tmp_path / name)
        assert not ckpt.model.training and ckpt.spec == TINY and ckpt.path == meta_path
        with torch.inference_mode():
            assert torch.equal(ckpt.model(x), expected)
    meta = ckpt.metadata
    assert meta["format"] == CHECKPOINT_FORMAT and meta["software"]["neurotrace_dask"] == __version__
    assert meta["training"] == {"volumes": 3, "source": "synth"}
    assert meta["weights"]["parameters"] == count_parameters(net)
    assert ckpt.sha256 == meta["weights"]["sha256"] == hashlib.sha256((tmp_path / "tiny.safetensors").read_bytes()).hexdigest()
    assert re.match(r"\d{4}-\d\d-\d\dT", meta["created"])
    assert ckpt.voxel_size == (1.0, 0.3, 0.3)
    assert ckpt.percentiles == (0.5, 99.5) and ckpt.clip == (-1.0, 2.0)
    norm = ckpt.measure_normalisation(np.arange(1000, dtype=np.uint16))
    assert norm.percentiles == (0.5, 99.5) and norm.low == pytest.approx(4.995)


def test_save_refuses_to_overwrite_and_bad_arguments(saved, tmp_path):
    meta_path, net = saved
    with pytest.raises(OutputError, match=r"tiny\.json: exists already"):
        save_checkpoint(meta_path, net, voxel_size=(1, 1, 1))
    other = build_model(TINY, seed=9)
    save_checkpoint(tmp_path / "tiny.safetensors", other, voxel_size=(2, 1, 1), overwrite=True)
    assert load_checkpoint(meta_path).voxel_size == (2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="does not match the model"):
        save_checkpoint(tmp_path / "x", net, PRESETS["small"], voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="voxel_size"):
        save_checkpoint(tmp_path / "x", net, voxel_size=(1, 0, 1))
    with pytest.raises(ValueError, match=r"name a checkpoint NAME, NAME\.json or NAME\.safetensors \(not a folder or \.pt\)"):
        save_checkpoint(tmp_path / "x.pt", net, voxel_size=(1, 1, 1))
    with pytest.raises(TypeError, match="saves a VoxResNet, got Linear"):
        save_checkpoint(tmp_path / "x", torch.nn.Linear(1, 1), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError, match="not JSON-ready"):
        save_checkpoint(tmp_path / "x", net, voxel_size=(1, 1, 1), training={"f": object()})
    assert not (tmp_path / "x.json").exists()


def load_error(path) -> str:
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_missing_files(saved, tmp_path):
    meta_path, _ = saved
    assert load_error(tmp_path / "nope") == f"{tmp_path / 'nope.json'}: checkpoint metadata not found"
    meta_path.with_suffix(".safetensors").unlink()
    assert load_error(meta_path) == (
        f"{tmp_path / 'tiny.safetensors'}: checkpoint weights not found (named by tiny.json)"
    )
    assert "is a folder" in load_error(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"tiny\.json: not valid JSON \(Expecting property name enclosed in double quotes at line 1\)"),
        ("[1, 2]", r"tiny\.json: not checkpoint metadata \(a JSON object is expected\)"),
        ('{"format": "neurotrace-checkpoint/2"}',
         r"tiny\.json: unsupported checkpoint format 'neurotrace-checkpoint/2' \(this version reads 'neurotrace-checkpoint/1'\)"),
        ('{"weights": 1}', r"tiny\.json: unsupported checkpoint format None"),
    ],
)
def test_load_bad_json(saved, text, message):
    meta_path, _ = saved
    meta_path.write_text(text)
    assert re.search(message, load_error(meta_path))


def test_load_bad_architecture(saved):
    meta_path, _ = saved
    original = json.loads(meta_path.read_text())
    rewrite_json(meta_path, architecture={**original["architecture"], "architecture": "unet3d"})
    assert load_error(meta_path).endswith("tiny.json: unknown architecture 'unet3d' (known: voxresnet)")
    rewrite_json(meta_path, architecture={**original["architecture"], "width": -2})
    assert "tiny.json: invalid metadata at 'architecture.width': Input should be greater than 0" in load_error(meta_path)
    rewrite_json(meta_path, architecture={**original["architecture"], "depth": 5})
    assert "invalid metadata at 'architecture.depth': Extra inputs are not permitted" in load_error(meta_path)
    rewrite_json(meta_path, architecture="voxresnet")
    assert "invalid metadata at 'architecture': Input should be a valid dictionary" in load_error(meta_path)
    rewrite_json(meta_path, architecture=original["architecture"], voxel_size_um=[1, 1])
    assert "invalid metadata at 'voxel_size_um.2': Field required" in load_error(meta_path)
    rewrite_json(meta_path, voxel_size_um=[1, 1, 1], weights={"file": "x"})
    assert "invalid metadata at 'weights.sha256': Field required" in load_error(meta_path)


def test_load_weights_that_do_not_match_the_architecture(saved):
    meta_path, _ = saved
    arch = json.loads(meta_path.read_text())["architecture"]
    rewrite_json(meta_path, architecture={**arch, "width": 3})
    assert load_error(meta_path).endswith(
        "tiny.safetensors: tensor 'stem.0.weight' has shape (2, 1, 3, 3, 3) but the architecture in "
        "tiny.json needs (3, 1, 3, 3, 3)"
    )
    rewrite_json(meta_path, architecture={**arch, "modules_per_stage": 2})
    assert load_error(meta_path).endswith(
        "tiny.safetensors: tensor 'stages.0.4.0.weight' (4,) needed by the architecture in tiny.json is missing"
    )
    rewrite_json(meta_path, architecture={**arch, "modules_per_stage": 0})
    assert load_error(meta_path).endswith(
        "tiny.safetensors: unexpected tensor 'stages.0.3.0.bias' (4,) (not in the architecture in tiny.json)"
    )


def test_load_tampered_truncated_or_non_finite_weights(saved):
    meta_path, net = saved
    weights = meta_path.with_suffix(".safetensors")
    data = weights.read_bytes()
    # Same structure, other values: only the sha256 notices.
    tensors = {k: v.clone() for k, v in net.state_dict().items()}
    tensors["stem.0.weight"] += 1
    weights.write_bytes(safetensors_save(tensors, metadata={"format": CHECKPOINT_FORMAT}))
    message = load_error(meta_path)
    assert "tiny.safetensors: sha256 " in message and "recorded in tiny.json (the file was changed or replaced)" in message
    # Truncated: refused as corrupt before the checksum is even compared.
    weights.write_bytes(data[: len(data) // 2])
    assert "tiny.safetensors: not a valid safetensors file, truncated or corrupt" in load_error(meta_path)
    tensors["stem.0.weight"][0, 0, 0, 0, 0] = float("nan")
    rewrite_weights(meta_path, safetensors_save(tensors))
    assert load_error(meta_path).endswith("tensor 'stem.0.weight' is not finite floating point (torch.float32)")


class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_files_are_never_unpickled(saved, tmp_path):
    meta_path, _ = saved
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"stem.0.weight": Payload(marker)})
    # A pickle in place of the weights, with a matching sha256 recorded.
    rewrite_weights(meta_path, evil)
    assert "tiny.safetensors: not a valid safetensors file" in load_error(meta_path)
    # The same with torch's zip pickle format.
    buffer = tmp_path / "zip.pt"
    torch.save({"stem.0.weight": Payload(marker)}, buffer)
    rewrite_weights(meta_path, buffer.read_bytes())
    assert "not a valid safetensors file" in load_error(meta_path)
    # A .pt path is refused outright, whatever is beside it.
    (tmp_path / "model.pt").write_bytes(evil)
    (tmp_path / "model.pt.json").write_text(meta_path.read_text())
    assert "model.pt: not a neurotrace checkpoint" in load_error(tmp_path / "model.pt")
    assert not marker.exists()
    # The payload is live: unpickling it does create the marker.
    pickle.loads(evil)
    assert marker.exists()


# --------------------------------------------------------------------------- robust normalisation


def _sparse_stack(rng, *, noise: float = 0.0, background: float = 0.0, gain: float = 1.0) -> np.ndarray:
    """A background-subtracted stack: zeros with a faint haze on 20% of voxels, two bright neurites."""
    v = background + (rng.random((24, 96, 96)) < 0.2) * 3.0
    v[12, 48, :] += 200 * gain
    v[6, :, 30] += 180 * gain
    v = v + noise * rng.standard_normal(v.shape)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def test_robust_normalisation_keeps_sparse_stacks_and_noise_floor_apart():
    rng = np.random.default_rng(0)
    sparse = _sparse_stack(rng)
    # Percentiles of all voxels: the 99.9th lies in the haze, so the haze is grey and neurites saturate.
    old = measure_normalisation(sparse)
    assert normalise(np.array([3]), old)[0] >= 0.9 and normalise(np.array([200]), old)[0] == 2.0
    new = measure_normalisation(sparse, method="robust")
    assert (new.low, new.noise, new.method) == (0.0, 0.0, "robust")
    assert normalise(np.array([3]), new)[0] < 0.05 and 0.8 < normalise(np.array([180]), new)[0] <= 1.0
    # A dim, noisy version of the same scene: background at 0, neurites near 1 again.
    dim = _sparse_stack(rng, noise=7.0, background=12.0, gain=0.3)
    n = measure_normalisation(dim, method="robust")
    assert 11 <= n.low <= 16 and 6 <= n.noise <= 9 and 60 <= n.high <= 95  # neurites at 12 + 54-60, plus noise
    assert abs(float(normalise(np.array([n.low]), n)[0])) < 1e-6
    assert "noise" in n.describe() and "robust" in n.describe()
    with pytest.raises(ValueError, match="method"):
        measure_normalisation(sparse, method="zscore")


def test_checkpoint_records_its_normalisation_method(tmp_path):
    net = build_model(ModelSpec(width=2, modules_per_stage=0), seed=0)
    robust = load_checkpoint(save_checkpoint(tmp_path / "r", net, voxel_size=(1, 1, 1), normalisation="robust"))
    assert robust.normalisation_method == "robust" and robust.percentiles == ROBUST_PERCENTILES
    stack = _sparse_stack(np.random.default_rng(1))
    assert robust.measure_normalisation(stack) == measure_normalisation(stack, method="robust")
    # Checkpoints written before the method was recorded were trained with percentiles.
    meta = tmp_path / "r.json"
    doc = json.loads(meta.read_text())
    del doc["normalisation"]["method"]
    doc["normalisation"]["percentiles"] = [1, 99.9]
    meta.write_text(json.dumps(doc))
    assert load_checkpoint(meta).normalisation_method == "percentile"
    n = Normalisation(12.0, 98.0, ROBUST_PERCENTILES, method="robust", noise=7.4)
    assert Normalisation.from_dict(json.loads(json.dumps(n.to_dict()))) == n
