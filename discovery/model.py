"""The registry-neutral model of what exists: what every registry adapter fills.

A registry adapter (Kubernetes, the lab, the in-memory one of the tests) turns
its own objects into these immutable values and hands a whole :class:`Model`
to the pipeline; :mod:`discovery.translate` turns a model into xDS resources
through one code path whatever the registry. The model says what exists,
not what it means: labels stay labels, policy fields stay as the user wrote
them (strings), and every interpretation (enrolment, waypoints, scopes,
fail-closed handling) happens in translation.

What an adapter must fill:

==========================  ==============================================================
:class:`Namespace`          name and labels (``istio.io/dataplane-mode``, ``istio.io/use-waypoint``)
:class:`Node`               name and labels (``topology.kubernetes.io/region`` / ``zone``)
:class:`Pod`                identity (namespace, name, service account), node, IPs, labels,
                            phase and readiness, named container ports, owner, host network
:class:`Service`            namespace, name, VIPs, ports (target port number or name),
                            selector (None: no endpoints), labels
:class:`Gateway`            a Gateway API Gateway: class, labels, listeners, status addresses
:class:`AuthorizationPolicy`  security.istio.io/v1 spec as written; fields the adapter could not
                            map go in ``unrecognized`` so that translation fails closed
:class:`PeerAuthentication` mode and port-level modes, selector
==========================  ==============================================================

Mappings are stored frozen (:class:`Labels`); sequences are tuples.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal

# Pod phases as Kubernetes names them.
PodPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]
TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed"})

ObjectKey = tuple[str, str]  # (namespace, name)


class Labels(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping (labels, selectors, annotations)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._data: dict[str, str] = dict(data)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._data!r})"

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Whether this selector (``matchLabels``) matches ``labels``; an empty one matches all."""
        return all(labels.get(k) == v for k, v in self._data.items())


EMPTY_LABELS: Final = Labels()


def _labels(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not isinstance(value, Labels):
            object.__setattr__(obj, name, Labels(value))


def _tuples(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, tuple):
            object.__setattr__(obj, name, tuple(value))


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = EMPTY_LABELS

    def __post_init__(self) -> None:
        _labels(self, "labels")


@dataclass(frozen=True, slots=True)
class Node:
    """A Kubernetes node; its labels give workloads their locality."""

    name: str
    labels: Mapping[str, str] = EMPTY_LABELS

    def __post_init__(self) -> None:
        _labels(self, "labels")


@dataclass(frozen=True, slots=True)
class ContainerPort:
    """A named container port (resolves a Service's named ``targetPort``)."""

    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Owner:
    """The controller owning a pod (``metadata.ownerReferences`` with controller=true)."""

    kind: str  # ReplicaSet, Job, StatefulSet, DaemonSet, ...
    name: str


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    node: str = ""
    ips: tuple[str, ...] = ()
    service_account: str = "default"
    labels: Mapping[str, str] = EMPTY_LABELS
    annotations: Mapping[str, str] = EMPTY_LABELS
    phase: PodPhase = "Running"
    ready: bool = True
    #: Being deleted (``metadata.deletionTimestamp`` set).
    terminating: bool = False
    host_network: bool = False
    ports: tuple[ContainerPort, ...] = ()
    owner: Owner | None = None
    #: The Kubernetes ``metadata.uid`` (ZDS uses it; the xDS uid is derived from the name).
    uid: str = ""

    def __post_init__(self) -> None:
        _labels(self, "labels", "annotations")
        _tuples(self, "ips", "ports")

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    #: A number, or the name of a container port (resolved per pod).
    target_port: int | str = 0
    protocol: str = "TCP"
    name: str = ""
    app_protocol: str = ""

    @property
    def target(self) -> int | str:
        """The effective target: the service port itself when unset."""
        return self.target_port or self.port


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    vips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    #: ``spec.selector``; None means the service selects no pods (manual endpoints).
    selector: Mapping[str, str] | None = None
    labels: Mapping[str, str] = EMPTY_LABELS
    #: Extra identities a client accepts for the service's endpoints.
    subject_alt_names: tuple[str, ...] = ()
    #: Overrides ``<name>.<namespace>.svc.<domain suffix>``.
    hostname: str = ""

    def __post_init__(self) -> None:
        _labels(self, "selector", "labels")
        _tuples(self, "vips", "ports", "subject_alt_names")

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class Gateway:
    """A Gateway API Gateway; a waypoint when its class is the mesh's waypoint class."""

    namespace: str
    name: str
    gateway_class: str
    labels: Mapping[str, str] = EMPTY_LABELS
    listeners: tuple[Listener, ...] = ()
    #: ``status.addresses`` of type IPAddress.
    addresses: tuple[str, ...] = ()
    #: ``status.addresses`` of type Hostname (else ``<name>.<namespace>.svc.<suffix>``).
    hostname: str = ""

    def __post_init__(self) -> None:
        _labels(self, "labels")
        _tuples(self, "listeners", "addresses")

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)


# -- security.istio.io/v1 -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """``rules[].from[].source``."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _tuples(self, *self.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class Operation:
    """``rules[].to[].operation``."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _tuples(self, *self.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class Condition:
    """``rules[].when[]``."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _tuples(self, "values", "not_values")


