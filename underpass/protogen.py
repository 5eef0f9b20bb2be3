"""Generate the committed protobuf / gRPC Python modules from the ``.proto`` files.

``python -m underpass.protogen`` (``make proto``) compiles every ``.proto`` under
:data:`PROTO_DIRS` with grpcio-tools' bundled protoc, from the repository root
(``-I .``), so that a file ``identity/proto/ca.proto`` becomes the module
``identity.proto.ca_pb2`` and generated imports are package-qualified. Next to
each ``.proto`` it writes ``<name>_pb2.py`` and ``<name>_pb2.pyi``, plus
``<name>_pb2_grpc.py`` when the file declares a service. grpcio-tools leaves that
module unannotated, so a typed ``<name>_pb2_grpc.pyi`` is rendered here from the
descriptor (stubs, servicer base classes, ``add_*_to_server``), against the
grpc-stubs types; mypy strict then checks every caller of the generated code.

The same compilation helpers are used by ``tests/underpass/test_generated_protos.py``
to check that the committed modules still match their ``.proto`` sources.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2

# Directories (relative to the repository root) whose .proto files we own.
# underpass/proto may not exist yet; it is picked up as soon as it does.
PROTO_DIRS = ("identity/proto", "underpass/proto")

REPO_ROOT = Path(__file__).resolve().parent.parent


class ProtocError(RuntimeError):
    """protoc refused a .proto file (its diagnostics are on stderr)."""


def well_known_include() -> Path:
    """The directory holding ``google/protobuf/*.proto``, shipped with grpcio-tools."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def find_protos(root: Path = REPO_ROOT, dirs: Sequence[str] = PROTO_DIRS) -> list[Path]:
    """Every ``.proto`` under ``dirs``, as paths relative to ``root``, sorted."""
    found: list[Path] = []
    for d in dirs:
        base = root / d
        if base.is_dir():
            found.extend(p.relative_to(root) for p in base.rglob("*.proto"))
    return sorted(found)


def _protoc(args: Sequence[str]) -> None:
    # Imported here: grpc_tools is a development dependency, not a runtime one.
    from grpc_tools import protoc  # type: ignore[import-untyped]

    code = protoc.main(["grpc_tools.protoc", *args])
    if code != 0:
        raise ProtocError(f"protoc failed (exit {code}) for: {' '.join(args)}")


def compile_descriptors(
    protos: Sequence[Path], root: Path = REPO_ROOT, *, include_imports: bool = False
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Compile ``protos`` (relative to ``root``) to descriptors, keyed by file name.

    No source info is included, which is exactly what the generated ``_pb2``
    modules embed in ``DESCRIPTOR.serialized_pb``; imported files (such as
    ``google/protobuf/struct.proto``) only with ``include_imports``.
    """
    if not protos:
        return {}
    with tempfile.TemporaryDirectory(prefix="underpass-protoc-") as tmp:
        out = Path(tmp) / "descriptors.pb"
        _protoc(
            [
                f"-I{root}",
                f"-I{well_known_include()}",
                f"--descriptor_set_out={out}",
                *(["--include_imports"] if include_imports else []),
                *(str(p) for p in protos),
            ]
        )
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: f for f in fds.file}


def _default_json_name(field_name: str) -> str:
    """protoc's default JSON name: drop underscores, upper-case the letter after one."""
    out: list[str] = []
    upper = False
    for ch in field_name:
        if ch == "_":
            upper = True
        else:
            out.append(ch.upper() if upper else ch)
            upper = False
    return "".join(out)


def comparable(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """A copy of ``fd`` without what protoc's Python generator drops when embedding it.

    The generated ``_pb2`` embeds the descriptor without source info and without
    ``json_name`` when it is the default one; anything else must match exactly.
    """
    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(fd)
    out.ClearField("source_code_info")

    def strip(fields: Iterable[descriptor_pb2.FieldDescriptorProto]) -> None:
        for f in fields:
            if f.HasField("json_name") and f.json_name == _default_json_name(f.name):
                f.ClearField("json_name")

    def walk(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            strip(m.field)
            strip(m.extension)
            walk(m.nested_type)

    strip(out.extension)
    walk(out.message_type)
    return out


def module_name(proto_file: str) -> str:
    """The Python module protoc generates for a .proto path (``a/b/c.proto`` -> ``a.b.c_pb2``)."""
    return proto_file.removesuffix(".proto").replace("/", ".").replace("-", "_") + "_pb2"


def _message_index(
    files: dict[str, descriptor_pb2.FileDescriptorProto],
) -> dict[str, tuple[str, str]]:
    """Fully-qualified message name (``.pkg.Msg``) -> (module, class path in the module)."""
    index: dict[str, tuple[str, str]] = {}

    def walk(
        module: str, prefix: str, qual: str, messages: Sequence[descriptor_pb2.DescriptorProto]
    ) -> None:
        for m in messages:
            index[f"{prefix}.{m.name}"] = (module, f"{qual}{m.name}")
            walk(module, f"{prefix}.{m.name}", f"{qual}{m.name}.", m.nested_type)

    for f in files.values():
        walk(module_name(f.name), f".{f.package}" if f.package else "", "", f.message_type)
    return index


# (client streaming, server streaming) -> grpc multi-callable kind.
_GRPC_KINDS = {
    (False, False): "UnaryUnary",
    (False, True): "UnaryStream",
    (True, False): "StreamUnary",
    (True, True): "StreamStream",
}


def render_grpc_stub(proto_file: str, files: dict[str, descriptor_pb2.FileDescriptorProto]) -> str:
    """The typed ``_pb2_grpc.pyi`` for ``proto_file`` (``files`` must include its imports)."""
    fd = files[proto_file]
    index = _message_index(files)
    aliases: dict[str, str] = {}

    def typename(fq: str) -> str:
        try:
            module, qual = index[fq]
        except KeyError:
            raise ProtocError(f"{proto_file}: unknown message type {fq}") from None
        alias = aliases.setdefault(module, "_" + module.replace(".", "_dot_"))
        return f"{alias}.{qual}"

    body: list[str] = []
    for svc in fd.service:
        methods = []
        for m in svc.method:
            req, resp = typename(m.input_type), typename(m.output_type)
            callable_kind = _GRPC_KINDS[(m.client_streaming, m.server_streaming)]
            req_t = f"typing.Iterator[{req}]" if m.client_streaming else req
            resp_t = f"typing.Iterator[{resp}]" if m.server_streaming else resp
            methods.append((m.name, req, resp, callable_kind, req_t, resp_t))
        body += ["", "", f"class {svc.name}Stub:"]
        body.append("    def __init__(self, channel: grpc.Channel) -> None: ...")
        for name, req, resp, callable_kind, _, _ in methods:
            body.append(f"    {name}: grpc.{callable_kind}MultiCallable[{req}, {resp}]")
        body += ["", "", f"class {svc.name}Servicer:"]
        if not methods:
            body.append("    pass")
        for name, _, _, _, req_t, resp_t in methods:
            body.append(
                f"    def {name}(self, request: {req_t}, context: grpc.ServicerContext)"
                f" -> {resp_t}: ..."
            )
        body += [
            "",
            "",
            f"def add_{svc.name}Servicer_to_server(",
            f"    servicer: {svc.name}Servicer, server: grpc.Server",
            ") -> None: ...",
        ]
    header = [
        f"# Type stub for the gRPC module generated from {proto_file}.",
        "# Written by underpass.protogen (make proto). DO NOT EDIT.",
        "import typing",
        "",
        "import grpc",
        "",
    ]
    for module, alias in sorted(aliases.items()):
        package, _, name = module.rpartition(".")
        header.append(
            f"from {package} import {name} as {alias}" if package else f"import {name} as {alias}"
        )
    return "\n".join(header + body) + "\n"


def generate(protos: Sequence[Path], root: Path = REPO_ROOT) -> list[Path]:
    """Write the ``_pb2``/``_pb2.pyi``/``_pb2_grpc`` modules next to each proto.

    Returns the files written (relative to ``root``).
    """
    descriptors = compile_descriptors(protos, root, include_imports=True)
    written: list[Path] = []
    with_services = [p for p in protos if descriptors[p.as_posix()].service]
    common = [f"-I{root}", f"-I{well_known_include()}"]
    _protoc([*common, f"--python_out={root}", f"--pyi_out={root}", *map(str, protos)])
    if with_services:
        _protoc([*common, f"--grpc_python_out={root}", *map(str, with_services)])
    for proto in protos:
        stem = proto.with_suffix("")
        written += [stem.with_name(stem.name + "_pb2.py"), stem.with_name(stem.name + "_pb2.pyi")]
        if proto in with_services:
            stub = stem.with_name(stem.name + "_pb2_grpc.pyi")
            (root / stub).write_text(render_grpc_stub(proto.as_posix(), descriptors))
            written += [stem.with_name(stem.name + "_pb2_grpc.py"), stub]
        # The generated modules are imported as packages (identity.proto.ca_pb2).
        init = root / proto.parent / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf modules (see underpass.protogen)."""\n')
            written.append(init.relative_to(root))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m underpass.protogen",
        description="Regenerate the committed protobuf/gRPC modules from the .proto files under "
        + ", ".join(PROTO_DIRS)
        + ".",
    )
    parser.add_argument(
        "--root", type=Path, default=REPO_ROOT, help="repository root (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    protos = find_protos(root)
    if not protos:
        print(f"no .proto files under {', '.join(PROTO_DIRS)} in {root}", file=sys.stderr)
        return 1
    try:
        written = generate(protos, root)
    except ProtocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
