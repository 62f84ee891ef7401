"""Attackers for tests/test_attacks.py (issue 12) and bench/scenarios/attack.py: unprivileged
requesters (another uid, another pod), the work they do, and what is measured on the daemon.

A requester is what cvmfsd keys its shares by: a uid and, for a process in a Kubernetes pod,
the pod's UID from its cgroup path. "Another pod" here is a process moved into a cgroup of our
own whose name has kubelet's shape (`kubepods-besteffort-pod<uid>.slice`, systemd driver), below
one directory this module creates and removes; no other cgroup is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

MiB = 1 << 20
ATTACKER_UID = 1001
OTHER_UID = 1002

# --- what the attackers run (plain Python, stdlib only: a fresh interpreter per requester) ----

# Stat one path N times; errno -> count (0: success).
STAT_LOOP = r"""
import json, os, sys
path, n = sys.argv[1], int(sys.argv[2])
seen = {}
for _ in range(n):
    try:
        os.stat(path)
        e = 0
    except OSError as exc:
        e = exc.errno
    seen[e] = seen.get(e, 0) + 1
print(json.dumps(seen))
"""

# Stat one path until STOPFILE exists; prints the count.
STAT_UNTIL = r"""
import json, os, sys
path, stop = sys.argv[1], sys.argv[2]
n = 0
while n % 1000 or not os.path.exists(stop):
    try:
        os.stat(path)
    except OSError:
        pass
    n += 1
print(json.dumps({"lookups": n}))
"""

# Stat names PATTERN.format(i) for i in [start, stop) once each; errno -> count.
STAT_NAMES = r"""
import json, os, sys
pattern, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = {}
for i in range(start, stop):
    try:
        os.stat(pattern.format(i))
        e = 0
    except OSError as exc:
        e = exc.errno
    seen[e] = seen.get(e, 0) + 1
print(json.dumps(seen))
"""

# Open one file in each path, report per path (0 or errno), keep them open until stdin closes.
HOLD = r"""
import json, os, sys
held, out = [], {}
for path in sys.argv[1:]:
    try:
        held.append(open(path, "rb"))
        out[path] = 0
    except OSError as exc:
        out[path] = exc.errno
print(json.dumps(out), flush=True)
sys.stdin.read()
"""

# THREADS threads; thread t stats PATTERN.format(t), then PATTERN.format(t + THREADS), ... (each
# name once) until STOPFILE exists; after an error at once a short pause (what refused requests
# cost is not the point, the root's capacity is). Prints "started" when every thread runs, then
# errno -> count at the end.
THREADS = r"""
import json, os, sys, threading, time
pattern, threads, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen, lock = {}, threading.Lock()
ready = threading.Barrier(threads + 1)
def work(t):
    ready.wait()
    i = t
    while not os.path.exists(stop):
        t0 = time.monotonic()
        try:
            os.stat(pattern.format(i))
            e = 0
        except OSError as exc:
            e = exc.errno
        with lock:
            seen[e] = seen.get(e, 0) + 1
        if time.monotonic() - t0 < 0.05:
            time.sleep(0.05)
        i += threads
workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
for w in workers:
    w.start()
ready.wait()
print("started", flush=True)
while not os.path.exists(stop):
    time.sleep(0.05)
deadline = time.monotonic() + 120
for w in workers:
    w.join(max(0.1, deadline - time.monotonic()))
with lock:
    print(json.dumps(seen), flush=True)
"""

# One first access, timed: stat of a path; prints {"errno": e, "ms": t}.
FIRST_ACCESS = r"""
import json, os, sys, time
t0 = time.perf_counter_ns()
try:
    os.stat(sys.argv[1])
    e = 0
except OSError as exc:
    e = exc.errno
print(json.dumps({"errno": e, "ms": (time.perf_counter_ns() - t0) / 1e6}))
"""


# --- pods: cgroups of our own with kubelet's names ---------------------------------------------
def _cgroup_hierarchy() -> Path | None:
    """A cgroup hierarchy this process may create directories in: cgroup v2 (at /sys/fs/cgroup or,
    in hybrid mode, /sys/fs/cgroup/unified), else v1's named systemd hierarchy."""
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    v2 = [Path(m[4]) for m in mounts if m[m.index("-") + 1] == "cgroup2"]
    v1 = [Path(m[4]) for m in mounts if m[m.index("-") + 1] == "cgroup"
          and "name=systemd" in m[-1]]
    for candidate in v2 + v1:
        if os.access(candidate, os.W_OK) and (candidate / "cgroup.procs").exists():
            return candidate
    return None


