"""Issue 12: no pod or local user can take down /cvmfs for the others. Each attack of the issue,
run as an unprivileged requester (uid 1001; "another pod" is a process in a cgroup of kubelet's
shape), against the daemon with the cvmfs2 stand-in. CI sizes by default, the issue's sizes with
CVMFSD_SOAK_FULL=1. Nothing here asserts a duration: what the attacks cost in time is measured
by the benchmark's "attack" scenario (bench/scenarios/attack.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attack_kit as kit
import psutil
import pytest
from conftest import (
    REPO_ROOT,
    Daemon,
    Env,
    _umount_below,
    mounts_under,
    reap,
    soak_size,
    toml_config,
)

from cvmfs2_standin.kit import make_repo, root_hash


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
    # A backoff longer than the loop (the full size takes minutes): exactly one boot. The
    # default backoff's retries are test_failing_names_boot_once_over_rounds's.
    d = attack_daemon(backoff_initial=3600.0, backoff_max=3600.0)
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
    d.wait_mounted(*repos[0:3], *repos[4:8])  # a line follows the mount it describes
    assert sorted(e["repo"] for e in d.events("mount") if e["result"] == "mounted") == sorted(
        repos[0:3] + repos[4:8])
    assert sorted(env.boots()) == sorted(repos[0:3] + repos[4:8])  # a refusal starts nothing


def test_slow_failing_boots_of_one_requester_do_not_hold_up_another(
        attack_daemon: Callable[..., Daemon], env: Env, pods: kit.Pods) -> None:
    slow = [f"slow{i}.attack.org" for i in range(8)]
    gate = env.shared / "end-slow-boots"  # the boots last until the test is done
    for name in slow:  # not on the server either: they would fail anyway, only later
        env.repo_config(name, CVMFS_STANDIN_BOOT_GATE=str(gate), CVMFS_STANDIN_FAIL="4")
    d = attack_daemon(max_concurrent_boots=4, requester_boots=2, mount_timeout=120.0)
    stop = env.shared / "stop-attack"
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
        gate.touch()
        attacker.kill()
        kit.finish(attacker, 60)



# A share is a quarter of the node's limit by default, and boot slots have a reserve for
# requesters with no boot running: two requesters (two pods of one user, or the user on the
# host and in one pod) do not take everything.
def test_two_pods_do_not_take_every_mount_slot(attack_daemon: Callable[..., Daemon], env: Env,
                                               pods: kit.Pods) -> None:
    repos = [f"s{i}.attack.org" for i in range(7)]
    for repo in repos:
        env.add_repo(repo)
    d = attack_daemon(max_mounted=8, expire_timeout=0)  # requester_mounts: 2
    holders = [kit.Holder([d.path(r) / "README" for r in repos[i:i + 3]], pod=pods.new()[1])
               for i in (0, 3)]
    try:
        # Each pod holds its share; its third name is refused.
        assert [list(h.result.values()) for h in holders] == [[0, 0, errno.ENOSPC]] * 2
        assert kit.run(kit.FIRST_ACCESS, d.path(repos[6]) / "README",
                       uid=kit.OTHER_UID)["errno"] == 0
    finally:
        for h in holders:
            h.close()


def test_two_pods_do_not_take_every_boot_slot(attack_daemon: Callable[..., Daemon], env: Env,
                                              pods: kit.Pods) -> None:
    slow = ["slow0.attack.org", "slow1.attack.org"]
    gate = env.shared / "end-slow-boots"  # the boots last until the test is done
    for name in slow:
        env.repo_config(name, CVMFS_STANDIN_BOOT_GATE=str(gate), CVMFS_STANDIN_FAIL="4")
    # Two shared slots (one per requester) and one in reserve.
    d = attack_daemon(max_concurrent_boots=2, mount_timeout=120.0)
    attackers = [kit.start(kit.FIRST_ACCESS, d.path(name), pod=pods.new()[1]) for name in slow]
    try:
        kit.wait_for(lambda: len(env.boots()) == 2, 30, "the pods' boots did not start")
        assert kit.run(kit.FIRST_ACCESS, d.path("atlas.cern.ch") / "README",
                       uid=kit.OTHER_UID)["errno"] == 0
        assert not d.mount_attempts("slow0.attack.org") + d.mount_attempts("slow1.attack.org"), \
            "the first access waited for the pods' slow boots to end"
    finally:
        gate.touch()
        for a in attackers:
            a.kill()
            kit.finish(a, 60)

# --- 3. many threads on slow-failing names -------------------------------------------------------
def slow_failing(env: Env, domain: str, delay: float, code: int = 4) -> None:
    """Every repository of `domain` boots for `delay` seconds and then fails with exit `code`
    (the stand-in's knobs, set by the client configuration for the whole domain)."""
    with open(env.client_config, "a") as f:
        f.write(f'case "$CVMFS_FQRN" in *.{domain}) CVMFS_STANDIN_BOOT_DELAY={delay}; '
                f"CVMFS_STANDIN_FAIL={code};; esac\n")


def status(d: Daemon) -> dict[str, Any]:
    reply = kit.control(d.run_dir / "cvmfsd.sock", "status")
    assert reply["ok"], reply
    return reply["result"]


@pytest.mark.soak
def test_many_threads_on_slow_failing_names_leave_the_root_to_others(
        attack_daemon: Callable[..., Daemon], env: Env, pods: kit.Pods) -> None:
    """The issue's attack 3 at its size (full: 600 threads, the defaults). In pre-mounted mode
    an attacker's request waits in the kernel, on its own name's mount, not in the root: it
    holds at most its share of mounts (requester_mounts, 500 by default; ENOSPC beyond) and of
    boot slots, and the root keeps answering everyone else."""
    slow_failing(env, "slow.attack.org", 60)
    threads = soak_size(ci=150, full=600)
    d = attack_daemon(mount_timeout=90.0)
    share = 500  # requester_mounts, derived from max_mounted (1000) / 2
    stop = env.shared / "stop-attack"
    attacker = kit.start(kit.THREADS, str(d.root / "n{}.slow.attack.org"), threads, stop)
    sampler = kit.RssSampler(d.pid)
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "started"

        def premounted() -> int:
            return sum(1 for m in mounts_under(d.root) if m.endswith(".slow.attack.org"))

        # Full pressure: every thread waits on a name of its own, up to the attacker's share.
        kit.wait_for(lambda: premounted() >= min(threads, share), 120,
                     f"the attacker's names were not premounted ({premounted()})")
        if threads > share:
            kit.wait_for(lambda: refusals(d, "uid 1001", errno.ENOSPC), 30,
                         "no refusal beyond the share of mounts")
        pressed = status(d)["liveness"]["checked_at"] or 0
        # The root lists, the daemon's own liveness check of the root passes under the attack...
        # (listing the attacker's booting names whose mounts are in place, and no others)
        in_place = {os.path.basename(m) for m in mounts_under(d.root)}
        listed = set(os.listdir(d.root))
        in_place |= {os.path.basename(m) for m in mounts_under(d.root)}
        assert listed <= in_place, listed - in_place
        seen = kit.wait_for(lambda: (s := status(d))["liveness"]["checked_at"] > pressed and s,
                            30, "no liveness check of the root during the attack")
        assert seen["liveness"]["ok"] is True, seen["liveness"]
        assert not seen["problems"], seen["problems"]
        # ...and other requesters' first accesses are served while the attacker still waits.
        assert kit.run(kit.FIRST_ACCESS, d.path("atlas.cern.ch") / "README",
                       uid=kit.OTHER_UID)["errno"] == 0
        _, procs = pods.new()
        assert kit.run(kit.FIRST_ACCESS, d.path("cms.cern.ch") / "README",
                       pod=procs)["errno"] == 0
        assert premounted() <= share
        assert len([b for b in env.boots() if b.endswith(".slow.attack.org")]) <= 4
        assert attacker.poll() is None
        # Refusals are logged at a bounded rate: 10 lines per 10 s and requester at most.
        lines = refusals(d, "uid 1001", errno.ENOSPC)
        span = (sampler.samples[-1][0] if sampler.samples else 0) + 10
        assert len(lines) <= 10 * (span // 10 + 1), len(lines)
    finally:
        stop.touch()
        attacker.kill()
        kit.finish(attacker, 60)
        sampler.stop()
    print(f"\n{threads} threads: {premounted()} names premounted, "
          f"{len(refusals(d, 'uid 1001', errno.ENOSPC))} refusal lines; RSS "
          f"{mib(sampler.samples[0][1])} -> peak {mib(sampler.peak)}")


def fast_failing(env: Env, domain: str) -> Path:
    """A cvmfs2 for the daemon under which every repository of `domain` fails at once (exit 16,
    as a missing one), one boot line each in env.boots_log; anything else is the stand-in."""
    return kit.write_fast_failing(env.tmp / "cvmfs2-fast-failing", env.cvmfs2, env.boots_log,
                                  domain)


def assert_rate_limited(lines: list[dict[str, Any]], refused: int) -> None:
    """Log lines of one kind and requester: at most 10 per 10 s window (a window starts with the
    first line after the previous one ended), and what was held back is counted in the next
    line (`suppressed`): lines plus the counts reported are at most the refusals made."""
    from datetime import datetime

    def at(line: dict[str, Any]) -> float:
        return datetime.fromisoformat(line["timestamp"]).timestamp()

    windows: list[list[dict[str, Any]]] = []
    for line in lines:
        # 9.9: the log's wall-clock stamp against the throttle's monotonic clock
        if not windows or at(line) - at(windows[-1][0]) >= 9.9:
            windows.append([])
        windows[-1].append(line)
    assert all(len(w) <= 10 for w in windows), [len(w) for w in windows]
    assert len(lines) + sum(line["suppressed"] for line in lines) <= refused


def test_requests_waiting_in_the_root_beyond_the_share_get_eagain(
        attack_daemon: Callable[..., Daemon], env: Env, pods: kit.Pods) -> None:
    """What waits in the root (a request on a name whose mount is not attached yet) is shared
    out per requester. Names that fail at once keep the attacker's threads coming back to that
    window; with a share of 2 the others are refused with EAGAIN, logged at a bounded rate."""
    d = attack_daemon(cvmfs2=str(fast_failing(env, "fail.attack.org")), requester_waits=2,
                      requester_failed_boots=0)  # every name boots: the window comes back
    threads = soak_size(ci=64, full=600)
    stop = env.shared / "stop-attack"
    attacker = kit.start(kit.THREADS, str(d.root / "n{}.fail.attack.org"), threads, stop)

    def eagain_lines() -> list[dict[str, Any]]:
        return [r for r in d.events("wait_refused") if r.get("requester") == "uid 1001"]

    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "started"
        kit.wait_for(eagain_lines, 60, "no request of the attacker was refused with EAGAIN")
        # Held back past 10 lines in 10 s: the next window's first line says how many.
        kit.wait_for(lambda: [r for r in eagain_lines() if r["suppressed"] > 0], 60,
                     "no line reported refusals held back")
        # Meanwhile the root serves others: a listing, first accesses of another uid and pod.
        os.listdir(d.root)
        assert kit.run(kit.FIRST_ACCESS, d.path("atlas.cern.ch") / "README",
                       uid=kit.OTHER_UID)["errno"] == 0
        _, procs = pods.new()
        assert kit.run(kit.FIRST_ACCESS, d.path("cms.cern.ch") / "README",
                       pod=procs)["errno"] == 0
    finally:
        stop.touch()
        out, _ = kit.finish(attacker, 300)
    seen = kit.decode(out.strip().splitlines()[-1])
    print(f"\n{threads} threads: {seen}; {len(eagain_lines())} EAGAIN lines")
    # ESTALE: see test_a_lookup_racing_a_failing_boot_never_sees_estale.
    assert set(seen) <= {errno.ENOENT, errno.EAGAIN, errno.ESTALE}, seen
    assert_rate_limited(eagain_lines(), seen[errno.EAGAIN])


def test_a_lookup_racing_a_failing_boot_never_sees_estale(
        attack_daemon: Callable[..., Daemon], env: Env) -> None:
    """A name whose boot fails answers with its error (ENOENT here), whenever the lookup comes:
    never with ESTALE, the kernel's signal to walk again, which a process sees only when the
    walk again lands where it did."""
    d = attack_daemon(cvmfs2=str(fast_failing(env, "fail.attack.org")),
                      requester_failed_boots=0)  # thousands of boots, each a chance to race
    stop = env.shared / "stop-attack"
    attacker = kit.start(kit.THREADS, str(d.root / "n{}.fail.attack.org"), 32, stop)
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "started"
        kit.wait_for(lambda: len(env.boots()) >= soak_size(ci=2000, full=20_000), 600,
                     "the attacker's names did not fail")
    finally:
        stop.touch()
        out, _ = kit.finish(attacker, 300)
    seen = kit.decode(out.strip().splitlines()[-1])
    print(f"\n{seen}")
    assert set(seen) == {errno.ENOENT}, seen


# --- 4. logging: stderr nobody reads, stderr gone ----------------------------------------------
class Unlogged:
    """cvmfsd started by hand with stdout and stderr as given (no log file to follow): ready
    once its status socket answers; stopped by its pid, and whatever it left running (its own
    children, by pid and start time) killed after."""

    def __init__(self, env: Env, argv_prefix: list[str] | None = None,
                 stderr: int | None = None, **overrides: Any) -> None:
        self.env = env
        self.root = env.shared / "cvmfs"
        self.run_dir = env.tmp / "run"
        cfg = env.tmp / "cvmfsd-unlogged.toml"
        cfg.write_text(toml_config(env, root=str(self.root), **overrides))
        argv = [*(argv_prefix or []), sys.executable, "-m", "cvmfsd", "run", "-c", str(cfg)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr,
                                     stderr=stderr, cwd=REPO_ROOT)
        self.children: dict[int, float] = {}
        kit.wait_for(self._ready, 30, "cvmfsd did not answer on its status socket")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"cvmfsd exited {self.proc.returncode}")
        try:
            return bool(status(self)["liveness"]["ok"])  # type: ignore[arg-type]
        except OSError:
            return False

    def path(self, name: str) -> Path:
        return self.root / name

    def remember_children(self) -> None:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.children[p.pid] = p.create_time()

    def stop(self, timeout: float = 60) -> int:
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid, created in self.children.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
        reap(list(self.children))
        _umount_below(self.env.shared)
        _umount_below(self.env.tmp)


@pytest.fixture
def unlogged(env: Env) -> Iterator[Callable[..., Unlogged]]:
    made: list[Unlogged] = []

    def start(**kw: Any) -> Unlogged:
        d = Unlogged(env, **kw)
        made.append(d)
        return d

    yield start
    for d in made:
        d.cleanup()


def make_noise(d: Unlogged | Daemon, env: Env, failing: int) -> None:
    """What users make the daemon log: failed boots (one line each, with cvmfs2's stderr) and
    refused lookups (one line per requester and 10 s)."""
    seen = kit.run(kit.STAT_NAMES, str(d.root / "noise{}.fail.attack.org"), 0, failing)
    # ESTALE (and then ENOSPC for the next name, while that boot still holds the requester's
    # one mount): test_a_lookup_racing_a_failing_boot_never_sees_estale, a defect of its own.
    assert set(seen) <= {errno.ENOENT, errno.ESTALE, errno.ENOSPC}, seen
    assert seen.get(errno.ENOENT, 0) > failing // 2, seen
    holder = kit.Holder([d.path("lhcb.cern.ch") / "README"])  # its share of mounts: 1
    try:
        seen = kit.run(kit.STAT_NAMES, str(d.root / "x{}.attack.org"), 0, 200)
        assert seen == {errno.ENOSPC: 200}, seen
    finally:
        holder.close()


def serves(d: Unlogged | Daemon, name: str, uid: int = kit.OTHER_UID) -> None:
    """The root lists and another user's first access of a new repository works."""
    os.listdir(d.root)
    assert kit.run(kit.FIRST_ACCESS, d.path(name) / "README", uid=uid)["errno"] == 0


def test_stderr_that_nobody_reads(unlogged: Callable[..., Unlogged], env: Env) -> None:
    r, w = os.pipe()
    fcntl.fcntl(r, 1031, 4096)  # F_SETPIPE_SZ: full after a few lines, not 64 KiB
    try:
        d = unlogged(stderr=w, cvmfs2=str(fast_failing(env, "fail.attack.org")),
                     requester_mounts=1, log_format="json")
    finally:
        os.close(w)
    try:
        make_noise(d, env, failing=50)
        # Admin requests are logged one line each: enough to overflow the daemon's queue.
        lines = 15_000
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(d.run_dir / "cvmfsd.sock"))
            request = json.dumps({"cmd": "umount", "name": "unknown.attack.org"}).encode()
            sender = threading.Thread(target=sock.sendall, args=((request + b"\n") * lines,))
            sender.start()
            replies = 0
            while replies < lines:
                chunk = sock.recv(1 << 20)
                assert chunk, f"the status socket closed after {replies} replies"
                replies += chunk.count(b"\n")
            sender.join()
        serves(d, "atlas.cern.ch")
        # A reader comes back: what was dropped is counted, in a line of its own.
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.extend(iter(
            lambda: os.read(r, 1 << 16), b"")), daemon=True)
        reader.start()
        serves(d, "cms.cern.ch", uid=kit.OTHER_UID + 1)  # one more line at least

        def records() -> list[dict[str, Any]]:
            out = []
            for line in b"".join(received).splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
            return out

        dropped = kit.wait_for(lambda: [x for x in records()
                                        if x.get("event") == "log_lines_dropped"], 60,
                               "no log_lines_dropped line")
        # Lines are queued and dropped whole: every line that arrives is one JSON record.
        text = b"".join(received)
        assert len(records()) == len(text.splitlines()), "lines glued or cut"
        arrived = sum(1 for x in records() if x.get("event") == "control_request")
        assert sum(x["count"] for x in dropped) + arrived >= lines
        assert d.stop() == 0
        reader.join(30)
        assert any(x.get("event") == "stopped" for x in records())
    finally:
        os.close(r)


