"""``underpass compare --kube``: ambient vs sidecar proxy memory on a real cluster, live.

Owns the Kubernetes side of ``underpass compare`` (issue 6, point 4): find the
mesh's proxies through the Kubernetes API, read each one's memory from its
Prometheus metrics endpoint, count the pods per node, and print one table per
refresh with the memory the node-shared ztunnels use and what sidecar mode
would cost for the same pods.

What it reads (all from one ``list pods`` per refresh plus one selector list):

- **ztunnel pods**: pods in the mesh namespace (``--mesh-namespace``, default
  ``istio-system``) matching ``--ztunnel-selector`` (default ``app=ztunnel``).
  Memory: ``process_resident_memory_bytes`` from ``:15020/metrics``.
- **sidecars**: Running pods outside the mesh namespace and ``kube-system`` that
  have a container named ``istio-proxy`` (a regular container, or an init
  container, as native sidecars are), or the label ``underpass.io/proxy:
  sidecar`` (our own sidecars). Memory: from ``:15020/stats/prometheus`` (the
  sidecar agent's merged endpoint), the sum of ``process_resident_memory_bytes``
  (the agent or our sidecar process) and Envoy's heap,
  ``envoy_server_memory_physical_size`` (else ``envoy_server_memory_allocated``);
  at least one of the two must be there. Envoy reports no RSS of its own, so an
  Envoy measured this way is a lower bound (its binary's pages are missing).
- **pods per node**: Running pods with ``spec.nodeName``, outside the mesh
  namespace and ``kube-system``, not ``hostNetwork`` (neither a sidecar nor
  ztunnel would proxy those).
- The annotation ``underpass.io/metrics-port: "<port>"`` on a proxy pod moves
  its metrics port from 15020; it exists so that the lab and the tests can run
  several proxies on one address (a real cluster needs none).

How the endpoints are reached (``--metrics-via``): ``apiserver-proxy`` (the
default, works from outside the cluster) GETs
``/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy{path}`` through the API
server, which needs ``get`` on ``pods/proxy``; ``direct`` connects to the pod IP,
which works only from inside the cluster network (and, unlike the API server's
proxy, also to loopback addresses).

The sidecar-mode estimate for a node is its pod count times the per-sidecar
cost: the mean memory of the sidecars found in the cluster, or, when there are
none, :data:`DEFAULT_SIDECAR_BYTES` (Envoy's idle PSS measured in the lab,
overridable with ``--sidecar-memory-mib``); the output says which. The ratio
is ztunnel memory over that estimate.

Layout: pure functions (inventory, metrics parsing, comparison, rendering) over
the API's JSON and the metrics text; :class:`KubeApiSource` does the blocking
I/O, run in threads from trio (the Kubernetes client is blocking).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import functools
import http.client
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

import trio
from prometheus_client.parser import text_string_to_metric_families

from underpass.cli import table

JSON = Mapping[str, Any]

MIB: Final = 2**20
DEFAULT_MESH_NAMESPACE: Final = "istio-system"
DEFAULT_ZTUNNEL_SELECTOR: Final = "app=ztunnel"
METRICS_PORT: Final = 15020
ZTUNNEL_METRICS_PATH: Final = "/metrics"
#: istio-agent's merged endpoint (agent + Envoy + app); plain Envoy admin uses the same path.
SIDECAR_METRICS_PATH: Final = "/stats/prometheus"
METRICS_PORT_ANNOTATION: Final = "underpass.io/metrics-port"
PROXY_LABEL: Final = "underpass.io/proxy"
SIDECAR_LABEL_VALUE: Final = "sidecar"
SIDECAR_CONTAINER: Final = "istio-proxy"
SYSTEM_NAMESPACE: Final = "kube-system"
#: Envoy 1.40 idle, PSS, measured in the lab (/work/shared/PERFORMANCE-NOTES.md: ~63 MB).
DEFAULT_SIDECAR_MIB: Final = 63.0
DEFAULT_SIDECAR_BYTES: Final = int(DEFAULT_SIDECAR_MIB * MIB)
DEFAULT_SIDECAR_SOURCE: Final = "Envoy 1.40 idle PSS measured in the lab (PERFORMANCE-NOTES.md)"
DEFAULT_INTERVAL: Final = 5.0
DEFAULT_METRICS_TIMEOUT: Final = 5.0
FETCH_CONCURRENCY: Final = 16
LIST_PAGE_SIZE: Final = 500
MAX_METRICS_BYTES: Final = 16 * MIB
CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"

RSS_METRIC: Final = "process_resident_memory_bytes"
ENVOY_HEAP_METRICS: Final = ("envoy_server_memory_physical_size", "envoy_server_memory_allocated")


class KubeCompareError(Exception):
    """Configuration or cluster access failed as a whole; the message says what to do."""


class ClusterError(KubeCompareError):
    """The Kubernetes API could not be asked (unreachable, refused, nonsense)."""


class MetricsError(Exception):
    """One proxy's memory could not be read; the message names the endpoint and why."""


