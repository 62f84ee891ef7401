"""Boots repositories at a private staging path and attaches them under the root.

DESIGN.md §1-2: a mount onto <root>/<name> must never happen while the LOOKUP of <name> is
unanswered, so LOOKUP only calls request() (which never waits) and the boot runs here, in the
background. The attach is a MS_MOVE from a worker thread whose FUSE requests the root answers
at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

import structlog
import trio

from . import backend, kernel
from .children import Children, wait_pid_exit
from .config import Config
from .errors import AttachFailed, MountError, ShuttingDown
from .lifecycle import Event, State
from .registry import Registry, Repo

log = structlog.get_logger("cvmfsd.mounter")


class Mounter:
    def __init__(self, cfg: Config, registry: Registry, children: Children) -> None:
        self.cfg = cfg
        self.registry = registry
        self.children = children
        self._limiter = trio.CapacityLimiter(cfg.max_concurrent_boots)
        self._nursery: trio.Nursery | None = None
        self._boots: set[trio.CancelScope] = set()
        self._boots_idle = trio.Event()
        self.closing = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- called from FUSE handlers: never waits ----------------------------------------------
    def request(self, repo: Repo) -> None:
        """Make sure a boot of repo is under way, or raise the error that keeps it from one."""
        if repo.state in (State.BOOTING, State.MOUNTED, State.UNMOUNTING):
            return
        if self.closing:
            raise ShuttingDown()
        if not self.registry.may_boot(repo, trio.current_time()):
            assert repo.last_error is not None
            raise repo.last_error
        assert self._nursery is not None
        self.registry.begin_boot(repo)
        self._nursery.start_soon(self._mount, repo, name=f"mount {repo.name}")

    async def settle(self, repo: Repo, timeout: float) -> None:
        """Wait (bounded) until the current boot of repo is attached; raise its error if not."""
        with trio.move_on_after(timeout):
            await repo.settled.wait()
        if repo.state is State.MOUNTED:
            return
        if repo.state is State.FAILED and repo.last_error is not None:
            raise repo.last_error
        raise MountError(f"{repo.name} is still {repo.state} after {timeout:g} s")

    # --- the boot ---------------------------------------------------------------------------
    def _limit(self, repo: Repo) -> contextlib.AbstractAsyncContextManager[object]:
        # cvmfs2 may read the config repository under the root while it boots another one: that
        # boot must not queue behind the one that needs it.
        if repo.name == self.cfg.config_repository:
            return contextlib.nullcontext()
        return self._limiter

    async def _mount(self, repo: Repo) -> None:
        staging = self.cfg.staging_dir / repo.name
        started = trio.current_time()
        pid: int | None = None
        error: MountError | None = None
        with trio.CancelScope() as scope:
            self._boots.add(scope)
            try:
                async with self._limit(repo):
                    await trio.to_thread.run_sync(_make_dir, staging)
                    await backend.boot(self.cfg, self.children, repo.name, staging)
                    pid = await trio.to_thread.run_sync(self._attach, repo.name, staging)
            except MountError as exc:
                error = exc
            except Exception as exc:  # a bug, not a repository problem: fail this mount visibly
                log.exception("mount_crashed", repo=repo.name)
                error = MountError(f"internal error: {exc!r}")
            finally:
                self._boots.discard(scope)
                if not self._boots:
                    self._boots_idle.set()
        if scope.cancelled_caught or (error is None and pid is None):
            error = ShuttingDown()
        if error is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await trio.to_thread.run_sync(backend.cleanup_staging, staging)
            self.registry.boot_failed(repo, error, trio.current_time(), time.time())
            self._log_attempt(repo, started, None, error)
            return
        assert pid is not None
        self.registry.booted(repo, pid, trio.current_time(), time.time())
        self._log_attempt(repo, started, pid, None)
        assert self._nursery is not None
        self._nursery.start_soon(self._watch, repo, pid, name=f"watch {repo.name}")

    def _attach(self, name: str, staging: Path) -> int:
        """Worker thread: check what booted, then move it into place. Returns the serving pid."""
        self.registry.enter_own_thread()
        try:
            fqrn = backend.mounted_fqrn(staging)
            if fqrn != name:
                raise AttachFailed(f"cvmfs2 mounted {fqrn!r} for {name!r}")
            pid = backend.serving_pid(staging)
            kernel.move_mount(staging, self.cfg.root / name)
        except OSError as exc:
            raise AttachFailed(f"attach of {name} failed: {exc}") from exc
        finally:
            self.registry.leave_own_thread()
        with contextlib.suppress(OSError):
            staging.rmdir()
        return pid

    def _log_attempt(self, repo: Repo, started: float, pid: int | None,
                     error: MountError | None) -> None:
        fields = {"repo": repo.name, "boot": repo.boots,
                  "duration_ms": round((trio.current_time() - started) * 1000, 1)}
        if error is None:
            log.info("mount", result="mounted", serving_pid=pid, **fields)
        else:
            log.warning("mount", result="failed", exit_code=error.exit_code,
                        error=error.message, stderr_tail=error.stderr_tail[-400:],
                        retry_in_s=round(max(0.0, repo.retry_at - trio.current_time()), 1),
                        **fields)

    # --- after the boot ---------------------------------------------------------------------
    async def _watch(self, repo: Repo, pid: int) -> None:
        """Heal: when the serving process exits while mounted, detach the dead mount so that the
        next access boots it again instead of failing with ENOTCONN forever."""
        await wait_pid_exit(pid)
        if repo.serving_pid != pid or repo.state is not State.MOUNTED:
            return  # an unmount we asked for
        log.warning("backend_died", repo=repo.name, serving_pid=pid)
        await trio.to_thread.run_sync(self._detach, repo.name)
        if repo.serving_pid == pid and repo.state is State.MOUNTED:
            self.registry.gone(repo, Event.DIED)

    def _detach(self, name: str) -> None:
        self.registry.enter_own_thread()
        try:
            with contextlib.suppress(OSError):
                kernel.umount(self.cfg.root / name, kernel.MNT_DETACH)
        finally:
            self.registry.leave_own_thread()

    def _umount(self, name: str, lazy_if_busy: bool) -> bool:
        """Worker thread: unmount <root>/<name>. False when busy and not lazy."""
        self.registry.enter_own_thread()
        try:
            kernel.umount(self.cfg.root / name)
        except OSError as exc:
            if exc.errno != errno.EBUSY or not lazy_if_busy:
                if exc.errno == errno.EBUSY:
                    return False
                raise
            kernel.umount(self.cfg.root / name, kernel.MNT_DETACH)
            log.warning("umount_lazy", repo=name, reason="busy at shutdown")
        finally:
            self.registry.leave_own_thread()
        return True

    async def shutdown(self, grace: float = 5.0) -> None:
        """Unmount every repository (busy ones lazily), and see every serving process exit."""
        self.closing = True
        # Boots in progress are cancelled; each kills its cvmfs2 and cleans its staging path.
        for scope in list(self._boots):
            scope.cancel()
        with trio.move_on_after(15):
            while self._boots:
                self._boots_idle = trio.Event()
                await self._boots_idle.wait()
        pids: list[int] = []
        for repo in self.registry.mounted():
            repo.fire(Event.UNMOUNT)
            try:
                await trio.to_thread.run_sync(self._umount, repo.name, True)
            except OSError as exc:
                log.error("umount_failed", repo=repo.name, error=str(exc))
            if repo.serving_pid:
                pids.append(repo.serving_pid)
            self.registry.gone(repo, Event.UNMOUNTED)
        await _await_exit(pids, grace)
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()


async def _await_exit(pids: list[int], grace: float) -> None:
    """cvmfs2 exits by itself once unmounted; a lazily detached busy mount keeps it serving, so
    after the grace period it gets SIGTERM, then SIGKILL."""
    async def one(pid: int) -> None:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                log.warning("stop_backend", pid=pid, signal=sig.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            with trio.move_on_after(grace):
                await wait_pid_exit(pid)
                return

    async with trio.open_nursery() as nursery:
        for pid in pids:
            nursery.start_soon(one, pid)


def _make_dir(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o755)
