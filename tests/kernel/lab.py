"""The lab for the mount experiments (kexp): a private tmpfs, a cvmfsd-like FUSE root, FUSE
repository mounts served by tiny pyfuse3 servers that can be SIGKILLed, CSI- and kubelet-like
binds, and pod-like processes in their own mount namespaces.

Everything runs inside `unshare -m --propagation private` (see views.py): nothing reaches the
host's mount table.  Layout below BASE (a tmpfs, made shared like a systemd host's /):

    BASE/cvmfs            the root R (tinyfs KIND=root, fstype fuse.cvmfsd), shared
    BASE/cvmfs/<name>     repository mounts (tinyfs KIND=repo)
    BASE/staging          private tmpfs: staged mounts, anchors, parking
    BASE/kubelet/<view>   CSI targets and kubelet subPath binds (on the shared BASE)
    BASE/pods/<pod>       a pod's copy, only inside that pod's namespace
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cvmfsd.core import kernel as K  # noqa: E402

PY = sys.executable
OPEN_TREE_CLONE = K.OPEN_TREE_CLONE
CLOEXEC = K.OPEN_TREE_CLOEXEC
AT_FDCWD = K.AT_FDCWD
AT_EMPTY_PATH = K.AT_EMPTY_PATH
AT_RECURSIVE = K.AT_RECURSIVE
F_EMPTY = K.MOVE_MOUNT_F_EMPTY_PATH
T_EMPTY = K.MOVE_MOUNT_T_EMPTY_PATH
MOVE_MOUNT_BENEATH = 0x200
O_PATHDIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def en(e: int | None) -> str:
    return errno.errorcode.get(e or 0, str(e))


def read_label(path: str) -> str:
    """Which backend serves path ("M2"), or the errno name."""
    try:
        with open(path, "rb") as f:
            return f.read().decode().split(":")[0]
    except OSError as exc:
        return en(exc.errno)


def try_(fn, *a, **kw) -> str:
    """Run a syscall wrapper; "ok" or the errno name."""
    try:
        fn(*a, **kw)
        return "ok"
    except OSError as exc:
        return en(exc.errno)


def clone(path_or_fd: str | int, recursive: bool = False) -> int:
    flags = OPEN_TREE_CLONE | CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if isinstance(path_or_fd, int):
        return K.open_tree(path_or_fd, "", flags | AT_EMPTY_PATH)
    return K.open_tree(AT_FDCWD, path_or_fd, flags)


def attach(fd: int, target: str, beneath: bool = False) -> None:
    K.move_mount(fd, "", AT_FDCWD, target, F_EMPTY | (MOVE_MOUNT_BENEATH if beneath else 0))


def move_path(src: str, target: str, beneath: bool = False) -> None:
    """move_mount of the attached mount at src (MS_MOVE-like), optionally beneath target's top."""
    K.move_mount(AT_FDCWD, src, AT_FDCWD, target, MOVE_MOUNT_BENEATH if beneath else 0)


def set_prop_fd(fd: int, prop: int, recursive: bool = False) -> None:
    K.mount_setattr(fd, "", AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0), propagation=prop)


def detach(path: str) -> None:
    K.umount(path, K.MNT_DETACH)


class Mountinfo:
    """One namespace's mount table, with stacks resolved bottom to top."""

    def __init__(self, pid: int | str = "self") -> None:
        self.rows = []
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            f = left.split()
            r = right.split()
            self.rows.append({"id": int(f[0]), "parent": int(f[1]), "dev": f[2], "root": f[3],
                              "mp": f[4], "opt": " ".join(f[6:]), "fstype": r[0], "source": r[1]})
        self.by_id = {r["id"]: r for r in self.rows}

    def stack(self, path: str) -> list[dict]:
        at = [r for r in self.rows if r["mp"] == path]
        ids = {r["id"] for r in at}
        bottom = [r for r in at if r["parent"] not in ids]
        out = []
        cur = bottom[0] if bottom else None
        while cur is not None:
            out.append(cur)
            nxt = [r for r in at if r["parent"] == cur["id"]]
            cur = nxt[0] if nxt else None
        return out

    def under(self, prefix: str) -> list[dict]:
        return [r for r in self.rows if r["mp"] == prefix or r["mp"].startswith(prefix + "/")]


