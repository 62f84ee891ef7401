"""The mount lifecycle of one repository: a small pure state machine, no I/O, no clock."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    IDLE = "idle"            # not mounted; the next access boots it
    BOOTING = "booting"      # mounted at its path, cvmfs2 starting on it (or the mount being made)
    MOUNTED = "mounted"      # attached at <root>/<name>
    FAILED = "failed"        # last boot failed; no new boot before the backoff ends
    UNMOUNTING = "unmounting"


class Event(StrEnum):
    BOOT = "boot"
    BOOTED = "booted"
    BOOT_FAILED = "boot_failed"
    UNMOUNT = "unmount"
    UNMOUNTED = "unmounted"
    UNMOUNT_REFUSED = "unmount_refused"  # busy: keep it
    DIED = "died"            # the serving process exited or the mount turned corrupted
    ADOPTED = "adopted"      # taken over, already mounted, from a previous daemon
    CRASH_LOOP = "crash_loop"  # died too often recently: back off like a failed boot


_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.IDLE, Event.BOOT): State.BOOTING,
    (State.FAILED, Event.BOOT): State.BOOTING,
    (State.BOOTING, Event.BOOTED): State.MOUNTED,
    (State.IDLE, Event.ADOPTED): State.MOUNTED,
    (State.BOOTING, Event.BOOT_FAILED): State.FAILED,
    (State.MOUNTED, Event.UNMOUNT): State.UNMOUNTING,
    (State.MOUNTED, Event.DIED): State.IDLE,
    (State.MOUNTED, Event.UNMOUNTED): State.IDLE,  # by someone else
    (State.UNMOUNTING, Event.UNMOUNTED): State.IDLE,
    (State.UNMOUNTING, Event.UNMOUNT_REFUSED): State.MOUNTED,
    (State.UNMOUNTING, Event.DIED): State.IDLE,
    (State.MOUNTED, Event.CRASH_LOOP): State.FAILED,
    (State.UNMOUNTING, Event.CRASH_LOOP): State.FAILED,
}


class IllegalTransition(RuntimeError):
    pass


def next_state(state: State, event: Event) -> State:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event} in state {state}") from None


def backoff(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the n-th consecutive failure before booting again."""
    if failures <= 0:
        return 0.0
    return min(maximum, initial * 2 ** min(failures - 1, 32))


def may_boot(state: State, now: float, retry_at: float) -> bool:
    return state is State.IDLE or (state is State.FAILED and now >= retry_at)


def crash_loop(deaths: list[float], now: float, window: float, burst: int) -> bool:
    """More than `burst` backend deaths within the last `window` seconds (systemd's
    StartLimitBurst/StartLimitIntervalSec): stop healing at once, back off instead."""
    return sum(1 for t in deaths if now - t <= window) > burst
