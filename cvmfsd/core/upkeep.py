"""Periodic upkeep: reconcile the registry with what is mounted, and expire idle repositories.

Backend deaths are noticed at once through pidfds (mounter.Mounter._watch); this loop is the
backstop for what no process exit announces (an aborted connection, an unmount by someone else)
and the clock for idle expiry. A repository that is idle for long enough is expired only if no
mount namespace uses it (usage.py: one scan per pass for all of them) and umount2 agrees.
"""

from __future__ import annotations

import signal

import structlog
import trio

from ..config import Config
from . import kernel
from .lifecycle import Event, State
from .mounter import Mounter
from .probe import Observed, idle_counter, probe
from .registry import Registry, Repo
from .usage import ViewMonitor

log = structlog.get_logger("cvmfsd.upkeep")

# Seconds the idle counter of a repository may take to read.
CALL_TIMEOUT = 5.0


class Upkeep:
    def __init__(self, cfg: Config, registry: Registry, mounter: Mounter,
                 views: ViewMonitor | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.mounter = mounter
        self.views = views or ViewMonitor(registry, cfg.root, cfg.staging_dir)
        self._reconciled_at = 0.0

    @property
    def interval(self) -> float:
        # Expiry is checked often enough to happen within a tenth of expire_timeout of due.
        if self.cfg.expire_timeout > 0:
            return max(0.05, min(self.cfg.reconcile_interval, self.cfg.expire_timeout / 10))
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
        mountpoints = {e.mountpoint for e in entries}
        reconcile_due = now - self._reconciled_at >= self.cfg.reconcile_interval
        if reconcile_due:
            self._reconciled_at = now
            await self._end_hung()
        due = []
        for repo in self.registry.mounted():
            if reconcile_due and not await self._reconcile(repo, mountpoints):
                continue
            if self.cfg.expire_timeout > 0 and await self._idle_long_enough(repo, now):
                due.append(repo)
        if due:
            await self._expire(due)

    async def _end_hung(self) -> None:
        """A backend that has not answered a call for backend_hung_timeout is killed; its
        death heals the repository (and ends the stuck call)."""
        for name, seconds in self.mounter.calls.hung().items():
            repo = self.registry.get(name)
            if seconds < self.cfg.backend_hung_timeout or repo is None or repo.process is None:
                continue
            log.error("backend_hung", repo=name, hung_for_s=round(seconds, 1),
                      serving_pid=repo.serving_pid, action="SIGKILL; it heals")
            repo.process.signal(signal.SIGKILL)

    async def _reconcile(self, repo: Repo, mountpoints: set[str]) -> bool:
        """False when the repository turned out not to be (healthily) mounted."""
        seen = await probe(self.mounter.calls, self.cfg.root, repo, mountpoints)
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

    async def _idle_long_enough(self, repo: Repo, now: float) -> bool:
        assert repo.mounted_at is not None
        if now - repo.mounted_at < self.cfg.expire_min_age:
            return False
        nopen = await idle_counter(self.mounter.calls, self.cfg.root, repo, CALL_TIMEOUT)
        if repo.state is not State.MOUNTED:
            return False
        if repo.idle_since is None:
            # First look: idle since the mount unless something was opened since (when is not
            # known: from now). Without the counter expiry relies on the scan and umount2's
            # EBUSY alone.
            repo.nopen, repo.idle_since = nopen, (repo.mounted_at if not nopen else now)
        elif nopen is not None and nopen != repo.nopen:
            repo.nopen, repo.idle_since = nopen, now  # opened since the last look
            return False
        return now - repo.idle_since >= self.cfg.expire_timeout

    async def _expire(self, due: list[Repo]) -> None:
        """Unmount the idle repositories that nothing uses: first the namespace scan (a copy of
        the mount outside the root's tree, which umount2 does not see), then umount2's EBUSY
        (open files and working directories in the root's tree)."""
        usage = await self.views.usage(due)
        for repo in due:
            if repo.state is not State.MOUNTED:
                continue
            if usage.busy(repo.name):
                log.info("expire_refused", repo=repo.name, reason=usage.why(repo.name),
                         uses=[v.as_dict() for v in usage.uses(repo.name)])
                repo.idle_since = trio.current_time()  # in use: wait a full period again
                continue
            if not await self.mounter.unmount(repo, reason="idle"):
                repo.idle_since = trio.current_time()  # busy (umount2): wait a full period again
