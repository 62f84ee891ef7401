"""A reader inside the container: stats and reads files of mounted repositories in a loop,
counting operations and failures, and publishes its progress so that the test can wait for
reads to happen before and after an event (no timed waits).

    reader.py host ROOT STOP PROGRESS REPO...
    reader.py pod ROOT VIEW STOP PROGRESS REPO...   (inside `unshare --mount`: a pod-like
                                                     read-only slave bind of ROOT at VIEW)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

EXPECTED = bytes(range(256)) * 64  # data/blob.bin of every test repository


def publish(path: Path, state: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.rename(path)


def main() -> None:
    mode, root, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "pod":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from podview import MS_BIND, MS_RDONLY, MS_REC, MS_REMOUNT, MS_SLAVE, _mount

        view, rest = rest[0], rest[1:]
        _mount(root, view, MS_BIND | MS_REC)
        _mount(None, view, MS_SLAVE | MS_REC)
        _mount(None, view, MS_REMOUNT | MS_BIND | MS_RDONLY)
        root = view
    stop, progress, repos = Path(rest[0]), Path(rest[1]), rest[2:]
    state: dict[str, object] = {"pid": os.getpid(), "ops": 0, "failures": 0, "errors": [],
                                "done": False}
    errors: list[str] = []
    ops = failures = 0
    while not stop.exists():
        repo = repos[ops % len(repos)]
        base = os.path.join(root, repo)
        try:
            os.stat(os.path.join(base, "README"))
            with open(os.path.join(base, "data", "blob.bin"), "rb") as f:
                if f.read() != EXPECTED:
                    raise OSError(f"wrong content in {repo}")
        except OSError as exc:
            failures += 1
            if len(errors) < 20:
                errors.append(f"{repo}: {exc}")
        ops += 1
        if ops % 25 == 0:
            publish(progress, {**state, "ops": ops, "failures": failures, "errors": errors})
        time.sleep(0.002)  # pacing only: the machine is shared
    publish(progress, {**state, "ops": ops, "failures": failures, "errors": errors,
                       "done": True})


if __name__ == "__main__":
    main()
