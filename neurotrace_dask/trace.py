"""Voxel-scooping tracer for one block of a probability map (Rodriguez et al. 2009).

:func:`trace_block` turns a uint8 neurite probability block (0-255) into
:class:`Fragments`: a graph of nodes with radii, confidence and the bridged gaps. It is a
pure function on a numpy block; Dask, files and the CLI live elsewhere.

How it works
------------
1. **Foreground by hysteresis**: voxels ``>= high`` seed, 26-connected voxels ``>= low``
   grow. Dim neurites attached to bright ones survive; isolated dim specks do not.
2. **Seeds**, in priority order: somata (maxima of the Euclidean distance transform,
   in um, deeper than ``soma_radius``), the given ``seeds``, then one seed per
   foreground component not reached yet (its deepest voxel).
3. **Scooping** (numba): every seed starts a front. A front repeatedly takes the
   unvisited foreground voxels 26-adjacent to its current cluster (the next layer) and
   splits them into 26-connected clusters. Two or more clusters make a branch point
   (a node at the current cluster's centroid); none makes a tip. All fronts advance
   one layer per round, so several seeds share a component fairly.
   *Scooping distance*: a front emits a node only once its cluster centroid ``c`` is
   ``scoop * 2 * r`` away from the last node ``p`` (``r``: the cluster's own
   radius, from the distance transform, at least one voxel) -- so there is one node
   per roughly radius-length step, following the local cross-section, not one per
   voxel layer. The node is placed by the size-ratio rule
   ``n = p + 0.5 ** (min(s, sp) / max(s, sp)) * (c - p)`` (``s`` the cluster size,
   ``sp`` the size at the last node): half-way when sizes agree, at the centroid when
   they change sharply (leaving a soma, a partial cross-section at a branch).
   Each voxel is visited once: linear in foreground voxels.
4. **Spur pruning**: terminal branches shorter than ``spur_factor`` times the local
   diameter at their branch point are removed; then fragments shorter than
   ``min_length`` um without a soma are dropped.
5. **Gap bridging**: a tip links to the nearest node of another fragment within
   ``bridge_distance`` um when the bridge turns less than ``bridge_angle`` degrees from
   the tip's direction (and from the other tip's, if it links to a tip) and the mean
   probability sampled along the straight bridge is ``>= bridge_min_mean``. Every
   bridge is recorded for review.
6. **Smoothing**: a 3-node moving average along paths (ends and branch points fixed).

Examples
--------
>>> prob = np.zeros((9, 9, 40), np.uint8)
>>> prob[3:6, 3:6, 4:36] = 200
>>> frags = trace_block(prob)
>>> frags.to_swc().n_trees, frags.n_nodes > 5
(1, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree
from scipy.spatial import cKDTree

from .config import TraceConfig
from .errors import InputError, OutputError
from .io.swc import SWC

__all__ = ["BRIDGE_DTYPE", "Fragments", "TraceResult", "hysteresis", "raw_to_probability", "read_seeds",
           "trace_block", "trace_image"]

Float3 = tuple[float, float, float]

#: Fields of :attr:`Fragments.bridges`: the gap's midpoint (voxels), length and mean probability (0-255).
BRIDGE_DTYPE = np.dtype([("z", "f8"), ("y", "f8"), ("x", "f8"), ("length_um", "f8"), ("mean_probability", "f8")])

_STRUCTURE26 = np.ones((3, 3, 3), bool)


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
    """

    positions: np.ndarray
    radius: np.ndarray
    confidence: np.ndarray
    edges: np.ndarray
    on_face: np.ndarray
    soma: np.ndarray
    bridges: np.ndarray = field(default_factory=lambda: np.zeros(0, BRIDGE_DTYPE))
    voxel_size: Float3 = (1.0, 1.0, 1.0)

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

        Each connected component becomes one tree, rooted at its soma node when it has
        one (the largest), else at an end node. Cycles (possible after stitching) are
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
            if somata.size:
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


