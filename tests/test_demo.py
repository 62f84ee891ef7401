"""The README's main command: `cvmfsd demo` works as written and leaves nothing behind, from the
source tree and from an installed package in a fresh virtualenv outside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT

# What the package is built from (as images/cvmfsd/Dockerfile copies it): no tests/, no bench/.
SHIPPED = ("pyproject.toml", "README.md", "cvmfsd", "csi", "cvmfs2_standin")


def _check_demo(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    listings = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("$ ls ")]
    assert listings == ["(empty)", "demo.cern.ch sft.cern.ch"]
    assert "Welcome to demo.cern.ch" in result.stdout
    assert "hello from /cvmfs/demo.cern.ch/bin/hello" in result.stdout
    assert lines[-1].endswith("exit 0, mounts left under the demo root: 0")


def test_demo_runs_and_cleans_up() -> None:
    result = subprocess.run([sys.executable, "-m", "cvmfsd", "demo"], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT)
    _check_demo(result)


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory outside the source tree that the cvmfs user can read (the stand-in drops
    root to it, as cvmfs2 does, and then imports the rest of itself)."""
    path = Path(tempfile.mkdtemp(prefix="cvmfsd-installed-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_demo_from_an_installed_package(outside: Path) -> None:
    """`pip install .` into a fresh virtualenv, then `cvmfsd demo` from elsewhere: the package
    ships all the demo needs (the stand-in included). Kept cheap: the venv has no pip and no
    dependencies of its own; a .pth line lends it this venv's site-packages (pyfuse3, trio,
    setuptools, pip), where cvmfsd itself is only an editable finder that a .pth in a borrowed
    directory does not activate, and the package is built without isolation or an index."""
    src = outside / "src"
    src.mkdir()
    for name in SHIPPED:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO_ROOT / name, src / name)
    venv = outside / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True,
                          env=env, timeout=60).stdout.strip()
    lent = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    (Path(site) / "lent-from-the-test-venv.pth").write_text("".join(f"{p}\n" for p in lent))
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--ignore-installed", "--disable-pip-version-check", str(src)],
        capture_output=True, text=True, env=env, cwd=outside, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    shutil.rmtree(src)  # nothing may come from the copy it was built from
    where = subprocess.run(
        [str(python), "-c", "import cvmfsd, cvmfs2_standin, csi; "
         "print(cvmfsd.__file__, cvmfs2_standin.__file__, csi.__file__)"],
        capture_output=True, text=True, env=env, cwd=outside, timeout=60)
    assert where.returncode == 0, where.stderr
    assert all(f.startswith(site + "/") for f in where.stdout.split()), where.stdout
    result = subprocess.run([str(venv / "bin" / "cvmfsd"), "demo"], capture_output=True,
                            text=True, timeout=120, cwd=outside, env=env)
    _check_demo(result)
