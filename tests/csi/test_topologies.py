"""Publish, unpublish, idempotency and restart with the plugin in both topologies: in the host's
mount namespace, and in its own as csi/deploy/node-daemonset.yaml runs it (kubelet directory
Bidirectional, the cvmfsd root HostToContainer; tests/csi/csi_nsplugin.py). What kubelet and the
container runtime see is always checked in the host's namespace (this test process), and pods are
made as a container runtime makes them: a new mount namespace, `mount --rbind target pod && mount
--make-rslave pod` (csi_pod.py). Also the defects of issue 17 (each test failed before its fix) and
the volume condition of NodeGetVolumeStats against dead and hung mounts."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from csi_harness import (
    TOPOLOGIES,
    Plugin,
    Pod,
    StandinRoot,
    code_of,
    make_target,
    mounts_at_or_under,
    needs_root,
    publish_request,
    unmount_tree,
    unpublish_request,
    wait_for,
)

from csi import mounts
from csi.proto import csi_pb2

pytestmark = needs_root
FP = grpc.StatusCode.FAILED_PRECONDITION
IA = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tplugin(start_plugin: Callable[..., Plugin], topology: str) -> Plugin:
    return start_plugin(topology=topology)


def host_mounts(target: Path) -> list[str]:
    """What the host's namespace (kubelet, the container runtime) has at or below the target."""
    return [e.mount_point for e in mounts_at_or_under(target)]


def stats(plugin: Plugin, target: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id="v", volume_path=str(target))
    return plugin.node.NodeGetVolumeStats(req, timeout=30)


# ------------------------------------------------------------------------------------------------
# both topologies


