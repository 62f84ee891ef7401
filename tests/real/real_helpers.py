"""Helpers shared by the real-backend tests (conftest.py here cannot be imported by name:
`conftest` is tests/conftest.py for test modules)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
from realrepo import big_content

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
READER = Path(__file__).with_name("real_reader.py")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0,
              interval: float = 0.05) -> T:
    """Poll until check() returns something truthy; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def serving_pid(path: Path) -> int:
    return int(os.getxattr(path, "user.pid"))


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, f"user.{name}").decode()


def cvmfsctl(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvmfsd.admin.ctl", "--socket",
                           str(run_dir / "cvmfsd.sock"), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)


def ctl_json(run_dir: Path, *args: str) -> Any:
    out = cvmfsctl(run_dir, "--json", *args)
    return json.loads(out.stdout)


_BIG: dict[str, bytes] = {}


def big(fqrn: str) -> bytes:
    if fqrn not in _BIG:
        _BIG[fqrn] = big_content(fqrn)
    return _BIG[fqrn]


class Readers:
    """N reader processes (real_reader.py) reading and checking files of repositories under a
    root until stopped; each reports its operations and failures as JSON."""

    def __init__(self, tmp: Path, root: Path, repos: list[str], count: int,
                 cwd_repo: str | None = None) -> None:
        self.out = tmp / "readers"
        self.out.mkdir(exist_ok=True)
        self.stop_file = tmp / "readers.stop"
        self.procs = []
        for i in range(count):
            self.procs.append(subprocess.Popen(
                [sys.executable, str(READER), "path", str(root), str(self.stop_file),
                 str(self.out / f"{i}.json"), *repos]))
        if cwd_repo is not None:
            # One reader works relative to its working directory inside a repository.
            self.procs.append(subprocess.Popen(
                [sys.executable, str(READER), "cwd", str(root), str(self.stop_file),
                 str(self.out / "cwd.json"), cwd_repo]))

    def wait_running(self, min_ops: int = 1, timeout: float = 60) -> None:
        """Until every reader reported at least min_ops operations (progress files)."""
        def ready() -> bool:
            for p in self.procs:
                assert p.poll() is None, f"reader {p.pid} exited {p.returncode}"
            progress = list(self.out.glob("*.progress"))
            return len(progress) == len(self.procs) and all(
                int(f.read_text() or 0) >= min_ops for f in progress)
        wait_for("readers running", ready, timeout)

    def stop(self) -> list[dict[str, Any]]:
        self.stop_file.touch()
        codes = [p.wait(timeout=120) for p in self.procs]
        assert codes == [0] * len(codes), codes
        return [json.loads(f.read_text()) for f in sorted(self.out.glob("*.json"))]

    def kill(self) -> None:
        self.stop_file.touch()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def our_cvmfs2(tmp: Path, since: float) -> list[psutil.Process]:
    """Live cvmfs2 processes (real or stand-in) of one test, started since `since`: the serving
    process and the watchdog name the test's config file in their argv; the cache managers
    (`cvmfs2 __cachemgr__ . ...`) run in the test's cache directory."""
    mine = []
    prefix = f"{tmp}/"
    for p in psutil.process_iter(["name", "cmdline", "create_time", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.info["create_time"] < since:
                continue
            cmd = p.info["cmdline"] or []
            if not cmd or not (os.path.basename(cmd[0]) == "cvmfs2"
                               or any(c.endswith("/cvmfs2_standin/cvmfs2.py") for c in cmd)):
                continue
            if any(prefix in c for c in cmd) or (p.cwd() + "/").startswith(prefix):
                mine.append(p)
    return mine


def wait_gone(tmp: Path, since: float, timeout: float) -> list[psutil.Process]:
    """Until no cvmfs2 of this test is alive; the exited ones are reaped (this process is a
    child subreaper, tests/conftest.py: the real client's watchdogs and cache managers come
    back to it)."""
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while True:
        left = our_cvmfs2(tmp, since)
        seen |= {p.pid for p in left}
        _reap(seen)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} uid {p.uids().real}: {' '.join(p.cmdline())}")
    return out


def _reap(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
