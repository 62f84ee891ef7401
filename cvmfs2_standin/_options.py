"""cvmfs configuration handling for the cvmfs2 stand-in.

Mirrors the real client's option manager: every file is a shell fragment that
/bin/sh evaluates (in the file's directory, with CVMFS_FQRN and all parameters
read so far in its environment); the parameter names are taken from the
``NAME=value`` lines and their values are what ``echo $NAME`` prints in that
shell afterwards.  Later files win.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable

_MARKER = "@@cvmfs2-standin-values@@"
_UNSET = "@@cvmfs2-standin-unset@@"
# Stand-in fault knobs.  Unlike real parameters they also count when a
# fragment sets them indirectly (e.g. by sourcing a per-repository file).
KNOBS = (
    "CVMFS_STANDIN_BOOT_DELAY",
    "CVMFS_STANDIN_BOOT_GATE",
    "CVMFS_STANDIN_FAIL",
    "CVMFS_STANDIN_HANG",
    "CVMFS_STANDIN_CRASH_AFTER",
    "CVMFS_STANDIN_DIE_AT_START",
)
# Like cvmfs' RepositorySanitizer: what may name a config repository.
_REPO_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def escape_shell(raw: str) -> str:
    """Quote a value for `parse` output the way the real client does."""
    if re.fullmatch(r"[0-9A-Za-z/:._,-]*", raw):
        return raw
    return "'" + raw.replace("'", "\\'") + "'"


def _trim_parameter(name: str) -> str:
    name = name.strip()
    for prefix in ("readonly ", "export ", "eval "):
        if name.startswith(prefix):
            return name[len(prefix) :].strip()
    return name


def _assignment(line: str) -> tuple[str, list[str]] | None:
    """(parameter, '='-split tokens) of an assignment line, else None."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    tokens = line.split("=")
    if len(tokens) < 2:
        return None
    parameter = _trim_parameter(tokens[0])
    if not parameter or " " in parameter:
        return None
    return parameter, tokens


class ConfigRepoRequiredError(Exception):
    """CVMFS_CONFIG_REPO_REQUIRED is on and the config repository is absent."""


