"""`cvmfsctl`: see and steer a running cvmfsd over its status socket.

  cvmfsctl status [NAME...]   the daemon and every repository, like `systemctl status`
  cvmfsctl list [NAME...]     one line per repository (or --json)
  cvmfsctl mount NAME...      mount now (a failed repository is retried at once)
  cvmfsctl umount NAME...     unmount; refused while busy unless --force (lazy detach)
  cvmfsctl reload             re-read the daemon's configuration file; mounts stay
  cvmfsctl probe [NAME...]    mount and list each repository, like `cvmfs_config probe`
  cvmfsctl restart            re-exec cvmfsd in place (upgrade); mounts are handed over

Exit status: 0 success; 1 cvmfsd not reachable, access denied, a bad request, or an operation
that failed (mount, umount, reload, restart); 3 (status, probe) the daemon answers but is
degraded or a repository is failing; 4 (status, list) a NAME that cvmfsd does not know.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .api import PROTOCOL_VERSION

DEFAULT_CONFIG = Path("/etc/cvmfsd/cvmfsd.toml")  # = config.DEFAULT_CONFIG_PATH (tested)
DEFAULT_SOCKET = Path("/run/cvmfsd/cvmfsd.sock")
MAX_REPLY = 64 * 1024 * 1024

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FAILING = 3
EXIT_UNKNOWN = 4


class CtlError(Exception):
    """Cannot talk to the daemon (or it refused the request)."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error = error or {"code": "connection", "message": message}


# --- the socket ---------------------------------------------------------------------------------
def socket_path(explicit: str | None, config: Path | None) -> Path:
    """--socket, then $CVMFSCTL_SOCKET, then the daemon's configuration file (control_socket or
    run_dir), then the default.

    Only the default file may be missing, as for cvmfsd itself (the unit's ExecReload names it
    with -c, and a node may run on the defaults). Any other file must exist, and a file that is
    read must parse and hold values of the right types (CtlError otherwise, naming the file and
    the key): a wrong guess would send the request to the default socket and report that
    cvmfsd is not running."""
    if explicit:
        return Path(explicit)
    if os.environ.get("CVMFSCTL_SOCKET"):
        return Path(os.environ["CVMFSCTL_SOCKET"])
    from .. import config as config_mod

    path = config or DEFAULT_CONFIG
    try:
        values = config_mod.coerce(config_mod.read_file(path)[0])
    except config_mod.ConfigError as exc:
        # Said in full because ExecReload runs this: the admin reads it in `systemctl reload`.
        raise CtlError(f"{path}: {exc} (the control socket's path is read from this file: "
                       "nothing was sent to cvmfsd, nothing was changed)",
                       {"code": "bad_config", "message": str(exc)}) from None
    if values.get("control_socket"):
        return Path(values["control_socket"])
    if values.get("run_dir"):
        return Path(values["run_dir"]) / "cvmfsd.sock"
    return DEFAULT_SOCKET


