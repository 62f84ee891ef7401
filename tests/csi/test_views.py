"""Pod views of repositories against the real daemon: volumes published by the plugin over its
socket, pods made as a container runtime makes them (tests/csi/runtime_pod.py), kubelet's subPath
binds. Issue 13; the kernel side is measured in docs/views.md.

- A repository that a volume or a pod uses is never expired, and `cvmfsctl umount` without
  --force refuses it, saying where it is used; once nothing uses it, it expires as before.
- Per-repository and pinned volumes, seen from a pod's slave copy with its working directory
  inside and a file open, read again (by a fresh path walk) after their cvmfs2 is killed, after a
  crash loop backs off, after `cvmfsctl umount --force` and a remount, after an idle expiry and
  the next access, and across every kind of cvmfsd restart; so does a subPath bind at a
  repository's root. A subPath below a repository's root does not heal (views.md D): the plugin's
  NodeGetVolumeStats and `cvmfsctl status` report it.

The processes' own working directories and open files on a dead backend stay ENOTCONN (views.md
fact 9): after a backend death the tests walk again by path, as `cd "$PWD"` does.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import exited, soak_size
from csi_harness import (
    Plugin,
    make_target,
    mounts_at_or_under,
    needs_root,
    publish_request,
    unmount_tree,
    unpublish_request,
    wait_for,
)
from views_harness import (
    RuntimePod,
    cvmfsctl,
    kill_backend,
    serving_pid,
    subpath_bind,
    upgraded_package,
)

from csi.proto import csi_pb2
from cvmfsd.core import kernel

pytestmark = needs_root

REPO = "atlas.cern.ch"
SW = "sw.cern.ch"
PIN = f"{SW}@tag=v1"
README = "hello from the repository\n"
BLOB = (bytes(range(256)) * 64).decode("latin-1")
# Generous bounds for a failing test on a loaded 2-core machine, not timings: what it took is
# printed (pytest -s) and quoted in the README from there.
HEAL_WITHIN = 30.0


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def cluster(start_daemon: Callable[..., Any], env: Any, kubelet_dir: Path,
            tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(start_daemon, env, kubelet_dir, tmp_path)
    try:
        yield c
    finally:
        c.close()


class Cluster:
    """A daemon (restartable), the plugin on its socket, volumes and pods."""

    def __init__(self, start_daemon: Callable[..., Any], env: Any, kubelet_dir: Path,
                 tmp: Path) -> None:
        self.start_daemon, self.env = start_daemon, env
        self.kubelet_dir, self.tmp = kubelet_dir, tmp
        self.d: Any = None
        self.plugin: Plugin | None = None
        self.pods: list[RuntimePod] = []
        self.config: dict[str, Any] = {}
        env.add_repo(SW, {"VERSION": "1\n", "README": README, "data/blob.bin": BLOB.encode(
            "latin-1")}, revision=1, tags=["v1"])
        env.add_repo(SW, {"VERSION": "2\n", "README": README, "data/blob.bin": BLOB.encode(
            "latin-1")}, revision=2)

    def start(self, **config: Any) -> Any:
        self.config = config
        self.d = self.start_daemon(**config)
        if self.plugin is None:
            self.plugin = Plugin(self.tmp, self.kubelet_dir, self.d.root).start()
        return self.d

    def restart(self, how: str, cwd: Path | None = None) -> Any:
        """graceful (SIGTERM, hand-over), crash (SIGKILL), upgrade (new code on disk), reexec."""
        if how == "reexec":
            readies = len(self.d.events("ready"))
            os.kill(self.d.pid, signal.SIGUSR2)
            self.d.wait_ready(readies + 1)
            return self.d
        code = self.d.stop(signal.SIGKILL if how == "crash" else signal.SIGTERM)
        assert code in (0, -signal.SIGKILL), code
        extra = {"cwd": cwd} if cwd is not None else {}
        self.d = self.start_daemon(**self.config, **extra)
        return self.d

    def publish(self, pv: str, source: str | None) -> Path:
        """A volume: source None = the whole root, a name = that repository, a name with @tag=
        = that pinned snapshot."""
        assert self.plugin is not None
        target = make_target(self.kubelet_dir, pv=pv)
        repository, context = None, None
        if source is not None:
            repository, _, pin = source.partition("@")
            context = dict([pin.split("=", 1)]) if pin else None
        self.plugin.node.NodePublishVolume(
            publish_request(target, pv, repository=repository, context=context))
        return target

    def unpublish(self, target: Path) -> None:
        assert self.plugin is not None
        self.plugin.node.NodeUnpublishVolume(unpublish_request(target, target.parts[-2]))

    def pod(self, target: Path) -> RuntimePod:
        pod = RuntimePod(target, self.tmp / f"rpod-{len(self.pods)}" / "vol",
                         hide=[self.env.tmp / "cvmfs", self.kubelet_dir, self.env.tmp / "run"])
        self.pods.append(pod)
        return pod

    def stats(self, target: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
        assert self.plugin is not None
        return self.plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=target.parts[-2], volume_path=str(target)), timeout=60)

    def close(self) -> None:
        for pod in self.pods:
            pod.close()
        if self.plugin is not None:
            self.plugin.stop()
        if self.d is not None and self.config.get("stop_mode") == "handover" and \
                self.d.proc.poll() is None:
            # A last daemon in unmount mode takes everything over and leaves nothing behind.
            self.d.stop(signal.SIGTERM)
            last = self.start_daemon(**{**self.config, "stop_mode": "unmount"})
            assert last.stop() == 0


def source_path(source: str) -> str:
    """Where the daemon mounts a volume's source, relative to the root."""
    return f".snapshots/{source}" if "@" in source else source


