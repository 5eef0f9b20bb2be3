"""Serving one pod: its three in-pod listeners and every connection through them.

A :class:`PodProxy` exists for each pod the node agent handed over (ZDS Add)
and ends with its Del. It owns the pod's listeners (:mod:`ztunnel.inpod`),
its pool of HBONE client connections (sockets made in the pod's netns, so
peers see the pod's own IP) and the tasks of its connections:

- **outbound** (15001): the original destination is routed by
  :func:`ztunnel.routing.plan_outbound`: HBONE to the destination pod (or its
  waypoint) as the pod's own identity, checking the server's identity; plain
  TCP passthrough outside the mesh; refused (reset) when the state knows the
  destination but cannot serve it;
- **inbound HBONE** (15008): mTLS with the pod's certificate, the client's
  chain and trust domain checked; CONNECT validated by the HBONE server;
  L4 authorization (deny: 401); then the upstream connection to the
  application, from inside the pod with the client's own IP (transparent
  socket) and mark 0x539; 200 only once it is connected, 503 when it fails;
- **inbound plaintext** (15006): a peer without mTLS; authorization with no
  identity (so PeerAuthentication STRICT, a DENY of identity-less peers,
  refuses it), then the same upstream connection.

Stopping (:meth:`PodProxy.stop`) drains: the listeners close at once, HBONE
clients get a GOAWAY, connections may finish until the drain deadline, and
whatever is left is then cancelled (both ends reset).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import structlog
import trio

from identity.errors import IdentityError
from identity.spiffe import SpiffeId
from underpass.hbone.errors import HboneError, UpstreamUnavailable
from underpass.hbone.headers import Baggage, ConnectRequest, SocketAddress
from underpass.hbone.pool import HbonePool, PoolKey, open_hbone_pool
from underpass.hbone.protocol import HboneSettings
from underpass.hbone.relay import abort_stream, relay
from underpass.hbone.stream import SocketStream, connect_tcp, set_tcp_keepalive, start_tls_client
from underpass.hbone.trio_adapter import (
    HandlerResult,
    HboneServerConnection,
    InboundRequest,
    TunnelConsumer,
    TunnelStream,
    serve_hbone_tls,
)
from underpass.zds import WorkloadInfo
from ztunnel.connections import ConnectionTracker, PolicyCheck, TrackedConnection
from ztunnel.identities import NodeIdentities
from ztunnel.inpod import (
    LOOP_GUARD_PORTS,
    PodListeners,
    PodNetns,
    accept_ready,
    original_destination,
    peer_address,
)
from ztunnel.metrics import TcpLabels, ZtunnelMetrics
from ztunnel.policy import Connection, authorize
from ztunnel.routing import Passthrough, Refused, ViaHbone, plan_outbound
from ztunnel.state.model import Workload
from ztunnel.state.store import Snapshot, StateStore

log = structlog.get_logger("ztunnel.pod")

#: TCP connect to an application or a passthrough destination (HBONE dials have their own).
UPSTREAM_CONNECT_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """What every pod's proxy shares: the node's facts and the data path's knobs."""

    node: str
    cluster: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    drain_timeout: float = 30.0
    connect_timeout: float = 10.0
    hbone_idle_timeout: float = 300.0
    hbone: HboneSettings | None = None
    #: Mode 4's stand-in for a waypoint: inbound HBONE is forwarded to its
    #: authority (over HBONE again) instead of to a local application.
    waypoint_stand_in: bool = False


@dataclass(frozen=True, slots=True)
class Shared:
    """The node-wide handles a pod's proxy uses (down-scoped: no CA, no writer)."""

    settings: ProxySettings
    store: StateStore
    identities: NodeIdentities
    tracker: ConnectionTracker
    metrics: ZtunnelMetrics


