"""`cvmfsd demo`: the daemon on a temporary root, backed by the cvmfs2 stand-in (the
cvmfs2_standin package, shipped beside cvmfsd) and a few demo repositories. Shows a repository
appearing on its first access.

Production runs the real cvmfs2 (package `cvmfs`): `cvmfsd --cvmfs2 /usr/bin/cvmfs2`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cvmfs2_standin.kit import make_repo, write_config, write_wrapper

REPOS = {
    "demo.cern.ch": {"README": "Welcome to demo.cern.ch, mounted on first access.\n",
                     "bin/hello": "#!/bin/sh\necho 'hello from /cvmfs/demo.cern.ch/bin/hello'\n"},
    "sft.cern.ch": {"lcg/releases/LCG_105/README": "LCG 105 software stack (demo)\n"},
    "software.opensciencegrid.org": {"README": "OSG software (demo)\n"},
}


def _say(text: str) -> None:
    print(text, flush=True)


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cvmfsd exited {proc.returncode}:\n{log.read_text()}")
        for line in log.read_text().splitlines():
            if '"ready"' in line:
                return
        time.sleep(0.05)
    raise RuntimeError("cvmfsd did not become ready")


def _workspace_for_cvmfs2(tmp: Path) -> None:
    """cvmfs2 drops root to the cvmfs user where it exists (as cvmfsd starts it): its cache and
    reload socket directories are that user's, as the cvmfs package prepares them."""
    import pwd

    tmp.chmod(0o755)
    for sub in ("cache", "reload"):
        (tmp / sub).mkdir()
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("cvmfs")
            os.chown(tmp / sub, user.pw_uid, user.pw_gid)


def _wait_logged(log: Path, repo: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any('"event": "mount"' in line and f'"repo": "{repo}"' in line
               for line in log.read_text().splitlines()):
            return
        time.sleep(0.02)


def main(keep_going: bool = False) -> int:
    if os.geteuid() != 0:
        print("cvmfsd demo: run as root (FUSE mounts)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="cvmfsd-demo-") as tmp_name:
        tmp = Path(tmp_name)
        _workspace_for_cvmfs2(tmp)
        for fqrn, files in REPOS.items():
            make_repo(tmp / "server", fqrn, files, executable=("bin/hello",))
        client = tmp / "client.conf"
        write_config(client, CVMFS_SERVER_URL=f"file://{tmp}/server/@fqrn@",
                     CVMFS_HTTP_PROXY="DIRECT", CVMFS_CACHE_BASE=str(tmp / "cache"),
                     CVMFS_RELOAD_SOCKETS=str(tmp / "reload"))
        root = tmp / "cvmfs"
        config = tmp / "cvmfsd.toml"
        config.write_text("\n".join([
            f'root = "{root}"', f'run_dir = "{tmp}/run"',
            f'cvmfs2 = "{write_wrapper(tmp / "cvmfs2")}"', f'cvmfs2_config = ["{client}"]',
            'log_format = "json"', "",
        ]))
        log = tmp / "cvmfsd.log"
        _say(f"# cvmfsd demo: root {root}, cvmfs2 stand-in, {len(REPOS)} demo repositories")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cvmfsd", "run", "-c", str(config)],
                                    stdout=out, stderr=out)
        try:
            _wait_ready(proc, log)
            _say(f"$ ls {root}\n{' '.join(sorted(os.listdir(root))) or '(empty)'}")
            started = time.monotonic()
            text = (root / "demo.cern.ch" / "README").read_text()
            took = (time.monotonic() - started) * 1000
            _say(f"$ cat {root}/demo.cern.ch/README\n{text.rstrip()}")
            _say(f"  (first access, including the cvmfs2 boot: {took:.0f} ms)")
            hello = subprocess.run([str(root / "demo.cern.ch" / "bin" / "hello")],
                                   capture_output=True, text=True, check=True).stdout
            _say(f"$ {root}/demo.cern.ch/bin/hello\n{hello.rstrip()}")
            fqrn = os.getxattr(root / "sft.cern.ch", "user.fqrn").decode()
            _say(f"$ getfattr -n user.fqrn {root}/sft.cern.ch\nuser.fqrn=\"{fqrn}\"")
            # cvmfs2 answers a moment before the daemon has logged the mount and lists it.
            _wait_logged(log, "sft.cern.ch")
            _say(f"$ ls {root}\n{' '.join(sorted(os.listdir(root)))}")
            attempts = [json.loads(line) for line in log.read_text().splitlines()
                        if '"event": "mount"' in line]
            for a in attempts:
                _say(f"  log: mount {a['repo']} {a['result']} in {a['duration_ms']} ms "
                     f"(serving pid {a.get('serving_pid')})")
            if keep_going:
                _say(f"serving at {root}; Ctrl-C to stop")
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        left = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if str(tmp) in line]
        _say(f"$ kill -TERM cvmfsd  -> exit {code}, mounts left under the demo root: {len(left)}")
        return 0 if code == 0 and not left else 1
