"""The trio adapters and the pool, over real loopback TCP with real mTLS certificates."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from identity.errors import PeerIdentityError
from identity.spiffe import SpiffeId
from tests.underpass.hbone.support import (
    CLIENT_ID,
    OTHER_ID,
    SERVER_ID,
    TD,
    Pki,
    accept_loop,
    echo_server,
    hbone_server,
    listener,
    parse_frames,
)
from underpass.hbone.errors import (
    ConnectFailed,
    ConnectionLost,
    ErrorCodes,
    LocalProtocolError,
    PolicyDenied,
    StreamReset,
    TunnelRefused,
    UpstreamUnavailable,
)
from underpass.hbone.headers import Baggage, ConnectRequest, SocketAddress
from underpass.hbone.pool import HbonePool, PoolKey, open_hbone_pool, tls_connector
from underpass.hbone.stream import SocketStream, connect_tcp, connect_tls
from underpass.hbone.trio_adapter import (
    HandlerResult,
    HboneServerConnection,
    InboundRequest,
    TunnelStream,
    open_hbone_connection,
    serve_hbone_tls,
)

pytestmark = pytest.mark.unit

LOOPBACK = "127.0.0.1"
Handler = Callable[[InboundRequest], Awaitable[HandlerResult]]


async def relay_to(request: InboundRequest) -> HandlerResult:
    """The ztunnel inbound handler in miniature: connect to the authority."""
    return SocketStream(await connect_tcp(request.authority))


def pool_key(port: int, expected: frozenset[SpiffeId] = frozenset({SERVER_ID})) -> PoolKey:
    return PoolKey(CLIENT_ID, expected, SocketAddress.of(LOOPBACK, port).ip, port)


def connector(pki: Pki) -> Callable[[PoolKey], Awaitable[trio.abc.Stream]]:
    return tls_connector(lambda identity: pki.client_context(identity))


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some():
        chunks.append(data)
    return b"".join(chunks)


# -- one tunnel -----------------------------------------------------------------------------


async def reverse_server(nursery: trio.Nursery, seen: list[str]) -> int:
    """Reads until EOF (the tunnel's half-close), then answers and half-closes itself."""
    sock = listener()

    async def serve(conn: socket.socket) -> None:
        stream = SocketStream(conn)
        data = await read_all(stream)
        seen.append("eof")
        await stream.send_all(data[::-1])
        await stream.send_eof()
        assert await stream.receive_some() == b""
        await stream.aclose()

    nursery.start_soon(accept_loop, sock, serve)
    return int(sock.getsockname()[1])


async def test_a_tunnel_carries_data_both_ways_with_half_close(pki: Pki) -> None:
    requests: list[InboundRequest] = []

    async def handler(request: InboundRequest) -> HandlerResult:
        requests.append(request)
        return await relay_to(request)

    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        upstream = await reverse_server(nursery, seen)
        port = await hbone_server(nursery, pki, handler)
        transport = await connect_tls(
            SocketAddress.of(LOOPBACK, port), pki.client_context(), {SERVER_ID}
        )
        async with open_hbone_connection(transport) as connection:
            request = ConnectRequest(
                SocketAddress.of(LOOPBACK, upstream),
                client=SocketAddress.of("10.1.1.1", 5555),
                baggage=Baggage(namespace="shop", service_name="frontend"),
            )
            tunnel = await connection.open_tunnel(request)
            assert tunnel.peer == SERVER_ID
            await tunnel.send_all(b"hello ")
            await tunnel.send_all(b"world")
            assert seen == []  # the upstream has not seen EOF: the tunnel is open
            await tunnel.send_eof()
            assert await read_all(tunnel) == b"dlrow olleh"
            assert seen == ["eof"]
            await tunnel.aclose()
        nursery.cancel_scope.cancel()
    (request_seen,) = requests
    assert request_seen.peer == CLIENT_ID
    assert request_seen.client == SocketAddress.of("10.1.1.1", 5555)
    assert request_seen.info.baggage == Baggage(namespace="shop", service_name="frontend")
    assert str(request_seen.local_ip) == LOOPBACK


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (401, 401),
        (PolicyDenied("deny policy ns/deny-all"), 401),
        (UpstreamUnavailable("no local workload"), 503),
        (OSError(111, "Connection refused"), 503),
        (RuntimeError("a bug in the handler"), 503),
        (200, 503),  # not a refusal status: fail closed
        ("nonsense", 503),
    ],
)
async def test_refusals(pki: Pki, answer: object, status: int) -> None:
    async def handler(request: InboundRequest) -> HandlerResult:
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[return-value]

    async with trio.open_nursery() as nursery:
        port = await hbone_server(nursery, pki, handler)
        transport = await connect_tls(
            SocketAddress.of(LOOPBACK, port), pki.client_context(), {SERVER_ID}
        )
        async with open_hbone_connection(transport) as connection:
            with pytest.raises(TunnelRefused) as caught:
                await connection.open_tunnel(SocketAddress.of(LOOPBACK, 9))
            assert caught.value.status == status
            # The connection is still fine for the next tunnel.
            assert connection.available_streams == 100
            assert connection.active_streams == 0
        nursery.cancel_scope.cancel()


