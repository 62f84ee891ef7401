"""What every system driver offers the scenarios."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from ..common import mounts_under, umount_below, wait_gone
from ..workspace import Backend, Workspace


class System:
    """A way of making /cvmfs/<repo> reachable: setup(repos), path(repo), teardown().

    Each instance has its own directory ``<workspace>/<name>[-tag]`` holding its mount directory
    (always ``.../<name-padded>/cvmfs``: the three systems' paths have the same length, so that
    path walks cost the same) and its own backend configuration.
    """

    name = "system"
    dirname = ""  # the directory label, when it is not the name (6 characters, like the others)

    def __init__(self, ws: Workspace, tag: str = "") -> None:
        self.ws = ws
        self.label = (self.dirname or self.name) + (f"-{tag}" if tag else "")
        self.backend: Backend = ws.backend(self.label)
        self.dir = self.backend.dir
        self.mount_dir = self.dir / "cvmfs"
        self.serving_pids: set[int] = set()

    # --- the interface ------------------------------------------------------------------------
    def setup(self, repos: Sequence[str] = ()) -> None:
        """Start the system. Direct mounts *repos* now; automounters mount on first access."""
        raise NotImplementedError

    def path(self, repo: str) -> Path:
        return self.mount_dir / repo

    def teardown(self) -> list[str]:
        """Stop everything, unmount everything; return mounts that had to be forced (leaks)."""
        raise NotImplementedError

    def daemon_pid(self) -> int | None:
        """The automounter's own process (None for direct)."""
        return None

    def boots(self) -> list[str]:
        return self.backend.boots()

    def info(self) -> dict[str, object]:
        return {"name": self.name}

    # --- shared helpers -----------------------------------------------------------------------
    def note_serving_pid(self, repo: str) -> int | None:
        """Remember the process serving repo (xattr user.pid, cvmfs2 interface §6)."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(os.getxattr(self.path(repo), "user.pid"))
            self.serving_pids.add(pid)
            return pid
        return None

    def mounted_repos(self) -> list[str]:
        prefix = str(self.mount_dir) + "/"
        return [p[len(prefix):] for p in mounts_under(self.mount_dir) if p.startswith(prefix)]

    def _finish(self) -> list[str]:
        """After the system stopped: force away whatever it left mounted (reported as a leak),
        and see the backends it served exit (the stand-in exits when its mount goes)."""
        leaked = umount_below(self.mount_dir)
        wait_gone(self.serving_pids, timeout=15)
        return leaked
