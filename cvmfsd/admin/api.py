"""The admin service as its servers see it: what the status socket (control.py) and the
metrics endpoint (metrics.py) use of it, and the error its operations raise.

The service (service.py) starts the servers and hands itself to them; they know it only by this
interface and never import service.py, so the three make no import circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..core.registry import Registry
    from .notify import Liveness

PROTOCOL_VERSION = 1


class AdminError(Exception):
    """A request that cannot be done; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


class AdminApi(Protocol):
    cfg: Config
    registry: Registry
    liveness: Liveness
    ops: Any  # RootOperations: cfg, internal_errors
    started_wall: float
    # (command, result) -> count, kept by the status socket, read by the metrics endpoint
    requests: dict[tuple[str, str], int]
    # set by the metrics endpoint once bound (port 0: the one the kernel chose)
    metrics_address: tuple[str, int] | None

    def problems(self) -> list[str]: ...

    async def status_report(self) -> dict[str, Any]: ...

    async def list(self, names: list[str] | None, details: bool) -> dict[str, Any]: ...

    async def mount(self, name: str, timeout: float | None) -> dict[str, Any]: ...

    async def umount(self, name: str, force: bool, timeout: float | None) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def probe(self, names: list[str] | None, timeout: float | None) -> dict[str, Any]: ...

    async def restart(self) -> dict[str, Any]: ...
