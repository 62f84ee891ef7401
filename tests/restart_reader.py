"""A reader for the restart tests: reads and stats files of mounted repositories in a loop and
records every failure and every operation slower than 1 ms (with CLOCK_MONOTONIC timestamps,
comparable across processes).

    restart_reader.py host ROOT STOPFILE OUT REPO...
    restart_reader.py pod ROOT VIEWDIR STOPFILE OUT REPO...   (inside unshare --mount)
    restart_reader.py cwd ROOT STOPFILE OUT REPO              (cwd inside the repository)
    restart_reader.py repo ROOT VIEWDIR STOPFILE OUT REPO     (inside unshare --mount: a slave
                                                               view of ROOT/REPO alone, like a
                                                               per-repository volume's pod)
"""

from __future__ import annotations

import json
import os
import sys
import time

EXPECTED = bytes(range(256)) * 64


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    rest = sys.argv[3:]
    if mode in ("pod", "repo"):
        sys.path.insert(0, os.path.dirname(__file__))
        from podview import MS_BIND, MS_RDONLY, MS_REC, MS_REMOUNT, MS_SLAVE, _mount

        view, rest = rest[0], rest[1:]
        source = root if mode == "pod" else os.path.join(root, rest[2])
        _mount(source, view, MS_BIND | MS_REC)
        _mount(None, view, MS_SLAVE | MS_REC)
        _mount(None, view, MS_REMOUNT | MS_BIND | MS_RDONLY)
        root = view
    stop, out, repos = rest[0], rest[1], rest[2:]
    if mode == "cwd":
        os.chdir(os.path.join(root, repos[0], "data"))
    ops = failures = 0
    errors: list[str] = []
    slow: list[tuple[float, float]] = []
    i = 0
    while not os.path.exists(stop):
        repo = repos[i % len(repos)]
        i += 1
        started = time.monotonic()
        try:
            if mode == "cwd":
                with open("blob.bin", "rb") as f:
                    ok = f.read() == EXPECTED
                os.stat("../README")
            else:
                base = root if mode == "repo" else os.path.join(root, repo)
                os.stat(os.path.join(base, "README"))
                with open(os.path.join(base, "data", "blob.bin"), "rb") as f:
                    ok = f.read() == EXPECTED
            if not ok:
                raise OSError(f"wrong content in {repo}")
        except OSError as exc:
            failures += 1
            if len(errors) < 20:
                errors.append(f"{time.monotonic():.3f} {repo}: {exc}")
        took = time.monotonic() - started
        ops += 1
        if took > 0.001:
            slow.append((started, took))
        time.sleep(0.002)
    with open(out, "w") as f:
        json.dump({"mode": mode, "ops": ops, "failures": failures, "errors": errors,
                   "slow": slow}, f)


if __name__ == "__main__":
    main()
