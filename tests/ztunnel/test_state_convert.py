"""Protos (the generated classes) -> ztunnel's state model, and xDS batches."""

from __future__ import annotations

import enum
import ipaddress

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, empty_pb2

from tests.ztunnel.builders import UID, full_workload
from underpass.proto import authorization_pb2 as apb
from underpass.proto import workload_pb2 as wpb
from underpass.xds.client import DeltaClient, ResourcesReceived, ResponseRejected
from underpass.xds.node import build_node
from underpass.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WORKLOAD_TYPE_URLS
from ztunnel.errors import InvalidResource
from ztunnel.state import (
    Action,
    Address,
    ApplicationTunnelProtocol,
    AppProtocol,
    GatewayAddress,
    HealthPolicy,
    IPFamilies,
    LoadBalancingMode,
    LoadBalancingScope,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Port,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    WorkloadType,
    address_from_proto,
    authorization_from_proto,
    batch_from_xds,
    service_from_proto,
    workload_from_proto,
    xds_decoders,
)

pytestmark = pytest.mark.unit

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# -- enums mirror the protos ----------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "descriptor"),
    [
        (TunnelProtocol, wpb.DESCRIPTOR.enum_types_by_name["TunnelProtocol"]),
        (WorkloadStatus, wpb.DESCRIPTOR.enum_types_by_name["WorkloadStatus"]),
        (WorkloadType, wpb.DESCRIPTOR.enum_types_by_name["WorkloadType"]),
        (NetworkMode, wpb.DESCRIPTOR.enum_types_by_name["NetworkMode"]),
        (AppProtocol, wpb.DESCRIPTOR.enum_types_by_name["AppProtocol"]),
        (IPFamilies, wpb.DESCRIPTOR.enum_types_by_name["IPFamilies"]),
        (
            ApplicationTunnelProtocol,
            wpb.ApplicationTunnel.DESCRIPTOR.enum_types_by_name["Protocol"],
        ),
        (LoadBalancingScope, wpb.LoadBalancing.DESCRIPTOR.enum_types_by_name["Scope"]),
        (LoadBalancingMode, wpb.LoadBalancing.DESCRIPTOR.enum_types_by_name["Mode"]),
        (HealthPolicy, wpb.LoadBalancing.DESCRIPTOR.enum_types_by_name["HealthPolicy"]),
        (Scope, apb.DESCRIPTOR.enum_types_by_name["Scope"]),
        (Action, apb.DESCRIPTOR.enum_types_by_name["Action"]),
    ],
)
def test_enums_mirror_the_proto(ours: type[enum.IntEnum], descriptor: object) -> None:
    values = {v.name: v.number for v in descriptor.values}  # type: ignore[attr-defined]
    assert {m.name: m.value for m in ours} == values


# -- workloads ----------------------------------------------------------------------------


def test_workload_every_field() -> None:
    w = workload_from_proto(full_workload())
    assert w.uid == UID and w.name == "web-0" and w.namespace == "shop"
    assert w.addresses == (V4("10.244.1.5"), V6("fd00::5"))
    assert w.hostname == "web-0.shop" and w.network == "net1"
    assert w.tunnel_protocol is TunnelProtocol.HBONE
    assert (w.trust_domain, w.service_account) == ("example.org", "web")
    assert str(w.identity) == "spiffe://example.org/ns/shop/sa/web"
    assert w.waypoint == GatewayAddress(NamespacedHostname("shop", "wp.shop.svc"), 15008)
    assert w.network_gateway == GatewayAddress(NetworkAddress("net2", V4("172.30.0.1")), 15008)
    assert (w.node, w.canonical_name, w.canonical_revision) == ("node-1", "web", "v1")
    assert w.workload_type is WorkloadType.POD and w.workload_name == "web"
    assert w.native_tunnel is True
    assert w.application_tunnel is not None
    assert w.application_tunnel.protocol is ApplicationTunnelProtocol.PROXY
    assert w.application_tunnel.port == 15088
    assert dict(w.services) == {
        "shop/web.shop.svc.cluster.local": (Port(80, 8080, AppProtocol.HTTP11),)
    }
    assert w.authorization_policies == ("shop/allow",)
    assert w.status is WorkloadStatus.UNHEALTHY and not w.healthy
    assert w.cluster_id == "c1"
    assert w.locality is not None and (w.locality.region, w.locality.subzone) == ("r", "s")
    assert w.network_mode is NetworkMode.HOST_NETWORK


