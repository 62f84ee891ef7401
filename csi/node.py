"""CSI Node service: publish = read-only recursive bind of the daemon's root (or one repository).

NodePublishVolume, in order:
1. check the arguments (InvalidArgument) and the target path: a normalised absolute path strictly
   below the kubelet directory, no FUSE mount between the two (InvalidArgument);
2. take the per-target lock (a concurrent call on the same target gets Aborted);
3. probe the daemon's root (Unavailable, nothing mounted); for a repository, look it up below the
   root in a bounded worker (NotFound when it does not exist);
4. walk from the kubelet directory to the target's parent without following symlinks;
5. what mountinfo shows at the target decides: the same bind already there -> OK (its read-only and
   slave settings re-applied); something else -> AlreadyExists; nothing -> create the directory
   (only the last component) and bind.

NodeUnpublishVolume: submounts below the target are unmounted deepest first (plain umount2), then
the target itself; if anything is busy the target is detached lazily (MNT_DETACH) instead, because
kubelet needs this call to succeed even when a process still uses the volume (it retries forever
otherwise, and the pod hangs in Terminating). Then the target directory is removed with rmdir (never
recursively).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import structlog

from csi import mounts
from csi.config import PluginConfig
from csi.mounts import MountTable, is_under
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.rpc import CsiError, invalid, rpc
from csi.volume import (
    EPHEMERAL_KEY,
    capability_problem,
    check_volume_id,
    repository_from,
)

log = structlog.get_logger("csi.node")

MAX_PATH_BYTES = 4095
MAX_COMPONENT_BYTES = 255
UMOUNT_TIMEOUT = 5.0
# how long to wait for the daemon's mount of a repository to show up after its lookup succeeded
REPOSITORY_ATTACH_WAIT = 2.0


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


def check_target(raw: str, kubelet_dir: str) -> Target:
    """Validate a target path as a string (no filesystem access)."""
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


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self.locks = TargetLocks()
        self.legacy = config.mount_api == "legacy" or not mounts.new_mount_api_available()
        log.info("node service", mount_api="legacy" if self.legacy else "open_tree+mount_setattr")

    # ----------------------------------------------------------------------------------------------
    @rpc
    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        # No staging (a bind needs none), no volume stats (statfs of a FUSE mount from the plugin is
        # exactly the kind of call that hangs with a dead daemon), no expansion.
        return csi_pb2.NodeGetCapabilitiesResponse()

    @rpc
    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.config.node_id)

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
        ephemeral = request.volume_context.get(EPHEMERAL_KEY) == "true"
        problem = capability_problem(
            request.volume_capability, ephemeral_writer_ok=ephemeral and request.readonly
        )
        if problem:
            raise invalid(problem)
        source_spec = repository_from(request.volume_context, "volume_context")
        repository = source_spec.path if source_spec else None
        noexec = "noexec" in request.volume_capability.mount.mount_flags
        target = check_target(request.target_path, self.config.kubelet_dir)
        check_no_fuse_between(target, MountTable.read())

        with self.locks.hold(target.real):
            source = self._open_source(repository)
            try:
                self._publish(target, source, noexec)
            finally:
                os.close(source.fd)
        log.info(
            "published",
            volume_id=request.volume_id,
            target=target.path,
            source=source.path,
            ephemeral=ephemeral,
        )
        return csi_pb2.NodePublishVolumeResponse()

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
            identity = mounts.bind_identity(MountTable.read(), fd, path)
        except OSError as e:
            os.close(fd)
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{path}: {e}") from e
        return Source(path, fd, identity)

    def _publish(self, target: Target, source: Source, noexec: bool) -> None:
        with contextlib.ExitStack() as stack:
            try:
                parent = stack.enter_context(open_parent(target))
            except FileNotFoundError as e:
                raise invalid(f"the parent directory of {target.path} does not exist") from e
            try:
                self._bind_at(parent, target, source, noexec)
            except OSError as e:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"bind onto {target.path} failed: {e}"
                ) from e

    def _bind_at(self, parent: int, target: Target, source: Source, noexec: bool) -> None:
        stack = MountTable.read().at(target.real)
        if stack:
            top = stack[-1]
            if all(entry.identity != source.identity for entry in stack):
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{target.path} already has {top.fstype} from {top.source!r} "
                    f"({top.root}) mounted, not {source.path}",
                )
            if not top.read_only or top.shared or not top.slave:
                mounts.finish_read_only(parent, target.name, noexec=noexec, legacy=self.legacy)
            return
        created = self._make_target_dir(parent, target)
        try:
            mounts.bind_read_only(source.fd, parent, target.name, noexec=noexec, legacy=self.legacy)
            self._verify(target, source)
        except BaseException:
            self._undo(parent, target, created)
            raise

    @staticmethod
    def _make_target_dir(parent: int, target: Target) -> bool:
        try:
            os.mkdir(target.name, 0o750, dir_fd=parent)
            created = True
        except FileExistsError:
            created = False
        try:
            fd = os.open(target.name, mounts.O_DIR_PATH | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise invalid(f"{target.path} exists and is not a directory") from e
            raise
        os.close(fd)
        return created

    @staticmethod
    def _verify(target: Target, source: Source) -> None:
        stack = MountTable.read().at(target.real)
        ours = [e for e in stack if e.identity == source.identity]
        if not ours or not ours[0].read_only:
            raise OSError(errno.EIO, f"mountinfo does not show a read-only bind of {source.path}")

    @staticmethod
    def _undo(parent: int, target: Target, created: bool) -> None:
        with contextlib.suppress(OSError):
            if MountTable.read().at(target.real):
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
        target = check_target(request.target_path, self.config.kubelet_dir)
        check_no_fuse_between(target, MountTable.read())
        with self.locks.hold(target.real):
            try:
                with open_parent(target) as parent:
                    detached = self._unmount_all(parent, target)
                    removed = self._remove_dir(parent, target)
            except FileNotFoundError:
                detached, removed = False, False  # the parent is gone: so is the target
            except OSError as e:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"unpublish of {target.path} failed: {e}"
                ) from e
        log.info(
            "unpublished",
            volume_id=request.volume_id,
            target=target.path,
            lazily=detached,
            removed=removed,
        )
        return csi_pb2.NodeUnpublishVolumeResponse()

    @staticmethod
    def _unmount_all(parent: int, target: Target) -> bool:
        """Unmount everything at and below the target; True when it had to detach lazily."""
        lazy = False
        table = MountTable.read()
        subs = sorted(
            table.under(target.real), key=lambda e: e.mount_point.count("/"), reverse=True
        )
        for entry in subs:
            try:
                mounts.run_bounded(
                    lambda p=entry.mount_point: mounts.umount(p, mounts.UMOUNT_NOFOLLOW),
                    UMOUNT_TIMEOUT,
                )
            except (OSError, mounts.FsTimeout) as e:
                if isinstance(e, OSError) and e.errno == errno.EINVAL:
                    continue  # already gone (or propagated away)
                log.warning("submount busy, will detach", mount=entry.mount_point, error=str(e))
                lazy = True
                break
        path = f"{mounts.fd_path(parent)}/{target.name}"
        for _ in range(64):  # a stack of mounts at the target is unmounted one at a time
            if not MountTable.read().at(target.real):
                break
            flags = mounts.UMOUNT_NOFOLLOW | (mounts.MNT_DETACH if lazy else 0)
            try:
                mounts.umount(path, flags)
            except OSError as e:
                if e.errno == errno.EBUSY and not lazy:
                    log.warning("target busy, detaching lazily", target=target.path)
                    lazy = True
                    continue
                if e.errno == errno.EINVAL:
                    break
                raise
        else:
            raise OSError(errno.EBUSY, "mounts keep appearing at the target", target.path)
        return lazy

    @staticmethod
    def _remove_dir(parent: int, target: Target) -> bool:
        try:
            os.rmdir(target.name, dir_fd=parent)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                # Not something this plugin created (it only ever binds onto an empty directory).
                # Never delete it recursively; leave it to kubelet and report success, since the
                # volume itself is unpublished.
                log.warning("target left in place", target=target.path, error=str(e))
                return False
            raise
        return True
