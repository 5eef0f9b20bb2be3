"""Type stubs for Envoy's discovery messages, which ``xds-protos`` ships untyped.

The ``xds-protos`` package carries Envoy's generated ``envoy.service.discovery.v3``
modules but no ``.pyi`` files and no ``py.typed`` marker, so mypy would see every
``DeltaDiscoveryRequest`` as ``Any``. ``python -m underpass.xds.stubgen``
writes stubs under ``typings/`` (the ``mypy_path`` of pyproject.toml) for
``ads.proto`` and every file it imports (except ``google/protobuf``, which
types-protobuf covers): the descriptors embedded in the installed modules are
fed to grpcio-tools' protoc (``--descriptor_set_in``, ``--pyi_out``), and the
typed ``ads_pb2_grpc.pyi`` is rendered by :func:`underpass.protogen.render_grpc_stub`.
Nothing is copied from Envoy's sources: the stubs are derived from the
installed package, and ``tests/underpass/xds/test_stubs.py`` fails when they no
longer match it (an upgraded ``xds-protos``: rerun this module).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pb2

from underpass import protogen

STUB_DIR = protogen.REPO_ROOT / "typings"
ADS_PROTO = "envoy/service/discovery/v3/ads.proto"
# types-protobuf already types these.
_SKIP_PREFIX = "google/protobuf/"


def descriptor_closure() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """``ads.proto`` and everything it imports, in dependency order, from the installed modules."""
    from envoy.service.discovery.v3 import ads_pb2

    out: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def walk(fd: _descriptor.FileDescriptor) -> None:
        if fd.name in out:
            return
        for dep in fd.dependencies:
            walk(dep)
        out[fd.name] = descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb)

    walk(ads_pb2.DESCRIPTOR)
    return out


def render_stubs() -> dict[str, str]:
    """Relative stub path -> text, for every stub this module owns."""
    files = descriptor_closure()
    wanted = [name for name in files if not name.startswith(_SKIP_PREFIX)]
    fds = descriptor_pb2.FileDescriptorSet(file=list(files.values()))
    rendered: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="underpass-stubgen-") as tmp:
        descriptor_set = Path(tmp) / "set.pb"
        descriptor_set.write_bytes(fds.SerializeToString())
        out = Path(tmp) / "out"
        out.mkdir()
        protogen._protoc([f"--descriptor_set_in={descriptor_set}", f"--pyi_out={out}", *wanted])
        for path in sorted(out.rglob("*.pyi")):
            rendered[path.relative_to(out).as_posix()] = path.read_text()
    grpc_stub = ADS_PROTO.removesuffix(".proto") + "_pb2_grpc.pyi"
    rendered[grpc_stub] = protogen.render_grpc_stub(ADS_PROTO, files)
    return rendered


def write_stubs(root: Path = STUB_DIR) -> list[Path]:
    """Write the stubs under ``root``; returns the paths written."""
    written = []
    for rel, text in render_stubs().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m underpass.xds.stubgen",
        description="Write typed stubs for the installed xds-protos discovery modules.",
    )
    parser.add_argument("--root", type=Path, default=STUB_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        written = write_stubs(args.root)
    except protogen.ProtocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
