"""``underpass compare --kube`` (:mod:`underpass.compare.kube`).

Unit tests (in memory): the inventory from pod JSON, reading memory from
metrics text, the comparison's arithmetic, the rendering, the refresh loop with
an in-memory cluster, the options.

k8s tests: the real kube-apiserver of the session, with real processes as the
proxies: each serves ``/metrics`` with prometheus_client's own process collector,
so ``process_resident_memory_bytes`` is that process's RSS, and holds a
different ballast so that mixing up two proxies would show. Their pods carry
status.podIP and the ``underpass.io/metrics-port`` annotation, as a kubelet and
the lab would set them. The tables must show those processes' RSS (read from
/proc afterwards, within a tolerance since RSS moves) and the pods created per
node. Every process, pod and node is removed afterwards, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import prometheus_client
import pytest
import trio
import trio.testing
from kubernetes import client

from tests.support.kubecluster import KubeCluster
from tests.support.kubeobjects import (
    MERGE_PATCH,
    ensure_namespace,
    ensure_node,
    ensure_service_account,
    unique_name,
)
from underpass.compare import kube
from underpass.compare.kube import (
    DEFAULT_SIDECAR_BYTES,
    MIB,
    Inventory,
    KubeApiSource,
    KubeCompareSettings,
    MemoryReading,
    MetricsError,
    MetricsVia,
    ProxyKind,
    ProxyPod,
)

NOW = dt.datetime(2026, 11, 25, 6, 0, 0, tzinfo=dt.UTC)
#: RSS moves a little between the proxy's report and our look at /proc (a thread per request).
RSS_TOLERANCE = 1.5 * MIB


# -- pod JSON as the API serves it ---------------------------------------------------------


def pod_json(
    name: str,
    *,
    namespace: str = "shop",
    node: str | None = "node-a",
    phase: str = "Running",
    pod_ip: str | None = "10.244.1.7",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    containers: Sequence[str] = ("app",),
    init_containers: Sequence[str] = (),
    host_network: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": c} for c in containers]}
    if init_containers:
        spec["initContainers"] = [{"name": c, "restartPolicy": "Always"} for c in init_containers]
    if node is not None:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": phase}
    if pod_ip is not None:
        status["podIP"] = pod_ip
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
        },
        "spec": spec,
        "status": status,
    }


def ztunnel_json(name: str, node: str, **kwargs: Any) -> dict[str, Any]:
    return pod_json(name, namespace="istio-system", node=node, labels={"app": "ztunnel"}, **kwargs)


def proxy(kind: ProxyKind, name: str, node: str, namespace: str = "istio-system") -> ProxyPod:
    return ProxyPod(kind, namespace, name, node, "10.0.0.1", 15020)


# -- unit: inventory -----------------------------------------------------------------------


@pytest.mark.unit
def test_inventory_counts_running_application_pods_per_node() -> None:
    running = [
        pod_json("a1", node="node-a"),
        pod_json("a2", node="node-a", namespace="other"),
        pod_json("b1", node="node-b"),
        pod_json("pending", node="node-a", phase="Pending"),
        pod_json("unbound", node=None),
        pod_json("system", namespace="kube-system"),
        pod_json("istiod", namespace="istio-system"),
        pod_json("host", host_network=True),
    ]
    inventory = kube.build_inventory([], running, mesh_namespace="istio-system")
    assert inventory.pods_per_node == {"node-a": 2, "node-b": 1}
    assert inventory.proxies == ()


@pytest.mark.unit
def test_inventory_finds_ztunnels_and_notes_those_it_cannot_measure() -> None:
    ztunnels = [
        ztunnel_json("ztunnel-a", "node-a", annotations={"underpass.io/metrics-port": "9102"}),
        ztunnel_json("ztunnel-b", "node-b"),
        ztunnel_json("ztunnel-pending", "node-c", phase="Pending"),
        ztunnel_json("ztunnel-no-ip", "node-d", pod_ip=None),
        ztunnel_json("ztunnel-bad-port", "node-e", annotations={"underpass.io/metrics-port": "x"}),
    ]
    inventory = kube.build_inventory(ztunnels, [], mesh_namespace="istio-system")
    assert [(p.name, p.node, p.metrics_port, p.metrics_path) for p in inventory.ztunnels] == [
        ("ztunnel-a", "node-a", 9102, "/metrics"),
        ("ztunnel-b", "node-b", 15020, "/metrics"),
    ]
    notes = "\n".join(inventory.notes)
    assert "istio-system/ztunnel-pending is Pending" in notes
    assert "istio-system/ztunnel-no-ip has no pod IP" in notes
    assert "underpass.io/metrics-port='x'" in notes
    assert len(inventory.notes) == 3


@pytest.mark.unit
def test_inventory_finds_sidecars_by_container_native_sidecar_or_label() -> None:
    running = [
        pod_json("envoy", containers=("app", "istio-proxy")),
        pod_json("native", init_containers=("istio-proxy",)),
        pod_json("ours", labels={"underpass.io/proxy": "sidecar"}),
        pod_json("plain"),
        pod_json("mesh-proxy", namespace="istio-system", containers=("istio-proxy",)),
    ]
    inventory = kube.build_inventory([], running, mesh_namespace="istio-system")
    assert [p.name for p in inventory.sidecars] == ["envoy", "native", "ours"]
    assert {p.metrics_path for p in inventory.sidecars} == {"/stats/prometheus"}
    assert inventory.pods_per_node == {"node-a": 4}  # sidecar pods are pods too


# -- unit: memory from metrics ------------------------------------------------------------------


def exposition(values: Mapping[str, float], *, labels: Mapping[str, str] | None = None) -> str:
    """Prometheus text as prometheus_client writes it, with gauges of these values."""
    registry = prometheus_client.CollectorRegistry()
    for name, value in values.items():
        label_names = sorted(labels or {})
        gauge = prometheus_client.Gauge(name, "test gauge", label_names, registry=registry)
        (gauge.labels(**labels) if labels else gauge).set(value)
    return prometheus_client.generate_latest(registry).decode()


@pytest.mark.unit
def test_ztunnel_memory_is_its_process_rss_from_a_real_process_collector() -> None:
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    text = prometheus_client.generate_latest(registry).decode()
    expected = registry.get_sample_value("process_resident_memory_bytes")
    assert expected is not None and expected > MIB
    assert kube.proxy_memory(text, ProxyKind.ZTUNNEL) == int(expected)


@pytest.mark.unit
def test_sidecar_memory_adds_agent_rss_and_envoy_heap() -> None:
    # Envoy's /stats/prometheus writes label-less gauges with empty braces.
    envoy = (
        "# TYPE envoy_server_memory_allocated gauge\n"
        "envoy_server_memory_allocated{} 5660824\n"
        "# TYPE envoy_server_memory_physical_size gauge\n"
        "envoy_server_memory_physical_size{} 13560638\n"
    )
    agent = exposition({"process_resident_memory_bytes": 41_000_000})
    assert kube.proxy_memory(envoy, ProxyKind.SIDECAR) == 13_560_638
    assert kube.proxy_memory(agent + envoy, ProxyKind.SIDECAR) == 41_000_000 + 13_560_638
    only_allocated = "envoy_server_memory_allocated 5660824\n"
    assert kube.proxy_memory(only_allocated, ProxyKind.SIDECAR) == 5_660_824
    assert kube.proxy_memory(agent, ProxyKind.SIDECAR) == 41_000_000


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        (exposition({"other_gauge": 1}), ProxyKind.ZTUNNEL, "no process_resident_memory_bytes"),
        (exposition({"other_gauge": 1}), ProxyKind.SIDECAR, "neither"),
        (
            'process_resident_memory_bytes{pid="1"} 10\n'
            'process_resident_memory_bytes{pid="2"} 20\n',
            ProxyKind.ZTUNNEL,
            "more than once",
        ),
        ("process_resident_memory_bytes -5\n", ProxyKind.ZTUNNEL, "not a memory size"),
        ("process_resident_memory_bytes NaN\n", ProxyKind.ZTUNNEL, "not a memory size"),
        ("<html>not metrics</html>\n", ProxyKind.ZTUNNEL, "not Prometheus text"),
    ],
)
def test_unusable_metrics_are_errors_that_say_why(text: str, kind: ProxyKind, message: str) -> None:
    with pytest.raises(MetricsError, match=message):
        kube.proxy_memory(text, kind)


# -- unit: the comparison and its rendering ------------------------------------------------------


@pytest.mark.unit
def test_sidecar_cost_is_the_mean_of_measured_sidecars_else_the_default() -> None:
    sidecars = [
        MemoryReading(proxy(ProxyKind.SIDECAR, "s1", "node-a", "shop"), 40 * MIB),
        MemoryReading(proxy(ProxyKind.SIDECAR, "s2", "node-a", "shop"), 60 * MIB),
        MemoryReading(proxy(ProxyKind.SIDECAR, "s3", "node-b", "shop"), None, "refused"),
        MemoryReading(proxy(ProxyKind.ZTUNNEL, "z", "node-a"), 500 * MIB),
    ]
    measured = kube.sidecar_cost(sidecars, default_bytes=DEFAULT_SIDECAR_BYTES)
    assert (measured.bytes_per_sidecar, measured.measured_sidecars) == (50 * MIB, 2)
    assert "mean of 2 sidecars" in measured.source
    default = kube.sidecar_cost(sidecars[2:], default_bytes=DEFAULT_SIDECAR_BYTES)
    assert (default.bytes_per_sidecar, default.measured_sidecars) == (DEFAULT_SIDECAR_BYTES, 0)
    assert "Envoy 1.40 idle PSS measured in the lab" in default.source
    given = kube.sidecar_cost([], default_bytes=70 * MIB)
    assert given.bytes_per_sidecar == 70 * MIB
    assert "--sidecar-memory-mib" in given.source


def _example() -> kube.Comparison:
    inventory = Inventory(
        pods_per_node={"node-a": 20, "node-b": 4, "node-c": 3, "node-d": 2},
        proxies=(
            proxy(ProxyKind.ZTUNNEL, "z-a", "node-a"),
            proxy(ProxyKind.ZTUNNEL, "z-b1", "node-b"),
            proxy(ProxyKind.ZTUNNEL, "z-b2", "node-b"),
            proxy(ProxyKind.ZTUNNEL, "z-c", "node-c"),
        ),
        notes=("istio-system/z-x is Pending: not measured",),
    )
    readings = [
        MemoryReading(inventory.proxies[0], 30 * MIB),
        MemoryReading(inventory.proxies[1], 20 * MIB),
        MemoryReading(inventory.proxies[2], 25 * MIB),
        MemoryReading(inventory.proxies[3], None, "connection refused"),
    ]
    return kube.compare(inventory, readings, default_sidecar_bytes=10 * MIB, taken_at=NOW)


@pytest.mark.unit
def test_compare_sums_ztunnels_per_node_and_estimates_sidecar_mode() -> None:
    comparison = _example()
    rows = {row.node: row for row in comparison.rows}
    assert list(rows) == ["node-a", "node-b", "node-c", "node-d"]
    a, b, c, d = rows.values()
    assert (a.pods, a.ztunnel_bytes, a.sidecar_estimate_bytes) == (20, 30 * MIB, 200 * MIB)
    assert a.bytes_per_pod == 1.5 * MIB
    assert a.ratio == pytest.approx(0.15)
    assert (b.ztunnel_pods, b.ztunnel_bytes) == (2, 45 * MIB)  # both ztunnels on node-b
    assert c.ztunnel_bytes is None and c.ratio is None  # its only ztunnel was not read
    assert (d.ztunnel_pods, d.ztunnel_bytes) == (0, None)
    # The total covers the measured nodes only, so that its ratio compares like with like.
    total = comparison.total
    assert (total.pods, total.ztunnel_bytes, total.sidecar_estimate_bytes) == (
        24,
        75 * MIB,
        240 * MIB,
    )
    assert comparison.measured_nodes == 2
    assert comparison.failed_proxies == 1
    assert not comparison.all_read
    notes = "\n".join(comparison.notes)
    assert "z-x is Pending" in notes
    assert "ztunnel istio-system/z-c on node-c: connection refused" in notes
    assert "node node-d has 2 pods but no running ztunnel pod" in notes


@pytest.mark.unit
def test_a_node_without_ztunnel_is_reported_but_not_a_failure() -> None:
    inventory = Inventory(
        pods_per_node={"node-a": 2, "node-b": 1},
        proxies=(proxy(ProxyKind.ZTUNNEL, "z-a", "node-a"),),
    )
    readings = [MemoryReading(inventory.proxies[0], 30 * MIB)]
    comparison = kube.compare(inventory, readings, default_sidecar_bytes=MIB, taken_at=NOW)
    assert comparison.all_read
    assert comparison.measured_nodes == 1


@pytest.mark.unit
def test_render_shows_every_node_the_total_the_cost_source_and_the_notes() -> None:
    text = kube.render(_example())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("NODE"))
    assert re.split(r"\s{2,}", header) == [
        "NODE",
        "PODS",
        "ZTUNNEL MEMORY",
        "MEMORY PER POD",
        "SIDECAR ESTIMATE",
        "RATIO",
    ]
    cells = {
        re.split(r"\s{2,}", line)[0]: re.split(r"\s{2,}", line)[1:]
        for line in lines[lines.index(header) + 1 :]
        if line.startswith(("node-", "TOTAL"))
    }
    assert cells["node-a"] == ["20", "30.0 MiB", "1.5 MiB", "200.0 MiB", "15.0%"]
    assert cells["node-b"] == ["4", "45.0 MiB", "11.2 MiB", "40.0 MiB", "112.5%"]
    assert cells["node-c"] == ["3", "-", "-", "30.0 MiB", "-"]
    assert cells["node-d"] == ["2", "-", "-", "20.0 MiB", "-"]
    assert cells["TOTAL (2 of 4 nodes measured)"] == [
        "24",
        "75.0 MiB",
        "3.1 MiB",
        "240.0 MiB",
        "31.2%",
    ]
    assert "2026-11-25 06:00:00 UTC: 4 nodes, 29 pods, 4 ztunnel pods, 0 sidecars" in text
    assert "sidecar cost: 10.0 MiB per pod (given with --sidecar-memory-mib" in text
    assert "  - ztunnel istio-system/z-c on node-c: connection refused" in text


@pytest.mark.unit
def test_render_of_an_empty_cluster_says_so() -> None:
    empty = kube.compare(
        Inventory({}, ()), [], default_sidecar_bytes=DEFAULT_SIDECAR_BYTES, taken_at=NOW
    )
    text = kube.render(empty)
    assert "no nodes with pods or ztunnels found" in text
    assert "TOTAL" not in text
    assert "0 nodes, 0 pods, 0 ztunnel pods, 0 sidecars" in text
    assert "63.0 MiB per pod (default, no sidecar measured" in text


# -- unit: one refresh and the loop, with an in-memory cluster ------------------------------------


@dataclasses.dataclass
class MemoryCluster:
    """A :class:`kube.ClusterSource` over fixed pod JSON and metrics text per pod."""

    ztunnel_pods: list[dict[str, Any]]
    running_pods: list[dict[str, Any]]
    metrics: dict[str, str]  # pod name -> text; missing: refused
    hang: set[str] = dataclasses.field(default_factory=set)
    released: threading.Event = dataclasses.field(default_factory=threading.Event)
    list_error: str | None = None
    asked: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)

    def list_ztunnel_pods(self, namespace: str, selector: str) -> list[kube.JSON]:
        if self.list_error:
            raise kube.ClusterError(self.list_error)
        assert (namespace, selector) == ("istio-system", "app=ztunnel")
        return list(self.ztunnel_pods)

    def list_running_pods(self) -> list[kube.JSON]:
        return list(self.running_pods)

    def fetch_metrics(self, proxy: ProxyPod) -> str:
        self.asked.append((proxy.name, proxy.metrics_port, proxy.metrics_path))
        if proxy.name in self.hang:
            self.released.wait(30)
        if proxy.name not in self.metrics:
            raise MetricsError("connection refused")
        return self.metrics[proxy.name]


def _rss(value: float) -> str:
    return exposition({"process_resident_memory_bytes": value})


@pytest.mark.unit
async def test_take_sample_reads_every_proxy_and_survives_one_that_hangs() -> None:
    cluster = MemoryCluster(
        ztunnel_pods=[
            ztunnel_json("z-a", "node-a", annotations={"underpass.io/metrics-port": "9000"}),
            ztunnel_json("z-b", "node-b"),
            ztunnel_json("z-c", "node-c"),
        ],
        running_pods=[
            pod_json("web", node="node-a", containers=("app", "istio-proxy")),
            pod_json("db", node="node-a"),
            pod_json("api", node="node-b"),
        ],
        metrics={"z-a": _rss(30 * MIB), "z-b": _rss(20 * MIB), "web": _rss(50 * MIB)},
        hang={"z-c"},
    )
    settings = KubeCompareSettings(metrics_timeout=0.05)
    try:
        comparison = await kube.take_sample(cluster, settings, now=NOW)
    finally:
        cluster.released.set()
    assert sorted(cluster.asked) == [
        ("web", 15020, "/stats/prometheus"),
        ("z-a", 9000, "/metrics"),
        ("z-b", 15020, "/metrics"),
        ("z-c", 15020, "/metrics"),
    ]
    rows = {row.node: row for row in comparison.rows}
    assert (rows["node-a"].pods, rows["node-a"].ztunnel_bytes) == (2, 30 * MIB)
    assert rows["node-a"].sidecar_estimate_bytes == 2 * 50 * MIB  # the measured sidecar's cost
    assert (rows["node-b"].pods, rows["node-b"].ztunnel_bytes) == (1, 20 * MIB)
    assert rows["node-c"].ztunnel_bytes is None
    assert any("z-c on node-c: no answer within" in note for note in comparison.notes)
    assert comparison.cost.measured_sidecars == 1


@pytest.mark.unit
async def test_watch_once_prints_one_table_and_exits_by_what_it_could_read() -> None:
    good = MemoryCluster([ztunnel_json("z-a", "node-a")], [pod_json("web")], {"z-a": _rss(MIB)})
    out, err = io.StringIO(), io.StringIO()
    assert await kube.watch(good, KubeCompareSettings(once=True), out, err) == 0
    assert out.getvalue().count("NODE") == 1
    assert "node-a" in out.getvalue()
    assert "1 node, 1 pod, 1 ztunnel pod, 0 sidecars" in out.getvalue()
    assert err.getvalue() == ""

    unread = MemoryCluster([ztunnel_json("z-a", "node-a")], [pod_json("web")], {})
    out = io.StringIO()
    assert await kube.watch(unread, KubeCompareSettings(once=True), out, err) == 1
    assert "connection refused" in out.getvalue()
    assert "TOTAL" not in out.getvalue()  # no node measured: no total to show

    no_mesh = MemoryCluster([], [pod_json("web")], {})
    out = io.StringIO()
    assert await kube.watch(no_mesh, KubeCompareSettings(once=True), out, err) == 1
    assert "no pods in namespace istio-system match app=ztunnel" in out.getvalue()

    broken = MemoryCluster([], [], {}, list_error="the API server refused to list pods: 403")
    out, err = io.StringIO(), io.StringIO()
    assert await kube.watch(broken, KubeCompareSettings(once=True), out, err) == 1
    assert out.getvalue() == ""
    assert "refused to list pods: 403" in err.getvalue()


@pytest.mark.unit
async def test_watch_refreshes_every_interval_until_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cluster = MemoryCluster([ztunnel_json("z-a", "node-a")], [pod_json("web")], {"z-a": _rss(MIB)})
    # Jump only when idle for a while in real time: the fetch threads must not look idle.
    autojump_clock.autojump_threshold = 0.2
    out, err = io.StringIO(), io.StringIO()
    settings = KubeCompareSettings(interval=10.0)
    with trio.move_on_after(35):
        await kube.watch(cluster, settings, out, err)
    # Refreshes at t = 0, 10, 20, 30.
    assert out.getvalue().count("refreshing every 10 s; Ctrl-C stops") == 4
    assert len(cluster.asked) == 4


@pytest.mark.unit
def test_options_and_their_defaults() -> None:
    parser = argparse.ArgumentParser()
    kube.add_kube_arguments(parser)
    args = parser.parse_args(["--kube"])
    settings = kube.settings_from_args(args)
    assert settings == KubeCompareSettings()
    assert args.metrics_via == "apiserver-proxy"
    assert args.kubeconfig is None
    args = parser.parse_args(
        ["--kube", "--once", "--interval", "2", "--sidecar-memory-mib", "50.5",
         "--mesh-namespace", "mesh", "--ztunnel-selector", "k=v", "--metrics-via", "direct"]
    )  # fmt: skip
    settings = kube.settings_from_args(args)
    assert (settings.once, settings.interval, settings.mesh_namespace) == (True, 2.0, "mesh")
    assert settings.default_sidecar_bytes == round(50.5 * MIB)
    assert settings.ztunnel_selector == "k=v"
    for bad in (["--interval", "0"], ["--sidecar-memory-mib", "-1"], ["--metrics-via", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


@pytest.mark.unit
def test_a_missing_kubeconfig_is_a_clear_error(tmp_path: Any, capsys: Any) -> None:
    parser = argparse.ArgumentParser()
    kube.add_kube_arguments(parser)
    missing = tmp_path / "nope.yaml"
    assert kube.run_kube(parser.parse_args(["--kube", "--kubeconfig", str(missing)])) == 1
    assert f"cannot configure the Kubernetes client from {missing}" in capsys.readouterr().err


# -- k8s: real processes as the proxies ------------------------------------------------------------

#: A genuine process metrics endpoint: prometheus_client's default registry (with its
#: process collector) served on argv[1]:0, after touching argv[2] MiB of ballast.
METRICS_PROCESS = """
import sys
from prometheus_client import start_http_server
ballast = b"\\x01" * (int(sys.argv[2]) * 2**20)  # touched, so it is resident
server, _thread = start_http_server(0, addr=sys.argv[1])
print(server.server_port, flush=True)
sys.stdin.read()  # until the test closes stdin (or dies)
"""


@dataclasses.dataclass(frozen=True)
class MetricsProcess:
    pid: int
    address: str
    port: int

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def metrics_processes(address: str, ballasts_mib: Sequence[int]) -> Iterator[list[MetricsProcess]]:
    """One metrics process per ballast, on ``address``; all stopped on exit."""
    procs: list[subprocess.Popen[str]] = []
    try:
        started = []
        for ballast in ballasts_mib:
            proc = subprocess.Popen(
                [sys.executable, "-c", METRICS_PROCESS, address, str(ballast)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.strip().isdigit():
                proc.kill()
                _, stderr = proc.communicate(timeout=10)
                pytest.fail(f"the metrics process on {address} did not start: {stderr}")
            started.append(MetricsProcess(proc.pid, address, int(line)))
        yield started
    finally:
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


#: The service account of every test pod (the test cluster has no ``default`` ones).
SERVICE_ACCOUNT = "compare-test"


class ClusterObjects:
    """Pods and nodes made the way a kubelet would report them; all deleted by :meth:`cleanup`."""

    def __init__(self, api: Any) -> None:
        self.api = api
        self.core: Any = client.CoreV1Api(api)
        self.pods: list[tuple[str, str]] = []
        self.nodes: list[str] = []
        self.service_accounts: set[str] = set()  # namespaces with SERVICE_ACCOUNT

    def node(self, prefix: str) -> str:
        name = unique_name(prefix)
        ensure_node(self.api, name)
        self.nodes.append(name)
        return name

    def pod(
        self,
        namespace: str,
        name: str,
        *,
        node: str,
        pod_ip: str = "10.244.9.9",
        phase: str = "Running",
        labels: Mapping[str, str] | None = None,
        metrics: MetricsProcess | None = None,
        metrics_at: tuple[str, int] | None = None,
        containers: Sequence[str] = ("app",),
        host_network: bool = False,
    ) -> None:
        """A pod; ``metrics`` (or ``metrics_at``) sets its IP and metrics-port annotation."""
        if metrics is not None:
            metrics_at = (metrics.address, metrics.port)
        annotations = {}
        if metrics_at is not None:
            pod_ip, port = metrics_at
            annotations["underpass.io/metrics-port"] = str(port)
        body = client.V1Pod(
            metadata=client.V1ObjectMeta(
                name=name, labels=dict(labels or {}), annotations=annotations
            ),
            spec=client.V1PodSpec(
                node_name=node,
                service_account_name=SERVICE_ACCOUNT,
                host_network=host_network or None,
                containers=[
                    client.V1Container(name=c, image="registry.invalid/app:1") for c in containers
                ],
            ),
        )
        if namespace not in self.service_accounts:
            ensure_service_account(self.api, namespace, SERVICE_ACCOUNT)
            self.service_accounts.add(namespace)
        self.core.create_namespaced_pod(namespace, body)
        self.pods.append((namespace, name))
        status = {"status": {"phase": phase, "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}}
        self.core.patch_namespaced_pod_status(name, namespace, status, _content_type=MERGE_PATCH)

    def cleanup(self) -> None:
        # Without a kubelet, only a zero grace period deletes a bound pod at once.
        for namespace, name in self.pods:
            with contextlib.suppress(client.ApiException):
                self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        for name in self.nodes:
            with contextlib.suppress(client.ApiException):
                self.core.delete_node(name)
        for namespace in self.service_accounts:
            with contextlib.suppress(client.ApiException):
                self.core.delete_namespaced_service_account(SERVICE_ACCOUNT, namespace)


@pytest.fixture
def objects(kube_api: Any) -> Iterator[ClusterObjects]:
    made = ClusterObjects(kube_api)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def namespaces(kube_api: Any) -> tuple[str, str]:
    """(mesh namespace, application namespace), new for each test: the cluster is shared."""
    mesh, app = unique_name("mesh"), unique_name("shop")
    ensure_namespace(kube_api, mesh)
    ensure_namespace(kube_api, app)
    return mesh, app


def assert_rss(measured: int | None, processes: Sequence[MetricsProcess]) -> None:
    expected = sum(p.rss() for p in processes)
    assert measured is not None
    assert abs(measured - expected) <= RSS_TOLERANCE * len(processes), (
        f"read {measured / MIB:.1f} MiB, the processes have {expected / MIB:.1f} MiB resident"
    )


@pytest.mark.k8s
async def test_direct_metrics_of_ztunnels_and_pods_per_node(
    kube_api: Any, objects: ClusterObjects, namespaces: tuple[str, str]
) -> None:
    mesh, app = namespaces
    node_a, node_b = objects.node("cmp-a"), objects.node("cmp-b")
    with metrics_processes("127.0.0.1", [8, 24, 40]) as (z_a, z_b1, z_b2):
        # Two ztunnel pods on node-b (a rollout): the node's figure is their sum.
        objects.pod(mesh, "ztunnel-a", node=node_a, labels={"app": "ztunnel"}, metrics=z_a)
        objects.pod(mesh, "ztunnel-b1", node=node_b, labels={"app": "ztunnel"}, metrics=z_b1)
        objects.pod(mesh, "ztunnel-b2", node=node_b, labels={"app": "ztunnel"}, metrics=z_b2)
        for i in range(3):
            objects.pod(app, f"web-{i}", node=node_a)
        for i in range(5):
            objects.pod(app, f"api-{i}", node=node_b)
        # Not counted: not running, the mesh's own, kube-system, host network.
        objects.pod(app, "pending", node=node_a, phase="Pending")
        objects.pod(app, "done", node=node_b, phase="Succeeded")
        objects.pod(mesh, "istiod", node=node_a)
        objects.pod("kube-system", unique_name("coredns"), node=node_a)
        objects.pod(app, "host-agent", node=node_b, host_network=True)

        source = KubeApiSource(kube_api, metrics_via=MetricsVia.DIRECT)
        comparison = await kube.take_sample(source, KubeCompareSettings(mesh_namespace=mesh))

        rows = {row.node: row for row in comparison.rows}
        assert (rows[node_a].pods, rows[node_a].ztunnel_pods) == (3, 1)
        assert (rows[node_b].pods, rows[node_b].ztunnel_pods) == (5, 2)
        assert_rss(rows[node_a].ztunnel_bytes, [z_a])
        assert_rss(rows[node_b].ztunnel_bytes, [z_b1, z_b2])
        assert comparison.cost.measured_sidecars == 0
        assert comparison.cost.bytes_per_sidecar == DEFAULT_SIDECAR_BYTES
        assert rows[node_a].sidecar_estimate_bytes == 3 * DEFAULT_SIDECAR_BYTES
        assert rows[node_b].sidecar_estimate_bytes == 5 * DEFAULT_SIDECAR_BYTES
        assert rows[node_b].ratio == pytest.approx(
            (z_b1.rss() + z_b2.rss()) / (5 * DEFAULT_SIDECAR_BYTES), rel=0.05
        )
        assert comparison.failed_proxies == 0


@pytest.mark.k8s
async def test_the_per_sidecar_cost_is_measured_from_the_sidecars_present(
    kube_api: Any, objects: ClusterObjects, namespaces: tuple[str, str]
) -> None:
    mesh, app = namespaces
    node = objects.node("cmp-side")
    with metrics_processes("127.0.0.1", [4, 40, 16]) as (ztunnel, envoy_like, ours):
        objects.pod(mesh, "ztunnel", node=node, labels={"app": "ztunnel"}, metrics=ztunnel)
        objects.pod(app, "web", node=node, containers=("app", "istio-proxy"), metrics=envoy_like)
        objects.pod(app, "api", node=node, labels={"underpass.io/proxy": "sidecar"}, metrics=ours)
        objects.pod(app, "db", node=node)

        source = KubeApiSource(kube_api, metrics_via=MetricsVia.DIRECT)
        comparison = await kube.take_sample(source, KubeCompareSettings(mesh_namespace=mesh))

        assert comparison.cost.measured_sidecars == 2
        assert_rss(comparison.cost.bytes_per_sidecar * 2, [envoy_like, ours])
        row = next(row for row in comparison.rows if row.node == node)
        assert row.pods == 3
        assert_rss(row.ztunnel_bytes, [ztunnel])
        assert row.sidecar_estimate_bytes == 3 * comparison.cost.bytes_per_sidecar
        assert "mean of 2 sidecars" in kube.render(comparison)


def unused_port(address: str) -> int:
    """A port on ``address`` where nothing listens (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def non_loopback_ipv4() -> str:
    """An IPv4 address of this machine that the API server's pod proxy accepts."""
    result = subprocess.run(
        ["ip", "-json", "-4", "addr", "show"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"cannot list this machine's addresses with 'ip': {result.stderr}")
    for interface in json.loads(result.stdout):
        for address in interface.get("addr_info", []):
            if address.get("scope") == "global":
                return str(address["local"])
    pytest.fail(
        "this machine has no global IPv4 address; the API server's pod proxy refuses "
        "loopback, so the apiserver-proxy test needs one"
    )


@pytest.mark.k8s
async def test_metrics_through_the_api_servers_pod_proxy(
    kube_api: Any, objects: ClusterObjects, namespaces: tuple[str, str]
) -> None:
    mesh, app = namespaces
    address = non_loopback_ipv4()
    node_a, node_b = objects.node("cmp-proxy-a"), objects.node("cmp-proxy-b")
    with metrics_processes(address, [12]) as (ztunnel,):
        objects.pod(mesh, "ztunnel-a", node=node_a, labels={"app": "ztunnel"}, metrics=ztunnel)
        objects.pod(app, "web", node=node_a)
        objects.pod(app, "api", node=node_b)
        # node-b's ztunnel has a metrics port where nothing listens.
        dead_port = unused_port(address)
        objects.pod(
            mesh,
            "ztunnel-b",
            node=node_b,
            labels={"app": "ztunnel"},
            metrics_at=(address, dead_port),
        )
        source = KubeApiSource(kube_api, metrics_via=MetricsVia.APISERVER_PROXY)
        comparison = await kube.take_sample(source, KubeCompareSettings(mesh_namespace=mesh))

        rows = {row.node: row for row in comparison.rows}
        assert rows[node_a].pods == 1
        assert_rss(rows[node_a].ztunnel_bytes, [ztunnel])
        assert rows[node_b].ztunnel_bytes is None
        assert comparison.failed_proxies == 1
        note = next(n for n in comparison.notes if f"ztunnel {mesh}/ztunnel-b" in n)
        assert "pod proxy could not read" in note
        assert f"/pods/ztunnel-b:{dead_port}/proxy/metrics" in note


@pytest.mark.k8s
def test_the_command_prints_the_table_once(
    kube_cluster: KubeCluster,
    objects: ClusterObjects,
    namespaces: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    mesh, app = namespaces
    node = objects.node("cmp-cli")
    parser = argparse.ArgumentParser()
    kube.add_kube_arguments(parser)
    args = parser.parse_args(
        ["--kube", "--once", "--kubeconfig", str(kube_cluster.kubeconfig),
         "--mesh-namespace", mesh, "--metrics-via", "direct"]
    )  # fmt: skip
    with metrics_processes("127.0.0.1", [20]) as (ztunnel,):
        objects.pod(mesh, "ztunnel", node=node, labels={"app": "ztunnel"}, metrics=ztunnel)
        objects.pod(app, "web", node=node)
        objects.pod(app, "api", node=node)
        started = time.monotonic()
        status = kube.run_kube(args)
        elapsed = time.monotonic() - started
        rss = ztunnel.rss()

    out = capsys.readouterr().out
    assert status == 0, out
    assert elapsed < 30
    row = next(line for line in out.splitlines() if line.startswith(node))
    cells = re.split(r"\s{2,}", row)
    assert cells[1] == "2"
    shown = float(cells[2].removesuffix(" MiB")) * MIB
    assert abs(shown - rss) <= RSS_TOLERANCE + 0.05 * MIB  # shown with one decimal
    assert cells[4] == kube.mib_text(2 * DEFAULT_SIDECAR_BYTES)
    assert "default, no sidecar measured in the cluster: Envoy 1.40 idle PSS" in out
