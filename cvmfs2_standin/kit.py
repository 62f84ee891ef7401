"""Helpers for tests and demos that drive the cvmfs2 stand-in.

    from cvmfs2_standin.kit import make_repo, write_wrapper, write_config

``make_repo`` lays out a repository on the stand-in's local "stratum 1",
``write_wrapper`` writes the executable to configure as the cvmfs2 binary and
``write_config`` writes a configuration fragment.
"""

from __future__ import annotations

import datetime as dt
import os
import shlex
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import _layout as layout

STANDIN = Path(__file__).resolve().parent / "cvmfs2.py"


@dataclass(frozen=True)
class Symlink:
    """A value for ``make_repo(files=...)`` that creates a symbolic link."""

    target: str


class Raw(str):
    """A ``write_config`` value written verbatim (no quoting), e.g. ``$CVMFS_FQRN``."""


def root_hash(server_dir: Path | str, fqrn: str, revision: int) -> str:
    """Root hash the stand-in reports for *revision* (``user.root_hash``)."""
    return layout.revision_root_hash(Path(server_dir) / fqrn, fqrn, revision)


def make_repo(
    server_dir: Path | str,
    fqrn: str,
    files: Mapping[str, bytes | str | Symlink],
    revision: int = 1,
    executable: Iterable[str] = (),
    tags: Mapping[str, str | dt.datetime] | Iterable[str] | None = None,
    publish: bool = True,
    ttl: int | None = None,
) -> Path:
    """Write revision *revision* of *fqrn* below *server_dir*; return the repository dir.

    *files* maps relative paths to contents (a name ending in ``/`` makes an
    empty directory, a `Symlink` a link).  Paths in *executable* get mode 0755,
    other files 0644.  *tags* adds history entries pointing at this revision:
    a mapping of tag name to date (ISO ``YYYY-MM-DDTHH:MM:SSZ`` or datetime),
    or plain names dated now.  With *publish* (the default) the manifest moves
    to this revision, which a running stand-in picks up on ``remount``.
    """
    repo_dir = Path(server_dir) / fqrn
    tree = layout.revision_dir(repo_dir, revision)
    if tree.exists():
        raise FileExistsError(f"revision {revision} of {fqrn} already exists: {tree}")
    tree.mkdir(parents=True, mode=0o755)
    exec_set = {p.strip("/") for p in executable}
    for rel, content in sorted(files.items()):
        target = tree / rel.strip("/")
        if rel.endswith("/"):
            target.mkdir(parents=True, exist_ok=True, mode=0o755)
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if isinstance(content, Symlink):
            os.symlink(content.target, target)
            continue
        data = content.encode() if isinstance(content, str) else bytes(content)
        target.write_bytes(data)
        os.chmod(target, 0o755 if rel.strip("/") in exec_set else 0o644)
    # Directories made by mkdir honour the umask; publish them as 0755.
    for dirpath, _dirs, _files in os.walk(tree):
        os.chmod(dirpath, 0o755)

    hash_hex = layout.derived_root_hash(fqrn, revision)
    (repo_dir / layout.REVISIONS / f"{revision}.root_hash").write_text(hash_hex + "\n")

    if tags is not None:
        now = dt.datetime.now(dt.UTC)
        items = tags.items() if isinstance(tags, Mapping) else ((t, now) for t in tags)
        with open(repo_dir / layout.TAGS, "a") as f:
            for name, when in items:
                stamp = when if isinstance(when, str) else layout.format_iso(when)
                f.write(f"{name} {revision} {stamp}\n")

    if publish:
        fields = {"revision": str(revision), "root_hash": hash_hex, "fqrn": fqrn}
        if ttl is not None:
            fields["ttl"] = str(ttl)
        layout.write_manifest(repo_dir, fields)
    return repo_dir


def write_wrapper(path: Path | str, env: Mapping[str, str] | None = None) -> Path:
    """Executable /bin/sh wrapper that runs the stand-in; usable with an empty PATH."""
    path = Path(path)
    lines = ["#!/bin/sh"]
    for key, value in (env or {}).items():
        lines.append(f"export {key}={shlex.quote(str(value))}")
    lines.append(f'exec {shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))} "$@"')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path


def _config_value(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return shlex.quote(str(value))


def write_config(path: Path | str, **params: object) -> Path:
    """cvmfs config fragment: one ``NAME=value`` line per parameter, values shell-quoted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}={_config_value(v)}\n" for name, v in params.items()))
    return path


def basic_params(base: Path | str, server_dir: Path | str, **extra: object) -> dict[str, object]:
    """Parameters for a private stand-in instance below *base* serving *server_dir*."""
    base = Path(base)
    params: dict[str, object] = {
        "CVMFS_SERVER_URL": f"file://{Path(server_dir)}/@fqrn@",
        "CVMFS_HTTP_PROXY": "DIRECT",
        "CVMFS_CACHE_BASE": str(base / "cache"),
        "CVMFS_RELOAD_SOCKETS": str(base / "run"),
    }
    params.update(extra)
    return params


def talk_socket_path(cache_base: Path | str, fqrn: str, shared: bool = False) -> Path:
    """Where the talk socket of *fqrn* lives for the given CVMFS_CACHE_BASE."""
    workspace = Path(cache_base) / ("shared" if shared else fqrn)
    return workspace / f"cvmfs_io.{fqrn}"


def talk(socket_path: Path | str, command: str, timeout: float = 10.0) -> str:
    """Send one talk command (one write, no newline) and read the reply to EOF."""
    path = str(socket_path)
    dirfd = None
    if len(os.fsencode(path)) >= 100:
        # sun_path is short; reach the directory through a descriptor.
        dirfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
        path = f"/proc/self/fd/{dirfd}/{os.path.basename(path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        finally:
            if dirfd is not None:
                os.close(dirfd)
        sock.sendall(command.encode())
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode()
