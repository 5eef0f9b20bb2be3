"""Copy bytes both ways between two trio streams, with half-close and abort.

The tunnel's two ends, e.g. an application's TCP connection and an HBONE
tunnel (ztunnel outbound) or a tunnel and the upstream connection (inbound).
Each direction reads up to 256 KiB at a time and writes it on; an end of
stream is passed on as a half-close (``send_eof``: a TCP FIN or an HTTP/2
END_STREAM) and the other direction goes on until its own end. When both are
done, both streams are closed. When either side fails (a reset, a broken
connection), both are aborted at once: a tunnel with RST_STREAM
``CONNECT_ERROR``, a TCP connection with a RST (RFC 9113 section 8.5), and the
other direction is cancelled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import trio

from underpass.hbone.errors import ErrorCodes, HboneError
from underpass.hbone.stream import RECEIVE_BUFFER_SIZE, SocketStream, TlsSocketStream

__all__ = ["RelayResult", "abort_stream", "relay"]


@dataclass(slots=True)
class RelayResult:
    """Bytes copied each way, and the error that ended the relay (``None``: clean)."""

    a_to_b: int = 0
    b_to_a: int = 0
    error: BaseException | None = None


async def abort_stream(stream: trio.abc.AsyncResource) -> None:
    """Close ``stream`` abortively: RST_STREAM for a tunnel, TCP RST for a socket."""
    from underpass.hbone.trio_adapter import TunnelStream  # circular at import time

    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, HboneError):
        if isinstance(stream, TunnelStream):
            await stream.reset(ErrorCodes.CONNECT_ERROR)
            return
        if isinstance(stream, SocketStream | TlsSocketStream):
            await stream.reset()
            return
    await trio.aclose_forcefully(stream)


async def relay(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    buffer_size: int = RECEIVE_BUFFER_SIZE,
    result: RelayResult | None = None,
) -> RelayResult:
    """Copy ``a`` -> ``b`` and ``b`` -> ``a`` until both ends are done or one fails.

    Both streams are closed when this returns (or is cancelled). Peer
    failures are not raised: they end the relay and are returned in
    :attr:`RelayResult.error`, because a reset connection is ordinary traffic.
    Pass ``result`` to watch the byte counts while the relay runs (an admin
    view of live connections); it is updated in place and returned.
    """
    if result is None:
        result = RelayResult()
    failed = False
    clean = False

    async def pump(source: trio.abc.Stream, sink: trio.abc.Stream, forward: bool) -> None:
        nonlocal failed
        try:
            while True:
                data = await source.receive_some(buffer_size)
                if not data:
                    break
                await sink.send_all(data)
                if forward:
                    result.a_to_b += len(data)
                else:
                    result.b_to_a += len(data)
            if isinstance(sink, trio.abc.HalfCloseableStream):
                await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, HboneError) as exc:
            if result.error is None:
                result.error = exc
            failed = True
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, a, b, True)
            nursery.start_soon(pump, b, a, False)
        clean = not failed
    finally:
        with trio.CancelScope(shield=True):
            if not clean:  # a failure, or cancelled from outside
                await abort_stream(a)
                await abort_stream(b)
            else:
                for stream in (a, b):
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.aclose()
    return result