def test_workload_defaults() -> None:
    w = workload_from_proto(wpb.Workload(uid=UID, name="web-0", namespace="shop"))
    assert w.trust_domain == "cluster.local"
    assert w.service_account == "default"
    assert w.identity.uri == "spiffe://cluster.local/ns/shop/sa/default"
    assert w.waypoint is None and w.application_tunnel is None and w.locality is None
    assert w.status is WorkloadStatus.HEALTHY and w.tunnel_protocol is TunnelProtocol.NONE


def test_ipv4_mapped_addresses_are_stored_as_ipv4() -> None:
    w = workload_from_proto(
        wpb.Workload(uid=UID, name="a", namespace="b", addresses=[V6("::ffff:10.0.0.7").packed])
    )
    assert w.addresses == (V4("10.0.0.7"),)


def test_workload_services_are_read_only() -> None:
    w = workload_from_proto(full_workload())
    with pytest.raises(TypeError):
        w.services["x/y"] = ()  # type: ignore[index]


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda w: w.ClearField("uid"), "uid", "must be set"),
        (lambda w: setattr(w, "namespace", ""), "namespace", "must be set"),
        (lambda w: w.addresses.append(b"\x01\x02\x03"), "addresses[2]", "4 or 16 bytes"),
        (lambda w: setattr(w, "tunnel_protocol", 9), "tunnel_protocol", "unknown TunnelProtocol"),
        (lambda w: setattr(w, "status", 4), "status", "upgrade ztunnel"),
        (
            lambda w: w.services["shop/x"].ports.append(wpb.Port(service_port=70000)),
            "services['shop/x'].ports[0].service_port",
            "not a port number",
        ),
        (lambda w: w.waypoint.ClearField("hostname"), "waypoint", "neither hostname nor address"),
        (
            lambda w: setattr(w, "service_account", "Bad SA"),
            "trust_domain/namespace/service_account",
            "SPIFFE",
        ),
    ],
)
def test_invalid_workload_names_resource_and_field(mutate: object, field: str, words: str) -> None:
    message = full_workload()
    mutate(message)  # type: ignore[operator]
    with pytest.raises(InvalidResource) as info:
        workload_from_proto(message)
    assert info.value.field == field
    assert words in str(info.value)
    assert info.value.resource in (UID, "workload 'web-0'")


# -- services -------------------------------------------------------------------------------


def test_service_every_field() -> None:
    s = service_from_proto(
        wpb.Service(
            name="web",
            namespace="shop",
            hostname="web.shop.svc.cluster.local",
            addresses=[
                wpb.NetworkAddress(network="", address=V4("10.96.0.20").packed),
                wpb.NetworkAddress(network="n", address=V6("fd00::20").packed, length=128),
            ],
            ports=[wpb.Port(service_port=80, target_port=8080, app_protocol=wpb.TCP)],
            subject_alt_names=["spiffe://cluster.local/ns/shop/sa/web"],
            waypoint=wpb.GatewayAddress(
                address=wpb.NetworkAddress(address=V4("10.0.0.9").packed), hbone_mtls_port=15008
            ),
            load_balancing=wpb.LoadBalancing(
                routing_preference=[wpb.LoadBalancing.NODE, wpb.LoadBalancing.ZONE],
                mode=wpb.LoadBalancing.FAILOVER,
                health_policy=wpb.LoadBalancing.ALLOW_ALL,
            ),
            ip_families=wpb.DUAL,
        )
    )
    assert s.key == "shop/web.shop.svc.cluster.local"
    assert s.addresses == (
        NetworkAddress("", V4("10.96.0.20")),
        NetworkAddress("n", V6("fd00::20"), 128),
    )
    assert s.ports == (Port(80, 8080, AppProtocol.TCP),)
    assert s.subject_alt_names == ("spiffe://cluster.local/ns/shop/sa/web",)
    assert s.waypoint == GatewayAddress(NetworkAddress("", V4("10.0.0.9")), 15008)
    assert s.load_balancing is not None
    assert s.load_balancing.routing_preference == (LoadBalancingScope.NODE, LoadBalancingScope.ZONE)
    assert s.load_balancing.mode is LoadBalancingMode.FAILOVER
    assert s.health_policy is HealthPolicy.ALLOW_ALL
    assert s.ip_families is IPFamilies.DUAL


