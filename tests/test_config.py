"""The configuration as an admin meets it: one table of keys behind every flag, the example
file, the README table, check-config and reload's restart rule; errors that name their key;
an OSG-only policy that works; cvmfsctl -c that never guesses."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from conftest import DEMO_FILES, REPO_ROOT, Env
from hypothesis import given, settings, strategies as st

from cvmfsd import cli, config
from cvmfsd.admin import ctl, service as admin
from cvmfsd.config import Config, ConfigError

EXAMPLE = REPO_ROOT / "systemd" / "cvmfsd.toml.example"
README = REPO_ROOT / "README.md"
REGENERATE = "run `python -m cvmfsd.config --write-docs` and commit the result"


def cvmfsd(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvmfsd", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


# --- one table --------------------------------------------------------------------------------
def test_the_table_is_config() -> None:
    """Every field of Config is a key of the table, in order, with its default and a help."""
    assert [k.name for k in config.KEYS] == [f.name for f in fields(Config)]
    defaults = Config()
    for key in config.KEYS:
        assert key.default == getattr(defaults, key.name), key.name
        assert key.help and "\n" not in key.help, key.name
        assert key.flag == "--" + key.name.replace("_", "-")
    # reload's rule is the table's, not a second list
    assert {k.name for k in config.KEYS if k.restart} == admin.RESTART_ONLY
    assert {"root", "run_dir", "fuse_max_tasks"} <= admin.RESTART_ONLY
    assert {"allow", "deny", "mount_timeout", "max_mounted"}.isdisjoint(admin.RESTART_ONLY)
    assert ctl.DEFAULT_CONFIG == config.DEFAULT_CONFIG_PATH


def test_a_field_without_a_table_entry_is_refused() -> None:
    """Adding a key any other way than key() fails at import, so nothing can drift."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Extended(Config):
        plain: int = 3

    original = config.Config
    try:
        config.Config = Extended  # type: ignore[misc]
        with pytest.raises(TypeError, match="plain is not declared with key"):
            config._table()
    finally:
        config.Config = original  # type: ignore[misc]


def _other_value(key: config.Key) -> tuple[list[str], Any]:
    """Command-line words for a value different from the default, and the value expected
    (for a bool key: the flag itself, --x or --no-x)."""
    if key.kind == "bool":
        return [], not key.default
    if key.choices:
        choice = next(c for c in key.choices if c != key.default)
        return [choice], choice
    samples: dict[str, tuple[list[str], Any]] = {
        "path": (["/srv/x"], Path("/srv/x")),
        "paths": (["/etc/hosts", "/etc/passwd"], (Path("/etc/hosts"), Path("/etc/passwd"))),
        "float": (["7.5"], 7.5),
        "int": (["9"], 9),
        "str": (["x"], "x"),
        "strings": (["a.cern.ch", "b.cern.ch"], ("a.cern.ch", "b.cern.ch")),
    }
    return samples[key.kind]


@pytest.mark.parametrize("position", ["after", "before"])
def test_every_key_has_a_flag(position: str) -> None:
    """Each flag reaches its key, before or after the command; list flags repeat."""
    p = cli.parser()
    for key in config.KEYS:
        words, expected = _other_value(key)
        argv = [w for word in words for w in (key.flag, word)]
        if key.kind == "bool":
            argv = ["--no-" + key.flag[2:] if key.default else key.flag]
        args = p.parse_args(["run", *argv] if position == "after" else [*argv, "check-config"])
        assert config.coerce(cli._overrides(args)) == {key.name: expected}, key.name
    # an empty value clears a list: the flag can take back what the file lists
    assert cli._overrides(p.parse_args(["run", "--deny="])) == {"deny": []}
    assert cli._overrides(p.parse_args(["run"])) == {}


def test_example_file_is_generated_from_the_table() -> None:
    text = EXAMPLE.read_text()
    assert text == config.example_text(), REGENERATE
    # Read independently of the generator: every key, each at its default ...
    values = tomllib.loads(text)
    assert list(values) == [f.name for f in fields(Config)]
    cfg = config.build({**values, "cvmfs2": "/bin/true"})
    for key in values:
        if key != "cvmfs2":
            assert getattr(cfg, key) == getattr(Config(), key), f"{key} is not the default"
    # ... and marked [restart] exactly when a reload refuses to change it.
    marked = {line.split("=")[0].strip(): "# [restart]" in line
              for line in text.splitlines() if line and not line.startswith("#")}
    assert marked == {name: name in admin.RESTART_ONLY for name in values}


def test_the_example_test_notices_a_missing_key() -> None:
    """The check above is not vacuous: the example without snapshot_dir differs from the
    table (the example once claimed every key and lacked exactly that one)."""
    lines = config.example_text().splitlines()
    without = "\n".join(line for line in lines if not line.startswith("snapshot_dir ="))
    assert set(tomllib.loads(without)) != {f.name for f in fields(Config)}


