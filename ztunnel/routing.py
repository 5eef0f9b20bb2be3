"""Where an outbound connection goes: the routing decision, without I/O.

Given the state snapshot and the original destination of a connection a pod
made, :func:`plan_outbound` answers one of:

- :class:`ViaHbone`: a tunnel to ``<pod IP>:15008`` of a mesh workload (or to
  a waypoint), with the identities the server must present and the CONNECT
  authority (the real target);
- :class:`Passthrough`: plain TCP to an address outside the mesh (unknown to
  the state, or a workload that does not speak HBONE);
- :class:`Refused`: the state knows the destination but it cannot be served
  (a service port it does not have, no healthy endpoint, a waypoint that
  cannot be found, a loop). The connection is closed: failing closed rather
  than leaking mesh traffic in plaintext.

The rules (PROTOCOLS.md section 2 and ztunnel's behaviour): a service VIP
wins over a workload IP and picks a healthy endpoint, mapping the service
port to the target port; a destination with a waypoint (the service's, else
the workload's) goes to the waypoint, with the original address as the
authority; the expected server identity is the workload's, plus the
service's ``subject_alt_names``.
"""

from __future__ import annotations

from dataclasses import dataclass

from identity.errors import InvalidSpiffeId
from identity.spiffe import SpiffeId
from underpass.hbone.headers import SocketAddress
from ztunnel.inpod import INBOUND_HBONE_PORT, LOOP_GUARD_PORTS
from ztunnel.state.model import (
    GatewayAddress,
    NamespacedHostname,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.store import Snapshot


@dataclass(frozen=True, slots=True)
class ViaHbone:
    """Tunnel to ``address`` (a pod's or a waypoint's HBONE port), CONNECT ``authority``."""

    address: SocketAddress
    identities: frozenset[SpiffeId]
    authority: SocketAddress
    workload: Workload  # the workload the tunnel lands on (the endpoint, or the waypoint)
    service: Service | None
    waypoint: bool = False


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Plain TCP to ``address``; ``workload`` when the state knows it (not in the mesh)."""

    address: SocketAddress
    workload: Workload | None = None
    service: Service | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str
    service: Service | None = None


Route = ViaHbone | Passthrough | Refused


def plan_outbound(
    snapshot: Snapshot, destination: SocketAddress, *, ignore_waypoint: bool = False
) -> Route:
    """The route for a connection a pod made to ``destination`` (its original destination).

    ``ignore_waypoint``: the caller *is* the waypoint, forwarding what it was sent.
    """
    if destination.port in LOOP_GUARD_PORTS:
        return Refused(f"port {destination.port} is ztunnel's own; connecting to it would loop")
    found = snapshot.resolve_destination(destination.ip, destination.port)
    if found.workload is None:
        if found.service is None:
            return Passthrough(destination)
        return Refused(found.problem or "the service has no usable endpoint", found.service)
    workload, service = found.workload, found.service
    target = SocketAddress.of(workload.addresses[0], found.port)
    gateway = service.waypoint if service is not None and service.waypoint else workload.waypoint
    if gateway is not None and not ignore_waypoint:
        return _via_waypoint(snapshot, gateway, destination, workload, service)
    if workload.tunnel_protocol is not TunnelProtocol.HBONE:
        return Passthrough(target, workload, service)
    identities = {workload.identity}
    if service is not None:
        identities.update(_spiffe_ids(service.subject_alt_names))
    return ViaHbone(
        address=SocketAddress.of(workload.addresses[0], INBOUND_HBONE_PORT),
        identities=frozenset(identities),
        authority=target,
        workload=workload,
        service=service,
    )


def _via_waypoint(
    snapshot: Snapshot,
    gateway: GatewayAddress,
    destination: SocketAddress,
    workload: Workload,
    service: Service | None,
) -> Route:
    """A tunnel to the waypoint; the authority stays the address the pod asked for."""
    port = gateway.hbone_mtls_port or INBOUND_HBONE_PORT
    waypoint_service: Service | None = None
    waypoint: Workload | None = None
    where = gateway.destination
    if isinstance(where, NamespacedHostname):
        waypoint_service = snapshot.service_by_host(where.namespace, where.hostname)
        if waypoint_service is None:
            return Refused(
                f"waypoint {where.namespace}/{where.hostname} is not a known service; "
                "refusing rather than bypassing it",
                service,
            )
    else:
        at = snapshot.resolve_destination(where.address, port)
        waypoint_service, waypoint = at.service, at.workload
        if waypoint is None and waypoint_service is None:
            return Refused(f"waypoint address {where.address} is unknown", service)
    if waypoint is None and waypoint_service is not None:
        endpoints = [
            w for w in snapshot.endpoints(waypoint_service.key) if w.addresses and w.healthy
        ]
        if not endpoints:
            return Refused(f"waypoint {waypoint_service.key} has no healthy endpoint", service)
        waypoint = snapshot.choose(waypoint_service, endpoints)
    if waypoint is None or not waypoint.addresses:
        return Refused("the waypoint has no address", service)
    identities = {waypoint.identity}
    if waypoint_service is not None:
        identities.update(_spiffe_ids(waypoint_service.subject_alt_names))
    return ViaHbone(
        address=SocketAddress.of(waypoint.addresses[0], port),
        identities=frozenset(identities),
        authority=destination,
        workload=waypoint,
        service=service,
        waypoint=True,
    )


def _spiffe_ids(names: tuple[str, ...] | list[str]) -> set[SpiffeId]:
    found = set()
    for name in names:
        try:
            found.add(SpiffeId.parse(name))
        except InvalidSpiffeId:
            continue  # a DNS name: not something an HBONE peer is checked against
    return found
