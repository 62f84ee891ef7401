"""Signals before the daemon's own receivers run, and signals that mean nothing to it.

Between the start of the process (or of a re-exec: the same pid, a new interpreter) and the
moment the daemon listens for SIGTERM/SIGINT/SIGUSR2, a default action would kill it mid-start.
Those signals are recorded instead, and acted on once it serves; across an exec they stay blocked,
so one sent meanwhile waits instead of killing the fresh interpreter. Asynchronous signals with
no meaning for cvmfsd are ignored (a stray SIGUSR1 or SIGALRM must not end it); children get
their default dispositions back (children.spawn).
"""

from __future__ import annotations

import signal
import threading

IGNORED = (signal.SIGUSR1, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO,
           signal.SIGPWR)
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP)

# Signals that arrived before the daemon listened, in order.
pending: list[int] = []


def _record(signum: int, frame: object) -> None:
    pending.append(signum)


def install_early() -> None:
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    for sig in HANDLED:
        signal.signal(sig, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def block_for_exec() -> None:
    """Keep HANDLED pending across an exec (the mask survives it) until install_early(). What
    was recorded since the daemon stopped listening (a SIGTERM right after the SIGUSR2 that
    started the re-exec) is made pending again, on this thread, the one that execs: the next
    interpreter acts on it instead of it being lost with this one."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    for signum in dict.fromkeys(pending):
        signal.pthread_kill(threading.get_ident(), signum)
    pending.clear()


__all__ = ["HANDLED", "IGNORED", "block_for_exec", "install_early", "pending"]
