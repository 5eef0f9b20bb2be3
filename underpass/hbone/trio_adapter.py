"""trio adapters: HBONE connections over a trio stream, tunnels as trio streams.

:class:`HboneClientConnection` runs the client side of one HBONE connection
(usually a :class:`~underpass.hbone.stream.TlsSocketStream` to
``<ip>:15008``) and opens tunnels on it with :meth:`~HboneClientConnection.open_tunnel`;
:class:`HboneServerConnection` (or :func:`serve_hbone`) runs the server side
and calls a handler per CONNECT. A tunnel is a :class:`TunnelStream`, a
:class:`trio.abc.HalfCloseableStream` over one HTTP/2 stream.

Tasks per connection (one nursery, opened by ``run``): a reader that feeds
the sans-IO core and dispatches its events to the tunnels, a writer, and a
timer for PING keepalive and idle release. Nothing awaits the network while
holding the core. Writes take the shortest path: the task that produced
bytes (a tunnel's ``send_all``, the reader's WINDOW_UPDATEs) hands them to the
transport with one non-blocking ``try_send`` when the transport has one and
the writer is idle, and only what the socket did not take goes to the writer
task. That keeps trio wake-ups (about 10-20 us each here) off the latency
path, lets a cancelled tunnel never leave a TLS record half-written, and
keeps the reader from ever blocking on a send (two peers blocked sending to
each other would deadlock). Output waiting for the writer is capped
(:data:`OUTPUT_HIGH_WATER`); senders wait beyond it, so one bulk tunnel does
not queue megabytes ahead of the others. Received data waits in its tunnel
until the application reads it, bounded by the stream window: the core
acknowledges it only then.

A tunnel's half-close is END_STREAM (``send_eof``); ``aclose`` ends it
(END_STREAM when both sides are done, else RST_STREAM ``CANCEL``); ``reset``
aborts it. Errors reach tunnel users as ``trio.BrokenResourceError`` whose
``__cause__`` is the HBONE error (:class:`~underpass.hbone.errors.StreamReset`,
:class:`~underpass.hbone.errors.ConnectionLost`, ...); ``open_tunnel`` raises
the HBONE error itself (:class:`~underpass.hbone.errors.TunnelRefused` for a
non-200 answer).
"""

from __future__ import annotations

import abc
import contextlib
import ipaddress
import math
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio

from identity.errors import PeerIdentityError
from identity.spiffe import SpiffeId
from underpass.hbone import protocol as p
from underpass.hbone.errors import (
    ConnectionLost,
    ConnectionUnavailable,
    ErrorCodes,
    HboneError,
    KeepaliveTimeout,
    LocalProtocolError,
    ProtocolViolation,
    StreamReset,
    TunnelRefused,
)
from underpass.hbone.headers import ConnectRequest, IPAddress, RequestInfo, SocketAddress
from underpass.hbone.relay import relay
from underpass.hbone.stream import RECEIVE_BUFFER_SIZE, accept_tls

__all__ = [
    "OUTPUT_HIGH_WATER",
    "Handler",
    "HandlerResult",
    "HboneClientConnection",
    "HboneServerConnection",
    "InboundRequest",
    "TunnelConsumer",
    "TunnelStream",
    "open_hbone_connection",
    "serve_hbone",
    "serve_hbone_tls",
]

_log = structlog.get_logger("underpass.hbone")

#: Bytes waiting for the writer beyond which tunnel senders wait.
OUTPUT_HIGH_WATER = 1024 * 1024
_SMALL_CHUNK = 64 * 1024  # received chunks below this are joined on read
_CLOSE_GRACE = 2.0  # seconds to flush a final GOAWAY and close_notify


# -- tunnels ----------------------------------------------------------------------


