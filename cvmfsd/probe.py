"""What is actually mounted: classify a repository from mountinfo, its process and the mount.

Like cvmfs-csi's probe: not mounted / mounted / corrupted (ENOTCONN, or the serving process is
gone) / unknown (no answer in time). The stat runs in an abandonable worker thread registered as
one of the daemon's own, so a hung backend cannot block the daemon, and a walk that lands on a
covered inode of the root is answered at once instead of waiting for an attach.
"""

from __future__ import annotations

import errno
import os
from enum import StrEnum
from pathlib import Path

import trio

from . import kernel
from .registry import Registry, Repo


class Observed(StrEnum):
    NOT_MOUNTED = "not_mounted"
    MOUNTED = "mounted"
    CORRUPTED = "corrupted"
    UNKNOWN = "unknown"


def classify(path: Path, entries: list[kernel.MountEntry], process_alive: bool | None,
             stat_errno: int | None, stat_timed_out: bool) -> Observed:
    """Pure decision from the observations."""
    if not kernel.mounts_at(str(path), entries):
        return Observed.NOT_MOUNTED
    if process_alive is False or stat_errno in (errno.ENOTCONN, errno.ECONNABORTED):
        return Observed.CORRUPTED
    if stat_timed_out:
        return Observed.UNKNOWN
    return Observed.MOUNTED


async def probe(registry: Registry, root: Path, repo: Repo, entries: list[kernel.MountEntry],
                timeout: float = 2.0) -> Observed:
    path = root / repo.path
    if not kernel.mounts_at(str(path), entries):
        return Observed.NOT_MOUNTED
    alive = None if repo.process is None else not repo.process.exited.is_set()

    def stat_own() -> int | None:
        registry.enter_own_thread()
        try:
            os.stat(path)
            return None
        except OSError as exc:
            return exc.errno
        finally:
            registry.leave_own_thread()

    stat_errno: int | None = None
    with trio.move_on_after(timeout) as scope:
        stat_errno = await trio.to_thread.run_sync(stat_own, abandon_on_cancel=True)
    return classify(path, entries, alive, stat_errno, scope.cancelled_caught)


def read_idle_counter(registry: Registry, path: Path) -> int | None:
    """cvmfs2's count of open() calls (xattr user.nopen): stat walks do not move it. Blocking."""
    registry.enter_own_thread()
    try:
        return int(os.getxattr(path, "user.nopen"))
    except (OSError, ValueError):
        return None
    finally:
        registry.leave_own_thread()
