"""L4 authorization (ztunnel.policy): Istio semantics, plaintext peers, dry run, fail closed."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest
import structlog.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from identity.spiffe import SpiffeId
from tests.ztunnel.builders import clause, policy, rule, when, workload
from ztunnel.policy import Connection, Decision, DecisionCode, authorize, evaluate
from ztunnel.state import (
    Action,
    Address,
    Authorization,
    Batch,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StateStore,
    StringMatch,
)
from ztunnel.state.model import MATCH_FIELDS

pytestmark = pytest.mark.unit

FRONTEND = SpiffeId("cluster.local", "shop", "frontend")
PEER_IP = "10.1.0.5"
POD_IP = "10.244.1.5"
PORT = 8080


def conn(
    identity: SpiffeId | None = FRONTEND,
    src: str = PEER_IP,
    dst: str = POD_IP,
    port: int = PORT,
) -> Connection:
    return Connection.of(identity, src, dst, port)


PLAINTEXT = conn(identity=None)
OTHER_TD = conn(identity=SpiffeId("other.td", "shop", "frontend"))
V6 = conn(src="fd00:1::5", dst="fd00:244::5")
MAPPED = conn(src="::ffff:10.1.0.5")

P = StringMatch.presence()
pre = StringMatch.prefix
suf = StringMatch.suffix
ex = StringMatch.exact


@dataclass(frozen=True)
class Case:
    name: str
    rule: Rule
    matches: list[Connection]
    misses: list[Connection] = field(default_factory=list)


CASES = [
    # namespaces
    Case(
        "namespace exact",
        when(namespaces=["shop"]),
        [conn()],
        [PLAINTEXT, conn(SpiffeId("cluster.local", "x", "frontend"))],
    ),
    Case("namespace prefix", when(namespaces=[pre("sh")]), [conn()], [PLAINTEXT]),
    Case("namespace suffix", when(namespaces=[suf("op")]), [conn()], [PLAINTEXT]),
    Case("namespace presence", when(namespaces=[P]), [conn()], [PLAINTEXT]),
    Case(
        "namespace empty prefix never matches plaintext",
        when(namespaces=[pre("")]),
        [conn()],
        [PLAINTEXT],
    ),
    Case("namespace values OR-ed", when(namespaces=["x", "shop"]), [conn()], [PLAINTEXT]),
    Case("not_namespaces", when(not_namespaces=["x"]), [conn(), PLAINTEXT], []),
    Case("not_namespaces own", when(not_namespaces=["shop"]), [PLAINTEXT], [conn()]),
    Case("not_namespaces presence", when(not_namespaces=[P]), [PLAINTEXT], [conn()]),
    # principals
    Case(
        "principal exact",
        when(principals=["cluster.local/ns/shop/sa/frontend"]),
        [conn()],
        [PLAINTEXT, OTHER_TD],
    ),
    Case(
        "principal with scheme never matches",
        when(principals=["spiffe://cluster.local/ns/shop/sa/frontend"]),
        [],
        [conn(), PLAINTEXT],
    ),
    Case(
        "principal prefix",
        when(principals=[pre("cluster.local/ns/shop/")]),
        [conn()],
        [PLAINTEXT, OTHER_TD],
    ),
    Case(
        "principal suffix", when(principals=[suf("/sa/frontend")]), [conn(), OTHER_TD], [PLAINTEXT]
    ),
    Case("principal presence", when(principals=[P]), [conn(), OTHER_TD], [PLAINTEXT]),
    Case(
        "not_principals presence: plaintext only",
        when(not_principals=[P]),
        [PLAINTEXT],
        [conn(), OTHER_TD],
    ),
    Case(
        "not_principals other",
        when(not_principals=["cluster.local/ns/x/sa/y"]),
        [conn(), PLAINTEXT],
        [],
    ),
    Case(
        "not_principals own",
        when(not_principals=["cluster.local/ns/shop/sa/frontend"]),
        [PLAINTEXT, OTHER_TD],
        [conn()],
    ),
    Case(
        "principals and not_principals",
        when(principals=[P], not_principals=[suf("/sa/admin")]),
        [conn()],
        [PLAINTEXT],
    ),
    # service accounts (any trust domain)
    Case(
        "service account",
        when(service_accounts=[ServiceAccountMatch("shop", "frontend")]),
        [conn(), OTHER_TD],
        [PLAINTEXT, conn(SpiffeId("cluster.local", "shop", "x"))],
    ),
    Case(
        "not_service_accounts",
        when(not_service_accounts=[ServiceAccountMatch("shop", "frontend")]),
        [PLAINTEXT, conn(SpiffeId("cluster.local", "shop", "x"))],
        [conn(), OTHER_TD],
    ),
    # source IPs
    Case(
        "source cidr",
        when(source_ips=["10.1.0.0/16"]),
        [conn(), PLAINTEXT, MAPPED],
        [conn(src="10.2.0.5"), V6],
    ),
    Case("source ip /32", when(source_ips=["10.1.0.5"]), [conn()], [conn(src="10.1.0.6")]),
    Case("source ipv6 cidr", when(source_ips=["fd00:1::/32"]), [V6], [conn()]),
    Case("source any v4", when(source_ips=["0.0.0.0/0"]), [conn()], [V6]),
    Case(
        "not_source_ips",
        when(not_source_ips=["10.1.0.0/16"]),
        [conn(src="10.2.0.5"), V6],
        [conn(), MAPPED],
    ),
    Case(
        "source and not_source",
        when(source_ips=["10.0.0.0/8"], not_source_ips=["10.1.0.0/16"]),
        [conn(src="10.2.0.5")],
        [conn(), V6],
    ),
    # destination IPs
    Case(
        "destination cidr",
        when(destination_ips=["10.244.1.0/24"]),
        [conn()],
        [conn(dst="10.244.2.5"), V6],
    ),
    Case("destination ipv6", when(destination_ips=["fd00:244::5/128"]), [V6], [conn()]),
    Case(
        "not_destination_ips",
        when(not_destination_ips=["10.244.1.5"]),
        [conn(dst="10.244.1.6"), V6],
        [conn()],
    ),
    # ports
    Case("destination port", when(destination_ports=[8080]), [conn()], [conn(port=80)]),
    Case(
        "destination ports OR-ed",
        when(destination_ports=[80, 8080]),
        [conn(), conn(port=80)],
        [conn(port=443)],
    ),
    Case("not_destination_ports", when(not_destination_ports=[8080]), [conn(port=80)], [conn()]),
    # structure
    Case(
        "fields AND-ed",
        when(namespaces=["shop"], destination_ports=[80]),
        [conn(port=80)],
        [conn(), conn(SpiffeId("cluster.local", "x", "y"), port=80)],
    ),
    Case("empty match matches everything", rule(clause(Match())), [conn(), PLAINTEXT, V6]),
    Case("empty clause matches everything", rule(Clause()), [conn(), PLAINTEXT]),
    Case("rule without clauses matches everything", rule(), [conn(), PLAINTEXT]),
    Case(
        "matches in a clause OR-ed",
        rule(clause(Match(destination_ports=(1,)), Match(namespaces=(ex("shop"),)))),
        [conn()],
        [PLAINTEXT],
    ),
    Case(
        "clauses in a rule AND-ed",
        rule(clause(Match(destination_ports=(8080,))), clause(Match(namespaces=(ex("shop"),)))),
        [conn()],
        [conn(port=80), PLAINTEXT],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_match_table(case: Case) -> None:
    allow = policy("p", action=Action.ALLOW, rules=[case.rule])
    deny = policy("p", action=Action.DENY, rules=[case.rule])
    for c in case.matches:
        assert evaluate([allow], c).allowed, f"ALLOW should match {c}"
        assert not evaluate([deny], c).allowed, f"DENY should match {c}"
    for c in case.misses:
        assert not evaluate([allow], c).allowed, f"ALLOW should not match {c}"
        assert evaluate([deny], c).allowed, f"DENY should not match {c}"


def test_every_match_field_is_covered_by_the_table() -> None:
    used = {
        name
        for case in CASES
        for c in case.rule.clauses
        for m in c.matches
        for name in Match.__dataclass_fields__
        if getattr(m, name)
    }
    assert used == set(Match.__dataclass_fields__)


def test_rules_are_or_ed() -> None:
    p = policy("p", rules=[when(destination_ports=[1]), when(destination_ports=[8080])])
    decision = evaluate([p], conn())
    assert decision.allowed and decision.reason == "allowed by ALLOW policy default/p (rule 1)"


# -- decisions ------------------------------------------------------------------------------


def test_no_policies_allows() -> None:
    assert evaluate([], conn()) == Decision(
        True, None, "no authorization policy applies to the workload", DecisionCode.NO_POLICY
    )


def test_deny_wins() -> None:
    allow = policy("allow-all", rules=[rule()])
    deny = policy("deny-frontend", action=Action.DENY, rules=[when(principals=[suf("frontend")])])
    decision = evaluate([allow, deny], conn())
    assert not decision.allowed
    assert decision.policy == "default/deny-frontend"
    assert decision.code is DecisionCode.DENY_MATCHED
    assert evaluate([allow, deny], PLAINTEXT).policy == "default/allow-all"


def test_allow_policies_make_the_rest_denied() -> None:
    a = policy("a", rules=[when(namespaces=["x"])])
    b = policy("b", rules=[when(destination_ports=[1])])
    decision = evaluate([b, a], conn())
    assert not decision.allowed and decision.policy is None
    assert decision.code is DecisionCode.NO_ALLOW_MATCHED
    assert decision.reason == "no ALLOW policy matched (default/a, default/b)"
    # An ALLOW without rules applies and allows nothing.
    assert not evaluate([policy("empty")], conn()).allowed


def test_only_deny_policies_allow_the_rest() -> None:
    deny = policy("d", action=Action.DENY, rules=[when(destination_ports=[1])])
    decision = evaluate([deny], conn())
    assert decision.allowed and decision.code is DecisionCode.NO_ALLOW_POLICY


def test_order_does_not_matter() -> None:
    ps = [
        policy("b", rules=[when(destination_ports=[8080])]),
        policy("a", rules=[when(namespaces=["shop"])]),
        policy("c", action=Action.DENY, rules=[when(destination_ports=[1])]),
    ]
    assert evaluate(ps, conn()) == evaluate(list(reversed(ps)), conn())
    assert evaluate(ps, conn()).policy == "default/a"


def test_plaintext_peer_and_strict_mtls() -> None:
    # What discovery sends for PeerAuthentication STRICT: DENY peers without identity.
    strict = policy(
        "istio_converted_static_strict",
        "istio-system",
        action=Action.DENY,
        scope=Scope.WORKLOAD_SELECTOR,
        rules=[when(not_principals=[P])],
    )
    assert evaluate([strict], conn()).allowed
    denied = evaluate([strict], PLAINTEXT)
    assert not denied.allowed and denied.policy == "istio-system/istio_converted_static_strict"
    # Documented flip side: an ALLOW with only not_principals lets plaintext in...
    not_admin = policy("p", rules=[when(not_principals=[suf("/sa/admin")])])
    assert evaluate([not_admin], PLAINTEXT).allowed
    # ...unless it also requires an identity.
    with_identity = policy("p", rules=[when(principals=[P], not_principals=[suf("/sa/admin")])])
    assert not evaluate([with_identity], PLAINTEXT).allowed
    assert evaluate([with_identity], conn()).allowed


def test_scoping_through_the_snapshot() -> None:
    store = StateStore()
    writer = store.claim_writer("test")
    pod = workload("web", "shop", ips=[POD_IP], policies=["shop/selected"])
    neighbour = workload("db", "shop", ips=["10.244.1.6"])
    stranger = workload("x", "other", ips=["10.244.1.7"])
    snap = writer.apply(
        Batch(
            workloads=(pod, neighbour, stranger),
            policies=(
                policy(
                    "only-8080",
                    "shop",
                    scope=Scope.NAMESPACE,
                    rules=[when(destination_ports=[8080])],
                ),
                policy(
                    "selected",
                    "shop",
                    scope=Scope.WORKLOAD_SELECTOR,
                    action=Action.DENY,
                    rules=[when(namespaces=["shop"])],
                ),
                policy(
                    "deny-plaintext",
                    "istio-system",
                    scope=Scope.GLOBAL,
                    action=Action.DENY,
                    rules=[when(not_principals=[P])],
                ),
            ),
        )
    )

    def check(target: str, c: Connection) -> Decision:
        w = snap.workload_by_ip(target)
        assert w is not None
        return evaluate(snap.policies_for(w), c)

    # NAMESPACE policy: shop workloads only allow 8080; other namespaces unaffected.
    assert check("10.244.1.6", conn(dst="10.244.1.6")).allowed
    assert not check("10.244.1.6", conn(dst="10.244.1.6", port=80)).allowed
    assert check("10.244.1.7", conn(dst="10.244.1.7", port=80)).allowed
    # WORKLOAD_SELECTOR policy: only the workload that lists it.
    assert check(POD_IP, conn()).policy == "shop/selected"
    # GLOBAL policy: everyone.
    assert check("10.244.1.7", conn(None, dst="10.244.1.7")).policy == "istio-system/deny-plaintext"


# -- dry run -----------------------------------------------------------------------------------


def test_dry_run_is_evaluated_not_enforced() -> None:
    dry_deny = policy("dry", action=Action.DENY, dry_run=True, rules=[rule()])
    decision = evaluate([dry_deny], conn())
    assert decision.allowed and decision.code is DecisionCode.NO_POLICY
    assert decision.dry_run is not None
    assert not decision.dry_run.allowed and decision.dry_run.policy == "default/dry"
    dry_allow = policy("dry-allow", dry_run=True, rules=[when(destination_ports=[1])])
    decision = evaluate([dry_allow], conn())
    assert decision.allowed
    assert decision.dry_run is not None and decision.dry_run.code is DecisionCode.NO_ALLOW_MATCHED
    assert evaluate([policy("x", rules=[rule()])], conn()).dry_run is None


def test_authorize_logs_dry_run_results() -> None:
    dry_deny = policy("dry", action=Action.DENY, dry_run=True, rules=[rule()])
    with structlog.testing.capture_logs() as logs:
        decision = authorize([dry_deny], conn())
        authorize([policy("x", rules=[rule()])], conn())
    assert decision.allowed
    (entry,) = logs
    assert entry["event"] == "dry-run authorization would change the decision"
    assert entry["dry_run_policy"] == "default/dry" and entry["dry_run_allowed"] is False
    assert entry["source_principal"] == "cluster.local/ns/shop/sa/frontend"


# -- fail closed -----------------------------------------------------------------------------


BAD = ("rules[0].clauses[0].matches[0].source_ips[0]: an address has 4 or 16 bytes, not 5",)


def test_malformed_deny_rule_matches() -> None:
    deny = policy("d", action=Action.DENY, rules=[rule(problems=BAD)])
    decision = evaluate([deny], conn())
    assert not decision.allowed and decision.code is DecisionCode.DENY_FAIL_CLOSED
    assert decision.policy == "default/d"
    assert "rule 0 cannot be evaluated" in decision.reason and "not 5" in decision.reason
    assert "failing closed" in decision.reason


def test_malformed_allow_rule_never_matches() -> None:
    # The rule's usable part would match; the rule as a whole must not.
    allow = policy("a", rules=[Rule((clause(Match()),), BAD)])
    decision = evaluate([allow], conn())
    assert not decision.allowed and decision.code is DecisionCode.NO_ALLOW_MATCHED
    assert "left out, failing closed: default/a rule 0 cannot be evaluated" in decision.reason
    # Another, well-formed rule of the same policy still allows.
    allow = policy("a", rules=[Rule((clause(Match()),), BAD), rule()])
    assert evaluate([allow], conn()).allowed


def test_unknown_action_denies_everything_it_applies_to() -> None:
    unknown = policy(
        "u", action=None, problems=["action: unknown value 5"], rules=[when(destination_ports=[1])]
    )
    decision = evaluate([unknown, policy("allow-all", rules=[rule()])], conn())
    assert not decision.allowed and decision.code is DecisionCode.DENY_FAIL_CLOSED
    assert "action is unknown (action: unknown value 5)" in decision.reason


def test_unknown_scope_fails_closed() -> None:
    problems = ["scope: unknown value 9"]
    deny = policy(
        "d", action=Action.DENY, scope=None, problems=problems, rules=[when(destination_ports=[1])]
    )
    decision = evaluate([deny], conn())
    assert not decision.allowed and "scope: unknown value 9" in decision.reason
    allow = policy("a", scope=None, problems=problems, rules=[rule()])
    decision = evaluate([allow], conn())
    assert not decision.allowed and "the policy cannot be evaluated" in decision.reason


def test_connection_normalizes_and_validates() -> None:
    c = Connection.of("spiffe://cluster.local/ns/a/sa/b", "::ffff:10.0.0.1", "10.0.0.2", 80)
    assert c.source_ip == ipaddress.IPv4Address("10.0.0.1")
    assert c.source_identity == SpiffeId("cluster.local", "a", "b")
    with pytest.raises(ValueError, match="not a port"):
        Connection.of(None, "10.0.0.1", "10.0.0.2", 70000)


# -- properties ------------------------------------------------------------------------------

IDENTITIES = st.one_of(
    st.none(),
    st.builds(
        SpiffeId,
        st.sampled_from(["cluster.local", "other.td"]),
        st.sampled_from(["a", "b"]),
        st.sampled_from(["x", "y"]),
    ),
)
IPS = st.sampled_from(["10.0.0.1", "10.0.1.1", "10.0.0.2", "fd00::1"])
PORTS = st.sampled_from([80, 443, 8080])
CONNECTIONS = st.builds(Connection.of, IDENTITIES, IPS, IPS, PORTS)
STRINGS = st.sampled_from(["", "a", "b", "cluster.local/ns/a/sa/x", "cluster.local/", "/sa/y", "x"])
STRING_MATCHES = st.one_of(
    st.builds(StringMatch.exact, STRINGS),
    st.builds(StringMatch.prefix, STRINGS),
    st.builds(StringMatch.suffix, STRINGS),
    st.just(StringMatch.presence()),
)
CIDRS = st.sampled_from(["10.0.0.0/24", "10.0.0.1/32", "10.0.0.0/8", "fd00::/8", "0.0.0.0/0"]).map(
    Address.parse
)
SERVICE_ACCOUNTS = st.builds(
    ServiceAccountMatch, st.sampled_from(["a", "b"]), st.sampled_from(["x", "y"])
)


FIELD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "namespaces": STRING_MATCHES,
    "principals": STRING_MATCHES,
    "source_ips": CIDRS,
    "destination_ips": CIDRS,
    "destination_ports": PORTS,
    "service_accounts": SERVICE_ACCOUNTS,
}


@st.composite
def matches(draw: st.DrawFn) -> Match:
    """A Match setting a few fields (all twelve are reachable)."""
    names = draw(st.sets(st.sampled_from(MATCH_FIELDS), max_size=3))
    values = {
        name: tuple(draw(st.lists(FIELD_VALUES[name.removeprefix("not_")], min_size=1, max_size=2)))
        for name in names
    }
    return Match(**values)  # type: ignore[arg-type]


MATCHES = matches()
RULES = st.builds(
    Rule,
    st.lists(st.builds(Clause, st.lists(MATCHES, max_size=2).map(tuple)), max_size=2).map(tuple),
    st.sampled_from([(), (), (), (), (), (), (), BAD]),
)


@st.composite
def policies(draw: st.DrawFn, action: Action | None = None) -> Authorization:
    chosen = (
        draw(st.sampled_from([Action.ALLOW, Action.ALLOW, Action.DENY, Action.DENY, None]))
        if action is None
        else action
    )
    problems: tuple[str, ...] = ()
    if chosen is None:
        problems = ("action: unknown value 7",)
    elif draw(st.integers(0, 9)) == 0:
        problems = ("scope: unknown value 9",)
    return Authorization(
        name=draw(st.sampled_from(["p", "q", "r", "s"])) + str(draw(st.integers(0, 99))),
        namespace="ns",
        scope=Scope.NAMESPACE if not problems or chosen is None else None,
        action=chosen,
        rules=tuple(draw(st.lists(RULES, max_size=2))),
        dry_run=draw(st.integers(0, 3)) == 0,
        problems=problems,
    )


POLICY_SETS = st.lists(policies(), max_size=3, unique_by=lambda p: p.key)


@settings(max_examples=200, deadline=None)
@given(POLICY_SETS, st.one_of(policies(Action.DENY), policies()), CONNECTIONS)
def test_adding_a_deny_policy_never_turns_a_deny_into_an_allow(
    existing: list[Authorization], added: Authorization, c: Connection
) -> None:
    if added.action is Action.ALLOW:
        added = Authorization(
            added.name,
            added.namespace,
            added.scope,
            Action.DENY,
            added.rules,
            added.dry_run,
            added.problems,
        )
    if not evaluate(existing, c).allowed:
        assert not evaluate([*existing, added], c).allowed


@settings(max_examples=200, deadline=None)
@given(POLICY_SETS, policies(Action.ALLOW), CONNECTIONS)
def test_adding_an_allow_policy_never_overrides_a_deny_policy(
    existing: list[Authorization], added: Authorization, c: Connection
) -> None:
    before = evaluate(existing, c)
    if before.code in (DecisionCode.DENY_MATCHED, DecisionCode.DENY_FAIL_CLOSED):
        after = evaluate([*existing, added], c)
        assert not after.allowed and after.policy == before.policy


@settings(max_examples=200, deadline=None)
@given(
    st.lists(policies(Action.DENY), max_size=3, unique_by=lambda p: p.key),
    policies(Action.ALLOW),
    CONNECTIONS,
)
def test_adding_an_allow_policy_to_deny_only_never_turns_a_deny_into_an_allow(
    existing: list[Authorization], added: Authorization, c: Connection
) -> None:
    if not evaluate(existing, c).allowed:
        assert not evaluate([*existing, added], c).allowed


def test_adding_an_allow_policy_can_turn_a_default_deny_into_an_allow() -> None:
    # Why the property above is restricted: when the deny is "ALLOW policies
    # apply and none matched", a new matching ALLOW allows. That is Istio's
    # semantics, not a hole: ALLOW policies are a union.
    existing = [policy("only-a", rules=[when(namespaces=["a"])])]
    assert not evaluate(existing, conn()).allowed
    assert evaluate(
        [*existing, policy("also-shop", rules=[when(namespaces=["shop"])])], conn()
    ).allowed


@settings(max_examples=200, deadline=None)
@given(POLICY_SETS, CONNECTIONS, st.randoms())
def test_dry_run_policies_never_change_the_decision_and_order_never_matters(
    existing: list[Authorization], c: Connection, rnd: object
) -> None:
    enforced = [p for p in existing if not p.dry_run]
    decision = evaluate(existing, c)
    assert (decision.allowed, decision.policy) == (
        evaluate(enforced, c).allowed,
        evaluate(enforced, c).policy,
    )
    shuffled = list(existing)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert evaluate(shuffled, c) == decision
