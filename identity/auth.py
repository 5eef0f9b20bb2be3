"""Who is calling the CA, and whether they may have the identity they ask for.

This module owns the CA's caller checks:

- :class:`Caller`: an authenticated pod (its SPIFFE ID, pod name and uid, node).
- :class:`Authenticator`: turns gRPC metadata (``authorization: Bearer <token>``)
  into a :class:`Caller`. Two implementations:

  * :class:`LabTokenAuthenticator`: a YAML token file for the lab (no Kubernetes);
  * :class:`KubernetesTokenReviewAuthenticator`: a TokenReview against the API
    server, for projected, pod-bound service-account tokens (audience ``istio-ca``).

- :class:`NodeIndex`: "does a live pod with this namespace/service account run
  on that node?", needed to let a node agent (ztunnel) impersonate its pods.
  :class:`StaticNodeIndex` (pod records), :class:`KubernetesNodeIndex` and the
  lab token file (every entry is a running pod on its node) implement it.
- :class:`Authorizer`: the decision. Without impersonation a pod gets only its
  own identity; with ``ImpersonatedIdentity`` the caller must be a trusted node
  agent with a node, a live pod of that identity must run on that node, and the
  CSR must name exactly the impersonated identity.

Everything fails closed: a missing field, an unexpected type or an error while
checking is a refusal. Tokens never appear in messages or logs; the lab table
keeps only their SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog
import yaml

from identity.errors import (
    AuthenticationFailed,
    AuthenticatorUnavailable,
    CaConfigError,
    CertificateUnavailable,
    IdentityNotPermitted,
    ImpersonationDenied,
    InvalidSpiffeId,
)
from identity.spiffe import SpiffeId, validate_path_segment

_log = structlog.get_logger("identity.auth")

AUDIENCE = "istio-ca"
# Wire contract shared by the CA server and its clients.
IMPERSONATED_IDENTITY_KEY = "ImpersonatedIdentity"  # key in the request's Struct metadata
DEFAULT_CLUSTER_ID = "Kubernetes"  # what Istio's proxies send as `clusterid` by default
DEFAULT_TRUSTED_NODE_AGENTS: tuple[tuple[str, str], ...] = (("istio-system", "ztunnel"),)

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
SERVICE_ACCOUNT_USER_PREFIX = "system:serviceaccount:"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"

# A pod that has not failed or finished may hold its identity. "Pending" counts:
# ztunnel asks for a pod's certificate while the CNI plugin is still wiring the
# pod, before its containers run. "Unknown" does not (fail closed).
ACTIVE_POD_PHASES = frozenset({"Pending", "Running"})


# -- callers and protocols ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated CA caller: a pod running as a service account."""

    identity: SpiffeId
    pod_name: str
    pod_uid: str
    node: str | None

    def __str__(self) -> str:
        node = self.node or "unknown node"
        ns = self.identity.namespace
        return f"{self.identity.uri} (pod {ns}/{self.pod_name} on {node})"


@runtime_checkable
class Authenticator(Protocol):
    """Authenticates a CA call from its gRPC metadata (lower-case keys)."""

    def authenticate(self, metadata: Mapping[str, str]) -> Caller:
        """Return the caller or raise :class:`AuthenticationFailed` (never echoing the token)."""
        ...


@runtime_checkable
class NodeIndex(Protocol):
    """Which pods run where: the fact behind a node agent's right to impersonate."""

    def has_running_pod(self, node: str, namespace: str, service_account: str) -> bool:
        """True if a live (pending or running) ``namespace/service_account`` pod is on ``node``."""
        ...


_BEARER = re.compile(r"bearer +(\S+)\s*", re.IGNORECASE)


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The token from ``authorization: Bearer <token>``, or :class:`AuthenticationFailed`."""
    header = metadata.get("authorization")
    if header is None:
        raise AuthenticationFailed(
            "no 'authorization: Bearer <token>' in the request metadata; send the pod's "
            f"service-account token (audience {AUDIENCE!r})"
        )
    match = _BEARER.fullmatch(header)
    if match is None:
        raise AuthenticationFailed(
            "the 'authorization' metadata is not of the form 'Bearer <token>'"
        )
    return match.group(1)


# -- pod records (static node index) --------------------------------------------


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What the CA needs to know about one pod."""

    namespace: str
    service_account: str
    name: str
    node: str
    phase: str = "Running"
    uid: str = ""