def settle_pod(pod: RuntimePod) -> None:
    """The pod's working directory inside the volume, a file held open there, both working."""
    assert pod.call("chdir", path="data")["ok"]
    assert pod.call("open", path="README", key="readme")["ok"]
    assert pod.call("cwd_read", name="blob.bin")["data"] == BLOB
    assert pod.call("read_held", key="readme")["data"] == README


def rewalk(pod: RuntimePod, what: str) -> float:
    """After an event: walk again by path (`cd "$PWD"`, reopen) and read; how long it took."""
    got = pod.wait_read("README", within=HEAL_WITHIN)
    assert got["ok"], (what, got)
    assert got["data"] == README
    assert pod.call("chdir", path="data")["ok"]
    assert pod.call("cwd_read", name="blob.bin")["data"] == BLOB
    assert pod.call("reopen", key="readme")["ok"]
    assert pod.call("read_held", key="readme")["data"] == README
    print(f"\n{what}: the pod read again after {got['waited_s']:.3f} s "
          f"(errors before: {got['errors']})")
    return float(got["waited_s"])


# --- nothing a pod uses is expired or unmounted ---------------------------------------------
@pytest.mark.parametrize("source", [REPO, PIN], ids=["repository", "pinned"])
def test_used_volume_is_never_expired(cluster: Cluster, source: str) -> None:
    """A per-repository (pinned) volume, published by the plugin, with a pod that has its
    working directory inside and a file open: expiry refuses it, saying where it is used, and so
    does `cvmfsctl umount`; after the pod is gone and the volume unpublished, it expires."""
    d = cluster.start(expire_timeout=1.0, expire_min_age=0.2)
    target = cluster.publish("vol", source)
    pod = cluster.pod(target)
    settle_pod(pod)

    def refusals() -> list[dict[str, Any]]:
        return [e for e in d.events("expire_refused") if e["repo"] == source]

    wait_for(lambda: len(refusals()) >= 2, timeout=60, what="expiry refused twice")
    where = {(u["mountpoint"], u["ns"]) for u in refusals()[-1]["uses"]}
    assert (str(target), os.stat("/proc/self/ns/mnt").st_ino) in where  # kubelet's volume
    assert (str(pod.view), pod.ns) in where                              # the pod's copy
    assert not [e for e in d.events("unmounted") if e["repo"] == source]
    assert pod.call("cwd_read", name="blob.bin")["data"] == BLOB
    assert pod.call("read_held", key="readme")["data"] == README

    out = cvmfsctl(d.run_dir, "umount", source)
    assert out.returncode == 1, out
    assert "is busy: used by" in out.stderr and str(target) in out.stderr, out.stderr
    assert f"mount namespace {pod.ns}" in out.stderr, out.stderr
    assert kernel.mounts_at(str(d.root / source_path(source)))
    assert pod.call("cwd_read", name="blob.bin")["data"] == BLOB

    pod.close()
    cluster.unpublish(target)
    wait_for(lambda: [e for e in d.events("unmounted") if e["repo"] == source
                      and e["reason"] == "idle"], timeout=60, what="expired once unused")
    assert not kernel.mounts_at(str(d.root / source_path(source)))


