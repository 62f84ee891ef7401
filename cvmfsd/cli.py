"""`cvmfsd`: run the daemon (default), check a configuration, or run the built-in demo."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

import trio

from . import __version__, config as config_mod, log, signals


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, default=config_mod.DEFAULT_CONFIG_PATH,
                        help="TOML configuration file (default: %(default)s; missing = defaults)")
    parser.add_argument("--root", help="where the lazy root is served (default /cvmfs)")
    parser.add_argument("--run-dir", help="runtime directory (default /run/cvmfsd)")
    parser.add_argument("--cvmfs2", help="the cvmfs2 client binary (default /usr/bin/cvmfs2)")
    parser.add_argument("--cvmfs2-config", action="append", metavar="FILE",
                        help="pass only these cvmfs config files to cvmfs2 (repeatable); "
                             "default: the node's /etc/cvmfs hierarchy")
    parser.add_argument("--allow", action="append", metavar="GLOB",
                        help="repository names to allow (repeatable; default '*')")
    parser.add_argument("--deny", action="append", metavar="GLOB",
                        help="repository names to deny (repeatable)")
    parser.add_argument("--mount-timeout", type=float)
    parser.add_argument("--max-concurrent-boots", type=int)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    # Node admin surface (cvmfsctl, metrics).
    parser.add_argument("--control-socket", metavar="PATH",
                        help="status socket for cvmfsctl (default <run-dir>/cvmfsd.sock)")
    parser.add_argument("--admin-group", metavar="GROUP",
                        help="group allowed to use the status socket besides root")
    parser.add_argument("--metrics-listen", metavar="[HOST:]PORT",
                        help="serve Prometheus metrics there (default off; host 127.0.0.1)")
    parser.add_argument("--stop-mode", choices=["unmount", "handover"],
                        help="what SIGTERM does (the systemd unit passes handover)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ["root", "run_dir", "cvmfs2", "cvmfs2_config", "allow", "deny", "mount_timeout",
            "max_concurrent_boots", "log_level", "log_format", "control_socket",
            "admin_group", "metrics_listen", "stop_mode"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvmfsd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cvmfsd {__version__}")
    sub = parser.add_subparsers(dest="command")
    run_p = sub.add_parser("run", help="serve the root (the default command)")
    _add_config_flags(run_p)
    check_p = sub.add_parser("check-config", help="validate the configuration and print it")
    _add_config_flags(check_p)
    demo_p = sub.add_parser("demo", help="run the daemon on a temporary root with the cvmfs2 "
                                         "stand-in and demo repositories")
    demo_p.add_argument("--keep-going", action="store_true",
                        help="keep serving after the demo until Ctrl-C")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in {"run", "check-config", "demo", "-h", "--help", "--version"}:
        argv = ["run", *argv]  # `cvmfsd [flags]` runs the daemon
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import main as demo_main
        return demo_main(keep_going=args.keep_going)
    try:
        cfg = config_mod.load(args.config, _overrides(args))
    except config_mod.ConfigError as exc:
        print(f"cvmfsd: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        for key, value in sorted(vars(cfg).items()):
            print(f"{key} = {value!r}")
        return 0
    log.configure(cfg.log_level, cfg.log_format)
    from .daemon import StartupError, StopMode, run

    signals.install_early()
    try:
        # The reloader re-reads the same file with the same flag overrides (cvmfsctl reload,
        # SIGHUP): flags keep winning over the file, as at start.
        overrides = _overrides(args)
        mode = trio.run(functools.partial(
            run, cfg, reloader=lambda: config_mod.load(args.config, overrides),
            config_file=args.config))
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
