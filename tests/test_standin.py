"""Tests of the cvmfs2 stand-in itself, on real FUSE mounts (run as root).

Every test stops what it started by pid and unmounts what it mounted; the `rig` fixture
does it again (detaching as a last resort) if a test fails half-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from cvmfs2_standin.kit import (
    Raw,
    Symlink,
    basic_params,
    make_repo,
    root_hash,
    talk,
    talk_socket_path,
    write_config,
    write_wrapper,
)

FQRN = "repo.example.org"
OTHER = "other.example.org"
PR_SET_CHILD_SUBREAPER = 36
MNT_DETACH = 2
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
# What cvmfs2 2.12.0 exits with after SIGTERM/SIGINT/SIGHUP (a clean unmount nonetheless).
TERM_EXIT = 6
FILES: dict[str, bytes | str | Symlink] = {
    "README": "hello from revision 1\n",
    "data/blob.bin": bytes(range(256)) * 300,
    "bin/hello": '#!/bin/sh\necho "hello $1"\n',
    "link": Symlink("README"),
    "empty/": "",
}

libc = ctypes.CDLL(None, use_errno=True)


def mounted(path: Path) -> bool:
    """Is something mounted exactly at path? (stat would fail with ENOTCONN on a dead mount)"""
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == target:
            return True
    return False


def mount_entry(path: Path) -> tuple[str, str, str]:
    """(source, type, options) from /proc/mounts."""
    for line in Path("/proc/mounts").read_text().splitlines():
        source, point, fstype, options = line.split()[:4]
        if point == str(path):
            return source, fstype, options
    raise AssertionError(f"{path} is not mounted")


def umount(path: Path, flags: int = 0) -> None:
    if libc.umount2(os.fsencode(path), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def is_standin(pid: int) -> bool:
    try:
        return b"cvmfs2.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def wait_exit(pid: int, timeout: float) -> int | None:
    """Wait for pid to end; its wait status if it was our child (we are a subreaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return None
        else:
            if done:
                return status
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} still running after {timeout}s")


@dataclass
class Launch:
    rc: int
    stdout: str
    stderr: str
    pid: int


@dataclass
class Mounted:
    mountpoint: Path
    pid: int
    launch: Launch


@dataclass
class Rig:
    base: Path
    server: Path = field(init=False)
    etc: Path = field(init=False)
    wrapper: Path = field(init=False)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The loader does not create its socket directory (CVMFS_RELOAD_SOCKETS).
        (self.base / "run").mkdir()
        self.server = self.base / "srv"
        self.etc = self.base / "etc"
        self.wrapper = write_wrapper(self.base / "cvmfs2", env={"CVMFS_STANDIN_ETC": str(self.etc)})
        make_repo(self.server, FQRN, FILES, executable=["bin/hello"])

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    def talk_path(self, fqrn: str = FQRN) -> Path:
        return talk_socket_path(self.cache, fqrn)

    def config(self, name: str = "client.conf", **extra: object) -> Path:
        return write_config(self.base / name, **basic_params(self.base, self.server, **extra))

    def mountpoint(self, name: str = "mnt") -> Path:
        path = self.base / name
        path.mkdir(exist_ok=True)
        self.mounts.append(path)
        return path

    def popen(self, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
        # An empty environment, like the daemon's minimal one: the wrapper must not need PATH.
        proc = subprocess.Popen(
            [str(self.wrapper), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            cwd="/",
            text=True,
            pass_fds=pass_fds,
        )
        self.procs.append(proc)
        return proc

    def launch(self, *args: str, pass_fds: tuple[int, ...] = (), timeout: float = 20) -> Launch:
        proc = self.popen(*args, pass_fds=pass_fds)
        # communicate() reads to EOF: it returns only if the daemon released stdout/stderr.
        out, err = proc.communicate(timeout=timeout)
        return Launch(proc.returncode, out, err, proc.pid)

    def options(self, config: Path, *extra: str) -> str:
        return ",".join([f"config={config}", "fsname=cvmfs2", "allow_other", *extra])

    def mount(
        self,
        fqrn: str = FQRN,
        mountpoint: Path | None = None,
        config: Path | None = None,
        extra: tuple[str, ...] = (),
        **params: object,
    ) -> Mounted:
        mp = mountpoint or self.mountpoint()
        cfg = config or self.config(**params)
        res = self.launch("-o", self.options(cfg, *extra), fqrn, str(mp))
        assert res.rc == 0, res
        pid = int(talk(self.talk_path(fqrn), "pid"))
        self.pids.append(pid)
        return Mounted(mp, pid, res)

    def stop(self, m: Mounted) -> int | None:
        """SIGTERM to the serving process; its exit code (cvmfs2 2.12.0: 6, after a clean
        unmount)."""
        os.kill(m.pid, signal.SIGTERM)
        status = wait_exit(m.pid, 10)
        return None if status is None else os.waitstatus_to_exitcode(status)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for pid in self.pids:
            if is_standin(pid):
                os.kill(pid, signal.SIGTERM)
        for pid in self.pids:
            with contextlib.suppress(TimeoutError):
                wait_exit(pid, 5)
            if is_standin(pid):
                os.kill(pid, signal.SIGKILL)
                wait_exit(pid, 5)
        for mp in self.mounts:
            while mounted(mp):
                umount(mp, MNT_DETACH)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    # Serving daemons are orphans: make them ours so we can reap them.
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.cleanup()
        leftover = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(tmp_path))
        ]
        assert not leftover


