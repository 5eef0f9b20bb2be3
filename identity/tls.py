"""mTLS contexts for HBONE and the SPIFFE checks on the peer.

What the contexts do (PROTOCOLS.md section 2):

- TLS 1.3 only (minimum and maximum), ALPN ``h2``, a certificate required on
  both sides, no SNI and no host name checks: peers are identified by the
  SPIFFE URI SAN of their certificate, never by a DNS name.
- Trust anchors are exactly the roots of a :class:`TrustBundle` (several roots
  during a root rotation or for federation); no system CAs, no partial chains.
  ``VERIFY_X509_STRICT`` makes OpenSSL apply the RFC 5280 checks it otherwise
  skips (AKID present, CA basicConstraints critical, SAN critical when the
  subject is empty, ...).
- Cipher suites. Python's ``set_ciphers`` only configures TLS 1.2 and lower,
  and the ``ssl`` module has no call for TLS 1.3 suites
  (``SSL_CTX_set_ciphersuites``), so the contexts carry OpenSSL's default
  TLS 1.3 list, in this order: ``TLS_AES_256_GCM_SHA384``,
  ``TLS_CHACHA20_POLY1305_SHA256``, ``TLS_AES_128_GCM_SHA256``. AES-GCM is
  ensured in two steps instead of poking at OpenSSL internals through ctypes:
  the server context chooses by its own order (``OP_CIPHER_SERVER_PREFERENCE``),
  so our server picks AES-256-GCM whenever a client offers it, even one that
  prefers ChaCha20 (e.g. BoringSSL on a machine without AES-NI; checked with
  ``openssl s_client -ciphersuites`` ChaCha20 first), and our client offers
  AES-256-GCM first;
  then both verify functions reject a connection whose negotiated suite is not
  in :data:`AES_GCM_SUITES` (a peer that offers only ChaCha20 is refused, fail
  closed). An operator who wants another order (AES-128-GCM first, which is
  faster) can set ``Ciphersuites`` in the ``system_default`` section of an
  ``OPENSSL_CONF`` file, which OpenSSL applies to every context it creates.
- The server sends no session tickets (``num_tickets = 0``): nothing resumes
  HBONE sessions, and tickets would cost a write and memory per connection.

The same contexts work with ``SSLContext.wrap_socket`` (blocking or
non-blocking ``ssl.SSLSocket``, what the data path drives with
``trio.lowlevel.wait_readable``) and with ``SSLContext.wrap_bio``
(``ssl.SSLObject`` with MemoryBIOs, what ``trio.SSLStream`` uses). Never pass a
``server_hostname``: it would send SNI, which HBONE does not use.

After the handshake, :func:`verify_server_identity` (client side) and
:func:`verify_client_identity` (server side) check what OpenSSL cannot: the
peer's SPIFFE ID. They take any of ``ssl.SSLSocket``, ``ssl.SSLObject`` or
``trio.SSLStream`` (which forwards to its ``SSLObject``). :func:`tls_client_stream`,
:func:`tls_server_stream`, :func:`tls_client_socket` and
:func:`tls_server_socket` do handshake and check in one call.

Peer certificates must carry exactly one URI SAN, and it must be a workload
SPIFFE ID (``spiffe://<td>/ns/<ns>/sa/<sa>``): the X.509-SVID specification
says an SVID has exactly one URI SAN. A leaf with none, with two (even if one
of them is expected) or with a URI that is not a workload ID is rejected.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from identity import der
from identity.certs import WorkloadCertificate, identity_from_uris
from identity.errors import IdentityError, InvalidSpiffeId, PeerIdentityError
from identity.spiffe import SpiffeId

if TYPE_CHECKING:
    import socket

    import trio
    from cryptography import x509

ALPN_H2 = "h2"
TLS_VERSION = "TLSv1.3"
# The TLS 1.3 suites HBONE accepts once negotiated (see the module docstring).
AES_GCM_SUITES = frozenset({"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"})

_ALPN = [ALPN_H2]
_PROC_FD = "/proc/self/fd/"

T_Stream = TypeVar("T_Stream", bound="trio.abc.Stream")


class TlsContextError(IdentityError):
    """A TLS context cannot be built from the given certificate, key or trust bundle."""


class TlsConnection(Protocol):
    """What the verify functions need: ``ssl.SSLSocket``, ``ssl.SSLObject`` and the like."""

    def getpeercert(self) -> Any: ...  # the dict form; Any because SSLSocket/SSLObject differ

    def version(self) -> str | None: ...

    def cipher(self) -> tuple[str, str, int] | None: ...

    def selected_alpn_protocol(self) -> str | None: ...


# -- trust bundle -------------------------------------------------------------


class TrustBundle:
    """A set of trust anchors (root certificates), compared by content.

    Order and duplicates do not matter: two bundles with the same roots are
    equal and hash alike, which is what :class:`ContextCache` keys on. The PEM
    text and the fingerprint are computed once, here, not per connection.
    """

    __slots__ = ("_hash", "fingerprint", "pem", "roots_der")

    roots_der: tuple[bytes, ...]
    pem: str
    fingerprint: bytes

    def __init__(self, roots: Iterable[bytes | x509.Certificate]) -> None:
        unique = {_der_of(root) for root in roots}
        if not unique:
            raise TlsContextError(
                "the trust bundle has no root certificate; every peer would be rejected"
            )
        ders = sorted(unique)
        self.roots_der = tuple(ders)
        self.pem = "".join(der.to_pem(d).decode("ascii") for d in ders)
        digest = hashlib.sha256()
        for item in ders:
            digest.update(len(item).to_bytes(4, "big"))
            digest.update(item)
        self.fingerprint = digest.digest()
        self._hash = hash(self.fingerprint)

    @classmethod
    def from_pem(cls, data: bytes | str) -> TrustBundle:
        """Parse PEM roots, e.g. ``root-cert.pem`` from ``istio-ca-root-cert``."""
        try:
            roots = der.pem_blocks(data)
            for root in roots:
                der.parse_certificate(root)
        except der.DerError as exc:
            raise TlsContextError(f"the trust bundle is not PEM certificates: {exc}") from exc
        return cls(roots)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The roots as ``cryptography`` certificates (imported on first use)."""
        from cryptography import x509

        return tuple(x509.load_der_x509_certificate(d) for d in self.roots_der)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustBundle):
            return NotImplemented
        return self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return self._hash

    def __len__(self) -> int:
        return len(self.roots_der)

    def __repr__(self) -> str:
        return f"TrustBundle({len(self.roots_der)} roots, sha256={self.fingerprint.hex()[:16]}...)"


