"""The sans-IO HBONE core: an HboneClient and an HboneServer talking in memory."""

from __future__ import annotations

from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.underpass.hbone.support import PREFACE, Pair, parse_frames
from underpass.hbone.errors import (
    ConnectionUnavailable,
    KeepaliveTimeout,
    LocalProtocolError,
    ProtocolViolation,
    StreamLimitReached,
)
from underpass.hbone.headers import Baggage, ConnectRequest, SocketAddress, TraceParent
from underpass.hbone.protocol import (
    ConnectionEnded,
    DataReceived,
    EndOfStream,
    Event,
    HboneServer,
    HboneSettings,
    PeerSettingsChanged,
    RequestRejected,
    StreamAborted,
    TunnelEstablished,
    TunnelRejected,
    TunnelRequested,
)

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
LOCAL = "10.0.0.1"
TARGET = SocketAddress.of(LOCAL, 8080)


def open_tunnel(pair: Pair, request: ConnectRequest | None = None) -> int:
    """Open and accept one tunnel; returns its stream ID."""
    stream_id = pair.client.open_stream(request or ConnectRequest(TARGET))
    _, server_events = pair.pump()
    assert [type(e) for e in server_events] == [TunnelRequested]
    pair.server.accept(stream_id)
    client_events, _ = pair.pump()
    assert client_events == [TunnelEstablished(stream_id)]
    return stream_id


