"""Stitch per-block fragments into whole-volume neurons, and write them.

Every block of a volume is traced on its own (:func:`neurotrace_dask.trace.trace_block`
with ports on its shared faces); :func:`join_fragments` makes one graph of them and
:func:`write_neurons` writes one SWC per neuron, an index and a review list.

How the join works
------------------
1. **Port identity.** Neighbouring blocks overlap by one voxel and place a port node on the
   same integer voxel of their shared face without talking to each other, so nodes are
   merged by exact global integer position (ports, and somata, which every block seeing a
   soma places on its centre): an exact join, not a nearest-neighbour guess. The one
   exception are *twins*: a neurite running inside a shared face plane is traced by both
   blocks, a voxel apart, so nodes near a face from different blocks closer than one voxel
   are merged too.
2. **Cycles are broken** by keeping the maximum spanning forest of edge confidence (the
   lower confidence of its two nodes); each dropped edge is listed for review.
3. **Gaps across block faces are bridged** like tips inside a block
   (:func:`neurotrace_dask.trace.bridge_tips`: KD-tree search, direction and mean
   probability along the bridge), but only between nodes of different blocks: gaps inside
   a block were already considered by its own tracer. Then joined neurons without an
   *active* node (one whose foreground reached the high threshold) are dropped: hysteresis
   across blocks, after bridging, as inside a block.
4. **Spurs** shorter than the local diameter are pruned and fragments with less than
   ``min_length`` um of cable and no soma are dropped; each tree is rooted at its largest
   soma.

Memory grows with the number of nodes, never with voxels: records are read one at a time
and no step opens the volume (bridging samples only the voxels along each candidate line).

Examples
--------
>>> from neurotrace_dask.trace import trace_block
>>> prob = np.zeros((9, 9, 40), np.uint8); prob[3:6, 3:6, 4:36] = 200
>>> left = trace_block(prob[:, :, :21], port_faces=(False,) * 5 + (True,))
>>> right = trace_block(prob[:, :, 20:], origin=(0, 0, 20), port_faces=(False,) * 4 + (True, False))
>>> neurons = join_fragments([left, right])
>>> neurons.fragments.to_swc().n_trees, len(neurons.review)
(1, 0)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from scipy.spatial import cKDTree

from .io.swc import write_swc
from .trace import Fragments, _component_lengths, _prune_spurs, _renumber, bridge_tips

__all__ = ["REVIEW_FIELDS", "Neurons", "join_fragments", "write_neurons"]

#: Columns of ``review.csv``.
REVIEW_FIELDS = ("rank", "kind", "neuron", "z", "y", "x", "length_um", "confidence", "risk")


@dataclass
class Neurons:
    """The stitched graph of a volume, and the places to review.

    Attributes
    ----------
    fragments : Fragments
        All nodes and edges in global voxel coordinates (a forest: no cycles).
    review : list of dict
        One row per place to check (keys ``kind, z, y, x, length_um, confidence, risk``):
        ``bridge`` (a gap closed by bridging), ``cycle`` (an edge dropped to break a loop),
        ``low_confidence`` (a stretch of nodes whose surroundings lie below the low
        threshold).
    """

    fragments: Fragments
    review: list[dict[str, float | str]] = field(default_factory=list)


def _merge_groups(positions: np.ndarray, held: np.ndarray, on_face: np.ndarray, block: np.ndarray,
                  voxel: np.ndarray) -> np.ndarray:  # fmt: skip
    """Representative row of every node after the join.

    Held nodes (ports, somata) on the same integer voxel are one node. So are *twins*: nodes
    near a block face, from different blocks, less than one voxel (the largest voxel edge)
    apart -- both blocks trace a neurite that runs inside their shared face plane, each a
    little to its own side.
    """
    n = positions.shape[0]
    pairs = [np.zeros((0, 2), np.int64)]
    rows = np.flatnonzero(held)
    if rows.size:
        _, first, inverse = np.unique(np.rint(positions[rows]).astype(np.int64), axis=0, return_index=True,
                                      return_inverse=True)  # fmt: skip
        pairs.append(np.stack([rows, rows[first[inverse.ravel()]]], axis=1))
    rows = np.flatnonzero(on_face)
    if rows.size > 1:
        close = cKDTree(positions[rows] * voxel).query_pairs(float(voxel.max()), output_type="ndarray")
        close = rows[close]
        pairs.append(close[block[close[:, 0]] != block[close[:, 1]]])
    pairs = np.concatenate(pairs)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    return first[labels]


def _break_cycles(n: int, edges: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum spanning forest of edge confidence; returns (kept edges, dropped edges)."""
    if edges.shape[0] == 0:
        return edges, edges
    weight = 2.0 - np.minimum(confidence[edges[:, 0]], confidence[edges[:, 1]])  # >= 1: never zero
    forest = minimum_spanning_tree(coo_matrix((weight, (edges[:, 0], edges[:, 1])), shape=(n, n))).tocoo()

    def key(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # one number per undirected edge
        return np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)

    in_forest = np.isin(key(edges[:, 0], edges[:, 1]), key(forest.row, forest.col))
    return edges[in_forest], edges[~in_forest]