def _der_of(root: bytes | x509.Certificate) -> bytes:
    if isinstance(root, bytes):
        return root
    from cryptography.hazmat.primitives import serialization

    return root.public_bytes(serialization.Encoding.DER)


def _as_bundle(trust_bundle: TrustBundle | Iterable[bytes | x509.Certificate]) -> TrustBundle:
    if isinstance(trust_bundle, TrustBundle):
        return trust_bundle
    return TrustBundle(trust_bundle)


# -- context builders ---------------------------------------------------------


def server_context(
    cert: WorkloadCertificate, trust_bundle: TrustBundle | Iterable[bytes | x509.Certificate]
) -> ssl.SSLContext:
    """An HBONE server context that presents ``cert`` and requires a client certificate.

    The caller picks ``cert``: ztunnel passes the certificate of the workload
    that owns the destination IP the connection arrived on (no SNI). Use
    :class:`ContextCache` to avoid building one per connection.
    """
    ctx = _base_context(_as_bundle(trust_bundle), server=True)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0
    _load_identity(ctx, cert)
    return ctx


def client_context(
    cert: WorkloadCertificate, trust_bundle: TrustBundle | Iterable[bytes | x509.Certificate]
) -> ssl.SSLContext:
    """An HBONE client context that presents ``cert`` (the source workload's identity).

    It verifies the server's chain against ``trust_bundle``; the server's
    SPIFFE ID is checked afterwards with :func:`verify_server_identity`.
    """
    ctx = _base_context(_as_bundle(trust_bundle), server=False)
    _load_identity(ctx, cert)
    return ctx