class ProxyKind(enum.Enum):
    ZTUNNEL = "ztunnel"
    SIDECAR = "sidecar"

    @property
    def metrics_path(self) -> str:
        return ZTUNNEL_METRICS_PATH if self is ProxyKind.ZTUNNEL else SIDECAR_METRICS_PATH


class MetricsVia(enum.Enum):
    APISERVER_PROXY = "apiserver-proxy"
    DIRECT = "direct"


# -- what is in the cluster ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyPod:
    """A mesh proxy whose metrics endpoint can be read."""

    kind: ProxyKind
    namespace: str
    name: str
    node: str
    pod_ip: str
    metrics_port: int

    @property
    def metrics_path(self) -> str:
        return self.kind.metrics_path

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Inventory:
    """Pods per node and the proxies to read, from one listing of the cluster."""

    pods_per_node: Mapping[str, int]
    proxies: tuple[ProxyPod, ...]
    notes: tuple[str, ...] = ()

    @property
    def ztunnels(self) -> tuple[ProxyPod, ...]:
        return tuple(p for p in self.proxies if p.kind is ProxyKind.ZTUNNEL)

    @property
    def sidecars(self) -> tuple[ProxyPod, ...]:
        return tuple(p for p in self.proxies if p.kind is ProxyKind.SIDECAR)


def _metadata(pod: JSON) -> JSON:
    return pod.get("metadata") or {}


def _spec(pod: JSON) -> JSON:
    return pod.get("spec") or {}


def _status(pod: JSON) -> JSON:
    return pod.get("status") or {}


def _ref(pod: JSON) -> str:
    meta = _metadata(pod)
    return f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"


def metrics_port(pod: JSON) -> int:
    """The pod's metrics port: its :data:`METRICS_PORT_ANNOTATION`, else 15020."""
    annotations = _metadata(pod).get("annotations") or {}
    text = annotations.get(METRICS_PORT_ANNOTATION)
    if text is None:
        return METRICS_PORT
    port = str(text).strip()
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"annotation {METRICS_PORT_ANNOTATION}={text!r} on {_ref(pod)} is not a port (1-65535)"
        )
    return int(port)


def is_sidecar_pod(pod: JSON) -> bool:
    """An ``istio-proxy`` container (regular or init/native sidecar), or our sidecar label."""
    labels = _metadata(pod).get("labels") or {}
    if labels.get(PROXY_LABEL) == SIDECAR_LABEL_VALUE:
        return True
    spec = _spec(pod)
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    return any(c.get("name") == SIDECAR_CONTAINER for c in containers)


def is_counted_pod(pod: JSON, *, mesh_namespace: str) -> bool:
    """A pod that a sidecar would be injected into: Running, on a node, an application pod."""
    namespace = _metadata(pod).get("namespace")
    spec = _spec(pod)
    return (
        _status(pod).get("phase") == "Running"
        and bool(spec.get("nodeName"))
        and namespace not in (mesh_namespace, SYSTEM_NAMESPACE)
        and not spec.get("hostNetwork", False)
    )


def _proxy_pod(pod: JSON, kind: ProxyKind) -> ProxyPod:
    """A :class:`ProxyPod`, or ValueError saying why this pod cannot be measured."""
    status = _status(pod)
    phase = status.get("phase") or "in no phase"
    if phase != "Running":
        raise ValueError(f"{kind.value} pod {_ref(pod)} is {phase}: not measured")
    node = _spec(pod).get("nodeName")
    if not node:
        raise ValueError(f"{kind.value} pod {_ref(pod)} is on no node: not measured")
    pod_ip = status.get("podIP")
    if not pod_ip:
        raise ValueError(f"{kind.value} pod {_ref(pod)} has no pod IP yet: not measured")
    meta = _metadata(pod)
    return ProxyPod(
        kind=kind,
        namespace=str(meta.get("namespace")),
        name=str(meta.get("name")),
        node=str(node),
        pod_ip=str(pod_ip),
        metrics_port=metrics_port(pod),
    )


