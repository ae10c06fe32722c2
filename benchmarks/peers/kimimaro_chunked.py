"""kimimaro chunked the igneous way: skeletonize 1-voxel-overlapping chunks, then merge.

Run in the peers' venv (``make peers``):

    .peers/bin/python benchmarks/peers/kimimaro_chunked.py CHUNKS_DIR OUT.swc --anisotropy Z Y X

CHUNKS_DIR holds ``*.npz`` files, each with ``mask`` (a (z, y, x) bool chunk that overlaps its
high-side neighbours by one voxel) and ``origin`` (its global z, y, x). As in igneous'
skeletonizing and merge tasks: every chunk is skeletonized with ``fix_borders=True`` (so
skeletons meet at the same voxel on shared faces), translated to global coordinates, then all
fragments are merged (``Skeleton.simple_merge`` + ``consolidate``) and post-processed
(``kimimaro.postprocess``: dust and ticks). Prints one JSON line: seconds (skeletonize +
merge, excluding file reads), chunks, vertices. OUT.swc is in voxel coordinates (x, y, z).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from run_peer import KIMIMARO_DUST, KIMIMARO_TEASAR, KIMIMARO_TICK, tree_rows, write_swc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chunks", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--anisotropy", nargs=3, type=float, default=(1.0, 1.0, 1.0), metavar=("Z", "Y", "X"))
    args = parser.parse_args()
    import kimimaro
    from osteoid import Skeleton

    az, ay, ax = args.anisotropy
    files = sorted(args.chunks.glob("*.npz"))
    seconds = 0.0
    fragments = []
    for path in files:
        with np.load(path) as f:
            mask, origin = f["mask"], f["origin"]
        start = time.perf_counter()
        skels = kimimaro.skeletonize(mask.astype(np.uint8).T, teasar_params=dict(KIMIMARO_TEASAR),
                                     anisotropy=(ax, ay, az), dust_threshold=0, fix_branching=True,
                                     fix_borders=True, progress=False, parallel=1)  # fmt: skip
        for skel in skels.values():
            skel.vertices = skel.vertices + np.array([origin[2] * ax, origin[1] * ay, origin[0] * az], np.float32)
            fragments.append(skel)
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    merged = Skeleton.simple_merge(fragments).consolidate() if fragments else Skeleton()
    rows = []
    for skel in merged.components() if len(merged.vertices) else []:
        skel = kimimaro.postprocess(skel, dust_threshold=KIMIMARO_DUST, tick_threshold=KIMIMARO_TICK)
        if len(skel.vertices) == 0:
            continue
        pts = np.asarray(skel.vertices, dtype=float) / np.array([ax, ay, az])
        part = tree_rows(pts, skel.edges, np.asarray(skel.radii, dtype=float) / ax)
        off = len(rows)
        rows.extend((i + off, t, x, y, z, r, p + off if p > 0 else -1) for i, t, x, y, z, r, p in part)
    seconds += time.perf_counter() - start
    write_swc(args.out, rows, ["kimimaro chunked (igneous-style merge)"])
    print(json.dumps({"seconds": seconds, "chunks": len(files), "vertices": len(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
