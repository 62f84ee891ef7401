"""Cold first access: the time from the first stat of /cvmfs/<repo>/README to its answer.

Per repetition and per system (interleaved, in a rotated order: ABC, BCA, CAB, ...) a fresh,
never-mounted repository. Each stat comes from a fresh worker process that never touched the path.

- direct: a worker boots the repository by hand (launch time = the backend's own boot time) and
  stats the file the moment the launcher exits: first access = boot + first stat.
- autofs, cvmfsd: a worker stats the file; the automounter boots the repository meanwhile.

The automounter's overhead is reported two ways:
- literal: median(first access) - median(direct boot + first stat);
- per access: first access - the run time of the cvmfs2 launcher inside it (stamped by the
  counting wrapper), minus the same for direct. Boots vary by several ms from one to the next;
  taking each access's own boot out leaves what the automounter adds, with far less noise.
"""

from __future__ import annotations

import time
from typing import Any

from ..common import percentile, run_worker, summary
from ..systems import Cvmfsd, Direct
from ..workspace import DOMAIN
from . import Context, ms, rotated, started


def run(ctx: Context) -> dict[str, Any]:
    names = ctx.systems
    reps = ctx.sizes.cold_reps
    repos = {(i, n): ctx.ws.tiny(f"cold{i:03d}-{n}.{DOMAIN}") for i in range(reps) for n in names}
    total: dict[str, list[float]] = {n: [] for n in names}
    outside: dict[str, list[float]] = {n: [] for n in names}
    before: dict[str, list[float]] = {n: [] for n in names}   # access start -> launcher start
    after: dict[str, list[float]] = {n: [] for n in names}    # launcher exit -> answer
    # The wrapper stamps CLOCK_REALTIME, the workers CLOCK_MONOTONIC: one offset converts.
    offset_ns = time.time_ns() - time.perf_counter_ns()
    launcher: dict[str, list[float]] = {n: [] for n in names}
    errors = dict.fromkeys(names, 0)
    boot_ms: list[float] = []
    first_stat_ms: list[float] = []
    with started(ctx, names, "cold") as systems:
        for i in range(reps):
            line = []
            for name in rotated(names, i):
                system = systems[name]
                repo = repos[(i, name)]
                path = system.path(repo) / ctx.ws.cold_file
                direct = isinstance(system, Direct)
                if direct:
                    # One process boots and, the moment the launcher exits, stats: what
                    # `mount ... && stat ...` costs. (Booting from here and statting from a
                    # fresh worker later would leave the backend's serving process time to
                    # finish starting in between, uncounted.)
                    result = run_worker("boot-stat", str(path), *system.boot_argv(repo))
                else:
                    result = run_worker("cold", str(path))
                if result["errno"]:
                    errors[name] += 1
                    line.append(f"{name} errno {result['errno']} {result.get('output', '')}")
                    continue
                took = ms(result["ns"])
                launch = system.backend.last_launch(repo)
                total[name].append(took)
                if launch is not None and launch.ms is not None:
                    launcher[name].append(launch.ms)
                    outside[name].append(round(took - launch.ms, 4))
                    pre = ms(launch.start * 1e9 - offset_ns - result["start_ns"])
                    before[name].append(pre)
                    after[name].append(round(took - launch.ms - pre, 4))
                if direct:
                    boot_ms.append(ms(result["boot_ns"]))
                    first_stat_ms.append(round(took - ms(result["boot_ns"]), 4))
                line.append(f"{name} {took:.1f}")
            ctx.say(f"rep {i + 1}/{reps}: " + ", ".join(line) + " ms")
        boots = {n: len(systems[n].boots()) for n in names}
        mount_log_ms = []
        daemon = systems.get("cvmfsd")
        if isinstance(daemon, Cvmfsd):  # cvmfsd's own view: boot + attach, from its JSON log
            mount_log_ms = [r["duration_ms"] for r in daemon.mount_attempts()
                            if r.get("result") == "mounted"]
    direct_total = percentile(total.get("direct", []), 50)
    direct_outside = percentile(outside.get("direct", []), 50)
    per_system: dict[str, Any] = {}
    for name in names:
        per_system[name] = {
            "first_access_ms": summary(total[name]),
            "samples_ms": total[name],
            "launcher_ms": summary(launcher[name]),
            "outside_launcher_ms": summary(outside[name]),
            "outside_samples_ms": outside[name],
            "before_launcher_ms": summary(before[name]),
            "after_launcher_ms": summary(after[name]),
            "boots": boots[name],
            "errors": errors[name],
        }
        if name != "direct" and "direct" in names:
            per_system[name]["overhead_ms"] = round(
                percentile(outside[name], 50) - direct_outside, 4)
            per_system[name]["overhead_literal_ms"] = round(
                percentile(total[name], 50) - direct_total, 4)
            # Spread of the per-access estimate: each access against the direct median.
            spread = [v - direct_outside for v in outside[name]]
            per_system[name]["overhead_range_ms"] = [round(min(spread), 4),
                                                     round(max(spread), 4)] if spread else None
    return {
        "params": {"reps": reps, "file": ctx.ws.cold_file, "order": "rotated per repetition"},
        "backend_boot_ms": summary(boot_ms),
        "direct_first_stat_ms": summary(first_stat_ms),
        "cvmfsd_logged_mount_ms": summary(mount_log_ms),
        "systems": per_system,
    }