def build_inventory(
    ztunnel_pods: Iterable[JSON], running_pods: Iterable[JSON], *, mesh_namespace: str
) -> Inventory:
    """Pods per node and the proxies to read.

    ``ztunnel_pods`` are the selector's pods in the mesh namespace (any phase, so
    that a ztunnel that is not running shows up in the notes); ``running_pods``
    are all Running pods of the cluster.
    """
    notes: list[str] = []
    proxies: list[ProxyPod] = []
    for pod in ztunnel_pods:
        try:
            proxies.append(_proxy_pod(pod, ProxyKind.ZTUNNEL))
        except ValueError as exc:
            notes.append(str(exc))
    pods_per_node: dict[str, int] = {}
    for pod in running_pods:
        if not is_counted_pod(pod, mesh_namespace=mesh_namespace):
            continue
        node = str(_spec(pod)["nodeName"])
        pods_per_node[node] = pods_per_node.get(node, 0) + 1
        if is_sidecar_pod(pod):
            try:
                proxies.append(_proxy_pod(pod, ProxyKind.SIDECAR))
            except ValueError as exc:
                notes.append(str(exc))
    return Inventory(pods_per_node=pods_per_node, proxies=tuple(proxies), notes=tuple(notes))


# -- reading a proxy's memory from its metrics ------------------------------------------------


def metric_values(text: str, names: Iterable[str]) -> dict[str, float]:
    """The value of each of ``names`` found in Prometheus text ``text``.

    A name that appears in more than one sample is ambiguous (whose memory is
    it?) and a :class:`MetricsError`, as is text that does not parse.
    """
    wanted = set(names)
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in wanted:
                    continue
                if sample.name in found:
                    raise MetricsError(
                        f"{sample.name} appears more than once (labels {sample.labels}); "
                        "cannot tell which process it measures"
                    )
                found[sample.name] = float(sample.value)
    except (ValueError, IndexError, KeyError) as exc:
        raise MetricsError(f"the metrics are not Prometheus text format ({exc})") from None
    for name, value in found.items():
        if not math.isfinite(value) or value < 0:
            raise MetricsError(f"{name} is {value}, not a memory size")
    return found


def proxy_memory(text: str, kind: ProxyKind) -> int:
    """A proxy's memory in bytes from its metrics text (module docstring: which metrics)."""
    if kind is ProxyKind.ZTUNNEL:
        values = metric_values(text, [RSS_METRIC])
        if RSS_METRIC not in values:
            raise MetricsError(f"no {RSS_METRIC} in the metrics: is this a ztunnel endpoint?")
        return int(values[RSS_METRIC])
    values = metric_values(text, [RSS_METRIC, *ENVOY_HEAP_METRICS])
    envoy_heap = next((values[n] for n in ENVOY_HEAP_METRICS if n in values), None)
    if RSS_METRIC not in values and envoy_heap is None:
        raise MetricsError(
            f"neither {RSS_METRIC} nor {' / '.join(ENVOY_HEAP_METRICS)} in the metrics: "
            "is this a sidecar's stats endpoint?"
        )
    return int(values.get(RSS_METRIC, 0.0) + (envoy_heap or 0.0))


@dataclass(frozen=True, slots=True)
class MemoryReading:
    """One proxy's memory, or why it could not be read."""

    proxy: ProxyPod
    memory_bytes: int | None
    error: str | None = None


# -- the comparison -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SidecarCost:
    """Memory one sidecar costs, and where that figure comes from."""

    bytes_per_sidecar: int
    measured_sidecars: int  # 0: the default was used
    source: str