def test_invalid_service() -> None:
    message = wpb.Service(
        namespace="shop",
        hostname="web",
        ports=[wpb.Port(service_port=80), wpb.Port(service_port=80)],
    )
    with pytest.raises(InvalidResource, match=r"shop/web.*ports\[1\].*listed twice"):
        service_from_proto(message)
    with pytest.raises(InvalidResource, match=r"hostname.*must be set"):
        service_from_proto(wpb.Service(namespace="shop"))
    bad_lb = wpb.Service(
        namespace="shop",
        hostname="web",
        load_balancing=wpb.LoadBalancing(mode=17),  # type: ignore[arg-type]
    )
    with pytest.raises(InvalidResource, match=r"load_balancing\.mode.*LoadBalancingMode"):
        service_from_proto(bad_lb)


def test_address_oneof() -> None:
    assert isinstance(address_from_proto(wpb.Address(workload=full_workload())), Workload)
    service = wpb.Service(namespace="a", hostname="b")
    assert isinstance(address_from_proto(wpb.Address(service=service)), Service)
    with pytest.raises(InvalidResource, match="neither"):
        address_from_proto(wpb.Address())


# -- authorization ------------------------------------------------------------------------------


def every_field_match() -> apb.Match:
    return apb.Match(
        namespaces=[apb.StringMatch(exact="shop")],
        not_namespaces=[apb.StringMatch(prefix="kube-")],
        principals=[apb.StringMatch(suffix="/sa/frontend")],
        not_principals=[apb.StringMatch(presence=empty_pb2.Empty())],
        source_ips=[apb.Address(address=V4("10.1.2.3").packed, length=8)],
        not_source_ips=[apb.Address(address=V6("fd00::").packed, length=16)],
        destination_ips=[apb.Address(address=V4("10.244.1.5").packed, length=32)],
        not_destination_ips=[apb.Address(address=V4("10.244.1.6").packed, length=32)],
        destination_ports=[80, 443],
        not_destination_ports=[8080],
        service_accounts=[apb.ServiceAccountMatch(namespace="shop", serviceAccount="fe")],
        not_service_accounts=[apb.ServiceAccountMatch(namespace="evil", serviceAccount="x")],
    )


def test_authorization_every_field() -> None:
    p = authorization_from_proto(
        apb.Authorization(
            name="allow",
            namespace="shop",
            scope=apb.WORKLOAD_SELECTOR,
            action=apb.DENY,
            dry_run=True,
            rules=[apb.Rule(clauses=[apb.Clause(matches=[every_field_match()])])],
        )
    )
    assert p.key == "shop/allow"
    assert p.scope is Scope.WORKLOAD_SELECTOR and p.action is Action.DENY and p.dry_run
    assert p.problems == ()
    (rule,) = p.rules
    assert rule.problems == ()
    (m,) = rule.clauses[0].matches
    assert m.namespaces == (StringMatch.exact("shop"),)
    assert m.not_namespaces == (StringMatch.prefix("kube-"),)
    assert m.principals == (StringMatch.suffix("/sa/frontend"),)
    assert m.not_principals == (StringMatch.presence(),)
    assert m.source_ips == (Address.parse("10.0.0.0/8"),)  # host bits masked
    assert m.not_source_ips == (Address.parse("fd00::/16"),)
    assert m.destination_ips == (Address.parse("10.244.1.5"),)
    assert m.not_destination_ips == (Address.parse("10.244.1.6/32"),)
    assert m.destination_ports == (80, 443) and m.not_destination_ports == (8080,)
    assert m.service_accounts == (ServiceAccountMatch("shop", "fe"),)
    assert m.not_service_accounts == (ServiceAccountMatch("evil", "x"),)


def test_authorization_unknown_enums_become_problems() -> None:
    unknown = apb.Authorization(name="x", namespace="y", scope=7, action=5)  # type: ignore[arg-type]
    p = authorization_from_proto(unknown)
    assert p.scope is None and p.action is None
    assert p.problems == ("scope: unknown value 7", "action: unknown value 5")


