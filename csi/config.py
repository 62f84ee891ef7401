"""Plugin configuration (filled from the command line by csi.main)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_DRIVER_NAME = "cvmfs.csi.cvmfsd.io"
DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
DEFAULT_CVMFS_ROOT = "/cvmfs"
MODES = ("all", "node", "controller")
MOUNT_APIS = ("auto", "legacy")

# CSI: at most 63 characters, alphanumerics at both ends, dashes, dots and alphanumerics between.
# Kubernetes also requires a lower-case DNS subdomain for the CSIDriver object's name.
_DRIVER_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


def driver_name_problem(name: str) -> str | None:
    if not _DRIVER_NAME_RE.match(name):
        return (
            f"driver name {name!r} must be at most 63 characters of lower-case alphanumerics, "
            "'-' and '.', beginning and ending with an alphanumeric"
        )
    return None


@dataclass(frozen=True)
class PluginConfig:
    endpoint: str
    node_id: str
    driver_name: str = DEFAULT_DRIVER_NAME
    kubelet_dir: str = DEFAULT_KUBELET_DIR
    cvmfs_root: str = DEFAULT_CVMFS_ROOT
    mode: str = "all"
    probe_timeout: float = 2.0
    repository_timeout: float = 30.0
    mount_api: str = "auto"
    workers: int = 16
    grace: float = 5.0
    # Target paths accepted besides kubelet's CSI target shape: only for conformance runs
    # (csi-sanity publishes to <mountdir>/target); kubelet never needs one.
    extra_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = driver_name_problem(self.driver_name)
        if problem:
            raise ValueError(problem)
        if not self.node_id:
            raise ValueError("node id must not be empty")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self.mount_api not in MOUNT_APIS:
            raise ValueError(f"mount api must be one of {MOUNT_APIS}")
        for what, path in (("kubelet dir", self.kubelet_dir), ("cvmfs root", self.cvmfs_root)):
            if not path.startswith("/") or os.path.normpath(path) != path or path == "/":
                raise ValueError(
                    f"{what} must be a normalised absolute path other than /: {path!r}"
                )
        for path in self.extra_targets:
            if os.path.normpath(path) != path or not path.startswith(self.kubelet_dir + "/"):
                raise ValueError(
                    f"--sanity-target must be a normalised path below {self.kubelet_dir}: {path!r}"
                )

    @property
    def serves_node(self) -> bool:
        return self.mode in ("all", "node")

    @property
    def serves_controller(self) -> bool:
        return self.mode in ("all", "controller")
