"""cvmfs-csi: the CSI plugin's command line."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

import structlog

from csi import __version__
from csi.config import (
    DEFAULT_CVMFS_ROOT,
    DEFAULT_DRIVER_NAME,
    DEFAULT_KUBELET_DIR,
    MODES,
    MOUNT_APIS,
    PluginConfig,
)


def configure_logging(level: str) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cvmfs-csi",
        description="CSI plugin that bind-mounts the cvmfsd root (every CernVM-FS repository) "
        "into pods. It never starts cvmfs2.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--endpoint", default="unix:///csi/csi.sock", help="unix:///path of the socket")
    p.add_argument("--kubelet-dir", default=DEFAULT_KUBELET_DIR, help="kubelet root directory")
    p.add_argument("--cvmfs-root", default=DEFAULT_CVMFS_ROOT, help="the daemon's FUSE root")
    p.add_argument(
        "--node-id",
        default=os.environ.get("NODE_ID") or socket.gethostname(),
        help="node id (default: $NODE_ID, else the host name)",
    )
    p.add_argument("--driver-name", default=DEFAULT_DRIVER_NAME, help="CSI driver name")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="all",
        help="services to serve: all, node (DaemonSet), controller (next to csi-provisioner)",
    )
    p.add_argument(
        "--mount-api",
        choices=MOUNT_APIS,
        default="auto",
        help="auto: open_tree/mount_setattr when the kernel has them; legacy: mount(2) only",
    )
    p.add_argument(
        "--probe-timeout", type=float, default=2.0, help="seconds for the root to answer"
    )
    p.add_argument(
        "--repository-timeout",
        type=float,
        default=30.0,
        help="seconds for a repository lookup (the daemon mounts it) in per-repository volumes",
    )
    p.add_argument(
        "--sanity-target",
        action="append",
        default=[],
        metavar="PATH",
        help="also accept exactly this target path (below --kubelet-dir) besides kubelet's "
        "pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount: for csi-sanity, which publishes "
        "to <mountdir>/target. Never needed with kubelet",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    # imported after logging is configured: module-level loggers bind on first use
    from csi.server import serve

    try:
        config = PluginConfig(
            endpoint=args.endpoint,
            node_id=args.node_id,
            driver_name=args.driver_name,
            kubelet_dir=args.kubelet_dir,
            cvmfs_root=args.cvmfs_root,
            mode=args.mode,
            probe_timeout=args.probe_timeout,
            repository_timeout=args.repository_timeout,
            mount_api=args.mount_api,
            extra_targets=tuple(args.sanity_target),
        )
        return serve(config)
    except (ValueError, RuntimeError) as e:
        structlog.get_logger("csi.main").error("cannot start", error=str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
