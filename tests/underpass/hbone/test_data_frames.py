"""The DATA fast path of the sans-IO core against h2's own ``send_data``.

:meth:`HboneConnection.send_data` queues DATA frames itself instead of
calling h2's ``send_data`` (which copies every payload byte five times).
These tests run two identical clients side by side, one with the fast path
and one doing what the core did before (h2's ``send_data`` per frame), feed
both the same server bytes and require the same wire bytes, the same
flow-control windows and stream states, after every step of any sequence of
sends, acknowledgements, new streams, half-closes and SETTINGS changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import h2.errors
import h2.settings
import pytest
from hyperframe.frame import DataFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.underpass.hbone.support import parse_frames
from underpass.hbone.headers import ConnectRequest, SocketAddress, parse_traceparent
from underpass.hbone.protocol import (
    DataReceived,
    Event,
    HboneClient,
    HboneConnection,
    HboneServer,
    TunnelRequested,
)

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
LOCAL = "10.0.0.1"
TRACE = parse_traceparent(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")


def reference_send_data(
    core: HboneConnection, stream_id: int, data: bytes | bytearray | memoryview
) -> int:
    """What ``send_data`` did before the fast path: h2's ``send_data`` once per frame."""
    core._require(stream_id, "send_data")
    view = memoryview(data).cast("B")
    connection = core._h2
    allowed = min(len(view), connection.local_flow_control_window(stream_id))
    frame = connection.max_outbound_frame_size
    sent = 0
    while sent < allowed:
        size = min(allowed - sent, frame)
        connection.send_data(stream_id, view[sent : sent + size])
        sent += size
    return sent


def request(port: int) -> ConnectRequest:
    # A fixed traceparent: both clients must encode identical header blocks.
    return ConnectRequest(SocketAddress.of(LOCAL, port), traceparent=TRACE)


@dataclass
class Twins:
    """A fast-path client and a reference client, one server talking to both."""

    fast: HboneClient = field(default_factory=HboneClient)
    reference: HboneClient = field(default_factory=HboneClient)
    server: HboneServer = field(default_factory=lambda: HboneServer(LOCAL))
    streams: list[int] = field(default_factory=list)
    sent: dict[int, bytearray] = field(default_factory=dict)  # what the clients sent
    received: dict[int, bytearray] = field(default_factory=dict)  # what the server got
    unacked: dict[int, int] = field(default_factory=dict)  # server side, per stream

    def __post_init__(self) -> None:
        for core in (self.fast, self.reference, self.server):
            core.start(0.0)
        self.exchange()

    def exchange(self) -> None:
        """Move bytes until quiet; the two clients must send the same bytes and see the same."""
        while True:
            from_fast = self.fast.data_to_send()
            from_reference = self.reference.data_to_send()
            assert from_fast == from_reference
            to_clients = self.server.data_to_send()
            if not from_fast and not to_clients:
                break
            if from_fast:
                self._server_got(self.server.receive_data(from_fast))
            if to_clients:
                fast_events = self.fast.receive_data(to_clients)
                assert fast_events == self.reference.receive_data(to_clients)
        self.assert_same_state()

    def _server_got(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, TunnelRequested):
                self.server.accept(event.stream_id)
            elif isinstance(event, DataReceived):
                self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.unacked[event.stream_id] = self.unacked.get(event.stream_id, 0) + len(
                    event.data
                )

    def assert_same_state(self) -> None:
        fast, reference = self.fast._h2, self.reference._h2
        assert fast.outbound_flow_control_window == reference.outbound_flow_control_window
        assert fast.max_outbound_frame_size == reference.max_outbound_frame_size
        assert fast.state_machine.state == reference.state_machine.state
        assert fast.streams.keys() == reference.streams.keys()
        for stream_id, stream in fast.streams.items():
            twin = reference.streams[stream_id]
            assert stream.state_machine.state == twin.state_machine.state
            assert stream.outbound_flow_control_window == twin.outbound_flow_control_window

    # -- operations (each applied to both clients) ---------------------------------------

    def open(self) -> None:
        stream_id = self.fast.open_stream(request(8080))
        assert self.reference.open_stream(request(8080)) == stream_id
        self.streams.append(stream_id)
        self.sent[stream_id] = bytearray()
        self.exchange()

    def send(self, index: int, size: int, kind: str, seed: int) -> None:
        if not self.streams:
            return
        stream_id = self.streams[index % len(self.streams)]
        payload = random.Random(seed).randbytes(size + 3)
        if self.fast._streams[stream_id].local_ended:
            return
        fast_data, reference_data = _shaped(payload, kind), _shaped(payload, kind)
        accepted = self.fast.send_data(stream_id, fast_data)
        assert reference_send_data(self.reference, stream_id, reference_data) == accepted
        assert self.fast.send_window(stream_id) == self.reference.send_window(stream_id)
        if isinstance(fast_data, bytearray):
            fast_data[:] = bytes(len(fast_data))  # the caller reuses its buffer at once
        self.sent[stream_id] += payload[1 : 1 + accepted]
        self.exchange()

    def acknowledge(self, index: int, size: int) -> None:
        if not self.streams:
            return
        stream_id = self.streams[index % len(self.streams)]
        size = min(size, self.unacked.get(stream_id, 0))
        if size:
            self.server.acknowledge(stream_id, size)
            self.unacked[stream_id] -= size
        self.exchange()

    def end(self, index: int) -> None:
        if not self.streams:
            return
        stream_id = self.streams[index % len(self.streams)]
        self.fast.send_eof(stream_id)
        self.reference.send_eof(stream_id)
        self.exchange()

    def change_settings(self, max_frame_size: int, extra_window: int) -> None:
        """The server changes SETTINGS_MAX_FRAME_SIZE and raises INITIAL_WINDOW_SIZE."""
        window = self.server._h2.local_settings.initial_window_size + extra_window
        self.server._h2.update_settings(
            {
                h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_size,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            }
        )
        self.exchange()