async def test_authority_for_another_ip_is_refused_with_400(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        port = await hbone_server(nursery, pki, relay_to)
        transport = await connect_tls(
            SocketAddress.of(LOOPBACK, port), pki.client_context(), {SERVER_ID}
        )
        async with open_hbone_connection(transport) as connection:
            with pytest.raises(TunnelRefused) as caught:
                await connection.open_tunnel(SocketAddress.of("127.0.0.2", 80))
            assert caught.value.status == 400
        nursery.cancel_scope.cancel()


async def test_upstream_connect_failure_is_503(pki: Pki) -> None:
    closed = listener()
    dead_port = closed.getsockname()[1]
    closed.close()
    async with trio.open_nursery() as nursery:
        port = await hbone_server(nursery, pki, relay_to)
        transport = await connect_tls(
            SocketAddress.of(LOOPBACK, port), pki.client_context(), {SERVER_ID}
        )
        async with open_hbone_connection(transport) as connection:
            with pytest.raises(TunnelRefused) as caught:
                await connection.open_tunnel(SocketAddress.of(LOOPBACK, dead_port))
            assert caught.value.status == 503
        nursery.cancel_scope.cancel()


async def test_upstream_reset_resets_the_tunnel(pki: Pki) -> None:
    sock = listener()

    async def rude(conn: socket.socket) -> None:
        stream = SocketStream(conn)
        await stream.receive_some()
        await stream.reset()  # TCP RST

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, sock, rude)
        port = await hbone_server(nursery, pki, relay_to)
        transport = await connect_tls(
            SocketAddress.of(LOOPBACK, port), pki.client_context(), {SERVER_ID}
        )
        async with open_hbone_connection(transport) as connection:
            tunnel = await connection.open_tunnel(SocketAddress.of(LOOPBACK, sock.getsockname()[1]))
            await tunnel.send_all(b"hi")
            with pytest.raises(trio.BrokenResourceError) as caught:
                await read_all(tunnel)
            cause = caught.value.__cause__
            assert isinstance(cause, StreamReset)
            assert cause.error_code == ErrorCodes.CONNECT_ERROR
            await tunnel.aclose()
            # Only that tunnel: the connection goes on.
            assert not connection.closed
        nursery.cancel_scope.cancel()


async def test_tunnel_reset_resets_the_upstream(pki: Pki) -> None:
    sock = listener()
    upstream_errors: list[BaseException] = []
    done = trio.Event()

    async def patient(conn: socket.socket) -> None:
        stream = SocketStream(conn)
        try:
            await read_all(stream)
        except trio.BrokenResourceError as exc:
            upstream_errors.append(exc)
        finally:
            await stream.aclose()
            done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, sock, patient)
        port = await hbone_server(nursery, pki, relay_to)
        transport = await connect_tls(
            SocketAddress.of(LOOPBACK, port), pki.client_context(), {SERVER_ID}
        )
        async with open_hbone_connection(transport) as connection:
            tunnel = await connection.open_tunnel(SocketAddress.of(LOOPBACK, sock.getsockname()[1]))
            await tunnel.send_all(b"x" * 1000)
            await tunnel.reset()
            with trio.fail_after(10):
                await done.wait()
        nursery.cancel_scope.cancel()
    assert len(upstream_errors) == 1
    assert isinstance(upstream_errors[0].__cause__, ConnectionResetError)


