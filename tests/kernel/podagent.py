"""A pod-like process for the mount experiments (kexp).

Started as `unshare -m --propagation slave python podagent.py SRC DST BASE [slave|private]`: it
makes its copy the way a container runtime does (`mount --rbind SRC DST && mount --make-rslave
DST`, or --make-rprivate for mountPropagation None), then detaches,
in its own namespace only, every other copy of the lab's mounts below BASE (a runtime's
pivot_root drops the host's mounts the same way), so that only the pod's view is left.  It then
serves one JSON command per line on stdin:

  {"op": "read", "path": P}           open+read P (a fresh path walk)
  {"op": "chdir", "path": P}          cwd := P
  {"op": "hold", "path": P}           keep P open
  {"op": "readcwd", "name": N}        read N relative to the cwd
  {"op": "readheld"}                  pread the held file
  {"op": "rewalk"}                    chdir(getcwd()) (what `cd "$PWD"` does), then report
  {"op": "reader_start", "paths": [..]} start a thread reading the paths in a tight loop
  {"op": "reader_stop"}               stop it, report counts of OK / failures by errno
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time

MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE, MNT_DETACH = 0x1000, 0x4000, 1 << 18, 1 << 19, 2
libc = ctypes.CDLL(None, use_errno=True)


def _mount(src: str | None, dst: str, flags: int) -> None:
    if libc.mount(src and src.encode(), dst.encode(), None, flags, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dst)


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return {"ok": True, "data": f.read().decode().strip()}
    except OSError as exc:
        return {"ok": False, "err": errno_name(exc.errno)}


def errno_name(e: int | None) -> str:
    import errno as _errno
    return _errno.errorcode.get(e or 0, str(e))


class Reader:
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.stop = threading.Event()
        self.ok = 0
        self.fail: dict[str, int] = {}
        self.first_fail: float | None = None
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            for p in self.paths:
                i += 1
                try:
                    # a path walk every time (stat: dentries and attributes are cached), a full
                    # open+read through the backend every 16th time
                    if i % 16:
                        os.stat(p)
                    else:
                        with open(p, "rb") as f:
                            f.read()
                    self.ok += 1
                except OSError as exc:
                    n = errno_name(exc.errno)
                    self.fail[n] = self.fail.get(n, 0) + 1
                    if self.first_fail is None:
                        self.first_fail = time.monotonic()

    def finish(self) -> dict:
        self.stop.set()
        self.t.join()
        return {"reads": self.ok, "fail": self.fail}


def _detach_others(base: str, keep: str) -> None:
    mine = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp.startswith(base + "/") and not (mp == keep or mp.startswith(keep + "/")):
                mine.append(mp)
    # shallowest first: a detach takes the subtree with it
    for mp in sorted(set(mine), key=lambda p: p.count("/")):
        while True:
            if libc.umount2(mp.encode(), MNT_DETACH) != 0:
                break


def main() -> None:
    src, dst, base = sys.argv[1], sys.argv[2], sys.argv[3]
    # "slave": mountPropagation HostToContainer (rslave); "private": the Kubernetes default
    # (None), which containerd makes rprivate
    mode = sys.argv[4] if len(sys.argv) > 4 else "slave"
    os.chdir("/")
    os.makedirs(dst, exist_ok=True)
    _mount(src, dst, MS_BIND | MS_REC)
    _mount(None, dst, (MS_PRIVATE if mode == "private" else MS_SLAVE) | MS_REC)
    _detach_others(base, dst)
    held: int | None = None
    reader: Reader | None = None
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "read":
                res = _read(req["path"])
            elif op == "chdir":
                os.chdir(req["path"])
                res = {"ok": True}
            elif op == "hold":
                held = os.open(req["path"], os.O_RDONLY)
                res = {"ok": True}
            elif op == "readcwd":
                res = _read(req["name"])
            elif op == "readheld":
                assert held is not None
                res = {"ok": True, "data": os.pread(held, 100, 0).decode().strip()}
            elif op == "rewalk":
                os.chdir(os.getcwd())
                res = {"ok": True}
            elif op == "reader_start":
                reader = Reader(req["paths"])
                res = {"ok": True}
            elif op == "reader_stop":
                assert reader is not None
                res = {"ok": True, **reader.finish()}
                reader = None
            elif op == "release":
                if held is not None:
                    os.close(held)
                    held = None
                os.chdir("/")
                res = {"ok": True}
            else:
                res = {"ok": False, "err": "EINVAL"}
        except OSError as exc:
            res = {"ok": False, "err": errno_name(exc.errno)}
        print(json.dumps(res), flush=True)


def reader_main() -> None:
    """`podagent.py --reader PATH...`: the same loop in this namespace until stdin closes."""
    r = Reader(sys.argv[2:])
    sys.stdin.read()
    print(json.dumps(r.finish()), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--reader":
        reader_main()
    else:
        main()
