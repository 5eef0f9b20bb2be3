"""The Kubernetes registry against a real kube-apiserver (k8s tier).

The real discovery server (:class:`DiscoveryServer`: Delta ADS + the CA, TLS on
loopback) runs the :class:`KubernetesRegistry` and the root certificate
publisher as a service account that has exactly the README's ClusterRole
(:func:`cluster_role`). Objects are created through the real API as an admin,
a kubelet or a user would; a real gRPC Delta ADS client
(:class:`tests.discovery.test_server.Client`, as ztunnel) sees them arrive
as resources and deltas. The session's cluster is shared: every name here
starts with a unique prefix and assertions look only at this module's
objects. Waits are on the client's condition, the registry's first sync or a
Kubernetes watch; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from discovery.authorization import static_strict_resource_name
from discovery.registries.kubernetes import (
    AUTHORIZATION_POLICIES,
    CLUSTER_ROLE_RULES,
    ROOT_CERT_CONFIGMAP,
    Kind,
    KubernetesRegistry,
    cluster_role,
)
from discovery.registries.objects import parse_authorization_policy
from discovery.registries.retry import Backoff
from discovery.registries.rootcert import ROOT_CERT_KEY, RootCertPublisher
from discovery.server import DiscoveryServer
from discovery.translate import TranslateConfig
from identity.auth import Authorizer, KubernetesTokenReviewAuthenticator
from identity.ca import CertificateAuthority, build_csr, generate_workload_key
from identity.client import CaClient
from identity.errors import IdentityError
from identity.server import CaMetrics, CaServicer
from identity.spiffe import SpiffeId
from tests.discovery.test_server import Client, synced
from tests.support.kubecluster import KubeCluster
from tests.support.kubeobjects import (
    MERGE_PATCH,
    ensure_service_account,
    pod_token,
    service_account_token,
    unique_name,
    wait_until_allowed,
)
from underpass.proto import authorization_pb2, workload_pb2
from underpass.xds.client import ClientEvent, ResourcesReceived
from underpass.xds.grpc_client import CHANNEL_OPTIONS
from underpass.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL

pytestmark = pytest.mark.k8s

TD = "cluster.local"
SECURITY = ("security.istio.io", "v1")
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
TIMEOUT = 20.0


# -- the scene ----------------------------------------------------------------------------------


@dataclass
class Env:
    cluster: KubeCluster
    prefix: str
    mesh_namespace: str  # the mesh's own namespace (ztunnel, the discovery service account)
    ca: CertificateAuthority
    registry: KubernetesRegistry
    publisher: RootCertPublisher
    server: DiscoveryServer
    namespaces: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    cluster_objects: list[tuple[str, str]] = field(default_factory=list)
    #: A ztunnel pod's token (pod-bound, audience istio-ca): what the mesh client sends.
    ztunnel_token: str = ""

    @property
    def api(self) -> Any:
        return self.cluster.api

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> Any:
        return client.CustomObjectsApi(self.api)

    def namespace(self, labels: dict[str, str] | None = None) -> str:
        name = unique_name(self.prefix)
        self.core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        self.namespaces.append(name)
        return name

    def node(self, labels: dict[str, str] | None = None) -> str:
        name = unique_name(f"{self.prefix}-node")
        self.core.create_node({"metadata": {"name": name, "labels": labels or {}}})
        self.nodes.append(name)
        return name

    def channel(self) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca.root_bundle_pem.encode())
        options = [("grpc.ssl_target_name_override", "localhost"), *CHANNEL_OPTIONS]
        return grpc.secure_channel(self.server.tls_address, credentials, options=options)

    def ca_client(self, token: str) -> CaClient:
        return CaClient(
            self.server.tls_address, self.ca.root_bundle_pem, token, server_name="localhost"
        )


def make_pod(
    env: Env,
    namespace: str,
    name: str,
    *,
    node: str,
    service_account: str,
    labels: dict[str, str] | None = None,
) -> Any:
    """A pod as the scheduler leaves it: bound to ``node``, no status yet."""
    ensure_service_account(env.api, namespace, service_account)
    body = {
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "containers": [
                {
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ],
        },
    }
    return env.core.create_namespaced_pod(namespace, body)


def report_running(env: Env, namespace: str, name: str, ip: str) -> Any:
    """What the kubelet reports once the pod runs: IP, phase, readiness (status subresource)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.0.2.1",
            "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
        }
    }
    return env.core.patch_namespaced_pod_status(name, namespace, status, _content_type=MERGE_PATCH)


