"""JSON views of ztunnel's state and certificates, for ``/config_dump`` and ``underpass zc``.

Owns the pure functions that turn model objects into JSON-able dicts:
:func:`workload_json`, :func:`service_json`, :func:`policy_json`,
:func:`certificate_json` and :func:`config_dump`. The admin server serves
their output and the CLI renders it, so the keys here are a contract with
:mod:`underpass.cli.zc`: add keys freely, rename none.

Conventions: IP addresses as text, enums by name (``"HBONE"``), times as
ISO-8601 in UTC, certificate serials as lower-case hex, absent optional
parts as ``None``. Certificates are described by their public parts only:
no function here reads a private key, so no key material can leak into a
dump.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

from identity import der
from identity.certmanager import IdentityStatus
from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from ztunnel.state.model import (
    MATCH_FIELDS,
    Address,
    ApplicationTunnel,
    Authorization,
    GatewayAddress,
    LoadBalancing,
    Locality,
    Match,
    NamespacedHostname,
    NetworkAddress,
    Port,
    Rule,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
    Workload,
)
from ztunnel.state.model import Service as ServiceModel
from ztunnel.state.store import Snapshot

JSON = dict[str, Any]

CERT_LEAF = "Leaf"
CERT_INTERMEDIATE = "Intermediate"
CERT_ROOT = "Root"


# -- building blocks --------------------------------------------------------------


def network_address_json(address: NetworkAddress) -> JSON:
    return {"network": address.network, "address": str(address.address), "length": address.length}


def gateway_json(gateway: GatewayAddress | None) -> JSON | None:
    """A waypoint or network gateway: ``{"hostname": {...}}`` or ``{"address": {...}}``."""
    if gateway is None:
        return None
    destination = gateway.destination
    out: JSON
    if isinstance(destination, NamespacedHostname):
        out = {"hostname": {"namespace": destination.namespace, "hostname": destination.hostname}}
    else:
        out = {"address": network_address_json(destination)}
    out["hbone_mtls_port"] = gateway.hbone_mtls_port
    return out


def port_json(port: Port) -> JSON:
    return {
        "service_port": port.service_port,
        "target_port": port.target_port,
        "app_protocol": port.app_protocol.name,
    }


def _locality_json(locality: Locality | None) -> JSON | None:
    if locality is None:
        return None
    return {"region": locality.region, "zone": locality.zone, "subzone": locality.subzone}


def _application_tunnel_json(tunnel: ApplicationTunnel | None) -> JSON | None:
    if tunnel is None:
        return None
    return {"protocol": tunnel.protocol.name, "port": tunnel.port}


def _load_balancing_json(lb: LoadBalancing | None) -> JSON | None:
    if lb is None:
        return None
    return {
        "routing_preference": [scope.name for scope in lb.routing_preference],
        "mode": lb.mode.name,
        "health_policy": lb.health_policy.name,
    }


# -- workloads, services, policies ------------------------------------------------


def workload_json(workload: Workload) -> JSON:
    """Every field of a workload, plus its derived SPIFFE ``identity``."""
    return {
        "uid": workload.uid,
        "name": workload.name,
        "namespace": workload.namespace,
        "addresses": [str(ip) for ip in workload.addresses],
        "hostname": workload.hostname,
        "network": workload.network,
        "tunnel_protocol": workload.tunnel_protocol.name,
        "trust_domain": workload.trust_domain,
        "service_account": workload.service_account,
        "identity": workload.identity.uri,
        "waypoint": gateway_json(workload.waypoint),
        "network_gateway": gateway_json(workload.network_gateway),
        "node": workload.node,
        "canonical_name": workload.canonical_name,
        "canonical_revision": workload.canonical_revision,
        "workload_type": workload.workload_type.name,
        "workload_name": workload.workload_name,
        "native_tunnel": workload.native_tunnel,
        "application_tunnel": _application_tunnel_json(workload.application_tunnel),
        "services": {
            key: [port_json(p) for p in ports] for key, ports in sorted(workload.services.items())
        },
        "authorization_policies": list(workload.authorization_policies),
        "status": workload.status.name,
        "cluster_id": workload.cluster_id,
        "locality": _locality_json(workload.locality),
        "network_mode": workload.network_mode.name,
    }


def service_json(service: ServiceModel) -> JSON:
    """Every field of a service, plus its resource ``key`` (``namespace/hostname``)."""
    return {
        "key": service.key,
        "name": service.name,
        "namespace": service.namespace,
        "hostname": service.hostname,
        "addresses": [network_address_json(a) for a in service.addresses],
        "ports": [port_json(p) for p in service.ports],
        "subject_alt_names": list(service.subject_alt_names),
        "waypoint": gateway_json(service.waypoint),
        "load_balancing": _load_balancing_json(service.load_balancing),
        "ip_families": service.ip_families.name,
    }


def _string_match_json(match: StringMatch) -> JSON:
    if match.kind is StringMatchKind.PRESENCE:
        return {"presence": True}
    return {match.kind.value: match.value}


def _service_account_json(match: ServiceAccountMatch) -> JSON:
    return {"namespace": match.namespace, "service_account": match.service_account}


def _field_json(value: object) -> Any:
    if isinstance(value, StringMatch):
        return _string_match_json(value)
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, ServiceAccountMatch):
        return _service_account_json(value)
    return value  # ports: plain integers


def match_json(match: Match) -> JSON:
    """The fields a Match sets (empty fields match anything and are left out)."""
    out: JSON = {}
    for name in MATCH_FIELDS:
        values: tuple[object, ...] = getattr(match, name)
        if values:
            out[name] = [_field_json(v) for v in values]
    return out


def _rule_json(rule: Rule) -> JSON:
    return {
        "clauses": [
            {"matches": [match_json(m) for m in clause.matches]} for clause in rule.clauses
        ],
        "problems": list(rule.problems),
    }


def policy_json(policy: Authorization) -> JSON:
    """A policy; ``scope``/``action`` are None when the control plane sent an unknown value."""
    return {
        "key": policy.key,
        "name": policy.name,
        "namespace": policy.namespace,
        "scope": policy.scope.name if policy.scope is not None else None,
        "action": policy.action.name if policy.action is not None else None,
        "dry_run": policy.dry_run,
        "rules": [_rule_json(r) for r in policy.rules],
        "problems": list(policy.problems),
    }


# -- certificates -----------------------------------------------------------------


def _iso(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).isoformat()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _chain_entry(cert_der: bytes, kind: str, now: dt.datetime) -> JSON:
    facts = der.parse_certificate(cert_der)
    not_before = facts.not_before
    not_after = facts.not_after
    return {
        "type": kind,
        "subject": der.display_name(facts.subject),
        "issuer": der.display_name(facts.issuer),
        "serial": f"{facts.serial:x}",
        "not_before": _iso(not_before),
        "not_after": _iso(not_after),
        "valid": not_before <= now < not_after,
    }


def certificate_json(
    status: IdentityStatus,
    certificate: WorkloadCertificate | None,
    *,
    now: dt.datetime | None = None,
) -> JSON:
    """One identity: its manager state and, when a certificate is held, its chain.

    ``state`` is the certificate manager's phase name (``SCHEDULED`` = holds
    a certificate and will refresh it; ``BACKOFF`` = the last attempt
    failed). ``valid`` says whether the leaf is valid at ``now`` (default:
    the current time). ``chain`` lists the leaf, the intermediates and the
    roots, each with its type (Leaf, Intermediate, Root), subject, issuer,
    serial and validity. Only public certificate fields are read.
    """
    when = now if now is not None else _now()
    chain: list[JSON] = []
    serial = f"{status.serial:x}" if status.serial is not None else None
    not_before: dt.datetime | None = None
    not_after = status.not_after
    valid = False
    if certificate is not None:
        leaf, *intermediates = certificate.chain_der
        chain.append(_chain_entry(leaf, CERT_LEAF, when))
        chain.extend(_chain_entry(c, CERT_INTERMEDIATE, when) for c in intermediates)
        chain.extend(_chain_entry(c, CERT_ROOT, when) for c in certificate.roots_der)
        serial = f"{certificate.serial:x}"
        not_before = certificate.not_before
        not_after = certificate.not_after
        valid = certificate.is_valid_at(when)
    return {
        "identity": status.identity.uri,
        "state": status.phase.name,
        "references": status.references,
        "serial": serial,
        "not_before": _iso(not_before),
        "not_after": _iso(not_after),
        "valid": valid,
        "failures": status.failures,
        "last_error": status.last_error,
        "next_attempt_in": status.next_attempt_in,
        "chain": chain,
    }


def certificates_json(
    statuses: Iterable[IdentityStatus],
    lookup: Callable[[SpiffeId], WorkloadCertificate | None],
    *,
    now: dt.datetime | None = None,
) -> list[JSON]:
    """Every identity, sorted by SPIFFE ID; ``lookup`` finds each one's held certificate.

    With a :class:`~identity.certmanager.CertificateManager` ``m``:
    ``certificates_json(m.identities(), m.current)`` (call it on the trio thread).
    """
    when = now if now is not None else _now()
    ordered = sorted(statuses, key=lambda s: s.identity.uri)
    return [certificate_json(s, lookup(s.identity), now=when) for s in ordered]


# -- the whole dump ---------------------------------------------------------------


def config_dump(snapshot: Snapshot, certificates: list[JSON]) -> JSON:
    """``/config_dump``: the snapshot's resources (sorted by key) and the certificates."""
    return {
        "version": snapshot.version,
        "ready": snapshot.ready,
        "workloads": [workload_json(w) for _, w in sorted(snapshot.workloads.items())],
        "services": [service_json(s) for _, s in sorted(snapshot.services.items())],
        "policies": [policy_json(p) for _, p in sorted(snapshot.policies.items())],
        "certificates": certificates,
    }


__all__ = [
    "CERT_INTERMEDIATE",
    "CERT_LEAF",
    "CERT_ROOT",
    "JSON",
    "certificate_json",
    "certificates_json",
    "config_dump",
    "gateway_json",
    "match_json",
    "network_address_json",
    "policy_json",
    "port_json",
    "service_json",
    "workload_json",
]
