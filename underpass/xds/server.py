"""The server side of Delta ADS, without I/O.

:class:`DeltaServerStream` is one client stream's state machine. The I/O layer
feeds it the client's requests (:meth:`~DeltaServerStream.receive`, which
returns events to log and count) and asks it, after every request and every
new :class:`Snapshot`, which responses to send
(:meth:`~DeltaServerStream.responses`). It keeps, per resource type:

- the subscription: wildcard (the default when the first request names no
  resource, or ``*`` subscribed) and explicitly subscribed names;
- what the client holds: ``name -> version`` as far as we know, seeded from
  ``initial_resource_versions`` on the stream's first request for the type, so
  a reconnecting client gets only what changed, and removals for what it holds
  that no longer exists. It is stored as the differences from the latest
  snapshot (:class:`HeldVersions`), so a wildcard stream in sync costs memory
  for what it lacks, not one entry per resource of the mesh;
- the responses awaiting an ACK, by nonce. An ACK confirms them; a NACK puts
  back what the client held before and remembers the rejected versions, which
  are not sent again until their content changes (the stream stays up).

Responses are computed against the latest snapshot only, so snapshots that
arrive while a stream is busy are coalesced into one push. The first request
for a type is always answered, even with nothing, so that a client knows it
is in sync. A stream is driven by one task; it is not thread-safe.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from envoy.service.discovery.v3 import discovery_pb2

from underpass.xds.errors import XdsProtocolError
from underpass.xds.node import NodeInfo
from underpass.xds.types import WILDCARD
from underpass.xds.wire import PreparedResource, encode_delta_response

#: Above this, a push is split into several responses (gRPC's default limit is 4 MiB).
DEFAULT_MAX_RESPONSE_BYTES: Final = 3 * 1024 * 1024
#: Unacknowledged responses remembered per type; older ones count as acknowledged.
MAX_PENDING_RESPONSES: Final = 64


class _Missing:
    """The client does not hold the resource (distinct from "told it does not exist")."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
