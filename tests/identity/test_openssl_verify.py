"""Certificates the CA issues, checked by the real ``openssl verify -x509_strict``.

OpenSSL is an independent verifier: it must accept what the CA issues (with
only the root trusted and the response's intermediates as untrusted helpers)
and reject leaves from another CA, expired leaves and wrong purposes. The
system trust store is never consulted, and every temporary file is removed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from identity.ca import (
    CertificateAuthority,
    IssuedCertificate,
    build_csr,
    generate_workload_key,
    validate_csr,
)
from identity.spiffe import SpiffeId
from tests.identity.pki import (
    DAY,
    HOUR,
    T0,
    FakeClock,
    make_intermediate,
    make_leaf,
    make_pki,
    make_root,
    pem,
    random_ski,
    write_plugged_ca_files,
)

pytestmark = pytest.mark.interop

TD = "cluster.local"
ALICE = SpiffeId(TD, "shop", "alice")
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    output: str


def openssl_verify(
    leaf: x509.Certificate,
    *,
    roots: Sequence[x509.Certificate],
    untrusted: Sequence[x509.Certificate] = (),
    purpose: str | None = None,
    hostname: str | None = None,
    at: float = T0.timestamp(),
) -> Verdict:
    """Run ``openssl verify -x509_strict`` on ``leaf`` at time ``at`` (epoch seconds)."""
    if not Path(OPENSSL).exists():
        pytest.fail(f"the openssl command is needed for interop tests ({OPENSSL} not found)")
    with tempfile.TemporaryDirectory(prefix="underpass-openssl-") as tmp:
        directory = Path(tmp)
        (directory / "roots.pem").write_bytes(pem(*roots))
        (directory / "leaf.pem").write_bytes(pem(leaf))
        command = [
            OPENSSL,
            "verify",
            "-x509_strict",
            "-no-CApath",
            "-no-CAstore",
            "-CAfile",
            str(directory / "roots.pem"),
            "-attime",
            str(int(at)),
        ]
        if untrusted:
            (directory / "untrusted.pem").write_bytes(pem(*untrusted))
            command += ["-untrusted", str(directory / "untrusted.pem")]
        if purpose is not None:
            command += ["-purpose", purpose]
        if hostname is not None:
            command += ["-verify_hostname", hostname]
        command.append(str(directory / "leaf.pem"))
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    output = result.stdout + result.stderr
    ok = result.returncode == 0 and output.strip().endswith(": OK")
    return Verdict(ok, output)


def issue(ca: CertificateAuthority, identity: SpiffeId = ALICE) -> IssuedCertificate:
    return ca.sign_workload(validate_csr(build_csr(generate_workload_key(), identity)))


def response_parts(
    issued: IssuedCertificate,
) -> tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate]]:
    """Leaf, intermediates and roots of a CA response, as a peer would split it."""
    elements = [x509.load_pem_x509_certificates(e.encode()) for e in issued.chain_pem]
    assert all(len(e) == 1 for e in elements[:-1])
    return elements[0][0], [e[0] for e in elements[1:-1]], elements[-1]


@pytest.fixture
def self_signed(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", TD, clock=FakeClock(T0))


@pytest.fixture
def plugged(tmp_path: Path) -> CertificateAuthority:
    directory = make_pki(depth=2).write_plugged_ca(tmp_path / "plugged")
    return CertificateAuthority.load_or_create(directory, TD, clock=FakeClock(T0))


def test_openssl_accepts_self_signed_ca_leaf_for_client_and_server_use(
    self_signed: CertificateAuthority,
) -> None:
    leaf, intermediates, roots = response_parts(issue(self_signed))
    assert intermediates == []
    for purpose in (None, "sslclient", "sslserver"):
        verdict = openssl_verify(leaf, roots=roots, purpose=purpose)
        assert verdict.ok, verdict.output


def test_openssl_accepts_plugged_ca_leaf_with_the_response_intermediates(
    plugged: CertificateAuthority,
) -> None:
    leaf, intermediates, roots = response_parts(issue(plugged))
    assert len(intermediates) == 2
    for purpose in ("sslclient", "sslserver"):
        verdict = openssl_verify(leaf, roots=roots, untrusted=intermediates, purpose=purpose)
        assert verdict.ok, verdict.output
    # The intermediates are needed, and they are exactly what the response carries.
    missing = openssl_verify(leaf, roots=roots)
    assert not missing.ok
    assert "unable to get local issuer certificate" in missing.output


def test_openssl_rejects_a_leaf_from_a_different_ca(
    self_signed: CertificateAuthority, tmp_path: Path
) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other", TD, clock=FakeClock(T0))
    foreign_leaf, _, _ = response_parts(issue(other))
    verdict = openssl_verify(foreign_leaf, roots=self_signed.roots)
    assert not verdict.ok
    assert "unable to get local issuer certificate" in verdict.output
    # ... while the same leaf is fine under its own root: the refusal is about trust.
    assert openssl_verify(foreign_leaf, roots=other.roots).ok


def test_openssl_rejects_a_leaf_from_a_different_plugged_ca_with_the_same_names(
    plugged: CertificateAuthority,
) -> None:
    # Same subject names as the real PKI, different keys: only signatures tell them apart.
    impostor = make_pki(depth=2)
    leaf = make_leaf(impostor.signer, spiffe_id=ALICE).cert
    _, intermediates, roots = response_parts(issue(plugged))
    verdict = openssl_verify(leaf, roots=roots, untrusted=intermediates)
    assert not verdict.ok, verdict.output


def test_openssl_rejects_the_leaf_once_expired(self_signed: CertificateAuthority) -> None:
    issued = issue(self_signed)
    leaf, _, roots = response_parts(issued)
    assert openssl_verify(leaf, roots=roots, at=(issued.not_after - HOUR).timestamp()).ok
    verdict = openssl_verify(leaf, roots=roots, at=(issued.not_after + HOUR).timestamp())
    assert not verdict.ok
    assert "certificate has expired" in verdict.output


def test_openssl_accepts_leaves_during_a_root_rotation(tmp_path: Path) -> None:
    old = make_root("Old Root")
    new = make_pki(depth=2, root_name="New Root")
    roots = [old.cert, new.root.cert]
    directory = write_plugged_ca_files(tmp_path / "ca", new.signer, new.chain, roots)
    ca = CertificateAuthority.load_or_create(directory, TD, clock=FakeClock(T0))
    leaf, intermediates, response_roots = response_parts(issue(ca))
    assert response_roots == roots
    assert openssl_verify(leaf, roots=response_roots, untrusted=intermediates).ok
    only_old = openssl_verify(leaf, roots=[old.cert], untrusted=intermediates)
    assert not only_old.ok


def test_openssl_matches_the_issuer_by_its_own_key_identifier(tmp_path: Path) -> None:
    # An external signing CA whose SKI is not the SHA-1 of its key.
    root = make_root()
    signer = make_intermediate(root, subject_key_identifier=random_ski())
    directory = write_plugged_ca_files(tmp_path / "ca", signer, [signer.cert], [root.cert])
    ca = CertificateAuthority.load_or_create(directory, TD, clock=FakeClock(T0))
    leaf, intermediates, roots = response_parts(issue(ca))
    verdict = openssl_verify(leaf, roots=roots, untrusted=intermediates, purpose="sslclient")
    assert verdict.ok, verdict.output


def test_openssl_accepts_the_serving_certificate_for_its_name_only(
    plugged: CertificateAuthority,
) -> None:
    _, issued = plugged.issue_serving_certificate(["underpass-ca.underpass-system.svc"])
    leaf, intermediates, roots = response_parts(issued)
    good = openssl_verify(
        leaf,
        roots=roots,
        untrusted=intermediates,
        purpose="sslserver",
        hostname="underpass-ca.underpass-system.svc",
    )
    assert good.ok, good.output
    wrong_name = openssl_verify(leaf, roots=roots, untrusted=intermediates, hostname="evil.example")
    assert not wrong_name.ok
    not_a_client = openssl_verify(leaf, roots=roots, untrusted=intermediates, purpose="sslclient")
    assert not not_a_client.ok


def test_openssl_accepts_a_root_for_a_trust_domain_too_long_for_its_name(
    tmp_path: Path,
) -> None:
    long_td = "t" * 80 + ".example"
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", long_td, clock=FakeClock(T0))
    leaf, _, roots = response_parts(issue(ca, SpiffeId(long_td, "ns", "sa")))
    verdict = openssl_verify(leaf, roots=roots)
    assert verdict.ok, verdict.output


def test_pki_helper_certificates_pass_strict_verification() -> None:
    # Other TLS tests build on tests.identity.pki: its certificates must be strict-valid.
    pki = make_pki(depth=2)
    leaf = make_leaf(pki.signer, spiffe_id=ALICE)
    verdict = openssl_verify(leaf.cert, roots=[pki.root.cert], untrusted=pki.chain)
    assert verdict.ok, verdict.output
    expired = make_leaf(pki.signer, spiffe_id=ALICE, not_before=T0 - 2 * DAY, not_after=T0 - DAY)
    assert not openssl_verify(expired.cert, roots=[pki.root.cert], untrusted=pki.chain).ok


def test_no_temporary_files_are_left_behind(self_signed: CertificateAuthority) -> None:
    before = set(Path(tempfile.gettempdir()).glob("underpass-openssl-*"))
    leaf, _, roots = response_parts(issue(self_signed))
    openssl_verify(leaf, roots=roots)
    assert set(Path(tempfile.gettempdir()).glob("underpass-openssl-*")) == before
