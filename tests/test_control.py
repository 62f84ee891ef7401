"""The status socket against a running daemon with the cvmfs2 stand-in: status, list, mount,
umount, reload, probe; permissions; malformed, oversized and slow clients."""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, toml_config

from cvmfsd.admin import control
from cvmfsd.config import parse_listen

SYSTEM_PYTHON = "/usr/bin/python3"


class Conn:
    """A raw JSON-lines client of the status socket."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        self.send(json.dumps({"v": 1, "cmd": cmd, **args}).encode() + b"\n")
        return self.line()

    def close(self) -> None:
        self.sock.close()


def call(d: Daemon, cmd: str, **args: Any) -> dict[str, Any]:
    conn = Conn(socket_of(d))
    try:
        return conn.call(cmd, **args)
    finally:
        conn.close()


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"], reply
    assert reply["v"] == 1
    return reply["result"]


def socket_of(d: Daemon) -> Path:
    return d.run_dir / "cvmfsd.sock"


def entry(d: Daemon, name: str) -> dict[str, Any]:
    repos = ok(call(d, "list", names=[name]))["repositories"]
    assert len(repos) == 1, repos
    return repos[0]


def rewrite_config(d: Daemon, **overrides: Any) -> Path:
    """The daemon's config file (the fixture wrote cvmfsd-0.toml), with changes."""
    path = d.env.tmp / "cvmfsd-0.toml"
    path.write_text(toml_config(d.env, **overrides))
    return path


# --- unit-level -----------------------------------------------------------------------------------
def test_authorized_rules() -> None:
    assert control.authorized(0, 0, set(), None)
    assert not control.authorized(1000, 1000, {1000, 27}, None)
    assert control.authorized(1000, 4242, set(), 4242)
    assert control.authorized(1000, 1000, {4242}, 4242)
    assert not control.authorized(1000, 1000, {1, 2}, 4242)


def test_parse_rejects_what_it_should() -> None:
    cases = [
        (b"", "bad_request"), (b"{", "bad_request"), (b"[1]", "bad_request"),
        (b"\xff\xfe", "bad_request"), (b"[" * 40000, "bad_request"),
        (b'{"v": 2, "cmd": "status"}', "unsupported_version"),
        (b'{"v": true, "cmd": "status"}', "unsupported_version"),
        (b'{"cmd": 5}', "bad_request"), (b'{"cmd": "rm -rf"}', "unknown_command"),
        (b'{"cmd": "mount"}', "bad_request"), (b'{"cmd": "mount", "name": 7}', "bad_request"),
        (b'{"cmd": "status", "extra": 1}', "bad_request"),
        (b'{"cmd": "umount", "name": "a.b", "force": "yes"}', "bad_request"),
        (b'{"cmd": "mount", "name": "a.b", "timeout": -1}', "bad_request"),
        (b'{"cmd": "list", "names": "a.b"}', "bad_request"),
    ]
    for raw, code in cases:
        with pytest.raises(control.RequestError) as exc:
            control._parse(raw)
        assert exc.value.code == code, raw[:40]
    rid, cmd, args = control._parse(b'{"cmd": "list", "id": "x"}')
    assert (rid, cmd, args) == ("x", "list", {"names": None, "details": True})


