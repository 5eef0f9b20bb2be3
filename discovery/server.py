"""The discovery control plane's network face: Delta ADS (and the CA) over grpcio.

- :class:`SnapshotHub`: the current snapshot, on the event loop; publishing
  one wakes every stream once (a stream already woken is not queued twice, and
  always reads the latest snapshot: bursts coalesce per client).
- :class:`XdsService`: ``envoy.service.discovery.v3.AggregatedDiscoveryService/
  DeltaAggregatedResources`` for any number of clients. On the TLS port a
  call is served only once its bearer token is authenticated and its node is
  of the caller's namespace (:mod:`discovery.xdsauth`; the authenticator runs
  in a worker thread, a refusal ends the call with UNAUTHENTICATED,
  PERMISSION_DENIED or UNAVAILABLE and is counted in
  ``underpass_xds_auth_refused_total``); the plaintext port is not
  authenticated (tokens never travel in clear). Each stream is one
  task driving a :class:`~underpass.xds.server.DeltaServerStream` from one
  queue that carries the client's requests and the hub's wake-ups. Nothing is
  sent before the first snapshot exists. A NACK is logged and counted in
  ``underpass_xds_nacks_total`` and the stream stays up; a protocol error ends
  the stream with INVALID_ARGUMENT. The client's node id and metadata (first
  request) are logged. Responses are written pre-encoded
  (:mod:`underpass.xds.wire`).
- :class:`DiscoveryServer`: one control-plane program: grpc.aio servers on a
  dedicated event-loop thread, TLS on 15012 (serving certificate issued by the
  in-process CA; the CA's ``IstioCertificateService`` on the same server when
  a :class:`~identity.server.CaServicer` is given; xDS clients authenticated
  with the CA's authenticator unless another is given, and TLS is not served
  without one) and plaintext xDS on 15010 only when asked (never the CA:
  bearer tokens do not travel in clear; xDS there is unauthenticated), the
  :class:`~discovery.pipeline.Pipeline` and the registry feeding it. ``start()``
  / ``stop()`` from any thread, like :class:`identity.server.CaServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import grpc
import structlog
from cryptography.hazmat.primitives import serialization
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from discovery.errors import DiscoveryConfigError
from discovery.metrics import DiscoveryMetrics
from discovery.pipeline import (
    DEFAULT_MAX_DELAY,
    DEFAULT_QUIET,
    Debouncer,
    Pipeline,
    SnapshotBuilder,
)
from discovery.registry import Registry
from discovery.translate import TranslateConfig
from discovery.xdsauth import INTERNAL, XdsAuthRefused, authenticate_call, check_node
from identity.auth import Authenticator, Caller
from identity.ca import CertificateAuthority
from identity.proto import ca_pb2_grpc
from identity.server import CaServicer, split_host_port
from underpass.xds.errors import XdsProtocolError
from underpass.xds.server import (
    Acked,
    ClientIdentified,
    DeltaServerStream,
    Nacked,
    Snapshot,
    StaleNonce,
    StreamEvent,
    Subscribed,
    Unsubscribed,
)
from underpass.xds.types import ADS_SERVICE, DELTA_METHOD, TYPE_URL_PREFIX

_log = structlog.get_logger("discovery.server")

DEFAULT_LISTEN = "0.0.0.0:15012"
DEFAULT_PLAINTEXT_LISTEN = "0.0.0.0:15010"
DEFAULT_SERVING_DNS_NAMES = ("istiod.istio-system.svc", "underpass-discovery", "localhost")
DEFAULT_SERVING_IPS = ("127.0.0.1",)

SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),
    # Clients keep their stream alive with pings (every 30 s or more).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # initial_resource_versions of a large cluster.
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # When hundreds of proxies (re)connect at once, the loop is busy sending their
    # initial state and new calls wait to be picked up; gRPC's default cancels those
    # after 30 s, which only makes them come back later. Let them wait.
    ("grpc.server_max_unrequested_time_in_server", 600),
)

_SNAPSHOT = object()
_END = object()


def _short(type_url: str) -> str:
    return type_url.removeprefix(TYPE_URL_PREFIX)


@dataclass(eq=False)
class _StreamHandle:
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    woken: bool = False


class SnapshotHub:
    """The current snapshot and the streams to wake (used on the event loop only)."""

    def __init__(self) -> None:
        self.current: Snapshot | None = None
        self._streams: set[_StreamHandle] = set()
        self._listeners: list[Callable[[Snapshot], None]] = []

    def register(self, handle: _StreamHandle) -> None:
        self._streams.add(handle)

    def unregister(self, handle: _StreamHandle) -> None:
        self._streams.discard(handle)

    def add_listener(self, listener: Callable[[Snapshot], None]) -> None:
        """Called with every published snapshot (on the loop)."""
        self._listeners.append(listener)

    def __len__(self) -> int:
        return len(self._streams)

    def publish(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        for handle in self._streams:
            if not handle.woken:
                handle.woken = True
                handle.queue.put_nowait(_SNAPSHOT)
        for listener in self._listeners:
            listener(snapshot)


class XdsService:
    """The Delta ADS servicer (see the module docstring).

    ``authenticator`` checks the callers of :meth:`authenticated_handler` (the
    TLS port); :meth:`open_handler` (the plaintext port) checks nobody.
    """

    def __init__(
        self,
        hub: SnapshotHub,
        metrics: DiscoveryMetrics,
        *,
        authenticator: Authenticator | None = None,
        auth_workers: int = 8,
    ) -> None:
        self.hub = hub
        self.metrics = metrics
        self.authenticator = authenticator
        self._auth_workers = auth_workers
        self._auth_executor: futures.ThreadPoolExecutor | None = None

    def authenticated_handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The method for the TLS port: every call authenticated."""
        if self.authenticator is None:
            raise DiscoveryConfigError(
                "serving xDS over TLS needs an authenticator for the clients' bearer tokens"
            )
        return self._handler(self.delta_aggregated_resources)

    def open_handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The method for the plaintext port: nobody is authenticated."""
        return self._handler(self.delta_aggregated_resources_unauthenticated)

    @staticmethod
    def _handler(behaviour: Any) -> grpc.GenericRpcHandler[Any, Any]:
        handler = grpc.stream_stream_rpc_method_handler(
            behaviour,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            # Responses are written as pre-encoded bytes.
        )
        return grpc.method_handlers_generic_handler(ADS_SERVICE, {DELTA_METHOD: handler})

    def close(self) -> None:
        """Stop the authentication threads (a later call starts new ones)."""
        executor, self._auth_executor = self._auth_executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    async def delta_aggregated_resources(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, bytes],
    ) -> None:
        """An authenticated call (the TLS port)."""
        log = _log.bind(peer=context.peer())
        try:
            caller = await self._authenticate(context)
        except XdsAuthRefused as exc:
            await self._refuse(context, exc, log)
            return
        await self._serve(requests, context, log.bind(caller=caller.identity.uri), caller)

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, bytes]
    ) -> Caller:
        authenticator = self.authenticator
        if authenticator is None:  # fail closed, though the handler is not built without one
            raise XdsAuthRefused(
                "UNAUTHENTICATED", INTERNAL, "this port has no authenticator configured"
            )
        if self._auth_executor is None:
            self._auth_executor = futures.ThreadPoolExecutor(
                self._auth_workers, thread_name_prefix="xds-auth"
            )
        metadata = tuple(context.invocation_metadata() or ())
        # In a thread: a TokenReview is a blocking HTTP request.
        return await asyncio.get_running_loop().run_in_executor(
            self._auth_executor, authenticate_call, authenticator, metadata
        )

    async def delta_aggregated_resources_unauthenticated(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, bytes],
    ) -> None:
        """A call on the plaintext port: nobody is authenticated there."""
        await self._serve(requests, context, _log.bind(peer=context.peer()), None)

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, bytes],
        refusal: XdsAuthRefused,
        log: Any,
    ) -> None:
        self.metrics.auth_refused.labels(reason=refusal.reason).inc()
        log.warning(
            "xds.auth_refused", reason=refusal.reason, code=refusal.status, error=str(refusal)
        )
        await context.abort(grpc.StatusCode[refusal.status], str(refusal))

    async def _serve(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[discovery_pb2.DeltaDiscoveryRequest, bytes],
        log: Any,
        caller: Caller | None,
    ) -> None:
        stream = DeltaServerStream(nonce_prefix=secrets.token_hex(3) + "-")
        handle = _StreamHandle()

        async def read() -> None:
            try:
                async for request in requests:
                    handle.queue.put_nowait(request)
            except (grpc.RpcError, asyncio.CancelledError):
                pass
            finally:
                handle.queue.put_nowait(_END)

        reader = asyncio.create_task(read())
        self.hub.register(handle)
        self.metrics.clients.inc()
        try:
            while True:
                item = await handle.queue.get()
                if item is _END:
                    break
                if item is _SNAPSHOT:
                    handle.woken = False
                else:
                    assert isinstance(item, discovery_pb2.DeltaDiscoveryRequest)
                    try:
                        events = stream.receive(item)
                    except XdsProtocolError as exc:
                        self.metrics.protocol_errors.inc()
                        log.warning("xds.protocol_error", error=str(exc))
                        await context.abort(grpc.StatusCode[exc.grpc_status], str(exc))
                        return
                    for event in events:
                        if isinstance(event, ClientIdentified):
                            log = log.bind(node_id=event.node.id)
                            if caller is not None:
                                try:
                                    check_node(caller, event.node)
                                except XdsAuthRefused as exc:
                                    await self._refuse(context, exc, log)
                                    return
                        self._observe(event, log)
                snapshot = self.hub.current
                if snapshot is None:
                    continue  # nothing is served before the first snapshot
                for response in stream.responses(snapshot):
                    # Counted first: whoever sees the response sees it counted.
                    label = _short(response.type_url)
                    self.metrics.pushes.labels(type_url=label).inc()
                    sent = len(response.resources) + len(response.removed)
                    self.metrics.resources_sent.labels(type_url=label).inc(sent)
                    await context.write(response.encode())
                    log.debug(
                        "xds.push",
                        type_url=label,
                        nonce=response.nonce,
                        version=response.system_version_info,
                        updated=len(response.resources),
                        removed=len(response.removed),
                    )
        finally:
            self.hub.unregister(handle)
            reader.cancel()
            self.metrics.clients.dec()
            log.info("xds.client_disconnected")

    def _observe(self, event: StreamEvent, log: Any) -> None:
        if isinstance(event, ClientIdentified):
            log.info("xds.client_connected", **event.node.log_fields())
        elif isinstance(event, Nacked):
            self.metrics.nacks.labels(type_url=_short(event.type_url)).inc()
            log.warning(
                "xds.nack",
                type_url=_short(event.type_url),
                nonce=event.nonce,
                code=event.code,
                error=event.message,
                resources=len(event.names),
            )
        elif isinstance(event, Subscribed):
            log.info(
                "xds.subscribed",
                type_url=_short(event.type_url),
                wildcard=event.wildcard,
                names=len(event.names),
                first=event.first,
                initial_versions=event.initial_versions,
            )
        elif isinstance(event, Unsubscribed):
            log.info(
                "xds.unsubscribed",
                type_url=_short(event.type_url),
                names=len(event.names),
                wildcard_dropped=event.wildcard_dropped,
            )
        elif isinstance(event, StaleNonce):
            log.debug("xds.stale_nonce", type_url=_short(event.type_url), nonce=event.nonce)
        elif isinstance(event, Acked):
            log.debug("xds.ack", type_url=_short(event.type_url), nonce=event.nonce)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class DiscoveryServer:
    """The control-plane program: xDS (+ CA) servers, pipeline and registry (see above)."""

    def __init__(
        self,
        registry: Registry,
        *,
        config: TranslateConfig | None = None,
        ca: CertificateAuthority | None = None,
        ca_servicer: CaServicer | None = None,
        xds_authenticator: Authenticator | None = None,
        listen: str | None = DEFAULT_LISTEN,
        plaintext_listen: str | None = None,
        serving_dns_names: Sequence[str] = DEFAULT_SERVING_DNS_NAMES,
        serving_ips: Sequence[str] = DEFAULT_SERVING_IPS,
        metrics_registry: CollectorRegistry | None = None,
        quiet: float = DEFAULT_QUIET,
        max_delay: float = DEFAULT_MAX_DELAY,
        ca_workers: int = 8,
        incremental_translation: bool = True,
    ) -> None:
        if listen is None and plaintext_listen is None:
            raise DiscoveryConfigError("nothing to serve: give a TLS or a plaintext listen address")
        if listen is not None and ca is None:
            raise DiscoveryConfigError(
                "serving TLS needs the CA (it issues the serving certificate)"
            )
        if ca_servicer is not None and listen is None:
            raise DiscoveryConfigError("the CA is served over TLS only; give a TLS listen address")
        if xds_authenticator is None and ca_servicer is not None:
            xds_authenticator = ca_servicer.authenticator  # the CA's callers are the proxies
        if listen is not None and xds_authenticator is None:
            raise DiscoveryConfigError(
                "serving xDS over TLS needs an authenticator for the clients' bearer tokens "
                "(the CA's, or xds_authenticator); only the plaintext port is unauthenticated"
            )
        for address in (listen, plaintext_listen):
            if address is not None:
                try:
                    split_host_port(address)
                except Exception as exc:
                    raise DiscoveryConfigError(str(exc)) from None
        self.registry = registry
        self.config = config or TranslateConfig()
        self.ca = ca
        self.ca_servicer = ca_servicer
        self.listen = listen
        self.plaintext_listen = plaintext_listen
        self.serving_dns_names = tuple(serving_dns_names)
        self.serving_ips = tuple(serving_ips)
        self.metrics = DiscoveryMetrics(metrics_registry)
        self.hub = SnapshotHub()
        self.service = XdsService(self.hub, self.metrics, authenticator=xds_authenticator)
        self.pipeline = Pipeline(
            SnapshotBuilder(self.config, self.metrics, incremental=incremental_translation),
            self._publish,
            debouncer=Debouncer(quiet, max_delay),
        )
        self._ca_workers = ca_workers
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._grace: float | None = 5.0
        self._published = threading.Condition()
        self._snapshot: Snapshot | None = None
        self.tls_port: int | None = None
        self.plaintext_port: int | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; returns once the ports are bound (raises if they cannot be)."""
        if self._thread is not None:
            raise RuntimeError("the discovery server is already started")
        ready: futures.Future[None] = futures.Future()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(ready)), name="discovery-loop", daemon=True
        )
        self._thread.start()
        try:
            ready.result(timeout)
        except BaseException:
            self._thread.join(timeout)
            self._thread = None
            raise

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving (streams get ``grace`` seconds), the pipeline and the registry."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        self._grace = grace
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        self._thread = self._loop = self._stop = None

    def __enter__(self) -> DiscoveryServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def tls_address(self) -> str:
        if self.tls_port is None or self.listen is None:
            raise RuntimeError("TLS is not being served")
        return f"{_bracket(split_host_port(self.listen)[0])}:{self.tls_port}"

    @property
    def plaintext_address(self) -> str:
        if self.plaintext_port is None or self.plaintext_listen is None:
            raise RuntimeError("plaintext is not being served")
        return f"{_bracket(split_host_port(self.plaintext_listen)[0])}:{self.plaintext_port}"

    # -- snapshots ---------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest published snapshot (any thread)."""
        return self._snapshot

    def wait_for_snapshot(
        self, predicate: Callable[[Snapshot], bool], timeout: float = 10.0
    ) -> Snapshot:
        """Block until a published snapshot satisfies ``predicate`` (tests, readiness)."""
        with self._published:
            ok = self._published.wait_for(
                lambda: self._snapshot is not None and predicate(self._snapshot), timeout
            )
            if not ok or self._snapshot is None:
                raise TimeoutError("no matching snapshot was published in time")
            return self._snapshot

    def _publish(self, snapshot: Snapshot) -> None:
        self.hub.publish(snapshot)
        with self._published:
            self._snapshot = snapshot
            self._published.notify_all()
        _log.info(
            "discovery.snapshot_published",
            version=snapshot.version,
            resources=len(snapshot),
            changed=sum(len(c) for c in snapshot.changes.values()),
            clients=len(self.hub),
        )

    # -- the loop thread ---------------------------------------------------------

    def _tls_credentials(self) -> grpc.ServerCredentials:
        assert self.ca is not None
        key, serving = self.ca.issue_serving_certificate(self.serving_dns_names, self.serving_ips)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        chain_pem = "".join(serving.chain_pem[:-1]).encode()
        return grpc.ssl_server_credentials([(key_pem, chain_pem)])

    async def _main(self, ready: futures.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        servers: list[grpc.aio.Server] = []
        executor = futures.ThreadPoolExecutor(self._ca_workers, thread_name_prefix="ca-grpc")
        pipeline_task: asyncio.Task[None] | None = None
        registry_started = False
        try:
            try:
                if self.listen is not None:
                    tls = grpc.aio.server(migration_thread_pool=executor, options=SERVER_OPTIONS)
                    tls.add_generic_rpc_handlers((self.service.authenticated_handler(),))
                    if self.ca_servicer is not None:
                        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(
                            self.ca_servicer,
                            cast(grpc.Server, tls),  # the aio server takes the same handlers
                        )
                    self.tls_port = self._bind(tls, self.listen, self._tls_credentials())
                    servers.append(tls)
                if self.plaintext_listen is not None:
                    plain = grpc.aio.server(options=SERVER_OPTIONS)
                    plain.add_generic_rpc_handlers((self.service.open_handler(),))
                    self.plaintext_port = self._bind(plain, self.plaintext_listen, None)
                    servers.append(plain)
                for server in servers:
                    await server.start()
                self.pipeline.bind(loop)
                pipeline_task = asyncio.create_task(self.pipeline.run())
                self.registry.start(self.pipeline.submit)
                registry_started = True
            except BaseException as exc:
                ready.set_exception(exc)
                return
            _log.info(
                "discovery.serving",
                tls=self.tls_address if self.tls_port else None,
                plaintext=self.plaintext_address if self.plaintext_port else None,
                ca=self.ca_servicer is not None,
                cluster_id=self.config.cluster_id,
                trust_domain=self.config.trust_domain,
            )
            ready.set_result(None)
            await self._stop.wait()
        finally:
            if registry_started:
                self.registry.stop()
            await asyncio.gather(*(s.stop(self._grace) for s in servers))
            if pipeline_task is not None:
                pipeline_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pipeline_task
            executor.shutdown(wait=True)
            self.service.close()
            _log.info("discovery.stopped")

    @staticmethod
    def _bind(
        server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
    ) -> int:
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise DiscoveryConfigError(
                f"cannot listen on {address} ({exc}); is the port in use?"
            ) from None
        if port == 0:
            raise DiscoveryConfigError(f"cannot listen on {address}; is the port in use?")
        return port


__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_PLAINTEXT_LISTEN",
    "DEFAULT_SERVING_DNS_NAMES",
    "DEFAULT_SERVING_IPS",
    "DiscoveryServer",
    "SnapshotHub",
    "XdsService",
]
