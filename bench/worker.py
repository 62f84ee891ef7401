"""Timed filesystem work in a fresh process: `python bench/worker.py MODE ARGS...`.

Every system is measured by the same code in the same kind of process. The worker prints
"ready" once it is set up, waits for one byte on stdin (the go signal), does the work, timing it
with time.perf_counter_ns (CLOCK_MONOTONIC: comparable across processes), and prints one JSON
line. It imports nothing from the project, so it starts fast and costs the same everywhere.

One-shot modes:
  cold PATH                       one stat of PATH (a first access: this process never saw it)
  boot-stat PATH ARGV...          run the launcher ARGV (posix_spawn, own session), and the
                                  moment it exits, one stat of PATH: a boot and its first
                                  access with no gap between them (the direct baseline)
  storm SEED PATH...              stat each PATH in a shuffled order, one timing per access

Warm work, one pass of:
  stat-loop LISTFILE              stat every path in LISTFILE
  find DIR                        `find DIR` (output discarded, entries counted)
  read-seq FILE BUFSIZE           read FILE front to back
  read-rand FILE N BLOCK SEED     N preads of BLOCK bytes at random aligned offsets
  read-small LISTFILE             read every file in LISTFILE whole
is run by
  rounds SPECFILE                 SPECFILE (JSON): {"rounds": R, "mode": M,
                                  "systems": {name: [args of M], ...}}
which runs one untimed pass per system (caches warm), then R rounds, each one timed pass per
system in a rotated order. Interleaving at the grain of one pass puts every burst of load from
elsewhere on the machine on all systems alike, so per-round ratios stay meaningful on a busy
machine. Each pass is timed in wall-clock time and in the worker thread's CPU time (immune to
preemption; meaningful where the work happens in the caller's kernel context: cached stats and
page-cache reads).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ns = time.perf_counter_ns
Work = Callable[[], dict[str, Any]]


def _read_all(path: str, bufsize: int = 1 << 20) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(bufsize):
            total += len(chunk)
    return total


def _paths(listfile: str) -> list[str]:
    with open(listfile) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _stat(path: str) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or -1
    return 0


def one_shot(mode: str, args: list[str]) -> Work | None:
    if mode == "cold":
        (path,) = args

        def cold() -> dict[str, Any]:
            t0 = ns()
            err = _stat(path)
            return {"ns": ns() - t0, "start_ns": t0, "errno": err}

        return cold
    if mode == "boot-stat":
        path, argv = args[0], args[1:]
        # What cvmfsd's children.spawn gives cvmfs2: the same environment, a session of its
        # own, stdin from /dev/null; output to a memory file (for the error, if any).
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LC_ALL": "C"}
        out = os.memfd_create("launcher-output", os.MFD_CLOEXEC)
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)]

        def boot_stat() -> dict[str, Any]:
            t0 = ns()
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
            status = os.waitpid(pid, 0)[1]
            t1 = ns()
            rc = os.waitstatus_to_exitcode(status)
            err = _stat(path) if rc == 0 else -1
            t2 = ns()
            result = {"ns": t2 - t0, "boot_ns": t1 - t0, "start_ns": t0, "errno": err,
                      "rc": rc}
            if rc != 0:
                result["output"] = os.pread(out, 4096, 0).decode(errors="replace")
            return result

        return boot_stat
    if mode == "storm":
        seed, paths = int(args[0]), list(args[1:])
        random.Random(seed).shuffle(paths)

        def storm() -> dict[str, Any]:
            samples = []
            for p in paths:
                t0 = ns()
                err = _stat(p)
                samples.append([t0, ns(), err])
            return {"samples": samples}

        return storm
    return None


def warm_work(mode: str, args: list[str]) -> Work:
    """One pass of the work, returning its extra figures (entries, bytes, ...)."""
    if mode == "stat-loop":
        paths = _paths(args[0])

        def stat_loop() -> dict[str, Any]:
            for p in paths:
                os.stat(p)
            return {"count": len(paths)}

        return stat_loop
    if mode == "find":
        (root,) = args

        def find() -> dict[str, Any]:
            out = subprocess.run(["find", root], capture_output=True, check=True).stdout
            return {"entries": out.count(b"\n")}

        return find
    if mode == "read-seq":
        path, bufsize = args[0], int(args[1])
        return lambda: {"bytes": _read_all(path, bufsize)}
    if mode == "read-rand":
        path, count, block, seed = args[0], int(args[1]), int(args[2]), int(args[3])
        size = os.stat(path).st_size
        rng = random.Random(seed)
        offsets = [rng.randrange(0, max(1, size - block)) // block * block for _ in range(count)]
        fd = os.open(path, os.O_RDONLY)

        def read_rand() -> dict[str, Any]:
            total = 0
            for off in offsets:
                total += len(os.pread(fd, block, off))
            return {"bytes": total, "count": count}

        _read_all(path)  # the whole file in the page cache first
        return read_rand
    if mode == "read-small":
        paths = _paths(args[0])
        return lambda: {"bytes": sum(_read_all(p) for p in paths), "count": len(paths)}
    raise SystemExit(f"unknown mode {mode!r}")


def rounds(specfile: str) -> Work:
    with open(specfile) as f:
        spec = json.load(f)
    works = {name: warm_work(spec["mode"], args) for name, args in spec["systems"].items()}
    names = list(works)

    def run() -> dict[str, Any]:
        out: dict[str, Any] = {n: {"wall_ns": [], "cpu_ns": []} for n in names}
        for name in names:
            out[name]["extra"] = works[name]()  # warm: dentries, attributes, pages cached
        for r in range(spec["rounds"]):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                c0, t0 = time.thread_time_ns(), ns()
                works[name]()
                t1, c1 = ns(), time.thread_time_ns()
                out[name]["wall_ns"].append(t1 - t0)
                out[name]["cpu_ns"].append(c1 - c0)
        return out

    return run


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    work = one_shot(mode, args) or (rounds(args[0]) if mode == "rounds" else None)
    if work is None:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if not os.read(0, 1):  # the harness closed stdin: it gave up, so do nothing
        return
    result = work()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
