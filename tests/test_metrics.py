"""The Prometheus endpoint: off by default, loopback, parses with the text-format parser, and
its counters move with mounts, failures and heals."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import Daemon
from prometheus_client.parser import text_string_to_metric_families

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
    d = start_daemon(metrics_listen="0", backoff_initial=30.0)  # port 0: the kernel picks
    port = port_of(d)
    m = scrape(port)
    assert value(m, "cvmfsd_mounts_total") == 0
    assert value(m, "cvmfsd_heals_total") == 0
    assert value(m, "cvmfsd_repositories", state="mounted") == 0
    assert value(m, "cvmfsd_root_answers") == 1 and value(m, "cvmfsd_degraded") == 0
    assert value(m, "cvmfsd_start_time_seconds") > 1.7e9

    # a mount: counters, per-repository series and the latency histogram
    assert (d.path("alice.cern.ch") / "README").exists()
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
    m = scrape(port)
    assert value(m, "cvmfsd_mounts_total") == 2
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
