"""Benchmark: the HBONE tunnel on loopback, with each of our TLS streams and trio.SSLStream.

Every party is its own process (as in PERFORMANCE-NOTES.md), certificates come
from a real ``identity.ca`` CA, and the tunnel is the real thing (mTLS 1.3,
HTTP/2 CONNECT, our settings):

- ``direct``: driver -> sink over plain TCP (the floor).
- ``hbone``: the driver speaks HBONE itself: driver -> (TLS + h2) -> inbound
  server -> (TCP) -> sink. One tunnel on one connection.
- ``two-hop``: what ztunnel does: driver -> (TCP) -> outbound relay ->
  (TLS + h2) -> inbound server -> (TCP) -> sink.

The HBONE hop's TLS transport (``--transports``): ``bio`` is
:class:`underpass.hbone.stream.TlsBioStream` (MemoryBIOs in large batches,
what :func:`~underpass.hbone.stream.connect_tls` / ``accept_tls`` make);
``sslsocket`` is :class:`~underpass.hbone.stream.TlsSocketStream` (a
non-blocking ``ssl.SSLSocket``); ``sslstream`` is ``trio.SSLStream``
(MemoryBIO, trio's own, small reads). Loopback is not the network path pods
use (veth, bridge, nftables), where per-call costs are higher:
``bench.ztunnel_lab`` measures that. The inner TCP hops use
:class:`~underpass.hbone.stream.SocketStream` in all. Measured per case: bulk
throughput (``--bulk-mib`` one way, the sink counts and answers at EOF) and
1 KiB ping-pong round trips (p50/p90), trio task steps per round trip in
each process (a wake-up count), and the CPU time (user + system) of every
process: per GiB for bulk, per round trip for ping-pong (CPU time suffers
less than wall time from other load on a shared machine). With
``--profile``, a bulk run of ``hbone`` with the first transport is repeated
under cProfile in every process and the time is split into OpenSSL, h2
(h2/hpack/hyperframe), trio's scheduler, our code, socket calls and copies.

Writes JSON (``--out``) and prints a table. Asserts nothing about speed.

    .venv/bin/python -m bench.hbone_relay [--bulk-mib 1024] [--pings 3000] [--repeat 3]
        [--transports bio,sslsocket,sslstream] [--topologies hbone,two-hop] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from identity.ca import CertificateAuthority, build_csr, generate_workload_key, validate_csr
from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from identity.tls import (
    TrustBundle,
    client_context,
    server_context,
    tls_client_socket,
    tls_client_stream,
    tls_server_socket,
    tls_server_stream,
)
from underpass.hbone.headers import SocketAddress
from underpass.hbone.relay import relay
from underpass.hbone.stream import (
    SocketStream,
    TlsSocketStream,
    accept_tls,
    connect_tcp,
    connect_tls,
    set_tcp_keepalive,
)
from underpass.hbone.trio_adapter import (
    HandlerResult,
    HboneClientConnection,
    InboundRequest,
    open_hbone_connection,
    serve_hbone,
)

TD = "cluster.local"
SERVER_ID = SpiffeId(TD, "bench", "server")
CLIENT_ID = SpiffeId(TD, "bench", "client")
HOST = "127.0.0.1"
BUFFER = 256 * 1024
MESSAGE = 1024
TRANSPORTS = ("bio", "sslsocket", "sslstream")
TOPOLOGIES = ("hbone", "two-hop")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def issue(ca_dir: Path, identity: SpiffeId) -> tuple[WorkloadCertificate, TrustBundle]:
    ca = CertificateAuthority.load_or_create(ca_dir, TD)
    key = generate_workload_key()
    issued = ca.sign_workload(validate_csr(build_csr(key, identity)))
    cert = WorkloadCertificate.from_ca_response(identity, key, issued.chain_pem)
    return cert, TrustBundle(ca.roots)


def listen() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


# -- counting trio wake-ups -------------------------------------------------------------------


class StepCounter(trio.abc.Instrument):
    """Counts task steps (each is a wake-up of a task) and I/O waits."""

    def __init__(self) -> None:
        self.steps = 0
        self.io_waits = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1


# -- child processes ----------------------------------------------------------------------------


async def accept_forever(sock: socket.socket, serve: Callable[[socket.socket], Any]) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(sock)
            with contextlib.suppress(BlockingIOError):
                conn, _ = sock.accept()
                nursery.start_soon(serve, conn)


async def sink_role(ready: Callable[[list[int]], None]) -> None:
    """Port 1 counts bytes until EOF and answers the count; port 2 echoes."""
    counter, echo = listen(), listen()

    async def count(conn: socket.socket) -> None:
        stream = SocketStream(conn)
        buffer = bytearray(BUFFER)
        total = 0
        while n := await stream.receive_into(buffer):
            total += n
        await stream.send_all(str(total).encode())
        await stream.aclose()

    async def echo_back(conn: socket.socket) -> None:
        stream = SocketStream(conn)
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(BUFFER):
                await stream.send_all(data)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_forever, counter, count)
        nursery.start_soon(accept_forever, echo, echo_back)
        ready([counter.getsockname()[1], echo.getsockname()[1]])


async def handler(request: InboundRequest) -> HandlerResult:
    return SocketStream(await connect_tcp(request.authority))


async def inbound_role(ready: Callable[[list[int]], None], ca_dir: Path, transport: str) -> None:
    cert, bundle = issue(ca_dir, SERVER_ID)
    context = server_context(cert, bundle)
    sock = listen()

    async def serve(conn: socket.socket) -> None:
        if transport == "bio":
            bio_stream = await accept_tls(conn, context, TD)
            stream: trio.abc.Stream = bio_stream
            peer = bio_stream.peer
        elif transport == "sslsocket":
            conn.setblocking(False)
            set_tcp_keepalive(conn)
            tls, peer = await tls_server_socket(conn, context, TD)
            stream = TlsSocketStream(tls, peer)
        else:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            plain = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            stream, peer = await tls_server_stream(plain, context, TD)
        await serve_hbone(stream, handler, local_ip=HOST, peer=peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_forever, sock, serve)
        ready([sock.getsockname()[1]])


async def hbone_client(
    ca_dir: Path, transport: str, port: int
) -> tuple[HboneClientConnection, trio.abc.Stream]:
    """A client connection (not yet running) and its TLS transport (see ``TRANSPORTS``)."""
    cert, bundle = issue(ca_dir, CLIENT_ID)
    context = client_context(cert, bundle)
    if transport == "bio":
        stream: trio.abc.Stream = await connect_tls(
            SocketAddress.of(HOST, port), context, {SERVER_ID}
        )
    elif transport == "sslsocket":
        sock = await connect_tcp(SocketAddress.of(HOST, port))
        set_tcp_keepalive(sock)
        tls, peer = await tls_client_socket(sock, context, {SERVER_ID})
        stream = TlsSocketStream(tls, peer)
    else:
        plain = await trio.open_tcp_stream(HOST, port)
        stream, _ = await tls_client_stream(plain, context, {SERVER_ID})
    return HboneClientConnection(stream), stream


async def outbound_role(
    ready: Callable[[list[int]], None], ca_dir: Path, transport: str, inbound: int, sinks: list[int]
) -> None:
    """One plain listener per sink port; each accepted connection gets a tunnel."""
    connection, _ = await hbone_client(ca_dir, transport, inbound)
    listeners = [listen() for _ in sinks]

    def serve_to(target: int) -> Callable[[socket.socket], Any]:
        async def serve(conn: socket.socket) -> None:
            tunnel = await connection.open_tunnel(SocketAddress.of(HOST, target))
            await relay(SocketStream(conn), tunnel)

        return serve

    async with trio.open_nursery() as nursery:
        await nursery.start(connection.run)
        for sock, target in zip(listeners, sinks, strict=True):
            nursery.start_soon(accept_forever, sock, serve_to(target))
        ready([s.getsockname()[1] for s in listeners])


def child_main(argv: list[str]) -> None:
    """Run one role until SIGTERM; print READY ports; dump counters (and a profile)."""
    role, stats_file, profile_file, *rest = argv
    counter = StepCounter()
    profiler = cProfile.Profile() if profile_file != "-" else None

    def ready(ports: list[int]) -> None:
        print("READY " + " ".join(map(str, ports)), flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGUSR1) as received:
                    async for number in received:
                        if number == signal.SIGUSR1:  # the timed part starts: count from here
                            counter.steps = counter.io_waits = 0
                        else:
                            nursery.cancel_scope.cancel()

            nursery.start_soon(signals)
            if role == "sink":
                nursery.start_soon(sink_role, ready)
            elif role == "inbound":
                nursery.start_soon(inbound_role, ready, Path(rest[0]), rest[1])
            elif role == "outbound":
                sinks = [int(p) for p in rest[3:]]
                nursery.start_soon(
                    outbound_role, ready, Path(rest[0]), rest[1], int(rest[2]), sinks
                )

    if profiler is not None:
        profiler.enable()
    trio.run(main, instruments=[counter])
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile_file)
    Path(stats_file).write_text(json.dumps({"steps": counter.steps, "io_waits": counter.io_waits}))


# -- the driver -----------------------------------------------------------------------------------


class Child:
    def __init__(self, workdir: Path, role: str, args: list[str], profile: bool) -> None:
        self.stats_file = workdir / f"{role}-{time.monotonic_ns()}.json"
        self.profile_file = workdir / f"{role}-{time.monotonic_ns()}.prof" if profile else None
        command = [
            sys.executable,
            "-m",
            "bench.hbone_relay",
            "--child",
            role,
            str(self.stats_file),
            str(self.profile_file) if self.profile_file else "-",
            *args,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY"):
            self.process.kill()
            raise RuntimeError(f"the {role} process did not start: {line!r}")
        self.ports = [int(p) for p in line.split()[1:]]

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        stats: dict[str, Any] = json.loads(self.stats_file.read_text())
        return stats


@contextlib.contextmanager
def children(
    workdir: Path, topology: str, transport: str, profile: bool
) -> Iterator[dict[str, Any]]:
    """Start the processes of a topology; yields the ports the driver uses."""
    ca_dir = workdir / "ca"
    started: dict[str, Child] = {}
    info: dict[str, Any] = {"stats": {}, "pids": []}
    try:
        started["sink"] = sink = Child(workdir, "sink", [], profile)
        info["count_port"], info["echo_port"] = sink.ports
        if topology in ("hbone", "two-hop"):
            started["inbound"] = inbound = Child(
                workdir, "inbound", [str(ca_dir), transport], profile
            )
            info["hbone_port"] = inbound.ports[0]
        if topology == "two-hop":
            started["outbound"] = outbound = Child(
                workdir,
                "outbound",
                [str(ca_dir), transport, str(info["hbone_port"]), *map(str, sink.ports)],
                profile,
            )
            info["count_port"], info["echo_port"] = outbound.ports
        info["pids"] = [child.process.pid for child in started.values()]
        info["named_pids"] = {name: child.process.pid for name, child in started.items()}
        yield info
    finally:
        for name, child in started.items():
            info["stats"][name] = child.stop()
            if child.profile_file is not None:
                info["stats"][name]["profile"] = str(child.profile_file)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (``None``: this one)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


class CpuMeter:
    """CPU seconds each process (the driver too) spent between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids: dict[str, int | None] = {"driver": None, **pids}
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self._pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self._start[name] for name, pid in self._pids.items()}