# -- command line and configuration (no mount) ------------------------------------


def test_version(rig: Rig) -> None:
    for flag in ("-V", "--version"):
        res = rig.launch(flag)
        assert res.rc == 0
        assert res.stdout.splitlines()[0] == "CernVM-FS version 2.12.0"


def test_parse_prints_effective_parameters(rig: Rig) -> None:
    first = write_config(
        rig.base / "a.conf",
        CVMFS_SERVER_URL="http://s1.example.org/cvmfs/@fqrn@;http://s2/@org@",
        CVMFS_HTTP_PROXY="http://p1:3128|http://p2:3128;DIRECT",
        CVMFS_QUOTA_LIMIT=1000,
        CVMFS_EXPANDED=Raw('"$CVMFS_FQRN/x"'),
    )
    second = write_config(
        rig.base / "b.conf", CVMFS_SEES_EARLIER=Raw("$CVMFS_QUOTA_LIMIT"), CVMFS_QUOTA_LIMIT=2000
    )
    res = rig.launch("-o", f"config={first}:{second},parse", FQRN, "/nonexistent")
    assert res.rc == 0, res
    lines = res.stdout.splitlines()
    assert lines[0] == "# CernVM-FS parameters:"
    assert lines[1:6] == [
        f"CVMFS_EXPANDED={FQRN}/x    # from {first}",
        f"CVMFS_HTTP_PROXY='http://p1:3128|http://p2:3128;DIRECT'    # from {first}",
        f"CVMFS_QUOTA_LIMIT=2000    # from {second}",
        f"CVMFS_SEES_EARLIER=1000    # from {second}",
        "CVMFS_SERVER_URL='http://s1.example.org/cvmfs/repo.example.org;http://s2/repo'"
        f"    # from {first}",
    ]


def test_default_configuration_order_and_config_repository(rig: Rig) -> None:
    mount_dir = rig.base / "cvmfs"
    cfg_repo = mount_dir / "cfg.example.org" / "etc" / "cvmfs"
    write_config(
        rig.etc / "default.conf",
        CVMFS_CONFIG_REPOSITORY="cfg.example.org",
        CVMFS_MOUNT_DIR=str(mount_dir),
        CVMFS_A="etc-default",
    )
    write_config(rig.etc / "default.d" / "50-x.conf", CVMFS_B="default.d")
    write_config(cfg_repo / "default.conf", CVMFS_B="cfg-default", CVMFS_C="cfg-default")
    write_config(rig.etc / "default.local", CVMFS_C="default.local")
    write_config(cfg_repo / "domain.d" / "example.org.conf", CVMFS_D="cfg-domain")
    write_config(rig.etc / "domain.d" / "example.org.local", CVMFS_E="domain-local")
    write_config(cfg_repo / "config.d" / f"{FQRN}.conf", CVMFS_E="cfg-repo", CVMFS_F="cfg-repo")
    write_config(rig.etc / "config.d" / f"{FQRN}.local", CVMFS_F=Raw("$CVMFS_FQRN-local"))
    res = rig.launch("-o", "parse", FQRN, "/nonexistent")
    assert res.rc == 0, res
    got = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in res.stdout.splitlines()
        if line.startswith("CVMFS_")
    }
    assert got["CVMFS_A"] == f"etc-default    # from {rig.etc}/default.conf"
    assert got["CVMFS_B"] == f"cfg-default    # from {cfg_repo}/default.conf"
    assert got["CVMFS_C"] == f"default.local    # from {rig.etc}/default.local"
    assert got["CVMFS_D"] == f"cfg-domain    # from {cfg_repo}/domain.d/example.org.conf"
    # Repository files come after all domain files.
    assert got["CVMFS_E"] == f"cfg-repo    # from {cfg_repo}/config.d/{FQRN}.conf"
    assert got["CVMFS_F"] == f"{FQRN}-local    # from {rig.etc}/config.d/{FQRN}.local"

    # A required but absent config repository is a hard error (exit 1).
    (rig.etc / "default.local").write_text("CVMFS_CONFIG_REPO_REQUIRED=yes\n")
    shutil.rmtree(mount_dir / "cfg.example.org")
    res = rig.launch("-o", "parse", FQRN, "/nonexistent")
    assert res.rc == 1
    assert "required configuration repository directory does not exist" in res.stderr


