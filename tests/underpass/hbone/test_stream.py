"""SocketStream, TlsBioStream and TlsSocketStream over real loopback TCP (and real mTLS).

The TLS tests run against both TLS streams (``tls_kind``), and across them:
ztunnel's outbound side may hold an ``ssl.SSLSocket`` while the inbound side
answers with the MemoryBIO stream.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio

from identity.errors import PeerIdentityError
from identity.tls import tls_client_socket, tls_server_socket
from tests.underpass.hbone.support import CLIENT_ID, OTHER_ID, SERVER_ID, TD, Pki, listener
from underpass.hbone.errors import HalfCloseNotSupported
from underpass.hbone.headers import SocketAddress
from underpass.hbone.stream import (
    SocketStream,
    TlsBioStream,
    TlsSocketStream,
    accept_tls,
    connect_tcp,
    connect_tls,
    start_tls_client,
    start_tls_server,
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


TlsStream = TlsBioStream | TlsSocketStream
TLS_KINDS = ["bio", "sslsocket"]


async def _client(kind: str, sock: socket.socket, pki: Pki) -> TlsStream:
    if kind == "bio":
        return await start_tls_client(sock, pki.client_context(), {SERVER_ID})
    tls, peer = await tls_client_socket(sock, pki.client_context(), {SERVER_ID})
    return TlsSocketStream(tls, peer)


async def _server(kind: str, sock: socket.socket, pki: Pki) -> TlsStream:
    if kind == "bio":
        return await start_tls_server(sock, pki.server_context(), TD)
    tls, peer = await tls_server_socket(sock, pki.server_context(), TD)
    return TlsSocketStream(tls, peer)


async def tls_pair(
    pki: Pki, client_kind: str = "bio", server_kind: str | None = None
) -> tuple[TlsStream, TlsStream]:
    """A connected (client, server) pair of the given kinds (the server's defaults to the
    client's)."""
    client_tcp, server_tcp = await tcp_pair()
    # Hand the raw sockets over: the TLS streams own them from here on.
    client_sock, server_sock = client_tcp.socket, server_tcp.socket
    result: dict[str, TlsStream] = {}

    async def server_side() -> None:
        result["server"] = await _server(server_kind or client_kind, server_sock, pki)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        result["client"] = await _client(client_kind, client_sock, pki)
    return result["client"], result["server"]


@pytest.fixture(params=TLS_KINDS)
def tls_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


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


# -- TLS: both implementations ------------------------------------------------------------


async def test_tls_both_ways_and_identities(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
    assert client.peer == SERVER_ID
    assert server.peer == CLIENT_ID
    async with client, server:
        await client.send_all(b"hello")
        assert await server.receive_some() == b"hello"
        await server.send_all(memoryview(b"..world..")[2:7])
        assert await client.receive_some() == b"world"


async def test_connect_and_accept_tls_make_bio_streams(pki: Pki) -> None:
    sock = listener()
    result: dict[str, TlsStream] = {}
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
    client, server = result["client"], result["server"]
    async with client, server:
        assert isinstance(client, TlsBioStream) and isinstance(server, TlsBioStream)
        assert (client.peer, server.peer) == (SERVER_ID, CLIENT_ID)
        assert client.ssl_object.version() == "TLSv1.3"
        assert client.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.parametrize(
    ("client_kind", "server_kind"),
    [("bio", "bio"), ("bio", "sslsocket"), ("sslsocket", "bio"), ("sslsocket", "sslsocket")],
)
async def test_tls_bulk_both_ways_at_once(pki: Pki, client_kind: str, server_kind: str) -> None:
    client, server = await tls_pair(pki, client_kind, server_kind)
    upstream, downstream = os.urandom(6 << 20), os.urandom(5 << 20)
    got: dict[str, bytes] = {}

    async def send(stream: TlsStream, payload: bytes, step: int) -> None:
        view = memoryview(payload)
        for start in range(0, len(view), step):  # odd sizes, across record boundaries
            await stream.send_all(view[start : start + step])

    async def receive(name: str, stream: TlsStream, size: int) -> None:
        chunks, count = [], 0
        while count < size:
            data = await stream.receive_some()
            assert data
            chunks.append(data)
            count += len(data)
        got[name] = b"".join(chunks)

    async with client, server, trio.open_nursery() as nursery:
        nursery.start_soon(send, client, upstream, 300_001)
        nursery.start_soon(send, server, downstream, 70_000)
        nursery.start_soon(receive, "server", server, len(upstream))
        nursery.start_soon(receive, "client", client, len(downstream))
    assert hashlib.sha256(got["server"]).digest() == hashlib.sha256(upstream).digest()
    assert hashlib.sha256(got["client"]).digest() == hashlib.sha256(downstream).digest()


async def test_tls_bulk_integrity_and_close_notify(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
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
    assert await server.receive_some() == b""  # and again
    await server.aclose()


async def test_tls_reads_several_records_at_once(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
    async with client, server:
        # 13 TLS records; on loopback send() queues them at the receiver before it returns.
        await client.send_all(bytes(200_000))
        assert len(await server.receive_some()) == 200_000


async def test_tls_small_reads_take_records_apart(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
    payload = os.urandom(40_000)  # three records
    async with client, server:
        await client.send_all(payload)
        pieces: list[bytes] = []
        while sum(len(piece) for piece in pieces) < len(payload):
            piece = await server.receive_some(7)
            assert 1 <= len(piece) <= 7
            pieces.append(piece)
        assert b"".join(pieces) == payload
        one = bytearray(1)
        await client.send_all(b"xy")
        assert await server.receive_into(one) == 1 and one == b"x"
        assert await server.receive_into(memoryview(one)) == 1 and one == b"y"


async def test_tls_eof_without_close_notify_ends_the_stream(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
    await client.send_all(b"last words")
    client.close_nowait()  # a bare TCP FIN, no close_notify
    assert await read_all(server) == b"last words"
    assert await server.receive_some() == b""
    await server.aclose()


async def test_tls_reset_is_a_tcp_rst(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
    await server.send_all(b"x")  # unread by the client: a reset peer sees ECONNRESET
    await client.reset()
    with pytest.raises(trio.BrokenResourceError) as caught:
        while True:
            await server.receive_some()
            await server.send_all(b"y")
    assert isinstance(caught.value.__cause__, OSError)
    await server.aclose()


async def test_tls_garbage_from_the_peer_breaks_the_stream(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
    async with client, server:
        # A record that does not decrypt, straight onto the TCP connection (past any TLS).
        os.write(client.socket.fileno(), b"\x17\x03\x03\x00\x20" + bytes(32))
        with pytest.raises(trio.BrokenResourceError) as caught:
            await server.receive_some()
        assert isinstance(caught.value.__cause__, ssl.SSLError)


async def test_tls_has_no_half_close(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
    async with client, server:
        with pytest.raises(HalfCloseNotSupported, match="END_STREAM"):
            await client.send_eof()
        # Nothing changed: both directions still work.
        await client.send_all(b"still")
        assert await server.receive_some() == b"still"


async def test_tls_closed_and_busy_streams(pki: Pki, tls_kind: str) -> None:
    client, server = await tls_pair(pki, tls_kind)
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
        await server.receive_into(bytearray(1))
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    await server.aclose()  # idempotent
    await client.aclose()


# -- TLS: the batched MemoryBIO stream's own rules -------------------------------------------


def _fill(stream: TlsStream, chunk: bytes) -> tuple[bytearray, int]:
    """``try_send`` until a short count: (what counts as sent, that short count).

    After it, ``chunk[count:]`` is still the caller's to send (it may be
    encrypted and queued already: the next write must start with it).
    """
    sent = bytearray()
    while True:
        count = stream.try_send(chunk)
        sent += chunk[:count]
        if count < len(chunk):
            return sent, count


async def test_bio_short_try_send_then_the_rest_arrives_in_order(pki: Pki) -> None:
    client, server = await tls_pair(pki, "bio")
    chunk = os.urandom(100_000)
    async with client, server:
        sent, count = _fill(client, chunk)
        rest = chunk[count:]
        expected = bytes(sent) + rest + b"tail"
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(expected):
                got.extend(await server.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await client.send_all(rest)
            await client.send_all(b"tail")
        assert bytes(got) == expected


async def test_bio_retried_try_send_skips_what_it_encrypted(pki: Pki) -> None:
    client, server = await tls_pair(pki, "bio")
    chunk = os.urandom(100_000)
    async with client, server:
        sent, count = _fill(client, chunk)
        got = bytearray()
        rest = chunk[count:]
        # Drain the receiver until a retry of the very same rest goes through.
        while True:
            got.extend(await server.receive_some())
            retried = client.try_send(rest)
            sent += rest[:retried]
            rest = rest[retried:]
            if not rest:
                break
        while len(got) < len(sent):
            got.extend(await server.receive_some())
        assert bytes(got) == bytes(sent)
        assert bytes(sent).endswith(chunk[-1000:])


async def test_bio_cancelled_send_all_leaves_the_stream_broken(pki: Pki) -> None:
    client, server = await tls_pair(pki, "bio")
    async with client, server:
        with trio.CancelScope() as scope:

            async def cancel_when_blocked() -> None:
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_when_blocked)
                await client.send_all(bytes(64 << 20))  # more than the socket buffers hold
        assert scope.cancelled_caught
        with trio.fail_after(10):  # a regression would block on the full socket instead
            with pytest.raises(trio.BrokenResourceError, match="interrupted"):
                await client.send_all(b"more")
        with pytest.raises(trio.BrokenResourceError, match="interrupted"):
            client.try_send(b"more")


async def test_bio_handshake_with_garbage_fails(pki: Pki) -> None:
    client, server = await tcp_pair()
    await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ssl.SSLError):
        await start_tls_server(server.socket, pki.server_context(), TD)
    assert server.socket.fileno() == -1  # taken over and closed
    answer = await read_all(client)
    assert answer == b"" or answer[0] == 21  # EOF or a TLS alert record, nothing else
    await client.aclose()


async def test_bio_handshake_cancelled_closes_the_socket(pki: Pki) -> None:
    client, server = await tcp_pair()
    sock = server.socket
    with trio.CancelScope() as scope:

        async def cancel_when_blocked() -> None:
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_blocked)
            await start_tls_server(sock, pki.server_context(), TD)  # the client never speaks
    assert scope.cancelled_caught
    assert sock.fileno() == -1
    await client.aclose()


# -- TLS: identities (connect_tls / accept_tls) ------------------------------------------------


async def _identity_check(
    pki: Pki, client_side: Callable[[SocketAddress], Awaitable[object]], server_ok: bool
) -> None:
    sock = listener()
    address = SocketAddress.of("127.0.0.1", sock.getsockname()[1])

    async def server_side() -> None:
        await trio.lowlevel.wait_readable(sock)
        conn, _ = sock.accept()
        if not server_ok:
            with pytest.raises(ssl.SSLError):
                await accept_tls(conn, pki.server_context(), TD)
            return
        # TLS 1.3: the server finishes before the client checks its identity.
        stream = await accept_tls(conn, pki.server_context(), TD)
        assert await stream.receive_some() == b""  # the client closed without a word
        await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            await client_side(address)
    finally:
        sock.close()


async def test_tls_wrong_server_identity_is_refused(pki: Pki) -> None:
    async def client_side(address: SocketAddress) -> None:
        with pytest.raises(PeerIdentityError, match="payments"):
            await connect_tls(address, pki.client_context(), {OTHER_ID})

    await _identity_check(pki, client_side, server_ok=True)


async def test_tls_handshake_with_a_stranger_fails(pki: Pki, tmp_path: object) -> None:
    from tests.underpass.hbone.support import make_pki

    stranger = make_pki(tmp_path)  # type: ignore[arg-type]

    async def client_side(address: SocketAddress) -> None:
        with pytest.raises(ssl.SSLError):
            await connect_tls(address, stranger.client_context(), {SERVER_ID})

    await _identity_check(pki, client_side, server_ok=False)
