"""CSI Node service: publish = read-only recursive bind of the daemon's root (or one repository).

NodePublishVolume, in order:
1. check the arguments (InvalidArgument): volume id, capability (any access mode; always served
   read-only), mount flags (ro, nosuid, nodev; noexec is refused), volume context, and the target
   path: one of the shapes kubelet uses for CSI volumes below the kubelet directory
   (`pods/<uid>/volumes/kubernetes.io~csi/<name>/mount`), no FUSE mount between;
2. take the per-target lock (a concurrent call on the same target gets Aborted);
3. probe the daemon's root (Unavailable, nothing mounted); for a repository, look it up below the
   root in a bounded worker (NotFound when it does not exist);
4. walk from the kubelet directory to the target's parent without following symlinks;
5. what mountinfo shows at the TOP of the target's mount stack decides: this driver's bind of the
   same source -> OK (flags re-applied); anything else -> AlreadyExists; nothing -> the target must
   be absent or an empty directory (FailedPrecondition otherwise), then bind.

NodeUnpublishVolume: only this driver's bind is unmounted (a foreign mount on top:
FailedPrecondition, nothing touched). Submounts of the bind are unmounted deepest first (plain
umount2), then the bind; if anything is busy or an unmount does not return in time the bind is
detached lazily (MNT_DETACH), because kubelet needs this call to succeed when a process still uses
the volume. The bind is shared with its copy in the host's namespace (see mounts.bind_read_only),
so these unmounts reach the host when the plugin runs in its own mount namespace. Then the target
directory is removed with rmdir (never recursively). The call fails (kubelet retries) while
anything of ours is still mounted.

NodeGetVolumeStats: usage from statvfs of the target, and the volume's condition (CSI volume
health): the target and every view of it that mountinfo shows (repositories below it, kubelet's
subPath binds of it) are checked in bounded workers; ENOTCONN or no answer -> abnormal, with the
repository named and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import structlog

from csi import mounts
from csi.config import PluginConfig
from csi.mounts import MountEntry, MountTable, is_under
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.rpc import CsiError, invalid, rpc
from csi.volume import (
    capability_problem,
    check_volume_id,
    is_writer_mode,
    mode_name,
    repository_from,
)
from cvmfsd.core.names import SNAPSHOTS_DIR

log = structlog.get_logger("csi.node")

MAX_PATH_BYTES = 4095
MAX_COMPONENT_BYTES = 255
UMOUNT_TIMEOUT = 5.0
# how long to wait for the daemon's mount of a repository to show up after its lookup succeeded
REPOSITORY_ATTACH_WAIT = 2.0
# stacked binds of ours at one target (a race of two plugins) are unmounted one at a time
MAX_STACK = 16

RPC = csi_pb2.NodeServiceCapability.RPC
# kubelet's publish target of a CSI volume (persistent or inline): pods/<uid>/volumes/
# kubernetes.io~csi/<volume spec name, '/' escaped as '~'>/mount below the kubelet directory
_POD_UID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]*$")
CSI_PLUGIN_DIR = "kubernetes.io~csi"
SUBPATH_HINT = "use a `repository:` volume instead of a subPath into the whole-root volume"


@dataclass(frozen=True)
class Target:
    """A checked target path.

    `path` is what the CO sent; `real` is the same path with the kubelet directory replaced by its
    resolved form (what mountinfo shows, should the kubelet directory be a symlink); `parts` are the
    components below the kubelet directory.
    """

    path: str
    real: str
    kubelet_real: str
    parts: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def pod_volume(self) -> tuple[str, str] | None:
        """(pod uid, volume name) for a kubelet-shaped target."""
        if len(self.parts) == 6 and self.parts[0] == "pods":
            return self.parts[1], self.parts[4]
        return None


def is_kubelet_target(parts: tuple[str, ...]) -> bool:
    """pods/<uid>/volumes/kubernetes.io~csi/<name>/mount"""
    return (
        len(parts) == 6
        and parts[0] == "pods"
        and bool(_POD_UID_RE.match(parts[1]))
        and parts[2] == "volumes"
        and parts[3] == CSI_PLUGIN_DIR
        and bool(_VOLUME_NAME_RE.match(parts[4]))
        and parts[5] == "mount"
    )


def check_target(raw: str, kubelet_dir: str, extra: tuple[str, ...] = ()) -> Target:
    """Validate a target path as a string (no filesystem access): a kubelet CSI target below the
    kubelet directory, or one of the `extra` paths the plugin was told to accept (csi-sanity)."""
    if not raw:
        raise invalid("target_path is required")
    if "\x00" in raw or any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise invalid("target_path contains control characters")
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise invalid("target_path is too long")
    if not raw.startswith("/"):
        raise invalid(f"target_path {raw!r} is not absolute")
    if os.path.normpath(raw) != raw or raw.startswith("//"):
        raise invalid(f"target_path {raw!r} is not normalised (no '.', '..', '//' or trailing '/')")
    if not is_under(raw, kubelet_dir):
        raise invalid(f"target_path {raw!r} is not below the kubelet directory {kubelet_dir}")
    parts = tuple(raw[len(kubelet_dir) + 1 :].split("/"))
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise invalid("a component of target_path is longer than 255 bytes")
    if not is_kubelet_target(parts) and raw not in extra:
        raise invalid(
            f"target_path {raw!r} is not a CSI volume target of kubelet "
            f"({kubelet_dir}/pods/<pod uid>/volumes/{CSI_PLUGIN_DIR}/<volume>/mount)"
        )
    kubelet_real = os.path.realpath(kubelet_dir)
    return Target(raw, kubelet_real + "/" + "/".join(parts), kubelet_real, parts)


def check_no_fuse_between(target: Target, table: MountTable) -> None:
    """Refuse a target inside a FUSE mount below the kubelet directory (e.g. inside another volume):
    walking there would put requests to that filesystem on this thread."""
    for entry in table.under(target.kubelet_real):
        if is_under(target.real, entry.mount_point) and entry.fstype.startswith("fuse"):
            raise invalid(f"target_path lies inside the {entry.fstype} mount {entry.mount_point}")


@contextlib.contextmanager
def open_parent(target: Target) -> Iterator[int]:
    """An O_PATH fd of the target's parent, reached from the kubelet directory without following a
    single symlink. FileNotFoundError when some component is missing."""
    fd = os.open(target.kubelet_real, mounts.O_DIR_PATH)
    try:
        for part in target.parts[:-1]:
            try:
                nfd = os.open(part, mounts.O_DIR_PATH | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise invalid(
                        f"target_path component {part!r} is a symlink or not a directory"
                    ) from e
                raise
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


class TargetLocks:
    """One operation per target at a time; a second concurrent one is told to retry (Aborted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[str] = set()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            if key in self._held:
                raise CsiError(
                    grpc.StatusCode.ABORTED, f"an operation on {key} is already in progress"
                )
            self._held.add(key)
        # tests wait for this line instead of sleeping (debug level: not logged by default)
        log.debug("target locked", target=key)
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(key)


@dataclass(frozen=True)
class Source:
    path: str
    fd: int
    identity: tuple[str, str]


def _ours_below(table: MountTable, top: MountEntry) -> list[MountEntry]:
    """The mounts that sit inside the tree of `top` (its descendants), deepest first."""
    children: dict[int, list[MountEntry]] = {}
    for entry in table.entries:
        children.setdefault(entry.parent_id, []).append(entry)
    out: list[MountEntry] = []
    todo = list(children.get(top.mount_id, []))
    while todo:
        entry = todo.pop()
        if entry.mount_id == top.mount_id:
            continue
        out.append(entry)
        todo.extend(children.get(entry.mount_id, []))
    return sorted(out, key=lambda e: e.mount_point.count("/"), reverse=True)


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self.locks = TargetLocks()
        self.legacy = config.mount_api == "legacy" or not mounts.new_mount_api_available()
        # volumes whose writer access mode was already logged (the log line, not the mount state)
        self._writer_logged: set[str] = set()
        self._writer_lock = threading.Lock()
        # repository names by device, as last seen under the root: names a dead mount after the
        # daemon has detached it (a message aid only; never used to decide anything)
        self._dev_names: dict[str, str] = {}
        log.info("node service", mount_api="legacy" if self.legacy else "open_tree+mount_setattr")

    # ----------------------------------------------------------------------------------------------
    @rpc
    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        # No staging (a bind needs none), no expansion. Stats carry the volume's condition; every
        # filesystem call behind them is bounded, so a dead or hung daemon cannot hang them.
        caps = [
            csi_pb2.NodeServiceCapability(rpc=RPC(type=t))
            for t in (RPC.GET_VOLUME_STATS, RPC.VOLUME_CONDITION)
        ]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    @rpc
    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        # max_volumes_per_node 0: no limit (a bind costs nothing worth scheduling around)
        return csi_pb2.NodeGetInfoResponse(node_id=self.config.node_id)

    def _target(self, raw: str) -> Target:
        return check_target(raw, self.config.kubelet_dir, self.config.extra_targets)

    # ----------------------------------------------------------------------------------------------
    @rpc
    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        check_volume_id(request.volume_id)
        if not request.target_path:
            raise invalid("target_path is required")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        problem = capability_problem(request.volume_capability)
        if problem:
            raise invalid(problem)
        source_spec = repository_from(request.volume_context, "volume_context")
        repository = source_spec.path if source_spec else None
        target = self._target(request.target_path)
        check_no_fuse_between(target, MountTable.read())

        with self.locks.hold(target.real):
            source = self._open_source(repository)
            try:
                self._publish(target, source)
            finally:
                os.close(source.fd)
        mode = request.volume_capability.access_mode.mode
        if is_writer_mode(mode) or not request.readonly:
            self._log_writer_once(request.volume_id, mode, request.readonly)
        log.info(
            "published",
            volume_id=request.volume_id,
            target=target.path,
            source=source.path,
            mode=mode_name(mode),
        )
        return csi_pb2.NodePublishVolumeResponse()

    def _log_writer_once(self, volume_id: str, mode: int, readonly: bool) -> None:
        with self._writer_lock:
            if volume_id in self._writer_logged:
                return
            self._writer_logged.add(volume_id)
        log.warning(
            "served read-only",
            volume_id=volume_id,
            mode=mode_name(mode),
            readonly_flag=readonly,
            reason="CernVM-FS is read-only: every publish is read-only, writes get EROFS",
        )

    def _open_source(self, repository: str | None) -> Source:
        """Check that the daemon serves, then open the bind source (root or repository) by fd."""
        root = self.config.cvmfs_root
        status = mounts.probe_root(root, self.config.probe_timeout)
        if not status.serving:
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE,
                f"the cvmfsd root is not serving ({status.state.value}: {status.detail})",
            )
        path = root if repository is None else f"{root}/{repository}"

        def open_it() -> int:
            if repository is not None:
                os.stat(path)  # the daemon mounts the repository on this lookup
                deadline = time.monotonic() + REPOSITORY_ATTACH_WAIT
                while MountTable.read().top(path) is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            return os.open(path, mounts.O_DIR_PATH)

        timeout = (
            self.config.probe_timeout if repository is None else self.config.repository_timeout
        )
        try:
            fd = mounts.run_bounded(open_it, timeout, cleanup=os.close)
        except mounts.FsTimeout as e:
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{path}: {e}") from e
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise CsiError(
                    grpc.StatusCode.NOT_FOUND, f"repository {repository} does not exist: {e}"
                ) from e
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{path}: {e}") from e
        try:
            table = MountTable.read()
            identity = mounts.bind_identity(table, fd, path)
            self._learn_names(table)
        except OSError as e:
            os.close(fd)
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{path}: {e}") from e
        return Source(path, fd, identity)

    def _publish(self, target: Target, source: Source) -> None:
        with contextlib.ExitStack() as stack:
            try:
                parent = stack.enter_context(open_parent(target))
            except FileNotFoundError as e:
                raise invalid(f"the parent directory of {target.path} does not exist") from e
            try:
                self._bind_at(parent, target, source)
            except OSError as e:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"bind onto {target.path} failed: {e}"
                ) from e

    def _bind_at(self, parent: int, target: Target, source: Source) -> None:
        top = MountTable.read().top(target.real)
        if top is not None:
            # Only the top of the stack is what a path walk (and so the pod) gets.
            if not mounts.is_own_bind(top) or top.identity != source.identity:
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{target.path} already has {top.fstype} from {top.source!r} "
                    f"({top.root}) mounted on top, not {source.path}",
                )
            if not self._settled(top):
                mounts.finish_read_only(parent, target.name, legacy=self.legacy)
                self._verify(target, source)
            return
        created = self._make_target_dir(parent, target)
        try:
            mounts.bind_read_only(source.fd, parent, target.name, legacy=self.legacy)
            self._verify(target, source)
        except BaseException:
            self._undo(parent, target, created)
            raise

    @staticmethod
    def _settled(top: MountEntry) -> bool:
        """Read-only, nosuid, nodev, and a slave of its source (not a peer of it)."""
        return top.options >= mounts.READ_ONLY_OPTIONS and top.slave

    @staticmethod
    def _make_target_dir(parent: int, target: Target) -> bool:
        try:
            os.mkdir(target.name, 0o750, dir_fd=parent)
            return True
        except FileExistsError:
            pass
        try:
            fd = os.open(target.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise invalid(f"{target.path} exists and is not a directory") from e
            raise
        try:
            # The directory is on the kubelet filesystem (no mount on it): listing it is safe.
            # A bind over contents would hide them and leave a directory rmdir cannot remove.
            if os.listdir(fd):
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{target.path} exists and is not empty; not mounting over its contents",
                )
        finally:
            os.close(fd)
        return False

    def _verify(self, target: Target, source: Source) -> None:
        top = MountTable.read().top(target.real)
        if top is None or top.identity != source.identity or not mounts.is_own_bind(top):
            raise OSError(errno.EIO, f"mountinfo does not show a bind of {source.path} on top")
        if not self._settled(top):
            raise OSError(
                errno.EIO, f"the bind of {source.path} is {sorted(top.options)}, {top.optional}"
            )

    @staticmethod
    def _undo(parent: int, target: Target, created: bool) -> None:
        with contextlib.suppress(OSError):
            top = MountTable.read().top(target.real)
            if top is not None and mounts.is_own_bind(top):
                mounts.umount(
                    f"{mounts.fd_path(parent)}/{target.name}",
                    mounts.MNT_DETACH | mounts.UMOUNT_NOFOLLOW,
                )
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(target.name, dir_fd=parent)

    # ----------------------------------------------------------------------------------------------
    @rpc
    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        check_volume_id(request.volume_id)
        target = self._target(request.target_path)
        check_no_fuse_between(target, MountTable.read())
        with self.locks.hold(target.real):
            try:
                with open_parent(target) as parent:
                    lazily, reason = self._unmount_ours(parent, target)
                    removed = self._remove_dir(parent, target)
            except FileNotFoundError:
                lazily, reason, removed = False, None, False  # the parent is gone: so is the target
            except OSError as e:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"unpublish of {target.path} failed: {e}"
                ) from e
        log.info(
            "unpublished",
            volume_id=request.volume_id,
            target=target.path,
            lazily=lazily,
            reason=reason,
            removed=removed,
        )
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _unmount_ours(self, parent: int, target: Target) -> tuple[bool, str | None]:
        """Unmount this driver's bind(s) at the target and everything inside them.

        Returns (detached lazily, why). A foreign mount on top: FailedPrecondition, nothing done.
        """
        path = f"{mounts.fd_path(parent)}/{target.name}"
        lazy, reason = False, None
        for _ in range(MAX_STACK):
            table = MountTable.read()
            top = table.top(target.real)
            if top is None:
                return lazy, reason
            if not mounts.is_own_bind(top):
                if lazy or _ != 0:
                    return lazy, reason  # ours are gone; what is left below is not ours
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the mount on top of {target.path} is {top.fstype} from {top.source!r}, not "
                    "this driver's bind: not unmounting it",
                )
            if not lazy:
                lazy, reason = self._unmount_inside(table, top)
            flags = mounts.UMOUNT_NOFOLLOW | (mounts.MNT_DETACH if lazy else 0)
            try:
                mounts.umount(path, flags)
            except OSError as e:
                if e.errno == errno.EBUSY and not lazy:
                    log.warning("target busy, detaching lazily", target=target.path)
                    lazy, reason = True, "busy"
                    mounts.umount(path, mounts.UMOUNT_NOFOLLOW | mounts.MNT_DETACH)
                elif e.errno != errno.EINVAL:  # EINVAL: gone meanwhile (propagation)
                    raise
        raise OSError(errno.EBUSY, "mounts keep appearing at the target", target.path)

    @staticmethod
    def _unmount_inside(table: MountTable, top: MountEntry) -> tuple[bool, str | None]:
        """Plain unmounts of the mounts inside our bind, deepest first. (True, why) as soon as one
        is busy or does not return in time: the caller then detaches the whole tree lazily."""
        for entry in _ours_below(table, top):
            try:
                mounts.run_bounded(
                    lambda p=entry.mount_point: mounts.umount(p, mounts.UMOUNT_NOFOLLOW),
                    UMOUNT_TIMEOUT,
                )
            except mounts.FsTimeout as e:
                log.warning(
                    "submount unmount hangs, will detach", mount=entry.mount_point, error=str(e)
                )
                return True, "timeout"
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOENT):
                    continue  # already gone (or propagated away)
                log.warning("submount busy, will detach", mount=entry.mount_point, error=str(e))
                return True, "busy"
        return False, None

    @staticmethod
    def _remove_dir(parent: int, target: Target) -> bool:
        table = MountTable.read()
        left = [
            e for e in table.at(target.real) + table.under(target.real) if mounts.is_own_bind(e)
        ]
        if left:
            raise OSError(
                errno.EBUSY,
                f"still mounted at {target.path}: {[e.mount_point for e in left]}",
                target.path,
            )
        if table.at(target.real):
            log.warning("target left in place: a foreign mount is on it", target=target.path)
            return False
        try:
            os.rmdir(target.name, dir_fd=parent)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                # Nothing of ours is mounted there (checked above): the content is someone
                # else's. Never delete it recursively; the volume itself is unpublished.
                log.warning("target left in place", target=target.path, error=str(e))
                return False
            raise
        return True

    # ----------------------------------------------------------------------------------------------
    @rpc
    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        check_volume_id(request.volume_id)
        if not request.volume_path:
            raise invalid("volume_path is required")
        try:
            target = self._target(request.volume_path)
        except CsiError as e:
            raise CsiError(
                grpc.StatusCode.NOT_FOUND, f"no volume of this driver at {request.volume_path!r}"
            ) from e
        table = MountTable.read()
        self._learn_names(table)
        top = table.top(target.real)
        if top is None or not mounts.is_own_bind(top):
            raise CsiError(
                grpc.StatusCode.NOT_FOUND, f"no volume of this driver is published at {target.path}"
            )
        whole_root = mounts.is_daemon_root(top)
        timeout = self.config.probe_timeout
        usage: list[csi_pb2.VolumeUsage] = []
        try:
            st = mounts.run_bounded(lambda: os.statvfs(target.real), timeout)
        except (OSError, mounts.FsTimeout) as e:
            what = "the cvmfsd root" if whole_root else self._repo_label(top, table, target)
            return self._abnormal(self._problem(target.path, what, e, timeout, whole_root, False))
        usage = [
            csi_pb2.VolumeUsage(
                unit=csi_pb2.VolumeUsage.BYTES,
                total=st.f_blocks * st.f_frsize,
                available=st.f_bavail * st.f_frsize,
                used=(st.f_blocks - st.f_bfree) * st.f_frsize,
            ),
            csi_pb2.VolumeUsage(
                unit=csi_pb2.VolumeUsage.INODES,
                total=st.f_files,
                available=st.f_favail,
                used=st.f_files - st.f_ffree,
            ),
        ]
        for entry, subpath in self._views(table, target, top):
            try:
                mounts.run_bounded(lambda p=entry.mount_point: os.statvfs(p), timeout)
            except (OSError, mounts.FsTimeout) as e:
                what = self._repo_label(entry, table, target)
                below = entry.root if subpath and entry.root not in ("", "/") else None
                message = self._problem(
                    entry.mount_point, what, e, timeout, False, subpath, below_root=below
                )
                return self._abnormal(message, usage)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage,
            volume_condition=csi_pb2.VolumeCondition(abnormal=False, message="healthy"),
        )

    @staticmethod
    def _abnormal(
        message: str, usage: list[csi_pb2.VolumeUsage] | None = None
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        log.warning("volume abnormal", message=message)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage or [],
            volume_condition=csi_pb2.VolumeCondition(abnormal=True, message=message),
        )

    @staticmethod
    def _problem(
        where: str,
        what: str,
        error: BaseException,
        timeout: float,
        whole_root: bool,
        subpath: bool,
        below_root: str | None = None,
    ) -> str:
        if isinstance(error, mounts.FsTimeout):
            return (
                f"{what} at {where} does not answer within {timeout:g} s: cvmfsd is hung or "
                "overloaded (is it stopped?)"
            )
        assert isinstance(error, OSError)
        text = os.strerror(error.errno) if error.errno else str(error)
        if whole_root:
            return f"{what} at {where}: {text}: cvmfsd is not running; start it again"
        advice = "cvmfsd is not running or the repository's backend died"
        if below_root is not None:
            # The one view that a repository heal cannot reach (docs/views.md D).
            advice += (
                f"; a subPath below a repository's root ({below_root}) is never healed: restart "
                f"the pod, and {SUBPATH_HINT} (or a subPath of the repository's root)"
            )
        elif subpath:
            advice += f"; {SUBPATH_HINT}"
        return f"{what} at {where}: {text}: {advice}"

    def _views(
        self, table: MountTable, target: Target, top: MountEntry
    ) -> list[tuple[MountEntry, bool]]:
        """Other places this volume is seen from: repositories mounted inside it, and kubelet's
        subPath binds of it (pods/<uid>/volume-subpaths/<volume>/...). (entry, is_subpath)."""
        views = [(e, False) for e in _ours_below(table, top) if e.source == "cvmfs2"]
        pod_volume = target.pod_volume
        if pod_volume is not None:
            uid, volume = pod_volume
            base = f"{target.kubelet_real}/pods/{uid}/volume-subpaths/{volume}"
            views += [
                (e, True)
                for e in table.under(base)
                if mounts.is_own_bind(e) or e.source == "cvmfs2"
            ]
        return views

    def _learn_names(self, table: MountTable) -> None:
        root = self.config.cvmfs_root
        for entry in table.under(root):
            rel = entry.mount_point[len(root) + 1 :]
            if "/" not in rel or (rel.startswith(SNAPSHOTS_DIR + "/") and rel.count("/") == 1):
                self._dev_names[entry.dev] = rel.rsplit("/", 1)[-1]

    def _repo_label(self, entry: MountEntry, table: MountTable, target: Target) -> str:
        """'repository <name>' for a repository's mount, named from its place or its device."""
        if is_under(entry.mount_point, target.real):
            rel = entry.mount_point[len(target.real) + 1 :]
            return f"repository {rel.split('/', 1)[0]}"
        if mounts.is_daemon_root(entry) and entry.root not in ("", "/"):
            return f"repository {entry.root.strip('/').split('/', 1)[0]}"
        name = self._dev_names.get(entry.dev)
        return f"repository {name}" if name else f"a repository (device {entry.dev})"
