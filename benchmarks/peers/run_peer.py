#!/usr/bin/env python3
"""Run one peer tracer (kimimaro, Rivulet2, APP2) on a 3-D TIFF and write a normalised SWC.

Run with the peers' own interpreter (``make peers`` builds it)::

    .peers/bin/python benchmarks/peers/run_peer.py METHOD IMAGE.tif OUT.swc --threshold T \
        [--smooth SIGMA] [--anisotropy Z Y X] [--components K] [--timeout S]

METHOD is one of kimimaro, rivulet2, app2. IMAGE is a 3-D TIFF in (z, y, x) order (uint8, uint16
or float32). OUT.swc is written in VOXEL coordinates, 0-based, with x = column index, y = row
index, z = slice index (a node at x, y, z lies on image[z, y, x]); ids are 1..n, roots have
parent -1 and every parent comes before its children. One or more trees.

The last line on stdout is always one JSON object::

    {"method": ..., "seconds": ..., "peak_rss_mb": ..., "nodes": ..., "status": ...}

status is "ok", "skipped: <why>" or "failed: <why>". A failure inside a peer still exits 0 (the
benchmark records it); bad arguments or an unreadable image exit 2. ``seconds`` is the wall time
of the method itself: from the image in memory (smoothing, thresholding and component selection
included) to the SWC rows; reading the TIFF and writing the SWC are not counted. ``peak_rss_mb``
is this process's peak resident memory (VmHWM), so it includes the loaded image and the
interpreter with its imports (about 100 MB).

This file must stay importable without the peers installed: each method imports its peer
lazily.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque

import numpy as np

METHODS = ("kimimaro", "rivulet2", "app2")

# kimimaro TEASAR parameters in voxel units that worked on light microscopy (shared/PEERS.md).
KIMIMARO_TEASAR = {
    "scale": 1.5,
    "const": 4,
    "soma_detection_threshold": 4.5,
    "soma_acceptance_threshold": 6,
    "soma_invalidation_scale": 1.5,
    "soma_invalidation_const": 2,
    "pdrf_scale": 1e5,
    "pdrf_exponent": 4,
}
KIMIMARO_DUST = 5
KIMIMARO_TICK = 4


class PeerSkipped(Exception):
    """The peer cannot run here (not installed, no executable)."""


class PeerFailed(Exception):
    """The peer ran but produced no usable tracing."""


class PeerTimeout(Exception):
    """--timeout ran out."""


def _alarm(signum, frame):
    raise PeerTimeout("timeout")


# ----------------------------------------------------------------------------- SWC helpers


def tree_rows(points, edges, radii=None, roots=None):
    """Turn points + undirected edges into SWC rows (id, type, x, y, z, r, parent).

    points: (n, 3) array in output order x, y, z. edges: (m, 2) indices into points. Each
    connected component becomes one tree, rooted at the first of ``roots`` it contains (else at
    its lowest index), numbered breadth first so parents precede children; an edge that would
    close a cycle is dropped. Isolated points become one-node trees.
    """
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    n = len(points)
    radii = np.ones(n) if radii is None else np.asarray(radii, dtype=float).reshape(-1)
    adj = [[] for _ in range(n)]
    for a, b in np.asarray(edges, dtype=np.int64).reshape(-1, 2):
        if a != b:
            adj[a].append(int(b))
            adj[b].append(int(a))
    order = list(roots or []) + list(range(n))
    new_id = np.zeros(n, dtype=np.int64)
    rows = []
    for start in order:
        if new_id[start]:
            continue
        new_id[start] = len(rows) + 1
        queue = deque([(start, -1)])
        while queue:
            node, parent = queue.popleft()
            x, y, z = points[node]
            rows.append((int(new_id[node]), 3, x, y, z, radii[node], parent))
            for nb in adj[node]:
                if not new_id[nb]:
                    new_id[nb] = len(rows) + len(queue) + 1
                    queue.append((nb, int(new_id[node])))
    # ids were handed out in BFS discovery order, which is the order rows were appended
    assert all(r[0] == i + 1 for i, r in enumerate(rows))
    return rows


def swc_table_rows(table):
    """Normalise an SWC-like table (id, type, x, y, z, r, parent [, ...]) of any numbering.

    Handles Rivulet2's quirks: root id 0, a root that is its own parent, parents that are -2 or
    point at removed nodes (these start new trees).
    """
    table = np.asarray(table, dtype=float)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] < 7:
        raise PeerFailed(f"peer returned an unusable SWC table of shape {table.shape}")
    ids = table[:, 0].astype(np.int64)
    index = {int(i): k for k, i in enumerate(ids)}
    if len(index) != len(ids):
        raise PeerFailed("peer returned duplicate SWC ids")
    edges, roots = [], []
    for k, pid in enumerate(table[:, 6].astype(np.int64)):
        p = index.get(int(pid))
        if p is None or p == k or pid < 0:
            roots.append(k)
        else:
            edges.append((k, p))
    return tree_rows(table[:, 2:5], np.array(edges, dtype=np.int64).reshape(-1, 2),
                     table[:, 5], roots=roots)


def write_swc(path, rows, header_lines):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for line in header_lines:
            f.write(f"# {line}\n")
        f.write("# id type x y z radius parent  (voxel units, 0-based; node at image[z, y, x])\n")
        for i, t, x, y, z, r, p in rows:
            f.write(f"{i} {t} {x:.3f} {y:.3f} {z:.3f} {r:.3f} {p}\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- preprocessing


def smooth(img, sigma):
    if sigma and sigma > 0:
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(img.astype(np.float32), sigma)
    return img


# ----------------------------------------------------------------------------- methods


def run_kimimaro(img, args):
    """Mask (smoothed > T), K largest 26-components, TEASAR in voxel units, postprocess."""
    try:
        import cc3d
        import kimimaro
    except ImportError as e:
        raise PeerSkipped(f"kimimaro not installed ({e})") from None
    az, ay, ax = args.anisotropy
    vol = smooth(img, args.smooth)
    mask = vol > args.threshold
    del vol
    if not mask.any():
        raise PeerFailed("no voxel above threshold")
    labels = cc3d.largest_k(mask, k=args.components, connectivity=26)
    del mask
    # kimimaro reports vertices in the order of the array axes it is given (times anisotropy):
    # give it the (x, y, z) view of the (z, y, x) volume, a free Fortran-ordered transpose.
    skels = kimimaro.skeletonize(
        labels.T,
        teasar_params=dict(KIMIMARO_TEASAR),
        anisotropy=(ax, ay, az),
        dust_threshold=0,
        fix_branching=False,
        fix_borders=True,
        progress=False,
        parallel=1,
    )
    rows = []
    for label in sorted(skels):
        skel = kimimaro.postprocess(skels[label], dust_threshold=KIMIMARO_DUST,
                                    tick_threshold=KIMIMARO_TICK)
        if len(skel.vertices) == 0:
            continue
        pts = np.asarray(skel.vertices, dtype=float) / np.array([ax, ay, az])
        part = tree_rows(pts, skel.edges, np.asarray(skel.radii, dtype=float) / ax)
        off = len(rows)
        rows.extend((i + off, t, x, y, z, r, p + off if p > 0 else -1)
                    for i, t, x, y, z, r, p in part)
    if not rows:
        raise PeerFailed("kimimaro returned no skeleton")
    return rows


def _rivulet_compat():
    """Put back the names rivuletpy 0.3.0 uses that numpy 2 / scikit-image 0.2x removed."""
    import types

    import skimage.morphology

    if not hasattr(np, "float_"):
        np.float_ = np.float64
    if not hasattr(np, "in1d"):
        np.in1d = np.isin
    if not hasattr(skimage.morphology, "skeletonize_3d"):
        skimage.morphology.skeletonize_3d = skimage.morphology.skeletonize
    # rivuletpy.utils.io imports SimpleITK at module level but only uses it for .mhd input.
    if "SimpleITK" not in sys.modules:
        try:
            import SimpleITK  # noqa: F401
        except ImportError:
            stub = types.ModuleType("SimpleITK")
            stub.__doc__ = "stub installed by run_peer.py: rivuletpy only needs it for .mhd files"
            sys.modules["SimpleITK"] = stub


def run_rivulet2(img, args):
    """rtrace's path: crop(img, T) -> R2Tracer(...).trace(img, T) -> swc.reset(region, 1)."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=SyntaxWarning)
    try:
        _rivulet_compat()
        from rivuletpy.trace import R2Tracer
        from rivuletpy.utils.io import crop
    except ImportError as e:
        raise PeerSkipped(f"rivuletpy not importable ({e})") from None
    vol = smooth(img, args.smooth)
    if not (vol > args.threshold).any():
        raise PeerFailed("no voxel above threshold")
    # rivuletpy indexes arrays as (x, y, z): transpose the (z, y, x) volume; SWC columns 2..4
    # then come back as (axis0, axis1, axis2) = (x, y, z) with no flip.
    xyz = np.ascontiguousarray(vol.transpose(2, 1, 0))
    del vol
    cropped, region = crop(xyz, args.threshold)
    tracer = R2Tracer(quality=False, silent=True, clean=True)
    try:
        swc, _soma = tracer.trace(cropped, args.threshold)
        swc.reset(region, 1.0)
    except IndexError as e:
        if "1-dimensional" not in str(e):
            raise
        # SWC._prune_leaves squeezes a one-row table to 1-D, then indexing it fails
        raise PeerFailed(f"rivulet2 traced a single node (rivuletpy crashes on it: {e})") from e
    table = np.asarray(swc.get_array(), dtype=float)
    if table.ndim != 2 or table.shape[0] < 2:
        raise PeerFailed(f"rivulet2 returned {0 if table.ndim != 2 else table.shape[0]} node(s)")
    return swc_table_rows(table)