def data_of(events: Sequence[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


# -- settings on the wire ---------------------------------------------------------------


def test_settings_and_windows_on_the_wire() -> None:
    pair = Pair(start=False)
    pair.client.start(0.0)
    pair.server.start(0.0)
    client_bytes = pair.client.data_to_send()
    assert client_bytes.startswith(PREFACE)
    client_frames = parse_frames(client_bytes)
    server_frames = parse_frames(pair.server.data_to_send())

    settings = client_frames[0]
    assert isinstance(settings, SettingsFrame)
    assert settings.settings[SettingCodes.ENABLE_PUSH] == 0
    assert settings.settings[SettingCodes.INITIAL_WINDOW_SIZE] == 4 * MiB
    assert settings.settings[SettingCodes.MAX_FRAME_SIZE] == 1 * MiB
    update = client_frames[1]
    assert isinstance(update, WindowUpdateFrame)
    assert (update.stream_id, update.window_increment) == (0, 16 * MiB - 65_535)

    settings = server_frames[0]
    assert isinstance(settings, SettingsFrame)
    assert settings.settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 200
    assert settings.settings[SettingCodes.INITIAL_WINDOW_SIZE] == 4 * MiB
    assert settings.settings[SettingCodes.MAX_FRAME_SIZE] == 1 * MiB
    assert settings.settings.get(SettingCodes.ENABLE_PUSH, 0) == 0
    assert isinstance(server_frames[1], WindowUpdateFrame)
    assert server_frames[1].window_increment == 16 * MiB - 65_535


def test_client_learns_the_servers_stream_limit() -> None:
    pair = Pair(start=False, server_settings=HboneSettings(max_concurrent_streams=3))
    pair.client.start(0.0)
    pair.server.start(0.0)
    client_events, _ = pair.pump()
    assert PeerSettingsChanged(3) in client_events
    assert pair.client.max_streams == 3
    for _ in range(3):
        open_tunnel(pair)
    assert pair.client.available_streams == 0
    with pytest.raises(StreamLimitReached):
        pair.client.open_stream(ConnectRequest(TARGET))


def test_client_caps_streams_at_100() -> None:
    pair = Pair()
    assert pair.client.max_streams == 100
    for _ in range(100):
        pair.client.open_stream(ConnectRequest(TARGET))
    with pytest.raises(StreamLimitReached, match="limit is 100"):
        pair.client.open_stream(ConnectRequest(TARGET))
    pair.client.release(1)
    assert pair.client.available_streams == 1


def test_settings_out_of_range_are_refused() -> None:
    with pytest.raises(LocalProtocolError, match="max_frame_size"):
        HboneSettings(max_frame_size=100)
    with pytest.raises(LocalProtocolError, match="stream_window"):
        HboneSettings(stream_window=2**31)


# -- CONNECT accepted ---------------------------------------------------------------------


def test_connect_request_headers_and_acceptance() -> None:
    pair = Pair()
    trace = TraceParent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", 1)
    request = ConnectRequest(
        TARGET,
        client=SocketAddress.of("10.0.0.2", 40000),
        host="cart.shop.svc.cluster.local",
        baggage=Baggage("Kubernetes", "shop", "deployment", "frontend", "frontend", "v1"),
        traceparent=trace,
    )
    pair.client_frames()
    pair.server_frames()
    stream_id = pair.client.open_stream(request)
    _, server_events = pair.pump()
    (headers_frame,) = pair.client_frames()
    assert isinstance(headers_frame, HeadersFrame)
    assert "END_STREAM" not in headers_frame.flags
    (event,) = server_events
    assert isinstance(event, TunnelRequested)
    assert dict(event.info.headers) == {
        b":method": b"CONNECT",
        b":authority": b"10.0.0.1:8080",
        b"forwarded": b'for="10.0.0.2:40000";host=cart.shop.svc.cluster.local',
        b"baggage": b"k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,"
        b"k8s.deployment.name=frontend,service.name=frontend,service.version=v1",
        b"traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    info = event.info
    assert info.authority == TARGET
    assert info.client == SocketAddress.of("10.0.0.2", 40000)
    assert info.forwarded is not None and info.forwarded.host == "cart.shop.svc.cluster.local"
    assert info.baggage == request.baggage
    assert info.traceparent == trace

    # Nothing is answered until the caller decides (after the upstream connect).
    assert pair.server_frames() == []
    pair.server.accept(stream_id)
    status_frame = [f for f in parse_frames(pair.server.data_to_send()) if f.stream_id]
    assert isinstance(status_frame[0], HeadersFrame)
    assert "END_STREAM" not in status_frame[0].flags
    decoded = hpack.Decoder().decode(status_frame[0].data)
    assert [(str(name), str(value)) for name, value in decoded] == [(":status", "200")]


def test_a_default_traceparent_is_generated() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(ConnectRequest(TARGET))
    _, (event,) = pair.pump()
    assert isinstance(event, TunnelRequested)
    assert event.stream_id == stream_id
    assert event.info.traceparent is not None
    assert event.info.forwarded is None and event.info.baggage is None


def test_ipv6_authority() -> None:
    pair = Pair(local_ip="fd00::1")
    target = SocketAddress.of("fd00::1", 443)
    stream_id = pair.client.open_stream(ConnectRequest(target))
    _, (event,) = pair.pump()
    assert isinstance(event, TunnelRequested)
    assert dict(event.info.headers)[b":authority"] == b"[fd00::1]:443"
    assert event.info.authority == target
    pair.server.accept(stream_id)
    assert pair.pump()[0] == [TunnelEstablished(stream_id)]


def test_data_both_ways() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    assert pair.client.send_data(stream_id, b"ping") == 4
    _, server_events = pair.pump()
    assert server_events == [DataReceived(stream_id, b"ping")]
    assert pair.server.send_data(stream_id, memoryview(b"xxpongxx")[2:6]) == 4
    client_events, _ = pair.pump()
    assert client_events == [DataReceived(stream_id, b"pong")]


def test_large_writes_are_split_into_max_size_frames() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.client_frames()
    sent = pair.client.send_data(stream_id, bytes(3 * MiB + 5))
    assert sent == 3 * MiB + 5
    pair.pump()
    sizes = [len(f.data) for f in pair.client_frames() if isinstance(f, DataFrame)]
    assert sizes == [MiB, MiB, MiB, 5]


def test_sending_stops_at_the_stream_window() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    assert pair.client.send_data(stream_id, bytes(5 * MiB)) == 4 * MiB
    assert pair.client.send_window(stream_id) == 0
    assert pair.client.send_data(stream_id, b"more") == 0
    _, server_events = pair.pump()
    assert len(data_of(server_events)) == 4 * MiB
    pair.server.acknowledge(stream_id, 4 * MiB)
    pair.pump()
    assert pair.client.send_window(stream_id) == 4 * MiB


# -- the 400 cases ------------------------------------------------------------------------


def raw_client() -> h2.connection.H2Connection:
    """An h2 client that sends whatever headers we like."""
    return h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )


def send_raw(
    headers: list[tuple[str, str]], *, local_ip: str = LOCAL, waypoint: bool = False
) -> tuple[list[Event], list[object]]:
    """Send one request from a raw h2 client; returns (server events, client h2 events)."""
    server = HboneServer(local_ip, waypoint=waypoint)
    server.start(0.0)
    client = raw_client()
    client.initiate_connection()
    client.receive_data(server.data_to_send())
    client.send_headers(1, headers)
    server_events: list[Event] = [
        e
        for e in server.receive_data(client.data_to_send())
        if isinstance(e, RequestRejected | TunnelRequested)
    ]
    client_events: list[object] = list(client.receive_data(server.data_to_send()))
    return server_events, client_events


def assert_answered(client_events: list[object], status: bytes) -> None:
    responses = [e for e in client_events if isinstance(e, h2.events.ResponseReceived)]
    assert len(responses) == 1
    assert dict(responses[0].headers)[b":status"] == status
    assert any(isinstance(e, h2.events.StreamEnded) for e in client_events)
    resets = [e for e in client_events if isinstance(e, h2.events.StreamReset)]
    assert [r.error_code for r in resets] == [ErrorCodes.NO_ERROR]


def test_400_when_the_method_is_not_connect() -> None:
    server_events, client_events = send_raw(
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.1:80")]
    )
    (event,) = server_events
    assert isinstance(event, RequestRejected)
    assert event.status == 400 and "not CONNECT" in event.reason
    assert_answered(client_events, b"400")


def test_400_when_the_authority_is_missing() -> None:
    server_events, client_events = send_raw([(":method", "CONNECT"), ("host", "10.0.0.1:80")])
    (event,) = server_events
    assert isinstance(event, RequestRejected) and "no :authority" in event.reason
    assert_answered(client_events, b"400")


@pytest.mark.parametrize(
    "authority",
    [
        "cart.shop.svc:80",  # a host name
        "10.0.0.1",  # no port
        "10.0.0.1:",  # empty port
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:+80",
        "10.0.0.1:\uff18\uff10",  # non-ASCII (fullwidth) digits
        "10.0.0.01:80",  # leading zero in an octet
        "fd00::1:80",  # IPv6 without brackets
        "[10.0.0.1]:80",  # IPv4 in brackets
        "[fd00::1%eth0]:80",  # zone ID
        "[fd00::1]80",
        "[fd00::1:80",
        ":80",
        "",
    ],
)
def test_400_when_the_authority_does_not_parse(authority: str) -> None:
    server_events, client_events = send_raw([(":method", "CONNECT"), (":authority", authority)])
    (event,) = server_events
    assert isinstance(event, RequestRejected)
    assert event.status == 400
    assert_answered(client_events, b"400")


def test_400_when_the_authority_names_another_ip() -> None:
    server_events, client_events = send_raw([(":method", "CONNECT"), (":authority", "10.0.0.9:80")])
    (event,) = server_events
    assert isinstance(event, RequestRejected)
    assert "addressed to 10.0.0.1" in event.reason
    assert_answered(client_events, b"400")


def test_a_waypoint_accepts_any_ip() -> None:
    server_events, _ = send_raw(
        [(":method", "CONNECT"), (":authority", "10.0.0.9:80")], local_ip=LOCAL, waypoint=True
    )
    (event,) = server_events
    assert isinstance(event, TunnelRequested)
    assert event.info.authority == SocketAddress.of("10.0.0.9", 80)


def test_ipv4_mapped_addresses_compare_as_ipv4() -> None:
    server_events, _ = send_raw(
        [(":method", "CONNECT"), (":authority", "[::ffff:10.0.0.1]:80")], local_ip="10.0.0.1"
    )
    assert isinstance(server_events[0], TunnelRequested)
    server_events, _ = send_raw(
        [(":method", "CONNECT"), (":authority", "10.0.0.1:80")], local_ip="::ffff:10.0.0.1"
    )
    assert isinstance(server_events[0], TunnelRequested)


def test_400_for_extended_connect() -> None:
    server = HboneServer(LOCAL)
    server.start(0.0)
    client = raw_client()
    client.initiate_connection()
    client.receive_data(server.data_to_send())
    # h2 refuses :protocol unless the server enabled it; skip h2's outbound check.
    encoded = hpack.Encoder().encode(
        [(":method", "CONNECT"), (":protocol", "websocket"), (":authority", "10.0.0.1:80")]
    )
    frame = HeadersFrame(1, encoded)
    frame.flags.add("END_HEADERS")
    with pytest.raises(ProtocolViolation):
        # h2 itself rejects :protocol when not negotiated: GOAWAY, nothing forwarded.
        server.receive_data(client.data_to_send() + frame.serialize())
    assert server.closed


def test_checks_run_in_order() -> None:
    # Method first: a GET with a bad authority is rejected for its method.
    server_events, _ = send_raw(
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "bad")]
    )
    assert isinstance(server_events[0], RequestRejected)
    assert "not CONNECT" in server_events[0].reason
    # Then the authority's syntax, before its IP.
    server_events, _ = send_raw([(":method", "CONNECT"), (":authority", "example.com:80")])
    assert isinstance(server_events[0], RequestRejected)
    assert "does not name an IP" in server_events[0].reason