def test_command_line_errors(rig: Rig) -> None:
    cfg = rig.config()
    assert rig.launch("-o", f"config={cfg}", FQRN).rc == 2
    res = rig.launch("-o", f"config={cfg},libfuse=7", FQRN, str(rig.base))
    assert (res.rc, res.stderr) == (1, "Error: invalid libfuse version '7', valid values are "
                                       "2 or 3.\n")
    # A third positional goes to libfuse: the second is still the mountpoint, checked as
    # such, and libfuse refuses the third once the boot is done (measured with 2.12.0).
    res = rig.launch("-o", f"config={cfg}", FQRN, "/a", "/b")
    assert (res.rc, res.stderr) == (3, "Mount point /a does not exist\n")
    mp = rig.mountpoint()
    res = rig.launch("-o", rig.options(cfg), FQRN, str(mp), "extra")
    assert res.rc == 4 and res.stdout == "CernVM-FS: loading Fuse module... done\n"
    assert res.stderr == "fuse: unknown option(s): `extra'\nfailed to create Fuse session\n"
    assert not mounted(mp)


def test_missing_mountpoint(rig: Rig) -> None:
    res = rig.launch("-o", f"config={rig.config()}", FQRN, str(rig.base / "nope"))
    assert res.rc == 3
    assert res.stderr == f"Mount point {rig.base / 'nope'} does not exist\n"


def test_missing_repository_is_a_catalog_failure(rig: Rig) -> None:
    mp = rig.mountpoint()
    res = rig.launch("-o", rig.options(rig.config()), "missing.example.org", str(mp))
    assert res.rc == 16
    assert res.stdout == "CernVM-FS: loading Fuse module... "
    assert res.stderr == "Failed to initialize root file catalog (16 - file catalog failure)\n"
    assert not mounted(mp)
    # A manifest for another name is a mismatch: same failure.
    cfg = rig.config("mismatch.conf", CVMFS_SERVER_URL=f"file://{rig.server}/{FQRN}")
    res = rig.launch("-o", rig.options(cfg), OTHER, str(mp))
    assert res.rc == 16


def test_boot_failures(rig: Rig) -> None:
    mp = rig.mountpoint()
    res = rig.launch("-o", rig.options(rig.config(CVMFS_STANDIN_FAIL=4)), FQRN, str(mp))
    assert (res.rc, res.stderr) == (4, "failed to mount file system (4 - failed to mount)\n")
    res = rig.launch("-o", rig.options(rig.config(CVMFS_HTTP_PROXY="")), FQRN, str(mp))
    assert res.rc == 23
    assert res.stderr.endswith("(23 - proxy auto-discovery failed)\n")
    cfg = rig.config(CVMFS_NFILES=10**9)
    assert rig.launch("-o", rig.options(cfg, "system_mount"), FQRN, str(mp)).rc == 3
    assert not mounted(mp)


def test_knobs_count_even_when_sourced(rig: Rig) -> None:
    # Real parameters are only those on a fragment's own lines; the stand-in's knobs also
    # count when set indirectly, so that per-repository knob files can be sourced.
    knobs = write_config(rig.base / "knobs.conf", CVMFS_STANDIN_FAIL=4, CVMFS_QUOTA_LIMIT=7)
    cfg = rig.config("sourcing.conf")
    with open(cfg, "a") as f:
        f.write(f'if [ -f "{knobs}" ]; then . "{knobs}"; fi\n')
    res = rig.launch("-o", f"config={cfg},parse", FQRN, "/nonexistent")
    assert f"CVMFS_STANDIN_FAIL=4    # from {cfg}" in res.stdout.splitlines()
    assert "CVMFS_QUOTA_LIMIT" not in res.stdout
    assert rig.launch("-o", rig.options(cfg), FQRN, str(rig.mountpoint())).rc == 4


def test_boot_delay_and_hang(rig: Rig) -> None:
    mp = rig.mountpoint()
    started = time.monotonic()
    rig.mount(mountpoint=mp, CVMFS_STANDIN_BOOT_DELAY=0.5)
    assert time.monotonic() - started >= 0.5
    proc = rig.popen("-o", rig.options(rig.config(CVMFS_STANDIN_HANG="yes")), OTHER, str(mp))
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(1.0)
    proc.kill()
    proc.wait(10)


def test_boot_gate(rig: Rig) -> None:
    """The boot waits for the gate file, however long, then mounts."""
    mp = rig.mountpoint()
    gate = rig.base / "gate"
    proc = rig.popen("-o", rig.options(rig.config(CVMFS_STANDIN_BOOT_GATE=str(gate))), FQRN,
                     str(mp))
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(1.0)
    assert not os.path.ismount(mp)
    gate.touch()
    assert proc.wait(30) == 0
    rig.pids.append(int(talk(rig.talk_path(), "pid")))
    assert os.path.ismount(mp)


# -- a mounted repository ---------------------------------------------------------


