"""A pool of HBONE client connections, shared by every tunnel to the same peer.

PROTOCOLS.md section 2: connections are pooled per (source identity,
destination identity set, destination IP) (:class:`PoolKey`; the port is part
of the key too, 15008 unless a waypoint says otherwise). A connection carries
at most 100 tunnels, or fewer if the peer's SETTINGS say so; the next tunnel
goes to another connection, dialled on demand. Callers that want the same key
while a dial is in flight share that dial: one dial in flight per key. A dial
(TCP connect and TLS handshake, with the server's identity checked) must
finish within the connect timeout (10 s). A connection idle for 5 minutes (no
tunnel) closes itself gracefully and leaves the pool; so does one the peer
drains (GOAWAY), once its tunnels are done.

The pool owns its connections' tasks: run it in a nursery
(``await nursery.start(pool.run)``) or use :func:`open_hbone_pool`.
How to reach a peer is the caller's: a :data:`Connector` dials for a key and
returns a transport; :func:`tls_connector` is the usual one (the source
identity's client context, the key's identities as the expected server).
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import structlog
import trio

from identity.spiffe import SpiffeId
from underpass.hbone.errors import (
    ConnectFailed,
    ConnectionUnavailable,
    ConnectTimeout,
    ErrorCodes,
    LocalProtocolError,
    StreamLimitReached,
    StreamReset,
)
from underpass.hbone.headers import ConnectRequest, IPAddress, SocketAddress
from underpass.hbone.protocol import HboneSettings
from underpass.hbone.stream import connect_tls
from underpass.hbone.trio_adapter import HboneClientConnection, TunnelStream

__all__ = [
    "HBONE_PORT",
    "Connector",
    "HbonePool",
    "PoolKey",
    "open_hbone_pool",
    "tls_connector",
]

_log = structlog.get_logger("underpass.hbone.pool")

HBONE_PORT = 15008
# How often one open_tunnel may find its connection gone or draining before giving up.
_MAX_RETRIES = 8


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Which connections a tunnel may share.

    ``destination_identities`` are the SPIFFE IDs the server may present
    (the workload's, the service's ``subject_alt_names`` or the waypoint's);
    the connection is refused unless it presents one of them.
    """

    source: SpiffeId
    destination_identities: frozenset[SpiffeId]
    destination: IPAddress  # a string is converted
    port: int = HBONE_PORT

    def __post_init__(self) -> None:
        if not isinstance(self.destination_identities, frozenset):
            raise LocalProtocolError("destination_identities must be a frozenset of SpiffeId")
        if not self.destination_identities:
            raise LocalProtocolError(
                "a pool key needs at least one expected destination identity; an empty set "
                "would accept no server"
            )
        # Validates (and normalises) the address and the port; a string IP is accepted.
        address = SocketAddress.of(self.destination, self.port)
        object.__setattr__(self, "destination", address.ip)

    @property
    def address(self) -> SocketAddress:
        return SocketAddress(self.destination, self.port)


#: Dials for a key: TCP connect, TLS with the source's certificate, checks the
#: server's identity against the key; returns the transport. Raise on failure.
Connector = Callable[[PoolKey], Awaitable[trio.abc.Stream]]


def tls_connector(
    context_for: Callable[[SpiffeId], ssl.SSLContext],
    *,
    prepare: Callable[[socket.socket], None] | None = None,
) -> Connector:
    """The usual :data:`Connector`: ``context_for(key.source)`` is the client context.

    ``prepare`` runs on each socket before connecting (ztunnel marks its
    sockets with ``SO_MARK`` so they are not captured again).
    """

    async def connect(key: PoolKey) -> trio.abc.Stream:
        return await connect_tls(
            key.address, context_for(key.source), key.destination_identities, prepare=prepare
        )

    return connect


