"""Prepared resources: serialised once per content, versioned by content hash.

A control plane sends the same resource to many clients. :class:`PreparedResource`
holds it as the wire bytes of an Envoy ``Resource`` (name, version, ``Any``),
built once; :func:`encode_delta_response` then writes a ``DeltaDiscoveryResponse``
by concatenating those bytes after the response's other fields, which is
exactly how protobuf encodes a repeated message field, so nothing is copied
or re-serialised per client. The version is a hash of the deterministic
serialisation: equal content has equal versions across restarts and across
control-plane replicas, which is what makes ``initial_resource_versions``
useful after a reconnect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from underpass.xds.types import type_url_of

# Field 2 (resources) of DeltaDiscoveryResponse, length-delimited: (2 << 3) | 2.
_RESOURCES_TAG = b"\x12"


def content_version(payload: bytes) -> str:
    """The version of a resource: 16 hex digits of BLAKE2b over its serialisation."""
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True, slots=True)
class PreparedResource:
    """One resource ready to send: its name, version and serialised Envoy ``Resource``."""

    name: str
    version: str
    wire: bytes

    @classmethod
    def prepare(cls, name: str, message: Message, type_url: str | None = None) -> PreparedResource:
        payload = message.SerializeToString(deterministic=True)
        version = content_version(payload)
        resource = discovery_pb2.Resource(
            name=name,
            version=version,
            resource=any_pb2.Any(type_url=type_url or type_url_of(message), value=payload),
        )
        return cls(name, version, resource.SerializeToString(deterministic=True))

    def to_message(self) -> discovery_pb2.Resource:
        return discovery_pb2.Resource.FromString(self.wire)


def encode_delta_response(
    *,
    type_url: str,
    nonce: str,
    system_version_info: str,
    resources: Iterable[PreparedResource],
    removed: Iterable[str],
) -> bytes:
    """A serialised ``DeltaDiscoveryResponse`` (the gRPC message body)."""
    head = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=system_version_info,
        type_url=type_url,
        nonce=nonce,
        removed_resources=list(removed),
    ).SerializeToString()
    parts = [head]
    for resource in resources:
        parts += (_RESOURCES_TAG, _varint(len(resource.wire)), resource.wire)
    return b"".join(parts)


__all__ = ["PreparedResource", "content_version", "encode_delta_response"]