def test_mount_daemonizes_and_serves(rig: Rig) -> None:
    marker_r, marker_w = os.pipe()
    mp = rig.mountpoint()
    started = time.time()
    try:
        res = rig.launch(
            "-o", rig.options(rig.config()), FQRN, str(mp), pass_fds=(marker_w,), timeout=20
        )
    finally:
        os.close(marker_w)
    assert res.rc == 0, res
    assert res.stdout.splitlines() == [
        "CernVM-FS: loading Fuse module... done",
        f"CernVM-FS: mounted cvmfs on {mp}",
    ]
    assert res.stderr == ""
    # Inherited descriptors are not kept by the daemon: the pipe reaches EOF.
    assert os.read(marker_r, 1) == b""
    os.close(marker_r)

    pid = int(talk(rig.talk_path(), "pid"))
    rig.pids.append(pid)
    assert pid != res.pid and is_standin(pid)
    assert os.getsid(pid) != os.getsid(0)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    # The launcher reaped its intermediate child: no zombie was left to us.
    # (Other tests of the session may leave theirs; only look at what this launch made.)
    zombies = [
        c
        for c in psutil.Process().children()
        if c.status() == psutil.STATUS_ZOMBIE and c.create_time() >= started - 0.05
    ]
    assert not zombies

    source, fstype, options = mount_entry(mp)
    assert (source, fstype) == ("cvmfs2", "fuse")
    assert {"ro", "nodev", "allow_other"} <= set(options.split(","))

    # Content, modes, symlinks, directories.
    assert (mp / "README").read_text() == FILES["README"]
    assert (mp / "data" / "blob.bin").read_bytes() == FILES["data/blob.bin"]
    assert os.readlink(mp / "link") == "README"
    assert (mp / "link").read_text() == FILES["README"]
    assert sorted(os.listdir(mp)) == ["README", "bin", "data", "empty", "link"]
    assert os.listdir(mp / "empty") == []
    assert stat.S_IMODE(os.stat(mp / "bin" / "hello").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(mp / "README").st_mode) == 0o644
    ino = os.stat(mp / "README").st_ino
    assert os.stat(mp / "README").st_ino == ino != os.stat(mp / "bin" / "hello").st_ino
    run = subprocess.run([str(mp / "bin" / "hello"), "world"], capture_output=True, text=True)
    assert run.stdout == "hello world\n"
    # As cvmfs: 512-byte blocks of the quota, the catalog's entries as files, no name length.
    vfs = os.statvfs(mp)
    assert (vfs.f_bsize, vfs.f_frsize, vfs.f_namemax, vfs.f_ffree) == (512, 512, 0, 0)
    assert vfs.f_blocks == 1024 * 1024 * 1024 // 512  # the default quota, 1 GiB
    assert vfs.f_files == 1 + len(os.listdir(mp)) + len(os.listdir(mp / "bin")) + len(
        os.listdir(mp / "data")) + len(os.listdir(mp / "empty"))
    # No `..` in the repository's root, everywhere else `.` and `..`.
    assert subprocess.run(["ls", "-a", str(mp)], capture_output=True, text=True
                          ).stdout.split()[:2] == [".", "README"]
    assert subprocess.run(["ls", "-a", str(mp / "bin")], capture_output=True, text=True
                          ).stdout.split() == [".", "..", "hello"]
    for write in (
        lambda: open(mp / "new", "w"),  # noqa: SIM115
        lambda: os.mkdir(mp / "dir"),
        lambda: os.unlink(mp / "README"),
    ):
        with pytest.raises(OSError) as exc:
            write()
        assert exc.value.errno == errno.EROFS

    assert rig.stop(Mounted(mp, pid, res)) == TERM_EXIT
    assert not mounted(mp)
    assert not rig.talk_path().exists()
    assert not (rig.base / "run" / f"cvmfs.{FQRN}").exists()


