"""A workload's key and certificate, as held in memory by the data plane.

:class:`WorkloadCertificate` is what the certificate manager hands out and
what the TLS builders consume. The private key lives only in this process: it
is never written to disk and never part of ``repr`` or logs.

It holds bytes (the key as PEM, the certificates as DER) and the few facts
read from the leaf by :mod:`identity.der`, so that the data plane never loads
the ``cryptography`` package (see :mod:`identity.keys` for why). The
``private_key``, ``chain``, ``roots`` and ``leaf`` properties give
``cryptography`` objects for the tools and tests that want them, importing it
only then.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from identity import der, keys
from identity.errors import CertificateUnavailable, InvalidSpiffeId
from identity.spiffe import SpiffeId

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

#: Workload certificates' lifetime unless asked otherwise (PROTOCOLS.md section 4).
DEFAULT_WORKLOAD_LIFETIME = dt.timedelta(hours=24)


def load_pem_chain(chain_pem: Sequence[str]) -> list[list[bytes]]:
    """Parse a CA response into DER: one PEM element per certificate.

    The last element (the roots) may hold several.
    """
    out: list[list[bytes]] = []
    for i, element in enumerate(chain_pem):
        try:
            certs = der.pem_blocks(element)
            for cert in certs:
                der.parse_certificate(cert)
        except der.DerError as exc:
            raise CertificateUnavailable(
                f"the CA's response element {i} is not PEM certificates: {exc}"
            ) from exc
        # Every one, roots included, must also be a certificate to OpenSSL: a root
        # it cannot read would break the trust bundle of every identity on the node.
        if not all(keys.is_certificate(cert) for cert in certs):
            raise CertificateUnavailable(
                f"the CA's response element {i} holds a certificate OpenSSL cannot read"
            )
        out.append(certs)
    return out


def key_material(private_key: keys.WorkloadKey | ec.EllipticCurvePrivateKey) -> keys.WorkloadKey:
    """A :class:`~identity.keys.WorkloadKey` for either kind of key (a ``cryptography`` one
    comes from the CA's tools and tests)."""
    if isinstance(private_key, keys.WorkloadKey):
        return private_key
    from cryptography.hazmat.primitives import serialization

    return keys.WorkloadKey(
        pem=private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        public_key_info=private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


@dataclass(frozen=True)
class WorkloadCertificate:
    """One identity's private key, certificate chain and trust anchors."""

    identity: SpiffeId
    key: keys.WorkloadKey = field(repr=False)
    chain_der: tuple[bytes, ...] = field(repr=False)  # leaf first, then intermediates; no roots
    roots_der: tuple[bytes, ...] = field(repr=False)
    facts: der.CertificateFacts  # of the leaf

    @classmethod
    def from_ca_response(
        cls,
        identity: SpiffeId,
        private_key: keys.WorkloadKey | ec.EllipticCurvePrivateKey,
        chain_pem: Sequence[str],
    ) -> WorkloadCertificate:
        """Build from a CA answer (leaf first, roots last), checking it is what we asked for.

        The leaf must carry exactly the requested SPIFFE ID and our public key
        (byte for byte as we encoded it: a CA that re-encodes the key, e.g. as a
        compressed point, is refused), each certificate must name the next one
        as its issuer and carry its signature, up to a root of the answer, and
        every certificate (roots too) must be one OpenSSL reads; otherwise the
        answer is rejected, whatever the CA says.
        """
        if len(chain_pem) < 2:
            raise CertificateUnavailable(
                f"the CA answered {len(chain_pem)} certificate(s); expected a leaf and a root"
            )
        key = key_material(private_key)
        elements = load_pem_chain(chain_pem)
        if any(len(e) != 1 for e in elements[:-1]):
            raise CertificateUnavailable(
                "the CA's response has several certificates in one element"
            )
        path = [e[0] for e in elements[:-1]]
        facts = der.parse_certificate(path[0])
        if list(facts.uri_sans) != [identity.uri]:
            raise CertificateUnavailable(
                f"the CA returned a certificate for {list(facts.uri_sans)}, "
                f"but {identity.uri} was requested"
            )
        if facts.subject_public_key_info != key.public_key_info:
            raise CertificateUnavailable("the CA returned a certificate for a different key")
        _check_signed_path(path, elements[-1])
        return cls(
            identity=identity,
            key=key,
            chain_der=tuple(path),
            roots_der=tuple(elements[-1]),
            facts=facts,
        )

    @classmethod
    def from_parts(
        cls,
        identity: SpiffeId,
        private_key: keys.WorkloadKey | ec.EllipticCurvePrivateKey,
        chain: Sequence[x509.Certificate | bytes],
        roots: Sequence[x509.Certificate | bytes],
    ) -> WorkloadCertificate:
        """Assemble one without any check (tests and tools build odd ones on purpose)."""
        chain_der = tuple(_der_of(c) for c in chain)
        return cls(
            identity=identity,
            key=key_material(private_key),
            chain_der=chain_der,
            roots_der=tuple(_der_of(r) for r in roots),
            facts=der.parse_certificate(chain_der[0]),
        )

    @property
    def not_before(self) -> dt.datetime:
        return self.facts.not_before

    @property
    def not_after(self) -> dt.datetime:
        return self.facts.not_after

    @property
    def serial(self) -> int:
        return self.facts.serial

    @property
    def refresh_at(self) -> dt.datetime:
        """Half-life: ``not_before + lifetime / 2`` (jitter is the manager's business)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def is_valid_at(self, now: dt.datetime) -> bool:
        return self.not_before <= now < self.not_after

    def chain_pem(self) -> bytes:
        return b"".join(der.to_pem(c) for c in self.chain_der)

    def roots_pem(self) -> bytes:
        return b"".join(der.to_pem(c) for c in self.roots_der)

    def private_key_pem(self) -> bytes:
        """The key in PEM, for loading into OpenSSL in memory only. Never log or store it."""
        return self.key.pem

    # -- cryptography objects, for tools and tests (imported on first use) -----------------

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        loaded = serialization.load_pem_private_key(self.key.pem, password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):  # pragma: no cover
            raise TypeError("a workload key is an EC key")
        return loaded

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return tuple(_x509(d) for d in self.chain_der)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return tuple(_x509(d) for d in self.roots_der)

    @property
    def leaf(self) -> x509.Certificate:
        leaf: x509.Certificate = _x509(self.chain_der[0])
        return leaf


def _der_of(cert: x509.Certificate | bytes) -> bytes:
    if isinstance(cert, bytes):
        return cert
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


def _x509(data: bytes) -> Any:
    from cryptography import x509

    return x509.load_der_x509_certificate(data)


def _directly_issued_by(child: bytes, parent: bytes) -> bool:
    """``child`` names ``parent`` as its issuer and carries its signature."""
    if der.parse_certificate(child).issuer != der.parse_certificate(parent).subject:
        return False
    return keys.issued_by(child, parent)


def _check_signed_path(path: Sequence[bytes], roots: Sequence[bytes]) -> None:
    """Leaf -> intermediates -> one of ``roots``, each issued (name and signature) by the next."""
    for i, (child, parent) in enumerate(itertools.pairwise(path)):
        if not _directly_issued_by(child, parent):
            raise CertificateUnavailable(
                f"the CA's chain is broken: certificate {i} of the answer is not issued "
                f"by certificate {i + 1}"
            )
    if not any(_directly_issued_by(path[-1], root) for root in roots):
        raise CertificateUnavailable(
            "the CA's chain does not reach any root in its answer; refusing the certificate"
        )


def identity_from_uris(uris: Sequence[str]) -> SpiffeId:
    """The single workload SPIFFE ID among ``uris`` (URI SANs), or :class:`InvalidSpiffeId`."""
    ids = []
    for uri in uris:
        try:
            ids.append(SpiffeId.parse(uri))
        except InvalidSpiffeId:
            continue
    if len(ids) != 1:
        raise InvalidSpiffeId(
            f"expected one workload SPIFFE ID in the certificate, found {len(ids)}"
        )
    return ids[0]


def identity_of(cert: x509.Certificate | bytes) -> SpiffeId:
    """The single workload SPIFFE ID in a certificate's URI SANs (DER or ``cryptography``)."""
    if isinstance(cert, bytes):
        return identity_from_uris(der.parse_certificate(cert).uri_sans)
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return identity_from_uris([])
    return identity_from_uris(san.value.get_values_for_type(x509.UniformResourceIdentifier))
