"""Caller authentication (lab tokens, TokenReview interpretation) and authorization."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from identity.auth import (
    AUDIENCE,
    NODE_NAME_EXTRA,
    POD_NAME_EXTRA,
    POD_UID_EXTRA,
    Authenticator,
    Authorizer,
    Caller,
    KubernetesNodeIndex,
    KubernetesTokenReviewAuthenticator,
    LabTokenAuthenticator,
    NodeIndex,
    PodRecord,
    StaticNodeIndex,
    bearer_token,
    caller_from_token_review,
    lab_pod_uid,
    parse_lab_tokens,
    parse_node_agent,
    pod_is_live_on,
)
from identity.errors import (
    AuthenticationFailed,
    AuthenticatorUnavailable,
    CaConfigError,
    CertificateUnavailable,
    GrpcCode,
    IdentityNotPermitted,
    ImpersonationDenied,
)
from identity.spiffe import SpiffeId

pytestmark = pytest.mark.unit

TD = "cluster.local"
SLEEP_TOKEN = "sleep-token-0123456789abcdef"
ZTUNNEL_TOKEN = "ztunnel-token-0123456789abcdef"
SLEEP = SpiffeId(TD, "demo", "sleep")
HTTPBIN = SpiffeId(TD, "demo", "httpbin")
ZTUNNEL = SpiffeId(TD, "istio-system", "ztunnel")


def write_tokens(path: Path, entries: list[dict[str, Any]], mode: int = 0o600) -> Path:
    """Replace ``path`` atomically (as editors and config tools do)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(entries))
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def entry(token: str, ns: str, sa: object, pod: str, node: str) -> dict[str, Any]:
    return {"token": token, "namespace": ns, "service_account": sa, "pod": pod, "node": node}


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_tokens(
        tmp_path / "tokens.yaml",
        [
            entry(SLEEP_TOKEN, "demo", "sleep", "sleep-1", "node-1"),
            entry(ZTUNNEL_TOKEN, "istio-system", "ztunnel", "ztunnel-a", "node-1"),
        ],
    )


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- bearer tokens ----------------------------------------------------------------


def test_bearer_token_parses_the_header() -> None:
    assert bearer_token({"authorization": "Bearer abc.def"}) == "abc.def"
    assert bearer_token({"authorization": "bearer  abc"}) == "abc"


@pytest.mark.parametrize(
    ("header", "secret"),
    [
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic c2VjcmV0LXBhcnQ=", "c2VjcmV0LXBhcnQ="),
        ("Bearer sec ret-part", "ret-part"),
        ("s3cr3t-part", "s3cr3t-part"),
    ],
)
def test_malformed_authorization_is_refused_without_echo(header: str, secret: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        bearer_token({"authorization": header})
    assert "Bearer <token>" in str(info.value)
    if secret is not None:
        assert secret not in str(info.value)


def test_missing_authorization_says_what_to_send() -> None:
    with pytest.raises(AuthenticationFailed, match="authorization: Bearer <token>"):
        bearer_token({})


# -- lab token file ------------------------------------------------------------------


def test_lab_authenticator_identifies_pods(token_file: Path) -> None:
    auth = LabTokenAuthenticator(token_file, TD)
    assert isinstance(auth, Authenticator) and isinstance(auth, NodeIndex)
    caller = auth.authenticate(bearer(SLEEP_TOKEN))
    assert caller == Caller(SLEEP, "sleep-1", lab_pod_uid("demo", "sleep-1"), "node-1")
    assert auth.authenticate(bearer(ZTUNNEL_TOKEN)).identity == ZTUNNEL


def test_unknown_token_is_refused_without_echo(token_file: Path) -> None:
    auth = LabTokenAuthenticator(token_file, TD)
    wrong = "not-a-known-token-xyz123"
    with pytest.raises(AuthenticationFailed) as info:
        auth.authenticate(bearer(wrong))
    assert wrong not in str(info.value)
    assert info.value.grpc_code is GrpcCode.UNAUTHENTICATED


def test_lab_file_is_the_node_index(token_file: Path) -> None:
    auth = LabTokenAuthenticator(token_file, TD)
    assert auth.has_running_pod("node-1", "demo", "sleep") is True
    assert auth.has_running_pod("node-2", "demo", "sleep") is False
    assert auth.has_running_pod("node-1", "demo", "httpbin") is False


def test_lab_file_reload_on_change(token_file: Path) -> None:
    auth = LabTokenAuthenticator(token_file, TD)
    new_token = "fresh-token-abcdefghijklmnop"
    write_tokens(token_file, [entry(new_token, "demo", "httpbin", "httpbin-1", "node-2")])
    assert auth.authenticate(bearer(new_token)).identity == HTTPBIN
    # The removed token is gone at once.
    with pytest.raises(AuthenticationFailed):
        auth.authenticate(bearer(SLEEP_TOKEN))
    assert auth.has_running_pod("node-2", "demo", "httpbin")
    assert not auth.has_running_pod("node-1", "demo", "sleep")


def test_lab_file_edited_in_place_with_same_size_is_reloaded(token_file: Path) -> None:
    """Content, not mtime, decides: two writes within one clock tick are still seen."""
    auth = LabTokenAuthenticator(token_file, TD)
    same_length = SLEEP_TOKEN[:-1] + "X"
    text = token_file.read_text().replace(SLEEP_TOKEN, same_length)
    with token_file.open("w") as f:  # same inode, same size
        f.write(text)
    assert auth.authenticate(bearer(same_length)).identity == SLEEP
    with pytest.raises(AuthenticationFailed):
        auth.authenticate(bearer(SLEEP_TOKEN))


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o620, 0o666])
def test_unsafe_permissions_are_refused_at_start(tmp_path: Path, mode: int) -> None:
    path = write_tokens(
        tmp_path / "t.yaml", [entry(SLEEP_TOKEN, "demo", "sleep", "s", "n")], mode=mode
    )
    with pytest.raises(CaConfigError, match="chmod 600"):
        LabTokenAuthenticator(path, TD)


