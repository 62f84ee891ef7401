"""Who else uses a repository, and which views of repositories are dead: the namespace scan of
docs/views.md, section B.

`umount2(<root>/<path>, 0)` refuses a busy repository only for the copies in the root's own
propagation tree: the host's mount and the copies below whole-root views. A per-repository or
pinned volume, a kubelet subPath bind, a pod's copy of either, or a whole-root view that is
rprivate is a mount of the repository's device elsewhere, and umount2 never looks at it. So
before an idle expiry or a `cvmfsctl umount` without --force, every mount namespace is scanned
(unique namespaces from /proc/*/ns/mnt, one mountinfo read each) for mounts of the repository's
device. A mount found there is a **use** unless

1. its parent is a copy of the daemon's root in the root's propagation tree (`fuse.cvmfsd`,
   tagged `shared:G` or `master:G` with G the live root's peer group, or a group of slaves of
   it, found from `shared:K master:G` in any namespace): umount2 counts it;
2. its parent is an old root layer, overmounted at its own root (a view made before a takeover
   keeps one per restart): unreachable by path, so only a process that is already inside uses
   it. It counts when a process of that namespace has its working directory (or, outside the
   daemon's own namespace, an open file) at or below its mount point;
3. it is below the daemon's staging directory (its own staging and anchor mounts, or a copy of
   them in a namespace made while they existed).

The same scan finds **stale views**: visible mounts (not overmounted, not under an old root
layer) of a device the daemon once served and serves no more, e.g. a subPath below a
repository's root after a heal, or a pod's copy whose connection is gone.

The scan runs in one worker thread at a time, with a deadline; a scan that does not finish in
time (or cannot start because an abandoned one still runs) is incomplete, and an incomplete scan
means busy: nothing is ever expired on doubt.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from . import kernel, rootmount
from .lifecycle import Event, State
from .registry import Registry, Repo

log = structlog.get_logger("cvmfsd.usage")

Dev = tuple[int, int]

# Seconds a scan may take before it counts as incomplete (views.md B: 0.1-0.2 s measured with
# 200 namespaces of about 130 mounts on a loaded 2-core machine).
SCAN_TIMEOUT = 5.0
# Seconds a scan stays good enough for `cvmfsctl status` (never for an unmount decision).
STATUS_MAX_AGE = 5.0
# Devices the daemon once served are remembered across restarts (run_dir is kept) so that views
# of them can be reported as stale; at most this many.
MAX_KNOWN = 4096
_ROOT_FSTYPE = rootmount.FSTYPE.encode()


@dataclass(frozen=True)
class View:
    """One mount of a repository's device in some mount namespace."""

    dev: Dev
    ns: int           # the namespace's inode (as in `ls -Li /proc/<pid>/ns/mnt`)
    pid: int          # a process in it
    mountpoint: str   # as that namespace sees it
    root: str         # the directory of the repository it shows ("/": its root)
    held: bool = False  # under an old root layer, with a process inside

    def where(self) -> str:
        shows = "" if self.root == "/" else f" (showing {self.root})"
        return f"{self.mountpoint}{shows} in mount namespace {self.ns} (pid {self.pid})"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dev"] = f"{self.dev[0]}:{self.dev[1]}"
        return out


@dataclass
class Scan:
    """What one scan saw, for the devices it was asked about."""

    devices: frozenset[Dev]
    live: frozenset[Dev] = frozenset()  # served when the scan began
    uses: dict[Dev, list[View]] = field(default_factory=dict)   # rules 1-3 applied
    visible: dict[Dev, list[View]] = field(default_factory=dict)  # for stale views
    complete: bool = False
    error: str | None = None
    namespaces: int = 0
    pids: int = 0
    mountinfo_bytes: int = 0
    duration_ms: float = 0.0
    taken_at: float = 0.0   # time.monotonic()

    def summary(self) -> dict[str, Any]:
        return {"complete": self.complete, "error": self.error, "namespaces": self.namespaces,
                "pids": self.pids, "duration_ms": self.duration_ms,
                "age_s": round(time.monotonic() - self.taken_at, 1) if self.taken_at else None}


# --- one namespace's mount table ------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    mount_id: bytes
    parent: bytes
    dev: Dev
    root: bytes
    mountpoint: bytes
    fstype: bytes
    tags: frozenset[bytes]


