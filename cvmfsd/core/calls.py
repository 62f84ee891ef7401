"""Blocking calls on repository mounts, bounded in time and in threads.

An xattr, a stat or a listing of a repository is a request to its cvmfs2, which can hang
(stopped, deadlocked, waiting on a server): such a call cannot be interrupted, only abandoned.
So each runs in a worker thread of one small pool, registered as one of the daemon's own (the
root answers it at once, DESIGN.md §2), with a deadline. A repository with a call still stuck
gets no other call until that one returns: a hung backend holds one thread, not one per attempt.
It is reported hung (status, metrics, log), and past `backend_hung_timeout` its cvmfs2 is killed
and the repository healed like after any death, which ends the stuck call too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import structlog
import trio

from .registry import Registry, Repo

log = structlog.get_logger("cvmfsd.calls")

T = TypeVar("T")
THREADS = 16


class BackendHung(OSError):
    """The repository's backend did not answer in time (or an earlier call still waits)."""


class BackendCalls:
    def __init__(self, registry: Registry, threads: int = THREADS) -> None:
        self.registry = registry
        self._limiter = trio.CapacityLimiter(threads)
        self._lock = threading.Lock()
        # (repository name, its boot) -> monotonic time the call began: a later boot of the
        # name is another backend, not held up by one that hung before.
        self._stuck: dict[tuple[str, int], float] = {}

    async def call(self, repo: Repo, fn: Callable[[], T], timeout: float) -> T:
        """fn() in a worker thread; BackendHung when it does not return within timeout."""
        key = (repo.name, repo.boots)
        with self._lock:
            since = self._stuck.get(key)
        if since is not None:
            raise BackendHung(f"{repo.name}: a call has been waiting for "
                              f"{time.monotonic() - since:.0f} s")
        began = time.monotonic()
        state = {"started": False, "abandoned": False, "done": False}

        def run() -> T:
            with self._lock:
                state["started"] = True
            self.registry.enter_own_thread()
            try:
                return fn()
            finally:
                self.registry.leave_own_thread()
                with self._lock:
                    state["done"] = True
                    if state["abandoned"]:
                        self._stuck.pop(key, None)

        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(run, limiter=self._limiter,
                                                 abandon_on_cancel=True)
        with self._lock:
            started = state["started"]
            if started and not state["done"]:
                state["abandoned"] = True
                self._stuck[key] = began
        if not started:  # every thread is taken by calls that wait on other backends
            raise BackendHung(f"no worker free for {repo.name} within {timeout:g} s")
        log.warning("backend_call_timeout", repo=repo.name, timeout_s=timeout)
        raise BackendHung(f"{repo.name} did not answer within {timeout:g} s")

    def hung(self) -> dict[str, float]:
        """Repositories whose current backend has a call still waiting, and for how long."""
        now = time.monotonic()
        with self._lock:
            stuck = list(self._stuck.items())
        out = {}
        for (name, boot), since in stuck:
            repo = self.registry.get(name)
            if repo is not None and repo.boots == boot:
                out[name] = now - since
        return out


__all__ = ["BackendCalls", "BackendHung"]