def create_policy(env: Env, namespace: str, plural: str, kind: str, name: str, spec: Any) -> None:
    body = {
        "apiVersion": "/".join(SECURITY),
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }
    env.custom.create_namespaced_custom_object(*SECURITY, namespace, plural, body)


def delete_everything_in(env: Env, namespace: str) -> None:
    """What the namespace controller would do (none runs here), then finalize."""
    core = env.core
    with contextlib.suppress(ApiException):
        core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
    for item in core.list_namespaced_service(namespace).items:
        core.delete_namespaced_service(item.metadata.name, namespace)
    core.delete_collection_namespaced_config_map(namespace)
    for item in core.list_namespaced_service_account(namespace).items:
        core.delete_namespaced_service_account(item.metadata.name, namespace)
    for group, version, plural in (
        (*SECURITY, "authorizationpolicies"),
        (*SECURITY, "peerauthentications"),
        ("gateway.networking.k8s.io", "v1", "gateways"),
    ):
        env.custom.delete_collection_namespaced_custom_object(group, version, namespace, plural)
    core.delete_namespace(namespace)
    body = {"metadata": {"name": namespace}, "spec": {"finalizers": []}}
    core.replace_namespace_finalize(namespace, body)


class MeshClient(Client):
    """The Delta ADS client of test_server, also keeping the Authorization resources.

    Over TLS it sends ``token`` and names a node in ``namespace``, as a ztunnel does.
    """

    def __init__(self, channel: grpc.Channel, token: str | None, namespace: str) -> None:
        super().__init__(channel, name=unique_name("zt"), token=token, namespace=namespace)
        self.authorizations: dict[str, authorization_pb2.Authorization] = {}

    def on_event(self, event: ClientEvent) -> None:
        with self.cond:
            if isinstance(event, ResourcesReceived) and event.type_url == AUTHORIZATION_TYPE_URL:
                for r in event.updated:
                    assert isinstance(r.message, authorization_pb2.Authorization)
                    self.authorizations[r.name] = r.message
                for name in event.removed:
                    self.authorizations.pop(name, None)
        super().on_event(event)

    def wait(self, predicate: Callable[[MeshClient], bool], timeout: float = TIMEOUT) -> None:
        super().wait(lambda _client: predicate(self), timeout)

    def workload(self, uid: str) -> workload_pb2.Workload:
        with self.cond:
            return self.state[uid].workload

    def last_delta(self, type_url: str = ADDRESS_TYPE_URL) -> ResourcesReceived:
        with self.cond:
            return [
                e
                for e in self.events
                if isinstance(e, ResourcesReceived) and e.type_url == type_url
            ][-1]


@contextlib.contextmanager
def mesh_client(env: Env) -> Iterator[MeshClient]:
    with env.channel() as channel:
        mesh = MeshClient(channel, env.ztunnel_token, env.mesh_namespace)
        mesh.start()
        try:
            mesh.wait(synced, TIMEOUT)
            yield mesh
        finally:
            mesh.stop()


def bind_cluster_role(env: Env, name: str, rules: Any, service_account: str) -> None:
    rbac: Any = client.RbacAuthorizationV1Api(env.api)
    role = cluster_role(name)
    role["rules"] = [dict(r) for r in rules]
    rbac.create_cluster_role(role)
    env.cluster_objects.append(("clusterrole", name))
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": service_account,
                    "namespace": env.mesh_namespace,
                }
            ],
        }
    )
    env.cluster_objects.append(("clusterrolebinding", name))


def service_account_client(env: Env, name: str) -> Any:
    ensure_service_account(env.api, env.mesh_namespace, name)
    token = service_account_token(env.api, env.mesh_namespace, name)
    return env.cluster.api_client_for_token(token)


