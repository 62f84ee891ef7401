"""Server-side repository layout of the cvmfs2 stand-in.

Shared by the stand-in (reader) and by kit.py (writer) so that both agree on
one layout.  A repository directory ``<server>/<fqrn>/`` holds:

``.cvmfspublished``
    text manifest, ``key=value`` lines: ``revision=N``, ``root_hash=<hex>``,
    ``fqrn=<name>`` and optionally ``ttl=<seconds>`` (catalog TTL, default 240).
``revisions/<N>/``
    the file tree served for revision N.
``revisions/<N>.root_hash``
    optional root hash of revision N; without it the hash is derived as
    ``sha1("<fqrn>:<N>")``.
``tags``
    optional history, lines ``<tag> <revision> <iso-date>``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = ".cvmfspublished"
REVISIONS = "revisions"
TAGS = "tags"
DEFAULT_TTL = 240


def derived_root_hash(fqrn: str, revision: int) -> str:
    """Deterministic stand-in root catalog hash (SHA-1 hex, like cvmfs' default)."""
    return hashlib.sha1(f"{fqrn}:{revision}".encode()).hexdigest()


def revision_dir(repo_dir: Path, revision: int) -> Path:
    return repo_dir / REVISIONS / str(revision)


def revision_root_hash(repo_dir: Path, fqrn: str, revision: int) -> str:
    try:
        stored = (repo_dir / REVISIONS / f"{revision}.root_hash").read_text().strip()
    except OSError:
        stored = ""
    return stored or derived_root_hash(fqrn, revision)


def list_revisions(repo_dir: Path) -> list[int]:
    try:
        names = os.listdir(repo_dir / REVISIONS)
    except OSError:
        return []
    revs = [int(n) for n in names if n.isdigit() and (repo_dir / REVISIONS / n).is_dir()]
    return sorted(revs)


@dataclass
class Manifest:
    revision: int
    root_hash: str
    fqrn: str | None
    ttl: int
    fields: dict[str, str] = field(default_factory=dict)


def read_manifest(repo_dir: Path) -> Manifest:
    """Parse the manifest; raises OSError or ValueError when unusable."""
    fields: dict[str, str] = {}
    for line in (repo_dir / MANIFEST).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    revision = int(fields["revision"])
    fqrn = fields.get("fqrn") or None
    root_hash = fields.get("root_hash") or derived_root_hash(fqrn or "", revision)
    ttl = int(fields.get("ttl", DEFAULT_TTL))
    return Manifest(revision=revision, root_hash=root_hash, fqrn=fqrn, ttl=ttl, fields=fields)


def write_manifest(repo_dir: Path, fields: dict[str, str]) -> None:
    # Atomic replace: a running stand-in may re-read the manifest at any time.
    tmp = repo_dir / f"{MANIFEST}.tmp.{os.getpid()}"
    tmp.write_text("".join(f"{k}={v}\n" for k, v in fields.items()))
    os.replace(tmp, repo_dir / MANIFEST)


@dataclass
class Tag:
    name: str
    revision: int
    date: dt.datetime


def parse_iso(value: str) -> dt.datetime | None:
    """``YYYY-MM-DDTHH:MM:SSZ`` (what cvmfs accepts); None when malformed."""
    try:
        parsed = dt.datetime.strptime(value.strip(), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return parsed.replace(tzinfo=dt.UTC)


def format_iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_tags(repo_dir: Path) -> list[Tag] | None:
    """The tag list, or None when the repository has no history at all."""
    try:
        text = (repo_dir / TAGS).read_text()
    except OSError:
        return None
    tags: list[Tag] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        when = parse_iso(parts[2])
        if when is None:
            continue
        tags.append(Tag(name=parts[0], revision=int(parts[1]), date=when))
    return tags
