"""Test harness for the CSI plugin: the plugin as a real process on a unix socket, a stand-in for
the daemon's root, a fake kubelet directory, and pods (processes in their own mount namespace).

Every process is stopped by its pid; every mount made here is unmounted by `unmount_tree`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import mounts
from csi.proto import csi_pb2, csi_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PY = sys.executable
REPOS = ("alpha.example.org", "beta.example.org", "gamma.example.org", "delta.example.org")
# served by a FUSE process of its own, so that killing it leaves a dead (ENOTCONN) mount
FUSE_REPO = "epsilon.example.org"
TOPOLOGIES = ("host", "daemonset")
AccessMode = csi_pb2.VolumeCapability.AccessMode
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="needs root and /dev/fuse (mounts, FUSE, mount namespaces)",
)


def env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def stop_pid(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Stop one process we started, by its pid."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def mounts_at_or_under(path: Path | str) -> list[mounts.MountEntry]:
    p = str(path)
    return [
        e
        for e in mounts.MountTable.read().entries
        if e.mount_point == p or mounts.is_under(e.mount_point, p)
    ]


def unmount_tree(path: Path | str) -> None:
    """Unmount everything at or below path, deepest first; detach what is busy."""
    for _ in range(10):
        found = mounts_at_or_under(path)
        if not found:
            return
        for entry in sorted(found, key=lambda e: e.mount_point.count("/"), reverse=True):
            try:
                mounts.umount(entry.mount_point, mounts.UMOUNT_NOFOLLOW)
            except OSError:
                with contextlib.suppress(OSError):
                    mounts.umount(entry.mount_point, mounts.MNT_DETACH | mounts.UMOUNT_NOFOLLOW)
    if mounts_at_or_under(path):
        raise RuntimeError(f"mounts left under {path}: {mounts_at_or_under(path)}")


def wait_for(predicate: Callable[[], object], timeout: float = 30,
             what: str | Callable[[], str] = "") -> None:
    """Poll until predicate() is true (events, not durations, decide; the timeout only bounds a
    failing test). what: says what was awaited; a callable is asked at the timeout (for what
    was seen last)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise TimeoutError(f"timed out waiting for {said or predicate}")
        time.sleep(0.01)


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Until pid has exited (reaped here if it became our child: tests run as a subreaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} did not exit")


class LineReader:
    """Read lines from a child's stdout with a timeout (select on the raw fd)."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError("no line from child process")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("child process closed its output")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


class StandinRoot:
    """STAND-IN for the cvmfsd root (tests/csi/fakeroot_fs.py); see the `cvmfs_root` fixture.

    The same interface could be given by the real daemon: `path`, `repos`, `lookup(name)` (a lookup
    from the host that makes the repository appear), `kill()` (the daemon dies: ENOTCONN), `pause()`
    and `resume()` (the daemon hangs), `close()`.
    """

    def __init__(self, tmp: Path, repos: tuple[str, ...] = REPOS) -> None:
        self.tmp = tmp
        self.path = tmp / "cvmfs"
        self.staging = tmp / "staging"
        self.repos = repos
        self.fuse_repo = FUSE_REPO
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "fakeroot.log"

    def start(self) -> StandinRoot:
        self.path.mkdir(exist_ok=True)
        self.staging.mkdir(exist_ok=True)
        # repositories are prepared on a private staging mount, then moved into the shared root
        mounts.mount("tmpfs", str(self.staging), "tmpfs", 0, "size=1m,mode=700")
        mounts.mount(None, str(self.staging), None, mounts.MS_PRIVATE)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PY,
                    str(HERE / "fakeroot_fs.py"),
                    str(self.path),
                    str(self.staging),
                    *self.repos,
                    f"{self.fuse_repo}:fuse",
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                env=env_with_repo(),
            )
        assert self.proc.stdout is not None
        line = LineReader(self.proc.stdout).readline(20)
        assert line == "ready", line
        mounts.mount(None, str(self.path), None, mounts.MS_SHARED)  # as the daemon does
        return self

    def lookup(self, name: str, timeout: float = 5.0) -> None:
        """Look a repository up from the host and wait until its mount is attached."""
        os.stat(self.path / name)
        self.wait_attached(name, timeout)

    def wait_attached(self, name: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while mounts.MountTable.read().top(str(self.path / name)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not attached")
            time.sleep(0.01)

    def kill(self) -> None:
        assert self.proc is not None
        stop_pid(self.proc, signal.SIGKILL)

    def repo_pid(self, name: str) -> int | None:
        """The pid of the process serving a FUSE repository (None before its first lookup)."""
        pid_file = self.staging / f"{name}.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None

    def kill_repo(self, name: str) -> None:
        """SIGKILL the FUSE repository's process: its mount answers ENOTCONN from then on."""
        pid = self.repo_pid(name)
        assert pid is not None, f"{name} was never looked up"
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
        pid = self.repo_pid(self.fuse_repo) if self.staging.exists() else None
        if pid is not None:  # the fake root's child: stopped by the pid it recorded
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
        for entry in sorted(
            mounts.MountTable.read().under(str(self.path)),
            key=lambda e: e.mount_point,
            reverse=True,
        ):
            with contextlib.suppress(OSError):
                mounts.umount(entry.mount_point, mounts.MNT_DETACH)
        if self.proc is not None:
            stop_pid(self.proc)
        unmount_tree(self.path)
        unmount_tree(self.staging)


