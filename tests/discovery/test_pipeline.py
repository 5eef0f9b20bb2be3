"""Debouncing, snapshot building (reuse, change sets, findings once) and the model file."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from discovery.errors import ModelError
from discovery.metrics import DiscoveryMetrics
from discovery.model import (
    AuthorizationPolicy,
    ContainerPort,
    Model,
    Namespace,
    Operation,
    Pod,
    Rule,
    Source,
)
from discovery.modelfile import load_model, parse_model
from discovery.pipeline import Debouncer, SnapshotBuilder
from discovery.registry import MemoryRegistry
from discovery.translate import TranslateConfig
from underpass.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL

pytestmark = pytest.mark.unit

A, Z = ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL


def test_debouncer_waits_for_quiet_but_not_forever() -> None:
    d = Debouncer(quiet=0.1, max_delay=1.0)
    assert d.deadline() is None and not d.pending and not d.due(100.0)
    d.changed(10.0)
    assert d.deadline() == pytest.approx(10.1)
    d.changed(10.05)
    assert d.deadline() == pytest.approx(10.15)
    assert not d.due(10.12) and d.due(10.15)
    for i in range(100):  # a steady stream of changes
        d.changed(10.05 + i * 0.05)
    assert d.deadline() == pytest.approx(11.0)  # capped by max_delay
    d.fire()
    assert d.deadline() is None


def model(*pods: Pod, policy: AuthorizationPolicy | None = None) -> Model:
    base = Model.of(
        namespaces=[Namespace("demo", {"istio.io/dataplane-mode": "ambient"})], pods=pods
    )
    return base.upsert(policy) if policy else base


def test_builder_reuses_unchanged_resources_and_lists_changes() -> None:
    builder = SnapshotBuilder(TranslateConfig(cluster_id="c"))
    s1 = builder.build(
        model(Pod("demo", "a", ips=("10.0.0.1",)), Pod("demo", "b", ips=("10.0.0.2",)))
    )
    assert s1.version == 1 and set(s1.of_type(A)) == {"c//Pod/demo/a", "c//Pod/demo/b"}
    s2 = builder.build(
        model(Pod("demo", "a", ips=("10.0.0.1",)), Pod("demo", "b", ips=("10.0.0.3",)))
    )
    assert s2.parent == 1 and s2.changes == {A: frozenset({"c//Pod/demo/b"})}
    assert s2.of_type(A)["c//Pod/demo/a"] is s1.of_type(A)["c//Pod/demo/a"]  # same prepared bytes
    s3 = builder.build(model(Pod("demo", "a", ips=("10.0.0.1",))))
    assert s3.changes == {A: frozenset({"c//Pod/demo/b"})} and len(s3) == 1


def test_builder_reports_each_finding_once_and_its_resolution() -> None:
    metrics_registry = CollectorRegistry()
    builder = SnapshotBuilder(TranslateConfig(), DiscoveryMetrics(metrics_registry))
    policy = AuthorizationPolicy(
        "demo", "p", rules=(Rule(operations=(Operation(methods=("GET",)),)),)
    )
    with capture_logs() as logs:
        builder.build(model(policy=policy))
        builder.build(model(Pod("demo", "x"), policy=policy))
        builder.build(model())
    events = [(e["event"], e.get("reason")) for e in logs if e["event"].startswith("discovery.")]
    assert events == [
        ("discovery.unsupported", "http_only_field"),
        ("discovery.unsupported_resolved", "http_only_field"),
    ]
    warning = next(e for e in logs if e["event"] == "discovery.unsupported")
    assert warning["object"] == "AuthorizationPolicy demo/p"
    assert warning["field"] == "rules[0].to[0].operation.methods"
    assert warning["effect"] == "ALLOW rule never matches"
    assert (
        metrics_registry.get_sample_value(
            "underpass_discovery_unsupported_total", {"reason": "http_only_field"}
        )
        == 1
    )
    assert (
        metrics_registry.get_sample_value(
            "underpass_discovery_resources", {"type_url": "istio.security.Authorization"}
        )
        == 0
    )


def test_memory_registry_delivers_every_model_in_order() -> None:
    registry = MemoryRegistry()
    seen: list[Model] = []
    registry.start(seen.append)
    registry.upsert(Namespace("a"))
    registry.upsert(Pod("a", "p"))
    registry.delete("pods", ("a", "p"))
    registry.stop()
    registry.upsert(Namespace("b"))  # after stop: not delivered
    assert [len(m.pods) for m in seen] == [0, 0, 1, 0]
    assert set(registry.model.namespaces) == {"a", "b"}


def test_model_is_immutable_and_copy_on_write() -> None:
    m1 = Model.of(pods=[Pod("a", "p")])
    m2 = m1.upsert(Pod("a", "q"))
    assert set(m1.pods) == {("a", "p")} and set(m2.pods) == {("a", "p"), ("a", "q")}
    with pytest.raises(TypeError):
        m1.pods[("a", "z")] = Pod("a", "z")  # type: ignore[index]


MODEL_FILE = """
namespaces:
  - {name: demo, labels: {istio.io/dataplane-mode: ambient}}
