"""ztunnel's control-plane connection: Delta ADS from discovery into the proxy state.

Owns :class:`XdsSource` (and its settings :class:`ZtunnelNode`, :class:`XdsTls`,
:class:`Backoff`, its error :class:`XdsSourceError`): the other updater of the
state store besides :mod:`ztunnel.local_config`, never beside it.

How it works:

- One worker thread runs the blocking grpcio stream
  (:class:`~underpass.xds.grpc_client.DeltaStream` under
  :func:`~underpass.xds.grpc_client.run_with_reconnect`): a wildcard
  subscription to ``istio.workload.Address`` and
  ``istio.security.Authorization``, a fresh channel per attempt (so a
  restarted control plane is reached at once, not after gRPC's own connection
  backoff), exponential backoff between attempts, and
  ``initial_resource_versions`` on every reconnect so that only changes travel.
- Every response is checked and converted in that thread
  (:func:`ztunnel.state.xds_decoders`, :func:`ztunnel.state.batch_from_xds`):
  one that ztunnel cannot use is NACKed as a whole, with the reason as the
  NACK's ``error_detail``, and changes nothing. Accepted responses travel to
  trio as :class:`~ztunnel.state.Batch` es over a memory channel; only the
  trio task applies them, through the store's one :class:`StateWriter`.
- Delta responses are deltas, so every batch is applied on top of the state
  (never a replacement): on the first stream the state starts empty, and on a
  reconnect the server sends the changes since the versions we hold, plus
  removals for what no longer exists.
- The store is marked ready once both types have answered (the first full
  state); until then ztunnel does not serve. When the control plane goes away
  the last state stays served unchanged and the thread reconnects.
- :meth:`XdsSource.status` is the admin view; :meth:`XdsSource.wait_until`
  waits for a condition on it. Readers of the state use ``store.wait_changed``.

The bearer token (``authorization: Bearer ...``, fetched anew for every
stream) is never logged, and is refused over plaintext.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import grpc
import structlog
import trio
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from underpass.proto import authorization_pb2, workload_pb2
from underpass.xds.client import (
    NACK_CODE,
    ClientEvent,
    DeltaClient,
    ResourcesReceived,
    ResponseRejected,
)
from underpass.xds.errors import XdsConnectionError
from underpass.xds.grpc_client import CHANNEL_OPTIONS, DeltaStream, run_with_reconnect
from underpass.xds.node import build_node, ztunnel_node_id
from underpass.xds.types import (
    MESSAGE_TYPES,
    TYPE_URL_PREFIX,
    WORKLOAD_TYPE_URLS,
    address_resource_name,
    authorization_resource_name,
)
from ztunnel.errors import ZtunnelError
from ztunnel.state import Batch, Snapshot, StateWriter, batch_from_xds, xds_decoders

log = structlog.get_logger("ztunnel.xds_source")

#: How long stopping waits for the worker thread before giving up on it (it is a daemon).
STOP_TIMEOUT: Final = 10.0


class XdsSourceError(ZtunnelError):
    """The control-plane connection is misconfigured, or its worker thread failed."""


# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZtunnelNode:
    """Who this ztunnel is, as told to the control plane (PROTOCOLS.md section 3)."""

    node_name: str
    pod_name: str
    pod_namespace: str
    pod_ip: str
    cluster_id: str
    domain: str = "cluster.local"

    def __post_init__(self) -> None:
        for name in ("node_name", "pod_name", "pod_namespace", "pod_ip", "cluster_id"):
            if not getattr(self, name):
                raise XdsSourceError(
                    f"the ztunnel node needs {name}: set it (in Kubernetes from the downward API)"
                )
        try:
            ipaddress.ip_address(self.pod_ip)
        except ValueError:
            raise XdsSourceError(
                f"the ztunnel pod IP {self.pod_ip!r} is not an IPv4 or IPv6 address"
            ) from None

    @property
    def id(self) -> str:
        return ztunnel_node_id(self.pod_ip, self.pod_name, self.pod_namespace, self.domain)

    def to_proto(self) -> base_pb2.Node:
        return build_node(
            ip=self.pod_ip,
            pod=self.pod_name,
            namespace=self.pod_namespace,
            node_name=self.node_name,
            cluster_id=self.cluster_id,
            domain=self.domain,
        )


@dataclass(frozen=True, slots=True)
class XdsTls:
    """TLS to the control plane: the roots that sign its certificate (PEM).

    ``server_name`` overrides the name the certificate must carry (gRPC's
    ``grpc.ssl_target_name_override``), for an address that is an IP or an
    alias not in the certificate.
    """

    root_certificates: bytes
    server_name: str | None = None

    def __post_init__(self) -> None:
        try:
            x509.load_pem_x509_certificates(self.root_certificates)
        except ValueError as exc:
            raise XdsSourceError(
                f"the control plane's root certificates are not PEM certificates ({exc}); "
                "give the mesh's root-cert.pem"
            ) from None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay between connection attempts: ``initial``, doubling up to ``maximum`` (seconds).

    It starts again from ``initial`` once a stream delivered a response.
    """

    initial: float = 0.5
    maximum: float = 15.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise XdsSourceError(
                f"reconnect backoff must satisfy 0 < initial <= maximum, "
                f"got initial={self.initial} maximum={self.maximum}"
            )


