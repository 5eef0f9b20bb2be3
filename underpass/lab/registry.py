"""The lab registry: the lab's stand-in for the Kubernetes API.

Every component running in lab mode reads cluster state from here (discovery
builds workloads and services, the CA checks that a node runs a pod with the
identity it asks for, the CNI node agent finds pods and records redirection);
the lab CLI writes it. Kubernetes replaces this module; nothing else changes.

On-disk format, under the state directory (default ``/run/underpass/lab``,
``$UNDERPASS_LAB_STATE_DIR`` overrides :func:`default_state_dir`)::

    lab.json                      the lab's own settings (LabConfig)
    .lock                         fcntl.flock: shared for readers, exclusive for writers
    generation                    integer, bumped once per write transaction
    objects/nodes/<name>.json
    objects/namespaces/<name>.json
    objects/pods/<namespace>.<name>.json
    objects/services/<namespace>.<name>.json
    nodes/<node>/...              per-node CNI files and sockets (see LabPaths)

Every file is replaced by atomic rename, so a reader never sees half a file;
read-modify-write happens under the exclusive lock, so concurrent writers (the
lab CLI, node agents) never lose each other's updates; readers take the shared
lock, so a snapshot never mixes two transactions. :meth:`LabRegistry.watch`
sleeps on inotify until the ``generation`` file is renamed into place.

The state is volatile by design (it lives in /run, like the netns it
describes), so writes are not fsync'ed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import threading
import types
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from underpass import inotify
from underpass.lab.errors import InvalidObject, LabError, LabStateError, ObjectNotFound

__all__ = [
    "API_VERSION",
    "DATAPLANE_MODE_LABEL",
    "DEFAULT_STATE_DIR",
    "PHASES",
    "REDIRECTION_ANNOTATION",
    "STATE_DIR_ENV",
    "FrozenMap",
    "InvalidObject",
    "LabConfig",
    "LabError",
    "LabPaths",
    "LabRegistry",
    "LabStateError",
    "Namespace",
    "Node",
    "ObjectNotFound",
    "Pod",
    "Service",
    "ServicePort",
    "Snapshot",
    "default_state_dir",
]

API_VERSION: Final = "underpass.dev/lab/v1"
DEFAULT_STATE_DIR: Final = Path("/run/underpass/lab")
STATE_DIR_ENV: Final = "UNDERPASS_LAB_STATE_DIR"
REDIRECTION_ANNOTATION: Final = "ambient.istio.io/redirection"
DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
PHASES: Final = ("Pending", "Running", "Failed")

_KINDS: Final = ("nodes", "namespaces", "pods", "services")
_GENERATION: Final = "generation"
_LOCK: Final = ".lock"
_LAB_FILE: Final = "lab.json"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def default_state_dir() -> Path:
    """The state directory: ``$UNDERPASS_LAB_STATE_DIR`` or ``/run/underpass/lab``."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else DEFAULT_STATE_DIR


# --------------------------------------------------------------------------- validation


