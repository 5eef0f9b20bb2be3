"""The committed generated protobuf modules match their ``.proto`` sources.

Each ``.proto`` in the repository is compiled to a descriptor with grpcio-tools'
protoc and compared with the descriptor embedded in the committed ``_pb2``
module (``DESCRIPTOR.serialized_pb``). Comparing descriptors rather than the
generated text keeps the check independent of the protoc version; editing a
``.proto`` without ``make proto`` fails here.
"""

from __future__ import annotations

import ast
import importlib
import shutil
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format

from underpass import protogen

pytestmark = pytest.mark.unit

ROOT = protogen.REPO_ROOT
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", "__pycache__"}


def repository_protos() -> list[Path]:
    """Every .proto of the repository (relative), wherever it is."""
    found = []
    for path in ROOT.rglob("*.proto"):
        rel = path.relative_to(ROOT)
        if not any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            found.append(rel)
    return sorted(found)


PROTOS = repository_protos()


def embedded_descriptor(proto: Path) -> descriptor_pb2.FileDescriptorProto:
    module = importlib.import_module(protogen.module_name(proto.as_posix()))
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def drift(
    compiled: descriptor_pb2.FileDescriptorProto, embedded: descriptor_pb2.FileDescriptorProto
) -> str | None:
    """None if equal, else both descriptors as text for the failure message."""
    a, b = protogen.comparable(compiled), protogen.comparable(embedded)
    if a == b:
        return None
    return (
        f"--- compiled from the .proto\n{text_format.MessageToString(a)}"
        f"--- embedded in the committed module\n{text_format.MessageToString(b)}"
    )


def test_the_repository_has_protos_and_protogen_finds_them_all() -> None:
    assert Path("identity/proto/ca.proto") in PROTOS
    # `make proto` must regenerate every .proto, so none may live elsewhere.
    assert protogen.find_protos(ROOT) == PROTOS


@pytest.mark.parametrize("proto", PROTOS, ids=str)
def test_committed_module_matches_proto(proto: Path) -> None:
    pb2 = ROOT / proto.with_name(proto.stem + "_pb2.py")
    assert pb2.is_file(), f"{pb2} is missing: run `make proto`"
    compiled = protogen.compile_descriptors([proto])[proto.as_posix()]
    difference = drift(compiled, embedded_descriptor(proto))
    assert difference is None, f"{proto} changed without regenerating: run `make proto`\n" + (
        difference or ""
    )


@pytest.mark.parametrize("proto", PROTOS, ids=str)
def test_grpc_module_and_typed_stub_are_current(proto: Path) -> None:
    files = protogen.compile_descriptors([proto], include_imports=True)
    grpc_py = ROOT / proto.with_name(proto.stem + "_pb2_grpc.py")
    grpc_pyi = ROOT / proto.with_name(proto.stem + "_pb2_grpc.pyi")
    if not files[proto.as_posix()].service:
        assert not grpc_pyi.exists(), f"{grpc_pyi} is stale: {proto} has no service"
        return
    assert grpc_py.is_file(), f"{grpc_py} is missing: run `make proto`"
    for service in files[proto.as_posix()].service:
        text = grpc_py.read_text()
        for method in service.method:
            full = f"/{files[proto.as_posix()].package}.{service.name}/{method.name}"
            assert full in text, f"{grpc_py} lacks {full}: run `make proto`"
    assert grpc_pyi.read_text() == protogen.render_grpc_stub(proto.as_posix(), files), (
        f"{grpc_pyi} is out of date: run `make proto`"
    )


def test_an_edited_proto_is_detected(tmp_path: Path) -> None:
    """The check above can fail: a field added to a copy of ca.proto is seen."""
    proto = Path("identity/proto/ca.proto")
    copy = tmp_path / proto
    copy.parent.mkdir(parents=True)
    shutil.copy(ROOT / proto, copy)
    embedded = embedded_descriptor(proto)

    unchanged = protogen.compile_descriptors([proto], tmp_path)[proto.as_posix()]
    assert drift(unchanged, embedded) is None

    text = copy.read_text()
    edited = text.replace(
        "repeated string cert_chain = 1;", "repeated string cert_chain = 1;\n  string note = 2;"
    )
    assert edited != text
    copy.write_text(edited)
    changed = protogen.compile_descriptors([proto], tmp_path)[proto.as_posix()]
    difference = drift(changed, embedded)
    assert difference is not None and "note" in difference

    # A renumbered field is a wire change too.
    copy.write_text(text.replace("int64 validity_duration = 3;", "int64 validity_duration = 2;"))
    renumbered = protogen.compile_descriptors([proto], tmp_path)[proto.as_posix()]
    assert drift(renumbered, embedded) is not None


