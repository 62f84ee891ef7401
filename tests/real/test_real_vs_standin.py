"""The stand-in fails (and succeeds) exactly as the real client does: the same command lines and
configurations against both, the same exit codes, messages and observable mount properties.

Every scenario here is one where the two once disagreed, or one cvmfsd depends on. What the
stand-in does not model on purpose (cvmfs2_standin/README.md, "Not honoured") is left out."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from real_helpers import big, describe, wait_for, wait_gone
from realrepo import (
    CVMFS2,
    client_params,
    prepare_dirs,
    revision_files,
    write_client_config,
)

from cvmfs2_standin.kit import make_repo, talk, write_wrapper

pytestmark = pytest.mark.real
FQRN = "alpha.real.test"
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4


@dataclass
class Backend:
    name: str
    dir: Path
    binary: Path
    params: dict[str, str]

    @property
    def mnt(self) -> Path:
        return self.dir / "mnt"

    def fresh_cache(self, owner: tuple[int, int] | None = None) -> None:
        shutil.rmtree(self.dir / "cache", ignore_errors=True)
        prepare_dirs(self.dir / "cache", self.dir / "reload")
        if owner is None:
            os.chown(self.dir / "cache", 0, 0)

    def norm(self, text: str) -> str:
        return text.replace(str(self.dir), "<dir>")


@pytest.fixture
def backends(real_world, tmp_path_factory) -> Iterator[dict[str, Backend]]:  # type: ignore[no-untyped-def]
    base = Path(real_world.base) / f"vs-{os.getpid()}-{time.monotonic_ns()}"
    out = {}
    since = time.time() - 1
    for name in ("real", "standin"):
        d = base / name
        (d / "mnt").mkdir(parents=True)
        d.chmod(0o755)
        prepare_dirs(d / "cache", d / "reload")
        if name == "real":
            url, binary = real_world.server.url, CVMFS2
        else:
            # The same content and history, in the stand-in's server layout.
            server = d / "server"
            repo = real_world.repos[FQRN]
            for n, tag in ((1, "v1"), (2, "v2")):
                rev = repo.revisions[tag]
                files: dict[str, str | bytes] = {**revision_files(FQRN, tag),
                                                 "big.bin": big(FQRN)}
                make_repo(server, FQRN, files, revision=n,
                          executable=["bin/hello"],
                          tags={tag: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                   time.gmtime(rev.published))})
            url, binary = f"file://{server}", write_wrapper(d / "cvmfs2")
        params = client_params(url, real_world.base / "public-keys", d / "cache", d / "reload")
        out[name] = Backend(name, d, binary, params)
    yield out
    for b in out.values():
        with contextlib.suppress(OSError):
            libc.umount2(str(b.mnt).encode(), 2)
    _reap_all()
    # Nothing of either client outlives the test (their helpers end once the mounts are gone).
    left = wait_gone(base, since, timeout=30)
    for p in left:  # ours beyond doubt: started by this test, argv or cwd below its directory
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not left, f"processes outlived the test: {describe(left)}"


def _reap_all() -> None:
    """The daemonized processes of these launches come back to this (subreaper) process."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def launch(b: Backend, *positionals: str, opts: str = "", pass_fds: tuple[int, ...] = (),
           **params: str) -> tuple[int, str, str]:
    conf = write_client_config(b.dir / "client.conf", {**b.params, **params})
    args = positionals or (FQRN, str(b.mnt))
    r = subprocess.run([str(b.binary), "-o", f"config={conf},fsname=cvmfs2,allow_other,"
                        f"libfuse=3{opts}", *args], capture_output=True, text=True, cwd="/",
                       timeout=120, pass_fds=pass_fds)
    return r.returncode, b.norm(r.stdout), b.norm(r.stderr)


def unmount(b: Backend) -> None:
    """Unmount and wait for the serving process to end (a plain umount ends cvmfs2)."""
    try:
        pid = int(os.getxattr(b.mnt, "user.pid"))
    except OSError:
        pid = None
    subprocess.run(["umount", str(b.mnt)], capture_output=True)
    if pid is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    _reap_all()


def both(backends: dict[str, Backend], scenario: Callable[[Backend], Any]) -> None:
    results = {name: scenario(b) for name, b in backends.items()}
    assert results["standin"] == results["real"]