def _parse(text: bytes) -> dict[bytes, _Row]:
    rows = {}
    for line in text.split(b"\n"):
        left, sep, right = line.partition(b" - ")
        fields = left.split(b" ")
        if not sep or len(fields) < 6:
            continue
        major, _, minor = fields[2].partition(b":")
        try:
            dev = (int(major), int(minor))
        except ValueError:
            continue
        rows[fields[0]] = _Row(fields[0], fields[1], dev, _unescape(fields[3]),
                               _unescape(fields[4]), right.split(b" ", 1)[0],
                               frozenset(fields[6:]))
    return rows


def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def root_groups(rows: dict[bytes, _Row], root: bytes) -> frozenset[bytes]:
    """Peer group ids of the live root: the top cvmfsd mount at the root path."""
    covered = {(r.parent, r.mountpoint) for r in rows.values()}
    groups = set()
    for row in rows.values():
        if row.mountpoint == root and row.fstype == _ROOT_FSTYPE and \
                (row.mount_id, row.mountpoint) not in covered:
            groups |= {t.split(b":", 1)[1] for t in row.tags if t.startswith(b"shared:")}
    return frozenset(groups)


_SLAVE_GROUP = re.compile(rb" shared:(\d+) master:(\d+)")


def tree_groups(groups: frozenset[bytes], texts: Iterable[bytes]) -> frozenset[bytes]:
    """The peer groups of the root's whole propagation tree: the root's own, and every group
    whose members are slaves of a group in the tree, in any namespace. A whole-root volume is
    such a group (a slave of the root, and shared with its copies under the kubelet
    directory), and a runtime's `mount --rbind` of it makes the pod's copy a slave of that
    group, not of the root's: umount2 sees the repositories in it all the same."""
    edges = [(slave, master) for text in texts for slave, master in _SLAVE_GROUP.findall(text)]
    tree = set(groups)
    grew = True
    while grew:
        grew = False
        for slave, master in edges:
            if master in tree and slave not in tree:
                tree.add(slave)
                grew = True
    return frozenset(tree)


def classify(rows: dict[bytes, _Row], devs: Collection[Dev], groups: frozenset[bytes],
             staging: bytes) -> list[tuple[_Row, str]]:
    """Each mount of one of devs in this table, with what it is: "tree" (rule 1), "old" (rule
    2: under an old root layer), "staging" (rule 3), "covered" (overmounted at its own root:
    a view healed by a mount stacked on it), or "view"."""
    tags = {b"shared:" + g for g in groups} | {b"master:" + g for g in groups}
    covered = {(r.parent, r.mountpoint) for r in rows.values()}
    out = []
    for row in rows.values():
        if row.dev not in devs:
            continue
        parent = rows.get(row.parent)
        if row.mountpoint == staging or row.mountpoint.startswith(staging + b"/"):
            kind = "staging"
        elif parent is not None and parent.fstype == _ROOT_FSTYPE and \
                (parent.mount_id, parent.mountpoint) in covered:
            kind = "old"
        elif parent is not None and parent.fstype == _ROOT_FSTYPE and parent.tags & tags:
            kind = "tree"
        elif (row.mount_id, row.mountpoint) in covered:
            kind = "covered"
        else:
            kind = "view"
        out.append((row, kind))
    return out


def _inside(path: bytes, mountpoint: bytes) -> bool:
    return path == mountpoint or path.startswith(mountpoint.rstrip(b"/") + b"/")


def _held(pids: Iterable[int], mountpoints: list[bytes], with_fds: bool,
          deadline: float) -> bool | None:
    """Does a process have its cwd (or an open file) at or below one of mountpoints? None when
    the deadline passed first. Paths are read from the /proc links, which name a process's
    files as its own namespace shows them (like the mount points in its mountinfo)."""
    for pid in pids:
        if time.monotonic() > deadline:
            return None
        links = [f"/proc/{pid}/cwd"]
        if with_fds:
            with contextlib.suppress(OSError):
                links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        for link in links:
            try:
                target = os.readlink(link).encode(errors="surrogateescape")
            except OSError:
                continue
            if any(_inside(target, mp) for mp in mountpoints):
                return True
    return False


