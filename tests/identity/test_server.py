"""The CA's gRPC service on loopback, driven by real gRPC clients.

The server is the real :class:`CaServer` (TLS, threaded grpcio) with the lab
token authenticator; callers are :class:`CaClient` and a raw generated stub.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from identity.auth import Authorizer, Caller, LabTokenAuthenticator
from identity.ca import CertificateAuthority, build_csr, generate_workload_key
from identity.certs import WorkloadCertificate
from identity.client import CaClient
from identity.errors import (
    AuthenticationFailed,
    CaConfigError,
    CertificateUnavailable,
    IdentityNotPermitted,
    InvalidCsr,
    InvalidRequest,
)
from identity.proto import ca_pb2, ca_pb2_grpc
from identity.server import CaServer, requested_lifetime, text_metadata
from identity.spiffe import SpiffeId

pytestmark = pytest.mark.unit

TD = "cluster.local"
SLEEP = SpiffeId(TD, "demo", "sleep")
HTTPBIN = SpiffeId(TD, "demo", "httpbin")
ZTUNNEL = SpiffeId(TD, "istio-system", "ztunnel")
ROGUE = SpiffeId(TD, "demo", "rogue-agent")

TOKENS = {
    "sleep": "tok-sleep-0123456789abcdef",
    "httpbin": "tok-httpbin-0123456789abcdef",
    "ztunnel-1": "tok-ztunnel1-0123456789abcdef",
    "rogue": "tok-rogue-0123456789abcdef",
}
HOUR = dt.timedelta(hours=1)


@dataclass
class Lab:
    ca: CertificateAuthority
    server: CaServer
    registry: CollectorRegistry
    root_pem: str

    @property
    def address(self) -> str:
        return self.server.address

    def client(self, token: Any, **kwargs: Any) -> CaClient:
        return CaClient(self.address, self.root_pem, token, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def write_lab_tokens(path: Path) -> Path:
    entries = [
        ("sleep", "demo", "sleep", "sleep-1", "node-1"),
        ("httpbin", "demo", "httpbin", "httpbin-1", "node-2"),
        ("ztunnel-1", "istio-system", "ztunnel", "ztunnel-a", "node-1"),
        ("rogue", "demo", "rogue-agent", "rogue-1", "node-1"),
    ]
    doc = [
        {"token": TOKENS[t], "namespace": ns, "service_account": sa, "pod": pod, "node": node}
        for t, ns, sa, pod, node in entries
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("ca")
    ca = CertificateAuthority.load_or_create(base / "state", TD)
    auth = LabTokenAuthenticator(write_lab_tokens(base / "tokens.yaml"), TD)
    registry = CollectorRegistry()
    server = CaServer(
        ca,
        auth,
        Authorizer(TD, auth),
        listen="127.0.0.1:0",
        serving_dns_names=["localhost"],
        serving_ips=["127.0.0.1"],
        registry=registry,
    )
    server.start()
    try:
        yield Lab(ca, server, registry, ca.root_bundle_pem)
    finally:
        server.stop(grace=0)


@pytest.fixture
def stub(lab: Lab) -> Iterator[ca_pb2_grpc.IstioCertificateServiceStub]:
    credentials = grpc.ssl_channel_credentials(root_certificates=lab.root_pem.encode())
    with grpc.secure_channel(lab.address, credentials) as channel:
        yield ca_pb2_grpc.IstioCertificateServiceStub(channel)


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes"))


def csr_with(key: Any, identity: SpiffeId, algorithm: Any = None) -> bytes:
    """A CSR like ztunnel's but with any key (to try weak ones)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, algorithm or hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def call_code(
    stub: ca_pb2_grpc.IstioCertificateServiceStub,
    request: ca_pb2.IstioCertificateRequest,
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateCertificate(request, metadata=metadata, timeout=10)
    error: Any = info.value
    return error.code(), error.details()


# -- granted ----------------------------------------------------------------------


