"""The certificate authority: roots, plugged-in CAs, CSR checks and the workload profile.

Certificates are checked field by field and, as a whole, by ``cryptography``'s
RFC 5280 path validator, against PKIs built independently of the CA by
:mod:`tests.identity.pki`. Time comes from a :class:`FakeClock`; nothing sleeps.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from identity.ca import (
    DEFAULT_WORKLOAD_LIFETIME,
    MAX_WORKLOAD_LIFETIME,
    CertificateAuthority,
    IssuedCertificate,
    ValidatedCsr,
    build_csr,
    create_root,
    generate_workload_key,
    validate_csr,
)
from identity.certs import WorkloadCertificate, identity_of
from identity.errors import CaConfigError, GrpcCode, InvalidCsr, InvalidRequest
from identity.spiffe import SpiffeId
from tests.identity.pki import (
    DAY,
    HOUR,
    T0,
    YEAR,
    CertKey,
    FakeClock,
    Pki,
    PrivateKey,
    ec_key,
    make_csr,
    make_intermediate,
    make_pki,
    make_root,
    name,
    pem,
    public_key_der,
    random_ski,
    rsa_key,
    write_plugged_ca_files,
)

pytestmark = pytest.mark.unit

TD = "cluster.local"
ALICE = SpiffeId(TD, "shop", "alice")
MALLORY_SAME_LENGTH = SpiffeId(TD, "shop", "mallo")

# The extensions of a workload certificate, and nothing else.
WORKLOAD_EXTENSIONS = {
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
}


# -- helpers ----------------------------------------------------------------------


def csr_for(identity: SpiffeId, key: PrivateKey | None = None) -> ValidatedCsr:
    return validate_csr(build_csr(key or generate_workload_key(), identity))  # type: ignore[arg-type]


def csr_der_to_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def chain_of(issued: IssuedCertificate) -> list[list[x509.Certificate]]:
    """The response, element by element (each element parsed as a PEM list)."""
    return [x509.load_pem_x509_certificates(e.encode()) for e in issued.chain_pem]


def validate_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: dt.datetime,
) -> list[x509.Certificate]:
    """RFC 5280 path validation of a client (workload) certificate; returns the path."""
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(at)
        .build_client_verifier()
    )
    return verifier.verify(leaf, list(intermediates)).chain


def extension_value(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def ski_of(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def key_material_lines(keys: Sequence[PrivateKey]) -> list[str]:
    """Every base64 line of every key's PEM, in both PKCS#8 and the traditional format."""
    lines: list[str] = []
    for key in keys:
        for fmt in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        ):
            text = key.private_bytes(
                serialization.Encoding.PEM, fmt, serialization.NoEncryption()
            ).decode()
            lines += [line for line in text.splitlines() if line and not line.startswith("-----")]
    return lines


