"""neurotrace_dask: neuron reconstruction from optical microscopy volumes at any scale.

The whole pipeline is one call, :func:`run` (``neurotrace run``); its stages are
:func:`neurotrace_dask.io.convert.convert`, :func:`neurotrace_dask.predict.predict` and
:func:`neurotrace_dask.trace.trace_volume`, each returning a result object.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("neurotrace-dask")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "run", "status"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must stay cheap (no torch, no dask) for the CLI's --help.
    if name in ("run", "status"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'neurotrace_dask' has no attribute {name!r}")
