"""L4 authorization: may this connection reach this workload?

Owns the evaluation of ``istio.security.Authorization`` policies
(:class:`ztunnel.state.Authorization`) for one connection, as a pure
function: :func:`evaluate` (policies, :class:`Connection`) -> :class:`Decision`.
:func:`authorize` is the same plus logging of dry-run results; the data path
calls it with ``snapshot.policies_for(destination_workload)``.

Semantics (Istio's, PROTOCOLS.md section 3):

- A policy matches when any of its rules matches; a rule when all of its
  clauses match; a clause when any of its matches matches; a Match when every
  field it sets is satisfied. A field is satisfied when (its positive list is
  empty or any value matches) and (its ``not_`` list is empty or no value
  matches). A rule without clauses, a clause without matches and a Match
  without fields match everything (a DENY whose HTTP-only fields the control
  plane dropped denies more, as it should); a policy without rules matches
  nothing (an ALLOW without rules still applies, so it allows nothing).
- Any matching DENY denies. Else, if any ALLOW policy applies, the connection
  is allowed only if one of them matches. Else it is allowed.
- Principals are ``<trust-domain>/ns/<namespace>/sa/<service-account>`` (no
  ``spiffe://``); namespaces the source's namespace; service accounts
  (namespace, name) in any trust domain; IPs by CIDR, IPv4 and IPv6 (an
  IPv4-mapped IPv6 address is matched as IPv4); ports exactly.

A peer without an identity (plaintext) has no principal, namespace or service
account, so no value of ``principals``, ``namespaces`` or ``service_accounts``
matches it, not even presence (``*``) or an empty prefix. Negation is applied
to that result, exactly as for any other peer: a ``not_`` list is satisfied
when none of its values matches, so a plaintext peer always satisfies
``not_principals``, ``not_namespaces`` and ``not_service_accounts``. That is
Istio's (and Envoy RBAC's) behaviour, and it is what makes the standard
"require mTLS" policy work: DENY with ``not_principals: [presence]`` denies
exactly the peers without an identity. The flip side, to keep in mind when
writing policies: ALLOW with only ``not_principals: [X]`` allows plaintext
peers too; add ``principals: [presence]`` to require an identity.

Dry-run policies are evaluated as if enforced, into ``Decision.dry_run``,
and never change ``Decision.allowed``.

Failing closed: a rule the state marked as unusable (``Rule.problems``: a
malformed CIDR, a string match without type, a bad port...) or a policy with
policy-level problems (unknown scope) matches when the policy is a DENY and
never matches when it is an ALLOW; a policy whose action is unknown denies
every connection it applies to. The decision's reason says which and why.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import structlog

from identity.spiffe import SpiffeId
from ztunnel.state.model import (
    Action,
    Address,
    Authorization,
    Clause,
    IPAddress,
    Match,
    Rule,
    ServiceAccountMatch,
    StringMatch,
    parse_ip,
)

log = structlog.get_logger("ztunnel.policy")


@dataclass(frozen=True, slots=True)
class Connection:
    """The facts of a connection that L4 policy looks at.

    ``source_identity`` is the peer's verified SPIFFE ID (mTLS / HBONE), or
    None for a plaintext peer.
    """

    source_identity: SpiffeId | None
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_ip", parse_ip(self.source_ip))
        object.__setattr__(self, "destination_ip", parse_ip(self.destination_ip))
        port = self.destination_port
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"{port!r} is not a port number")

    @classmethod
    def of(
        cls,
        source_identity: SpiffeId | str | None,
        source_ip: IPAddress | str,
        destination_ip: IPAddress | str,
        destination_port: int,
    ) -> Connection:
        """Build from text (``spiffe://...`` identity, IPs as strings)."""
        identity = (
            SpiffeId.parse(source_identity) if isinstance(source_identity, str) else source_identity
        )
        return cls(identity, parse_ip(source_ip), parse_ip(destination_ip), destination_port)


class DecisionCode(enum.Enum):
    """Why a decision was taken, as a short stable label (metrics, access logs)."""

    NO_POLICY = "no_policy"
    NO_ALLOW_POLICY = "no_allow_policy"
    ALLOW_MATCHED = "allow_matched"
    DENY_MATCHED = "deny_matched"
    DENY_FAIL_CLOSED = "deny_fail_closed"
    NO_ALLOW_MATCHED = "no_allow_matched"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: ``allowed``, the policy that decided (None for a default) and why.

    ``dry_run`` is the decision that would have been taken had the dry-run
    policies been enforced too (None when no dry-run policy applies).
    """

    allowed: bool
    policy: str | None
    reason: str
    code: DecisionCode
    dry_run: Decision | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    matched: bool
    rule: int | None = None
    fail_closed: str | None = None  # why the match was forced (DENY)
    skipped: tuple[str, ...] = ()  # unusable rules left out (ALLOW)


# -- matching ----------------------------------------------------------------------------


def _field(values: Sequence[object], negated: Sequence[object], test: Callable[..., bool]) -> bool:
    if values and not any(test(v) for v in values):
        return False
    return not (negated and any(test(v) for v in negated))


def _match_matches(match: Match, conn: Connection) -> bool:
    identity = conn.source_identity

    def principal(m: StringMatch) -> bool:
        return identity is not None and m.matches(identity.principal)

    def namespace(m: StringMatch) -> bool:
        return identity is not None and m.matches(identity.namespace)

    def service_account(m: ServiceAccountMatch) -> bool:
        return (
            identity is not None
            and m.namespace == identity.namespace
            and m.service_account == identity.service_account
        )

    def source_ip(a: Address) -> bool:
        return a.contains(conn.source_ip)

    def destination_ip(a: Address) -> bool:
        return a.contains(conn.destination_ip)

    def destination_port(p: int) -> bool:
        return p == conn.destination_port

    return (
        _field(match.destination_ports, match.not_destination_ports, destination_port)
        and _field(match.destination_ips, match.not_destination_ips, destination_ip)
        and _field(match.source_ips, match.not_source_ips, source_ip)
        and _field(match.principals, match.not_principals, principal)
        and _field(match.namespaces, match.not_namespaces, namespace)
        and _field(match.service_accounts, match.not_service_accounts, service_account)
    )


def _clause_matches(clause: Clause, conn: Connection) -> bool:
    if not clause.matches:
        return True
    return any(_match_matches(m, conn) for m in clause.matches)


def _rule_matches(rule: Rule, conn: Connection) -> bool:
    return all(_clause_matches(c, conn) for c in rule.clauses)


def _evaluate_policy(policy: Authorization, conn: Connection, *, deny: bool) -> _Outcome:
    """Does ``policy`` match ``conn``, failing closed as a DENY (``deny``) or an ALLOW?"""
    if policy.action is None:
        return _Outcome(True, fail_closed=f"its action is unknown ({'; '.join(policy.problems)})")
    if policy.problems:
        why = "; ".join(policy.problems)
        if deny:
            return _Outcome(True, fail_closed=f"the policy cannot be evaluated ({why})")
        return _Outcome(False, skipped=(f"{policy.key}: the policy cannot be evaluated ({why})",))
    skipped: list[str] = []
    for index, rule in enumerate(policy.rules):
        if rule.problems:
            why = "; ".join(rule.problems)
            if deny:
                return _Outcome(
                    True, index, fail_closed=f"rule {index} cannot be evaluated ({why})"
                )
            skipped.append(f"{policy.key} rule {index} cannot be evaluated ({why})")
            continue
        if _rule_matches(rule, conn):
            return _Outcome(True, index)
    return _Outcome(False, skipped=tuple(skipped))


def _decide(policies: Sequence[Authorization], conn: Connection) -> Decision:
    ordered = sorted(policies, key=lambda p: p.key)
    denies = [p for p in ordered if p.action is not Action.ALLOW]
    allows = [p for p in ordered if p.action is Action.ALLOW]
    for policy in denies:
        outcome = _evaluate_policy(policy, conn, deny=True)
        if not outcome.matched:
            continue
        if outcome.fail_closed is not None:
            return Decision(
                False,
                policy.key,
                f"denied by policy {policy.key}: {outcome.fail_closed}; failing closed",
                DecisionCode.DENY_FAIL_CLOSED,
            )
        return Decision(
            False,
            policy.key,
            f"denied by DENY policy {policy.key} (rule {outcome.rule})",
            DecisionCode.DENY_MATCHED,
        )
    if not allows:
        if denies:
            return Decision(
                True,
                None,
                "no DENY policy matched and no ALLOW policy applies",
                DecisionCode.NO_ALLOW_POLICY,
            )
        return Decision(
            True, None, "no authorization policy applies to the workload", DecisionCode.NO_POLICY
        )
    skipped: list[str] = []
    for policy in allows:
        outcome = _evaluate_policy(policy, conn, deny=False)
        if outcome.matched:
            return Decision(
                True,
                policy.key,
                f"allowed by ALLOW policy {policy.key} (rule {outcome.rule})",
                DecisionCode.ALLOW_MATCHED,
            )
        skipped.extend(outcome.skipped)
    reason = "no ALLOW policy matched (" + ", ".join(p.key for p in allows) + ")"
    if skipped:
        reason += "; left out, failing closed: " + "; ".join(skipped)
    return Decision(False, None, reason, DecisionCode.NO_ALLOW_MATCHED)


def evaluate(policies: Iterable[Authorization], conn: Connection) -> Decision:
    """The decision for ``conn`` under ``policies`` (those that apply to its destination).

    Pure: no logging, no state. Order of ``policies`` does not matter.
    """
    applicable = tuple(policies)
    decision = _decide([p for p in applicable if not p.dry_run], conn)
    if any(p.dry_run for p in applicable):
        decision = replace(decision, dry_run=_decide(applicable, conn))
    return decision


def authorize(policies: Iterable[Authorization], conn: Connection) -> Decision:
    """:func:`evaluate`, logging what the dry-run policies would have done."""
    decision = evaluate(policies, conn)
    shadow = decision.dry_run
    if shadow is not None:
        event = (
            "dry-run authorization would change the decision"
            if shadow.allowed != decision.allowed
            else "dry-run authorization agrees with the decision"
        )
        emit = log.info if shadow.allowed != decision.allowed else log.debug
        emit(
            event,
            allowed=decision.allowed,
            dry_run_allowed=shadow.allowed,
            dry_run_policy=shadow.policy,
            dry_run_reason=shadow.reason,
            source_principal=(
                conn.source_identity.principal if conn.source_identity is not None else None
            ),
            source_ip=str(conn.source_ip),
            destination=f"{conn.destination_ip}:{conn.destination_port}",
        )
    return decision


__all__ = ["Connection", "Decision", "DecisionCode", "authorize", "evaluate"]
