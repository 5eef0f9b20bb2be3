"""Sans-IO HBONE: HTTP/2 CONNECT tunnels on top of ``h2``, bytes in, events out.

:class:`HboneClient` opens CONNECT streams; :class:`HboneServer` validates
incoming ones and lets its caller decide. Neither does I/O or reads a clock:
feed received bytes to :meth:`~HboneConnection.receive_data`, send what
:meth:`~HboneConnection.data_to_send` returns, and drive the keepalive with
:meth:`~HboneConnection.next_deadline` / :meth:`~HboneConnection.handle_timer`.
The trio adapters (:mod:`underpass.hbone.trio_adapter`) do exactly that.

Server checks, in order (PROTOCOLS.md section 2), each answered ``400`` with
nothing forwarded: the method is ``CONNECT`` (and no extended-CONNECT
``:protocol``); ``:authority`` parses as ``ip:port``; its IP is the IP the
TCP connection was addressed to, unless the server is a waypoint. A request
that passes becomes a :class:`TunnelRequested` event; the caller answers it
with :meth:`HboneServer.accept` (200, only once the upstream connect has
succeeded) or :meth:`HboneServer.reject` (401 policy, 503 no workload or
upstream failure). The client treats every status but 200 as a refusal.

Settings (PROTOCOLS.md section 2, :class:`HboneSettings`): stream window
4 MiB, connection window 16 MiB, max frame 1 MiB, 200 concurrent streams on
the server, no push, PING every 10 s, close after 20 s without an answer. Our
settings are in force from the first byte (h2 would otherwise apply them only
after the peer's ACK, e.g. cap a server at 100 streams for the first RTT).

Flow control: received DATA is counted per stream until the application says
it consumed it (:meth:`~HboneConnection.acknowledge`); h2's window manager
then sends WINDOW_UPDATE only once half a window has been consumed (2 MiB for
a stream, 8 MiB for the connection), not per frame. Sending never buffers
tunnel bytes: :meth:`~HboneConnection.send_data` takes what the windows
allow and returns how much; wait for :class:`SendWindowOpened` for the rest.

Sending DATA is the hot path of a tunnel, and h2 copies every payload byte
five times on the way out (into a hyperframe ``DataFrame``, into its body,
into the frame, into h2's output buffer, out of it): a third of a sending
ztunnel's time in bulk. ``send_data`` instead does exactly what h2's
``send_data`` does to h2's state (the connection and stream state machines,
both flow-control windows, per frame) and queues the 9-byte frame header and
the payload itself, in order with h2's own output: the payload is copied
once, when :meth:`~HboneConnection.data_to_send` joins the output (a
``bytes`` payload is immutable and is not copied before; anything else is
copied when queued, as the caller may reuse it). The frames are byte for byte
what h2 would send (tested against h2's own ``send_data`` with Hypothesis).

Stream life cycle, per stream the caller owns (opened with
:meth:`HboneClient.open_stream` or accepted with :meth:`HboneServer.accept`):
half-close is END_STREAM both ways (:meth:`~HboneConnection.send_eof`,
:class:`EndOfStream`); :meth:`~HboneConnection.reset_stream` aborts with
RST_STREAM; :meth:`~HboneConnection.release` hands the stream back exactly
once (it acknowledges unread data, so the connection window does not leak,
and resets the stream if it is still open).

Errors: bad peer input raises :class:`~underpass.hbone.errors.ProtocolViolation`
after queueing a GOAWAY with the right code (HTTP/2 errors, garbage, oversized
headers: ``ENHANCE_YOUR_CALM``); nothing from such input is forwarded. Misuse
raises :class:`~underpass.hbone.errors.LocalProtocolError` and changes nothing.

GOAWAY: h2 treats any GOAWAY, sent or received, as the end of the connection.
RFC 9113 section 6.8 lets streams up to the GOAWAY's last stream finish, which
is what draining needs, so after a graceful (``NO_ERROR``) GOAWAY this module
puts h2's connection state machine back to open and refuses new streams
itself. That and sending DATA are the only places it touches h2 beyond its
documented API (h2 4.x, checked by the tests).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hyperframe.frame
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from underpass.hbone.errors import (
    BadRequest,
    ConnectionUnavailable,
    KeepaliveTimeout,
    LocalProtocolError,
    ProtocolViolation,
    StreamLimitReached,
    show,
)
from underpass.hbone.headers import (
    ConnectRequest,
    Header,
    IPAddress,
    RequestInfo,
    build_request_headers,
    parse_authority,
    parse_baggage,
    parse_forwarded,
    parse_traceparent,
)

__all__ = [
    "ConnectionEnded",
    "DataReceived",
    "EndOfStream",
    "Event",
    "HboneClient",
    "HboneConnection",
    "HboneServer",
    "HboneSettings",
    "PeerSettingsChanged",
    "RequestRejected",
    "SendWindowOpened",
    "StreamAborted",
    "TunnelEstablished",
    "TunnelRejected",
    "TunnelRequested",
]

#: What the data methods take: anything ``memoryview`` accepts, in practice these.
Buffer = bytes | bytearray | memoryview

KiB = 1024
MiB = 1024 * KiB
_H2_DEFAULT_WINDOW = 65_535
_MAX_WINDOW = 2**31 - 1


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """HTTP/2 and keepalive parameters; the defaults are Istio ztunnel's.

    ``max_concurrent_streams`` is what a server advertises (a client
    advertises nothing: push is off, so the server cannot open streams).
    ``max_client_streams`` caps how many streams a client opens on one
    connection, whatever the server allows. ``ping_interval=None`` turns the
    keepalive off.
    """

    stream_window: int = 4 * MiB
    connection_window: int = 16 * MiB
    max_frame_size: int = 1 * MiB
    max_concurrent_streams: int = 200
    max_client_streams: int = 100
    max_header_list_size: int = 16 * KiB
    ping_interval: float | None = 10.0
    ping_timeout: float = 20.0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("stream_window", _H2_DEFAULT_WINDOW <= self.stream_window <= _MAX_WINDOW),
            ("connection_window", _H2_DEFAULT_WINDOW <= self.connection_window <= _MAX_WINDOW),
            ("max_frame_size", 16_384 <= self.max_frame_size <= 2**24 - 1),
            ("max_concurrent_streams", 1 <= self.max_concurrent_streams <= 2**31 - 1),
            ("max_client_streams", 1 <= self.max_client_streams <= 2**31 - 1),
            ("max_header_list_size", 1 * KiB <= self.max_header_list_size <= 16 * MiB),
            ("ping_interval", self.ping_interval is None or self.ping_interval > 0),
            ("ping_timeout", self.ping_timeout > 0),
        ]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise LocalProtocolError(f"HBONE settings out of range: {', '.join(bad)} ({self})")


# -- h2's per-frame repr ---------------------------------------------------------

_REPR_PREFIX = 11  # bytes: hyperframe shows 20 hex digits, then "..." if there is more


def _data_frame_body_repr(self: hyperframe.frame.DataFrame) -> str:
    """What hyperframe's ``DataFrame`` repr shows, from the first bytes only.

    h2 4.x builds ``repr(frame)`` for every received frame (an argument to a
    trace log that is off), and hyperframe's default ``DataFrame`` repr
    serializes and hex-encodes the whole payload to show 20 hex digits: three
    passes over every received byte, a fifth of a relay's CPU. Same text,
    constant cost.
    """
    head = self.serialize_padding_data() + bytes(self.data[:_REPR_PREFIX])
    size = len(self.serialize_padding_data()) + len(self.data) + self.pad_length
    if size == 0:
        return "None"
    head = (head + b"\0" * self.pad_length)[:_REPR_PREFIX]
    text = head.hex()
    if size > 10:
        return "<hex:" + text[:20] + "...>"
    return "<hex:" + text + ">"


if "_body_repr" not in vars(hyperframe.frame.DataFrame):
    hyperframe.frame.DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]


# -- events ----------------------------------------------------------------------


class Event:
    """Base class of the events :meth:`HboneConnection.receive_data` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class TunnelRequested(Event):
    """Server: a CONNECT passed the checks; answer with ``accept`` or ``reject``."""

    stream_id: int
    info: RequestInfo


