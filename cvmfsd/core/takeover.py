"""Taking over from a previous daemon that crashed, was killed, or handed over on purpose.

Its root is dead (ENOTCONN for anything not cached) but its repository mounts keep working for
the processes that use them, served by their cvmfs2 processes, which outlive the daemon. The new
daemon clones each live repository mount onto its own staged root and moves that root over the
old one in one syscall (it propagates into every pod view). Where the kernel can mount beneath,
the new root then takes the old one's place and the old root leaves with the old repository
mounts (rootmount.replace); elsewhere the old root stays as a dead layer below and the old
repository mounts are detached one by one (detach_old). No repository is booted twice and no
reader sees an error (DESIGN.md, "Restart and upgrade").
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from ..config import Config
from . import backend, kernel
from .names import SNAPSHOTS_DIR, InvalidName, Pin, check, parse_snapshot
from .rootmount import ours

log = structlog.get_logger("cvmfsd.takeover")


# Seconds an old repository mount may take to say what it serves before it counts as dead.
INSPECT_TIMEOUT = 2.0
T = TypeVar("T")


class TakeoverRefused(RuntimeError):
    pass


@dataclass
class Found:
    """A repository mount of the previous daemon, held by an O_PATH fd."""

    name: str
    fd: int
    pid: int
    fqrn: str
    pin: Pin | None = None
    dev: tuple[int, int] = (0, 0)
    pin_config: Path | None = None  # a pinned instance's, to remove its workspace in the end

    @property
    def path(self) -> str:
        return self.name if self.pin is None else f"{SNAPSHOTS_DIR}/{self.name}"


@dataclass
class Plan:
    adopt: list[Found]
    stale: list[str]  # repository mounts that are dead or not adoptable: detached
    old_layers: int   # dead roots at the root path
    # O_PATH fd of the top old root (checked against mountinfo), for rootmount.replace; None
    # when it could not be opened.
    root_fd: int | None = None
    # Devices of the previous daemon's repository mounts that are dead: copies of them left in
    # pod views are stale views (usage.py), by device, with the path they had under the root.
    stale_devs: dict[tuple[int, int], str] | None = None

    def close_root(self) -> None:
        if self.root_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.root_fd)
            self.root_fd = None

    def close(self) -> None:
        """Idempotent: a descriptor closed twice could be someone else's by then."""
        self.close_root()
        for found in self.adopt:
            _close_found(found)


def _close_found(found: Found) -> None:
    if found.fd >= 0:
        with contextlib.suppress(OSError):
            os.close(found.fd)
        found.fd = -1


def _in_time(fn: Callable[[], T], timeout: float) -> T:
    """fn() in a throwaway thread, for calls on mounts whose server may be stopped or gone
    without its connection ending (a cvmfs2 cache manager keeps a premounted descriptor): the
    start of the daemon must not wait on them. TimeoutError when no answer in time; the thread
    stays blocked until the connection ends."""
    result: list[T] = []
    error: list[BaseException] = []

    def attempt() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    if error:
        raise error[0]
    if not result:
        raise TimeoutError(f"no answer within {timeout:g} s")
    return result[0]


def _answers(path: str, timeout: float = 2.0) -> bool:
    """Does a listing of path succeed in time? (A stat would not reach the daemon: the root's
    attributes are cached for good.)"""
    try:
        _in_time(lambda: os.listdir(path), timeout)
    except OSError:
        return False
    return True


def _inspect(cfg: Config, path: str, entry: kernel.MountEntry) -> Found | None:
    """Open a repository mount through the dead root's cached dentries and check that it is a
    live cvmfs2 mount of the repository its name says."""
    name = os.path.basename(path)
    pin = None
    try:
        if os.path.dirname(path) == str(cfg.root / SNAPSHOTS_DIR):
            fqrn, pin = parse_snapshot(name, cfg.policy)
        else:
            check(name, cfg.policy)
            fqrn = name
    except InvalidName:
        return None
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if kernel.fd_mount_id(fd) != entry.mount_id:
            raise OSError("not the mount mountinfo lists")
        via_fd = Path(f"/proc/self/fd/{fd}")
        if _in_time(lambda: backend.mounted_fqrn(via_fd), INSPECT_TIMEOUT) != fqrn:
            raise OSError("serves another repository")
        pid = _in_time(lambda: backend.serving_pid(via_fd), INSPECT_TIMEOUT)
        os.kill(pid, 0)
        pin_config = None
        if pin is not None:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            pin_config = backend.pin_config_of(cfg, argv.split("\0"))
        return Found(name, fd, pid, fqrn, pin, entry.dev, pin_config)
    except (OSError, ValueError):
        os.close(fd)
        return None


