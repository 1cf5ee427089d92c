"""mpda_dist: distributed Gaussian message passing for data assimilation.

The public API is small; see README.md.  Importing this package does not import JAX or
initialise MPI (``mpda_dist.runtime.start`` does, in the right order).
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("mpda_dist")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

from mpda_dist.config import Config as Config
from mpda_dist.config import load_config as load_config

__all__ = ["Config", "__version__", "load_config"]