def test_group_readable_file_is_accepted(tmp_path: Path) -> None:
    path = write_tokens(
        tmp_path / "t.yaml", [entry(SLEEP_TOKEN, "demo", "sleep", "s", "n")], mode=0o640
    )
    assert LabTokenAuthenticator(path, TD).authenticate(bearer(SLEEP_TOKEN)).identity == SLEEP


def test_file_becoming_unsafe_or_invalid_fails_closed(token_file: Path) -> None:
    auth = LabTokenAuthenticator(token_file, TD)
    os.chmod(token_file, 0o644)
    with pytest.raises(AuthenticatorUnavailable, match="chmod 600") as info:
        auth.authenticate(bearer(SLEEP_TOKEN))
    assert info.value.grpc_code is GrpcCode.UNAVAILABLE
    with pytest.raises(AuthenticatorUnavailable):
        auth.has_running_pod("node-1", "demo", "sleep")
    os.chmod(token_file, 0o600)
    assert auth.authenticate(bearer(SLEEP_TOKEN)).identity == SLEEP

    # A broken edit does not leave the previous tokens valid.
    token_file.write_text(f"- token: {SLEEP_TOKEN}\n  namespace: [oops\n")
    with pytest.raises(AuthenticatorUnavailable) as info:
        auth.authenticate(bearer(SLEEP_TOKEN))
    assert SLEEP_TOKEN not in str(info.value)
    token_file.unlink()
    with pytest.raises(AuthenticatorUnavailable, match="cannot read"):
        auth.authenticate(bearer(SLEEP_TOKEN))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(CaConfigError, match="cannot read lab token file"):
        LabTokenAuthenticator(tmp_path / "absent.yaml", TD)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"token": SLEEP_TOKEN}, "must be a YAML list"),
        (["just a string"], "entry 1: must be a mapping"),
        ([{"token": SLEEP_TOKEN, "namespace": "demo"}], "missing key"),
        ([{**entry(SLEEP_TOKEN, "demo", "sleep", "p", "n"), "serviceaccount": "x"}], "unknown"),
        ([entry("short", "demo", "sleep", "p", "n")], "16 to 4096 characters"),
        ([entry("has space in it 0123456789", "demo", "sleep", "p", "n")], "printable ASCII"),
        ([entry(SLEEP_TOKEN, "Demo/../x", "sleep", "p", "n")], "entry 1"),
        ([entry(SLEEP_TOKEN, "demo", "sleep", "p", "")], "node name is empty"),
        ([entry(SLEEP_TOKEN, "demo", 7, "p", "n")], "'service_account' must be a string"),
        (
            [entry(SLEEP_TOKEN, "demo", "a", "p", "n"), entry(SLEEP_TOKEN, "demo", "b", "q", "n")],
            "entry 2: same token as entry 1",
        ),
    ],
)
def test_invalid_token_files_are_explained_without_tokens(doc: object, message: str) -> None:
    with pytest.raises(CaConfigError, match=message) as info:
        parse_lab_tokens(yaml.safe_dump(doc).encode())
    assert SLEEP_TOKEN not in str(info.value)