class Lab:
    def __init__(self, base: str) -> None:
        self.base = base
        self.root = f"{base}/cvmfs"
        self.stg = f"{base}/staging"
        self.kub = f"{base}/kubelet"
        self.podsdir = f"{base}/pods"
        self.servers: dict[str, subprocess.Popen] = {}
        self.dead: set[str] = set()
        self.pods: dict[str, Pod] = {}
        self.extra: list[subprocess.Popen] = []
        self.root_label: str | None = None

    # -- setup / teardown ----------------------------------------------------------------------
    def setup(self) -> Lab:
        K.mount("kexp", self.base, "tmpfs", 0, "size=1m,mode=755")
        K.set_propagation(self.base, K.MS_SHARED)
        for d in (self.root, self.stg, self.kub, self.podsdir):
            os.mkdir(d)
        K.mount("kexp-staging", self.stg, "tmpfs", 0, "size=1m,mode=700")
        K.set_propagation(self.stg, K.MS_PRIVATE)
        return self

    def teardown(self) -> None:
        for pod in list(self.pods.values()):
            pod.close()
        self.pods.clear()
        for p in self.extra:
            p.kill()
            p.wait()
        self.extra.clear()
        for _label, p in self.servers.items():
            if p.poll() is None:
                p.kill()
            p.wait()
        self.servers.clear()
        # Every mount of the lab is below BASE, in this private namespace only.
        while try_(detach, self.base) == "ok":
            pass

    # -- FUSE ----------------------------------------------------------------------------------
    def fuse(self, target: str, label: str, kind: str = "repo", timeout: float = 1e6) -> None:
        fd = os.open("/dev/fuse", os.O_RDWR)
        fstype = "fuse.cvmfsd" if kind == "root" else "fuse"
        try:
            K.mount(f"kexp-{label}", target, fstype, K.MS_NOSUID | K.MS_NODEV | K.MS_RDONLY,
                    f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions")
            p = subprocess.Popen([PY, str(HERE / "tinyfs.py"), str(fd), label, kind, str(timeout)],
                                 pass_fds=(fd,))
        finally:
            os.close(fd)  # or a dead server makes accesses hang instead of ENOTCONN
        self.servers[label] = p
        os.stat(target)  # waits for the server's INIT

    def kill(self, label: str) -> None:
        p = self.servers[label]
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.dead.add(label)

    def staged_repo(self, label: str, timeout: float = 1e6) -> str:
        path = f"{self.stg}/{label}"
        os.mkdir(path)
        self.fuse(path, label, "repo", timeout)
        return path

    def make_root(self, label: str = "R1") -> None:
        st = f"{self.stg}/.root-{label}"
        os.mkdir(st)
        self.fuse(st, label, "root")
        K.move(st, self.root)
        os.rmdir(st)
        K.set_propagation(self.root, K.MS_SHARED)
        self.root_label = label

    def mount_repo(self, label: str, name: str = "repo", timeout: float = 1e6) -> None:
        """The daemon's attach: mount at a private staging path, MS_MOVE into place."""
        st = self.staged_repo(label, timeout)
        K.move(st, f"{self.root}/{name}")
        os.rmdir(st)

    # -- views ---------------------------------------------------------------------------------
    def target(self, name: str) -> str:
        t = f"{self.kub}/{name}"
        os.makedirs(t, exist_ok=True)
        return t

    def plugin_bind(self, src: str, name: str) -> str:
        """The CSI plugin today: open_tree(src, CLONE|RECURSIVE), move_mount, then slave."""
        tgt = self.target(name)
        t = clone(src, recursive=True)
        try:
            attach(t, tgt)
            set_prop_fd(t, K.MS_SLAVE, recursive=True)
        finally:
            os.close(t)
        return tgt

    def rootdir_bind(self, name_in_root: str, name: str) -> str:
        """A per-repository volume rooted at the repository's own (covered) directory of the root
        mount, with a copy of the repository mount on top: a slave of the root's peer group."""
        tgt = self.target(name)
        r = clone(self.root)  # R alone: its <name> directory is uncovered in the clone
        try:
            d = K.open_tree(r, name_in_root, OPEN_TREE_CLONE | CLOEXEC)
            self.note_rootdir = "open_tree on the detached clone"
        except OSError:
            park = f"{self.stg}/.rd"
            os.mkdir(park)
            attach(r, park)
            d = clone(f"{park}/{name_in_root}")
            detach(park)
            os.rmdir(park)
            self.note_rootdir = "clone attached at staging first"
        os.close(r)
        try:
            attach(d, tgt)
            # Slave first: while d is a peer of the root, a mount on it propagates to the root
            # and every view (measured: a second copy tucked under the repository everywhere).
            set_prop_fd(d, K.MS_SLAVE)
            m = clone(f"{self.root}/{name_in_root}", recursive=True)
            attach(m, tgt)
            os.close(m)
            set_prop_fd(d, K.MS_SLAVE, recursive=True)
        finally:
            os.close(d)
        return tgt

    def subpath(self, src: str, name: str) -> str:
        """kubelet's subPath: a bind of the source opened as an fd (mount /proc/self/fd/N)."""
        tgt = self.target(name)
        fd = os.open(src, O_PATHDIR)
        try:
            K.mount(f"/proc/self/fd/{fd}", tgt, None, K.MS_BIND)
        finally:
            os.close(fd)
        return tgt

    def pod(self, name: str, src: str, mode: str = "slave") -> Pod:
        p = Pod(self, name, src, mode)
        self.pods[name] = p
        return p

    # -- observation ---------------------------------------------------------------------------
    def label_of(self, row: dict) -> str:
        src = row["source"].removeprefix("kexp-")
        if row["fstype"] == "tmpfs":
            src = "tmpfs"
        lab = src + (row["root"] if row["root"] != "/" else "")
        return lab + ("\u2020" if src in self.dead else "")

    def stack(self, path: str, pid: int | str = "self") -> list[str]:
        return [self.label_of(r) for r in Mountinfo(pid).stack(path)]


class Pod:
    """A pod-like process: its own mount namespace, a rbind+rslave copy of src at BASE/pods/name."""

    def __init__(self, lab: Lab, name: str, src: str, mode: str = "slave") -> None:
        self.lab = lab
        self.name = name
        self.path = f"{lab.podsdir}/{name}"
        self.p = subprocess.Popen(
            ["unshare", "-m", "--propagation", "slave", PY, str(HERE / "podagent.py"), src,
             self.path, lab.base, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.p.stdout.readline())
        assert hello.get("ready"), hello
        self.pid = hello["pid"]

    def do(self, op: str, **kw) -> dict:
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def read(self, rel: str) -> str:
        r = self.do("read", path=f"{self.path}/{rel}" if rel else self.path)
        return r["data"].split(":")[0] if r["ok"] else r["err"]

    def r(self, op: str, **kw) -> str:
        r = self.do(op, **kw)
        if not r["ok"]:
            return r["err"]
        return r["data"].split(":")[0] if "data" in r else "ok"

    def stack(self, rel: str = "") -> list[str]:
        return self.lab.stack(f"{self.path}/{rel}" if rel else self.path, self.pid)

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
                self.p.wait(timeout=5)
            except Exception:
                self.p.kill()
                self.p.wait()


class Readers:
    """Tight read loops in this (host) namespace, one process per path (podagent.py --reader):
    a path walk (stat) each time, an open+read through the backend every 16th time."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.procs = {k: subprocess.Popen([PY, str(HERE / "podagent.py"), "--reader", p],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for k, p in paths.items()}

    def finish(self) -> dict[str, dict]:
        out = {}
        for k, p in self.procs.items():
            o, _ = p.communicate("", timeout=30)
            out[k] = json.loads(o)
        return out


def now_ms() -> float:
    return time.monotonic() * 1000
