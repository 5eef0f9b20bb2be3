"""In-memory helpers for the xDS core tests: snapshots from plain dicts, a client/server pair."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.service.discovery.v3 import discovery_pb2

from underpass.proto import authorization_pb2, workload_pb2
from underpass.xds.client import ClientEvent, DeltaClient, ResourcesReceived
from underpass.xds.node import build_node
from underpass.xds.server import DeltaResponse, DeltaServerStream, Snapshot, StreamEvent
from underpass.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WORKLOAD_TYPE_URLS
from underpass.xds.wire import PreparedResource

A = ADDRESS_TYPE_URL
Z = AUTHORIZATION_TYPE_URL
NODE = build_node(
    ip="10.0.0.9", pod="ztunnel-x", namespace="istio-system", node_name="n1", cluster_id="c1"
)


def workload(name: str, content: str) -> workload_pb2.Address:
    return workload_pb2.Address(workload=workload_pb2.Workload(uid=name, name=content))


def policy(name: str, content: str) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(name=content, namespace="ns")


def resources(
    addresses: Mapping[str, str] | None = None, policies: Mapping[str, str] | None = None
) -> dict[str, dict[str, PreparedResource]]:
    out: dict[str, dict[str, PreparedResource]] = {}
    if addresses is not None:
        out[A] = {n: PreparedResource.prepare(n, workload(n, c)) for n, c in addresses.items()}
    if policies is not None:
        out[Z] = {n: PreparedResource.prepare(n, policy(n, c)) for n, c in policies.items()}
    return out


def snapshot(
    addresses: Mapping[str, str] | None = None,
    policies: Mapping[str, str] | None = None,
    *,
    after: Snapshot | None = None,
) -> Snapshot:
    """A snapshot; with ``after``, its successor (carrying the change set)."""
    content = resources(addresses, policies)
    if after is not None:
        return after.successor(content)
    return Snapshot(1, content)


def request(
    type_url: str = A,
    *,
    subscribe: tuple[str, ...] = (),
    unsubscribe: tuple[str, ...] = (),
    nonce: str = "",
    error: str | None = None,
    initial: Mapping[str, str] | None = None,
    node: bool = False,
) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=subscribe,
        resource_names_unsubscribe=unsubscribe,
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if node:
        req.node.CopyFrom(NODE)
    if error is not None:
        req.error_detail.code = 3
        req.error_detail.message = error
    return req


def names_of(response: DeltaResponse) -> list[str]:
    return [r.name for r in response.resources]


class Pair:
    """A DeltaClient wired to a DeltaServerStream in memory, ACKing as a real client does."""

    def __init__(self, client: DeltaClient | None = None) -> None:
        self.client = client or DeltaClient(NODE, WORKLOAD_TYPE_URLS)
        self.server = DeltaServerStream(nonce_prefix="n")
        self.events: list[ClientEvent] = []
        self.server_events: list[StreamEvent] = []
        self.held: dict[str, dict[str, str]] = {t: {} for t in self.client.type_urls}

    def connect(self, snapshot: Snapshot | None) -> None:
        self.server = DeltaServerStream(nonce_prefix="n")
        for req in self.client.start_stream():
            self.send(req, snapshot)

    def send(self, req: discovery_pb2.DeltaDiscoveryRequest, snapshot: Snapshot | None) -> None:
        self.server_events += self.server.receive(req)
        if snapshot is not None:
            self.deliver(self.server.responses(snapshot), snapshot)

    def deliver(self, responses: list[DeltaResponse], snapshot: Snapshot | None) -> None:
        for response in responses:
            event, answer = self.client.receive(
                discovery_pb2.DeltaDiscoveryResponse.FromString(response.encode())
            )
            self.events.append(event)
            if isinstance(event, ResourcesReceived):
                held = self.held[event.type_url]
                for r in event.updated:
                    held[r.name] = r.version
                for name in event.removed:
                    held.pop(name, None)
            self.send(answer, snapshot)

    def push(self, snapshot: Snapshot) -> None:
        self.deliver(self.server.responses(snapshot), snapshot)
