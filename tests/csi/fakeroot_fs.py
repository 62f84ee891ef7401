"""Stand-in for the cvmfsd root in the CSI tests: a tiny pyfuse3 filesystem (run as a process).

    python tests/csi/fakeroot_fs.py MOUNTPOINT STAGING REPO[:fuse] [REPO[:fuse] ...]
    python tests/csi/fakeroot_fs.py --repo MOUNTPOINT NAME      (one FUSE "repository")

It mounts an empty FUSE root with fsname and subtype `cvmfsd` (fstype fuse.cvmfsd, like the
daemon), answers LOOKUP of each listed repository name at once with a directory (stable inode, very
long entry timeout; any other name is ENOENT) and, like the daemon, attaches "the repository" from
a worker thread after replying, never from the trio thread that serves FUSE: a tmpfs (source
`cvmfs2`, like the real backend's mounts) is mounted on a private staging directory, given a README
naming the repository, made read-only, and moved onto MOUNTPOINT/<name>. A repository listed as
`NAME:fuse` is served instead by a child process of its own (this file with --repo, a read-only
FUSE filesystem with fsname cvmfs2 holding README and sub/), whose pid is written to
STAGING/NAME.pid: killing it leaves a dead mount that answers ENOTCONN, like a crashed cvmfs2. The
root's attributes get a very long timeout too, so a stat of the root does not reach this process
(as with the daemon). Prints "ready" once mounted. SIGTERM stops serving without unmounting: the
test fixture unmounts (it also has to after SIGKILL).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from csi import mounts

LONG = 1e6


class FakeRoot(pyfuse3.Operations):
    def __init__(self, mountpoint: str, staging: str, specs: list[str]) -> None:
        super().__init__()
        self.mountpoint = mountpoint
        self.staging = staging
        repos = [spec.split(":", 1)[0] for spec in specs]
        self.fuse = {spec.split(":", 1)[0] for spec in specs if spec.endswith(":fuse")}
        self.inodes = {name: pyfuse3.ROOT_INODE + 1 + i for i, name in enumerate(repos)}
        self.names = {ino: name for name, ino in self.inodes.items()}
        self.attached: set[str] = set()
        self.lock = threading.Lock()

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 1
        a.entry_timeout = LONG
        a.attr_timeout = LONG if inode == pyfuse3.ROOT_INODE else 0
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        a.st_uid = a.st_gid = 0
        a.st_size = 0
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 0
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE and inode not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        repo = name.decode(errors="replace")
        if parent_inode != pyfuse3.ROOT_INODE or repo not in self.inodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        with self.lock:
            start = repo not in self.attached
            self.attached.add(repo)
        if start:
            threading.Thread(target=self._attach, args=(repo,), daemon=True).start()
        return self._attrs(self.inodes[repo])

    def _attach(self, repo: str) -> None:
        """Mount the repository at staging, then move it into place (never on the trio thread)."""
        stage = os.path.join(self.staging, repo)
        os.makedirs(stage, exist_ok=True)
        if repo in self.fuse:
            child = subprocess.Popen(
                [sys.executable, __file__, "--repo", stage, repo], stdout=subprocess.PIPE
            )
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            Path(self.staging, f"{repo}.pid").write_text(str(child.pid))
            mounts.mount(stage, os.path.join(self.mountpoint, repo), None, mounts.MS_MOVE)
            return
        mounts.mount("cvmfs2", stage, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "size=1m")
        Path(stage, "README").write_text(f"repository {repo}\n")
        os.makedirs(os.path.join(stage, "sub"), exist_ok=True)
        flags = mounts.MS_REMOUNT | mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV
        mounts.mount(None, stage, None, flags)
        mounts.mount(stage, os.path.join(self.mountpoint, repo), None, mounts.MS_MOVE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for ino in sorted(self.names):
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, self.names[ino].encode(), self._attrs(ino), ino):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


class FakeRepo(pyfuse3.Operations):
    """A read-only repository: /README ("repository NAME\\n") and an empty /sub."""

    README = pyfuse3.ROOT_INODE + 1
    SUB = pyfuse3.ROOT_INODE + 2

    def __init__(self, name: str) -> None:
        super().__init__()
        self.data = f"repository {name}\n".encode()

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 1
        a.entry_timeout = a.attr_timeout = LONG
        if inode == self.SUB:
            # revalidated on every walk: a stopped server then hangs any walk through it
            a.entry_timeout = a.attr_timeout = 0
        if inode == self.README:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o444, 1, len(self.data)
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o555, 2, 0
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 0
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode = {b"README": self.README, b"sub": self.SUB}.get(name)
        if parent_inode != pyfuse3.ROOT_INODE or inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != self.README:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[off : off + size]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh != pyfuse3.ROOT_INODE:
            return
        for i, (name, inode) in enumerate(((b"README", self.README), (b"sub", self.SUB))):
            if i < start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    if sys.argv[1] == "--repo":
        mountpoint, name = sys.argv[2:4]
        ops: pyfuse3.Operations = FakeRepo(name)
        options = set(pyfuse3.default_options)
        options |= {"fsname=cvmfs2", "ro", "allow_other", "default_permissions"}
    else:
        mountpoint, staging, *repos = sys.argv[1:]
        ops = FakeRoot(mountpoint, staging, repos)
        options = set(pyfuse3.default_options)
        options |= {"fsname=cvmfsd", "subtype=cvmfsd", "allow_other", "default_permissions"}
    pyfuse3.init(ops, mountpoint, options)
    print("ready", flush=True)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
