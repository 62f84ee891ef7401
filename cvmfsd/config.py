"""The daemon's configuration: one TOML file with documented defaults, overridable by flags.

Every key is declared once, as a field of Config made with key(): its type (the annotation),
default, one-line help, whether only a restart changes it, and more text for the example file.
Everything else comes from that one table (KEYS): the flags of `cvmfsd` (cli.py), what
`check-config` prints, reload's RESTART_ONLY (admin/service.py), systemd/cvmfsd.toml.example and the
key table in README.md. Adding a key is one key() line, then
`python -m cvmfsd.config --write-docs` (tests/test_config.py fails until the documents match).

An invalid configuration raises ConfigError, naming the key, before anything is mounted.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import textwrap
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from .core.names import InvalidName, NamePolicy, check_syntax

DEFAULT_CONFIG_PATH = Path("/etc/cvmfsd/cvmfsd.toml")


class ConfigError(ValueError):
    pass


def key(default: Any, help: str, *, restart: bool = False, doc: str = "",
        choices: tuple[str, ...] = (), section: str = "", metavar: str = "") -> Any:
    """One configuration key: a Config field carrying what the flags, check-config, the
    example file, the README table and reload need to know about it.

    help: one line (flag help, README). restart: only a restart changes it; a reload that
    changes it is refused as a whole. doc: more comment lines for the example file. section:
    a heading in the example file before this key. metavar: the flag's value in --help."""
    return field(default=default, metadata={
        "help": help, "restart": restart, "doc": doc, "choices": choices, "section": section,
        "metavar": metavar})


