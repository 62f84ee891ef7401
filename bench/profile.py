"""Profile of one cold first access, step by step, from the kernel's own timestamps.

    python -m bench.profile [--real] [--reps N] [--against REV] [--aa] [--json FILE]

Per repetition, interleaved in a rotated order, each system gets a never-mounted repository and
a fresh worker process (bench/worker.py) that makes the first access:

- cvmfsd: `stat <root>/<repo>/README` (the daemon looks it up, mounts, starts cvmfs2);
- direct: the worker itself starts the launcher (`cvmfs2 ... <repo> <dir>`, posix_spawn) and
  stats the moment it exits: the backend's own boot + first stat, with no gap in between.

Both run the client itself (not the counting wrapper of bench.run: no shell in between), with
the same options. A private ftrace instance (bench/ktrace.py) records, for the worker, the
daemon's threads and every process they start: each syscall, the FUSE requests queued and
answered (fuse_request_send/end), exec, fork, exit, wakeups and context switches, all stamped
with CLOCK_MONOTONIC. Each sample is then cut into steps (below), reported as medians in µs
with the 25-75 % range. --against REV adds cvmfsd as committed in REV (git archive), for a
before/after in one run; --aa adds a second instance of the working tree (A/A control).

Nothing the kernel offers is simulated here; the daemon runs unmodified (no debug build).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import Progress, Worker, reap_adopted, set_child_subreaper, umount_below
from .ktrace import Event, KernelTrace, parse
from .run import export, parse_args as run_parse_args, real_backend
from .systems import Cvmfsd, Direct
from .workspace import DOMAIN, Workspace

NR = {"read": 0, "write": 1, "stat": 4, "lstat": 6, "clone": 56, "fork": 57, "vfork": 58,
      "wait4": 61, "mount": 165, "getxattr": 191, "lgetxattr": 192, "newfstatat": 262,
      "statx": 332, "pidfd_open": 434, "clone3": 435, "connect": 42, "waitid": 247}
STATS = {NR["stat"], NR["lstat"], NR["newfstatat"], NR["statx"]}
SPAWNS = {NR["clone"], NR["fork"], NR["vfork"], NR["clone3"]}
ESTALE = "-116"


# --- one sample's timeline ------------------------------------------------------------------------
@dataclass
class Sample:
    system: str
    kind: str           # "cvmfsd" or "direct"
    worker: int
    daemon: int         # 0 for direct
    result: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    t: dict[str, int] = field(default_factory=dict)   # step -> ns (CLOCK_MONOTONIC)


def _first(events: Iterable[Event], pred: Any, after: int = 0) -> Event | None:
    return next((e for e in events if e.ns >= after and pred(e)), None)


def _subtree(events: Sequence[Event], root: int) -> set[int]:
    """Every task created by root (processes and threads), root included."""
    tree = {root}
    for e in events:
        if e.name == "sched_process_fork" and int(e.fields.get("pid", -1)) in tree:
            tree.add(int(e.fields["child_pid"]))
    return tree


def _exit_of(events: Sequence[Event], enter: Event) -> Event | None:
    return _first(events, lambda e: e.tid == enter.tid and e.name == "sys_exit"
                  and e.fields["nr"] == enter.fields["nr"], enter.ns)


def _backend_steps(s: Sample, launcher: int, t: dict[str, int]) -> None:
    """The backend's own boot, from its exec to its first answer."""
    ev = s.events
    tree = _subtree(ev, launcher)
    execs = [e for e in ev if e.name == "sched_process_exec" and int(e.fields["pid"]) == launcher]
    if execs:
        t["launcher exec"] = execs[0].ns
        t["backend exec"] = execs[-1].ns  # the stand-in: /bin/sh, then python, same pid
    shells = {int(e.fields["pid"]) for e in ev if e.name == "sched_process_exec"
              and e.fields.get("filename", "").endswith("/sh") and int(e.fields["pid"]) in tree
              and int(e.fields["pid"]) != launcher}
    connect = _first(ev, lambda e: e.tgid in tree and e.name == "sys_enter"
                     and int(e.fields["nr"]) == NR["connect"])
    if connect:
        t["first connect"] = connect.ns
    if shells:
        ends = [e.ns for e in ev if e.name == "sched_process_exit"
                and int(e.fields["pid"]) in shells]
        if ends:
            t["config shells done"] = max(ends)
    own_mount = _first(ev, lambda e: e.tgid in tree and e.name == "sys_enter"
                       and int(e.fields["nr"]) == NR["mount"])
    if own_mount:
        t["backend mount"] = own_mount.ns
    gone = _first(ev, lambda e: e.name == "sched_process_exit"
                  and int(e.fields["pid"]) == launcher)
    if gone:
        t["launcher exit"] = gone.ns