class StaticNodeIndex:
    """A :class:`NodeIndex` over a fixed set of :class:`PodRecord` (tests, simple labs)."""

    def __init__(self, pods: Iterable[PodRecord]) -> None:
        self._live = frozenset(
            (p.node, p.namespace, p.service_account) for p in pods if p.phase in ACTIVE_POD_PHASES
        )

    def has_running_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return (node, namespace, service_account) in self._live


# -- lab token file ---------------------------------------------------------------

MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096
MAX_TOKEN_FILE_BYTES = 1 << 20
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: fits in a header
_LAB_REQUIRED = ("token", "namespace", "service_account", "pod", "node")
_LAB_OPTIONAL = ("uid",)
_LAB_UID_NAMESPACE = uuid.UUID("5b0c6f2e-8c3e-4a39-9f1e-6f1b2c0d7a11")


@dataclass(frozen=True, slots=True)
class LabTokenEntry:
    """One pod of the lab token file (the token itself is kept only as a digest)."""

    namespace: str
    service_account: str
    pod: str
    node: str
    uid: str


def token_digest(token: str) -> bytes:
    """SHA-256 of a token: the lab table's key, so raw tokens are not kept in memory."""
    return hashlib.sha256(token.encode()).digest()


def lab_pod_uid(namespace: str, pod: str) -> str:
    """The uid a lab pod gets when its entry names none (stable across reloads)."""
    return str(uuid.uuid5(_LAB_UID_NAMESPACE, f"{namespace}/{pod}"))


def parse_lab_tokens(data: bytes, source: str = "lab token file") -> dict[bytes, LabTokenEntry]:
    """Parse a lab token file into ``{sha256(token): entry}``; :class:`CaConfigError` if invalid.

    The file is a YAML list of ``{token, namespace, service_account, pod, node}``
    mappings (``uid`` optional). Messages name the entry and field, never a token,
    and never quote the file (a YAML parser's snippet could show one).
    """
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CaConfigError(f"{source} is not valid YAML{where}") from None
    if doc is None:
        doc = []
    if not isinstance(doc, list):
        raise CaConfigError(
            f"{source} must be a YAML list of entries "
            "{token, namespace, service_account, pod, node}"
        )
    table: dict[bytes, LabTokenEntry] = {}
    first_use: dict[bytes, int] = {}
    for i, raw in enumerate(doc, start=1):
        where = f"{source}, entry {i}"
        if not isinstance(raw, dict):
            raise CaConfigError(f"{where}: must be a mapping with keys {', '.join(_LAB_REQUIRED)}")
        unknown = sorted(str(k) for k in raw if k not in _LAB_REQUIRED + _LAB_OPTIONAL)
        if unknown:
            raise CaConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
        missing = [k for k in _LAB_REQUIRED if k not in raw]
        if missing:
            raise CaConfigError(f"{where}: missing key(s) {', '.join(missing)}")
        token = raw["token"]
        if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token):
            raise CaConfigError(
                f"{where}: 'token' must be a string of printable ASCII without spaces"
            )
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise CaConfigError(
                f"{where}: 'token' must have {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters "
                "(generate one with: openssl rand -hex 32)"
            )
        fields: dict[str, str] = {}
        for key in ("namespace", "service_account", "pod", "node", "uid"):
            value = raw.get(key, "")
            if not isinstance(value, str):
                raise CaConfigError(f"{where}: {key!r} must be a string")
            fields[key] = value
        try:
            SpiffeId("placeholder.local", fields["namespace"], fields["service_account"])
            validate_path_segment(fields["pod"], "pod name")
            validate_path_segment(fields["node"], "node name")
        except InvalidSpiffeId as exc:
            raise CaConfigError(f"{where}: {exc}") from None
        digest = token_digest(token)
        if digest in table:
            raise CaConfigError(f"{where}: same token as entry {first_use[digest]}")
        first_use[digest] = i
        table[digest] = LabTokenEntry(
            namespace=fields["namespace"],
            service_account=fields["service_account"],
            pod=fields["pod"],
            node=fields["node"],
            uid=fields["uid"] or lab_pod_uid(fields["namespace"], fields["pod"]),
        )
    return table


def check_token_file_mode(path: Path, mode: int) -> None:
    """Refuse a token file that other users can read or write, or its group can write.

    The file holds bearer tokens for every lab pod, so it is refused (not just
    warned about) when readable by "other": anyone on the machine could then act
    as any pod. Group-readable is allowed (a lab group may share it);
    group- or world-writable is refused (anyone could add a token).
    """
    if not stat.S_ISREG(mode):
        raise CaConfigError(f"lab token file {path} is not a regular file")
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise CaConfigError(
            f"lab token file {path} is accessible to other users (mode "
            f"{stat.S_IMODE(mode):04o}); it holds bearer tokens: run 'chmod 600 {path}'"
        )