async def bulk(stream: trio.abc.Stream, size: int) -> float:
    chunk = memoryview(os.urandom(BUFFER))
    start = time.perf_counter()
    sent = 0
    while sent < size:
        await stream.send_all(chunk[: min(BUFFER, size - sent)])
        sent += min(BUFFER, size - sent)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    answer = b""
    while data := await stream.receive_some():
        answer += data
    elapsed = time.perf_counter() - start
    if int(answer) != size:
        raise RuntimeError(f"the sink counted {answer!r} bytes, {size} were sent")
    return elapsed


async def ping_pong(
    stream: trio.abc.Stream, count: int, counter: StepCounter, pids: list[int], meter: CpuMeter
) -> list[float]:
    message = os.urandom(MESSAGE)
    samples: list[float] = []
    for i in range(count + 200):
        if i == 200:
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            await trio.sleep(0.3)  # let every child reset its counters
            counter.steps = counter.io_waits = 0
            meter.start()
        start = time.perf_counter()
        await stream.send_all(message)
        got = 0
        while got < MESSAGE:
            got += len(await stream.receive_some(BUFFER))
        if i >= 200:
            samples.append((time.perf_counter() - start) * 1e6)
    return samples


def run_case(
    workdir: Path,
    topology: str,
    transport: str,
    args: argparse.Namespace,
    profile: str | None = None,
) -> dict[str, Any]:
    """One topology and transport; ``profile`` ("bulk" or "ping") profiles that part only."""
    result: dict[str, Any] = {"topology": topology, "transport": transport}
    counter = StepCounter()
    driver_profile = cProfile.Profile() if profile else None
    with children(workdir, topology, transport, profile is not None) as info:
        meter = CpuMeter({k: v for k, v in info["named_pids"].items() if k != "sink"})

        async def drive() -> None:
            async with contextlib.AsyncExitStack() as stack:
                connection: HboneClientConnection | None = None
                if topology == "hbone":
                    _, transport_stream = await hbone_client(
                        workdir / "ca", transport, info["hbone_port"]
                    )
                    connection = await stack.enter_async_context(
                        open_hbone_connection(transport_stream)
                    )

                async def open_to(port: int) -> trio.abc.Stream:
                    if connection is not None:
                        return await connection.open_tunnel(SocketAddress.of(HOST, port))
                    return SocketStream(await connect_tcp(SocketAddress.of(HOST, port)))

                if profile != "ping":
                    stream = await open_to(info["count_port"])
                    if driver_profile is not None:
                        driver_profile.enable()
                    meter.start()
                    elapsed = await bulk(stream, args.bulk_mib * 1024 * 1024)
                    cpu = meter.stop()
                    if driver_profile is not None:
                        driver_profile.disable()
                    await stream.aclose()
                    result["bulk_gbit_s"] = args.bulk_mib * 1024 * 1024 * 8 / elapsed / 1e9
                    for name, seconds in cpu.items():
                        result[f"{name}_bulk_cpu_s_per_gib"] = seconds / (args.bulk_mib / 1024)
                if profile == "bulk":
                    return
                stream = await open_to(info["echo_port"])
                if driver_profile is not None:
                    driver_profile.enable()
                samples = await ping_pong(stream, args.pings, counter, info["pids"], meter)
                cpu = meter.stop()
                if driver_profile is not None:
                    driver_profile.disable()
                for name, seconds in cpu.items():
                    result[f"{name}_ping_cpu_us_per_rtt"] = seconds / args.pings * 1e6
                result["driver_steps_per_rtt"] = counter.steps / args.pings
                await stream.aclose()
                result["ping_p50_us"] = percentile(samples, 50)
                result["ping_p90_us"] = percentile(samples, 90)
                result["ping_mean_us"] = statistics.fmean(samples)

        trio.run(drive, instruments=[counter])
    stats = info["stats"]
    if profile is None:
        for name, values in stats.items():
            # Counted from the start of the timed ping-pong to the end.
            result[f"{name}_steps_per_rtt"] = round(values["steps"] / args.pings, 1)
    if profile is not None and driver_profile is not None:
        path = workdir / "driver.prof"
        driver_profile.dump_stats(str(path))
        result["profiles"] = {"driver": breakdown(str(path))}
        for name, values in stats.items():
            result["profiles"][name] = breakdown(values["profile"])
    return result