@dataclass(frozen=True, slots=True)
class Rule:
    sources: tuple[Source, ...] = ()  # from
    operations: tuple[Operation, ...] = ()  # to
    conditions: tuple[Condition, ...] = ()  # when
    #: Field paths in this rule the adapter could not map (translation fails closed).
    unrecognized: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _tuples(self, "sources", "operations", "conditions", "unrecognized")


@dataclass(frozen=True, slots=True)
class TargetRef:
    kind: str
    name: str
    group: str = ""
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    #: ``spec.selector.matchLabels``; None: no selector (the whole namespace).
    selector: Mapping[str, str] | None = None
    #: ``spec.targetRefs`` (and ``targetRef``): enforced by waypoints, not ztunnel.
    target_refs: tuple[TargetRef, ...] = ()
    action: str = "ALLOW"  # ALLOW, DENY, AUDIT, CUSTOM
    rules: tuple[Rule, ...] = ()
    #: The ``istio.io/dry-run`` annotation.
    dry_run: bool = False
    #: Fields of the spec outside rules the adapter could not map.
    unrecognized: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _labels(self, "selector")
        _tuples(self, "target_refs", "rules", "unrecognized")

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    namespace: str
    name: str
    selector: Mapping[str, str] | None = None
    mode: str = "UNSET"  # UNSET, PERMISSIVE, STRICT, DISABLE
    #: ``portLevelMtls``: container port -> mode.
    port_level: Mapping[int, str] = field(default_factory=dict)
    #: ``metadata.creationTimestamp`` (seconds); the oldest of competing policies wins.
    created: float = 0.0

    def __post_init__(self) -> None:
        _labels(self, "selector")
        if not isinstance(self.port_level, types.MappingProxyType):
            object.__setattr__(self, "port_level", types.MappingProxyType(dict(self.port_level)))

    @property
    def key(self) -> ObjectKey:
        return (self.namespace, self.name)


# -- the whole model -------------------------------------------------------------


def _frozen(mapping: Mapping[object, object]) -> types.MappingProxyType[object, object]:
    if isinstance(mapping, types.MappingProxyType):
        return mapping
    return types.MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class Model:
    """Everything a registry knows, at one moment. Immutable; build new ones with :meth:`with_`."""

    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    nodes: Mapping[str, Node] = field(default_factory=dict)
    pods: Mapping[ObjectKey, Pod] = field(default_factory=dict)
    services: Mapping[ObjectKey, Service] = field(default_factory=dict)
    gateways: Mapping[ObjectKey, Gateway] = field(default_factory=dict)
    authorization_policies: Mapping[ObjectKey, AuthorizationPolicy] = field(default_factory=dict)
    peer_authentications: Mapping[ObjectKey, PeerAuthentication] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @classmethod
    def of(
        cls,
        *,
        namespaces: Iterable[Namespace] = (),
        nodes: Iterable[Node] = (),
        pods: Iterable[Pod] = (),
        services: Iterable[Service] = (),
        gateways: Iterable[Gateway] = (),
        authorization_policies: Iterable[AuthorizationPolicy] = (),
        peer_authentications: Iterable[PeerAuthentication] = (),
    ) -> Model:
        """A model from lists of objects (keyed by name or namespace/name)."""
        return cls(
            namespaces={n.name: n for n in namespaces},
            nodes={n.name: n for n in nodes},
            pods={p.key: p for p in pods},
            services={s.key: s for s in services},
            gateways={g.key: g for g in gateways},
            authorization_policies={a.key: a for a in authorization_policies},
            peer_authentications={p.key: p for p in peer_authentications},
        )

    def upsert(self, *objects: ModelObject) -> Model:
        """A copy with ``objects`` added or replaced."""
        changes: dict[str, dict[object, object]] = {}
        for obj in objects:
            kind = _KIND_OF[type(obj)]
            bucket = changes.setdefault(kind, dict(getattr(self, kind)))
            bucket[_key(obj)] = obj
        return replace(self, **changes)  # type: ignore[arg-type]

    def delete(self, kind: str, *keys: str | ObjectKey) -> Model:
        """A copy without the objects of ``kind`` (a field name, e.g. "pods") at ``keys``."""
        bucket = dict(getattr(self, kind))
        for key in keys:
            bucket.pop(key, None)
        return replace(self, **{kind: bucket})

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        ns = self.namespaces.get(namespace)
        return ns.labels if ns is not None else EMPTY_LABELS


ModelObject = Namespace | Node | Pod | Service | Gateway | AuthorizationPolicy | PeerAuthentication

_KIND_OF: Final[dict[type, str]] = {
    Namespace: "namespaces",
    Node: "nodes",
    Pod: "pods",
    Service: "services",
    Gateway: "gateways",
    AuthorizationPolicy: "authorization_policies",
    PeerAuthentication: "peer_authentications",
}


def _key(obj: ModelObject) -> str | ObjectKey:
    if isinstance(obj, Namespace | Node):
        return obj.name
    return obj.key


__all__ = [
    "EMPTY_LABELS",
    "TERMINAL_PHASES",
    "AuthorizationPolicy",
    "Condition",
    "ContainerPort",
    "Gateway",
    "Labels",
    "Listener",
    "Model",
    "ModelObject",
    "Namespace",
    "Node",
    "ObjectKey",
    "Operation",
    "Owner",
    "PeerAuthentication",
    "Pod",
    "PodPhase",
    "Rule",
    "Service",
    "ServicePort",
    "Source",
    "TargetRef",
]
