"""What the status socket reports: dictionaries built from the registry, plus what each mounted
repository says about itself.

Per repository, revision, host, proxy and client version come from cvmfs2's magic xattrs on the
repository's mount (cvmfs2-interface.md §6: `user.revision`, `user.root_hash`, `user.host`,
`user.proxy`, `user.version`, `user.nioerr`) — the same source `cvmfs_config stat` uses, and
independent of where the cache lives. Cache usage has no xattr; it comes from the talk socket
(§5, `cache size`), found at `<workspace>/cvmfs_io.<fqrn>` through /proc/<serving pid>/cwd (the
serving cvmfs2 runs in its workspace). Where that fails (a CVMFS_TALK_SOCKET override, no
CAP_SYS_PTRACE for another uid's /proc entry) cache usage is reported as null.

All of it is read as bounded backend calls (calls.py): a hung backend makes its fields null
instead of stalling the caller, and holds one worker thread at most.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from ..core import backend
from ..core.calls import BackendCalls, BackendHung
from ..core.lifecycle import State
from ..core.registry import Registry, Repo

_CACHE_RE = re.compile(r"\((\d+) Bytes\).*?\((\d+) Bytes\)", re.S)


def iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def counts(registry: Registry) -> dict[str, int]:
    out = {str(state): n for state, n in registry.counts().items()}
    out["total"] = sum(out.values())
    return out


@dataclass
class Details:
    revision: int | None = None
    root_hash: str | None = None
    host: str | None = None
    proxy: str | None = None
    client_version: str | None = None
    nioerr: int | None = None
    cache_used_bytes: int | None = None
    cache_pinned_bytes: int | None = None


def _xattr(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode(errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def read_details(root: Path, repo_path: str, fqrn: str, pid: int | None) -> Details:
    """Blocking: a backend call (calls.py). repo_path is relative to the root (a snapshot lives
    under .snapshots/); the talk socket is named after the fqrn."""
    path = root / repo_path
    details = Details(
        revision=_int(_xattr(path, "user.revision")),
        root_hash=_xattr(path, "user.root_hash"),
        host=_xattr(path, "user.host"),
        proxy=_xattr(path, "user.proxy"),
        client_version=_xattr(path, "user.version"),
        nioerr=_int(_xattr(path, "user.nioerr")),
    )
    if pid is not None:
        # Not under the root: no FUSE request of ours is involved. Bounded by the socket timeout.
        with contextlib.suppress(OSError, ValueError):
            reply = backend.talk(Path(f"/proc/{pid}/cwd/cvmfs_io.{fqrn}"), "cache size",
                                 timeout=1.0)
            match = _CACHE_RE.search(reply)
            if match:
                details.cache_used_bytes = int(match.group(1))
                details.cache_pinned_bytes = int(match.group(2))
    return details


class DetailReader:
    def __init__(self, calls: BackendCalls, root: Path) -> None:
        self.calls = calls
        self.root = root

    async def read(self, repos: list[Repo], deadline: float) -> dict[str, Details]:
        """Details of the mounted ones among repos; missing entries did not answer in time."""
        out: dict[str, Details] = {}

        async def one(repo: Repo) -> None:
            with contextlib.suppress(BackendHung):
                out[repo.name] = await self.calls.call(
                    repo, functools.partial(read_details, self.root, repo.path, repo.fqrn,
                                            repo.serving_pid), deadline)

        async with trio.open_nursery() as nursery:
            for repo in repos:
                if repo.state is State.MOUNTED:
                    nursery.start_soon(one, repo)
        return out


def repo_entry(repo: Repo, details: Details | None = None) -> dict[str, Any]:
    """One repository for `list`: the registry's view plus what the backend says. Every key is
    always present (null when unknown), so scripts can rely on the shape."""
    now = trio.current_time()
    retry_in = None
    if repo.state is State.FAILED and repo.retry_at > now:
        retry_in = round(repo.retry_at - now, 1)
    mounted_for = None
    if repo.mounted_since is not None:
        mounted_for = round(max(0.0, time.time() - repo.mounted_since), 1)
    entry: dict[str, Any] = {
        "name": repo.name,
        "path": repo.path,       # relative to the root (snapshots: .snapshots/<name>)
        "fqrn": repo.fqrn,
        "pin": None if repo.pin is None else str(repo.pin),
        "state": str(repo.state),
        "serving_pid": repo.serving_pid,
        "mounted_since": iso(repo.mounted_since),
        "mounted_for_s": mounted_for,
        "boots": repo.boots,
        "failures": repo.failures,
        "retry_in_s": retry_in,
        "last_error": repo.last_error.as_dict() if repo.last_error is not None else None,
        "last_error_at": iso(repo.last_error_at),
    }
    entry.update(asdict(details or Details()))
    entry["details_known"] = details is not None
    return entry


__all__ = ["DetailReader", "Details", "counts", "iso", "read_details", "repo_entry"]
