"""sd_notify: a test plays systemd on a NOTIFY_SOCKET and watches READY, STATUS, WATCHDOG and
STOPPING; the watchdog is fed only while the FUSE root really answers."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

from cvmfsd.notify import Notifier


def _root_mounted(root: Path) -> bool:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == str(root) and right.split()[0] == "fuse.cvmfsd":
            return True
    return False


@dataclass
class Message:
    at: float
    fields: dict[str, str]
    root_mounted: bool
    root_listed: bool


@dataclass
class Systemd:
    """The receiving end of NOTIFY_SOCKET, like systemd's: one datagram per message."""

    address: str
    root: Path
    sock: socket.socket
    messages: list[Message] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            mounted = listed = False
            if "READY" in fields:  # what does the world see at the moment of READY?
                mounted = _root_mounted(self.root)
                with contextlib.suppress(OSError):
                    os.listdir(self.root)
                    listed = True
            self.messages.append(Message(time.monotonic(), fields, mounted, listed))

    def with_key(self, key: str) -> list[Message]:
        return [m for m in self.messages if key in m.fields]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if predicate(message):
                    return message
            time.sleep(0.02)
        raise AssertionError(f"no such message in {[m.fields for m in self.messages]}")


@pytest.fixture
def systemd(env, monkeypatch) -> Iterator[Systemd]:  # type: ignore[no-untyped-def]
    name = f"cvmfsd-test-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # an abstract socket, written '@name' in the environment
    fake = Systemd("@" + name, env.tmp / "cvmfs", sock)
    thread = threading.Thread(target=fake.run, daemon=True)
    thread.start()
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    yield fake
    fake.stop.set()
    thread.join()
    sock.close()


