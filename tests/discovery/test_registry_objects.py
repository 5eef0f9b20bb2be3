"""Kubernetes objects -> the model (discovery.registries.objects), and the Kubernetes
registry's pure parts (error classification, backoff, watch line framing, RBAC)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from discovery.errors import ModelError
from discovery.findings import UNRECOGNIZED_FIELD
from discovery.model import (
    AuthorizationPolicy,
    Condition,
    ContainerPort,
    Gateway,
    Listener,
    Model,
    Namespace,
    Node,
    Operation,
    Owner,
    Pod,
    Service,
    ServicePort,
    Source,
    TargetRef,
)
from discovery.registries.errors import ApiError, ResourceExpired
from discovery.registries.kubernetes import (
    CLUSTER_ROLE_RULES,
    _lines,
    api_error,
    classify,
    cluster_role,
)
from discovery.registries.objects import (
    UNREADABLE_MODE,
    as_dict,
    is_terminating,
    parse_authorization_policy,
    parse_gateway,
    parse_namespace,
    parse_node,
    parse_object,
    parse_peer_authentication,
    parse_pod,
    parse_service,
)
from discovery.registries.retry import Backoff
from discovery.translate import translate

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def attr(cls: Any, json_key: str) -> str:
    """The client model's attribute for a JSON key (``podIPs`` is ``pod_ips`` or
    ``pod_i_ps`` depending on the client's generator)."""
    names: dict[str, str] = cls.attribute_map
    return next(a for a, k in names.items() if k == json_key)


def v1_pod(**status: Any) -> client.V1Pod:
    return client.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=client.V1ObjectMeta(
            name="web-7d9f8-abcde",
            namespace="shop",
            uid="0b6f1c2e-1111-2222-3333-444455556666",
            labels={"app": "web", "pod-template-hash": "7d9f8"},
            annotations={"ambient.istio.io/redirection": "enabled"},
            owner_references=[
                client.V1OwnerReference(
                    api_version="apps/v1", kind="ReplicaSet", name="web-7d9f8", uid="u",
                    controller=True,
                ),
                client.V1OwnerReference(api_version="v1", kind="Other", name="x", uid="v"),
            ],
            creation_timestamp=dt.datetime(2024, 5, 1, tzinfo=dt.UTC),
        ),
        spec=client.V1PodSpec(
            node_name="node-1",
            service_account_name="web",
            containers=[
                client.V1Container(
                    name="app",
                    image="web:1",
                    ports=[
                        client.V1ContainerPort(name="http", container_port=8080),
                        client.V1ContainerPort(container_port=9090, protocol="UDP"),
                    ],
                )
            ],
            init_containers=[
                client.V1Container(
                    name="sidecar",
                    image="s:1",
                    restart_policy="Always",
                    ports=[client.V1ContainerPort(name="metrics", container_port=15020)],
                ),
                client.V1Container(
                    name="init",
                    image="i:1",
                    ports=[client.V1ContainerPort(name="ignored", container_port=1)],
                ),
            ],
        ),
        status=client.V1PodStatus(**status),
    )  # fmt: skip


# -- core kinds ----------------------------------------------------------------------------


def test_a_running_pod_from_the_client_model() -> None:
    pod = parse_pod(
        v1_pod(
            phase="Running",
            pod_ip="10.244.1.5",
            **{
                attr(client.V1PodStatus, "podIPs"): [
                    client.V1PodIP(ip="10.244.1.5"),
                    client.V1PodIP(ip="fd00::5"),
                ]
            },
            conditions=[
                client.V1PodCondition(type="PodScheduled", status="True"),
                client.V1PodCondition(type="Ready", status="True"),
            ],
        )
    )
    assert pod == Pod(
        namespace="shop",
        name="web-7d9f8-abcde",
        node="node-1",
        ips=("10.244.1.5", "fd00::5"),
        service_account="web",
        labels={"app": "web", "pod-template-hash": "7d9f8"},
        annotations={"ambient.istio.io/redirection": "enabled"},
        phase="Running",
        ready=True,
        terminating=False,
        host_network=False,
        ports=(
            ContainerPort("http", 8080, "TCP"),
            ContainerPort("", 9090, "UDP"),
            ContainerPort("metrics", 15020, "TCP"),  # a sidecar (restartable init container)
        ),
        owner=Owner("ReplicaSet", "web-7d9f8"),
        uid="0b6f1c2e-1111-2222-3333-444455556666",
    )
    # The same pod as JSON (what a watch sends) parses the same.
    assert parse_pod(as_dict(v1_pod(phase="Running", pod_ip="10.244.1.5"))).ips == ("10.244.1.5",)


