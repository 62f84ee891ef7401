"""Optional Prometheus endpoint (config `metrics_listen`; off by default, loopback by default).

Gauges are read from the registry at scrape time, so they can never drift from what the status
socket says. Counters and the mount latency histogram need every transition, which the registry
does not keep: `MountObserver` is a registry observer (Registry.observe) — the registry stays
the one source of state, the observer only counts. The HTTP side is a deliberately tiny
HTTP/1.0 responder on trio: bounded request size, a read deadline and a cap on concurrent
clients, like the status socket; one consistent snapshot per scrape, taken on the trio thread.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import __version__
from ..core.errors import MountError
from ..core.lifecycle import Event, State
from ..core.registry import Registry, Repo
from .api import AdminApi

log = structlog.get_logger("cvmfsd.metrics")

# Per-repository series at most; a scan of made-up names must not explode the scrape.
MAX_REPOSITORY_SERIES = 1000
MAX_REQUEST = 8192
# A client has this long to send its request: a slot cannot be held idle for longer.
READ_TIMEOUT = 2.0
MAX_CLIENTS = 16
MAX_PER_PEER = 4
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


class MountObserver:
    """Counts lifecycle transitions of one registry instance."""

    def __init__(self, registry: Registry, prom: CollectorRegistry) -> None:
        self.failures = Counter("cvmfsd_mount_failures",
                                "Failed mount attempts by cvmfs2 exit code ('none': no exit "
                                "code, e.g. a timeout) and kind of failure",
                                ["exit_code", "reason"], registry=prom)
        self.heals = Counter("cvmfsd_heals",
                             "Mounted repositories whose backend died and whose dead mount was "
                             "detached (healed on the next access)", registry=prom)
        self.latency = Histogram("cvmfsd_mount_duration_seconds",
                                 "Time from the start of a boot to attached (or failed)",
                                 ["result"], buckets=LATENCY_BUCKETS, registry=prom)
        self.mounts_by_repo: dict[str, int] = {}
        self._started: dict[str, float] = {}
        registry.observe(self._on_event)

    def _on_event(self, event: Event, repo: Repo, error: MountError | None) -> None:
        if event is Event.BOOT:
            self._begin(repo)
        elif event is Event.BOOTED:
            self._booted(repo)
        elif event is Event.BOOT_FAILED and error is not None:
            self._failed(repo, error)
        elif event in (Event.DIED, Event.CRASH_LOOP):
            self._died(repo)

    def _begin(self, repo: Repo) -> None:
        self._started[repo.name] = time.monotonic()

    def _elapsed(self, repo: Repo) -> float | None:
        started = self._started.pop(repo.name, None)
        return None if started is None else time.monotonic() - started

    def _booted(self, repo: Repo, *_: Any) -> None:
        self.mounts_by_repo[repo.name] = self.mounts_by_repo.get(repo.name, 0) + 1
        elapsed = self._elapsed(repo)
        if elapsed is not None:
            self.latency.labels("mounted").observe(elapsed)

    def _failed(self, repo: Repo, error: MountError, *_: Any) -> None:
        code = "none" if error.exit_code is None else str(error.exit_code)
        self.failures.labels(code, type(error).__name__).inc()
        elapsed = self._elapsed(repo)
        if elapsed is not None:
            self.latency.labels("failed").observe(elapsed)

    def _died(self, repo: Repo, *_: Any) -> None:
        self.heals.inc()


class StateCollector:
    """Gauges (and the registry's own counters) read at scrape time."""

    def __init__(self, admin: AdminApi, observer: MountObserver) -> None:
        self.admin = admin
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        admin, registry = self.admin, self.admin.registry
        info = GaugeMetricFamily("cvmfsd_info", "cvmfsd version and root", labels=["version",
                                                                                 "root"])
        info.add_metric([__version__, str(admin.cfg.root)], 1)
        yield info
        yield GaugeMetricFamily("cvmfsd_start_time_seconds", "Unix time the daemon started",
                                value=admin.started_wall)
        live = admin.liveness.ok
        yield GaugeMetricFamily("cvmfsd_root_answers",
                                "1 when the last liveness check of the root got an answer",
                                value=1 if live or live is None else 0)
        yield GaugeMetricFamily("cvmfsd_degraded", "1 when the daemon reports itself degraded",
                                value=1 if admin.problems() else 0)
        yield CounterMetricFamily("cvmfsd_fuse_internal_errors",
                                  "Unexpected exceptions in FUSE handlers (answered EIO)",
                                  value=admin.ops.internal_errors)
        by_state = GaugeMetricFamily("cvmfsd_repositories", "Repositories known, by state",
                                     labels=["state"])
        repos = list(registry)
        for state in State:
            by_state.add_metric([str(state)], sum(1 for r in repos if r.state is state))
        yield by_state
        # Busy ones first, so that the cap drops idle names looked up once, not live mounts.
        repos.sort(key=lambda r: (r.state is State.IDLE, r.state is State.FAILED, r.name))
        shown = repos[:MAX_REPOSITORY_SERIES]
        state = GaugeMetricFamily("cvmfsd_repository_state",
                                  "1 for the repository's current state",
                                  labels=["repository", "state"])
        boots = CounterMetricFamily("cvmfsd_repository_boots",
                                    "cvmfs2 boots started for the repository",
                                    labels=["repository"])
        mounts = CounterMetricFamily("cvmfsd_repository_mounts",
                                     "Successful mounts of the repository",
                                     labels=["repository"])
        failures = GaugeMetricFamily("cvmfsd_repository_consecutive_failures",
                                     "Failed boots (or crash loops) since the last good mount",
                                     labels=["repository"])
        for repo in shown:
            for s in State:
                state.add_metric([repo.name, str(s)], 1 if repo.state is s else 0)
            boots.add_metric([repo.name], repo.boots)
            mounts.add_metric([repo.name], self.observer.mounts_by_repo.get(repo.name, 0))
            failures.add_metric([repo.name], repo.failures)
        yield from (state, boots, mounts, failures)
        yield CounterMetricFamily("cvmfsd_mounts", "Successful mounts, all repositories",
                                  value=sum(self.observer.mounts_by_repo.values()))
        yield GaugeMetricFamily("cvmfsd_repository_series_dropped",
                                "Repositories left out of the per-repository series (cap)",
                                value=len(repos) - len(shown))
        requests = CounterMetricFamily("cvmfsd_control_requests",
                                       "Status socket requests by command and outcome",
                                       labels=["command", "result"])
        for (command, result), count in sorted(admin.requests.items()):
            requests.add_metric([command, result], count)
        yield requests


def build(admin: AdminApi) -> CollectorRegistry:
    prom = CollectorRegistry(auto_describe=False)
    observer = MountObserver(admin.registry, prom)
    prom.register(StateCollector(admin, observer))  # type: ignore[arg-type]
    return prom


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8"
              ) -> bytes:
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def serve(admin: AdminApi, prom: CollectorRegistry, host: str, port: int, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]
    admin.metrics_address = (str(bound[0]), int(bound[1]))  # port 0: the one the kernel chose
    log.info("metrics_listening", host=bound[0], port=bound[1], path="/metrics",
             token=bool(admin.cfg.metrics_token_file))
    limiter = trio.CapacityLimiter(MAX_CLIENTS)
    token = _token(admin.cfg.metrics_token_file)
    per_peer: dict[object, int] = {}
    peer_lookups = trio.CapacityLimiter(2)  # procfs reads, off the trio thread

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            # Slots are shared out by peer (a local user, or a remote address): whoever holds
            # connections open holds only their own share, the scraper keeps getting answers.
            peer = await trio.to_thread.run_sync(_peer, stream, limiter=peer_lookups)
            if limiter.available_tokens == 0 or per_peer.get(peer, 0) >= MAX_PER_PEER:
                with trio.move_on_after(1):
                    await stream.send_all(_response("503 Service Unavailable", b"busy\n"))
                return
            per_peer[peer] = per_peer.get(peer, 0) + 1
            try:
                async with limiter:
                    request = await _read_head(stream)
                    reply = _route(request, prom, token)
                    with trio.move_on_after(READ_TIMEOUT):
                        await stream.send_all(reply)
            finally:
                per_peer[peer] -= 1
                if not per_peer[peer]:
                    del per_peer[peer]

    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(_safe(handle), listeners, handler_nursery=nursery)


