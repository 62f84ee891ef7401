"""Baseline: Debian's autofs with a program map, mounting the backend the way the cvmfs packages do.

- a private master map: ``<dir>/cvmfs program:<dir>/auto.cvmfs --timeout=0``;
- ``auto.cvmfs`` answers ``-fstype=cvmfs :<key>`` for a valid repository name, nothing otherwise
  (the rule of the real auto.cvmfs, cvmfs2-interface.md §7);
- automount then runs ``mount -t cvmfs <fqrn> <dir>/cvmfs/<fqrn>``, and mount(8) runs
  ``/sbin/mount.cvmfs``. util-linux looks for helpers only in /sbin, /sbin/fs.d and /sbin/fs (no
  environment variable or option moves that), so the harness installs a small shim there for the
  duration of the run: only if no mount.cvmfs exists (an existing one is never touched), shared by
  concurrent benchmark runs through a lock and a list of users, and removed by the last one. The
  shim hands over to the helper of the benchmark instance that owns the mount point
  (``<dir>/cvmfs/<fqrn>`` -> ``<dir>/mount.cvmfs``), which runs cvmfs2 the way the real mount.cvmfs
  does: ``cvmfs2 -o <user opts>,system_mount,fsname=cvmfs2,allow_other,grab_mountpoint ...``
  (non-zero exit -> 32).

automount runs in its own session: the kernel lets processes of the automount daemon's process
group walk its directories without triggering mounts, and the harness must trigger them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..common import Unavailable, is_mounted, stop_process
from ..workspace import Workspace
from .base import System

SHIM = Path("/sbin/mount.cvmfs")
MARKER = "cvmfsd-bench temporary mount helper"
STATE = Path("/run/cvmfsd-bench")

SHIM_TEXT = f"""#!/bin/sh
# {MARKER}: installed by bench/systems/autofs.py of cvmfsd for the
# autofs baseline, removed when the last benchmark run using it stops. It hands the mount over to
# the helper of the benchmark instance that owns the mount point: <inst>/cvmfs/<fqrn> is served by
# <inst>/mount.cvmfs.
mp="$2"
inst="${{mp%/*}}"
inst="${{inst%/*}}"
if [ ! -x "$inst/mount.cvmfs" ]; then
  echo "mount.cvmfs (cvmfsd-bench): nothing serves $mp" >&2
  exit 32
fi
exec "$inst/mount.cvmfs" "$@"
"""

# The real auto.cvmfs rule: an alphanumeric first, only [A-Za-z0-9._-], a dot, no trailing dot.
PROGRAM_MAP = """#!/bin/sh
key="$1"
case "$key" in
  [A-Za-z0-9]*.*) ;;
  *) exit 1 ;;
esac
case "$key" in
  *[!A-Za-z0-9._-]*|*.) exit 1 ;;
esac
echo "-fstype=cvmfs :$key"
"""


def _helper_text(cvmfs2: Path, options: str) -> str:
    return f"""#!/bin/sh
# mount.cvmfs for the stand-in: what the real helper does before it runs cvmfs2
# (cvmfs2-interface.md: names section 7, command line section 1, exit 32 section 2).
fqrn="$1"; mp="$2"; shift 2
opts=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o) opts="$2"; shift 2 ;;
    -o*) opts="${{1#-o}}"; shift ;;
    *) shift ;;
  esac
done
case "$fqrn" in
  ""|*[!A-Za-z0-9_.-]*) echo "Invalid repository: $fqrn" >&2; exit 1 ;;