def test_own_identity_is_granted(lab: Lab) -> None:
    key = generate_workload_key()
    with lab.client(TOKENS["sleep"]) as client:
        chain = client.create_certificate(build_csr(key, SLEEP), HOUR)
    cert = WorkloadCertificate.from_ca_response(SLEEP, key, chain)
    root = x509.load_pem_x509_certificate(lab.root_pem.encode())
    cert.leaf.verify_directly_issued_by(root)
    assert cert.roots == (root,)
    lifetime = cert.not_after - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=58) < lifetime <= HOUR


def test_zero_validity_means_the_default_day(
    lab: Lab, stub: ca_pb2_grpc.IstioCertificateServiceStub
) -> None:
    request = ca_pb2.IstioCertificateRequest(
        csr=build_csr(generate_workload_key(), SLEEP).decode(), validity_duration=0
    )
    response = stub.CreateCertificate(request, metadata=auth_metadata(TOKENS["sleep"]), timeout=10)
    leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23, minutes=58) < lifetime <= dt.timedelta(hours=24)
    assert len(response.cert_chain) == 2


def test_ninety_days_is_allowed(lab: Lab) -> None:
    with lab.client(TOKENS["sleep"]) as client:
        chain = client.create_certificate(
            build_csr(generate_workload_key(), SLEEP), dt.timedelta(days=90)
        )
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=89)


def test_impersonation_for_a_pod_on_the_callers_node(lab: Lab) -> None:
    key = generate_workload_key()
    before = lab.metric("underpass_ca_certificates_issued_total", impersonated="true")
    with lab.client(lambda: TOKENS["ztunnel-1"], server_name="localhost") as client:
        chain = client.create_certificate(build_csr(key, SLEEP), HOUR, impersonate=SLEEP)
    assert WorkloadCertificate.from_ca_response(SLEEP, key, chain).identity == SLEEP
    after = lab.metric("underpass_ca_certificates_issued_total", impersonated="true")
    assert after == before + 1


# -- refused ----------------------------------------------------------------------


def test_impersonation_for_a_pod_on_another_node_is_unauthenticated(
    lab: Lab, stub: ca_pb2_grpc.IstioCertificateServiceStub
) -> None:
    with (
        lab.client(TOKENS["ztunnel-1"]) as client,
        pytest.raises(AuthenticationFailed, match=r"no running pod .* on node node-1"),
    ):
        client.create_certificate(build_csr(generate_workload_key(), HTTPBIN), HOUR, HTTPBIN)
    request = ca_pb2.IstioCertificateRequest(
        csr=build_csr(generate_workload_key(), HTTPBIN).decode(), validity_duration=3600
    )
    request.metadata.update({"ImpersonatedIdentity": HTTPBIN.uri})
    code, details = call_code(stub, request, auth_metadata(TOKENS["ztunnel-1"]))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "may not impersonate" in details


def test_impersonation_by_a_pod_that_is_not_a_node_agent(lab: Lab) -> None:
    # rogue-agent runs on node-1 like sleep, but is not a trusted node agent.
    before = lab.metric("underpass_ca_requests_refused_total", reason="impersonation_denied")
    with (
        lab.client(TOKENS["rogue"]) as client,
        pytest.raises(AuthenticationFailed, match="only trusted node agents"),
    ):
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR, SLEEP)
    after = lab.metric("underpass_ca_requests_refused_total", reason="impersonation_denied")
    assert after == before + 1


def test_csr_for_another_identity_is_permission_denied(
    lab: Lab, stub: ca_pb2_grpc.IstioCertificateServiceStub
) -> None:
    with (
        lab.client(TOKENS["sleep"]) as client,
        pytest.raises(IdentityNotPermitted, match="may only request its own identity"),
    ):
        client.create_certificate(build_csr(generate_workload_key(), HTTPBIN), HOUR)
    request = ca_pb2.IstioCertificateRequest(
        csr=build_csr(generate_workload_key(), HTTPBIN).decode()
    )
    code, _ = call_code(stub, request, auth_metadata(TOKENS["sleep"]))
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_csr_naming_another_identity_than_the_impersonated_one(lab: Lab) -> None:
    with (
        lab.client(TOKENS["ztunnel-1"]) as client,
        pytest.raises(IdentityNotPermitted, match="must be the same"),
    ):
        client.create_certificate(build_csr(generate_workload_key(), ZTUNNEL), HOUR, SLEEP)


