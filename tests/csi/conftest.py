"""Fixtures for the CSI plugin tests (see csi_harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from csi_harness import Plugin, Pod, StandinRoot, mounts_at_or_under, unmount_tree

from csi import mounts

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def pytest_plugin_registered(plugin: Any, manager: pytest.PytestPluginManager) -> None:
    """Keep `import conftest` meaning tests/conftest.py.

    conftest.py files outside packages are all imported as the module `conftest`, and pytest
    leaves the last one loaded in sys.modules. The tests in tests/ import helpers with
    `from conftest import ...`; once this file is loaded they would get it instead. So when this
    file is registered, tests/conftest.py goes back into sys.modules. (These tests import nothing
    from `conftest`: shared helpers live in csi_harness.py.)
    """
    if getattr(plugin, "__file__", None) != __file__:
        return
    for other in manager.get_plugins():
        if getattr(other, "__file__", None) == str(ROOT_CONFTEST):
            sys.modules["conftest"] = other


@pytest.fixture(autouse=True)
def _no_mount_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test leaves no mount behind below the session's temporary directory."""
    yield
    base = tmp_path_factory.getbasetemp()
    left = [e.mount_point for e in mounts_at_or_under(base)]
    assert not left, f"mounts left behind: {left}"


@pytest.fixture
def kubelet_dir(tmp_path: Path) -> Iterator[Path]:
    """A fake kubelet root directory on its own shared mount (kubelet makes its root rshared)."""
    d = tmp_path / "kubelet"
    d.mkdir()
    mounts.mount("tmpfs", str(d), "tmpfs", 0, "size=8m,mode=755")
    try:
        mounts.mount(None, str(d), None, mounts.MS_SHARED)
        (d / "pods").mkdir()
        yield d
    finally:
        unmount_tree(d)


@pytest.fixture
def cvmfs_root(tmp_path: Path) -> Iterator[StandinRoot]:
    """The daemon's root for these tests.

    STAND-IN: a tiny pyfuse3 filesystem (tests/csi/fakeroot_fs.py) with the daemon's fstype
    (fuse.cvmfsd), made shared, that attaches a read-only tmpfs "repository" onto <root>/<name>
    after the first lookup of a known name. The real daemon (cvmfsd) is exercised by
    test_real_daemon.py; to run every CSI test against it, yield an object with StandinRoot's
    interface (path, repos, lookup, kill, pause, resume, close) built on the `start_daemon` fixture
    of tests/conftest.py.
    """
    root = StandinRoot(tmp_path)
    try:
        yield root.start()
    finally:
        root.close()


@pytest.fixture
def start_plugin(
    tmp_path: Path, kubelet_dir: Path, cvmfs_root: StandinRoot
) -> Iterator[Callable[..., Plugin]]:
    """Start plugins (extra command-line arguments allowed); all are stopped by pid afterwards."""
    started: list[Plugin] = []

    def start(*args: str, root: Path | None = None, topology: str = "host") -> Plugin:
        plugin = Plugin(tmp_path, kubelet_dir, root or cvmfs_root.path, *args, topology=topology)
        started.append(plugin)
        return plugin.start()

    yield start
    for plugin in started:
        plugin.stop()


@pytest.fixture
def plugin(start_plugin: Callable[..., Plugin]) -> Plugin:
    return start_plugin()


@pytest.fixture
def make_pod(kubelet_dir: Path, tmp_path: Path) -> Iterator[Callable[[Path], Pod]]:
    """Start pods on published targets; each gets its own view directory; all stopped by pid."""
    pods: list[Pod] = []

    def make(target: Path) -> Pod:
        pod = Pod(target, tmp_path / f"pod-{len(pods)}" / "cvmfs")
        pods.append(pod)
        return pod

    yield make
    for pod in pods:
        pod.close()