def assert_no_key_material(exc: BaseException, keys: Sequence[PrivateKey]) -> None:
    """Neither ``exc`` nor any exception chained to it shows any part of the keys."""
    lines = key_material_lines(keys)
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen) + repr(seen.args)
        assert "PRIVATE KEY" not in text
        for line in lines:
            assert line not in text
            assert line[:20] not in text
        seen = seen.__cause__ or seen.__context__


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def self_signed(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", TD, clock=clock)


@pytest.fixture
def pki() -> Pki:
    return make_pki(depth=2)


@pytest.fixture
def plugged(tmp_path: Path, pki: Pki, clock: FakeClock) -> CertificateAuthority:
    directory = pki.write_plugged_ca(tmp_path / "plugged")
    return CertificateAuthority.load_or_create(directory, TD, clock=clock)


@pytest.fixture(params=["self-signed", "plugged"])
def any_ca(
    request: pytest.FixtureRequest,
    self_signed: CertificateAuthority,
    plugged: CertificateAuthority,
) -> CertificateAuthority:
    return self_signed if request.param == "self-signed" else plugged


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- self-signed root -------------------------------------------------------------


def test_first_start_creates_a_p256_root_valid_ten_years(tmp_path: Path, clock: FakeClock) -> None:
    directory = tmp_path / "state" / "ca"
    ca = CertificateAuthority.load_or_create(directory, TD, clock=clock)
    [root] = ca.roots
    assert ca.signing_cert == root
    assert ca.intermediates == []
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert root.not_valid_before_utc <= T0
    assert 3650 * DAY <= root.not_valid_after_utc - T0 <= 3653 * DAY
    constraints = extension_value(root, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert extension_value(root, x509.KeyUsage).value.key_cert_sign
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    assert ca.root_bundle_pem == pem(root).decode()
    assert (directory / "ca-cert.pem").read_bytes() == pem(root)


def test_root_key_is_stored_0600_whatever_the_umask(
    tmp_path: Path, clock: FakeClock, umask_zero: None
) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.load_or_create(directory, TD, clock=clock)
    assert stat.S_IMODE((directory / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    cert_mode = stat.S_IMODE((directory / "ca-cert.pem").stat().st_mode)
    assert cert_mode & 0o022 == 0  # nobody else may rewrite the root
    assert sorted(p.name for p in directory.iterdir()) == ["ca-cert.pem", "ca-key.pem"]


def test_second_start_reuses_the_root_and_its_key(tmp_path: Path, clock: FakeClock) -> None:
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(directory, TD, clock=clock)
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
    clock.advance(YEAR)
    second = CertificateAuthority.load_or_create(directory, TD, clock=clock)
    assert second.roots == first.roots
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()} == files
    # Same key: what the second instance signs verifies under the first one's root.
    issued = second.sign_workload(csr_for(ALICE))
    issued.certificate.verify_directly_issued_by(first.roots[0])
    validate_path(issued.certificate, [], first.roots, clock())


def test_root_certificate_left_without_its_key_by_a_crash_is_replaced(
    tmp_path: Path, clock: FakeClock
) -> None:
    directory = tmp_path / "ca"
    _, stale_root = create_root(TD, T0)
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(pem(stale_root))
    ca = CertificateAuthority.load_or_create(directory, TD, clock=clock)
    assert ca.roots != [stale_root]
    assert (directory / "ca-key.pem").exists()


def test_operator_certificate_without_key_is_neither_replaced_nor_used(
    tmp_path: Path, clock: FakeClock, pki: Pki
) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(pki.root.cert_pem)
    with pytest.raises(CaConfigError, match=r"ca-key\.pem"):
        CertificateAuthority.load_or_create(directory, TD, clock=clock)
    assert (directory / "ca-cert.pem").read_bytes() == pki.root.cert_pem
    assert not (directory / "ca-key.pem").exists()


def test_intermediate_without_chain_files_is_not_taken_for_a_root(
    tmp_path: Path, clock: FakeClock, pki: Pki
) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(pki.signer.cert_pem)
    (directory / "ca-key.pem").write_bytes(pki.signer.key_pem)
    with pytest.raises(CaConfigError, match=r"not a self-signed root.*cert-chain\.pem"):
        CertificateAuthority.load_or_create(directory, TD, clock=clock)


def test_invalid_trust_domain_is_a_config_error_and_writes_nothing(
    tmp_path: Path, clock: FakeClock
) -> None:
    with pytest.raises(CaConfigError, match="trust domain"):
        CertificateAuthority.load_or_create(tmp_path / "ca", "Cluster.Local", clock=clock)
    assert not (tmp_path / "ca").exists()


def test_trust_domain_too_long_for_an_x509_name_still_gets_a_root(
    tmp_path: Path, clock: FakeClock
) -> None:
    long_td = "a" * 70 + ".example"
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", long_td, clock=clock)
    ident = SpiffeId(long_td, "ns", "sa")
    assert identity_of(ca.sign_workload(csr_for(ident)).certificate) == ident


# -- plugged-in CA ----------------------------------------------------------------


def test_plugged_ca_chain_is_leaf_intermediates_root_last(
    plugged: CertificateAuthority, pki: Pki, clock: FakeClock
) -> None:
    root, intermediate, signer = pki.root.cert, pki.intermediates[0].cert, pki.signer.cert
    assert plugged.signing_cert == signer
    assert plugged.intermediates == [intermediate]
    assert plugged.roots == [root]
    issued = plugged.sign_workload(csr_for(ALICE))
    assert chain_of(issued) == [[issued.certificate], [signer], [intermediate], [root]]
    assert issued.certificate.issuer == signer.subject
    path = validate_path(issued.certificate, [signer, intermediate], [root], clock())
    assert path == [issued.certificate, signer, intermediate, root]
    # What the data plane does with the answer.
    key = generate_workload_key()
    answer = plugged.sign_workload(validate_csr(build_csr(key, ALICE)))
    held = WorkloadCertificate.from_ca_response(ALICE, key, answer.chain_pem)
    assert held.chain == (answer.certificate, signer, intermediate)
    assert held.roots == (root,)


@pytest.mark.parametrize(
    "layout",
    ["signer-intermediate-root", "no-root", "reversed", "intermediate-only", "root-first"],
)
def test_plugged_cert_chain_may_come_in_any_usual_layout(
    tmp_path: Path, pki: Pki, clock: FakeClock, layout: str
) -> None:
    signer, intermediate, root = pki.signer.cert, pki.intermediates[0].cert, pki.root.cert
    chain = {
        "signer-intermediate-root": [signer, intermediate, root],
        "no-root": [signer, intermediate],
        "reversed": [root, intermediate, signer],
        "intermediate-only": [intermediate],
        "root-first": [root, signer, intermediate],
    }[layout]
    directory = write_plugged_ca_files(tmp_path / "ca", pki.signer, chain, [root])
    ca = CertificateAuthority.from_plugged_files(directory, TD, clock=clock)
    issued = ca.sign_workload(csr_for(ALICE))
    assert chain_of(issued)[1:] == [[signer], [intermediate], [root]]


def test_plugged_signer_may_be_the_root_itself(tmp_path: Path, clock: FakeClock) -> None:
    root = make_root()
    directory = write_plugged_ca_files(tmp_path / "ca", root, [root.cert], [root.cert])
    ca = CertificateAuthority.load_or_create(directory, TD, clock=clock)
    issued = ca.sign_workload(csr_for(ALICE))
    assert chain_of(issued) == [[issued.certificate], [root.cert]]


@pytest.mark.parametrize("new_root_first", [True, False])
def test_rotation_several_roots_are_all_sent_and_the_old_one_does_not_cap_lifetimes(
    tmp_path: Path, clock: FakeClock, new_root_first: bool
) -> None:
    old = make_root("Old Root", not_after=T0 + HOUR)
    new = make_pki(depth=2, root_name="New Root")
    roots = [new.root.cert, old.cert] if new_root_first else [old.cert, new.root.cert]
    directory = write_plugged_ca_files(
        tmp_path / "ca", new.signer, [*new.chain, new.root.cert], roots
    )
    ca = CertificateAuthority.load_or_create(directory, TD, clock=clock)
    assert ca.roots == roots
    assert x509.load_pem_x509_certificates(ca.root_bundle_pem.encode()) == roots
    issued = ca.sign_workload(csr_for(ALICE))
    assert chain_of(issued)[-1] == roots  # every root, in one last element
    assert issued.not_after == T0 + DEFAULT_WORKLOAD_LIFETIME
    validate_path(issued.certificate, new.chain, roots, clock())
    # Once the old root has expired, the CA still signs, for the full lifetime.
    clock.advance(2 * HOUR)
    later = ca.sign_workload(csr_for(ALICE))
    assert later.not_after == clock() + DEFAULT_WORKLOAD_LIFETIME


def test_leaf_names_its_issuer_by_the_issuers_own_key_identifier(
    tmp_path: Path, clock: FakeClock
) -> None:
    # Some external CAs derive their SKI differently from RFC 5280 method 1;
    # verifiers match issuers by AKI = issuer's SKI, so the CA must copy it.
    root = make_root()
    signer = make_intermediate(root, subject_key_identifier=random_ski())
    directory = write_plugged_ca_files(tmp_path / "ca", signer, [signer.cert], [root.cert])
    ca = CertificateAuthority.load_or_create(directory, TD, clock=clock)
    for issued in (
        ca.sign_workload(csr_for(ALICE)),
        ca.issue_serving_certificate(["ca.underpass"])[1],
    ):
        aki = extension_value(issued.certificate, x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ski_of(signer.cert)


# -- inconsistent plugged-in files --------------------------------------------------


def all_keys(pki: Pki) -> list[PrivateKey]:
    return [pki.root.key, *(ck.key for ck in pki.intermediates)]


@pytest.mark.parametrize(
    "missing", ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]
)
def test_missing_plugged_file_is_named(
    tmp_path: Path, pki: Pki, clock: FakeClock, missing: str
) -> None:
    directory = pki.write_plugged_ca(tmp_path / "ca")
    (directory / missing).unlink()
    with pytest.raises(CaConfigError) as info:
        CertificateAuthority.from_plugged_files(directory, TD, clock=clock)
    assert missing in str(info.value)
    assert str(directory) in str(info.value)
    assert_no_key_material(info.value, all_keys(pki))


def test_plugged_mode_is_chosen_even_when_the_key_is_missing(
    tmp_path: Path, pki: Pki, clock: FakeClock
) -> None:
    # root-cert.pem says "plugged-in": a missing key must not fall back to a new root.
    directory = pki.write_plugged_ca(tmp_path / "ca")
    (directory / "ca-key.pem").unlink()
    with pytest.raises(CaConfigError, match=r"missing ca-key\.pem"):
        CertificateAuthority.load_or_create(directory, TD, clock=clock)
    assert not (directory / "ca-key.pem").exists()


def break_key_mismatch(directory: Path, pki: Pki) -> None:
    (directory / "ca-key.pem").write_bytes(pki.intermediates[0].key_pem)


def break_foreign_root(directory: Path, pki: Pki) -> None:
    (directory / "root-cert.pem").write_bytes(make_root("Stranger").cert_pem)


def break_missing_intermediate(directory: Path, pki: Pki) -> None:
    (directory / "cert-chain.pem").write_bytes(pem(pki.signer.cert, pki.root.cert))


def break_garbage_chain(directory: Path, pki: Pki) -> None:
    (directory / "cert-chain.pem").write_bytes(b"not a certificate\n")


def break_key_in_root_file(directory: Path, pki: Pki) -> None:
    (directory / "root-cert.pem").write_bytes(pki.root.key_pem)


def break_cert_in_key_file(directory: Path, pki: Pki) -> None:
    (directory / "ca-key.pem").write_bytes(pki.signer.cert_pem)


def break_encrypted_key(directory: Path, pki: Pki) -> None:
    encrypted = pki.signer.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (directory / "ca-key.pem").write_bytes(encrypted)


def break_two_signing_certs(directory: Path, pki: Pki) -> None:
    (directory / "ca-cert.pem").write_bytes(pem(pki.signer.cert, pki.intermediates[0].cert))


def break_key_and_cert_swapped(directory: Path, pki: Pki) -> None:
    (directory / "ca-cert.pem").write_bytes(pki.signer.key_pem)
    (directory / "ca-key.pem").write_bytes(pki.signer.cert_pem)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (break_key_mismatch, "key does not belong to the CA certificate"),
        (break_foreign_root, "does not reach a root in root-cert.pem"),
        (break_missing_intermediate, "does not reach a root in root-cert.pem"),
        (break_garbage_chain, "cert-chain.pem does not hold PEM certificates"),
        (break_key_in_root_file, "root-cert.pem does not hold PEM certificates"),
        (break_cert_in_key_file, "ca-key.pem is not an unencrypted PEM private key"),
        (break_encrypted_key, "ca-key.pem is not an unencrypted PEM private key"),
        (break_two_signing_certs, "ca-cert.pem must hold exactly one certificate"),
        (break_key_and_cert_swapped, "ca-cert.pem does not hold PEM certificates"),
    ],
)
def test_inconsistent_plugged_files_give_a_clear_error_without_key_material(
    tmp_path: Path, pki: Pki, clock: FakeClock, breakage: object, message: str
) -> None:
    directory = pki.write_plugged_ca(tmp_path / "ca")
    breakage(directory, pki)  # type: ignore[operator]
    with pytest.raises(CaConfigError) as info:
        CertificateAuthority.load_or_create(directory, TD, clock=clock)
    assert message in str(info.value)
    assert_no_key_material(info.value, all_keys(pki))


@pytest.mark.parametrize(
    ("make_signer", "message"),
    [
        (lambda root: make_intermediate(root, ca=False), "is not a CA"),
        (lambda root: make_intermediate(root, key_cert_sign=False), "keyCertSign"),
    ],
)
def test_signer_that_may_not_sign_certificates_is_refused(
    tmp_path: Path, clock: FakeClock, make_signer: object, message: str
) -> None:
    root = make_root()
    signer: CertKey = make_signer(root)  # type: ignore[operator]
    directory = write_plugged_ca_files(tmp_path / "ca", signer, [signer.cert], [root.cert])
    with pytest.raises(CaConfigError, match=message):
        CertificateAuthority.load_or_create(directory, TD, clock=clock)


def test_path_length_constraint_above_the_signer_is_enforced(
    tmp_path: Path, clock: FakeClock
) -> None:
    root = make_root()
    intermediate = make_intermediate(root, "Intermediate", path_length=0)
    signer = make_intermediate(intermediate, "Signer")
    directory = write_plugged_ca_files(
        tmp_path / "ca", signer, [signer.cert, intermediate.cert], [root.cert]
    )
    with pytest.raises(CaConfigError, match="pathlen:0"):
        CertificateAuthority.load_or_create(directory, TD, clock=clock)


def test_constructor_needs_a_root(pki: Pki) -> None:
    with pytest.raises(CaConfigError, match="no root"):
        CertificateAuthority(
            trust_domain=TD,
            signing_cert=pki.signer.cert,
            signing_key=pki.signer.key,
            intermediates=[],
            roots=[],
        )


# -- the workload certificate profile -----------------------------------------------


def test_workload_certificate_profile(any_ca: CertificateAuthority, clock: FakeClock) -> None:
    key = generate_workload_key()
    issued = any_ca.sign_workload(validate_csr(build_csr(key, ALICE)))
    cert = issued.certificate
    assert cert.version is x509.Version.v3
    assert cert.subject == x509.Name([])
    assert cert.issuer == any_ca.signing_cert.subject
    assert {e.oid for e in cert.extensions} == WORKLOAD_EXTENSIONS

    san = extension_value(cert, x509.SubjectAlternativeName)
    assert san.critical  # required when the subject is empty
    assert list(san.value) == [x509.UniformResourceIdentifier(ALICE.uri)]

    eku = extension_value(cert, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    usage = extension_value(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not any(
        getattr(usage.value, flag)
        for flag in (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        )
    )
    constraints = extension_value(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    aki = extension_value(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski_of(any_ca.signing_cert)

    assert public_key_der(cert.public_key()) == public_key_der(key)  # type: ignore[arg-type]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(any_ca.signing_cert)
    chain = [c for [c] in chain_of(issued)[1:-1]]
    validate_path(cert, chain, any_ca.roots, clock())
    assert identity_of(cert) == ALICE


def test_serials_are_random_and_at_least_64_bits(any_ca: CertificateAuthority) -> None:
    csr = csr_for(ALICE)
    serials = [any_ca.sign_workload(csr).serial for _ in range(200)]
    assert len(set(serials)) == len(serials)
    for serial in serials:
        assert 2**63 <= serial < 2**159  # >= 64 bits, positive, at most 20 octets
    # Random rather than counted: each of the low 64 bits varies across issuances.
    for bit in range(64):
        assert len({(s >> bit) & 1 for s in serials}) == 2, f"bit {bit} never changes"


def test_default_lifetime_is_24_hours_with_not_before_backdated_a_little(
    any_ca: CertificateAuthority, clock: FakeClock
) -> None:
    issued = any_ca.sign_workload(csr_for(ALICE))
    assert DEFAULT_WORKLOAD_LIFETIME == 24 * HOUR
    assert issued.not_after == T0 + 24 * HOUR
    assert T0 - dt.timedelta(minutes=10) <= issued.not_before < T0
    clock.advance(7 * HOUR)  # the CA reads the injected clock, every time
    later = any_ca.sign_workload(csr_for(ALICE))
    assert later.not_after == T0 + 31 * HOUR
    assert T0 + 7 * HOUR - dt.timedelta(minutes=10) <= later.not_before < T0 + 7 * HOUR


@pytest.mark.parametrize("lifetime", [dt.timedelta(seconds=1), HOUR, 7 * DAY, 90 * DAY])
def test_requested_lifetime_is_honoured_up_to_90_days(
    any_ca: CertificateAuthority, lifetime: dt.timedelta
) -> None:
    assert MAX_WORKLOAD_LIFETIME == 90 * DAY
    assert any_ca.sign_workload(csr_for(ALICE), lifetime).not_after == T0 + lifetime


@pytest.mark.parametrize(
    "lifetime", [90 * DAY + dt.timedelta(seconds=1), YEAR, dt.timedelta(0), -HOUR]
)
def test_lifetime_beyond_90_days_or_not_positive_is_refused(
    any_ca: CertificateAuthority, lifetime: dt.timedelta
) -> None:
    with pytest.raises(InvalidRequest, match="lifetime") as info:
        any_ca.sign_workload(csr_for(ALICE), lifetime)
    assert info.value.grpc_code is GrpcCode.INVALID_ARGUMENT


@pytest.mark.parametrize("expiring", ["signer", "intermediate", "root"])
def test_certificate_never_outlives_any_certificate_above_it(
    tmp_path: Path, clock: FakeClock, expiring: str
) -> None:
    ends = {"signer": 5 * YEAR, "intermediate": 6 * YEAR, "root": 10 * YEAR}
    ends[expiring] = 3 * HOUR
    root = make_root(not_after=T0 + ends["root"])
    intermediate = make_intermediate(root, "Intermediate", not_after=T0 + ends["intermediate"])
    signer = make_intermediate(intermediate, "Signer", not_after=T0 + ends["signer"])
    directory = write_plugged_ca_files(
        tmp_path / "ca", signer, [signer.cert, intermediate.cert], [root.cert]
    )
    ca = CertificateAuthority.load_or_create(directory, TD, clock=clock)
    assert ca.sign_workload(csr_for(ALICE)).not_after == T0 + 3 * HOUR
    assert ca.sign_workload(csr_for(ALICE), HOUR).not_after == T0 + HOUR
    clock.advance(3 * HOUR)
    with pytest.raises(CaConfigError, match="expired"):
        ca.sign_workload(csr_for(ALICE))


def test_expired_self_signed_root_stops_signing(
    self_signed: CertificateAuthority, clock: FakeClock
) -> None:
    clock.advance(11 * YEAR)
    with pytest.raises(CaConfigError, match="expired"):
        self_signed.sign_workload(csr_for(ALICE))


def test_nothing_but_the_public_key_is_taken_from_the_csr(
    any_ca: CertificateAuthority,
) -> None:
    key = ec_key()
    unknown = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")
    csr = make_csr(
        key,
        spiffe_id=ALICE,
        subject=name("admin", "Evil Corp"),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=True,
                    data_encipherment=True,
                    key_agreement=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
            (x509.SubjectKeyIdentifier(b"\x01" * 20), False),
            (x509.UnrecognizedExtension(unknown, b"\x04\x02hi"), False),
        ],
    )
    cert = any_ca.sign_workload(validate_csr(csr)).certificate
    assert cert.subject == x509.Name([])
    assert {e.oid for e in cert.extensions} == WORKLOAD_EXTENSIONS
    assert extension_value(cert, x509.BasicConstraints).value.ca is False
    assert not extension_value(cert, x509.KeyUsage).value.key_cert_sign
    assert (
        ExtendedKeyUsageOID.CODE_SIGNING not in extension_value(cert, x509.ExtendedKeyUsage).value
    )
    assert public_key_der(cert.public_key()) == public_key_der(key)  # type: ignore[arg-type]


# -- refusals ---------------------------------------------------------------------


def test_csr_with_a_tampered_signature_is_refused() -> None:
    der = x509.load_pem_x509_csr(build_csr(generate_workload_key(), ALICE)).public_bytes(
        serialization.Encoding.DER
    )
    tampered = der[:-1] + bytes([der[-1] ^ 0x01])  # last byte of the signature's s
    x509.load_der_x509_csr(tampered)  # still a well-formed CSR
    with pytest.raises(InvalidCsr, match="signature") as info:
        validate_csr(csr_der_to_pem(tampered))
    assert info.value.grpc_code is GrpcCode.INVALID_ARGUMENT


def test_csr_edited_to_ask_for_another_identity_is_refused() -> None:
    der = x509.load_pem_x509_csr(build_csr(generate_workload_key(), ALICE)).public_bytes(
        serialization.Encoding.DER
    )
    edited = der.replace(ALICE.uri.encode(), MALLORY_SAME_LENGTH.uri.encode())
    assert edited != der
    assert x509.load_der_x509_csr(edited).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier) == [MALLORY_SAME_LENGTH.uri]
    with pytest.raises(InvalidCsr, match="signature"):
        validate_csr(csr_der_to_pem(edited))


@pytest.mark.parametrize(
    ("key_factory", "message"),
    [
        (lambda: ec_key(ec.SECP192R1()), "secp192r1"),
        (lambda: ec_key(ec.SECP224R1()), "secp224r1"),
        (lambda: ec_key(ec.SECP256K1()), "secp256k1"),
        (lambda: rsa_key(1024), "1024 bits"),
        (lambda: rsa_key(2040), "2040 bits"),
    ],
)
def test_weak_or_disallowed_keys_are_refused(key_factory: object, message: str) -> None:
    key: PrivateKey = key_factory()  # type: ignore[operator]
    with pytest.raises(InvalidCsr, match=message):
        validate_csr(make_csr(key, spiffe_id=ALICE))


@pytest.mark.parametrize(
    "key_factory",
    [lambda: ec_key(ec.SECP384R1()), lambda: ec_key(ec.SECP521R1()), lambda: rsa_key(2048)],
)
def test_strong_keys_are_accepted(self_signed: CertificateAuthority, key_factory: object) -> None:
    key: PrivateKey = key_factory()  # type: ignore[operator]
    cert = self_signed.sign_workload(validate_csr(make_csr(key, spiffe_id=ALICE))).certificate
    assert public_key_der(cert.public_key()) == public_key_der(key)  # type: ignore[arg-type]


def test_ed25519_key_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ALICE.uri)]), True
        )
        .sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(InvalidCsr, match="not supported"):
        validate_csr(csr)