def analyse(s: Sample) -> None:
    ev = s.events
    t = s.t
    sends = [e for e in ev if e.name == "fuse_request_send"]
    ends = {(e.fields["conn"], e.fields["req"]): e for e in ev if e.name == "fuse_request_end"}
    stat = _first(ev, lambda e: e.tgid == s.worker and e.name == "sys_enter"
                  and int(e.fields["nr"]) in STATS)
    if stat is None:
        return
    done = _exit_of(ev, stat)
    if done:
        t["answer"] = done.ns
    if s.kind == "direct":
        spawn = _first(ev, lambda e: e.tgid == s.worker and e.name == "sys_enter"
                       and int(e.fields["nr"]) in SPAWNS)
        fork = _first(ev, lambda e: e.name == "sched_process_fork"
                      and e.tgid == s.worker, spawn.ns if spawn else 0)
        if spawn is None or fork is None:
            return
        t["start"] = spawn.ns
        launcher = int(fork.fields["child_pid"])
        _backend_steps(s, launcher, t)
        reaped = _first(ev, lambda e: e.tgid == s.worker and e.name == "sys_exit"
                        and int(e.fields["nr"]) in (NR["wait4"], NR["waitid"]), spawn.ns)
        if reaped:
            t["launcher reaped"] = reaped.ns
        t["stat"] = stat.ns
        tree = _subtree(ev, launcher)
        init = _first(sends, lambda e: e.tgid in tree and e.fields["op"] == "FUSE_INIT")
        if init and (init.fields["conn"], init.fields["req"]) in ends:
            t["INIT answered"] = ends[(init.fields["conn"], init.fields["req"])].ns
        return
    # cvmfsd
    t["start"] = stat.ns
    lookup = _first(sends, lambda e: e.tid == stat.tid, stat.ns)
    if lookup is None:
        return
    root = lookup.fields["conn"]
    t["LOOKUP queued"] = lookup.ns
    length = lookup.text.split(" len ")[-1].strip()
    read = _first(ev, lambda e: e.tgid == s.daemon and e.name == "sys_exit"
                  and int(e.fields["nr"]) == NR["read"] and e.fields["ret"] == length, lookup.ns)
    if read:
        t["LOOKUP read by daemon"] = read.ns
    reply = ends.get((root, lookup.fields["req"]))
    if reply:
        t["LOOKUP answered"] = reply.ns
    mount = _first(ev, lambda e: e.tgid == s.daemon and e.name == "sys_enter"
                   and int(e.fields["nr"]) == NR["mount"], lookup.ns)
    if mount:
        t["mount(2) called"] = mount.ns
        exit_ = _exit_of(ev, mount)
        if exit_:
            t["mount(2) done"] = exit_.ns
    init = _first(sends, lambda e: e.tgid == s.daemon and e.fields["op"] == "FUSE_INIT",
                  lookup.ns)
    new = init.fields["conn"] if init else None
    mine = {(e.fields["conn"], e.fields["req"]) for e in sends if e.tid == stat.tid}
    stale = _first(ev, lambda e: e.name == "fuse_request_end" and e.fields["conn"] == root
                   and e.fields["error"] == ESTALE and (root, e.fields["req"]) in mine)
    if stale:
        t["ESTALE answered"] = stale.ns
    # A request to a connection that INIT has not answered yet is not queued (no trace event):
    # the caller sleeps in the kernel until then. Its last sleep before INIT's answer is that.
    init_end = ends.get((new, init.fields["req"])) if init else None
    if init_end is not None:
        sleeps = [e.ns for e in ev if e.name == "sched_switch" and e.ns <= init_end.ns
                  and e.fields.get("prev_pid") == str(stat.tid)
                  and e.fields.get("prev_state", "").startswith("D")]
        if sleeps:
            t["caller waits in the new mount"] = sleeps[-1]
    spawn = _first(ev, lambda e: e.tgid == s.daemon and e.name == "sys_enter"
                   and int(e.fields["nr"]) in SPAWNS, lookup.ns)
    fork = _first(ev, lambda e: e.name == "sched_process_fork" and e.tgid == s.daemon
                  and any(x.name == "sched_process_exec" and x.fields["pid"] ==
                          e.fields["child_pid"] for x in ev), lookup.ns)
    if spawn:
        t["posix_spawn"] = spawn.ns
    if fork:
        _backend_steps(s, int(fork.fields["child_pid"]), t)
        launcher = int(fork.fields["child_pid"])
        reaped = _first(ev, lambda e: e.tgid == s.daemon and e.name == "sys_exit"
                        and int(e.fields["nr"]) in (NR["wait4"], NR["waitid"])
                        and e.fields["ret"] == str(launcher), lookup.ns)
        if reaped:
            t["launcher reaped"] = reaped.ns
    if init and (new, init.fields["req"]) in ends:
        t["INIT answered"] = ends[(new, init.fields["req"])].ns
    xattr = _first(ev, lambda e: e.tgid == s.daemon and e.name == "sys_enter"
                   and int(e.fields["nr"]) in (NR["getxattr"], NR["lgetxattr"]),
                   t.get("launcher exit", lookup.ns))
    if xattr:
        t["serving pid asked (xattr)"] = xattr.ns
        exit_ = _exit_of(ev, xattr)
        if exit_:
            t["serving pid known"] = exit_.ns
    pidfd = _first(ev, lambda e: e.tgid == s.daemon and e.name == "sys_exit"
                   and int(e.fields["nr"]) == NR["pidfd_open"], lookup.ns)
    if pidfd:
        t["serving process tracked (pidfd)"] = pidfd.ns
    writes = [e for e in ev if e.tgid == s.daemon and e.name == "sys_exit"
              and int(e.fields["nr"]) == NR["write"] and e.ns >= t.get("launcher exit", 0)]
    if writes:
        t["daemon's last log write"] = writes[-1].ns


