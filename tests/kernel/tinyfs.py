"""A tiny read-only pyfuse3 filesystem for the mount experiments (kexp).

Serves a pre-mounted /dev/fuse descriptor (the parent mounts it, as cvmfsd does for cvmfs2):

    python tinyfs.py FD LABEL KIND TIMEOUT

KIND "repo": /file, /subdir/file (content "LABEL:/path\n").  KIND "root": directories
repo, repo2..repo4, empty (the covered directories of a cvmfsd-like root) and /rootfile.
TIMEOUT: entry and attribute timeout in seconds for every reply.  SIGKILL the process to make
the mount a dead backend (ENOTCONN), as long as nobody else holds the descriptor.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio


class Tiny(pyfuse3.Operations):
    def __init__(self, label: str, kind: str, timeout: float) -> None:
        super().__init__()
        self.label = label
        self.timeout = timeout
        # inode -> (path, children {name: inode} or None for a file)
        self.nodes: dict[int, tuple[str, dict[bytes, int] | None]] = {}
        if kind == "repo":
            layout = {"/": ["file", "subdir"], "/subdir": ["file"]}
        else:
            layout = {"/": ["repo", "repo2", "repo3", "repo4", "rootfile"],
                      "/repo": [], "/repo2": [], "/repo3": [], "/repo4": []}
        paths = ["/", *sorted({d.rstrip("/") + "/" + n for d, ns in layout.items() for n in ns})]
        ino_of = {p: (pyfuse3.ROOT_INODE if p == "/" else i + 100) for i, p in enumerate(paths)}
        for p in paths:
            if p in layout:
                kids = {n.encode(): ino_of[p.rstrip("/") + "/" + n] for n in layout[p]}
                self.nodes[ino_of[p]] = (p, kids)
            else:
                self.nodes[ino_of[p]] = (p, None)

    def _content(self, ino: int) -> bytes:
        return f"{self.label}:{self.nodes[ino][0]}\n".encode()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        _path, kids = self.nodes[ino]
        if kids is None:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_size = len(self._content(ino))
            a.st_nlink = 1
        else:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
        a.st_ino = ino
        a.generation = 1
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        a.st_blocks = 1
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 0
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        node = self.nodes.get(parent_inode)
        if node is None or node[1] is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attr(parent_inode)
        ino = node[1].get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def getattr(self, inode, ctx=None):
        if inode not in self.nodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        if self.nodes.get(inode, ("", None))[1] is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        kids = sorted(self.nodes[fh][1].items())
        for i, (name, ino) in enumerate(kids):
            if i < start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if self.nodes.get(inode, ("", {}))[1] is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # direct_io: every read reaches the server, so a held file shows the backend state
        # (with the page cache, pages read earlier keep being served after the server died)
        return pyfuse3.FileInfo(fh=inode, keep_cache=False, direct_io=True)

    async def read(self, fh, off, size):
        return self._content(fh)[off:off + size]

    async def release(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


def main() -> None:
    fd, label, kind, timeout = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    os.set_inheritable(fd, False)
    pyfuse3.init(Tiny(label, kind, timeout), f"/dev/fd/{fd}", set())
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
