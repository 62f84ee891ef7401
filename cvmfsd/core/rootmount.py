"""The root's FUSE mount: made by the daemon itself at a private staging path and then moved
onto the root path, so that repositories taken over from a previous daemon can be attached to
it before it becomes visible (DESIGN.md, "Restart and upgrade").

Over a previous daemon's dead root, on kernels with MOVE_MOUNT_BENEATH, the new root also takes
the old one's place instead of piling up on it (replace(); docs/views.md, C1).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..config import Config
from . import kernel

log = structlog.get_logger("cvmfsd.rootmount")

FSTYPE = "fuse.cvmfsd"
SOURCE = "cvmfsd"


def staged_root(cfg: Config) -> Path:
    # Repository names cannot start with a dot, so this never clashes with a staging mount.
    return cfg.staging_dir / ".root"


def mount_staged(cfg: Config) -> int:
    """Open /dev/fuse and mount it at the staged root. Returns the fd to serve with
    pyfuse3.init(ops, f"/dev/fd/{fd}") (libfuse's own mount would stat the root path, which
    may be a dead previous root)."""
    target = staged_root(cfg)
    target.mkdir(mode=0o755, exist_ok=True)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        kernel.mount(SOURCE, target, FSTYPE,
                     kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_RDONLY,
                     f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,"
                     "default_permissions")
    except OSError:
        os.close(fd)
        raise
    return fd


def park_dir(cfg: Config) -> Path:
    return cfg.staging_dir / ".park"


def publish(cfg: Config) -> None:
    """Move the staged root (with whatever is attached below it) onto the root path, in one
    syscall, stacked on a previous dead root if there is one; then make it shared so that pod
    views (slave binds) receive every later attach. Blocking."""
    kernel.move(staged_root(cfg), cfg.root)
    kernel.set_propagation(cfg.root, kernel.MS_SHARED)
    with contextlib.suppress(OSError):
        staged_root(cfg).rmdir()


@dataclass(frozen=True)
class Replaced:
    """How replace() went: `beneath` False means it stopped with the new root stacked on the
    old one (publish()'s result), and `error` says why."""

    beneath: bool
    swap_ms: float       # the mount syscalls after the stack, the host's only window
    error: str | None = None


def replace(cfg: Config, old_root_fd: int) -> Replaced:
    """Publish the staged root in place of the previous daemon's dead root, whose top layer
    old_root_fd (O_PATH) holds, without a window in which the root path shows nothing
    (docs/views.md, C1; needs MOVE_MOUNT_BENEATH). Blocking.

    1. the new root is stacked on the old one, exactly like publish(): the stack propagates
       into every view of the old root, whose copies are slaves of the old root's group;
    2. the old root is made private through its fd, so that nothing below detaches anywhere
       but here, and so that the new root, now its child, may be moved off it;
    3. the new root is parked in the private staging directory. The host sees the old root
       again meanwhile, and its repository mounts, which are alive, serve the host: they are
       the reason the old repository mounts must not be detached before this;
    4. the new root is moved beneath the old one at the root path;
    5. the top, the old root with the old repository mounts on it, is detached (host only).
    The views keep their copy of the old root as one dead layer under their copy of the new
    one (a view's own root can only be covered, never replaced: views.md fact 7).

    Any failure before step 4 leaves (or puts back) the new root stacked on the old one.
    """
    staged, park = staged_root(cfg), park_dir(cfg)
    park.mkdir(mode=0o755, exist_ok=True)
    kernel.move(staged, cfg.root)
    kernel.set_propagation(cfg.root, kernel.MS_SHARED)
    started = time.perf_counter()

    def took() -> float:
        return round((time.perf_counter() - started) * 1000, 2)

    try:
        kernel.mount_setattr(old_root_fd, "", kernel.AT_EMPTY_PATH,
                             propagation=kernel.MS_PRIVATE)
        kernel.move(cfg.root, park)
    except OSError as exc:
        # Still stacked: a dead layer stays, nothing else is lost.
        return Replaced(False, took(), f"{exc.strerror or exc}")
    try:
        kernel.move_mount(kernel.AT_FDCWD, str(park), kernel.AT_FDCWD, cfg.root,
                          kernel.MOVE_MOUNT_BENEATH)
    except OSError as exc:
        kernel.move(park, cfg.root)  # back on top of the old root: stacked, as publish()
        return Replaced(False, took(), f"{exc.strerror or exc}")
    kernel.umount(cfg.root, kernel.MNT_DETACH)
    swap = took()
    for directory in (staged, park):
        with contextlib.suppress(OSError):
            directory.rmdir()
    return Replaced(True, swap)


def ours(entry: kernel.MountEntry) -> bool:
    return entry.fstype == FSTYPE and entry.source == SOURCE


def unmount_all_layers(cfg: Config) -> int:
    """Final shutdown: detach our root and any dead roots of previous daemons stacked below it.
    Blocking. Returns how many layers were removed."""
    removed = 0
    while True:
        layers = kernel.mounts_at(str(cfg.root))
        if not layers or not ours(layers[-1]):
            return removed
        try:
            kernel.umount(cfg.root, kernel.MNT_DETACH)
        except OSError as exc:
            log.error("root_unmount_failed", error=str(exc))
            return removed
        removed += 1
