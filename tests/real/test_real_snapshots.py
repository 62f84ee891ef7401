"""Pinned snapshots with the real client: `.snapshots/<fqrn>@tag=v1`, `@hash=<root hash of
revision 1>`, `@date=<between the two publishes>` serve revision 1 beside the live revision 2."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import Daemon
from real_helpers import big, serving_pid, xattr
from realrepo import revision_files

pytestmark = pytest.mark.real
REPO = "theta.real.test"


def test_pinned_tag_hash_and_date(daemon: Daemon) -> None:
    repo = daemon.env.repos[REPO]
    v1, v2 = repo.revisions["v1"], repo.revisions["v2"]
    pins = {f"tag={v1.tag}": v1, f"hash={v1.root_hash}": v1, f"date={repo.date_between()}": v1,
            f"tag={v2.tag}": v2}
    live = daemon.path(REPO)
    assert (live / "README").read_text() == revision_files(REPO, "v2")["README"]
    for pin, rev in pins.items():
        path = daemon.root / ".snapshots" / f"{REPO}@{pin}"
        assert (path / "README").read_text() == revision_files(REPO, rev.tag)["README"], pin
        assert (path / "v2only.txt").exists() == (rev.tag == "v2"), pin
        assert (path / "sub" / "hello.txt").read_text() == \
            revision_files(REPO, rev.tag)["sub/hello.txt"]
        assert xattr(path, "revision") == str(rev.number), pin
        assert xattr(path, "root_hash") == rev.root_hash, pin
    # The 10 MiB file through a pinned instance, and an executable in one.
    pinned = daemon.root / ".snapshots" / f"{REPO}@tag=v1"
    assert (pinned / "big.bin").read_bytes() == big(REPO)
    assert os.access(pinned / "bin" / "hello", os.X_OK)
    # The live repository is unchanged, and every instance has a cvmfs2 of its own.
    assert xattr(live, "revision") == "2"
    pids = {serving_pid(live)} | {serving_pid(daemon.root / ".snapshots" / f"{REPO}@{p}")
                                  for p in pins}
    assert len(pids) == 1 + len(pins)
    assert os.listdir(daemon.root) == [REPO]
    daemon.wait_mounted(REPO, *(f"{REPO}@{p}" for p in pins))  # logged after cvmfs2 serves
    attempts = daemon.mount_attempts()
    assert sorted(a["repo"] for a in attempts) == sorted(
        [REPO, *(f"{REPO}@{p}" for p in pins)])
    assert {a["result"] for a in attempts} == {"mounted"}, attempts


def test_pins_the_history_does_not_have(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = start_daemon(backoff_initial=60.0)
    cases = {  # pin: (cvmfs2's exit code, its message)
        "tag=nosuchtag": (22, "no such tag: nosuchtag (22 - history init failure)"),
        "date=2001-01-01T00:00:00Z": (22, "no repository state as early as utc timestamp "
                                          "1 Jan 2001 00:00:00 (22 - history init failure)"),
        f"hash={'1' * 40}": (16, "Failed to initialize root file catalog (16 - file catalog "
                                 "failure)"),
    }
    for pin, (code, message) in cases.items():
        name = f"{REPO}@{pin}"
        for _ in range(5):  # one boot; the rest within the backoff
            with pytest.raises(OSError) as exc:
                os.stat(d.root / ".snapshots" / name / "README")
            assert exc.value.errno == errno.ENOENT, pin
        attempt, = d.logged_attempts(name)
        assert attempt["exit_code"] == code, attempt
        assert message in attempt["stderr_tail"], attempt
    # The live repository is not affected.
    assert (d.path(REPO) / "README").read_text() == revision_files(REPO, "v2")["README"]


def test_null_hash_is_no_snapshot(daemon: Daemon) -> None:
    """cvmfs2 reads forty zeros as the null hash, i.e. no pin (it would mount the live revision
    under a snapshot's name): such a name is not a snapshot, and starts nothing."""
    with pytest.raises(OSError) as exc:
        os.stat(daemon.root / ".snapshots" / f"{REPO}@hash={'0' * 40}")
    assert exc.value.errno == errno.ENOENT
    assert daemon.mount_attempts() == []