def test_pod_status_as_a_kubelet_reports_it() -> None:
    scheduled = parse_pod(v1_pod())  # just created: no status yet
    assert (scheduled.phase, scheduled.ips, scheduled.ready) == ("Pending", (), False)
    assert parse_pod(v1_pod(phase="Running", pod_ip="10.0.0.1")).ips == ("10.0.0.1",)
    not_ready = parse_pod(
        v1_pod(phase="Running", conditions=[client.V1PodCondition(type="Ready", status="False")])
    )
    assert not not_ready.ready
    assert parse_pod(v1_pod(phase="Weird")).phase == "Unknown"
    assert parse_pod(v1_pod(phase="Succeeded")).phase == "Succeeded"


def test_pod_defaults_and_special_cases() -> None:
    doc = {
        "metadata": {
            "name": "p",
            "namespace": "n",
            "deletionTimestamp": "2024-05-01T00:00:00Z",
        },
        "spec": {"hostNetwork": True, "serviceAccount": "legacy", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "172.30.0.11"},
    }
    pod = parse_pod(doc)
    assert pod.terminating and pod.host_network and pod.service_account == "legacy"
    assert pod.owner is None and pod.node == "" and pod.ports == ()
    del doc["spec"]["serviceAccount"]  # type: ignore[attr-defined]
    assert parse_pod(doc).service_account == "default"


def test_a_bad_container_port_is_left_out_and_reported() -> None:
    doc = {
        "metadata": {"name": "p", "namespace": "n", "labels": {"ok": "v", "bad": 3}},
        "spec": {"containers": [{"ports": [{"containerPort": "x"}, {"containerPort": 80}]}]},
    }
    problems: list[str] = []
    pod = parse_pod(doc, problems)
    assert pod.ports == (ContainerPort("", 80, "TCP"),) and pod.labels == {"ok": "v"}
    assert len(problems) == 2


def test_objects_without_a_name_are_refused() -> None:
    with pytest.raises(ModelError, match=r"metadata\.name"):
        parse_pod({"metadata": {"namespace": "n"}})
    with pytest.raises(ModelError, match=r"no metadata\.namespace"):
        parse_service({"metadata": {"name": "s"}})
    with pytest.raises(ModelError, match="cannot read"):
        as_dict(object())


def test_namespace_node_and_terminating() -> None:
    ns = client.V1Namespace(
        metadata=client.V1ObjectMeta(name="shop", labels={"istio.io/dataplane-mode": "ambient"})
    )
    assert parse_namespace(ns) == Namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    assert not is_terminating(ns)
    ns.status = client.V1NamespaceStatus(phase="Terminating")
    assert is_terminating(ns)
    node = {"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z"}}}
    assert parse_node(node) == Node("n1", {"topology.kubernetes.io/zone": "z"})


def test_services() -> None:
    svc = client.V1Service(
        metadata=client.V1ObjectMeta(name="web", namespace="shop", labels={"a": "b"}),
        spec=client.V1ServiceSpec(
            cluster_ip="10.96.0.10",
            **cast(Any, {attr(client.V1ServiceSpec, "clusterIPs"): ["10.96.0.10", "fd00:10::10"]}),
            selector={"app": "web"},
            ports=[
                client.V1ServicePort(name="http", port=80, target_port="http", app_protocol="http"),
                client.V1ServicePort(port=443, target_port=8443),
                client.V1ServicePort(port=53, protocol="UDP"),
                client.V1ServicePort(port=8000, target_port="8001"),
            ],
        ),
    )
    assert parse_service(svc) == Service(
        namespace="shop",
        name="web",
        vips=("10.96.0.10", "fd00:10::10"),
        ports=(
            ServicePort(80, "http", "TCP", "http", "http"),
            ServicePort(443, 8443, "TCP"),
            ServicePort(53, 0, "UDP"),
            ServicePort(8000, 8001, "TCP"),
        ),
        selector={"app": "web"},
        labels={"a": "b"},
    )
    headless = {
        "metadata": {"name": "h", "namespace": "shop"},
        "spec": {"clusterIP": "None", "selector": {}, "ports": [{"port": 0}]},
    }
    problems: list[str] = []
    parsed = parse_service(headless, problems)
    assert parsed.vips == () and parsed.selector is None and parsed.ports == ()
    assert problems


