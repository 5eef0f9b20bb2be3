"""AuthorizationPolicy and PeerAuthentication -> Authorization, including fail-closed cases."""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf import empty_pb2

from discovery.authorization import (
    STATIC_STRICT_NAME,
    static_strict_policy,
    translate_authorization_policy,
)
from discovery.findings import (
    HTTP_ONLY_FIELD,
    INVALID_VALUE,
    PORT_LEVEL_WITHOUT_SELECTOR,
    UNRECOGNIZED_FIELD,
    UNSUPPORTED_ACTION,
    UNSUPPORTED_CONDITION,
)
from discovery.model import (
    AuthorizationPolicy,
    Condition,
    Model,
    Namespace,
    Operation,
    PeerAuthentication,
    Pod,
    Rule,
    Source,
    TargetRef,
)
from discovery.translate import TranslateConfig, translate
from underpass.proto import authorization_pb2 as pb

pytestmark = pytest.mark.unit

ROOT = "istio-system"
STRICT_REF = f"{ROOT}/{STATIC_STRICT_NAME}"
PRESENCE = pb.StringMatch(presence=empty_pb2.Empty())


def ap(*rules: Rule, **kwargs: object) -> AuthorizationPolicy:
    fields: dict[str, object] = {"namespace": "demo", "name": "p", "rules": rules}
    fields.update(kwargs)
    return AuthorizationPolicy(**fields)  # type: ignore[arg-type]


def one(policy: AuthorizationPolicy) -> tuple[pb.Authorization, list[tuple[str, str, str]]]:
    out, findings = translate_authorization_policy(policy, ROOT)
    assert out is not None
    return out, [(f.field, f.reason, f.effect) for f in findings]


def cidr(text: str) -> pb.Address:
    net = ipaddress.ip_network(text, strict=False)
    return pb.Address(address=net.network_address.packed, length=net.prefixlen)


def test_scopes() -> None:
    assert one(ap(namespace=ROOT))[0].scope == pb.GLOBAL
    assert one(ap())[0].scope == pb.NAMESPACE
    assert one(ap(selector={"app": "a"}))[0].scope == pb.WORKLOAD_SELECTOR
    assert one(ap(namespace=ROOT, selector={"app": "a"}))[0].scope == pb.WORKLOAD_SELECTOR


def test_actions_and_dry_run() -> None:
    allow, _ = one(ap())
    assert (allow.name, allow.namespace, allow.action, list(allow.rules)) == (
        "p",
        "demo",
        pb.ALLOW,
        [],
    )
    deny, _ = one(ap(Rule(), action="DENY", dry_run=True))
    assert deny.action == pb.DENY and deny.dry_run and list(deny.rules) == [pb.Rule()]


def test_audit_is_left_out_and_custom_is_enforced_as_deny() -> None:
    out, findings = translate_authorization_policy(ap(action="AUDIT"), ROOT)
    assert out is None and [f.reason for f in findings] == [UNSUPPORTED_ACTION]
    custom, notes = one(ap(Rule(operations=(Operation(ports=("80",)),)), action="CUSTOM"))
    assert custom.action == pb.DENY
    assert notes == [
        ("action", UNSUPPORTED_ACTION, "CUSTOM cannot be asked at L4; enforced as DENY")
    ]
    weird, notes = one(ap(action="MAYBE"))
    assert weird.action == pb.DENY and notes[0][1] == INVALID_VALUE


def test_target_refs_go_to_waypoints() -> None:
    policy = ap(target_refs=(TargetRef("Service", "web"),), selector={"app": "x"})
    out, findings = translate_authorization_policy(policy, ROOT)
    assert out is None and findings == []


def test_source_fields() -> None:
    source = Source(
        principals=("spiffe://cluster.local/ns/a/sa/b", "*"),
        not_principals=("cluster.local/ns/bad/*",),
        namespaces=("team-*", "*-prod"),
        not_namespaces=("kube-system",),
        ip_blocks=("10.0.0.0/8", "192.168.1.7"),
        not_ip_blocks=("fd00::/64",),
    )
    out, findings = one(ap(Rule(sources=(source,))))
    assert findings == []
    [clause] = out.rules[0].clauses
    [match] = clause.matches
    assert list(match.principals) == [pb.StringMatch(exact="cluster.local/ns/a/sa/b"), PRESENCE]
    assert list(match.not_principals) == [pb.StringMatch(prefix="cluster.local/ns/bad/")]
    assert list(match.namespaces) == [
        pb.StringMatch(prefix="team-"),
        pb.StringMatch(suffix="-prod"),
    ]
    assert list(match.not_namespaces) == [pb.StringMatch(exact="kube-system")]
    assert list(match.source_ips) == [cidr("10.0.0.0/8"), cidr("192.168.1.7/32")]
    assert list(match.not_source_ips) == [cidr("fd00::/64")]