def test_authorization_malformed_values_become_rule_problems() -> None:
    bad = apb.Match(
        principals=[apb.StringMatch(), apb.StringMatch(exact="ok")],
        source_ips=[apb.Address(address=b"\x01\x02\x03\x04\x05", length=8)],
        destination_ips=[apb.Address(address=V4("10.0.0.0").packed, length=33)],
        destination_ports=[0, 70000, 80],
        service_accounts=[apb.ServiceAccountMatch(namespace="ns")],
    )
    p = authorization_from_proto(
        apb.Authorization(
            name="x",
            namespace="y",
            rules=[
                apb.Rule(clauses=[apb.Clause(matches=[apb.Match(destination_ports=[1])])]),
                apb.Rule(clauses=[apb.Clause(matches=[bad])]),
            ],
        )
    )
    assert p.rules[0].problems == ()
    problems = p.rules[1].problems
    prefix = "rules[1].clauses[0].matches[0]."
    assert problems == (
        prefix + "principals[0]: the string match has no match type",
        prefix + "source_ips[0]: an address has 4 or 16 bytes, not 5",
        prefix + "destination_ips[0]: prefix length 33 is out of range for 10.0.0.0 (0..32)",
        prefix + "destination_ports[0]: 0 is not a port number (1..65535)",
        prefix + "destination_ports[1]: 70000 is not a port number (1..65535)",
        prefix + "service_accounts[0]: a service account match needs namespace and name",
    )
    # The usable values are kept; the rule as a whole fails closed in ztunnel.policy.
    (m,) = p.rules[1].clauses[0].matches
    assert m.principals == (StringMatch.exact("ok"),) and m.destination_ports == (80,)


def test_authorization_without_a_name_is_rejected() -> None:
    with pytest.raises(InvalidResource, match="name and a namespace"):
        authorization_from_proto(apb.Authorization(namespace="y"))


# -- xDS batches and decoders ---------------------------------------------------------------------


def test_batch_from_xds_addresses_and_policies() -> None:
    service = wpb.Service(namespace="shop", hostname="web")
    batch = batch_from_xds(
        ADDRESS_TYPE_URL,
        [(UID, wpb.Address(workload=full_workload())), ("shop/web", wpb.Address(service=service))],
        ["c1//Pod/shop/gone"],
    )
    assert [w.uid for w in batch.workloads] == [UID]
    assert [s.key for s in batch.services] == ["shop/web"]
    assert batch.removed_addresses == ("c1//Pod/shop/gone",)
    policies = batch_from_xds(
        AUTHORIZATION_TYPE_URL,
        [("shop/p", apb.Authorization(name="p", namespace="shop"))],
        ["shop/q"],
    )
    assert [p.key for p in policies.policies] == ["shop/p"]
    assert policies.removed_policies == ("shop/q",)


def test_batch_from_xds_checks_names() -> None:
    with pytest.raises(InvalidResource, match="named 'wrong' but its content is"):
        batch_from_xds(ADDRESS_TYPE_URL, [("wrong", wpb.Address(workload=full_workload()))], [])
    with pytest.raises(InvalidResource, match="named 'a/b' but its content is 'shop/p'"):
        batch_from_xds(
            AUTHORIZATION_TYPE_URL, [("a/b", apb.Authorization(name="p", namespace="shop"))], []
        )
    with pytest.raises(InvalidResource, match="does not use resources"):
        batch_from_xds("type.googleapis.com/other", [], [])


def _response(nonce: str, name: str, message: wpb.Address) -> discovery_pb2.DeltaDiscoveryResponse:
    packed = any_pb2.Any()
    packed.Pack(message)
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=ADDRESS_TYPE_URL,
        nonce=nonce,
        resources=[discovery_pb2.Resource(name=name, version="1", resource=packed)],
    )


def test_xds_decoders_nack_what_ztunnel_cannot_use() -> None:
    node = build_node(
        ip="10.0.0.9", pod="zt", namespace="istio-system", node_name="n1", cluster_id="c1"
    )
    client = DeltaClient(node, WORKLOAD_TYPE_URLS, decoders=xds_decoders())
    client.start_stream()
    bad = full_workload()
    bad.tunnel_protocol = 9  # type: ignore[assignment]
    event, reply = client.receive(_response("n1", UID, wpb.Address(workload=bad)))
    assert isinstance(event, ResponseRejected)
    assert "unknown TunnelProtocol value 9" in reply.error_detail.message
    event, reply = client.receive(_response("n2", UID, wpb.Address(workload=full_workload())))
    assert isinstance(event, ResourcesReceived) and not reply.HasField("error_detail")
    batch = batch_from_xds(event.type_url, [(r.name, r.message) for r in event.updated], [])
    assert batch.workloads[0].uid == UID
