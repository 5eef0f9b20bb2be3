"""ztunnel's GrpcLiteCaSigner against the real CA (grpcio CaServer) on loopback.

It must send what :class:`identity.client.CaClient` sends (checked side by side
against a recording server) and map the CA's refusals to the same
:mod:`identity.errors` classes; the CA is the real one with the lab token
authenticator and node-checked impersonation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
import trio
import yaml
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from identity import auth
from identity.auth import Authorizer, LabTokenAuthenticator
from identity.ca import CertificateAuthority, build_csr, generate_workload_key
from identity.certmanager import CertificateManager
from identity.certs import WorkloadCertificate
from identity.client import CaClient
from identity.errors import (
    AuthenticationFailed,
    CertificateUnavailable,
    IdentityNotPermitted,
    InvalidCsr,
    InvalidRequest,
)
from identity.proto import ca_pb2, ca_pb2_grpc
from identity.server import CaServer
from identity.spiffe import SpiffeId
from ztunnel import ca_signer
from ztunnel.ca_signer import GrpcLiteCaSigner

pytestmark = pytest.mark.unit

TD = "cluster.local"
WAIT = 10.0
HOUR = dt.timedelta(hours=1)
SLEEP = SpiffeId(TD, "demo", "sleep")  # runs on node-1
HTTPBIN = SpiffeId(TD, "demo", "httpbin")  # runs on node-2
TOKENS = {
    "ztunnel-1": "tok-ztunnel1-0123456789abcdef",  # node-1's ztunnel
    "sleep": "tok-sleep-0123456789abcdef",
}


def write_tokens(path: Path) -> Path:
    entries = [
        ("ztunnel-1", "istio-system", "ztunnel", "ztunnel-a", "node-1"),
        ("sleep", "demo", "sleep", "sleep-1", "node-1"),
        (None, "demo", "httpbin", "httpbin-1", "node-2"),
    ]
    doc = [
        {
            "token": TOKENS[name] if name else "tok-httpbin-0123456789abcdef",
            "namespace": ns,
            "service_account": sa,
            "pod": pod,
            "node": node,
        }
        for name, ns, sa, pod, node in entries
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(doc))
    return path


@dataclass
class Lab:
    ca: CertificateAuthority
    server: CaServer

    def signer(self, token: Any = TOKENS["ztunnel-1"], **kwargs: Any) -> GrpcLiteCaSigner:
        kwargs.setdefault("server_name", "localhost")
        return GrpcLiteCaSigner(self.server.address, self.ca.root_bundle_pem, token, **kwargs)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("ca-signer")
    ca = CertificateAuthority.load_or_create(base / "ca", TD)
    authenticator = LabTokenAuthenticator(write_tokens(base / "tokens.yaml"), TD)
    server = CaServer(
        ca,
        authenticator,
        Authorizer(TD, authenticator),
        listen="127.0.0.1:0",
        serving_dns_names=["localhost"],
        serving_ips=[],
        registry=CollectorRegistry(),  # not the process-global one: other tests run CAs too
    )
    server.start()
    try:
        yield Lab(ca, server)
    finally:
        server.stop(grace=0)


def csr(identity: SpiffeId) -> tuple[Any, bytes]:
    key = generate_workload_key()
    return key, build_csr(key, identity)


def test_the_constants_are_identitys() -> None:
    assert ca_signer.IMPERSONATED_IDENTITY_KEY == auth.IMPERSONATED_IDENTITY_KEY
    assert ca_signer.DEFAULT_CLUSTER_ID == auth.DEFAULT_CLUSTER_ID
    stub_path = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
    assert stub_path == ca_signer.CREATE_CERTIFICATE_PATH


async def test_the_node_gets_a_pods_identity_by_impersonation(lab: Lab) -> None:
    key, request = csr(SLEEP)
    chain = await lab.signer().sign(request, SLEEP, HOUR)
    certificate = WorkloadCertificate.from_ca_response(SLEEP, key, chain)
    assert certificate.identity == SLEEP
    lifetime = certificate.leaf.not_valid_after_utc - certificate.leaf.not_valid_before_utc
    assert HOUR <= lifetime <= HOUR + dt.timedelta(minutes=5)  # the CA backdates a little


async def test_through_the_certificate_manager(lab: Lab) -> None:
    with threads_started_here() as started:
        async with CertificateManager.open(lab.signer()) as manager:
            with trio.fail_after(WAIT):
                certificate = await manager.get(SLEEP)
    assert certificate.identity == SLEEP
    assert started == []  # no worker thread per CSR any more


async def test_without_impersonation_the_caller_signs_for_itself(lab: Lab) -> None:
    signer = lab.signer(TOKENS["sleep"], impersonate=False)
    key, request = csr(SLEEP)
    chain = await signer.sign(request, SLEEP, HOUR)
    assert WorkloadCertificate.from_ca_response(SLEEP, key, chain).identity == SLEEP
    with pytest.raises(IdentityNotPermitted, match="may only request its own identity"):
        await signer.sign(csr(HTTPBIN)[1], HTTPBIN, HOUR)


@pytest.mark.parametrize(
    ("signer_args", "identity", "request_for", "error", "message"),
    [
        ({}, HTTPBIN, HTTPBIN, AuthenticationFailed, "no running pod"),
        ({"token": "tok-unknown-0123456789abcdef"}, SLEEP, SLEEP, AuthenticationFailed, "token"),
        ({"token": TOKENS["sleep"]}, SLEEP, SLEEP, AuthenticationFailed, "node agents"),
        ({}, SLEEP, HTTPBIN, IdentityNotPermitted, "must be the same"),
    ],
    ids=["pod on another node", "unknown token", "not a node agent", "csr names another"],
)
async def test_refusals_map_to_identity_errors(
    lab: Lab,
    signer_args: dict[str, Any],
    identity: SpiffeId,
    request_for: SpiffeId,
    error: type[Exception],
    message: str,
) -> None:
    with structlog.testing.capture_logs() as logs, pytest.raises(error, match=message) as info:
        await lab.signer(**signer_args).sign(csr(request_for)[1], identity, HOUR)
    for token in (*TOKENS.values(), "tok-unknown-0123456789abcdef"):
        assert token not in str(info.value)
        assert not any(token in repr(entry) for entry in logs)


async def test_a_bad_csr_is_invalid(lab: Lab) -> None:
    with pytest.raises(InvalidCsr):
        await lab.signer().sign(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n", SLEEP, HOUR)
    with pytest.raises(InvalidRequest, match="negative"):
        await lab.signer().sign(csr(SLEEP)[1], SLEEP, -HOUR)


async def test_an_unreachable_or_unverified_ca_is_unavailable(lab: Lab, tmp_path: Path) -> None:
    with pytest.raises(CertificateUnavailable, match=r"UNAVAILABLE.*does not verify"):
        await lab.signer(server_name=None).sign(csr(SLEEP)[1], SLEEP, HOUR)  # 127.0.0.1
    other = CertificateAuthority.load_or_create(tmp_path / "other", TD)
    signer = GrpcLiteCaSigner(
        lab.server.address, other.root_bundle_pem, TOKENS["ztunnel-1"], server_name="localhost"
    )
    with pytest.raises(CertificateUnavailable, match="does not verify"):
        await signer.sign(csr(SLEEP)[1], SLEEP, HOUR)
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nobody = GrpcLiteCaSigner(f"127.0.0.1:{port}", lab.ca.root_bundle_pem, "tok-x-0123456789")
    with pytest.raises(CertificateUnavailable, match=f"127.0.0.1:{port}"):
        await nobody.sign(csr(SLEEP)[1], SLEEP, HOUR)


async def test_a_broken_token_source_fails_before_calling(lab: Lab) -> None:
    def token() -> str:
        raise OSError("cannot read /var/run/secrets/tokens/istio-token")

    with pytest.raises(AuthenticationFailed, match=r"cannot obtain the token.*istio-token"):
        await lab.signer(token).sign(csr(SLEEP)[1], SLEEP, HOUR)
    with pytest.raises(AuthenticationFailed, match="empty or contains whitespace"):
        await lab.signer("two words").sign(csr(SLEEP)[1], SLEEP, HOUR)


def test_settings_are_checked_when_built(lab: Lab) -> None:
    with pytest.raises(ValueError, match="CA address"):
        GrpcLiteCaSigner("no-port", lab.ca.root_bundle_pem, "t")
    with pytest.raises(ValueError, match="root certificates"):
        GrpcLiteCaSigner("127.0.0.1:15012", b"not pem", "t")
    with pytest.raises(ValueError, match="cluster id"):
        GrpcLiteCaSigner("127.0.0.1:15012", lab.ca.root_bundle_pem, "t", cluster_id="a b")


# -- the same request as identity.client.CaClient -----------------------------------------------


class Recorder(ca_pb2_grpc.IstioCertificateServiceServicer):
    """A CA that records each call's metadata and request, and refuses it."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], ca_pb2.IstioCertificateRequest]] = []
        self.lock = threading.Lock()

    def CreateCertificate(  # the gRPC method name
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        metadata = {k: v for k, v in context.invocation_metadata() if k != "user-agent"}
        with self.lock:
            self.calls.append((metadata, request))
        context.abort(grpc.StatusCode.UNAVAILABLE, "recorded")
        raise AssertionError("abort raises")


@pytest.fixture
def recorder(lab: Lab) -> Iterator[tuple[Recorder, int]]:
    servicer = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)
    key, serving = lab.ca.issue_serving_certificate(["localhost"], [])
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    credentials = grpc.ssl_server_credentials([(key_pem, "".join(serving.chain_pem[:-1]).encode())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(grace=None).wait()


async def test_it_sends_what_the_grpcio_client_sends(
    lab: Lab, recorder: tuple[Recorder, int]
) -> None:
    """Metadata and request field by field, for the node (impersonating) and a pod."""
    servicer, port = recorder
    address, roots, token = f"127.0.0.1:{port}", lab.ca.root_bundle_pem, TOKENS["ztunnel-1"]
    _, request = csr(SLEEP)
    for impersonate in (True, False):
        with (
            CaClient(address, roots, token, server_name="localhost", cluster_id="c-9") as client,
            pytest.raises(CertificateUnavailable, match="recorded"),
        ):
            await trio.to_thread.run_sync(
                client.create_certificate, request, HOUR, SLEEP if impersonate else None
            )
        signer = GrpcLiteCaSigner(
            address,
            roots,
            token,
            server_name="localhost",
            cluster_id="c-9",
            impersonate=impersonate,
        )
        with pytest.raises(CertificateUnavailable, match="recorded"):
            await signer.sign(request, SLEEP, HOUR)
    assert len(servicer.calls) == 4
    for grpcio_call, ours in (servicer.calls[0:2], servicer.calls[2:4]):
        grpcio_metadata, grpcio_request = grpcio_call
        our_metadata, our_request = ours
        assert our_metadata == grpcio_metadata
        assert our_request == grpcio_request
    assert servicer.calls[0][0]["authorization"] == f"Bearer {TOKENS['ztunnel-1']}"
    assert servicer.calls[0][0]["clusterid"] == "c-9"
    impersonated = servicer.calls[0][1].metadata.fields["ImpersonatedIdentity"].string_value
    assert impersonated == SLEEP.uri
    assert not servicer.calls[2][1].metadata.fields


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def threads_started_here() -> Iterator[list[threading.Thread]]:
    """Threads started from this (the trio) thread while the block runs."""
    started: list[threading.Thread] = []
    original = threading.Thread.start
    here = threading.current_thread()

    def start(thread: threading.Thread) -> None:
        if threading.current_thread() is here:
            started.append(thread)
        original(thread)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threading.Thread, "start", start)
        yield started
