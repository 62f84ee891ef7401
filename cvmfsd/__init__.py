"""cvmfsd: a /cvmfs root that mounts any CernVM-FS repository on its first lookup."""

from importlib import metadata

from . import lazy

lazy.defer("asyncio")  # structlog's import of it, never used here (see lazy.py)

try:
    __version__ = metadata.version("cvmfsd")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"
