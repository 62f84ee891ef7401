"""The benchmark's world: one repository server, the repositories the scenarios need, and one
backend configuration per system.

The backend is the cvmfs2 stand-in by default (its "stratum 1" is a local directory). With a
`Real` setting it is a real cvmfs2 binary, either with repositories the harness makes itself
(`cvmfs_swissknife`, tests/real/realrepo.py) and serves on loopback, or with repositories an
admin names and the admin's client configuration.

Every system gets its own CVMFS_CACHE_BASE (cvmfs2 holds an exclusive workspace lock per
repository in it) and its own counting wrapper, so that boots are counted per system.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, Unavailable, kit, realrepo

make_repo, write_config, write_wrapper = kit.make_repo, kit.write_config, kit.write_wrapper


@dataclass
class Real:
    """The real client: its binary, and either a server the harness fills (`server`, `keys`)
    or repositories given by name with the client configuration that reaches them."""

    cvmfs2: Path
    server: Any = None                 # realrepo.RepoServer, running, for made repositories
    keys: Any = None                   # realrepo.Keys that sign every made repository
    keys_dir: Path | None = None       # their public half, the clients' CVMFS_KEYS_DIR
    configs: tuple[Path, ...] = ()     # given: the admin's client configuration files
    repos: tuple[str, ...] = ()        # given: the repositories to use
    cold_file: str = ""                # given: a path that exists in each of them

    @property
    def given(self) -> bool:
        return bool(self.repos)

    def describe(self) -> str:
        version = realrepo.client_version(self.cvmfs2)
        if self.given:
            return (f"real cvmfs2 {version} ({self.cvmfs2}); given repositories "
                    f"{', '.join(self.repos)} with client configuration "
                    f"{':'.join(map(str, self.configs))}")
        return (f"real cvmfs2 {version} ({self.cvmfs2}); repositories made by the harness "
                f"with cvmfs_swissknife, served by http.server on {self.server.url}")

DOMAIN = "bench.example"
TREE_REPO = f"tree.{DOMAIN}"
DATA_REPO = f"data.{DOMAIN}"
COLD_FILE = "README"


@dataclass
class Launch:
    """One cvmfs2 launch seen by the counting wrapper; ms and rc once the launcher exited."""

    fqrn: str
    start: float                   # CLOCK_REALTIME, seconds ($EPOCHREALTIME)
    ms: float | None = None
    rc: int | None = None


@dataclass
class Backend:
    """The cvmfs2 a system runs: client config files and a wrapper that counts launches."""

    name: str
    dir: Path
    client_config: Path
    cvmfs2: Path
    boots_log: Path
    # Read before client_config (the admin's files, for given repositories).
    extra_configs: tuple[Path, ...] = ()
    # What the counting wrapper runs: the client itself (bench.profile runs it unwrapped).
    inner: Path | None = None

    @property
    def configs(self) -> list[Path]:
        return [*self.extra_configs, self.client_config]

    def launches(self) -> list[Launch]:
        """One record per cvmfs2 launch, in launch order."""
        if not self.boots_log.exists():
            return []
        out: list[Launch] = []
        running: dict[str, Launch] = {}
        for line in self.boots_log.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[0] == "B":
                running[fields[1]] = Launch(fields[-2], float(fields[2] or 0))
                out.append(running[fields[1]])
            elif len(fields) == 4 and fields[0] == "E" and fields[1] in running:
                launch = running.pop(fields[1])
                launch.ms = round((float(fields[2]) - launch.start) * 1000, 3)
                launch.rc = int(fields[3])
        return out

    def boots(self) -> list[str]:
        """One repository name per cvmfs2 launch, in launch order."""
        return [launch.fqrn for launch in self.launches()]

    def last_launch(self, fqrn: str) -> Launch | None:
        """The last finished launch of fqrn (its run time: the backend's own boot)."""
        done = [la for la in self.launches() if la.fqrn == fqrn and la.ms is not None]
        return done[-1] if done else None

    def options(self) -> str:
        """The -o options cvmfsd passes (and mount.cvmfs, minus uid/gid: the stand-in runs as
        root): every system boots the backend with the same command line."""
        return ",".join(("fsname=cvmfs2", "system_mount", "allow_other", "grab_mountpoint",
                         "libfuse=3", "config=" + ":".join(map(str, self.configs))))


@dataclass
class Workspace:
    base: Path
    quick: bool
    # Where cvmfsd and the CSI plugin are run from: the working tree, or an export of one
    # revision (--cvmfsd-rev), so that results can name exactly the code they measured.
    src: Path = REPO_ROOT
    # None: the stand-in; else the real client (see Real).
    real: Real | None = None
    server: Path = field(init=False)
    made: set[str] = field(default_factory=set)
    # Given repositories handed out so far: requested name -> given name.
    assigned: dict[str, str] = field(default_factory=dict)

    @property
    def cold_file(self) -> str:
        """What the cold scenarios stat in a repository nobody looked at yet."""
        return self.real.cold_file if self.real and self.real.given else COLD_FILE

    def backend_description(self) -> str:
        if self.real is None:
            probe = self.backend("versions")
            text = subprocess.run([str(probe.cvmfs2), "--version"], capture_output=True,
                                  text=True, timeout=60).stdout.strip()
            shutil.rmtree(probe.dir, ignore_errors=True)
            return f"cvmfs2 stand-in (cvmfs2_standin), reports: {text}"
        return self.real.describe()

    def src_env(self, src: Path | None = None) -> dict[str, str]:
        """Environment for `python -m cvmfsd` / `python -m csi.main` from src (self.src)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(src or self.src) + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
        return env

    def __post_init__(self) -> None:
        self.server = self.base / "server"
        self.server.mkdir(parents=True, exist_ok=True)

    # --- backends -------------------------------------------------------------------------------
    def backend(self, system: str) -> Backend:
        d = self.base / system
        d.mkdir(parents=True, exist_ok=True)
        extra: tuple[Path, ...] = ()
        if self.real is None:
            # cvmfs2 does not create its loader socket directory (a missing one is exit 5), and
            # cvmfsd starts it with the cvmfs user's ids where that user exists (cvmfs2_user),
            # which the stand-in drops to as the real client does: the user's own, as for --real.
            realrepo.prepare_dirs(d / "cache", d / "reload")
            client_config = write_config(
                d / "client.conf",
                CVMFS_SERVER_URL=f"file://{self.server}/@fqrn@",
                CVMFS_HTTP_PROXY="DIRECT",
                CVMFS_CACHE_BASE=str(d / "cache"),
                CVMFS_RELOAD_SOCKETS=str(d / "reload"),
            )
            inner = write_wrapper(d / "standin-cvmfs2",
                                  env={"CVMFS_STANDIN_ETC": str(d / "etc")})
        else:
            # Owned by the cvmfs user where it exists, as the package prepares its own.
            realrepo.prepare_dirs(d / "cache", d / "reload")
            if self.real.given:
                # The admin's files first; only the paths of this system's own cache after them.
                extra = self.real.configs
                params = {"CVMFS_CACHE_BASE": str(d / "cache"),
                          "CVMFS_RELOAD_SOCKETS": str(d / "reload")}
            else:
                params = realrepo.client_params(self.real.server.url, self.real.keys_dir,
                                                d / "cache", d / "reload")
            client_config = realrepo.write_client_config(d / "client.conf", params)
            inner = self.real.cvmfs2
        boots_log = d / "boots.log"
        counting = d / "cvmfs2"
        # As tests/conftest.py's counting wrapper, plus the launcher's own run time: a line when
        # it starts and one when it exits, stamped with bash's $EPOCHREALTIME (a builtin, so the
        # stamps cost no process). The cold-access scenario subtracts this run time from each
        # first access to see the automounter's own share, without the boot's noise.
        log = shlex.quote(str(boots_log))
        counting.write_text(
            "#!/bin/bash\n"
            f'echo "B $$ $EPOCHREALTIME $*" >> {log}\n'
            f'{shlex.quote(str(inner))} "$@"\n'
            "rc=$?\n"
            f'echo "E $$ $EPOCHREALTIME $rc" >> {log}\n'
            "exit $rc\n")
        counting.chmod(0o755)
        return Backend(system, d, client_config, counting, boots_log, extra, inner)

    # --- repositories ---------------------------------------------------------------------------
    def tiny(self, fqrn: str) -> str:
        """A small repository for cold accesses (one README, like a config repository). With
        given repositories: the next one not handed out yet, under its own name."""
        if self.real is not None and self.real.given:
            if fqrn not in self.assigned:
                free = [r for r in self.real.repos if r not in self.assigned.values()]
                if not free:
                    raise Unavailable(f"needs more than the {len(self.real.repos)} given "
                                      "repositories (each is used cold once)")
                self.assigned[fqrn] = free[0]
            return self.assigned[fqrn]
        if fqrn not in self.made:
            self._make(fqrn, {COLD_FILE: f"repository {fqrn}\n", "etc/profile": "# bench\n"})
        return fqrn

    def _make(self, fqrn: str, files: dict[str, bytes | str]) -> None:
        if self.real is None:
            make_repo(self.server, fqrn, files)
        elif self.real.given:
            raise Unavailable("needs repositories of known content, which only the harness "
                              "makes (--real); given repositories are not")
        else:
            realrepo.make_repo(self.base / "repos", fqrn, self.real.server, files,
                               self.real.keys)
        self.made.add(fqrn)

    def tree(self, dirs: int, files: int) -> list[str]:
        """The metadata repository: dirs x files regular files; returns their relative paths."""
        rels = [f"d{d:03d}/f{f:04d}" for d in range(dirs) for f in range(files)]
        if TREE_REPO not in self.made:
            self._make(TREE_REPO, dict.fromkeys(rels, b"x"))
        return rels

    def data(self, large_bytes: int, small_count: int, small_bytes: int) -> tuple[str, list[str]]:
        """The reads repository: one large file and many small ones (incompressible content)."""
        small = [f"small/s{i:05d}" for i in range(small_count)]
        if DATA_REPO not in self.made:
            rng = random.Random(8)
            files: dict[str, bytes | str] = {"large.bin": os.urandom(large_bytes)}
            for rel in small:
                files[rel] = rng.randbytes(small_bytes)
            self._make(DATA_REPO, files)
        return "large.bin", small
