"""Under attack (issue 12): a legitimate first access of a new repository while an
unprivileged user attacks cvmfsd, side by side with the same access on an instance nobody
attacks, and the daemon's memory over the attack.

Per attack, two fresh cvmfsd instances run side by side with the same configuration: `base`
(nobody attacks it) and `attacked`. The attack runs against `attacked` for `attack_seconds`
from the moment it is at full pressure; meanwhile, in `attack_reps` repetitions spread evenly
over that time (the two instances in a rotated order), a fresh worker stats README in a
never-mounted repository of each instance — as another user (uid 1002) in even repetitions, as
a process of another pod with the attacker's own uid (1001) in odd ones, the fairness key
cvmfsd must tell apart. Each legitimate
repository is unmounted after its access (cvmfsctl umount), so every repetition starts alike.

Reported per attack and instance: first access (median, min, max, p99), the run time of the
cvmfs2 launcher inside it (the backend's own boot: the reference of the target "within its boot
time + 100 ms"), first access minus that boot (what cvmfsd adds, per access), errors; the ratio
attacked / base of the median first access; the daemon's RSS sampled every 0.5 s over the
attack (start, peak, end, growth over the second half). Both instances share the machine, so the
attack's CPU load reaches the base instance too: the ratio isolates what the attack does through
the daemon; the overhead says what a user waits for beyond the backend's boot.

The attacks (tests/attack_kit.py runs them, as in tests/test_attacks.py):

- lookup-loop: one process stats a name that fails (exit 16) in a loop (issue item 1).
- hoard-mounts: uid 1001 opens a file in as many repositories as its share of mounts allows
  (`max_mounted` = 2 x attack_hoard for both instances) and keeps them open (item 2).
- slow-threads: attack_threads threads stat distinct names that boot 60 s and then fail
  (item 3); the instance's defaults (fuse_max_tasks 512, max_mounted 1000).
- failing-churn: attack_churn_threads threads stat distinct names that fail at once, past
  max_names (items 5, 6): boots, failures, evictions, refusals as fast as they come.
- hung-backend: the serving cvmfs2 of one repository is stopped (SIGSTOP) and the admin's probe
  of it asked every second (item 7); past backend_hung_timeout (60 s) it is killed and healed.

Attackers and legitimate requesters run as other uids, so the work directory must be reachable
by them (every parent world-executable); "another pod" needs a cgroup hierarchy the harness may
create directories in (otherwise the odd repetitions are another uid too, and it says so).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import psutil

from ..common import Unavailable, percentile, run_worker, summary
from ..systems import Cvmfsd
from ..workspace import DOMAIN
from . import Context, ms, rotated, started

kit = importlib.import_module("attack_kit")  # tests/attack_kit.py (on the path via common)

ATTACKS = ("lookup-loop", "hoard-mounts", "slow-threads", "failing-churn", "hung-backend")
FAIL_DOMAIN = "fail.attack.org"    # fail at once (exit 16), without a stand-in start-up each
SLOW_DOMAIN = "slow.attack.org"    # boot 60 s, then fail (exit 4)
SLOW_SHARE = 500                   # requester_mounts derived from the default max_mounted
# How long an attack may take to reach full pressure before it is measured anyway.
PRESSURE_TIMEOUT = 180.0


def _reachable(path: Path) -> bool:
    """Can other users walk to path (every directory on the way world-executable)?"""
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in [path, *path.parents])


def run(ctx: Context) -> dict[str, Any]:
    if "cvmfsd" not in ctx.systems:
        raise Unavailable("cvmfsd is not among the systems compared")
    if ctx.ws.real is not None:
        raise Unavailable("the attacks use the stand-in's fault knobs (slow and failing boots)")
    if not _reachable(ctx.ws.base):
        raise Unavailable(f"{ctx.ws.base} is not reachable by other users (a parent is not "
                          "world-executable): give --workdir a directory that is")
    wanted = [a.strip() for a in ctx.sizes.attack_only.split(",") if a.strip()] or ATTACKS
    unknown = set(wanted) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    pods = None
    pods_missing = None
    try:
        pods = kit.Pods()
    except (RuntimeError, OSError) as exc:
        pods_missing = str(exc)
        ctx.say(f"no pod cgroups ({exc}): every legitimate requester is another uid")
    out: dict[str, Any] = {}
    try:
        for attack in (a for a in ATTACKS if a in wanted):
            out[attack] = _one(ctx, attack, pods)
    finally:
        if pods is not None:
            pods.remove()
    sz = ctx.sizes
    return {"params": {"reps": sz.attack_reps, "seconds": sz.attack_seconds,
                       "threads": sz.attack_threads, "churn_threads": sz.attack_churn_threads,
                       "hoard": sz.attack_hoard, "pods": pods_missing or "cgroups of our own",
                       "order": "base and attacked rotated per repetition"},
            "attacks": out}


def _one(ctx: Context, attack: str, pods: Any) -> dict[str, Any]:
    sz, ws = ctx.sizes, ctx.ws
    short = "".join(w[0] for w in attack.split("-"))  # lookup-loop -> ll
    overrides: dict[str, Any] = {}
    if attack == "hoard-mounts":
        overrides["max_mounted"] = 2 * sz.attack_hoard  # the attacker's share: attack_hoard
    tags = {"base": f"{short}-b", "attacked": f"{short}-a"}
    stop = ws.base / f"stop-{short}"
    with contextlib.ExitStack() as stack:
        systems: dict[str, Cvmfsd] = {}
        for cond, tag in tags.items():
            # In front of the instance's counting wrapper (its boots.log, launch stamps).
            wrapper = kit.write_fast_failing(ws.base / f"fastfail-{tag}",
                                             ws.base / f"cvmfsd-{tag}" / "cvmfs2",
                                             ws.base / f"fastfail-{tag}.log", FAIL_DOMAIN)
            made = stack.enter_context(started(ctx, ["cvmfsd"], tag, cvmfs2=str(wrapper),
                                               **overrides))
            system = made["cvmfsd"]
            assert isinstance(system, Cvmfsd)
            with open(system.backend.client_config, "a") as f:
                f.write(f'case "$CVMFS_FQRN" in *.{SLOW_DOMAIN}) CVMFS_STANDIN_BOOT_DELAY=60; '
                        "CVMFS_STANDIN_FAIL=4;; esac\n")
            systems[cond] = system
        target = systems["attacked"]
        stack.callback(stop.touch)  # whatever happens, the attackers are told to stop
        samplers = {c: kit.RssSampler(s.daemon_pid(), period=0.5) for c, s in systems.items()}
        attacker = _start(ctx, attack, target, stop)
        stack.callback(attacker.stop)
        pressure_s = attacker.wait_pressure()
        ctx.say(f"{attack}: at full pressure after {pressure_s:.1f} s ({attacker.describe()})")
        samples: dict[str, list[dict[str, Any]]] = {c: [] for c in systems}
        pressed = time.monotonic()
        for rep in range(sz.attack_reps):
            # Spread over the attack: its later phases count too (past max_names, past
            # backend_hung_timeout).
            time.sleep(max(0.0, pressed + rep * sz.attack_seconds / sz.attack_reps
                           - time.monotonic()))
            who, prefix = _requester(rep, pods)
            line = []
            for cond in rotated(list(systems), rep):
                system = systems[cond]
                repo = ws.tiny(f"atk{rep:03d}-{cond[0]}-{short}.{DOMAIN}")
                result = run_worker("cold", str(system.path(repo) / ws.cold_file),
                                    prefix=prefix, timeout=300)
                # The launcher exits a moment after cvmfs2 answers (pre-mounted mode).
                launch = None
                with contextlib.suppress(AssertionError):
                    launch = kit.wait_for(
                        lambda s=system, r=repo: s.backend.last_launch(r), 10,
                        "the launcher did not exit", period=0.01)
                sample = {"who": who, "errno": result["errno"], "ms": ms(result["ns"]),
                          "launcher_ms": launch.ms if launch else None}
                samples[cond].append(sample)
                line.append(f"{cond} {sample['ms']:.0f} ms" if not sample["errno"]
                            else f"{cond} errno {sample['errno']}")
                system.note_serving_pid(repo)
                kit.control(system.run_dir / "cvmfsd.sock", "umount", name=repo,
                            force=True, timeout=60)
            ctx.say(f"{attack} rep {rep + 1}/{sz.attack_reps} ({who}): " + ", ".join(line))
        # The rest of the attack's time: memory keeps being sampled.
        time.sleep(max(0.0, pressed + sz.attack_seconds - time.monotonic()))
        status = kit.control(target.run_dir / "cvmfsd.sock", "status")
        rss = {c: _rss(s.stop()) for c, s in samplers.items()}
        attack_result = attacker.stop()
        for s in systems.values():
            s.serving_pids.update(r["serving_pid"] for r in s.mount_attempts()
                                  if r.get("serving_pid"))
    out = {"pressure_s": round(pressure_s, 1), "attack": attack_result,
           "status_after": {k: status.get("result", {}).get(k)
                            for k in ("state", "problems", "repositories", "boots_total")},
           "rss": rss, "conditions": {c: _condition(v) for c, v in samples.items()}}
    base = out["conditions"]["base"]["first_access_ms"]["median"]
    hit = out["conditions"]["attacked"]["first_access_ms"]["median"]
    out["ratio"] = round(hit / base, 3) if base and hit else None
    ctx.say(f"{attack}: first access {hit} ms attacked vs {base} ms base; overhead over the "
            f"boot {out['conditions']['attacked']['overhead_ms']['median']} ms; RSS "
            f"{rss['attacked']['start_mib']} -> peak {rss['attacked']['peak_mib']} MiB")
    return out


def _requester(rep: int, pods: Any) -> tuple[str, list[str]]:
    """Even repetitions: another user; odd ones: another pod of the attacker's own uid."""
    if rep % 2 == 0 or pods is None:
        return "uid 1002", kit.requester_argv([], uid=kit.OTHER_UID)
    _, procs = pods.new()
    return "uid 1001, another pod", kit.requester_argv([], uid=kit.ATTACKER_UID, pod=procs)