def test_yaml_errors_do_not_quote_the_file() -> None:
    data = f"- token: {SLEEP_TOKEN}\n  namespace: [unclosed {SLEEP_TOKEN}\n".encode()
    with pytest.raises(CaConfigError, match="not valid YAML at line") as info:
        parse_lab_tokens(data)
    assert SLEEP_TOKEN not in str(info.value)


def test_empty_file_means_no_callers() -> None:
    assert parse_lab_tokens(b"") == {}
    assert parse_lab_tokens(b"[]") == {}


def test_explicit_uid_is_kept() -> None:
    table = parse_lab_tokens(
        yaml.safe_dump([{**entry(SLEEP_TOKEN, "demo", "sleep", "p", "n"), "uid": "u-1"}]).encode()
    )
    assert [e.uid for e in table.values()] == ["u-1"]
    # The table is keyed by digest: the raw token is not kept.
    assert all(SLEEP_TOKEN.encode() not in k for k in table)


# -- TokenReview interpretation -----------------------------------------------------


def review(
    *,
    authenticated: bool | None = True,
    audiences: list[str] | None = None,
    username: str | None = "system:serviceaccount:demo:sleep",
    groups: list[str] | None = None,
    extra: dict[str, list[str]] | None = None,
    error: str | None = None,
    status: bool = True,
) -> k8s.V1TokenReview:
    """A TokenReview as the API server would answer it (constructed; no server)."""
    if extra is None:
        extra = {
            POD_NAME_EXTRA: ["sleep-7d9f"],
            POD_UID_EXTRA: ["4c1e6b2a-0000-4000-8000-000000000001"],
            NODE_NAME_EXTRA: ["node-1"],
        }
    user = k8s.V1UserInfo(
        username=username,
        groups=groups
        if groups is not None
        else ["system:serviceaccounts", "system:serviceaccounts:demo", "system:authenticated"],
        extra=extra,
    )
    return k8s.V1TokenReview(
        spec=k8s.V1TokenReviewSpec(token="[not kept]", audiences=[AUDIENCE]),
        status=k8s.V1TokenReviewStatus(
            authenticated=authenticated,
            audiences=[AUDIENCE] if audiences is None else audiences,
            user=user,
            error=error,
        )
        if status
        else None,
    )


def test_token_review_gives_the_pod_bound_caller() -> None:
    caller = caller_from_token_review(review(), TD)
    assert caller == Caller(SLEEP, "sleep-7d9f", "4c1e6b2a-0000-4000-8000-000000000001", "node-1")