@pytest.mark.parametrize("how", ["reader-gone", "closed-at-start"])
def test_stderr_gone(unlogged: Callable[..., Unlogged], env: Env, how: str) -> None:
    """stderr whose reader went away (EPIPE on each write), or closed before the daemon
    started: it keeps serving under the same noise and stops cleanly."""
    overrides = {"cvmfs2": str(fast_failing(env, "fail.attack.org")), "requester_mounts": 1,
                 "log_format": "json"}
    if how == "reader-gone":
        r, w = os.pipe()
        try:
            d = unlogged(stderr=w, **overrides)
        finally:
            os.close(w)
        os.close(r)
    else:
        d = unlogged(argv_prefix=["sh", "-c", 'exec "$@" 2>&-', "sh"], **overrides)
    make_noise(d, env, failing=50)
    serves(d, "atlas.cern.ch")
    serves(d, "cms.cern.ch", uid=kit.OTHER_UID + 1)
    assert d.proc.poll() is None
    assert status(d)["state"] == "running"
    # Nothing loops on the lost lines: the daemon idles (CPU seconds over 2 s of nothing).
    before = sum(psutil.Process(d.pid).cpu_times()[:2])
    time.sleep(2)
    assert sum(psutil.Process(d.pid).cpu_times()[:2]) - before < 0.5
    assert d.stop() == 0
    assert not mounts_under(d.root)


