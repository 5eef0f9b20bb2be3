"""Test PKIs: roots, intermediates and leaves with the validity, identity and keys you choose.

This module is deliberately independent of :mod:`identity.ca` (it builds
certificates with ``cryptography`` directly), so that tests of the CA and of
TLS code check the code under test against an independent reference rather
than against itself.

Typical use::

    pki = make_pki(depth=2)                      # root -> intermediate -> signing intermediate
    pki.write_plugged_ca(tmp_path)               # ca-cert.pem, ca-key.pem, cert-chain.pem, ...
    leaf = make_leaf(pki.signer, spiffe_id="spiffe://cluster.local/ns/a/sa/b")
    stranger = make_leaf(make_root("Other CA"), spiffe_id=...)   # from a different CA
    expired = make_leaf(pki.signer, not_before=T0 - 2 * DAY, not_after=T0 - DAY)

Every time defaults to :data:`T0`, a fixed instant, so tests that pass a
:class:`FakeClock` (also defaulting to ``T0``) to the code under test agree on
"now" without sleeping. Everything returned is in memory; only
:meth:`Pki.write_plugged_ca` and :func:`write_plugged_ca_files` write files,
into a directory the caller owns (use pytest's ``tmp_path``).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.spiffe import SpiffeId

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
#: The hashes ``cryptography`` signs CSRs with (it refuses SHA-1 and MD5).
CsrHash = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512

#: The fixed "now" of test PKIs: whole seconds, so X.509 times compare exactly.
T0 = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
YEAR = dt.timedelta(days=365)

#: The EKUs of a workload (mTLS) certificate.
WORKLOAD_EKUS: tuple[x509.ObjectIdentifier, ...] = (
    ExtendedKeyUsageOID.SERVER_AUTH,
    ExtendedKeyUsageOID.CLIENT_AUTH,
)


class FakeClock:
    """A clock to inject wherever code takes ``clock=``: call it for "now"; move it by hand."""

    def __init__(self, now: dt.datetime = T0) -> None:
        if now.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware datetime")
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> dt.datetime:
        """Move the clock by ``delta`` (may be negative) and return the new time."""
        self.now += delta
        return self.now


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA key, P-256 unless ``curve`` says otherwise (e.g. ``ec.SECP192R1()``)."""
    return ec.generate_private_key(curve if curve is not None else ec.SECP256R1())


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh RSA key of ``bits`` bits (cryptography refuses fewer than 1024)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def name(common_name: str | None = None, organization: str | None = None) -> x509.Name:
    """An X.509 name with an optional O and CN (both ``None`` gives the empty name)."""
    attributes = []
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def pem(*certs: x509.Certificate) -> bytes:
    """The certificates concatenated in PEM, in the given order."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_der(key: PrivateKey | PublicKey) -> bytes:
    """The SubjectPublicKeyInfo DER of ``key`` (private or public), to compare keys."""
    public = (
        key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else key
    )
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key (the key is kept out of ``repr``)."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)

    @property
    def subject(self) -> x509.Name:
        return self.cert.subject

    @property
    def cert_pem(self) -> bytes:
        return pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


def _validity(
    now: dt.datetime,
    lifetime: dt.timedelta,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else now - HOUR
    end = not_after if not_after is not None else now + lifetime
    return start, end


def _ca_certificate(
    subject: x509.Name,
    key: PrivateKey,
    issuer: CertKey | None,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None,
    ca: bool,
    key_cert_sign: bool,
    subject_key_identifier: bytes | None,
) -> CertKey:
    ski = (
        x509.SubjectKeyIdentifier(subject_key_identifier)
        if subject_key_identifier is not None
        else x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    )
    signer_key = issuer.key if issuer is not None else key
    aki = (
        _aki_for(issuer.cert)
        if issuer is not None
        else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .sign(signer_key, hashes.SHA256())
    )
    return CertKey(cert, key)


def _aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def make_root(
    common_name: str = "Test Root CA",
    *,
    key: PrivateKey | None = None,
    now: dt.datetime = T0,
    lifetime: dt.timedelta = 10 * YEAR,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    path_length: int | None = None,
    subject_key_identifier: bytes | None = None,
) -> CertKey:
    """A self-signed root CA (``CA:TRUE``, keyCertSign, SKI, AKI).

    Valid from an hour before ``now`` for ``lifetime`` unless ``not_before`` /
    ``not_after`` are given. ``subject_key_identifier`` overrides the SKI
    (default: RFC 5280 method 1, the SHA-1 of the public key).
    """
    key = key if key is not None else ec_key()
    start, end = _validity(now, lifetime, not_before, not_after)
    return _ca_certificate(
        name(common_name, "Underpass tests"),
        key,
        None,
        not_before=start,
        not_after=end,
        path_length=path_length,
        ca=True,
        key_cert_sign=True,
        subject_key_identifier=subject_key_identifier,
    )


def make_intermediate(
    issuer: CertKey,
    common_name: str = "Test Intermediate CA",
    *,
    key: PrivateKey | None = None,
    now: dt.datetime = T0,
    lifetime: dt.timedelta = 5 * YEAR,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    path_length: int | None = None,
    ca: bool = True,
    key_cert_sign: bool = True,
    subject_key_identifier: bytes | None = None,
) -> CertKey:
    """A CA certificate signed by ``issuer``.

    ``ca=False`` or ``key_cert_sign=False`` make a certificate that looks like
    an intermediate but may not sign (to test refusals); ``path_length`` sets
    basicConstraints pathlen; ``subject_key_identifier`` overrides the SKI.
    """
    key = key if key is not None else ec_key()
    start, end = _validity(now, lifetime, not_before, not_after)
    return _ca_certificate(
        name(common_name, "Underpass tests"),
        key,
        issuer,
        not_before=start,
        not_after=end,
        path_length=path_length,
        ca=ca,
        key_cert_sign=key_cert_sign,
        subject_key_identifier=subject_key_identifier,
    )


def make_leaf(
    issuer: CertKey,
    *,
    spiffe_id: SpiffeId | str | None = None,
    uris: Iterable[str] = (),
    dns_names: Iterable[str] = (),
    subject: x509.Name | None = None,
    key: PrivateKey | None = None,
    now: dt.datetime = T0,
    lifetime: dt.timedelta = DAY,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    ekus: Sequence[x509.ObjectIdentifier] = WORKLOAD_EKUS,
) -> CertKey:
    """An end-entity certificate signed by ``issuer``, shaped like a workload certificate.

    SANs are ``spiffe_id`` (if given), then ``uris``, then ``dns_names``;
    with the default empty subject the SAN extension is critical (RFC 5280).
    keyUsage digitalSignature, ``CA:FALSE``, ``ekus`` (an empty sequence
    leaves the extension out). Valid from an hour before ``now`` for
    ``lifetime`` unless ``not_before`` / ``not_after`` are given.
    """
    key = key if key is not None else ec_key()
    subject = subject if subject is not None else x509.Name([])
    start, end = _validity(now, lifetime, not_before, not_after)
    sans: list[x509.GeneralName] = []
    if spiffe_id is not None:
        sans.append(x509.UniformResourceIdentifier(str(spiffe_id)))
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns_names]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
        .add_extension(_aki_for(issuer.cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=len(subject) == 0
        )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    return CertKey(builder.sign(issuer.key, hashes.SHA256()), key)


def make_csr(
    key: PrivateKey,
    *,
    spiffe_id: SpiffeId | str | None = None,
    uris: Iterable[str] = (),
    dns_names: Iterable[str] = (),
    subject: x509.Name | None = None,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
    hash_algorithm: CsrHash | None = None,
    san_critical: bool = True,
) -> bytes:
    """A PEM CSR signed by ``key``, with whatever it should (or should not) ask for.

    SANs are ``spiffe_id``, then ``uris``, then ``dns_names``; no SAN extension
    at all when all are empty. ``extensions`` are extra ``(extension,
    critical)`` pairs; ``subject`` defaults to the empty name;
    ``hash_algorithm`` defaults to SHA-256.
    """
    sans: list[x509.GeneralName] = []
    if spiffe_id is not None:
        sans.append(x509.UniformResourceIdentifier(str(spiffe_id)))
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns_names]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject if subject is not None else x509.Name([])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=san_critical)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    csr = builder.sign(key, hash_algorithm if hash_algorithm is not None else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def write_plugged_ca_files(
    directory: Path,
    signer: CertKey,
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> Path:
    """Write an Istio-style plugged-in CA into ``directory`` (created if needed).

    ``ca-cert.pem`` = ``signer.cert``, ``ca-key.pem`` = ``signer.key`` (mode
    0600), ``cert-chain.pem`` = ``chain`` exactly as given (conventionally the
    signer, its intermediates, then the root), ``root-cert.pem`` = ``roots``.
    Returns ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(signer.cert_pem)
    key_file = directory / "ca-key.pem"
    key_file.touch(mode=0o600)
    key_file.write_bytes(signer.key_pem)
    (directory / "cert-chain.pem").write_bytes(pem(*chain))
    (directory / "root-cert.pem").write_bytes(pem(*roots))
    return directory