def test_token_review_without_node_name_has_no_node() -> None:
    extra = {POD_NAME_EXTRA: ["p"], POD_UID_EXTRA: ["u"]}
    assert caller_from_token_review(review(extra=extra), TD).node is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": False}, "no token review status"),
        ({"error": "invalid bearer token"}, "did not accept the token"),
        ({"authenticated": False}, "did not authenticate"),
        ({"authenticated": None}, "did not authenticate"),
        ({"audiences": []}, "audience 'istio-ca'"),
        ({"audiences": ["https://kubernetes.default.svc"]}, "audience 'istio-ca'"),
        ({"username": "alice"}, "not a service account"),
        ({"username": None}, "not a service account"),
        ({"username": "system:serviceaccount:demo:sleep:extra"}, "malformed"),
        ({"username": "system:serviceaccount:demo"}, "malformed"),
        ({"groups": ["system:authenticated"]}, "system:serviceaccounts"),
        ({"extra": {}}, "not bound to a pod"),
        ({"extra": {POD_NAME_EXTRA: ["p"]}}, "not bound to a pod"),
        ({"extra": {POD_NAME_EXTRA: ["p", "q"], POD_UID_EXTRA: ["u"]}}, "not one value"),
        ({"extra": {POD_NAME_EXTRA: [""], POD_UID_EXTRA: ["u"]}}, "not one value"),
        ({"username": "system:serviceaccount:Bad NS:sleep"}, "not usable"),
    ],
)
def test_token_review_refusals(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(AuthenticationFailed, match=message):
        caller_from_token_review(review(**kwargs), TD)


class FakeAuthenticationApi:
    """Stands in for AuthenticationV1Api: records the review, answers a canned one."""

    def __init__(self, answer: Any = None, exc: Exception | None = None) -> None:
        self.answer, self.exc = answer, exc
        self.sent: list[k8s.V1TokenReview] = []

    def create_token_review(self, body: k8s.V1TokenReview, **kwargs: Any) -> Any:
        self.sent.append(body)
        if self.exc is not None:
            raise self.exc
        return self.answer


def test_kubernetes_authenticator_sends_the_token_with_the_audience() -> None:
    api = FakeAuthenticationApi(answer=review())
    caller = KubernetesTokenReviewAuthenticator(api, TD).authenticate(bearer("jwt.token.sig"))
    assert caller.identity == SLEEP
    assert api.sent[0].spec.token == "jwt.token.sig"
    assert api.sent[0].spec.audiences == [AUDIENCE]


def test_kubernetes_authenticator_api_failures_are_unavailable_and_secret_free() -> None:
    from kubernetes.client.exceptions import ApiException

    token = "jwt.secret.part"
    failing = ApiException(status=403, reason="Forbidden")
    failing.body = f'{{"spec": {{"token": "{token}"}}}}'
    with pytest.raises(AuthenticatorUnavailable, match="HTTP 403") as info:
        KubernetesTokenReviewAuthenticator(FakeAuthenticationApi(exc=failing), TD).authenticate(
            bearer(token)
        )
    assert token not in str(info.value) and info.value.__cause__ is None
    with pytest.raises(AuthenticatorUnavailable, match="ConnectionRefusedError"):
        KubernetesTokenReviewAuthenticator(
            FakeAuthenticationApi(exc=ConnectionRefusedError(token)), TD
        ).authenticate(bearer(token))


def test_kubernetes_authenticator_scrubs_a_token_echoed_by_the_server() -> None:
    token = "jwt.echoed.token"
    api = FakeAuthenticationApi(answer=review(error=f"token {token} is expired"))
    with pytest.raises(AuthenticationFailed) as info:
        KubernetesTokenReviewAuthenticator(api, TD).authenticate(bearer(token))
    assert token not in str(info.value)


def pod(
    node: str = "node-1", ns: str = "demo", sa: str | None = "sleep", phase: str = "Running"
) -> k8s.V1Pod:
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="p", namespace=ns),
        spec=k8s.V1PodSpec(containers=[], node_name=node, service_account_name=sa),
        status=k8s.V1PodStatus(phase=phase),
    )


def test_pod_liveness_filter() -> None:
    assert pod_is_live_on(pod(), "node-1", "demo", "sleep")
    assert pod_is_live_on(pod(phase="Pending"), "node-1", "demo", "sleep")
    assert pod_is_live_on(pod(sa=None), "node-1", "demo", "default")
    assert not pod_is_live_on(pod(phase="Failed"), "node-1", "demo", "sleep")
    assert not pod_is_live_on(pod(phase="Succeeded"), "node-1", "demo", "sleep")
    assert not pod_is_live_on(pod(phase="Unknown"), "node-1", "demo", "sleep")
    assert not pod_is_live_on(pod(node="node-2"), "node-1", "demo", "sleep")
    assert not pod_is_live_on(pod(ns="other"), "node-1", "demo", "sleep")
    assert not pod_is_live_on(k8s.V1Pod(), "node-1", "demo", "sleep")


class FakeCoreApi:
    def __init__(self, pods: list[k8s.V1Pod], exc: Exception | None = None) -> None:
        self.pods, self.exc = pods, exc
        self.selectors: list[str] = []

    def list_namespaced_pod(self, namespace: str, *, field_selector: str, **kw: Any) -> Any:
        self.selectors.append(field_selector)
        if self.exc is not None:
            raise self.exc
        items = [
            p for p in self.pods if p.metadata is not None and p.metadata.namespace == namespace
        ]
        return k8s.V1PodList(items=items)


def test_kubernetes_node_index() -> None:
    api = FakeCoreApi([pod(), pod(node="node-2", sa="httpbin")])
    index = KubernetesNodeIndex(api)
    assert index.has_running_pod("node-1", "demo", "sleep")
    assert api.selectors == ["spec.nodeName=node-1"]
    # The selector cannot be widened by a crafted node name.
    assert not index.has_running_pod("node-1,spec.nodeName!=x", "demo", "sleep")
    assert not index.has_running_pod("node-1", "demo", "httpbin")
    with pytest.raises(CertificateUnavailable, match="cannot list pods"):
        KubernetesNodeIndex(FakeCoreApi([], exc=TimeoutError())).has_running_pod(
            "node-1", "demo", "sleep"
        )