def _low_confidence_stretches(frags: Fragments, threshold: float, min_nodes: int = 3) -> list[dict]:
    """Runs of at least ``min_nodes`` connected nodes whose confidence is below ``threshold``."""
    low = frags.confidence < threshold
    e = frags.edges[low[frags.edges[:, 0]] & low[frags.edges[:, 1]]]
    n = frags.n_nodes
    _, labels = connected_components(coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)), directed=False)
    rows = []
    voxel = np.asarray(frags.voxel_size)
    # Low nodes and low edges grouped by component (stable: ascending nodes, edges in order).
    nodes = np.flatnonzero(low)
    if nodes.size == 0:
        return rows
    nodes = nodes[np.argsort(labels[nodes], kind="stable")]
    node_groups = np.split(nodes, np.flatnonzero(np.diff(labels[nodes])) + 1)
    e = e[np.argsort(labels[e[:, 0]], kind="stable")]
    edge_bounds = np.searchsorted(labels[e[:, 0]], [labels[g[0]] for g in node_groups] + [n])
    for k, members in enumerate(node_groups):
        if members.size < min_nodes:
            continue
        inside = e[edge_bounds[k]:edge_bounds[k + 1]]
        length = float(np.linalg.norm((frags.positions[inside[:, 0]] - frags.positions[inside[:, 1]]) * voxel,
                                      axis=1).sum())  # fmt: skip
        mid = frags.positions[members[len(members) // 2]]
        conf = float(frags.confidence[members].mean())
        rows.append(dict(kind="low_confidence", z=mid[0], y=mid[1], x=mid[2], length_um=length, confidence=conf,
                         risk=float(np.clip(1 - conf / threshold, 0, 1)) if threshold > 0 else 0.0))  # fmt: skip
    return rows


def join_fragments(
    records: Iterable[Fragments],
    *,
    sample: Callable[[np.ndarray, np.ndarray], float] | None = None,
    low: float = 64,
    spur_factor: float = 1.0,
    min_length: float = 3.0,
    bridge_distance: float = 6.0,
    bridge_angle: float = 60.0,
    bridge_min_mean: float = 32.0,
    bridge_facing_distance: float = 9.0,
    bridge_facing_min_mean: float = 24.0,
    bridge_short: float = 4.0,
) -> Neurons:
    """Join per-block fragment records into one forest of neurons.

    Parameters
    ----------
    records : iterable of Fragments
        One record per block, in global coordinates (read lazily: one at a time).
    sample : callable, optional
        ``sample(a, b)`` gives the mean probability (0-255) along the gap between two
        voxel positions; without it no gaps are bridged across block faces.
    low : float
        The tracer's low threshold; nodes whose confidence (x 255) falls below it mark
        low-confidence stretches for review.
    spur_factor, min_length, bridge_distance, bridge_angle, bridge_min_mean
        As for :func:`neurotrace_dask.trace.trace_block`.
    bridge_facing_distance, bridge_facing_min_mean
        As for :func:`neurotrace_dask.trace.trace_block`: two tips pointing at each other.
    bridge_short
        As for :func:`neurotrace_dask.trace.trace_block`: bridges this short need no probability.

    Returns
    -------
    Neurons

    Examples
    --------
    See the module docstring.
    """
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("positions", "radius", "confidence", "edges", "soma",
                                                           "port", "active", "seed", "on_face", "block",
                                                           "bridges")}  # fmt: skip
    n = 0
    voxel_size = (1.0, 1.0, 1.0)
    for b, frags in enumerate(records):
        voxel_size = frags.voxel_size
        for key in ("positions", "radius", "confidence", "soma", "port", "active", "seed", "on_face", "bridges"):
            parts[key].append(getattr(frags, key))
        parts["edges"].append(frags.edges + n)
        parts["block"].append(np.full(frags.n_nodes, b, np.int64))
        n += frags.n_nodes
    voxel = np.asarray(voxel_size, np.float64)
    review: list[dict] = []
    reach = max(bridge_distance, bridge_facing_distance)  # the longest bridge, for the review's risk
    if n == 0:
        empty = Fragments(np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros((0, 2), np.int64), np.zeros(0, bool),
                          np.zeros(0, bool), voxel_size=voxel_size)  # fmt: skip
        return Neurons(empty, review)
    pos, radius, confidence = (np.concatenate(parts[k]) for k in ("positions", "radius", "confidence"))
    soma, port, active, seed, on_face, block = (np.concatenate(parts[k]) for k in ("soma", "port", "active", "seed",
                                                                                    "on_face", "block"))  # fmt: skip
    edges = np.concatenate(parts["edges"]).reshape(-1, 2)
    for r in np.concatenate(parts["bridges"]):
        review.append(dict(kind="bridge", z=r["z"], y=r["y"], x=r["x"], length_um=r["length_um"],
                           confidence=r["mean_probability"] / 255, risk=_bridge_risk(r["length_um"],
                           r["mean_probability"], reach)))  # fmt: skip

    # 1. Port identity (and twins along shared faces).
    rep = _merge_groups(pos, soma | port, on_face, block, voxel)
    np.maximum.at(radius, rep, radius.copy())
    for flag in (soma, active, seed):
        np.logical_or.at(flag, rep, flag.copy())
    conf_sum = np.bincount(rep, weights=confidence, minlength=n)
    count = np.bincount(rep, minlength=n)
    keep = rep == np.arange(n)
    fused = count > 1
    confidence = np.where(keep, conf_sum / np.maximum(count, 1), confidence)
    edges = rep[edges]
    edges = edges[edges[:, 0] != edges[:, 1]]
    edges = np.unique(np.sort(edges, axis=1), axis=0) if edges.size else edges.reshape(0, 2)
    _, edges = _renumber(keep, edges)
    pos, radius, confidence, soma, port, active, seed, fused, block = (
        a[keep] for a in (pos, radius, confidence, soma, port, active, seed, fused, block))
    n = pos.shape[0]

    # 2. Cycles: keep the most confident edges.
    edges, dropped = _break_cycles(n, edges, confidence)
    for a, b in dropped.tolist():
        if fused[a] or fused[b]:
            continue  # a loop closed by merging twins, not by the data
        mid = (pos[a] + pos[b]) / 2
        conf = float(min(confidence[a], confidence[b]))
        review.append(dict(kind="cycle", z=mid[0], y=mid[1], x=mid[2],
                           length_um=float(np.linalg.norm((pos[a] - pos[b]) * voxel)), confidence=conf,
                           risk=1 - conf))  # fmt: skip

    # 3. Gaps across block faces.
    if sample is not None:
        edges, records_ = bridge_tips(pos, voxel, edges, soma | seed, sample, distance=bridge_distance,
                                      angle=bridge_angle,
                                      min_mean=bridge_min_mean, facing_distance=bridge_facing_distance,
                                      facing_min_mean=bridge_facing_min_mean, short=bridge_short,
                                      allowed=lambda t, j: block[t] != block[j])  # fmt: skip
        for z, y, x, length, mean in records_:
            review.append(dict(kind="bridge", z=z, y=y, x=x, length_um=length, confidence=mean / 255,
                               risk=_bridge_risk(length, mean, reach)))  # fmt: skip

    # Hysteresis across blocks, after bridging: a neuron needs a bright voxel somewhere.
    _, comp = connected_components(coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)),
                                   directed=False)  # fmt: skip
    keep = (np.bincount(comp, weights=active | seed) > 0)[comp]
    _, edges = _renumber(keep, edges)
    pos, radius, confidence, soma, port, seed = (a[keep] for a in (pos, radius, confidence, soma, port, seed))

    # 4. Spurs (ports are interior now) and short fragments.
    keep = _prune_spurs(pos * voxel, radius, edges, soma | seed, spur_factor)
    _, edges = _renumber(keep, edges)
    pos, radius, confidence, soma, port, seed = (a[keep] for a in (pos, radius, confidence, soma, port, seed))
    comp, lengths = _component_lengths(pos * voxel, edges)
    anchored = np.bincount(comp, weights=soma | seed, minlength=lengths.size) > 0
    keep = (lengths >= min_length)[comp] | anchored[comp]
    _, edges = _renumber(keep, edges)
    pos, radius, confidence, soma, port, seed = (a[keep] for a in (pos, radius, confidence, soma, port, seed))
    on_face = np.zeros(pos.shape[0], bool)
    frags = Fragments(pos, radius, confidence, edges, on_face, soma, voxel_size=voxel_size, port=port, seed=seed)
    review.extend(_low_confidence_stretches(frags, low / 255))
    return Neurons(frags, review)


