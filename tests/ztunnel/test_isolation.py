"""Mode 3's key isolation, in memory: a worker gets its own identity signed, nothing else."""

from __future__ import annotations

import datetime as dt
import re
import socket
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity import der, keys
from identity.ca import CertificateAuthority, build_csr, generate_workload_key, validate_csr
from identity.certmanager import LocalCaSigner
from identity.certs import identity_of
from identity.errors import IdentityNotPermitted, InvalidCsr
from identity.spiffe import SpiffeId
from ztunnel.isolation import SupervisorSigner, csr_identity, serve_signing, worker_command

pytestmark = pytest.mark.unit

MINE = SpiffeId("cluster.local", "shop", "cart")
OTHER = SpiffeId("cluster.local", "shop", "payments")
DAY = dt.timedelta(hours=24)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")


def csr_for(identity: SpiffeId) -> bytes:
    return build_csr(generate_workload_key(), identity)


async def test_a_worker_gets_its_own_identity_and_is_refused_any_other(
    ca: CertificateAuthority,
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    supervisor_end = trio.socket.from_stdlib_socket(ours)
    worker_end = trio.socket.from_stdlib_socket(theirs)
    signer = SupervisorSigner(worker_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_signing, supervisor_end, MINE, LocalCaSigner(ca))
        chain = await signer.sign(csr_for(MINE), MINE, DAY)
        assert identity_of(x509.load_pem_x509_certificate(chain[0].encode())) == MINE
        # Another service account's identity: refused, whatever the worker claims.
        with pytest.raises(IdentityNotPermitted, match=re.escape(f"asked for {OTHER.uri}")):
            await signer.sign(csr_for(OTHER), OTHER, DAY)
        with pytest.raises(IdentityNotPermitted):
            await signer.sign(csr_for(OTHER), MINE, DAY)  # lying about the CSR's identity
        # Garbage is refused too, and the channel keeps working afterwards.
        await worker_end.send(b"{not json")
        answer = await worker_end.recv(65536)
        assert b'"kind": "refused"' in answer
        chain = await signer.sign(csr_for(MINE), MINE, DAY)
        assert identity_of(x509.load_pem_x509_certificate(chain[0].encode())) == MINE
        worker_end.close()
        nursery.cancel_scope.cancel()
    supervisor_end.close()


def test_worker_command_line_carries_no_credential() -> None:
    base = ["python", "-m", "underpass.cli.main", "ztunnel", "--token-file", "/dev/null"]
    argv = worker_command(base)(MINE, 7, 8)
    assert argv[: len(base)] == base
    assert argv[len(base) :] == [
        "--worker-identity",
        MINE.uri,
        "--worker-zds-fd",
        "7",
        "--worker-signer-fd",
        "8",
    ]


def test_the_supervisor_reads_the_identity_a_csr_asks_for() -> None:
    # Both CSR writers: the CA side's (cryptography) and the data plane's (libcrypto).
    ours = csr_for(MINE)
    assert csr_identity(ours.decode()) == (MINE, ours)
    theirs = keys.new_key_and_csr(OTHER)[1]
    assert csr_identity(theirs.decode()) == (OTHER, theirs)


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([MINE.uri, "spiffe://cluster.local/ns/x/sa/y"], "exactly one URI SAN"),
        ([MINE.uri, "https://example.com"], "exactly one URI SAN"),
        (["spiffe://cluster.local/not-a-workload"], "not a workload SPIFFE ID"),
        ([], "exactly one URI SAN"),
    ],
)
def test_a_csr_that_is_not_for_one_workload_identity_is_refused(
    uris: list[str], reason: str
) -> None:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    csr = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    with pytest.raises(InvalidCsr, match=reason):
        csr_identity(csr.public_bytes(serialization.Encoding.PEM).decode())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_what_is_not_a_csr_is_refused(text: str) -> None:
    with pytest.raises(InvalidCsr, match="not one PEM certificate request"):
        csr_identity(text)


# -- a CSR with a second reading for another parser -----------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())
_SPKI = _KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
_MS_EXT_REQ = bytes.fromhex("2b06010401823702010e")  # 1.3.6.1.4.1.311.2.1.14, read by cryptography
VICTIM = SpiffeId("cluster.local", "kube-system", "admin")


def _san(uri: str) -> bytes:
    e = der.encode
    names = e(der.SEQUENCE, e(der.URI_NAME, uri.encode()))
    return e(
        der.SEQUENCE,
        e(der.OID, der.OID_SUBJECT_ALT_NAME) + e(der.BOOLEAN, b"\xff") + e(der.OCTET_STRING, names),
    )


def _attribute(oid: bytes, *values: list[bytes]) -> bytes:
    e = der.encode
    body = b"".join(e(der.SEQUENCE, b"".join(v)) for v in values)
    return e(der.SEQUENCE, e(der.OID, oid) + e(der.SET, body))


def _csr(*attributes: bytes, label: str = "CERTIFICATE REQUEST") -> str:
    e = der.encode
    info = e(
        der.SEQUENCE,
        e(der.INTEGER, b"\x00")
        + e(der.SEQUENCE, b"")
        + _SPKI
        + e(der.EXPLICIT_0, b"".join(attributes)),
    )
    signature = _KEY.sign(info, ec.ECDSA(hashes.SHA256()))
    return der.to_pem(der.csr(info, signature), label).decode()


_OWN = _csr(_attribute(der.OID_EXTENSION_REQUEST, [_san(MINE.uri)]))
_VICTIM = _csr(_attribute(der.OID_EXTENSION_REQUEST, [_san(VICTIM.uri)]))
SECOND_READINGS = {
    "msExtReq first": _csr(
        _attribute(_MS_EXT_REQ, [_san(VICTIM.uri)]),
        _attribute(der.OID_EXTENSION_REQUEST, [_san(MINE.uri)]),
    ),
    "two extensionRequests": _csr(
        _attribute(der.OID_EXTENSION_REQUEST, [_san(MINE.uri)]),
        _attribute(der.OID_EXTENSION_REQUEST, [_san(VICTIM.uri)]),
    ),
    "two SAN extensions": _csr(
        _attribute(der.OID_EXTENSION_REQUEST, [_san(MINE.uri), _san(VICTIM.uri)])
    ),
    "two Extensions values": _csr(
        _attribute(der.OID_EXTENSION_REQUEST, [_san(MINE.uri)], [_san(VICTIM.uri)])
    ),
    "NEW CERTIFICATE REQUEST block first": _csr(
        _attribute(der.OID_EXTENSION_REQUEST, [_san(VICTIM.uri)]), label="NEW CERTIFICATE REQUEST"
    )
    + _OWN,
    "victim block with a trailing space": _VICTIM.replace("REQUEST-----\n", "REQUEST----- \n", 1)
    + _OWN,
    "victim block ending in CR": _VICTIM.replace("REQUEST-----\n", "REQUEST-----\r", 1) + _OWN,
    "two blocks": _VICTIM + _OWN,
    "text before the block": "comment\n" + _OWN,
    "a huge message": _OWN + "\n" * 9000,
    "nested BEGIN lines": "-----BEGIN A-----\n" * 4000,
}


@pytest.mark.parametrize("name", sorted(SECOND_READINGS))
def test_a_csr_another_parser_could_read_otherwise_is_refused(name: str) -> None:
    with pytest.raises(InvalidCsr):
        csr_identity(SECOND_READINGS[name])


def test_the_ca_reads_exactly_what_the_supervisor_checked() -> None:
    asked, forwarded = csr_identity(_OWN)
    assert asked == MINE
    assert validate_csr(forwarded).identity == MINE
