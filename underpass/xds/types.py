"""Type URLs, resource names and the message class of each resource type.

Workload discovery (PROTOCOLS.md section 3) has two resource types on one
Delta ADS stream:

- :data:`ADDRESS_TYPE_URL` (``istio.workload.Address``): a Workload, named by
  its uid ``<cluster>//Pod/<namespace>/<name>``, or a Service, named
  ``<namespace>/<hostname>``;
- :data:`AUTHORIZATION_TYPE_URL` (``istio.security.Authorization``), named
  ``<namespace>/<name>``.

The names are built here, and only here, for the server and the client alike.
"""

from __future__ import annotations

from typing import Final

from google.protobuf.message import Message

from underpass.proto import authorization_pb2, workload_pb2

TYPE_URL_PREFIX: Final = "type.googleapis.com/"
ADDRESS_TYPE_URL: Final = TYPE_URL_PREFIX + "istio.workload.Address"
AUTHORIZATION_TYPE_URL: Final = TYPE_URL_PREFIX + "istio.security.Authorization"
#: The resource types of workload discovery, in the order a client subscribes.
WORKLOAD_TYPE_URLS: Final = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)

#: Subscribing to this name asks for every resource of the type.
WILDCARD: Final = "*"

ADS_SERVICE: Final = "envoy.service.discovery.v3.AggregatedDiscoveryService"
DELTA_METHOD: Final = "DeltaAggregatedResources"
DELTA_METHOD_PATH: Final = f"/{ADS_SERVICE}/{DELTA_METHOD}"

#: Message class of each resource type we speak.
MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    ADDRESS_TYPE_URL: workload_pb2.Address,
    AUTHORIZATION_TYPE_URL: authorization_pb2.Authorization,
}


def type_url_of(message: Message) -> str:
    """``type.googleapis.com/<full message name>``."""
    return TYPE_URL_PREFIX + message.DESCRIPTOR.full_name


def workload_uid(cluster: str, namespace: str, name: str, kind: str = "Pod") -> str:
    """A workload's uid and resource name: ``<cluster>//<kind>/<namespace>/<name>``."""
    return f"{cluster}//{kind}/{namespace}/{name}"


def parse_workload_uid(uid: str) -> tuple[str, str, str, str]:
    """``(cluster, kind, namespace, name)`` of a workload uid; ValueError if malformed."""
    cluster, sep, rest = uid.partition("//")
    parts = rest.split("/")
    if not sep or len(parts) != 3 or not all(parts):
        raise ValueError(f"{uid!r} is not a workload uid <cluster>//<kind>/<namespace>/<name>")
    return cluster, parts[0], parts[1], parts[2]


def service_resource_name(namespace: str, hostname: str) -> str:
    """A service's resource name (and key in ``Workload.services``): ``<namespace>/<hostname>``."""
    return f"{namespace}/{hostname}"


def authorization_resource_name(namespace: str, name: str) -> str:
    """An authorization policy's resource name: ``<namespace>/<name>``."""
    return f"{namespace}/{name}"


def address_resource_name(address: workload_pb2.Address) -> str:
    """The resource name of an Address: the workload's uid or the service's ``ns/hostname``."""
    kind = address.WhichOneof("type")
    if kind == "workload":
        return address.workload.uid
    if kind == "service":
        return service_resource_name(address.service.namespace, address.service.hostname)
    raise ValueError("an Address holds neither a workload nor a service")


__all__ = [
    "ADDRESS_TYPE_URL",
    "ADS_SERVICE",
    "AUTHORIZATION_TYPE_URL",
    "DELTA_METHOD",
    "DELTA_METHOD_PATH",
    "MESSAGE_TYPES",
    "TYPE_URL_PREFIX",
    "WILDCARD",
    "WORKLOAD_TYPE_URLS",
    "address_resource_name",
    "authorization_resource_name",
    "parse_workload_uid",
    "service_resource_name",
    "type_url_of",
    "workload_uid",
]