async def test_integrity_of_a_256_mib_transfer(pki: Pki) -> None:
    """256 MiB of random-ish bytes through client -> HBONE (TLS + h2) -> server -> sink."""
    size = 256 * 1024 * 1024
    block = os.urandom(1024 * 1024 + 7)  # odd size: frames and records never line up
    expected = hashlib.sha256()
    sent = 0
    sock = listener()

    async def sink(conn: socket.socket) -> None:
        stream = SocketStream(conn)
        digest = hashlib.sha256()
        count = 0
        buffer = bytearray(256 * 1024)
        while n := await stream.receive_into(buffer):
            digest.update(memoryview(buffer)[:n])
            count += n
        await stream.send_all(f"{count} {digest.hexdigest()}".encode())
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_loop, sock, sink)
        port = await hbone_server(nursery, pki, relay_to)
        transport = await connect_tls(
            SocketAddress.of(LOOPBACK, port), pki.client_context(), {SERVER_ID}
        )
        async with open_hbone_connection(transport) as connection:
            tunnel = await connection.open_tunnel(SocketAddress.of(LOOPBACK, sock.getsockname()[1]))
            view = memoryview(block)
            while sent < size:
                chunk = view[: min(len(view), size - sent)]
                expected.update(chunk)
                await tunnel.send_all(chunk)
                sent += len(chunk)
            await tunnel.send_eof()
            answer = await read_all(tunnel)
            await tunnel.aclose()
        nursery.cancel_scope.cancel()
    assert answer.decode() == f"{size} {expected.hexdigest()}"


# -- the pool -------------------------------------------------------------------------------


async def echo_once(pool: HbonePool, key: PoolKey, upstream: int, payload: bytes) -> None:
    tunnel = await pool.open_tunnel(key, SocketAddress.of(LOOPBACK, upstream))
    async with tunnel:
        await tunnel.send_all(payload)
        await tunnel.send_eof()
        assert await read_all(tunnel) == payload


