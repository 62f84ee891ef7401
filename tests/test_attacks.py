"""Issue 12: no pod or local user can take down /cvmfs for the others. Each attack of the issue,
run as an unprivileged requester (uid 1001; "another pod" is a process in a cgroup of kubelet's
shape), against the daemon with the cvmfs2 stand-in. CI sizes by default, the issue's sizes with
CVMFSD_SOAK_FULL=1. Nothing here asserts a duration: what the attacks cost in time is measured
by the benchmark's "attack" scenario (bench/scenarios/attack.py)."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator
from typing import Any

import attack_kit as kit
import pytest
from conftest import Daemon, Env, _umount_below, soak_size


@pytest.fixture
def attack_daemon(start_daemon: Callable[..., Daemon], env: Env) -> Iterator[Callable[..., Daemon]]:
    """start_daemon with the root where other uids can reach it (pytest's tmp_path is 0700)."""
    started: list[Daemon] = []

    def start(**overrides: Any) -> Daemon:
        d = start_daemon(root=str(env.shared / "cvmfs"), **overrides)
        started.append(d)
        return d

    yield start
    for d in started:  # stopped here, so that a root left behind can be taken away after
        with contextlib.suppress(Exception):
            d.stop(timeout=60)
    _umount_below(env.shared)


@pytest.fixture
def pods() -> Iterator[kit.Pods]:
    try:
        made = kit.Pods()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"cannot make pod cgroups here: {exc}")
    try:
        yield made
    finally:
        made.remove()


def mib(n: int) -> str:
    return f"{n / kit.MiB:.1f} MiB"


# --- 1. memory per lookup of a failed name ------------------------------------------------------
# RSS allowed to grow over the loop: allocator noise and the first warm-up of caches, nothing
# per lookup. The old code kept each raise's traceback on the stored error: 124 MB per 100k
# lookups, 25 MB at the CI size already.
LOOKUP_RSS_BOUND = 8 * kit.MiB


@pytest.mark.soak
def test_failed_name_lookup_loop_stays_bounded(attack_daemon: Callable[..., Daemon]) -> None:
    d = attack_daemon()
    name = "nope.example.org"
    path = d.path(name)
    # Warm-up: the boot, its failure, the first few thousand lookups (allocator arenas, caches).
    warm = kit.run(kit.STAT_LOOP, path, 2000)
    assert warm == {errno.ENOENT: 2000}
    before = kit.rss(d.pid)
    lookups = soak_size(ci=20_000, full=1_000_000)
    sampler = kit.RssSampler(d.pid)
    try:
        seen = kit.run(kit.STAT_LOOP, path, lookups, timeout=3600)
    finally:
        sampler.stop()
    after = kit.rss(d.pid)
    print(f"\n{lookups} lookups of a failed name: RSS {mib(before)} -> {mib(after)}, "
          f"peak {mib(sampler.peak)}")
    assert seen == {errno.ENOENT: lookups}
    assert d.env.boots().count(name) == 1
    assert max(after, sampler.peak) - before <= LOOKUP_RSS_BOUND
