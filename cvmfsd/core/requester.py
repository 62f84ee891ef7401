"""Who asks: the key that the per-requester shares (boots, mount slots, waiting handlers) are
kept by.

Every pod on a node and every local user can look up any name under the root, and pods usually
run as the same uid, so the key is the uid and, for a process in a Kubernetes pod, the pod's
cgroup (its UID in the cgroup path, with either cgroup driver). Read from /proc at the moment a
share is taken (a boot started, a handler about to wait), never per plain lookup.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# cgroupfs driver: .../kubepods/burstable/pod<uid>/<container>; systemd driver:
# .../kubepods-burstable-pod<uid with '_'>.slice/cri-containerd-<id>.scope
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True)
class Requester:
    uid: int
    pod: str | None = None

    def __str__(self) -> str:
        return f"uid {self.uid}" + (f" pod {self.pod}" if self.pod else "")


def pod_of(cgroup_text: str) -> str | None:
    match = _POD.search(cgroup_text)
    return match.group(1).replace("_", "-") if match else None


def identify(uid: int, pid: int) -> Requester:
    """Requester of a FUSE request (its context's uid and pid). A process that is gone by now
    counts as its uid alone."""
    # os.open/os.read, not open(): no buffered text file object to build (fstat, ioctl,
    # lseek and a decoder) on the way of every first lookup (docs/perf.md).
    try:
        fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return Requester(uid)
    try:
        text = os.read(fd, 4096).decode("utf-8", "replace")
    except OSError:
        return Requester(uid)
    finally:
        os.close(fd)
    return Requester(uid, pod_of(text))


class FailureBudget:
    """Failed boots one requester may cause: a burst of `per_minute`, then one every
    60/per_minute s (a token bucket kept as a debt that drains over time). A failed name is
    remembered with its backoff, but ever new names would each boot once: this bounds what
    that costs the node (CPU for the boots, memory for the names). Pure: the caller passes
    the clock. Kept only for requesters with a debt: memory follows the requesters that
    failed lately, not what they asked."""

    def __init__(self, per_minute: int) -> None:
        self._burst = float(per_minute)
        self._drain = per_minute / 60.0
        self._debts: dict[Requester, tuple[float, float]] = {}  # debt, as of (monotonic)
        self._prune_at = PRUNE_AT

    def _debt(self, who: Requester, now: float) -> float:
        debt, at = self._debts.get(who, (0.0, now))
        return max(0.0, debt - (now - at) * self._drain)

    def exhausted(self, who: Requester, now: float) -> bool:
        return bool(self._burst) and self._debt(who, now) + 1 > self._burst

    def charge(self, who: Requester, now: float) -> None:
        if not self._burst:
            return
        self._debts[who] = (self._debt(who, now) + 1, now)
        if len(self._debts) > self._prune_at:  # drop the requesters whose debt has drained
            self._debts = {w: (d, now) for w in list(self._debts)
                           if (d := self._debt(w, now)) > 0}
            self._prune_at = max(PRUNE_AT, 2 * len(self._debts))

    def __len__(self) -> int:
        return len(self._debts)


PRUNE_AT = 256

__all__ = ["FailureBudget", "Requester", "identify", "pod_of"]