@pytest.fixture(scope="module")
def env(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    prefix = unique_name("dsc")
    api = kube_cluster.api
    mesh_namespace = f"{prefix}-mesh"
    core: Any = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": mesh_namespace}})
    ca = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("k8s-discovery") / "ca", TD)
    env = Env(
        cluster=kube_cluster,
        prefix=prefix,
        mesh_namespace=mesh_namespace,
        ca=ca,
        registry=None,  # type: ignore[arg-type]
        publisher=None,  # type: ignore[arg-type]
        server=None,  # type: ignore[arg-type]
        namespaces=[mesh_namespace],
    )
    sa_api: Any = None
    try:
        # The discovery process's own identity, with exactly the README's ClusterRole.
        bind_cluster_role(env, f"{prefix}-discovery", CLUSTER_ROLE_RULES, "discovery")
        sa_api = service_account_client(env, "discovery")
        wait_until_allowed(
            api, f"system:serviceaccount:{mesh_namespace}:discovery", "", "pods", "watch"
        )
        env.publisher = RootCertPublisher(
            sa_api,
            lambda: ca.root_bundle_pem,
            namespace_filter=lambda ns: ns.startswith(prefix),  # the cluster is shared
        )
        env.registry = KubernetesRegistry(sa_api, root_cert_publisher=env.publisher)
        metrics = CollectorRegistry()
        env.server = DiscoveryServer(
            env.registry,
            config=TranslateConfig(mesh_namespace=mesh_namespace),
            ca=ca,
            ca_servicer=CaServicer(
                ca,
                KubernetesTokenReviewAuthenticator(client.AuthenticationV1Api(sa_api), TD),
                Authorizer(TD, env.registry.node_index, [(mesh_namespace, "ztunnel")]),
                metrics=CaMetrics(metrics),
            ),
            listen="127.0.0.1:0",
            serving_dns_names=["localhost"],
            metrics_registry=metrics,
            quiet=0.02,
        )
        env.server.start()
        assert env.registry.wait_synced(TIMEOUT), "the registry never listed every kind"
        # The mesh client's identity: a ztunnel pod's projected token, as a node would have.
        ensure_service_account(api, mesh_namespace, "ztunnel")
        ztunnel = core.create_namespaced_pod(
            mesh_namespace,
            {
                "metadata": {"name": "ztunnel-xds"},
                "spec": {
                    "serviceAccountName": "ztunnel",
                    "containers": [{"name": "ztunnel", "image": "registry.invalid/ztunnel:1"}],
                },
            },
        )
        env.ztunnel_token = pod_token(api, ztunnel, expiration_seconds=3600)
        yield env
    finally:
        if env.server is not None:
            env.server.stop(grace=0)  # stops the registry and the publisher first
        if sa_api is not None:
            sa_api.close()
        for namespace in env.namespaces:
            delete_everything_in(env, namespace)
        for node in env.nodes:
            core.delete_node(node)
        rbac = client.RbacAuthorizationV1Api(api)
        for kind, name in reversed(env.cluster_objects):
            if kind == "clusterrole":
                rbac.delete_cluster_role(name)
            else:
                rbac.delete_cluster_role_binding(name)
        left = [
            n.metadata.name
            for n in core.list_namespace().items
            if n.metadata.name.startswith(prefix)
        ]
        assert left == [], f"namespaces left behind: {left}"


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


# -- objects through the real API reach a Delta ADS client -------------------------------------


