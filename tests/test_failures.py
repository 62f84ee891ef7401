"""Failing repositories: a clean errno quickly, bounded boots, the error recorded."""

from __future__ import annotations

import errno
import os
import time

import pytest
from conftest import Daemon


def _lookups(d: Daemon, name: str, n: int) -> dict[int, int]:
    """errno -> count over n stats (0 = success)."""
    seen: dict[int, int] = {}
    for _ in range(n):
        try:
            os.stat(d.path(name) / "README")
            seen[0] = seen.get(0, 0) + 1
        except OSError as exc:
            seen[exc.errno] = seen.get(exc.errno, 0) + 1
        time.sleep(0.01)
    return seen



@pytest.mark.parametrize(("name", "knobs", "code", "expected_errno"), [
    ("missing.cern.ch", None, 16, errno.ENOENT),
    ("broken.cern.ch", {"CVMFS_STANDIN_FAIL": "4"}, 4, errno.EIO),
])
def test_failing_boot(start_daemon, name: str, knobs: dict[str, str] | None, code: int,
                      expected_errno: int) -> None:  # type: ignore[no-untyped-def]
    # A backoff far longer than the lookups can take, however loaded the machine.
    d = start_daemon(backoff_initial=300.0, backoff_max=300.0)
    if knobs:
        d.env.add_repo(name)
        d.env.repo_config(name, **knobs)
    seen = _lookups(d, name, 100)
    assert seen == {expected_errno: 100}
    # 100 lookups within the backoff: exactly one boot.
    assert d.env.boots().count(name) == 1
    attempts = d.logged_attempts(name)
    assert len(attempts) == 1
    assert attempts[0]["exit_code"] == code
    assert f"({code} - " in attempts[0]["stderr_tail"]


def test_boot_that_hangs_is_killed_at_the_timeout(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(mount_timeout=2.0, backoff_initial=300.0, backoff_max=300.0)
    d.env.add_repo("hang.cern.ch")
    d.env.repo_config("hang.cern.ch", CVMFS_STANDIN_HANG="yes")
    started = time.monotonic()
    with pytest.raises(OSError) as exc:
        os.stat(d.path("hang.cern.ch") / "README")
    assert exc.value.errno == errno.EIO
    assert time.monotonic() - started >= 2.0  # not before the timeout (a lower bound only)
    seen = _lookups(d, "hang.cern.ch", 100)
    assert seen == {errno.EIO: 100}
    assert d.env.boots().count("hang.cern.ch") == 1
    attempt, = d.logged_attempts("hang.cern.ch")
    assert "did not finish booting within 2 s" in attempt["error"]
    # The hung launcher was killed with its session: nothing of it is left.
    launcher_pid = int(d.env.boots_log.read_text().split()[0])
    assert not os.path.exists(f"/proc/{launcher_pid}")
    # Nothing left of the boot (the daemon's own FUSE control mount stays there).
    assert [p.name for p in (d.run_dir / "staging").iterdir()] in ([], ["fusectl"])


def test_failed_repository_retries_after_backoff(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(backoff_initial=1.0, backoff_max=300.0)
    with pytest.raises(FileNotFoundError):
        os.stat(d.path("later.cern.ch"))
    first, = d.logged_attempts("later.cern.ch")
    assert first["exit_code"] == 16 and first["retry_in_s"] == 1.0
    d.env.add_repo("later.cern.ch")  # the repository appears on the server

    def mounted() -> bool:
        # Lookups within the backoff fail at once without a boot; the first one after it
        # boots again and, the repository being there now, mounts.
        try:
            return (d.path("later.cern.ch") / "README").exists()
        except OSError:
            return False

    d.wait_for("the retry after the backoff", mounted)
    d.wait_mounted("later.cern.ch")
    assert d.env.boots().count("later.cern.ch") == 2
    assert [a["result"] for a in d.mount_attempts("later.cern.ch")] == ["failed", "mounted"]
