"""The few X.509 and PKCS #10 structures the data plane reads and writes, in pure Python.

Owns a strict DER reader (:func:`read_tlv`), :func:`parse_certificate` (the
facts of a certificate a proxy needs: serial, validity, URI SANs, the subject
public key, issuer and subject names), PEM framing (:func:`pem_blocks`,
:func:`to_pem`) and the DER of a certificate signing request
(:func:`csr_info`, :func:`csr`).

Why not the ``cryptography`` package: ztunnel holds certificates, it does not
inspect them beyond these fields, and cryptography costs a node's ztunnel
about 5 MiB (its Rust extension, its own OpenSSL and the modules it imports).
Signatures are not checked here: OpenSSL checks every chain in the TLS
handshake, and :mod:`identity.keys` checks a CA's answer with the process's
own OpenSSL.

The reader accepts DER only (definite, minimal lengths; no trailing bytes
where a structure must end) and raises :class:`DerError` on anything else:
what it cannot read it refuses, it never guesses.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass
from typing import Final

from identity.errors import IdentityError

SEQUENCE: Final = 0x30
SET: Final = 0x31
INTEGER: Final = 0x02
BIT_STRING: Final = 0x03
OCTET_STRING: Final = 0x04
NULL: Final = 0x05
OID: Final = 0x06
BOOLEAN: Final = 0x01
UTC_TIME: Final = 0x17
GENERALIZED_TIME: Final = 0x18
URI_NAME: Final = 0x86  # GeneralName uniformResourceIdentifier: [6] IMPLICIT IA5String
EXPLICIT_0: Final = 0xA0
EXPLICIT_3: Final = 0xA3

#: DER of the object identifiers used here (content octets only).
OID_SUBJECT_ALT_NAME: Final = bytes.fromhex("551d11")  # 2.5.29.17
OID_EXTENSION_REQUEST: Final = bytes.fromhex("2a864886f70d01090e")  # 1.2.840.113549.1.9.14
OID_ECDSA_WITH_SHA256: Final = bytes.fromhex("2a8648ce3d040302")  # 1.2.840.10045.4.3.2

_PEM_LABEL = re.compile(rb"[A-Z0-9 ]{1,64}")


class DerError(IdentityError, ValueError):
    """Bytes that are not the DER (or PEM) structure expected."""


# -- reading ------------------------------------------------------------------------------


def read_tlv(data: bytes, offset: int = 0, end: int | None = None) -> tuple[int, int, int]:
    """The element at ``offset``: ``(tag, content start, content end)``.

    Single-byte tags only (all X.509 needs); lengths must be definite and minimal.
    """
    limit = len(data) if end is None else end
    if offset + 2 > limit:
        raise DerError("truncated DER: no room for a tag and a length")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte DER tag at offset {offset} is not supported")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise DerError(f"indefinite or oversized DER length at offset {offset}")
        if pos + count > limit:
            raise DerError("truncated DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise DerError(f"non-minimal DER length at offset {offset}")
        pos += count
    if pos + length > limit:
        raise DerError(f"DER element at offset {offset} runs past its container")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """Every element between ``start`` and ``end``: ``(tag, start, content start, end)``."""
    out = []
    pos = start
    while pos < end:
        tag, cstart, cend = read_tlv(data, pos, end)
        out.append((tag, pos, cstart, cend))
        pos = cend
    return out


def _expect(
    data: bytes, offset: int, tag: int, what: str, end: int | None = None
) -> tuple[int, int]:
    found, start, stop = read_tlv(data, offset, end)
    if found != tag:
        raise DerError(f"{what}: expected tag 0x{tag:02x}, found 0x{found:02x}")
    return start, stop


def _time(data: bytes, tag: int, start: int, end: int) -> dt.datetime:
    text = data[start:end].decode("ascii", "replace")
    if not text[:-1].isdigit() or not text[:-1].isascii():
        raise DerError(f"not a DER UTCTime/GeneralizedTime in Z form: {text!r}")
    try:
        if tag == UTC_TIME and len(text) == 13 and text.endswith("Z") and text[:2].isdigit():
            century = "20" if int(text[:2]) < 50 else "19"  # RFC 5280 4.1.2.5.1
            text = century + text
            tag = GENERALIZED_TIME
        if tag == GENERALIZED_TIME and len(text) == 15 and text.endswith("Z"):
            return dt.datetime.strptime(text[:14], "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        pass
    raise DerError(f"not a DER UTCTime/GeneralizedTime in Z form: {text!r}")


@dataclass(frozen=True)
class CertificateFacts:
    """What a proxy reads from a certificate (DER slices are whole elements)."""

    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    uri_sans: tuple[str, ...]
    subject_public_key_info: bytes
    issuer: bytes
    subject: bytes


def parse_certificate(der: bytes) -> CertificateFacts:
    """Read ``der`` as an X.509 certificate; :class:`DerError` if it is not one."""
    cert_start, cert_end = _expect(der, 0, SEQUENCE, "certificate")
    if cert_end != len(der):
        raise DerError("trailing bytes after the certificate")
    outer = _children(der, cert_start, cert_end)
    if [tag for tag, *_ in outer] != [SEQUENCE, SEQUENCE, BIT_STRING]:
        raise DerError("a certificate is (tbsCertificate, signatureAlgorithm, signature)")
    tbs_start, tbs_end = outer[0][2], outer[0][3]
    fields = _children(der, tbs_start, tbs_end)
    if fields and fields[0][0] == EXPLICIT_0:  # version
        fields = fields[1:]
    if len(fields) < 6:
        raise DerError("tbsCertificate has too few fields")
    serial_f, _sigalg_f, issuer_f, validity_f, subject_f, spki_f = fields[:6]
    if serial_f[0] != INTEGER or serial_f[2] == serial_f[3]:
        raise DerError("certificate serial number is not an INTEGER")
    serial = int.from_bytes(der[serial_f[2] : serial_f[3]], "big", signed=True)
    for name, f, tag in (
        ("issuer", issuer_f, SEQUENCE),
        ("validity", validity_f, SEQUENCE),
        ("subject", subject_f, SEQUENCE),
        ("subjectPublicKeyInfo", spki_f, SEQUENCE),
    ):
        if f[0] != tag:
            raise DerError(f"certificate {name} is not a SEQUENCE")
    times = _children(der, validity_f[2], validity_f[3])
    if len(times) != 2:
        raise DerError("certificate validity must hold exactly two times")
    not_before = _time(der, times[0][0], times[0][2], times[0][3])
    not_after = _time(der, times[1][0], times[1][2], times[1][3])
    uris: tuple[str, ...] = ()
    for tag, _, cstart, cend in fields[6:]:
        if tag == EXPLICIT_3:
            ext_start, ext_end = _expect(der, cstart, SEQUENCE, "extensions", cend)
            if ext_end != cend:
                raise DerError("trailing bytes after the extensions")
            uris = _uri_sans(der, ext_start, ext_end)
    return CertificateFacts(
        serial=serial,
        not_before=not_before,
        not_after=not_after,
        uri_sans=uris,
        subject_public_key_info=der[spki_f[1] : spki_f[3]],
        issuer=der[issuer_f[1] : issuer_f[3]],
        subject=der[subject_f[1] : subject_f[3]],
    )


def csr_uri_sans(der: bytes) -> tuple[str, ...]:
    """The URI SANs a PKCS #10 request asks for, from a request of the one shape we accept.

    Exactly one attribute (PKCS #9 extensionRequest) with exactly one Extensions
    value, at most one subjectAltName in it: the shape :func:`csr_info` writes.
    Anything else is refused, so that no other reader (the CA's) can find a
    second answer in the same bytes. Only reads: the signature is the CA's to check.
    """
    start, end = _csr_extensions(der)
    return _uri_sans(der, start, end)


def _uri_sans(der: bytes, start: int, end: int) -> tuple[str, ...]:
    """The URI SANs among the Extensions between ``start`` and ``end`` (their content).

    At most one subjectAltName extension (RFC 5280 4.2: an extension appears
    once); a URI must be a primitive IA5String.
    """
    found: tuple[str, ...] | None = None
    for tag, _, cstart, cend in _children(der, start, end):
        if tag != SEQUENCE:
            raise DerError("an extension is not a SEQUENCE")
        parts = _children(der, cstart, cend)
        shape = [p[0] for p in parts]
        if shape not in ([OID, OCTET_STRING], [OID, BOOLEAN, OCTET_STRING]):
            raise DerError("an extension is not (OID, [critical,] OCTET STRING)")
        if der[parts[0][2] : parts[0][3]] != OID_SUBJECT_ALT_NAME:
            continue
        if found is not None:
            raise DerError("more than one subjectAltName extension")
        value = parts[-1]
        names_start, names_end = _expect(der, value[2], SEQUENCE, "GeneralNames", value[3])
        if names_end != value[3]:
            raise DerError("trailing bytes after GeneralNames")
        uris = []
        for name_tag, _, nstart, nend in _children(der, names_start, names_end):
            if name_tag == URI_NAME | 0x20:  # a constructed URI: not DER
                raise DerError("a URI SAN in constructed form")
            if name_tag == URI_NAME:
                text = der[nstart:nend]
                if not text.isascii():
                    raise DerError("a URI SAN is not IA5 (ASCII) text")
                uris.append(text.decode("ascii"))
        found = tuple(uris)
    return found or ()


def _csr_extensions(der: bytes) -> tuple[int, int]:
    """Where the Extensions of a CSR's one extensionRequest attribute are (their content)."""
    _, req_end = _expect(der, 0, SEQUENCE, "certification request")
    if req_end != len(der):
        raise DerError("trailing bytes after the certification request")
    outer = _children(der, read_tlv(der, 0)[1], req_end)
    if [tag for tag, *_ in outer] != [SEQUENCE, SEQUENCE, BIT_STRING]:
        raise DerError("a CSR is (certificationRequestInfo, signatureAlgorithm, signature)")
    fields = _children(der, outer[0][2], outer[0][3])
    if [tag for tag, *_ in fields] != [INTEGER, SEQUENCE, SEQUENCE, EXPLICIT_0]:
        raise DerError("certificationRequestInfo is not (version, subject, key, [0] attributes)")
    attributes = _children(der, fields[3][2], fields[3][3])
    if not attributes:
        return fields[3][2], fields[3][2]  # no extension requested
    if len(attributes) != 1 or attributes[0][0] != SEQUENCE:
        raise DerError("a workload CSR carries exactly one attribute, its extensionRequest")
    parts = _children(der, attributes[0][2], attributes[0][3])
    if [p[0] for p in parts] != [OID, SET] or der[parts[0][2] : parts[0][3]] != (
        OID_EXTENSION_REQUEST
    ):
        raise DerError("a workload CSR's one attribute must be its extensionRequest")
    values = _children(der, parts[1][2], parts[1][3])
    if len(values) != 1 or values[0][0] != SEQUENCE:
        raise DerError("an extensionRequest holds exactly one Extensions value")
    return values[0][2], values[0][3]


#: RFC 4514 short names, as ``cryptography``'s ``rfc4514_string`` writes them.
_NAME_KEYS: Final = {
    bytes.fromhex("550403"): "CN",
    bytes.fromhex("550407"): "L",
    bytes.fromhex("550408"): "ST",
    bytes.fromhex("55040a"): "O",
    bytes.fromhex("55040b"): "OU",
    bytes.fromhex("550406"): "C",
    bytes.fromhex("550409"): "STREET",
    bytes.fromhex("0992268993f22c640119"): "DC",
    bytes.fromhex("0992268993f22c640101"): "UID",
}
_STRING_TAGS: Final = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1"}


def oid_string(content: bytes) -> str:
    """Dotted form of an OBJECT IDENTIFIER's content octets."""
    if not content or content[-1] & 0x80:
        raise DerError("truncated OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def name_string(name: bytes) -> str:
    """An X.501 Name (a whole DER element) in RFC 4514 form, last RDN first."""
    start, end = _expect(name, 0, SEQUENCE, "Name")
    rdns = []
    for tag, _, rstart, rend in _children(name, start, end):
        if tag != SET:
            raise DerError("a relative distinguished name is not a SET")
        parts = []
        for atag, _, astart, aend in _children(name, rstart, rend):
            pair = _children(name, astart, aend) if atag == SEQUENCE else []
            if len(pair) != 2 or pair[0][0] != OID:
                raise DerError("a name attribute is not (OID, value)")
            oid = name[pair[0][2] : pair[0][3]]
            vtag, vstart, vcstart, vend = pair[1]
            key = _NAME_KEYS.get(oid) or oid_string(oid)
            encoding = _STRING_TAGS.get(vtag)
            if encoding is None and vtag == 0x1E:
                encoding = "utf-16-be"
            if encoding is None:
                parts.append(f"{key}=#{name[vstart:vend].hex()}")
                continue
            try:
                text = name[vcstart:vend].decode(encoding)
            except UnicodeDecodeError:
                raise DerError(f"a name attribute is not {encoding} text") from None
            parts.append(f"{key}={_escape_rdn_value(text)}")
        rdns.append("+".join(parts))
    return ",".join(reversed(rdns))


def display_name(name: bytes) -> str:
    """:func:`name_string` for logs and views, which must not fail over a name they show."""
    try:
        return name_string(name)
    except DerError as exc:
        return f"(unreadable name: {exc})"


def _escape_rdn_value(text: str) -> str:
    """RFC 4514 section 2.4 escaping of one attribute value."""
    out = []
    last = len(text) - 1
    for i, c in enumerate(text):
        if c in '\\",+;<>' or (i == 0 and c in "# ") or (i == last and c == " "):
            out.append("\\" + c)
        elif c == "\0":
            out.append("\\00")
        else:
            out.append(c)
    return "".join(out)


# -- PEM ----------------------------------------------------------------------------------


def pem_blocks(
    data: bytes | str, label: str = "CERTIFICATE", *, exclusive: bool = False
) -> list[bytes]:
    """The DER of every ``label`` PEM block in ``data``, in order.

    Raises :class:`DerError` when there is none, a block is not terminated or its
    base64 is broken. Text outside the blocks (comments, blocks of other labels)
    is ignored, as OpenSSL does, unless ``exclusive``: then ``data`` must be
    ``label`` blocks and nothing else (what a peer sends must not hold a second
    reading for another parser to find). One pass over the lines: linear time
    whatever the input.
    """
    raw = data.encode() if isinstance(data, str) else data
    out: list[bytes] = []
    lines = iter(raw.splitlines())
    for line in lines:
        stripped = line.strip()
        if not stripped.startswith(b"-----BEGIN "):
            if exclusive and stripped:
                raise DerError(f"text outside the {label} PEM blocks")
            continue
        found = stripped[len(b"-----BEGIN ") :]
        if not found.endswith(b"-----") or not _PEM_LABEL.fullmatch(found[:-5]):
            raise DerError(f"a malformed PEM BEGIN line: {stripped[:80]!r}")
        block_label = found[:-5]
        end = b"-----END " + block_label + b"-----"
        body: list[bytes] = []
        for inner in lines:
            inner = inner.strip()
            if inner == end:
                break
            if inner.startswith(b"-----"):
                raise DerError(f"a {block_label.decode()} PEM block is not terminated")
            body.append(inner)
        else:
            raise DerError(f"a {block_label.decode()} PEM block is not terminated")
        if block_label.decode() != label:
            if exclusive:
                raise DerError(f"a {block_label.decode()} PEM block where only {label} is allowed")
            continue
        try:
            out.append(base64.b64decode(b"".join(body), validate=True))
        except binascii.Error as exc:
            raise DerError(f"a {label} PEM block has broken base64: {exc}") from None
    if not out:
        raise DerError(f"no {label} PEM block found")
    return out


def to_pem(der: bytes, label: str = "CERTIFICATE") -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (
        label.encode(),
        b"\n".join(lines),
        label.encode(),
    )


# -- writing ------------------------------------------------------------------------------


def encode(tag: int, content: bytes) -> bytes:
    """One DER element."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def csr_info(subject_public_key_info: bytes, uri: str) -> bytes:
    """A PKCS #10 CertificationRequestInfo: empty subject, one critical URI SAN.

    The SAN is critical because the subject is empty (RFC 5280 4.2.1.6), and
    requested through the PKCS #9 extensionRequest attribute, as OpenSSL and
    the ``cryptography`` package write it.
    """
    try:
        uri_bytes = uri.encode("ascii")
    except UnicodeEncodeError:
        raise DerError(f"a URI SAN must be ASCII: {uri!r}") from None
    san = encode(SEQUENCE, encode(URI_NAME, uri_bytes))
    extension = encode(
        SEQUENCE,
        encode(OID, OID_SUBJECT_ALT_NAME) + encode(BOOLEAN, b"\xff") + encode(OCTET_STRING, san),
    )
    attribute = encode(
        SEQUENCE, encode(OID, OID_EXTENSION_REQUEST) + encode(SET, encode(SEQUENCE, extension))
    )
    return encode(
        SEQUENCE,
        encode(INTEGER, b"\x00")  # version 1
        + encode(SEQUENCE, b"")  # empty subject
        + subject_public_key_info
        + encode(EXPLICIT_0, attribute),  # [0] IMPLICIT SET OF Attribute
    )


def csr(info: bytes, ecdsa_sha256_signature: bytes) -> bytes:
    """The CertificationRequest: ``info`` signed with ECDSA over SHA-256 (DER signature)."""
    algorithm = encode(SEQUENCE, encode(OID, OID_ECDSA_WITH_SHA256))
    return encode(SEQUENCE, info + algorithm + encode(BIT_STRING, b"\x00" + ecdsa_sha256_signature))


__all__ = [
    "CertificateFacts",
    "DerError",
    "csr",
    "csr_info",
    "csr_uri_sans",
    "display_name",
    "encode",
    "name_string",
    "oid_string",
    "parse_certificate",
    "pem_blocks",
    "read_tlv",
    "to_pem",
]