def app2_command():
    """The APP2 command prefix found on PATH, or None."""
    exe = shutil.which("vaa3d") or shutil.which("Vaa3D") or shutil.which("vaa3d_msvc")
    if exe:
        return [exe, "-x", "vn2", "-f", "app2"]
    exe = shutil.which("app2")
    if exe:
        # Untested assumption: a stand-alone app2 takes the vn2 plugin's -i/-o/-p arguments.
        return [exe]
    return None


def run_app2(img, args):
    """Vaa3D's APP2 (vn2 plugin) on the (smoothed) image: no downsampling, bkg_thresh = T."""
    cmd = app2_command()
    if cmd is None:
        raise PeerSkipped("no app2 executable on PATH")
    import tifffile

    vol = smooth(img, args.smooth)
    if vol.dtype != img.dtype and img.dtype.kind in "ui":
        info = np.iinfo(img.dtype)
        vol = np.clip(np.rint(vol), info.min, info.max).astype(img.dtype)
    with tempfile.TemporaryDirectory(prefix="app2_") as tmp:
        tif = os.path.join(tmp, "in.tif")
        out = os.path.join(tmp, "out.swc")
        tifffile.imwrite(tif, vol)
        # -p inmarker channel bkg_thresh b_256cube b_RadiusFrom2D is_gsdt is_gap length_thresh
        #    is_resample is_brightfield is_high_intensity
        params = ["NULL", "0", f"{args.threshold:g}", "0", "1", "0", "0", "5", "1", "0", "0"]
        try:
            proc = subprocess.run(cmd + ["-i", tif, "-o", out, "-p"] + params,
                                  capture_output=True, text=True,
                                  timeout=args.timeout or None)
        except subprocess.TimeoutExpired:
            raise PeerTimeout(f"timeout after {args.timeout:g} s") from None
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
            raise PeerFailed(f"app2 exit {proc.returncode}: {tail[0][:200]}")
        table = []
        with open(out) as f:
            for line in f:
                parts = line.split()
                if parts and not parts[0].startswith("#") and len(parts) >= 7:
                    table.append([float(v) for v in parts[:7]])
    if not table:
        raise PeerFailed("app2 wrote an empty SWC")
    return swc_table_rows(table)


