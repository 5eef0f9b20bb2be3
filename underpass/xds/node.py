"""The xDS client's node: its id and metadata (PROTOCOLS.md section 3).

ztunnel identifies itself in the first request of a stream with the node id
``ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`` and string
metadata ``NAME``, ``NAMESPACE``, ``INSTANCE_IPS`` (comma-separated),
``NODE_NAME`` and ``CLUSTER_ID``. :class:`NodeInfo` reads that from a request
(leniently: what it cannot parse stays empty, for logs) and builds it for the
client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

METADATA_KEYS: Final = ("NAME", "NAMESPACE", "INSTANCE_IPS", "NODE_NAME", "CLUSTER_ID")


def ztunnel_node_id(ip: str, pod: str, namespace: str, domain: str = "cluster.local") -> str:
    """``ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>``."""
    return f"ztunnel~{ip}~{pod}.{namespace}~{namespace}.svc.{domain}"


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a client says about itself; fields it did not send are empty."""

    id: str
    proxy_type: str = ""
    ip: str = ""
    pod_name: str = ""
    pod_namespace: str = ""
    node_name: str = ""
    cluster_id: str = ""
    instance_ips: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_node(cls, node: base_pb2.Node) -> NodeInfo:
        metadata: dict[str, str] = {}
        for key, value in node.metadata.fields.items():
            kind = value.WhichOneof("kind")
            if kind == "string_value":
                metadata[key] = value.string_value
            elif kind == "number_value":
                metadata[key] = format(value.number_value, "g")
            elif kind == "bool_value":
                metadata[key] = str(value.bool_value).lower()
        proxy_type = ip = pod = namespace = ""
        parts = node.id.split("~")
        if len(parts) == 4:
            proxy_type, ip, pod_ns, _domain = parts
            pod, _, namespace = pod_ns.partition(".")
        ips = tuple(i.strip() for i in metadata.get("INSTANCE_IPS", "").split(",") if i.strip())
        return cls(
            id=node.id,
            proxy_type=proxy_type,
            ip=ip,
            pod_name=metadata.get("NAME", pod),
            pod_namespace=metadata.get("NAMESPACE", namespace),
            node_name=metadata.get("NODE_NAME", ""),
            cluster_id=metadata.get("CLUSTER_ID", ""),
            instance_ips=ips or ((ip,) if ip else ()),
            metadata=metadata,
        )

    def log_fields(self) -> dict[str, object]:
        """The fields worth a log line (no metadata dump)."""
        return {
            "node_id": self.id,
            "pod": f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else "",
            "node_name": self.node_name,
            "cluster_id": self.cluster_id,
            "instance_ips": list(self.instance_ips),
        }


def build_node(
    *,
    ip: str,
    pod: str,
    namespace: str,
    node_name: str,
    cluster_id: str,
    instance_ips: Sequence[str] = (),
    domain: str = "cluster.local",
    proxy_type: str = "ztunnel",
) -> base_pb2.Node:
    """The Node a ztunnel sends in its first request."""
    node_id = ztunnel_node_id(ip, pod, namespace, domain)
    if proxy_type != "ztunnel":
        node_id = proxy_type + node_id.removeprefix("ztunnel")
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "NAME": pod,
            "NAMESPACE": namespace,
            "INSTANCE_IPS": ",".join(instance_ips or (ip,)),
            "NODE_NAME": node_name,
            "CLUSTER_ID": cluster_id,
        }
    )
    return base_pb2.Node(id=node_id, cluster=cluster_id, metadata=metadata)


__all__ = ["METADATA_KEYS", "NodeInfo", "build_node", "ztunnel_node_id"]
