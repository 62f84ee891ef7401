"""The node admin surface inside the daemon: the operations behind the status socket (status,
list, mount, umount, reload, probe), sd_notify (READY, STATUS, WATCHDOG, STOPPING), SIGHUP
reload and the optional metrics endpoint.

Everything here runs on the trio thread and only reads the registry or goes through the
mounter's public entry points (request, settle, unmount), so the lifecycle rules stay in one
place. Started by daemon.run() once the root answers; stopping() is its first shutdown step.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from .. import __version__, config
from ..config import Config, ConfigError
from ..core import kernel
from ..core.calls import BackendHung
from ..core.errors import MountError
from ..core.lifecycle import State
from ..core.mounter import Mounter
from ..core.names import InvalidName, check, check_syntax, parse_snapshot
from ..core.registry import Registry, Repo
from ..core.usage import ViewMonitor
from .api import PROTOCOL_VERSION, AdminError
from .notify import Liveness, Notifier
from .report import DetailReader, counts, iso, repo_entry

log = structlog.get_logger("cvmfsd.admin")

# Keys read once at start (sockets bound, limiters sized, the root mounted, logging set up):
# a reload that changes one of them is refused as a whole. Marked in the table of keys.
RESTART_ONLY = config.RESTART_ONLY
# Liveness checks run this often when systemd asks for no watchdog (for `status` and metrics).
LIVENESS_PERIOD = 5.0
# Seconds between attempts to start a service that failed to (e.g. the socket path in use).
SERVICE_RETRY = 5.0
MAX_NAMES = 1000


class HasConfig(Protocol):
    cfg: Config


class Admin:
    def __init__(self, cfg: Config, registry: Registry, mounter: Mounter, ops: Any,
                 upkeep: HasConfig, *, reloader: Callable[[], Config] | None = None,
                 config_file: Path | None = None, notifier: Notifier | None = None,
                 views: ViewMonitor | None = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.mounter = mounter
        self.ops = ops  # RootOperations: cfg, internal_errors
        self.upkeep = upkeep
        self.reloader = reloader
        self.config_file = config_file
        self.notifier = notifier or Notifier.from_environment()
        period = self.notifier.watchdog_period or LIVENESS_PERIOD
        self.liveness_period = period
        self.liveness = Liveness(registry, cfg.root, timeout=min(5.0, period))
        self.details = DetailReader(mounter.calls, cfg.root)
        self.views = views or ViewMonitor(registry, cfg.root, cfg.staging_dir)
        self.started_wall = time.time()
        self.started_mono = time.monotonic()
        self.requests: dict[tuple[str, str], int] = {}
        self.metrics_address: tuple[str, int] | None = None
        self.closing = False
        self._reload_lock = trio.Lock()
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        # Tells one run of the daemon from the next, also across a re-exec (same pid).
        self.instance = uuid.uuid4().hex
        self._prom: Any = None
        # Services that could not start: name -> why (a problem in `status` until they do).
        self.service_errors: dict[str, str] = {}

    # --- services -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the services; READY=1 once they run. A service that cannot start (the socket
        path is taken, the metrics port is in use) degrades the daemon instead of failing it:
        serving the root matters more, and `status`/STATUS= say what is missing."""
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # READY=1 only once the root answers a real listing through the FUSE loop.
                while not await self.liveness.check():
                    await trio.sleep(0.2)
                await self._start_service(nursery, "status socket", self._serve_control,
                                          retry=True)
                if self.cfg.metrics_address is not None:
                    await self._start_service(nursery, "metrics endpoint", self._serve_metrics,
                                              retry=True)
                nursery.start_soon(self._watchdog_loop)
                nursery.start_soon(self._status_loop)
                nursery.start_soon(self._sighup)
                self.notifier.ready(self.summary())
                # Started: what start-up allocated and freed goes back to the system.
                kernel.malloc_trim()
                log.info("admin_ready", socket=str(self.cfg.control_socket_path),
                         notify=self.notifier.enabled,
                         watchdog_s=self.notifier.watchdog_period and
                         round(self.notifier.watchdog_period * 3, 3))
                task_status.started()

    async def _serve_control(self, *, task_status: trio.TaskStatus[None]) -> None:
        from . import control

        await control.serve(self, task_status=task_status)

    async def _serve_metrics(self, *, task_status: trio.TaskStatus[None]) -> None:
        from . import metrics

        if self._prom is None:  # once: it hooks the registry's lifecycle methods
            self._prom = metrics.build(self)
        address = self.cfg.metrics_address
        assert address is not None
        await metrics.serve(self, self._prom, *address, task_status=task_status)

    async def _start_service(self, nursery: trio.Nursery, what: str,
                             service: Callable[..., Any], retry: bool) -> None:
        async def attempt() -> bool:
            try:
                await nursery.start(service)
            except OSError as exc:
                if self.service_errors.get(what) != str(exc):
                    log.error("service_unavailable", service=what, error=str(exc),
                              retry_every_s=SERVICE_RETRY if retry else None)
                self.service_errors[what] = str(exc)
                return False
            if self.service_errors.pop(what, None) is not None:
                log.info("service_available", service=what)
            return True

        async def keep_trying() -> None:
            while not await attempt():
                await trio.sleep(SERVICE_RETRY)

        if not await attempt() and retry:
            nursery.start_soon(keep_trying)

    def stopping(self, mode: str = "unmount") -> None:
        """First step of a stop (mode: the daemon's StopMode): tell systemd, stop taking
        requests. A re-exec keeps the main pid and comes back with READY=1, so systemd hears
        RELOADING=1 (like its own daemon-reexec) instead of STOPPING=1."""
        if self.closing:
            return
        self.closing = True
        busy = self.registry.active()
        if mode == "reexec":
            self.notifier.reloading()
            self.notifier.status(f"Re-executing; {busy} repositories stay mounted")
        elif mode == "handover":
            self.notifier.stopping(f"Stopping: {busy} repositories stay mounted for the next "
                                   "cvmfsd")
        else:
            self.notifier.stopping(f"Stopping: unmounting {busy} repositories")
        if self._scope is not None:
            self._scope.cancel()

    async def restart(self) -> dict[str, Any]:
        """Hand over to a fresh exec of this program (SIGUSR2, as the daemon defines it):
        same pid, the code now on disk, mounts taken over without a failed read. The signal
        goes out just after the reply."""
        if self.closing or self.mounter.closing:
            raise AdminError("shutting_down", "cvmfsd is shutting down")
        assert self._nursery is not None

        async def later() -> None:
            await trio.sleep(0.2)
            log.info("restart_requested", via="cvmfsctl")
            os.kill(os.getpid(), signal.SIGUSR2)

        self._nursery.start_soon(later)
        return {"pid": os.getpid(), "instance": self.instance, "restarting": True}

    async def _watchdog_loop(self) -> None:
        """Feed the systemd watchdog only after the root answered; the same checks keep the
        `degraded` flag current when there is no watchdog."""
        while True:
            started = trio.current_time()
            if await self.liveness.check() and self.notifier.watchdog_period is not None:
                self.notifier.watchdog()
            await trio.sleep_until(started + self.liveness_period)

    async def _status_loop(self) -> None:
        last = ""
        while True:
            text = self.summary()
            if text != last:
                self.notifier.status(text)
                last = text
            await trio.sleep(1.0)

    async def _sighup(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                try:
                    result = await self.reload()
                    log.info("sighup_reload", changed=result["changed"])
                except AdminError as exc:
                    log.error("sighup_reload_failed", error=exc.message)

    # --- reports ------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        out = []
        if self.liveness.ok is False:
            out.append(f"root not answering: {self.liveness.error}")
        for what, why in self.service_errors.items():
            out.append(f"{what} unavailable: {why}")
        hung = self.mounter.calls.hung()
        if hung:
            out.append(f"{len(hung)} repositories' cvmfs2 not answering: "
                       + ", ".join(f"{name} ({seconds:.0f} s)" for name, seconds in
                                   sorted(hung.items())[:5]))
        if self.ops.internal_errors:
            out.append(f"{self.ops.internal_errors} unexpected errors in FUSE handlers "
                       "(see the log)")
        if self.mounter.closing or self.closing:
            out.append("shutting down")
        return out

    def summary(self) -> str:
        c = counts(self.registry)
        text = (f"{c['mounted']} mounted, {c['failed']} failed, {c['booting']} booting "
                f"under {self.cfg.root}")
        problems = self.problems()
        if problems:
            text += "; degraded: " + problems[0]
        return text

    def status(self) -> dict[str, Any]:
        problems = self.problems()
        state = "stopping" if self.closing or self.mounter.closing else (
            "degraded" if problems else "running")
        return {
            "daemon": "cvmfsd", "version": __version__, "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(), "instance": self.instance, "state": state,
            "degraded": bool(problems), "problems": problems, "started_at": iso(self.started_wall),
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "root": str(self.cfg.root), "run_dir": str(self.cfg.run_dir),
            "control_socket": str(self.cfg.control_socket_path),
            "config_file": None if self.config_file is None else str(self.config_file),
            "repositories": counts(self.registry),
            "boots_total": self.registry.boots_total,
            "liveness": self.liveness.as_dict(),
            "systemd": {"notify": self.notifier.enabled,
                        "watchdog_usec": self.notifier.watchdog_usec},
            "metrics": None if self.metrics_address is None
            else f"{self.metrics_address[0]}:{self.metrics_address[1]}",
            "fuse_internal_errors": self.ops.internal_errors,
            **self._views_report(None),
        }

    async def status_report(self) -> dict[str, Any]:
        """status(), with stale views from a scan at most a few seconds old."""
        await self.views.refresh()
        return self.status()

    def _views_report(self, names: set[str] | None) -> dict[str, Any]:
        """Stale views (mounts of devices no longer served: a subPath below a repository's root
        after a heal, a pod copy whose connection is gone) from the last scan, and that scan."""
        scan = self.views.last
        stale = [s.as_dict() for s in self.views.stale(scan)
                 if names is None or s.repository.rsplit("/", 1)[-1] in names]
        return {"stale_views": stale, "views_scan": None if scan is None else scan.summary()}

    async def list(self, names: list[str] | None, details: bool) -> dict[str, Any]:
        repos = sorted(self.registry, key=lambda r: r.name)
        unknown: list[str] = []
        if names is not None:
            known = {r.name for r in repos}
            unknown = [n for n in names if n not in known]
            repos = [r for r in repos if r.name in set(names)]
        extra = await self.details.read(repos, deadline=3.0) if details else {}
        await self.views.refresh()
        return {"repositories": [repo_entry(r, extra.get(r.name)) for r in repos],
                "unknown": unknown,
                **self._views_report(None if names is None else set(names))}

    # --- operations ---------------------------------------------------------------------------
    def _repo_for(self, name: str) -> Repo:
        """The registry entry for a name an admin typed, validated like a lookup would be."""
        repo = self.registry.get(name)
        if repo is not None:
            return repo
        try:
            if "@" in name:  # a pinned snapshot, as under <root>/.snapshots/
                fqrn, pin = parse_snapshot(name, self.cfg.policy)
                return self.registry.candidate(name, fqrn, pin)
            check(name, self.cfg.policy)
        except InvalidName as exc:
            raise AdminError("invalid_name", f"{name!r}: {exc}") from None
        return self.registry.candidate(name)

    def _timeout(self, requested: float | None) -> float:
        return requested if requested is not None else self.cfg.mount_timeout + 5.0

    async def _mount_now(self, repo: Repo, timeout: float) -> bool:
        """Mount now, overriding a failure's backoff (an admin asked); True if it was not
        mounted before. Raises MountError."""
        deadline = trio.current_time() + timeout
        if repo.state is State.UNMOUNTING:
            with trio.move_on_at(deadline):
                await repo.settled.wait()
        if repo.state is State.MOUNTED:
            return False
        if repo.state is State.FAILED:
            repo.retry_at = min(repo.retry_at, trio.current_time())
        self.mounter.request(repo)
        await self.mounter.settle(repo, max(0.0, deadline - trio.current_time()))
        return True

    async def mount(self, name: str, timeout: float | None) -> dict[str, Any]:
        if self.mounter.closing:
            raise AdminError("shutting_down", "cvmfsd is shutting down")
        repo = self._repo_for(name)
        changed = await self._mount_now(repo, self._timeout(timeout))
        extra = await self.details.read([repo], deadline=3.0)
        return {"repository": repo_entry(repo, extra.get(repo.name)), "changed": changed}

    async def umount(self, name: str, force: bool, timeout: float | None) -> dict[str, Any]:
        repo = self.registry.get(name)
        if repo is None:
            try:
                # Syntax only: a name denied since it was mounted can still be unmounted.
                check_syntax(name.partition("@")[0])
            except InvalidName as exc:
                raise AdminError("invalid_name", f"{name!r}: {exc}") from None
            return {"repository": None, "changed": False}
        deadline = trio.current_time() + self._timeout(timeout)
        if repo.state in (State.BOOTING, State.UNMOUNTING):
            with trio.move_on_at(deadline):
                await repo.settled.wait()
        if repo.state is not State.MOUNTED:
            return {"repository": repo_entry(repo), "changed": False}
        if not force:
            # Copies of the mount that umount2 does not see (per-repository and pinned volumes,
            # subPath binds, pods' copies of them): refused with where they are.
            usage = await self.views.usage([repo])
            if repo.state is State.MOUNTED and usage.busy(name):
                raise AdminError("busy", f"{name} is busy: {usage.why(name)}; --force detaches it "
                                         "lazily (and stops the pods' view of it)",
                                 repository=repo_entry(repo),
                                 uses=[v.as_dict() for v in usage.uses(name)])
            if repo.state is not State.MOUNTED:
                return {"repository": repo_entry(repo), "changed": False}
        if not await self.mounter.unmount(repo, reason="cvmfsctl", lazy=force):
            raise AdminError("busy", f"{name} is busy (open files or working directories, "
                                     "maybe inside a pod); --force detaches it lazily",
                             repository=repo_entry(repo))
        return {"repository": repo_entry(repo), "changed": True}

    async def reload(self) -> dict[str, Any]:
        if self.reloader is None:
            raise AdminError("reload_failed", "this daemon was started without a "
                                              "configuration source to re-read")
        async with self._reload_lock:
            old = self.cfg
            self.notifier.reloading()
            try:
                new = await trio.to_thread.run_sync(self.reloader)
            except ConfigError as exc:
                raise AdminError("reload_failed", f"{exc}; nothing was changed") from None
            finally:
                self.notifier.ready(self.summary())
            changed = [f.name for f in fields(Config) if getattr(old, f.name) !=
                       getattr(new, f.name)]
            fixed = [key for key in changed if key in RESTART_ONLY]
            if fixed:
                raise AdminError("reload_failed",
                                 f"{', '.join(fixed)} cannot change while cvmfsd runs "
                                 "(restart it); nothing was changed", keys=fixed)
            # Between awaits: every holder switches at once; running mounts are untouched.
            for holder in (self.mounter, self.ops, self.upkeep, self):
                holder.cfg = new
            log.info("reloaded", changed=changed, config_file=self.config_file and
                     str(self.config_file))
            return {"changed": changed}

    async def probe(self, names: list[str] | None, timeout: float | None) -> dict[str, Any]:
        """Like `cvmfs_config probe`: mount each repository and list its root."""
        if self.mounter.closing:
            raise AdminError("shutting_down", "cvmfsd is shutting down")
        if names is None:
            # Not every name seen: any user can make those up to max_names (4,096 by default,
            # more than a probe takes), failed ones among them, whose backoff a probe overrides
            # (one boot each, of names an attacker chose). What is in use is what to check.
            names = list(self.cfg.probe_repositories) or sorted(
                r.name for r in self.registry if r.state in (State.MOUNTED, State.BOOTING))
        if len(names) > MAX_NAMES:
            raise AdminError("bad_request", f"at most {MAX_NAMES} names per probe")
        wait = self._timeout(timeout)
        results: dict[str, dict[str, Any]] = {}

        async def one(name: str) -> None:
            started = trio.current_time()
            result: dict[str, Any] = {"name": name, "ok": False, "error": None,
                                      "revision": None}
            try:
                repo = self._repo_for(name)
                await self._mount_now(repo, wait)
                result["revision"] = await self._check_listing(repo)
                result["ok"] = True
            except AdminError as exc:
                result["error"] = {"message": exc.message, "code": exc.code}
            except MountError as exc:
                result["error"] = exc.as_dict()
            except OSError as exc:
                result["error"] = {"message": f"listing failed: {exc}"}
            repo_now = self.registry.get(name)
            result["state"] = str(repo_now.state) if repo_now else None
            result["duration_ms"] = round((trio.current_time() - started) * 1000, 1)
            results[name] = result

        async with trio.open_nursery() as nursery:
            for name in dict.fromkeys(names):
                nursery.start_soon(one, name)
        ordered = [results[n] for n in dict.fromkeys(names)]
        return {"results": ordered, "ok": all(r["ok"] for r in ordered)}

    async def _check_listing(self, repo: Repo) -> int | None:
        """List the mounted repository's root and read its revision, bounded."""
        path = self.cfg.root / repo.path

        def look() -> int | None:
            os.listdir(path)
            try:
                return int(os.getxattr(path, "user.revision"))
            except (OSError, ValueError):
                return None

        try:
            return await self.mounter.calls.call(repo, look, 10.0)
        except BackendHung as exc:
            raise OSError(f"no answer from {path}: {exc}") from None


__all__ = ["PROTOCOL_VERSION", "RESTART_ONLY", "Admin", "AdminError"]
