"""Fixtures that start real processes on real FUSE mounts: the cvmfs2 stand-in's repository
server, and cvmfsd itself as a subprocess. Everything is stopped by pid and unmounted."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from attack_kit import control

from cvmfs2_standin.kit import make_repo, write_config, write_wrapper

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_FILES: dict[str, bytes | str] = {
    "README": "hello from the repository\n",
    "bin/hello": "#!/bin/sh\necho hello-from-$(basename $(dirname $(dirname $(realpath $0))))\n",
    "data/blob.bin": bytes(range(256)) * 64,
    "etc/cvmfs/default.conf": "CVMFS_STANDIN_READ_MARK=yes\n",
}


def _umount_below(path: Path) -> None:
    """Last-resort cleanup of mounts a failed test left under path (deepest first)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prefix = str(path)
    for _ in range(3):
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        mine = sorted((p for p in points if p == prefix or p.startswith(prefix + "/")),
                      key=len, reverse=True)
        if not mine:
            return
        for point in mine:
            libc.umount2(point.encode(), 2)  # MNT_DETACH


@dataclass
class Env:
    """A repository server, a cvmfs client configuration and a cvmfs2 binary for the daemon."""

    tmp: Path
    server: Path
    client_config: Path
    cvmfs2: Path
    boots_log: Path
    # Reachable by the cvmfs user: cache base, reload sockets, snapshot workspaces.
    shared: Path

    def add_repo(self, fqrn: str, files: dict[str, bytes | str] | None = None, **kw: Any) -> None:
        make_repo(self.server, fqrn, DEMO_FILES if files is None else files,
                  executable=("bin/hello",), **kw)

    def boots(self) -> list[str]:
        """Repositories cvmfs2 was launched for, one entry per launch (from the wrapper)."""
        if not self.boots_log.exists():
            return []
        return [line.split()[-2] for line in self.boots_log.read_text().splitlines() if line]

    def repo_config(self, fqrn: str, **params: str) -> None:
        """Per-repository client parameters (fault knobs), like /etc/cvmfs/config.d/<fqrn>.conf."""
        write_config(self.tmp / "etc-cvmfs" / "config.d" / f"{fqrn}.conf", **params)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    server = tmp_path / "server"
    server.mkdir()
    # What cvmfs2 uses after dropping to the cvmfs user (cache base, reload socket directory,
    # snapshot workspaces) must be reachable by that user: not below pytest's 0700 directories,
    # and owned by it as the cvmfs package prepares its own. The loader creates neither the
    # reload directory (exit 5) nor, as that user, a cache base below root's (exit 9).
    shared = Path(tempfile.mkdtemp(prefix="cvmfsd-test-"))
    shared.chmod(0o755)
    cache, reload = shared / "cache", shared / "reload"
    for d in (cache, reload):
        d.mkdir()
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("cvmfs")
            os.chown(d, user.pw_uid, user.pw_gid)
    etc = tmp_path / "etc-cvmfs"
    (etc / "config.d").mkdir(parents=True)
    client_config = tmp_path / "client.conf"
    write_config(client_config, CVMFS_SERVER_URL=f"file://{server}/@fqrn@",
                 CVMFS_HTTP_PROXY="DIRECT", CVMFS_CACHE_BASE=str(cache),
                 CVMFS_RELOAD_SOCKETS=str(reload), CVMFS_KEYS_DIR=str(etc / "keys"))
    # Config files are shell fragments evaluated with CVMFS_FQRN set: pull in per-repository
    # fault knobs the way a node's config.d would.
    with open(client_config, "a") as f:
        knobs = f'"{etc}/config.d/$CVMFS_FQRN.conf"'
        f.write(f"if [ -f {knobs} ]; then . {knobs}; fi\n")
    inner = write_wrapper(tmp_path / "standin-cvmfs2", env={"CVMFS_STANDIN_ETC": str(etc)})
    boots_log = tmp_path / "boots.log"
    counting = tmp_path / "cvmfs2"
    counting.write_text(f'#!/bin/sh\necho "$$ $*" >> {boots_log}\nexec {inner} "$@"\n')
    counting.chmod(0o755)
    e = Env(tmp_path, server, client_config, counting, boots_log, shared)
    for fqrn in ("alice.cern.ch", "atlas.cern.ch", "cms.cern.ch", "lhcb.cern.ch",
                 "sft.cern.ch", "oasis.opensciencegrid.org", "icecube.opensciencegrid.org",
                 "ligo.osgstorage.org", "cvmfs-config.cern.ch"):
        e.add_repo(fqrn)
    yield e
    # After start_daemon's teardown (it depends on env): nothing is mounted in here.
    if not mounts_under(shared):
        shutil.rmtree(shared, ignore_errors=True)


