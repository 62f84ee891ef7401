"""The daemon: takes over or prepares the root, serves it, stops or hands over."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pyfuse3
import structlog
import trio

from . import __version__, signals
from .admin.service import Admin
from .config import Config
from .core import fusedev, kernel, rootmount, takeover
from .core.children import Children, Tracked, stop_leftovers
from .core.fs import RootOperations
from .core.mounter import Mounter
from .core.registry import Registry, Repo
from .core.upkeep import Upkeep
from .core.usage import ViewMonitor

log = structlog.get_logger("cvmfsd")

# Seconds between the new root covering the old one and the old repository mounts being
# detached (only where the old root stays): path walks that were already inside the old root
# finish crossing them meanwhile.
DETACH_OLD_AFTER = 0.2
# "0" keeps the stacked takeover even where the kernel could mount beneath (tests of the older
# kernels' procedure; a way back should the new one misbehave somewhere).
BENEATH_ENV = "CVMFSD_TAKEOVER_BENEATH"


class StartupError(RuntimeError):
    pass


class StopMode(StrEnum):
    UNMOUNT = "unmount"    # everything unmounted and stopped
    HANDOVER = "handover"  # mounts and backends left for the next daemon
    REEXEC = "reexec"      # hand over to a fresh exec of this program (upgrade in place)


@dataclass
class Runtime:
    """What the daemon's services share."""

    cfg: Config
    registry: Registry
    mounter: Mounter
    children: Children
    started: float = field(default_factory=time.monotonic)
    stop_requested: trio.Event = field(default_factory=trio.Event)
    stop_mode: StopMode = StopMode.UNMOUNT

    def request_stop(self, mode: StopMode) -> None:
        if not self.stop_requested.is_set():
            self.stop_mode = mode
            self.stop_requested.set()


def _prepare_staging(cfg: Config) -> None:
    """A private tmpfs for staging mounts: a mount can only be moved out of a private parent,
    whatever the host's propagation of the run directory is."""
    cfg.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    cfg.staging_dir.mkdir(mode=0o700, exist_ok=True)
    for _ in kernel.mounts_at(str(cfg.staging_dir)):
        # A previous run's staging area: nothing in it is reachable any more.
        kernel.umount(cfg.staging_dir, kernel.MNT_DETACH)
    kernel.mount("cvmfsd-staging", cfg.staging_dir, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV,
                 "mode=0700,size=1m")
    kernel.set_propagation(cfg.staging_dir, kernel.MS_PRIVATE)


def _release_staging(cfg: Config) -> None:
    with contextlib.suppress(OSError):
        kernel.umount(cfg.staging_dir, kernel.MNT_DETACH)


def _inspect_root(cfg: Config) -> takeover.Plan | None:
    cfg.root.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        return takeover.plan(cfg)
    except takeover.TakeoverRefused as exc:
        raise StartupError(str(exc)) from None


def _root_answers(cfg: Config) -> None:
    """Blocking check that the kernel reaches our FUSE loop at the root (run in a thread)."""
    st = os.stat(cfg.root)
    if st.st_ino != pyfuse3.ROOT_INODE:
        raise StartupError(f"{cfg.root} does not show the cvmfsd root (inode {st.st_ino})")
    os.listdir(cfg.root)


async def _adopt(rt: Runtime, plan: takeover.Plan) -> list[tuple[Repo, Tracked]]:
    """Attach clones of the previous daemon's live repository mounts to the staged root.
    Names are marked mounted first, so nothing can boot a second backend for them. Returns
    what to watch once the root is published: a backend that dies before that is healed then,
    not while its path still leads into the old root."""
    staged = rootmount.staged_root(rt.cfg)
    adopted = []
    for found in plan.adopt:
        repo = rt.registry.get(found.name) or rt.registry.candidate(found.name, found.fqrn,
                                                                   found.pin)
        try:
            process = Tracked.open(found.pid)
        except ProcessLookupError:
            plan.stale.append(str(rt.cfg.root / found.path))
            continue
        rt.registry.adopted(repo, process, trio.current_time(), time.time())
        repo.pin_config = found.pin_config

        def attach(found: takeover.Found = found) -> None:
            rt.registry.enter_own_thread()
            try:
                takeover.clone_onto(found, staged / found.path)
            finally:
                rt.registry.leave_own_thread()

        await trio.to_thread.run_sync(attach)
        adopted.append((repo, process))
        log.info("adopted", repo=found.name, serving_pid=found.pid)
    return adopted


