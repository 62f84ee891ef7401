"""Real CernVM-FS repositories for tests and benchmarks, made with `cvmfs_swissknife` alone.

The calls are those of cvmfs's own `cvmfs_server_{mkfs,publish,ssl,common}.sh` (worked example:
`../shared/cvmfs2/make-test-repo.sh`), with every path under one base directory: storage (what
the HTTP server serves), spool, keys, content. Nothing is written to /etc/cvmfs, /var/spool or
/srv. The storage directory is served on loopback by a Python http.server that this module
starts and stops by its pid.

    with RepoServer(base / "storage") as server:
        repos = make_repos(base, ["a.test.repo", "b.test.repo"], server)
        write_client_config(base / "client.conf", server, repos.values(), cache=..., reload=...)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

CVMFS2 = Path("/usr/bin/cvmfs2")
SWISSKNIFE = Path("/usr/bin/cvmfs_swissknife")
PUBLISH = Path("/usr/bin/cvmfs_publish")
BIG_SIZE = 10 * 1024 * 1024
# What the cvmfs package's postinst creates; the mount helper drops cvmfs2 to it.
CVMFS_USER = "cvmfs"


def missing_tools() -> str | None:
    """Why the real tier cannot run here, or None."""
    for tool in (CVMFS2, SWISSKNIFE, PUBLISH):
        if not os.access(tool, os.X_OK):
            return (f"{tool} is not installed: the real CernVM-FS client comes from "
                    "../shared/cvmfs2/*.tar.xz, which .ci/setup installs when it is present")
    if shutil.which("openssl") is None:
        return "openssl is not installed (repository keys are made with it)"
    return None


def client_version(cvmfs2: Path = CVMFS2) -> str:
    """What `cvmfs2 --version` says, e.g. 2.12.0 ("" if it does not run)."""
    try:
        out = subprocess.run([str(cvmfs2), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except OSError:
        return ""
    found = re.search(r"version (\S+)", out)
    return found.group(1) if found else ""


def big_content(fqrn: str) -> bytes:
    """The 10 MiB file of a repository: deterministic per name, incompressible."""
    out = bytearray()
    block = hashlib.sha256(fqrn.encode()).digest()
    while len(out) < BIG_SIZE:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out)


def revision_files(fqrn: str, tag: str) -> dict[str, str]:
    """The small files of one revision (the big file and the executable are the same in both)."""
    files = {
        "README": f"This is {fqrn}, revision {tag}\n",
        "sub/hello.txt": f"hello from {fqrn} sub ({tag})\n",
        "sub/deeper/nested/file.txt": f"deeper file of {fqrn}\n",
        "bin/hello": f'#!/bin/sh\necho "hello from {fqrn}"\n',
    }
    files.update({f"files/f{i:02d}.txt": f"file {i} of {fqrn}\n" for i in range(20)})
    if tag == "v2":
        files["v2only.txt"] = "only in v2\n"
    return files


@dataclass
class Revision:
    number: int
    tag: str
    root_hash: str
    published: int          # the manifest's publish time (T), seconds since the epoch


@dataclass
class Repo:
    fqrn: str
    public_key: Path
    revisions: dict[str, Revision] = field(default_factory=dict)

    def files(self, tag: str) -> dict[str, str]:
        return revision_files(self.fqrn, tag)

    def date_between(self) -> str:
        """An ISO-8601 UTC time after the v1 publish and before the v2 publish."""
        t = self.revisions["v1"].published + 1
        assert t < self.revisions["v2"].published, self.revisions
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RepoServer:
    """`python -m http.server` on 127.0.0.1, a free port, serving a storage directory."""

    def __init__(self, directory: Path, log: Path | None = None) -> None:
        self.directory = directory
        self.log = log or directory.with_name(directory.name + "-http.log")
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RepoServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            # Port 0: the kernel picks a free port, and the server says which on stdout.
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1",
                 "--directory", str(self.directory), "0"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                cwd=self.directory)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r" port (\d+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"http.server did not start: {line!r} {self.log.read_text()}")
        self.port = int(found.group(1))
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> RepoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(*args: str | Path, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    result = subprocess.run([str(a) for a in args], input=stdin, capture_output=True, cwd=cwd,
                            timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                           f"{result.stdout.decode(errors='replace')}"
                           f"{result.stderr.decode(errors='replace')}")
    return result.stdout


def _manifest(storage: Path) -> dict[str, str]:
    """The first value of each field of .cvmfspublished (the signature follows `--`)."""
    fields: dict[str, str] = {}
    for line in (storage / ".cvmfspublished").read_bytes().split(b"\n"):
        if line == b"--":
            break
        if line:
            fields.setdefault(chr(line[0]), line[1:].decode())
    return fields


@dataclass(frozen=True)
class Keys:
    """A repository's signing keys (cvmfs_server_ssl.sh): master key, its public half (what
    clients verify with), and a certificate with its key that sign the manifests."""

    prefix: Path

    @property
    def pub(self) -> Path:
        return self.prefix.with_name(self.prefix.name + ".pub")

    def path(self, ext: str) -> str:
        return f"{self.prefix}.{ext}"

    @classmethod
    def generate(cls, directory: Path, name: str, subject: str) -> Keys:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        k = cls(directory / name)
        _run("openssl", "genrsa", "-out", k.path("masterkey"), "2048")
        _run("openssl", "rsa", "-in", k.path("masterkey"), "-pubout", "-out", k.pub)
        _run("openssl", "genrsa", "-out", k.path("key"), "2048")
        _run("openssl", "req", "-new", "-subj", f"/CN={subject} CernVM-FS Release Managers",
             "-key", k.path("key"), "-out", k.path("csr"))
        _run("openssl", "x509", "-req", "-days", "3650", "-in", k.path("csr"), "-signkey",
             k.path("key"), "-out", k.path("crt"))
        Path(k.path("csr")).unlink()
        # cvmfs2 reads the public key after dropping to the cvmfs user.
        k.pub.chmod(0o444)
        return k


class _Builder:
    """One repository's storage, spool and content (cvmfs_server_mkfs/publish); its own keys
    unless given shared ones (one key pair may sign many repositories)."""

    def __init__(self, base: Path, fqrn: str, server: RepoServer,
                 keys: Keys | None = None) -> None:
        self.fqrn = fqrn
        self.server = server
        self.storage = server.directory / fqrn
        self.spool_root = base / "spool"
        # /var/spool/cvmfs/<fqrn> inside sync's mount namespace (see publish).
        self.spool = self.spool_root / "cvmfs" / fqrn
        self.keys_dir = base / "keys"
        self.given_keys = keys
        self.keys = keys or Keys(self.keys_dir / fqrn)
        self.content = base / "content" / fqrn
        self.upstream = f"local,{self.storage}/data/txn,{self.storage}"

    @property
    def pub(self) -> Path:
        return self.keys.pub

    @property
    def url(self) -> str:
        return f"{self.server.url}/{self.fqrn}"

    def make_whitelist(self) -> None:
        k = self.keys
        now = dt.datetime.now(dt.UTC)
        fingerprint = _run(PUBLISH, "hash", "-a", "sha1", "-f",
                           stdin=_run("openssl", "x509", "-in", k.path("crt"), "-outform", "der"))
        unsigned = (f"{now:%Y%m%d%H%M%S}\nE{now + dt.timedelta(days=365):%Y%m%d%H%M%S}\n"
                    f"N{self.fqrn}\n").encode() + fingerprint
        digest = _run(PUBLISH, "hash", "-a", "sha1", stdin=unsigned).strip()
        tmp = self.spool / "tmp"
        (tmp / "wl.hash").write_bytes(digest)
        _run("openssl", "pkeyutl", "-inkey", k.path("masterkey"), "-sign", "-in", tmp / "wl.hash",
             "-out", tmp / "wl.sig")
        (tmp / "whitelist").write_bytes(unsigned + b"--\n" + digest + b"\n"
                                        + (tmp / "wl.sig").read_bytes())
        _run(SWISSKNIFE, "upload", "-i", tmp / "whitelist", "-o", ".cvmfswhitelist",
             "-r", self.upstream)
        for name in ("wl.hash", "wl.sig", "whitelist"):
            (tmp / name).unlink()

    def sign(self, manifest: Path, *extra: str | Path) -> None:
        k = self.keys
        _run(SWISSKNIFE, "sign", "-c", k.path("crt"), "-k", k.path("key"), "-n", self.fqrn,
             "-u", self.url, "-m", manifest, "-t", self.spool / "tmp", "-r", self.upstream,
             "-R", self.spool / "reflog.chksum", *extra)

    @staticmethod
    def write_tree(root: Path, files: dict[str, str | bytes],
                   executable: Iterable[str] = ()) -> None:
        for rel, content in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        for rel in executable:
            (root / rel).chmod(0o755)

    def create(self) -> None:
        shutil.rmtree(self.storage, ignore_errors=True)
        shutil.rmtree(self.spool, ignore_errors=True)
        shutil.rmtree(self.content, ignore_errors=True)
        (self.spool / "tmp").mkdir(parents=True)
        (self.storage / "data" / "txn").mkdir(parents=True)
        for i in range(256):
            (self.storage / "data" / f"{i:02x}").mkdir()
        (self.spool / "repoinfo.json").write_text("{}\n")
        if self.given_keys is None:
            self.keys = Keys.generate(self.keys_dir, self.fqrn, self.fqrn)
        self.make_whitelist()
        manifest = self.spool / "tmp" / "new_manifest"
        _run(SWISSKNIFE, "create", "-t", self.spool / "tmp", "-r", self.upstream,
             "-n", self.fqrn, "-a", "sha1", "-o", manifest, "-R", self.spool / "reflog.chksum")
        self.sign(manifest, "-M", self.spool / "repoinfo.json")

    def publish(self, union: Path, scratch: Path, rdonly: Path, tag: str | None) -> Revision:
        """sync the changes of `scratch` (aufs-style) onto the published revision, tag (a
        history entry; None: none), sign."""
        manifest = self.spool / "tmp" / "manifest"
        manifest.unlink(missing_ok=True)
        base_hash = _manifest(self.storage)["C"]
        # sync keeps publish statistics in /var/spool/cvmfs/<fqrn>/stats.db, a path no option
        # moves (only /etc/cvmfs/repositories.d/<fqrn>/server.conf would): it runs in a mount
        # namespace of its own where /var/spool is this repository set's spool directory.
        _run("unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             'mount --bind "$0" /var/spool && exec "$@"', self.spool_root,
             SWISSKNIFE, "sync", "-u", union, "-s", scratch, "-c", rdonly,
             "-t", self.spool / "tmp", "-b", base_hash, "-r", self.upstream, "-w", self.url,
             "-o", manifest, "-e", "sha1", "-Z", "default", "-N", self.fqrn, "-K", self.pub,
             "-f", "aufs")
        if tag is not None:
            _run(SWISSKNIFE, "tag_edit", "-r", self.upstream, "-w", self.url,
                 "-t", self.spool / "tmp", "-m", manifest, "-p", self.pub, "-f", self.fqrn,
                 "-e", "sha1", "-x", "-a", tag, "-D", f"revision {tag}")
        self.sign(manifest)
        fields = _manifest(self.storage)
        return Revision(int(fields["S"]), tag or "", fields["C"], int(fields["T"]))

    def build(self) -> Repo:
        self.create()
        c = self.content
        empty, v1, v2, scratch = c / "empty", c / "v1", c / "v2", c / "v2-scratch"
        empty.mkdir(parents=True)
        self.write_tree(v1, {**revision_files(self.fqrn, "v1"), "big.bin": big_content(self.fqrn)},
                        executable=["bin/hello"])
        repo = Repo(self.fqrn, self.pub)
        repo.revisions["v1"] = self.publish(v1, v1, empty, "v1")
        # v2 is an aufs-style transaction on top of v1: its scratch area holds what changed.
        shutil.copytree(v1, v2, symlinks=True)
        new = revision_files(self.fqrn, "v2")
        old = revision_files(self.fqrn, "v1")
        for rel, text in new.items():
            (v2 / rel).write_text(text)
            if old.get(rel) != text:
                (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
                (scratch / rel).write_text(text)
        # Publish times are whole seconds: v2 must be at least 2 s after v1 so that a date
        # strictly between them exists for @date= pins.
        while time.time() < repo.revisions["v1"].published + 2.05:
            time.sleep(0.1)
        repo.revisions["v2"] = self.publish(v2, scratch, v1, "v2")
        # Content of both revisions lives in the storage now; the copies are not needed.
        shutil.rmtree(c)
        return repo

    def build_files(self, files: dict[str, str | bytes], executable: Iterable[str]) -> Revision:
        """One revision with exactly these files, no history."""
        self.create()
        empty, tree = self.content / "empty", self.content / "tree"
        empty.mkdir(parents=True)
        self.write_tree(tree, files, executable)
        revision = self.publish(tree, tree, empty, None)
        shutil.rmtree(self.content)
        return revision


def make_repo(base: Path, fqrn: str, server: RepoServer, files: dict[str, str | bytes],
              keys: Keys, executable: Iterable[str] = ()) -> Revision:
    """One repository with one revision of these files, signed with shared keys (what the
    benchmark needs by the hundred: no key generation, no history)."""
    return _Builder(base, fqrn, server, keys).build_files(files, executable)


def make_repos(base: Path, fqrns: Iterable[str], server: RepoServer,
               workers: int = 4) -> dict[str, Repo]:
    """Create and publish repositories (v1, then v2) below base; the server must be running,
    since swissknife's sync and tag_edit fetch the published manifest over HTTP."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "keys").mkdir(mode=0o700, exist_ok=True)
    # The keys directory holds the private keys: the cvmfs user only needs the public ones,
    # which go to a readable directory beside it.
    public = base / "public-keys"
    public.mkdir(exist_ok=True)
    names = list(fqrns)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names)))) as pool:
        repos = list(pool.map(lambda n: _Builder(base, n, server).build(), names))
    out = {}
    for repo in repos:
        dest = public / f"{repo.fqrn}.pub"
        shutil.copyfile(repo.public_key, dest)
        dest.chmod(0o444)
        out[repo.fqrn] = Repo(repo.fqrn, dest, repo.revisions)
    (base / "repos.json").write_text(json.dumps(
        {r.fqrn: {"public_key": str(r.public_key),
                  "revisions": {t: vars(v) for t, v in r.revisions.items()}}
         for r in out.values()}, indent=1))
    return out