class Client:
    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(os.fspath(path))
        except FileNotFoundError:
            raise CtlError(f"{path} does not exist: is cvmfsd running?") from None
        except PermissionError:
            raise CtlError(f"permission denied on {path}: root or the admin group only") from None
        except ConnectionRefusedError:
            raise CtlError(f"nothing listens on {path}: is cvmfsd running?") from None
        except OSError as exc:
            raise CtlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        self._buffer = b""
        self._next_id = 1

    def call(self, cmd: str, wait: float | None = None, **args: Any) -> dict[str, Any]:
        """One request; `wait` bounds how long this client waits for the reply (the daemon's
        own deadline for an operation is the request's `timeout` argument)."""
        request = {"v": PROTOCOL_VERSION, "id": self._next_id, "cmd": cmd,
                   **{k: v for k, v in args.items() if v is not None}}
        self._next_id += 1
        self._sock.settimeout(wait or self.timeout)
        try:
            # Refused at once (permission_denied, overloaded): the reason is still readable.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._sock.sendall(json.dumps(request).encode() + b"\n")
            reply = self._read_line()
        except TimeoutError:
            raise CtlError(f"no answer from cvmfsd within {wait or self.timeout:g} s") from None
        except OSError as exc:
            raise CtlError(f"connection to cvmfsd failed: {exc.strerror or exc}") from None
        try:
            message = json.loads(reply)
        except ValueError:
            raise CtlError("cvmfsd sent something that is not JSON") from None
        if not message.get("ok"):
            error = message.get("error") or {}
            raise CtlError(error.get("message", "request failed"), error)
        result: dict[str, Any] = message.get("result") or {}
        return result

    def _read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                if self._buffer:
                    break
                raise CtlError("cvmfsd closed the connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY:
                raise CtlError("reply too large")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def close(self) -> None:
        self._sock.close()


# --- presentation -------------------------------------------------------------------------------
class Style:
    CODES = {"green": "\033[0;1;32m", "red": "\033[0;1;31m", "yellow": "\033[0;1;33m",
             "grey": "\033[0;38;5;245m", "bold": "\033[1m", "reset": "\033[0m"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, name: str, text: str) -> str:
        if not self.enabled:
            return text
        return f"{self.CODES[name]}{text}{self.CODES['reset']}"


def want_colour(mode: str, stream: TextIO) -> bool:
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


# systemctl's glyphs: a filled circle for active (or in transition), a multiplication sign for
# failed, a hollow circle for inactive.
FAILED_GLYPH = "\u00d7"
_BULLETS = {"mounted": ("●", "green"), "booting": ("●", "yellow"), "unmounting": ("●", "yellow"),
            "failed": (FAILED_GLYPH, "red"), "idle": ("○", "grey")}


def span(seconds: float | None) -> str:
    """systemd-style timespan: 3min 4s, 2h 1min, 1 day 3h."""
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    parts = []
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            value, seconds = divmod(seconds, size)
            parts.append(f"{value} day" + ("s" if value != 1 else "") if unit == "day"
                         else f"{value}{unit}")
        if len(parts) == 2:
            break
    return " ".join(parts)


def when(iso: str | None) -> tuple[str, float | None]:
    if not iso:
        return "?", None
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return (moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            time.time() - moment.timestamp())


def error_summary(error: dict[str, Any] | None) -> str:
    """The daemon's message already names cvmfs2's exit code and its meaning."""
    if not error:
        return ""
    message = str(error.get("message", ""))
    code = error.get("exit_code")
    if code is not None and f"exited {code}" not in message:
        message = f"exit {code} ({error.get('meaning') or 'unknown'}): {message}"
    return message


def stderr_tail(error: dict[str, Any] | None, lines: int = 3) -> list[str]:
    """The last lines of cvmfs2's stderr that the summary does not repeat."""
    text = (error or {}).get("stderr") or ""
    summary = error_summary(error)
    tail = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return [line for line in tail if line not in summary]


def size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def repo_line(repo: dict[str, Any], width: int, style: Style) -> list[str]:
    state = repo["state"]
    glyph, colour = _BULLETS.get(state, ("?", "grey"))
    facts = []
    if state == "mounted":
        _, ago = when(repo.get("mounted_since"))
        facts.append(f"pid {repo.get('serving_pid')}")
        facts.append(f"up {span(ago)}")
        if repo.get("revision") is not None:
            facts.append(f"revision {repo['revision']}")
        if repo.get("proxy"):
            facts.append(f"proxy {repo['proxy']}")
        if repo.get("cache_used_bytes") is not None:
            facts.append(f"cache {size(repo['cache_used_bytes'])}")
    boots = repo.get("boots", 0)
    facts.append(f"{boots} boot" + ("" if boots == 1 else "s"))
    if state == "failed" and repo.get("retry_in_s"):
        facts.append(f"retry in {span(repo['retry_in_s'])}")
    out = [f"{style(colour, glyph)} {repo['name']:<{width}}  {style(colour, f'{state:<10}')} "
           + ", ".join(facts)]
    error = repo.get("last_error")
    if error and state in ("failed", "idle"):
        _, ago = when(repo.get("last_error_at"))
        label = "Error" if state == "failed" else "Last error"
        out.append(f"    {label}: {error_summary(error)} ({span(ago)} ago)")
        out += [f"      {style('grey', line)}" for line in stderr_tail(error)]
    return out


def render_status(status: dict[str, Any], repos: list[dict[str, Any]], style: Style) -> str:
    counts = status.get("repositories", {})
    failing = counts.get("failed", 0) > 0
    degraded = bool(status.get("degraded"))
    colour = "red" if degraded or failing else "green"
    state = status.get("state", "?")
    if degraded:
        state = style("red", state + " (" + "; ".join(status.get("problems", [])) + ")")
    if failing:
        failed = counts["failed"]
        state += ", " + style("red", f"{failed} repositor{'y' if failed == 1 else 'ies'} failed")
    since, ago = when(status.get("started_at"))
    live = status.get("liveness") or {}
    if live.get("ok"):
        root_line = f"answers (listing took {live.get('duration_ms')} ms)"
    elif live.get("ok") is None:
        root_line = "not checked yet"
    else:
        root_line = style("red", f"not answering: {live.get('error')}")
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in
                        ("mounted", "failed", "booting", "unmounting", "idle"))
    rows = [
        ("State", state),
        ("Version", f"{status.get('version')} (protocol {status.get('protocol')})"),
        ("PID", str(status.get("pid"))),
        ("Since", f"{since}; {span(ago)} ago"),
        ("Root", root_line),
        ("Repos", summary),
        ("Socket", str(status.get("control_socket"))),
    ]
    if status.get("metrics"):
        rows.append(("Metrics", f"http://{status['metrics']}/metrics"))
    systemd = status.get("systemd") or {}
    if systemd.get("notify"):
        usec = systemd.get("watchdog_usec")
        rows.append(("systemd", "notify" + (f", watchdog {usec / 1e6:g}s" if usec else "")))
    lines = [f"{style(colour, '●')} cvmfsd — {status.get('root')}"]
    lines += [f"{key:>9}: {value}" for key, value in rows]
    if repos:
        lines.append("")
        width = max(len(r["name"]) for r in repos)
        for repo in repos:
            lines += repo_line(repo, width, style)
    lines += stale_lines(status.get("stale_views") or [], style)
    return "\n".join(lines)