# -- authorization -------------------------------------------------------------------

NODE_INDEX = StaticNodeIndex(
    [
        PodRecord("demo", "sleep", "sleep-1", "node-1"),
        PodRecord("demo", "httpbin", "httpbin-1", "node-2"),
        PodRecord("demo", "done", "job-1", "node-1", phase="Succeeded"),
    ]
)
AUTHZ = Authorizer(TD, NODE_INDEX)
POD = Caller(SLEEP, "sleep-1", "uid-1", "node-1")
AGENT = Caller(ZTUNNEL, "ztunnel-a", "uid-z", "node-1")


def test_own_identity_is_granted() -> None:
    AUTHZ.authorize(POD, SLEEP)


def test_another_identity_is_permission_denied() -> None:
    with pytest.raises(IdentityNotPermitted, match="may only request its own identity") as info:
        AUTHZ.authorize(POD, HTTPBIN)
    assert info.value.grpc_code is GrpcCode.PERMISSION_DENIED


def test_impersonation_by_node_agent_for_a_pod_on_its_node() -> None:
    AUTHZ.authorize(AGENT, SLEEP, impersonate=SLEEP)


def test_impersonation_for_a_pod_on_another_node_is_unauthenticated() -> None:
    with pytest.raises(ImpersonationDenied, match="no running pod") as info:
        AUTHZ.authorize(AGENT, HTTPBIN, impersonate=HTTPBIN)
    assert info.value.grpc_code is GrpcCode.UNAUTHENTICATED


def test_impersonation_for_a_finished_pod_is_refused() -> None:
    done = SpiffeId(TD, "demo", "done")
    with pytest.raises(ImpersonationDenied):
        AUTHZ.authorize(AGENT, done, impersonate=done)


def test_impersonation_by_an_ordinary_pod_is_refused() -> None:
    with pytest.raises(ImpersonationDenied, match="trusted node agents"):
        AUTHZ.authorize(POD, SLEEP, impersonate=SLEEP)


def test_impersonation_without_a_node_is_refused() -> None:
    with pytest.raises(ImpersonationDenied, match="node binding"):
        AUTHZ.authorize(Caller(ZTUNNEL, "z", "u", None), SLEEP, impersonate=SLEEP)


def test_csr_must_name_the_impersonated_identity() -> None:
    with pytest.raises(IdentityNotPermitted, match="must be the same"):
        AUTHZ.authorize(AGENT, ZTUNNEL, impersonate=SLEEP)


def test_foreign_trust_domains_are_refused() -> None:
    foreign = SpiffeId("other.domain", "demo", "sleep")
    with pytest.raises(IdentityNotPermitted, match="trust domain"):
        AUTHZ.authorize(Caller(foreign, "p", "u", "node-1"), foreign)
    with pytest.raises(IdentityNotPermitted, match="trust domain"):
        AUTHZ.authorize(POD, foreign)
    with pytest.raises(IdentityNotPermitted, match="trust domain"):
        AUTHZ.authorize(AGENT, foreign, impersonate=foreign)
    with pytest.raises(ImpersonationDenied, match="trust domain"):
        AUTHZ.authorize(AGENT, SLEEP, impersonate=foreign)


def test_configured_node_agents_replace_the_default() -> None:
    authz = Authorizer(TD, NODE_INDEX, [parse_node_agent("kube-system/agent")])
    agent = Caller(SpiffeId(TD, "kube-system", "agent"), "a", "u", "node-1")
    authz.authorize(agent, SLEEP, impersonate=SLEEP)
    with pytest.raises(ImpersonationDenied):
        authz.authorize(AGENT, SLEEP, impersonate=SLEEP)


class WeirdIndex:
    """A node index that answers something truthy but not True."""

    def has_running_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return "yes"  # type: ignore[return-value]


def test_a_non_boolean_node_index_answer_fails_closed() -> None:
    with pytest.raises(ImpersonationDenied):
        Authorizer(TD, WeirdIndex()).authorize(AGENT, SLEEP, impersonate=SLEEP)


@pytest.mark.parametrize("text", ["ztunnel", "a/b/c", "/sa", "ns/", "NS with space/sa"])
def test_parse_node_agent_refuses_malformed(text: str) -> None:
    with pytest.raises(CaConfigError):
        parse_node_agent(text)
