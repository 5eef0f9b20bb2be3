"""Benchmark: ztunnel (L4, HBONE) against Envoy sidecars and no mesh, across two lab nodes.

Owns one whole benchmark run in a lab of its own (unique prefix and state
directory, torn down at the end whatever happens, Ctrl-C included). Three
paths from a client pod on node-1 to a server pod on node-2, each in its own
namespace and measured side by side, one test after the other with the path
order rotated between tests:

- ``no-mesh``: namespace ``plain``, not enrolled: plain pod-to-pod TCP;
- ``ztunnel``: namespace ``ambient``, labelled ``istio.io/dataplane-mode=ambient``:
  node-1's ztunnel captures the connection (outbound), tunnels it over HBONE
  (mTLS 1.3, HTTP/2 CONNECT) to node-2's ztunnel (inbound), which connects to
  the server with the client's IP;
- ``envoy``: namespace ``sidecar``, not enrolled: an Envoy sidecar in each pod
  (:mod:`bench.envoy_sidecar`): plaintext into the client's sidecar on
  127.0.0.1, mTLS 1.3 between the sidecars (certificates from our CA, client
  certificates required, SPIFFE SANs checked both ways), plaintext to the
  server on 127.0.0.1; one worker each. Clients address the sidecar listener
  directly (no capture).

Load generators (real, well-known tools): Fortio (built once with the
machine's Go from the module proxy into ``~/.cache/underpass/bin``; its
``fortio server`` is the HTTP echo in every server pod) and iperf3 (Debian).
Measured per path:

- 1 KiB HTTP/1.1 POST echo latency p50/p90/p99 at 500, 1000 and 2000 rps on
  4 keep-alive connections (``fortio load -qps R -c 4 -uniform``: requests
  spread evenly, not in bursts of 4; the rate actually reached is reported: a
  path that can't keep up shows it);
- max rps with the same request on 4 and 64 connections (``-qps 0``);
- single-stream bulk throughput (``iperf3 -t 10 -O 1``: one TCP stream, the
  first second omitted);
- new connections per second: ``fortio load -c 1 -qps 0 -keepalive=false``, a
  new TCP connection (and, for Envoy, a new TLS session between the sidecars;
  ztunnel multiplexes a new HTTP/2 stream on its pooled HBONE connection) for
  every small GET;
- CPU seconds (user + system, and the time spent runnable but waiting for a
  CPU, from ``/proc/<pid>/task/*/schedstat``) and peak RSS/PSS
  (``/proc/<pid>/smaps_rollup``, sampled every 0.2 s) of both nodes' ztunnels
  and of both Envoy sidecars during each run, and how many of the machine's
  CPUs were busy (``/proc/stat``: other users' load shows there);
- node-1's ztunnel RSS/PSS with ``--idle-pods`` (50) enrolled idle pods on
  node-1 (pods added without an app: ztunnel's cost per pod is the same).

``--profile`` adds py-spy profiles of both ztunnels (a max-rps run and a bulk
run on the ztunnel path) and reports the top functions and where the time
goes (py-spy must be installed: ``.venv/bin/pip install py-spy``; it is no
dependency of the project).

Writes JSON (``--out``) and prints a table with ratios to no mesh and to
Envoy. Needs root. Asserts nothing about speed; it does fail when a path
doesn't work (an error answer, ztunnel not tunnelling, a sidecar without TLS).

    .venv/bin/python -m bench.ztunnel_lab [--quick] [--out FILE.json] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import trio

from bench.envoy_sidecar import (
    ForwardedPort,
    Sidecar,
    client_sidecar_config,
    describe,
    issue_certificates,
    run_sidecar,
    server_sidecar_config,
)
from identity.spiffe import SpiffeId
from tests.interop.envoy import envoy_binary, write_tls_files
from underpass import log as underpass_log
from underpass.lab import mesh
from underpass.lab.cluster import Lab, PodSpec, UpOptions, leftovers
from underpass.lab.registry import Pod

TRUST_DOMAIN: Final = "cluster.local"
AMBIENT_LABEL: Final = "istio.io/dataplane-mode=ambient"
#: path name -> the namespace its two pods live in
NAMESPACES: Final = {"no-mesh": "plain", "ztunnel": "ambient", "envoy": "sidecar"}
PATHS: Final = tuple(NAMESPACES)
CLIENT, SERVER = "client", "server"
CLIENT_NODE, SERVER_NODE = "node-1", "node-2"
HTTP_PORT: Final = 8080  # fortio server (HTTP echo) in every server pod
IPERF_PORT: Final = 5201  # iperf3 -s in every server pod
SIDECAR_PORTS: Final = (
    ForwardedPort(app_port=HTTP_PORT, outbound_port=15080, inbound_port=16080),
    ForwardedPort(app_port=IPERF_PORT, outbound_port=15201, inbound_port=16201),
)
ZTUNNEL_ADMIN: Final = "http://127.0.0.1:15000"
# Newer Fortio releases need grol.io/grol, which the module proxy here does not serve.
FORTIO_MODULE: Final = "fortio.org/fortio"
FORTIO_VERSION: Final = "v1.66.0"
TOOLS_DIR: Final = Path.home() / ".cache" / "underpass" / "bin"
#: Fortio's histogram resolution (seconds): 10 us, so that sub-millisecond latencies resolve.
FORTIO_RESOLUTION: Final = "0.00001"
SAMPLE_INTERVAL: Final = 0.2
READY_TIMEOUT: Final = 60.0
PARALLEL_PODS: Final = 8
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

_started = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", flush=True)


class BenchError(RuntimeError):
    """The bench could not set up or run a path; the message says what to look at."""


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    latency_seconds: float = 10.0
    max_rps_seconds: float = 10.0
    bulk_seconds: int = 10
    connection_seconds: float = 10.0
    warmup_seconds: float = 2.0
    rates: tuple[int, ...] = (500, 1000, 2000)
    latency_connections: int = 4
    max_rps_connections: tuple[int, ...] = (4, 64)
    payload_bytes: int = 1024
    idle_pods: int = 50  # enrolled pods on node-1 for the memory figure


FULL: Final = Settings()
QUICK: Final = Settings(
    latency_seconds=2.0,
    max_rps_seconds=2.0,
    bulk_seconds=5,
    connection_seconds=2.0,
    warmup_seconds=1.0,
    idle_pods=10,
)


# -- tools ---------------------------------------------------------------------------------------


def _version_of(binary: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def ensure_fortio() -> Path:
    """Fortio at :data:`FORTIO_VERSION`, built with the machine's Go once and cached."""
    binary = TOOLS_DIR / "fortio"
    wanted = FORTIO_VERSION.lstrip("v")
    if binary.exists() and _version_of(binary) == wanted:
        return binary
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if go is None:
        raise BenchError(
            "Fortio is built with Go, and no `go` is on PATH: install Go, or put a fortio "
            f"{FORTIO_VERSION} binary at {binary}"
        )
    progress(f"building fortio {FORTIO_VERSION} with {go} into {TOOLS_DIR} (once, ~2 min cold)")
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(TOOLS_DIR)}
    built = subprocess.run(
        [go, "install", f"{FORTIO_MODULE}@{FORTIO_VERSION}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0 or _version_of(binary) != wanted:
        raise BenchError(
            f"`go install {FORTIO_MODULE}@{FORTIO_VERSION}` failed (exit {built.returncode}):\n"
            f"{built.stderr[-2000:]}"
        )
    return binary


def ensure_iperf3() -> Path:
    """iperf3 from Debian, installed with apt-get when missing (the bench runs as root)."""
    found = shutil.which("iperf3")
    if found is None:
        progress("installing iperf3 (apt-get)")
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "iperf3"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            check=False,
        )
        found = shutil.which("iperf3")
    if found is None:
        raise BenchError("iperf3 is missing and `apt-get install iperf3` did not install it")
    return Path(found)


def py_spy_binary() -> Path:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return Path(found)


# -- process accounting --------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    """A process's CPU use so far (all its threads)."""

    user: float
    system: float
    runqueue_wait: float  # seconds its threads were runnable but waited for a CPU

    @property
    def total(self) -> float:
        return self.user + self.system


def cpu_times(pid: int) -> CpuTimes:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    wait_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{task}/schedstat") as fh,
        ):
            wait_ns += int(fh.read().split()[1])
    return CpuTimes(int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS, wait_ns / 1e9)


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS (KiB) from ``/proc/<pid>/smaps_rollup``."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                found[key.lower()] = int(rest.split()[0])
    return found


