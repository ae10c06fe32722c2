"""The weak-neurite benchmark: every tracer against gold as the signal dims.

Cases
    The five DIADEM OP stacks with their gold SWCs, and volumes rendered by
    ``neurotrace_dask.synth`` from real morphologies in ``../shared/data/morphologies``
    (plus one random neuron), each at intensity 1, 0.5, 0.25 and 0.125. OP images are
    dimmed by ``synth.dim_real_image``: the real light scaled, then the same background,
    shot and read noise as the renderer adds, so both series share one noise model.
Methods
    Every tracer of this project, run by ``benchmarks/run_neurotrace.py`` with the package
    defaults (no tuning here):

    - ``neurotrace-raw``: voxel scooping on the raw image (``trace.raw_to_probability``).
    - ``neurotrace-standin``: voxel scooping on a STAND-IN probability map made from the gold
      standard (see :func:`standin_probability`), not from a CNN: the gold neurites' own light
      plus the image's noise, smoothed and scaled as ``raw_to_probability`` does, with no
      background and no fibres the gold does not trace. An upper-bound-ish sanity check of
      the tracer on a probability map, shown beside ``neurotrace-cnn``.
    - ``neurotrace-cnn``: ``predict.predict_array`` with a checkpoint (``--checkpoint``, one
      or more, default the pipeline's shipped one), then voxel scooping; one method
      ``neurotrace-cnn:NAME`` per checkpoint, skipped with a note when there is none.
      ``--merge accuracy.json`` adds runs to an earlier full report instead of starting over.
      Cases whose data were in a checkpoint's training set are marked ``+`` in the report.

    and the peers, run side by side from their own virtual environment (``make peers``):
    kimimaro on a thresholded mask, Rivulet2, and APP2 when an ``app2`` executable is on
    PATH. A peer that is not installed is skipped with a note.
Fair thresholds
    Every peer gets the same input, the image minus its background (a Gaussian of sigma
    ``BACKGROUND_UM``, clipped at 0: without it, low-frequency autofluorescence above a
    global threshold turns the mask into a sponge), and a threshold from one rule: median
    + k x 1.4826 x MAD of that input smoothed by a Gaussian of sigma 1 voxel. k is chosen per method from
    ``K_CHOICES`` per series as the best mean length-F1 on its tuning cases (OP_1 for the
    OP series, the first morphology for the rendered one, at intensities 1 and 0.25), then
    used for every case of that series. Tuning
    cases are marked in the results (``--k-from`` reuses the k a previous run chose, instead
    of running the tuning trials again). A run that uses more than ``PEER_TIMEOUT`` CPU
    seconds counts as failed (F1 0) and says so.
Scores
    ``neurotrace_dask.evaluate`` at tolerance tau = 3.94 xy voxels (the DIADEM OP xy
    threshold): length F1, recall, precision, the DIADEM score; wall seconds and peak RSS
    of the tracer process. These pool every tree of the output; a user who picks the traced
    cell keeps one, so the same scores are also given for *the neuron at the gold root*: the
    output tree holding the node nearest (in um) to the gold's root (:func:`neuron_at_root`),
    with its tips over the gold's (:func:`count_tips`, median across cases) and the number of
    trees in the whole output. Its targets (``ROOT_TARGETS``): on OP, length F1 >= 0.90 at every
    intensity and a tips ratio <= 1.5; on rendered cells, length F1 >= 0.90 / 0.80 / 0.60 at
    intensity 1 / 0.25 / 0.125 with precision >= 0.9.
Weak branches
    A gold *branch* is an unbranched section of the gold tree: from a root or branch point to
    the next branch point or tip (soma-to-soma edges excluded; see :func:`gold_branches`).
    Its *light* is the length-weighted mean, along its centreline (samples every half voxel),
    of the brightest voxel within one voxel (3x3x3) of each sample, after smoothing the light
    by a Gaussian of sigma 1 voxel (the real OP fibres are saturated: smoothing lets thin and
    dim fibres count less), measured on the
    noise-free expected signal photons of the renderer (rendered series: branch brightness,
    dim gaps, thickness and PSF all count) or on the real, undimmed stack (OP series). The
    *weak branches* of a case are the third of its branches (by number, rounded up) with the
    least light; the ranking does not depend on the intensity. *Weak-branch recall* is the
    share of the weak branches' cable within tau of the test reconstruction (the length
    recall of the weak sub-forest), reported beside the method's overall length precision.
    The issue's target at intensity 0.25: length F1 >= 0.90 and weak-branch recall >= 0.8 at
    precision >= 0.95.

Writes ``accuracy.json``, ``accuracy.md`` and ``accuracy.png`` to ``--out``
(default ``benchmarks/results``)::

    make peers && .venv/bin/python benchmarks/accuracy.py            # full: over an hour on 2 cores (see below)
    .venv/bin/python benchmarks/accuracy.py --quick                  # OP_5 + one rendered cell, 2 intensities
    .venv/bin/python benchmarks/accuracy.py --methods neurotrace-cnn --checkpoint checkpoints/NAME.json \
        --merge benchmarks/results/accuracy.json                     # add one checkpoint to the report

Measured on 2 shared cores (2026-11-25, ``--jobs 1``): the peers, ``neurotrace-raw`` and
``neurotrace-standin`` on all 36 cases took 39 min with ``--k-from`` (no tuning trials; those come
on top, Rivulet2 at low k running up to its CPU limit), each CNN checkpoint 18-26 min (prediction
on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from neurotrace_dask import synth
from neurotrace_dask.config import SynthConfig
from neurotrace_dask.evaluate import evaluate, length_scores
from neurotrace_dask.io.swc import SWC, read_swc
from neurotrace_dask.synth import (Scene, dim_real_image, load_morphology, random_morphology, render,
                                   scene_from_morphologies, scene_from_swc)  # fmt: skip

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data"
PEER_PYTHON = REPO / ".peers" / "bin" / "python"
RUN_PEER = HERE / "peers" / "run_peer.py"
RUN_OURS = HERE / "run_neurotrace.py"
CHECKPOINTS = REPO / "checkpoints"
PEERS = ("kimimaro", "rivulet2", "app2")  # thresholded by the rule below, k tuned
OURS = {"neurotrace-raw": "raw", "neurotrace-standin": "prob", "neurotrace-cnn": "cnn"}
DEFAULT_METHODS = "neurotrace-raw,neurotrace-standin,neurotrace-cnn,kimimaro,rivulet2,app2"

INTENSITIES = (1.0, 0.5, 0.25, 0.125)
K_CHOICES = (2.0, 4.0, 8.0)
OP_VOXEL = (1.0, 0.3296, 0.3296)
RENDER_VOXEL = (1.0, 0.4, 0.4)
MORPHOLOGIES = ("nmo_swcvis_granule.swc", "bmtk_Pvalb_469628681_m.swc", "nmo_swcvis_bipolar.swc")
TAU_XY_VOXELS = 3.94
BACKGROUND_UM = 10.0  # scale of the background removed before thresholding
PEER_TIMEOUT = 300  # CPU seconds per run: a longer run counts as failed (stated in the report)
WALL_FACTOR = 4  # wall-clock backstop, in multiples of PEER_TIMEOUT
TUNING_INTENSITIES = (1.0, 0.25)
TARGET_INTENSITY = 0.25  # the target: F1 >= 0.90, weak recall >= 0.8 at precision >= 0.95
TARGET_F1, TARGET_WEAK_RECALL, TARGET_PRECISION = 0.90, 0.8, 0.95

# The stand-in probability map (standin_probability). Fixed a priori, not tuned on any case.
STANDIN_SMOOTH = 1.0  # voxels: the Gaussian smoothing of trace.raw_to_probability
OP_GOLD_TUBE = 2.0  # xy voxels (0.66 um): radius of the tubes around the OP gold centrelines
WEAK_FRACTION = 1.0 / 3.0  # the dimmest third of the gold branches are the weak ones
SAMPLE_SPACING = 0.5  # voxels between centreline samples when measuring a branch's light
LIGHT_SMOOTH = 1.0  # voxels: Gaussian smoothing of the light before measuring it


@dataclass(eq=False)
class Case:
    """One image with its gold standard, the stand-in probability map and the weak branches."""

    name: str
    series: str  # "OP" or "rendered"
    intensity: float
    image: np.ndarray
    gold: SWC
    voxel_size: tuple[float, float, float]
    tuning: bool = False
    standin: np.ndarray | None = None  # uint8 stand-in probability map (standin_probability)
    expected: np.ndarray | None = None  # the same map without its noise (standin_probability, seed None)
    weak_gold: SWC | None = None  # the weak branches as a forest (weak_subforest)
    weak_info: dict = field(default_factory=dict)
    raw_input: Path | None = None  # set by prepare()
    peer_input: Path | None = None
    standin_input: Path | None = None
    median_mad: tuple[float, float] = (math.nan, math.nan)

    @property
    def tau(self) -> float:
        return TAU_XY_VOXELS * self.voxel_size[2]


@dataclass
class Run:
    """One method on one case."""

    method: str
    case: str
    series: str
    intensity: float
    k: float
    threshold: float
    status: str
    seconds: float = math.nan
    peak_rss_mb: float = math.nan
    scores: dict = field(default_factory=dict)
    tuning: bool = False
    weak_recall: float = math.nan
    # The neuron a user gets: the output tree nearest the gold's root (neuron_at_root). Defaults
    # (empty / NaN) are what a report written before these fields existed loads as.
    root_scores: dict = field(default_factory=dict)
    root_weak_recall: float = math.nan
    tips: float = math.nan  # tips of that tree (an int when known)
    gold_tips: float = math.nan
    trees: float = math.nan  # trees in the whole output


# --------------------------------------------------------------------------- weak branches


def gold_branches(gold: SWC) -> list[np.ndarray]:
    """The unbranched sections of a forest, each as node rows from its start to its end.

    A section starts at a root or a branch point (a node with two or more children) and
    follows single children down to the next branch point or tip; its first row is the
    start node, so consecutive rows are the section's edges. Edges between two soma nodes
    (type 1) belong to no section; a section may then start at a soma node.

    Parameters
    ----------
    gold : SWC

    Returns
    -------
    list of (k,) int64 arrays, k >= 2
        One per section, in preorder of their first edge.

    Examples
    --------
    >>> y = SWC.from_arrays([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 3], [0, -1, 3]], [-1, 0, 1, 2, 2])
    >>> [b.tolist() for b in gold_branches(y)]
    [[0, 1, 2], [2, 3], [2, 4]]
    """
    parent = gold.parent_index
    n = gold.n_nodes
    n_children = np.bincount(parent[parent >= 0], minlength=n)
    critical = (parent < 0) | (n_children != 1)
    soma = gold.types == 1
    section = np.full(n, -1, np.int64)
    rows: list[list[int]] = []
    for i in gold.preorder.tolist():
        j = int(parent[i])
        if j < 0 or (soma[i] and soma[j]):
            continue
        if critical[j] or section[j] < 0:
            section[i] = len(rows)
            rows.append([j, i])
        else:
            section[i] = section[j]
            rows[section[j]].append(i)
    return [np.asarray(r, np.int64) for r in rows]


def branch_light(gold: SWC, branches: list[np.ndarray], light: np.ndarray,
                 spacing: float = SAMPLE_SPACING, smooth: float = LIGHT_SMOOTH) -> np.ndarray:  # fmt: skip
    """Mean light along each branch: the brightest voxel within one voxel of each centreline sample.

    ``light`` is first smoothed by a Gaussian of ``smooth`` voxels (the real OP stacks are
    saturated along most fibres: smoothing makes a thin or dim fibre's light count less than
    a thick bright one's). Samples are taken every ``spacing`` voxels along each edge (at least
    one per edge) and weighted by the length they stand for; samples outside the volume are
    left out, and a branch without any inside gets NaN.

    Parameters
    ----------
    gold : SWC
        In voxel coordinates of ``light``.
    branches : list of row arrays
        From :func:`gold_branches`.
    light : (z, y, x) array
        The light to measure (photons, grey values...).
    spacing : float
        Voxels between samples.
    smooth : float
        Gaussian sigma (voxels) applied to ``light`` first; 0 for none.

    Returns
    -------
    (len(branches),) float64

    Examples
    --------
    >>> light = np.zeros((3, 3, 12)); light[1, 1, :6] = 10
    >>> line = SWC.from_arrays([[1, 1, 0], [1, 1, 4], [1, 1, 11]], [-1, 0, 1])
    >>> branch_light(line, [np.array([0, 1]), np.array([1, 2])], light, smooth=0).round(2).tolist()
    [10.0, 3.57]
    """
    light = np.asarray(light, np.float32)
    peak = ndimage.maximum_filter(ndimage.gaussian_filter(light, smooth) if smooth > 0 else light, size=3)
    zyx = gold.zyx
    upper = np.asarray(light.shape) - 0.5
    out = np.full(len(branches), np.nan)
    for b, rows in enumerate(branches):
        a, c = zyx[rows[:-1]], zyx[rows[1:]]
        length = np.linalg.norm(c - a, axis=1)
        k = np.maximum(1, np.ceil(length / spacing).astype(np.int64))
        edge = np.repeat(np.arange(k.size), k)
        t = ((np.arange(edge.size) - np.repeat(np.cumsum(k) - k, k) + 0.5) / k[edge])[:, None]
        points = a[edge] + t * (c - a)[edge]
        weight = (length / k)[edge]
        inside = np.all((points >= -0.5) & (points < upper), axis=1)
        if not inside.any():
            continue
        idx = np.rint(points[inside]).astype(np.int64)
        values = peak[idx[:, 0], idx[:, 1], idx[:, 2]]
        w = weight[inside]
        out[b] = float((values * w).sum() / w.sum()) if w.sum() > 0 else float(values.mean())
    return out


def weakest(light: np.ndarray, fraction: float = WEAK_FRACTION) -> np.ndarray:
    """Indices of the ``ceil(fraction * n)`` branches with the least light (NaN never counts).

    Ties are broken by index (a stable sort), so the choice is deterministic.

    Examples
    --------
    >>> weakest(np.array([5.0, 1.0, np.nan, 3.0, 9.0, 2.0])).tolist()
    [1, 5]
    """
    light = np.asarray(light, np.float64)
    valid = np.flatnonzero(np.isfinite(light))
    if valid.size == 0:
        return np.zeros(0, np.int64)
    n = int(math.ceil(fraction * valid.size - 1e-9))
    order = valid[np.argsort(light[valid], kind="stable")]
    return np.sort(order[:n])


def subforest(gold: SWC, branches: list[np.ndarray]) -> SWC:
    """The given branches as a forest of their own: one chain per branch, rooted at its start.

    Examples
    --------
    >>> y = SWC.from_arrays([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 3]], [-1, 0, 1, 2])
    >>> sub = subforest(y, [np.array([1, 2, 3])])
    >>> sub.n_trees, sub.cable_length() == y.cable_length() - 1
    (1, True)
    """
    zyx = gold.zyx
    points, parents = [], []
    for rows in branches:
        start = sum(len(p) for p in points)
        points.append(zyx[rows])
        parents.append(np.concatenate([[-1], start + np.arange(len(rows) - 1)]))
    if not points:
        return SWC.from_arrays(np.zeros((0, 3)), np.zeros(0, np.int64))
    return SWC.from_arrays(np.concatenate(points), np.concatenate(parents))


def weak_subforest(gold: SWC, light: np.ndarray, voxel_size: tuple[float, float, float]) -> tuple[SWC | None, dict]:
    """The weak branches of ``gold`` measured on ``light`` (see the module docstring), with counts."""
    branches = gold_branches(gold)
    values = branch_light(gold, branches, light)
    weak = weakest(values)
    chosen = [branches[i] for i in weak.tolist()]
    sub = subforest(gold, chosen) if chosen else None
    info = {"branches": int(np.isfinite(values).sum()), "weak_branches": len(chosen),
            "weak_length_um": sub.cable_length(voxel_size) if sub is not None else 0.0,
            "gold_length_um": gold.cable_length(voxel_size),
            "weak_light_max": float(values[weak].max()) if chosen else math.nan,
            "light_median": float(np.nanmedian(values)) if np.isfinite(values).any() else math.nan}  # fmt: skip
    return sub, info


def weak_recall(weak_gold: SWC | None, test: SWC, voxel_size: tuple[float, float, float], tau: float) -> float:
    """Share of the weak branches' cable within ``tau`` um of ``test`` (NaN without weak branches)."""
    if weak_gold is None or weak_gold.n_nodes == 0:
        return math.nan
    return length_scores(weak_gold, test, voxel_size_zyx=voxel_size, tau=tau).recall


