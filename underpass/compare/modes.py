"""Deployment modes as small pluggable classes: set up in a built lab, list proxies, tear down.

Owns what differs between the modes the comparison measures, and the rules
a mode follows. A mode (:class:`Mode`) gets a lab that is already up with
the comparison's workload (:class:`Workload`: every pod runs an HTTP echo on
:data:`APP_PORT`; the pods are paired client -> server across nodes) and:

- :meth:`Mode.setup` puts its proxies in place and returns once they carry
  traffic (bounded waits, errors saying where to look);
- :meth:`Mode.proxies` lists every proxy process it runs (pid, role, node,
  pod): exactly what is measured and charged to the mode;
- :meth:`Mode.url` says where a client pod sends its requests (a pod IP for
  captured modes; a local listener for explicit sidecars; a service VIP
  for the waypoint), :meth:`Mode.destination` what that is, for the JSON;
- :meth:`Mode.snapshot` / :meth:`Mode.verify` prove, after the load, that
  the traffic went through the mode's proxies with mTLS (a mode that is not
  really in the path would measure nothing): the run fails otherwise;
- :meth:`Mode.teardown` undoes :meth:`Mode.setup`, leaving the lab as it
  found it for the next mode (namespace not enrolled, every node's shared
  ztunnel running in the mode it had).

The modes (issue 6's numbers):

- ``node`` (2): the lab's ztunnel per node, the namespace enrolled with
  ``istio.io/dataplane-mode=ambient``;
- ``service-account`` (3): the same, each node's ztunnel restarted as a
  supervisor plus one worker process per service account (all measured);
- ``waypoint`` (4): mode 2 plus a waypoint for the namespace, reached at the
  namespace's service VIP; until the L7 waypoint exists, the waypoint is our
  ztunnel's plain L4 stand-in (``--waypoint-stand-in``), and the mode says so;
- ``sidecar-ztunnel`` (1a): our ztunnel in dedicated mode inside every pod
  (the pods captured by the node agent as in ambient mode, the node's shared
  ztunnel stopped), HBONE between the sidecars;
- ``sidecar-envoy`` (1b, the baseline): an Envoy per pod, certificates from
  the lab's CA, one worker; ``sidecar-envoy-default``: the same with Envoy's
  default worker count.

To add one: subclass :class:`Mode`, start its processes with
:func:`underpass.compare.launch.spawn_tracked` (so that ``lab down`` stops
them whatever happens) or through the lab, and register the class in
:data:`MODES` and its name in :mod:`underpass.compare.catalog`. Modes run
one after the other in the same lab, each torn down before the next is set up.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import structlog
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from identity.ca import CertificateAuthority, build_csr, generate_workload_key, validate_csr
from identity.certs import WorkloadCertificate
from identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from underpass.ambient import (
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_LABEL,
    DATAPLANE_MODE_NONE,
    USE_WAYPOINT_LABEL,
)
from underpass.compare import envoy, evidence
from underpass.compare.catalog import PLANNED
from underpass.compare.errors import CompareError
from underpass.compare.evidence import Link
from underpass.compare.launch import http_get_in_netns, http_get_unix, spawn_tracked, stop_tracked
from underpass.lab import mesh, procs
from underpass.lab.cluster import APP_NAME, Lab, PodSpec
from underpass.lab.registry import Node, Pod, Service, ServicePort
from underpass.lab.sampleapp import HTTP_PORT

#: Every pod's application (an HTTP echo) listens here.
APP_PORT: Final = HTTP_PORT
AMBIENT_LABEL: Final = DATAPLANE_MODE_LABEL
#: Seconds the node agents get to (un)enrol the namespace's pods, and ztunnel to serve them.
ENROL_TIMEOUT: Final = 60.0
ADMIN_PORT: Final = 15000  # ztunnel's admin, node side
METRICS_PORT: Final = 15020
#: Seconds an Envoy sidecar gets from exec to ``/ready`` answering 200.
ENVOY_READY_TIMEOUT: Final = 30.0
#: The sidecar's TLS listener on the pod IP. Not 15008: that port is HBONE
#: (HTTP/2 CONNECT); this one is TLS around raw TCP.
SIDECAR_INBOUND_PORT: Final = 16008
#: First of the sidecar's plaintext outbound listeners on 127.0.0.1 (one per destination).
SIDECAR_OUTBOUND_BASE: Final = 15101
#: Sidecars started at once (each is an exec plus a TLS context load).
PARALLEL_STARTS: Final = 8
POLL_INTERVAL: Final = 0.1

log = structlog.get_logger("underpass.compare")


# --------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Pair:
    """One load generator: runs in ``client``'s pod, sends to ``server``'s app."""

    client: Pod
    server: Pod


@dataclass(frozen=True)
class Workload:
    """The pods every mode serves, and who talks to whom."""

    namespace: str
    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...]
    pairs: tuple[Pair, ...]

    def pods_on(self, node: str) -> list[Pod]:
        return [p for p in self.pods if p.node == node]


def plan_pairs(pods_by_node: Mapping[str, Sequence[Pod]]) -> list[Pair]:
    """Every pod is a client once, and a server once: pod j of node i sends to
    pod j of the next node (wrapping round); on a single node, to the next pod.

    So each proxy carries outbound and inbound traffic, and with two or more
    nodes all of it crosses nodes. Nodes must have the same number of pods.
    """
    nodes = sorted(pods_by_node)
    if not nodes:
        raise CompareError("no nodes to plan traffic on")
    counts = {len(pods_by_node[n]) for n in nodes}
    if len(counts) != 1:
        raise CompareError(f"nodes have different pod counts {sorted(counts)}")
    per_node = counts.pop()
    if len(nodes) * per_node < 2:
        raise CompareError("traffic needs at least two pods (more --nodes or --pods-per-node)")
    ordered = {n: sorted(pods_by_node[n], key=lambda p: p.name) for n in nodes}
    pairs = []
    for i, node in enumerate(nodes):
        for j, pod in enumerate(ordered[node]):
            if len(nodes) > 1:
                server = ordered[nodes[(i + 1) % len(nodes)]][j]
            else:
                server = ordered[node][(j + 1) % per_node]
            pairs.append(Pair(pod, server))
    return pairs


@dataclass(frozen=True)
class ProxyProcess:
    """One proxy process a mode runs: what is measured."""

    pid: int
    role: str  # e.g. "ztunnel", "envoy-sidecar"
    node: str
    pod: str | None = None  # "<namespace>/<name>" for a per-pod proxy
    identity: str | None = None  # the one identity it holds, when it holds one (SPIFFE URI)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "role": self.role,
            "node": self.node,
            "pod": self.pod,
            "identity": self.identity,
        }


@dataclass
class ModeContext:
    """What a mode works with: the lab, the workload, a private directory, progress."""

    lab: Lab
    workload: Workload
    workdir: Path  # the mode's own directory, under the lab's state directory
    say: Callable[[str], None] = field(default=lambda _text: None)


# --------------------------------------------------------------------------- the interface


class Mode:
    """A deployment mode (see the module docstring for the contract)."""

    #: Names the mode on the command line (``--modes``) and in the JSON.
    name: str = ""
    #: The mode's number in issue 6 / DESIGN.md (``1b``, ``2``...).
    issue_mode: ClassVar[str] = ""
    title: str = ""
    #: Caveats the output must carry (e.g. a stand-in for a missing part).
    notes: tuple[str, ...] = ()

    async def setup(self, ctx: ModeContext) -> None:
        raise NotImplementedError

    def proxies(self, ctx: ModeContext) -> list[ProxyProcess]:
        raise NotImplementedError

    def url(self, ctx: ModeContext, pair: Pair) -> str:
        """Where ``pair.client`` sends: by default the server pod's app, directly
        (a capturing mode takes the connection on the way)."""
        return f"http://{pair.server.ip}:{APP_PORT}/echo"

    def destination(self, ctx: ModeContext, pair: Pair) -> tuple[str, str | None]:
        """What :meth:`url` reaches, for the JSON: (``<namespace>/<name>``, its node or None)."""
        return f"{pair.server.namespace}/{pair.server.name}", pair.server.node

    async def snapshot(self, ctx: ModeContext) -> Any:
        """State before the load that :meth:`verify` compares with (counters)."""
        return None

    async def verify(self, ctx: ModeContext, before: Any) -> dict[str, Any]:
        """Proof that the load went through the proxies with mTLS; raise if not."""
        raise NotImplementedError

    async def teardown(self, ctx: ModeContext) -> None:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The mode's knobs, for the JSON."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "issue_mode": self.issue_mode,
            "title": self.title,
            "notes": list(self.notes),
            "settings": self.settings(),
        }


# --------------------------------------------------------------------------- ztunnel helpers


def key_of(pod: Pod) -> str:
    """``<namespace>/<name>``: how workloads are named in metrics, logs and dumps."""
    return f"{pod.namespace}/{pod.name}"


def identity_of(pod: Pod) -> SpiffeId:
    return SpiffeId(DEFAULT_TRUST_DOMAIN, pod.namespace, pod.service_account)


def pair_link(pair: Pair) -> Link:
    """The mTLS relation a pair's traffic must show: client -> server, each as itself."""
    return Link(
        key_of(pair.client),
        key_of(pair.server),
        identity_of(pair.client).uri,
        identity_of(pair.server).uri,
    )


