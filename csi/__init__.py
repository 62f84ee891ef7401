"""Thin Kubernetes CSI node plugin for cvmfsd: bind-mounts the daemon's /cvmfs root into pods."""

from importlib import metadata

try:
    __version__: str = metadata.version("cvmfsd")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"