# -- where the time goes ------------------------------------------------------------------------

_CATEGORIES = (
    ("OpenSSL (ssl read/write)", lambda f, fn: "_ssl._SSLSocket" in fn or "_ssl._SSLObject" in fn),
    ("ssl.py wrapper", lambda f, fn: f.endswith("/ssl.py")),
    ("h2 + hpack + hyperframe",
     lambda f, fn: any(p in f for p in ("/h2/", "/hpack/", "/hyperframe/"))),
    ("idle (epoll wait)", lambda f, fn: "'poll' of 'select.epoll'" in fn),
    ("trio scheduler", lambda f, fn: "/trio/" in f),
    ("underpass.hbone", lambda f, fn: "/underpass/hbone/" in f),
    ("socket calls", lambda f, fn: "_socket.socket" in fn),
    ("copies (bytes/join/tobytes)", lambda f, fn: any(
        p in fn for p in ("'join' of 'bytes'", "'tobytes'", "bytes", "bytearray"))),
)  # fmt: skip


def breakdown(path: str) -> dict[str, Any]:
    stats = pstats.Stats(path)
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, function), (_, _, tottime, _, _) in entries.items():
        name = f"{filename}:{line}({function})" if filename != "~" else function
        category = next((label for label, test in _CATEGORIES if test(filename, function)), "other")
        totals[category] = totals.get(category, 0.0) + tottime
        top.append((tottime, name))
    whole = sum(totals.values()) or 1.0
    top.sort(reverse=True)
    return {
        "total_s": round(whole, 3),
        "share": {k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda i: -i[1])},
        "top": [(round(t, 3), n.replace(str(Path.cwd()) + "/", "")) for t, n in top[:12]],
    }