@dataclass(frozen=True)
class Config:
    root: Path = key(Path("/cvmfs"), "where the lazy root is served", restart=True,
                     section="Where things are")
    run_dir: Path = key(Path("/run/cvmfsd"), "runtime directory: the staging tmpfs "
                        "(staging/), the hand-over state, the status socket", restart=True)
    cvmfs2: Path = key(Path("/usr/bin/cvmfs2"), "the CernVM-FS client binary (package cvmfs)",
                       section="The CernVM-FS client")
    # Looked up once at start (the mounter keeps the credentials).
    cvmfs2_user: str = key(
        "cvmfs", "the user cvmfs2 drops root to (its uid=/gid= options, as the mount helper "
        "passes for CVMFS_USER); \"\" or a user that does not exist: cvmfs2 stays root",
        restart=True, metavar="USER")
    cvmfs2_config: tuple[Path, ...] = key(
        (), "empty: cvmfs2 reads the node's /etc/cvmfs hierarchy; else exactly these files "
        "(`-o config=a:b`)",
        doc="The node's hierarchy is default.conf, default.d, default.local, domain.d, "
            "config.d and the config repository.")
    # Exempt from the boot limit: a boot that reads it must not queue behind itself.
    config_repository: str = key(
        "cvmfs-config.cern.ch", "the config repository cvmfs2 reads under the root while "
        "booting others: booted outside the boot limit, always allowed (deny still wins); "
        "\"\" = none", metavar="NAME",
        doc="Set it to what the node's CVMFS_CONFIG_REPOSITORY names (OSG nodes: "
            "\"config-osg.opensciencegrid.org\"), so that a full boot limit cannot hold up "
            "the lookup cvmfs2 makes of it while booting another repository. `allow` need not "
            "list it.")
    snapshot_dir: Path = key(
        Path("/var/lib/cvmfsd/snapshots"), "workspaces (cache base, sockets) of pinned "
        "snapshot instances: two instances of one repository cannot share one")
    allow: tuple[str, ...] = key(("*",), "glob patterns of repository names that may be "
                                 "mounted", section="Which names may be mounted (deny wins)",
                                 metavar="GLOB")
    deny: tuple[str, ...] = key((), "glob patterns of repository names that may not; deny "
                                "wins over allow", metavar="GLOB")
    mount_timeout: float = key(60.0, "seconds a cvmfs2 boot may take before it is killed and "
                               "reported", section="Boots and failures")
    max_concurrent_boots: int = key(8, "cvmfs2 boots running at once, plus a quarter (at least "
                                    "1) kept for requesters with no boot running", restart=True)
    max_mounted: int = key(1000, "mounted (or booting) repositories at most, beyond that a "
                           "lookup fails with ENOSPC; 0 = no limit")
    backoff_initial: float = key(60.0, "after a failed boot, lookups fail at once for "
                                 "backoff_initial * 2^(n-1) s", restart=True,
                                 doc="Like autofs, which remembers a failed key for 60 s. "
                                     "`cvmfsctl mount NAME` retries at once.")
    backoff_max: float = key(600.0, "the longest backoff, in seconds", restart=True)
    # The registry is sized with it at start.
    max_names: int = key(4096, "names that hold no mount (idle, failed) kept at most, least "
                         "recently used out first; a failed one keeps its backoff while kept "
                         "(>= 16)", restart=True)
    # One requester: a uid, and the pod for a process in a Kubernetes pod. Boot shares are
    # made once per requester, so only a restart changes them.
    requester_boots: int = key(0, "boot slots one requester's boots use at once (more wait "
                               "their turn); 0 = a quarter of max_concurrent_boots", restart=True)
    requester_mounts: int = key(0, "mounts one requester started that may be held (more: its "
                                "lookups of new names fail with ENOSPC); 0 = a quarter of "
                                "max_mounted")
    requester_failed_boots: int = key(60, "failed boots one requester may cause per minute "
                                      "(a burst of as many, then one every 60/n s); past it, "
                                      "its lookups that would boot fail with EAGAIN; 0 = no "
                                      "limit", restart=True)
    requester_waits: int = key(0, "requests of one requester waiting in the root (more: "
                               "EAGAIN); 0 = an eighth of fuse_max_tasks")
    max_pins_per_repository: int = key(8, "pinned snapshot instances one repository may have "
                                       "mounted at once (>= 1)")
    restart_burst: int = key(10, "a backend that dies more than restart_burst times within "
                             "restart_window is backed off instead of healed", restart=True)
    restart_window: float = key(60.0, "seconds over which backend deaths are counted",
                                restart=True)
    expire_timeout: float = key(
        300.0, "unmount a repository nobody opened anything in for this many seconds; 0 = "
        "never", section="Idle expiry and upkeep",
        doc="Only umount2(path, 0): a busy repository (an open file, a working directory, "
            "also in a pod) stays mounted.")
    # The VFS retries ESTALE only once: a walk that raced an expiry must find the name
    # mounted again, not expired a second time.
    expire_min_age: float = key(10.0, "a mount younger than this many seconds is never "
                                "expired (>= 0.2)")
    # A dying backend is noticed at once through its pidfd; this is the backstop.
    reconcile_interval: float = key(
        10.0, "seconds between checks of every mount against mountinfo (a backstop for an "
        "external unmount or an aborted connection)")
    # calls.py: one stuck call per backend holds one worker thread until then.
    backend_hung_timeout: float = key(
        60.0, "a cvmfs2 that leaves a call of the daemon's (an xattr, a stat) unanswered this "
        "many seconds is killed and its repository healed; until then it is reported hung")
    # Requests waiting for an attach hold one task each.
    fuse_max_tasks: int = key(512, "concurrent FUSE requests (>= 8)", restart=True)
    # SIGUSR2 always hands over, to a re-executed cvmfsd (an upgrade in place).
    stop_mode: str = key(
        "unmount", "what SIGTERM does: unmount everything, or hand the mounts over to the "
        "next cvmfsd", restart=True, choices=("unmount", "handover"),
        section="Stopping",
        doc="\"unmount\": unmount every repository, stop cvmfs2, unmount the root. "
            "\"handover\": leave repositories mounted and served for the next cvmfsd, which "
            "takes them over without a failed read (zero-downtime restarts and upgrades; the "
            "unit's KillMode=process keeps cvmfs2 alive for that). The systemd unit passes "
            "--stop-mode handover, which wins over this file.")
    log_level: str = key("info", "log level", restart=True,
                         choices=("debug", "info", "warning", "error"), section="Logging")
    log_format: str = key("auto", "JSON lines, console, or auto: JSON unless stderr is a "
                          "terminal", restart=True, choices=("auto", "json", "console"))
    control_socket: str = key("", "the status socket cvmfsctl uses; \"\" = "
                              "run_dir/cvmfsd.sock", restart=True,
                              section="Node admin surface", metavar="PATH")
    admin_group: str = key("", "group (name or gid) that may use the status socket besides "
                           "root (mode 0660); \"\" = root only (0600)", restart=True,
                           metavar="GROUP")
    metrics_listen: str = key("", "Prometheus endpoint: PORT (on 127.0.0.1) or HOST:PORT; "
                              "\"\" = off", restart=True, metavar="[HOST:]PORT")
    # Without it any local user may read the metrics, repository names included.
    metrics_token_file: str = key("", "a file whose content a scrape must send as `Authorization: "
                                  "Bearer <token>` (Prometheus: authorization.credentials_file); "
                                  "\"\" = no token", restart=True, metavar="PATH")
    probe_repositories: tuple[str, ...] = key(
        (), "what `cvmfsctl probe` checks; empty = the repositories mounted (or booting) now",
        metavar="NAME",
        doc="Like CVMFS_REPOSITORIES for `cvmfs_config probe`. For example:\n"
            "  probe_repositories = [\"cvmfs-config.cern.ch\", \"atlas.cern.ch\"]")

    @property
    def staging_dir(self) -> Path:
        return self.run_dir / "staging"

    @property
    def policy(self) -> NamePolicy:
        # cvmfs2 itself looks the config repository up while it boots any allowed repository:
        # a node that allows only its own domain must not lose it (deny still wins).
        extra = (self.config_repository,) if self.config_repository else ()
        return NamePolicy(allow=self.allow + extra, deny=self.deny)

    @property
    def requester_limits(self) -> tuple[int, int, int]:
        """(boots, mounts, waits) one requester may hold."""
        return (self.requester_boots or max(1, self.max_concurrent_boots // 4),
                self.requester_mounts or max(1, (self.max_mounted or 4000) // 4),
                self.requester_waits or max(1, self.fuse_max_tasks // 8))

    @property
    def handler_wait(self) -> float:
        """The bound of every wait in a handler of the root (a FUSE request the daemon has read
        is unkillable for the caller): for a name's mount to be put in place, a failed one to
        be taken away, an unmount or a forget to finish. Each lasts about a millisecond; the
        boot itself is waited for in the kernel, bounded by mount_timeout."""
        return self.mount_timeout + 5.0

    @property
    def control_socket_path(self) -> Path:
        return Path(self.control_socket) if self.control_socket else self.run_dir / "cvmfsd.sock"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return parse_listen(self.metrics_listen) if self.metrics_listen else None


# --- the table of keys ------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # path, paths, float, int, bool, str, strings
    default: Any
    help: str
    restart: bool
    doc: str
    choices: tuple[str, ...]
    section: str
    metavar: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_list(self) -> bool:
        return self.kind in ("paths", "strings")


_METAVARS = {"path": "PATH", "paths": "FILE", "float": "NUMBER", "int": "N", "bool": "",
             "str": "TEXT", "strings": "VALUE"}
_KINDS: dict[Any, str] = {Path: "path", tuple[Path, ...]: "paths", float: "float", int: "int",
                          bool: "bool", str: "str", tuple[str, ...]: "strings"}


def _table() -> tuple[Key, ...]:
    hints = get_type_hints(Config)
    keys = []
    for f in fields(Config):
        if "help" not in f.metadata:
            raise TypeError(f"Config.{f.name} is not declared with key()")
        kind = _KINDS.get(hints[f.name])
        if kind is None:
            raise TypeError(f"Config.{f.name}: no configuration kind for {hints[f.name]}")
        keys.append(Key(f.name, kind, f.default, f.metadata["help"], f.metadata["restart"],
                        f.metadata["doc"], f.metadata["choices"], f.metadata["section"],
                        f.metadata["metavar"] or _METAVARS[kind]))
    return tuple(keys)


KEYS = _table()
BY_NAME = {k.name: k for k in KEYS}
RESTART_ONLY = frozenset(k.name for k in KEYS if k.restart)
_LOG_LEVELS = set(BY_NAME["log_level"].choices)


def _coerce(key: Key, value: Any) -> Any:
    name = key.name
    if key.kind == "path":
        return _path(name, value)
    if key.kind == "paths":
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list of absolute file paths, got {value!r}")
        return tuple(_path(f"{name}[{i}]", v) for i, v in enumerate(value))
    if key.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if key.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if key.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if key.kind == "strings":
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{name}[{i}]: expected a non-empty string, got {v!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{name}: must be one of {', '.join(key.choices)}, got {value!r}")
    return value


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"{name}: expected a path, got {value!r}")
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"{name}: must be an absolute path, got {str(path)!r}")
    return Path(os.path.normpath(path))


# Lower bounds of numeric keys: (key, strictly greater, bound).
_BOUNDS: tuple[tuple[str, bool, float], ...] = (
    ("mount_timeout", True, 0), ("max_concurrent_boots", False, 1),
    ("expire_timeout", False, 0), ("expire_min_age", False, 0.2),
    ("reconcile_interval", True, 0), ("backend_hung_timeout", True, 0),
    ("restart_window", True, 0), ("max_mounted", False, 0), ("restart_burst", False, 1),
    ("fuse_max_tasks", False, 8), ("max_names", False, 16),
    ("max_pins_per_repository", False, 1), ("requester_boots", False, 0),
    ("requester_mounts", False, 0), ("requester_waits", False, 0),
    ("requester_failed_boots", False, 0),
)


def _validate(cfg: Config) -> Config:
    problems = []
    for name, strict, bound in _BOUNDS:
        value = getattr(cfg, name)
        if value <= bound if strict else value < bound:
            problems.append(f"{name} must be {'>' if strict else '>='} {bound}")
    if not 0 < cfg.backoff_initial <= cfg.backoff_max:
        problems.append("backoff_initial and backoff_max: need 0 < backoff_initial <= "
                        "backoff_max")
    if cfg.root == Path("/"):
        problems.append("root must not be /")
    if cfg.root == cfg.run_dir or cfg.run_dir.is_relative_to(cfg.root):
        problems.append("run_dir must lie outside root")
    if cfg.snapshot_dir.is_relative_to(cfg.root):
        problems.append("snapshot_dir must lie outside root")
    for i, path in enumerate(cfg.cvmfs2_config):
        # These become one `-o config=a:b` option: a ':' or ',' would split it, '=' is confusing.
        if any(c in str(path) for c in ":,=\n"):
            problems.append(f"cvmfs2_config[{i}] {str(path)!r} contains ':', ',', '=' or "
                            "newline")
        elif not path.is_file():
            problems.append(f"cvmfs2_config[{i}] {str(path)!r} is not a readable file")
    if not (cfg.cvmfs2.is_file() and os.access(cfg.cvmfs2, os.X_OK)):
        problems.append(f"cvmfs2 {str(cfg.cvmfs2)!r} is not an executable file")
    for name in ("allow", "deny"):
        for i, pattern in enumerate(getattr(cfg, name)):
            if "/" in pattern or "\x00" in pattern:
                problems.append(f"{name}[{i}] {pattern!r} contains '/' or NUL")
    if cfg.config_repository:
        try:
            check_syntax(cfg.config_repository)
        except InvalidName as exc:
            problems.append(f"config_repository {cfg.config_repository!r}: {exc}")
        denied_by = [p for p in cfg.deny if fnmatch.fnmatchcase(cfg.config_repository, p)]
        if denied_by:
            problems.append(
                f"config_repository {cfg.config_repository!r} is denied by deny pattern "
                f"{denied_by[0]!r}: cvmfs2 reads it while booting every repository; take it "
                "out of deny, or set config_repository to the one the node's cvmfs "
                "configuration names (\"\" if none)")
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
    if cfg.metrics_token_file:
        try:
            if not Path(cfg.metrics_token_file).read_text().strip():
                problems.append("metrics_token_file is empty")
        except OSError as exc:
            problems.append(f"metrics_token_file: {exc.strerror or exc}")
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


# Keys that existed once: why they are gone, for the error that names them.
RETIRED = {
    "attach_wait": "removed: what it bounded lasts about a millisecond; such a request "
                   "now waits at most mount_timeout + 5 s; delete the line",
}


def coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Each value as its key's type; ConfigError (naming the key) for an unknown key or a value
    of the wrong type. No checks across keys: that is build()'s."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        hints = []
        for name in unknown:
            if name in RETIRED:
                hints.append(f"{name} ({RETIRED[name]})")
                continue
            close = difflib.get_close_matches(name, BY_NAME, n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ConfigError(f"unknown configuration keys: {', '.join(hints)}")
    return {k: _coerce(BY_NAME[k], v) for k, v in values.items()}


def build(values: dict[str, Any], base: Config | None = None) -> Config:
    return _validate(replace(base or Config(), **coerce(values)))


@dataclass(frozen=True)
class Loaded:
    cfg: Config
    file: Path | None       # the file that was read; None: none was
    note: str               # why no file was read ("" when one was)
    from_file: frozenset[str]
    from_flags: frozenset[str]


def read_file(path: Path | None) -> tuple[dict[str, Any], str]:
    """The file's values, and a note when no file was read. Only the default path may be
    missing: a node without /etc/cvmfsd/cvmfsd.toml runs on the defaults and its flags."""
    if path is None:
        return {}, "no configuration file given"
    try:
        with open(path, "rb") as f:
            return tomllib.load(f), ""
    except FileNotFoundError:
        if path != DEFAULT_CONFIG_PATH:
            raise ConfigError(f"configuration file {str(path)!r} does not exist") from None
        return {}, f"{path} does not exist: no configuration file was read"
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc}") from None


def load_verbose(path: Path | None, overrides: dict[str, Any] | None = None) -> Loaded:
    """Read the TOML file (see read_file), then apply flag overrides."""
    values, note = read_file(path)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = build({**values, **flags})
    return Loaded(cfg, None if note else path, note, frozenset(values), frozenset(flags))


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    return load_verbose(path, overrides).cfg


# --- TOML out: check-config, the example file, the README table -------------------------------
_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def toml_value(value: Any) -> str:
    """A TOML literal that tomllib reads back as the same value (Paths as strings, tuples as
    arrays): check-config's output can be pasted into a configuration file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value)  # str, Path
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # control characters must be escaped in TOML
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def dump(cfg: Config) -> str:
    """Every key of cfg as TOML, in the table's order."""
    return "".join(f"{k.name} = {toml_value(getattr(cfg, k.name))}\n" for k in KEYS)


EXAMPLE_HEADER = """\
# /etc/cvmfsd/cvmfsd.toml: configuration of cvmfsd, the on-demand /cvmfs root.
# Every key is here, with its default value; every key is optional, and each one has a flag
# (`cvmfsd run --help`) that wins over this file. `cvmfsd check-config -c FILE` validates a
# file without mounting anything. `systemctl reload cvmfsd` (= `cvmfsctl reload`) applies a
# changed file to the running daemon without touching its mounts; keys marked [restart] only
# change with a restart, and a reload that changes one is refused as a whole.
#
# Generated from the table of keys in cvmfsd/config.py (python -m cvmfsd.config --write-docs).
"""


def _comment(text: str, width: int = 96) -> list[str]:
    lines = []
    for paragraph in text.splitlines():
        if paragraph.startswith(" "):  # preformatted
            lines.append("#" + (" " if paragraph.strip() else "") + paragraph.rstrip())
        else:
            lines += ["# " + line for line in textwrap.wrap(paragraph, width - 2)] or ["#"]
    return lines


def example_text() -> str:
    lines = [EXAMPLE_HEADER.rstrip("\n")]
    for k in KEYS:
        if k.section:
            lines += ["", f"# --- {k.section} " + "-" * max(3, 89 - len(k.section))]
        lines.append("")
        first = k.help.split()[0]
        # A sentence starts upper case, unless it starts with a name (cvmfs2, backoff_initial).
        help_text = (k.help if any(c.isdigit() or c == "_" for c in first)
                     else k.help[0].upper() + k.help[1:]) + "."
        if k.choices:
            help_text += " One of: " + ", ".join(f'"{c}"' for c in k.choices) + "."
        lines += _comment(help_text + (" " + k.doc if k.doc else ""))
        lines.append(f"{k.name} = {toml_value(k.default)}" + ("  # [restart]" if k.restart
                                                               else ""))
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- config keys: generated by `python -m cvmfsd.config --write-docs` -->"
README_END = "<!-- end of config keys -->"


def readme_table() -> str:
    rows = ["| key | default | reload | meaning |", "|---|---|---|---|"]
    for k in KEYS:
        meaning = k.help.replace("|", "\\|")
        if k.choices:
            meaning += " (" + ", ".join(f"`{c}`" for c in k.choices) + ")"
        rows.append(f"| `{k.name}` | `{toml_value(k.default)}` | "
                    f"{'restart' if k.restart else 'yes'} | {meaning} |")
    return "\n".join(rows) + "\n"


def replace_readme_table(readme: str) -> str:
    head, begin, rest = readme.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise ValueError(f"README has no {README_BEGIN!r} ... {README_END!r} section")
    return head + begin + "\n" + readme_table() + end + tail


def write_docs(repo: Path) -> None:
    (repo / "systemd" / "cvmfsd.toml.example").write_text(example_text())
    readme = repo / "README.md"
    readme.write_text(replace_readme_table(readme.read_text()))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cvmfsd.config",
                                description="Documents generated from the table of keys.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--example", action="store_true", help="print the example file")
    g.add_argument("--readme-table", action="store_true", help="print the README key table")
    g.add_argument("--write-docs", action="store_true",
                   help="rewrite systemd/cvmfsd.toml.example and README.md's key table")
    args = p.parse_args(argv)
    if args.example:
        print(example_text(), end="")
    elif args.readme_table:
        print(readme_table(), end="")
    else:
        write_docs(Path(__file__).resolve().parents[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