# --------------------------------------------------------------------------- the neuron at the gold root


def _tree_ids(swc: SWC) -> np.ndarray:
    """The tree (0, 1, ... in the order of the roots in ``swc.preorder``) of every row.

    ``SWC.preorder`` holds the trees one after another, each starting at its root, so a
    cumulative count of the roots along it labels every node in one vectorised pass.
    """
    pre = swc.preorder
    tree = np.empty(swc.n_nodes, np.int64)
    tree[pre] = np.cumsum(swc.parent_index[pre] < 0) - 1
    return tree


def gold_root(gold: SWC, voxel_size: tuple[float, float, float]) -> int:
    """Row of the gold's root: its first root, or with several trees the root of the longest (by cable, um).

    Examples
    --------
    >>> forest = SWC.from_arrays([[0, 0, 0], [0, 0, 1], [0, 9, 0], [0, 9, 5]], [-1, 0, -1, 2])
    >>> gold_root(forest, (1.0, 1.0, 1.0)), gold_root(SWC.from_arrays([[0, 0, 0]], [-1]), (1.0, 1.0, 1.0))
    (2, 0)
    """
    roots = gold.roots
    if roots.size <= 1:
        return int(roots[0])
    tree = _tree_ids(gold)
    child = np.flatnonzero(gold.parent_index >= 0)
    edge = np.linalg.norm((gold.zyx[child] - gold.zyx[gold.parent_index[child]]) * np.asarray(voxel_size), axis=1)
    cable = np.bincount(tree[child], weights=edge, minlength=roots.size)
    # argmax keeps the first of equal trees; tree ids follow the preorder, so map back to the root row.
    first = np.flatnonzero(tree[gold.preorder] == int(np.argmax(cable)))[0]
    return int(gold.preorder[first])