async def test_many_concurrent_tunnels_share_one_pooled_connection(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await echo_server(nursery)
        port = await hbone_server(nursery, pki, relay_to)
        key = pool_key(port)
        async with open_hbone_pool(connector(pki)) as pool:
            async with trio.open_nursery() as callers:
                for i in range(60):
                    callers.start_soon(echo_once, pool, key, upstream, os.urandom(1000 + i))
            assert pool.dials == 1  # 60 callers, one dial
            assert len(pool.connections(key)) == 1
        nursery.cancel_scope.cancel()


async def test_the_101st_tunnel_opens_a_second_connection(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await echo_server(nursery)
        port = await hbone_server(nursery, pki, relay_to)
        key = pool_key(port)
        async with open_hbone_pool(connector(pki)) as pool:
            tunnels: list[TunnelStream] = []

            async def open_one() -> None:
                tunnels.append(await pool.open_tunnel(key, SocketAddress.of(LOOPBACK, upstream)))

            async with trio.open_nursery() as callers:
                for _ in range(100):
                    callers.start_soon(open_one)
            assert (pool.dials, len(pool.connections(key))) == (1, 1)
            await open_one()
            assert (pool.dials, len(pool.connections(key))) == (2, 2)
            assert sorted(c.active_streams for c in pool.connections(key)) == [1, 100]
            # Every tunnel works, on either connection.
            for tunnel in (tunnels[0], tunnels[-1]):
                await tunnel.send_all(b"ping")
                assert await tunnel.receive_some() == b"ping"
            for tunnel in tunnels:
                await tunnel.aclose()
            # A freed slot is reused rather than dialling again.
            await open_one()
            assert pool.dials == 2
            await tunnels[-1].aclose()
        nursery.cancel_scope.cancel()


async def test_the_wrong_server_identity_is_refused(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        port = await hbone_server(nursery, pki, relay_to)
        async with open_hbone_pool(connector(pki)) as pool:
            with pytest.raises(ConnectFailed, match="payments") as caught:
                await pool.open_tunnel(
                    pool_key(port, frozenset({OTHER_ID})), SocketAddress.of(LOOPBACK, 9)
                )
            assert isinstance(caught.value.__cause__, PeerIdentityError)
            assert pool.connections(pool_key(port, frozenset({OTHER_ID}))) == []
        nursery.cancel_scope.cancel()


def test_pool_keys() -> None:
    key = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), "::ffff:10.0.0.1")  # type: ignore[arg-type]
    assert key == PoolKey(CLIENT_ID, frozenset({SERVER_ID}), SocketAddress.of("10.0.0.1", 1).ip)
    assert str(key.address) == "10.0.0.1:15008"
    with pytest.raises(LocalProtocolError, match="at least one"):
        PoolKey(CLIENT_ID, frozenset(), SocketAddress.of("10.0.0.1", 1).ip)
    with pytest.raises(LocalProtocolError):
        PoolKey(CLIENT_ID, frozenset({SERVER_ID}), "nowhere")  # type: ignore[arg-type]


async def test_dial_failure_reaches_every_waiter(pki: Pki) -> None:
    closed = listener()
    port = closed.getsockname()[1]
    closed.close()
    errors: list[BaseException] = []
    async with open_hbone_pool(connector(pki)) as pool:

        async def caller() -> None:
            try:
                await pool.open_tunnel(pool_key(port), SocketAddress.of(LOOPBACK, 9))
            except ConnectFailed as exc:
                errors.append(exc)

        async with trio.open_nursery() as callers:
            for _ in range(5):
                callers.start_soon(caller)
        assert pool.dials == 1
    assert len(errors) == 5
    assert all(isinstance(e.__cause__, ConnectionRefusedError) for e in errors)
    assert len({id(e) for e in errors}) == 5  # one exception object per caller


# -- drain, protocol errors ------------------------------------------------------------------


async def test_server_drain_moves_new_tunnels_to_a_new_connection(pki: Pki) -> None:
    servers: list[HboneServerConnection] = []

    async def remember(request: InboundRequest) -> HandlerResult:
        return await relay_to(request)

    sock = listener()
    context = pki.server_context()

    async def serve(conn: socket.socket) -> None:
        from underpass.hbone.stream import accept_tls

        transport = await accept_tls(conn, context, TD)
        server = HboneServerConnection(transport, remember)
        servers.append(server)
        await server.run()

    async with trio.open_nursery() as nursery:
        upstream = await echo_server(nursery)
        nursery.start_soon(accept_loop, sock, serve)
        key = pool_key(sock.getsockname()[1])
        async with open_hbone_pool(connector(pki)) as pool:
            old = await pool.open_tunnel(key, SocketAddress.of(LOOPBACK, upstream))
            draining = trio.Event()

            async def drain() -> None:
                await servers[0].drain(timeout=30)
                draining.set()

            nursery.start_soon(drain)
            # Until drain() parks: its GOAWAY is on the wire. The next tunnel then goes
            # to a new connection, whether the client read the GOAWAY before opening
            # it or only after the server refused it (REFUSED_STREAM: the pool retries).
            await trio.testing.wait_all_tasks_blocked()
            # The old tunnel still works; new ones go to a new connection.
            await old.send_all(b"old")
            assert await old.receive_some() == b"old"
            await echo_once(pool, key, upstream, b"new")
            assert pool.dials == 2
            await old.aclose()
            with trio.fail_after(10):
                await draining.wait()
            assert len(pool.connections(key)) == 1
        nursery.cancel_scope.cancel()


async def test_garbage_gets_a_goaway(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        port = await hbone_server(nursery, pki, relay_to)
        transport = await connect_tls(
            SocketAddress.of(LOOPBACK, port), pki.client_context(), {SERVER_ID}
        )
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        bad_window_update = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\xff\xff\xff\xff"
        await transport.send_all(preface + bad_window_update)
        received = b""
        with trio.fail_after(10):
            while data := await transport.receive_some():
                received += data
        await transport.aclose()
        frames = parse_frames(received)
        from hyperframe.frame import GoAwayFrame

        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert goaways and goaways[-1].error_code != 0
        nursery.cancel_scope.cancel()


async def test_a_failed_handshake_is_logged_and_closed(pki: Pki, tmp_path: object) -> None:
    from tests.underpass.hbone.support import make_pki

    stranger = make_pki(tmp_path)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await hbone_server(nursery, pki, relay_to)
        with pytest.raises(OSError):  # ssl.SSLError or a reset: the server refused us
            transport = await connect_tls(
                SocketAddress.of(LOOPBACK, port), stranger.client_context(), {SERVER_ID}
            )
            await transport.receive_some()
        nursery.cancel_scope.cancel()


async def test_serve_hbone_tls_survives_a_silent_client(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = socket.socketpair()
    with a:
        with trio.move_on_after(60) as scope:
            await serve_hbone_tls(b, pki.server_context(), TD, relay_to, waypoint=True)
        assert not scope.cancelled_caught  # gave up after the 10 s handshake timeout
        assert b.fileno() == -1


# -- generic trio streams, keepalive and idle (virtual time) -----------------------------------


async def memory_hbone(
    nursery: trio.Nursery, handler: Callable[[InboundRequest], Awaitable[HandlerResult]]
) -> trio.abc.Stream:
    """A client transport whose far end is an HBONE server, all in memory."""
    client_side, server_side = trio.testing.memory_stream_pair()
    server = HboneServerConnection(server_side, handler, local_ip="10.0.0.1")
    nursery.start_soon(server.run)
    return client_side


async def echo_tunnel(request: InboundRequest) -> HandlerResult:
    async def echo(tunnel: TunnelStream) -> None:
        while data := await tunnel.receive_some():
            await tunnel.send_all(data)
        await tunnel.send_eof()

    return echo


async def test_a_tunnel_over_any_trio_stream(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        transport = await memory_hbone(nursery, echo_tunnel)
        async with open_hbone_connection(transport) as connection:
            tunnel = await connection.open_tunnel(SocketAddress.of("10.0.0.1", 80))
            payload = os.urandom(10 * 1024 * 1024)

            async def send() -> None:
                await tunnel.send_all(payload)
                await tunnel.send_eof()

            nursery.start_soon(send)
            assert await read_all(tunnel) == payload
            await tunnel.aclose()
        nursery.cancel_scope.cancel()


async def test_pings_keep_a_live_connection(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        transport = await memory_hbone(nursery, echo_tunnel)
        async with open_hbone_connection(transport) as connection:
            await trio.sleep(300)  # 30 pings answered
            assert not connection.closed
            tunnel = await connection.open_tunnel(SocketAddress.of("10.0.0.1", 80))
            await tunnel.aclose()
        nursery.cancel_scope.cancel()


async def test_an_unanswered_ping_closes_after_20_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    pings: list[float] = []

    async def black_hole() -> None:
        # Answers the handshake (SETTINGS) only, then swallows everything.
        from underpass.hbone.protocol import HboneServer

        core = HboneServer("10.0.0.1")
        core.start()
        await server_side.send_all(core.data_to_send())
        while data := await server_side.receive_some():
            if b"\x00\x00\x08\x06\x00" in data:  # a PING frame header
                pings.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(black_hole)
        start = trio.current_time()
        async with open_hbone_connection(client_side) as connection:
            tunnel_error: list[BaseException] = []
            with trio.fail_after(60):
                await connection._done.wait()
            assert isinstance(connection.failure, ConnectionLost)
            assert type(connection.failure).__name__ == "KeepaliveTimeout"
            assert trio.current_time() - start == pytest.approx(30, abs=1)
            assert pings and pings[0] - start == pytest.approx(10, abs=0.5)
            assert not tunnel_error
        nursery.cancel_scope.cancel()


async def test_idle_connections_leave_the_pool_after_5_minutes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:

        async def connect(key: PoolKey) -> trio.abc.Stream:
            return await memory_hbone(nursery, echo_tunnel)

        key = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), SocketAddress.of("10.0.0.1", 1).ip)
        async with open_hbone_pool(connect) as pool:
            tunnel = await pool.open_tunnel(key, SocketAddress.of("10.0.0.1", 80))
            await trio.sleep(600)  # busy for 10 minutes: not idle
            assert len(pool.connections(key)) == 1
            await tunnel.aclose()
            await trio.sleep(299)
            assert len(pool.connections(key)) == 1
            await trio.sleep(2)
            assert pool.connections(key) == []
            # The next tunnel dials again.
            tunnel = await pool.open_tunnel(key, SocketAddress.of("10.0.0.1", 80))
            assert pool.dials == 2
            await tunnel.aclose()
        nursery.cancel_scope.cancel()


async def test_connect_timeout_is_10_seconds_and_shared(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dials: list[float] = []

    async def hang(key: PoolKey) -> trio.abc.Stream:
        dials.append(trio.current_time())
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    key = PoolKey(CLIENT_ID, frozenset({SERVER_ID}), SocketAddress.of("10.0.0.1", 1).ip)
    errors: list[BaseException] = []
    async with open_hbone_pool(hang) as pool:
        start = trio.current_time()

        async def caller() -> None:
            try:
                await pool.open_tunnel(key, SocketAddress.of("10.0.0.1", 80))
            except ConnectFailed as exc:
                errors.append(exc)

        async with trio.open_nursery() as callers:
            for _ in range(10):
                callers.start_soon(caller)
        assert trio.current_time() - start == pytest.approx(10)
    assert len(dials) == 1
    assert len(errors) == 10
    assert all(type(e).__name__ == "ConnectTimeout" for e in errors)


async def test_open_tunnel_timeout_resets_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(request: InboundRequest) -> HandlerResult:
        await trio.sleep(1000)
        return 503

    async with trio.open_nursery() as nursery:
        transport = await memory_hbone(nursery, slow)
        async with open_hbone_connection(transport) as connection:
            with pytest.raises(trio.TooSlowError):
                await connection.open_tunnel(SocketAddress.of("10.0.0.1", 80), timeout=5)
            assert connection.active_streams == 0
            assert connection.available_streams == 100
        nursery.cancel_scope.cancel()