def test_gateways() -> None:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop", "labels": {"x": "y"}},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
        "status": {
            "addresses": [
                {"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"},
                {"value": "10.96.0.20"},  # type defaults to IPAddress
            ]
        },
    }
    gateway = parse_object(doc)
    assert isinstance(gateway, Gateway) and gateway == parse_gateway(doc)
    assert gateway.gateway_class == "istio-waypoint"
    assert gateway.listeners == (Listener("mesh", 15008, "HBONE"),)
    assert gateway.addresses == ("10.96.0.20",)
    assert gateway.hostname == "waypoint.shop.svc.cluster.local"


# -- security.istio.io ----------------------------------------------------------------------


def policy(spec: Any, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop", **meta},
        "spec": spec,
    }


def test_an_authorization_policy_as_written() -> None:
    spec = {
        "selector": {"matchLabels": {"app": "web"}},
        "action": "DENY",
        "rules": [
            {
                "from": [
                    {
                        "source": {
                            "principals": ["cluster.local/ns/a/sa/b"],
                            "notNamespaces": ["evil"],
                            "ipBlocks": ["10.0.0.0/8"],
                        }
                    }
                ],
                "to": [{"operation": {"ports": [8080, "9090"], "methods": ["GET"]}}],
                "when": [{"key": "source.ip", "values": ["10.1.0.0/16"]}],
            }
        ],
    }
    parsed = parse_authorization_policy(policy(spec, annotations={"istio.io/dry-run": "true"}))
    assert parsed == AuthorizationPolicy(
        namespace="shop",
        name="p",
        selector={"app": "web"},
        action="DENY",
        rules=(
            parsed.rules[0].__class__(
                sources=(
                    Source(
                        principals=("cluster.local/ns/a/sa/b",),
                        not_namespaces=("evil",),
                        ip_blocks=("10.0.0.0/8",),
                    ),
                ),
                operations=(Operation(ports=("8080", "9090"), methods=("GET",)),),
                conditions=(Condition("source.ip", ("10.1.0.0/16",)),),
            ),
        ),
        dry_run=True,
    )


def test_target_refs_and_defaults() -> None:
    parsed = parse_authorization_policy(
        policy(
            {
                "targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "w"},
                "targetRefs": [{"kind": "Service", "name": "web"}],
            }
        )
    )
    assert parsed.target_refs == (
        TargetRef("Gateway", "w", "gateway.networking.k8s.io"),
        TargetRef("Service", "web"),
    )
    empty = parse_authorization_policy(policy(None))
    assert (empty.action, empty.rules, empty.selector) == ("ALLOW", (), None)
    # An empty selector is no selector (the whole namespace), as in Istio.
    assert parse_authorization_policy(policy({"selector": {"matchLabels": {}}})).selector is None


@pytest.mark.parametrize(
    ("spec", "policy_fields", "rule_fields"),
    [
        ({"foo": 1}, ["foo"], []),
        ({"selector": {"matchExpressions": []}}, ["selector.matchExpressions"], []),
        ({"selector": {"matchLabels": {"a": 1}}}, ["selector.matchLabels"], []),
        ({"targetRefs": [{"name": "x"}]}, ["targetRefs[0]"], []),
        ({"rules": "all"}, ["rules"], []),
        ({"rules": [{"from": [{"source": {"serviceAccounts": ["a"]}}]}]}, [],
         ["from[0].source.serviceAccounts"]),
        ({"rules": [{"from": [{}]}]}, [], ["from[0].source"]),
        ({"rules": [{"to": [{"operation": {"ports": [{"x": 1}]}}]}]}, [],
         ["to[0].operation.ports"]),
        ({"rules": [{"when": [{"values": ["x"]}]}]}, [], ["when[0]"]),
        ({"rules": [{"whenever": []}]}, [], ["whenever"]),
        ({"rules": [{"from": "x"}]}, [], ["from"]),
    ],
)  # fmt: skip
def test_what_cannot_be_read_is_unrecognized(
    spec: dict[str, Any], policy_fields: list[str], rule_fields: list[str]
) -> None:
    problems: list[str] = []
    parsed = parse_authorization_policy(policy(spec), problems)
    assert list(parsed.unrecognized) == policy_fields
    assert [f for r in parsed.rules for f in r.unrecognized] == rule_fields
    assert len(problems) == len(policy_fields) + len(rule_fields)


def test_an_unreadable_allow_allows_nothing() -> None:
    """Fail closed end to end: the unread field makes translation's ALLOW never match."""
    ap = parse_authorization_policy(
        policy(
            {
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"serviceAccounts": ["shop/web"]}}]}],
            }
        )
    )
    translation = translate(Model.of(authorization_policies=[ap]))
    assert translation.authorizations["shop/p"].rules == []
    assert [f.reason for f in translation.findings] == [UNRECOGNIZED_FIELD]


