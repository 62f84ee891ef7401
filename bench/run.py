"""Run the benchmark: `python -m bench.run [--quick] [--only SCENARIO ...] [--out DIR]`.

Needs root and /dev/fuse (it mounts). Everything it mounts lives below a private work directory
(/tmp/cvmfsd-bench-*) and is unmounted at the end, also on Ctrl-C or an error; every process it
starts is stopped by its pid. Writes results.json, results.md and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from . import report, targets
from .common import (
    REPO_ROOT,
    Progress,
    Unavailable,
    mounts_under,
    realrepo,
    reap_adopted,
    set_child_subreaper,
    umount_below,
)
from .scenarios import ORDER, QUICK, Context, Sizes
from .systems import NAMES, Autofs
from .systems.autofs import automount_version
from .workspace import Real, Workspace

DEFAULT_OUT = REPO_ROOT / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a CI smoke run (checks the harness, not speed)")
    p.add_argument("--only", nargs="+", choices=ORDER, metavar="SCENARIO",
                   help=f"run only these scenarios ({', '.join(ORDER)})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="where results.json, results.md and the PNGs go (default bench/results)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one size, e.g. --set storm_procs=16 (see bench/README.md)")
    p.add_argument("--systems", nargs="+", choices=NAMES, default=list(NAMES),
                   help="systems to compare (direct is the baseline of every ratio)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent of the private work directory (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, maps)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each scenario, wait up to this long for the 1-minute load "
                   "average to drop below half the CPU count (other jobs skew every figure)")
    p.add_argument("--cvmfsd-rev", metavar="REV", default=None,
                   help="measure cvmfsd and the CSI plugin as committed in this git revision "
                   "(exported with git archive) instead of the working tree")
    real = p.add_argument_group(
        "real client", "by default every system runs the cvmfs2 stand-in (cvmfs2_standin)")
    real.add_argument("--real", action="store_true",
                      help="the real cvmfs2 (--cvmfs2, default /usr/bin/cvmfs2) on repositories "
                      "the harness makes with cvmfs_swissknife under the work directory and "
                      "serves on 127.0.0.1")
    real.add_argument("--cvmfs2", type=Path, metavar="PATH",
                      help="the real cvmfs2 binary; with --repos, or alone as --real")
    real.add_argument("--repos", nargs="+", metavar="FQRN", default=[],
                      help="existing repositories to use instead (each is mounted cold once "
                      "per system; scenarios that need content the harness made are skipped)")
    real.add_argument("--cvmfs2-config", type=Path, nargs="+", metavar="FILE", default=[],
                      help="with --repos: the client configuration that reaches them (passed as "
                      "-o config=, no /etc/cvmfs defaults; each system adds its own cache base)")
    real.add_argument("--cold-file", default="", metavar="REL",
                      help="with --repos: a path that exists in each of them, for the first "
                      "accesses")
    args = p.parse_args(argv)
    if args.repos and not (args.cvmfs2_config and args.cold_file):
        p.error("--repos needs --cvmfs2-config and --cold-file")
    if (args.cvmfs2_config or args.cold_file) and not args.repos:
        p.error("--cvmfs2-config and --cold-file go with --repos")
    if args.real and args.repos:
        p.error("--real makes its own repositories; --repos uses existing ones: one of them")
    if args.cvmfs2 and not (args.real or args.repos):
        args.real = True
    return args


def real_backend(args: argparse.Namespace, base: Path, progress: Progress) -> Real | None:
    """The real client's setting, or None for the stand-in. With --real: the loopback server is
    started here (stopped by the caller) and every repository is signed by one key pair."""
    if not (args.real or args.repos):
        return None
    cvmfs2 = (args.cvmfs2 or realrepo.CVMFS2).resolve()
    if not os.access(cvmfs2, os.X_OK):
        raise SystemExit(f"bench: {cvmfs2} is not an executable cvmfs2")
    if args.repos:
        return Real(cvmfs2, configs=tuple(c.resolve() for c in args.cvmfs2_config),
                    repos=tuple(args.repos), cold_file=args.cold_file)
    why = realrepo.missing_tools()
    if why:
        raise SystemExit(f"bench: --real: {why}")
    server = realrepo.RepoServer(base / "repos" / "storage").start()
    try:
        progress.say(f"repositories made with cvmfs_swissknife, served at {server.url}")
        keys = realrepo.Keys.generate(base / "repos" / "keys", "bench", "cvmfsd bench")
        public = base / "repos" / "public-keys"
        public.mkdir()
        shutil.copyfile(keys.pub, public / "bench.pub")
    except BaseException:
        server.stop()
        raise
    # The client reads CVMFS_KEYS_DIR: the public key only, in a directory of its own.
    return Real(cvmfs2, server=server, keys=keys, keys_dir=public)


def _cmd(*argv: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20,
                              cwd=REPO_ROOT)
        return (done.stdout or done.stderr).strip()
    return ""


def _version(module: str) -> str | None:
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        return version(module)
    with contextlib.suppress(Exception):
        return str(importlib.import_module(module).__version__)
    return None


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:")), 0)
    distro = ""
    with contextlib.suppress(OSError):
        distro = next((line.split("=", 1)[1].strip('"')
                       for line in Path("/etc/os-release").read_text().splitlines()
                       if line.startswith("PRETTY_NAME=")), "")
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu,
            "memory_gib": round(mem_kib / (1 << 20), 1), "os": distro,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def export(rev: str, dest: Path) -> str:
    """Export cvmfsd/ and csi/ of git revision rev into dest; return the full commit id."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "cvmfsd", "csi"], cwd=REPO_ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def versions(ws: Workspace, commit: str | None) -> dict[str, Any]:
    cvmfsd_version = _cmd(sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          "import cvmfsd; print(cvmfsd.__version__)", str(ws.src))
    return {
        "python": platform.python_version(),
        "cvmfsd": cvmfsd_version,
        "cvmfsd_source": (f"git revision {commit} (exported)" if commit
                          else "working tree"),
        **{m: _version(m) for m in ("pyfuse3", "trio", "psutil", "structlog", "grpcio",
                                    "matplotlib")},
        "libfuse": _cmd("fusermount3", "-V"),
        "automount": automount_version(),
        "backend": ws.backend_description(),
        "git_commit": commit or _cmd("git", "rev-parse", "HEAD"),
        # Uncommitted changes in what was measured (with --cvmfsd-rev: only bench and the
        # stand-in come from the working tree).
        "git_dirty": bool(_cmd("git", "status", "--porcelain", "--", "bench", "cvmfs2_standin",
                               ":(exclude)bench/results",
                               *(() if commit else ("cvmfsd", "csi")))),
    }


