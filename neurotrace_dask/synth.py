"""Synthetic fluorescence volumes of neurons, with their ground truth.

The project's measuring instrument: a morphology (a real SWC or a random one) is
rendered as a light-microscopy volume whose truth is known exactly.

Model, in the order it is applied (every knob is a field of :class:`SynthConfig`):

1. **Tubes.** Each SWC edge is a cone frustum between its two nodes' radii; radii
   below ``radius_floor`` xy voxels are drawn at the floor, so every neurite stays
   visible. The tube's edge is anti-aliased over one xy voxel. Soma nodes (type 1)
   shine ``soma_brightness`` times brighter.
2. **Brightness along the cable.** Each branch (a path between branch points and tips)
   gets a lognormal brightness (``branch_brightness_sigma``), a smooth variation along
   its length (``path_variation`` over about ``path_variation_scale`` um) and dim gaps
   (``gap_rate`` per 100 um, ``gap_length`` um long, ``gap_depth`` of the light left).
   A fraction ``weak_terminal_fraction`` of terminal branches shine only
   ``weak_terminal_factor`` as bright.
3. **Optics.** The labelled density is blurred by an anisotropic Gaussian PSF
   (``psf_sigma_xy``, ``psf_sigma_z`` um).
4. **Light and camera.** Photons = ``intensity * signal_photons * blurred`` +
   ``background_photons`` + low-frequency autofluorescence; then Poisson shot noise,
   Gaussian read noise, and quantisation to 8 or 16 bits with ``full_scale_photons``
   mapped to the largest value. ``intensity`` scales the signal only: the weak-neurite
   series keeps the noise model fixed.

Everything random is decided from the seed when the :class:`Scene` is built, and the
noise is drawn per fixed 64^3 tile of the volume from a generator seeded by the tile's
position, so :func:`render` of any region equals the same region of a whole-volume
render, bit for bit. :func:`render_to_zarr` uses that to render large scenes block by
block into OME-Zarr with bounded memory.

Coordinates: scenes are built from morphologies in micrometres; the ground truth
:attr:`Scene.gold` is in voxel coordinates of the volume (``x`` column, ``y`` row,
``z`` slice), radii in xy voxels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numba
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .config import SynthConfig
from .errors import InputError, OutputError
from .io.swc import SWC, read_swc, write_swc

__all__ = [
    "Scene",
    "SynthResult",
    "dim_real_image",
    "label_mask",
    "load_morphology",
    "random_morphology",
    "random_scene",
    "render",
    "render_to_zarr",
    "scene_from_morphologies",
    "scene_from_swc",
]

Int3 = tuple[int, int, int]
Float3 = tuple[float, float, float]

UNITS_UM = {"um": 1.0, "nm": 1e-3, "8nm": 8e-3}
NOISE_TILE = 64  # noise is drawn per tile of this size, seeded by the tile's position
_TRUNCATE = 4.0  # PSF kernel radius in sigmas (scipy's default)


# --------------------------------------------------------------------------- morphologies


def load_morphology(path: str | Path, units: Literal["auto", "um", "nm", "8nm"] = "auto") -> SWC:
    """Read an SWC and return it with positions and radii in micrometres.

    Parameters
    ----------
    path : str or Path
        SWC file.
    units : {"auto", "um", "nm", "8nm"}
        Units of the file. ``"auto"`` takes Janelia hemibrain skeletons (named so in
        the file name or header) as 8 nm voxels and everything else as micrometres.

    Examples
    --------
    >>> swc = load_morphology("cell.swc", units="nm")  # doctest: +SKIP
    """
    swc = read_swc(path)
    if units == "auto":
        text = " ".join((Path(path).name, *swc.comments)).lower()
        units = "8nm" if "hemibrain" in text else "um"
    if units not in UNITS_UM:
        raise InputError(f"{path}: unknown units {units!r}; use one of auto, {', '.join(UNITS_UM)}")
    scale = UNITS_UM[units]
    return SWC.from_arrays(swc.zyx * scale, swc.parent_index, radius=swc.radius * scale, types=swc.types)


def random_morphology(
    seed: int | np.random.Generator = 0,
    *,
    extent: Float3 = (40.0, 160.0, 160.0),
    n_primary: tuple[int, int] = (3, 6),
    total_length: tuple[float, float] = (400.0, 1200.0),
    step: float = 1.0,
    branch_rate: float = 0.02,
    tortuosity: float = 0.25,
    soma_radius: tuple[float, float] = (3.0, 6.0),
    radius: tuple[float, float] = (0.2, 0.8),
) -> SWC:
    """Grow a random branching neuron, in micrometres, centred on its soma at the origin.

    Neurites start from the soma in random directions and grow as persistent random
    walks (``tortuosity`` is the angular noise per um), branching at ``branch_rate``
    per um and thinning from ``radius[1]`` to ``radius[0]``; walls of the ``extent``
    box (z, y, x, centred on the soma) reflect them. Growth stops at a total cable
    length drawn from ``total_length``.

    Examples
    --------
    >>> swc = random_morphology(3)
    >>> swc.n_trees, int(swc.types[0]), 400 <= swc.cable_length() <= 1210
    (1, 1, True)
    """
    rng = np.random.default_rng(seed)
    half = np.asarray(extent, float) / 2
    soma_r = rng.uniform(*soma_radius)
    budget = rng.uniform(*total_length)
    positions, radii, parents, types = [np.zeros(3)], [soma_r], [-1], [1]
    # A tip: (row of its last node, direction, radius, length left on this branch).
    tips: list[tuple[int, np.ndarray, float, float]] = []
    mean_branch = 1.0 / max(branch_rate, 1e-6)
    for _ in range(rng.integers(n_primary[0], n_primary[1] + 1)):
        direction = _unit(rng.standard_normal(3) * (0.3, 1.0, 1.0))
        positions.append(direction * soma_r)
        radii.append(radius[1])
        parents.append(0)
        types.append(3)
        tips.append((len(positions) - 1, direction, radius[1], rng.exponential(mean_branch * 2)))
    grown = 0.0
    while tips and grown < budget:
        row, direction, r, left = tips.pop(int(rng.integers(len(tips))))
        direction = _unit(direction + tortuosity * math.sqrt(step) * rng.standard_normal(3))
        position = positions[row] + step * direction
        outside = np.abs(position) > half
        if outside.any():  # reflect off the box walls
            direction = np.where(outside, -direction, direction)
            position = positions[row] + step * direction
        r = max(radius[0], r * (1 - 0.004 * step))
        positions.append(position)
        radii.append(r)
        parents.append(row)
        types.append(3)
        grown += step
        left -= step
        new = len(positions) - 1
        if left > 0:
            tips.append((new, direction, r, left))
        if rng.random() < branch_rate * step:
            angle = rng.uniform(0.5, 1.2)
            side = _unit(np.cross(direction, rng.standard_normal(3)))
            child = _unit(math.cos(angle) * direction + math.sin(angle) * side)
            tips.append((new, child, r * 0.8, rng.exponential(mean_branch * 2)))
            if left <= 0:  # a tip that would end here bifurcates instead
                tips.append((new, direction, r * 0.8, rng.exponential(mean_branch * 2)))
    return SWC.from_arrays(np.array(positions), parents, radius=radii, types=types)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True, eq=False)
class Scene:
    """Neurons placed in a volume, with every random choice of the rendering made.

    Build one with :func:`scene_from_swc`, :func:`random_scene` or
    :func:`scene_from_morphologies`; render it with :func:`render` or
    :func:`render_to_zarr`.

    Attributes
    ----------
    shape : (z, y, x)
        Volume shape in voxels.
    voxel_size : (z, y, x)
        Voxel size in micrometres.
    params : SynthConfig
        The physics used.
    gold : SWC
        Ground truth in voxel coordinates, one or more trees per neuron, neurons in order.
    gold_labels : ndarray
        For each tree of ``gold``, the label of its neuron in the mask (1, 2, ...).
    """

    shape: Int3
    voxel_size: Float3
    params: SynthConfig
    gold: SWC
    gold_labels: np.ndarray
    # Rendering segments: endpoints (voxel zyx), radii (um), brightness, mask label, bbox.
    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    b0: np.ndarray
    b1: np.ndarray
    label: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    autofluorescence: np.ndarray  # coarse lattice of the low-frequency background, photons
    lattice_step: Int3

    @property
    def n_neurons(self) -> int:
        """Number of neurons (mask labels)."""
        return int(self.gold_labels.max(initial=0))

    @property
    def dtype(self) -> np.dtype:
        """Image dtype: uint8 or uint16."""
        return np.dtype(np.uint8 if self.params.bits == 8 else np.uint16)

    @property
    def mask_dtype(self) -> np.dtype:
        """Mask dtype: the smallest unsigned type that holds every label."""
        return np.dtype(np.uint8 if self.n_neurons < 256 else np.uint16 if self.n_neurons < 65536 else np.uint32)

    def halo(self) -> Int3:
        """Voxels of context the PSF needs around a region."""
        sigma = self._psf_sigma_voxels()
        return tuple(int(_TRUNCATE * s + 0.5) + 1 if s > 0 else 0 for s in sigma)  # type: ignore[return-value]

    def _psf_sigma_voxels(self) -> Float3:
        p = self.params
        return (p.psf_sigma_z / self.voxel_size[0], p.psf_sigma_xy / self.voxel_size[1], p.psf_sigma_xy / self.voxel_size[2])


def scene_from_swc(morphology: SWC, params: SynthConfig | None = None, *, shape: Int3 | None = None) -> Scene:
    """Place one morphology (micrometres) in a volume fitted to it with ``params.margin``.

    With ``shape`` given, the morphology is centred in that volume instead.

    Examples
    --------
    >>> scene = scene_from_swc(random_morphology(0), SynthConfig(voxel_size=(1, 1, 1)))
    >>> scene.gold.n_trees, scene.n_neurons
    (1, 1)
    """
    params = params or SynthConfig()
    voxel = np.asarray(params.voxel_size, float)
    lo = morphology.zyx.min(axis=0) - morphology.radius.max()
    hi = morphology.zyx.max(axis=0) + morphology.radius.max()
    if shape is None:
        shape = tuple(int(n) for n in np.ceil((hi - lo + 2 * params.margin) / voxel).astype(int) + 1)
        offset = params.margin - lo
    else:
        offset = (np.asarray(shape) - 1) * voxel / 2 - (lo + hi) / 2
    return scene_from_morphologies([_moved(morphology, offset)], shape, params)  # type: ignore[arg-type]


def random_scene(n_neurons: int, shape: Int3, params: SynthConfig | None = None, **morphology_options) -> Scene:
    """Several random neurons in one volume, somata spread over its middle, arbors crossing.

    Each neuron is grown by :func:`random_morphology` (``morphology_options`` pass on;
    its default extent is scaled to the volume), turned by a random rotation about z
    and a small tilt, and placed with its soma in the central 60% of the volume, so
    arbors cross and touch.

    Examples
    --------
    >>> scene = random_scene(3, (32, 128, 128), SynthConfig(voxel_size=(1, 1, 1), seed=2))
    >>> scene.n_neurons, scene.gold.n_trees
    (3, 3)
    """
    params = params or SynthConfig()
    rng = np.random.default_rng([params.seed, 7])
    size_um = np.asarray(shape) * np.asarray(params.voxel_size)
    morphology_options.setdefault("extent", tuple(0.8 * size_um))
    morphology_options.setdefault("total_length", (1.5 * size_um[1:].sum(), 3.0 * size_um[1:].sum()))
    neurons = []
    for _ in range(n_neurons):
        cell = random_morphology(rng, **morphology_options)
        angles = (rng.uniform(0, 2 * np.pi), rng.normal(0, 0.15), rng.normal(0, 0.15))
        rotation = Rotation.from_euler("xyz", angles)  # about z (the volume's first axis) then tilts
        zyx = rotation.apply(cell.zyx)
        soma = size_um * rng.uniform(0.2, 0.8, 3)
        neurons.append(SWC.from_arrays(zyx + soma, cell.parent_index, radius=cell.radius, types=cell.types))
    return scene_from_morphologies(neurons, shape, params)


def scene_from_morphologies(neurons: Sequence[SWC], shape: Int3, params: SynthConfig | None = None) -> Scene:
    """A scene of morphologies already positioned in the volume's micrometre frame.

    Neuron ``i`` gets mask label ``i + 1``; parts outside the volume are rendered
    where their light reaches in, and kept in the ground truth as they are.

    Examples
    --------
    >>> cell = SWC.from_arrays([[5, 5, 5], [5, 5, 25]], [-1, 0], radius=1.0)
    >>> scene_from_morphologies([cell], (11, 11, 31), SynthConfig(voxel_size=(1, 1, 1))).p0.shape[1]
    3
    """
    params = params or SynthConfig()
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"synthetic volume shape must be 3 positive sizes, got {shape}")
    if not neurons:
        raise InputError("a synthetic scene needs at least one neuron")
    voxel = np.asarray(params.voxel_size, float)
    rng = np.random.default_rng([params.seed, 11])
    parts = [_segments(neuron, label, params, rng) for label, neuron in enumerate(neurons, start=1)]
    p0, p1, r0, r1, b0, b1, label = (np.concatenate(column) for column in zip(*parts))
    p0, p1 = p0 / voxel, p1 / voxel
    reach = (np.maximum(r0, r1) + voxel[1:].min())[:, None] / voxel
    lo = np.floor(np.minimum(p0, p1) - reach).astype(np.int64)
    hi = np.ceil(np.maximum(p0, p1) + reach).astype(np.int64)
    gold, gold_labels = _gold(neurons, voxel)
    lattice, step = _autofluorescence_lattice(shape, voxel, params)
    return Scene(shape, tuple(map(float, voxel)), params, gold, gold_labels, p0, p1, r0, r1, b0, b1, label, lo, hi,
                 lattice, step)  # fmt: skip


def _moved(swc: SWC, offset: np.ndarray) -> SWC:
    return SWC.from_arrays(swc.zyx + offset, swc.parent_index, radius=swc.radius, types=swc.types)


def _gold(neurons: Sequence[SWC], voxel: np.ndarray) -> tuple[SWC, np.ndarray]:
    """All neurons as one forest in voxel coordinates, and the label of each tree."""
    zyx, parents, radii, types, labels = [], [], [], [], []
    offset = 0
    for label, neuron in enumerate(neurons, start=1):
        zyx.append(neuron.zyx / voxel)
        parents.append(np.where(neuron.parent_index < 0, -1, neuron.parent_index + offset))
        radii.append(neuron.radius / voxel[2])
        types.append(neuron.types)
        labels.append(np.full(neuron.n_trees, label))
        offset += neuron.n_nodes
    gold = SWC.from_arrays(np.concatenate(zyx), np.concatenate(parents), radius=np.concatenate(radii),
                           types=np.concatenate(types))  # fmt: skip
    return gold, np.concatenate(labels)


def _segments(neuron: SWC, label: int, p: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Cut a neuron (um) into short rendering segments with their brightness (step 2 of the model)."""
    voxel = np.asarray(p.voxel_size, float)
    floor = p.radius_floor * voxel[1:].min()
    step = max(0.5 * voxel.min(), 0.1)  # fine enough to resolve gaps and variation
    zyx, parent, n = neuron.zyx, neuron.parent_index, neuron.n_nodes
    radius = np.maximum(neuron.radius, floor)
    # Branches: a new one starts at each child of a root or of a branch point.
    children = np.bincount(parent[parent >= 0], minlength=n)
    branch = np.zeros(n, np.int64)
    path = np.zeros(n)  # distance from the root along the tree
    n_branches = 0
    for i in neuron.preorder:
        j = parent[i]
        if j < 0 or parent[j] < 0 or children[j] >= 2:
            branch[i], n_branches = n_branches, n_branches + 1
        else:
            branch[i] = branch[j]
        if j >= 0:
            path[i] = path[j] + np.linalg.norm(zyx[i] - zyx[j])
    terminal = np.zeros(n_branches, bool)
    terminal[branch[children == 0]] = True
    gain = rng.lognormal(0.0, p.branch_brightness_sigma, n_branches)
    gain[terminal & (rng.random(n_branches) < p.weak_terminal_fraction)] *= p.weak_terminal_factor
    phases = rng.uniform(0, 2 * np.pi, (n_branches, 3))
    wavelengths = p.path_variation_scale * rng.uniform(0.5, 2.0, (n_branches, 3))
    start = np.full(n_branches, np.inf)
    np.minimum.at(start, branch, np.where(parent >= 0, path[np.maximum(parent, 0)], path))
    end = np.zeros(n_branches)
    np.maximum.at(end, branch, path)
    n_gaps = rng.poisson(p.gap_rate * (end - start) / 100.0)
    gap_branch = np.repeat(np.arange(n_branches), n_gaps)
    gap_centre = rng.uniform(start[gap_branch], end[gap_branch])
    gap_half = p.gap_length * rng.uniform(0.25, 0.75, gap_branch.size)

    def brightness(b: np.ndarray, s: np.ndarray) -> np.ndarray:
        wave = np.sin(2 * np.pi * s[:, None] / wavelengths[b] + phases[b]).sum(axis=1) / math.sqrt(1.5)
        value = gain[b] * np.clip(1 + p.path_variation * wave, 0.2, None)
        for gb, c, h in zip(gap_branch, gap_centre, gap_half):
            value[(b == gb) & (np.abs(s - c) < h)] *= p.gap_depth
        return value

    # Every edge is cut into k pieces; the first point is the parent, the last the child.
    child = np.flatnonzero(parent >= 0)
    a, b = zyx[parent[child]], zyx[child]
    k = np.maximum(1, np.ceil(np.linalg.norm(b - a, axis=1) / step).astype(np.int64))
    edge = np.repeat(np.arange(child.size), k)
    piece = np.arange(edge.size) - np.repeat(np.cumsum(k) - k, k)
    t0, t1 = piece / k[edge], (piece + 1) / k[edge]
    ra, rb = radius[parent[child]][edge], radius[child][edge]
    sa, sb = path[parent[child]][edge], path[child][edge]
    br = branch[child][edge]
    s0, s1 = sa + t0 * (sb - sa), sa + t1 * (sb - sa)
    seg_b0, seg_b1 = brightness(br, s0), brightness(br, s1)
    soma = (neuron.types[child] == 1)[edge] & (neuron.types[parent[child]] == 1)[edge]
    seg_b0[soma] = seg_b1[soma] = p.soma_brightness
    # Roots get a zero-length segment: a sphere (the soma, when the root is one).
    roots = neuron.roots
    root_b = np.where(neuron.types[roots] == 1, p.soma_brightness, gain[branch[roots]])
    p0 = np.concatenate([a[edge] + t0[:, None] * (b - a)[edge], zyx[roots]])
    p1 = np.concatenate([a[edge] + t1[:, None] * (b - a)[edge], zyx[roots]])
    r0 = np.concatenate([ra + t0 * (rb - ra), radius[roots]])
    r1 = np.concatenate([ra + t1 * (rb - ra), radius[roots]])
    b0 = np.concatenate([seg_b0, root_b])
    b1 = np.concatenate([seg_b1, root_b])
    return p0, p1, r0, r1, b0, b1, np.full(p0.shape[0], label, np.int32)


