"""trio streams straight on a non-blocking socket: TCP and TLS without MemoryBIOs.

PERFORMANCE-NOTES.md: ``trio.SSLStream`` pushes every TLS record through
Python-level MemoryBIO shuffling and costs about 3x in throughput. These
classes keep trio's :class:`trio.abc.Stream` interface but call the socket
(or the ``ssl.SSLSocket`` on it) directly and wait with
``trio.lowlevel.wait_readable`` / ``wait_writable`` only when it would block:

- :class:`SocketStream`: plain TCP (the inner side: the application's or the
  upstream's connection), a :class:`trio.abc.HalfCloseableStream`:
  ``send_eof`` is ``shutdown(SHUT_WR)``, a TCP FIN.
- :class:`TlsSocketStream`: TLS 1.3 over an ``ssl.SSLSocket`` whose handshake
  :func:`identity.tls.tls_client_socket` / ``tls_server_socket`` did.

Both read with ``recv_into``: :meth:`~_RawStream.receive_into` fills the
caller's buffer (no allocation), :meth:`~_RawStream.receive_some` reads into a
per-thread 256 KiB scratch buffer and returns a copy of exactly what arrived
(a stream object holds no buffer of its own, so thousands of idle
connections cost no buffer memory). OpenSSL returns at most one TLS record
(16 KiB) per read, so a TLS read goes on reading records that are already
available, up to the buffer's size, before it returns: one wake-up and one
call up the stack per 256 KiB instead of per 16 KiB. ``send_all`` writes a
``memoryview`` without copying it first.

Half-close and TLS: a TLS connection has no half-close that Python's ``ssl``
module can express. The only way to send ``close_notify`` is
``SSLSocket.unwrap()``, which also ends reading; and a bare TCP FIN under TLS
is a truncation the peer must treat as an error. HBONE does not need it: a
tunnel's half-close is an HTTP/2 END_STREAM inside the connection. So
:meth:`TlsSocketStream.send_eof` raises
:class:`~underpass.hbone.errors.HalfCloseNotSupported` and changes nothing;
:meth:`TlsSocketStream.aclose` sends ``close_notify`` (best effort, never
waiting for the peer's) and closes the socket. Reading accepts an EOF without
``close_notify`` as end of stream: the HTTP/2 layer above notices a
truncated connection (streams not ended) and fails the tunnels.

Errors are translated in one place: ``OSError`` / ``ssl.SSLError`` become
``trio.BrokenResourceError`` (the original is ``__cause__``); use after
``aclose`` is ``trio.ClosedResourceError``; two tasks receiving (or sending)
at once is ``trio.BusyResourceError``. A ``send_all`` cancelled while OpenSSL
holds part of a record leaves the TLS stream broken (OpenSSL requires the
retry to pass the same bytes).

:meth:`~_RawStream.reset` closes abortively (``SO_LINGER`` 0: a TCP RST), what
a proxy does to the other side when a tunnel is reset (RFC 9113 section 8.5).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable, Collection, Iterator

import trio

from identity.spiffe import SpiffeId
from identity.tls import tls_client_socket, tls_server_socket
from underpass.hbone.errors import HalfCloseNotSupported
from underpass.hbone.headers import SocketAddress

__all__ = [
    "RECEIVE_BUFFER_SIZE",
    "SocketStream",
    "TlsSocketStream",
    "accept_tls",
    "connect_tcp",
    "connect_tls",
    "set_tcp_keepalive",
]

#: Size of one read: the scratch buffer of ``receive_some`` and the relays' buffers.
RECEIVE_BUFFER_SIZE = 256 * 1024

_thread_state = threading.local()
_Socket = socket.socket  # the class attribute `socket` shadows the module in class bodies


def _scratch() -> bytearray:
    buffer: bytearray | None = getattr(_thread_state, "scratch", None)
    if buffer is None:
        buffer = bytearray(RECEIVE_BUFFER_SIZE)
        _thread_state.scratch = buffer
    return buffer


def _set_nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_tcp_keepalive(
    sock: socket.socket, idle: int = 180, interval: int = 20, count: int = 9
) -> None:
    """TCP keepalive on ``sock`` (HBONE connections keep it on, PROTOCOLS.md section 2).

    The values are ours (the kernel's default of 2 h idle is too long to
    notice a vanished peer); the HTTP/2 PING finds dead peers sooner anyway.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        (getattr(socket, "TCP_KEEPIDLE", None), idle),
        (getattr(socket, "TCP_KEEPINTVL", None), interval),
        (getattr(socket, "TCP_KEEPCNT", None), count),
    ):
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class _Guard:
    """trio's one-task-at-a-time rule for one direction of a stream."""

    __slots__ = ("_busy", "_what")

    def __init__(self, what: str) -> None:
        self._what = what
        self._busy = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self._busy:
            raise trio.BusyResourceError(f"another task is already {self._what} on this stream")
        self._busy = True
        try:
            yield
        finally:
            self._busy = False