def test_peer_authentication() -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {
            "name": "pa",
            "namespace": "shop",
            "creationTimestamp": "2024-05-01T00:00:00Z",
        },
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
        },
    }
    pa = parse_peer_authentication(doc)
    assert (pa.selector, pa.mode, dict(pa.port_level)) == (
        {"app": "web"},
        "STRICT",
        {8080: "PERMISSIVE"},
    )
    assert pa.created == dt.datetime(2024, 5, 1, tzinfo=dt.UTC).timestamp()
    assert parse_peer_authentication({**doc, "spec": {}}).mode == "UNSET"


@pytest.mark.parametrize(
    "spec",
    [
        {"mtls": {"mode": "STRICT", "extra": 1}},
        {"mtls": {"mode": 1}},
        {"portLevelMtls": {"http": {"mode": "DISABLE"}}},
        {"portLevelMtls": {"80": "DISABLE"}},
        {"mtls": {"mode": "PERMISSIVE"}, "future": True},
    ],
)
def test_an_unreadable_peer_authentication_is_enforced_strict(spec: dict[str, Any]) -> None:
    problems: list[str] = []
    doc = {"metadata": {"name": "pa", "namespace": "istio-system"}, "spec": spec}
    pa = parse_peer_authentication(doc, problems)
    assert pa.mode == UNREADABLE_MODE and problems
    model = Model.of(
        namespaces=[Namespace("shop")], pods=[Pod("shop", "p")], peer_authentications=[pa]
    )
    translation = translate(model)
    assert translation.workloads["Kubernetes//Pod/shop/p"].authorization_policies  # STRICT


def test_parse_object_refuses_what_it_does_not_know() -> None:
    with pytest.raises(ModelError, match="not supported"):
        parse_object({"apiVersion": "apps/v1", "kind": "Deployment"})
    with pytest.raises(ModelError, match="not supported"):
        parse_object(policy({}), kinds=["Gateway"])


# -- the Kubernetes registry's pure parts -----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "temporary", "kind"),
    [
        (410, True, ResourceExpired),
        (429, True, ApiError),
        (500, True, ApiError),
        (503, True, ApiError),
        (401, False, ApiError),
        (403, False, ApiError),
        (404, False, ApiError),
        (422, False, ApiError),
    ],
)
def test_api_errors_are_classified(status: int, temporary: bool, kind: type) -> None:
    error = classify(ApiException(status=status, reason="Reason"), "list pods")
    assert isinstance(error, kind) and error.temporary is temporary and error.status == status
    assert "list pods" in str(error)
    if status == 403:
        assert "ClusterRole" in str(error)


def test_transport_errors_are_temporary() -> None:
    error = classify(ConnectionRefusedError("refused"), "watch pods")
    assert error.temporary and error.status == 0 and "reachable" in str(error)
    assert api_error(410, "Expired", "watch x").temporary


def test_backoff() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0, permanent=60.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5
    assert backoff.next_delay(temporary=False) == 60.0
    jittered = Backoff(initial=1.0, jitter=0.2)
    assert all(0.8 <= Backoff(initial=1.0, jitter=0.2).next_delay() <= 1.2 for _ in range(50))
    assert jittered.failures == 0


class _Chunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self, amt: int | None = None, decode_content: bool = True) -> Iterator[bytes]:
        yield from self.chunks


def test_watch_lines_are_reassembled_across_chunks() -> None:
    chunks = [b'{"type":"ADDED","obj', b'ect":{}}\n{"type"', b':"DELETED","object":{}}\n\n', b"{}"]
    assert list(_lines(_Chunks(chunks))) == [
        b'{"type":"ADDED","object":{}}',
        b'{"type":"DELETED","object":{}}',
        b"{}",
    ]


def test_the_readme_shows_the_cluster_role() -> None:
    """The ClusterRole in the README is the code's (CLUSTER_ROLE_RULES)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    roles = [
        d for b in blocks for d in yaml.safe_load_all(b) if d and d.get("kind") == "ClusterRole"
    ]
    assert roles == [cluster_role()]
    verbs = {(g, r): rule["verbs"] for rule in CLUSTER_ROLE_RULES for g in rule["apiGroups"]
             for r in rule["resources"] if "resourceNames" not in rule}  # fmt: skip
    assert verbs["authentication.k8s.io", "tokenreviews"] == ["create"]
    assert "delete" not in {v for vs in verbs.values() for v in vs}