def sidecar_cost(readings: Iterable[MemoryReading], *, default_bytes: int) -> SidecarCost:
    """The mean of the sidecars read, else ``default_bytes`` (with its source said)."""
    measured = [
        r.memory_bytes
        for r in readings
        if r.proxy.kind is ProxyKind.SIDECAR and r.memory_bytes is not None
    ]
    if measured:
        count = len(measured)
        plural = "sidecar" if count == 1 else "sidecars"
        return SidecarCost(
            bytes_per_sidecar=round(sum(measured) / count),
            measured_sidecars=count,
            source=f"measured: mean of {count} {plural} in the cluster",
        )
    if default_bytes == DEFAULT_SIDECAR_BYTES:
        source = f"default, no sidecar measured in the cluster: {DEFAULT_SIDECAR_SOURCE}"
    else:
        source = "given with --sidecar-memory-mib, no sidecar measured in the cluster"
    return SidecarCost(bytes_per_sidecar=default_bytes, measured_sidecars=0, source=source)


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node: its pods, its ztunnels' memory, and sidecar mode's estimate for its pods."""

    node: str
    pods: int
    ztunnel_pods: int
    ztunnel_bytes: int | None  # None: not (completely) measured
    sidecar_estimate_bytes: int

    @property
    def bytes_per_pod(self) -> float | None:
        if self.ztunnel_bytes is None or self.pods == 0:
            return None
        return self.ztunnel_bytes / self.pods

    @property
    def ratio(self) -> float | None:
        """ztunnel memory / sidecar-mode estimate (0.05 = ambient uses 5% of sidecar mode)."""
        if self.ztunnel_bytes is None or self.sidecar_estimate_bytes == 0:
            return None
        return self.ztunnel_bytes / self.sidecar_estimate_bytes


@dataclass(frozen=True, slots=True)
class Comparison:
    """One refresh's result: what the table shows."""

    taken_at: dt.datetime
    rows: tuple[NodeRow, ...]
    total: NodeRow  # over the measured nodes only
    cost: SidecarCost
    sidecars_found: int
    failed_proxies: int
    notes: tuple[str, ...] = field(default=())

    @property
    def measured_nodes(self) -> int:
        return sum(1 for row in self.rows if row.ztunnel_bytes is not None)

    @property
    def all_read(self) -> bool:
        """Every proxy found was read, and there was at least one ztunnel.

        A node without a ztunnel is not a failure: the mesh may not run there.
        """
        return self.failed_proxies == 0 and any(row.ztunnel_pods for row in self.rows)


def compare(
    inventory: Inventory,
    readings: Sequence[MemoryReading],
    *,
    default_sidecar_bytes: int,
    taken_at: dt.datetime,
) -> Comparison:
    """Per node: pods, ztunnel memory (the sum of its ztunnels), sidecar estimate."""
    cost = sidecar_cost(readings, default_bytes=default_sidecar_bytes)
    notes = list(inventory.notes)
    by_node: dict[str, list[MemoryReading]] = {}
    for reading in readings:
        if reading.proxy.kind is ProxyKind.ZTUNNEL:
            by_node.setdefault(reading.proxy.node, []).append(reading)
        if reading.error is not None:
            notes.append(
                f"{reading.proxy.kind.value} {reading.proxy.ref} on {reading.proxy.node}: "
                f"{reading.error}"
            )
    rows: list[NodeRow] = []
    for node in sorted(set(inventory.pods_per_node) | set(by_node)):
        pods = inventory.pods_per_node.get(node, 0)
        ztunnels = by_node.get(node, [])
        values = [r.memory_bytes for r in ztunnels]
        if not ztunnels:
            notes.append(f"node {node} has {pods} pods but no running ztunnel pod to measure")
        measured = sum(v for v in values if v is not None) if values else None
        if any(v is None for v in values):
            measured = None  # a partial sum would understate the node
        rows.append(
            NodeRow(
                node=node,
                pods=pods,
                ztunnel_pods=len(ztunnels),
                ztunnel_bytes=measured,
                sidecar_estimate_bytes=pods * cost.bytes_per_sidecar,
            )
        )
    measured_rows = [row for row in rows if row.ztunnel_bytes is not None]
    total = NodeRow(
        node="TOTAL",
        pods=sum(row.pods for row in measured_rows),
        ztunnel_pods=sum(row.ztunnel_pods for row in measured_rows),
        ztunnel_bytes=sum(row.ztunnel_bytes or 0 for row in measured_rows),
        sidecar_estimate_bytes=sum(row.sidecar_estimate_bytes for row in measured_rows),
    )
    return Comparison(
        taken_at=taken_at,
        rows=tuple(rows),
        total=total,
        cost=cost,
        sidecars_found=len(inventory.sidecars),
        failed_proxies=sum(1 for r in readings if r.error is not None),
        notes=tuple(notes),
    )