def test_the_client_sees_400_as_a_refusal() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(ConnectRequest(SocketAddress.of("10.0.0.9", 80)))
    client_events, server_events = pair.pump()
    assert isinstance(server_events[0], RequestRejected)
    assert TunnelRejected(stream_id, 400) in client_events
    with pytest.raises(LocalProtocolError):
        pair.client.send_data(stream_id, b"x")
    pair.client.release(stream_id)
    assert pair.client.active_streams == 0


# -- 401 / 503 ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 503])
def test_refusal_paths(status: int) -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(ConnectRequest(TARGET))
    pair.pump()
    pair.server.reject(stream_id, status)
    assert pair.server.active_streams == 0
    client_events, _ = pair.pump()
    assert client_events == [TunnelRejected(stream_id, status)]
    frames = pair.server_frames()
    assert [type(f) for f in frames if f.stream_id == stream_id] == [HeadersFrame, RstStreamFrame]
    assert [f.error_code for f in frames if isinstance(f, RstStreamFrame)] == [0]


def test_early_data_of_a_refused_tunnel_returns_to_the_window() -> None:
    pair = Pair()
    pair.server_frames()
    for _ in range(3):
        stream_id = pair.client.open_stream(ConnectRequest(TARGET))
        pair.pump()
        # A client may not send before the 200; a hostile one does (raw h2 calls).
        for _ in range(3):
            pair.client._h2.send_data(stream_id, bytes(MiB))
        _, server_events = pair.pump()
        assert len(data_of(server_events)) == 3 * MiB
        pair.server.reject(stream_id, 503)
        pair.pump()
    # 9 MiB discarded >= half the 16 MiB connection window: handed back in one update.
    updates = [f for f in pair.server_frames() if isinstance(f, WindowUpdateFrame)]
    assert [(f.stream_id, f.window_increment) for f in updates] == [(0, 9 * MiB)]


