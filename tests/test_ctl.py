"""cvmfsctl as a subprocess against a running daemon: output, --json and exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, Daemon, toml_config

from cvmfsd.admin import ctl


def cvmfsctl(d: Daemon | Path, *args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    sock = d if isinstance(d, Path) else d.run_dir / "cvmfsd.sock"
    return subprocess.run([sys.executable, "-m", "cvmfsd.admin.ctl", "--socket", str(sock), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})})


def as_json(out: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(out.stdout)


def test_status_output_and_exit_codes(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon(backoff_initial=300.0, backoff_max=300.0)
    out = cvmfsctl(d, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"● cvmfsd — {d.root}"
    assert "State: running" in out.stdout and f"PID: {d.pid}" in out.stdout
    assert "0 mounted, 0 failed" in out.stdout
    assert "\033[" not in out.stdout  # piped: plain

    assert (d.path("alice.cern.ch") / "README").exists()
    d.wait_mounted("alice.cern.ch")
    d.env.add_repo("broken.cern.ch")
    d.env.repo_config("broken.cern.ch", CVMFS_STANDIN_FAIL="4")
    with contextlib.suppress(OSError):
        os.stat(d.path("broken.cern.ch") / "README")
    out = cvmfsctl(d, "status")
    assert out.returncode == 3, out.stdout  # a repository is failing
    alice = next(line for line in out.stdout.splitlines() if "alice.cern.ch" in line)
    assert alice.startswith("● alice.cern.ch") and "mounted" in alice
    pid = int(os.getxattr(d.path("alice.cern.ch"), "user.pid"))
    assert f"pid {pid}" in alice and "revision 1" in alice and "1 boot" in alice
    broken = out.stdout.splitlines().index(next(
        line for line in out.stdout.splitlines() if "broken.cern.ch" in line))
    assert out.stdout.splitlines()[broken].startswith(ctl.FAILED_GLYPH + " broken.cern.ch")
    error_line = out.stdout.splitlines()[broken + 1]
    assert "Error: cvmfs2 exited 4 (failed to mount)" in error_line
    assert "(4 - failed to mount)" in error_line  # cvmfs2's own stderr line
    assert "1 repository failed" in out.stdout

    # only the named ones count for the exit code; unknown names exit 4
    assert cvmfsctl(d, "status", "alice.cern.ch").returncode == 0
    out = cvmfsctl(d, "status", "nosuch.cern.ch")
    assert out.returncode == 4 and "not known" in out.stdout

    # --json, before or after the command
    for args in (["--json", "status"], ["status", "--json"]):
        out = cvmfsctl(d, *args)
        data = as_json(out)
        assert out.returncode == 3
        assert data["status"]["pid"] == d.pid
        by_name = {r["name"]: r for r in data["repositories"]}
        assert by_name["broken.cern.ch"]["last_error"]["exit_code"] == 4
        assert "(4 - failed to mount)" in by_name["broken.cern.ch"]["last_error"]["stderr"]
        assert by_name["alice.cern.ch"]["serving_pid"] == pid

    # colour on request (a TTY gets it by default), none with NO_COLOR unless forced
    coloured = cvmfsctl(d, "--color=always", "status")
    assert "\033[0;1;32m●\033[0m alice.cern.ch" in coloured.stdout
    assert "\033[0;1;31m" + ctl.FAILED_GLYPH in coloured.stdout
    assert "\033[" not in cvmfsctl(d, "status", env={"NO_COLOR": "1"}).stdout


def test_list_mount_umount_reload_probe(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon()
    out = cvmfsctl(d, "list")
    assert out.returncode == 0 and "No repositories known" in out.stdout

    out = cvmfsctl(d, "mount", "alice.cern.ch", "atlas.cern.ch")
    assert out.returncode == 0, out.stderr
    assert "Mounted alice.cern.ch (pid " in out.stdout and "revision 1" in out.stdout
    assert "Already mounted: alice.cern.ch" in cvmfsctl(d, "mount", "alice.cern.ch").stdout

    out = cvmfsctl(d, "list")
    assert out.returncode == 0
    rows = [line for line in out.stdout.splitlines() if ".cern.ch" in line]
    assert len(rows) == 2 and all(row.startswith("● ") and "mounted" in row for row in rows)
    listed = as_json(cvmfsctl(d, "list", "--json"))
    assert {r["name"] for r in listed["repositories"]} == {"alice.cern.ch", "atlas.cern.ch"}

    out = cvmfsctl(d, "mount", "missing.cern.ch")
    assert out.returncode == 1
    assert "missing.cern.ch: cvmfs2 exited 16 (file catalog)" in out.stderr
    out = cvmfsctl(d, "mount", "not_a_repo")
    assert out.returncode == 1 and "not a repository name" in out.stderr

    # busy: refused (exit 1), then forced
    with open(d.path("atlas.cern.ch") / "README"):
        out = cvmfsctl(d, "umount", "atlas.cern.ch")
        assert out.returncode == 1 and "busy" in out.stderr
        out = cvmfsctl(d, "umount", "--force", "atlas.cern.ch")
        assert out.returncode == 0 and "Unmounted atlas.cern.ch" in out.stdout
    out = cvmfsctl(d, "umount", "alice.cern.ch", "--json")
    assert out.returncode == 0 and as_json(out)[0]["result"]["changed"] is True
    assert "was not mounted" in cvmfsctl(d, "umount", "alice.cern.ch").stdout

    out = cvmfsctl(d, "reload")
    assert out.returncode == 0 and out.stdout.strip() == "Reloaded: no changes"
    (d.env.tmp / "cvmfsd-0.toml").write_text(toml_config(d.env, root="/elsewhere"))
    out = cvmfsctl(d, "reload")
    assert out.returncode == 1
    assert "root cannot change while cvmfsd runs" in out.stderr

    out = cvmfsctl(d, "probe", "cms.cern.ch", "missing.cern.ch")
    assert out.returncode == 3
    assert f"Probing {d.root}/cms.cern.ch... OK" in out.stdout
    assert f"Probing {d.root}/missing.cern.ch... Failed!" in out.stdout
    assert cvmfsctl(d, "probe", "cms.cern.ch").returncode == 0


def test_connection_and_usage_errors(tmp_path: Path) -> None:
    out = cvmfsctl(tmp_path / "nothing.sock", "status")
    assert out.returncode == 1 and "is cvmfsd running?" in out.stderr
    out = cvmfsctl(tmp_path / "nothing.sock", "--json", "status")
    assert out.returncode == 1 and as_json(out)["ok"] is False
    out = cvmfsctl(tmp_path / "nothing.sock", "frobnicate")
    assert out.returncode == 1 and "invalid choice" in out.stderr
    out = cvmfsctl(tmp_path / "nothing.sock", "mount")
    assert out.returncode == 1


def test_socket_found_from_config(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("CVMFSCTL_SOCKET", raising=False)
    cfg = tmp_path / "cvmfsd.toml"
    cfg.write_text('run_dir = "/run/x"\n')
    assert ctl.socket_path(None, cfg) == Path("/run/x/cvmfsd.sock")
    cfg.write_text('run_dir = "/run/x"\ncontrol_socket = "/run/y.sock"\n')
    assert ctl.socket_path(None, cfg) == Path("/run/y.sock")
    assert ctl.socket_path("/z.sock", cfg) == Path("/z.sock")
    monkeypatch.setenv("CVMFSCTL_SOCKET", "/env.sock")
    assert ctl.socket_path(None, cfg) == Path("/env.sock")
    monkeypatch.delenv("CVMFSCTL_SOCKET")
    cfg.write_text('root = "/cvmfs"\n')  # neither key: the default socket
    assert ctl.socket_path(None, cfg) == ctl.DEFAULT_SOCKET
    # a file named with -c must exist (tests/test_config.py: and parse, with the right types)
    with pytest.raises(ctl.CtlError, match="does not exist"):
        ctl.socket_path(None, tmp_path / "missing.toml")


def test_span() -> None:
    assert ctl.span(0) == "0s"
    assert ctl.span(65) == "1min 5s"
    assert ctl.span(7300) == "2h 1min"
    assert ctl.span(90000) == "1 day 1h"
    assert ctl.span(3 * 86400) == "3 days"


def test_restart_in_place(start_daemon) -> None:  # type: ignore[no-untyped-def]
    d = start_daemon()
    assert (d.path("alice.cern.ch") / "README").exists()
    pid = int(os.getxattr(d.path("alice.cern.ch"), "user.pid"))
    before = as_json(cvmfsctl(d, "--json", "status"))["status"]
    out = cvmfsctl(d, "restart")
    assert out.returncode == 0, out.stderr
    assert f"Restarted cvmfsd in place (pid {d.pid}," in out.stdout
    assert "1 repositories kept mounted" in out.stdout
    after = as_json(cvmfsctl(d, "--json", "status"))
    assert after["status"]["pid"] == d.pid and after["status"]["instance"] != before["instance"]
    alice, = after["repositories"]
    assert alice["state"] == "mounted" and alice["serving_pid"] == pid  # taken over
    assert (d.path("alice.cern.ch") / "README").exists()
    assert d.env.boots().count("alice.cern.ch") == 1


def test_list_no_details(start_daemon) -> None:  # type: ignore[no-untyped-def]
    """--no-details: what the registry knows, without asking the mounts (revision, proxy,
    cache stay unknown); the default asks them."""
    d = start_daemon()
    assert (d.path("alice.cern.ch") / "README").exists()
    d.wait_mounted("alice.cern.ch")  # the registry says mounted once the mount is recorded
    pid = int(os.getxattr(d.path("alice.cern.ch"), "user.pid"))
    full, = as_json(cvmfsctl(d, "--json", "list"))["repositories"]
    assert full["details_known"] is True and full["revision"] == 1
    assert full["proxy"] == "DIRECT" and full["cache_used_bytes"] is not None
    out = cvmfsctl(d, "--json", "list", "--no-details")
    assert out.returncode == 0
    bare, = as_json(out)["repositories"]
    assert bare["details_known"] is False
    assert bare["revision"] is None and bare["proxy"] is None
    assert bare["cache_used_bytes"] is None
    assert bare["state"] == "mounted" and bare["serving_pid"] == pid
    # the table: the revision column shows what is known
    row, = [line.split() for line in cvmfsctl(d, "list").stdout.splitlines()
            if "alice.cern.ch" in line]
    bare_row, = [line.split() for line in cvmfsctl(d, "list", "--no-details").stdout
                 .splitlines() if "alice.cern.ch" in line]
    assert row[4] == "1" and bare_row[4] == "-"
    assert row[:4] == bare_row[:4] == ["●", "alice.cern.ch", "mounted", str(pid)]


def test_restart_that_does_not_come_back_exits_1(start_daemon) -> None:  # type: ignore[no-untyped-def]
    """The re-executed daemon reads its configuration again; made invalid meanwhile, the new
    instance refuses to start (exit 2), and cvmfsctl restart says so with exit 1."""
    d = start_daemon()
    (d.env.tmp / "cvmfsd-0.toml").write_text(toml_config(d.env, mount_timeout=-1))
    out = cvmfsctl(d, "restart", "--timeout", "10")
    assert out.returncode == 1
    assert "cvmfsd did not come back within 10 s" in out.stderr
    assert d.proc.wait(timeout=60) == 2
    assert "mount_timeout must be > 0" in d.log_path.read_text()