# -- rendering -------------------------------------------------------------------------------

HEADERS: Final = ("NODE", "PODS", "ZTUNNEL MEMORY", "MEMORY PER POD", "SIDECAR ESTIMATE", "RATIO")


def counted(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def mib_text(value: float | None) -> str | None:
    return None if value is None else f"{value / MIB:.1f} MiB"


def ratio_text(value: float | None) -> str | None:
    return None if value is None else f"{value * 100:.1f}%"


def _cells(row: NodeRow, label: str) -> tuple[object, ...]:
    return (
        label,
        row.pods,
        mib_text(row.ztunnel_bytes),
        mib_text(row.bytes_per_pod),
        mib_text(row.sidecar_estimate_bytes),
        ratio_text(row.ratio),
    )


def render(comparison: Comparison) -> str:
    """The table with a heading, the sidecar cost's source and the notes."""
    rows = comparison.rows
    when = comparison.taken_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    counts = ", ".join(
        counted(n, what)
        for n, what in (
            (len(rows), "node"),
            (sum(row.pods for row in rows), "pod"),
            (sum(row.ztunnel_pods for row in rows), "ztunnel pod"),
            (comparison.sidecars_found, "sidecar"),
        )
    )
    lines = [
        f"proxy memory, ambient (ztunnel) vs sidecar mode, {when}: {counts}",
        f"sidecar cost: {mib_text(comparison.cost.bytes_per_sidecar)} per pod "
        f"({comparison.cost.source})",
        "",
    ]
    total_label = "TOTAL"
    if comparison.measured_nodes != len(rows):
        total_label = f"TOTAL ({comparison.measured_nodes} of {len(rows)} nodes measured)"
    body = [_cells(row, row.node) for row in rows]
    if comparison.measured_nodes:
        body.append(_cells(comparison.total, total_label))
    text = "\n".join(lines) + table.render(HEADERS, body)
    text += "sidecar estimate = pods x sidecar cost; ratio = ztunnel memory / sidecar estimate\n"
    if not rows:
        text += "no nodes with pods or ztunnels found\n"
    if comparison.notes:
        text += "notes:\n" + "".join(f"  - {note}\n" for note in comparison.notes)
    return text


# -- talking to the cluster --------------------------------------------------------------------


class ClusterSource(Protocol):
    """Blocking access to the cluster (run in threads)."""

    def list_ztunnel_pods(self, namespace: str, selector: str) -> list[JSON]: ...

    def list_running_pods(self) -> list[JSON]: ...

    def fetch_metrics(self, proxy: ProxyPod) -> str: ...


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fetch_direct(proxy: ProxyPod, *, timeout: float) -> str:
    """GET ``http://<pod ip>:<port><path>`` (only works from inside the cluster network)."""
    where = f"http://{_host_port(proxy.pod_ip, proxy.metrics_port)}{proxy.metrics_path}"
    connection = http.client.HTTPConnection(proxy.pod_ip, proxy.metrics_port, timeout=timeout)
    try:
        try:
            connection.request("GET", proxy.metrics_path, headers={"Accept": "text/plain"})
            response = connection.getresponse()
            body = response.read(MAX_METRICS_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise MetricsError(
                f"cannot read {where} ({type(exc).__name__}: {exc}); --metrics-via direct "
                "needs this machine to reach pod IPs (run it inside the cluster)"
            ) from None
    finally:
        connection.close()
    return _metrics_text(where, response.status, response.reason, body)


def _metrics_text(where: str, status: int, reason: str, body: bytes) -> str:
    if status != 200:
        detail = body[:200].decode("utf-8", "replace").strip()
        raise MetricsError(f"{where} answered {status} {reason}: {detail}")
    if len(body) > MAX_METRICS_BYTES:
        raise MetricsError(f"{where} sent more than {MAX_METRICS_BYTES // MIB} MiB of metrics")
    return body.decode("utf-8", "replace")


def _api_message(exc: Any) -> str:
    """The ``message`` of a Kubernetes Status body, else the HTTP reason."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(getattr(exc, "reason", "") or exc)


class KubeApiSource:
    """:class:`ClusterSource` over a ``kubernetes.client.ApiClient`` (thread-safe)."""

    def __init__(
        self, api: Any, *, metrics_via: MetricsVia, timeout: float = DEFAULT_METRICS_TIMEOUT
    ) -> None:
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api)
        self._host = str(api.configuration.host)
        self._metrics_via = metrics_via
        self._timeout = timeout

    def _list(self, what: str, call: Any, *args: Any, **kwargs: Any) -> list[JSON]:
        """All pages of a list call, as the API's JSON items."""
        from kubernetes.client.exceptions import ApiException

        items: list[JSON] = []
        token: str | None = None
        while True:
            page_args = dict(kwargs, limit=LIST_PAGE_SIZE)
            if token:
                page_args["_continue"] = token
            try:
                response = call(
                    *args,
                    **page_args,
                    _preload_content=False,
                    _request_timeout=self._timeout * 2,
                )
                page = json.loads(response.data)
            except ApiException as exc:
                hint = ""
                if exc.status in (401, 403):
                    hint = "; the kubeconfig's user needs 'list' on pods (in all namespaces)"
                raise ClusterError(
                    f"the API server at {self._host} refused to list {what}: {exc.status} "
                    f"{_api_message(exc)}{hint}"
                ) from None
            except ValueError as exc:
                raise ClusterError(f"the API server sent invalid JSON for {what}: {exc}") from None
            except Exception as exc:  # urllib3 and socket errors, whatever their class
                raise ClusterError(
                    f"cannot reach the API server at {self._host} to list {what} "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def list_ztunnel_pods(self, namespace: str, selector: str) -> list[JSON]:
        return self._list(
            f"pods in {namespace} with labels {selector}",
            self._core.list_namespaced_pod,
            namespace,
            label_selector=selector,
        )

    def list_running_pods(self) -> list[JSON]:
        return self._list(
            "running pods",
            self._core.list_pod_for_all_namespaces,
            field_selector="status.phase=Running",
        )

    def fetch_metrics(self, proxy: ProxyPod) -> str:
        if self._metrics_via is MetricsVia.DIRECT:
            return fetch_direct(proxy, timeout=self._timeout)
        return self._fetch_through_apiserver(proxy)

    def _fetch_through_apiserver(self, proxy: ProxyPod) -> str:
        from kubernetes.client.exceptions import ApiException

        where = (
            f"/api/v1/namespaces/{proxy.namespace}/pods/{proxy.name}:{proxy.metrics_port}"
            f"/proxy{proxy.metrics_path}"
        )
        try:
            response = self._core.connect_get_namespaced_pod_proxy_with_path(
                f"{proxy.name}:{proxy.metrics_port}",
                proxy.namespace,
                proxy.metrics_path.lstrip("/"),
                _preload_content=False,
                _request_timeout=self._timeout,
            )
            body = bytes(response.data)
        except ApiException as exc:
            message = _api_message(exc)
            if exc.status in (401, 403):
                raise MetricsError(
                    f"the API server refused {where} ({exc.status}: {message}); grant 'get' "
                    f"on pods/proxy in {proxy.namespace}, or use --metrics-via direct from "
                    "inside the cluster"
                ) from None
            hint = ""
            if exc.status == 400 and "address not allowed" in message:
                hint = (
                    "; the API server does not proxy to loopback or link-local pod IPs, "
                    "use --metrics-via direct"
                )
            raise MetricsError(
                f"the API server's pod proxy could not read {where} ({exc.status}: {message}){hint}"
            ) from None
        except Exception as exc:  # urllib3 and socket errors, whatever their class
            raise MetricsError(
                f"cannot reach the API server at {self._host} for {where} "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return _metrics_text(where, 200, "OK", body)


def kube_client(kubeconfig: Path | None) -> Any:
    """An ``ApiClient``: --kubeconfig, else in-cluster in a pod, else kubectl's default."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig) if kubeconfig else None,
                client_configuration=configuration,
            )
    except Exception as exc:
        where = str(kubeconfig) if kubeconfig else "$KUBECONFIG or ~/.kube/config"
        raise KubeCompareError(
            f"cannot configure the Kubernetes client from {where} "
            f"({type(exc).__name__}: {exc}); pass --kubeconfig or run in a pod"
        ) from None
    configuration.connection_pool_maxsize = FETCH_CONCURRENCY
    return client.ApiClient(configuration)


# -- one refresh, and the loop -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KubeCompareSettings:
    mesh_namespace: str = DEFAULT_MESH_NAMESPACE
    ztunnel_selector: str = DEFAULT_ZTUNNEL_SELECTOR
    default_sidecar_bytes: int = DEFAULT_SIDECAR_BYTES
    metrics_timeout: float = DEFAULT_METRICS_TIMEOUT
    interval: float = DEFAULT_INTERVAL
    once: bool = False


async def _read_one(
    source: ClusterSource,
    proxy: ProxyPod,
    *,
    limiter: trio.CapacityLimiter,
    deadline: float,
    into: list[MemoryReading],
) -> None:
    reading = MemoryReading(proxy, None, f"no answer within {deadline:g} s")
    with trio.move_on_after(deadline):
        try:
            text = await trio.to_thread.run_sync(
                source.fetch_metrics, proxy, limiter=limiter, abandon_on_cancel=True
            )
            reading = MemoryReading(proxy, proxy_memory(text, proxy.kind))
        except MetricsError as exc:
            reading = MemoryReading(proxy, None, str(exc))
    into.append(reading)


async def take_sample(
    source: ClusterSource, settings: KubeCompareSettings, *, now: dt.datetime | None = None
) -> Comparison:
    """List the cluster, read every proxy concurrently, compare. Raises :class:`ClusterError`."""
    ztunnel_pods = await trio.to_thread.run_sync(
        source.list_ztunnel_pods,
        settings.mesh_namespace,
        settings.ztunnel_selector,
        abandon_on_cancel=True,
    )
    running_pods = await trio.to_thread.run_sync(source.list_running_pods, abandon_on_cancel=True)
    inventory = build_inventory(ztunnel_pods, running_pods, mesh_namespace=settings.mesh_namespace)
    notes: tuple[str, ...] = ()
    if not ztunnel_pods:
        notes = (
            f"no pods in namespace {settings.mesh_namespace} match {settings.ztunnel_selector}: "
            "is the mesh installed there? (--mesh-namespace, --ztunnel-selector)",
        )
    readings: list[MemoryReading] = []
    limiter = trio.CapacityLimiter(FETCH_CONCURRENCY)
    # The HTTP timeout bounds each request; this bounds a thread that hangs past it.
    deadline = settings.metrics_timeout * 2 + 1
    async with trio.open_nursery() as nursery:
        for proxy in inventory.proxies:
            nursery.start_soon(
                functools.partial(
                    _read_one, source, proxy, limiter=limiter, deadline=deadline, into=readings
                )
            )
    order = {proxy: index for index, proxy in enumerate(inventory.proxies)}
    readings.sort(key=lambda r: order[r.proxy])
    comparison = compare(
        inventory,
        readings,
        default_sidecar_bytes=settings.default_sidecar_bytes,
        taken_at=now or dt.datetime.now(dt.UTC),
    )
    return dataclasses.replace(comparison, notes=notes + comparison.notes)


async def watch(
    source: ClusterSource, settings: KubeCompareSettings, out: TextIO, err: TextIO
) -> int:
    """Print a table now and every ``settings.interval`` s (once with ``settings.once``).

    With ``once``: 0 if every proxy was read (:attr:`Comparison.all_read`), else 1.
    Otherwise runs until cancelled (Ctrl-C); a failed refresh is reported and retried.
    """
    clear = out.isatty() and not settings.once
    next_refresh = trio.current_time()
    first = True
    while True:
        try:
            comparison = await take_sample(source, settings)
        except ClusterError as exc:
            print(f"underpass compare --kube: {exc}", file=err, flush=True)
            if settings.once:
                return 1
        else:
            if clear:
                out.write(CLEAR_SCREEN)
            elif not first:
                out.write("\n")
            out.write(render(comparison))
            if not settings.once:
                out.write(f"refreshing every {settings.interval:g} s; Ctrl-C stops\n")
            out.flush()
            first = False
            if settings.once:
                return 0 if comparison.all_read else 1
        next_refresh = max(next_refresh + settings.interval, trio.current_time())
        await trio.sleep_until(next_refresh)


# -- command line ---------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number above 0")
    return value


KUBE_DESCRIPTION: Final = """\
--kube: the comparison on a real cluster, live. Finds the ztunnel pods (--mesh-namespace,
--ztunnel-selector) and any sidecars (pods with an istio-proxy container or the label
underpass.io/proxy=sidecar), reads each one's memory from its metrics endpoint
(process_resident_memory_bytes on :15020/metrics; sidecars: :15020/stats/prometheus,
agent RSS + Envoy heap), counts Running pods per node (outside the mesh namespace and
kube-system, not hostNetwork), and prints per node: pods, ztunnel memory, memory per pod,
the sidecar-mode estimate (pods x the measured per-sidecar cost, else 63 MiB: Envoy's idle
PSS measured in the lab) and the ratio. Needs 'list' on pods and, with the default
--metrics-via apiserver-proxy, 'get' on pods/proxy.
"""


def add_kube_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--kube`` and its options (an argument group) to ``underpass compare``'s parser."""
    group = parser.add_argument_group("real cluster (--kube)", KUBE_DESCRIPTION)
    group.add_argument(
        "--kube",
        action="store_true",
        help="compare on the cluster of --kubeconfig instead of building the lab",
    )
    group.add_argument(
        "--kubeconfig",
        type=Path,
        metavar="FILE",
        help="kubeconfig (default: in-cluster in a pod, else $KUBECONFIG or ~/.kube/config)",
    )
    group.add_argument(
        "--mesh-namespace",
        default=DEFAULT_MESH_NAMESPACE,
        metavar="NS",
        help=f"the mesh's namespace, where ztunnel runs (default {DEFAULT_MESH_NAMESPACE})",
    )
    group.add_argument(
        "--ztunnel-selector",
        default=DEFAULT_ZTUNNEL_SELECTOR,
        metavar="SELECTOR",
        help=f"label selector of the ztunnel pods (default {DEFAULT_ZTUNNEL_SELECTOR})",
    )
    group.add_argument(
        "--metrics-via",
        choices=[m.value for m in MetricsVia],
        default=MetricsVia.APISERVER_PROXY.value,
        help="reach metrics endpoints through the API server's pod proxy (default; works "
        "from outside the cluster) or directly at the pod IP (inside the cluster network)",
    )
    group.add_argument(
        "--interval",
        type=_positive_float,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help=f"seconds between refreshes (default {DEFAULT_INTERVAL:g})",
    )
    group.add_argument(
        "--once", action="store_true", help="print one table and exit (1 if anything was unread)"
    )
    group.add_argument(
        "--sidecar-memory-mib",
        type=_positive_float,
        default=DEFAULT_SIDECAR_MIB,
        metavar="MIB",
        help="per-sidecar cost when no sidecar runs in the cluster (default "
        f"{DEFAULT_SIDECAR_MIB:g}: {DEFAULT_SIDECAR_SOURCE})",
    )
    group.add_argument(
        "--metrics-timeout",
        type=_positive_float,
        default=DEFAULT_METRICS_TIMEOUT,
        metavar="S",
        help=f"timeout of each request (default {DEFAULT_METRICS_TIMEOUT:g})",
    )


def settings_from_args(args: argparse.Namespace) -> KubeCompareSettings:
    return KubeCompareSettings(
        mesh_namespace=args.mesh_namespace,
        ztunnel_selector=args.ztunnel_selector,
        default_sidecar_bytes=round(args.sidecar_memory_mib * MIB),
        metrics_timeout=args.metrics_timeout,
        interval=args.interval,
        once=args.once,
    )


def run_kube(args: argparse.Namespace) -> int:
    """``underpass compare --kube``: the live table until Ctrl-C (or one with --once)."""
    settings = settings_from_args(args)
    try:
        api = kube_client(args.kubeconfig)
    except KubeCompareError as exc:
        print(f"underpass compare --kube: {exc}", file=sys.stderr)
        return 1
    try:
        source = KubeApiSource(
            api, metrics_via=MetricsVia(args.metrics_via), timeout=settings.metrics_timeout
        )
        return trio.run(watch, source, settings, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 130  # Ctrl-C is how the live table ends
    finally:
        api.close()
