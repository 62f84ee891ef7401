"""The vendored csi.proto is CSI spec v1.12.0's protocol (the descriptor csi-sanity v5.5.0 was built
with), and the committed stubs are exactly what grpcio-tools generates from it."""

from __future__ import annotations

import hashlib
import lzma
import re
from importlib import metadata
from pathlib import Path

import pytest

from csi.proto import csi_pb2, from_descriptor, generate

PROTO_DIR = Path(generate.__file__).resolve().parent
RENDERED_SHA256 = "828864879482d5c3df15f563624d7a82784f25556d91c957e56d59eece5131a0"
SANITY_XZ = (
    PROTO_DIR.parents[1].parent / "shared" / "csi-sanity" / "csi-sanity-v5.5.0-linux-amd64.xz"
)


def test_proto_is_the_vendored_file() -> None:
    data = (PROTO_DIR / "csi.proto").read_bytes()
    assert hashlib.sha256(data).hexdigest() == RENDERED_SHA256
    assert RENDERED_SHA256 in (PROTO_DIR / "README.md").read_text()
    assert b"package csi.v1;" in data
    assert "Apache License" in (PROTO_DIR / "LICENSE").read_text()


def test_proto_is_the_descriptor_csi_sanity_was_built_with() -> None:
    """Compiling csi.proto gives, field for field, the descriptor inside csi-sanity v5.5.0."""
    pytest.importorskip("grpc_tools")
    if not SANITY_XZ.exists():
        pytest.skip(f"{SANITY_XZ} is not there (the shared/ directory beside the repository)")
    upstream = from_descriptor.extract(lzma.decompress(SANITY_XZ.read_bytes()))
    ours = from_descriptor.descriptor_of(PROTO_DIR / "csi.proto")
    assert from_descriptor.normalised(ours) == from_descriptor.normalised(upstream)
    # and rendering it again gives the committed file byte for byte
    assert from_descriptor.render(upstream) == (PROTO_DIR / "csi.proto").read_text()


def test_access_modes_and_node_capabilities_have_names() -> None:
    """Modes and capabilities of spec 1.5+ print by name (they were bare numbers with v1.0)."""
    mode = csi_pb2.VolumeCapability.AccessMode.Mode
    assert mode.Name(6) == "SINGLE_NODE_SINGLE_WRITER"
    assert mode.Name(7) == "SINGLE_NODE_MULTI_WRITER"
    rpc = csi_pb2.NodeServiceCapability.RPC.Type
    assert rpc.Value("VOLUME_CONDITION") == 4
    assert "volume_condition" in csi_pb2.NodeGetVolumeStatsResponse.DESCRIPTOR.fields_by_name


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
    want = {"Identity", "Controller", "GroupController", "SnapshotMetadata", "Node"}
    assert set(services) == want
    assert "NodePublishVolume" in services["Node"].methods_by_name
    field = csi_pb2.NodePublishVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert field.GetOptions().Extensions[csi_pb2.csi_secret] is True
