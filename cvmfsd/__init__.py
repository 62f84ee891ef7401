"""cvmfsd: a /cvmfs root that mounts any CernVM-FS repository on its first lookup."""

from importlib import metadata

from . import lazy

lazy.defer("asyncio")  # structlog's import of it, never used here (see lazy.py)
# trio's TLS and DTLS support, which a local FUSE daemon never uses: they load OpenSSL's
# libcrypto (about 5 MiB of RSS, docs/perf.md). A pin's workspace name (hashlib) or a metrics
# token (hmac) loads them when first used.
for _name in ("ssl", "hmac", "hashlib"):
    lazy.defer(_name)

try:
    __version__ = metadata.version("cvmfsd")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"
