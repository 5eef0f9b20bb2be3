"""The CA's gRPC service: ``istio.v1.auth.IstioCertificateService/CreateCertificate``.

This module owns the CA's network face:

- :class:`CaServicer`: one request, end to end: the ``clusterid`` check,
  authentication (``authorization: Bearer <token>``), CSR checks, the
  ``ImpersonatedIdentity`` request metadata, authorization, signing for
  ``validity_duration`` seconds (0 = the CA's default of 24 h; the CA refuses
  more than 90 days), one audit log line per certificate issued, and metrics.
  :class:`~identity.errors.IdentityError` is turned into a gRPC status in one
  place (``CreateCertificate``) through its ``grpc_code``; anything else is an
  INTERNAL error whose details stay in the CA's log.
- :class:`CaServer`: a threaded grpcio server answering over TLS with a
  serving certificate from the same CA, with a start/stop API that reports the
  bound port (port 0 picks a free one).

Keys, CSRs and tokens are never logged; the audit line names identities,
the serial and validity, the caller's pod and node.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from concurrent import futures
from types import TracebackType
from typing import Any

import grpc
import structlog
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from identity.auth import (
    DEFAULT_CLUSTER_ID,
    IMPERSONATED_IDENTITY_KEY,
    Authenticator,
    Authorizer,
    Caller,
)
from identity.ca import MAX_WORKLOAD_LIFETIME, CertificateAuthority, validate_csr
from identity.errors import (
    AuthenticationFailed,
    CaConfigError,
    IdentityError,
    InvalidRequest,
    InvalidSpiffeId,
)
from identity.proto import ca_pb2, ca_pb2_grpc
from identity.spiffe import SpiffeId

DEFAULT_LISTEN = "0.0.0.0:15012"
DEFAULT_SERVING_DNS_NAMES = ("istiod.istio-system.svc", "underpass-ca", "localhost")
DEFAULT_SERVING_IPS = ("127.0.0.1",)
# A CSR is a few hundred bytes; refuse anything far bigger before parsing it.
MAX_REQUEST_BYTES = 64 * 1024
SERVICE_NAME = "istio.v1.auth.IstioCertificateService"

_log = structlog.get_logger("identity.server")
_audit = structlog.get_logger("identity.audit")


def _reason(exc: BaseException) -> str:
    """A bounded metric label from an error class: ``InvalidCsr`` -> ``invalid_csr``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


class CaMetrics:
    """The CA's Prometheus counters, registered on ``registry`` (default: the global one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.requests = Counter(
            "underpass_ca_requests",
            "CreateCertificate calls received",
            registry=registry,
        )
        self.issued = Counter(
            "underpass_ca_certificates_issued",
            "Workload certificates issued",
            ["impersonated"],
            registry=registry,
        )
        self.refused = Counter(
            "underpass_ca_requests_refused",
            "CreateCertificate calls refused, by reason",
            ["reason"],
            registry=registry,
        )


# Metadata the CA acts on: each must come at most once.
_SINGLE_VALUED = frozenset({"authorization", "clusterid"})


def text_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """gRPC invocation metadata as ``{lower-case key: text value}`` (binary keys skipped).

    A repeated ``authorization`` or ``clusterid`` is refused, so that no part of
    the CA can check one value while another part uses the other; for other
    keys the first value is kept.
    """
    out: dict[str, str] = {}
    for key, value in metadata:
        key = key.lower()
        if key.endswith("-bin") or not isinstance(value, str):
            continue
        if key in out:
            if key in _SINGLE_VALUED:
                raise AuthenticationFailed(f"the request metadata repeats {key!r}; send it once")
            continue
        out[key] = value
    return out


def impersonated_identity(metadata: struct_pb2.Struct) -> SpiffeId | None:
    """The ``ImpersonatedIdentity`` of the request's Struct metadata, if any."""
    if IMPERSONATED_IDENTITY_KEY not in metadata.fields:
        return None
    value = metadata.fields[IMPERSONATED_IDENTITY_KEY]
    if value.WhichOneof("kind") != "string_value":
        raise InvalidRequest(f"request metadata {IMPERSONATED_IDENTITY_KEY} must be a string")
    try:
        return SpiffeId.parse(value.string_value)
    except InvalidSpiffeId as exc:
        raise InvalidRequest(f"request metadata {IMPERSONATED_IDENTITY_KEY}: {exc}") from None


