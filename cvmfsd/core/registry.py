"""The one registry of repository state: name, inode, lifecycle state, serving process, errors.

Plain data, no I/O. A name keeps one nodeid and generation as long as the kernel knows it
(DESIGN.md §3); inode numbers are never handed to another name.

Bounded by configuration, whatever users look up: every step is O(1) in the number of names
(counters and indexes kept at each state change), names that are refused never become entries,
and names that are not mounted (idle, failed) are kept only up to `max_names`, least recently
used first out. A failed name outlives its entry as long as it is among those, and past them in
a compact store four times as large: its backoff keeps applying when it is looked up again (a
negative cache, like autofs's).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from .children import Tracked
from .errors import MountError
from .lifecycle import Event, State, backoff, crash_loop, may_boot, next_state
from .names import SNAPSHOTS_DIR, Pin

log = structlog.get_logger("cvmfsd.registry")

ROOT_INODE = 1
SNAPSHOTS_INODE = 2  # <root>/.snapshots: pinned instances; not listed in the root
ACTIVE = frozenset({State.BOOTING, State.MOUNTED, State.UNMOUNTING})

Observer = Callable[["Event", "Repo", "MountError | None"], None]


@dataclass(eq=False)
class Repo:
    name: str   # the path component: a repository name, or <fqrn>@<pin> for a snapshot
    inode: int
    fqrn: str = ""
    pin: Pin | None = None
    state: State = State.IDLE
    boots: int = 0
    failures: int = 0              # consecutive
    retry_at: float = 0.0
    last_error: MountError | None = None
    last_error_at: float | None = None
    mounted_since: float | None = None  # wall clock, for status
    mounted_at: float | None = None     # monotonic, for minimum age checks
    process: Tracked | None = None
    deaths: list[float] = field(default_factory=list)  # monotonic times the backend died
    # Idle tracking for expiry: the backend's open counter (xattr user.nopen) and since when
    # it has not changed.
    nopen: int | None = None
    idle_since: float | None = None
    # Set when the current boot settles (mounted or failed); replaced for each boot.
    settled: trio.Event = field(default_factory=trio.Event)
    # Set once the current boot's mount is visible at its path (before cvmfs2 serves it: a
    # process that crosses it then waits in the kernel, not in the daemon); replaced per boot.
    attached: trio.Event = field(default_factory=trio.Event)
    # The daemon's copy of the mount's /dev/fuse descriptor (pre-mounted mode; see fusedev),
    # and the mount's device: None for mounts taken over from a previous daemon.
    fuse_fd: int | None = None
    dev: tuple[int, int] | None = None
    # Who started the current boot, charged for it while the repository holds a mount.
    requester: object = None
    # Set while the kernel is told to forget the name: nothing may be mounted there meanwhile
    # (an invalidated dentry takes its mounts with it, DESIGN.md §4).
    evicting: trio.Event | None = None
    # A clone of the mount that last left the path, for its copies elsewhere to receive the
    # next one (anchor.py); the mounter's, like fuse_fd.
    anchor: Any = None
    # Set while a failed boot's mount is being taken away, until the failure is recorded.
    leaving: trio.Event | None = None
    # A pinned instance's parameters file, in its own workspace (backend.write_pin_config).
    pin_config: Path | None = None

    def __post_init__(self) -> None:
        self.fqrn = self.fqrn or self.name

    @property
    def path(self) -> str:
        """Where it is mounted, relative to the root."""
        return self.name if self.pin is None else f"{SNAPSHOTS_DIR}/{self.name}"

    @property
    def parent_inode(self) -> int:
        return ROOT_INODE if self.pin is None else SNAPSHOTS_INODE

    @property
    def serving_pid(self) -> int | None:
        return (self.process.pid or None) if self.process else None  # 0: never named


class Registry:
    def __init__(self, backoff_initial: float, backoff_max: float, restart_window: float = 60.0,
                 restart_burst: int = 10, max_names: int = 4096) -> None:
        self._by_name: dict[str, Repo] = {}
        self._by_inode: dict[int, Repo] = {}
        # Names that hold no mount, least recently used first: those the kernel knows (also in
        # _by_name) and failed ones it forgot (only here, keeping their backoff).
        self._inactive: OrderedDict[str, Repo] = OrderedDict()
        self._mounted: dict[int, Repo] = {}
        # What the root lists: mounted names, and booting ones whose mount is at their path
        # already (a process may have read through it: it should see the name listed too).
        self._listed: dict[int, Repo] = {}
        # Failed names out of the table: name -> (failures, retry at, errno, exit code,
        # message), least recently used first out.
        self._backoffs: OrderedDict[str, tuple[int, float, int, int | None, str]] = OrderedDict()
        self._counts: dict[State, int] = dict.fromkeys(State, 0)
        self._pins: dict[str, int] = {}  # fqrn -> pinned instances holding a mount
        # requester -> mounts (booting or mounted) it started that are held
        self._held: dict[object, int] = {}
        self.boots_total = 0
        self._next_inode = SNAPSHOTS_INODE + 1
        self._backoff = (backoff_initial, backoff_max)
        self._restart = (restart_window, restart_burst)
        self.max_names = max_names
        # Called when more than max_names are kept (the mounter makes the kernel forget some).
        self.on_excess: Callable[[], None] | None = None
        # Kernel thread ids of the daemon's own mount workers: their FUSE requests are answered
        # at once, never made to wait for the attach they are performing.
        self._own_tids: set[int] = set()
        self._observers: list[Observer] = []
        self._tid_lock = threading.Lock()

    def observe(self, observer: Observer) -> None:
        """Call observer(event, repo, error) after each lifecycle step (metrics, not logic)."""
        self._observers.append(observer)

    def _notify(self, event: Event, repo: Repo, error: MountError | None = None) -> None:
        for observer in self._observers:
            try:
                observer(event, repo, error)
            except Exception:  # an observer must never break the lifecycle
                log.exception("observer_failed", observer=repr(observer))

    # --- the state machine, with every index kept in step ------------------------------------
    def _fire(self, repo: Repo, event: Event) -> None:
        old = repo.state
        new = next_state(old, event)
        repo.state = new
        self._counts[old] -= 1
        self._counts[new] += 1
        if new is State.MOUNTED:
            self._mounted[repo.inode] = self._listed[repo.inode] = repo
        else:
            self._mounted.pop(repo.inode, None)
            if new is not State.BOOTING:
                self._listed.pop(repo.inode, None)
        if repo.pin is not None and (old in ACTIVE) != (new in ACTIVE):
            self._pins[repo.fqrn] = self._pins.get(repo.fqrn, 0) + (1 if new in ACTIVE else -1)
            if not self._pins[repo.fqrn]:
                del self._pins[repo.fqrn]
        if repo.requester is not None and (old in ACTIVE) != (new in ACTIVE):
            held = self._held.get(repo.requester, 0) + (1 if new in ACTIVE else -1)
            if held:
                self._held[repo.requester] = held
            else:
                del self._held[repo.requester]
        if new in ACTIVE:
            self._inactive.pop(repo.name, None)
        else:
            self._inactive[repo.name] = repo
            self._inactive.move_to_end(repo.name)
            if len(self._inactive) > self.max_names and self.on_excess is not None:
                self.on_excess()

    # --- names --------------------------------------------------------------------------------
    def get(self, name: str) -> Repo | None:
        """The entry the kernel knows under this name, if any."""
        return self._by_name.get(name)

    def by_inode(self, inode: int) -> Repo | None:
        return self._by_inode.get(inode)

    def candidate(self, name: str, fqrn: str = "", pin: Pin | None = None) -> Repo:
        """The entry for a name the kernel does not know: a failed one remembered from before
        (its backoff still applies), or a new one. Not registered until begin_boot(): a name
        that is refused never becomes an entry."""
        remembered = self._inactive.get(name)
        if remembered is not None:
            return remembered
        repo = Repo(name=name, inode=0, fqrn=fqrn, pin=pin)
        backoff_ = self._backoffs.get(name)
        if backoff_ is not None:
            self._backoffs.move_to_end(name)
            repo.failures, repo.retry_at, code, exit_code, message = backoff_
            repo.state = State.FAILED
            repo.last_error = MountError(message, exit_code=exit_code)
            repo.last_error.errno = code
        return repo

    def _register(self, repo: Repo) -> None:
        if repo.inode == 0:
            repo.inode = self._next_inode
            self._next_inode += 1
            self._counts[repo.state] += 1
        self._by_name[repo.name] = repo
        self._by_inode[repo.inode] = repo
        self._backoffs.pop(repo.name, None)  # its entry carries what it has
        if repo.state not in ACTIVE:
            self._inactive[repo.name] = repo

    def touch(self, repo: Repo) -> None:
        """Used now: the last to be forgotten."""
        if repo.name in self._inactive:
            self._inactive.move_to_end(repo.name)

    def forgotten(self, repo: Repo) -> None:
        """The kernel holds no reference to the name's inode any more (its FORGET). An idle one
        is dropped; a failed one stays remembered by name, within max_names."""
        if repo.state in ACTIVE or self._by_name.get(repo.name) is not repo:
            return
        del self._by_name[repo.name]
        del self._by_inode[repo.inode]
        if repo.state is State.IDLE or len(self._inactive) > self.max_names:
            self._drop(repo)

    def _drop(self, repo: Repo) -> None:
        self._inactive.pop(repo.name, None)
        self._counts[repo.state] -= 1
        if repo.state is State.FAILED and repo.last_error is not None:
            # Out of the table, its backoff stays: a few hundred bytes, within 4 x max_names.
            error = repo.last_error
            self._backoffs[repo.name] = (repo.failures, repo.retry_at, error.errno,
                                         error.exit_code, error.message[:160])
            self._backoffs.move_to_end(repo.name)
            while len(self._backoffs) > 4 * self.max_names:
                self._backoffs.popitem(last=False)

    def excess(self) -> list[Repo]:
        """Names past max_names, oldest first. Those the kernel does not know are dropped here;
        the others are returned, for the kernel to be told to forget them (then forgotten())."""
        out = []
        over = len(self._inactive) - self.max_names
        for repo in list(self._inactive.values())[:max(0, over)]:
            if self._by_name.get(repo.name) is repo:
                if repo.evicting is None:
                    out.append(repo)
            else:
                self._drop(repo)
        return out

    def __iter__(self) -> Iterator[Repo]:
        """Every repository known: registered ones and remembered failures."""
        seen = dict(self._by_name)
        for name, repo in self._inactive.items():
            seen.setdefault(name, repo)
        return iter(list(seen.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def counts(self) -> dict[State, int]:
        return dict(self._counts)

    def mounted(self, pinned: bool | None = None) -> list[Repo]:
        """Mounted repositories (pinned=False: live ones only, True: snapshots only)."""
        return _in_order(self._mounted, pinned)

    def listed(self, pinned: bool) -> list[Repo]:
        """What a listing shows: mounted repositories and those whose boot's mount is in
        place (pinned as for mounted())."""
        return _in_order(self._listed, pinned)

    def active(self) -> int:
        """Repositories that hold (or are about to hold) a mount."""
        return sum(self._counts[s] for s in ACTIVE)

    def held_by(self, requester: object) -> int:
        """Mounts (booting or mounted) that a requester started and that are held."""
        return self._held.get(requester, 0)

    def pins_of(self, fqrn: str) -> int:
        """Pinned instances of a repository that hold a mount."""
        return self._pins.get(fqrn, 0)

    # --- lifecycle steps ----------------------------------------------------------------------
    def may_boot(self, repo: Repo, now: float) -> bool:
        return may_boot(repo.state, now, repo.retry_at)

    def begin_boot(self, repo: Repo, requester: object = None) -> None:
        self._register(repo)
        repo.requester = requester
        self._fire(repo, Event.BOOT)
        repo.boots += 1
        self.boots_total += 1
        repo.settled = trio.Event()
        repo.attached = trio.Event()
        self._notify(Event.BOOT, repo)

    def mount_attached(self, repo: Repo, fuse_fd: int, dev: tuple[int, int]) -> None:
        repo.fuse_fd, repo.dev = fuse_fd, dev
        repo.attached.set()
        self._listed[repo.inode] = repo

    def take_fuse_fd(self, repo: Repo) -> int | None:
        """The daemon's copy of the descriptor, handed over to whoever closes it."""
        fd, repo.fuse_fd = repo.fuse_fd, None
        return fd

    def booted(self, repo: Repo, process: Tracked, monotonic: float, wall: float) -> None:
        self._fire(repo, Event.BOOTED)
        if not any(monotonic - t <= self._restart[0] for t in repo.deaths):
            # A crash-looping backend boots fine and then dies: only a boot with no recent
            # deaths (see died()) ends its backoff series.
            repo.failures = 0
        repo.process = process
        repo.mounted_at, repo.mounted_since = monotonic, wall
        repo.settled.set()
        self._notify(Event.BOOTED, repo)

    def adopted(self, repo: Repo, process: Tracked, monotonic: float, wall: float) -> None:
        self._register(repo)
        self._fire(repo, Event.ADOPTED)
        repo.process = process
        repo.mounted_at, repo.mounted_since = monotonic, wall
        repo.settled.set()
        repo.attached.set()
        self._notify(Event.ADOPTED, repo)

    def boot_failed(self, repo: Repo, error: MountError, monotonic: float, wall: float) -> None:
        self._fire(repo, Event.BOOT_FAILED)
        repo.attached.set()  # nothing more will be attached by this boot
        repo.requester = None
        repo.failures += 1
        repo.retry_at = monotonic + backoff(repo.failures, *self._backoff)
        repo.last_error, repo.last_error_at = error.replay(), wall
        repo.settled.set()
        self._notify(Event.BOOT_FAILED, repo, error)

    def gone(self, repo: Repo, event: Event) -> None:
        """The mount is no longer attached (unmounted or died)."""
        self._fire(repo, event)
        repo.process = None
        repo.requester = None
        repo.mounted_at = repo.mounted_since = None
        repo.nopen = repo.idle_since = None
        repo.settled.set()

    def begin_unmount(self, repo: Repo) -> None:
        self._fire(repo, Event.UNMOUNT)
        repo.settled = trio.Event()

    def unmount_refused(self, repo: Repo) -> None:
        self._fire(repo, Event.UNMOUNT_REFUSED)
        repo.settled.set()

    def died(self, repo: Repo, error: MountError, monotonic: float, wall: float) -> None:
        """The backend of a mounted repository died and its mount was detached."""
        window, burst = self._restart
        repo.deaths = [t for t in repo.deaths if monotonic - t <= window] + [monotonic]
        if repo.mounted_at is not None and monotonic - repo.mounted_at > window:
            repo.deaths = [monotonic]  # it served for a whole window: not a loop
        repo.last_error, repo.last_error_at = error.replay(), wall
        if crash_loop(repo.deaths, monotonic, window, burst):
            self.gone(repo, Event.CRASH_LOOP)
            repo.failures += 1
            repo.retry_at = monotonic + backoff(repo.failures, *self._backoff)
            self._notify(Event.CRASH_LOOP, repo, error)
        else:
            self.gone(repo, Event.DIED)
            self._notify(Event.DIED, repo, error)

    # --- own mount-worker threads -----------------------------------------------------------
    def is_own_thread(self, tid: int) -> bool:
        return tid in self._own_tids

    def enter_own_thread(self) -> None:
        with self._tid_lock:
            self._own_tids.add(threading.get_native_id())

    def leave_own_thread(self) -> None:
        with self._tid_lock:
            self._own_tids.discard(threading.get_native_id())


def _in_order(repos: dict[int, Repo], pinned: bool | None) -> list[Repo]:
    return sorted((r for r in repos.values() if pinned is None or (r.pin is not None) == pinned),
                  key=lambda r: r.inode)