def _bridge_risk(length: float, mean: float, distance: float) -> float:
    """Longer and darker bridges first: the mean of the gap's length fraction and its darkness."""
    return float(0.5 * min(1.0, length / distance if distance > 0 else 1.0) + 0.5 * (1 - mean / 255))


def _trees(frags: Fragments) -> list[Fragments]:
    """One Fragments per connected component, the longest cable first."""
    voxel = np.asarray(frags.voxel_size)
    comp, lengths = _component_lengths(frags.positions * voxel, frags.edges)
    order = np.argsort(-lengths, kind="stable")
    by_comp = np.argsort(comp, kind="stable")
    bounds = np.searchsorted(comp[by_comp], np.arange(lengths.size + 1))
    edge_comp = comp[frags.edges[:, 0]]
    edge_order = np.argsort(edge_comp, kind="stable")
    edge_bounds = np.searchsorted(edge_comp[edge_order], np.arange(lengths.size + 1))
    local = np.empty(frags.n_nodes, np.int64)
    trees = []
    for c in order:
        rows = by_comp[bounds[c]:bounds[c + 1]]
        local[rows] = np.arange(rows.size)
        e = local[frags.edges[edge_order[edge_bounds[c]:edge_bounds[c + 1]]]]
        trees.append(Fragments(frags.positions[rows], frags.radius[rows], frags.confidence[rows], e,
                               frags.on_face[rows], frags.soma[rows], voxel_size=frags.voxel_size,
                               seed=frags.seed[rows]))  # fmt: skip
    return trees


