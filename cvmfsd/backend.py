"""How the daemon drives the CernVM-FS client, per cvmfs2-interface.md and nothing more."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from .children import Children
from .config import Config
from .errors import BootFailed, BootTimeout, MountError
from .names import Pin, check_syntax

# What the system mount helper and the official service container pass (interface §1);
# libfuse=3 because only the fuse3 library supports the mount-namespace tricks this design needs.
BASE_OPTIONS = ("fsname=cvmfs2", "system_mount", "allow_other", "grab_mountpoint", "libfuse=3")
TALK_LIMIT = 512
ETC = Path("/etc/cvmfs")


def argv(cfg: Config, fqrn: str, mountpoint: Path, pin_config: Path | None = None,
         etc: Path = ETC) -> list[str]:
    """The exact command line. fqrn must already be validated; this re-checks, since a name that
    reached here unchecked could otherwise become an option ('-o') or split one (',')."""
    check_syntax(fqrn)
    options = list(BASE_OPTIONS)
    files = list(cfg.cvmfs2_config)
    if pin_config is not None:
        # `config=` replaces the node's hierarchy, so a pinned instance lists it explicitly.
        files = (files or hierarchy_files(etc, fqrn)) + [pin_config]
    if files:
        if any(c in str(f) for f in files for c in ":,"):
            raise ValueError("a cvmfs config path contains ':' or ','")
        options.append("config=" + ":".join(str(p) for p in files))
    return [str(cfg.cvmfs2), "-o", ",".join(options), fqrn, str(mountpoint)]


def hierarchy_files(etc: Path, fqrn: str) -> list[Path]:
    """The node's configuration files cvmfs2 reads for fqrn without `config=`, in its order
    (interface §4), those that exist. The config repository's copies are not included: they
    are read through the root, which a pinned instance's boot must not depend on."""
    domain = fqrn.partition(".")[2]
    candidates = [etc / "default.conf", *sorted((etc / "default.d").glob("*.conf")),
                  etc / "default.local", etc / "domain.d" / f"{domain}.conf",
                  etc / "domain.d" / f"{domain}.local", etc / "config.d" / f"{fqrn}.conf",
                  etc / "config.d" / f"{fqrn}.local"]
    return [p for p in candidates if p.is_file()]


def write_pin_config(cfg: Config, name: str, pin: Pin) -> Path:
    """A pinned instance's own parameters: the pin, and a workspace (cache base, reload
    sockets) of its own, since two instances of a repository cannot share one (interface §8).
    Blocking. Values are validated names and pins: nothing here needs shell quoting."""
    ident = hashlib.sha1(name.encode()).hexdigest()[:16]  # paths free of ':' and ','
    base = cfg.snapshot_dir / ident
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = base / "pin.conf"
    path.write_text(f"{pin.parameter}={pin.value}\nCVMFS_CACHE_BASE={base / 'cache'}\n"
                    f"CVMFS_RELOAD_SOCKETS={base / 'reload'}\n")
    return path


@dataclass(frozen=True)
class Booted:
    launcher_pid: int
    seconds: float
    output: str


def _read_all(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


async def boot(cfg: Config, children: Children, fqrn: str, mountpoint: Path,
               pin_config: Path | None = None) -> Booted:
    """Run the cvmfs2 launcher; return once it exited 0, i.e. the kernel mount exists.

    Output goes to anonymous memory files, not pipes: the daemonized grandchild must not be able
    to keep a pipe open and stall us. A boot past mount_timeout is killed with its session.
    """
    out = os.memfd_create("cvmfs2-stdout", os.MFD_CLOEXEC)
    err = os.memfd_create("cvmfs2-stderr", os.MFD_CLOEXEC)
    try:
        started = time.monotonic()
        try:
            pid = children.spawn(argv(cfg, fqrn, mountpoint, pin_config), stdout=out, stderr=err)
        except OSError as exc:  # e.g. the client was uninstalled since the daemon started
            raise MountError(f"cannot start {cfg.cvmfs2}: {exc.strerror}") from exc
        try:
            with trio.move_on_after(cfg.mount_timeout) as timeout:
                status = await children.wait(pid)
        finally:
            if children.running(pid):
                # Timed out or cancelled (shutdown): kill the whole boot, then collect it. The
                # wait is bounded because a process stuck in the kernel ignores even SIGKILL.
                children.kill_group(pid)
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await children.wait(pid)
        if timeout.cancelled_caught:
            raise BootTimeout(cfg.mount_timeout, _read_all(err))
        stderr = _read_all(err)
        if status != 0:
            raise BootFailed(status if status > 0 else None, stderr,
                             signal=-status if status < 0 else None)
        return Booted(pid, time.monotonic() - started, _read_all(out) + stderr)
    finally:
        os.close(out)
        os.close(err)


def serving_pid(mountpoint: Path) -> int:
    """Pid of the process serving a cvmfs2 mount (xattr user.pid, interface §6). Blocking."""
    return int(os.getxattr(mountpoint, "user.pid"))


def mounted_fqrn(mountpoint: Path) -> str:
    return os.getxattr(mountpoint, "user.fqrn").decode()


def talk(socket_path: Path, command: str, timeout: float = 5.0) -> str:
    """One command over the cvmfs2 talk socket (interface §5). Blocking: use a worker thread."""
    data = command.encode()
    if len(data) > TALK_LIMIT:
        raise ValueError("talk command longer than 512 bytes")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(socket_path))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").strip()


def cleanup_staging(mountpoint: Path) -> None:
    """Detach whatever a failed or cancelled boot left at its staging path. Blocking."""
    from . import kernel

    while kernel.mounts_at(str(mountpoint)):
        try:
            kernel.umount(mountpoint, kernel.MNT_DETACH)
        except OSError:
            break
    with contextlib.suppress(OSError):
        mountpoint.rmdir()


__all__ = ["Booted", "MountError", "argv", "boot", "cleanup_staging", "serving_pid", "talk"]
