"""Idle RSS of a cvmfsd run from a given source tree: `python -m bench.idle_rss TREE...`.

Each tree's daemon starts on the defaults (`-c /dev/null`) with a private root, run and
snapshot directory, mounts nothing, and is measured 3 s after "ready" from
/proc/<pid>/smaps_rollup (RSS, and USS: its private pages). Trees alternate, so that two
source trees (e.g. a `git worktree` of the base) are compared side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time


def measure(tree: str, settle: float = 3.0) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="cvmfsd-idle-rss-") as d:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cvmfsd", "run", "-c", os.devnull, "--root", f"{d}/cvmfs",
             "--run-dir", f"{d}/run", "--snapshot-dir", f"{d}/snap", "--log-format", "json"],
            env=dict(os.environ, PYTHONPATH=tree), cwd=tree, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if '"event": "ready"' in line:
                    break
            else:
                raise RuntimeError(f"cvmfsd from {tree} exited {proc.wait()} before ready")
            time.sleep(settle)
            with open(f"/proc/{proc.pid}/smaps_rollup") as f:
                kib = {k: int(v.split()[0]) for k, v in
                       (line.split(":", 1) for line in f.read().splitlines()[1:])}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return {"tree": tree, "rss_mib": round(kib["Rss"] / 1024, 2),
            "uss_mib": round((kib["Private_Clean"] + kib["Private_Dirty"]) / 1024, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs="+")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    for _ in range(args.runs):
        for tree in args.trees:
            print(json.dumps(measure(os.path.abspath(tree))), flush=True)


if __name__ == "__main__":
    main()
