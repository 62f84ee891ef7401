"""Every restart path with the real client and readers running: graceful hand-over (SIGTERM
with stop_mode handover, then a new daemon), SIGKILL then a new daemon, and re-exec in place
(SIGUSR2). No read fails, and every repository keeps its one cvmfs2 throughout."""

from __future__ import annotations

import signal

import pytest
from conftest import REPO_ROOT, Daemon, exited, mounts_under
from real_helpers import Readers, serving_pid, wait_for
from realrepo import revision_files

pytestmark = pytest.mark.real
REPOS = ["alpha.real.test", "beta.real.test", "gamma.real.test"]
ROUNDS = 2


def test_every_restart_path_without_a_failed_read(start_daemon, env) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = start_daemon(stop_mode="handover", expire_timeout=0)
    for repo in REPOS:
        assert (d.path(repo) / "README").read_text() == revision_files(repo, "v2")["README"]
    serving = {repo: serving_pid(d.path(repo)) for repo in REPOS}
    readers = Readers(env.tmp, d.root, REPOS, count=6, cwd_repo=REPOS[0])
    daemons = [d]
    try:
        readers.wait_running(min_ops=5)
        for path in ("graceful", "crash", "reexec"):
            for _ in range(ROUNDS):
                if path == "reexec":
                    readies = len(d.events("ready"))
                    d.proc.send_signal(signal.SIGUSR2)
                    d.wait_ready(readies + 1, timeout=60)
                else:
                    code = d.stop(signal.SIGKILL if path == "crash" else signal.SIGTERM)
                    assert code == (-signal.SIGKILL if path == "crash" else 0), code
                    d = start_daemon(stop_mode="handover", expire_timeout=0, cwd=REPO_ROOT)
                    daemons.append(d)
                ready = d.events("ready")[-1]
                assert ready["adopted"] == len(REPOS), (path, ready)
                # The same cvmfs2 serves each repository: adopted, not booted again.
                assert {r: serving_pid(d.path(r)) for r in REPOS} == serving, path
                # Readers made progress through this daemon before the next restart.
                readers.wait_running(min_ops=_ops(readers) + 5)
        # A repository nobody used before the restarts mounts through the last daemon.
        fresh = "delta.real.test"
        assert (d.path(fresh) / "README").read_text() == revision_files(fresh, "v2")["README"]
        d.wait_mounted(fresh)  # logged after cvmfs2 serves
    finally:
        results = readers.stop()
    failures = sum(r["failures"] for r in results)
    assert failures == 0, [e for r in results for e in r["errors"]][:20]
    assert {r["mode"] for r in results} == {"path", "cwd"}
    assert all(r["ops"] > 10 for r in results), [r["ops"] for r in results]
    # No daemon booted any of the first repositories again.
    boots = [a["repo"] for x in daemons for a in x.mount_attempts()]
    assert sorted(boots) == sorted([*REPOS, "delta.real.test"]), boots
    print(f"\n{len(results)} readers, {sum(r['ops'] for r in results)} operations, "
          f"{failures} failed, over {3 * ROUNDS} restarts")

    # A last daemon in unmount mode takes over and, on SIGTERM, leaves nothing behind.
    assert d.stop(signal.SIGTERM) == 0
    last = start_daemon(stop_mode="unmount")
    assert last.events("ready")[-1]["adopted"] == len(REPOS) + 1
    assert last.stop() == 0
    assert mounts_under(env.tmp) == []
    for pid in serving.values():
        wait_for(f"cvmfs2 {pid} to exit", lambda pid=pid: exited(pid))


def _ops(readers: Readers) -> int:
    """The fewest operations any reader has reported so far."""
    return min(int(f.read_text() or 0) for f in readers.out.glob("*.progress"))
