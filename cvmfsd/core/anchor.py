"""Copies of a repository mount outside the root's tree receive its replacement.

A per-repository or pinned-snapshot volume (and a kubelet subPath of a repository's root) is a
bind of the repository mount itself, so it belongs to that mount's peer group, not to the root's:
when the mount leaves <root>/<path> (its backend died, a forced unmount) and a new one is
attached there, the root's views get the new one but those copies never would, and the last
member of the group leaving would orphan them for good (docs/views.md, facts 1-3, procedure c).

So before the old mount leaves, the daemon keeps a clone of it — a peer, in its group — at a
private directory of its own (the anchor). Once the new mount is attached at the path, a clone
of the new one is mounted on the anchor: that propagates to every member and slave of the old
group, i.e. every such copy in every namespace, on top of its dead mount. Then the anchor is made
private (so its removal propagates nothing) and dropped. The copies gain one dead layer per
replacement, underneath, which only the pod's own end removes (fact 7).

Needs open_tree/move_mount (5.2) and mount_setattr (5.12): on older kernels there is no anchor
and such copies stay dead after a replacement. Blocking: worker threads only.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from . import kernel

log = structlog.get_logger("cvmfsd.anchor")


@dataclass
class Anchor:
    fd: int        # the clone of the old mount, attached at `at`
    at: Path


def make(mountpoint: Path, root: Path, at: Path) -> Anchor | None:
    """Anchor the mount at mountpoint (a repository mount below root) at the directory `at`.
    None when nothing but the root is there, or the kernel cannot."""
    try:
        top = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if kernel.fd_mount_id(top) == kernel.fd_mount_id(root_fd):
                return None  # nothing mounted there
        finally:
            os.close(root_fd)
        at.mkdir(mode=0o700, exist_ok=True)
        clone = kernel.open_tree_clone(top)
        try:
            kernel.attach_detached(clone, at)
        except OSError:
            os.close(clone)
            raise
        return Anchor(clone, at)
    except OSError as exc:
        log.warning("anchor_unavailable", mountpoint=str(mountpoint), error=str(exc))
        return None
    finally:
        os.close(top)


def pass_on(anchor: Anchor, mountpoint: Path) -> None:
    """Give every copy of the anchored mount the mount now at mountpoint, then drop the anchor."""
    try:
        clone = kernel.open_tree(kernel.AT_FDCWD, str(mountpoint),
                                 kernel.OPEN_TREE_CLONE | kernel.OPEN_TREE_CLOEXEC)
        try:
            kernel.attach_detached(clone, anchor.at)
        finally:
            os.close(clone)
    except OSError as exc:
        log.warning("anchor_pass_failed", mountpoint=str(mountpoint), error=str(exc))
    drop(anchor)


def drop(anchor: Anchor) -> None:
    """Private first: the removal must not propagate to the copies (they would lose the mount
    just passed on to them)."""
    try:
        kernel.mount_setattr(anchor.fd, "", kernel.AT_EMPTY_PATH,
                             propagation=kernel.MS_PRIVATE)
    except OSError as exc:
        # Never detach a mount whose removal would propagate: leave it to the staging area's
        # own removal at the daemon's stop, which is private.
        log.warning("anchor_drop_failed", at=str(anchor.at), error=str(exc))
        os.close(anchor.fd)
        return
    os.close(anchor.fd)
    while kernel.mounts_at(str(anchor.at)):
        try:
            kernel.umount(anchor.at, kernel.MNT_DETACH)
        except OSError:
            break
    with contextlib.suppress(OSError):
        anchor.at.rmdir()


__all__ = ["Anchor", "drop", "make", "pass_on"]