def _local_get(netns_path: str, port: int, target: str, who: str) -> bytes:
    """``GET target`` on 127.0.0.1:``port`` inside the netns; blocks (run it in a thread)."""
    status, body = http_get_in_netns(netns_path, "127.0.0.1", port, target)
    if status != 200:
        raise OSError(f"{who}: GET {target} answered {status}")
    return body


def _ztunnel_get(node: Node, port: int, target: str) -> bytes:
    return _local_get(node.netns, port, target, f"ztunnel on {node.name}")


def _config_dump(netns_path: str, who: str) -> dict[str, Any]:
    dump: dict[str, Any] = json.loads(_local_get(netns_path, ADMIN_PORT, "/config_dump", who))
    return dump


def _view(dump: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """From a ztunnel's config dump: the pods it serves, and the workloads it tunnels
    to over HBONE (both as ``<namespace>/<name>``)."""
    served = {f"{p['namespace']}/{p['name']}" for p in dump.get("pods", [])}
    hbone = {
        f"{w['namespace']}/{w['name']}"
        for w in dump.get("workloads", [])
        if w.get("tunnel_protocol") == "HBONE"
    }
    return served, hbone


def _ztunnel_view(node: Node) -> tuple[set[str], set[str]]:
    return _view(_config_dump(node.netns, f"ztunnel on {node.name}"))


def mtls_inbound_connections(metrics_text: str, namespace: str) -> int:
    """Connections ztunnel accepted over HBONE (mTLS) for pods of ``namespace``."""
    found = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "istio_tcp_connections_opened_total"
                and labels.get("reporter") == "destination"
                and labels.get("connection_security_policy") == "mutual_tls"
                and labels.get("destination_workload_namespace") == namespace
            ):
                found += sample.value
    return int(found)


