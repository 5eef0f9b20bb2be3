"""AuthorizationPolicy and PeerAuthentication -> ``istio.security.Authorization``.

Pure functions (model in, protos and findings out), used by
:mod:`discovery.translate`. The rules, from PROTOCOLS.md sections 3 and 7:

AuthorizationPolicy (security.istio.io/v1)
    - ``targetRefs`` (or ``targetRef``): enforced by a waypoint, not ztunnel:
      no resource here.
    - Scope: the root namespace without selector -> GLOBAL; no selector ->
      NAMESPACE; a selector -> WORKLOAD_SELECTOR (in the root namespace it
      selects workloads of every namespace), listed in the selected workloads'
      ``authorization_policies``.
    - ALLOW and DENY are translated; AUDIT does not change what is allowed and
      is left out; CUSTOM (external authorization) cannot be asked at L4 and is
      enforced as DENY of what its rules match. Each is reported.
    - ``from`` sources -> one clause, a Match per source; ``to`` operations ->
      one clause, a Match per operation; each ``when`` condition -> its own
      clause. Principals and namespaces: ``*`` is presence, ``x*`` a prefix,
      ``*x`` a suffix, anything else exact; ``spiffe://`` is dropped.
    - Fields ztunnel cannot check (HTTP: methods, paths, hosts, request
      principals, remote IP blocks, ``request.*`` conditions; an unknown
      condition key; a value that does not parse; a field the registry adapter
      did not recognise): in an ALLOW the whole rule never matches (it is left
      out; an ALLOW policy whose rules all went still applies and allows
      nothing); in a DENY the field is dropped, so the rule denies more. Both
      fail closed, and both are reported.

PeerAuthentication
    The effective mode of a workload is the first set one of: the oldest
    PeerAuthentication of its namespace whose selector selects it, the oldest
    selector-less one of its namespace, the oldest selector-less one of the
    root namespace; else PERMISSIVE (DISABLE counts as PERMISSIVE: ztunnel
    always accepts mTLS). STRICT is enforced by ztunnel as a DENY of peers
    without an identity:

    - a STRICT workload lists :data:`STATIC_STRICT_POLICY`
      (``<root namespace>/istio_converted_static_strict``), a
      WORKLOAD_SELECTOR DENY whose one rule matches ``not_principals:
      [presence]`` (the connection has no principal: plaintext);
    - a workload selected by a PeerAuthentication with ``portLevelMtls``
      lists ``<namespace>/converted_peer_authentication_<name>`` instead: the
      same DENY restricted to the STRICT ports (``destination_ports``) when the
      workload is PERMISSIVE, or excluding the PERMISSIVE ports
      (``not_destination_ports``) when it is STRICT.

    ``portLevelMtls`` without a selector is not valid in Istio; it is reported
    and, failing closed, any STRICT port makes the whole policy STRICT.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf import empty_pb2

from discovery.findings import (
    HTTP_ONLY_FIELD,
    INVALID_VALUE,
    PORT_LEVEL_WITHOUT_SELECTOR,
    UNRECOGNIZED_FIELD,
    UNSUPPORTED_ACTION,
    UNSUPPORTED_CONDITION,
    Finding,
)
from discovery.model import AuthorizationPolicy, Condition, Operation, PeerAuthentication, Source
from discovery.model import Rule as ModelRule
from underpass.proto import authorization_pb2 as pb
from underpass.xds.types import authorization_resource_name

STATIC_STRICT_NAME: Final = "istio_converted_static_strict"
CONVERTED_PEER_AUTHN_PREFIX: Final = "converted_peer_authentication_"

STRICT: Final = "STRICT"
PERMISSIVE: Final = "PERMISSIVE"
UNSET: Final = "UNSET"
_MODES: Final = frozenset({"UNSET", "PERMISSIVE", "STRICT", "DISABLE"})

_AP: Final = "AuthorizationPolicy"
_PA: Final = "PeerAuthentication"

# `when` keys ztunnel can check: key -> (positive Match field, negated Match field, value kind).
_CONDITIONS: Final[dict[str, tuple[str, str, str]]] = {
    "source.ip": ("source_ips", "not_source_ips", "cidr"),
    "source.namespace": ("namespaces", "not_namespaces", "string"),
    "source.principal": ("principals", "not_principals", "principal"),
    "destination.ip": ("destination_ips", "not_destination_ips", "cidr"),
    "destination.port": ("destination_ports", "not_destination_ports", "port"),
}
# `when` keys that need HTTP (or the original client of a proxy chain).
_HTTP_CONDITION_PREFIXES: Final = ("request.", "source.remote_ip", "experimental.")
_HTTP_SOURCE_FIELDS: Final = (
    ("request_principals", "requestPrincipals"),
    ("not_request_principals", "notRequestPrincipals"),
    ("remote_ip_blocks", "remoteIpBlocks"),
    ("not_remote_ip_blocks", "notRemoteIpBlocks"),
)
_HTTP_OPERATION_FIELDS: Final = (
    ("hosts", "hosts"),
    ("not_hosts", "notHosts"),
    ("methods", "methods"),
    ("not_methods", "notMethods"),
    ("paths", "paths"),
    ("not_paths", "notPaths"),
)


def static_strict_policy(root_namespace: str) -> pb.Authorization:
    """The DENY-without-identity policy that STRICT workloads list."""
    return pb.Authorization(
        name=STATIC_STRICT_NAME,
        namespace=root_namespace,
        scope=pb.WORKLOAD_SELECTOR,
        action=pb.DENY,
        rules=[_no_identity_rule()],
    )


def static_strict_resource_name(root_namespace: str) -> str:
    return authorization_resource_name(root_namespace, STATIC_STRICT_NAME)


def _no_identity_rule(ports: Sequence[int] = (), not_ports: Sequence[int] = ()) -> pb.Rule:
    match = pb.Match(
        not_principals=[pb.StringMatch(presence=empty_pb2.Empty())],
        destination_ports=sorted(ports),
        not_destination_ports=sorted(not_ports),
    )
    return pb.Rule(clauses=[pb.Clause(matches=[match])])


# -- AuthorizationPolicy -------------------------------------------------------


class _Problems:
    """Collects what a rule cannot honour."""

    def __init__(self, policy: AuthorizationPolicy, path: str) -> None:
        self.policy = policy
        self.path = path
        self.items: list[tuple[str, str]] = []  # (field path, reason)

    def add(self, field: str, reason: str) -> None:
        self.items.append((f"{self.path}.{field}", reason))


def _string_match(value: str, *, principal: bool = False) -> pb.StringMatch:
    if principal:
        value = value.removeprefix("spiffe://")
    if value == "*":
        return pb.StringMatch(presence=empty_pb2.Empty())
    if len(value) > 1 and value.endswith("*"):
        return pb.StringMatch(prefix=value[:-1])
    if len(value) > 1 and value.startswith("*"):
        return pb.StringMatch(suffix=value[1:])
    return pb.StringMatch(exact=value)


def _cidr(value: str) -> pb.Address:
    network = ipaddress.ip_network(value.strip(), strict=False)  # ValueError if malformed
    return pb.Address(address=network.network_address.packed, length=network.prefixlen)


def _port(value: str) -> int:
    port = int(value.strip())  # ValueError if not a number
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return port


def _convert(kind: str, values: Iterable[str]) -> list[object]:
    if kind == "cidr":
        return [_cidr(v) for v in values]
    if kind == "port":
        return [_port(v) for v in values]
    return [_string_match(v, principal=kind == "principal") for v in values]


def _fill(
    match: pb.Match,
    field: str,
    kind: str,
    values: Sequence[str],
    problems: _Problems,
    where: str,
) -> None:
    if not values:
        return
    try:
        converted = _convert(kind, values)
    except ValueError:
        problems.add(where, INVALID_VALUE)
        return
    getattr(match, field).extend(converted)


def _source_match(source: Source, problems: _Problems) -> pb.Match:
    match = pb.Match()
    _fill(match, "principals", "principal", source.principals, problems, "principals")
    _fill(match, "not_principals", "principal", source.not_principals, problems, "notPrincipals")
    _fill(match, "namespaces", "string", source.namespaces, problems, "namespaces")
    _fill(match, "not_namespaces", "string", source.not_namespaces, problems, "notNamespaces")
    _fill(match, "source_ips", "cidr", source.ip_blocks, problems, "ipBlocks")
    _fill(match, "not_source_ips", "cidr", source.not_ip_blocks, problems, "notIpBlocks")
    for attr, name in _HTTP_SOURCE_FIELDS:
        if getattr(source, attr):
            problems.add(name, HTTP_ONLY_FIELD)
    return match


def _operation_match(operation: Operation, problems: _Problems) -> pb.Match:
    match = pb.Match()
    _fill(match, "destination_ports", "port", operation.ports, problems, "ports")
    _fill(match, "not_destination_ports", "port", operation.not_ports, problems, "notPorts")
    for attr, name in _HTTP_OPERATION_FIELDS:
        if getattr(operation, attr):
            problems.add(name, HTTP_ONLY_FIELD)
    return match


def _condition_match(condition: Condition, problems: _Problems) -> pb.Match | None:
    known = _CONDITIONS.get(condition.key)
    if known is None:
        http = condition.key.startswith(_HTTP_CONDITION_PREFIXES)
        problems.add(f"key={condition.key}", HTTP_ONLY_FIELD if http else UNSUPPORTED_CONDITION)
        return None
    positive, negative, kind = known
    match = pb.Match()
    before = len(problems.items)
    _fill(match, positive, kind, condition.values, problems, f"key={condition.key}.values")
    _fill(match, negative, kind, condition.not_values, problems, f"key={condition.key}.notValues")
    if len(problems.items) != before:
        return None
    return match


def _rule(rule: ModelRule, problems: _Problems) -> pb.Rule:
    """The rule with what can be checked; what cannot is in ``problems``."""
    clauses: list[pb.Clause] = []
    if rule.sources:
        matches = []
        for i, source in enumerate(rule.sources):
            sub = _Problems(problems.policy, f"from[{i}].source")
            matches.append(_source_match(source, sub))
            problems.items += sub.items
        clauses.append(pb.Clause(matches=matches))
    if rule.operations:
        matches = []
        for i, operation in enumerate(rule.operations):
            sub = _Problems(problems.policy, f"to[{i}].operation")
            matches.append(_operation_match(operation, sub))
            problems.items += sub.items
        clauses.append(pb.Clause(matches=matches))
    for i, condition in enumerate(rule.conditions):
        sub = _Problems(problems.policy, f"when[{i}]")
        condition_match = _condition_match(condition, sub)
        problems.items += sub.items
        if condition_match is not None:
            clauses.append(pb.Clause(matches=[condition_match]))
    for name in rule.unrecognized:
        problems.items.append((name, UNRECOGNIZED_FIELD))
    return pb.Rule(clauses=clauses)


def _prefixed(problems: _Problems, prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}.{field}", reason) for field, reason in problems.items]


def translate_authorization_policy(
    policy: AuthorizationPolicy, root_namespace: str
) -> tuple[pb.Authorization | None, list[Finding]]:
    """One policy -> its Authorization for ztunnel (None: not for ztunnel) and findings."""
    findings: list[Finding] = []

    def report(field: str, reason: str, effect: str) -> None:
        findings.append(Finding(_AP, policy.namespace, policy.name, field, reason, effect))

    if policy.target_refs:
        return None, findings  # a waypoint's policy
    action_text = policy.action.upper() or "ALLOW"
    if action_text == "AUDIT":
        report("action", UNSUPPORTED_ACTION, "AUDIT is not enforced by ztunnel; policy ignored")
        return None, findings
    if action_text == "ALLOW":
        action = pb.ALLOW
    elif action_text == "DENY":
        action = pb.DENY
    elif action_text == "CUSTOM":
        action = pb.DENY
        report("action", UNSUPPORTED_ACTION, "CUSTOM cannot be asked at L4; enforced as DENY")
    else:
        action = pb.DENY
        report("action", INVALID_VALUE, f"unknown action {policy.action!r}; enforced as DENY")
    if policy.selector is None:
        scope = pb.GLOBAL if policy.namespace == root_namespace else pb.NAMESPACE
    else:
        scope = pb.WORKLOAD_SELECTOR
    out = pb.Authorization(
        name=policy.name,
        namespace=policy.namespace,
        scope=scope,
        action=action,
        dry_run=policy.dry_run,
    )
    if policy.unrecognized and action == pb.ALLOW:
        for field in policy.unrecognized:
            report(field, UNRECOGNIZED_FIELD, "ALLOW policy allows nothing")
        return out, findings  # an ALLOW without rules: applies, matches nothing
    for field in policy.unrecognized:
        report(field, UNRECOGNIZED_FIELD, "ignored in a DENY policy (denies more)")
    for i, rule in enumerate(policy.rules):
        problems = _Problems(policy, f"rules[{i}]")
        translated = _rule(rule, problems)
        items = _prefixed(problems, f"rules[{i}]")
        if items and action == pb.ALLOW:
            for field, reason in items:
                report(field, reason, "ALLOW rule never matches")
            continue
        for field, reason in items:
            report(field, reason, "dropped from DENY rule (denies more)")
        out.rules.append(translated)
    return out, findings


# -- PeerAuthentication --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerAuthnIndex:
    """The PeerAuthentications that decide a workload's mode, indexed for lookup."""

    root_namespace: str
    mesh: PeerAuthentication | None
    namespaces: Mapping[str, PeerAuthentication]
    selectors: Mapping[str, tuple[PeerAuthentication, ...]]  # oldest first


