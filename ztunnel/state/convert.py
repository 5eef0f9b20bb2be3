"""xDS resources (the generated protos) -> ztunnel's state model.

Owns the conversion of ``istio.workload.Address`` (Workload or Service) and
``istio.security.Authorization`` messages into :mod:`ztunnel.state.model`
objects, and of a Delta xDS response into a :class:`~ztunnel.state.store.Batch`.

Two policies for what does not fit:

- Workloads and services are converted strictly: an unknown enum value, an
  address that is not 4 or 16 bytes, a missing uid raise
  :class:`~ztunnel.errors.InvalidResource` naming the resource and the field.
  :func:`xds_decoders` runs the conversion inside the xDS client's decoders,
  so such a response is NACKed as a whole and the last good state stays.
- Authorization policies are converted leniently and enforced failing
  closed: an unknown scope or action, a malformed CIDR, a StringMatch without
  a match type, an out-of-range port or an empty service-account match is
  recorded in the ``problems`` of the policy or rule (the bad value itself is
  left out), and :mod:`ztunnel.policy` treats such a rule as matching in a
  DENY policy and never matching in an ALLOW policy. Only a policy without a
  name or namespace (it cannot be keyed) is rejected.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import TypeVar

from google.protobuf.message import Message

from underpass.proto import authorization_pb2, workload_pb2
from underpass.xds.types import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
)
from ztunnel.errors import InvalidResource
from ztunnel.state.model import (
    Action,
    Address,
    ApplicationTunnel,
    ApplicationTunnelProtocol,
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthPolicy,
    IPFamilies,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Match,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Port,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    WorkloadType,
    parse_ip,
)
from ztunnel.state.store import Batch

E = TypeVar("E", bound=enum.IntEnum)


def _enum(cls: type[E], value: int, field: str) -> E:
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(f"{m.name}={m.value}" for m in cls)
        raise InvalidResource(
            f"unknown {cls.__name__} value {value} (this ztunnel knows {known}); "
            "the control plane is newer than this ztunnel: upgrade ztunnel",
            field=field,
        ) from None


def _port(message: workload_pb2.Port, field: str) -> Port:
    try:
        return Port(
            message.service_port,
            message.target_port,
            _enum(AppProtocol, message.app_protocol, "app_protocol"),
        )
    except InvalidResource as exc:
        raise exc.within(field=field) from None


def _network_address(message: workload_pb2.NetworkAddress, field: str) -> NetworkAddress:
    try:
        return NetworkAddress(
            message.network,
            parse_ip(message.address),
            message.length if message.HasField("length") else None,
        )
    except InvalidResource as exc:
        raise exc.within(field=field) from None


def _gateway(message: workload_pb2.GatewayAddress | None, field: str) -> GatewayAddress | None:
    if message is None:
        return None
    kind = message.WhichOneof("destination")
    destination: NamespacedHostname | NetworkAddress
    if kind == "hostname":
        destination = NamespacedHostname(message.hostname.namespace, message.hostname.hostname)
        if not destination.namespace or not destination.hostname:
            raise InvalidResource(
                "a gateway hostname needs both namespace and hostname", field=f"{field}.hostname"
            )
    elif kind == "address":
        destination = _network_address(message.address, f"{field}.address")
    else:
        raise InvalidResource("a gateway address has neither hostname nor address", field=field)
    try:
        return GatewayAddress(destination, message.hbone_mtls_port)
    except InvalidResource as exc:
        raise exc.within(field=field) from None


def workload_from_proto(message: workload_pb2.Workload) -> Workload:
    """A Workload; raises :class:`InvalidResource` naming the resource and field."""
    try:
        addresses = []
        for i, raw in enumerate(message.addresses):
            try:
                addresses.append(parse_ip(raw))
            except InvalidResource as exc:
                raise exc.within(field=f"addresses[{i}]") from None
        services = {
            key: tuple(
                _port(p, f"services[{key!r}].ports[{i}]") for i, p in enumerate(port_list.ports)
            )
            for key, port_list in message.services.items()
        }
        application_tunnel = None
        if message.HasField("application_tunnel"):
            application_tunnel = ApplicationTunnel(
                _enum(
                    ApplicationTunnelProtocol,
                    message.application_tunnel.protocol,
                    "application_tunnel.protocol",
                ),
                message.application_tunnel.port,
            )
        locality = None
        if message.HasField("locality"):
            locality = Locality(
                message.locality.region, message.locality.zone, message.locality.subzone
            )
        return Workload(
            uid=message.uid,
            name=message.name,
            namespace=message.namespace,
            addresses=tuple(addresses),
            hostname=message.hostname,
            network=message.network,
            tunnel_protocol=_enum(TunnelProtocol, message.tunnel_protocol, "tunnel_protocol"),
            trust_domain=message.trust_domain,
            service_account=message.service_account,
            waypoint=_gateway(
                message.waypoint if message.HasField("waypoint") else None, "waypoint"
            ),
            network_gateway=_gateway(
                message.network_gateway if message.HasField("network_gateway") else None,
                "network_gateway",
            ),
            node=message.node,
            canonical_name=message.canonical_name,
            canonical_revision=message.canonical_revision,
            workload_type=_enum(WorkloadType, message.workload_type, "workload_type"),
            workload_name=message.workload_name,
            native_tunnel=message.native_tunnel,
            application_tunnel=application_tunnel,
            services=services,
            authorization_policies=tuple(message.authorization_policies),
            status=_enum(WorkloadStatus, message.status, "status"),
            cluster_id=message.cluster_id,
            locality=locality,
            network_mode=_enum(NetworkMode, message.network_mode, "network_mode"),
        )
    except InvalidResource as exc:
        raise exc.within(
            resource=exc.resource or message.uid or f"workload {message.name!r}"
        ) from None


def service_from_proto(message: workload_pb2.Service) -> Service:
    """A Service; raises :class:`InvalidResource` naming the resource and field."""
    try:
        load_balancing = None
        if message.HasField("load_balancing"):
            lb = message.load_balancing
            load_balancing = LoadBalancing(
                tuple(
                    _enum(LoadBalancingScope, s, f"load_balancing.routing_preference[{i}]")
                    for i, s in enumerate(lb.routing_preference)
                ),
                _enum(LoadBalancingMode, lb.mode, "load_balancing.mode"),
                _enum(HealthPolicy, lb.health_policy, "load_balancing.health_policy"),
            )
        return Service(
            name=message.name,
            namespace=message.namespace,
            hostname=message.hostname,
            addresses=tuple(
                _network_address(a, f"addresses[{i}]") for i, a in enumerate(message.addresses)
            ),
            ports=tuple(_port(p, f"ports[{i}]") for i, p in enumerate(message.ports)),
            subject_alt_names=tuple(message.subject_alt_names),
            waypoint=_gateway(
                message.waypoint if message.HasField("waypoint") else None, "waypoint"
            ),
            load_balancing=load_balancing,
            ip_families=_enum(IPFamilies, message.ip_families, "ip_families"),
        )
    except InvalidResource as exc:
        raise exc.within(
            resource=exc.resource or f"{message.namespace}/{message.hostname}"
        ) from None


def address_from_proto(message: workload_pb2.Address) -> Workload | Service:
    """The Workload or Service an Address carries."""
    kind = message.WhichOneof("type")
    if kind == "workload":
        return workload_from_proto(message.workload)
    if kind == "service":
        return service_from_proto(message.service)
    raise InvalidResource("an Address holds neither a workload nor a service")


# -- authorization (lenient, fail closed) ---------------------------------------------


def _string_matches(
    values: Iterable[authorization_pb2.StringMatch], field: str, problems: list[str]
) -> tuple[StringMatch, ...]:
    out = []
    for i, value in enumerate(values):
        kind = value.WhichOneof("match_type")
        if kind == "exact":
            out.append(StringMatch.exact(value.exact))
        elif kind == "prefix":
            out.append(StringMatch.prefix(value.prefix))
        elif kind == "suffix":
            out.append(StringMatch.suffix(value.suffix))
        elif kind == "presence":
            out.append(StringMatch.presence())
        else:
            problems.append(f"{field}[{i}]: the string match has no match type")
    return tuple(out)


def _addresses(
    values: Iterable[authorization_pb2.Address], field: str, problems: list[str]
) -> tuple[Address, ...]:
    out = []
    for i, value in enumerate(values):
        try:
            out.append(Address.from_bytes(value.address, value.length))
        except InvalidResource as exc:
            problems.append(f"{field}[{i}]: {exc.problem}")
    return tuple(out)


def _ports(values: Iterable[int], field: str, problems: list[str]) -> tuple[int, ...]:
    out = []
    for i, value in enumerate(values):
        if 1 <= value <= 65535:
            out.append(value)
        else:
            problems.append(f"{field}[{i}]: {value} is not a port number (1..65535)")
    return tuple(out)


def _service_accounts(
    values: Iterable[authorization_pb2.ServiceAccountMatch], field: str, problems: list[str]
) -> tuple[ServiceAccountMatch, ...]:
    out = []
    for i, value in enumerate(values):
        if not value.namespace or not value.serviceAccount:
            problems.append(f"{field}[{i}]: a service account match needs namespace and name")
            continue
        out.append(ServiceAccountMatch(value.namespace, value.serviceAccount))
    return tuple(out)


def _match(message: authorization_pb2.Match, field: str, problems: list[str]) -> Match:
    def at(name: str) -> str:
        return f"{field}.{name}"

    return Match(
        namespaces=_string_matches(message.namespaces, at("namespaces"), problems),
        not_namespaces=_string_matches(message.not_namespaces, at("not_namespaces"), problems),
        principals=_string_matches(message.principals, at("principals"), problems),
        not_principals=_string_matches(message.not_principals, at("not_principals"), problems),
        source_ips=_addresses(message.source_ips, at("source_ips"), problems),
        not_source_ips=_addresses(message.not_source_ips, at("not_source_ips"), problems),
        destination_ips=_addresses(message.destination_ips, at("destination_ips"), problems),
        not_destination_ips=_addresses(
            message.not_destination_ips, at("not_destination_ips"), problems
        ),
        destination_ports=_ports(message.destination_ports, at("destination_ports"), problems),
        not_destination_ports=_ports(
            message.not_destination_ports, at("not_destination_ports"), problems
        ),
        service_accounts=_service_accounts(
            message.service_accounts, at("service_accounts"), problems
        ),
        not_service_accounts=_service_accounts(
            message.not_service_accounts, at("not_service_accounts"), problems
        ),
    )


def _rule(message: authorization_pb2.Rule, field: str) -> Rule:
    problems: list[str] = []
    clauses = tuple(
        Clause(
            tuple(
                _match(m, f"{field}.clauses[{c}].matches[{i}]", problems)
                for i, m in enumerate(clause.matches)
            )
        )
        for c, clause in enumerate(message.clauses)
    )
    return Rule(clauses, tuple(problems))


def authorization_from_proto(message: authorization_pb2.Authorization) -> Authorization:
    """An Authorization; unusable parts become ``problems`` (see the module docstring)."""
    if not message.name or not message.namespace:
        raise InvalidResource(
            "an authorization policy needs a name and a namespace",
            resource=f"{message.namespace}/{message.name}",
            field="name" if not message.name else "namespace",
        )
    problems = []
    try:
        scope: Scope | None = Scope(message.scope)
    except ValueError:
        scope = None
        problems.append(f"scope: unknown value {message.scope}")
    try:
        action: Action | None = Action(message.action)
    except ValueError:
        action = None
        problems.append(f"action: unknown value {message.action}")
    return Authorization(
        name=message.name,
        namespace=message.namespace,
        scope=scope,
        action=action,
        rules=tuple(_rule(r, f"rules[{i}]") for i, r in enumerate(message.rules)),
        dry_run=message.dry_run,
        problems=tuple(problems),
    )


# -- xDS ------------------------------------------------------------------------------


def _decode_address(data: bytes) -> Message:
    message = workload_pb2.Address.FromString(data)
    address_from_proto(message)  # raises InvalidResource (a ValueError): the client NACKs
    return message


def _decode_authorization(data: bytes) -> Message:
    message = authorization_pb2.Authorization.FromString(data)
    authorization_from_proto(message)
    return message


def xds_decoders() -> dict[str, Callable[[bytes], Message]]:
    """Decoders for :class:`underpass.xds.client.DeltaClient` that also validate.

    A resource ztunnel cannot convert fails to decode, so the client NACKs the
    whole response with the conversion error as ``error_detail``, and the
    state keeps its last good version.
    """
    return {ADDRESS_TYPE_URL: _decode_address, AUTHORIZATION_TYPE_URL: _decode_authorization}


def batch_from_xds(
    type_url: str, updated: Iterable[tuple[str, Message]], removed: Iterable[str]
) -> Batch:
    """One accepted Delta xDS response (resource name, message pairs) as a :class:`Batch`.

    Checks that each resource's name is the one its content implies (a
    workload's uid, ``<namespace>/<hostname>``, ``<namespace>/<name>``):
    removals arrive by name, so a mismatch would leave stale state behind.
    """
    if type_url == ADDRESS_TYPE_URL:
        workloads: list[Workload] = []
        services: list[Service] = []
        for name, message in updated:
            if not isinstance(message, workload_pb2.Address):
                raise InvalidResource(
                    f"expected an istio.workload.Address, got {type(message).__name__}",
                    resource=name,
                )
            item = address_from_proto(message)
            key = item.uid if isinstance(item, Workload) else item.key
            if key != name:
                raise InvalidResource(
                    f"the resource is named {name!r} but its content is {key!r}",
                    resource=name,
                )
            if isinstance(item, Workload):
                workloads.append(item)
            else:
                services.append(item)
        return Batch(
            workloads=tuple(workloads),
            services=tuple(services),
            removed_addresses=tuple(removed),
        )
    if type_url == AUTHORIZATION_TYPE_URL:
        policies: list[Authorization] = []
        for name, message in updated:
            if not isinstance(message, authorization_pb2.Authorization):
                raise InvalidResource(
                    f"expected an istio.security.Authorization, got {type(message).__name__}",
                    resource=name,
                )
            policy = authorization_from_proto(message)
            if policy.key != name:
                raise InvalidResource(
                    f"the resource is named {name!r} but its content is {policy.key!r}",
                    resource=name,
                )
            policies.append(policy)
        return Batch(policies=tuple(policies), removed_policies=tuple(removed))
    raise InvalidResource(f"ztunnel does not use resources of type {type_url!r}")


__all__ = [
    "address_from_proto",
    "authorization_from_proto",
    "batch_from_xds",
    "service_from_proto",
    "workload_from_proto",
    "xds_decoders",
]