def test_used_repository_cannot_be_unmounted_but_forced(cluster: Cluster) -> None:
    """`cvmfsctl umount` refuses a repository that a pod's copy of a subPath bind uses, and
    --force still detaches it."""
    d = cluster.start(expire_timeout=0)
    whole = cluster.publish("whole", None)
    sub = subpath_bind(cluster.kubelet_dir, whole, f"{REPO}/data")
    pod = cluster.pod(sub)
    assert pod.read("blob.bin") == BLOB
    out = cvmfsctl(d.run_dir, "--json", "umount", REPO)
    assert out.returncode == 1
    error = json.loads(out.stdout)[0]["error"]
    assert error["code"] == "busy"
    assert {(u["mountpoint"], u["root"]) for u in error["uses"]} >= {(str(sub), "/data"),
                                                                      (str(pod.view), "/data")}
    out = cvmfsctl(d.run_dir, "umount", "--force", REPO)
    assert out.returncode == 0, out.stderr
    assert not kernel.mounts_at(str(d.root / REPO))
    pod.close()
    unmount_tree(sub)
    cluster.unpublish(whole)


def test_volume_after_expiry_and_next_access(cluster: Cluster) -> None:
    """Idle expiry, then the next access: a whole-root pod's next lookup mounts the repository
    again; a per-repository volume, once nothing used it and it expired, is published again
    and reads."""
    d = cluster.start(expire_timeout=1.0, expire_min_age=0.2)
    whole = cluster.publish("whole", None)
    whole_pod = cluster.pod(whole)
    assert whole_pod.read(f"{REPO}/README") == README
    target = cluster.publish("one", REPO)
    pod = cluster.pod(target)
    assert pod.read("README") == README
    pod.close()
    cluster.unpublish(target)

    def expired() -> int:
        return len([e for e in d.events("unmounted") if e["repo"] == REPO
                    and e["reason"] == "idle"])

    wait_for(lambda: expired() == 1, timeout=60, what="expired")
    assert whole_pod.read(f"{REPO}/README") == README  # the next access, from the pod
    d.wait_mounted(REPO)
    wait_for(lambda: expired() == 2, timeout=60, what="expired again")
    again = cluster.publish("again", REPO)  # the next access, a new volume
    pod = cluster.pod(again)
    settle_pod(pod)
    assert pod.call("xattr", path="", name="user.pid")["value"] == str(
        serving_pid(d.root / REPO))


@pytest.mark.parametrize("how", ["graceful", "crash", "upgrade", "reexec"])
def test_volumes_survive_a_restart(cluster: Cluster, how: str) -> None:
    """Across each kind of cvmfsd restart: whole-root, per-repository and pinned volumes
    published before it keep working in their pods (the same working directory and open file:
    the backends are the same processes), the host keeps one root layer where the kernel can
    mount beneath, and a repository mounted afterwards reaches the whole-root pod."""
    cluster.env.add_repo("later.cern.ch")
    d = cluster.start(stop_mode="handover", expire_timeout=0)
    pods = {pv: cluster.pod(cluster.publish(pv, source))
            for pv, source in (("whole", None), ("one", REPO), ("pinned", PIN))}
    assert pods["whole"].read(f"{REPO}/README") == README
    for pv in ("one", "pinned"):
        settle_pod(pods[pv])
    backends = {p: serving_pid(d.root / p) for p in (REPO, source_path(PIN))}
    d = cluster.restart(how, cwd=upgraded_package(cluster.tmp) if how == "upgrade" else None)
    assert d.events("ready")[-1]["adopted"] == 2
    if how == "upgrade":
        assert d.events("ready")[-1]["version"] == "99.0.0+upgrade"
    for pv in ("one", "pinned"):
        assert pods[pv].call("cwd_read", name="blob.bin")["data"] == BLOB
        assert pods[pv].call("read_held", key="readme")["data"] == README
        assert pods[pv].read("README") == README
    assert pods["pinned"].read("VERSION") == "1\n"
    assert {p: serving_pid(d.root / p) for p in backends} == backends
    assert pods["whole"].read("later.cern.ch/README") == README
    if kernel.has_move_mount_beneath():
        assert len(kernel.mounts_at(str(d.root))) == 1