def test_rule_structure_from_to_when() -> None:
    rule = Rule(
        sources=(Source(principals=("a",)), Source(namespaces=("n",))),
        operations=(Operation(ports=("80", "443"), not_ports=("8080",)),),
        conditions=(
            Condition("source.ip", ("10.0.0.1",), ("10.0.0.2",)),
            Condition("source.namespace", ("ns1",)),
            Condition("source.principal", not_values=("td/ns/x/sa/y",)),
            Condition("destination.ip", ("10.9.0.0/16",)),
            Condition("destination.port", ("9090",), ("9091",)),
        ),
    )
    out, findings = one(ap(rule))
    assert findings == []
    clauses = out.rules[0].clauses
    assert len(clauses) == 2 + 5  # from, to, one per condition
    assert len(clauses[0].matches) == 2  # sources are OR-ed
    assert list(clauses[1].matches[0].destination_ports) == [80, 443]
    assert list(clauses[1].matches[0].not_destination_ports) == [8080]
    ip_clause = clauses[2].matches[0]
    assert list(ip_clause.source_ips) == [cidr("10.0.0.1/32")]
    assert list(ip_clause.not_source_ips) == [cidr("10.0.0.2/32")]
    assert list(clauses[3].matches[0].namespaces) == [pb.StringMatch(exact="ns1")]
    assert list(clauses[4].matches[0].not_principals) == [pb.StringMatch(exact="td/ns/x/sa/y")]
    assert list(clauses[5].matches[0].destination_ips) == [cidr("10.9.0.0/16")]
    assert list(clauses[6].matches[0].destination_ports) == [9090]
    assert list(clauses[6].matches[0].not_destination_ports) == [9091]


HTTP_RULES = [
    (Rule(operations=(Operation(methods=("GET",)),)), "rules[0].to[0].operation.methods"),
    (Rule(operations=(Operation(paths=("/x",)),)), "rules[0].to[0].operation.paths"),
    (Rule(operations=(Operation(not_hosts=("h",)),)), "rules[0].to[0].operation.notHosts"),
    (
        Rule(sources=(Source(request_principals=("iss/sub",)),)),
        "rules[0].from[0].source.requestPrincipals",
    ),
    (
        Rule(sources=(Source(remote_ip_blocks=("1.2.3.4",)),)),
        "rules[0].from[0].source.remoteIpBlocks",
    ),
    (
        Rule(conditions=(Condition("request.headers[x]", ("y",)),)),
        "rules[0].when[0].key=request.headers[x]",
    ),
]


@pytest.mark.parametrize(("rule", "field"), HTTP_RULES)
def test_http_fields_make_an_allow_rule_never_match(rule: Rule, field: str) -> None:
    good = Rule(sources=(Source(principals=("ok",)),))
    out, findings = one(ap(good, rule))
    assert len(out.rules) == 1  # the HTTP rule is gone; the L4 one stays
    assert list(out.rules[0].clauses[0].matches[0].principals) == [pb.StringMatch(exact="ok")]
    assert findings == [
        (field.replace("rules[0]", "rules[1]"), HTTP_ONLY_FIELD, "ALLOW rule never matches")
    ]


def test_an_allow_policy_whose_rules_all_went_allows_nothing() -> None:
    out, _ = one(ap(Rule(operations=(Operation(methods=("GET",)),)), selector={"app": "a"}))
    assert out.action == pb.ALLOW and list(out.rules) == []  # still applies: denies all


@pytest.mark.parametrize(("rule", "field"), HTTP_RULES)
def test_http_fields_are_dropped_from_a_deny_rule(rule: Rule, field: str) -> None:
    out, findings = one(ap(rule, action="DENY"))
    assert len(out.rules) == 1
    assert findings == [(field, HTTP_ONLY_FIELD, "dropped from DENY rule (denies more)")]
    # What is left matches at least as much as the rule did.
    for clause in out.rules[0].clauses:
        for match in clause.matches:
            assert match == pb.Match()


