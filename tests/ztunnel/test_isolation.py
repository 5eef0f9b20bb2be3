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

from identity import keys
from identity.ca import CertificateAuthority, build_csr, generate_workload_key
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
    assert csr_identity(csr_for(MINE).decode()) == MINE
    assert csr_identity(keys.new_key_and_csr(OTHER)[1].decode()) == OTHER


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