def _base_context(bundle: TrustBundle, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # check_hostname must be switched off before verify_mode may be set freely.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN  # chains must end at a bundle root
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(_ALPN)
    try:
        ctx.load_verify_locations(cadata=bundle.pem)
    except ssl.SSLError as exc:
        raise TlsContextError(f"OpenSSL refused the trust bundle: {exc}") from exc
    return ctx


def _load_identity(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    try:
        presented = identity_from_uris(cert.facts.uri_sans)
    except (InvalidSpiffeId, IndexError) as exc:
        raise TlsContextError(
            f"the certificate for {cert.identity.uri} does not carry one SPIFFE ID: {exc}"
        ) from exc
    if presented != cert.identity:
        raise TlsContextError(
            f"the certificate for {cert.identity.uri} names {presented.uri}; refusing to "
            "present another workload's identity"
        )
    load_cert_chain_in_memory(ctx, cert.chain_pem(), cert.private_key_pem())


def load_cert_chain_in_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a PEM chain (leaf first) and its PEM private key into ``ctx`` without a file.

    ``SSLContext.load_cert_chain`` only accepts paths; the ``ssl`` module has
    no way to load a certificate or key from memory. Writing the key to
    even a short-lived 0600 temporary file would put it in a directory where
    backups, snapshots or another process could see it, and leave it behind if
    we crashed before unlinking. So chain and key go into an anonymous memory
    file (``memfd_create``: RAM only, never linked into any directory,
    close-on-exec so no child inherits it), OpenSSL reads it through the
    ``/proc/self/fd/N`` alias (opening that alias gives a fresh read offset, so
    OpenSSL can read it twice: once for the chain, once for the key), and the
    memory file is closed, and freed, as soon as OpenSSL has copied both into
    the ``SSL_CTX``. Without ``memfd_create`` this raises rather than fall
    back to a disk file.
    """
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        raise TlsContextError(
            "os.memfd_create is not available (Linux only); refusing to write a private key "
            "to a file"
        )
    try:
        fd = memfd_create("underpass-tls-identity", os.MFD_CLOEXEC)
    except OSError as exc:
        raise TlsContextError(f"cannot create an in-memory file for the key: {exc}") from exc
    try:
        for data in (chain_pem, key_pem):  # two writes: no extra copy of the key
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        path = f"{_PROC_FD}{fd}"
        try:
            ctx.load_cert_chain(path)
        except ssl.SSLError as exc:
            # OpenSSL's message (e.g. KEY_VALUES_MISMATCH) carries no key material.
            raise TlsContextError(f"OpenSSL refused the certificate chain or key: {exc}") from exc
        except OSError as exc:
            raise TlsContextError(
                f"cannot read the in-memory key file through {path} (is /proc mounted?): {exc}"
            ) from exc
    finally:
        os.close(fd)


# -- context cache ------------------------------------------------------------


class _Entry:
    __slots__ = ("bundle", "cert", "context", "fingerprint", "serial")

    def __init__(
        self, cert: WorkloadCertificate, bundle: TrustBundle, context: ssl.SSLContext
    ) -> None:
        self.cert = cert
        self.bundle = bundle
        self.serial = cert.serial
        self.fingerprint = bundle.fingerprint
        self.context = context


class ContextCache:
    """Built contexts, one per (side, identity), valid for one (serial, trust bundle).

    A lookup returns the cached context while the certificate's serial and the
    bundle's content are unchanged; a rotated certificate or bundle builds a
    new context that replaces the old one (connections already open keep the
    old context until they close). The common case, the very same certificate
    and bundle objects as last time, costs two identity comparisons.
    Call :meth:`discard` when the last workload of an identity leaves the node.

    Lookups never await, so trio tasks cannot interleave inside one; from
    several threads, two callers may at worst build the same context twice.
    """

    __slots__ = ("_client", "_server")

    def __init__(self) -> None:
        self._server: dict[SpiffeId, _Entry] = {}
        self._client: dict[SpiffeId, _Entry] = {}

    def server(self, cert: WorkloadCertificate, trust_bundle: TrustBundle) -> ssl.SSLContext:
        """The :func:`server_context` for ``cert`` and ``trust_bundle``."""
        return self._get(self._server, server_context, cert, trust_bundle)

    def client(self, cert: WorkloadCertificate, trust_bundle: TrustBundle) -> ssl.SSLContext:
        """The :func:`client_context` for ``cert`` and ``trust_bundle``."""
        return self._get(self._client, client_context, cert, trust_bundle)

    @staticmethod
    def _get(
        entries: dict[SpiffeId, _Entry],
        build: Any,
        cert: WorkloadCertificate,
        bundle: TrustBundle,
    ) -> ssl.SSLContext:
        entry = entries.get(cert.identity)
        if entry is not None:
            if entry.cert is cert and entry.bundle is bundle:
                return entry.context
            if entry.serial == cert.serial and entry.fingerprint == bundle.fingerprint:
                return entry.context
        context: ssl.SSLContext = build(cert, bundle)
        entries[cert.identity] = _Entry(cert, bundle, context)
        return context

    def discard(self, identity: SpiffeId) -> None:
        """Forget both contexts of ``identity`` (no workload holds it here any more)."""
        self._server.pop(identity, None)
        self._client.pop(identity, None)

    def clear(self) -> None:
        self._server.clear()
        self._client.clear()

    def __len__(self) -> int:
        return len(self._server) + len(self._client)


# -- peer checks --------------------------------------------------------------


def peer_identity(conn: TlsConnection, role: str = "peer") -> SpiffeId:
    """The SPIFFE ID of the verified peer certificate on a finished TLS 1.3 + h2 handshake.

    Checks, failing closed on any error: the handshake is done and its
    version is TLS 1.3, the suite is AES-GCM, ALPN chose ``h2``; the peer's
    certificate was verified by OpenSSL (``getpeercert()`` returns an empty
    dict when the context did not verify, so an empty dict is a rejection);
    it has exactly one URI SAN, a workload SPIFFE ID. ``role`` ("server" or
    "client") only words the error messages.
    """
    try:
        version = conn.version()
        suite = conn.cipher()
        alpn = conn.selected_alpn_protocol()
        cert = conn.getpeercert()
    except Exception as exc:  # not connected, handshake not done, ... : reject
        raise PeerIdentityError(
            f"cannot read the {role}'s certificate (is the TLS handshake done?): {exc}"
        ) from exc
    if version != TLS_VERSION:
        raise PeerIdentityError(f"the {role} negotiated {version}; only {TLS_VERSION} is allowed")
    if suite is None or suite[0] not in AES_GCM_SUITES:
        raise PeerIdentityError(
            f"the {role} negotiated cipher suite {suite[0] if suite else None}; only "
            f"{', '.join(sorted(AES_GCM_SUITES))} are allowed"
        )
    if alpn != ALPN_H2:
        raise PeerIdentityError(f"the {role} negotiated ALPN {alpn!r}; HBONE requires {ALPN_H2!r}")
    if not cert or not isinstance(cert, dict):
        raise PeerIdentityError(
            f"the {role} presented no verified certificate (the TLS context must require "
            "and verify peer certificates)"
        )
    try:
        uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    except (TypeError, ValueError) as exc:
        raise PeerIdentityError(f"the {role}'s certificate SANs cannot be read: {exc}") from exc
    if len(uris) != 1:
        # Peer-chosen text: quoted, and only the first few, so logs stay readable.
        listed = ", ".join(repr(u[:256]) for u in uris[:3]) + (", ..." if len(uris) > 3 else "")
        raise PeerIdentityError(
            f"the {role}'s certificate carries {len(uris)} URI SANs ({listed or 'none'}); a "
            "SPIFFE certificate must carry exactly one"
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise PeerIdentityError(
            f"the {role}'s certificate URI SAN is not a workload SPIFFE ID: {exc}"
        ) from exc


def verify_server_identity(conn: TlsConnection, expected: Collection[SpiffeId]) -> SpiffeId:
    """Client side: the server's SPIFFE ID, if it is one of ``expected``.

    ``expected`` holds the destination workload's identity, or the
    destination service's ``subject_alt_names``, or the waypoint's identity.
    The chain was already validated against the trust bundle by OpenSSL
    during the handshake; host names are never looked at. A ``frozenset``
    makes the membership test O(1).
    """
    peer = peer_identity(conn, "server")
    if not expected:
        raise PeerIdentityError(
            f"the server presented {peer.uri}, but no expected identity was given; "
            "refusing every server"
        )
    if peer not in expected:
        wanted = ", ".join(sorted(str(e) for e in expected))
        raise PeerIdentityError(
            f"the server presented {peer.uri}, but one of [{wanted}] was expected; check the "
            "destination's service account and the service's subject_alt_names"
        )
    return peer


def verify_client_identity(conn: TlsConnection, trust_domain: str) -> SpiffeId:
    """Server side: the client's SPIFFE ID, if it is in ``trust_domain``.

    The chain was already validated by OpenSSL; the bundle may hold roots of
    other trust domains, so the trust domain is checked here. The returned
    identity is what authorization policy matches on.
    """
    peer = peer_identity(conn, "client")
    if peer.trust_domain != trust_domain:
        raise PeerIdentityError(
            f"the client presented {peer.uri} from trust domain {peer.trust_domain!r}; "
            f"only {trust_domain!r} is accepted"
        )
    return peer


# -- handshake + check in one call ---------------------------------------------


async def tls_client_stream(
    transport: T_Stream, context: ssl.SSLContext, expected: Collection[SpiffeId]
) -> tuple[trio.SSLStream[T_Stream], SpiffeId]:
    """Handshake as the client over ``transport`` and check the server's identity.

    On any failure the TLS stream (and so ``transport``) is closed and the
    error propagates: :class:`PeerIdentityError` for the identity check,
    ``trio.BrokenResourceError`` (its ``__cause__`` is the ``ssl.SSLError``,
    e.g. ``SSLCertVerificationError``) for a failed handshake. Bound the
    handshake with the caller's cancel scope. In TLS 1.3 the client finishes
    before the server has checked the client certificate, so a server's
    refusal shows up on the first receive, not here.
    """
    import trio

    stream = trio.SSLStream(transport, context, server_side=False, server_hostname=None)
    try:
        await stream.do_handshake()
        peer = verify_server_identity(stream, expected)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, peer


async def tls_server_stream(
    transport: T_Stream, context: ssl.SSLContext, trust_domain: str
) -> tuple[trio.SSLStream[T_Stream], SpiffeId]:
    """Handshake as the server over ``transport`` and check the client's identity.

    Same failure behaviour as :func:`tls_client_stream`.
    """
    import trio

    stream = trio.SSLStream(transport, context, server_side=True)
    try:
        await stream.do_handshake()
        peer = verify_client_identity(stream, trust_domain)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, peer


async def tls_client_socket(
    sock: socket.socket, context: ssl.SSLContext, expected: Collection[SpiffeId]
) -> tuple[ssl.SSLSocket, SpiffeId]:
    """Handshake as the client on a connected stdlib socket, in trio, and check the server.

    The socket is switched to non-blocking and wrapped in an ``ssl.SSLSocket``
    (which takes over the file descriptor), the handshake is driven with
    ``trio.lowlevel.wait_readable`` / ``wait_writable``: the fast data path of
    PERFORMANCE-NOTES.md. On failure the socket is closed and the error
    (``ssl.SSLError`` or :class:`PeerIdentityError`) propagates.
    """
    tls = _wrap_nonblocking(sock, context, server_side=False)
    try:
        await _drive_handshake(tls)
        return tls, verify_server_identity(tls, expected)
    except BaseException:
        tls.close()
        raise


async def tls_server_socket(
    sock: socket.socket, context: ssl.SSLContext, trust_domain: str
) -> tuple[ssl.SSLSocket, SpiffeId]:
    """Server counterpart of :func:`tls_client_socket`."""
    tls = _wrap_nonblocking(sock, context, server_side=True)
    try:
        await _drive_handshake(tls)
        return tls, verify_client_identity(tls, trust_domain)
    except BaseException:
        tls.close()
        raise


def _wrap_nonblocking(
    sock: socket.socket, context: ssl.SSLContext, *, server_side: bool
) -> ssl.SSLSocket:
    try:
        sock.setblocking(False)
        return context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise


async def _drive_handshake(tls: ssl.SSLSocket) -> None:
    import trio

    while True:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(tls)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(tls)
        else:
            return


__all__ = [
    "AES_GCM_SUITES",
    "ALPN_H2",
    "ContextCache",
    "TlsConnection",
    "TlsContextError",
    "TrustBundle",
    "client_context",
    "load_cert_chain_in_memory",
    "peer_identity",
    "server_context",
    "tls_client_socket",
    "tls_client_stream",
    "tls_server_socket",
    "tls_server_stream",
    "verify_client_identity",
    "verify_server_identity",
]
