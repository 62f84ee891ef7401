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
from dataclasses import dataclass, field

import structlog
import trio

log = structlog.get_logger("cvmfsd.children")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class _Exit:
    event: trio.Event = field(default_factory=trio.Event)
    status: int | None = None  # as os.waitstatus_to_exitcode: negative = killed by that signal


class Children:
    def __init__(self) -> None:
        self._waiting: dict[int, _Exit] = {}
        self.orphans_reaped = 0

    def spawn(self, argv: list[str], *, stdout: int, stderr: int,
              env: dict[str, str] | None = None) -> int:
        """Start argv in its own session with stdin from /dev/null; cwd is the daemon's ('/').

        posix_spawn, not subprocess: subprocess reaps behind our back and would race the reaper.
        """
        env = {"PATH": SAFE_PATH, "LC_ALL": "C"} if env is None else env
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ]
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
        self._waiting[pid] = _Exit()
        return pid

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
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            exit_ = self._waiting.get(pid)
            if exit_ is not None:
                exit_.status = code
                exit_.event.set()
            else:
                self.orphans_reaped += 1
                log.debug("reaped", pid=pid, status=code)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            self.reap()  # whatever exited before the handler was installed
            task_status.started()
            async for _ in signals:
                self.reap()


async def wait_pid_exit(pid: int) -> None:
    """Return when pid exits, whoever its parent is (pidfd: prompt, no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