esac
[ ${{#fqrn}} -le 60 ] || {{ echo "Invalid repository: $fqrn" >&2; exit 1; }}
# mount(8) adds rw; cvmfs mounts read-only by itself.
user=""
IFS=,
for o in $opts; do
  case "$o" in rw|ro|defaults|"") ;; *) user="$user$o," ;; esac
done
unset IFS
{shlex.quote(str(cvmfs2))} -o "${{user}}{options}" "$fqrn" "$mp" || exit 32
"""


@contextlib.contextmanager
def _state_lock() -> Iterator[Path]:
    STATE.mkdir(mode=0o700, exist_ok=True)
    (STATE / "users").mkdir(mode=0o700, exist_ok=True)
    fd = os.open(STATE / "helper.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield STATE / "users"
    finally:
        os.close(fd)


def _ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(errors="replace")[:400]
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def install_shim(user: str) -> None:
    """Install /sbin/mount.cvmfs unless one exists; register *user* as one of its users."""
    with _state_lock() as users:
        if SHIM.exists() or SHIM.is_symlink():
            if not _ours(SHIM):
                raise RuntimeError(f"{SHIM} exists and is not the benchmark's shim: not touching "
                                   "it, and not running the autofs baseline with a foreign helper")
        else:
            fd = os.open(SHIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
            with os.fdopen(fd, "w") as f:
                f.write(SHIM_TEXT)
            os.chmod(SHIM, 0o755)
        (users / user).write_text(f"{os.getpid()}\n")


def remove_shim(user: str) -> None:
    """Unregister *user*; the last user (live processes only) removes the shim."""
    with _state_lock() as users:
        with contextlib.suppress(FileNotFoundError):
            (users / user).unlink()
        for entry in users.iterdir():
            with contextlib.suppress(ValueError, OSError):
                if not _pid_alive(int(entry.read_text().split()[0])):
                    entry.unlink()
        if not any(users.iterdir()) and _ours(SHIM):
            SHIM.unlink()


def automount_version() -> str | None:
    exe = shutil.which("automount")
    if exe is None:
        return None
    out = subprocess.run([exe, "-V"], capture_output=True, text=True).stdout
    return next((line.strip() for line in out.splitlines() if "version" in line), None)


class Autofs(System):
    name = "autofs"

    def __init__(self, ws: Workspace, tag: str = "") -> None:
        super().__init__(ws, tag)
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = f"{os.getpid()}-{self.label}-{id(self):x}"
        self.shim_registered = False
        self.log = self.dir / "automount.log"

    @staticmethod
    def available() -> str | None:
        """None when the baseline can run here, else why not."""
        if shutil.which("automount") is None:
            return "automount is not installed (Debian: apt-get install autofs)"
        if not Path("/proc/filesystems").read_text().count("autofs"):
            return "the kernel has no autofs filesystem"
        if (SHIM.exists() or SHIM.is_symlink()) and not _ours(SHIM):
            return f"{SHIM} exists and is not the benchmark's: not touching it"
        return None

    def setup(self, repos: Sequence[str] = ()) -> None:
        why = self.available()
        if why:
            raise Unavailable(why)
        exe = shutil.which("automount")
        assert exe is not None
        self.mount_dir.mkdir(parents=True, exist_ok=True)
        program_map = self.dir / "auto.cvmfs"
        program_map.write_text(PROGRAM_MAP)
        program_map.chmod(0o755)
        helper = self.dir / "mount.cvmfs"
        helper.write_text(_helper_text(self.backend.cvmfs2, self.backend.options()))
        helper.chmod(0o755)
        master = self.dir / "auto.master"
        master.write_text(f"{self.mount_dir} program:{program_map} --timeout=0\n")
        install_shim(self.user)
        self.shim_registered = True
        with open(self.log, "ab") as log:
            # -f: stay in the foreground (we own the pid); -t 0: no expiry while measuring;
            # -C: do not refuse to start because another automount runs (a system one, or a
            # concurrent benchmark): each instance serves only its own private master map.
            self.proc = subprocess.Popen([exe, "-f", "-t", "0", "-C", str(master)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd="/")
        deadline = time.monotonic() + 20
        while not is_mounted(self.mount_dir, "autofs"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"automount exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"automount did not mount {self.mount_dir}")
            time.sleep(0.01)

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def teardown(self) -> list[str]:
        try:
            for repo in self.mounted_repos():
                self.note_serving_pid(repo)
            if self.proc is not None:
                # SIGTERM: automount unmounts what it mounted (those not busy), then its own
                # autofs mount, and exits.
                stop_process(self.proc, signal.SIGTERM, timeout=30)
            return self._finish()
        finally:
            if self.shim_registered:
                remove_shim(self.user)
                self.shim_registered = False

    def info(self) -> dict[str, object]:
        return {"name": self.name, "version": automount_version(),
                "master_map": "<dir>/cvmfs program:<dir>/auto.cvmfs --timeout=0",
                "helper": str(SHIM) + " (temporary shim) -> <dir>/mount.cvmfs -> cvmfs2"}


__all__ = ["Autofs", "automount_version"]
