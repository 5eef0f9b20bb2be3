"""Benchmark: how fast a model change reaches Delta ADS clients, and what 1k pods cost.

Measures, in one process (a first figure; the real control-plane benchmark is
later work):

- translation + snapshot preparation of a model of ``--pods`` pods (with a
  service per 10 pods and a policy per namespace), and the memory the model,
  its translation and the prepared snapshot hold (tracemalloc, and RSS growth);
- push latency: the real :class:`~discovery.server.DiscoveryServer` on
  loopback (plaintext, debounce window ``--quiet``), N in-process gRPC clients
  (grpc.aio, each driving a :class:`~underpass.xds.client.DeltaClient` and
  ACKing), one pod changed at a time; the time from the registry write until
  the last (and the median) client has the new version, for each N in
  ``--clients``.

Writes JSON (``--out``) and prints a table. It asserts nothing about speed.

    .venv/bin/python -m bench.discovery_push [--pods 1000] [--clients 10 100] [--out r.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import statistics
import sys
import threading
import time
import tracemalloc
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from discovery.model import (
    AuthorizationPolicy,
    Model,
    Namespace,
    Node,
    Owner,
    Pod,
    Rule,
    Service,
    ServicePort,
    Source,
)
from discovery.pipeline import SnapshotBuilder
from discovery.registry import MemoryRegistry
from discovery.server import DiscoveryServer
from discovery.translate import TranslateConfig
from underpass.xds.client import DeltaClient, ResourcesReceived
from underpass.xds.node import build_node
from underpass.xds.server import Snapshot
from underpass.xds.types import ADDRESS_TYPE_URL, DELTA_METHOD_PATH, WORKLOAD_TYPE_URLS


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_pod(i: int, generation: int = 0) -> Pod:
    ns = f"ns-{i % 10}"
    app = f"app-{i // 10}"
    return Pod(
        ns,
        f"{app}-{i}",
        node=f"node-{i % 20}",
        ips=(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",),
        service_account=app,
        labels={"app": app, "version": f"v{generation}", "pod-template-hash": "abc"},
        owner=Owner("ReplicaSet", f"{app}-abc"),
    )


def make_model(pods: int) -> Model:
    namespaces = [Namespace(f"ns-{n}", {"istio.io/dataplane-mode": "ambient"}) for n in range(10)]
    services = [
        Service(
            f"ns-{i % 10}",
            f"app-{i // 10}",
            vips=(f"10.96.{(i >> 8) & 255}.{i & 255}",),
            ports=(ServicePort(80, 8080),),
            selector={"app": f"app-{i // 10}"},
        )
        for i in range(0, pods, 10)
    ]
    policies = [
        AuthorizationPolicy(
            f"ns-{n}",
            "allow-same-ns",
            rules=(Rule(sources=(Source(namespaces=(f"ns-{n}",)),)),),
        )
        for n in range(10)
    ]
    return Model.of(
        namespaces=namespaces,
        nodes=[Node(f"node-{n}") for n in range(20)],
        pods=[make_pod(i) for i in range(pods)],
        services=services,
        authorization_policies=policies,
    )


def measure_model(pods: int) -> dict[str, Any]:
    gc.collect()
    rss_before = rss_mib()
    tracemalloc.start()
    model = make_model(pods)
    model_bytes = tracemalloc.get_traced_memory()[0]
    builder = SnapshotBuilder(TranslateConfig())
    snapshot = builder.build(model)
    total_bytes = tracemalloc.get_traced_memory()[0]  # protobuf's C arenas are not traced
    tracemalloc.stop()
    gc.collect()
    rss_after = rss_mib()
    started = time.perf_counter()
    SnapshotBuilder(TranslateConfig()).build(model)  # timed without tracemalloc
    first_build = time.perf_counter() - started
    # A rebuild after one pod changed (what every registry event costs today).
    changed = model.upsert(make_pod(0, 1))
    started = time.perf_counter()
    builder.build(changed)
    rebuild = time.perf_counter() - started
    wire = sum(len(r.wire) for named in snapshot.resources.values() for r in named.values())
    return {
        "pods": pods,
        "resources": len(snapshot),
        "first_build_s": first_build,
        "rebuild_after_one_change_s": rebuild,
        "model_mib": model_bytes / 2**20,
        "model_translation_snapshot_mib": total_bytes / 2**20,
        "snapshot_wire_mib": wire / 2**20,
        "rss_growth_mib": rss_after - rss_before,
    }


class AioClients:
    """N grpc.aio Delta ADS clients on one event loop (its own thread)."""

    def __init__(self, address: str, n: int) -> None:
        self.address = address
        self.n = n
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.seen: dict[str, list[float]] = {}  # version -> arrival times
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.synced = 0
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    async def _start(self) -> None:
        self.channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
        )
        for i in range(self.n):
            self.tasks.append(asyncio.create_task(self._client(i)))

    async def _client(self, i: int) -> None:
        node = build_node(
            ip="10.0.0.1",
            pod=f"zt-{i}",
            namespace="istio-system",
            node_name=f"n{i}",
            cluster_id="Kubernetes",
        )
        client = DeltaClient(node, WORKLOAD_TYPE_URLS)
        # Any: grpc-stubs' aio types lack the write()/read() style of streaming calls.
        method: Any = self.channel.stream_stream(
            DELTA_METHOD_PATH,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )
        call: Any = method()
        for req in client.start_stream():
            await call.write(req)
        counted = False
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            event, answer = client.receive(response)
            now = time.perf_counter()
            await call.write(answer)
            if isinstance(event, ResourcesReceived):
                with self.cond:
                    for r in event.updated:
                        self.seen.setdefault(r.version, []).append(now)
                    if not counted and client.in_sync():
                        counted = True
                        self.synced += 1
                    self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float = 120.0) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise TimeoutError("clients did not get there in time")

    def stop(self) -> None:
        async def _stop() -> None:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.channel.close(None)

        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def measure_push(pods: int, clients: int, changes: int, quiet: float) -> dict[str, Any]:
    registry = MemoryRegistry(make_model(pods))
    server = DiscoveryServer(
        registry,
        listen=None,
        plaintext_listen="127.0.0.1:0",
        quiet=quiet,
        max_delay=max(quiet, 0.5),
        metrics_registry=CollectorRegistry(),
    )
    server.start()
    server.wait_for_snapshot(lambda s: len(s) > 0)
    aio = AioClients(server.plaintext_address, clients)
    started = time.perf_counter()
    aio.start()
    aio.wait(lambda: aio.synced >= clients)
    initial_sync = time.perf_counter() - started
    last: list[float] = []
    median: list[float] = []
    try:
        for generation in range(1, changes + 1):
            pod = make_pod(generation, generation)
            name = f"Kubernetes//Pod/{pod.namespace}/{pod.name}"
            before = server.snapshot
            assert before is not None
            old = before.of_type(ADDRESS_TYPE_URL)[name].version
            t0 = time.perf_counter()
            registry.upsert(pod)

            def changed(s: Snapshot, name: str = name, old: str = old) -> bool:
                return s.of_type(ADDRESS_TYPE_URL)[name].version != old

            version = server.wait_for_snapshot(changed).of_type(ADDRESS_TYPE_URL)[name].version

            def arrived(version: str = version) -> bool:
                return len(aio.seen.get(version, ())) >= clients

            aio.wait(arrived)
            with aio.lock:
                arrivals = sorted(aio.seen[version])
            last.append(arrivals[-1] - t0)
            median.append(statistics.median(arrivals) - t0)
    finally:
        aio.stop()
        server.stop(grace=0)
    return {
        "pods": pods,
        "clients": clients,
        "debounce_quiet_s": quiet,
        "initial_sync_all_clients_s": initial_sync,
        "change_to_last_client_s_p50": statistics.median(last),
        "change_to_last_client_s_max": max(last),
        "change_to_median_client_s_p50": statistics.median(median),
    }


def table(results: dict[str, Any]) -> str:
    m = results["model"]
    lines = [
        f"model: {m['pods']} pods -> {m['resources']} resources",
        f"  first translation+snapshot     {m['first_build_s'] * 1000:8.1f} ms",
        f"  rebuild after one pod change   {m['rebuild_after_one_change_s'] * 1000:8.1f} ms",
        f"  model (Python objects)         {m['model_mib']:8.2f} MiB",
        f"  model+translation+snapshot     {m['model_translation_snapshot_mib']:8.2f} MiB",
        f"  snapshot wire bytes            {m['snapshot_wire_mib']:8.2f} MiB",
        f"  RSS growth                     {m['rss_growth_mib']:8.2f} MiB",
        "",
        "push: model change -> clients have it (debounce window included)",
        f"  {'clients':>7} {'quiet':>7} {'initial sync':>13} {'last p50':>10}"
        f" {'last max':>10} {'median p50':>11}",
    ]
    for p in results["push"]:
        lines.append(
            f"  {p['clients']:>7} {p['debounce_quiet_s'] * 1000:>5.0f}ms"
            f" {p['initial_sync_all_clients_s'] * 1000:>11.0f}ms"
            f" {p['change_to_last_client_s_p50'] * 1000:>8.1f}ms"
            f" {p['change_to_last_client_s_max'] * 1000:>8.1f}ms"
            f" {p['change_to_median_client_s_p50'] * 1000:>9.1f}ms"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=0.0, help="debounce window (s)")
    parser.add_argument("--out", help="write JSON here")
    args = parser.parse_args(argv)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    print("==> model, translation, snapshot", file=sys.stderr)
    results: dict[str, Any] = {"model": measure_model(args.pods), "push": []}
    for n in args.clients:
        print(f"==> push to {n} clients", file=sys.stderr)
        results["push"].append(measure_push(args.pods, n, args.changes, args.quiet))
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
