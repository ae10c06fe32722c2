"""The embedded default job behind ``make demo``: the whole pipeline on a rendered neuron.

A random branching neuron is rendered as a realistic fluorescence stack (``synth``: PSF,
photon and camera noise, autofluorescence) and saved as an ImageJ TIFF with its voxel size,
next to its gold-standard SWC. Then ``neurotrace run`` converts, predicts with the shipped
checkpoint (or traces the raw image when none is shipped), traces, stitches, writes the
report and scores the result against the gold SWC, on a local Dask cluster.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import ClusterConfig, Config, LocalClusterConfig, SynthConfig
from .errors import OutputError

__all__ = ["DEMO_VOXEL_SIZE", "run_demo"]

DEMO_VOXEL_SIZE = (1.0, 0.5, 0.5)


def run_demo(out: str | Path = "demo_out", *, overwrite: bool = False, seed: int = 4) -> str:
    """Render the demo neuron into ``out/synth``, run the pipeline into ``out/run``; return a summary.

    Examples
    --------
    >>> print(run_demo("demo_out"))  # doctest: +SKIP
    """
    from .pipeline import default_checkpoint, run
    from .synth import random_morphology, render_to_zarr, scene_from_swc

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists already; pass --overwrite to run the demo again")
    if out.exists():
        if not (out / "run" / "run.json").is_file() and any(out.iterdir()):
            raise OutputError(f"{out}: exists and is not a demo folder; refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    params = SynthConfig(voxel_size=DEMO_VOXEL_SIZE, intensity=0.5, seed=seed)
    scene = scene_from_swc(random_morphology(seed, extent=(30.0, 110.0, 110.0)), params)
    synth = render_to_zarr(scene, out / "synth", tiff=True)
    config = Config(cluster=ClusterConfig(local=LocalClusterConfig(n_workers=2, threads_per_worker=1)))
    raw = default_checkpoint() is None
    result = run(out / "synth" / "image.tif", out / "run", config, raw=raw, gold=out / "synth" / "gold.swc")
    how = "raw image (no checkpoint shipped)" if raw else f"checkpoint {default_checkpoint()}"
    return "\n".join([f"rendered {synth.shape} voxels of "
                      f"{DEMO_VOXEL_SIZE} um, signal intensity 0.5: {out / 'synth' / 'image.tif'}",
                      f"traced from the {how}", result.summary(),
                      f"open in napari: napari {out / 'run' / 'image.ome.zarr'}"
                      + ("" if raw else f" {out / 'run' / 'prob.ome.zarr'}")])  # fmt: skip
