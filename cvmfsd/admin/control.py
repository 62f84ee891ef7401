"""The status socket: a versioned JSON-lines protocol on a unix socket, root only by default.

Protocol, version 1 (the README's "Node admin" section is the user-facing copy):

- AF_UNIX stream socket, default `<run_dir>/cvmfsd.sock`, mode 0600 root, or 0660 with the
  configured `admin_group`. Each connection is also checked with SO_PEERCRED: uid 0, or the
  admin group as primary or supplementary group; anyone else gets `permission_denied`.
- Framing: one JSON object per line (UTF-8, ending in "\\n"), at most 65,536 bytes including the
  newline. A client may send several requests on one connection; replies come in order, one
  line each. A client gets 10 s to deliver each complete line (idle connections included);
  replies it does not read within 10 s end the connection.
- Request:  {"v": 1, "cmd": "<command>", "id": <optional, echoed>, <arguments>}
  ("v" may be left out and means 1; unknown arguments are an error, so typos do not pass.)
- Reply:    {"v": 1, "id": ..., "ok": true, "result": {...}}
            {"v": 1, "id": ..., "ok": false, "error": {"code": "...", "message": "...", ...}}
  Within a version, replies only gain fields; clients ignore fields they do not know.
- Commands: status; list [names] [details=true]; mount name [timeout]; umount name [force]
  [timeout]; reload; probe [names] [timeout]; restart (re-exec in place, mounts handed over).
- Error codes: bad_request, too_large (connection closed), timeout (connection closed),
  unsupported_version, unknown_command, permission_denied, overloaded, invalid_name,
  mount_failed (with "mount_error": message, exit_code, meaning, stderr, errno), busy,
  reload_failed, shutting_down, internal.

Robustness: at most MAX_CLIENTS connections are served at once (more are answered `overloaded`
and closed at once); every read and write has a deadline; requests run as separate tasks, so a
slow mount for one client never holds up another, and nothing here can block the FUSE loop.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import structlog
import trio

from ..config import admin_gid
from ..core.errors import MountError
from .api import PROTOCOL_VERSION, AdminApi, AdminError

log = structlog.get_logger("cvmfsd.control")

MAX_LINE = 64 * 1024
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
MAX_CLIENTS = 128
MAX_TIMEOUT = 3600.0
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)

_REQUIRED = object()
_ARGS: dict[str, dict[str, tuple[str, Any]]] = {
    # command: {argument: (kind, default)}
    "status": {},
    "list": {"names": ("names", None), "details": ("bool", True)},
    "mount": {"name": ("name", _REQUIRED), "timeout": ("timeout", None)},
    "umount": {"name": ("name", _REQUIRED), "force": ("bool", False),
               "timeout": ("timeout", None)},
    "reload": {},
    "probe": {"names": ("names", None), "timeout": ("timeout", None)},
    "restart": {},
}
# Commands that change something: logged with who asked, as an audit trail.
_CHANGING = {"mount", "umount", "reload", "probe", "restart"}


class RequestError(Exception):
    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


class _TooLarge(Exception):
    pass


class _Slow(Exception):
    pass


# --- the socket file ----------------------------------------------------------------------------
def bind(path: Path, gid: int | None) -> tuple[socket.socket, int]:
    """Bind under a temporary name, set mode and group, then rename into place: the socket is
    never reachable with looser permissions. Blocking (run in a thread)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        if _answers(path):
            raise OSError(errno.EADDRINUSE, f"{path} is served by another process")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(tmp))
        os.chmod(tmp, 0o600 if gid is None else 0o660)
        if gid is not None:
            os.chown(tmp, -1, gid)
        sock.listen(128)
        inode = os.lstat(tmp).st_ino
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return sock, inode


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
            return True
        except OSError:
            return False


def _unlink_if_ours(path: Path, inode: int) -> None:
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            path.unlink()


