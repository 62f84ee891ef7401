"""CSI: NodePublishVolume / NodeUnpublishVolume latency over the plugin's gRPC unix socket.

The plugin (`python -m csi.main`) runs against a cvmfsd root, with a fake kubelet directory on its
own shared tmpfs (kubelet makes its root rshared), as tests/csi/ drive it. Three kinds of volume:
- generic: the whole root (one volume for every repository);
- repository (mounted): one repository below the root, already mounted;
- repository (cold): one repository that the publish itself makes cvmfsd mount (includes a boot).
Each cycle publishes into a fresh kubelet-style target path, then unpublishes it.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from ..common import MS_SHARED, PY, mount, stop_process, summary, umount_below
from ..workspace import DOMAIN
from . import Context, ms, started


def _target(kubelet: Path, pv: str) -> Path:
    parent = kubelet / "pods" / str(uuid.uuid4()) / "volumes" / "kubernetes.io~csi" / pv
    parent.mkdir(parents=True)
    return parent / "mount"


def run(ctx: Context) -> dict[str, Any]:
    import grpc

    from csi.proto import csi_pb2, csi_pb2_grpc

    sz = ctx.sizes
    mode = csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY
    cap = csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))
    cap.mount.SetInParent()
    warm_repo = ctx.ws.tiny(f"csi-warm.{DOMAIN}")
    cold_repos = [ctx.ws.tiny(f"csi-cold{i:03d}.{DOMAIN}") for i in range(sz.csi_cold)]
    kinds: dict[str, list[tuple[float, float]]] = {"generic": [], "repository_mounted": [],
                                                   "repository_cold": []}
    with started(ctx, ["cvmfsd"], "csi") as systems:
        daemon = systems["cvmfsd"]
        os.stat(daemon.path(warm_repo) / ctx.ws.cold_file)
        kubelet = ctx.ws.base / "csi" / "kubelet"
        kubelet.mkdir(parents=True, exist_ok=True)
        mount("tmpfs", kubelet, "tmpfs", 0, "size=16m,mode=755")
        plugin = None
        channel = None
        try:
            mount("none", kubelet, None, MS_SHARED)
            (kubelet / "pods").mkdir()
            sock = ctx.ws.base / "csi" / "csi.sock"
            log = ctx.ws.base / "csi" / "plugin.log"
            with open(log, "ab") as f:
                plugin = subprocess.Popen(
                    [PY, "-m", "csi.main", f"--endpoint=unix://{sock}",
                     f"--kubelet-dir={kubelet}", f"--cvmfs-root={daemon.mount_dir}",
                     "--node-id=bench-node", "--log-level=warning"],
                    stdout=f, stderr=f, stdin=subprocess.DEVNULL, cwd=ctx.ws.src,
                    env=ctx.ws.src_env())
            channel = grpc.insecure_channel(f"unix://{sock}")
            grpc.channel_ready_future(channel).result(timeout=30)
            node = csi_pb2_grpc.NodeStub(channel)

            def cycle(kind: str, repo: str | None) -> None:
                context = {"repository": repo} if repo else {}
                target = _target(kubelet, f"pv-{kind}")
                t0 = time.perf_counter_ns()
                node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                    volume_id=f"cvmfs-bench-{kind}", target_path=str(target),
                    volume_capability=cap, readonly=True, volume_context=context), timeout=60)
                t1 = time.perf_counter_ns()
                node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=f"cvmfs-bench-{kind}", target_path=str(target)), timeout=60)
                t2 = time.perf_counter_ns()
                kinds[kind].append((ms(t1 - t0), ms(t2 - t1)))

            cycle("generic", None)  # a first call warms the plugin's code paths; not counted
            kinds["generic"].clear()
            for i in range(sz.csi_cycles):
                cycle("generic", None)
                cycle("repository_mounted", warm_repo)
                if (i + 1) % max(1, sz.csi_cycles // 4) == 0:
                    ctx.say(f"{i + 1}/{sz.csi_cycles} cycles: publish generic "
                            f"{kinds['generic'][-1][0]:.2f} ms, repository "
                            f"{kinds['repository_mounted'][-1][0]:.2f} ms")
            for repo in cold_repos:
                cycle("repository_cold", repo)
            ctx.say(f"{len(cold_repos)} cold repository publishes")
        finally:
            if channel is not None:
                channel.close()
            if plugin is not None:
                stop_process(plugin)
            leaked = [p for p in umount_below(kubelet) if p != str(kubelet)]
            if leaked:
                ctx.leaks.extend(leaked)
                ctx.say(f"CSI targets left mounted (forced): {leaked}")
    out: dict[str, Any] = {}
    for kind, cycles in kinds.items():
        out[kind] = {"publish_ms": summary([p for p, _ in cycles]),
                     "unpublish_ms": summary([u for _, u in cycles]),
                     "publish_samples_ms": [p for p, _ in cycles],
                     "unpublish_samples_ms": [u for _, u in cycles]}
    return {"params": {"cycles": sz.csi_cycles, "cold": sz.csi_cold,
                       "plugin": "python -m csi.main (unix socket), kubelet dir on a shared tmpfs"},
            "kinds": out}
