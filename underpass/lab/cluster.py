"""Building and tearing down the lab cluster (what ``underpass lab ...`` does).

Owns the lab's topology and its life cycle:

- the fabric: netns ``<prefix>-fabric`` holding bridge ``fabric0`` (the
  underlay, default 172.30.0.0/24, the bridge itself at .1 so that a control
  plane run there is reachable from every node);
- nodes: netns ``<prefix>-node-<i>``, ``eth0`` = a veth to the fabric at
  .(10+i), forwarding on, a route to every other node's pod CIDR
  (10.244.<i>.0/24) via that node's underlay address, and its CNI conflist;
- the mesh (on unless ``--no-mesh``): one node agent per node
  (:mod:`underpass.lab.agents`), running and answering before any pod's CNI
  ADD, and ``underpass-cni`` at the end of every node's chain;
- pods: netns ``<prefix>-pod-<namespace>.<name>``, recorded in the registry
  (Pending) *before* the CNI ADD, as a kubelet does, so the CNI chain can look
  the pod up; Running with its IP after; the sample app started inside;
- optionally (``host_link``) a veth from the root netns to the fabric; it is
  the only thing the lab ever puts in the root netns, and ``down`` removes it;
- ``down``: stop processes (apps, agents), CNI DEL every pod, delete every
  netns and link, remove the state directory.

Every step is idempotent: ``up`` twice changes nothing the second time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from underpass.lab import agents, mesh, netns, procs
from underpass.lab.cni_runner import (
    LOOPBACK_CONFLIST,
    CniRunner,
    Sandbox,
    build_conflist,
    cni_path,
    find_underpass_cni,
    pod_ip,
)
from underpass.lab.errors import CniError, LabError, LabStateError, NetnsError, ObjectNotFound
from underpass.lab.registry import (
    FrozenMap,
    LabConfig,
    LabRegistry,
    Namespace,
    Node,
    Pod,
    Service,
    ServicePort,
    encode,
    validate_dns_label,
    validate_dns_subdomain,
    validate_label_key,
    validate_label_value,
    write_json_atomic,
)
from underpass.lab.sampleapp import HTTP_PORT, TCP_PORT

DEFAULT_PREFIX: Final = "underpass"
DEFAULT_UNDERLAY_CIDR: Final = "172.30.0.0/24"
DEFAULT_CLUSTER_CIDR: Final = "10.244.0.0/16"
DEFAULT_SERVICE_CIDR: Final = "10.96.0.0/16"
FABRIC_BRIDGE: Final = "fabric0"
HOST_PEER: Final = "host0"
NODE_UPLINK: Final = "eth0"
POD_IFNAME: Final = "eth0"
APP_NAME: Final = "echo"
APP_LABEL: Final = "app"
PARALLEL_PODS: Final = 8
_PREFIX = re.compile(r"^[a-z][a-z0-9-]{0,19}$")

log = structlog.get_logger("underpass.lab")


# --------------------------------------------------------------------------- names


def fabric_netns_name(prefix: str) -> str:
    return f"{prefix}-fabric"


def node_netns_name(prefix: str, node: str) -> str:
    return f"{prefix}-{node}"


def pod_netns_name(prefix: str, namespace: str, name: str) -> str:
    # namespace names never contain '.', so the first '.' splits unambiguously
    return f"{prefix}-pod-{namespace}.{name}"


def lab_netns_names(prefix: str, names: Sequence[str]) -> list[str]:
    """Of ``names``, those the lab with ``prefix`` would have made."""
    return [
        n
        for n in names
        if n == fabric_netns_name(prefix)
        or n.startswith(f"{prefix}-node-")
        or n.startswith(f"{prefix}-pod-")
    ]


def leftovers(prefix: str, state_dir: Path) -> list[str]:
    """What of the lab (``prefix``, ``state_dir``) is still on this machine: network
    namespaces, the root link, processes, the state directory. Empty after ``down``."""
    left = [f"netns {n}" for n in netns.list_names() if n.startswith(f"{prefix}-")]
    with netns.ipr(None) as root:
        if _index(root, host_ifname(prefix)) is not None:
            left.append(f"root link {host_ifname(prefix)}")
    pids = set(procs.processes_mentioning(f"lab={prefix}"))
    pids |= set(procs.processes_mentioning(str(state_dir)))
    left += [f"process {pid}" for pid in sorted(pids)]
    if state_dir.exists():
        left.append(f"state dir {state_dir}")
    return left


def host_ifname(prefix: str) -> str:
    """Root-side veth name: unique per prefix and within IFNAMSIZ (15)."""
    return "uph" + hashlib.sha256(prefix.encode()).hexdigest()[:8]


def fabric_port(node: str) -> str:
    name = f"f-{node}"
    if len(name) > 15:
        raise LabError(f"node name {node!r} too long for an interface name (max 13 characters)")
    return name


def app_key(namespace: str, name: str) -> str:
    return f"app.{namespace}.{name}"


def _netns_basename(path: str) -> str:
    return os.path.basename(path)


# --------------------------------------------------------------------------- options / reports


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    node: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UpOptions:
    nodes: int = 2
    pods_per_node: int = 2
    namespaces: tuple[str, ...] = ("default",)
    service_accounts: tuple[str, ...] = ("default",)
    prefix: str | None = None
    underlay_cidr: str | None = None
    cluster_cidr: str | None = None
    service_cidr: str | None = None
    host_link: bool | None = None
    mesh: bool | None = None  # None: on for a new lab, unchanged for an existing one
    apps: bool = True
    services: bool = True


@dataclass
class PodOutcome:
    pod: Pod
    action: str  # created | repaired | unchanged | failed
    cni_add_ms: float | None = None  # loopback + main network, as a runtime's sandbox setup
    cni_chain_ms: float | None = None  # the node's conflist alone
    app: str = "none"  # started | running | none
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **pod_dict(self.pod),
            "action": self.action,
            "cni_add_ms": self.cni_add_ms,
            "cni_chain_ms": self.cni_chain_ms,
            "app": self.app,
            "error": self.error,
        }


def obj_dict(obj: Node | Namespace | Pod | Service) -> dict[str, Any]:
    doc = encode(obj)
    doc.pop("apiVersion")
    doc.pop("kind")
    return doc


def pod_dict(pod: Pod) -> dict[str, Any]:
    return {**obj_dict(pod), "enrolled": pod.enrolled}


def parse_label_args(args: Sequence[str]) -> dict[str, str | None]:
    """``key=value`` sets, ``key-`` removes (kubectl label syntax)."""
    changes: dict[str, str | None] = {}
    for arg in args:
        if "=" in arg:
            key, value = arg.split("=", 1)
            validate_label_value(validate_label_key(key), value)
            changes[key] = value
        elif arg.endswith("-") and len(arg) > 1:
            changes[validate_label_key(arg[:-1])] = None
        else:
            raise LabError(f"invalid label argument {arg!r}: use key=value or key-")
    if not changes:
        raise LabError("no labels given: use key=value or key-")
    return changes


# --------------------------------------------------------------------------- netlink helpers


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _must_index(ipr: Any, ifname: str) -> int:
    index = _index(ipr, ifname)
    if index is None:
        raise NetnsError(f"interface {ifname} vanished while the lab was configuring it")
    return index


def _add_addr(ipr: Any, index: int, address: str, prefixlen: int) -> None:
    from pyroute2 import NetlinkError

    try:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
    except NetlinkError as exc:
        if exc.code != 17:  # EEXIST: already there
            raise


def _lo_up(ipr: Any) -> None:
    ipr.link("set", index=_must_index(ipr, "lo"), state="up")


# --------------------------------------------------------------------------- the lab


class Lab:
    """One lab, identified by its state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.registry = LabRegistry(state_dir)
        self.paths = self.registry.paths

    @property
    def state_dir(self) -> Path:
        return self.registry.state_dir

    def config(self) -> LabConfig:
        cfg = self.registry.config() if self.state_dir.exists() else None
        if cfg is None:
            raise LabStateError(
                f"no lab at {self.state_dir}: run `underpass lab up` first (or pass --state-dir)"
            )
        return cfg

    # ---- configuration

    def _resolve_config(self, opts: UpOptions) -> LabConfig:
        existing = self.registry.config() if self.state_dir.exists() else None
        if existing is not None:
            asked = {
                "prefix": opts.prefix,
                "underlay_cidr": opts.underlay_cidr,
                "cluster_cidr": opts.cluster_cidr,
                "service_cidr": opts.service_cidr,
                "host_link": opts.host_link,
                "mesh": opts.mesh,
            }
            for key, value in asked.items():
                if value is not None and getattr(existing, key) != value:
                    raise LabError(
                        f"the lab at {self.state_dir} is up with {key}={getattr(existing, key)}, "
                        f"not {value}: run `underpass lab down --state-dir {self.state_dir}` "
                        "first, or use another --state-dir"
                    )
            return existing
        prefix = opts.prefix or DEFAULT_PREFIX
        if not _PREFIX.match(prefix):
            raise LabError(
                f"invalid prefix {prefix!r}: a lower-case letter, then letters, digits or '-' "
                "(at most 20 characters)"
            )
        if netns.exists(fabric_netns_name(prefix)):
            raise LabError(
                f"network namespace {fabric_netns_name(prefix)} exists but {self.state_dir} "
                "holds no lab: another lab uses this prefix. Use its --state-dir, another "
                f"--prefix, or clean it up with `underpass lab down --prefix {prefix}`"
            )
        underlay = _ipv4_net("underlay CIDR", opts.underlay_cidr or DEFAULT_UNDERLAY_CIDR)
        cluster = _ipv4_net("cluster CIDR", opts.cluster_cidr or DEFAULT_CLUSTER_CIDR)
        service = _ipv4_net("service CIDR", opts.service_cidr or DEFAULT_SERVICE_CIDR)
        if cluster.prefixlen > 23:
            raise LabError(f"cluster CIDR {cluster} too small: it is split into a /24 per node")
        if underlay.prefixlen > 27:
            raise LabError(f"underlay CIDR {underlay} too small: nodes start at .11")
        nets = [underlay, cluster, service]
        for a in nets:
            for b in nets:
                if a is not b and a.overlaps(b):
                    raise LabError(f"CIDRs {a} and {b} overlap")
        host_link = bool(opts.host_link)
        return LabConfig(
            prefix=prefix,
            underlay_cidr=str(underlay),
            cluster_cidr=str(cluster),
            service_cidr=str(service),
            fabric_netns=netns.path_of(fabric_netns_name(prefix)),
            fabric_ip=str(underlay.network_address + 1),
            host_link=host_link,
            host_ifname=host_ifname(prefix) if host_link else None,
            host_ip=str(underlay.broadcast_address - 1) if host_link else None,
            mesh=opts.mesh is not False,
        )

    def _check_capacity(self, cfg: LabConfig, nodes: int) -> None:
        underlay = _ipv4_net("underlay CIDR", cfg.underlay_cidr)
        last = underlay.network_address + 10 + nodes
        limit = underlay.broadcast_address - (2 if cfg.host_link else 1)
        if nodes < 1 or last > limit:
            raise LabError(f"{nodes} nodes do not fit the underlay {underlay} (nodes at .11 up)")
        cluster = ipaddress.ip_network(cfg.cluster_cidr)
        if nodes >= 2 ** (24 - cluster.prefixlen):
            raise LabError(f"{nodes} nodes do not fit the cluster CIDR {cluster} (a /24 each)")

    # ---- up

    async def up(self, opts: UpOptions) -> dict[str, Any]:
        """Bring the lab to (at least) the asked shape; idempotent."""
        started = time.perf_counter()
        for ns in opts.namespaces:
            validate_dns_label("namespace", ns)
        for sa in opts.service_accounts:
            validate_dns_subdomain("service account", sa)
        if opts.pods_per_node < 0:
            raise LabError("--pods-per-node must be 0 or more")
        cfg = self._resolve_config(opts)
        self._check_capacity(cfg, opts.nodes)
        if cfg.mesh and find_underpass_cni() is None:
            raise LabError(
                "the mesh needs underpass-cni in the CNI chain but no `underpass-cni` "
                f"executable is beside {sys.executable} or on PATH: install the package "
                "(pip install -e .), or run the lab without the mesh (--no-mesh)"
            )
        if not self.registry.exists() or self.registry.config() is None:
            created = self.registry.initialize()
            cfg = dataclasses.replace(cfg, created_dirs=tuple(str(p) for p in created))
        self.registry.write_config(cfg)
        log.info(
            "lab.up",
            prefix=cfg.prefix,
            state_dir=str(self.state_dir),
            nodes=opts.nodes,
            pods_per_node=opts.pods_per_node,
        )

        self._ensure_fabric(cfg)
        for index in range(1, opts.nodes + 1):
            self._ensure_node(cfg, index)
        nodes = sorted(self.registry.snapshot().nodes.values(), key=lambda n: n.name)
        self._ensure_routes(cfg, nodes)
        if cfg.host_link:
            self._ensure_host_link(cfg, nodes)
        for node in nodes:
            self._write_conflist(cfg, node)
        for ns in opts.namespaces:
            if self.registry.namespace(ns) is None:
                self.registry.upsert_namespace(Namespace(ns, {"kubernetes.io/metadata.name": ns}))
        if opts.services:
            for ns in opts.namespaces:
                self._ensure_service(cfg, ns)
        agent_actions = await self._ensure_agents(cfg, nodes) if cfg.mesh else {}
        mesh_actions = await self._ensure_mesh(cfg, nodes) if cfg.mesh else {}
        specs = self._plan_pods(opts)
        outcomes = await self._ensure_pods(cfg, specs, apps=opts.apps)
        seconds = time.perf_counter() - started
        failed = [o for o in outcomes if o.action == "failed"]
        added = [o.cni_add_ms for o in outcomes if o.cni_add_ms is not None]
        report = {
            "lab": _config_dict(cfg, self.state_dir),
            "nodes": [obj_dict(n) for n in nodes],
            "agents": agent_actions,
            "mesh": mesh_actions,
            "pods": [o.to_dict() for o in outcomes],
            "seconds": round(seconds, 3),
            "cni_add_ms_mean": round(sum(added) / len(added), 1) if added else None,
            "generation": self.registry.generation,
        }
        log.info(
            "lab.up.done",
            seconds=round(seconds, 3),
            pods=len(outcomes),
            created=sum(o.action in ("created", "repaired") for o in outcomes),
            failed=len(failed),
        )
        if failed:
            raise LabError(
                "some pods failed: "
                + "; ".join(f"{o.pod.namespace}/{o.pod.name}: {o.error}" for o in failed)
            )
        return report

    def _plan_pods(self, opts: UpOptions) -> list[PodSpec]:
        specs = []
        k = 0
        for i in range(1, opts.nodes + 1):
            for j in range(1, opts.pods_per_node + 1):
                ns = opts.namespaces[k % len(opts.namespaces)]
                sa = opts.service_accounts[(k // len(opts.namespaces)) % len(opts.service_accounts)]
                specs.append(
                    PodSpec(ns, f"{APP_NAME}-{i}-{j}", f"node-{i}", sa, {APP_LABEL: APP_NAME})
                )
                k += 1
        return specs

    def _ensure_fabric(self, cfg: LabConfig) -> None:
        name = _netns_basename(cfg.fabric_netns)
        if netns.create(name):
            log.info("lab.fabric.created", netns=name)
        prefixlen = ipaddress.ip_network(cfg.underlay_cidr).prefixlen
        with netns.ipr(name) as ipr:
            _lo_up(ipr)
            if _index(ipr, FABRIC_BRIDGE) is None:
                ipr.link("add", ifname=FABRIC_BRIDGE, kind="bridge")
            index = _must_index(ipr, FABRIC_BRIDGE)
            _add_addr(ipr, index, cfg.fabric_ip, prefixlen)
            ipr.link("set", index=index, state="up")

    def _ensure_node(self, cfg: LabConfig, index: int) -> Node:
        name = f"node-{index}"
        ns_name = node_netns_name(cfg.prefix, name)
        fabric = _netns_basename(cfg.fabric_netns)
        port = fabric_port(name)
        created = netns.create(ns_name)
        underlay_ip = cfg.node_ip(index)
        prefixlen = ipaddress.ip_network(cfg.underlay_cidr).prefixlen
        with netns.ipr(ns_name) as nipr, netns.ipr(fabric) as fipr:
            _lo_up(nipr)
            uplink, fport = _index(nipr, NODE_UPLINK), _index(fipr, port)
            if uplink is None or fport is None:
                if fport is not None:
                    fipr.link("del", index=fport)
                if uplink is not None:
                    nipr.link("del", index=uplink)
                fipr.link(
                    "add",
                    ifname=port,
                    kind="veth",
                    peer={"ifname": NODE_UPLINK, "net_ns_fd": ns_name},
                )
                uplink, fport = _must_index(nipr, NODE_UPLINK), _must_index(fipr, port)
            fipr.link("set", index=fport, master=_must_index(fipr, FABRIC_BRIDGE), state="up")
            _add_addr(nipr, uplink, underlay_ip, prefixlen)
            nipr.link("set", index=uplink, state="up")
        netns.set_sysctl(ns_name, "net.ipv4.ip_forward", "1")
        current = self.registry.node(name)
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
        if current is not None:
            labels = {**labels, **current.labels}  # keep labels set with `lab label node`
        node = Node(name, underlay_ip, cfg.pod_cidr(index), netns.path_of(ns_name), labels)
        if self.registry.upsert_node(node) or created:
            log.info("lab.node.ready", node=name, underlay_ip=underlay_ip, pod_cidr=node.pod_cidr)
        return node

    def _ensure_routes(self, cfg: LabConfig, nodes: Sequence[Node]) -> None:
        """Every node (and the fabric) routes each pod CIDR via its node's underlay IP."""
        targets = [(_netns_basename(n.netns), n.name) for n in nodes]
        targets.append((_netns_basename(cfg.fabric_netns), ""))
        for ns_name, self_name in targets:
            with netns.ipr(ns_name) as ipr:
                for other in nodes:
                    if other.name != self_name:
                        ipr.route("replace", dst=other.pod_cidr, gateway=other.underlay_ip)

    def _ensure_host_link(self, cfg: LabConfig, nodes: Sequence[Node]) -> None:
        """The opt-in root-netns veth to the fabric, with routes to the pod CIDRs."""
        assert cfg.host_ifname and cfg.host_ip  # set together by _resolve_config
        fabric = _netns_basename(cfg.fabric_netns)
        prefixlen = ipaddress.ip_network(cfg.underlay_cidr).prefixlen
        with netns.ipr(None) as root, netns.ipr(fabric) as fipr:
            index = _index(root, cfg.host_ifname)
            if index is None:
                self._check_root_routes(root, cfg, nodes)
                if _index(fipr, HOST_PEER) is not None:
                    fipr.link("del", index=_index(fipr, HOST_PEER))
                root.link(
                    "add",
                    ifname=cfg.host_ifname,
                    kind="veth",
                    peer={"ifname": HOST_PEER, "net_ns_fd": fabric},
                )
                index = _must_index(root, cfg.host_ifname)
                log.info("lab.host_link.created", ifname=cfg.host_ifname, ip=cfg.host_ip)
            fipr.link(
                "set",
                index=_must_index(fipr, HOST_PEER),
                master=_must_index(fipr, FABRIC_BRIDGE),
                state="up",
            )
            _add_addr(root, index, cfg.host_ip, prefixlen)
            root.link("set", index=index, state="up")
            for node in nodes:
                root.route("replace", dst=node.pod_cidr, gateway=node.underlay_ip, oif=index)

    def _check_root_routes(self, root: Any, cfg: LabConfig, nodes: Sequence[Node]) -> None:
        """Refuse to shadow routes the machine already has (another lab, a real cluster)."""
        wanted = [ipaddress.ip_network(cfg.underlay_cidr)] + [
            ipaddress.ip_network(n.pod_cidr) for n in nodes
        ]
        for route in root.get_routes(family=2):
            dst = route.get("dst")
            if not dst or not route.get("dst_len") or route.get("table") != 254:
                continue  # the default route and the local table never clash
            existing = ipaddress.ip_network(f"{dst}/{route.get('dst_len')}", strict=False)
            for net in wanted:
                if existing.overlaps(net):
                    raise LabError(
                        f"the root netns already routes {existing}, which overlaps {net}: "
                        "choose other --underlay-cidr / --cluster-cidr for a --host-link lab"
                    )

    def _write_conflist(self, cfg: LabConfig, node: Node) -> Path:
        conflist = build_conflist(
            pod_cidr=node.pod_cidr,
            ipam_dir=self.paths.ipam_dir(node.name),
            underpass_cni=cfg.mesh,
            agent_socket=self.paths.agent_socket(node.name),
            lab_registry=self.state_dir,
        )
        path = self.paths.conflist(node.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            current = None
        if current != conflist:
            write_json_atomic(path, conflist)
        return path

    def _read_conflist(self, node: str) -> dict[str, Any]:
        path = self.paths.conflist(node)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LabStateError(f"node {node} has no CNI config at {path}: run `lab up`") from None
        except ValueError as exc:
            raise LabStateError(f"corrupt CNI config {path}: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("plugins"), list):
            raise LabStateError(f"corrupt CNI config {path}: not a network configuration list")
        return doc

    def _ensure_service(self, cfg: LabConfig, namespace: str) -> None:
        if self.registry.service(namespace, APP_NAME) is not None:
            return
        with self.registry.transaction():
            used = {s.vip for s in self.registry.snapshot().services.values()}
            net = ipaddress.ip_network(cfg.service_cidr)
            vip = next(
                str(a)
                for a in net.hosts()
                if int(a) - int(net.network_address) >= 10 and str(a) not in used
            )
            self.registry.upsert_service(
                Service(
                    namespace=namespace,
                    name=APP_NAME,
                    hostname=f"{APP_NAME}.{namespace}.svc.cluster.local",
                    vip=vip,
                    ports=(
                        ServicePort(80, HTTP_PORT, "TCP", "http"),
                        ServicePort(TCP_PORT, TCP_PORT, "TCP", "tcp-echo"),
                    ),
                    selector={APP_LABEL: APP_NAME},
                )
            )

    # ---- node agents

    async def _ensure_agents(self, cfg: LabConfig, nodes: Sequence[Node]) -> dict[str, str]:
        """Every node's agent running and answering (in parallel); node -> action."""
        actions: dict[str, str] = {}
        errors: list[str] = []

        async def one(node: Node) -> None:
            try:
                runner = self._runner(cfg, node)
                conflist = self._read_conflist(node.name)
                actions[node.name] = await agents.ensure(self.paths, node, runner, conflist)
            except LabError as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(one, node)
        if errors:
            raise LabError("; ".join(sorted(errors)))
        return dict(sorted(actions.items()))

    # ---- pods

    def _runner(self, cfg: LabConfig, node: Node) -> CniRunner:
        return CniRunner(
            host_netns=_netns_basename(node.netns),
            cni_path=cni_path(Path(cfg.cni_bin_dir), find_underpass_cni()),
            cache_dir=self.paths.cni_cache_dir(node.name),
        )

    async def _ensure_pods(
        self, cfg: LabConfig, specs: Sequence[PodSpec], *, apps: bool
    ) -> list[PodOutcome]:
        outcomes: list[PodOutcome | None] = [None] * len(specs)
        limiter = trio.CapacityLimiter(PARALLEL_PODS)
        done = 0

        async def one(i: int, spec: PodSpec) -> None:
            nonlocal done
            async with limiter:
                outcomes[i] = await self._ensure_pod(cfg, spec, app=apps)
            done += 1
            outcome = outcomes[i]
            if outcome is not None and outcome.action != "unchanged":
                log.info(
                    "lab.pod",
                    progress=f"{done}/{len(specs)}",
                    pod=f"{spec.namespace}/{spec.name}",
                    node=spec.node,
                    ip=outcome.pod.ip,
                    action=outcome.action,
                    cni_add_ms=outcome.cni_add_ms,
                    app=outcome.app,
                )

        async with trio.open_nursery() as nursery:
            for i, spec in enumerate(specs):
                nursery.start_soon(one, i, spec)
        return [o for o in outcomes if o is not None]

    async def add_pod(self, spec: PodSpec, *, app: bool = True) -> PodOutcome:
        """Create a pod (CNI ADD) on ``spec.node``; a no-op if it already runs there."""
        cfg = self.config()
        validate_dns_label("namespace", spec.namespace)
        if self.registry.namespace(spec.namespace) is None:
            self.registry.upsert_namespace(
                Namespace(spec.namespace, {"kubernetes.io/metadata.name": spec.namespace})
            )
            log.info("lab.namespace.created", namespace=spec.namespace)
        outcome = await self._ensure_pod(cfg, spec, app=app)
        if outcome.action == "failed":
            hint = ""
            if cfg.mesh and not agents.state(self.paths, spec.node)["running"]:
                hint = (
                    f". The node agent of {spec.node} is not running: `underpass lab up "
                    f"--state-dir {self.state_dir}` starts it again"
                )
            raise LabError(f"pod {spec.namespace}/{spec.name}: {outcome.error}{hint}")
        return outcome

    async def _ensure_pod(self, cfg: LabConfig, spec: PodSpec, *, app: bool) -> PodOutcome:
        node = self.registry.node(spec.node)
        if node is None:
            raise ObjectNotFound(f"node {spec.node} not found in the lab at {self.state_dir}")
        existing = self.registry.pod(spec.namespace, spec.name)
        ns_name = pod_netns_name(cfg.prefix, spec.namespace, spec.name)
        if len(ns_name) > 255:
            raise LabError(f"pod name {spec.name!r} too long for the lab")
        action = "created"
        if existing is not None:
            if existing.node != spec.node:
                raise LabError(
                    f"pod {spec.namespace}/{spec.name} already exists on {existing.node}"
                )
            if self._healthy(cfg, node, existing):
                app_state = await self._ensure_app(existing) if app else "none"
                return PodOutcome(existing, "unchanged", app=app_state)
            # a broken sandbox (netns gone, ADD failed...): tear it down, start a new one
            log.info("lab.pod.repair", pod=f"{spec.namespace}/{spec.name}", phase=existing.phase)
            await self._teardown(cfg, existing, strict=False)
            action = "repaired"
        if netns.exists(ns_name):  # left over by an interrupted run
            netns.remove(ns_name)
        netns.create(ns_name)
        pod = Pod(
            namespace=spec.namespace,
            name=spec.name,
            uid=existing.uid if existing else str(uuid.uuid4()),
            node=spec.node,
            ip=None,
            service_account=spec.service_account,
            labels=FrozenMap(spec.labels),
            annotations=FrozenMap(),
            netns=netns.path_of(ns_name),
            container_id=secrets.token_hex(32),
            phase="Pending",
        )
        self.registry.upsert_pod(pod)  # visible before CNI ADD, as the kubelet's pod is
        sandbox = _sandbox(pod)
        runner = self._runner(cfg, node)
        try:
            t0 = time.perf_counter()
            await runner.add(LOOPBACK_CONFLIST, sandbox, "lo")
            t1 = time.perf_counter()
            result = await runner.add(self._read_conflist(node.name), sandbox, POD_IFNAME)
            t2 = time.perf_counter()
        except (CniError, NetnsError) as exc:
            log.error("lab.pod.cni_failed", pod=f"{pod.namespace}/{pod.name}", error=str(exc))
            pod = self.registry.set_pod_status(pod.namespace, pod.name, phase="Failed", ip=None)
            await self._teardown(cfg, pod, strict=False, keep_record=True)
            return PodOutcome(pod, "failed", error=str(exc))
        ip = pod_ip(result, POD_IFNAME)
        pod = self.registry.set_pod_status(pod.namespace, pod.name, phase="Running", ip=ip)
        outcome = PodOutcome(
            pod,
            action,
            cni_add_ms=round((t2 - t0) * 1000, 1),
            cni_chain_ms=round((t2 - t1) * 1000, 1),
        )
        if app:
            outcome.app = await self._ensure_app(pod)
        return outcome

    def _healthy(self, cfg: LabConfig, node: Node, pod: Pod) -> bool:
        """Running, its netns still there, and its CNI ADD result cached (so DEL works)."""
        if pod.phase != "Running" or not os.path.exists(pod.netns):
            return False
        network = str(self._read_conflist(node.name)["name"])
        conf, _ = self._runner(cfg, node).read_cache(network, _sandbox(pod), POD_IFNAME)
        return conf is not None

    async def _ensure_app(self, pod: Pod) -> str:
        key = app_key(pod.namespace, pod.name)
        record = procs.read_record(self.paths.procs_dir, key)
        if record is not None and procs.is_alive(record):
            return "running"
        prefix = self.config().prefix
        argv = [
            sys.executable,
            "-m",
            "underpass.lab.sampleapp",
            "serve",
            "--pod",
            f"{pod.namespace}/{pod.name}",
            "--tag",
            f"lab={prefix}",
            "--ready-fd",
            str(procs.READY_FD),
        ]
        await procs.spawn(
            self.paths.procs_dir,
            key,
            argv,
            netns_path=pod.netns,
            log_path=self.paths.logs_dir / f"{key}.log",
            env={"UNDERPASS_POD": f"{pod.namespace}/{pod.name}"},
        )
        return "started"

    async def _teardown(
        self, cfg: LabConfig, pod: Pod, *, strict: bool, keep_record: bool = True
    ) -> None:
        """Stop the pod's processes, CNI DEL (eth0, then lo), remove its netns."""
        await procs.stop(self.paths.procs_dir, app_key(pod.namespace, pod.name))
        inode = netns.inode(pod.netns)
        if inode is not None:
            await procs.terminate(procs.pids_in({inode}))
        node = self.registry.node(pod.node)
        sandbox = _sandbox(pod)
        if node is not None:
            try:
                runner = self._runner(cfg, node)
                try:
                    conflist = self._read_conflist(node.name)
                except LabStateError:
                    conflist = None
                if conflist is not None:
                    await runner.delete(conflist, sandbox, POD_IFNAME)
                await runner.delete(LOOPBACK_CONFLIST, sandbox, "lo")
            except CniError as exc:
                if strict:
                    raise
                log.warning(
                    "lab.pod.cni_del_failed", pod=f"{pod.namespace}/{pod.name}", error=str(exc)
                )
        netns.remove(_netns_basename(pod.netns))
        if not keep_record:
            self.registry.delete_pod(pod.namespace, pod.name)

    async def delete_pod(self, namespace: str, name: str) -> Pod:
        """Stop the pod, CNI DEL, remove its netns and its registry object."""
        cfg = self.config()
        pod = self.registry.pod(namespace, name)
        if pod is None:
            raise ObjectNotFound(f"pod {namespace}/{name} not found")
        t0 = time.perf_counter()
        await self._teardown(cfg, pod, strict=True, keep_record=False)
        log.info(
            "lab.pod.deleted",
            pod=f"{namespace}/{name}",
            ip=pod.ip,
            ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        return pod

    # ---- labels

    def label(
        self, kind: str, name: str, args: Sequence[str], *, overwrite: bool = False
    ) -> tuple[Node | Namespace | Pod, bool]:
        """``kubectl label <kind> <name> k=v k-``: returns (object, changed)."""
        changes = parse_label_args(args)
        with self.registry.transaction():
            current: Node | Namespace | Pod | None
            if kind == "namespace":
                current = self.registry.namespace(name)
            elif kind == "node":
                current = self.registry.node(name)
            elif kind == "pod":
                ns, _, pod_name = name.rpartition("/")
                current = self.registry.pod(ns or "default", pod_name)
            else:
                raise LabError(f"cannot label {kind!r}: use namespace, node or pod")
            if current is None:
                raise ObjectNotFound(f"{kind} {name} not found")
            for key, value in changes.items():
                old = current.labels.get(key)
                if value is not None and old is not None and old != value and not overwrite:
                    raise LabError(
                        f"{kind}/{name}: '{key}' already has a value ({old}), "
                        "and --overwrite is false"
                    )
                if value is None and old is None:
                    log.warning("lab.label.not_found", kind=kind, name=name, label=key)
            new: Node | Namespace | Pod
            if isinstance(current, Namespace):
                new = self.registry.set_namespace_labels(current.name, changes)
            elif isinstance(current, Node):
                new = self.registry.set_node_labels(current.name, changes)
            else:
                new = self.registry.set_pod_labels(current.namespace, current.name, changes)
        return new, new != current

    # ---- status

    def status(self) -> dict[str, Any]:
        cfg = self.config()
        snap = self.registry.snapshot()
        apps = {r.key: procs.is_alive(r) for r in procs.read_records(self.paths.procs_dir)}
        pods = []
        for pod in sorted(snap.pods.values(), key=lambda p: (p.namespace, p.name)):
            doc = pod_dict(pod)
            doc["netns_present"] = os.path.exists(pod.netns)
            doc["app_running"] = apps.get(app_key(pod.namespace, pod.name), False)
            pods.append(doc)
        nodes = []
        for node in sorted(snap.nodes.values(), key=lambda n: n.name):
            doc = obj_dict(node)
            doc["netns_present"] = os.path.exists(node.netns)
            doc["pods"] = len(snap.pods_on_node(node.name))
            doc["agent"] = agents.state(self.paths, node.name) if cfg.mesh else None
            doc["ztunnel"] = mesh.state(self.paths, node.name) if cfg.mesh else None
            nodes.append(doc)
        return {
            "lab": _config_dict(cfg, self.state_dir),
            "generation": snap.generation,
            "nodes": nodes,
            "namespaces": [
                obj_dict(n) for n in sorted(snap.namespaces.values(), key=lambda n: n.name)
            ],
            "pods": pods,
            "services": [
                {**obj_dict(s), "endpoints": [p.ip for p in snap.endpoints(s)]}
                for s in sorted(snap.services.values(), key=lambda s: s.key)
            ],
        }

    # ---- down

    async def _ensure_mesh(self, cfg: LabConfig, nodes: Sequence[Node]) -> dict[str, str]:
        """The control plane, then every node's ztunnel (in parallel), running and ready."""
        actions = {"controlplane": await mesh.ensure_control_plane(self.paths, cfg, list(nodes))}
        errors: list[str] = []

        async def one(node: Node) -> None:
            try:
                actions[mesh.ztunnel_key(node.name)] = await mesh.ensure_ztunnel(
                    self.paths, cfg, node
                )
            except LabError as exc:
                errors.append(str(exc))

        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(one, node)
        if errors:
            raise LabError("; ".join(sorted(errors)))
        return dict(sorted(actions.items()))

    async def set_ztunnel_mode(
        self, mode: str, only: Sequence[str] | None = None
    ) -> dict[str, str]:
        """Restart the ztunnels of the nodes (all, or ``only``) in ``mode``; node -> action."""
        cfg = self.config()
        if not cfg.mesh:
            raise LabError("this lab runs without the mesh (--no-mesh): there is no ztunnel")
        nodes = sorted(self.registry.snapshot().nodes.values(), key=lambda n: n.name)
        if only:
            unknown = set(only) - {n.name for n in nodes}
            if unknown:
                raise LabError(f"no such node: {', '.join(sorted(unknown))}")
            nodes = [n for n in nodes if n.name in only]
        actions: dict[str, str] = {}
        for node in nodes:
            actions[node.name] = await mesh.set_ztunnel_mode(self.paths, cfg, node, mode)
        return actions

    async def down(self, prefix: str | None = None) -> dict[str, Any]:
        """Remove every netns, link, process and file of the lab; idempotent."""
        started = time.perf_counter()
        report: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "processes": 0,
            "pods": 0,
            "netns": [],
            "links": [],
            "sockets": [],
            "warnings": [],
        }
        cfg: LabConfig | None = None
        pods: list[Pod] = []
        nodes: list[Node] = []
        if self.state_dir.exists():
            try:
                cfg = self.registry.config()
            except LabStateError as exc:
                report["warnings"].append(str(exc))
            if self.registry.exists():
                try:
                    snap = self.registry.snapshot()
                    pods, nodes = list(snap.pods.values()), list(snap.nodes.values())
                except LabStateError as exc:
                    report["warnings"].append(f"{exc}; cleaning up by name instead")
        if prefix is not None and cfg is not None and prefix != cfg.prefix:
            raise LabError(f"the lab at {self.state_dir} has prefix {cfg.prefix}, not {prefix}")
        prefix = prefix or (cfg.prefix if cfg else None) or self._infer_prefix()
        if prefix is None:
            if self.state_dir.exists() and (
                self.paths.lab_file.exists() or self.paths.objects.exists()
            ):
                raise LabError(
                    f"cannot tell which network namespaces belong to the lab at "
                    f"{self.state_dir} (its lab.json is unreadable): pass --prefix PREFIX "
                    "to clean up by name"
                )
            if self.state_dir.exists():
                self._remove_state(cfg, report)
            report["seconds"] = round(time.perf_counter() - started, 3)
            return report
        log.info("lab.down", prefix=prefix, state_dir=str(self.state_dir))
        names = set(lab_netns_names(prefix, netns.list_names()))
        names |= {_netns_basename(p.netns) for p in pods} | {
            _netns_basename(n.netns) for n in nodes
        }
        names = {n for n in names if netns.exists(n)}

        # 1. processes: the tracked ones (apps, node agents), then anything else
        #    living in the lab's netns; then the agents' sockets
        tracked = [r.pid for r in procs.read_records(self.paths.procs_dir) if procs.is_alive(r)]
        await procs.terminate(tracked)
        report["processes"] += len(tracked)
        for node in nodes:
            report["sockets"] += [str(p) for p in agents.remove_sockets(self.paths, node.name)]
        inodes = {i for i in (netns.inode(netns.path_of(n)) for n in names) if i is not None}
        strays = procs.pids_in(inodes)
        if strays:
            log.info("lab.down.processes", pids=strays)
            await procs.terminate(strays)
            report["processes"] += len(strays)

        # 2. pods: CNI DEL (as the runtime does on sandbox removal), then the netns
        if cfg is not None and pods:
            limiter = trio.CapacityLimiter(PARALLEL_PODS)

            async def remove_pod(pod: Pod) -> None:
                async with limiter:
                    await self._teardown(cfg, pod, strict=False, keep_record=True)
                report["pods"] += 1

            async with trio.open_nursery() as nursery:
                for pod in pods:
                    nursery.start_soon(remove_pod, pod)

        # 3. the host link (root netns), then every remaining netns (nodes, fabric)
        ifname = cfg.host_ifname if cfg and cfg.host_ifname else host_ifname(prefix)
        with netns.ipr(None) as root:
            index = _index(root, ifname)
            if index is not None:
                root.link("del", index=index)
                report["links"].append(ifname)
        for name in sorted(names):
            netns.remove(name)
        report["netns"] = sorted(n for n in names if not netns.exists(n))
        self._remove_state(cfg, report)
        report["seconds"] = round(time.perf_counter() - started, 3)
        log.info(
            "lab.down.done",
            seconds=report["seconds"],
            netns=len(report["netns"]),
            processes=report["processes"],
        )
        return report

    def _infer_prefix(self) -> str | None:
        """The prefix, read from whatever state survived when lab.json did not."""
        pattern = re.compile(r'"/run/netns/([a-z][a-z0-9-]{0,19})-(?:node-\d+|pod-[^"]+)"')
        pods = self.paths.objects / "pods"
        nodes = self.paths.objects / "nodes"
        for directory in (nodes, pods):
            try:
                files = sorted(directory.glob("*.json"))
            except OSError:
                continue
            for path in files:
                try:
                    match = pattern.search(path.read_text(errors="replace"))
                except OSError:
                    continue
                if match:
                    return match.group(1)
        for record in procs.read_records(self.paths.procs_dir):
            for arg in record.argv:
                if arg.startswith("lab="):
                    return arg[len("lab=") :]
        return None

    def _remove_state(self, cfg: LabConfig | None, report: dict[str, Any]) -> None:
        state = self.state_dir
        if state.exists():
            entries = set(os.listdir(state))
            ours = {"lab.json", "objects", ".lock", "generation", "nodes", "procs", "logs"}
            if entries and not entries & ours:
                report["warnings"].append(
                    f"{state} does not look like a lab state directory; left it in place"
                )
                return
            shutil.rmtree(state)
        for directory in sorted(cfg.created_dirs if cfg else (), key=len, reverse=True):
            with contextlib.suppress(FileNotFoundError, OSError):
                os.rmdir(directory)  # only if empty: someone else may use it now


def _sandbox(pod: Pod) -> Sandbox:
    return Sandbox(pod.namespace, pod.name, pod.uid, pod.container_id, pod.netns)


def _ipv4_net(what: str, text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(text)
    except ValueError as exc:
        raise LabError(f"invalid {what} {text!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise LabError(f"{what} {text} must be IPv4")
    return net


def _config_dict(cfg: LabConfig, state_dir: Path) -> dict[str, Any]:
    doc = dataclasses.asdict(cfg)
    doc["created_dirs"] = list(cfg.created_dirs)
    doc["state_dir"] = str(state_dir)
    return doc