@dataclass
class Daemon:
    env: Env
    root: Path
    run_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    serving_pids: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if name is None or record.get("event") == name:
                out.append(record)
        for record in out:
            if record.get("serving_pid"):
                self.serving_pids.add(record["serving_pid"])
        return out

    def mount_attempts(self, repo: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.events("mount") if repo is None or r["repo"] == repo]

    def wait_mounted(self, *repos: str, timeout: float = 30) -> None:
        """Until the daemon logged each repository's mount: a first access succeeds as soon as
        cvmfs2 serves, a moment before the daemon has read the serving pid and logged it."""
        def missing() -> set[str]:
            return set(repos) - {r["repo"] for r in self.mount_attempts()
                                 if r["result"] == "mounted"}
        self.wait_for(f"mount lines of {sorted(repos)}", lambda: not missing(), timeout=timeout)

    def logged_attempts(self, repo: str, count: int = 1, timeout: float = 60,
                        result: str | None = None) -> list[dict[str, Any]]:
        """Every logged mount attempt of repo (with that result, if given: "mounted" counts
        remounts too), once at least `count` are there: cvmfs2 answers, and a failed attempt's
        caller is answered, a moment before the daemon's writer thread has logged the line."""
        def enough() -> list[dict[str, Any]] | None:
            attempts = [r for r in self.mount_attempts(repo)
                        if result is None or r["result"] == result]
            return attempts if len(attempts) >= count else None
        found: list[dict[str, Any]] = self.wait_for(
            f"{count} logged mount attempts of {repo}" + (f" ({result})" if result else ""),
            enough, timeout=timeout)
        return found

    def path(self, name: str) -> Path:
        return self.root / name

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """One request on the daemon's status socket; the whole reply (check reply["ok"])."""
        return control(self.run_dir / "cvmfsd.sock", cmd, timeout=120, **args)

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        """Poll check() until it returns something true; fail naming what was awaited. The
        timeout only guards against a hang: tests wait for events, not for time."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if self.proc.poll() is not None:
                raise AssertionError(f"cvmfsd exited {self.proc.returncode} while waiting for "
                                     f"{what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last log lines: "
                                     f"{self.events()[-8:]}")
            time.sleep(0.02)

    def wait_ready(self, count: int, timeout: float = 30) -> None:
        """Until the count-th "ready" line (a re-executed daemon logs one more)."""
        _wait_ready(self, timeout, count)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def _wait_ready(d: Daemon, timeout: float = 90, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise RuntimeError(f"cvmfsd exited {d.proc.returncode}:\n{d.log_path.read_text()}")
        if len(d.events("ready")) >= count:
            return
        time.sleep(0.02)
    raise RuntimeError(f"cvmfsd not ready:\n{d.log_path.read_text()}")


def toml_config(env: Env, **overrides: Any) -> str:
    values: dict[str, Any] = {
        "root": str(env.tmp / "cvmfs"), "run_dir": str(env.tmp / "run"),
        "snapshot_dir": str(env.shared / "snapshots"),
        "cvmfs2": str(env.cvmfs2), "cvmfs2_config": [str(env.client_config)],
        "log_format": "json", "mount_timeout": 20.0,
        # The limits the tests are written against, explicit: defaults may change.
        "max_concurrent_boots": 8, "max_mounted": 1000, "backoff_initial": 2.0,
        "backoff_max": 300.0, "restart_burst": 10, "restart_window": 60.0,
        "expire_timeout": 300.0, "expire_min_age": 10.0, "reconcile_interval": 10.0,
        "fuse_max_tasks": 512,
    }
    values.update(overrides)
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n"


@pytest.fixture
def start_daemon(env: Env) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*, process_env: dict[str, str] | None = None, cwd: Path = REPO_ROOT,
              **overrides: Any) -> Daemon:
        cfg_path = env.tmp / f"cvmfsd-{len(started)}.toml"
        cfg_path.write_text(toml_config(env, **overrides))
        log_path = env.tmp / f"cvmfsd-{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "cvmfsd", "run", "-c", str(cfg_path)],
                                    stdout=log, stderr=log, cwd=cwd,
                                    env={**os.environ, **(process_env or {})})
        root = Path(overrides.get("root", env.tmp / "cvmfs"))
        d = Daemon(env, root, Path(overrides.get("run_dir", env.tmp / "run")), proc, log_path)
        started.append(d)
        _wait_ready(d)
        return d

    yield start
    for d in started:
        try:
            d.stop(timeout=60)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
        d.events()
        reap(d.serving_pids)
        for pid in d.serving_pids:  # only what this daemon reported starting
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if p.create_time() > d.log_path.stat().st_ctime - 60:
                    p.kill()
    _umount_below(env.tmp)


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


def run_py(code: str, *args: str, cwd: str | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh Python process: a first access must come from a process that never
    touched the path before."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def exited(pid: int) -> bool:
    """Gone or a zombie (exited, not yet reaped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def soak_size(ci: int, full: int) -> int:
    """Long soaks run a smaller size by default; CVMFSD_SOAK_FULL=1 runs the full size."""
    return full if os.environ.get("CVMFSD_SOAK_FULL") == "1" else ci


def reap(pids: set[int] | list[int]) -> None:
    """Collect orphans that were reparented to this (subreaper) test process."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


@pytest.fixture(scope="session", autouse=True)
def _subreaper() -> None:
    """Backends orphaned by a killed daemon come to this process, not to pid 1, so the tests
    can reap them (pid 1 of a container may never do it)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def children_of(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def zombies() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == prefix or line.split()[4].startswith(prefix + "/")]


os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
