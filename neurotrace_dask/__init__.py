"""neurotrace_dask: neuron reconstruction from optical microscopy volumes at any scale."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neurotrace-dask")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
