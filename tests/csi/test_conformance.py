"""Conformance over the real gRPC socket, following the CSI spec and the community suite
(csi-sanity) for everything the plugin advertises.

csi-sanity itself runs in test_sanity.py. Every access mode is served (read-only); targets must
have kubelet's CSI target shape.
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from csi_harness import (
    AccessMode,
    Plugin,
    StandinRoot,
    capability,
    code_of,
    make_target,
    mounts_at_or_under,
    needs_root,
    publish_request,
    unpublish_request,
    wait_for,
)

import csi
from csi import mounts
from csi.config import DEFAULT_DRIVER_NAME
from csi.proto import csi_pb2

pytestmark = needs_root
IA = grpc.StatusCode.INVALID_ARGUMENT
OK = grpc.StatusCode.OK
NAME_RE = re.compile(r"^[a-zA-Z0-9]([-a-zA-Z0-9.]{0,61}[a-zA-Z0-9])?$")
WRITER_MODES = (
    AccessMode.SINGLE_NODE_WRITER,
    AccessMode.MULTI_NODE_SINGLE_WRITER,
    AccessMode.MULTI_NODE_MULTI_WRITER,
    AccessMode.SINGLE_NODE_SINGLE_WRITER,
    AccessMode.SINGLE_NODE_MULTI_WRITER,
)
RPC = csi_pb2.NodeServiceCapability.RPC


# ---------------------------------------------------------------------------------------------
# Identity


def test_plugin_info(plugin: Plugin) -> None:
    info = plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == DEFAULT_DRIVER_NAME
    assert NAME_RE.match(info.name) and len(info.name) <= 63
    assert info.vendor_version == csi.__version__


def test_plugin_capabilities_match_services(plugin: Plugin) -> None:
    caps = plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    types = [c.service.type for c in caps.capabilities]
    assert types == [csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE]
    assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_node_mode_serves_no_controller(start_plugin: Callable[..., Plugin]) -> None:
    plugin = start_plugin("--mode=node")
    caps = plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []
    req = csi_pb2.ControllerGetCapabilitiesRequest()
    assert code_of(plugin.controller.ControllerGetCapabilities, req) == (
        grpc.StatusCode.UNIMPLEMENTED
    )


def test_controller_mode_is_ready_without_a_root(
    start_plugin: Callable[..., Plugin], tmp_path: Path
) -> None:
    plugin = start_plugin("--mode=controller", root=tmp_path / "nothing-here")
    assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    req = csi_pb2.NodeGetInfoRequest()
    assert code_of(plugin.node.NodeGetInfo, req) == grpc.StatusCode.UNIMPLEMENTED


def test_bad_driver_name_refused(tmp_path: Path, kubelet_dir: Path) -> None:
    import subprocess

    from csi_harness import PY, REPO_ROOT, env_with_repo

    for name in ("-bad", "a" * 64, "Upper.Case", "under_score"):
        proc = subprocess.run(
            [PY, "-m", "csi.main", f"--endpoint=unix://{tmp_path}/x.sock", f"--driver-name={name}"],
            cwd=REPO_ROOT,
            env=env_with_repo(),
            capture_output=True,
            timeout=30,
        )
        assert proc.returncode == 2, name
        assert b"driver name" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Node


def test_node_capabilities_consistent(plugin: Plugin, kubelet_dir: Path) -> None:
    caps = plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    types = [c.rpc.type for c in caps.capabilities]
    assert types == [RPC.GET_VOLUME_STATS, RPC.VOLUME_CONDITION]  # no stage, no expansion
    target = str(make_target(kubelet_dir))
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id="v", staging_target_path=target, volume_capability=capability()
    )
    assert code_of(plugin.node.NodeStageVolume, stage) == grpc.StatusCode.UNIMPLEMENTED
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id="v", staging_target_path=target)
    assert code_of(plugin.node.NodeUnstageVolume, unstage) == grpc.StatusCode.UNIMPLEMENTED
    expand = csi_pb2.NodeExpandVolumeRequest(volume_id="v", volume_path=target)
    assert code_of(plugin.node.NodeExpandVolume, expand) == grpc.StatusCode.UNIMPLEMENTED
    # advertised: stats of a target where nothing is published is NotFound, not Unimplemented
    stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id="v", volume_path=target)
    assert code_of(plugin.node.NodeGetVolumeStats, stats) == grpc.StatusCode.NOT_FOUND
    for bad in ("", "some/path"):
        stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id="v", volume_path=bad)
        want = IA if not bad else grpc.StatusCode.NOT_FOUND
        assert code_of(plugin.node.NodeGetVolumeStats, stats) == want


def test_node_info(start_plugin: Callable[..., Plugin]) -> None:
    """The node id is the one given (not a default), there is no volume limit (0: kubelet then
    schedules any number of these volumes) and no topology."""
    for node_id in ("node-1", "worker-7.example.org"):
        plugin = start_plugin(f"--node-id={node_id}")
        info = plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert info.node_id == node_id
        assert info.max_volumes_per_node == 0
        assert not info.HasField("accessible_topology")
        plugin.stop()


def test_node_publish_argument_checks(plugin: Plugin, kubelet_dir: Path) -> None:
    target = make_target(kubelet_dir)
    good = publish_request(target)
    cases: dict[str, csi_pb2.NodePublishVolumeRequest] = {}
    r = csi_pb2.NodePublishVolumeRequest()
    r.CopyFrom(good)
    r.ClearField("volume_id")
    cases["no volume id"] = r
    r = csi_pb2.NodePublishVolumeRequest()
    r.CopyFrom(good)
    r.ClearField("target_path")
    cases["no target path"] = r
    r = csi_pb2.NodePublishVolumeRequest()
    r.CopyFrom(good)
    r.ClearField("volume_capability")
    cases["no capability"] = r
    r = csi_pb2.NodePublishVolumeRequest()
    r.CopyFrom(good)
    r.volume_capability.CopyFrom(capability(block=True))
    cases["block"] = r
    r = csi_pb2.NodePublishVolumeRequest()
    r.CopyFrom(good)
    r.volume_capability.ClearField("mount")
    cases["no access type"] = r
    r = csi_pb2.NodePublishVolumeRequest()
    r.CopyFrom(good)
    r.volume_capability.ClearField("access_mode")
    cases["no access mode"] = r
    r = csi_pb2.NodePublishVolumeRequest()
    r.CopyFrom(good)
    r.volume_capability.access_mode.mode = AccessMode.UNKNOWN
    cases["mode UNKNOWN"] = r
    for flag in ("rw", "noexec", "exec", "suid"):
        r = csi_pb2.NodePublishVolumeRequest()
        r.CopyFrom(good)
        r.volume_capability.mount.mount_flags.append(flag)
        cases[f"mount flag {flag}"] = r
    r = csi_pb2.NodePublishVolumeRequest()
    r.CopyFrom(good)
    r.volume_context["repositry"] = "atlas.cern.ch"
    cases["unknown context key"] = r
    for bad in ("", "nodots", "../etc", "a/b.org", ".hidden.org", "x" * 300 + ".org"):
        r = csi_pb2.NodePublishVolumeRequest()
        r.CopyFrom(good)
        r.volume_context["repository"] = bad
        cases[f"repository {bad[:20]!r}"] = r
    k = kubelet_dir
    not_targets = (
        "relative/mount",
        f"{target}/",
        f"{target}/../mount",
        f"{k}",
        f"{k}/pods",  # kubelet's own directories (defect 3 of issue 17)
        f"{k}/plugins",
        f"{k}/plugins/kubernetes.io/csi/other.driver/0123/globalmount",
        f"{target.parent}/target",
        f"{target}/sub",
        f"{k}/pods/uid/volumes/kubernetes.io~empty-dir/cache/mount",
        f"{k}/pods/uid/volume-subpaths/pv/c/0",
    )
    for path in not_targets:
        r = csi_pb2.NodePublishVolumeRequest()
        r.CopyFrom(good)
        r.target_path = path
        cases[f"target {path}"] = r
    for what, req in cases.items():
        assert code_of(plugin.node.NodePublishVolume, req) == IA, what
    assert not target.exists()
    assert mounts_at_or_under(kubelet_dir)[1:] == []  # only the kubelet tmpfs itself


def test_node_unpublish_argument_checks(plugin: Plugin, kubelet_dir: Path) -> None:
    target = make_target(kubelet_dir)
    assert code_of(plugin.node.NodeUnpublishVolume, unpublish_request(target, "")) == IA
    assert code_of(plugin.node.NodeUnpublishVolume, unpublish_request("", "v")) == IA
    # never published: nothing to do, and that is success
    assert code_of(plugin.node.NodeUnpublishVolume, unpublish_request(target)) == OK


def test_publish_unpublish_idempotent_x10(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot
) -> None:
    target = make_target(kubelet_dir)
    for _ in range(10):
        assert code_of(plugin.node.NodePublishVolume, publish_request(target)) == OK
        assert len(mounts.MountTable.read().at(str(target))) == 1
    assert target.is_dir()
    for _ in range(10):
        assert code_of(plugin.node.NodeUnpublishVolume, unpublish_request(target)) == OK
        assert not target.exists()
    assert mounts.MountTable.read().at(str(target)) == []
    # the parent kubelet made is left alone
    assert target.parent.is_dir()


def test_lifecycle_with_controller(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot
) -> None:
    """CreateVolume -> NodePublish (with the volume context) -> NodeUnpublish -> DeleteVolume."""
    for params in ({}, {"repository": cvmfs_root.repos[0]}):
        vol = plugin.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"pvc-{len(params)}",
                volume_capabilities=[capability()],
                capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30),
                parameters={**params, "csi.storage.k8s.io/pvc/name": "claim"},
            )
        ).volume
        assert vol.volume_id and vol.capacity_bytes == 0
        assert dict(vol.volume_context) == params
        target = make_target(kubelet_dir, pv=f"pv-{len(params)}")
        req = publish_request(target, vol.volume_id, context=dict(vol.volume_context))
        plugin.node.NodePublishVolume(req)
        if params:
            assert (target / "README").read_text().startswith("repository")
        plugin.node.NodeUnpublishVolume(unpublish_request(target, vol.volume_id))
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert not target.exists()


def test_concurrent_operation_on_one_target_is_aborted(
    start_plugin: Callable[..., Plugin], kubelet_dir: Path, cvmfs_root: StandinRoot
) -> None:
    """While a publish waits for a hung root (bounded by the probe timeout), a second call on the
    same target is told to retry (Aborted) rather than queueing behind it. The second call is made
    once the plugin has logged that the first holds the target (no sleep), and the probe timeout is
    long enough that the first cannot finish while the test reads the log."""
    plugin = start_plugin("--log-level=debug", "--probe-timeout=30")
    target = make_target(kubelet_dir)
    codes: list[grpc.StatusCode] = []
    cvmfs_root.pause()
    try:
        first = threading.Thread(
            target=lambda: codes.append(
                code_of(plugin.node.NodePublishVolume, publish_request(target), timeout=60)
            )
        )
        first.start()
        wait_for(lambda: any(r.get("event") == "target locked" for r in plugin.records()))
        second = code_of(plugin.node.NodePublishVolume, publish_request(target))
        cvmfs_root.resume()
        first.join(60)
    finally:
        cvmfs_root.resume()
    assert second == grpc.StatusCode.ABORTED
    # the first one then went on and, once the root answered again, published
    assert codes == [grpc.StatusCode.OK]
    assert mounts.MountTable.read().top(str(target)) is not None
    plugin.node.NodeUnpublishVolume(unpublish_request(target))


# ---------------------------------------------------------------------------------------------
# Controller


def test_controller_capabilities_consistent(plugin: Plugin) -> None:
    RPC = csi_pb2.ControllerServiceCapability.RPC
    caps = plugin.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in caps.capabilities] == [RPC.CREATE_DELETE_VOLUME]
    unadvertised = {
        plugin.controller.ControllerPublishVolume: csi_pb2.ControllerPublishVolumeRequest(
            volume_id="v", node_id="node-1", volume_capability=capability()
        ),
        plugin.controller.ControllerUnpublishVolume: csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id="v"
        ),
        plugin.controller.ListVolumes: csi_pb2.ListVolumesRequest(),
        plugin.controller.GetCapacity: csi_pb2.GetCapacityRequest(),
        plugin.controller.CreateSnapshot: csi_pb2.CreateSnapshotRequest(
            source_volume_id="v", name="s"
        ),
        plugin.controller.DeleteSnapshot: csi_pb2.DeleteSnapshotRequest(snapshot_id="s"),
        plugin.controller.ListSnapshots: csi_pb2.ListSnapshotsRequest(),
    }
    for call, req in unadvertised.items():
        assert code_of(call, req) == grpc.StatusCode.UNIMPLEMENTED, req


def test_create_volume(plugin: Plugin) -> None:
    create = plugin.controller.CreateVolume
    caps = [capability()]
    assert code_of(create, csi_pb2.CreateVolumeRequest(volume_capabilities=caps)) == IA
    assert code_of(create, csi_pb2.CreateVolumeRequest(name="n")) == IA
    req = csi_pb2.CreateVolumeRequest(name="n", volume_capabilities=[capability(0)])
    assert code_of(create, req) == IA
    for mode in WRITER_MODES:  # every mode provisions (and is published read-only)
        req = csi_pb2.CreateVolumeRequest(name="n", volume_capabilities=[capability(mode)])
        assert create(req).volume.volume_id.startswith("cvmfs-"), mode
    req = csi_pb2.CreateVolumeRequest(name="n", volume_capabilities=[capability(flags=("noexec",))])
    assert code_of(create, req) == IA
    req = csi_pb2.CreateVolumeRequest(name="n", volume_capabilities=[capability(block=True)])
    assert code_of(create, req) == IA
    req = csi_pb2.CreateVolumeRequest(name="n", volume_capabilities=caps, parameters={"x": "y"})
    assert code_of(create, req) == IA
    req = csi_pb2.CreateVolumeRequest(
        name="n", volume_capabilities=caps, parameters={"repository": "not a repo"}
    )
    assert code_of(create, req) == IA
    req = csi_pb2.CreateVolumeRequest(name="n" * 129, volume_capabilities=caps)
    assert code_of(create, req) == IA
    req = csi_pb2.CreateVolumeRequest(name="bad\x01name", volume_capabilities=caps)
    assert code_of(create, req) == IA
    req = csi_pb2.CreateVolumeRequest(
        name="n",
        volume_capabilities=caps,
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="s")
        ),
    )
    assert code_of(create, req) == IA
    req = csi_pb2.CreateVolumeRequest(
        name="n", volume_capabilities=caps, capacity_range=csi_pb2.CapacityRange(required_bytes=-1)
    )
    assert code_of(create, req) == IA
    req = csi_pb2.CreateVolumeRequest(
        name="n",
        volume_capabilities=caps,
        capacity_range=csi_pb2.CapacityRange(required_bytes=10, limit_bytes=5),
    )
    assert code_of(create, req) == grpc.StatusCode.OUT_OF_RANGE
    # maximum-length name, and idempotency: same name -> same volume
    name = "N" * 128
    a = create(csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=caps)).volume
    b = create(csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=caps)).volume
    assert a == b and a.volume_id.startswith("cvmfs-") and len(a.volume_id) <= 128
    other = create(csi_pb2.CreateVolumeRequest(name="other", volume_capabilities=caps)).volume
    assert other.volume_id != a.volume_id


def test_delete_volume(plugin: Plugin) -> None:
    delete = plugin.controller.DeleteVolume
    assert code_of(delete, csi_pb2.DeleteVolumeRequest()) == IA
    assert code_of(delete, csi_pb2.DeleteVolumeRequest(volume_id="no-such-volume")) == OK
    vol = plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(name="d", volume_capabilities=[capability()])
    ).volume
    for _ in range(2):
        assert code_of(delete, csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)) == OK


def test_validate_volume_capabilities(plugin: Plugin) -> None:
    validate = plugin.controller.ValidateVolumeCapabilities
    vol = plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="v", volume_capabilities=[capability()], parameters={"repository": "a.b.org"}
        )
    ).volume
    caps = [capability(), capability(AccessMode.SINGLE_NODE_READER_ONLY)]
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=caps)
    assert code_of(validate, req) == IA
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id)
    assert code_of(validate, req) == IA
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="fake-vol-id-123", volume_capabilities=caps
    )
    assert code_of(validate, req) == grpc.StatusCode.NOT_FOUND
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=caps, volume_context=vol.volume_context
    )
    resp = validate(req)
    assert resp.HasField("confirmed")
    assert list(resp.confirmed.volume_capabilities) == caps
    assert dict(resp.confirmed.volume_context) == dict(vol.volume_context)
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[capability(AccessMode.SINGLE_NODE_WRITER)]
    )
    assert validate(req).HasField("confirmed")  # served, read-only
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[capability(block=True)]
    )
    resp = validate(req)
    assert not resp.HasField("confirmed") and resp.message


# ---------------------------------------------------------------------------------------------
# Server: socket, signals, logging


def test_stale_socket_removed_and_live_socket_kept(start_plugin: Callable[..., Plugin]) -> None:
    import subprocess

    from csi_harness import REPO_ROOT, env_with_repo

    plugin = start_plugin()
    assert plugin.proc is not None
    # a second plugin on the same live endpoint refuses to start (and leaves the socket alone)
    proc = subprocess.run(
        plugin.argv, cwd=REPO_ROOT, env=env_with_repo(), capture_output=True, timeout=30
    )
    assert proc.returncode == 2 and b"another process is serving" in proc.stderr
    assert plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name
    # SIGKILL leaves the socket file behind; the next start removes it and serves
    plugin.proc.kill()
    plugin.proc.wait()
    assert plugin.socket.exists()
    plugin.start()
    assert plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name
    assert plugin.stop() == 0  # SIGTERM: graceful, exit status 0
    assert not plugin.socket.exists()  # removed on the way out


def test_every_call_logged_with_secrets_stripped(plugin: Plugin, kubelet_dir: Path) -> None:
    target = make_target(kubelet_dir)
    req = publish_request(target)
    req.secrets["password"] = "hunter2-secret"
    req.volume_capability.mount.mount_flags.append("nodev")
    req.volume_context["csi.storage.k8s.io/serviceAccount.tokens"] = "token-xyz"
    plugin.node.NodePublishVolume(req)
    plugin.node.NodeUnpublishVolume(unpublish_request(target))
    create = csi_pb2.CreateVolumeRequest(
        name="s", volume_capabilities=[capability()], secrets={"key": "hunter2-secret"}
    )
    plugin.controller.CreateVolume(create)
    assert code_of(plugin.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest()) == IA
    # the interceptor logs after the reply is sent: wait for that line, not for a duration
    wait_for(lambda: sum(r.get("event") == "call" for r in plugin.records()) >= 4)
    text = plugin.log.read_text()
    assert "hunter2-secret" not in text and "token-xyz" not in text and "nodev" not in text
    calls = [r for r in plugin.records() if r.get("event") == "call"]
    methods = [c["method"] for c in calls]
    for m in (
        "/csi.v1.Node/NodePublishVolume",
        "/csi.v1.Node/NodeUnpublishVolume",
        "/csi.v1.Controller/CreateVolume",
    ):
        assert m in methods
    for c in calls:
        assert isinstance(c["duration_ms"], float) and c["code"] in grpc.StatusCode.__members__
    published = next(c for c in calls if c["method"].endswith("NodePublishVolume"))
    assert published["code"] == "OK"
    assert published["request"]["secrets"] == {"password": "***stripped***"}
    assert calls[-1]["code"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------------------------------
# 1,000 generated malformed requests


def _tree(path: Path, skip: tuple[Path, ...] = ()) -> set[str]:
    """Every path below `path` (not descending into `skip`, e.g. the FUSE root)."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