class TunnelStream(trio.abc.HalfCloseableStream):
    """One HBONE tunnel (an HTTP/2 CONNECT stream) as a trio stream.

    ``peer`` is the SPIFFE ID of the connection's peer, when the transport
    was TLS; ``info`` (server side) is the validated request; ``request``
    (client side) what was asked for.
    """

    def __init__(
        self,
        connection: _ConnectionRunner,
        stream_id: int,
        *,
        peer: SpiffeId | None,
        info: RequestInfo | None = None,
        request: ConnectRequest | None = None,
    ) -> None:
        self._conn = connection
        self.stream_id = stream_id
        self.peer = peer
        self.info = info
        self.request = request
        self._chunks: deque[bytes] = deque()
        self._offset = 0
        self._eof = False
        self._eof_sent = False
        self._send_error: HboneError | None = None
        self._closed = False
        self._established = False
        self._error: HboneError | None = None
        self._receiving = False
        self._sending = False
        self._receive_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()

    # -- fed by the connection --------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._receive_lot.unpark_all()

    def _feed_eof(self) -> None:
        self._eof = True
        self._receive_lot.unpark_all()

    def _fail(self, error: HboneError) -> None:
        if self._error is None:
            self._error = error
        self._chunks.clear()
        self._offset = 0
        self._receive_lot.unpark_all()
        self._send_lot.unpark_all()

    def _fail_sending(self, error: HboneError) -> None:
        """The peer said "stop sending" after its END_STREAM (RST_STREAM NO_ERROR, RFC 9113
        section 8.1): what it sent, and its EOF, stay readable; only sending fails."""
        if self._send_error is None:
            self._send_error = error
        self._send_lot.unpark_all()

    def _set_established(self) -> None:
        self._established = True
        self._receive_lot.unpark_all()

    def _wake_sender(self) -> None:
        self._send_lot.unpark_all()

    async def _wait_established(self) -> None:
        while not self._established:
            if self._error is not None:
                raise self._error
            await self._receive_lot.park()

    # -- trio Stream ------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the tunnel is closed")
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error

    def _check_send(self) -> None:
        self._check()
        if self._send_error is not None:
            raise trio.BrokenResourceError(str(self._send_error)) from self._send_error

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this tunnel")
        self._receiving = True
        waited = False
        try:
            while True:
                self._check()
                if self._chunks:
                    data = self._take(RECEIVE_BUFFER_SIZE if max_bytes is None else max_bytes)
                    break
                if self._eof:
                    data = b""
                    break
                await self._receive_lot.park()
                waited = True
        finally:
            self._receiving = False
        if data:
            self._conn._consumed(self.stream_id, len(data))
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def _take(self, limit: int) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        start = self._offset
        if start == 0 and len(first) <= limit:
            chunks.popleft()
            if len(first) >= _SMALL_CHUNK or not chunks:
                return first
            # Join small chunks (many small frames) into one read.
            parts, size = [first], len(first)
            while chunks and size + len(chunks[0]) <= limit:
                chunk = chunks.popleft()
                parts.append(chunk)
                size += len(chunk)
            return b"".join(parts)
        end = min(len(first), start + limit)
        data = first[start:end]
        if end == len(first):
            chunks.popleft()
            self._offset = 0
        else:
            self._offset = end
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this tunnel")
        self._sending = True
        waited = False
        conn = self._conn
        try:
            while True:
                self._check_send()
                if self._eof_sent:
                    raise trio.ClosedResourceError("send_eof() was called on this tunnel")
                if not view:
                    break
                if conn._backlogged():
                    await conn._drain_lot.park()
                    waited = True
                    continue
                sent = conn._send(self.stream_id, view)
                if sent:
                    view = view[sent:]
                else:
                    await self._send_lot.park()
                    waited = True
        finally:
            self._sending = False
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        while True:
            self._check_send()
            if self._conn._send_window(self.stream_id) > 0 and not self._conn._backlogged():
                await trio.lowlevel.checkpoint()
                return
            await self._send_lot.park()

    async def send_eof(self) -> None:
        """Half-close the tunnel: END_STREAM; the peer reads EOF, we go on reading."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this tunnel")
        self._check()
        # After the peer's "stop sending" the stream is closed: nothing to end.
        if not self._eof_sent and self._send_error is None:
            self._eof_sent = True
            self._conn._send_eof(self.stream_id)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def reset(self, error_code: ErrorCodes | int = ErrorCodes.CANCEL) -> None:
        """Abort the tunnel with RST_STREAM ``error_code`` and close it."""
        if not self._closed:
            self._conn._reset(self.stream_id, error_code)
        await self.aclose()

    async def aclose(self) -> None:
        """Close: END_STREAM when the peer is done and all was read, else RST_STREAM CANCEL."""
        if not self._closed:
            self._closed = True
            self._chunks.clear()
            self._conn._release(self.stream_id)
            self._receive_lot.unpark_all()
            self._send_lot.unpark_all()
        await trio.lowlevel.checkpoint()


# -- the connection runner (client and server) ----------------------------------------


class _ConnectionRunner:
    """Drives one sans-IO core over a trio stream: reader, writer, timers."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        core: p.HboneConnection,
        *,
        peer: SpiffeId | None,
        idle_timeout: float | None = None,
    ) -> None:
        self._transport = transport
        self._core = core
        self.peer = peer if peer is not None else getattr(transport, "peer", None)
        self._try_send: Callable[[memoryview], int] | None = getattr(transport, "try_send", None)
        self._tunnels: dict[int, TunnelStream] = {}
        self._out: memoryview | None = None  # taken from the core, not yet written
        self._queued = 0  # tunnel bytes queued in the core since the writer last took
        self._writing = False
        self._in_dispatch = False
        self._write_lot = trio.lowlevel.ParkingLot()
        self._drain_lot = trio.lowlevel.ParkingLot()
        self._idle_lot = trio.lowlevel.ParkingLot()
        self._timer_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._write_interrupted = False
        self._idle_timeout = idle_timeout
        self._idle_deadline: float | None = None
        self._failure: HboneError | None = None
        self._closing = False  # graceful close decided: final GOAWAY queued
        self._started = False
        self._done = trio.Event()
        self._writer_stopped = trio.Event()
        self._finished = trio.Event()
        self._dispatch: dict[type[p.Event], Callable[[Any], None]] = {
            p.DataReceived: self._on_data,
            p.EndOfStream: self._on_end_of_stream,
            p.StreamAborted: self._on_aborted,
            p.SendWindowOpened: self._on_window,
            p.ConnectionEnded: self._on_connection_ended,
            p.TunnelEstablished: self._on_established,
            p.TunnelRejected: self._on_rejected,
            p.TunnelRequested: self._on_requested,
            p.RequestRejected: self._on_request_rejected,
            p.PeerSettingsChanged: self._on_peer_settings,
        }

    # -- state --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The connection is over (or closing): no new tunnels."""
        return self._done.is_set() or self._closing or self._failure is not None

    @property
    def active_streams(self) -> int:
        return len(self._tunnels)

    @property
    def failure(self) -> HboneError | None:
        """Why the connection ended, when it did not end gracefully."""
        return self._failure

    # -- running ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the connection until it ends; the transport is closed on return."""
        if self._started:
            raise LocalProtocolError("this HBONE connection already ran")
        self._started = True
        try:
            self._core.start(trio.current_time())
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._timer_loop)
                self._flush()
                self._set_idle_deadline()
                task_status.started()
                await self._done.wait()
                # The writer sends what is left (a final GOAWAY) and stops by itself.
                self._write_lot.unpark_all()
                with trio.move_on_after(_CLOSE_GRACE):
                    await self._writer_stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._done.set()
            failure = self._failure or ConnectionLost("the HBONE connection was closed")
            for tunnel in list(self._tunnels.values()):
                tunnel._fail(failure)
            self._wake_all()
            with trio.CancelScope(shield=True):
                await self._close_transport()
            self._finished.set()

    async def _close_transport(self) -> None:
        with trio.move_on_after(_CLOSE_GRACE) as scope:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                if self._write_interrupted:
                    raise trio.BrokenResourceError  # resending could repeat bytes: skip
                if self._out is not None:
                    await self._transport.send_all(self._out)
                    self._out = None
                data = self._core.data_to_send()
                if data:
                    await self._transport.send_all(data)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._transport.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._transport)

    def _fail(self, error: HboneError) -> None:
        """The connection is dead: fail every tunnel, stop every task."""
        if self._failure is None and not self._done.is_set():
            self._failure = error
            _log.debug("hbone connection failed", error=str(error), peer=str(self.peer))
        if not self._core.closed:
            self._core.receive_eof()  # marks the core closed
        for tunnel in list(self._tunnels.values()):
            tunnel._fail(error)
        self._wake_all()
        self._done.set()

    def _finish_gracefully(self) -> None:
        """Final GOAWAY(NO_ERROR), then close once it is written."""
        if self._done.is_set():
            return
        self._closing = True
        if not self._core.closed:
            self._core.close(ErrorCodes.NO_ERROR)
        self._done.set()

    def _wake_all(self) -> None:
        self._write_lot.unpark_all()
        self._drain_lot.unpark_all()
        self._idle_lot.unpark_all()

    # -- reading ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        transport = self._transport
        core = self._core
        try:
            while True:
                data = await transport.receive_some(RECEIVE_BUFFER_SIZE)
                if not data:
                    self._fail(ConnectionLost("the HBONE peer closed the connection"))
                    return
                try:
                    events = core.receive_data(data)
                except ProtocolViolation as exc:
                    _log.info("hbone protocol violation", error=str(exc), peer=str(self.peer))
                    self._fail(exc)
                    return
                self._handle(events)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(ConnectionLost(f"the HBONE connection broke: {exc}"))

    def _handle(self, events: list[p.Event]) -> None:
        self._in_dispatch = True
        try:
            dispatch = self._dispatch
            for event in events:
                dispatch[type(event)](event)
        finally:
            self._in_dispatch = False
        self._flush()
        self._reschedule()

    def _on_data(self, event: p.DataReceived) -> None:
        tunnel = self._tunnels.get(event.stream_id)
        if tunnel is None or tunnel._closed:
            self._core.acknowledge(event.stream_id, len(event.data))
        else:
            tunnel._feed(event.data)

    def _on_end_of_stream(self, event: p.EndOfStream) -> None:
        tunnel = self._tunnels.get(event.stream_id)
        if tunnel is not None:
            tunnel._feed_eof()

    def _on_aborted(self, event: p.StreamAborted) -> None:
        tunnel = self._tunnels.get(event.stream_id)
        if tunnel is None:
            return
        if event.remote and event.error_code == ErrorCodes.NO_ERROR and tunnel._eof:
            tunnel._fail_sending(StreamReset(event.error_code))
        elif event.remote:
            tunnel._fail(StreamReset(event.error_code))
        else:
            tunnel._fail(
                ProtocolViolation("the peer broke HTTP/2 on this tunnel", event.error_code)
            )

    def _on_window(self, event: p.SendWindowOpened) -> None:
        if event.stream_id == 0:
            for tunnel in self._tunnels.values():
                tunnel._wake_sender()
        else:
            one = self._tunnels.get(event.stream_id)
            if one is not None:
                one._wake_sender()

    def _on_connection_ended(self, event: p.ConnectionEnded) -> None:
        if event.graceful:
            if not self._tunnels:
                self._finish_gracefully()
            return
        code = event.error_code
        name = code.name if isinstance(code, ErrorCodes) else code
        self._fail(
            ConnectionLost(
                f"the HBONE peer ended the connection (GOAWAY {name})"
                if event.remote and code is not None
                else "the HBONE connection ended",
                code,
                event.last_stream_id,
            )
        )

    def _on_peer_settings(self, event: p.PeerSettingsChanged) -> None:
        """Nothing to do: ``available_streams`` reads the peer's limit when asked."""

    def _on_established(self, event: p.TunnelEstablished) -> None:
        tunnel = self._tunnels.get(event.stream_id)
        if tunnel is not None:
            tunnel._set_established()

    def _on_rejected(self, event: p.TunnelRejected) -> None:
        tunnel = self._tunnels.get(event.stream_id)
        if tunnel is not None:
            tunnel._fail(TunnelRefused(event.status))

    def _on_requested(self, event: p.TunnelRequested) -> None:
        self._core.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)

    def _on_request_rejected(self, event: p.RequestRejected) -> None:
        _log.info(
            "hbone request rejected",
            status=event.status,
            reason=event.reason,
            peer=str(self.peer),
        )

    # -- writing ------------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what the core has queued without waiting; the writer takes the rest."""
        if self._in_dispatch:
            return
        if self._done.is_set():
            self._write_lot.unpark_all()  # the writer sends the last bytes
            return
        if self._writing or self._out is not None or self._try_send is None:
            self._write_lot.unpark_all()
            return
        data = self._core.data_to_send()
        self._queued = 0
        if not data:
            return
        view = memoryview(data)
        try:
            sent = self._try_send(view)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(ConnectionLost(f"the HBONE connection broke: {exc}"))
            return
        if sent < len(view):
            self._out = view[sent:]
            self._write_lot.unpark_all()

    def _backlogged(self) -> bool:
        out = len(self._out) if self._out is not None else 0
        return out + self._queued >= OUTPUT_HIGH_WATER

    async def _write_loop(self) -> None:
        transport = self._transport
        try:
            while True:
                if self._out is None:
                    data = self._core.data_to_send()
                    self._queued = 0
                    if data:
                        self._out = memoryview(data)
                if self._out is None:
                    if self._done.is_set():
                        return  # everything written
                    self._drain_lot.unpark_all()
                    await self._write_lot.park()
                    continue
                self._writing = True
                try:
                    await transport.send_all(self._out)
                except BaseException:
                    self._write_interrupted = True  # part of _out may be on the wire
                    raise
                finally:
                    self._writing = False
                self._out = None
                self._drain_lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._write_interrupted = True
            self._fail(ConnectionLost(f"the HBONE connection broke: {exc}"))
        finally:
            self._writer_stopped.set()

    # -- timers -------------------------------------------------------------------------

    def _next_timer(self) -> float:
        deadline = self._core.next_deadline()
        candidates = [d for d in (deadline, self._idle_deadline) if d is not None]
        return min(candidates) if candidates else math.inf

    def _reschedule(self) -> None:
        if self._timer_scope is not None:
            self._timer_scope.deadline = self._next_timer()

    def _set_idle_deadline(self) -> None:
        if self._idle_timeout is not None and not self._tunnels:
            self._idle_deadline = trio.current_time() + self._idle_timeout
        else:
            self._idle_deadline = None
        self._reschedule()

    async def _timer_loop(self) -> None:
        while not self._done.is_set():
            with trio.CancelScope(deadline=self._next_timer()) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            now = trio.current_time()
            try:
                self._core.handle_timer(now)
            except KeepaliveTimeout as exc:
                _log.info("hbone keepalive timeout", peer=str(self.peer))
                self._fail(exc)
                return
            if self._idle_deadline is not None and now >= self._idle_deadline and not self._tunnels:
                _log.debug("hbone connection idle, closing", peer=str(self.peer))
                self._core.start_draining()
                self._finish_gracefully()
                return
            self._flush()

    # -- used by tunnels ----------------------------------------------------------------

    def _send(self, stream_id: int, view: memoryview) -> int:
        try:
            sent = self._core.send_data(stream_id, view)
        except HboneError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        self._queued += sent
        self._flush()
        return sent

    def _send_window(self, stream_id: int) -> int:
        try:
            return self._core.send_window(stream_id)
        except HboneError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    def _send_eof(self, stream_id: int) -> None:
        try:
            self._core.send_eof(stream_id)
        except HboneError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        self._flush()

    def _consumed(self, stream_id: int, size: int) -> None:
        self._core.acknowledge(stream_id, size)
        self._flush()

    def _reset(self, stream_id: int, error_code: ErrorCodes | int) -> None:
        self._core.reset_stream(stream_id, error_code)
        self._flush()

    def _release(self, stream_id: int) -> None:
        if self._tunnels.pop(stream_id, None) is None:
            return
        self._core.release(stream_id)
        self._flush()
        if not self._tunnels:
            self._idle_lot.unpark_all()
            if self._core.draining and not self._done.is_set():
                self._finish_gracefully()
            else:
                self._set_idle_deadline()