nodes: [{name: node-1, labels: {topology.kubernetes.io/zone: z1}}]
pods:
  - namespace: demo
    name: sleep-1
    node: node-1
    ips: [10.244.1.2]
    serviceAccount: sleep
    labels: {app: sleep}
    ports: [{name: http, port: 8080}]
    owner: {kind: ReplicaSet, name: sleep-abc}
services:
  - {namespace: demo, name: sleep, vips: [10.96.0.10], selector: {app: sleep},
     ports: [{port: 80, targetPort: http}]}
gateways:
  - {namespace: demo, name: wp, gatewayClassName: istio-waypoint,
     listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
authorizationPolicies:
  - namespace: demo
    name: allow-sleep
    selector: {matchLabels: {app: sleep}}
    rules:
      - from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]
        to: [{operation: {ports: ["8080"]}}]
        when: [{key: source.ip, values: [10.0.0.0/8]}]
peerAuthentications:
  - {namespace: istio-system, name: default, mtls: {mode: STRICT}}
  - {namespace: demo, name: ports, selector: {app: sleep},
     portLevelMtls: {8080: {mode: PERMISSIVE}}}
"""


def test_model_file(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text(MODEL_FILE)
    m = load_model(path)
    pod = m.pods[("demo", "sleep-1")]
    assert pod.service_account == "sleep" and pod.ports == (ContainerPort("http", 8080),)
    assert pod.owner is not None and pod.owner.kind == "ReplicaSet"
    assert m.services[("demo", "sleep")].ports[0].target_port == "http"
    assert m.gateways[("demo", "wp")].gateway_class == "istio-waypoint"
    policy = m.authorization_policies[("demo", "allow-sleep")]
    assert policy.selector == {"app": "sleep"}
    assert policy.rules[0].sources == (Source(principals=("cluster.local/ns/demo/sa/sleep",)),)
    assert policy.rules[0].operations[0].ports == ("8080",)
    assert policy.rules[0].conditions[0].values == ("10.0.0.0/8",)
    assert m.peer_authentications[("istio-system", "default")].mode == "STRICT"
    assert dict(m.peer_authentications[("demo", "ports")].port_level) == {8080: "PERMISSIVE"}
    assert parse_model(None) == Model()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"widgets": []}, "unknown kind"),
        ({"pods": [{"namespace": "a", "name": "p", "colour": "red"}]}, r"pods\[0\]: unknown field"),
        ({"pods": {}}, "expected a list"),
        ({"pods": ["x"]}, "expected a mapping"),
        ({"pods": [{"name": "p"}]}, "namespace"),
    ],
)
def test_model_file_errors(doc: object, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        parse_model(doc)