class PodProxy:
    """One pod's listeners and connections (see the module docstring)."""

    def __init__(
        self,
        uid: str,
        info: WorkloadInfo,
        pod_netns: PodNetns,
        listeners: PodListeners,
        shared: Shared,
    ) -> None:
        self.uid = uid
        self.info = info
        self.netns = pod_netns
        self.listeners = listeners
        self._shared = shared
        self._settings = shared.settings
        self.workload_uid = f"{self._settings.cluster}//Pod/{info.namespace}/{info.name}"
        self.identity = SpiffeId(
            self._settings.trust_domain, info.namespace, info.service_account or "default"
        )
        self._stopping = trio.Event()
        self._stopped = trio.Event()
        self._drain_timeout = self._settings.drain_timeout
        self._connections: trio.Nursery | None = None
        self._hbone_servers: set[HboneServerConnection] = set()
        self._pool: HbonePool | None = None
        self._cached: tuple[int, Workload | None] = (-1, None)
        self._activity = trio.Event()  # set (and replaced) when a connection ends

    def _ended(self) -> None:
        self._activity.set()
        self._activity = trio.Event()

    @contextlib.contextmanager
    def _tracked(self, **facts: Any) -> Iterator[TrackedConnection]:
        try:
            with self._shared.tracker.track(pod=self.uid, **facts) as conn:
                yield conn
        finally:
            self._ended()

    def __repr__(self) -> str:
        return f"<PodProxy {self.info.namespace}/{self.info.name} uid={self.uid}>"

    # -- life cycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`; then drain and close everything of the pod."""
        try:
            async with open_hbone_pool(
                self._dial,
                settings=self._settings.hbone,
                idle_timeout=self._settings.hbone_idle_timeout,
                connect_timeout=self._settings.connect_timeout,
            ) as pool:
                self._pool = pool
                async with trio.open_nursery() as connections:
                    self._connections = connections
                    async with trio.open_nursery() as acceptors:
                        acceptors.start_soon(self._accept, self.listeners.outbound, self._outbound)
                        acceptors.start_soon(
                            self._accept, self.listeners.inbound_plaintext, self._plaintext
                        )
                        acceptors.start_soon(
                            self._accept, self.listeners.inbound_hbone, self._inbound_hbone
                        )
                        task_status.started()
                        await self._stopping.wait()
                        acceptors.cancel_scope.cancel()
                    self._close_listeners()
                    await self._drain(connections)
        finally:
            self._close_listeners()
            self.netns.close()
            self._stopped.set()

    async def _drain(self, connections: trio.Nursery) -> None:
        """Graceful: GOAWAY to HBONE clients, let connections end; then forced."""
        deadline = trio.current_time() + self._drain_timeout
        for server in list(self._hbone_servers):
            connections.start_soon(server.drain, self._drain_timeout)
        active = len(self._shared.tracker.for_pod(self.uid))
        if active:
            log.info(
                "draining pod connections",
                pod=f"{self.info.namespace}/{self.info.name}",
                connections=active,
                deadline_s=self._drain_timeout,
            )
        with trio.move_on_at(deadline):
            while self._shared.tracker.for_pod(self.uid) or self._hbone_servers:
                await self._activity.wait()
        forced = self._shared.tracker.cancel_pod(self.uid, "closed: pod drain deadline passed")
        if forced:
            log.warning(
                "pod drain deadline passed; connections reset",
                pod=f"{self.info.namespace}/{self.info.name}",
                connections=forced,
            )
        connections.cancel_scope.cancel()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, drain (at most ``drain_timeout``), and wait until all is closed."""
        if drain_timeout is not None:
            self._drain_timeout = drain_timeout
        self._stopping.set()
        await self._stopped.wait()

    def _close_listeners(self) -> None:
        for sock in self.listeners.all():
            if sock.fileno() >= 0:
                trio.lowlevel.notify_closing(sock)
                sock.close()

    async def _accept(
        self, listener: socket.socket, handle: Callable[[socket.socket], Awaitable[None]]
    ) -> None:
        assert self._connections is not None
        while True:
            await trio.lowlevel.wait_readable(listener)
            while (conn := accept_ready(listener)) is not None:
                self._connections.start_soon(handle, conn)

    # -- state ---------------------------------------------------------------------------

    def workload(self, snapshot: Snapshot) -> Workload | None:
        """This pod's workload in ``snapshot`` (None until the control plane knows it)."""
        version, cached = self._cached
        if version == snapshot.version:
            return cached
        found = snapshot.workload(self.workload_uid)
        if found is None:
            for candidate in snapshot.workloads.values():
                if (
                    candidate.name == self.info.name
                    and candidate.namespace == self.info.namespace
                    and candidate.node in ("", self._settings.node)
                ):
                    found = candidate
                    break
        self._cached = (snapshot.version, found)
        return found

    # -- outbound ------------------------------------------------------------------------

    async def _outbound(self, sock: socket.socket) -> None:
        accepted = await _redirected(sock, "outbound")
        if accepted is None:
            return
        app, client, destination = accepted
        snapshot = self._shared.store.snapshot
        source = self.workload(snapshot)
        route = plan_outbound(snapshot, destination)
        if isinstance(route, Refused):
            log.info(
                "outbound connection refused",
                pod=f"{self.info.namespace}/{self.info.name}",
                destination=str(destination),
                reason=route.reason,
            )
            await abort_stream(app)
            return
        if isinstance(route, Passthrough):
            await self._passthrough(app, client, destination, route, source)
            return
        await self._outbound_hbone(app, client, destination, route, source)

    async def _passthrough(
        self,
        app: SocketStream,
        client: SocketAddress,
        destination: SocketAddress,
        route: Passthrough,
        source: Workload | None,
    ) -> None:
        try:
            with trio.fail_after(UPSTREAM_CONNECT_TIMEOUT):
                sock = self.netns.tcp_socket(_family(route.address))
                upstream = SocketStream(await connect_tcp(route.address, sock=sock))
        except (OSError, trio.TooSlowError) as exc:
            log.info("passthrough connect failed", destination=str(route.address), error=str(exc))
            await abort_stream(app)
            return
        labels = TcpLabels.for_connection(
            reporter="source",
            source=source,
            source_principal=self.identity.uri,
            destination=route.workload,
            destination_service=route.service,
            destination_principal=None,
            mtls=False,
        )
        with (
            self._tracked(
                direction="outbound",
                protocol="passthrough",
                source=str(client),
                destination=str(route.address),
                source_workload=source,
                destination_workload=route.workload,
                source_identity=self.identity.uri,
                destination_identity=None,
                labels=labels,
            ) as conn,
            conn.cancel_scope,
        ):
            await relay(app, upstream, result=conn.counters)

    async def _outbound_hbone(
        self,
        app: SocketStream,
        client: SocketAddress,
        destination: SocketAddress,
        route: ViaHbone,
        source: Workload | None,
    ) -> None:
        assert self._pool is not None
        key = PoolKey(self.identity, route.identities, route.address.ip, route.address.port)
        host = route.service.hostname if route.service is not None else None
        request = ConnectRequest(
            authority=route.authority, client=client, host=host, baggage=self._baggage(source)
        )
        labels = TcpLabels.for_connection(
            reporter="source",
            source=source,
            source_principal=self.identity.uri,
            destination=route.workload,
            destination_service=route.service,
            destination_principal=route.workload.identity.uri,
            mtls=True,
        )
        with (
            self._tracked(
                direction="outbound",
                protocol="HBONE",
                source=str(client),
                destination=str(route.authority),
                source_workload=source,
                destination_workload=route.workload,
                source_identity=self.identity.uri,
                destination_identity=route.workload.identity.uri,
                labels=labels,
            ) as conn,
            conn.cancel_scope,
        ):
            try:
                tunnel = await self._pool.open_tunnel(key, request)
            except (HboneError, IdentityError, OSError, trio.TooSlowError) as exc:
                conn.outcome = f"hbone connect failed: {type(exc).__name__}: {exc}"
                log.info(
                    "outbound hbone failed",
                    destination=str(route.authority),
                    via=str(route.address),
                    error=f"{type(exc).__name__}: {exc}",
                )
                await abort_stream(app)
                return
            await relay(app, tunnel, result=conn.counters)

    def _baggage(self, source: Workload | None) -> Baggage:
        """What HBONE tells the peer about the calling pod (``baggage`` header)."""
        if source is None:
            return Baggage(cluster=self._settings.cluster, namespace=self.info.namespace)
        return Baggage(
            cluster=source.cluster_id or self._settings.cluster,
            namespace=source.namespace,
            workload_kind=source.workload_type.name.lower(),
            workload_name=source.workload_name or source.name,
            service_name=source.canonical_name,
            service_version=source.canonical_revision,
        )

    async def _dial(self, key: PoolKey) -> trio.abc.Stream:
        """The pool's connector: TCP from the pod's netns, TLS as the pod, server checked."""
        context = await self._shared.identities.client_context(key.source)
        sock = self.netns.tcp_socket(_family(key.address))
        sock = await connect_tcp(key.address, sock=sock)
        try:
            set_tcp_keepalive(sock)
        except OSError:
            sock.close()
            raise
        return await start_tls_client(sock, context, key.destination_identities)

    # -- inbound -------------------------------------------------------------------------

    async def _inbound_hbone(self, sock: socket.socket) -> None:
        try:
            client = peer_address(sock)
            context = await self._shared.identities.server_context(self.identity)
        except (OSError, IdentityError) as exc:
            log.warning(
                "inbound hbone refused: no certificate for the pod",
                pod=f"{self.info.namespace}/{self.info.name}",
                error=str(exc),
            )
            sock.close()
            return

        async def handler(request: InboundRequest) -> HandlerResult:
            return await self._authorize_inbound(request, client)

        await serve_hbone_tls(
            sock,
            context,
            self._settings.trust_domain,
            handler,
            waypoint=self._settings.waypoint_stand_in,
            settings=self._settings.hbone,
            on_connection=self._hbone_servers.add,
        )
        for server in [s for s in self._hbone_servers if s.closed]:
            self._hbone_servers.discard(server)
        self._ended()

    async def _authorize_inbound(
        self, request: InboundRequest, client: SocketAddress
    ) -> HandlerResult:
        authority = request.authority
        if authority.port in LOOP_GUARD_PORTS:
            log.info("inbound hbone refused: loop guard", authority=str(authority))
            return 400
        if self._settings.waypoint_stand_in:
            return await self._forward_as_waypoint(request, client)
        snapshot = self._shared.store.snapshot
        workload = self.workload(snapshot)
        if workload is None:
            raise UpstreamUnavailable(
                f"pod {self.info.namespace}/{self.info.name} is not in ztunnel's state yet"
            )
        facts = Connection(request.peer, client.ip, authority.ip, authority.port)
        source = snapshot.workload_by_ip(client.ip)
        labels = TcpLabels.for_connection(
            reporter="destination",
            source=source,
            source_principal=request.peer.uri if request.peer is not None else None,
            destination=workload,
            destination_service=None,
            destination_principal=self.identity.uri,
            mtls=True,
        )
        if not self._allowed(snapshot, workload, facts, labels, "HBONE"):
            return 401
        upstream = await self._connect_upstream(client, authority)
        return _InboundRelay(
            self,
            upstream,
            _InboundFacts("HBONE", client, authority, source, workload, facts, labels),
        )

    async def _forward_as_waypoint(
        self, request: InboundRequest, client: SocketAddress
    ) -> HandlerResult:
        """The waypoint stand-in: tunnel on to the authority (no L7 processing yet)."""
        assert self._pool is not None
        snapshot = self._shared.store.snapshot
        route = plan_outbound(snapshot, request.authority, ignore_waypoint=True)
        origin = request.client or client
        source = snapshot.workload_by_ip(origin.ip)
        if isinstance(route, Refused):
            raise UpstreamUnavailable(
                f"the waypoint cannot reach {request.authority}: {route.reason}"
            )
        if isinstance(route, Passthrough):
            with trio.fail_after(UPSTREAM_CONNECT_TIMEOUT):
                sock = self.netns.tcp_socket(_family(route.address))
                upstream: trio.abc.Stream = SocketStream(
                    await connect_tcp(route.address, sock=sock)
                )
            target, protocol, destination = route.address, "passthrough", route.workload
            identity = None
        else:
            key = PoolKey(self.identity, route.identities, route.address.ip, route.address.port)
            upstream = await self._pool.open_tunnel(
                key, ConnectRequest(authority=route.authority, client=origin)
            )
            target, protocol, destination = route.authority, "HBONE", route.workload
            identity = route.workload.identity.uri
        labels = TcpLabels.for_connection(
            reporter="destination",
            source=source,
            source_principal=request.peer.uri if request.peer is not None else None,
            destination=destination,
            destination_service=route.service,
            destination_principal=identity,
            mtls=True,
        )
        return _WaypointRelay(
            self,
            upstream,
            {
                "direction": "inbound",
                "protocol": f"waypoint->{protocol}",
                "source": str(origin),
                "destination": str(target),
                "source_workload": source,
                "destination_workload": destination,
                "source_identity": request.peer.uri if request.peer is not None else None,
                "destination_identity": identity,
                "labels": labels,
            },
        )

    async def _plaintext(self, sock: socket.socket) -> None:
        accepted = await _redirected(sock, "inbound")
        if accepted is None:
            return
        peer, client, destination = accepted
        snapshot = self._shared.store.snapshot
        workload = self.workload(snapshot)
        if destination.port in LOOP_GUARD_PORTS or workload is None:
            log.info(
                "inbound plaintext refused",
                destination=str(destination),
                reason="loop guard" if workload is not None else "pod not in the state yet",
            )
            await abort_stream(peer)
            return
        facts = Connection(None, client.ip, destination.ip, destination.port)
        source = snapshot.workload_by_ip(client.ip)
        labels = TcpLabels.for_connection(
            reporter="destination",
            source=source,
            source_principal=None,
            destination=workload,
            destination_service=None,
            destination_principal=self.identity.uri,
            mtls=False,
        )
        if not self._allowed(snapshot, workload, facts, labels, "TCP"):
            await abort_stream(peer)
            return
        try:
            upstream = await self._connect_upstream(client, destination)
        except (OSError, HboneError) as exc:
            log.info(
                "inbound upstream connect failed", destination=str(destination), error=str(exc)
            )
            await abort_stream(peer)
            return
        await _InboundFacts("TCP", client, destination, source, workload, facts, labels).relay(
            self, peer, upstream
        )

    def _allowed(
        self,
        snapshot: Snapshot,
        workload: Workload,
        facts: Connection,
        labels: TcpLabels,
        protocol: str,
    ) -> bool:
        decision = authorize(snapshot.policies_for(workload), facts)
        if decision.allowed:
            return True
        self._shared.metrics.policy_denied(decision.code.value)
        log.info(
            "connection denied by policy",
            protocol=protocol,
            src_addr=str(facts.source_ip),
            src_identity=facts.source_identity.uri if facts.source_identity else None,
            dst_addr=f"{facts.destination_ip}:{facts.destination_port}",
            dst_workload=f"{workload.namespace}/{workload.name}",
            policy=decision.policy,
            reason=decision.reason,
        )
        return False

    async def _connect_upstream(self, client: SocketAddress, target: SocketAddress) -> SocketStream:
        """Connect to the application from inside the pod, as the client's own address."""
        try:
            with trio.fail_after(UPSTREAM_CONNECT_TIMEOUT):
                sock = self.netns.transparent_socket(client.ip)
                return SocketStream(await connect_tcp(target, sock=sock))
        except trio.TooSlowError:
            raise UpstreamUnavailable(
                f"connecting to the application at {target} took longer than "
                f"{UPSTREAM_CONNECT_TIMEOUT:g} s"
            ) from None
        except OSError as exc:
            raise UpstreamUnavailable(
                f"cannot connect to the application at {target}: {exc}"
            ) from exc