@dataclass(frozen=True)
class Pki:
    """A root and a line of intermediates below it, root side first.

    ``intermediates[-1]`` (or the root, when there are none) is the signer
    that issues leaves.
    """

    root: CertKey
    intermediates: tuple[CertKey, ...] = ()

    @property
    def signer(self) -> CertKey:
        return self.intermediates[-1] if self.intermediates else self.root

    @property
    def chain(self) -> list[x509.Certificate]:
        """Signer first, up to but excluding the root: what a server sends after its leaf."""
        return [ck.cert for ck in reversed(self.intermediates)]

    def write_plugged_ca(
        self,
        directory: Path,
        *,
        include_root_in_chain: bool = True,
        extra_roots: Sequence[x509.Certificate] = (),
    ) -> Path:
        """Write this PKI as a plugged-in CA (signer = ``self.signer``) into ``directory``.

        ``cert-chain.pem`` is signer, intermediates, and the root unless
        ``include_root_in_chain`` is false; ``root-cert.pem`` is the root
        followed by ``extra_roots`` (e.g. the other root during a rotation).
        """
        chain = self.chain if self.intermediates else [self.root.cert]
        if include_root_in_chain and self.intermediates:
            chain = [*chain, self.root.cert]
        return write_plugged_ca_files(directory, self.signer, chain, [self.root.cert, *extra_roots])


