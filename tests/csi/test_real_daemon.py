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
        # the README promises NotFound for a repository that does not exist (cvmfs2 exit 16)
        assert code_of(plugin.node.NodePublishVolume, missing) == grpc.StatusCode.NOT_FOUND
        for t, vid in ((target, "cvmfs-default"), (repo_target, "sft")):
            plugin.node.NodeUnpublishVolume(unpublish_request(t, vid))
            assert not t.exists()
            assert mounts.MountTable.read().at(str(t)) == []
    finally:
        plugin.stop()


def test_pinned_volumes_share_one_instance(
    daemon: Any, kubelet_dir: Path, tmp_path: Path, make_pod: Callable[[Path], Pod]
) -> None:
    """Two pods (two namespaces) pinned to the same tag: the pinned content at their mount path,
    one cvmfs2 for both; a bad tag is NotFound; an injection in the pin is InvalidArgument."""
    from cvmfs2_standin.kit import make_repo

    env = daemon.env
    make_repo(env.server, "sw.cern.ch", {"VERSION": "1\n"}, revision=1, tags=["v1"])
    make_repo(env.server, "sw.cern.ch", {"VERSION": "2\n"}, revision=2)
    plugin = Plugin(tmp_path, kubelet_dir, daemon.root).start()
    try:
        targets = []
        for pv in ("ns1", "ns2"):
            target = make_target(kubelet_dir, pv=pv)
            plugin.node.NodePublishVolume(
                publish_request(target, pv, repository="sw.cern.ch", context={"tag": "v1"})
            )
            targets.append((target, pv))
            pod = make_pod(target)
            assert pod.call("read", path="VERSION")["data"] == "1\n"
        assert (daemon.path("sw.cern.ch") / "VERSION").read_text() == "2\n"
        assert env.boots().count("sw.cern.ch") == 2  # one pinned instance, one live
        bad = publish_request(
            make_target(kubelet_dir, pv="bad"),
            "bad",
            repository="sw.cern.ch",
            context={"tag": "nope"},
        )
        assert code_of(plugin.node.NodePublishVolume, bad) == grpc.StatusCode.NOT_FOUND
        for pin in (
            {"tag": "v1,allow_other"},
            {"tag": "-o"},
            {"hash": "zz"},
            {"tag": "v1", "date": "2024-01-01T00:00:00Z"},
        ):
            evil = publish_request(
                make_target(kubelet_dir, pv="evil"), "evil", repository="sw.cern.ch", context=pin
            )
            assert code_of(plugin.node.NodePublishVolume, evil) == grpc.StatusCode.INVALID_ARGUMENT
        for target, vid in targets:
            plugin.node.NodeUnpublishVolume(unpublish_request(target, vid))
            assert not target.exists()
    finally:
        plugin.stop()
