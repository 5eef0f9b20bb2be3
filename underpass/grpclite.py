"""A small gRPC client on trio: HTTP/2 (``h2``) over TCP, TLS or a unix socket.

Owns the gRPC wire format on the client side, so that a process that only
*calls* gRPC services (ztunnel: Delta ADS to the control plane, CSRs to the
CA) need not load grpcio, its threads and its buffers. Servers stay on grpcio.

Two layers, in the h2 style (DESIGN.md, "Protocol code"):

- **sans-IO** (no sockets, no clock): :func:`encode_message` /
  :class:`MessageReader` (the 5-byte length prefix: 1-byte compressed flag +
  4-byte big-endian length), :func:`request_headers`, :func:`encode_timeout`,
  :func:`decode_grpc_message` (``grpc-message`` is percent-encoded UTF-8),
  :func:`status_from_headers` and :class:`GrpcProtocol`, one client
  connection: :meth:`~GrpcProtocol.start_call`, :meth:`~GrpcProtocol.send_message`,
  :meth:`~GrpcProtocol.end_requests`, :meth:`~GrpcProtocol.cancel`,
  :meth:`~GrpcProtocol.release`, :meth:`~GrpcProtocol.receive_data` returning
  :data:`Event` s, :meth:`~GrpcProtocol.data_to_send`.
- **trio** adapter: :func:`connect` opens a :class:`Connection` (one HTTP/2
  connection, a reader task and a keepalive task in a nursery of its own);
  :meth:`Connection.stream` opens a :class:`Call` (bidirectional stream),
  :meth:`Connection.unary` makes one request/response call;
  :func:`unary_call` does connect + unary + close in one go.

Targets (:class:`Target`): ``host:port`` (``[v6]:port`` for IPv6; names are
resolved, addresses tried in order), ``unix:<path>`` or ``unix:///<path>``
(a local socket; ``:authority`` is ``localhost``, as grpcio sends it). TLS
(:class:`TlsSettings`): the server's certificate is verified against the
given roots only (no system store) and must name ``server_name`` (default:
the target's host; an IP is checked against IP SANs); ALPN must select
``h2``. Without TLS the call goes in clear (``:scheme http``): for unix
sockets and the control plane's plaintext port 15010.

Behaviour:

- Flow control: received bytes are acknowledged once the application has
  taken the message they carry (so a slow reader holds back the server, not
  our memory), except for a message still being received, whose bytes are
  acknowledged as they arrive (a message may be larger than the window).
  h2 batches the WINDOW_UPDATEs. Sends queue what the peer's window does
  not take yet; :meth:`Call.send` waits until its message is on the wire.
- Messages larger than ``max_message_size`` (either way) end the call with
  RESOURCE_EXHAUSTED; compressed messages (we offer no compression) and
  truncated ones end it with INTERNAL.
- Deadlines: ``timeout`` sends ``grpc-timeout`` and is enforced locally as
  well (DEADLINE_EXCEEDED, and the stream is cancelled).
- Cancellation: leaving :meth:`Connection.stream` before the call ended sends
  RST_STREAM(CANCEL); leaving :func:`connect` sends GOAWAY and closes.
- Keepalive: while a call is open, a PING every ``keepalive_interval``; no
  answer within ``keepalive_timeout`` fails the connection (UNAVAILABLE).
- A graceful GOAWAY lets the calls it covers finish and refuses new ones; a
  GOAWAY with an error, a broken or closed connection end every call with
  UNAVAILABLE; a server that breaks HTTP/2 or gRPC framing gets a GOAWAY and
  its calls end with INTERNAL.

Errors: every failure of a call is a :class:`GrpcError` carrying the
:class:`StatusCode` and the message, with ``remote`` telling the server's
status (from ``grpc-status``) from one we decided here. Misuse of the API
(bad metadata, a closed call) is ``ValueError`` / :class:`GrpcUsageError`.
Metadata values never appear in errors (they carry bearer tokens).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import errno
import itertools
import math
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, NoReturn

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from underpass.hbone.stream import SocketStream, TlsSocketStream, set_tcp_keepalive

#: What grpcio accepts by default for a received message.
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024
#: Our stream window: how much a server may send on one call before we take it.
DEFAULT_STREAM_WINDOW: Final = 1024 * 1024
#: Our connection window.
DEFAULT_CONNECTION_WINDOW: Final = 2 * 1024 * 1024
USER_AGENT: Final = "underpass-grpclite/0.1"
#: The largest response header block we accept (gRPC's default is 8 KiB; some room).
MAX_HEADER_LIST_SIZE: Final = 64 * 1024
#: How long cleanup may spend telling the server (RST_STREAM, GOAWAY) before closing anyway.
CLOSE_TIMEOUT: Final = 1.0

_PREFIX: Final = 5  # compressed flag + 4-byte length
_H2_DEFAULT_WINDOW: Final = 65535


class StatusCode(enum.IntEnum):
    """gRPC status codes (values as on the wire)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(Exception):
    """A call failed: ``code`` and ``details`` (the server's ``grpc-message``, or ours).

    ``remote`` is True when the server ended the call with this status, False
    when we did (connection failure, deadline, malformed response).
    """

    def __init__(self, code: StatusCode, details: str, *, remote: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.remote = remote


class GrpcUsageError(Exception):
    """The API was misused (a call used after it ended, a connection after it closed)."""


# -- the message format -----------------------------------------------------------------------


def encode_message(payload: bytes) -> bytes:
    """One length-prefixed message (uncompressed)."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class MessageReader:
    """Splits a call's DATA into messages; fails closed on what it cannot take.

    Raises :class:`GrpcError` RESOURCE_EXHAUSTED for a message announced
    larger than ``max_size`` (before buffering it), INTERNAL for a compressed
    one (we never offer compression) or an unknown flag.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._wanted: int | None = None  # payload length of the message being read

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held (prefix included)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; returns the messages they complete, in order."""
        self._buffer += data
        messages: list[bytes] = []
        while True:
            if self._wanted is None:
                if len(self._buffer) < _PREFIX:
                    return messages
                flag = self._buffer[0]
                length = int.from_bytes(self._buffer[1:_PREFIX], "big")
                if flag == 1:
                    raise GrpcError(
                        StatusCode.INTERNAL,
                        "the server sent a compressed message, but this client offers no "
                        "compression (grpc-accept-encoding: identity)",
                    )
                if flag != 0:
                    raise GrpcError(
                        StatusCode.INTERNAL,
                        f"the server sent a message with flags 0x{flag:02x}: not gRPC framing",
                    )
                if length > self.max_size:
                    raise GrpcError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"the server sent a message of {length} bytes, more than the "
                        f"{self.max_size} this client accepts",
                    )
                self._wanted = length
            end = _PREFIX + self._wanted
            if len(self._buffer) < end:
                return messages
            messages.append(bytes(self._buffer[_PREFIX:end]))
            del self._buffer[:end]
            self._wanted = None


# -- headers ----------------------------------------------------------------------------------

MetadataValue = str | bytes
Metadata = Sequence[tuple[str, MetadataValue]]

_METADATA_KEY = re.compile(r"[0-9a-z_.\-]+")
_RESERVED_KEYS: Final = frozenset(
    {
        "te",
        "content-type",
        "user-agent",
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    }
)
_TIMEOUT_UNITS: Final = (
    ("n", 1e9),
    ("u", 1e6),
    ("m", 1e3),
    ("S", 1.0),
    ("M", 1 / 60),
    ("H", 1 / 3600),
)


def encode_timeout(seconds: float) -> str:
    """``grpc-timeout``: at most 8 digits and a unit, rounded up (never 0)."""
    if not seconds > 0:
        raise ValueError(f"a gRPC timeout must be positive, got {seconds}")
    for unit, per_second in _TIMEOUT_UNITS:
        value = math.ceil(seconds * per_second)
        if value < 100_000_000:
            return f"{max(value, 1)}{unit}"
    return "99999999H"


def _check_metadata(metadata: Metadata) -> list[tuple[bytes, bytes]]:
    """Metadata as header bytes; ValueError naming the key (never the value) if unusable."""
    headers = []
    for key, value in metadata:
        if not _METADATA_KEY.fullmatch(key) or key.startswith("grpc-") or key in _RESERVED_KEYS:
            raise ValueError(
                f"{key!r} cannot be gRPC metadata: keys are lowercase [0-9a-z_.-], "
                "and grpc-*, te, content-type, user-agent and HTTP/1 connection headers "
                "are reserved"
            )
        if key.endswith("-bin"):
            raw = value.encode() if isinstance(value, str) else value
            encoded = base64.b64encode(raw).rstrip(b"=")
        else:
            if not isinstance(value, str) or not all(" " <= c <= "~" for c in value):
                raise ValueError(
                    f"gRPC metadata {key!r} must be printable ASCII text (binary values go "
                    "under a key ending in -bin)"
                )
            encoded = value.encode("ascii")
        headers.append((key.encode("ascii"), encoded))
    return headers


def request_headers(
    path: str,
    authority: str,
    *,
    scheme: str = "https",
    timeout: float | None = None,
    metadata: Metadata = (),
    user_agent: str = USER_AGENT,
) -> list[tuple[bytes, bytes]]:
    """The HEADERS of a gRPC request (ValueError for a path or metadata that cannot go)."""
    if not path.startswith("/") or not path.isascii() or " " in path:
        raise ValueError(f"a gRPC method path looks like /package.Service/Method, not {path!r}")
    if not authority or not authority.isascii():
        raise ValueError(f"the :authority must be an ASCII host:port, not {authority!r}")
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, not {scheme!r}")
    headers = [
        (b":method", b"POST"),
        (b":scheme", scheme.encode()),
        (b":path", path.encode()),
        (b":authority", authority.encode("ascii")),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        (b"user-agent", user_agent.encode()),
        (b"grpc-accept-encoding", b"identity"),
    ]
    if timeout is not None:
        headers.append((b"grpc-timeout", encode_timeout(timeout).encode()))
    headers.extend(_check_metadata(metadata))
    return headers


def decode_grpc_message(value: bytes) -> str:
    """``grpc-message``: percent-encoded UTF-8; bad escapes stay as they are."""
    if b"%" not in value:
        return value.decode("utf-8", errors="replace")
    out = bytearray()
    i = 0
    while i < len(value):
        byte = value[i]
        if byte == 0x25 and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    return out.decode("utf-8", errors="replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def encode_grpc_message(text: str) -> bytes:
    """The inverse of :func:`decode_grpc_message` (what a server sends; for tests)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += f"%{byte:02X}".encode()
    return bytes(out)


def _metadata_from_headers(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[tuple[str, MetadataValue], ...]:
    """Response headers as metadata: pseudo-headers dropped, ``-bin`` values decoded."""
    result: list[tuple[str, MetadataValue]] = []
    for raw_key, raw_value in headers:
        key = raw_key.decode("latin-1")
        if key.startswith(":"):
            continue
        if key.endswith("-bin"):
            try:
                padded = raw_value + b"=" * (-len(raw_value) % 4)
                result.append((key, base64.b64decode(padded)))
            except binascii.Error:
                result.append((key, raw_value))
        else:
            result.append((key, raw_value.decode("latin-1")))
    return tuple(result)


# Status for a response that is not HTTP 200 (the gRPC HTTP-to-status mapping).
_HTTP_STATUS: Final = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}

# Status for a stream the server reset (the gRPC HTTP/2-to-status mapping).
_RESET_STATUS: Final = {
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def status_from_headers(headers: Sequence[tuple[bytes, bytes]]) -> GrpcError | None:
    """The call's outcome from trailers (or a trailers-only response): None for OK.

    A missing or unparsable ``grpc-status`` is UNKNOWN, as gRPC specifies.
    """
    raw_status = _header(headers, b"grpc-status")
    raw_message = _header(headers, b"grpc-message")
    message = decode_grpc_message(raw_message) if raw_message is not None else ""
    if raw_status is None:
        return GrpcError(StatusCode.UNKNOWN, "the server ended the call without a grpc-status")
    try:
        code = StatusCode(int(raw_status))
    except ValueError:
        return GrpcError(
            StatusCode.UNKNOWN,
            f"the server ended the call with grpc-status {raw_status!r} ({message})",
            remote=True,
        )
    if code is StatusCode.OK:
        return None
    return GrpcError(code, message or f"the server ended the call with {code.name}", remote=True)


def _check_response_headers(headers: Sequence[tuple[bytes, bytes]]) -> GrpcError | None:
    """Why response headers do not start a gRPC response, or None."""
    raw_status = _header(headers, b":status")
    if raw_status != b"200":
        try:
            http_status = int(raw_status or b"")
        except ValueError:
            http_status = 0
        code = _HTTP_STATUS.get(http_status, StatusCode.UNKNOWN)
        return GrpcError(
            code,
            f"the server answered HTTP {http_status or raw_status!r}, not a gRPC response "
            "(is this a gRPC server, behind the right port?)",
        )
    content_type = _header(headers, b"content-type") or b""
    if not content_type.startswith(b"application/grpc"):
        return GrpcError(
            StatusCode.UNKNOWN,
            f"the server answered content-type {content_type.decode('latin-1')!r}, "
            "not application/grpc",
        )
    return None


# -- the sans-IO connection -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The server's response headers (its initial metadata) arrived."""

    stream_id: int
    metadata: tuple[tuple[str, MetadataValue], ...]


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message; pass ``flow_bytes`` to :meth:`GrpcProtocol.acknowledge` once it is taken."""

    stream_id: int
    payload: bytes
    flow_bytes: int


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The call is over: ``error`` None means status OK."""

    stream_id: int
    error: GrpcError | None
    trailers: tuple[tuple[str, MetadataValue], ...] = ()


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The server's flow-control window grew: queued sends went out (or may now)."""


@dataclass(frozen=True, slots=True)
class PingAnswered:
    payload: bytes


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """No call can go on, and no new call start, on this connection."""

    error: GrpcError


Event = (
    ResponseStarted | MessageReceived | CallEnded | WindowOpened | PingAnswered | ConnectionEnded
)


class _Stream:
    __slots__ = (
        "acked_ahead",
        "end_queued",
        "end_sent",
        "ended",
        "outbox",
        "outstanding",
        "reader",
        "started",
    )

    def __init__(self, max_message_size: int) -> None:
        self.reader = MessageReader(max_message_size)
        self.outbox = bytearray()  # encoded messages the window did not take yet
        self.end_queued = False  # END_STREAM after the outbox
        self.end_sent = False
        self.started = False  # response headers seen
        self.ended = False  # CallEnded emitted
        self.acked_ahead = 0  # bytes of the message being read that were acknowledged already
        self.outstanding = 0  # flow bytes of messages handed out and not acknowledged


class GrpcProtocol:
    """One gRPC client connection over HTTP/2, without I/O (see the module docstring).

    Call :meth:`data_to_send` after every other method and write what it
    returns. Errors of one call come back as :class:`CallEnded`; errors of the
    connection as :class:`ConnectionEnded` (after a :class:`CallEnded` for
    every open call).
    """

    def __init__(
        self,
        authority: str,
        *,
        scheme: str = "https",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        connection_window: int = DEFAULT_CONNECTION_WINDOW,
        user_agent: str = USER_AGENT,
    ) -> None:
        if not _H2_DEFAULT_WINDOW <= stream_window <= 2**31 - 1:
            raise ValueError(f"stream_window must be 65535..2^31-1, got {stream_window}")
        if not _H2_DEFAULT_WINDOW <= connection_window <= 2**31 - 1:
            raise ValueError(f"connection_window must be 65535..2^31-1, got {connection_window}")
        self.authority = authority
        self.scheme = scheme
        self.max_message_size = max_message_size
        self.user_agent = user_agent
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config)
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        self._h2.initiate_connection()
        if connection_window > _H2_DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(connection_window - _H2_DEFAULT_WINDOW)
        self._streams: dict[int, _Stream] = {}
        self._frame_header = bytearray()  # of the frame being received (see _scan_frames)
        self._frame_left = 0  # payload bytes of the current frame still to come
        self._frames_seen = 0
        self._in_goaway = False  # the frame being received is a GOAWAY
        self._ping_ids = itertools.count(1)
        self._draining = False  # a graceful GOAWAY arrived: no new calls
        self.error: GrpcError | None = None  # set once the connection ended

    # -- state --------------------------------------------------------------------------

    @property
    def open_calls(self) -> int:
        """Calls started and not yet ended."""
        return sum(1 for stream in self._streams.values() if not stream.ended)

    @property
    def accepts_calls(self) -> bool:
        return self.error is None and not self._draining

    def unsent(self, stream_id: int) -> int:
        """Bytes of the call's messages still waiting for the server's window."""
        stream = self._streams.get(stream_id)
        return len(stream.outbox) if stream is not None else 0

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    # -- calls --------------------------------------------------------------------------

    def start_call(
        self, path: str, *, metadata: Metadata = (), timeout: float | None = None
    ) -> int:
        """Send a call's HEADERS; returns its stream id."""
        headers = request_headers(
            path,
            self.authority,
            scheme=self.scheme,
            timeout=timeout,
            metadata=metadata,
            user_agent=self.user_agent,
        )
        if self.error is not None:
            raise self.error
        if self._draining:
            raise GrpcError(
                StatusCode.UNAVAILABLE,
                "the server is closing this connection (GOAWAY): open a new one",
            )
        stream_id = self._h2.get_next_available_stream_id()
        try:
            self._h2.send_headers(stream_id, headers)
        except h2.exceptions.TooManyStreamsError:
            raise GrpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                "the server's limit of concurrent calls on this connection is reached",
            ) from None
        self._streams[stream_id] = _Stream(self.max_message_size)
        return stream_id

    def send_message(self, stream_id: int, payload: bytes, *, end: bool = False) -> None:
        """Queue a message (and END_STREAM after it with ``end``); sends what the window takes."""
        stream = self._writable(stream_id)
        if len(payload) > self.max_message_size:
            raise GrpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"a request of {len(payload)} bytes is more than the {self.max_message_size} "
                "this client sends",
            )
        stream.outbox += encode_message(payload)
        stream.end_queued = end
        self._send_queued(stream_id, stream)

    def end_requests(self, stream_id: int) -> None:
        """Half-close: no more requests on this call (END_STREAM after what is queued)."""
        stream = self._writable(stream_id)
        stream.end_queued = True
        self._send_queued(stream_id, stream)

    def cancel(self, stream_id: int) -> None:
        """Abandon a call (RST_STREAM CANCEL); it ends with CANCELLED for us."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended or self.error is not None:
            return
        stream.ended = True
        stream.outbox.clear()
        self._reset(stream_id, ErrorCodes.CANCEL)

    def acknowledge(self, stream_id: int, flow_bytes: int) -> None:
        """The application took a message: let the server send that much more."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.outstanding -= flow_bytes
        self._ack(stream_id, flow_bytes)

    def release(self, stream_id: int) -> None:
        """Forget a call: cancels it if still open, acknowledges what it left unread."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not stream.ended:
            self.cancel(stream_id)
        elif not stream.end_sent and self.error is None:
            # The server finished first: close our half too.
            with contextlib.suppress(h2.exceptions.H2Error):  # h2 closed it (a reset)
                self._h2.end_stream(stream_id)
        del self._streams[stream_id]
        if stream.outstanding > 0:
            self._ack(stream_id, stream.outstanding)

    def ping(self) -> bytes:
        """Queue a PING; :class:`PingAnswered` with the returned payload acknowledges it."""
        payload = next(self._ping_ids).to_bytes(8, "big")
        if self.error is None:
            self._h2.ping(payload)
        return payload

    def close(self) -> None:
        """Queue GOAWAY(NO_ERROR); every open call ends for us (CANCELLED)."""
        if self.error is None:
            self.error = GrpcError(StatusCode.CANCELLED, "the connection was closed by us")
            self._h2.close_connection(ErrorCodes.NO_ERROR)

    # -- bytes from the server ------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the connection; returns what they mean, in order."""
        if self.error is not None:
            return []
        events: list[Event] = []
        problem, cuts = self._scan_frames(data)
        if problem is not None:
            self._h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            return self._end_connection(
                GrpcError(StatusCode.INTERNAL, f"the server broke the HTTP/2 protocol: {problem}")
            )
        start = 0
        for end in [*cuts, len(data)]:
            if end > start or not data:
                self._receive_segment(data[start:end], events)
            start = end
            if self.error is not None:
                break
        return events

    def _receive_segment(self, data: bytes, events: list[Event]) -> None:
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR)
            self._h2.close_connection(code)
            events.extend(
                self._end_connection(
                    GrpcError(
                        StatusCode.INTERNAL,
                        f"the server broke the HTTP/2 protocol ({type(exc).__name__}: {exc})",
                    )
                )
            )
            return
        for event in h2_events:
            self._on_h2_event(event, events)
            if self.error is not None:
                return

    def connection_lost(self, reason: str) -> list[Event]:
        """The transport ended (EOF, reset, keepalive timeout): every call ends UNAVAILABLE."""
        if self.error is not None:
            return []
        if not self._frames_seen:
            reason += " before it said anything in HTTP/2 (does it expect TLS, or no TLS?)"
        return self._end_connection(GrpcError(StatusCode.UNAVAILABLE, reason))

    # -- internals ----------------------------------------------------------------------

    def _scan_frames(self, data: bytes) -> tuple[str | None, list[int]]:
        """Follow frame headers as bytes arrive: why they cannot be HTTP/2, and the
        offsets in ``data`` where a GOAWAY frame ends.

        h2 buffers a whole frame before it checks its length, so a peer that is
        not HTTP/2 (an HTTP/1 answer reads as a frame of megabytes) would hold
        the call until a timeout: caught here at once. The server's first frame
        must be SETTINGS. GOAWAY ends are where :meth:`receive_data` cuts the
        bytes, so that a graceful GOAWAY is handled before the frames after it.
        """
        position = 0
        size = len(data)
        limit = self._h2.max_inbound_frame_size
        cuts: list[int] = []
        while position < size:
            if self._frame_left:
                taken = min(self._frame_left, size - position)
                self._frame_left -= taken
                position += taken
                if not self._frame_left and self._in_goaway:
                    cuts.append(position)
                continue
            wanted = 9 - len(self._frame_header)
            self._frame_header += data[position : position + wanted]
            position += wanted
            if len(self._frame_header) < 9:
                break
            length = int.from_bytes(self._frame_header[:3], "big")
            kind = self._frame_header[3]
            self._frame_header.clear()
            if self._frames_seen == 0 and kind != 0x4:
                return (
                    "its first frame is not SETTINGS (is the address a gRPC server, "
                    "speaking HTTP/2 with the TLS setting given?)",
                    [],
                )
            if length > limit:
                return f"a frame of {length} bytes, more than the {limit} allowed", []
            self._frames_seen += 1
            self._frame_left = length
            self._in_goaway = kind == 0x7
            if self._in_goaway and not length:
                cuts.append(position)  # malformed (h2 says so), but a frame end all the same
        return None, cuts

    def _writable(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise GrpcUsageError(f"no call on stream {stream_id}: it was released")
        if self.error is not None:
            raise self.error
        if stream.end_queued:
            raise GrpcUsageError("this call's requests were already ended")
        if stream.ended:
            raise GrpcUsageError("this call has ended")
        return stream

    def _send_queued(self, stream_id: int, stream: _Stream) -> None:
        h2conn = self._h2
        while stream.outbox:
            window = min(
                h2conn.local_flow_control_window(stream_id), h2conn.max_outbound_frame_size
            )
            if window <= 0:
                return
            chunk = bytes(stream.outbox[:window])
            del stream.outbox[:window]
            last = not stream.outbox and stream.end_queued
            h2conn.send_data(stream_id, chunk, end_stream=last)
            stream.end_sent = last
        if stream.end_queued and not stream.end_sent:
            h2conn.end_stream(stream_id)
            stream.end_sent = True

    def _send_all_queued(self) -> None:
        for stream_id, stream in self._streams.items():
            if (stream.outbox or (stream.end_queued and not stream.end_sent)) and not stream.ended:
                self._send_queued(stream_id, stream)

    def _ack(self, stream_id: int, size: int) -> None:
        if size > 0 and self.error is None:
            self._h2.acknowledge_received_data(size, stream_id)

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # the server closed it
            self._h2.reset_stream(stream_id, code)

    def _end_call(
        self,
        stream_id: int,
        error: GrpcError | None,
        events: list[Event],
        *,
        reset: bool = False,
        trailers: tuple[tuple[str, MetadataValue], ...] = (),
    ) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            return
        stream.ended = True
        stream.outbox.clear()
        if reset:
            self._reset(stream_id, ErrorCodes.CANCEL)
        events.append(CallEnded(stream_id, error, trailers))

    def _end_connection(self, error: GrpcError) -> list[Event]:
        events: list[Event] = []
        for stream_id, stream in self._streams.items():
            if not stream.ended:
                stream.ended = True
                stream.outbox.clear()
                events.append(CallEnded(stream_id, error))
        self.error = error
        events.append(ConnectionEnded(error))
        return events

    def _on_h2_event(self, event: h2.events.Event, events: list[Event]) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event, events)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event.stream_id, _as_bytes_headers(event.headers), events)
        elif isinstance(event, h2.events.TrailersReceived):
            headers = _as_bytes_headers(event.headers)
            self._on_end(event.stream_id, headers, events)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None and not stream.ended:
                # END_STREAM on DATA: the trailers are missing.
                self._end_call(
                    event.stream_id,
                    GrpcError(
                        StatusCode.INTERNAL,
                        "the server ended the call without trailers (no grpc-status)",
                    ),
                    events,
                )
        elif isinstance(event, h2.events.StreamReset):
            try:
                code = ErrorCodes(event.error_code)
            except ValueError:
                status, name = StatusCode.INTERNAL, str(event.error_code)
            else:
                status, name = _RESET_STATUS.get(code, StatusCode.INTERNAL), code.name
            self._end_call(
                event.stream_id,
                GrpcError(status, f"the server reset the stream (RST_STREAM {name})"),
                events,
            )
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._send_all_queued()
            events.append(WindowOpened())
        elif isinstance(event, h2.events.PingAckReceived):
            events.append(PingAnswered(bytes(event.ping_data or b"")))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event, events)
        # Anything else (settings ACK, informational responses, priority, unknown frames,
        # the server's PINGs, which h2 answers itself) needs nothing from us.

    def _on_response(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], events: list[Event]
    ) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            return
        problem = _check_response_headers(headers)
        if problem is not None and _header(headers, b"grpc-status") is None:
            self._end_call(stream_id, problem, events, reset=True)
            return
        if _header(headers, b"grpc-status") is not None:
            # Trailers-only: the call ends here (h2 reports StreamEnded next).
            self._on_end(stream_id, headers, events)
            return
        stream.started = True
        events.append(ResponseStarted(stream_id, _metadata_from_headers(headers)))

    def _on_end(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], events: list[Event]
    ) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            return
        error = status_from_headers(headers)
        if error is None and stream.reader.buffered:
            error = GrpcError(
                StatusCode.INTERNAL,
                f"the server ended the call in the middle of a message "
                f"({stream.reader.buffered} bytes of it arrived)",
            )
        self._end_call(stream_id, error, events, trailers=_metadata_from_headers(headers))

    def _on_data(self, event: h2.events.DataReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        data = bytes(event.data or b"")
        flow = event.flow_controlled_length or 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            self._ack(stream_id, flow)  # not ours any more: don't let it shrink the window
            return
        padding = flow - len(data)
        if not stream.started:
            self._ack(stream_id, flow)
            self._end_call(
                stream_id,
                GrpcError(StatusCode.INTERNAL, "the server sent data before its response headers"),
                events,
                reset=True,
            )
            return
        ahead = stream.acked_ahead
        try:
            messages = stream.reader.feed(data)
        except GrpcError as exc:
            self._ack(stream_id, flow)
            self._end_call(stream_id, exc, events, reset=True)
            return
        for index, payload in enumerate(messages):
            # The first message completed may have begun in earlier frames, already acknowledged.
            flow_bytes = _PREFIX + len(payload) - (ahead if index == 0 else 0)
            stream.outstanding += flow_bytes
            events.append(MessageReceived(stream_id, payload, flow_bytes))
        if messages:
            ahead = 0
        partial = stream.reader.buffered
        stream.acked_ahead = partial
        self._ack(stream_id, padding + partial - ahead)

    def _on_goaway(self, event: h2.events.ConnectionTerminated, events: list[Event]) -> None:
        code = event.error_code
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        debug = bytes(event.additional_data or b"").decode("utf-8", errors="replace")
        detail = f"GOAWAY {name}" + (f": {debug}" if debug else "")
        if code != ErrorCodes.NO_ERROR:
            events.extend(
                self._end_connection(
                    GrpcError(
                        StatusCode.UNAVAILABLE, f"the server closed the connection ({detail})"
                    )
                )
            )
            return
        # Graceful: calls up to last_stream_id go on (h2 would refuse every later frame,
        # so its state machine is put back to open); later ones were never processed.
        self._h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        self._draining = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream_id in list(self._streams):
            if stream_id > last:
                self._end_call(
                    stream_id,
                    GrpcError(
                        StatusCode.UNAVAILABLE,
                        f"the server is going away and did not take the call ({detail})",
                    ),
                    events,
                )


def _as_bytes_headers(
    headers: Iterable[tuple[bytes | str, bytes | str]] | None,
) -> list[tuple[bytes, bytes]]:
    result = []
    for key, value in headers or ():
        result.append(
            (
                key if isinstance(key, bytes) else key.encode("latin-1"),
                value if isinstance(value, bytes) else value.encode("latin-1"),
            )
        )
    return result


# -- targets and transports -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: ``host`` and ``port``, or a unix socket ``path``."""

    host: str = ""
    port: int = 0
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        """``host:port``, ``[v6]:port``, ``unix:<path>``, ``unix:///<path>``; else ValueError."""
        if text.startswith("unix:"):
            path = text.removeprefix("unix:")
            if path.startswith("//"):
                path = path[2:]  # unix:///abs/path
            if not path:
                raise ValueError(f"{text!r} names no socket path: write unix:/path/to/socket")
            return cls(path=path)
        host, colon, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not colon or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(
                f"{text!r} is not a gRPC target: write host:port ([v6]:port for IPv6) "
                "or unix:/path/to/socket"
            )
        return cls(host=host, port=int(port))

    @property
    def authority(self) -> str:
        if self.path is not None:
            return "localhost"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else self.authority


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Verify the server against ``root_certificates`` (PEM), as ``server_name`` if given."""

    root_certificates: bytes
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context: these roots only, host name checked, TLS 1.2+, ALPN h2."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies and checks the name
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cadata=self.root_certificates.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"the root certificates are not usable PEM: {exc}") from None
        context.set_alpn_protocols(["h2"])
        return context


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Tunables of a connection (seconds and bytes)."""

    connect_timeout: float = 10.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    #: PING this often while a call is open (None: never).
    keepalive_interval: float | None = 30.0
    keepalive_timeout: float = 10.0
    user_agent: str = USER_AGENT


Transport = SocketStream | TlsSocketStream


async def _connect_socket(target: Target) -> socket.socket:
    if target.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                sock.connect(target.path)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, f"connect to unix:{target.path} failed") from None
            else:
                await trio.lowlevel.checkpoint()
            return sock
        except BaseException:
            sock.close()
            raise
    infos = await trio.socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{target.host} resolves to no address")
    failures: list[str] = []
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            error = sock.connect_ex(sockaddr)
            if error in (errno.EINPROGRESS, errno.EAGAIN):
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            else:
                await trio.lowlevel.checkpoint()
            if error:
                raise OSError(error, os.strerror(error))
            set_tcp_keepalive(sock)
            return sock
        except OSError as exc:
            sock.close()
            failures.append(f"{sockaddr[0]}: {exc.strerror or exc}")
        except BaseException:
            sock.close()
            raise
    raise OSError("; ".join(failures))


