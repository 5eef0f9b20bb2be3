"""ztunnel.routing.plan_outbound: where a pod's outbound connection goes (unit)."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address

import pytest

from identity.spiffe import SpiffeId
from underpass.hbone.headers import SocketAddress
from ztunnel.inpod import INBOUND_HBONE_PORT, LOOP_GUARD_PORTS
from ztunnel.routing import Passthrough, Refused, ViaHbone, plan_outbound
from ztunnel.state import (
    Batch,
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    Snapshot,
    StateStore,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    first_endpoint,
)

from .builders import service, workload

pytestmark = pytest.mark.unit

ECHO = "shop/echo.shop.svc.cluster.local"
ECHO_VIP = "10.96.0.10"
WAYPOINT_HOST = "waypoint.shop.svc.cluster.local"
WAYPOINT_KEY = f"shop/{WAYPOINT_HOST}"


def hbone(w: Workload, **changes: object) -> Workload:
    return dataclasses.replace(w, tunnel_protocol=TunnelProtocol.HBONE, **changes)  # type: ignore[arg-type]


def echo_pod(name: str, ip: str, *, healthy: bool = True, sa: str = "echo") -> Workload:
    return hbone(
        workload(name, "shop", ips=[ip], sa=sa, services={ECHO: [(80, 8080)]}, healthy=healthy)
    )


def echo_service(**changes: object) -> Service:
    svc = service(
        "echo.shop.svc.cluster.local", "shop", vips=[ECHO_VIP], ports=[(80, 8080), (9000, 9000)]
    )
    return dataclasses.replace(svc, **changes)  # type: ignore[arg-type]


def waypoint_pod(ip: str = "10.244.3.9") -> Workload:
    return hbone(
        workload("waypoint-0", "shop", ips=[ip], sa="waypoint", services={WAYPOINT_KEY: []})
    )


def waypoint_service(**changes: object) -> Service:
    svc = service(WAYPOINT_HOST, "shop", vips=["10.96.0.99"], ports=[(15008, 15008)])
    return dataclasses.replace(svc, **changes)  # type: ignore[arg-type]


def snapshot_of(*items: Workload | Service) -> Snapshot:
    store = StateStore(choose=first_endpoint)
    store.claim_writer("test").apply(
        Batch(
            workloads=tuple(i for i in items if isinstance(i, Workload)),
            services=tuple(i for i in items if isinstance(i, Service)),
        )
    )
    return store.snapshot


def to(ip: str, port: int) -> SocketAddress:
    return SocketAddress.of(ip, port)


# -- workloads -------------------------------------------------------------------------------


def test_workload_ip_goes_over_hbone_to_its_15008_with_the_real_target_as_authority() -> None:
    pod = echo_pod("echo-0", "10.244.2.5")
    route = plan_outbound(snapshot_of(pod, echo_service()), to("10.244.2.5", 9000))
    assert route == ViaHbone(
        address=to("10.244.2.5", INBOUND_HBONE_PORT),
        identities=frozenset({SpiffeId("cluster.local", "shop", "echo")}),
        authority=to("10.244.2.5", 9000),
        workload=pod,
        service=None,
        waypoint=False,
    )


def test_workload_ip_keeps_any_port_the_pod_asked_for() -> None:
    pod = echo_pod("echo-0", "10.244.2.5")
    route = plan_outbound(snapshot_of(pod), to("10.244.2.5", 31337))
    assert isinstance(route, ViaHbone)
    assert route.authority == to("10.244.2.5", 31337)


def test_unknown_destination_is_passthrough_unchanged() -> None:
    destination = to("192.0.2.7", 443)
    route = plan_outbound(snapshot_of(echo_pod("echo-0", "10.244.2.5")), destination)
    assert route == Passthrough(destination, None, None)


def test_workload_without_hbone_is_passthrough_to_its_ip() -> None:
    legacy = workload("legacy-0", "shop", ips=["10.244.2.8"])
    assert legacy.tunnel_protocol is TunnelProtocol.NONE
    route = plan_outbound(snapshot_of(legacy), to("10.244.2.8", 5432))
    assert route == Passthrough(to("10.244.2.8", 5432), legacy, None)


# -- services --------------------------------------------------------------------------------


def test_service_vip_picks_an_endpoint_and_maps_the_service_port_to_the_target_port() -> None:
    pod = echo_pod("echo-0", "10.244.2.5")
    svc = echo_service()
    route = plan_outbound(snapshot_of(pod, svc), to(ECHO_VIP, 80))
    assert route == ViaHbone(
        address=to("10.244.2.5", INBOUND_HBONE_PORT),
        identities=frozenset({pod.identity}),
        authority=to("10.244.2.5", 8080),
        workload=pod,
        service=svc,
        waypoint=False,
    )


def test_service_vip_skips_unhealthy_endpoints() -> None:
    sick = echo_pod("echo-0", "10.244.2.5", healthy=False)
    well = echo_pod("echo-1", "10.244.2.6")
    route = plan_outbound(snapshot_of(sick, well, echo_service()), to(ECHO_VIP, 80))
    assert isinstance(route, ViaHbone)
    assert route.workload == well
    assert route.address == to("10.244.2.6", INBOUND_HBONE_PORT)


def test_service_without_a_healthy_endpoint_is_refused_not_passed_through() -> None:
    svc = echo_service()
    route = plan_outbound(
        snapshot_of(echo_pod("echo-0", "10.244.2.5", healthy=False), svc), to(ECHO_VIP, 80)
    )
    assert isinstance(route, Refused)
    assert route.service == svc
    assert "no healthy endpoint" in route.reason


def test_service_port_the_service_does_not_have_is_refused() -> None:
    route = plan_outbound(
        snapshot_of(echo_pod("echo-0", "10.244.2.5"), echo_service()), to(ECHO_VIP, 81)
    )
    assert isinstance(route, Refused)
    assert "port 81" in route.reason


def test_service_vip_to_a_workload_without_hbone_is_passthrough_to_the_target_port() -> None:
    legacy = workload("legacy-0", "shop", ips=["10.244.2.8"], services={ECHO: [(80, 8080)]})
    svc = echo_service()
    route = plan_outbound(snapshot_of(legacy, svc), to(ECHO_VIP, 80))
    assert route == Passthrough(to("10.244.2.8", 8080), legacy, svc)


def test_subject_alt_names_add_spiffe_identities_and_ignore_dns_names() -> None:
    pod = echo_pod("echo-0", "10.244.2.5")
    svc = echo_service(
        subject_alt_names=(
            "spiffe://cluster.local/ns/shop/sa/echo-canary",
            "spiffe://other.domain/ns/shop/sa/echo",
            "echo.shop.svc.cluster.local",  # a DNS name: never what an HBONE peer is checked on
        )
    )
    route = plan_outbound(snapshot_of(pod, svc), to(ECHO_VIP, 80))
    assert isinstance(route, ViaHbone)
    assert route.identities == frozenset(
        {
            pod.identity,
            SpiffeId("cluster.local", "shop", "echo-canary"),
            SpiffeId("other.domain", "shop", "echo"),
        }
    )


def test_subject_alt_names_do_not_widen_a_direct_workload_route() -> None:
    pod = echo_pod("echo-0", "10.244.2.5")
    svc = echo_service(subject_alt_names=("spiffe://cluster.local/ns/shop/sa/other",))
    route = plan_outbound(snapshot_of(pod, svc), to("10.244.2.5", 8080))
    assert isinstance(route, ViaHbone)
    assert route.identities == frozenset({pod.identity})


# -- waypoints -------------------------------------------------------------------------------


def by_hostname(port: int = 15008) -> GatewayAddress:
    return GatewayAddress(NamespacedHostname("shop", WAYPOINT_HOST), port)


def test_service_waypoint_by_hostname_gets_the_tunnel_with_the_original_authority() -> None:
    waypoint = waypoint_pod()
    wp_service = waypoint_service(
        subject_alt_names=("spiffe://cluster.local/ns/shop/sa/waypoint-alt",)
    )
    svc = echo_service(waypoint=by_hostname())
    route = plan_outbound(
        snapshot_of(echo_pod("echo-0", "10.244.2.5"), svc, waypoint, wp_service),
        to(ECHO_VIP, 80),
    )
    assert route == ViaHbone(
        address=to("10.244.3.9", 15008),
        identities=frozenset(
            {waypoint.identity, SpiffeId("cluster.local", "shop", "waypoint-alt")}
        ),
        authority=to(ECHO_VIP, 80),  # the waypoint resolves the service itself
        workload=waypoint,
        service=svc,
        waypoint=True,
    )


def test_workload_waypoint_by_address_with_its_own_hbone_port() -> None:
    waypoint = waypoint_pod("10.244.3.9")
    pod = dataclasses.replace(
        echo_pod("echo-0", "10.244.2.5"),
        waypoint=GatewayAddress(NetworkAddress("", ip_address("10.244.3.9")), 15088),
    )
    route = plan_outbound(snapshot_of(pod, waypoint), to("10.244.2.5", 9000))
    assert isinstance(route, ViaHbone)
    assert route.waypoint is True
    assert route.address == to("10.244.3.9", 15088)
    assert route.authority == to("10.244.2.5", 9000)
    assert route.workload == waypoint
    assert route.identities == frozenset({waypoint.identity})


def test_service_waypoint_wins_over_the_endpoints_own_waypoint() -> None:
    service_waypoint = waypoint_pod("10.244.3.9")
    other = hbone(workload("other-wp", "shop", ips=["10.244.3.10"], sa="other-wp"))
    pod = dataclasses.replace(
        echo_pod("echo-0", "10.244.2.5"),
        waypoint=GatewayAddress(NetworkAddress("", ip_address("10.244.3.10"))),
    )
    svc = echo_service(waypoint=by_hostname())
    route = plan_outbound(
        snapshot_of(pod, svc, service_waypoint, other, waypoint_service()), to(ECHO_VIP, 80)
    )
    assert isinstance(route, ViaHbone)
    assert route.workload == service_waypoint


def test_waypoint_hostname_that_is_not_a_known_service_is_refused() -> None:
    svc = echo_service(waypoint=by_hostname())
    route = plan_outbound(snapshot_of(echo_pod("echo-0", "10.244.2.5"), svc), to(ECHO_VIP, 80))
    assert isinstance(route, Refused)
    assert WAYPOINT_HOST in route.reason
    assert route.service == svc


def test_waypoint_address_that_is_unknown_is_refused() -> None:
    pod = dataclasses.replace(
        echo_pod("echo-0", "10.244.2.5"),
        waypoint=GatewayAddress(NetworkAddress("", ip_address("10.244.9.9"))),
    )
    route = plan_outbound(snapshot_of(pod), to("10.244.2.5", 9000))
    assert isinstance(route, Refused)
    assert "10.244.9.9" in route.reason


def test_waypoint_service_without_a_healthy_endpoint_is_refused() -> None:
    sick = dataclasses.replace(waypoint_pod(), status=WorkloadStatus.UNHEALTHY)
    svc = echo_service(waypoint=by_hostname())
    route = plan_outbound(
        snapshot_of(echo_pod("echo-0", "10.244.2.5"), svc, sick, waypoint_service()),
        to(ECHO_VIP, 80),
    )
    assert isinstance(route, Refused)
    assert "no healthy endpoint" in route.reason


# -- loop guard -------------------------------------------------------------------------------


@pytest.mark.parametrize("port", sorted(LOOP_GUARD_PORTS))
def test_ztunnel_ports_are_refused_even_on_a_known_workload(port: int) -> None:
    route = plan_outbound(snapshot_of(echo_pod("echo-0", "10.244.2.5")), to("10.244.2.5", port))
    assert isinstance(route, Refused)
    assert str(port) in route.reason


@pytest.mark.parametrize("port", sorted(LOOP_GUARD_PORTS))
def test_ztunnel_ports_are_refused_for_unknown_destinations_too(port: int) -> None:
    route = plan_outbound(snapshot_of(), to("192.0.2.7", port))
    assert isinstance(route, Refused)
