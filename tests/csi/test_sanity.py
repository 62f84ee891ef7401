"""The community conformance suite, csi-sanity v5.5.0 (the binary in ../shared/csi-sanity/, see its
README), against the plugin's socket with the real cvmfsd up (cvmfs2 stand-in backend): the plugin
in the host's mount namespace, and in its own as the node DaemonSet runs it. 0 failures, and every
skip is one of the known ones (csi/README.md lists them with the capability that causes each).

Why the real daemon: csi-sanity's publish/unpublish/stats specs then run against the product's own
root (lookups, statfs, mount propagation), not a stand-in. csi-sanity publishes to
<mountdir>/target, which is not kubelet's target shape; the plugin is told to accept that one path
with --sanity-target (the only difference from production).
"""

from __future__ import annotations

import lzma
import os
import stat
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from csi_harness import REPO_ROOT, TOPOLOGIES, Plugin, mounts_at_or_under, needs_root

pytestmark = needs_root

SANITY_XZ = REPO_ROOT.parent / "shared" / "csi-sanity" / "csi-sanity-v5.5.0-linux-amd64.xz"

# Every skip csi-sanity may report for this driver, and why (kept in step with csi/README.md).
KNOWN_SKIPS = {
    "pending": "ListVolumes pagination spec is marked pending in csi-sanity itself",
    "Controller Publish, UnpublishVolume not supported": "no PUBLISH_UNPUBLISH_VOLUME",
    "ControllerPublishVolume not supported": "no PUBLISH_UNPUBLISH_VOLUME",
    "ControllerUnpublishVolume not supported": "no PUBLISH_UNPUBLISH_VOLUME",
    "ControllerExpandVolume not supported": "no EXPAND_VOLUME (controller)",
    "ControllerModifyVolume not supported": "no MODIFY_VOLUME",
    "Modify Volume not supported": "no MODIFY_VOLUME",
    "Modify volume not supported": "no MODIFY_VOLUME",
    "CreateSnapshot not supported": "no CREATE_DELETE_SNAPSHOT",
    "DeleteSnapshot not supported": "no CREATE_DELETE_SNAPSHOT",
    "Snapshot not supported": "no CREATE_DELETE_SNAPSHOT",
    "ListSnapshots not supported": "no LIST_SNAPSHOTS",
    "GetSnapshot not supported": "no GET_SNAPSHOT",
    "GetCapacity not supported": "no GET_CAPACITY",
    "ListVolumes not supported": "no LIST_VOLUMES",
    "Volume Cloning not supported": "no CLONE_VOLUME",
    "capacity of the volume is unknown": "CreateVolume reports capacity 0 (unknown)",
    "GroupControllerService not supported": "no GROUP_CONTROLLER_SERVICE plugin capability",
    "NodeStageVolume not supported": "no STAGE_UNSTAGE_VOLUME",
    "NodeUnstageVolume not supported": "no STAGE_UNSTAGE_VOLUME",
    "NodeExpandVolume not supported": "no EXPAND_VOLUME (node)",
    "Service does not have single node multi writer capability": "no SINGLE_NODE_MULTI_WRITER",
}


@pytest.fixture(scope="session")
def csi_sanity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SANITY_XZ.exists():
        reason = f"csi-sanity not found at {SANITY_XZ} (the shared/ directory beside the clone)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    binary = tmp_path_factory.mktemp("csi-sanity") / "csi-sanity"
    binary.write_bytes(lzma.decompress(SANITY_XZ.read_bytes()))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def junit_counts(report: Path) -> tuple[Counter[str], Counter[str], list[str]]:
    """(status counts, skip reasons, names of failed specs) from csi-sanity's JUnit report."""
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    failed: list[str] = []
    for case in ET.parse(report).getroot().iter("testcase"):
        status = case.get("status") or "?"
        statuses[status] += 1
        skipped = case.find("skipped")
        if skipped is not None:
            message = (skipped.get("message") or "").strip()
            reasons[message.removeprefix("skipped - ").splitlines()[0] if message else ""] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(case.get("name") or "?")
    return statuses, reasons, failed


@pytest.fixture
def sanity_dir(kubelet_dir: Path) -> Iterator[Path]:
    d = kubelet_dir / "sanity"
    d.mkdir()
    yield d


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_csi_sanity(
    topology: str,
    csi_sanity: Path,
    daemon: Any,
    kubelet_dir: Path,
    sanity_dir: Path,
    tmp_path: Path,
) -> None:
    mountdir = sanity_dir / "mnt"
    plugin = Plugin(
        tmp_path, kubelet_dir, daemon.root, f"--sanity-target={mountdir}/target", topology=topology
    ).start()
    report = tmp_path / "junit.xml"
    try:
        proc = subprocess.run(
            [
                str(csi_sanity),
                f"--csi.endpoint={plugin.endpoint}",
                f"--csi.mountdir={mountdir}",
                f"--csi.stagingdir={sanity_dir / 'stage'}",
                f"--csi.junitfile={report}",
                "-ginkgo.no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "GINKGO_NO_COLOR": "TRUE"},
        )
    finally:
        plugin.stop()
    summary = [line for line in proc.stdout.splitlines() if "Passed" in line and "Failed" in line]
    print(f"csi-sanity ({topology}): {summary[-1] if summary else proc.stdout[-2000:]}")
    statuses, reasons, failed = junit_counts(report)
    print(f"statuses {dict(statuses)}; skips {dict(reasons)}")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert failed == []
    assert statuses["failed"] == 0 and statuses["passed"] >= 31, statuses
    assert set(reasons) <= set(KNOWN_SKIPS), set(reasons) - set(KNOWN_SKIPS)
    # the writer mode csi-sanity uses was served, read-only, and said so
    served = [r for r in plugin.records() if r.get("event") == "served read-only"]
    assert served and served[0]["mode"] == "SINGLE_NODE_WRITER"
    # volume stats ran (advertised) and the volume was healthy
    stats = [r for r in plugin.records() if r.get("method", "").endswith("NodeGetVolumeStats")]
    assert any(r["code"] == "OK" for r in stats) and any(r["code"] == "NOT_FOUND" for r in stats)
    assert not [r for r in plugin.records() if r.get("event") == "volume abnormal"]
    assert mounts_at_or_under(sanity_dir) == []
