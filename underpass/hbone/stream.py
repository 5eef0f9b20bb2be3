"""trio streams straight on a non-blocking socket: TCP, and TLS in large batches.

PERFORMANCE-NOTES.md: ``trio.SSLStream`` pushes every TLS record through
Python-level MemoryBIO shuffling and costs about 3x in throughput. These
classes keep trio's :class:`trio.abc.Stream` interface but call the socket
directly and wait with ``trio.lowlevel.wait_readable`` / ``wait_writable``
only when it would block:

- :class:`SocketStream`: plain TCP (the inner side: the application's or the
  upstream's connection), a :class:`trio.abc.HalfCloseableStream`:
  ``send_eof`` is ``shutdown(SHUT_WR)``, a TCP FIN.
- :class:`TlsBioStream`: TLS 1.3 through an ``ssl.SSLObject`` and two
  ``MemoryBIO`` s, in large batches: the HBONE transport (:func:`connect_tls`,
  :func:`accept_tls`, :func:`start_tls_client`, :func:`start_tls_server`).
  A read is ``recv_into`` of up to 256 KiB fed to OpenSSL, and all the
  plaintext it completes is decrypted into the caller's buffer; a write
  encrypts the whole chunk and hands all its records to the kernel in one
  ``sendmsg``. An ``ssl.SSLSocket`` makes one ``write()`` per 16 KiB record
  and two ``read()`` s per record (header, then body; Python's ssl has no
  read-ahead). Between network namespaces (veth, bridge, nftables: the path
  pod traffic takes) each of those calls is a trip through the stack: with
  both ends of the tunnel on batches, ``bench.ztunnel_lab`` measured about
  17% less ztunnel CPU per byte and 15% more single-stream throughput than
  with ``SSLSocket`` s. On loopback alone the copies into and out of the
  BIOs about cancel the calls saved (``bench.hbone_relay``). Unlike
  ``trio.SSLStream``, nothing here reads small or awaits per record. The
  BIOs are fed and drained in 32 KiB pieces: a ``MemoryBIO`` keeps the
  largest size it ever held, and 256 KiB per direction per idle connection
  would add up.
- :class:`TlsSocketStream`: TLS 1.3 over an ``ssl.SSLSocket`` whose handshake
  :func:`identity.tls.tls_client_socket` / ``tls_server_socket`` did (for
  callers that hold such a socket).

All read with ``recv_into``: ``receive_into`` fills the caller's buffer (no
allocation), ``receive_some`` reads into a per-thread 256 KiB scratch buffer
and returns a copy of exactly what arrived (a stream object holds no buffer
of its own, so thousands of idle connections cost no buffer memory). OpenSSL
returns at most one TLS record (16 KiB) per read, so a TLS read goes on with
records that are already available, up to the buffer's size, before it
returns: one wake-up and one call up the stack per 256 KiB instead of per
16 KiB. ``send_all`` writes a ``memoryview`` without copying it first.

Half-close and TLS: a TLS connection has no half-close that Python's ``ssl``
module can express. The only way to send ``close_notify`` is ``unwrap()``,
which also ends reading; and a bare TCP FIN under TLS is a truncation the
peer must treat as an error. HBONE does not need it: a tunnel's half-close is
an HTTP/2 END_STREAM inside the connection. So ``send_eof`` on the TLS
streams raises :class:`~underpass.hbone.errors.HalfCloseNotSupported` and
changes nothing; ``aclose`` sends ``close_notify`` (best effort, never
waiting for the peer's) and closes the socket. Reading accepts an EOF without
``close_notify`` as end of stream: the HTTP/2 layer above notices a
truncated connection (streams not ended) and fails the tunnels.

Errors are translated in one place: ``OSError`` / ``ssl.SSLError`` become
``trio.BrokenResourceError`` (the original is ``__cause__``); use after
``aclose`` is ``trio.ClosedResourceError``; two tasks receiving (or sending)
at once is ``trio.BusyResourceError``. A ``send_all`` cancelled while
encrypted bytes are still unsent leaves the TLS stream broken (the records
are numbered: nothing else may go out before them, and the caller can't know
what was sent).

:meth:`~_RawStream.reset` closes abortively (``SO_LINGER`` 0: a TCP RST), what
a proxy does to the other side when a tunnel is reset (RFC 9113 section 8.5).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import ssl
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterator

import trio

from identity.spiffe import SpiffeId
from identity.tls import verify_client_identity, verify_server_identity
from underpass.hbone.errors import HalfCloseNotSupported
from underpass.hbone.headers import SocketAddress

__all__ = [
    "RECEIVE_BUFFER_SIZE",
    "SocketStream",
    "TlsBioStream",
    "TlsSocketStream",
    "accept_tls",
    "connect_tcp",
    "connect_tls",
    "set_tcp_keepalive",
    "start_tls_client",
    "start_tls_server",
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


def _cipher_scratch() -> memoryview:
    """Where :class:`TlsBioStream` reads ciphertext (separate from the plaintext scratch)."""
    view: memoryview | None = getattr(_thread_state, "cipher_scratch", None)
    if view is None:
        view = memoryview(bytearray(RECEIVE_BUFFER_SIZE))
        _thread_state.cipher_scratch = view
    return view


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


#: Plaintext per ``SSLObject.write`` and ciphertext per ``MemoryBIO.write``: two
#: full records. A memory BIO keeps the largest size it ever held, so pieces this
#: size bound it (about 50 KiB per direction) however large the batches are.
_BIO_PIECE = 32 * 1024
#: The least ciphertext worth one ``recv``: a whole record (16 KiB + header + tag).
_MIN_TLS_READ = 16 * 1024 + 256
#: Buffers per ``sendmsg`` (Linux's IOV_MAX is 1024).
_MAX_SEND_BUFFERS = 256

#: ``SSLObject.read(size, buffer)`` decrypts into ``buffer`` and returns a count
#: (typeshed only knows the form without a buffer, which returns bytes).
_read_into: Callable[[ssl.SSLObject, int, memoryview], int] = ssl.SSLObject.read  # type: ignore[assignment]


class TlsBioStream(_RawStream):
    """A trio stream: TLS 1.3 through an ``ssl.SSLObject`` over a non-blocking TCP socket.

    Made by :func:`start_tls_client` / :func:`start_tls_server` (handshake done,
    peer checked); ``peer`` is the SPIFFE ID the handshake verified. Reads and
    writes go in large batches (module docstring). No half-close: ``send_eof``
    raises ``HalfCloseNotSupported``. ``socket`` is the TCP socket.

    ``try_send`` keeps the contract of the other streams: after a short count,
    the next write starts with exactly ``data[count:]``. Here those bytes may
    already be encrypted and queued (``_ahead``); the next write skips them
    and sends their records first.
    """

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        peer: SpiffeId | None = None,
    ) -> None:
        super().__init__(sock)
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self.peer = peer
        self._unsent: deque[bytes | memoryview] = deque()  # records, in order, not yet sent
        self._ahead = 0  # plaintext already encrypted that the next write starts with
        self._socket_eof = False  # the TCP peer sent FIN (told to the incoming BIO)
        self._tls_eof = False  # OpenSSL reported the end of the stream
        self._flushing = False  # one task waits for the socket to take `_unsent`
        self._flush_lot = trio.lowlevel.ParkingLot()

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The TLS session (for ``version()``, ``cipher()``, ``getpeercert()``)."""
        return self._tls

    # -- reading ---------------------------------------------------------------------

    def _decrypt(self, view: memoryview, total: int) -> int:
        """Decrypt what OpenSSL has whole records for into ``view[total:]``; the new total."""
        tls = self._tls
        incoming = self._incoming
        size = len(view)
        while total < size:
            if not incoming.pending and not incoming.eof and not tls.pending():
                break  # nothing to decrypt until more arrives (spares an exception)
            try:
                count = _read_into(tls, size - total, view[total:])
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                # A TCP FIN without close_notify ends the stream too (module docstring).
                self._tls_eof = True
                break
            if count == 0:  # close_notify
                self._tls_eof = True
                break
            total += count
        return total

    def _read_available(self, view: memoryview) -> int:
        """Fill ``view`` from OpenSSL and the socket without waiting; ``-1``: nothing yet."""
        if self._tls_eof:
            return 0  # OpenSSL is not asked again after it reported the end
        total = self._decrypt(view, 0)
        size = len(view)
        sock = self._sock
        incoming = self._incoming
        scratch = _cipher_scratch()
        while total < size and not self._tls_eof and not self._socket_eof:
            # Ciphertext never decrypts to more plaintext than itself: reading at most
            # the room left keeps every whole record decryptable into this buffer.
            room = size - total - incoming.pending
            if total and room < _MIN_TLS_READ:
                break
            limit = min(max(room, _MIN_TLS_READ), len(scratch))
            try:
                got = sock.recv_into(scratch, limit)
            except (BlockingIOError, InterruptedError):
                break
            if got == 0:
                self._socket_eof = True
                incoming.write_eof()
                total = self._decrypt(view, total)
                break
            for start in range(0, got, _BIO_PIECE):
                incoming.write(scratch[start : min(got, start + _BIO_PIECE)])
                total = self._decrypt(view, total)
            if got < _BIO_PIECE:
                break  # a small message: the next recv would say EAGAIN
            # Bulk: go on until EAGAIN. Reading opened the TCP window, and the
            # sender's next segments are often here already.
        if self._outgoing.pending:
            # Post-handshake messages (a KeyUpdate answer): send what the socket takes
            # now, never wait here (a reader blocked on sending could deadlock with a
            # peer doing the same); whatever is left goes out before the next write.
            self._unsent.append(self._outgoing.read())
            if not self._flushing:
                with contextlib.suppress(OSError):
                    self._push()
        if total == 0 and not self._tls_eof:
            if not self._socket_eof:
                return -1
            self._tls_eof = True  # the TCP stream ended: nothing more can complete
        return total

    async def _receive(self, view: memoryview) -> tuple[int, bool]:
        """Read into ``view`` (waiting when nothing is there); the count and whether it waited.

        Nothing is written to ``view`` before the last step, which does not
        await: a shared scratch buffer can be copied out right after.
        """
        waited = False
        while True:
            self._check_open()
            try:
                count = self._read_available(view)
            except (OSError, ValueError) as exc:
                raise self._translate(exc) from exc
            if count >= 0:
                return count, waited
            await self._wait_for_read()
            waited = True

    async def receive_into(self, buffer: bytearray | memoryview) -> int:
        """Decrypt into ``buffer``; returns the number of bytes, ``0`` at end of stream."""
        view = memoryview(buffer)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if not len(view):
            raise ValueError("receive_into needs a non-empty buffer")
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._receive_guard():
            count, waited = await self._receive(view)
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return count

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Read what is available (up to ``max_bytes``, at most 256 KiB); ``b""`` at EOF."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        limit = RECEIVE_BUFFER_SIZE if max_bytes is None else min(max_bytes, RECEIVE_BUFFER_SIZE)
        view = memoryview(_scratch())[:limit]
        await trio.lowlevel.checkpoint_if_cancelled()
        with self._receive_guard():
            count, waited = await self._receive(view)
            data = bytes(view[:count])  # before any await: the scratch buffer is shared
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    # -- writing ---------------------------------------------------------------------

    def _encrypt(self, view: memoryview) -> None:
        """Encrypt all of ``view`` and queue its records."""
        tls = self._tls
        outgoing = self._outgoing
        unsent = self._unsent
        for start in range(0, len(view), _BIO_PIECE):
            piece = view[start : start + _BIO_PIECE]
            written = tls.write(piece)  # a memory BIO never pushes back: all of it
            while written < len(piece):
                written += tls.write(piece[written:])
            unsent.append(outgoing.read())

    def _push(self) -> bool:
        """Hand queued records to the kernel without waiting; ``True`` once all went."""
        unsent = self._unsent
        sock = self._sock
        while unsent:
            try:
                if len(unsent) == 1:
                    sent = sock.send(unsent[0])
                else:
                    sent = sock.sendmsg(list(itertools.islice(unsent, _MAX_SEND_BUFFERS)))
            except (BlockingIOError, InterruptedError):
                return False
            while sent:
                first = unsent[0]
                if sent >= len(first):
                    sent -= len(first)
                    unsent.popleft()
                else:
                    unsent[0] = memoryview(first)[sent:]
                    sent = 0
        return True

    async def _flush_unsent(self) -> None:
        """Wait until the socket took every queued record (one task waits, others park)."""
        while self._unsent:
            self._check_open()
            if self._flushing:
                await self._flush_lot.park()
                continue
            try:
                if self._push():
                    return
            except (OSError, ValueError) as exc:
                raise self._translate(exc) from exc
            self._flushing = True
            try:
                await self._wait(trio.lowlevel.wait_writable)
            finally:
                self._flushing = False
                self._flush_lot.unpark_all()

    def _skip_ahead(self, view: memoryview) -> memoryview:
        """Drop the start of ``view`` that an earlier short ``try_send`` already encrypted."""
        if not self._ahead:
            return view
        skip = min(self._ahead, len(view))
        self._ahead -= skip
        return view[skip:]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt all of ``data`` and send its records (one ``sendmsg`` if the socket takes it)."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        with self._send_guard():
            self._check_sendable()
            try:
                try:
                    self._encrypt(self._skip_ahead(view))
                    done = self._push()
                except (OSError, ValueError) as exc:
                    raise self._translate(exc) from exc
                if not done:
                    waited = True
                    await self._flush_unsent()
            except BaseException as exc:
                if self._unsent:  # numbered records are stuck: nothing may follow them
                    self._broken = exc
                raise
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes now, without waiting; returns how many bytes went.

        After a short count the next write must start with exactly
        ``data[count:]`` (class docstring). No checkpoint.
        """
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        with self._send_guard():
            self._check_sendable()
            try:
                if self._unsent and not self._push():
                    return 0
                # Nothing queued: records of earlier "ahead" bytes are on the wire now.
                done = min(self._ahead, len(view))
                self._ahead -= done
                rest = view[done:]
                if rest:
                    self._encrypt(rest)
                if self._push():
                    return len(view)
                self._ahead = len(rest)  # encrypted and queued, not yet sent
                return done
            except (OSError, ValueError) as exc:
                raise self._translate(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard():
            self._check_open()
            if self._unsent:
                await self._flush_unsent()
            elif self._flushing:
                await self._flush_lot.park()
            else:
                await self._wait(trio.lowlevel.wait_writable)
        await trio.lowlevel.checkpoint()

    # -- closing ---------------------------------------------------------------------

    async def send_eof(self) -> None:
        """Not possible over TLS here: raises ``HalfCloseNotSupported`` (module docstring)."""
        await trio.lowlevel.checkpoint()
        raise HalfCloseNotSupported(
            "TLS over Python's ssl module has no half-close (close_notify ends reading "
            "too); HBONE half-closes tunnels with HTTP/2 END_STREAM instead"
        )

    def _close_notify(self) -> None:
        # Best effort and never waiting; not after records that could not be sent.
        if self._broken is not None or (self._unsent and not self._push()):
            return
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()  # queues close_notify, then wants the peer's: don't wait
        self._unsent.append(self._outgoing.read())
        self._push()


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


async def _send_raw(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except (BlockingIOError, InterruptedError):
            await trio.lowlevel.wait_writable(sock)


async def _handshake(
    sock: socket.socket, context: ssl.SSLContext, *, server_side: bool
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Drive a TLS handshake through memory BIOs over the non-blocking ``sock``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=server_side)
    buffer = bytearray(_MIN_TLS_READ)
    while True:
        try:
            tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError:
            # Let the peer know why (the alert OpenSSL queued), without waiting.
            with contextlib.suppress(OSError):
                sock.send(outgoing.read())
            raise
        flight = outgoing.read()
        if flight:
            await _send_raw(sock, flight)
        if done:
            return tls, incoming, outgoing
        while True:
            try:
                got = sock.recv_into(buffer)
                break
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_readable(sock)
        if got:
            incoming.write(memoryview(buffer)[:got])
        else:
            incoming.write_eof()  # do_handshake() reports it as an SSLEOFError


async def start_tls_client(
    sock: socket.socket, context: ssl.SSLContext, expected: Collection[SpiffeId]
) -> TlsBioStream:
    """TLS as the client on a connected TCP socket (taken over), then check the server.

    The server must present one of ``expected``
    (:func:`identity.tls.verify_server_identity`). On failure the socket is
    closed and the error propagates: ``ssl.SSLError`` (handshake),
    ``OSError``, :class:`identity.errors.PeerIdentityError`. Bound it with a
    cancel scope. In TLS 1.3 the client finishes before the server has
    checked the client's certificate: a refusal shows on the first read.
    """
    try:
        sock.setblocking(False)
        tls, incoming, outgoing = await _handshake(sock, context, server_side=False)
        peer = verify_server_identity(tls, expected)
    except BaseException:
        sock.close()
        raise
    return TlsBioStream(sock, tls, incoming, outgoing, peer)


async def start_tls_server(
    sock: socket.socket, context: ssl.SSLContext, trust_domain: str
) -> TlsBioStream:
    """TLS as the server on an accepted TCP socket (taken over), then check the client.

    The client's SPIFFE ID must be in ``trust_domain``
    (:func:`identity.tls.verify_client_identity`). Errors as in
    :func:`start_tls_client`.
    """
    try:
        sock.setblocking(False)
        tls, incoming, outgoing = await _handshake(sock, context, server_side=True)
        peer = verify_client_identity(tls, trust_domain)
    except BaseException:
        sock.close()
        raise
    return TlsBioStream(sock, tls, incoming, outgoing, peer)


async def connect_tls(
    address: SocketAddress,
    context: ssl.SSLContext,
    expected: Collection[SpiffeId],
    *,
    prepare: Callable[[socket.socket], None] | None = None,
) -> TlsBioStream:
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
    return await start_tls_client(sock, context, expected)


async def accept_tls(
    sock: socket.socket, context: ssl.SSLContext, trust_domain: str
) -> TlsBioStream:
    """Server side of :func:`connect_tls` on an accepted socket (taken over)."""
    try:
        sock.setblocking(False)
        set_tcp_keepalive(sock)
    except OSError:
        sock.close()
        raise
    return await start_tls_server(sock, context, trust_domain)
