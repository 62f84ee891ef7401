"""The real client's lifecycle under cvmfsd: a killed serving process is healed, idle
repositories expire while busy ones stay, and SIGTERM leaves no mount and no cvmfs2."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import Daemon, exited, mounts_under
from real_helpers import big, serving_pid, wait_for
from realrepo import revision_files

pytestmark = pytest.mark.real


def readable(path: Path, expected: bytes) -> bool:
    try:
        return path.read_bytes() == expected
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_killed_serving_process_is_healed(start_daemon, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = start_daemon(expire_timeout=0)
    repo = "alpha.real.test"
    path = d.path(repo)
    readme = revision_files(repo, "v2")["README"].encode()
    assert (path / "big.bin").read_bytes() == big(repo)
    old = serving_pid(path)
    os.kill(old, sig)
    wait_for(f"pid {old} to exit", lambda: exited(old))
    # The next access mounts the repository again: nobody is left with ENOTCONN.
    wait_for("a fresh read to work", lambda: readable(path / "README", readme))
    new = serving_pid(path)
    assert new != old and psutil.pid_exists(new)
    assert (path / "big.bin").read_bytes() == big(repo)
    attempts = d.mount_attempts(repo)
    assert [a["result"] for a in attempts] == ["mounted", "mounted"], attempts
    assert attempts[-1]["serving_pid"] == new
    assert [e["repo"] for e in d.events("healed")] == [repo]
    # One healthy mount at the final path, no dead layer below it.
    assert [m for m in mounts_under(d.env.tmp) if repo in m] == [str(path)]


def test_idle_repository_expires_busy_one_stays(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = start_daemon(expire_timeout=1.0, expire_min_age=0.5, reconcile_interval=0.5)
    idle, with_file, with_cwd = "beta.real.test", "gamma.real.test", "delta.real.test"
    for repo in (idle, with_file, with_cwd):
        assert (d.path(repo) / "README").exists()
    first_idle_pid = serving_pid(d.path(idle))
    held = open(d.path(with_file) / "big.bin", "rb")  # noqa: SIM115
    cwd = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                           cwd=d.path(with_cwd) / "sub")
    try:
        def expired() -> bool:
            return str(d.path(idle)) not in mounts_under(d.root)
        wait_for("the idle repository to expire", expired)
        # Its cvmfs2 went with the mount (a plain umount ends the real client).
        wait_for(f"the expired repository's cvmfs2 ({first_idle_pid}) to exit",
                 lambda: exited(first_idle_pid))
        # The expired one comes back on the next access, then expires again: by then the busy
        # ones, idle for longer, were tried more than once.
        assert (d.path(idle) / "README").read_text() == revision_files(idle, "v2")["README"]
        wait_for("the idle repository to expire again", expired)
        mounted = mounts_under(d.root)
        for busy in (with_file, with_cwd):
            assert str(d.path(busy)) in mounted, busy
        assert held.read(4096) == big(with_file)[:4096]
        assert [a["repo"] for a in d.mount_attempts()].count(idle) == 2
    finally:
        held.close()
        cwd.kill()
        cwd.wait()
    wait_for("the released repositories to expire",
             lambda: not {str(d.path(with_file)), str(d.path(with_cwd))} & set(
                 mounts_under(d.root)))
    assert {e["repo"] for e in d.events("unmounted")} >= {idle, with_file, with_cwd}


def test_sigterm_leaves_no_mount_and_no_cvmfs2(daemon: Daemon) -> None:
    repos = ["epsilon.real.test", "zeta.real.test", "eta.real.test"]
    for repo in repos:
        assert (daemon.path(repo) / "README").exists()
    serving = {serving_pid(daemon.path(r)) for r in repos}
    assert serving == {a["serving_pid"] for a in daemon.mount_attempts()}
    # Every cvmfs2 of this daemon: serving processes, watchdogs, cache managers.
    ours = {p.pid for p in psutil.Process(daemon.pid).children(recursive=True)
            if p.name() == "cvmfs2"} | serving
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                            cwd=daemon.path(repos[0]) / "sub")
    try:
        assert daemon.stop(signal.SIGTERM) == 0
        assert mounts_under(daemon.env.tmp) == []
        for pid in ours:
            wait_for(f"cvmfs2 {pid} to exit", lambda pid=pid: exited(pid))
        # The busy one was detached lazily, and only that one.
        assert [e["repo"] for e in daemon.events("umount_lazy")] == [repos[0]]
    finally:
        busy.kill()
        busy.wait()
    assert not os.path.ismount(daemon.root)
    with contextlib.suppress(FileNotFoundError):
        assert os.listdir(daemon.root) == []
