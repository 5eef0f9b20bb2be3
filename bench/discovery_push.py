"""Benchmark: discovery's push latency, initial sync and memory, with real Delta ADS clients.

The discovery server runs in its own process (so that its RSS is its own and
the clients do not share its interpreter), built as ``underpass discovery
serve`` builds it: TLS on loopback with a certificate from its CA, every xDS
call authenticated (a lab token file), the production debounce (100 ms of
quiet, at most 1 s; ``--quiet`` / ``--max-delay``), incremental translation.
The model: ``P`` pods in 10 namespaces on 20 nodes, a Service per 10 pods, an
AuthorizationPolicy per namespace; a change is one pod's labels written to
the registry, as a watch event would.

1. memory (``--memory-pods``, default 1k 5k 10k): a fresh server process per
   size; the time from start until the first snapshot is published, the
   server's own translate+prepare time for it and for a one-pod change
   (incremental, from its ``underpass_discovery_translate_seconds``), the
   same rebuild translating everything (for comparison), and the process's
   RSS once it serves (``VmRSS``, after a GC) and its peak (``VmHWM``).
2. push (``--pods``, default 5000; ``--clients``, default 10 100 500): N
   simulated ztunnels, real gRPC Delta ADS clients (grpc.aio, each on its
   own TLS connection with its bearer token, spread over ``--client-procs``
   processes) that check every response and ACK it (:class:`DeltaClient`).
   Reported: the initial sync (from the clients' start until all N are in
   sync) and the server's CPU time and RSS then; for each of ``--changes``
   changes, the time from the registry write until *every* client has the
   new version (p50, p99, max over changes), and each client's own arrival
   time (p50, p99 over all arrivals).
3. the same push measured with full translation (``--full-clients``,
   default 100 500), to show what incremental translation buys.

By default the clients do not decode resource payloads (they parse and
check the responses, track versions and ACK): on a small machine the
clients share the CPU with the server, and decoding 5k resources per client
would measure the clients. ``--decode`` decodes everything, as ztunnel does.
Clocks: ``time.monotonic`` (one clock for every process of the machine).

Writes JSON (``--out``) and prints a table. It asserts nothing about speed.

    .venv/bin/python -m bench.discovery_push [--pods 5000] [--clients 10 100 500]
        [--memory-pods 1000 5000 10000] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

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

TD = "cluster.local"
TOKEN = "bench-ztunnel-token-0123456789abcdef"  # noqa: S105 (a throwaway lab token)
MESH_NS = "istio-system"
WAIT = 600.0  # the longest any phase may take before the benchmark gives up


# -- the model -------------------------------------------------------------------------------


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


def pod_uid(pod: Pod) -> str:
    return f"Kubernetes//Pod/{pod.namespace}/{pod.name}"


def changed_pod_index(change: int, pods: int) -> int:
    """Which pod the ``change``-th change touches (spread over namespaces and nodes)."""
    return (change * 7919 + 1) % pods


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MiB."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def quiet_logs() -> None:
    """Errors only (``BENCH_LOG_LEVEL=30`` shows warnings too, e.g. refused clients)."""
    import structlog

    level = int(os.environ.get("BENCH_LOG_LEVEL", "40"))
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- the server process ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    pods: int
    workdir: str
    quiet: float
    max_delay: float
    incremental: bool = True


def write_tokens(workdir: Path) -> Path:
    path = workdir / "tokens.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f"- {{token: {TOKEN}, namespace: {MESH_NS}, service_account: ztunnel, "
            "pod: ztunnel-bench, node: node-0}\n"
        )
    return path


def server_main(conn: Connection, settings: ServerSettings) -> None:
    """Serve the model; answer the parent's commands on ``conn`` until "stop"."""
    from prometheus_client import CollectorRegistry

    from discovery.registry import MemoryRegistry
    from discovery.server import DiscoveryServer
    from identity.auth import LabTokenAuthenticator
    from identity.ca import CertificateAuthority
    from underpass.xds.server import Snapshot
    from underpass.xds.types import ADDRESS_TYPE_URL

    quiet_logs()
    workdir = Path(settings.workdir)
    ca = CertificateAuthority.load_or_create(workdir / "ca", TD)
    registry = MemoryRegistry(make_model(settings.pods))
    metrics = CollectorRegistry()
    server = DiscoveryServer(
        registry,
        ca=ca,
        xds_authenticator=LabTokenAuthenticator(write_tokens(workdir), TD),
        listen="127.0.0.1:0",
        serving_dns_names=["localhost"],
        metrics_registry=metrics,
        quiet=settings.quiet,
        max_delay=settings.max_delay,
        incremental_translation=settings.incremental,
    )

    def translate_seconds() -> float:
        return metrics.get_sample_value("underpass_discovery_translate_seconds_sum") or 0.0

    started = time.monotonic()
    server.start()
    server.wait_for_snapshot(lambda s: len(s) > 0, WAIT)
    first_snapshot = time.monotonic() - started
    gc.collect()
    conn.send(
        {
            "address": server.tls_address,
            "root": ca.root_bundle_pem,
            "first_snapshot_s": first_snapshot,
            "first_translate_s": translate_seconds(),
            "resources": len(server.snapshot or ()),
            **proc_status(),
        }
    )
    generation = 0
    try:
        while True:
            command, *args = conn.recv()
            if command == "stop":
                break
            if command == "status":
                gc.collect()
                conn.send({**proc_status(), "cpu_s": cpu_seconds()})
            elif command == "change":
                generation += 1
                pod = make_pod(args[0], generation)
                name = pod_uid(pod)
                current = server.snapshot
                assert current is not None
                old = current.of_type(ADDRESS_TYPE_URL)[name].version
                before = translate_seconds()
                t0 = time.monotonic()
                registry.upsert(pod)

                def changed(s: Snapshot, name: str = name, old: str = old) -> bool:
                    return s.of_type(ADDRESS_TYPE_URL)[name].version != old

                snapshot = server.wait_for_snapshot(changed, WAIT)
                conn.send(
                    {
                        "t0": t0,
                        "name": name,
                        "version": snapshot.of_type(ADDRESS_TYPE_URL)[name].version,
                        "translate_s": translate_seconds() - before,
                    }
                )
    finally:
        server.stop(grace=0)


