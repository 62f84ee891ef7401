"""Pinned snapshots: <root>/.snapshots/<fqrn>@tag=<tag> (or @hash=, @date=) mounted on first
lookup by a cvmfs2 of their own, beside the live repository."""

from __future__ import annotations

import errno
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Daemon, Env, exited, mounts_under, reap
from podview import PodView

from cvmfs2_standin.kit import make_repo, root_hash
from cvmfsd.core.names import InvalidName, NamePolicy, parse_snapshot

REPO = "sw.cern.ch"


CYCLES = 25


def v(n: int) -> dict[str, bytes | str]:
    return {"VERSION": f"release {n}\n", "bin/tool": f"#!/bin/sh\necho {n}\n"}


@pytest.fixture
def versioned(env: Env) -> Env:
    make_repo(env.server, REPO, v(1), revision=1, tags={"v1": "2024-01-01T00:00:00Z"})
    make_repo(env.server, REPO, v(2), revision=2, tags={"v2": "2025-01-01T00:00:00Z"})
    make_repo(env.server, REPO, v(3), revision=3)
    return env


def snap(d: Daemon, pin: str) -> os.PathLike[str]:
    return d.root / ".snapshots" / f"{REPO}@{pin}"


def test_pinned_and_live_side_by_side(versioned: Env, start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon()
    assert (d.path(REPO) / "VERSION").read_text() == "release 3\n"
    assert (snap(d, "tag=v1") / "VERSION").read_text() == "release 1\n"
    assert (snap(d, "date=2025-06-01T00:00:00Z") / "VERSION").read_text() == "release 2\n"
    hash2 = root_hash(versioned.server, REPO, 2)
    assert (snap(d, f"hash={hash2}") / "VERSION").read_text() == "release 2\n"
    assert os.getxattr(snap(d, "tag=v1"), "user.revision") == b"1"
    # The root's listing does not change; the snapshots directory lists the pinned instances.
    assert os.listdir(d.root) == [REPO]
    assert sorted(os.listdir(d.root / ".snapshots")) == sorted(
        [f"{REPO}@tag=v1", f"{REPO}@date=2025-06-01T00:00:00Z", f"{REPO}@hash={hash2}"])
    assert versioned.boots().count(REPO) == 4  # the live one and three pinned instances
    d.wait_mounted(f"{REPO}@tag=v1")
    attempts = {a["repo"] for a in d.mount_attempts()}
    assert f"{REPO}@tag=v1" in attempts


def test_bad_tag_is_a_clear_error_without_retry_storm(versioned: Env, start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(backoff_initial=300.0, backoff_max=300.0)
    for _ in range(50):
        with pytest.raises(FileNotFoundError):
            os.stat(snap(d, "tag=nope"))
    assert versioned.boots().count(REPO) == 1
    attempt, = d.logged_attempts(f"{REPO}@tag=nope")
    assert attempt["exit_code"] == 22
    assert "(22 - " in attempt["stderr_tail"]


@pytest.mark.parametrize("name", [
    f"{REPO}@tag=a,allow_other", f"{REPO}@tag=-o", f"{REPO}@tag=..", f"{REPO}@tag=a b",
    f"{REPO}@tag=a\nb", f"{REPO}@tag=", f"{REPO}@hash=xyz", f"{REPO}@hash={'A' * 40}",
    f"{REPO}@date=2024-13-45T00:00:00Z", f"{REPO}@date=yesterday", f"{REPO}@tag=v1@tag=v2",
    f"{REPO}@branch=x", f"{REPO}tag=v1", "-o@tag=v1", f"{REPO}@tag={'x' * 70}",
    f"{REPO}@tag=$(id)", f"{REPO}@tag=v1:x",
    # cvmfs2's null hash: no pin at all, it would mount the live revision.
    f"{REPO}@hash={'0' * 40}",
])
def test_injection_in_pins_rejected(daemon: Daemon, name: str) -> None:
    with pytest.raises(InvalidName):
        parse_snapshot(name, NamePolicy())
    if "\n" not in name:
        with pytest.raises(OSError) as exc:
            os.stat(daemon.root / ".snapshots" / name)
        assert exc.value.errno == errno.ENOENT
    assert daemon.env.boots() == []


def test_snapshot_of_a_denied_repository(versioned: Env, start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(deny=["sw.*"])
    with pytest.raises(FileNotFoundError):
        os.stat(snap(d, "tag=v1"))
    assert versioned.boots() == []


def test_two_pods_pinned_to_one_tag_share_a_process(versioned: Env, daemon: Daemon) -> None:
    pods = [PodView(daemon.root, versioned.tmp / f"pod{i}") for i in range(2)]
    try:
        for pod in pods:
            assert pod.do("read", f".snapshots/{REPO}@tag=v2/VERSION")["data"] == "release 2\n"
    finally:
        for pod in pods:
            pod.close()
    assert versioned.boots().count(REPO) == 1


def test_pinned_instance_expires_heals_and_survives_restart(versioned: Env, start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(expire_timeout=1.0, expire_min_age=0.5, stop_mode="handover")
    path = snap(d, "tag=v1")
    assert (path / "VERSION").read_text() == "release 1\n"
    d.wait_for("the expiry", lambda: str(path) not in mounts_under(d.root))  # like any
    assert (path / "VERSION").read_text() == "release 1\n"  # and comes back
    pid = int(os.getxattr(path, "user.pid"))
    os.kill(pid, signal.SIGKILL)  # heals like any repository

    def readable() -> bool:
        try:
            return (path / "VERSION").read_text() == "release 1\n"
        except OSError:
            return False

    d.wait_for("the heal", readable)
    healed_pid = int(os.getxattr(path, "user.pid"))
    assert healed_pid != pid
    with open(path / "VERSION") as held:
        d.stop(signal.SIGKILL)
        second = start_daemon(expire_timeout=0)
        assert [e["repo"] for e in second.events("adopted")] == [f"{REPO}@tag=v1"]
        assert int(os.getxattr(path, "user.pid")) == healed_pid
        assert held.read() == "release 1\n"
    assert (path / "VERSION").read_text() == "release 1\n"
    assert versioned.boots().count(REPO) == 3
    assert second.stop() == 0
    assert mounts_under(d.root) == []
    # The adopted instance's workspace went with it: the second daemon found it in its argv.
    assert list((d.env.shared / "snapshots").iterdir()) == []
    deadline = time.monotonic() + 60
    while not exited(healed_pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    reap([pid, healed_pid])


def test_pinned_instance_unmounted_and_looked_up_again_at_once(versioned: Env,
                                                              daemon: Daemon) -> None:
    """An unmount and the next lookup race: the unmount's cleanup of the old instance must
    never take the new instance's pin (it would serve the live revision under the pin's name)."""
    name = f"{REPO}@tag=v1"
    path = snap(daemon, "tag=v1")
    for _ in range(CYCLES):
        assert (path / "VERSION").read_text() == "release 1\n"
        with ThreadPoolExecutor(1) as pool:
            umount = pool.submit(daemon.call, "umount", name=name)
            while str(path) in mounts_under(daemon.root) and not umount.done():
                pass
            # Looked up again as soon as the mount is gone, while the unmount may still run.
            assert (path / "VERSION").read_text() == "release 1\n"
            assert umount.result()["ok"]
    assert (path / "VERSION").read_text() == "release 1\n"
    assert versioned.boots().count(REPO) == CYCLES + 1


def test_root_hashes_with_an_algorithm_suffix(versioned: Env, start_daemon) -> None:  # type: ignore[no-untyped-def]
    """cvmfs appends the algorithm to root hashes that are not SHA-1 (-rmd160, -shake128):
    such a hash names a snapshot like a plain one; any other suffix is not a hash."""
    hash1, hash2 = root_hash(versioned.server, REPO, 1), root_hash(versioned.server, REPO, 2)
    revisions = versioned.server / REPO / "revisions"
    (revisions / "1.root_hash").write_text(f"{hash1}-rmd160\n")
    (revisions / "2.root_hash").write_text(f"{hash2}-shake128\n")
    d = start_daemon(backoff_initial=300.0, backoff_max=300.0)
    assert (snap(d, f"hash={hash1}-rmd160") / "VERSION").read_text() == "release 1\n"
    assert (snap(d, f"hash={hash2}-shake128") / "VERSION").read_text() == "release 2\n"
    assert os.getxattr(snap(d, f"hash={hash1}-rmd160"), "user.root_hash").decode() == (
        f"{hash1}-rmd160")
    pins = sorted(p.read_text().splitlines()[0]
                  for p in d.env.shared.glob("snapshots/*/*/pin.conf"))
    assert pins == [f"CVMFS_ROOT_HASH={hash1}-rmd160", f"CVMFS_ROOT_HASH={hash2}-shake128"]
    for bad in (f"{hash1}-md5", f"{hash1}-RMD160", f"{hash1}-rmd160-rmd160", f"{hash1}rmd160",
                f"{hash1[:-1]}-rmd160", f"{hash1}-", f"{hash1}-sha1"):
        with pytest.raises(FileNotFoundError):
            os.stat(snap(d, f"hash={bad}"))
    assert versioned.boots().count(REPO) == 2  # the bad ones started nothing
    d.wait_mounted(f"{REPO}@hash={hash1}-rmd160", f"{REPO}@hash={hash2}-shake128")
    assert len(d.mount_attempts()) == 2
