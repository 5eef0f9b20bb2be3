"""Small builders for ztunnel state tests (model objects, not protos)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from underpass.proto import workload_pb2 as wpb
from ztunnel.state import (
    Action,
    Address,
    Authorization,
    Clause,
    LoadBalancing,
    Match,
    NetworkAddress,
    NetworkMode,
    Port,
    Rule,
    Scope,
    Service,
    StringMatch,
    Workload,
    WorkloadStatus,
)


def workload(
    name: str,
    namespace: str = "default",
    *,
    ips: Iterable[str] = (),
    sa: str = "",
    services: Mapping[str, Iterable[tuple[int, int]]] | None = None,
    healthy: bool = True,
    policies: Iterable[str] = (),
    network: str = "",
    host_network: bool = False,
) -> Workload:
    return Workload(
        uid=f"c1//Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        addresses=tuple(ips),  # type: ignore[arg-type]  # parsed by the model
        service_account=sa,
        network=network,
        services={
            key: tuple(Port(sp, tp) for sp, tp in ports) for key, ports in (services or {}).items()
        },
        status=WorkloadStatus.HEALTHY if healthy else WorkloadStatus.UNHEALTHY,
        authorization_policies=tuple(policies),
        network_mode=NetworkMode.HOST_NETWORK if host_network else NetworkMode.STANDARD,
    )


def service(
    hostname: str,
    namespace: str = "default",
    *,
    vips: Iterable[str] = (),
    ports: Iterable[tuple[int, int]] = (),
    load_balancing: LoadBalancing | None = None,
) -> Service:
    return Service(
        name=hostname.split(".")[0],
        namespace=namespace,
        hostname=hostname,
        addresses=tuple(NetworkAddress("", v) for v in vips),  # type: ignore[arg-type]
        ports=tuple(Port(sp, tp) for sp, tp in ports),
        load_balancing=load_balancing,
    )


def policy(
    name: str,
    namespace: str = "default",
    *,
    action: Action | None = Action.ALLOW,
    scope: Scope | None = Scope.NAMESPACE,
    rules: Iterable[Rule] = (),
    dry_run: bool = False,
    problems: Iterable[str] = (),
) -> Authorization:
    return Authorization(
        name=name,
        namespace=namespace,
        scope=scope,
        action=action,
        rules=tuple(rules),
        dry_run=dry_run,
        problems=tuple(problems),
    )


def rule(*clauses: Clause, problems: Iterable[str] = ()) -> Rule:
    return Rule(tuple(clauses), tuple(problems))


def clause(*matches: Match) -> Clause:
    return Clause(tuple(matches))


def when(**fields: object) -> Rule:
    """A rule of one clause of one Match with ``fields`` (strings become matches/CIDRs)."""
    converted: dict[str, object] = {}
    for name, values in fields.items():
        assert isinstance(values, list | tuple)
        base = name.removeprefix("not_")
        if base in ("namespaces", "principals"):
            converted[name] = tuple(v if isinstance(v, StringMatch) else exact(v) for v in values)
        elif base in ("source_ips", "destination_ips"):
            converted[name] = tuple(
                v if isinstance(v, Address) else Address.parse(v) for v in values
            )
        else:
            converted[name] = tuple(values)
    return rule(clause(Match(**converted)))  # type: ignore[arg-type]


def exact(value: str) -> StringMatch:
    return StringMatch.exact(value)


UID = "c1//Pod/shop/web-0"
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def full_workload() -> wpb.Workload:
    return wpb.Workload(
        uid=UID,
        name="web-0",
        namespace="shop",
        addresses=[V4("10.244.1.5").packed, V6("fd00::5").packed],
        hostname="web-0.shop",
        network="net1",
        tunnel_protocol=wpb.HBONE,
        trust_domain="example.org",
        service_account="web",
        waypoint=wpb.GatewayAddress(
            hostname=wpb.NamespacedHostname(namespace="shop", hostname="wp.shop.svc"),
            hbone_mtls_port=15008,
        ),
        network_gateway=wpb.GatewayAddress(
            address=wpb.NetworkAddress(network="net2", address=V4("172.30.0.1").packed),
            hbone_mtls_port=15008,
        ),
        node="node-1",
        canonical_name="web",
        canonical_revision="v1",
        workload_type=wpb.POD,
        workload_name="web",
        native_tunnel=True,
        application_tunnel=wpb.ApplicationTunnel(protocol=wpb.ApplicationTunnel.PROXY, port=15088),
        services={
            "shop/web.shop.svc.cluster.local": wpb.PortList(
                ports=[wpb.Port(service_port=80, target_port=8080, app_protocol=wpb.HTTP11)]
            )
        },
        authorization_policies=["shop/allow"],
        status=wpb.UNHEALTHY,
        cluster_id="c1",
        locality=wpb.Locality(region="r", zone="z", subzone="s"),
        network_mode=wpb.HOST_NETWORK,
    )
