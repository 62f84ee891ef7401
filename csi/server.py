"""The gRPC server on a unix socket: stale socket removal, services, graceful stop on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

import grpc
import structlog

from csi.config import PluginConfig
from csi.controller import ControllerService
from csi.identity import IdentityService
from csi.interceptor import LoggingInterceptor
from csi.node import NodeService
from csi.proto import csi_pb2_grpc

log = structlog.get_logger("csi.server")


def socket_path(endpoint: str) -> str:
    """The path of a `unix:///abs/path` endpoint (the form CSI sidecars and kubelet use)."""
    prefix = "unix://"
    if not endpoint.startswith(prefix):
        raise ValueError(f"endpoint {endpoint!r} must look like unix:///path/to/csi.sock")
    path = endpoint[len(prefix) :]
    if not path.startswith("/") or os.path.normpath(path) != path:
        raise ValueError(f"endpoint {endpoint!r} must name a normalised absolute path")
    return path


def remove_stale_socket(path: str) -> None:
    """Remove a socket left by an earlier run; refuse when something still listens on it, or when
    the path is not a socket at all."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket", path=path)
        return
    except OSError as e:
        raise RuntimeError(f"cannot tell whether {path} is in use: {e}") from e
    finally:
        probe.close()
    raise RuntimeError(f"another process is serving on {path}")


def build_server(config: PluginConfig) -> tuple[grpc.Server, str]:
    path = socket_path(config.endpoint)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="csi-rpc"),
        interceptors=[LoggingInterceptor()],
        options=[("grpc.so_reuseport", 0)],
    )
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(config), server)
    if config.serves_node:
        csi_pb2_grpc.add_NodeServicer_to_server(NodeService(config), server)
    if config.serves_controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(), server)
    remove_stale_socket(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if server.add_insecure_port(f"unix://{path}") == 0:
        raise RuntimeError(f"cannot listen on {path}")
    return server, path


def serve(config: PluginConfig) -> int:
    server, path = build_server(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info(
        "serving",
        endpoint=config.endpoint,
        driver=config.driver_name,
        node_id=config.node_id,
        mode=config.mode,
        kubelet_dir=config.kubelet_dir,
        cvmfs_root=config.cvmfs_root,
    )
    while not stop.wait(3600):
        pass
    server.stop(config.grace).wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    log.info("stopped")
    return 0