def test_a_deny_keeps_its_l4_fields_when_http_ones_are_dropped() -> None:
    rule = Rule(
        sources=(Source(principals=("a",), request_principals=("r",)),),
        operations=(Operation(ports=("80",), methods=("POST",)),),
    )
    out, findings = one(ap(rule, action="DENY"))
    clauses = out.rules[0].clauses
    assert list(clauses[0].matches[0].principals) == [pb.StringMatch(exact="a")]
    assert list(clauses[1].matches[0].destination_ports) == [80]
    assert len(findings) == 2


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        (Rule(conditions=(Condition("connection.sni", ("x",)),)), UNSUPPORTED_CONDITION),
        (Rule(conditions=(Condition("destination.port", ("http",)),)), INVALID_VALUE),
        (Rule(operations=(Operation(ports=("99999",)),)), INVALID_VALUE),
        (Rule(sources=(Source(ip_blocks=("10.0.0.0/33",)),)), INVALID_VALUE),
        (Rule(unrecognized=("from[0].source.futureField",)), UNRECOGNIZED_FIELD),
    ],
)
def test_what_cannot_be_checked_fails_closed(rule: Rule, reason: str) -> None:
    allow, findings = one(ap(rule))
    assert list(allow.rules) == [] and findings[0][1] == reason
    deny, findings = one(ap(rule, action="DENY"))
    assert len(deny.rules) == 1 and findings[0][1] == reason
    assert "denies more" in findings[0][2]


def test_unrecognized_top_level_field() -> None:
    allow, findings = one(ap(Rule(), unrecognized=("spec.future",)))
    assert list(allow.rules) == [] and findings[0][1:] == (
        UNRECOGNIZED_FIELD,
        "ALLOW policy allows nothing",
    )
    deny, findings = one(ap(Rule(), action="DENY", unrecognized=("spec.future",)))
    assert len(deny.rules) == 1 and findings[0][1] == UNRECOGNIZED_FIELD


# -- through translate(): workload lists and PeerAuthentication -----------------------

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def model(*objects: object) -> Model:
    base = Model().upsert(Namespace("demo", AMBIENT), Namespace("other", AMBIENT))
    return base.upsert(*objects)  # type: ignore[arg-type]


def pod(name: str, ns: str = "demo", **labels: str) -> Pod:
    return Pod(ns, name, ips=("10.0.0.1",), labels=labels)


def policies_of(m: Model, name: str, ns: str = "demo") -> list[str]:
    t = translate(m, TranslateConfig(cluster_id="c"))
    return list(t.workloads[f"c//Pod/{ns}/{name}"].authorization_policies)


def test_workloads_list_the_selector_policies_that_select_them() -> None:
    m = model(
        pod("a", app="a"),
        pod("b", app="b"),
        pod("a2", "other", app="a"),
        ap(name="sel-a", selector={"app": "a"}),
        ap(name="ns-wide"),  # NAMESPACE scope: ztunnel finds it by scope
        AuthorizationPolicy(ROOT, "mesh-sel", selector={"app": "a"}),
        AuthorizationPolicy(ROOT, "mesh-wide"),
        ap(name="waypoint", target_refs=(TargetRef("Gateway", "wp"),)),
    )
    assert policies_of(m, "a") == ["demo/sel-a", f"{ROOT}/mesh-sel"]
    assert policies_of(m, "b") == []
    assert policies_of(m, "a2", "other") == [f"{ROOT}/mesh-sel"]
    t = translate(m)
    assert set(t.authorizations) == {
        "demo/sel-a",
        "demo/ns-wide",
        f"{ROOT}/mesh-sel",
        f"{ROOT}/mesh-wide",
    }
    assert t.waypoint_policies == ("demo/waypoint",)


def pa(name: str, ns: str, mode: str, created: float = 0.0, **kwargs: object) -> PeerAuthentication:
    return PeerAuthentication(ns, name, mode=mode, created=created, **kwargs)  # type: ignore[arg-type]


def test_no_peer_authentication_is_permissive() -> None:
    t = translate(model(pod("a")))
    assert list(t.workloads["Kubernetes//Pod/demo/a"].authorization_policies) == []
    assert t.authorizations == {}


def test_mesh_wide_strict_uses_the_static_strict_policy() -> None:
    t = translate(model(pod("a"), pa("default", ROOT, "STRICT")))
    assert list(t.workloads["Kubernetes//Pod/demo/a"].authorization_policies) == [STRICT_REF]
    strict = t.authorizations[STRICT_REF]
    assert strict == static_strict_policy(ROOT)
    assert strict.action == pb.DENY and strict.scope == pb.WORKLOAD_SELECTOR
    [rule] = strict.rules
    assert list(rule.clauses[0].matches[0].not_principals) == [PRESENCE]