# --- peers --------------------------------------------------------------------------------------
def peer_credentials(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connecting process, from the kernel (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(sock: Any, pid: int) -> set[int]:
    """Supplementary groups of the peer: SO_PEERGROUPS (Linux 4.13), else /proc/<pid>/status."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # Python's maximum
        return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def authorized(uid: int, gid: int, groups: set[int], admin: int | None) -> bool:
    if uid == 0:
        return True
    return admin is not None and (gid == admin or admin in groups)


# --- requests -------------------------------------------------------------------------------------
def _arguments(cmd: str, request: dict[str, Any]) -> dict[str, Any]:
    spec = _ARGS[cmd]
    args = {k: v for k, v in request.items() if k not in ("v", "cmd", "id")}
    unknown = sorted(set(args) - set(spec))
    if unknown:
        raise RequestError("bad_request", f"{cmd}: unknown arguments {unknown}; "
                                          f"takes {sorted(spec) or 'none'}")
    out: dict[str, Any] = {}
    for key, (kind, default) in spec.items():
        if key not in args or args[key] is None:
            if default is _REQUIRED:
                raise RequestError("bad_request", f"{cmd}: missing argument {key!r}")
            out[key] = default
            continue
        value = args[key]
        if kind == "name":
            if not isinstance(value, str) or not value or len(value) > 255:
                raise RequestError("bad_request", f"{key}: expected a repository name")
        elif kind == "names":
            if not isinstance(value, list) or len(value) > 1000 or not all(
                    isinstance(v, str) and 0 < len(v) <= 255 for v in value):
                raise RequestError("bad_request", f"{key}: expected a list of up to 1000 names")
        elif kind == "bool":
            if not isinstance(value, bool):
                raise RequestError("bad_request", f"{key}: expected true or false")
        elif kind == "timeout" and (isinstance(value, bool) or not isinstance(value, int | float)
                                    or not 0 < value <= MAX_TIMEOUT):
            raise RequestError("bad_request", f"{key}: expected seconds, 0 < t <= {MAX_TIMEOUT:g}")
        out[key] = value
    return out


def _parse(raw: bytes) -> tuple[Any, str, dict[str, Any]]:
    """(id, command, arguments) or RequestError."""
    try:
        request = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError("bad_request", f"not a JSON line: {str(exc)[:200]}") from None
    if not isinstance(request, dict):
        raise RequestError("bad_request", "a request is one JSON object")
    rid = request.get("id")
    version = request.get("v", PROTOCOL_VERSION)
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise RequestError("unsupported_version", f"protocol version {version!r} is not "
                           f"supported", supported=[PROTOCOL_VERSION], id=rid)
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        raise RequestError("bad_request", "missing \"cmd\"", id=rid)
    if cmd not in _ARGS:
        raise RequestError("unknown_command", f"unknown command {cmd[:64]!r}",
                           commands=sorted(_ARGS), id=rid)
    try:
        return rid, cmd, _arguments(cmd, request)
    except RequestError as exc:
        exc.extra["id"] = rid
        raise


def _encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


def _error(rid: Any, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": rid, "ok": False,
            "error": {"code": code, "message": message, **extra}}


class Server:
    def __init__(self, admin: AdminApi) -> None:
        self.admin = admin
        self.gid = admin_gid(admin.cfg.admin_group)
        self.clients = 0
        self.refusing = 0

    def _count(self, cmd: str, result: str) -> None:
        key = (cmd if cmd in _ARGS else "invalid", result)
        self.admin.requests[key] = self.admin.requests.get(key, 0) + 1

    async def run(self, path: Path, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raw, inode = await trio.to_thread.run_sync(bind, path, self.gid)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
        log.info("control_listening", socket=str(path), mode="0660" if self.gid is not None
                 else "0600", admin_group=self.admin.cfg.admin_group or None)
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # EMFILE and friends: breathe, keep serving
                        log.warning("control_accept_failed", error=str(exc))
                        await trio.sleep(0.1)
                        continue
                    if self.clients >= MAX_CLIENTS:
                        self._count("-", "overloaded")
                        if self.refusing >= MAX_CLIENTS:  # a flood: no explanations
                            await trio.aclose_forcefully(stream)
                        else:
                            self.refusing += 1
                            nursery.start_soon(self._refuse_overloaded, stream)
                        continue
                    self.clients += 1
                    nursery.start_soon(self._client, stream)
        finally:
            _unlink_if_ours(path, inode)

    async def _refuse(self, stream: trio.SocketStream, code: str, message: str) -> None:
        """Say why, then close. What the client already sent is drained first (briefly):
        closing a unix socket with unread data makes the peer's reads fail with ECONNRESET
        before it sees the reason."""
        with trio.move_on_after(0.3), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(_encode(_error(None, code, message)))
            await stream.send_eof()
            for _ in range(4):
                if not await stream.receive_some(MAX_LINE):
                    break
        await trio.aclose_forcefully(stream)

    async def _refuse_overloaded(self, stream: trio.SocketStream) -> None:
        try:
            await self._refuse(stream, "overloaded",
                               f"more than {MAX_CLIENTS} clients at once; try again")
        finally:
            self.refusing -= 1

    async def _client(self, stream: trio.SocketStream) -> None:
        try:
            pid, uid, gid = peer_credentials(stream.socket)
            if not authorized(uid, gid, peer_groups(stream.socket, pid) if uid else set(),
                              self.gid):
                log.warning("control_refused", peer_pid=pid, peer_uid=uid, peer_gid=gid)
                self._count("-", "permission_denied")
                await self._refuse(stream, "permission_denied",
                                   "root or the admin group only")
                return
            buffer = bytearray()
            while True:
                try:
                    line = await self._read_line(stream, buffer)
                except _TooLarge:
                    self._count("-", "too_large")
                    await self._send(stream, _error(None, "too_large",
                                                    f"request lines are at most {MAX_LINE} "
                                                    "bytes; closing"))
                    return
                except _Slow:
                    self._count("-", "timeout")
                    with trio.move_on_after(0.2):
                        await self._send(stream, _error(None, "timeout",
                                                        f"no complete request within "
                                                        f"{READ_TIMEOUT:g} s; closing"))
                    return
                if line is None:
                    return
                if not line.strip():
                    continue
                reply = await self._dispatch(line, pid, uid)
                if not await self._send(stream, reply):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("control_client_failed")
        finally:
            self.clients -= 1
            await trio.aclose_forcefully(stream)

    async def _read_line(self, stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
        with trio.move_on_after(READ_TIMEOUT):
            while True:
                end = buffer.find(b"\n", 0, MAX_LINE)
                if end >= 0:
                    line = bytes(buffer[:end])
                    del buffer[:end + 1]
                    return line
                if len(buffer) >= MAX_LINE:
                    raise _TooLarge()
                chunk = await stream.receive_some(MAX_LINE)
                if not chunk:  # EOF: a last line without its newline still counts
                    line, buffer[:] = bytes(buffer), b""
                    return line or None
                buffer += chunk
        raise _Slow()

    async def _send(self, stream: trio.SocketStream, message: dict[str, Any]) -> bool:
        with trio.move_on_after(WRITE_TIMEOUT):
            await stream.send_all(_encode(message))
            return True
        return False

    async def _dispatch(self, line: bytes, pid: int, uid: int) -> dict[str, Any]:
        rid: Any = None
        cmd = "-"
        try:
            rid, cmd, args = _parse(line)
            result = await self._call(cmd, args)
            self._count(cmd, "ok")
            if cmd in _CHANGING:
                log.info("control_request", cmd=cmd, result="ok", peer_pid=pid, peer_uid=uid,
                         **{k: v for k, v in args.items() if k in ("name", "force")})
            return {"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": result}
        except RequestError as exc:
            self._count(cmd, exc.code)
            extra = dict(exc.extra)
            rid = extra.pop("id", rid)
            return _error(rid, exc.code, exc.message, **extra)
        except AdminError as exc:
            self._count(cmd, exc.code)
            log.info("control_request", cmd=cmd, result=exc.code, error=exc.message,
                     peer_pid=pid, peer_uid=uid)
            return _error(rid, exc.code, exc.message, **exc.extra)
        except MountError as exc:
            self._count(cmd, "mount_failed")
            log.info("control_request", cmd=cmd, result="mount_failed", error=exc.message,
                     peer_pid=pid, peer_uid=uid)
            return _error(rid, "mount_failed", exc.message, mount_error=exc.as_dict())
        except Exception as exc:
            self._count(cmd, "internal")
            log.exception("control_request_failed", cmd=cmd)
            return _error(rid, "internal", f"internal error: {exc!r}")

    async def _call(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        admin = self.admin
        if cmd == "status":
            return await admin.status_report()
        if cmd == "list":
            return await admin.list(args["names"], args["details"])
        if cmd == "mount":
            return await admin.mount(args["name"], args["timeout"])
        if cmd == "umount":
            return await admin.umount(args["name"], args["force"], args["timeout"])
        if cmd == "reload":
            return await admin.reload()
        if cmd == "probe":
            return await admin.probe(args["names"], args["timeout"])
        if cmd == "restart":
            return await admin.restart()
        raise RequestError("unknown_command", f"unknown command {cmd!r}")


async def serve(admin: AdminApi, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    await Server(admin).run(admin.cfg.control_socket_path, task_status=task_status)


__all__ = ["MAX_LINE", "PROTOCOL_VERSION", "Server", "authorized", "bind", "serve"]