def _autofluorescence_lattice(shape: Int3, voxel: np.ndarray, p: SynthConfig) -> tuple[np.ndarray, Int3]:
    """A smooth random field on a coarse lattice (one point per ``autofluorescence_scale``)."""
    step = tuple(max(1, round(p.autofluorescence_scale / v)) for v in voxel)
    lattice_shape = tuple(-(-n // s) + 2 for n, s in zip(shape, step))
    rng = np.random.default_rng([p.seed, 13])
    field = ndimage.gaussian_filter(rng.standard_normal(lattice_shape), 1.0, mode="wrap")
    field /= max(float(field.std()), 1e-12)
    return (p.background_photons + p.autofluorescence_photons * field).clip(0).astype(np.float32), step  # type: ignore[return-value]


# --------------------------------------------------------------------------- rendering


@numba.njit(cache=True, nogil=True)
def _draw_segments(density, labels, origin, p0, p1, r0, r1, b0, b1, label, voxel, edge):  # pragma: no cover
    """Anti-aliased cone frusta into ``density`` (max of overlaps) and ``labels`` (first wins)."""
    nz, ny, nx = density.shape
    for s in range(p0.shape[0]):
        reach = max(r0[s], r1[s]) + edge
        lo = np.empty(3, np.int64)
        hi = np.empty(3, np.int64)
        for a in range(3):
            lo[a] = max(int(math.floor(min(p0[s, a], p1[s, a]) - reach / voxel[a])) - origin[a], 0)
            hi[a] = min(int(math.ceil(max(p0[s, a], p1[s, a]) + reach / voxel[a])) - origin[a] + 1, density.shape[a])
        dz = (p1[s, 0] - p0[s, 0]) * voxel[0]
        dy = (p1[s, 1] - p0[s, 1]) * voxel[1]
        dx = (p1[s, 2] - p0[s, 2]) * voxel[2]
        dd = dz * dz + dy * dy + dx * dx
        for z in range(lo[0], hi[0]):
            vz = (z + origin[0] - p0[s, 0]) * voxel[0]
            for y in range(lo[1], hi[1]):
                vy = (y + origin[1] - p0[s, 1]) * voxel[1]
                for x in range(lo[2], hi[2]):
                    vx = (x + origin[2] - p0[s, 2]) * voxel[2]
                    t = 0.0
                    if dd > 0:
                        t = min(max((vz * dz + vy * dy + vx * dx) / dd, 0.0), 1.0)
                    ez, ey, ex = vz - t * dz, vy - t * dy, vx - t * dx
                    r = r0[s] + t * (r1[s] - r0[s])
                    cover = min(max((r - math.sqrt(ez * ez + ey * ey + ex * ex)) / edge + 0.5, 0.0), 1.0)
                    if cover > 0:
                        value = cover * (b0[s] + t * (b1[s] - b0[s]))
                        if value > density[z, y, x]:
                            density[z, y, x] = value
                        if cover >= 0.5 and labels[z, y, x] == 0:
                            labels[z, y, x] = label[s]
    return nz * ny * nx


def render(scene: Scene, region: Sequence[slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a region of a scene: the image and the label mask.

    The result is bit-identical to the same region of a whole-volume render, whatever
    the region (the PSF gets its context from a halo, and noise is drawn per fixed tile).

    Parameters
    ----------
    scene : Scene
    region : 3 slices, optional
        Part of the volume (steps of 1); default the whole volume.

    Returns
    -------
    image : ndarray of uint8 or uint16
    mask : ndarray of unsigned int
        0 background, ``i`` inside neuron ``i``'s tubes (radius floor included).

    Examples
    --------
    >>> scene = scene_from_swc(random_morphology(1), SynthConfig(voxel_size=(1, 1, 1)))
    >>> image, mask = render(scene)
    >>> image.shape == scene.shape, int(mask.max())
    (True, 1)
    >>> part, _ = render(scene, (slice(5, 20), slice(0, 30), slice(10, 40)))
    >>> bool((part == image[5:20, :30, 10:40]).all())
    True
    """
    bounds = _bounds(scene.shape, region)
    # Noise tiles must be drawn whole: work on the tile-aligned cover of the region.
    cover = [(a // NOISE_TILE * NOISE_TILE, min(-(-b // NOISE_TILE) * NOISE_TILE, n)) for (a, b), n in zip(bounds, scene.shape)]
    photons, labels = _photons(scene, cover)
    image = np.empty(photons.shape, scene.dtype)
    full = np.iinfo(scene.dtype).max
    gain = full / scene.params.full_scale_photons
    for tile in np.ndindex(*(-(-(b - a) // NOISE_TILE) for a, b in cover)):
        local = tuple(slice(i * NOISE_TILE, (i + 1) * NOISE_TILE) for i in tile)
        index = [(a + s.start) // NOISE_TILE for (a, _), s in zip(cover, local)]
        rng = np.random.default_rng([scene.params.seed, 17, *index])
        counts = rng.poisson(photons[local]).astype(np.float32)
        counts += np.float32(scene.params.read_noise) * rng.standard_normal(counts.shape, np.float32)
        image[local] = np.clip(np.rint(counts * np.float32(gain)), 0, full)
    crop = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(bounds, cover))
    return image[crop], labels[crop]


def label_mask(scene: Scene, region: Sequence[slice] | None = None, *, radius_um: float | None = None) -> np.ndarray:
    """The label mask of a region of a scene, without rendering its light.

    Parameters
    ----------
    scene : Scene
    region : 3 slices, optional
        Part of the volume; default the whole volume.
    radius_um : float, optional
        Draw every tube at this radius instead of its own: a small radius gives the
        neurites' centrelines (for a skeleton-recall loss).

    Examples
    --------
    >>> scene = scene_from_swc(random_morphology(1), SynthConfig(voxel_size=(1, 1, 1)))
    >>> mask, line = label_mask(scene), label_mask(scene, radius_um=0.5)
    >>> bool((mask == render(scene)[1]).all()), 0 < int((line > 0).sum()) < int((mask > 0).sum())
    (True, True)
    """
    if radius_um is not None:
        scene = dataclasses.replace(scene, r0=np.full_like(scene.r0, radius_um), r1=np.full_like(scene.r1, radius_um))
    return _draw(scene, _bounds(scene.shape, region))[1]


def _bounds(shape: Int3, region: Sequence[slice] | None) -> list[tuple[int, int]]:
    if region is None:
        return [(0, n) for n in shape]
    if len(region) != 3:
        raise ValueError(f"region must be 3 slices, got {len(region)}")
    bounds = []
    for s, n in zip(region, shape):
        start, stop, step = s.indices(n)
        if step != 1 or stop <= start:
            raise ValueError(f"region {region} is empty or strided")
        bounds.append((start, stop))
    return bounds


def _draw(scene: Scene, bounds: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Density and labels of the segments reaching into ``bounds`` (steps 1-2 of the model)."""
    origin = np.array([a for a, _ in bounds], np.int64)
    end = np.array([b for _, b in bounds], np.int64)
    near = np.flatnonzero(np.all(scene.hi >= origin, axis=1) & np.all(scene.lo < end, axis=1))
    density = np.zeros(tuple(end - origin), np.float32)
    labels = np.zeros(tuple(end - origin), scene.mask_dtype)
    voxel = np.asarray(scene.voxel_size, float)
    _draw_segments(density, labels, origin, scene.p0[near], scene.p1[near], scene.r0[near], scene.r1[near],
                   scene.b0[near], scene.b1[near], scene.label[near], voxel, float(voxel[1:].min()))  # fmt: skip
    return density, labels


def _photons(scene: Scene, bounds: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Expected photons per voxel of ``bounds`` (blurred signal plus background), and the labels."""
    halo = scene.halo()
    padded = [(a - h, b + h) for (a, b), h in zip(bounds, halo)]
    density, labels = _draw(scene, padded)
    sigma = scene._psf_sigma_voxels()
    blurred = ndimage.gaussian_filter(density, sigma, mode="constant", truncate=_TRUNCATE)
    inner = tuple(slice(h, h + b - a) for (a, b), h in zip(bounds, halo))
    signal = blurred[inner] * np.float32(scene.params.intensity * scene.params.signal_photons)
    return signal + _background(scene, bounds), labels[inner]


def _background(scene: Scene, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
    """Trilinear interpolation of the autofluorescence lattice, one axis at a time.

    Each value depends only on its own position (no sums whose order could vary), so any
    region gives the same bits as the whole volume.
    """
    field = scene.autofluorescence
    for axis, ((a, b), step) in enumerate(zip(bounds, scene.lattice_step)):
        position = np.arange(a, b) / step
        left = np.floor(position).astype(np.int64)
        shape = [1, 1, 1]
        shape[axis] = b - a
        right = (position - left).astype(np.float32).reshape(shape)
        field = np.take(field, left, axis=axis) * (1 - right) + np.take(field, left + 1, axis=axis) * right
    return field.astype(np.float32)


def dim_real_image(image: np.ndarray, intensity: float, params: SynthConfig | None = None) -> np.ndarray:
    """Make a real image a weak-signal test: scale its light and add the camera model's noise.

    The image is read as photons (``full_scale_photons`` at the dtype's largest value),
    scaled by ``intensity``, given ``background_photons``, then Poisson shot noise and
    read noise, and quantised back to the same dtype: the same noise model as
    :func:`render`, so real and rendered weak-neurite series are comparable. Noise is
    seeded by ``params.seed``.

    Examples
    --------
    >>> real = np.full((4, 8, 8), 200, np.uint8)
    >>> float(dim_real_image(real, 0.5).mean()) < 120
    True
    """
    params = params or SynthConfig()
    if image.dtype not in (np.uint8, np.uint16):
        raise InputError(f"can only dim uint8 or uint16 images, got {image.dtype}")
    full = np.iinfo(image.dtype).max
    photons = image.astype(np.float32) * np.float32(params.full_scale_photons / full * intensity)
    rng = np.random.default_rng([params.seed, 19])
    counts = rng.poisson(photons + np.float32(params.background_photons)).astype(np.float32)
    counts += np.float32(params.read_noise) * rng.standard_normal(counts.shape, np.float32)
    return np.clip(np.rint(counts * np.float32(full / params.full_scale_photons)), 0, full).astype(image.dtype)


# --------------------------------------------------------------------------- to disk


@dataclass(frozen=True)
class SynthResult:
    """What :func:`render_to_zarr` wrote."""

    out: Path
    image: Path
    mask: Path
    gold: Path
    tiff: Path | None
    shape: Int3
    voxel_size: Float3
    n_neurons: int
    blocks: int
    seconds: float

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [
            f"wrote {self.out}: {self.n_neurons} neuron(s), {self.shape[0]}x{self.shape[1]}x{self.shape[2]} voxels "
            f"of {self.voxel_size[0]:g}x{self.voxel_size[1]:g}x{self.voxel_size[2]:g} um, "
            f"{self.blocks} block(s) in {self.seconds:.1f} s",
            f"  image  {self.image}",
            f"  mask   {self.mask}",
            f"  gold   {self.gold}",
        ]
        if self.tiff is not None:
            lines.append(f"  tiff   {self.tiff}")
        return "\n".join(lines)


def render_to_zarr(
    scene: Scene,
    out: str | Path,
    *,
    chunks: Int3 | None = None,
    block_bytes: int = 64 << 20,
    client=None,
    overwrite: bool = False,
    tiff: bool = False,
) -> SynthResult:
    """Render a scene block by block into a folder: OME-Zarr image and mask, gold SWC.

    Writes ``OUT/image.ome.zarr``, ``OUT/mask.ome.zarr`` (labels: 0 background, neuron
    ``i`` = ``i``), ``OUT/gold.swc`` (voxel coordinates, voxel size in the header),
    ``OUT/synth.json`` (parameters), and with ``tiff`` an ImageJ ``OUT/image.tif`` (made
    from the whole image in memory: for small scenes).
    The folder is built as ``OUT.partial`` and renamed when complete.

    Parameters
    ----------
    scene : Scene
    out : path
        Output folder; an existing one is an error unless ``overwrite``.
    chunks : (z, y, x), optional
        Storage chunks; default about 1-2 MB.
    block_bytes : int
        Image bytes rendered per task: bounds memory (about 20 bytes per voxel).
    client : distributed.Client, optional
        Render blocks as Dask tasks on this cluster; default in this process.
    overwrite, tiff : bool

    Examples
    --------
    >>> scene = random_scene(2, (32, 96, 96))
    >>> render_to_zarr(scene, "synth_out").summary()  # doctest: +SKIP
    """
    from .blocks import BlockGrid
    from .io.omezarr import mark_complete, plan_layout, replace_store, write_image_metadata

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not _synth_folder(out):
        raise OutputError(f"{out}: exists and was not written by neurotrace synth; refusing to replace it")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # an interrupted render: ours to discard, anything else is the user's
        if not _synth_folder(partial):
            raise OutputError(f"{partial}: exists and was not written by neurotrace synth; move it away first")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    image_layout = plan_layout(scene.shape, scene.dtype, scene.voxel_size, levels=1, chunks=chunks)
    mask_layout = plan_layout(scene.shape, scene.mask_dtype, scene.voxel_size, levels=1,
                              chunks=image_layout.chunks[0])  # fmt: skip
    extra = {"synth": scene.params.model_dump(mode="json")}
    write_image_metadata(partial / "image.ome.zarr", image_layout, name="synthetic image", extra=extra)
    write_image_metadata(partial / "mask.ome.zarr", mask_layout, name="synthetic neurite mask", extra=extra)
    # Blocks own whole chunks and whole noise tiles (no tile is drawn twice).
    unit = tuple(math.lcm(c, NOISE_TILE) for c in image_layout.chunks[0])
    per_block = max(1, block_bytes // (scene.dtype.itemsize * math.prod(unit)))
    side = max(1, round(per_block ** (1 / 3)))
    grid = BlockGrid.for_storage(scene.shape, tuple(side * c for c in unit), chunks_or_shards=unit)
    if client is None:
        for block in grid:
            _render_block(block.write, scene, partial)
    else:
        from .cluster import run_tasks

        scene_future = client.scatter(scene, broadcast=True)
        run_tasks(client, _render_block, (b.write for b in grid), total=len(grid), description="render",
                  scene=scene_future, folder=partial)  # fmt: skip
    for name in ("image.ome.zarr", "mask.ome.zarr"):
        mark_complete(partial / name)
    comments = [f"synthetic ground truth: {scene.n_neurons} neuron(s), seed {scene.params.seed}"]
    write_swc(partial / "gold.swc", scene.gold, voxel_size_zyx=scene.voxel_size, comments=comments)
    (partial / "synth.json").write_text(json.dumps(
        {"shape": scene.shape, "voxel_size": scene.voxel_size, "n_neurons": scene.n_neurons,
         "tree_labels": scene.gold_labels.tolist(), "params": scene.params.model_dump(mode="json")}, indent=1))  # fmt: skip
    if tiff:
        _write_tiff(partial / "image.tif", partial / "image.ome.zarr", scene.voxel_size)
    replace_store(partial, out)
    return SynthResult(out, out / "image.ome.zarr", out / "mask.ome.zarr", out / "gold.swc",
                       out / "image.tif" if tiff else None, scene.shape, scene.voxel_size, scene.n_neurons,
                       len(grid), time.perf_counter() - started)  # fmt: skip


def _synth_folder(path: Path) -> bool:
    """Whether ``path`` is a folder this function wrote (and may delete)."""
    from .io.omezarr import written_by_us

    return path.is_dir() and written_by_us(path / "image.ome.zarr")


def _render_block(region: tuple[slice, ...], scene: Scene, folder: Path) -> None:
    import zarr

    image, mask = render(scene, region)
    zarr.open_array(str(folder / "image.ome.zarr" / "0"), mode="r+")[region] = image
    zarr.open_array(str(folder / "mask.ome.zarr" / "0"), mode="r+")[region] = mask


def _write_tiff(path: Path, store: Path, voxel_size: Float3) -> None:
    import tifffile
    import zarr

    data = zarr.open_array(str(store / "0"), mode="r")[...]
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / voxel_size[2], 1 / voxel_size[1]),
                     metadata={"axes": "ZYX", "spacing": voxel_size[0], "unit": "um"})  # fmt: skip
