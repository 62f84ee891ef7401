"""Helpers for the view tests against the real daemon (tests/csi/test_views.py): pods made as a
container runtime makes them (runtime_pod.py), kubelet's subPath binds, cvmfsctl, and the
cvmfs2 process behind a mount."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from csi_harness import HERE, PY, REPO_ROOT, LineChild

from csi import mounts


class RuntimePod(LineChild):
    """A process in its own mount namespace holding `mount --rbind target view && mount
    --make-rslave view`, with the host's other mounts at `hide` detached from its namespace."""

    call_timeout = 60.0
    exit_timeout = 10.0

    def __init__(self, target: Path, view: Path, hide: list[Path]) -> None:
        view.mkdir(parents=True, exist_ok=True)
        self.view = view
        super().__init__([PY, str(HERE / "runtime_pod.py"), str(target), str(view),
                          *map(str, hide)], 30)
        self.pid: int = self.hello["pid"]
        self.ns: int = self.hello["ns"]

    def read(self, path: str) -> str:
        result = self.call("read", path=path)
        assert result["ok"], result
        return str(result["data"])

    def wait_read(self, path: str, within: float = 30) -> dict[str, Any]:
        """Read by a fresh path walk until it works (bounded: a failing test, not a timing);
        the reply says how long that took and which errors came first."""
        return self.call("wait_read", timeout=within + 30, path=path, within=within)


def subpath_bind(kubelet_dir: Path, target: Path, sub: str, index: int = 0) -> Path:
    """kubelet's bind for a `subPath:` of the volume at target: it stats the path (makeMounts'
    PathExists, to create it when missing), opens it inside the volume and binds
    /proc/self/fd/N (not following symlinks) onto
    pods/<uid>/volume-subpaths/<volume>/<container>/<index>.

    The stat is what makes a repository not yet mounted be mounted first: an O_PATH open alone
    sends only a LOOKUP, which never waits (DESIGN.md §1), and would bind the name's own
    directory in the root, which has nothing in it until the mount arrives by propagation."""
    uid, volume = target.parts[-5], target.parts[-2]
    dest = kubelet_dir / "pods" / uid / "volume-subpaths" / volume / "main" / str(index)
    dest.mkdir(parents=True)
    os.stat(target / sub)
    fd = os.open(target / sub, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        mounts.mount(f"/proc/self/fd/{fd}", str(dest), None, mounts.MS_BIND)
    finally:
        os.close(fd)
    return dest


def cvmfsctl(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvmfsd.admin.ctl", "--socket",
                           str(run_dir / "cvmfsd.sock"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def serving_pid(path: Path) -> int:
    """The cvmfs2 that serves the mount at path (cvmfs2-interface.md §6)."""
    return int(os.getxattr(path, "user.pid"))


def kill_backend(path: Path, timeout: float = 30, wait: bool = True) -> int:
    """SIGKILL the cvmfs2 serving path; returns (with wait, once a new one serves it) its pid."""
    pid = serving_pid(path)
    os.kill(pid, signal.SIGKILL)
    if not wait:
        return pid
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if serving_pid(path) != pid:
                return pid
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} is not served again after killing {pid}")
        time.sleep(0.02)


def upgraded_package(tmp: Path) -> Path:
    """A copy of the package that reports a new version: what a package upgrade puts on disk
    (run the daemon with it as its working directory: `python -m` imports from there first)."""
    target = tmp / "upgrade"
    if not target.exists():
        shutil.copytree(REPO_ROOT / "cvmfsd", target / "cvmfsd",
                        ignore=shutil.ignore_patterns("__pycache__"))
        init = target / "cvmfsd" / "__init__.py"
        init.write_text(init.read_text() + '\n__version__ = "99.0.0+upgrade"\n')
    return target


def events(log: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == name:
                out.append(record)
    return out