class _RawStream(trio.abc.Stream):
    """What the TCP and TLS streams share; the subclasses say how to read and write."""

    _WOULD_BLOCK_READ: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)
    _WOULD_BLOCK_WRITE: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        _set_nodelay(sock)
        self._sock = sock
        self._closed = False
        self._eof_sent = False
        self._broken: BaseException | None = None
        self._receive_guard = _Guard("receiving")
        self._send_guard = _Guard("sending")

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (an ``ssl.SSLSocket`` for TLS): for addresses and options."""
        return self._sock

    # -- reading ---------------------------------------------------------------------

    def _read(self, view: memoryview) -> int:
        return self._sock.recv_into(view)

    async def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Read into ``buffer``; returns the number of bytes, ``0`` at end of stream."""
        view = memoryview(buffer)
        if not len(view):
            raise ValueError("receive_into needs a non-empty buffer")
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        with self._receive_guard():
            while True:
                self._check_open()
                try:
                    count = self._read(view)
                except self._WOULD_BLOCK_READ:
                    await self._wait_for_read()
                    waited = True
                    continue
                except ssl.SSLWantWriteError:
                    await self._wait(trio.lowlevel.wait_writable)
                    waited = True
                    continue
                except (OSError, ValueError) as exc:
                    raise self._translate(exc) from exc
                break
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return count

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Read what is available (up to ``max_bytes``, at most 256 KiB); ``b""`` at EOF."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        scratch = _scratch()
        limit = RECEIVE_BUFFER_SIZE if max_bytes is None else min(max_bytes, RECEIVE_BUFFER_SIZE)
        view = memoryview(scratch)[:limit]
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        with self._receive_guard():
            while True:
                self._check_open()
                try:
                    count = self._read(view)
                except self._WOULD_BLOCK_READ:
                    await self._wait_for_read()
                    waited = True
                    continue
                except ssl.SSLWantWriteError:
                    await self._wait(trio.lowlevel.wait_writable)
                    waited = True
                    continue
                except (OSError, ValueError) as exc:
                    raise self._translate(exc) from exc
                # Copy out before any await: the scratch buffer is shared.
                data = bytes(view[:count])
                break
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def _wait_for_read(self) -> None:
        await self._wait(trio.lowlevel.wait_readable)

    async def _wait(self, waiter: Callable[[_Socket], Awaitable[None]]) -> None:
        try:
            await waiter(self._sock)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the stream was closed") from None

    # -- writing ---------------------------------------------------------------------

    def _write(self, view: memoryview) -> int:
        return self._sock.send(view)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` (a ``memoryview`` is sent without a copy)."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        with self._send_guard():
            self._check_sendable()
            pending = False  # OpenSSL holds part of `view` and needs it again
            try:
                while view:
                    try:
                        sent = self._write(view)
                    except self._WOULD_BLOCK_WRITE:
                        pending = True
                        await self._wait(trio.lowlevel.wait_writable)
                        waited = True
                        continue
                    except ssl.SSLWantReadError:
                        pending = True
                        await self._wait(trio.lowlevel.wait_readable)
                        waited = True
                        continue
                    except (OSError, ValueError) as exc:
                        raise self._translate(exc) from exc
                    pending = False
                    view = view[sent:]
            except BaseException as exc:
                if pending and self._marks_broken_on_interrupt:
                    self._broken = exc
                raise
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    _marks_broken_on_interrupt = False

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes now, without waiting; returns how many bytes.

        After a short count, the next write (``try_send`` or ``send_all``)
        must start with exactly ``data[count:]``: a TLS socket may hold part
        of those bytes already (OpenSSL wants the same bytes again). No
        checkpoint: this is the synchronous fast path for a single writer.
        """
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        with self._send_guard():
            self._check_sendable()
            try:
                return self._write(view)
            except self._WOULD_BLOCK_WRITE:
                return 0
            except ssl.SSLWantReadError:
                return 0
            except (OSError, ValueError) as exc:
                raise self._translate(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard():
            self._check_open()
            await self._wait(trio.lowlevel.wait_writable)

    # -- closing ---------------------------------------------------------------------

    def _close_notify(self) -> None:
        """TLS sends close_notify here; plain TCP has nothing to say."""

    async def aclose(self) -> None:
        """Close the stream (TLS: after a best-effort ``close_notify``)."""
        if not self._closed:
            self._closed = True
            try:
                trio.lowlevel.notify_closing(self._sock)
                with contextlib.suppress(OSError, ValueError):
                    self._close_notify()
            finally:
                self._sock.close()
        await trio.lowlevel.checkpoint()

    async def reset(self) -> None:
        """Close abortively: the peer gets a TCP RST, not a FIN (nor a close_notify)."""
        if not self._closed:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._closed = True
            try:
                trio.lowlevel.notify_closing(self._sock)
            finally:
                self._sock.close()
        await trio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        """Close without waiting (for ``finally`` blocks in cancelled code)."""
        if not self._closed:
            self._closed = True
            try:
                trio.lowlevel.notify_closing(self._sock)
            finally:
                self._sock.close()

    # -- helpers ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")

    def _check_sendable(self) -> None:
        self._check_open()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        if self._broken is not None:
            raise trio.BrokenResourceError(
                "an earlier send on this stream was interrupted"
            ) from self._broken

    def _translate(self, exc: BaseException) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._closed:
            return trio.ClosedResourceError("the stream is closed")
        return trio.BrokenResourceError(f"the connection failed: {exc}")


class SocketStream(_RawStream, trio.abc.HalfCloseableStream):
    """A trio stream over a connected TCP socket (taken over: closed with the stream)."""

    async def send_eof(self) -> None:
        """Half-close: a TCP FIN; reading goes on. Idempotent."""
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._send_guard():
            self._check_open()
            if not self._eof_sent:
                self._eof_sent = True
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:  # the peer already closed: fine
                        raise self._translate(exc) from exc
        await trio.lowlevel.cancel_shielded_checkpoint()


class TlsSocketStream(_RawStream):
    """A trio stream over a non-blocking ``ssl.SSLSocket`` whose handshake is done.

    ``peer`` is the SPIFFE ID the handshake verified (see :func:`connect_tls`
    and :func:`accept_tls`). No half-close: see the module docstring.
    """

    _WOULD_BLOCK_READ = (ssl.SSLWantReadError, BlockingIOError, InterruptedError)
    _WOULD_BLOCK_WRITE = (ssl.SSLWantWriteError, BlockingIOError, InterruptedError)
    _marks_broken_on_interrupt = True

    def __init__(self, sock: ssl.SSLSocket, peer: SpiffeId | None = None) -> None:
        super().__init__(sock)
        self._tls = sock
        self.peer = peer

    def _read(self, view: memoryview) -> int:
        tls = self._tls
        total = tls.recv_into(view)
        if total == 0:
            return 0
        size = len(view)
        # Go on with records that are already here (one per call), up to the buffer.
        while total < size:
            try:
                count = tls.recv_into(view[total:])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if count == 0:
                break  # EOF: the next call reports it
            total += count
        return total

    async def send_eof(self) -> None:
        """Not possible over TLS here: raises ``HalfCloseNotSupported`` (module docstring)."""
        await trio.lowlevel.checkpoint()
        raise HalfCloseNotSupported(
            "TLS over Python's ssl module has no half-close (close_notify ends reading "
            "too); HBONE half-closes tunnels with HTTP/2 END_STREAM instead"
        )

    def _close_notify(self) -> None:
        # Non-blocking unwrap() sends close_notify, then wants the peer's: don't wait.
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()


# -- connecting ----------------------------------------------------------------------


async def connect_tcp(
    address: SocketAddress,
    *,
    prepare: Callable[[socket.socket], None] | None = None,
    sock: socket.socket | None = None,
) -> socket.socket:
    """A connected non-blocking TCP socket to ``address``.

    ``prepare`` runs on the fresh socket before ``connect`` (``SO_MARK``, a
    source address with ``IP_TRANSPARENT``, ...). ``sock`` is a socket made
    by the caller (in another netns, say) to connect instead of a fresh one;
    it is taken over. Bound the call with a cancel scope; on any failure the
    socket is closed and ``OSError`` raised.
    """
    if sock is None:
        family = socket.AF_INET6 if address.ip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if prepare is not None:
            prepare(sock)
        error = sock.connect_ex(address.as_sockaddr())
        if error in (errno.EINPROGRESS, errno.EAGAIN):
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()
        if error:
            raise OSError(error, f"connect to {address}: {os.strerror(error)}")
        return sock
    except BaseException:
        sock.close()
        raise


async def connect_tls(
    address: SocketAddress,
    context: ssl.SSLContext,
    expected: Collection[SpiffeId],
    *,
    prepare: Callable[[socket.socket], None] | None = None,
) -> TlsSocketStream:
    """TCP connect, TLS handshake, server identity check: an HBONE client transport.

    The server must present one of ``expected``. Errors: ``OSError`` (TCP),
    ``ssl.SSLError`` (handshake), ``identity.errors.PeerIdentityError``.
    """
    sock = await connect_tcp(address, prepare=prepare)
    try:
        set_tcp_keepalive(sock)
    except OSError:
        sock.close()
        raise
    tls, peer = await tls_client_socket(sock, context, expected)
    return TlsSocketStream(tls, peer)


async def accept_tls(
    sock: socket.socket, context: ssl.SSLContext, trust_domain: str
) -> TlsSocketStream:
    """Server side of :func:`connect_tls` on an accepted socket (taken over)."""
    try:
        sock.setblocking(False)
        set_tcp_keepalive(sock)
    except OSError:
        sock.close()
        raise
    tls, peer = await tls_server_socket(sock, context, trust_domain)
    return TlsSocketStream(tls, peer)
