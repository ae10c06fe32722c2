"""Read, validate and write SWC neuron reconstructions.

An SWC file is a table of nodes, one per line, with seven whitespace-separated
columns ``id type x y z radius parent`` (``parent`` is ``-1`` for a root) and
``#`` comment lines. Columns beyond the seventh are ignored, as are blank lines.

:func:`read_swc` validates everything a downstream tool relies on and raises
:class:`~neurotrace_dask.errors.SWCError` with a one-line message naming the file
and the line. :func:`write_swc` writes 1-based consecutive ids with every parent
before its children, one tree after another, atomically.

Positions are stored as in the file (``xyz``); :attr:`SWC.zyx` gives them in the
``img[z, y, x]`` order used by the rest of the package.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, depth_first_order

from neurotrace_dask.errors import OutputError, SWCError

__all__ = ["SWC", "napari_paths", "read_swc", "write_swc"]

_COLUMNS = ("id", "type", "x", "y", "z", "radius", "parent")
_MAX_ID = 2**53  # ids are parsed as float64, which is exact up to here
_MAX_TYPE = 2**31 - 1
_NUMBER = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf(?:inity)?)", re.I)
_CHUNK = 1024  # lines per chunk when looking for the first unparsable line


class _NodeProblem(ValueError):
    """A problem with one node (``row``), found while validating an :class:`SWC`."""

    def __init__(self, row: int, problem: str, first_row: int | None = None) -> None:
        self.row, self.problem, self.first_row = row, problem, first_row
        also = "" if first_row is None else f" (first at row {first_row})"
        super().__init__(f"node at row {row}: {problem}{also}")


@dataclass(frozen=True, eq=False, repr=False)
class SWC:
    """A validated forest of SWC nodes (one or more trees), held as read-only numpy arrays.

    Parameters
    ----------
    ids : (n,) int64
        Node ids: unique, non-negative, in any order.
    types : (n,) int32
        SWC structure types (1 soma, 2 axon, 3 dendrite, 4 apical dendrite, ...).
    xyz : (n, 3) float64
        Positions, columns ``x, y, z`` as in the file.
    radius : (n,) float64
        Radii, ``>= 0``.
    parents : (n,) int64
        Parent id of each node, ``-1`` for roots.
    comments : tuple of str
        Comment lines without the leading ``#``.

    Raises
    ------
    ValueError
        If the arrays have the wrong shapes or types, or do not describe a forest
        (duplicate ids, missing parents, cycles, non-finite positions, negative radii).

    Examples
    --------
    >>> swc = SWC.from_arrays([[0, 0, 0], [0, 0, 3], [0, 4, 3]], [-1, 0, 1])
    >>> swc.n_nodes, swc.n_trees, swc.cable_length()
    (3, 1, 7.0)
    """

    ids: npt.NDArray[np.int64]
    types: npt.NDArray[np.int32]
    xyz: npt.NDArray[np.float64]
    radius: npt.NDArray[np.float64]
    parents: npt.NDArray[np.int64]
    comments: tuple[str, ...] = ()
    # Derived at validation: row of each node's parent (-1 for roots) and a depth-first
    # preorder of the rows (trees one after another, each starting at its root).
    _parent_index: npt.NDArray[np.int64] = field(init=False, repr=False)
    _preorder: npt.NDArray[np.int64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ids = _int_array(self.ids, "ids", np.int64)
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
        n = ids.shape[0]
        types = _int_array(self.types, "types", np.int32)
        parents = _int_array(self.parents, "parents", np.int64)
        xyz = np.array(self.xyz, dtype=np.float64)
        radius = np.array(self.radius, dtype=np.float64)
        for name, arr, shape in (
            ("types", types, (n,)),
            ("xyz", xyz, (n, 3)),
            ("radius", radius, (n,)),
            ("parents", parents, (n,)),
        ):
            if arr.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
        comments = (self.comments,) if isinstance(self.comments, str) else tuple(map(str, self.comments))

        _first_bad(~np.isfinite(xyz).all(axis=1), lambda r: f"position {tuple(xyz[r].tolist())} is not finite")
        _first_bad(~np.isfinite(radius), lambda r: f"radius {radius[r]} is not finite")
        _first_bad(radius < 0, lambda r: f"radius {radius[r]} is negative")
        _first_bad(ids < 0, lambda r: f"id {ids[r]} is negative")
        parent_index = _parent_rows(ids, parents)
        preorder = _forest_preorder(ids, parent_index)

        for name, value in (
            ("ids", ids),
            ("types", types),
            ("xyz", xyz),
            ("radius", radius),
            ("parents", parents),
            ("comments", comments),
            ("_parent_index", parent_index),
            ("_preorder", preorder),
        ):
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def from_arrays(
        cls,
        zyx: npt.ArrayLike,
        parent_index: npt.ArrayLike,
        *,
        radius: npt.ArrayLike = 1.0,
        types: npt.ArrayLike = 3,
        ids: npt.ArrayLike | None = None,
        comments: Iterable[str] = (),
    ) -> SWC:
        """Build an SWC from code, with positions in ``z, y, x`` order and parents as row indices.

        Parameters
        ----------
        zyx : (n, 3) array_like
            Node positions as ``z, y, x`` (the package's volume order).
        parent_index : (n,) array_like of int
            Row of each node's parent in these arrays, ``-1`` for roots.
        radius, types : array_like, optional
            Per-node values or one value for all (default radius 1, type 3 = dendrite).
        ids : (n,) array_like of int, optional
            Node ids; default ``1..n``.
        comments : iterable of str, optional
            Comment lines (without ``#``).

        Returns
        -------
        SWC

        Examples
        --------
        >>> swc = SWC.from_arrays([[5, 1, 2], [5, 1, 3]], [-1, 0], types=[1, 3])
        >>> swc.parents.tolist(), swc.xyz[1].tolist()
        ([-1, 1], [3.0, 1.0, 5.0])
        """
        zyx = np.asarray(zyx, dtype=np.float64)
        if zyx.ndim != 2 or zyx.shape[1] != 3:
            raise ValueError(f"zyx must have shape (n, 3), got {zyx.shape}")
        n = zyx.shape[0]
        pidx = _int_array(parent_index, "parent_index", np.int64)
        if pidx.shape != (n,):
            raise ValueError(f"parent_index must have shape {(n,)}, got {pidx.shape}")
        _bad = np.flatnonzero((pidx < -1) | (pidx >= n))
        if _bad.size:
            r = int(_bad[0])
            raise ValueError(f"parent_index[{r}] = {pidx[r]} is not -1 or a row in 0..{n - 1}")
        node_ids = np.arange(1, n + 1, dtype=np.int64) if ids is None else _int_array(ids, "ids", np.int64)
        if node_ids.shape != (n,):
            raise ValueError(f"ids must have shape {(n,)}, got {node_ids.shape}")
        parents = np.where(pidx < 0, -1, node_ids[np.maximum(pidx, 0)]) if n else node_ids.copy()
        return cls(
            ids=node_ids,
            types=np.broadcast_to(np.asarray(types), (n,)),
            xyz=zyx[:, ::-1],
            radius=np.broadcast_to(np.asarray(radius, dtype=np.float64), (n,)),
            parents=parents,
            comments=(comments,) if isinstance(comments, str) else tuple(comments),
        )

    @classmethod
    def _from_valid(cls, parent_index: np.ndarray, preorder: np.ndarray, **fields: object) -> SWC:
        """Make an SWC from arrays already known to form a valid forest (skips validation)."""
        obj = object.__new__(cls)
        for name, value in (*fields.items(), ("_parent_index", parent_index), ("_preorder", preorder)):
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
            object.__setattr__(obj, name, value)
        return obj

    def __repr__(self) -> str:
        return f"SWC(n_nodes={self.n_nodes}, n_trees={self.n_trees}, comments={len(self.comments)})"

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return int(self.ids.shape[0])

    @property
    def roots(self) -> npt.NDArray[np.intp]:
        """Row indices of the roots (nodes whose parent is ``-1``), in row order."""
        return np.flatnonzero(self.parents == -1)

    @property
    def n_trees(self) -> int:
        """Number of trees (connected components)."""
        return int(np.count_nonzero(self.parents == -1))

    @property
    def parent_index(self) -> npt.NDArray[np.int64]:
        """Row index of each node's parent, ``-1`` for roots (read-only)."""
        return self._parent_index

    @property
    def preorder(self) -> npt.NDArray[np.intp]:
        """Row indices in depth-first order, tree after tree: every parent before its children."""
        return self._preorder

    @property
    def zyx(self) -> npt.NDArray[np.float64]:
        """Positions as an ``(n, 3)`` array in ``z, y, x`` order (a new array)."""
        return np.ascontiguousarray(self.xyz[:, ::-1])

    def trees(self) -> Iterator[SWC]:
        """Yield one SWC per tree, in the order of their roots; nodes keep their relative order.

        Examples
        --------
        >>> swc = SWC.from_arrays([[0, 0, 0], [0, 0, 1], [9, 9, 9]], [-1, 0, -1])
        >>> [t.n_nodes for t in swc.trees()]
        [2, 1]
        """
        if self.n_trees <= 1:
            yield self
            return
        pre = self._preorder
        starts = np.append(np.flatnonzero(self._parent_index[pre] < 0), self.n_nodes)
        for a, b in zip(starts[:-1], starts[1:]):
            segment = pre[a:b]
            rows = np.sort(segment)
            pidx = self._parent_index[rows]
            sub_pidx = np.where(pidx < 0, -1, np.searchsorted(rows, pidx))
            yield SWC._from_valid(
                sub_pidx,
                np.searchsorted(rows, segment),
                ids=self.ids[rows],
                types=self.types[rows],
                xyz=self.xyz[rows],
                radius=self.radius[rows],
                parents=self.parents[rows],
                comments=self.comments,
            )

    def cable_length(self, scale_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
        """Total length of all parent-child edges.

        Parameters
        ----------
        scale_zyx : sequence of 3 floats, optional
            Size of one unit along ``z, y, x`` (e.g. the voxel size in micrometres for
            anisotropic data); the default measures in file units.

        Returns
        -------
        float

        Examples
        --------
        >>> swc = SWC.from_arrays([[0, 0, 0], [1, 0, 0], [1, 3, 0]], [-1, 0, 1])
        >>> swc.cable_length(), swc.cable_length(scale_zyx=(2.0, 1.0, 1.0))
        (4.0, 5.0)
        """
        scale = np.asarray(scale_zyx, dtype=np.float64)
        if scale.shape != (3,) or not np.isfinite(scale).all():
            raise ValueError(f"scale_zyx must be 3 finite numbers (z, y, x), got {scale_zyx!r}")
        child = np.flatnonzero(self._parent_index >= 0)
        d = (self.xyz[child] - self.xyz[self._parent_index[child]]) * scale[::-1]
        return float(np.sqrt(np.einsum("ij,ij->i", d, d)).sum())


def read_swc(path: str | os.PathLike[str]) -> SWC:
    """Read and validate an SWC file.

    Parameters
    ----------
    path : str or path-like
        The ``.swc`` file. Any whitespace separates columns; blank lines, ``#``
        comments, Windows/old-Mac line endings and columns beyond the seventh are accepted.

    Returns
    -------
    SWC
        Nodes in file order; ``comments`` holds the comment lines.

    Raises
    ------
    SWCError
        If the file is missing, unreadable, not text, has no nodes, or has a bad line
        (too few fields, non-numeric, NaN/Inf, non-integer id/type/parent, negative
        radius or id, duplicate id, missing parent, parent cycle). The one-line message
        names the file and the line.

    Examples
    --------
    >>> swc = read_swc("neuron.swc")  # doctest: +SKIP
    >>> swc.n_nodes, swc.n_trees  # doctest: +SKIP
    (5210, 1)
    """
    name = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise SWCError(f"{name} does not exist") from None
    except IsADirectoryError:
        raise SWCError(f"{name} is a directory, not an SWC file") from None
    except OSError as e:
        raise SWCError(f"{name} cannot be read: {e.strerror or e}") from None
    if b"\x00" in raw:
        raise SWCError(f"{name} is not a text SWC file (it contains NUL bytes)")
    # Old public files carry Latin-1 in their comments (a µ as byte 0xB5): keep reading and
    # mark such bytes; in a data line they then fail number parsing with a line number.
    text = raw.decode("utf-8-sig", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    comments: list[str] = []
    data: list[str] = []
    line_nos: list[int] = []
    for no, line in enumerate(text.split("\n"), 1):
        if "#" in line:
            line, _, comment = line.partition("#")
            if not line or line.isspace():
                comments.append(comment.strip())
                continue  # else: a trailing comment after data, ignored
        if line and not line.isspace():
            data.append(line)
            line_nos.append(no)
    if not data:
        raise SWCError(f"{name} contains no nodes")

    table = _parse_table(data, line_nos, name)
    _check_values(table, line_nos, name)
    try:
        return SWC(
            ids=table[:, 0].astype(np.int64),
            types=table[:, 1].astype(np.int32),
            xyz=table[:, 2:5],
            radius=table[:, 5],
            parents=table[:, 6].astype(np.int64),
            comments=tuple(comments),
        )
    except _NodeProblem as e:
        also = "" if e.first_row is None else f" (first on line {line_nos[e.first_row]})"
        raise SWCError(f"{name} line {line_nos[e.row]}: {e.problem}{also}") from None


def write_swc(
    path: str | os.PathLike[str],
    swc: SWC,
    *,
    voxel_size_zyx: Sequence[float] | None = None,
    units: str = "voxel",
    software: str | None = None,
    comments: Iterable[str] = (),
) -> Path:
    """Write an SWC file atomically, with 1-based consecutive ids and parents before children.

    Trees are written one after another, each as a depth-first walk from its root.
    Positions and radii are written as stored, rounded to 4 decimals; ``units`` and
    ``voxel_size_zyx`` are recorded in the header only. The comments of ``swc`` are not
    written automatically: pass ``comments=swc.comments`` to keep them.

    Parameters
    ----------
    path : str or path-like
        Output file; replaced if it exists. The data go to a temporary file in the
        same folder that is renamed over ``path`` at the end.
    swc : SWC
        The reconstruction (one or more trees, at least one node).
    voxel_size_zyx : 3 floats, optional
        Voxel size (z, y, x) to record in the header.
    units : {"voxel", "um"}
        Units of the positions and radii, recorded in the header.
    software : str, optional
        Software name and version for the header; default ``neurotrace_dask <version>``.
    comments : iterable of str, optional
        Extra header lines (without ``#``).

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    OutputError
        If the file cannot be written.
    ValueError
        For an empty ``swc``, unknown ``units`` or a bad ``voxel_size_zyx``.

    Examples
    --------
    >>> swc = SWC.from_arrays([[0, 0, 0], [0, 0, 1]], [-1, 0], types=[1, 3])
    >>> write_swc("out.swc", swc, voxel_size_zyx=(2, 0.5, 0.5))  # doctest: +SKIP
    PosixPath('out.swc')
    """
    from neurotrace_dask import __version__

    if not isinstance(swc, SWC):
        raise TypeError(f"swc must be an SWC, got {type(swc).__name__}")
    if swc.n_nodes == 0:
        raise ValueError("cannot write an SWC with no nodes (an empty SWC file would not read back)")
    if units not in ("voxel", "um"):
        raise ValueError(f"units must be 'voxel' or 'um', got {units!r}")
    header = [f"software: {software or f'neurotrace_dask {__version__}'}", f"units: {units}"]
    if voxel_size_zyx is not None:
        vs = np.asarray(voxel_size_zyx, dtype=np.float64)
        if vs.shape != (3,) or not (np.isfinite(vs).all() and (vs > 0).all()):
            raise ValueError(f"voxel_size_zyx must be 3 positive numbers (z, y, x), got {voxel_size_zyx!r}")
        header.append("voxel_size_zyx: " + " ".join(map(_num, vs.tolist())))
    for comment in (comments,) if isinstance(comments, str) else comments:
        header.extend(str(comment).splitlines() or [""])
    header.append("id type x y z radius parent")

    order = swc._preorder
    new_id = np.empty(swc.n_nodes, dtype=np.int64)
    new_id[order] = np.arange(1, swc.n_nodes + 1)
    pidx = swc._parent_index[order]
    new_parent = np.where(pidx < 0, -1, new_id[np.maximum(pidx, 0)])
    columns = np.round(np.column_stack([swc.xyz[order], swc.radius[order]]), 4) + 0.0  # +0.0: no "-0.0"
    body = map(
        "{} {} {} {} {} {} {}\n".format,
        range(1, swc.n_nodes + 1),
        swc.types[order].tolist(),
        *columns.T.tolist(),
        new_parent.tolist(),
    )
    text = "".join(f"# {line}".rstrip() + "\n" for line in header) + "".join(body)

    final = Path(path)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with open(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OutputError(f"{os.fspath(path)} cannot be written: {e.strerror or e}") from None
    return final


# ----------------------------------------------------------------------------- helpers


def napari_paths(swc: SWC, scale_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> list[np.ndarray]:
    """The tree as polylines for napari's shapes layer: one ``(k, 3)`` z, y, x path per branch.

    A branch runs from a root or branch point to the next branch point or tip. ``scale_zyx``
    converts the stored positions (voxels, for this package's SWCs) to the layer's units.

    Examples
    --------
    >>> swc = SWC.from_arrays([[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, -1, 2]], [-1, 0, 1, 1])
    >>> [p.shape for p in napari_paths(swc)]
    [(2, 3), (2, 3), (2, 3)]

    In napari (outputs of ``neurotrace run``)::

        viewer = napari.Viewer()
        viewer.open("run/image.ome.zarr", plugin="napari-ome-zarr")
        viewer.add_shapes(napari_paths(read_swc("run/traced/neurons/0001.swc")), shape_type="path",
                          edge_color="cyan", edge_width=0.5)
    """
    zyx = swc.zyx * np.asarray(scale_zyx, float)
    parent = swc.parent_index
    children = np.bincount(parent[parent >= 0], minlength=swc.n_nodes)
    only_child = np.full(swc.n_nodes, -1)
    only_child[parent[parent >= 0]] = np.flatnonzero(parent >= 0)  # right where a node has one child
    paths = []
    # Every node that is not the single child of its parent starts a branch at its parent.
    for start in np.flatnonzero(parent >= 0):
        p = parent[start]
        if children[p] == 1 and parent[p] >= 0:
            continue
        path, node = [p, start], start
        while children[node] == 1:
            node = int(only_child[node])
            path.append(node)
        paths.append(zyx[path])
    return paths


def _show(token: str) -> str:
    return repr(token if len(token) <= 40 else token[:37] + "...")


def _num(v: float) -> str:
    return str(int(v)) if np.isfinite(v) and float(v).is_integer() and abs(v) < 1e16 else str(v)


def _int_array(a: npt.ArrayLike, name: str, dtype: type[np.integer]) -> np.ndarray:
    """``a`` as an integer array of ``dtype``; floats are accepted only if integral and in range."""
    arr = np.asarray(a)
    info = np.iinfo(dtype)
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError(f"{name} has values outside the {np.dtype(dtype).name} range")
        return arr.astype(dtype)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError(f"{name} has values outside the {np.dtype(dtype).name} range")
        return arr.astype(dtype)
    raise ValueError(f"{name} must be integers, got {arr.dtype} values")


def _first_bad(mask: np.ndarray, problem: Callable[[int], str]) -> None:
    """Raise :class:`_NodeProblem` for the first row where ``mask`` is true."""
    bad = np.flatnonzero(mask)
    if bad.size:
        r = int(bad[0])
        raise _NodeProblem(r, problem(r))


def _parent_rows(ids: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """Row of each node's parent (-1 for roots); checks ids are unique and parents exist."""
    n = ids.shape[0]
    by_id = np.argsort(ids, kind="stable")
    sorted_ids = ids[by_id]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        second = by_id[dup + 1]
        k = int(np.argmin(second))
        r = int(second[k])
        raise _NodeProblem(r, f"duplicate id {ids[r]}", first_row=int(by_id[dup[k]]))
    pos = np.minimum(np.searchsorted(sorted_ids, parents), max(n - 1, 0))
    found = sorted_ids[pos] == parents if n else np.zeros(0, dtype=bool)
    _first_bad(~found & (parents != -1), lambda r: f"parent {parents[r]} of node {ids[r]} does not exist")
    return np.where(parents == -1, -1, by_id[pos]).astype(np.int64)


def _forest_preorder(ids: np.ndarray, parent_index: np.ndarray) -> np.ndarray:
    """Depth-first preorder of all rows, trees in root order; raises on parent cycles.

    A node is reachable from the roots iff following its parents ends at a root, so a
    walk from a virtual node above all roots misses exactly the nodes on or leading
    into cycles.
    """
    n = parent_index.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rows = np.arange(n)
    src = np.where(parent_index < 0, n, parent_index)
    children = csr_matrix((np.ones(n, dtype=np.int8), (src, rows)), shape=(n + 1, n + 1))
    order = depth_first_order(children, n, directed=True, return_predecessors=False)
    if order.shape[0] == n + 1:
        return order[1:].astype(np.int64)

    # Name the earliest node that lies on a cycle (strongly connected, or its own parent).
    has_parent = parent_index >= 0
    up = csr_matrix(
        (np.ones(int(has_parent.sum()), dtype=np.int8), (rows[has_parent], parent_index[has_parent])),
        shape=(n, n),
    )
    _, labels = connected_components(up, directed=True, connection="strong")
    size = np.bincount(labels)
    r = int(np.flatnonzero((size[labels] > 1) | (parent_index == rows))[0])
    if parent_index[r] == r:
        raise _NodeProblem(r, f"node {ids[r]} is its own parent")
    chain, cur = [ids[r]], int(parent_index[r])
    while cur != r and len(chain) < 5:
        chain.append(ids[cur])
        cur = int(parent_index[cur])
    path = " -> ".join(map(str, chain)) + (" -> " if cur == r else " -> ... -> ") + str(ids[r])
    raise _NodeProblem(r, f"node {ids[r]} is on a parent cycle of {size[labels[r]]} nodes ({path})")


def _loadtxt(lines: list[str]) -> np.ndarray:
    return np.loadtxt(lines, dtype=np.float64, comments=None, usecols=range(7), ndmin=2)


def _parse_table(data: list[str], line_nos: list[int], name: str) -> np.ndarray:
    """The first seven columns of the data lines as an (m, 7) float array."""
    try:
        table = _loadtxt(data)
        if table.shape == (len(data), 7):
            return table
    except Exception:  # noqa: BLE001 - any failure: find and describe the first bad line
        pass
    for start in range(0, len(data), _CHUNK):
        chunk = data[start : start + _CHUNK]
        try:
            if _loadtxt(chunk).shape == (len(chunk), 7):
                continue
        except Exception:  # noqa: BLE001
            pass
        for line, no in zip(chunk, line_nos[start : start + _CHUNK]):
            problem = _line_problem(line)
            if problem:
                raise SWCError(f"{name} line {no}: {problem}")
    raise SWCError(f"{name}: the node table cannot be parsed")  # not expected


def _line_problem(line: str) -> str | None:
    """What is wrong with one data line, or None if it parses."""
    fields = line.split()
    if len(fields) < 7:
        return f"expected 7 fields (id type x y z radius parent), found {len(fields)}"
    for column, token in zip(_COLUMNS, fields):
        if not _NUMBER.fullmatch(token):
            return f"{column} is not a number: {_show(token)}"
    try:
        if _loadtxt([line]).shape == (1, 7):
            return None
    except Exception:  # noqa: BLE001
        pass
    return f"cannot parse {_show(line.strip())}"


def _check_values(table: np.ndarray, line_nos: list[int], name: str) -> None:
    """Raise SWCError for the earliest line with a bad value (NaN/Inf, non-integer, range)."""
    problems: list[tuple[int, str]] = []

    def first(mask: np.ndarray, problem: Callable[[int], str]) -> None:
        bad = np.flatnonzero(mask)
        if bad.size:
            problems.append((int(bad[0]), problem(int(bad[0]))))

    finite = np.isfinite(table)

    def not_finite(r: int) -> str:
        c = int(np.argmin(finite[r]))
        return f"{_COLUMNS[c]} is not finite: {table[r, c]}"

    first(~finite.all(axis=1), not_finite)
    for c in (0, 1, 6):
        col = table[:, c]
        first(
            finite[:, c] & (col != np.floor(col)),
            lambda r, c=c: f"{_COLUMNS[c]} must be an integer, found {float(table[r, c])!r}",
        )
    ids, types, radius, parents = table[:, 0], table[:, 1], table[:, 5], table[:, 6]
    first(ids < 0, lambda r: f"id must be non-negative, found {_num(ids[r])}")
    first(ids > _MAX_ID, lambda r: f"id {_num(ids[r])} is too large")
    first(np.abs(types) > _MAX_TYPE, lambda r: f"type {_num(types[r])} is out of range")
    first(radius < 0, lambda r: f"radius must be non-negative, found {_num(radius[r])}")
    first(
        (parents < -1) | (parents > _MAX_ID),
        lambda r: f"parent {_num(parents[r])} of node {_num(ids[r])} does not exist",
    )
    if problems:
        row, problem = min(problems, key=lambda p: p[0])
        raise SWCError(f"{name} line {line_nos[row]}: {problem}")
