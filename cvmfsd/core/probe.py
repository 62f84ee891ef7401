"""What is actually mounted: classify a repository from mountinfo, its process and the mount.

Like cvmfs-csi's probe: not mounted / mounted / corrupted (ENOTCONN, or the serving process is
gone) / unknown (no answer in time). The stat is a bounded backend call (calls.py): a hung
backend cannot block the daemon, and a walk that lands on a covered inode of the root is
answered at once instead of waiting for an attach.
"""

from __future__ import annotations

import errno
import os
from enum import StrEnum
from pathlib import Path

from .calls import BackendCalls, BackendHung
from .registry import Repo


class Observed(StrEnum):
    NOT_MOUNTED = "not_mounted"
    MOUNTED = "mounted"
    CORRUPTED = "corrupted"
    UNKNOWN = "unknown"


def classify(mounted: bool, process_alive: bool | None, stat_errno: int | None,
             stat_timed_out: bool) -> Observed:
    """Pure decision from the observations."""
    if not mounted:
        return Observed.NOT_MOUNTED
    if process_alive is False or stat_errno in (errno.ENOTCONN, errno.ECONNABORTED):
        return Observed.CORRUPTED
    if stat_timed_out:
        return Observed.UNKNOWN
    return Observed.MOUNTED


async def probe(calls: BackendCalls, root: Path, repo: Repo, mountpoints: set[str],
                timeout: float = 2.0) -> Observed:
    """mountpoints: every mount point in mountinfo, read once per pass."""
    path = root / repo.path
    alive = None if repo.process is None else not repo.process.exited.is_set()
    if str(path) not in mountpoints:
        return classify(False, alive, None, False)

    def stat() -> int | None:
        # statfs, not stat: the kernel answers a stat of the mount's root from its attribute
        # cache for as long as cvmfs2 said it may (a minute), even on an aborted connection;
        # statfs always goes to the filesystem.
        try:
            os.statvfs(path)
            return None
        except OSError as exc:
            return exc.errno

    try:
        stat_errno = await calls.call(repo, stat, timeout)
    except BackendHung:
        return classify(True, alive, None, True)
    return classify(True, alive, stat_errno, False)


async def idle_counter(calls: BackendCalls, root: Path, repo: Repo,
                       timeout: float) -> int | None:
    """cvmfs2's count of open() calls (xattr user.nopen): stat walks do not move it."""
    path = root / repo.path

    def read() -> int | None:
        try:
            return int(os.getxattr(path, "user.nopen"))
        except (OSError, ValueError):
            return None

    try:
        return await calls.call(repo, read, timeout)
    except BackendHung:
        return None
