"""Making Kubernetes objects the way a real cluster's other components would.

The k8s-tier cluster has only etcd and kube-apiserver. These helpers stand in
for the rest: a kubelet registers its Node and reports pod status through the
status subresource (:func:`run_pod`), the kubelet's projected volume asks the
TokenRequest API for a pod-bound token (:func:`pod_token`), and an admin
creates namespaces, service accounts and RBAC. Everything takes an admin
``kubernetes.client.ApiClient`` (``kube_cluster.api``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

MERGE_PATCH = "application/merge-patch+json"


def unique_name(prefix: str) -> str:
    """``prefix-<6 hex>``: the session's cluster is shared, so tests never reuse names."""
    return f"{prefix}-{secrets.token_hex(3)}"


def _create_if_absent(create: Any, *args: Any) -> None:
    try:
        create(*args)
    except ApiException as exc:
        if exc.status != 409:  # AlreadyExists
            raise


def ensure_namespace(api: Any, name: str) -> None:
    body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    _create_if_absent(client.CoreV1Api(api).create_namespace, body)


def ensure_node(api: Any, name: str) -> None:
    """Register a Node as its kubelet would (no kubelet runs; it stays without status)."""
    body = client.V1Node(metadata=client.V1ObjectMeta(name=name))
    _create_if_absent(client.CoreV1Api(api).create_node, body)


def ensure_service_account(api: Any, namespace: str, name: str) -> None:
    body = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
    _create_if_absent(client.CoreV1Api(api).create_namespaced_service_account, namespace, body)


def run_pod(
    api: Any,
    namespace: str,
    name: str,
    *,
    service_account: str,
    node: str,
    pod_ip: str,
    phase: str = "Running",
) -> Any:
    """Create a pod bound to ``node`` and report ``phase``/``pod_ip`` as its kubelet would.

    The namespace, service account and node must exist. Returns the ``V1Pod``
    after the status update (its ``metadata.uid`` is what tokens bind to).
    """
    core = client.CoreV1Api(api)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": name}),
        spec=client.V1PodSpec(
            node_name=node,
            service_account_name=service_account,
            containers=[client.V1Container(name="app", image="registry.invalid/app:1")],
        ),
    )
    core.create_namespaced_pod(namespace, pod)
    status = {
        "status": {
            "phase": phase,
            "hostIP": "192.0.2.1",
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    }
    return core.patch_namespaced_pod_status(name, namespace, status, _content_type=MERGE_PATCH)


def pod_token(
    api: Any,
    pod: Any,
    audiences: Sequence[str] = ("istio-ca",),
    *,
    expiration_seconds: int = 600,
) -> str:
    """A token for ``pod``'s service account, bound to the pod (a projected volume's token)."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=list(audiences),
            expiration_seconds=expiration_seconds,
            bound_object_ref=client.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
            ),
        )
    )
    answer: Any = client.CoreV1Api(api).create_namespaced_service_account_token(
        pod.spec.service_account_name, pod.metadata.namespace, request
    )
    return str(answer.status.token)


def service_account_token(
    api: Any, namespace: str, name: str, audiences: Sequence[str] = (), *, seconds: int = 3600
) -> str:
    """An unbound token for a service account (default audience: the API server's)."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=list(audiences), expiration_seconds=seconds)
    )
    answer: Any = client.CoreV1Api(api).create_namespaced_service_account_token(
        name, namespace, request
    )
    return str(answer.status.token)


def grant_cluster_role(
    api: Any,
    name: str,
    rules: Sequence[tuple[str, str, Sequence[str]]],
    *,
    namespace: str,
    service_account: str,
) -> None:
    """A ClusterRole of ``(api_group, resource, verbs)`` rules bound to a service account.

    Returns once the RBAC authorizer (which reads from an informer cache) allows
    every rule: polled with SubjectAccessReviews, since no event says so.
    """
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_cluster_role(
        client.V1ClusterRole(
            metadata=client.V1ObjectMeta(name=name),
            rules=[
                client.V1PolicyRule(api_groups=[group], resources=[resource], verbs=list(verbs))
                for group, resource, verbs in rules
            ],
        )
    )
    rbac.create_cluster_role_binding(
        client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name=name),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=name
            ),
            subjects=[
                client.RbacV1Subject(
                    kind="ServiceAccount", name=service_account, namespace=namespace
                )
            ],
        )
    )
    user = f"system:serviceaccount:{namespace}:{service_account}"
    for group, resource, verbs in rules:
        for verb in verbs:
            wait_until_allowed(api, user, group, resource, verb)


def wait_until_allowed(
    api: Any, user: str, group: str, resource: str, verb: str, *, timeout: float = 10.0
) -> None:
    authz: Any = client.AuthorizationV1Api(api)
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                group=group, resource=resource, verb=verb
            ),
        )
    )
    deadline = time.monotonic() + timeout
    while not authz.create_subject_access_review(review).status.allowed:
        if time.monotonic() > deadline:
            raise TimeoutError(f"RBAC did not allow {user} to {verb} {resource} in {timeout} s")
        time.sleep(0.05)
