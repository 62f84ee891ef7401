"""cvmfsd itself, started as tests/conftest.py does: `python -m cvmfsd run -c cfg.toml`, JSON logs
on stderr, ready when the `"event": "ready"` line appears. Idle expiry is off while measuring
(expire_timeout = 0); every other setting is the default unless a scenario overrides it."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common import PY, stop_process, umount_below
from ..workspace import Workspace
from .base import System


class Cvmfsd(System):
    name = "cvmfsd"

    def __init__(self, ws: Workspace, tag: str = "", src: Path | None = None,
                 **overrides: Any) -> None:
        super().__init__(ws, tag)
        # Where `python -m cvmfsd` runs from (bench.profile compares two revisions at once).
        self.src = src or ws.src
        self.run_dir = self.dir / "run"
        self.overrides = overrides
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "cvmfsd.log"
        self.config_path = self.dir / "cvmfsd.toml"
        self._log_offset = 0
        self._log_rest = b""
        self._ready_count = 0

    def config(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "root": str(self.mount_dir), "run_dir": str(self.run_dir),
            "cvmfs2": str(self.backend.cvmfs2),
            "cvmfs2_config": [str(p) for p in self.backend.configs],
            "log_format": "json", "expire_timeout": 0,
        }
        values.update(self.overrides)
        return values

    def setup(self, repos: Sequence[str] = ()) -> None:
        self.write_config()
        self._spawn(self.src)
        self.wait_ready(1)

    def write_config(self) -> None:
        self.config_path.write_text(
            "\n".join(f"{k} = {json.dumps(v)}" for k, v in self.config().items()) + "\n")

    def _spawn(self, src: Path) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([PY, "-m", "cvmfsd", "run", "-c", str(self.config_path)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         cwd=src, env=self.ws.src_env(src))

    def readies(self) -> int:
        """"ready" lines in the log so far (one per start, re-exec included). Reads only what
        was added since the last call: cheap enough to poll while others are measured."""
        with open(self.log, "rb") as f:
            f.seek(self._log_offset)
            data = self._log_rest + f.read()
        cut = data.rfind(b"\n") + 1
        self._log_offset += len(data) - len(self._log_rest)
        self._log_rest = data[cut:]
        self._ready_count += data[:cut].count(b'"event": "ready"')
        return self._ready_count

    def wait_ready(self, count: int, timeout: float = 60.0, poll: float = 0.01) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.readies() < count:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cvmfsd exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cvmfsd not ready: {self.log.read_text()[-2000:]}")
            time.sleep(poll)

    def restart(self, how: str, src: Path | None = None) -> dict[str, float]:
        """Restart the daemon the way `how` says, and return when the new one is ready:
        graceful (SIGTERM with stop_mode handover, then a new process), crash (SIGKILL, then a
        new process), upgrade (SIGTERM, then a new process from src: other code), reexec
        (SIGUSR2: the same pid execs itself). Times (CLOCK_MONOTONIC) of each step."""
        assert self.proc is not None
        count = self.readies() + 1
        times = {"begin": time.monotonic()}
        if how == "reexec":
            self.proc.send_signal(signal.SIGUSR2)
        else:
            self.proc.send_signal(signal.SIGKILL if how == "crash" else signal.SIGTERM)
            self.proc.wait(timeout=90)
            times["old_exited"] = time.monotonic()
            self._spawn(src or self.src)
        self.wait_ready(count)
        times["ready"] = time.monotonic()
        return times

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        if not self.log.exists():
            return out
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if name is None or record.get("event") == name:
                out.append(record)
        return out

    def mount_attempts(self, repo: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.events("mount") if repo is None or r.get("repo") == repo]

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def teardown(self) -> list[str]:
        for record in self.mount_attempts():
            if record.get("serving_pid"):
                self.serving_pids.add(int(record["serving_pid"]))
        if self.proc is not None:
            # SIGTERM: cvmfsd unmounts every repository, stops their cvmfs2, unmounts its root.
            stop_process(self.proc, signal.SIGTERM, timeout=90)
        leaked = self._finish()
        leaked += umount_below(self.run_dir)  # the private staging tmpfs, if it was left
        return leaked

    def version(self) -> str:
        with contextlib.suppress(Exception):
            out = subprocess.run([PY, "-c", "import cvmfsd; print(cvmfsd.__version__)"],
                                 capture_output=True, text=True, cwd=self.ws.src,
                                 env=self.ws.src_env()).stdout
            return out.strip()
        return "?"

    def info(self) -> dict[str, Any]:
        cfg = {k: v for k, v in self.config().items() if k not in ("root", "run_dir", "cvmfs2",
                                                                    "cvmfs2_config")}
        return {"name": self.name, "version": self.version(), "config": cfg}


__all__ = ["Cvmfsd"]
