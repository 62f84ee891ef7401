"""The real client through cvmfsd: first access by every kind of system call, canonical paths,
a storm on cold repositories, a repository that does not exist, the admin's view of real
mounts, and the serving process's credentials."""

from __future__ import annotations

import errno
import os
import pwd
import random
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import Daemon, mounts_under, run_py
from real_helpers import big, ctl_json, cvmfsctl, serving_pid, xattr
from realrepo import CVMFS_USER, revision_files

pytestmark = pytest.mark.real

FIRST_ACCESS = {
    "stat": "import os,sys; print(os.stat(sys.argv[1]+'/README').st_size)",
    "open_read": "import sys; print(open(sys.argv[1]+'/README').read(), end='')",
    "listdir": "import os,sys; print(sorted(os.listdir(sys.argv[1])))",
    "chdir": "import os,sys; os.chdir(sys.argv[1]); print(open('README').read(), end='')",
    "getxattr": "import os,sys; print(os.getxattr(sys.argv[1], 'user.fqrn').decode())",
    "realpath": "import os,sys; print(os.path.realpath(sys.argv[1]+'/sub/deeper/nested'))",
}


def test_first_access_by_every_syscall(daemon: Daemon) -> None:
    repos = list(daemon.env.repos)
    for (kind, code), repo in zip(FIRST_ACCESS.items(), repos, strict=False):
        path = daemon.path(repo)
        result = run_py(code, str(path))  # a fresh process that never saw the path
        assert result.returncode == 0, f"{kind} on {repo}: {result.stderr}"
        out = result.stdout.strip()
        readme = revision_files(repo, "v2")["README"]
        expected = {
            "stat": str(len(readme)),
            "open_read": readme.strip(),
            "listdir": str(sorted(["README", "big.bin", "bin", "files", "sub", "v2only.txt"])),
            "chdir": readme.strip(),
            "getxattr": repo,
            "realpath": f"{path}/sub/deeper/nested",  # canonical: no staging path, no link
        }[kind]
        assert out == expected, (kind, repo)
    # execve of a file in a repository nobody looked at yet.
    repo = repos[len(FIRST_ACCESS)]
    result = subprocess.run([str(daemon.path(repo) / "bin" / "hello")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hello from {repo}"
    daemon.wait_mounted(*repos[:len(FIRST_ACCESS) + 1])  # cvmfs2 answers before the line
    attempts = daemon.mount_attempts()
    assert sorted(a["repo"] for a in attempts) == sorted(repos[:len(FIRST_ACCESS) + 1])
    assert {a["result"] for a in attempts} == {"mounted"}, attempts
    # Every repository is served by a process of its own, which is the one cvmfsd reported.
    for a in attempts:
        assert serving_pid(daemon.path(a["repo"])) == a["serving_pid"]


def test_content_and_canonical_paths(daemon: Daemon) -> None:
    repo = "alpha.real.test"
    path = daemon.path(repo)
    # The 10 MiB file, byte for byte, and the files of revision 2 with their modes.
    assert (path / "big.bin").read_bytes() == big(repo)
    for rel, text in revision_files(repo, "v2").items():
        assert (path / rel).read_text() == text, rel
    assert os.access(path / "bin" / "hello", os.X_OK)
    assert not os.access(path / "README", os.X_OK)
    assert xattr(path, "revision") == "2"
    assert xattr(path, "root_hash") == daemon.env.repos[repo].revisions["v2"].root_hash
    # pwd -P and getcwd inside a nested directory name the path under the root.
    nested = path / "sub" / "deeper" / "nested"
    result = subprocess.run(["sh", "-c", "cd \"$1\" && pwd -P", "sh", str(nested)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == str(nested), result
    result = run_py("import os,sys; os.chdir(sys.argv[1]); os.chdir('..'); print(os.getcwd())",
                    str(nested))
    assert result.stdout.strip() == str(nested.parent), result
    assert os.listdir(daemon.root) == [repo]
    # Mounted at its final path: the kernel's mount table shows no staging path for it.
    assert [m for m in mounts_under(daemon.env.tmp) if repo in m] == [str(path)]
    # Read-only, like every cvmfs mount.
    with pytest.raises(OSError) as exc:
        (path / "new").write_text("x")
    assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


STORM_WORKER = """
import os, sys, random
root, go, seed, repos = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
random.Random(seed).shuffle(repos)
os.read(int(go), 1)  # released together
out = []
for repo in repos:
    try:
        st = os.stat(os.path.join(root, repo, "README"))
        out.append(f"{repo} ok {os.getxattr(os.path.join(root, repo), 'user.pid').decode()}")
    except OSError as exc:
        out.append(f"{repo} err {exc.errno}")
print("\\n".join(out))
"""


def test_storm_boots_each_repository_once(daemon: Daemon) -> None:
    repos = list(daemon.env.repos)[-4:]
    read_end, write_end = os.pipe()
    workers = [subprocess.Popen([sys.executable, "-c", STORM_WORKER, str(daemon.root),
                                 str(read_end), str(i), *repos], pass_fds=(read_end,),
                                stdout=subprocess.PIPE, text=True) for i in range(24)]
    os.close(read_end)
    os.write(write_end, b"g" * len(workers))
    os.close(write_end)
    results = [w.communicate(timeout=120)[0].strip().split("\n") for w in workers]
    assert [w.returncode for w in workers] == [0] * len(workers)
    pids: dict[str, set[str]] = {r: set() for r in repos}
    for lines in results:
        for line in lines:
            repo, status, value = line.split()
            assert status == "ok", line  # every access succeeds, the first ones included
            pids[repo].add(value)
    # Exactly one serving process per repository, seen by all 24 processes alike.
    assert all(len(p) == 1 for p in pids.values()), pids
    daemon.wait_mounted(*repos)  # cvmfs2 answers before the daemon logs the mount
    attempts = daemon.mount_attempts()
    assert sorted(a["repo"] for a in attempts) == sorted(repos)
    for a in attempts:
        assert pids[a["repo"]] == {str(a["serving_pid"])}
        assert psutil.pid_exists(a["serving_pid"])


def test_nonexistent_repository(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = start_daemon(backoff_initial=60.0)
    name = "nosuch.real.test"
    rng = random.Random(7)
    for _ in range(30):
        with pytest.raises(OSError) as exc:
            os.stat(d.path(name) / rng.choice(["", "README", "sub/hello.txt"]))
        assert exc.value.errno == errno.ENOENT
    attempt, = d.logged_attempts(name)  # one boot: the rest within the backoff
    assert attempt["result"] == "failed" and attempt["exit_code"] == 16, attempt
    assert "Failed to initialize root file catalog (16 - file catalog failure)" in \
        attempt["stderr_tail"]
    assert name not in os.listdir(d.root)
    # A repository that exists still mounts meanwhile.
    assert (d.path("beta.real.test") / "README").exists()


def test_cvmfsctl_shows_the_real_mounts(daemon: Daemon) -> None:
    repo = "gamma.real.test"
    assert (daemon.path(repo) / "big.bin").read_bytes() == big(repo)
    pid = serving_pid(daemon.path(repo))
    status = cvmfsctl(daemon.run_dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    line = next(x for x in status.stdout.splitlines() if repo in x)
    assert "mounted" in line and f"pid {pid}" in line and "revision 2" in line, line
    assert "proxy DIRECT" in line and "1 boot" in line and "cache 10." in line, line
    listing = cvmfsctl(daemon.run_dir, "list")
    assert listing.returncode == 0 and repo in listing.stdout, listing
    entry, = (r for r in ctl_json(daemon.run_dir, "list")["repositories"] if r["name"] == repo)
    expected = daemon.env.repos[repo].revisions["v2"]
    assert entry["state"] == "mounted" and entry["serving_pid"] == pid
    assert entry["revision"] == expected.number == 2
    assert entry["root_hash"] == expected.root_hash
    assert entry["proxy"] == "DIRECT"
    assert entry["host"] == f"{daemon.env.world.server.url}/{repo}"
    assert entry["client_version"].startswith("2.12.0"), entry
    assert entry["nioerr"] == 0
    # The 10 MiB file went through the cache: the talk socket's `cache size` says so.
    assert entry["cache_used_bytes"] >= len(big(repo)), entry


def test_serving_process_is_not_root(daemon: Daemon) -> None:
    try:
        user = pwd.getpwnam(CVMFS_USER)
    except KeyError:
        pytest.skip(f"no {CVMFS_USER} user here: cvmfs2 keeps root (README, Running it)")
    repo = "delta.real.test"
    assert (daemon.path(repo) / "README").exists()
    proc = psutil.Process(serving_pid(daemon.path(repo)))
    uids, gids = proc.uids(), proc.gids()
    # cvmfs2 switches its effective ids (what every access is checked against, and with them
    # its effective capabilities go); it keeps real and saved ids, exactly as under the system
    # mount helper, which passes the same uid=/gid= options.
    assert uids.effective == user.pw_uid and gids.effective == user.pw_gid, (uids, gids)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    cap_eff = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff"))
    assert int(cap_eff, 16) == 0, status
    # Still readable for everyone, the files as they were published.
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "cat", str(daemon.path(repo) / "README")],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == revision_files(repo, "v2")["README"], result
