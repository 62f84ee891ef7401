"""sd_notify: a test plays systemd on a NOTIFY_SOCKET and watches READY, STATUS, WATCHDOG and
STOPPING; the watchdog is fed only while the FUSE root really answers."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import Daemon, mounts_under

from cvmfsd.admin.notify import Notifier


def _root_mounted(root: Path) -> bool:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == str(root) and right.split()[0] == "fuse.cvmfsd":
            return True
    return False


@dataclass
class Message:
    index: int  # arrival order = send order (one datagram socket)
    fields: dict[str, str]
    root_mounted: bool
    root_listed: bool


@dataclass
class Systemd:
    """The receiving end of NOTIFY_SOCKET, like systemd's: one datagram per message.

    A thread receives as messages arrive (to look at the root the moment READY comes);
    drain() takes whatever is still queued, so after the test saw a log line it has every
    message the daemon sent before writing it."""

    address: str
    root: Path
    sock: socket.socket
    messages: list[Message] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _receive_queued(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            mounted = listed = False
            if "READY" in fields:  # what does the world see when READY arrives?
                mounted = _root_mounted(self.root)
                with contextlib.suppress(OSError):
                    os.listdir(self.root)
                    listed = True
            self.messages.append(Message(len(self.messages), fields, mounted, listed))

    def run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                with self.lock:
                    self._receive_queued()

    def drain(self) -> list[Message]:
        with self.lock:
            self._receive_queued()
            return list(self.messages)

    def with_key(self, key: str, after: int = -1) -> list[Message]:
        return [m for m in self.drain() if key in m.fields and m.index > after]

    def wait_for(self, predicate: Any, timeout: float = 60.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.drain():
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


def _reload_pair(systemd: Systemd, after: int) -> list[str]:
    """The RELOADING/READY messages sent after message number `after`, in order."""
    return [("RELOADING" if "RELOADING" in m.fields else "READY") for m in systemd.drain()
            if m.index > after and ("RELOADING" in m.fields or "READY" in m.fields)]


def test_ready_status_watchdog_stopping(start_daemon, systemd: Systemd, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # a ping every 0.2 s
    d: Daemon = start_daemon()
    ready = systemd.wait_for(lambda m: m.fields.get("READY") == "1")
    # READY only once the root was mounted and answered a listing (test_ready_waits_for_the_
    # root_to_answer proves the order with a root that does not answer)
    assert ready.root_mounted and ready.root_listed
    assert ready.fields["STATUS"].startswith("0 mounted, 0 failed, 0 booting under ")
    assert all(m.index > ready.index for m in systemd.with_key("WATCHDOG"))

    # STATUS follows what is mounted
    assert (d.path("alice.cern.ch") / "README").exists()
    systemd.wait_for(lambda m: m.fields.get("STATUS", "").startswith("1 mounted, 0 failed"))

    # WATCHDOG keeps coming after READY (its period, a third of WATCHDOG_USEC, is
    # test_notifier_addresses'; status reports what systemd asked for)
    systemd.wait_for(lambda m: len(systemd.with_key("WATCHDOG", after=ready.index)) >= 3)
    status = d.call("status")["result"]
    assert status["systemd"] == {"notify": True, "watchdog_usec": 600000}
    assert d.events("admin_ready")[0]["watchdog_s"] == 0.6

    # an in-place restart (re-exec, same pid): RELOADING=1, then READY=1 from the new instance
    instance = status["instance"]
    assert d.call("restart")["result"]["restarting"] is True
    reloading = systemd.wait_for(lambda m: m.fields.get("RELOADING") == "1")
    assert int(reloading.fields["MONOTONIC_USEC"]) > 0
    ready_again = systemd.wait_for(lambda m: m.fields.get("READY") == "1" and
                                   m.index > reloading.index)
    assert ready_again.root_listed
    d.wait_ready(2)
    assert d.call("status")["result"]["instance"] != instance
    assert d.call("status")["result"]["pid"] == d.pid
    assert not systemd.with_key("STOPPING")

    # STOPPING=1 at the start of a clean stop; no pings after it
    assert d.stop() == 0
    stopping, = systemd.with_key("STOPPING")  # the process is gone: everything has arrived
    assert "Stopping" in stopping.fields["STATUS"]
    assert systemd.with_key("WATCHDOG", after=stopping.index) == []


def test_reload_and_sighup_say_reloading_then_ready(start_daemon, systemd: Systemd) -> None:  # type: ignore[no-untyped-def]
    """systemd's Type=notify contract around `systemctl reload`: RELOADING=1 (with
    MONOTONIC_USEC) when it starts, READY=1 when it is over, also when it was refused."""
    d: Daemon = start_daemon()
    first = systemd.wait_for(lambda m: m.fields.get("READY") == "1")
    config_file = d.env.tmp / "cvmfsd-0.toml"
    good = config_file.read_text()

    mark = systemd.drain()[-1].index
    assert d.call("reload")["ok"]  # the reply comes after both messages were sent
    assert _reload_pair(systemd, mark) == ["RELOADING", "READY"]
    reloading = systemd.with_key("RELOADING", after=mark)[0]
    assert int(reloading.fields["MONOTONIC_USEC"]) > 0

    # refused (invalid, or a restart-only key): still READY again, the old configuration runs
    for bad in ("mount_timeout = -1\n", good.replace(str(d.root), str(d.env.tmp / "other"))):
        config_file.write_text(bad)
        mark = systemd.drain()[-1].index
        assert d.call("reload")["error"]["code"] == "reload_failed"
        assert _reload_pair(systemd, mark) == ["RELOADING", "READY"]

    # SIGHUP: the same, and the log line says how it went
    config_file.write_text(good.replace("mount_timeout = 20.0", "mount_timeout = 21.0"))
    mark = systemd.drain()[-1].index
    os.kill(d.pid, signal.SIGHUP)
    d.wait_for("the SIGHUP reload", lambda: d.events("sighup_reload"))
    assert d.events("sighup_reload")[0]["changed"] == ["mount_timeout"]
    assert _reload_pair(systemd, mark) == ["RELOADING", "READY"]
    assert first.index < mark and d.proc.poll() is None


def test_ready_waits_for_the_root_to_answer(tmp_path: Path) -> None:
    """READY=1 must not come before the root answers a listing. The admin surface runs here
    on a root that the test controls: it does not exist (every check fails) until the test
    creates it, so the fake knows the root's state at the moment READY arrives."""
    from cvmfsd.admin.service import Admin
    from cvmfsd.config import Config
    from cvmfsd.core.children import Children
    from cvmfsd.core.fs import RootOperations
    from cvmfsd.core.mounter import Mounter
    from cvmfsd.core.registry import Registry
    from cvmfsd.core.upkeep import Upkeep

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    root = tmp_path / "root"
    cfg = Config(root=root, run_dir=tmp_path / "run", cvmfs2=Path("/bin/false"),
                 snapshot_dir=tmp_path / "snapshots")
    cfg.run_dir.mkdir()
    registry = Registry(cfg.backoff_initial, cfg.backoff_max)
    mounter = Mounter(cfg, registry, Children())
    admin = Admin(cfg, registry, mounter, RootOperations(cfg, registry, mounter),
                  Upkeep(cfg, registry, mounter),
                  notifier=Notifier(str(tmp_path / "notify")))
    seen: list[tuple[dict[str, str], bool]] = []

    def drain() -> None:
        while True:
            try:
                data = receiver.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            seen.append((fields, root.is_dir()))

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admin.run)
            with trio.fail_after(60):
                while admin.liveness.consecutive_failures < 5:
                    await trio.sleep(0.01)
            drain()  # everything sent before the 5th failed check
            assert not [f for f, _ in seen if "READY" in f], seen
            root.mkdir()
            with trio.fail_after(60):
                while not [f for f, _ in seen if "READY" in f]:
                    await trio.sleep(0.01)
                    drain()
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        receiver.close()
    ready = [(f, root_there) for f, root_there in seen if "READY" in f]
    assert ready == [(ready[0][0], True)]
    assert admin.liveness.ok is True