# -- client -------------------------------------------------------------------------------


class HboneClientConnection(_ConnectionRunner):
    """The client side of one HBONE connection: opens tunnels on it.

    Run it in a nursery (``await nursery.start(conn.run)``) or use
    :func:`open_hbone_connection`. ``idle_timeout`` closes the connection
    gracefully once it has carried no tunnel for that long (the pool uses 5
    minutes); ``None`` keeps it open.
    """

    _core: p.HboneClient

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        settings: p.HboneSettings | None = None,
        peer: SpiffeId | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        super().__init__(transport, p.HboneClient(settings), peer=peer, idle_timeout=idle_timeout)

    @property
    def max_streams(self) -> int:
        """min(our cap, the peer's SETTINGS_MAX_CONCURRENT_STREAMS)."""
        return self._core.max_streams

    @property
    def available_streams(self) -> int:
        """How many more tunnels :meth:`open_tunnel` accepts right now."""
        if self.closed or not self._started:
            return 0
        return self._core.available_streams

    async def open_tunnel(
        self, request: ConnectRequest | SocketAddress, *, timeout: float | None = None
    ) -> TunnelStream:
        """Open a CONNECT to ``request`` and wait for the 200.

        The stream slot is taken before this first awaits, so a caller that
        checked :attr:`available_streams` gets it. Raises
        :class:`~underpass.hbone.errors.TunnelRefused` (not 200),
        :class:`~underpass.hbone.errors.StreamLimitReached`,
        :class:`~underpass.hbone.errors.ConnectionUnavailable`,
        :class:`~underpass.hbone.errors.StreamReset`,
        :class:`~underpass.hbone.errors.ConnectionLost`, or
        ``trio.TooSlowError`` after ``timeout`` seconds.
        """
        if isinstance(request, SocketAddress):
            request = ConnectRequest(request)
        if not self._started:
            raise LocalProtocolError("run() the HBONE connection before opening tunnels")
        if self.closed:
            raise ConnectionUnavailable(
                "the HBONE connection is closed; open the tunnel on another connection"
            ) from self._failure
        stream_id = self._core.open_stream(request)
        tunnel = TunnelStream(self, stream_id, peer=self.peer, request=request)
        self._tunnels[stream_id] = tunnel
        self._idle_deadline = None
        self._flush()
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                await tunnel._wait_established()
        except BaseException:
            tunnel._closed = True
            self._release(stream_id)
            raise
        return tunnel

    async def aclose(self, drain_timeout: float = 30.0) -> None:
        """Close gracefully: no new tunnels, wait for open ones (at most ``drain_timeout``).

        Then a GOAWAY(NO_ERROR) and the transport is closed; tunnels still open
        after the timeout fail with ``ConnectionLost``.
        """
        if not self._started:
            await trio.aclose_forcefully(self._transport)
            return
        if not self._done.is_set():
            self._core.start_draining()
            with trio.move_on_after(drain_timeout):
                while self._tunnels and not self._done.is_set():
                    await self._idle_lot.park()
            self._finish_gracefully()
        await self._finished.wait()


