"""The daemon's configuration: one TOML file with documented defaults, overridable by flags.

An invalid configuration raises ConfigError before anything is mounted.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .names import InvalidName, NamePolicy, check_syntax

DEFAULT_CONFIG_PATH = Path("/etc/cvmfsd/cvmfsd.toml")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    # Where the lazy root is served.
    root: Path = Path("/cvmfs")
    # Runtime directory: staging mounts, state file, status socket.
    run_dir: Path = Path("/run/cvmfsd")
    # The CernVM-FS client. Production: /usr/bin/cvmfs2 from the cvmfs package.
    cvmfs2: Path = Path("/usr/bin/cvmfs2")
    # The user cvmfs2 drops root to (its `uid=`/`gid=` options, as the system mount helper passes
    # for CVMFS_USER). Empty, or a user that does not exist: cvmfs2 keeps running as root.
    cvmfs2_user: str = "cvmfs"
    # Workspaces (cache base, sockets) of pinned snapshot instances: two instances of one
    # repository cannot share a workspace.
    snapshot_dir: Path = Path("/var/lib/cvmfsd/snapshots")
    # Empty: cvmfs2 reads the node's /etc/cvmfs hierarchy (and the config repository).
    # Otherwise exactly these files, passed as `-o config=a:b` (no /etc defaults).
    cvmfs2_config: tuple[Path, ...] = ()
    # Glob patterns on the repository name; deny wins over allow.
    allow: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()
    # The config repository that cvmfs2 itself reads under the root while booting another
    # repository: it bypasses the boot limit so that a full limit cannot deadlock on it.
    config_repository: str = "cvmfs-config.cern.ch"
    # Seconds a cvmfs2 boot may take before it is killed and reported.
    mount_timeout: float = 60.0
    max_concurrent_boots: int = 8
    # After a failed boot, lookups fail at once for backoff_initial * 2**(failures-1) seconds,
    # capped at backoff_max, so a loop of lookups does not start one cvmfs2 per lookup (autofs
    # remembers a failed key for 60 s too).
    backoff_initial: float = 60.0
    backoff_max: float = 600.0
    # Names that hold no mount (idle, failed) kept at most, least recently used out first; a
    # failed one keeps its backoff while it is kept. The kernel is told to forget the others.
    max_names: int = 4096
    # Shares of one requester (a uid, and the pod for a process in a Kubernetes pod): boot slots
    # its boots use at once (more wait their turn), mounts it started that are held (more: its
    # lookups of new names fail with ENOSPC), requests waiting in the root (more: EAGAIN).
    # 0 = derived from the global limit: half of max_concurrent_boots, half of max_mounted, an
    # eighth of fuse_max_tasks.
    requester_boots: int = 0
    requester_mounts: int = 0
    requester_waits: int = 0
    # Pinned snapshot instances one repository may have mounted at once.
    max_pins_per_repository: int = 8
    # Seconds a handler waits for an attach before it answers (DESIGN.md §5: every wait is
    # bounded). 0 means mount_timeout + 5.
    attach_wait: float = 0.0
    # Idle expiry like autofs: unmount a repository nobody opened anything in for this many
    # seconds (0 = never), only with umount2(path, 0): busy (also in a pod's view) means keep.
    expire_timeout: float = 300.0
    # A mount younger than this is never expired: the VFS retries ESTALE only once.
    expire_min_age: float = 10.0
    # How often mounts are checked against mountinfo and their processes (a backstop: a dying
    # backend is noticed at once through its pidfd).
    reconcile_interval: float = 10.0
    # A backend that leaves one of the daemon's calls (an xattr, a stat) unanswered this long is
    # killed, and the repository healed; until then it is reported hung.
    backend_hung_timeout: float = 60.0
    # Mounted (or booting) repositories at most; 0 = unlimited.
    max_mounted: int = 1000
    # A backend that dies more than restart_burst times within restart_window seconds is
    # backed off like a failed boot instead of being healed at once.
    restart_burst: int = 10
    restart_window: float = 60.0
    # Concurrent FUSE requests; waiting handlers occupy one each.
    fuse_max_tasks: int = 512
    log_level: str = "info"
    log_format: str = "auto"  # auto: JSON unless stderr is a TTY; or "json", "console"
    # What SIGTERM/SIGINT do. "unmount": unmount every repository, stop cvmfs2, unmount the root.
    # "handover": leave repositories mounted and served, for the next cvmfsd to take over
    # without a failed read (systemctl restart, package upgrades); the root answers nothing new
    # until then. SIGUSR2 always hands over to a re-executed cvmfsd.
    stop_mode: str = "unmount"
    # --- node admin surface (cvmfsd/admin.py, control.py, metrics.py) ---------------------
    # The status socket that cvmfsctl talks to. Empty: <run_dir>/cvmfsd.sock.
    control_socket: str = ""
    # Members of this group (name or gid) may use the status socket too (mode 0660); empty:
    # root only (mode 0600).
    admin_group: str = ""
    # Prometheus endpoint, "HOST:PORT" or "PORT" (= 127.0.0.1:PORT); empty: off.
    metrics_listen: str = ""
    # What `cvmfsctl probe` mounts and checks, like CVMFS_REPOSITORIES for `cvmfs_config
    # probe`. Empty: the repositories mounted (or booting) now.
    probe_repositories: tuple[str, ...] = ()

    @property
    def staging_dir(self) -> Path:
        return self.run_dir / "staging"

    @property
    def policy(self) -> NamePolicy:
        return NamePolicy(allow=self.allow, deny=self.deny)

    @property
    def requester_limits(self) -> tuple[int, int, int]:
        """(boots, mounts, waits) one requester may hold."""
        return (self.requester_boots or max(1, self.max_concurrent_boots // 2),
                self.requester_mounts or max(1, (self.max_mounted or 2000) // 2),
                self.requester_waits or max(1, self.fuse_max_tasks // 8))

    @property
    def handler_wait(self) -> float:
        return self.attach_wait or self.mount_timeout + 5.0

    @property
    def control_socket_path(self) -> Path:
        return Path(self.control_socket) if self.control_socket else self.run_dir / "cvmfsd.sock"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_listen(self.metrics_listen) if self.metrics_listen else None


_PATHS = {"root", "run_dir", "cvmfs2", "snapshot_dir"}
_FLOATS = {"mount_timeout", "backoff_initial", "backoff_max", "attach_wait", "expire_timeout",
           "expire_min_age", "reconcile_interval", "restart_window", "backend_hung_timeout"}
_INTS = {"max_concurrent_boots", "fuse_max_tasks", "max_mounted", "restart_burst", "max_names",
         "requester_boots", "requester_mounts", "requester_waits", "max_pins_per_repository"}
_STR_LISTS = {"allow", "deny", "probe_repositories"}
_LOG_LEVELS = {"debug", "info", "warning", "error"}


def _coerce(key: str, value: Any) -> Any:
    if key in _PATHS:
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        path = Path(value)
        if not path.is_absolute():
            raise ConfigError(f"{key}: must be an absolute path, got {str(path)!r}")
        return Path(os.path.normpath(path))
    if key == "cvmfs2_config":
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of file paths")
        return tuple(_coerce("root", v) for v in value)
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if key in _STR_LISTS:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: expected a list of non-empty glob patterns")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _validate(cfg: Config) -> Config:
    problems = []
    if cfg.mount_timeout <= 0:
        problems.append("mount_timeout must be > 0")
    if cfg.attach_wait < 0:
        problems.append("attach_wait must be >= 0")
    if cfg.max_concurrent_boots < 1:
        problems.append("max_concurrent_boots must be >= 1")
    if cfg.expire_timeout < 0 or cfg.expire_min_age < 0.2:
        problems.append("expire_timeout must be >= 0 and expire_min_age >= 0.2")
    if cfg.reconcile_interval <= 0 or cfg.restart_window <= 0 or cfg.backend_hung_timeout <= 0:
        problems.append("reconcile_interval, restart_window and backend_hung_timeout must be > 0")
    if cfg.max_mounted < 0 or cfg.restart_burst < 1:
        problems.append("max_mounted must be >= 0 and restart_burst >= 1")
    if cfg.fuse_max_tasks < 8:
        problems.append("fuse_max_tasks must be >= 8")
    if cfg.max_names < 16 or cfg.max_pins_per_repository < 1:
        problems.append("max_names must be >= 16 and max_pins_per_repository >= 1")
    if min(cfg.requester_boots, cfg.requester_mounts, cfg.requester_waits) < 0:
        problems.append("requester_boots, requester_mounts and requester_waits must be >= 0")
    if not 0 < cfg.backoff_initial <= cfg.backoff_max:
        problems.append("need 0 < backoff_initial <= backoff_max")
    if cfg.log_level not in _LOG_LEVELS:
        problems.append(f"log_level must be one of {sorted(_LOG_LEVELS)}")
    if cfg.stop_mode not in {"unmount", "handover"}:
        problems.append("stop_mode must be unmount or handover")
    if cfg.log_format not in {"auto", "json", "console"}:
        problems.append("log_format must be auto, json or console")
    if cfg.root == Path("/") or cfg.root == cfg.run_dir or cfg.run_dir.is_relative_to(cfg.root):
        problems.append("run_dir must lie outside root, and root must not be /")
    if cfg.snapshot_dir.is_relative_to(cfg.root):
        problems.append("snapshot_dir must lie outside root")
    for path in cfg.cvmfs2_config:
        # These become one `-o config=a:b` option: a ':' or ',' would split it, '=' is confusing.
        if any(c in str(path) for c in ":,=\n"):
            problems.append(f"cvmfs2_config entry {str(path)!r} contains ':', ',', '=' or newline")
        elif not path.is_file():
            problems.append(f"cvmfs2_config entry {str(path)!r} is not a readable file")
    if not (cfg.cvmfs2.is_file() and os.access(cfg.cvmfs2, os.X_OK)):
        problems.append(f"cvmfs2 binary {str(cfg.cvmfs2)!r} is not an executable file")
    for pattern in cfg.allow + cfg.deny:
        if "/" in pattern or "\x00" in pattern:
            problems.append(f"pattern {pattern!r} contains '/' or NUL")
    if cfg.config_repository:
        try:
            check_syntax(cfg.config_repository)
        except InvalidName as exc:
            problems.append(f"config_repository {cfg.config_repository!r}: {exc}")
        if not cfg.policy.permits(cfg.config_repository):
            problems.append(f"config_repository {cfg.config_repository!r} is denied by the policy")
    problems += _admin_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return cfg


# --- node admin surface keys ----------------------------------------------------------------
def parse_listen(value: str) -> tuple[str, int]:
    """"PORT", ":PORT", "HOST:PORT" or "[V6]:PORT" -> (host, port); the host defaults to
    loopback: metrics are for a node-local scraper unless the admin says otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics_listen: bad port in {value!r} (HOST:PORT or PORT)")
    return host, int(port)