# Rows of the report: (label, from step, to step). Missing steps leave a row empty.
CVMFSD_ROWS = [
    ("stat(2) -> root LOOKUP queued", "start", "LOOKUP queued"),
    ("LOOKUP queued -> read by the daemon", "LOOKUP queued", "LOOKUP read by daemon"),
    ("LOOKUP handler (read -> reply)", "LOOKUP read by daemon", "LOOKUP answered"),
    ("reply -> mount(2) called (task, thread hop)", "LOOKUP answered", "mount(2) called"),
    ("mount(2) of /dev/fuse", "mount(2) called", "mount(2) done"),
    ("mount done -> posix_spawn", "mount(2) done", "posix_spawn"),
    ("posix_spawn -> exec", "posix_spawn", "launcher exec"),
    ("backend: exec -> config shells done", "backend exec", "config shells done"),
    ("backend: config -> first connect", "config shells done", "first connect"),
    ("backend: first connect -> launcher exits", "first connect", "launcher exit"),
    ("launcher exit -> INIT answered (serving process up)", "launcher exit", "INIT answered"),
    ("INIT answered -> stat(2) returns", "INIT answered", "answer"),
    ("(in parallel) ESTALE answered, from the start", "start", "ESTALE answered"),
    ("(in parallel) caller waits in the new mount, from the start", "start",
     "caller waits in the new mount"),
    ("after: launcher exit -> reaped", "launcher exit", "launcher reaped"),
    ("after: launcher exit -> serving pid known (xattr)", "launcher exit", "serving pid known"),
    ("after: launcher exit -> pidfd", "launcher exit", "serving process tracked (pidfd)"),
    ("after: launcher exit -> last log write", "launcher exit", "daemon's last log write"),
    ("total: stat(2) -> answer", "start", "answer"),
    ("daemon's part: stat(2) -> exec", "start", "launcher exec"),
    ("backend's own boot: exec -> launcher exit", "launcher exec", "launcher exit"),
]
DIRECT_ROWS = [
    ("posix_spawn -> exec", "start", "launcher exec"),
    ("backend: exec -> config shells done", "backend exec", "config shells done"),
    ("backend: config -> first connect", "config shells done", "first connect"),
    ("backend: first connect -> launcher exits", "first connect", "launcher exit"),
    ("launcher exit -> reaped by the worker", "launcher exit", "launcher reaped"),
    ("reaped -> stat(2) called", "launcher reaped", "stat"),
    ("launcher exit -> INIT answered (serving process up)", "launcher exit", "INIT answered"),
    ("INIT answered -> stat(2) returns", "INIT answered", "answer"),
    ("total: spawn -> answer", "start", "answer"),
    ("backend's own boot: exec -> launcher exit", "launcher exec", "launcher exit"),
]


