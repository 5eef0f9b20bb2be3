"""ztunnel's immutable view of the mesh: workloads, services, authorization policies.

Owns the dataclasses that mirror PROTOCOLS.md section 3 (``istio.workload``
and ``istio.security``), their enums and their invariants. Both sources of
state build these: the xDS conversion (:mod:`ztunnel.state.convert`) and the
local config (:mod:`ztunnel.local_config`). Every instance is frozen and its
collections are tuples or read-only mappings, so a snapshot can be shared with
any number of readers without copying.

Defaults are applied once, here: an empty ``trust_domain`` is the mesh
default ``cluster.local``, an empty ``service_account`` is ``default``, and
IPv4-mapped IPv6 addresses are stored (and looked up) as IPv4.

Authorization policies are kept even when part of them is unusable (an
unknown enum value, a malformed CIDR): the unusable parts are dropped from the
match lists and described in ``problems`` of the rule or the policy, and
:mod:`ztunnel.policy` fails closed on them.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from identity.errors import InvalidSpiffeId
from identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from ztunnel.errors import InvalidResource

DEFAULT_SERVICE_ACCOUNT: Final = "default"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- enums (values are the wire values; names are the proto's) -------------------


class TunnelProtocol(enum.IntEnum):
    NONE = 0
    HBONE = 1


class WorkloadStatus(enum.IntEnum):
    HEALTHY = 0
    UNHEALTHY = 1


class WorkloadType(enum.IntEnum):
    DEPLOYMENT = 0
    CRONJOB = 1
    POD = 2
    JOB = 3


class NetworkMode(enum.IntEnum):
    STANDARD = 0
    HOST_NETWORK = 1


class AppProtocol(enum.IntEnum):
    UNKNOWN = 0
    HTTP11 = 1
    HTTP2 = 2
    GRPC = 3
    TCP = 4
    TLS = 5


class IPFamilies(enum.IntEnum):
    AUTOMATIC = 0
    IPV4_ONLY = 1
    IPV6_ONLY = 2
    DUAL = 3


class ApplicationTunnelProtocol(enum.IntEnum):
    """``ApplicationTunnel.Protocol``."""

    NONE = 0
    PROXY = 1


class LoadBalancingScope(enum.IntEnum):
    """``LoadBalancing.Scope``."""

    UNSPECIFIED_SCOPE = 0
    REGION = 1
    ZONE = 2
    SUBZONE = 3
    NODE = 4
    CLUSTER = 5
    NETWORK = 6


class LoadBalancingMode(enum.IntEnum):
    """``LoadBalancing.Mode``."""

    UNSPECIFIED_MODE = 0
    STRICT = 1
    FAILOVER = 2
    PASSTHROUGH = 3


class HealthPolicy(enum.IntEnum):
    """``LoadBalancing.HealthPolicy``."""

    ONLY_HEALTHY = 0
    ALLOW_ALL = 1


class Scope(enum.IntEnum):
    """``istio.security.Scope``: which workloads a policy applies to."""

    GLOBAL = 0
    NAMESPACE = 1
    WORKLOAD_SELECTOR = 2


class Action(enum.IntEnum):
    """``istio.security.Action``."""

    ALLOW = 0
    DENY = 1


class StringMatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


# -- addresses ---------------------------------------------------------------------


def normalize_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:a.b.c.d``) as IPv4; anything else unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_ip(value: IPAddress | str | bytes) -> IPAddress:
    """An IP address from its 4 or 16 bytes, its text, or an address object.

    Raises :class:`InvalidResource` (no field set; callers locate it).
    """
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return normalize_ip(value)
    if isinstance(value, bytes):
        if len(value) == 4:
            return ipaddress.IPv4Address(value)
        if len(value) == 16:
            return normalize_ip(ipaddress.IPv6Address(value))
        raise InvalidResource(f"an IP address has 4 or 16 bytes, not {len(value)}")
    if isinstance(value, str):
        try:
            return normalize_ip(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise InvalidResource(f"{value!r} is not an IPv4 or IPv6 address") from None
    raise InvalidResource(f"an IP address must be bytes or text, not {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    """An IP on a network (``""`` is the default network)."""

    network: str
    address: IPAddress
    length: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", parse_ip(self.address))
        if self.length is not None:
            limit = self.address.max_prefixlen
            if not 0 <= self.length <= limit:
                raise InvalidResource(
                    f"prefix length {self.length} is out of range for {self.address} (0..{limit})",
                    field="length",
                )

    @property
    def key(self) -> tuple[str, IPAddress]:
        return (self.network, self.address)

    def __str__(self) -> str:
        return f"{self.network}/{self.address}" if self.network else str(self.address)


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint or network gateway is reached: a service hostname or an address."""

    destination: NamespacedHostname | NetworkAddress
    hbone_mtls_port: int = 0

    def __post_init__(self) -> None:
        _check_port(self.hbone_mtls_port, "hbone_mtls_port", allow_zero=True)