def admin_gid(group: str) -> int | None:
    """The admin group's gid (a name or a number); None when no group is configured."""
    import grp

    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"admin_group: no group named {group!r}") from None


def _admin_problems(cfg: Config) -> list[str]:
    problems = []
    if cfg.control_socket:
        path = Path(cfg.control_socket)
        if not path.is_absolute():
            problems.append("control_socket must be an absolute path")
        elif path.is_relative_to(cfg.root):
            problems.append("control_socket must lie outside root")
        elif len(os.fsencode(path)) > 107:  # sockaddr_un.sun_path
            problems.append("control_socket path is longer than 107 bytes")
    for check in (lambda: admin_gid(cfg.admin_group),
                  lambda: cfg.metrics_address):
        try:
            check()
        except ValueError as exc:
            problems.append(str(exc))
    for name in cfg.probe_repositories:
        try:
            check_syntax(name)
        except InvalidName as exc:
            problems.append(f"probe_repositories entry {name!r}: {exc}")
    return problems


def build(values: dict[str, Any], base: Config | None = None) -> Config:
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    return _validate(replace(base or Config(), **coerced))


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file (missing default file = defaults), then apply flag overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except FileNotFoundError:
            if path != DEFAULT_CONFIG_PATH:
                raise ConfigError(f"configuration file {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise ConfigError(f"cannot read {str(path)!r}: {exc}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build(values)