def beneath_allowed() -> bool:
    return os.environ.get(BENEATH_ENV, "1") != "0" and kernel.has_move_mount_beneath()


async def _publish(rt: Runtime, plan: takeover.Plan | None) -> None:
    """Make the staged root the root: over a previous daemon's root, in its place where the
    kernel can mount beneath (one root layer on the host however often the daemon restarts),
    else stacked on it (one dead layer more per restart, until reboot)."""
    old_fd = plan.root_fd if plan is not None else None
    beneath = old_fd is not None and beneath_allowed()

    def publish() -> rootmount.Replaced | None:
        rt.registry.enter_own_thread()
        try:
            if beneath:
                assert old_fd is not None
                return rootmount.replace(rt.cfg, old_fd)
            rootmount.publish(rt.cfg)
            return None
        finally:
            rt.registry.leave_own_thread()

    replaced = await trio.to_thread.run_sync(publish)
    if plan is None:
        return
    plan.close_root()
    if replaced is not None and replaced.beneath:
        # The old repository mounts left with the old root; the clones serve from here on.
        for found in plan.adopt:
            takeover.release(found)
    else:
        await trio.sleep(DETACH_OLD_AFTER)
        for found in plan.adopt:
            await trio.to_thread.run_sync(takeover.detach_old, found)
    layers = len(await trio.to_thread.run_sync(kernel.mounts_at, str(rt.cfg.root)))
    if replaced is not None and replaced.beneath:
        log.info("takeover", procedure="beneath", swap_ms=replaced.swap_ms, root_layers=layers,
                 old_layers=plan.old_layers)
    else:
        why = (replaced.error if replaced is not None else
               "no previous root held" if old_fd is None else
               f"{BENEATH_ENV}=0" if os.environ.get(BENEATH_ENV) == "0" else
               "the kernel has no MOVE_MOUNT_BENEATH")
        log.warning("takeover", procedure="stacked", root_layers=layers,
                    old_layers=plan.old_layers, reason=why)


