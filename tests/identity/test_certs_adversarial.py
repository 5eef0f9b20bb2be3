"""A CA answer built byte by byte to be read two ways: the data plane refuses every one.

Each leaf is signed by a real root (so the signature check passes) and differs
from a proper workload certificate in one way that a lenient reader would let
through: a second SAN extension, a URI in constructed form, bytes after the
extensions, a serial OpenSSL refuses, extension fields out of order. The
roots of an answer must be certificates OpenSSL reads: one that is not would
break the trust bundle of every identity on the node.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from identity import der, keys
from identity.certs import WorkloadCertificate
from identity.errors import CertificateUnavailable
from identity.spiffe import SpiffeId

pytestmark = pytest.mark.unit

E = der.encode
ME = SpiffeId("cluster.local", "a", "b")
OTHER = "spiffe://cluster.local/ns/kube-system/sa/admin"
SIGNATURE_ALGORITHM = E(der.SEQUENCE, E(der.OID, der.OID_ECDSA_WITH_SHA256))
NOW = dt.datetime.now(dt.UTC)

_ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
_ROOT_NAME = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
ROOT = (
    x509.CertificateBuilder()
    .subject_name(_ROOT_NAME)
    .issuer_name(_ROOT_NAME)
    .public_key(_ROOT_KEY.public_key())
    .serial_number(1)
    .not_valid_before(NOW - dt.timedelta(days=1))
    .not_valid_after(NOW + dt.timedelta(days=10))
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .sign(_ROOT_KEY, hashes.SHA256())
)
ROOT_DER = ROOT.public_bytes(serialization.Encoding.DER)
ISSUER = der.parse_certificate(ROOT_DER).subject
KEY, _ = keys.new_key_and_csr(ME)


def utc(text: str) -> bytes:
    return E(der.UTC_TIME, text.encode())


def san(*names: bytes, extra_before_value: bytes = b"") -> bytes:
    value = E(der.OCTET_STRING, E(der.SEQUENCE, b"".join(names)))
    return E(
        der.SEQUENCE,
        E(der.OID, der.OID_SUBJECT_ALT_NAME) + E(der.BOOLEAN, b"\xff") + extra_before_value + value,
    )


def uri(text: str) -> bytes:
    return E(der.URI_NAME, text.encode())


def leaf(
    extensions: list[bytes], *, serial: bytes = b"\x05", after_extensions: bytes = b""
) -> bytes:
    tbs = E(
        der.SEQUENCE,
        E(0xA0, E(der.INTEGER, b"\x02"))
        + E(der.INTEGER, serial)
        + SIGNATURE_ALGORITHM
        + ISSUER
        + E(der.SEQUENCE, utc("250101000000Z") + utc("491231000000Z"))
        + E(der.SEQUENCE, b"")
        + KEY.public_key_info
        + E(0xA3, E(der.SEQUENCE, b"".join(extensions)) + after_extensions),
    )
    signature = _ROOT_KEY.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return E(der.SEQUENCE, tbs + SIGNATURE_ALGORITHM + E(der.BIT_STRING, b"\x00" + signature))


def answer(leaf_der: bytes, roots: bytes = ROOT_DER) -> list[str]:
    return [der.to_pem(leaf_der).decode(), der.to_pem(roots).decode()]


def test_the_handmade_baseline_is_accepted() -> None:
    cert = WorkloadCertificate.from_ca_response(ME, KEY, answer(leaf([san(uri(ME.uri))])))
    assert cert.facts.uri_sans == (ME.uri,)


LEAVES = {
    "a second SAN extension": (leaf([san(uri(ME.uri)), san(uri(OTHER))]), "more than one"),
    "a URI in constructed form": (
        leaf([san(uri(ME.uri), E(0xA6, E(0x16, OTHER.encode())))]),
        "constructed",
    ),
    "bytes after the extensions": (
        leaf([san(uri(ME.uri))], after_extensions=E(der.NULL, b"")),
        "trailing bytes after the extensions",
    ),
    "an extension with two values": (
        leaf([san(uri(ME.uri), extra_before_value=E(der.OCTET_STRING, b"\x30\x00"))]),
        r"\(OID, \[critical,\] OCTET STRING\)",
    ),
    "a serial OpenSSL will not read": (
        leaf([san(uri(ME.uri))], serial=b"\x00\x05"),
        "OpenSSL cannot read",
    ),
}


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_a_leaf_with_a_second_reading_is_refused(name: str) -> None:
    leaf_der, reason = LEAVES[name]
    with pytest.raises(CertificateUnavailable, match=reason):
        WorkloadCertificate.from_ca_response(ME, KEY, answer(leaf_der))


def test_a_root_that_is_only_a_tbs_certificate_is_refused() -> None:
    tbs_start = der.read_tlv(ROOT_DER)[1]
    _, _, tbs_end = der.read_tlv(ROOT_DER, tbs_start)
    tbs_only = E(der.SEQUENCE, ROOT_DER[tbs_start:tbs_end])
    good = leaf([san(uri(ME.uri))])
    roots = der.to_pem(ROOT_DER).decode() + der.to_pem(tbs_only).decode()
    with pytest.raises(CertificateUnavailable, match="not PEM certificates"):
        WorkloadCertificate.from_ca_response(ME, KEY, [der.to_pem(good).decode(), roots])


def test_a_root_openssl_cannot_read_is_refused_even_off_the_path() -> None:
    # Signed and well formed to our reader, but with a non-minimal serial: OpenSSL refuses it.
    odd_root = leaf([san(uri("spiffe://cluster.local/ns/x/sa/y"))], serial=b"\x00\x09")
    good = leaf([san(uri(ME.uri))])
    roots = der.to_pem(ROOT_DER).decode() + der.to_pem(odd_root).decode()
    with pytest.raises(CertificateUnavailable, match="OpenSSL cannot read"):
        WorkloadCertificate.from_ca_response(ME, KEY, [der.to_pem(good).decode(), roots])
