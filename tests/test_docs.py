"""What README.md says about the repository matches the repository: the packages .ci/setup
installs, the capabilities the systemd unit grants and its security rating, the test map."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
SETUP = (REPO_ROOT / ".ci" / "setup").read_text()
UNIT = (REPO_ROOT / "systemd" / "cvmfsd.service").read_text()


def _paragraph(containing: str) -> str:
    """The README paragraph or list item holding `containing`, joined into one line."""
    for block in re.split(r"\n\s*\n|\n(?=- )", README):
        if containing in block:
            return " ".join(block.split())
    raise AssertionError(f"README has no paragraph with {containing!r}")


def test_readme_names_what_ci_setup_installs() -> None:
    always = re.search(r"^pkgs=\(([^)]*)\)", SETUP, re.M)
    extra = re.search(r"^\s+pkgs\+=\(([^)]*)\)", SETUP, re.M)
    assert always is not None and extra is not None
    paragraph = _paragraph("`.ci/setup` installs")
    said = re.search(r"`\.ci/setup` installs `([^`]+)` with apt", paragraph)
    assert said is not None
    assert said.group(1).split() == always.group(1).split()
    # with the real client's tarball beside the clone, the libraries it needs too
    said_extra = re.search(r"it also installs the libraries that client needs \(`([^`]+)`\)",
                           paragraph)
    assert said_extra is not None
    assert said_extra.group(1).split() == extra.group(1).split()
    extras = re.search(r"pip install -q -e '\.\[([^\]]+)\]'", SETUP)
    assert extras is not None
    paragraph = _paragraph("`.ci/setup` installs")
    for extra in extras.group(1).split(","):
        assert f"`{extra}`" in paragraph, extra
    assert "editable mode" in paragraph and "-e " in SETUP


def test_readme_names_exactly_the_units_capabilities() -> None:
    granted = re.findall(r"^CapabilityBoundingSet=(.*)$", UNIT, re.M)
    assert len(granted) == 1
    described = set(re.findall(r"CAP_[A-Z_]+", _paragraph("capability bounding set")))
    assert described == set(granted[0].split())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze")
def test_readme_security_rating_is_the_measured_one() -> None:
    said = re.search(r"`systemd-analyze security --offline=true systemd/cvmfsd.service` "
                     r"\(systemd (\d+)\) rates it ([\d.]+)", _paragraph("systemd-analyze security"))
    assert said is not None
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True,
                             timeout=60).stdout.split()[1]
    if version != said.group(1):
        pytest.skip(f"the README's rating is for systemd {said.group(1)}, this is {version}")
    out = subprocess.run(["systemd-analyze", "security", "--offline=true",
                          "systemd/cvmfsd.service"], capture_output=True, text=True,
                         timeout=120, cwd=REPO_ROOT)
    rating = re.search(r"Overall exposure level for cvmfsd.service: ([\d.]+)", out.stdout)
    assert rating is not None, out.stdout + out.stderr
    assert rating.group(1) == said.group(2)


def test_test_map_lists_every_test_file() -> None:
    table = README.split("| file | what it proves |")[1].split("\n\n")[0]
    listed = set(re.findall(r"`(test_\w+\.py)`", table))
    present = {p.name for p in (REPO_ROOT / "tests").glob("test_*.py")}
    assert listed == present
    assert "`csi/`" in table


def test_readme_layout_has_a_line_for_every_folder() -> None:
    """Each top folder of the repository, and each package of the daemon, has its line."""
    section = README.split("\n## Layout\n")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    named = {name for line in lines for name in re.findall(r"`([\w./-]+/)`", line)}
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT, timeout=60).stdout.split()
    folders = {path.split("/")[0] + "/" for path in tracked if "/" in path}
    folders |= {str((REPO_ROOT / p).parent.relative_to(REPO_ROOT)) + "/"
                for p in tracked if p.startswith("cvmfsd/") and p.endswith("/__init__.py")}
    assert folders - named == set()
    assert named - folders - {"csi/proto/", "csi/deploy/"} == set()