def test_reject_and_accept_take_only_valid_answers() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(ConnectRequest(TARGET))
    pair.pump()
    for status in (200, 302, 99, True):
        with pytest.raises(LocalProtocolError):
            pair.server.reject(stream_id, status)
    with pytest.raises(LocalProtocolError, match="state pending"):
        pair.server.send_data(stream_id, b"too early")
    pair.server.accept(stream_id)
    with pytest.raises(LocalProtocolError, match="state open"):
        pair.server.accept(stream_id)
    with pytest.raises(LocalProtocolError, match="not an open tunnel"):
        pair.server.accept(99)


# -- half-close and resets ----------------------------------------------------------------


def test_half_close_both_ways() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.client.send_data(stream_id, b"request")
    pair.client.send_eof(stream_id)
    _, server_events = pair.pump()
    assert server_events == [DataReceived(stream_id, b"request"), EndOfStream(stream_id)]
    with pytest.raises(LocalProtocolError, match="half-closed"):
        pair.client.send_data(stream_id, b"after eof")
    # The other direction is still open.
    pair.server.send_data(stream_id, b"response")
    pair.server.send_eof(stream_id)
    client_events, _ = pair.pump()
    assert client_events == [DataReceived(stream_id, b"response"), EndOfStream(stream_id)]
    pair.client_frames()
    pair.server_frames()
    pair.client.acknowledge(stream_id, 8)
    pair.client.release(stream_id)
    pair.server.acknowledge(stream_id, 7)
    pair.server.release(stream_id)
    pair.pump()
    # A clean end: no RST_STREAM either way.
    frames = pair.client_frames() + pair.server_frames()
    assert not [f for f in frames if isinstance(f, RstStreamFrame)]


