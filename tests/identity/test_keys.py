"""identity.keys: keys and CSRs from the process's OpenSSL, checked by independent readers.

cryptography, the CA's own CSR validation and the OpenSSL command line each
read what :func:`identity.keys.new_key_and_csr` makes; :func:`issued_by` is
checked against chains that ``cryptography`` built.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity import keys
from identity.ca import validate_csr
from identity.spiffe import SpiffeId

from .pki import make_intermediate, make_leaf, make_root, rsa_key

pytestmark = pytest.mark.unit

ALICE = SpiffeId("cluster.local", "default", "alice")


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_the_csr_is_what_the_ca_expects() -> None:
    key, csr_pem = keys.new_key_and_csr(ALICE)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == "sha256"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [ALICE.uri]
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    assert validate_csr(csr_pem).identity == ALICE
    assert (
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == key.public_key_info
    )


def test_the_openssl_command_verifies_the_csr(tmp_path: Path) -> None:
    _, csr_pem = keys.new_key_and_csr(ALICE)
    path = tmp_path / "csr.pem"
    path.write_bytes(csr_pem)
    result = subprocess.run(
        ["openssl", "req", "-in", str(path), "-verify", "-noout", "-text"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "verify OK" in result.stdout + result.stderr
    assert f"URI:{ALICE.uri}" in result.stdout


def test_the_private_key_is_pkcs8_matches_and_stays_out_of_repr() -> None:
    key, _ = keys.new_key_and_csr(ALICE)
    assert key.pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(key.pem, password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert (
        loaded.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == key.public_key_info
    )
    assert "PRIVATE" not in repr(key) and key.pem.decode() not in repr(key)


def test_every_call_makes_a_new_key() -> None:
    first, _ = keys.new_key_and_csr(ALICE)
    second, _ = keys.new_key_and_csr(ALICE)
    assert first.public_key_info != second.public_key_info


def test_issued_by_follows_the_signatures() -> None:
    root = make_root()
    middle = make_intermediate(root)
    leaf = make_leaf(middle, spiffe_id=ALICE)
    rsa_root = make_root("RSA Root", key=rsa_key())
    rsa_leaf = make_leaf(rsa_root, spiffe_id=ALICE)
    assert keys.issued_by(der_of(leaf.cert), der_of(middle.cert))
    assert keys.issued_by(der_of(middle.cert), der_of(root.cert))
    assert keys.issued_by(der_of(rsa_leaf.cert), der_of(rsa_root.cert))
    assert not keys.issued_by(der_of(leaf.cert), der_of(root.cert))  # skips a level
    assert not keys.issued_by(der_of(leaf.cert), der_of(make_root().cert))  # same name, other key
    assert not keys.issued_by(der_of(rsa_leaf.cert), der_of(root.cert))


def test_issued_by_refuses_what_is_not_one_certificate() -> None:
    root = make_root()
    leaf = der_of(make_leaf(root, spiffe_id=ALICE).cert)
    parent = der_of(root.cert)
    assert not keys.issued_by(b"", parent)
    assert not keys.issued_by(b"garbage", parent)
    assert not keys.issued_by(leaf + b"\x00", parent)  # trailing bytes
    assert not keys.issued_by(leaf, parent[:-3])
    tampered = bytearray(leaf)
    tampered[-10] ^= 0x01  # inside the signature
    assert not keys.issued_by(bytes(tampered), parent)
    assert keys.issued_by(leaf, parent)  # and the error queue left nothing behind