class LabTokenAuthenticator:
    """Authenticates lab pods from a token file; also the lab's :class:`NodeIndex`.

    The file is read on construction (any problem is a :class:`CaConfigError`, so
    the CA does not start) and re-checked on every call: when its content changes
    it is parsed again. If it becomes unsafe or invalid, every call fails with
    :class:`AuthenticatorUnavailable` until it is fixed; the old table is not
    kept, so a token removed from a half-edited file is never still accepted.
    """

    def __init__(self, path: Path, trust_domain: str) -> None:
        self.path = Path(path)
        self.trust_domain = trust_domain
        self._lock = threading.Lock()
        self._digest: bytes | None = None
        self._table: dict[bytes, LabTokenEntry] = {}
        self._problem: str | None = None
        self._refresh()

    def _read(self) -> bytes:
        try:
            with self.path.open("rb") as f:
                check_token_file_mode(self.path, os.fstat(f.fileno()).st_mode)
                data = f.read(MAX_TOKEN_FILE_BYTES + 1)
        except OSError as exc:
            raise CaConfigError(
                f"cannot read lab token file {self.path}: {exc.strerror or exc}"
            ) from None
        if len(data) > MAX_TOKEN_FILE_BYTES:
            raise CaConfigError(
                f"lab token file {self.path} is larger than {MAX_TOKEN_FILE_BYTES} bytes"
            )
        return data

    def _refresh(self) -> dict[bytes, LabTokenEntry]:
        """Re-read the file (cheap: parse only when the content changed)."""
        with self._lock:
            data = self._read()
            digest = hashlib.sha256(data).digest()
            if digest != self._digest:
                self._table = parse_lab_tokens(data, f"lab token file {self.path}")
                self._digest = digest
                _log.info("auth.lab_tokens_loaded", path=str(self.path), pods=len(self._table))
            return self._table

    def _current(self) -> dict[bytes, LabTokenEntry]:
        try:
            table = self._refresh()
        except CaConfigError as exc:
            with self._lock:
                self._digest = None
                self._table = {}
                if self._problem != str(exc):
                    self._problem = str(exc)
                    _log.error("auth.lab_tokens_unusable", problem=str(exc))
            raise AuthenticatorUnavailable(f"the CA cannot check tokens right now: {exc}") from None
        with self._lock:
            self._problem = None
        return table

    def authenticate(self, metadata: Mapping[str, str]) -> Caller:
        token = bearer_token(metadata)
        entry = self._current().get(token_digest(token))
        if entry is None:
            raise AuthenticationFailed(
                f"the token is not in the CA's lab token file ({self.path}); use a token "
                "listed there for this pod"
            )
        try:
            identity = SpiffeId(self.trust_domain, entry.namespace, entry.service_account)
        except InvalidSpiffeId as exc:  # parse_lab_tokens checked it; fail closed anyway
            raise AuthenticationFailed(f"the lab entry's identity is invalid: {exc}") from None
        return Caller(identity=identity, pod_name=entry.pod, pod_uid=entry.uid, node=entry.node)

    def has_running_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return any(
            e.node == node and e.namespace == namespace and e.service_account == service_account
            for e in self._current().values()
        )


# -- Kubernetes -------------------------------------------------------------------


def _single_extra(extra: Mapping[str, Any], key: str) -> str | None:
    """The one value of ``user.extra[key]``; None if absent; refusal if ambiguous."""
    values = extra.get(key)
    if values is None:
        return None
    if (
        not isinstance(values, list)
        or len(values) != 1
        or not isinstance(values[0], str)
        or not values[0]
    ):
        raise AuthenticationFailed(f"the token review's user.extra[{key!r}] is not one value")
    return values[0]