def test_release_after_the_peer_ended_sends_end_stream() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.server.send_eof(stream_id)
    pair.pump()
    pair.client_frames()
    pair.client.release(stream_id)
    pair.pump()
    frames = pair.client_frames()
    assert [type(f) for f in frames if f.stream_id == stream_id] == [DataFrame]
    assert "END_STREAM" in frames[-1].flags


def test_release_with_unread_data_resets() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.server.send_data(stream_id, b"unread")
    pair.server.send_eof(stream_id)
    pair.pump()
    pair.client.release(stream_id)
    _, server_events = pair.pump()
    assert server_events == [StreamAborted(stream_id, ErrorCodes.CANCEL, remote=True)]


def test_an_error_on_one_side_resets_the_stream() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.server.reset_stream(stream_id, ErrorCodes.CONNECT_ERROR)
    client_events, _ = pair.pump()
    assert client_events == [StreamAborted(stream_id, ErrorCodes.CONNECT_ERROR, remote=True)]
    with pytest.raises(LocalProtocolError, match="state failed"):
        pair.client.send_data(stream_id, b"x")
    with pytest.raises(LocalProtocolError, match="state failed"):
        pair.server.send_data(stream_id, b"x")
    # Releasing a reset stream sends nothing more.
    pair.client.release(stream_id)
    pair.server.release(stream_id)
    pair.pump()
    assert not [f for f in pair.client_frames() if isinstance(f, RstStreamFrame)]


def test_released_streams_return_their_unread_bytes_to_the_connection() -> None:
    """Streams closed with unread data must not shrink the connection window for good."""
    pair = Pair()
    for _ in range(6):  # 6 x 4 MiB > the 16 MiB connection window
        stream_id = open_tunnel(pair)
        assert pair.server.send_data(stream_id, bytes(4 * MiB)) == 4 * MiB
        pair.pump()
        pair.client.release(stream_id)  # never read
        pair.server.release(stream_id)
        pair.pump()
    assert pair.server._h2.outbound_flow_control_window > 8 * MiB


# -- flow control -------------------------------------------------------------------------


def test_window_updates_are_batched() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.server_frames()
    pair.client.send_data(stream_id, bytes(3 * MiB))
    _, server_events = pair.pump()
    for event in server_events:
        assert isinstance(event, DataReceived)
        view = memoryview(event.data)
        for start in range(0, len(view), 16 * 1024):  # the application reads 16 KiB at a time
            pair.server.acknowledge(stream_id, len(view[start : start + 16 * 1024]))
    pair.pump()
    updates = [f for f in pair.server_frames() if isinstance(f, WindowUpdateFrame)]
    # One stream update after half the 4 MiB window; none for the 16 MiB connection yet.
    assert [(f.stream_id, f.window_increment) for f in updates] == [(stream_id, 2 * MiB)]


def test_unacknowledged_data_is_not_acknowledged() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.server_frames()
    pair.client.send_data(stream_id, bytes(4 * MiB))
    pair.pump()
    assert not [f for f in pair.server_frames() if isinstance(f, WindowUpdateFrame)]
    assert pair.client.send_window(stream_id) == 0
    pair.server.acknowledge(stream_id, 10 * MiB)  # more than received: capped
    pair.pump()
    assert pair.client.send_window(stream_id) == 4 * MiB


