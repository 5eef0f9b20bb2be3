"""The CA's Kubernetes side against a real kube-apiserver (k8s tier).

The real :class:`CaServer` authenticates callers with TokenReviews
(:class:`KubernetesTokenReviewAuthenticator`) and checks impersonation with pod
lists (:class:`KubernetesNodeIndex`), as its own least-privileged service
account. Callers present tokens that the TokenRequest API bound to their pods,
as a kubelet's projected volume would. Nodes ``node-1`` and ``node-2`` have
pods; a ztunnel runs on ``node-1``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry

from identity.auth import Authorizer, KubernetesNodeIndex, KubernetesTokenReviewAuthenticator
from identity.ca import CertificateAuthority, build_csr, generate_workload_key
from identity.certs import WorkloadCertificate
from identity.client import CaClient
from identity.errors import AuthenticationFailed, CertificateUnavailable
from identity.server import CaServer
from identity.spiffe import SpiffeId
from tests.support.kubecluster import KubeCluster
from tests.support.kubeobjects import (
    ensure_namespace,
    ensure_node,
    ensure_service_account,
    grant_cluster_role,
    pod_token,
    run_pod,
    service_account_token,
    unique_name,
)

pytestmark = pytest.mark.k8s

TD = "cluster.local"
HOUR = dt.timedelta(hours=1)
# What the CA's service account needs, and all it gets.
CA_RULES = (
    ("authentication.k8s.io", "tokenreviews", ("create",)),
    ("", "pods", ("list",)),
)


@dataclass
class Scene:
    cluster: KubeCluster
    namespace: str
    web: Any  # V1Pod, service account "web", Running on node-1
    db: Any  # V1Pod, service account "db", Running on node-2
    batch: Any  # V1Pod, service account "batch", Succeeded on node-1
    ztunnel: Any  # V1Pod, istio-system/ztunnel, Running on node-1
    ca_namespace: str
    ca_service_account: str
    ca_api: Any  # ApiClient acting as the CA's service account
    ca_dir: Path

    def identity(self, service_account: str) -> SpiffeId:
        return SpiffeId(TD, self.namespace, service_account)

    def token(self, pod: Any, audiences: tuple[str, ...] = ("istio-ca",)) -> str:
        return pod_token(self.cluster.api, pod, audiences)

    def authenticator(self) -> KubernetesTokenReviewAuthenticator:
        return KubernetesTokenReviewAuthenticator(client.AuthenticationV1Api(self.ca_api), TD)


@pytest.fixture(scope="module")
def scene(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    api = kube_cluster.api
    namespace = unique_name("caauth")
    for node in ("node-1", "node-2"):
        ensure_node(api, node)
    ensure_namespace(api, namespace)
    ensure_namespace(api, "istio-system")
    for sa in ("web", "db", "batch"):
        ensure_service_account(api, namespace, sa)
    ensure_service_account(api, "istio-system", "ztunnel")
    web = run_pod(api, namespace, "web-0", service_account="web", node="node-1", pod_ip="10.1.1.5")
    db = run_pod(api, namespace, "db-0", service_account="db", node="node-2", pod_ip="10.1.2.7")
    batch = run_pod(
        api,
        namespace,
        "batch-0",
        service_account="batch",
        node="node-1",
        pod_ip="10.1.1.9",
        phase="Succeeded",
    )
    ztunnel = run_pod(
        api,
        "istio-system",
        unique_name("ztunnel"),
        service_account="ztunnel",
        node="node-1",
        pod_ip="192.0.2.11",
    )
    ca_sa = unique_name("underpass-ca")
    ensure_service_account(api, "istio-system", ca_sa)
    grant_cluster_role(api, ca_sa, CA_RULES, namespace="istio-system", service_account=ca_sa)
    ca_api = kube_cluster.api_client_for_token(service_account_token(api, "istio-system", ca_sa))
    try:
        yield Scene(
            cluster=kube_cluster,
            namespace=namespace,
            web=web,
            db=db,
            batch=batch,
            ztunnel=ztunnel,
            ca_namespace="istio-system",
            ca_service_account=ca_sa,
            ca_api=ca_api,
            ca_dir=tmp_path_factory.mktemp("k8s-ca"),
        )
    finally:
        ca_api.close()


@dataclass
class RunningCa:
    server: CaServer
    root_pem: str

    def client(self, token: str) -> CaClient:
        return CaClient(self.server.address, self.root_pem, token, server_name="localhost")


def start_ca(scene: Scene, api: Any) -> CaServer:
    ca = CertificateAuthority.load_or_create(scene.ca_dir / "state", TD)
    authenticator = KubernetesTokenReviewAuthenticator(client.AuthenticationV1Api(api), TD)
    node_index = KubernetesNodeIndex(client.CoreV1Api(api))
    server = CaServer(
        ca,
        authenticator,
        Authorizer(TD, node_index),
        listen="127.0.0.1:0",
        serving_dns_names=["localhost"],
        serving_ips=["127.0.0.1"],
        registry=CollectorRegistry(),
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def ca(scene: Scene) -> Iterator[RunningCa]:
    server = start_ca(scene, scene.ca_api)
    try:
        yield RunningCa(server, server.ca.root_bundle_pem)
    finally:
        server.stop(grace=0)


def request_certificate(
    ca: RunningCa, token: str, identity: SpiffeId, impersonate: SpiffeId | None = None
) -> WorkloadCertificate:
    key = generate_workload_key()
    with ca.client(token) as caller:
        chain = caller.create_certificate(build_csr(key, identity), HOUR, impersonate=impersonate)
    return WorkloadCertificate.from_ca_response(identity, key, chain)


# -- the TokenReview authenticator on its own ---------------------------------------------


def test_a_pod_bound_token_names_the_pod_and_its_node(scene: Scene) -> None:
    caller = scene.authenticator().authenticate(
        {"authorization": f"Bearer {scene.token(scene.web)}"}
    )
    assert caller.identity == scene.identity("web")
    assert caller.pod_name == "web-0"
    assert caller.pod_uid == scene.web.metadata.uid
    assert caller.node == "node-1"


def test_a_token_outliving_its_pod_is_refused(scene: Scene) -> None:
    api = scene.cluster.api
    gone = run_pod(
        api, scene.namespace, "gone-0", service_account="web", node="node-1", pod_ip="10.1.1.6"
    )
    token = scene.token(gone)
    # No kubelet confirms a graceful deletion: delete at once, as `--force` does.
    client.CoreV1Api(api).delete_namespaced_pod("gone-0", scene.namespace, grace_period_seconds=0)
    # The API server checks the binding against its pod informer, and caches a
    # successful review for 10 s: the refusal is prompt, but only eventual.
    deadline = time.monotonic() + 15
    with pytest.raises(AuthenticationFailed) as info:
        while time.monotonic() < deadline:
            scene.authenticator().authenticate({"authorization": f"Bearer {token}"})
            time.sleep(0.2)
    assert "invalidated" in str(info.value)
    assert token not in str(info.value)


# -- the CA server, end to end ----------------------------------------------------------------


def test_a_pod_gets_its_own_identity(scene: Scene, ca: RunningCa) -> None:
    cert = request_certificate(ca, scene.token(scene.web), scene.identity("web"))
    assert cert.identity == scene.identity("web")


def test_a_token_for_another_audience_is_refused(scene: Scene, ca: RunningCa) -> None:
    token = scene.token(scene.web, audiences=(scene.cluster.service_account_issuer,))
    with pytest.raises(AuthenticationFailed) as info:
        request_certificate(ca, token, scene.identity("web"))
    assert "audience" in str(info.value)
    assert token not in str(info.value)


def test_ztunnel_impersonates_a_pod_on_its_node(scene: Scene, ca: RunningCa) -> None:
    web = scene.identity("web")
    cert = request_certificate(ca, scene.token(scene.ztunnel), web, impersonate=web)
    assert cert.identity == web


def test_ztunnel_may_not_impersonate_a_pod_on_another_node(scene: Scene, ca: RunningCa) -> None:
    db = scene.identity("db")  # runs on node-2 only
    with pytest.raises(AuthenticationFailed, match=r"no running pod .* on node node-1"):
        request_certificate(ca, scene.token(scene.ztunnel), db, impersonate=db)


def test_a_finished_pod_on_the_node_does_not_count(scene: Scene, ca: RunningCa) -> None:
    batch = scene.identity("batch")  # Succeeded on node-1
    with pytest.raises(AuthenticationFailed, match="no running pod"):
        request_certificate(ca, scene.token(scene.ztunnel), batch, impersonate=batch)


def test_a_workload_may_not_impersonate(scene: Scene, ca: RunningCa) -> None:
    db = scene.identity("db")
    with pytest.raises(AuthenticationFailed, match="only trusted node agents"):
        request_certificate(ca, scene.token(scene.web), db, impersonate=db)


def test_a_ca_without_tokenreview_rights_is_unavailable(scene: Scene) -> None:
    api = scene.cluster.api
    powerless = unique_name("powerless-ca")
    ensure_service_account(api, "istio-system", powerless)
    token = service_account_token(api, "istio-system", powerless)
    powerless_api = scene.cluster.api_client_for_token(token)
    server = start_ca(scene, powerless_api)
    try:
        running = RunningCa(server, server.ca.root_bundle_pem)
        with pytest.raises(CertificateUnavailable, match=r"HTTP 403.*'create' on tokenreviews"):
            request_certificate(running, scene.token(scene.web), scene.identity("web"))
    finally:
        server.stop(grace=0)
        powerless_api.close()