@pytest.mark.parametrize(
    "token", ["", "wrong-token-0123456789abcdef", None], ids=["empty", "unknown", "missing"]
)
def test_bad_or_missing_token_is_unauthenticated(
    lab: Lab, stub: ca_pb2_grpc.IstioCertificateServiceStub, token: str | None
) -> None:
    request = ca_pb2.IstioCertificateRequest(csr=build_csr(generate_workload_key(), SLEEP).decode())
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    code, details = call_code(stub, request, metadata)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert details
    if token:
        assert token not in details
        with lab.client(token) as client, pytest.raises(AuthenticationFailed) as info:
            client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)
        assert token not in str(info.value)


def test_repeated_authorization_metadata_is_refused(
    stub: ca_pb2_grpc.IstioCertificateServiceStub,
) -> None:
    request = ca_pb2.IstioCertificateRequest(csr=build_csr(generate_workload_key(), SLEEP).decode())
    metadata = (
        ("authorization", f"Bearer {TOKENS['sleep']}"),
        ("authorization", f"Bearer {TOKENS['httpbin']}"),
    )
    code, details = call_code(stub, request, metadata)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "repeats 'authorization'" in details


def test_foreign_cluster_id_is_refused(lab: Lab) -> None:
    with (
        lab.client(TOKENS["sleep"], cluster_id="elsewhere") as client,
        pytest.raises(AuthenticationFailed, match="cluster 'elsewhere'"),
    ):
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)


