"""Helpers for the HBONE tests: certificates, an in-memory core pair, wire parsing, servers."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from hyperframe.frame import Frame

from identity.ca import CertificateAuthority, build_csr, generate_workload_key, validate_csr
from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from identity.tls import TrustBundle, client_context, server_context
from underpass.hbone.protocol import Event, HboneClient, HboneServer, HboneSettings
from underpass.hbone.stream import SocketStream
from underpass.hbone.trio_adapter import Handler, serve_hbone_tls

TD = "cluster.local"
SERVER_ID = SpiffeId(TD, "shop", "cart")
CLIENT_ID = SpiffeId(TD, "shop", "frontend")
OTHER_ID = SpiffeId(TD, "shop", "payments")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Pki:
    ca: CertificateAuthority
    bundle: TrustBundle
    certs: dict[SpiffeId, WorkloadCertificate] = field(default_factory=dict)

    def cert(self, identity: SpiffeId) -> WorkloadCertificate:
        if identity not in self.certs:
            key = generate_workload_key()
            issued = self.ca.sign_workload(validate_csr(build_csr(key, identity)))
            self.certs[identity] = WorkloadCertificate.from_ca_response(
                identity, key, issued.chain_pem
            )
        return self.certs[identity]

    def server_context(self, identity: SpiffeId = SERVER_ID) -> ssl.SSLContext:
        return server_context(self.cert(identity), self.bundle)

    def client_context(self, identity: SpiffeId = CLIENT_ID) -> ssl.SSLContext:
        return client_context(self.cert(identity), self.bundle)


def make_pki(directory: Path) -> Pki:
    ca = CertificateAuthority.load_or_create(directory, TD)
    return Pki(ca, TrustBundle(ca.roots))


# -- the sans-IO pair -------------------------------------------------------------------


def parse_frames(data: bytes) -> list[Frame]:
    """The HTTP/2 frames in ``data`` (a client's stream may start with the preface)."""
    if data.startswith(PREFACE):
        data = data[len(PREFACE) :]
    frames: list[Frame] = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    return frames


class Pair:
    """An HboneClient and an HboneServer wired together in memory."""

    def __init__(
        self,
        *,
        client_settings: HboneSettings | None = None,
        server_settings: HboneSettings | None = None,
        local_ip: str | None = "10.0.0.1",
        waypoint: bool = False,
        start: bool = True,
    ) -> None:
        self.client = HboneClient(client_settings)
        self.server = HboneServer(local_ip, waypoint=waypoint, settings=server_settings)
        self.c2s = bytearray()  # everything the client sent
        self.s2c = bytearray()
        if start:
            self.client.start(0.0)
            self.server.start(0.0)
            self.pump()

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Move bytes until both are quiet; returns (client events, server events)."""
        client_events: list[Event] = []
        server_events: list[Event] = []
        while True:
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return client_events, server_events
            if to_server:
                self.c2s += to_server
                server_events += self.server.receive_data(to_server)
            if to_client:
                self.s2c += to_client
                client_events += self.client.receive_data(to_client)

    def client_frames(self) -> list[Frame]:
        """Frames the client sent since the last call."""
        frames = parse_frames(bytes(self.c2s))
        self.c2s.clear()
        return frames

    def server_frames(self) -> list[Frame]:
        frames = parse_frames(bytes(self.s2c))
        self.s2c.clear()
        return frames


# -- loopback servers -------------------------------------------------------------------


def listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def accept_loop(
    sock: socket.socket, serve: Callable[[socket.socket], Awaitable[None]]
) -> None:
    """Accept forever, one task per connection (cancel the nursery to stop); closes ``sock``."""
    try:
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                nursery.start_soon(serve, conn)
    finally:
        sock.close()


async def hbone_server(
    nursery: trio.Nursery, pki: Pki, handler: Handler, identity: SpiffeId = SERVER_ID
) -> int:
    """An HBONE server on 127.0.0.1 presenting ``identity``; returns its port."""
    sock = listener()
    context = pki.server_context(identity)

    async def serve(conn: socket.socket) -> None:
        await serve_hbone_tls(conn, context, TD, handler)

    nursery.start_soon(accept_loop, sock, serve)
    return int(sock.getsockname()[1])


async def echo_server(nursery: trio.Nursery) -> int:
    """A TCP echo server that half-closes after its peer does; returns its port."""
    sock = listener()

    async def serve(conn: socket.socket) -> None:
        stream = SocketStream(conn)
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    nursery.start_soon(accept_loop, sock, serve)
    return int(sock.getsockname()[1])
