"""A real systemd for the node-service tier: a minimal Debian tree made by debootstrap (cached
between runs), booted with systemd-nspawn, driven from the host with nsenter.

The container runs the host's Python: the interpreter's installation and the repository with
its .venv are bind-mounted read-only at the same paths, so the Debian tree needs only systemd,
FUSE and the shared libraries that this Python loads (found with dpkg, so that the tree fits
whatever Python set up the .venv). There is no host systemd here (no system bus, no machined):
`machinectl` and `systemd-run -M` cannot reach the container, so commands run inside through
`nsenter` into the namespaces of its pid 1, where `systemctl` talks to the container's manager
over its private socket.

    python tests/systemd/nspawn_machine.py build    # build (or find) the cached tree, print it

Everything the harness starts is stopped by pid; the container goes away with its pid 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CVMFSD_NSPAWN_CACHE", "/var/cache/cvmfsd-tests"))
# What the tier needs besides the host Python's libraries: systemd as pid 1 (and
# systemd-analyze), dbus for systemctl's usual paths, FUSE for cvmfsd and the stand-in.
# util-linux (unshare, mknod, useradd's friends) and coreutils are in every minbase tree.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "fuse3", "libfuse3-3")
# Bumped when the way the tree is made changes (forces a rebuild like a changed package list).
LAYOUT = 1
BUILD_TIMEOUT = float(os.environ.get("CVMFSD_NSPAWN_BUILD_TIMEOUT", "300"))
BOOT_TIMEOUT = 120.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """This machine cannot run the tier; the message says why (the tests skip with it)."""


# --- the Debian tree ------------------------------------------------------------------------

def host_codename() -> str:
    """The tree is the host's own release: the host Python's libraries then exist there in the
    same versions."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    if "debian" not in (fields.get("ID", ""), *fields.get("ID_LIKE", "").split()):
        raise Unavailable(f"the host is not Debian ({fields.get('ID', 'unknown')}): debootstrap "
                          "builds the tree from the host's own release")
    codename = fields.get("VERSION_CODENAME", "")
    if not codename:
        raise Unavailable("no VERSION_CODENAME in /etc/os-release")
    return codename


