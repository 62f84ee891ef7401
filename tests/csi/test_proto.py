"""The vendored csi.proto is the upstream file, untouched, and the committed stubs are exactly what
grpcio-tools generates from it."""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path

import pytest

from csi.proto import csi_pb2, generate

PROTO_DIR = Path(generate.__file__).resolve().parent
UPSTREAM_SHA256 = "6e1f48c5ff2cd68e53e2107faf72ec87627bc36145bbea4d882370c49605910b"


def test_proto_is_the_vendored_upstream_file() -> None:
    data = (PROTO_DIR / "csi.proto").read_bytes()
    assert hashlib.sha256(data).hexdigest() == UPSTREAM_SHA256
    assert UPSTREAM_SHA256 in (PROTO_DIR / "README.md").read_text()
    assert b"package csi.v1;" in data
    assert "Apache License" in (PROTO_DIR / "LICENSE").read_text()


VERSION_LINE = re.compile(
    r"(?m)^.*(GRPC_GENERATED_VERSION =|Protobuf Python Version:|^\s+\d+,$).*$"
)


def test_committed_stubs_match_regeneration(tmp_path: Path) -> None:
    """Byte for byte with the grpcio-tools the stubs were made with; with another version, equal
    apart from the lines that carry version numbers (regenerate and commit to make it exact)."""
    tools = pytest.importorskip("grpc_tools")
    del tools
    generated = generate.generate(tmp_path)
    assert [p.name for p in generated] == ["csi_pb2.py", "csi_pb2_grpc.py"]
    made_with = re.search(
        r"GRPC_GENERATED_VERSION = '([^']+)'", (PROTO_DIR / "csi_pb2_grpc.py").read_text()
    )
    same_tools = made_with is not None and made_with.group(1) == metadata.version("grpcio-tools")
    for path in generated:
        committed = (PROTO_DIR / path.name).read_text()
        fresh = path.read_text()
        if not same_tools:
            committed, fresh = VERSION_LINE.sub("", committed), VERSION_LINE.sub("", fresh)
        assert fresh == committed, (
            f"{path.name} differs from grpcio-tools output: run python -m csi.proto.generate"
        )


def test_services_and_secret_option() -> None:
    services = csi_pb2.DESCRIPTOR.services_by_name
    assert set(services) == {"Identity", "Controller", "Node"}
    assert "NodePublishVolume" in services["Node"].methods_by_name
    field = csi_pb2.NodePublishVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert field.GetOptions().Extensions[csi_pb2.csi_secret] is True
