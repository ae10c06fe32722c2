"""The embedded default job behind ``make demo``.

Until the whole pipeline exists, the demo writes a small generated stack (branching
bright fibres on a noisy background, saved as an ImageJ TIFF with its voxel size) and
converts it to OME-Zarr on a local Dask cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from .config import ClusterConfig, ConvertConfig, LocalClusterConfig
from .errors import OutputError

__all__ = ["demo_stack", "run_demo"]

DEMO_VOXEL_SIZE = (1.0, 0.3, 0.3)


def demo_stack(shape: tuple[int, int, int] = (64, 256, 256), seed: int = 0) -> np.ndarray:
    """A uint16 stack of a few branching, blurred fibres with Poisson noise.

    Examples
    --------
    >>> stack = demo_stack((16, 64, 64))
    >>> stack.dtype, stack.shape
    (dtype('uint16'), (16, 64, 64))
    """
    rng = np.random.default_rng(seed)
    fibres = np.zeros(shape, np.float32)
    scale = np.array(shape, float)
    starts = [scale / 2]
    for _ in range(6):
        point = starts[rng.integers(len(starts))].copy()
        direction = rng.normal(size=3)
        for _ in range(int(scale[1:].max())):
            direction = direction / np.linalg.norm(direction) + rng.normal(scale=0.15, size=3)
            direction /= np.linalg.norm(direction)
            point = point + direction * np.array([0.3, 1.0, 1.0])
            if np.any(point < 0) or np.any(point >= scale):
                break
            fibres[tuple(point.astype(int))] = 1.0
            if rng.random() < 0.01:
                starts.append(point.copy())
    image = ndimage.gaussian_filter(fibres, sigma=(0.6, 1.2, 1.2))
    image = 200 + 3000 * image / max(float(image.max()), 1e-6)
    return np.clip(rng.poisson(image), 0, 65535).astype(np.uint16)


def run_demo(out: str | Path = "demo_out", *, overwrite: bool = False) -> str:
    """Generate the demo stack in ``out`` and convert it; return a summary to print."""
    from .io.convert import convert

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiff = out / "demo_stack.tif"
    zarr_path = out / "demo.ome.zarr"
    if zarr_path.exists() and not overwrite:
        raise OutputError(f"{zarr_path}: exists already; pass --overwrite to run the demo again")
    tifffile.imwrite(
        tiff,
        demo_stack(),
        imagej=True,
        resolution=(1 / DEMO_VOXEL_SIZE[2], 1 / DEMO_VOXEL_SIZE[1]),
        metadata={"axes": "ZYX", "spacing": DEMO_VOXEL_SIZE[0], "unit": "um"},
    )
    cluster = ClusterConfig(local=LocalClusterConfig(n_workers=2, threads_per_worker=1))
    result = convert(tiff, zarr_path, ConvertConfig(overwrite=overwrite, levels=3), cluster=cluster)
    return f"demo stack: {tiff}\n{result.summary()}\nopen it in napari: napari --plugin napari-ome-zarr {zarr_path}"
