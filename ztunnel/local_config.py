"""``--local-config``: ztunnel's state from a YAML file instead of (not beside) xDS.

Owns the file format, its parser (:func:`parse_local_config`,
:func:`load_local_config`) and the reload loop (:class:`LocalConfigSource`).

The document has the shape of the xDS resources (PROTOCOLS.md section 3),
with the protos' field names in snake_case, enum values by name, IP
addresses as strings and CIDRs as ``a.b.c.d/n`` strings::

    workloads:
      - name: web-0                     # uid defaults to <cluster_id|Kubernetes>//Pod/<ns>/<name>
        namespace: shop
        addresses: ["10.244.1.5"]
        tunnel_protocol: HBONE
        service_account: web            # default: "default"; trust_domain: cluster.local
        node: node-1
        services:
          shop/web.shop.svc.cluster.local:
            ports: [{service_port: 80, target_port: 8080}]
        authorization_policies: [shop/allow-frontend]
        status: HEALTHY
    services:
      - name: web
        namespace: shop
        hostname: web.shop.svc.cluster.local
        addresses: [{address: "10.96.0.20"}]          # NetworkAddress; network defaults to ""
        ports: [{service_port: 80, target_port: 8080}]
    policies:
      - name: allow-frontend
        namespace: shop
        scope: WORKLOAD_SELECTOR        # required here: GLOBAL, NAMESPACE, WORKLOAD_SELECTOR
        action: ALLOW                   # required here: ALLOW or DENY
        rules:
          - clauses:
              - matches:
                  - principals: [{exact: cluster.local/ns/shop/sa/frontend}]
                    source_ips: ["10.244.0.0/16"]
                    destination_ports: [8080]
                    service_accounts: [{namespace: shop, service_account: frontend}]
                    not_principals: [{presence: {}}]   # presence: {} (or null / true)

Unlike the xDS conversion, which fails closed on a policy it cannot fully
read, a wrong local config is an error: unknown keys (with a suggestion),
duplicate keys, wrong types, bad addresses, unknown enum names and duplicate
resources are reported with the file, the path of the field
(``policies[0].rules[1].clauses[0].matches[0].source_ips[2]``), the line and
what is wrong. A policy's ``scope`` and ``action`` must be spelled out: the
proto's defaults (GLOBAL, ALLOW) are too broad to get by omission.

The file is applied as a full replacement of the state. :class:`LocalConfigSource`
reloads it when it changes and keeps the last good state (logging the error)
when the new content is wrong or the file is gone.

Change detection is event-driven: an inotify watch on the file's directory
(writes, renames, creations and deletions there, so a Kubernetes ConfigMap's
symlink swap is seen too) wakes a check of the file's ``stat`` signature
(inode, size, mtime, following symlinks). A check also runs every
``poll_interval`` seconds as a safety net (and is the only trigger when the
directory cannot be watched, e.g. it does not exist yet).
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import structlog
import trio
import yaml

from underpass import inotify
from underpass.xds.types import workload_uid
from ztunnel.errors import InvalidResource, LocalConfigError, join_path
from ztunnel.state.model import (
    MATCH_FIELDS,
    Action,
    Address,
    ApplicationTunnel,
    ApplicationTunnelProtocol,
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthPolicy,
    IPAddress,
    IPFamilies,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Match,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Port,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    WorkloadType,
    parse_ip,
)
from ztunnel.state.store import Batch, Snapshot, StateWriter

log = structlog.get_logger("ztunnel.local_config")

#: Cluster id used in derived workload uids when a workload names none (Istio's default).
DEFAULT_CLUSTER_ID: Final = "Kubernetes"
DEFAULT_POLL_INTERVAL: Final = 2.0

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


# -- YAML with line numbers and no duplicate keys ---------------------------------------


class _Map(dict[str, Any]):
    """A YAML mapping that remembers the line of each key."""

    key_lines: dict[str, int]


class _Seq(list[Any]):
    """A YAML sequence that remembers the line of each item."""

    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    """Safe loader whose mappings and sequences remember lines; duplicate keys fail."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    result = _Map()
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    result = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


