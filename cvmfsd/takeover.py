"""Taking over from a previous daemon that crashed, was killed, or handed over on purpose.

Its root is dead (ENOTCONN for anything not cached) but its repository mounts keep working for
the processes that use them, served by their cvmfs2 processes, which outlive the daemon. The new
daemon clones each live repository mount onto its own staged root, moves that root over the old
one in one syscall (it propagates into every pod view), then detaches the old repository mounts.
No repository is booted twice and no reader sees an error (DESIGN.md, "Restart and upgrade").
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from . import backend, kernel
from .config import Config
from .names import SNAPSHOTS_DIR, InvalidName, Pin, check, parse_snapshot
from .rootmount import ours

log = structlog.get_logger("cvmfsd.takeover")


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

    @property
    def path(self) -> str:
        return self.name if self.pin is None else f"{SNAPSHOTS_DIR}/{self.name}"


@dataclass
class Plan:
    adopt: list[Found]
    stale: list[str]  # repository mounts that are dead or not adoptable: detached
    old_layers: int   # dead roots at the root path (left as layers below ours)

    def close(self) -> None:
        for found in self.adopt:
            with contextlib.suppress(OSError):
                os.close(found.fd)


def _answers(path: str, timeout: float = 2.0) -> bool:
    """Does a listing of path succeed in time? (A stat would not reach the daemon: the root's
    attributes are cached for good.) In a throwaway thread: a stopped daemon would block it."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            os.listdir(path)
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _inspect(cfg: Config, path: str, mount_id: int) -> Found | None:
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
        if kernel.fd_mount_id(fd) != mount_id:
            raise OSError("not the mount mountinfo lists")
        via_fd = Path(f"/proc/self/fd/{fd}")
        if backend.mounted_fqrn(via_fd) != fqrn:
            raise OSError("serves another repository")
        pid = backend.serving_pid(via_fd)
        os.kill(pid, 0)
        return Found(name, fd, pid, fqrn, pin)
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
        found = _inspect(cfg, path, entry.mount_id)
        if found is None:
            stale.append(path)
        else:
            adopt.append(found)
    stale += [e.mountpoint for e in below if e.mountpoint not in top or
              os.path.dirname(e.mountpoint) not in parents]
    return Plan(adopt, sorted(set(stale)), len(at_root))


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
    its path). Processes with a cwd or open file inside keep working."""
    try:
        kernel.umount(f"/proc/self/fd/{found.fd}", kernel.MNT_DETACH, follow=True)
    except OSError as exc:
        log.warning("old_mount_detach_failed", repo=found.name, error=str(exc))
    finally:
        with contextlib.suppress(OSError):
            os.close(found.fd)