# -- main ----------------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric medians of several runs of one case (all runs kept under ``runs``)."""
    merged: dict[str, Any] = {"topology": runs[0]["topology"], "transport": runs[0]["transport"]}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in runs)
    merged["runs"] = runs
    return merged


def _joined(r: dict[str, Any], keys: list[str], digits: int) -> str:
    return ", ".join(f"{r[k]:.{digits}f}" if k in r else "-" for k in keys)


def table(results: list[dict[str, Any]]) -> str:
    roles = ("driver", "outbound", "inbound")
    lines = [
        f"{'topology':9} {'transport':10} {'bulk Gbit/s':>11} {'p50 us':>8} {'p90 us':>8} "
        f"{'steps/rtt (drv, out, in, sink)':>31} {'bulk CPU s/GiB (drv, out, in)':>30} "
        f"{'ping CPU us/rtt (drv, out, in)':>31}"
    ]
    for r in results:
        steps = _joined(r, [f"{n}_steps_per_rtt" for n in (*roles, "sink")], 1)
        bulk_cpu = _joined(r, [f"{n}_bulk_cpu_s_per_gib" for n in roles], 2)
        ping_cpu = _joined(r, [f"{n}_ping_cpu_us_per_rtt" for n in roles], 0)
        lines.append(
            f"{r['topology']:9} {r['transport']:10} {r['bulk_gbit_s']:11.2f} "
            f"{r['ping_p50_us']:8.0f} {r['ping_p90_us']:8.0f} {steps:>31} {bulk_cpu:>30} "
            f"{ping_cpu:>31}"
        )
    return "\n".join(lines)


