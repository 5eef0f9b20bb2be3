"""SocketStream and TlsSocketStream over real loopback TCP (and real mTLS)."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl

import pytest
import trio

from identity.errors import PeerIdentityError
from tests.underpass.hbone.support import CLIENT_ID, OTHER_ID, SERVER_ID, TD, Pki, listener
from underpass.hbone.errors import HalfCloseNotSupported
from underpass.hbone.headers import SocketAddress
from underpass.hbone.stream import (
    SocketStream,
    TlsSocketStream,
    accept_tls,
    connect_tcp,
    connect_tls,
)

pytestmark = pytest.mark.unit


async def tcp_pair() -> tuple[SocketStream, SocketStream]:
    sock = listener()
    try:
        address = SocketAddress.of("127.0.0.1", sock.getsockname()[1])
        client = await connect_tcp(address)
        await trio.lowlevel.wait_readable(sock)
        server, _ = sock.accept()
    finally:
        sock.close()
    return SocketStream(client), SocketStream(server)


async def tls_pair(pki: Pki) -> tuple[TlsSocketStream, TlsSocketStream]:
    sock = listener()
    result: dict[str, TlsSocketStream] = {}
    try:
        address = SocketAddress.of("127.0.0.1", sock.getsockname()[1])

        async def server_side() -> None:
            await trio.lowlevel.wait_readable(sock)
            conn, _ = sock.accept()
            result["server"] = await accept_tls(conn, pki.server_context(), TD)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            result["client"] = await connect_tls(address, pki.client_context(), {SERVER_ID})
    finally:
        sock.close()
    return result["client"], result["server"]


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some():
        chunks.append(data)
    return b"".join(chunks)


# -- plain TCP ------------------------------------------------------------------------------


async def test_tcp_half_close_both_ways() -> None:
    client, server = await tcp_pair()
    async with client, server:
        await client.send_all(b"request")
        await client.send_eof()
        await client.send_eof()  # idempotent
        assert await read_all(server) == b"request"
        # The other direction still works after the client's FIN.
        await server.send_all(b"response")
        await server.send_eof()
        assert await read_all(client) == b"response"
        with pytest.raises(trio.ClosedResourceError, match="send_eof"):
            await client.send_all(b"late")
    assert client.socket.fileno() == -1


async def test_tcp_receive_into_and_try_send() -> None:
    client, server = await tcp_pair()
    async with client, server:
        assert client.try_send(b"abc") == 3
        buffer = bytearray(16)
        count = await server.receive_into(buffer)
        assert buffer[:count] == b"abc"
        with pytest.raises(ValueError):
            await server.receive_into(bytearray())
        with pytest.raises(ValueError):
            await server.receive_some(0)


async def test_tcp_try_send_reports_a_full_socket() -> None:
    client, server = await tcp_pair()
    async with client, server:
        total = 0
        while (sent := client.try_send(bytes(1 << 20))) > 0:
            total += sent
        assert total > 0  # the kernel buffers filled up; nothing blocked


async def test_reset_is_a_tcp_rst() -> None:
    client, server = await tcp_pair()
    await server.send_all(b"x")  # unread by the client: a reset peer sees ECONNRESET
    await client.reset()
    with pytest.raises(trio.BrokenResourceError) as caught:
        while True:
            await server.receive_some()
            await server.send_all(b"y")
    assert isinstance(caught.value.__cause__, ConnectionResetError | BrokenPipeError)
    await server.aclose()


async def test_closed_and_busy_streams() -> None:
    client, server = await tcp_pair()
    woken: list[BaseException] = []

    async def pending_receive() -> None:
        try:
            await server.receive_some()
        except trio.ClosedResourceError as exc:
            woken.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pending_receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await server.receive_some()
        await server.aclose()  # wakes the pending receive with ClosedResourceError
    assert len(woken) == 1
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    await server.aclose()  # idempotent
    await client.aclose()


async def test_connect_refused() -> None:
    sock = listener()
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(OSError, match=r"connect to 127\.0\.0\.1"):
        await connect_tcp(SocketAddress.of("127.0.0.1", port))


async def test_connect_runs_prepare() -> None:
    sock = listener()
    seen: list[socket.socket] = []
    try:
        address = SocketAddress.of("127.0.0.1", sock.getsockname()[1])
        connected = await connect_tcp(address, prepare=seen.append)
        assert seen == [connected]
        connected.close()
    finally:
        sock.close()


# -- TLS ------------------------------------------------------------------------------------


async def test_tls_both_ways_and_identities(pki: Pki) -> None:
    client, server = await tls_pair(pki)
    assert client.peer == SERVER_ID
    assert server.peer == CLIENT_ID
    async with client, server:
        await client.send_all(b"hello")
        assert await server.receive_some() == b"hello"
        await server.send_all(memoryview(b"..world..")[2:7])
        assert await client.receive_some() == b"world"


async def test_tls_bulk_integrity(pki: Pki) -> None:
    client, server = await tls_pair(pki)
    payload = os.urandom(8 << 20)
    received = hashlib.sha256()
    count = 0

    async def sender() -> None:
        view = memoryview(payload)
        for start in range(0, len(view), 300_000):  # odd sizes, across record boundaries
            await client.send_all(view[start : start + 300_000])
        await client.aclose()  # close_notify: the server reads EOF

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        buffer = bytearray(256 * 1024)
        while n := await server.receive_into(buffer):
            assert n <= len(buffer)
            received.update(buffer[:n])
            count += n
    assert count == len(payload)
    assert received.digest() == hashlib.sha256(payload).digest()
    await server.aclose()


async def test_tls_reads_several_records_at_once(pki: Pki) -> None:
    client, server = await tls_pair(pki)
    async with client, server:
        # 13 TLS records; on loopback send() queues them at the receiver before it returns.
        await client.send_all(bytes(200_000))
        assert len(await server.receive_some()) == 200_000


async def test_tls_has_no_half_close(pki: Pki) -> None:
    client, server = await tls_pair(pki)
    async with client, server:
        with pytest.raises(HalfCloseNotSupported, match="END_STREAM"):
            await client.send_eof()
        # Nothing changed: both directions still work.
        await client.send_all(b"still")
        assert await server.receive_some() == b"still"


async def test_tls_wrong_server_identity_is_refused(pki: Pki) -> None:
    sock = listener()
    address = SocketAddress.of("127.0.0.1", sock.getsockname()[1])

    async def server_side() -> None:
        await trio.lowlevel.wait_readable(sock)
        conn, _ = sock.accept()
        # TLS 1.3: the server finishes before the client checks its identity.
        stream = await accept_tls(conn, pki.server_context(), TD)
        assert await stream.receive_some() == b""  # the client closed without a word
        await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            with pytest.raises(PeerIdentityError, match="payments"):
                await connect_tls(address, pki.client_context(), {OTHER_ID})
    finally:
        sock.close()


async def test_tls_handshake_with_a_stranger_fails(pki: Pki, tmp_path: object) -> None:
    from tests.underpass.hbone.support import make_pki

    stranger = make_pki(tmp_path)  # type: ignore[arg-type]
    sock = listener()
    address = SocketAddress.of("127.0.0.1", sock.getsockname()[1])

    async def server_side() -> None:
        await trio.lowlevel.wait_readable(sock)
        conn, _ = sock.accept()
        with pytest.raises(ssl.SSLError):
            await accept_tls(conn, pki.server_context(), TD)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            with pytest.raises(ssl.SSLError):
                await connect_tls(address, stranger.client_context(), {SERVER_ID})
    finally:
        sock.close()
