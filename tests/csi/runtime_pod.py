"""A pod as a container runtime makes it, for the view-healing tests.

    python tests/csi/runtime_pod.py TARGET VIEW HIDE...

In a new mount namespace: `mount --make-rslave /`, then `mount --rbind TARGET VIEW && mount
--make-rslave VIEW` (what runc does for a volume with `mountPropagation: HostToContainer`), then
the namespace's copies of the host's mounts at and below each HIDE path are detached, as the
runtime's pivot_root into the container's root file system leaves the container nothing of the
host but its volumes. Nothing done here propagates back: everything in the namespace is a slave.

One JSON request per stdin line, one JSON reply per stdout line; relative paths are relative to
VIEW. Files held open (`open`) and the working directory (`chdir`) stay where they were opened
until the request to walk again by path (`chdir` again, `reopen`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from typing import Any

CLONE_NEWNS = 0x00020000
MNT_DETACH = 2


def _libc_call(name: str, *args: Any) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def _hide(path: str, keep: str) -> None:
    """Detach this namespace's copies at and below path, except keep (and what is below it)."""
    for _ in range(64):
        points = [p for p in _mountpoints()
                  if (p == path or p.startswith(path + "/"))
                  and not (p == keep or p.startswith(keep + "/"))]
        if not points:
            return
        # shallowest first: a detach takes what is below it along
        point = min(points, key=lambda p: p.count("/"))
        try:
            _libc_call("umount2", point.encode(), MNT_DETACH)
        except OSError:
            return


class Pod:
    def __init__(self, view: str) -> None:
        self.view = view
        self.held: dict[str, tuple[int, str]] = {}

    def path(self, rel: str) -> str:
        return rel if rel.startswith("/") else os.path.join(self.view, rel)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        try:
            if op == "read":
                with open(self.path(req["path"]), "rb") as f:
                    return {"ok": True, "data": f.read().decode("latin-1")}
            if op == "wait_read":  # until a walk by path reads it; how long that took
                started = time.monotonic()
                deadline = started + req.get("within", 30.0)
                errors: dict[str, int] = {}
                while True:
                    try:
                        with open(self.path(req["path"]), "rb") as f:
                            data = f.read().decode("latin-1")
                        return {"ok": True, "data": data, "errors": errors,
                                "waited_s": round(time.monotonic() - started, 3)}
                    except OSError as exc:
                        name = os.strerror(exc.errno or 0)
                        errors[name] = errors.get(name, 0) + 1
                        if time.monotonic() > deadline:
                            return {"ok": False, "errno": exc.errno, "error": str(exc),
                                    "errors": errors}
                        time.sleep(0.02)
            if op == "stat":
                st = os.stat(self.path(req["path"]))
                return {"ok": True, "dev": st.st_dev, "ino": st.st_ino}
            if op == "xattr":  # e.g. user.pid: which cvmfs2 serves what the pod sees there
                value = os.getxattr(self.path(req["path"]), req["name"])
                return {"ok": True, "value": value.decode(errors="replace")}
            if op == "listdir":
                return {"ok": True, "names": sorted(os.listdir(self.path(req["path"])))}
            if op == "chdir":
                os.chdir(self.path(req["path"]))
                return {"ok": True}
            if op == "cwd_read":  # a file relative to the working directory
                with open(req["name"], "rb") as f:
                    return {"ok": True, "data": f.read().decode("latin-1")}
            if op == "open":  # hold a file open under a key
                path = self.path(req["path"])
                self.held[req["key"]] = (os.open(path, os.O_RDONLY), path)
                return {"ok": True}
            if op == "read_held":
                fd, _ = self.held[req["key"]]
                return {"ok": True, "data": os.pread(fd, 1 << 20, 0).decode("latin-1")}
            if op == "reopen":  # walk again by path, drop the old descriptor
                fd, path = self.held[req["key"]]
                with contextlib.suppress(OSError):  # the flush of a dead file: ENOTCONN
                    os.close(fd)
                self.held[req["key"]] = (os.open(path, os.O_RDONLY), path)
                return {"ok": True}
            if op == "mounts":  # this namespace's mounts at or below the view
                return {"ok": True, "points": [p for p in _mountpoints()
                                               if p == self.view
                                               or p.startswith(self.view + "/")]}
            return {"ok": False, "error": f"unknown op {op}"}
        except OSError as exc:
            return {"ok": False, "errno": exc.errno, "error": str(exc)}


def main() -> None:
    target, view, *hide = sys.argv[1:]
    _libc_call("unshare", CLONE_NEWNS)
    subprocess.run(["mount", "--make-rslave", "/"], check=True)
    subprocess.run(["mount", "--rbind", target, view], check=True)
    subprocess.run(["mount", "--make-rslave", view], check=True)
    for path in hide:
        _hide(path, view)
    pod = Pod(view)
    print(json.dumps({"ok": True, "ready": True, "pid": os.getpid(),
                      "ns": os.stat("/proc/self/ns/mnt").st_ino}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        print(json.dumps(pod.handle(req)), flush=True)


if __name__ == "__main__":
    main()