def test_pods_services_and_policies_reach_a_delta_ads_client(env: Env) -> None:
    ns = env.namespace()
    node = env.node({"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1"})
    uid = f"Kubernetes//Pod/{ns}/web-0"
    service = f"{ns}/web.{ns}.svc.cluster.local"
    with mesh_client(env) as mesh:
        # Scheduled, not yet running: a workload without address, unhealthy.
        make_pod(env, ns, "web-0", node=node, service_account="web", labels={"app": "web"})
        mesh.wait(lambda c: uid in c.state, TIMEOUT)
        workload = mesh.workload(uid)
        assert (workload.node, workload.service_account) == (node, "web")
        assert list(workload.addresses) == [] and workload.status == workload_pb2.UNHEALTHY
        assert workload.tunnel_protocol == workload_pb2.NONE  # namespace not in the mesh
        assert (workload.locality.region, workload.locality.zone) == ("r1", "z1")

        # The kubelet reports it running: the address arrives as a delta of that workload alone.
        report_running(env, ns, "web-0", "10.244.9.5")
        mesh.wait(lambda c: list(c.workload(uid).addresses) == [packed("10.244.9.5")], TIMEOUT)
        assert mesh.workload(uid).status == workload_pb2.HEALTHY
        assert {r.name for r in mesh.last_delta().updated} == {uid}

        # A Service: its resource, and the workload's port mapping (named target port).
        env.core.create_namespaced_service(
            ns,
            {
                "metadata": {"name": "web"},
                "spec": {
                    "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                },
            },
        )
        mesh.wait(lambda c: service in c.workload(uid).services and service in c.state, TIMEOUT)
        assert [
            (p.service_port, p.target_port) for p in mesh.workload(uid).services[service].ports
        ] == [(80, 8080)]
        vip = env.core.read_namespaced_service("web", ns).spec.cluster_ip
        assert list(mesh.state[service].service.addresses[0].address) == list(packed(vip))

        # Labelling the namespace switches its pods' workloads to HBONE.
        env.core.patch_namespace(ns, {"metadata": {"labels": AMBIENT}})
        mesh.wait(lambda c: c.workload(uid).tunnel_protocol == workload_pb2.HBONE, TIMEOUT)
        assert {r.name for r in mesh.last_delta().updated} == {uid}

        # Policies: an AuthorizationPolicy becomes an Authorization and is listed by the
        # workload it selects; a STRICT PeerAuthentication adds the static strict policy.
        create_policy(
            env,
            ns,
            "authorizationpolicies",
            "AuthorizationPolicy",
            "deny-evil",
            {
                "selector": {"matchLabels": {"app": "web"}},
                "action": "DENY",
                "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}],
            },
        )
        create_policy(
            env, ns, "peerauthentications", "PeerAuthentication", "strict",
            {"mtls": {"mode": "STRICT"}},
        )  # fmt: skip
        policy = f"{ns}/deny-evil"
        strict = static_strict_resource_name("istio-system")
        mesh.wait(
            lambda c: (
                policy in c.authorizations
                and {policy, strict} <= set(c.workload(uid).authorization_policies)
            ),
            TIMEOUT,
        )
        assert mesh.authorizations[policy].action == authorization_pb2.DENY
        assert mesh.authorizations[policy].scope == authorization_pb2.WORKLOAD_SELECTOR

        # Deletes arrive as removals.
        env.custom.delete_namespaced_custom_object(
            *SECURITY, ns, "authorizationpolicies", "deny-evil"
        )
        mesh.wait(lambda c: policy not in c.authorizations, TIMEOUT)
        assert list(mesh.last_delta(AUTHORIZATION_TYPE_URL).removed) == [policy]
        env.core.delete_namespaced_service("web", ns)
        mesh.wait(lambda c: service not in c.state, TIMEOUT)
        env.core.delete_namespaced_pod("web-0", ns, grace_period_seconds=0)
        mesh.wait(lambda c: uid not in c.state, TIMEOUT)
        assert list(mesh.last_delta().removed) == [uid]


def test_a_watch_resumes_after_410_gone(env: Env) -> None:
    """A watch resumed from a version the API server no longer has (as after a long
    disconnection) gets a real 410 Gone; the registry lists again and misses nothing."""
    ns = env.namespace()
    watcher = env.registry.watcher("authorizationpolicies")
    before = watcher.stats.expired, watcher.stats.lists
    with mesh_client(env) as mesh:
        watcher.interrupt(resume_from="1")
        create_policy(
            env, ns, "authorizationpolicies", "AuthorizationPolicy", "after-gone",
            {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]},
        )  # fmt: skip
        mesh.wait(lambda c: f"{ns}/after-gone" in c.authorizations, TIMEOUT)
    assert watcher.stats.expired == before[0] + 1
    assert watcher.stats.lists == before[1] + 1


def test_every_kind_resumes_after_a_broken_watch(env: Env) -> None:
    """A broken connection (no 410): the watch resumes from its version, no list again."""
    ns = env.namespace()
    watcher = env.registry.watcher("pods")
    lists = watcher.stats.lists
    node = env.node()
    with mesh_client(env) as mesh:
        watcher.interrupt()
        make_pod(env, ns, "late-0", node=node, service_account="late")
        mesh.wait(lambda c: f"Kubernetes//Pod/{ns}/late-0" in c.state, TIMEOUT)
    assert watcher.stats.lists == lists


# -- the root certificate ConfigMap -----------------------------------------------------------


def wait_for_configmap(
    env: Env, namespace: str, predicate: Callable[[dict[str, str] | None], bool]
) -> dict[str, str] | None:
    """Wait on a Kubernetes watch until the ConfigMap's data satisfies ``predicate``."""
    core = env.core
    selector = f"metadata.name={ROOT_CERT_CONFIGMAP}"
    listed = core.list_namespaced_config_map(namespace, field_selector=selector)
    data = listed.items[0].data if listed.items else None
    if predicate(data):
        return data
    watches: Any = watch  # untyped
    stream = watches.Watch()
    for event in stream.stream(
        core.list_namespaced_config_map,
        namespace,
        field_selector=selector,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=int(TIMEOUT),
    ):
        data = None if event["type"] == "DELETED" else event["object"].data
        if predicate(data):
            stream.stop()
            return data
    raise AssertionError(f"ConfigMap in {namespace} never matched; last data: {data}")


