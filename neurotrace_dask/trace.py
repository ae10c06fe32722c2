"""Voxel-scooping tracer for one block of a probability map (Rodriguez et al. 2009).

:func:`trace_block` turns a uint8 neurite probability block (0-255) into
:class:`Fragments`: a graph of nodes with radii, confidence and the bridged gaps. It is a
pure function on a numpy block; Dask, files and the CLI live elsewhere.

How it works
------------
1. **Foreground**: every 26-connected component of ``prob >= low``; those holding a voxel
   ``>= high`` are *active*. Hysteresis is applied after bridging (step 5): dim stretches
   attached to a bright neurite, directly or by a bridged gap, survive; isolated dim
   stretches do not. (``bridge_dim=False``: classic hysteresis, for raw images.)
2. **Seeds**, in priority order: somata (maxima of the Euclidean distance transform,
   in um, deeper than ``soma_radius``), the given ``seeds``, then one seed per
   foreground component not reached yet (its deepest voxel).
3. **Scooping** (numba): every seed starts a front. A front repeatedly takes the
   unvisited foreground voxels 26-adjacent to its current cluster (the next layer) and
   splits them into 26-connected clusters. Two or more clusters make a branch point
   (the children hang from the front's last node, at most one scooping distance back:
   no extra node, so no kink); none makes a tip (a node at the cluster's centroid). All
   fronts advance one layer per round, so several seeds share a component fairly.
   *Scooping distance*: a front emits a node only once its cluster centroid ``c`` is
   ``scoop * 2 * r`` away from the last node ``p`` (``r``: the cluster's own
   radius, from the distance transform, at least one voxel) -- so there is one node
   per roughly radius-length step, following the local cross-section, not one per
   voxel layer. The node is placed by the size-ratio rule
   ``n = p + 0.5 ** (min(s, sp) / max(s, sp)) * (c - p)`` (``s`` the cluster size,
   ``sp`` the size at the last node): half-way when sizes agree, at the centroid when
   they change sharply (leaving a soma, a partial cross-section at a branch).
   Each voxel is visited once: linear in foreground voxels.
4. **Spur pruning**: terminal branches whose cable outside the footprint of the rest of
   the tree (the balls of its nodes' radii) is shorter than ``spur_factor`` times the
   local diameter at their branch point are removed; then fragments shorter than
   ``min_length`` um without a soma are dropped.
5. **Gap bridging**: a tip links to the nearest node of another fragment within
   ``bridge_distance`` um when the bridge turns less than ``bridge_angle`` degrees from
   the tip's direction (and from the other tip's, if it links to a tip) and the mean
   probability sampled along the straight bridge is ``>= bridge_min_mean``; two tips
   pointing at each other may link across ``bridge_facing_distance`` um at a mean of
   ``bridge_facing_min_mean`` (a neurite broken in two). Every bridge that stays is
   recorded for review. Then fragments with no active node are dropped, except
   near a shared block face (the stitch decides those, after bridging across the face).
6. **Tip extension** (:func:`extend_tips`, on for probability maps): from each tip a march
   follows the probability ridge beyond the foreground, below ``low``, and is kept when its
   mean probability reaches ``extend_min_mean`` over at least 5 um: a dim neurite's
   continuation, too faint voxel by voxel, clear along its course. A march that reaches
   another fragment joins it at a mean of ``extend_link_min_mean``.
7. **Smoothing**: a 3-node moving average along paths (ends and branch points fixed).

Examples
--------
>>> prob = np.zeros((9, 9, 40), np.uint8)
>>> prob[3:6, 3:6, 4:36] = 200
>>> frags = trace_block(prob)
>>> frags.to_swc().n_trees, frags.n_nodes > 5
(1, True)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cc3d
import edt
import numba
import numpy as np
import numpy.typing as npt
import zarr
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree
from scipy.spatial import cKDTree

from .blocks import Block, BlockGrid, DoneMarkers, layout_hash
from .cluster import open_client, run_tasks
from .config import ClusterConfig, TraceConfig
from .errors import InputError, OutputError, storage_error
from .io.swc import SWC

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["BRIDGE_DTYPE", "Fragments", "TraceResult", "block_faces", "bridge_tips", "extend_tips", "gap_mean",
           "hysteresis", "line_voxels", "measure_noise", "raw_to_probability", "read_seeds", "trace_block",
           "trace_grid_block", "trace_volume"]

Float3 = tuple[float, float, float]

#: Fields of :attr:`Fragments.bridges`: the gap's midpoint (voxels), length and mean probability (0-255).
BRIDGE_DTYPE = np.dtype([("z", "f8"), ("y", "f8"), ("x", "f8"), ("length_um", "f8"), ("mean_probability", "f8")])

#: Below this fill, a mask is handled as a list of its voxels rather than swept whole: the
#: distance transform searches from the foreground's voxels (about 2 us each) instead of
#: sweeping its box (about 30 ns per voxel; the two cost the same near 1.5% on tubes and
#: spheres), and components and boxes come from the voxels too.
SPARSE_FILL = 0.01


def _exact_spacing(voxel: Sequence[float]) -> bool:
    """Whether voxel edges are small binary fractions (0.25, 0.5, 0.75, 1, 1.5, 2.5 um...).

    Then squared distances are exact in float32 and the shell search gives edt's values bit
    for bit. Otherwise (0.3, 0.33 um...) the two round differently in the last bit, and a
    soma seen by two blocks that took different paths could get two different centres:
    such voxel sizes always use edt.
    """
    units = [float(v) * 256 for v in voxel]
    return all(u == int(u) and int(u) // (int(u) & -int(u)) <= 7 for u in units if u > 0)


@dataclass(eq=False)
class Fragments:
    """Traced neurite graph of one block.

    Attributes
    ----------
    positions : (n, 3) float64
        Node positions ``z, y, x`` in voxels (global when the block had an ``origin``).
    radius : (n,) float64
        Radii in um (from the distance transform of the foreground).
    confidence : (n,) float64
        Mean probability of the 3x3x3 voxels around each node, divided by 255.
    edges : (m, 2) int64
        Undirected edges as pairs of node rows.
    on_face : (n,) bool
        Node lies within one voxel of a face of the block (for stitching).
    soma : (n,) bool
        Node is a soma centre.
    bridges : structured array of :data:`BRIDGE_DTYPE`
        The gaps that bridging closed (midpoint, length in um, mean probability 0-255).
    voxel_size : (z, y, x)
        Voxel size in um.
    port : (n,) bool
        Node is a port: a voxel on a face shared with a neighbouring block, where the
        neighbour's fragments join (same global integer position on both sides).
    active : (n,) bool
        Node's fragment (its foreground components, joined by bridges) holds a voxel
        ``>= high`` in this block's view. Inactive fragments (dim, near a shared face) are
        kept only if the stitch joins them to an active one: hysteresis across blocks.
    seed : (n,) bool
        Node was grown from a user's seed: its tree is rooted there and always kept.
    """

    positions: np.ndarray
    radius: np.ndarray
    confidence: np.ndarray
    edges: np.ndarray
    on_face: np.ndarray
    soma: np.ndarray
    bridges: np.ndarray = field(default_factory=lambda: np.zeros(0, BRIDGE_DTYPE))
    voxel_size: Float3 = (1.0, 1.0, 1.0)
    port: np.ndarray = None  # type: ignore[assignment]  # filled in __post_init__
    active: np.ndarray = None  # type: ignore[assignment]
    seed: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.port is None:
            self.port = np.zeros(self.positions.shape[0], bool)
        if self.active is None:
            self.active = np.ones(self.positions.shape[0], bool)
        if self.seed is None:
            self.seed = np.zeros(self.positions.shape[0], bool)

    def save(self, path: str | Path) -> None:
        """Write the record as ``.npz`` (no pickles), atomically: a temporary file renamed.

        Examples
        --------
        >>> import tempfile, os
        >>> prob = np.zeros((9, 9, 30), np.uint8); prob[3:6, 3:6, 3:27] = 200
        >>> path = os.path.join(tempfile.mkdtemp(), "0.npz")
        >>> trace_block(prob).save(path); Fragments.load(path).n_nodes == trace_block(prob).n_nodes
        True
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, positions=self.positions, radius=self.radius, confidence=self.confidence, edges=self.edges,
                 on_face=self.on_face, soma=self.soma, port=self.port, active=self.active, seed=self.seed,
                 bridges=self.bridges, voxel_size=np.asarray(self.voxel_size, np.float64))  # fmt: skip
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Fragments:
        """Read a record written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as f:
            fields = {k: f[k] for k in f.files}
        fields["voxel_size"] = tuple(float(v) for v in fields["voxel_size"])
        return cls(**fields)

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return int(self.positions.shape[0])

    def to_dict(self) -> dict[str, object]:
        """Plain summary numbers (nodes, edges, trees, somata, bridges)."""
        return {
            "nodes": self.n_nodes,
            "edges": int(self.edges.shape[0]),
            "trees": _n_components(self.n_nodes, self.edges),
            "somata": int(self.soma.sum()),
            "bridges": int(self.bridges.shape[0]),
        }

    def to_swc(self) -> SWC:
        """The fragments as an SWC forest in voxel coordinates.

        Each connected component becomes one tree, rooted at its seed node when it has one
        (a user's seed), else at its soma node (the largest), else at an end node. Cycles (possible after stitching) are
        broken by keeping a minimum spanning tree of the edge lengths. Types are 1 for
        soma nodes, 3 otherwise; radii are in in-plane (x) voxels, as in ``synth``'s gold.

        Examples
        --------
        >>> prob = np.zeros((9, 9, 30), np.uint8); prob[3:6, 3:6, 3:27] = 200
        >>> swc = trace_block(prob).to_swc()
        >>> swc.n_trees, int(swc.types[0])
        (1, 3)
        """
        n = self.n_nodes
        if n == 0:
            raise ValueError("no nodes to write")
        e = self.edges.reshape(-1, 2)
        voxel = np.asarray(self.voxel_size, float)
        if e.shape[0]:
            w = np.linalg.norm((self.positions[e[:, 0]] - self.positions[e[:, 1]]) * voxel, axis=1) + 1e-6
            graph = coo_matrix((w, (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()
            graph = minimum_spanning_tree(graph + graph.T)
            graph = (graph + graph.T).tocsr()
        else:
            graph = coo_matrix((n, n)).tocsr()
        _, labels = connected_components(graph, directed=False)
        degree = np.diff(graph.indptr)
        parent = np.full(n, -1, np.int64)
        order_all = []
        for comp in np.unique(labels):
            members = np.flatnonzero(labels == comp)
            somata = members[self.soma[members]]
            seeded = members[self.seed[members]]
            if seeded.size:
                root = int(seeded[0])
            elif somata.size:
                root = int(somata[np.argmax(self.radius[somata])])
            else:
                ends = members[degree[members] <= 1]
                root = int(ends[0] if ends.size else members[0])
            order, pred = breadth_first_order(graph, root, directed=False)
            parent[order[1:]] = pred[order[1:]]
            order_all.append(order)
        order = np.concatenate(order_all)
        row = np.empty(n, np.int64)
        row[order] = np.arange(n)
        pidx = np.where(parent[order] < 0, -1, row[np.maximum(parent[order], 0)])
        types = np.where(self.soma[order], 1, 3)
        return SWC.from_arrays(self.positions[order], pidx, radius=self.radius[order] / voxel[2], types=types)


def _n_components(n: int, edges: np.ndarray) -> int:
    if n == 0:
        return 0
    e = edges.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    return int(connected_components(graph, directed=False)[0])


def _distance(mask: np.ndarray, voxel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The foreground's flat indices, and their Euclidean distance (um, float32) to the background.

    Computed on the foreground's bounding box grown by one voxel (exact: every voxel beyond
    it is background, and the grown box holds the nearest of them), so a sparse block costs
    little; where the foreground fills under ``SPARSE_FILL`` of that box (thin neurites
    crossing a block) and the voxel size allows it (:func:`_exact_spacing`), from the
    foreground's voxels alone (:func:`_shell_distance`), with the same values.
    """
    inside = np.flatnonzero(mask)
    if inside.size == 0:
        return inside, np.zeros(0, np.float32)
    coords = np.stack(np.unravel_index(inside, mask.shape), axis=1)
    low, high = np.maximum(coords.min(axis=0) - 1, 0), np.minimum(coords.max(axis=0) + 2, mask.shape)
    if inside.size < SPARSE_FILL * np.prod(high - low) and _exact_spacing(voxel):
        return inside, _shell_distance(mask, coords, voxel)
    crop = np.ascontiguousarray(mask[tuple(slice(a, b) for a, b in zip(low, high, strict=True))])
    # No background anywhere (a solid block): measure to the block's border instead.
    dt = edt.edt(crop, anisotropy=tuple(float(v) for v in voxel), black_border=inside.size == crop.size, parallel=1)
    return inside, dt[tuple((coords - low).T)]


def _shell_distance(mask: np.ndarray, coords: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    """:func:`_distance` of the foreground voxels at ``coords`` (n, 3) of ``mask`` (which
    holds background) by nearest-neighbour search; float32 (n,).

    The nearest background voxel of a foreground voxel always has a foreground face
    neighbour (one step from it towards the voxel would otherwise be nearer background),
    so a KD-tree over that shell answers exactly, at a cost that follows the foreground,
    not its box. For voxel sizes passing :func:`_exact_spacing`, the same float32 values
    as ``edt``.
    """
    scale = np.asarray(voxel, np.float64)
    # A voxel with background one step along the finest axis is at the least possible distance.
    finest = np.zeros(len(coords), bool)
    shell = []
    for axis in range(3):
        for step in (-1, 1):
            within = np.flatnonzero((coords[:, axis] + step >= 0) & (coords[:, axis] + step < mask.shape[axis]))
            near = coords[within]
            near[:, axis] += step
            out = ~mask[tuple(near.T)]
            shell.append(near[out])
            if scale[axis] == scale.min():
                finest[within[out]] = True
    shell = np.unique(np.ravel_multi_index(tuple(np.concatenate(shell).T), mask.shape))
    shell = np.stack(np.unravel_index(shell, mask.shape), axis=1)
    depth = np.empty(len(coords), np.float32)
    depth[finest] = np.float32(scale.min()) ** 2
    rest = np.flatnonzero(~finest)
    _, nearest = cKDTree(shell * scale).query(coords[rest] * scale)
    step = ((coords[rest] - shell[nearest]) * scale).astype(np.float32)
    depth[rest] = (step * step).sum(axis=1, dtype=np.float32)  # exact for exact spacings: as edt
    return np.sqrt(depth)


def _bounding_box(mask: np.ndarray, grow: int = 0) -> tuple[slice, ...] | None:
    """The smallest box holding every ``True`` of ``mask``, grown by ``grow`` (clipped); ``None`` if none."""
    where = np.flatnonzero(mask)
    if where.size == 0:
        return None
    if where.size < SPARSE_FILL * mask.size:  # few voxels: their coordinates are cheaper than projections
        coords = np.unravel_index(where, mask.shape)
        ends = [(int(c.min()), int(c.max())) for c in coords]
    else:
        ends = []
        for k in range(mask.ndim):
            w = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != k)))
            ends.append((int(w[0]), int(w[-1])))
    return tuple(slice(max(a - grow, 0), min(b + 1 + grow, n)) for (a, b), n in zip(ends, mask.shape, strict=True))


