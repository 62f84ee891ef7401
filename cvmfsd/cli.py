"""`cvmfsd`: run the daemon (default), check a configuration, or run the built-in demo.

Every configuration key has a flag (generated from the table of keys in cvmfsd/config.py), and
the flags may come before or after the command: `cvmfsd -c FILE check-config` and
`cvmfsd check-config -c FILE` are the same.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

import structlog
import trio

from . import __version__, config as config_mod, log, signals
from .core import kernel

COMMANDS = ("run", "check-config", "demo")


def _list_value(text: str) -> list[str]:
    # A repeated list flag builds the list; an empty value clears it (`--deny=`), so that a
    # flag can also take back what the file lists.
    return [text] if text else []


class _Extend(argparse.Action):
    """Repeatable list flag: the values given on the command line replace the file's list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, [*current, *values])


def _config_flags(suppress: bool) -> argparse.ArgumentParser:
    """A parent parser with -c and one flag per key. suppress: values absent from argv leave
    no attribute, so the same flags can be given before and after the command."""
    p = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("-c", "--config", type=Path, default=default,
                   help=f"TOML configuration file (default: {config_mod.DEFAULT_CONFIG_PATH}; "
                        "that one may be missing: then only the defaults and flags apply)")
    group = p.add_argument_group("configuration keys (each wins over the file)")
    for key in config_mod.KEYS:
        shown = config_mod.toml_value(key.default)
        tail = f" (default {shown}{'; restart only' if key.restart else ''})"
        kwargs: dict[str, Any] = {"dest": key.name, "default": default,
                                  "help": (key.help + tail).replace("%", "%%")}
        if key.is_list:
            kwargs.update(action=_Extend, type=_list_value, metavar=key.metavar,
                          help=kwargs["help"] + "; repeatable, an empty value clears the list")
        elif key.kind == "bool":
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif key.choices:
            kwargs.update(choices=key.choices)
        else:
            kwargs.update(type={"float": float, "int": int}.get(key.kind, str),
                          metavar=key.metavar)
        group.add_argument(key.flag, **kwargs)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k.name: getattr(args, k.name) for k in config_mod.KEYS
            if getattr(args, k.name, None) is not None}


def parser() -> argparse.ArgumentParser:
    flags = _config_flags(suppress=True)
    p = argparse.ArgumentParser(prog="cvmfsd", description=__doc__, parents=[flags],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cvmfsd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{run,check-config,demo}")
    sub.add_parser("run", parents=[flags], help="serve the root (the default command)")
    sub.add_parser("check-config", parents=[flags],
                   help="validate the configuration and print it as TOML (nothing is mounted)")
    demo_p = sub.add_parser("demo", help="run the daemon on a temporary root with the cvmfs2 "
                                         "stand-in and demo repositories")
    demo_p.add_argument("--keep-going", action="store_true",
                        help="keep serving after the demo until Ctrl-C")
    return p


def check_config(loaded: config_mod.Loaded, path: Path) -> int:
    """Print the configuration as TOML that can be pasted back into a file; say where each
    value came from in comments (valid TOML too)."""
    out = [f"# cvmfsd {__version__} check-config: valid."]
    if loaded.file is None:
        print(f"cvmfsd: note: {loaded.note}; the defaults and flags apply", file=sys.stderr)
        out.append(f"# {loaded.note}; the defaults and flags apply.")
    else:
        out.append(f"# Read {path}.")
    for key in config_mod.KEYS:
        line = f"{key.name} = {config_mod.toml_value(getattr(loaded.cfg, key.name))}"
        if key.name in loaded.from_flags:
            line += f"  # from the flag {key.flag}"
        elif key.name not in loaded.from_file:
            line += "  # default"
        out.append(line)
    print("\n".join(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = args.command or "run"  # `cvmfsd [flags]` runs the daemon
    if command == "demo":
        if _overrides(args) or getattr(args, "config", None) is not None:
            p.error("demo takes no configuration: it makes its own")
        from .demo import main as demo_main
        return demo_main(keep_going=args.keep_going)
    path = getattr(args, "config", None) or config_mod.DEFAULT_CONFIG_PATH
    overrides = _overrides(args)
    try:
        loaded = config_mod.load_verbose(path, overrides)
    except config_mod.ConfigError as exc:
        print(f"cvmfsd: {exc}", file=sys.stderr)
        return 2
    if command == "check-config":
        return check_config(loaded, path)
    cfg = loaded.cfg
    kernel.limit_malloc_arenas(2)  # before log.configure starts the first thread
    log.configure(cfg.log_level, cfg.log_format)
    if loaded.file is None:
        structlog.get_logger("cvmfsd").warning("no_config_file", note=loaded.note)
    from .daemon import StartupError, StopMode, run

    signals.install_early()
    try:
        # The reloader re-reads the same file with the same flag overrides (cvmfsctl reload,
        # SIGHUP): flags keep winning over the file, as at start.
        mode = trio.run(functools.partial(
            run, cfg, reloader=lambda: config_mod.load(path, overrides), config_file=path))
    except StartupError as exc:
        print(f"cvmfsd: {exc}", file=sys.stderr)
        log.flush()
        return 1
    log.flush()
    if mode is StopMode.REEXEC:
        # Upgrade in place: the same pid (systemd's main pid, the cvmfs2 processes' parent)
        # runs the code now on disk, which takes over the mounts left in place.
        sys.stdout.flush()
        log.restore_stderr()
        signals.block_for_exec()
        os.execv(sys.executable, [sys.executable, "-m", "cvmfsd", *sys.argv[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
