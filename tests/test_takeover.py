"""The root takeover keeps one root layer on the host (where the kernel can mount beneath), and
everything published before the restarts keeps working through them: the host, a whole-root pod
view, a pod view of one repository, and later mounts arriving in the pod made before.

docs/views.md section C: measured procedure C1, implemented by rootmount.replace."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_FILES, Daemon, mounts_under, soak_size
from podview import PodView

from cvmfsd.core import kernel
from cvmfsd.core.rootmount import ours

READER = Path(__file__).with_name("restart_reader.py")
REPOS = ["alice.cern.ch", "atlas.cern.ch", "cms.cern.ch"]
BENEATH = kernel.has_move_mount_beneath()


def root_layers(root: Path) -> list[kernel.MountEntry]:
    return kernel.mounts_at(str(root))


def start_readers(d: Daemon, tmp: Path, stop: Path, out: Path) -> list[subprocess.Popen[bytes]]:
    out.mkdir()
    readers = [subprocess.Popen([sys.executable, str(READER), "host", str(d.root), str(stop),
                                 str(out / "host.json"), *REPOS])]
    for mode, extra in (("pod", REPOS), ("repo", ["atlas.cern.ch"])):
        view = tmp / f"reader-{mode}"
        view.mkdir()
        readers.append(subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", sys.executable, str(READER), mode,
             str(d.root), str(view), str(stop), str(out / f"{mode}.json"), *extra]))
    return readers


@pytest.mark.parametrize("beneath", [
    pytest.param(True, marks=pytest.mark.skipif(not BENEATH, reason="no MOVE_MOUNT_BENEATH")),
    False,
], ids=["beneath", "stacked"])
def test_sigkill_restarts_keep_one_root_layer(start_daemon, env, beneath: bool) -> None:  # type: ignore[no-untyped-def]
    env.add_repo("later.cern.ch")
    process_env = {} if beneath else {"CVMFSD_TAKEOVER_BENEATH": "0"}
    d = start_daemon(stop_mode="handover", expire_timeout=0, process_env=process_env)
    for repo in REPOS:
        assert (d.path(repo) / "README").read_text() == DEMO_FILES["README"]
    # Made before the restarts: a whole-root pod view and a pod view of one repository mount.
    pod = PodView(d.root, env.tmp / "pod")
    repo_pod = PodView(d.root / "atlas.cern.ch", env.tmp / "repo-pod")
    stop, out = env.tmp / "stop", env.tmp / "out"
    readers = start_readers(d, env.tmp, stop, out)
    restarts = soak_size(ci=3, full=20)
    layers = []
    try:
        time.sleep(0.5)
        for _ in range(restarts):
            assert d.stop(signal.SIGKILL) == -signal.SIGKILL
            d = start_daemon(stop_mode="handover", expire_timeout=0, process_env=process_env)
            assert d.events("ready")[-1]["adopted"] == len(REPOS)
            takeover = d.events("takeover")[-1]
            assert takeover["procedure"] == ("beneath" if beneath else "stacked"), takeover
            found = root_layers(d.root)
            assert all(ours(e) for e in found)
            layers.append(len(found))
            time.sleep(0.3)
    finally:
        stop.touch()
        codes = [r.wait(timeout=60) for r in readers]
    results = [json.loads(p.read_text()) for p in sorted(out.iterdir())]
    assert codes == [0] * len(readers)
    assert {r["mode"] for r in results} == {"host", "pod", "repo"}
    assert all(r["ops"] > 0 for r in results), results
    assert sum(r["failures"] for r in results) == 0, [e for r in results for e in r["errors"]]
    if beneath:
        assert layers == [1] * restarts
    else:  # today's procedure on older kernels: one dead layer more per restart
        assert layers == list(range(2, restarts + 2))

    # Views made before the restarts: still reading, and a repository mounted only now arrives.
    assert pod.do("read", "atlas.cern.ch/README")["data"] == DEMO_FILES["README"]
    assert repo_pod.do("read", "README")["data"] == DEMO_FILES["README"]
    assert pod.do("read", "later.cern.ch/README")["data"] == DEMO_FILES["README"]
    assert Path(d.root / "later.cern.ch" / "README").read_text() == DEMO_FILES["README"]
    pod.close()
    repo_pod.close()
    assert d.stop(signal.SIGTERM) == 0
    last = start_daemon(stop_mode="unmount")
    assert last.stop() == 0
    assert mounts_under(env.tmp) == []