def stale_lines(stale: list[dict[str, Any]], style: Style) -> list[str]:
    """Dead views of repositories (mounts of a device cvmfsd no longer serves), where they are."""
    if not stale:
        return []
    out = ["", style("red", f"Stale views ({len(stale)}): dead mounts that the next access does "
                            "not heal; restart what uses them")]
    for view in stale:
        shows = "" if view.get("root") in (None, "/") else f" (showing {view['root']})"
        hint = ("; a subPath below a repository's root never heals: use a `repository:` volume"
                if shows else "")
        out.append(f"{style('red', FAILED_GLYPH)} {view.get('repository')}: "
                   f"{view.get('mountpoint')}{shows} in mount namespace {view.get('ns')} "
                   f"(pid {view.get('pid')}){hint}")
    return out


def render_list(repos: list[dict[str, Any]], style: Style) -> str:
    if not repos:
        return "No repositories known (nothing looked up yet)."
    width = max(len(r["name"]) for r in repos)
    head = f"  {'REPOSITORY':<{width}}  {'STATE':<10} {'PID':>7}  {'REVISION':>8}  {'BOOTS':>5}  " \
           "LAST ERROR"
    lines = [head]
    for repo in repos:
        glyph, colour = _BULLETS.get(repo["state"], ("?", "grey"))
        pid = repo.get("serving_pid") or "-"
        revision = repo.get("revision") if repo.get("revision") is not None else "-"
        error = error_summary(repo.get("last_error")) if repo["state"] == "failed" else ""
        error = error[:100] + ("..." if len(error) > 100 else "")
        state = f"{repo['state']:<10}"
        lines.append(f"{style(colour, glyph)} {repo['name']:<{width}}  "
                     f"{style(colour, state)} {pid!s:>7}  {revision!s:>8}  "
                     f"{repo.get('boots', 0):>5}  {error}")
    lines.append(f"\n{len(repos)} repositories listed.")
    return "\n".join(lines)


