"""ztunnel's control-plane connection: Delta ADS from discovery into the proxy state.

Owns :class:`XdsSource` (and its settings :class:`ZtunnelNode`, :class:`XdsTls`,
:class:`Backoff`, its error :class:`XdsSourceError`): the other updater of the
state store besides :mod:`ztunnel.local_config`, never beside it.

How it works:

- One trio task (:meth:`XdsSource.run`) runs the stream over
  :mod:`underpass.grpclite` (no grpcio, no thread): a wildcard subscription
  to ``istio.workload.Address`` and ``istio.security.Authorization``, a
  fresh connection per attempt (so a restarted control plane is reached at
  once), exponential backoff between attempts, and
  ``initial_resource_versions`` on every reconnect so that only changes
  travel. HTTP/2 keepalive PINGs notice a control plane that vanished.
- Every response is checked and converted before anything is kept
  (:func:`ztunnel.state.xds_decoders`, :func:`ztunnel.state.batch_from_xds`):
  one that ztunnel cannot use is NACKed as a whole, with the reason as the
  NACK's ``error_detail``, and changes nothing. An accepted response is
  applied through the store's one :class:`StateWriter`, then ACKed.
- Delta responses are deltas, so every batch is applied on top of the state
  (never a replacement): on the first stream the state starts empty, and on a
  reconnect the server sends the changes since the versions we hold, plus
  removals for what no longer exists.
- The store is marked ready once both types have answered (the first full
  state); until then ztunnel does not serve. When the control plane goes away
  the last state stays served unchanged and the task reconnects.
- :meth:`XdsSource.status` is the admin view; :meth:`XdsSource.wait_until`
  waits for a condition on it. Readers of the state use ``store.wait_changed``.

The bearer token (``authorization: Bearer ...``, fetched anew for every
stream) is never logged, and is refused over plaintext.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog
import trio
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from identity import der
from underpass import grpclite
from underpass.proto import authorization_pb2, workload_pb2
from underpass.xds.client import (
    NACK_CODE,
    ClientEvent,
    DeltaClient,
    ResourcesReceived,
    ResponseRejected,
)
from underpass.xds.node import build_node, ztunnel_node_id
from underpass.xds.types import (
    DELTA_METHOD_PATH,
    MESSAGE_TYPES,
    TYPE_URL_PREFIX,
    WORKLOAD_TYPE_URLS,
    address_resource_name,
    authorization_resource_name,
)
from ztunnel.errors import ZtunnelError
from ztunnel.state import Snapshot, StateWriter, batch_from_xds, xds_decoders

log = structlog.get_logger("ztunnel.xds_source")

#: The connection to the control plane: large pushes, a PING every 30 s while streaming.
CONNECTION_SETTINGS: Final = grpclite.ConnectionSettings(
    max_message_size=64 * 1024 * 1024,
    keepalive_interval=30.0,
    keepalive_timeout=10.0,
)


class XdsSourceError(ZtunnelError):
    """The control-plane connection is misconfigured, or it cannot go on."""


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

    ``server_name`` overrides the name the certificate must carry (and the
    SNI sent), for an address that is an IP or an alias not in the certificate.
    """

    root_certificates: bytes
    server_name: str | None = None

    def __post_init__(self) -> None:
        try:
            for root in der.pem_blocks(self.root_certificates):
                der.parse_certificate(root)
        except der.DerError as exc:
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


# -- checking responses -----------------------------------------------------------------------


class _StreamFailed(Exception):
    """The current stream cannot go on (its message says why); the source reconnects."""


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


def _decode_response(payload: bytes) -> discovery_pb2.DeltaDiscoveryResponse:
    try:
        return discovery_pb2.DeltaDiscoveryResponse.FromString(payload)
    except DecodeError as exc:
        raise _StreamFailed(
            f"the control plane sent a message that is not a DeltaDiscoveryResponse ({exc}); "
            "is the address a Delta ADS server?"
        ) from None