@dataclass(frozen=True, slots=True)
class RequestRejected(Event):
    """Server: a request failed a check and was already answered ``status`` (400)."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelEstablished(Event):
    """Client: the server answered 200; the tunnel carries data now."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TunnelRejected(Event):
    """Client: the server answered ``status`` (``None``: unreadable); the stream is over."""

    stream_id: int
    status: int | None


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Tunnel bytes; acknowledge ``len(data)`` once the application has consumed them."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfStream(Event):
    """The peer half-closed the tunnel (END_STREAM): it sends nothing more."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamAborted(Event):
    """The stream was reset: by the peer (``remote``) or by this side on a stream error."""

    stream_id: int
    error_code: ErrorCodes | int
    remote: bool


@dataclass(frozen=True, slots=True)
class SendWindowOpened(Event):
    """More may be sent on ``stream_id`` (``0``: on every stream)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PeerSettingsChanged(Event):
    """The peer's SETTINGS changed what this side may do."""

    max_concurrent_streams: int


@dataclass(frozen=True, slots=True)
class ConnectionEnded(Event):
    """A GOAWAY arrived (``remote``) or the transport ended.

    ``graceful``: streams up to ``last_stream_id`` keep running to their end,
    no new stream may be opened. Otherwise every stream is dead.
    """

    error_code: ErrorCodes | int | None
    last_stream_id: int | None
    remote: bool
    graceful: bool


