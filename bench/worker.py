"""Timed filesystem work in a fresh process: `python bench/worker.py MODE ARGS...`.

Every system is measured by the same code in the same kind of process. The worker prints
"ready" once it is set up, waits for one byte on stdin (the go signal), does the work, timing it
with time.perf_counter_ns (CLOCK_MONOTONIC: comparable across processes), and prints one JSON
line. It imports nothing from the project, so it starts fast and costs the same everywhere.

One-shot modes:
  cold PATH                       one stat of PATH (a first access: this process never saw it)
  storm SEED PATH...              stat each PATH in a shuffled order, one timing per access

Warm modes run the work once untimed (caches warm), then PASSES times timed, and report the
median pass (and every pass):
  stat-loop PASSES LISTFILE              stat every path in LISTFILE
  find PASSES DIR                        `find DIR` (output discarded, entries counted)
  read-seq PASSES FILE BUFSIZE           read FILE front to back
  read-rand PASSES FILE N BLOCK SEED     N preads of BLOCK bytes at random aligned offsets
  read-small PASSES LISTFILE             read every file in LISTFILE whole
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


def warm_work(mode: str, args: list[str]) -> tuple[Callable[[], dict[str, Any]], int]:
    """(one pass of the work returning its extra figures, number of timed passes)."""
    passes, args = int(args[0]), args[1:]
    if mode == "stat-loop":
        paths = _paths(args[0])

        def stat_loop() -> dict[str, Any]:
            for p in paths:
                os.stat(p)
            return {"count": len(paths)}

        return stat_loop, passes
    if mode == "find":
        (root,) = args

        def find() -> dict[str, Any]:
            out = subprocess.run(["find", root], capture_output=True, check=True).stdout
            return {"entries": out.count(b"\n")}

        return find, passes
    if mode == "read-seq":
        path, bufsize = args[0], int(args[1])
        return (lambda: {"bytes": _read_all(path, bufsize)}), passes
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
        return read_rand, passes
    if mode == "read-small":
        paths = _paths(args[0])
        return (lambda: {"bytes": sum(_read_all(p) for p in paths), "count": len(paths)}), passes
    raise SystemExit(f"unknown mode {mode!r}")


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    shot = one_shot(mode, args)
    if shot is None:
        work, passes = warm_work(mode, args)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if not os.read(0, 1):  # the harness closed stdin: it gave up, so do nothing
        return
    if shot is not None:
        result = shot()
    else:
        result = work()  # warm: dentries, attributes, pages in the kernel caches
        times = []
        for _ in range(passes):
            t0 = ns()
            result = work()
            times.append(ns() - t0)
        result["all_ns"] = times
        result["ns"] = sorted(times)[len(times) // 2]
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