def hysteresis(prob: np.ndarray, high: float, low: float) -> np.ndarray:
    """Foreground by hysteresis: 26-connected components of ``prob >= low`` holding a voxel ``>= high``.

    Examples
    --------
    >>> hysteresis(np.array([[[0, 90, 200, 90, 0, 90]]]), 150, 50).astype(int).tolist()
    [[[0, 1, 1, 1, 0, 0]]]
    """
    low_mask = prob >= low
    labels, n = ndimage.label(low_mask, structure=_STRUCTURE26)
    if n == 0:
        return low_mask
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[prob >= high])] = True
    keep[0] = False
    return keep[labels]


def raw_to_probability(
    image: np.ndarray,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    high: float = 128,
    low: float = 64,
    k_high: float = 8.0,
    k_low: float = 4.0,
    background_sigma: float = 3.0,
) -> np.ndarray:
    """Scale a raw fluorescence image to the 0-255 "probability" :func:`trace_block` expects.

    The image smoothed with sigma 1 voxel, minus a Gaussian background of
    ``background_sigma`` um (small: it also removes the autofluorescence haze, which a
    10 um background leaves as false foreground), is measured in robust noise units
    (``z = residual / (1.4826 * MAD)``, centred on the median) and mapped linearly so
    that ``z = k_low`` becomes ``low`` and ``z = k_high`` becomes ``high``. The MAD of
    smoothed, skewed (photon) noise understates its upper tail, hence ``k`` of 8 and 4.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(10, 1, (8, 32, 32)); img[4, 16, 4:28] += 20
    >>> p = raw_to_probability(img)
    >>> int(p[4, 16, 16]) >= 128, int(np.median(p)) < 64
    (True, True)
    """
    img = np.asarray(image, np.float32)
    voxel = np.asarray(voxel_size, float)
    smooth = ndimage.gaussian_filter(img, 1.0)
    background = ndimage.gaussian_filter(img, background_sigma / voxel)
    residual = smooth - background
    med = float(np.median(residual))
    mad = float(np.median(np.abs(residual - med))) * 1.4826
    z = (residual - med) / max(mad, 1e-6)
    slope = (high - low) / (k_high - k_low)
    return np.clip(low + (z - k_low) * slope, 0, 255).round().astype(np.uint8)


# --------------------------------------------------------------------------- numba core

_OFFSETS = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)],
                    np.int64)  # fmt: skip


@numba.njit(cache=True)
def _label_argmax(labels, values, n):  # pragma: no cover - numba
    """Flat index of the largest value of each label 1..n (first in raster order on ties).

    One pass; ``ndimage.maximum_position`` sorts the whole volume instead.
    """
    best = np.full(n + 1, -1, np.int64)
    for v in range(labels.shape[0]):
        lab = labels[v]
        if lab > 0 and (best[lab] < 0 or values[v] > values[best[lab]]):
            best[lab] = v
    return best[1:]


