"""Baseline: the repository mounted by hand with the backend's own command line, no automounter.

Its launch time (until the launcher exits, i.e. the kernel mount exists) is the backend's own
boot time that the cold-access scenario subtracts.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Sequence

from ..common import umount
from ..workspace import Workspace
from .base import System

# The environment cvmfsd gives cvmfs2 (cvmfsd/core/children.py): booting by hand with the same
# environment and the same command line keeps the two boots comparable.
BOOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


class Direct(System):
    name = "direct"

    def __init__(self, ws: Workspace, tag: str = "") -> None:
        super().__init__(ws, tag)
        self.mounted: list[str] = []
        self.boot_ns: dict[str, int] = {}
        self.started_ns: dict[str, int] = {}  # perf_counter_ns when each boot was started

    @classmethod
    def control(cls) -> type[Direct]:
        """A second direct system: the A/A control of the warm scenarios. Two mounts of the
        same repository, by the same means, differ by this much; no automounter does better."""
        return type("DirectControl", (cls,), {"name": "direct2", "dirname": "direc2"})

    def setup(self, repos: Sequence[str] = ()) -> None:
        self.mount_dir.mkdir(parents=True, exist_ok=True)
        for repo in repos:
            self.mount(repo)

    def argv(self, repo: str) -> list[str]:
        return [str(self.backend.cvmfs2), "-o", self.backend.options(), repo, str(self.path(repo))]

    def mount(self, repo: str) -> int:
        """Boot repo at its mount point; return the launch time in ns."""
        mp = self.path(repo)
        mp.mkdir(exist_ok=True)
        t0 = self.started_ns[repo] = time.perf_counter_ns()
        done = subprocess.run(self.argv(repo), capture_output=True, text=True, cwd="/",
                              env=BOOT_ENV, timeout=120)
        took = time.perf_counter_ns() - t0
        if done.returncode != 0:
            raise RuntimeError(f"cvmfs2 {repo} exited {done.returncode}: {done.stderr.strip()}")
        self.mounted.append(repo)
        self.boot_ns[repo] = took
        self.note_serving_pid(repo)
        return took

    def boot_argv(self, repo: str) -> list[str]:
        """The command line of a boot that someone else runs (the cold scenario's worker boots
        and stats at once); the mount is this system's to undo at teardown."""
        self.path(repo).mkdir(exist_ok=True)
        self.mounted.append(repo)
        return self.argv(repo)

    def launch(self, repo: str) -> subprocess.Popen[bytes]:
        """Start a boot without waiting (the storm baseline launches many at once)."""
        self.path(repo).mkdir(exist_ok=True)
        self.mounted.append(repo)
        return subprocess.Popen(self.argv(repo), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, cwd="/", env=BOOT_ENV)

    def unmount(self, repo: str) -> None:
        with contextlib.suppress(OSError):
            umount(self.path(repo))
        with contextlib.suppress(ValueError):
            self.mounted.remove(repo)

    def teardown(self) -> list[str]:
        for repo in list(self.mounted):
            self.note_serving_pid(repo)
            self.unmount(repo)
        return self._finish()

    def info(self) -> dict[str, object]:
        return {"name": self.name, "how": "cvmfs2 -o " + self.backend.options().replace(
            str(self.backend.client_config), "<client.conf>") + " <fqrn> <mountpoint>",
            "backend": str(self.ws.real.cvmfs2) if self.ws.real else "stand-in"}