def test_refusal_lines_are_rate_limited(attack_daemon: Callable[..., Daemon]) -> None:
    d = attack_daemon(requester_mounts=1)
    holder = kit.Holder([d.path("lhcb.cern.ch") / "README"])  # uid 1001's one mount
    try:
        refused = soak_size(ci=500, full=20_000)
        seen = kit.run(kit.STAT_NAMES, str(d.root / "x{}.attack.org"), 0, refused)
        assert seen == {errno.ENOSPC: refused}, seen
        # The window ends 10 s after the first line; the next refusal's line then tells how
        # many were held back.
        extra = 0

        def reported() -> list[dict[str, Any]]:
            nonlocal extra
            lines = refusals(d, "uid 1001", errno.ENOSPC)
            if not any(r["suppressed"] for r in lines):
                extra += 1
                assert kit.run(kit.STAT_LOOP, d.path(f"y{extra}.attack.org"), 1) == {
                    errno.ENOSPC: 1}
                return []
            return lines

        lines = kit.wait_for(reported, 60, "no line reported refusals held back", period=0.5)
    finally:
        holder.close()
    print(f"\n{refused + extra} refusals: {len(lines)} lines, suppressed "
          f"{[r['suppressed'] for r in lines if r['suppressed']]}")
    assert_rate_limited(lines, refused + extra)
    assert [r["suppressed"] for r in lines[:10]] == [0] * 10
    assert refused - 10 <= lines[10]["suppressed"] <= refused - 10 + extra


