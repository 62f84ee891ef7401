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


__all__ = ["Requester", "identify", "pod_of"]
