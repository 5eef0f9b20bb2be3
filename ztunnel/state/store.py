"""The proxy state: one writer, immutable snapshots for every reader.

Owns :class:`StateStore`, :class:`StateWriter`, :class:`Batch`,
:class:`Snapshot` and :class:`Destination`.

- One updater (the xDS client or the local config loader) claims the one
  :class:`StateWriter` and applies :class:`Batch` es of upserts and removals by
  resource name, as Delta xDS delivers them, or replaces the whole state
  (local config). Each batch builds a new :class:`Snapshot` beside the current
  one and publishes it with a single reference assignment: a reader that holds
  a snapshot keeps a consistent view for as long as it holds it, and never
  sees half a batch.
- Readers (the data path, admin, telemetry) call :attr:`StateStore.snapshot`
  once per decision and do every lookup of that decision on it.
- Subscribers await :meth:`StateStore.wait_changed`; a snapshot's
  ``policy_generation`` changes only when something that can change an
  authorization decision changed (a policy, or the namespace or
  ``authorization_policies`` of a workload), so ztunnel can re-check its open
  connections only when needed.
- ``ready`` becomes true once the updater says the first full state arrived
  (:meth:`StateWriter.mark_ready`); ztunnel does not serve before.

Concurrency: the writer and the change notifications belong to the trio
thread (they use :class:`trio.Event`); reading :attr:`StateStore.snapshot`
is a plain attribute read and safe from any thread.

Building a snapshot copies the top-level dicts (copy-on-write) and recomputes
only the index entries the batch touched; the work per batch is proportional
to the number of resources, with a small constant.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import trio

from ztunnel.errors import InvalidBatch, WriterAlreadyClaimed
from ztunnel.state.model import (
    Authorization,
    HealthPolicy,
    IPAddress,
    NetworkMode,
    Port,
    Scope,
    Service,
    Workload,
    parse_ip,
)

IPKey = tuple[str, IPAddress]

#: Picks one endpoint among candidates (never empty) for a connection to ``service``.
EndpointChooser = Callable[[Service, Sequence[Workload]], Workload]


def first_endpoint(service: Service, candidates: Sequence[Workload]) -> Workload:
    """Deterministic choice (tests, debugging): the first candidate (healthy, lowest uid)."""
    return candidates[0]


class RandomChooser:
    """Uniformly random choice among candidates (the production default)."""

    def __init__(self, seed: int | None = None) -> None:
        # Load balancing, not security: a non-cryptographic generator is right here.
        self._random = random.Random(seed)  # noqa: S311

    def __call__(self, service: Service, candidates: Sequence[Workload]) -> Workload:
        return candidates[self._random.randrange(len(candidates))]


class RoundRobinChooser:
    """Round robin per service (by service key) over the current candidates."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def __call__(self, service: Service, candidates: Sequence[Workload]) -> Workload:
        counter = self._counters.setdefault(service.key, itertools.count())
        return candidates[next(counter) % len(candidates)]


