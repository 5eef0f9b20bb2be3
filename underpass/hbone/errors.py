"""Errors raised by :mod:`underpass.hbone`.

Two families, as in h11/h2: :class:`LocalError` is something on this side (a
misuse of the API, a policy decision, a failed upstream connect, a connection
we are closing) and :class:`RemoteError` is the peer's doing (a malformed
request, an HTTP/2 protocol violation, a refusal, a reset, a lost connection).
Every error carries what goes on the wire for it, so the adapters translate in
one place:

- ``status``: the HTTP status a CONNECT is answered with (400, 401, 503), or
  the status a refused CONNECT was answered with (:class:`TunnelRefused`);
- ``error_code``: the HTTP/2 error code of the RST_STREAM or GOAWAY that was
  sent (local errors, :class:`ProtocolViolation`) or received
  (:class:`StreamReset`, :class:`ConnectionLost`).

Messages say what happened and, where there is something to do, what to do.
Text that came from the peer is quoted and shortened.
"""

from __future__ import annotations

from h2.errors import ErrorCodes

__all__ = [
    "BadRequest",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionLost",
    "ConnectionUnavailable",
    "ErrorCodes",
    "HalfCloseNotSupported",
    "HboneError",
    "KeepaliveTimeout",
    "LocalError",
    "LocalProtocolError",
    "PolicyDenied",
    "ProtocolViolation",
    "RemoteError",
    "StreamLimitReached",
    "StreamReset",
    "TunnelRefused",
    "UpstreamUnavailable",
    "show",
]

_SHOWN = 120  # characters of peer-supplied text quoted in a message


def show(value: str | bytes) -> str:
    """``repr`` of peer-supplied text for a message, shortened when long."""
    if len(value) <= _SHOWN:
        return repr(value)
    return f"{value[:_SHOWN]!r}... ({len(value)} long)"


def _code(value: int | ErrorCodes) -> ErrorCodes | int:
    """An ``ErrorCodes`` member when the number is a known code, else the number."""
    try:
        return ErrorCodes(value)
    except ValueError:
        return value


class HboneError(Exception):
    """Base class of every HBONE error."""

    #: HTTP status a CONNECT is (or was) answered with, when the error has one.
    status: int | None = None
    #: HTTP/2 error code sent or received for this error, when it has one.
    error_code: ErrorCodes | int | None = None


class LocalError(HboneError):
    """Something on this side: API misuse, a local decision, a local failure."""


class RemoteError(HboneError):
    """The peer's doing: bad input, a refusal, a reset, a lost connection."""


# -- local ----------------------------------------------------------------------


class LocalProtocolError(LocalError):
    """This side asked for something HBONE or HTTP/2 does not allow now.

    For example sending on a stream that is closed, answering a request twice,
    or building a header from a value that cannot be encoded. Nothing was sent.
    """

    error_code = ErrorCodes.INTERNAL_ERROR


class StreamLimitReached(LocalError):
    """No stream slot is free on this connection (our cap or the peer's SETTINGS)."""

    error_code = ErrorCodes.REFUSED_STREAM


class ConnectionUnavailable(LocalError):
    """The connection is draining or closed; open the tunnel on another connection."""

    error_code = ErrorCodes.REFUSED_STREAM


class HalfCloseNotSupported(LocalError):
    """The stream cannot end only its sending direction (TLS over Python's ``ssl``)."""


class PolicyDenied(LocalError):
    """Authorization policy refuses the tunnel: answered 401."""

    status = 401


class UpstreamUnavailable(LocalError):
    """No such local workload, or the upstream connect failed: answered 503.

    Once a tunnel is established, an upstream failure resets the stream with
    ``CONNECT_ERROR`` (RFC 9113 section 8.5).
    """

    status = 503
    error_code = ErrorCodes.CONNECT_ERROR


# -- remote ---------------------------------------------------------------------


class BadRequest(RemoteError):
    """A CONNECT request fails HBONE's checks: answered 400, nothing forwarded."""

    status = 400


class ProtocolViolation(RemoteError):
    """The peer broke HTTP/2 (or sent garbage): a GOAWAY with ``error_code`` was queued.

    Send what ``data_to_send()`` still returns, then close the connection.
    """

    def __init__(self, message: str, error_code: int | ErrorCodes) -> None:
        super().__init__(message)
        self.error_code = _code(error_code)


class TunnelRefused(RemoteError):
    """The server answered the CONNECT with something other than 200."""

    def __init__(self, status: int | None, message: str | None = None) -> None:
        shown = status if status is not None else "an unreadable status"
        super().__init__(message or f"the HBONE server answered the CONNECT with {shown}")
        self.status = status


class StreamReset(RemoteError):
    """The peer reset the tunnel's stream (RST_STREAM with ``error_code``)."""

    def __init__(self, error_code: int | ErrorCodes, message: str | None = None) -> None:
        code = _code(error_code)
        name = code.name if isinstance(code, ErrorCodes) else f"0x{code:x}"
        super().__init__(message or f"the peer reset the tunnel (RST_STREAM {name})")
        self.error_code = code


class ConnectionLost(RemoteError):
    """The HTTP/2 connection ended under the tunnel (GOAWAY, EOF, transport error).

    ``error_code`` is the GOAWAY code when there was one. ``last_stream_id``
    is the GOAWAY's last processed stream: streams above it were not seen by
    the peer and can be retried on another connection.
    """

    def __init__(
        self,
        message: str,
        error_code: int | ErrorCodes | None = None,
        last_stream_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error_code = None if error_code is None else _code(error_code)
        self.last_stream_id = last_stream_id


class KeepaliveTimeout(ConnectionLost):
    """The peer did not answer a PING in time; the connection was closed."""


class ConnectFailed(RemoteError):
    """The HBONE connection could not be established (TCP, TLS or identity check).

    ``__cause__`` holds the underlying error.
    """


class ConnectTimeout(ConnectFailed):
    """TCP connect plus TLS handshake did not finish within the connect timeout."""
