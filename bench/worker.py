"""Timed filesystem work in a fresh process: `python bench/worker.py MODE ARGS...`.

Every system is measured by the same code in the same kind of process. The worker prints
"ready" once it is set up, waits for one byte on stdin (the go signal), does the work, timing it
with time.perf_counter_ns (CLOCK_MONOTONIC: comparable across processes), and prints one JSON
line. It imports nothing from the project, so it starts fast and has the same cost everywhere.

Modes:
  cold PATH                       one stat of PATH (a first access: this process never saw it)
  stat-loop LISTFILE              stat every path in LISTFILE once to warm, then once timed
  find DIR                        `find DIR` once to warm, then once timed
  read-seq FILE BUFSIZE           read FILE once to warm, then once timed
  read-rand FILE N BLOCK SEED     read FILE to warm, then N preads of BLOCK at random offsets
  read-small LISTFILE             read every file once to warm, then once timed
  storm SEED PATH...              stat each PATH in a shuffled order, one timing per access
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


def _read_all(path: str, bufsize: int = 1 << 20) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(bufsize):
            total += len(chunk)
    return total


def _paths(listfile: str) -> list[str]:
    with open(listfile) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def prepare(mode: str, args: list[str]) -> Callable[[], dict[str, Any]]:
    """Everything that must not be timed happens here, before "ready"."""
    if mode == "cold":
        (path,) = args

        def cold() -> dict[str, Any]:
            t0 = ns()
            try:
                os.stat(path)
                err = 0
            except OSError as exc:
                err = exc.errno or -1
            return {"ns": ns() - t0, "start_ns": t0, "errno": err}

        return cold

    if mode == "stat-loop":
        paths = _paths(args[0])

        def stat_loop() -> dict[str, Any]:
            for p in paths:  # warm: every dentry and attribute in the kernel caches
                os.stat(p)
            t0 = ns()
            for p in paths:
                os.stat(p)
            return {"ns": ns() - t0, "count": len(paths)}

        return stat_loop

    if mode == "find":
        (root,) = args

        def find() -> dict[str, Any]:
            def once() -> tuple[int, int]:
                t0 = ns()
                out = subprocess.run(["find", root], capture_output=True, check=True).stdout
                return ns() - t0, out.count(b"\n")

            once()
            took, entries = once()
            return {"ns": took, "entries": entries}

        return find

    if mode == "read-seq":
        path, bufsize = args[0], int(args[1])

        def read_seq() -> dict[str, Any]:
            _read_all(path, bufsize)
            t0 = ns()
            size = _read_all(path, bufsize)
            return {"ns": ns() - t0, "bytes": size}

        return read_seq

    if mode == "read-rand":
        path, count, block, seed = args[0], int(args[1]), int(args[2]), int(args[3])
        size = os.stat(path).st_size
        rng = random.Random(seed)
        offsets = [rng.randrange(0, max(1, size - block)) // block * block for _ in range(count)]

        def read_rand() -> dict[str, Any]:
            _read_all(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                t0 = ns()
                total = 0
                for off in offsets:
                    total += len(os.pread(fd, block, off))
                took = ns() - t0
            finally:
                os.close(fd)
            return {"ns": took, "bytes": total, "count": count}

        return read_rand

    if mode == "read-small":
        paths = _paths(args[0])

        def read_small() -> dict[str, Any]:
            for p in paths:
                _read_all(p)
            t0 = ns()
            total = sum(_read_all(p) for p in paths)
            return {"ns": ns() - t0, "bytes": total, "count": len(paths)}

        return read_small

    if mode == "storm":
        seed, paths = int(args[0]), list(args[1:])
        random.Random(seed).shuffle(paths)

        def storm() -> dict[str, Any]:
            samples = []
            for p in paths:
                t0 = ns()
                try:
                    os.stat(p)
                    err = 0
                except OSError as exc:
                    err = exc.errno or -1
                samples.append([t0, ns(), err])
            return {"samples": samples}

        return storm

    raise SystemExit(f"unknown mode {mode!r}")


def main() -> None:
    work = prepare(sys.argv[1], sys.argv[2:])
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if not os.read(0, 1):  # the harness closed stdin: it gave up, so do nothing
        return
    result = work()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
