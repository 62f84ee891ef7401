"""The namespace scan's rules (cvmfsd/core/usage.py, docs/views.md B) on mount tables written out by
hand, and its bounds: an unfinished scan means busy. End to end (real namespaces, the plugin,
pods) in tests/csi/test_views.py."""

from __future__ import annotations

import time
from pathlib import Path

from cvmfsd.core import usage

ROOT, STAGING = b"/cvmfs", b"/run/cvmfsd/staging"
M = (0, 45)  # the repository mount's device
# The host: the live root (peer group 100) with the repository (200); a whole-root volume V (a
# slave of 100, shared as 301 under the kubelet directory) with its copy of the repository; a
# per-repository volume T; a subPath S2 below the repository's root; an anchor in staging; a
# per-repository volume T2 healed by a mount stacked on it.
HOST = b"""\
1 0 8:1 / / rw shared:1 - ext4 /dev/sda1 rw
30 1 0:40 / /cvmfs ro shared:100 - fuse.cvmfsd cvmfsd ro
31 30 0:45 / /cvmfs/atlas ro shared:200 - fuse cvmfs2 ro
40 1 0:50 / /kubelet rw shared:300 - tmpfs tmpfs rw
41 40 0:40 / /kubelet/V ro shared:301 master:100 - fuse.cvmfsd cvmfsd ro
42 41 0:45 / /kubelet/V/atlas ro shared:302 master:200 - fuse cvmfs2 ro
43 40 0:45 / /kubelet/T ro shared:303 master:200 - fuse cvmfs2 ro
44 40 0:45 /data /kubelet/S2 ro shared:304 master:302 - fuse cvmfs2 ro
45 40 0:45 / /kubelet/T2 ro shared:305 master:200 - fuse cvmfs2 ro
46 45 0:46 / /kubelet/T2 ro master:201 - fuse cvmfs2 ro
50 1 0:60 / /run/cvmfsd/staging rw - tmpfs cvmfsd-staging rw
51 50 0:45 / /run/cvmfsd/staging/anchor-atlas ro - fuse cvmfs2 ro
"""
# A pod made by a runtime from V (`mount --rbind V pod && mount --make-rslave pod`): its copy
# of V is a slave of V's group 301, not of the root's.
POD = b"""\
1 0 0:70 / / rw master:1 - overlay overlay rw
60 1 0:40 / /cvmfs ro master:301 - fuse.cvmfsd cvmfsd ro
61 60 0:45 / /cvmfs/atlas ro master:302 - fuse cvmfs2 ro
"""
# A pod made before a takeover: its own root is the old root (38, no master left), the new root
# stacked on it at its root; the old repository copy is hidden, the new one is in the tree.
OLD = b"""\
1 0 0:71 / / rw master:1 - overlay overlay rw
70 1 0:38 / /cvmfs ro - fuse.cvmfsd cvmfsd ro
71 70 0:45 / /cvmfs/atlas ro master:200 - fuse cvmfs2 ro
72 70 0:40 / /cvmfs ro master:100 - fuse.cvmfsd cvmfsd ro
73 72 0:45 / /cvmfs/atlas ro master:200 - fuse cvmfs2 ro
"""
# A whole-root pod that is rprivate (mountPropagation: None): nothing reaches it, umount2 does
# not see it.
PRIVATE = b"""\
1 0 0:72 / / rw - overlay overlay rw
80 1 0:40 / /cvmfs ro - fuse.cvmfsd cvmfsd ro
81 80 0:45 / /cvmfs/atlas ro - fuse cvmfs2 ro
"""


def kinds(text: bytes, groups: frozenset[bytes],
          devs: set[tuple[int, int]]) -> list[tuple[str, tuple[int, int], str]]:
    rows = usage._parse(text)
    return [(r.mountpoint.decode(), r.dev, kind)
            for r, kind in usage.classify(rows, devs, groups, STAGING)]


def test_root_groups_are_the_live_roots() -> None:
    assert usage.root_groups(usage._parse(HOST), ROOT) == {b"100"}
    # Below a newer root only the top layer counts (the old one is overmounted at its root).
    assert usage.root_groups(usage._parse(OLD), ROOT) == frozenset()


def test_tree_groups_follow_slaves_of_slaves() -> None:
    tree = usage.tree_groups(frozenset({b"100"}), [HOST, POD, OLD])
    assert tree == {b"100", b"301"}  # 302..305 are the repository's groups, not the root's


def test_each_kind_of_mount_is_classified() -> None:
    tree = usage.tree_groups(frozenset({b"100"}), [HOST, POD])
    assert kinds(HOST, tree, {M, (0, 46)}) == [
        ("/cvmfs/atlas", M, "tree"),          # the host's mount: umount2's own
        ("/kubelet/V/atlas", M, "tree"),      # in a whole-root volume: umount2 sees it
        ("/kubelet/T", M, "view"),            # a per-repository volume: a use
        ("/kubelet/S2", M, "view"),           # a subPath below the root: a use
        ("/kubelet/T2", M, "covered"),        # a dead layer, healed by the mount on it ...
        ("/kubelet/T2", (0, 46), "view"),     # ... which is the view
        ("/run/cvmfsd/staging/anchor-atlas", M, "staging"),
    ]
    assert kinds(POD, tree, {M}) == [("/cvmfs/atlas", M, "tree")]
    # Without following V's group, the pod's copy would look like a use umount2 cannot see.
    assert kinds(POD, frozenset({b"100"}), {M}) == [("/cvmfs/atlas", M, "view")]
    assert kinds(OLD, tree, {M}) == [("/cvmfs/atlas", M, "old"), ("/cvmfs/atlas", M, "tree")]
    assert kinds(PRIVATE, tree, {M}) == [("/cvmfs/atlas", M, "view")]


def test_mountinfo_escapes_are_undone() -> None:
    rows = usage._parse(b"5 1 0:45 /a\\040b /k/with\\040space ro - fuse cvmfs2 ro\n")
    (row,) = rows.values()
    assert row.mountpoint == b"/k/with space" and row.root == b"/a b"


def test_a_scan_past_its_deadline_is_incomplete_and_means_busy(tmp_path: Path) -> None:
    result = usage.scan({M}, {M}, Path("/nonexistent-root"), tmp_path,
                        deadline=time.monotonic() - 1)
    assert not result.complete and result.error == "deadline passed"
    verdict = usage.Usage(result, {"atlas.cern.ch": M})
    assert verdict.busy("atlas.cern.ch")
    assert "did not finish" in verdict.why("atlas.cern.ch")


def test_a_complete_scan_without_uses_is_not_busy(tmp_path: Path) -> None:
    """Nothing on this machine mounts a device that does not exist: no use, not busy; and a
    repository whose device is unknown is busy (never expire on doubt)."""
    ghost = (0, 999_999)
    result = usage.scan({ghost}, {ghost}, Path("/nonexistent-root"), tmp_path,
                        deadline=time.monotonic() + 30)
    assert result.complete, result.error
    assert result.namespaces >= 1 and result.pids >= 1
    verdict = usage.Usage(result, {"a.cern.ch": ghost, "b.cern.ch": None})
    assert not verdict.busy("a.cern.ch")
    assert verdict.busy("b.cern.ch")
