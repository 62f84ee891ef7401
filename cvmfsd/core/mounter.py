"""Mounts repositories under the root and keeps them mounted.

DESIGN.md §1-2: a mount onto <root>/<name> must never happen while the LOOKUP of <name> is
unanswered, so LOOKUP only calls request() (which never waits) and the mount is made here, in
the background, from a worker thread whose FUSE requests the root answers at once.

cvmfs2 runs in pre-mounted mode (docs/cvmfs2-interface.md §3): the daemon mounts /dev/fuse at
<root>/<path> itself, at once, and then starts cvmfs2 on the descriptor. A process that looked the
name up crosses that mount right away and waits in the kernel for cvmfs2's first answer, so no
FUSE handler of the root waits for a boot, and the answer comes as soon as cvmfs2 serves. The
daemon keeps a copy of the descriptor: when cvmfs2 fails or dies, the requests waiting in the
connection are answered once the dead mount is gone (fusedev): with the name's error after a
failed boot, with ESTALE once the replacement is in place after a death (the processes walk
again onto it). Copies of the dead mount outside the root's views receive the replacement
through an anchor (anchor.py).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import outcome
import structlog
import trio

from ..config import Config
from ..log import Throttle
from . import anchor as anchors, backend, fusedev, kernel
from .calls import BackendCalls
from .children import Children, Tracked, orphans_with
from .errors import (
    AttachFailed,
    BackendDied,
    LimitReached,
    MountError,
    ShuttingDown,
    TooManyFailures,
    WalkAgain,
)
from .lifecycle import Event, State
from .registry import ACTIVE, Registry, Repo
from .requester import FailureBudget, Requester

log = structlog.get_logger("cvmfsd.mounter")

# Seconds a backend gets to exit by itself after its unmount, then again after SIGTERM.
STOP_GRACE = 5.0
# Seconds a call on a backend (an xattr, the talk socket) may take before it counts as hung.
BACKEND_CALL_TIMEOUT = 10.0
# A boot whose serving process is not among the daemon's children in this many scans, this far
# apart, lost it right after the boot.
IDENTIFY_SCANS = 10
IDENTIFY_INTERVAL = 0.05
# A dead connection is answered until nothing arrives for this long: processes that were on
# their way in when the mount was detached.
DRAIN_IDLE = 0.1


class Mounter:
    def __init__(self, cfg: Config, registry: Registry, children: Children) -> None:
        self.cfg = cfg
        self.registry = registry
        self.children = children
        self._invalidations = trio.CapacityLimiter(1)
        self._slots = BootSlots(cfg.max_concurrent_boots, max(1, cfg.max_concurrent_boots // 4))
        self._shares: dict[Requester, trio.CapacityLimiter] = {}  # per requester, while in use
        self._failures = FailureBudget(cfg.requester_failed_boots)
        self._nursery: trio.Nursery | None = None
        self._boots: set[trio.CancelScope] = set()
        self._boots_idle = trio.Event()
        self.closing = False
        self.credentials = backend.Credentials.lookup(cfg.cvmfs2_user)
        if self.credentials is None:
            log.warning("cvmfs2_keeps_root", user=cfg.cvmfs2_user or None,
                        reason="no such user" if cfg.cvmfs2_user else "cvmfs2_user is empty")
        # What users can make happen at any rate is logged at a bounded rate.
        self._refusals = Throttle()
        registry.on_excess = self._evict_excess
        self.calls = BackendCalls(registry)
        # The FUSE control filesystem (fusedev.abort), mounted by the daemon at start.
        self.fusectl: Path | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def running(self) -> bool:
        return self._nursery is not None

    # --- called from FUSE handlers: never waits ----------------------------------------------
    def request(self, repo: Repo, requester: Requester | None = None) -> None:
        """Make sure a boot of repo is under way, or raise the error that keeps it from one.
        A candidate (registry.candidate) becomes an entry only when its boot begins.
        requester: who is charged for the boot and the mount (None: the daemon or an admin)."""
        if repo.state in ACTIVE:
            return
        if repo.evicting is not None:
            raise WalkAgain(f"{repo.name} is being forgotten")
        if self.closing:
            raise ShuttingDown()
        if not self.registry.may_boot(repo, trio.current_time()):
            assert repo.last_error is not None
            raise repo.last_error.replay()
        refusal = self._refusal(repo, requester)
        if refusal is not None:
            suppressed = self._refusals.allow((type(refusal), requester))
            if suppressed is not None:
                log.warning("mount", repo=repo.name, result="refused", error=refusal.message,
                            requester=str(requester) if requester else None,
                            errno=errno.errorcode.get(refusal.errno), suppressed=suppressed)
            raise refusal
        assert self._nursery is not None
        self.registry.begin_boot(repo, requester)
        early = self._start_early(repo)
        # Cancellable by _cancel_boots from now on, also before the task first runs: a boot
        # started early has a cvmfs2 and a mount to take away.
        scope = trio.CancelScope()
        self._boots.add(scope)
        self._nursery.start_soon(self._mount, repo, scope, early, name=f"mount {repo.name}")

    def _start_early(self, repo: Repo) -> _Early | None:
        """When a boot slot is free now, start cvmfs2 here, from the LOOKUP's handler, before
        the reply: the boot is what the caller waits for, so it goes first. /dev/fuse is
        mounted at a private staging path (never under the root: nothing here can wait on
        this FUSE loop) and cvmfs2 started on it at once; a worker thread then moves the mount
        to <root>/<name> (its path walk goes on when the LOOKUP is answered), off the boot's
        critical path. Measured: docs/perf.md, "One cold access" (a worker thread's mount
        and spawn waited for the loop to free the GIL, the old order for a scheduling round and
        a hop back to the loop). Otherwise (no free slot; copies to pass the mount on to; a pin
        workspace to write first; no staging area) _mount does it step by step. Bounded: one
        such boot per boot slot, and about 0.5 ms of this loop's time each (mount, posix_spawn),
        as the spawn itself took before."""
        if repo.anchor is not None or repo.pin is not None:
            return None
        held = self._take_slot(repo)
        if held is None:
            return None
        staging = self.cfg.staging_dir / f"boot-{repo.inode}"
        try:
            staging.mkdir(mode=0o700, exist_ok=True)
            fd, dev = backend.premount(staging)
        except OSError as exc:
            log.debug("early_start_failed", repo=repo.name, error=str(exc))
            with contextlib.suppress(OSError):
                staging.rmdir()
            self._release_slot(repo, held)
            return None
        launch: backend.Launch | MountError
        try:
            launch = backend.start(self.cfg, self.children, repo.fqrn, fd, None,
                                   self.credentials, record=False)
            # The child often finishes its exec on this CPU: a 0.1 ms sleep lets it go first,
            # and this thread wakes up on another CPU if one is idle. Measured (perf-15,
            # bench.profile --real, 25 interleaved samples): cvmfs2's exec 1.0 -> 0.47 ms after
            # the spawn; sched_yield() did as well for the exec but held this FUSE loop off the
            # CPU for about 2 ms more (until the next tick moved it), the sleep for 0.2 ms.
            time.sleep(0.0001)
        except MountError as exc:
            launch = exc
        early = _Early(trio.lowlevel.current_trio_token(), held)
        trio.lowlevel.start_thread_soon(
            functools.partial(self._attach_early, repo, staging, fd, dev, launch),
            early.deliver, name=f"cvmfsd attach {repo.name}")
        return early

    def _attach_early(self, repo: Repo, staging: Path, fd: int, dev: tuple[int, int],
                      launch: backend.Launch | MountError) -> _EarlyResult:
        """Worker thread: write the boot record of _start_early's launch for a successor, and
        move its staging mount to the repository's path."""
        if isinstance(launch, backend.Launch):
            self.children.record(launch.pid)
        self.registry.enter_own_thread()
        try:
            kernel.move(staging, self.cfg.root / repo.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                kernel.umount(staging, kernel.MNT_DETACH)
            return fd, dev, launch, AttachFailed(f"mount of {repo.name} failed: {exc}")
        finally:
            self.registry.leave_own_thread()
            with contextlib.suppress(OSError):
                staging.rmdir()
        return fd, dev, launch, None

    def _refusal(self, repo: Repo, requester: Requester | None) -> MountError | None:
        """Why a boot may not begin now: a limit of the node's, or of the requester's share."""
        cfg = self.cfg
        if cfg.max_mounted and self.registry.active() >= cfg.max_mounted:
            return LimitReached(f"{cfg.max_mounted} repositories are mounted already "
                                "(max_mounted)")
        if repo.pin is not None and (self.registry.pins_of(repo.fqrn)
                                     >= cfg.max_pins_per_repository):
            return LimitReached(f"{repo.fqrn} has {cfg.max_pins_per_repository} pinned "
                                "instances mounted already (max_pins_per_repository)")
        if requester is None:
            return None
        if self._failures.exhausted(requester, trio.current_time()):
            return TooManyFailures(f"{requester} had {cfg.requester_failed_boots} failed boots "
                                   "within a minute (requester_failed_boots)")
        _, mounts, _ = cfg.requester_limits
        holding = self.registry.held_by(requester)
        if holding >= mounts:
            return LimitReached(f"{requester} holds {holding} mounts already "
                                "(requester_mounts)")
        return None

    # --- the kernel forgets names past max_names ---------------------------------------------
    def _evict_excess(self) -> None:
        if self._nursery is None:
            return
        for repo in self.registry.excess():
            repo.evicting = trio.Event()
            self._nursery.start_soon(self._evict, repo, name=f"evict {repo.name}")

    async def _evict(self, repo: Repo) -> None:
        """Tell the kernel to forget a name that holds no mount; its FORGET then drops the
        entry (registry.forgotten). While this runs nothing is mounted there: an invalidated
        dentry takes its mounts with it (DESIGN.md §4)."""
        assert repo.evicting is not None
        try:
            if repo.anchor is not None:  # nothing will be mounted there for its copies now
                anchor_, repo.anchor = repo.anchor, None
                await trio.to_thread.run_sync(anchors.drop, anchor_)
            # One thread: invalidations queue up behind each other, never behind nor in front
            # of the premounts and calls other requesters' accesses need.
            await trio.to_thread.run_sync(_invalidate, repo.parent_inode, repo.name,
                                          limiter=self._invalidations)
        except Exception as exc:  # no FUSE session (unit tests), or the name is gone already
            log.debug("evict_failed", repo=repo.name, error=repr(exc))
        finally:
            done, repo.evicting = repo.evicting, None
            done.set()

    async def settle(self, repo: Repo, timeout: float) -> None:
        """Wait (bounded) until the current boot of repo is attached; raise its error if not."""
        with trio.move_on_after(timeout):
            await repo.settled.wait()
        if repo.state is State.MOUNTED:
            return
        if repo.state is State.FAILED and repo.last_error is not None:
            raise repo.last_error.replay()
        raise MountError(f"{repo.name} is still {repo.state} after {timeout:g} s")

    async def attached(self, repo: Repo, timeout: float) -> None:
        """Wait (bounded) until the current boot's mount is in place; raise the boot's error if
        it failed instead."""
        with trio.move_on_after(timeout):
            await repo.attached.wait()
            if repo.leaving is not None:
                await repo.leaving.wait()
        if repo.state is State.FAILED and repo.last_error is not None:
            raise repo.last_error.replay()
        if not repo.attached.is_set():
            raise MountError(f"{repo.name} is still {repo.state} after {timeout:g} s")

    # --- the boot ---------------------------------------------------------------------------
    def _take_slot(self, repo: Repo) -> _Held | None:
        """What _limit(repo) takes, if it is free right now (None if getting it would mean
        waiting): the requester's share and a boot slot (of the reserve too, for a requester
        with no boot running), held on behalf of repo until _limit(repo, held=...) ends."""
        if repo.name == self.cfg.config_repository:
            return _Held(None, None)
        requester = repo.requester
        share = self._share(requester)
        first = share is None or share.borrowed_tokens == 0
        if share is not None:
            try:
                share.acquire_on_behalf_of_nowait(repo)
            except trio.WouldBlock:
                self._drop_share(requester)
                return None
        pool = self._slots.try_acquire(may_use_reserve=first)
        if pool is None:
            if share is not None:
                share.release_on_behalf_of(repo)
                self._drop_share(requester)
            return None
        return _Held(pool, share)

    def _release_slot(self, repo: Repo, held: _Held) -> None:
        """Give back what _take_slot took."""
        if held.pool is not None:
            self._slots.release(held.pool)
        if held.share is not None:
            held.share.release_on_behalf_of(repo)
            self._drop_share(repo.requester)

    def _share(self, requester: Requester | None) -> trio.CapacityLimiter | None:
        """The requester's share of boot slots (made on first use; dropped when unused)."""
        if requester is None:
            return None
        share = self._shares.get(requester)
        if share is None:
            share = self._shares[requester] = trio.CapacityLimiter(self.cfg.requester_limits[0])
        return share

    def _drop_share(self, requester: Requester | None) -> None:
        share = self._shares.get(requester) if requester is not None else None
        if share is not None and not share.borrowed_tokens and \
                not share.statistics().tasks_waiting:
            self._shares.pop(requester, None)

    @contextlib.asynccontextmanager
    async def _limit(self, repo: Repo, held: _Held | None = None) -> AsyncIterator[None]:
        """A boot slot: at most max_concurrent_boots cvmfs2 start at once, and the boots one
        requester started take at most its share of them (the rest wait for its earlier ones,
        in the daemon, while their processes wait in the kernel). A requester with no boot
        running may also take a slot of a reserve (a quarter more), so a few requesters that
        fill every slot with slow boots do not make everyone else wait.
        held: taken already (_take_slot), on behalf of repo; released when this ends."""
        if held is not None:
            try:
                yield
            finally:
                self._release_slot(repo, held)
            return
        # cvmfs2 may read the config repository under the root while it boots another one: that
        # boot must not queue behind the one that needs it.
        if repo.name == self.cfg.config_repository:
            yield
            return
        requester = repo.requester
        share = self._share(requester)
        try:
            async with contextlib.AsyncExitStack() as stack:
                first = share is None or share.borrowed_tokens == 0
                if share is not None:
                    await stack.enter_async_context(share)
                pool = await self._slots.acquire(may_use_reserve=first)
                stack.callback(self._slots.release, pool)
                yield
        finally:
            if share is not None and not share.borrowed_tokens and \
                    not share.statistics().tasks_waiting:
                self._shares.pop(requester, None)

    async def _mount(self, repo: Repo, scope: trio.CancelScope, early: _Early | None) -> None:
        started = trio.current_time()
        process: Tracked | None = None
        error: MountError | None = None
        anchored = False
        with scope:
            try:
                async with contextlib.AsyncExitStack() as slot:
                    launch: backend.Launch | MountError | None = None
                    if early is not None:
                        await slot.enter_async_context(self._limit(repo, held=early.held))
                        # As trio.to_thread.run_sync: what the thread mounts and starts is
                        # seen through, also when cancelled meanwhile.
                        with trio.CancelScope(shield=True):
                            await early.done.wait()
                        assert early.result is not None
                        fd, dev, launch, failed = early.result.unwrap()
                        if failed is not None:  # not mounted at the path: undo it all here
                            await self._collect(launch)
                            os.close(fd)
                            raise failed
                    else:
                        fd, dev = await trio.to_thread.run_sync(self._premount, repo)
                    try:
                        anchored = repo.anchor is not None
                        if repo.anchor is not None:
                            anchor_, repo.anchor = repo.anchor, None
                            await trio.to_thread.run_sync(self._pass_on, anchor_, repo.path)
                        self.registry.mount_attached(repo, fd, dev)
                        if early is None:
                            await slot.enter_async_context(self._limit(repo))
                    except BaseException:
                        await self._collect(launch)  # started early: not left behind
                        raise
                    if isinstance(launch, MountError):
                        raise launch
                    if launch is None:
                        if repo.pin is not None:
                            await self._drop_pin_config(repo)  # the last instance's (it died)
                            repo.pin_config = await trio.to_thread.run_sync(
                                backend.write_pin_config, self.cfg, repo.name, repo.pin,
                                self.credentials)
                        await backend.boot(self.cfg, self.children, repo.fqrn, fd,
                                           repo.pin_config, self.credentials)
                    else:
                        await backend.finish(self.cfg, self.children, launch)
                    process = await self._serving_process(repo, fd)
            except MountError as exc:
                error = exc
            except Exception as exc:  # a bug, not a repository problem: fail this mount visibly
                log.exception("mount_crashed", repo=repo.name)
                error = MountError(f"internal error: {exc!r}")
            finally:
                self._boots.discard(scope)
                if not self._boots:
                    self._boots_idle.set()
        if scope.cancelled_caught or (error is None and process is None):
            error = ShuttingDown()
        if error is not None:
            held = None
            # Until the name is failed, a walk that comes back to its covered inode waits
            # (attached()) instead of being sent round again to a mount that is being taken
            # away: the VFS retries ESTALE once only.
            leaving = repo.leaving = trio.Event()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                # A replacement that reached copies elsewhere is anchored in turn, for the next.
                held = await trio.to_thread.run_sync(self._detach, repo, anchored)
            if isinstance(repo.requester, Requester) and not isinstance(error, ShuttingDown):
                self._failures.charge(repo.requester, trio.current_time())
            self.registry.boot_failed(repo, error, trio.current_time(), time.time())
            repo.leaving = None
            leaving.set()
            self._log_attempt(repo, started, None, error)
            # Processes waiting in the connection may have spent their one ESTALE retry on the
            # way in: they get the name's own error.
            self._release(repo, self.registry.take_fuse_fd(repo), held, error.errno)
            with trio.CancelScope(shield=True):
                await self._drop_pin_config(repo)
            self._retry_for_copies(repo)
            return
        assert process is not None
        self.registry.booted(repo, process, trio.current_time(), time.time())
        self._log_attempt(repo, started, process.pid or None, None)
        self.watch(repo, process)

    async def _drop_pin_config(self, repo: Repo) -> None:
        """Remove the workspace of the name's last pinned instance. Taken off the name before
        the first await: a boot of the name meanwhile writes a workspace of its own."""
        pin_config, repo.pin_config = repo.pin_config, None
        if pin_config is not None:
            await trio.to_thread.run_sync(backend.remove_pin_workspace, self.cfg, pin_config)
        else:
            await trio.lowlevel.checkpoint()

    async def _collect(self, launch: backend.Launch | MountError | None) -> None:
        """Kill and collect a launcher that _start_early began, when its mount is not used."""
        if isinstance(launch, backend.Launch):
            self.children.kill_group(launch.pid)
            with trio.CancelScope(shield=True), contextlib.suppress(MountError):
                await backend.finish(self.cfg, self.children, launch)

    def _premount(self, repo: Repo) -> tuple[int, tuple[int, int]]:
        """Worker thread: mount /dev/fuse at the repository's path for cvmfs2 to serve."""
        self.registry.enter_own_thread()
        try:
            return backend.premount(self.cfg.root / repo.path)
        except OSError as exc:
            raise AttachFailed(f"mount of {repo.name} failed: {exc}") from exc
        finally:
            self.registry.leave_own_thread()

    async def _serving_process(self, repo: Repo, fuse_fd: int) -> Tracked:
        """The daemonized process that serves the mount (xattr user.pid, interface §6): one
        round trip to cvmfs2, which serves by now; bounded, since a backend can hang.

        A cvmfs2 that dies before it answers would leave that request waiting in the kept
        connection; so its processes — daemonized, they are this daemon's children now, found
        by their /dev/fd/N — are watched meanwhile, and one that exits is taken as the serving
        process: its death is then healed like any other (and counted as one). One that is
        gone already (its launcher has exited, so it was our child) is never among them: if
        none turns up in IDENTIFY_SCANS scans, it died right after its boot — healed too,
        not a failed boot after BACKEND_CALL_TIMEOUT."""
        path = self.cfg.root / repo.path
        candidates: dict[int, int] = {}
        answer: list[int] = []
        died: list[int] = []
        error: BaseException | None = None
        gone = False
        try:
            async with trio.open_nursery() as nursery:
                async def ask() -> None:
                    nonlocal error
                    try:
                        answer.append(await self.calls.call(
                            repo, lambda: backend.serving_pid(path), BACKEND_CALL_TIMEOUT))
                    except (OSError, ValueError) as exc:
                        error = exc
                    nursery.cancel_scope.cancel()

                async def watch(pid: int, pidfd: int) -> None:
                    await trio.lowlevel.wait_readable(pidfd)
                    died.append(pid)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(ask)
                # /proc/<pid>/task/*/children can miss a child while others fork and exit (a
                # storm of boots): one empty scan is not yet proof.
                for _ in range(IDENTIFY_SCANS):
                    for pid in orphans_with(f"/dev/fd/{fuse_fd}", repo.fqrn):
                        with contextlib.suppress(OSError):
                            candidates[pid] = os.pidfd_open(pid)
                            nursery.start_soon(watch, pid, candidates[pid])
                    if candidates:
                        break
                    await trio.sleep(IDENTIFY_INTERVAL)
                else:
                    gone = True
                    nursery.cancel_scope.cancel()
            chosen = answer[0] if answer else (died[0] if died else None)
            if chosen is None and gone:
                log.warning("serving_process_gone", repo=repo.name,
                            reason="no process serves the mount after its launcher exited")
                return Tracked.gone()
            if chosen is None:
                raise AttachFailed(f"cvmfs2 started but its mount does not answer: {error}")
            pidfd = candidates.pop(chosen, None)
            return Tracked(chosen, pidfd) if pidfd is not None else Tracked.open(chosen)
        except (OSError, ValueError) as exc:
            raise AttachFailed(f"cvmfs2 started but its mount does not answer: {exc}") from exc
        finally:
            for pidfd in candidates.values():
                os.close(pidfd)

    def _release(self, repo: Repo, fd: int | None, held: int | None, error: int,
                 after: trio.Event | None = None) -> None:
        """After the mount was detached (held: what _detach returned): answer what waits in its
        connection (fd: the daemon's copy) with `error` — once `after` is set, if given; until
        then the processes keep waiting —, end the connection, and close both."""
        if fd is None:
            if held is not None:
                os.close(held)
            return
        assert self._nursery is not None
        dev = repo.dev

        async def drain() -> None:
            try:
                if after is not None:
                    with trio.move_on_after(self.cfg.handler_wait):
                        await after.wait()
                await fusedev.answer_all(fd, error, idle=DRAIN_IDLE, name=repo.name)
            finally:
                if held is not None:  # else the device number may belong to another mount
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(fusedev.abort, self.fusectl, dev)
                    os.close(held)
                os.close(fd)

        self._nursery.start_soon(drain, name=f"drain {repo.name}")

    def _log_attempt(self, repo: Repo, started: float, pid: int | None,
                     error: MountError | None) -> None:
        fields = {"repo": repo.name, "boot": repo.boots,
                  "duration_ms": round((trio.current_time() - started) * 1000, 1)}
        if error is None:
            log.info("mount", result="mounted", exit_code=0, serving_pid=pid, **fields)
        else:
            log.warning("mount", result="failed", exit_code=error.exit_code,
                        error=error.message, stderr_tail=error.stderr_tail[-400:],
                        retry_in_s=round(max(0.0, repo.retry_at - trio.current_time()), 1),
                        **fields)

    # --- after the boot ---------------------------------------------------------------------
    async def _watch(self, repo: Repo, process: Tracked) -> None:
        """Heal: when the serving process exits while mounted, detach the dead mount so that the
        next access boots it again instead of failing with ENOTCONN forever."""
        await process.exited.wait()
        await trio.sleep(0.01)  # the reaper usually has the exit status by now
        if repo.process is process and repo.state is State.MOUNTED:
            if process.pid:
                status = _exit_text(self.children.recent.get(process.pid))
                await self.heal(repo, f"serving process {process.pid} {status}")
            else:
                await self.heal(repo, "serving process exited before it was identified")

    async def heal(self, repo: Repo, why: str) -> None:
        """Detach a dead mount and mount the repository again at once (unless it crash-loops):
        processes waiting in the dead connection are told to walk again (ESTALE) once the new
        mount is in place, and wait there for the new cvmfs2."""
        process = repo.process
        if repo.state is not State.MOUNTED or process is None:
            return
        lived = trio.current_time() - (repo.mounted_at or trio.current_time())
        # Unmounting while the dead mount is taken away: walks that come back to the name's
        # covered inode meanwhile wait for the outcome instead of being sent round again.
        self.registry.begin_unmount(repo)
        held = await trio.to_thread.run_sync(self._detach, repo, True)
        fd = self.registry.take_fuse_fd(repo)
        self.registry.died(repo, BackendDied(f"{why} after {lived:.1f} s"), trio.current_time(),
                           time.time())
        log.warning("healed", repo=repo.name, reason=why, mounted_for_s=round(lived, 2),
                    state=str(repo.state))
        remount = repo.state is State.IDLE and not self.closing
        if remount:
            with contextlib.suppress(MountError):  # e.g. the limits: the next access retries
                self.request(repo)
        self._retry_for_copies(repo)
        self._release(repo, fd, held, errno.ESTALE,
                      after=repo.attached if repo.state is State.BOOTING else None)
        assert self._nursery is not None
        self._nursery.start_soon(process.stop, STOP_GRACE)

    def _retry_for_copies(self, repo: Repo) -> None:
        """A failed repository with an anchor has copies elsewhere (volumes in pods) whose
        processes cannot reach the root to ask for it again: mount it again by itself once its
        backoff is over (and again after each failure, with its growing backoff)."""
        if repo.state is not State.FAILED or repo.anchor is None or self._nursery is None:
            return

        async def later() -> None:
            await trio.sleep_until(repo.retry_at)
            if repo.state is State.FAILED and repo.anchor is not None:
                with contextlib.suppress(MountError):
                    self.request(repo)

        self._nursery.start_soon(later, name=f"retry {repo.name}")

    def _detach(self, repo: Repo, anchor: bool = False) -> int | None:
        """Worker thread: detach what is mounted at the repository's path — first anchored
        (see anchor.py) when copies of it outside the root's tree are to receive the next
        mount. Returns an O_PATH descriptor of it that keeps its superblock — and so its
        connection's number under the FUSE control filesystem — from being reused until the
        caller is done with it and closes it."""
        path = self.cfg.root / repo.path
        self.registry.enter_own_thread()
        try:
            if anchor and repo.anchor is None:
                repo.anchor = anchors.make(path, self.cfg.root,
                                           self.cfg.staging_dir / f"anchor-{repo.inode}")
            try:
                held: int | None = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                held = None
            with contextlib.suppress(OSError):
                kernel.umount(path, kernel.MNT_DETACH)
            return held
        finally:
            self.registry.leave_own_thread()

    def _pass_on(self, anchor: anchors.Anchor, path: str) -> None:
        self.registry.enter_own_thread()
        try:
            anchors.pass_on(anchor, self.cfg.root / path)
        finally:
            self.registry.leave_own_thread()

    async def unmount(self, repo: Repo, *, reason: str, lazy: bool = False) -> bool:
        """umount2(path, 0): False when the repository is busy (an open file, a cwd, a busy
        slave copy in a pod) and lazy is not set. The backend exits by itself afterwards."""
        if repo.state is not State.MOUNTED:
            return False
        process = repo.process
        self.registry.begin_unmount(repo)
        try:
            done = await trio.to_thread.run_sync(self._umount, repo, lazy)
        except OSError as exc:
            log.error("umount_failed", repo=repo.name, error=str(exc))
            done = False
        if not done:
            self.registry.unmount_refused(repo)
            return False
        if repo.state is State.UNMOUNTING:
            self.registry.gone(repo, Event.UNMOUNTED)
        log.info("unmounted", repo=repo.name, reason=reason,
                 serving_pid=process and process.pid)
        # The unmount ended the connection (or, detached while busy, cvmfs2 serves the holders
        # until they let go): nothing waits in it for the daemon's answer.
        fd = self.registry.take_fuse_fd(repo)
        if fd is not None:
            os.close(fd)
        await self._drop_pin_config(repo)
        if process is not None:
            assert self._nursery is not None
            self._nursery.start_soon(process.stop, STOP_GRACE)
        return True

    def _umount(self, repo: Repo, lazy_if_busy: bool) -> bool:
        """Worker thread: unmount the repository. False when busy and not lazy. A forced one
        is anchored first: copies elsewhere (volumes in pods) get the next mount."""
        path = self.cfg.root / repo.path
        self.registry.enter_own_thread()
        try:
            # umount2 does not see copies outside the root's tree (a volume in a pod), so a
            # forced unmount anchors whatever it takes away, for them to get the next mount.
            if lazy_if_busy and repo.anchor is None and not self.closing:
                repo.anchor = anchors.make(path, self.cfg.root,
                                           self.cfg.staging_dir / f"anchor-{repo.inode}")
            kernel.umount(path)
        except OSError as exc:
            if exc.errno != errno.EBUSY or not lazy_if_busy:
                if exc.errno == errno.EBUSY:
                    return False
                raise
            kernel.umount(path, kernel.MNT_DETACH)
            log.warning("umount_lazy", repo=repo.path, reason="busy; detached lazily")
        finally:
            self.registry.leave_own_thread()
        return True

    async def _cancel_boots(self) -> None:
        """Boots in progress are cancelled; each kills its cvmfs2 and detaches its mount."""
        self.closing = True
        for scope in list(self._boots):
            scope.cancel()
        with trio.move_on_after(15):
            while self._boots:
                self._boots_idle = trio.Event()
                await self._boots_idle.wait()

    async def shutdown(self) -> None:
        """Unmount every repository (busy ones lazily), and see every serving process exit."""
        await self._cancel_boots()
        processes = [r.process for r in self.registry.mounted() if r.process]
        for repo in self.registry.mounted():
            await self.unmount(repo, reason="shutdown", lazy=True)
        # unmount() started a stop (wait, SIGTERM, SIGKILL) for each backend; see them exit.
        with trio.move_on_after(3 * STOP_GRACE + 1):
            for process in processes:
                await process.exited.wait()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def handover(self) -> None:
        """Leave every mounted repository and its backend as they are, for the next daemon."""
        await self._cancel_boots()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    def watch(self, repo: Repo, process: Tracked) -> None:
        """Track the backend of a repository that is mounted (booted here or adopted)."""
        assert self._nursery is not None
        self._nursery.start_soon(process.watch, name=f"pidfd {process.pid}")
        self._nursery.start_soon(self._watch, repo, process, name=f"watch {repo.name}")


@dataclass(frozen=True)
class _Held:
    """What _take_slot took: a boot slot's pool (None: the config repository needs none) and
    the requester's share, if any."""

    pool: str | None
    share: trio.CapacityLimiter | None


# What _attach_early hands to _mount: the descriptor, the mount's device, the launch (or why it
# could not start) and, if the mount could not be moved into place, why.
_EarlyResult = tuple[int, tuple[int, int], "backend.Launch | MountError", "MountError | None"]


class _Early:
    """The outcome of the worker thread started by _start_early, handed to the _mount task,
    with the boot slot taken for it."""

    def __init__(self, token: trio.lowlevel.TrioToken, held: _Held) -> None:
        self.done = trio.Event()
        self.result: outcome.Outcome[_EarlyResult] | None = None
        self.held = held
        self._token = token

    def deliver(self, result: outcome.Outcome[_EarlyResult]) -> None:
        """In the worker thread, once it is done (must not block)."""
        self.result = result
        self._token.run_sync_soon(self.done.set)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _invalidate(parent_inode: int, name: str) -> None:
    """Worker thread (pyfuse3 documents invalidate_entry as not for the request loop)."""
    import pyfuse3

    pyfuse3.invalidate_entry(parent_inode, name.encode())


class BootSlots:
    """Two pools of boot slots: the shared one, and a reserve only for requesters that have no
    boot running. Whoever comes first when a slot frees up takes it."""

    def __init__(self, shared: int, reserve: int) -> None:
        self.free = {"shared": shared, "reserve": reserve}
        self._freed = trio.Event()

    async def acquire(self, *, may_use_reserve: bool) -> str:
        while True:
            pool = self.try_acquire(may_use_reserve=may_use_reserve)
            if pool is not None:
                return pool
            await self._freed.wait()

    def try_acquire(self, *, may_use_reserve: bool) -> str | None:
        """A free slot's pool now, or None (acquire would wait)."""
        for pool in ("shared", "reserve") if may_use_reserve else ("shared",):
            if self.free[pool]:
                self.free[pool] -= 1
                return pool
        return None

    def release(self, pool: str) -> None:
        self.free[pool] += 1
        self._freed.set()
        self._freed = trio.Event()