def test_slow_boots_do_not_take_the_root(start_daemon, systemd: Systemd, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Four times more readers than FUSE tasks wait for a slow boot: they wait in the kernel, on
    the repository's own mount (made before cvmfs2 starts), not in the root's handlers, so the
    root keeps answering, the daemon is not degraded and the watchdog keeps being fed."""
    monkeypatch.setenv("WATCHDOG_USEC", "900000")
    d: Daemon = start_daemon(fuse_max_tasks=8, mount_timeout=120.0)
    gate = d.env.shared / "open-slow"  # where cvmfs2, dropped to its user, can look
    d.env.add_repo("slow.cern.ch")
    d.env.repo_config("slow.cern.ch", CVMFS_STANDIN_BOOT_GATE=str(gate))
    systemd.wait_for(lambda m: "WATCHDOG" in m.fields)

    results: list[Any] = []

    def reader() -> None:
        try:
            results.append((d.path("slow.cern.ch") / "README").read_text())
        except OSError as exc:
            results.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(32)]
    try:
        # The first reader starts the boot; the others come once the repository's own mount
        # is in place (the moment before it, requests wait in the root, shared out by
        # requester: more than that share would rightly get EAGAIN).
        threads[0].start()
        d.wait_for("the repository's mount in place",
                   lambda: str(d.path("slow.cern.ch")) in mounts_under(d.root))
        for t in threads[1:]:
            t.start()
        d.wait_for("the boot held at its gate", lambda: d.call("status")["result"][
            "repositories"]["booting"] == 1)
        # the root answers (a listing always reaches the daemon) while the readers wait; it
        # lists the booting name, whose mount is in place
        assert os.listdir(d.root) == ["slow.cern.ch"]
        status = d.call("status")["result"]
        assert status["degraded"] is False and status["repositories"]["booting"] == 1, status
        mark = systemd.drain()[-1].index
        systemd.wait_for(lambda m: "WATCHDOG" in m.fields and m.index > mark)
        assert d.mount_attempts("slow.cern.ch") == []  # all of that while the boot was held
    finally:
        gate.touch()
        for t in threads:
            t.join(timeout=120)
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

    from cvmfsd.admin.notify import Liveness
    from cvmfsd.core.registry import Registry

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
    assert d.call("status")["result"]["systemd"] == {"notify": False, "watchdog_usec": None}


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