# What we believe the client holds for a name: a version, or None when we told it
# (in removed_resources) that the resource does not exist.
Held = str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every resource the server has, by type URL then name, at one ``version``.

    ``parent`` and ``changes`` are an optimisation: when a snapshot is built
    from the previous one, ``changes`` names, per type, every resource added,
    changed or removed since ``parent``, and a stream that was in sync with the
    parent looks at those names only. Without them every stream compares
    everything, which gives the same responses.
    """

    version: int
    resources: Mapping[str, Mapping[str, PreparedResource]]
    parent: int | None = None
    changes: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        frozen = {t: types.MappingProxyType(dict(named)) for t, named in self.resources.items()}
        object.__setattr__(self, "resources", types.MappingProxyType(frozen))
        object.__setattr__(self, "changes", types.MappingProxyType(dict(self.changes)))

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(0, {})

    def successor(self, resources: Mapping[str, Mapping[str, PreparedResource]]) -> Snapshot:
        """The next snapshot, holding ``resources``, with its changes since this one."""
        changes: dict[str, frozenset[str]] = {}
        for type_url in self.resources.keys() | resources.keys():
            old = self.of_type(type_url)
            new = resources.get(type_url, _EMPTY)
            changed = {
                n for n, r in new.items() if (o := old.get(n)) is None or o.version != r.version
            }
            changed.update(n for n in old if n not in new)
            if changed:
                changes[type_url] = frozenset(changed)
        return Snapshot(self.version + 1, resources, self.version, changes)

    def of_type(self, type_url: str) -> Mapping[str, PreparedResource]:
        return self.resources.get(type_url, _EMPTY)

    def __len__(self) -> int:
        return sum(len(named) for named in self.resources.values())


_EMPTY: Mapping[str, PreparedResource] = types.MappingProxyType({})


# -- events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientIdentified:
    """The stream's first request named its node."""

    node: NodeInfo


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The client subscribed to a type (``first``) or to more names of it."""

    type_url: str
    wildcard: bool
    names: tuple[str, ...]
    first: bool
    initial_versions: int = 0


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    type_url: str
    names: tuple[str, ...]
    wildcard_dropped: bool


@dataclass(frozen=True, slots=True)
class Acked:
    type_url: str
    nonce: str
    resources: int


@dataclass(frozen=True, slots=True)
class Nacked:
    """The client rejected a response; ``names`` are the resources it carried."""

    type_url: str
    nonce: str
    code: int
    message: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StaleNonce:
    """An ACK/NACK for a response this stream does not know (ignored, per the protocol)."""

    type_url: str
    nonce: str
    nack: bool


StreamEvent = ClientIdentified | Subscribed | Unsubscribed | Acked | Nacked | StaleNonce


@dataclass(frozen=True, slots=True)
class DeltaResponse:
    """One response to send: upserted resources and removed names of one type."""

    type_url: str
    nonce: str
    system_version_info: str
    resources: tuple[PreparedResource, ...]
    removed: tuple[str, ...]

    def encode(self) -> bytes:
        """The serialised ``DeltaDiscoveryResponse``."""
        return encode_delta_response(
            type_url=self.type_url,
            nonce=self.nonce,
            system_version_info=self.system_version_info,
            resources=self.resources,
            removed=self.removed,
        )

    def to_message(self) -> discovery_pb2.DeltaDiscoveryResponse:
        return discovery_pb2.DeltaDiscoveryResponse.FromString(self.encode())


# -- per-type state -------------------------------------------------------------


def _same(a: Held | _Missing, b: Held | _Missing) -> bool:
    return a is b or (isinstance(a, str) and a == b)


class HeldVersions:
    """What a client holds of one type: ``name -> version``, or None for "told it does not
    exist", and :data:`MISSING` for anything else, as a mutable mapping would say it.

    Stored as the differences from a *base*, a snapshot's resources of the type,
    shared by every stream: a wildcard client in sync holds exactly the snapshot,
    so its own storage is empty instead of one entry per resource (memory per
    stream grows with what it does not hold yet, not with the mesh).
    :meth:`rebase` moves to the next snapshot at the cost of that snapshot's
    changes. Whatever the base, every read gives the same answer.
    """

    __slots__ = ("_base", "_base_version", "_overlay")

    def __init__(self, initial: Mapping[str, Held] | None = None) -> None:
        self._base: Mapping[str, PreparedResource] = _EMPTY
        self._base_version: int | None = None
        # name -> what the client holds where that differs from the base.
        self._overlay: dict[str, Held | _Missing] = dict(initial or {})

    def get(self, name: str) -> Held | _Missing:
        if name in self._overlay:
            return self._overlay[name]
        resource = self._base.get(name)
        return MISSING if resource is None else resource.version

    def __setitem__(self, name: str, value: Held) -> None:
        self._set(name, value)

    def discard(self, name: str) -> None:
        """The client no longer holds ``name`` (nor a removal of it)."""
        self._set(name, MISSING)

    def _set(self, name: str, value: Held | _Missing) -> None:
        resource = self._base.get(name)
        if _same(value, MISSING if resource is None else resource.version):
            self._overlay.pop(name, None)
        else:
            self._overlay[name] = value

    def items(self) -> Iterator[tuple[str, Held]]:
        for name in self._overlay.keys() | self._base.keys():
            value = self.get(name)
            if not isinstance(value, _Missing):
                yield name, value

    def names(self) -> set[str]:
        """Every name the client holds (a version or a removal)."""
        return {name for name, _ in self.items()}

    @property
    def stored(self) -> int:
        """Entries kept by this stream itself (the rest is the shared base)."""
        return len(self._overlay)

    def rebase(self, snapshot: Snapshot, type_url: str) -> None:
        """Store the differences from ``snapshot``'s resources of ``type_url`` from now on."""
        base = snapshot.of_type(type_url)
        if base is self._base:
            return
        if self._base_version is None or self._base_version != snapshot.parent:
            self._rebase_fully(base, snapshot.version)
            return
        # The old base is the parent's: the two differ in the snapshot's changes only.
        values = [(name, self.get(name)) for name in snapshot.changes.get(type_url, ())]
        self._base, self._base_version = base, snapshot.version
        for name, value in values:
            self._set(name, value)

    def forget_base(self) -> None:
        """Store everything in this stream (before it drops most names, as a client that
        leaves its wildcard subscription does)."""
        self._rebase_fully(_EMPTY, None)

    def _rebase_fully(self, base: Mapping[str, PreparedResource], version: int | None) -> None:
        if base is self._base:
            return
        names = self._overlay.keys() | self._base.keys() | base.keys()
        values = [(name, self.get(name)) for name in names]
        self._base, self._base_version, self._overlay = base, version, {}
        for name, value in values:
            self._set(name, value)


@dataclass
class _TypeState:
    wildcard: bool
    names: set[str]
    held: HeldVersions
    # Versions (or None for a removal) the client refused; not sent again as such.
    rejected: dict[str, Held] = field(default_factory=dict)
    # nonce -> {name: (what we sent, what the client held before)}
    pending: dict[str, dict[str, tuple[Held, Held | _Missing]]] = field(default_factory=dict)
    must_answer: bool = True
    # The snapshot version this state was last fully brought up to; None: compare everything.
    synced_to: int | None = None

    def interested(self, name: str) -> bool:
        return self.wildcard or name in self.names