async def _until(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll ``check`` (run in a thread: it may block on sockets) until it holds."""
    with trio.move_on_after(timeout):
        while True:
            try:
                if await trio.to_thread.run_sync(check):
                    return
            except (OSError, ValueError):
                pass  # not answering yet
            await trio.sleep(POLL_INTERVAL)
    raise CompareError(f"{what} did not happen within {timeout:g} s")


async def _registry_enrolment(ctx: ModeContext, enrolled: bool) -> None:
    """Until the node agents have (un)captured every pod of the workload."""
    lab, workload = ctx.lab, ctx.workload
    keys = [p.key for p in workload.pods]
    with trio.move_on_after(ENROL_TIMEOUT) as scope:
        await lab.registry.until(
            lambda s: all(k in s.pods and s.pods[k].enrolled is enrolled for k in keys)
        )
    if scope.cancelled_caught:
        raise CompareError(
            f"the node agents did not {'enrol' if enrolled else 'release'} the pods of "
            f"{workload.namespace} within {ENROL_TIMEOUT:g} s; see "
            f"{lab.paths.logs_dir}/agent.<node>.log"
        )


async def _ztunnels_follow(ctx: ModeContext, enrolled: bool) -> None:
    """Until every node's ztunnel serves (or dropped) its pods and tunnels to all of
    them over HBONE (or no longer does)."""
    lab, workload = ctx.lab, ctx.workload
    everyone = {key_of(p) for p in workload.pods}
    for node in workload.nodes:
        local = {key_of(p) for p in workload.pods_on(node.name)}

        # Serving its own pods is not enough: until the control plane has told it
        # that the destinations speak HBONE, a client's ztunnel passes their
        # connections through in plaintext.
        def done(node: Node = node, local: set[str] = local) -> bool:
            served, hbone = _ztunnel_view(node)
            if enrolled:
                return local <= served and everyone <= hbone
            return not (local & served) and not (everyone & hbone)

        verb = "serving" if enrolled else "dropping"
        tunnel = "tunnelling to" if enrolled else "no longer tunnelling to"
        await _until(
            f"ztunnel on {node.name} {verb} its {len(local)} pods and {tunnel} all "
            f"{len(everyone)} over HBONE (log: {mesh.ztunnel_log(lab.paths, node.name)})",
            done,
            ENROL_TIMEOUT,
        )


def _label_ambient(ctx: ModeContext, enrolled: bool) -> None:
    change = f"{AMBIENT_LABEL}={DATAPLANE_MODE_AMBIENT}" if enrolled else f"{AMBIENT_LABEL}-"
    ctx.lab.label("namespace", ctx.workload.namespace, [change], overwrite=True)


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from every ``/proc/<n>/stat``)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited meanwhile
        # the command (field 2) may hold spaces or ')': count from the last ')'
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.add(int(entry))
    return found


async def _metrics_links(netns_path: str, who: str, reporter: str) -> Counter[Link]:
    text = await trio.to_thread.run_sync(_local_get, netns_path, METRICS_PORT, "/metrics", who)
    return evidence.mtls_links(text.decode(), reporter)


# --------------------------------------------------------------------------- mode 2: node


class NodeMode(Mode):
    """Mode 2: one ztunnel per node (the lab's own), the namespace enrolled in ambient."""

    name = "node"
    issue_mode = "2"
    title = "ztunnel per node (ambient)"
    #: What the node's ztunnel process is called in the proxies' list.
    ztunnel_role: ClassVar[str] = "ztunnel"

    async def _enrolment(self, ctx: ModeContext, enrolled: bool) -> None:
        await _registry_enrolment(ctx, enrolled)
        await _ztunnels_follow(ctx, enrolled)

    async def setup(self, ctx: ModeContext) -> None:
        _label_ambient(ctx, True)
        await self._enrolment(ctx, True)

    def _ztunnel_pid(self, ctx: ModeContext, node: Node) -> int:
        pid = mesh.state(ctx.lab.paths, node.name)["pid"]
        if pid is None:
            raise CompareError(
                f"ztunnel on {node.name} is not running; its log: "
                f"{mesh.ztunnel_log(ctx.lab.paths, node.name)}"
            )
        return int(pid)

    def proxies(self, ctx: ModeContext) -> list[ProxyProcess]:
        return [
            ProxyProcess(self._ztunnel_pid(ctx, node), self.ztunnel_role, node.name)
            for node in ctx.workload.nodes
        ]

    async def _counts(self, ctx: ModeContext) -> dict[str, int]:
        counts = {}
        for node in ctx.workload.nodes:
            text = await trio.to_thread.run_sync(_ztunnel_get, node, METRICS_PORT, "/metrics")
            counts[node.name] = mtls_inbound_connections(text.decode(), ctx.workload.namespace)
        return counts

    async def snapshot(self, ctx: ModeContext) -> Any:
        return await self._counts(ctx)

    async def verify(self, ctx: ModeContext, before: Any) -> dict[str, Any]:
        after = await self._counts(ctx)
        report: dict[str, Any] = {}
        for node in ctx.workload.nodes:
            expected = sum(p.server.node == node.name for p in ctx.workload.pairs)
            opened = after[node.name] - int(before.get(node.name, 0))
            report[node.name] = {"mtls_inbound_connections": opened, "expected_at_least": expected}
            if opened < expected:
                raise CompareError(
                    f"ztunnel on {node.name} accepted {opened} mTLS (HBONE) connections during "
                    f"the load, but {expected} clients sent to its pods: the traffic did not go "
                    f"through it (log: {mesh.ztunnel_log(ctx.lab.paths, node.name)})"
                )
        return report

    async def teardown(self, ctx: ModeContext) -> None:
        _label_ambient(ctx, False)
        await self._enrolment(ctx, False)


# --------------------------------------------------------------------------- mode 3


SERVICE_ACCOUNT_ISOLATION: Final = "service-account"
#: Seconds the access-log lines of the load's connections get to appear (they are
#: written when a connection closes, just after the load generators exit).
ACCESS_LOG_TIMEOUT: Final = 20.0


class ServiceAccountMode(NodeMode):
    """Mode 3: each node's ztunnel as a supervisor plus a worker process per service account."""

    name = "service-account"
    issue_mode = "3"
    title = "ztunnel worker per service account per node"
    notes = (
        "each node's ztunnel runs as a supervisor (the node's token, no workload key) and one "
        "worker process per service account with pods on the node (that account's key only), "
        "forked from a zygote that holds no credential, so that they share the interpreter's "
        "pages; the supervisor, the zygote and all the workers are measured",
    )
    ztunnel_role = "ztunnel-supervisor"

    def __init__(self) -> None:
        self.previous: dict[str, str] = {}  # node -> ztunnel mode before setup
        self.workers: list[ProxyProcess] = []

    def settings(self) -> dict[str, Any]:
        return {"isolation": SERVICE_ACCOUNT_ISOLATION}

    async def setup(self, ctx: ModeContext) -> None:
        lab, workload = ctx.lab, ctx.workload
        self.previous = {n.name: mesh.ztunnel_mode(lab.paths, n.name) for n in workload.nodes}
        ctx.say("restarting each node's ztunnel as a supervisor with a worker per service account")
        await lab.set_ztunnel_mode(SERVICE_ACCOUNT_ISOLATION, [n.name for n in workload.nodes])
        await super().setup(ctx)
        self.workers = []
        for node in workload.nodes:
            self.workers += await self._await_workers(ctx, node)
        ctx.say(
            f"{sum(1 for w in self.workers if w.identity)} workers on {len(workload.nodes)} "
            f"nodes ({len({w.identity for w in self.workers if w.identity})} service accounts)"
        )

    async def _await_workers(self, ctx: ModeContext, node: Node) -> list[ProxyProcess]:
        """The node's workers (and their zygote) once there is exactly one per service
        account with a pod there, each a child of the supervisor's zygote (or, without
        one, of the supervisor), and no other process among them."""
        wanted = {identity_of(p).uri for p in ctx.workload.pods_on(node.name)}
        supervisor = self._ztunnel_pid(ctx, node)
        found: dict[str, int] = {}
        held: list[str] = []
        zygote: list[int] = []

        def done() -> bool:
            dump = _config_dump(node.netns, f"ztunnel on {node.name}")
            workers = {str(w["identity"]): int(w["pid"]) for w in dump.get("workers", [])}
            forked_from = dump.get("zygote")
            parent = supervisor
            if forked_from is not None:
                if _children(supervisor) != {int(forked_from)}:
                    return False
                parent = int(forked_from)
            if set(workers) != wanted or set(workers.values()) != _children(parent):
                return False
            found.update(workers)
            zygote[:] = [int(forked_from)] if forked_from is not None else []
            held.extend(str(c.get("identity")) for c in dump.get("certificates", []))
            return True

        await _until(
            f"the supervisor on {node.name} (pid {supervisor}) running one worker for each of "
            f"{len(wanted)} service accounts and no other process (its config dump's "
            f"'workers'; log: {mesh.ztunnel_log(ctx.lab.paths, node.name)})",
            done,
            ENROL_TIMEOUT,
        )
        if held:  # then this is not mode 3, whatever it says
            raise CompareError(
                f"the supervisor on {node.name} holds workload certificates ({', '.join(held)}): "
                "in mode 3 only its workers hold keys, one service account each"
            )
        return [ProxyProcess(pid, "ztunnel-zygote", node.name) for pid in zygote] + [
            ProxyProcess(pid, "ztunnel-worker", node.name, identity=identity)
            for identity, pid in sorted(found.items())
        ]

    def proxies(self, ctx: ModeContext) -> list[ProxyProcess]:
        return super().proxies(ctx) + list(self.workers)

    async def snapshot(self, ctx: ModeContext) -> Any:
        """Where each node's log ends: the load's access-log lines come after."""
        offsets = {}
        for node in ctx.workload.nodes:
            path = mesh.ztunnel_log(ctx.lab.paths, node.name)
            offsets[node.name] = path.stat().st_size if path.exists() else 0
        return offsets

    async def verify(self, ctx: ModeContext, before: Any) -> dict[str, Any]:
        """Workers serve no metrics: their access-log lines (in the node's ztunnel log)
        must show each pair's connection over HBONE, both ends, each as itself."""
        workload = ctx.workload
        paths = ctx.lab.paths
        offsets = dict(before)
        seen = {
            (node.name, direction): Counter[Link]()
            for node in workload.nodes
            for direction in ("inbound", "outbound")
        }
        wanted = [(pair.server.node, "inbound", pair_link(pair)) for pair in workload.pairs] + [
            (pair.client.node, "outbound", pair_link(pair)) for pair in workload.pairs
        ]

        def absent() -> list[tuple[str, str, Link]]:
            return [w for w in wanted if seen[(w[0], w[1])][w[2]] <= 0]

        def read() -> bool:
            for node in workload.nodes:
                entries, offsets[node.name] = evidence.read_log_lines(
                    mesh.ztunnel_log(paths, node.name), offsets[node.name]
                )
                for direction in ("inbound", "outbound"):
                    seen[(node.name, direction)] += evidence.hbone_links(entries, direction)
            return not absent()

        try:
            await _until("every pair's HBONE access-log lines", read, ACCESS_LOG_TIMEOUT)
        except CompareError:
            missed = absent()
            node, direction, _ = missed[0]
            raise CompareError(
                f"{len(missed)} connections of the load have no {direction} HBONE (mTLS) "
                f"access-log line with both identities, e.g. on {node}: "
                f"{evidence.describe([m[2] for m in missed])}; the traffic did not go through "
                f"the workers (log: {mesh.ztunnel_log(paths, node)})"
            ) from None
        return {
            node.name: {
                f"hbone_{direction}_connections": sum(seen[(node.name, direction)].values())
                for direction in ("inbound", "outbound")
            }
            | {
                "workers": {
                    w.identity: w.pid for w in self.workers if w.node == node.name and w.identity
                }
            }
            for node in workload.nodes
        }

    async def teardown(self, ctx: ModeContext) -> None:
        await super().teardown(ctx)
        by_mode: dict[str, list[str]] = {}
        for node, mode in self.previous.items():
            by_mode.setdefault(mode, []).append(node)
        for mode, nodes in sorted(by_mode.items()):
            await ctx.lab.set_ztunnel_mode(mode, nodes)
        self.workers = []


# --------------------------------------------------------------------------- mode 4: waypoint


#: The waypoint's name: its Gateway, its pod, that pod's service account and its Service.
WAYPOINT: Final = "waypoint"
GATEWAY_NAME_LABEL: Final = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_CLASS: Final = "istio-waypoint"
WAYPOINT_FOR_LABEL: Final = "istio.io/waypoint-for"
HBONE_PORT: Final = 15008
#: The lab's policy files (the control plane watches the directory).
POLICY_DIR: Final = "policies"
WAYPOINT_POLICY_FILE: Final = "compare-waypoint.yaml"
#: The namespace's service (the lab's, in front of every pod's app) and its HTTP port.
SERVICE_HTTP_PORT: Final = 80


def gateway_manifest(namespace: str) -> dict[str, Any]:
    """The waypoint's Gateway, as Kubernetes would hold it: for the namespace's services."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": WAYPOINT,
            "namespace": namespace,
            "labels": {WAYPOINT_FOR_LABEL: "service"},
        },
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
        },
    }


def free_vip(service_cidr: str, used: set[str], skip: int = 10) -> str:
    """The first address of the service CIDR past the first ``skip`` that no service holds."""
    network = ipaddress.ip_network(service_cidr)
    for address in network.hosts():
        if int(address) - int(network.network_address) >= skip and str(address) not in used:
            return str(address)
    raise CompareError(f"no free service address left in {service_cidr}")


class WaypointMode(NodeMode):
    """Mode 4: mode 2 plus a waypoint for the namespace (until the L7 proxy exists, our
    ztunnel's L4 stand-in), the clients sending to the namespace's service VIP."""

    name = "waypoint"
    issue_mode = "4"
    title = "ztunnel per node + waypoint (L4 stand-in)"
    notes = (
        "the waypoint is a plain L4 stand-in (`underpass ztunnel --dedicated "
        "--waypoint-stand-in`: it terminates HBONE and tunnels on) until the L7 waypoint "
        "exists: no HTTP parsing, routing or L7 policy, so its memory, CPU and latency are a "
        "lower bound of an L7 waypoint's",
        "clients send to the namespace's service VIP (client ztunnel -> waypoint -> server "
        "ztunnel, mTLS on both hops); each client's connection goes to one of the service's "
        "pods, not to its paired pod, some on the client's own node",
        "one waypoint for the namespace, on the first node: counted in that node's memory "
        "(memory per node is the mean over the nodes)",
    )

    def __init__(self) -> None:
        self.waypoint: Pod | None = None
        self.record: procs.ProcRecord | None = None
        self.vip: str | None = None

    def _waypoint_identity(self, ctx: ModeContext) -> str:
        return SpiffeId(DEFAULT_TRUST_DOMAIN, ctx.workload.namespace, WAYPOINT).uri

    def _policy_path(self, ctx: ModeContext) -> Path:
        return ctx.lab.state_dir / POLICY_DIR / WAYPOINT_POLICY_FILE

    async def setup(self, ctx: ModeContext) -> None:
        lab, workload = ctx.lab, ctx.workload
        namespace = workload.namespace
        await super().setup(ctx)
        service = lab.registry.service(namespace, APP_NAME)
        if service is None:
            raise CompareError(
                f"the lab has no service {namespace}/{APP_NAME} in front of the pods: the "
                "waypoint mode sends to its VIP"
            )
        self.vip = service.vip
        node = workload.nodes[0]
        ctx.say(f"a waypoint for {namespace} on {node.name} (our ztunnel's L4 stand-in)")
        policy = self._policy_path(ctx)
        policy.parent.mkdir(exist_ok=True)
        tmp = policy.with_name(f".{policy.name}.tmp")
        tmp.write_text(yaml.safe_dump(gateway_manifest(namespace), sort_keys=False))
        tmp.replace(policy)
        outcome = await lab.add_pod(
            PodSpec(
                namespace,
                WAYPOINT,
                node.name,
                WAYPOINT,
                {GATEWAY_NAME_LABEL: WAYPOINT, DATAPLANE_MODE_LABEL: DATAPLANE_MODE_NONE},
            ),
            app=False,
        )
        self.waypoint = outcome.pod
        registry = lab.registry
        with registry.transaction():
            used = {s.vip for s in registry.snapshot().services.values()}
            registry.upsert_service(
                Service(
                    namespace=namespace,
                    name=WAYPOINT,
                    hostname=f"{WAYPOINT}.{namespace}.svc.cluster.local",
                    vip=free_vip(lab.config().service_cidr, used),
                    ports=(ServicePort(HBONE_PORT, HBONE_PORT, "TCP", "mesh"),),
                    selector={GATEWAY_NAME_LABEL: WAYPOINT},
                )
            )
        await mesh.ensure_sidecar(lab.paths, lab.config(), self.waypoint, waypoint_stand_in=True)
        self.record = procs.read_record(lab.paths.procs_dir, mesh.sidecar_key(self.waypoint))
        lab.label("namespace", namespace, [f"{USE_WAYPOINT_LABEL}={WAYPOINT}"], overwrite=True)
        await self._ztunnels_use_waypoint(ctx, True)

    async def _ztunnels_use_waypoint(self, ctx: ModeContext, used: bool) -> None:
        """Until every node's ztunnel sends the service's traffic to the waypoint (and
        knows the waypoint's pod), or no longer does."""
        namespace = ctx.workload.namespace
        waypoint = f"{namespace}/{WAYPOINT}"

        for node in ctx.workload.nodes:

            def done(node: Node = node) -> bool:
                dump = _config_dump(node.netns, f"ztunnel on {node.name}")
                service = next(
                    (
                        s
                        for s in dump.get("services", [])
                        if s.get("namespace") == namespace and s.get("name") == APP_NAME
                    ),
                    None,
                )
                if service is None:
                    return False
                known = any(
                    f"{w['namespace']}/{w['name']}" == waypoint for w in dump.get("workloads", [])
                )
                has = service.get("waypoint") is not None
                return has and known if used else not has

            await _until(
                f"ztunnel on {node.name} {'sending' if used else 'no longer sending'} the "
                f"traffic of service {namespace}/{APP_NAME} through the waypoint (log: "
                f"{mesh.ztunnel_log(ctx.lab.paths, node.name)})",
                done,
                ENROL_TIMEOUT,
            )

    def proxies(self, ctx: ModeContext) -> list[ProxyProcess]:
        found = super().proxies(ctx)
        if self.waypoint is None or self.record is None or not procs.is_alive(self.record):
            raise CompareError(f"the waypoint stand-in is not running; its log: {self._log(ctx)}")
        found.append(
            ProxyProcess(
                self.record.pid,
                "waypoint-stand-in",
                self.waypoint.node,
                key_of(self.waypoint),
                identity=self._waypoint_identity(ctx),
            )
        )
        return found

    def _log(self, ctx: ModeContext) -> Path:
        return ctx.lab.paths.logs_dir / f"sidecar.{ctx.workload.namespace}.{WAYPOINT}.log"

    def url(self, ctx: ModeContext, pair: Pair) -> str:
        return f"http://{self.vip}:{SERVICE_HTTP_PORT}/echo"

    def destination(self, ctx: ModeContext, pair: Pair) -> tuple[str, str | None]:
        return f"{ctx.workload.namespace}/{APP_NAME} (service VIP, through the waypoint)", None

    async def _links(self, ctx: ModeContext) -> dict[str, Counter[Link]]:
        """mTLS connections accepted: by the waypoint, and by each node's ztunnel."""
        assert self.waypoint is not None
        found = {
            WAYPOINT: await _metrics_links(
                self.waypoint.netns, "the waypoint stand-in", "destination"
            )
        }
        for node in ctx.workload.nodes:
            found[node.name] = await _metrics_links(
                node.netns, f"ztunnel on {node.name}", "destination"
            )
        return found

    async def snapshot(self, ctx: ModeContext) -> Any:
        return await self._links(ctx)

    async def verify(self, ctx: ModeContext, before: Any) -> dict[str, Any]:
        """Each client reached the waypoint over mTLS as itself, and the servers' ztunnels
        accepted a connection from the waypoint (as the waypoint) for each client."""
        after = await self._links(ctx)
        delta = {k: after[k] - before.get(k, Counter()) for k in after}
        workload = ctx.workload
        waypoint = f"{workload.namespace}/{WAYPOINT}"
        waypoint_id = self._waypoint_identity(ctx)
        by_client: dict[str, dict[str, int]] = {}
        for link, count in delta[WAYPOINT].items():
            by_client.setdefault(link.source, {})[link.destination] = count
        unseen = [
            pair
            for pair in workload.pairs
            if not any(
                link.source == key_of(pair.client)
                and link.source_identity == identity_of(pair.client).uri
                for link in delta[WAYPOINT]
            )
        ]
        if unseen:
            raise CompareError(
                f"the waypoint accepted no mTLS connection from {len(unseen)} clients (e.g. "
                f"{key_of(unseen[0].client)} as {identity_of(unseen[0].client).uri}) during the "
                f"load: their traffic did not go through it (log: {self._log(ctx)})"
            )
        from_waypoint = {
            node.name: sum(
                count
                for link, count in delta[node.name].items()
                if link.source == waypoint and link.source_identity == waypoint_id
            )
            for node in workload.nodes
        }
        if sum(from_waypoint.values()) < len(workload.pairs):
            raise CompareError(
                f"the nodes' ztunnels accepted {sum(from_waypoint.values())} mTLS connections "
                f"from the waypoint during the load, fewer than the {len(workload.pairs)} "
                f"clients: the traffic did not go on from the waypoint through them (logs: "
                f"{mesh.ztunnel_log(ctx.lab.paths, workload.nodes[0].name)}, ...)"
            )
        return {
            "waypoint": {
                "identity": waypoint_id,
                "mtls_inbound_connections": sum(delta[WAYPOINT].values()),
                "destinations_by_client": by_client,
            },
            **{
                name: {"mtls_inbound_connections_from_waypoint": count}
                for name, count in from_waypoint.items()
            },
        }

    async def teardown(self, ctx: ModeContext) -> None:
        lab, namespace = ctx.lab, ctx.workload.namespace
        lab.label("namespace", namespace, [f"{USE_WAYPOINT_LABEL}-"])
        await self._ztunnels_use_waypoint(ctx, False)
        if self.waypoint is not None:
            await mesh.stop_sidecar(lab.paths, self.waypoint)
        lab.registry.delete_service(namespace, WAYPOINT)
        self._policy_path(ctx).unlink(missing_ok=True)
        if lab.registry.pod(namespace, WAYPOINT) is not None:
            await lab.delete_pod(namespace, WAYPOINT)
        self.waypoint = self.record = None
        await super().teardown(ctx)


# --------------------------------------------------------------------------- mode 1b: Envoy


@dataclass
class _Sidecar:
    pod: Pod
    spec: envoy.SidecarSpec
    record: procs.ProcRecord | None = None


def load_lab_ca(lab: Lab) -> CertificateAuthority:
    """The lab control plane's CA (its self-signed root and key)."""
    directory = mesh.control_plane_dir(lab.paths) / "ca"
    missing = [n for n in ("ca-cert.pem", "ca-key.pem") if not (directory / n).is_file()]
    if missing:
        raise CompareError(
            f"the lab's CA files {', '.join(missing)} are missing in {directory}: is the "
            "lab's control plane running (a lab with the mesh on)?"
        )
    return CertificateAuthority.load_or_create(directory, DEFAULT_TRUST_DOMAIN)


def issue(ca: CertificateAuthority, identity: SpiffeId) -> WorkloadCertificate:
    """A fresh key and a workload certificate for ``identity`` (one per sidecar)."""
    key = generate_workload_key()
    answer = ca.sign_workload(validate_csr(build_csr(key, identity)))
    return WorkloadCertificate.from_ca_response(identity, key, answer.chain_pem)


def sidecar_specs(workload: Workload, workdir: Path) -> dict[str, envoy.SidecarSpec]:
    """Each pod's sidecar (keyed ``<namespace>/<pod>``), TLS files still to be written
    at the paths named. Pure: who calls whom comes from the workload's pairs."""
    specs: dict[str, envoy.SidecarSpec] = {}
    for index, pod in enumerate(sorted(workload.pods, key=lambda p: p.key)):
        if pod.ip is None:
            raise CompareError(f"pod {pod.namespace}/{pod.name} has no IP")
        directory = workdir / str(index)
        destinations: list[envoy.Destination] = []
        for pair in workload.pairs:
            if pair.client.key == pod.key and pair.server.ip is not None:
                destinations.append(
                    envoy.Destination(
                        name=f"{pair.server.namespace}/{pair.server.name}",
                        ip=pair.server.ip,
                        port=SIDECAR_INBOUND_PORT,
                        identity=identity_of(pair.server),
                        outbound_port=SIDECAR_OUTBOUND_BASE + len(destinations),
                    )
                )
        callers = tuple(identity_of(p.client) for p in workload.pairs if p.server.key == pod.key)
        specs[f"{pod.namespace}/{pod.name}"] = envoy.SidecarSpec(
            pod=f"{pod.namespace}/{pod.name}",
            pod_ip=pod.ip,
            identity=identity_of(pod),
            app_port=APP_PORT,
            inbound_port=SIDECAR_INBOUND_PORT,
            callers=callers,
            destinations=tuple(destinations),
            files=envoy.TlsFiles(
                chain=directory / "cert-chain.pem",
                key=directory / "key.pem",
                roots=directory / "root-cert.pem",
            ),
            admin_socket=directory / "admin.sock",
        )
    return specs


class SidecarEnvoyMode(Mode):
    """Mode 1b: an Envoy sidecar in every pod (the namespace not enrolled in ambient)."""

    issue_mode = "1b"

    def __init__(
        self, name: str = "sidecar-envoy", concurrency: int | None = envoy.SIDECAR_CONCURRENCY
    ) -> None:
        self.name = name
        self.concurrency = concurrency
        workers = f"{concurrency} worker" if concurrency else "Envoy's default workers"
        self.title = f"Envoy sidecar per pod ({workers})"
        self.notes = (
            "static bootstrap with only the pod's own listeners and clusters (tcp_proxy, L4): "
            "a lower bound of an Istio sidecar, which holds the mesh's xDS config and an "
            "HTTP filter chain",
        )
        self.sidecars: dict[str, _Sidecar] = {}

    def settings(self) -> dict[str, Any]:
        binary = envoy.envoy_binary()
        return {
            "concurrency": self.concurrency,
            "envoy": envoy.envoy_version(binary),
            "inbound_port": SIDECAR_INBOUND_PORT,
        }

    async def setup(self, ctx: ModeContext) -> None:
        workload, lab = ctx.workload, ctx.lab
        enrolled = [f"{p.namespace}/{p.name}" for p in workload.pods if _enrolled(lab, p)]
        if enrolled:
            raise CompareError(
                f"pods {', '.join(enrolled)} are enrolled in ambient: sidecars need pods "
                "outside the mesh's capture"
            )
        binary = envoy.envoy_binary()
        ca = load_lab_ca(lab)
        ctx.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        specs = sidecar_specs(workload, ctx.workdir)
        pods = {f"{p.namespace}/{p.name}": p for p in workload.pods}
        self.sidecars = {key: _Sidecar(pods[key], spec) for key, spec in specs.items()}
        ctx.say(f"issuing {len(specs)} workload certificates from the lab's CA")
        for sidecar in self.sidecars.values():
            directory = sidecar.spec.files.chain.parent
            envoy.write_tls_files(directory, issue(ca, sidecar.spec.identity))
            config_path = directory / "envoy.yaml"
            config_path.write_text(yaml.safe_dump(envoy.bootstrap(sidecar.spec), sort_keys=False))
        limiter = trio.CapacityLimiter(PARALLEL_STARTS)
        prefix = lab.config().prefix

        async def start(sidecar: _Sidecar) -> None:
            async with limiter:
                pod = sidecar.pod
                directory = sidecar.spec.files.chain.parent
                key = f"compare.{self.name}.{pod.namespace}.{pod.name}"
                admin = sidecar.spec.admin_socket

                async def ready() -> bool:
                    status, _ = await trio.to_thread.run_sync(http_get_unix, admin, "/ready", 1.0)
                    return status == 200

                sidecar.record = await spawn_tracked(
                    lab.paths,
                    key,
                    envoy.envoy_argv(
                        binary, directory / "envoy.yaml", concurrency=self.concurrency
                    ),
                    netns_path=pod.netns,
                    log_path=lab.paths.logs_dir / f"{key}.log",
                    ready=ready,
                    timeout=ENVOY_READY_TIMEOUT,
                    what=f"the Envoy sidecar of {pod.namespace}/{pod.name}",
                    lab_prefix=prefix,
                )

        ctx.say(
            f"starting {len(specs)} Envoy sidecars (concurrency {self.concurrency or 'default'})"
        )
        async with trio.open_nursery() as nursery:
            for sidecar in self.sidecars.values():
                nursery.start_soon(start, sidecar)

    def proxies(self, ctx: ModeContext) -> list[ProxyProcess]:
        found = []
        for key, sidecar in sorted(self.sidecars.items()):
            if sidecar.record is None:
                raise CompareError(f"the sidecar of {key} was not started")
            found.append(ProxyProcess(sidecar.record.pid, "envoy-sidecar", sidecar.pod.node, key))
        return found

    def url(self, ctx: ModeContext, pair: Pair) -> str:
        spec = self.sidecars[f"{pair.client.namespace}/{pair.client.name}"].spec
        name = f"{pair.server.namespace}/{pair.server.name}"
        port = next(d.outbound_port for d in spec.destinations if d.name == name)
        return f"http://{envoy.LOOPBACK}:{port}/echo"

    async def _handshakes(self) -> dict[str, dict[str, int]]:
        found = {}
        for key, sidecar in self.sidecars.items():
            status, body = await trio.to_thread.run_sync(
                http_get_unix, sidecar.spec.admin_socket, "/stats?format=json&filter=ssl"
            )
            if status != 200:
                raise CompareError(f"the sidecar of {key}: GET /stats answered {status}")
            found[key] = envoy.handshakes(json.loads(body))
        return found

    async def snapshot(self, ctx: ModeContext) -> Any:
        return await self._handshakes()

    async def verify(self, ctx: ModeContext, before: Any) -> dict[str, Any]:
        after = await self._handshakes()
        report: dict[str, Any] = {}
        for key, sidecar in sorted(self.sidecars.items()):
            delta = {k: v - before[key][k] for k, v in after[key].items()}
            want = {
                "inbound": 1 if sidecar.spec.callers else 0,
                "outbound": 1 if sidecar.spec.destinations else 0,
            }
            report[key] = {"mtls_handshakes": delta}
            for direction, least in want.items():
                if delta[direction] < least:
                    raise CompareError(
                        f"the sidecar of {key} completed no {direction} mTLS handshake during "
                        f"the load: the traffic did not go through it (log: "
                        f"{ctx.lab.paths.logs_dir}/compare.{self.name}.{key.replace('/', '.')}.log)"
                    )
        return report

    async def teardown(self, ctx: ModeContext) -> None:
        records = [s.record for s in self.sidecars.values() if s.record is not None]
        await stop_tracked(ctx.lab.paths, records)
        self.sidecars = {}
        shutil.rmtree(ctx.workdir, ignore_errors=True)  # the keys go with it


def _enrolled(lab: Lab, pod: Pod) -> bool:
    current = lab.registry.pod(pod.namespace, pod.name)
    return current is not None and current.enrolled


# --------------------------------------------------------------------------- mode 1a: our sidecar


class SidecarZtunnelMode(Mode):
    """Mode 1a: our ztunnel in dedicated mode inside every pod, the nodes' shared ztunnels
    stopped; the pods captured by the node agents as in ambient mode."""

    name = "sidecar-ztunnel"
    issue_mode = "1a"
    title = "our ztunnel as a sidecar per pod"
    notes = (
        "`underpass ztunnel --dedicated` in each pod's netns with the pod's own token, holding "
        "only that pod's identity; the pods are captured by the node agents with the same "
        "in-pod rules as in ambient mode (namespace enrolled), the nodes' shared ztunnels "
        "stopped meanwhile",
    )

    def __init__(self) -> None:
        self.records: dict[str, procs.ProcRecord] = {}  # "<ns>/<pod>" -> its sidecar
        self.stopped: list[Node] = []  # nodes whose shared ztunnel this mode stopped

    async def setup(self, ctx: ModeContext) -> None:
        lab, workload = ctx.lab, ctx.workload
        paths, cfg = lab.paths, lab.config()
        # The node's ztunnel would take the pods' connections as well: stop it before
        # the pods are captured, so that it never serves them.
        ctx.say("stopping the nodes' shared ztunnels")
        for node in workload.nodes:
            if mesh.state(paths, node.name)["running"]:
                await mesh.stop_ztunnel(paths, node.name)
                self.stopped.append(node)
        _label_ambient(ctx, True)
        await _registry_enrolment(ctx, True)
        ctx.say(f"starting {len(workload.pods)} ztunnel sidecars (one per pod, in its netns)")
        limiter = trio.CapacityLimiter(PARALLEL_STARTS)
        everyone = {key_of(p) for p in workload.pods}

        async def start(pod: Pod) -> None:
            async with limiter:
                await mesh.ensure_sidecar(paths, cfg, pod)
            record = procs.read_record(paths.procs_dir, mesh.sidecar_key(pod))
            if record is None:
                raise CompareError(f"the ztunnel sidecar of {key_of(pod)} left no record")
            self.records[key_of(pod)] = record
            who = f"the ztunnel sidecar of {key_of(pod)}"
            own = identity_of(pod).uri

            def serving() -> bool:
                dump = _config_dump(pod.netns, who)
                served, hbone = _view(dump)
                held = [c.get("identity") for c in dump.get("certificates", [])]
                return served == {key_of(pod)} and held == [own] and everyone <= hbone

            await _until(
                f"{who} serving only its pod, with only {own}, and tunnelling to all "
                f"{len(everyone)} pods over HBONE (log: {self._log(ctx, pod)})",
                serving,
                ENROL_TIMEOUT,
            )

        async with trio.open_nursery() as nursery:
            for pod in workload.pods:
                nursery.start_soon(start, pod)

    def _log(self, ctx: ModeContext, pod: Pod) -> Path:
        return ctx.lab.paths.logs_dir / f"{mesh.sidecar_key(pod)}.log"

    def proxies(self, ctx: ModeContext) -> list[ProxyProcess]:
        found = []
        for pod in sorted(ctx.workload.pods, key=lambda p: p.key):
            record = self.records.get(key_of(pod))
            if record is None or not procs.is_alive(record):
                raise CompareError(
                    f"the ztunnel sidecar of {key_of(pod)} is not running; its log: "
                    f"{self._log(ctx, pod)}"
                )
            found.append(
                ProxyProcess(
                    record.pid, "ztunnel-sidecar", pod.node, key_of(pod), identity_of(pod).uri
                )
            )
        return found

    async def _links(self, ctx: ModeContext) -> dict[tuple[str, str], Counter[Link]]:
        """Each sidecar's mTLS connections, as destination (inbound) and source (outbound)."""
        found = {}
        for pod in ctx.workload.pods:
            who = f"the ztunnel sidecar of {key_of(pod)}"
            text = await trio.to_thread.run_sync(
                _local_get, pod.netns, METRICS_PORT, "/metrics", who
            )
            for reporter in ("destination", "source"):
                found[(key_of(pod), reporter)] = evidence.mtls_links(text.decode(), reporter)
        return found

    async def snapshot(self, ctx: ModeContext) -> Any:
        return await self._links(ctx)

    async def verify(self, ctx: ModeContext, before: Any) -> dict[str, Any]:
        """For every pair: the client's sidecar opened an mTLS connection to the server as
        the client, and the server's sidecar accepted one from the client, each end proving
        its own identity."""
        after = await self._links(ctx)
        delta = {k: after[k] - before.get(k, Counter()) for k in after}
        report: dict[str, Any] = {}
        for pair in ctx.workload.pairs:
            link = pair_link(pair)
            ends = {
                "inbound": (pair.server, delta[(key_of(pair.server), "destination")][link]),
                "outbound": (pair.client, delta[(key_of(pair.client), "source")][link]),
            }
            for direction, (pod, count) in ends.items():
                report.setdefault(key_of(pod), {})[f"mtls_{direction}_connections"] = count
                if count < 1:
                    raise CompareError(
                        f"the ztunnel sidecar of {key_of(pod)} saw no {direction} mTLS "
                        f"connection {evidence.describe([link])} during the load: the traffic "
                        f"did not go through it (log: {self._log(ctx, pod)})"
                    )
        return report

    async def teardown(self, ctx: ModeContext) -> None:
        lab, workload = ctx.lab, ctx.workload
        ctx.say(f"stopping {len(workload.pods)} ztunnel sidecars")
        async with trio.open_nursery() as nursery:  # each drains for a moment: all at once
            for pod in workload.pods:
                nursery.start_soon(mesh.stop_sidecar, lab.paths, pod)
        self.records = {}
        _label_ambient(ctx, False)
        await _registry_enrolment(ctx, False)
        cfg = lab.config()
        for node in self.stopped:
            await mesh.ensure_ztunnel(lab.paths, cfg, node)
        self.stopped = []
        await _ztunnels_follow(ctx, False)


# --------------------------------------------------------------------------- the registry

#: name -> factory (the names and their order: :mod:`underpass.compare.catalog`).
MODES: Final[dict[str, Callable[[], Mode]]] = {
    "node": NodeMode,
    "service-account": ServiceAccountMode,
    "waypoint": WaypointMode,
    "sidecar-ztunnel": SidecarZtunnelMode,
    "sidecar-envoy": SidecarEnvoyMode,
    "sidecar-envoy-default": lambda: SidecarEnvoyMode("sidecar-envoy-default", None),
}


def resolve_modes(names: Sequence[str]) -> list[Mode]:
    """The modes named (each once, in the order given); a clear error for others."""
    modes: list[Mode] = []
    for name in names:
        if name in PLANNED and name not in MODES:
            raise CompareError(
                f"mode {name!r} (issue 6 mode {PLANNED[name]}) is not available yet; "
                f"available: {', '.join(MODES)}"
            )
        if name not in MODES:
            raise CompareError(f"unknown mode {name!r}; available: {', '.join(MODES)}")
        if any(m.name == name for m in modes):
            raise CompareError(f"mode {name!r} is named twice")
        modes.append(MODES[name]())
    if not modes:
        raise CompareError("no modes to compare")
    return modes
