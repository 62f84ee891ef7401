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
MS_NOEXEC = 0x8
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


def move(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """MS_MOVE: source's parent mount must not be shared."""
    mount(source, target, None, MS_MOVE)


def set_propagation(target: str | os.PathLike[str], flag: int, recursive: bool = False) -> None:
    mount(None, target, None, flag | (MS_REC if recursive else 0))


def malloc_trim() -> None:
    """Give the C heap's free pages back to the system (glibc; elsewhere nothing happens).
    Start-up leaves about 1 MiB of them (docs/perf.md). Does not block on any filesystem."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


M_ARENA_MAX = -8  # mallopt(3)


def limit_malloc_arenas(arenas: int) -> None:
    """At most that many C heaps for all threads (glibc; elsewhere nothing happens). glibc gives
    threads heaps of their own, up to 8 per core, and the short-lived worker threads of each
    mount and expiry spread the daemon's C allocations over all of them: RSS grew by 4-11 MiB
    over 240 mount/expire cycles, levelling off only after about 700; with one heap, 1.7 MiB
    (tests/test_lifecycle.py's soak, side by side). The daemon's threads mostly wait on
    syscalls: they do not contend for the heap's lock. Call before threads start."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        mallopt(M_ARENA_MAX, arenas)


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
    dev: tuple[int, int] = (0, 0)  # the superblock's (major, minor): one per FUSE connection


def unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _dev(field: str) -> tuple[int, int]:
    major, _, minor = field.partition(":")
    try:
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split(" ")
        rfields = right.split(" ")
        if len(fields) < 6 or len(rfields) < 3:
            continue
        entries.append(MountEntry(
            mount_id=int(fields[0]), parent_id=int(fields[1]),
            mountpoint=unescape_mountinfo(fields[4]), fstype=rfields[0],
            source=unescape_mountinfo(rfields[1]), options=fields[5],
            optional=tuple(fields[6:]), dev=_dev(fields[2]),
        ))
    return entries


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    # Mount points are bytes: keep any that are not UTF-8 round-trippable.
    return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text(errors="surrogateescape"))


def mounts_at(path: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts stacked exactly at path, bottom first."""
    entries = read_mountinfo() if entries is None else entries
    return [e for e in entries if e.mountpoint == path]


def mounts_below(path: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Mounts strictly below path, in mountinfo order (parents before children)."""
    entries = read_mountinfo() if entries is None else entries
    prefix = path.rstrip("/") + "/"
    return [e for e in entries if e.mountpoint.startswith(prefix)]


# --- new mount API (open_tree/move_mount: Linux 5.2, mount_setattr: 5.12). These syscalls have
# the same number on every architecture (added after the syscall tables were unified). ----------
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOVE_MOUNT_BENEATH = 0x200  # Linux 6.5
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check_rc(rc: int, what: str, path: str | os.PathLike[str] | None) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", None if path is None else str(path))
    return rc


def open_tree(dirfd: int, path: str, flags: int) -> int:
    rc = _libc.syscall(ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(dirfd), _b(path),
                       ctypes.c_uint(flags))
    return _check_rc(rc, "open_tree", path)


def move_mount(from_fd: int, from_path: str, to_fd: int, to_path: str | os.PathLike[str],
               flags: int) -> None:
    rc = _libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(from_fd), _b(from_path),
                       ctypes.c_int(to_fd), _b(to_path), ctypes.c_uint(flags))
    _check_rc(rc, "move_mount", to_path)


def mount_setattr(dirfd: int, path: str, flags: int, attr_set: int = 0, attr_clr: int = 0,
                  propagation: int = 0) -> None:
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    rc = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(dirfd), _b(path),
                       ctypes.c_uint(flags), ctypes.byref(attr),
                       ctypes.c_size_t(ctypes.sizeof(attr)))
    _check_rc(rc, "mount_setattr", path)


def has_move_mount_beneath() -> bool:
    """Whether move_mount(2) knows MOVE_MOUNT_BENEATH. The probe cannot mount anything: with
    both descriptors -1 a kernel that knows the flag fails on the descriptor (EBADF), one that
    does not fails on the flag (EINVAL), and one without move_mount with ENOSYS."""
    try:
        move_mount(-1, "", -1, "", MOVE_MOUNT_BENEATH | MOVE_MOUNT_F_EMPTY_PATH
                   | MOVE_MOUNT_T_EMPTY_PATH)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def open_tree_clone(fd: int) -> int:
    """A detached clone of the mount that fd (O_PATH, at a mount root) points at."""
    return open_tree(fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH)


def attach_detached(fd: int, target: str | os.PathLike[str]) -> None:
    """Attach a detached mount (from open_tree_clone) at target."""
    move_mount(fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)


def fd_mount_id(fd: int) -> int:
    """The mount id (as in mountinfo) of the mount an open fd belongs to."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    raise OSError(errno.EINVAL, "no mnt_id in fdinfo", f"/proc/self/fdinfo/{fd}")


# --- statx without a round trip to the filesystem --------------------------------------------
SYS_STATX = 332 if os.uname().machine == "x86_64" else 291  # aarch64 and the generic table
AT_SYMLINK_NOFOLLOW = 0x100
AT_STATX_DONT_SYNC = 0x4000


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("mode", ctypes.c_uint16),
                ("_pad1", ctypes.c_uint16), ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("_times", ctypes.c_uint8 * 64), ("rdev_major", ctypes.c_uint32),
                ("rdev_minor", ctypes.c_uint32), ("dev_major", ctypes.c_uint32),
                ("dev_minor", ctypes.c_uint32), ("_spare", ctypes.c_uint8 * 144)]


def mount_dev(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(major, minor) of the filesystem mounted at path, from what the kernel has cached: no
    request reaches a FUSE server, so this answers even for a mount nobody serves yet."""
    buf = _Statx()
    rc = _libc.syscall(ctypes.c_long(SYS_STATX), ctypes.c_int(AT_FDCWD), _b(path),
                       ctypes.c_int(AT_SYMLINK_NOFOLLOW | AT_STATX_DONT_SYNC),
                       ctypes.c_uint(0), ctypes.byref(buf))
    _check_rc(rc, "statx", path)
    return buf.dev_major, buf.dev_minor