def plan(cfg: Config) -> Plan | None:
    """What is at the root path now. None: nothing, a fresh start. Blocking (a worker thread)."""
    root = str(cfg.root)
    entries = kernel.read_mountinfo()
    at_root = kernel.mounts_at(root, entries)
    below = kernel.mounts_below(root, entries)
    if not at_root and not below:
        return None
    foreign = [e for e in at_root if not ours(e)]
    foreign += [e for e in below if e.source != "cvmfs2"]
    if foreign:
        raise TakeoverRefused(f"{root} holds mounts that are not cvmfsd's: " + ", ".join(
            f"{e.mountpoint} ({e.fstype} {e.source})" for e in foreign))
    if at_root and _answers(root):
        raise TakeoverRefused(f"{root} is served by a running cvmfsd already")
    # The visible repository mount for each name is the last one listed at that path.
    top: dict[str, kernel.MountEntry] = {}
    parents = {root, str(cfg.root / SNAPSHOTS_DIR)}
    for entry in below:
        if os.path.dirname(entry.mountpoint) in parents:
            top[entry.mountpoint] = entry
    adopt, stale = [], []
    for path, entry in top.items():
        found = _inspect(cfg, path, entry)
        if found is None:
            stale.append(path)
        else:
            adopt.append(found)
    stale += [e.mountpoint for e in below if e.mountpoint not in top or
              os.path.dirname(e.mountpoint) not in parents]
    live = {found.dev for found in adopt}
    stale_devs = {e.dev: os.path.relpath(e.mountpoint, root) for e in below
                  if e.source == "cvmfs2" and e.dev not in live}
    return Plan(adopt, sorted(set(stale)), len(at_root), _open_root(root, at_root), stale_devs)


def _open_root(root: str, at_root: list[kernel.MountEntry]) -> int | None:
    """The top old root by an O_PATH fd: the walk ends on its root dentry, which asks the dead
    daemon nothing. None unless it is the mount mountinfo lists on top."""
    if not at_root:
        return None
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if kernel.fd_mount_id(fd) == at_root[-1].mount_id:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def detach_stale(plan: Plan) -> None:
    for path in sorted(plan.stale, key=len, reverse=True):
        try:
            kernel.umount(path, kernel.MNT_DETACH)
            log.warning("stale_mount_detached", mountpoint=path)
        except OSError as exc:
            log.warning("stale_mount_unreachable", mountpoint=path, error=str(exc))


def clone_onto(found: Found, target: Path) -> None:
    """Attach a clone of an old repository mount at target (a name under the staged root)."""
    clone = kernel.open_tree_clone(found.fd)
    try:
        kernel.attach_detached(clone, target)
    finally:
        os.close(clone)


def detach_old(found: Found) -> None:
    """Detach the old repository mount (only that one: the fd points at it, not at the top of
    its path). Processes with a cwd or open file inside keep working. Only where the old root
    stays (no rootmount.replace): there, the old mounts serve the host until the old root goes,
    and go with it."""
    if found.fd < 0:
        return
    try:
        kernel.umount(f"/proc/self/fd/{found.fd}", kernel.MNT_DETACH, follow=True)
    except OSError as exc:
        log.warning("old_mount_detach_failed", repo=found.name, error=str(exc))
    finally:
        _close_found(found)


def release(found: Found) -> None:
    """Let go of an old repository mount without detaching it (it left with the old root)."""
    _close_found(found)
