"""Plain logic, called directly: the lifecycle state machine, the configuration, and the FUSE
handlers (s3ql style: handlers are called without a kernel; the other test files run them
through real mounts)."""

from __future__ import annotations

import errno
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from cvmfsd import config as config_mod
from cvmfsd.config import Config, ConfigError
from cvmfsd.core import backend
from cvmfsd.core.children import Children
from cvmfsd.core.fs import FOREVER, RootOperations
from cvmfsd.core.lifecycle import Event, IllegalTransition, State, backoff, crash_loop, next_state
from cvmfsd.core.mounter import Mounter
from cvmfsd.core.names import Pin
from cvmfsd.core.registry import ROOT_INODE, SNAPSHOTS_INODE, Registry

# --- lifecycle -----------------------------------------------------------------------------


def test_lifecycle_transitions() -> None:
    assert next_state(State.IDLE, Event.BOOT) is State.BOOTING
    assert next_state(State.BOOTING, Event.BOOTED) is State.MOUNTED
    assert next_state(State.BOOTING, Event.BOOT_FAILED) is State.FAILED
    assert next_state(State.MOUNTED, Event.UNMOUNT) is State.UNMOUNTING
    assert next_state(State.UNMOUNTING, Event.UNMOUNT_REFUSED) is State.MOUNTED
    assert next_state(State.MOUNTED, Event.DIED) is State.IDLE
    assert next_state(State.MOUNTED, Event.CRASH_LOOP) is State.FAILED
    assert next_state(State.IDLE, Event.ADOPTED) is State.MOUNTED
    for state, event in [(State.MOUNTED, Event.BOOT), (State.BOOTING, Event.BOOT),
                         (State.IDLE, Event.BOOTED), (State.FAILED, Event.UNMOUNT)]:
        with pytest.raises(IllegalTransition):
            next_state(state, event)


def test_backoff_and_crash_loop() -> None:
    assert [backoff(n, 2, 300) for n in range(6)] == [0, 2, 4, 8, 16, 32]
    assert backoff(100, 2, 300) == 300
    assert not crash_loop([1.0, 2.0, 3.0], now=3.0, window=60, burst=3)
    assert crash_loop([1.0, 2.0, 3.0, 4.0], now=4.0, window=60, burst=3)
    assert not crash_loop([1.0, 2.0, 3.0, 100.0], now=100.0, window=60, burst=3)


def test_failure_budget_bursts_then_refills() -> None:
    from cvmfsd.core.requester import PRUNE_AT, FailureBudget, Requester
    budget, a, b = FailureBudget(6), Requester(1001), Requester(1001, "pod-b")
    for _ in range(6):
        assert not budget.exhausted(a, 0.0)
        budget.charge(a, 0.0)
    assert budget.exhausted(a, 0.0) and not budget.exhausted(b, 0.0)  # b has its own
    assert budget.exhausted(a, 9.9) and not budget.exhausted(a, 10.0)  # one per 60/6 s
    budget.charge(a, 10.0)
    assert budget.exhausted(a, 10.0) and not budget.exhausted(a, 60.0)
    # Requesters whose debt has drained are dropped: memory follows the recent failures.
    for uid in range(PRUNE_AT + 1):
        budget.charge(Requester(uid), 100.0)
    fresh = [Requester(uid) for uid in range(10_000, 10_000 + 2 * PRUNE_AT + 100)]
    for who in fresh:
        budget.charge(who, 1000.0)
    assert len(budget) == len(fresh)  # every drained one was dropped, no fresh one
    unlimited = FailureBudget(0)
    for _ in range(100):
        unlimited.charge(a, 0.0)
    assert not unlimited.exhausted(a, 0.0) and len(unlimited) == 0


def test_crash_loop_backoff_is_not_reset_by_a_successful_boot() -> None:
    reg = Registry(2.0, 300.0, restart_window=60.0, restart_burst=1)
    repo = reg.candidate("a.b")
    from cvmfsd.core.errors import BackendDied

    async def scenario() -> list[float]:
        retries = []
        for i in range(4):
            now = 10.0 * i
            reg.begin_boot(repo)
            reg.booted(repo, None, now, now)  # type: ignore[arg-type]
            reg.died(repo, BackendDied("x"), now + 1, now + 1)
            if repo.state is State.FAILED:
                retries.append(repo.retry_at - (now + 1))
        return retries

    assert trio.run(scenario) == [2.0, 4.0, 8.0]


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "message"), [
    ({"mount_timeout": 0}, "mount_timeout"),
    ({"root": "relative/path"}, "absolute"),
    ({"cvmfs2": "/nonexistent/cvmfs2"}, "not an executable"),
    ({"cvmfs2_config": ["/etc/a:b"]}, "contains"),
    ({"no_such_key": 1}, "unknown configuration keys"),
    ({"allow": "*.cern.ch"}, "list"),
    ({"max_concurrent_boots": True}, "integer"),
    ({"config_repository": "-o"}, "config_repository"),
    ({"stop_mode": "sometimes"}, "stop_mode"),
    ({"root": "/", "run_dir": "/run/x"}, "root must not be /"),
])
def test_invalid_configuration(values: dict[str, Any], message: str) -> None:
    values.setdefault("cvmfs2", "/bin/true")
    with pytest.raises(ConfigError, match=message):
        config_mod.build(values)