def neuron_at_root(test: SWC, gold: SWC, voxel_size: tuple[float, float, float]) -> SWC | None:
    """The tree of ``test`` that a user who picks the traced cell keeps: the one nearest the gold's root.

    The tree holding the test node nearest (in um) to the gold's root node (see
    :func:`gold_root`), whichever node of the tree that is, returned as an SWC of its own:
    rows in depth-first order (every parent before its children), ids ``1..n``, positions,
    radii and types kept. Vectorised over the nodes (outputs can hold 1e5 of them).

    Parameters
    ----------
    test : SWC
        A reconstruction, one or many trees, in voxel coordinates.
    gold : SWC
        The gold standard in the same voxel coordinates.
    voxel_size : (z, y, x) floats
        Micrometres per voxel: distances are measured in um, so anisotropy counts.

    Returns
    -------
    SWC or None
        None when ``test`` (or ``gold``) has no node.

    Examples
    --------
    >>> gold = SWC.from_arrays([[0, 0, 0], [0, 0, 9]], [-1, 0])
    >>> test = SWC.from_arrays([[0, 5, 5], [0, 5, 9], [0, 1, 1], [0, 1, 6], [0, 4, 1]], [-1, 0, -1, 2, 2])
    >>> tree = neuron_at_root(test, gold, (1.0, 1.0, 1.0))
    >>> tree.n_nodes, tree.zyx[:, 1:].tolist(), tree.parent_index.tolist()
    (3, [[1.0, 1.0], [1.0, 6.0], [4.0, 1.0]], [-1, 0, 0])
    """
    if test.n_nodes == 0 or gold.n_nodes == 0:
        return None
    scale = np.asarray(voxel_size, np.float64)
    offset = (test.zyx - gold.zyx[gold_root(gold, voxel_size)]) * scale
    nearest = int(np.argmin(np.einsum("ij,ij->i", offset, offset)))
    tree = _tree_ids(test)
    # Preorder keeps the tree contiguous and puts parents first: renumbered along it, every parent
    # row is below its children's (SWC itself accepts any acyclic order; SWC tools expect this one).
    rows = test.preorder[tree[test.preorder] == tree[nearest]]
    new = np.full(test.n_nodes, -1, np.int64)
    new[rows] = np.arange(rows.size)
    parent = test.parent_index[rows]
    parent = np.where(parent >= 0, new[np.maximum(parent, 0)], -1)
    return SWC.from_arrays(test.zyx[rows], parent, radius=test.radius[rows], types=test.types[rows])


def count_tips(swc: SWC | None) -> int:
    """Number of tips: nodes without children (a lone node is one tip; a root with one child is none).

    Examples
    --------
    >>> y = SWC.from_arrays([[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, -1, 2]], [-1, 0, 1, 1])
    >>> count_tips(y), count_tips(SWC.from_arrays([[0, 0, 0]], [-1])), count_tips(None)
    (2, 1, 0)
    >>> count_tips(SWC.from_arrays([[0, 0, 0], [0, 0, 1], [5, 5, 5]], [-1, 0, -1]))  # two trees
    2
    """
    if swc is None or swc.n_nodes == 0:
        return 0
    parent = swc.parent_index
    return int(np.count_nonzero(np.bincount(parent[parent >= 0], minlength=swc.n_nodes) == 0))


# --------------------------------------------------------------------------- stand-in probability


def standin_probability(signal: np.ndarray, total: np.ndarray, params: SynthConfig,
                        seed: list[int] | None) -> np.ndarray:  # fmt: skip
    """A STAND-IN for a CNN probability map, made from the known neurite signal (not a CNN).

    The ideal version of what ``trace.raw_to_probability`` computes from a raw image: the
    gold neurites' own light plus the image's noise, with nothing else (no background, no
    autofluorescence, no fibres the gold does not trace), smoothed and put in noise units
    the same way, and mapped to 0-255 by the same rule and the package's default
    thresholds::

        z = G * (S + sqrt(T + r^2) e) / (|G| sqrt(T - S + r^2))
        p = clip(round(low + (z - k_low) (high - low) / (k_high - k_low)), 0, 255)   # = 16 z

    - ``S`` (``signal``): the expected photons of the gold neurites in each voxel: the gold
      label mask weighted by the neurite's brightness, blurred by the PSF and scaled by the
      intensity (rendered cases: the renderer's own noise-free signal; OP: the real light,
      dimmed, inside tubes of ``OP_GOLD_TUBE`` xy voxels around the gold centrelines);
    - ``T`` (``total``): all expected photons in the voxel (signal, background,
      autofluorescence, on OP also the real light of fibres the gold does not trace), so
      ``sqrt(T + r^2) e`` is the voxel's shot plus read noise (``r`` = ``params.read_noise``,
      ``e`` white standard normal noise, seeded by ``seed``) and ``sqrt(T - S + r^2)`` the
      noise the voxel would have without the neurite;
    - ``G``: a Gaussian of sigma 1 voxel (``raw_to_probability``'s smoothing) and ``|G|`` its
      L2 norm, so that ``z`` is the smoothed signal in units of the smoothed local noise;
    - ``low``, ``high``, ``k_low``, ``k_high``: ``TraceConfig`` defaults (64, 128, 4, 8):
      4 noise units reach the tracer's low threshold, 8 its high one.

    ``seed`` None leaves the noise out (``e = 0``): the *expected* map, what the stand-in holds
    on average, against which a noisy draw's dim stretches can be judged.

    The map knows which fibres are gold (no false fibres: precision is near its ceiling)
    but sees them only through the image's own noise: dim branches fade and break as the
    intensity falls. An upper-bound-ish sanity check of the tracer on a probability map, not
    a CNN (a CNN can also integrate along a fibre, which a Gaussian of one voxel does not).

    Examples
    --------
    >>> s = np.zeros((8, 16, 16), np.float32); s[4, 8, :] = 40.0
    >>> p = standin_probability(s, s + 3.0, SynthConfig(), [0])
    >>> int(p[4, 8, 8]) > 128, int(np.median(p)) < 64
    (True, True)
    >>> mean = standin_probability(s, s + 3.0, SynthConfig(), None)  # no noise: nothing off the line
    >>> int(mean[4, 8, 8]), int(mean[0].max()), int(p[0].max()) > 0
    (255, 0, True)
    """
    from neurotrace_dask.config import TraceConfig

    cfg = TraceConfig()
    read2 = np.float32(params.read_noise**2)
    total = np.maximum(total, signal)
    noisy = signal
    if seed is not None:
        rng = np.random.default_rng([*seed, 23])
        noisy = signal + np.sqrt(total + read2) * rng.standard_normal(signal.shape, np.float32)
    smooth = ndimage.gaussian_filter(noisy, STANDIN_SMOOTH)
    z = smooth / (_gaussian_norm(STANDIN_SMOOTH) * np.sqrt(total - signal + read2))
    slope = (cfg.high - cfg.low) / (cfg.k_high - cfg.k_low)
    return np.clip(np.rint(cfg.low + (z - cfg.k_low) * slope), 0, 255).astype(np.uint8)


