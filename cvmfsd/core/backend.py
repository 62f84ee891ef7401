"""How the daemon drives the CernVM-FS client, per cvmfs2-interface.md and nothing more."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from ..config import Config
from . import kernel
from .children import Children
from .errors import BootFailed, BootTimeout, MountError
from .names import Pin, check_syntax

# What the system mount helper passes (interface §1), minus what belongs to a mountpoint of
# cvmfs2's own: the daemon mounts /dev/fuse itself and hands cvmfs2 the descriptor (pre-mounted
# mode, §3), so `grab_mountpoint` does not apply. libfuse=3: only the fuse3 library supports
# /dev/fd/N.
BASE_OPTIONS = ("fsname=cvmfs2", "system_mount", "allow_other", "libfuse=3")
TALK_LIMIT = 512
ETC = Path("/etc/cvmfs")
# The kernel options of the daemon's own mount call; cvmfs2's options no longer reach the
# kernel in this mode, so the daemon sets what cvmfs2 would have (read-only, nodev, nosuid).
MOUNT_FLAGS = kernel.MS_RDONLY | kernel.MS_NODEV | kernel.MS_NOSUID
MOUNT_DATA = "fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"


@dataclass(frozen=True)
class Credentials:
    """Who cvmfs2 runs as: it talks HTTP to the outside and parses what comes back, so it drops
    root the way the system mount helper makes it (`uid=`/`gid=` of CVMFS_USER)."""

    user: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, user: str) -> Credentials | None:
        """None when the user does not exist (cvmfs2 then keeps root)."""
        import pwd

        if not user:
            return None
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return None
        return cls(user, entry.pw_uid, entry.pw_gid)


def argv(cfg: Config, fqrn: str, fuse_fd: int, pin_config: Path | None = None,
         etc: Path = ETC, credentials: Credentials | None = None) -> list[str]:
    """The exact command line. fqrn must already be validated; this re-checks, since a name that
    reached here unchecked could otherwise become an option ('-o') or split one (',')."""
    check_syntax(fqrn)
    options = list(BASE_OPTIONS)
    if credentials is not None:
        options += [f"uid={credentials.uid}", f"gid={credentials.gid}"]
    files = list(cfg.cvmfs2_config)
    if pin_config is not None:
        # `config=` replaces the node's hierarchy, so a pinned instance lists it explicitly.
        files = (files or hierarchy_files(etc, fqrn)) + [pin_config]
    if files:
        if any(c in str(f) for f in files for c in ":,"):
            raise ValueError("a cvmfs config path contains ':' or ','")
        options.append("config=" + ":".join(str(p) for p in files))
    return [str(cfg.cvmfs2), "-o", ",".join(options), fqrn, f"/dev/fd/{fuse_fd}"]


def premount(target: Path) -> tuple[int, tuple[int, int]]:
    """Open /dev/fuse and mount it at target for cvmfs2 to serve. Returns the descriptor (the
    daemon keeps it: see fusedev) and the mount's device. Blocking; the mount is visible at
    once, and requests wait in the kernel until cvmfs2 answers them."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        kernel.mount("cvmfs2", target, "fuse", MOUNT_FLAGS, MOUNT_DATA.format(fd=fd))
    except OSError:
        os.close(fd)
        raise
    return fd, kernel.mount_dev(target)


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


def write_pin_config(cfg: Config, name: str, pin: Pin,
                     credentials: Credentials | None = None) -> Path:
    """A pinned instance's own parameters: the pin, and a workspace (cache base, reload
    sockets) of its own, since two instances of a repository cannot share one (interface §8).
    One per instance, not per name: the last instance of a name may still be exiting (and its
    workspace being removed) when the next one boots. cvmfs2 creates neither directory itself,
    and writes both as the user it runs as. Blocking. Values are validated names and pins:
    nothing here needs shell quoting. Returns the file, which remove_pin_workspace takes."""
    base = pin_workspace(cfg, name) / os.urandom(6).hex()
    base.mkdir(mode=0o755, parents=True)
    for sub in ("cache", "reload"):
        (base / sub).mkdir(mode=0o700)
        if credentials is not None:
            os.chown(base / sub, credentials.uid, credentials.gid)
    path = base / PIN_CONFIG
    path.write_text(f"{pin.parameter}={pin.value}\nCVMFS_CACHE_BASE={base / 'cache'}\n"
                    f"CVMFS_RELOAD_SOCKETS={base / 'reload'}\n")
    return path


PIN_CONFIG = "pin.conf"


