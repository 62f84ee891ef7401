#!/usr/bin/env python3
"""cvmfs2 stand-in: the CernVM-FS client contract of docs/cvmfs2-interface.md.

Usage: ``cvmfs2 [-f] [-d] [-o opt,...] <fqrn> <mountpoint>``.  Serves a
repository read-only over real FUSE from a local "stratum 1" directory (see
README.md next to this file for the layout and the fault knobs).
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The helper modules live next to this script; nothing from the project.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import contextlib

from _options import (
    ConfigRepoRequiredError,
    Options,
    canonical_path,
    string_to_uint,
)

VERSION = "2.12.0"

FAILURE_TEXT = {
    0: "OK",
    1: "unknown error",
    2: "illegal options",
    3: "permission denied",
    4: "failed to mount",
    5: "unable to init loader talk socket",
    6: "cannot run FUSE event loop",
    7: "failed to load shared library",
    8: "incompatible library version",
    9: "cache directory/plugin problem",
    10: "peering problem",
    11: "NFS maps init failure",
    12: "quota init failure",
    13: "watchdog failure",
    14: "talk socket failure",
    15: "signature verification failure",
    16: "file catalog failure",
    17: "maintenance mode",
    18: "state saving failure",
    19: "state restore failure",
    20: "already mounted",
    21: "double mount",
    22: "history init failure",
    23: "proxy auto-discovery failed",
    24: "workspace already locked",
    25: "revision blacklisted",
}

# Messages for CVMFS_STANDIN_FAIL=<n>: what the real client typically says.
KNOB_MESSAGES = {
    2: "Failure: invalid cache settings",
    3: "Failed to drop credentials",
    4: "failed to mount file system",
    5: "Failed to initialize loader socket",
    7: "failed to load cvmfs library",
    9: "Failed to setup posix cache",
    12: "Failed to initialize lru cache",
    13: "failed to initialize watchdog.",
    14: "failed to initialize talk socket (13)",
    15: "failed to load public key(s)",
    16: "Failed to initialize root file catalog",
    20: "repository already mounted",
    22: "failed to open history database",
    23: "failed to discover HTTP proxy servers",
    24: "workspace already locked",
    25: "repository revision blacklisted",
}

IGNORED_OPTIONS = {"_netdev", "user", "nouser", "users", "auto", "noauto"}
DEFAULT_CACHE_BASE = "/var/lib/cvmfs"
DEFAULT_RELOAD_SOCKETS = "/var/run/cvmfs"


def out(text: str, end: str = "\n") -> None:
    # Flushed at once: the launcher forks, and a supervisor waits for lines.
    sys.stdout.write(text + end)
    sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def code_text(code: int) -> str:
    return FAILURE_TEXT.get(code, "no text")


def usage(exe: str) -> None:
    out(
        "The CernVM File System (stand-in)\n"
        f"Version {VERSION}\n\n"
        f"Usage: {exe} [-h] [-V] [-s] [-f] [-d] [-k] [-o mount options] "
        "<repository name> <mount point>\n\n"
        "  -o config=FILES      colon-separated list of config files\n"
        "  -o uid=UID, gid=GID  credentials to run with\n"
        "  -o parse             print the effective parameters\n"
        "  -o foreground / -f   do not daemonize\n"
        "  -o libfuse=[2,3]     libfuse version\n"
        "Other -o options go to libfuse (fsname=..., allow_other, ...)."
    )


class BootFailure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DoubleMount(Exception):
    pass


@dataclass
class CmdLine:
    exe: str
    fqrn: str = ""
    mountpoint: str = ""
    premounted_fd: int | None = None
    config: str | None = None
    uid: int = 0
    gid: int = 0
    system_mount: bool = False
    grab_mountpoint: bool = False
    suid: bool = False
    disable_watchdog: bool = False
    simple_options_parsing: bool = False
    foreground: bool = False
    fuse_debug: bool = False
    debug: bool = False
    parse_only: bool = False
    single_threaded: bool = False
    libfuse: str | None = None
    fuse_opts: list[str] = field(default_factory=list)
    extra_positionals: list[str] = field(default_factory=list)


def _premounted_fd(mountpoint: str) -> int | None:
    prefix = "/dev/fd/"
    rest = mountpoint[len(prefix) :]
    if mountpoint.startswith(prefix) and rest.isdigit():
        return int(rest)
    return None


def _apply_option(cmd: CmdLine, opt: str) -> bool:
    """Record one ``-o`` item; False if it is malformed."""
    name, sep, value = opt.partition("=")
    try:
        if sep and name == "config":
            cmd.config = value
        elif sep and name == "uid":
            cmd.uid = int(value)
        elif sep and name == "gid":
            cmd.gid = int(value)
        elif sep and name == "libfuse":
            cmd.libfuse = value
        elif opt == "system_mount":
            cmd.system_mount = True
        elif opt == "grab_mountpoint":
            cmd.grab_mountpoint = True
        elif opt == "cvmfs_suid":
            cmd.suid = True
        elif opt == "disable_watchdog":
            cmd.disable_watchdog = True
        elif opt == "simple_options_parsing":
            cmd.simple_options_parsing = True
        elif opt == "foreground":
            cmd.foreground = True
        elif opt == "fuse_debug":
            cmd.fuse_debug = True
        elif opt == "debug":
            cmd.debug = True
        elif opt == "parse":
            cmd.parse_only = True
        elif opt in IGNORED_OPTIONS:
            pass
        else:
            cmd.fuse_opts.append(opt)
    except ValueError:
        return False
    return True


def parse_cmdline(argv: list[str]) -> CmdLine | int:
    """The command line, or an exit status when parsing ends the program."""
    cmd = CmdLine(exe="cvmfs2")
    positionals: list[str] = []
    ok = True
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-V", "--version"):
            out(f"CernVM-FS version {VERSION}\n")
            return 0
        if arg in ("-h", "--help"):
            usage(cmd.exe)
            return 0
        if arg == "-f":
            cmd.foreground = True
        elif arg == "-d":
            cmd.fuse_debug = cmd.debug = True
        elif arg == "-s":
            cmd.single_threaded = True
        elif arg == "-k":
            cmd.parse_only = True
        elif arg.startswith("-o"):
            optstr = arg[2:] if len(arg) > 2 else next(args, None)
            if optstr is None:
                ok = False
                continue
            for opt in optstr.split(","):
                if opt and not _apply_option(cmd, opt):
                    ok = False
        elif arg.startswith("-") and arg != "-":
            ok = False
        else:
            positionals.append(arg)
            if len(positionals) == 2:
                cmd.premounted_fd = _premounted_fd(arg)
                if cmd.premounted_fd is not None:
                    out(f"CernVM-FS: pre-mounted on file descriptor {cmd.premounted_fd}")
    if not ok or len(positionals) < 2:
        usage(cmd.exe)
        return 2
    # The loader takes the first two; a third goes on to libfuse, which refuses it when the
    # FUSE session is made, after the boot (measured with 2.12.0: exit 4).
    cmd.fqrn, cmd.mountpoint = positionals[:2]
    cmd.extra_positionals = positionals[2:]
    if cmd.libfuse is not None and cmd.libfuse not in ("2", "3"):
        err(f"Error: invalid libfuse version '{cmd.libfuse}', valid values are 2 or 3.")
        return 1
    return cmd


# -- sockets, files ----------------------------------------------------------------


def make_socket(path: str, mode: int) -> socket.socket:
    """Listening AF_UNIX socket at *path* (a stale one is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dirfd = None
    try:
        address = path
        if len(os.fsencode(path)) >= 100:
            # sun_path is short; reach the directory through a descriptor.
            dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
            address = f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            os.unlink(path)
            sock.bind(address)
        os.chmod(path, mode)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    finally:
        if dirfd is not None:
            os.close(dirfd)
    return sock


def set_nofile(limit: int) -> bool:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        hard = limit
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    except (OSError, ValueError):
        return False
    return True


def fuse_fds() -> set[int]:
    found: set[int] = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.add(int(name))
        except OSError:
            pass
    return found


def daemonize(keep: set[int], die: bool = False) -> None:
    """Double fork + setsid, stdio to /dev/null, every other inherited fd closed. die: the
    process that would serve aborts instead, before the launcher exits (a PANIC at start)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        # The launcher: reap the intermediate child, then report success.
        os.waitpid(pid, 0)
        os._exit(0)
    if die:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.abort()
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


# -- credentials -------------------------------------------------------------------

_dropped: list[tuple[int, int]] = []


@contextlib.contextmanager
def credentials(cmd: CmdLine) -> Iterator[None]:
    """Act as uid:gid (effective ids only) for what the real client does after it dropped its
    privileges: files it makes belong to that user, and directories that user cannot write to
    fail as they do for cvmfs2 (a missing or root-owned reload directory: exit 5; a cache base
    or workspace it cannot write: exit 9). The serving process itself stays root (README)."""
    if not (cmd.uid or cmd.gid) or os.geteuid() != 0:
        yield
        return
    groups = os.getgroups()
    os.setgroups([cmd.gid])
    os.setegid(cmd.gid)
    os.seteuid(cmd.uid)
    _dropped.append((cmd.uid, cmd.gid))
    try:
        yield
    finally:
        _dropped.pop()
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


@contextlib.contextmanager
def credentials_restored() -> Iterator[None]:
    """Root again for a moment, inside credentials()."""
    if not _dropped:
        yield
        return
    uid, gid = _dropped[-1]
    groups = os.getgroups()
    os.seteuid(0)
    os.setegid(0)
    try:
        yield
    finally:
        os.setgroups(groups)
        os.setegid(gid)
        os.seteuid(uid)


# -- boot --------------------------------------------------------------------------


@dataclass
class Booted:
    workspace: str
    cache_dir: str
    quota_limit_mb: int
    lock_fd: int
    running_path: str
    proxy_groups: list[list[str]]
    repository: object
    selection: object
    talk_sock: socket.socket
    talk_path: str


def _workspace(opts: Options, fqrn: str) -> tuple[str, str]:
    """(workspace, cache directory) as FileSystem::SetupWorkspace decides them."""
    if opts.is_defined("CVMFS_CACHE_DIR") and opts.is_defined("CVMFS_CACHE_BASE"):
        raise BootFailure(2, "'CVMFS_CACHE_BASE' and 'CVMFS_CACHE_DIR' are mutually exclusive")
    base = canonical_path(opts.get("CVMFS_CACHE_BASE") or DEFAULT_CACHE_BASE)
    cache_dir = base + ("/shared" if opts.is_on("CVMFS_SHARED_CACHE") else f"/{fqrn}")
    cache_dir = opts.get("CVMFS_CACHE_DIR") or cache_dir
    workspace = opts.get("CVMFS_WORKSPACE") or cache_dir
    cache_dir = opts.get("CVMFS_ALIEN_CACHE") or cache_dir
    return workspace, cache_dir


def _lock_workspace(workspace: str, fqrn: str, mountpoint: str) -> int:
    path = f"{workspace}/lock.{fqrn}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise BootFailure(9, f"could not acquire workspace lock ({exc.errno})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass
    # Held by another instance: refuse a double mount, otherwise wait for the
    # holder (e.g. an instance still shutting down), like InitSystemFs.
    try:
        mounted = os.getxattr(mountpoint, "user.fqrn").decode()
    except OSError:
        mounted = None
    if mounted == fqrn:
        raise DoubleMount()
    if mounted is not None:
        raise BootFailure(20, f"CernVM-FS repository {mounted} already mounted on {mountpoint}")
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _cached_selection(checksum: str, opts: Options) -> object | None:
    """The revision a previous mount recorded in the cache (cvmfschecksum.<fqrn>), for a live
    mount only: a pinned one needs the server's history."""
    import _layout
    from _repo import Selection

    if _pinned(opts):
        return None
    try:
        with open(checksum) as f:
            revision, root_hash, repo_dir = f.read().strip().split(" ", 2)
        if not _layout.revision_dir(Path(repo_dir), int(revision)).is_dir():
            return None
    except (OSError, ValueError):
        return None
    return Selection(Path(repo_dir), int(revision), root_hash, 0, "", False)


def _pinned(opts: Options) -> bool:
    return any(opts.is_defined(p) for p in ("CVMFS_ROOT_HASH", "CVMFS_REPOSITORY_TAG",
                                             "CVMFS_REPOSITORY_DATE"))


def _proxy_groups(opts: Options) -> list[list[str]]:
    groups = []
    for group in (opts.get("CVMFS_HTTP_PROXY") or "").split(";"):
        # "auto" means WPAD, which finds nothing on this network.
        members = [m.strip() for m in group.split("|") if m.strip() and m.strip() != "auto"]
        if members:
            groups.append(members)
    return groups


def _fault_knobs(opts: Options) -> None:
    delay = opts.get("CVMFS_STANDIN_BOOT_DELAY")
    if delay:
        time.sleep(max(0.0, float(delay)))
    gate = opts.get("CVMFS_STANDIN_BOOT_GATE")
    if gate:
        # A boot that lasts exactly until the test says so: tests wait for events, not time.
        while not os.path.exists(gate):
            time.sleep(0.01)
    fail = string_to_uint(opts.get("CVMFS_STANDIN_FAIL"))
    if fail:
        raise BootFailure(fail, KNOB_MESSAGES.get(fail, code_text(fail)))
    if opts.is_on("CVMFS_STANDIN_HANG"):
        while True:
            time.sleep(3600)


def _dies_at_start(opts: Options) -> bool:
    """CVMFS_STANDIN_DIE_AT_START=<path>: once per creation of <path> (it is removed)."""
    marker = opts.get("CVMFS_STANDIN_DIE_AT_START")
    if not marker:
        return False
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return False
    return True


def boot(cmd: CmdLine, opts: Options) -> Booted:
    """What the real client's fuse module does in its Init (before "done"). The workspace and
    cache files are made with the credentials cvmfs2 dropped to."""
    # Imported while still root: the dropped user may not be able to read the interpreter's
    # library (e.g. below /root).
    import _layout  # noqa: F401
    import _repo  # noqa: F401

    with credentials(cmd):
        return _boot(cmd, opts)


def _boot(cmd: CmdLine, opts: Options) -> Booted:
    from _repo import CatalogError, HistoryError, Repository, host_chain

    workspace, cache_dir = _workspace(opts, cmd.fqrn)
    try:
        os.makedirs(workspace, mode=0o770, exist_ok=True)
    except OSError:
        raise BootFailure(9, f"cannot create workspace directory {workspace}") from None
    lock_fd = _lock_workspace(workspace, cmd.fqrn, cmd.mountpoint)
    try:
        os.chdir(workspace)
    except OSError:
        raise BootFailure(9, f"workspace {workspace} is unavailable") from None
    running_path = f"{workspace}/running.{cmd.fqrn}"
    try:
        os.close(os.open(running_path, os.O_RDONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        raise BootFailure(9, f"could not open running sentinel ({exc.errno})") from None

    quota_raw = opts.get("CVMFS_QUOTA_LIMIT")
    quota_limit_mb = int(quota_raw) if quota_raw and quota_raw.lstrip("-").isdigit() else 1024
    if opts.is_defined("CVMFS_ALIEN_CACHE"):
        if opts.is_on("CVMFS_SHARED_CACHE"):
            raise BootFailure(
                2,
                "Failure: shared local disk cache and alien cache mutually exclusive. "
                "Please turn off shared local disk cache.",
            )
        if quota_limit_mb > 0:
            raise BootFailure(
                2,
                "Failure: quota management and alien cache mutually exclusive. "
                "Please turn off quota limit.",
            )
    try:
        os.makedirs(cache_dir, mode=0o770, exist_ok=True)
        os.close(os.open(f"{cache_dir}/.cvmfscache", os.O_RDONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        raise BootFailure(
            9, f"Failed to setup posix cache 'default' in {cache_dir}: {os.strerror(exc.errno)}"
        ) from None

    _fault_knobs(opts)

    proxy_groups = _proxy_groups(opts)
    if not proxy_groups:
        raise BootFailure(23, "failed to discover HTTP proxy servers")

    repository = Repository(cmd.fqrn, host_chain(opts, cmd.fqrn))
    checksum = f"{cache_dir}/cvmfschecksum.{cmd.fqrn}"
    try:
        # The "server" is a local directory standing in for the network: read as root, as
        # cvmfs2's HTTP requests do not depend on its credentials.
        with credentials_restored():
            selection = repository.select(opts)
    except CatalogError as exc:
        # No server answers: like cvmfs, mount the revision last seen, if the cache has it.
        selection = _cached_selection(checksum, opts)
        if selection is None:
            raise BootFailure(16, str(exc)) from None
    except HistoryError as exc:
        raise BootFailure(22, str(exc)) from None
    if not _pinned(opts):
        with contextlib.suppress(OSError), open(checksum, "w") as f:
            f.write(f"{selection.revision} {selection.root_hash} {selection.repo_dir}\n")

    talk_path = opts.get("CVMFS_TALK_SOCKET") or f"{workspace}/cvmfs_io.{cmd.fqrn}"
    try:
        talk_sock = make_socket(talk_path, 0o660)
    except OSError as exc:
        raise BootFailure(14, f"failed to initialize talk socket ({exc.errno})") from None
    talk_path = os.path.abspath(talk_path)

    return Booted(
        workspace=workspace,
        cache_dir=cache_dir,
        quota_limit_mb=quota_limit_mb,
        lock_fd=lock_fd,
        running_path=running_path,
        proxy_groups=proxy_groups,
        repository=repository,
        selection=selection,
        talk_sock=talk_sock,
        talk_path=talk_path,
    )


def _fuse_options(cmd: CmdLine, opts: Options) -> set[str]:
    fuse_opts = set(cmd.fuse_opts)
    fuse_opts.add("rw" if opts.is_on("CVMFS_MOUNT_RW") else "ro")
    fuse_opts.add("nodev")
    if cmd.suid:
        fuse_opts.add("suid")
    if opts.is_on("CVMFS_CHECK_PERMISSIONS"):
        fuse_opts.add("default_permissions")
    if cmd.fuse_debug:
        fuse_opts.add("debug")
    if not any(o.startswith("fsname=") for o in fuse_opts):
        fuse_opts.add("fsname=cvmfs2")
    return fuse_opts


def main(argv: list[str]) -> int:
    boot_time = time.time()
    # No write access for others; the group may use the talk socket (0660).
    os.umask(0o007)
    parsed = parse_cmdline(argv)
    if isinstance(parsed, int):
        return parsed
    cmd = parsed

    opts = Options(
        cmd.fqrn,
        etc=os.environ.get("CVMFS_STANDIN_ETC", "/etc/cvmfs"),
        simple=cmd.simple_options_parsing,
    )
    try:
        if cmd.config is not None:
            for path in cmd.config.split(":"):
                opts.parse_path(path)
        else:
            opts.parse_default()
    except ConfigRepoRequiredError as exc:
        err(f"required configuration repository directory does not exist: {exc}")
        return 1

    if opts.is_on("CVMFS_SUID"):
        cmd.suid = True
    if cmd.suid:
        out("CernVM-FS: running with suid support")
    if cmd.parse_only:
        out("# CernVM-FS parameters:\n" + opts.dump())
        return 0

    premounted = cmd.premounted_fd is not None
    if not premounted and not os.path.isdir(cmd.mountpoint):
        err(f"Mount point {cmd.mountpoint} does not exist")
        return 3

    nfiles = opts.get("CVMFS_NFILES")
    if nfiles is not None and not set_nofile(string_to_uint(nfiles)):
        if cmd.system_mount:
            err("Failed to set maximum number of open files, insufficient permissions")
            return 3
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        out(f"Failed to set requested number of open files, using maximum number {hard}")
        if hard > soft:
            set_nofile(hard)

    # Handing the mountpoint to the user does not apply to /dev/fd/N, and
    # chown through that link would hit /dev/fuse itself.
    if cmd.grab_mountpoint and not premounted:
        try:
            os.chown(cmd.mountpoint, cmd.uid, cmd.gid)
            os.chmod(cmd.mountpoint, 0o755)
        except OSError as exc:
            err(f"Failed to grab mountpoint {cmd.mountpoint} ({exc.errno})")
            return 3

    if cmd.uid or cmd.gid:
        out(f"CernVM-FS: running with credentials {cmd.uid}:{cmd.gid}")
    if cmd.single_threaded:
        out("CernVM-FS: running in single threaded mode")
    if cmd.debug:
        out("CernVM-FS: running in debug mode")

    reload_dir = canonical_path(opts.get("CVMFS_RELOAD_SOCKETS") or DEFAULT_RELOAD_SOCKETS)
    loader_path = f"{reload_dir}/cvmfs.{cmd.fqrn}"
    try:
        # The loader does not create the directory: a missing one is exit 5, like a directory
        # the dropped user cannot write to.
        with credentials(cmd):
            loader_sock = make_socket(loader_path, 0o600)
    except OSError:
        err("Failed to initialize loader socket")
        return 5

    out("CernVM-FS: loading Fuse module... ", end="")
    try:
        booted = boot(cmd, opts)
    except DoubleMount:
        err(f"\nCernVM-FS: repository {cmd.fqrn} already mounted on {cmd.mountpoint}")
        return 0
    except BootFailure as exc:
        err(f"{exc.message} ({exc.code} - {code_text(exc.code)})")
        return exc.code
    out("done")

    import _serve
    import pyfuse3

    kcache = opts.get("CVMFS_KCACHE_TIMEOUT")
    visibility = "rootonly"
    if opts.is_on("CVMFS_HIDE_MAGIC_XATTRS"):
        visibility = "never"
    elif opts.is_off("CVMFS_HIDE_MAGIC_XATTRS"):
        visibility = "always"
    chosen = (opts.get("CVMFS_MAGIC_XATTRS_VISIBILITY") or "").lower()
    if chosen in ("rootonly", "never", "always"):
        visibility = chosen
    crash_after = opts.get("CVMFS_STANDIN_CRASH_AFTER")
    cfg = _serve.Config(
        fqrn=cmd.fqrn,
        mountpoint=cmd.mountpoint,
        premounted=premounted,
        options=opts,
        repository=booted.repository,  # type: ignore[arg-type]
        selection=booted.selection,  # type: ignore[arg-type]
        workspace=booted.workspace,
        cache_dir=booted.cache_dir,
        quota_limit_mb=booted.quota_limit_mb,
        proxy_groups=booted.proxy_groups,
        talk_sock=booted.talk_sock,
        talk_path=booted.talk_path,
        loader_path=loader_path,
        running_path=booted.running_path,
        boot_time=boot_time,
        crash_after=string_to_uint(crash_after) if crash_after else None,
        kcache_timeout=(
            float(max(0, int(kcache)))
            if kcache and kcache.lstrip("-").isdigit()
            else _serve.DEFAULT_KCACHE_TIMEOUT
        ),
        max_ttl=string_to_uint(opts.get("CVMFS_MAX_TTL")) * 60,
        xattr_visibility=visibility,
    )
    server = _serve.Server(cfg)

    if cmd.extra_positionals:
        err(f"fuse: unknown option(s): `{' '.join(cmd.extra_positionals)}'")
        err("failed to create Fuse session")
        return 4
    if not premounted:
        # The dropped user mounts itself: libfuse opens /dev/fuse with its credentials, which
        # fails where the device is root's only (0600, as in many containers).
        with credentials(cmd):
            denied = not os.access("/dev/fuse", os.R_OK | os.W_OK, effective_ids=True)
        if denied:
            err("fuse: failed to open /dev/fuse: Permission denied")
            err("failed to mount file system")
            return 4
    before = fuse_fds()
    try:
        pyfuse3.init(_serve.Operations(server), cmd.mountpoint, _fuse_options(cmd, opts))
    except RuntimeError as exc:
        if "session_new" in str(exc):
            err("failed to create Fuse session")
        else:
            err("failed to mount file system")
        return 4
    if premounted:
        fuse_fd = {cmd.premounted_fd or 0}
    else:
        fuse_fd = fuse_fds() - before
        out(f"CernVM-FS: mounted cvmfs on {cmd.mountpoint}")

    _serve.remember_early_signals()
    if not cmd.foreground:
        daemonize(fuse_fd | {booted.talk_sock.fileno(), loader_sock.fileno(), booted.lock_fd},
                  die=_dies_at_start(opts))
    server.pid = os.getpid()
    return _serve.serve(server)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