RUNNERS = {"kimimaro": run_kimimaro, "rivulet2": run_rivulet2, "app2": run_app2}


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=METHODS)
    p.add_argument("image", help="3-D TIFF, axes (z, y, x)")
    p.add_argument("out", help="output SWC (voxel coordinates, x = column)")
    p.add_argument("--threshold", type=float, required=True,
                   help="foreground threshold, applied after smoothing")
    p.add_argument("--smooth", type=float, default=1.0,
                   help="Gaussian sigma in voxels before thresholding (0 = none; default 1)")
    p.add_argument("--anisotropy", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   default=(1.0, 1.0, 1.0),
                   help="voxel size for kimimaro's TEASAR (default 1 1 1; ignored by the others)")
    p.add_argument("--components", type=int, default=1,
                   help="kimimaro: keep the K largest 26-connected components (default 1)")
    p.add_argument("--timeout", type=float, default=0,
                   help="give up after S seconds with status 'failed: timeout...' (default 0: no "
                        "limit). In-process peers are interrupted between Python steps only, so "
                        "run the wrapper under an outer timeout too")
    args = p.parse_args(argv)
    if args.components < 1:
        p.error("--components must be >= 1")
    if min(args.anisotropy) <= 0:
        p.error("--anisotropy values must be > 0")
    if args.smooth < 0:
        p.error("--smooth must be >= 0")
    return args