def _names(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}, comma-separated")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--bulk-mib", type=int, default=1024, help="bulk size (default 1024)")
    parser.add_argument("--pings", type=int, default=3000, help="round trips (default 3000)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per case, interleaved; medians (default 1)"
    )
    parser.add_argument(
        "--transports",
        type=lambda text: _names(text, TRANSPORTS),
        default=list(TRANSPORTS),
        help=f"TLS transports of the HBONE hop (default {','.join(TRANSPORTS)})",
    )
    parser.add_argument(
        "--topologies",
        type=lambda text: _names(text, TOPOLOGIES),
        default=list(TOPOLOGIES),
        help=f"tunnelled topologies (default {','.join(TOPOLOGIES)}; direct always runs)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="add profiled runs (hbone, the first transport)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hbone-bench-") as tmp:
        workdir = Path(tmp)
        CertificateAuthority.load_or_create(workdir / "ca", TD)
        cases = [("direct", "plain")] + [
            (topology, transport) for topology in args.topologies for transport in args.transports
        ]
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {case: [] for case in cases}
        for _ in range(args.repeat):  # round-robin: background noise hits every case alike
            for topology, transport in cases:
                runs[(topology, transport)].append(run_case(workdir, topology, transport, args))
                print(table(runs[(topology, transport)][-1:]).splitlines()[-1], flush=True)
        results = [median_of(case_runs) for case_runs in runs.values()]
        profiles: dict[str, Any] | None = None
        if args.profile:
            profiles = {
                part: run_case(workdir, "hbone", args.transports[0], args, profile=part)["profiles"]
                for part in ("bulk", "ping")
            }
    output = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "openssl": ssl.OPENSSL_VERSION},
        "bulk_mib": args.bulk_mib,
        "repeat": args.repeat,
        "pings": args.pings,
        "transports": args.transports,
        "results": results,
        "profiles": profiles,
    }  # fmt: skip
    print()
    print(table(results))
    for part, by_process in (profiles or {}).items():
        for name, profile in by_process.items():
            print(f"\n{part}, {name}: {profile['total_s']} s profiled")
            for category, share in profile["share"].items():
                print(f"  {share * 100:5.1f}%  {category}")
    if args.out:
        args.out.write_text(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