def caller_from_token_review(
    review: Any, trust_domain: str, audiences: Sequence[str] = (AUDIENCE,)
) -> Caller:
    """Interpret a ``V1TokenReview`` answered by the API server (pure; no I/O).

    Requires: authenticated, one of ``audiences`` confirmed in ``status.audiences``
    (an empty list would mean the API server's own audience, so it is refused),
    a ``system:serviceaccount:<ns>:<sa>`` user in the ``system:serviceaccounts``
    group, and a pod binding (pod name and uid) in ``user.extra``. The node name
    is taken from ``user.extra`` when the token carries it.
    """
    status = getattr(review, "status", None)
    if status is None:
        raise AuthenticationFailed("the Kubernetes API server returned no token review status")
    if status.error:
        raise AuthenticationFailed(
            f"the Kubernetes API server did not accept the token: {str(status.error)[:200]}"
        )
    if status.authenticated is not True:
        raise AuthenticationFailed("the Kubernetes API server did not authenticate the token")
    confirmed = set(status.audiences or ())
    if not confirmed.intersection(audiences):
        raise AuthenticationFailed(
            f"the token is not for audience {' or '.join(map(repr, audiences))}; mount a "
            f"projected service-account token with audience {audiences[0]!r}"
        )
    user = status.user
    username = getattr(user, "username", None)
    if not isinstance(username, str) or not username.startswith(SERVICE_ACCOUNT_USER_PREFIX):
        raise AuthenticationFailed(
            f"the token belongs to {username!r}, not a service account "
            "(expected system:serviceaccount:<namespace>:<name>)"
        )
    parts = username.split(":")
    if len(parts) != 4:
        raise AuthenticationFailed(f"malformed service-account user name {username!r}")
    if SERVICE_ACCOUNTS_GROUP not in (user.groups or ()):
        raise AuthenticationFailed(
            f"the token's user is not in the {SERVICE_ACCOUNTS_GROUP!r} group"
        )
    extra: Mapping[str, Any] = user.extra or {}
    pod_name = _single_extra(extra, POD_NAME_EXTRA)
    pod_uid = _single_extra(extra, POD_UID_EXTRA)
    if pod_name is None or pod_uid is None:
        raise AuthenticationFailed(
            "the token is not bound to a pod; use a projected service-account token "
            f"(serviceAccountToken volume, audience {AUDIENCE!r}) rather than a Secret token"
        )
    node = _single_extra(extra, NODE_NAME_EXTRA)
    try:
        identity = SpiffeId(trust_domain, parts[2], parts[3])
    except InvalidSpiffeId as exc:
        raise AuthenticationFailed(f"the token's service account is not usable: {exc}") from None
    return Caller(identity=identity, pod_name=pod_name, pod_uid=pod_uid, node=node)


class KubernetesTokenReviewAuthenticator:
    """Authenticates pod-bound service-account tokens with a TokenReview.

    ``api`` is a ``kubernetes.client.AuthenticationV1Api``; the CA's own service
    account needs ``create`` on ``tokenreviews.authentication.k8s.io``. The
    interpretation of the answer is :func:`caller_from_token_review`, unit-tested
    with constructed objects; tests/identity/test_kubernetes_auth.py (k8s tier)
    runs it against a real kube-apiserver.
    """

    def __init__(
        self,
        api: Any,
        trust_domain: str,
        *,
        audiences: Sequence[str] = (AUDIENCE,),
        timeout: float = 5.0,
    ) -> None:
        if not audiences:
            raise CaConfigError("the token review needs at least one audience")
        self._api = api
        self.trust_domain = trust_domain
        self.audiences = tuple(audiences)
        self._timeout = timeout

    def authenticate(self, metadata: Mapping[str, str]) -> Caller:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        token = bearer_token(metadata)
        review = client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=client.V1TokenReviewSpec(token=token, audiences=list(self.audiences)),
        )
        # Errors are re-raised "from None": the request (and an echoed response)
        # holds the token, and must not reach a traceback in the log.
        try:
            answer = self._api.create_token_review(review, _request_timeout=self._timeout)
        except ApiException as exc:
            raise AuthenticatorUnavailable(
                f"the Kubernetes API server refused the TokenReview (HTTP {exc.status} "
                f"{exc.reason}); the CA's service account needs 'create' on tokenreviews"
            ) from None
        except Exception as exc:
            raise AuthenticatorUnavailable(
                f"cannot reach the Kubernetes API server for a TokenReview ({type(exc).__name__})"
            ) from None
        try:
            return caller_from_token_review(answer, self.trust_domain, self.audiences)
        except AuthenticationFailed as exc:
            message = str(exc)
            if token in message:
                raise AuthenticationFailed(message.replace(token, "[token]")) from None
            raise


# Kubernetes node names are DNS subdomains; anything else never reaches a selector.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def pod_is_live_on(pod: Any, node: str, namespace: str, service_account: str) -> bool:
    """Whether a ``V1Pod`` is a live pod of ``namespace/service_account`` on ``node`` (pure)."""
    metadata, spec, status = (getattr(pod, a, None) for a in ("metadata", "spec", "status"))
    if metadata is None or spec is None or status is None:
        return False
    return (
        metadata.namespace == namespace
        and spec.node_name == node
        and (spec.service_account_name or "default") == service_account
        and status.phase in ACTIVE_POD_PHASES
    )