def make_pki(
    depth: int = 2,
    *,
    now: dt.datetime = T0,
    root_lifetime: dt.timedelta = 10 * YEAR,
    intermediate_lifetime: dt.timedelta = 5 * YEAR,
    root_name: str = "Test Root CA",
) -> Pki:
    """A root and ``depth`` intermediates, each signing the next (P-256 throughout).

    ``depth=2`` is the plugged-in CA shape root -> intermediate -> signing
    intermediate. Intermediates are named ``"<root_name> intermediate <i>"``.
    """
    root = make_root(root_name, now=now, lifetime=root_lifetime)
    intermediates: list[CertKey] = []
    issuer = root
    for i in range(1, depth + 1):
        issuer = make_intermediate(
            issuer, f"{root_name} intermediate {i}", now=now, lifetime=intermediate_lifetime
        )
        intermediates.append(issuer)
    return Pki(root, tuple(intermediates))


def random_ski() -> bytes:
    """A 20-byte subject key identifier not derived from any key (like some external CAs use)."""
    return secrets.token_bytes(20)


__all__ = [
    "DAY",
    "HOUR",
    "T0",
    "WORKLOAD_EKUS",
    "YEAR",
    "CertKey",
    "CsrHash",
    "FakeClock",
    "Pki",
    "PrivateKey",
    "PublicKey",
    "ec_key",
    "key_pem",
    "make_csr",
    "make_intermediate",
    "make_leaf",
    "make_pki",
    "make_root",
    "name",
    "pem",
    "public_key_der",
    "random_ski",
    "rsa_key",
    "write_plugged_ca_files",
]