@dataclass(frozen=True, slots=True)
class _InboundFacts:
    protocol: str
    client: SocketAddress
    target: SocketAddress
    source: Workload | None
    workload: Workload
    facts: Connection
    labels: TcpLabels

    async def relay(self, pod: PodProxy, peer: trio.abc.Stream, upstream: SocketStream) -> None:
        with (
            pod._tracked(
                direction="inbound",
                protocol=self.protocol,
                source=str(self.client),
                destination=str(self.target),
                source_workload=self.source,
                destination_workload=self.workload,
                source_identity=self.facts.source_identity.uri
                if self.facts.source_identity
                else None,
                destination_identity=pod.identity.uri,
                labels=self.labels,
                policy=PolicyCheck(self.facts, self.workload.uid),
            ) as conn,
            conn.cancel_scope,
        ):
            await relay(peer, upstream, result=conn.counters)


class _InboundRelay(TunnelConsumer):
    """An accepted inbound tunnel: relay it to the upstream connection made before the 200."""

    def __init__(self, pod: PodProxy, upstream: SocketStream, facts: _InboundFacts) -> None:
        self._pod = pod
        self._upstream = upstream
        self._facts = facts

    async def __call__(self, tunnel: TunnelStream) -> None:
        await self._facts.relay(self._pod, tunnel, self._upstream)

    async def discard(self) -> None:
        await abort_stream(self._upstream)


async def _redirected(
    sock: socket.socket, direction: str
) -> tuple[SocketStream, SocketAddress, SocketAddress] | None:
    """A captured connection as (stream, client, original destination); None if unusable."""
    stream = SocketStream(sock)
    try:
        return stream, peer_address(sock), original_destination(sock)
    except OSError as exc:
        log.info(f"{direction} connection without an original destination", error=str(exc))
        await abort_stream(stream)
        return None


class _WaypointRelay(TunnelConsumer):
    """An accepted tunnel at the waypoint stand-in, relayed to the next hop."""

    def __init__(self, pod: PodProxy, upstream: trio.abc.Stream, facts: dict[str, Any]) -> None:
        self._pod = pod
        self._upstream = upstream
        self._facts = facts

    async def __call__(self, tunnel: TunnelStream) -> None:
        with self._pod._tracked(**self._facts) as conn, conn.cancel_scope:
            await relay(tunnel, self._upstream, result=conn.counters)

    async def discard(self) -> None:
        await abort_stream(self._upstream)


def _family(address: SocketAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.ip.version == 6 else socket.AF_INET


__all__ = ["PodProxy", "ProxySettings", "Shared"]
