"""Modules that a dependency imports but the daemon never uses, loaded only if something does.

trio imports ssl (trio._ssl) and hmac (trio._dtls), and with them OpenSSL's libcrypto: about 5
MiB of RSS for TLS the daemon never speaks. The same stand-in defers them (cvmfsd/__init__.py).

structlog imports asyncio at start (structlog.stdlib), for async logging methods the daemon
never calls (it runs on trio): about 1.5 MiB of RSS, a twentieth of the daemon's (measured:
docs/perf.md, "Daemon memory"). Until a first attribute is used, asyncio is a stand-in
module: `import asyncio` anywhere gets it at no cost, and the first use of any attribute
imports the real module, which takes its place in sys.modules. (importlib.util.LazyLoader
does not do this on Python 3.11: the import system's own look at `__spec__` loads it.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

# Reentrant: importing one deferred module can use another (asyncio imports ssl) in the same
# thread, under this lock.
_lock = threading.RLock()


class _Deferred(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        # Only called for what the stand-in lacks: everything but the spec and the name.
        with _lock:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def defer(name: str) -> None:
    """Put a stand-in for module `name` in sys.modules, unless it is imported already."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stand_in = _Deferred(name)
    stand_in.__spec__ = spec
    sys.modules[name] = stand_in


__all__ = ["defer"]