def write_neurons(
    out: str | Path,
    neurons: Neurons,
    *,
    comments: Sequence[str] = (),
    merged: bool = True,
    keep: str = "all",
) -> list[dict]:
    """Write ``neurons/NNNN.swc``, ``neurons.csv``, ``review.csv`` (and ``neurons.swc``) into ``out``.

    SWC positions are global voxel coordinates ``x y z`` with the voxel size in the header.
    ``neurons.csv`` has one row per neuron (id, soma position, cable length, nodes, tips,
    bounding box, whether a soma was found, whether it grew from a seed); ``review.csv``
    lists the places to check, ranked by ``risk`` (0-1, highest first). ``keep`` picks the
    neurons written: ``all``, ``seeded`` (those holding a seed, rooted there) or ``largest``
    (the one with the most cable); review rows of the others are left out. Returns the
    ``neurons.csv`` rows.

    Examples
    --------
    >>> import tempfile
    >>> from neurotrace_dask.trace import trace_block
    >>> prob = np.zeros((9, 9, 40), np.uint8); prob[3:6, 3:6, 4:36] = 200
    >>> rows = write_neurons(tempfile.mkdtemp(), join_fragments([trace_block(prob)]))
    >>> len(rows), rows[0]["has_soma"]
    (1, False)
    """
    out = Path(out)
    (out / "neurons").mkdir(parents=True, exist_ok=True)
    frags = neurons.fragments
    voxel = frags.voxel_size
    rows: list[dict] = []
    positions: list[np.ndarray] = []
    tree_id: list[np.ndarray] = []  # neuron id of every node of ``positions``
    if keep not in ("all", "seeded", "largest"):
        raise ValueError(f"keep must be all, seeded or largest, got {keep!r}")
    trees = _trees(frags) if frags.n_nodes else []
    if keep == "seeded":
        trees = [t for t in trees if t.seed.any()]
    elif keep == "largest":
        trees = trees[:1]  # _trees sorts by cable, longest first
    if trees:
        for i, tree in enumerate(trees, start=1):
            swc = tree.to_swc()
            write_swc(out / "neurons" / f"{i:04d}.swc", swc, voxel_size_zyx=voxel, comments=comments)
            degree = np.bincount(tree.edges.ravel(), minlength=tree.n_nodes)
            somata = np.flatnonzero(tree.soma)
            soma = tree.positions[somata[np.argmax(tree.radius[somata])]] if somata.size else None
            lo, hi = tree.positions.min(axis=0), tree.positions.max(axis=0)
            rows.append({"id": i, "has_soma": soma is not None, "seeded": bool(tree.seed.any()),
                         "soma_z": "" if soma is None else round(float(soma[0]), 2),
                         "soma_y": "" if soma is None else round(float(soma[1]), 2),
                         "soma_x": "" if soma is None else round(float(soma[2]), 2),
                         "cable_um": round(swc.cable_length(voxel), 3), "nodes": tree.n_nodes,
                         "tips": int((degree <= 1).sum() - (degree[somata] <= 1).sum()),
                         "z0": round(float(lo[0]), 2), "y0": round(float(lo[1]), 2), "x0": round(float(lo[2]), 2),
                         "z1": round(float(hi[0]), 2), "y1": round(float(hi[1]), 2), "x1": round(float(hi[2]), 2)})  # fmt: skip
            positions.append(tree.positions)
            tree_id.append(np.full(tree.n_nodes, i))
        if merged:
            write_swc(out / "neurons.swc", frags.to_swc() if keep == "all" else _forest(trees).to_swc(),
                      voxel_size_zyx=voxel, comments=comments)  # fmt: skip
    columns = ["id", "has_soma", "soma_z", "soma_y", "soma_x", "cable_um", "nodes", "tips",
               "z0", "y0", "x0", "z1", "y1", "x1", "seeded"]  # fmt: skip
    _write_csv(out / "neurons.csv", columns, rows)
    review = sorted(neurons.review, key=lambda r: (-r["risk"], r["z"], r["y"], r["x"]))
    nearest = cKDTree(np.concatenate(positions) * np.asarray(voxel)) if positions else None
    if keep != "all":  # only places on the neurons written: a bridge's midpoint lies within half its length
        review = [r for r in review if nearest is not None and nearest.query(
            np.array([r["z"], r["y"], r["x"]]) * np.asarray(voxel))[0] <= r["length_um"] / 2 + max(voxel)]
    ids = np.concatenate(tree_id) if tree_id else np.zeros(0, np.int64)
    ranked = []
    for rank, r in enumerate(review, start=1):
        neuron = int(ids[nearest.query(np.array([r["z"], r["y"], r["x"]]) * np.asarray(voxel))[1]]) \
            if nearest is not None else ""  # fmt: skip
        ranked.append({"rank": rank, "kind": r["kind"], "neuron": neuron, "z": round(float(r["z"]), 2),
                       "y": round(float(r["y"]), 2), "x": round(float(r["x"]), 2),
                       "length_um": round(float(r["length_um"]), 3), "confidence": round(float(r["confidence"]), 3),
                       "risk": round(float(r["risk"]), 3)})  # fmt: skip
    _write_csv(out / "review.csv", list(REVIEW_FIELDS), ranked)
    return rows


def _forest(trees: Sequence[Fragments]) -> Fragments:
    """Trees (from :func:`_trees`) as one record again."""
    offsets = np.cumsum([0] + [t.n_nodes for t in trees[:-1]])
    cat = {k: np.concatenate([getattr(t, k) for t in trees]) for k in ("positions", "radius", "confidence", "on_face",
                                                                      "soma", "seed")}  # fmt: skip
    edges = np.concatenate([t.edges + o for t, o in zip(trees, offsets)]).reshape(-1, 2)
    return Fragments(cat["positions"], cat["radius"], cat["confidence"], edges, cat["on_face"], cat["soma"],
                     voxel_size=trees[0].voxel_size, seed=cat["seed"])  # fmt: skip


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text.getvalue(), encoding="utf-8")
    tmp.replace(path)