def validate_dns_label(kind: str, value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise InvalidObject(
            f"invalid {kind} name {value!r}: must be a DNS-1123 label "
            "(lower-case letters, digits and '-', at most 63 characters)"
        )
    return value


def validate_dns_subdomain(kind: str, value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise InvalidObject(
            f"invalid {kind} name {value!r}: must be a DNS-1123 subdomain "
            "(lower-case letters, digits, '-' and '.', at most 253 characters)"
        )
    return value


def validate_service_name(value: str) -> str:
    if len(value) > 63 or not _DNS1035_LABEL.match(value):
        raise InvalidObject(
            f"invalid service name {value!r}: must be a DNS-1035 label "
            "(start with a letter; lower-case letters, digits and '-')"
        )
    return value


def validate_label_key(key: str) -> str:
    """Check a label or annotation key as Kubernetes does (``[prefix/]name``)."""
    prefix, _, name = key.rpartition("/")
    if prefix:
        validate_dns_subdomain("label key prefix", prefix)
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        raise InvalidObject(
            f"invalid label key {key!r}: the name part must be at most 63 characters "
            "of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )
    return key


def validate_label_value(key: str, value: str) -> str:
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        raise InvalidObject(
            f"invalid value {value!r} for label {key!r}: at most 63 characters of letters, "
            "digits, '-', '_' and '.', starting and ending with a letter or digit"
        )
    return value


# --------------------------------------------------------------------------- model


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping (labels, annotations, selectors)."""

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

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def updated(self, changes: Mapping[str, str | None]) -> FrozenMap:
        """A copy with ``changes`` applied; a ``None`` value removes the key."""
        data = dict(self._data)
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        return FrozenMap(data)


def _freeze(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, FrozenMap):
            object.__setattr__(obj, name, FrozenMap(value))


def _check_labels(labels: Mapping[str, str]) -> None:
    for key, value in labels.items():
        validate_label_key(key)
        validate_label_value(key, value)


@dataclass(frozen=True)
class Node:
    """A lab node: a network namespace on the underlay with its own pod CIDR."""

    name: str
    underlay_ip: str
    pod_cidr: str
    netns: str  # path, e.g. /run/netns/<prefix>-node-1
    labels: Mapping[str, str] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        validate_dns_subdomain("node", self.name)
        _freeze(self, "labels")
        _check_labels(self.labels)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        validate_dns_label("namespace", self.name)
        _freeze(self, "labels")
        _check_labels(self.labels)


@dataclass(frozen=True)
class Pod:
    """A lab pod: a network namespace wired by the CNI chain on its node."""

    namespace: str
    name: str
    uid: str
    node: str
    ip: str | None
    service_account: str
    labels: Mapping[str, str] = field(default_factory=FrozenMap)
    annotations: Mapping[str, str] = field(default_factory=FrozenMap)
    netns: str = ""  # path, e.g. /run/netns/<prefix>-pod-<namespace>.<name>
    container_id: str = ""  # the sandbox id given to CNI as CNI_CONTAINERID
    phase: str = "Pending"  # "Pending" | "Running" | "Failed"

    def __post_init__(self) -> None:
        validate_dns_label("namespace", self.namespace)
        validate_dns_subdomain("pod", self.name)
        validate_dns_subdomain("service account", self.service_account)
        if self.phase not in PHASES:
            raise InvalidObject(f"invalid pod phase {self.phase!r}: one of {', '.join(PHASES)}")
        _freeze(self, "labels", "annotations")
        _check_labels(self.labels)
        for key in self.annotations:
            validate_label_key(key)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def enrolled(self) -> bool:
        """Whether the node agent redirected the pod's traffic (the ambient annotation)."""
        return self.annotations.get(REDIRECTION_ANNOTATION) == "enabled"


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    hostname: str  # <name>.<namespace>.svc.cluster.local
    vip: str
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        validate_dns_label("namespace", self.namespace)
        validate_service_name(self.name)
        object.__setattr__(self, "ports", tuple(self.ports))
        _freeze(self, "selector")

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class Snapshot:
    """A consistent view of the whole registry at one ``generation``."""

    nodes: Mapping[str, Node]
    namespaces: Mapping[str, Namespace]
    pods: Mapping[tuple[str, str], Pod]  # by (namespace, name)
    services: Mapping[tuple[str, str], Service]  # by (namespace, name)
    generation: int = 0

    def __post_init__(self) -> None:
        for name in ("nodes", "namespaces", "pods", "services"):
            value = getattr(self, name)
            if not isinstance(value, types.MappingProxyType):
                object.__setattr__(self, name, types.MappingProxyType(dict(value)))

    def pods_on_node(self, node: str) -> list[Pod]:
        return [p for p in self.pods.values() if p.node == node]

    def endpoints(self, service: Service) -> list[Pod]:
        """Running pods with an IP in the service's namespace that its selector selects."""
        if not service.selector:
            return []
        return [
            p
            for p in self.pods.values()
            if p.namespace == service.namespace
            and p.phase == "Running"
            and p.ip is not None
            and all(p.labels.get(k) == v for k, v in service.selector.items())
        ]

    def pod_by_uid(self, uid: str) -> Pod | None:
        return next((p for p in self.pods.values() if p.uid == uid), None)

    def pod_by_ip(self, ip: str) -> Pod | None:
        return next((p for p in self.pods.values() if p.ip == ip and p.phase == "Running"), None)


@dataclass(frozen=True)
class LabConfig:
    """The lab's own settings (``lab.json``), written by ``underpass lab up``."""

    prefix: str
    underlay_cidr: str
    cluster_cidr: str
    service_cidr: str
    fabric_netns: str  # path of the netns holding the underlay bridge
    fabric_ip: str  # the bridge's address: where a control plane in the fabric netns listens
    host_link: bool = False  # a veth from the root netns to the fabric (opt-in)
    host_ifname: str | None = None
    host_ip: str | None = None
    #: The mesh's capture path: a node agent (``underpass cni-agent``) runs in every
    #: node and the CNI chain ends with ``underpass-cni``.
    mesh: bool = True
    cni_bin_dir: str = "/usr/lib/cni"
    created_dirs: tuple[str, ...] = ()  # directories `up` created (so `down` removes them)

    def node_ip(self, index: int) -> str:
        """Underlay address of node ``index`` (1-based): .11, .12, ... in a /24."""
        net = ipaddress.ip_network(self.underlay_cidr)
        return str(net.network_address + 10 + index)

    def pod_cidr(self, index: int) -> str:
        """Pod CIDR of node ``index``: the index-th /24 of the cluster CIDR."""
        net = ipaddress.ip_network(self.cluster_cidr)
        return str(list(net.subnets(new_prefix=24))[index]) if net.prefixlen < 24 else str(net)


@dataclass(frozen=True)
class LabPaths:
    """Where the lab keeps files; components in lab mode use the per-node paths."""

    state_dir: Path

    @property
    def objects(self) -> Path:
        return self.state_dir / "objects"

    @property
    def lab_file(self) -> Path:
        return self.state_dir / _LAB_FILE

    @property
    def procs_dir(self) -> Path:
        return self.state_dir / "procs"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def node_dir(self, node: str) -> Path:
        return self.state_dir / "nodes" / node

    def conflist(self, node: str) -> Path:
        """The node's CNI network config list (what /etc/cni/net.d would hold)."""
        return self.node_dir(node) / "net.d" / "10-underpass-lab.conflist"

    def ipam_dir(self, node: str) -> Path:
        """host-local IPAM ``dataDir`` of the node (in place of /var/lib/cni/networks)."""
        return self.node_dir(node) / "cni-ipam"

    def cni_cache_dir(self, node: str) -> Path:
        """Cached ADD results (in place of /var/lib/cni/results), used for DEL."""
        return self.node_dir(node) / "cni-cache"

    def agent_socket(self, node: str) -> Path:
        """Unix socket of the node's CNI agent (``agentSocket`` in the conflist)."""
        return self.node_dir(node) / "agent.sock"

    def zds_socket(self, node: str) -> Path:
        """The node's ZDS socket (in place of /var/run/ztunnel/ztunnel.sock)."""
        return self.node_dir(node) / "ztunnel.sock"

    def agent_log(self, node: str) -> Path:
        """The log file of the node's CNI agent (JSON lines)."""
        return self.logs_dir / f"agent.{node}.log"


# --------------------------------------------------------------------------- JSON codec


class _Bad(Exception):
    pass


def _get(doc: Mapping[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    if key not in doc:
        if optional:
            return None
        raise _Bad(f"missing field {key!r}")
    value = doc[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Bad(f"field {key!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _get_map(doc: Mapping[str, Any], key: str) -> FrozenMap:
    value = doc.get(key, {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _Bad(f"field {key!r} must be an object of strings")
    return FrozenMap(value)


def _header(kind: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind}


def encode(obj: Node | Namespace | Pod | Service) -> dict[str, Any]:
    """The JSON document of a registry object."""
    doc = _header(type(obj).__name__)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, FrozenMap):
            value = dict(value)
        elif f.name == "ports":
            value = [dataclasses.asdict(p) for p in value]
        doc[f.name] = value
    return doc


def _decode_node(doc: Mapping[str, Any]) -> Node:
    return Node(
        name=_get(doc, "name", str),
        underlay_ip=_get(doc, "underlay_ip", str),
        pod_cidr=_get(doc, "pod_cidr", str),
        netns=_get(doc, "netns", str),
        labels=_get_map(doc, "labels"),
    )


def _decode_namespace(doc: Mapping[str, Any]) -> Namespace:
    return Namespace(name=_get(doc, "name", str), labels=_get_map(doc, "labels"))


def _decode_pod(doc: Mapping[str, Any]) -> Pod:
    return Pod(
        namespace=_get(doc, "namespace", str),
        name=_get(doc, "name", str),
        uid=_get(doc, "uid", str),
        node=_get(doc, "node", str),
        ip=_get(doc, "ip", str, optional=True),
        service_account=_get(doc, "service_account", str),
        labels=_get_map(doc, "labels"),
        annotations=_get_map(doc, "annotations"),
        netns=_get(doc, "netns", str),
        container_id=_get(doc, "container_id", str),
        phase=_get(doc, "phase", str),
    )


def _decode_service(doc: Mapping[str, Any]) -> Service:
    ports = []
    for raw in _get(doc, "ports", list):
        if not isinstance(raw, dict):
            raise _Bad("each of 'ports' must be an object")
        ports.append(
            ServicePort(
                port=_get(raw, "port", int),
                target_port=_get(raw, "target_port", int),
                protocol=_get(raw, "protocol", str),
                name=_get(raw, "name", str, optional=True) or "",
            )
        )
    return Service(
        namespace=_get(doc, "namespace", str),
        name=_get(doc, "name", str),
        hostname=_get(doc, "hostname", str),
        vip=_get(doc, "vip", str),
        ports=tuple(ports),
        selector=_get_map(doc, "selector"),
    )


def encode_config(config: LabConfig) -> dict[str, Any]:
    doc = _header("Lab")
    doc.update(dataclasses.asdict(config))
    doc["created_dirs"] = list(config.created_dirs)
    return doc


def _decode_mesh(doc: Mapping[str, Any]) -> bool:
    mesh = _get(doc, "mesh", bool, optional=True)
    if mesh is None:  # a lab made before node agents were part of it
        return bool(_get(doc, "underpass_cni", bool, optional=True))
    return bool(mesh)


def _decode_config(doc: Mapping[str, Any]) -> LabConfig:
    dirs = _get(doc, "created_dirs", list)
    if not all(isinstance(d, str) for d in dirs):
        raise _Bad("field 'created_dirs' must be a list of strings")
    return LabConfig(
        prefix=_get(doc, "prefix", str),
        underlay_cidr=_get(doc, "underlay_cidr", str),
        cluster_cidr=_get(doc, "cluster_cidr", str),
        service_cidr=_get(doc, "service_cidr", str),
        fabric_netns=_get(doc, "fabric_netns", str),
        fabric_ip=_get(doc, "fabric_ip", str),
        host_link=_get(doc, "host_link", bool),
        host_ifname=_get(doc, "host_ifname", str, optional=True),
        host_ip=_get(doc, "host_ip", str, optional=True),
        mesh=_decode_mesh(doc),
        cni_bin_dir=_get(doc, "cni_bin_dir", str),
        created_dirs=tuple(dirs),
    )


_Obj = TypeVar("_Obj", Node, Namespace, Pod, Service)
_DECODERS: Final[dict[str, tuple[str, Callable[[Mapping[str, Any]], Any]]]] = {
    "nodes": ("Node", _decode_node),
    "namespaces": ("Namespace", _decode_namespace),
    "pods": ("Pod", _decode_pod),
    "services": ("Service", _decode_service),
}


def _key_of(obj: Node | Namespace | Pod | Service) -> str:
    if isinstance(obj, Pod | Service):
        return f"{obj.namespace}.{obj.name}"
    return obj.name


def _kind_dir(obj: Node | Namespace | Pod | Service) -> str:
    return {Node: "nodes", Namespace: "namespaces", Pod: "pods", Service: "services"}[type(obj)]


def write_json_atomic(path: Path, doc: Any) -> None:
    """Write ``doc`` to ``path`` by rename, so that readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    data = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------- registry


class LabRegistry:
    """Read and write the lab's cluster state (see the module docstring for the format).

    All methods are synchronous and fast (a few small files under a flock); a
    trio caller that must never block behind a writer can use
    ``trio.to_thread.run_sync``. ``watch()`` is the async, event-driven reader.
    """

    def __init__(self, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        self.state_dir = Path(state_dir)
        self.paths = LabPaths(self.state_dir)
        self._mutex = threading.RLock()
        self._depth = 0
        self._lock_fd = -1
        self._exclusive = False
        self._dirty = False

    def __repr__(self) -> str:
        return f"LabRegistry({str(self.state_dir)!r})"

    # ---- set-up

    def exists(self) -> bool:
        return (self.paths.objects / "pods").is_dir()

    def initialize(self) -> list[Path]:
        """Create the state directory layout; return the directories it created."""
        created: list[Path] = []
        missing = []
        for parent in [self.state_dir, *self.state_dir.parents]:
            if parent.exists():
                break
            missing.append(parent)
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o755)
                created.append(path)
        for kind in _KINDS:
            (self.paths.objects / kind).mkdir(parents=True, exist_ok=True)
        return created

    def _require(self) -> None:
        if not self.exists():
            raise LabStateError(
                f"no lab state at {self.state_dir}: run `underpass lab up` first "
                f"(or pass --state-dir / set ${STATE_DIR_ENV})"
            )

    # ---- locking

    @contextlib.contextmanager
    def transaction(self) -> Iterator[LabRegistry]:
        """Group writes: one exclusive lock, one generation bump, one watch event."""
        with self._locked(exclusive=True):
            yield self

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                self._acquire(exclusive)
            elif exclusive and not self._exclusive:
                raise RuntimeError("registry write inside a read-only section")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._release()

    def _acquire(self, exclusive: bool) -> None:
        self._require()
        lock_path = self.state_dir / _LOCK
        while True:
            try:
                # read-only: flock does not need write access, and closing a read-only
                # descriptor wakes no inotify watcher (IN_CLOSE_WRITE)
                fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                self._require()
                raise
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            # `lab down` may have removed the state dir (and the lock file) while we
            # waited: then this lock protects nothing, start again on the new file.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            self._require()
        self._lock_fd = fd
        self._exclusive = exclusive
        self._dirty = False

    def _release(self) -> None:
        try:
            if self._exclusive and self._dirty:
                self._bump_generation()
        finally:
            self._dirty = False
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)  # closing the last descriptor releases the flock

    def _bump_generation(self) -> None:
        write_json_atomic(self.state_dir / _GENERATION, self._read_generation() + 1)

    def _read_generation(self) -> int:
        path = self.state_dir / _GENERATION
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self._corrupt(path, f"not JSON ({exc})") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._corrupt(path, "not an integer")
        return value

    # ---- file I/O

    def _corrupt(self, path: Path, reason: str) -> LabStateError:
        return LabStateError(
            f"corrupt lab state file {path}: {reason}. Fix or remove the file, "
            "or reset the lab with `underpass lab down` and `underpass lab up`"
        )

    def _load(self, path: Path, kind: str) -> Any:
        """Decode one object file; None if it does not exist."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LabStateError(f"cannot read lab state file {path}: {exc}") from exc
        expected_kind, decoder = _DECODERS[kind]
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise _Bad("not a JSON object")
            if doc.get("apiVersion") != API_VERSION or doc.get("kind") != expected_kind:
                raise _Bad(
                    f"expected apiVersion {API_VERSION} kind {expected_kind}, got "
                    f"{doc.get('apiVersion')!r} {doc.get('kind')!r}"
                )
            obj = decoder(doc)
        except json.JSONDecodeError as exc:
            raise self._corrupt(path, f"not JSON ({exc})") from None
        except (_Bad, InvalidObject) as exc:
            raise self._corrupt(path, str(exc)) from None
        if f"{_key_of(obj)}.json" != path.name:
            raise self._corrupt(path, f"holds {expected_kind} {_key_of(obj)!r}, not its file name")
        return obj

    def _load_all(self, kind: str) -> list[Any]:
        directory = self.paths.objects / kind
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            raise LabStateError(f"lab state directory {directory} is missing") from None
        objs = []
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue  # temporary files of a writer in progress
            obj = self._load(directory / name, kind)
            if obj is not None:  # removed between listdir and open
                objs.append(obj)
        return objs

    def _get(self, kind: str, key: str) -> Any:
        with self._locked(exclusive=False):
            return self._load(self.paths.objects / kind / f"{key}.json", kind)

    def _put(self, obj: _Obj) -> bool:
        kind = _kind_dir(obj)
        path = self.paths.objects / kind / f"{_key_of(obj)}.json"
        if len(path.name) > 255:
            raise InvalidObject(f"name too long for the lab: {_key_of(obj)!r}")
        with self._locked(exclusive=True):
            if self._load(path, kind) == obj:
                return False
            write_json_atomic(path, encode(obj))
            self._dirty = True
            return True

    def _remove(self, kind: str, key: str) -> bool:
        with self._locked(exclusive=True):
            try:
                (self.paths.objects / kind / f"{key}.json").unlink()
            except FileNotFoundError:
                return False
            self._dirty = True
            return True

    # ---- lab settings

    def config(self) -> LabConfig | None:
        """The lab's settings, or None before the first ``lab up``."""
        path = self.paths.lab_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("kind") != "Lab":
                raise _Bad("not a Lab document")
            return _decode_config(doc)
        except json.JSONDecodeError as exc:
            raise self._corrupt(path, f"not JSON ({exc})") from None
        except _Bad as exc:
            raise self._corrupt(path, str(exc)) from None

    def write_config(self, config: LabConfig) -> None:
        with self._locked(exclusive=True):
            if self.config() != config:
                write_json_atomic(self.paths.lab_file, encode_config(config))
                self._dirty = True

    # ---- readers

    def snapshot(self) -> Snapshot:
        """Everything, consistently (under the shared lock)."""
        with self._locked(exclusive=False):
            generation = self._read_generation()
            nodes = {n.name: n for n in self._load_all("nodes")}
            namespaces = {n.name: n for n in self._load_all("namespaces")}
            pods = {p.key: p for p in self._load_all("pods")}
            services = {s.key: s for s in self._load_all("services")}
        return Snapshot(nodes, namespaces, pods, services, generation)

    @property
    def generation(self) -> int:
        with self._locked(exclusive=False):
            return self._read_generation()

    def node(self, name: str) -> Node | None:
        node: Node | None = self._get("nodes", name)
        return node

    def namespace(self, name: str) -> Namespace | None:
        ns: Namespace | None = self._get("namespaces", name)
        return ns

    def pod(self, namespace: str, name: str) -> Pod | None:
        pod: Pod | None = self._get("pods", f"{namespace}.{name}")
        return pod

    def service(self, namespace: str, name: str) -> Service | None:
        svc: Service | None = self._get("services", f"{namespace}.{name}")
        return svc

    def pods(self) -> list[Pod]:
        with self._locked(exclusive=False):
            pods: list[Pod] = self._load_all("pods")
            return pods

    def pod_by_uid(self, uid: str) -> Pod | None:
        return next((p for p in self.pods() if p.uid == uid), None)

    def has_running_pod(self, node: str, namespace: str, service_account: str) -> bool:
        """The CA's NodeIndex check: does ``node`` run a live pod with this identity?

        Live means Pending or Running, not Failed: a pod is Pending while its CNI
        ADD runs, which is exactly when its node's ztunnel asks for its
        certificate (as the kubelet's pod is, on Kubernetes).
        """
        return any(
            p.node == node
            and p.namespace == namespace
            and p.service_account == service_account
            and p.phase in ("Pending", "Running")
            for p in self.pods()
        )

    # ---- writers (the lab CLI; node agents use set_pod_annotations)

    def upsert_node(self, node: Node) -> bool:
        """Create or replace; returns whether anything changed."""
        return self._put(node)

    def upsert_namespace(self, namespace: Namespace) -> bool:
        return self._put(namespace)

    def upsert_pod(self, pod: Pod) -> bool:
        return self._put(pod)

    def upsert_service(self, service: Service) -> bool:
        return self._put(service)

    def delete_node(self, name: str) -> bool:
        return self._remove("nodes", name)

    def delete_namespace(self, name: str) -> bool:
        return self._remove("namespaces", name)

    def delete_pod(self, namespace: str, name: str) -> bool:
        return self._remove("pods", f"{namespace}.{name}")

    def delete_service(self, namespace: str, name: str) -> bool:
        return self._remove("services", f"{namespace}.{name}")

    def update_pod(self, namespace: str, name: str, change: Callable[[Pod], Pod]) -> Pod:
        """Read-modify-write one pod under the exclusive lock (no lost updates)."""
        with self._locked(exclusive=True):
            pod = self.pod(namespace, name)
            if pod is None:
                raise ObjectNotFound(f"pod {namespace}/{name} not found")
            new = change(pod)
            if new.key != pod.key:
                raise InvalidObject("update_pod cannot rename a pod")
            self._put(new)
            return new

    def set_pod_status(
        self, namespace: str, name: str, *, phase: str, ip: str | None = None
    ) -> Pod:
        """Record the pod's phase and IP, keeping labels and annotations set meanwhile."""
        return self.update_pod(
            namespace, name, lambda p: dataclasses.replace(p, phase=phase, ip=ip)
        )

    def set_pod_annotations(self, uid: str, changes: Mapping[str, str | None]) -> Pod:
        """Apply annotation changes to the pod with ``uid``; a None value deletes the key."""
        with self._locked(exclusive=True):
            pod = self.pod_by_uid(uid)
            if pod is None:
                raise ObjectNotFound(f"no pod with uid {uid} in the lab at {self.state_dir}")
            annotations = FrozenMap(pod.annotations).updated(changes)
            return self.update_pod(
                pod.namespace, pod.name, lambda p: dataclasses.replace(p, annotations=annotations)
            )

    def set_pod_labels(self, namespace: str, name: str, changes: Mapping[str, str | None]) -> Pod:
        return self.update_pod(
            namespace,
            name,
            lambda p: dataclasses.replace(p, labels=FrozenMap(p.labels).updated(changes)),
        )

    def set_namespace_labels(self, name: str, changes: Mapping[str, str | None]) -> Namespace:
        """Apply label changes (what ``kubectl label namespace`` does); None deletes."""
        with self._locked(exclusive=True):
            ns = self.namespace(name)
            if ns is None:
                raise ObjectNotFound(f"namespace {name} not found")
            new = dataclasses.replace(ns, labels=FrozenMap(ns.labels).updated(changes))
            self._put(new)
            return new

    def set_node_labels(self, name: str, changes: Mapping[str, str | None]) -> Node:
        with self._locked(exclusive=True):
            node = self.node(name)
            if node is None:
                raise ObjectNotFound(f"node {name} not found")
            new = dataclasses.replace(node, labels=FrozenMap(node.labels).updated(changes))
            self._put(new)
            return new

    # ---- watch

    async def until(self, predicate: Callable[[Snapshot], bool]) -> Snapshot:
        """The first snapshot, now or after a change, for which ``predicate`` holds.

        Event-driven (:meth:`watch`); the caller bounds the wait (``trio.fail_after``).
        """
        async with contextlib.aclosing(self.watch()) as snapshots:
            async for snap in snapshots:
                if predicate(snap):
                    return snap
        raise LabStateError(f"lab state directory {self.state_dir} went away")  # pragma: no cover

    async def watch(self) -> AsyncGenerator[Snapshot, None]:
        """Yield the current snapshot, then a new one after each change.

        Event-driven: sleeps on an inotify descriptor until a writer renames a
        new ``generation`` file into place; changes made while the consumer is
        busy are coalesced into the next snapshot. Raises :class:`LabStateError`
        if the state directory goes away (``lab down``).
        """
        self._require()
        with inotify.Inotify() as ino:
            ino.add_watch(
                self.state_dir,
                inotify.IN_MOVED_TO  # writers rename a new `generation` into place
                | inotify.IN_DELETE_SELF
                | inotify.IN_MOVE_SELF
                | inotify.IN_ONLYDIR,
            )
            snap = self.snapshot()  # after add_watch: no change can slip between
            last = snap.generation
            yield snap
            while True:
                events = await ino.read_events()
                gone = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_IGNORED
                if any(e.mask & gone for e in events):
                    raise LabStateError(f"lab state directory {self.state_dir} went away")
                if not any(e.name == _GENERATION or e.mask & inotify.IN_Q_OVERFLOW for e in events):
                    continue
                snap = self.snapshot()
                if snap.generation != last:
                    last = snap.generation
                    yield snap