def test_publish_pod_unpublish(
    tplugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    """Defect 1 of issue 17: with the plugin in its own namespace the host kept the bind and every
    repository mount after an OK unpublish. Now: nothing at or below the target on the host."""
    target = make_target(kubelet_dir)
    tplugin.node.NodePublishVolume(publish_request(target))
    top = mounts.MountTable.read().top(str(target))
    assert top is not None and top.options >= mounts.READ_ONLY_OPTIONS and top.slave
    pod = make_pod(target)
    alpha, beta = cvmfs_root.repos[:2]
    cvmfs_root.lookup(alpha)  # mounted after the publish: arrives in the pod by propagation
    assert pod.call("wait_read", path=f"{alpha}/README")["data"] == f"repository {alpha}\n"
    assert pod.call("wait_read", path=f"{beta}/README")["ok"]  # first looked up in the pod
    denied = pod.call("write", path=f"{alpha}/new")
    assert not denied["ok"] and denied["errno"] == errno.EROFS
    assert len(host_mounts(target)) >= 3  # the bind and two repositories
    tplugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert host_mounts(target) == []
    assert not target.exists()
    unpublished = [r for r in tplugin.records() if r.get("event") == "unpublished"]
    assert unpublished[-1]["lazily"] is False


def test_writer_mode_is_served_read_only_and_logged_once(
    tplugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    t1, t2 = make_target(kubelet_dir, pv="rwo"), make_target(kubelet_dir, pv="rwo-2")
    for target in (t1, t2):
        req = publish_request(
            target,
            "vol-rwo",
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
            readonly=False,
        )
        tplugin.node.NodePublishVolume(req)
    pod = make_pod(t1)
    repo = cvmfs_root.repos[0]
    assert pod.call("wait_read", path=f"{repo}/README")["ok"]
    denied = pod.call("write", path=f"{repo}/x")
    assert not denied["ok"] and denied["errno"] == errno.EROFS
    logged = [r for r in tplugin.records() if r.get("event") == "served read-only"]
    assert len(logged) == 1 and logged[0]["mode"] == "SINGLE_NODE_WRITER"
    for target in (t1, t2):
        tplugin.node.NodeUnpublishVolume(unpublish_request(target, "vol-rwo"))
        assert host_mounts(target) == []


def test_pre_existing_non_empty_target(tplugin: Plugin, kubelet_dir: Path) -> None:
    """A target directory that already holds a file is not mounted over (FailedPrecondition,
    nothing mounted on the host); unpublish then answers OK and leaves the file alone."""
    target = make_target(kubelet_dir)
    target.mkdir()
    (target / "keep").write_text("x")
    assert code_of(tplugin.node.NodePublishVolume, publish_request(target)) == FP
    assert host_mounts(target) == []
    assert (
        code_of(tplugin.node.NodeUnpublishVolume, unpublish_request(target)) == grpc.StatusCode.OK
    )
    assert (target / "keep").read_text() == "x"
    # an existing empty directory is fine
    (target / "keep").unlink()
    tplugin.node.NodePublishVolume(publish_request(target))
    tplugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert host_mounts(target) == [] and not target.exists()


def test_unpublish_with_busy_pod(
    tplugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    """A lingering pod process with its working directory in a repository: unpublish succeeds
    (lazily), the host has nothing left at the target, the process still reads where it is."""
    target = make_target(kubelet_dir)
    tplugin.node.NodePublishVolume(publish_request(target))
    repo = cvmfs_root.repos[0]
    cvmfs_root.lookup(repo)
    pod = make_pod(target)
    assert pod.call("chdir", path=f"{repo}/sub")["ok"]
    tplugin.node.NodeUnpublishVolume(unpublish_request(target))
    assert host_mounts(target) == []
    assert not target.exists()
    # The process's working directory is still the repository's (detached, not destroyed): the
    # kernel still resolves it. Inside the pod, paths relative to it fail after the detach (seen:
    # ENOENT), since the unmount now propagates into the pod's view; kubelet only unpublishes
    # after the pod's containers are gone, so only an escaped process could notice.
    assert "README" in os.listdir(f"/proc/{pod.proc.pid}/cwd/..")
    unpublished = [r for r in tplugin.records() if r.get("event") == "unpublished"]
    assert unpublished[-1]["lazily"] is True and unpublished[-1]["reason"] == "busy"


def test_unpublish_with_stopped_daemon(
    tplugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, make_pod: Callable[[Path], Pod]
) -> None:
    target = make_target(kubelet_dir)
    tplugin.node.NodePublishVolume(publish_request(target))
    cvmfs_root.lookup(cvmfs_root.repos[1])
    make_pod(target)
    cvmfs_root.pause()
    try:
        tplugin.node.NodeUnpublishVolume(unpublish_request(target), timeout=60)
        assert host_mounts(target) == []
        assert not target.exists()
    finally:
        cvmfs_root.resume()


def test_idempotency(tplugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot) -> None:
    target = make_target(kubelet_dir)
    for _ in range(3):
        tplugin.node.NodePublishVolume(publish_request(target))
    assert len(mounts.MountTable.read().at(str(target))) == 1  # on the host
    for _ in range(2):
        tplugin.node.NodeUnpublishVolume(unpublish_request(target))
        assert host_mounts(target) == []


def test_plugin_restart(
    start_plugin: Callable[..., Plugin],
    topology: str,
    kubelet_dir: Path,
    cvmfs_root: StandinRoot,
    make_pod: Callable[[Path], Pod],
) -> None:
    """SIGKILL of the plugin: pods keep working; a new plugin (a new namespace in the DaemonSet
    topology) takes over from mountinfo: re-publish is OK, unpublish clears the host."""
    first = start_plugin(topology=topology)
    target = make_target(kubelet_dir)
    first.node.NodePublishVolume(publish_request(target))
    pod = make_pod(target)
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    repo = cvmfs_root.repos[2]
    cvmfs_root.lookup(repo)
    assert pod.call("wait_read", path=f"{repo}/README")["ok"]
    second = start_plugin(topology=topology)
    second.node.NodePublishVolume(publish_request(target))
    assert len(mounts.MountTable.read().at(str(target))) == 1
    second.node.NodeUnpublishVolume(unpublish_request(target))
    assert host_mounts(target) == []


def test_foreign_mounts_are_left_alone(tplugin: Plugin, kubelet_dir: Path, tmp_path: Path) -> None:
    """Defects 3 and 4 of issue 17: kubelet's own directories are not targets; a foreign mount at
    a target (on top of ours, or alone) is neither unmounted, remounted nor reported as ours."""
    k = kubelet_dir
    secret = k / "pods" / "uid-1" / "volumes" / "kubernetes.io~secret" / "token"
    secret.mkdir(parents=True)
    mounts.mount("tmpfs", str(secret), "tmpfs", 0, "size=1m")
    try:
        for path in (k / "pods", k / "plugins", secret):
            assert code_of(tplugin.node.NodeUnpublishVolume, unpublish_request(path)) == IA
            assert code_of(tplugin.node.NodePublishVolume, publish_request(path)) == IA
        assert host_mounts(secret) == [str(secret)]
        # another driver's volume at a CSI target
        other = make_target(k, pv="other-driver")
        other.mkdir()
        mounts.mount("tmpfs", str(other), "tmpfs", 0, "size=1m")
        assert code_of(tplugin.node.NodeUnpublishVolume, unpublish_request(other)) == FP
        assert code_of(tplugin.node.NodePublishVolume, publish_request(other)) == (
            grpc.StatusCode.ALREADY_EXISTS
        )
        assert host_mounts(other) == [str(other)]
        # a foreign mount stacked on top of our bind: re-publish is not OK and changes nothing
        ours = make_target(k, pv="ours")
        tplugin.node.NodePublishVolume(publish_request(ours))
        mounts.mount("tmpfs", str(ours), "tmpfs", 0, "size=1m")
        assert code_of(tplugin.node.NodePublishVolume, publish_request(ours)) == (
            grpc.StatusCode.ALREADY_EXISTS
        )
        top = mounts.MountTable.read().top(str(ours))
        assert top is not None and top.fstype == "tmpfs" and not top.read_only
        assert code_of(tplugin.node.NodeUnpublishVolume, unpublish_request(ours)) == FP
        assert len(mounts.MountTable.read().at(str(ours))) == 2
    finally:
        unmount_tree(k / "pods")


# ------------------------------------------------------------------------------------------------
# host topology only


def test_republish_reapplies_flags(plugin: Plugin, kubelet_dir: Path) -> None:
    """A re-publish over our bind that lost its flags (a crash half way, someone's remount) does
    not answer OK without making it read-only, nosuid, nodev again."""
    target = make_target(kubelet_dir)
    plugin.node.NodePublishVolume(publish_request(target))
    mounts.mount(None, str(target), None, mounts.MS_REMOUNT | mounts.MS_BIND)  # rw, suid, dev
    top = mounts.MountTable.read().top(str(target))
    assert top is not None and not top.read_only
    plugin.node.NodePublishVolume(publish_request(target))
    top = mounts.MountTable.read().top(str(target))
    assert top is not None and top.options >= mounts.READ_ONLY_OPTIONS
    plugin.node.NodeUnpublishVolume(unpublish_request(target))


def test_unpublish_timeout_detaches(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot
) -> None:
    """An unmount below the target that does not return in 5 s (its path walk waits on a stopped
    FUSE server) makes the plugin detach the whole tree with MNT_DETACH and answer OK."""
    target = make_target(kubelet_dir)
    plugin.node.NodePublishVolume(publish_request(target))
    repo = cvmfs_root.fuse_repo
    cvmfs_root.lookup(repo)
    deep = cvmfs_root.path / repo / "sub"
    mounts.mount("tmpfs", str(deep), "tmpfs", 0, "size=1m")  # propagates to the target's copy
    wait_for(lambda: host_mounts(target / repo / "sub"), what="propagated submount")
    pid = cvmfs_root.repo_pid(repo)
    assert pid is not None
    os.kill(pid, 19)  # SIGSTOP: the walk to <target>/<repo>/sub now waits for it
    try:
        plugin.node.NodeUnpublishVolume(unpublish_request(target), timeout=60)
        assert host_mounts(target) == []
        unpublished = [r for r in plugin.records() if r.get("event") == "unpublished"]
        assert unpublished[-1]["lazily"] is True and unpublished[-1]["reason"] == "timeout"
    finally:
        os.kill(pid, 18)  # SIGCONT
        unmount_tree(deep)


def test_stranded_thread_limit(
    start_plugin: Callable[..., Plugin], kubelet_dir: Path, cvmfs_root: StandinRoot
) -> None:
    """Each probe of a hung root leaves a thread blocked in the kernel; at MAX_STRANDED (32) the
    plugin stops starting new ones and fails at once, until the blocked calls come back."""
    plugin = start_plugin("--probe-timeout=0.1")
    target = make_target(kubelet_dir)
    cvmfs_root.pause()
    try:
        messages = []
        for _ in range(mounts.MAX_STRANDED + 1):
            with pytest.raises(grpc.RpcError) as err:
                plugin.node.NodePublishVolume(publish_request(target), timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            messages.append(err.value.details() or "")
        assert all("still blocked" not in m for m in messages[: mounts.MAX_STRANDED])
        assert f"{mounts.MAX_STRANDED} earlier filesystem calls are still blocked" in messages[-1]
    finally:
        cvmfs_root.resume()
    wait_for(
        lambda: (
            code_of(plugin.node.NodePublishVolume, publish_request(target)) == grpc.StatusCode.OK
        )
    )
    plugin.node.NodeUnpublishVolume(unpublish_request(target))


# ------------------------------------------------------------------------------------------------
# volume condition (NodeGetVolumeStats)


@pytest.fixture
def subpath_view(kubelet_dir: Path) -> Iterator[Callable[[Path, Path], Path]]:
    """kubelet's bind for a `subPath:` of a volume: pods/<uid>/volume-subpaths/<vol>/<ctr>/0."""
    made: list[Path] = []

    def make(target: Path, source: Path) -> Path:
        uid, volume = target.parts[-5], target.parts[-2]
        view = kubelet_dir / "pods" / uid / "volume-subpaths" / volume / "main" / "0"
        view.mkdir(parents=True)
        mounts.mount(str(source), str(view), None, mounts.MS_BIND)
        made.append(view)
        return view

    yield make
    for view in made:
        unmount_tree(view)


def test_volume_condition(
    tplugin: Plugin,
    kubelet_dir: Path,
    cvmfs_root: StandinRoot,
    make_pod: Callable[[Path], Pod],
    subpath_view: Callable[[Path, Path], Path],
) -> None:
    """Healthy volumes are normal; a subPath view and a per-repository volume whose repository
    mount died (ENOTCONN in the pod) are abnormal, naming the repository and what to do."""
    repo = cvmfs_root.fuse_repo
    whole = make_target(kubelet_dir, pv="whole")
    per_repo = make_target(kubelet_dir, pv="one")
    tplugin.node.NodePublishVolume(publish_request(whole))
    tplugin.node.NodePublishVolume(publish_request(per_repo, "one", repository=repo))
    view = subpath_view(whole, whole / repo)
    pod = make_pod(view)
    assert pod.call("read", path="README")["data"] == f"repository {repo}\n"
    for target in (whole, per_repo):
        healthy = stats(tplugin, target)
        assert not healthy.volume_condition.abnormal
        assert healthy.usage  # csi-sanity requires usage
    cvmfs_root.kill_repo(repo)
    dead = pod.call("read", path="README")
    assert not dead["ok"] and dead["errno"] == errno.ENOTCONN
    sick = stats(tplugin, whole).volume_condition
    assert sick.abnormal
    assert f"repository {repo}" in sick.message
    assert "cvmfsd is not running or the repository's backend died" in sick.message
    sick = stats(tplugin, per_repo).volume_condition
    assert sick.abnormal and f"repository {repo}" in sick.message
    for target, vid in ((whole, "cvmfs-default"), (per_repo, "one")):
        unmount_tree(view) if target == whole else None
        tplugin.node.NodeUnpublishVolume(unpublish_request(target, vid))
        assert host_mounts(target) == []


def test_subpath_view_names_the_fix(
    plugin: Plugin,
    kubelet_dir: Path,
    cvmfs_root: StandinRoot,
    subpath_view: Callable[[Path, Path], Path],
) -> None:
    """Only the subPath view is dead (the volume's own copy of the repository was detached, as
    cvmfsd's healing does): the message says to use a `repository:` volume."""
    repo = cvmfs_root.fuse_repo
    whole = make_target(kubelet_dir, pv="whole")
    cvmfs_root.lookup(repo)
    plugin.node.NodePublishVolume(publish_request(whole))
    view = subpath_view(whole, whole / repo)
    cvmfs_root.kill_repo(repo)
    mounts.umount(str(cvmfs_root.path / repo), mounts.MNT_DETACH)  # healing: gone everywhere
    wait_for(lambda: not host_mounts(whole / repo), what="detach propagated")
    sick = stats(plugin, whole).volume_condition
    assert sick.abnormal and f"repository {repo} at {view}" in sick.message
    assert "use a `repository:` volume instead of a subPath" in sick.message
    unmount_tree(view)
    plugin.node.NodeUnpublishVolume(unpublish_request(whole))


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_volume_condition_daemon_down(
    how: str, plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot
) -> None:
    """cvmfsd dead or hung: abnormal, answered within the probe bound (never a hung call)."""
    target = make_target(kubelet_dir)
    plugin.node.NodePublishVolume(publish_request(target))
    if how == "killed":
        cvmfs_root.kill()
    else:
        cvmfs_root.pause()
    try:
        condition = stats(plugin, target).volume_condition
        assert condition.abnormal
        if how == "killed":
            assert "cvmfsd is not running" in condition.message
        else:
            assert "does not answer" in condition.message
    finally:
        if how == "stopped":
            cvmfs_root.resume()
    plugin.node.NodeUnpublishVolume(unpublish_request(target), timeout=60)
    assert host_mounts(target) == []
