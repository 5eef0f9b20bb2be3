"""The sans-IO Delta ADS client (what ztunnel runs), names, node and stubs."""

from __future__ import annotations

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from tests.underpass.xds.helpers import NODE, A, Pair, Z, snapshot, workload
from underpass.proto import workload_pb2
from underpass.xds import stubgen
from underpass.xds.client import (
    NACK_CODE,
    DeltaClient,
    ResourcesReceived,
    ResponseRejected,
)
from underpass.xds.errors import ResourceRejected
from underpass.xds.node import NodeInfo, build_node, ztunnel_node_id
from underpass.xds.server import DeltaServerStream
from underpass.xds.types import (
    WORKLOAD_TYPE_URLS,
    address_resource_name,
    authorization_resource_name,
    parse_workload_uid,
    service_resource_name,
    type_url_of,
    workload_uid,
)

pytestmark = pytest.mark.unit


def response(
    *resources: discovery_pb2.Resource, removed: tuple[str, ...] = (), type_url: str = A
) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url, nonce="n1", resources=resources, removed_resources=removed
    )


def resource(name: str, content: str = "x", type_url: str = A) -> discovery_pb2.Resource:
    payload = workload(name, content).SerializeToString()
    return discovery_pb2.Resource(
        name=name, version="v-" + content, resource=any_pb2.Any(type_url=type_url, value=payload)
    )


def test_first_stream_requests_are_wildcard_with_the_node_once() -> None:
    client = DeltaClient(NODE, WORKLOAD_TYPE_URLS)
    first, second = client.start_stream()
    assert first.node == NODE and not second.HasField("node")
    assert (first.type_url, second.type_url) == (A, Z)
    assert list(first.resource_names_subscribe) == []  # legacy wildcard
    assert dict(first.initial_resource_versions) == {}
    assert not client.in_sync()


def test_an_accepted_response_is_acked_and_remembered() -> None:
    client = DeltaClient(NODE, [A])
    client.start_stream()
    event, ack = client.receive(response(resource("a"), resource("b")))
    assert isinstance(event, ResourcesReceived) and event.first
    assert [r.name for r in event.updated] == ["a", "b"]
    assert isinstance(event.updated[0].message, workload_pb2.Address)
    assert ack == discovery_pb2.DeltaDiscoveryRequest(type_url=A, response_nonce="n1")
    assert client.versions(A) == {"a": "v-x", "b": "v-x"}
    assert client.in_sync()
    event, _ = client.receive(response(removed=("a",)))
    assert isinstance(event, ResourcesReceived) and not event.first and event.removed == ("a",)
    assert client.versions(A) == {"b": "v-x"}


def test_reconnect_sends_the_versions_held() -> None:
    client = DeltaClient(NODE, [A])
    client.start_stream()
    client.receive(response(resource("a")))
    client.stream_ended()
    [again] = client.start_stream()
    assert dict(again.initial_resource_versions) == {"a": "v-x"}
    assert again.node == NODE


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (response(resource("a"), type_url="type.googleapis.com/other"), "not subscribed"),
        (response(resource("a"), resource("a")), "twice"),
        (response(resource("")), "no name"),
        (response(resource("a", type_url=Z)), "not a"),
        (response(resource("a"), removed=("a",)), "both updated and removed"),
        (
            response(
                discovery_pb2.Resource(
                    name="a", resource=any_pb2.Any(type_url=A, value=b"\xff\xff")
                )
            ),
            "does not decode",
        ),
        (response(discovery_pb2.Resource(name="a")), "no payload"),
    ],
)
def test_bad_responses_are_nacked_and_change_nothing(
    bad: discovery_pb2.DeltaDiscoveryResponse, message: str
) -> None:
    client = DeltaClient(NODE, [A])
    client.start_stream()
    client.receive(response(resource("keep")))
    event, nack = client.receive(bad)
    assert isinstance(event, ResponseRejected) and message in event.error
    assert nack.error_detail.code == NACK_CODE and message in nack.error_detail.message
    assert nack.response_nonce == bad.nonce
    assert client.versions(A) == {"keep": "v-x"}


def test_a_decoder_may_reject_content() -> None:
    def strict(data: bytes) -> workload_pb2.Address:
        address = workload_pb2.Address.FromString(data)
        if address.workload.name == "evil":
            raise ResourceRejected("evil workload")
        return address

    client = DeltaClient(NODE, [A], decoders={A: strict})
    client.start_stream()
    event, nack = client.receive(response(resource("a", "evil")))
    assert isinstance(event, ResponseRejected) and "evil workload" in event.error
    assert nack.HasField("error_detail")


