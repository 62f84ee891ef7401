"""The Prometheus endpoint: off by default, loopback, parses with the text-format parser, and
its counters move with mounts, failures and heals."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon
from prometheus_client.parser import text_string_to_metric_families

from cvmfsd import __version__
from cvmfsd.admin import metrics
from cvmfsd.config import Config

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(port: int, path: str = "/metrics") -> Samples:
    """sample name -> {sorted labels: value}, through the reference parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict[str, Any], name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def port_of(d: Daemon) -> int:
    event, = d.events("metrics_listening")
    assert event["host"] == "127.0.0.1"
    return int(event["port"])


def wait_until(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_metrics_off_by_default_and_loopback() -> None:
    assert Config().metrics_address is None
    assert Config(metrics_listen="9757").metrics_address == ("127.0.0.1", 9757)


def test_metrics_counters_move(start_daemon) -> None:  # type: ignore[no-untyped-def]
    # port 0: the kernel picks
    d = start_daemon(metrics_listen="0", backoff_initial=300.0, backoff_max=300.0)
    port = port_of(d)
    m = scrape(port)
    assert value(m, "cvmfsd_mounts_total") == 0
    assert value(m, "cvmfsd_heals_total") == 0
    assert value(m, "cvmfsd_repositories", state="mounted") == 0
    assert value(m, "cvmfsd_root_answers") == 1 and value(m, "cvmfsd_degraded") == 0
    assert value(m, "cvmfsd_start_time_seconds") > 1.7e9
    assert value(m, "cvmfsd_info", version=__version__, root=str(d.root)) == 1
    assert value(m, "cvmfsd_fuse_internal_errors_total") == 0

    # a mount: counters, per-repository series and the latency histogram
    assert (d.path("alice.cern.ch") / "README").exists()
    d.wait_mounted("alice.cern.ch")
    m = scrape(port)
    assert value(m, "cvmfsd_mounts_total") == 1
    assert value(m, "cvmfsd_repository_mounts_total", repository="alice.cern.ch") == 1
    assert value(m, "cvmfsd_repository_boots_total", repository="alice.cern.ch") == 1
    assert value(m, "cvmfsd_repository_state", repository="alice.cern.ch", state="mounted") == 1
    assert value(m, "cvmfsd_repository_state", repository="alice.cern.ch", state="idle") == 0
    assert value(m, "cvmfsd_mount_duration_seconds_count", result="mounted") == 1
    assert value(m, "cvmfsd_mount_duration_seconds_bucket", result="mounted", le="+Inf") == 1
    assert 0 < value(m, "cvmfsd_mount_duration_seconds_sum", result="mounted") < 20

    # failures by cvmfs2 exit code
    d.env.add_repo("broken.cern.ch")
    d.env.repo_config("broken.cern.ch", CVMFS_STANDIN_FAIL="4")
    for name in ("broken.cern.ch", "missing.cern.ch"):
        with pytest.raises(OSError):
            os.stat(d.path(name) / "README")
    m = scrape(port)
    assert value(m, "cvmfsd_mount_failures_total", exit_code="4", reason="BootFailed") == 1
    assert value(m, "cvmfsd_mount_failures_total", exit_code="16", reason="BootFailed") == 1
    assert value(m, "cvmfsd_mount_duration_seconds_count", result="failed") == 2
    assert value(m, "cvmfsd_repositories", state="failed") == 2
    assert value(m, "cvmfsd_repository_consecutive_failures", repository="broken.cern.ch") == 1

    # a heal: the backend dies, the dead mount is detached; the next access mounts again
    pid = int(os.getxattr(d.path("alice.cern.ch"), "user.pid"))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: value(scrape(port), "cvmfsd_heals_total") == 1)
    assert (d.path("alice.cern.ch") / "README").exists()
    wait_until(lambda: value(scrape(port), "cvmfsd_mounts_total") == 2)
    m = scrape(port)
    assert value(m, "cvmfsd_repository_mounts_total", repository="alice.cern.ch") == 2
    assert value(m, "cvmfsd_repository_boots_total", repository="alice.cern.ch") == 2

    # status socket requests are counted too
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(d.run_dir / "cvmfsd.sock"))
        s.sendall(b'{"cmd": "status"}\n{"cmd": "nope"}\n')
        replies = b""
        while replies.count(b"\n") < 2:  # both answered, so both counted
            replies += s.recv(1 << 20)
    m = scrape(port)
    assert value(m, "cvmfsd_control_requests_total", command="status", result="ok") >= 1
    assert value(m, "cvmfsd_control_requests_total", command="invalid",
                 result="unknown_command") == 1

    # anything but GET /metrics
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
    assert exc.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=10)
    assert exc.value.code == 405
    # a client that sends nothing does not hold up others
    with socket.create_connection(("127.0.0.1", port)):
        assert value(scrape(port), "cvmfsd_mounts_total") == 2