# --- the scan -------------------------------------------------------------------------------
def scan(devices: Collection[Dev], live: Collection[Dev], root: Path, staging: Path,
         deadline: float) -> Scan:
    """Blocking (a worker thread). devices: every device to report on; live: those that are
    served now (uses are looked for; the others are looked at for stale views only)."""
    started = time.monotonic()
    result = Scan(frozenset(devices), frozenset(live), taken_at=started)
    if not devices:
        result.complete = True
        return result
    own_ns = os.stat("/proc/self/ns/mnt").st_ino
    own = _read(Path("/proc/self/mountinfo"))
    groups = root_groups(_parse(own), os.fsencode(root))
    texts = []
    staging_b = os.fsencode(staging)
    needle = re.compile(b" (?:" + b"|".join(re.escape(f"{a}:{b}".encode())
                                             for a, b in devices) + b") ")
    namespaces: dict[int, list[int]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError as exc:
        result.error = f"cannot list /proc: {exc}"
        return result
    result.pids = len(pids)
    hits: list[tuple[int, int, dict[bytes, _Row]]] = []
    for pid in pids:
        if time.monotonic() > deadline:
            result.error = "deadline passed"
            return _finish(result, started)
        try:
            ino = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        except OSError:
            continue  # exited, or a kernel thread
        if ino in namespaces:
            namespaces[ino].append(pid)
            continue
        namespaces[ino] = [pid]
        if ino == own_ns:
            text = own
        else:
            try:
                text = _read(Path(f"/proc/{pid}/mountinfo"))
            except OSError:
                continue  # exited meanwhile; its namespace may live on in another pid
        result.mountinfo_bytes += len(text)
        texts.append(text)
        if needle.search(text):
            hits.append((ino, pid, _parse(text)))
    result.namespaces = len(namespaces)
    groups = tree_groups(groups, texts)
    for ino, pid, rows in hits:
        old: dict[Dev, list[_Row]] = {}
        for row, kind in classify(rows, devices, groups, staging_b):
            view = View(row.dev, ino, pid, os.fsdecode(row.mountpoint), os.fsdecode(row.root))
            if kind == "view":
                result.visible.setdefault(row.dev, []).append(view)
            if row.dev not in live or kind in ("tree", "staging"):
                continue
            if kind == "old":
                old.setdefault(row.dev, []).append(row)
            else:
                result.uses.setdefault(row.dev, []).append(view)
        for dev, rows_of_dev in old.items():
            held = _held(namespaces.get(ino, [pid]), [r.mountpoint for r in rows_of_dev],
                         with_fds=ino != own_ns, deadline=deadline)
            if held is None:
                result.error = "deadline passed"
                return _finish(result, started)
            if held:
                row = rows_of_dev[0]
                result.uses.setdefault(dev, []).append(View(
                    dev, ino, pid, os.fsdecode(row.mountpoint), os.fsdecode(row.root), True))
    result.complete = True
    return _finish(result, started)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _finish(result: Scan, started: float) -> Scan:
    result.duration_ms = round((time.monotonic() - started) * 1000, 2)
    return result


# --- the daemon's side ----------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    """Whether some repositories are used elsewhere, as far as one fresh scan could tell."""

    scan: Scan
    devs: dict[str, Dev | None]  # repository name -> its device (None: not found)

    def busy(self, name: str) -> bool:
        dev = self.devs.get(name)
        return not self.scan.complete or dev is None or bool(self.scan.uses.get(dev))

    def why(self, name: str) -> str:
        dev = self.devs.get(name)
        if not self.scan.complete:
            return f"the scan of mount namespaces did not finish ({self.scan.error})"
        if dev is None:
            return "its mount's device is not in mountinfo"
        return "used by " + "; ".join(v.where() for v in self.scan.uses.get(dev, []))

    def uses(self, name: str) -> list[View]:
        dev = self.devs.get(name)
        return [] if dev is None else self.scan.uses.get(dev, [])


@dataclass(frozen=True)
class StaleView:
    repository: str
    view: View

    def as_dict(self) -> dict[str, Any]:
        return {"repository": self.repository, **self.view.as_dict()}


class ViewMonitor:
    """The daemon's scans: fresh ones for unmount decisions, a cached one for status; and the
    devices the daemon has served, to tell stale views."""

    def __init__(self, registry: Registry, root: Path, staging: Path,
                 state_file: Path | None = None, timeout: float = SCAN_TIMEOUT) -> None:
        self.registry = registry
        self.root = root
        self.staging = staging
        self.state_file = state_file
        self.timeout = timeout
        # device -> the repository path it served (relative to the root)
        self.known: dict[Dev, str] = {}
        self._known_dirty = False
        self._limiter = trio.CapacityLimiter(1)  # abandoned scans hold it until they end
        self.last: Scan | None = None
        self._refresh: trio.Event | None = None
        if state_file is not None:
            self._load()
        registry.observe(self._on_event)

    # --- devices --------------------------------------------------------------------------
    def _on_event(self, event: Event, repo: Repo, error: object) -> None:
        if event in (Event.BOOTED, Event.ADOPTED) and repo.dev is not None:
            self.learn(repo.dev, repo.path)

    def learn(self, dev: Dev, path: str) -> None:
        if self.known.get(dev) != path:
            self.known[dev] = path
            self._known_dirty = True
            while len(self.known) > MAX_KNOWN:
                self.known.pop(next(iter(self.known)))

    def _load(self) -> None:
        assert self.state_file is not None
        try:
            data = json.loads(self.state_file.read_text())
            for key, path in data.get("devices", {}).items():
                major, minor = key.split(":")
                self.known[(int(major), int(minor))] = str(path)
        except (OSError, ValueError, AttributeError):
            pass

    def _save(self) -> None:
        """Blocking (a worker thread)."""
        if self.state_file is None:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps({"devices": {f"{a}:{b}": p for (a, b), p in
                                                   dict(self.known).items()}}))
            os.replace(tmp, self.state_file)

    async def current(self) -> dict[str, Dev | None]:
        """Device of each repository that holds a mount now: the one the daemon mounted, or,
        for an adopted repository (no device recorded), what mountinfo shows at its path."""
        holding = [r for r in self.registry
                   if r.state in (State.MOUNTED, State.BOOTING, State.UNMOUNTING)]
        entries: list[kernel.MountEntry] | None = None
        if any(r.dev is None for r in holding):
            entries = await trio.to_thread.run_sync(kernel.read_mountinfo)
        out: dict[str, Dev | None] = {}
        for repo in holding:
            dev = repo.dev
            if dev is None and entries is not None:
                at = kernel.mounts_at(str(self.root / repo.path), entries)
                dev = at[-1].dev if at and at[-1].source == "cvmfs2" else None
            out[repo.name] = dev
            if dev is not None:
                self.learn(dev, repo.path)
        return out

    # --- scans ----------------------------------------------------------------------------
    async def _scan(self) -> tuple[Scan, dict[str, Dev | None]]:
        started = trio.current_time()
        current = await self.current()
        live = {d for d in current.values() if d is not None}
        devices = live | set(self.known)
        deadline_mono = time.monotonic() + self.timeout
        result = Scan(frozenset(devices), frozenset(live),
                      error="the previous scan is still running", taken_at=time.monotonic())
        with trio.move_on_at(started + self.timeout):
            result = await trio.to_thread.run_sync(
                scan, devices, live, self.root, self.staging, deadline_mono,
                limiter=self._limiter, abandon_on_cancel=True)
        if not result.complete and result.error is None:
            result.error = f"no answer within {self.timeout:g} s"
        if result.complete:
            # Devices nobody shows any more can go: their numbers may be reused by others.
            seen = {d for views in (*result.uses.values(), *result.visible.values())
                    for d in {v.dev for v in views}}
            for dev in [d for d in self.known if d not in live and d not in seen]:
                del self.known[dev]
                self._known_dirty = True
        if self._known_dirty:
            self._known_dirty = False
            await trio.to_thread.run_sync(self._save)
        self.last = result
        log.debug("usage_scan", **result.summary(), devices=len(devices),
                  mountinfo_bytes=result.mountinfo_bytes)
        return result, current

    async def usage(self, repos: list[Repo]) -> Usage:
        """A fresh scan: which of repos are used elsewhere."""
        result, current = await self._scan()
        return Usage(result, {r.name: current.get(r.name) for r in repos})

    async def refresh(self, max_age: float = STATUS_MAX_AGE) -> Scan | None:
        """The last scan if it is recent, else a new one (concurrent callers share it)."""
        if self.last is not None and time.monotonic() - self.last.taken_at <= max_age:
            return self.last
        if self._refresh is not None:
            await self._refresh.wait()
            return self.last
        self._refresh = trio.Event()
        try:
            await self._scan()
        finally:
            self._refresh.set()
            self._refresh = None
        return self.last

    def stale(self, scan: Scan | None = None) -> list[StaleView]:
        """Visible mounts of devices the daemon served and serves no more, from a scan."""
        scan = scan or self.last
        if scan is None:
            return []
        out = []
        for dev, views in scan.visible.items():
            if dev in scan.live or dev not in self.known:
                continue
            out += [StaleView(self.known[dev], v) for v in views]
        return sorted(out, key=lambda s: (s.repository, s.view.ns, s.view.mountpoint))


__all__ = ["SCAN_TIMEOUT", "Scan", "StaleView", "Usage", "View", "ViewMonitor", "classify",
           "root_groups", "scan"]
