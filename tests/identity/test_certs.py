"""WorkloadCertificate.from_ca_response: the data plane's check of a CA answer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from identity.ca import CertificateAuthority, build_csr, generate_workload_key, validate_csr
from identity.certs import WorkloadCertificate
from identity.errors import CertificateUnavailable
from identity.spiffe import SpiffeId

from .pki import ec_key, make_intermediate, make_leaf, make_root

pytestmark = pytest.mark.unit

ALICE = SpiffeId("cluster.local", "default", "alice")
BOB = SpiffeId("cluster.local", "default", "bob")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")


@pytest.fixture
def other_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "other", "cluster.local")


def answer(
    ca: CertificateAuthority, identity: SpiffeId
) -> tuple[ec.EllipticCurvePrivateKey, list[str]]:
    key = generate_workload_key()
    issued = ca.sign_workload(validate_csr(build_csr(key, identity)), dt.timedelta(hours=1))
    return key, issued.chain_pem


def test_a_proper_answer_is_accepted(ca: CertificateAuthority) -> None:
    key, chain = answer(ca, ALICE)
    cert = WorkloadCertificate.from_ca_response(ALICE, key, chain)
    assert cert.identity == ALICE
    assert cert.roots == tuple(ca.roots)
    assert "PRIVATE" not in repr(cert)


def test_a_leaf_for_another_identity_is_refused(ca: CertificateAuthority) -> None:
    key, chain = answer(ca, BOB)
    with pytest.raises(CertificateUnavailable, match="bob"):
        WorkloadCertificate.from_ca_response(ALICE, key, chain)


def test_a_leaf_for_another_key_is_refused(ca: CertificateAuthority) -> None:
    _, chain = answer(ca, ALICE)
    with pytest.raises(CertificateUnavailable, match="different key"):
        WorkloadCertificate.from_ca_response(ALICE, generate_workload_key(), chain)


def test_a_leaf_not_signed_by_the_answers_root_is_refused(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    key, chain = answer(other_ca, ALICE)
    forged = [chain[0], ca.root_bundle_pem]  # leaf from one CA, root from another
    with pytest.raises(CertificateUnavailable, match="does not reach any root"):
        WorkloadCertificate.from_ca_response(ALICE, key, forged)


def test_a_leaf_alone_is_refused(ca: CertificateAuthority) -> None:
    key, chain = answer(ca, ALICE)
    with pytest.raises(CertificateUnavailable, match="expected a leaf and a root"):
        WorkloadCertificate.from_ca_response(ALICE, key, chain[:1])


def test_a_chain_whose_intermediate_did_not_issue_the_leaf_is_refused() -> None:
    root = make_root()
    middle = make_intermediate(root)
    stranger = make_intermediate(root, common_name="Other Intermediate")
    key = ec_key()
    leaf = make_leaf(middle, spiffe_id=ALICE, key=key)
    good = [leaf.cert_pem.decode(), middle.cert_pem.decode(), root.cert_pem.decode()]
    assert WorkloadCertificate.from_ca_response(ALICE, key, good).chain_der[1] == (
        middle.cert.public_bytes(Encoding.DER)
    )
    broken = [leaf.cert_pem.decode(), stranger.cert_pem.decode(), root.cert_pem.decode()]
    with pytest.raises(CertificateUnavailable, match="chain is broken: certificate 0"):
        WorkloadCertificate.from_ca_response(ALICE, key, broken)


def test_a_root_with_the_right_key_but_another_name_is_not_the_issuer() -> None:
    root_key = ec_key()
    root = make_root("Mesh Root", key=root_key)
    renamed = make_root("Another Root", key=root_key)  # same key: the signature verifies
    key = ec_key()
    leaf = make_leaf(root, spiffe_id=ALICE, key=key)
    chain = [leaf.cert_pem.decode(), renamed.cert_pem.decode()]
    with pytest.raises(CertificateUnavailable, match="does not reach any root"):
        WorkloadCertificate.from_ca_response(ALICE, key, chain)


def test_an_answer_that_is_not_pem_certificates_is_refused() -> None:
    with pytest.raises(CertificateUnavailable, match="element 1 is not PEM certificates"):
        WorkloadCertificate.from_ca_response(
            ALICE, ec_key(), [make_leaf(make_root(), spiffe_id=ALICE).cert_pem.decode(), "junk"]
        )