def tampered(csr_pem: bytes) -> bytes:
    """The same CSR with one bit of its signature flipped (still parseable DER)."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    assert not csr.is_signature_valid
    return csr.public_bytes(serialization.Encoding.PEM)


def test_tampered_csr_is_invalid_argument(
    lab: Lab, stub: ca_pb2_grpc.IstioCertificateServiceStub
) -> None:
    bad = tampered(build_csr(generate_workload_key(), SLEEP))
    with lab.client(TOKENS["sleep"]) as client, pytest.raises(InvalidCsr, match="signature"):
        client.create_certificate(bad, HOUR)
    code, _ = call_code(
        stub, ca_pb2.IstioCertificateRequest(csr=bad.decode()), auth_metadata(TOKENS["sleep"])
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP192R1()), "curve"),
        (
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 (the point)
            "1024 bits",
        ),
    ],
    ids=["ec-p192", "rsa-1024"],
)
def test_weak_keys_are_refused(lab: Lab, make_key: Any, message: str) -> None:
    with lab.client(TOKENS["sleep"]) as client, pytest.raises(InvalidCsr, match=message):
        client.create_certificate(csr_with(make_key(), SLEEP), HOUR)


@pytest.mark.parametrize(
    "seconds",
    [91 * 86400, 2**63 - 1, -1],
    ids=["91-days", "int64-max", "negative"],
)
def test_bad_lifetimes_are_invalid_argument(
    stub: ca_pb2_grpc.IstioCertificateServiceStub, seconds: int
) -> None:
    request = ca_pb2.IstioCertificateRequest(
        csr=build_csr(generate_workload_key(), SLEEP).decode(), validity_duration=seconds
    )
    code, details = call_code(stub, request, auth_metadata(TOKENS["sleep"]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "negative" in details or "maximum" in details


def test_lifetime_over_90_days_via_the_client(lab: Lab) -> None:
    with lab.client(TOKENS["sleep"]) as client, pytest.raises(InvalidCsr, match="maximum"):
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), dt.timedelta(days=91))
    with lab.client(TOKENS["sleep"]) as client, pytest.raises(InvalidRequest):
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), -HOUR)


def test_non_string_impersonated_identity_is_invalid_argument(
    stub: ca_pb2_grpc.IstioCertificateServiceStub,
) -> None:
    request = ca_pb2.IstioCertificateRequest(csr=build_csr(generate_workload_key(), SLEEP).decode())
    request.metadata.update({"ImpersonatedIdentity": 42})
    code, details = call_code(stub, request, auth_metadata(TOKENS["ztunnel-1"]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "ImpersonatedIdentity" in details


def test_garbage_csr_and_oversized_requests(stub: ca_pb2_grpc.IstioCertificateServiceStub) -> None:
    code, _ = call_code(
        stub, ca_pb2.IstioCertificateRequest(csr="not a csr"), auth_metadata(TOKENS["sleep"])
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    huge = ca_pb2.IstioCertificateRequest(csr="A" * 200_000)
    code, _ = call_code(stub, huge, auth_metadata(TOKENS["sleep"]))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


# -- audit log --------------------------------------------------------------------


def test_one_audit_line_per_issuance_without_secrets(lab: Lab) -> None:
    key = generate_workload_key()
    csr = build_csr(key, SLEEP)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with capture_logs() as logs, lab.client(TOKENS["ztunnel-1"]) as client:
        chain = client.create_certificate(csr, HOUR, impersonate=SLEEP)
        with pytest.raises(AuthenticationFailed):
            client.create_certificate(build_csr(generate_workload_key(), HTTPBIN), HOUR, HTTPBIN)
    issued = [e for e in logs if e["event"] == "ca.certificate_issued"]
    assert len(issued) == 1, logs
    line = issued[0]
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert line["identity"] == SLEEP.uri
    assert line["serial"] == format(leaf.serial_number, "x")
    assert line["caller"] == ZTUNNEL.uri
    assert line["caller_pod"] == "istio-system/ztunnel-a"
    assert line["node"] == "node-1"
    assert line["impersonated"] is True
    assert line["not_after"] == leaf.not_valid_after_utc.isoformat()
    assert any(e["event"] == "ca.request_refused" for e in logs)
    everything = repr(logs)
    for secret in (*TOKENS.values(), key_pem, csr.decode(), "BEGIN"):
        assert secret not in everything


# -- robustness -----------------------------------------------------------------------


def test_garbage_and_plaintext_do_not_hurt_the_server(lab: Lab) -> None:
    host, port = "127.0.0.1", lab.server.port
    for payload in (
        os.urandom(4096),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\xff\xff",
    ):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    # A half-open connection that never speaks does not block others.
    idle = socket.create_connection((host, port), timeout=10)
    try:
        # Plaintext gRPC (no TLS) fails on the client's side only.
        with grpc.insecure_channel(lab.address) as channel:
            plain = ca_pb2_grpc.IstioCertificateServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                plain.CreateCertificate(ca_pb2.IstioCertificateRequest(csr="x"), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        # TLS with a client that does not trust us: handshake refused, server fine.
        ctx = ssl.create_default_context()
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            pytest.raises(ssl.SSLError),
        ):
            ctx.wrap_socket(raw, server_hostname="localhost")
        with lab.client(TOKENS["sleep"]) as client:
            assert client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)
    finally:
        idle.close()


def test_serving_certificate_names_and_wrong_server_name(lab: Lab) -> None:
    ctx = ssl.create_default_context(cadata=lab.root_pem)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", lab.server.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    with (
        lab.client(TOKENS["sleep"], server_name="not-the-ca.example", timeout=5) as client,
        pytest.raises(CertificateUnavailable, match="UNAVAILABLE"),
    ):
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)


def test_internal_errors_are_opaque(tmp_path: Path) -> None:
    class Exploding:
        def authenticate(self, metadata: Mapping[str, str]) -> Caller:
            raise RuntimeError("secret internal detail")

    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD)
    registry = CollectorRegistry()
    auth = LabTokenAuthenticator(write_lab_tokens(tmp_path / "t.yaml"), TD)
    with (
        CaServer(
            ca, Exploding(), Authorizer(TD, auth), listen="127.0.0.1:0", registry=registry
        ) as server,
        CaClient(server.address, ca.root_bundle_pem, "whatever-token") as client,
        capture_logs() as logs,
    ):
        with pytest.raises(CertificateUnavailable) as info:
            client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)
        assert "INTERNAL" in str(info.value)
        assert "secret internal detail" not in str(info.value)
    assert registry.get_sample_value("underpass_ca_requests_refused_total", {"reason": "internal"})
    assert any(e["event"] == "ca.internal_error" for e in logs)


def test_metrics_count_requests(lab: Lab) -> None:
    requests = lab.metric("underpass_ca_requests_total")
    issued = lab.metric("underpass_ca_certificates_issued_total", impersonated="false")
    refused = lab.metric("underpass_ca_requests_refused_total", reason="identity_not_permitted")
    with lab.client(TOKENS["sleep"]) as client:
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)
        with pytest.raises(IdentityNotPermitted):
            client.create_certificate(build_csr(generate_workload_key(), HTTPBIN), HOUR)
    assert lab.metric("underpass_ca_requests_total") == requests + 2
    assert lab.metric("underpass_ca_certificates_issued_total", impersonated="false") == issued + 1
    assert (
        lab.metric("underpass_ca_requests_refused_total", reason="identity_not_permitted")
        == refused + 1
    )


# -- lifecycle and client failures --------------------------------------------------


def test_port_in_use_is_a_config_error(lab: Lab, tmp_path: Path) -> None:
    auth = LabTokenAuthenticator(write_lab_tokens(tmp_path / "t.yaml"), TD)
    second = CaServer(
        lab.ca,
        auth,
        Authorizer(TD, auth),
        listen=f"127.0.0.1:{lab.server.port}",
        registry=CollectorRegistry(),
    )
    with pytest.raises(CaConfigError, match="cannot listen"):
        second.start()


def test_stopped_server_gives_certificate_unavailable(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD)
    auth = LabTokenAuthenticator(write_lab_tokens(tmp_path / "t.yaml"), TD)
    server = CaServer(
        ca, auth, Authorizer(TD, auth), listen="127.0.0.1:0", registry=CollectorRegistry()
    )
    port = server.start()
    assert port > 0 and server.address == f"127.0.0.1:{port}"
    with pytest.raises(RuntimeError, match="already started"):
        server.start()
    server.stop(grace=0)
    server.stop()  # idempotent
    with (
        CaClient(f"127.0.0.1:{port}", ca.root_bundle_pem, TOKENS["sleep"], timeout=5) as client,
        pytest.raises(CertificateUnavailable, match=f"127.0.0.1:{port}"),
    ):
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)


def test_client_token_source_is_called_per_request_and_errors_are_mapped(lab: Lab) -> None:
    calls: list[int] = []

    def source() -> str:
        calls.append(1)
        return TOKENS["sleep"] + "\n"  # as read from a file

    with lab.client(source) as client:
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)
    assert len(calls) == 2

    def broken() -> str:
        raise FileNotFoundError(2, "No such file or directory", "/var/run/token")

    with lab.client(broken) as client, pytest.raises(AuthenticationFailed, match="/var/run/token"):
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)
    client = lab.client(TOKENS["sleep"])
    client.close()
    with pytest.raises(CertificateUnavailable, match="closed"):
        client.create_certificate(build_csr(generate_workload_key(), SLEEP), HOUR)


# -- pure helpers ------------------------------------------------------------------------


def test_text_metadata_skips_binary_and_lowercases() -> None:
    assert text_metadata(
        [("Authorization", "Bearer x"), ("trace-bin", b"\x00"), ("x-a", "1"), ("x-a", "2")]
    ) == {"authorization": "Bearer x", "x-a": "1"}
    with pytest.raises(AuthenticationFailed, match="repeats 'clusterid'"):
        text_metadata([("clusterid", "a"), ("clusterid", "a")])


def test_requested_lifetime() -> None:
    assert requested_lifetime(0) is None
    assert requested_lifetime(60) == dt.timedelta(minutes=1)
    with pytest.raises(InvalidRequest):
        requested_lifetime(-5)