TokenProvider = Callable[[], str]


# -- reports from the worker thread to trio ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StreamOpening:
    """A connection attempt begins."""


@dataclass(frozen=True, slots=True)
class _Accepted:
    event: ResourcesReceived
    batch: Batch


@dataclass(frozen=True, slots=True)
class _Rejected:
    event: ResponseRejected


@dataclass(frozen=True, slots=True)
class _StreamClosed:
    error: str | None  # None: we closed it


_Report = _StreamOpening | _Accepted | _Rejected | _StreamClosed


class _Stopped(Exception):
    """The trio side no longer listens: the worker unwinds."""


# -- the worker thread ------------------------------------------------------------------------


def _short(type_url: str) -> str:
    return type_url.removeprefix(TYPE_URL_PREFIX)


def _content_name(message: Message) -> str:
    if isinstance(message, workload_pb2.Address):
        return address_resource_name(message)
    if isinstance(message, authorization_pb2.Authorization):
        return authorization_resource_name(message.namespace, message.name)
    raise ValueError(f"no resource name for a {type(message).__name__}")


def _misnamed(response: discovery_pb2.DeltaDiscoveryResponse) -> str | None:
    """Why a response names a resource differently from its content, or None."""
    message_type = MESSAGE_TYPES.get(response.type_url)
    if message_type is None or response.type_url not in WORKLOAD_TYPE_URLS:
        return None
    for resource in response.resources:
        if not resource.HasField("resource") or resource.resource.type_url != response.type_url:
            continue  # DeltaClient's own checks reject it with a better message
        try:
            content = _content_name(message_type.FromString(resource.resource.value))
        except (DecodeError, ValueError):
            continue  # likewise
        if content != resource.name:
            return (
                f"resource {resource.name!r} carries {content!r}: a resource must be named "
                "after its content (removals arrive by name, so a mismatch would leave stale "
                "state); ztunnel rejected the response and keeps the previous state"
            )
    return None


