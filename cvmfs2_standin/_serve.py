"""The serving half of the cvmfs2 stand-in: FUSE operations, talk socket, remount."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
import signal
import socket
import stat
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import _layout as layout
import pyfuse3
import trio
from _options import Options, string_to_uint
from _repo import CatalogError, Repository, Selection

VERSION = "2.12.0"
PATCH_LEVEL = "0"
INDEFINITE = float("inf")
# cvmfs keeps this many descriptors for itself (user.maxfd = limit - reserve).
NUM_RESERVED_FD = 512
DEFAULT_KCACHE_TIMEOUT = 60.0
DEFAULT_QUOTA_LIMIT_MB = 1024
TALK_MAX_COMMAND = 512

# Magic xattr flavours, as in magic_xattr.cc: which entries offer which names.
BASE_XATTRS = (
    "user.expires",
    "user.fqrn",
    "user.host",
    "user.host_list",
    "user.hitrate",
    "user.inode_max",
    "user.maxfd",
    "user.nclg",
    "user.ncleanup24",
    "user.ndiropen",
    "user.ndownload",
    "user.nioerr",
    "user.nopen",
    "user.pid",
    "user.proxy",
    "user.pubkeys",
    "user.revision",
    "user.root_hash",
    "user.rx",
    "user.speed",
    "user.tag",
    "user.timeout",
    "user.timeout_direct",
    "user.timestamp_last_ioerr",
    "user.uptime",
    "user.usedfd",
    "user.useddirp",
    "user.version",
)
HASH_XATTRS = ("user.hash", "user.lhash")
REGULAR_XATTRS = (
    "user.chunk_list",
    "user.chunks",
    "user.compression",
    "user.direct_io",
    "user.external_file",
)
SYMLINK_XATTRS = ("user.rawlink",)
# Listed and readable on the root only: values that describe the whole repository.
ROOT_XATTRS = (
    "user.catalog_counters",
    "user.external_host",
    "user.external_timeout",
    "user.logbuffer",
    "user.proxy_list",
    "user.proxy_list_external",
    "user.repo_counters",
    "user.repo_metainfo",
)
# The key of the revision's catalog among the cached objects (no path can be this).
CATALOG = "\0catalog"


@dataclass
class Config:
    """Everything the launcher decided and hands to the serving process."""

    fqrn: str
    mountpoint: str
    premounted: bool
    options: Options
    repository: Repository
    selection: Selection
    workspace: str
    cache_dir: str
    quota_limit_mb: int
    proxy_groups: list[list[str]]
    talk_sock: socket.socket
    talk_path: str
    loader_path: str
    running_path: str
    boot_time: float
    crash_after: int | None
    kcache_timeout: float
    max_ttl: int
    xattr_visibility: str


@dataclass
class Stats:
    n_open: int = 0
    n_download: int = 0
    n_dir_open: int = 0
    open_files: int = 0
    open_dirs: int = 0
    rx_bytes: int = 0
    transfer_ms: int = 0
    cleanups: list[float] = field(default_factory=list)  # monotonic times of `cleanup` runs
    requests: int = 0
    # Objects "in the cache": (revision, path) -> size; pinned while open.
    cached: dict[tuple[int, str], int] = field(default_factory=dict)
    pinned: dict[tuple[int, str], int] = field(default_factory=dict)


class Server:
    """Serving state: revision, inode table, counters."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.fqrn = cfg.fqrn
        self.repo = cfg.repository
        self.stats = Stats()
        self.pid = os.getpid()
        self._entries: dict[int, int] = {}
        self._apply(cfg.selection)
        self._by_key: dict[tuple[int, str], int] = {}
        self._by_ino: dict[int, tuple[int, str]] = {}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        # Names handed to the kernel below the root: invalidated on a new revision.
        self.root_names: set[bytes] = set()
        self._hashes: dict[tuple[int, str], str] = {}
        self._remount_lock = trio.Lock()
        self.terminated = False  # ended by a signal, not by an unmount

    # -- revision -----------------------------------------------------------
    def _apply(self, sel: Selection) -> None:
        self.repo_dir = sel.repo_dir
        self.revision = sel.revision
        self.root_hash = sel.root_hash
        self.tag = sel.tag
        self.fixed = sel.fixed
        self._set_deadline(sel.ttl)
        self._load_catalog()

    def _load_catalog(self) -> None:
        """The revision's catalog goes into the cache, pinned while it is loaded (the previous
        one stays cached, unpinned), as cvmfs does: `cache size` and `cleanup` show it."""
        s = self.stats
        for key in [k for k in s.pinned if k[1] == CATALOG]:
            del s.pinned[key]
        key = (self.revision, CATALOG)
        if key not in s.cached:
            # An SQLite catalog: 16 KiB of schema and about 96 bytes per entry (measured: 32
            # entries, 19,456 bytes), downloaded compressed.
            size = 16384 + 96 * self.catalog_entries()
            s.cached[key] = size
            s.n_download += 1
            s.rx_bytes += size // 4
            s.transfer_ms += 1
        s.pinned[key] = 1

    def catalog_entries(self) -> int:
        """Entries of the loaded revision (directories, files, links; the root included)."""
        count = self._entries.get(self.revision)
        if count is None:
            count = 1
            for _dir, dirs, files in os.walk(self.tree(self.revision)):
                count += len(dirs) + len(files)
            self._entries[self.revision] = count
        return count

    def _set_deadline(self, ttl: int) -> None:
        if self.fixed:
            self.valid_until = INDEFINITE
            return
        if self.cfg.max_ttl:
            ttl = min(ttl, self.cfg.max_ttl)
        self.valid_until = time.time() + ttl

    def tree(self, revision: int) -> Path:
        return layout.revision_dir(self.repo_dir, revision)

    async def remount(self) -> str:
        async with self._remount_lock:
            if self.fixed:
                return "Catalog up to date\n"
            try:
                repo_dir, manifest = self.repo.fetch_manifest()
            except CatalogError:
                return "Failed\n"
            if manifest.revision <= self.revision:
                self._set_deadline(manifest.ttl)
                return "Catalog up to date\n"
            if not layout.revision_dir(repo_dir, manifest.revision).is_dir():
                return "Failed\n"
            self._apply(
                Selection(repo_dir, manifest.revision, manifest.root_hash, manifest.ttl, "", False)
            )
            await self._invalidate_root_entries()
            return "New revision applied\n"

    async def _invalidate_root_entries(self) -> None:
        # Entries below the root keep their old-revision inodes in the kernel
        # for up to the kcache timeout; drop them so new lookups see the new
        # revision.  Open files and cwds keep the old revision (cvmfs "drains").
        names = sorted(self.root_names)
        self.root_names.clear()

        def work() -> None:
            for name in names:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_entry(pyfuse3.ROOT_INODE, name)
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(pyfuse3.ROOT_INODE, attr_only=True)

        # notify_inval_entry blocks on the kernel's directory lock, which a
        # request we serve may hold: never call it on the trio thread.
        with trio.move_on_after(10):
            await trio.to_thread.run_sync(work, abandon_on_cancel=True)

    async def auto_update(self) -> None:
        """Apply new revisions when the catalog TTL expires (CVMFS_AUTO_UPDATE)."""
        while True:
            if self.valid_until == INDEFINITE:
                await trio.sleep(3600)
                continue
            await trio.sleep(max(1.0, self.valid_until - time.time()))
            if time.time() < self.valid_until:
                continue
            if await self.remount() == "Failed\n":
                self.valid_until = time.time() + 60

    # -- inodes -------------------------------------------------------------
    def ino_of(self, revision: int, rel: str) -> int:
        if rel == "":
            return pyfuse3.ROOT_INODE
        key = (revision, rel)
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._by_key[key] = ino
            self._by_ino[ino] = key
        return ino

    def key_of(self, ino: int) -> tuple[int, str]:
        if ino == pyfuse3.ROOT_INODE:
            return self.revision, ""
        try:
            return self._by_ino[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def path_of(self, key: tuple[int, str]) -> Path:
        revision, rel = key
        root = self.tree(revision)
        return root / rel if rel else root

    @property
    def inode_max(self) -> int:
        return self._next_ino - 1

    def content_hash(self, key: tuple[int, str]) -> str:
        # Stand-in content hash: SHA-1 of the file's bytes (cvmfs hashes the
        # compressed object; nobody outside cvmfs can tell the difference).
        cached = self._hashes.get(key)
        if cached is None:
            digest = hashlib.sha1()
            with open(self.path_of(key), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            cached = self._hashes[key] = digest.hexdigest()
        return cached

    # -- fault knob -----------------------------------------------------------
    def tick(self) -> None:
        self.stats.requests += 1
        limit = self.cfg.crash_after
        if limit is not None and self.stats.requests > limit:
            # A PANIC: no core file, no cleanup, the kernel aborts the connection.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            os.abort()

    # -- reports --------------------------------------------------------------
    def cleanups_since(self, seconds: float) -> int:
        since = time.monotonic() - seconds
        return sum(1 for t in self.stats.cleanups if t >= since)

    def cache_size(self) -> int:
        return sum(self.stats.cached.values())

    def pinned_size(self) -> int:
        return sum(self.stats.cached.get(k, 0) for k in self.stats.pinned)

    def quota_managed(self) -> bool:
        return self.cfg.quota_limit_mb > 0

    def active_host(self) -> str:
        hosts = self.repo.hosts
        return hosts[self.repo.active] if hosts else "internal error: no hosts defined"

    def active_proxy(self) -> str:
        groups = self.cfg.proxy_groups
        return groups[0][0] if groups and groups[0] else "DIRECT"

    def timeouts(self) -> tuple[int, int]:
        opts = self.cfg.options
        proxy = string_to_uint(opts.get("CVMFS_TIMEOUT", "5"))
        direct = string_to_uint(opts.get("CVMFS_TIMEOUT_DIRECT", "10"))
        return proxy, direct

    def max_fd(self) -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return soft - NUM_RESERVED_FD

    def magic_xattr(self, name: str, key: tuple[int, str], st: os.stat_result) -> str | None:
        """Value of a magic attribute for an entry, None if it does not apply."""
        s = self.stats
        if name in HASH_XATTRS or name in REGULAR_XATTRS:
            if not stat.S_ISREG(st.st_mode):
                return None
            if name == "user.lhash" and key not in s.cached:
                return "Not in cache"
            if name in HASH_XATTRS:
                return self.content_hash(key)
            return {
                "user.chunks": "1",
                "user.chunk_list": f"hash,offset,size\n{self.content_hash(key)},0,{st.st_size}\n",
                "user.compression": "zlib",
                "user.direct_io": "0",
                "user.external_file": "0",
            }[name]
        if name in SYMLINK_XATTRS:
            if not stat.S_ISLNK(st.st_mode):
                return None
            return os.readlink(self.path_of(key))
        if name in ROOT_XATTRS:
            return self.root_xattr(name) if key[1] == "" else None
        now = time.time()
        if name == "user.expires":
            if self.valid_until == INDEFINITE:
                return "never (fixed root catalog)"
            return str(int((self.valid_until - now) // 60))
        if name == "user.hitrate":
            if s.n_open == 0:
                return "0.000"
            return f"{100.0 * (1.0 - s.n_download / s.n_open):.3f}"
        if name == "user.speed":
            if s.transfer_ms == 0:
                return "n/a"
            return str((1000 * (s.rx_bytes // 1024)) // s.transfer_ms)
        proxy, direct = self.timeouts()
        simple: dict[str, Callable[[], object]] = {
            "user.fqrn": lambda: self.fqrn,
            "user.host": self.active_host,
            "user.host_list": lambda: ";".join(
                self.repo.hosts[self.repo.active :] + self.repo.hosts[: self.repo.active]
            ),
            "user.inode_max": lambda: self.inode_max,
            "user.maxfd": self.max_fd,
            "user.nclg": lambda: 1,
            "user.ncleanup24": lambda: self.cleanups_since(24 * 3600)
            if self.quota_managed() else -1,
            "user.ndiropen": lambda: s.n_dir_open,
            "user.ndownload": lambda: s.n_download,
            "user.nioerr": lambda: 0,
            "user.nopen": lambda: s.n_open,
            "user.pid": lambda: self.pid,
            "user.proxy": self.active_proxy,
            "user.pubkeys": lambda: "",
            "user.revision": lambda: self.revision,
            "user.root_hash": lambda: self.root_hash,
            "user.rx": lambda: s.rx_bytes // 1024,
            "user.tag": lambda: self.tag,
            "user.timeout": lambda: proxy,
            "user.timeout_direct": lambda: direct,
            "user.timestamp_last_ioerr": lambda: 0,
            "user.uptime": lambda: int((now - self.cfg.boot_time) // 60),
            "user.usedfd": lambda: s.open_files,
            "user.useddirp": lambda: s.open_dirs,
            "user.version": lambda: f"{VERSION}.{PATCH_LEVEL}",
        }
        getter = simple.get(name)
        return None if getter is None else str(getter())

    def root_xattr(self, name: str) -> str:
        counters = self.counters()
        table = "".join(f"{k},{v}\n" for k, v in sorted(counters.items()))
        proxies = "".join(f"{p}\n" for group in self.cfg.proxy_groups for p in group)
        return {
            "user.catalog_counters": f"catalog_hash: {self.root_hash}\ncatalog_mountpoint: \n"
                                     + table,
            "user.external_host": "",
            "user.external_timeout": str(self.timeouts()[1]),
            "user.logbuffer": "",
            "user.proxy_list": proxies,
            "user.proxy_list_external": proxies,
            "user.repo_counters": table,
            "user.repo_metainfo": "manifest not available",
        }[name]

    def counters(self) -> dict[str, int]:
        """The catalog's statistics counters, as user.repo_counters lists them."""
        found = dict.fromkeys(("chunked", "chunked_size", "chunks", "dir", "external",
                               "external_file_size", "file_size", "nested", "regular",
                               "special", "symlink", "xattr"), 0)
        for top, dirs, files in os.walk(self.tree(self.revision)):
            found["dir"] += len(dirs)
            for name in files:
                st = os.lstat(os.path.join(top, name))
                if stat.S_ISLNK(st.st_mode):
                    found["symlink"] += 1
                elif stat.S_ISREG(st.st_mode):
                    found["regular"] += 1
                    found["file_size"] += st.st_size
                else:
                    found["special"] += 1
        found["dir"] += 1  # the root
        return found

    def xattr_names(self, key: tuple[int, str], st: os.stat_result) -> list[str]:
        visibility = self.cfg.xattr_visibility
        if visibility == "never" or (visibility == "rootonly" and key[1] != ""):
            return []
        names = list(BASE_XATTRS)
        if key[1] == "":
            names += ROOT_XATTRS
        if stat.S_ISREG(st.st_mode):
            names += HASH_XATTRS + REGULAR_XATTRS
        if stat.S_ISLNK(st.st_mode):
            names += SYMLINK_XATTRS
        # cvmfs 2.12.0 lists every name twice (measured); listxattr callers see duplicates.
        return sorted(names) * 2


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


class Operations(pyfuse3.Operations):
    """Read-only passthrough of the selected revision tree."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.srv = server
        self._dirs: dict[int, tuple[tuple[int, str], list[bytes]]] = {}
        self._files: dict[int, tuple[int, tuple[int, str]]] = {}
        self._next_fh = 1

    # -- helpers --------------------------------------------------------------
    def _lstat(self, key: tuple[int, str]) -> os.stat_result:
        try:
            return os.lstat(self.srv.path_of(key))
        except FileNotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    def _attrs(self, key: tuple[int, str], st: os.stat_result) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = self.srv.ino_of(*key)
        attrs.generation = 0
        # Content is immutable per revision; a new revision invalidates entries.
        attrs.entry_timeout = self.srv.cfg.kcache_timeout
        attrs.attr_timeout = self.srv.cfg.kcache_timeout
        attrs.st_mode = st.st_mode
        attrs.st_nlink = st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = 0
        attrs.st_size = st.st_size
        attrs.st_blksize = 4096
        attrs.st_blocks = (st.st_size + 511) // 512
        # cvmfs reports one timestamp (the publish mtime) for all three.
        attrs.st_atime_ns = st.st_mtime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_mtime_ns
        return attrs

    def _child(self, parent_key: tuple[int, str], name: bytes) -> tuple[int, str]:
        revision, rel = parent_key
        if name == b".":
            return parent_key
        if name == b"..":
            return revision, os.path.dirname(rel)
        child = os.fsdecode(name)
        return revision, f"{rel}/{child}" if rel else child

    def _remember(self, parent_ino: int, name: bytes) -> None:
        if parent_ino == pyfuse3.ROOT_INODE and name not in (b".", b".."):
            self.srv.root_names.add(name)

    # -- lookups --------------------------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.srv.tick()
        parent_key = self.srv.key_of(parent_inode)
        key = self._child(parent_key, name)
        st = self._lstat(key)
        self._remember(parent_inode, name)
        return self._attrs(key, st)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Inode numbers stay valid for the daemon's lifetime: nothing to drop.
        return None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.srv.tick()
        key = self.srv.key_of(inode)
        return self._attrs(key, self._lstat(key))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self.srv.tick()
        try:
            return os.readlink(os.fsencode(self.srv.path_of(self.srv.key_of(inode))))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # cvmfs has no access handler; the kernel's own checks (ro mount,
        # default_permissions when configured) decide.
        self.srv.tick()
        return True

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self.srv.tick()
        # As cvmfs_statfs: 512-byte blocks of the quota, the cache's use as used blocks, the
        # catalogs' entries as files, and no name length (0).
        data = pyfuse3.StatvfsData()
        block = 512
        capacity = max(self.srv.cfg.quota_limit_mb, 0) * 1024 * 1024
        used = self.srv.cache_size()
        data.f_bsize = block
        data.f_frsize = block
        data.f_blocks = capacity // block
        data.f_bfree = max(capacity - used, 0) // block
        data.f_bavail = data.f_bfree
        data.f_files = self.srv.catalog_entries()
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 0
        return data

    # -- directories ----------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.srv.tick()
        key = self.srv.key_of(inode)
        try:
            names = sorted(os.listdir(os.fsencode(self.srv.path_of(key))))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        fh = self._next_fh
        self._next_fh += 1
        # cvmfs lists `..` everywhere but in the repository's root (2.12.0, measured).
        dots = [b"."] if key[1] == "" else [b".", b".."]
        self._dirs[fh] = (key, [*dots, *names])
        self.srv.stats.n_dir_open += 1
        self.srv.stats.open_dirs += 1
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.srv.tick()
        key, names = self._dirs[fh]
        parent_ino = self.srv.ino_of(*key)
        for index in range(start_id, len(names)):
            name = names[index]
            child = self._child(key, name)
            try:
                st = os.lstat(self.srv.path_of(child))
            except OSError:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(child, st), index + 1):
                return
            self._remember(parent_ino, name)

    async def releasedir(self, fh: int) -> None:
        self.srv.tick()
        if self._dirs.pop(fh, None) is not None:
            self.srv.stats.open_dirs -= 1

    # -- files ----------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.srv.tick()
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _erofs()
        key = self.srv.key_of(inode)
        started = time.monotonic()
        try:
            fd = os.open(self.srv.path_of(key), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        s = self.srv.stats
        s.n_open += 1
        s.open_files += 1
        s.pinned[key] = s.pinned.get(key, 0) + 1
        if key not in s.cached:
            # First open of this object: counts as a download into the cache.
            size = os.fstat(fd).st_size
            s.cached[key] = size
            s.n_download += 1
            s.rx_bytes += size
            s.transfer_ms += max(1, int((time.monotonic() - started) * 1000))
        self._files[fd] = (fd, key)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.srv.tick()
        return os.pread(fh, size, off)

    async def flush(self, fh: int) -> None:
        self.srv.tick()

    async def release(self, fh: int) -> None:
        self.srv.tick()
        entry = self._files.pop(fh, None)
        if entry is None:
            return
        os.close(fh)
        s = self.srv.stats
        s.open_files -= 1
        key = entry[1]
        left = s.pinned.get(key, 1) - 1
        if left > 0:
            s.pinned[key] = left
        else:
            s.pinned.pop(key, None)

    # -- extended attributes --------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.srv.tick()
        key = self.srv.key_of(inode)
        st = self._lstat(key)
        value = self.srv.magic_xattr(os.fsdecode(name), key, st)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return os.fsencode(value)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self.srv.tick()
        key = self.srv.key_of(inode)
        return [os.fsencode(n) for n in self.srv.xattr_names(key, self._lstat(key))]

    # -- everything that would modify the tree --------------------------------
    async def setattr(self, *args: object) -> pyfuse3.EntryAttributes:
        self.srv.tick()
        raise _erofs()

    async def mknod(self, *args: object) -> pyfuse3.EntryAttributes:
        self.srv.tick()
        raise _erofs()

    async def mkdir(self, *args: object) -> pyfuse3.EntryAttributes:
        self.srv.tick()
        raise _erofs()

    async def unlink(self, *args: object) -> None:
        self.srv.tick()
        raise _erofs()

    async def rmdir(self, *args: object) -> None:
        self.srv.tick()
        raise _erofs()

    async def symlink(self, *args: object) -> pyfuse3.EntryAttributes:
        self.srv.tick()
        raise _erofs()

    async def rename(self, *args: object) -> None:
        self.srv.tick()
        raise _erofs()

    async def link(self, *args: object) -> pyfuse3.EntryAttributes:
        self.srv.tick()
        raise _erofs()

    async def write(self, *args: object) -> int:
        self.srv.tick()
        raise _erofs()

    async def create(self, *args: object) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.srv.tick()
        raise _erofs()

    async def setxattr(self, *args: object) -> None:
        self.srv.tick()
        raise _erofs()

    async def removexattr(self, *args: object) -> None:
        self.srv.tick()
        raise _erofs()


# -- talk socket ---------------------------------------------------------------


def _format_host_info(srv: Server) -> str:
    hosts = srv.repo.hosts
    if not hosts:
        return "No hosts defined\n"
    lines = [f"  [{i}] {url} (unprobed)\n" for i, url in enumerate(hosts)]
    lines.append(f"Active host {srv.repo.active}: {hosts[srv.repo.active]}\n")
    return "".join(lines)


def _format_proxy_info(srv: Server) -> str:
    groups = srv.cfg.proxy_groups
    if not groups:
        return "No proxies defined\n"
    text = "Load-balance groups:\n"
    text += "".join(f"[{i}] {', '.join(group)}\n" for i, group in enumerate(groups))
    text += f"Active proxy: [0] {groups[0][0]}\n"
    return text


def _cleanup(srv: Server, megabytes: int) -> str:
    target = megabytes * 1024 * 1024
    s = srv.stats
    s.cleanups.append(time.monotonic())
    for key in list(s.cached):
        if srv.cache_size() <= target:
            break
        if key not in s.pinned:
            del s.cached[key]
    if srv.cache_size() <= target:
        return "OK\n"
    return "Not fully cleaned (there might be pinned chunks)\n"


async def talk_reply(srv: Server, line: str) -> str:
    cfg = srv.cfg
    if line == "pid" or line == "pid watchdog" or line == "pid cachemgr":
        # No separate watchdog or cache manager process: this one plays both.
        return f"{srv.pid}\n"
    if line == "mountpoint":
        return f"{cfg.mountpoint}\n"
    if line == "revision":
        return f"{srv.revision}\n"
    if line == "version":
        return f"{VERSION} (CernVM-FS Fuse Module)\n{VERSION} (Loader)\n"
    if line == "cache size":
        if not srv.quota_managed():
            return "Cache cannot report its size\n"
        size, pinned = srv.cache_size(), srv.pinned_size()
        mib = 1024 * 1024
        return (
            f"Current cache size is {size // mib}MB ({size} Bytes), "
            f"pinned: {pinned // mib}MB ({pinned} Bytes)\n"
        )
    if line == "cache instance":
        # cvmfs2 names it relative to its working directory, the workspace.
        shown = "." if cfg.cache_dir == cfg.workspace else cfg.cache_dir
        return f"Posix cache manager (cache directory: {shown})\n"
    if line.startswith("cleanup rate"):
        if not srv.quota_managed():
            return "Unsupported by this cache\n"
        if len(line) < 14:
            return "Usage: cleanup rate <period in mn>\n"
        return f"{srv.cleanups_since(60 * string_to_uint(line[13:]))}\n"
    if line.startswith("cleanup"):
        if not srv.quota_managed():
            return "Cache cannot trigger eviction\n"
        if len(line) < 9:
            return "Usage: cleanup <MB>\n"
        return _cleanup(srv, string_to_uint(line[8:]))
    if line.startswith("remount"):
        return await srv.remount()
    if line == "host info":
        return _format_host_info(srv)
    if line == "proxy info":
        return _format_proxy_info(srv)
    if line == "timeout info":
        proxy, direct = srv.timeouts()
        return (
            "Timeout with proxy: "
            + (f"{proxy}s\n" if proxy else "no timeout\n")
            + "Timeout without proxy: "
            + (f"{direct}s\n" if direct else "no timeout\n")
        )
    if line == "parameters":
        return cfg.options.dump()
    return "unknown command\n"


async def _talk_connection(srv: Server, conn: trio.socket.SocketType) -> None:
    with conn:
        try:
            data = await conn.recv(TALK_MAX_COMMAND)
            if not data:
                return
            if data.endswith(b"\0"):
                data = data[:-1]
            reply = (await talk_reply(srv, data.decode("utf-8", "replace"))).encode()
            while reply:
                sent = await conn.send(reply)
                reply = reply[sent:]
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        except Exception:
            # A broken reply must not take the mount down; visible with -f.
            traceback.print_exc()


async def talk_server(srv: Server) -> None:
    listener = trio.socket.from_stdlib_socket(srv.cfg.talk_sock)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(_talk_connection, srv, conn)


# -- main loop -------------------------------------------------------------------

_early_signal: list[int] = []


def remember_early_signals() -> None:
    """Catch termination signals that arrive before trio listens for them."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: _early_signal.append(s))


async def _signals(srv: Server) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        if not _early_signal:
            async for _ in sigs:
                break
    srv.terminated = True
    pyfuse3.terminate()


async def _serve(srv: Server) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, srv)
        nursery.start_soon(talk_server, srv)
        nursery.start_soon(srv.auto_update)
        # Returns on unmount (the kernel ends the session) or on terminate().
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def serve(srv: Server) -> int:
    try:
        trio.run(_serve, srv)
    finally:
        # The parent owns a pre-mounted fd mount; otherwise unmount like
        # libfuse does (lazily, and not at all if already gone).
        pyfuse3.close(unmount=not srv.cfg.premounted)
        for path in (srv.cfg.talk_path, srv.cfg.loader_path, srv.cfg.running_path):
            with contextlib.suppress(OSError):
                os.unlink(path)
    # A signal ends the FUSE loop from outside, which cvmfs2 reports as its failure 6 (the
    # unmount itself is clean); an unmount by someone else ends it normally.
    return 6 if srv.terminated else 0
