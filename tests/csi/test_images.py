"""The image definitions copy and run things that exist in the repository."""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES = REPO_ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{dockerfile}: dangling line continuation"
    return out


def scripts() -> dict[str, str]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    result: dict[str, str] = pyproject["project"]["scripts"]
    return result


def _first_party_imports(package: str) -> set[str]:
    """The packages of this repository that `package`'s modules import directly."""
    ours = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")}
    found = set()
    for path in (REPO_ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return found & ours - {package}


def test_both_images_exist() -> None:
    assert {d.parent.name for d in DOCKERFILES} == {"csi-plugin", "cvmfsd"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copy_sources_exist(dockerfile: Path) -> None:
    copies = [args for word, args in instructions(dockerfile) if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert not any(a.startswith("--from") for a in shlex.split(args))
        *sources, _dest = parts
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile}: COPY {source} does not exist"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_entrypoint_is_a_console_script_of_this_project(dockerfile: Path) -> None:
    entry = [args for word, args in instructions(dockerfile) if word == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = __import__("json").loads(entry[0])  # exec form only
    script = argv[0]
    table = scripts()
    assert script in table, f"{script} is not in [project.scripts]"
    module, _, func = table[script].partition(":")
    source = REPO_ROOT / (module.replace(".", "/") + ".py")
    assert source.exists(), f"{source} missing"
    assert re.search(rf"^def {func}\(", source.read_text(), re.M), f"no {func}() in {source}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_pinned_and_project_installed(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    bases = [args for word, args in steps if word == "FROM"]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases)
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "pip install" in runs and " ." in runs  # installs this repository


def test_cvmfsd_image_uses_the_cvmfs_packages() -> None:
    steps = instructions(IMAGES / "cvmfsd" / "Dockerfile")
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "cvmfs-release" in runs and re.search(r"dnf install -y [^&]*\bcvmfs\b", runs)
    base = next(args for word, args in steps if word == "FROM")
    assert base.startswith(("almalinux:9", "rockylinux:9", "quay.io/centos/centos:stream9"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_image_copies_the_packages_its_entry_point_imports(dockerfile: Path) -> None:
    """The entry point's package and the packages it imports are in the image (csi uses
    cvmfsd.core's kernel calls; cvmfsd's demo the cvmfs2 stand-in)."""
    steps = instructions(dockerfile)
    copied = {Path(s).parts[0] for word, args in steps if word in ("COPY", "ADD")
              for s in [p for p in shlex.split(args) if not p.startswith("--")][:-1]}
    script = __import__("json").loads(next(a for w, a in steps if w == "ENTRYPOINT"))[0]
    package = scripts()[script].split(".")[0]
    needed = {package} | _first_party_imports(package)
    assert needed - copied == set()
