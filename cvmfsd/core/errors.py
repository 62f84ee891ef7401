"""Typed mount failures. The FUSE adapter turns them into one errno at its boundary."""

from __future__ import annotations

import errno

# cvmfs/loader.h enum Failures (cvmfs2-interface.md §2).
EXIT_MEANINGS: dict[int, str] = {
    0: "ok", 1: "unknown error", 2: "illegal options", 3: "permission denied",
    4: "failed to mount", 5: "loader talk socket", 6: "FUSE loop", 7: "load library",
    8: "incompatible library version", 9: "cache directory", 10: "peers", 11: "NFS maps",
    12: "quota", 13: "watchdog", 14: "talk socket", 15: "signature", 16: "file catalog",
    17: "maintenance mode", 18: "save state", 19: "restore state", 20: "already mounted",
    22: "history", 23: "proxy auto-discovery", 24: "workspace already locked",
    25: "revision blacklisted",
}
# Exit 16 is what a repository that does not exist (or cannot be reached) produces.
NO_SUCH_REPOSITORY = 16
NO_SUCH_SNAPSHOT = 22  # history: no such tag or date
STDERR_TAIL = 2048


class MountError(Exception):
    """A repository could not be mounted. `errno` is what the looking-up process gets."""

    errno: int = errno.EIO

    def __init__(self, message: str, *, exit_code: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.stderr_tail = stderr[-STDERR_TAIL:]

    def replay(self) -> MountError:
        """A fresh exception with the same facts, and no traceback. Raising the stored one again
        would hang each raise's traceback onto it: a lookup loop on a failed name grows it
        without bound. Stored as it was caught, its traceback would keep the failed boot's
        frames and all they refer to alive for as long as the name is remembered (up to
        max_names of them: under 60 s of ever new failing names, peak RSS 93.6 MiB against 72.0
        without the tracebacks, bench/results/attack-60s/)."""
        fresh = type(self).__new__(type(self))
        fresh.__dict__.update(self.__dict__)
        fresh.args = self.args
        return fresh

    def as_dict(self) -> dict[str, object]:
        return {"message": self.message, "exit_code": self.exit_code,
                "meaning": EXIT_MEANINGS.get(self.exit_code or -1), "stderr": self.stderr_tail,
                "errno": errno.errorcode.get(self.errno, str(self.errno))}


class BootFailed(MountError):
    """cvmfs2 exited non-zero (or died by a signal, exit_code None)."""

    def __init__(self, exit_code: int | None, stderr: str, signal: int | None = None) -> None:
        if exit_code is None:
            message = f"cvmfs2 killed by signal {signal}"
        else:
            message = f"cvmfs2 exited {exit_code} ({EXIT_MEANINGS.get(exit_code, 'unknown')})"
        last = stderr.strip().splitlines()[-1:] if stderr.strip() else []
        if last:
            message += f": {last[0]}"
        super().__init__(message, exit_code=exit_code, stderr=stderr)
        if exit_code in (NO_SUCH_REPOSITORY, NO_SUCH_SNAPSHOT):
            self.errno = errno.ENOENT


class BootTimeout(MountError):
    def __init__(self, seconds: float, stderr: str) -> None:
        super().__init__(f"cvmfs2 did not finish booting within {seconds:g} s; killed",
                         stderr=stderr)


class AttachFailed(MountError):
    pass


class LimitReached(MountError):
    """Mount slots are used up: all of them, or the requester's share, or the pinned instances
    one repository may have."""

    errno = errno.ENOSPC


class TooManyFailures(MountError):
    """The requester's boots failed too often lately: its lookups that would boot fail at once
    until its budget refills (requester_failed_boots)."""

    errno = errno.EAGAIN


class WalkAgain(MountError):
    """The kernel is being told to forget the name: the walk is to start again (ESTALE)."""

    errno = errno.ESTALE


class BackendDied(MountError):
    """The serving process of a mounted repository exited."""


class ShuttingDown(MountError):
    errno = errno.ENOENT

    def __init__(self) -> None:
        super().__init__("cvmfsd is shutting down")