# -- the parsed document ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalConfig:
    """The resources of one local config document."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()

    def batch(self) -> Batch:
        return Batch(workloads=self.workloads, services=self.services, policies=self.policies)


class _Parser:
    """Turns the loaded YAML into model objects, naming the path of anything wrong."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.lines: dict[str, int] = {}  # path of a key or item -> its line

    def fail(self, path: str, problem: str) -> NoReturn:
        raise LocalConfigError(self.file, path, problem, self._line(path))

    def _line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            parent = _PARENT.sub("", path)
            if parent == path:
                return None
            path = parent
        return None

    # -- generic readers ----------------------------------------------------------------

    def mapping(
        self,
        value: object,
        path: str,
        *,
        allowed: tuple[str, ...] | None,
        required: tuple[str, ...] = (),
    ) -> Mapping[str, Any]:
        """Check a mapping's keys (``allowed`` None: any) and record their lines."""
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_kind(value)}")
        if isinstance(value, _Map):
            for key, line in value.key_lines.items():
                self.lines[self._key_path(path, key, allowed)] = line
        for key in value:
            if allowed is not None and key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.fail(
                    join_path(path, key),
                    f"unknown field {key!r}{hint} (known: {', '.join(allowed)})",
                )
        for key in required:
            if value.get(key) in (None, ""):
                self.fail(join_path(path, key), "is required")
        return value

    def sequence(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_kind(value)}")
        if isinstance(value, _Seq):
            for i, line in enumerate(value.item_lines):
                self.lines[f"{path}[{i}]"] = line
        return value

    @staticmethod
    def _key_path(path: str, key: str, allowed: tuple[str, ...] | None) -> str:
        # Free-form keys (service names) are shown quoted in brackets.
        return join_path(path, key) if allowed is not None else f"{path}[{key!r}]"

    def items(self, value: object, path: str, read: Callable[[object, str], T]) -> tuple[T, ...]:
        return tuple(
            read(item, f"{path}[{i}]") for i, item in enumerate(self.sequence(value, path))
        )

    def string(self, value: object, path: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, bool | int | float) else ""
            self.fail(path, f"expected a string, got {_kind(value)} {value!r}{hint}")
        return value

    def boolean(self, value: object, path: str) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_kind(value)} {value!r}")
        return value

    def port(self, value: object, path: str, *, allow_zero: bool = False) -> int:
        low = 0 if allow_zero else 1
        if value is None and allow_zero:
            return 0
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 65535:
            self.fail(path, f"expected a port number ({low}..65535), got {value!r}")
        return value

    def enum(self, cls: type[E], value: object, path: str, default: E | None = None) -> E:
        if value is None and default is not None:
            return default
        names = ", ".join(m.name for m in cls)
        if not isinstance(value, str):
            self.fail(path, f"expected one of {names}, got {_kind(value)} {value!r}")
        try:
            return cls[value.strip().upper()]
        except KeyError:
            self.fail(path, f"unknown value {value!r}; expected one of {names}")

    def ip(self, value: object, path: str) -> IPAddress:
        if not isinstance(value, str):
            self.fail(path, f"expected an IP address as a string, got {_kind(value)} {value!r}")
        try:
            return parse_ip(value)
        except InvalidResource as exc:
            self.fail(path, exc.problem)

    def build(self, path: str, make: Callable[[], T]) -> T:
        """Run a model constructor, reporting its own checks at ``path``."""
        try:
            return make()
        except InvalidResource as exc:
            self.fail(join_path(path, exc.field), exc.problem)

    # -- workload discovery types -------------------------------------------------------

    def port_entry(self, value: object, path: str) -> Port:
        m = self.mapping(
            value,
            path,
            allowed=("service_port", "target_port", "app_protocol"),
            required=("service_port",),
        )
        return Port(
            self.port(m.get("service_port"), join_path(path, "service_port")),
            self.port(m.get("target_port"), join_path(path, "target_port"), allow_zero=True),
            self.enum(
                AppProtocol,
                m.get("app_protocol"),
                join_path(path, "app_protocol"),
                AppProtocol.UNKNOWN,
            ),
        )

    def network_address(self, value: object, path: str) -> NetworkAddress:
        m = self.mapping(
            value, path, allowed=("network", "address", "length"), required=("address",)
        )
        length = m.get("length")
        if length is not None and (not isinstance(length, int) or isinstance(length, bool)):
            self.fail(join_path(path, "length"), f"expected a prefix length, got {length!r}")
        network = self.string(m.get("network"), join_path(path, "network"))
        address = self.ip(m.get("address"), join_path(path, "address"))
        return self.build(path, lambda: NetworkAddress(network, address, length))

    def gateway(self, value: object, path: str) -> GatewayAddress | None:
        if value is None:
            return None
        m = self.mapping(value, path, allowed=("hostname", "address", "hbone_mtls_port"))
        destination: NamespacedHostname | NetworkAddress
        if ("hostname" in m) == ("address" in m):
            self.fail(path, "set exactly one of 'hostname' and 'address'")
        if "hostname" in m:
            hp = join_path(path, "hostname")
            h = self.mapping(
                m["hostname"],
                hp,
                allowed=("namespace", "hostname"),
                required=("namespace", "hostname"),
            )
            destination = NamespacedHostname(
                self.string(h["namespace"], join_path(hp, "namespace")),
                self.string(h["hostname"], join_path(hp, "hostname")),
            )
        else:
            destination = self.network_address(m["address"], join_path(path, "address"))
        port = self.port(
            m.get("hbone_mtls_port"), join_path(path, "hbone_mtls_port"), allow_zero=True
        )
        return GatewayAddress(destination, port)

    def workload(self, value: object, path: str) -> Workload:
        fields = (
            "uid", "name", "namespace", "addresses", "hostname", "network", "tunnel_protocol",
            "trust_domain", "service_account", "waypoint", "network_gateway", "node",
            "canonical_name", "canonical_revision", "workload_type", "workload_name",
            "native_tunnel", "application_tunnel", "services", "authorization_policies",
            "status", "cluster_id", "locality", "network_mode",
        )  # fmt: skip
        m = self.mapping(value, path, allowed=fields, required=("name", "namespace"))

        def s(key: str) -> str:
            return self.string(m.get(key), join_path(path, key))

        services: dict[str, tuple[Port, ...]] = {}
        services_path = join_path(path, "services")
        raw_services = m.get("services")
        if raw_services is not None:
            for key, port_list in self.mapping(raw_services, services_path, allowed=None).items():
                kp = f"{services_path}[{key!r}]"
                namespace, sep, hostname = key.partition("/")
                if not sep or not namespace or not hostname:
                    self.fail(kp, "service keys are '<namespace>/<hostname>'")
                pl = self.mapping(port_list, kp, allowed=("ports",))
                services[key] = self.items(pl.get("ports"), join_path(kp, "ports"), self.port_entry)
        application_tunnel = None
        if m.get("application_tunnel") is not None:
            ap = join_path(path, "application_tunnel")
            at = self.mapping(m["application_tunnel"], ap, allowed=("protocol", "port"))
            application_tunnel = ApplicationTunnel(
                self.enum(
                    ApplicationTunnelProtocol,
                    at.get("protocol"),
                    join_path(ap, "protocol"),
                    ApplicationTunnelProtocol.NONE,
                ),
                self.port(at.get("port"), join_path(ap, "port"), allow_zero=True),
            )
        locality = None
        if m.get("locality") is not None:
            lp = join_path(path, "locality")
            lm = self.mapping(m["locality"], lp, allowed=("region", "zone", "subzone"))
            locality = Locality(
                *(self.string(lm.get(k), join_path(lp, k)) for k in ("region", "zone", "subzone"))
            )
        uid = s("uid") or workload_uid(
            s("cluster_id") or DEFAULT_CLUSTER_ID, s("namespace"), s("name")
        )
        kwargs: dict[str, Any] = {
            "uid": uid,
            "name": s("name"),
            "namespace": s("namespace"),
            "addresses": self.items(m.get("addresses"), join_path(path, "addresses"), self.ip),
            "hostname": s("hostname"),
            "network": s("network"),
            "tunnel_protocol": self.enum(
                TunnelProtocol,
                m.get("tunnel_protocol"),
                join_path(path, "tunnel_protocol"),
                TunnelProtocol.NONE,
            ),
            "trust_domain": s("trust_domain"),
            "service_account": s("service_account"),
            "waypoint": self.gateway(m.get("waypoint"), join_path(path, "waypoint")),
            "network_gateway": self.gateway(
                m.get("network_gateway"), join_path(path, "network_gateway")
            ),
            "node": s("node"),
            "canonical_name": s("canonical_name"),
            "canonical_revision": s("canonical_revision"),
            "workload_type": self.enum(
                WorkloadType,
                m.get("workload_type"),
                join_path(path, "workload_type"),
                WorkloadType.DEPLOYMENT,
            ),
            "workload_name": s("workload_name"),
            "native_tunnel": self.boolean(m.get("native_tunnel"), join_path(path, "native_tunnel")),
            "application_tunnel": application_tunnel,
            "services": services,
            "authorization_policies": self.items(
                m.get("authorization_policies"),
                join_path(path, "authorization_policies"),
                self._policy_name,
            ),
            "status": self.enum(
                WorkloadStatus, m.get("status"), join_path(path, "status"), WorkloadStatus.HEALTHY
            ),
            "cluster_id": s("cluster_id"),
            "locality": locality,
            "network_mode": self.enum(
                NetworkMode,
                m.get("network_mode"),
                join_path(path, "network_mode"),
                NetworkMode.STANDARD,
            ),
        }
        return self.build(path, lambda: Workload(**kwargs))

    def _policy_name(self, value: object, path: str) -> str:
        name = self.string(value, path)
        namespace, sep, rest = name.partition("/")
        if not sep or not namespace or not rest:
            self.fail(path, f"{name!r} is not a policy name '<namespace>/<name>'")
        return name

    def service(self, value: object, path: str) -> Service:
        fields = (
            "name", "namespace", "hostname", "addresses", "ports", "subject_alt_names",
            "waypoint", "load_balancing", "ip_families",
        )  # fmt: skip
        m = self.mapping(value, path, allowed=fields, required=("namespace", "hostname"))
        load_balancing = None
        if m.get("load_balancing") is not None:
            lp = join_path(path, "load_balancing")
            lb = self.mapping(
                m["load_balancing"], lp, allowed=("routing_preference", "mode", "health_policy")
            )
            load_balancing = LoadBalancing(
                self.items(
                    lb.get("routing_preference"),
                    join_path(lp, "routing_preference"),
                    lambda v, p: self.enum(LoadBalancingScope, v, p),
                ),
                self.enum(
                    LoadBalancingMode,
                    lb.get("mode"),
                    join_path(lp, "mode"),
                    LoadBalancingMode.UNSPECIFIED_MODE,
                ),
                self.enum(
                    HealthPolicy,
                    lb.get("health_policy"),
                    join_path(lp, "health_policy"),
                    HealthPolicy.ONLY_HEALTHY,
                ),
            )
        kwargs: dict[str, Any] = {
            "name": self.string(m.get("name"), join_path(path, "name")),
            "namespace": self.string(m.get("namespace"), join_path(path, "namespace")),
            "hostname": self.string(m.get("hostname"), join_path(path, "hostname")),
            "addresses": self.items(
                m.get("addresses"), join_path(path, "addresses"), self.network_address
            ),
            "ports": self.items(m.get("ports"), join_path(path, "ports"), self.port_entry),
            "subject_alt_names": self.items(
                m.get("subject_alt_names"), join_path(path, "subject_alt_names"), self.string
            ),
            "waypoint": self.gateway(m.get("waypoint"), join_path(path, "waypoint")),
            "load_balancing": load_balancing,
            "ip_families": self.enum(
                IPFamilies,
                m.get("ip_families"),
                join_path(path, "ip_families"),
                IPFamilies.AUTOMATIC,
            ),
        }
        return self.build(path, lambda: Service(**kwargs))

    # -- authorization ------------------------------------------------------------------

    def string_match(self, value: object, path: str) -> StringMatch:
        m = self.mapping(value, path, allowed=("exact", "prefix", "suffix", "presence"))
        if len(m) != 1:
            self.fail(path, "set exactly one of exact, prefix, suffix, presence")
        ((kind, raw),) = m.items()
        if kind == "presence":
            if not (raw is None or raw is True or raw == {}):
                self.fail(join_path(path, kind), "presence takes {} (or null / true)")
            return StringMatch.presence()
        text = self.string(raw, join_path(path, kind))
        return {"exact": StringMatch.exact, "prefix": StringMatch.prefix}.get(
            kind, StringMatch.suffix
        )(text)

    def cidr(self, value: object, path: str) -> Address:
        if not isinstance(value, str):
            self.fail(path, f"expected a CIDR or IP as a string, got {_kind(value)} {value!r}")
        try:
            return Address.parse(value)
        except InvalidResource as exc:
            self.fail(path, exc.problem)

    def service_account(self, value: object, path: str) -> ServiceAccountMatch:
        m = self.mapping(value, path, allowed=("namespace", "service_account", "serviceAccount"))
        if "service_account" in m and "serviceAccount" in m:
            self.fail(path, "set 'service_account' or 'serviceAccount', not both")
        key = "serviceAccount" if "serviceAccount" in m else "service_account"
        namespace = self.string(m.get("namespace"), join_path(path, "namespace"))
        name = self.string(m.get(key), join_path(path, key))
        if not namespace:
            self.fail(join_path(path, "namespace"), "is required")
        if not name:
            self.fail(join_path(path, "service_account"), "is required")
        return ServiceAccountMatch(namespace, name)

    def match(self, value: object, path: str) -> Match:
        m = self.mapping(value, path, allowed=MATCH_FIELDS)
        readers: dict[str, Callable[[object, str], object]] = {
            "namespaces": self.string_match,
            "principals": self.string_match,
            "source_ips": self.cidr,
            "destination_ips": self.cidr,
            "destination_ports": self.port,
            "service_accounts": self.service_account,
        }
        kwargs = {}
        for name in MATCH_FIELDS:
            read = readers[name.removeprefix("not_")]
            kwargs[name] = self.items(m.get(name), join_path(path, name), read)
        return Match(**kwargs)  # type: ignore[arg-type]

    def clause(self, value: object, path: str) -> Clause:
        m = self.mapping(value, path, allowed=("matches",))
        return Clause(self.items(m.get("matches"), join_path(path, "matches"), self.match))

    def rule(self, value: object, path: str) -> Rule:
        m = self.mapping(value, path, allowed=("clauses",))
        return Rule(self.items(m.get("clauses"), join_path(path, "clauses"), self.clause))

    def policy(self, value: object, path: str) -> Authorization:
        m = self.mapping(
            value,
            path,
            allowed=("name", "namespace", "scope", "action", "rules", "dry_run"),
            required=("name", "namespace", "scope", "action"),
        )
        name = self.string(m.get("name"), join_path(path, "name"))
        namespace = self.string(m.get("namespace"), join_path(path, "namespace"))
        if "/" in namespace or "/" in name:
            self.fail(path, "a policy's name and namespace cannot contain '/'")
        scope = self.enum(Scope, m.get("scope"), join_path(path, "scope"))
        action = self.enum(Action, m.get("action"), join_path(path, "action"))
        rules = self.items(m.get("rules"), join_path(path, "rules"), self.rule)
        dry_run = self.boolean(m.get("dry_run"), join_path(path, "dry_run"))
        return self.build(
            path, lambda: Authorization(name, namespace, scope, action, rules, dry_run)
        )

    # -- the document -------------------------------------------------------------------

    def document(self, value: object) -> LocalConfig:
        if value is None:
            return LocalConfig()
        m = self.mapping(value, "", allowed=("workloads", "services", "policies"))
        workloads = self.items(m.get("workloads"), "workloads", self.workload)
        services = self.items(m.get("services"), "services", self.service)
        policies = self.items(m.get("policies"), "policies", self.policy)
        self._unique("workloads", [w.uid for w in workloads], "workload uid")
        self._unique("services", [s.key for s in services], "service namespace/hostname")
        self._unique("policies", [p.key for p in policies], "policy namespace/name")
        return LocalConfig(workloads, services, policies)

    def _unique(self, path: str, keys: list[str], what: str) -> None:
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                self.fail(f"{path}[{i}]", f"{what} {key!r} is already used by {path}[{seen[key]}]")
            seen[key] = i