SIMPLE_FAILURES: dict[str, tuple[tuple[str, ...], str, dict[str, str]]] = {
    # name: (positionals, extra options, parameters)
    "missing mountpoint": ((FQRN, "<dir>/nope"), "", {}),
    "missing reload socket directory": ((), "", {"CVMFS_RELOAD_SOCKETS": "<dir>/nope"}),
    "repository does not exist": (("nosuch.real.test", "<dir>/mnt"), "", {}),
    "empty proxy": ((), "", {"CVMFS_HTTP_PROXY": ""}),
    "unknown tag": ((), "", {"CVMFS_REPOSITORY_TAG": "nosuchtag"}),
    "date before the history": ((), "", {"CVMFS_REPOSITORY_DATE": "2001-01-01T00:00:00Z"}),
    "invalid date": ((), "", {"CVMFS_REPOSITORY_DATE": "yesterday"}),
    "unknown root hash": ((), "", {"CVMFS_ROOT_HASH": "1" * 40}),
    "invalid libfuse": ((), ",libfuse=7", {}),
    "third positional": ((FQRN, "<dir>/mnt", "extra"), "", {}),
    "open files above the hard limit": ((), ",system_mount", {"CVMFS_NFILES": "HARD+1"}),
}


@pytest.mark.parametrize("name", list(SIMPLE_FAILURES))
def test_same_failure(backends: dict[str, Backend], name: str) -> None:
    positionals, opts, params = SIMPLE_FAILURES[name]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if params.get("CVMFS_NFILES") == "HARD+1":
        if hard == resource.RLIM_INFINITY:
            pytest.skip("no hard RLIMIT_NOFILE here")
        params = {"CVMFS_NFILES": str(hard + 1)}

    def scenario(b: Backend) -> tuple[int, str, str]:
        args = tuple(p.replace("<dir>", str(b.dir)) for p in positionals)
        got = launch(b, *args, opts=opts,
                     **{k: v.replace("<dir>", str(b.dir)) for k, v in params.items()})
        assert not os.path.ismount(b.mnt)
        return got

    both(backends, scenario)


def test_same_mount_properties(backends: dict[str, Backend]) -> None:
    def scenario(b: Backend) -> dict[str, Any]:
        rc, out, err = launch(b)
        assert rc == 0, (b.name, out, err)
        try:
            mp = b.mnt
            vfs = os.statvfs(mp)
            names = os.listxattr(mp)
            workspace = b.dir / "cache" / "shared"
            sock = workspace / f"cvmfs_io.{FQRN}"
            before = os.getxattr(mp / "README", "user.lhash").decode()
            (mp / "README").read_bytes()
            return {
                "launch": (rc, out, err),
                "mountinfo": [b.norm(line.split(" - ")[1]) for line in
                              Path("/proc/self/mountinfo").read_text().splitlines()
                              if line.split()[4] == str(mp)],
                "statvfs": (vfs.f_bsize, vfs.f_frsize, vfs.f_blocks, vfs.f_files, vfs.f_ffree,
                            vfs.f_namemax),
                "ls -a root": sorted(subprocess.run(["ls", "-a", str(mp)], capture_output=True,
                                                    text=True).stdout.split()),
                "ls -a sub": subprocess.run(["ls", "-a", str(mp / "sub")], capture_output=True,
                                            text=True).stdout.split(),
                "listxattr twice each": len(names) == 2 * len(set(names)),
                "listxattr names": sorted(set(names)),
                "lhash before and after open": (before, os.getxattr(mp / "README", "user.lhash")
                                                != before.encode()),
                "revision": os.getxattr(mp, "user.revision"),
                "repo_counters": os.getxattr(mp, "user.repo_counters"),
                "talk": {c: b.norm(talk(sock, c)) for c in ("revision", "mountpoint",
                                                            "cache instance", "cleanup 0",
                                                            "remount", "proxy info")},
                "cwd is the workspace": os.readlink(
                    f"/proc/{int(os.getxattr(mp, 'user.pid'))}/cwd") == str(workspace),
            }
        finally:
            unmount(b)

    both(backends, scenario)