class _CheckedClient(DeltaClient):
    """A :class:`DeltaClient` that also NACKs a resource named differently from its content.

    The check comes before the client accepts anything, so a rejected response
    leaves its versions untouched, and every accepted response converts into a
    :class:`Batch` (:func:`batch_from_xds` can no longer refuse it).
    """

    def receive(
        self, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> tuple[ClientEvent, discovery_pb2.DeltaDiscoveryRequest]:
        problem = _misnamed(response)
        if problem is None:
            return super().receive(response)
        nack = discovery_pb2.DeltaDiscoveryRequest(
            type_url=response.type_url,
            response_nonce=response.nonce,
            error_detail=status_pb2.Status(code=NACK_CODE, message=problem),
        )
        return ResponseRejected(response.type_url, response.nonce, problem), nack


class _ReportingStream(DeltaStream):
    """A :class:`DeltaStream` that reports how it ended, or fails at once (``setup_error``)."""

    def __init__(
        self,
        channel: grpc.Channel,
        client: DeltaClient,
        on_event: Callable[[ClientEvent], None],
        on_closed: Callable[[str | None], None],
        *,
        metadata: Sequence[tuple[str, str]] = (),
        setup_error: str | None = None,
    ) -> None:
        super().__init__(channel, client, on_event, metadata=metadata)
        self._on_closed = on_closed
        self._setup_error = setup_error

    def run(self) -> None:
        if self._setup_error is not None:
            self._on_closed(self._setup_error)
            raise XdsConnectionError(self._setup_error, "UNAUTHENTICATED")
        try:
            super().run()
        except XdsConnectionError as exc:
            self._on_closed(str(exc))
            raise
        self._on_closed(None)


class _Worker:
    """The thread side of one :meth:`XdsSource.run`: streams, reconnects, reports to trio.

    Everything here runs in the worker thread except :meth:`stop` (any thread).
    """

    def __init__(
        self,
        client: DeltaClient,
        open_channel: Callable[[], grpc.Channel],
        call_metadata: Callable[[], list[tuple[str, str]]],
        backoff: Backoff,
        reports: trio.MemorySendChannel[_Report],
        on_exit: Callable[[BaseException | None], None],
    ) -> None:
        self._client = client
        self._open_channel = open_channel
        self._call_metadata = call_metadata
        self._backoff = backoff
        self._reports = reports
        self._on_exit = on_exit
        self._token = trio.lowlevel.current_trio_token()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: DeltaStream | None = None
        self._channel: grpc.Channel | None = None

    def stop(self) -> None:
        """End the current stream and the reconnect loop (from any thread)."""
        with self._lock:
            self._stop.set()
            stream = self._stream
        if stream is not None:
            stream.close()

    def run(self) -> None:
        error: BaseException | None = None
        try:
            run_with_reconnect(
                self._connect,
                self._stop,
                initial_backoff=self._backoff.initial,
                max_backoff=self._backoff.maximum,
                on_stream=self._on_stream,
            )
        except _Stopped:
            pass
        except BaseException as exc:  # reported to trio, which raises it
            error = exc
        finally:
            self._close_channel()
        with contextlib.suppress(trio.RunFinishedError):  # trio is gone: nobody waits for us
            trio.from_thread.run_sync(self._on_exit, error, trio_token=self._token)

    def _post(self, report: _Report) -> None:
        try:
            trio.from_thread.run(self._reports.send, report, trio_token=self._token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            raise _Stopped from None

    def _connect(self) -> DeltaStream:
        self._post(_StreamOpening())
        self._close_channel()
        channel = self._open_channel()
        with self._lock:
            self._channel = channel
        setup_error = None
        metadata: list[tuple[str, str]] = []
        try:
            metadata = self._call_metadata()
        except XdsSourceError as exc:
            setup_error = str(exc)
        return _ReportingStream(
            channel,
            self._client,
            self._on_event,
            self._on_closed,
            metadata=metadata,
            setup_error=setup_error,
        )

    def _on_stream(self, stream: DeltaStream | None) -> None:
        with self._lock:
            self._stream = stream
            stopping = self._stop.is_set()
        if stream is None:
            self._close_channel()
        elif stopping:
            stream.close()  # stop() ran before the stream was known: run() returns at once

    def _close_channel(self) -> None:
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _on_event(self, event: ClientEvent) -> None:
        if isinstance(event, ResponseRejected):
            self._post(_Rejected(event))
            return
        # Cannot fail: the decoders converted every resource and _CheckedClient checked the
        # names before the response was accepted (a failure here is a bug: it ends run()).
        batch = batch_from_xds(
            event.type_url, ((r.name, r.message) for r in event.updated), event.removed
        )
        self._post(_Accepted(event, batch))

    def _on_closed(self, error: str | None) -> None:
        self._post(_StreamClosed(error))


# -- the trio side ----------------------------------------------------------------------------


class XdsSource:
    """Feeds the proxy state from the control plane over Delta ADS (see the module docstring).

    ``address`` is ``host:port`` (15012 with TLS, 15010 plaintext);
    ``writer`` is the store's one writer (``store.claim_writer("xds")``);
    ``tls`` None means plaintext; ``token`` returns the bearer token to send
    (called for every new stream, so a rotated token is picked up).

    Counters for operators: ``acks``, ``nacks``, ``reconnects`` (connection
    attempts after the first one); ``last_error`` is the latest NACK or
    connection failure.
    """

    def __init__(
        self,
        address: str,
        writer: StateWriter,
        node: ZtunnelNode,
        *,
        tls: XdsTls | None = None,
        token: TokenProvider | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        host, colon, port = address.rpartition(":")
        local = address.startswith("unix:") and len(address) > len("unix:")
        bad_port = not port.isdigit() or not 0 < int(port) <= 65535
        if not local and (not colon or not host.strip("[]") or bad_port):
            raise XdsSourceError(
                f"the control-plane address {address!r} must be <host>:<port> ([v6]:port for "
                "IPv6) or unix:<path> (a local relay)"
            )
        if token is not None and tls is None:
            raise XdsSourceError(
                "a bearer token must not travel in clear: use TLS to the control plane "
                "(port 15012) or drop the token"
            )
        self.address: Final = address
        self.node: Final = node
        self._writer = writer
        self._tls = tls
        self._token = token
        self._backoff = backoff or Backoff()
        self._client = _CheckedClient(node.to_proto(), WORKLOAD_TYPE_URLS, decoders=xds_decoders())
        self._running = False
        self._attempts = 0
        self._connected = False
        self._ready = False
        self._synced: set[str] = set()
        self._held: dict[str, int] = {_short(t): 0 for t in WORKLOAD_TYPE_URLS}
        self._last_response: float | None = None
        self._changed = trio.Event()
        self.acks = 0
        self.nacks = 0
        self.reconnects = 0
        self.last_error: str | None = None

    # -- what operators see ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a stream is open and the control plane has answered on it."""
        return self._connected

    @property
    def ready(self) -> bool:
        """Whether the first full state (both types) has arrived and was applied."""
        return self._ready

    def status(self) -> dict[str, object]:
        """The admin dump's view of the control-plane connection (JSON-friendly)."""
        last = self._last_response
        return {
            "address": self.address,
            "tls": self._tls is not None,
            "node_id": self.node.id,
            "connected": self._connected,
            "ready": self._ready,
            "last_response_time": (
                dt.datetime.fromtimestamp(last, dt.UTC).isoformat() if last is not None else None
            ),
            "resources": dict(self._held),
            "acks": self.acks,
            "nacks": self.nacks,
            "last_error": self.last_error,
            "reconnects": self.reconnects,
        }

    async def wait_until(self, condition: Callable[[XdsSource], bool]) -> None:
        """Wait until ``condition(self)`` holds (it is checked after every report)."""
        while not condition(self):
            await self._changed.wait()

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and keep the state updated until cancelled.

        ``started`` comes at once: readiness is the store's (``store.wait_ready``).
        On cancel the stream is closed and the worker thread joined.
        """
        if self._running:
            raise XdsSourceError("this control-plane connection is already running")
        self._running = True
        reports, receive = trio.open_memory_channel[_Report](0)
        exited = trio.Event()
        failure: list[BaseException | None] = []

        def worker_exited(error: BaseException | None) -> None:
            failure.append(error)
            reports.close()
            exited.set()

        worker = _Worker(
            self._client,
            self._open_channel,
            self._call_metadata,
            self._backoff,
            reports,
            worker_exited,
        )
        thread = threading.Thread(
            target=worker.run, name=f"ztunnel-xds {self.address}", daemon=True
        )
        log.info(
            "connecting to the control plane",
            address=self.address,
            tls=self._tls is not None,
            node_id=self.node.id,
        )
        thread.start()
        try:
            task_status.started()
            async for report in receive:
                self._handle(report)
            error = failure[0] if failure else None
            raise XdsSourceError(
                "the control-plane connection stopped unexpectedly "
                f"({type(error).__name__}: {error}); this is a bug in ztunnel: report it"
            ) from error
        finally:
            worker.stop()
            receive.close()  # a report in flight fails: the worker unwinds
            with trio.move_on_after(STOP_TIMEOUT, shield=True):
                await exited.wait()
            if exited.is_set():
                thread.join()  # its last act was to tell us it is done
            else:
                log.error(
                    "the control-plane connection thread did not stop in time; leaving it",
                    address=self.address,
                )
            self._connected = False
            self._running = False
            self._notify()

    def _open_channel(self) -> grpc.Channel:
        options = list(CHANNEL_OPTIONS)
        if self._tls is None:
            return grpc.insecure_channel(self.address, options=options)
        if self._tls.server_name:
            options.append(("grpc.ssl_target_name_override", self._tls.server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=self._tls.root_certificates)
        return grpc.secure_channel(self.address, credentials, options=options)

    def _call_metadata(self) -> list[tuple[str, str]]:
        """The stream's metadata; XdsSourceError (never naming the token) if there is none."""
        if self._token is None:
            return []
        try:
            token = self._token()
        except Exception as exc:
            raise XdsSourceError(
                f"cannot get the bearer token for the control plane ({type(exc).__name__}); "
                "check the projected service-account token"
            ) from None
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise XdsSourceError(
                "the bearer token for the control plane is empty or not printable ASCII; "
                "check the projected service-account token"
            )
        return [("authorization", f"Bearer {token}")]

    # -- reports (trio thread) ------------------------------------------------------------

    def _handle(self, report: _Report) -> None:
        if isinstance(report, _StreamOpening):
            if self._attempts:
                self.reconnects += 1
            self._attempts += 1
        elif isinstance(report, _Accepted):
            self._response_arrived()
            self.acks += 1
            self._apply(report)
        elif isinstance(report, _Rejected):
            self._response_arrived()
            self.nacks += 1
            self.last_error = f"NACK of {_short(report.event.type_url)}: {report.event.error}"
            log.warning(
                "rejected a control-plane update (NACK); keeping the last good state",
                address=self.address,
                type_url=_short(report.event.type_url),
                nonce=report.event.nonce,
                error=report.event.error,
            )
        else:
            self._connected = False
            if report.error is not None:
                self.last_error = report.error
                log.warning(
                    "lost the control-plane connection; serving the last state and reconnecting",
                    address=self.address,
                    error=report.error,
                    ready=self._ready,
                )
        self._notify()

    def _apply(self, report: _Accepted) -> None:
        event = report.event
        snapshot = self._writer.apply(report.batch)
        self._synced.add(event.type_url)
        if not self._ready and self._synced.issuperset(WORKLOAD_TYPE_URLS):
            snapshot = self._writer.mark_ready()
            self._ready = True
            log.info(
                "proxy state ready: first full state from the control plane",
                address=self.address,
                workloads=len(snapshot.workloads),
                services=len(snapshot.services),
                policies=len(snapshot.policies),
                version=snapshot.version,
            )
        self._count_held(snapshot)
        log.debug(
            "applied a control-plane update",
            type_url=_short(event.type_url),
            nonce=event.nonce,
            updated=len(event.updated),
            removed=len(event.removed),
            version=snapshot.version,
        )

    def _count_held(self, snapshot: Snapshot) -> None:
        address, authorization = WORKLOAD_TYPE_URLS
        self._held = {
            _short(address): len(snapshot.workloads) + len(snapshot.services),
            _short(authorization): len(snapshot.policies),
        }

    def _response_arrived(self) -> None:
        self._last_response = time.time()
        if not self._connected:
            self._connected = True
            log.info("connected to the control plane", address=self.address)

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()


__all__ = [
    "STOP_TIMEOUT",
    "Backoff",
    "TokenProvider",
    "XdsSource",
    "XdsSourceError",
    "XdsTls",
    "ZtunnelNode",
]