# -- batches ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """Upserts and removals, by resource name, applied all at once.

    ``removed_addresses`` holds resource names of the Address type (a
    workload's uid or a service's ``<namespace>/<hostname>``),
    ``removed_policies`` names of Authorization resources
    (``<namespace>/<name>``). Removing a name the state does not hold is not
    an error (Delta xDS allows it). A name both upserted and removed, or
    upserted twice, is: :class:`InvalidBatch`.
    """

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    removed_addresses: tuple[str, ...] = ()
    removed_policies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("workloads", "services", "policies", "removed_addresses", "removed_policies"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        addresses = [w.uid for w in self.workloads] + [s.key for s in self.services]
        _check_unique(addresses, "address (workload uid or service namespace/hostname)")
        _check_unique([p.key for p in self.policies], "authorization policy")
        both = set(addresses) & set(self.removed_addresses)
        both |= {p.key for p in self.policies} & set(self.removed_policies)
        if both:
            raise InvalidBatch(
                f"resources {sorted(both)} are both updated and removed in one batch "
                "(a bug in the state updater: report it)"
            )

    @property
    def empty(self) -> bool:
        return not (
            self.workloads
            or self.services
            or self.policies
            or self.removed_addresses
            or self.removed_policies
        )


def _check_unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidBatch(
                f"{what} {name!r} appears twice in one batch "
                "(a bug in the state updater: report it)"
            )
        seen.add(name)


# -- snapshots --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    """Where an outbound connection to ``ip:port`` goes.

    ``service`` is set when ``ip`` is a service VIP; ``workload`` is the chosen
    endpoint (or, without a service, the workload owning ``ip``); ``port`` is
    the port to connect to on it (the target port for a service). When
    ``workload`` is None, ``problem`` says why (unknown port, no healthy
    endpoint, unknown address) for the data path's error and access log.
    A destination with neither service nor workload is outside the mesh
    (passthrough).
    """

    service: Service | None
    workload: Workload | None
    port: int
    problem: str | None = None


class Snapshot:
    """An immutable, consistent view of the proxy state, with its indexes.

    Obtain it from :attr:`StateStore.snapshot`; never build one by hand
    (``Snapshot.empty()`` exists for tests and the store's start).
    """

    __slots__ = (
        "_by_ip",
        "_by_namespace",
        "_by_vip",
        "_endpoints",
        "_global",
        "_policies",
        "_services",
        "_workloads",
        "choose",
        "network",
        "policies",
        "policy_generation",
        "ready",
        "services",
        "version",
        "workloads",
    )

    version: int
    ready: bool
    policy_generation: int
    network: str
    choose: EndpointChooser
    workloads: Mapping[str, Workload]
    services: Mapping[str, Service]
    policies: Mapping[str, Authorization]

    def __init__(
        self,
        *,
        version: int,
        ready: bool,
        policy_generation: int,
        network: str,
        choose: EndpointChooser,
        workloads: dict[str, Workload],
        services: dict[str, Service],
        policies: dict[str, Authorization],
        by_ip: dict[IPKey, tuple[Workload, ...]],
        by_vip: dict[IPKey, tuple[Service, ...]],
        endpoints: dict[str, tuple[Workload, ...]],
        global_policies: tuple[Authorization, ...],
        by_namespace: dict[str, tuple[Authorization, ...]],
    ) -> None:
        self.version = version
        self.ready = ready
        self.policy_generation = policy_generation
        self.network = network
        self.choose = choose
        self._workloads = workloads
        self._services = services
        self._policies = policies
        self.workloads = MappingProxyType(workloads)
        self.services = MappingProxyType(services)
        self.policies = MappingProxyType(policies)
        self._by_ip = by_ip
        self._by_vip = by_vip
        self._endpoints = endpoints
        self._global = global_policies
        self._by_namespace = by_namespace

    @classmethod
    def empty(cls, *, network: str = "", choose: EndpointChooser | None = None) -> Snapshot:
        return cls(
            version=0,
            ready=False,
            policy_generation=0,
            network=network,
            choose=choose or RandomChooser(),
            workloads={},
            services={},
            policies={},
            by_ip={},
            by_vip={},
            endpoints={},
            global_policies=(),
            by_namespace={},
        )

    def __repr__(self) -> str:
        return (
            f"<Snapshot v{self.version} ready={self.ready} workloads={len(self._workloads)} "
            f"services={len(self._services)} policies={len(self._policies)}>"
        )

    # -- lookups ----------------------------------------------------------------------

    def workload(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def service(self, key: str) -> Service | None:
        """A service by its ``<namespace>/<hostname>``."""
        return self._services.get(key)

    def service_by_host(self, namespace: str, hostname: str) -> Service | None:
        return self._services.get(f"{namespace}/{hostname}")

    def policy(self, key: str) -> Authorization | None:
        """A policy by its ``<namespace>/<name>``."""
        return self._policies.get(key)

    def workload_by_ip(
        self, ip: IPAddress | str | bytes, *, network: str | None = None
    ) -> Workload | None:
        """The workload owning ``ip`` on ``network`` (default: this node's network).

        When several workloads share an IP (host-network pods), a pod-network
        workload wins, then a healthy one, then the lowest uid.
        """
        owners = self._by_ip.get((self._net(network), parse_ip(ip)))
        return owners[0] if owners else None

    def workloads_by_ip(
        self, ip: IPAddress | str | bytes, *, network: str | None = None
    ) -> tuple[Workload, ...]:
        """Every workload with ``ip`` (preferred first)."""
        return self._by_ip.get((self._net(network), parse_ip(ip)), ())

    def service_by_vip(
        self, ip: IPAddress | str | bytes, port: int | None = None, *, network: str | None = None
    ) -> Service | None:
        """The service with VIP ``ip``; with ``port``, only if it is one of its ports."""
        services = self._by_vip.get((self._net(network), parse_ip(ip)))
        if not services:
            return None
        service = services[0]
        if port is not None and service.port(port) is None:
            return None
        return service

    def endpoints(self, service_key: str) -> tuple[Workload, ...]:
        """Workloads whose ``services`` name ``service_key``: healthy first, then by uid."""
        return self._endpoints.get(service_key, ())

    def resolve_destination(
        self,
        ip: IPAddress | str | bytes,
        port: int,
        *,
        network: str | None = None,
        choose: EndpointChooser | None = None,
    ) -> Destination:
        """Where a connection to ``ip:port`` goes (see :class:`Destination`).

        A service VIP wins over a workload IP. For a service, ``port`` must be
        one of its ports; the target port is the endpoint's own mapping for
        that service port, else the service's ``target_port``; endpoints
        with neither (an unresolved named port) or without an address are
        skipped. Healthy endpoints are chosen; unhealthy ones only when the
        service's health policy is ALLOW_ALL and no healthy one is left.
        """
        net = self._net(network)
        address = parse_ip(ip)
        services = self._by_vip.get((net, address))
        if not services:
            owners = self._by_ip.get((net, address))
            if owners:
                return Destination(None, owners[0], port)
            return Destination(None, None, port, f"no workload or service has address {address}")
        service = services[0]
        service_port = service.port(port)
        if service_port is None:
            return Destination(
                service, None, port, f"port {port} is not a port of service {service.key}"
            )
        allow_unhealthy = service.health_policy is HealthPolicy.ALLOW_ALL
        healthy: list[tuple[Workload, int]] = []
        unhealthy: list[tuple[Workload, int]] = []
        for workload in self._endpoints.get(service.key, ()):
            if not workload.addresses:
                continue
            target = _target_port(service.key, service_port, workload)
            if target is None:
                continue
            if workload.healthy:
                healthy.append((workload, target))
            elif allow_unhealthy:
                unhealthy.append((workload, target))
        candidates = healthy or unhealthy
        if not candidates:
            return Destination(
                service,
                None,
                port,
                f"service {service.key} has no healthy endpoint for port {port}",
            )
        chosen = (choose or self.choose)(service, [w for w, _ in candidates])
        target = next(t for w, t in candidates if w.uid == chosen.uid)
        return Destination(service, chosen, target)

    def policies_for(self, workload: Workload) -> tuple[Authorization, ...]:
        """The policies that apply to ``workload``, sorted by key.

        GLOBAL policies; NAMESPACE policies of its namespace (and, failing
        closed, policies of its namespace whose scope this ztunnel does not
        know); and the policies it lists in ``authorization_policies``
        (whatever their scope). Listed names the state does not hold are
        skipped, as Istio does: the policy has not arrived (or is gone).
        """
        found: dict[str, Authorization] = {p.key: p for p in self._global}
        for policy in self._by_namespace.get(workload.namespace, ()):
            found[policy.key] = policy
        for name in workload.authorization_policies:
            listed = self._policies.get(name)
            if listed is not None:
                found[name] = listed
        return tuple(found[k] for k in sorted(found))

    def _net(self, network: str | None) -> str:
        return self.network if network is None else network


def _target_port(service_key: str, service_port: Port, workload: Workload) -> int | None:
    for port in workload.services.get(service_key, ()):
        if port.service_port == service_port.service_port and port.target_port:
            return port.target_port
    return service_port.target_port or None


def _ip_owner_order(workload: Workload) -> tuple[bool, bool, str]:
    return (workload.network_mode is not NetworkMode.STANDARD, not workload.healthy, workload.uid)


def _endpoint_order(workload: Workload) -> tuple[bool, str]:
    return (not workload.healthy, workload.uid)


def _policy_inputs(workload: Workload | None) -> tuple[str, tuple[str, ...]] | None:
    if workload is None:
        return None
    return (workload.namespace, workload.authorization_policies)


def _build(old: Snapshot, batch: Batch, *, replace: bool, ready: bool) -> Snapshot:
    """The snapshot after ``batch``: on top of ``old``, or (``replace``) on an empty state."""
    start = Snapshot.empty(network=old.network, choose=old.choose) if replace else old
    workloads = dict(start._workloads)
    services = dict(start._services)
    policies = dict(start._policies)

    changed_workloads: dict[str, Workload | None] = {}  # uid -> new (None: removed)
    changed_services: dict[str, Service | None] = {}
    touched_ips: set[IPKey] = set()
    touched_vips: set[IPKey] = set()
    touched_endpoints: set[str] = set()

    if not replace:
        for name in batch.removed_addresses:
            gone = workloads.pop(name, None)
            if gone is not None:
                touched_ips.update(gone.network_addresses())
                touched_endpoints.update(gone.services)
                changed_workloads[name] = None
            gone_service = services.pop(name, None)
            if gone_service is not None:
                touched_vips.update(a.key for a in gone_service.addresses)
                changed_services[name] = None
        for name in batch.removed_policies:
            policies.pop(name, None)
    for workload in batch.workloads:
        previous = workloads.get(workload.uid)
        if previous is not None:
            touched_ips.update(previous.network_addresses())
            touched_endpoints.update(previous.services)
        workloads[workload.uid] = workload
        touched_ips.update(workload.network_addresses())
        touched_endpoints.update(workload.services)
        changed_workloads[workload.uid] = workload
    for service in batch.services:
        previous_service = services.get(service.key)
        if previous_service is not None:
            touched_vips.update(a.key for a in previous_service.addresses)
        services[service.key] = service
        touched_vips.update(a.key for a in service.addresses)
        changed_services[service.key] = service
    for policy in batch.policies:
        policies[policy.key] = policy

    # What the changed resources now contribute to each index key (built once:
    # a batch of N resources costs O(N), not O(N x keys touched)).
    new_by_ip: dict[IPKey, list[Workload]] = {}
    new_by_service: dict[str, list[Workload]] = {}
    for changed in changed_workloads.values():
        if changed is None:
            continue
        for ip_key in set(changed.network_addresses()):
            new_by_ip.setdefault(ip_key, []).append(changed)
        for service_key in changed.services:
            new_by_service.setdefault(service_key, []).append(changed)
    new_by_vip: dict[IPKey, list[Service]] = {}
    for changed_service in changed_services.values():
        if changed_service is None:
            continue
        for vip_key in {a.key for a in changed_service.addresses}:
            new_by_vip.setdefault(vip_key, []).append(changed_service)

    by_ip = dict(start._by_ip)
    for ip_key in touched_ips:
        kept = [w for w in by_ip.get(ip_key, ()) if w.uid not in changed_workloads]
        kept += new_by_ip.get(ip_key, ())
        if kept:
            by_ip[ip_key] = tuple(sorted(kept, key=_ip_owner_order))
        else:
            by_ip.pop(ip_key, None)

    by_vip = dict(start._by_vip)
    for vip_key in touched_vips:
        kept_services = [s for s in by_vip.get(vip_key, ()) if s.key not in changed_services]
        kept_services += new_by_vip.get(vip_key, ())
        if kept_services:
            by_vip[vip_key] = tuple(sorted(kept_services, key=lambda s: s.key))
        else:
            by_vip.pop(vip_key, None)

    endpoints = dict(start._endpoints)
    for service_key in touched_endpoints:
        members = [w for w in endpoints.get(service_key, ()) if w.uid not in changed_workloads]
        members += new_by_service.get(service_key, ())
        if members:
            endpoints[service_key] = tuple(sorted(members, key=_endpoint_order))
        else:
            endpoints.pop(service_key, None)

    # Did anything that can change an authorization decision change?
    if replace:
        policy_keys: Iterable[str] = set(old._policies) | set(policies)
        workload_uids: Iterable[str] = set(old._workloads) | set(workloads)
    else:
        policy_keys = {*batch.removed_policies, *(p.key for p in batch.policies)}
        workload_uids = changed_workloads
    policy_changed = any(old._policies.get(k) != policies.get(k) for k in policy_keys) or any(
        _policy_inputs(old._workloads.get(uid)) != _policy_inputs(workloads.get(uid))
        for uid in workload_uids
    )
    if replace or batch.policies or batch.removed_policies:
        global_policies, by_namespace = _scope_index(policies)
    else:
        global_policies, by_namespace = old._global, old._by_namespace

    return Snapshot(
        version=old.version + 1,
        ready=ready,
        policy_generation=old.policy_generation + (1 if policy_changed else 0),
        network=old.network,
        choose=old.choose,
        workloads=workloads,
        services=services,
        policies=policies,
        by_ip=by_ip,
        by_vip=by_vip,
        endpoints=endpoints,
        global_policies=global_policies,
        by_namespace=by_namespace,
    )


def _scope_index(
    policies: Mapping[str, Authorization],
) -> tuple[tuple[Authorization, ...], dict[str, tuple[Authorization, ...]]]:
    global_policies: list[Authorization] = []
    by_namespace: dict[str, list[Authorization]] = {}
    for key in sorted(policies):
        policy = policies[key]
        if policy.scope is Scope.GLOBAL:
            global_policies.append(policy)
        elif policy.scope is Scope.NAMESPACE or policy.scope is None:
            by_namespace.setdefault(policy.namespace, []).append(policy)
    return tuple(global_policies), {ns: tuple(ps) for ns, ps in by_namespace.items()}


# -- the store --------------------------------------------------------------------------


class StateStore:
    """Holds the current :class:`Snapshot`; hands out the one :class:`StateWriter`.

    ``network`` is this node's network: the default for IP lookups.
    ``choose`` picks among a service's endpoints (default: random).
    """

    def __init__(self, *, network: str = "", choose: EndpointChooser | None = None) -> None:
        self._snapshot: Snapshot = Snapshot.empty(network=network, choose=choose)
        self._changed = trio.Event()
        self._ready = trio.Event()
        self._writer: StateWriter | None = None

    @property
    def snapshot(self) -> Snapshot:
        """The current snapshot: take it once per decision and use it throughout."""
        return self._snapshot

    @property
    def ready(self) -> bool:
        return self._snapshot.ready

    @property
    def version(self) -> int:
        return self._snapshot.version

    def claim_writer(self, owner: str) -> StateWriter:
        """The one writer; ``owner`` names the updater in errors and logs."""
        if self._writer is not None:
            raise WriterAlreadyClaimed(self._writer.owner, owner)
        self._writer = StateWriter(self, owner)
        return self._writer

    async def wait_ready(self) -> Snapshot:
        """Wait until the first full state has arrived; returns the current snapshot."""
        await self._ready.wait()
        return self._snapshot

    async def wait_changed(self, since_version: int) -> Snapshot:
        """Wait for a snapshot newer than ``since_version`` and return the newest."""
        while self._snapshot.version <= since_version:
            await self._changed.wait()
        return self._snapshot

    def _publish(self, snapshot: Snapshot) -> None:
        changed, self._changed = self._changed, trio.Event()
        self._snapshot = snapshot
        if snapshot.ready:
            self._ready.set()
        changed.set()


class StateWriter:
    """The write side of a :class:`StateStore`: one per store (:meth:`StateStore.claim_writer`).

    Call it from the trio thread only.
    """

    def __init__(self, store: StateStore, owner: str) -> None:
        self._store = store
        self.owner: Final = owner

    def apply(self, batch: Batch) -> Snapshot:
        """Apply upserts and removals (Delta xDS); publishes and returns the new snapshot."""
        current = self._store.snapshot
        if batch.empty:
            return current
        snapshot = _build(current, batch, replace=False, ready=current.ready)
        self._store._publish(snapshot)
        return snapshot

    def replace(self, batch: Batch, *, ready: bool = True) -> Snapshot:
        """Make the state exactly ``batch``'s resources (its removals are ignored).

        A full replacement is a full state, so by default it also marks the
        store ready.
        """
        current = self._store.snapshot
        snapshot = _build(current, batch, replace=True, ready=current.ready or ready)
        self._store._publish(snapshot)
        return snapshot

    def mark_ready(self) -> Snapshot:
        """The first full state has arrived (e.g. every xDS type answered once)."""
        current = self._store.snapshot
        if current.ready:
            return current
        snapshot = _build(current, Batch(), replace=False, ready=True)
        self._store._publish(snapshot)
        return snapshot


__all__ = [
    "Batch",
    "Destination",
    "EndpointChooser",
    "RandomChooser",
    "RoundRobinChooser",
    "Snapshot",
    "StateStore",
    "StateWriter",
    "first_endpoint",
]