# --- commands -------------------------------------------------------------------------------------
def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def cmd_status(client: Client, args: argparse.Namespace, style: Style) -> int:
    status = client.call("status")
    listing = client.call("list", names=args.names or None)
    repos = listing.get("repositories", [])
    if args.json:
        _print_json({"status": status, "repositories": repos,
                     "unknown": listing.get("unknown", [])})
    else:
        if args.names:  # only the stale views of the repositories asked about
            status = {**status, "stale_views": listing.get("stale_views", [])}
        print(render_status(status, repos, style))
        for name in listing.get("unknown", []):
            print(f"Repository {name} is not known to cvmfsd (never looked up).")
    if listing.get("unknown"):
        return EXIT_UNKNOWN
    if status.get("degraded") or any(r["state"] == "failed" for r in repos):
        return EXIT_FAILING
    return EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace, style: Style) -> int:
    listing = client.call("list", names=args.names or None, details=not args.no_details)
    if args.json:
        _print_json(listing)
    else:
        print(render_list(listing.get("repositories", []), style))
        for name in listing.get("unknown", []):
            print(f"Repository {name} is not known to cvmfsd (never looked up).")
    return EXIT_UNKNOWN if listing.get("unknown") else EXIT_OK


def _each(client: Client, args: argparse.Namespace, action: Any) -> int:
    failed = 0
    results = []
    for name in args.names:
        try:
            result = action(name)
            results.append({"name": name, "ok": True, "result": result})
        except CtlError as exc:
            if exc.error.get("code") == "connection":
                raise
            failed += 1
            results.append({"name": name, "ok": False, "error": exc.error})
            if not args.json:
                print(f"{name}: {exc.message}", file=sys.stderr)
                mount_error = exc.error.get("mount_error")
                for line in stderr_tail(mount_error):
                    print(f"    {line}", file=sys.stderr)
    if args.json:
        _print_json(results)
    return EXIT_ERROR if failed else EXIT_OK


def cmd_mount(client: Client, args: argparse.Namespace, style: Style) -> int:
    def mount(name: str) -> dict[str, Any]:
        result = client.call("mount", wait=args.timeout + 10, name=name,
                             timeout=args.timeout)
        repo = result["repository"]
        if not args.json:
            verb = "Mounted" if result.get("changed") else "Already mounted:"
            rev = f", revision {repo['revision']}" if repo.get("revision") is not None else ""
            print(f"{verb} {name} (pid {repo.get('serving_pid')}{rev})")
        return result

    return _each(client, args, mount)


def cmd_umount(client: Client, args: argparse.Namespace, style: Style) -> int:
    def umount(name: str) -> dict[str, Any]:
        result = client.call("umount", wait=args.timeout + 10, name=name, force=args.force,
                             timeout=args.timeout)
        if not args.json:
            print(f"Unmounted {name}" if result.get("changed") else f"{name} was not mounted")
        return result

    return _each(client, args, umount)


def cmd_reload(client: Client, args: argparse.Namespace, style: Style) -> int:
    result = client.call("reload")
    if args.json:
        _print_json(result)
    else:
        changed = result.get("changed") or []
        print("Reloaded: " + (", ".join(changed) + " changed" if changed else "no changes"))
    return EXIT_OK