def test_parse_listen() -> None:
    assert parse_listen("9757") == ("127.0.0.1", 9757)
    assert parse_listen(":9757") == ("127.0.0.1", 9757)
    assert parse_listen("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_listen("[::1]:9757") == ("::1", 9757)
    for bad in ("x", "1:99999", "host:"):
        with pytest.raises(ValueError):
            parse_listen(bad)


# --- against the daemon ---------------------------------------------------------------------------
def test_status_list_mount_umount(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(backoff_initial=300.0, backoff_max=300.0)
    sock = socket_of(d)
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0

    status = ok(call(d, "status"))
    assert status["pid"] == d.pid and status["root"] == str(d.root)
    assert status["protocol"] == 1 and status["state"] == "running"
    assert status["degraded"] is False and status["problems"] == []
    assert status["repositories"]["total"] == 0
    assert status["liveness"]["ok"] is True

    # mount now: a repository nobody looked up yet
    result = ok(call(d, "mount", name="alice.cern.ch"))
    repo = result["repository"]
    assert result["changed"] is True and repo["state"] == "mounted"
    assert repo["revision"] == 1 and repo["proxy"] == "DIRECT" and repo["host"]
    assert repo["serving_pid"] == int(os.getxattr(d.path("alice.cern.ch"), "user.pid"))
    assert (d.path("alice.cern.ch") / "README").read_text() == "hello from the repository\n"
    assert ok(call(d, "mount", name="alice.cern.ch"))["changed"] is False

    listed = entry(d, "alice.cern.ch")
    assert listed["boots"] == 1 and listed["mounted_since"].endswith("Z")
    assert listed["cache_used_bytes"] is not None  # via the talk socket
    assert listed["last_error"] is None

    # a failing repository: its cvmfs2 exit code and stderr reach list
    d.env.add_repo("broken.cern.ch")
    d.env.repo_config("broken.cern.ch", CVMFS_STANDIN_FAIL="4")
    reply = call(d, "mount", name="broken.cern.ch")
    assert not reply["ok"] and reply["error"]["code"] == "mount_failed"
    assert reply["error"]["mount_error"]["exit_code"] == 4
    broken = entry(d, "broken.cern.ch")
    assert broken["state"] == "failed" and broken["boots"] == 1
    assert broken["last_error"]["exit_code"] == 4
    assert broken["last_error"]["meaning"] == "failed to mount"
    assert "(4 - " in broken["last_error"]["stderr"]
    assert broken["retry_in_s"] > 200
    # an admin's mount does not wait for the backoff
    assert call(d, "mount", name="broken.cern.ch")["error"]["code"] == "mount_failed"
    assert entry(d, "broken.cern.ch")["boots"] == 2
    assert ok(call(d, "status"))["repositories"]["failed"] == 1

    # names are validated like lookups
    for bad in ("../etc", "nodot", "-o.x", "a" * 61 + ".ch", "x y.cern.ch"):
        assert call(d, "mount", name=bad)["error"]["code"] == "invalid_name", bad
    assert ok(call(d, "list"))["unknown"] == []
    assert [r["name"] for r in ok(call(d, "list"))["repositories"]] == [
        "alice.cern.ch", "broken.cern.ch"]

    # umount: refused while busy, forced lazily, idempotent
    busy = open(d.path("alice.cern.ch") / "README")  # noqa: SIM115
    try:
        reply = call(d, "umount", name="alice.cern.ch")
        assert reply["error"]["code"] == "busy"
        assert entry(d, "alice.cern.ch")["state"] == "mounted"
        result = ok(call(d, "umount", name="alice.cern.ch", force=True))
        assert result["changed"] is True and result["repository"]["state"] == "idle"
    finally:
        busy.close()
    assert ok(call(d, "umount", name="alice.cern.ch"))["changed"] is False
    assert ok(call(d, "umount", name="never.cern.ch")) == {"repository": None, "changed": False}
    ok(call(d, "mount", name="alice.cern.ch"))
    assert ok(call(d, "umount", name="alice.cern.ch"))["changed"] is True
    assert entry(d, "alice.cern.ch")["boots"] == 2

    # several requests on one connection, ids echoed
    conn = Conn(sock)
    try:
        conn.send(b'{"cmd": "status", "id": 1}\n{"cmd": "list", "id": "two"}\n')
        assert conn.line()["id"] == 1 and conn.line()["id"] == "two"
    finally:
        conn.close()
    audit = [e for e in d.events("control_request") if e["cmd"] == "umount"]
    assert audit and all(e["peer_uid"] == 0 for e in audit)


def test_reload(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon()
    assert (d.path("cms.cern.ch") / "README").exists()
    d.wait_mounted("cms.cern.ch")
    rewrite_config(d, deny=["cms.cern.ch", "lhcb.*"], mount_timeout=15.0)
    result = ok(call(d, "reload"))
    assert sorted(result["changed"]) == ["deny", "mount_timeout"]
    # running mounts are untouched; new names follow the new policy
    assert entry(d, "cms.cern.ch")["state"] == "mounted"
    assert (d.path("cms.cern.ch") / "README").exists()
    with pytest.raises(FileNotFoundError):
        os.stat(d.path("lhcb.cern.ch"))
    assert call(d, "mount", name="lhcb.cern.ch")["error"]["code"] == "invalid_name"
    assert "lhcb.cern.ch" not in d.env.boots()

    # keys that only a restart can change: refused, nothing changed
    rewrite_config(d, deny=[], root=str(d.env.tmp / "elsewhere"))
    reply = call(d, "reload")
    assert reply["error"]["code"] == "reload_failed" and "root" in reply["error"]["message"]
    assert reply["error"]["keys"] == ["root"]
    with pytest.raises(FileNotFoundError):
        os.stat(d.path("lhcb.cern.ch"))
    # an invalid file: refused with the validation error
    (d.env.tmp / "cvmfsd-0.toml").write_text("mount_timeout = -1\n")
    reply = call(d, "reload")
    assert reply["error"]["code"] == "reload_failed"
    assert "mount_timeout" in reply["error"]["message"]

    # SIGHUP does the same
    rewrite_config(d)
    os.kill(d.pid, signal.SIGHUP)
    d.wait_for("the SIGHUP reload", lambda: d.events("sighup_reload"))
    assert sorted(d.events("sighup_reload")[0]["changed"]) == ["deny", "mount_timeout"]
    assert (d.path("lhcb.cern.ch") / "README").exists()


def test_probe(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(probe_repositories=["alice.cern.ch", "atlas.cern.ch", "missing.cern.ch"])
    result = ok(call(d, "probe"))
    by_name = {r["name"]: r for r in result["results"]}
    assert list(by_name) == ["alice.cern.ch", "atlas.cern.ch", "missing.cern.ch"]
    assert result["ok"] is False
    assert by_name["alice.cern.ch"]["ok"] and by_name["alice.cern.ch"]["revision"] == 1
    assert by_name["atlas.cern.ch"]["state"] == "mounted"
    missing = by_name["missing.cern.ch"]
    assert not missing["ok"] and missing["error"]["exit_code"] == 16
    assert missing["state"] == "failed"
    # names given in the request win; all good: ok
    result = ok(call(d, "probe", names=["cms.cern.ch"]))
    assert result["ok"] is True and result["results"][0]["revision"] == 1


# --- permissions ----------------------------------------------------------------------------------
NOBODY = pwd.getpwnam("nobody")
CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect": exc.errno}))
    sys.exit(0)
try:
    s.sendall(b'{"v": 1, "cmd": "status"}\\n')
except OSError:
    pass  # refused before the request was sent: the reason is still there to read
data = b""
while not data.endswith(b"\\n"):
    try:
        chunk = s.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    data += chunk
print(data.decode().strip() or json.dumps({"closed": True}))
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory that nobody can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="cvmfsd-ctl-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(sock: Path, gid: int, groups: list[int]) -> dict[str, Any]:
    """Connect as uid nobody with the given gid and supplementary groups (system python and
    stdlib only: the checkout may not be readable by nobody)."""
    cmd = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={gid}"]
    cmd += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    out = subprocess.run([*cmd, SYSTEM_PYTHON, "-I", "-c", CLIENT, str(sock)],
                         capture_output=True, text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv (util-linux) needed")
def test_root_only_by_default(start_daemon, public_dir: Path) -> None:  # type: ignore[no-untyped-def]
    sock = public_dir / "cvmfsd.sock"
    d = start_daemon(control_socket=str(sock))
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert as_user(sock, NOBODY.pw_gid, []) == {"connect": errno.EACCES}
    # Even with the file opened up, the daemon checks the peer's credentials itself.
    os.chmod(sock, 0o666)
    reply = as_user(sock, NOBODY.pw_gid, [])
    assert reply["ok"] is False and reply["error"]["code"] == "permission_denied"
    refused = d.wait_for("the refusal logged", lambda: d.events("control_refused"))
    assert refused[0]["peer_uid"] == NOBODY.pw_uid
    assert ok(call_path(sock, "status"))["pid"] == d.pid  # root still can


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv (util-linux) needed")
def test_admin_group(start_daemon, public_dir: Path) -> None:  # type: ignore[no-untyped-def]
    group = grp.getgrgid(NOBODY.pw_gid)  # nogroup: exists everywhere, nobody's own
    sock = public_dir / "cvmfsd.sock"
    start_daemon(control_socket=str(sock), admin_group=group.gr_name)
    st = os.stat(sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid and st.st_uid == 0
    other = 4242 if group.gr_gid != 4242 else 4243
    # primary group
    assert as_user(sock, group.gr_gid, [])["result"]["daemon"] == "cvmfsd"
    # supplementary group only (SO_PEERGROUPS)
    assert as_user(sock, other, [group.gr_gid])["result"]["daemon"] == "cvmfsd"
    # neither: the file mode stops it; opened up, the daemon does
    assert as_user(sock, other, [other + 1]) == {"connect": errno.EACCES}
    os.chmod(sock, 0o666)
    assert as_user(sock, other, [other + 1])["error"]["code"] == "permission_denied"


def call_path(sock: Path, cmd: str, **args: Any) -> dict[str, Any]:
    conn = Conn(sock)
    try:
        return conn.call(cmd, **args)
    finally:
        conn.close()


# --- abuse ----------------------------------------------------------------------------------------
def _malformed(rng: random.Random) -> list[bytes]:
    """1,000 bad requests: garbage, wrong shapes, wrong types, bad names, huge lines."""
    fixed = [
        b"\n", b"{}\n", b"[]\n", b"null\n", b"42\n", b'"status"\n', b"{\n", b"}\n",
        b'{"cmd": "status", "v": 99}\n', b'{"cmd": null}\n', b'{"cmd": ["status"]}\n',
        b'{"cmd": "shutdown"}\n', b'{"cmd": "mount"}\n', b'{"cmd": "mount", "name": 1}\n',
        b'{"cmd": "mount", "name": "../../etc"}\n', b'{"cmd": "mount", "name": "a/b.c"}\n',
        b'{"cmd": "mount", "name": "-o.exec"}\n', b'{"cmd": "mount", "name": "x,y.cern.ch"}\n',
        b'{"cmd": "mount", "name": "' + b"a" * 300 + b'"}\n',
        b'{"cmd": "umount", "name": "alice.cern.ch", "force": 1}\n',
        b'{"cmd": "umount", "name": "alice.cern.ch", "lazy": true}\n',
        b'{"cmd": "list", "names": [1, 2]}\n', b'{"cmd": "probe", "timeout": "soon"}\n',
        b'{"cmd": "probe", "timeout": 1e308}\n', b'{"cmd": "reload", "file": "/etc/passwd"}\n',
        b"[" * 30000 + b"\n", b'{"a":' * 5000 + b"\n", b"\x00\x01\x02\xff\n",
        b'{"cmd": "status", "v": "1"}\n', b"\xef\xbb\xbf{}\n",
    ]
    out = list(fixed)
    while len(out) < 1000:
        kind = rng.randrange(4)
        if kind == 0:
            out.append(bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 200)))
                       .replace(b"\n", b"") + b"\n")
        elif kind == 1:
            out.append(json.dumps({"cmd": rng.choice(["mount", "umount", "x", "list"]),
                                   "name": rng.choice([None, 3, [], "", ".", "a..b", "nodot"]),
                                   "v": rng.choice([1, 0, 2, None])}).encode() + b"\n")
        elif kind == 2:
            out.append(json.dumps([rng.random() for _ in range(rng.randrange(50))]).encode()
                       + b"\n")
        else:
            out.append(json.dumps({"cmd": "mount", "name": "".join(
                rng.choice("abc./-_,;$ \t") for _ in range(rng.randrange(1, 80)))}).encode()
                + b"\n")
    return out[:1000]


def test_malformed_oversized_and_slow_clients(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon()
    sock = socket_of(d)
    assert (d.path("alice.cern.ch") / "README").exists()
    d.wait_mounted("alice.cern.ch")
    before = ok(call(d, "list", details=False))["repositories"]
    boots_before = list(d.env.boots())

    # 50 slow clients: connected, trickling a request that never ends, or silent
    slow: list[socket.socket] = []
    for i in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        if i % 2:
            s.sendall(b'{"cmd": "sta')
        slow.append(s)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for s in slow[1::2]:
                with contextlib.suppress(OSError):
                    s.send(b" ")
            stop.wait(0.5)

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        # 1,000 malformed requests, 20 per connection
        rng = random.Random(4)
        requests = _malformed(rng)
        errors: dict[str, int] = {}
        for i in range(0, len(requests), 20):
            conn = Conn(sock, timeout=10)
            try:
                for raw in requests[i:i + 20]:
                    conn.send(raw)
                    if raw == b"\n":
                        continue  # blank lines are skipped, like a keep-alive
                    reply = conn.line()
                    assert reply["ok"] is False, (raw[:80], reply)
                    errors[reply["error"]["code"]] = errors.get(reply["error"]["code"], 0) + 1
            finally:
                conn.close()
            # FUSE and other clients keep being served meanwhile
            if i % 200 == 0:
                assert (d.path("alice.cern.ch") / "README").read_text()
                assert ok(call(d, "status"))["pid"] == d.pid
        assert set(errors) <= {"bad_request", "unsupported_version", "unknown_command",
                               "invalid_name"}, errors
        assert errors.get("invalid_name") and errors.get("bad_request")

        # oversized lines: an error, then the connection is closed
        for size in (control.MAX_LINE, control.MAX_LINE * 4):
            conn = Conn(sock, timeout=10)
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    conn.send(b'{"cmd": "status", "pad": "' + b"x" * size + b'"}\n')
                assert conn.line()["error"]["code"] == "too_large"
                with pytest.raises((EOFError, ConnectionResetError)):
                    conn.line()
            finally:
                conn.close()
        # an exactly-at-the-limit line is still a request
        pad = control.MAX_LINE - len(b'{"cmd": "status", "id": ""}\n')
        conn = Conn(sock)
        try:
            conn.send(b'{"cmd": "status", "id": "' + b"y" * pad + b'"}\n')
            assert conn.line()["ok"] is True
        finally:
            conn.close()

        # a brand-new lookup works while the slow clients hang on
        assert (d.path("atlas.cern.ch") / "README").exists()
    finally:
        stop.set()
        trickler.join()
    # the slow clients are cut off after the read timeout, with a reason
    deadline = time.monotonic() + control.READ_TIMEOUT + 10
    cut = 0
    for s in slow:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            data = s.recv(65536)
            if b'"timeout"' in data or not data:
                cut += 1
        s.close()
    assert cut == 50

    # nothing changed state: the same repositories, and only the one new lookup booted
    after = {r["name"]: r for r in ok(call(d, "list", details=False))["repositories"]}
    for repo in before:
        assert after[repo["name"]]["state"] == repo["state"]
        assert after[repo["name"]]["boots"] == repo["boots"]
    assert set(after) == {r["name"] for r in before} | {"atlas.cern.ch"}
    assert d.env.boots() == [*boots_before, "atlas.cern.ch"]
    assert ok(call(d, "status"))["degraded"] is False


def test_too_many_clients_are_told_so(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon()
    held = [Conn(socket_of(d)) for _ in range(control.MAX_CLIENTS)]
    try:
        for conn in held:  # each one answered, so accepted and counted; they stay open
            assert conn.call("status")["ok"]
        extra = Conn(socket_of(d), timeout=10)
        try:
            reply = extra.call("status")
        finally:
            extra.close()
        assert reply["error"]["code"] == "overloaded"
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 60
    while True:  # the held connections are gone: served again
        reply = call(d, "status")
        if reply["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ok(reply)["pid"] == d.pid


def test_socket_file_lifecycle(start_daemon, env) -> None:  # type: ignore[no-untyped-def]
    # a stale socket from a daemon that died is replaced
    run_dir = env.tmp / "run"
    run_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run_dir / "cvmfsd.sock"))
    stale.close()
    d = start_daemon()
    assert ok(call(d, "status"))["pid"] == d.pid
    # a clean stop removes it
    assert d.stop() == 0
    assert not (run_dir / "cvmfsd.sock").exists()
    # something else at the path is never removed: the daemon serves, degraded, and says why
    other = env.tmp / "not-a-socket"
    other.write_text("keep me\n")
    d2 = start_daemon(control_socket=str(other))
    assert (d2.path("alice.cern.ch") / "README").exists()
    event = d2.events("service_unavailable")[0]
    assert event["service"] == "status socket" and "not a socket" in event["error"]
    assert other.read_text() == "keep me\n"
