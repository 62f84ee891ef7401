"""The real client's lifecycle under cvmfsd: a killed serving process is healed, idle
repositories expire while busy ones stay, and SIGTERM leaves no mount and no cvmfs2."""

from __future__ import annotations

import contextlib
import json
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
    d.logged_attempts(repo, 2, result="mounted")  # cvmfs2 answers before the daemon logs the mount
    attempts = d.mount_attempts(repo)
    assert [a["result"] for a in attempts] == ["mounted", "mounted"], attempts
    assert attempts[-1]["serving_pid"] == new
    assert [e["repo"] for e in d.events("healed")] == [repo]
    # One healthy mount at the final path, no dead layer below it.
    assert [m for m in mounts_under(d.env.tmp) if repo in m] == [str(path)]


PATH_READER = """
import json, os, sys, time
repo, stop, out = sys.argv[1:4]
ops = failures = 0
errors = []
while not os.path.exists(stop):
    try:
        os.stat(os.path.join(repo, "sub", "hello.txt"))
        os.close(os.open(os.path.join(repo, "README"), os.O_RDONLY))
        os.close(os.open(os.path.join(repo, "sub"), os.O_RDONLY | os.O_DIRECTORY))
        os.getxattr(repo, "user.fqrn")
        os.access(os.path.join(repo, "bin", "hello.sh"), os.X_OK)
    except OSError as exc:
        failures += 1
        errors.append(repr(exc))
    ops += 1
    with open(out + ".ops", "w") as f:
        f.write(str(ops))
    time.sleep(0.001)
json.dump({"ops": ops, "failures": failures, "errors": errors[:10]}, open(out, "w"))
"""


def test_term_of_the_serving_process_fails_no_path_walk(start_daemon, env) -> None:  # type: ignore[no-untyped-def]
    """A TERM (an admin's kill, a node agent) makes the real cvmfs2 exit without unmounting in
    pre-mounted mode. Requests waiting in its connection, and those it had read (where the
    kernel can queue them again), are held by the daemon until the repository is mounted
    again, then walk their path again: stat, open, close, access and getxattr see no failure
    (on a direct mount they would get ENOTCONN until something remounts it). Only a read on a
    file or directory that was already open across the exit can fail: its handle belongs to the
    dead mount (docs/views.md, fact 9)."""
    d: Daemon = start_daemon(expire_timeout=0)
    repo = "alpha.real.test"
    assert (d.path(repo) / "README").exists()
    stop = env.tmp / "path-readers.stop"
    outs = [env.tmp / f"path-reader-{i}.json" for i in range(4)]
    readers = [subprocess.Popen([sys.executable, "-c", PATH_READER, str(d.path(repo)), str(stop),
                                 str(out)]) for out in outs]
    def progressed(by: int, since: list[int]) -> bool:
        now = [int(Path(f"{out}.ops").read_text() or 0) if Path(f"{out}.ops").exists() else 0
               for out in outs]
        return all(n >= s + by for n, s in zip(now, since, strict=True))

    try:
        seen = [0] * len(outs)
        for _ in range(3):
            # Each death comes once every reader is well into its loop on the current mount.
            wait_for("readers going", lambda seen=seen: progressed(20, seen), timeout=60)
            seen = [int(Path(f"{out}.ops").read_text() or 0) for out in outs]
            old = serving_pid(d.path(repo))
            os.kill(old, signal.SIGTERM)
            wait_for(f"pid {old} to exit", lambda old=old: exited(old))
            wait_for("the repository served again",
                     lambda old=old: serving_pid_or_none(d.path(repo)) not in (None, old))
        stop.touch()
        assert [r.wait(timeout=60) for r in readers] == [0] * len(readers)
    finally:
        stop.touch()
        for r in readers:
            if r.poll() is None:
                r.kill()
                r.wait()
    results = [json.loads(out.read_text()) for out in outs]
    assert all(r["ops"] > 0 for r in results), results
    assert [r["failures"] for r in results] == [0] * len(results), results
    assert [e["repo"] for e in d.events("healed")] == [repo] * 3


def serving_pid_or_none(path: Path) -> int | None:
    try:
        return serving_pid(path)
    except OSError:
        return None


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
    # The line follows the umount (a writer thread logs it): wait for it, not for mountinfo.
    d.wait_for("the unmounts logged", lambda: {e["repo"] for e in d.events("unmounted")} >= {
        idle, with_file, with_cwd})


def test_sigterm_leaves_no_mount_and_no_cvmfs2(daemon: Daemon) -> None:
    repos = ["epsilon.real.test", "zeta.real.test", "eta.real.test"]
    for repo in repos:
        assert (daemon.path(repo) / "README").exists()
    daemon.wait_mounted(*repos)  # cvmfs2 answers a moment before the mount line is logged
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
