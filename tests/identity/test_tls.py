"""Tests for identity.tls: real OpenSSL handshakes between the built contexts.

Handshakes run four ways, all real OpenSSL: ``ssl.SSLObject`` pairs over
MemoryBIOs pumped by hand (no I/O, used for most refusals), blocking
``ssl.SSLSocket`` over loopback TCP with a server thread, ``trio.SSLStream``
over loopback TCP and over an in-memory stream pair, and non-blocking
``ssl.SSLSocket`` driven by trio over loopback TCP.

OpenSSL checks validity against the wall clock (Python cannot set the
verification time), so certificates here are issued around the real "now".
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity import tls
from identity.ca import (
    CertificateAuthority,
    build_csr,
    ca_builder,
    create_root,
    generate_workload_key,
    validate_csr,
)
from identity.certs import WorkloadCertificate
from identity.errors import PeerIdentityError
from identity.spiffe import SpiffeId
from identity.tls import (
    AES_GCM_SUITES,
    ContextCache,
    TlsContextError,
    TrustBundle,
    client_context,
    load_cert_chain_in_memory,
    peer_identity,
    server_context,
    tls_client_socket,
    tls_client_stream,
    tls_server_socket,
    tls_server_stream,
    verify_client_identity,
    verify_server_identity,
)

pytestmark = pytest.mark.unit

TD = "cluster.local"
OTHER_TD = "other.example"
NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)

SERVER_ID = SpiffeId(TD, "shop", "cart")
CLIENT_ID = SpiffeId(TD, "shop", "frontend")

# OpenSSL X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20


# -- a small test PKI (built on identity.ca, plus hand-made odd leaves) ---------


@dataclass
class Authority:
    trust_domain: str
    key: ec.EllipticCurvePrivateKey  # the root's key
    root: x509.Certificate
    ca: CertificateAuthority
    signing_key: ec.EllipticCurvePrivateKey  # the root's or an intermediate's

    def issue(
        self,
        identity: SpiffeId,
        *,
        at: dt.datetime | None = None,
        lifetime: dt.timedelta | None = None,
    ) -> WorkloadCertificate:
        """A workload certificate, as the CA signs it; ``at`` shifts the CA's clock."""
        ca = self.ca
        if at is not None:
            ca = CertificateAuthority(
                trust_domain=self.trust_domain,
                signing_cert=self.ca.signing_cert,
                signing_key=self.signing_key,
                intermediates=self.ca.intermediates,
                roots=self.ca.roots,
                clock=lambda: at,
            )
        key = generate_workload_key()
        issued = ca.sign_workload(validate_csr(build_csr(key, identity)), lifetime)
        return WorkloadCertificate.from_ca_response(identity, key, issued.chain_pem)

    def odd_leaf(self, uris: list[str], dns: list[str] | None = None) -> CertAndKey:
        """A leaf signed by this CA with whatever URI SANs (and DNS SANs) we like."""
        key = generate_workload_key()
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns or []]
        builder = _leaf_builder(key, self.root.subject, NOW - HOUR, NOW + DAY).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
            critical=False,
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
            builder = builder.subject_name(x509.Name([]))
        else:
            builder = builder.subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-san")])
            )
        return CertAndKey(builder.sign(self.key, hashes.SHA256()), key)


@dataclass
class CertAndKey:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def chain_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _leaf_builder(
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )


def make_ca(trust_domain: str = TD) -> Authority:
    key, root = create_root(trust_domain, NOW)
    ca = CertificateAuthority(
        trust_domain=trust_domain,
        signing_cert=root,
        signing_key=key,
        intermediates=[],
        roots=[root],
    )
    return Authority(trust_domain, key, root, ca, key)