class ServerProcess:
    """The parent's handle on a server process."""

    def __init__(self, ctx: Any, settings: ServerSettings) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=server_main, args=(child, settings), daemon=True)
        self.process.start()
        child.close()
        self.info: dict[str, Any] = self.receive()

    def receive(self) -> Any:
        if not self.conn.poll(WAIT):
            raise TimeoutError("the discovery server process did not answer")
        return self.conn.recv()

    def ask(self, *command: Any) -> Any:
        self.conn.send(command)
        return self.receive()

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # the process may be gone already
            self.conn.send(("stop",))
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


# -- the client processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSettings:
    address: str
    root: str
    ids: tuple[int, ...]
    watch: frozenset[str]
    decode: bool


def clients_main(settings: ClientSettings, go: Any, stop: Any, reports: Any) -> None:
    quiet_logs()
    asyncio.run(run_clients(settings, go, stop, reports))


async def run_clients(settings: ClientSettings, go: Any, stop: Any, reports: Any) -> None:
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import empty_pb2

    from underpass.xds.client import DeltaClient, ResourcesReceived
    from underpass.xds.node import build_node
    from underpass.xds.types import DELTA_METHOD_PATH, WORKLOAD_TYPE_URLS

    credentials = grpc.ssl_channel_credentials(settings.root.encode())
    options = [
        ("grpc.ssl_target_name_override", "localhost"),
        ("grpc.use_local_subchannel_pool", 1),  # a connection per client, as ztunnels have
        ("grpc.max_receive_message_length", 64 * 2**20),
    ]
    channels = {
        i: grpc.aio.secure_channel(settings.address, credentials, options) for i in settings.ids
    }
    empty = empty_pb2.Empty()
    decoders = None if settings.decode else {t: (lambda _data: empty) for t in WORKLOAD_TYPE_URLS}
    metadata = (("authorization", f"Bearer {TOKEN}"),)

    async def client(i: int) -> None:
        node = build_node(
            ip=f"172.30.{i >> 8}.{i & 255}",
            pod=f"ztunnel-{i}",
            namespace=MESH_NS,
            node_name=f"node-{i}",
            cluster_id="Kubernetes",
        )
        delta = DeltaClient(node, WORKLOAD_TYPE_URLS, decoders=decoders)
        # Any: grpc's aio stubs lack the write()/read() style of streaming calls.
        method: Any = channels[i].stream_stream(
            DELTA_METHOD_PATH,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )
        call: Any = method(metadata=metadata)
        synced = False
        started = time.monotonic()
        responses = 0
        try:
            for request in delta.start_stream():
                await call.write(request)
            while True:
                response = await call.read()
                responses += 1
                if response is grpc.aio.EOF:  # type: ignore[attr-defined]
                    reports.put(("error", i, "the server ended the stream"))
                    return
                event, answer = delta.receive(response)
                arrived = time.monotonic()
                await call.write(answer)
                if isinstance(event, ResourcesReceived):
                    for resource in event.updated:
                        if resource.name in settings.watch:
                            reports.put(("got", i, resource.name, resource.version, arrived))
                    if not synced and delta.in_sync():
                        synced = True
                        reports.put(("synced", i, arrived))
        except grpc.aio.AioRpcError as exc:
            if not stop.is_set():
                after = time.monotonic() - started
                reports.put(
                    (
                        "error",
                        i,
                        f"{exc.code().name}: {exc.details()} ({after:.1f} s into the stream, "
                        f"after {responses} responses; debug: {exc.debug_error_string()})",
                    )
                )

    loop = asyncio.get_running_loop()
    reports.put(("ready", os.getpid(), len(channels)))
    await loop.run_in_executor(None, go.wait)
    tasks = [asyncio.create_task(client(i)) for i in settings.ids]
    await loop.run_in_executor(None, stop.wait)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels.values():
        await channel.close(None)


