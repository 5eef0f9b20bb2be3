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
  captured modes; a local listener for explicit sidecars);
- :meth:`Mode.snapshot` / :meth:`Mode.verify` prove, after the load, that
  the traffic went through the mode's proxies with mTLS (a mode that is not
  really in the path would measure nothing): the run fails otherwise;
- :meth:`Mode.teardown` undoes :meth:`Mode.setup`, leaving the lab as it
  found it for the next mode.

Modes today: ``node`` (mode 2: the lab's ztunnel per node, namespace enrolled
with ``istio.io/dataplane-mode=ambient``), ``sidecar-envoy`` (mode 1b, the
baseline: an Envoy per pod, certificates from the lab's CA, one worker) and
``sidecar-envoy-default`` (the same with Envoy's default worker count). To add
one (1a ``sidecar-ztunnel``, 3 ``service-account``, 4 ``waypoint``): subclass
:class:`Mode`, start its processes with
:func:`underpass.compare.launch.spawn_tracked` (so that ``lab down`` stops
them whatever happens) or through the lab, and register the class in
:data:`MODES` and its name in :mod:`underpass.compare.catalog` (out of
``PLANNED``). Modes run one after the
other in the same lab, each torn down before the next is set up.
"""

from __future__ import annotations

import json
import shutil
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
from underpass.compare import envoy
from underpass.compare.catalog import PLANNED
from underpass.compare.errors import CompareError
from underpass.compare.launch import http_get_in_netns, http_get_unix, spawn_tracked, stop_tracked
from underpass.lab import mesh, procs
from underpass.lab.cluster import Lab
from underpass.lab.registry import Node, Pod
from underpass.lab.sampleapp import HTTP_PORT

#: Every pod's application (an HTTP echo) listens here.
APP_PORT: Final = HTTP_PORT
AMBIENT_LABEL: Final = "istio.io/dataplane-mode"
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

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "role": self.role, "node": self.node, "pod": self.pod}


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


# --------------------------------------------------------------------------- mode 2: node


def _ztunnel_get(node: Node, port: int, target: str) -> bytes:
    status, body = http_get_in_netns(node.netns, "127.0.0.1", port, target)
    if status != 200:
        raise OSError(f"ztunnel on {node.name}: GET {target} answered {status}")
    return body


def _ztunnel_view(node: Node) -> tuple[set[str], set[str]]:
    """From the node's ztunnel: the pods it serves, and the workloads it tunnels
    to over HBONE (both as ``<namespace>/<name>``)."""
    dump = json.loads(_ztunnel_get(node, ADMIN_PORT, "/config_dump"))
    served = {f"{p['namespace']}/{p['name']}" for p in dump.get("pods", [])}
    hbone = {
        f"{w['namespace']}/{w['name']}"
        for w in dump.get("workloads", [])
        if w.get("tunnel_protocol") == "HBONE"
    }
    return served, hbone


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


class NodeMode(Mode):
    """Mode 2: one ztunnel per node (the lab's own), the namespace enrolled in ambient."""

    name = "node"
    issue_mode = "2"
    title = "ztunnel per node (ambient)"

    async def _enrolment(self, ctx: ModeContext, enrolled: bool) -> None:
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
        everyone = {f"{p.namespace}/{p.name}" for p in workload.pods}
        for node in workload.nodes:
            local = {f"{p.namespace}/{p.name}" for p in workload.pods_on(node.name)}

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

    async def setup(self, ctx: ModeContext) -> None:
        namespace = ctx.workload.namespace
        ctx.lab.label("namespace", namespace, [f"{AMBIENT_LABEL}=ambient"], overwrite=True)
        await self._enrolment(ctx, True)

    def proxies(self, ctx: ModeContext) -> list[ProxyProcess]:
        found = []
        for node in ctx.workload.nodes:
            pid = mesh.state(ctx.lab.paths, node.name)["pid"]
            if pid is None:
                raise CompareError(
                    f"ztunnel on {node.name} is not running; its log: "
                    f"{mesh.ztunnel_log(ctx.lab.paths, node.name)}"
                )
            found.append(ProxyProcess(int(pid), "ztunnel", node.name))
        return found

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
        ctx.lab.label("namespace", ctx.workload.namespace, [f"{AMBIENT_LABEL}-"])
        await self._enrolment(ctx, False)


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


def identity_of(pod: Pod) -> SpiffeId:
    return SpiffeId(DEFAULT_TRUST_DOMAIN, pod.namespace, pod.service_account)


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


# --------------------------------------------------------------------------- the registry

#: name -> factory (the names and their order: :mod:`underpass.compare.catalog`).
MODES: Final[dict[str, Callable[[], Mode]]] = {
    "node": NodeMode,
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
