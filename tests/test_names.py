"""Names: validated before anything starts; nothing can inject an option or an argument."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
from conftest import Daemon
from hypothesis import HealthCheck, given, settings, strategies as st

from cvmfsd import backend
from cvmfsd.config import Config
from cvmfsd.names import InvalidName, NamePolicy, check, check_syntax

# Written independently of cvmfsd.names: the autofs program map rule (interface §7).
AUTOFS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

INJECTIONS = ["a.b,allow_other", "-o", "-oallow_other.x", "x.y/../z", "a.b\nc.d", "a.b\x00c.d",
              "a" * 300 + ".cern.ch", "a.b c.d", "a.b;rm.x", "$(id).x", "a.b:c.d", "a.b=c",
              "..", "a..b", "a.b.", ".a.b", "é.cern.ch"]


def autofs_valid(name: str) -> bool:
    return bool(AUTOFS.match(name)) and "." in name and not name.endswith(".") and len(name) <= 60


@pytest.mark.parametrize("name", INJECTIONS)
def test_injection_rejected_before_argv(name: str) -> None:
    with pytest.raises(InvalidName):
        check(name, NamePolicy())
    cfg = Config(cvmfs2=Path("/bin/true"))
    with pytest.raises(InvalidName):
        backend.argv(cfg, name, 5)


def test_argv_is_exactly_the_contract() -> None:
    cfg = Config(cvmfs2=Path("/usr/bin/cvmfs2"), cvmfs2_config=(Path("/a.conf"), Path("/b.conf")))
    assert backend.argv(cfg, "sft.cern.ch", 7) == [
        "/usr/bin/cvmfs2", "-o",
        "fsname=cvmfs2,system_mount,allow_other,libfuse=3,config=/a.conf:/b.conf",
        "sft.cern.ch", "/dev/fd/7"]
    assert backend.argv(Config(cvmfs2=Path("/c")), "a.b", 7)[2].count("config=") == 0
    # Dropping root as the system mount helper does (CVMFS_USER):
    creds = backend.Credentials("cvmfs", 998, 997)
    assert backend.argv(cfg, "sft.cern.ch", 7, credentials=creds)[2].startswith(
        "fsname=cvmfs2,system_mount,allow_other,libfuse=3,uid=998,gid=997,config=")


def test_injections_through_the_root_start_nothing(daemon: Daemon) -> None:
    for name in INJECTIONS:
        if "\x00" in name or "/" in name or name == "..":
            continue  # cannot be one path component below the root
        with pytest.raises(OSError) as exc:
            os.stat(daemon.root / name)
        assert exc.value.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.EINVAL), name
    assert daemon.env.boots() == []


def test_policy_globs() -> None:
    policy = NamePolicy(allow=("*.cern.ch", "*.opensciencegrid.org"), deny=("atlas*.cern.ch",))
    assert policy.permits("sft.cern.ch")
    assert policy.permits("oasis.opensciencegrid.org")
    assert not policy.permits("atlas-condb.cern.ch")
    assert not policy.permits("evil.example.org")


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_syntax_matches_autofs_rule(name: str) -> None:
    try:
        check_syntax(name)
        accepted = True
    except InvalidName:
        accepted = False
    if accepted:
        assert autofs_valid(name) and ".." not in name


bad_names = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1, max_size=120,
).filter(lambda s: not autofs_valid(s) and s not in (".", "..", ".snapshots"))


def test_10000_bad_names_through_the_root(daemon: Daemon) -> None:
    outcomes: dict[int, int] = {}

    @settings(max_examples=10_000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bad_names)
    def probe(name: str) -> None:
        try:
            os.stat(os.path.join(daemon.root, name))
            raise AssertionError(f"{name!r} exists")
        except OSError as exc:
            outcomes[exc.errno] = outcomes.get(exc.errno, 0) + 1
            assert exc.errno in (errno.ENOENT, errno.EINVAL, errno.ENAMETOOLONG), name

    probe()
    assert sum(outcomes.values()) >= 5_000
    assert daemon.env.boots() == []
    assert daemon.mount_attempts() == []
    assert daemon.proc.poll() is None
    assert (daemon.path("alice.cern.ch") / "README").exists()  # still serving