def test_same_pins_and_null_hash(backends: dict[str, Backend], real_world) -> None:  # type: ignore[no-untyped-def]
    repo = real_world.repos[FQRN]
    pins = {"CVMFS_REPOSITORY_TAG": "v1", "CVMFS_REPOSITORY_DATE": repo.date_between(),
            "CVMFS_ROOT_HASH": "0" * 40}

    def scenario(b: Backend) -> dict[str, Any]:
        out = {}
        for key, value in pins.items():
            rc, _, err = launch(b, **{key: value})
            assert rc == 0, (b.name, key, err)
            try:
                out[key] = {a: os.getxattr(b.mnt, f"user.{a}")
                            for a in ("revision", "tag", "expires")}
                out[key]["README"] = (b.mnt / "README").read_text()
            finally:
                unmount(b)
        # The expiry counts minutes from the mount: only "pinned or not" compares.
        out["CVMFS_ROOT_HASH"]["expires"] = out["CVMFS_ROOT_HASH"]["expires"].isdigit()
        return out

    both(backends, scenario)


def test_same_exit_after_sigterm(backends: dict[str, Backend]) -> None:
    def scenario(b: Backend) -> tuple[int, bool]:
        assert launch(b)[0] == 0
        pid = int(os.getxattr(b.mnt, "user.pid"))
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)  # ours: this process is a subreaper
        mounted = os.path.ismount(b.mnt)
        _reap_all()
        return os.waitstatus_to_exitcode(status), mounted

    both(backends, scenario)


def test_same_offline_mount_from_the_cache(backends: dict[str, Backend]) -> None:
    def scenario(b: Backend) -> tuple[int, bytes]:
        b.fresh_cache(owner=None)
        assert launch(b)[0] == 0
        unmount(b)
        rc, _, _ = launch(b, CVMFS_SERVER_URL="http://127.0.0.1:9/@fqrn@")
        try:
            return rc, os.getxattr(b.mnt, "user.revision")
        finally:
            unmount(b)

    both(backends, scenario)


def premounted(b: Backend, opts: str) -> tuple[int, str, str, str]:
    """Launch on a /dev/fuse descriptor this process mounted (what lets a dropped user serve
    where /dev/fuse is root's only); the result and how a first stat fares."""
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        data = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"cvmfs2", str(b.mnt).encode(), b"fuse", MS_RDONLY | MS_NODEV | MS_NOSUID,
                      data) != 0:
            raise OSError(ctypes.get_errno(), "mount")
        rc, out, err = launch(b, FQRN, f"/dev/fd/{fd}", opts=opts, pass_fds=(fd,))
    finally:
        os.close(fd)
    try:
        os.stat(b.mnt / "README")
        first = "ok"
    except OSError as exc:
        first = errno.errorcode[exc.errno or 0]
    pid = None
    with contextlib.suppress(OSError):
        pid = int(os.getxattr(b.mnt, "user.pid"))
    libc.umount2(str(b.mnt).encode(), 2)
    if pid is not None:
        wait_for(f"cvmfs2 {pid} to end", lambda: _exited(pid))
    _reap_all()
    return rc, out, err, first


def _exited(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")


def test_same_failures_of_the_dropped_user(backends: dict[str, Backend]) -> None:
    import pwd

    try:
        user = pwd.getpwnam("cvmfs")
    except KeyError:
        pytest.skip("no cvmfs user here")
    opts = f",uid={user.pw_uid},gid={user.pw_gid}"

    def scenario(b: Backend) -> dict[str, Any]:
        out = {}
        root_owned = b.dir / "root-owned"
        root_owned.mkdir(mode=0o755, exist_ok=True)
        b.fresh_cache(owner=(user.pw_uid, user.pw_gid))
        out["prepared"] = premounted(b, opts)
        # Mounting itself, the user needs /dev/fuse (root's only in many containers).
        out["mounting itself"] = launch(b, opts=opts)
        unmount(b)
        saved = dict(b.params)
        try:
            b.params["CVMFS_RELOAD_SOCKETS"] = str(root_owned)
            out["root-owned reload directory"] = premounted(b, opts)
            b.params["CVMFS_RELOAD_SOCKETS"] = str(b.dir / "reload")
            b.params["CVMFS_CACHE_BASE"] = str(root_owned)
            out["root-owned cache base"] = premounted(b, opts)
            (root_owned / "shared").mkdir(mode=0o755, exist_ok=True)
            out["root-owned workspace"] = premounted(b, opts)
        finally:
            b.params.clear()
            b.params.update(saved)
            b.fresh_cache(owner=(user.pw_uid, user.pw_gid))
        return out

    both(backends, scenario)
