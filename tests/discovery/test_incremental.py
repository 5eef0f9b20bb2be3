"""Incremental translation gives the full translation's result, doing less work.

The property test drives an :class:`IncrementalTranslator` through random
sequences of changes to a small universe of objects chosen so that they
interact (shared labels, services selecting the same pods, colliding
hostnames, waypoints that come and go, root-namespace policies,
PeerAuthentications with port-level modes, invalid values that produce
findings) and checks after every change that its result equals
:func:`discovery.translate.translate` of the same model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discovery.incremental import IncrementalTranslator, changed_keys
from discovery.model import (
    AuthorizationPolicy,
    ContainerPort,
    Gateway,
    Listener,
    Model,
    ModelObject,
    Namespace,
    Node,
    Operation,
    PeerAuthentication,
    Pod,
    Rule,
    Service,
    ServicePort,
    Source,
    TargetRef,
)
from discovery.pipeline import SnapshotBuilder
from discovery.translate import TranslateConfig, Translation, TranslationContext, translate
from underpass.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL

pytestmark = pytest.mark.unit

CONFIG = TranslateConfig(cluster_id="c1")
ROOT = CONFIG.root_namespace
NAMESPACES = ("a", "b", ROOT)
AMBIENT = {"istio.io/dataplane-mode": "ambient"}

# -- a small universe of interacting objects ---------------------------------------------------

namespace_names = st.sampled_from(NAMESPACES)
app = st.sampled_from(["x", "y"])


def optional_labels(**choices: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, str]]:
    """Label dicts where each key is present or not."""
    return st.fixed_dictionaries({}, optional=choices)


waypoint_labels = optional_labels(
    **{
        "istio.io/use-waypoint": st.sampled_from(["wp", "none", "missing"]),
        "istio.io/use-waypoint-namespace": st.sampled_from(["a", "b"]),
    }
)

namespaces = st.builds(
    Namespace,
    namespace_names,
    st.builds(
        lambda mode, wp: {**mode, **wp},
        optional_labels(**{"istio.io/dataplane-mode": st.sampled_from(["ambient", "none"])}),
        waypoint_labels,
    ),
)
nodes = st.builds(
    Node,
    st.sampled_from(["n1", "n2"]),
    optional_labels(**{"topology.kubernetes.io/zone": st.sampled_from(["z1", "z2"])}),
)
pods = st.builds(
    Pod,
    namespace_names,
    st.sampled_from(["p1", "p2", "p3"]),
    node=st.sampled_from(["n1", "n2", ""]),
    ips=st.sampled_from([("10.0.0.1",), ("10.0.0.2", "fd00::2"), ("not-an-ip",), ()]),
    service_account=st.sampled_from(["default", "sa"]),
    labels=st.builds(
        lambda base, wp: {**base, **wp},
        optional_labels(
            app=app,
            version=st.sampled_from(["v1", "v2"]),
            **{"istio.io/dataplane-mode": st.just("none")},
            **{"gateway.networking.k8s.io/gateway-name": st.just("wp")},
        ),
        waypoint_labels,
    ),
    phase=st.sampled_from(["Running", "Pending", "Succeeded"]),
    ready=st.booleans(),
    host_network=st.booleans(),
    ports=st.sampled_from([(), (ContainerPort("http", 8080),), (ContainerPort("http", 9090),)]),
)
services = st.builds(
    Service,
    namespace_names,
    st.sampled_from(["s1", "s2"]),
    vips=st.sampled_from([("10.96.0.1",), ("fd00::1",), ("bad-vip",), ()]),
    ports=st.sampled_from(
        [
            (ServicePort(80, 8080),),
            (ServicePort(81, "http", app_protocol="http"), ServicePort(53, 53, protocol="UDP")),
        ]
    ),
    selector=st.sampled_from([None, {}, {"app": "x"}, {"app": "y", "version": "v1"}]),
    labels=waypoint_labels,
    hostname=st.sampled_from(["", "shared.example"]),  # a name two services may share
)
gateways = st.builds(
    Gateway,
    st.sampled_from(["a", "b"]),
    st.sampled_from(["wp", "other"]),
    st.sampled_from(["istio-waypoint", "some-class"]),
    labels=optional_labels(
        **{"istio.io/waypoint-for": st.sampled_from(["service", "workload", "all", "none"])}
    ),
    listeners=st.just((Listener("mesh", 15008, "HBONE"),)),
    addresses=st.sampled_from([(), ("10.9.0.1",), ("bad",)]),
)
rules = st.sampled_from(
    [
        (),
        (Rule(sources=(Source(principals=("cluster.local/ns/a/sa/sa",)),)),),
        (Rule(operations=(Operation(methods=("GET",)),)),),  # HTTP only: a finding
        (Rule(sources=(Source(namespaces=("b",)),), operations=(Operation(ports=("8080",)),)),),
    ]
)
authorization_policies = st.builds(
    AuthorizationPolicy,
    namespace_names,
    st.sampled_from(["ap1", "ap2"]),
    selector=st.sampled_from([None, {}, {"app": "x"}, {"version": "v2"}]),
    target_refs=st.sampled_from([(), (TargetRef("Service", "s1"),)]),
    action=st.sampled_from(["ALLOW", "DENY", "AUDIT", "CUSTOM"]),
    rules=rules,
)
peer_authentications = st.builds(
    PeerAuthentication,
    namespace_names,
    st.sampled_from(["pa1", "pa2"]),
    selector=st.sampled_from([None, {"app": "x"}]),
    mode=st.sampled_from(["UNSET", "STRICT", "PERMISSIVE", "DISABLE", "bogus"]),
    port_level=st.sampled_from([{}, {8080: "STRICT"}, {8080: "PERMISSIVE"}, {70000: "STRICT"}]),
    created=st.integers(0, 2).map(float),
)
objects: st.SearchStrategy[ModelObject] = st.one_of(
    namespaces, nodes, pods, services, gateways, authorization_policies, peer_authentications
)

KEYS: dict[str, st.SearchStrategy[Any]] = {
    "namespaces": namespace_names,
    "nodes": st.sampled_from(["n1", "n2"]),
    "pods": st.tuples(namespace_names, st.sampled_from(["p1", "p2", "p3"])),
    "services": st.tuples(namespace_names, st.sampled_from(["s1", "s2"])),
    "gateways": st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["wp", "other"])),
    "authorization_policies": st.tuples(namespace_names, st.sampled_from(["ap1", "ap2"])),
    "peer_authentications": st.tuples(namespace_names, st.sampled_from(["pa1", "pa2"])),
}

Change = Callable[[Model], Model]


def upsert(obj: ModelObject) -> Change:
    return lambda model: model.upsert(obj)


def delete(kind: str, key: Any) -> Change:
    return lambda model: model.delete(kind, key)


def rebuild(model: Model) -> Model:
    """Equal objects, all new (what a registry that rebuilds its whole model delivers)."""
    fields = {
        name: {k: dataclasses.replace(v) for k, v in getattr(model, name).items()}
        for name in Model.__dataclass_fields__
    }
    return Model(**fields)


changes: st.SearchStrategy[Change] = st.one_of(
    objects.map(upsert),
    objects.map(upsert),  # upserts twice as often as deletes
    st.sampled_from(sorted(KEYS)).flatmap(lambda kind: KEYS[kind].map(lambda k: delete(kind, k))),
    st.just(rebuild),
)

# -- comparing translations --------------------------------------------------------------------


def comparable(t: Translation) -> dict[str, Any]:
    return {
        "addresses": {n: m.SerializeToString(deterministic=True) for n, m in t.addresses.items()},
        "authorizations": {
            n: m.SerializeToString(deterministic=True) for n, m in t.authorizations.items()
        },
        "findings": t.findings,
        "waypoint_policies": t.waypoint_policies,
    }


def base_model() -> Model:
    return Model.of(
        namespaces=[Namespace("a", AMBIENT), Namespace("b", AMBIENT)],
        nodes=[Node("n1")],
        pods=[Pod("a", "p1", node="n1", ips=("10.0.0.1",), labels={"app": "x"})],
        services=[Service("a", "s1", vips=("10.96.0.1",), selector={"app": "x"})],
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(changes, min_size=1, max_size=30))
def test_incremental_translation_equals_full_translation(steps: list[Change]) -> None:
    translator = IncrementalTranslator(CONFIG)
    model = base_model()
    assert comparable(translator.translate(model)) == comparable(translate(model, CONFIG))
    for step in steps:
        model = step(model)
        assert comparable(translator.translate(model)) == comparable(translate(model, CONFIG))


# -- doing less work -----------------------------------------------------------------------------


def many_pods(n: int = 40) -> Model:
    return Model.of(
        namespaces=[Namespace("a", AMBIENT), Namespace("b", AMBIENT)],
        nodes=[Node("n1"), Node("n2")],
        pods=[
            Pod(
                "a" if i % 2 else "b",
                f"p{i}",
                node=f"n{1 + i % 2}",
                ips=(f"10.0.0.{i}",),
                labels={"app": f"app{i % 4}"},
            )
            for i in range(n)
        ],
        services=[
            Service(ns, f"app{i}", vips=(f"10.96.0.{i}",), selector={"app": f"app{i}"})
            for ns in ("a", "b")
            for i in range(4)
        ],
    )


def test_only_the_affected_parts_are_translated_again() -> None:
    translator = IncrementalTranslator(CONFIG)
    model = many_pods()
    translator.translate(model)
    assert translator.stats.full and translator.stats.pods == 40

    def step(change: Change) -> tuple[int, int, bool]:
        nonlocal model
        model = change(model)
        assert comparable(translator.translate(model)) == comparable(translate(model, CONFIG))
        stats = translator.stats
        assert not stats.full
        return stats.pods, stats.services, stats.policies

    pod = model.pods[("a", "p1")]
    assert step(upsert(dataclasses.replace(pod, ready=False))) == (1, 0, False)
    assert step(rebuild) == (0, 0, False)  # equal objects: nothing to do
    # A service: itself and the 10 pods of namespace a its selector selects (app1).
    svc = model.services[("a", "app1")]
    assert step(upsert(dataclasses.replace(svc, vips=("10.96.1.1",)))) == (10, 1, False)
    # A namespace label: its 20 pods and 4 services.
    assert step(upsert(Namespace("b", {"istio.io/use-waypoint": "wp"}))) == (20, 4, False)
    # The waypoint they use appears: exactly its users.
    gateway = Gateway("b", "wp", "istio-waypoint", addresses=("10.9.0.1",))
    assert step(upsert(gateway)) == (20, 4, False)
    # A node's locality: its pods.
    assert step(upsert(Node("n1", {"topology.kubernetes.io/zone": "z1"}))) == (20, 0, False)
    # A workload-selector policy: the pods it selects.
    policy = AuthorizationPolicy("b", "ap", selector={"app": "app2"})
    assert step(upsert(policy)) == (10, 0, True)
    assert step(upsert(dataclasses.replace(policy, action="DENY"))) == (0, 0, True)
    # A mesh-wide PeerAuthentication: every pod.
    assert step(upsert(PeerAuthentication(ROOT, "default", mode="STRICT"))) == (40, 0, False)


def test_the_builder_reuses_prepared_resources_and_matches_a_full_build() -> None:
    incremental = SnapshotBuilder(CONFIG)
    full = SnapshotBuilder(CONFIG, incremental=False)
    model = many_pods()
    first = incremental.build(model)
    full.build(model)
    model = model.upsert(dataclasses.replace(model.pods[("a", "p1")], ready=False))
    second = incremental.build(model)
    reference = full.build(model)
    for type_url in (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL):
        assert {n: r.version for n, r in second.of_type(type_url).items()} == {
            n: r.version for n, r in reference.of_type(type_url).items()
        }
    assert second.changes == {ADDRESS_TYPE_URL: frozenset({"c1//Pod/a/p1"})}
    unchanged = "c1//Pod/a/p3"
    assert second.of_type(ADDRESS_TYPE_URL)[unchanged] is first.of_type(ADDRESS_TYPE_URL)[unchanged]


def test_a_failed_translation_starts_again_from_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    translator = IncrementalTranslator(CONFIG)
    model = many_pods()
    translator.translate(model)
    changed = model.upsert(
        *(dataclasses.replace(model.pods[("a", name)], ready=False) for name in ("p1", "p3"))
    )
    real = TranslationContext.workload
    calls: list[object] = []

    def failing(self: TranslationContext, pod: Pod, policies: Any) -> Any:
        calls.append(pod.key)
        if len(calls) == 2:
            raise RuntimeError("a translation bug")
        return real(self, pod, policies)

    monkeypatch.setattr(TranslationContext, "workload", failing)
    with pytest.raises(RuntimeError):
        translator.translate(changed)
    monkeypatch.undo()
    # Back to the first model: a part half updated for `changed` must not survive.
    assert comparable(translator.translate(model)) == comparable(translate(model, CONFIG))
    assert translator.stats.full


def test_changed_keys() -> None:
    old = {"a": 1, "b": 2, "c": 3}
    assert changed_keys(old, old) == set()
    assert changed_keys(old, {"a": 1, "b": 5, "d": 4}) == {"b", "c", "d"}