def test_the_root_certificate_is_published_into_a_new_namespace(env: Env) -> None:
    root = env.ca.root_bundle_pem
    ns = env.namespace()
    wait_for_configmap(env, ns, lambda d: d == {ROOT_CERT_KEY: root})
    cm = env.core.read_namespaced_config_map(ROOT_CERT_CONFIGMAP, ns)
    assert cm.metadata.labels == {"istio.io/config": "true"}

    # Edited: corrected, and a key someone else added stays.
    cm.data = {ROOT_CERT_KEY: "tampered", "extra.pem": "theirs"}
    env.core.replace_namespaced_config_map(ROOT_CERT_CONFIGMAP, ns, cm)
    data = wait_for_configmap(env, ns, lambda d: d is not None and d[ROOT_CERT_KEY] == root)
    assert data == {ROOT_CERT_KEY: root, "extra.pem": "theirs"}

    # Deleted: created again.
    env.core.delete_namespaced_config_map(ROOT_CERT_CONFIGMAP, ns)
    wait_for_configmap(env, ns, lambda d: d == {ROOT_CERT_KEY: root})


# -- the CA's impersonation check uses the watched pods -----------------------------------------


def test_impersonation_is_checked_against_the_watched_pods(env: Env) -> None:
    ns = env.namespace(AMBIENT)
    here, there = env.node(), env.node()
    ztunnel = make_pod(
        env, env.mesh_namespace, unique_name("ztunnel"), node=here, service_account="ztunnel"
    )
    ztunnel = report_running(env, env.mesh_namespace, ztunnel.metadata.name, "192.0.2.11")
    make_pod(env, ns, "web-0", node=here, service_account="web")
    make_pod(env, ns, "db-0", node=there, service_account="db")
    with mesh_client(env) as mesh:
        mesh.wait(
            lambda c: {f"Kubernetes//Pod/{ns}/web-0", f"Kubernetes//Pod/{ns}/db-0"} <= set(c.state),
            TIMEOUT,
        )
        token = pod_token(env.api, ztunnel)

        def issue(service_account: str) -> list[str]:
            identity = SpiffeId(TD, ns, service_account)
            csr = build_csr(generate_workload_key(), identity)
            with env.ca_client(token) as ca:
                return ca.create_certificate(csr, dt.timedelta(hours=1), impersonate=identity)

        assert len(issue("web")) >= 2  # a (pending) web pod runs on the ztunnel's node
        with pytest.raises(IdentityError):
            issue("db")  # only on the other node
        env.core.delete_namespaced_pod("web-0", ns, grace_period_seconds=0)
        mesh.wait(lambda c: f"Kubernetes//Pod/{ns}/web-0" not in c.state, TIMEOUT)
        with pytest.raises(IdentityError):
            issue("web")  # no longer there


# -- xDS clients on the TLS port are authenticated with TokenReviews -----------------------------


def test_xds_clients_are_authenticated_with_token_reviews(env: Env) -> None:
    ns = env.namespace(AMBIENT)
    node = env.node()
    web = make_pod(env, ns, "web-0", node=node, service_account="web")
    bad_tokens = {
        # Not bound to a pod, and for the API server's audience, not istio-ca.
        "unbound token": service_account_token(env.api, env.mesh_namespace, "ztunnel"),
        "garbage": "not-a-jwt-0123456789",
    }
    with env.channel() as channel:

        def refusal(token: str) -> str:
            """Run a client with ``token``: the error that ended its stream (no state)."""
            refused = MeshClient(channel, token, env.mesh_namespace).start()
            try:
                with refused.cond:
                    assert refused.cond.wait_for(lambda: refused.error is not None, TIMEOUT)
                assert not refused.state
                return str(refused.error)
            finally:
                refused.stop()

        for case, token in bad_tokens.items():
            assert "UNAUTHENTICATED" in refusal(token), case
        # A good token of a pod of another namespace, for a node of the mesh's namespace.
        assert "PERMISSION_DENIED" in refusal(pod_token(env.api, web))
    with mesh_client(env) as mesh:  # the ztunnel's pod-bound token: served
        mesh.wait(lambda c: f"Kubernetes//Pod/{ns}/web-0" in c.state, TIMEOUT)


