"""Locating a repository on the stand-in's "stratum 1" and choosing its revision."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import _layout as layout
from _options import Options


class CatalogError(Exception):
    """No usable manifest / revision: cvmfs' "file catalog failure" (16)."""


class HistoryError(Exception):
    """Tag or date lookup failed: cvmfs' "history init failure" (22)."""


def host_chain(options: Options, fqrn: str) -> list[str]:
    raw = options.get("CVMFS_SERVER_URL") or ""
    org = fqrn.split(".", 1)[0]
    return [
        url.strip().replace("@fqrn@", fqrn).replace("@org@", org)
        for url in raw.split(";")
        if url.strip()
    ]


def url_to_dir(url: str) -> Path | None:
    """Only local servers exist here: ``file:///abs/path`` or ``/abs/path``."""
    if url.startswith("/"):
        return Path(url)
    parsed = urlparse(url)
    if parsed.scheme == "file" and parsed.path.startswith("/"):
        return Path(unquote(parsed.path))
    return None


def stringify_time(when: float) -> str:
    """cvmfs's StringifyTime: the day of the month without a leading zero."""
    t = time.gmtime(when)
    return f"{t.tm_mday} {time.strftime('%b %Y %H:%M:%S', t)}"


HASH_SUFFIXES = ("", "-rmd160", "-shake128")


def is_null_hash(value: str) -> bool:
    """CVMFS_ROOT_HASH as cvmfs reads it (shash::MkFromHexPtr): a string that is not 40
    characters plus a known suffix, or one of 40 zeros, is the null hash, i.e. no pin at all
    (measured: `xyz` and forty `0` mount the live revision; forty `g` are exit 16)."""
    for suffix in HASH_SUFFIXES:
        digits = value[: len(value) - len(suffix)] if suffix else value
        if (not suffix or value.endswith(suffix)) and len(digits) == 40:
            return set(digits) == {"0"}
    return True


@dataclass
class Selection:
    repo_dir: Path
    revision: int
    root_hash: str
    ttl: int
    tag: str
    fixed: bool


class Repository:
    """The host chain of one repository, with failover like the download manager."""

    def __init__(self, fqrn: str, hosts: list[str]) -> None:
        self.fqrn = fqrn
        self.hosts = hosts
        self.active = 0

    def fetch_manifest(self) -> tuple[Path, layout.Manifest]:
        count = len(self.hosts)
        for step in range(count):
            index = (self.active + step) % count
            repo_dir = url_to_dir(self.hosts[index])
            if repo_dir is None:
                continue
            try:
                manifest = layout.read_manifest(repo_dir)
            except (OSError, ValueError, KeyError):
                continue
            if manifest.fqrn is not None and manifest.fqrn != self.fqrn:
                continue  # repository name mismatch
            self.active = index
            return repo_dir, manifest
        raise CatalogError("Failed to initialize root file catalog")

    def _find_root_hash(self, wanted: str) -> tuple[Path, int]:
        for index, url in enumerate(self.hosts):
            repo_dir = url_to_dir(url)
            if repo_dir is None:
                continue
            for rev in layout.list_revisions(repo_dir):
                if layout.revision_root_hash(repo_dir, self.fqrn, rev) == wanted.lower():
                    self.active = index
                    return repo_dir, rev
        raise CatalogError("Failed to initialize root file catalog")

    def select(self, options: Options) -> Selection:
        """Pick the revision to serve, as MountPoint::CreateCatalogManager does."""
        if options.is_defined("CVMFS_ROOT_HASH") and not is_null_hash(
            options.get("CVMFS_ROOT_HASH") or ""
        ):
            # A fixed root catalog is loaded directly, without the history:
            # an unknown hash is a catalog failure, not a history failure.
            repo_dir, rev = self._find_root_hash(options.get("CVMFS_ROOT_HASH") or "")
            return Selection(repo_dir, rev, self._root_hash(repo_dir, rev), 0, "", True)

        if options.is_defined("CVMFS_REPOSITORY_TAG") or options.is_defined(
            "CVMFS_REPOSITORY_DATE"
        ):
            try:
                repo_dir, _ = self.fetch_manifest()
            except CatalogError:
                raise HistoryError("Failed to fetch manifest") from None
            tags = layout.read_tags(repo_dir)
            if tags is None:
                raise HistoryError("No history")
            tag_name = options.get("CVMFS_REPOSITORY_TAG")
            if tag_name is not None:
                matches = [t for t in tags if t.name == tag_name]
                if not matches:
                    raise HistoryError(f"no such tag: {tag_name}")
                tag = matches[-1]
            else:
                date = options.get("CVMFS_REPOSITORY_DATE") or ""
                when = layout.parse_iso(date)
                if when is None:
                    raise HistoryError(
                        f"invalid timestamp in CVMFS_REPOSITORY_DATE: {date}. "
                        "Use YYYY-MM-DDTHH:MM:SSZ"
                    )
                earlier = [t for t in tags if t.date <= when]
                if not earlier:
                    raise HistoryError(
                        "no repository state as early as utc timestamp "
                        + stringify_time(when.timestamp())
                    )
                tag = max(earlier, key=lambda t: t.date)
            self._check_tree(repo_dir, tag.revision)
            root_hash = self._root_hash(repo_dir, tag.revision)
            return Selection(repo_dir, tag.revision, root_hash, 0, tag.name, True)

        repo_dir, manifest = self.fetch_manifest()
        self._check_tree(repo_dir, manifest.revision)
        fixed = options.is_off("CVMFS_AUTO_UPDATE")
        return Selection(repo_dir, manifest.revision, manifest.root_hash, manifest.ttl, "", fixed)

    def _root_hash(self, repo_dir: Path, rev: int) -> str:
        return layout.revision_root_hash(repo_dir, self.fqrn, rev)

    @staticmethod
    def _check_tree(repo_dir: Path, rev: int) -> None:
        if not layout.revision_dir(repo_dir, rev).is_dir():
            raise CatalogError("Failed to initialize root file catalog")