# --- a subPath below a repository's root: not healed, reported -----------------------------
@pytest.mark.parametrize("adopted", [False, True], ids=["booted", "adopted"])
def test_subpath_below_repository_root_is_reported(cluster: Cluster, adopted: bool) -> None:
    """kubelet's subPath bind of <repository>/data in a whole-root volume: after the backend
    dies the volume heals, the subPath (and the pod's copy) cannot (views.md D), and both the
    plugin's volume condition and `cvmfsctl status` say so, with where and what to do; also
    when the repository was mounted by a previous daemon (adopted: no device recorded)."""
    d = cluster.start(expire_timeout=0, stop_mode="handover")
    whole = cluster.publish("whole", None)
    deep = subpath_bind(cluster.kubelet_dir, whole, f"{REPO}/data")
    pod = cluster.pod(deep)
    assert pod.read("blob.bin") == BLOB
    assert not cluster.stats(whole).volume_condition.abnormal  # kubelet asks periodically
    if adopted:  # and no scan before the death: the device is known from the takeover
        d = cluster.restart("crash")
        assert d.events("ready")[-1]["adopted"] == 1
    else:
        assert cvmfsctl(d.run_dir, "status").returncode == 0

    kill_backend(d.root / REPO)
    assert (whole / REPO / "README").read_text() == README  # the volume itself heals
    dead = pod.call("read", path="blob.bin")
    assert not dead["ok"] and dead["errno"] == errno.ENOTCONN, dead

    condition = cluster.stats(whole).volume_condition
    assert condition.abnormal
    assert f"repository {REPO} at {deep}" in condition.message, condition.message
    assert "a subPath below a repository's root (/data) is never healed" in condition.message
    assert "use a `repository:` volume" in condition.message, condition.message

    def stale() -> list[dict[str, Any]]:
        out = cvmfsctl(d.run_dir, "--json", "status")
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout)["status"]["stale_views"])

    wait_for(lambda: len(stale()) == 2, timeout=30, what="two stale views")
    assert {(s["repository"], s["mountpoint"], s["root"], s["ns"]) for s in stale()} == {
        (REPO, str(deep), "/data", os.stat("/proc/self/ns/mnt").st_ino),
        (REPO, str(pod.view), "/data", pod.ns)}
    text = cvmfsctl(d.run_dir, "status").stdout
    assert "Stale views (2)" in text and f"{REPO}: {deep} (showing /data)" in text, text
    assert f"{REPO}: {pod.view} (showing /data) in mount namespace {pod.ns}" in text, text
    assert "use a `repository:` volume" in text
    assert "Stale views" not in cvmfsctl(d.run_dir, "status", "cms.cern.ch").stdout

    # Gone once the pod and the bind are: nothing stale is left to report.
    pod.close()
    unmount_tree(deep)
    seen: list[list[dict[str, Any]]] = [[]]

    def none_stale() -> bool:
        seen[0] = stale()
        return not seen[0]

    # A scan serves `cvmfsctl status` for up to 5 s; on a loaded machine scans take longer.
    wait_for(none_stale, timeout=60, what=lambda: f"no stale views; the last scan: {seen[0]}, "
             f"mountinfo under the kubelet dir: {mounts_at_or_under(cluster.kubelet_dir)}")
    cluster.unpublish(whole)


# --- views that heal (the repository heal of views.md A, d2) --------------------------------
@pytest.mark.parametrize("source", [REPO, PIN], ids=["repository", "pinned"])
def test_volume_heals_after_backend_kill(cluster: Cluster, source: str) -> None:
    """A per-repository (pinned) volume's pod reads again after each of three kills of the
    cvmfs2 serving it; so does a pod started after the first kill; nothing is left stale."""
    d = cluster.start(expire_timeout=0)
    path = d.root / source_path(source)
    target = cluster.publish("vol", source)
    pods = [cluster.pod(target)]
    settle_pod(pods[0])
    for round_ in range(3):
        kill_backend(path, wait=False)  # the pods' wait counts from the kill
        for pod in pods:
            rewalk(pod, f"{source}, kill {round_ + 1}")
            assert pod.call("xattr", path="", name="user.pid")["value"] == str(
                serving_pid(path))
        if round_ == 0:
            pods.append(cluster.pod(target))
            settle_pod(pods[-1])
    if "@" in source:
        assert pods[0].read("VERSION") == "1\n"
    out = json.loads(cvmfsctl(d.run_dir, "--json", "status").stdout)
    assert out["status"]["stale_views"] == []


@pytest.mark.parametrize("source", [REPO, PIN], ids=["repository", "pinned"])
def test_volume_recovers_from_a_crash_loop(cluster: Cluster, source: str) -> None:
    """A backend that keeps dying is backed off instead of healed at once; once the backoff is
    over the repository is mounted again, and the pod, which has no way to reach the root, reads
    again without anyone touching the host."""
    d = cluster.start(expire_timeout=0, restart_burst=1, restart_window=60.0,
                      backoff_initial=1.0, backoff_max=2.0)
    path = d.root / source_path(source)
    target = cluster.publish("vol", source)
    pod = cluster.pod(target)
    settle_pod(pod)
    kill_backend(path, wait=False)
    rewalk(pod, f"{source}, first kill")
    os.kill(serving_pid(path), signal.SIGKILL)  # the second death within the window: a loop
    wait_for(lambda: len([e for e in d.events("healed") if e["repo"] == source]) == 2,
             timeout=30, what="the second death handled")
    rewalk(pod, f"{source}, after the crash loop's backoff")