def requested_lifetime(validity_seconds: int) -> dt.timedelta | None:
    """``validity_duration`` as a lifetime; None (the CA's default) for 0."""
    if validity_seconds < 0:
        raise InvalidRequest(f"validity_duration {validity_seconds} is negative")
    if validity_seconds == 0:
        return None
    # Checked here as well as in the CA: a huge int64 would overflow timedelta.
    if validity_seconds > MAX_WORKLOAD_LIFETIME.total_seconds():
        raise InvalidRequest(
            f"the requested lifetime of {validity_seconds} s is longer than the maximum "
            f"{int(MAX_WORKLOAD_LIFETIME.total_seconds())} s ({MAX_WORKLOAD_LIFETIME.days} days)"
        )
    return dt.timedelta(seconds=validity_seconds)


class CaServicer(ca_pb2_grpc.IstioCertificateServiceServicer):
    """Answers ``CreateCertificate``: authenticate, check, authorize, sign, audit."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        authorizer: Authorizer,
        *,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        metrics: CaMetrics | None = None,
    ) -> None:
        if authorizer.trust_domain != ca.trust_domain:
            raise CaConfigError(
                f"the authorizer's trust domain {authorizer.trust_domain!r} is not the CA's "
                f"{ca.trust_domain!r}"
            )
        self.ca = ca
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.cluster_id = cluster_id
        self.metrics = metrics if metrics is not None else CaMetrics()

    def issue(
        self,
        request: ca_pb2.IstioCertificateRequest,
        metadata: Iterable[tuple[str, str | bytes]],
        peer: str = "",
    ) -> list[str]:
        """Sign the request's CSR or raise an :class:`IdentityError`; returns the PEM chain."""
        headers = text_metadata(metadata)
        cluster = headers.get("clusterid")
        if cluster is not None and cluster != self.cluster_id:
            raise AuthenticationFailed(
                f"the caller says it is in cluster {cluster!r}, but this CA serves cluster "
                f"{self.cluster_id!r}; fix the caller's CLUSTER_ID or the CA's --cluster-id"
            )
        caller = self.authenticator.authenticate(headers)
        if not isinstance(caller, Caller):  # fail closed on a misbehaving authenticator
            raise AuthenticationFailed("the caller could not be authenticated")
        csr = validate_csr(request.csr.encode())
        impersonate = impersonated_identity(request.metadata)
        self.authorizer.authorize(caller, csr.identity, impersonate)
        issued = self.ca.sign_workload(csr, requested_lifetime(request.validity_duration))
        # Audited before it is answered: a certificate whose audit line could not be
        # written is never handed out (the error becomes INTERNAL).
        _audit.info(
            "ca.certificate_issued",
            identity=csr.identity.uri,
            serial=format(issued.serial, "x"),
            not_before=issued.not_before.isoformat(),
            not_after=issued.not_after.isoformat(),
            caller=caller.identity.uri,
            caller_pod=f"{caller.identity.namespace}/{caller.pod_name}",
            caller_pod_uid=caller.pod_uid,
            node=caller.node,
            impersonated=impersonate is not None,
            cluster=cluster or self.cluster_id,
            peer=peer,
        )
        self.metrics.issued.labels(impersonated=str(impersonate is not None).lower()).inc()
        return issued.chain_pem

    def CreateCertificate(  # the gRPC method name, hence CamelCase
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        self.metrics.requests.inc()
        peer = context.peer()
        try:
            chain = self.issue(request, context.invocation_metadata(), peer)
        except IdentityError as exc:
            # The one place where identity errors become gRPC statuses.
            code = grpc.StatusCode[exc.grpc_code.name]
            details = str(exc)
            self.metrics.refused.labels(reason=_reason(exc)).inc()
            _log.warning(
                "ca.request_refused", reason=_reason(exc), code=code.name, error=details, peer=peer
            )
        except Exception:
            code = grpc.StatusCode.INTERNAL
            details = "internal error in the CA; the operator can find it in the CA's log"
            self.metrics.refused.labels(reason="internal").inc()
            _log.exception("ca.internal_error", peer=peer)
        else:
            return ca_pb2.IstioCertificateResponse(cert_chain=chain)
        context.abort(code, details)


def split_host_port(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); :class:`CaConfigError` if malformed."""
    host, colon, port_text = address.rpartition(":")
    if not colon or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise CaConfigError(f"listen address {address!r} must be <host>:<port>")
    return host.strip("[]"), int(port_text)


class CaServer:
    """The CA's TLS gRPC server (grpcio, threaded).

    ``start()`` issues a serving certificate for ``serving_dns_names`` and
    ``serving_ips`` from ``ca``, binds ``listen`` (port 0 picks a free port)
    and returns the bound port; ``stop()`` lets in-flight calls finish for
    ``grace`` seconds. Also a context manager.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        authorizer: Authorizer,
        *,
        listen: str = DEFAULT_LISTEN,
        serving_dns_names: Sequence[str] = DEFAULT_SERVING_DNS_NAMES,
        serving_ips: Sequence[str] = DEFAULT_SERVING_IPS,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        registry: CollectorRegistry | None = None,
        max_workers: int = 8,
        max_concurrent_rpcs: int = 128,
    ) -> None:
        self.ca = ca
        self.listen = listen
        self._host, _ = split_host_port(listen)
        self.serving_dns_names = tuple(serving_dns_names)
        self.serving_ips = tuple(serving_ips)
        self.metrics = CaMetrics(registry)
        self.servicer = CaServicer(
            ca, authenticator, authorizer, cluster_id=cluster_id, metrics=self.metrics
        )
        self._max_workers = max_workers
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the CA server is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` with the bound port (IPv6 hosts in brackets)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("the CA server is already started")
        key, serving = self.ca.issue_serving_certificate(self.serving_dns_names, self.serving_ips)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Leaf and intermediates; clients hold the root already.
        chain_pem = "".join(serving.chain_pem[:-1]).encode()
        credentials = grpc.ssl_server_credentials([(key_pem, chain_pem)])
        executor = futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="ca-grpc")
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            # Two CAs must never share a port silently.
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(
            executor, options=options, maximum_concurrent_rpcs=self._max_concurrent_rpcs
        )
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self.servicer, server)
        try:
            port = server.add_secure_port(self.listen, credentials)
        except RuntimeError as exc:
            executor.shutdown(wait=False)
            raise CaConfigError(
                f"cannot listen on {self.listen} ({exc}); is the port in use?"
            ) from None
        if port == 0:
            executor.shutdown(wait=False)
            raise CaConfigError(f"cannot listen on {self.listen}; is the port in use?")
        server.start()
        self._server, self._executor, self._port = server, executor, port
        _log.info(
            "ca.serving",
            address=self.address,
            trust_domain=self.ca.trust_domain,
            serving_dns_names=list(self.serving_dns_names),
            serving_ips=list(self.serving_ips),
            serving_serial=format(serving.serial, "x"),
        )
        return port

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, then stop."""
        server, executor = self._server, self._executor
        self._server = self._executor = None
        if server is not None:
            server.stop(grace).wait()
            _log.info("ca.stopped", address=self.address)
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> CaServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = [
    "DEFAULT_CLUSTER_ID",
    "DEFAULT_LISTEN",
    "DEFAULT_SERVING_DNS_NAMES",
    "DEFAULT_SERVING_IPS",
    "IMPERSONATED_IDENTITY_KEY",
    "CaMetrics",
    "CaServer",
    "CaServicer",
    "impersonated_identity",
    "requested_lifetime",
    "split_host_port",
    "text_metadata",
]