@dataclass(frozen=True, slots=True)
class Port:
    """A service port and the port the workload listens on (0: resolved per workload)."""

    service_port: int
    target_port: int = 0
    app_protocol: AppProtocol = AppProtocol.UNKNOWN

    def __post_init__(self) -> None:
        _check_port(self.service_port, "service_port", allow_zero=False)
        _check_port(self.target_port, "target_port", allow_zero=True)


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True)
class ApplicationTunnel:
    protocol: ApplicationTunnelProtocol = ApplicationTunnelProtocol.NONE
    port: int = 0

    def __post_init__(self) -> None:
        _check_port(self.port, "port", allow_zero=True)


@dataclass(frozen=True, slots=True)
class LoadBalancing:
    routing_preference: tuple[LoadBalancingScope, ...] = ()
    mode: LoadBalancingMode = LoadBalancingMode.UNSPECIFIED_MODE
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY


def _check_port(value: int, name: str, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
        raise InvalidResource(f"{value!r} is not a port number ({low}..65535)", field=name)


def _require(value: str, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidResource("must be set (a non-empty string)", field=name)


def _frozen_services(
    services: Mapping[str, tuple[Port, ...]],
) -> Mapping[str, tuple[Port, ...]]:
    if isinstance(services, MappingProxyType):
        return services
    for key in services:
        namespace, sep, hostname = key.partition("/")
        if not sep or not namespace or not hostname:
            raise InvalidResource(
                "service keys are '<namespace>/<hostname>'", field=f"services[{key!r}]"
            )
    return MappingProxyType({key: tuple(ports) for key, ports in services.items()})


# -- workloads and services ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload (pod): ``istio.workload.Workload`` with defaults applied.

    ``identity`` is derived: ``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``.
    ``services`` maps ``<namespace>/<hostname>`` of each service selecting the
    workload to its ports on this workload (target ports resolved per pod).
    """

    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...] = ()
    hostname: str = ""
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    trust_domain: str = ""
    service_account: str = ""
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: WorkloadType = WorkloadType.DEPLOYMENT
    workload_name: str = ""
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    services: Mapping[str, tuple[Port, ...]] = field(default_factory=dict)
    authorization_policies: tuple[str, ...] = ()
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    cluster_id: str = ""
    locality: Locality | None = None
    network_mode: NetworkMode = NetworkMode.STANDARD
    identity: SpiffeId = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _require(self.uid, "uid")
        _require(self.name, "name")
        _require(self.namespace, "namespace")
        addresses = []
        for i, address in enumerate(self.addresses):
            try:
                addresses.append(parse_ip(address))
            except InvalidResource as exc:
                raise exc.within(field=f"addresses[{i}]") from None
        object.__setattr__(self, "addresses", tuple(addresses))
        object.__setattr__(self, "trust_domain", self.trust_domain or DEFAULT_TRUST_DOMAIN)
        object.__setattr__(self, "service_account", self.service_account or DEFAULT_SERVICE_ACCOUNT)
        object.__setattr__(self, "services", _frozen_services(self.services))
        object.__setattr__(self, "authorization_policies", tuple(self.authorization_policies))
        try:
            identity = SpiffeId(self.trust_domain, self.namespace, self.service_account)
        except InvalidSpiffeId as exc:
            raise InvalidResource(
                f"the workload's identity is not a valid SPIFFE ID: {exc}",
                field="trust_domain/namespace/service_account",
            ) from None
        object.__setattr__(self, "identity", identity)

    def __hash__(self) -> int:
        return hash(self.uid)

    @property
    def healthy(self) -> bool:
        return self.status is WorkloadStatus.HEALTHY

    def network_addresses(self) -> tuple[tuple[str, IPAddress], ...]:
        """``(network, ip)`` of each address: the keys of the IP index."""
        return tuple((self.network, ip) for ip in self.addresses)


@dataclass(frozen=True, slots=True)
class Service:
    """A service: ``istio.workload.Service``; its key is ``<namespace>/<hostname>``."""

    name: str
    namespace: str
    hostname: str
    addresses: tuple[NetworkAddress, ...] = ()
    ports: tuple[Port, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    load_balancing: LoadBalancing | None = None
    ip_families: IPFamilies = IPFamilies.AUTOMATIC

    def __post_init__(self) -> None:
        _require(self.namespace, "namespace")
        _require(self.hostname, "hostname")
        if "/" in self.namespace:
            raise InvalidResource("a namespace cannot contain '/'", field="namespace")
        seen: set[int] = set()
        for i, port in enumerate(self.ports):
            if port.service_port in seen:
                raise InvalidResource(
                    f"service port {port.service_port} is listed twice", field=f"ports[{i}]"
                )
            seen.add(port.service_port)
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "ports", tuple(self.ports))
        object.__setattr__(self, "subject_alt_names", tuple(self.subject_alt_names))

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def key(self) -> str:
        """The resource name and ``Workload.services`` key: ``<namespace>/<hostname>``."""
        return f"{self.namespace}/{self.hostname}"

    def port(self, service_port: int) -> Port | None:
        for port in self.ports:
            if port.service_port == service_port:
                return port
        return None

    @property
    def health_policy(self) -> HealthPolicy:
        if self.load_balancing is None:
            return HealthPolicy.ONLY_HEALTHY
        return self.load_balancing.health_policy


# -- authorization -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Exact, prefix, suffix or presence (any non-empty value) match of a string."""

    kind: StringMatchKind
    value: str = ""

    @classmethod
    def exact(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.EXACT, value)

    @classmethod
    def prefix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.PREFIX, value)

    @classmethod
    def suffix(cls, value: str) -> StringMatch:
        return cls(StringMatchKind.SUFFIX, value)

    @classmethod
    def presence(cls) -> StringMatch:
        return cls(StringMatchKind.PRESENCE)

    def matches(self, text: str) -> bool:
        kind = self.kind
        if kind is StringMatchKind.EXACT:
            return text == self.value
        if kind is StringMatchKind.PREFIX:
            return text.startswith(self.value)
        if kind is StringMatchKind.SUFFIX:
            return text.endswith(self.value)
        return bool(text)

    def __str__(self) -> str:
        if self.kind is StringMatchKind.PRESENCE:
            return "*"
        if self.kind is StringMatchKind.PREFIX:
            return f"{self.value}*"
        if self.kind is StringMatchKind.SUFFIX:
            return f"*{self.value}"
        return self.value


@dataclass(frozen=True, slots=True)
class Address:
    """A CIDR of ``istio.security.Address`` (address bytes + prefix length)."""

    network: IPNetwork

    @classmethod
    def parse(cls, value: str) -> Address:
        """``10.0.0.0/8``, ``fd00::/8`` or a bare IP (a /32 or /128); host bits are masked."""
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise InvalidResource(f"{value!r} is not an IP address or CIDR") from None
        return cls(_normalize_network(network))

    @classmethod
    def from_bytes(cls, address: bytes, length: int) -> Address:
        ip: IPAddress
        if len(address) == 4:
            ip = ipaddress.IPv4Address(address)
        elif len(address) == 16:
            ip = ipaddress.IPv6Address(address)
        else:
            raise InvalidResource(f"an address has 4 or 16 bytes, not {len(address)}")
        if not 0 <= length <= ip.max_prefixlen:
            raise InvalidResource(
                f"prefix length {length} is out of range for {ip} (0..{ip.max_prefixlen})"
            )
        return cls(_normalize_network(ipaddress.ip_network(f"{ip}/{length}", strict=False)))

    def contains(self, ip: IPAddress) -> bool:
        return ip.version == self.network.version and ip in self.network

    def __str__(self) -> str:
        return str(self.network)


def _normalize_network(network: IPNetwork) -> IPNetwork:
    """``::ffff:10.0.0.0/104`` as ``10.0.0.0/8``: connections are matched as IPv4."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """A source service account: namespace and name (any trust domain)."""

    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Match:
    """One Match: values of a field OR-ed, fields AND-ed, ``not_*`` negated."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[Address, ...] = ()
    not_source_ips: tuple[Address, ...] = ()
    destination_ips: tuple[Address, ...] = ()
    not_destination_ips: tuple[Address, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()


MATCH_FIELDS: Final = (
    "namespaces",
    "not_namespaces",
    "principals",
    "not_principals",
    "source_ips",
    "not_source_ips",
    "destination_ips",
    "not_destination_ips",
    "destination_ports",
    "not_destination_ports",
    "service_accounts",
    "not_service_accounts",
)


@dataclass(frozen=True, slots=True)
class Clause:
    """Matches OR-ed."""

    matches: tuple[Match, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """Clauses AND-ed. ``problems``: why (part of) this rule could not be understood.

    A rule with problems fails closed: it matches in a DENY policy and never
    matches in an ALLOW policy.
    """

    clauses: tuple[Clause, ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Authorization:
    """An L4 authorization policy; its key is ``<namespace>/<name>``.

    ``scope`` and ``action`` are None when the control plane sent a value this
    ztunnel does not know; ``problems`` then says so, and :mod:`ztunnel.policy`
    fails closed: an unknown action denies every connection the policy applies
    to, and a policy with an unknown scope applies to the workloads of its
    namespace (and those that list it) with every rule treated as unusable.
    """

    name: str
    namespace: str
    scope: Scope | None
    action: Action | None
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    problems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(self.name, "name")
        _require(self.namespace, "namespace")
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "problems", tuple(self.problems))

    @property
    def key(self) -> str:
        """The resource name: ``<namespace>/<name>``."""
        return f"{self.namespace}/{self.name}"


__all__ = [
    "DEFAULT_SERVICE_ACCOUNT",
    "DEFAULT_TRUST_DOMAIN",
    "MATCH_FIELDS",
    "Action",
    "Address",
    "AppProtocol",
    "ApplicationTunnel",
    "ApplicationTunnelProtocol",
    "Authorization",
    "Clause",
    "GatewayAddress",
    "HealthPolicy",
    "IPAddress",
    "IPFamilies",
    "IPNetwork",
    "LoadBalancing",
    "LoadBalancingMode",
    "LoadBalancingScope",
    "Locality",
    "Match",
    "NamespacedHostname",
    "NetworkAddress",
    "NetworkMode",
    "Port",
    "Rule",
    "Scope",
    "Service",
    "ServiceAccountMatch",
    "StringMatch",
    "StringMatchKind",
    "TunnelProtocol",
    "Workload",
    "WorkloadStatus",
    "WorkloadType",
    "normalize_ip",
    "parse_ip",
]