def _label26(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components (cc3d: several times faster than ``ndimage.label`` in 3-D)."""
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26, return_N=True)
    return labels, int(n)


def _components26(mask: np.ndarray, where: np.ndarray) -> tuple[int, np.ndarray]:
    """26-connected components of ``mask``: their number, and the label (1..n, in raster order
    of each component's first voxel) of the voxels ``where = np.flatnonzero(mask)``.

    Below ``SPARSE_FILL`` the graph of the set voxels and their forward neighbours goes to
    ``scipy.sparse.csgraph``, at a cost that follows the voxels (``mask`` then only gives
    the shape: ``where`` must be exactly its voxels); above it, cc3d labels the whole array.
    """
    if where.size >= SPARSE_FILL * mask.size:
        labels, n = _label26(mask)
        return n, labels.ravel()[where]
    rank = _rank_buffer(mask.size)
    rank[where] = np.arange(1, where.size + 1, dtype=np.int32)
    try:
        first, second = _forward_pairs(where, rank, np.asarray(mask.shape, np.int64))
    finally:
        rank[where] = 0
    graph = coo_matrix((np.ones(first.size, bool), (first, second)), shape=(where.size, where.size))
    # csgraph numbers components by their lowest node, here their first voxel in raster order: as cc3d.
    n, component = connected_components(graph, directed=False)
    return int(n), component + 1


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray, missing: float = 0) -> np.ndarray:
    """``values`` at ``query`` for sorted ``keys`` (flat voxel indices), ``missing`` where absent."""
    query = np.asarray(query, np.int64)
    at = np.searchsorted(keys, query)
    found = at < keys.size
    found[found] = keys[at[found]] == query[found]
    out = np.full(query.shape, missing, values.dtype)
    out[found] = values[at[found]]
    return out


_workspace = threading.local()


def _rank_buffer(size: int) -> np.ndarray:
    """A flat int32 array of ``size`` zeros, kept per thread; callers hand it back zeroed.

    It maps a block's voxels to rows of its foreground list (:func:`_scoop`,
    :func:`_components26`), read at random over the whole block. Fresh zeroed memory would
    cost a page fault and a page clearing at every first touch, more than the scooping
    itself on a sparse block, so each worker thread pays for the pages once (and keeps
    4 bytes per voxel of the largest block it traced: 96 MB for 256^3 plus halo).
    """
    buffer = getattr(_workspace, "rank", None)
    if buffer is None or buffer.size < size:
        buffer = _workspace.rank = np.zeros(size, np.int32)
    return buffer[:size]


def hysteresis(prob: np.ndarray, high: float, low: float) -> np.ndarray:
    """Foreground by hysteresis: 26-connected components of ``prob >= low`` holding a voxel ``>= high``.

    Examples
    --------
    >>> hysteresis(np.array([[[0, 90, 200, 90, 0, 90]]]), 150, 50).astype(int).tolist()
    [[[0, 1, 1, 1, 0, 0]]]
    """
    return _hysteresis(prob, high, prob >= low)


def _hysteresis(prob: np.ndarray, high: float, above: np.ndarray) -> np.ndarray:
    """:func:`hysteresis` given ``above = prob >= low``."""
    where, label_of, active = _active_components(prob, high, above)
    return _paint(prob.shape, where[active[label_of]])


def _active_components(prob: np.ndarray, high: float, above: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels of ``above`` (flat, sorted), their component labels (1-based), and which
    labels hold a voxel ``>= high`` (indexed by label; 0 is background)."""
    # Work on the (sparse) voxels above ``low`` only, never gather over the whole block.
    where = np.flatnonzero(above)
    n, label_of = _components26(above, where)
    active = np.zeros(n + 1, bool)
    active[label_of[prob[above] >= high]] = True
    return where, label_of, active


def _paint(shape: Sequence[int], flat: np.ndarray) -> np.ndarray:
    out = np.zeros(shape, bool)
    out.ravel()[flat] = True
    return out


def _within_reach(prob: np.ndarray, high: float, above: np.ndarray, inner: tuple[slice, ...],
                  port_faces: Sequence[bool], reach: np.ndarray, chains: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The components of ``above`` worth tracing, and the active ones among them (two masks).

    Active components (holding a voxel ``>= high``) are; so are inactive ones within
    ``reach`` voxels (per axis, box to box) of a shared face of ``inner`` or of a component
    worth tracing, since only a bridge (or, at a face, a port) can make an inactive fragment
    count and a bridge is never longer than ``reach``. The others would be dropped whatever
    happened, so not tracing them changes nothing but the cost: a block of dim specks
    costs their labelling, not their tracing. Without ``chains``, only those within
    ``reach`` of a shared face join the active ones (classic hysteresis, across blocks).
    """
    where, label_of, active = _active_components(prob, high, above)
    n = active.size - 1
    coords = np.stack(np.unravel_index(where, prob.shape), axis=1)
    order = np.argsort(label_of, kind="stable")
    starts = np.searchsorted(label_of[order], np.arange(1, n + 1))
    lo, hi = np.minimum.reduceat(coords[order], starts), np.maximum.reduceat(coords[order], starts)
    keep = active.copy()
    for _, axis, plane in _shared_planes(inner, port_faces):
        keep[1:] |= (lo[:, axis] <= plane + reach[axis]) & (hi[:, axis] >= plane - reach[axis])
    # Grow the set through chains of components, each within reach of the last.
    frontier = np.flatnonzero(keep[1:]) if chains else np.zeros(0, np.int64)
    while frontier.size:
        rest = np.flatnonzero(~keep[1:])
        near = np.zeros(rest.size, bool)
        for chunk in np.array_split(frontier, max(1, frontier.size * rest.size // 2**20)):
            a, b = lo[chunk, None] - reach, hi[chunk, None] + reach
            near |= np.all((lo[rest] <= b) & (hi[rest] >= a), axis=2).any(axis=0)
        frontier = rest[near]
        keep[1 + frontier] = True
    return _paint(prob.shape, where[keep[label_of]]), _paint(prob.shape, where[active[label_of]])


def _residual(image: np.ndarray, voxel: np.ndarray, background_sigma: float) -> np.ndarray:
    img = np.asarray(image, np.float32)
    return ndimage.gaussian_filter(img, 1.0) - ndimage.gaussian_filter(img, background_sigma / voxel)


def measure_noise(image: np.ndarray, *, voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
                  background_sigma: float = 3.0) -> tuple[float, float]:  # fmt: skip
    """Median and robust standard deviation (1.4826 x MAD) of an image's background-subtracted residual.

    Measured once on a sample of a large volume and passed to every block's
    :func:`raw_to_probability`, so that all blocks share one scale.

    Examples
    --------
    >>> med, sd = measure_noise(np.random.default_rng(0).normal(10, 2, (16, 32, 32)))
    >>> abs(med) < 0.1, 0.2 < sd < 2
    (True, True)
    """
    residual = _residual(image, np.asarray(voxel_size, float), background_sigma)
    med = float(np.median(residual))
    return med, float(np.median(np.abs(residual - med))) * 1.4826


def raw_to_probability(
    image: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    high: float = 128,
    low: float = 64,
    k_high: float = 8.0,
    k_low: float = 4.0,
    background_sigma: float = 3.0,
    noise: tuple[float, float] | None = None,
) -> np.ndarray:
    """Scale a raw fluorescence image to the 0-255 "probability" :func:`trace_block` expects.

    The image smoothed with sigma 1 voxel, minus a Gaussian background of
    ``background_sigma`` um (small: it also removes the autofluorescence haze, which a
    10 um background leaves as false foreground), is measured in robust noise units
    (``z = residual / (1.4826 * MAD)``, centred on the median) and mapped linearly so
    that ``z = k_low`` becomes ``low`` and ``z = k_high`` becomes ``high``. The MAD of
    smoothed, skewed (photon) noise understates its upper tail, hence ``k`` of 8 and 4.
    ``noise`` (median, robust sd) from :func:`measure_noise` replaces the image's own.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(10, 1, (8, 32, 32)); img[4, 16, 4:28] += 20
    >>> p = raw_to_probability(img)
    >>> int(p[4, 16, 16]) >= 128, int(np.median(p)) < 64
    (True, True)
    """
    voxel = np.asarray(voxel_size, float)
    residual = _residual(image, voxel, background_sigma)
    if noise is None:
        med = float(np.median(residual))
        noise = (med, float(np.median(np.abs(residual - med))) * 1.4826)
    z = (residual - noise[0]) / max(noise[1], 1e-6)
    slope = (high - low) / (k_high - k_low)
    return np.clip(low + (z - k_low) * slope, 0, 255).round().astype(np.uint8)


# --------------------------------------------------------------------------- numba core

_OFFSETS = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)],
                    np.int64)  # fmt: skip


@numba.njit(cache=True)
def _label_argmax(labels, values, n):  # pragma: no cover - numba
    """Index into ``labels`` of the largest value of each label 1..n (the first on ties).

    One pass; ``ndimage.maximum_position`` sorts the whole volume instead.
    """
    best = np.full(n + 1, -1, np.int64)
    for v in range(labels.shape[0]):
        lab = labels[v]
        if lab > 0 and (best[lab] < 0 or values[v] > values[best[lab]]):
            best[lab] = v
    return best[1:]


@numba.njit(cache=True)
def _centroid(pool, start, end, shape, rank, depth):  # pragma: no cover - numba
    cz = cy = cx = 0.0
    rmax = 0.0
    ny, nx = shape[1], shape[2]
    for k in range(start, end):
        v = pool[k]
        z = v // (ny * nx)
        y = (v // nx) % ny
        x = v % nx
        cz += z
        cy += y
        cx += x
        if depth[rank[v] - 1] > rmax:
            rmax = depth[rank[v] - 1]
    m = end - start
    cz, cy, cx = cz / m, cy / m, cx / m
    # A ring-shaped cluster (a front leaving a soma sideways) has its centroid deep inside:
    # the depth there, not the ring's, is the local radius.
    r = rank[(int(round(cz)) * ny + int(round(cy))) * nx + int(round(cx))]
    return cz, cy, cx, max(rmax, depth[r - 1] if r > 0 else 0.0)


@numba.njit(cache=True, inline="always")
def _neighbour(v, o, nz, ny, nx):  # pragma: no cover - numba
    """Flat index of the ``o``-th 26-neighbour of flat voxel ``v``; -1 outside the block."""
    z = v // (ny * nx) + _OFFSETS[o, 0]
    y = (v // nx) % ny + _OFFSETS[o, 1]
    x = v % nx + _OFFSETS[o, 2]
    if z < 0 or y < 0 or x < 0 or z >= nz or y >= ny or x >= nx:
        return -1
    return (z * ny + y) * nx + x


@numba.njit(cache=True)
def _forward_pairs(where, rank, shape):  # pragma: no cover - numba
    """Pairs (i, j) of 26-neighbours among the voxels ``where`` (flat, sorted), each pair once:
    ``rank`` (flat over the block) is 1 + the row in ``where`` of each voxel, 0 elsewhere."""
    nz, ny, nx = shape[0], shape[1], shape[2]
    first = np.empty(13 * where.shape[0], np.int64)
    second = np.empty(13 * where.shape[0], np.int64)
    m = 0
    for i in range(where.shape[0]):
        for o in range(13, 26):  # the forward half of the neighbourhood
            u = _neighbour(where[i], o, nz, ny, nx)
            if u >= 0 and rank[u] > 0:
                first[m] = i
                second[m] = rank[u] - 1
                m += 1
    return first[:m], second[:m]


@numba.njit(cache=True)
def _scoop(rank, depth, seed_pos, seed_radius, seed_ptr, seed_vox, shape, voxel, scoop):  # pragma: no cover - numba
    """Grow all fronts from the seeds; return node arrays.

    ``rank`` (flat int32 over the block): 0 for background, else 1 + the voxel's row in
    ``depth``, the distance transform (um) of the foreground's voxels. Everything else is
    kept per foreground voxel, so a sparse block costs its foreground, not its volume.
    Seed ``i`` is a node at ``seed_pos[i]`` (voxels) of radius ``seed_radius[i]`` whose first
    cluster is the voxels ``seed_vox[seed_ptr[i]:seed_ptr[i + 1]]`` (flat indices; taken
    voxels are skipped, and a seed with none left makes no node).
    Returns positions (k, 3), parent (k,), radius (k,), seed_of (k,): row of the seed node
    each node grew from, contacts (c, 2): where two trees' fronts met, a node of the
    first and a node of the second (the first meeting of each pair of trees), and
    seed_node: the node row of each seed, or -1.
    """
    nz, ny, nx = shape[0], shape[1], shape[2]
    n_fg = depth.shape[0]
    state = np.zeros(n_fg, np.uint8)  # 0 unvisited, 1 in the layer being split, 2 visited
    tree = np.full(n_fg, -1, np.int32)  # seed node of the front that took each voxel
    owner = np.full(n_fg, -1, np.int32)  # last node of that front when it scooped the voxel
    met = dict()
    met[(np.int64(-1), np.int64(-1))] = (np.int64(-1), np.int64(-1))
    cap = n_fg + seed_pos.shape[0] + 1
    pool = np.empty(cap, np.int64)  # voxels of every cluster, contiguous per cluster
    pool_n = 0
    # Front queue: cluster start, end, last node, size at last node.
    queue = np.empty((cap, 4), np.int64)
    qhead = 0
    qtail = 0
    pos = np.empty((cap, 3), np.float64)
    parent = np.empty(cap, np.int64)
    radius = np.empty(cap, np.float64)
    seed_of = np.empty(cap, np.int64)
    nn = 0
    vmin = min(voxel[0], min(voxel[1], voxel[2]))
    vmax = max(voxel[0], max(voxel[1], voxel[2]))
    seed_node = np.full(seed_pos.shape[0], -1, np.int64)
    for i in range(seed_pos.shape[0]):
        # A seed is one voxel (a node on it), or a soma port: the face voxels of a soma
        # centred in another block, hung from a node on that soma's centre.
        start = pool_n
        for k in range(seed_ptr[i], seed_ptr[i + 1]):
            v = seed_vox[k]
            r = rank[v] - 1
            if r >= 0 and state[r] == 0:
                state[r] = 2
                tree[r] = nn
                pool[pool_n] = v
                pool_n += 1
        if pool_n == start:
            continue
        pos[nn, 0] = seed_pos[i, 0]
        pos[nn, 1] = seed_pos[i, 1]
        pos[nn, 2] = seed_pos[i, 2]
        parent[nn] = -1
        radius[nn] = seed_radius[i]
        seed_of[nn] = nn
        seed_node[i] = nn
        queue[qtail, 0] = start
        queue[qtail, 1] = pool_n
        queue[qtail, 2] = nn
        queue[qtail, 3] = pool_n - start
        qtail += 1
        nn += 1
    layer = np.empty(cap, np.int64)
    stack = np.empty(cap, np.int64)
    child_start = np.empty(cap, np.int64)
    child_end = np.empty(cap, np.int64)
    while qhead < qtail:
        start, end, p, sp = queue[qhead, 0], queue[qhead, 1], queue[qhead, 2], queue[qhead, 3]
        qhead += 1
        mine = seed_of[p]
        # The next layer: unvisited foreground 26-neighbours of the cluster. A neighbour
        # another tree took is where two fronts meet: remember the first such contact.
        nl = 0
        for k in range(start, end):
            v = pool[k]
            owner[rank[v] - 1] = p
            for o in range(26):
                u = _neighbour(v, o, nz, ny, nx)
                if u < 0 or rank[u] == 0:
                    continue
                r = rank[u] - 1
                if state[r] == 0:
                    state[r] = 1
                    layer[nl] = u
                    nl += 1
                elif state[r] == 2 and tree[r] != mine:
                    key = (np.int64(min(mine, tree[r])), np.int64(max(mine, tree[r])))
                    if key not in met:
                        met[key] = (np.int64(p), np.int64(u))
        # Split the layer into 26-connected clusters (each contiguous in the pool).
        nc = 0
        for i in range(nl):
            u = layer[i]
            if state[rank[u] - 1] != 1:
                continue
            child_start[nc] = pool_n
            state[rank[u] - 1] = 2
            stack[0] = u
            top = 1
            while top > 0:
                top -= 1
                w = stack[top]
                tree[rank[w] - 1] = mine
                pool[pool_n] = w
                pool_n += 1
                for o in range(26):
                    q = _neighbour(w, o, nz, ny, nx)
                    if q >= 0 and rank[q] > 0 and state[rank[q] - 1] == 1:
                        state[rank[q] - 1] = 2
                        stack[top] = q
                        top += 1
            child_end[nc] = pool_n
            nc += 1
        pz, py, px = pos[p, 0], pos[p, 1], pos[p, 2]
        if nc == 0:
            # A tip: a node at the current cluster's centroid.
            cz, cy, cx, rc = _centroid(pool, start, end, shape, rank, depth)
            d = math.sqrt(((cz - pz) * voxel[0]) ** 2 + ((cy - py) * voxel[1]) ** 2 + ((cx - px) * voxel[2]) ** 2)
            if d >= 0.5 * vmin:
                pos[nn, 0] = cz
                pos[nn, 1] = cy
                pos[nn, 2] = cx
                parent[nn] = p
                radius[nn] = rc
                seed_of[nn] = seed_of[p]
                nn += 1
            continue
        if nc > 1:
            # A branch point: the children hang from the last node, at most one scooping
            # distance back. A node at the centroid would put a kink before every split
            # (tiny ones on a rough surface too), and kinks bend the tip directions that
            # bridging relies on.
            for c in range(nc):
                queue[qtail, 0] = child_start[c]
                queue[qtail, 1] = child_end[c]
                queue[qtail, 2] = p
                queue[qtail, 3] = end - start
                qtail += 1
            continue
        s = child_end[0] - child_start[0]
        cz, cy, cx, rc = _centroid(pool, child_start[0], child_end[0], shape, rank, depth)
        d = math.sqrt(((cz - pz) * voxel[0]) ** 2 + ((cy - py) * voxel[1]) ** 2 + ((cx - px) * voxel[2]) ** 2)
        reach = scoop * 2.0 * max(rc, vmax)
        if d >= reach:
            f = 0.5 ** (min(s, sp) / max(s, sp))
            pos[nn, 0] = pz + f * (cz - pz)
            pos[nn, 1] = py + f * (cy - py)
            pos[nn, 2] = px + f * (cx - px)
            parent[nn] = p
            radius[nn] = rc
            seed_of[nn] = seed_of[p]
            p = nn
            sp = s
            nn += 1
        queue[qtail, 0] = child_start[0]
        queue[qtail, 1] = child_end[0]
        queue[qtail, 2] = p
        queue[qtail, 3] = sp
        qtail += 1
    # Every scooped voxel has an owner now; contacts become node pairs (in meeting order).
    contacts = np.empty((len(met), 3), np.int64)
    nc = 0
    for key, value in met.items():
        if key[0] >= 0:
            contacts[nc, 0] = value[0]
            contacts[nc, 1] = owner[rank[value[1]] - 1]
            contacts[nc, 2] = value[1]
            nc += 1
    order = np.argsort(contacts[:nc, 2], kind="mergesort")
    return (pos[:nn].copy(), parent[:nn].copy(), radius[:nn].copy(), seed_of[:nn].copy(), contacts[order, :2].copy(),
            seed_node)


# --------------------------------------------------------------------------- graph helpers


def _csr(n: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists of ``n`` nodes as CSR arrays ``(start, neighbours)``, in the order of ``edges``."""
    ends = np.asarray(edges, np.int64).reshape(-1, 2)
    start = np.concatenate([[0], np.cumsum(np.bincount(ends.ravel(), minlength=n))])
    return start, ends[:, ::-1].ravel()[np.argsort(ends.ravel(), kind="stable")]


class _Adjacency:
    """Neighbours of each of ``n`` nodes, in the order of ``edges``: ``adj[i]`` is a list.

    Kept as one CSR pair of Python lists rather than a list per node, whose tens of
    thousands of objects mostly fed the garbage collector on large graphs.
    """

    def __init__(self, n: int, edges: np.ndarray) -> None:
        start, neighbours = _csr(n, edges)
        self.degree = np.diff(start)
        self._next, self._start = neighbours.tolist(), start.tolist()

    def __getitem__(self, i: int) -> list[int]:
        return self._next[self._start[i]:self._start[i + 1]]


@numba.njit(cache=True)
def _terminal_branches(start, neighbours, keep, held):  # pragma: no cover - numba
    """The terminal branches of the live graph (CSR ``start``, ``neighbours``): from every tip,
    the walk to the first node that is not a plain path node, when that node is a branch point
    or a held node and the walk holds no held node. Returns the walks' nodes, tip first, as
    one flat array with ``offsets``, and each walk's end node (its junction)."""
    n = keep.shape[0]
    degree = np.zeros(n, np.int64)
    for v in range(n):
        if keep[v]:
            for k in range(start[v], start[v + 1]):
                if keep[neighbours[k]]:
                    degree[v] += 1
    nodes = np.empty(n, np.int64)
    offsets = [0]
    junctions = []
    size = 0
    for tip in range(n):
        if not keep[tip] or held[tip] or degree[tip] != 1:
            continue
        first, prev, cur = size, -1, tip
        nodes[size] = tip
        size += 1
        while True:
            step = -1
            for k in range(start[cur], start[cur + 1]):
                w = neighbours[k]
                if w != prev and keep[w]:
                    step = w
            prev, cur = cur, step
            if degree[cur] != 2 or held[cur]:
                break
            nodes[size] = cur
            size += 1
        if degree[cur] >= 3 or (held[cur] and cur != tip):
            offsets.append(size)
            junctions.append(cur)
        else:  # a lone path, or one that holds a held node: not a spur
            size = first
    return nodes[:size], np.array(offsets, np.int64), np.array(junctions, np.int64)


def _prune_spurs(pos_um: np.ndarray, radius: np.ndarray, edges: np.ndarray, soma: np.ndarray,
                 factor: float) -> np.ndarray:  # fmt: skip
    """Keep-mask of nodes after removing the terminal branches that do not leave the tree's footprint.

    A terminal branch (tip to branch point) is redundant when its cable *outside the
    footprint of the rest of the tree* (the balls of the other nodes' radii, the branch
    point's included) is shorter than ``factor`` x the local diameter (at the branch point):
    Rodriguez et al.'s rule, measured on the part of the branch that is not already inside
    its parent: a branch that never leaves its parent is redundant however long it is. Two
    passes: the second catches spurs exposed by the first.
    ``soma`` marks held nodes: never pruned, and a branch holding one is kept.

    Examples
    --------
    A trunk of radius 2 along x with a side branch 3 long (inside the trunk's footprint) and
    one 8 long (leaving it):

    >>> trunk = [[0, 0, x] for x in range(0, 21, 2)]
    >>> side = [[0, 1.5, 6], [0, 3, 6], [0, 3, 14], [0, 6, 14], [0, 8, 14]]
    >>> pos = np.array(trunk + side, float)
    >>> edges = np.array([[i + 1, i] for i in range(10)] + [[11, 3], [12, 11], [13, 7], [14, 13], [15, 14]])
    >>> keep = _prune_spurs(pos, np.full(16, 2.0), edges, np.zeros(16, bool), 1.0)
    >>> np.flatnonzero(~keep).tolist()
    [11, 12]
    """
    keep = np.ones(pos_um.shape[0], bool)
    if factor <= 0 or keep.size == 0:
        return keep
    held = np.asarray(soma, bool)
    pos_um = np.ascontiguousarray(pos_um, np.float64)
    radius = np.asarray(radius, np.float64)
    for _ in range(2):
        start, neighbours = _csr(keep.size, edges[keep[edges[:, 0]] & keep[edges[:, 1]]])
        nodes, offsets, junctions = _terminal_branches(start, neighbours, keep, held)
        if junctions.size == 0:
            break
        branch = np.repeat(np.arange(junctions.size), np.diff(offsets))
        # Each node's edge towards the junction: to the next node of its walk, or to the junction.
        toward = np.append(nodes[1:], -1)
        last = offsets[1:] - 1
        toward[last] = junctions
        step = np.linalg.norm(pos_um[nodes] - pos_um[toward], axis=1)
        # Covered: inside the ball of some live node of another branch (or of the junction).
        live = np.flatnonzero(keep)
        owner = np.full(keep.size, -1, np.int64)
        owner[nodes] = branch
        pairs = cKDTree(pos_um[nodes]).sparse_distance_matrix(
            cKDTree(pos_um[live]), max_distance=float(radius[live].max()), output_type="ndarray")
        other = live[pairs["j"]]
        inside = (owner[other] != branch[pairs["i"]]) & (pairs["v"] <= radius[other])
        covered = np.zeros(nodes.size, bool)
        covered[pairs["i"][inside]] = True
        outside = np.bincount(branch, weights=step * ~covered, minlength=junctions.size)
        spur = outside < factor * 2.0 * radius[junctions]
        if not spur.any():
            break
        keep[nodes[spur[branch]]] = False
    return keep


def _renumber(keep: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new = np.cumsum(keep) - 1
    e = edges[keep[edges[:, 0]] & keep[edges[:, 1]]]
    return new, new[e].reshape(-1, 2)


def line_voxels(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxels ``(k, 3)`` along the segment a-b (half-voxel steps, nearest voxels, clipped to ``shape``).

    Examples
    --------
    >>> line_voxels(np.array([0., 0, 0]), np.array([0., 0, 2]), (1, 1, 3)).tolist()
    [[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 2]]
    """
    k = max(2, int(np.ceil(np.linalg.norm(b - a) * 2)) + 1)
    t = np.linspace(0, 1, k)[:, None]
    return np.clip(np.rint(a + t * (b - a)).astype(np.int64), 0, np.asarray(shape) - 1)


def gap_mean(values: np.ndarray, gap: np.ndarray) -> float:
    """Mean probability over the gap samples of a line (all samples if none lies in a gap).

    Only samples outside the foreground count: the fragments' own bright ends must not
    lift a dark gap over the bar.
    """
    values = np.asarray(values, np.float64)
    return float(values[gap].mean() if gap.any() else values.mean())


def _tip_direction(pos_um: np.ndarray, adj: _Adjacency, tip: int, steps: int = 3) -> np.ndarray | None:
    prev, cur = -1, tip
    for _ in range(steps):
        nxt = [w for w in adj[cur] if w != prev]
        if len(nxt) != 1 and cur != tip or not nxt:
            break
        prev, cur = cur, nxt[0]
    if cur == tip:
        return None
    d = pos_um[tip] - pos_um[cur]
    norm = np.linalg.norm(d)
    return d / norm if norm > 0 else None


def bridge_tips(
    pos: np.ndarray,
    voxel: np.ndarray,
    edges: np.ndarray,
    fixed: np.ndarray,
    sample: Callable[[np.ndarray, np.ndarray], float],
    *,
    distance: float,
    angle: float,
    min_mean: float,
    facing_distance: float = 0.0,
    facing_min_mean: float = 255.0,
    short: float = 0.0,
    allowed: Callable[[int, int], bool] | None = None,
) -> tuple[np.ndarray, list[tuple]]:
    """Link tips to nearby fragments; return the new edge list and the bridges' records.

    A tip (degree 1, not ``fixed``) links to the nearest node of another fragment within
    ``distance`` um when the bridge turns less than ``angle`` degrees from the tip's
    direction (and from the other tip's, if it links to a tip) and ``sample(a, b)``, the
    mean probability along the straight line between the two (voxel coordinates), is at
    least ``min_mean``. Two tips that point at each other link under limits of their own,
    ``facing_distance`` um and ``facing_min_mean`` (default: never): both directions
    agreeing is evidence of one neurite broken in two, which a tip aimed at a fragment's
    side is not. A bridge no longer than ``short`` um needs no probability at all: a tip
    aimed that close at a fragment is one neurite whose map breaks (at a bouton or a junction
    the network calls dark). ``allowed(t, j)`` can restrict candidate pairs further. Records are
    ``(z, y, x, length_um, mean)`` with the bridge's midpoint in voxels, in the order of
    the new edges (appended to ``edges``). ``distance`` 0 disables bridging.

    Examples
    --------
    Two collinear segments 8 um apart, the gap lit at 30: too far and too dim for a tip
    aimed at any fragment, not for two facing tips.

    >>> pos = np.array([[0, 0, x] for x in (0, 2, 4, 12, 14, 16)], float)
    >>> edges = np.array([[0, 1], [1, 2], [3, 4], [4, 5]])
    >>> lit = lambda a, b: 30.0
    >>> fixed = np.zeros(6, bool)
    >>> len(bridge_tips(pos, np.ones(3), edges, fixed, lit, distance=6, angle=60, min_mean=32)[1])
    0
    >>> new, records = bridge_tips(pos, np.ones(3), edges, fixed, lit, distance=6, angle=60, min_mean=32,
    ...                            facing_distance=12, facing_min_mean=24)
    >>> new[-1].tolist(), records[0][3]
    ([2, 3], 8.0)
    """
    n = pos.shape[0]
    if distance <= 0 or n < 2:
        return edges, []
    pos_um = pos * voxel
    adj = _Adjacency(n, edges)
    _, comp = connected_components(coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)),
                                   directed=False)  # fmt: skip
    root = np.arange(comp.max() + 1)

    def find(c: int) -> int:
        while root[c] != c:
            root[c] = root[root[c]]
            c = int(root[c])
        return c

    tips = np.flatnonzero((adj.degree == 1) & ~np.asarray(fixed, bool)).tolist()
    direction = {t: _tip_direction(pos_um, adj, t) for t in tips}
    cos_max = math.cos(math.radians(angle))
    tree = cKDTree(pos_um)
    new_edges, records = [], []
    for t in tips:
        dt_ = direction[t]
        if dt_ is None:
            continue
        near = np.asarray(tree.query_ball_point(pos_um[t], max(distance, facing_distance)), np.int64)
        offset = pos_um[near] - pos_um[t]
        lengths = np.linalg.norm(offset, axis=1)
        ahead = (lengths > 0) & (offset @ dt_ >= cos_max * lengths)
        best = None
        # Nearest first (ties: lowest index): the first candidate that passes is the bridge.
        for k in np.flatnonzero(ahead)[np.lexsort((near[ahead], lengths[ahead]))].tolist():
            j, length = int(near[k]), float(lengths[k])
            if find(int(comp[j])) == find(int(comp[t])) or (allowed is not None and not allowed(t, j)):
                continue
            dj = direction.get(j)
            if dj is not None and float(-offset[k] @ dj) < cos_max * length:
                continue  # linking two tips: both must point at each other
            facing = dj is not None
            if length > (facing_distance if facing else distance):
                continue
            mean = sample(pos[t], pos[j])
            if length <= short or mean >= (facing_min_mean if facing else min_mean):
                best = (j, length, mean)
                break
        if best is None:
            continue
        j, length, mean = best
        root[find(int(comp[t]))] = find(int(comp[j]))
        new_edges.append((t, j))
        mid = (pos[t] + pos[j]) / 2
        records.append((mid[0], mid[1], mid[2], length, mean))
    if new_edges:
        edges = np.concatenate([edges, np.asarray(new_edges, np.int64)])
    return edges, records


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` unit vectors spread evenly over the sphere (a Fibonacci lattice), as (n, 3)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    turn = np.pi * (1 + 5**0.5) * i
    return np.stack([z, np.sqrt(1 - z**2) * np.sin(turn), np.sqrt(1 - z**2) * np.cos(turn)], axis=1)


#: Tip extension (:func:`extend_tips`): the directions tried at each step are those of
#: these within the cone around the march's heading.
_SPHERE = _fibonacci_sphere(400)
EXTEND_CONE = 45.0  # degrees a step may turn from the march's direction
EXTEND_RAY = 6  # steps looked ahead: a direction scores the mean probability along them
EXTEND_WINDOW = 5  # a march stops when its last samples average below the stop level...
EXTEND_STOP = 8.0  # ... which lies this far below ``min_mean``
EXTEND_SKIP = 3  # first samples (the tip's own fading edge) left out of the acceptance mean
EXTEND_MIN_LENGTH = 5.0  # um: shorter extensions are the blur of a neurite's end, not a neurite
EXTEND_LEAVE = 3.0  # um a march may run inside its own foreground before it must have left it
EXTEND_EMPTY = 8.0  # a march whose best look-ahead is below this where it leaves the foreground has nothing to follow


_MARCH_DONE, _MARCH_BACK, _MARCH_LOST = 0, 1, 2  # how a march ended (see :func:`_march`)


@numba.njit(cache=True)
def _march(prob, kept, start, heading, voxel, sphere, step, cos_cone, n_ray, stop_mean, empty, leave, window,
           max_length):  # pragma: no cover - numba
    """One ridge march from ``start`` (um) along ``heading``: its samples (um), their look-ahead
    means, how it ended and, if it came back into ``kept``, where.

    Each step goes ``step`` um in the direction of ``sphere`` within the cone whose next
    ``n_ray`` steps have the highest mean probability (ties: straight on), then moves to the
    probability-weighted centre of the 5 voxels around it in z (the point spread is longest
    along the optical axis: neighbouring directions score alike there). Steps inside ``kept``
    are not samples; the march is *lost* if it has not left it after ``leave`` um, ends
    (*done*) if nothing is ahead (best mean below ``empty``) where it leaves it, and ends
    (*back*) where it enters it again. It is also done when its last ``window`` means average
    below ``stop_mean``, after ``max_length`` um, or at the edge of ``prob``.
    """
    nz, ny, nx = prob.shape
    upper = np.array([nz - 1, ny - 1, nx - 1], np.float64)
    n_max = int(max_length / step) + 2
    path = np.empty((n_max, 3))
    means = np.empty(n_max)
    here = start.copy()
    head = heading.copy()
    back = np.zeros(3)
    count = 0
    travelled = 0.0
    left = False
    idx = np.empty(3, np.int64)
    while travelled < max_length:
        best, best_score, best_mean = -1, -1.0, 0.0
        for d in range(sphere.shape[0]):
            dot = sphere[d, 0] * head[0] + sphere[d, 1] * head[1] + sphere[d, 2] * head[2]
            if dot < cos_cone:
                continue
            inside = True
            for a in range(3):
                q = here[a] + step * sphere[d, a]
                if q < 0 or q > upper[a] * voxel[a]:
                    inside = False
            if not inside:
                continue
            total = 0.0
            for k in range(1, n_ray + 1):
                for a in range(3):
                    v = np.rint((here[a] + k * step * sphere[d, a]) / voxel[a])
                    idx[a] = int(min(max(v, 0.0), upper[a]))
                total += prob[idx[0], idx[1], idx[2]]
            mean = total / n_ray
            score = mean + 1e-3 * dot
            if score > best_score:
                best, best_score, best_mean = d, score, mean
        if best < 0:
            break
        for a in range(3):
            here[a] += step * sphere[best, a]
            head[a] += sphere[best, a]
        norm = np.sqrt(head[0] ** 2 + head[1] ** 2 + head[2] ** 2)
        for a in range(3):
            head[a] /= norm
        # z-centring over the 5 voxels around the point
        z = int(min(max(np.rint(here[0] / voxel[0]), 0.0), upper[0]))
        y = int(min(max(np.rint(here[1] / voxel[1]), 0.0), upper[1]))
        x = int(min(max(np.rint(here[2] / voxel[2]), 0.0), upper[2]))
        weight, moment = 0.0, 0.0
        for zz in range(max(z - 2, 0), min(z + 3, nz)):
            weight += prob[zz, y, x]
            moment += zz * float(prob[zz, y, x])
        if weight > 0:
            here[0] = moment / weight * voxel[0]
            z = int(min(max(np.rint(here[0] / voxel[0]), 0.0), upper[0]))
        travelled += step
        if kept[z, y, x]:
            if left:
                back[:] = here
                return path[:count].copy(), means[:count].copy(), _MARCH_BACK, back
            if travelled > leave:
                return path[:0].copy(), means[:0].copy(), _MARCH_LOST, back
            continue
        if not left and best_mean < empty:
            break
        left = True
        path[count] = here
        means[count] = best_mean
        count += 1
        if count >= window:
            recent = 0.0
            for k in range(count - window, count):
                recent += means[k]
            if recent / window < stop_mean:
                break
    return path[:count].copy(), means[:count].copy(), _MARCH_DONE, back


def _stop_index(means: Sequence[float], stop_mean: float) -> int:
    """Samples a march keeps when it stops where its last ``EXTEND_WINDOW`` means average below ``stop_mean``."""
    if len(means) < EXTEND_WINDOW:
        return len(means)
    recent = np.convolve(means, np.ones(EXTEND_WINDOW) / EXTEND_WINDOW, "valid")
    below = np.flatnonzero(recent < stop_mean)
    return int(below[0]) + EXTEND_WINDOW if below.size else len(means)


def _accepted(means: Sequence[float], step: float, min_mean: float) -> bool:
    """Whether a march of these ray means is long and bright enough to keep (see :func:`extend_tips`)."""
    return len(means) * step >= EXTEND_MIN_LENGTH and len(means) > EXTEND_SKIP and \
        float(np.mean(means[EXTEND_SKIP:])) >= min_mean


def extend_tips(
    prob: np.ndarray,
    kept: np.ndarray,
    pos: np.ndarray,
    voxel: np.ndarray,
    edges: np.ndarray,
    fixed: np.ndarray,
    *,
    min_mean: float,
    max_length: float,
    link_min_mean: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple]]:
    """Follow the probability ridge beyond each tip, below the foreground threshold.

    A dim neurite often goes on where its foreground ends, too faint voxel by voxel but
    clear along its course. From each tip (degree 1, not ``fixed``), a march (:func:`_march`)
    steps ``2 min(voxel)`` um at a time in the direction, within ``EXTEND_CONE`` degrees of
    its heading, whose next ``EXTEND_RAY`` steps have the highest mean probability, centred
    in z. It must leave the kept foreground ``kept`` within ``EXTEND_LEAVE`` um, and stops
    when its last ``EXTEND_WINDOW`` ray means average below ``min_mean - EXTEND_STOP``, after
    ``max_length`` um, at the edge of ``prob``, or where it meets another fragment (a node
    within reach, or that fragment's foreground), to which it then links (never back to its
    own). Its trailing samples below the stop level are cut; it is kept when it is at
    least ``EXTEND_MIN_LENGTH`` um long and its ray means (bar the first ``EXTEND_SKIP``)
    average at least ``min_mean``. Noise rarely averages that high over several um; a real
    neurite's end falls below it within its blur. A march that meets another fragment needs
    only ``link_min_mean`` (default ``min_mean``), and stops only below that less 8: reaching
    a fragment along the tip's course is evidence of its own. If it meets one beyond where the
    ``min_mean`` march would have stopped and does not link, that shorter march is what counts.

    Parameters
    ----------
    prob : (z, y, x) array
        Probability 0-255; positions are voxel coordinates of this array.
    kept : (z, y, x) bool array
        The foreground of the fragments being extended.
    pos : (n, 3) float
        Node positions (voxels).
    voxel : (3,) float
        Voxel size (um).
    edges : (m, 2) int
        Undirected edges.
    fixed : (n,) bool
        Nodes that are never extended (somata, ports).
    min_mean, max_length : float
        Least mean probability of a kept extension; longest march (um).
    link_min_mean : float, optional
        Least mean probability of an extension that joins another fragment (default
        ``min_mean``; higher values count as ``min_mean``).

    Returns
    -------
    new_pos : (k, 3) float
        New nodes (voxels), numbered ``n, n + 1, ...``.
    new_edges : (e, 2) int64
        Edges joining them to their tips, to each other and to the fragments they met.
    source : (k,) int64
        The tip each new node extends (for its radius and activity).
    links : list of (z, y, x, length_um, mean)
        The extensions that joined two fragments, as :data:`BRIDGE_DTYPE` records (their
        midpoint in voxels, length and mean probability): gaps closed, for review.

    Examples
    --------
    A bright stretch going on dimmer (40, under a ``low`` of 64) for 20 voxels:

    >>> prob = np.zeros((5, 5, 40), np.uint8); prob[1:4, 1:4, :10] = 200; prob[1:4, 1:4, 10:30] = 40
    >>> pos, edges = np.array([[2., 2, 1], [2, 2, 5], [2, 2, 9]]), np.array([[0, 1], [1, 2]])
    >>> new, new_edges, source, links = extend_tips(prob, prob >= 64, pos, np.ones(3), edges,
    ...                                             np.array([True, False, False]), min_mean=30, max_length=40)
    >>> round(float(new[:, 2].max())), new_edges[0].tolist(), set(source.tolist()), links
    (23, [2, 3], {2}, [])

    (It ends short of the dim stretch's end, x = 29, by about half the look-ahead.)
    """
    n = pos.shape[0]
    none = np.zeros((0, 3)), np.zeros((0, 2), np.int64), np.zeros(0, np.int64), []
    if max_length <= 0 or n < 2:
        return none
    pos_um = pos * voxel
    adj = _Adjacency(n, edges)
    _, comp = connected_components(coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)),
                                   directed=False)  # fmt: skip
    root = np.arange(comp.max() + 1)  # fragments joined by earlier marches (union-find)

    def find(c: int) -> int:
        while root[c] != c:
            root[c] = root[root[c]]
            c = int(root[c])
        return c

    tree = cKDTree(pos_um)
    step = 2 * float(voxel.min())
    cos_cone = math.cos(math.radians(EXTEND_CONE))
    stop_mean = min_mean - EXTEND_STOP
    link_min_mean = min(min_mean, min_mean if link_min_mean is None else link_min_mean)
    prob = np.ascontiguousarray(prob)
    kept = np.ascontiguousarray(kept, dtype=bool)
    new_pos: list[np.ndarray] = []
    new_edges: list[tuple[int, int]] = []
    source: list[int] = []
    links: list[tuple] = []
    reach = 1.5 * step  # a march this close to another fragment's node has met it
    # Nodes the marches can meet: the fragments', and those of the extensions kept so far
    # (two tips facing each other across a long gap must not both fill it).
    targets, extended = pos_um, tree

    def nearest_other(point: np.ndarray, radius: float, own: set[int]) -> int:
        near = [j for j in extended.query_ball_point(point, radius) if j not in own]
        return min(near, key=lambda j: float(np.linalg.norm(targets[j] - point))) if near else -1

    for tip in np.flatnonzero((adj.degree == 1) & ~np.asarray(fixed, bool)).tolist():
        heading = _tip_direction(pos_um, adj, tip)
        if heading is None:
            continue
        samples, means, ended, back = _march(prob, kept, pos_um[tip].copy(), heading, voxel, _SPHERE, step, cos_cone,
                                             EXTEND_RAY, link_min_mean - EXTEND_STOP, EXTEND_EMPTY, EXTEND_LEAVE,
                                             EXTEND_WINDOW, float(max_length))  # fmt: skip
        if ended == _MARCH_LOST or not len(samples):
            continue
        own = set(tree.query_ball_point(pos_um[tip], 3 * step))
        path, means, meet, met_at = list(samples), list(means), -1, -1
        # The march ran on at the link level; where it would have stopped at the usual one:
        stop_at = _stop_index(means, stop_mean)
        if len(new_pos) + n != len(targets):
            targets = np.concatenate([pos_um, np.asarray(new_pos) * voxel])
            extended = cKDTree(targets)
        # The march ends where it first comes within reach of another fragment's node...
        for k, near in enumerate(extended.query_ball_point(samples, reach)):
            if any(j not in own for j in near):
                meet, met_at = nearest_other(samples[k], reach, own), k
                break
        else:  # ... or where it came back into the foreground: the fragment there, if any
            if ended == _MARCH_BACK:
                meet, met_at = nearest_other(back, EXTEND_LEAVE, own), len(samples) - 1
        if met_at >= 0:
            joins = meet >= 0 and find(int(comp[meet if meet < n else source[meet - n]])) != find(int(comp[tip]))
            if joins and _accepted(means[:met_at + 1], step, link_min_mean):
                path, means = path[:met_at + 1], means[:met_at + 1]
            elif met_at < stop_at:
                continue  # met its own fragment, or another too dimly, or no fragment where it came back
            else:
                meet = -1  # met it only beyond the usual stop: the march up to there stands alone
        if meet < 0:  # cut the trailing samples below the stop level
            path, means = path[:stop_at], means[:stop_at]
            good = np.flatnonzero(np.asarray(means) >= stop_mean)
            if not good.size or not _accepted(means[:good[-1] + 1], step, min_mean):
                continue
            path, means = path[:good[-1] + 1], means[:good[-1] + 1]
        if meet >= 0:
            root[find(int(comp[tip]))] = find(int(comp[meet if meet < n else source[meet - n]]))
            line = np.concatenate([pos_um[[tip]], np.asarray(path), targets[[meet]]])
            mid = line[len(line) // 2] / voxel
            length = float(np.linalg.norm(np.diff(line, axis=0), axis=1).sum())
            links.append((mid[0], mid[1], mid[2], length, float(np.mean(means))))
        # A node every other sample (about one per voxel-size step), the last one included.
        chosen = list(range(1, len(path), 2))
        if meet < 0 and chosen[-1:] != [len(path) - 1]:
            chosen.append(len(path) - 1)
        prev = tip
        for k in chosen:
            index = n + len(new_pos)
            new_pos.append(path[k] / voxel)
            new_edges.append((prev, index))
            source.append(tip)
            prev = index
        if meet >= 0:
            new_edges.append((prev, meet))
    if not new_pos:
        return none[0], np.asarray(new_edges, np.int64).reshape(-1, 2), none[2], links
    return np.asarray(new_pos), np.asarray(new_edges, np.int64), np.asarray(source, np.int64), links


def _smooth(pos: np.ndarray, edges: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """One 3-node moving average over degree-2 nodes; ends, branch points and ``fixed`` stay."""
    adj = _Adjacency(pos.shape[0], edges)
    inner = np.flatnonzero((adj.degree == 2) & ~np.asarray(fixed, bool))
    ends = np.array([adj[i] for i in inner.tolist()], np.int64).reshape(-1, 2)
    out = pos.copy()
    out[inner] = (pos[ends[:, 0]] + pos[inner] + pos[ends[:, 1]]) / 3
    return out


def _component_lengths(pos_um: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = pos_um.shape[0]
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    seg = np.linalg.norm(pos_um[edges[:, 0]] - pos_um[edges[:, 1]], axis=1) if len(edges) else np.zeros(0)
    lengths = np.bincount(comp[edges[:, 0]], weights=seg, minlength=comp.max() + 1) if len(edges) else \
        np.zeros(comp.max() + 1)  # fmt: skip
    return comp, lengths


# --------------------------------------------------------------------------- entry point


def _face_ports(fg: np.ndarray, voxel: np.ndarray, faces: Sequence[bool], soma_centres: np.ndarray,
                soma_radii: np.ndarray) -> tuple[list[int], list[list[int]]]:  # fmt: skip
    """Ports on the block's shared faces: flat indices into ``fg``.

    Each 8-connected foreground region of a face plane gets one port: the maximum of the
    region's 2D distance transform, ties going to the first voxel in raster order of the
    plane. Two blocks sharing the plane see the same voxels, so they pick the same port.
    A region that cuts a soma (``soma_centres`` in voxels of ``fg``, radii in um) gets no
    port: its voxels are returned per soma instead, so the soma's centre joins the blocks.
    """
    ports: list[int] = []
    at_soma: list[list[int]] = [[] for _ in range(len(soma_centres))]
    for k, shared in enumerate(faces):
        axis, high_side = divmod(k, 2)
        if not shared:
            continue
        index = fg.shape[axis] - 1 if high_side else 0
        plane = np.take(fg, index, axis=axis)
        labels, n = ndimage.label(plane, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        depth = ndimage.distance_transform_edt(plane, sampling=np.delete(voxel, axis))
        tops = _label_argmax(labels.ravel(), depth.ravel(), n)
        coords = list(np.unravel_index(tops, plane.shape))
        coords.insert(axis, np.full(n, index))
        flat = np.ravel_multi_index(tuple(coords), fg.shape)
        soma_of = np.full(n + 1, -1)
        for i, (centre, radius) in enumerate(zip(soma_centres, soma_radii, strict=True)):
            # Regions of the plane within the soma's radius of its centre belong to it.
            d = np.abs(centre[axis] - index) * voxel[axis]
            if d > radius:
                continue
            pz, py = np.delete(centre, axis)
            sy, sx = np.delete(voxel, axis)
            yy, xx = np.ogrid[:plane.shape[0], :plane.shape[1]]
            near = ((yy - pz) * sy) ** 2 + ((xx - py) * sx) ** 2 <= radius**2 - d**2
            soma_of[np.unique(labels[near & plane])] = i
        for lab in range(1, n + 1):
            if soma_of[lab] < 0:
                ports.append(int(flat[lab - 1]))
            else:
                where = list(np.nonzero(labels == lab))
                where.insert(axis, np.full(where[0].size, index))
                at_soma[soma_of[lab]].extend(np.ravel_multi_index(tuple(where), fg.shape).tolist())
    return ports, at_soma


def _somata(shape: Sequence[int], inside: np.ndarray, depth: np.ndarray, voxel: np.ndarray,
            soma_radius: float) -> list[int]:  # fmt: skip
    """Soma centres (flat indices into a block of ``shape``), deepest first; ``inside`` and
    ``depth``: the foreground's flat indices and distance transform (from :func:`_distance`).

    A soma is a compact deep core (the region deeper than ``soma_radius``, reaching no
    further than its own depth from its deepest voxel); a thick neurite's core is long and
    thin. Blocks look for somata in their whole read region, so a soma cut by a block face
    is found whole, by every block that sees it.
    """
    deep = depth > soma_radius
    if not deep.any():
        return []
    coords = np.stack(np.unravel_index(inside[deep], shape), axis=1)
    corner = coords.min(axis=0)
    dt = np.zeros(coords.max(axis=0) + 1 - corner, np.float32)  # over the deep voxels' box only: small
    dt[tuple((coords - corner).T)] = depth[deep]
    labels, _ = _label26(dt > 0)
    found = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        core_depth = dt[sl] * (labels[sl] == lab)
        offset = np.array([s.start for s in sl])
        top = np.asarray(np.unravel_index(int(np.argmax(core_depth)), core_depth.shape)) + offset
        core = np.argwhere(core_depth > max(soma_radius, 0.6 * core_depth.max())) + offset
        extent = np.sqrt((((core - top) * voxel) ** 2).sum(axis=1)).max()
        if extent <= dt[tuple(top)]:
            found.append((-float(dt[tuple(top)]), int(np.ravel_multi_index(tuple(top + corner), shape))))
    return [v for _, v in sorted(found)]  # deepest first, then raster order: deterministic


def _join_contacts(seed_of: np.ndarray, contacts: np.ndarray) -> np.ndarray:
    """Edges joining the trees of one component where their fronts met (a spanning forest)."""
    root = {int(s): int(s) for s in np.unique(seed_of)}

    def find(c: int) -> int:
        while root[c] != c:
            root[c] = root[root[c]]
            c = root[c]
        return c

    joins = []
    for a, b in contacts.tolist():
        ra, rb = find(int(seed_of[a])), find(int(seed_of[b]))
        if ra != rb:
            root[ra] = rb
            joins.append((a, b))
    return np.asarray(joins, np.int64).reshape(-1, 2)


def trace_block(
    prob: npt.ArrayLike,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    high: float = 128,
    low: float = 64,
    seeds: npt.ArrayLike | None = None,
    origin: Sequence[int] = (0, 0, 0),
    inner: Sequence[slice] | None = None,
    port_faces: Sequence[bool] = (False,) * 6,
    soma_radius: float = 2.5,
    scoop: float = 0.5,
    spur_factor: float = 1.0,
    min_length: float = 3.0,
    smooth: bool = True,
    bridge_distance: float = 6.0,
    bridge_angle: float = 60.0,
    bridge_min_mean: float = 32.0,
    bridge_facing_distance: float = 9.0,
    bridge_facing_min_mean: float = 24.0,
    bridge_short: float = 4.0,
    bridge_dim: bool | None = None,
    extend: bool | None = None,
    extend_min_mean: float = 44.0,
    extend_length: float = 20.0,
    extend_link_min_mean: float = 40.0,
) -> Fragments:
    """Trace one block of a neurite probability map by voxel scooping.

    Parameters
    ----------
    prob : (z, y, x) array
        Probability scaled to 0-255 (uint8 maps as written by ``predict``; for a raw
        image use :func:`raw_to_probability` first): the block's read region.
    voxel_size : (z, y, x)
        Voxel size in um.
    high, low : float
        Hysteresis thresholds on ``prob``.
    seeds : (k, 3) array_like of int, optional
        Seed voxels ``z, y, x`` (coordinates of ``prob``); traced after somata, before the
        rest. A seed's node is marked (:attr:`Fragments.seed`): never pruned, its fragment
        always kept, its tree rooted there. Seeds outside the foreground or outside
        ``inner`` are ignored.
    origin : (z, y, x)
        Global position of ``prob[0, 0, 0]``, added to the output positions.
    inner : three slices, optional
        The part of ``prob`` this block traces (default: all of it). The rest is context:
        hysteresis, the distance transform and soma detection see it, so neighbouring
        blocks agree on the voxels they share.
    port_faces : six bools
        Faces of ``inner`` shared with a neighbouring block, in the order z-low, z-high,
        y-low, y-high, x-low, x-high. Each foreground region on a shared face gets a port
        (see :func:`_face_ports`): a seed and a node both neighbours place on the same voxel.
    soma_radius : float
        Distance-transform depth (um) above which a maximum is a soma.
    scoop : float
        Scooping distance in local diameters (nodes every ~``scoop`` x diameter). The
        default 0.5 (one node per local radius) follows curved neurites closer than 1.0
        did: higher length-F1 and weak-branch recall on the accuracy benchmark.
    spur_factor : float
        Terminal branches with less cable than this many local diameters outside the
        footprint of the rest of the tree are pruned (0: keep); see :func:`_prune_spurs`.
    min_length : float
        Fragments with less cable (um), no soma and no port are dropped.
    smooth : bool
        3-node moving average of node positions along paths.
    bridge_distance : float
        Largest gap (um) bridging may close; 0 disables bridging.
    bridge_angle : float
        Largest turn (degrees) between a tip's direction and its bridge.
    bridge_min_mean : float
        Least mean probability (0-255) along a bridge.
    bridge_facing_distance, bridge_facing_min_mean : float
        The same for two tips that point at each other (a neurite broken in two), in place
        of the two above: longer and dimmer gaps close than between a tip and a fragment's
        side. The defaults were chosen on held-out stand-in maps
        (``benchmarks/gap_limits.py``): the best mean length F1 among settings that cost
        at most 0.005 of precision at any intensity.
    bridge_short : float
        Bridges no longer than this (um) need no probability along them (see
        :func:`bridge_tips`): the network's map of a neurite breaks at bright boutons and
        junctions. Chosen by ``benchmarks/bridge_short.py`` on the default network's maps of
        OP_1-OP_4: the best length F1 of the neuron at the gold root, all output's F1 kept.
    bridge_dim : bool, optional
        Hysteresis after bridging (``None``: yes): dim fragments (``>= low``, never
        ``>= high``) are traced and kept when bridges join them, directly or in a chain, to
        a bright one. ``False``: classic hysteresis, only components reaching ``high`` (and
        those touching a shared face) are traced; better for raw images, whose ``>= low``
        background structure bridging would otherwise bring in.
    extend : bool, optional
        Tip extension (``None``: yes): each tip's march along the probability ridge beyond
        the foreground (:func:`extend_tips`) is kept when its mean probability reaches
        ``extend_min_mean`` over at least 5 um, up to ``extend_length`` um. Off for raw
        images, like ``bridge_dim``.
    extend_min_mean, extend_length : float
        Least mean probability (0-255) of a kept extension; longest march (um; 0 disables).
    extend_link_min_mean : float
        Least mean probability of an extension that joins another fragment (at most
        ``extend_min_mean``): a march that reaches a fragment along its tip's course closes a
        gap, as a bridge does. Chosen like the facing-tip limits, on held-out maps
        (``benchmarks/gap_limits.py``).

    Returns
    -------
    Fragments

    Examples
    --------
    >>> prob = np.zeros((9, 16, 16), np.uint8)
    >>> prob[2:7, 3:13, 3:13] = 220  # a 10x10x5 slab: no soma at the default 2.5 um
    >>> f = trace_block(prob, voxel_size=(1, 1, 1))
    >>> f.n_nodes >= 1, bool(f.soma.any())
    (True, False)

    A tube cut by a shared face at x = 15 ends in a port on that face:

    >>> prob = np.zeros((9, 9, 16), np.uint8); prob[3:6, 3:6, 2:] = 200
    >>> f = trace_block(prob, port_faces=(False,) * 5 + (True,))
    >>> f.positions[f.port].tolist()
    [[4.0, 4.0, 15.0]]
    """
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"prob must be 3-D, got shape {prob.shape}")
    voxel = np.asarray(voxel_size, np.float64)
    inner = tuple(slice(*s.indices(n)[:2]) for s, n in zip(inner, prob.shape, strict=True)) if inner is not None \
        else tuple(slice(0, n) for n in prob.shape)  # fmt: skip
    corner = np.array([s.start for s in inner])
    empty = Fragments(np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros((0, 2), np.int64), np.zeros(0, bool),
                      np.zeros(0, bool), voxel_size=tuple(voxel))  # fmt: skip
    options = dict(voxel_size=voxel_size, high=high, low=low, soma_radius=soma_radius, scoop=scoop,
                   spur_factor=spur_factor, min_length=min_length, smooth=smooth, bridge_distance=bridge_distance,
                   bridge_angle=bridge_angle, bridge_min_mean=bridge_min_mean,
                   bridge_facing_distance=bridge_facing_distance, bridge_facing_min_mean=bridge_facing_min_mean,
                   bridge_short=bridge_short, bridge_dim=bridge_dim, extend=extend, extend_min_mean=extend_min_mean,
                   extend_length=extend_length, extend_link_min_mean=extend_link_min_mean)  # fmt: skip
    bridge_dim = bridge_dim is not False
    bridge_reach = max(bridge_distance, bridge_facing_distance) if bridge_distance > 0 else 0.0
    extend_length = extend_length if extend is not False else 0.0
    # Tip extensions read up to this far beyond the foreground: a cropped trace must see it.
    marching = _extension_reach(voxel, extend_length)
    # A sparse block is traced at the cost of its foreground's extent: first the box of
    # everything >= low (no labelling of empty space), then the box of what can be kept;
    # each holds the shared faces within bridging reach.
    above = prob >= low
    box = _bounding_box(above, grow=1)
    if box is None:
        return empty
    box = _grown(box, marching, prob.shape)
    # Shared faces closer than this matter: bridges (and with them dim fragments) reach them.
    reach = np.ceil(bridge_reach / voxel).astype(np.int64) if bridge_dim else np.zeros(3, np.int64)
    box = _reach_faces(box, inner, port_faces, reach)
    if math.prod(b.stop - b.start for b in box) < 0.5 * prob.size:
        return _trace_cropped(prob, box, inner, port_faces, origin, seeds, **options)
    # Hysteresis after bridging: the components of ``prob >= low`` are traced, and those
    # holding a voxel ``>= high`` are *active*. A dim stretch cut off by a darker gap joins
    # its bright neurite when a bridge reaches it; what stays inactive is dropped below,
    # unless it lies near a shared face (it may reach its bright part through another
    # block: the stitch drops joined neurons with no active node, after its own bridging).
    fg_all, active_all = _within_reach(prob, high, above, inner, port_faces, reach, chains=bridge_dim)
    if not fg_all[inner].any():
        return empty
    box = _reach_faces(_grown(_bounding_box(fg_all, grow=1), marching, prob.shape), inner, port_faces, reach)
    if math.prod(b.stop - b.start for b in box) < 0.5 * prob.size:
        return _trace_cropped(prob, box, inner, port_faces, origin, seeds, **options)
    # From here on the foreground is a list of voxels (flat indices, sorted) with values
    # beside them: the passes cost the foreground, not the block.
    inside_all, depth_all = _distance(fg_all, voxel)
    somata = np.array([np.unravel_index(v, prob.shape) for v in _somata(prob.shape, inside_all, depth_all, voxel,
                                                                         soma_radius)], np.int64).reshape(-1, 3)  # fmt: skip
    soma_depth = _lookup(inside_all, depth_all, np.ravel_multi_index(tuple(somata.T), prob.shape))
    somata -= corner
    prob_all, prob, active, fg = prob, prob[inner], active_all[inner], np.ascontiguousarray(fg_all[inner])
    fg_index = np.flatnonzero(fg)
    in_block = np.stack(np.unravel_index(fg_index, fg.shape), axis=1) + corner
    fg_depth = _lookup(inside_all, depth_all, np.ravel_multi_index(tuple(in_block.T), prob_all.shape))
    owned = np.all((somata >= 0) & (somata < np.asarray(fg.shape)), axis=1)
    ports, at_soma = _face_ports(fg, voxel, port_faces, somata, soma_depth)
    # Seeds, in order: the block's somata, the somata of other blocks cut by a shared face
    # (their face voxels, hung from the soma's centre), ports, the given seeds, then one
    # per foreground component not reached yet (its deepest voxel).
    seed_pos, seed_radius, seed_vox, kinds = [], [], [], []
    for centre, centre_depth, is_owned, faces_vox in zip(somata, soma_depth, owned, at_soma, strict=True):
        if is_owned or faces_vox:
            seed_pos.append(centre)
            seed_radius.append(centre_depth)
            seed_vox.append([int(np.ravel_multi_index(tuple(centre), fg.shape))] if is_owned else faces_vox)
            kinds.append("soma" if is_owned else "soma port")
    singles = list(ports)
    if seeds is not None:
        s = np.rint(np.asarray(seeds, np.float64).reshape(-1, 3)).astype(np.int64) - corner
        s = s[np.all((s >= 0) & (s < np.asarray(fg.shape)), axis=1)]
        s = s[fg[tuple(s.T)]] if s.size else s
        singles.extend(np.unique(np.ravel_multi_index(tuple(s.T), fg.shape)).tolist())
    n_given = len(singles) - len(ports)
    n_lab, labels = _components26(fg, fg_index)
    # All seeds grow at once, so components already seeded get no extra seed.
    taken = [v for vox in seed_vox for v in vox] + singles
    seeded = set(_lookup(fg_index, labels, taken).tolist()) if taken else set()
    if n_lab:
        tops = fg_index[_label_argmax(labels, fg_depth, n_lab)]
        singles.extend(int(tops[i - 1]) for i in range(1, n_lab + 1) if i not in seeded)
    for v, depth in zip(singles, _lookup(fg_index, fg_depth, singles).tolist(), strict=True):
        seed_pos.append(np.unravel_index(v, fg.shape))
        seed_radius.append(depth)
        seed_vox.append([v])
    ptr = np.cumsum([0] + [len(v) for v in seed_vox])
    flat_vox = np.asarray([v for vox in seed_vox for v in vox], np.int64)
    rank = _rank_buffer(fg.size)
    rank[fg_index] = np.arange(1, fg_index.size + 1, dtype=np.int32)
    try:
        pos, parent, radius, seed_of, contacts, seed_node = _scoop(
            rank, fg_depth, np.asarray(seed_pos, np.float64).reshape(-1, 3), np.asarray(seed_radius, np.float64),
            ptr.astype(np.int64), flat_vox, np.asarray(fg.shape, np.int64), voxel, float(scoop))  # fmt: skip
    finally:
        rank[fg_index] = 0  # zero again for the next block
    n = pos.shape[0]
    kind = np.asarray(kinds + ["port"] * len(ports) + ["seed"] * n_given
                      + ["other"] * (len(seed_pos) - len(kinds) - len(ports) - n_given))  # fmt: skip
    made = seed_node >= 0
    soma, port, seeded = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    soma[seed_node[made & np.isin(kind, ["soma", "soma port"])]] = True
    port[seed_node[made & np.isin(kind, ["port", "soma port"])]] = True  # joined by position in the stitch
    seeded[seed_node[made & (kind == "seed")]] = True
    child = np.flatnonzero(parent >= 0)
    edges = np.stack([child, parent[child]], axis=1).astype(np.int64).reshape(-1, 2)
    # Fronts of one component that met (soma, ports, seeds) are joined where they touched.
    edges = np.concatenate([edges, _join_contacts(seed_of, contacts)])
    # Radii: DT depth of the deepest voxel of the cluster, less half a voxel (voxel centres
    # just outside the surface are what the transform measures to).
    radius = np.maximum(radius - 0.5 * voxel.min(), 0.5 * voxel.min())

    # A tree is active when its seed voxel is (all of a tree lies in one component).
    seed_first = flat_vox[ptr[:-1]]
    tree_active = np.zeros(n, bool)
    tree_active[seed_node[seed_node >= 0]] = active[np.unravel_index(seed_first[seed_node >= 0], fg.shape)]
    is_active = tree_active[seed_of]
    # Trees of one component joined where they met share the activity of the component.
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    is_active = (np.bincount(comp, weights=is_active, minlength=comp.max() + 1) > 0)[comp] if n else is_active
    held = soma | port | seeded  # never pruned, bridged from, or moved: they anchor trees and joins
    keep = _prune_spurs(pos * voxel, radius, edges, held, spur_factor)
    _, edges = _renumber(keep, edges)
    pos, radius, soma, port, seeded, held, is_active = (a[keep] for a in (pos, radius, soma, port, seeded, held,
                                                                          is_active))  # fmt: skip

    def sample(a: np.ndarray, b: np.ndarray) -> float:
        idx = tuple(line_voxels(a, b, prob.shape).T)
        return gap_mean(prob[idx], ~fg[idx])

    n_unbridged = len(edges)
    edges, records = bridge_tips(pos, voxel, edges, held, sample, distance=bridge_distance, angle=bridge_angle,
                                 min_mean=bridge_min_mean, facing_distance=bridge_facing_distance,
                                 facing_min_mean=bridge_facing_min_mean, short=bridge_short)  # fmt: skip
    # Drop short fragments without a soma or port (noise specks, lone seeds), and fragments
    # that are inactive, bridges included, unless near a shared face.
    comp, lengths = _component_lengths(pos * voxel, edges)
    anchored = np.bincount(comp, weights=held, minlength=lengths.size) > 0
    is_active = (np.bincount(comp, weights=is_active, minlength=lengths.size) > 0)[comp]
    near_face = np.zeros(pos.shape[0], bool)
    for _, axis, plane in _shared_planes(tuple(slice(0, n) for n in fg.shape), port_faces):
        near_face |= np.abs(pos[:, axis] - plane) * voxel[axis] <= bridge_reach
    reachable = np.bincount(comp, weights=is_active | near_face | seeded, minlength=lengths.size) > 0
    keep = ((lengths >= min_length) | anchored)[comp] & reachable[comp]
    # Review only the bridges that stay: those of dropped fragments are no one's concern.
    records = [r for r, (t, _) in zip(records, edges[n_unbridged:].tolist(), strict=True) if keep[t]]
    _, edges = _renumber(keep, edges)
    pos, radius, soma, port, seeded, held, is_active = (a[keep] for a in (pos, radius, soma, port, seeded, held,
                                                                          is_active))  # fmt: skip
    if extend_length > 0 and pos.shape[0]:
        # The kept fragments' foreground: the components their nodes lie in.
        node_vox = np.ravel_multi_index(tuple(np.clip(np.rint(pos).astype(np.int64), 0, np.asarray(fg.shape) - 1).T),
                                        fg.shape)  # fmt: skip
        kept_labels = _lookup(fg_index, labels, node_vox)
        kept = _paint(fg.shape, fg_index[np.isin(labels, kept_labels[kept_labels > 0])])
        new_pos, new_edges, source, links = extend_tips(prob, kept, pos, voxel, edges, held, min_mean=extend_min_mean,
                                                        max_length=extend_length,
                                                        link_min_mean=extend_link_min_mean)  # fmt: skip
        records += links  # linking extensions are closed gaps, listed for review like bridges
        pos, edges = np.concatenate([pos, new_pos]), np.concatenate([edges, new_edges])
        radius, is_active = np.concatenate([radius, radius[source]]), np.concatenate([is_active, is_active[source]])
        soma, port, seeded, held = (np.concatenate([a, np.zeros(source.size, bool)]) for a in (soma, port, seeded, held))
    if smooth and pos.shape[0]:
        pos = _smooth(pos, edges, held)
    # Confidence: mean probability of the 3x3x3 voxels around each node (clipped at faces;
    # a soma port's node lies outside ``inner``, inside the read region).
    idx = np.clip(np.rint(pos + corner).astype(np.int64), 0, np.asarray(prob_all.shape) - 1)
    around = np.zeros(pos.shape[0])
    for off in _OFFSETS.tolist() + [[0, 0, 0]]:
        q = np.clip(idx + off, 0, np.asarray(prob_all.shape) - 1)
        around += prob_all[q[:, 0], q[:, 1], q[:, 2]]
    confidence = around / 27 / 255.0
    on_face = np.any((pos < 1.0) | (pos > np.asarray(prob.shape) - 2.0), axis=1)
    bridges = np.array(records, BRIDGE_DTYPE) if records else np.zeros(0, BRIDGE_DTYPE)
    off = np.asarray(origin, np.float64) + corner
    if bridges.size:
        for k, name in enumerate("zyx"):
            bridges[name] += off[k]
    return Fragments(pos + off, radius, confidence, edges, on_face, soma, bridges, active=is_active,
                     voxel_size=tuple(float(v) for v in voxel), port=port, seed=seeded)  # fmt: skip


def _extension_reach(voxel: np.ndarray, length: float) -> np.ndarray:
    """Voxels per axis a tip extension of ``length`` um can read beyond its tip (look-ahead and z-centring included)."""
    if length <= 0:
        return np.zeros(3, np.int64)
    return np.ceil((length + EXTEND_RAY * 2 * voxel.min()) / voxel).astype(np.int64) + 2


def _grown(box: tuple[slice, ...], by: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(b.start - int(g), 0), min(b.stop + int(g), n)) for b, g, n in zip(box, by, shape, strict=True))


def _reach_faces(box: tuple[slice, ...], inner: tuple[slice, ...], port_faces: Sequence[bool],
                 reach: np.ndarray) -> tuple[slice, ...]:  # fmt: skip
    """``box`` grown to hold every shared face plane of ``inner`` within ``reach`` voxels of it.

    The tracer keeps inactive fragments near shared faces (the stitch may join them to a
    bright part in the next block): a cropped trace must see those faces as the whole
    block does.
    """
    box = list(box)
    for _, axis, plane in _shared_planes(inner, port_faces):
        b = box[axis]
        if b.start - reach[axis] <= plane < b.stop + reach[axis]:
            box[axis] = slice(min(b.start, plane), max(b.stop, plane + 1))
    return tuple(box)


def _shared_planes(inner: Sequence[slice], port_faces: Sequence[bool]) -> list[tuple[int, int, int]]:
    """``(face, axis, index)`` of each shared face of ``inner``: the plane it lies in.

    >>> _shared_planes((slice(2, 9), slice(0, 5), slice(0, 5)), (False, True, False, False, True, False))
    [(1, 0, 8), (4, 2, 0)]
    """
    return [(k, k // 2, inner[k // 2].stop - 1 if k % 2 else inner[k // 2].start)
            for k, shared in enumerate(port_faces) if shared]  # fmt: skip


def _trace_cropped(prob: np.ndarray, box: tuple[slice, ...], inner: tuple[slice, ...], port_faces: Sequence[bool],
                   origin: Sequence[int], seeds: npt.ArrayLike | None, **options: Any) -> Fragments:  # fmt: skip
    """:func:`trace_block` on ``prob[box]``: the same result when ``box`` holds all the block's
    foreground (or all of ``prob >= low``) and one voxel around it, at the cost of the box
    instead of the block.

    Every pass of the tracer is then as sparse as the foreground's extent: everything outside
    the box is background, hysteresis, distance transform and somata are the same inside it,
    and the shared faces it holds keep their ports (the same raster order, so the same ties).
    """
    start = np.array([b.start for b in box])
    sub_inner = tuple(slice(max(i.start, b.start) - b.start, max(min(i.stop, b.stop), i.start, b.start) - b.start)
                      for i, b in zip(inner, box, strict=True))  # fmt: skip
    sub_faces = [False] * 6
    for k, axis, plane in _shared_planes(inner, port_faces):
        sub_faces[k] = box[axis].start <= plane < box[axis].stop
    frags = trace_block(prob[box], inner=sub_inner, port_faces=sub_faces, origin=np.asarray(origin) + start,
                        seeds=None if seeds is None else np.asarray(seeds).reshape(-1, 3) - start, **options)  # fmt: skip
    # "On a face" means the block's faces, not the box's.
    local = frags.positions - np.asarray(origin) - np.array([i.start for i in inner])
    size = np.array([i.stop - i.start for i in inner])
    frags.on_face = np.any((local < 1.0) | (local > size - 2.0), axis=1)
    return frags


# --------------------------------------------------------------------------- files (the CLI's edge)

def read_seeds(path: str | Path, *, shape: Sequence[int] | None = None) -> np.ndarray:
    """Seed voxels from a CSV file, as a ``(k, 3)`` array of ``z, y, x``.

    Columns are ``z, y, x`` unless a header names them in another order (``x,y,z`` as
    Fiji and Vaa3D write points); a header without the three names is an error. With
    ``shape``, a seed outside the volume is an error naming its line.

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "s.csv"); _ = open(p, "w").write("x,y,z\\n3,2,1\\n")
    >>> read_seeds(p).tolist()
    [[1.0, 2.0, 3.0]]
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: seed file does not exist")
    rows, lines, order = [], [], [0, 1, 2]
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = [p.strip() for p in line.replace(";", ",").split(",") if p.strip()]
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            if rows or line_no > 1:
                raise InputError(f"{path} line {line_no}: expected three numbers") from None
            names = [p.lower() for p in parts]
            if sorted(names) != ["x", "y", "z"]:
                raise InputError(f"{path} line 1: a header must name the columns z, y, x (in any order), got {line!r}")
            order = [names.index(axis) for axis in "zyx"]
            continue
        if len(values) != 3:
            raise InputError(f"{path} line {line_no}: expected three numbers, got {len(values)}")
        rows.append([values[i] for i in order])
        lines.append(line_no)
    seeds = np.asarray(rows, np.float64).reshape(-1, 3)
    if shape is not None:
        outside = np.flatnonzero(np.any((np.rint(seeds) < 0) | (np.rint(seeds) >= np.asarray(shape)), axis=1))
        if outside.size:
            z, y, x = seeds[outside[0]]
            raise InputError(f"{path} line {lines[outside[0]]}: seed z={z:g}, y={y:g}, x={x:g} lies outside the "
                             f"volume of shape {tuple(int(n) for n in shape)}")  # fmt: skip
    return seeds


#: Volumes up to this many voxels are traced as one block unless ``trace.block`` says otherwise.
SINGLE_BLOCK_VOXELS = 2**27
#: Block shape for larger volumes.
DEFAULT_BLOCK = (256, 256, 256)
_STATE = "trace.json"


@dataclass(frozen=True)
class TraceResult:
    """What :func:`trace_volume` wrote."""

    out: Path
    shape: tuple[int, int, int]
    neurons: int
    somata: int
    nodes: int
    cable_um: float
    review: int
    blocks: int
    empty: int
    resumed: int
    seconds: float

    @property
    def voxels_per_second(self) -> float:
        return math.prod(self.shape) / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        """A few lines for the terminal."""
        return (f"wrote {self.out}: {self.neurons} neuron(s) ({self.somata} with a soma), {self.nodes} nodes, "
                f"{self.cable_um:.1f} um of cable; {self.review} place(s) to check in review.csv\n"
                f"  {self.blocks} block(s): {self.empty} empty, {self.resumed} done before; {self.seconds:.1f} s "
                f"({self.voxels_per_second / 1e6:.2f} Mvoxel/s)")  # fmt: skip


def block_faces(block: Block, shape: Sequence[int]) -> tuple[tuple[slice, slice, slice], tuple[bool, ...]]:
    """The region a block traces (its write region plus the one-voxel overlap) and its shared faces.

    Blocks overlap by one voxel: each extends one voxel past its high faces, so every
    inner face plane is traced by both neighbours, who place the same ports on it.

    Examples
    --------
    >>> from neurotrace_dask.blocks import BlockGrid
    >>> region, faces = block_faces(BlockGrid((10, 10, 10), 5)[1], (10, 10, 10))
    >>> region[2], faces
    (slice(5, 10, None), (False, True, False, True, True, False))
    """
    region = tuple(slice(w.start, min(w.stop + 1, n)) for w, n in zip(block.write, shape, strict=True))
    faces = tuple(flag for w, n in zip(block.write, shape, strict=True) for flag in (w.start > 0, w.stop < n))
    return region, faces  # type: ignore[return-value]


def _stored_any(array: zarr.Array, region: Sequence[slice]) -> bool:
    """Whether any storage object (chunk or shard) under ``region`` exists: empty ones are never written."""
    from zarr.core.sync import sync

    unit = getattr(array, "shards", None) or array.chunks
    ranges = [range(s.start // u, -(-s.stop // u)) for s, u in zip(region, unit, strict=True)]
    store, prefix = array.store_path.store, array.store_path.path
    for coords in itertools.product(*ranges):
        key = array.metadata.encode_chunk_key(coords)
        if sync(store.exists(f"{prefix}/{key}" if prefix else key)):
            return True
    return False


def trace_grid_block(prob: np.ndarray, block: Block, shape: Sequence[int], *, voxel_size: Sequence[float],
                     config: TraceConfig | None = None, seeds: np.ndarray | None = None) -> Fragments:  # fmt: skip
    """Trace one block of a :class:`~neurotrace_dask.blocks.BlockGrid` (ports on its shared faces).

    ``prob`` is the block's read region of a volume of ``shape``; ``seeds`` are global
    voxels. The records of all blocks join with :func:`neurotrace_dask.stitch.join_fragments`.

    Examples
    --------
    >>> from neurotrace_dask.blocks import BlockGrid
    >>> from neurotrace_dask.stitch import join_fragments
    >>> prob = np.zeros((9, 9, 40), np.uint8); prob[3:6, 3:6, 4:36] = 200
    >>> grid = BlockGrid(prob.shape, (9, 9, 16), halo=4)
    >>> records = [trace_grid_block(prob[b.read], b, prob.shape, voxel_size=(1, 1, 1)) for b in grid]
    >>> len(records), join_fragments(records).fragments.to_swc().n_trees
    (3, 1)
    """
    config = config or TraceConfig()
    region, faces = block_faces(block, shape)
    start = np.array([r.start for r in block.read])
    inner = tuple(slice(g.start - o, g.stop - o) for g, o in zip(region, start, strict=True))
    return trace_block(prob, voxel_size=voxel_size, origin=start, inner=inner, port_faces=faces,
                       seeds=None if seeds is None else np.asarray(seeds) - start, **trace_options(config))  # fmt: skip


def trace_options(config: TraceConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`trace_block` that ``config`` sets.

    Examples
    --------
    >>> trace_options(TraceConfig(low=50))["low"]
    50.0
    """
    names = ("high", "low", "soma_radius", "scoop", "spur_factor", "min_length", "smooth", "bridge_distance",
             "bridge_angle", "bridge_min_mean", "bridge_facing_distance", "bridge_facing_min_mean", "bridge_short",
             "bridge_dim",
             "extend", "extend_min_mean", "extend_length", "extend_link_min_mean")  # fmt: skip
    return {name: getattr(config, name) for name in names}


def _trace_task(block: Block, *, image: str, folder: str, shape: tuple[int, int, int], voxel: Float3, raw: bool,
                noise: tuple[float, float] | None, seeds: np.ndarray | None, config: TraceConfig,
                markers: DoneMarkers) -> bool:  # fmt: skip
    """Trace one block and write its record; whether it held foreground."""
    from .io.omezarr import open_image, read_region

    array = open_image(image)[0][0]
    frags = None
    if raw:  # see trace_block: raw images keep classic hysteresis and no tip extension
        config = config.model_copy(update={k: False for k in ("bridge_dim", "extend") if getattr(config, k) is None})
    if raw or _stored_any(array, block.read):
        data = read_region(array, block.read, image)
        prob = raw_to_probability(data, voxel_size=voxel, high=config.high, low=config.low, k_high=config.k_high,
                                  k_low=config.k_low, background_sigma=config.background_sigma, noise=noise) \
            if raw else data  # fmt: skip
        frags = trace_grid_block(prob, block, shape, voxel_size=voxel, config=config, seeds=seeds)
        if frags.n_nodes:
            frags.save(Path(folder) / f"{block.id:08d}.npz")
    markers.mark_done(block)
    return frags is not None and frags.n_nodes > 0


def _line_sampler(array: zarr.Array, name: Path, raw: bool, noise: tuple[float, float] | None, voxel: np.ndarray,
                  config: TraceConfig) -> Callable[[np.ndarray, np.ndarray], float]:  # fmt: skip
    """Mean probability along a gap between two voxel positions, read from the store (a few voxels)."""
    from .io.omezarr import read_region

    shape = np.asarray(array.shape)
    margin = np.ceil(3 * config.background_sigma / voxel).astype(int) + 2

    def sample(a: np.ndarray, b: np.ndarray) -> float:
        idx = line_voxels(a, b, shape)
        if not raw:
            values = np.asarray(array.get_coordinate_selection(tuple(idx.T)))
            return gap_mean(values, values < config.low)
        lo, hi = np.maximum(idx.min(axis=0) - margin, 0), np.minimum(idx.max(axis=0) + margin + 1, shape)
        box = raw_to_probability(read_region(array, [slice(x, y) for x, y in zip(lo, hi, strict=True)], name),
                                 voxel_size=voxel, high=config.high, low=config.low, k_high=config.k_high,
                                 k_low=config.k_low, background_sigma=config.background_sigma, noise=noise)  # fmt: skip
        values = box[tuple((idx - lo).T)]
        return gap_mean(values, values < config.low)

    return sample


def _read_state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _STATE).read_text(encoding="utf-8"))["neurotrace"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(folder: Path, state: dict) -> None:
    tmp = folder / (_STATE + ".tmp")
    tmp.write_text(json.dumps({"neurotrace": state}, indent=1, default=str), encoding="utf-8")
    tmp.replace(folder / _STATE)


def trace_volume(
    image: str | Path,
    out: str | Path,
    config: TraceConfig | None = None,
    *,
    raw: bool = False,
    seeds: str | Path | None = None,
    cluster: ClusterConfig | None = None,
    client: Client | None = None,
) -> TraceResult:
    """Trace a whole OME-Zarr volume by blocks on Dask and stitch the neurons (resumable).

    Each block (``config.block``, plus ``config.halo`` voxels of context) is traced by
    :func:`trace_block` with ports on its shared faces; its record goes to
    ``OUT/fragments/NNNNNNNN.npz`` and a done marker is set. Then
    :func:`neurotrace_dask.stitch.join_fragments` joins the records and
    :func:`neurotrace_dask.stitch.write_neurons` writes ``neurons/NNNN.swc``,
    ``neurons.csv``, ``neurons.swc`` and ``review.csv``. Work happens in ``OUT.partial``,
    renamed to ``OUT`` when finished: a rerun after an interruption resumes there (skipping
    done blocks) when input and parameters are unchanged, and refuses otherwise unless
    ``config.overwrite``.

    Parameters
    ----------
    image : path
        OME-Zarr (level 0): a uint8 probability map (0-255) from ``predict``, or with
        ``raw`` a raw fluorescence image (scaled by :func:`raw_to_probability` with one
        noise scale measured on a sample of blocks).
    out : path
        Output folder.
    config : TraceConfig
    raw : bool
    seeds : path, optional
        CSV of global ``z,y,x`` seed voxels grown first.
    cluster, client
        Where to run: an open ``client`` (left open), else a cluster made from
        ``cluster``. A volume of one block is traced in this process.

    Examples
    --------
    >>> trace_volume("prob.ome.zarr", "traced", TraceConfig(block=(128, 256, 256))).summary()  # doctest: +SKIP
    """
    from .io.omezarr import open_image, read_region, refuse_constant
    from .stitch import join_fragments, write_neurons

    started = time.perf_counter()
    cfg = config or TraceConfig()
    image, out = Path(image).resolve(), Path(out).resolve()
    partial = out.with_name(out.name + ".partial")
    for path in (out, partial):
        if path == image or image in path.parents or path in image.parents:
            raise OutputError(f"{path}: output and input {image} overlap; choose another output folder")
    if out.exists() and not cfg.overwrite:
        raise OutputError(f"{out}: exists already; pass --overwrite to replace it")
    if out.exists() and _read_state(out) is None:
        raise OutputError(f"{out}: exists and was not written by neurotrace trace; refusing to replace it")
    arrays, voxel = open_image(image)
    refuse_constant(image)
    array = arrays[0]
    if array.ndim != 3:
        raise InputError(f"{image}: expected a 3-D (z, y, x) image, got {array.ndim} dimensions")
    if not raw and array.dtype != np.uint8:
        raise InputError(f"{image}: a probability map must be uint8 (0-255), got {array.dtype}; "
                         "pass --raw for a raw image")  # fmt: skip
    shape = tuple(int(n) for n in array.shape)
    seed_points = read_seeds(seeds, shape=shape) if seeds is not None else None
    if cfg.keep == "seeded" and seed_points is None:
        raise InputError("trace.keep 'seeded' needs --seeds (a CSV of seed voxels)")
    block_shape = cfg.block or (shape if math.prod(shape) <= SINGLE_BLOCK_VOXELS else DEFAULT_BLOCK)
    unit = getattr(array, "shards", None) or array.chunks
    grid = BlockGrid(shape, block_shape, halo=cfg.halo, align=unit if cfg.block or block_shape != shape else 1)
    noise = None
    if raw:  # one noise scale for every block, from up to 8 blocks spread over the volume
        picks = np.unique(np.linspace(0, len(grid) - 1, min(8, len(grid))).round().astype(int))
        residual = [_residual(read_region(array, grid[int(i)].read, image), np.asarray(voxel), cfg.background_sigma).ravel()
                    for i in picks]  # fmt: skip
        residual = np.concatenate(residual)
        med = float(np.median(residual))
        noise = (med, float(np.median(np.abs(residual - med))) * 1.4826)
    params = cfg.model_dump(mode="json", exclude={"overwrite"})
    digest = layout_hash(grid, image=str(image), raw=raw, noise=noise, trace=params,
                         seeds=None if seed_points is None else seed_points.tolist())  # fmt: skip
    state = {"layout_hash": digest, "image": str(image), "raw": raw, "shape": shape, "voxel_size_um": voxel,
             "block": grid.write_shape, "noise": noise, "trace": params, "seeds": str(seeds) if seeds else None,
             "complete": False}  # fmt: skip
    previous = _read_state(partial) if partial.exists() else None
    if partial.exists() and previous is None:
        raise OutputError(f"{partial}: exists and was not written by neurotrace trace; move it away first")
    if previous is not None and previous.get("layout_hash") != digest:
        if not cfg.overwrite:
            raise OutputError(f"{partial}: an interrupted trace with other input or parameters is there; "
                              "pass --overwrite to discard it")  # fmt: skip
        shutil.rmtree(partial)
        previous = None
    fragments = partial / "fragments"
    try:
        fragments.mkdir(parents=True, exist_ok=True)
        if previous is None:
            _write_state(partial, state)
        markers = DoneMarkers.open(partial / "done.zarr", grid, digest)
        todo = markers.pending(grid)
        kwargs = dict(image=str(image), folder=str(fragments), shape=shape, voxel=voxel, raw=raw, noise=noise,
                      seeds=seed_points, config=cfg, markers=markers)  # fmt: skip
        if len(grid) == 1 and client is None:
            outcomes = [_trace_task(b, **kwargs) for b in todo]
        else:
            with open_client(cluster, client) as active:
                outcomes = run_tasks(active, _trace_task, todo, total=len(todo), description="trace",
                                     tasks_per_thread=(cluster or ClusterConfig()).tasks_per_thread, **kwargs)  # fmt: skip
        records = (Fragments.load(p) for p in sorted(fragments.glob("*.npz")))
        neurons = join_fragments(records, sample=_line_sampler(array, image, raw, noise, np.asarray(voxel), cfg),
                                 low=cfg.low, spur_factor=cfg.spur_factor, min_length=cfg.min_length,
                                 bridge_distance=cfg.bridge_distance, bridge_angle=cfg.bridge_angle,
                                 bridge_min_mean=cfg.bridge_min_mean, bridge_facing_distance=cfg.bridge_facing_distance,
                                 bridge_facing_min_mean=cfg.bridge_facing_min_mean,
                                 bridge_short=cfg.bridge_short)  # fmt: skip
        note = [f"traced from {image} by voxel scooping ({'raw' if raw else 'probability'} input), "
                f"{len(grid)} block(s) stitched"]  # fmt: skip
        rows = write_neurons(partial, neurons, comments=note, keep=cfg.keep)
        shutil.rmtree(partial / "done.zarr", ignore_errors=True)
        _write_state(partial, {**state, "complete": True})
        if out.exists():
            old = out.with_name(f"{out.name}.replaced-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old)
        else:
            partial.rename(out)
    except OSError as exc:  # a full disk, a read-only folder: one line naming the output
        error = storage_error(exc, out)
        if error is None:
            raise
        raise error from None
    return TraceResult(out, shape, len(rows), sum(bool(r["has_soma"]) for r in rows), neurons.fragments.n_nodes,
                       float(sum(r["cable_um"] for r in rows)), len(neurons.review), len(grid),
                       len(todo) - sum(outcomes), len(grid) - len(todo), time.perf_counter() - started)  # fmt: skip