def test_key_on_a_curve_cryptography_does_not_know_is_refused_as_invalid_csr() -> None:
    der = x509.load_pem_x509_csr(build_csr(generate_workload_key(), ALICE)).public_bytes(
        serialization.Encoding.DER
    )
    p256 = bytes.fromhex("2a8648ce3d030107")  # 1.2.840.10045.3.1.7 (prime256v1)
    prime239v1 = bytes.fromhex("2a8648ce3d030104")  # same length, an unsupported curve
    assert der.count(p256) == 1
    with pytest.raises(InvalidCsr, match="public key"):
        validate_csr(csr_der_to_pem(der.replace(p256, prime239v1)))


def test_csr_signed_with_sha224_is_refused() -> None:
    csr = make_csr(ec_key(), spiffe_id=ALICE, hash_algorithm=hashes.SHA224())
    with pytest.raises(InvalidCsr, match="sha224"):
        validate_csr(csr)


@pytest.mark.parametrize(
    ("sans", "message"),
    [
        ({}, "no subjectAltName"),
        ({"uris": [ALICE.uri, SpiffeId(TD, "shop", "bob").uri]}, "exactly one SPIFFE URI"),
        ({"uris": [ALICE.uri, ALICE.uri]}, "exactly one SPIFFE URI"),
        ({"uris": [ALICE.uri], "dns_names": ["alice.shop.svc"]}, "exactly one SPIFFE URI"),
        ({"dns_names": ["alice.shop.svc"]}, "exactly one SPIFFE URI"),
        ({"uris": [f"spiffe://{TD}/workload/alice"]}, "not a workload SPIFFE ID"),
        ({"uris": [f"spiffe://{TD}"]}, "not a workload SPIFFE ID"),
        ({"uris": ["https://cluster.local/ns/shop/sa/alice"]}, "not a workload SPIFFE ID"),
        ({"uris": ["spiffe://Cluster.Local/ns/shop/sa/alice"]}, "not a workload SPIFFE ID"),
    ],
)
def test_csr_must_name_exactly_one_workload_spiffe_id(
    sans: dict[str, list[str]], message: str
) -> None:
    csr = make_csr(ec_key(), **sans)  # type: ignore[arg-type]
    with pytest.raises(InvalidCsr, match=message) as info:
        validate_csr(csr)
    assert info.value.grpc_code is GrpcCode.INVALID_ARGUMENT


