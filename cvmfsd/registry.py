"""The one registry of repository state: name, inode, lifecycle state, serving process, errors.

Plain data, no I/O. Inode numbers are handed out once and never reused, so a name keeps one
nodeid and generation for the daemon's lifetime (DESIGN.md §3).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog
import trio

from .children import Tracked
from .errors import MountError
from .lifecycle import Event, State, backoff, crash_loop, may_boot, next_state
from .names import SNAPSHOTS_DIR, Pin

log = structlog.get_logger("cvmfsd.registry")

ROOT_INODE = 1
SNAPSHOTS_INODE = 2  # <root>/.snapshots: pinned instances; not listed in the root


Observer = Callable[["Event", "Repo", "MountError | None"], None]


@dataclass
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

    def __post_init__(self) -> None:
        self.fqrn = self.fqrn or self.name

    @property
    def path(self) -> str:
        """Where it is mounted, relative to the root."""
        return self.name if self.pin is None else f"{SNAPSHOTS_DIR}/{self.name}"

    @property
    def serving_pid(self) -> int | None:
        return self.process.pid if self.process else None

    def fire(self, event: Event) -> None:
        self.state = next_state(self.state, event)


class Registry:
    def __init__(self, backoff_initial: float, backoff_max: float, restart_window: float = 60.0,
                 restart_burst: int = 10) -> None:
        self._by_name: dict[str, Repo] = {}
        self._by_inode: dict[int, Repo] = {}
        self._next_inode = SNAPSHOTS_INODE + 1
        self._backoff = (backoff_initial, backoff_max)
        self._restart = (restart_window, restart_burst)
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

    def get(self, name: str) -> Repo | None:
        return self._by_name.get(name)

    def by_inode(self, inode: int) -> Repo | None:
        return self._by_inode.get(inode)

    def add(self, name: str, fqrn: str = "", pin: Pin | None = None) -> Repo:
        repo = Repo(name=name, inode=self._next_inode, fqrn=fqrn, pin=pin)
        self._next_inode += 1
        self._by_name[name] = repo
        self._by_inode[repo.inode] = repo
        return repo

    def __iter__(self) -> Iterator[Repo]:
        return iter(list(self._by_name.values()))

    def mounted(self, pinned: bool | None = None) -> list[Repo]:
        """Mounted repositories (pinned=False: live ones only, True: snapshots only)."""
        return sorted((r for r in self._by_name.values() if r.state is State.MOUNTED
                       and (pinned is None or (r.pin is not None) == pinned)),
                      key=lambda r: r.inode)

    def may_boot(self, repo: Repo, now: float) -> bool:
        return may_boot(repo.state, now, repo.retry_at)

    def begin_boot(self, repo: Repo) -> None:
        repo.fire(Event.BOOT)
        repo.boots += 1
        repo.settled = trio.Event()
        repo.attached = trio.Event()
        self._notify(Event.BOOT, repo)

    def mount_attached(self, repo: Repo, fuse_fd: int, dev: tuple[int, int]) -> None:
        repo.fuse_fd, repo.dev = fuse_fd, dev
        repo.attached.set()

    def take_fuse_fd(self, repo: Repo) -> int | None:
        """The daemon's copy of the descriptor, handed over to whoever closes it."""
        fd, repo.fuse_fd = repo.fuse_fd, None
        return fd

    def booted(self, repo: Repo, process: Tracked, monotonic: float, wall: float) -> None:
        repo.fire(Event.BOOTED)
        if not any(monotonic - t <= self._restart[0] for t in repo.deaths):
            # A crash-looping backend boots fine and then dies: only a boot with no recent
            # deaths (see died()) ends its backoff series.
            repo.failures = 0
        repo.process = process
        repo.mounted_at, repo.mounted_since = monotonic, wall
        repo.settled.set()
        self._notify(Event.BOOTED, repo)

    def adopted(self, repo: Repo, process: Tracked, monotonic: float, wall: float) -> None:
        repo.fire(Event.ADOPTED)
        repo.process = process
        repo.mounted_at, repo.mounted_since = monotonic, wall
        repo.settled.set()
        self._notify(Event.ADOPTED, repo)

    def boot_failed(self, repo: Repo, error: MountError, monotonic: float, wall: float) -> None:
        repo.fire(Event.BOOT_FAILED)
        repo.attached.set()  # nothing more will be attached by this boot
        repo.failures += 1
        repo.retry_at = monotonic + backoff(repo.failures, *self._backoff)
        repo.last_error, repo.last_error_at = error, wall
        repo.settled.set()
        self._notify(Event.BOOT_FAILED, repo, error)

    def gone(self, repo: Repo, event: Event) -> None:
        """The mount is no longer attached (unmounted or died)."""
        repo.fire(event)
        repo.process = None
        repo.mounted_at = repo.mounted_since = None
        repo.nopen = repo.idle_since = None
        repo.settled.set()

    def begin_unmount(self, repo: Repo) -> None:
        repo.fire(Event.UNMOUNT)
        repo.settled = trio.Event()

    def unmount_refused(self, repo: Repo) -> None:
        repo.fire(Event.UNMOUNT_REFUSED)
        repo.settled.set()

    def died(self, repo: Repo, error: MountError, monotonic: float, wall: float) -> None:
        """The backend of a mounted repository died and its mount was detached."""
        window, burst = self._restart
        repo.deaths = [t for t in repo.deaths if monotonic - t <= window] + [monotonic]
        if repo.mounted_at is not None and monotonic - repo.mounted_at > window:
            repo.deaths = [monotonic]  # it served for a whole window: not a loop
        repo.last_error, repo.last_error_at = error, wall
        if crash_loop(repo.deaths, monotonic, window, burst):
            self.gone(repo, Event.CRASH_LOOP)
            repo.failures += 1
            repo.retry_at = monotonic + backoff(repo.failures, *self._backoff)
            self._notify(Event.CRASH_LOOP, repo, error)
        else:
            self.gone(repo, Event.DIED)
            self._notify(Event.DIED, repo, error)

    def active(self) -> int:
        """Repositories that hold (or are about to hold) a mount."""
        return sum(1 for r in self._by_name.values() if r.state in (
            State.BOOTING, State.MOUNTED, State.UNMOUNTING))

    # --- own mount-worker threads -----------------------------------------------------------
    def is_own_thread(self, tid: int) -> bool:
        return tid in self._own_tids

    def enter_own_thread(self) -> None:
        with self._tid_lock:
            self._own_tids.add(threading.get_native_id())

    def leave_own_thread(self) -> None:
        with self._tid_lock:
            self._own_tids.discard(threading.get_native_id())