class Pods:
    """Pod cgroups below one directory of our own; remove() takes them all away again (after
    killing, by pid, any process of ours still in one)."""

    def __init__(self) -> None:
        hierarchy = _cgroup_hierarchy()
        if hierarchy is None:
            raise RuntimeError("no writable cgroup hierarchy")
        self.base = hierarchy / f"cvmfsd-tests-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.base.mkdir()
        self.made: list[Path] = []

    def new(self) -> tuple[str, Path]:
        """A new pod: (its UID, the cgroup.procs file a process is moved in by)."""
        uid = str(uuid.uuid4())
        group = self.base / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
        group.mkdir()
        self.made.append(group)
        return uid, group / "cgroup.procs"

    def remove(self) -> None:
        for group in [*reversed(self.made), self.base]:
            for _ in range(50):
                with contextlib.suppress(OSError):
                    pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
                    for pid in pids:  # only ever processes this test moved there
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


# --- requesters ---------------------------------------------------------------------------------
def requester_argv(argv: list[str], uid: int | None = ATTACKER_UID,
                   pod: Path | None = None) -> list[str]:
    """argv run as uid (None: root) and, with pod (a cgroup.procs file), inside that pod."""
    if uid is not None:
        argv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *argv]
    if pod is not None:
        # Moved before dropping root: writing a cgroup.procs file needs it.
        argv = ["sh", "-c", 'echo 0 > "$0" && exec "$@"', str(pod), *argv]
    return argv


def python(code: str, *args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def start(code: str, *args: str | os.PathLike[str], uid: int | None = ATTACKER_UID,
          pod: Path | None = None, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(requester_argv(python(code, *args), uid, pod), text=True,
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(code: str, *args: str | os.PathLike[str], uid: int | None = ATTACKER_UID,
        pod: Path | None = None, timeout: float = 300) -> Any:
    """Run a requester to its end; its JSON output (errno keys back to ints)."""
    done = subprocess.run(requester_argv(python(code, *args), uid, pod), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return decode(done.stdout.strip().splitlines()[-1])


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Its output once it exits; killed (by its pid) if it does not within timeout."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def decode(line: str) -> Any:
    value = json.loads(line)
    if isinstance(value, dict) and all(k.lstrip("-").isdigit() for k in value):
        return {int(k): v for k, v in value.items()}
    return value


class Holder:
    """A requester that keeps one file open in each of some repositories (HOLD)."""

    def __init__(self, paths: list[Path], uid: int | None = ATTACKER_UID,
                 pod: Path | None = None) -> None:
        self.proc = start(HOLD, *paths, uid=uid, pod=pod, stdin=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"holder failed: {self.proc.communicate(timeout=30)}")
        self.result: dict[str, int] = json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the daemon, seen from outside -------------------------------------------------------------
def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


class RssSampler:
    """Samples a process's RSS every `period` seconds in a thread, until stopped."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        import threading

        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append((time.monotonic() - started, rss(self.pid)))
            self._stop.wait(period)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    @property
    def peak(self) -> int:
        return max((r for _, r in self.samples), default=0)


def control(socket_path: Path, cmd: str, timeout: float = 60, **args: Any) -> dict[str, Any]:
    """One request over the status socket; the whole reply (ok or error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(socket_path))
        sock.sendall(json.dumps({"v": 1, "cmd": cmd, **args}).encode() + b"\n")
        buffer = b""
        while not buffer.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            buffer += chunk
    return json.loads(buffer)


def wait_for(what: Callable[[], Any], timeout: float, message: str,
             period: float = 0.05) -> Any:
    """Until what() is truthy (its value), or AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (not within {timeout:g} s)")
        time.sleep(period)


def write_fast_failing(path: Path, inner: Path, boots_log: Path, domain: str) -> Path:
    """A cvmfs2 for name-table attacks: a repository of `domain` fails at once the way a missing
    one does (exit 16), without a Python stand-in's start-up per boot; anything else goes to
    `inner`. Each failure is one line in boots_log, as the counting wrapper writes."""
    path.write_text(
        "#!/bin/sh\n"
        'eval fqrn=\\${$(($# - 1))}\n'
        f'case "$fqrn" in *.{domain})\n'
        f'  echo "$$ $*" >> {boots_log}\n'
        '  echo "Failed to initialize root file catalog (16 - file catalog failure)" >&2\n'
        "  exit 16;;\n"
        "esac\n"
        f'exec {inner} "$@"\n')
    path.chmod(0o755)
    return path