@pytest.mark.parametrize(
    ("objects", "expected"),
    [
        # namespace beats mesh
        ((pa("default", ROOT, "STRICT"), pa("ns", "demo", "PERMISSIVE")), []),
        ((pa("default", ROOT, "PERMISSIVE"), pa("ns", "demo", "STRICT")), [STRICT_REF]),
        # UNSET inherits
        ((pa("default", ROOT, "STRICT"), pa("ns", "demo", "UNSET")), [STRICT_REF]),
        # workload beats namespace
        ((pa("ns", "demo", "STRICT"), pa("w", "demo", "PERMISSIVE", selector={"app": "a"})), []),
        (
            (pa("ns", "demo", "PERMISSIVE"), pa("w", "demo", "STRICT", selector={"app": "a"})),
            [STRICT_REF],
        ),
        # DISABLE counts as PERMISSIVE
        ((pa("default", ROOT, "STRICT"), pa("ns", "demo", "DISABLE")), []),
        # oldest wins among competing selectors
        (
            (
                pa("new", "demo", "PERMISSIVE", created=2, selector={"app": "a"}),
                pa("old", "demo", "STRICT", created=1, selector={"app": "a"}),
            ),
            [STRICT_REF],
        ),
        # a selector that does not match is ignored
        ((pa("w", "demo", "STRICT", selector={"app": "zzz"}),), []),
    ],
)
def test_peer_authentication_precedence(
    objects: tuple[PeerAuthentication, ...], expected: list[str]
) -> None:
    assert policies_of(model(pod("a", app="a"), *objects), "a") == expected


def test_port_level_strict_on_a_permissive_workload() -> None:
    m = model(
        pod("a", app="a"),
        pa(
            "w",
            "demo",
            "PERMISSIVE",
            selector={"app": "a"},
            port_level={8080: "STRICT", 9090: "PERMISSIVE"},
        ),
    )
    ref = "demo/converted_peer_authentication_w"
    assert policies_of(m, "a") == [ref]
    policy = translate(m).authorizations[ref]
    assert policy.action == pb.DENY and policy.scope == pb.WORKLOAD_SELECTOR
    match = policy.rules[0].clauses[0].matches[0]
    assert list(match.not_principals) == [PRESENCE]
    assert list(match.destination_ports) == [8080] and list(match.not_destination_ports) == []


def test_port_level_permissive_on_a_strict_workload() -> None:
    m = model(
        pod("a", app="a"),
        pa("default", ROOT, "STRICT"),
        pa("w", "demo", "UNSET", selector={"app": "a"}, port_level={9090: "PERMISSIVE"}),
    )
    ref = "demo/converted_peer_authentication_w"
    assert policies_of(m, "a") == [ref]
    match = translate(m).authorizations[ref].rules[0].clauses[0].matches[0]
    assert list(match.not_destination_ports) == [9090] and list(match.destination_ports) == []


def test_port_level_that_changes_nothing_needs_no_converted_policy() -> None:
    m = model(
        pod("a", app="a"),
        pa("w", "demo", "STRICT", selector={"app": "a"}, port_level={80: "STRICT"}),
    )
    assert policies_of(m, "a") == [STRICT_REF]


def test_port_level_without_selector_fails_closed() -> None:
    m = model(pod("a"), pa("ns", "demo", "PERMISSIVE", port_level={8080: "STRICT"}))
    t = translate(m)
    assert list(t.workloads["Kubernetes//Pod/demo/a"].authorization_policies) == [STRICT_REF]
    assert [f.reason for f in t.findings] == [PORT_LEVEL_WITHOUT_SELECTOR]


def test_invalid_mode_fails_closed() -> None:
    t = translate(model(pod("a"), pa("ns", "demo", "SOMETIMES")))
    assert list(t.workloads["Kubernetes//Pod/demo/a"].authorization_policies) == [STRICT_REF]
    assert [(f.kind, f.reason) for f in t.findings] == [("PeerAuthentication", INVALID_VALUE)]


def test_findings_are_collected_by_translate() -> None:
    t = translate(model(ap(Rule(operations=(Operation(methods=("GET",)),)))))
    assert [(f.kind, f.namespace, f.name, f.reason) for f in t.findings] == [
        ("AuthorizationPolicy", "demo", "p", HTTP_ONLY_FIELD)
    ]
