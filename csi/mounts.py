"""Mount table, the probe of the daemon's root, bounded filesystem calls and the mount syscalls.

Rules this module keeps (see docs/DESIGN.md):
- Anything that may touch a FUSE filesystem (the daemon's root, a repository, a published target
  that
  is a bind of them) runs in a worker thread with a timeout (`run_bounded`), so a dead or hung
  daemon
  cannot hang a gRPC request thread. A call that times out leaves its thread behind; the number of
  such
  threads is capped and further calls fail fast.
- Facts about mounts come from /proc/self/mountinfo, never from memory.
- Binds are made through file descriptors (open_tree/move_mount, or mount(2) on /proc/self/fd/N), so
  the place that was checked is the place that gets mounted.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

# The syscall layer is the daemon's (one copy): mount(2)/umount2(2) flags, the new mount API,
# mountinfo's escapes. Names re-exported for csi.node and the tests.
from cvmfsd.core.kernel import (
    AT_EMPTY_PATH as AT_EMPTY_PATH,
    AT_RECURSIVE as AT_RECURSIVE,
    MNT_DETACH as MNT_DETACH,
    MOUNT_ATTR_NODEV as MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOEXEC as MOUNT_ATTR_NOEXEC,
    MOUNT_ATTR_NOSUID as MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY as MOUNT_ATTR_RDONLY,
    MOVE_MOUNT_F_EMPTY_PATH as MOVE_MOUNT_F_EMPTY_PATH,
    MOVE_MOUNT_T_EMPTY_PATH as MOVE_MOUNT_T_EMPTY_PATH,
    MS_BIND as MS_BIND,
    MS_MOVE as MS_MOVE,
    MS_NODEV as MS_NODEV,
    MS_NOEXEC as MS_NOEXEC,
    MS_NOSUID as MS_NOSUID,
    MS_PRIVATE as MS_PRIVATE,
    MS_RDONLY as MS_RDONLY,
    MS_REC as MS_REC,
    MS_REMOUNT as MS_REMOUNT,
    MS_SHARED as MS_SHARED,
    MS_SLAVE as MS_SLAVE,
    OPEN_TREE_CLOEXEC as OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE as OPEN_TREE_CLONE,
    UMOUNT_NOFOLLOW as UMOUNT_NOFOLLOW,
    fd_mount_id as fd_mount_id,
    mount as _mount,
    mount_setattr as mount_setattr,
    move_mount as move_mount,
    open_tree as open_tree,
    umount as umount,
    unescape_mountinfo as _unescape,
)

T = TypeVar("T")

O_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
# errnos that mean "the FUSE connection behind this mount is gone"
DEAD_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2); a missing source is "none" (what mount(8) passes for remounts)."""
    _mount(source or "none", target, fstype, flags, data or None)


_new_api: bool | None = None


