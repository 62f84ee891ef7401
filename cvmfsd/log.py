"""structlog setup: JSON lines when stderr is not a TTY (journald, kubectl logs), readable
key=value lines on a terminal.

Logging never blocks or kills the event loop: lines go to a bounded queue that one writer thread
empties into stderr. When nobody reads stderr (a full pipe) lines are dropped — and counted, and
the count is logged once stderr takes lines again —; when stderr is closed they are discarded.
What users can make the daemon say over and over (refused names) goes through a Throttle.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import queue
import sys
import threading
import time
from typing import Any

import structlog

# Lines waiting for stderr at most (a few MB at most, whatever happens to stderr).
QUEUE_LINES = 10_000


class _Writer:
    """File-like sink for structlog's PrintLogger: put() never blocks."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.size = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, name="cvmfsd-log", daemon=True)
        self._thread.start()

    def write(self, text: str) -> int:
        with self._lock:
            if self.size >= QUEUE_LINES:
                self.dropped += 1
                return len(text)
            self.size += 1
        self.lines.put(text.encode(errors="replace"))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def _drain(self) -> None:
        while True:
            data = self.lines.get()
            with self._lock:
                dropped, self.dropped = self.dropped, 0
            if dropped:
                data = (f'{{"event": "log_lines_dropped", "count": {dropped}, '
                        f'"level": "warning"}}\n').encode() + data
            self._write_all(data)
            # Counted until written: wait_empty() before an exit must not lose the last line.
            with self._lock:
                self.size -= 1

    def _write_all(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self.fd, data):]
            except InterruptedError:
                continue
            except BlockingIOError:
                time.sleep(0.05)
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EBADF, errno.EIO):
                    time.sleep(0.05)
                return  # stderr is gone: the line is lost, the daemon goes on

    def wait_empty(self, timeout: float) -> None:
        """For a stop or a re-exec: give queued lines a moment to reach stderr."""
        deadline = time.monotonic() + timeout
        while self.size and time.monotonic() < deadline:
            time.sleep(0.01)


def _pump(read_fd: int, writer: _Writer) -> None:
    """Lines that C code (libfuse) or Python itself writes to fd 2 go through the same queue."""
    rest = b""
    while chunk := os.read(read_fd, 65536):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            writer.write(line.decode(errors="replace") + "\n")
        rest = rest[-65536:]


_writer: _Writer | None = None
_stderr: int | None = None  # the real stderr, while fd 2 is the pump's pipe


def configure(level: str = "info", fmt: str = "auto") -> None:
    global _writer, _stderr
    tty = sys.stderr is not None and sys.stderr.isatty()
    if _writer is None:
        # Started with stdin, stdout or stderr closed: /dev/null in their place first. Else the
        # next descriptors opened take those numbers: the copy of stderr would be fd 2 itself,
        # which becomes the pump's pipe below, and every line would come back through the pump
        # for ever (a busy loop).
        while (null := os.open(os.devnull, os.O_RDWR)) <= 2:
            pass
        os.close(null)
        _stderr = os.dup(2)
        os.set_inheritable(_stderr, False)
        _writer = _Writer(_stderr)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        threading.Thread(target=_pump, args=(read_fd, _writer), name="cvmfsd-stderr",
                         daemon=True).start()
        if faulthandler.is_enabled():
            # A fatal signal (the watchdog's SIGABRT) also stops the pump: the tracebacks must go
            # to the real stderr, or they die in the pipe with the process.
            faulthandler.enable(file=_stderr, all_threads=True)
    json_output = fmt == "json" or (fmt == "auto" and not tty)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_output
        else structlog.dev.ConsoleRenderer(colors=tty)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # One write per line (PrintLogger's print() makes two: the text, then the newline), so
        # that a line is queued or dropped whole.
        logger_factory=structlog.WriteLoggerFactory(file=_writer),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # pyfuse3 logs through the standard library: the same queue.
    handler = logging.StreamHandler(_writer)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def flush(timeout: float = 1.0) -> None:
    if _writer is not None:
        if sys.stderr is not None:
            sys.stderr.flush()
        time.sleep(0.02)  # for the pump to pick up what went to fd 2
        _writer.wait_empty(timeout)


def restore_stderr() -> None:
    """Before an exec: fd 2 back to the real stderr (nobody would drain the pump's pipe)."""
    flush()
    if _stderr is not None:
        os.dup2(_stderr, 2)


class Throttle:
    """At most `burst` lines per `period` seconds per key; the next line that passes says how
    many were held back. For what any user can make happen at any rate."""

    def __init__(self, burst: int = 10, period: float = 10.0, keys: int = 256) -> None:
        self.burst = burst
        self.period = period
        self.keys = keys
        self._state: dict[Any, list[float]] = {}  # key -> [window start, sent, suppressed]

    def allow(self, key: Any) -> int | None:
        """None: hold the line back. Otherwise: how many were held back since the last one."""
        now = time.monotonic()
        state = self._state.get(key)
        if state is None or now - state[0] >= self.period:
            suppressed = int(state[2]) if state else 0
            if state is None and len(self._state) >= self.keys:
                self._state.pop(next(iter(self._state)))
            self._state[key] = [now, 1, 0]
            return suppressed
        if state[1] < self.burst:
            state[1] += 1
            suppressed, state[2] = int(state[2]), 0
            return suppressed
        state[2] += 1
        return None


__all__ = ["Throttle", "configure", "flush", "restore_stderr"]