def load_repos(base: Path) -> dict[str, Repo]:
    """The repositories make_repos made below base (from its repos.json)."""
    data = json.loads((base / "repos.json").read_text())
    return {fqrn: Repo(fqrn, Path(r["public_key"]),
                       {t: Revision(**v) for t, v in r["revisions"].items()})
            for fqrn, r in data.items()}


def nfiles() -> int:
    """CVMFS_NFILES that cvmfs2 can set: its default (131072) capped by the hard RLIMIT_NOFILE,
    since without CAP_SYS_RESOURCE a higher value makes cvmfs2 exit 3."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 131072 if hard == resource.RLIM_INFINITY else min(131072, hard)


def client_params(server_url: str, keys_dir: Path, cache: Path, reload: Path,
                  **extra: str) -> dict[str, str]:
    """Client parameters for repositories served at server_url, for `-o config=<file>`: no
    /etc/cvmfs file is read then, so what a node's default.conf sets is repeated here (the
    values of the 2.12 default.conf), with paths of this test."""
    params = {
        "CVMFS_SERVER_URL": f"{server_url}/@fqrn@",
        "CVMFS_HTTP_PROXY": "DIRECT",
        "CVMFS_KEYS_DIR": str(keys_dir),
        "CVMFS_CACHE_BASE": str(cache),
        "CVMFS_SHARED_CACHE": "yes",
        "CVMFS_QUOTA_LIMIT": "4000",
        "CVMFS_RELOAD_SOCKETS": str(reload),
        "CVMFS_NFILES": str(nfiles()),
        "CVMFS_USER": CVMFS_USER,
        "CVMFS_CHECK_PERMISSIONS": "yes",
        "CVMFS_CLAIM_OWNERSHIP": "yes",
        "CVMFS_TIMEOUT": "5",
        "CVMFS_TIMEOUT_DIRECT": "10",
        "CVMFS_MAX_RETRIES": "1",
        "CVMFS_SEND_INFO_HEADER": "no",
        "CVMFS_USE_GEOAPI": "no",
    }
    params.update(extra)
    return params


def write_client_config(path: Path, params: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by tests/real/realrepo.py\n"
                    + "".join(f"{k}={_quote(v)}\n" for k, v in params.items()))
    path.chmod(0o644)
    return path


def _quote(value: str) -> str:
    """Single-quoted for /bin/sh, which evaluates cvmfs config files."""
    return "'" + value.replace("'", "'\\''") + "'"


def prepare_dirs(cache: Path, reload: Path) -> None:
    """The cache base and the reload socket directory, owned by the cvmfs user when it exists
    (as the cvmfs package prepares /var/lib/cvmfs and /var/run/cvmfs): the loader creates
    neither the reload directory (exit 5) nor, after dropping privileges, a root-owned base."""
    import pwd

    for d in (cache, reload):
        d.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(CVMFS_USER)
            os.chown(d, user.pw_uid, user.pw_gid)