def test_csr_for_another_trust_domain_is_refused(any_ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCsr, match=r"trust domain 'evil\.example'"):
        any_ca.sign_workload(csr_for(SpiffeId("evil.example", "shop", "alice")))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_input_that_is_not_a_csr_is_refused(data: bytes | str) -> None:
    with pytest.raises(InvalidCsr, match="not a PEM certificate request"):
        validate_csr(data)


def test_certificate_instead_of_csr_is_refused(pki: Pki) -> None:
    with pytest.raises(InvalidCsr):
        validate_csr(pki.root.cert_pem)


# -- property: a CSR for A is signed as A, and never as anything else ----------------

segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
identities = st.builds(SpiffeId, st.sampled_from([TD, "other.example"]), segment, segment)


@pytest.fixture(scope="module")
def shared_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(
        tmp_path_factory.mktemp("shared-ca"), TD, clock=FakeClock(T0)
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a=identities,
    b=identities,
    position=st.integers(min_value=0),
    replacement=st.sampled_from("xyz7-"),
)
def test_csr_for_one_identity_is_signed_as_it_and_never_as_another(
    shared_ca: CertificateAuthority,
    a: SpiffeId,
    b: SpiffeId,
    position: int,
    replacement: str,
) -> None:
    key = generate_workload_key()
    csr_pem = build_csr(key, a)
    checked = validate_csr(csr_pem)
    assert checked.identity == a
    assert (checked.identity == b) == (a == b)
    csr_uris = checked.csr.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    if a.trust_domain != TD:
        with pytest.raises(InvalidCsr, match="trust domain"):
            shared_ca.sign_workload(checked)
    else:
        cert = shared_ca.sign_workload(checked).certificate
        assert (
            cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
            == csr_uris
            == [a.uri]
        )
        assert identity_of(cert) == a
        assert public_key_der(cert.public_key()) == public_key_der(key)  # type: ignore[arg-type]

    # The same CSR edited to claim a different identity of the same length never passes.
    sa = a.service_account
    i = position % len(sa)
    other_sa = sa[:i] + replacement + sa[i + 1 :]
    if other_sa != sa:
        other = SpiffeId(a.trust_domain, a.namespace, other_sa)
        der = checked.csr.public_bytes(serialization.Encoding.DER)
        edited = der.replace(a.uri.encode(), other.uri.encode())
        with pytest.raises(InvalidCsr):
            validate_csr(csr_der_to_pem(edited))