def test_readme_key_table_is_generated_from_the_table() -> None:
    text = README.read_text()
    assert config.replace_readme_table(text) == text, REGENERATE
    section = text.split(config.README_BEGIN)[1].split(config.README_END)[0]
    rows = [line.split("|")[1:-1] for line in section.strip().splitlines()[2:]]
    assert [r[0].strip().strip("`") for r in rows] == [f.name for f in fields(Config)]
    for row, key in zip(rows, config.KEYS, strict=True):
        assert tomllib.loads(f"v = {row[1].strip().strip('`')}")["v"] == (
            list(key.default) if key.is_list else
            str(key.default) if key.kind == "path" else key.default)
        assert row[2].strip() == ("restart" if key.restart else "yes")


# --- errors name their key --------------------------------------------------------------------
_WRONG = {"path": 5, "paths": "/etc/hosts", "float": "60", "int": 1.5, "bool": "yes",
          "str": 5, "strings": "*.cern.ch"}


@pytest.mark.parametrize("key", config.KEYS, ids=lambda k: k.name)
def test_a_wrong_type_names_its_key(key: config.Key) -> None:
    with pytest.raises(ConfigError) as exc:
        config.build({"cvmfs2": "/bin/true", key.name: _WRONG[key.kind]})
    assert str(exc.value).startswith(f"{key.name}: "), exc.value


@pytest.mark.parametrize(("values", "message"), [
    ({"cvmfs2_config": ["relative.conf"]},
     "cvmfs2_config[0]: must be an absolute path, got 'relative.conf'"),
    ({"cvmfs2_config": ["/etc/hosts", 3]}, "cvmfs2_config[1]: expected a path"),
    ({"allow": ["*", ""]}, "allow[1]: expected a non-empty string"),
    ({"deny": ["a/b"]}, "deny[0] 'a/b' contains '/'"),
    ({"probe_repositories": ["nodot"]}, "probe_repositories entry 'nodot'"),
    ({"contol_socket": "/x"}, "unknown configuration keys: contol_socket (did you mean "
                              "control_socket?)"),
    ({"attach_wait": 1.0}, "attach_wait (removed: what it bounded lasts about a millisecond; "
                           "such a request now waits at most mount_timeout + 5 s"),
    ({"log_level": "loud"}, "log_level: must be one of debug, info, warning, error"),
    ({"expire_min_age": 0.1}, "expire_min_age must be >= 0.2"),
    ({"max_mounted": -1}, "max_mounted must be >= 0"),
    ({"run_dir": "/cvmfs/run"}, "run_dir must lie outside root"),
])
def test_error_messages_name_the_right_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.build({"cvmfs2": "/bin/true", **values})
    assert message in str(exc.value)
    assert "root" not in str(exc.value).replace("outside root", "")


# --- the config repository on a node that allows only its own domain --------------------------
def test_osg_only_policy_is_valid() -> None:
    cfg = config.build({"allow": ["*.opensciencegrid.org"], "cvmfs2": "/bin/true"})
    assert cfg.policy.permits("oasis.opensciencegrid.org")
    assert cfg.policy.permits("cvmfs-config.cern.ch")  # cvmfs2 needs it to boot anything
    assert not cfg.policy.permits("atlas.cern.ch")
    # explicit: the node's own config repository, the default one no longer special
    osg = config.build({"allow": ["*.opensciencegrid.org"], "cvmfs2": "/bin/true",
                        "config_repository": "config-osg.opensciencegrid.org"})
    assert not osg.policy.permits("cvmfs-config.cern.ch")
    none = config.build({"allow": ["*.opensciencegrid.org"], "cvmfs2": "/bin/true",
                         "config_repository": ""})
    assert not none.policy.permits("cvmfs-config.cern.ch")
    # deny still wins, and then the error says which pattern and what to do
    with pytest.raises(ConfigError) as exc:
        config.build({"deny": ["*.cern.ch"], "cvmfs2": "/bin/true"})
    assert "config_repository 'cvmfs-config.cern.ch' is denied by deny pattern '*.cern.ch'" in (
        str(exc.value))
    assert "take it out of deny, or set config_repository" in str(exc.value)


def test_osg_only_node_just_works(start_daemon, env: Env) -> None:  # type: ignore[no-untyped-def]
    """allow = ["*.opensciencegrid.org"] alone, on a node whose cvmfs2 must read the
    (default) config repository under the root before it mounts anything."""
    root = env.tmp / "cvmfs"
    etc = env.tmp / "etc-cvmfs"
    (etc / "default.conf").write_text(
        env.client_config.read_text() + "CVMFS_CONFIG_REPOSITORY=cvmfs-config.cern.ch\n"
        f"CVMFS_CONFIG_REPO_REQUIRED=yes\nCVMFS_MOUNT_DIR={root}\n")
    # what a required config repository has (cvmfs2 checks for etc/cvmfs/domain.d)
    env.add_repo("cvmfs-config.cern.ch", {"etc/cvmfs/domain.d/cern.ch.conf": "",
                                          "etc/cvmfs/config.d/README": "config.d\n"},
                 revision=2)
    d = start_daemon(cvmfs2_config=[], allow=["*.opensciencegrid.org"])
    assert (d.path("oasis.opensciencegrid.org") / "README").read_text() == DEMO_FILES["README"]
    with pytest.raises(FileNotFoundError):
        os.stat(d.path("atlas.cern.ch"))
    assert sorted(env.boots()) == ["cvmfs-config.cern.ch", "oasis.opensciencegrid.org"]