def _age(pa: PeerAuthentication) -> tuple[float, str]:
    return (pa.created, pa.name)


def index_peer_authentications(
    policies: Iterable[PeerAuthentication], root_namespace: str
) -> PeerAuthnIndex:
    namespace_wide: dict[str, PeerAuthentication] = {}
    selectors: dict[str, list[PeerAuthentication]] = {}
    for pa in sorted(policies, key=_age):
        if pa.selector is None:
            namespace_wide.setdefault(pa.namespace, pa)
        else:
            selectors.setdefault(pa.namespace, []).append(pa)
    mesh = namespace_wide.get(root_namespace)
    return PeerAuthnIndex(
        root_namespace,
        mesh,
        namespace_wide,
        {ns: tuple(pas) for ns, pas in selectors.items()},
    )


def _mode(pa: PeerAuthentication, findings: list[Finding]) -> str:
    """The policy's own mode, normalised; port-level STRICT upgrades a selector-less one."""
    mode = pa.mode.upper() or UNSET
    if mode not in _MODES:
        findings.append(
            Finding(_PA, pa.namespace, pa.name, "mtls.mode", INVALID_VALUE, "treated as STRICT")
        )
        mode = STRICT
    if mode == "DISABLE":
        mode = PERMISSIVE
    if pa.selector is None and pa.port_level:
        findings.append(
            Finding(
                _PA,
                pa.namespace,
                pa.name,
                "portLevelMtls",
                PORT_LEVEL_WITHOUT_SELECTOR,
                "a STRICT port makes the whole policy STRICT",
            )
        )
        if any(m.upper() == STRICT for m in pa.port_level.values()):
            mode = STRICT
    return mode


