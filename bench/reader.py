"""A reader for the restart scenario: `python bench/reader.py MODE ROOT STOPFILE OUT REPO...`.

Reads and stats files of mounted repositories in a loop until STOPFILE exists, and records
every operation: its start (CLOCK_MONOTONIC, comparable across processes) and how long it took,
and every failure. MODE:

  host            through ROOT itself
  pod VIEW        through a read-only slave bind of ROOT at VIEW, made in this process's own
                  mount namespace (run it under `unshare --mount --propagation slave`), as
                  kubelet makes a pod's view (tests/podview.py)
  cwd             with the working directory inside the first repository (relative paths)

It imports nothing from the project (starts fast, costs the same everywhere).
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import sys
import time

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 0x1, 0x20, 0x1000, 0x4000, 1 << 19
PAUSE = 0.002  # between operations: readers that leave the CPU to others most of the time


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source and source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def main() -> None:
    mode, root, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "pod":
        view, rest = rest[0], rest[1:]
        _mount(root, view, MS_BIND | MS_REC)
        _mount(None, view, MS_SLAVE | MS_REC)
        _mount(None, view, MS_REMOUNT | MS_BIND | MS_RDONLY)
        root = view
    stop, out, repos = rest[0], rest[1], rest[2:]
    if mode == "cwd":
        os.chdir(os.path.join(root, repos[0]))
        targets = [("README", "etc/profile")]
    else:
        targets = [(os.path.join(root, r, "README"), os.path.join(root, r, "etc", "profile"))
                   for r in repos]
    starts = array.array("d")
    took = array.array("d")
    errors: list[str] = []
    failures = 0
    clock = time.monotonic
    i = 0
    print("ready", flush=True)
    while not os.path.exists(stop):
        readme, other = targets[i % len(targets)]
        i += 1
        t0 = clock()
        try:
            with open(readme, "rb") as f:
                f.read()
            os.stat(other)
        except OSError as exc:
            failures += 1
            if len(errors) < 100:
                errors.append(f"{t0:.6f} {readme}: {exc}")
        starts.append(t0)
        took.append(clock() - t0)
        time.sleep(PAUSE)
    with open(out, "w") as f:
        json.dump({"mode": mode, "pid": os.getpid(), "starts": starts.tolist(),
                   "took": took.tolist(), "errors": errors, "failures": failures}, f)


if __name__ == "__main__":
    main()
