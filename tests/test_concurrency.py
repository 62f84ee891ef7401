"""Many processes, many cold repositories: one boot each, no errors, no head-of-line blocking."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

from conftest import DEMO_FILES, Daemon

REPOS = ["alice.cern.ch", "atlas.cern.ch", "cms.cern.ch", "lhcb.cern.ch", "sft.cern.ch",
         "oasis.opensciencegrid.org", "icecube.opensciencegrid.org", "ligo.osgstorage.org"]

READER_TEMPLATE = """
import os, sys, time
barrier, root, repos = sys.argv[1], sys.argv[2], sys.argv[3:]
open(barrier + "." + str(os.getpid()), "w").close()  # here, waiting
while not os.path.exists(barrier):
    time.sleep(0.001)
errors = 0
for i in range(len(repos)):
    repo = repos[(i + os.getpid()) % len(repos)]
    try:
        with open(os.path.join(root, repo, "README")) as f:
            if f.read() != %r:
                errors += 1
    except OSError as exc:
        print(repo, exc, file=sys.stderr)
        errors += 1
print(errors)
"""
READER = READER_TEMPLATE.replace("%r", repr(DEMO_FILES["README"]))


def test_32_processes_8_cold_repositories(daemon: Daemon) -> None:
    barrier = daemon.env.tmp / "go"
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(barrier), str(daemon.root),
                               *REPOS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(32)]
    daemon.wait_for("every reader at the barrier",
                    lambda: len(list(daemon.env.tmp.glob("go.*"))) == len(procs))
    barrier.touch()
    errors = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        errors += int(out.strip())
        assert err == "", err
    assert errors == 0
    boots = Counter(daemon.env.boots())
    assert boots == Counter({r: 1 for r in REPOS}), boots
    assert sorted(os.listdir(daemon.root)) == sorted(REPOS)


def test_lookup_during_a_slow_boot_does_not_wait(start_daemon) -> None:  # type: ignore[no-untyped-def]
    # The slow boot lasts until the test opens its gate, longer than anything below may take:
    # whatever waited for it could only finish after the gate opens (or at mount_timeout).
    d = start_daemon(mount_timeout=120.0, max_concurrent_boots=8)
    gate = d.env.shared / "open-slow"  # where cvmfs2, dropped to its user, can look
    d.env.repo_config("slow.cern.ch", CVMFS_STANDIN_BOOT_GATE=str(gate))
    d.env.add_repo("slow.cern.ch")
    slow = subprocess.Popen([sys.executable, "-c", "import os,sys; os.stat(sys.argv[1])",
                             str(d.path("slow.cern.ch") / "README")])
    try:
        d.wait_for("the slow boot to start", lambda: "slow.cern.ch" in d.env.boots())
        # A new name, the root itself, and a new repository: none waits for the slow boot.
        assert not os.path.exists(d.path("nope"))
        os.listdir(d.root)
        assert (d.path("cms.cern.ch") / "README").read_text() == DEMO_FILES["README"]
        # ... which is still held at its gate: nothing above can have waited for it.
        assert slow.poll() is None and d.mount_attempts("slow.cern.ch") == []
    finally:
        gate.touch()
        assert slow.wait(timeout=120) == 0
    d.wait_mounted("slow.cern.ch")
    assert [a["result"] for a in d.mount_attempts("slow.cern.ch")] == ["mounted"]


def test_config_repository_lookup_from_inside_a_boot(start_daemon, env) -> None:  # type: ignore[no-untyped-def]
    """cvmfs2 reads <mount dir>/<config repo>/etc/cvmfs/ under the root while it boots another
    repository. With one boot slot, that lookup must still be served."""
    root = env.tmp / "cvmfs"
    with open(env.client_config, "a") as f:
        f.write(f"CVMFS_CONFIG_REPOSITORY=cvmfs-config.cern.ch\nCVMFS_MOUNT_DIR={root}\n")
    # Not config= mode: the stand-in reads the normal hierarchy, then the config repository.
    etc = env.tmp / "etc-cvmfs"
    (etc / "default.conf").write_text(env.client_config.read_text())
    d = start_daemon(cvmfs2_config=[], max_concurrent_boots=1,
                     config_repository="cvmfs-config.cern.ch")
    assert (d.path("atlas.cern.ch") / "README").read_text() == DEMO_FILES["README"]
    d.wait_mounted("atlas.cern.ch", "cvmfs-config.cern.ch")
    assert sorted(os.listdir(d.root)) == ["atlas.cern.ch", "cvmfs-config.cern.ch"]
    assert Counter(env.boots()) == Counter({"atlas.cern.ch": 1, "cvmfs-config.cern.ch": 1})