def xattr_of(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


def test_magic_xattrs(rig: Rig) -> None:
    m = rig.mount()
    mp = m.mountpoint
    (mp / "README").read_text()
    listed = set(os.listxattr(mp))
    wanted = {
        "user.fqrn", "user.revision", "user.root_hash", "user.pid", "user.version",
        "user.host", "user.proxy", "user.uptime", "user.nopen", "user.ndownload",
        "user.nioerr", "user.usedfd", "user.maxfd", "user.expires", "user.nclg",
        "user.hitrate", "user.rx", "user.speed",
    }  # fmt: skip
    assert wanted <= listed
    # cvmfs 2.12.0 lists every name twice, and a few repository-wide ones on the root.
    raw = os.listxattr(mp)
    assert len(raw) == 2 * len(listed)
    assert {"user.catalog_counters", "user.repo_counters", "user.proxy_list"} <= listed
    assert "regular,3\n" in xattr_of(mp, "user.repo_counters")

    def xattr(path: Path, name: str) -> str:
        return os.getxattr(path, name).decode()

    assert xattr(mp, "user.fqrn") == FQRN
    assert xattr(mp, "user.revision") == "1"
    assert xattr(mp, "user.root_hash") == root_hash(rig.server, FQRN, 1)
    assert xattr(mp, "user.pid") == str(m.pid)
    assert xattr(mp, "user.version") == "2.12.0.0"
    assert xattr(mp, "user.host") == f"file://{rig.server}/{FQRN}"
    assert xattr(mp, "user.proxy") == "DIRECT"
    assert xattr(mp, "user.uptime") == "0"
    assert xattr(mp, "user.nclg") == "1"
    assert int(xattr(mp, "user.nopen")) >= 1
    assert int(xattr(mp, "user.ndownload")) >= 1
    assert int(xattr(mp, "user.expires")) >= 3
    assert int(xattr(mp, "user.maxfd")) > 0
    for name in ("user.nioerr", "user.usedfd", "user.rx"):
        assert xattr(mp, name).isdigit()
    content_hash = hashlib.sha1(FILES["data/blob.bin"]).hexdigest()  # type: ignore[arg-type]
    assert xattr(mp / "data" / "blob.bin", "user.hash") == content_hash
    # The local hash is that of the cached copy: none before the first open.
    assert xattr(mp / "data" / "blob.bin", "user.lhash") == "Not in cache"
    (mp / "data" / "blob.bin").read_bytes()
    assert xattr(mp / "data" / "blob.bin", "user.lhash") == content_hash
    assert xattr(mp / "data" / "blob.bin", "user.chunks") == "1"
    assert os.listxattr(mp / "README") == []  # magic attributes are listed on the root only
    for path, name in ((mp, "user.nonexistent"), (mp, "user.hash"), (mp / "data", "user.chunks")):
        with pytest.raises(OSError) as exc:
            os.getxattr(path, name)
        assert exc.value.errno == errno.ENODATA
    assert rig.stop(m) == TERM_EXIT


def test_talk_socket(rig: Rig) -> None:
    m = rig.mount()
    sock = rig.talk_path()
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    (m.mountpoint / "data" / "blob.bin").read_bytes()
    replies = {
        cmd: talk(sock, cmd)
        for cmd in (
            "pid", "pid watchdog", "pid cachemgr", "mountpoint", "revision", "version",
            "cache size", "cache instance", "cleanup 0", "remount", "remount sync",
            "host info", "proxy info", "timeout info", "parameters", "frobnicate",
        )
    }  # fmt: skip
    assert replies["pid"] == f"{m.pid}\n"
    assert replies["pid watchdog"].strip().isdigit()
    assert replies["pid cachemgr"].strip().isdigit()
    assert replies["mountpoint"] == f"{m.mountpoint}\n"
    assert replies["revision"] == "1\n"
    assert replies["version"] == "2.12.0 (CernVM-FS Fuse Module)\n2.12.0 (Loader)\n"
    blob = len(FILES["data/blob.bin"])
    # The blob, and the catalog, which stays pinned while it is loaded.
    pinned = int(replies["cache size"].split("pinned: 0MB (")[1].split()[0])
    assert pinned > 0
    assert replies["cache size"] == (
        f"Current cache size is 0MB ({blob + pinned} Bytes), pinned: 0MB ({pinned} Bytes)\n")
    # Named relative to cvmfs2's working directory, the workspace.
    assert replies["cache instance"] == "Posix cache manager (cache directory: .)\n"
    # The loaded catalog is pinned: nothing cleans the cache completely.
    assert replies["cleanup 0"] == "Not fully cleaned (there might be pinned chunks)\n"
    assert talk(sock, "cleanup rate 5") == "1\n"
    assert replies["remount"] == replies["remount sync"] == "Catalog up to date\n"
    assert replies["host info"].endswith(f"Active host 0: file://{rig.server}/{FQRN}\n")
    assert replies["proxy info"] == "Load-balance groups:\n[0] DIRECT\nActive proxy: [0] DIRECT\n"
    assert replies["timeout info"] == "Timeout with proxy: 5s\nTimeout without proxy: 10s\n"
    assert "CVMFS_HTTP_PROXY=DIRECT    # from " in replies["parameters"]
    assert replies["frobnicate"] == "unknown command\n"
    assert talk(sock, "pid\n") == "unknown command\n"  # the command is taken verbatim
    assert rig.stop(m) == TERM_EXIT


def test_remount_applies_a_new_revision(rig: Rig) -> None:
    m = rig.mount()
    mp = m.mountpoint
    assert (mp / "README").read_text() == FILES["README"]
    with open(mp / "README") as still_open:
        assert (mp / "data" / "blob.bin").stat().st_size == len(FILES["data/blob.bin"])
        rev2 = {"README": "revision 2\n", "new": "new\n", "data/blob.bin": b"2"}
        make_repo(rig.server, FQRN, rev2, revision=2)
        assert talk(rig.talk_path(), "remount sync") == "New revision applied\n"
        assert (mp / "README").read_text() == "revision 2\n"
        assert (mp / "data" / "blob.bin").read_bytes() == b"2"
        assert sorted(os.listdir(mp)) == ["README", "data", "new"]
        assert os.getxattr(mp, "user.revision") == b"2"
        assert os.getxattr(mp, "user.root_hash").decode() == root_hash(rig.server, FQRN, 2)
        assert talk(rig.talk_path(), "revision") == "2\n"
        # An open file keeps its revision, as cvmfs drains old catalogs.
        assert still_open.read() == FILES["README"]
    assert talk(rig.talk_path(), "remount") == "Catalog up to date\n"
    assert rig.stop(m) == TERM_EXIT


def test_pinned_revisions(rig: Rig) -> None:
    v2 = {"v2": "2024-06-01T00:00:00Z"}
    make_repo(rig.server, FQRN, {"README": "revision 2\n"}, revision=2, tags=v2)
    with open(rig.server / FQRN / "tags", "a") as f:
        f.write("v1 1 2024-01-01T00:00:00Z\n")
    mp = rig.mountpoint()
    pins = [
        ({"CVMFS_REPOSITORY_TAG": "v1"}, 1, "v1"),
        ({"CVMFS_REPOSITORY_DATE": "2024-03-01T00:00:00Z"}, 1, "v1"),
        ({"CVMFS_ROOT_HASH": root_hash(rig.server, FQRN, 2)}, 2, ""),
    ]
    for params, revision, tag in pins:
        m = rig.mount(mountpoint=mp, **params)
        assert os.getxattr(mp, "user.revision").decode() == str(revision)
        assert os.getxattr(mp, "user.tag").decode() == tag
        assert os.getxattr(mp, "user.expires") == b"never (fixed root catalog)"
        expected = FILES["README"] if revision == 1 else "revision 2\n"
        assert (mp / "README").read_text() == expected
        # A pinned catalog never moves.
        assert talk(rig.talk_path(), "remount sync") == "Catalog up to date\n"
        assert rig.stop(m) == TERM_EXIT

    history, catalog = "(22 - history init failure)\n", "(16 - file catalog failure)\n"
    failures = [
        ({"CVMFS_REPOSITORY_TAG": "nope"}, 22, f"no such tag: nope {history}"),
        ({"CVMFS_REPOSITORY_DATE": "2023-01-01T00:00:00Z"}, 22, history),
        ({"CVMFS_REPOSITORY_DATE": "yesterday"}, 22, history),
        # A fixed root hash is loaded without the history: unknown means no catalog.
        ({"CVMFS_ROOT_HASH": "1" * 40}, 16, f"Failed to initialize root file catalog {catalog}"),
        ({"CVMFS_ROOT_HASH": "g" * 40}, 16, f"Failed to initialize root file catalog {catalog}"),
    ]
    for params, code, message in failures:
        res = rig.launch("-o", rig.options(rig.config(**params)), FQRN, str(mp))
        assert res.rc == code, (params, res)
        assert res.stderr.endswith(message)
    res = rig.launch("-o", rig.options(rig.config(CVMFS_REPOSITORY_DATE="2001-01-01T00:00:00Z")),
                     FQRN, str(mp))
    assert res.stderr == ("no repository state as early as utc timestamp 1 Jan 2001 00:00:00 "
                          f"{history}")
    assert not mounted(mp)
    # Forty zeros, or anything not a hash by its length, is the null hash: no pin at all.
    for null in ("0" * 40, "xyz"):
        m = rig.mount(mountpoint=mp, CVMFS_ROOT_HASH=null)
        assert os.getxattr(mp, "user.revision") == b"2"
        assert os.getxattr(mp, "user.expires") != b"never (fixed root catalog)"
        assert rig.stop(m) == TERM_EXIT


def test_second_mount_of_the_same_repository(rig: Rig) -> None:
    make_repo(rig.server, OTHER, {"other": "x"})
    m = rig.mount()
    cfg = rig.config()
    # Same repository, same place: a no-op success.
    res = rig.launch("-o", rig.options(cfg), FQRN, str(m.mountpoint))
    assert res.rc == 0
    assert f"CernVM-FS: repository {FQRN} already mounted on {m.mountpoint}" in res.stderr
    # Same repository where another one is mounted: refused (the workspace is locked).
    other = rig.mount(OTHER, rig.mountpoint("other"), config=cfg)
    res = rig.launch("-o", rig.options(cfg), FQRN, str(other.mountpoint))
    assert res.rc == 20
    # Same repository elsewhere with the same cache: waits for the workspace lock.
    mp2 = rig.mountpoint("second")
    waiting = rig.popen("-o", rig.options(cfg), FQRN, str(mp2))
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.wait(1.0)
    assert not mounted(mp2)
    assert rig.stop(m) == TERM_EXIT
    assert waiting.wait(20) == 0
    assert mounted(mp2)
    second = Mounted(mp2, int(talk(rig.talk_path(), "pid")), Launch(0, "", "", waiting.pid))
    rig.pids.append(second.pid)
    assert (mp2 / "README").read_text() == FILES["README"]
    assert rig.stop(second) == TERM_EXIT
    assert rig.stop(other) == TERM_EXIT


def test_external_umount_ends_the_daemon(rig: Rig) -> None:
    m = rig.mount()
    assert (m.mountpoint / "README").exists()
    umount(m.mountpoint)
    status = wait_exit(m.pid, 30)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0


def test_crash_after_leaves_a_dead_mount(rig: Rig) -> None:
    m = rig.mount(CVMFS_STANDIN_CRASH_AFTER=30)
    seen: list[int] = []
    for _ in range(200):
        try:
            os.listdir(m.mountpoint)
        except OSError as exc:
            seen.append(exc.errno or 0)
            if exc.errno == errno.ENOTCONN:
                break
    # The request in flight when the server died fails with ECONNABORTED, later ones ENOTCONN.
    assert seen[-1] == errno.ENOTCONN
    assert set(seen) <= {errno.ECONNABORTED, errno.ENOTCONN}
    status = wait_exit(m.pid, 30)
    assert status is not None and os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGABRT
    # The kernel mount stays behind, dead; whoever supervises must detach it.
    assert mounted(m.mountpoint)
    with pytest.raises(OSError) as exc:
        (m.mountpoint / "README").read_text()  # stat alone may be answered from the kernel cache
    assert exc.value.errno == errno.ENOTCONN
    umount(m.mountpoint, MNT_DETACH)


def test_foreground(rig: Rig) -> None:
    mp = rig.mountpoint()
    proc = rig.popen("-f", "-o", rig.options(rig.config()), FQRN, str(mp))
    assert proc.stdout is not None
    assert proc.stdout.readline() == "CernVM-FS: loading Fuse module... done\n"
    assert proc.stdout.readline() == f"CernVM-FS: mounted cvmfs on {mp}\n"
    assert int(talk(rig.talk_path(), "pid")) == proc.pid
    assert (mp / "README").read_text() == FILES["README"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == TERM_EXIT
    assert not mounted(mp)


def test_premounted_file_descriptor(rig: Rig) -> None:
    mp = rig.mountpoint()
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        flags = MS_RDONLY | MS_NODEV | MS_NOSUID
        if libc.mount(b"cvmfs2", os.fsencode(mp), b"fuse", flags, data) != 0:
            raise OSError(ctypes.get_errno(), "mount")
        opts = f"config={rig.config()},libfuse=3"
        res = rig.launch("-o", opts, FQRN, f"/dev/fd/{fd}", pass_fds=(fd,))
    finally:
        # The parent must not keep the device open, or a dead server would hang readers.
        os.close(fd)
    assert res.rc == 0, res
    assert res.stdout == (
        f"CernVM-FS: pre-mounted on file descriptor {fd}\nCernVM-FS: loading Fuse module... done\n"
    )
    pid = int(talk(rig.talk_path(), "pid"))
    rig.pids.append(pid)
    assert talk(rig.talk_path(), "mountpoint") == f"/dev/fd/{fd}\n"
    assert (mp / "data" / "blob.bin").read_bytes() == FILES["data/blob.bin"]
    assert os.getxattr(mp, "user.fqrn").decode() == FQRN
    # The parent owns the unmount; the server then ends by itself.
    umount(mp)
    status = wait_exit(pid, 30)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's own are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="standin-creds-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def owned_dirs(base: Path, uid: int, gid: int) -> dict[str, str]:
    """A cache base and a reload socket directory for uid:gid, as the cvmfs package makes
    /var/lib/cvmfs and /var/run/cvmfs for its user."""
    for name in ("cache", "reload"):
        (base / name).mkdir()
        os.chown(base / name, uid, gid)
    return {"CVMFS_CACHE_BASE": str(base / "cache"), "CVMFS_RELOAD_SOCKETS": str(base / "reload")}


def premount(mp: Path) -> int:
    """Mount /dev/fuse at mp as the parent does in the pre-mounted mode; the descriptor."""
    fd = os.open("/dev/fuse", os.O_RDWR)
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"cvmfs2", os.fsencode(mp), b"fuse", MS_RDONLY | MS_NODEV | MS_NOSUID,
                  data) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, "mount")
    return fd