def test_metrics_port_in_use_degrades_not_fails(start_daemon) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = start_daemon(metrics_listen=f"127.0.0.1:{port}")
        assert (d.path("alice.cern.ch") / "README").exists()  # the root is served
        assert d.events("service_unavailable")[0]["service"] == "metrics endpoint"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(d.run_dir / "cvmfsd.sock"))
            s.sendall(b'{"cmd": "status"}\n')
            status = json.loads(s.recv(1 << 20))["result"]
        assert status["degraded"] is True
        assert any("metrics endpoint unavailable" in p for p in status["problems"])
    # the port is free again: the endpoint comes up at the next retry, the daemon is healthy
    d.wait_for("the metrics endpoint", lambda: d.events("service_available"))
    assert value(scrape(port), "cvmfsd_degraded") == 0
    assert d.call("status")["result"]["degraded"] is False


def test_per_repository_series_are_capped_busy_ones_first(start_daemon, env) -> None:  # type: ignore[no-untyped-def]
    """1,003 repositories known: 1,001 failed ones (a scan of made-up names), one mounted
    that sorts last by name, one idle that sorts first. The per-repository series stop at
    1,000 and keep the mounted one; the counts by state are not capped."""
    # cvmfs2 for the made-up names: fails at once, like a repository that does not exist
    fast = env.tmp / "cvmfs2-fast-fail"
    fast.write_text('#!/bin/sh\ncase "$3" in a[0-9]*.cern.ch)\n'
                    '  echo "Failed to initialize root file catalog (16 - file catalog '
                    'failure)" >&2; exit 16;;\nesac\n'
                    f'exec {env.cvmfs2} "$@"\n')
    fast.chmod(0o755)
    env.add_repo("zeta.cern.ch")
    env.add_repo("a.cern.ch")  # sorts before all the others
    d = start_daemon(metrics_listen="0", cvmfs2=str(fast), backoff_initial=300.0,
                     backoff_max=300.0, max_mounted=0, expire_timeout=0,
                     requester_failed_boots=0)  # one requester fails 1,001 names
    port = port_of(d)
    assert (d.path("zeta.cern.ch") / "README").exists()
    assert (d.path("a.cern.ch") / "README").exists()
    assert d.call("umount", name="a.cern.ch")["ok"]  # known, idle
    names = [f"a{i:04d}.cern.ch" for i in range(1001)]

    errnos: dict[int, int] = {}

    def look(chunk: list[str]) -> None:
        for name in chunk:
            with pytest.raises(OSError) as exc:
                os.stat(d.path(name))
            errnos[exc.value.errno or 0] = errnos.get(exc.value.errno or 0, 0) + 1

    threads = [threading.Thread(target=look, args=(names[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    d.wait_for("every attempt logged", lambda: len(d.mount_attempts()) == 1001 + 2)
    # What a user gets is test_failures'; here only the count matters. (Lookups running in
    # parallel on main's new core also got ESTALE: printed, reported.)
    print(f"\nerrnos of 1,001 parallel lookups of missing repositories: {errnos}")
    assert sum(errnos.values()) == 1001
    m = scrape(port)
    shown = {dict(labels)["repository"] for labels in m["cvmfsd_repository_state"]}
    assert len(shown) == metrics.MAX_REPOSITORY_SERIES == 1000
    assert "zeta.cern.ch" in shown  # mounted: kept, though its name sorts last
    assert "a.cern.ch" not in shown  # idle ones are dropped first, though it sorts first
    assert value(m, "cvmfsd_repository_series_dropped") == 3
    assert len(m["cvmfsd_repository_boots_total"]) == 1000
    assert value(m, "cvmfsd_repositories", state="failed") == 1001
    assert value(m, "cvmfsd_repositories", state="mounted") == 1
    assert value(m, "cvmfsd_repositories", state="idle") == 1


def test_info_and_internal_errors_series(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """cvmfsd_info names the version and root; an unexpected exception in a FUSE handler
    (answered EIO) counts in cvmfsd_fuse_internal_errors_total and degrades the daemon. The
    handler is called directly with an argument no kernel would send: the one way to make it
    raise something unexpected without a bug to find."""
    import pyfuse3
    import trio
    from prometheus_client.exposition import generate_latest

    from cvmfsd.admin.notify import Notifier
    from cvmfsd.admin.service import Admin
    from cvmfsd.core.children import Children
    from cvmfsd.core.fs import RootOperations
    from cvmfsd.core.mounter import Mounter
    from cvmfsd.core.registry import ROOT_INODE, Registry
    from cvmfsd.core.upkeep import Upkeep

    cfg = Config(root=tmp_path / "root", run_dir=tmp_path / "run", cvmfs2=Path("/bin/false"),
                 snapshot_dir=tmp_path / "snapshots")
    registry = Registry(cfg.backoff_initial, cfg.backoff_max)
    mounter = Mounter(cfg, registry, Children())
    ops = RootOperations(cfg, registry, mounter)
    admin = Admin(cfg, registry, mounter, ops, Upkeep(cfg, registry, mounter),
                  notifier=Notifier(None))
    prom = metrics.build(admin)

    def samples() -> Samples:
        out: Samples = {}
        for family in text_string_to_metric_families(generate_latest(prom).decode()):
            for sample in family.samples:
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = (
                    sample.value)
        return out

    m = samples()
    assert value(m, "cvmfsd_info", version=__version__, root=str(cfg.root)) == 1
    assert value(m, "cvmfsd_fuse_internal_errors_total") == 0
    assert value(m, "cvmfsd_degraded") == 0

    async def broken_request() -> None:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.lookup(ROOT_INODE, "not bytes", None)  # type: ignore[arg-type]
        assert exc.value.errno == errno.EIO

    trio.run(broken_request)
    m = samples()
    assert value(m, "cvmfsd_fuse_internal_errors_total") == 1
    assert value(m, "cvmfsd_degraded") == 1
    assert admin.status()["fuse_internal_errors"] == 1
    assert "1 unexpected errors in FUSE handlers (see the log)" in admin.status()["problems"]


HOLDER = """
import socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
print("held", flush=True)
time.sleep(60)
"""


def test_a_local_user_cannot_hold_every_scrape_slot(start_daemon) -> None:  # type: ignore[no-untyped-def]
    """Another local user opens every client slot and sends nothing: slots are shared out by
    local user (the owner of the peer socket), so the scraper's requests still get answers."""
    import shutil
    import subprocess
    import sys

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to act as another user")
    d: Daemon = start_daemon(metrics_listen="0")
    port = port_of(d)
    holders = [subprocess.Popen(
        ["setpriv", "--reuid=1001", "--regid=1001", "--clear-groups", sys.executable, "-c",
         HOLDER, str(port), str(metrics.MAX_CLIENTS)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)]
    try:
        for h in holders:
            assert h.stdout is not None and h.stdout.readline().strip() == "held"
        for _ in range(5):
            assert value(scrape(port), "cvmfsd_root_answers") == 1
    finally:
        for h in holders:
            h.kill()
            h.wait()


def test_metrics_token(start_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With metrics_token_file, /metrics answers only a request with the bearer token."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d: Daemon = start_daemon(metrics_listen="0", metrics_token_file=str(token))
    port = port_of(d)
    with pytest.raises(urllib.error.HTTPError) as exc:
        scrape(port)
    assert exc.value.code == 401
    wrong = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                   headers={"Authorization": "Bearer nope"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(wrong, timeout=10)
    assert exc.value.code == 401
    right = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                   headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(right, timeout=10) as reply:
        assert b"cvmfsd_root_answers" in reply.read()