def _span(t: dict[str, int], a: str, b: str) -> float | None:
    if a in t and b in t:
        return (t[b] - t[a]) / 1000
    return None


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"n": len(values), "median": round(statistics.median(values), 1),
            "q1": round(q[0], 1), "q3": round(q[2], 1)}


def summarise(samples: list[Sample]) -> dict[str, Any]:
    by_system: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_system[s.system].append(s)
    out: dict[str, Any] = {}
    for system, group in by_system.items():
        rows = DIRECT_ROWS if group[0].kind == "direct" else CVMFSD_ROWS
        table = {}
        for label, a, b in rows:
            table[label] = _stats([v for s in group if (v := _span(s.t, a, b)) is not None])
        outside = [v - w for s in group
                   if (v := _span(s.t, "start", "answer")) is not None
                   and (w := _span(s.t, "launcher exec", "launcher exit")) is not None]
        out[system] = {"kind": group[0].kind, "steps": table,
                       "outside_backend_boot_us": _stats(outside),
                       "samples": [s.t for s in group]}
    direct = next((v for v in out.values() if v["kind"] == "direct"), None)
    for v in out.values():
        if v["kind"] == "cvmfsd" and direct and direct["outside_backend_boot_us"]["n"]:
            v["overhead_us"] = round(v["outside_backend_boot_us"]["median"]
                                     - direct["outside_backend_boot_us"]["median"], 1)
            v["overhead_literal_us"] = round(
                v["steps"]["total: stat(2) -> answer"]["median"]
                - direct["steps"]["total: spawn -> answer"]["median"], 1)
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"Backend: {meta['backend']}; {meta['reps']} samples per system, interleaved; "
             f"load average {meta['load'][0]:.2f} -> {meta['load'][1]:.2f}; "
             f"trace events lost: {meta['lost']}.", ""]
    for system, v in summary.items():
        lines += [f"**{system}**" + (f" (overhead over the backend's own boot + first stat: "
                                     f"{v['overhead_us']:+.0f} µs per access, "
                                     f"{v['overhead_literal_us']:+.0f} µs literal)"
                                     if "overhead_us" in v else ""), "",
                  "| step | median µs | 25-75 % | n |", "|---|---|---|---|"]
        for label, st in v["steps"].items():
            if st["n"]:
                lines.append(f"| {label} | {st['median']:.0f} | {st['q1']:.0f}-{st['q3']:.0f} "
                             f"| {st['n']} |")
        o = v["outside_backend_boot_us"]
        if o["n"]:
            lines.append(f"| outside the backend's own boot (total - exec..exit) | "
                         f"{o['median']:.0f} | {o['q1']:.0f}-{o['q3']:.0f} | {o['n']} |")
        lines.append("")
    return "\n".join(lines)


