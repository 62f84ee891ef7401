"""The pyfuse3 Operations of the root: a thin adapter over the registry and the mounter.

Handlers raise only FUSEError: domain errors (MountError) are translated at one boundary, and an
unexpected exception degrades the daemon visibly (EIO, logged, counted) instead of killing the
FUSE loop. The rules below are DESIGN.md §2-4, measured on the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pyfuse3
import structlog
import trio

from ..config import Config
from ..log import Throttle
from .errors import MountError
from .lifecycle import State
from .mounter import Mounter
from .names import SNAPSHOTS_DIR, InvalidName, check, parse_snapshot
from .registry import ACTIVE, ROOT_INODE, SNAPSHOTS_INODE, Registry, Repo
from .requester import Requester, identify

# Directories of our own (never covered by a mount): cached like the root.
_DIRS = {ROOT_INODE: 0o755, SNAPSHOTS_INODE: 0o555}

log = structlog.get_logger("cvmfsd.fs")

# Names never change their nodeid and the root never changes: let the kernel cache them (almost)
# forever, so that already-mounted repositories keep working while this daemon restarts.
FOREVER = 1e6
# FUSE tasks never given to waiting requests.
RESERVED_TASKS = 8

T = TypeVar("T")


def fuse_boundary(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(handler)
    async def wrapper(self: RootOperations, *args: Any) -> T:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except MountError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            self.internal_errors += 1
            log.exception("handler_failed", handler=handler.__name__, error=repr(exc))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class RootOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, cfg: Config, registry: Registry, mounter: Mounter) -> None:
        super().__init__()
        self.cfg = cfg
        self.registry = registry
        self.mounter = mounter
        self.internal_errors = 0
        self._epoch_ns = time.time_ns()
        self._nlookup: dict[int, int] = {}
        # Requests waiting for an attach, per requester and in all; some tasks always stay free
        # for the rest (listings, lookups, the liveness check).
        self._waiting: dict[Requester, int] = {}
        self._waiting_total = 0
        self._waiting_limit = max(1, cfg.fuse_max_tasks - RESERVED_TASKS)
        self._refusals = Throttle()

    # --- attributes -------------------------------------------------------------------------
    def _attrs(self, inode: int, mode: int, timeout: float) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.st_mode = stat.S_IFDIR | mode
        attr.st_nlink = 2
        attr.st_uid = attr.st_gid = 0
        attr.st_size = 0
        attr.st_blksize = 4096
        attr.st_blocks = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._epoch_ns
        attr.entry_timeout = FOREVER
        attr.attr_timeout = timeout
        return attr

    def _dir_attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        return self._attrs(inode, _DIRS[inode], FOREVER)

    def _entry(self, repo: Repo) -> pyfuse3.EntryAttributes:
        # Every reply for a name (LOOKUP, readdirplus, GETATTR) must be identical, or the kernel
        # detaches what is mounted there. attr_timeout 0: each access through the covered inode
        # comes back here, which is what lets the race window answer ESTALE.
        self._nlookup[repo.inode] = self._nlookup.get(repo.inode, 0) + 1
        return self._attrs(repo.inode, 0o555, 0)

    def _repo(self, inode: int) -> Repo:
        repo = self.registry.by_inode(inode)
        if repo is None:
            raise _fail(errno.ENOENT)
        return repo

    async def _through_covered_inode(self, inode: int, ctx: pyfuse3.RequestContext) -> Repo:
        """A request on a name's own inode comes from a walk that did not cross a mount there.

        Our mount workers get answered at once. Anyone else waits (bounded) until the name's
        mount is in place — made within about a millisecond, long before cvmfs2 serves — and gets
        ESTALE, so the VFS walks again with LOOKUP_REVAL, crosses the mount and waits there, in
        the kernel, for cvmfs2's answer. A name that failed answers with its error. Waiting
        requests are shared out by requester, so that nobody can hold every FUSE task of the
        root.
        """
        repo = self._repo(inode)
        if self.registry.is_own_thread(ctx.pid):
            return repo
        self.registry.touch(repo)
        if repo.state is State.MOUNTED:
            raise _fail(errno.ESTALE)  # a walk that started before the mount was attached
        requester = identify(ctx.uid, ctx.pid)
        with self._waiting_slot(requester):
            if repo.evicting is not None:
                with trio.move_on_after(self.cfg.handler_wait):
                    await repo.evicting.wait()
                raise _fail(errno.ESTALE)  # the name is forgotten now: walk again, look it up
            if repo.state is State.UNMOUNTING:
                with trio.move_on_after(self.cfg.handler_wait):
                    await repo.settled.wait()
            if repo.state is not State.MOUNTED:
                self.mounter.request(repo, requester)
                await self.mounter.attached(repo, self.cfg.handler_wait)
        raise _fail(errno.ESTALE)

    @contextlib.contextmanager
    def _waiting_slot(self, requester: Requester) -> Iterator[None]:
        _, _, share = self.cfg.requester_limits
        mine = self._waiting.get(requester, 0)
        if mine >= share or self._waiting_total >= self._waiting_limit:
            suppressed = self._refusals.allow(requester)
            if suppressed is not None:
                log.warning("wait_refused", requester=str(requester), waiting=mine,
                            waiting_total=self._waiting_total, errno="EAGAIN",
                            suppressed=suppressed)
            raise _fail(errno.EAGAIN)
        self._waiting[requester] = mine + 1
        self._waiting_total += 1
        try:
            yield
        finally:
            self._waiting_total -= 1
            left = self._waiting[requester] - 1
            if left:
                self._waiting[requester] = left
            else:
                del self._waiting[requester]

    # --- handlers ---------------------------------------------------------------------------
    @fuse_boundary
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode not in _DIRS:
            # A child of a covered inode: the kernel holds that inode's lock, which the attach
            # needs, so never wait here (DESIGN.md §2).
            raise _fail(errno.ESTALE if self.registry.by_inode(parent_inode) else errno.ENOENT)
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            raise _fail(errno.ENOENT) from None
        if parent_inode == ROOT_INODE and text == SNAPSHOTS_DIR:
            return self._dir_attrs(SNAPSHOTS_INODE)
        repo = self.registry.get(text)
        if repo is not None and (repo.pin is not None) != (parent_inode == SNAPSHOTS_INODE):
            raise _fail(errno.ENOENT)
        if repo is None:
            if self.mounter.closing:
                raise _fail(errno.ENOENT)
            try:
                if parent_inode == SNAPSHOTS_INODE:
                    fqrn, pin = parse_snapshot(text, self.cfg.policy)
                    repo = self.registry.candidate(text, fqrn, pin)
                else:
                    check(text, self.cfg.policy)
                    repo = self.registry.candidate(text)
            except InvalidName:
                raise _fail(errno.ENOENT) from None
        else:
            self.registry.touch(repo)
        # Never an error for a name that is mounted or booting: that would detach it (§4).
        # A name that is refused (backoff, limits) fails here and never becomes an entry.
        if repo.state not in ACTIVE:
            self.mounter.request(repo, identify(ctx.uid, ctx.pid))
        return self._entry(repo)

    @fuse_boundary
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            left = self._nlookup.get(inode, 0) - count
            if left > 0:
                self._nlookup[inode] = left
                continue
            self._nlookup.pop(inode, None)
            repo = self.registry.by_inode(inode)
            if repo is not None:
                self.registry.forgotten(repo)

    @fuse_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode in _DIRS:
            return self._dir_attrs(inode)
        repo = await self._through_covered_inode(inode, ctx)
        return self._attrs(repo.inode, 0o555, 0)

    @fuse_boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if inode not in _DIRS:
            await self._through_covered_inode(inode, ctx)
        return not mode & 0o2  # read-only

    @fuse_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode not in _DIRS:
            await self._through_covered_inode(inode, ctx)
        return inode

    @fuse_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh not in _DIRS:
            raise _fail(errno.ESTALE)  # never wait: the kernel holds the directory lock
        # "." and ".." first (offsets 1 and 2; repository inodes start above), as every
        # directory has them (`ls -la`). The kernel links neither from a readdirplus reply.
        parent = ROOT_INODE
        for offset, (dot, inode) in enumerate(((b".", fh), (b"..", parent)), start=1):
            if start_id < offset and not pyfuse3.readdir_reply(
                    token, dot, self._dir_attrs(inode), offset):
                return
        # The root lists live repositories only: users who never ask for a snapshot never
        # see one. .snapshots lists the pinned instances that are mounted. Both list a boot
        # whose mount is in place: a read through it may be answered before the boot is
        # recorded, and the name must not be missing from a listing after that read.
        for repo in self.registry.listed(pinned=fh == SNAPSHOTS_INODE):
            if repo.inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, repo.name.encode(), self._entry(repo),
                                         repo.inode):
                # Not sent: undo the lookup count that _entry() took.
                self._nlookup[repo.inode] -= 1
                return

    @fuse_boundary
    async def releasedir(self, fh: int) -> None:
        return None

    @fuse_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode not in _DIRS:
            await self._through_covered_inode(inode, ctx)
        raise _fail(pyfuse3.ENOATTR)

    @fuse_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode not in _DIRS:
            await self._through_covered_inode(inode, ctx)
        return []

    @fuse_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.ESTALE if inode not in _DIRS else errno.EROFS)

    @fuse_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.registry.mounted()) + len(_DIRS)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data
