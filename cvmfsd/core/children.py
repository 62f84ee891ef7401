"""Every process the daemon starts, and every orphan reparented to it, is reaped here.

cvmfs2 daemonizes with a double fork, so its serving process ends up as a child of the nearest
child subreaper: this daemon. One SIGCHLD-driven reaper collects every exit status, so no
zombie is ever left (the zombies reported from the first CSI deployments) and no other code may
call waitpid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from ..signals import IGNORED

log = structlog.get_logger("cvmfsd.children")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the daemon ignores (signals.IGNORED, and SIGPIPE/SIGXFSZ as Python does) would stay
# ignored across exec.
DEFAULT_IN_CHILD = (*IGNORED, signal.SIGPIPE, signal.SIGXFSZ)


@dataclass
class _Exit:
    event: trio.Event = field(default_factory=trio.Event)
    status: int | None = None  # as os.waitstatus_to_exitcode: negative = killed by that signal


class Children:
    def __init__(self, record_dir: Path | None = None) -> None:
        """record_dir: where each process still running is written down (pid, start time), so
        that a daemon that starts after this one was killed can stop what it left running."""
        self.record_dir = record_dir
        self._waiting: dict[int, _Exit] = {}
        self.orphans_reaped = 0
        # spawn() may run in a worker thread (backend.start): a pid is registered under this
        # lock before the reaper, which takes it too, can collect it.
        self._lock = threading.Lock()
        # Exit statuses of reaped orphans (the serving cvmfs2 processes), newest last, bounded.
        self.recent: dict[int, int] = {}

    def spawn(self, argv: list[str], *, stdout: int, stderr: int,
              env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = (),
              record: bool = True) -> int:
        """Start argv in its own session with stdin from /dev/null; cwd is the daemon's ('/').
        pass_fds are inherited under their own numbers (dup2 onto itself clears CLOEXEC).

        posix_spawn, not subprocess: subprocess reaps behind our back and would race the reaper,
        and posix_spawn does not copy the daemon's page tables the way fork does.
        """
        env = {"PATH": SAFE_PATH, "LC_ALL": "C"} if env is None else env
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
            *((os.POSIX_SPAWN_DUP2, fd, fd) for fd in pass_fds),
        ]
        with self._lock:
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True,
                                 setsigdef=DEFAULT_IN_CHILD, setsigmask=())
            self._waiting[pid] = _Exit()
        if record:
            self.record(pid)
        return pid

    def record(self, pid: int) -> None:
        """Write down a spawned process for a successor (stop_leftovers). Blocking: reading
        the start time waits for the child's exec to end (about 1.5 ms, measured: bench/
        README.md, "one cold access"), so the FUSE loop leaves it to a worker thread."""
        if self.record_dir is not None and self.running(pid):
            with contextlib.suppress(OSError):  # a record is a help, not a condition
                (self.record_dir / str(pid)).write_text(f"{_start_time(pid)}\n")

    async def wait(self, pid: int) -> int:
        """Exit status of a process started with spawn()."""
        exit_ = self._waiting[pid]
        try:
            await exit_.event.wait()
        finally:
            if exit_.event.is_set():
                del self._waiting[pid]
        assert exit_.status is not None
        return exit_.status

    def running(self, pid: int) -> bool:
        exit_ = self._waiting.get(pid)
        return exit_ is not None and not exit_.event.is_set()

    def kill_group(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Signal the session of a spawned process that has not been reaped yet."""
        if self.running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

    def reap(self) -> None:
        while True:
            with self._lock:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                exit_ = self._waiting.get(pid)
            code = os.waitstatus_to_exitcode(status)
            if exit_ is not None:
                exit_.status = code
                exit_.event.set()
                if self.record_dir is not None:
                    with contextlib.suppress(OSError):
                        (self.record_dir / str(pid)).unlink()
            else:
                self.orphans_reaped += 1
                self.recent[pid] = code
                if len(self.recent) > 256:
                    del self.recent[next(iter(self.recent))]
                log.debug("reaped", pid=pid, status=code)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            self.reap()  # whatever exited before the handler was installed
            task_status.started()
            async for _ in signals:
                self.reap()


def orphans_with(*args: str) -> list[int]:
    """Children of this process (reparented orphans included: it is a subreaper) whose command
    line holds every one of args. Reads procfs only."""
    wanted = [a.encode() for a in args]
    out = []
    for children in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if all(w in argv for w in wanted):
                        out.append(int(pid))
    return out


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the
    pid, it names one process, whatever reuses the pid later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def stop_leftovers(record_dir: Path, timeout: float = 5.0) -> list[int]:
    """Blocking, at start: kill the sessions of processes a previous daemon started and left
    running — cvmfs2 launchers of boots that were under way when it was killed — which would
    otherwise go on booting and hold their repository's workspace lock. Only a process whose
    start time matches its record: a pid reused since is somebody else's."""
    killed = []
    record_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for record in record_dir.iterdir():
        with contextlib.suppress(ValueError, OSError):
            pid = int(record.name)
            started = int(record.read_text().split()[0])
            if _start_time(pid) == started:
                os.killpg(pid, signal.SIGKILL)  # its own session (spawn: setsid)
                killed.append(pid)
        with contextlib.suppress(OSError):
            record.unlink()
    deadline = time.monotonic() + timeout
    while killed and any(_start_time(pid) is not None for pid in killed):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if killed:
        log.warning("leftover_boots_stopped", pids=killed)
    return killed


class Tracked:
    """A process the daemon did not spawn itself (a daemonized cvmfs2), held by a pidfd: exit is
    noticed at once, and a signal can never hit a process that reused the pid."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd
        self.exited = trio.Event()

    @classmethod
    def open(cls, pid: int) -> Tracked:
        return cls(pid, os.pidfd_open(pid))

    @classmethod
    def gone(cls) -> Tracked:
        """A process that exited before it could be named: pid 0, `exited` set at watch()."""
        return cls(0, -1)

    async def watch(self) -> None:
        """Run as one task per process; sets `exited`."""
        if self._fd < 0:
            await trio.lowlevel.checkpoint()
            self.exited.set()
            return
        try:
            await trio.lowlevel.wait_readable(self._fd)
            self.exited.set()
        finally:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """For a process that never got a watch() task."""
        os.close(self._fd)
        self._fd = -1

    def signal(self, sig: int) -> None:
        if self._fd >= 0 and not self.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, sig)

    async def stop(self, grace: float) -> None:
        """Wait for a voluntary exit, then SIGTERM, then SIGKILL (each bounded by grace)."""
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                log.warning("stop_backend", pid=self.pid, signal=sig.name)
                self.signal(sig)
            with trio.move_on_after(grace):
                await self.exited.wait()
                return