class _Dial:
    __slots__ = ("connection", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.connection: HboneClientConnection | None = None
        self.error: ConnectFailed | None = None


class HbonePool:
    """HBONE client connections keyed by :class:`PoolKey`; see the module docstring.

    ``settings.max_client_streams`` (100) caps tunnels per connection.
    """

    def __init__(
        self,
        connector: Connector,
        *,
        settings: HboneSettings | None = None,
        idle_timeout: float = 300.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if idle_timeout <= 0 or connect_timeout <= 0:
            raise LocalProtocolError("idle_timeout and connect_timeout must be positive")
        self._connector = connector
        self._settings = settings if settings is not None else HboneSettings()
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._connections: dict[PoolKey, list[HboneClientConnection]] = {}
        self._dialing: dict[PoolKey, _Dial] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        #: Dials started (for metrics and tests).
        self.dials = 0

    # -- running ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the pool's connections until :meth:`aclose` (or cancellation)."""
        if self._nursery is not None:
            raise LocalProtocolError("this HBONE pool is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closing = True

    async def aclose(self, drain_timeout: float = 30.0) -> None:
        """Stop handing out tunnels, close every connection gracefully, stop :meth:`run`."""
        self._closing = True
        async with trio.open_nursery() as closer:
            for connections in list(self._connections.values()):
                for connection in list(connections):
                    closer.start_soon(connection.aclose, drain_timeout)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- tunnels ------------------------------------------------------------------------

    def connections(self, key: PoolKey) -> list[HboneClientConnection]:
        """The live connections for ``key`` (a copy)."""
        return list(self._connections.get(key, ()))

    def _pick(self, key: PoolKey) -> HboneClientConnection | None:
        for connection in self._connections.get(key, ()):
            if connection.available_streams > 0:
                return connection
        return None

    async def open_tunnel(
        self,
        key: PoolKey,
        request: ConnectRequest | SocketAddress,
        *,
        timeout: float | None = None,
    ) -> TunnelStream:
        """A tunnel for ``request`` over a pooled connection for ``key``.

        Reuses a connection with a free stream slot, else waits for the dial
        in flight for ``key``, else dials. Raises
        :class:`~underpass.hbone.errors.ConnectFailed` /
        :class:`~underpass.hbone.errors.ConnectTimeout` when the dial fails,
        :class:`~underpass.hbone.errors.TunnelRefused` when the server answers
        other than 200, and the other errors of
        :meth:`HboneClientConnection.open_tunnel`. ``timeout`` bounds the
        whole call (``trio.TooSlowError``).
        """
        if self._nursery is None or self._closing:
            raise ConnectionUnavailable("the HBONE pool is not running")
        with trio.fail_after(math.inf if timeout is None else timeout):
            retries = 0
            while True:
                connection = self._pick(key)
                if connection is None:
                    connection = await self._wait_for_connection(key)
                    if connection.closed:
                        # Dead before carrying a tunnel: with TLS 1.3 the server
                        # checks our certificate after our handshake is done, so
                        # a refusal shows up here. A failed dial, not a retry.
                        failure = connection.failure
                        raise ConnectFailed(
                            f"the HBONE connection to {key.address} closed right after it "
                            f"was opened: {failure if failure is not None else 'by the peer'}"
                        ) from failure
                    if connection.available_streams <= 0:
                        continue  # other callers took its slots first: dial again
                try:
                    return await connection.open_tunnel(request)
                except (StreamLimitReached, ConnectionUnavailable):
                    pass
                except StreamReset as exc:
                    # Refused before the server saw it (a GOAWAY): safe to retry.
                    if exc.error_code != ErrorCodes.REFUSED_STREAM:
                        raise
                retries += 1
                if retries >= _MAX_RETRIES:
                    raise ConnectionUnavailable(
                        f"no HBONE connection to {key.address} would take the tunnel after "
                        f"{retries} tries (connections keep closing or draining)"
                    )

    async def _wait_for_connection(self, key: PoolKey) -> HboneClientConnection:
        dial = self._dialing.get(key)
        if dial is None:
            if self._nursery is None or self._closing:
                raise ConnectionUnavailable("the HBONE pool is not running")
            dial = _Dial()
            self._dialing[key] = dial
            self.dials += 1
            self._nursery.start_soon(self._dial_and_run, key, dial)
        await dial.done.wait()
        if dial.error is not None:
            error = type(dial.error)(str(dial.error))  # one instance per waiting task
            raise error from dial.error.__cause__
        assert dial.connection is not None
        return dial.connection

    async def _dial_and_run(self, key: PoolKey, dial: _Dial) -> None:
        live: list[HboneClientConnection] | None = None
        connection: HboneClientConnection | None = None
        try:
            try:
                transport = await self._dial(key)
            except ConnectFailed as exc:
                _log.info("hbone dial failed", destination=str(key.address), error=str(exc))
                dial.error = exc
                return
            connection = HboneClientConnection(
                transport, settings=self._settings, idle_timeout=self._idle_timeout
            )
            live = self._connections.setdefault(key, [])
            async with trio.open_nursery() as nursery:
                await nursery.start(connection.run)
                live.append(connection)
                dial.connection = connection
                self._dialing.pop(key, None)
                dial.done.set()
        except Exception:
            _log.exception("hbone connection task failed", destination=str(key.address))
        finally:
            if not dial.done.is_set():
                if dial.error is None:
                    dial.error = ConnectFailed("the HBONE pool stopped while dialling")
                self._dialing.pop(key, None)
                dial.done.set()
            if live is not None and connection is not None:
                with contextlib.suppress(ValueError):
                    live.remove(connection)
                if not live and self._connections.get(key) is live:
                    del self._connections[key]

    async def _dial(self, key: PoolKey) -> trio.abc.Stream:
        try:
            with trio.fail_after(self._connect_timeout):
                return await self._connector(key)
        except trio.TooSlowError:
            raise ConnectTimeout(
                f"connecting to {key.address} (TCP and TLS) took longer than "
                f"{self._connect_timeout:g} s"
            ) from None
        except ConnectFailed:
            raise
        except Exception as exc:
            # OSError (TCP), ssl.SSLError (handshake), PeerIdentityError (wrong
            # server identity), or a connector's own failure: fail closed.
            raise ConnectFailed(
                f"cannot open an HBONE connection to {key.address}: {type(exc).__name__}: {exc}"
            ) from exc


@contextlib.asynccontextmanager
async def open_hbone_pool(
    connector: Connector,
    *,
    settings: HboneSettings | None = None,
    idle_timeout: float = 300.0,
    connect_timeout: float = 10.0,
    drain_timeout: float = 0.0,
) -> AsyncIterator[HbonePool]:
    """Run an :class:`HbonePool` for the ``async with`` block; close it after."""
    pool = HbonePool(
        connector, settings=settings, idle_timeout=idle_timeout, connect_timeout=connect_timeout
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            with trio.CancelScope(shield=True):
                await pool.aclose(drain_timeout)