# -- stream bookkeeping ---------------------------------------------------------


class _State(enum.Enum):
    CONNECTING = "connecting"  # client: CONNECT sent, no answer yet
    PENDING = "pending"  # server: request validated, caller deciding
    OPEN = "open"  # 200 sent / received: tunnel carries data
    FAILED = "failed"  # refused, reset (either side), or the connection died


# Which caller operations each tunnel state allows (everything else is refused).
_ALLOWED: dict[str, frozenset[_State]] = {
    "accept": frozenset({_State.PENDING}),
    "reject": frozenset({_State.PENDING}),
    "send_data": frozenset({_State.OPEN}),
    "send_eof": frozenset({_State.OPEN}),
    "reset_stream": frozenset({_State.CONNECTING, _State.PENDING, _State.OPEN}),
}


class _Stream:
    __slots__ = ("id", "local_ended", "remote_ended", "state", "unacked")

    def __init__(self, stream_id: int, state: _State) -> None:
        self.id = stream_id
        self.state = state
        self.unacked = 0  # received bytes the application has not acknowledged
        self.local_ended = False
        self.remote_ended = False


def _status_of(headers: list[Header]) -> int | None:
    for name, value in headers:
        if name == b":status":
            return int(value) if value.isdigit() and len(value) == 3 else None
    return None


# -- the connection -------------------------------------------------------------


#: An HTTP/2 frame header: 24-bit length (as 16 + 8 bits), type, flags, stream ID.
_FRAME_HEADER = struct.Struct(">HBBBL")
_DATA_FRAME = 0x0


