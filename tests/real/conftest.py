"""The real-backend tier: cvmfsd driving the real CernVM-FS client (/usr/bin/cvmfs2) against
real, signed repositories made by `cvmfs_swissknife` (realrepo.py) and served on loopback.

- `real_world` (session): one base directory under /tmp, the HTTP server (stopped by its pid)
  and the repositories, each published twice (v1, v2). Made once: about as long as a few tests.
- `env` (per test) overrides tests/conftest.py's stand-in `env`: a directory of the test's own
  below the base, with a client configuration (server URL, DIRECT proxy, keys, cache base,
  reload socket directory, CVMFS_NFILES, ...) that cvmfsd passes as `-o config=<file>`, so no
  /etc/cvmfs file is read. tests/conftest.py's `start_daemon` then runs cvmfsd with
  `cvmfs2 = /usr/bin/cvmfs2` unchanged.

CVMFSD_REAL_KEEP=1 keeps the base directory (every test's cvmfsd log and client config).
Skipped, with the reason, where the client is not installed (.ci/setup installs it from
../shared/cvmfs2/ when the tarball is there); CVMFSD_REAL_REQUIRED=1 (set by .ci/run when the
tarball is present) turns that skip into a failure, so CI cannot silently lose the tier.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_helpers import describe, wait_gone
from realrepo import (
    CVMFS2,
    Repo,
    RepoServer,
    client_params,
    make_repos,
    missing_tools,
    prepare_dirs,
    write_client_config,
)

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "cvmfs2"
# Each name is mounted cold by at most one test step that needs a cold repository; the storm
# takes the last four.
REPOS = ("alpha.real.test", "beta.real.test", "gamma.real.test", "delta.real.test",
         "epsilon.real.test", "zeta.real.test", "eta.real.test", "theta.real.test")


def pytest_plugin_registered(plugin: Any, manager: pytest.PytestPluginManager) -> None:
    """Keep `import conftest` meaning tests/conftest.py (see tests/csi/conftest.py: every
    conftest.py outside a package is the module `conftest`, the last one loaded wins)."""
    if getattr(plugin, "__file__", None) != __file__:
        return
    for other in manager.get_plugins():
        if getattr(other, "__file__", None) == str(ROOT_CONFTEST):
            sys.modules["conftest"] = other


def _skip_reason() -> str | None:
    reason = missing_tools()
    if reason is None:
        return None
    tarballs = sorted(SHARED.glob("cvmfs-*.tar.xz"))
    if not tarballs:
        return f"{reason}; {SHARED} has no cvmfs-*.tar.xz here"
    return f"{reason}; {tarballs[0].name} is there: run .ci/setup"


@dataclass
class RealWorld:
    base: Path
    server: RepoServer
    repos: dict[str, Repo]
    setup_seconds: float


@pytest.fixture(scope="session")
def real_world() -> Iterator[RealWorld]:
    reason = _skip_reason()
    if reason is not None:
        if os.environ.get("CVMFSD_REAL_REQUIRED") == "1":
            pytest.fail(f"real tier required (CVMFSD_REAL_REQUIRED=1) but: {reason}")
        pytest.skip(reason)
    # Not below pytest's basetemp: that is 0700 root, and cvmfs2 reads its keys and cache as
    # the cvmfs user once it dropped privileges.
    base = Path(tempfile.mkdtemp(prefix="cvmfsd-real-"))
    base.chmod(0o755)
    server = RepoServer(base / "storage")
    started = time.monotonic()
    try:
        server.start()
        repos = make_repos(base, REPOS, server)
        world = RealWorld(base, server, repos, time.monotonic() - started)
        print(f"\nreal tier: {len(repos)} repositories made in {world.setup_seconds:.1f} s "
              f"below {base}, served at {server.url}")
        yield world
    finally:
        server.stop()
        # Only when nothing is mounted below it any more (a test's teardown detaches what it
        # left); otherwise keep it for a post-mortem rather than walk into a live mount.
        # CVMFSD_REAL_KEEP=1 keeps it all (logs, configs, repositories) for a look afterwards.
        if os.environ.get("CVMFSD_REAL_KEEP") != "1" and not any(
                m == str(base) or m.startswith(f"{base}/") for m in _mountpoints()):
            shutil.rmtree(base, ignore_errors=True)


def _mountpoints() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


@dataclass
class RealEnv:
    """What tests/conftest.py's Env offers start_daemon (tmp, client_config, cvmfs2), for the
    real client, plus the repositories and paths. (Not a subclass: while this file is being
    imported, `conftest` in sys.modules is this very file.)"""

    tmp: Path
    server: Path
    client_config: Path
    cvmfs2: Path
    world: RealWorld
    cache: Path
    reload: Path

    @property
    def shared(self) -> Path:
        """Reachable by the cvmfs user already (tests/conftest.py's toml_config uses it)."""
        return self.tmp

    @property
    def repos(self) -> dict[str, Repo]:
        return self.world.repos

    def boots(self) -> list[str]:
        raise NotImplementedError("the real tier counts boots from cvmfsd's mount log lines")

    def add_repo(self, fqrn: str, files: dict[str, bytes | str] | None = None,
                 **kw: Any) -> None:
        raise NotImplementedError("real repositories are made once, by real_world")


@pytest.fixture
def env(real_world: RealWorld, request: pytest.FixtureRequest) -> Iterator[RealEnv]:
    tmp = Path(tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-", dir=real_world.base))
    tmp.chmod(0o755)
    cache, reload = tmp / "cache", tmp / "reload"
    prepare_dirs(cache, reload)
    conf = write_client_config(tmp / "client.conf", client_params(
        real_world.server.url, real_world.base / "public-keys", cache, reload))
    e = RealEnv(tmp, real_world.server.directory, conf, CVMFS2, real_world, cache, reload)
    since = time.time() - 1
    yield e
    # Runs after start_daemon's teardown (which stops cvmfsd, kills the serving processes it
    # reported and detaches what is left). What may remain are the real client's helpers: the
    # watchdog and the shared cache manager exit by themselves once their mount is gone.
    left = wait_gone(tmp, since, timeout=30)
    for p in left:  # ours beyond doubt: started after this test began, argv or cwd in tmp
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    assert not left, f"cvmfs2 processes outlived the test: {describe(left)}"