@numba.njit(cache=True)
def _centroid(pool, start, end, shape, dt):  # pragma: no cover - numba
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
        if dt[v] > rmax:
            rmax = dt[v]
    m = end - start
    return cz / m, cy / m, cx / m, rmax


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
def _scoop(fg, dt, seeds, shape, voxel, scoop):  # pragma: no cover - numba
    """Grow all fronts from ``seeds`` (flat indices); return node arrays.

    ``fg`` (flat bool) foreground, ``dt`` (flat float) distance transform in um.
    Returns positions (k, 3), parent (k,), radius (k,), seed_of (k,): row of the seed node
    each node grew from.
    """
    nz, ny, nx = shape[0], shape[1], shape[2]
    nvox = nz * ny * nx
    state = np.zeros(nvox, np.uint8)  # 0 unvisited, 1 in the layer being split, 2 visited
    n_fg = 0
    for v in range(nvox):
        if fg[v]:
            n_fg += 1
    cap = n_fg + seeds.shape[0] + 1
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
    for i in range(seeds.shape[0]):
        v = seeds[i]
        if not fg[v] or state[v] != 0:
            continue
        state[v] = 2
        pool[pool_n] = v
        pos[nn, 0] = v // (ny * nx)
        pos[nn, 1] = (v // nx) % ny
        pos[nn, 2] = v % nx
        parent[nn] = -1
        radius[nn] = dt[v]
        seed_of[nn] = nn
        queue[qtail, 0] = pool_n
        queue[qtail, 1] = pool_n + 1
        queue[qtail, 2] = nn
        queue[qtail, 3] = 1
        qtail += 1
        pool_n += 1
        nn += 1
    layer = np.empty(cap, np.int64)
    stack = np.empty(cap, np.int64)
    child_start = np.empty(cap, np.int64)
    child_end = np.empty(cap, np.int64)
    while qhead < qtail:
        start, end, p, sp = queue[qhead, 0], queue[qhead, 1], queue[qhead, 2], queue[qhead, 3]
        qhead += 1
        # The next layer: unvisited foreground 26-neighbours of the cluster.
        nl = 0
        for k in range(start, end):
            v = pool[k]
            for o in range(26):
                u = _neighbour(v, o, nz, ny, nx)
                if u >= 0 and fg[u] and state[u] == 0:
                    state[u] = 1
                    layer[nl] = u
                    nl += 1
        # Split the layer into 26-connected clusters (each contiguous in the pool).
        nc = 0
        for i in range(nl):
            u = layer[i]
            if state[u] != 1:
                continue
            child_start[nc] = pool_n
            state[u] = 2
            stack[0] = u
            top = 1
            while top > 0:
                top -= 1
                w = stack[top]
                pool[pool_n] = w
                pool_n += 1
                for o in range(26):
                    q = _neighbour(w, o, nz, ny, nx)
                    if q >= 0 and state[q] == 1:
                        state[q] = 2
                        stack[top] = q
                        top += 1
            child_end[nc] = pool_n
            nc += 1
        pz, py, px = pos[p, 0], pos[p, 1], pos[p, 2]
        if nc != 1:
            # A tip (no child) or a branch point: a node at the current cluster's centroid.
            cz, cy, cx, rc = _centroid(pool, start, end, shape, dt)
            d = math.sqrt(((cz - pz) * voxel[0]) ** 2 + ((cy - py) * voxel[1]) ** 2 + ((cx - px) * voxel[2]) ** 2)
            b = p
            if d >= 0.5 * vmin:
                pos[nn, 0] = cz
                pos[nn, 1] = cy
                pos[nn, 2] = cx
                parent[nn] = p
                radius[nn] = rc
                seed_of[nn] = seed_of[p]
                b = nn
                nn += 1
            for c in range(nc):
                queue[qtail, 0] = child_start[c]
                queue[qtail, 1] = child_end[c]
                queue[qtail, 2] = b
                queue[qtail, 3] = end - start
                qtail += 1
            continue
        s = child_end[0] - child_start[0]
        cz, cy, cx, rc = _centroid(pool, child_start[0], child_end[0], shape, dt)
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
    return pos[:nn].copy(), parent[:nn].copy(), radius[:nn].copy(), seed_of[:nn].copy()


# --------------------------------------------------------------------------- graph helpers


def _adjacency(n: int, edges: np.ndarray) -> list[list[int]]:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adj[int(a)].append(int(b))
        adj[int(b)].append(int(a))
    return adj


def _prune_spurs(pos_um: np.ndarray, radius: np.ndarray, edges: np.ndarray, soma: np.ndarray,
                 factor: float) -> np.ndarray:  # fmt: skip
    """Keep-mask of nodes after removing terminal branches shorter than ``factor`` x the local diameter."""
    n = pos_um.shape[0]
    keep = np.ones(n, bool)
    if factor <= 0:
        return keep
    for _ in range(2):  # a second pass catches spurs exposed by the first
        live = edges[keep[edges[:, 0]] & keep[edges[:, 1]]]
        adj = _adjacency(n, live)
        deg = np.array([len(a) for a in adj])
        removed = False
        for tip in np.flatnonzero((deg == 1) & keep & ~soma):
            path, prev, cur, length = [int(tip)], -1, int(tip), 0.0
            while True:
                nxt = [w for w in adj[cur] if w != prev and keep[w]]
                if len(nxt) != 1:
                    break
                length += float(np.linalg.norm(pos_um[nxt[0]] - pos_um[cur]))
                prev, cur = cur, nxt[0]
                if deg[cur] != 2 or soma[cur]:
                    break
                path.append(cur)
            if deg[cur] >= 3 or (soma[cur] and cur != tip):
                if length < factor * 2.0 * radius[cur] and not soma[path].any():
                    keep[path] = False
                    deg[cur] -= 1
                    removed = True
        if not removed:
            break
    return keep


def _renumber(keep: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new = np.cumsum(keep) - 1
    e = edges[keep[edges[:, 0]] & keep[edges[:, 1]]]
    return new, new[e].reshape(-1, 2)


def _sample_line(prob: np.ndarray, fg: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Mean of ``prob`` along the segment a-b (half-voxel steps, nearest voxels) over the gap.

    Only samples outside the foreground count: the fragments' own bright ends must not
    lift a dark gap over the bar.
    """
    k = max(2, int(np.ceil(np.linalg.norm(b - a) * 2)) + 1)
    t = np.linspace(0, 1, k)[:, None]
    idx = np.rint(a + t * (b - a)).astype(np.int64)
    idx = np.clip(idx, 0, np.asarray(prob.shape) - 1)
    values = prob[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64)
    gap = ~fg[idx[:, 0], idx[:, 1], idx[:, 2]]
    return float(values[gap].mean() if gap.any() else values.mean())


def _tip_direction(pos_um: np.ndarray, adj: list[list[int]], tip: int, steps: int = 3) -> np.ndarray | None:
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


def _bridge(prob: np.ndarray, fg: np.ndarray, pos: np.ndarray, voxel: np.ndarray, edges: np.ndarray, soma: np.ndarray,
            distance: float, angle: float, min_mean: float) -> tuple[np.ndarray, list[tuple]]:  # fmt: skip
    """Edges linking tips to other fragments, and the bridges' records."""
    n = pos.shape[0]
    if distance <= 0 or n < 2:
        return edges, []
    pos_um = pos * voxel
    adj = _adjacency(n, edges)
    _, comp = connected_components(coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)),
                                   directed=False)  # fmt: skip
    root = np.arange(comp.max() + 1)

    def find(c: int) -> int:
        while root[c] != c:
            root[c] = root[root[c]]
            c = int(root[c])
        return c

    tips = [i for i in range(n) if len(adj[i]) == 1 and not soma[i]]
    direction = {t: _tip_direction(pos_um, adj, t) for t in tips}
    cos_max = math.cos(math.radians(angle))
    tree = cKDTree(pos_um)
    new_edges, records = [], []
    for t in tips:
        dt_ = direction[t]
        if dt_ is None:
            continue
        best = None
        for j in sorted(tree.query_ball_point(pos_um[t], distance)):
            if find(int(comp[j])) == find(int(comp[t])):
                continue
            v = pos_um[j] - pos_um[t]
            length = float(np.linalg.norm(v))
            if length == 0 or float(v @ dt_) / length < cos_max:
                continue
            dj = direction.get(j)
            if dj is not None and float(-v @ dj) / length < cos_max:
                continue  # linking two tips: both must point at each other
            mean = _sample_line(prob, fg, pos[t], pos[j])
            if mean < min_mean:
                continue
            if best is None or length < best[1]:
                best = (j, length, mean)
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


def _smooth(pos: np.ndarray, edges: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """One 3-node moving average over degree-2 nodes; ends, branch points and ``fixed`` stay."""
    n = pos.shape[0]
    adj = _adjacency(n, edges)
    out = pos.copy()
    for i in range(n):
        if len(adj[i]) == 2 and not fixed[i]:
            out[i] = (pos[adj[i][0]] + pos[i] + pos[adj[i][1]]) / 3
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


def trace_block(
    prob: npt.ArrayLike,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    high: float = 128,
    low: float = 64,
    seeds: npt.ArrayLike | None = None,
    origin: Sequence[int] = (0, 0, 0),
    soma_radius: float = 2.5,
    scoop: float = 1.0,
    spur_factor: float = 1.0,
    min_length: float = 3.0,
    smooth: bool = True,
    bridge_distance: float = 6.0,
    bridge_angle: float = 60.0,
    bridge_min_mean: float = 32.0,
) -> Fragments:
    """Trace one block of a neurite probability map by voxel scooping.

    Parameters
    ----------
    prob : (z, y, x) array
        Probability scaled to 0-255 (uint8 maps as written by ``predict``; for a raw
        image use :func:`raw_to_probability` first).
    voxel_size : (z, y, x)
        Voxel size in um.
    high, low : float
        Hysteresis thresholds on ``prob``.
    seeds : (k, 3) array_like of int, optional
        Seed voxels ``z, y, x`` (block coordinates); traced after somata, before the rest.
        Seeds outside the foreground are ignored.
    origin : (z, y, x)
        Block offset added to the output positions (global coordinates).
    soma_radius : float
        Distance-transform depth (um) above which a maximum is a soma.
    scoop : float
        Scooping distance in local diameters (nodes every ~``scoop`` x radius).
    spur_factor : float
        Terminal branches shorter than this many local diameters are pruned (0: keep).
    min_length : float
        Fragments with less cable (um) and no soma are dropped.
    smooth : bool
        3-node moving average of node positions along paths.
    bridge_distance : float
        Largest gap (um) bridging may close; 0 disables bridging.
    bridge_angle : float
        Largest turn (degrees) between a tip's direction and its bridge.
    bridge_min_mean : float
        Least mean probability (0-255) along a bridge.

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
    """
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"prob must be 3-D, got shape {prob.shape}")
    voxel = np.asarray(voxel_size, np.float64)
    fg = hysteresis(prob, high, low)
    empty = Fragments(np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros((0, 2), np.int64), np.zeros(0, bool),
                      np.zeros(0, bool), voxel_size=tuple(voxel))  # fmt: skip
    if not fg.any():
        return empty
    dt = ndimage.distance_transform_edt(fg, sampling=voxel)
    # Seeds: somata (deepest voxel of each region deeper than soma_radius), given, then the rest.
    seed_list = []
    deep, n_deep = ndimage.label(dt > soma_radius, structure=_STRUCTURE26)
    soma_seeds = []
    if n_deep:
        # A soma is a compact deep core; a thick neurite's core is long and thin.
        for lab, sl in enumerate(ndimage.find_objects(deep), start=1):
            depth = dt[sl] * (deep[sl] == lab)
            core = np.argwhere(depth > max(soma_radius, 0.6 * depth.max())) + [s.start for s in sl]
            top = np.unravel_index(int(np.argmax(depth)), depth.shape)
            top = np.asarray(top) + [s.start for s in sl]
            extent = np.sqrt((((core - top) * voxel) ** 2).sum(axis=1)).max()
            if extent <= dt[tuple(top)]:
                soma_seeds.append(int(np.ravel_multi_index(tuple(top), fg.shape)))
        soma_seeds.sort(key=lambda v: (-dt.flat[v], v))  # deepest first: deterministic
    seed_list.extend(soma_seeds)
    if seeds is not None:
        s = np.asarray(seeds, np.float64).reshape(-1, 3)
        s = np.rint(s).astype(np.int64)
        inside = np.all((s >= 0) & (s < np.asarray(fg.shape)), axis=1)
        seed_list.extend(np.ravel_multi_index(tuple(s[inside].T), fg.shape).tolist())
    labels, n_lab = ndimage.label(fg, structure=_STRUCTURE26)
    # All seeds grow at once, so components already seeded get no extra seed.
    seeded = set(labels.flat[np.asarray(seed_list, np.int64)].tolist()) if seed_list else set()
    if n_lab:
        tops = _label_argmax(labels.ravel(), dt.ravel(), n_lab)
        seed_list.extend(int(tops[i - 1]) for i in range(1, n_lab + 1) if i not in seeded)
    seed_arr = np.asarray(seed_list, np.int64)
    pos, parent, radius, seed_of = _scoop(fg.ravel(), dt.ravel(), seed_arr, np.asarray(fg.shape, np.int64),
                                          voxel, float(scoop))  # fmt: skip
    n = pos.shape[0]
    soma_set = set(int(v) for v in soma_seeds)
    flat_pos = np.ravel_multi_index(tuple(np.rint(pos).astype(np.int64).T), fg.shape)
    soma = (parent < 0) & np.isin(flat_pos, list(soma_set)) if soma_set else np.zeros(n, bool)
    child = np.flatnonzero(parent >= 0)
    edges = np.stack([child, parent[child]], axis=1).astype(np.int64).reshape(-1, 2)
    # Radii: DT depth of the deepest voxel of the cluster, less half a voxel (voxel centres
    # just outside the surface are what the transform measures to).
    radius = np.maximum(radius - 0.5 * voxel.min(), 0.5 * voxel.min())

    keep = _prune_spurs(pos * voxel, radius, edges, soma, spur_factor)
    new, edges = _renumber(keep, edges)
    pos, radius, soma = pos[keep], radius[keep], soma[keep]
    edges, records = _bridge(prob, fg, pos, voxel, edges, soma, bridge_distance, bridge_angle, bridge_min_mean)
    # Drop short fragments without a soma (noise specks, lone seeds).
    comp, lengths = _component_lengths(pos * voxel, edges)
    has_soma = np.bincount(comp, weights=soma, minlength=lengths.size) > 0
    keep = (lengths >= min_length)[comp] | has_soma[comp]
    _, edges = _renumber(keep, edges)
    pos, radius, soma = pos[keep], radius[keep], soma[keep]
    if smooth and pos.shape[0]:
        pos = _smooth(pos, edges, soma)
    # Confidence: mean probability of the 3x3x3 voxels around each node (clipped at faces).
    idx = np.clip(np.rint(pos).astype(np.int64), 0, np.asarray(prob.shape) - 1)
    around = np.zeros(pos.shape[0])
    for off in _OFFSETS.tolist() + [[0, 0, 0]]:
        q = np.clip(idx + off, 0, np.asarray(prob.shape) - 1)
        around += prob[q[:, 0], q[:, 1], q[:, 2]]
    confidence = around / 27 / 255.0
    on_face = np.any((pos < 1.0) | (pos > np.asarray(prob.shape) - 2.0), axis=1)
    bridges = np.array(records, BRIDGE_DTYPE) if records else np.zeros(0, BRIDGE_DTYPE)
    off = np.asarray(origin, np.float64)
    if bridges.size:
        for k, name in enumerate("zyx"):
            bridges[name] += off[k]
    return Fragments(pos + off, radius, confidence, edges, on_face, soma, bridges, voxel_size=tuple(float(v) for v in voxel))


# --------------------------------------------------------------------------- files (the CLI's edge)

#: Largest volume :func:`trace_image` traces as one block (the stitching issue lifts it).
MAX_BLOCK_VOXELS = 2**28


def read_seeds(path: str | Path) -> np.ndarray:
    """Seed voxels ``z, y, x`` from a CSV file (header line optional), as an (k, 3) array.

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "s.csv"); _ = open(p, "w").write("z,y,x\\n1,2,3\\n")
    >>> read_seeds(p).tolist()
    [[1.0, 2.0, 3.0]]
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: seed file does not exist")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = [p.strip() for p in line.replace(";", ",").split(",") if p.strip()]
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            if rows or line_no > 1:
                raise InputError(f"{path} line {line_no}: expected three numbers z,y,x") from None
            continue  # the header
        if len(values) != 3:
            raise InputError(f"{path} line {line_no}: expected three numbers z,y,x, got {len(values)}")
        rows.append(values)
    return np.asarray(rows, np.float64).reshape(-1, 3)


@dataclass(frozen=True)
class TraceResult:
    """What :func:`trace_image` wrote."""

    out: Path
    n_trees: int
    n_nodes: int
    cable_um: float
    n_bridges: int
    seconds: float

    def summary(self) -> str:
        """One line for the CLI."""
        return (f"{self.out}: {self.n_trees} tree(s), {self.n_nodes} nodes, {self.cable_um:.1f} um of cable, "
                f"{self.n_bridges} bridged gap(s) in review.csv ({self.seconds:.1f} s)")  # fmt: skip


def trace_image(
    image: str | Path,
    out: str | Path,
    config: TraceConfig | None = None,
    *,
    raw: bool = False,
    seeds: str | Path | None = None,
) -> TraceResult:
    """Trace a one-block OME-Zarr (level 0) and write ``OUT/neurons/NNNN.swc``, ``neurons.swc``, ``review.csv``.

    ``raw`` marks a raw fluorescence image (scaled by :func:`raw_to_probability`);
    otherwise the input is a 0-255 probability map. ``seeds`` is a CSV of ``z,y,x``
    voxels grown first. An existing ``out`` is refused unless ``config.overwrite``.
    """
    import shutil
    import time

    from .io.omezarr import open_image
    from .io.swc import write_swc

    cfg = config or TraceConfig()
    out = Path(out)
    if out.exists() and not cfg.overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")
    arrays, voxel = open_image(image)
    level0 = arrays[0]
    shape = tuple(level0.shape[-3:])
    if level0.ndim != 3:
        raise InputError(f"{image}: expected a 3-D (z, y, x) image, got {level0.ndim} dimensions")
    if int(np.prod(shape)) > MAX_BLOCK_VOXELS:
        raise InputError(f"{image}: {shape} is larger than one block ({MAX_BLOCK_VOXELS} voxels); "
                         "tracing by blocks comes with the stitching issue")  # fmt: skip
    seed_points = read_seeds(seeds) if seeds is not None else None
    start = time.perf_counter()
    data = np.asarray(level0[...])
    if raw:
        prob = raw_to_probability(data, voxel_size=voxel, high=cfg.high, low=cfg.low, k_high=cfg.k_high,
                                  k_low=cfg.k_low, background_sigma=cfg.background_sigma)  # fmt: skip
    else:
        if data.dtype != np.uint8:
            raise InputError(f"{image}: a probability map must be uint8 (0-255), got {data.dtype}; "
                             "pass --raw for a raw image")  # fmt: skip
        prob = data
    frags = trace_block(prob, voxel_size=voxel, high=cfg.high, low=cfg.low, seeds=seed_points,
                        soma_radius=cfg.soma_radius, scoop=cfg.scoop, spur_factor=cfg.spur_factor,
                        min_length=cfg.min_length, smooth=cfg.smooth, bridge_distance=cfg.bridge_distance,
                        bridge_angle=cfg.bridge_angle, bridge_min_mean=cfg.bridge_min_mean)  # fmt: skip
    seconds = time.perf_counter() - start
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    try:
        (out / "neurons").mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"{out} cannot be created: {e.strerror or e}") from None
    note = [f"traced from {image} by voxel scooping ({'raw' if raw else 'probability'} input)"]
    n_trees = n_nodes = 0
    cable = 0.0
    if frags.n_nodes:
        swc = frags.to_swc()
        write_swc(out / "neurons.swc", swc, voxel_size_zyx=voxel, comments=note)
        for i, tree in enumerate(swc.trees(), start=1):
            write_swc(out / "neurons" / f"{i:04d}.swc", tree, voxel_size_zyx=voxel, comments=note)
        n_trees, n_nodes, cable = swc.n_trees, swc.n_nodes, swc.cable_length(voxel)
    b = frags.bridges
    lines = ["z,y,x,length_um,mean_probability"]
    lines += [f"{r['z']:.2f},{r['y']:.2f},{r['x']:.2f},{r['length_um']:.3f},{r['mean_probability']:.1f}" for r in b]
    (out / "review.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return TraceResult(out, n_trees, n_nodes, cable, int(b.shape[0]), seconds)
