"""Thin wrappers over the mount-related syscalls that the os module does not expose.

Every function here may block on the filesystem: call them from a worker thread, never from the
trio thread that serves FUSE (DESIGN.md §10).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

PR_SET_CHILD_SUBREAPER = 36


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _check(result: int, what: str, path: str | os.PathLike[str] | None) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", None if path is None else str(path))


def mount(source: str | os.PathLike[str] | None, target: str | os.PathLike[str],
          fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target)


def umount(target: str | os.PathLike[str], flags: int = 0, follow: bool = False) -> None:
    """follow=True only for /proc/self/fd/N paths, which are symlinks to follow."""
    flags |= 0 if follow else UMOUNT_NOFOLLOW
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def move_mount(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    mount(source, target, None, MS_MOVE)


def set_propagation(target: str | os.PathLike[str], flag: int, recursive: bool = False) -> None:
    mount(None, target, None, flag | (MS_REC if recursive else 0))


def set_child_subreaper() -> None:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)", None)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    mountpoint: str
    fstype: str
    source: str
    options: str
    optional: tuple[str, ...]

    @property
    def shared(self) -> bool:
        return any(tag.startswith("shared:") for tag in self.optional)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split(" ")
        rfields = right.split(" ")
        if len(fields) < 6 or len(rfields) < 3:
            continue
        entries.append(MountEntry(
            mount_id=int(fields[0]), parent_id=int(fields[1]), mountpoint=_unescape(fields[4]),
            fstype=rfields[0], source=_unescape(rfields[1]), options=fields[5],
            optional=tuple(fields[6:]),
        ))
    return entries


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())


def mounts_at(path: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts stacked exactly at path, bottom first."""
    entries = read_mountinfo() if entries is None else entries
    return [e for e in entries if e.mountpoint == path]


def mounts_below(path: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts strictly below path, in mountinfo order (parents before children)."""
    entries = read_mountinfo() if entries is None else entries
    prefix = path.rstrip("/") + "/"
    return [e for e in entries if e.mountpoint.startswith(prefix)]


def is_enotconn(err: OSError) -> bool:
    return err.errno == errno.ENOTCONN


# --- new mount API (Linux 5.2+; these syscall numbers are the same on every architecture) -----
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
_libc.syscall.restype = ctypes.c_long


def open_tree_clone(fd: int) -> int:
    """A detached clone of the mount that fd (O_PATH, at a mount root) points at."""
    result = _libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(fd), b"",
                           ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree: {os.strerror(err)}")
    return int(result)


def move_mount_fd(fd: int, target: str | os.PathLike[str]) -> None:
    """Attach the detached mount fd at target."""
    result = _libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(AT_FDCWD),
                           os.fsencode(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_mount: {os.strerror(err)}", str(target))


def mount_id_of_fd(fd: int) -> int:
    """The mnt_id of the mount an open fd lives on (/proc/self/fdinfo)."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    raise OSError(f"no mnt_id for fd {fd}")
