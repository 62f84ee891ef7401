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
from conftest import Daemon, Env, _umount_below, mounts_under, soak_size


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


# --- 2. one requester fills the mount slots ----------------------------------------------------
def refusals(d: Daemon, requester: str, error: int) -> list[dict[str, Any]]:
    return [r for r in d.events("mount") if r.get("result") == "refused"
            and r.get("requester") == requester and r.get("errno") == errno.errorcode[error]]


def test_one_requester_holds_at_most_its_share_of_mounts(attack_daemon: Callable[..., Daemon],
                                                         env: Env, pods: kit.Pods) -> None:
    repos = [f"s{i}.attack.org" for i in range(9)]
    for repo in repos:
        env.add_repo(repo)
    d = attack_daemon(max_mounted=8, requester_mounts=3, expire_timeout=0)
    readme = [d.path(repo) / "README" for repo in repos]
    # uid 1001 fills its share and keeps a file open in each; the next name is refused.
    attacker = kit.Holder(readme[0:4])
    try:
        assert list(attacker.result.values()) == [0, 0, 0, errno.ENOSPC], attacker.result
        # Log lines reach the file through the daemon's log thread: a moment later.
        refused, = kit.wait_for(lambda: refusals(d, "uid 1001", errno.ENOSPC), 10, "no line")
        assert refused["repo"] == repos[3] and "requester_mounts" in refused["error"]
        # Another uid still mounts a new repository...
        assert kit.run(kit.FIRST_ACCESS, readme[4], uid=kit.OTHER_UID)["errno"] == 0
        # ...and so does another pod with the same uid: a share of its own, bounded too.
        pod, procs = pods.new()
        neighbour = kit.Holder(readme[5:9], pod=procs)
        try:
            assert list(neighbour.result.values()) == [0, 0, 0, errno.ENOSPC], neighbour.result
            refused, = kit.wait_for(lambda: refusals(d, f"uid 1001 pod {pod}", errno.ENOSPC),
                                    10, "no line")
            assert refused["repo"] == repos[8]
        finally:
            neighbour.close()
    finally:
        attacker.close()
    assert sorted(e["repo"] for e in d.events("mount") if e["result"] == "mounted") == sorted(
        repos[0:3] + repos[4:8])
    assert sorted(env.boots()) == sorted(repos[0:3] + repos[4:8])  # a refusal starts nothing


def test_slow_failing_boots_of_one_requester_do_not_hold_up_another(
        attack_daemon: Callable[..., Daemon], env: Env, pods: kit.Pods) -> None:
    slow = [f"slow{i}.attack.org" for i in range(8)]
    for name in slow:  # not on the server either: they would fail anyway, only later
        env.repo_config(name, CVMFS_STANDIN_BOOT_DELAY="60", CVMFS_STANDIN_FAIL="4")
    d = attack_daemon(max_concurrent_boots=4, requester_boots=2, mount_timeout=90.0)
    stop = env.tmp / "stop-attack"
    attacker = kit.start(kit.THREADS, str(d.root / "slow{}.attack.org"), len(slow), stop)
    try:
        # The attacker's boots take its two boot slots; its other six names wait their turn.
        kit.wait_for(lambda: len(env.boots()) >= 2, 30, "the attacker's boots did not start")
        # (Seen in mountinfo: a stat there would wait in the kernel for the boot too.)
        kit.wait_for(lambda: {str(d.path(n)) for n in slow} <= set(mounts_under(d.root)), 30,
                     "the attacker's names were not all premounted")
        # First accesses by another uid and by another pod of the same uid: both served while
        # every one of the attacker's boots is still under way.
        assert kit.run(kit.FIRST_ACCESS, d.path("atlas.cern.ch") / "README",
                       uid=kit.OTHER_UID)["errno"] == 0
        _, procs = pods.new()
        assert kit.run(kit.FIRST_ACCESS, d.path("cms.cern.ch") / "README",
                       pod=procs)["errno"] == 0
        assert not [r for r in d.mount_attempts() if r["repo"] in slow], \
            "a slow boot of the attacker finished first: the first accesses waited for it"
        assert len([b for b in env.boots() if b in slow]) == 2
        assert attacker.poll() is None
    finally:
        stop.touch()
        attacker.kill()
        attacker.communicate(timeout=60)