def test_ready_status_watchdog_stopping(start_daemon, systemd: Systemd, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # a ping every 0.2 s
    d: Daemon = start_daemon()
    ready = systemd.wait_for(lambda m: m.fields.get("READY") == "1")
    # READY only once the root was mounted and answered a listing
    assert ready.root_mounted and ready.root_listed
    assert ready.fields["STATUS"].startswith("0 mounted, 0 failed, 0 booting under ")
    assert not [m for m in systemd.messages if m.at < ready.at and "WATCHDOG" in m.fields]

    # STATUS follows what is mounted
    assert (d.path("alice.cern.ch") / "README").exists()
    systemd.wait_for(lambda m: m.fields.get("STATUS", "").startswith("1 mounted, 0 failed"))

    # WATCHDOG pings at about a third of the interval
    time.sleep(1.5)
    pings = [m.at for m in systemd.with_key("WATCHDOG")]
    assert len(pings) >= 5
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.6, gaps

    # status reports the systemd side
    status = _status(d)
    assert status["systemd"] == {"notify": True, "watchdog_usec": 600000}

    # an in-place restart (re-exec, same pid): RELOADING=1, then READY=1 from the new instance
    instance = status["instance"]
    assert _call(d, "restart")["restarting"] is True
    reloading = systemd.wait_for(lambda m: m.fields.get("RELOADING") == "1")
    assert int(reloading.fields["MONOTONIC_USEC"]) > 0
    ready_again = systemd.wait_for(lambda m: m.fields.get("READY") == "1" and m.at > reloading.at,
                                   timeout=30)
    assert ready_again.root_listed
    assert _status(d)["instance"] != instance and _status(d)["pid"] == d.pid
    assert not [m for m in systemd.messages if "STOPPING" in m.fields]

    # STOPPING=1 at the start of a clean stop; no pings after it
    assert d.stop() == 0
    stopping = systemd.wait_for(lambda m: m.fields.get("STOPPING") == "1")
    assert "Stopping" in stopping.fields["STATUS"]
    assert not [m for m in systemd.messages if m.at > stopping.at and "WATCHDOG" in m.fields]


def test_slow_boots_do_not_take_the_root(start_daemon, systemd: Systemd, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Four times more readers than FUSE tasks wait for a slow boot: they wait in the kernel, on
    the repository's own mount (made before cvmfs2 starts), not in the root's handlers, so the
    root keeps answering, the daemon is not degraded and the watchdog keeps being fed."""
    monkeypatch.setenv("WATCHDOG_USEC", "900000")
    d: Daemon = start_daemon(fuse_max_tasks=8)
    d.env.add_repo("slow.cern.ch")
    d.env.repo_config("slow.cern.ch", CVMFS_STANDIN_BOOT_DELAY="4")
    systemd.wait_for(lambda m: "WATCHDOG" in m.fields)

    results: list[Any] = []

    def reader() -> None:
        try:
            results.append((d.path("slow.cern.ch") / "README").read_text())
        except OSError as exc:
            results.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(32)]
    for t in threads:
        t.start()
    # Every reader is waiting once the booting mount holds their requests.
    deadline = time.monotonic() + 30
    while _status(d)["repositories"]["booting"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    during = time.monotonic()
    assert os.listdir(d.root) == []  # the root answers (a listing always reaches the daemon)
    status = _status(d)
    assert status["degraded"] is False and status["repositories"]["booting"] == 1, status
    systemd.wait_for(lambda m: "WATCHDOG" in m.fields and m.at > during)
    for t in threads:
        t.join(timeout=60)
    assert results == ["hello from the repository\n"] * 32, results
    assert not d.events("root_not_answering")


def test_liveness_fails_on_a_root_that_does_not_answer(tmp_path: Path) -> None:
    """What feeds the watchdog: a listing of the root through its FUSE server. Against a real
    FUSE mount whose server is stopped, the check fails within its bound (one thread stuck,
    not one per check) and passes again once the server runs."""
    import sys

    import trio

    sys.path.insert(0, str(Path(__file__).parent / "csi"))
    from csi_harness import StandinRoot

    from cvmfsd.notify import Liveness
    from cvmfsd.registry import Registry

    root = StandinRoot(tmp_path).start()
    try:
        liveness = Liveness(Registry(1.0, 1.0), root.path, timeout=0.5)

        async def main() -> list[tuple[bool, dict[str, object]]]:
            seen = [(await liveness.check(), liveness.as_dict())]
            root.pause()
            seen += [(await liveness.check(), liveness.as_dict()) for _ in range(3)]
            root.resume()
            with trio.fail_after(30):
                while not await liveness.check():
                    await trio.sleep(0.1)
            seen.append((True, liveness.as_dict()))
            return seen

        seen = trio.run(main)
    finally:
        root.close()
    assert seen[0][0] is True
    for ok, state in seen[1:4]:
        assert ok is False and state["threads_stuck"] == 1, state
    assert "took longer than 0.5 s" in str(seen[1][1]["error"])
    assert "has not returned" in str(seen[2][1]["error"])
    assert seen[-1][1]["ok"] is True and seen[-1][1]["consecutive_failures"] == 0


def test_without_systemd(start_daemon, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    d = start_daemon()
    assert _status(d)["systemd"] == {"notify": False, "watchdog_usec": None}


def test_notifier_addresses(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2)
    environ = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000",
               "WATCHDOG_PID": str(os.getpid())}
    notifier = Notifier.from_environment(environ)
    assert notifier.enabled and notifier.watchdog_period == pytest.approx(1.0)
    notifier.status("a\nmulti  line")
    assert receiver.recv(100) == b"STATUS=a multi line"
    notifier.close()
    receiver.close()
    # the watchdog belongs to another process: ignored
    other = Notifier.from_environment({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "5",
                                       "WATCHDOG_PID": "1"})
    assert other.watchdog_period is None
    # nothing listening: sending fails quietly
    assert other.send(READY=1) is False
    # not under systemd: a no-op
    none = Notifier.from_environment({})
    assert not none.enabled and none.send(READY=1) is False
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1"}
    assert Notifier.from_environment(env, unset=True).address == "\0x" and env == {}


def _status(d: Daemon) -> dict[str, Any]:
    return _call(d, "status")


def _call(d: Daemon, cmd: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(d.run_dir / "cvmfsd.sock"))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(65536)
    reply = json.loads(data)
    assert reply["ok"], reply
    return reply["result"]