def test_subscribe_and_unsubscribe_requests() -> None:
    client = DeltaClient(NODE, [A])
    assert client.subscribe(A, ["early"]) is None  # not streaming: goes in the first request
    [first] = client.start_stream()
    assert list(first.resource_names_subscribe) == ["*", "early"]
    req = client.subscribe(A, ["x", "early"])
    assert req is not None and list(req.resource_names_subscribe) == ["x"]
    assert client.subscribe(A, ["x"]) is None  # nothing new
    client.receive(response(resource("x"), resource("other")))
    req = client.unsubscribe(A, ["*"])
    assert req is not None and list(req.resource_names_unsubscribe) == ["*"]
    assert client.versions(A) == {"x": "v-x"}  # only the explicitly wanted remain


def test_non_wildcard_client_with_no_names_asks_for_nothing() -> None:
    client = DeltaClient(NODE, [A], wildcard=False)
    assert client.start_stream() == []
    client = DeltaClient(NODE, [A], wildcard=False, names={A: ["b", "a"]})
    [first] = client.start_stream()
    assert list(first.resource_names_subscribe) == ["a", "b"]


def test_unknown_type_needs_a_decoder() -> None:
    with pytest.raises(ValueError, match="no decoder"):
        DeltaClient(NODE, ["type.googleapis.com/unknown"])


def test_client_and_server_in_memory() -> None:
    s1 = snapshot({"a": "1"}, {"ns/p": "1"})
    pair = Pair()
    pair.connect(s1)
    assert pair.client.in_sync(A) and pair.client.in_sync(Z)
    assert all(isinstance(e, ResourcesReceived) and e.first for e in pair.events)
    pair.client.stream_ended()
    s2 = snapshot({"a": "2"}, {"ns/p": "1"}, after=s1)
    pair.connect(s2)
    updates = [e for e in pair.events[2:] if isinstance(e, ResourcesReceived)]
    assert [[r.name for r in e.updated] for e in updates] == [["a"], []]
    assert isinstance(pair.server, DeltaServerStream)


# -- names and node ----------------------------------------------------------------


def test_resource_names() -> None:
    uid = workload_uid("Kubernetes", "demo", "sleep-1")
    assert uid == "Kubernetes//Pod/demo/sleep-1"
    assert parse_workload_uid(uid) == ("Kubernetes", "Pod", "demo", "sleep-1")
    with pytest.raises(ValueError):
        parse_workload_uid("demo/sleep")
    assert service_resource_name("demo", "a.demo.svc.cluster.local") == (
        "demo/a.demo.svc.cluster.local"
    )
    assert authorization_resource_name("demo", "p") == "demo/p"
    svc = workload_pb2.Address(service=workload_pb2.Service(namespace="d", hostname="h"))
    assert address_resource_name(svc) == "d/h"
    assert address_resource_name(workload("u", "x")) == "u"
    with pytest.raises(ValueError):
        address_resource_name(workload_pb2.Address())
    assert type_url_of(svc) == A


def test_node_id_and_metadata_round_trip() -> None:
    node = build_node(
        ip="10.0.0.9",
        pod="ztunnel-abc",
        namespace="istio-system",
        node_name="node-1",
        cluster_id="Kubernetes",
        instance_ips=["10.0.0.9", "fd00::9"],
    )
    assert node.id == ztunnel_node_id("10.0.0.9", "ztunnel-abc", "istio-system")
    assert node.id == "ztunnel~10.0.0.9~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    info = NodeInfo.from_node(node)
    assert (info.proxy_type, info.ip, info.pod_name, info.pod_namespace) == (
        "ztunnel",
        "10.0.0.9",
        "ztunnel-abc",
        "istio-system",
    )
    assert info.node_name == "node-1" and info.cluster_id == "Kubernetes"
    assert info.instance_ips == ("10.0.0.9", "fd00::9")
    assert set(info.metadata) == {"NAME", "NAMESPACE", "INSTANCE_IPS", "NODE_NAME", "CLUSTER_ID"}


def test_node_info_is_lenient() -> None:
    info = NodeInfo.from_node(discovery_pb2.DeltaDiscoveryRequest().node.__class__(id="odd"))
    assert info.id == "odd" and info.pod_name == "" and info.instance_ips == ()


def test_committed_envoy_stubs_match_the_installed_xds_protos() -> None:
    rendered = stubgen.render_stubs()
    assert "envoy/service/discovery/v3/discovery_pb2.pyi" in rendered
    for rel, text in rendered.items():
        path = stubgen.STUB_DIR / rel
        assert path.is_file(), f"{path} is missing: run python -m underpass.xds.stubgen"
        assert path.read_text() == text, f"{path} is stale: run python -m underpass.xds.stubgen"