_PARENT: Final = re.compile(r"(\.[^.\[\]]+|\[[^\]]*\])$")


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def parse_local_config(text: str | bytes, file: Path | str = "<local config>") -> LocalConfig:
    """Parse a local config document; :class:`LocalConfigError` says what and where."""
    path = Path(file)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "not valid YAML"
        raise LocalConfigError(path, "", f"not valid YAML: {problem}", line) from None
    except yaml.YAMLError as exc:
        raise LocalConfigError(path, "", f"not valid YAML: {exc}") from None
    return _Parser(path).document(data)


def load_local_config(file: Path | str) -> LocalConfig:
    """Read and parse ``file``."""
    path = Path(file)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise LocalConfigError(path, "", f"cannot be read: {exc.strerror or exc}") from None
    return parse_local_config(text, path)


# -- the reload loop ---------------------------------------------------------------------------


_Signature = tuple[int, int, int, int] | None  # (dev, ino, size, mtime_ns); None: missing


def _signature(path: Path) -> _Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """One reload attempt: ``applied`` or ``error`` (the last good state stays)."""

    attempt: int
    applied: bool
    error: LocalConfigError | None = None


class LocalConfigSource:
    """Feeds the state from a local config file: initial load, then reload on change.

    ``writer`` is the store's one writer (``store.claim_writer("local config")``).
    """

    def __init__(
        self,
        path: Path | str,
        writer: StateWriter,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self.path = Path(path)
        self.writer = writer
        self.poll_interval = poll_interval
        self.last_error: LocalConfigError | None = None
        self.last_result: ReloadResult | None = None
        self._attempts = 0
        self._signature: _Signature = None
        self._digest: bytes | None = None
        self._attempted = trio.Event()
        self._checks = 0
        self._checked = trio.Event()

    @property
    def attempts(self) -> int:
        """Reload attempts so far (after the initial load)."""
        return self._attempts

    def load(self) -> Snapshot:
        """The initial load: replaces the state and marks it ready, or raises."""
        signature = _signature(self.path)
        text = self._read()
        config = parse_local_config(text, self.path)
        self._signature, self._digest = signature, hashlib.sha256(text).digest()
        snapshot = self.writer.replace(config.batch(), ready=True)
        log.info(
            "local config loaded",
            file=str(self.path),
            workloads=len(config.workloads),
            services=len(config.services),
            policies=len(config.policies),
            version=snapshot.version,
        )
        return snapshot

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise LocalConfigError(
                self.path, "", f"cannot be read: {exc.strerror or exc}"
            ) from None

    async def check(self) -> ReloadResult | None:
        """Reload if the file changed; None when it did not."""
        try:
            return await self._check()
        finally:
            self._checks += 1
            checked, self._checked = self._checked, trio.Event()
            checked.set()

    async def wait_checked(self, after: int) -> None:
        """Wait until check number ``after + 1`` (or later) has finished."""
        while self._checks <= after:
            await self._checked.wait()

    @property
    def checks(self) -> int:
        """Checks of the file so far (each poll is one)."""
        return self._checks

    async def _check(self) -> ReloadResult | None:
        signature = await trio.to_thread.run_sync(_signature, self.path)
        if signature == self._signature:
            return None
        self._signature = signature
        try:
            text = await trio.to_thread.run_sync(self._read)
        except LocalConfigError as exc:
            return self._attempt_done(exc)
        digest = hashlib.sha256(text).digest()
        if digest == self._digest:
            # Touched, or back to the content the state already has.
            if self.last_error is not None:
                log.info("local config is back to the applied content", file=str(self.path))
                self.last_error = None
            return None
        try:
            config = parse_local_config(text, self.path)
        except LocalConfigError as exc:
            return self._attempt_done(exc)
        self._digest = digest
        snapshot = self.writer.replace(config.batch(), ready=True)
        log.info(
            "local config reloaded",
            file=str(self.path),
            workloads=len(config.workloads),
            services=len(config.services),
            policies=len(config.policies),
            version=snapshot.version,
        )
        return self._attempt_done(None)

    def _attempt_done(self, error: LocalConfigError | None) -> ReloadResult:
        self._attempts += 1
        self.last_error = error
        if error is not None:
            log.error(
                "local config reload failed; keeping the last good configuration",
                file=str(self.path),
                error=str(error),
            )
        result = ReloadResult(self._attempts, error is None, error)
        self.last_result = result
        attempted, self._attempted = self._attempted, trio.Event()
        attempted.set()
        return result

    async def wait_attempt(self, after: int) -> ReloadResult:
        """Wait until reload attempt number ``after + 1`` (or later) has finished."""
        while self._attempts <= after:
            await self._attempted.wait()
        assert self.last_result is not None
        return self.last_result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load (raising :class:`LocalConfigError` if that fails), then watch forever."""
        self.load()
        with _DirectoryWatch(self.path.parent) as watch:  # before started: nothing slips by
            task_status.started()
            while True:
                await watch.wait(self.poll_interval)
                await self.check()


class _DirectoryWatch:
    """Wakes on changes in one directory (inotify), or after a timeout at the latest."""

    _MASK = (
        inotify.IN_CLOSE_WRITE
        | inotify.IN_MOVED_TO
        | inotify.IN_MOVED_FROM
        | inotify.IN_CREATE
        | inotify.IN_DELETE
        | inotify.IN_ONLYDIR
    )

    def __init__(self, directory: Path) -> None:
        self._ino: inotify.Inotify | None = inotify.Inotify()
        try:
            self._ino.add_watch(directory, self._MASK)
        except OSError as exc:
            self._ino.close()
            self._ino = None
            log.warning(
                "cannot watch the local config's directory; checking it on a timer only",
                directory=str(directory),
                error=str(exc),
            )

    async def wait(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            if self._ino is None:
                await trio.sleep_forever()
            else:
                await self._ino.read_events()

    def __enter__(self) -> _DirectoryWatch:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._ino is not None:
            self._ino.close()


__all__ = [
    "DEFAULT_CLUSTER_ID",
    "DEFAULT_POLL_INTERVAL",
    "LocalConfig",
    "LocalConfigSource",
    "ReloadResult",
    "load_local_config",
    "parse_local_config",
]
