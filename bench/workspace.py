"""The benchmark's world: one repository server (the stand-in's "stratum 1"), the repositories the
scenarios need, and one backend configuration per system.

Every system gets its own CVMFS_CACHE_BASE (the stand-in holds an exclusive workspace lock per
repository in it) and its own counting wrapper, so that boots are counted per system.
"""

from __future__ import annotations

import os
import random
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .common import REPO_ROOT, kit

make_repo, write_config, write_wrapper = kit.make_repo, kit.write_config, kit.write_wrapper

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
    """The cvmfs2 (stand-in) a system runs: a client config and a wrapper that counts launches."""

    name: str
    dir: Path
    client_config: Path
    cvmfs2: Path
    boots_log: Path

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
                         "libfuse=3", f"config={self.client_config}"))


@dataclass
class Workspace:
    base: Path
    quick: bool
    # Where cvmfsd and the CSI plugin are run from: the working tree, or an export of one
    # revision (--cvmfsd-rev), so that results can name exactly the code they measured.
    src: Path = REPO_ROOT
    server: Path = field(init=False)
    made: set[str] = field(default_factory=set)

    def src_env(self) -> dict[str, str]:
        """Environment for `python -m cvmfsd` / `python -m csi.main` from self.src."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.src) + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
        return env

    def __post_init__(self) -> None:
        self.server = self.base / "server"
        self.server.mkdir(parents=True, exist_ok=True)

    # --- backends -------------------------------------------------------------------------------
    def backend(self, system: str) -> Backend:
        d = self.base / system
        d.mkdir(parents=True, exist_ok=True)
        # cvmfs2 does not create its loader socket directory (a missing one is exit 5).
        (d / "reload").mkdir(exist_ok=True)
        client_config = write_config(
            d / "client.conf",
            CVMFS_SERVER_URL=f"file://{self.server}/@fqrn@",
            CVMFS_HTTP_PROXY="DIRECT",
            CVMFS_CACHE_BASE=str(d / "cache"),
            CVMFS_RELOAD_SOCKETS=str(d / "reload"),
        )
        inner = write_wrapper(d / "standin-cvmfs2", env={"CVMFS_STANDIN_ETC": str(d / "etc")})
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
        return Backend(system, d, client_config, counting, boots_log)

    # --- repositories ---------------------------------------------------------------------------
    def tiny(self, fqrn: str) -> str:
        """A small repository for cold accesses (one README, like a config repository)."""
        if fqrn not in self.made:
            make_repo(self.server, fqrn, {COLD_FILE: f"repository {fqrn}\n",
                                          "etc/profile": "# bench\n"})
            self.made.add(fqrn)
        return fqrn

    def tree(self, dirs: int, files: int) -> list[str]:
        """The metadata repository: dirs x files regular files; returns their relative paths."""
        rels = [f"d{d:03d}/f{f:04d}" for d in range(dirs) for f in range(files)]
        if TREE_REPO not in self.made:
            make_repo(self.server, TREE_REPO, dict.fromkeys(rels, b"x"))
            self.made.add(TREE_REPO)
        return rels

    def data(self, large_bytes: int, small_count: int, small_bytes: int) -> tuple[str, list[str]]:
        """The reads repository: one large file and many small ones (incompressible content)."""
        small = [f"small/s{i:05d}" for i in range(small_count)]
        if DATA_REPO not in self.made:
            rng = random.Random(8)
            files: dict[str, bytes | str] = {"large.bin": os.urandom(large_bytes)}
            for rel in small:
                files[rel] = rng.randbytes(small_bytes)
            make_repo(self.server, DATA_REPO, files)
            self.made.add(DATA_REPO)
        return "large.bin", small