def peak_rss_mb():
    """Peak resident memory of this process in MiB.

    Linux's VmHWM (high-water mark of this process's own address space). Not ru_maxrss: after
    fork+exec Linux carries the parent's RSS at fork time into the child's ru_maxrss, so a peer
    started from a big benchmark process would report the benchmark's memory, not its own.
    ru_maxrss (KiB on Linux) is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def main(argv=None):
    args = parse_args(argv)
    try:
        import tifffile

        img = tifffile.imread(args.image)
    except Exception as e:  # unreadable input is a usage error, not a peer failure
        print(f"error: {args.image}: {e}", file=sys.stderr)
        return 2
    img = np.squeeze(img)
    if img.ndim != 3:
        print(f"error: {args.image}: expected a 3-D (z, y, x) stack, got shape {img.shape}",
              file=sys.stderr)
        return 2
    if os.path.lexists(args.out):
        os.remove(args.out)  # never leave a stale result that looks like this run's

    result = {"method": args.method, "seconds": None, "peak_rss_mb": None, "nodes": 0,
              "status": "ok"}
    if args.timeout > 0 and args.method != "app2":
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, args.timeout)
    t0 = time.perf_counter()
    try:
        rows = RUNNERS[args.method](img, args)
        result["seconds"] = round(time.perf_counter() - t0, 3)
        signal.setitimer(signal.ITIMER_REAL, 0)  # the write below is not the peer's time
        write_swc(args.out, rows, [
            f"run_peer.py {args.method} threshold={args.threshold:g} smooth={args.smooth:g} "
            f"anisotropy_zyx={' '.join(f'{a:g}' for a in args.anisotropy)}",
            f"image {os.path.abspath(args.image)} shape_zyx={img.shape} dtype={img.dtype}",
        ])
        result["nodes"] = len(rows)
        result["trees"] = sum(1 for r in rows if r[6] == -1)
    except PeerSkipped as e:
        result["status"] = f"skipped: {e}"
    except PeerTimeout:
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["status"] = f"failed: timeout after {args.timeout:g} s"
    except Exception as e:  # noqa: BLE001 - any peer crash is a recorded failure
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["status"] = f"failed: {type(e).__name__}: {e}".replace("\n", " ")[:300]
        traceback.print_exc(file=sys.stderr)
    finally:
        if args.timeout > 0 and args.method != "app2":
            signal.setitimer(signal.ITIMER_REAL, 0)
    result["peak_rss_mb"] = peak_rss_mb()
    if args.method == "rivulet2" and tuple(args.anisotropy) != (1.0, 1.0, 1.0):
        result["note"] = "anisotropy ignored by rivulet2"
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
