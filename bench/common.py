"""Shared helpers: statistics, the progress display, processes, mounts and the worker protocol."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "worker.py"
PY = sys.executable
MNT_DETACH = 2

# The harness drives the backend the tests use, the cvmfs2 stand-in (cvmfs2_standin/), the
# tests' attack kit (tests/attack_kit.py) and the real tier's repository maker
# (tests/real/realrepo.py) for runs on the real client.
for _path in (REPO_ROOT, REPO_ROOT / "tests", REPO_ROOT / "tests" / "real"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
kit = importlib.import_module("cvmfs2_standin.kit")
realrepo = importlib.import_module("realrepo")


class Unavailable(RuntimeError):
    """A system cannot run on this machine (e.g. automount is not installed)."""


# --- statistics ---------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """Median, min, max, p99 (and n) of a sample; the figures every table reports."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "p99": None}
    return {
        "n": len(vals),
        "median": round(percentile(vals, 50), digits),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
        "p99": round(percentile(vals, 99), digits),
    }


def paired_ratio(values: Sequence[Sequence[float]],
                 baseline: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Ratio to a baseline measured in the same rounds: values[rep][round] / baseline[rep][round].

    The median over every round is the figure; min/max are those of the per-repetition medians
    (the spread between fresh mounts)."""
    per_rep = [[v / b for v, b in zip(vs, bs, strict=True) if b > 0]
               for vs, bs in zip(values, baseline, strict=True)]
    every = [x for rep in per_rep for x in rep]
    if not every:
        return {"median": None, "min": None, "max": None, "rounds": 0}
    medians = [percentile(rep, 50) for rep in per_rep if rep]
    return {"median": round(percentile(every, 50), 4), "min": round(min(medians), 4),
            "max": round(max(medians), 4), "rounds": len(every)}


# --- progress -----------------------------------------------------------------------------------
class Progress:
    """One line per step on stderr, with the elapsed time: cheap, and readable in CI logs."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.scenario = "-"

    def begin(self, scenario: str, what: str) -> None:
        self.scenario = scenario
        self.say(f"== {what}")

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:7.1f}s] {self.scenario:<9} {message}", file=self.stream, flush=True)


# --- processes ----------------------------------------------------------------------------------
def set_child_subreaper() -> None:
    """Backends daemonize (double fork): make their orphans ours, so that the harness reaps them
    instead of leaving zombies behind in a container whose pid 1 may never reap."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 timeout: float = 30.0) -> int | None:
    """Stop one process this harness started, by its pid: sig, then SIGKILL after timeout."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def reap_adopted() -> int:
    """Collect exited orphans that were reparented to this process (the subreaper).

    Only zombies are waited for, by pid, so a live subprocess.Popen child is never disturbed.
    """
    import psutil

    reaped = 0
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() == psutil.STATUS_ZOMBIE:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(child.pid, os.WNOHANG)
                        reaped += 1
    return reaped


def wait_gone(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """Wait until these processes exited (reaping those that are ours); return the survivors.

    An exited process that someone else has not reaped yet (a zombie) counts as gone."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        reap_adopted()
        pending = {pid for pid in pending if _alive(pid)}
        if not pending or time.monotonic() >= deadline:
            return sorted(pending)
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- mounts -------------------------------------------------------------------------------------
def mount_points() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount this process sees, from mountinfo (unescaped)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        point = fields[4].encode().decode("unicode_escape")
        out.append((point, fields[sep + 1]))
    return out


def mounts_under(path: Path | str) -> list[str]:
    prefix = str(path)
    return [p for p, _ in mount_points() if p == prefix or p.startswith(prefix + "/")]


def is_mounted(path: Path | str, fstype: str | None = None) -> bool:
    return any(p == str(path) and (fstype is None or t == fstype) for p, t in mount_points())


MS_SHARED = 1 << 20


def mount(source: str, target: Path | str, fstype: str | None, flags: int,
          data: str = "") -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(source.encode(), os.fsencode(str(target)),
                    fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                    data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def umount(path: Path | str, flags: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(str(path)), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def umount_below(path: Path | str) -> list[str]:
    """Last-resort cleanup: detach every mount at or below path, deepest first. Returns what was
    found (so that callers can report a leak instead of hiding it)."""
    found: list[str] = []
    for _ in range(5):
        points = sorted(mounts_under(path), key=lambda p: p.count("/"), reverse=True)
        if not points:
            break
        found.extend(points)
        for point in points:
            with contextlib.suppress(OSError):
                umount(point, MNT_DETACH)
    return found


# --- the worker ---------------------------------------------------------------------------------
class Worker:
    """A `bench/worker.py` subprocess: it starts, imports, says "ready", then waits for a go byte
    on stdin. Timing happens inside it, so process start-up never counts."""

    def __init__(self, *args: str, stdin: int | None = None, cwd: str = "/",
                 prefix: Sequence[str] = ()) -> None:
        """prefix: what runs the worker (e.g. setpriv as another user: the attack scenario's
        legitimate requesters)."""
        self.proc = subprocess.Popen(
            [*prefix, PY, str(WORKER), *args],
            stdin=stdin if stdin is not None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,  # never inside a mount under test: a cwd would keep it busy
        )
        assert self.proc.stdout is not None
        self._buf = b""

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"worker {self.proc.args[2:]} gave no answer in {timeout:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"worker {self.proc.args[2:]} exited: {err[-2000:]}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def ready(self, timeout: float = 30.0) -> None:
        line = self._line(timeout)
        if line != "ready":
            raise RuntimeError(f"worker said {line!r} instead of ready")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        self.proc.stdin.flush()

    def result(self, timeout: float = 600.0) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self._line(timeout))
        self.close()
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, signal.SIGKILL)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def run_rounds(specfile: Path, mode: str, systems: dict[str, list[str]],
               rounds: int) -> dict[str, Any]:
    """One worker runs mode for every system, interleaved pass by pass (see worker.py)."""
    specfile.write_text(json.dumps({"mode": mode, "rounds": rounds, "systems": systems}))
    return run_worker("rounds", str(specfile))


def run_worker(*args: str, timeout: float = 600.0,
               prefix: Sequence[str] = ()) -> dict[str, Any]:
    """Start a worker, wait until it is ready, let it go, return its JSON result."""
    worker = Worker(*args, prefix=prefix)
    try:
        worker.ready()
        worker.go()
        return worker.result(timeout)
    finally:
        worker.close()