class KubernetesNodeIndex:
    """A :class:`NodeIndex` asking the API server (``CoreV1Api``) on every check.

    Impersonation requests are rare (one per service account per node and
    refresh), so a direct list filtered by node is simpler than a watch cache.
    """

    def __init__(self, api: Any, *, timeout: float = 5.0) -> None:
        self._api = api
        self._timeout = timeout

    def has_running_pod(self, node: str, namespace: str, service_account: str) -> bool:
        if not _NODE_NAME.fullmatch(node):
            return False
        try:
            pods = self._api.list_namespaced_pod(
                namespace,
                field_selector=f"spec.nodeName={node}",
                _request_timeout=self._timeout,
            )
        except Exception as exc:
            raise CertificateUnavailable(
                f"cannot list pods on node {node} from the Kubernetes API server "
                f"({type(exc).__name__}); the CA's service account needs 'list' on pods"
            ) from None
        return any(pod_is_live_on(p, node, namespace, service_account) for p in pods.items or ())


# -- authorization ---------------------------------------------------------------


def parse_node_agent(text: str) -> tuple[str, str]:
    """``"<namespace>/<service-account>"`` -> ``(namespace, service_account)``."""
    namespace, slash, service_account = text.partition("/")
    if not slash:
        raise CaConfigError(f"node agent {text!r} must be <namespace>/<service-account>")
    try:
        validate_path_segment(namespace, "node agent namespace")
        validate_path_segment(service_account, "node agent service account")
    except InvalidSpiffeId as exc:
        raise CaConfigError(f"node agent {text!r}: {exc}") from None
    return namespace, service_account


class Authorizer:
    """Decides whether a caller may have a certificate for the identity its CSR names."""

    def __init__(
        self,
        trust_domain: str,
        node_index: NodeIndex,
        trusted_node_agents: Iterable[tuple[str, str]] = DEFAULT_TRUSTED_NODE_AGENTS,
    ) -> None:
        self.trust_domain = trust_domain
        self.node_index = node_index
        self.trusted_node_agents = frozenset(trusted_node_agents)

    def authorize(
        self, caller: Caller, requested: SpiffeId, impersonate: SpiffeId | None = None
    ) -> None:
        """Return if allowed; raise :class:`IdentityNotPermitted` / :class:`ImpersonationDenied`."""
        if caller.identity.trust_domain != self.trust_domain:
            raise IdentityNotPermitted(
                f"the caller {caller.identity.uri} is not in this CA's trust domain "
                f"{self.trust_domain!r}"
            )
        if requested.trust_domain != self.trust_domain:
            raise IdentityNotPermitted(
                f"the CSR asks for {requested.uri}, outside this CA's trust domain "
                f"{self.trust_domain!r}"
            )
        if impersonate is None:
            if requested != caller.identity:
                raise IdentityNotPermitted(
                    f"the CSR asks for {requested.uri} but the caller is {caller.identity.uri}; "
                    "a pod may only request its own identity"
                )
            return
        self._check_impersonation(caller, impersonate)
        if requested != impersonate:
            raise IdentityNotPermitted(
                f"the CSR asks for {requested.uri} but ImpersonatedIdentity is "
                f"{impersonate.uri}; they must be the same"
            )

    def _check_impersonation(self, caller: Caller, target: SpiffeId) -> None:
        agent = (caller.identity.namespace, caller.identity.service_account)
        if agent not in self.trusted_node_agents:
            trusted = ", ".join(f"{ns}/{sa}" for ns, sa in sorted(self.trusted_node_agents))
            raise ImpersonationDenied(
                f"{caller.identity.uri} may not impersonate {target.uri}: only trusted node "
                f"agents ({trusted or 'none configured'}) may"
            )
        if target.trust_domain != self.trust_domain:
            raise ImpersonationDenied(
                f"cannot impersonate {target.uri}: not in this CA's trust domain "
                f"{self.trust_domain!r}"
            )
        if not caller.node:
            raise ImpersonationDenied(
                f"node agent {caller.identity.uri} (pod {caller.pod_name}) presented a token "
                "without a node binding; impersonation needs to know the caller's node"
            )
        found = self.node_index.has_running_pod(
            caller.node, target.namespace, target.service_account
        )
        if found is not True:  # anything but a real True is a refusal
            raise ImpersonationDenied(
                f"node agent on {caller.node} may not impersonate {target.uri}: no running pod "
                f"with service account {target.namespace}/{target.service_account} is on "
                f"node {caller.node}"
            )
