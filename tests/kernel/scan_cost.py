#!/usr/bin/env python3
"""What cvmfsd's namespace scan (cvmfsd/usage.scan) costs, by number of mount namespaces and
mounts per namespace.  Measurement only.  Run as root:

    .venv/bin/python tests/kernel/scan_cost.py [ROUNDS]

It re-executes itself in `unshare -m --propagation private` on a tmpfs of its own at
/tmp/scancost.<pid>, so no mount reaches the host.  Sleepers (`unshare -m` + `sleep`) make the
extra namespaces, each with extra tmpfs mounts; a tmpfs at base/repo stands for a repository's
device.  Two cases per size: the device in no sleeper (namespaces are read and skipped: the
common case, a node whose pods do not use the repository) and in every sleeper (each table is
parsed and classified: the worst case).  Sleepers are stopped by pid; the namespace and its
mounts die with the run.  Results on stdout and in tests/kernel/results/scan_cost.json.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from cvmfsd.core import usage  # noqa: E402

SIZES = [(0, 0), (50, 0), (200, 0), (200, 100)]  # (extra namespaces, extra mounts in each)


def sleepers(base: Path, count: int, mounts: int, with_repo: bool) -> list[subprocess.Popen[bytes]]:
    script = "set -e\n"
    if not with_repo:
        script += f"umount -l {base}/repo\n"
    script += (f"for i in $(seq 1 {mounts}); do mkdir -p {base}/ns-$$/m$i; "
               f"mount -t tmpfs -o size=4k x {base}/ns-$$/m$i; done\n" if mounts else "")
    script += "echo ready\nexec sleep 3600\n"
    out = []
    for _ in range(count):
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                stdout=subprocess.PIPE)
        out.append(proc)
    for proc in out:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return out


def measure(base: Path, rounds: int) -> dict[str, object]:
    st = os.stat(base / "repo")
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    results: dict[str, object] = {}
    for count, mounts in SIZES:
        for with_repo in (False, True):
            procs = sleepers(base, count, mounts, with_repo)
            try:
                times, read_bytes = [], 0
                scan = None
                for _ in range(rounds):
                    scan = usage.scan({dev}, {dev}, base / "cvmfs", base / "staging",
                                      deadline=time.monotonic() + 30)
                    assert scan.complete, scan.error
                    times.append(scan.duration_ms)
                    read_bytes = scan.mountinfo_bytes
                assert scan is not None
                where = "everywhere" if with_repo else "in none"
                key = f"{count} ns x {mounts} extra mounts, device {where}"
                results[key] = {"median_ms": round(statistics.median(times), 2),
                                "max_ms": round(max(times), 2), "namespaces": scan.namespaces,
                                "pids": scan.pids, "mountinfo_kib": round(read_bytes / 1024),
                                "uses_found": sum(len(v) for v in scan.uses.values())}
                print(f"{key}: {results[key]}", flush=True)
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
    return results


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    if os.environ.get("SCANCOST_BASE") is None:
        base = Path(f"/tmp/scancost.{os.getpid()}")
        base.mkdir()
        try:
            rc = subprocess.call(["unshare", "-m", "--propagation", "private", sys.executable,
                                  __file__, str(rounds)], env={**os.environ,
                                                               "SCANCOST_BASE": str(base)})
        finally:
            os.rmdir(base)
        sys.exit(rc)
    base = Path(os.environ["SCANCOST_BASE"])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "scancost", str(base)], check=True)
    subprocess.run(["mount", "--make-shared", str(base)], check=True)
    (base / "repo").mkdir()
    (base / "staging").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "repo", str(base / "repo")],
                   check=True)
    results = measure(base, rounds)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scan_cost.json").write_text(json.dumps(
        {"kernel": os.uname().release, "cpus": os.cpu_count(), "rounds": rounds,
         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
