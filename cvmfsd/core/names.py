"""Which names under the root may become a repository mount.

Checked before anything is started: the autofs program-map rule of the cvmfs packages
(cvmfs2-interface.md §7), the mount helper's length limit, a list of names that tools probe all
the time, then the node's allow/deny policy.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

MAX_NAME = 60

# auto.cvmfs: starts alphanumeric, only [A-Za-z0-9._-], at least one dot, does not end with a dot.
_AUTOFS_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.[A-Za-z0-9._-]*[A-Za-z0-9_-]")

# Names that shells, VCS tools, desktop trash handlers and loaders probe in every directory they
# pass through. Most already fail the rule above; the dotted ones are listed explicitly.
PROBED_NAMES = frozenset({
    ".git", "HEAD", ".svn", ".hg", ".bzr", "lib64", "lib", ".Trash", ".Trash-0",
    ".xdg-volume-info", "autorun.inf", ".directory", ".hidden", "Desktop.ini", "desktop.ini",
    ".DS_Store", "._.DS_Store", "tls", "haswell", "x86_64", "glibc-hwcaps",
})
_PROBED_SUFFIXES = (".so", ".so.1", ".so.6", ".py", ".pyc", ".txt", ".json", ".conf", ".lock")


class InvalidName(ValueError):
    """The name can never be a repository on this node."""


@dataclass(frozen=True)
class NamePolicy:
    allow: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()

    def permits(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.deny):
            return False
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allow)


def check_syntax(name: str) -> None:
    """Raise InvalidName unless name could be a fully qualified repository name."""
    if len(name) > MAX_NAME:
        raise InvalidName(f"longer than {MAX_NAME} characters")
    if name in PROBED_NAMES or name.startswith((".", "-")) or name.endswith(_PROBED_SUFFIXES):
        raise InvalidName("a name that tools probe, not a repository")
    if _AUTOFS_RULE.fullmatch(name) is None:
        raise InvalidName("not a repository name ([A-Za-z0-9._-], starts alphanumeric, "
                          "contains a dot, does not end with a dot)")
    if ".." in name:
        raise InvalidName("contains '..'")


def check(name: str, policy: NamePolicy) -> None:
    check_syntax(name)
    if not policy.permits(name):
        raise InvalidName("not allowed by the node's repository policy")



# --- pinned snapshots: <root>/.snapshots/<fqrn>@<kind>=<value> ---------------------------------
SNAPSHOTS_DIR = ".snapshots"
_PIN_RULES = {
    # cvmfs tag names; no leading dot or dash, so a value can never read as an option.
    "tag": re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
    # A catalog root hash: SHA-1 hex, optionally with the algorithm suffix cvmfs appends.
    "hash": re.compile(r"[0-9a-f]{40}(?:-(?:rmd160|shake128))?"),
    # CVMFS_REPOSITORY_DATE: ISO 8601 UTC timestamp.
    "date": re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"),
}
PIN_PARAMETERS = {"tag": "CVMFS_REPOSITORY_TAG", "hash": "CVMFS_ROOT_HASH",
                  "date": "CVMFS_REPOSITORY_DATE"}


@dataclass(frozen=True)
class Pin:
    kind: str   # tag, hash or date
    value: str

    @property
    def parameter(self) -> str:
        return PIN_PARAMETERS[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}={self.value}"


def check_pin(kind: str, value: str) -> Pin:
    rule = _PIN_RULES.get(kind)
    if rule is None:
        raise InvalidName(f"unknown pin {kind!r} (tag, hash or date)")
    if rule.fullmatch(value) is None:
        raise InvalidName(f"{kind} {value!r} is not a valid {kind}")
    if kind == "hash" and not value.partition("-")[0].strip("0"):
        # cvmfs2 reads a null root hash as "no pin" and would serve the live revision under a
        # snapshot's name.
        raise InvalidName("the null hash pins nothing")
    if kind == "date":
        import datetime as dt

        try:
            dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            raise InvalidName(f"date {value!r} does not exist") from None
    return Pin(kind, value)


def parse_snapshot(name: str, policy: NamePolicy) -> tuple[str, Pin]:
    """`<fqrn>@<kind>=<value>` -> (fqrn, pin); InvalidName unless every part is valid."""
    fqrn, at, pin = name.partition("@")
    kind, eq, value = pin.partition("=")
    if not at or not eq:
        raise InvalidName("a snapshot is named <repository>@tag=<tag>, @hash=<root hash> or "
                          "@date=<YYYY-MM-DDTHH:MM:SSZ>")
    check(fqrn, policy)
    return fqrn, check_pin(kind, value)


def snapshot_name(fqrn: str, pin: Pin) -> str:
    return f"{fqrn}@{pin}"