class Reports:
    """What the client processes report, collected in the parent."""

    def __init__(self, ctx: Any) -> None:
        self.queue: Any = ctx.Queue()
        self.ready = 0
        self.synced: dict[int, float] = {}
        self.arrivals: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)

    def collect_until(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the clients did not {what} in {WAIT:.0f} s")
            try:
                kind, *rest = self.queue.get(timeout=min(remaining, 5.0))
            except queue.Empty:
                continue
            if kind == "ready":
                self.ready += 1
            elif kind == "synced":
                self.synced[rest[0]] = rest[1]
            elif kind == "got":
                client, name, version, arrived = rest
                self.arrivals[(name, version)].setdefault(client, arrived)
            elif kind == "error":
                raise RuntimeError(f"client {rest[0]} failed: {rest[1]}")


# -- the measurements ----------------------------------------------------------------------------


def measure_memory(ctx: Any, pods: int, args: argparse.Namespace) -> dict[str, Any]:
    from discovery.pipeline import SnapshotBuilder
    from discovery.translate import TranslateConfig

    with tempfile.TemporaryDirectory(prefix="bench-discovery-") as workdir:
        settings = ServerSettings(pods, workdir, args.quiet, args.max_delay)
        server = ServerProcess(ctx, settings)
        try:
            info = server.info
            rebuilds = [
                server.ask("change", changed_pod_index(k, pods))["translate_s"] for k in range(5)
            ]
            after = server.ask("status")
        finally:
            server.stop()
    # The same one-pod change, translating the whole model (in this process).
    model = make_model(pods)
    builder = SnapshotBuilder(TranslateConfig(), incremental=False)
    builder.build(model)
    full: list[float] = []
    for k in range(3):
        model = model.upsert(make_pod(changed_pod_index(k, pods), k + 1))
        started = time.perf_counter()
        builder.build(model)
        full.append(time.perf_counter() - started)
    del builder, model
    gc.collect()
    return {
        "pods": pods,
        "resources": info["resources"],
        "first_snapshot_after_start_s": info["first_snapshot_s"],
        "first_translate_s": info["first_translate_s"],
        "rebuild_one_pod_incremental_s_p50": statistics.median(rebuilds),
        "rebuild_one_pod_full_s_p50": statistics.median(full),
        "rss_serving_mib": info["VmRSS"],
        "rss_after_changes_mib": after["VmRSS"],
        "rss_peak_mib": after["VmHWM"],
    }


def measure_push(
    ctx: Any, pods: int, clients: int, args: argparse.Namespace, *, incremental: bool = True
) -> dict[str, Any]:
    changed = [changed_pod_index(k, pods) for k in range(args.changes)]
    watch = frozenset(pod_uid(make_pod(i)) for i in changed)
    with tempfile.TemporaryDirectory(prefix="bench-discovery-") as workdir:
        settings = ServerSettings(pods, workdir, args.quiet, args.max_delay, incremental)
        server = ServerProcess(ctx, settings)
        reports = Reports(ctx)
        go, stop = ctx.Event(), ctx.Event()
        procs = []
        try:
            n_procs = max(1, min(args.client_procs, clients))
            for p in range(n_procs):
                client_settings = ClientSettings(
                    server.info["address"],
                    server.info["root"],
                    tuple(range(p, clients, n_procs)),
                    watch,
                    args.decode,
                )
                proc = ctx.Process(
                    target=clients_main, args=(client_settings, go, stop, reports.queue)
                )
                proc.start()
                procs.append(proc)
            reports.collect_until(lambda: reports.ready == n_procs, "start")
            cpu_before = server.ask("status")["cpu_s"]
            t_go = time.monotonic()
            go.set()
            reports.collect_until(lambda: len(reports.synced) == clients, "get in sync")
            initial_sync = max(reports.synced.values()) - t_go
            synced_status = server.ask("status")
            all_have_it: list[float] = []
            each: list[float] = []
            for index in changed:
                answer = server.ask("change", index)
                key = (answer["name"], answer["version"])
                reports.collect_until(
                    lambda key=key: len(reports.arrivals[key]) == clients, "receive a change"
                )
                times = [t - answer["t0"] for t in reports.arrivals[key].values()]
                all_have_it.append(max(times))
                each += times
            final = server.ask("status")
        finally:
            stop.set()
            go.set()
            for proc in procs:
                proc.join(60)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            server.stop()
    return {
        "pods": pods,
        "clients": clients,
        "translation": "incremental" if incremental else "full",
        "debounce_quiet_s": args.quiet,
        "changes": len(changed),
        "initial_sync_s": initial_sync,
        "initial_sync_server_cpu_s": synced_status["cpu_s"] - cpu_before,
        "rss_synced_mib": synced_status["VmRSS"],
        "rss_peak_mib": final["VmHWM"],
        "all_clients_s_p50": statistics.median(all_have_it),
        "all_clients_s_p99": percentile(all_have_it, 99),
        "all_clients_s_max": max(all_have_it),
        "each_client_s_p50": statistics.median(each),
        "each_client_s_p99": percentile(each, 99),
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "memory and translation (one server process per size)",
        f"  {'pods':>6} {'resources':>9} {'first snap':>10} {'translate':>9}"
        f" {'1-pod incr':>10} {'1-pod full':>10} {'RSS':>8} {'RSS peak':>8}",
    ]
    for m in results["memory"]:
        lines.append(
            f"  {m['pods']:>6} {m['resources']:>9} {m['first_snapshot_after_start_s']:>9.2f}s"
            f" {m['first_translate_s']:>8.2f}s"
            f" {m['rebuild_one_pod_incremental_s_p50'] * 1000:>8.1f}ms"
            f" {m['rebuild_one_pod_full_s_p50'] * 1000:>8.0f}ms"
            f" {m['rss_serving_mib']:>5.0f}MiB {m['rss_peak_mib']:>5.0f}MiB"
        )
    lines += [
        "",
        "push: registry write -> clients have it (debounce included); TLS, tokens checked",
        f"  {'pods':>6} {'clients':>7} {'transl.':>11} {'init sync':>9} {'sync CPU':>8}"
        f" {'all p50':>8} {'all p99':>8} {'all max':>8} {'each p50':>8} {'each p99':>8}"
        f" {'RSS':>7} {'peak':>7}",
    ]
    for p in results["push"]:
        lines.append(
            f"  {p['pods']:>6} {p['clients']:>7} {p['translation']:>11}"
            f" {p['initial_sync_s']:>8.2f}s {p['initial_sync_server_cpu_s']:>7.1f}s"
            f" {p['all_clients_s_p50'] * 1000:>6.0f}ms {p['all_clients_s_p99'] * 1000:>6.0f}ms"
            f" {p['all_clients_s_max'] * 1000:>6.0f}ms {p['each_client_s_p50'] * 1000:>6.0f}ms"
            f" {p['each_client_s_p99'] * 1000:>6.0f}ms"
            f" {p['rss_synced_mib']:>4.0f}MiB {p['rss_peak_mib']:>4.0f}MiB"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--memory-pods", type=int, nargs="*", default=[1000, 5000, 10000])
    parser.add_argument("--pods", type=int, default=5000, help="model size of the push runs")
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 100, 500])
    parser.add_argument(
        "--full-clients",
        type=int,
        nargs="*",
        default=[100, 500],
        help="push runs repeated with full translation (none: skip)",
    )
    parser.add_argument("--changes", type=int, default=30, help="changes per push run")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes")
    parser.add_argument("--quiet", type=float, default=0.1, help="debounce quiet (s)")
    parser.add_argument("--max-delay", type=float, default=1.0, help="debounce cap (s)")
    parser.add_argument("--decode", action="store_true", help="clients decode every resource")
    parser.add_argument("--out", help="write JSON here")
    args = parser.parse_args(argv)
    quiet_logs()
    ctx = multiprocessing.get_context("spawn")  # no fork: grpc does not survive one
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "memory": [],
        "push": [],
    }
    for pods in args.memory_pods:
        print(f"==> memory and translation, {pods} pods", file=sys.stderr, flush=True)
        results["memory"].append(measure_memory(ctx, pods, args))
    for clients in args.clients:
        print(f"==> push, {args.pods} pods, {clients} clients", file=sys.stderr, flush=True)
        results["push"].append(measure_push(ctx, args.pods, clients, args))
    for clients in args.full_clients:
        print(
            f"==> push, {args.pods} pods, {clients} clients, full translation",
            file=sys.stderr,
            flush=True,
        )
        results["push"].append(measure_push(ctx, args.pods, clients, args, incremental=False))
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
