"""Rebuild csi.proto from the CSI descriptor compiled into a Go program (e.g. csi-sanity).

    python -m csi.proto.from_descriptor BINARY [--out csi/proto/csi.proto]

The upstream csi.proto is generated from the spec's spec.md and is not in any registry this project
may use, but every Go program built with the spec's Go bindings (lib/go/csi) carries the complete
FileDescriptorProto of csi.proto (protoc-gen-go's raw descriptor). csi-sanity v5.5.0 is built with
CSI spec v1.12.0, so its descriptor is the spec's own protocol. This tool finds that descriptor in
the binary and prints it as .proto text: every message, field, enum, oneof, map, service, option
and custom option (csi_secret, alpha_*) - everything protoc puts in a descriptor. Comments are not
in a descriptor and so are not reproduced. `descriptor_of()` compiles a .proto back into a
descriptor, so a test can check that the rendered file is the same protocol, field for field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2 as d

# The start of csi.proto's serialized FileDescriptorProto: name "csi.proto", package "csi.v1".
MARKER = b"\n\tcsi.proto\x12\x06csi.v1"
# FileDescriptorProto's fields are 1..14; anything else ends the embedded message.
_FILE_FIELDS = range(1, 15)

HEADER = (
    "// The CSI protocol, csi.v1, as compiled into csi-sanity v5.5.0 (CSI spec v1.12.0):",
    "// rendered from that descriptor by csi/proto/from_descriptor.py. The upstream file's",
    "// comments are not part of a descriptor; read them in the spec. Do not edit: regenerate",
    "// it as csi/proto/README.md says.",
)

F = d.FieldDescriptorProto
_SCALARS = {
    F.TYPE_DOUBLE: "double",
    F.TYPE_FLOAT: "float",
    F.TYPE_INT64: "int64",
    F.TYPE_UINT64: "uint64",
    F.TYPE_INT32: "int32",
    F.TYPE_FIXED64: "fixed64",
    F.TYPE_FIXED32: "fixed32",
    F.TYPE_BOOL: "bool",
    F.TYPE_STRING: "string",
    F.TYPE_BYTES: "bytes",
    F.TYPE_UINT32: "uint32",
    F.TYPE_SFIXED32: "sfixed32",
    F.TYPE_SFIXED64: "sfixed64",
    F.TYPE_SINT32: "sint32",
    F.TYPE_SINT64: "sint64",
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def extract(binary: bytes) -> d.FileDescriptorProto:
    """The csi.proto descriptor embedded in a Go binary (ValueError when there is none)."""
    start = binary.find(MARKER)
    if start < 0:
        raise ValueError("no csi.proto descriptor in this file")
    pos = start
    # Walk top-level fields until one cannot belong to a FileDescriptorProto: that is its end.
    while pos < len(binary):
        key, nxt = _varint(binary, pos)
        number, wire = key >> 3, key & 7
        if number not in _FILE_FIELDS or wire not in (0, 2):
            break
        value, nxt = _varint(binary, nxt)
        pos = nxt + (value if wire == 2 else 0)
    desc = d.FileDescriptorProto()
    desc.ParseFromString(binary[start:pos])
    return desc


class _Renderer:
    def __init__(self, desc: d.FileDescriptorProto) -> None:
        self.desc = desc
        self.lines: list[str] = []
        # custom options by (options message, field number)
        self.custom: dict[tuple[str, int], str] = {
            (ext.extendee.rsplit(".", 1)[-1], ext.number): ext.name for ext in desc.extension
        }

    def out(self, depth: int, text: str = "") -> None:
        self.lines.append(("  " * depth + text) if text else "")

    def options(self, msg: object, kind: str) -> list[str]:
        """Options set in an options message as `name = value` strings (custom ones too)."""
        assert hasattr(msg, "SerializeToString")
        data = msg.SerializeToString()
        out: list[str] = []
        pos = 0
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire != 0:
                raise ValueError(f"{kind}: option {number} is not a scalar")
            value, pos = _varint(data, pos)
            flag = "true" if value else "false"
            if kind == "MessageOptions" and number == 7:
                continue  # map_entry: rendered as a map<> field
            if number == 3:
                out.append(f"deprecated = {flag}")
            elif (kind, number) in self.custom:
                out.append(f"({self.custom[(kind, number)]}) = {flag}")
            else:
                raise ValueError(f"{kind}: option {number} is not known to this renderer")
        return out

    def type_name(self, field: d.FieldDescriptorProto, scope: str) -> str:
        if field.type in _SCALARS:
            return _SCALARS[field.type]
        name = field.type_name
        prefix = f".{self.desc.package}."
        # Nested types are named relative to the enclosing message when they live inside it.
        if name.startswith(scope + "."):
            return name[len(scope) + 1 :]
        return name[len(prefix) :] if name.startswith(prefix) else name

    def render(self) -> str:
        desc = self.desc
        for line in HEADER:
            self.out(0, line)
        self.out(0, f'syntax = "{desc.syntax or "proto2"}";')
        self.out(0, f"package {desc.package};")
        self.out(0)
        for dep in desc.dependency:
            self.out(0, f'import "{dep}";')
        self.out(0)
        if desc.options.go_package:
            self.out(0, f'option go_package = "{desc.options.go_package}";')
            self.out(0)
        extendees: dict[str, list[d.FieldDescriptorProto]] = {}
        for ext in desc.extension:
            extendees.setdefault(ext.extendee, []).append(ext)
        for extendee, exts in extendees.items():
            self.out(0, f"extend {extendee.lstrip('.')} {{")
            for ext in exts:
                self.out(1, f"{_SCALARS[ext.type]} {ext.name} = {ext.number};")
            self.out(0, "}")
        for service in desc.service:
            self.out(0)
            self.out(0, f"service {service.name} {{")
            for opt in self.options(service.options, "ServiceOptions"):
                self.out(1, f"option {opt};")
            for method in service.method:
                inp = method.input_type.rsplit(".", 1)[-1]
                outp = method.output_type.rsplit(".", 1)[-1]
                inp = ("stream " if method.client_streaming else "") + inp
                outp = ("stream " if method.server_streaming else "") + outp
                opts = self.options(method.options, "MethodOptions")
                head = f"rpc {method.name}({inp}) returns ({outp})"
                if not opts:
                    self.out(1, head + " {}")
                else:
                    self.out(1, head + " {")
                    for opt in opts:
                        self.out(2, f"option {opt};")
                    self.out(1, "}")
            self.out(0, "}")
        for enum in desc.enum_type:
            self.out(0)
            self.enum(enum, 0)
        for message in desc.message_type:
            self.out(0)
            self.message(message, 0, f".{desc.package}")
        return "\n".join(self.lines).rstrip("\n") + "\n"

    def enum(self, enum: d.EnumDescriptorProto, depth: int) -> None:
        self.out(depth, f"enum {enum.name} {{")
        for opt in self.options(enum.options, "EnumOptions"):
            self.out(depth + 1, f"option {opt};")
        for value in enum.value:
            opts = self.options(value.options, "EnumValueOptions")
            suffix = f" [{', '.join(opts)}]" if opts else ""
            self.out(depth + 1, f"{value.name} = {value.number}{suffix};")
        self.out(depth, "}")

    def field(
        self, field: d.FieldDescriptorProto, depth: int, scope: str, maps: dict[str, str]
    ) -> None:
        opts = self.options(field.options, "FieldOptions")
        suffix = f" [{', '.join(opts)}]" if opts else ""
        if field.type_name in maps:
            typ = maps[field.type_name]
        else:
            typ = self.type_name(field, scope)
            if field.label == F.LABEL_REPEATED:
                typ = "repeated " + typ
            elif field.proto3_optional:
                typ = "optional " + typ
        self.out(depth, f"{typ} {field.name} = {field.number}{suffix};")

    def message(self, message: d.DescriptorProto, depth: int, parent: str) -> None:
        scope = f"{parent}.{message.name}"
        self.out(depth, f"message {message.name} {{")
        for opt in self.options(message.options, "MessageOptions"):
            self.out(depth + 1, f"option {opt};")
        maps: dict[str, str] = {}
        for nested in message.nested_type:
            if nested.options.map_entry:
                key, value = nested.field[0], nested.field[1]
                maps[f"{scope}.{nested.name}"] = (
                    f"map<{self.type_name(key, scope)}, {self.type_name(value, scope)}>"
                )
        for enum in message.enum_type:
            self.enum(enum, depth + 1)
        for nested in message.nested_type:
            if not nested.options.map_entry:
                self.message(nested, depth + 1, scope)
        # real oneofs (not the synthetic ones of proto3 `optional`), in declaration order
        real_oneofs = {
            i
            for i, _ in enumerate(message.oneof_decl)
            if not any(f.proto3_optional and f.oneof_index == i for f in message.field)
        }
        done: set[int] = set()
        for field in message.field:
            if field.HasField("oneof_index") and field.oneof_index in real_oneofs:
                index = field.oneof_index
                if index in done:
                    continue
                done.add(index)
                self.out(depth + 1, f"oneof {message.oneof_decl[index].name} {{")
                for member in message.field:
                    if member.HasField("oneof_index") and member.oneof_index == index:
                        self.field(member, depth + 2, scope, maps)
                self.out(depth + 1, "}")
            else:
                self.field(field, depth + 1, scope, maps)
        for reserved in message.reserved_range:
            end = reserved.end - 1
            self.out(
                depth + 1,
                f"reserved {reserved.start}" + (f" to {end};" if end > reserved.start else ";"),
            )
        for name in message.reserved_name:
            self.out(depth + 1, f'reserved "{name}";')
        self.out(depth, "}")


def render(desc: d.FileDescriptorProto) -> str:
    return _Renderer(desc).render()


def descriptor_of(proto: Path) -> d.FileDescriptorProto:
    """Compile a .proto with grpcio-tools into its FileDescriptorProto (no source info)."""
    import tempfile
    from importlib import resources

    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={proto.parent}",
                f"--proto_path={well_known}",
                f"--descriptor_set_out={out}",
                proto.name,
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit status {rc}")
        fds = d.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    desc = fds.file[-1]
    desc.name = "csi.proto"
    return desc


def normalised(desc: d.FileDescriptorProto) -> d.FileDescriptorProto:
    """A copy without what differs only by how it was compiled (source info, json names)."""
    copy = d.FileDescriptorProto()
    copy.CopyFrom(desc)
    copy.ClearField("source_code_info")

    def strip(message: d.DescriptorProto) -> None:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            strip(nested)

    for message in copy.message_type:
        strip(message)
    for ext in copy.extension:
        ext.ClearField("json_name")
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary", type=Path, help="a Go program built with the CSI Go bindings")
    parser.add_argument("--out", type=Path, help="write the .proto here (default: stdout)")
    args = parser.parse_args(argv)
    text = render(extract(args.binary.read_bytes()))
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