def _safe(handler: Callable[[trio.SocketStream], Any]) -> Callable[[trio.SocketStream], Any]:
    async def wrapped(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("metrics_request_failed")
    return wrapped


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    data = b""
    with trio.move_on_after(READ_TIMEOUT):
        while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) <= MAX_REQUEST:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
        return data
    return None


def _token(path: str) -> bytes | None:
    return Path(path).read_text().strip().encode() if path else None


def _authorized(request: bytes, token: bytes | None) -> bool:
    if token is None:
        return True
    for line in request.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, given = value.strip().partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
    return False


def _peer(stream: trio.SocketStream) -> object:
    """Who holds a connection: the local user for a loopback peer (the owner of its socket, from
    /proc/net/tcp*), else the remote address."""
    try:
        peer = stream.socket.getpeername()
        local = stream.socket.getsockname()
    except OSError:
        return None
    if not ipaddress.ip_address(peer[0]).is_loopback:
        return peer[0]
    uid = _socket_uid(peer, local)
    return ("uid", uid) if uid is not None else peer[0]


def _socket_uid(peer: tuple[Any, ...], local: tuple[Any, ...]) -> int | None:
    """The uid owning the peer's end of a loopback TCP connection. Blocking (procfs only)."""
    port_hex = f"{peer[1]:04X}"
    our_hex = f"{local[1]:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if (fields[1].endswith(":" + port_hex) and fields[2].endswith(":" + our_hex)):
                    return int(fields[7])
    return None


def _route(request: bytes | None, prom: CollectorRegistry, token: bytes | None = None) -> bytes:
    if request is None:
        return _response("408 Request Timeout", b"timeout\n")
    if len(request) > MAX_REQUEST:
        return _response("431 Request Header Fields Too Large", b"too large\n")
    parts = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
    if len(parts) < 2:
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"GET only\n")
    if target == b"/metrics" and not _authorized(request, token):
        return _response("401 Unauthorized", b"a bearer token is required\n")
    if target == b"/metrics":
        body = generate_latest(prom)
        reply = _response("200 OK", body, CONTENT_TYPE_PLAIN_0_0_4)
    elif target == b"/":
        reply = _response("200 OK", b"cvmfsd metrics: /metrics\n")
    else:
        return _response("404 Not Found", b"not found\n")
    if method == b"HEAD":
        reply = reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return reply


__all__ = ["MountObserver", "build", "serve"]
