"""Footprint: the automounter's own memory and CPU while idle, with 0, 1, 10, 100 repositories
mounted (one fresh instance per system, repositories added one by one by first accesses).

At each count the harness waits a moment, then reads RSS (and USS/PSS: RSS counts shared library
pages that other processes share) with psutil, and samples the process's CPU time over a window
with nothing accessing anything. The cost of one more repository is the least-squares slope of RSS
over the counts >= 1. The backends' own RSS (the cvmfs2 processes, which every system needs alike)
is reported beside it for scale.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import psutil

from ..workspace import DOMAIN
from . import Context, started


def _slope(points: list[tuple[int, float]]) -> float | None:
    pts = [(x, y) for x, y in points if x >= 1]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def _measure(pid: int, window: float) -> dict[str, Any]:
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(window)
    after = proc.cpu_times()
    elapsed = time.monotonic() - t0
    mem = proc.memory_full_info()
    cpu_s = (after.user + after.system) - (before.user + before.system)
    return {"rss_kib": mem.rss // 1024, "uss_kib": mem.uss // 1024, "pss_kib": mem.pss // 1024,
            "cpu_percent": round(100 * cpu_s / elapsed, 3), "cpu_ms": round(cpu_s * 1000, 1),
            "window_s": round(elapsed, 2), "threads": proc.num_threads()}


def run(ctx: Context) -> dict[str, Any]:
    sz = ctx.sizes
    counts = sorted(set(sz.counts()))
    out: dict[str, Any] = {}
    for name in [n for n in ctx.systems if n != "direct"]:
        points = []
        with started(ctx, [name], "fp") as systems:
            system = systems[name]
            pid = system.daemon_pid()
            assert pid is not None
            mounted: list[str] = []
            for count in counts:
                while len(mounted) < count:
                    repo = ctx.ws.tiny(f"fp{len(mounted):03d}-{name}.{DOMAIN}")
                    os.stat(system.path(repo) / ctx.ws.cold_file)
                    system.note_serving_pid(repo)
                    mounted.append(repo)
                time.sleep(0.2 if ctx.quick else 2.0)  # let the mount settle (threads, logs)
                point = {"repos": count, **_measure(pid, sz.footprint_window_s)}
                backends = []
                for repo in mounted:
                    spid = system.note_serving_pid(repo)
                    if spid is not None:
                        with contextlib.suppress(psutil.NoSuchProcess):
                            backends.append(psutil.Process(spid).memory_info().rss // 1024)
                point["backends_rss_kib"] = sum(backends)
                point["backend_rss_kib_each"] = (round(sum(backends) / len(backends))
                                                 if backends else None)
                points.append(point)
                ctx.say(f"{name} with {count} repositories: RSS {point['rss_kib'] / 1024:.1f} MiB"
                        f" (USS {point['uss_kib'] / 1024:.1f}), CPU {point['cpu_percent']:.2f}%"
                        f" over {point['window_s']} s")
        slope = _slope([(p["repos"], p["rss_kib"]) for p in points])
        uss_slope = _slope([(p["repos"], p["uss_kib"]) for p in points])
        out[name] = {
            "points": points,
            "idle_rss_kib": points[0]["rss_kib"],
            "idle_uss_kib": points[0]["uss_kib"],
            "idle_cpu_percent": points[0]["cpu_percent"],
            "rss_kib_per_repo": round(slope, 2) if slope is not None else None,
            "uss_kib_per_repo": round(uss_slope, 2) if uss_slope is not None else None,
        }
    return {"params": {"counts": counts, "window_s": sz.footprint_window_s}, "systems": out}
