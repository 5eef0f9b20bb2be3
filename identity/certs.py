"""A workload's key and certificate, as held in memory by the data plane.

:class:`WorkloadCertificate` is what the certificate manager hands out and
what the TLS builders consume. The private key lives only in this process: it
is never written to disk and never part of ``repr`` or logs.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity.errors import CertificateUnavailable, InvalidSpiffeId
from identity.spiffe import SpiffeId


def load_pem_chain(chain_pem: Sequence[str]) -> list[list[x509.Certificate]]:
    """Parse a CA response: one PEM element per certificate (the last may hold several roots)."""
    out: list[list[x509.Certificate]] = []
    for i, element in enumerate(chain_pem):
        try:
            certs = x509.load_pem_x509_certificates(element.encode())
        except ValueError as exc:
            raise CertificateUnavailable(
                f"the CA's response element {i} is not PEM certificates: {exc}"
            ) from exc
        out.append(certs)
    return out


@dataclass(frozen=True)
class WorkloadCertificate:
    """One identity's private key, certificate chain and trust anchors."""

    identity: SpiffeId
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates; no roots
    roots: tuple[x509.Certificate, ...]

    @classmethod
    def from_ca_response(
        cls, identity: SpiffeId, private_key: ec.EllipticCurvePrivateKey, chain_pem: Sequence[str]
    ) -> WorkloadCertificate:
        """Build from a CA answer (leaf first, roots last), checking it is what we asked for.

        The leaf must carry exactly the requested SPIFFE ID and our public key,
        and each certificate must be signed by the next one up to a root of the
        answer; otherwise the answer is rejected, whatever the CA says.
        """
        if len(chain_pem) < 2:
            raise CertificateUnavailable(
                f"the CA answered {len(chain_pem)} certificate(s); expected a leaf and a root"
            )
        elements = load_pem_chain(chain_pem)
        if any(len(e) != 1 for e in elements[:-1]):
            raise CertificateUnavailable(
                "the CA's response has several certificates in one element"
            )
        leaf = elements[0][0]
        uris = _uri_sans(leaf)
        if uris != [identity.uri]:
            raise CertificateUnavailable(
                f"the CA returned a certificate for {uris}, but {identity.uri} was requested"
            )
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if leaf.public_key().public_bytes(der, spki) != private_key.public_key().public_bytes(
            der, spki
        ):
            raise CertificateUnavailable("the CA returned a certificate for a different key")
        _check_signed_path([e[0] for e in elements[:-1]], elements[-1])
        return cls(
            identity=identity,
            private_key=private_key,
            chain=tuple(e[0] for e in elements[:-1]),
            roots=tuple(elements[-1]),
        )

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def refresh_at(self) -> dt.datetime:
        """Half-life: ``not_before + lifetime / 2`` (jitter is the manager's business)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def is_valid_at(self, now: dt.datetime) -> bool:
        return self.not_before <= now < self.not_after

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def roots_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)

    def private_key_pem(self) -> bytes:
        """The key in PEM, for loading into OpenSSL in memory only. Never log or store it."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _check_signed_path(path: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> None:
    """Leaf -> intermediates -> one of ``roots``, each signed by the next."""
    for child, parent in itertools.pairwise(path):
        if not _issued_by(child, parent):
            raise CertificateUnavailable(
                f"the CA's chain is broken: {child.subject.rfc4514_string() or 'the leaf'!r} "
                f"is not signed by {parent.subject.rfc4514_string()!r}"
            )
    if not any(_issued_by(path[-1], root) for root in roots):
        raise CertificateUnavailable(
            "the CA's chain does not reach any root in its answer; refusing the certificate"
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def identity_of(cert: x509.Certificate) -> SpiffeId:
    """The single workload SPIFFE ID in ``cert``'s URI SANs, or :class:`InvalidSpiffeId`."""
    ids = []
    for uri in _uri_sans(cert):
        try:
            ids.append(SpiffeId.parse(uri))
        except InvalidSpiffeId:
            continue
    if len(ids) != 1:
        raise InvalidSpiffeId(
            f"expected one workload SPIFFE ID in the certificate, found {len(ids)}"
        )
    return ids[0]