async def _handshake(sock: socket.socket, tls: TlsSettings, target: Target) -> ssl.SSLSocket:
    context = tls.context()
    name = tls.server_name or target.host or "localhost"
    try:
        wrapped = context.wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        while True:
            try:
                wrapped.do_handshake()
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(wrapped)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(wrapped)
            else:
                break
        if wrapped.selected_alpn_protocol() != "h2":
            raise ssl.SSLError(
                f"the server did not agree to HTTP/2 (ALPN {wrapped.selected_alpn_protocol()!r})"
            )
        return wrapped
    except BaseException:
        wrapped.close()
        raise


async def open_transport(target: Target, tls: TlsSettings | None, timeout: float) -> Transport:
    """Connect (and handshake); GrpcError UNAVAILABLE on any failure."""
    with trio.move_on_after(timeout) as scope:
        try:
            sock = await _connect_socket(target)
        except OSError as exc:
            raise GrpcError(
                StatusCode.UNAVAILABLE, f"cannot connect to {target}: {exc.strerror or exc}"
            ) from None
        if tls is None:
            return SocketStream(sock)
        try:
            wrapped = await _handshake(sock, tls, target)
        except ssl.SSLCertVerificationError as exc:
            raise GrpcError(
                StatusCode.UNAVAILABLE,
                f"TLS to {target} failed: the server's certificate does not verify "
                f"({exc.verify_message}) against the given roots as "
                f"{tls.server_name or target.host!r}",
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise GrpcError(StatusCode.UNAVAILABLE, f"TLS to {target} failed: {exc}") from None
        return TlsSocketStream(wrapped)
    assert scope.cancelled_caught
    raise GrpcError(
        StatusCode.UNAVAILABLE, f"cannot connect to {target}: no connection within {timeout} s"
    )


# -- the trio adapter -------------------------------------------------------------------------


class _End:
    __slots__ = ("error", "trailers")

    def __init__(
        self, error: GrpcError | None, trailers: tuple[tuple[str, MetadataValue], ...]
    ) -> None:
        self.error = error
        self.trailers = trailers


class Call:
    """One call (an HTTP/2 stream) on a :class:`Connection`; see :meth:`Connection.stream`.

    Send with :meth:`send` (``end=True`` on the last one) or :meth:`done_writing`;
    receive with :meth:`receive` or ``async for``: messages in order, then the
    end (None / the loop stops) for status OK, or :class:`GrpcError`. Once the
    call ended, a send raises its error (or is dropped if it ended OK).
    """

    def __init__(self, connection: Connection, stream_id: int, deadline: float) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._deadline = deadline
        self._inbox_send, self._inbox = trio.open_memory_channel[MessageReceived | _End](math.inf)
        self._server_end: _End | None = None  # the call ended (delivered, maybe not yet read)
        self._end: _End | None = None  # the end the application saw
        #: The server's response headers (initial metadata), once they arrived.
        self.initial_metadata: tuple[tuple[str, MetadataValue], ...] | None = None

    @property
    def trailing_metadata(self) -> tuple[tuple[str, MetadataValue], ...]:
        return self._end.trailers if self._end is not None else ()

    async def send(self, payload: bytes, *, end: bool = False) -> None:
        """Send one message; returns once the server's window took it (backpressure).

        After the call ended with an error, that error; after it ended with OK,
        nothing (the message is dropped).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        ended = self._server_end or self._end
        if ended is not None:
            if ended.error is not None:
                raise ended.error
            return
        connection = self._connection
        with trio.CancelScope(deadline=self._deadline):
            connection.protocol.send_message(self.stream_id, payload, end=end)
            await connection.flush()
            while connection.protocol.unsent(self.stream_id) and self._server_end is None:
                await connection.window_opened()
                await connection.flush()
            return
        self._deadline_passed()

    async def done_writing(self) -> None:
        """No more requests (half-close)."""
        if self._server_end is not None or self._end is not None:
            await trio.lowlevel.checkpoint()
            return
        self._connection.protocol.end_requests(self.stream_id)
        await self._connection.flush()

    async def receive(self) -> bytes | None:
        """The next message; None once the call ended with OK; raises GrpcError otherwise."""
        if self._end is not None:
            await trio.lowlevel.checkpoint()
            self._finish(self._end)
            return None
        with trio.CancelScope(deadline=self._deadline):
            item = await self._inbox.receive()
            if isinstance(item, _End):
                self._finish(item)
                return None
            self._connection.protocol.acknowledge(self.stream_id, item.flow_bytes)
            with contextlib.suppress(GrpcError):  # a broken connection shows on the next receive
                await self._connection.flush()
            return item.payload
        self._deadline_passed()

    def __aiter__(self) -> Call:
        return self

    async def __anext__(self) -> bytes:
        payload = await self.receive()
        if payload is None:
            raise StopAsyncIteration
        return payload

    # -- the connection's side --------------------------------------------------------------

    def _deliver(self, item: MessageReceived | _End) -> None:
        if isinstance(item, _End):
            if self._server_end is not None:
                return
            self._server_end = item
        self._inbox_send.send_nowait(item)

    def _finish(self, end: _End) -> None:
        """The call's end, as the application sees it: None for OK, else the error raised."""
        self._end = end
        if end.error is not None:
            raise end.error

    def _deadline_passed(self) -> NoReturn:
        error = GrpcError(StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
        if self._end is None:
            self._end = _End(error, ())
        self._connection.protocol.cancel(self.stream_id)
        raise error


class Connection:
    """One HTTP/2 connection to a gRPC server (from :func:`connect`).

    Calls may run concurrently from several tasks. Once the connection ended
    (:attr:`error` set), every call on it has failed and new ones fail at once.
    """

    def __init__(
        self,
        transport: Transport,
        protocol: GrpcProtocol,
        target: Target,
        settings: ConnectionSettings,
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self.target = target
        self.settings = settings
        self._calls: dict[int, Call] = {}
        self._send_lock = trio.Lock()
        self._window = trio.Event()
        self._pings: dict[bytes, trio.Event] = {}
        self._calls_open = trio.Event()
        self._background: trio.CancelScope | None = None

    @property
    def error(self) -> GrpcError | None:
        return self.protocol.error

    # -- calls ----------------------------------------------------------------------------

    @asynccontextmanager
    async def stream(
        self, path: str, *, metadata: Metadata = (), timeout: float | None = None
    ) -> AsyncIterator[Call]:
        """Open a call; leaving the block before it ended cancels it (RST_STREAM CANCEL)."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        if timeout is not None and timeout <= 0:
            raise GrpcError(
                StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before it started"
            )
        stream_id = self.protocol.start_call(path, metadata=metadata, timeout=timeout)
        call = Call(self, stream_id, deadline)
        self._calls[stream_id] = call
        self._calls_open.set()
        try:
            await self.flush()
            yield call
        finally:
            del self._calls[stream_id]
            self.protocol.release(stream_id)
            await self._flush_quietly()

    async def unary(
        self,
        path: str,
        request: bytes,
        *,
        metadata: Metadata = (),
        timeout: float | None = None,
    ) -> bytes:
        """One request, one response; GrpcError for any other outcome."""
        async with self.stream(path, metadata=metadata, timeout=timeout) as call:
            await call.send(request, end=True)
            response = await call.receive()
            if response is None:
                raise GrpcError(
                    StatusCode.INTERNAL,
                    "the server ended the call without a response (status OK)",
                )
            if await call.receive() is not None:
                raise GrpcError(
                    StatusCode.INTERNAL,
                    "the server sent more than one response to a unary call",
                )
            return response

    # -- I/O ------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write what the protocol has queued (one writer at a time)."""
        async with self._send_lock:
            data = self.protocol.data_to_send()
            if not data:
                return
            try:
                await self.transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._dispatch(
                    self.protocol.connection_lost(f"the connection to {self.target} broke: {exc}")
                )
        if self.protocol.error is not None:
            raise self.protocol.error

    async def _flush_quietly(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            with contextlib.suppress(GrpcError):
                await self.flush()

    async def window_opened(self) -> None:
        """Until the server's window next grows (or the connection ends)."""
        if self.protocol.error is not None:
            raise self.protocol.error
        await self._window.wait()

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, MessageReceived):
                call = self._calls.get(event.stream_id)
                if call is None:
                    self.protocol.acknowledge(event.stream_id, event.flow_bytes)
                else:
                    call._deliver(event)
            elif isinstance(event, CallEnded):
                call = self._calls.get(event.stream_id)
                if call is not None:
                    call._deliver(_End(event.error, event.trailers))
            elif isinstance(event, ResponseStarted):
                call = self._calls.get(event.stream_id)
                if call is not None:
                    call.initial_metadata = event.metadata
            elif isinstance(event, WindowOpened):
                self._wake_senders()
            elif isinstance(event, PingAnswered):
                answered = self._pings.pop(event.payload, None)
                if answered is not None:
                    answered.set()
            elif isinstance(event, ConnectionEnded):
                self._wake_senders()
                for waiter in self._pings.values():
                    waiter.set()
                if self._background is not None:
                    self._background.cancel()

    def _wake_senders(self) -> None:
        window, self._window = self._window, trio.Event()
        window.set()

    async def _read(self) -> None:
        while self.protocol.error is None:
            try:
                data = await self.transport.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._dispatch(
                    self.protocol.connection_lost(f"the connection to {self.target} broke: {exc}")
                )
                return
            if not data:
                self._dispatch(
                    self.protocol.connection_lost(
                        f"the server at {self.target} closed the connection"
                    )
                )
                return
            self._dispatch(self.protocol.receive_data(data))
            try:
                await self.flush()  # SETTINGS/PING ACKs, WINDOW_UPDATEs, a GOAWAY of ours
            except GrpcError:
                return

    async def _keepalive(self, interval: float, timeout: float) -> None:
        while self.protocol.error is None:
            if not self.protocol.open_calls:
                self._calls_open = trio.Event()
                await self._calls_open.wait()
                continue
            await trio.sleep(interval)
            if not self.protocol.open_calls:
                continue
            answered = trio.Event()
            self._pings[self.protocol.ping()] = answered
            with trio.move_on_after(timeout):
                try:
                    await self.flush()
                except GrpcError:
                    return
                await answered.wait()
                continue
            self._dispatch(
                self.protocol.connection_lost(
                    f"the server at {self.target} did not answer a keepalive PING "
                    f"within {timeout} s"
                )
            )
            # Nothing more can be said to a peer that does not answer: a task stuck
            # writing to it (its window or ours full) is released now, not at TCP's timeout.
            self.transport.close_nowait()
            return

    async def _run_background(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope() as scope:
            self._background = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                interval = self.settings.keepalive_interval
                if interval is not None:
                    nursery.start_soon(self._keepalive, interval, self.settings.keepalive_timeout)
                task_status.started()


@asynccontextmanager
async def connect(
    target: str | Target,
    *,
    tls: TlsSettings | None = None,
    settings: ConnectionSettings | None = None,
) -> AsyncIterator[Connection]:
    """Open a connection to ``target`` (GrpcError UNAVAILABLE if it cannot be had).

    Leaving the block closes it (GOAWAY, then the socket); calls still open fail.
    """
    where = target if isinstance(target, Target) else Target.parse(target)
    settings = settings or ConnectionSettings()
    transport = await open_transport(where, tls, settings.connect_timeout)
    protocol = GrpcProtocol(
        where.authority,
        scheme="https" if tls is not None else "http",
        max_message_size=settings.max_message_size,
        stream_window=settings.stream_window,
        connection_window=settings.connection_window,
        user_agent=settings.user_agent,
    )
    connection = Connection(transport, protocol, where, settings)
    try:
        async with trio.open_nursery() as nursery:
            await connection.flush()  # the preface and our SETTINGS
            await nursery.start(connection._run_background)
            try:
                yield connection
            finally:
                protocol.close()
                await connection._flush_quietly()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background tasks keep their failures in the connection: a group here
        # holds what the block raised. Give it back as it was.
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], trio.Cancelled):
            raise group.exceptions[0] from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


async def unary_call(
    target: str | Target,
    path: str,
    request: bytes,
    *,
    tls: TlsSettings | None = None,
    metadata: Metadata = (),
    timeout: float | None = None,
    settings: ConnectionSettings | None = None,
) -> bytes:
    """Connect, make one unary call, close; ``timeout`` bounds all of it (DEADLINE_EXCEEDED)."""
    deadline = math.inf if timeout is None else trio.current_time() + timeout
    with trio.move_on_at(deadline):
        async with connect(target, tls=tls, settings=settings) as connection:
            remaining = None if timeout is None else max(deadline - trio.current_time(), 1e-6)
            return await connection.unary(path, request, metadata=metadata, timeout=remaining)
    raise GrpcError(
        StatusCode.DEADLINE_EXCEEDED, f"the call to {target} did not finish within {timeout} s"
    )


__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_CONNECTION_WINDOW",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_STREAM_WINDOW",
    "USER_AGENT",
    "Call",
    "CallEnded",
    "Connection",
    "ConnectionEnded",
    "ConnectionSettings",
    "Event",
    "GrpcError",
    "GrpcProtocol",
    "GrpcUsageError",
    "MessageReader",
    "MessageReceived",
    "Metadata",
    "MetadataValue",
    "PingAnswered",
    "ResponseStarted",
    "StatusCode",
    "Target",
    "TlsSettings",
    "WindowOpened",
    "connect",
    "decode_grpc_message",
    "encode_grpc_message",
    "encode_message",
    "encode_timeout",
    "open_transport",
    "request_headers",
    "status_from_headers",
    "unary_call",
]
