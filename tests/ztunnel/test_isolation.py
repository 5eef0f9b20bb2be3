"""Mode 3's key isolation, in memory: a worker gets its own identity signed, nothing else."""

from __future__ import annotations

import datetime as dt
import re
import socket
from pathlib import Path

import pytest
import trio
from cryptography import x509

from identity.ca import CertificateAuthority, build_csr, generate_workload_key
from identity.certmanager import LocalCaSigner
from identity.certs import identity_of
from identity.errors import IdentityNotPermitted
from identity.spiffe import SpiffeId
from ztunnel.isolation import SupervisorSigner, serve_signing, worker_command

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