def test_credentials_and_grab_mountpoint(rig: Rig, open_dir: Path) -> None:
    dirs = owned_dirs(open_dir, 1000, 1001)
    cfg = rig.config(**dirs)
    # Mounting itself, the dropped user needs /dev/fuse: where it is root's only, libfuse
    # fails as in cvmfs2 (the mountpoint was grabbed before).
    mp = rig.mountpoint("grabbed")
    res = rig.launch("-o", rig.options(cfg, "uid=1000", "gid=1001", "grab_mountpoint",
                                       "system_mount"), FQRN, str(mp))
    grabbed = os.stat(mp)
    assert (grabbed.st_uid, grabbed.st_gid, stat.S_IMODE(grabbed.st_mode)) == (1000, 1001, 0o755)
    if stat.S_IMODE(os.stat("/dev/fuse").st_mode) & 0o006 != 0o006:
        assert res.rc == 4, res
        assert res.stderr == ("fuse: failed to open /dev/fuse: Permission denied\n"
                              "failed to mount file system\n")
        assert not mounted(mp)
    else:
        assert res.rc == 0, res
        rig.stop(Mounted(mp, int(talk(open_dir / "cache" / FQRN / f"cvmfs_io.{FQRN}", "pid")),
                         res))
    # Pre-mounted by its parent, it serves; what it made after dropping privileges belongs
    # to the user.
    mp = rig.mountpoint()
    fd = premount(mp)
    try:
        res = rig.launch("-o", rig.options(cfg, "uid=1000", "gid=1001", "libfuse=3"), FQRN,
                         f"/dev/fd/{fd}", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert res.rc == 0, res
    assert "CernVM-FS: running with credentials 1000:1001\n" in res.stdout
    workspace = open_dir / "cache" / FQRN
    m = Mounted(mp, int(talk(workspace / f"cvmfs_io.{FQRN}", "pid")), res)
    rig.pids.append(m.pid)
    for path in (workspace, workspace / f"cvmfs_io.{FQRN}", workspace / f"lock.{FQRN}",
                 open_dir / "reload" / f"cvmfs.{FQRN}"):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (1000, 1001), path
    assert (mp / "README").read_text() == FILES["README"]
    assert rig.stop(m) == TERM_EXIT
    umount(mp, MNT_DETACH)  # the parent owns a pre-mounted mount


def test_credentials_the_user_lacks_fail_as_in_cvmfs(rig: Rig, open_dir: Path) -> None:
    """Directories the dropped user cannot write to fail as they do for cvmfs2 2.12.0."""
    mp = rig.mountpoint()
    opts = ("uid=1000", "gid=1001")

    def launch(**params: object) -> Launch:
        return rig.launch("-o", rig.options(rig.config(**params), *opts), FQRN, str(mp))

    dirs = owned_dirs(open_dir, 1000, 1001)
    root_owned = open_dir / "root-owned"
    root_owned.mkdir(mode=0o755)
    cases = [
        # The reload socket directory: root's, or missing (the loader creates neither).
        ({**dirs, "CVMFS_RELOAD_SOCKETS": str(root_owned)}, 5,
         "Failed to initialize loader socket\n"),
        ({**dirs, "CVMFS_RELOAD_SOCKETS": str(open_dir / "nope")}, 5,
         "Failed to initialize loader socket\n"),
        # A cache base the user cannot write to, or cannot even reach (below a 0700 directory).
        ({**dirs, "CVMFS_CACHE_BASE": str(root_owned)}, 9,
         f"cannot create workspace directory {root_owned}/{FQRN} "
         "(9 - cache directory/plugin problem)\n"),
        ({**dirs, "CVMFS_CACHE_BASE": str(rig.base / "private")}, 9,
         f"cannot create workspace directory {rig.base}/private/{FQRN} "
         "(9 - cache directory/plugin problem)\n"),
    ]
    for params, code, message in cases:
        res = launch(**params)
        assert (res.rc, res.stderr) == (code, message), params
        assert "CernVM-FS: running with credentials 1000:1001\n" in res.stdout
    # A workspace left behind by root: it cannot lock it.
    (root_owned / FQRN).mkdir(mode=0o755)
    res = launch(**{**dirs, "CVMFS_CACHE_BASE": str(root_owned)})
    assert (res.rc, res.stderr) == (9, "could not acquire workspace lock (13) "
                                       "(9 - cache directory/plugin problem)\n")
    assert not mounted(mp)


def test_missing_reload_socket_directory(rig: Rig) -> None:
    """The loader does not create CVMFS_RELOAD_SOCKETS: exit 5 before anything else."""
    mp = rig.mountpoint()
    cfg = rig.config(CVMFS_RELOAD_SOCKETS=str(rig.base / "no-such-dir"))
    res = rig.launch("-o", rig.options(cfg), FQRN, str(mp))
    assert (res.rc, res.stdout, res.stderr) == (5, "", "Failed to initialize loader socket\n")
    assert not (rig.base / "no-such-dir").exists()
    assert not mounted(mp)


def test_unreachable_server_mounts_what_the_cache_has(rig: Rig) -> None:
    m = rig.mount()
    assert (m.mountpoint / "README").read_text() == FILES["README"]
    assert rig.stop(m) == TERM_EXIT
    # The server is gone: the revision last seen comes from the cache, as with cvmfs.
    gone = {"CVMFS_SERVER_URL": "http://127.0.0.1:9/@fqrn@"}
    m = rig.mount(**gone)
    assert (m.mountpoint / "README").read_text() == FILES["README"]
    assert os.getxattr(m.mountpoint, "user.revision") == b"1"
    assert rig.stop(m) == TERM_EXIT
    # Without a cache, nothing to mount.
    shutil.rmtree(rig.cache)
    res = rig.launch("-o", rig.options(rig.config(**gone)), FQRN, str(m.mountpoint))
    assert res.rc == 16 and not mounted(m.mountpoint)