def _gaussian_norm(sigma: float) -> float:
    """L2 norm of the 3-D kernel of ``ndimage.gaussian_filter`` with ``sigma`` (voxels).

    >>> round(_gaussian_norm(1.0), 4)
    0.1499
    """
    n = 2 * int(4 * sigma + 0.5) + 3
    impulse = np.zeros((n, n, n))
    impulse[n // 2, n // 2, n // 2] = 1.0
    return float(np.sqrt((ndimage.gaussian_filter(impulse, sigma) ** 2).sum()))


def rendered_signal(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Expected neurite signal photons and all expected photons of a rendered scene (noise free).

    Uses ``synth``'s private ``_photons`` and ``_background`` (the same arrays ``render``
    draws its noise from).
    """
    bounds = [(0, n) for n in scene.shape]
    photons, _ = synth._photons(scene, bounds)
    signal = np.clip(photons - synth._background(scene, bounds), 0, None)
    return signal, photons


def op_gold_mask(gold: SWC, shape: tuple[int, ...]) -> np.ndarray:
    """Voxels within ``OP_GOLD_TUBE`` xy voxels of an OP gold centreline (the renderer's label mask)."""
    voxel = np.asarray(OP_VOXEL)
    tube = SWC.from_arrays(gold.zyx * voxel, gold.parent_index, radius=OP_GOLD_TUBE * voxel[2], types=3)
    _, mask = render(scene_from_morphologies([tube], shape, SynthConfig(voxel_size=OP_VOXEL, bits=8)))
    return mask > 0


# --------------------------------------------------------------------------- cases


def op_cases(numbers: list[int], intensities: tuple[float, ...], standin_seed: int = 0) -> Iterator[Case]:
    """The DIADEM OP cases; ``standin_seed`` offsets the stand-in map's noise seed (held-out draws)."""
    folder = SHARED / "diadem_op"
    for n in numbers:
        real = tifffile.imread(folder / "stacks" / f"OP_{n}.tif")
        gold = read_swc(folder / "gold" / f"OP_{n}.swc")
        weak_gold, weak_info = weak_subforest(gold, real, OP_VOXEL)  # the real, undimmed light
        mask = op_gold_mask(gold, real.shape)
        for j, intensity in enumerate(intensities):
            params = SynthConfig(seed=n)
            image = dim_real_image(real, intensity, params)
            photons = real.astype(np.float32) * np.float32(params.full_scale_photons / np.iinfo(real.dtype).max * intensity)
            signal, total = photons * mask, photons + params.background_photons
            standin = standin_probability(signal, total, params, [n + standin_seed, j])
            expected = standin_probability(signal, total, params, None)
            tuning = n == 1 and intensity in TUNING_INTENSITIES
            yield Case(f"OP_{n}", "OP", intensity, image, gold, OP_VOXEL, tuning=tuning, standin=standin,
                       expected=expected, weak_gold=weak_gold, weak_info=weak_info)  # fmt: skip


def rendered_cases(names: list[str], intensities: tuple[float, ...], random_seed: int = 5,
                   standin_seed: int = 0) -> Iterator[Case]:  # fmt: skip
    """Cells rendered from shared morphologies, or ``"random"``: a random neuron of ``random_seed``;
    ``standin_seed`` offsets the stand-in map's noise seed (other draws of the same cells)."""
    for i, name in enumerate(names):
        if name == "random":
            cell = random_morphology(random_seed)
        else:
            cell = load_morphology(SHARED / "morphologies" / name)
        for j, intensity in enumerate(intensities):
            params = SynthConfig(voxel_size=RENDER_VOXEL, intensity=intensity, seed=100 + i, margin=5.0)
            scene = scene_from_swc(cell, params)
            image, _ = render(scene)
            signal, total = rendered_signal(scene)
            standin = standin_probability(signal, total, params, [100 + i + standin_seed, j])
            expected = standin_probability(signal, total, params, None)
            weak_gold, weak_info = weak_subforest(scene.gold, signal, RENDER_VOXEL)
            tuning = i == 0 and intensity in TUNING_INTENSITIES
            yield Case(Path(name).stem, "rendered", intensity, image, scene.gold, RENDER_VOXEL, tuning=tuning,
                       standin=standin, expected=expected, weak_gold=weak_gold, weak_info=weak_info)  # fmt: skip


def results_json(doc: str, name: str) -> Path | None:
    """The ``--json`` output path of a script over the shared data (default ``results/NAME``),
    or None with a one-line error when ``../shared/data`` is missing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", type=Path, default=HERE / "results" / name)
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"error: {SHARED} is missing (the DIADEM stacks and morphologies)", file=sys.stderr)
        return None
    return args.json


def subtract_background(image: np.ndarray, voxel_size: tuple[float, float, float]) -> np.ndarray:
    """float32 image minus its Gaussian-smoothed (sigma BACKGROUND_UM) version, clipped at 0.

    Standard preprocessing before a global threshold: without it, low-frequency background
    above the threshold joins the neuron into one sponge-like mask.
    """
    data = image.astype(np.float32)
    background = ndimage.gaussian_filter(data, [BACKGROUND_UM / v for v in voxel_size])
    return np.clip(data - background, 0, None)


# --------------------------------------------------------------------------- methods


def _reply(command: list[str]) -> dict:
    """Run a tracer process; its last JSON line, or a failure status.

    The limit is ``PEER_TIMEOUT`` seconds of CPU time (every tracer here runs on one
    thread, so on an idle machine that is its wall time; on a shared one, other jobs do
    not push a run over it), with a wall-clock backstop of ``WALL_FACTOR`` times that.
    """
    # The soft CPU limit (ulimit -S -t) ends the process with SIGXCPU; exec keeps its exit status.
    limited = ["bash", "-c", f'ulimit -S -t {PEER_TIMEOUT}; exec "$@"', "cpu-limit", *command]
    try:
        done = subprocess.run(limited, capture_output=True, text=True, timeout=WALL_FACTOR * PEER_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: wall-clock timeout after {WALL_FACTOR * PEER_TIMEOUT} s"}
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return {"status": f"failed: timeout after {PEER_TIMEOUT} CPU s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"status": f"failed: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def peer(name: str) -> Callable[[Case, Path, float], dict]:
    """A peer tracer run by ``benchmarks/peers/run_peer.py`` in the ``.peers`` venv, on the peers' input."""

    def run(case: Case, out: Path, thr: float) -> dict:
        return _reply([str(PEER_PYTHON), str(RUN_PEER), name, str(case.peer_input), str(out), "--threshold",
                       f"{thr:.4f}", "--smooth", "1"])  # fmt: skip

    return run


def ours(method: str, checkpoint: Path | None = None) -> Callable[[Case, Path, float], dict]:
    """This project's tracer (``benchmarks/run_neurotrace.py``) with its own defaults.

    ``raw``: on the raw image; ``prob``: on the stand-in probability map; ``cnn``: on the
    raw image through ``checkpoint``'s network.
    """

    def run(case: Case, out: Path, thr: float) -> dict:
        image = case.standin_input if method == "prob" else case.raw_input
        extra = ["--checkpoint", str(checkpoint)] if method == "cnn" else []
        return _reply([sys.executable, str(RUN_OURS), method, str(image), str(out), "--voxel-size",
                       *map(str, case.voxel_size), *extra])  # fmt: skip

    return run


def default_checkpoint() -> Path | None:
    """The pipeline's shipped default checkpoint (``pipeline.default_checkpoint``), else the first
    ``checkpoints/*.json`` (sorted by name) that has its ``.safetensors``, if any."""
    try:
        from neurotrace_dask.pipeline import default_checkpoint as shipped

        found = shipped()
        if found is not None:
            return Path(found)
    except ImportError:
        pass
    pairs = [p for p in sorted(CHECKPOINTS.glob("*.json")) if p.with_suffix(".safetensors").is_file()]
    return pairs[0] if pairs else None


def cnn_method(checkpoint: Path) -> str:
    """The method name of the CNN path with one checkpoint: ``neurotrace-cnn:NAME``."""
    return f"neurotrace-cnn:{checkpoint.stem}"


def checkpoint_summary(checkpoint: Path) -> str:
    """One line on what a checkpoint was trained and validated on (from its metadata)."""
    try:
        meta = json.loads(checkpoint.read_text())
        training = meta.get("training", {})
        pool = training.get("data", {}).get("pool", {})
        sources = ", ".join(f"{k} {v}" for k, v in pool.get("by_source", {}).items())
        validation = ", ".join(v.get("name", "?") for v in training.get("validation", {}).get("volumes", []))
        return (f"{training.get('steps', '?')} steps on {pool.get('samples', '?')} samples ({sources}); "
                f"validated on {validation or 'n/a'}")  # fmt: skip
    except (OSError, ValueError, AttributeError) as exc:
        return f"metadata unreadable ({exc})"


def training_cases(method: str, cases: set[str]) -> list[str]:
    """The benchmark cases whose data were in a CNN method's training set (from its checkpoint's metadata).

    A case counts when its name is a training source (``OP_1``...) or a training sample is a
    render of the same morphology (pool names ``rNNN_<morphology>``).
    """
    if not method.startswith("neurotrace-cnn:"):
        return []
    path = CHECKPOINTS / f"{method.split(':', 1)[1]}.json"
    try:
        pool = json.loads(path.read_text())["training"]["data"]["pool"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    names = {n.split("_", 1)[1] if n[:1] == "r" and n[1:4].isdigit() else n for n in pool.get("names", [])}
    return sorted(c for c in cases if c in pool.get("by_source", {}) or c in names)


def available_methods(wanted: list[str], checkpoints: list[Path] | None = None) -> tuple[dict[str, Callable], dict[str, str]]:
    """The methods that can run here, and a note for each that cannot.

    ``neurotrace-cnn`` becomes one method ``neurotrace-cnn:NAME`` per checkpoint.
    """
    methods: dict[str, Callable] = {}
    notes: dict[str, str] = {}
    for name in wanted:
        if name == "neurotrace-cnn":
            if not checkpoints:
                notes[name] = "skipped: no checkpoint (none in checkpoints/*.json; pass --checkpoint)"
            for checkpoint in checkpoints or []:
                if not checkpoint.is_file():
                    notes[cnn_method(checkpoint)] = f"skipped: checkpoint {checkpoint} not found"
                else:
                    methods[cnn_method(checkpoint)] = ours("cnn", checkpoint)
        elif name in OURS:
            methods[name] = ours(OURS[name])
        elif name in PEERS:
            if not PEER_PYTHON.exists():
                notes[name] = "skipped: peers not installed (run `make peers`)"
            elif name == "app2" and not (shutil.which("app2") or shutil.which("vaa3d")):
                notes[name] = "skipped: no app2 or vaa3d executable on PATH"
            else:
                methods[name] = peer(name)
        else:
            notes[name] = "skipped: unknown method"
    return methods, notes


def prepare(case: Case, folder: Path) -> None:
    """Write the raw image, the stand-in map and the peers' input (background removed) once per
    case; note the latter's smoothed median and MAD. The arrays are then released."""
    stem = f"{case.name}_{case.intensity:g}"
    case.raw_input = folder / f"{stem}_raw.tif"
    tifffile.imwrite(case.raw_input, case.image)
    if case.standin is not None:
        case.standin_input = folder / f"{stem}_standin.tif"
        tifffile.imwrite(case.standin_input, case.standin)
    prepared = subtract_background(case.image, case.voxel_size)
    case.peer_input = folder / f"{stem}.tif"
    tifffile.imwrite(case.peer_input, prepared)
    smooth = ndimage.gaussian_filter(prepared, 1.0)
    median = float(np.median(smooth))
    case.median_mad = (median, float(np.median(np.abs(smooth - median))))
    case.image = case.standin = case.expected = None  # type: ignore[assignment]


def run_one(method: str, function: Callable, case: Case, k: float, folder: Path) -> Run:
    median, mad = case.median_mad
    thr = median + k * 1.4826 * mad
    stem = f"{case.name}_{case.intensity:g}_{method}_k{k:g}"
    out = folder / f"{stem}.swc"
    started = time.perf_counter()
    reply = function(case, out, thr)
    run = Run(method, case.name, case.series, case.intensity, k, thr, reply.get("status", "failed: no status"),
              reply.get("seconds", time.perf_counter() - started), reply.get("peak_rss_mb", math.nan),
              tuning=case.tuning)  # fmt: skip
    if run.status == "ok":
        try:
            test = read_swc(out)
        except Exception as exc:  # a peer's unreadable output is its failure, recorded
            run.status = f"failed: unreadable SWC ({exc})"
            return run
        result = evaluate(case.gold, test, voxel_size_zyx=case.voxel_size, tau=case.tau).to_dict()
        run.scores = result
        run.weak_recall = weak_recall(case.weak_gold, test, case.voxel_size, case.tau)
        root = neuron_at_root(test, case.gold, case.voxel_size)
        if root is not None:
            run.root_scores = evaluate(case.gold, root, voxel_size_zyx=case.voxel_size, tau=case.tau).to_dict()
            run.root_weak_recall = weak_recall(case.weak_gold, root, case.voxel_size, case.tau)
        run.tips, run.trees = count_tips(root), test.n_trees
    elif case.weak_gold is not None:
        run.weak_recall = run.root_weak_recall = 0.0
    run.gold_tips = count_tips(case.gold)
    return run


def _scores(scores: dict, failed: bool) -> tuple[float, float, float, float]:
    """Length F1, recall, precision and DIADEM of an ``evaluate(...).to_dict()``; 0 for a failed run,
    NaN where there are none (a report written before they were measured)."""
    if not scores:
        return (0.0,) * 4 if failed else (math.nan,) * 4
    length = scores["length"]
    return length["f1"], length["recall"], length["precision"], scores["diadem"]["score"]


def headline(run: Run) -> dict[str, float]:
    """The scores the tables show (0 for a failed run): length F1/recall/precision, DIADEM and weak-branch
    recall of the whole output, the same of the neuron at the gold root (``root_*``) and its tips over
    the gold's (``tips_ratio``, NaN for a failed run: there is no neuron to count).

    Examples
    --------
    >>> run = Run("m", "c", "OP", 1.0, math.nan, math.nan, "failed: exit 1", weak_recall=0.0)
    >>> h = headline(run); h["f1"], h["root_f1"], h["tips_ratio"]
    (0.0, 0.0, nan)
    """
    f1, recall, precision, diadem = _scores(run.scores, failed=True)
    root_f1, root_recall, root_precision, root_diadem = _scores(run.root_scores, failed=run.status != "ok")
    known = math.isfinite(run.tips) and math.isfinite(run.gold_tips) and run.gold_tips > 0
    return {"f1": f1, "recall": recall, "precision": precision, "diadem": diadem, "weak_recall": run.weak_recall,
            "root_f1": root_f1, "root_recall": root_recall, "root_precision": root_precision,
            "root_diadem": root_diadem, "root_weak_recall": run.root_weak_recall,
            "tips_ratio": run.tips / run.gold_tips if known else math.nan}  # fmt: skip


# --------------------------------------------------------------------------- report

SUMMARIES = (("f1", "Mean length F1", "mean"),
             ("weak_recall", "Mean weak-branch recall (dimmest third of the gold branches)", "mean"),
             ("precision", "Mean length precision", "mean"), ("diadem", "Mean DIADEM score", "mean"))  # fmt: skip
# The neuron a user gets (neuron_at_root); the tips ratio by its median: one shattered case
# (hundreds of tips) would otherwise swamp the mean.
ROOT_SUMMARIES = (("root_f1", "Neuron at the gold root: mean length F1", "mean"),
                  ("root_precision", "Neuron at the gold root: mean length precision", "mean"),
                  ("root_diadem", "Neuron at the gold root: mean DIADEM score", "mean"),
                  ("tips_ratio", "Tips of the neuron at the root / gold tips (median)", "median"))  # fmt: skip
# The targets for that neuron, per (series, intensity): a minimum root length F1, and on OP a
# maximum median tips ratio (OP precision stays capped by fibres the gold does not trace), on rendered
# cells a minimum root length precision.
ROOT_TARGETS: dict[tuple[str, float], dict[str, float]] = {
    **{("OP", i): {"root_f1": 0.90, "tips_ratio": 1.5} for i in INTENSITIES},
    ("rendered", 1.0): {"root_f1": 0.90, "root_precision": 0.9},
    ("rendered", 0.25): {"root_f1": 0.80, "root_precision": 0.9},
    ("rendered", 0.125): {"root_f1": 0.60, "root_precision": 0.9},
}


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _count(value: float) -> str:
    """A count that may be missing (NaN or None): ``n/a``."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{int(value)}"


def means(runs: list[Run], key: str, intensities: tuple[float, ...] = INTENSITIES,
          statistic: str = "mean") -> Iterator[tuple[str, str, list[float]]]:  # fmt: skip
    """Mean (or ``statistic="median"``) of ``headline(run)[key]`` per method and series, one value per
    intensity; NaN values are left out (NaN: none left)."""
    reduce = {"mean": np.mean, "median": np.median}[statistic]
    for method in sorted({r.method for r in runs}):
        for series in ("OP", "rendered"):
            values = []
            for intensity in intensities:
                chosen = [headline(r)[key] for r in runs if (r.method, r.series, r.intensity) == (method, series, intensity)]
                chosen = [v for v in chosen if not math.isnan(v)]
                values.append(float(reduce(chosen)) if chosen else math.nan)
            if not all(math.isnan(v) for v in values):
                yield method, series, values


def target_rows(runs: list[Run]) -> list[dict]:
    """Per method and series at ``TARGET_INTENSITY``: mean F1, weak recall and precision, and the verdict."""
    rows = []
    for method in sorted({r.method for r in runs}):
        for series in ("OP", "rendered"):
            mine = [headline(r) for r in runs if (r.method, r.series, r.intensity) == (method, series, TARGET_INTENSITY)]
            if not mine:
                continue
            f1 = float(np.mean([h["f1"] for h in mine]))
            weak = [h["weak_recall"] for h in mine if not math.isnan(h["weak_recall"])]
            weak_mean = float(np.mean(weak)) if weak else math.nan
            precision = float(np.mean([h["precision"] for h in mine]))
            precise = sum(h["precision"] >= TARGET_PRECISION for h in mine)
            rows.append({"method": method, "series": series, "cases": len(mine), "f1": f1, "weak_recall": weak_mean,
                         "precision": precision, "cases_precision_ok": int(precise),
                         "precision_ok": precision >= TARGET_PRECISION,
                         "target_met": f1 >= TARGET_F1 and weak_mean >= TARGET_WEAK_RECALL and precision >= TARGET_PRECISION})  # fmt: skip
    return rows


def root_target_rows(runs: list[Run]) -> list[dict]:
    """Per method, series and intensity with a target in ``ROOT_TARGETS``: the neuron at the gold root's
    mean length F1 and precision, its median tips ratio, and the verdict.

    Examples
    --------
    >>> ok = dict(status="ok", root_scores={"length": {"f1": 0.95, "recall": 0.9, "precision": 0.99},
    ...           "diadem": {"score": 0.8}}, gold_tips=10)
    >>> runs = [Run("m", "OP_1", "OP", 1.0, math.nan, math.nan, tips=t, **ok) for t in (12, 14, 30)]
    >>> row = root_target_rows(runs)[0]
    >>> round(row["root_f1"], 3), row["tips_ratio"], row["target_met"]  # tips: median of 1.2, 1.4, 3.0
    (0.95, 1.4, True)
    """
    rows = []
    for method in sorted({r.method for r in runs}):
        for (series, intensity), target in ROOT_TARGETS.items():
            mine = [headline(r) for r in runs if (r.method, r.series, r.intensity) == (method, series, intensity)]
            if not mine:
                continue
            row: dict = {"method": method, "series": series, "intensity": intensity, "cases": len(mine),
                         "target": target}  # fmt: skip
            for key in ("root_f1", "root_precision"):
                values = [h[key] for h in mine if not math.isnan(h[key])]
                row[key] = float(np.mean(values)) if values else math.nan
            ratios = [h["tips_ratio"] for h in mine if not math.isnan(h["tips_ratio"])]
            row["tips_ratio"] = float(np.median(ratios)) if ratios else math.nan
            # NaN compares False: an unmeasured score never meets a target.
            row["target_met"] = all(row[k] <= v if k == "tips_ratio" else row[k] >= v for k, v in target.items())
            rows.append(row)
    return rows


def _target_text(target: dict[str, float]) -> str:
    """``{"root_f1": 0.9, "tips_ratio": 1.5}`` as ``F1 >= 0.90, tips ratio <= 1.5``."""
    words = {"root_f1": "F1 >= {:.2f}", "root_precision": "precision >= {:.2f}", "tips_ratio": "tips ratio <= {:g}"}
    return ", ".join(words[k].format(v) for k, v in target.items())


def series_tables(runs: list[Run], summaries: tuple[tuple[str, str, str], ...],
                  intensities: tuple[float, ...] = INTENSITIES) -> list[str]:  # fmt: skip
    """Markdown lines: per ``(key, title, statistic)`` of ``summaries``, a table of it by method, series and intensity."""
    lines: list[str] = []
    for key, title, statistic in summaries:
        lines += ["", f"{title} by series and intensity:", "", "| method | series | " +
                  " | ".join(f"{i:g}" for i in intensities) + " |", "|---|---|" + "---|" * len(intensities)]  # fmt: skip
        for method, series, values in means(runs, key, intensities, statistic):
            lines.append(f"| {method} | {series} | " + " | ".join(_fmt(v) for v in values) + " |")
    return lines


def markdown(runs: list[Run], chosen_k: dict[str, float], notes: dict[str, str], weak: dict[str, dict],
             intensities: tuple[float, ...] = INTENSITIES, cnn: dict[str, str] | None = None) -> str:  # fmt: skip
    lines = ["# Weak-neurite accuracy benchmark", "",
             f"tau = {TAU_XY_VOXELS} xy voxels; peers get the image minus a {BACKGROUND_UM:g} um Gaussian background; "
             "threshold = median + k * 1.4826 * MAD of that, smoothed (sigma 1 voxel); "
             f"k from {K_CHOICES} tuned per method and series on the tuning cases (marked *) at intensities "
             f"{TUNING_INTENSITIES}; a run over {PEER_TIMEOUT} CPU seconds counts as failed.", ""]  # fmt: skip
    for method_series, k in chosen_k.items():
        lines.append(f"- {method_series}: k = {k:g}")
    ran = {r.method for r in runs}
    if "neurotrace-raw" in ran:
        lines.append("- neurotrace-raw: voxel scooping on the raw image, the package's defaults (no per-benchmark tuning)")
    if "neurotrace-standin" in ran:
        lines.append(
            "- neurotrace-standin: voxel scooping (package defaults) on a **stand-in probability map made from the "
            "gold standard, not a CNN**: z = G * (S + sqrt(T + r^2) e) / (|G| sqrt(T - S + r^2)), p = clip(round(16 z), "
            "0, 255), with S the gold neurites' expected signal photons (brightness-weighted label mask, PSF-blurred, "
            f"times the intensity; on OP the real dimmed light inside {OP_GOLD_TUBE:g}-voxel tubes around the gold), "
            "T all expected photons in the voxel, r the read noise, e white unit Gaussian noise, G a Gaussian of "
            "sigma 1 voxel with L2 norm |G|: the neurite's own light plus the image's noise, smoothed and scaled "
            "exactly as `raw_to_probability` does (4 noise units -> 64 = low, 8 -> 128 = high), with no background "
            "and no fibres the gold does not trace. An upper-bound-ish sanity check of the tracer on a probability "
            "map, not a result of this project's CNN.")  # fmt: skip
    for method, about in sorted((cnn or {}).items()):
        if method in ran:
            lines.append(f"- {method}: `predict_array` (default prediction settings, no rescaling to the checkpoint's "
                         f"voxel size), then voxel scooping (package defaults); checkpoint {about}")  # fmt: skip
    for method, note in notes.items():
        lines.append(f"- {method}: {note}")
    lines += ["", "Weak branches: the dimmest third (by number) of each case's gold branches (unbranched sections "
              "between root/branch points and branch points/tips), ranked by the mean, along the centreline, of the "
              "brightest voxel within one voxel after a Gaussian smoothing of sigma 1 voxel: on the renderer's noise-free signal (rendered) or the real undimmed "
              "stack (OP). Weak-branch recall: the share of their cable within tau of the reconstruction.", "",
              "| case | branches | weak | weak cable um | gold cable um |", "|---|---|---|---|---|"]  # fmt: skip
    for name, info in weak.items():
        lines.append(f"| {name} | {info['branches']} | {info['weak_branches']} | {info['weak_length_um']:.0f} | "
                     f"{info['gold_length_um']:.0f} |")  # fmt: skip
    lines += ["", f"## At intensity {TARGET_INTENSITY:g}: the issue's target (length F1 >= {TARGET_F1}, weak-branch "
              f"recall >= {TARGET_WEAK_RECALL} at precision >= {TARGET_PRECISION})", "",
              "OP precision is capped for every method: the stacks hold fibres the gold does not trace.", "",
              "| method | series | cases | mean length F1 | mean weak recall | mean precision | precision >= 0.95 "
              "| cases with precision >= 0.95 | target met |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in target_rows(runs):
        lines.append(f"| {row['method']} | {row['series']} | {row['cases']} | {_fmt(row['f1'])} | "
                     f"{_fmt(row['weak_recall'])} | {_fmt(row['precision'])} | {'yes' if row['precision_ok'] else 'no'} | "
                     f"{row['cases_precision_ok']} | {'yes' if row['target_met'] else 'no'} |")  # fmt: skip
    lines += series_tables(runs, SUMMARIES, intensities)
    lines += ["", "## The neuron a user gets: the output tree nearest the gold's root", "",
              "The tables above score the whole output, every tree pooled. A user who picks the traced cell keeps "
              "one tree: the one holding the output node nearest (in um) to the gold's root (of its longest tree). "
              "Below, that tree alone against the whole gold (same tau), and its tips over the gold's (median "
              "across cases; failed runs left out). The issue's targets for it (column target): mean length F1, "
              "with on OP the median tips ratio (OP precision is capped by fibres the gold does not trace) and on "
              "rendered cells the mean length precision.", "",
              "| method | series | intensity | cases | target | root length F1 | root precision | tips ratio (median) "
              "| target met |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in root_target_rows(runs):
        lines.append(f"| {row['method']} | {row['series']} | {row['intensity']:g} | {row['cases']} | "
                     f"{_target_text(row['target'])} | {_fmt(row['root_f1'])} | {_fmt(row['root_precision'])} | "
                     f"{_fmt(row['tips_ratio'])} | {'yes' if row['target_met'] else 'no'} |")  # fmt: skip
    lines += series_tables(runs, ROOT_SUMMARIES, intensities)
    marks = {m: set(training_cases(m, {r.case for r in runs})) for m in ran}
    for method, seen in sorted(marks.items()):
        if seen:
            lines.append(f"- {method}: its training data held crops or renders of {', '.join(sorted(seen))} "
                         "(marked + below): those are not held-out cases for it")  # fmt: skip
    lines += ["", "## Every run", "",
              "Root: the output tree nearest the gold's root (see above); tips: its tips / the gold's; trees: in the "
              "whole output.", "",
              "| method | case | intensity | length F1 | recall | precision | P >= 0.95 | weak recall | DIADEM | root F1 "
              "| root P | tips (gold) | trees | seconds | peak RSS MB | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(runs, key=lambda r: (r.method, r.series, r.case, -r.intensity)):
        h = headline(r)
        star = ("*" if r.tuning else "") + ("+" if r.case in marks.get(r.method, ()) else "")
        lines.append(f"| {r.method} | {r.case}{star} | {r.intensity:g} | {h['f1']:.3f} | {h['recall']:.3f} | "
                     f"{h['precision']:.3f} | {'yes' if h['precision'] >= TARGET_PRECISION else 'no'} | "
                     f"{_fmt(h['weak_recall'])} | {h['diadem']:.3f} | {_fmt(h['root_f1'])} | "
                     f"{_fmt(h['root_precision'])} | {_count(r.tips)} ({_count(r.gold_tips)}) | {_count(r.trees)} | "
                     f"{r.seconds:.1f} | {r.peak_rss_mb:.0f} | {r.status} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def figure(runs: list[Run], path: Path, intensities: tuple[float, ...] = INTENSITIES) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8), sharey=True)
    for row, key in enumerate(("f1", "weak_recall")):
        for method, series, values in means(runs, key, intensities):
            ax = axes[row, 0 if series == "OP" else 1]
            style = "--" if method == "neurotrace-standin" else "-"
            label = f"{method} (stand-in map, not a CNN)" if method == "neurotrace-standin" else method
            ax.plot(intensities, values, style, marker="o", label=label)
    for row, ylabel in enumerate((f"length F1 (tau = {TAU_XY_VOXELS} xy voxels)", "weak-branch recall")):
        for ax, title in zip(axes[row], ("DIADEM OP (real, dimmed)", "rendered morphologies")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(intensities, [f"{i:g}" for i in intensities])
            ax.set_xlabel("signal intensity")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylabel(ylabel)
    axes[0, 0].set_ylim(0, 1)
    axes[0, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _finite(value):
    """The report with NaN as null (valid JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.bool_, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _git(*args: str) -> str:
    """Output of a git command in the repository ('' when git is not there)."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _run_from_dict(d: dict) -> Run:
    """A :class:`Run` back from the JSON report (null numbers become NaN)."""
    floats = ("k", "threshold", "seconds", "peak_rss_mb", "intensity", "weak_recall", "root_weak_recall", "tips",
              "gold_tips", "trees")  # fmt: skip
    # Keys missing from an older report take the dataclass defaults (empty root scores, NaN counts).
    return Run(**{k: (math.nan if k in floats and v is None else v) for k, v in d.items()})


def code_state() -> dict[str, object]:
    """The git commit the benchmark ran on and the tracked files modified in the working tree."""
    return {"commit": _git("rev-parse", "HEAD"), "modified": _git("diff", "--name-only", "HEAD").splitlines()}


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description="Weak-neurite accuracy benchmark.")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--quick", action="store_true", help="OP_5 and one rendered cell at intensities 1 and 0.25")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (timings are noisier above 1)")
    parser.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                        help="network(s) for neurotrace-cnn, one method each (default: the pipeline's shipped "
                             "checkpoint, else the first checkpoints/*.json; none: skipped)")  # fmt: skip
    parser.add_argument("--merge", type=Path, default=None,
                        help="a previous full report (accuracy.json): keep its runs of the methods not run now")
    parser.add_argument("--k-from", type=Path, default=None,
                        help="reuse the k chosen by a previous run (its accuracy.json) instead of tuning again")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} not found (the shared DIADEM data and morphologies)", file=sys.stderr)
        return 0
    found = default_checkpoint()
    checkpoints = args.checkpoint or ([found] if found else [])
    # Read before the results are overwritten.
    previous_k = json.loads(args.k_from.read_text()) if args.k_from is not None else {}
    merged = json.loads(args.merge.read_text()) if args.merge is not None else None
    methods, notes = available_methods(args.methods.split(","), checkpoints)
    cnn = {cnn_method(c): f"{c}: {checkpoint_summary(c)}" for c in checkpoints if cnn_method(c) in methods}
    for name, note in notes.items():
        print(f"{name}: {note}", file=sys.stderr)
    intensities = (1.0, 0.25) if args.quick else INTENSITIES
    numbers = [5] if args.quick else [1, 2, 3, 4, 5]
    names = ["nmo_swcvis_granule.swc"] if args.quick else [*MORPHOLOGIES, "random"]
    runs: list[Run] = []
    chosen_k: dict[str, float] = {}
    weak: dict[str, dict] = {}
    started = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="neurotrace-accuracy-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        folder = Path(tmp)
        cases = []
        for case in [*op_cases(numbers, intensities), *rendered_cases(names, intensities)]:
            if args.quick:
                case.tuning = case.intensity == 1.0
            prepare(case, folder)
            weak.setdefault(case.name, case.weak_info)
            cases.append(case)
        print(f"{len(cases)} cases x {len(methods)} methods (prepared in {time.perf_counter() - started:.0f} s)",
              file=sys.stderr)  # fmt: skip

        def one(job: tuple[str, Case, float]) -> Run:
            r = run_one(job[0], methods[job[0]], job[1], job[2], folder)
            h = headline(r)
            print(f"{r.method:18} {r.case:24} {r.intensity:<6g} k={r.k:<3g} F1={h['f1']:.3f} P={h['precision']:.3f} "
                  f"weak={_fmt(h['weak_recall'])} rootF1={_fmt(h['root_f1'])} rootP={_fmt(h['root_precision'])} "
                  f"tips={_count(r.tips)}/{_count(r.gold_tips)} trees={_count(r.trees)} {r.seconds:7.1f} s  "
                  f"{r.status}", file=sys.stderr, flush=True)  # fmt: skip
            return r

        def go(jobs: list[tuple[str, Case, float]]) -> list[Run]:
            return list(pool.map(one, jobs))

        tuning = [c for c in cases if c.tuning]
        tuned = [m for m in methods if m in PEERS]
        if args.k_from is not None:  # the k a previous run's tuning chose: run every case once at it
            chosen_k.update(previous_k["chosen_k"])
            runs += go([(m, c, chosen_k[f"{m} {c.series}"]) for m in tuned for c in cases])
        else:
            trials = go([(m, c, k) for m in tuned for k in K_CHOICES for c in tuning])
            for method in tuned:
                for series in ("OP", "rendered"):
                    mine = [r for r in trials if (r.method, r.series) == (method, series)]
                    if not mine:
                        continue
                    scores = {k: np.mean([headline(r)["f1"] for r in mine if r.k == k]) for k in K_CHOICES}
                    chosen_k[f"{method} {series}"] = k = max(K_CHOICES, key=lambda k: (scores[k], -k))
                    runs += [r for r in mine if r.k == k]
            runs += go([(m, c, chosen_k[f"{m} {c.series}"]) for m in tuned for c in cases if not c.tuning])
        runs += go([(m, c, math.nan) for m in methods if m not in PEERS for c in cases])
    merged_from = None
    if merged is not None:
        kept = [d for d in merged["runs"] if d["method"] not in methods]
        runs = [_run_from_dict(d) for d in kept] + runs
        chosen_k = {**merged.get("chosen_k", {}), **chosen_k}
        ran_now = set(methods) | ({"neurotrace-cnn"} if cnn else set())
        notes = {**{k: v for k, v in merged.get("notes", {}).items() if k not in ran_now}, **notes}
        cnn = {**merged.get("cnn", {}), **cnn}
        merged_from = {"path": str(args.merge), "methods": sorted({d["method"] for d in kept}),
                       "code": merged.get("code"), "wall_seconds": merged.get("wall_seconds"),
                       "load_average_start_end": merged.get("load_average_start_end")}  # fmt: skip
        notes["merged"] = (f"runs of {', '.join(merged_from['methods'])} kept from earlier runs of this benchmark "
                           f"(through the report written at commit {(merged.get('code') or {}).get('commit', '?')[:7]}); "
                           "the others run now")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {key: [{"method": m, "series": s, "means": dict(zip(map(str, intensities), v))}
                     for m, s, v in means(runs, key, intensities)] for key, _, _ in SUMMARIES}  # fmt: skip
    summary.update({key: [{"method": m, "series": s, statistic: dict(zip(map(str, intensities), v))}
                          for m, s, v in means(runs, key, intensities, statistic)]
                    for key, _, statistic in ROOT_SUMMARIES})  # fmt: skip
    k_from = None
    if args.k_from is not None:
        previous = previous_k.get("code", {}).get("commit") or _git("log", "-1", "--format=%h", "--", str(args.k_from))
        k_from = f"{args.k_from} as of commit {previous or 'unknown'}"
        notes["k"] = f"k not tuned again: taken from the tuning of a previous run, {k_from}"
    report = {"tau_xy_voxels": TAU_XY_VOXELS, "k_choices": K_CHOICES, "chosen_k": chosen_k, "k_from": k_from,
              "notes": notes, "load_average_start_end": [load_start, os.getloadavg()],
              "intensities": intensities, "cnn": cnn, "merged_from": merged_from,
              "cnn_training_cases": {m: training_cases(m, {r.case for r in runs}) for m in sorted({r.method for r in runs})
                                     if m.startswith("neurotrace-cnn:")},
              "standin": {"formula": "z = G * (S + sqrt(T + r^2) e) / (|G| sqrt(T - S + r^2)); p = clip(round(16 z), 0, 255)",
                          "smooth_sigma_voxels": STANDIN_SMOOTH,
                          "op_gold_tube_xy_voxels": OP_GOLD_TUBE, "note": "made from the gold standard: not a CNN"},
              "weak_branches": {"fraction": WEAK_FRACTION, "per_case": weak},
              "target": {"intensity": TARGET_INTENSITY, "f1": TARGET_F1, "weak_recall": TARGET_WEAK_RECALL,
                         "precision": TARGET_PRECISION, "rows": target_rows(runs)},
              "root_target": {"neuron": "the output tree nearest the gold's root (of its longest tree), in um",
                              "targets": [{"series": s, "intensity": i, **t} for (s, i), t in ROOT_TARGETS.items()],
                              "rows": root_target_rows(runs)},
              "summary": summary, "code": code_state(), "wall_seconds": time.perf_counter() - started,
              "runs": [r.__dict__ for r in runs]}  # fmt: skip
    stem = "accuracy_quick" if args.quick else "accuracy"
    (args.out / f"{stem}.json").write_text(json.dumps(_finite(report), indent=1, allow_nan=False))
    text = markdown(runs, chosen_k, notes, weak, intensities, cnn)
    (args.out / f"{stem}.md").write_text(text)
    figure(runs, args.out / f"{stem}.png", intensities)
    print(text)
    print(f"wrote {args.out / stem}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
