"""Pod-like views see repositories mounted later; SIGTERM leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
from conftest import DEMO_FILES, Daemon, mounts_under, zombies
from podview import PodView


def test_pod_view_made_before_mount_sees_it(daemon: Daemon) -> None:
    pod = PodView(daemon.root, daemon.env.tmp / "pod1")
    try:
        # Looked up through the pod's view first.
        r = pod.do("read", "alice.cern.ch/README")
        assert r == {"ok": True, "data": DEMO_FILES["README"]}
        # Looked up through the host first: the pod sees it by propagation.
        assert (daemon.path("cms.cern.ch") / "README").read_text() == DEMO_FILES["README"]
        assert pod.do("read", "cms.cern.ch/README")["data"] == DEMO_FILES["README"]
        assert pod.do("listdir", "")["names"] == ["alice.cern.ch", "cms.cern.ch"]
        assert pod.do("realpath", "cms.cern.ch/bin/hello") == {
            "ok": True, "path": str(pod.view / "cms.cern.ch" / "bin" / "hello")}
        assert daemon.env.boots().count("alice.cern.ch") == 1
    finally:
        pod.close()


def test_sigterm_leaves_nothing(daemon: Daemon) -> None:
    for repo in ("alice.cern.ch", "atlas.cern.ch", "sft.cern.ch"):
        assert (daemon.path(repo) / "README").exists()
    daemon.wait_mounted("alice.cern.ch", "atlas.cern.ch", "sft.cern.ch")
    # One repository is busy at shutdown: a process keeps its cwd inside.
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            cwd=daemon.path("sft.cern.ch"))
    try:
        serving = {a["serving_pid"] for a in daemon.mount_attempts()}
        assert len(serving) == 3 and all(psutil.pid_exists(p) for p in serving)
        descendants = [p.pid for p in psutil.Process(daemon.pid).children(recursive=True)]
        assert serving <= set(descendants)
        assert daemon.stop(signal.SIGTERM) == 0
        assert mounts_under(daemon.env.tmp) == []
        for pid in serving | set(descendants):
            assert not psutil.pid_exists(pid), f"pid {pid} outlived the daemon"
        assert not [z for z in zombies() if z.ppid() in (daemon.pid, *serving)]
        # Only the busy one was detached lazily, and the log says so.
        assert [e["repo"] for e in daemon.events("umount_lazy")] == ["sft.cern.ch"]
    finally:
        busy.kill()
        busy.wait()
    assert not os.path.ismount(daemon.root)