class _H2Connection(h2.connection.H2Connection):
    """h2's connection, with a graceful GOAWAY that keeps it open and DATA without copies.

    GOAWAY: h2 moves its state machine to CLOSED on any GOAWAY and drops what
    was queued to send. Frames that follow a graceful GOAWAY in the same read
    (DATA of the streams it lets finish, RFC 9113 section 6.8) would then be
    protocol errors and reset every stream. Here the state is put back to
    open at once, while the read is still being parsed, and nothing queued
    is dropped; a GOAWAY with an error code behaves as in h2.

    DATA: :meth:`send_data_frames` (module docstring). Output is
    ``_queued`` (h2's earlier output, DATA headers and payloads, in order)
    followed by h2's own buffer; ``data_to_send`` and
    ``clear_outbound_data_buffer`` treat both as one.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self._queued: list[bytes | memoryview] = []

    def send_data_frames(self, stream_id: int, view: memoryview, size: int) -> None:
        """Queue ``view[:size]`` as DATA frames of at most ``max_outbound_frame_size``.

        The same checks, state changes and bytes as h2's ``send_data`` called
        once per frame, without END_STREAM or padding. The caller has checked
        ``size`` against :meth:`local_flow_control_window`.
        """
        if size <= 0:
            return
        if size > self.local_flow_control_window(stream_id):  # also: the stream exists
            raise h2.exceptions.FlowControlError(
                f"Cannot send {size} bytes, flow control window is "
                f"{self.local_flow_control_window(stream_id)}"
            )
        stream = self.streams[stream_id]
        queued = self._queued
        earlier = super().data_to_send()
        if earlier:
            queued.append(earlier)
        # Immutable bytes can be referenced until the join; anything else may change.
        borrow = type(view.obj) is bytes
        limit = self.max_outbound_frame_size
        connection_machine = self.state_machine
        stream_machine = stream.state_machine
        pack = _FRAME_HEADER.pack
        sent = 0
        while sent < size:
            length = min(size - sent, limit)
            connection_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
            stream_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
            stream.outbound_flow_control_window -= length
            self.outbound_flow_control_window -= length
            payload = view[sent : sent + length]
            queued.append(pack(length >> 8, length & 0xFF, _DATA_FRAME, 0, stream_id & 0x7FFFFFFF))
            queued.append(payload if borrow else bytes(payload))
            sent += length

    def data_to_send(self, amount: int | None = None) -> bytes:
        if not self._queued:
            return super().data_to_send(amount)
        queued = self._queued
        rest = super().data_to_send()
        if rest:
            queued.append(rest)
        data = b"".join(queued)
        queued.clear()
        if amount is not None and amount < len(data):
            queued.append(data[amount:])
            data = data[:amount]
        return data

    def clear_outbound_data_buffer(self) -> None:
        self._queued.clear()
        super().clear_outbound_data_buffer()

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            result: tuple[list[Any], list[Any]] = super()._receive_goaway_frame(frame)
            return result
        state = self.state_machine.state
        events: list[Any] = self.state_machine.process_input(
            h2.connection.ConnectionInputs.RECV_GOAWAY
        )
        self.state_machine.state = state
        terminated = h2.events.ConnectionTerminated()
        terminated.error_code = ErrorCodes.NO_ERROR
        terminated.last_stream_id = frame.last_stream_id
        terminated.additional_data = frame.additional_data or None
        events.append(terminated)
        return [], events


class HboneConnection:
    """What client and server share: settings, flow control, keepalive, GOAWAY."""

    client_side: ClassVar[bool]

    def __init__(self, settings: HboneSettings | None = None) -> None:
        self.settings = settings if settings is not None else HboneSettings()
        self._h2 = _H2Connection(
            h2.config.H2Configuration(client_side=self.client_side, header_encoding=None)
        )
        self._streams: dict[int, _Stream] = {}
        self._started = False
        self._closed = False  # no more frames either way
        self._draining = False  # no new streams (we or the peer sent a graceful GOAWAY)
        self._goaway_last_stream: int | None = None  # our graceful GOAWAY's last stream
        self._ping_counter = 0
        self._ping_outstanding: bytes | None = None
        self._ping_sent_at = 0.0
        self._next_ping_at: float | None = None
        self._dispatch: dict[type[h2.events.Event], Callable[[Any, list[Event]], None]] = {
            h2.events.RequestReceived: self._on_request,
            h2.events.ResponseReceived: self._on_response,
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.WindowUpdated: self._on_window_updated,
            h2.events.RemoteSettingsChanged: self._on_settings,
            h2.events.PingAckReceived: self._on_ping_ack,
            h2.events.ConnectionTerminated: self._on_goaway,
            # Ignored: informational (1xx) responses, trailers, our SETTINGS' ACK,
            # PINGs (h2 answers them), PRIORITY, ALTSVC, unknown extension frames.
        }

    # -- lifecycle ----------------------------------------------------------------

    def start(self, now: float = 0.0) -> None:
        """Queue the preface, our SETTINGS and the connection WINDOW_UPDATE."""
        if self._started:
            raise LocalProtocolError("the HBONE connection was already started")
        self._started = True
        s = self.settings
        values: dict[SettingCodes, int] = {
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
        }
        if not self.client_side:
            values[SettingCodes.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        # In force from now on rather than after the peer's ACK (see module doc):
        # h2 treats a Settings object's initial values as acknowledged.
        self._h2.local_settings = h2.settings.Settings(
            client=self.client_side, initial_values=values
        )
        self._h2.max_inbound_frame_size = s.max_frame_size
        self._h2.decoder.max_header_list_size = s.max_header_list_size
        self._h2.initiate_connection()
        if s.connection_window > _H2_DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(s.connection_window - _H2_DEFAULT_WINDOW)
        if s.ping_interval is not None:
            self._next_ping_at = now + s.ping_interval

    @property
    def closed(self) -> bool:
        """No more frames will be exchanged (fatal error, final GOAWAY, keepalive timeout)."""
        return self._closed

    @property
    def draining(self) -> bool:
        """A graceful GOAWAY was sent or received: existing streams only."""
        return self._draining

    @property
    def active_streams(self) -> int:
        """Streams the caller has not released yet."""
        return len(self._streams)

    def data_to_send(self) -> bytes:
        """The bytes to write to the transport now (empty when there are none)."""
        return self._h2.data_to_send()

    def receive_data(self, data: Buffer) -> list[Event]:
        """Feed bytes read from the transport; returns what they meant.

        Raises :class:`~underpass.hbone.errors.ProtocolViolation` when the
        peer broke HTTP/2: a GOAWAY is queued (send it, then close), the
        connection is closed, and no event of that input is returned.
        """
        if not self._started:
            raise LocalProtocolError("start() the HBONE connection before feeding it bytes")
        if self._closed:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = exc.error_code or ErrorCodes.PROTOCOL_ERROR
            if self._h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                # h2 queues a GOAWAY for errors in frames, not for a bad preface.
                self._h2.close_connection(code)
            self._fail_all()
            raise ProtocolViolation(f"the peer broke HTTP/2: {exc}", code) from exc
        except Exception as exc:
            # Hostile input found an error h2 does not classify: fail closed.
            self._goaway(ErrorCodes.PROTOCOL_ERROR)
            raise ProtocolViolation(
                f"the peer sent bytes h2 cannot parse: {type(exc).__name__}: {exc}",
                ErrorCodes.PROTOCOL_ERROR,
            ) from exc
        events: list[Event] = []
        for h2_event in h2_events:
            handler = self._dispatch.get(type(h2_event))
            if handler is not None:
                handler(h2_event, events)
        return events

    def receive_eof(self) -> list[Event]:
        """The transport ended (EOF or error): every stream is dead."""
        if self._closed:
            return []
        self._fail_all()
        return [ConnectionEnded(None, None, remote=True, graceful=False)]

    def close(self, error_code: ErrorCodes | int = ErrorCodes.NO_ERROR) -> None:
        """Queue a final GOAWAY; nothing else will be sent or accepted."""
        if not self._started:
            raise LocalProtocolError("start() the HBONE connection before closing it")
        if not self._closed:
            self._goaway(error_code)

    def start_draining(self) -> None:
        """Refuse new streams and let the open ones finish.

        A server sends a graceful GOAWAY naming the last stream it will serve;
        a client only stops opening streams (it closes with :meth:`close` once
        its streams are released).
        """
        if self._closed or self._draining:
            return
        self._draining = True
        if not self.client_side:
            last = self._h2.highest_inbound_stream_id
            self._goaway_last_stream = last
            self._h2.close_connection(ErrorCodes.NO_ERROR, None, last)
            self._reopen_h2()

    # -- keepalive ----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` has something to do (``None``: never)."""
        if self._closed or self.settings.ping_interval is None or not self._started:
            return None
        if self._ping_outstanding is not None:
            return self._ping_sent_at + self.settings.ping_timeout
        return self._next_ping_at

    def handle_timer(self, now: float) -> None:
        """Send the next PING when due; close the connection when one went unanswered.

        Raises :class:`~underpass.hbone.errors.KeepaliveTimeout` (a GOAWAY is
        queued, the connection is closed) on the timeout. Early calls are harmless.
        """
        interval = self.settings.ping_interval
        if self._closed or interval is None or not self._started:
            return
        if self._ping_outstanding is not None:
            if now >= self._ping_sent_at + self.settings.ping_timeout:
                self._goaway(ErrorCodes.NO_ERROR, b"ping timeout")
                raise KeepaliveTimeout(
                    f"the HBONE peer did not answer a PING within {self.settings.ping_timeout:g} s"
                )
            return
        if self._next_ping_at is not None and now >= self._next_ping_at:
            self._ping_counter += 1
            opaque = self._ping_counter.to_bytes(8, "big")
            self._h2.ping(opaque)
            self._ping_outstanding = opaque
            self._ping_sent_at = now
            self._next_ping_at = now + interval

    # -- data ---------------------------------------------------------------------

    def send_data(self, stream_id: int, data: Buffer) -> int:
        """Queue as much of ``data`` as the flow-control windows allow; returns how much.

        Frames are at most the peer's max frame size. ``0`` means the windows
        are shut: wait for :class:`SendWindowOpened`.
        """
        self._require(stream_id, "send_data")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        allowed = min(len(view), self._h2.local_flow_control_window(stream_id))
        if allowed > 0:
            self._h2.send_data_frames(stream_id, view, allowed)
            return allowed
        return 0

    def send_window(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` would take on ``stream_id`` now."""
        self._require(stream_id, "send_data")
        return self._h2.local_flow_control_window(stream_id)

    def send_eof(self, stream_id: int) -> None:
        """Half-close: END_STREAM on ``stream_id`` (the peer sees the tunnel's FIN)."""
        stream = self._require(stream_id, "send_eof")
        if stream.local_ended:
            return
        self._h2.end_stream(stream_id)
        stream.local_ended = True

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The application consumed ``size`` received bytes of ``stream_id``.

        WINDOW_UPDATEs follow in batches (half a window). Acknowledging more
        than was received, or on a released stream, does nothing.
        """
        stream = self._streams.get(stream_id)
        if stream is None or size <= 0:
            return
        size = min(size, stream.unacked)
        if size and not self._closed:
            stream.unacked -= size
            self._h2.acknowledge_received_data(size, stream_id)

    def reset_stream(
        self, stream_id: int, error_code: ErrorCodes | int = ErrorCodes.CANCEL
    ) -> None:
        """Abort ``stream_id`` with RST_STREAM (no-op when it is already over)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is _State.FAILED:
            return
        if not self._closed and self._h2_open(stream_id):
            self._h2.reset_stream(stream_id, error_code)
        stream.state = _State.FAILED

    def release(self, stream_id: int) -> None:
        """The caller is done with ``stream_id``: return its unread bytes to the windows.

        A stream still open is ended: with END_STREAM when both sides are done
        but ours and nothing is unread, else reset with ``CANCEL``.
        """
        stream = self._streams.pop(stream_id, None)
        if stream is None or self._closed:
            return
        unread = stream.unacked
        if unread:
            # h2 hands a closed stream's bytes back to the connection window only.
            self._h2.acknowledge_received_data(unread, stream_id)
            stream.unacked = 0
        if stream.state is not _State.FAILED and self._h2_open(stream_id):
            if stream.state is _State.OPEN and stream.remote_ended and not unread:
                if not stream.local_ended:
                    self._h2.end_stream(stream_id)
            else:
                self._h2.reset_stream(stream_id, ErrorCodes.CANCEL)

    # -- internals ----------------------------------------------------------------

    def _require(self, stream_id: int, operation: str) -> _Stream:
        if self._closed:
            raise ConnectionUnavailable(f"the HBONE connection is closed; cannot {operation}")
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not an open tunnel here")
        if stream.state not in _ALLOWED[operation]:
            raise LocalProtocolError(
                f"cannot {operation} on stream {stream_id} in state {stream.state.value}"
            )
        if operation in ("send_data", "send_eof") and stream.local_ended:
            if operation == "send_eof":
                return stream
            raise LocalProtocolError(f"stream {stream_id} was half-closed; cannot send more")
        return stream

    def _goaway(self, error_code: ErrorCodes | int, debug: bytes | None = None) -> None:
        if not self._closed:
            self._h2.close_connection(error_code, debug)
        self._fail_all()

    def _fail_all(self) -> None:
        self._closed = True
        for stream in self._streams.values():
            stream.state = _State.FAILED

    def _reopen_h2(self) -> None:
        """Put h2's connection state machine back to open after a graceful GOAWAY."""
        self._h2.state_machine.state = (
            h2.connection.ConnectionState.CLIENT_OPEN
            if self.client_side
            else h2.connection.ConnectionState.SERVER_OPEN
        )

    def _h2_open(self, stream_id: int) -> bool:
        """Whether h2 still has ``stream_id`` open.

        h2 parses a whole read before it returns events, so while events are
        handled its view can be ahead of ours (a RST_STREAM later in the same
        read has already closed the stream): ask h2 before touching a stream.
        """
        stream = self._h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def _on_request(self, event: h2.events.RequestReceived, events: list[Event]) -> None:
        """Overridden by the server; h2 refuses requests on a client connection."""

    def _on_response(self, event: h2.events.ResponseReceived, events: list[Event]) -> None:
        """Overridden by the client; h2 refuses responses on a server connection."""

    def _on_data(self, event: h2.events.DataReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        size = event.flow_controlled_length or 0
        stream = self._streams.get(stream_id) if stream_id is not None else None
        if stream is None or stream.state is _State.FAILED or stream_id is None:
            # Not ours (rejected, released, reset): discard, return the window.
            if size and stream_id is not None:
                self._h2.acknowledge_received_data(size, stream_id)
            return
        if stream.state is _State.CONNECTING:
            # DATA before the response: a malformed response (RFC 9113 8.1.1).
            self._h2.acknowledge_received_data(size, stream_id)
            if self._h2_open(stream_id):
                self._h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            stream.state = _State.FAILED
            events.append(StreamAborted(stream_id, ErrorCodes.PROTOCOL_ERROR, remote=False))
            return
        stream.unacked += size
        data = event.data or b""
        padding = size - len(data)
        if padding > 0:  # padding is flow-controlled but never reaches the application
            stream.unacked -= padding
            self._h2.acknowledge_received_data(padding, stream_id)
        if data:
            events.append(DataReceived(stream_id, data))

    def _on_stream_ended(self, event: h2.events.StreamEnded, events: list[Event]) -> None:
        stream = self._streams.get(event.stream_id or 0)
        if stream is None or stream.state is _State.FAILED:
            return
        stream.remote_ended = True
        if stream.state is _State.CONNECTING:
            return  # reported with the response (a status with END_STREAM)
        events.append(EndOfStream(stream.id))

    def _on_stream_reset(self, event: h2.events.StreamReset, events: list[Event]) -> None:
        stream = self._streams.get(event.stream_id or 0)
        if stream is None or stream.state is _State.FAILED:
            return
        stream.state = _State.FAILED
        code = event.error_code if event.error_code is not None else ErrorCodes.INTERNAL_ERROR
        events.append(StreamAborted(stream.id, code, remote=event.remote_reset))

    def _on_window_updated(self, event: h2.events.WindowUpdated, events: list[Event]) -> None:
        events.append(SendWindowOpened(event.stream_id or 0))

    def _on_settings(self, event: h2.events.RemoteSettingsChanged, events: list[Event]) -> None:
        changed = event.changed_settings
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            events.append(SendWindowOpened(0))
        if SettingCodes.MAX_CONCURRENT_STREAMS in changed:
            events.append(PeerSettingsChanged(self._h2.remote_settings.max_concurrent_streams))

    def _on_ping_ack(self, event: h2.events.PingAckReceived, events: list[Event]) -> None:
        if event.ping_data == self._ping_outstanding:
            self._ping_outstanding = None

    def _on_goaway(self, event: h2.events.ConnectionTerminated, events: list[Event]) -> None:
        code = event.error_code if event.error_code is not None else ErrorCodes.PROTOCOL_ERROR
        last = event.last_stream_id or 0
        if code != ErrorCodes.NO_ERROR:
            self._fail_all()
            events.append(ConnectionEnded(code, last, remote=True, graceful=False))
            return
        # Graceful: streams up to `last` go on (see the module docstring).
        self._draining = True
        self._reopen_h2()
        for stream in self._streams.values():
            if self.client_side and stream.id > last and stream.state is not _State.FAILED:
                # Never seen by the server: safe to retry on another connection.
                stream.state = _State.FAILED
                events.append(StreamAborted(stream.id, ErrorCodes.REFUSED_STREAM, remote=True))
        events.append(ConnectionEnded(code, last, remote=True, graceful=True))


class HboneClient(HboneConnection):
    """The client side: opens CONNECT streams, one per tunnelled TCP connection."""

    client_side = True

    @property
    def max_streams(self) -> int:
        """Streams this connection may carry at once: min(our cap, the peer's SETTINGS)."""
        peer = self._h2.remote_settings.max_concurrent_streams
        return min(self.settings.max_client_streams, peer)

    @property
    def available_streams(self) -> int:
        """How many more streams :meth:`open_stream` would accept now."""
        if self._closed or self._draining or not self._started:
            return 0
        by_cap = self.max_streams - len(self._streams)
        by_peer = self._h2.remote_settings.max_concurrent_streams - self._h2.open_outbound_streams
        return max(0, min(by_cap, by_peer))

    def open_stream(self, request: ConnectRequest) -> int:
        """Queue a CONNECT for ``request``; returns its stream ID.

        Wait for :class:`TunnelEstablished` before sending. Raises
        :class:`~underpass.hbone.errors.StreamLimitReached` when no slot is
        free and :class:`~underpass.hbone.errors.ConnectionUnavailable` when
        the connection is draining or closed; nothing is sent then.
        """
        if not self._started:
            raise LocalProtocolError("start() the HBONE connection before opening streams")
        if self._closed or self._draining:
            raise ConnectionUnavailable(
                "the HBONE connection is "
                + ("closed" if self._closed else "draining")
                + "; open the tunnel on a new connection"
            )
        if self.available_streams <= 0:
            raise StreamLimitReached(
                f"the HBONE connection carries {len(self._streams)} streams, its limit is "
                f"{self.max_streams}; open another connection"
            )
        headers = build_request_headers(request)
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError:
            self._draining = True
            raise ConnectionUnavailable(
                "the HBONE connection has used all its stream IDs; open a new connection"
            ) from None
        self._h2.send_headers(stream_id, headers)
        self._streams[stream_id] = _Stream(stream_id, _State.CONNECTING)
        return stream_id

    def _on_response(self, event: h2.events.ResponseReceived, events: list[Event]) -> None:
        stream = self._streams.get(event.stream_id or 0)
        if stream is None or stream.state is not _State.CONNECTING:
            return
        status = _status_of(event.headers or [])
        if status == 200:
            # An END_STREAM with it arrives as its own event, after this one.
            stream.state = _State.OPEN
            events.append(TunnelEstablished(stream.id))
            return
        if self._h2_open(stream.id):
            self._h2.reset_stream(stream.id, ErrorCodes.CANCEL)
        stream.state = _State.FAILED
        events.append(TunnelRejected(stream.id, status))


class HboneServer(HboneConnection):
    """The server side: validates CONNECTs, the caller accepts or rejects them.

    ``local_ip`` is the IP the TCP connection was addressed to; the
    ``:authority`` must name it unless ``waypoint`` is true (a waypoint
    forwards to other addresses and passes ``local_ip=None``).
    """

    client_side = False

    def __init__(
        self,
        local_ip: IPAddress | str | None,
        *,
        waypoint: bool = False,
        settings: HboneSettings | None = None,
    ) -> None:
        super().__init__(settings)
        if local_ip is None:
            if not waypoint:
                raise LocalProtocolError(
                    "an HBONE server that is not a waypoint needs the connection's local IP"
                )
            self.local_ip: IPAddress | None = None
        else:
            try:
                ip = ipaddress.ip_address(local_ip)
            except ValueError as exc:
                raise LocalProtocolError(f"local IP {local_ip!r} is not an address") from exc
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            self.local_ip = ip
        self.waypoint = waypoint

    def accept(self, stream_id: int) -> None:
        """Answer 200: call only after the upstream connection succeeded."""
        stream = self._require(stream_id, "accept")
        self._h2.send_headers(stream_id, [(b":status", b"200")])
        stream.state = _State.OPEN

    def reject(self, stream_id: int, status: int) -> None:
        """Answer ``status`` (401 policy, 503 no workload / upstream failure) and end it.

        The stream is released: its buffered bytes are handed back.
        """
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise LocalProtocolError(f"a refusal needs a 4xx or 5xx status, not {status!r}")
        stream = self._require(stream_id, "reject")
        self._answer_and_end(stream_id, status)
        stream.state = _State.FAILED
        stream.local_ended = True
        self.release(stream_id)

    def _answer_and_end(self, stream_id: int, status: int) -> None:
        self._h2.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=True)
        if self._h2_open(stream_id):
            # The client may stop sending: the answer is complete (RFC 9113 8.1).
            self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def _on_request(self, event: h2.events.RequestReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        if stream_id is None:  # pragma: no cover - h2 always sets it
            return
        if not self._h2_open(stream_id):
            return  # reset by the client later in the same read: nothing to answer
        if self._goaway_last_stream is not None and stream_id > self._goaway_last_stream:
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        headers = list(event.headers or [])
        try:
            info = self._validate(stream_id, headers)
        except BadRequest as exc:
            self._answer_and_end(stream_id, 400)
            events.append(RequestRejected(stream_id, 400, str(exc)))
            return
        stream = _Stream(stream_id, _State.PENDING)
        self._streams[stream_id] = stream
        events.append(TunnelRequested(stream_id, info))

    def _validate(self, stream_id: int, headers: list[Header]) -> RequestInfo:
        first: dict[bytes, bytes] = {}
        for name, value in headers:
            first.setdefault(name, value)
        method = first.get(b":method")
        if method != b"CONNECT":
            raise BadRequest(
                f"method {show(method or b'')} is not CONNECT; HBONE carries only CONNECT"
            )
        if b":protocol" in first:
            raise BadRequest("extended CONNECT (:protocol) is not HBONE")
        raw_authority = first.get(b":authority")
        if raw_authority is None:
            raise BadRequest("the CONNECT has no :authority")
        authority = parse_authority(raw_authority)
        if not self.waypoint and authority.ip != self.local_ip:
            raise BadRequest(
                f":authority {authority} names {authority.ip}, but the connection was "
                f"addressed to {self.local_ip}"
            )
        forwarded = first.get(b"forwarded")
        baggage = first.get(b"baggage")
        trace = first.get(b"traceparent")
        return RequestInfo(
            stream_id=stream_id,
            authority=authority,
            forwarded=parse_forwarded(forwarded) if forwarded is not None else None,
            baggage=parse_baggage(baggage) if baggage is not None else None,
            traceparent=parse_traceparent(trace) if trace is not None else None,
            headers=tuple(headers),
        )