def test_malformed_requests(
    plugin: Plugin, kubelet_dir: Path, cvmfs_root: StandinRoot, tmp_path: Path
) -> None:
    """Seeded: each request has exactly one defect, so its code is known. The plugin answers each
    with that code, keeps serving, and creates, mounts or removes nothing outside the kubelet
    directory (nor anything at all inside it for a rejected request)."""
    rng = random.Random(20261127)
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "file").write_text("x")
    (kubelet_dir / "pods" / "escape").symlink_to(outside)
    (kubelet_dir / "pods" / "afile").write_text("not a directory")
    parent = make_target(kubelet_dir, pv="fuzz").parent
    skip = (cvmfs_root.path, cvmfs_root.staging, kubelet_dir, plugin.dir)
    before_outside = _tree(tmp_path, skip)
    before_kubelet = _tree(kubelet_dir)
    before_mounts = {(e.mount_point, e.dev) for e in mounts_at_or_under(tmp_path)}
    valid_target = str(parent / "mount")
    k = str(kubelet_dir)
    bad_targets = [
        "",
        "relative/path",
        str(outside / "mount"),
        str(outside / "keep"),
        str(outside),
        k,
        k + "/",
        k + "/pods/../../outside/mount",
        k + "/pods/./x/mount",
        k + "//pods/x/mount",
        k + "/pods/escape/keep",
        k + "/pods/escape/mount",
        k + "/pods/afile/mount",
        k + "/pods/no-such-pod/volumes/mount",
        k + "/pods/x\x01/mount",
        k + "/pods/" + "y" * 300 + "/mount",
        "/" + "z" * 5000,
        valid_target + "/",
        valid_target + "/..",
        str(tmp_path / "kubelet-other" / "mount"),
        k + "-sibling/mount",
        k + "/pods",
        k + "/plugins",
        k + "/pods/x/volumes/kubernetes.io~csi/pv/target",
        str(parent) + "/mount/x",
    ]
    bad_ids = ["", "a\x00b", "tab\there", "x" * 2000, "\x7f"]
    bad_repos = ["", "norepo", "a..b.org", "-a.org", "a/b.org", "..", "x" * 64 + ".org", "a b.org"]
    bad_flags = ["rw", "suid", "dev", "exec", "noexec", "bind", "remount", "", "ro,rw"]

    def publish_defect() -> tuple[csi_pb2.NodePublishVolumeRequest, grpc.StatusCode]:
        req = publish_request(valid_target, rng.choice(["v1", "cvmfs-x", "csi-abc"]))
        kind = rng.randrange(10)
        if kind == 0:
            req.volume_id = rng.choice(bad_ids)
        elif kind == 1:
            req.target_path = rng.choice(bad_targets)
            if req.target_path == k + "/pods/no-such-pod/volumes/mount":
                return req, IA  # the parent does not exist
        elif kind == 2:
            req.ClearField("volume_capability")
        elif kind == 3:
            req.volume_capability.CopyFrom(capability(block=True))
        elif kind == 4:
            req.volume_capability.access_mode.mode = AccessMode.UNKNOWN
        elif kind == 5:
            req.volume_capability.mount.mount_flags.append(rng.choice(bad_flags))
        elif kind == 6:
            req.volume_context["repository"] = rng.choice(bad_repos)
        elif kind == 7:
            req.volume_context[rng.choice(["repo", "Repository", "x", "csi.storage.k8s.io"])] = "v"
        elif kind == 8:
            req.volume_context["repository"] = rng.choice(["nosuch.example.org", "zz.example.net"])
            return req, grpc.StatusCode.NOT_FOUND
        else:
            req.volume_capability.ClearField(rng.choice(["access_mode", "mount"]))
        return req, IA

    def unpublish_defect() -> tuple[csi_pb2.NodeUnpublishVolumeRequest, grpc.StatusCode]:
        if rng.random() < 0.5:
            return unpublish_request(valid_target, rng.choice(bad_ids)), IA
        target = rng.choice([t for t in bad_targets if "no-such-pod" not in t])
        return unpublish_request(target, "v1"), IA

    def controller_defect() -> tuple[object, object, grpc.StatusCode]:
        c = plugin.controller
        kind = rng.randrange(5)
        if kind == 0:
            return c.CreateVolume, csi_pb2.CreateVolumeRequest(name=rng.choice(["", "a\x02"])), IA
        if kind == 1:
            return (
                c.CreateVolume,
                csi_pb2.CreateVolumeRequest(
                    name="n", volume_capabilities=[capability(rng.choice([0]), block=True)]
                ),
                IA,
            )
        if kind == 2:
            return c.DeleteVolume, csi_pb2.DeleteVolumeRequest(), IA
        if kind == 3:
            return (
                c.ValidateVolumeCapabilities,
                csi_pb2.ValidateVolumeCapabilitiesRequest(
                    volume_id="nope", volume_capabilities=[capability()]
                ),
                grpc.StatusCode.NOT_FOUND,
            )
        return (
            c.ValidateVolumeCapabilities,
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="cvmfs-" + "0" * 32),
            IA,
        )

    failures = []
    for i in range(1000):
        pick = rng.random()
        if pick < 0.55:
            req, want = publish_defect()
            call: object = plugin.node.NodePublishVolume
        elif pick < 0.8:
            req, want = unpublish_defect()
            call = plugin.node.NodeUnpublishVolume
        else:
            call, req, want = controller_defect()
        got = code_of(call, req, timeout=15)
        if got != want:
            failures.append((i, want, got, req))
        if i % 100 == 99:  # the plugin keeps serving good requests in between
            assert code_of(plugin.node.NodePublishVolume, publish_request(valid_target)) == OK
            assert code_of(plugin.node.NodeUnpublishVolume, unpublish_request(valid_target)) == OK
    assert not failures, failures[:5]
    assert plugin.alive()
    assert _tree(tmp_path, skip) == before_outside
    assert (outside / "keep" / "file").read_text() == "x"
    assert _tree(kubelet_dir) == before_kubelet
    after_mounts = {(e.mount_point, e.dev) for e in mounts_at_or_under(tmp_path)}
    new = {m for m in after_mounts - before_mounts if not m[0].startswith(str(cvmfs_root.path))}
    assert new == set()
    assert before_mounts - after_mounts == set()


@pytest.mark.parametrize("mode", ["all"])
def test_unknown_method_is_unimplemented(plugin: Plugin, mode: str) -> None:
    assert plugin.channel is not None
    call = plugin.channel.unary_unary("/csi.v1.Node/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as err:
        call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