@contextlib.asynccontextmanager
async def open_hbone_connection(
    transport: trio.abc.Stream,
    *,
    settings: p.HboneSettings | None = None,
    peer: SpiffeId | None = None,
    idle_timeout: float | None = None,
) -> AsyncIterator[HboneClientConnection]:
    """Run a client connection for the ``async with`` block; close it gracefully after."""
    connection = HboneClientConnection(
        transport, settings=settings, peer=peer, idle_timeout=idle_timeout
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        try:
            yield connection
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose(drain_timeout=0)


# -- server -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """What a server handler decides on: the validated CONNECT and who asked."""

    info: RequestInfo
    peer: SpiffeId | None  # the TLS client's identity (what policy matches on)
    local_ip: IPAddress | None  # the IP the HBONE connection was addressed to

    @property
    def authority(self) -> SocketAddress:
        return self.info.authority

    @property
    def client(self) -> SocketAddress | None:
        return self.info.client


class TunnelConsumer(abc.ABC):
    """A handler's answer that takes the accepted tunnel itself and owns resources.

    The server calls it with the tunnel once the CONNECT is accepted. When the
    tunnel never gets that far (the client reset it, the connection ended) it
    calls :meth:`discard` instead, so that what the handler prepared (an
    upstream connection made before answering 200) is released.
    """

    @abc.abstractmethod
    async def __call__(self, tunnel: TunnelStream) -> None: ...

    @abc.abstractmethod
    async def discard(self) -> None: ...


#: A handler's answer: a status to refuse with (401, 503, ...), an upstream
#: stream to relay the tunnel to (200 is sent first), or a coroutine function
#: that takes the accepted tunnel itself (a waypoint's L7 processing).
HandlerResult = int | trio.abc.Stream | Callable[[TunnelStream], Awaitable[None]]
Handler = Callable[[InboundRequest], Awaitable[HandlerResult]]


class HboneServerConnection(_ConnectionRunner):
    """The server side of one HBONE connection.

    ``handler`` is called once per CONNECT that passed the checks, in its own
    task. It answers with a :data:`HandlerResult`, or raises: an HBONE error
    with a ``status`` (:class:`~underpass.hbone.errors.PolicyDenied` 401,
    :class:`~underpass.hbone.errors.UpstreamUnavailable` 503) is answered with
    it; ``OSError`` and any other exception with 503 (logged: fail closed).
    ``local_ip`` is the address the connection came in on (taken from the
    transport's socket when omitted); a waypoint passes ``waypoint=True``.
    """

    _core: p.HboneServer

    def __init__(
        self,
        transport: trio.abc.Stream,
        handler: Handler,
        *,
        local_ip: IPAddress | str | None = None,
        waypoint: bool = False,
        settings: p.HboneSettings | None = None,
        peer: SpiffeId | None = None,
    ) -> None:
        if local_ip is None and not waypoint:
            local_ip = _local_ip_of(transport)
        super().__init__(
            transport, p.HboneServer(local_ip, waypoint=waypoint, settings=settings), peer=peer
        )
        self._handler = handler

    @property
    def local_ip(self) -> IPAddress | None:
        return self._core.local_ip

    async def drain(self, timeout: float = 30.0) -> None:
        """GOAWAY to the client, let open tunnels finish (at most ``timeout``), close."""
        if not self._started:
            raise LocalProtocolError("run() the HBONE connection before draining it")
        if self._done.is_set():
            await self._finished.wait()
            return
        self._core.start_draining()
        self._flush()
        with trio.move_on_after(timeout):
            while self._tunnels and not self._done.is_set():
                await self._idle_lot.park()
        self._finish_gracefully()
        await self._finished.wait()

    def _on_requested(self, event: p.TunnelRequested) -> None:
        tunnel = TunnelStream(self, event.stream_id, peer=self.peer, info=event.info)
        self._tunnels[event.stream_id] = tunnel
        self._idle_deadline = None
        request = InboundRequest(event.info, self.peer, self._core.local_ip)
        assert self._nursery is not None  # events arrive only while run() runs
        self._nursery.start_soon(self._serve_tunnel, tunnel, request)

    async def _serve_tunnel(self, tunnel: TunnelStream, request: InboundRequest) -> None:
        upstream: trio.abc.Stream | None = None
        unused: TunnelConsumer | None = None
        try:
            result = await self._decide(request)
            if isinstance(result, int):
                self._refuse(tunnel, result)
                return
            if isinstance(result, trio.abc.Stream):
                upstream = result
            elif isinstance(result, TunnelConsumer):
                unused = result
            try:
                self._core.accept(tunnel.stream_id)
            except HboneError:
                return  # the client reset the stream, or the connection ended, meanwhile
            self._flush()
            if upstream is not None:
                relayed, upstream = upstream, None  # relay() closes it
                await relay(tunnel, relayed)
            elif not isinstance(result, trio.abc.Stream):
                unused = None  # the consumer owns its resources from here on
                await self._consume(tunnel, result, request)
        finally:
            with trio.CancelScope(shield=True):
                if upstream is not None:  # never accepted: close it
                    await trio.aclose_forcefully(upstream)
                if unused is not None:
                    await unused.discard()
                await tunnel.aclose()

    async def _consume(
        self,
        tunnel: TunnelStream,
        consumer: Callable[[TunnelStream], Awaitable[None]],
        request: InboundRequest,
    ) -> None:
        """Run the handler's tunnel consumer; its failure ends its tunnel, nothing else."""
        try:
            await consumer(tunnel)
        except (trio.BrokenResourceError, trio.ClosedResourceError, HboneError):
            await tunnel.reset(ErrorCodes.CANCEL)
        except Exception:
            _log.exception("hbone tunnel consumer failed", authority=str(request.authority))
            await tunnel.reset(ErrorCodes.INTERNAL_ERROR)

    async def _decide(self, request: InboundRequest) -> HandlerResult:
        try:
            result = await self._handler(request)
        except HboneError as exc:
            status = exc.status if exc.status is not None else 503
            _log.info(
                "hbone tunnel refused",
                status=status,
                reason=str(exc),
                authority=str(request.authority),
                peer=str(request.peer),
            )
            return status
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            _log.info(
                "hbone upstream failed",
                status=503,
                error=str(exc),
                authority=str(request.authority),
            )
            return 503
        except Exception:
            _log.exception("hbone handler failed; answering 503", authority=str(request.authority))
            return 503
        if isinstance(result, bool) or (isinstance(result, int) and not 400 <= result <= 599):
            _log.error("hbone handler returned an invalid status; answering 503", status=result)
            return 503
        if not isinstance(result, int | trio.abc.Stream) and not callable(result):
            _log.error("hbone handler returned an invalid result; answering 503", result=result)
            return 503
        return result

    def _refuse(self, tunnel: TunnelStream, status: int) -> None:
        if self._tunnels.pop(tunnel.stream_id, None) is None:
            return
        tunnel._closed = True
        with contextlib.suppress(HboneError):
            self._core.reject(tunnel.stream_id, status)
        self._flush()
        if not self._tunnels and self._core.draining and not self._done.is_set():
            self._finish_gracefully()


def _local_ip_of(transport: trio.abc.Stream) -> IPAddress:
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, socket.socket):
        raise LocalProtocolError(
            "cannot tell which IP the HBONE connection was addressed to; pass local_ip"
        )
    return _local_ip_of_socket(sock)


