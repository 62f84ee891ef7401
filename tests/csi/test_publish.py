"""Kubelet-like integration: publish into a fake kubelet directory, pods in their own mount
namespaces, repositories that the daemon attaches after the publish."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from csi_harness import (
    AccessMode,
    Plugin,
    Pod,
    StandinRoot,
    code_of,
    make_target,
    needs_root,
    publish_request,
    unpublish_request,
)

from csi import mounts

pytestmark = needs_root


def test_publish_then_lookup_from_pod_and_host(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    target = make_target(kubelet_dir)
    plugin.node.NodePublishVolume(publish_request(target))
    table = mounts.MountTable.read()
    entry = table.top(str(target))
    assert entry is not None and entry.fstype == "fuse.cvmfsd"
    assert {"ro", "nosuid", "nodev"} <= entry.options
    assert entry.slave  # of the root: later repositories arrive; shared only with its copies

    pod = make_pod(target)
    # first looked up from inside the pod, after the publish
    alpha = cvmfs_root.repos[0]
    assert pod.call("stat", path=alpha)["ok"]
    assert pod.call("wait_read", path=f"{alpha}/README")["data"] == f"repository {alpha}\n"
    # first looked up on the host, after the publish
    beta = cvmfs_root.repos[1]
    cvmfs_root.lookup(beta)
    assert pod.call("wait_read", path=f"{beta}/README")["data"] == f"repository {beta}\n"
    # canonical paths: no symlink tricks
    real = pod.call("realpath", path=f"{beta}/sub")["path"]
    assert real == str(pod.view / beta / "sub")
    assert pod.call("chdir", path=f"{beta}/sub")["cwd"] == str(pod.view / beta / "sub")
    # read-only inside the pod
    denied = pod.call("write", path=f"{beta}/new")
    assert not denied["ok"] and denied["errno"] == errno.EROFS
    # the host sees them too through the target
    assert (target / alpha / "README").read_text() == f"repository {alpha}\n"

    plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert not target.exists()
    assert mounts.MountTable.read().at(str(target)) == []


def test_two_namespaces_read_one_repository_concurrently(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    """Two PVs (one per namespace, different volume ids) on one node, two pods, one repository."""
    t1 = make_target(kubelet_dir, pv="cvmfs-ns1")
    t2 = make_target(kubelet_dir, pv="cvmfs-ns2")
    plugin.node.NodePublishVolume(publish_request(t1, "cvmfs-ns1"))
    plugin.node.NodePublishVolume(publish_request(t2, "cvmfs-ns2"))
    pods = [make_pod(t1), make_pod(t2)]
    repo = cvmfs_root.repos[2]
    errors: list[object] = []

    def reader(pod: Pod) -> None:
        for _ in range(30):
            r = pod.call("wait_read", path=f"{repo}/README")
            if r.get("data") != f"repository {repo}\n":
                errors.append(r)

    threads = [threading.Thread(target=reader, args=(p,)) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # one repository mount on the host serves both
    assert mounts.MountTable.read().top(str(cvmfs_root.path / repo)) is not None
    for target, vid in ((t1, "cvmfs-ns1"), (t2, "cvmfs-ns2")):
        plugin.node.NodeUnpublishVolume(unpublish_request(target, vid))
        assert not target.exists()


def test_unpublish_while_pod_cwd_inside(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    """kubelet calls NodeUnpublish after the containers stopped, but a process may linger: the call
    must succeed, the target goes away on the host, and the lingering process is not broken."""
    target = make_target(kubelet_dir)
    plugin.node.NodePublishVolume(publish_request(target))
    repo = cvmfs_root.repos[0]
    cvmfs_root.lookup(repo)
    pod = make_pod(target)
    assert pod.call("chdir", path=f"{repo}/sub")["ok"]
    plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert not target.exists()
    assert mounts.MountTable.read().at(str(target)) == []
    assert mounts.MountTable.read().under(str(target)) == []
    # the lingering process's working directory is kept by the kernel (on the detached tree)
    assert "README" in os.listdir(f"/proc/{pod.proc.pid}/cwd/..")
    # and a second unpublish is still fine
    plugin.node.NodeUnpublishVolume(unpublish_request(target))


def test_unpublish_busy_on_host_detaches(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot
) -> None:
    """A process in the plugin's own namespace holds a repository below the target busy: the
    plain unmount fails with EBUSY and the plugin detaches the target lazily instead."""
    import subprocess

    from csi_harness import PY, stop_pid

    target = make_target(kubelet_dir)
    plugin.node.NodePublishVolume(publish_request(target))
    repo = cvmfs_root.repos[1]
    cvmfs_root.lookup(repo)
    holder = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys, time; sys.stdout.write('in\\n'); sys.stdout.flush(); time.sleep(60)",
        ],
        cwd=target / repo,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"in\n"
        plugin.node.NodeUnpublishVolume(unpublish_request(target))
        assert not target.exists()
        assert mounts.MountTable.read().under(str(target)) == []
        # the holder's cwd is on the detached tree: still readable through it
        assert "README" in os.listdir(f"/proc/{holder.pid}/cwd")
        unpublished = [r for r in plugin.records() if r.get("event") == "unpublished"]
        assert unpublished[-1]["lazily"] is True
    finally:
        stop_pid(holder, timeout=5)


def test_per_repository_publish(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    target = make_target(kubelet_dir)
    repo = cvmfs_root.repos[3]
    plugin.node.NodePublishVolume(publish_request(target, "cvmfs-atlas", repository=repo))
    assert (target / "README").read_text() == f"repository {repo}\n"
    pod = make_pod(target)
    assert pod.call("read", path="README")["data"] == f"repository {repo}\n"
    # the same publish again is fine; the whole root onto that target is not
    plugin.node.NodePublishVolume(publish_request(target, "cvmfs-atlas", repository=repo))
    assert code_of(plugin.node.NodePublishVolume, publish_request(target)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    plugin.node.NodeUnpublishVolume(unpublish_request(target, "cvmfs-atlas"))
    assert not target.exists()


def test_unknown_repository_is_not_found(plugin: Plugin, kubelet_dir: Path) -> None:
    target = make_target(kubelet_dir)
    req = publish_request(target, repository="nosuch.example.org")
    assert code_of(plugin.node.NodePublishVolume, req) == grpc.StatusCode.NOT_FOUND
    assert not target.exists()


def test_other_mount_already_there_is_already_exists(plugin: Plugin, kubelet_dir: Path) -> None:
    target = make_target(kubelet_dir)
    target.mkdir()
    mounts.mount("tmpfs", str(target), "tmpfs", 0, "size=1m")
    try:
        req = publish_request(target)
        assert code_of(plugin.node.NodePublishVolume, req) == grpc.StatusCode.ALREADY_EXISTS
        assert len(mounts.MountTable.read().at(str(target))) == 1
    finally:
        mounts.umount(str(target))


@pytest.mark.parametrize("how", ["killed", "not-mounted", "hung"])
def test_daemon_down_is_unavailable_and_mounts_nothing(
    how: str,
    start_plugin: Callable[..., Plugin],
    kubelet_dir: Path,
    cvmfs_root: StandinRoot,
    tmp_path: Path,
) -> None:
    from google.protobuf import empty_pb2  # noqa: F401 - keeps protobuf imported for stubs

    from csi.proto import csi_pb2

    if how == "not-mounted":
        plain = tmp_path / "plain-cvmfs"
        plain.mkdir()
        plugin = start_plugin(root=plain)
    else:
        plugin = start_plugin()
        if how == "killed":
            cvmfs_root.kill()
        else:
            cvmfs_root.pause()
    try:
        target = make_target(kubelet_dir)
        start = time.monotonic()
        assert code_of(plugin.node.NodePublishVolume, publish_request(target)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert time.monotonic() - start < 10
        assert not target.exists()
        assert mounts.MountTable.read().at(str(target)) == []
        probe = plugin.identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
        assert probe.HasField("ready") and probe.ready.value is False
        # the plugin keeps answering
        info = plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
        assert info.name
    finally:
        if how == "hung":
            cvmfs_root.resume()


def test_probe_ready_when_root_answers(plugin: Plugin) -> None:
    from csi.proto import csi_pb2

    assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_target_outside_kubelet_dir_rejected(
    plugin: Plugin, kubelet_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in (outside / "mount", kubelet_dir / "pods" / ".." / ".." / "outside" / "mount"):
        req = publish_request(str(path))
        assert code_of(plugin.node.NodePublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(plugin.node.NodeUnpublishVolume, unpublish_request(str(path))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    # a symlink inside the kubelet directory that leads outside
    (kubelet_dir / "pods" / "evil").symlink_to(outside)
    escaped = kubelet_dir / "pods" / "evil" / "mount"
    req = publish_request(str(escaped))
    assert code_of(plugin.node.NodePublishVolume, req) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(plugin.node.NodeUnpublishVolume, unpublish_request(str(escaped))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert os.listdir(outside) == []
    assert mounts.MountTable.read().under(str(outside)) == []


def test_target_inside_a_published_volume_rejected(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot
) -> None:
    target = make_target(kubelet_dir)
    plugin.node.NodePublishVolume(publish_request(target))
    nested = target / cvmfs_root.repos[0] / "mount"
    assert code_of(plugin.node.NodePublishVolume, publish_request(nested)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    plugin.node.NodeUnpublishVolume(unpublish_request(target))


def test_existing_repositories_are_read_only_in_the_pod(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    """Repositories already mounted at publish time end up read-only, nosuid, nodev below the
    target (mount_setattr AT_RECURSIVE on the clone); the ones attached later are the daemon's
    read-only mounts propagated."""
    repo = cvmfs_root.repos[0]
    cvmfs_root.lookup(repo)
    target = make_target(kubelet_dir)
    plugin.node.NodePublishVolume(publish_request(target))
    sub = mounts.MountTable.read().top(str(target / repo))
    assert sub is not None and {"ro", "nosuid", "nodev"} <= sub.options
    pod = make_pod(target)
    opts = pod.call("mount_options", path=repo)["options"]
    assert {"ro", "nosuid", "nodev"} <= set(opts)
    plugin.node.NodeUnpublishVolume(unpublish_request(target))


def test_legacy_mount_api(
    start_plugin: Callable[..., Plugin],
    kubelet_dir: Path,
    cvmfs_root: StandinRoot,
    make_pod: Callable[[Path], Pod],
) -> None:
    """The mount(2)-only path for kernels without open_tree/mount_setattr (EL8)."""
    plugin = start_plugin("--mount-api=legacy")
    target = make_target(kubelet_dir)
    for _ in range(3):
        plugin.node.NodePublishVolume(publish_request(target))
    stack = mounts.MountTable.read().at(str(target))
    assert len(stack) == 1
    assert {"ro", "nosuid", "nodev"} <= stack[0].options
    assert stack[0].slave
    pod = make_pod(target)
    repo = cvmfs_root.repos[2]
    assert pod.call("wait_read", path=f"{repo}/README")["ok"]
    plugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert not target.exists()


def test_ephemeral_inline_volume(plugin: Plugin, kubelet_dir: Path) -> None:
    """kubelet sends SINGLE_NODE_WRITER for inline volumes, with or without readOnly: served, and
    read-only either way; so is a persistent volume with a writer mode."""
    pod_info = {
        "csi.storage.k8s.io/ephemeral": "true",
        "csi.storage.k8s.io/pod.name": "p",
        "csi.storage.k8s.io/pod.namespace": "ns",
        "csi.storage.k8s.io/pod.uid": "u",
        "csi.storage.k8s.io/serviceAccount.name": "default",
    }
    for readonly, context in ((False, pod_info), (True, pod_info), (True, {})):
        target = make_target(kubelet_dir)
        req = publish_request(
            target,
            "csi-0123",
            mode=AccessMode.SINGLE_NODE_WRITER,
            readonly=readonly,
            context=context,
        )
        plugin.node.NodePublishVolume(req)
        top = mounts.MountTable.read().top(str(target))
        assert top is not None and top.read_only
        plugin.node.NodeUnpublishVolume(unpublish_request(target, "csi-0123"))
        assert not target.exists()


def test_plugin_restart_keeps_pods_working(
    start_plugin: Callable[..., Plugin],
    kubelet_dir: Path,
    cvmfs_root: StandinRoot,
    make_pod: Callable[[Path], Pod],
) -> None:
    """Pods keep their volume while the plugin is gone; a new plugin takes over from mountinfo."""
    first = start_plugin()
    target = make_target(kubelet_dir)
    first.node.NodePublishVolume(publish_request(target))
    pod = make_pod(target)
    assert first.proc is not None
    first.proc.kill()  # SIGKILL: no cleanup at all, the socket file stays
    first.proc.wait()
    repo = cvmfs_root.repos[1]
    assert pod.call("wait_read", path=f"{repo}/README")["ok"]
    second = start_plugin()  # same kubelet dir; its own socket
    second.node.NodePublishVolume(publish_request(target))  # idempotent from mountinfo
    assert len(mounts.MountTable.read().at(str(target))) == 1
    second.node.NodeUnpublishVolume(unpublish_request(target))
    assert not target.exists()
