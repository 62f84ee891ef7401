"""Scenarios: each module has ``run(ctx) -> dict`` and owns the systems it starts."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..common import Progress
from ..systems import CONTROL, System, make
from ..workspace import Workspace

ORDER = ("cold", "metadata", "reads", "storm", "footprint", "csi", "restart", "attack")


@dataclass
class Sizes:
    """Every size knob, full run by default; QUICK below is the CI smoke size.
    Override any of them with ``--set name=value``."""

    cold_reps: int = 40            # fresh repositories per system
    meta_dirs: int = 100           # tree: meta_dirs x meta_files files (+ directories)
    meta_files: int = 100
    meta_reps: int = 9
    warm_rounds: int = 11          # warm scenarios: timed passes per system per repetition
    read_large_mib: int = 64
    read_small_count: int = 1000
    read_small_bytes: int = 4096
    read_rand_count: int = 10000
    read_rand_block: int = 4096
    read_reps: int = 7
    storm_procs: int = 64
    storm_repos: int = 32
    storm_reps: int = 3
    footprint_counts: str = "0,1,10,100"
    footprint_window_s: float = 20.0   # CPU is sampled over this long at each count
    csi_cycles: int = 200
    csi_cold: int = 10
    attack_reps: int = 10          # legitimate first accesses per instance and attack
    attack_seconds: float = 60.0   # each attack runs this long at full pressure (600: a soak)
    attack_threads: int = 600      # slow-threads: the 600
    attack_churn_threads: int = 64
    attack_hoard: int = 20         # hoard-mounts: the attacker's share of mounts
    attack_only: str = ""          # a comma list of attacks; empty: every one
    restart_rounds: int = 10       # restarts per path (graceful, crash, upgrade, reexec)
    restart_readers: int = 8       # half on the host, half in pod views (+ one with its cwd inside)
    restart_repos: int = 4

    def counts(self) -> list[int]:
        return [int(c) for c in self.footprint_counts.split(",") if c.strip()]

    def set(self, assignment: str) -> None:
        name, _, value = assignment.partition("=")
        known = {f.name: f for f in fields(self)}
        if name not in known:
            raise ValueError(f"unknown size {name!r}; known: {', '.join(known)}")
        kind = type(getattr(self, name))
        setattr(self, name, kind(value))


QUICK = dict(cold_reps=3, meta_dirs=10, meta_files=30, meta_reps=2, warm_rounds=2,
             read_large_mib=4,
             read_small_count=50, read_rand_count=500, read_reps=2, storm_procs=8,
             storm_repos=4, storm_reps=1, footprint_counts="0,1,3", footprint_window_s=1.0,
             csi_cycles=10, csi_cold=2, attack_reps=2, attack_seconds=4.0, attack_threads=100,
             attack_churn_threads=16, attack_hoard=3, restart_rounds=2, restart_readers=2,
             restart_repos=2)


@dataclass
class Context:
    ws: Workspace
    sizes: Sizes
    progress: Progress
    quick: bool
    systems: tuple[str, ...]                      # the systems that can run here
    unavailable: dict[str, str] = field(default_factory=dict)   # system -> why not
    leaks: list[str] = field(default_factory=list)               # mounts forced at teardown

    def say(self, message: str) -> None:
        self.progress.say(message)

    def warm_systems(self) -> tuple[str, ...]:
        """The systems of the warm scenarios: every system, plus the A/A control (a second
        direct mount) that shows how far two identical mounts differ on this machine."""
        return self.systems + ((CONTROL,) if "direct" in self.systems else ())


@contextlib.contextmanager
def started(ctx: Context, names: Sequence[str], tag: str,
            repos: Callable[[str], Sequence[str]] | None = None,
            **cvmfsd_overrides: Any) -> Iterator[dict[str, System]]:
    """Start fresh instances of the named systems; always stop them, and record any mount that
    had to be forced away at the end as a leak."""
    made: dict[str, System] = {}
    try:
        for name in names:
            system = make(name, ctx.ws, tag, **(cvmfsd_overrides if name == "cvmfsd" else {}))
            made[name] = system
            system.setup(repos(name) if repos else ())
        yield made
    finally:
        t0 = time.monotonic()
        for system in reversed(made.values()):
            try:
                leaked = system.teardown()
            except Exception as exc:  # keep stopping the others; report it
                ctx.say(f"teardown of {system.label} failed: {exc!r}")
                leaked = [f"{system.label}: teardown failed: {exc!r}"]
            if leaked:
                ctx.say(f"{system.label} left mounts behind (forced): {leaked}")
                ctx.leaks.extend(leaked)
        if made:
            ctx.say(f"stopped {', '.join(s.label for s in made.values())} "
                    f"in {time.monotonic() - t0:.1f} s")


def rotated(names: Sequence[str], rep: int) -> list[str]:
    """The systems in the order of repetition rep: ABC, BCA, CAB, ... Interleaved like ABC ABC,
    and no system is always first (the first one pays for cold CPU caches, a fresh allocator...)."""
    k = rep % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def ms(ns: int | float) -> float:
    return round(ns / 1e6, 4)
