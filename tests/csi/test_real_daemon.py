"""The plugin against the real daemon (cvmfsd with the cvmfs2 stand-in backend, from the
`daemon` fixture of tests/conftest.py): the same kubelet-like flow as test_publish.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from csi_harness import (
    Plugin,
    Pod,
    code_of,
    make_target,
    needs_root,
    publish_request,
    unpublish_request,
)

from csi import mounts
from csi.proto import csi_pb2

pytestmark = needs_root


def test_publish_against_the_real_daemon(
    daemon: Any, kubelet_dir: Path, tmp_path: Path, make_pod: Callable[[Path], Pod]
) -> None:
    plugin = Plugin(tmp_path, kubelet_dir, daemon.root).start()
    try:
        assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
        target = make_target(kubelet_dir)
        plugin.node.NodePublishVolume(publish_request(target))
        pod = make_pod(target)
        # first access from inside the pod, after the publish: the daemon mounts it on lookup
        first = pod.call("read", path="atlas.cern.ch/README")
        assert first["ok"], first
        readme = first["data"]
        assert readme and readme == (daemon.path("atlas.cern.ch") / "README").read_text()
        real = pod.call("realpath", path="atlas.cern.ch/bin/hello")["path"]
        assert real == str(pod.view / "atlas.cern.ch" / "bin" / "hello")
        # first access on the host, after the publish
        assert (daemon.path("cms.cern.ch") / "README").read_text() == readme
        assert pod.call("wait_read", path="cms.cern.ch/README")["data"] == readme
        # per-repository volume
        repo_target = make_target(kubelet_dir, pv="sft")
        plugin.node.NodePublishVolume(publish_request(repo_target, "sft", repository="sft.cern.ch"))
        assert (repo_target / "README").read_text() == readme
        missing = publish_request(make_target(kubelet_dir, pv="x"), repository="nosuch.cern.ch")
        assert code_of(plugin.node.NodePublishVolume, missing) in (
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.UNAVAILABLE,
        )
        for t, vid in ((target, "cvmfs-default"), (repo_target, "sft")):
            plugin.node.NodeUnpublishVolume(unpublish_request(t, vid))
            assert not t.exists()
            assert mounts.MountTable.read().at(str(t)) == []
    finally:
        plugin.stop()
