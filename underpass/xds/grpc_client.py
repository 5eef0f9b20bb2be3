"""A blocking grpcio transport for :class:`~underpass.xds.client.DeltaClient`.

:class:`DeltaStream` runs one ``DeltaAggregatedResources`` call in the calling
thread: it sends the client's first requests, hands every response to the
client, sends the ACK or NACK it returns, and passes each event to
``on_event`` (called in that thread: a trio program forwards it with
``trio.from_thread``). :meth:`DeltaStream.send` queues a request from any
thread (on-demand subscriptions); :meth:`DeltaStream.close` ends the call
from any thread. :func:`run_with_reconnect` repeats streams with exponential
backoff until stopped, which is how a proxy keeps its control-plane
connection; the client's versions carry over, so each reconnect asks only for
changes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import structlog
from envoy.service.discovery.v3 import discovery_pb2

from underpass.xds.client import ClientEvent, DeltaClient
from underpass.xds.errors import XdsConnectionError
from underpass.xds.types import DELTA_METHOD_PATH

_log = structlog.get_logger("underpass.xds.client")

#: Channel options for a discovery client: large pushes, keepalive.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)

EventHandler = Callable[[ClientEvent], None]
_END = object()


class DeltaStream:
    """One Delta ADS call over ``channel`` (see the module docstring)."""

    def __init__(
        self,
        channel: grpc.Channel,
        client: DeltaClient,
        on_event: EventHandler,
        *,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._client = client
        self._on_event = on_event
        self._metadata = tuple(metadata)
        self._method = channel.stream_stream(
            DELTA_METHOD_PATH,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._call: Any = None
        self._closed = False
        #: Responses received on this call.
        self.responses = 0

    def _requests(self) -> Iterator[discovery_pb2.DeltaDiscoveryRequest]:
        while True:
            item = self._outbox.get()
            if item is _END:
                return
            assert isinstance(item, discovery_pb2.DeltaDiscoveryRequest)
            yield item

    def send(self, request: discovery_pb2.DeltaDiscoveryRequest | None) -> None:
        """Queue a request (None is ignored, for :meth:`DeltaClient.subscribe`'s result)."""
        if request is not None:
            self._outbox.put(request)

    def run(self) -> None:
        """Run the call until the server ends it or :meth:`close`; raises XdsConnectionError."""
        with self._lock:
            if self._closed:
                return
            for request in self._client.start_stream():
                self._outbox.put(request)
            call = self._method(self._requests(), metadata=self._metadata or None)
            self._call = call
        try:
            for response in call:
                self.responses += 1
                event, answer = self._client.receive(response)
                self._outbox.put(answer)
                self._on_event(event)
        except grpc.RpcError as exc:
            if self._closed:
                return
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise XdsConnectionError(
                f"the discovery stream failed ({code.name}): {details}", code.name
            ) from None
        finally:
            self._client.stream_ended()
            self._outbox.put(_END)
        if not self._closed:
            raise XdsConnectionError("the control plane ended the discovery stream", "OK")

    def close(self) -> None:
        """End the call (from any thread); :meth:`run` then returns."""
        with self._lock:
            self._closed = True
            call = self._call
        self._outbox.put(_END)
        if call is not None:
            call.cancel()


def run_with_reconnect(
    connect: Callable[[], DeltaStream],
    stop: threading.Event,
    *,
    initial_backoff: float = 0.5,
    max_backoff: float = 15.0,
    on_stream: Callable[[DeltaStream | None], None] | None = None,
) -> None:
    """Run streams from ``connect()`` until ``stop`` is set, backing off between failures.

    ``on_stream`` is told each new stream (so another thread can ``send`` on it
    or ``close`` it) and None when it ended. The backoff resets once a stream
    delivered a response.
    """
    delay = initial_backoff
    while not stop.is_set():
        stream = connect()
        if on_stream is not None:
            on_stream(stream)
        try:
            stream.run()
        except XdsConnectionError as exc:
            if stream.responses:
                delay = initial_backoff
            _log.warning("xds.stream_failed", error=str(exc), retry_in=round(delay, 3))
            delay_now, delay = delay, min(delay * 2, max_backoff)
            if stop.wait(delay_now):
                break
        finally:
            if on_stream is not None:
                on_stream(None)


__all__ = ["CHANNEL_OPTIONS", "DeltaStream", "EventHandler", "run_with_reconnect"]