# -- the source -------------------------------------------------------------------------------


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
        try:
            self._target = grpclite.Target.parse(address)
        except ValueError:
            raise XdsSourceError(
                f"the control-plane address {address!r} must be <host>:<port> ([v6]:port for "
                "IPv6) or unix:<path> (a local relay)"
            ) from None
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
        self._grpc_tls = (
            grpclite.TlsSettings(tls.root_certificates, tls.server_name)
            if tls is not None
            else None
        )
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
        """Wait until ``condition(self)`` holds (checked after every change of the status)."""
        while not condition(self):
            await self._changed.wait()

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and keep the state updated until cancelled.

        ``started`` comes at once: readiness is the store's (``store.wait_ready``).
        On cancel the stream is cancelled (RST_STREAM) and the connection closed.
        """
        if self._running:
            raise XdsSourceError("this control-plane connection is already running")
        self._running = True
        log.info(
            "connecting to the control plane",
            address=self.address,
            tls=self._tls is not None,
            node_id=self.node.id,
        )
        try:
            task_status.started()
            delay = self._backoff.initial
            while True:
                answered, error = await self._stream_once()
                if answered:
                    delay = self._backoff.initial  # it worked for a while: start over
                self._stream_closed(error, retry_in=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self._backoff.maximum)
        finally:
            self._connected = False
            self._running = False
            self._notify()

    async def _stream_once(self) -> tuple[bool, str]:
        """One connection and stream, until it ends: whether a response arrived, and why
        it ended (always a failure: the control plane is not meant to end the stream)."""
        self._attempt_started()
        responses = 0
        try:
            metadata = self._call_metadata()
            async with (
                grpclite.connect(
                    self._target, tls=self._grpc_tls, settings=CONNECTION_SETTINGS
                ) as connection,
                connection.stream(DELTA_METHOD_PATH, metadata=metadata) as call,
            ):
                for request in self._client.start_stream():
                    await call.send(request.SerializeToString())
                async for payload in call:
                    responses += 1
                    event, answer = self._client.receive(_decode_response(payload))
                    self._on_event(event)
                    await call.send(answer.SerializeToString())
            error = "the control plane ended the discovery stream (status OK)"
        except grpclite.GrpcError as exc:
            error = f"the discovery stream failed ({exc.code.name}): {exc.details}"
        except (XdsSourceError, _StreamFailed) as exc:
            error = str(exc)
        finally:
            self._client.stream_ended()
        return responses > 0, error

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

    # -- what happened on the stream --------------------------------------------------------

    def _attempt_started(self) -> None:
        if self._attempts:
            self.reconnects += 1
        self._attempts += 1
        self._notify()

    def _on_event(self, event: ClientEvent) -> None:
        self._response_arrived()
        if isinstance(event, ResponseRejected):
            self.nacks += 1
            self.last_error = f"NACK of {_short(event.type_url)}: {event.error}"
            log.warning(
                "rejected a control-plane update (NACK); keeping the last good state",
                address=self.address,
                type_url=_short(event.type_url),
                nonce=event.nonce,
                error=event.error,
            )
        else:
            self.acks += 1
            self._apply(event)
        self._notify()

    def _stream_closed(self, error: str, *, retry_in: float) -> None:
        self._connected = False
        self.last_error = error
        log.warning(
            "lost the control-plane connection; serving the last state and reconnecting",
            address=self.address,
            error=error,
            ready=self._ready,
            retry_in=round(retry_in, 3),
        )
        self._notify()

    def _apply(self, event: ResourcesReceived) -> None:
        # Cannot fail: the decoders converted every resource and _CheckedClient checked the
        # names before the response was accepted (a failure here is a bug: it ends run()).
        batch = batch_from_xds(
            event.type_url, ((r.name, r.message) for r in event.updated), event.removed
        )
        snapshot = self._writer.apply(batch)
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
    "CONNECTION_SETTINGS",
    "Backoff",
    "TokenProvider",
    "XdsSource",
    "XdsSourceError",
    "XdsTls",
    "ZtunnelNode",
]
