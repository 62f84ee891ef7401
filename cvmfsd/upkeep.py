"""Periodic upkeep: reconcile the registry with what is mounted, and expire idle repositories.

Backend deaths are noticed at once through pidfds (mounter.Mounter._watch); this loop is the
backstop for what no process exit announces (an aborted connection, an unmount by someone else)
and the clock for idle expiry.
"""

from __future__ import annotations

import structlog
import trio

from . import kernel
from .config import Config
from .lifecycle import Event, State
from .mounter import Mounter
from .probe import Observed, probe, read_idle_counter
from .registry import Registry, Repo

log = structlog.get_logger("cvmfsd.upkeep")


class Upkeep:
    def __init__(self, cfg: Config, registry: Registry, mounter: Mounter) -> None:
        self.cfg = cfg
        self.registry = registry
        self.mounter = mounter
        self._reconciled_at = 0.0

    @property
    def interval(self) -> float:
        if self.cfg.expire_timeout > 0:
            return max(0.05, min(self.cfg.reconcile_interval, self.cfg.expire_timeout / 2))
        return self.cfg.reconcile_interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self.once()
            except Exception:  # keep the daemon serving; the next pass tries again
                log.exception("upkeep_failed")

    async def once(self) -> None:
        now = trio.current_time()
        entries = await trio.to_thread.run_sync(kernel.read_mountinfo)
        reconcile_due = now - self._reconciled_at >= self.cfg.reconcile_interval
        if reconcile_due:
            self._reconciled_at = now
        for repo in self.registry.mounted():
            if reconcile_due and not await self._reconcile(repo, entries):
                continue
            if self.cfg.expire_timeout > 0:
                await self._maybe_expire(repo, now)

    async def _reconcile(self, repo: Repo, entries: list[kernel.MountEntry]) -> bool:
        """False when the repository turned out not to be (healthily) mounted."""
        seen = await probe(self.registry, self.cfg.root, repo, entries)
        if repo.state is not State.MOUNTED:
            return False
        if seen is Observed.CORRUPTED:
            await self.mounter.heal(repo, "mount corrupted (ENOTCONN or backend gone)")
            return False
        if seen is Observed.NOT_MOUNTED:
            log.warning("unmounted_externally", repo=repo.name)
            self.registry.gone(repo, Event.UNMOUNTED)
            return False
        return True

    async def _maybe_expire(self, repo: Repo, now: float) -> None:
        assert repo.mounted_at is not None
        if now - repo.mounted_at < self.cfg.expire_min_age:
            return
        path = self.cfg.root / repo.path
        nopen = await trio.to_thread.run_sync(read_idle_counter, self.registry, path)
        if repo.state is not State.MOUNTED:
            return
        if repo.idle_since is None or (nopen is not None and nopen != repo.nopen):
            # First look, or something was opened since the last one. (Without the counter,
            # expiry relies on umount2's EBUSY alone.)
            repo.nopen, repo.idle_since = nopen, now
            return
        if now - repo.idle_since < self.cfg.expire_timeout:
            return
        if not await self.mounter.unmount(repo, reason="idle"):
            repo.idle_since = trio.current_time()  # busy: in use, keep; wait a full period again