async def run(cfg: Config, *, reloader: Callable[[], Config] | None = None,
              config_file: Path | None = None,
              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> StopMode:
    """Serve until a stop is requested (signals, cvmfsctl) or cancelled; return how it ended.

    reloader re-reads the configuration for `cvmfsctl reload` and SIGHUP."""
    kernel.set_child_subreaper()
    os.chdir("/")  # hold no directory busy; cvmfs2 inherits a safe working directory
    registry = Registry(cfg.backoff_initial, cfg.backoff_max, cfg.restart_window,
                        cfg.restart_burst, cfg.max_names)
    # Boots a killed predecessor left running go first: they hold workspace locks.
    await trio.to_thread.run_sync(stop_leftovers, cfg.run_dir / "boots")
    children = Children(cfg.run_dir / "boots")
    rt = Runtime(cfg, registry, Mounter(cfg, registry, children), children)
    plan = await trio.to_thread.run_sync(_inspect_root, cfg)
    fuse_scope = trio.CancelScope()
    fuse_done = trio.Event()
    fuse_started = False
    admin: Admin | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(children.run)
            await trio.to_thread.run_sync(_prepare_staging, cfg)
            rt.mounter.fusectl = await trio.to_thread.run_sync(
                fusedev.mount_control, cfg.staging_dir / "fusectl")
            try:
                await nursery.start(rt.mounter.run)
                views = ViewMonitor(registry, cfg.root, cfg.staging_dir,
                                    state_file=cfg.run_dir / "views.json")
                if plan is not None:
                    # Devices of the previous daemon's mounts, the dead ones and those adopted
                    # (which have no device recorded): copies of them left in pods once they
                    # are no longer served are stale views.
                    for dev, path in (plan.stale_devs or {}).items():
                        views.learn(dev, path)
                    for found in plan.adopt:
                        views.learn(found.dev, found.path)
                upkeep = Upkeep(cfg, registry, rt.mounter, views)
                await nursery.start(upkeep.run)
                fd = await trio.to_thread.run_sync(rootmount.mount_staged, cfg)
                ops = RootOperations(cfg, registry, rt.mounter)
                pyfuse3.init(ops, f"/dev/fd/{fd}", set())
                fuse_started = True

                async def serve_fuse() -> None:
                    try:
                        with fuse_scope:
                            await pyfuse3.main(min_tasks=4, max_tasks=cfg.fuse_max_tasks)
                        if not fuse_scope.cancelled_caught:
                            log.error("root_unmounted_externally", root=str(cfg.root))
                    finally:
                        fuse_done.set()

                nursery.start_soon(serve_fuse)
                adopted: list[tuple[Repo, Tracked]] = []
                if plan is not None:
                    await trio.to_thread.run_sync(takeover.detach_stale, plan)
                    adopted = await _adopt(rt, plan)
                await _publish(rt, plan)
                for repo, process in adopted:
                    rt.mounter.watch(repo, process)
                await trio.to_thread.run_sync(_root_answers, cfg)
                # --- node admin surface: status socket, sd_notify, metrics (admin/) ---------
                admin = Admin(cfg, registry, rt.mounter, ops, upkeep, reloader=reloader,
                              config_file=config_file, views=views)
                await nursery.start(admin.run)
                # ---------------------------------------------------------------------------
                log.info("ready", root=str(cfg.root), version=__version__, pid=os.getpid(),
                         adopted=len(plan.adopt) if plan else 0,
                         startup_ms=round((time.monotonic() - rt.started) * 1000, 1))
                task_status.started()
                await _until_stop(rt, fuse_done)
            finally:
                if admin is not None:
                    admin.stopping(str(rt.stop_mode))  # tell systemd; the socket closes
                with trio.CancelScope(shield=True):
                    await _stop(rt, fuse_scope, fuse_done, fuse_started)
                    nursery.cancel_scope.cancel()
    finally:
        if plan is not None:
            plan.close()
    log.info("stopped", mode=str(rt.stop_mode), orphans_reaped=children.orphans_reaped)
    return rt.stop_mode


async def _until_stop(rt: Runtime, fuse_done: trio.Event) -> None:
    modes = {signal.SIGTERM: StopMode(rt.cfg.stop_mode), signal.SIGINT: StopMode(rt.cfg.stop_mode),
             signal.SIGUSR2: StopMode.REEXEC}
    with trio.open_signal_receiver(*modes) as received:
        # What came while the daemon started (signals.install_early) counts as if sent now.
        for signum in signals.pending:
            if signum in modes:
                log.info("stopping", signal=signal.Signals(signum).name, mode=str(modes[signum]),
                         received="while starting")
                rt.request_stop(modes[signum])
        signals.pending.clear()
        async with trio.open_nursery() as waiter:
            async def on_signal() -> None:
                async for signum in received:
                    log.info("stopping", signal=signal.Signals(signum).name,
                             mode=str(modes[signum]))
                    if rt.stop_requested.is_set() and rt.stop_mode is StopMode.REEXEC:
                        # A stop asked for while the re-exec begins: the next interpreter
                        # does it (signals.block_for_exec carries it over).
                        signals.pending.append(signum)
                    rt.request_stop(modes[signum])

            async def on_fuse_end() -> None:
                await fuse_done.wait()
                rt.request_stop(StopMode.UNMOUNT)

            waiter.start_soon(on_signal)
            waiter.start_soon(on_fuse_end)
            await rt.stop_requested.wait()
            waiter.cancel_scope.cancel()


async def _stop(rt: Runtime, fuse_scope: trio.CancelScope, fuse_done: trio.Event,
                fuse_started: bool) -> None:
    unmount = rt.stop_mode is StopMode.UNMOUNT
    with trio.move_on_after(60):
        if rt.mounter.running:
            await (rt.mounter.shutdown() if unmount else rt.mounter.handover())
    fuse_scope.cancel()
    with trio.move_on_after(5):
        await fuse_done.wait()
    if fuse_started:
        # Closing /dev/fuse aborts the connection: a root left mounted is then dead, and the
        # repository mounts below it keep working through the kernel's cached dentries.
        pyfuse3.close(unmount=False)
    if unmount:
        layers = await trio.to_thread.run_sync(rootmount.unmount_all_layers, rt.cfg)
        log.info("root_unmounted", layers=layers)
    with contextlib.suppress(OSError):
        await trio.to_thread.run_sync(_release_staging, rt.cfg)


__all__ = ["Runtime", "StartupError", "StopMode", "run"]
