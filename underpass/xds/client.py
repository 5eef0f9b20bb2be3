"""The client side of Delta ADS, without I/O (what ztunnel runs).

:class:`DeltaClient` builds the requests and checks the responses of a Delta
ADS stream; an I/O adapter (:mod:`underpass.xds.grpc_client`, or ztunnel's
own) moves them. Per stream:

1. :meth:`~DeltaClient.start_stream` gives the first request of each type:
   the node on the very first one, a wildcard subscription by default (plus
   any explicit names), and ``initial_resource_versions`` with every resource
   held from earlier streams, so that after a reconnect the server sends only
   what changed.
2. :meth:`~DeltaClient.receive` checks a response as a whole (type URL
   subscribed, every resource named once, of the response's type, decodable,
   not both updated and removed) and returns an event plus the request to send
   back: an ACK, or a NACK whose ``error_detail`` says what was wrong. A
   rejected response changes nothing: it is all or nothing.
3. :meth:`~DeltaClient.subscribe` / :meth:`~DeltaClient.unsubscribe` change
   the subscription (on-demand names next to the wildcard).

The client remembers versions, not resources: applying the decoded messages
is the caller's job (ztunnel's one writer of proxy state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from underpass.xds.errors import ResourceRejected
from underpass.xds.types import MESSAGE_TYPES, WILDCARD

#: google.rpc.Code INVALID_ARGUMENT, the code of our NACKs.
NACK_CODE = 3

Decoder = Callable[[bytes], Message]


@dataclass(frozen=True, slots=True)
class DecodedResource:
    name: str
    version: str
    message: Message


@dataclass(frozen=True, slots=True)
class ResourcesReceived:
    """An accepted response: apply ``updated`` and ``removed``.

    ``first`` marks the first response for the type on this stream: after it
    the client is in sync for that type (for a reconnect, with its earlier state
    plus this delta).
    """

    type_url: str
    nonce: str
    system_version_info: str
    updated: tuple[DecodedResource, ...]
    removed: tuple[str, ...]
    first: bool


@dataclass(frozen=True, slots=True)
class ResponseRejected:
    """A response that was NACKed; nothing of it applies."""

    type_url: str
    nonce: str
    error: str


ClientEvent = ResourcesReceived | ResponseRejected


@dataclass
class _Subscription:
    wildcard: bool = True
    names: set[str] = field(default_factory=set)
    versions: dict[str, str] = field(default_factory=dict)
    answered: bool = False


class DeltaClient:
    """A Delta ADS client's protocol state (see the module docstring)."""

    def __init__(
        self,
        node: base_pb2.Node,
        type_urls: Iterable[str],
        *,
        decoders: Mapping[str, Decoder] | None = None,
        names: Mapping[str, Iterable[str]] | None = None,
        wildcard: bool = True,
    ) -> None:
        self.node = node
        self._decoders: dict[str, Decoder] = (
            dict(decoders)
            if decoders is not None
            else {t: cls.FromString for t, cls in MESSAGE_TYPES.items()}
        )
        self._subs: dict[str, _Subscription] = {}
        for type_url in type_urls:
            if type_url not in self._decoders:
                raise ValueError(f"no decoder for resource type {type_url}")
            initial = set((names or {}).get(type_url, ()))
            self._subs[type_url] = _Subscription(wildcard=wildcard, names=initial)
        self._streaming = False

    # -- introspection ----------------------------------------------------------

    @property
    def type_urls(self) -> tuple[str, ...]:
        return tuple(self._subs)

    def versions(self, type_url: str) -> dict[str, str]:
        """Name -> version of every resource of the type the client holds."""
        return dict(self._subs[type_url].versions)

    def in_sync(self, type_url: str | None = None) -> bool:
        """Whether the current stream answered (every type, or ``type_url``)."""
        subs = [self._subs[type_url]] if type_url else list(self._subs.values())
        return self._streaming and all(s.answered for s in subs)

    # -- stream lifecycle -------------------------------------------------------

    def start_stream(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        """The first request of each type for a new stream (node on the first one)."""
        self._streaming = True
        requests = []
        for type_url, sub in self._subs.items():
            sub.answered = False
            subscribe = sorted(sub.names)
            if sub.wildcard and subscribe:
                subscribe.insert(0, WILDCARD)  # explicit: names plus everything
            elif not sub.wildcard and not subscribe:
                continue  # nothing to ask for yet
            requests.append(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=subscribe,
                    initial_resource_versions=sub.versions,
                )
            )
        if requests:
            requests[0].node.CopyFrom(self.node)
        return requests

    def stream_ended(self) -> None:
        """The stream is gone; versions are kept for the next :meth:`start_stream`."""
        self._streaming = False

    # -- subscriptions ----------------------------------------------------------

    def subscribe(
        self, type_url: str, names: Iterable[str]
    ) -> discovery_pb2.DeltaDiscoveryRequest | None:
        """Add names; returns the request to send now (None when not streaming or no change)."""
        sub = self._subs[type_url]
        wanted = set(names)
        add_wildcard = WILDCARD in wanted and not sub.wildcard
        added = sorted(wanted - {WILDCARD} - sub.names)
        sub.names.update(added)
        sub.wildcard = sub.wildcard or add_wildcard
        if not self._streaming or not (added or add_wildcard):
            return None
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=([WILDCARD] if add_wildcard else []) + added,
        )

    def unsubscribe(
        self, type_url: str, names: Iterable[str]
    ) -> discovery_pb2.DeltaDiscoveryRequest | None:
        """Drop names (``*`` ends the wildcard); forgets resources no longer subscribed."""
        sub = self._subs[type_url]
        unwanted = set(names)
        drop_wildcard = WILDCARD in unwanted and sub.wildcard
        dropped = sorted((unwanted - {WILDCARD}) & sub.names)
        sub.names.difference_update(dropped)
        if drop_wildcard:
            sub.wildcard = False
        if not sub.wildcard:
            for name in [n for n in sub.versions if n not in sub.names]:
                del sub.versions[name]
        if not self._streaming or not (dropped or drop_wildcard):
            return None
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_unsubscribe=([WILDCARD] if drop_wildcard else []) + dropped,
        )

    # -- responses ----------------------------------------------------------------

    def receive(
        self, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> tuple[ClientEvent, discovery_pb2.DeltaDiscoveryRequest]:
        """Check and accept (ACK) or reject (NACK) one response."""
        type_url = response.type_url
        try:
            updated = self._check(response)
        except ResourceRejected as exc:
            nack = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=NACK_CODE, message=str(exc)),
            )
            return ResponseRejected(type_url, response.nonce, str(exc)), nack
        sub = self._subs[type_url]
        for resource in updated:
            sub.versions[resource.name] = resource.version
        for name in response.removed_resources:
            sub.versions.pop(name, None)
        first = not sub.answered
        sub.answered = True
        ack = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
        event = ResourcesReceived(
            type_url,
            response.nonce,
            response.system_version_info,
            tuple(updated),
            tuple(response.removed_resources),
            first,
        )
        return event, ack

    def _check(self, response: discovery_pb2.DeltaDiscoveryResponse) -> list[DecodedResource]:
        type_url = response.type_url
        if type_url not in self._subs:
            raise ResourceRejected(f"resources of type {type_url!r} were not subscribed")
        if not response.nonce:
            raise ResourceRejected("the response has no nonce")
        decode = self._decoders[type_url]
        seen: set[str] = set()
        updated = []
        for resource in response.resources:
            name = resource.name
            if not name:
                raise ResourceRejected("a resource has no name")
            if name in seen:
                raise ResourceRejected(f"resource {name!r} appears twice in one response")
            seen.add(name)
            if not resource.HasField("resource"):
                raise ResourceRejected(f"resource {name!r} carries no payload")
            if resource.resource.type_url != type_url:
                raise ResourceRejected(
                    f"resource {name!r} is a {resource.resource.type_url!r}, not a {type_url!r}"
                )
            try:
                message = decode(resource.resource.value)
            except (DecodeError, ValueError, ResourceRejected) as exc:
                raise ResourceRejected(f"resource {name!r} does not decode: {exc}") from None
            updated.append(DecodedResource(name, resource.version, message))
        both = seen.intersection(response.removed_resources)
        if both:
            raise ResourceRejected(
                f"resources {sorted(both)} are both updated and removed in one response"
            )
        return updated


__all__ = [
    "NACK_CODE",
    "ClientEvent",
    "DecodedResource",
    "DeltaClient",
    "ResourcesReceived",
    "ResponseRejected",
]