def new_mount_api_available() -> bool:
    """True when open_tree, move_mount and mount_setattr can be used (kernel >= 5.12, no seccomp
    veto).

    Probed once with calls on an invalid fd: EBADF means the syscall exists; ENOSYS (old kernel) or
    EPERM (a seccomp profile) mean it does not.
    """
    global _new_api
    if _new_api is None:
        ok = True
        for call in (
            lambda: open_tree(-1, "", AT_EMPTY_PATH),
            lambda: move_mount(-1, "", -1, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
            lambda: mount_setattr(-1, "", AT_EMPTY_PATH),
        ):
            try:
                call()
            except OSError as e:
                if e.errno in (errno.ENOSYS, errno.EPERM):
                    ok = False
        _new_api = ok
    return _new_api


def fd_path(fd: int) -> str:
    """The magic-link path that names exactly what fd refers to."""
    return f"/proc/self/fd/{fd}"


# --------------------------------------------------------------------------------------------------
# mountinfo


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    dev: str
    root: str
    mount_point: str
    options: frozenset[str]
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def shared(self) -> bool:
        return any(o.startswith("shared:") for o in self.optional)

    @property
    def slave(self) -> bool:
        return any(o.startswith("master:") for o in self.optional)

    @property
    def identity(self) -> tuple[str, str]:
        """What a bind shows: the filesystem (device) and its directory at the mount's root."""
        return (self.dev, self.root)

    @classmethod
    def parse(cls, line: str) -> MountEntry:
        fields = line.rstrip("\n").split(" ")
        sep = fields.index("-", 6)
        return cls(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            dev=fields[2],
            root=_unescape(fields[3]),
            mount_point=_unescape(fields[4]),
            options=frozenset(fields[5].split(",")),
            optional=tuple(fields[6:sep]),
            fstype=fields[sep + 1],
            source=_unescape(fields[sep + 2]),
            super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
        )


def is_under(path: str, ancestor: str) -> bool:
    """True when path is strictly below ancestor (both absolute and normalised)."""
    if ancestor == "/":
        return path != "/" and path.startswith("/")
    return path.startswith(ancestor + "/")


class MountTable:
    """A snapshot of the mount table of this process's mount namespace."""

    def __init__(self, entries: Iterable[MountEntry]) -> None:
        self.entries: list[MountEntry] = list(entries)
        self._by_id = {e.mount_id: e for e in self.entries}

    @classmethod
    def read(cls, path: str = "/proc/self/mountinfo") -> MountTable:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return cls(MountEntry.parse(line) for line in f if line.strip())

    def by_id(self, mount_id: int) -> MountEntry | None:
        return self._by_id.get(mount_id)

    def at(self, path: str) -> list[MountEntry]:
        """Every mount at exactly this place, bottom first (a stack when mounts were stacked)."""
        here = [e for e in self.entries if e.mount_point == path]
        ids = {e.mount_id for e in here}
        # order the stack by following parents: the bottom one's parent is not at this place
        ordered: list[MountEntry] = []
        current = [e for e in here if e.parent_id not in ids]
        while current:
            ordered.extend(current)
            cur_ids = {e.mount_id for e in current}
            current = [e for e in here if e.parent_id in cur_ids and e not in ordered]
        ordered.extend(e for e in here if e not in ordered)  # cycles cannot happen; be safe
        return ordered

    def top(self, path: str) -> MountEntry | None:
        """The mount that a path walk reaching this place ends in (the top of the stack)."""
        stack = self.at(path)
        return stack[-1] if stack else None

    def under(self, path: str) -> list[MountEntry]:
        """Mounts strictly below path."""
        return [e for e in self.entries if is_under(e.mount_point, path)]


# --------------------------------------------------------------------------------------------------
# bounded calls


class FsTimeout(Exception):
    """A filesystem call did not finish in time (its thread is left behind)."""


MAX_STRANDED = 32
_stranded = 0
_stranded_lock = threading.Lock()


def stranded_calls() -> int:
    """How many timed-out filesystem calls are still blocked in the kernel."""
    with _stranded_lock:
        return _stranded


def run_bounded(
    fn: Callable[[], T], timeout: float, cleanup: Callable[[T], object] | None = None
) -> T:
    """Run fn in its own daemon thread and wait at most `timeout` seconds for it.

    On timeout FsTimeout is raised; the thread keeps running (a syscall blocked on a FUSE request
    cannot be interrupted) and, should it finish later, `cleanup` is called with its result (to
    close
    a file descriptor nobody will use). Past MAX_STRANDED such threads, calls fail at once.
    """
    global _stranded
    with _stranded_lock:
        if _stranded >= MAX_STRANDED:
            raise FsTimeout(f"{_stranded} earlier filesystem calls are still blocked")
    result: list[T] = []
    error: list[BaseException] = []
    done = threading.Event()
    state = threading.Lock()
    abandoned = [False]

    def body() -> None:
        global _stranded
        try:
            result.append(fn())
        except BaseException as e:  # handed to the caller
            error.append(e)
        with state:
            late = abandoned[0]
            done.set()
        if late:
            with _stranded_lock:
                _stranded -= 1
            if cleanup is not None and result:
                cleanup(result[0])

    thread = threading.Thread(target=body, name="cvmfs-csi-fs", daemon=True)
    thread.start()
    done.wait(timeout)
    with state:
        if not done.is_set():
            abandoned[0] = True
            with _stranded_lock:
                _stranded += 1
            raise FsTimeout(f"no answer within {timeout:g} s")
    if error:
        raise error[0]
    return result[0]


# --------------------------------------------------------------------------------------------------
# the daemon's root


class RootState(enum.Enum):
    NOT_MOUNTED = "not-mounted"
    MOUNTED = "mounted"
    CORRUPTED = "corrupted"
    UNRESPONSIVE = "unresponsive"


@dataclass(frozen=True)
class RootStatus:
    state: RootState
    detail: str
    entry: MountEntry | None = None

    @property
    def serving(self) -> bool:
        return self.state is RootState.MOUNTED


def is_daemon_root(entry: MountEntry) -> bool:
    """The cvmfsd root: fstype fuse.cvmfsd, or plain fuse with source cvmfsd."""
    return entry.fstype == "fuse.cvmfsd" or (entry.fstype == "fuse" and entry.source == "cvmfsd")


def _ask_root(root: str) -> None:
    """One round trip to the daemon.

    stat() alone may be answered from the kernel's attribute cache (the daemon gives its root a very
    long attribute timeout), so it cannot tell a live daemon from a dead one. statfs() is never
    cached:
    the kernel asks the daemon every time. Any errno other than a dead connection is still an answer
    (e.g. ENOSYS from a daemon that does not implement statfs).
    """
    os.stat(root)
    try:
        os.statvfs(root)
    except OSError as e:
        if e.errno in DEAD_ERRNOS:
            raise


def probe_root(root: str, timeout: float) -> RootStatus:
    """Classify the daemon's root: not mounted, mounted (and answering), corrupted, unresponsive."""
    entry = MountTable.read().top(root)
    if entry is None:
        return RootStatus(RootState.NOT_MOUNTED, f"nothing is mounted at {root}")
    if not is_daemon_root(entry):
        return RootStatus(
            RootState.NOT_MOUNTED,
            f"{root} is {entry.fstype} from {entry.source!r}, not the cvmfsd root",
            entry,
        )
    try:
        run_bounded(lambda: _ask_root(root), timeout)
    except FsTimeout as e:
        return RootStatus(RootState.UNRESPONSIVE, f"{root} does not answer: {e}", entry)
    except OSError as e:
        if e.errno in DEAD_ERRNOS:
            return RootStatus(
                RootState.CORRUPTED, f"{root}: {os.strerror(e.errno)} (daemon gone)", entry
            )
        return RootStatus(RootState.CORRUPTED, f"{root}: {e}", entry)
    return RootStatus(RootState.MOUNTED, f"{root} answers", entry)


# --------------------------------------------------------------------------------------------------
# binds


def bind_identity(table: MountTable, fd: int, path: str) -> tuple[str, str]:
    """What a bind of `path` (open as `fd`) shows in mountinfo: (device, root within that fs)."""
    entry = table.by_id(fd_mount_id(fd))
    if entry is None:
        raise OSError(errno.ENOENT, "the mount of an open directory is not in mountinfo", path)
    if path == entry.mount_point:
        return entry.identity
    if not is_under(path, entry.mount_point):
        raise OSError(errno.EXDEV, f"{path} is not below its mount {entry.mount_point}", path)
    rel = path[len(entry.mount_point) :] if entry.mount_point != "/" else path
    root = entry.root.rstrip("/") + rel
    return (entry.dev, root or "/")


READ_ONLY_ATTRS = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
READ_ONLY_OPTIONS = frozenset({"ro", "nosuid", "nodev"})


def is_own_bind(entry: MountEntry) -> bool:
    """A mount this driver makes at a target: a bind of the cvmfsd root, or of a cvmfs2 mount (a
    repository or pinned snapshot below the root). Anything else at a target is someone else's and
    is never unmounted or remounted by the plugin. (Read-only is what the plugin makes of it, not
    how it is recognised: a re-publish repairs one that lost its flags.)"""
    return is_daemon_root(entry) or entry.source == "cvmfs2"


def bind_read_only(src_fd: int, parent_fd: int, name: str, *, legacy: bool = False) -> None:
    """Recursive read-only, nosuid, nodev bind of src_fd onto parent_fd/name.

    Propagation of the result: a slave of the source (so repositories the daemon mounts later
    arrive), and, attached under the shared kubelet directory, shared with its copies there. The
    sharing is what makes unpublish work when the plugin runs in its own mount namespace: the copy
    kubelet and the container runtime see in the host namespace is a peer, so every unmount done
    here reaches it. It is never a peer of the daemon's root (an unmount here would unmount the
    repository there).

    New API: clone the source tree detached (open_tree), make every mount in the clone read-only,
    nosuid, nodev and a slave (mount_setattr, AT_RECURSIVE) *before* it is attached, then attach it
    (move_mount). The copies that propagate at attach time carry the same flags.

    Legacy (kernels < 5.12): mount(MS_BIND|MS_REC), then MS_REMOUNT|MS_BIND|MS_RDONLY|MS_NOSUID|
    MS_NODEV of the top mount, then MS_SLAVE|MS_SHARED when the bind joined the root's peer group.
    Only the top mount is remounted (the daemon's repository mounts are read-only already), and the
    remount does not reach copies that propagated at attach time.
    """
    target_fd = os.open(name, O_DIR_PATH | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        if not legacy:
            tree = open_tree(
                src_fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE
            )
            try:
                mount_setattr(
                    tree,
                    "",
                    AT_EMPTY_PATH | AT_RECURSIVE,
                    attr_set=READ_ONLY_ATTRS,
                    propagation=MS_SLAVE,
                )
                move_mount(
                    tree, "", target_fd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
                )
            finally:
                os.close(tree)
            return
        mount(fd_path(src_fd), fd_path(target_fd), None, MS_BIND | MS_REC)
    finally:
        os.close(target_fd)
    finish_read_only(parent_fd, name, legacy=True)


def finish_read_only(parent_fd: int, name: str, *, legacy: bool) -> None:
    """(Re)apply read-only, nosuid, nodev to the mount at parent_fd/name, and make it a slave of
    its source if it is still a peer of it (a crash between the steps of a legacy bind).

    The fd is opened by a fresh walk of `name`, which crosses into the mount on it, so the flags
    land on that mount (and never on the kubelet directory's own mount underneath).
    """
    top_fd = os.open(name, O_DIR_PATH | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        if fd_mount_id(top_fd) == fd_mount_id(parent_fd):
            raise OSError(errno.EINVAL, "nothing is mounted on the target", name)
        table = MountTable.read()
        top = table.by_id(fd_mount_id(top_fd))
        peer_of_source = top is not None and top.shared and not top.slave
        if legacy:
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            mount(None, fd_path(top_fd), None, flags)
            if peer_of_source:
                mount(None, fd_path(top_fd), None, MS_SLAVE | MS_REC)
                mount(None, fd_path(top_fd), None, MS_SHARED)
        else:
            mount_setattr(top_fd, "", AT_EMPTY_PATH | AT_RECURSIVE, attr_set=READ_ONLY_ATTRS)
            if peer_of_source:
                mount_setattr(top_fd, "", AT_EMPTY_PATH | AT_RECURSIVE, propagation=MS_SLAVE)
                mount_setattr(top_fd, "", AT_EMPTY_PATH, propagation=MS_SHARED)
    finally:
        os.close(top_fd)
