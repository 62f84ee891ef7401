"""The first access to /cvmfs/<repo>, by any kind of system call, succeeds on its first try."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_FILES, Daemon, Env, mounts_under, run_py
from podview import PodView

FIRST_ACCESS = {
    "stat": "import os,sys; st=os.stat(sys.argv[1]+'/README'); print(st.st_size)",
    "open_read": "import sys; print(open(sys.argv[1]+'/README').read(), end='')",
    "listdir": "import os,sys; print(sorted(os.listdir(sys.argv[1])))",
    "chdir_relative": "import os,sys; os.chdir(sys.argv[1]); print(open('README').read(), end='')",
    "getxattr": "import os,sys; print(os.getxattr(sys.argv[1], 'user.fqrn').decode())",
    "realpath": "import os,sys; print(os.path.realpath(sys.argv[1]+'/bin/hello'))",
    "stat_root_of_repo": "import os,sys; print(os.path.isdir(sys.argv[1]))",
}
REPOS = ["alice.cern.ch", "atlas.cern.ch", "cms.cern.ch", "lhcb.cern.ch", "sft.cern.ch",
         "oasis.opensciencegrid.org", "icecube.opensciencegrid.org"]


def test_first_access_by_every_syscall(daemon: Daemon) -> None:
    for (kind, code), repo in zip(FIRST_ACCESS.items(), REPOS, strict=True):
        path = daemon.path(repo)
        result = run_py(code, str(path))
        assert result.returncode == 0, f"{kind} on {repo}: {result.stderr}"
        out = result.stdout.strip()
        if kind in ("open_read", "chdir_relative"):
            assert out == DEMO_FILES["README"].strip()
        elif kind == "stat":
            assert int(out) == len(DEMO_FILES["README"])
        elif kind == "listdir":
            assert out == str(sorted(["README", "bin", "data", "etc"]))
        elif kind == "getxattr":
            assert out == repo
        elif kind == "realpath":
            assert out == f"{path}/bin/hello"  # canonical: no staging path, no symlink
        else:
            assert out == "True"
    daemon.wait_mounted(*REPOS)
    assert sorted(a["repo"] for a in daemon.mount_attempts()) == sorted(REPOS)
    assert all(a["result"] == "mounted" for a in daemon.mount_attempts())


def test_first_access_by_execve(daemon: Daemon) -> None:
    prog = daemon.path("ligo.osgstorage.org") / "bin" / "hello"
    result = subprocess.run([str(prog)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello-from-ligo.osgstorage.org"


def test_root_listing_shows_mounted_repositories(daemon: Daemon) -> None:
    assert os.listdir(daemon.root) == []
    assert (daemon.path("sft.cern.ch") / "README").read_text() == DEMO_FILES["README"]
    daemon.wait_mounted("sft.cern.ch")
    assert os.listdir(daemon.root) == ["sft.cern.ch"]
    assert (daemon.path("cms.cern.ch") / "README").exists()
    daemon.wait_mounted("cms.cern.ch")
    assert sorted(os.listdir(daemon.root)) == ["cms.cern.ch", "sft.cern.ch"]


def test_a_booting_repository_is_listed_once_its_mount_is_in_place(env: Env,
                                                                   start_daemon) -> None:  # type: ignore[no-untyped-def]
    """A first read can be answered (by cvmfs2, in the kernel) before the daemon records the
    boot: the name is listed from the moment its mount is at its path, not from that record."""
    gate = env.shared / "open-slow"  # the boot lasts until the test opens it
    env.add_repo("slow.cern.ch")
    env.repo_config("slow.cern.ch", CVMFS_STANDIN_BOOT_GATE=str(gate))
    d = start_daemon(mount_timeout=120.0)
    path = d.path("slow.cern.ch")
    reader = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1]).read()",
                               str(path / "README")])
    try:
        d.wait_for("the boot's mount", lambda: str(path) in mounts_under(d.root))
        assert d.call("list")["result"]["repositories"][0]["state"] == "booting"
        assert os.listdir(d.root) == ["slow.cern.ch"]
    finally:
        gate.touch()
        assert reader.wait(timeout=60) == 0
    d.wait_mounted("slow.cern.ch")
    assert os.listdir(d.root) == ["slow.cern.ch"]


def _nodeids(root: Path) -> dict[str, int]:
    """name -> the nodeid the daemon gives it (readdir's d_ino; a stat would cross the mount
    and show the repository's own root)."""
    return {entry.name: entry.inode() for entry in os.scandir(root)}


def test_a_name_keeps_one_nodeid_across_lookup_mount_and_remounts(daemon: Daemon) -> None:
    """DESIGN.md §3-4: a name has one nodeid forever. The kernel learns it from the LOOKUP
    that starts the mount and compares every later LOOKUP and readdirplus entry with it; a
    different one detaches whatever is mounted there, in every namespace."""
    name, path = "sft.cern.ch", daemon.path("sft.cern.ch")
    pod = PodView(daemon.root, daemon.env.tmp / "pod")  # a namespace made before the lookup
    try:
        assert (path / "README").read_text() == DEMO_FILES["README"]  # LOOKUP, then the mount
        daemon.logged_attempts(name, 1, result="mounted")
        nodeid = _nodeids(daemon.root)[name]
        assert pod.do("scandir", "")["inodes"] == {name: nodeid}
        # Listings (readdirplus) and fresh lookups after the mount: the same nodeid, and the
        # kernel kept the mount (a mismatch would have detached it).
        for _ in range(3):
            assert _nodeids(daemon.root) == {name: nodeid}
            assert run_py("import os,sys; print(os.listdir(sys.argv[1]))",
                          str(path)).returncode == 0
        assert str(path) in mounts_under(daemon.root)
        assert os.stat(path).st_dev != os.stat(daemon.root).st_dev  # the repository's own fs
        assert daemon.env.boots() == [name]

        # Unmounted and looked up again: mounted again under the same nodeid.
        assert daemon.call("umount", name=name)["ok"]
        assert str(path) not in mounts_under(daemon.root) and name not in os.listdir(daemon.root)
        assert (path / "README").read_text() == DEMO_FILES["README"]
        daemon.logged_attempts(name, 2, result="mounted")
        assert _nodeids(daemon.root) == {name: nodeid}

        # Its backend killed, healed on the next access: still the same nodeid.
        pid = int(os.getxattr(path, "user.pid"))
        os.kill(pid, signal.SIGKILL)
        daemon.wait_for("the heal", lambda: any(e["repo"] == name
                                                for e in daemon.events("healed")))
        assert (path / "README").read_text() == DEMO_FILES["README"]
        daemon.logged_attempts(name, 3, result="mounted")
        assert int(os.getxattr(path, "user.pid")) != pid
        assert _nodeids(daemon.root) == {name: nodeid}
        assert pod.do("scandir", "")["inodes"] == {name: nodeid}
        assert pod.do("read", f"{name}/README")["data"] == DEMO_FILES["README"]
        assert daemon.env.boots() == [name] * 3

        # Another name: another nodeid.
        assert (daemon.path("cms.cern.ch") / "README").exists()
        daemon.wait_mounted("cms.cern.ch")
        ids = _nodeids(daemon.root)
        assert ids[name] == nodeid and ids["cms.cern.ch"] != nodeid
    finally:
        pod.close()


def test_data_is_byte_identical(daemon: Daemon) -> None:
    blob = (daemon.path("cms.cern.ch") / "data" / "blob.bin").read_bytes()
    assert blob == DEMO_FILES["data/blob.bin"]


def test_root_statfs_and_readonly(daemon: Daemon) -> None:
    st = os.statvfs(daemon.root)
    assert st.f_bsize == 4096 and st.f_namemax == 255
    with pytest.raises(OSError) as exc:
        (daemon.root / "newdir").mkdir()
    assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def test_probed_names_start_nothing(daemon: Daemon) -> None:
    for name in (".git", "HEAD", ".svn", "lib64", ".Trash", ".Trash-0", "nodot", "autorun.inf",
                 "libc.so.6", "x86_64"):
        assert not os.path.exists(daemon.root / name)
    assert daemon.env.boots() == []
    assert daemon.mount_attempts() == []


def test_missing_repository_is_enoent(daemon: Daemon) -> None:
    with pytest.raises(FileNotFoundError):
        os.stat(daemon.path("nonexistent.cern.ch") / "README")
    # The caller is answered when the name has failed; the mount line reaches the log through
    # the log's queue and writer thread, a moment later.
    attempts = daemon.wait_for("the failed mount's line",
                               lambda: daemon.mount_attempts("nonexistent.cern.ch"))
    assert [a["exit_code"] for a in attempts] == [16]
    assert "Failed to initialize root file catalog" in attempts[0]["stderr_tail"]


def test_policy_denies_before_starting_anything(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(allow=["*.cern.ch"], deny=["atlas.*"])
    assert (d.path("sft.cern.ch") / "README").exists()
    for denied in ("atlas.cern.ch", "oasis.opensciencegrid.org"):
        with pytest.raises(FileNotFoundError):
            os.stat(d.path(denied))
    assert d.env.boots() == ["sft.cern.ch"]


def test_second_daemon_on_same_root_refuses(daemon: Daemon, start_daemon) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="served by a running cvmfsd"):
        start_daemon(run_dir=str(daemon.env.tmp / "run2"))
    assert (daemon.path("alice.cern.ch") / "README").exists()


def test_realpath_from_subdirectory_is_canonical(daemon: Daemon) -> None:
    result = run_py("import os,sys; os.chdir(sys.argv[1]); print(os.getcwd())",
                    str(daemon.path("atlas.cern.ch") / "bin"))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == daemon.path("atlas.cern.ch") / "bin"


def test_listings_have_dot_and_dotdot(daemon: Daemon) -> None:
    """`ls -la` shows "." and ".." in the root and in .snapshots, like any directory, and the
    repositories that are mounted after them."""
    assert (daemon.path("alice.cern.ch") / "README").exists()
    daemon.wait_mounted("alice.cern.ch")
    out = subprocess.run(["ls", "-a1", str(daemon.root)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [".", "..", "alice.cern.ch"]
    snaps = subprocess.run(["ls", "-a1", str(daemon.root / ".snapshots")], capture_output=True,
                           text=True, check=True).stdout.split()
    assert snaps == [".", ".."]
    # "." of the root is the root itself.
    assert os.stat(daemon.root / ".").st_ino == os.stat(daemon.root).st_ino



def test_tls_code_stays_unloaded_while_serving(daemon: Daemon) -> None:
    """trio imports ssl and hmac, which load OpenSSL's libcrypto (about 5 MiB of the daemon's
    RSS): cvmfsd defers them (cvmfsd/lazy.py). Mounting, listing, reading and the status socket
    must not load them: if something on those paths uses them after all, this says which."""
    assert (daemon.path("atlas.cern.ch") / "README").read_text() == DEMO_FILES["README"]
    assert "atlas.cern.ch" in os.listdir(daemon.root)
    daemon.wait_mounted("atlas.cern.ch")
    assert daemon.call("status")["ok"] and daemon.call("list")["ok"]
    maps = Path(f"/proc/{daemon.pid}/maps").read_text()
    loaded = sorted({line.split()[-1] for line in maps.splitlines()
                     if "libcrypto" in line or "libssl" in line or "_hashlib" in line
                     or "/_ssl." in line})
    assert loaded == [], loaded