@dataclass(frozen=True, slots=True)
class PeerAuthnDecision:
    """A workload's mTLS outcome: the policy name it lists (or None) and its base mode."""

    mode: str
    policy: str | None  # resource name to list in Workload.authorization_policies


class PeerAuthnTranslator:
    """Decides workloads' modes and collects the Authorization resources they refer to."""

    def __init__(self, index: PeerAuthnIndex) -> None:
        self.index = index
        self.findings: list[Finding] = []
        self.resources: dict[str, pb.Authorization] = {}
        self._modes: dict[tuple[str, str], str] = {}

    def _own_mode(self, pa: PeerAuthentication) -> str:
        key = pa.key
        if key not in self._modes:
            self._modes[key] = _mode(pa, self.findings)
        return self._modes[key]

    def _inherited(self, namespace: str) -> str:
        for pa in (self.index.namespaces.get(namespace), self.index.mesh):
            if pa is not None:
                mode = self._own_mode(pa)
                if mode != UNSET:
                    return mode
        return PERMISSIVE

    def decide(self, namespace: str, labels: Mapping[str, str]) -> PeerAuthnDecision:
        chosen = next(
            (
                pa
                for pa in self.index.selectors.get(namespace, ())
                if pa.selector is not None
                and all(labels.get(k) == v for k, v in pa.selector.items())
            ),
            None,
        )
        base = self._inherited(namespace)
        if chosen is not None:
            own = self._own_mode(chosen)
            base = own if own != UNSET else base
            if chosen.port_level:
                return self._port_level(chosen, base)
        if base == STRICT:
            return PeerAuthnDecision(STRICT, self._static())
        return PeerAuthnDecision(base, None)

    def _static(self) -> str:
        name = static_strict_resource_name(self.index.root_namespace)
        if name not in self.resources:
            self.resources[name] = static_strict_policy(self.index.root_namespace)
        return name

    def _port_level(self, pa: PeerAuthentication, base: str) -> PeerAuthnDecision:
        strict_ports: list[int] = []
        permissive_ports: list[int] = []
        for port, raw in sorted(pa.port_level.items()):
            mode = raw.upper() or UNSET
            if mode not in _MODES or not 0 < int(port) < 65536:
                self.findings.append(
                    Finding(
                        _PA,
                        pa.namespace,
                        pa.name,
                        f"portLevelMtls[{port}]",
                        INVALID_VALUE,
                        "port treated as STRICT",
                    )
                )
                mode = STRICT
            if mode == UNSET:
                continue
            (strict_ports if mode == STRICT else permissive_ports).append(int(port))
        if base == STRICT:
            if not permissive_ports:
                return PeerAuthnDecision(STRICT, self._static())
            rule = _no_identity_rule(not_ports=permissive_ports)
        else:
            if not strict_ports:
                return PeerAuthnDecision(base, None)
            rule = _no_identity_rule(ports=strict_ports)
        name = CONVERTED_PEER_AUTHN_PREFIX + pa.name
        resource = authorization_resource_name(pa.namespace, name)
        self.resources[resource] = pb.Authorization(
            name=name,
            namespace=pa.namespace,
            scope=pb.WORKLOAD_SELECTOR,
            action=pb.DENY,
            rules=[rule],
        )
        return PeerAuthnDecision(base, resource)


__all__ = [
    "CONVERTED_PEER_AUTHN_PREFIX",
    "STATIC_STRICT_NAME",
    "PeerAuthnDecision",
    "PeerAuthnIndex",
    "PeerAuthnTranslator",
    "index_peer_authentications",
    "static_strict_policy",
    "static_strict_resource_name",
    "translate_authorization_policy",
]
