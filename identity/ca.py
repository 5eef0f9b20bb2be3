"""The certificate authority: roots, CSR checks and certificate signing.

Two ways to get a signing key:

- self-signed: an ECDSA P-256 root valid for 10 years, created on first start
  in a state directory (key written 0600 from creation, never chmod'ed later);
- plugged-in: ``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem`` and
  ``root-cert.pem`` read from a directory (the signing certificate may be an
  intermediate; ``root-cert.pem`` may hold several roots during rotation).

Workload certificates carry exactly one SAN, the SPIFFE URI (critical, since
the subject is empty), EKU serverAuth + clientAuth, digitalSignature and
CA:false, a random 127-bit serial, and a lifetime that never outlives the
signer. Nothing from the CSR is copied except its public key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.certs import DEFAULT_WORKLOAD_LIFETIME
from identity.errors import CaConfigError, InvalidCsr, InvalidRequest, InvalidSpiffeId
from identity.spiffe import SpiffeId, validate_trust_domain

Clock = Callable[[], dt.datetime]

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
_STRONG_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
MIN_RSA_BITS = 2048
ROOT_COMMON_NAME = "Underpass root CA"
_MAX_NAME_ATTRIBUTE = 64  # upper bound of CN and O in X.509 (RFC 5280 ub-common-name etc.)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def random_serial() -> int:
    """A positive 127-bit serial: the top bit set (fixed DER length), 126 random bits."""
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
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidCsr(f"the CSR's public key cannot be read: {exc}") from exc
    _check_key_strength(key)
    try:
        signature_ok = csr.is_signature_valid
        signature_hash = csr.signature_hash_algorithm
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidCsr(f"the CSR's signature cannot be checked: {exc}") from exc
    if not signature_ok:
        raise InvalidCsr("the CSR's signature does not verify against its own public key")
    if not isinstance(signature_hash, _STRONG_CSR_HASHES):
        name = signature_hash.name if signature_hash is not None else "none"
        raise InvalidCsr(f"the CSR is signed with hash {name}; use SHA-256, SHA-384 or SHA-512")
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

    ``intermediates`` are the certificates between the signing certificate and
    the root it chains to (in that order, whatever order they were given in);
    ``roots`` are the trust anchors (several during a root rotation), of which
    the chain must reach one.
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
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as exc:
            raise CaConfigError(f"the CA's trust domain is invalid: {exc}") from exc
        _check_key_matches(signing_cert, signing_key)
        self.trust_domain = trust_domain
        self.signing_cert = signing_cert
        self._signing_key = signing_key
        self.roots = list(roots)
        self._clock = clock
        self.intermediates, self._anchor = _build_path(signing_cert, intermediates, self.roots)
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
        roots = _read_certificates(directory / ROOT_CERT_FILE)
        chain = _read_certificates(directory / CERT_CHAIN_FILE)
        # cert-chain.pem conventionally starts with ca-cert.pem and may end with
        # the root; keep only the certificates strictly between the two (the
        # constructor puts them in path order).
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
        if not _is_self_signed(cert):
            raise CaConfigError(
                f"{directory / CA_CERT_FILE} is not a self-signed root (issuer "
                f"{cert.issuer.rfc4514_string()!r}); a plugged-in intermediate CA also needs "
                f"{CERT_CHAIN_FILE} and {ROOT_CERT_FILE} in {directory}"
            )
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
        leftover = directory / CA_CERT_FILE
        if leftover.exists() and not _is_own_root(_only_certificate(leftover)):
            # Only a certificate we wrote ourselves (a crash before the key was
            # written) may be replaced; anything else is an operator's file.
            raise CaConfigError(
                f"{leftover} exists but {directory / CA_KEY_FILE} does not; provide the key "
                "(and, for an intermediate, cert-chain.pem and root-cert.pem) or remove the "
                "certificate to let the CA create a self-signed root"
            )
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as exc:
            raise CaConfigError(f"the CA's trust domain is invalid: {exc}") from exc
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
        """No certificate we sign may outlive any certificate above it.

        Only the certificates on the signing path count: another root in the
        bundle (say, the old one during a rotation) may expire sooner without
        shortening what this CA issues.
        """
        return min(c.not_valid_after_utc for c in [*self._issuers(), self._anchor])

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
        names: list[x509.GeneralName] = []
        for dns_name in dns_names:
            if not dns_name or not dns_name.isascii() or any(c.isspace() for c in dns_name):
                raise InvalidRequest(
                    f"{dns_name!r} is not a DNS name (use ASCII A-labels, no spaces)"
                )
            names.append(x509.DNSName(dns_name))
        for address in ip_addresses:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(address)))
            except ValueError as exc:
                raise InvalidRequest(f"{address!r} is not an IP address") from exc
        not_before, not_after = self._validity(lifetime, cap=None)
        key = generate_workload_key()
        common_name = dns_names[0] if dns_names else ip_addresses[0]
        # The subject carries the first name when it fits in a CN; otherwise the
        # subject is empty and, as RFC 5280 requires then, the SAN is critical.
        subject = (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
            if len(common_name) <= _MAX_NAME_ATTRIBUTE
            else x509.Name([])
        )
        builder = (
            self._leaf_builder(key.public_key(), not_before, not_after)
            .subject_name(subject)
            .add_extension(x509.SubjectAlternativeName(names), critical=not subject)
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
        if now.tzinfo is None:
            raise ValueError("the CA clock must return timezone-aware datetimes")
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
            .add_extension(_authority_key_identifier(self.signing_cert), critical=False)
        )

    def _sign(self, builder: x509.CertificateBuilder) -> IssuedCertificate:
        cert = builder.sign(self._signing_key, hashes.SHA256())
        return IssuedCertificate(cert, [certificate_pem(cert), *self._chain_tail_pem])

    def _issuers(self) -> list[x509.Certificate]:
        """The signing certificate and intermediates, unless the signer is itself a root."""
        if self.signing_cert == self._anchor:
            return []
        return [self.signing_cert, *self.intermediates]


def create_root(
    trust_domain: str, now: dt.datetime, lifetime: dt.timedelta = ROOT_LIFETIME
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed ECDSA P-256 root for ``trust_domain``.

    The subject is ``O=<trust domain>, CN=Underpass root CA``; a trust domain
    too long for an X.509 O attribute (64 characters) is left out of it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, ROOT_COMMON_NAME)]
    if 0 < len(trust_domain) <= _MAX_NAME_ATTRIBUTE:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain))
    name = x509.Name(attributes)
    cert = ca_builder(
        name,
        name,
        key.public_key(),
        now - CLOCK_SKEW_BACKDATE,
        now + lifetime,
        issuer_public_key=key.public_key(),
    ).sign(key, hashes.SHA256())
    return key, cert


def ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None = None,
    *,
    issuer_public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
) -> x509.CertificateBuilder:
    """The common part of every CA certificate (root or intermediate).

    The authority key identifier is always added: OpenSSL's strict mode
    (``-x509_strict``, Python's ``VERIFY_X509_STRICT``) rejects a CA certificate
    below the root without one.
    """
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
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False
        )
    )


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode`` (never world-readable first)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask (still before any data)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in the PEM file ``path``; CaConfigError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        # The parser's message is not shown: it is generic, and the file may
        # hold a private key by mistake.
        raise CaConfigError(f"{path} does not hold PEM certificates") from None


def _only_certificate(path: Path) -> x509.Certificate:
    certs = _read_certificates(path)
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
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never include the key material in the message, nor chain the parser's
        # exception (it would travel with tracebacks).
        raise CaConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaConfigError(f"{path} holds a {type(key).__name__}; use an ECDSA or RSA key")
    return key


def _check_key_matches(cert: x509.Certificate, key: SigningKey) -> None:
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, pub) != key.public_key().public_bytes(enc, pub):
        raise CaConfigError("the CA key does not belong to the CA certificate")


def _build_path(
    signing_cert: x509.Certificate,
    pool: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> tuple[list[x509.Certificate], x509.Certificate]:
    """Find the path from ``signing_cert`` through ``pool`` to one of ``roots``.

    Returns the intermediates in path order (signer's issuer first) and the
    root reached. Certificates of ``pool`` that are not on the path are left
    out. Every certificate on the path must be a CA allowed to sign the path
    below it.
    """
    if signing_cert in roots:
        path: list[x509.Certificate] = []
        anchor = signing_cert
    else:
        path = [signing_cert]
        remaining = [c for c in pool if c != signing_cert and c not in roots]
        while True:
            current = path[-1]
            found = next((r for r in roots if _is_issued_by(current, r)), None)
            if found is not None:
                anchor = found
                break
            parent = next((c for c in remaining if _is_issued_by(current, c)), None)
            if parent is None:
                raise CaConfigError(
                    f"the CA chain does not reach a root in {ROOT_CERT_FILE}: "
                    f"{current.subject.rfc4514_string()!r} (issuer "
                    f"{current.issuer.rfc4514_string()!r}) is signed by none of the roots "
                    f"and by no certificate in {CERT_CHAIN_FILE}"
                )
            remaining.remove(parent)
            path.append(parent)
    for depth, cert in enumerate([*path, anchor]):
        _check_can_sign(cert, depth, is_anchor=cert is anchor)
    return path[1:], anchor


def _check_can_sign(cert: x509.Certificate, depth: int, *, is_anchor: bool) -> None:
    """``cert`` signs a path with ``depth`` CA certificates below it (the leaf not counted)."""
    what = f"CA certificate {cert.subject.rfc4514_string()!r}"
    try:
        constraints: x509.BasicConstraints | None = cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        if is_anchor and constraints is None:
            return  # a (v1) trust anchor without extensions is trusted as configured
        raise CaConfigError(f"{what} is not a CA (basicConstraints CA:TRUE is missing)")
    if constraints.path_length is not None and constraints.path_length < depth:
        raise CaConfigError(
            f"{what} has pathlen:{constraints.path_length}, but {depth} CA certificate(s) "
            "sit below it"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CaConfigError(f"{what} may not sign certificates (keyUsage lacks keyCertSign)")


def _is_issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        _verify_issued_by(child, parent)
    except CaConfigError:
        return False
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return _is_issued_by(cert, cert)


def _is_own_root(cert: x509.Certificate) -> bool:
    """Whether ``cert`` looks like a root :func:`create_root` made."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return _is_self_signed(cert) and [n.value for n in names] == [ROOT_COMMON_NAME]


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI for certificates ``issuer`` signs: its SKI if it has one.

    Recomputing the identifier from the public key would not match an issuer
    whose SKI was derived another way, and verifiers (OpenSSL) match issuers
    by it.
    """
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


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
