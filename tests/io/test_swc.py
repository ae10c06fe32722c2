"""Tests for neurotrace_dask.io.swc: round trips, validation messages, fuzzing, MorphIO."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neurotrace_dask import __version__
from neurotrace_dask.errors import OutputError, SWCError
from neurotrace_dask.io.swc import SWC, read_swc, write_swc

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Three trees, non-consecutive ids, children listed before their parents.
MULTI_TREE = """\
# made by hand
# second comment line
57 3 4.5 0 1 0.5 12
12 3 4 0 0 0.75 900
900 1 0 0 0 2.5 -1
13 3 0 4 0 1 900
7 2 10 10 10 1 -1
8 2 10 10 11 1 7
31 3 0 4 1 1 13
3 4 -5 -5 -5 0.25 -1
14 3 0 5 1 1 31
15 3 1 4 1 1 31
"""


def write_text(tmp_path: Path, text: str, name: str = "cell.swc") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def edges(swc: SWC) -> Counter:
    """Canonical form: each node as (type, radius, position, parent position or None)."""
    pos = [tuple(p) for p in np.round(swc.xyz, 4).tolist()]
    pidx = swc.parent_index.tolist()
    return Counter(
        (t, round(r, 4), pos[i], None if pidx[i] < 0 else pos[pidx[i]])
        for i, (t, r) in enumerate(zip(swc.types.tolist(), swc.radius.tolist()))
    )


def assert_canonical_layout(swc: SWC) -> None:
    """ids 1..n in file order, parents before children, each tree contiguous from its root."""
    n = swc.n_nodes
    assert swc.ids.tolist() == list(range(1, n + 1))
    parents = swc.parents
    assert np.all((parents == -1) | ((parents >= 1) & (parents < swc.ids)))
    root_of = np.empty(n, dtype=np.int64)
    for i in range(n):  # parents come first, so the root of each parent is known
        root_of[i] = i if parents[i] == -1 else root_of[parents[i] - 1]
    assert np.all(np.diff(root_of) >= 0), "trees are interleaved"


# ----------------------------------------------------------------------------- round trips


def test_round_trip_multi_tree(tmp_path: Path) -> None:
    original = read_swc(write_text(tmp_path, MULTI_TREE))
    assert original.n_nodes == 10 and original.n_trees == 3
    assert original.comments == ("made by hand", "second comment line")
    assert original.roots.tolist() == [2, 4, 7]

    out = write_swc(tmp_path / "out.swc", original, comments=original.comments)
    again = read_swc(out)

    assert edges(again) == edges(original)
    assert again.n_trees == 3
    assert_canonical_layout(again)
    assert again.types.dtype == np.int32 and again.ids.dtype == np.int64 and again.xyz.shape == (10, 3)
    # the user's comments follow the generated header
    assert again.comments[-3:-1] == ("made by hand", "second comment line")
    # per-tree node counts survive, in root order
    assert [t.n_nodes for t in original.trees()] == [7, 2, 1]
    assert [t.n_nodes for t in again.trees()] == [7, 2, 1]


def test_written_file_lists_parent_lines_before_children(tmp_path: Path) -> None:
    out = write_swc(tmp_path / "out.swc", read_swc(write_text(tmp_path, MULTI_TREE)))
    seen: set[int] = set()
    for line in out.read_text().splitlines():
        if line.startswith("#"):
            continue
        node, parent = int(line.split()[0]), int(line.split()[6])
        assert parent == -1 or parent in seen
        seen.add(node)


def test_round_trip_float_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    zyx = rng.uniform(-5000, 5000, size=(200, 3))
    radius = rng.uniform(0, 10, size=200)
    # A chain listed leaf-first: the writer must reverse it, so row i of the result is row 199 - i.
    parent_index = np.append(np.arange(1, 200), -1)
    swc = SWC.from_arrays(zyx, parent_index, radius=radius)
    back = read_swc(write_swc(tmp_path / "chain.swc", swc))
    np.testing.assert_allclose(back.zyx, zyx[::-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(back.radius, radius[::-1], atol=1e-4, rtol=0)
    assert back.parents.tolist() == [-1, *range(1, 200)]


@st.composite
def forests(draw: st.DrawFn) -> tuple[SWC, np.ndarray]:
    n = draw(st.integers(1, 40))
    # parent of the k-th node in creation order: an earlier node or none
    parent_rank = [draw(st.integers(-1, k - 1)) for k in range(n)]
    rows = np.array(draw(st.permutations(range(n))))  # row in the file of each created node
    parent_index = np.array([-1 if p < 0 else rows[p] for p in parent_rank])
    file_parent = np.empty(n, dtype=np.int64)
    file_parent[rows] = parent_index
    ids = draw(st.lists(st.integers(0, 10**9), min_size=n, max_size=n, unique=True))
    # quarter-integer positions are exact in binary and in text, so the canonical form compares exactly
    points = draw(
        st.lists(st.tuples(*[st.integers(-40000, 40000)] * 3), min_size=n, max_size=n, unique=True)
    )
    radius = draw(st.lists(st.integers(0, 400), min_size=n, max_size=n))
    types = draw(st.lists(st.integers(0, 7), min_size=n, max_size=n))
    swc = SWC.from_arrays(
        np.array(points) / 4, file_parent, radius=np.array(radius) / 8, types=types, ids=ids
    )
    return swc, file_parent


@FUZZ
@given(forests())
def test_round_trip_random_forests(tmp_path: Path, forest: tuple[SWC, np.ndarray]) -> None:
    swc, parent_index = forest
    assert swc.n_trees == int(np.sum(parent_index == -1))
    back = read_swc(write_swc(tmp_path / "forest.swc", swc))
    assert back.n_nodes == swc.n_nodes and back.n_trees == swc.n_trees
    assert edges(back) == edges(swc)
    assert_canonical_layout(back)
    assert sorted(t.n_nodes for t in back.trees()) == sorted(t.n_nodes for t in swc.trees())
    assert back.cable_length() == pytest.approx(swc.cable_length())


# ----------------------------------------------------------------------------- lenient parsing


def test_accepts_tabs_crlf_blank_lines_extra_columns_bom_and_trailing_comments(tmp_path: Path) -> None:
    text = "\ufeff# header\r\n\r\n1\t1\t0\t0\t0\t1\t-1\r\n  2 3 1.5e0 0 0 1 1 extra 9  \r\n\t\r\n3 3 2 0 0 1 2 # tip\r\n"
    swc = read_swc(write_text(tmp_path, text))
    assert swc.n_nodes == 3 and swc.parents.tolist() == [-1, 1, 2]
    assert swc.xyz[:, 0].tolist() == [0.0, 1.5, 2.0]
    assert swc.comments == ("header",)


def test_accepts_old_mac_line_endings_and_integral_floats(tmp_path: Path) -> None:
    swc = read_swc(write_text(tmp_path, "1.0 1.0 0 0 0 1 -1.0\r2 3 1 0 0 1 1.0\r"))
    assert swc.ids.tolist() == [1, 2] and swc.parents.tolist() == [-1, 1]


# ----------------------------------------------------------------------------- validation

# (text, line within the text, message fragment); the test prepends a comment line, so the
# file line is one more.
BAD_FILES = {
    "too_few_fields": ("1 1 0 0 0 1 -1\n2 3 1 0 0 1\n", 2, "expected 7 fields"),
    "non_numeric": ("1 1 0 0 0 1 -1\n2 3 1 abc 0 1 1\n", 2, "y is not a number: 'abc'"),
    "nan_coordinate": ("1 1 0 0 0 1 -1\n# c\n2 3 1 0 nan 1 1\n", 3, "z is not finite"),
    "inf_radius": ("1 1 0 0 0 1 -1\n2 3 1 0 0 inf 1\n", 2, "radius is not finite"),
    "nan_id": ("1 1 0 0 0 1 -1\nnan 3 1 0 0 1 1\n", 2, "id is not finite"),
    "overflow_to_inf": ("1 1 0 0 0 1 -1\n2 3 1e999 0 0 1 1\n", 2, "x is not finite"),
    "non_integer_id": ("1 1 0 0 0 1 -1\n2.5 3 1 0 0 1 1\n", 2, "id must be an integer, found 2.5"),
    "non_integer_type": ("1 1 0 0 0 1 -1\n2 3.2 1 0 0 1 1\n", 2, "type must be an integer"),
    "non_integer_parent": ("1 1 0 0 0 1 -1\n2 3 1 0 0 1 1.5\n", 2, "parent must be an integer"),
    "negative_id": ("1 1 0 0 0 1 -1\n-4 3 1 0 0 1 1\n", 2, "id must be non-negative"),
    "duplicate_id": ("5 1 0 0 0 1 -1\n6 3 1 0 0 1 5\n\n5 3 2 0 0 1 6\n", 4, "duplicate id 5 (first on line 2)"),
    "negative_radius": ("1 1 0 0 0 1 -1\n2 3 1 0 0 -0.5 1\n", 2, "radius must be non-negative, found -0.5"),
    "missing_parent": ("1 1 0 0 0 1 -1\n2 3 1 0 0 1 1\n17 3 1 0 0 1 40\n", 3, "parent 40 of node 17 does not exist"),
    "negative_parent": ("1 1 0 0 0 1 -1\n2 3 1 0 0 1 -2\n", 2, "parent -2 of node 2 does not exist"),
    "self_parent": ("1 1 0 0 0 1 -1\n2 3 1 0 0 1 1\n3 3 1 0 0 1 3\n", 3, "node 3 is its own parent"),
    # line 2 only leads into the cycle 3 -> 4 -> 5 -> 3; the first node on the cycle is on line 3
    "cycle": (
        "1 1 0 0 0 1 -1\n9 3 0 0 0 1 3\n3 3 0 0 0 1 5\n4 3 0 0 0 1 3\n5 3 0 0 0 1 4\n",
        3,
        "node 3 is on a parent cycle of 3 nodes (3 -> 5 -> 4 -> 3)",
    ),
    "cycle_without_any_root": ("1 3 0 0 0 1 2\n2 3 0 0 0 1 1\n", 1, "node 1 is on a parent cycle"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_validation_errors_name_file_and_line(tmp_path: Path, case: str) -> None:
    text, line, fragment = BAD_FILES[case]
    path = write_text(tmp_path, "# header\n" + text, name=f"{case}.swc")
    with pytest.raises(SWCError) as info:
        read_swc(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path} line {line + 1}: "), message
    assert fragment in message


def test_first_bad_line_is_reported(tmp_path: Path) -> None:
    good = "".join(f"{i} 3 0 0 {i} 1 {i - 1 if i > 1 else -1}\n" for i in range(1, 5000))
    path = write_text(tmp_path, good + "5000 3 0 0 x 1 4999\n5001 3 0 0\n")
    with pytest.raises(SWCError, match=r"cell\.swc line 5000: z is not a number"):
        read_swc(path)
    path = write_text(tmp_path, good + "5000 3 0 0 0 -1 4999\n5001 3 0 0 nan 1 5000\n")
    with pytest.raises(SWCError, match=r"cell\.swc line 5000: radius"):
        read_swc(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n#\n", "   \t\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(SWCError, match=r"cell\.swc contains no nodes"):
        read_swc(write_text(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SWCError, match=r"nothere\.swc does not exist"):
        read_swc(tmp_path / "nothere.swc")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(SWCError, match="is a directory"):
        read_swc(tmp_path)


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b"1 1 0 0 0 1 -1\n2 3 \xff\xfe 0 0 1 1\n",
        "1 1 0 0 0 1 -1\n".encode("utf-16"),
    ],
)
def test_binary_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "cell.swc"
    path.write_bytes(data)
    with pytest.raises(SWCError, match=r"cell\.swc") as info:
        read_swc(path)
    assert "\n" not in str(info.value)


def test_latin1_comment_is_read_and_latin1_data_names_line(tmp_path: Path) -> None:
    path = tmp_path / "cell.swc"
    path.write_bytes(b"# radius in \xb5m\n1 1 0 0 0 1 -1\n2 3 1 1 1 1 1\n")
    assert read_swc(path).n_nodes == 2
    path.write_bytes(b"# ok\n1 1 0 0 0 1 -1\n2 3 1 1 1\xb5 1 1\n")
    with pytest.raises(SWCError, match=r"cell\.swc line 3: z is not a number"):
        read_swc(path)


# ----------------------------------------------------------------------------- fuzzing


def read_or_swc_error(path: Path) -> None:
    try:
        swc = read_swc(path)
    except SWCError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert isinstance(swc, SWC) and swc.n_nodes > 0


@FUZZ
@given(st.text(max_size=300))
def test_fuzz_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.swc"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    read_or_swc_error(path)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.swc"
    path.write_bytes(data)
    read_or_swc_error(path)


TOKENS = st.sampled_from(
    ["1", "2", "3", "0", "-1", "-2", "1.5", "1e3", "1e400", "nan", "-inf", "x", "#", "1_0", "٣", "", "\r", "2.0"]
)


@FUZZ
@given(st.lists(st.lists(TOKENS, max_size=9), max_size=12), st.sampled_from([" ", "\t", "  "]))
def test_fuzz_swc_like_lines(tmp_path: Path, rows: list[list[str]], sep: str) -> None:
    path = tmp_path / "fuzz.swc"
    path.write_text("\n".join(sep.join(row) for row in rows), encoding="utf-8")
    read_or_swc_error(path)


# ----------------------------------------------------------------------------- writer


def test_header_and_ids(tmp_path: Path) -> None:
    swc = SWC.from_arrays([[0, 0, 0], [1, 2, 3]], [-1, 0], ids=[0, 7])
    out = write_swc(
        tmp_path / "h.swc", swc, voxel_size_zyx=(2.0, 0.5, 0.25), units="um", comments=["traced by me", "line\nbreak"]
    )
    lines = out.read_text().splitlines()
    assert lines[:6] == [
        f"# software: neurotrace_dask {__version__}",
        "# units: um",
        "# voxel_size_zyx: 2 0.5 0.25",
        "# traced by me",
        "# line",
        "# break",
    ]
    assert lines[-2:] == ["1 3 0.0 0.0 0.0 1.0 -1", "2 3 3.0 2.0 1.0 1.0 1"]
    custom = write_swc(tmp_path / "c.swc", swc, software="other 1.2")
    assert custom.read_text().startswith("# software: other 1.2\n# units: voxel\n")


def test_writer_rejects_bad_arguments(tmp_path: Path) -> None:
    swc = SWC.from_arrays([[0, 0, 0]], [-1])
    with pytest.raises(ValueError, match="units"):
        write_swc(tmp_path / "a.swc", swc, units="mm")
    with pytest.raises(ValueError, match="voxel_size_zyx"):
        write_swc(tmp_path / "a.swc", swc, voxel_size_zyx=(1, 0, 1))
    with pytest.raises(ValueError, match="no nodes"):
        write_swc(tmp_path / "a.swc", SWC.from_arrays(np.zeros((0, 3)), []))
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cell.swc"
    target.write_text("previous contents\n")
    swc = SWC.from_arrays([[0, 0, 0], [0, 0, 1]], [-1, 0])

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match=r"cell\.swc cannot be written: No space left on device"):
        write_swc(target, swc)
    assert target.read_text() == "previous contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cell.swc"]  # no temporary file left behind

    monkeypatch.undo()
    write_swc(target, swc)
    assert read_swc(target).n_nodes == 2
    assert [p.name for p in tmp_path.iterdir()] == ["cell.swc"]


def test_write_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot be written"):
        write_swc(tmp_path / "no" / "cell.swc", SWC.from_arrays([[0, 0, 0]], [-1]))


# ----------------------------------------------------------------------------- container


def test_from_arrays_zyx_and_properties() -> None:
    swc = SWC.from_arrays([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [-1, 0, -1], radius=[1, 2, 3], types=[1, 3, 2])
    assert swc.xyz.tolist() == [[3, 2, 1], [6, 5, 4], [9, 8, 7]]
    assert swc.zyx.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert swc.ids.tolist() == [1, 2, 3] and swc.parents.tolist() == [-1, 1, -1]
    assert swc.roots.tolist() == [0, 2] and swc.n_trees == 2 and swc.n_nodes == 3
    assert swc.xyz.dtype == np.float64 and swc.types.dtype == np.int32 and swc.parents.dtype == np.int64
    with pytest.raises(ValueError):
        swc.xyz[0, 0] = 5  # read-only
    first, second = swc.trees()
    assert first.ids.tolist() == [1, 2] and first.parent_index.tolist() == [-1, 0]
    assert second.ids.tolist() == [3] and second.radius.tolist() == [3.0]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"parents": [-1, 5]}, "parent 5 of node 2 does not exist"),
        ({"parents": [2, 1]}, "parent cycle"),
        ({"ids": [1, 1], "parents": [-1, 1]}, "duplicate id 1"),
        ({"radius": [1.0, -1.0]}, "negative"),
        ({"xyz": [[0, 0, 0], [0, np.nan, 0]]}, "not finite"),
        ({"ids": [1.5, 2]}, "integers"),
        ({"xyz": [[0, 0], [0, 0]]}, "shape"),
    ],
)
def test_constructor_validates(kwargs: dict, fragment: str) -> None:
    fields = {"ids": [1, 2], "types": [1, 3], "xyz": np.zeros((2, 3)), "radius": [1.0, 1.0], "parents": [-1, 1]}
    with pytest.raises(ValueError) as info:
        SWC(**{**fields, **kwargs})
    assert fragment in str(info.value)


def test_from_arrays_rejects_bad_parent_index() -> None:
    with pytest.raises(ValueError, match=r"parent_index\[1\] = 2"):
        SWC.from_arrays(np.zeros((2, 3)), [-1, 2])


def test_cable_length() -> None:
    # root at the origin; chain along x (3) then y (4); a branch along z (2); a diagonal in z and x
    zyx = [[0, 0, 0], [0, 0, 3], [0, 4, 3], [2, 0, 0], [1, 0, 1]]
    swc = SWC.from_arrays(zyx, [-1, 0, 1, 0, 0])
    assert swc.cable_length() == pytest.approx(3 + 4 + 2 + np.sqrt(2))
    assert swc.cable_length(scale_zyx=(2.0, 1.0, 1.0)) == pytest.approx(3 + 4 + 4 + np.sqrt(5))
    assert swc.cable_length(scale_zyx=(1.0, 0.5, 0.25)) == pytest.approx(0.75 + 2 + 2 + np.sqrt(1 + 0.0625))
    # several trees add up; lone roots add nothing
    two = SWC.from_arrays([*zyx, [9, 9, 9], [9, 9, 10]], [-1, 0, 1, 0, 0, -1, 5])
    assert two.cable_length() == pytest.approx(swc.cable_length() + 1)
    assert SWC.from_arrays([[1, 1, 1]], [-1]).cable_length() == 0.0
    with pytest.raises(ValueError, match="scale_zyx"):
        swc.cable_length(scale_zyx=(1, 1))


# ----------------------------------------------------------------------------- MorphIO


def test_morphio_loads_written_file(tmp_path: Path) -> None:
    morphio = pytest.importorskip("morphio")
    if hasattr(morphio, "set_maximum_warnings"):
        morphio.set_maximum_warnings(0)
    # MorphIO needs a soma: the root has type 1 (soma), all other nodes type 3 (dendrite).
    # Soma, then a dendrite a1-a2-a3 that forks at a3 into b1-b2 and c1: three sections.
    # Listed children-first with scrambled ids to exercise the writer's reordering.
    zyx = np.array(
        [
            [0, 0, 0],  # soma
            [0, 0, 10],  # a1
            [0, 0, 20],  # a2
            [0, 0, 30],  # a3 (fork)
            [0, 5, 40],  # b1
            [0, 10, 50],  # b2
            [0, -5, 40],  # c1
        ],
        dtype=float,
    )
    parent = [-1, 0, 1, 2, 3, 4, 3]
    file_order = [5, 6, 2, 0, 4, 1, 3]  # row in the file of each node above
    rows = np.empty(7, dtype=int)
    rows[file_order] = np.arange(7)
    swc = SWC.from_arrays(
        zyx[rows],
        [-1 if parent[r] < 0 else file_order[parent[r]] for r in rows],
        radius=np.array([4.0, 1, 1, 1, 0.5, 0.5, 0.75])[rows],
        types=np.array([1, 3, 3, 3, 3, 3, 3])[rows],
        ids=np.array([40, 3, 99, 17, 8, 1000, 2])[rows],
    )
    path = write_swc(tmp_path / "neuron.swc", swc, units="um")
    m = morphio.Morphology(str(path))

    np.testing.assert_allclose(m.soma.points, [[0, 0, 0]])
    np.testing.assert_allclose(m.soma.diameters, [8.0])
    assert len(m.root_sections) == 1
    assert len(m.sections) == 3
    # every dendrite node appears, as x, y, z; MorphIO repeats the fork point at the start of children
    assert {tuple(p) for p in m.points.tolist()} == {tuple(p) for p in zyx[1:, ::-1].tolist()}
    assert len(m.points) == 6 + 2
    trunk, *branches = m.sections
    np.testing.assert_allclose(trunk.points, zyx[1:4, ::-1])
    assert sorted(len(s.points) for s in branches) == [2, 3]
    assert {int(t) for t in m.section_types} == {3}
