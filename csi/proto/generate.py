"""Generate csi_pb2.py and csi_pb2_grpc.py from the vendored csi.proto with grpcio-tools.

    python -m csi.proto.generate            # rewrite the committed stubs in csi/proto/
    python -m csi.proto.generate --out DIR  # write DIR/csi/proto/csi_pb2*.py (used by the test)

The proto is compiled as ``csi/proto/csi.proto`` relative to the repository root, so the generated
gRPC module imports ``from csi.proto import csi_pb2`` and works inside the package. The output
depends on the grpcio-tools version (it is written into the stubs); tests/csi/test_proto.py
regenerates into a temporary directory and compares, so regenerate whenever grpcio-tools is
upgraded.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("csi/proto/csi.proto")
OUTPUTS = ("csi_pb2.py", "csi_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto into out_dir/csi/proto/ and return the generated files."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    target = out_dir / PROTO.parent
    target.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc}")
    return [target / name for name in OUTPUTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
