"""Installed as the container's cvmfs2 (behind /usr/bin/cvmfs2): records what a process that
cvmfsd starts may do inside the unit's sandbox, then becomes the cvmfs2 stand-in.

    cvmfs2_probe.py REPORT_DIR <cvmfs2 arguments...>

Writes REPORT_DIR/<pid>.json. Everything cvmfs2 needs beyond what the stand-in itself does:
/dev/fuse through the device policy, the capabilities to drop to the cvmfs user (chown its
workspace, setgroups/setgid/setuid) and to be signalled by root afterwards (CAP_KILL), and a
system call filter that answers EPERM instead of killing. The stand-in does not switch
credentials itself (cvmfs2_standin/README.md), so the drop is tried here, in a child.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

STANDIN = Path(__file__).resolve().parents[2] / "cvmfs2_standin" / "cvmfs2.py"
# A character device outside what DevicePolicy=closed and DeviceAllow=/dev/fuse permit
# (1:11 is /dev/kmsg: always there, and opening it write-only needs no capability).
DENIED_DEVICE = "/dev/cvmfsd-test-kmsg"
DENIED_DEVICE_NUMBERS = (1, 11)
CVMFS_USER = "cvmfs"
SYS_PIDFD_GETFD = 438  # x86_64; in @debug, which the unit denies with EPERM

CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
        "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
        "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
        "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
        "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"]


def cap_names(mask: int) -> list[str]:
    return [name for bit, name in enumerate(CAPS) if mask >> bit & 1]


def _status() -> dict[str, str]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _open(path: str, flags: int) -> str:
    try:
        os.close(os.open(path, flags))
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def _denied_syscall() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    # An invalid pidfd: EBADF if the call reaches the kernel, EPERM if the filter stops it.
    if libc.syscall(SYS_PIDFD_GETFD, -1, 0, 0) == -1:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    return "succeeded"


def _drop_to_user() -> dict[str, Any]:
    """What cvmfs2 does with -o uid=,gid=: a workspace owned by the user, then all of its
    credentials switched for good; root must still be able to signal it (healing, stop)."""
    try:
        user = pwd.getpwnam(CVMFS_USER)
    except KeyError:
        return {"error": f"no user {CVMFS_USER}"}
    result: dict[str, Any] = {"uid": user.pw_uid, "gid": user.pw_gid}
    # Where the user can reach it (the report directory's parents are root's 0700 ones).
    workspace = Path(tempfile.mkdtemp(prefix="cvmfs2-probe-", dir="/var/tmp"))
    try:
        os.chown(workspace, user.pw_uid, user.pw_gid)
        os.chmod(workspace, 0o700)
        result["chown"] = "ok"
    except OSError as exc:
        result["chown"] = errno.errorcode.get(exc.errno or 0, str(exc))
    report_r, report_w = os.pipe()
    hold_r, hold_w = os.pipe()  # the child waits on it: EOF lets it go if root cannot kill it
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        os.close(hold_w)
        child: dict[str, Any] = {}
        try:
            os.setgroups([user.pw_gid])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            child["ids"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid()]
            marker = workspace / "written-by-the-user"
            marker.write_text("x")
            child["file_owner"] = marker.stat().st_uid
            try:
                os.setuid(0)
                child["regained_root"] = True
            except PermissionError:
                child["regained_root"] = False
        except OSError as exc:
            child["error"] = f"{type(exc).__name__}: {exc}"
        os.write(report_w, json.dumps(child).encode())
        os.close(report_w)
        os.read(hold_r, 1)
        os._exit(0)
    os.close(report_w)
    os.close(hold_r)
    with os.fdopen(report_r) as f:
        result.update(json.loads(f.read() or "{}"))
    try:
        os.kill(pid, signal.SIGTERM)  # uid 0 signalling another uid: needs CAP_KILL
        result["kill"] = "ok"
    except OSError as exc:
        result["kill"] = errno.errorcode.get(exc.errno or 0, str(exc))
    os.close(hold_w)
    _, status = os.waitpid(pid, 0)
    result["child_ended_by"] = signal.Signals(os.WTERMSIG(status)).name \
        if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    shutil.rmtree(workspace, ignore_errors=True)
    return result


def probe() -> dict[str, Any]:
    status = _status()
    return {
        "pid": os.getpid(),
        "argv": sys.argv[2:],
        "cap_eff": cap_names(int(status["CapEff"], 16)),
        "cap_bnd": cap_names(int(status["CapBnd"], 16)),
        "no_new_privs": status.get("NoNewPrivs"),
        "seccomp": status.get("Seccomp"),
        "mount_ns": os.readlink("/proc/self/ns/mnt"),
        "cgroup": Path("/proc/self/cgroup").read_text().strip(),
        "fuse": _open("/dev/fuse", os.O_RDWR),
        "denied_device": _open(DENIED_DEVICE, os.O_WRONLY),
        "denied_syscall": _denied_syscall(),
        "drop": _drop_to_user(),
    }


def main() -> None:
    report_dir = Path(sys.argv[1])
    report = probe()
    tmp = report_dir / f".{os.getpid()}.json"
    tmp.write_text(json.dumps(report))
    tmp.rename(report_dir / f"{os.getpid()}.json")
    os.execv(sys.executable, [sys.executable, str(STANDIN), *sys.argv[2:]])


if __name__ == "__main__":
    main()
