"""The README's main command: `cvmfsd demo` works as written and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_demo_runs_and_cleans_up() -> None:
    result = subprocess.run([sys.executable, "-m", "cvmfsd", "demo"], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    listings = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("$ ls ")]
    assert listings == ["(empty)", "demo.cern.ch sft.cern.ch"]
    assert "Welcome to demo.cern.ch" in result.stdout
    assert "hello from /cvmfs/demo.cern.ch/bin/hello" in result.stdout
    assert lines[-1].endswith("exit 0, mounts left under the demo root: 0")