@pytest.mark.parametrize("source", [REPO, PIN], ids=["repository", "pinned"])
def test_volume_heals_after_forced_umount_and_mount(cluster: Cluster, source: str) -> None:
    """`cvmfsctl umount --force` of a volume's repository (its backend stops), then `cvmfsctl
    mount`: the pod reads from the new backend."""
    d = cluster.start(expire_timeout=0)
    path = d.root / source_path(source)
    target = cluster.publish("vol", source)
    pod = cluster.pod(target)
    settle_pod(pod)
    old = serving_pid(path)
    out = cvmfsctl(d.run_dir, "umount", "--force", source)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: exited(old), timeout=60, what="the old backend stopped")
    out = cvmfsctl(d.run_dir, "mount", source)
    assert out.returncode == 0, out.stderr
    rewalk(pod, f"{source}, umount --force and mount")
    assert pod.call("xattr", path="", name="user.pid")["value"] == str(serving_pid(path))


def test_subpath_at_repository_root_heals(cluster: Cluster) -> None:
    """kubelet's subPath bind of <repository> in a whole-root volume is a copy of the
    repository's mount like a per-repository volume: it heals the same way."""
    d = cluster.start(expire_timeout=0)
    whole = cluster.publish("whole", None)
    sub = subpath_bind(cluster.kubelet_dir, whole, REPO)
    pod = cluster.pod(sub)
    settle_pod(pod)
    kill_backend(d.root / REPO, wait=False)
    rewalk(pod, "subPath at the repository root")
    assert (sub / "README").read_text() == README
    assert not cluster.stats(whole).volume_condition.abnormal
    pod.close()
    unmount_tree(sub)
    cluster.unpublish(whole)


def test_volumes_heal_after_every_kind_of_restart(cluster: Cluster) -> None:
    """Volumes and pods made before the restarts (graceful, crash, upgrade, re-exec, in turn):
    after each one a kill of each backend heals every pod, whatever daemon adopted it."""
    d = cluster.start(stop_mode="handover", expire_timeout=0)
    pods = {source: cluster.pod(cluster.publish(f"v{i}", source))
            for i, source in enumerate((REPO, PIN))}
    for pod in pods.values():
        settle_pod(pod)
    for how in ("graceful", "crash", "upgrade", "reexec"):
        d = cluster.restart(how, cwd=upgraded_package(cluster.tmp) if how == "upgrade" else None)
        for source, pod in pods.items():
            assert pod.read("README") == README
            kill_backend(d.root / source_path(source), wait=False)
            rewalk(pod, f"{source}, killed after a {how} restart")
        if kernel.has_move_mount_beneath():
            assert len(kernel.mounts_at(str(d.root))) == 1


@pytest.mark.soak
def test_views_soak(cluster: Cluster) -> None:
    """Many backend kills and daemon SIGKILLs in turn, with a per-repository, a pinned and a
    subPath-at-root pod (working directory inside, a file open) made at the start: each pod
    reads again after every event, the host keeps one root layer, one backend per source."""
    rounds = soak_size(ci=4, full=60)
    d = cluster.start(stop_mode="handover", expire_timeout=0)
    whole = cluster.publish("whole", None)
    pods = {REPO: cluster.pod(cluster.publish("one", REPO)),
            PIN: cluster.pod(cluster.publish("pinned", PIN)),
            "subpath": cluster.pod(subpath_bind(cluster.kubelet_dir, whole, REPO))}
    for pod in pods.values():
        settle_pod(pod)
    waited = []
    for i in range(rounds):
        if i % 2:
            d = cluster.restart("crash")
            if kernel.has_move_mount_beneath():
                assert len(kernel.mounts_at(str(d.root))) == 1
            for pod in pods.values():
                assert pod.read("README") == README
        else:
            for source in (REPO, PIN):
                kill_backend(d.root / source_path(source), wait=False)
            for what, pod in pods.items():
                waited.append(rewalk(pod, f"{what}, soak round {i}"))
    assert Counter(cluster.env.boots()) == Counter({SW: 1 + rounds // 2 + rounds % 2,
                                                    REPO: 1 + rounds // 2 + rounds % 2})
    print(f"\nsoak: {rounds} rounds; pods read again after a median "
          f"{statistics.median(waited):.3f} s, at most {max(waited):.3f} s")
    unmount_tree(cluster.kubelet_dir / "pods" / whole.parts[-5] / "volume-subpaths")
