"""Answering a repository's FUSE connection after its cvmfs2 is gone.

Repositories are mounted in cvmfs2's pre-mounted mode (docs/cvmfs2-interface.md §3): the daemon
opens /dev/fuse and mounts it, cvmfs2 serves that descriptor, and the daemon keeps a copy. When
cvmfs2 exits (a failed boot, a crash, a TERM), the connection therefore stays open instead of
aborting, and requests that processes already made wait in it instead of failing with ENOTCONN.
Once the dead mount is out of the way, the daemon answers them from its copy: with the name's
error after a failed boot (the process may have spent its one ESTALE retry already), or with
ESTALE once a new mount is in place after a crash, so that the VFS walks the path again once
(LOOKUP_REVAL) and lands on the new mount (docs/DESIGN.md §2).

The raw protocol needed for that is tiny: read a request, write a header with an errno. Where
the kernel has FUSE_NOTIFY_RESEND (6.9), even the requests the dead server had read already are
queued again and answered; on older kernels those fail when the connection ends.
FUSE_INIT gets a minimal success reply when cvmfs2 died before reading it, or the waiting
processes would be refused with ECONNREFUSED. Only ever used on a connection whose server is
known to be gone: two readers would split the requests between them.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import structlog
import trio

from . import kernel

log = structlog.get_logger("cvmfsd.fusedev")

# include/uapi/linux/fuse.h
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")       # len, error (negative errno), unique
INIT_IN = struct.Struct("<IIII")         # major, minor, max_readahead, flags
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
# time_gran, max_pages, map_alignment, flags2; padded to the 64 bytes of struct fuse_init_out.
INIT_OUT = struct.Struct("<IIIIHHIIHHI")
INIT_OUT_SIZE = 64
FUSE_KERNEL_VERSION = 7
FUSE_FORGET, FUSE_INIT, FUSE_INTERRUPT, FUSE_BATCH_FORGET = 2, 26, 36, 42
FUSE_NOTIFY_RESEND = 7
# Closing what was open on the dead mount has nothing left to do: success, so that close()
# does not report an error for it.
CLOSING = frozenset({18, 20, 25, 29, 30})  # RELEASE, FSYNC, FLUSH, RELEASEDIR, FSYNCDIR
NO_REPLY = frozenset({FUSE_FORGET, FUSE_INTERRUPT, FUSE_BATCH_FORGET})
# A read must offer room for the largest request the connection allows (the header plus
# max_write, which the dead server negotiated: at most 256 pages), or it fails with EINVAL.
READ_SIZE = (1 << 20) + 4096


def _reply(fd: int, unique: int, error: int, payload: bytes = b"") -> None:
    try:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload)
    except OSError as exc:
        # ENOENT: the request was interrupted meanwhile; ENODEV: the connection went away.
        if exc.errno not in (errno.ENOENT, errno.ENODEV):
            raise


def answer(fd: int, request: bytes, error: int = errno.ESTALE) -> int | None:
    """Answer one raw request; returns its opcode (None for a short read)."""
    if len(request) < IN_HEADER.size:
        return None
    _, opcode, unique, *_ = IN_HEADER.unpack_from(request)
    if opcode in NO_REPLY:
        return opcode
    if opcode == FUSE_INIT:
        _major, minor, readahead, _flags = INIT_IN.unpack_from(request, IN_HEADER.size)
        init = INIT_OUT.pack(FUSE_KERNEL_VERSION, minor, readahead, 0, 0, 0, 4096, 1, 0, 0, 0)
        _reply(fd, unique, 0, init.ljust(INIT_OUT_SIZE, b"\0"))
    else:
        _reply(fd, unique, 0 if opcode in CLOSING else error)
    return opcode


def resend(fd: int) -> bool:
    """Ask the kernel to queue again the requests the dead server had read but not answered
    (FUSE_NOTIFY_RESEND, Linux 6.9, meant for a server that fails over on a kept descriptor),
    so that they can be answered too instead of failing when the connection ends. False where
    the kernel has no such notification."""
    try:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
    except OSError:
        return False
    return True


async def answer_all(fd: int, error: int, *, idle: float, name: str) -> int:
    """Answer every waiting request with `error` until the connection is gone or nothing
    arrived for `idle` seconds. Returns how many requests were answered. The caller then
    aborts the connection (abort()) and closes fd: a request the dead server had read already
    can never be answered, and fails only once the connection ends."""
    os.set_blocking(fd, False)
    resend(fd)
    answered = 0
    while True:
        with trio.move_on_after(idle) as quiet:
            await trio.lowlevel.wait_readable(fd)
        if quiet.cancelled_caught:
            break
        try:
            request = os.read(fd, READ_SIZE)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                log.warning("drain_failed", repo=name, error=str(exc))
            break
        opcode = answer(fd, request, error)
        if opcode is not None and opcode not in NO_REPLY:
            answered += 1
    if answered:
        log.info("drained", repo=name, answered=answered,
                 error=errno.errorcode.get(error, str(error)))
    return answered


def mount_control(directory: Path) -> Path | None:
    """Mount the FUSE control filesystem (a single instance: the same connections everywhere)
    at a private directory of the daemon's, for abort(). None where the kernel has none.
    Blocking."""
    directory.mkdir(mode=0o700, exist_ok=True)
    try:
        kernel.mount("fusectl", directory, "fusectl", kernel.MS_NOSUID | kernel.MS_NODEV)
    except OSError as exc:
        log.info("fusectl_unavailable", error=str(exc))
        return None
    return directory


def abort(control: Path | None, dev: tuple[int, int] | None) -> bool:
    """End a connection of the daemon's own mounts at once: everything still waiting in it,
    including requests its dead server had read, fails instead of waiting for the last holder
    of its descriptor (cvmfs2's cache manager inherits one) to exit. Blocking (sysfs)."""
    if control is None or dev is None or dev[0] != 0:
        return False
    try:
        (control / str(dev[1]) / "abort").write_text("1")
    except OSError:
        return False  # gone already
    return True


__all__ = ["abort", "answer", "answer_all", "mount_control", "resend"]
