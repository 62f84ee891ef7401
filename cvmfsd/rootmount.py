"""The root's FUSE mount: made by the daemon itself at a private staging path and then moved
onto the root path, so that repositories taken over from a previous daemon can be attached to
it before it becomes visible (DESIGN.md, "Restart and upgrade")."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog

from . import kernel
from .config import Config

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


def publish(cfg: Config) -> None:
    """Move the staged root (with whatever is attached below it) onto the root path, in one
    syscall, stacked on a previous dead root if there is one; then make it shared so that pod
    views (slave binds) receive every later attach."""
    kernel.move(staged_root(cfg), cfg.root)
    kernel.set_propagation(cfg.root, kernel.MS_SHARED)
    with contextlib.suppress(OSError):
        staged_root(cfg).rmdir()


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
