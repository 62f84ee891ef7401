"""systemd integration without libsystemd: sd_notify(3) messages and a watchdog that is fed only
after a real liveness check of the FUSE root.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon runs unchanged anywhere.
The protocol is one datagram per message on the AF_UNIX socket named by $NOTIFY_SOCKET (a path,
or an abstract name written with a leading '@'), newline-separated KEY=VALUE assignments.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import MutableMapping
from pathlib import Path

import structlog
import trio

from ..core.registry import Registry

log = structlog.get_logger("cvmfsd.notify")

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends sd_notify messages; never blocks, never raises (a lost STATUS is harmless, and a
    lost WATCHDOG ping is what the watchdog exists to notice)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failed = False
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None,
                         unset: bool = False) -> Notifier:
        """Read the variables that systemd passes. They stay in the environment by default: a
        re-exec for an in-place upgrade (SIGUSR2) keeps the same main pid and must keep
        notifying; cvmfs2 never sees them (children.spawn passes a minimal environment)."""
        environ = os.environ if environ is None else environ
        raw = environ.get("NOTIFY_SOCKET", "")
        address: str | None = None
        if raw.startswith("@"):
            address = "\0" + raw[1:]  # abstract namespace
        elif raw.startswith("/"):
            address = raw
        usec: int | None = None
        with contextlib.suppress(ValueError):
            usec = int(environ.get("WATCHDOG_USEC", ""))
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if usec is not None and (usec <= 0 or (watchdog_pid and watchdog_pid != str(os.getpid()))):
            usec = None  # meant for another process of this service
        if unset:
            for key in _ENV_KEYS:
                environ.pop(key, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    @property
    def watchdog_period(self) -> float | None:
        """How often to run the liveness check and ping: a third of WatchdogSec, so that a slow
        check (bounded by the same period) still leaves a ping well inside the deadline."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 3e6

    def send(self, **fields: str | int) -> bool:
        if self._sock is None or self.address is None:
            return False
        text = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode(), self.address)
            return True
        except OSError as exc:  # no listener, queue full: report once, keep going
            if not self._failed:
                log.warning("sd_notify_failed", error=str(exc))
                self._failed = True
            return False

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def reloading(self) -> None:
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Liveness:
    """Does the kernel get answers from our FUSE loop? A listing of the root: OPENDIR and
    READDIR of the root always travel to the daemon (its attributes are cached for good, so a
    stat would not), through the same request queue and task pool that serve every user.

    The listing runs in a worker thread (DESIGN.md §10: never from the trio thread), registered
    as one of the daemon's own so that nothing in the root makes it wait. A check that takes
    longer than `timeout` counts as failed; its thread is abandoned and holds the single slot
    until the kernel answers, so a hung root costs one thread, not one per check.
    """

    def __init__(self, registry: Registry, root: Path, timeout: float) -> None:
        self.registry = registry
        self.root = root
        self.timeout = timeout
        self._slot = trio.CapacityLimiter(1)
        self.ok: bool | None = None
        self.checked_at: float | None = None  # wall clock
        self.last_ms: float | None = None
        self.consecutive_failures = 0
        self.error: str | None = None

    def _list_root(self) -> None:
        self.registry.enter_own_thread()
        try:
            os.listdir(self.root)
        finally:
            self.registry.leave_own_thread()

    async def check(self) -> bool:
        started = time.monotonic()
        error: str | None = None
        if self._slot.available_tokens == 0:
            error = "the previous check of the root has not returned"
        else:
            with trio.move_on_after(self.timeout) as scope:
                try:
                    await trio.to_thread.run_sync(self._list_root, limiter=self._slot,
                                                  abandon_on_cancel=True)
                except OSError as exc:
                    error = f"listing {self.root} failed: {exc.strerror or exc}"
            if scope.cancelled_caught:
                error = f"listing {self.root} took longer than {self.timeout:g} s"
        self.ok = error is None
        self.error = error
        self.checked_at = time.time()
        self.last_ms = round((time.monotonic() - started) * 1000, 2)
        if self.ok:
            if self.consecutive_failures:
                log.info("root_answers_again", after_failures=self.consecutive_failures)
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
            log.warning("root_not_answering", error=error,
                        consecutive=self.consecutive_failures)
        return self.ok

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "error": self.error, "checked_at": self.checked_at,
                "duration_ms": self.last_ms, "consecutive_failures": self.consecutive_failures,
                "threads_stuck": self._slot.borrowed_tokens if self.ok is False else 0}

__all__ = ["Liveness", "Notifier"]