def make_ca_with_intermediate(trust_domain: str = TD) -> Authority:
    """root -> intermediate (the signer)."""
    root_key, root = create_root(trust_domain, NOW)
    inter_key = generate_workload_key()
    inter = ca_builder(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Underpass intermediate")]),
        root.subject,
        inter_key.public_key(),
        NOW - HOUR,
        NOW + 30 * DAY,
        path_length=0,
        issuer_public_key=root_key.public_key(),
    ).sign(root_key, hashes.SHA256())
    ca = CertificateAuthority(
        trust_domain=trust_domain,
        signing_cert=inter,
        signing_key=inter_key,
        intermediates=[],
        roots=[root],
    )
    return Authority(trust_domain, root_key, root, ca, inter_key)


def self_signed_leaf(identity: SpiffeId) -> CertAndKey:
    key = generate_workload_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed workload")])
    cert = (
        _leaf_builder(key, subject, NOW - HOUR, NOW + DAY)
        .subject_name(subject)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertAndKey(cert, key)


def raw_context(
    *, server: bool, bundle: TrustBundle, presented: CertAndKey | None, alpn: bool = True
) -> ssl.SSLContext:
    """A peer context built by hand (not by identity.tls), to present odd certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.pem)
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    if presented is not None:
        load_cert_chain_in_memory(ctx, presented.chain_pem, presented.key_pem)
    return ctx


@pytest.fixture(scope="module")
def ca() -> Authority:
    return make_ca()


@pytest.fixture(scope="module")
def bundle(ca: Authority) -> TrustBundle:
    return TrustBundle([ca.root])


@pytest.fixture(scope="module")
def server_cert(ca: Authority) -> WorkloadCertificate:
    return ca.issue(SERVER_ID)


@pytest.fixture(scope="module")
def client_cert(ca: Authority) -> WorkloadCertificate:
    return ca.issue(CLIENT_ID)


# -- handshake drivers ---------------------------------------------------------


@dataclass
class Side:
    obj: ssl.SSLObject
    done: bool = False
    error: ssl.SSLError | None = None


def memory_handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[Side, Side]:
    """Run a real OpenSSL handshake between two SSLObjects, moving bytes by hand."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = Side(client_ctx.wrap_bio(c_in, c_out, server_side=False))
    server = Side(server_ctx.wrap_bio(s_in, s_out, server_side=True))
    for _ in range(20):
        for side in (client, server):
            if side.done or side.error is not None:
                continue
            try:
                side.obj.do_handshake()
                side.done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                side.error = exc
        to_server, to_client = c_out.read(), s_out.read()
        s_in.write(to_server)
        c_in.write(to_client)
        finished = all(s.done or s.error is not None for s in (client, server))
        if finished and not to_server and not to_client:
            break
        if not to_server and not to_client and (client.error or server.error):
            break
    return client, server


@dataclass
class StreamOutcome:
    peer: SpiffeId | None = None
    error: BaseException | None = None


async def trio_pair(
    client_ctx: ssl.SSLContext,
    server_ctx: ssl.SSLContext,
    expected: frozenset[SpiffeId],
    trust_domain: str = TD,
) -> tuple[StreamOutcome, StreamOutcome]:
    """tls_client_stream against tls_server_stream over an in-memory stream pair."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client, server = StreamOutcome(), StreamOutcome()

    async def run_client() -> None:
        try:
            stream, client.peer = await tls_client_stream(client_transport, client_ctx, expected)
        except (PeerIdentityError, trio.BrokenResourceError) as exc:
            client.error = exc
            return
        await stream.aclose()

    async def run_server() -> None:
        try:
            stream, server.peer = await tls_server_stream(
                server_transport, server_ctx, trust_domain
            )
        except (PeerIdentityError, trio.BrokenResourceError) as exc:
            server.error = exc
            return
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_client)
            nursery.start_soon(run_server)
    return client, server


def verify_error(exc: BaseException | None) -> ssl.SSLCertVerificationError:
    """The OpenSSL verification error behind a failed handshake."""
    while exc is not None and not isinstance(exc, ssl.SSLCertVerificationError):
        exc = exc.__cause__ or exc.__context__
    assert isinstance(exc, ssl.SSLCertVerificationError)
    return exc


# -- contexts --------------------------------------------------------------------


def test_context_settings(server_cert: WorkloadCertificate, bundle: TrustBundle) -> None:
    for ctx, server in (
        (server_context(server_cert, bundle), True),
        (client_context(server_cert, bundle), False),
    ):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.check_hostname is False
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
        assert not ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
        # Trust anchors are exactly the bundle: no system CAs.
        anchors = ctx.get_ca_certs(binary_form=True)
        assert anchors == [bundle.roots[0].public_bytes(serialization.Encoding.DER)]
        tls13 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
        assert tls13[0] == "TLS_AES_256_GCM_SHA384"
        assert set(tls13) >= AES_GCM_SUITES
        if server:
            assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
            assert ctx.num_tickets == 0


def test_builder_refuses_a_certificate_for_another_identity(
    ca: Authority, server_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    lying = WorkloadCertificate.from_parts(
        identity=CLIENT_ID,
        private_key=server_cert.private_key,
        chain=server_cert.chain,
        roots=server_cert.roots,
    )
    with pytest.raises(TlsContextError, match=r"names spiffe://cluster.local/ns/shop/sa/cart"):
        server_context(lying, bundle)


def test_builder_refuses_a_key_that_does_not_match(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    mismatched = WorkloadCertificate.from_parts(
        identity=SERVER_ID,
        private_key=client_cert.private_key,
        chain=server_cert.chain,
        roots=server_cert.roots,
    )
    with pytest.raises(TlsContextError, match="OpenSSL refused the certificate chain or key"):
        client_context(mismatched, bundle)


def test_key_is_loaded_through_an_anonymous_memory_file(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    server_cert: WorkloadCertificate,
    bundle: TrustBundle,
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative path written by mistake would land here
    temp_dirs = {Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp")}
    before = {d: set(d.iterdir()) for d in temp_dirs if d.is_dir()}
    seen: list[tuple[str, str | None, str]] = []
    original = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        seen.append((str(certfile), keyfile, os.readlink(certfile)))
        original(self, certfile, keyfile, password)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    server_context(server_cert, bundle)

    assert len(seen) == 1
    path, keyfile, target = seen[0]
    assert path.startswith("/proc/self/fd/")
    assert keyfile is None  # the key comes from the same in-memory file
    assert target.startswith("/memfd:")  # anonymous, not linked in any directory
    # The memory file was closed right after loading.
    assert not _is_our_memfd(path)
    assert list(tmp_path.iterdir()) == []
    # Other processes may create files in /tmp meanwhile; none may hold our key, in PEM
    # (a base64 line of pure key material) or raw (the private scalar).
    markers = (
        server_cert.private_key_pem().splitlines()[2],
        server_cert.private_key.private_numbers().private_value.to_bytes(32, "big"),
    )
    for directory, old in before.items():
        for new in set(directory.iterdir()) - old:
            if new.is_file() and os.access(new, os.R_OK):
                content = new.read_bytes()
                assert not any(m in content for m in markers), new


def _is_our_memfd(path: str) -> bool:
    try:
        return os.readlink(path).startswith("/memfd:underpass")
    except OSError:  # ENOENT: the descriptor is closed
        return False


def test_trust_bundle_compares_by_content(ca: Authority) -> None:
    other = make_ca(OTHER_TD)
    a = TrustBundle([ca.root, other.root])
    b = TrustBundle([other.root, ca.root, other.root])
    assert a == b
    assert hash(a) == hash(b)
    assert len(b) == 2
    assert TrustBundle.from_pem(a.pem) == a
    assert TrustBundle([ca.root]) != a
    with pytest.raises(TlsContextError, match="no root certificate"):
        TrustBundle([])
    with pytest.raises(TlsContextError, match="not PEM"):
        TrustBundle.from_pem(b"garbage")


# -- successful handshakes -----------------------------------------------------------


def test_memory_bio_handshake_exposes_identities_tls13_h2_aes_gcm(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    client, server = memory_handshake(
        client_context(client_cert, bundle), server_context(server_cert, bundle)
    )
    assert client.done and server.done, (client.error, server.error)
    for side in (client.obj, server.obj):
        assert side.version() == "TLSv1.3"
        assert side.selected_alpn_protocol() == "h2"
        cipher = side.cipher()
        assert cipher is not None and cipher[0] == "TLS_AES_256_GCM_SHA384"
    assert client.obj.server_hostname is None  # no SNI
    assert verify_server_identity(client.obj, frozenset({SERVER_ID})) == SERVER_ID
    assert verify_client_identity(server.obj, TD) == CLIENT_ID
    # Any one of several expected identities (e.g. a service's subject_alt_names) will do.
    assert verify_server_identity(client.obj, [CLIENT_ID, SERVER_ID]) == SERVER_ID


def test_blocking_sockets_over_loopback_tcp(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    server_ctx = server_context(server_cert, bundle)
    client_ctx = client_context(client_cert, bundle)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        address = listener.getsockname()

        def serve() -> tuple[SpiffeId, str | None]:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls_sock:
                peer = verify_client_identity(tls_sock, TD)
                tls_sock.sendall(tls_sock.recv(64).upper())
                return peer, tls_sock.version()

        with ThreadPoolExecutor(max_workers=1) as pool:
            served = pool.submit(serve)
            with (
                socket.create_connection(address, timeout=10) as raw,
                client_ctx.wrap_socket(raw) as tls_sock,
            ):
                assert tls_sock.version() == "TLSv1.3"
                assert tls_sock.selected_alpn_protocol() == "h2"
                assert verify_server_identity(tls_sock, {SERVER_ID}) == SERVER_ID
                tls_sock.sendall(b"hbone")
                assert tls_sock.recv(64) == b"HBONE"
            assert served.result(timeout=10) == (CLIENT_ID, "TLSv1.3")


async def test_trio_streams_over_loopback_tcp(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    server_ctx = server_context(server_cert, bundle)
    client_ctx = client_context(client_cert, bundle)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[SpiffeId] = []

    async def serve() -> None:
        transport = await listeners[0].accept()
        stream, peer = await tls_server_stream(transport, server_ctx, TD)
        seen.append(peer)
        async with stream:
            await stream.send_all((await stream.receive_some(64)).upper())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            stream, server_peer = await tls_client_stream(
                transport, client_ctx, frozenset({SERVER_ID})
            )
            async with stream:
                assert server_peer == SERVER_ID
                assert stream.selected_alpn_protocol() == "h2"
                assert stream.version() == "TLSv1.3"
                await stream.send_all(b"hbone")
                assert await stream.receive_some(64) == b"HBONE"
    for listener in listeners:
        await listener.aclose()
    assert seen == [CLIENT_ID]


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair of stdlib TCP sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    return client, server


async def _recv_nonblocking(sock: ssl.SSLSocket, size: int) -> bytes:
    while True:
        try:
            return sock.recv(size)
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(sock)


async def test_nonblocking_sockets_driven_by_trio(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    client_sock, server_sock = _loopback_pair()
    results: dict[str, tuple[ssl.SSLSocket, SpiffeId]] = {}

    async def server() -> None:
        results["server"] = await tls_server_socket(
            server_sock, server_context(server_cert, bundle), TD
        )

    async def client() -> None:
        results["client"] = await tls_client_socket(
            client_sock, client_context(client_cert, bundle), {SERVER_ID}
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(client)
        client_tls, server_peer = results["client"]
        server_tls, client_peer = results["server"]
        try:
            assert (server_peer, client_peer) == (SERVER_ID, CLIENT_ID)
            assert client_tls.getblocking() is False
            client_tls.send(b"ping")
            assert await _recv_nonblocking(server_tls, 64) == b"ping"
        finally:
            client_tls.close()
            server_tls.close()


async def test_cert_chain_with_intermediate(bundle: TrustBundle) -> None:
    inter_ca = make_ca_with_intermediate()
    server_cert = inter_ca.issue(SERVER_ID)
    assert len(server_cert.chain) == 2  # leaf + intermediate are sent; the root is not
    client_cert = inter_ca.issue(CLIENT_ID)
    bundle = TrustBundle([inter_ca.root])
    client, server = await trio_pair(
        client_context(client_cert, bundle),
        server_context(server_cert, bundle),
        frozenset({SERVER_ID}),
    )
    assert (client.peer, server.peer) == (SERVER_ID, CLIENT_ID), (client.error, server.error)


async def test_bundle_with_two_roots_accepts_peers_from_either(ca: Authority) -> None:
    """Root rotation: old and new roots are both trusted while workloads move over."""
    new_ca = make_ca()
    bundle = TrustBundle([ca.root, new_ca.root])
    for server_ca, client_ca in ((ca, new_ca), (new_ca, ca)):
        client, server = await trio_pair(
            client_context(client_ca.issue(CLIENT_ID), bundle),
            server_context(server_ca.issue(SERVER_ID), bundle),
            frozenset({SERVER_ID}),
        )
        assert (client.peer, server.peer) == (SERVER_ID, CLIENT_ID), (client.error, server.error)
    # With only the new root, a peer from the old root fails OpenSSL's chain check. The
    # server's OpenSSL completes a leaf-only chain from its own store, so it sends the old
    # root along: "self-signed certificate in certificate chain".
    client, server = await trio_pair(
        client_context(new_ca.issue(CLIENT_ID), TrustBundle([new_ca.root])),
        server_context(ca.issue(SERVER_ID), bundle),
        frozenset({SERVER_ID}),
    )
    assert verify_error(client.error).verify_code == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN


# -- identity refusals ---------------------------------------------------------------------


async def test_client_rejects_wrong_server_identity(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    expected = frozenset({SpiffeId(TD, "shop", "payments"), SpiffeId(TD, "shop", "ledger")})
    client, _ = await trio_pair(
        client_context(client_cert, bundle), server_context(server_cert, bundle), expected
    )
    assert isinstance(client.error, PeerIdentityError)
    message = str(client.error)
    assert "presented spiffe://cluster.local/ns/shop/sa/cart" in message
    assert "spiffe://cluster.local/ns/shop/sa/payments" in message
    assert "spiffe://cluster.local/ns/shop/sa/ledger" in message


def test_client_rejects_when_nothing_is_expected(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    client, _ = memory_handshake(
        client_context(client_cert, bundle), server_context(server_cert, bundle)
    )
    with pytest.raises(PeerIdentityError, match="no expected identity"):
        verify_server_identity(client.obj, frozenset())


async def test_server_rejects_client_from_another_trust_domain(
    ca: Authority, server_cert: WorkloadCertificate
) -> None:
    other = make_ca(OTHER_TD)
    bundle = TrustBundle([ca.root, other.root])  # federation: the chain itself is trusted
    stranger = other.issue(SpiffeId(OTHER_TD, "shop", "frontend"))
    client, server = await trio_pair(
        client_context(stranger, bundle),
        server_context(server_cert, bundle),
        frozenset({SERVER_ID}),
    )
    assert client.peer == SERVER_ID  # the client saw a good server
    assert isinstance(server.error, PeerIdentityError)
    assert "trust domain 'other.example'" in str(server.error)
    assert "only 'cluster.local'" in str(server.error)


def test_client_rejects_server_from_another_trust_domain_unless_expected(
    ca: Authority, client_cert: WorkloadCertificate
) -> None:
    other = make_ca(OTHER_TD)
    bundle = TrustBundle([ca.root, other.root])
    foreign_id = SpiffeId(OTHER_TD, "shop", "cart")
    client, _ = memory_handshake(
        client_context(client_cert, bundle), server_context(other.issue(foreign_id), bundle)
    )
    assert client.done, client.error
    with pytest.raises(PeerIdentityError):
        verify_server_identity(client.obj, {SERVER_ID})  # same ns/sa, other trust domain
    assert verify_server_identity(client.obj, {foreign_id}) == foreign_id


ODD_LEAVES = {
    "two SPIFFE URIs": [CLIENT_ID.uri, SpiffeId(TD, "shop", "other").uri],
    "SPIFFE URI plus another URI": [CLIENT_ID.uri, "https://example.com/x"],
    "no URI at all": [],
    "a SPIFFE ID that is not a workload ID": ["spiffe://cluster.local/ns/shop"],
    "a non-SPIFFE URI": ["https://cluster.local/ns/shop/sa/frontend"],
}


@pytest.mark.parametrize("uris", ODD_LEAVES.values(), ids=ODD_LEAVES.keys())
def test_leaf_without_exactly_one_workload_uri_is_rejected_both_ways(
    ca: Authority,
    uris: list[str],
    server_cert: WorkloadCertificate,
    client_cert: WorkloadCertificate,
    bundle: TrustBundle,
) -> None:
    """Policy: exactly one URI SAN, a workload SPIFFE ID (X.509-SVID). Anything else fails.

    The chain is fine (OpenSSL accepts it); only the identity check catches it.
    """
    odd = ca.odd_leaf(uris, dns=["cart.shop.svc.cluster.local"] if not uris else None)
    # As a client certificate.
    client, server = memory_handshake(
        raw_context(server=False, bundle=bundle, presented=odd),
        server_context(server_cert, bundle),
    )
    assert server.done, server.error
    with pytest.raises(PeerIdentityError, match="client's certificate"):
        verify_client_identity(server.obj, TD)
    # As a server certificate, even when one of its URIs is the expected one.
    client, server = memory_handshake(
        client_context(client_cert, bundle),
        raw_context(server=True, bundle=bundle, presented=odd),
    )
    assert client.done, client.error
    with pytest.raises(PeerIdentityError, match="server's certificate"):
        verify_server_identity(client.obj, {CLIENT_ID, SERVER_ID})


# -- chain refusals by OpenSSL ------------------------------------------------------------------


def _bad_peers(ca: Authority) -> dict[str, tuple[Callable[[SpiffeId], CertAndKey], int, str]]:
    """name -> (make a bad certificate for an identity, X509_V_ERR code, OpenSSL's words)."""

    def issued(**kwargs: Any) -> Callable[[SpiffeId], CertAndKey]:
        def make(identity: SpiffeId) -> CertAndKey:
            wc = ca.issue(identity, **kwargs)
            return CertAndKey(wc.leaf, wc.private_key)

        return make

    def untrusted(identity: SpiffeId) -> CertAndKey:
        wc = make_ca().issue(identity)  # same trust domain, a root not in the bundle
        return CertAndKey(wc.leaf, wc.private_key)

    return {
        "expired": (
            issued(at=NOW - 3 * DAY, lifetime=HOUR),
            X509_V_ERR_CERT_HAS_EXPIRED,
            "certificate has expired",
        ),
        "not yet valid": (
            issued(at=NOW + 2 * DAY, lifetime=HOUR),
            X509_V_ERR_CERT_NOT_YET_VALID,
            "certificate is not yet valid",
        ),
        "self-signed": (
            self_signed_leaf,
            X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
            "self-signed certificate",
        ),
        "untrusted CA": (
            untrusted,
            X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
            "unable to get local issuer certificate",
        ),
    }


BAD_PEERS = ["expired", "not yet valid", "self-signed", "untrusted CA"]


@pytest.mark.parametrize("kind", BAD_PEERS)
def test_client_rejects_bad_server_chain(
    kind: str, ca: Authority, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    make, code, words = _bad_peers(ca)[kind]
    client, server = memory_handshake(
        client_context(client_cert, bundle),
        raw_context(server=True, bundle=bundle, presented=make(SERVER_ID)),
    )
    error = verify_error(client.error)
    assert error.verify_code == code
    assert error.verify_message == words
    assert not client.done and not server.done
    with pytest.raises(PeerIdentityError):  # and nothing half-done passes a later check
        verify_server_identity(client.obj, {SERVER_ID})


@pytest.mark.parametrize("kind", BAD_PEERS)
def test_server_rejects_bad_client_chain(
    kind: str, ca: Authority, server_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    make, code, words = _bad_peers(ca)[kind]
    _, server = memory_handshake(
        raw_context(server=False, bundle=bundle, presented=make(CLIENT_ID)),
        server_context(server_cert, bundle),
    )
    error = verify_error(server.error)
    assert error.verify_code == code
    assert error.verify_message == words
    with pytest.raises(PeerIdentityError):
        verify_client_identity(server.obj, TD)


async def test_trio_server_reports_the_openssl_error_and_closes(
    ca: Authority, server_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    make, code, _ = _bad_peers(ca)["expired"]
    client, server = await trio_pair(
        raw_context(server=False, bundle=bundle, presented=make(CLIENT_ID)),
        server_context(server_cert, bundle),
        frozenset({SERVER_ID}),
    )
    assert isinstance(server.error, trio.BrokenResourceError)
    assert verify_error(server.error).verify_code == code
    # TLS 1.3: the client had finished its side before the server refused it.
    assert client.peer == SERVER_ID


def test_server_requires_a_client_certificate(
    server_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    _, server = memory_handshake(
        raw_context(server=False, bundle=bundle, presented=None),
        server_context(server_cert, bundle),
    )
    assert server.error is not None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(server.error)


def test_server_rejects_client_without_h2(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    plain = CertAndKey(client_cert.leaf, client_cert.private_key)
    _, server = memory_handshake(
        raw_context(server=False, bundle=bundle, presented=plain, alpn=False),
        server_context(server_cert, bundle),
    )
    assert server.done, server.error
    with pytest.raises(PeerIdentityError, match="ALPN None; HBONE requires 'h2'"):
        verify_client_identity(server.obj, TD)


# -- the session checks, with a stand-in connection (cases OpenSSL cannot easily produce) -------


class FakeConnection:
    def __init__(self, **overrides: Any) -> None:
        self.values: dict[str, Any] = {
            "version": "TLSv1.3",
            "cipher": ("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128),
            "alpn": "h2",
            "cert": {"subjectAltName": (("URI", SERVER_ID.uri), ("DNS", "cart"))},
        }
        self.values.update(overrides)

    def _get(self, name: str) -> Any:
        value = self.values[name]
        if isinstance(value, BaseException):
            raise value
        return value

    def version(self) -> str | None:
        return self._get("version")  # type: ignore[no-any-return]

    def cipher(self) -> tuple[str, str, int] | None:
        return self._get("cipher")  # type: ignore[no-any-return]

    def selected_alpn_protocol(self) -> str | None:
        return self._get("alpn")  # type: ignore[no-any-return]

    def getpeercert(self) -> Any:
        return self._get("cert")


def test_fake_connection_baseline_is_accepted() -> None:
    assert peer_identity(FakeConnection()) == SERVER_ID


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"version": "TLSv1.2"}, "negotiated TLSv1.2"),
        ({"version": None}, "negotiated None"),
        ({"cipher": ("TLS_CHACHA20_POLY1305_SHA256", "TLSv1.3", 256)}, "CHACHA20"),
        ({"cipher": None}, "cipher suite None"),
        ({"alpn": "http/1.1"}, "ALPN 'http/1.1'"),
        ({"cert": {}}, "no verified certificate"),  # what an unverifying context yields
        ({"cert": None}, "no verified certificate"),
        ({"cert": ValueError("handshake not done yet")}, "handshake not done yet"),
        ({"version": OSError("not connected")}, "not connected"),
        ({"cert": {"subjectAltName": (("URI", "spiffe://x\x00/ns/a/sa/b"),)}}, "not a workload"),
        ({"cert": {"subjectAltName": (("URI",),)}}, "SANs cannot be read"),
        (
            {"cert": {"subjectAltName": (("URI", "a"),) * 5}},
            r"5 URI SANs \('a', 'a', 'a', \.\.\.\)",
        ),
    ],
)
def test_session_checks_fail_closed(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(PeerIdentityError, match=words):
        peer_identity(FakeConnection(**overrides), "server")


def test_verify_before_handshake_is_rejected(
    client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    obj = client_context(client_cert, bundle).wrap_bio(
        ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=False
    )
    with pytest.raises(PeerIdentityError, match="handshake"):
        verify_server_identity(obj, {SERVER_ID})


# -- context cache -------------------------------------------------------------------------------


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    built: list[str] = []
    real_server, real_client = tls.server_context, tls.client_context

    def server(cert: WorkloadCertificate, bundle: Any) -> ssl.SSLContext:
        built.append(f"server {cert.identity}")
        return real_server(cert, bundle)

    def client(cert: WorkloadCertificate, bundle: Any) -> ssl.SSLContext:
        built.append(f"client {cert.identity}")
        return real_client(cert, bundle)

    monkeypatch.setattr(tls, "server_context", server)
    monkeypatch.setattr(tls, "client_context", client)
    yield built


def test_cache_reuses_until_rotation(
    counting: list[str], ca: Authority, server_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    cache = ContextCache()
    first = cache.server(server_cert, bundle)
    assert cache.server(server_cert, bundle) is first
    # An equal bundle object and a copy of the same certificate are still hits.
    same = WorkloadCertificate.from_parts(
        server_cert.identity, server_cert.private_key, server_cert.chain, server_cert.roots
    )
    assert cache.server(same, TrustBundle([ca.root])) is first
    assert counting == [f"server {SERVER_ID}"]

    # Rotation: a new serial for the same identity builds a new context and replaces the old.
    rotated = ca.issue(SERVER_ID)
    second = cache.server(rotated, bundle)
    assert second is not first
    assert cache.server(rotated, bundle) is second
    assert len(cache) == 1

    # A new trust bundle (root rotation) also builds a new context.
    two_roots = TrustBundle([ca.root, make_ca().root])
    third = cache.server(rotated, two_roots)
    assert third is not second
    assert len(cache) == 1

    # Client contexts are cached separately from server contexts.
    assert cache.client(rotated, two_roots) is cache.client(rotated, two_roots)
    assert len(cache) == 2
    assert counting == [f"server {SERVER_ID}"] * 3 + [f"client {SERVER_ID}"]

    cache.discard(SERVER_ID)
    assert len(cache) == 0
    cache.server(rotated, two_roots)
    cache.clear()
    assert len(cache) == 0


def test_cached_context_handshakes_with_new_certificate_after_rotation(
    ca: Authority, client_cert: WorkloadCertificate, bundle: TrustBundle
) -> None:
    cache = ContextCache()
    old = ca.issue(SERVER_ID)
    new = ca.issue(SERVER_ID)
    cache.server(old, bundle)
    client, server = memory_handshake(
        client_context(client_cert, bundle), cache.server(new, bundle)
    )
    assert client.done and server.done
    peer_der = client.obj.getpeercert(binary_form=True)
    assert peer_der == new.leaf.public_bytes(serialization.Encoding.DER)
