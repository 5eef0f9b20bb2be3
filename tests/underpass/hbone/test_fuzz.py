"""Hypothesis over the sans-IO core: hostile bytes, odd header blocks, any API order."""

from __future__ import annotations

import hpack
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, RstStreamFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.underpass.hbone.support import Pair, parse_frames
from underpass.hbone.errors import HboneError, LocalProtocolError, ProtocolViolation
from underpass.hbone.headers import ConnectRequest, SocketAddress, parse_authority
from underpass.hbone.protocol import (
    DataReceived,
    HboneServer,
    HboneSettings,
    RequestRejected,
    TunnelRequested,
)

pytestmark = pytest.mark.unit

LOCAL = "10.0.0.1"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def started_server() -> HboneServer:
    server = HboneServer(LOCAL)
    server.start(0.0)
    server.data_to_send()
    return server


def feed(server: HboneServer, chunks: list[bytes]) -> list[object]:
    """Feed chunks; returns the events. Only the core's own errors may escape."""
    events: list[object] = []
    for chunk in chunks:
        try:
            events += server.receive_data(chunk)
        except ProtocolViolation:
            assert server.closed
            assert server.data_to_send()  # a GOAWAY for the peer
            break
        server.data_to_send()
    return events


@FUZZ
@given(st.lists(st.binary(max_size=2048), max_size=8))
def test_arbitrary_bytes_forward_nothing(chunks: list[bytes]) -> None:
    server = started_server()
    events = feed(server, chunks)
    assert not [e for e in events if isinstance(e, TunnelRequested | DataReceived)]


@FUZZ
@given(st.lists(st.binary(max_size=2048), max_size=8))
def test_arbitrary_bytes_after_a_valid_preface_forward_nothing(chunks: list[bytes]) -> None:
    server = started_server()
    pair = Pair(start=False)
    pair.client.start(0.0)
    events = feed(server, [pair.client.data_to_send(), *chunks])
    assert not [e for e in events if isinstance(e, TunnelRequested | DataReceived)]


_frame_types = st.integers(0, 12)


@FUZZ
@given(
    st.lists(
        st.tuples(_frame_types, st.integers(0, 255), st.integers(0, 7), st.binary(max_size=64)),
        max_size=12,
    )
)
def test_arbitrary_frames_forward_nothing(frames: list[tuple[int, int, int, bytes]]) -> None:
    """Well-framed but arbitrary frames (type, flags, stream, payload)."""
    server = started_server()
    pair = Pair(start=False)
    pair.client.start(0.0)
    wire = pair.client.data_to_send()
    for kind, flags, stream, payload in frames:
        header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
        wire += header + payload
    events = feed(server, [wire])
    assert not [e for e in events if isinstance(e, TunnelRequested | DataReceived)]


# -- header blocks ----------------------------------------------------------------------------

_names = st.sampled_from(
    [":method", ":authority", ":scheme", ":path", ":protocol", "host", "forwarded", "baggage",
     "traceparent", "x-other", "Upper", "connection", "te"]
)  # fmt: skip
_values = st.one_of(
    st.sampled_from(
        [
            "CONNECT",
            "GET",
            "connect",
            "10.0.0.1:80",
            "10.0.0.2:80",
            "[::1]:80",
            "[::ffff:10.0.0.1]:443",
            "10.0.0.1:0",
            "10.0.0.1:65535",
            "example.com:80",
            "trailers",
            "",
            " 10.0.0.1:80",
            "10.0.0.1:80 ",
            'for="1.2.3.4:5"',
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ]
    ),
    st.text(max_size=30),
)


@FUZZ
@given(
    st.lists(st.tuples(_names, _values), max_size=8),
    st.booleans(),
    st.sampled_from(["headers", "continuation"]),
)
def test_any_header_block_is_validated(
    headers: list[tuple[str, str]], end_stream: bool, framing: str
) -> None:
    server = started_server()
    pair = Pair(start=False)
    pair.client.start(0.0)
    block = hpack.Encoder().encode(headers)
    if framing == "headers":
        frame = HeadersFrame(1, block)
        frame.flags.add("END_HEADERS")
        wire = frame.serialize()
    else:
        head = HeadersFrame(1, block[:3])
        rest = ContinuationFrame(1, block[3:])
        rest.flags.add("END_HEADERS")
        wire = head.serialize() + rest.serialize()
    if end_stream:
        wire += DataFrame(1, b"", flags=["END_STREAM"]).serialize()
    events = feed(server, [pair.client.data_to_send(), wire])
    requests = [e for e in events if isinstance(e, TunnelRequested)]
    rejected = [e for e in events if isinstance(e, RequestRejected)]
    assert len(requests) + len(rejected) <= 1
    for event in rejected:
        assert event.status == 400
    for request in requests:
        first: dict[bytes, bytes] = {}
        for name, value in request.info.headers:
            first.setdefault(name, value)
        assert first[b":method"] == b"CONNECT"
        assert b":protocol" not in first
        assert parse_authority(first[b":authority"]) == request.info.authority
        assert str(request.info.authority.ip) == LOCAL


# -- any order of API calls on a pair -----------------------------------------------------------

_ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["open", "accept", "reject", "send", "eof", "reset", "release", "ack", "drain", "close"]
        ),
        st.booleans(),  # which side (True: client)
        st.integers(0, 5),  # which stream (index into the opened ones)
        st.integers(0, 3 * 1024 * 1024),  # a size
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
def test_our_client_and_server_never_break_http2_with_each_other(
    ops: list[tuple[str, bool, int, int]],
) -> None:
    """Whatever the callers do, in whatever order, the two cores stay within HTTP/2.

    Misuse raises LocalProtocolError (or ConnectionUnavailable) and sends
    nothing; no call ever makes the peer see a protocol violation.
    """
    pair = Pair(
        client_settings=HboneSettings(max_client_streams=4),
        server_settings=HboneSettings(max_concurrent_streams=4),
    )
    opened: list[int] = []
    for op, client_side, index, size in ops:
        side = pair.client if client_side else pair.server
        stream_id = opened[index % len(opened)] if opened else 1
        try:
            if op == "open":
                opened.append(pair.client.open_stream(ConnectRequest(SocketAddress.of(LOCAL, 80))))
            elif op == "accept":
                pair.server.accept(stream_id)
            elif op == "reject":
                pair.server.reject(stream_id, 503)
            elif op == "send":
                side.send_data(stream_id, bytes(size))
            elif op == "eof":
                side.send_eof(stream_id)
            elif op == "reset":
                side.reset_stream(stream_id)
            elif op == "release":
                side.release(stream_id)
            elif op == "ack":
                side.acknowledge(stream_id, size)
            elif op == "drain":
                side.start_draining()
            elif op == "close":
                side.close()
        except HboneError as exc:
            assert isinstance(exc, LocalProtocolError) or exc.error_code is not None
        pair.pump()  # must never raise ProtocolViolation
    # Neither side ever answered the other with a protocol error.
    frames = parse_frames(bytes(pair.c2s)) + parse_frames(bytes(pair.s2c))
    assert not [f for f in frames if isinstance(f, RstStreamFrame) and f.error_code == 1]