def pin_workspace(cfg: Config, name: str) -> Path:
    # A hash of the name: paths free of ':' and ',' (they end up in `-o config=`).
    return cfg.snapshot_dir / hashlib.sha1(name.encode()).hexdigest()[:16]


def pin_config_of(cfg: Config, argv: list[str]) -> Path | None:
    """The pin file in a running cvmfs2's command line (an instance booted by a previous
    daemon), if it is one of ours."""
    for arg in argv:
        for option in arg.split(","):
            if option.startswith("config="):
                for file in map(Path, option[len("config="):].split(":")):
                    if file.name == PIN_CONFIG and file.is_relative_to(cfg.snapshot_dir):
                        return file
    return None


def remove_pin_workspace(cfg: Config, pin_config: Path) -> None:
    """Blocking. Only ever a directory of the daemon's own under snapshot_dir: the instance's
    workspace, then its name's directory once no other instance has one there."""
    workspace = pin_config.parent
    if pin_config.name != PIN_CONFIG or workspace == cfg.snapshot_dir or ".." in workspace.parts \
            or not workspace.is_relative_to(cfg.snapshot_dir):
        raise ValueError(f"not a pinned instance's workspace: {workspace}")
    shutil.rmtree(workspace, ignore_errors=True)
    if workspace.parent != cfg.snapshot_dir:
        with contextlib.suppress(OSError):  # another instance of the name is running
            workspace.parent.rmdir()


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


@dataclass(frozen=True)
class Launch:
    """A cvmfs2 launcher that start() began: finish() collects it (always, exactly once)."""

    pid: int
    started: float
    out: int  # the launcher's stdout and stderr: anonymous memory files, closed by finish()
    err: int


def start(cfg: Config, children: Children, fqrn: str, fuse_fd: int,
          pin_config: Path | None = None, credentials: Credentials | None = None,
          record: bool = True) -> Launch:
    """Start the cvmfs2 launcher on a pre-mounted descriptor. Synchronous, callable from any
    thread (the mounter starts cvmfs2 from the LOOKUP's handler when it can: the boot is what
    the caller waits for, so it goes first). record=False: the caller records the launch for a
    successor (children.record) itself, from a worker thread.

    Output goes to anonymous memory files, not pipes: the daemonized grandchild must not be able
    to keep a pipe open and stall us."""
    out = os.memfd_create("cvmfs2-stdout", os.MFD_CLOEXEC)
    err = os.memfd_create("cvmfs2-stderr", os.MFD_CLOEXEC)
    try:
        started = time.monotonic()
        pid = children.spawn(argv(cfg, fqrn, fuse_fd, pin_config, credentials=credentials),
                             stdout=out, stderr=err, pass_fds=(fuse_fd,), record=record)
    except OSError as exc:  # e.g. the client was uninstalled since the daemon started
        os.close(out)
        os.close(err)
        raise MountError(f"cannot start {cfg.cvmfs2}: {exc.strerror}") from exc
    except BaseException:
        os.close(out)
        os.close(err)
        raise
    return Launch(pid, started, out, err)


async def finish(cfg: Config, children: Children, launch: Launch) -> Booted:
    """Wait for a launcher start() began; return once it exited 0, i.e. the root catalog was
    verified and the serving process reads the connection. A boot past mount_timeout, or
    cancelled, is killed with its session."""
    pid = launch.pid
    try:
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
            raise BootTimeout(cfg.mount_timeout, _read_all(launch.err))
        stderr = _read_all(launch.err)
        if status != 0:
            raise BootFailed(status if status > 0 else None, stderr,
                             signal=-status if status < 0 else None)
        return Booted(pid, time.monotonic() - launch.started, _read_all(launch.out) + stderr)
    finally:
        os.close(launch.out)
        os.close(launch.err)


async def boot(cfg: Config, children: Children, fqrn: str, fuse_fd: int,
               pin_config: Path | None = None,
               credentials: Credentials | None = None) -> Booted:
    """start() and finish(): run the cvmfs2 launcher on a pre-mounted descriptor."""
    launch = start(cfg, children, fqrn, fuse_fd, pin_config, credentials)
    return await finish(cfg, children, launch)


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


__all__ = [
    "Booted",
    "Credentials",
    "Launch",
    "MountError",
    "argv",
    "boot",
    "finish",
    "pin_config_of",
    "premount",
    "remove_pin_workspace",
    "serving_pid",
    "start",
    "talk",
    "write_pin_config",
]