# -- fail closed on missing RBAC --------------------------------------------------------------


def test_no_model_without_read_access_to_policies_until_rbac_is_fixed(env: Env) -> None:
    """Serving workloads without their policies would let traffic through: the registry
    delivers nothing until it can read AuthorizationPolicies, then syncs without restart."""
    name = f"{env.prefix}-partial"
    without_policies = [
        {**rule, "resources": [r for r in rule["resources"] if r != "authorizationpolicies"]}
        for rule in CLUSTER_ROLE_RULES
    ]
    bind_cluster_role(env, name, without_policies, "partial")
    api = service_account_client(env, "partial")
    user = f"system:serviceaccount:{env.mesh_namespace}:partial"
    wait_until_allowed(env.api, user, "", "pods", "watch")
    registry = KubernetesRegistry(api, backoff=lambda: Backoff(initial=0.05, permanent=0.2))
    models: list[Any] = []
    registry.start(models.append)
    try:
        assert not registry.wait_synced(2.0)  # (bounded: asserting that nothing happens)
        assert models == [] and not registry.node_index.ready
        assert registry.watcher("authorizationpolicies").stats.errors >= 1
        client.RbacAuthorizationV1Api(env.api).patch_cluster_role(
            name, {"rules": [dict(r) for r in CLUSTER_ROLE_RULES]}
        )
        wait_until_allowed(env.api, user, "security.istio.io", "authorizationpolicies", "list")
        assert registry.wait_synced(TIMEOUT)
        assert len(models) >= 1 and registry.node_index.ready
    finally:
        registry.stop()
        api.close()


def test_a_missing_crd_means_no_objects_but_a_missing_version_blocks(env: Env) -> None:
    """No API group: none of its objects can exist. The group in other versions only:
    objects may exist that cannot be read, so nothing is served (fail closed)."""
    absent = Kind(
        "widgets", "absent.underpass.dev", "v1", "authorization_policies",
        parse_authorization_policy, custom=True,
    )  # fmt: skip
    registry = KubernetesRegistry(env.api, kinds=[absent])
    models: list[Any] = []
    registry.start(models.append)
    try:
        assert registry.wait_synced(TIMEOUT)
        assert models[-1].authorization_policies == {}
    finally:
        registry.stop()

    unserved = dataclasses.replace(AUTHORIZATION_POLICIES, version="v9")
    registry = KubernetesRegistry(env.api, kinds=[unserved])
    registry.start(models.append)
    try:
        assert not registry.wait_synced(2.0)  # (bounded: asserting that nothing happens)
        assert registry.watcher("authorizationpolicies").stats.errors >= 1
    finally:
        registry.stop()


# -- the command ------------------------------------------------------------------------------


def test_discovery_serve_with_the_kubernetes_registry(env: Env, tmp_path: Path) -> None:
    """``underpass discovery serve --registry kubernetes`` as a process, with a kubeconfig."""
    ns = env.namespace(AMBIENT)
    node = env.node()
    make_pod(env, ns, "cli-0", node=node, service_account="cli")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "underpass.cli.main", "--log-format", "json",
            "discovery", "serve", "--registry", "kubernetes",
            "--kubeconfig", str(env.cluster.kubeconfig),
            "--no-root-cert-configmaps", "--no-ca-service",
            "--listen", "127.0.0.1:0", "--plaintext-listen", "127.0.0.1:0",
            "--serving-dns", "localhost", "--state-dir", str(tmp_path / "ca"),
            "--metrics-port", "-1", "--debounce", "0.02",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready: "), ready
        fields = dict(part.split("=", 1) for part in ready.split()[1:])
        assert fields["registry"] == "kubernetes"
        with grpc.insecure_channel(fields["plaintext"], options=CHANNEL_OPTIONS) as channel:
            mesh = MeshClient(channel, None, env.mesh_namespace)  # plaintext: no token
            mesh.start()
            try:
                uid = f"Kubernetes//Pod/{ns}/cli-0"
                mesh.wait(lambda c: uid in c.state, TIMEOUT)
                assert mesh.workload(uid).tunnel_protocol == workload_pb2.HBONE
            finally:
                mesh.stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
