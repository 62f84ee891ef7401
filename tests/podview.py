"""A pod-like view of the root: a process in its own mount namespace holding a read-only slave
bind of the root, made the way kubelet's HostToContainer propagation makes it.

Run as a script inside `unshare --mount --propagation slave`; it serves simple file operations
over stdin/stdout (one JSON object per line) so that tests can act from inside the namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 0x1, 0x20, 0x1000, 0x4000, 1 << 19


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source and source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _op(request: dict[str, Any]) -> dict[str, Any]:
    path = request["path"]
    try:
        match request["op"]:
            case "stat":
                st = os.stat(path)
                return {"ok": True, "ino": st.st_ino, "mode": st.st_mode}
            case "read":
                with open(path, "rb") as f:
                    return {"ok": True, "data": f.read().decode("latin-1")}
            case "listdir":
                return {"ok": True, "names": sorted(os.listdir(path))}
            case "scandir":  # name -> d_ino, as readdir reports it (no stat)
                return {"ok": True, "inodes": {e.name: e.inode() for e in os.scandir(path)}}
            case "realpath":
                return {"ok": True, "path": os.path.realpath(path)}
            case "chdir":
                os.chdir(path)
                return {"ok": True, "cwd": os.getcwd()}
            case _:
                return {"ok": False, "errno": "EINVAL"}
    except OSError as exc:
        return {"ok": False, "errno": os.strerror(exc.errno or 0), "code": exc.errno}


def serve(root: str, view: str) -> None:
    _mount(root, view, MS_BIND | MS_REC)
    _mount(None, view, MS_SLAVE | MS_REC)
    _mount(None, view, MS_REMOUNT | MS_BIND | MS_RDONLY)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_op(json.loads(line))), flush=True)


class PodView:
    """Handle on a running pod-view process (test side)."""

    def __init__(self, root: Path, view: Path) -> None:
        view.mkdir(exist_ok=True)
        self.view = view
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", sys.executable, __file__,
             str(root), str(view)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        assert json.loads(ready) == {"ready": True}, ready

    def do(self, op: str, relative: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, "path": str(self.view / relative)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