@dataclass
class Usage:
    """What the watched processes (and the machine) used during one run."""

    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_sys_s: dict[str, float] = field(default_factory=dict)
    runqueue_wait_s: dict[str, float] = field(default_factory=dict)
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    peak_pss_kib: dict[str, int] = field(default_factory=dict)
    #: average CPUs busy on the whole machine (everything: load tools, apps, other users)
    machine_busy_cpus: float = 0.0

    def sample(self, pids: Mapping[str, int]) -> None:
        for name, pid in pids.items():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                mem = memory_kib(pid)
                self.peak_rss_kib[name] = max(self.peak_rss_kib.get(name, 0), mem["rss"])
                self.peak_pss_kib[name] = max(self.peak_pss_kib.get(name, 0), mem["pss"])


def run_watched(
    argv: Sequence[str], pids: Mapping[str, int], workdir: Path, *, timeout: float
) -> tuple[int, str, str, Usage]:
    """Run ``argv`` to completion, sampling the watched processes' memory as it runs.

    Output goes to files (not pipes) so that a chatty tool never blocks on a
    full pipe while this loop is sampling.
    """
    usage = Usage()
    before = {name: cpu_times(pid) for name, pid in pids.items()}
    busy_before, total_before = machine_busy()
    stamp = time.monotonic_ns()
    out_path, err_path = workdir / f"run-{stamp}.out", workdir / f"run-{stamp}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    deadline = time.monotonic() + timeout
    try:
        while True:
            usage.sample(pids)
            try:
                process.wait(SAMPLE_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise BenchError(f"`{' '.join(argv)}` ran longer than {timeout:g} s") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    busy_after, total_after = machine_busy()
    cpus = os.cpu_count() or 1
    if total_after > total_before:
        usage.machine_busy_cpus = round(
            cpus * (busy_after - busy_before) / (total_after - total_before), 2
        )
    for name, pid in pids.items():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            after = cpu_times(pid)
            usage.cpu_s[name] = round(after.total - before[name].total, 3)
            usage.cpu_sys_s[name] = round(after.system - before[name].system, 3)
            usage.runqueue_wait_s[name] = round(after.runqueue_wait - before[name].runqueue_wait, 3)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    out_path.unlink()
    err_path.unlink()
    return process.returncode, stdout, stderr, usage


# -- the paths -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPath:
    """Where a path's client runs and what it connects to."""

    name: str
    client_netns: str
    http_host: str
    http_port: int
    iperf_host: str
    iperf_port: int

    def in_client(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.client_netns}", "--", *argv]


def in_netns(netns_path: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={netns_path}", "--", *argv]


def _percentiles(histogram: Mapping[str, Any]) -> dict[str, float]:
    found = {f"p{p['Percentile']:g}": p["Value"] for p in histogram.get("Percentiles") or []}
    return {key: round(found[key] * 1e6, 1) for key in ("p50", "p90", "p99") if key in found}


class Runner:
    """Runs the load tools against the paths and keeps every raw result."""

    def __init__(self, settings: Settings, workdir: Path, fortio: Path, iperf3: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.fortio = fortio
        self.iperf3 = iperf3
        self.watched: dict[str, int] = {}
        self.runs: list[dict[str, Any]] = []

    def fortio_load(
        self,
        path: BenchPath,
        *,
        qps: int,
        connections: int,
        seconds: float,
        payload: bool = True,
        keepalive: bool = True,
    ) -> tuple[dict[str, Any], Usage]:
        out = self.workdir / f"fortio-{time.monotonic_ns()}.json"
        argv = [
            str(self.fortio),
            "load",
            "-quiet",
            "-json",
            str(out),
            "-r",
            FORTIO_RESOLUTION,
            "-p",
            "50,90,99",
            "-c",
            str(connections),
            "-qps",
            str(qps),
            "-t",
            f"{seconds:g}s",
            "-timeout",
            "10s",
        ]
        if qps > 0:
            # Spread the connections' requests evenly over each period: without it all
            # connections fire at the same instant, and every path measures bursts.
            argv.append("-uniform")
        if payload:
            argv += ["-payload-size", str(self.settings.payload_bytes)]
        if not keepalive:
            argv.append("-keepalive=false")
        argv.append(f"http://{path.http_host}:{path.http_port}/echo")
        code, stdout, stderr, usage = run_watched(
            path.in_client(*argv), self.watched, self.workdir, timeout=seconds + 60
        )
        if code != 0 or not out.exists():
            raise BenchError(
                f"fortio on the {path.name} path exited {code}:\n{stderr[-2000:]}{stdout[-500:]}"
            )
        doc = json.loads(out.read_text())
        out.unlink()
        codes = {str(k): int(v) for k, v in (doc.get("RetCodes") or {}).items()}
        histogram = doc["DurationHistogram"]
        ok = codes.get("200", 0)
        if ok == 0:
            raise BenchError(
                f"fortio on the {path.name} path got no 200 answer (codes {codes}):\n"
                f"{stderr[-2000:]}"
            )
        result = {
            "requested_qps": qps,
            "connections": connections,
            "seconds": round(float(doc["ActualDuration"]) / 1e9, 3),
            "actual_rps": round(float(doc["ActualQPS"]), 1),
            "requests": int(histogram["Count"]),
            "ok": ok,
            "errors": int(histogram["Count"]) - ok,
            "avg_us": round(float(histogram["Avg"]) * 1e6, 1),
            **{f"{k}_us": v for k, v in _percentiles(histogram).items()},
            "sockets": int(doc.get("SocketCount") or 0),
        }
        return result, usage

    def iperf(self, path: BenchPath, seconds: int) -> tuple[dict[str, Any], Usage]:
        argv = [
            str(self.iperf3),
            "--client",
            path.iperf_host,
            "--port",
            str(path.iperf_port),
            "--time",
            str(seconds),
            "--omit",
            "1",
            "--json",
        ]
        code, stdout, stderr, usage = run_watched(
            path.in_client(*argv), self.watched, self.workdir, timeout=seconds + 60
        )
        try:
            doc = json.loads(stdout)
        except json.JSONDecodeError:
            doc = {"error": f"not JSON: {stdout[-500:]} {stderr[-500:]}"}
        if code != 0 or "error" in doc:
            raise BenchError(
                f"iperf3 on the {path.name} path failed (exit {code}): {doc.get('error')}"
            )
        received = doc["end"]["sum_received"]
        sent = doc["end"]["sum_sent"]
        result = {
            "seconds": round(float(received["seconds"]), 3),
            "gbit_s": round(float(received["bits_per_second"]) / 1e9, 3),
            "bytes": int(received["bytes"]),
            "retransmits": int(sent.get("retransmits", 0)),
        }
        return result, usage

    def record(
        self,
        test: str,
        params: Mapping[str, Any],
        path: BenchPath,
        result: Mapping[str, Any],
        usage: Usage,
    ) -> None:
        self.runs.append(
            {
                "test": test,
                "params": dict(params),
                "path": path.name,
                "result": dict(result),
                "usage": asdict(usage),
            }
        )


# -- the lab ------------------------------------------------------------------------------------


def _lab_call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run one of the lab's async operations to completion."""
    return trio.run(fn, *args)


async def _add_pods(lab: Lab, specs: Sequence[PodSpec], app: bool) -> None:
    limiter = trio.CapacityLimiter(PARALLEL_PODS)

    async def one(spec: PodSpec) -> None:
        async with limiter:
            await lab.add_pod(spec, app=app)

    async with trio.open_nursery() as nursery:
        for spec in specs:
            nursery.start_soon(one, spec)


def ztunnel_get(node_netns: str, target: str) -> str:
    """A GET on a node's ztunnel admin endpoint (127.0.0.1:15000 in the node's netns)."""
    out = subprocess.run(
        in_netns(node_netns, "curl", "-sS", "-m", "5", f"{ZTUNNEL_ADMIN}{target}"),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise BenchError(f"ztunnel admin {target} failed: {out.stderr.strip()}")
    return out.stdout


def wait_until(what: str, condition: Callable[[], bool], timeout: float = READY_TIMEOUT) -> None:
    """Poll ``condition`` (state in another process: no event to wait on) until true or timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def served_pods(node_netns: str) -> set[str]:
    dump = json.loads(ztunnel_get(node_netns, "/config_dump"))
    return {f"{p['namespace']}/{p['name']}" for p in dump.get("pods", [])}


def _serves(node_netns: str, pod: str) -> bool:
    return pod in served_pods(node_netns)


def listening(netns_path: str, ports: Sequence[int]) -> bool:
    out = subprocess.run(
        in_netns(netns_path, "ss", "-Hltn"), capture_output=True, text=True, check=False
    )
    bound = {int(m.group(1)) for m in re.finditer(r":(\d+)\s", out.stdout)}
    return all(port in bound for port in ports)


def ztunnel_access_log(lab: Lab, node: str) -> list[dict[str, Any]]:
    entries = []
    for line in mesh.ztunnel_log(lab.paths, node).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if entry.get("event") == "connection complete":
                    entries.append(entry)
    return entries


# -- profiling ----------------------------------------------------------------------------------


#: Areas of the data path, by the file of the innermost Python frame. Without
#: ``--native``, py-spy charges time spent in C (OpenSSL, syscalls) to the Python
#: function that called it: ``SSLSocket.send`` is OpenSSL's encryption plus the
#: send syscall, ``_RawStream._write`` a plain socket send.
_CATEGORIES: Final = (
    ("trio waiting in epoll (idle)", ("trio/_core/_io_epoll.py",)),
    ("TLS (ssl module: OpenSSL + syscalls)", ("ssl.py",)),
    ("h2 / hpack / hyperframe", ("h2/", "hpack/", "hyperframe/")),
    ("trio scheduler and I/O", ("trio/", "outcome/")),
    ("ztunnel", ("ztunnel/",)),
    ("underpass core (hbone, ...)", ("underpass/",)),
    ("logging (structlog, logging)", ("structlog/", "logging/")),
    ("prometheus_client", ("prometheus_client/",)),
    ("socket module", ("socket.py",)),
)


def _category(frame: str) -> str:
    # py-spy frames read "function (path/relative/to/sys.path.py)"
    filename = frame[frame.rfind("(") + 1 :].rstrip(")")
    for name, prefixes in _CATEGORIES:
        if filename.startswith(prefixes):
            return name
    return "other"


def _is_root_frame(frame: str) -> bool:
    """Frames every sample has (interpreter start-up, the CLI, trio's run loop)."""
    return (
        "<frozen runpy>" in frame
        or "(underpass/cli/" in frame
        or frame.startswith(("run (trio/_core/_run.py)", "unrolled_run (trio/_core/_run.py)"))
        or "(threading.py)" in frame
    )


def summarise_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            f
            for f in stack.split(";")
            if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        categories[_category(frames[-1])] += count
        for frame in set(frames):
            if not _is_root_frame(frame):
                inclusive[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "percent": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self": share(own) if total else [],
        "inclusive": share(inclusive) if total else [],
        "self_by_category": {
            name: round(100 * n / total, 1) for name, n in categories.most_common()
        }
        if total
        else {},
    }


# -- the bench -----------------------------------------------------------------------------------


class ZtunnelLabBench:
    """One run: builds the lab, measures, tears down (see the module docstring)."""

    def __init__(self, settings: Settings, *, profile: bool, profile_dir: Path | None) -> None:
        self.settings = settings
        self.profile = profile
        self.profile_dir = profile_dir
        self.prefix = "zb" + secrets.token_hex(2)[:3]
        self.workdir = Path(tempfile.mkdtemp(prefix=f"ztunnel-bench-{self.prefix}-"))
        os.chmod(self.workdir, 0o700)
        self.state_dir = self.workdir / "lab"
        self.lab = Lab(self.state_dir)
        self.cleanup = contextlib.ExitStack()
        self.report: dict[str, Any] = {}
        self.sidecars: dict[str, Sidecar] = {}

    # -- set-up ---------------------------------------------------------------------------------

    def pod(self, path: str, role: str) -> Pod:
        found = self.lab.registry.pod(NAMESPACES[path], role)
        if found is None or found.ip is None:
            raise BenchError(f"pod {NAMESPACES[path]}/{role} is missing from the lab")
        return found

    def node_netns(self, node: str) -> str:
        found = self.lab.registry.node(node)
        if found is None:
            raise BenchError(f"node {node} is missing from the lab")
        return found.netns

    def ztunnel_pid(self, node: str) -> int:
        pid = mesh.state(self.lab.paths, node)["pid"]
        if pid is None:
            raise BenchError(
                f"{node}'s ztunnel is not running; see its log "
                f"{mesh.ztunnel_log(self.lab.paths, node)}"
            )
        return int(pid)

    def build_lab(self) -> None:
        progress(f"lab up: prefix {self.prefix}, state {self.state_dir} (2 nodes, mesh on)")
        # Registered first: a failure half way through `up` is torn down too.
        self.cleanup.callback(self.tear_down_lab)
        _lab_call(
            self.lab.up,
            UpOptions(
                nodes=2,
                pods_per_node=0,
                namespaces=tuple(NAMESPACES.values()),
                prefix=self.prefix,
                mesh=True,
                apps=False,
                services=False,
            ),
        )
        specs = []
        for path in PATHS:
            namespace = NAMESPACES[path]
            specs.append(PodSpec(namespace, CLIENT, CLIENT_NODE, CLIENT, {"app": "bench-client"}))
            specs.append(PodSpec(namespace, SERVER, SERVER_NODE, SERVER, {"app": "bench-server"}))
        progress("adding a client pod on node-1 and a server pod on node-2 per path")
        _lab_call(_add_pods, self.lab, specs, False)

    def tear_down_lab(self) -> None:
        progress(f"lab down: {self.state_dir}")
        report = _lab_call(self.lab.down, self.prefix)
        left = leftovers(self.prefix, self.state_dir)
        if left:
            progress(f"WARNING: left over after lab down: {left}")
        self.report.setdefault("teardown", {}).update(
            {"processes": report.get("processes"), "left_over": left}
        )

    def start_servers(self, fortio: Path, iperf3: Path) -> None:
        for path in PATHS:
            pod = self.pod(path, SERVER)
            for name, argv in (
                (
                    "fortio-server",
                    [
                        str(fortio),
                        "server",
                        "-loglevel",
                        "Warning",
                        "-http-port",
                        str(HTTP_PORT),
                        "-grpc-port",
                        "disabled",
                        "-redirect-port",
                        "disabled",
                        "-tcp-port",
                        "disabled",
                        "-udp-port",
                        "disabled",
                    ],
                ),
                ("iperf3-server", [str(iperf3), "--server", "--port", str(IPERF_PORT)]),
            ):
                log_path = self.workdir / f"{name}.{path}.log"
                with open(log_path, "wb") as out:
                    process = subprocess.Popen(
                        in_netns(pod.netns, *argv),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                self.cleanup.callback(_stop_process, process)
            wait_until(
                f"fortio and iperf3 listening in {pod.namespace}/{pod.name}",
                functools.partial(listening, pod.netns, (HTTP_PORT, IPERF_PORT)),
                timeout=20,
            )

    def enrol_ambient(self) -> None:
        progress(f"labelling namespace {NAMESPACES['ztunnel']} {AMBIENT_LABEL}")
        self.lab.label("namespace", NAMESPACES["ztunnel"], [AMBIENT_LABEL])
        for node, role in ((CLIENT_NODE, CLIENT), (SERVER_NODE, SERVER)):
            want = f"{NAMESPACES['ztunnel']}/{role}"
            netns = self.node_netns(node)
            wait_until(
                f"{node}'s ztunnel to serve {want}",
                functools.partial(_serves, netns, want),
            )

    def start_sidecars(self) -> None:
        ca_dir = self.workdir / "ca"
        namespace = NAMESPACES["envoy"]
        client_id = SpiffeId(TRUST_DOMAIN, namespace, CLIENT)
        server_id = SpiffeId(TRUST_DOMAIN, namespace, SERVER)
        certs = issue_certificates(ca_dir, [client_id, server_id])
        tls_dir = self.workdir / "tls"
        tls_dir.mkdir(mode=0o700)
        client_files = write_tls_files(tls_dir, certs[client_id], "client")
        server_files = write_tls_files(tls_dir, certs[server_id], "server")
        client_pod, server_pod = self.pod("envoy", CLIENT), self.pod("envoy", SERVER)
        assert server_pod.ip is not None
        server_dir = self.workdir / "envoy-server"
        client_dir = self.workdir / "envoy-client"
        server_config = server_sidecar_config(
            server_files,
            client_identity=client_id,
            pod_ip=server_pod.ip,
            ports=SIDECAR_PORTS,
            admin_socket=server_dir / "admin.sock",
        )
        client_config = client_sidecar_config(
            client_files,
            server_identity=server_id,
            server_ip=server_pod.ip,
            ports=SIDECAR_PORTS,
            admin_socket=client_dir / "admin.sock",
        )
        progress("starting the Envoy sidecars (server pod, then client pod)")
        self.sidecars["envoy-server"] = self.cleanup.enter_context(
            run_sidecar("server sidecar", server_config, server_dir, server_pod.netns)
        )
        self.sidecars["envoy-client"] = self.cleanup.enter_context(
            run_sidecar("client sidecar", client_config, client_dir, client_pod.netns)
        )
        self.report["envoy"] = {
            "binary": str(envoy_binary()),
            "client_identity": client_id.uri,
            "server_identity": server_id.uri,
            "server_sidecar": describe(server_config),
            "client_sidecar": describe(client_config),
        }

    def bench_paths(self) -> dict[str, BenchPath]:
        found = {}
        for path in PATHS:
            client, server = self.pod(path, CLIENT), self.pod(path, SERVER)
            assert server.ip is not None
            if path == "envoy":
                http = ("127.0.0.1", SIDECAR_PORTS[0].outbound_port)
                iperf = ("127.0.0.1", SIDECAR_PORTS[1].outbound_port)
            else:
                http = (server.ip, HTTP_PORT)
                iperf = (server.ip, IPERF_PORT)
            found[path] = BenchPath(path, client.netns, *http, *iperf)
        return found

    # -- checks ---------------------------------------------------------------------------------

    def check_paths(self) -> dict[str, Any]:
        """Fail loudly unless each path goes the way it claims (after the warm-up)."""
        ambient = NAMESPACES["ztunnel"]
        inbound = [
            e
            for e in ztunnel_access_log(self.lab, SERVER_NODE)
            if e.get("direction") == "inbound" and e.get("dst_workload") == f"{ambient}/{SERVER}"
        ]
        hbone = [e for e in inbound if e.get("protocol") == "HBONE" and e.get("outcome") == "ok"]
        if not hbone:
            raise BenchError(
                f"node-2's ztunnel logged no HBONE connection to {ambient}/{SERVER} after the "
                f"warm-up: the ztunnel path is not tunnelled; see "
                f"{mesh.ztunnel_log(self.lab.paths, SERVER_NODE)}"
            )
        identities = {e.get("src_identity") for e in hbone}
        captured_elsewhere = {
            e.get("dst_workload")
            for node in (CLIENT_NODE, SERVER_NODE)
            for e in ztunnel_access_log(self.lab, node)
            if str(e.get("dst_workload", "")).split("/")[0]
            in (NAMESPACES["no-mesh"], NAMESPACES["envoy"])
        }
        if captured_elsewhere:
            raise BenchError(
                f"ztunnel captured traffic of a path outside the mesh: {captured_elsewhere}"
            )
        handshakes = {}
        for name, sidecar in self.sidecars.items():
            stats = sidecar.stats()
            done = sum(v for k, v in stats.items() if k.endswith("ssl.handshake"))
            bad_san = sum(v for k, v in stats.items() if k.endswith("ssl.fail_verify_san"))
            if done == 0:
                raise BenchError(
                    f"the {name} sidecar completed no TLS handshake during the warm-up"
                )
            handshakes[name] = {"handshakes": done, "fail_verify_san": bad_san}
        return {
            "ztunnel_hbone_connections": len(hbone),
            "ztunnel_src_identities": sorted(str(i) for i in identities),
            "envoy": handshakes,
        }

    # -- measurements ---------------------------------------------------------------------------

    def measure(self, runner: Runner, paths: Mapping[str, BenchPath]) -> None:
        s = self.settings
        tests: list[tuple[str, dict[str, Any]]] = []
        tests += [("latency", {"qps": r, "connections": s.latency_connections}) for r in s.rates]
        tests += [("max_rps", {"qps": 0, "connections": c}) for c in s.max_rps_connections]
        tests += [("bulk", {"seconds": s.bulk_seconds}), ("connections", {"connections": 1})]
        for index, (test, params) in enumerate(tests):
            # Rotate the order so that no path is always first (or last) after a change.
            order = PATHS[index % len(PATHS) :] + PATHS[: index % len(PATHS)]
            for name in order:
                path = paths[name]
                if test == "latency":
                    result, usage = runner.fortio_load(
                        path,
                        qps=params["qps"],
                        connections=params["connections"],
                        seconds=s.latency_seconds,
                    )
                    line = (
                        f"p50/p90/p99 {result.get('p50_us')}/{result.get('p90_us')}/"
                        f"{result.get('p99_us')} us at {result['actual_rps']} rps"
                    )
                elif test == "max_rps":
                    result, usage = runner.fortio_load(
                        path, qps=0, connections=params["connections"], seconds=s.max_rps_seconds
                    )
                    line = f"{result['actual_rps']} rps (p90 {result.get('p90_us')} us)"
                elif test == "bulk":
                    result, usage = runner.iperf(path, s.bulk_seconds)
                    line = f"{result['gbit_s']} Gbit/s"
                else:
                    result, usage = runner.fortio_load(
                        path,
                        qps=0,
                        connections=1,
                        seconds=s.connection_seconds,
                        payload=False,
                        keepalive=False,
                    )
                    line = f"{result['actual_rps']} new connections/s ({result['sockets']} sockets)"
                runner.record(test, params, path, result, usage)
                if result.get("errors"):
                    line += f", {result['errors']} errors"
                label = " ".join(f"{k}={v}" for k, v in params.items())
                proxy_cpu = sum(v for k, v in usage.cpu_s.items() if _proxy_of(k) == name)
                progress(
                    f"{test} {label} [{name}]: {line}; proxy CPU {proxy_cpu:.2f} s, "
                    f"machine {usage.machine_busy_cpus} CPUs busy"
                )

    def profile_ztunnels(self, runner: Runner, path: BenchPath) -> dict[str, Any]:
        """py-spy on both ztunnels while the ztunnel path runs a max-rps, a bulk and a
        new-connections load (separate runs: profiling doesn't touch the figures above)."""
        py_spy = py_spy_binary()
        out_dir = self.profile_dir or self.workdir / "profiles"
        out_dir.mkdir(parents=True, exist_ok=True)
        s = self.settings
        scenarios: list[tuple[str, float, Callable[[], tuple[dict[str, Any], Usage]]]] = [
            (
                "max_rps_c4",
                s.max_rps_seconds,
                lambda: runner.fortio_load(path, qps=0, connections=4, seconds=s.max_rps_seconds),
            ),
            ("bulk", s.bulk_seconds + 1, lambda: runner.iperf(path, s.bulk_seconds)),
            (
                "connections",
                s.connection_seconds,
                lambda: runner.fortio_load(
                    path,
                    qps=0,
                    connections=1,
                    seconds=s.connection_seconds,
                    payload=False,
                    keepalive=False,
                ),
            ),
        ]
        profiles: dict[str, Any] = {}
        for scenario, seconds, load in scenarios:
            spies = {}
            for node in (CLIENT_NODE, SERVER_NODE):
                raw = out_dir / f"ztunnel-{node}-{scenario}.txt"
                argv = [
                    str(py_spy),
                    "record",
                    "--pid",
                    str(self.ztunnel_pid(node)),
                    "--duration",
                    str(int(seconds) + 1),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--nolineno",
                    # Sample without stopping ztunnel (stopping it halves its rate).
                    "--nonblocking",
                    "--output",
                    str(raw),
                ]
                spy = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                spies[node] = (raw, spy)
            time.sleep(0.5)  # py-spy attaches asynchronously and reports no readiness
            result, usage = load()
            profiles[scenario] = {"load": result, "usage": asdict(usage)}
            for node, (raw, spy) in spies.items():
                _, err = spy.communicate(timeout=seconds + 60)
                if spy.returncode != 0 or not raw.exists():
                    raise BenchError(
                        f"py-spy on {node}'s ztunnel failed: {err.decode(errors='replace')[-1000:]}"
                    )
                profiles[scenario][node] = summarise_profile(raw.read_text())
                profiles[scenario][node]["raw"] = str(raw) if self.profile_dir else None
            progress(f"profiled {scenario} on the ztunnel path")
        return profiles

    def idle_pods_memory(self) -> dict[str, Any]:
        node_netns = self.node_netns(CLIENT_NODE)
        pid = self.ztunnel_pid(CLIENT_NODE)
        served = served_pods(node_netns)
        before = memory_kib(pid)
        wanted = self.settings.idle_pods
        to_add = max(0, wanted - len(served))
        namespace = NAMESPACES["ztunnel"]
        specs = [PodSpec(namespace, f"idle-{i:03d}", CLIENT_NODE) for i in range(1, to_add + 1)]
        progress(f"adding {to_add} idle enrolled pods to node-1 (ztunnel serves {len(served)} now)")
        _lab_call(_add_pods, self.lab, specs, False)
        wait_until(
            f"node-1's ztunnel to serve {wanted} pods",
            lambda: len(served_pods(node_netns)) >= wanted,
            timeout=180,
        )
        # Let the per-pod work (listeners, certificate fetches) finish: sample a few seconds.
        samples = []
        for _ in range(10):
            samples.append(memory_kib(pid))
            time.sleep(0.3)
        after = samples[-1]
        pods_on_node = len(self.lab.registry.snapshot().pods_on_node(CLIENT_NODE))
        return {
            "enrolled_pods_served": len(served_pods(node_netns)),
            "pods_on_node": pods_on_node,
            "before_rss_mib": round(before["rss"] / 1024, 1),
            "before_pss_mib": round(before["pss"] / 1024, 1),
            "enrolled_before": len(served),
            "rss_mib": round(after["rss"] / 1024, 1),
            "pss_mib": round(after["pss"] / 1024, 1),
            "peak_rss_mib": round(max(s["rss"] for s in samples) / 1024, 1),
        }

    def run(self) -> dict[str, Any]:
        settings = self.settings
        fortio, iperf3 = ensure_fortio(), ensure_iperf3()
        envoy_binary()  # fail before building anything if Envoy is missing
        self.report.update(
            {
                "bench": "ztunnel_lab",
                "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "settings": asdict(settings),
                "machine": {
                    "cpus": os.cpu_count(),
                    "loadavg_start": os.getloadavg(),
                    "python": platform.python_version(),
                    "kernel": platform.release(),
                },
                "tools": {
                    "fortio": FORTIO_VERSION,
                    "iperf3": subprocess.run(
                        [str(iperf3), "--version"], capture_output=True, text=True, check=False
                    ).stdout.splitlines()[0],
                },
                "commit": _git_commit(),
                "lab": {"prefix": self.prefix, "state_dir": str(self.state_dir)},
            }
        )
        self.build_lab()
        self.start_servers(fortio, iperf3)
        self.enrol_ambient()
        self.start_sidecars()
        paths = self.bench_paths()
        runner = Runner(settings, self.workdir, fortio, iperf3)
        runner.watched = {
            "ztunnel-node-1": self.ztunnel_pid(CLIENT_NODE),
            "ztunnel-node-2": self.ztunnel_pid(SERVER_NODE),
            **{name: sidecar.pid for name, sidecar in self.sidecars.items()},
        }
        idle = Usage()
        idle.sample(runner.watched)
        self.report["idle_memory_mib"] = {
            name: {
                "rss": round(idle.peak_rss_kib[name] / 1024, 1),
                "pss": round(idle.peak_pss_kib[name] / 1024, 1),
            }
            for name in runner.watched
        }
        for name, path in paths.items():
            progress(
                f"warm-up [{name}]: {settings.warmup_seconds:g} s to "
                f"{path.http_host}:{path.http_port}"
            )
            result, _ = runner.fortio_load(
                path, qps=0, connections=4, seconds=settings.warmup_seconds
            )
            if result["errors"]:
                raise BenchError(f"the {name} path answered errors during the warm-up: {result}")
        self.report["checks"] = self.check_paths()
        progress(f"paths checked: {self.report['checks']}")
        self.measure(runner, paths)
        self.report["runs"] = runner.runs
        if self.profile:
            self.report["profile"] = self.profile_ztunnels(runner, paths["ztunnel"])
        self.report["idle_pods"] = self.idle_pods_memory()
        progress(f"ztunnel with idle pods: {self.report['idle_pods']}")
        self.report["machine"]["loadavg_end"] = os.getloadavg()
        self.report["summary"] = summarise(runner.runs)
        return self.report

    def close(self) -> None:
        """Stop what we started and tear the lab down; Ctrl-C can't interrupt this."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.cleanup.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            signal.signal(signal.SIGINT, previous)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _git_commit() -> str | None:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent,
    )
    return out.stdout.strip() or None


# -- summary and table ------------------------------------------------------------------------


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per path: the figures of each test, and what the proxies used over all of its runs."""
    summary: dict[str, Any] = {}
    for path in PATHS:
        mine = [r for r in runs if r["path"] == path]
        figures: dict[str, Any] = {}
        cpu: Counter[str] = Counter()
        cpu_sys: Counter[str] = Counter()
        waited: Counter[str] = Counter()
        peak_rss: dict[str, int] = {}
        peak_pss: dict[str, int] = {}
        for run in mine:
            test, params, result = run["test"], run["params"], run["result"]
            if test == "latency":
                figures[f"latency_{params['qps']}"] = result
            elif test == "max_rps":
                figures[f"max_rps_c{params['connections']}"] = result
            else:
                figures[test] = result
            usage = run["usage"]
            cpu.update(usage["cpu_s"])
            cpu_sys.update(usage["cpu_sys_s"])
            waited.update(usage["runqueue_wait_s"])
            for name, value in usage["peak_rss_kib"].items():
                peak_rss[name] = max(peak_rss.get(name, 0), value)
            for name, value in usage["peak_pss_kib"].items():
                peak_pss[name] = max(peak_pss.get(name, 0), value)
            proxy_cpu = sum(v for k, v in usage["cpu_s"].items() if _proxy_of(k) == path)
            if test == "max_rps" and params["connections"] == 4 and result["requests"]:
                figures["proxy_cpu_us_per_request_c4"] = round(
                    proxy_cpu / result["requests"] * 1e6, 1
                )
            if test == "connections" and result["requests"]:
                figures["proxy_cpu_us_per_connection"] = round(
                    proxy_cpu / result["requests"] * 1e6, 1
                )
            if test == "bulk" and result["bytes"]:
                figures["proxy_cpu_s_per_gb"] = round(proxy_cpu / (result["bytes"] / 1e9), 3)
        summary[path] = {
            "figures": figures,
            "machine_busy_cpus_mean": round(
                sum(r["usage"]["machine_busy_cpus"] for r in mine) / max(1, len(mine)), 2
            ),
            "processes": {
                name: {
                    "cpu_s": round(cpu[name], 2),
                    "cpu_sys_s": round(cpu_sys[name], 2),
                    "runqueue_wait_s": round(waited[name], 2),
                    "peak_rss_mib": round(peak_rss.get(name, 0) / 1024, 1),
                    "peak_pss_mib": round(peak_pss.get(name, 0) / 1024, 1),
                }
                for name in sorted(set(cpu) | set(peak_rss))
            },
        }
    return summary


def _proxy_of(process: str) -> str:
    return "ztunnel" if process.startswith("ztunnel") else "envoy"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


Row = tuple[str, float | None, float | None, float | None]


def _added(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def table(report: Mapping[str, Any]) -> str:
    """The report as text: figures per path with ratios, resources, targets, profiles."""
    summary = report["summary"]
    settings = report["settings"]
    figures = {path: summary[path]["figures"] for path in PATHS}

    def get(path: str, key: str, field_name: str) -> float | None:
        value = figures[path].get(key, {})
        return value.get(field_name) if isinstance(value, dict) else None

    def row(name: str, key: str, field_name: str) -> Row:
        none, zt, envoy = (get(path, key, field_name) for path in PATHS)
        return (name, none, zt, envoy)

    rows: list[Row] = []
    for rate in settings["rates"]:
        key = f"latency_{rate}"
        connections = settings["latency_connections"]
        for pct in ("p50", "p90", "p99"):
            rows.append(row(f"{rate} rps c={connections} {pct} (us)", key, f"{pct}_us"))
        rows.append(row(f"{rate} rps: rate reached (rps)", key, "actual_rps"))
    for c in settings["max_rps_connections"]:
        rows.append(row(f"max rps, {c} connections", f"max_rps_c{c}", "actual_rps"))
    rows.append(row("bulk, 1 stream (Gbit/s)", "bulk", "gbit_s"))
    rows.append(row("new connections/s (c=1)", "connections", "actual_rps"))
    for name, key in (
        ("proxy CPU us/request (max c=4)", "proxy_cpu_us_per_request_c4"),
        ("proxy CPU us/new connection", "proxy_cpu_us_per_connection"),
        ("proxy CPU s per GB (bulk)", "proxy_cpu_s_per_gb"),
    ):
        rows.append((name, None, figures["ztunnel"].get(key), figures["envoy"].get(key)))
    header = ("metric", "no-mesh", "ztunnel", "envoy", "zt/no-mesh", "zt/envoy", "envoy/no-mesh")
    cells = [header] + [
        (
            name,
            _fmt(none),
            _fmt(zt),
            _fmt(envoy),
            _ratio(zt, none),
            _ratio(zt, envoy),
            _ratio(envoy, none),
        )
        for name, none, zt, envoy in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(line))
        for line in cells
    ]
    out.insert(1, "-" * len(out[0]))

    out += [
        "",
        f"{'added latency over no mesh (us)':<34}{'ztunnel':>9}{'envoy':>9}{'zt/envoy':>10}",
    ]
    for rate in settings["rates"]:
        key = f"latency_{rate}"
        for pct in ("p50", "p90"):
            base = get("no-mesh", key, f"{pct}_us")
            zt = _added(get("ztunnel", key, f"{pct}_us"), base)
            envoy = _added(get("envoy", key, f"{pct}_us"), base)
            name = f"  {rate} rps {pct}"
            out.append(f"{name:<34}{_fmt(zt):>9}{_fmt(envoy):>9}{_ratio(zt, envoy):>10}")

    out += ["", "process use per path (CPU s over all of that path's runs; peak RSS / PSS MiB)"]
    for path in ("ztunnel", "envoy"):
        for name, use in summary[path]["processes"].items():
            if _proxy_of(name) == path:
                out.append(
                    f"  [{path}] {name:<15} cpu {use['cpu_s']:>6.2f} s "
                    f"(sys {use['cpu_sys_s']:>5.2f}, waited for a CPU "
                    f"{use['runqueue_wait_s']:>5.2f})"
                    f"  rss {use['peak_rss_mib']:>5.1f}  pss {use['peak_pss_mib']:>5.1f}"
                )
    out.append(
        "  machine CPUs busy during the runs (mean; all processes, the load tools and other "
        "users included): "
        + ", ".join(f"{path} {summary[path]['machine_busy_cpus_mean']}" for path in PATHS)
    )
    idle_memory = report.get("idle_memory_mib", {})
    if idle_memory:
        out.append(
            "  idle before the runs (RSS/PSS MiB): "
            + ", ".join(f"{n} {m['rss']}/{m['pss']}" for n, m in idle_memory.items())
        )
    idle = report.get("idle_pods")
    if idle:
        out.append(
            f"  node-1 ztunnel serving {idle['enrolled_pods_served']} enrolled idle pods "
            f"({idle['pods_on_node']} pods on the node): RSS {idle['rss_mib']} MiB, "
            f"PSS {idle['pss_mib']} MiB (serving {idle['enrolled_before']}: "
            f"RSS {idle['before_rss_mib']}, PSS {idle['before_pss_mib']})"
        )

    out += ["", "targets (informational, nothing is asserted)"]
    for rate in settings["rates"]:
        key = f"latency_{rate}"
        base = get("no-mesh", key, "p90_us")
        zt = _added(get("ztunnel", key, "p90_us"), base)
        envoy = _added(get("envoy", key, "p90_us"), base)
        if zt is not None and envoy is not None:
            verdict = "met" if zt <= envoy else "missed"
            out.append(
                f"  added p90 <= Envoy's at {rate} rps: {verdict} ({zt:,.0f} vs {envoy:,.0f} us)"
            )
    zt_bulk, envoy_bulk = get("ztunnel", "bulk", "gbit_s"), get("envoy", "bulk", "gbit_s")
    if zt_bulk is not None and envoy_bulk:
        verdict = "met" if zt_bulk >= 0.5 * envoy_bulk else "missed"
        out.append(
            f"  single-stream throughput >= 50% of Envoy's: {verdict} "
            f"({100 * zt_bulk / envoy_bulk:.0f}%)"
        )
    if idle:
        verdict = "met" if idle["rss_mib"] <= 60 else "missed"
        out.append(
            f"  RSS <= 60 MB with {idle['enrolled_pods_served']} pods: {verdict} "
            f"({idle['rss_mib']} MiB)"
        )

    for scenario, data in (report.get("profile") or {}).items():
        for node in (CLIENT_NODE, SERVER_NODE):
            prof = data.get(node)
            if not prof:
                continue
            out += [
                "",
                f"py-spy, {scenario}, {node}'s ztunnel ({prof['samples']} samples): "
                "self time by area",
                "  " + ", ".join(f"{k} {v}%" for k, v in prof["self_by_category"].items()),
                "  top self:",
            ]
            out += [f"    {e['percent']:>5}%  {e['function']}" for e in prof["self"][:10]]
            out.append("  top inclusive:")
            out += [f"    {e['percent']:>5}%  {e['function']}" for e in prof["inclusive"][:10]]
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ztunnel_lab",
        description="ztunnel (L4) vs Envoy sidecars vs no mesh, between two nodes of a lab (root)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs, 10 idle pods (a smoke run)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile both ztunnels with py-spy (pip install py-spy)",
    )
    parser.add_argument(
        "--profile-dir", type=Path, help="keep py-spy's raw stacks here (with --profile)"
    )
    parser.add_argument(
        "--idle-pods", type=int, help="enrolled pods on node-1 for the memory figure"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.ztunnel_lab needs root (network namespaces, CNI plugins)", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else FULL
    if args.idle_pods is not None:
        settings = Settings(**{**asdict(settings), "idle_pods": args.idle_pods})
    if args.profile:
        py_spy_binary()
    underpass_log.configure("warning", "console")
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    bench = ZtunnelLabBench(settings, profile=args.profile, profile_dir=args.profile_dir)
    progress(
        f"ztunnel lab bench ({'quick' if args.quick else 'full'}): if this process is killed, "
        f"clean up with `underpass lab down --state-dir {bench.state_dir}`"
    )
    try:
        report = bench.run()
    except KeyboardInterrupt:
        progress("interrupted: tearing everything down")
        bench.close()
        return 130
    except BaseException:
        bench.close()
        raise
    bench.close()
    report["teardown"] = bench.report.get("teardown")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"wrote {args.out}")
    print()
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