# --- check-config -----------------------------------------------------------------------------
def test_check_config_prints_toml_that_reads_back(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('cvmfs2 = "/bin/true"\nallow = ["*.cern.ch", "x\\"y"]\n'
                        'cvmfs2_config = ["/etc/hosts"]\nmax_mounted = 5\n')
    # the option before the command, and after it: the same
    before = cvmfsd("-c", str(cfg_file), "--mount-timeout", "9", "check-config")
    after = cvmfsd("check-config", "-c", str(cfg_file), "--mount-timeout", "9")
    assert before.returncode == 0, before.stderr
    assert before.stdout == after.stdout
    out = before.stdout
    assert "PosixPath" not in out and "('" not in out
    values = tomllib.loads(out)  # pasteable: it is TOML
    assert list(values) == [f.name for f in fields(Config)]
    expected = config.load(cfg_file, {"mount_timeout": 9.0})
    assert config.build(values) == expected
    assert values["allow"] == ["*.cern.ch", 'x"y'] and values["mount_timeout"] == 9.0
    lines = {line.split(" =")[0]: line for line in out.splitlines() if " = " in line}
    assert lines["mount_timeout"].endswith("# from the flag --mount-timeout")
    assert lines["root"].endswith("# default")
    assert lines["max_mounted"] == "max_mounted = 5"  # from the file: no comment
    assert f"# Read {cfg_file}." in out


@pytest.mark.skipif(config.DEFAULT_CONFIG_PATH.exists(),
                    reason="this machine has a /etc/cvmfsd/cvmfsd.toml")
def test_check_config_without_the_default_file_says_no_file_was_read() -> None:
    out = cvmfsd("check-config", "--cvmfs2", "/bin/true")
    assert out.returncode == 0, out.stderr
    note = f"{config.DEFAULT_CONFIG_PATH} does not exist: no configuration file was read"
    assert note in out.stderr and note in out.stdout
    assert config.build(tomllib.loads(out.stdout)) == config.build({"cvmfs2": "/bin/true"})


def test_check_config_of_a_missing_named_file_fails(tmp_path: Path) -> None:
    out = cvmfsd("-c", str(tmp_path / "nope.toml"), "check-config")
    assert out.returncode == 2 and "does not exist" in out.stderr and out.stdout == ""


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(), st.integers(-2**63, 2**63 - 1), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.text(), max_size=4)))
def test_toml_values_read_back(value: Any) -> None:
    back = tomllib.loads(f"v = {config.toml_value(value)}\n")["v"]
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(back)
    else:
        assert back == value and type(back) is type(value)


# --- cvmfsctl -c ------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("run_dir = [\n", "cannot read"),
    ("run_dir = 5\n", "run_dir: expected a path, got 5"),
    ('control_socket = ["/x.sock"]\n', "control_socket: expected a string"),
    ('contrl_socket = "/x.sock"\n', "unknown configuration keys: contrl_socket"),
])
def test_cvmfsctl_never_ignores_a_bad_config_file(tmp_path: Path, content: str | None,
                                                  message: str) -> None:
    path = tmp_path / "cvmfsd.toml"
    if content is not None:
        path.write_text(content)
    env = {k: v for k, v in os.environ.items() if k != "CVMFSCTL_SOCKET"}
    out = subprocess.run([sys.executable, "-m", "cvmfsd.admin.ctl", "-c", str(path), "status"],
                         capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env)
    assert out.returncode == 1
    assert message in out.stderr and str(path) in out.stderr
    assert "is cvmfsd running" not in out.stderr  # no silent fall-back to the default socket


@pytest.mark.skipif(config.DEFAULT_CONFIG_PATH.exists(),
                    reason="this machine has a /etc/cvmfsd/cvmfsd.toml")
def test_cvmfsctl_default_file_may_be_missing_even_when_named(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The unit's ExecReload is `cvmfsctl --config /etc/cvmfsd/cvmfsd.toml reload`: on a node
    that runs on the defaults, that file does not exist, and cvmfsd itself accepts that."""
    monkeypatch.delenv("CVMFSCTL_SOCKET", raising=False)
    assert ctl.socket_path(None, config.DEFAULT_CONFIG_PATH) == ctl.DEFAULT_SOCKET
    assert ctl.socket_path(None, None) == ctl.DEFAULT_SOCKET