# -- serving certificates for the CA's own endpoints ---------------------------------


def test_serving_certificate_has_the_names_and_server_auth(
    plugged: CertificateAuthority, pki: Pki
) -> None:
    key, issued = plugged.issue_serving_certificate(
        ["underpass-ca.underpass-system.svc"], ["10.96.0.10", "::1"]
    )
    cert = issued.certificate
    assert public_key_der(cert.public_key()) == public_key_der(key)  # type: ignore[arg-type]
    san = extension_value(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["underpass-ca.underpass-system.svc"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.96.0.10", "::1"]
    assert list(extension_value(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert extension_value(cert, x509.BasicConstraints).value.ca is False
    assert chain_of(issued)[1:] == [
        [pki.signer.cert],
        [pki.intermediates[0].cert],
        [pki.root.cert],
    ]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([pki.root.cert]))
        .time(T0)
        .build_server_verifier(x509.DNSName("underpass-ca.underpass-system.svc"))
    )
    verifier.verify(cert, [pki.signer.cert, pki.intermediates[0].cert])


def test_serving_certificate_for_a_name_too_long_for_a_common_name(
    self_signed: CertificateAuthority,
) -> None:
    long_name = "underpass-ca." + "x" * 60 + ".svc.cluster.local"
    _, issued = self_signed.issue_serving_certificate([long_name])
    cert = issued.certificate
    assert cert.subject == x509.Name([])
    san = extension_value(cert, x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [long_name]


@pytest.mark.parametrize(
    ("dns_names", "ips", "message"),
    [
        ([], [], "at least one"),
        (["ok.example"], ["10.0.0.256"], "not an IP address"),
        (["caf\u00e9.example"], [], "not a DNS name"),
        (["two words"], [], "not a DNS name"),
    ],
)
def test_serving_certificate_request_errors(
    self_signed: CertificateAuthority, dns_names: list[str], ips: list[str], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        self_signed.issue_serving_certificate(dns_names, ips)