# -- keepalive ----------------------------------------------------------------------------


def test_ping_every_interval_and_answered() -> None:
    pair = Pair()
    assert pair.client.next_deadline() == 10.0
    pair.client.handle_timer(5.0)  # early: nothing
    assert not pair.client.data_to_send()
    pair.client.handle_timer(10.0)
    pings = [f for f in parse_frames(pair.client.data_to_send()) if isinstance(f, PingFrame)]
    assert len(pings) == 1 and "ACK" not in pings[0].flags
    assert pair.client.next_deadline() == 30.0  # waiting for the answer
    pair.server.receive_data(pings[0].serialize())
    pair.client.receive_data(pair.server.data_to_send())  # the ACK
    assert pair.client.next_deadline() == 20.0  # next ping
    pair.client.handle_timer(20.0)
    assert [f for f in parse_frames(pair.client.data_to_send()) if isinstance(f, PingFrame)]


def test_close_after_20_seconds_without_an_answer() -> None:
    pair = Pair()
    pair.client.handle_timer(10.0)
    pair.client.data_to_send()  # the PING is lost
    pair.client.handle_timer(29.9)
    assert not pair.client.closed
    with pytest.raises(KeepaliveTimeout, match="20 s"):
        pair.client.handle_timer(30.0)
    assert pair.client.closed
    (goaway,) = parse_frames(pair.client.data_to_send())
    assert isinstance(goaway, GoAwayFrame)
    assert pair.client.next_deadline() is None


def test_keepalive_off() -> None:
    pair = Pair(client_settings=HboneSettings(ping_interval=None))
    assert pair.client.next_deadline() is None
    pair.client.handle_timer(1000.0)
    assert not pair.client.data_to_send()


# -- protocol violations ------------------------------------------------------------------


def server_after_preface() -> HboneServer:
    server = HboneServer(LOCAL)
    server.start(0.0)
    client = raw_client()
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return server


