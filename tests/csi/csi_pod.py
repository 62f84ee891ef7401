"""A "pod" for the CSI tests: a process in its own mount namespace with a slave copy of a target.

    python tests/csi/csi_pod.py TARGET VIEW

It unshares its mount namespace, makes every mount in it a slave (so nothing it does leaks out, and
mounts made later on the host still arrive), binds TARGET (a published volume) recursively onto VIEW
(the container's mount point) and makes that a slave too: what a container runtime does for a volume
mount with `mountPropagation: HostToContainer`. Then it answers one JSON request per stdin line with
one JSON line on stdout; paths in requests are relative to VIEW. Everything it mounted disappears
with its namespace when it exits.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from csi import mounts

CLONE_NEWNS = 0x00020000


def unshare_mounts() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "unshare")
    mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_SLAVE)


def handle(view: str, req: dict[str, Any]) -> dict[str, Any]:
    path = os.path.join(view, req.get("path", ""))
    op = req["op"]
    try:
        if op == "stat":
            st = os.stat(path)
            return {"ok": True, "dev": st.st_dev, "ino": st.st_ino, "mode": st.st_mode}
        if op == "read":
            return {"ok": True, "data": Path(path).read_text()}
        if op == "wait_read":  # the repository may still be on its way (propagation)
            deadline = time.monotonic() + req.get("timeout", 5.0)
            while True:
                try:
                    return {"ok": True, "data": Path(path).read_text()}
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        if op == "listdir":
            return {"ok": True, "names": sorted(os.listdir(path))}
        if op == "realpath":
            return {"ok": True, "path": os.path.realpath(path)}
        if op == "chdir":
            os.chdir(path)
            return {"ok": True, "cwd": os.getcwd()}
        if op == "cwd_read":  # read a file relative to the current directory
            return {"ok": True, "data": Path(req["name"]).read_text(), "cwd": os.getcwd()}
        if op == "write":
            Path(path).write_text("x")
            return {"ok": True}
        if op == "mount_options":  # per-mount options of the pod's copy at a path
            table = mounts.MountTable.read()
            entry = table.top(path)
            return {"ok": True, "options": sorted(entry.options) if entry else None}
        if op == "mount_points":
            table = mounts.MountTable.read()
            return {"ok": True, "points": [e.mount_point for e in table.under(view)]}
        return {"ok": False, "error": f"unknown op {op}"}
    except OSError as e:
        return {"ok": False, "errno": e.errno, "error": str(e)}


def main() -> None:
    target, view = sys.argv[1:3]
    unshare_mounts()
    mounts.mount(target, view, None, mounts.MS_BIND | mounts.MS_REC)
    mounts.mount(None, view, None, mounts.MS_REC | mounts.MS_SLAVE)
    print(json.dumps({"ok": True, "ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        print(json.dumps(handle(view, req)), flush=True)


if __name__ == "__main__":
    main()
