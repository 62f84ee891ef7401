"""Kernel-side timestamps for the profiles: a private ftrace instance, read as text.

The kernel's own tracepoints time what no user-space stamp can: when a FUSE request is queued and
answered (fuse:fuse_request_send/end), each syscall of the processes profiled (raw_syscalls),
exec, fork, exit, wakeups and context switches (sched). Everything is stamped with
CLOCK_MONOTONIC (trace_clock "mono"), the clock of time.monotonic_ns/perf_counter_ns.

Nothing of the machine's is changed: tracefs is mounted in a mount namespace of the helper's own
(`unshare --mount --propagation private`, gone with the helper), and the events go to a tracing
*instance* of ours (instances/cvmfsd-bench-<pid>: its own buffer and settings; the global
buffer and other instances are untouched), removed at the end. Only the pids handed to
`follow()` are traced, with their descendants (options/event-fork).

    with KernelTrace(path) as kt:      # the helper runs for the duration
        kt.follow(pid)                  # every thread of pid, and what it starts later
        kt.mark("rep 1 cvmfsd")         # a line in the trace (trace_marker)
    events = parse(path)                # after the block: the trace as Event records
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

EVENTS = ("fuse/fuse_request_send", "fuse/fuse_request_end", "sched/sched_process_exec",
          "sched/sched_process_fork", "sched/sched_process_exit", "sched/sched_switch",
          "sched/sched_wakeup", "sched/sched_wakeup_new", "raw_syscalls/sys_enter",
          "raw_syscalls/sys_exit")
BUFFER_KB = 32768  # per CPU: a cold access is a few thousand events; a whole run fits


class Unavailable(RuntimeError):
    pass


class KernelTrace:
    def __init__(self, out: Path, events: Iterable[str] = EVENTS,
                 buffer_kb: int = BUFFER_KB) -> None:
        self.out = out
        self.events = tuple(events)
        self.buffer_kb = buffer_kb
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> KernelTrace:
        if os.geteuid() != 0:
            raise Unavailable("tracing needs root")
        self._proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
             "bench.ktrace", "serve", str(self.out), str(self.buffer_kb), *self.events],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parent.parent)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if line != "ready":
            self._proc.wait()
            raise Unavailable(f"ftrace unavailable: {line or 'the helper exited'}")
        return self

    def _say(self, line: str) -> str:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(line.replace("\n", " ") + "\n")
        self._proc.stdin.flush()
        return self._proc.stdout.readline().strip()

    def follow(self, pid: int) -> None:
        """Trace every thread of pid and (event-fork) every task it creates from now on."""
        tids = [pid]
        with contextlib.suppress(OSError):
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        self._say("pids " + " ".join(map(str, tids)))

    def mark(self, text: str) -> None:
        self._say("mark " + text)

    def dump(self) -> int:
        """Append what the buffer holds to the output file and empty it (between samples, so
        that a long run never wraps the buffer); returns the events lost so far (overruns)."""
        answer = self._say("dump")
        return int(answer.split()[-1]) if answer.startswith("ok") else -1

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._say("stop")
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _serve(out: Path, buffer_kb: int, events: list[str]) -> None:
    """The helper, in its own mount namespace: one instance, driven by lines on stdin."""
    mnt = Path(tempfile.mkdtemp(prefix="cvmfsd-tracefs-"))
    try:
        try:
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(mnt)], check=True,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            print(f"mount tracefs: {exc.stderr.strip()}", flush=True)
            return
        inst = mnt / "instances" / f"cvmfsd-bench-{os.getpid()}"
        try:
            inst.mkdir()
        except OSError as exc:
            print(f"tracing instance: {exc}", flush=True)
            return
        try:
            (inst / "tracing_on").write_text("0")
            (inst / "trace_clock").write_text("mono")
            (inst / "buffer_size_kb").write_text(str(buffer_kb))
            (inst / "options" / "event-fork").write_text("1")
            (inst / "options" / "record-tgid").write_text("1")  # threads -> their process
            (inst / "set_event_pid").write_text(str(os.getpid()))  # nothing else yet
            for event in events:
                (inst / "events" / event / "enable").write_text("1")
            # close(2) is left out: cvmfs2 closes every descriptor up to its limit before each
            # fork+exec of its config shell (tens of thousands of calls) and nothing here
            # needs them.
            for event in events:
                if event.startswith("raw_syscalls/"):
                    (inst / "events" / event / "filter").write_text("id != 3")
            (inst / "trace").write_text("")
            with open(out, "wb") as dumped:
                (inst / "tracing_on").write_text("1")
                print("ready", flush=True)
                _commands(inst, dumped)
            print(f"ok {_overruns(inst)}", flush=True)
        finally:
            with contextlib.suppress(OSError):
                (inst / "tracing_on").write_text("0")
            for event in events:
                with contextlib.suppress(OSError):
                    (inst / "events" / event / "enable").write_text("0")
            with contextlib.suppress(OSError):
                inst.rmdir()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def _commands(inst: Path, dumped: BinaryIO) -> None:
    for line in sys.stdin:
        verb, _, rest = line.rstrip("\n").partition(" ")
        if verb == "pids":
            # O_APPEND adds to the list (O_TRUNC would replace it); no seek (tracefs).
            fd = os.open(inst / "set_event_pid", os.O_WRONLY | os.O_APPEND)
            try:
                for pid in rest.split():
                    with contextlib.suppress(OSError):  # a thread that just ended
                        os.write(fd, pid.encode())
            finally:
                os.close(fd)
        elif verb == "mark":
            (inst / "trace_marker").write_text(rest)
        elif verb in ("dump", "stop"):
            (inst / "tracing_on").write_text("0")
            with open(inst / "trace", "rb") as src:
                while chunk := src.read(1 << 20):
                    dumped.write(chunk)
            dumped.flush()
            (inst / "trace").write_text("")  # empties the buffer
            if verb == "stop":
                return
            (inst / "tracing_on").write_text("1")
            print(f"ok {_overruns(inst)}", flush=True)
            continue
        print("ok", flush=True)


def _overruns(inst: Path) -> int:
    total = 0
    for stats in (inst / "per_cpu").glob("cpu*/stats"):
        with contextlib.suppress(OSError, ValueError):
            for line in stats.read_text().splitlines():
                if line.startswith("overrun:"):
                    total += int(line.split()[1])
    return total


# --- parsing ------------------------------------------------------------------------------------
_LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+(?:\(\s*(?P<tgid>\d+|-+)\)\s+)?"
                   r"\[(?P<cpu>\d+)\]\s+\S+\s+"
                   r"(?P<ts>\d+\.\d+):\s+(?P<event>[\w:]+):\s?(?P<rest>.*)$")


@dataclass
class Event:
    ns: int          # CLOCK_MONOTONIC (µs resolution)
    tid: int
    tgid: int        # 0: unknown
    comm: str
    cpu: int
    name: str        # e.g. sys_enter, fuse_request_send, tracing_mark_write
    text: str
    fields: dict[str, str]


_KV = re.compile(r"(\w+)=(\S+)")


def _fields(name: str, text: str) -> dict[str, str]:
    if name in ("sys_enter", "sys_exit"):
        m = re.match(r"NR (-?\d+)(?: \((.*)\)| = (-?\d+))?", text)
        if m:
            return {"nr": m.group(1), "args": m.group(2) or "", "ret": m.group(3) or ""}
    if name.startswith("fuse_request"):
        m = re.match(r"connection (\d+) req (\d+)(?: opcode \d+ \((\w+)\))?(?: len (\d+))?"
                     r"(?: error (-?\d+))?", text)
        if m:
            return {"conn": m.group(1), "req": m.group(2), "op": m.group(3) or "",
                    "error": m.group(5) or ""}
    return dict(_KV.findall(text))


def parse(path: Path) -> Iterator[Event]:
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("#"):
                continue
            m = _LINE.match(line)
            if not m:
                continue
            sec, _, frac = m.group("ts").partition(".")
            ns = int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
            name, text = m.group("event"), m.group("rest")
            tgid = m.group("tgid") or ""
            yield Event(ns, int(m.group("pid")), int(tgid) if tgid.isdigit() else 0,
                        m.group("comm").strip(), int(m.group("cpu")), name, text,
                        _fields(name, text))


def syscall_names() -> dict[int, str]:
    """x86_64 syscall numbers from the kernel headers, where installed (else numbers stay)."""
    names: dict[int, str] = {}
    for header in ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
                   "/usr/include/asm/unistd_64.h"):
        with contextlib.suppress(OSError):
            for m in re.finditer(r"#define __NR_(\w+) (\d+)", Path(header).read_text()):
                names[int(m.group(2))] = m.group(1)
            break
    return names


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        _serve(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        print(__doc__)
