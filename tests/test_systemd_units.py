"""The files in systemd/: `systemd-analyze verify` accepts the unit (and says nothing about it),
the tmpfiles entry applies. (The example configuration: tests/test_config.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT

UNITS = REPO_ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze (package systemd)")


def _installed_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as shipped, with ExecStart/ExecReload pointing at binaries that exist here
    (verify checks that they are executable): the only change."""
    text = (UNITS / "cvmfsd.service").read_text() if text is None else text
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("cvmfsd", "cvmfsctl"):
        (bindir / name).write_text("#!/bin/sh\nexit 0\n")
        (bindir / name).chmod(0o755)
    text = text.replace("/usr/local/bin/", f"{bindir}/")
    unit = tmp_path / "cvmfsd.service"
    unit.write_text(text)
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, cwd=unit.parent)


def _about(out: subprocess.CompletedProcess[str], unit: Path) -> list[str]:
    """verify's complaints about our file (it may also mention the host's own units)."""
    return [line for line in (out.stdout + out.stderr).splitlines()
            if unit.name in line or str(unit) in line]


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = _installed_copy(tmp_path)
    out = _verify(unit)
    assert out.returncode == 0, out.stderr
    # verify reports unknown keys and bad values only as warnings: there must be none
    assert _about(out, unit) == [], out.stderr


@needs_analyze
def test_verify_would_notice_a_broken_unit(tmp_path: Path) -> None:
    """The check above means something: the same verify flags a typo and a bad value."""
    text = (UNITS / "cvmfsd.service").read_text()
    broken = text.replace("KillMode=process", "KillMode=proces").replace(
        "NotifyAccess=main", "NotifyAcess=main")
    out = _verify(_installed_copy(tmp_path, broken))
    complaints = "\n".join(_about(out, tmp_path / "cvmfsd.service"))
    assert "kill mode" in complaints and "NotifyAcess" in complaints


def _service_section() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / "cvmfsd.service").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_choices() -> None:
    """The settings the design depends on (DESIGN.md: restarts, propagation, FUSE)."""
    service = _service_section()
    one = {k: v[-1] for k, v in service.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["KillMode"] == "process"  # cvmfs2 survives a restart of the daemon
    assert one["Restart"] in ("always", "on-failure") and "WatchdogSec" in one
    assert one["DeviceAllow"] == "/dev/fuse rw"
    assert "CAP_SYS_ADMIN" in one["CapabilityBoundingSet"].split()
    assert one["ExecReload"].endswith(" reload")
    assert one["ExecStart"].endswith(" --stop-mode handover")  # restarts hand mounts over
    # No option that gives the service a private mount namespace: mounts must reach the host.
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts"):
        assert one.get(key, "no") == "no", key
    for key in ("ReadOnlyPaths", "InaccessiblePaths", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectProc", "ProtectHostname", "ProtectClock", "MountFlags", "PrivateUsers",
                "PrivateNetwork", "TemporaryFileSystem", "BindPaths", "RootDirectory"):
        assert key not in one, key
    assert one["RuntimeDirectory"] == "cvmfsd" and one["RuntimeDirectoryPreserve"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles")
def test_tmpfiles_entry_applies(tmp_path: Path) -> None:
    out = subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}",
                          str(UNITS / "cvmfsd.tmpfiles")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "cvmfsd").is_dir()
    assert (tmp_path / "run" / "cvmfsd").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "cvmfs").is_dir()