def cmd_probe(client: Client, args: argparse.Namespace, style: Style) -> int:
    result = client.call("probe", wait=args.timeout + 30, names=args.names or None,
                         timeout=args.timeout)
    if args.json:
        _print_json(result)
    else:
        status = client.call("status")
        if not result["results"]:
            print("Nothing to probe (no repository mounted; name some, or set "
                  "probe_repositories).")
        for item in result["results"]:
            where = f"{status.get('root')}/{item['name']}"
            if item["ok"]:
                print(f"Probing {where}... {style('green', 'OK')}")
            else:
                print(f"Probing {where}... {style('red', 'Failed!')} "
                      f"{error_summary(item.get('error'))}")
    return EXIT_OK if result.get("ok") else EXIT_FAILING


def cmd_restart(client: Client, args: argparse.Namespace, style: Style) -> int:
    """Re-exec the daemon in place and wait until the new instance answers."""
    started = time.monotonic()
    before = client.call("restart")
    client.close()
    while time.monotonic() - started < args.timeout:
        time.sleep(0.2)
        try:
            again = Client(args.socket_path, timeout=5.0)
            try:
                status = again.call("status")
            finally:
                again.close()
        except CtlError:
            continue  # between the old instance and the new one
        if status.get("instance") != before.get("instance"):
            if args.json:
                _print_json(status)
            else:
                print(f"Restarted cvmfsd in place (pid {status.get('pid')}, version "
                      f"{status.get('version')}) in {time.monotonic() - started:.1f} s; "
                      f"{status.get('repositories', {}).get('mounted', 0)} repositories "
                      "kept mounted")
            return EXIT_OK
    print(f"cvmfsctl: cvmfsd did not come back within {args.timeout:g} s", file=sys.stderr)
    return EXIT_ERROR


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 1, like systemctl
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cvmfsctl", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", help="status socket (default: from the daemon's configuration "
                                    f"file, else {DEFAULT_SOCKET}; or $CVMFSCTL_SOCKET)")
    p.add_argument("-c", "--config", type=Path,
                   help=f"the daemon's configuration file, to find the socket (default "
                        f"{DEFAULT_CONFIG}, which alone may be missing)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the output (default: on a terminal, unless $NO_COLOR)")
    # The same options after the command (`cvmfsctl status --json`); SUPPRESS keeps a value
    # given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("--color", choices=["auto", "always", "never"],
                        default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    s = command("status", "the daemon and its repositories (exit 3 if failing)")
    s.add_argument("names", nargs="*", metavar="NAME")
    s = command("list", "one line per repository")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("--no-details", action="store_true",
                   help="skip what each mount reports (revision, host, proxy, cache)")
    s = command("mount", "mount now")
    s.add_argument("names", nargs="+", metavar="NAME")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds (default %(default)s)")
    s = command("umount", "unmount (refused while busy unless --force)")
    s.add_argument("names", nargs="+", metavar="NAME")
    s.add_argument("--force", action="store_true", help="detach lazily when busy")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds (default %(default)s)")
    command("reload", "re-read the configuration file; mounts stay")
    s = command("probe", "mount and list repositories, like cvmfs_config probe")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("--timeout", type=float, default=120.0,
                   help="seconds per repository (default %(default)s)")
    s = command("restart", "re-exec cvmfsd in place (an upgrade); mounts are handed over")
    s.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the new instance (default %(default)s)")
    return p


COMMANDS = {"status": cmd_status, "list": cmd_list, "mount": cmd_mount, "umount": cmd_umount,
            "reload": cmd_reload, "probe": cmd_probe, "restart": cmd_restart}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    style = Style(want_colour(args.color, sys.stdout) and not args.json)
    try:
        path = args.socket_path = socket_path(args.socket, args.config)
        client = Client(path, timeout=30.0)
        try:
            return COMMANDS[args.command](client, args, style)
        finally:
            client.close()
    except CtlError as exc:
        if args.json:
            _print_json({"ok": False, "error": exc.error})
        print(f"cvmfsctl: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