def goaway_code(server: HboneServer) -> int:
    frames = [f for f in parse_frames(server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert len(frames) == 1
    return int(frames[0].error_code)


def test_garbage_instead_of_the_preface() -> None:
    server = HboneServer(LOCAL)
    server.start(0.0)
    server.data_to_send()
    with pytest.raises(ProtocolViolation) as caught:
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert caught.value.error_code == ErrorCodes.PROTOCOL_ERROR
    assert server.closed
    assert server.receive_data(b"more") == []  # ignored once closed


def test_oversized_headers_get_enhance_your_calm() -> None:
    server = server_after_preface()
    block = hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-big", "a" * 20_000)]
    )
    frame = HeadersFrame(1, block)
    frame.flags.add("END_HEADERS")
    with pytest.raises(ProtocolViolation) as caught:
        server.receive_data(frame.serialize())
    assert caught.value.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway_code(server) == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_frame_above_max_frame_size() -> None:
    server = server_after_preface()
    frame = DataFrame(1, bytes(1 * MiB + 1))
    with pytest.raises(ProtocolViolation) as caught:
        server.receive_data(frame.serialize())
    assert caught.value.error_code == ErrorCodes.FRAME_SIZE_ERROR
    assert goaway_code(server) == ErrorCodes.FRAME_SIZE_ERROR


def test_data_beyond_the_window_is_a_flow_control_error() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.server_frames()
    pair.client._h2.outbound_flow_control_window = 2**30  # a client that ignores our window
    pair.client._h2.streams[stream_id].outbound_flow_control_window = 2**30
    frames = b"".join(DataFrame(stream_id, bytes(MiB)).serialize() for _ in range(5))
    with pytest.raises(ProtocolViolation) as caught:
        pair.server.receive_data(frames)
    assert caught.value.error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_too_many_streams() -> None:
    pair = Pair(server_settings=HboneSettings(max_concurrent_streams=2))
    encoder = hpack.Encoder()
    data = b""
    for stream_id in (1, 3, 5):
        frame = HeadersFrame(
            stream_id, encoder.encode([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        )
        frame.flags.add("END_HEADERS")
        data += frame.serialize()
    with pytest.raises(ProtocolViolation) as caught:
        pair.server.receive_data(data)
    assert caught.value.error_code == ErrorCodes.PROTOCOL_ERROR


def test_a_push_promise_is_refused() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    from hyperframe.frame import PushPromiseFrame

    frame = PushPromiseFrame(stream_id, promised_stream_id=2, data=b"")
    frame.flags.add("END_HEADERS")
    with pytest.raises(ProtocolViolation):
        pair.client.receive_data(frame.serialize())
    assert pair.client.closed


def test_protocol_violation_fails_every_stream() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    with pytest.raises(ProtocolViolation):
        pair.server.receive_data(b"\x00\x00\x01\x09\x00\x00\x00\x00\x01x")  # naked CONTINUATION
    with pytest.raises(ConnectionUnavailable):
        pair.server.send_data(stream_id, b"x")


# -- GOAWAY and draining ------------------------------------------------------------------


def test_server_drain_lets_streams_finish() -> None:
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.server.start_draining()
    client_events, _ = pair.pump()
    assert client_events == [ConnectionEnded(0, stream_id, remote=True, graceful=True)]
    assert pair.client.draining and not pair.client.closed
    with pytest.raises(ConnectionUnavailable, match="draining"):
        pair.client.open_stream(ConnectRequest(TARGET))
    # The existing tunnel still carries data both ways.
    pair.client.send_data(stream_id, b"still here")
    pair.server.send_data(stream_id, b"me too")
    client_events, server_events = pair.pump()
    assert server_events == [DataReceived(stream_id, b"still here")]
    assert client_events == [DataReceived(stream_id, b"me too")]


def test_data_in_the_same_read_as_a_graceful_goaway_is_delivered() -> None:
    """h2 closes its state machine on any GOAWAY; DATA right behind a graceful one
    (one read) must still reach the tunnel, not reset the connection."""
    pair = Pair()
    stream_id = open_tunnel(pair)
    pair.server.start_draining()
    pair.server.send_data(stream_id, b"echo")
    events = pair.client.receive_data(pair.server.data_to_send())
    assert events == [
        ConnectionEnded(0, stream_id, remote=True, graceful=True),
        DataReceived(stream_id, b"echo"),
    ]
    assert not pair.client.closed
    # and our side can still send on that stream (nothing queued was dropped)
    pair.client.send_data(stream_id, b"reply")
    _, server_events = pair.pump()
    assert server_events == [DataReceived(stream_id, b"reply")]


def test_streams_above_the_goaway_are_refused() -> None:
    pair = Pair()
    first = open_tunnel(pair)
    second = pair.client.open_stream(ConnectRequest(TARGET))
    pair.server.start_draining()  # last stream: 1 (the request for 3 is still in flight)
    goaway = pair.server.data_to_send()
    client_events, server_events = pair.pump()  # the server sees stream 3 after its GOAWAY
    assert not [e for e in server_events if isinstance(e, TunnelRequested)]
    assert client_events == [StreamAborted(second, ErrorCodes.REFUSED_STREAM, remote=True)]
    client_events = pair.client.receive_data(goaway)
    assert client_events == [ConnectionEnded(0, first, remote=True, graceful=True)]
    assert pair.client.active_streams == 2  # until the caller releases them


def test_a_goaway_with_an_error_ends_everything() -> None:
    pair = Pair()
    open_tunnel(pair)
    pair.server.close(ErrorCodes.INTERNAL_ERROR)
    client_events, _ = pair.pump()
    assert client_events == [ConnectionEnded(ErrorCodes.INTERNAL_ERROR, 1, True, False)]
    assert pair.client.closed


def test_local_misuse() -> None:
    pair = Pair(start=False)
    with pytest.raises(LocalProtocolError, match="start"):
        pair.client.open_stream(ConnectRequest(TARGET))
    with pytest.raises(LocalProtocolError, match="start"):
        pair.server.receive_data(b"")
    pair.client.start(0.0)
    with pytest.raises(LocalProtocolError, match="already"):
        pair.client.start(0.0)
    with pytest.raises(LocalProtocolError, match="local IP"):
        HboneServer(None)
    with pytest.raises(LocalProtocolError):
        HboneServer("not-an-ip")
