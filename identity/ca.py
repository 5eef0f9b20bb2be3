"""The certificate authority: roots, CSR checks and certificate signing.

Two ways to get a signing key:

- self-signed: an ECDSA P-256 root valid for 10 years, created on first start
  in a state directory (key written 0600 from creation, never chmod'ed later);
- plugged-in: ``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem`` and
  ``root-cert.pem`` read from a directory (the signing certificate may be an
  intermediate; ``root-cert.pem`` may hold several roots during rotation).

Workload certificates carry exactly one SAN, the SPIFFE URI (critical, since
the subject is empty), EKU serverAuth + clientAuth, digitalSignature and
CA:false, a random 128-bit serial, and a lifetime that never outlives the
signer. Nothing from the CSR is copied except its public key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import itertools
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.errors import CaConfigError, InvalidCsr, InvalidRequest, InvalidSpiffeId
from identity.spiffe import SpiffeId

Clock = Callable[[], dt.datetime]

DEFAULT_WORKLOAD_LIFETIME = dt.timedelta(hours=24)
MAX_WORKLOAD_LIFETIME = dt.timedelta(days=90)
ROOT_LIFETIME = dt.timedelta(days=3650)
CLOCK_SKEW_BACKDATE = dt.timedelta(minutes=2)
SERIAL_BITS = 128

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
ROOT_CERT_FILE = "root-cert.pem"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_STRONG_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def random_serial() -> int:
    """A positive serial with at least 64 (here 127+) random bits."""
    return secrets.randbits(SERIAL_BITS - 1) | (1 << (SERIAL_BITS - 2))


def generate_workload_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A PEM CSR as ztunnel sends it: empty subject, one URI SAN, ECDSA with SHA-256."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def pem_certificates(data: bytes | str) -> list[x509.Certificate]:
    raw = data.encode() if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise CaConfigError(f"not a PEM certificate list: {exc}") from exc


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    """Every URI SAN of ``cert`` (empty if it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass(frozen=True)
class ValidatedCsr:
    """A CSR whose signature, key and SAN have been checked."""

    csr: x509.CertificateSigningRequest
    identity: SpiffeId


def validate_csr(csr_pem: bytes | str) -> ValidatedCsr:
    """Parse and check a CSR: signature, key strength, exactly one SPIFFE URI SAN."""
    raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(raw)
    except ValueError as exc:
        raise InvalidCsr(f"the CSR is not a PEM certificate request: {exc}") from exc
    try:
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise InvalidCsr(f"the CSR's public key cannot be read: {exc}") from exc
    _check_key_strength(key)
    if not csr.is_signature_valid:
        raise InvalidCsr("the CSR's signature does not verify against its own public key")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidCsr("the CSR has no subjectAltName; it must carry one SPIFFE URI") from None
    except ValueError as exc:
        raise InvalidCsr(f"the CSR's extensions cannot be parsed: {exc}") from exc
    names = list(san)
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        kinds = ", ".join(type(n).__name__ for n in names) or "none"
        raise InvalidCsr(f"the CSR's subjectAltName must be exactly one SPIFFE URI, found: {kinds}")
    try:
        identity = SpiffeId.parse(names[0].value)
    except InvalidSpiffeId as exc:
        raise InvalidCsr(f"the CSR's URI SAN is not a workload SPIFFE ID: {exc}") from exc
    return ValidatedCsr(csr, identity)


def _check_key_strength(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _STRONG_CURVES):
            raise InvalidCsr(
                f"the CSR's key is on curve {key.curve.name}; use P-256, P-384 or P-521"
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidCsr(
                f"the CSR's RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required"
            )
    else:
        raise InvalidCsr(f"the CSR's key type {type(key).__name__} is not supported (ECDSA or RSA)")


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed certificate and the chain to answer with (leaf first, roots last)."""

    certificate: x509.Certificate
    chain_pem: list[str]

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


class CertificateAuthority:
    """Signs workload and serving certificates with one signing key.

    ``chain`` runs from the signing certificate up to (but excluding) the
    roots; ``roots`` are the trust anchors (several during a root rotation).
    """

    def __init__(
        self,
        *,
        trust_domain: str,
        signing_cert: x509.Certificate,
        signing_key: SigningKey,
        intermediates: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        clock: Clock = utcnow,
    ) -> None:
        if not roots:
            raise CaConfigError("the CA has no root certificate")
        _check_key_matches(signing_cert, signing_key)
        self.trust_domain = trust_domain
        self.signing_cert = signing_cert
        self._signing_key = signing_key
        self.intermediates = list(intermediates)
        self.roots = list(roots)
        self._clock = clock
        _check_chain(signing_cert, self.intermediates, self.roots)
        self._chain_tail_pem = [certificate_pem(c) for c in self._issuers()] + [
            "".join(certificate_pem(r) for r in self.roots)
        ]

    # -- loading -----------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, directory: Path, trust_domain: str, clock: Clock = utcnow
    ) -> CertificateAuthority:
        """Use plugged-in files in ``directory`` if present, else a self-signed root.

        The self-signed root is created on first start and reused afterwards.
        """
        directory = Path(directory)
        if (directory / CERT_CHAIN_FILE).exists() or (directory / ROOT_CERT_FILE).exists():
            return cls.from_plugged_files(directory, trust_domain, clock)
        if (directory / CA_KEY_FILE).exists():
            return cls._load_self_signed(directory, trust_domain, clock)
        return cls._create_self_signed(directory, trust_domain, clock)

    @classmethod
    def from_plugged_files(
        cls, directory: Path, trust_domain: str, clock: Clock = utcnow
    ) -> CertificateAuthority:
        """Load ``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem``, ``root-cert.pem``."""
        directory = Path(directory)
        missing = [
            name
            for name in (CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE)
            if not (directory / name).is_file()
        ]
        if missing:
            raise CaConfigError(
                f"plugged-in CA in {directory} is missing {', '.join(missing)}; "
                "provide all of ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem"
            )
        signing_cert = _only_certificate(directory / CA_CERT_FILE)
        key = _read_key(directory / CA_KEY_FILE)
        roots = pem_certificates((directory / ROOT_CERT_FILE).read_bytes())
        chain = pem_certificates((directory / CERT_CHAIN_FILE).read_bytes())
        # cert-chain.pem conventionally starts with ca-cert.pem and may end with
        # the root; keep only the certificates strictly between the two.
        intermediates = [c for c in chain if c != signing_cert and c not in roots]
        return cls(
            trust_domain=trust_domain,
            signing_cert=signing_cert,
            signing_key=key,
            intermediates=intermediates,
            roots=roots,
            clock=clock,
        )

    @classmethod
    def _load_self_signed(
        cls, directory: Path, trust_domain: str, clock: Clock
    ) -> CertificateAuthority:
        cert = _only_certificate(directory / CA_CERT_FILE)
        key = _read_key(directory / CA_KEY_FILE)
        return cls(
            trust_domain=trust_domain,
            signing_cert=cert,
            signing_key=key,
            intermediates=[],
            roots=[cert],
            clock=clock,
        )

    @classmethod
    def _create_self_signed(
        cls, directory: Path, trust_domain: str, clock: Clock
    ) -> CertificateAuthority:
        key, cert = create_root(trust_domain, clock())
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Certificate first: a key without its certificate would block the next start,
        # while a certificate without its key is simply replaced.
        _write_new_file(directory / CA_CERT_FILE, certificate_pem(cert).encode(), 0o644)
        _write_new_file(directory / CA_KEY_FILE, key_pem, 0o600)
        return cls(
            trust_domain=trust_domain,
            signing_cert=cert,
            signing_key=key,
            intermediates=[],
            roots=[cert],
            clock=clock,
        )

    # -- signing -----------------------------------------------------------

    @property
    def root_bundle_pem(self) -> str:
        return "".join(certificate_pem(r) for r in self.roots)

    @property
    def signer_not_after(self) -> dt.datetime:
        """No certificate we sign may outlive any certificate above it."""
        return min(c.not_valid_after_utc for c in [*self._issuers(), *self.roots])

    def sign_workload(
        self, csr: ValidatedCsr, lifetime: dt.timedelta | None = None
    ) -> IssuedCertificate:
        """Sign a checked CSR into a workload certificate for ``csr.identity``."""
        if csr.identity.trust_domain != self.trust_domain:
            raise InvalidCsr(
                f"the CSR asks for trust domain {csr.identity.trust_domain!r}; this CA signs "
                f"only {self.trust_domain!r}"
            )
        not_before, not_after = self._validity(lifetime)
        builder = (
            self._leaf_builder(csr.csr.public_key(), not_before, not_after)
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(csr.identity.uri)]),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        return self._sign(builder)

    def issue_serving_certificate(
        self,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str] = (),
        lifetime: dt.timedelta = dt.timedelta(days=365),
    ) -> tuple[ec.EllipticCurvePrivateKey, IssuedCertificate]:
        """A TLS server certificate (and its fresh key) for the CA's own endpoints."""
        if not dns_names and not ip_addresses:
            raise InvalidRequest("a serving certificate needs at least one DNS name or IP")
        key = generate_workload_key()
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        not_before, not_after = self._validity(lifetime, cap=None)
        common_name = dns_names[0] if dns_names else ip_addresses[0]
        builder = (
            self._leaf_builder(key.public_key(), not_before, not_after)
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        return key, self._sign(builder)

    def _validity(
        self, lifetime: dt.timedelta | None, cap: dt.timedelta | None = MAX_WORKLOAD_LIFETIME
    ) -> tuple[dt.datetime, dt.datetime]:
        if lifetime is None:
            lifetime = DEFAULT_WORKLOAD_LIFETIME
        if lifetime <= dt.timedelta(0):
            raise InvalidRequest(f"the requested lifetime {lifetime} is not positive")
        if cap is not None and lifetime > cap:
            raise InvalidRequest(
                f"the requested lifetime {lifetime} is longer than the maximum {cap}"
            )
        now = self._clock()
        not_after = min(now + lifetime, self.signer_not_after)
        if not_after <= now:
            raise CaConfigError(
                "the CA's signing certificate has expired; rotate the CA "
                f"(signer valid until {self.signer_not_after.isoformat()})"
            )
        return now - CLOCK_SKEW_BACKDATE, not_after

    def _leaf_builder(
        self, public_key: object, not_before: dt.datetime, not_after: dt.datetime
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(random_serial())
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
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.signing_cert.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        )

    def _sign(self, builder: x509.CertificateBuilder) -> IssuedCertificate:
        cert = builder.sign(self._signing_key, hashes.SHA256())
        return IssuedCertificate(cert, [certificate_pem(cert), *self._chain_tail_pem])

    def _issuers(self) -> list[x509.Certificate]:
        """The signing certificate and intermediates, unless the signer is itself a root."""
        if self.signing_cert in self.roots:
            return []
        return [self.signing_cert, *self.intermediates]


def create_root(
    trust_domain: str, now: dt.datetime, lifetime: dt.timedelta = ROOT_LIFETIME
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed ECDSA P-256 root for ``trust_domain``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "Underpass root CA"),
        ]
    )
    cert = (
        ca_builder(name, name, key.public_key(), now - CLOCK_SKEW_BACKDATE, now + lifetime)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None = None,
) -> x509.CertificateBuilder:
    """The common part of every CA certificate (root or intermediate)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode`` (never world-readable first)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _only_certificate(path: Path) -> x509.Certificate:
    try:
        certs = pem_certificates(path.read_bytes())
    except OSError as exc:
        raise CaConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(certs) != 1:
        raise CaConfigError(f"{path} must hold exactly one certificate, found {len(certs)}")
    return certs[0]


def _read_key(path: Path) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # Never include the key material in the message.
        raise CaConfigError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaConfigError(f"{path} holds a {type(key).__name__}; use an ECDSA or RSA key")
    return key


def _check_key_matches(cert: x509.Certificate, key: SigningKey) -> None:
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, pub) != key.public_key().public_bytes(enc, pub):
        raise CaConfigError("the CA key does not belong to the CA certificate")


def _check_chain(
    signing_cert: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: list[x509.Certificate],
) -> None:
    """Each certificate must be signed by the next, ending at one of the roots."""
    path = [signing_cert, *intermediates]
    for child, parent in itertools.pairwise(path):
        _verify_issued_by(child, parent)
    last = path[-1]
    if last in roots:
        return
    for root in roots:
        try:
            _verify_issued_by(last, root)
        except CaConfigError:
            continue
        return
    raise CaConfigError(
        f"the CA chain does not end at a root in {ROOT_CERT_FILE}: "
        f"{last.subject.rfc4514_string()!r} is signed by none of them"
    )


def _verify_issued_by(child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CaConfigError(
            f"{child.subject.rfc4514_string()!r} is not issued by "
            f"{parent.subject.rfc4514_string()!r}: {exc}"
        ) from exc


__all__ = [
    "DEFAULT_WORKLOAD_LIFETIME",
    "MAX_WORKLOAD_LIFETIME",
    "CertificateAuthority",
    "IssuedCertificate",
    "ValidatedCsr",
    "build_csr",
    "ca_builder",
    "create_root",
    "generate_workload_key",
    "spiffe_ids_of",
    "validate_csr",
]
