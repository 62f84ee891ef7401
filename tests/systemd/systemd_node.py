"""A node with cvmfsd installed as the README says, inside a booted container
(nspawn_machine.Machine), and what the tests ask of it: systemctl, the journal, the unit's
cgroup, mounts and cvmfs2 processes as the container sees them.

The node is set up like a production one, with the stand-in where the cvmfs package would be:
/usr/bin/cvmfs2 (a wrapper that logs each launch and runs cvmfs2_probe.py, which becomes the
stand-in), /etc/cvmfs/default.local pointing at a local repository server, a `cvmfs` user, and
cvmfsd/cvmfsctl in /usr/local/bin as `pip install .` would put them. The configuration is the
example file from systemd/ unchanged: cvmfs2 at /usr/bin/cvmfs2, the node's /etc/cvmfs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cvmfs2_probe import DENIED_DEVICE, DENIED_DEVICE_NUMBERS
from nspawn_machine import REPO_ROOT, Machine

HERE = Path(__file__).resolve().parent
UNIT = "cvmfsd.service"
DROPINS = Path("/etc/systemd/system/cvmfsd.service.d")
CONFIG = Path("/etc/cvmfsd/cvmfsd.toml")
EXAMPLE = REPO_ROOT / "systemd" / "cvmfsd.toml.example"
ROOT = "/cvmfs"
STANDIN_MARK = "/cvmfs2_standin/cvmfs2.py"
T = TypeVar("T")


def readme_install_commands() -> str:
    """The shell block under "Install the unit" in the README, as an admin would paste it."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("**Install the unit**")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block, "no ```sh block after **Install the unit** in README.md"
    return block.group(1)


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60) -> T:
    """Poll until check() gives something true; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Reader:
    proc: subprocess.Popen[bytes]
    progress: Path
    stop: Path

    def state(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.progress.read_text())
        return {"ops": 0, "failures": 0, "errors": [], "done": False}

    def ops(self) -> int:
        return int(self.state()["ops"])


@dataclass
class Node:
    machine: Machine
    state: Path  # bound read-write at the same path in the container
    readers: list[Reader] = field(default_factory=list)
    _reader_ids: Iterator[int] = field(default_factory=itertools.count)

    # --- setup ------------------------------------------------------------------------------
    @property
    def server(self) -> Path:
        return self.state / "server"

    @property
    def boots_log(self) -> Path:
        return self.state / "boots.log"

    @property
    def probes(self) -> Path:
        return self.state / "probes"

    def provision(self) -> None:
        """What a node has before the README's steps: cvmfsd installed, the cvmfs package."""
        python = sys.executable
        bindir = Path(python).parent  # the .venv's scripts, as `pip install .` makes them
        self.probes.mkdir(exist_ok=True)
        wrapper = self.machine.path("/usr/bin/cvmfs2")
        wrapper.write_text(
            "#!/bin/sh\n"
            "# The cvmfs2 stand-in, with a record of every launch and of its sandbox.\n"
            f'echo "$$ $*" >> {shlex.quote(str(self.boots_log))}\n'
            f"exec {shlex.quote(python)} {shlex.quote(str(HERE / 'cvmfs2_probe.py'))} "
            f'{shlex.quote(str(self.probes))} "$@"\n')
        wrapper.chmod(0o755)
        etc = self.machine.path("/etc/cvmfs")
        etc.mkdir(exist_ok=True)
        # As the cvmfs-config-default package does: every boot reads the config repository
        # under the root (read before default.local, so it cannot be set there).
        (etc / "default.d").mkdir(exist_ok=True)
        (etc / "default.d" / "50-cern.conf").write_text(
            "CVMFS_CONFIG_REPOSITORY=cvmfs-config.cern.ch\n")
        (etc / "default.local").write_text(
            f"CVMFS_SERVER_URL=file://{self.server}/@fqrn@\nCVMFS_HTTP_PROXY=DIRECT\n")
        self.machine.sh(
            "set -e\n"
            f"ln -s {bindir}/cvmfsd /usr/local/bin/cvmfsd\n"
            f"ln -s {bindir}/cvmfsctl /usr/local/bin/cvmfsctl\n"
            "useradd --system --no-create-home --shell /usr/sbin/nologin cvmfs\n"
            # The cvmfs package's workspace, which cvmfs2 writes after dropping to the user.
            "install -d -o cvmfs -g cvmfs -m 0755 /var/lib/cvmfs /run/cvmfs\n"
            f"mknod {DENIED_DEVICE} c {DENIED_DEVICE_NUMBERS[0]} {DENIED_DEVICE_NUMBERS[1]}\n")

    def install_as_readme_says(self) -> subprocess.CompletedProcess[str]:
        return self.machine.run(["sh", "-ex", "-c", f"cd {REPO_ROOT}\n" +
                                 readme_install_commands()], check=False)

    # --- systemctl and the journal ------------------------------------------------------------
    def systemctl(self, *args: str, check: bool = True,
                  timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return self.machine.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def active(self) -> bool:
        return self.show("ActiveState")["ActiveState"] in ("active", "reloading", "activating")

    def cursor(self) -> str:
        out = self.machine.run(["journalctl", "--quiet", "--lines=0", "--show-cursor"]).stdout
        return out.strip().removeprefix("-- cursor: ")

    def journal(self, after: str | None = None) -> list[dict[str, Any]]:
        """The unit's journal entries: systemd's messages about it and the daemon's output."""
        # Not --after-cursor: together with --unit, systemd 252's journalctl drops the first
        # matching entry after the cursor. The cursor's monotonic time (one boot) does it.
        since = -1
        if after:
            mark = re.search(r"\bm=([0-9a-f]+)", after)
            assert mark, after
            since = int(mark.group(1), 16)
        args = ["journalctl", f"--unit={UNIT}", "--output=json", "--no-pager"]
        entries = []
        for line in self.machine.run(args).stdout.splitlines():
            entry = json.loads(line)
            if int(entry["__MONOTONIC_TIMESTAMP"]) <= since:
                continue
            message = entry.get("MESSAGE")
            if isinstance(message, list):  # non-UTF-8 messages come as byte arrays
                entry["MESSAGE"] = bytes(message).decode(errors="replace")
            entries.append(entry)
        return entries

    def messages(self, after: str | None = None) -> list[str]:
        return [e.get("MESSAGE", "") for e in self.journal(after)]

    def events(self, name: str, after: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines with this event name."""
        out = []
        for message in self.messages(after):
            with contextlib.suppress(ValueError):
                record = json.loads(message)
                if isinstance(record, dict) and record.get("event") == name:
                    out.append(record)
        return out

    # journald takes in systemd's messages and the unit's output on its own schedule: a verb
    # returning does not mean what it caused is in the journal yet. These wait for it.
    def wait_events(self, name: str, after: str | None = None,
                    count: int = 1) -> list[dict[str, Any]]:
        """The daemon's lines with this event name, once at least `count` are there."""
        def enough() -> list[dict[str, Any]] | None:
            found = self.events(name, after)
            return found if len(found) >= count else None
        return wait_for(f"{count} '{name}' lines in the journal", enough)

    def wait_said(self, after: str | None, *texts: str, any_of: Sequence[str] = ()) -> str:
        """The unit's journal as one text, once it holds every text and one of any_of."""
        def said() -> str | None:
            text = "\n".join(self.messages(after))
            if all(t in text for t in texts) and (not any_of or any(t in text for t in any_of)):
                return text
            return None
        return wait_for(f"the journal to say {[*texts, *any_of]}", said)

    def wait_notified(self, field: str, after: str) -> list[str]:
        return wait_for(f"systemd's log of {field}", lambda: self.notified(field, after))

    @contextlib.contextmanager
    def debug_log(self) -> Iterator[None]:
        """systemd logs the notifications it gets (READY=1, RELOADING=1, STOPPING=1, ...) and
        the unit's state changes only at debug level."""
        self.machine.run(["systemd-analyze", "log-level", "debug"])
        try:
            yield
        finally:
            self.machine.run(["systemd-analyze", "log-level", "info"])

    def notified(self, field: str, after: str) -> list[str]:
        """sd_notify messages from the unit's processes that carry field, as systemd logged
        them (under debug_log)."""
        return [m for m in self.messages(after)
                if m.startswith("cvmfsd.service: Got notification message") and field in m]

    # --- what the container sees ------------------------------------------------------------
    def mounts(self, pid: int = 1) -> list[tuple[str, str]]:
        """(mount point, fs type) at or under /cvmfs in pid's mount namespace."""
        out = []
        for line in self.machine.path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            point = left.split()[4]
            if point == ROOT or point.startswith(ROOT + "/"):
                out.append((point, right.split()[0]))
        return out

    def repo_mounts(self) -> set[str]:
        return {p.rsplit("/", 1)[1] for p, kind in self.mounts() if p != ROOT}

    def cvmfs2(self) -> dict[int, str]:
        """Live stand-in processes in the container: pid -> repository."""
        procs = {}
        for entry in self.machine.path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().decode().split("\0")[:-1]
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                if any(a.endswith(STANDIN_MARK) for a in argv):
                    procs[int(entry.name)] = argv[-2]
        return procs

    def cvmfs2_by_repo(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for pid, repo in self.cvmfs2().items():
            out.setdefault(repo, []).append(pid)
        return {repo: sorted(pids) for repo, pids in out.items()}

    def unit_pids(self) -> set[int]:
        group = self.show("ControlGroup")["ControlGroup"]
        if not group:
            return set()
        # Read from inside: cgroup.procs gives pids as the reader's pid namespace sees them.
        out = self.machine.run(["cat", f"/sys/fs/cgroup{group}/cgroup.procs"], check=False)
        return {int(p) for p in out.stdout.split()}

    def boots(self) -> list[str]:
        """Repositories cvmfs2 was launched for, one entry per launch."""
        if not self.boots_log.exists():
            return []
        return [line.split()[-2] for line in self.boots_log.read_text().splitlines() if line]

    def probe_reports(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.probes.glob("[0-9]*.json"))]

    def read(self, path: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """cat inside the container: never from the host's own thread, a stopped FUSE
        server would make it wait."""
        return self.machine.run(["cat", path], check=False, timeout=timeout)

    # --- configuration --------------------------------------------------------------------------
    def write_config(self, text: str) -> None:
        self.machine.path(CONFIG).write_text(text)

    def example_config(self, **replace: str) -> str:
        """The example file with some `key = value` lines replaced (values verbatim TOML)."""
        text = EXAMPLE.read_text()
        for key, value in replace.items():
            text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
            assert n == 1, key
        return text

    def dropin(self, name: str, text: str) -> None:
        directory = self.machine.path(DROPINS)
        directory.mkdir(exist_ok=True)
        (directory / name).write_text(text)

    def remove_dropins(self) -> None:
        directory = self.machine.path(DROPINS)
        if directory.is_dir():
            for path in directory.iterdir():
                path.unlink()

    def unmount_mode(self) -> None:
        """What the README says for stop mode "unmount": `systemctl edit cvmfsd`, an empty
        ExecStart= and the same command without --stop-mode handover (what `systemctl edit`
        writes: override.conf)."""
        start = self.show("ExecStart")["ExecStart"]
        argv = re.search(r"argv\[\]=([^;]*);", start)
        assert argv and "--stop-mode handover" in argv.group(1), start
        command = argv.group(1).strip().replace(" --stop-mode handover", "")
        self.dropin("override.conf", f"[Service]\nExecStart=\nExecStart={command}\n")

    # --- a clean slate between tests ----------------------------------------------------------
    def reset(self) -> None:
        """cvmfsd stopped, nothing mounted, no cvmfs2, the example configuration, no drop-ins.
        What a test left running is handed over to a daemon in unmount mode and stopped: the
        same path as the stop test, so a broken stop shows here too."""
        self.stop_readers()
        self.write_config(EXAMPLE.read_text())
        self.remove_dropins()
        self.systemctl("daemon-reload")
        if self.active() or self.mounts() or self.cvmfs2():
            self.unmount_mode()
            self.systemctl("daemon-reload")
            self.systemctl("reset-failed", UNIT, check=False)
            self.systemctl("restart", UNIT)
            self.systemctl("stop", UNIT)
            self.remove_dropins()
            self.systemctl("daemon-reload")
        self.systemctl("reset-failed", UNIT, check=False)
        for report in self.probes.glob("*.json"):
            report.unlink()
        assert not self.active(), self.show("ActiveState")
        assert self.mounts() == [], self.mounts()
        assert self.cvmfs2() == {}, self.cvmfs2()

    # --- readers ----------------------------------------------------------------------------
    def start_reader(self, repos: list[str], pod: bool = False) -> Reader:
        n = next(self._reader_ids)
        stop = self.state / f"reader-{n}.stop"
        progress = self.state / f"reader-{n}.json"
        reader = [sys.executable, str(HERE / "reader.py")]
        if pod:
            view = self.state / f"podview-{n}"
            view.mkdir()
            args = ["unshare", "--mount", "--propagation", "slave", *reader, "pod", ROOT,
                    str(view)]
        else:
            args = [*reader, "host", ROOT]
        proc = self.machine.popen([*args, str(stop), str(progress), *repos],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        r = Reader(proc, progress, stop)
        self.readers.append(r)
        return r

    def readers_advance(self, by: int = 25, timeout: float = 60) -> None:
        """Until every reader did `by` more operations than now (or failed)."""
        marks = [(r, r.ops()) for r in self.readers]
        for r, mark in marks:
            wait_for(f"reader {r.progress.name} to read on",
                     lambda r=r, mark=mark: r.ops() >= mark + by or r.proc.poll() is not None,
                     timeout)
            assert r.proc.poll() is None, r.proc.stderr and r.proc.stderr.read()

    def stop_readers(self) -> list[dict[str, Any]]:
        results = []
        for r in self.readers:
            r.stop.touch()
        for r in self.readers:
            try:
                r.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                # nsenter forked the reader into the container's pid namespace: end that one.
                pid = r.state().get("pid")
                if pid:
                    with contextlib.suppress(AssertionError):
                        self.machine.kill(int(pid), "KILL")
                r.proc.wait(timeout=60)
            results.append(r.state())
        self.readers = []
        return results


@contextlib.contextmanager
def journal_on_failure(node: Node) -> Iterator[str]:
    """Yields a journal cursor; the unit's journal since then is printed at the end. Pytest shows
    a fixture's captured output only for a test that failed (an exception raised in a test never
    reaches its fixture's generator, so the journal cannot wait for one)."""
    cursor = node.cursor()
    try:
        yield cursor
    finally:
        with contextlib.suppress(Exception):
            print("--- journalctl -u cvmfsd since the test began ---")
            print("\n".join(node.messages(cursor)[-80:]))
