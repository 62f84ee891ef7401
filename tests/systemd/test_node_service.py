"""The node service under a real systemd: a Debian tree booted with systemd-nspawn, the unit
files from systemd/ installed with the README's own commands, the cvmfs2 stand-in as backend.

Each test starts from a clean slate (cvmfsd stopped, nothing mounted, the example
configuration, no drop-ins). The watchdog test shortens WatchdogSec to 3 s with a drop-in; the
unmount-mode test drops --stop-mode handover the way the README says (`systemctl edit`).
Skipped, with the reason, where the machine cannot build or boot the container
(nspawn_machine.Unavailable); CVMFSD_SYSTEMD_TIER=0 skips it on purpose.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest
from nspawn_machine import REPO_ROOT, Machine, Unavailable, ensure_tree
from systemd_node import ROOT, UNIT, Node, journal_on_failure, wait_for

from cvmfs2_standin.kit import make_repo

pytestmark = pytest.mark.systemd

CONTENT = "hello from the repository\n"
FILES: dict[str, bytes | str] = {
    "README": CONTENT,
    "data/blob.bin": bytes(range(256)) * 64,
    "etc/cvmfs/default.conf": "CVMFS_STANDIN_READ_MARK=yes\n",
}
REPOS = ("atlas.cern.ch", "cms.cern.ch", "alice.cern.ch", "cvmfs-config.cern.ch")
CONFIG_REPO = "cvmfs-config.cern.ch"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if os.environ.get("CVMFSD_SYSTEMD_TIER") == "0":
        pytest.skip("systemd tier: disabled (CVMFSD_SYSTEMD_TIER=0)")
    try:
        tree = ensure_tree()
    except Unavailable as exc:
        pytest.skip(f"systemd tier: {exc}")
    state = tmp_path_factory.mktemp("systemd")
    for repo in REPOS:
        make_repo(state / "server", repo, FILES)
    machine = Machine(tree, f"cvmfsd-tier-{os.getpid()}", state, binds_rw=(str(state),))
    started = time.monotonic()
    try:
        try:
            machine.boot()
        except Unavailable as exc:
            pytest.skip(f"systemd tier: {exc}")
        booted = time.monotonic()
        n = Node(machine, state)
        n.provision()
        out = n.install_as_readme_says()
        assert out.returncode == 0, f"the README's install commands failed:\n{out.stderr}"
        # the README's last command: `systemctl status cvmfsd` with its Status: line
        assert re.search(r'Status: "0 mounted, 0 failed, 0 booting under /cvmfs"', out.stdout), \
            out.stdout
        build = "cached" if tree.built_s is None else f"built in {tree.built_s:.0f} s"
        print(f"\nsystemd tier: tree {tree.path.name} ({build}), container booted in "
              f"{booted - started:.1f} s, systemd {systemd_version(n)}")
        yield n
    finally:
        machine.shutdown()


@pytest.fixture
def service(node: Node) -> Iterator[Node]:
    node.reset()
    with journal_on_failure(node):
        yield node
    node.stop_readers()


def systemd_version(node: Node) -> int:
    out = node.systemctl("--version").stdout
    return int(out.split()[1])


def mount_all(node: Node, repos: list[str]) -> None:
    for repo in repos:
        out = node.read(f"{ROOT}/{repo}/README")
        assert out.returncode == 0 and out.stdout == CONTENT, out.stderr


def one_cvmfs2_each(node: Node) -> dict[str, int]:
    """Exactly one live cvmfs2 per mounted repository, and none for anything else."""
    procs = node.cvmfs2_by_repo()
    assert set(procs) == node.repo_mounts(), (procs, node.repo_mounts())
    assert all(len(pids) == 1 for pids in procs.values()), procs
    return {repo: pids[0] for repo, pids in procs.items()}


# --- start, status, journal -----------------------------------------------------------------

KUBELET = f"""[Unit]
Description=kubelet stand-in: is /cvmfs served when units ordered after cvmfsd start?
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'grep -q " {ROOT} [^ ]* [^-]*- fuse.cvmfsd " /proc/self/mountinfo \\
  && timeout 10 ls -a {ROOT} > /dev/null && echo "{ROOT} is served"'
