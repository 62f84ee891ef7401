"""What a volume of this driver is, and the argument checks shared by the node and controller
services.

There is one kind of volume: the daemon's whole root (every repository), or, when the volume context
names a `repository`, that one repository below the root (for per-repository storage classes),
optionally pinned to a snapshot with `tag`, `hash` or `date`.
Volumes are always read-only filesystem (mount) volumes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from csi.proto import csi_pb2
from csi.rpc import invalid
from cvmfsd.core.names import SNAPSHOTS_DIR, InvalidName, Pin, check_pin, snapshot_name

AccessMode = csi_pb2.VolumeCapability.AccessMode

REPOSITORY_KEY = "repository"
# Pin a repository to a snapshot (cvmfsd's <root>/.snapshots/<fqrn>@<kind>=<value>).
PIN_KEYS = ("tag", "hash", "date")
K8S_PREFIX = "csi.storage.k8s.io/"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
# volume_context keys whose values must never be logged (kubelet passes service account tokens here
# when the CSIDriver object asks for them)
SECRET_CONTEXT_KEYS = frozenset({"csi.storage.k8s.io/serviceAccount.tokens"})

READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})
# Flags a CO may ask for: all three are always applied anyway. `noexec` is refused: the kernel
# cannot put it on the repositories that the daemon mounts after the publish (they arrive by
# propagation with the daemon's own flags), so it would hold for some repositories and not others.
ALLOWED_MOUNT_FLAGS = frozenset({"ro", "nosuid", "nodev"})
MAX_ID_BYTES = 1024  # volume ids from static PVs are free text; bound them anyway
MAX_NAME_BYTES = 128  # the CSI spec's size limit for string fields

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_REPOSITORY_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+$")
# control characters the CSI spec bans from names
_BANNED_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
_VOLUME_ID_RE = re.compile(r"^cvmfs-[0-9a-f]{32}$")


def mode_name(mode: int) -> str:
    try:
        return AccessMode.Mode.Name(mode)
    except ValueError:
        return f"access mode {mode}"


def check_volume_id(volume_id: str) -> None:
    if not volume_id:
        raise invalid("volume_id is required")
    if len(volume_id.encode()) > MAX_ID_BYTES:
        raise invalid(f"volume_id is longer than {MAX_ID_BYTES} bytes")
    if _CONTROL_RE.search(volume_id):
        raise invalid("volume_id contains control characters")


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why this capability cannot be served, or None when it can.

    Every access mode is served, and always read-only: a claim with a writer mode (ReadWriteOnce,
    or the SINGLE_NODE_WRITER that kubelet sends for inline volumes and csi-sanity for everything)
    provisions and publishes, and writes in the pod get EROFS. Only block volumes, a missing or
    UNKNOWN mode and mount flags other than ro, nosuid, nodev are refused.
    """
    kind = cap.WhichOneof("access_type")
    if kind == "block":
        return "block volumes are not supported: this driver serves a read-only filesystem"
    if kind != "mount":
        return "volume_capability.mount is required (access_type is not set)"
    if not cap.HasField("access_mode"):
        return "volume_capability.access_mode is required"
    if cap.access_mode.mode == AccessMode.UNKNOWN:
        return "volume_capability.access_mode.mode is UNKNOWN"
    for flag in cap.mount.mount_flags:
        if flag == "noexec":
            return (
                "mount flag 'noexec' is not supported: repositories that cvmfsd mounts after the "
                "publish arrive by propagation with cvmfsd's own flags, so noexec could not hold "
                "for them (every publish is ro, nosuid, nodev)"
            )
        if flag not in ALLOWED_MOUNT_FLAGS:
            return f"mount flag {flag!r} is not supported (allowed: {sorted(ALLOWED_MOUNT_FLAGS)})"
    return None


def is_writer_mode(mode: int) -> bool:
    return mode not in READ_ONLY_MODES


def check_repository(name: str) -> str:
    if not _REPOSITORY_RE.match(name):
        raise invalid(f"repository {name!r} is not a valid repository name (e.g. atlas.cern.ch)")
    return name


@dataclass(frozen=True)
class VolumeSource:
    """What below the daemon's root a volume publishes: one repository, optionally pinned to a
    snapshot (tag, root hash or date), served by cvmfsd at <root>/.snapshots/<fqrn>@<kind>=<v>."""

    repository: str
    pin: Pin | None = None

    @property
    def path(self) -> str:
        """Relative to the root."""
        if self.pin is None:
            return self.repository
        return f"{SNAPSHOTS_DIR}/{snapshot_name(self.repository, self.pin)}"

    def context(self) -> dict[str, str]:
        out = {REPOSITORY_KEY: self.repository}
        if self.pin is not None:
            out[self.pin.kind] = self.pin.value
        return out


def repository_from(context: Mapping[str, str], what: str) -> VolumeSource | None:
    """The repository (and pin) named by a volume context (or StorageClass parameters), None for
    the whole root.

    Known keys: `repository`, at most one of `tag`, `hash`, `date` with it, and anything under
    `csi.storage.k8s.io/` (pod information and provisioner metadata that Kubernetes adds).
    Anything else is a mistake we report.
    """
    known = {REPOSITORY_KEY, *PIN_KEYS}
    unknown = sorted(k for k in context if k not in known and not k.startswith(K8S_PREFIX))
    if unknown:
        raise invalid(f"unknown {what} keys {unknown}: only {sorted(known)} are understood")
    pins = [k for k in PIN_KEYS if k in context]
    if REPOSITORY_KEY not in context:
        if pins:
            raise invalid(f"{what} key {pins[0]!r} needs {REPOSITORY_KEY!r}")
        return None
    repository = check_repository(context[REPOSITORY_KEY])
    if not pins:
        return VolumeSource(repository)
    if len(pins) > 1:
        raise invalid(f"{what}: at most one of {list(PIN_KEYS)}, got {pins}")
    try:
        pin = check_pin(pins[0], context[pins[0]])
    except InvalidName as e:
        raise invalid(f"{what}: {e}") from e
    return VolumeSource(repository, pin)


def check_name(name: str) -> None:
    if not name:
        raise invalid("name is required")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise invalid(f"name is longer than {MAX_NAME_BYTES} bytes")
    if _BANNED_RE.search(name):
        raise invalid("name contains control characters")


def volume_id_for(name: str) -> str:
    """The id CreateVolume gives a volume: a function of the requested name alone (stateless)."""
    return "cvmfs-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def is_controller_volume_id(volume_id: str) -> bool:
    return bool(_VOLUME_ID_RE.match(volume_id))