def _condition(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if not s["errno"]]
    overhead = [round(s["ms"] - s["launcher_ms"], 4) for s in good if s["launcher_ms"]]
    return {"first_access_ms": summary([s["ms"] for s in good]),
            "launcher_ms": summary([s["launcher_ms"] for s in good if s["launcher_ms"]]),
            "overhead_ms": summary(overhead),
            "errors": len(samples) - len(good),
            "errnos": sorted({s["errno"] for s in samples if s["errno"]}),
            "samples": samples}


def _rss(samples: list[tuple[float, int]]) -> dict[str, Any]:
    mib = [(round(t, 1), round(r / 2**20, 2)) for t, r in samples]
    if not mib:
        return {"start_mib": None, "peak_mib": None, "end_mib": None,
                "second_half_growth_mib": None, "samples": []}
    half = [r for t, r in mib if t >= mib[-1][0] / 2]
    step = max(1, len(mib) // 200)
    return {"start_mib": mib[0][1], "peak_mib": max(r for _, r in mib), "end_mib": mib[-1][1],
            "second_half_growth_mib": round(half[-1] - half[0], 2) if half else None,
            "median_mib": round(percentile([r for _, r in mib], 50), 2),
            "samples": mib[::step]}


# --- the attackers ------------------------------------------------------------------------------
class _Attacker:
    def __init__(self, ctx: Context, system: Cvmfsd, stop: Path) -> None:
        self.ctx, self.system, self.stopfile = ctx, system, stop
        self.result: dict[str, Any] | None = None

    def wait_pressure(self) -> float:
        """Seconds until the attack is at full pressure (bounded by PRESSURE_TIMEOUT)."""
        t0 = time.monotonic()
        with contextlib.suppress(AssertionError):
            kit.wait_for(self.pressed, PRESSURE_TIMEOUT, "not at full pressure", period=0.1)
        return time.monotonic() - t0

    def pressed(self) -> bool:
        return True

    def describe(self) -> str:
        return ""

    def stop(self) -> dict[str, Any]:
        if self.result is None:
            self.stopfile.touch()
            self.result = self._stop()
        return self.result

    def _stop(self) -> dict[str, Any]:
        return {}


class _LookupLoop(_Attacker):
    name = "nope.example.org"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.proc = kit.start(kit.STAT_UNTIL, self.system.path(self.name), self.stopfile)

    def pressed(self) -> bool:
        return bool(self.system.mount_attempts(self.name))

    def _stop(self) -> dict[str, Any]:
        out, _ = kit.finish(self.proc, 120)
        return {**kit.decode(out.strip().splitlines()[-1]),
                "boots": self.system.boots().count(self.name)}


class _HoardMounts(_Attacker):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        share = self.ctx.sizes.attack_hoard
        repos = [self.ctx.ws.tiny(f"hoard{i:03d}.{DOMAIN}") for i in range(share + 1)]
        self.holder = kit.Holder([self.system.path(r) / self.ctx.ws.cold_file for r in repos])

    def describe(self) -> str:
        return f"holds {list(self.holder.result.values()).count(0)} mounts"

    def _stop(self) -> dict[str, Any]:
        self.holder.close()
        return {"held": list(self.holder.result.values()).count(0),
                "refused": [e for e in self.holder.result.values() if e]}


class _Threads(_Attacker):
    domain = SLOW_DOMAIN

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.threads = self.count()
        self.proc = kit.start(kit.THREADS, str(self.system.mount_dir / f"n{{}}.{self.domain}"),
                              self.threads, self.stopfile)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "started"

    def count(self) -> int:
        return int(self.ctx.sizes.attack_threads)

    def premounted(self) -> int:
        return sum(1 for r in self.system.mounted_repos() if r.endswith(self.domain))

    def pressed(self) -> bool:
        return self.premounted() >= min(self.threads, SLOW_SHARE)

    def describe(self) -> str:
        return f"{self.threads} threads, {self.premounted()} names waiting on their boots"

    def _stop(self) -> dict[str, Any]:
        premounted = self.premounted()
        # Its threads wait in the kernel for boots that take hours (the share of boot slots):
        # killed, not waited for.
        self.proc.kill()
        self.proc.communicate()
        return {"threads": self.threads, "premounted": premounted}


class _FailingChurn(_Threads):
    domain = FAIL_DOMAIN

    def count(self) -> int:
        return int(self.ctx.sizes.attack_churn_threads)

    def failures(self) -> int:
        log = self.ctx.ws.base / f"fastfail-{self.system.label.removeprefix('cvmfsd-')}.log"
        return len(log.read_text().splitlines()) if log.exists() else 0

    def pressed(self) -> bool:
        return self.failures() >= 200

    def describe(self) -> str:
        return f"{self.threads} threads, {self.failures()} failed boots so far"

    def _stop(self) -> dict[str, Any]:
        out, _ = kit.finish(self.proc, 300)
        return {"threads": self.threads, "failed_boots": self.failures(),
                "errnos": kit.decode(out.strip().splitlines()[-1])}


class _HungBackend(_Attacker):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        import threading

        self.repo = self.ctx.ws.tiny(f"hung.{DOMAIN}")
        os.stat(self.system.path(self.repo) / self.ctx.ws.cold_file)
        kit.wait_for(lambda: self.system.mount_attempts(self.repo), 30, "not mounted")
        pid = self.system.mount_attempts(self.repo)[-1]["serving_pid"]
        self.process = psutil.Process(pid)  # reported by this instance: its own cvmfs2
        self.process.suspend()
        self.probes = 0
        self._probing = threading.Thread(target=self._probe, daemon=True)
        self._probing.start()

    def _probe(self) -> None:
        while not self.stopfile.exists():
            with contextlib.suppress(OSError, ValueError):
                kit.control(self.system.run_dir / "cvmfsd.sock", "probe", names=[self.repo],
                            timeout=60)
                self.probes += 1
            time.sleep(1.0)

    def pressed(self) -> bool:
        reply = kit.control(self.system.run_dir / "cvmfsd.sock", "status")
        return any("not answering" in p for p in reply["result"]["problems"])

    def describe(self) -> str:
        return f"cvmfs2 {self.process.pid} of {self.repo} stopped"

    def _stop(self) -> dict[str, Any]:
        killed = not self.process.is_running()  # compares the start time too
        with contextlib.suppress(psutil.Error):
            if self.process.is_running():
                self.process.resume()
        self._probing.join(timeout=90)
        return {"probes": self.probes, "killed_and_healed": killed,
                "backend_hung_lines": len(self.system.events("backend_hung"))}


def _start(ctx: Context, attack: str, system: Cvmfsd, stop: Path) -> _Attacker:
    cls = {"lookup-loop": _LookupLoop, "hoard-mounts": _HoardMounts, "slow-threads": _Threads,
           "failing-churn": _FailingChurn, "hung-backend": _HungBackend}[attack]
    return cls(ctx, system, stop)