def test_invalid_configuration_file_exits_2_and_mounts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(f'root = "{tmp_path}/cvmfs"\nmount_timeout = -1\ncvmfs2 = "/bin/true"\n')
    result = subprocess.run([sys.executable, "-m", "cvmfsd", "run", "-c", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "mount_timeout must be > 0" in result.stderr
    assert not (tmp_path / "cvmfs").exists()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    unparsable = tmp_path / "broken.toml"
    unparsable.write_text("root = [\n")
    result = subprocess.run([sys.executable, "-m", "cvmfsd", "check-config", "-c",
                             str(unparsable)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot read" in result.stderr


# --- FUSE handlers, called directly ---------------------------------------------------------


class Ctx:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.uid = self.gid = 0
        self.umask = 0o022


def run_ops(fn: Any, **cfg: Any) -> Any:
    """Run fn(ops, registry) in trio with a mounter whose boots always fail (/bin/false)."""
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="cvmfsd-units-"))

    async def main() -> Any:
        # No root is mounted: each boot's mount at <root>/<name> fails, like a failing cvmfs2.
        config = Config(cvmfs2=Path("/bin/false"), backoff_initial=60.0, backoff_max=600.0,
                        run_dir=run_dir, root=run_dir / "no-root",
                        snapshot_dir=run_dir / "snapshots", **cfg)
        registry = Registry(config.backoff_initial, config.backoff_max)
        children = Children()
        mounter = Mounter(config, registry, children)
        async with trio.open_nursery() as nursery:
            await nursery.start(children.run)
            await nursery.start(mounter.run)
            try:
                return await fn(RootOperations(config, registry, mounter), registry)
            finally:
                nursery.cancel_scope.cancel()

    try:
        return trio.run(main)
    finally:
        import shutil

        shutil.rmtree(run_dir)


def test_lookup_of_bad_names_adds_nothing() -> None:
    async def check(ops: RootOperations, registry: Registry) -> None:
        for name in (b".git", b"HEAD", b"lib64", b"nodot", b"a.b,allow_other", b"\xff.x",
                     b"-o.x", b"a" * 61 + b".x"):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await ops.lookup(ROOT_INODE, name, Ctx(1))
            assert exc.value.errno == errno.ENOENT
        assert list(registry) == []

    run_ops(check)


def test_lookup_replies_at_once_with_a_stable_identity() -> None:
    async def check(ops: RootOperations, registry: Registry) -> None:
        with trio.fail_after(1):  # LOOKUP never waits for the mount
            first = await ops.lookup(ROOT_INODE, b"sft.cern.ch", Ctx(1))
        assert stat.S_ISDIR(first.st_mode)
        assert first.entry_timeout == FOREVER and first.attr_timeout == 0
        repo = registry.get("sft.cern.ch")
        assert repo is not None and repo.state is State.BOOTING
        # The daemon's own mount thread is answered at once, even while the boot runs.
        registry.enter_own_thread()
        try:
            own = await ops.getattr(first.st_ino, Ctx(threading.get_native_id()))
        finally:
            registry.leave_own_thread()
        assert own.st_ino == first.st_ino
        # Below a covered inode: ESTALE at once, never a wait (the kernel holds its lock).
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.lookup(first.st_ino, b"README", Ctx(1))
        assert exc.value.errno == errno.ESTALE
        # Anyone else waits for the boot's outcome: with no root mounted here, the mount at
        # <root>/<name> fails, so EIO, remembered.
        with pytest.raises(pyfuse3.FUSEError) as exc, trio.fail_after(10):
            await ops.getattr(first.st_ino, Ctx(1))
        assert exc.value.errno == errno.EIO
        assert repo.state is State.FAILED and repo.last_error is not None
        assert repo.last_error.message.startswith("mount of sft.cern.ch failed")
        # In backoff: the next LOOKUP fails at once and starts nothing.
        with pytest.raises(pyfuse3.FUSEError):
            await ops.lookup(ROOT_INODE, b"sft.cern.ch", Ctx(1))
        assert repo.boots == 1
        again = await ops.lookup(ROOT_INODE, b"cms.cern.ch", Ctx(1))
        assert again.st_ino != first.st_ino

    run_ops(check)


def test_snapshots_directory_is_hidden_and_validated() -> None:
    async def check(ops: RootOperations, registry: Registry) -> None:
        snaps = await ops.lookup(ROOT_INODE, b".snapshots", Ctx(1))
        assert snaps.st_ino == SNAPSHOTS_INODE and snaps.attr_timeout == FOREVER
        with pytest.raises(pyfuse3.FUSEError):
            await ops.lookup(SNAPSHOTS_INODE, b"sft.cern.ch@tag=a,b", Ctx(1))
        with pytest.raises(pyfuse3.FUSEError):  # a live name is not a snapshot, nor vice versa
            await ops.lookup(SNAPSHOTS_INODE, b"sft.cern.ch", Ctx(1))
        entry = await ops.lookup(SNAPSHOTS_INODE, b"sft.cern.ch@tag=v1", Ctx(1))
        repo = registry.by_inode(entry.st_ino)
        assert repo is not None and repo.fqrn == "sft.cern.ch" and repo.pin is not None
        assert repo.path == ".snapshots/sft.cern.ch@tag=v1"
        with pytest.raises(pyfuse3.FUSEError):
            await ops.lookup(ROOT_INODE, b"sft.cern.ch@tag=v1", Ctx(1))
        st = await ops.statfs(Ctx(1))
        assert st.f_namemax == 255

    run_ops(check)


def test_pinned_instance_lists_the_node_hierarchy_explicitly(tmp_path: Path) -> None:
    """`config=` replaces cvmfs2's own hierarchy, so a pinned instance on a node without an
    explicit file list gets the node's files in cvmfs2's order, then its pin file."""

    etc = tmp_path / "etc"
    for rel in ("default.conf", "default.d/50-site.conf", "default.d/10-a.conf", "default.local",
                "domain.d/cern.ch.conf", "config.d/sft.cern.ch.local",
                "config.d/other.cern.ch.conf"):
        (etc / rel).parent.mkdir(parents=True, exist_ok=True)
        (etc / rel).write_text("")
    cfg = Config(cvmfs2=Path("/usr/bin/cvmfs2"), snapshot_dir=tmp_path / "snap")
    pin_file = backend.write_pin_config(cfg, "sft.cern.ch@tag=v1", Pin("tag", "v1"))
    assert "CVMFS_REPOSITORY_TAG=v1\n" in pin_file.read_text()
    argv = backend.argv(cfg, "sft.cern.ch", 5, pin_file, etc=etc)
    files = argv[2].split("config=")[1].split(":")
    assert files == [str(etc / p) for p in (
        "default.conf", "default.d/10-a.conf", "default.d/50-site.conf", "default.local",
        "domain.d/cern.ch.conf", "config.d/sft.cern.ch.local")] + [str(pin_file)]
    # Without a pin, the node hierarchy is cvmfs2's own business: no config= at all.
    assert "config=" not in backend.argv(cfg, "sft.cern.ch", 5, etc=etc)[2]
    # A later daemon finds the file in the running instance's command line.
    assert backend.pin_config_of(cfg, argv) == pin_file
    assert backend.pin_config_of(cfg, backend.argv(cfg, "sft.cern.ch", 5, etc=etc)) is None


def test_each_pinned_instance_has_a_workspace_of_its_own(tmp_path: Path) -> None:
    """The last instance of a name may still be exiting, its workspace being removed, when the
    next one boots: removing one never touches the other."""
    cfg = Config(cvmfs2=Path("/usr/bin/cvmfs2"), snapshot_dir=tmp_path / "snap")
    old, new = (backend.write_pin_config(cfg, "sft.cern.ch@tag=v1", Pin("tag", "v1"))
                for _ in range(2))
    assert old.parent != new.parent and old.parent.parent == new.parent.parent
    backend.remove_pin_workspace(cfg, old)
    assert not old.parent.exists() and "CVMFS_REPOSITORY_TAG=v1\n" in new.read_text()
    backend.remove_pin_workspace(cfg, new)
    assert list(cfg.snapshot_dir.iterdir()) == []
    for outside in (tmp_path / "pin.conf", cfg.snapshot_dir / "pin.conf",
                    cfg.snapshot_dir / "x" / ".." / ".." / "pin.conf",
                    cfg.snapshot_dir / "x" / "other.conf"):
        with pytest.raises(ValueError):
            backend.remove_pin_workspace(cfg, outside)
    assert tmp_path.exists() and cfg.snapshot_dir.exists()


def test_boot_slots_try_acquire_takes_only_what_is_free() -> None:
    """The early start's slot (Mounter._take_slot) never waits: a free slot of the shared pool,
    of the reserve only for a requester with no boot running, or none."""
    from cvmfsd.core.mounter import BootSlots

    async def check() -> None:
        slots = BootSlots(1, 1)
        assert slots.try_acquire(may_use_reserve=False) == "shared"
        assert slots.try_acquire(may_use_reserve=False) is None
        assert slots.try_acquire(may_use_reserve=True) == "reserve"
        assert slots.try_acquire(may_use_reserve=True) is None
        slots.release("shared")
        assert await slots.acquire(may_use_reserve=False) == "shared"

    trio.run(check)