async def serve_hbone(
    transport: trio.abc.Stream,
    handler: Handler,
    *,
    local_ip: IPAddress | str | None = None,
    waypoint: bool = False,
    settings: p.HboneSettings | None = None,
    peer: SpiffeId | None = None,
    task_status: trio.TaskStatus[HboneServerConnection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HBONE on ``transport`` until the connection ends (see :class:`HboneServerConnection`).

    ``task_status.started`` hands over the connection (for ``drain``).
    """
    connection = HboneServerConnection(
        transport, handler, local_ip=local_ip, waypoint=waypoint, settings=settings, peer=peer
    )

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await connection.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        task_status.started(connection)


async def serve_hbone_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    trust_domain: str,
    handler: Handler,
    *,
    waypoint: bool = False,
    settings: p.HboneSettings | None = None,
    handshake_timeout: float = 10.0,
    on_connection: Callable[[HboneServerConnection], None] | None = None,
) -> None:
    """TLS handshake on an accepted socket (taken over), then :func:`serve_hbone`.

    ``context`` presents the certificate of the workload that owns the
    socket's local IP (no SNI). A failed or slow handshake is logged and
    the socket closed; nothing is raised. ``on_connection`` is told the
    connection once it serves (a proxy keeps it to ``drain`` it later).
    """
    try:
        local_ip = None if waypoint else _local_ip_of_socket(sock)
        with trio.fail_after(handshake_timeout):
            transport = await accept_tls(sock, context, trust_domain)
    except (OSError, ssl.SSLError, PeerIdentityError, trio.TooSlowError, HboneError) as exc:
        sock.close()
        _log.info("hbone handshake failed", error=f"{type(exc).__name__}: {exc}")
        return
    connection = HboneServerConnection(
        transport,
        handler,
        local_ip=local_ip,
        waypoint=waypoint,
        settings=settings,
        peer=transport.peer,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        if on_connection is not None:
            on_connection(connection)


def _local_ip_of_socket(sock: socket.socket) -> IPAddress:
    ip = ipaddress.ip_address(sock.getsockname()[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
