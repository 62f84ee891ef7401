"""Names: validated before anything starts; nothing can inject an option or an argument."""

from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path

import pytest
from conftest import Daemon
from hypothesis import given, settings, strategies as st

from cvmfsd.config import Config
from cvmfsd.core import backend
from cvmfsd.core.names import (
    _PROBED_SUFFIXES as PROBED_SUFFIXES,
    PROBED_NAMES,
    InvalidName,
    NamePolicy,
    check,
    check_syntax,
)

# Written independently of cvmfsd.core.names: the autofs program map rule (interface §7).
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


def expected_valid(name: str) -> bool:
    """The documented rule: autofs' rule, at most 60 characters, no '..', and not one of the
    names that tools probe in every directory (names.PROBED_NAMES and suffixes like .so)."""
    return (autofs_valid(name) and ".." not in name and name not in PROBED_NAMES
            and not name.endswith(PROBED_SUFFIXES))


def accepted(name: str) -> bool:
    try:
        check_syntax(name)
        return True
    except InvalidName:
        return False


# Real repository names (from cvmfs-config and OSG's lists) must all be accepted.
REAL_NAMES = ["atlas.cern.ch", "cvmfs-config.cern.ch", "sft.cern.ch", "lhcb-condb.cern.ch",
              "oasis.opensciencegrid.org", "config-osg.opensciencegrid.org",
              "singularity.opensciencegrid.org", "icecube.opensciencegrid.org",
              "ligo.osgstorage.org", "unpacked.cern.ch", "alice-ocdb.cern.ch",
              "grid.cern.ch", "belle.cern.ch", "sw.hsf.org", "dune.opensciencegrid.org",
              "cvmfs-config.galaxyproject.org", "data.galaxyproject.org", "a.b", "1.2"]

# Names of the syntax's own shape: labels of [A-Za-z0-9_-], joined by dots, the first one
# starting alphanumeric; almost all of them valid.
LABEL = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
VALID_SHAPED = st.builds(
    lambda first, rest: ".".join([first, *rest]),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,11}", fullmatch=True),
    st.lists(LABEL, min_size=1, max_size=4))


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_repository_names_are_accepted(name: str) -> None:
    check(name, NamePolicy())


@settings(max_examples=500, deadline=None)
@given(VALID_SHAPED)
def test_generated_valid_names_are_accepted(name: str) -> None:
    """Accepted exactly when the documented rule says so: a checker that rejects every name
    fails here (nearly every generated name is valid), one that accepts too much fails
    test_syntax_matches_autofs_rule."""
    assert accepted(name) == expected_valid(name), name


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(min_size=1, max_size=80), VALID_SHAPED,
                 st.from_regex(r"[A-Za-z0-9._-]{1,70}", fullmatch=True)))
def test_syntax_matches_autofs_rule(name: str) -> None:
    assert accepted(name) == expected_valid(name), name


def test_the_generators_mostly_make_valid_names() -> None:
    """Without this, the property above could pass on a generator that makes only bad names."""
    from hypothesis import find

    names: list[str] = []

    def collect(name: str) -> bool:
        names.append(name)
        return len(names) >= 200

    find(VALID_SHAPED, collect, settings=settings(max_examples=1000, database=None))
    assert sum(map(expected_valid, names)) >= 150, names[:20]


def _bad_names(count: int, seed: int) -> list[str]:
    """count distinct names that are not repository names: random text, and valid names
    broken in one place (the near misses a checker is most likely to let through)."""
    rng = random.Random(seed)
    alphabet = ([chr(c) for c in range(1, 128) if chr(c) not in "/"] + list("éßøΩЖ中字😀") +
                ["\u200b", "\ufeff", "\u0301"])
    out: set[str] = set()
    while len(out) < count:
        kind = rng.randrange(4)
        if kind == 0:
            name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120)))
        else:
            good = rng.choice(REAL_NAMES)
            if kind == 1:  # one character outside [A-Za-z0-9._-], anywhere
                at = rng.randrange(len(good) + 1)
                name = good[:at] + rng.choice([c for c in alphabet if not
                                               (c.isascii() and (c.isalnum() or c in "._-"))]) \
                    + good[at:]
            elif kind == 2:  # the shape is wrong
                name = rng.choice([good + ".", "." + good, "-" + good, "_" + good,
                                   good.replace(".", "..", 1), good.replace(".", ""),
                                   good + "." + "x" * rng.randrange(60, 200),
                                   good + rng.choice(PROBED_SUFFIXES)])
            else:  # a name that tools probe
                name = rng.choice(sorted(PROBED_NAMES)) + rng.choice(["", "." + good])
                name = name if not expected_valid(name) else name + ".so"
        if not expected_valid(name) and name not in (".", "..", ".snapshots") and \
                "\x00" not in name:
            out.add(name)
    return sorted(out)


def test_10000_bad_names_through_the_root(daemon: Daemon) -> None:
    names = _bad_names(10_000, seed=19)
    assert len(set(names)) == 10_000 and not any(map(accepted, names))
    outcomes: dict[int, int] = {}
    for name in names:
        try:
            os.stat(os.path.join(daemon.root, name))
            raise AssertionError(f"{name!r} exists")
        except OSError as exc:
            assert exc.errno in (errno.ENOENT, errno.EINVAL, errno.ENAMETOOLONG), name
            outcomes[exc.errno] = outcomes.get(exc.errno, 0) + 1
    assert sum(outcomes.values()) == 10_000  # every one went through the root
    assert daemon.env.boots() == []
    assert daemon.mount_attempts() == []
    assert daemon.proc.poll() is None
    assert (daemon.path("alice.cern.ch") / "README").exists()  # still serving