"""


def test_start_is_ready_only_once_the_root_answers(service: Node) -> None:
    """`systemctl start` returns once READY=1 came, and READY=1 means the root answers: a unit
    that the cvmfsd unit orders itself before (kubelet.service, Before= in cvmfsd.service)
    finds the FUSE root mounted and listing at the moment it starts."""
    node = service
    node.machine.path("/etc/systemd/system/kubelet.service").write_text(KUBELET)
    node.systemctl("daemon-reload")
    try:
        started = node.systemctl("start", UNIT, "kubelet.service", check=False)
        kubelet = node.show("Result", "ExecMainStartTimestampMonotonic", "ExecMainStatus",
                            unit="kubelet.service")
        assert started.returncode == 0 and kubelet["Result"] == "success", \
            (started.stderr, kubelet)
    finally:
        node.systemctl("stop", "kubelet.service", check=False)
        node.machine.path("/etc/systemd/system/kubelet.service").unlink()
        node.systemctl("daemon-reload")
    cvmfsd = node.show("ActiveState", "SubState", "ActiveEnterTimestampMonotonic", "Type",
                       "StatusText")
    assert (cvmfsd["ActiveState"], cvmfsd["SubState"], cvmfsd["Type"]) == \
        ("active", "running", "notify")
    assert int(cvmfsd["ActiveEnterTimestampMonotonic"]) <= \
        int(kubelet["ExecMainStartTimestampMonotonic"])
    assert cvmfsd["StatusText"] == f"0 mounted, 0 failed, 0 booting under {ROOT}"

    # A first lookup mounts (and, for that boot, the config repository); STATUS= follows.
    mount_all(node, ["atlas.cern.ch"])
    assert node.repo_mounts() == {"atlas.cern.ch", CONFIG_REPO}
    expected = f"2 mounted, 0 failed, 0 booting under {ROOT}"
    wait_for("STATUS= to count the mounts", lambda: node.show("StatusText")["StatusText"]
             == expected)
    status = node.systemctl("status", UNIT).stdout
    assert f'Status: "{expected}"' in status and "active (running)" in status, status

    # One JSON line per mount in the unit's journal; the serving cvmfs2 is in the unit's cgroup.
    serving = one_cvmfs2_each(node)
    mounts = {e["repo"]: e for e in node.wait_events("mount", count=2)}
    for repo in ("atlas.cern.ch", CONFIG_REPO):
        line = mounts[repo]
        assert line["result"] == "mounted" and line["exit_code"] == 0, line
        assert line["serving_pid"] == serving[repo], (line, serving)
    assert set(serving.values()) | {node.main_pid()} <= node.unit_pids()


def test_an_invalid_configuration_fails_the_start_and_is_not_restarted(service: Node) -> None:
    """Exit 2 (RestartPreventExitStatus=2): failed at once, not "auto-restart"; the reason is in
    the journal."""
    node = service
    node.write_config(node.example_config(mount_timeout='"soon"'))
    cursor = node.cursor()
    out = node.systemctl("start", UNIT, check=False)
    assert out.returncode != 0
    state = node.show("ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
    assert (state["ActiveState"], state["SubState"], state["Result"], state["ExecMainStatus"]) \
        == ("failed", "failed", "exit-code", "2"), state
    node.wait_said(cursor, "mount_timeout")
    assert node.mounts() == [] and node.cvmfs2() == {}


# --- reload -----------------------------------------------------------------------------------

def test_reload_applies_the_allow_list_and_refuses_an_invalid_file(service: Node) -> None:
    node = service
    node.systemctl("start", UNIT)
    mount_all(node, ["atlas.cern.ch"])
    serving = one_cvmfs2_each(node)
    main = node.main_pid()

    # a changed allow list: cms.cern.ch is no longer a name this node mounts
    node.write_config(node.example_config(
        allow='["atlas.cern.ch", "alice.cern.ch", "cvmfs-config.cern.ch"]'))
    cursor = node.cursor()
    node.systemctl("reload", UNIT)
    assert node.wait_events("reloaded", after=cursor)[0]["changed"] == ["allow"]
    boots = len(node.boots())
    denied = node.read(f"{ROOT}/cms.cern.ch/README")
    assert denied.returncode != 0 and "No such file or directory" in denied.stderr
    assert len(node.boots()) == boots  # nothing started for a denied name
    mount_all(node, ["alice.cern.ch"])
    assert one_cvmfs2_each(node)["atlas.cern.ch"] == serving["atlas.cern.ch"]  # untouched

    # an invalid file that would also allow everything again: refused as a whole
    node.write_config(node.example_config(allow='["*"]', mount_timeout='"soon"'))
    cursor = node.cursor()
    failed = node.systemctl("reload", UNIT, check=False)
    assert failed.returncode != 0
    assert "cvmfsd.service" in failed.stderr and "failed" in failed.stderr, failed.stderr
    node.wait_said(cursor, "mount_timeout", "nothing was changed",
                   any_of=("Reload failed", "Control process exited"))
    after = node.show("ActiveState", "SubState", "MainPID")
    assert (after["ActiveState"], after["SubState"], int(after["MainPID"])) == \
        ("active", "running", main)
    still = node.read(f"{ROOT}/cms.cern.ch/README")
    assert still.returncode != 0 and "No such file or directory" in still.stderr
    assert len(node.boots()) == boots + 1  # alice only


# --- restart under readers ----------------------------------------------------------------------

def test_restart_hands_over_with_readers_running(service: Node) -> None:
    node = service
    repos = ["atlas.cern.ch", "cms.cern.ch", "alice.cern.ch"]
    node.systemctl("start", UNIT)
    mount_all(node, repos)
    before = one_cvmfs2_each(node)
    boots = len(node.boots())
    old_main = node.main_pid()
    node.start_reader(repos)
    node.start_reader(repos[::-1])
    node.start_reader(repos, pod=True)  # a pod's read-only slave view of the root
    node.readers_advance()

    cursor = node.cursor()
    node.systemctl("restart", UNIT)
    now = node.show("ActiveState", "SubState", "MainPID")
    assert (now["ActiveState"], now["SubState"]) == ("active", "running")
    assert int(now["MainPID"]) != old_main
    node.readers_advance()  # reads went on after the new daemon took over
    results = node.stop_readers()

    assert [r["failures"] for r in results] == [0, 0, 0], [r["errors"] for r in results]
    assert all(r["done"] and r["ops"] > 50 for r in results), results
    # the same cvmfs2 processes, adopted, not one booted again
    assert one_cvmfs2_each(node) == before
    assert len(node.boots()) == boots
    ready = node.wait_events("ready", after=cursor)
    assert [r["adopted"] for r in ready] == [len(before)], ready
    assert sorted(e["repo"] for e in node.events("adopted", after=cursor)) == sorted(before)
    # KillMode=process: systemd signalled only the daemon, and says so about the rest
    node.wait_said(cursor, *(f"Found left-over process {pid} (python" for pid in before.values()))


def test_reexec_in_place_keeps_the_main_pid(service: Node) -> None:
    """An upgrade in place as the unit's comment says, by signalling the main process only:
    the same main pid loads the code on disk; systemd sees RELOADING=1, then READY=1 (its
    debug log shows the state changes), and readers and cvmfs2 processes never notice."""
    node = service
    repos = ["atlas.cern.ch", "cms.cern.ch"]
    node.systemctl("start", UNIT)
    mount_all(node, repos)
    before = one_cvmfs2_each(node)
    boots = len(node.boots())
    main = node.main_pid()
    node.start_reader(repos)
    node.readers_advance()

    cursor = node.cursor()
    with node.debug_log():
        node.systemctl("kill", "--kill-whom=main", "--signal=USR2", UNIT)
        node.wait_notified("READY=1", cursor)  # the re-executed daemon's
    node.readers_advance()
    results = node.stop_readers()
    said = node.wait_said(cursor, "Changed running -> reload", "Changed reload -> running")
    assert [f"from PID {main} " in m for m in node.notified("RELOADING=1", cursor)] == [True]
    assert [f"from PID {main} " in m for m in node.notified("READY=1", cursor)] == [True]
    assert said.index("Changed running -> reload") < said.index("Changed reload -> running")
    now = node.show("ActiveState", "SubState", "MainPID", "NRestarts")
    assert (now["ActiveState"], now["SubState"], int(now["MainPID"])) == \
        ("active", "running", main)
    assert [r["adopted"] for r in node.wait_events("ready", after=cursor)] == [len(before)]
    assert results[0]["failures"] == 0, results[0]["errors"]
    assert one_cvmfs2_each(node) == before
    assert len(node.boots()) == boots


# --- watchdog -----------------------------------------------------------------------------------

WATCHDOG_SEC = 3


def test_watchdog_restarts_a_wedged_daemon_and_repositories_survive(service: Node) -> None:
    """SIGSTOP freezes every thread of the daemon (the FUSE loop with them): no WATCHDOG=1,
    so systemd aborts it after WatchdogSec (3 s by a drop-in here; 60 s shipped) and starts a
    new one, which adopts the mounts. Readers of mounted repositories never notice."""
    node = service
    node.dropin("test-watchdog.conf", f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\n")
    node.systemctl("daemon-reload")
    node.systemctl("start", UNIT)
    assert node.show("WatchdogUSec")["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    repos = ["atlas.cern.ch", "cms.cern.ch"]
    mount_all(node, repos)
    before = one_cvmfs2_each(node)
    boots = len(node.boots())
    restarts = int(node.show("NRestarts")["NRestarts"])
    wedged = node.main_pid()
    node.start_reader(repos)
    node.readers_advance()

    cursor = node.cursor()
    node.machine.kill(wedged, "STOP")
    # reads of mounted repositories do not need the daemon
    node.readers_advance()

    def restarted() -> bool:
        now = node.show("NRestarts", "MainPID", "ActiveState", "SubState")
        return (int(now["NRestarts"]) == restarts + 1 and int(now["MainPID"]) not in (0, wedged)
                and (now["ActiveState"], now["SubState"]) == ("active", "running"))

    wait_for("systemd's watchdog to restart cvmfsd", restarted, timeout=120)
    node.wait_said(cursor, f"Watchdog timeout (limit {WATCHDOG_SEC}s)!",
                   f"Killing process {wedged} (cvmfsd) with signal SIGABRT",
                   "Fatal Python error: Aborted",  # PYTHONFAULTHANDLER's tracebacks
                   "Failed with result 'watchdog'")
    node.readers_advance()
    results = node.stop_readers()
    assert results[0]["failures"] == 0, results[0]["errors"]
    assert one_cvmfs2_each(node) == before
    assert len(node.boots()) == boots
    adopted = node.wait_events("adopted", after=cursor, count=len(before))
    assert sorted(e["repo"] for e in adopted) == sorted(before)
    mount_all(node, ["alice.cern.ch"])  # and the new daemon serves new names


# --- stop -------------------------------------------------------------------------------------

def test_stop_in_handover_mode_keeps_repositories_served(service: Node) -> None:
    """The shipped unit: `systemctl stop` leaves mounted repositories working, new names fail
    until cvmfsd runs again, and the next start adopts what was left."""
    node = service
    node.systemctl("start", UNIT)
    mount_all(node, ["atlas.cern.ch"])
    before = one_cvmfs2_each(node)
    boots = len(node.boots())
    cursor = node.cursor()
    with node.debug_log():
        node.systemctl("stop", UNIT)
    assert node.show("ActiveState")["ActiveState"] == "inactive"
    stopping = node.wait_notified("STOPPING=1", cursor)
    assert len(stopping) == 1 and "2 repositories stay mounted for the next cvmfsd" in \
        stopping[0], stopping
    mount_all(node, ["atlas.cern.ch"])
    assert node.cvmfs2_by_repo() == {repo: [pid] for repo, pid in before.items()}
    new = node.read(f"{ROOT}/cms.cern.ch/README")
    assert new.returncode != 0 and "Transport endpoint is not connected" in new.stderr, new
    node.systemctl("start", UNIT)
    mount_all(node, ["cms.cern.ch"])
    after = one_cvmfs2_each(node)
    assert {r: after[r] for r in before} == before
    assert node.boots()[boots:] == ["cms.cern.ch"]


def test_stop_in_unmount_mode_leaves_no_mount_and_no_cvmfs2(service: Node) -> None:
    node = service
    node.unmount_mode()
    node.systemctl("daemon-reload")
    assert "--stop-mode" not in node.show("ExecStart")["ExecStart"]
    node.systemctl("start", UNIT)
    mount_all(node, ["atlas.cern.ch", "cms.cern.ch"])
    assert len(one_cvmfs2_each(node)) == 3
    cursor = node.cursor()
    with node.debug_log():
        node.systemctl("stop", UNIT)
    stopping = node.wait_notified("STOPPING=1", cursor)
    assert len(stopping) == 1 and "Stopping: unmounting 3 repositories" in stopping[0], stopping
    state = node.show("ActiveState", "Result")
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success")
    assert node.mounts() == []
    assert node.cvmfs2() == {}
    assert node.unit_pids() == set()
    stopped = node.wait_events("stopped", after=cursor)
    assert [e["mode"] for e in stopped] == ["unmount"], stopped


# --- hardening --------------------------------------------------------------------------------

# The unit's CapabilityBoundingSet=, and what it must keep out.
UNIT_CAPS = {"CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN",
             "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_KILL",
             "CAP_SYS_RESOURCE", "CAP_SYS_PTRACE"}


def test_hardening_allows_what_cvmfsd_and_cvmfs2_need(service: Node) -> None:
    node = service
    node.systemctl("start", UNIT)
    mount_all(node, ["atlas.cern.ch"])
    main = node.main_pid()

    # No private mount namespace: the service's mounts are the node's (pid 1's) mounts, and
    # other services and the admin's shell see them.
    ns = node.machine.path(f"/proc/{main}/ns/mnt").readlink()
    assert ns == node.machine.path("/proc/1/ns/mnt").readlink()
    assert (ROOT, "fuse.cvmfsd") in node.mounts(1)
    assert (f"{ROOT}/atlas.cern.ch", "fuse") in node.mounts(1)
    other = node.machine.run(["systemd-run", "--quiet", "--wait", "--pipe", "cat",
                              f"{ROOT}/atlas.cern.ch/README"])
    assert other.stdout == CONTENT

    # What a cvmfs2 started by cvmfsd may do inside the unit's sandbox (cvmfs2_probe.py).
    container_caps = set(_caps_of(node, 1))  # nspawn's set: the host may lack some
    reports = node.probe_reports()
    assert {r["argv"][-2] for r in reports} == {"atlas.cern.ch", CONFIG_REPO}
    for r in reports:
        assert r["mount_ns"] == str(ns)
        assert r["fuse"] == "ok", r
        assert r["denied_device"] == "EPERM", r  # DevicePolicy=closed is enforced ...
        assert r["denied_syscall"] == "EPERM", r  # ... and so is the filter, with EPERM
        # cvmfs2 can drop to its user, and root can still signal it afterwards
        drop = r["drop"]
        assert drop.get("error") is None and drop["chown"] == "ok", drop
        assert drop["ids"] == [drop["uid"], drop["uid"], drop["gid"], drop["gid"]], drop
        assert drop["file_owner"] == drop["uid"] and drop["regained_root"] is False, drop
        assert drop["kill"] == "ok" and drop["child_ended_by"] == "SIGTERM", drop
        assert r["no_new_privs"] == "1" and r["seccomp"] == "2", r
        assert set(r["cap_bnd"]) == UNIT_CAPS & container_caps, r["cap_bnd"]
    # ... while a unit without the device policy may open that device: the EPERM is the policy
    control = node.machine.run(["systemd-run", "--quiet", "--wait", "--pipe", "sh", "-c",
                                "exec 3> /dev/cvmfsd-test-kmsg && echo opened"], check=False)
    assert control.stdout.strip() == "opened", control.stderr
    # the daemon itself runs with the same bounding set
    assert set(_caps_of(node, main, "CapBnd")) == UNIT_CAPS & container_caps

    # systemd-analyze security, from inside; the README quotes its rating
    security = node.machine.run(["systemd-analyze", "security", "--no-pager", UNIT],
                                check=False)
    (node.state / "systemd-analyze-security.txt").write_text(security.stdout)
    rating = re.search(r"Overall exposure level for cvmfsd.service: (\d+\.\d) (\w+)",
                       security.stdout)
    assert rating, security.stdout + security.stderr
    print(f"\nsystemd-analyze security {UNIT} (systemd {systemd_version(node)}): "
          f"{rating.group(1)} {rating.group(2)}")
    claimed = re.search(r"`systemd-analyze security[^`]*`[^`.]*?rates it\s+(\d+\.\d) \((\w+)\)",
                        (REPO_ROOT / "README.md").read_text())
    assert claimed, "the README no longer quotes the rating"
    if systemd_version(node) == 252:  # the version the README's figure is for
        assert (claimed.group(1), claimed.group(2).upper()) == \
            (rating.group(1), rating.group(2)), security.stdout


def _caps_of(node: Node, pid: int, which: str = "CapBnd") -> list[str]:
    from cvmfs2_probe import cap_names

    for line in node.machine.path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(which + ":"):
            return cap_names(int(line.split()[1], 16))
    raise AssertionError(f"no {which} for {pid}")