# --- running it -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="the real cvmfs2 (as bench.run --real)")
    p.add_argument("--reps", type=int, default=20, help="samples per system (default 20)")
    p.add_argument("--against", metavar="REV",
                   help="also cvmfsd as committed in REV, interleaved (before/after)")
    p.add_argument("--aa", action="store_true", help="also a second working-tree cvmfsd (A/A)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                   help="also cvmfsd from the source tree DIR (a package cvmfsd/ in it)")
    p.add_argument("--cvmfs2-user", default=None,
                   help="cvmfsd's cvmfs2_user (default: cvmfsd's own default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a cvmfsd config key for every cvmfsd instance, e.g. --set "
                   "max_concurrent_boots=8")
    p.add_argument("--json", type=Path, help="write every sample's steps here")
    p.add_argument("--md", type=Path, help="write the tables here (markdown)")
    p.add_argument("--trace", type=Path, help="keep the raw trace here")
    p.add_argument("--gap", type=float, default=0.3,
                   help="seconds between samples (the daemon's bookkeeping is traced too)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.profile: needs root (it mounts and traces)", file=sys.stderr)
        return 2
    set_child_subreaper()
    progress = Progress()
    base = Path(tempfile.mkdtemp(prefix="cvmfsd-bench-"))
    base.chmod(0o755)
    real = real_backend(run_parse_args(["--real"] if args.real else []), base, progress)
    trace_path = args.trace or base / "trace.txt"
    systems: dict[str, Any] = {}
    samples: list[Sample] = []
    lost = 0
    load0 = os.getloadavg()[0]
    try:
        ws = Workspace(base, quick=True, real=real)
        extra: dict[str, Any] = {}
        if args.cvmfs2_user is not None:
            extra["cvmfs2_user"] = args.cvmfs2_user
        for kv in args.set:
            key, _, value = kv.partition("=")
            extra[key] = json.loads(value)
        # The client itself, unwrapped, for every system.
        direct = Direct(ws, "prof")
        systems["direct"] = direct
        inner = str(direct.backend.inner)
        systems["cvmfsd"] = Cvmfsd(ws, "prof", cvmfs2=inner, **extra)
        if args.against:
            src = base / "src-against"
            commit = export(args.against, src)
            systems[f"cvmfsd@{commit[:7]}"] = Cvmfsd(ws, "base", src=src, cvmfs2=inner, **extra)
        if args.aa:
            systems["cvmfsd (A/A)"] = Cvmfsd(ws, "pro2", cvmfs2=inner, **extra)
        for i, variant in enumerate(args.variant):
            label, _, src_dir = variant.partition("=")
            systems[f"cvmfsd {label}"] = Cvmfsd(ws, f"va{i:02d}"[:4], src=Path(src_dir),
                                                cvmfs2=inner, **extra)
        names = list(systems)
        repos = {(i, n): ws.tiny(f"pf{i:03d}-{k}.{DOMAIN}")
                 for i in range(args.reps) for k, n in enumerate(names)}
        for system in systems.values():
            system.backend.cvmfs2 = Path(inner)  # direct's launcher too
            system.setup(())
        with KernelTrace(trace_path) as kt:
            for system in systems.values():
                if isinstance(system, Cvmfsd):
                    kt.follow(system.proc.pid)
            for i in range(args.reps):
                k = i % len(names)
                for name in names[k:] + names[:k]:
                    system = systems[name]
                    repo = repos[(i, name)]
                    path = str(system.path(repo) / ws.cold_file)
                    if isinstance(system, Direct):
                        worker = Worker("boot-stat", path, *system.boot_argv(repo))
                    else:
                        worker = Worker("cold", path)
                    worker.ready()
                    kt.follow(worker.proc.pid)
                    sid = f"{i}:{name}"
                    kt.mark(f"begin {sid}")
                    worker.go()
                    result = worker.result()
                    time.sleep(args.gap)  # the daemon's bookkeeping after the answer
                    kt.mark(f"end {sid}")
                    lost = max(lost, kt.dump())
                    samples.append(Sample(name, "direct" if isinstance(system, Direct)
                                          else "cvmfsd", worker.proc.pid,
                                          system.proc.pid if isinstance(system, Cvmfsd) else 0,
                                          result))
                    if result.get("errno"):
                        progress.say(f"{sid}: errno {result['errno']} {result.get('output', '')}")
                progress.say(f"rep {i + 1}/{args.reps}")
    finally:
        for system in reversed(list(systems.values())):
            try:
                leaked = system.teardown()
            except Exception as exc:
                leaked = [repr(exc)]
            if leaked:
                progress.say(f"{system.label} left mounts behind: {leaked}")
        umount_below(base)
        reap_adopted()
        if real is not None and real.server is not None:
            real.server.stop()
    load1 = os.getloadavg()[0]
    _attach(trace_path, samples)
    for s in samples:
        analyse(s)
    summary = summarise([s for s in samples if not s.result.get("errno")])
    meta = {"backend": ws.backend_description() if real else "cvmfs2 stand-in",
            "reps": args.reps, "load": [load0, load1], "lost": lost,
            "cvmfsd_config": extra, "command": " ".join(["python -m bench.profile",
                                                          *(argv or sys.argv[1:])])}
    text = markdown(summary, meta)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    if not args.trace:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def _attach(path: Path, samples: list[Sample]) -> None:
    """Hand each sample the events between its begin and end marks."""
    order = iter(samples)
    current: Sample | None = None
    for e in parse(path):
        if e.name == "tracing_mark_write":
            if e.text.startswith("begin "):
                current = next(order, None)
            elif e.text.startswith("end "):
                current = None
            continue
        if current is not None:
            current.events.append(e)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main())