def _shaped(payload: bytes, kind: str) -> bytes | bytearray | memoryview:
    """``payload[1:-2]`` as the given kind of buffer (borrowed or copied by the fast path)."""
    if kind == "bytes":
        return payload[1:-2]
    if kind == "bytes-view":
        return memoryview(payload)[1:-2]
    if kind == "bytearray":
        return bytearray(payload[1:-2])
    return memoryview(bytearray(payload))[1:-2]  # "bytearray-view"


KINDS = st.sampled_from(["bytes", "bytes-view", "bytearray", "bytearray-view"])
SIZES = st.one_of(st.integers(0, 70_000), st.integers(MiB - 2, MiB + 2), st.integers(0, 5 * MiB))
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("open")),
        st.tuples(st.just("send"), st.integers(0, 3), SIZES, KINDS, st.integers(0, 2**32)),
        st.tuples(st.just("acknowledge"), st.integers(0, 3), st.integers(0, 5 * MiB)),
        st.tuples(st.just("end"), st.integers(0, 3)),
        st.tuples(
            st.just("change_settings"),
            st.sampled_from([16_384, 16_385, 65_536, MiB, 2**24 - 1]),
            st.integers(0, 4 * MiB),
        ),
    ),
    max_size=14,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
def test_fast_path_matches_h2_byte_for_byte(operations: list[tuple[object, ...]]) -> None:
    twins = Twins()
    twins.open()
    for name, *arguments in operations:
        getattr(twins, str(name))(*arguments)
    for stream_id, data in twins.sent.items():
        assert twins.received.get(stream_id, bytearray()) == data


def test_frames_are_what_h2_would_send() -> None:
    twins = Twins()
    twins.open()
    stream_id = twins.streams[0]
    twins.fast.send_data(stream_id, memoryview(b"abc" * 1000)[1:])
    sizes = [2999]
    for size in (0, 1, 16_384, MiB, MiB + 1):
        twins.fast.send_data(stream_id, bytes(size))
        sizes += [s for s in (min(size, MiB), size - MiB) if s > 0]
    wire = twins.fast.data_to_send()
    frames = [f for f in parse_frames(wire) if isinstance(f, DataFrame)]
    assert [len(f.data) for f in frames] == sizes
    assert all(f.stream_id == stream_id and not f.flags for f in frames)
    assert frames[0].data == (b"abc" * 1000)[1:]


def test_a_mutable_buffer_is_copied_before_send_data_returns() -> None:
    twins = Twins()
    twins.open()
    stream_id = twins.streams[0]
    buffer = bytearray(b"original")
    assert twins.fast.send_data(stream_id, buffer) == len(buffer)
    buffer[:] = b"changed!"
    frames = [f for f in parse_frames(twins.fast.data_to_send()) if isinstance(f, DataFrame)]
    assert [f.data for f in frames] == [b"original"]


def test_output_keeps_its_order_with_h2s_own_frames() -> None:
    twins = Twins()
    twins.open()
    first = twins.streams[0]
    twins.fast.send_data(first, b"one")
    second = twins.fast.open_stream(request(9090))  # HEADERS between two DATA frames
    twins.fast.send_data(first, b"two")
    twins.fast.send_eof(first)
    kinds = [
        (type(f).__name__, f.stream_id, f.data if isinstance(f, DataFrame) else b"")
        for f in parse_frames(twins.fast.data_to_send())
    ]
    assert kinds == [
        ("DataFrame", first, b"one"),
        ("HeadersFrame", second, b""),
        ("DataFrame", first, b"two"),
        ("DataFrame", first, b""),  # END_STREAM
    ]


def test_partial_data_to_send_keeps_the_rest() -> None:
    twins = Twins()
    twins.open()
    stream_id = twins.streams[0]
    twins.fast.send_data(stream_id, b"x" * 100)
    twins.fast.reset_stream(stream_id)
    head = twins.fast._h2.data_to_send(20)
    tail = twins.fast._h2.data_to_send()
    frames = parse_frames(head + tail)
    assert len(head) == 20
    assert [type(f).__name__ for f in frames] == ["DataFrame", "RstStreamFrame"]


def test_a_goaway_with_an_error_drops_queued_data_as_h2_does() -> None:
    twins = Twins()
    twins.open()
    stream_id = twins.streams[0]
    twins.fast.send_data(stream_id, b"late")
    reference_send_data(twins.reference, stream_id, b"late")
    twins.server.close(h2.errors.ErrorCodes.INTERNAL_ERROR)
    goaway = twins.server.data_to_send()
    assert twins.fast.receive_data(goaway) == twins.reference.receive_data(goaway)
    assert twins.fast.data_to_send() == twins.reference.data_to_send() == b""