class Options:
    def __init__(self, fqrn: str, etc: str = "/etc/cvmfs", simple: bool = False) -> None:
        self.fqrn = fqrn
        self.etc = etc.rstrip("/") or "/"
        self.simple = simple
        self.values: dict[str, tuple[str, str]] = {}
        # The real client setenv()s every parameter it reads, so later
        # fragments (and the shells evaluating them) see earlier values.
        # Knobs come from configuration files only, never from our environment.
        self.env: dict[str, str] = {k: v for k, v in os.environ.items() if k not in KNOBS}
        self.env["CVMFS_FQRN"] = fqrn

    # -- access ---------------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        item = self.values.get(key)
        return item[0] if item is not None else default

    def is_defined(self, key: str) -> bool:
        return key in self.values

    def is_on(self, key: str) -> bool:
        value = self.get(key)
        return value is not None and value.upper() in ("YES", "ON", "1")

    def is_off(self, key: str) -> bool:
        value = self.get(key)
        return value is not None and value.upper() in ("NO", "OFF", "0")

    def dump(self) -> str:
        return "".join(
            f"{key}={escape_shell(value)}    # from {source}\n"
            for key, (value, source) in sorted(self.values.items())
        )

    # -- parsing --------------------------------------------------------
    def populate(self, key: str, value: str, source: str) -> None:
        # cvmfs' default template manager expands these in every value.
        org = self.fqrn.split(".", 1)[0]
        value = value.replace("@fqrn@", self.fqrn).replace("@org@", org)
        self.values[key] = (value, source)
        self.env[key] = value

    def parse_path(self, path: str, external: bool = False) -> None:
        release = _hold_from_own_session(path) if external else None
        try:
            with open(path, "rb") as f:
                content = f.read().decode("utf-8", "surrogateescape")
        except OSError:
            content = None
        finally:
            if release is not None:
                release()
        if content is None:
            config_dir = os.path.dirname(path)
            if (
                external
                and not os.path.isdir(config_dir)
                and self.is_on("CVMFS_CONFIG_REPO_REQUIRED")
            ):
                raise ConfigRepoRequiredError(config_dir) from None
            return
        if self.simple:
            self._parse_simple(content, path)
        else:
            self._parse_shell(content, path)

    def _parse_simple(self, content: str, source: str) -> None:
        for line in content.splitlines():
            found = _assignment(line)
            if found is None:
                continue
            parameter, tokens = found
            value = "=".join(tokens[1:]).strip()
            if len(value) > 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            self.populate(parameter, value, source)

    def _parse_shell(self, content: str, source: str) -> None:
        parameters = [p for p, _ in filter(None, map(_assignment, content.splitlines()))]
        if not content.strip():
            return
        workdir = os.path.dirname(source) or "/"
        script = f'cd "{workdir}"\n{content}\n'
        script += f"echo {_MARKER}\n" + "".join(f"echo ${p}\n" for p in parameters)
        script += "".join(f'echo "${{{k}-{_UNSET}}}"\n' for k in KNOBS)
        proc = subprocess.run(
            ["/bin/sh"],
            input=script.encode("utf-8", "surrogateescape"),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.env,
            check=False,
        )
        lines = proc.stdout.decode("utf-8", "surrogateescape").split("\n")
        # A fragment that exits early leaves the values empty, as in cvmfs.
        values = lines[lines.index(_MARKER) + 1 :] if _MARKER in lines else []
        for i, parameter in enumerate(parameters):
            self.populate(parameter, values[i] if i < len(values) else "", source)
        knob_values = values[len(parameters) : len(parameters) + len(KNOBS)]
        for knob, value in zip(KNOBS, knob_values, strict=False):
            if knob not in parameters and value != _UNSET and value != self.get(knob):
                self.populate(knob, value, source)

    def config_repository_dir(self) -> str | None:
        """``<CVMFS_MOUNT_DIR>/<CVMFS_CONFIG_REPOSITORY>/etc/cvmfs/`` if one is in use."""
        repo = self.get("CVMFS_CONFIG_REPOSITORY")
        if not repo or repo == self.fqrn or not _REPO_NAME.match(repo):
            return None
        mount_dir = self.get("CVMFS_MOUNT_DIR") or "/cvmfs"
        return f"{mount_dir}/{repo}/etc/cvmfs/"

    def parse_default(self) -> None:
        etc = self.etc
        self.parse_path(f"{etc}/default.conf")
        try:
            dist = sorted(n for n in os.listdir(f"{etc}/default.d") if n.endswith(".conf"))
        except OSError:
            dist = []
        for name in dist:
            self.parse_path(f"{etc}/default.d/{name}")
        config_repo = self.config_repository_dir()
        if config_repo is not None:
            self.parse_path(config_repo + "default.conf", external=True)
        self.parse_path(f"{etc}/default.local")
        if "." in self.fqrn:
            domain = self.fqrn.split(".", 1)[1]
            if config_repo is not None:
                self.parse_path(f"{config_repo}domain.d/{domain}.conf", external=True)
            self.parse_path(f"{etc}/domain.d/{domain}.conf")
            self.parse_path(f"{etc}/domain.d/{domain}.local")
        if config_repo is not None:
            self.parse_path(f"{config_repo}config.d/{self.fqrn}.conf", external=True)
        self.parse_path(f"{etc}/config.d/{self.fqrn}.conf")
        self.parse_path(f"{etc}/config.d/{self.fqrn}.local")


def _hold_from_own_session(path: str) -> Callable[[], None]:
    """Open *path* from a short-lived child in its own session first.

    The real client does this so that an automounter serving the config
    repository (which ignores requests from its own process group) mounts it.
    The child holds the file open until the returned callable is invoked,
    i.e. until the parent has tried to open the file itself.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    quit_r, quit_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(quit_w)
            if os.getpgrp() != os.getpid():
                os.setsid()
            with contextlib.suppress(OSError):
                os.open(path, os.O_RDONLY)
            os.write(ready_w, b"R")
            os.read(quit_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(quit_r)
    os.read(ready_r, 1)
    os.close(ready_r)

    def release() -> None:
        os.write(quit_w, b"C")
        os.close(quit_w)
        os.waitpid(pid, 0)

    return release


def canonical_path(path: str) -> str:
    """cvmfs' MakeCanonicalPath: drop a trailing slash."""
    return path[:-1] if len(path) > 1 and path.endswith("/") else path


def string_to_uint(value: str | None) -> int:
    """Leading decimal digits, 0 when none (like cvmfs' String2Uint64)."""
    match = re.match(r"\s*(\d+)", value or "")
    return int(match.group(1)) if match else 0


__all__ = [
    "ConfigRepoRequiredError",
    "Options",
    "canonical_path",
    "escape_shell",
    "string_to_uint",
]