def test_default_json_names_follow_protoc() -> None:
    assert protogen._default_json_name("cert_chain") == "certChain"
    assert protogen._default_json_name("validity_duration") == "validityDuration"
    assert protogen._default_json_name("csr") == "csr"


def test_generated_request_round_trips_with_istio_field_numbers() -> None:
    from identity.proto import ca_pb2

    request = ca_pb2.IstioCertificateRequest(csr="x", validity_duration=60)
    request.metadata.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"})
    fields = {f.name: f.number for f in ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields}
    assert fields == {"csr": 1, "validity_duration": 3, "metadata": 4}
    again = ca_pb2.IstioCertificateRequest.FromString(request.SerializeToString())
    assert again == request
    assert ca_pb2.DESCRIPTOR.package == "istio.v1.auth"


def test_protogen_generates_modules_and_typed_stubs(tmp_path: Path) -> None:
    """Streaming kinds, nested and imported messages, and the package __init__."""
    proto = Path("pkg/proto/svc.proto")
    (tmp_path / proto.parent).mkdir(parents=True)
    (tmp_path / proto).write_text(
        'syntax = "proto3";\n'
        "package t.v1;\n"
        'import "google/protobuf/empty.proto";\n'
        "message Outer { message Inner { string x = 1; } Inner inner = 1; }\n"
        "service S {\n"
        "  rpc A(Outer) returns (Outer.Inner);\n"
        "  rpc B(stream Outer) returns (stream google.protobuf.Empty);\n"
        "  rpc C(Outer) returns (stream Outer);\n"
        "  rpc D(stream Outer) returns (Outer);\n"
        "}\n"
    )
    written = protogen.generate([proto], tmp_path)
    names = {p.name for p in written}
    assert names == {
        "svc_pb2.py",
        "svc_pb2.pyi",
        "svc_pb2_grpc.py",
        "svc_pb2_grpc.pyi",
        "__init__.py",
    }
    assert all((tmp_path / p).is_file() for p in written)
    stub = (tmp_path / "pkg/proto/svc_pb2_grpc.pyi").read_text()
    ast.parse(stub)
    mod, empty = "_pkg_dot_proto_dot_svc_pb2", "_google_dot_protobuf_dot_empty_pb2"
    assert f"from pkg.proto import svc_pb2 as {mod}" in stub
    assert f"from google.protobuf import empty_pb2 as {empty}" in stub
    assert f"A: grpc.UnaryUnaryMultiCallable[{mod}.Outer, {mod}.Outer.Inner]" in stub
    assert f"B: grpc.StreamStreamMultiCallable[{mod}.Outer, {empty}.Empty]" in stub
    assert f"C: grpc.UnaryStreamMultiCallable[{mod}.Outer, {mod}.Outer]" in stub
    assert f"D: grpc.StreamUnaryMultiCallable[{mod}.Outer, {mod}.Outer]" in stub
    assert f"def B(self, request: typing.Iterator[{mod}.Outer]" in stub
    assert "def add_SServicer_to_server(" in stub
    # A proto without a service gets no gRPC module.
    plain = Path("pkg/proto/plain.proto")
    (tmp_path / plain).write_text('syntax = "proto3";\npackage t.v1;\nmessage P { int32 a = 1; }\n')
    assert {p.name for p in protogen.generate([plain], tmp_path)} == {
        "plain_pb2.py",
        "plain_pb2.pyi",
    }


def test_protoc_errors_are_reported(tmp_path: Path) -> None:
    bad = Path("bad.proto")
    (tmp_path / bad).write_text('syntax = "proto3";\nmessage { }\n')
    with pytest.raises(protogen.ProtocError):
        protogen.compile_descriptors([bad], tmp_path)