class DeltaServerStream:
    """One Delta ADS stream, server side (see the module docstring)."""

    def __init__(
        self,
        *,
        nonce_prefix: str = "",
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.node: NodeInfo | None = None
        self._nonce_prefix = nonce_prefix
        self._max_response_bytes = max_response_bytes
        self._counter = 0
        self._requests = 0
        self._types: dict[str, _TypeState] = {}

    # -- introspection ----------------------------------------------------------

    @property
    def type_urls(self) -> tuple[str, ...]:
        return tuple(self._types)

    def is_wildcard(self, type_url: str) -> bool:
        state = self._types.get(type_url)
        return state is not None and state.wildcard

    def subscribed_names(self, type_url: str) -> frozenset[str]:
        state = self._types.get(type_url)
        return frozenset(state.names) if state else frozenset()

    def held_versions(self, type_url: str) -> dict[str, str]:
        """What we believe the client holds of a type (name -> version)."""
        state = self._types.get(type_url)
        if state is None:
            return {}
        return {n: v for n, v in state.held.items() if v is not None}

    def stored_held_entries(self, type_url: str) -> int:
        """How many held versions this stream stores itself (memory, for tests)."""
        state = self._types.get(type_url)
        return state.held.stored if state else 0

    def pending_nonces(self, type_url: str) -> tuple[str, ...]:
        state = self._types.get(type_url)
        return tuple(state.pending) if state else ()

    # -- input ------------------------------------------------------------------

    def receive(self, request: discovery_pb2.DeltaDiscoveryRequest) -> list[StreamEvent]:
        """Apply one client request; returns what happened, for logs and metrics."""
        events: list[StreamEvent] = []
        self._requests += 1
        if self._requests == 1:
            if not request.HasField("node") or not request.node.id:
                raise XdsProtocolError(
                    "the first request of a stream must identify the node (node.id is empty)"
                )
            self.node = NodeInfo.from_node(request.node)
            events.append(ClientIdentified(self.node))
        type_url = request.type_url
        if not type_url:
            raise XdsProtocolError("a request on an aggregated stream must name its type_url")
        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        if any(not name for name in subscribe + unsubscribe):
            raise XdsProtocolError(f"{type_url}: an empty resource name was (un)subscribed")
        state = self._types.get(type_url)
        if state is None:
            state = self._first_request(request, subscribe, events)
        else:
            self._resubscribe(type_url, state, subscribe, unsubscribe, events)
        if request.response_nonce:
            events.append(self._acknowledge(request, state))
        return events

    def _first_request(
        self,
        request: discovery_pb2.DeltaDiscoveryRequest,
        subscribe: list[str],
        events: list[StreamEvent],
    ) -> _TypeState:
        names = set(subscribe) - {WILDCARD}
        # Legacy wildcard: a first request naming nothing asks for everything.
        wildcard = not subscribe or WILDCARD in subscribe
        held: dict[str, Held] = {
            name: version for name, version in request.initial_resource_versions.items() if name
        }
        state = _TypeState(wildcard=wildcard, names=names, held=HeldVersions(held))
        self._types[request.type_url] = state
        events.append(Subscribed(request.type_url, wildcard, tuple(sorted(names)), True, len(held)))
        return state

    def _resubscribe(
        self,
        type_url: str,
        state: _TypeState,
        subscribe: list[str],
        unsubscribe: list[str],
        events: list[StreamEvent],
    ) -> None:
        if subscribe:
            added = sorted(set(subscribe) - {WILDCARD} - state.names)
            now_wildcard = WILDCARD in subscribe and not state.wildcard
            state.names.update(added)
            state.wildcard = state.wildcard or now_wildcard
            if added or now_wildcard:
                state.synced_to = None
                events.append(Subscribed(type_url, state.wildcard, tuple(added), False))
        if unsubscribe:
            dropped = sorted(set(unsubscribe) & state.names)
            state.names.difference_update(dropped)
            drop_wildcard = WILDCARD in unsubscribe and state.wildcard
            if drop_wildcard:
                state.wildcard = False
            if not state.wildcard:
                state.held.forget_base()  # what remains is a few names: store them here
            # The client discards what it no longer subscribes to; so do we.
            for name in state.held.names():
                if not state.interested(name):
                    state.held.discard(name)
                    state.rejected.pop(name, None)
            if dropped or drop_wildcard:
                state.synced_to = None
                events.append(Unsubscribed(type_url, tuple(dropped), drop_wildcard))

    def _acknowledge(
        self, request: discovery_pb2.DeltaDiscoveryRequest, state: _TypeState
    ) -> StreamEvent:
        nonce = request.response_nonce
        nack = request.HasField("error_detail")
        if nonce not in state.pending:
            return StaleNonce(request.type_url, nonce, nack)
        # Responses are answered in order: older unanswered ones count as accepted.
        for older in list(state.pending):
            if older == nonce:
                break
            self._accept(state, state.pending.pop(older))
        sent = state.pending.pop(nonce)
        if not nack:
            self._accept(state, sent)
            return Acked(request.type_url, nonce, len(sent))
        for name, (version, before) in sent.items():
            current = state.held.get(name)
            ours = current == version if version is not None else current in (None, MISSING)
            if ours:  # not overwritten by a later response: the client still has `before`
                if isinstance(before, _Missing):
                    state.held.discard(name)
                else:
                    state.held[name] = before
            state.rejected[name] = version
        state.synced_to = None
        return Nacked(
            request.type_url,
            nonce,
            request.error_detail.code,
            request.error_detail.message,
            tuple(sorted(sent)),
        )

    @staticmethod
    def _accept(state: _TypeState, sent: Mapping[str, tuple[Held, Held | _Missing]]) -> None:
        for name in sent:
            state.rejected.pop(name, None)

    # -- output -----------------------------------------------------------------

    def responses(self, snapshot: Snapshot) -> list[DeltaResponse]:
        """The responses that bring the client up to ``snapshot`` (often none)."""
        out: list[DeltaResponse] = []
        for type_url, state in self._types.items():
            out += self._diff(type_url, state, snapshot)
        return out

    def _diff(self, type_url: str, state: _TypeState, snapshot: Snapshot) -> list[DeltaResponse]:
        current = snapshot.of_type(type_url)
        upserts: list[PreparedResource] = []
        removed: list[str] = []
        candidates: Iterable[str]
        if state.synced_to == snapshot.version:
            candidates = ()
        elif state.synced_to is not None and state.synced_to == snapshot.parent:
            candidates = snapshot.changes.get(type_url, ())
        elif state.wildcard:
            candidates = current.keys() | state.held.names() | state.names
        else:
            candidates = state.names | state.held.names()
        state.synced_to = snapshot.version
        for name in candidates:
            if not state.interested(name):
                continue
            resource = current.get(name)
            held = state.held.get(name)
            if resource is not None:
                refused = state.rejected.get(name, MISSING) == resource.version
                if held != resource.version and not refused:
                    upserts.append(resource)
            elif held is None:
                continue  # already told it does not exist
            elif isinstance(held, str) or name in state.names:
                # Gone (or never existed but explicitly asked for): say so once.
                if state.rejected.get(name, MISSING) is None:
                    continue  # the client refused this removal before
                removed.append(name)
        out: list[DeltaResponse] = []
        if upserts or removed or state.must_answer:
            state.must_answer = False
            upserts.sort(key=lambda r: r.name)
            removed.sort()
            out = self._split(type_url, state, snapshot.version, upserts, removed)
        if state.wildcard:  # it holds (nearly) the snapshot now: keep only the differences
            state.held.rebase(snapshot, type_url)
        return out

    def _split(
        self,
        type_url: str,
        state: _TypeState,
        version: int,
        upserts: list[PreparedResource],
        removed: list[str],
    ) -> list[DeltaResponse]:
        chunks: list[list[PreparedResource]] = [[]]
        size = 0
        for resource in upserts:
            if chunks[-1] and size + len(resource.wire) > self._max_response_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(resource)
            size += len(resource.wire)
        out = []
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            response = DeltaResponse(
                type_url=type_url,
                nonce=self._next_nonce(),
                system_version_info=str(version),
                resources=tuple(chunk),
                removed=tuple(removed) if last else (),
            )
            self._record(state, response)
            out.append(response)
        return out

    def _next_nonce(self) -> str:
        self._counter += 1
        return f"{self._nonce_prefix}{self._counter}"

    def _record(self, state: _TypeState, response: DeltaResponse) -> None:
        sent: dict[str, tuple[Held, Held | _Missing]] = {}
        for resource in response.resources:
            sent[resource.name] = (resource.version, state.held.get(resource.name))
            state.held[resource.name] = resource.version
        for name in response.removed:
            sent[name] = (None, state.held.get(name))
            if name in state.names:
                state.held[name] = None  # remember we told it: not said again
            else:
                state.held.discard(name)
        state.pending[response.nonce] = sent
        while len(state.pending) > MAX_PENDING_RESPONSES:
            oldest = next(iter(state.pending))
            self._accept(state, state.pending.pop(oldest))


__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MAX_PENDING_RESPONSES",
    "Acked",
    "ClientIdentified",
    "DeltaResponse",
    "DeltaServerStream",
    "HeldVersions",
    "Nacked",
    "Snapshot",
    "StaleNonce",
    "StreamEvent",
    "Subscribed",
    "Unsubscribed",
]
