"""HBONE: the mTLS + HTTP/2 CONNECT tunnel between ztunnels and waypoints.

- :mod:`~underpass.hbone.protocol`: the sans-IO core (:class:`HboneClient`,
  :class:`HboneServer`) on top of ``h2``.
- :mod:`~underpass.hbone.headers`: ``:authority``, ``forwarded``,
  ``baggage``, ``traceparent``; :class:`ConnectRequest`, :class:`RequestInfo`.
- :mod:`~underpass.hbone.stream`: fast trio streams on non-blocking sockets
  (:class:`TlsSocketStream`, :class:`SocketStream`), :func:`connect_tls`.
- :mod:`~underpass.hbone.trio_adapter`: :class:`HboneClientConnection`,
  :class:`TunnelStream`, :func:`serve_hbone`, :func:`serve_hbone_tls`.
- :mod:`~underpass.hbone.pool`: :class:`HbonePool`, :class:`PoolKey`.
- :mod:`~underpass.hbone.relay`: :func:`relay` (both ways, half-close, abort).
- :mod:`~underpass.hbone.errors`: the error classes.

Outbound (ztunnel), one pool per process::

    async with open_hbone_pool(tls_connector(client_context_for)) as pool:
        key = PoolKey(source_id, frozenset({destination_id}), destination_ip)  # port 15008
        request = ConnectRequest(SocketAddress.of(destination_ip, 8080),
                                 client=SocketAddress.of(app_ip, app_port))
        tunnel = await pool.open_tunnel(key, request)  # TunnelRefused unless 200
        await relay(SocketStream(app_socket), tunnel)

Inbound (ztunnel), per socket accepted on 15008 in a pod's netns::

    async def handler(request: InboundRequest) -> HandlerResult:
        if not allowed(request.peer, request.authority):
            return 401
        return SocketStream(await connect_tcp(request.authority, prepare=spoof(request.client)))

    context = server_context_for(sock.getsockname()[0])  # the workload owning that IP
    nursery.start_soon(serve_hbone_tls, sock, context, trust_domain, handler)
"""

from __future__ import annotations

from underpass.hbone.errors import (
    BadRequest,
    ConnectFailed,
    ConnectionLost,
    ConnectionUnavailable,
    ConnectTimeout,
    HalfCloseNotSupported,
    HboneError,
    KeepaliveTimeout,
    LocalError,
    LocalProtocolError,
    PolicyDenied,
    ProtocolViolation,
    RemoteError,
    StreamLimitReached,
    StreamReset,
    TunnelRefused,
    UpstreamUnavailable,
)
from underpass.hbone.headers import (
    Baggage,
    ConnectRequest,
    Forwarded,
    RequestInfo,
    SocketAddress,
    TraceParent,
)
from underpass.hbone.pool import (
    HBONE_PORT,
    Connector,
    HbonePool,
    PoolKey,
    open_hbone_pool,
    tls_connector,
)
from underpass.hbone.protocol import HboneClient, HboneServer, HboneSettings
from underpass.hbone.relay import RelayResult, relay
from underpass.hbone.stream import (
    SocketStream,
    TlsSocketStream,
    accept_tls,
    connect_tcp,
    connect_tls,
)
from underpass.hbone.trio_adapter import (
    Handler,
    HandlerResult,
    HboneClientConnection,
    HboneServerConnection,
    InboundRequest,
    TunnelConsumer,
    TunnelStream,
    open_hbone_connection,
    serve_hbone,
    serve_hbone_tls,
)

__all__ = [
    "HBONE_PORT",
    "BadRequest",
    "Baggage",
    "ConnectFailed",
    "ConnectRequest",
    "ConnectTimeout",
    "ConnectionLost",
    "ConnectionUnavailable",
    "Connector",
    "Forwarded",
    "HalfCloseNotSupported",
    "Handler",
    "HandlerResult",
    "HboneClient",
    "HboneClientConnection",
    "HboneError",
    "HbonePool",
    "HboneServer",
    "HboneServerConnection",
    "HboneSettings",
    "InboundRequest",
    "KeepaliveTimeout",
    "LocalError",
    "LocalProtocolError",
    "PolicyDenied",
    "PoolKey",
    "ProtocolViolation",
    "RelayResult",
    "RemoteError",
    "RequestInfo",
    "SocketAddress",
    "SocketStream",
    "StreamLimitReached",
    "StreamReset",
    "TlsSocketStream",
    "TraceParent",
    "TunnelConsumer",
    "TunnelRefused",
    "TunnelStream",
    "UpstreamUnavailable",
    "accept_tls",
    "connect_tcp",
    "connect_tls",
    "open_hbone_connection",
    "open_hbone_pool",
    "relay",
    "serve_hbone",
    "serve_hbone_tls",
    "tls_connector",
]
