#!/usr/bin/env python3
"""Self-test of run_peer.py: every peer must trace a synthetic Y-shaped tube in place.

    .peers/bin/python benchmarks/peers/selftest.py [--keep DIR] [--methods kimimaro rivulet2 app2]

Renders 40 x 120 x 120 (z, y, x) uint8 stacks, each a bright tube along a known centreline plus
noise, runs ``run_peer.py`` on it for each method in a subprocess, and checks the SWC: valid
(ids 1..n, parents -1 or earlier ids), nodes on the tube (mean distance to the centreline < 2
voxels, 95th percentile < 3) and the tube covered (>= 80% of centreline samples within 3 voxels of a
node). The shape is asymmetric in x, y and z (the trunk runs along x only, the branches climb in
z in opposite directions), so swapped or flipped axes fail. A skipped method (APP2 without an
executable) is reported, not failed. Exit 0 when every method that ran passed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (40, 120, 120)  # z, y, x

# Cases: centreline polyline segments, points as (x, y, z) in voxels.
Y_TUBE = [
    [(8.0, 64.0, 20.0), (60.0, 64.0, 20.0)],  # trunk along x only
    [(60.0, 64.0, 20.0), (108.0, 24.0, 10.0)],  # branch: y down, z down
    [(60.0, 64.0, 20.0), (104.0, 104.0, 30.0)],  # branch: y up, z up
]
CASES = {
    "y_tube": Y_TUBE,
    # one straight line per axis, off centre in the other two, to pin the orientation down
    "line_x": [[(10.0, 30.0, 12.0), (110.0, 30.0, 12.0)]],
    "line_y": [[(90.0, 10.0, 28.0), (90.0, 110.0, 28.0)]],
    "line_z": [[(25.0, 95.0, 4.0), (25.0, 95.0, 36.0)]],
}
RADIUS = 2.5


def centreline_samples(segments, step=0.25):
    pts = []
    for a, b in segments:
        a, b = np.array(a), np.array(b)
        n = max(2, int(np.ceil(np.linalg.norm(b - a) / step)) + 1)
        pts.append(a + np.linspace(0, 1, n)[:, None] * (b - a))
    return np.concatenate(pts)


def render(segments, seed=0):
    """uint8 (z, y, x) stack: Gaussian-profile tube (peak ~210) on noisy background ~N(20, 6)."""
    z, y, x = np.indices(SHAPE, dtype=np.float32)
    grid = np.stack([x, y, z], axis=-1).reshape(-1, 3)
    d2 = np.full(len(grid), np.inf, dtype=np.float32)
    for a, b in segments:
        a, b = np.array(a, np.float32), np.array(b, np.float32)
        ab = b - a
        t = np.clip(((grid - a) @ ab) / float(ab @ ab), 0, 1)
        d2 = np.minimum(d2, ((grid - (a + t[:, None] * ab)) ** 2).sum(1))
    tube = 190.0 * np.exp(-d2 / (2 * (RADIUS / 1.5) ** 2))
    rng = np.random.default_rng(seed)
    vol = 20.0 + tube.reshape(SHAPE) + rng.normal(0, 6, SHAPE)
    return np.clip(np.rint(vol), 0, 255).astype(np.uint8)


def read_swc(path):
    rows = [line.split() for line in open(path) if line.strip() and not line.startswith("#")]
    return np.array([[float(v) for v in r[:7]] for r in rows]).reshape(-1, 7)


def check_swc(table, segments):
    """Return a list of problems (empty when the SWC is valid and on the tube)."""
    problems = []
    n = len(table)
    if n < 2:
        return [f"only {n} node(s)"], None, None, None
    ids, parents = table[:, 0].astype(int), table[:, 6].astype(int)
    if not np.array_equal(ids, np.arange(1, n + 1)):
        problems.append("ids are not 1..n in order")
    if np.any((parents != -1) & ((parents < 1) | (parents >= ids))):
        problems.append("a parent is neither -1 nor an earlier id")
    from scipy.spatial import cKDTree

    line = centreline_samples(segments)
    d_nodes, _ = cKDTree(line).query(table[:, 2:5])
    d_line, _ = cKDTree(table[:, 2:5]).query(line)
    mean_d, p95 = float(d_nodes.mean()), float(np.percentile(d_nodes, 95))
    coverage = float((d_line <= 3.0).mean())
    if mean_d >= 2.0:
        problems.append(f"mean node distance to centreline {mean_d:.2f} >= 2")
    if p95 >= 3.0:
        problems.append(f"95th percentile node distance {p95:.2f} >= 3")
    if coverage < 0.8:
        problems.append(f"centreline coverage {coverage:.2f} < 0.8")
    return problems, mean_d, p95, coverage


def self_check():
    """The check must reject a correct tracing whose axes were swapped (x<->z, x<->y)."""
    line = centreline_samples(Y_TUBE, step=2.0)
    table = np.zeros((len(line), 7))
    table[:, 0] = np.arange(1, len(line) + 1)
    table[:, 6] = np.arange(0, len(line))
    table[0, 6] = -1
    table[:, 2:5] = line
    assert not check_swc(table, Y_TUBE)[0], "check_swc rejects the true centreline"
    for perm in ([2, 1, 0], [1, 0, 2]):
        swapped = table.copy()
        swapped[:, 2:5] = line[:, perm]
        assert check_swc(swapped, Y_TUBE)[0], f"check_swc accepts axes permuted {perm}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["kimimaro", "rivulet2", "app2"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threshold", type=float, default=60.0)
    ap.add_argument("--keep", metavar="DIR", help="write the images and SWCs here and keep them")
    args = ap.parse_args(argv)

    import tifffile

    self_check()
    results = []
    with tempfile.TemporaryDirectory(prefix="peers_selftest_") as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        for case in args.cases:
            img_path = os.path.join(work, f"{case}.tif")
            tifffile.imwrite(img_path, render(CASES[case]))
            for method in args.methods:
                results.append(run_one(method, case, img_path, work, args.threshold))

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"{'case':7} {'method':9} {'status':12} {'sec':>6} {'rss_mb':>7} {'nodes':>6} "
          f"{'mean_d':>6} {'p95_d':>6} {'cover':>5}  verdict")
    for r in results:
        status = "ok" if r["status"] == "ok" else str(r["status"]).split(":")[0]
        print(f"{r['case']:7} {r['method']:9} {status:12} {fmt(r['seconds'], '6.2f')} "
              f"{fmt(r['rss_mb'], '7.1f')} {fmt(r['nodes'], '6d')} {fmt(r['mean_d'], '6.2f')} "
              f"{fmt(r['p95_d'], '6.2f')} {fmt(r['coverage'], '5.2f')}  {r['verdict']}")
    skipped = {r["method"]: r["status"] for r in results if r["verdict"] == "skipped"}
    for method, status in skipped.items():
        print(f"{method}: {status}")
    ran = [r for r in results if r["verdict"] != "skipped"]
    n_fail = sum(r["verdict"].startswith("FAIL") for r in ran)
    print(f"{len(ran) - n_fail} passed, {n_fail} failed, {len(results) - len(ran)} skipped")
    return 1 if n_fail else 0


def run_one(method, case, img_path, work, threshold):
    out = os.path.join(work, f"{case}.{method}.swc")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "run_peer.py"), method, img_path, out,
         "--threshold", str(threshold)],
        capture_output=True, text=True)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        res = {"status": f"failed: no JSON line (exit {proc.returncode})"}
    row = {"case": case, "method": method, "status": res.get("status"),
           "seconds": res.get("seconds"), "rss_mb": res.get("peak_rss_mb"),
           "nodes": res.get("nodes"), "mean_d": None, "p95_d": None, "coverage": None}
    if proc.returncode != 0:
        row["verdict"] = f"FAIL (exit {proc.returncode})"
    elif str(row["status"]).startswith("skipped"):
        row["verdict"] = "skipped"
    elif row["status"] != "ok" or not os.path.exists(out):
        row["verdict"] = f"FAIL ({row['status']})"
    else:
        problems, row["mean_d"], row["p95_d"], row["coverage"] = check_swc(read_swc(out),
                                                                            CASES[case])
        row["verdict"] = "pass" if not problems else "FAIL: " + "; ".join(problems)
    if row["verdict"].startswith("FAIL"):
        sys.stderr.write(f"--- {case} {method}\n{proc.stderr[-3000:]}\n")
    return row


if __name__ == "__main__":
    sys.exit(main())
