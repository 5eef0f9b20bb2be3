"""identity.der: certificates read as ``cryptography`` reads them; anything else refused."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from identity import der
from identity.der import DerError

from .pki import T0, make_intermediate, make_leaf, make_root, rsa_key

pytestmark = pytest.mark.unit

SPIFFE = "spiffe://cluster.local/ns/shop/sa/cart"


def as_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def expect_same(cert: x509.Certificate) -> der.CertificateFacts:
    """Parse ``cert`` with identity.der and check every fact against cryptography."""
    facts = der.parse_certificate(as_der(cert))
    assert facts.serial == cert.serial_number
    assert facts.not_before == cert.not_valid_before_utc
    assert facts.not_after == cert.not_valid_after_utc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    assert list(facts.uri_sans) == uris
    assert facts.subject_public_key_info == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert der.name_string(facts.subject) == cert.subject.rfc4514_string()
    assert der.name_string(facts.issuer) == cert.issuer.rfc4514_string()
    return facts


def test_a_workload_chain_reads_as_cryptography_reads_it() -> None:
    root = make_root()
    middle = make_intermediate(root)
    leaf = make_leaf(middle, spiffe_id=SPIFFE, uris=["spiffe://other/x"], dns_names=["a.b"])
    facts = expect_same(leaf.cert)
    assert facts.uri_sans == (SPIFFE, "spiffe://other/x")  # DNS names are not URIs
    expect_same(middle.cert)
    assert expect_same(root.cert).uri_sans == ()


def test_rsa_keys_and_times_past_2049_read_too() -> None:
    # After 2049 X.509 switches from UTCTime to GeneralizedTime (RFC 5280 4.1.2.5).
    root = make_root(key=rsa_key(), not_before=T0, not_after=dt.datetime(2061, 1, 2, tzinfo=dt.UTC))
    facts = expect_same(root.cert)
    assert facts.not_after.year == 2061


name_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=20
)


@settings(max_examples=40, deadline=None)
@given(
    common_name=name_text,
    organization=name_text,
    serial=st.integers(min_value=1, max_value=2**159 - 1),
    uris=st.lists(
        st.from_regex(r"spiffe://[a-z]{1,8}/ns/[a-z]{1,8}/sa/[a-z]{1,8}", fullmatch=True),
        max_size=3,
    ),
)
def test_any_name_serial_and_uris_read_as_cryptography_reads_them(
    common_name: str, organization: str, serial: int, uris: list[str]
) -> None:
    key = rsa_key(1024) if serial % 7 == 0 else None
    root = make_root(common_name="Root", key=key)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(root.cert.subject)
        .public_key(root.key.public_key())
        .serial_number(serial)
        .not_valid_before(T0)
        .not_valid_after(T0 + dt.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    from cryptography.hazmat.primitives import hashes

    expect_same(builder.sign(root.key, hashes.SHA256()))


def test_garbage_is_refused_with_der_error() -> None:
    cert = as_der(make_leaf(make_root(), spiffe_id=SPIFFE).cert)
    for bad, reason in [
        (b"", "truncated"),
        (cert[:-1], "runs past"),
        (cert + b"\x00", "trailing"),
        (b"\x30\x80" + cert[2:], "indefinite"),
        (b"\x30\x81\x05\x02\x01\x01\x30\x00", "non-minimal"),
        (b"\x04\x00", "expected tag 0x30"),
    ]:
        with pytest.raises(DerError, match=reason):
            der.parse_certificate(bad)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash_the_reader(data: bytes) -> None:
    with contextlib.suppress(DerError):
        der.parse_certificate(data)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_a_flipped_byte_gives_der_error_or_a_parse_never_a_crash(position: int, value: int) -> None:
    cert = bytearray(as_der(make_leaf(_ROOT, spiffe_id=SPIFFE).cert))
    cert[position % len(cert)] = value
    with contextlib.suppress(DerError):
        der.parse_certificate(bytes(cert))


_ROOT = make_root()


def test_pem_blocks_take_only_the_label_asked_for() -> None:
    root, leaf = make_root(), make_leaf(make_root(), spiffe_id=SPIFFE)
    text = b"# a comment\n" + leaf.cert_pem + leaf.key_pem + root.cert_pem
    assert der.pem_blocks(text) == [as_der(leaf.cert), as_der(root.cert)]
    assert der.pem_blocks(text.decode()) == [as_der(leaf.cert), as_der(root.cert)]
    assert der.to_pem(as_der(root.cert)) == root.cert_pem
    with pytest.raises(DerError, match="no CERTIFICATE PEM block"):
        der.pem_blocks(leaf.key_pem)
    broken = root.cert_pem.replace(b"M", b"!", 1)
    with pytest.raises(DerError, match="broken base64"):
        der.pem_blocks(broken)


def test_oid_strings() -> None:
    assert der.oid_string(der.OID_SUBJECT_ALT_NAME) == "2.5.29.17"
    assert der.oid_string(der.OID_ECDSA_WITH_SHA256) == "1.2.840.10045.4.3.2"
    with pytest.raises(DerError):
        der.oid_string(b"\x2a\x86")


def test_a_csr_info_for_a_non_ascii_uri_is_refused() -> None:
    with pytest.raises(DerError, match="ASCII"):
        der.csr_info(b"\x30\x00", "spiffe://cluster.local/ns/é/sa/x")


def test_encode_writes_long_form_lengths() -> None:
    assert der.encode(der.OCTET_STRING, b"x" * 200)[:3] == b"\x04\x81\xc8"
    assert der.read_tlv(der.encode(der.OCTET_STRING, b"x" * 300)) == (0x04, 4, 304)
    assert base64.b64encode(der.encode(der.NULL, b"")) == b"BQA="


def test_exclusive_pem_is_the_label_and_nothing_else() -> None:
    root = make_root()
    assert der.pem_blocks(root.cert_pem, exclusive=True) == [as_der(root.cert)]
    for text, reason in [
        (b"comment\n" + root.cert_pem, "text outside"),
        (root.cert_pem + root.key_pem, "PRIVATE KEY PEM block where only CERTIFICATE"),
        (root.cert_pem.replace(b"-----END CERTIFICATE-----", b""), "not terminated"),
        (root.cert_pem.replace(b"CERTIFICATE-----\n", b"CERTIFICATE-- \n", 1), "malformed"),
    ]:
        with pytest.raises(DerError, match=reason):
            der.pem_blocks(text, exclusive=True)


def test_pem_reading_takes_linear_time_on_hostile_input() -> None:
    # A backtracking pattern took seconds on this; the line scanner takes milliseconds.
    hostile = b"-----BEGIN A-----\n" * 20_000
    with pytest.raises(DerError, match="not terminated"):
        der.pem_blocks(hostile)
    nested = b"-----BEGIN CERTIFICATE-----\n" + b"AAAA\n" * 20_000
    with pytest.raises(DerError, match="not terminated"):
        der.pem_blocks(nested)


def test_display_name_shows_what_it_cannot_render_instead_of_failing() -> None:
    root = make_root("Mesh Root")
    subject = der.parse_certificate(as_der(root.cert)).subject
    assert der.display_name(subject) == root.cert.subject.rfc4514_string()
    assert der.display_name(b"\x04\x00").startswith("(unreadable name: ")
