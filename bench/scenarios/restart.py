"""Restart stall: what a restart of cvmfsd adds to the latency of processes reading mounted
repositories, over the same readers' own baseline, for every restart path.

One cvmfsd instance (stop_mode handover) with R repositories mounted; readers on the host and
in pod-like views (a read-only slave bind in a mount namespace of their own, as kubelet makes
it), plus one reader whose working directory is inside a repository (bench/reader.py), each
reading a file and statting another in a loop with a short pause, recording every operation.

Restarts come in pairs of windows, back to back, with the same readers: a baseline window in
which nothing happens, then a restart window from the restart's trigger to the new daemon's
"ready" plus a settle time, the baseline as long as the previous restart window of that path
(the first: an estimate). Restart paths, each `restart_rounds` times: graceful hand-over
(SIGTERM, a new process), crash (SIGKILL, a new process), upgrade (SIGTERM, a new process from
other code: a copy of the package with another version), re-exec (SIGUSR2: the same pid).

Reported per path: the operations' p50/p99/max latency in restart windows and in baseline
windows, the p99 a restart adds (restart p99 - baseline p99: the target, <= 10 ms), the worst
operation per pair (restart window's minus its baseline's: median and max over the pairs),
failed operations (there must be none), and the restart's own times (trigger to ready).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from ..common import PY, percentile
from ..systems import Cvmfsd
from ..workspace import DOMAIN
from . import Context, started

READER = Path(__file__).resolve().parent.parent / "reader.py"
PATHS = ("graceful", "crash", "upgrade", "reexec")
SETTLE = 0.3       # s after "ready" still counted in the restart window
FIRST_BASELINE = 1.0  # s, before any restart of a path was timed


def _upgrade(src: Path, dest: Path) -> Path:
    """A copy of the package that reports another version: what a package upgrade puts on
    disk (new code, imported afresh)."""
    shutil.copytree(src / "cvmfsd", dest / "cvmfsd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = dest / "cvmfsd" / "__init__.py"
    init.write_text(init.read_text() + '\n__version__ = "99.0.0+bench"\n')
    return dest


def _start_readers(ctx: Context, system: Cvmfsd, repos: list[str], stop: Path,
                   out: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    n = ctx.sizes.restart_readers
    for i in range(n):
        args = [PY, str(READER)]
        if i % 2:  # every other one in a pod-like view
            view = out / f"view{i}"
            view.mkdir()
            args = ["unshare", "--mount", "--propagation", "slave", *args, "pod",
                    str(system.mount_dir), str(view)]
        else:
            args += ["host", str(system.mount_dir)]
        procs.append(subprocess.Popen([*args, str(stop), str(out / f"r{i}.json"), *repos],
                                      stdout=subprocess.PIPE, cwd="/"))
    procs.append(subprocess.Popen([PY, str(READER), "cwd", str(system.mount_dir), str(stop),
                                   str(out / "cwd.json"), repos[0]],
                                  stdout=subprocess.PIPE, cwd="/"))
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"reader {p.args} did not start")
    return procs


def _window_ops(readers: list[dict[str, Any]], begin: float, end: float) -> list[float]:
    """Latencies (ms) of the operations that started in [begin, end), or were under way at
    begin (an operation stalled across the start of a window counts in it)."""
    out = []
    for r in readers:
        for s, t in zip(r["starts"], r["took"], strict=True):
            if begin - t <= s < end:
                out.append(t * 1000)
    return out


def _failures_in(readers: list[dict[str, Any]], begin: float, end: float) -> int:
    n = 0
    for r in readers:
        for e in r["errors"]:
            t = float(e.split()[0])
            if begin <= t < end:
                n += 1
    return n


def _stats(ops: list[float]) -> dict[str, Any]:
    if not ops:
        return {"n": 0}
    return {"n": len(ops), "p50": round(percentile(ops, 50), 3),
            "p99": round(percentile(ops, 99), 3), "max": round(max(ops), 3)}


def run(ctx: Context) -> dict[str, Any]:
    if "cvmfsd" not in ctx.systems:
        from ..common import Unavailable

        raise Unavailable("needs cvmfsd")
    sz = ctx.sizes
    repos = [ctx.ws.tiny(f"rs{i:02d}.{DOMAIN}") for i in range(sz.restart_repos)]
    work = ctx.ws.base / "restart"
    work.mkdir(exist_ok=True)
    upgrade = _upgrade(ctx.ws.src, work / "upgrade")
    stop = work / "stop"
    out = work / "readers"
    out.mkdir()
    pairs: list[dict[str, Any]] = []
    with started(ctx, ["cvmfsd"], "rs", stop_mode="handover") as systems:
        system = systems["cvmfsd"]
        assert isinstance(system, Cvmfsd)
        for repo in repos:
            (system.path(repo) / ctx.ws.cold_file).stat()
        readers = _start_readers(ctx, system, repos, stop, out)
        try:
            time.sleep(1.0)  # readers warm: every dentry and page cached
            last: dict[str, float] = {}
            for path in PATHS:
                for r in range(sz.restart_rounds):
                    length = last.get(path, FIRST_BASELINE)
                    b0 = time.monotonic()
                    time.sleep(length)
                    b1 = time.monotonic()
                    times = system.restart(path, upgrade if path == "upgrade" else None)
                    time.sleep(SETTLE)
                    r1 = time.monotonic()
                    last[path] = r1 - times["begin"]
                    pairs.append({"path": path, "round": r, "baseline": [b0, b1],
                                  "restart": [times["begin"], r1], "times": times})
                    ctx.say(f"{path} {r + 1}/{sz.restart_rounds}: ready after "
                            f"{(times['ready'] - times['begin']) * 1000:.0f} ms")
            time.sleep(0.5)
        finally:
            stop.touch()
            for p in readers:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            # The last successor unmounts everything when stopped.
            system.overrides["stop_mode"] = "unmount"
            system.write_config()
            system.restart("graceful")
        ready_events = [e for e in system.events("ready")]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    per_path: dict[str, Any] = {}
    for path in PATHS:
        mine = [p for p in pairs if p["path"] == path]
        if not mine:
            continue
        restart_ops: list[float] = []
        base_ops: list[float] = []
        worst_added = []
        for p in mine:
            rops = _window_ops(results, *p["restart"])
            bops = _window_ops(results, *p["baseline"])
            restart_ops += rops
            base_ops += bops
            worst_added.append(round(max(rops, default=0) - max(bops, default=0), 3))
        rs, bs = _stats(restart_ops), _stats(base_ops)
        per_path[path] = {
            "restart": rs, "baseline": bs,
            "added_p99_ms": round(rs["p99"] - bs["p99"], 3) if rs["n"] and bs["n"] else None,
            "added_worst_ms": {"median": statistics.median(worst_added),
                               "max": max(worst_added), "each": worst_added},
            "failures_restart": sum(_failures_in(results, *p["restart"]) for p in mine),
            "failures_baseline": sum(_failures_in(results, *p["baseline"]) for p in mine),
            "ready_ms": [round((p["times"]["ready"] - p["times"]["begin"]) * 1000, 1)
                         for p in mine],
        }
    return {
        "params": {"repos": len(repos), "readers": len(results), "rounds": sz.restart_rounds,
                   "settle_s": SETTLE, "pause_ms": 2},
        "paths": per_path,
        "ops": sum(len(r["took"]) for r in results),
        "failures": sum(r["failures"] for r in results),
        "startup_ms": [e.get("startup_ms") for e in ready_events],
        "pairs": pairs,
    }
