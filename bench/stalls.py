"""Where a restart's stalls come from: the restart scenario's readers and restarts under a kernel
trace, each slow operation taken apart.

    python -m bench.stalls [--real] [--rounds N] [--slow MS] [--paths graceful crash ...]

The same set-up as the restart scenario (bench/scenarios/restart.py: readers on the host, in
pod-like views and with a cwd inside, pairs of baseline and restart windows), with a private
ftrace instance (bench/ktrace.py) following the readers, the daemon and everything the harness
starts (the successors). Every reader operation slower than --slow ms is split into:

- waiting for the CPU: runnable (woken, or preempted) but not running, and who ran meanwhile;
- waiting for a FUSE answer: from a request it sent (to cvmfsd's root or to a cvmfs2) to its
  answer, by connection;
- running, and blocked otherwise (locks, I/O).

Reported per window kind (baseline, restart) and path: how many slow operations, and where their
time went in total.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .common import Progress, reap_adopted, set_child_subreaper, umount_below
from .ktrace import Event, KernelTrace, parse
from .run import parse_args as run_parse_args, real_backend
from .scenarios import Context, Sizes
from .scenarios.restart import PATHS, SETTLE, _start_readers, _upgrade
from .systems import Cvmfsd
from .workspace import DOMAIN, Workspace


def _classify(events: list[Event], tid: int, begin: int, end: int, names: dict[int, str],
              answers: dict[tuple[str, str], int]) -> dict[str, Any]:
    """Split [begin, end] of one reader thread by what it was doing."""
    out: Counter[str] = Counter()
    blockers: Counter[str] = Counter()
    state = "run"          # run | runnable | blocked
    since = begin
    fuse_wait = 0
    for e in events:
        if e.ns < begin:
            continue
        if e.ns > end:
            break
        if e.name == "sched_switch":
            prev, nxt = int(e.fields.get("prev_pid", -1)), int(e.fields.get("next_pid", -1))
            if prev == tid:
                out[state] += e.ns - since
                since = e.ns
                state = "runnable" if e.fields.get("prev_state", "").startswith("R") else "blocked"
            elif nxt == tid:
                out[state] += e.ns - since
                if state == "runnable":
                    blockers[names.get(prev, e.fields.get("prev_comm", "?"))] += e.ns - since
                since = e.ns
                state = "run"
        elif e.name in ("sched_wakeup", "sched_waking") and int(e.fields.get("pid", -1)) == tid:
            if state == "blocked":
                out["blocked"] += e.ns - since
                since = e.ns
                state = "runnable"
        elif e.name == "fuse_request_send" and e.tid == tid:
            key = (e.fields["conn"], e.fields["req"])
            answered = min(answers.get(key, end), end)
            fuse_wait += answered - e.ns
            blockers[f"FUSE answer on connection {e.fields['conn']}"] += answered - e.ns
    out[state] += max(0, end - since)
    return {"run_us": out["run"] / 1000, "runnable_us": out["runnable"] / 1000,
            "blocked_us": out["blocked"] / 1000, "fuse_wait_us": fuse_wait / 1000,
            "who": {k: round(v / 1000) for k, v in blockers.most_common(4)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stalls",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slow", type=float, default=5.0, help="ms: operations slower than this")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--json", type=Path)
    p.add_argument("--keep-trace", type=Path, help="keep the raw trace here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a cvmfsd config key")
    args = p.parse_args(argv)
    set_child_subreaper()
    progress = Progress()
    base = Path(tempfile.mkdtemp(prefix="cvmfsd-bench-"))
    base.chmod(0o755)
    real = real_backend(run_parse_args(["--real"] if args.real else []), base, progress)
    sizes = Sizes()
    ws = Workspace(base, quick=False, real=real)
    ctx = Context(ws, sizes, progress, False, ("cvmfsd",))
    extra = {k: json.loads(v) for k, v in (kv.partition("=")[::2] for kv in args.set)}
    trace = args.keep_trace or base / "trace.txt"
    pairs: list[dict[str, Any]] = []
    lost = 0
    system = Cvmfsd(ws, "st", stop_mode="handover", **extra)
    readers: list[subprocess.Popen[bytes]] = []
    out = base / "readers"
    out.mkdir()
    stop = base / "stop"
    try:
        repos = [ws.tiny(f"st{i:02d}.{DOMAIN}") for i in range(sizes.restart_repos)]
        upgrade = _upgrade(ws.src, base / "upgrade")
        system.setup(())
        for repo in repos:
            (system.path(repo) / ws.cold_file).stat()
        readers = _start_readers(ctx, system, repos, stop, out)
        # Readers make about a million events per pair of windows: a large buffer, emptied
        # after each window, so that none is lost (the lost count is reported).
        with KernelTrace(trace, buffer_kb=262144) as kt:
            kt.follow(os.getpid())  # what the harness starts: every successor
            assert system.proc is not None
            kt.follow(system.proc.pid)
            for r in readers:
                kt.follow(r.pid)
            for repo in repos:  # the backends answer the readers: their threads too
                pid = system.note_serving_pid(repo)
                if pid is not None:
                    kt.follow(pid)
            time.sleep(1.0)
            for path in args.paths:
                length = 1.0
                for i in range(args.rounds):
                    assert system.proc is not None
                    before = system.proc.pid
                    b0 = time.monotonic()
                    time.sleep(length)
                    b1 = time.monotonic()
                    lost = max(lost, kt.dump())
                    times = system.restart(path, upgrade if path == "upgrade" else None)
                    time.sleep(SETTLE)
                    r1 = time.monotonic()
                    length = r1 - times["begin"]
                    pairs.append({"path": path, "baseline": [b0, b1],
                                  "restart": [times["begin"], r1], "times": times,
                                  "daemon_pids": [before, system.proc.pid],
                                  "backend_pids": sorted(system.serving_pids)})
                    lost = max(lost, kt.dump())
                    progress.say(f"{path} {i + 1}/{args.rounds}")
    finally:
        stop.touch()
        for r in readers:
            try:
                r.wait(timeout=60)
            except subprocess.TimeoutExpired:
                r.kill()
        system.overrides["stop_mode"] = "unmount"
        system.write_config()
        try:
            system.restart("graceful")
        finally:
            system.teardown()
            umount_below(base)
            reap_adopted()
            if real is not None and real.server is not None:
                real.server.stop()
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    report = analyse(trace, pairs, results, args.slow)
    report["summary"]["trace events lost"] = lost
    print(json.dumps(report["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    shutil.rmtree(base, ignore_errors=True)
    return 0


def analyse(trace: Path, pairs: list[dict[str, Any]], readers: list[dict[str, Any]],
            slow_ms: float) -> dict[str, Any]:
    events = list(parse(trace))
    events.sort(key=lambda e: e.ns)
    by_tid: dict[int, list[Event]] = defaultdict(list)
    # Who is who: the daemons (every thread), the readers, the harness; others by their name.
    daemons = {p for pair in pairs for p in pair.get("daemon_pids", [])}
    roles = {int(r["pid"]): "reader" for r in readers if r.get("pid")}
    roles.update({int(p): "cvmfs2 (serving)" for pair in pairs[:1]
                  for p in pair.get("backend_pids", [])})
    names: dict[int, str] = {}
    for e in events:
        if e.tgid in daemons:
            names[e.tid] = "cvmfsd"
        elif e.tgid in roles:
            names[e.tid] = roles[e.tgid]
        elif e.tgid == os.getpid():
            names[e.tid] = "harness"
    answers = {(e.fields["conn"], e.fields["req"]): e.ns for e in events
               if e.name == "fuse_request_end"}
    # Each reader is one process (one thread): its own events and the scheduler's about it.
    for e in events:
        if e.name == "sched_switch":
            for key in ("prev_pid", "next_pid"):
                by_tid[int(e.fields.get(key, -1))].append(e)
        elif e.name in ("sched_wakeup", "sched_waking"):
            by_tid[int(e.fields.get("pid", -1))].append(e)
        else:
            by_tid[e.tid].append(e)
    rows = []
    for pair in pairs:
        for kind in ("baseline", "restart"):
            b, end = pair[kind]
            for r in readers:
                for s, t in zip(r["starts"], r["took"], strict=True):
                    if t * 1000 < slow_ms or not (b - t <= s < end):
                        continue
                    s_ns, e_ns = int(s * 1e9), int((s + t) * 1e9)
                    tid = r.get("pid")
                    if tid is None:
                        continue
                    c = _classify(by_tid[tid], tid, s_ns, e_ns, names, answers)
                    rel = {k: round((v - pair["restart"][0]) * 1000)
                           for k, v in pair["times"].items()}
                    rows.append({"path": pair["path"], "kind": kind, "mode": r["mode"],
                                 "ms": round(t * 1000, 2),
                                 "at_ms": round((s - pair["restart"][0]) * 1000), "times": rel,
                                 **c})
    summary: dict[str, Any] = {}
    for row in rows:
        key = f"{row['path']} {row['kind']}"
        agg = summary.setdefault(key, {"slow_ops": 0, "ms": 0.0, "runnable_ms": 0.0,
                                       "fuse_wait_ms": 0.0, "blocked_ms": 0.0, "run_ms": 0.0,
                                       "who": Counter()})
        agg["slow_ops"] += 1
        agg["ms"] += row["ms"]
        agg["runnable_ms"] += row["runnable_us"] / 1000
        agg["fuse_wait_ms"] += row["fuse_wait_us"] / 1000
        agg["blocked_ms"] += row["blocked_us"] / 1000
        agg["run_ms"] += row["run_us"] / 1000
        for who, us in row["who"].items():
            agg["who"][who] += us / 1000
    for agg in summary.values():
        for k in ("ms", "runnable_ms", "fuse_wait_ms", "blocked_ms", "run_ms"):
            agg[k] = round(agg[k], 1)
        agg["who"] = {k: round(v, 1) for k, v in agg["who"].most_common(6)}
    return {"summary": summary, "rows": rows, "pairs": pairs}


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