class Plugin:
    """The CSI plugin as a real subprocess (python -m csi.main) on a unix socket."""

    def __init__(
        self,
        tmp: Path,
        kubelet_dir: Path,
        cvmfs_root: Path,
        *args: str,
        topology: str = "host",
    ) -> None:
        assert topology in TOPOLOGIES
        self.topology = topology
        self.dir = tmp / f"plugin-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir()
        self.socket = self.dir / "csi.sock"
        self.endpoint = f"unix://{self.socket}"
        self.log = self.dir / "plugin.log"
        self.argv = [
            PY,
            "-m",
            "csi.main",
            f"--endpoint={self.endpoint}",
            f"--kubelet-dir={kubelet_dir}",
            f"--cvmfs-root={cvmfs_root}",
            "--node-id=node-1",
            "--probe-timeout=1",
            "--repository-timeout=5",
            *args,
        ]
        if topology == "daemonset":
            wrapper = [PY, str(HERE / "csi_nsplugin.py"), str(kubelet_dir), str(cvmfs_root), "--"]
            self.argv = wrapper + self.argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> Plugin:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=log, cwd=REPO_ROOT, env=env_with_repo()
            )
        self.channel = grpc.insecure_channel(self.endpoint)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=20)
        except grpc.FutureTimeoutError:
            self.stop()
            raise RuntimeError(f"plugin did not start:\n{self.log.read_text()}") from None
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        return self

    def stop(self) -> int | None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is None:
            return None
        stop_pid(self.proc)
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


class LineChild:
    """A helper process driven by JSON lines on its stdin and stdout: it says {"ready": ...}
    first, answers one line per request and leaves on {"op": "exit"}."""

    call_timeout = 15.0
    exit_timeout = 5.0

    def __init__(self, argv: list[str], ready_timeout: float) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env_with_repo())
        assert self.proc.stdout is not None
        self.reader = LineReader(self.proc.stdout)
        self.hello: dict[str, Any] = json.loads(self.reader.readline(ready_timeout))
        assert self.hello.get("ready"), self.hello

    def call(self, op: str, timeout: float | None = None, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(
            self.reader.readline(self.call_timeout if timeout is None else timeout))
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.close()
            try:
                self.proc.wait(self.exit_timeout)
            except subprocess.TimeoutExpired:
                stop_pid(self.proc, signal.SIGKILL)


class Pod(LineChild):
    """A process in its own mount namespace holding a slave copy of a published target at `view`."""

    def __init__(self, target: Path, view: Path) -> None:
        view.mkdir(parents=True, exist_ok=True)
        self.view = view
        super().__init__([PY, str(HERE / "csi_pod.py"), str(target), str(view)], 20)


def make_target(kubelet_dir: Path, pv: str = "pv-1", pod_uid: str | None = None) -> Path:
    """A kubelet-style target path; its parent exists (kubelet makes it), the target does not."""
    uid = pod_uid or str(uuid.uuid4())
    parent = kubelet_dir / "pods" / uid / "volumes" / "kubernetes.io~csi" / pv
    parent.mkdir(parents=True)
    return parent / "mount"


def capability(
    mode: int = AccessMode.MULTI_NODE_READER_ONLY, flags: tuple[str, ...] = (), block: bool = False
) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(access_mode=AccessMode(mode=mode))
    if block:
        cap.block.SetInParent()
    else:
        cap.mount.SetInParent()
        cap.mount.mount_flags.extend(flags)
    return cap


def publish_request(
    target: Path | str,
    volume_id: str = "cvmfs-default",
    *,
    repository: str | None = None,
    mode: int = AccessMode.MULTI_NODE_READER_ONLY,
    readonly: bool = True,
    context: dict[str, str] | None = None,
) -> csi_pb2.NodePublishVolumeRequest:
    ctx = dict(context or {})
    if repository:
        ctx["repository"] = repository
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id,
        target_path=str(target),
        volume_capability=capability(mode),
        readonly=readonly,
        volume_context=ctx,
    )


def unpublish_request(
    target: Path | str, volume_id: str = "cvmfs-default"
) -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))


def code_of(call: Any, request: Any, timeout: float = 30) -> grpc.StatusCode:
    """Status code of a unary call (OK when it succeeds)."""
    try:
        call(request, timeout=timeout)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK
