"""underpass.grpclite: the sans-IO core in memory, the trio client against real grpcio servers.

In memory, the server side is ``h2`` itself (a server connection driven by the
test). Over loopback the peers are real grpcio servers: the CA
(:class:`identity.server.CaServer`), the discovery server (Delta ADS) and a
small generic grpcio server with test methods; misbehaving peers are raw
sockets written here. Nothing sleeps: waits are on events, bounded by
``trio.fail_after``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trio
import yaml
from cryptography.hazmat.primitives import serialization
from envoy.service.discovery.v3 import discovery_pb2
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from prometheus_client import CollectorRegistry

from discovery.model import Model, Namespace, Pod
from discovery.registry import MemoryRegistry
from discovery.server import DiscoveryServer
from identity.auth import Authorizer, LabTokenAuthenticator
from identity.ca import CertificateAuthority, build_csr, generate_workload_key
from identity.proto import ca_pb2
from identity.server import CaServer
from identity.spiffe import SpiffeId
from underpass import grpclite
from underpass.grpclite import (
    CallEnded,
    ConnectionEnded,
    ConnectionSettings,
    GrpcError,
    GrpcProtocol,
    MessageReader,
    MessageReceived,
    PingAnswered,
    ResponseStarted,
    StatusCode,
    Target,
    TlsSettings,
)
from underpass.hbone.stream import TlsSocketStream
from underpass.xds.client import DeltaClient, ResourcesReceived
from underpass.xds.node import build_node
from underpass.xds.types import ADDRESS_TYPE_URL, DELTA_METHOD_PATH, WORKLOAD_TYPE_URLS

pytestmark = pytest.mark.unit

TD = "cluster.local"
WAIT = 10.0
CREATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
SLEEP = SpiffeId(TD, "demo", "sleep")
HTTPBIN = SpiffeId(TD, "demo", "httpbin")
TOKENS = {
    "sleep": "tok-sleep-0123456789abcdef",
    "ztunnel": "tok-ztunnel-0123456789abcdef",
}


def write_tokens(path: Path) -> Path:
    entries = [
        {
            "token": TOKENS["sleep"],
            "namespace": "demo",
            "service_account": "sleep",
            "pod": "sleep-1",
            "node": "node-1",
        },
        {
            "token": TOKENS["ztunnel"],
            "namespace": "istio-system",
            "service_account": "ztunnel",
            "pod": "ztunnel-1",
            "node": "node-1",
        },
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(entries))
    return path


# == sans-IO ===================================================================================


def test_messages_split_anywhere_come_out_whole() -> None:
    payloads = [b"", b"a", b"hello" * 100, bytes(range(256))]
    wire = b"".join(grpclite.encode_message(p) for p in payloads)
    for cut in range(len(wire) + 1):
        reader = MessageReader()
        got = reader.feed(wire[:cut]) + reader.feed(wire[cut:])
        assert got == payloads
        assert reader.buffered == 0
    # Byte by byte, the partial message is what is held.
    reader = MessageReader()
    got = []
    for i in range(len(wire)):
        got += reader.feed(wire[i : i + 1])
    assert got == payloads


def test_a_message_reader_fails_closed() -> None:
    with pytest.raises(GrpcError) as info:
        MessageReader(max_size=10).feed(b"\x00\x00\x00\x00\x0b")  # 11 bytes announced
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED and not info.value.remote
    with pytest.raises(GrpcError, match="compressed") as info:
        MessageReader().feed(b"\x01\x00\x00\x00\x01x")
    assert info.value.code is StatusCode.INTERNAL
    with pytest.raises(GrpcError, match="flags 0x80"):
        MessageReader().feed(b"\x80\x00\x00\x00\x00")


def test_timeouts_encode_as_grpc_wants() -> None:
    assert grpclite.encode_timeout(1.5) == "1500000u"
    assert grpclite.encode_timeout(0.000_000_1) == "100n"
    assert grpclite.encode_timeout(1e-12) == "1n"  # rounded up, never 0
    assert grpclite.encode_timeout(10) == "10000000u"
    assert grpclite.encode_timeout(3600) == "3600000m"
    assert grpclite.encode_timeout(200_000) == "200000S"
    assert grpclite.encode_timeout(1e11) == "27777778H"
    for value in (1e-9, 0.25, 7.3, 86400.0):
        text = grpclite.encode_timeout(value)
        assert len(text) <= 9 and text[:-1].isdigit()
    with pytest.raises(ValueError, match="positive"):
        grpclite.encode_timeout(0)


def test_grpc_message_is_percent_decoded() -> None:
    assert grpclite.decode_grpc_message(b"plain text") == "plain text"
    assert grpclite.decode_grpc_message(b"caf%C3%A9 100%25") == "café 100%"
    assert grpclite.decode_grpc_message(b"bad %zz and %4") == "bad %zz and %4"
    for text in ("ünïcode: 50% \n done", "", "%%", "a\x7fb"):
        assert grpclite.decode_grpc_message(grpclite.encode_grpc_message(text)) == text


def test_request_headers_and_metadata_rules() -> None:
    headers = grpclite.request_headers(
        "/pkg.Svc/Do",
        "example:443",
        timeout=2.0,
        metadata=[("authorization", "Bearer t"), ("trace-bin", b"\x00\xff")],
    )
    assert headers[:4] == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/pkg.Svc/Do"),
        (b":authority", b"example:443"),
    ]
    as_dict = dict(headers)
    assert as_dict[b"te"] == b"trailers"
    assert as_dict[b"content-type"] == b"application/grpc"
    assert as_dict[b"grpc-timeout"] == b"2000000u"
    assert as_dict[b"authorization"] == b"Bearer t"
    assert as_dict[b"trace-bin"] == b"AP8"  # base64 without padding
    for key in ("Authorization", "grpc-status", "te", "content-type", ":path", "x y"):
        with pytest.raises(ValueError, match="cannot be gRPC metadata"):
            grpclite.request_headers("/a/b", "h:1", metadata=[(key, "v")])
    with pytest.raises(ValueError, match="printable ASCII") as info:
        grpclite.request_headers("/a/b", "h:1", metadata=[("authorization", "Bearer s3cret\n")])
    assert "s3cret" not in str(info.value)  # the value (a token) is never echoed
    with pytest.raises(ValueError, match="method path"):
        grpclite.request_headers("no-slash", "h:1")


def test_status_from_trailers() -> None:
    assert grpclite.status_from_headers([(b"grpc-status", b"0")]) is None
    error = grpclite.status_from_headers(
        [(b"grpc-status", b"7"), (b"grpc-message", b"not%20yours")]
    )
    assert error is not None
    assert (error.code, error.details, error.remote) == (
        StatusCode.PERMISSION_DENIED,
        "not yours",
        True,
    )
    missing = grpclite.status_from_headers([])
    assert missing is not None and missing.code is StatusCode.UNKNOWN
    weird = grpclite.status_from_headers([(b"grpc-status", b"99")])
    assert weird is not None and weird.code is StatusCode.UNKNOWN


def test_targets_parse() -> None:
    assert Target.parse("10.0.0.1:15012") == Target("10.0.0.1", 15012)
    assert Target.parse("[fd00::1]:15010").authority == "[fd00::1]:15010"
    assert Target.parse("discovery.istio-system:15012").host == "discovery.istio-system"
    assert Target.parse("unix:/run/x.sock") == Target(path="/run/x.sock")
    assert Target.parse("unix:///run/x.sock") == Target(path="/run/x.sock")
    assert Target.parse("unix:/run/x.sock").authority == "localhost"
    for bad in ("nohost", ":15012", "host:0", "host:99999", "host:http", "unix:"):
        with pytest.raises(ValueError):
            Target.parse(bad)


# -- a client protocol against h2's server side, in memory ------------------------------------


class MemoryServer:
    """h2's server side, driven by the test; bytes move with :func:`pump`."""

    def __init__(self, **settings: int) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings({SettingCodes[k]: v for k, v in settings.items()})
        self.events: list[h2.events.Event] = []

    def respond(
        self, stream_id: int, *messages: bytes, status: int = 0, message: str = "", end: bool = True
    ) -> None:
        self.h2.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        for payload in messages:
            self.h2.send_data(stream_id, grpclite.encode_message(payload))
        if end:
            trailers = [("grpc-status", str(status))]
            if message:
                trailers.append(("grpc-message", message))
            self.h2.send_headers(stream_id, trailers, end_stream=True)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def pump(client: GrpcProtocol, server: MemoryServer) -> list[grpclite.Event]:
    """Move bytes both ways until neither side has anything to say; the client's events."""
    events: list[grpclite.Event] = []
    while True:
        to_server = client.data_to_send()
        if to_server:
            server.events += server.h2.receive_data(to_server)
        to_client = server.h2.data_to_send()
        if to_client:
            events += client.receive_data(to_client)
        if not to_server and not to_client:
            return events


def open_pair(**server_settings: int) -> tuple[GrpcProtocol, MemoryServer]:
    client = GrpcProtocol("svc.test:443", stream_window=65535, connection_window=1 << 20)
    server = MemoryServer(**server_settings)
    pump(client, server)
    return client, server


def test_a_unary_call_in_memory() -> None:
    client, server = open_pair()
    sid = client.start_call(
        "/pkg.Svc/Do", metadata=[("authorization", "Bearer t"), ("clusterid", "c1")], timeout=5
    )
    client.send_message(sid, b"request", end=True)
    pump(client, server)
    [request] = server.of(h2.events.RequestReceived)
    headers = dict(request.headers)
    assert headers[b":path"] == b"/pkg.Svc/Do" and headers[b":authority"] == b"svc.test:443"
    assert headers[b"te"] == b"trailers" and headers[b"grpc-timeout"] == b"5000000u"
    assert headers[b"authorization"] == b"Bearer t" and headers[b"clusterid"] == b"c1"
    [data] = server.of(h2.events.DataReceived)
    assert data.data == grpclite.encode_message(b"request")
    assert server.of(h2.events.StreamEnded)  # END_STREAM with the request

    server.respond(sid, b"response")
    events = pump(client, server)
    assert [type(e) for e in events] == [ResponseStarted, MessageReceived, CallEnded]
    started, message, ended = events
    assert isinstance(started, ResponseStarted) and ("content-type", "application/grpc") in (
        started.metadata
    )
    assert isinstance(message, MessageReceived) and message.payload == b"response"
    assert isinstance(ended, CallEnded) and ended.error is None
    assert ended.trailers == (("grpc-status", "0"),)
    client.acknowledge(sid, message.flow_bytes)
    client.release(sid)
    assert client.open_calls == 0


def test_received_bytes_are_acknowledged_when_taken_except_a_partial_message() -> None:
    client, server = open_pair()
    sid = client.start_call("/pkg.Svc/Stream")
    pump(client, server)
    server.respond(sid, end=False)
    pump(client, server)

    # One message larger than the whole window arrives: its bytes are acknowledged as
    # they come, or it could never complete.
    big = os.urandom(200_000)
    wire = grpclite.encode_message(big)
    events: list[grpclite.Event] = []
    while wire:
        room = min(server.h2.local_flow_control_window(sid), server.h2.max_outbound_frame_size)
        assert room > 0, "the client stopped acknowledging a message in progress"
        server.h2.send_data(sid, wire[:room])
        wire = wire[room:]
        events += pump(client, server)
    [message] = [e for e in events if isinstance(e, MessageReceived)]
    assert message.payload == big

    # Complete messages nobody took hold the server back: 10 x 20 KB do not fit the window.
    def send_what_fits(queue: list[bytes]) -> None:
        frame = server.h2.max_outbound_frame_size
        while queue and server.h2.local_flow_control_window(sid) >= len(queue[0]):
            message = queue.pop(0)
            for offset in range(0, len(message), frame):
                server.h2.send_data(sid, message[offset : offset + frame])

    queue = [grpclite.encode_message(bytes([i]) * 20_000) for i in range(10)]
    send_what_fits(queue)
    delivered = [e for e in pump(client, server) if isinstance(e, MessageReceived)]
    assert 0 < len(delivered) < 10 and queue
    while queue or delivered:
        for event in delivered:
            client.acknowledge(sid, event.flow_bytes)  # the application took them
        pump(client, server)
        send_what_fits(queue)
        delivered = [e for e in pump(client, server) if isinstance(e, MessageReceived)]
    assert not queue
    client.release(sid)


def test_sends_wait_for_the_servers_window() -> None:
    client, server = open_pair(INITIAL_WINDOW_SIZE=10)
    sid = client.start_call("/pkg.Svc/Upload")
    client.send_message(sid, b"x" * 100, end=True)
    pump(client, server)
    assert sum(len(e.data) for e in server.of(h2.events.DataReceived)) == 10
    assert client.unsent(sid) == 95
    assert not server.of(h2.events.StreamEnded)
    for _ in range(20):
        for event in server.of(h2.events.DataReceived):
            server.h2.acknowledge_received_data(event.flow_controlled_length, sid)
        server.events.clear()
        pump(client, server)
        if not client.unsent(sid):
            break
    assert client.unsent(sid) == 0
    assert server.of(h2.events.StreamEnded)  # END_STREAM after the last byte


@pytest.mark.parametrize(
    ("headers", "code", "details"),
    [
        (
            [
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "16"),
                ("grpc-message", "no%20way"),
            ],
            StatusCode.UNAUTHENTICATED,
            "no way",
        ),
        ([(":status", "404")], StatusCode.UNIMPLEMENTED, "HTTP 404"),
        ([(":status", "503")], StatusCode.UNAVAILABLE, "HTTP 503"),
        ([(":status", "200"), ("content-type", "text/html")], StatusCode.UNKNOWN, "text/html"),
    ],
    ids=["trailers-only", "http 404", "http 503", "not grpc"],
)
def test_responses_that_end_a_call_at_once(
    headers: list[tuple[str, str]], code: StatusCode, details: str
) -> None:
    client, server = open_pair()
    sid = client.start_call("/pkg.Svc/Do")
    pump(client, server)
    server.h2.send_headers(sid, headers, end_stream=True)
    [ended] = [e for e in pump(client, server) if isinstance(e, CallEnded)]
    assert ended.error is not None and ended.error.code is code
    assert details in ended.error.details


@pytest.mark.parametrize(
    ("reset", "code"),
    [
        (ErrorCodes.REFUSED_STREAM, StatusCode.UNAVAILABLE),
        (ErrorCodes.CANCEL, StatusCode.CANCELLED),
        (ErrorCodes.ENHANCE_YOUR_CALM, StatusCode.RESOURCE_EXHAUSTED),
        (ErrorCodes.PROTOCOL_ERROR, StatusCode.INTERNAL),
    ],
)
def test_a_reset_stream_maps_to_a_status(reset: ErrorCodes, code: StatusCode) -> None:
    client, server = open_pair()
    sid = client.start_call("/pkg.Svc/Do")
    pump(client, server)
    server.h2.reset_stream(sid, reset)
    [ended] = [e for e in pump(client, server) if isinstance(e, CallEnded)]
    assert ended.error is not None and ended.error.code is code
    assert reset.name in ended.error.details


def test_malformed_calls_end_with_internal_and_a_reset() -> None:
    client, server = open_pair()
    compressed = client.start_call("/pkg.Svc/A")
    truncated = client.start_call("/pkg.Svc/B")
    no_trailers = client.start_call("/pkg.Svc/C")
    pump(client, server)
    server.respond(compressed, end=False)
    server.h2.send_data(compressed, b"\x01\x00\x00\x00\x01z")
    server.respond(truncated, end=False)
    server.h2.send_data(truncated, b"\x00\x00\x00\x00\x09abc")
    server.h2.send_headers(truncated, [("grpc-status", "0")], end_stream=True)
    server.respond(no_trailers, b"ok", end=False)
    server.h2.end_stream(no_trailers)
    ended = {e.stream_id: e.error for e in pump(client, server) if isinstance(e, CallEnded)}
    assert all(e is not None and e.code is StatusCode.INTERNAL for e in ended.values())
    assert "compressed" in str(ended[compressed])
    assert "middle of a message" in str(ended[truncated])
    assert "without trailers" in str(ended[no_trailers])
    assert [e.stream_id for e in server.of(h2.events.StreamReset)] == [compressed]
    assert client.accepts_calls  # the connection itself is fine


def test_cancel_sends_rst_stream_cancel() -> None:
    client, server = open_pair()
    sid = client.start_call("/pkg.Svc/Do")
    pump(client, server)
    client.cancel(sid)
    client.release(sid)
    pump(client, server)
    [reset] = server.of(h2.events.StreamReset)
    assert (reset.stream_id, reset.error_code) == (sid, ErrorCodes.CANCEL)


def test_a_graceful_goaway_lets_covered_calls_finish() -> None:
    client, server = open_pair()
    first = client.start_call("/pkg.Svc/A")
    second = client.start_call("/pkg.Svc/B")
    pump(client, server)
    server.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=first)
    server.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
    events = pump(client, server)
    [refused] = [e for e in events if isinstance(e, CallEnded)]
    assert refused.stream_id == second and refused.error is not None
    assert refused.error.code is StatusCode.UNAVAILABLE and "did not take" in refused.error.details
    assert not client.accepts_calls
    with pytest.raises(GrpcError, match="GOAWAY") as info:
        client.start_call("/pkg.Svc/C")
    assert info.value.code is StatusCode.UNAVAILABLE
    server.respond(first, b"done")
    events = pump(client, server)
    assert [type(e) for e in events] == [ResponseStarted, MessageReceived, CallEnded]
    assert isinstance(events[-1], CallEnded) and events[-1].error is None


def test_a_goaway_with_an_error_ends_every_call() -> None:
    client, server = open_pair()
    calls = [client.start_call("/pkg.Svc/A"), client.start_call("/pkg.Svc/B")]
    pump(client, server)
    server.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, additional_data=b"too_many_pings")
    events = pump(client, server)
    ended = [e for e in events if isinstance(e, CallEnded)]
    assert [e.stream_id for e in ended] == calls
    assert isinstance(events[-1], ConnectionEnded)
    for event in ended:
        assert event.error is not None and event.error.code is StatusCode.UNAVAILABLE
        assert "ENHANCE_YOUR_CALM: too_many_pings" in event.error.details


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        b"\xff\xff\xff\x04\x00\x00\x00\x00\x00",  # a 16 MiB SETTINGS frame header
        b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x",
    ],
    ids=["http/1", "oversized frame", "data on stream 0"],
)
def test_garbage_from_the_server_ends_the_connection_cleanly(garbage: bytes) -> None:
    client = GrpcProtocol("svc.test:443")
    server = MemoryServer()
    server.events += server.h2.receive_data(client.data_to_send())
    sid = client.start_call("/pkg.Svc/Do")
    server.events += server.h2.receive_data(client.data_to_send())
    events = client.receive_data(garbage)
    assert [type(e) for e in events] == [CallEnded, ConnectionEnded]
    ended = events[0]
    assert isinstance(ended, CallEnded) and ended.stream_id == sid and ended.error is not None
    assert ended.error.code is StatusCode.INTERNAL and "HTTP/2" in ended.error.details
    # A GOAWAY tells the server why; nothing more is accepted.
    goaway = server.h2.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in goaway)
    assert client.receive_data(b"more") == []
    with pytest.raises(GrpcError):
        client.start_call("/pkg.Svc/Do")


def test_a_ping_is_answered() -> None:
    client, server = open_pair()
    payload = client.ping()
    assert PingAnswered(payload) in pump(client, server)


# == the trio client against real peers =========================================================


# -- the CA (unary calls) ----------------------------------------------------------------------


@dataclass
class CaLab:
    ca: CertificateAuthority
    server: CaServer

    @property
    def roots(self) -> bytes:
        return self.ca.root_bundle_pem.encode()

    def request(self, identity: SpiffeId, impersonate: bool = False) -> bytes:
        request = ca_pb2.IstioCertificateRequest(
            csr=build_csr(generate_workload_key(), identity).decode(), validity_duration=3600
        )
        if impersonate:
            request.metadata.update({"ImpersonatedIdentity": identity.uri})
        return request.SerializeToString()


@pytest.fixture(scope="module")
def ca_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CaLab]:
    base = tmp_path_factory.mktemp("grpclite-ca")
    ca = CertificateAuthority.load_or_create(base / "ca", TD)
    auth = LabTokenAuthenticator(write_tokens(base / "tokens.yaml"), TD)
    # The certificate names localhost only: 127.0.0.1 needs the name override.
    server = CaServer(
        ca,
        auth,
        Authorizer(TD, auth),
        listen="127.0.0.1:0",
        serving_dns_names=["localhost"],
        serving_ips=[],
        registry=CollectorRegistry(),  # not the process-global one: other tests run CAs too
    )
    server.start()
    try:
        yield CaLab(ca, server)
    finally:
        server.stop(grace=0)


def bearer(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}"), ("clusterid", "Kubernetes")]


async def test_unary_call_to_the_ca(ca_lab: CaLab) -> None:
    response = await grpclite.unary_call(
        ca_lab.server.address,
        CREATE,
        ca_lab.request(SLEEP),
        tls=TlsSettings(ca_lab.roots, server_name="localhost"),
        metadata=bearer("sleep"),
        timeout=WAIT,
    )
    chain = ca_pb2.IstioCertificateResponse.FromString(response).cert_chain
    assert len(chain) == 2 and "BEGIN CERTIFICATE" in chain[0]


async def test_the_cas_refusals_arrive_with_its_status_and_message(ca_lab: CaLab) -> None:
    tls = TlsSettings(ca_lab.roots, server_name="localhost")
    with pytest.raises(GrpcError) as info:
        await grpclite.unary_call(
            ca_lab.server.address,
            CREATE,
            ca_lab.request(SLEEP),
            tls=tls,
            metadata=[("authorization", "Bearer not-a-token-0123456789")],
            timeout=WAIT,
        )
    assert info.value.code is StatusCode.UNAUTHENTICATED and info.value.remote
    assert "lab token file" in info.value.details
    with pytest.raises(GrpcError) as info:  # sleep asks for httpbin's identity
        await grpclite.unary_call(
            ca_lab.server.address,
            CREATE,
            ca_lab.request(HTTPBIN),
            tls=tls,
            metadata=bearer("sleep"),
            timeout=WAIT,
        )
    assert info.value.code is StatusCode.PERMISSION_DENIED
    assert "may only request its own identity" in info.value.details


async def test_tls_needs_the_name_override_and_the_right_root(
    ca_lab: CaLab, tmp_path: Path
) -> None:
    async def call(tls: TlsSettings) -> bytes:
        return await grpclite.unary_call(
            ca_lab.server.address,
            CREATE,
            ca_lab.request(SLEEP),
            tls=tls,
            metadata=bearer("sleep"),
            timeout=WAIT,
        )

    with pytest.raises(GrpcError) as info:  # the certificate does not name 127.0.0.1
        await call(TlsSettings(ca_lab.roots))
    assert info.value.code is StatusCode.UNAVAILABLE and not info.value.remote
    assert "does not verify" in info.value.details and "127.0.0.1" in info.value.details
    other = CertificateAuthority.load_or_create(tmp_path / "other", TD)
    with pytest.raises(GrpcError, match="does not verify") as info:
        await call(TlsSettings(other.root_bundle_pem.encode(), server_name="localhost"))
    assert info.value.code is StatusCode.UNAVAILABLE
    with pytest.raises(GrpcError, match="does not verify"):  # a name it does not carry
        await call(TlsSettings(ca_lab.roots, server_name="ca.example"))
    assert await call(TlsSettings(ca_lab.roots, server_name="localhost"))


async def test_nothing_listening_is_unavailable() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(GrpcError, match="cannot connect") as info:
        await grpclite.unary_call(f"127.0.0.1:{port}", CREATE, b"", timeout=WAIT)
    assert info.value.code is StatusCode.UNAVAILABLE


# -- a generic grpcio server with test methods ----------------------------------------------------


@dataclass
class Seen:
    """What the test server observed (from grpcio's threads)."""

    metadata: list[dict[str, Any]] = field(default_factory=list)
    time_remaining: list[float | None] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class MethodServer:
    """grpcio with ``/test.T/{Echo,Hang,Big,Fail,Chat}`` on TCP (plain or TLS) or a unix socket."""

    #: What the discovery server allows too: a client PING as often as it likes.
    PERMIT_PINGS = (
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 1),
        ("grpc.http2.max_ping_strikes", 0),
    )

    def __init__(
        self,
        *,
        tls: CertificateAuthority | None = None,
        unix: str | None = None,
        options: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        self.seen = Seen()
        self._server = grpc.server(futures.ThreadPoolExecutor(8), options=options)
        methods = {
            "Echo": grpc.unary_unary_rpc_method_handler(self._echo),
            "Hang": grpc.unary_unary_rpc_method_handler(self._hang),
            "Big": grpc.unary_unary_rpc_method_handler(self._big),
            "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
            "Chat": grpc.stream_stream_rpc_method_handler(self._chat),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.T", methods),)
        )
        if unix is not None:
            self._server.add_insecure_port(f"unix:{unix}")
            self.address = f"unix:{unix}"
        elif tls is not None:
            key, serving = tls.issue_serving_certificate(["localhost"], [])
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            credentials = grpc.ssl_server_credentials(
                [(key_pem, "".join(serving.chain_pem[:-1]).encode())]
            )
            self.address = f"127.0.0.1:{self._server.add_secure_port('127.0.0.1:0', credentials)}"
        else:
            self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    def _observe(self, context: grpc.ServicerContext) -> None:
        self.seen.metadata.append(dict(context.invocation_metadata()))
        self.seen.time_remaining.append(context.time_remaining())
        context.add_callback(self._on_done(context))

    def _on_done(self, context: grpc.ServicerContext) -> Any:
        def done() -> None:
            # Ended without a status of the handler's: the client cancelled (or its deadline).
            # grpc-stubs lacks ServicerContext.code(); grpcio has it since 1.38.
            code = context.code()  # type: ignore[attr-defined]
            if code is None and not context.is_active():
                self.seen.cancelled.set()

        return done

    def _echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._observe(context)
        context.send_initial_metadata((("served-by", "test"),))
        context.set_trailing_metadata((("answer-bin", b"\x00\x01"),))
        return request

    def _hang(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._observe(context)
        self.seen.release.wait(WAIT)
        return b""

    def _big(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return os.urandom(int(request))

    def _fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        code, _, message = request.decode().partition(":")
        context.abort(grpc.StatusCode[code], message)
        raise AssertionError("abort raises")

    def _chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._observe(context)
        for request in requests:
            if request == b"fail":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
            yield b"echo:" + request

    def __enter__(self) -> MethodServer:
        self._server.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.seen.release.set()
        self._server.stop(grace=None).wait()


@pytest.fixture
def method_server() -> Iterator[MethodServer]:
    with MethodServer() as server:
        yield server


async def test_metadata_travels_both_ways(method_server: MethodServer) -> None:
    async with (
        grpclite.connect(method_server.address) as connection,
        connection.stream(
            "/test.T/Echo", metadata=[("authorization", "Bearer x"), ("trace-bin", b"\x00\xfe")]
        ) as call,
    ):
        await call.send(b"ping", end=True)
        assert await call.receive() == b"ping"
        assert await call.receive() is None
        assert call.initial_metadata is not None
        assert ("served-by", "test") in call.initial_metadata
        assert ("answer-bin", b"\x00\x01") in call.trailing_metadata
    [seen] = method_server.seen.metadata
    assert seen["authorization"] == "Bearer x" and seen["trace-bin"] == b"\x00\xfe"
    assert seen["user-agent"].startswith(grpclite.USER_AGENT)


async def test_a_server_status_with_an_encoded_message(method_server: MethodServer) -> None:
    with pytest.raises(GrpcError) as info:
        await grpclite.unary_call(
            method_server.address, "/test.T/Fail", "ABORTED:ünïcode 100% done".encode()
        )
    assert info.value.code is StatusCode.ABORTED and info.value.remote
    assert info.value.details == "ünïcode 100% done"
    with pytest.raises(GrpcError) as info:
        await grpclite.unary_call(method_server.address, "/test.T/Nope", b"")
    assert info.value.code is StatusCode.UNIMPLEMENTED


async def test_the_deadline_is_sent_and_enforced(method_server: MethodServer) -> None:
    with trio.fail_after(WAIT):
        with pytest.raises(GrpcError) as info:
            await grpclite.unary_call(method_server.address, "/test.T/Hang", b"", timeout=0.3)
    assert info.value.code is StatusCode.DEADLINE_EXCEEDED
    [remaining] = method_server.seen.time_remaining
    assert remaining is not None and 0 < remaining <= 0.3
    # The server is told (RST_STREAM or its own deadline): the handler's call is over.
    await trio.to_thread.run_sync(method_server.seen.cancelled.wait, WAIT)
    assert method_server.seen.cancelled.is_set()


async def test_large_messages_flow_and_the_limit_holds(method_server: MethodServer) -> None:
    # 3 MiB through a 1 MiB stream window; then more than the default 4 MiB limit.
    assert len(await grpclite.unary_call(method_server.address, "/test.T/Big", b"3145728")) == (
        3 * 1024 * 1024
    )
    with pytest.raises(GrpcError, match="more than the") as info:
        await grpclite.unary_call(method_server.address, "/test.T/Big", b"5000000")
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED and not info.value.remote
    settings = ConnectionSettings(max_message_size=8 * 1024 * 1024)
    response = await grpclite.unary_call(
        method_server.address, "/test.T/Big", b"5000000", settings=settings
    )
    assert len(response) == 5_000_000


async def test_a_bidirectional_stream(method_server: MethodServer) -> None:
    async with grpclite.connect(method_server.address) as connection:
        async with connection.stream("/test.T/Chat") as call:
            for word in (b"a", b"b", b"c"):
                await call.send(word)
                assert await call.receive() == b"echo:" + word
            await call.done_writing()
            assert [m async for m in call] == []
        # The same connection takes more calls, one failing.
        async with connection.stream("/test.T/Chat") as call:
            await call.send(b"fail")
            with pytest.raises(GrpcError, match="asked to fail") as info:
                await call.receive()
            assert info.value.code is StatusCode.FAILED_PRECONDITION
            with pytest.raises(GrpcError, match="asked to fail"):  # the call's outcome again
                await call.send(b"after the end")


async def test_leaving_a_stream_early_cancels_it_on_the_server(method_server: MethodServer) -> None:
    async with grpclite.connect(method_server.address) as connection:
        async with connection.stream("/test.T/Chat") as call:
            await call.send(b"one")
            assert await call.receive() == b"echo:one"
        await trio.to_thread.run_sync(method_server.seen.cancelled.wait, WAIT)
        assert method_server.seen.cancelled.is_set()
        assert connection.error is None  # the connection goes on
        assert await connection.unary("/test.T/Echo", b"still here", timeout=WAIT) == (
            b"still here"
        )


async def test_a_unix_socket_target() -> None:
    with tempfile.TemporaryDirectory(prefix="grpclite-") as directory:
        path = f"{directory}/test.sock"
        with MethodServer(unix=path) as server:
            assert await grpclite.unary_call(server.address, "/test.T/Echo", b"via unix") == (
                b"via unix"
            )
            assert server.seen.metadata  # the call reached the handler


async def test_tls_to_a_grpcio_server(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    with MethodServer(tls=ca) as server:
        tls = TlsSettings(ca.root_bundle_pem.encode(), server_name="localhost")
        async with grpclite.connect(server.address, tls=tls) as connection:
            assert isinstance(connection.transport, TlsSocketStream)
            assert await connection.unary("/test.T/Echo", b"secret", timeout=WAIT) == b"secret"
        with pytest.raises(GrpcError, match="expect TLS"):
            await grpclite.unary_call(server.address, "/test.T/Echo", b"x", timeout=WAIT)


# -- Delta ADS against the discovery server -----------------------------------------------------


async def test_a_delta_ads_stream_with_the_discovery_server(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    auth = LabTokenAuthenticator(write_tokens(tmp_path / "tokens.yaml"), TD)
    model = Model.of(
        namespaces=[Namespace("shop", {"istio.io/dataplane-mode": "ambient"})],
        pods=[
            Pod("shop", f"web-{i}", node="node-1", ips=(f"10.244.1.{i + 10}",)) for i in range(20)
        ],
    )
    server = DiscoveryServer(
        MemoryRegistry(model),
        ca=ca,
        xds_authenticator=auth,
        listen="127.0.0.1:0",
        serving_dns_names=["localhost"],
        serving_ips=[],
        quiet=0.01,
        metrics_registry=CollectorRegistry(),
    )
    server.start()
    try:
        node = build_node(
            ip="10.244.1.1",
            pod="ztunnel-1",
            namespace="istio-system",
            node_name="node-1",
            cluster_id="Kubernetes",
        )
        client = DeltaClient(node, WORKLOAD_TYPE_URLS)
        tls = TlsSettings(ca.root_bundle_pem.encode(), server_name="localhost")
        with trio.fail_after(WAIT):
            async with (
                grpclite.connect(server.tls_address, tls=tls) as connection,
                connection.stream(DELTA_METHOD_PATH, metadata=bearer("ztunnel")) as call,
            ):
                for request in client.start_stream():
                    await call.send(request.SerializeToString())
                received: dict[str, ResourcesReceived] = {}
                while not client.in_sync():
                    payload = await call.receive()
                    assert payload is not None
                    response = discovery_pb2.DeltaDiscoveryResponse.FromString(payload)
                    event, ack = client.receive(response)
                    assert isinstance(event, ResourcesReceived)
                    received[event.type_url] = event
                    await call.send(ack.SerializeToString())
        names = {r.name for r in received[ADDRESS_TYPE_URL].updated}
        assert names == {f"Kubernetes//Pod/shop/web-{i}" for i in range(20)}
        # Without a token the server refuses: its status arrives as it sent it.
        with trio.fail_after(WAIT):
            async with (
                grpclite.connect(server.tls_address, tls=tls) as connection,
                connection.stream(DELTA_METHOD_PATH) as call,
            ):
                with pytest.raises(GrpcError) as info:  # on a send, or on the receive
                    for request in DeltaClient(node, WORKLOAD_TYPE_URLS).start_stream():
                        await call.send(request.SerializeToString())
                    await call.receive()
        assert info.value.code is StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in info.value.details
    finally:
        server.stop(grace=0)


# -- misbehaving servers (raw sockets) ------------------------------------------------------------

EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


async def serve_raw(
    answer: bytes,
    *,
    read: bool = True,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections; send ``answer`` once, then read and ignore everything
    (or, without ``read``, never read again)."""
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        task_status.started(listener.getsockname()[1])
        while True:
            conn, _ = await listener.accept()
            with conn:
                await conn.send(answer)
                if not read:
                    await trio.sleep_forever()
                while await conn.recv(65536):
                    pass


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
        EMPTY_SETTINGS + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # bad window
        EMPTY_SETTINGS + os.urandom(64),
    ],
    ids=["http/1", "window update of 0", "random frames"],
)
async def test_garbage_from_a_server_is_a_clean_error(answer: bytes) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_raw, answer)
        with trio.fail_after(WAIT), pytest.raises(GrpcError) as info:
            await grpclite.unary_call(f"127.0.0.1:{port}", "/test.T/Echo", b"x")
        nursery.cancel_scope.cancel()
    assert info.value.code in (StatusCode.INTERNAL, StatusCode.UNAVAILABLE)
    assert not info.value.remote


async def test_a_server_that_stops_answering_pings_is_dropped() -> None:
    settings = ConnectionSettings(keepalive_interval=0.05, keepalive_timeout=0.2)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_raw, EMPTY_SETTINGS + SETTINGS_ACK)
        with trio.fail_after(WAIT):
            async with grpclite.connect(f"127.0.0.1:{port}", settings=settings) as connection:
                async with connection.stream("/test.T/Chat") as call:
                    with pytest.raises(GrpcError, match="keepalive PING") as info:
                        await call.receive()
                assert connection.error is not None
        nursery.cancel_scope.cancel()
    assert info.value.code is StatusCode.UNAVAILABLE


async def test_a_send_stuck_on_a_peer_that_stopped_reading_is_released() -> None:
    # The peer opens every window wide, then reads nothing: TCP buffers fill, a send blocks,
    # and so does the PING behind it. The keepalive timeout ends the connection and the send.
    wide = (
        b"\x00\x00\x06\x04\x00\x00\x00\x00\x00"
        + b"\x00\x04\x7f\xff\xff\xff"  # window
        + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00"
        + (2**31 - 1 - 65535).to_bytes(4, "big")
    )
    settings = ConnectionSettings(keepalive_interval=0.05, keepalive_timeout=0.3)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_raw, wide, read=False))
        with trio.fail_after(WAIT):
            async with (
                grpclite.connect(f"127.0.0.1:{port}", settings=settings) as connection,
                connection.stream("/test.T/Chat") as call,
            ):
                with pytest.raises(GrpcError, match="keepalive PING") as info:
                    for _ in range(100):  # 400 MiB: far more than any socket buffer
                        await call.send(bytes(4 * 1024 * 1024 - 5))
        nursery.cancel_scope.cancel()
    assert info.value.code is StatusCode.UNAVAILABLE


async def test_pings_keep_a_quiet_stream_open() -> None:
    # grpcio answers PINGs; the stream stays usable across many keepalive rounds.
    settings = ConnectionSettings(keepalive_interval=0.01, keepalive_timeout=WAIT)
    with MethodServer(options=MethodServer.PERMIT_PINGS) as server:
        async with grpclite.connect(server.address, settings=settings) as connection:
            async with connection.stream("/test.T/Chat") as call:
                await call.send(b"first")
                assert await call.receive() == b"echo:first"
                with trio.move_on_after(0.2):  # a quiet stream: pings go to and fro
                    await call.receive()
                await call.send(b"second")
                assert await call.receive() == b"echo:second"
            assert connection.error is None


async def test_a_server_that_finds_our_pings_too_many_ends_the_calls(
    method_server: MethodServer,
) -> None:
    # grpcio's default policy (one PING per 5 min without data): GOAWAY too_many_pings.
    settings = ConnectionSettings(keepalive_interval=0.01, keepalive_timeout=WAIT)
    with trio.fail_after(WAIT):
        async with (
            grpclite.connect(method_server.address, settings=settings) as connection,
            connection.stream("/test.T/Chat") as call,
        ):
            with pytest.raises(GrpcError, match="too_many_pings") as info:
                await call.receive()
    assert info.value.code is StatusCode.UNAVAILABLE
