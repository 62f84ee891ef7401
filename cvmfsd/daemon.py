"""The daemon: prepares the runtime directory, serves the root, shuts down cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pyfuse3
import structlog
import trio

from . import __version__, kernel
from .children import Children
from .config import Config
from .fs import RootOperations
from .mounter import Mounter
from .registry import Registry
from .upkeep import Upkeep

log = structlog.get_logger("cvmfsd")


class StartupError(RuntimeError):
    pass


def _prepare_staging(cfg: Config) -> None:
    """A private tmpfs for staging mounts: a mount can only be moved out of a private parent,
    whatever the host's propagation of the run directory is."""
    cfg.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    cfg.staging_dir.mkdir(mode=0o700, exist_ok=True)
    existing = kernel.mounts_at(str(cfg.staging_dir))
    for _ in existing:  # a previous run's staging area: nothing in it is reachable any more
        kernel.umount(cfg.staging_dir, kernel.MNT_DETACH)
    kernel.mount("cvmfsd-staging", cfg.staging_dir, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV,
                 "mode=0700,size=1m")
    kernel.set_propagation(cfg.staging_dir, kernel.MS_PRIVATE)


def _release_staging(cfg: Config) -> None:
    with contextlib.suppress(OSError):
        kernel.umount(cfg.staging_dir, kernel.MNT_DETACH)


def _answers(path: str, timeout: float = 2.0) -> bool:
    """Does a listing of path succeed in time? (A stat would not ask the daemon: the root's
    attributes are cached for good.) In a throwaway thread: a stopped daemon's root would block
    it for good."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            os.listdir(path)
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _clean_stale_root(cfg: Config) -> None:
    """A previous cvmfsd that died leaves its root (ENOTCONN) and repository mounts at the root
    path. Detach them, deepest first, and say so; refuse anything that is not ours or alive."""
    root = str(cfg.root)
    entries = kernel.read_mountinfo()
    at_root = kernel.mounts_at(root, entries)
    below = kernel.mounts_below(root, entries)
    if not at_root and not below:
        return
    foreign = [e for e in at_root if e.fstype != "fuse.cvmfsd"]
    foreign += [e for e in below if e.source != "cvmfs2"]
    if foreign:
        raise StartupError(f"{root} holds mounts that are not cvmfsd's: "
                           + ", ".join(f"{e.mountpoint} ({e.fstype} {e.source})" for e in foreign))
    if _answers(root):
        raise StartupError(f"{root} is served by a running cvmfsd already")
    for entry in sorted(below, key=lambda e: e.mountpoint.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            kernel.umount(entry.mountpoint, kernel.MNT_DETACH)
            log.warning("stale_mount_detached", mountpoint=entry.mountpoint, fstype=entry.fstype)
    for _ in at_root:
        kernel.umount(root, kernel.MNT_DETACH)
        log.warning("stale_root_detached", mountpoint=root)


def _check_root(cfg: Config) -> None:
    cfg.root.mkdir(mode=0o755, parents=True, exist_ok=True)
    _clean_stale_root(cfg)


def _root_answers(cfg: Config) -> None:
    """Blocking check that the kernel reaches our FUSE loop at the root (run in a thread)."""
    st = os.stat(cfg.root)
    if st.st_ino != pyfuse3.ROOT_INODE:
        raise StartupError(f"{cfg.root} does not show the cvmfsd root (inode {st.st_ino})")


FUSE_OPTIONS = ("fsname=cvmfsd", "subtype=cvmfsd", "allow_other", "default_permissions", "ro",
                "nodev", "nosuid")


async def run(cfg: Config, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
              ) -> None:
    """Serve until SIGTERM/SIGINT (or cancellation), then unmount everything and return."""
    kernel.set_child_subreaper()
    os.chdir("/")  # hold no directory busy; cvmfs2 inherits a safe working directory
    started = time.monotonic()
    registry = Registry(cfg.backoff_initial, cfg.backoff_max, cfg.restart_window,
                        cfg.restart_burst)
    children = Children()
    await trio.to_thread.run_sync(_check_root, cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(children.run)
        await trio.to_thread.run_sync(_prepare_staging, cfg)
        mounter = Mounter(cfg, registry, children)
        ops = RootOperations(cfg, registry, mounter)
        fuse_scope = trio.CancelScope()
        fuse_done = trio.Event()
        try:
            await nursery.start(mounter.run)
            await nursery.start(Upkeep(cfg, registry, mounter).run)
            pyfuse3.init(ops, str(cfg.root), set(FUSE_OPTIONS))
            await trio.to_thread.run_sync(kernel.set_propagation, cfg.root, kernel.MS_SHARED)

            async def serve_fuse() -> None:
                try:
                    with fuse_scope:
                        await pyfuse3.main(min_tasks=4, max_tasks=cfg.fuse_max_tasks)
                    if not fuse_scope.cancelled_caught:
                        log.error("root_unmounted_externally", root=str(cfg.root))
                finally:
                    fuse_done.set()

            nursery.start_soon(serve_fuse)
            await trio.to_thread.run_sync(_root_answers, cfg)
            log.info("ready", root=str(cfg.root), version=__version__, pid=os.getpid(),
                     startup_ms=round((time.monotonic() - started) * 1000, 1))
            task_status.started()
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as waiter:
                    async def on_signal() -> None:
                        async for signum in signals:
                            log.info("stopping", signal=signal.Signals(signum).name)
                            break
                        waiter.cancel_scope.cancel()

                    async def on_fuse_end() -> None:
                        await fuse_done.wait()
                        waiter.cancel_scope.cancel()

                    waiter.start_soon(on_signal)
                    waiter.start_soon(on_fuse_end)
        finally:
            with trio.CancelScope(shield=True):
                await _shutdown(cfg, mounter, fuse_scope, fuse_done)
                nursery.cancel_scope.cancel()
    log.info("stopped", orphans_reaped=children.orphans_reaped)


async def _shutdown(cfg: Config, mounter: Mounter, fuse_scope: trio.CancelScope,
                    fuse_done: trio.Event) -> None:
    with trio.move_on_after(60):
        if mounter._nursery is not None:
            await mounter.shutdown()
    fuse_scope.cancel()
    with trio.move_on_after(5):
        await fuse_done.wait()
    try:
        pyfuse3.close(unmount=True)
    except Exception as exc:  # not initialised, or already gone
        log.debug("close", error=repr(exc))
    await trio.to_thread.run_sync(_release_staging, cfg)


__all__ = ["StartupError", "run"]