def _source_entries() -> Iterator[tuple[list[str], str, list[str], list[str]]]:
    """(types, uri, suites, components) of every apt source apt itself reads."""
    files = [Path("/etc/apt/sources.list")]
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        files += sorted(p for p in directory.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                last = ""
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and last:
                        fields[last] += " " + line.strip()
                        continue
                    key, _, value = line.partition(":")
                    last = key.strip().lower()
                    fields[last] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    yield (fields.get("types", "").split(), uri, fields.get("suites", "").split(),
                           fields.get("components", "").split())
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3:
                    yield [words[0]], words[1], [words[2]], words[3:]


def apt_mirror(codename: str) -> str:
    """The mirror apt already uses for the release's main archive (never a hard-coded host)."""
    for types, uri, suites, components in _source_entries():
        if "deb" in types and codename in suites and "main" in components \
                and uri.split(":", 1)[0] in ("http", "https", "file"):
            return uri
    raise Unavailable(f"no apt source for {codename} main in /etc/apt/sources.list(.d)")


def _apt_proxy() -> dict[str, str]:
    """debootstrap does not read apt's configuration: pass apt's proxy on, if it has one."""
    env: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for scheme in ("http", "https"):
            out = subprocess.run(["apt-config", "shell", "P", f"Acquire::{scheme}::Proxy"],
                                 capture_output=True, text=True, timeout=30).stdout
            match = re.match(r"P='(.*)'", out.strip())
            if match and match.group(1) not in ("", "DIRECT"):
                env[f"{scheme}_proxy"] = match.group(1)
    return env


# The host Python's native code, loaded the way the daemon, cvmfsctl, the stand-in and the
# test helpers load it, plus the standard modules they may import late.
_LOADER = r"""
import importlib, json, pkgutil, sys
repo = sys.argv[1]
# The stand-in runs as a script: its modules import each other as top-level modules.
sys.path[:0] = [repo, repo + "/tests", repo + "/cvmfs2_standin"]
import cvmfsd
for info in pkgutil.walk_packages(cvmfsd.__path__, "cvmfsd."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
for info in pkgutil.iter_modules([repo + "/cvmfs2_standin"]):
    if info.name not in ("kit", "__init__"):  # the kit is the package's side
        importlib.import_module(info.name)
importlib.import_module("cvmfs2_standin.kit")
for name in ("ctypes", "hashlib", "ssl", "uuid", "zlib", "lzma", "bz2", "json", "socket",
             "select", "fcntl", "resource", "termios", "pyfuse3", "trio", "psutil", "structlog",
             "prometheus_client", "tomllib", "sqlite3", "decimal", "_posixsubprocess"):
    importlib.import_module(name)
files = {m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
maps = {line.split()[-1] for line in open("/proc/self/maps") if "/" in line.split()[-1]}
print(json.dumps({"files": sorted(files | maps), "executable": sys.executable,
                  "base_prefix": sys.base_prefix, "prefix": sys.prefix}))
"""


@dataclass(frozen=True)
class Runtime:
    """How the host Python gets into the container: read-only binds, and packages for the
    files that come from the system (libraries, or the whole Python if it is Debian's)."""

    binds: tuple[str, ...]
    packages: tuple[str, ...]


def python_runtime(python: str) -> Runtime:
    try:
        out = subprocess.run([python, "-c", _LOADER, str(REPO_ROOT)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"cannot inspect {python}: {exc}") from None
    info = json.loads(out)
    base = os.path.realpath(info["base_prefix"])
    prefix = os.path.realpath(info["prefix"])
    binds = [str(REPO_ROOT)]
    bound = [str(REPO_ROOT), prefix]
    if not prefix.startswith(str(REPO_ROOT) + "/"):
        binds.append(prefix)
    if not base.startswith("/usr"):  # pyenv, /opt, ...: bind it; Debian's comes as packages
        binds.append(base)
        bound.append(base)
    loaded = {os.path.realpath(f) for f in info["files"] if os.path.exists(f)}
    if base.startswith("/usr"):
        loaded.add(os.path.realpath(info["executable"]))
    system = sorted(f for f in loaded if not any(f.startswith(b + "/") for b in bound))
    return Runtime(tuple(binds), tuple(sorted(_owning_packages(system))))


def _owning_packages(paths: Sequence[str]) -> set[str]:
    if not paths:
        return set()
    if shutil.which("dpkg") is None:
        raise Unavailable("no dpkg: cannot tell which packages the host Python's libraries need")
    packages: set[str] = set()
    missing = list(paths)
    # dpkg knows some files under /lib (merged /usr): ask again without the /usr prefix.
    for attempt in (lambda p: p, lambda p: p.removeprefix("/usr")):
        query = [attempt(p) for p in missing]
        out = subprocess.run(["dpkg", "-S", *query], capture_output=True, text=True, timeout=120)
        found: set[str] = set()
        for line in out.stdout.splitlines():
            owners, _, path = line.partition(": ")
            if path in query and not owners.startswith("diversion"):
                packages.update(o.strip().split(":")[0] for o in owners.split(","))
                found.add(path)
        missing = [p for p, q in zip(missing, query, strict=True) if q not in found]
    if missing:
        raise Unavailable("files of the host Python that no package provides (cannot be put in "
                          f"the tree): {', '.join(missing[:5])}")
    return packages


@dataclass(frozen=True)
class Tree:
    path: Path
    codename: str
    mirror: str
    packages: tuple[str, ...]
    binds: tuple[str, ...]
    built_s: float | None  # None: found in the cache

    @property
    def lock(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")


def _spec(codename: str, mirror: str, packages: Sequence[str]) -> tuple[str, str]:
    spec = json.dumps({"layout": LAYOUT, "variant": "minbase", "suite": codename,
                       "mirror": mirror, "packages": sorted(packages)}, sort_keys=True)
    return spec, hashlib.sha256(spec.encode()).hexdigest()[:16]


def ensure_tree(python: str = sys.executable, log: Path | None = None) -> Tree:
    """The cached tree for this host and this Python, built if missing or if its package list
    changed (the stamp beside it holds the exact spec). Raises Unavailable with the reason."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (debootstrap, systemd-nspawn, FUSE)")
    for tool, package in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container"),
                          ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            raise Unavailable(f"no {tool} (apt package {package}; .ci/setup installs it)")
    if not os.path.exists("/dev/fuse"):
        raise Unavailable("no /dev/fuse")
    codename = host_codename()
    mirror = apt_mirror(codename)
    runtime = python_runtime(python)
    packages = tuple(sorted(set(BASE_PACKAGES) | set(runtime.packages)))
    spec, digest = _spec(codename, mirror, packages)
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"rootfs-{codename}-{digest}"
    stamp = path.with_name(path.name + ".stamp")
    with open(CACHE / "build.lock", "w") as build_lock:
        fcntl.flock(build_lock, fcntl.LOCK_EX)  # one build at a time; the others wait for it
        if path.is_dir() and stamp.is_file() and stamp.read_text() == spec:
            return Tree(path, codename, mirror, packages, runtime.binds, None)
        _remove_stale()
        started = time.monotonic()
        _debootstrap(codename, mirror, packages, path, log or CACHE / "build.log")
        stamp.write_text(spec)
        return Tree(path, codename, mirror, packages, runtime.binds, time.monotonic() - started)


def _remove_stale() -> None:
    """Trees of older specs, unless a running tier holds them (a shared lock while booted)."""
    for stamp in CACHE.glob("rootfs-*.stamp"):
        tree = stamp.with_suffix("")
        with open(tree.with_name(tree.name + ".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            stamp.unlink()
            shutil.rmtree(tree, ignore_errors=True)


def _debootstrap(codename: str, mirror: str, packages: Sequence[str], path: Path,
                 log: Path) -> None:
    work = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)  # a tree whose stamp was never written
    for old in CACHE.glob(f"{path.name}.tmp-*"):  # left by a build that was killed
        shutil.rmtree(old, ignore_errors=True)
    cmd = ["debootstrap", "--variant=minbase", "--components=main",
           f"--include={','.join(packages)}", codename, str(work), mirror]
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env={**os.environ, **_apt_proxy()},
                                    start_new_session=True)
            rc = proc.wait(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            shutil.rmtree(work, ignore_errors=True)
            raise Unavailable(f"debootstrap did not finish within {BUILD_TIMEOUT:.0f} s "
                              f"(CVMFSD_NSPAWN_BUILD_TIMEOUT); log: {log}") from None
    if rc != 0:
        shutil.rmtree(work, ignore_errors=True)
        tail = " | ".join(log.read_text().splitlines()[-3:])
        raise Unavailable(f"debootstrap failed ({rc}; no network to the mirror?): {tail}; "
                          f"log: {log}")
    work.rename(path)


# --- the container -------------------------------------------------------------------------

def _cgroup_roots() -> list[Path]:
    """Where nspawn, running without a host systemd, makes its cgroups: the unified hierarchy,
    and on a hybrid host also the name=systemd one."""
    base = Path("/sys/fs/cgroup")
    kinds = {line.split()[4]: line.split(" - ")[1].split()[0]
             for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    if kinds.get(str(base)) == "cgroup2":
        return [base]
    if kinds.get(str(base / "unified")) == "cgroup2":
        return [p for p in (base / "unified", base / "systemd") if str(p) in kinds]
    raise Unavailable("no cgroup v2 hierarchy: the container's systemd needs one to enforce "
                      "DevicePolicy= (BPF device programs)")


@dataclass
class Machine:
    """A booted container. `run` executes a command inside (all its namespaces), `path` reaches
    a file in its mount namespace from the host."""

    tree: Tree
    name: str
    workdir: Path
    binds_rw: tuple[str, ...] = ()
    nspawn: subprocess.Popen[bytes] | None = None
    leader: int = 0
    cgroups: list[Path] = field(default_factory=list)
    _lock: int | None = None

    @property
    def console(self) -> Path:
        return self.workdir / f"{self.name}.console"

    def boot(self) -> None:
        self._lock = os.open(self.tree.lock, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock, fcntl.LOCK_SH)  # the tree is not removed under us
        # nspawn puts its "supervisor" and "payload" cgroups below its own cgroup: give it one
        # of ours, or they land in the root cgroup, shared with any other run.
        self.cgroups = [root / self.name for root in _cgroup_roots()]
        for cg in self.cgroups:
            cg.mkdir()
        enter = "; ".join(f"echo $$ > {cg}/cgroup.procs" for cg in self.cgroups)
        cmd = [
            "systemd-nspawn", "--directory", str(self.tree.path), f"--machine={self.name}",
            # No host systemd to register with or to make a scope: stay in our own cgroup.
            "--register=no", "--keep-unit",
            # The tree stays pristine (and shareable): every change goes to a tmpfs overlay.
            "--volatile=overlay", "--link-journal=no", "--resolv-conf=off", "--timezone=off",
            "--console=read-only",
            # cvmfsd's root and cvmfs2 need FUSE.
            "--bind=/dev/fuse",
            # systemd enforces DevicePolicy= with BPF device programs: let it load them.
            "--system-call-filter=bpf",
            *(f"--bind-ro={p}" for p in self.tree.binds),
            *(f"--bind={p}" for p in self.binds_rw),
            "--boot",
        ]
        with open(self.console, "wb") as console:
            self.nspawn = subprocess.Popen(
                ["sh", "-c", f'{enter}; exec "$@"', "sh", *cmd], stdin=subprocess.DEVNULL,
                stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
                # A v2-only systemd in the container: a hybrid host's v1 devices hierarchy
                # is read-only there, so DevicePolicy= would silently not be enforced.
                env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"})
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self.leader:
            self._alive_or_raise()
            self.leader = self._find_leader()
            if time.monotonic() > deadline:
                raise Unavailable(f"systemd-nspawn started no container: {self._console_tail()}")
            time.sleep(0.05)
        state = ""
        while time.monotonic() < deadline:
            self._alive_or_raise()
            # --wait returns once the boot finished; it fails while the manager is not up yet.
            out = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                           timeout=max(1.0, deadline - time.monotonic()))
            state = out.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise Unavailable(f"the container's systemd did not finish booting ({state!r}): "
                          f"{self._console_tail()}")

    def _find_leader(self) -> int:
        assert self.nspawn is not None
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children") \
                    .read_text().split():
                status = Path(f"/proc/{child}/status").read_text()
                nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                if nspid and nspid.group(1).split()[-1] == "1" and len(nspid.group(1).split()) > 1:
                    return int(child)
        return 0

    def _alive_or_raise(self) -> None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise Unavailable(f"systemd-nspawn exited {self.nspawn.returncode}: "
                              f"{self._console_tail()}")

    def _console_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.console.read_text(errors="replace").splitlines()
            return " | ".join(line.strip() for line in lines[-6:]) + f" (console: {self.console})"
        return "(no console output)"

    def command(self, args: Sequence[str]) -> list[str]:
        # nsenter's own environment would leak the host's (PATH with pyenv shims, ...).
        return ["nsenter", f"--target={self.leader}", "--all", "--", "env", "-i", f"PATH={PATH}",
                "LANG=C.UTF-8", "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", *args]

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(self.command(args), capture_output=True, text=True, input=input,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout}"
                                 f"{out.stderr}")
        return out

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kw)  # type: ignore[arg-type]

    def kill(self, pid: int, signame: str) -> None:
        """Signal a process of the container by its pid there (the shell's kill: minbase
        has no procps)."""
        self.run(["sh", "-c", f"kill -{signame} {int(pid)}"])

    def popen(self, args: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(args), stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]

    def path(self, path: str | Path) -> Path:
        """A path in the container's mount namespace, seen from the host (through pid 1's
        root). Never for paths under a FUSE root that may not answer: the host would wait."""
        return Path(f"/proc/{self.leader}/root") / str(path).lstrip("/")

    def shutdown(self, timeout: float = 90) -> None:
        """Power off (the container's systemd stops every unit), else end nspawn by its pid:
        its pid 1 goes, and with it every process and mount in the container."""
        try:
            if self.nspawn is not None and self.nspawn.poll() is None:
                if self.leader:
                    with contextlib.suppress(subprocess.SubprocessError, OSError):
                        self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=30)
                for sig in (None, signal.SIGTERM, signal.SIGKILL):
                    if sig is not None:
                        with contextlib.suppress(ProcessLookupError):
                            self.nspawn.send_signal(sig)
                    try:
                        self.nspawn.wait(timeout=timeout if sig is None else 30)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        for cg in self.cgroups:
            deadline = time.monotonic() + 30
            while cg.exists() and time.monotonic() < deadline:
                nested = sorted((p for p in cg.rglob("*") if p.is_dir()),
                                key=lambda p: len(p.parts), reverse=True)
                for sub in [*nested, cg]:
                    with contextlib.suppress(OSError):
                        sub.rmdir()
                if cg.exists():
                    time.sleep(0.1)  # processes of the container still exiting
        with contextlib.suppress(OSError):
            Path(f"/run/systemd/nspawn/propagate/{self.name}").rmdir()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def main(argv: list[str]) -> int:
    if argv[1:] != ["build"]:
        print("usage: python tests/systemd/nspawn_machine.py build", file=sys.stderr)
        return 2
    try:
        tree = ensure_tree()
    except Unavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return 1
    how = "cached" if tree.built_s is None else f"built in {tree.built_s:.0f} s"
    print(f"{tree.path} ({how}; {tree.codename} from {tree.mirror}; "
          f"{len(tree.packages)} packages: {' '.join(tree.packages)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