# --- 5. the name table ----------------------------------------------------------------------------
def ctl(d: Daemon | Unlogged, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvmfsd.admin.ctl", "--socket",
                           str(d.run_dir / "cvmfsd.sock"), *args], capture_output=True,
                          text=True, timeout=600, cwd=REPO_ROOT)


# What max_names (4,096) remembered names cost: about 3.9 KiB each (an entry, its two trio
# events, its failure with cvmfs2's stderr, the indexes: 5,000 names measured 33.5 -> 49.0 MiB),
# then the allocator's high-water mark of the churn (entries made and dropped): measured in
# steps of 5,000 names, 58.5 MiB at 10,000, 62 at 15,000, 62-65.5 from there up to 60,000.
# The old code kept every name: 35 -> 139 MB at 39,341.
NAME_TABLE_RSS_BOUND = 40 * kit.MiB


@pytest.mark.soak
def test_name_table_stays_bounded(attack_daemon: Callable[..., Daemon], env: Env) -> None:
    max_names = 4096  # the default
    # Without the failed-boot budget, which would refuse most of one requester's names: the
    # table must stay bounded for many requesters too.
    d = attack_daemon(cvmfs2=str(fast_failing(env, "fail.attack.org")), requester_mounts=1,
                      requester_failed_boots=0)
    names = soak_size(ci=5000, full=40_000)
    before = kit.rss(d.pid)
    seen = kit.run(kit.STAT_NAMES, str(d.root / "n{}.fail.attack.org"), 0, names,
                   timeout=3600)
    # ESTALE, and ENOSPC for the next name while that boot still holds uid 1001's one mount:
    # test_a_lookup_racing_a_failing_boot_never_sees_estale.
    assert set(seen) <= {errno.ENOENT, errno.ESTALE, errno.ENOSPC}, seen
    booted = names - seen.get(errno.ENOSPC, 0)
    assert len(env.boots()) == booted  # each failing name booted once

    def known() -> dict[str, int]:
        return status(d)["repositories"]

    # + 1: the name evicted by the last lookup is forgotten by the kernel after it, and stays
    # remembered (a failure) until the next lookup trims the table (see the report).
    counts = kit.wait_for(
        lambda: (c := known())["total"] <= max_names + c["mounted"] + 1 and c, 60,
        f"more names kept than max_names: {known()}")
    after = kit.rss(d.pid)
    print(f"\n{names} failing names: {counts}; RSS {mib(before)} -> {mib(after)}")
    assert after - before <= NAME_TABLE_RSS_BOUND
    # The oldest names were forgotten by the kernel and dropped: a lookup is a new boot.
    assert kit.run(kit.STAT_LOOP, d.path("n0.fail.attack.org"), 1) == {errno.ENOENT: 1}
    assert len(env.boots()) == booted + 1
    # The newest are remembered with their backoff: no boot.
    assert kit.run(kit.STAT_LOOP, d.path(env.boots()[-2]), 1) == {errno.ENOENT: 1}
    assert len(env.boots()) == booted + 1
    # Refused names never become entries: uid 1001 holds its one mount, then looks up more.
    holder = kit.Holder([d.path("lhcb.cern.ch") / "README"])
    try:
        total = known()["total"]
        refused = kit.run(kit.STAT_NAMES, str(d.root / "r{}.fail.attack.org"), 0, names // 4,
                          timeout=3600)
        assert refused == {errno.ENOSPC: names // 4}, refused
        assert known()["total"] == total
    finally:
        holder.close()
    # Everything still works: a new repository for another user, the admin's probe of every
    # name the daemon knows.
    serves(d, "atlas.cern.ch")
    probe = ctl(d, "probe", "--json")
    assert probe.returncode in (0, 3), probe.stderr
    results = json.loads(probe.stdout)["results"]
    assert {r["name"] for r in results if r["ok"]} >= {"atlas.cern.ch", "lhcb.cern.ch"}


def test_failed_boots_of_one_requester_are_budgeted(attack_daemon: Callable[..., Daemon],
                                                   env: Env, pods: kit.Pods) -> None:
    """A failed name keeps its backoff, but ever new names would each boot once: one
    requester's failed boots are budgeted (requester_failed_boots per minute). Past it, its
    lookups that would boot fail at once with EAGAIN: nothing boots, nothing is remembered,
    a rate-limited line says why; other requesters keep their own budgets."""
    budget = 10
    d = attack_daemon(cvmfs2=str(fast_failing(env, "fail.attack.org")),
                      requester_failed_boots=budget)
    names = 40
    seen = kit.run(kit.STAT_NAMES, str(d.root / "n{}.fail.attack.org"), 0, names)
    booted = len(env.boots())
    # One more boot if the run outlasted the budget's refill (one per 60/budget s).
    assert budget <= booted <= budget + 1, seen
    assert seen.get(errno.EAGAIN) == names - booted and set(seen) <= {
        errno.ENOENT, errno.ESTALE, errno.EAGAIN}, seen
    assert status(d)["repositories"]["total"] == booted  # the refused ones are not entries
    refused = kit.wait_for(lambda: refusals(d, "uid 1001", errno.EAGAIN), 10, "no line")
    assert "requester_failed_boots" in refused[0]["error"]
    assert_rate_limited(refused, names - booted)
    # Another uid and another pod of uid 1001: budgets of their own.
    assert kit.run(kit.STAT_LOOP, d.path("other.fail.attack.org"), 1,
                   uid=kit.OTHER_UID) == {errno.ENOENT: 1}
    _, procs = pods.new()
    assert kit.run(kit.STAT_LOOP, d.path("pod.fail.attack.org"), 1, pod=procs) == {
        errno.ENOENT: 1}
    serves(d, "atlas.cern.ch")
    assert len(env.boots()) == booted + 3
    # The budget refills: uid 1001 boots a new name again, one at a time.
    tries = iter(range(1000))
    kit.wait_for(lambda: kit.run(kit.STAT_LOOP, d.path(f"r{next(tries)}.fail.attack.org"),
                                 1) == {errno.ENOENT: 1}, 60, "the budget never refilled",
                 period=1.0)
    assert len(env.boots()) == booted + 4


# --- 6. backoff; pinned instances ---------------------------------------------------------------
@pytest.mark.soak
def test_failing_names_boot_once_over_rounds(attack_daemon: Callable[..., Daemon],
                                             env: Env) -> None:
    """The issue's 3 rounds over 5,000 failing names started 15,019 cvmfs2 (backoff 2 s); with
    the default backoff (60 s, then doubling) each name boots once. The issue's own size is
    beyond the default max_names (4,096): 15,000 boots still (the full size is expected to
    fail, see test_failing_names_beyond_max_names_boot_once_over_rounds)."""
    d = attack_daemon(cvmfs2=str(fast_failing(env, "fail.attack.org")), backoff_initial=60.0,
                      backoff_max=600.0, max_names=4096, requester_failed_boots=0)
    names = soak_size(ci=200, full=5000)
    for _ in range(3):
        seen = kit.run(kit.STAT_NAMES, str(d.root / "n{}.fail.attack.org"), 0, names,
                       timeout=3600)
        # ESTALE: test_a_lookup_racing_a_failing_boot_never_sees_estale.
        assert set(seen) <= {errno.ENOENT, errno.ESTALE}, seen
    print(f"\n3 rounds over {names} failing names: {len(env.boots())} boots")
    assert len(env.boots()) == names


def test_failing_names_beyond_max_names_boot_once_over_rounds(
        attack_daemon: Callable[..., Daemon], env: Env) -> None:
    d = attack_daemon(cvmfs2=str(fast_failing(env, "fail.attack.org")), max_names=16,
                      backoff_initial=60.0, backoff_max=600.0)
    for _ in range(3):
        seen = kit.run(kit.STAT_NAMES, str(d.root / "n{}.fail.attack.org"), 0, 32)
        assert set(seen) <= {errno.ENOENT, errno.ESTALE}, seen
    assert len(env.boots()) == 32


SW = "sw.cern.ch"


@pytest.fixture
def versioned(env: Env) -> Env:
    for n, tags in ((1, {"v1": "2024-01-01T00:00:00Z"}), (2, {"v2": "2025-01-01T00:00:00Z"}),
                    (3, None)):
        make_repo(env.server, SW, {"VERSION": f"release {n}\n"}, revision=n, tags=tags)
    return env


def pinned(d: Daemon, pin: str) -> Path:
    return d.root / ".snapshots" / f"{SW}@{pin}"


def workspaces(env: Env) -> list[str]:
    base = env.shared / "snapshots"
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


def test_pinned_instances_of_one_repository_are_bounded(attack_daemon: Callable[..., Daemon],
                                                        versioned: Env) -> None:
    d = attack_daemon(max_pins_per_repository=2, expire_timeout=0)
    hash2 = root_hash(versioned.server, SW, 2)
    first = ["tag=v1", f"hash={hash2}"]
    for pin in first:
        assert kit.run(kit.FIRST_ACCESS, pinned(d, pin) / "VERSION")["errno"] == 0
    assert len(workspaces(versioned)) == 2
    # Beyond the bound: ENOSPC for another pin of the same repository, whatever its kind, and
    # for 200 made-up hashes: not one boot, not one workspace.
    boots = len(versioned.boots())
    assert kit.run(kit.FIRST_ACCESS, pinned(d, "date=2025-06-01T00:00:00Z"))["errno"] == \
        errno.ENOSPC
    hashes = soak_size(ci=200, full=2000)
    seen = kit.run(kit.STAT_NAMES, str(d.root / ".snapshots" / f"{SW}@hash={{:040x}}"),
                   1, hashes + 1)
    assert seen == {errno.ENOSPC: hashes}, seen
    assert len(versioned.boots()) == boots
    assert len(workspaces(versioned)) == 2
    kit.wait_for(lambda: [r for r in refusals(d, "uid 1001", errno.ENOSPC)
                          if "max_pins_per_repository" in r["error"]], 10, "no refusal line")
    # The live repository is not a pin: it mounts.
    assert kit.run(kit.FIRST_ACCESS, d.path(SW) / "VERSION")["errno"] == 0
    # An unmounted pin takes its workspace with it and makes room for another.
    out = ctl(d, "umount", f"{SW}@tag=v1")
    assert out.returncode == 0, out.stderr
    assert len(workspaces(versioned)) == 1
    assert (pinned(d, "date=2025-06-01T00:00:00Z") / "VERSION").read_text() == "release 2\n"
    assert len(workspaces(versioned)) == 2
    # A stop unmounts them all, and removes every workspace.
    assert d.stop() == 0
    assert workspaces(versioned) == []


def test_failed_pins_leave_no_workspace(attack_daemon: Callable[..., Daemon],
                                        versioned: Env) -> None:
    d = attack_daemon()
    seen = kit.run(kit.STAT_NAMES, str(d.root / ".snapshots" / f"{SW}@hash={{:040x}}"), 1, 21)
    assert set(seen) <= {errno.ENOENT, errno.ESTALE}, seen  # cvmfs2: exit 16, no such hash
    kit.wait_for(lambda: len(d.mount_attempts()) == 20, 60, "the boots did not fail")
    assert d.stop() == 0
    assert workspaces(versioned) == []


# --- 7. a hung backend ----------------------------------------------------------------------------
class Stopped:
    """SIGSTOP a serving cvmfs2 that our daemon reported; SIGCONT it at the end if it is still
    that process (pid and start time)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.process.suspend()

    def gone(self) -> bool:
        try:
            return self.process.status() == psutil.STATUS_ZOMBIE or not self.process.is_running()
        except psutil.NoSuchProcess:
            return True

    def resume(self) -> None:
        with contextlib.suppress(psutil.Error):
            if self.process.is_running():  # compares the start time too
                self.process.resume()


def serving_pid(d: Daemon, repo: str) -> int:
    pids = [r["serving_pid"] for r in d.mount_attempts(repo) if r["result"] == "mounted"]
    return pids[-1]


def test_a_hung_backend_is_reported_killed_and_healed(attack_daemon: Callable[..., Daemon],
                                                      env: Env) -> None:
    hung, idle, busy = "atlas.cern.ch", "cms.cern.ch", "alice.cern.ch"
    # The kill must come after the probes below, with the reader: 20 s is far more than they
    # take even on a loaded machine (6 s was not: the backend was killed and healed mid-loop).
    d = attack_daemon(backend_hung_timeout=20.0, reconcile_interval=0.5, expire_timeout=2.0,
                      expire_min_age=0.5)
    holder = kit.Holder([d.path(hung) / "README", d.path(busy) / "README"])
    assert list(holder.result.values()) == [0, 0]
    assert kit.run(kit.FIRST_ACCESS, d.path(idle) / "README")["errno"] == 0
    d.wait_mounted(hung, idle, busy)
    stopped = Stopped(serving_pid(d, hung))
    reader = None
    try:
        # The daemon's next call on it (expiry's idle counter) hangs: reported, not waited for.
        problem = f"1 repositories' cvmfs2 not answering: {hung}"
        kit.wait_for(lambda: any(p.startswith(problem) for p in status(d)["problems"]), 30,
                     "the hung backend is not reported")
        out = ctl(d, "status")
        assert out.returncode == 3 and "not answering" in out.stdout, out.stdout
        # Upkeep goes on for the others: the idle one expires, the busy one stays.
        kit.wait_for(lambda: [e for e in d.events("unmounted") if e["repo"] == idle], 30,
                     "the idle repository was not expired")
        # Many calls on the hung one hold no more threads: new repositories still mount.
        for _ in range(soak_size(ci=100, full=1000)):
            reply = kit.control(d.run_dir / "cvmfsd.sock", "probe", names=[hung], timeout=5)
            assert reply["ok"] and not reply["result"]["ok"], reply
            assert kit.control(d.run_dir / "cvmfsd.sock", "list")["ok"]
        threads = psutil.Process(d.pid).num_threads()
        serves(d, "lhcb.cern.ch")
        serves(d, "sft.cern.ch", uid=kit.OTHER_UID + 1)
        # A reader that comes now waits in the kernel for the stopped cvmfs2...
        reader = kit.start(kit.FIRST_ACCESS, d.path(hung) / "data" / "blob.bin")
        # ...until backend_hung_timeout: killed, healed, and the reader is served by the new one.
        kit.wait_for(stopped.gone, 60, "the hung backend was not killed")
        kit.wait_for(lambda: [e for e in d.events("backend_hung") if e["repo"] == hung], 10,
                     "the hung backend's kill was not logged")
        out, err = kit.finish(reader, 60)
        assert kit.decode(out.strip())["errno"] == 0, (out, err)
        kit.wait_for(lambda: serving_pid(d, hung) != stopped.process.pid, 30,
                     "no new mount logged")
        assert kit.run(kit.FIRST_ACCESS, d.path(hung) / "README")["errno"] == 0
        kit.wait_for(lambda: not status(d)["problems"], 30, "still degraded after healing")
        assert not [e for e in d.events("unmounted") if e["repo"] == busy]
        print(f"\ndaemon threads after the probes: {threads}")
    finally:
        stopped.resume()
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.communicate()
        holder.close()


# --- 8. a killed daemon's boots; signals ----------------------------------------------------------
def test_boots_of_a_killed_daemon_are_stopped_by_the_next(attack_daemon: Callable[..., Daemon],
                                                          env: Env) -> None:
    names = [f"k{i}.attack.org" for i in range(soak_size(ci=12, full=20))]
    gate = env.shared / "open-boots"
    for name in names:
        env.add_repo(name)
        # Held until the first daemon is gone: none of its boots may finish and be adopted.
        env.repo_config(name, CVMFS_STANDIN_BOOT_GATE=str(gate))
    config = {"max_concurrent_boots": 32, "requester_boots": 32, "mount_timeout": 60.0}
    first = attack_daemon(**config)
    waiting = [kit.start(kit.FIRST_ACCESS, first.path(n) / "README") for n in names]
    try:
        kit.wait_for(lambda: len(env.boots()) == len(names), 60, "the boots did not start")
        kit.wait_for(lambda: len(list((first.run_dir / "boots").iterdir())) == len(names), 30,
                     "the boots were not recorded")
        launchers = {}
        for line in env.boots_log.read_text().splitlines():
            pid = int(line.split()[0])
            launchers[pid] = psutil.Process(pid).create_time()
        first.proc.kill()
        assert first.proc.wait(timeout=30) == -signal.SIGKILL
        second = attack_daemon(**config)
        # The launchers it left are stopped (exactly those: pid and start time recorded)...
        stopped, = kit.wait_for(lambda: second.events("leftover_boots_stopped"), 30,
                                "no leftover_boots_stopped line")
        assert sorted(stopped["pids"]) == sorted(launchers)
        reap(list(launchers))
        for pid, created in launchers.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                assert p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE
        gate.touch()
        # ...so no workspace stays locked: every name mounts (a held lock: EIO at mount_timeout).
        accesses = [kit.start(kit.FIRST_ACCESS, second.path(n) / "README") for n in names]
        waiting += accesses
        results = [kit.decode(kit.finish(a, 120)[0].strip()) for a in accesses]
        assert [r["errno"] for r in results] == [0] * len(names)
        assert Counter(env.boots()) == Counter({n: 2 for n in names})
    finally:
        for w in waiting:
            if w.poll() is None:
                w.kill()
            w.communicate()
        gate.touch()


def test_meaningless_signals_are_ignored(attack_daemon: Callable[..., Daemon]) -> None:
    d = attack_daemon()
    for sig in (signal.SIGUSR1, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO,
                signal.SIGPWR):
        os.kill(d.pid, sig)
    serves(d, "atlas.cern.ch")
    assert d.proc.poll() is None
    assert status(d)["state"] == "running"
    assert d.stop() == 0


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.2, 1.0])
def test_sigterm_during_a_reexec_stops_cleanly(attack_daemon: Callable[..., Daemon],
                                               delay: float) -> None:
    """SIGUSR2 (re-exec in place), then SIGTERM at once or during the new interpreter's start:
    the daemon stops as asked (every repository unmounted, exit 0), neither killed by the
    default action nor re-executed with the SIGTERM lost."""
    d = attack_daemon()
    serves(d, "atlas.cern.ch")
    d.wait_mounted("atlas.cern.ch")
    os.kill(d.pid, signal.SIGUSR2)
    time.sleep(delay)  # where the SIGTERM lands: the old interpreter, the exec, the new one
    os.kill(d.pid, signal.SIGTERM)
    assert d.proc.wait(timeout=60) == 0
    assert not mounts_under(d.root)
    assert d.events("stopped")[-1]["mode"] == "unmount"