def wait_quiet(progress: Progress, limit: float) -> None:
    threshold = (os.cpu_count() or 1) / 2
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        progress.say(f"waiting for a quiet machine: load {os.getloadavg()[0]:.2f} "
                     f"(want < {threshold:g})")
        time.sleep(30)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench: needs root and /dev/fuse (it mounts FUSE filesystems)", file=sys.stderr)
        return 2
    sizes = Sizes()
    if args.quick:
        for name, value in QUICK.items():
            setattr(sizes, name, value)
    for assignment in args.set:
        sizes.set(assignment)
    selected = [s for s in ORDER if not args.only or s in args.only]

    # A TERM (CI timeout, kill <pid>) unwinds like Ctrl-C: every finally below runs.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    set_child_subreaper()
    progress = Progress()
    started_at = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="cvmfsd-bench-", dir=args.workdir))
    # Reachable by the cvmfs user, which a real cvmfs2 may drop to (mkdtemp makes it 0700).
    base.chmod(0o755)
    try:
        real = real_backend(args, base, progress)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        return _run(args, sizes, selected, progress, started_at, t0, base, real)
    finally:
        if real is not None and real.server is not None:
            real.server.stop()  # by its pid; after every system stopped using it


def _run(args: argparse.Namespace, sizes: Sizes, selected: list[str], progress: Progress,
         started_at: dt.datetime, t0: float, base: Path, real: Real | None) -> int:
    ws = Workspace(base, quick=args.quick, real=real)
    commit = None
    if args.cvmfsd_rev:
        try:
            commit = export(args.cvmfsd_rev, base / "src")
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(base, ignore_errors=True)
            print(f"bench: cannot export {args.cvmfsd_rev}: {exc.stderr}", file=sys.stderr)
            return 2
        ws.src = base / "src"
    unavailable: dict[str, str] = {}
    if "autofs" in args.systems:
        why = Autofs.available()
        if why:
            unavailable["autofs"] = why
            progress.say(f"autofs baseline skipped: {why}")
    names = tuple(n for n in NAMES if n in args.systems and n not in unavailable)
    ctx = Context(ws, sizes, progress, args.quick, names, unavailable)
    results: dict[str, Any] = {
        "schema": 1,
        "command": shlex.join(["python", "-m", "bench.run",
                               *args.argv]),
        "started": started_at.isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(),
        "versions": versions(ws, commit),
        "sizes": {k: getattr(sizes, k) for k in vars(sizes)},
        "systems": {"compared": list(names), "unavailable": unavailable},
        # Which cvmfs2 every system ran: "standin", or "real" with the binary and repositories.
        "backend": _backend_record(ws),
        "scenarios": {},
    }
    interrupted = False
    try:
        progress.say(f"work directory {base}; systems {', '.join(names)}; "
                     f"scenarios {', '.join(selected)}")
        info_done = False
        for scenario in selected:
            progress.begin(scenario, f"{scenario}{' (quick)' if args.quick else ''}")
            if args.wait_quiet:
                wait_quiet(progress, args.wait_quiet)
            s0 = time.monotonic()
            load0 = os.getloadavg()[0]
            module = importlib.import_module(f"bench.scenarios.{scenario}")
            try:
                result = module.run(ctx)
                result["status"] = "ok"
            except Unavailable as exc:
                result = {"status": "skipped", "reason": str(exc)}
            except KeyboardInterrupt:
                results["scenarios"][scenario] = {"status": "interrupted"}
                raise
            except Exception as exc:
                progress.say(f"FAILED: {exc!r}")
                result = {"status": "failed", "error": repr(exc),
                          "traceback": traceback.format_exc()[-4000:]}
            result["seconds"] = round(time.monotonic() - s0, 1)
            # Load of the machine around the scenario: a busy neighbour shows up here.
            result["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            results["scenarios"][scenario] = result
            reap_adopted()
            if not info_done:
                results["systems"]["details"] = _system_details(ws, names)
                info_done = True
    except KeyboardInterrupt:
        interrupted = True
        progress.say("interrupted: cleaning up")
    finally:
        leaked = ctx.leaks + umount_below(base)
        reap_adopted()
        results["leaked_mounts"] = leaked
        results["seconds"] = round(time.monotonic() - t0, 1)
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if not mounts_under(base) and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif args.keep:
            progress.say(f"work directory kept: {base}")
    results["targets"] = targets.evaluate(results)
    results["reference"] = targets.REFERENCE
    progress.scenario = "report"
    paths = report.write(results, args.out)
    for path in paths:
        progress.say(f"wrote {path}")
    if interrupted:
        return 130
    # A scenario skipped with its reason (e.g. given repositories of unknown content) is not
    # a failure; one that broke is.
    failed = [s for s, r in results["scenarios"].items()
              if r.get("status") not in ("ok", "skipped")]
    if failed or leaked:
        progress.say(f"not clean: failed {failed}, leaked mounts {leaked}")
        return 1
    return 0


def _backend_record(ws: Workspace) -> dict[str, Any]:
    if ws.real is None:
        return {"kind": "standin", "cvmfs2": "cvmfs2_standin/cvmfs2.py"}
    record: dict[str, Any] = {"kind": "real", "cvmfs2": str(ws.real.cvmfs2),
                              "version": realrepo.client_version(ws.real.cvmfs2)}
    if ws.real.given:
        record.update(repositories="given", repos=list(ws.real.repos),
                      configs=[str(c) for c in ws.real.configs], cold_file=ws.real.cold_file)
    else:
        record.update(repositories="made by the harness (cvmfs_swissknife), served on loopback")
    return record


def _system_details(ws: Workspace, names: tuple[str, ...]) -> dict[str, Any]:
    from .systems import make

    out = {}
    for name in names:
        system = make(name, ws, "info")
        out[name] = system.info()
        shutil.rmtree(system.dir, ignore_errors=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
