"""Mesh traffic through ztunnel, end to end in one lab (netns, root).

Owns the whole-path checks of pod traffic in the mesh: two nodes with two pods
each in namespace ``demo`` (service accounts ``a`` and ``b``), enrolled, with
the control plane and a ztunnel per node as ``underpass lab up`` runs them.
Each test drives real clients (the sample app through ``lab exec``, or sockets
this process makes inside a pod's network namespace, which the pod's
redirection captures like any other) and then looks where an operator would:
the application's answer, both ztunnels' access logs, ``/metrics``,
``/connections``, ``ss`` in the pod, and a packet capture on the underlay.

One lab serves the module; every test undoes what it changed (policies
deleted and gone from both ztunnels, extra pods and processes removed). The
control-plane test stops and restarts a lab component, so it comes last.

Waits are bounded and event-driven where an event exists (inotify on the log
files, a server's "serving" line, a pidfd); the state inside the ztunnels is
read from their admin endpoint until it holds (:func:`meshkit.wait_for`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.underpass.lab.labkit import ROOT, LabHandle
from tests.ztunnel.meshkit import (
    NAMESPACE,
    admin,
    apply_policy,
    delete_policy,
    mesh_lab,
    metrics,
    policy_names,
    wait_for,
)
from underpass.inotify import Inotify
from underpass.netns import run_in_netns

pytestmark = pytest.mark.netns

NODES: Final = ("node-1", "node-2")
TRUST_DOMAIN: Final = "cluster.local"
HTTP_PORT: Final = 8080
TCP_PORT: Final = 9000
HBONE_PORT: Final = 15008
#: A bound on every wait for something another process does; never expected to be reached.
TIMEOUT: Final = 20.0
#: inotify: the file was written (not exported by underpass.inotify, which needs no more).
IN_MODIFY: Final = 0x00000002
STRICT_POLICY_SUFFIX: Final = "/istio_converted_static_strict"


def spiffe(service_account: str, namespace: str = NAMESPACE) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def principal(service_account: str, namespace: str = NAMESPACE) -> str:
    """The policy form of an identity: no ``spiffe://`` prefix."""
    return f"{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class Pod:
    """A lab pod as these tests use it."""

    namespace: str
    name: str
    node: str
    service_account: str
    ip: str
    netns: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def identity(self) -> str:
        return spiffe(self.service_account, self.namespace)


@dataclass(frozen=True)
class Pods:
    """The four pods of the lab: ``a1``/``b1`` on node-1, ``a2``/``b2`` on node-2 (by SA)."""

    a1: Pod
    b1: Pod
    a2: Pod
    b2: Pod


# -- the lab ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    yield from mesh_lab(
        tmp_path_factory,
        "--nodes",
        "2",
        "--pods-per-node",
        "2",
        "--namespaces",
        NAMESPACE,
        "--service-accounts",
        "a,b",
    )


@pytest.fixture(scope="module")
def pods(mesh: LabHandle) -> Pods:
    found: dict[tuple[str, str], Pod] = {}
    for p in mesh.registry.pods():
        assert p.ip is not None, f"pod {p.namespace}/{p.name} has no IP"
        found[(p.node, p.service_account)] = Pod(
            p.namespace, p.name, p.node, p.service_account, p.ip, p.netns
        )
    wanted = [("node-1", "a"), ("node-1", "b"), ("node-2", "a"), ("node-2", "b")]
    assert sorted(found) == wanted, f"expected one pod per (node, service account): {found}"
    return Pods(
        a1=found[("node-1", "a")],
        b1=found[("node-1", "b")],
        a2=found[("node-2", "a")],
        b2=found[("node-2", "b")],
    )


def node_netns(mesh: LabHandle, node: str) -> str:
    found = mesh.registry.node(node)
    assert found is not None, f"node {node} missing from the lab"
    return found.netns


def fabric_ip(mesh: LabHandle) -> str:
    cfg = mesh.registry.config()
    assert cfg is not None
    return cfg.fabric_ip


# -- ztunnel logs ---------------------------------------------------------------------------


def log_path(mesh: LabHandle, node: str) -> Path:
    return mesh.state_dir / "logs" / f"ztunnel.{node}.log"


def log_marks(mesh: LabHandle) -> dict[str, int]:
    """Where each node's ztunnel log ends now: read only what comes after."""
    return {node: log_path(mesh, node).stat().st_size for node in NODES}


def log_since(mesh: LabHandle, node: str, offset: int) -> list[dict[str, Any]]:
    """The complete JSON lines the node's ztunnel wrote after ``offset``."""
    with log_path(mesh, node).open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    complete, _, _partial = data.rpartition(b"\n")  # a line being written is not read yet
    return [json.loads(line) for line in complete.splitlines() if line.startswith(b"{")]


def matches(entry: dict[str, Any], **expected: Any) -> bool:
    return all(entry.get(key) == value for key, value in expected.items())


async def wait_log(
    mesh: LabHandle,
    node: str,
    since: int,
    what: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """The first entry after ``since`` that satisfies ``predicate``, waiting on inotify.

    ztunnel logs a connection when it ends, which can be a moment after the
    client has its answer; the watch is set before the first read so no write
    is missed between the two.
    """
    with Inotify() as watch:
        watch.add_watch(log_path(mesh, node), IN_MODIFY)
        with trio.move_on_after(timeout):
            while True:
                for entry in log_since(mesh, node, since):
                    if predicate(entry):
                        return entry
                await watch.read_events()
    lines = "\n".join(json.dumps(e) for e in log_since(mesh, node, since)[-30:])
    pytest.fail(f"{node}'s ztunnel did not log {what} within {timeout}s; its new lines:\n{lines}")


async def wait_access_log(
    mesh: LabHandle, node: str, since: int, **expected: Any
) -> dict[str, Any]:
    return await wait_log(
        mesh,
        node,
        since,
        f"a 'connection complete' line with {expected}",
        lambda e: e.get("event") == "connection complete" and matches(e, **expected),
    )


# -- metrics --------------------------------------------------------------------------------


def connections_opened(mesh: LabHandle, node: str, **labels: str) -> float:
    """Sum of ``istio_tcp_connections_opened_total`` over the series with these labels."""
    total = 0.0
    for family in text_string_to_metric_families(metrics(mesh, node)):
        for sample in family.samples:
            if sample.name == "istio_tcp_connections_opened_total" and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


# -- clients made inside a pod's netns -------------------------------------------------------


class Session:
    """A TCP connection with the sample app's TCP server, from a socket made in a netns.

    The socket is created inside the (pod's) network namespace and used from
    here: the pod's redirection captures it like any of the pod's own.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(cls, netns: str, host: str, port: int) -> Session:
        raw = run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            with trio.fail_after(TIMEOUT):
                await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(trio.SocketStream(sock))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(256 * 1024)
        self.buffer += data
        return bool(data)

    async def line(self) -> str:
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self.buffer:
                if not await self._fill():
                    raise ConnectionError(f"closed before a full line: {bytes(self.buffer)!r}")
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer[:] = rest
        return line.decode()

    async def exactly(self, size: int) -> bytes:
        with trio.fail_after(TIMEOUT):
            while len(self.buffer) < size:
                if not await self._fill():
                    raise ConnectionError(f"closed after {len(self.buffer)} of {size} bytes")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def until_eof(self) -> bytes:
        with trio.fail_after(TIMEOUT):
            while await self._fill():
                pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


def hello_fields(line: str) -> dict[str, str]:
    """``HELLO pod=ns/name peer=ip:port local=ip:port`` as a dict."""
    words = line.split()
    assert words and words[0] == "HELLO", f"not the echo server's greeting: {line!r}"
    return dict(w.split("=", 1) for w in words[1:])


async def sink(netns: str, host: str, port: int, payload: bytes) -> dict[str, str]:
    """SINK ``payload`` to the TCP echo server; its ``bytes``/``sha256`` answer."""
    session = await Session.open(netns, host, port)
    try:
        hello_fields(await session.line())
        await session.stream.send_all(b"SINK\n" + payload)
        await session.stream.send_eof()
        reply = (await session.line()).split()
        assert reply[0] == "SINK", reply
        return dict(w.split("=", 1) for w in reply[1:])
    finally:
        await session.aclose()


def refused(doc: dict[str, Any]) -> bool:
    """The sample app client saw its connection reset or closed (not served)."""
    error = str(doc.get("error", ""))
    words = ("ConnectionResetError", "RemoteDisconnected", "closed", "BrokenPipe")
    return any(word in error for word in words)


# -- packet capture on the underlay ---------------------------------------------------------

ETH_P_ALL: Final = 0x0003
ETH_P_IP: Final = 0x0800
SO_RCVBUFFORCE: Final = 33  # Linux; not exported by the socket module
SOL_PACKET: Final = 263
PACKET_STATISTICS: Final = 6
TLS_APPLICATION_DATA: Final = b"\x17\x03\x03"


@dataclass(frozen=True)
class Segment:
    """A captured IPv4 TCP segment: addresses, sequence number, payload, the whole frame."""

    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    payload: bytes
    frame: bytes

    @property
    def flow(self) -> tuple[str, int, str, int]:
        return self.src, self.sport, self.dst, self.dport


def parse_frame(frame: bytes) -> Segment | None:
    """An Ethernet frame carrying IPv4 + TCP as a :class:`Segment`; None for anything else."""
    if len(frame) < 14 + 20 + 20 or int.from_bytes(frame[12:14], "big") != ETH_P_IP:
        return None
    ip = frame[14:]
    if ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
        return None
    header = (ip[0] & 0x0F) * 4
    total = int.from_bytes(ip[2:4], "big") or len(ip)  # 0: a GSO packet past 64 KiB
    tcp = ip[header:total]
    sport, dport, seq = struct.unpack_from("!HHI", tcp)
    offset = (tcp[12] >> 4) * 4
    return Segment(
        socket.inet_ntoa(ip[12:16]),
        sport,
        socket.inet_ntoa(ip[16:20]),
        dport,
        seq,
        bytes(tcp[offset:]),
        frame,
    )


def reassemble(segments: list[Segment]) -> bytes:
    """One direction of a TCP flow's bytes, placed by sequence number (gaps as zeros).

    A marker split over two segments is still found this way; the capture
    may start in the middle of a pooled connection, so offsets are relative
    to the first segment seen.
    """
    carrying = [s for s in segments if s.payload]
    if not carrying:
        return b""
    base = carrying[0].seq
    out = bytearray()
    for segment in carrying:
        offset = (segment.seq - base) % (1 << 32)
        if offset > 1 << 30:
            continue  # a retransmission of bytes from before the capture began
        end = offset + len(segment.payload)
        if end > len(out):
            out.extend(bytes(end - len(out)))
        out[offset:end] = segment.payload
    return bytes(out)


@dataclass
class Capture:
    """Every frame through one interface of a netns, on an AF_PACKET socket.

    The socket is made inside the netns and given a large receive buffer; the
    frames are read after the traffic (:meth:`drain`), and the kernel's drop
    counter must be zero so that "not seen" really means "not sent".
    """

    netns: str
    ifname: str
    sock: socket.socket | None = None
    frames: list[bytes] = field(default_factory=list)

    def __enter__(self) -> Capture:
        def make() -> socket.socket:
            # protocol 0 until bound: no frame of another interface slips in before bind
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
                sock.bind((self.ifname, ETH_P_ALL))  # host byte order here
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            return sock

        self.sock = run_in_netns(self.netns, make)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def drain(self) -> list[Segment]:
        """Everything queued so far, parsed; fails if the kernel dropped any frame."""
        assert self.sock is not None
        while True:
            try:
                self.frames.append(self.sock.recv(1 << 18))
            except BlockingIOError:
                break
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        packets, drops = struct.unpack("II", raw)
        assert drops == 0, f"the capture dropped {drops} of {packets} frames: not conclusive"
        return [s for s in map(parse_frame, self.frames) if s is not None]


def flows(segments: list[Segment]) -> dict[tuple[str, int, str, int], bytes]:
    by_flow: dict[tuple[str, int, str, int], list[Segment]] = {}
    for segment in segments:
        by_flow.setdefault(segment.flow, []).append(segment)
    return {key: reassemble(found) for key, found in by_flow.items()}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def marked_payload(marker: bytes, size: int = 64 * 1024) -> bytes:
    """``size`` bytes: random filler with ``marker`` every KiB or so."""
    chunk = marker + os.urandom(1024 - len(marker))
    return (chunk * (size // len(chunk) + 1))[:size]


# -- policies ---------------------------------------------------------------------------------


def authorization_policy(name: str, action: str, rules: list[dict[str, Any]]) -> str:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"action": action, "rules": rules},
    }
    return json.dumps(doc)  # JSON is YAML


def from_principals(*service_accounts: str) -> dict[str, Any]:
    return {"from": [{"source": {"principals": [principal(sa) for sa in service_accounts]}}]}


def workload_policies(dump: dict[str, Any], pod: Pod) -> list[str]:
    for workload in dump["workloads"]:
        if workload["namespace"] == pod.namespace and workload["name"] == pod.name:
            return list(workload["authorization_policies"])
    raise AssertionError(f"{pod.ref} is not in the config dump")


@dataclass
class Policies:
    """Policy files a test applied; each one waited for on both ztunnels, removed after."""

    mesh: LabHandle
    applied: list[str] = field(default_factory=list)

    def apply(self, name: str, text: str, shows_as: str | None = None) -> None:
        """Write the policy and wait until both ztunnels have ``shows_as`` (default ns/name)."""
        key = shows_as or f"{NAMESPACE}/{name}"
        self.applied.append(name)
        apply_policy(self.mesh, name, text)
        for node in NODES:
            wait_for(self.mesh, node, lambda d: key in policy_names(d), what=f"policy {key}")

    def delete(self, name: str) -> None:
        delete_policy(self.mesh, name)
        self.applied.remove(name)
        self.wait_clean(f"policy {NAMESPACE}/{name} gone", {f"{NAMESPACE}/{name}"})

    def wait_clean(self, what: str, keys: set[str]) -> None:
        """Until no ztunnel has these policies, nor any workload a policy attached."""
        for node in NODES:
            wait_for(
                self.mesh,
                node,
                lambda d: (
                    not (keys & policy_names(d))
                    and not any(w["authorization_policies"] for w in d["workloads"])
                ),
                what=what,
            )

    def remove_all(self) -> None:
        keys = {f"{NAMESPACE}/{name}" for name in self.applied}
        for name in self.applied:
            delete_policy(self.mesh, name)
        self.applied.clear()
        self.wait_clean("every policy of the test gone", keys)


@pytest.fixture
def policies(mesh: LabHandle) -> Iterator[Policies]:
    applied = Policies(mesh)
    try:
        yield applied
    finally:
        applied.remove_all()


# -- 1. pod to pod -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["across nodes", "on one node"])
async def test_pod_to_pod_http_is_hbone_with_both_identities(
    mesh: LabHandle, pods: Pods, where: str
) -> None:
    client = pods.a1
    server = pods.b2 if where == "across nodes" else pods.b1
    source_labels = {
        "source_principal": client.identity,
        "destination_principal": server.identity,
        "source_workload": client.name,
        "destination_workload": server.name,
        "connection_security_policy": "mutual_tls",
    }
    opened_before = {
        "source": connections_opened(mesh, client.node, reporter="source", **source_labels),
        "destination": connections_opened(
            mesh, server.node, reporter="destination", **source_labels
        ),
    }
    marks = log_marks(mesh)

    doc = mesh.app(client.ref, "http", f"http://{server.ip}:{HTTP_PORT}/")

    assert doc["status"] == 200 and doc["pod"] == server.ref
    assert doc["client_ip"] == client.ip  # the server saw the client pod's own address
    outbound = await wait_access_log(
        mesh, client.node, marks[client.node], direction="outbound", src_addr=doc["local"]
    )
    assert matches(
        outbound,
        protocol="HBONE",
        dst_addr=f"{server.ip}:{HTTP_PORT}",
        src_workload=client.ref,
        dst_workload=server.ref,
        src_identity=client.identity,
        dst_identity=server.identity,
        outcome="ok",
    ), outbound
    inbound = await wait_access_log(
        mesh,
        server.node,
        marks[server.node],
        direction="inbound",
        dst_addr=f"{server.ip}:{HTTP_PORT}",
        src_workload=client.ref,
    )
    assert matches(
        inbound,
        protocol="HBONE",
        dst_workload=server.ref,
        src_identity=client.identity,
        dst_identity=server.identity,
        outcome="ok",
    ), inbound
    assert inbound["bytes_recv"] == outbound["bytes_recv"] > 0  # the request, both ends
    assert inbound["bytes_sent"] == outbound["bytes_sent"] > 0  # the answer

    # one more connection each side, with both principals and mTLS
    after_source = connections_opened(mesh, client.node, reporter="source", **source_labels)
    after_destination = connections_opened(
        mesh, server.node, reporter="destination", **source_labels
    )
    assert after_source == opened_before["source"] + 1, metrics(mesh, client.node)
    assert after_destination == opened_before["destination"] + 1, metrics(mesh, server.node)


# -- 2. service VIP ----------------------------------------------------------------------------


async def test_service_vip_lands_on_an_endpoint(mesh: LabHandle, pods: Pods) -> None:
    (service,) = [s for s in mesh.json("status")["services"] if s["namespace"] == NAMESPACE]
    (port,) = [p for p in service["ports"] if p["target_port"] == HTTP_PORT]
    endpoints = set(service["endpoints"])
    assert endpoints == {p.ip for p in (pods.a1, pods.b1, pods.a2, pods.b2)}
    by_ip = {p.ip: p for p in (pods.a1, pods.b1, pods.a2, pods.b2)}
    client = pods.a1
    marks = log_marks(mesh)

    landed = set()
    for _ in range(4):
        doc = mesh.app(client.ref, "http", f"http://{service['vip']}:{port['port']}/")
        assert doc["status"] == 200 and doc["client_ip"] == client.ip
        server_ip, _, server_port = doc["server"].rpartition(":")
        assert server_ip in endpoints and int(server_port) == HTTP_PORT, doc
        assert doc["pod"] == by_ip[server_ip].ref
        landed.add(server_ip)
        # the pod asked for the VIP; ztunnel tunnelled to the chosen endpoint's target port
        entry = await wait_access_log(
            mesh, client.node, marks[client.node], direction="outbound", src_addr=doc["local"]
        )
        assert matches(
            entry,
            protocol="HBONE",
            dst_addr=f"{server_ip}:{HTTP_PORT}",
            dst_workload=by_ip[server_ip].ref,
            dst_identity=by_ip[server_ip].identity,
        ), entry
    assert landed <= endpoints


# -- 3. what the underlay carries ------------------------------------------------------------


async def test_underlay_carries_only_tls_to_15008_and_never_the_payload(
    mesh: LabHandle, pods: Pods
) -> None:
    client, server = pods.a1, pods.a2  # node-1 -> node-2: the packets cross node-1's eth0
    marker = b"UNDERPASS-MARKER-" + secrets.token_hex(16).encode()
    payload = marked_payload(marker)
    expected = {"bytes": str(len(payload)), "sha256": sha256_hex(payload)}

    with Capture(node_netns(mesh, client.node), "eth0") as capture:
        reply = await sink(client.netns, server.ip, TCP_PORT, payload)
        segments = capture.drain()
    assert reply == expected

    streams = flows(segments)
    tunnel = {
        key: data
        for key, data in streams.items()
        if key[0] == client.ip and key[2] == server.ip and key[3] == HBONE_PORT
    }
    assert tunnel, f"no TCP from {client.ip} to {server.ip}:{HBONE_PORT} in {set(streams)}"
    carried = b"".join(tunnel.values())
    assert len(carried) >= len(payload), "the payload did not go through the tunnel"
    assert TLS_APPLICATION_DATA in carried, "no TLS 1.2/1.3 application-data record header"
    assert not any(marker in s.frame for s in segments), "the payload crossed the underlay"
    assert not any(marker in data for data in streams.values())
    on_app_port = [s.flow for s in segments if TCP_PORT in (s.sport, s.dport)]
    assert not on_app_port, f"plain application traffic on the underlay: {on_app_port[:5]}"


async def test_underlay_capture_sees_the_payload_without_the_mesh(
    mesh: LabHandle, pods: Pods
) -> None:
    """The negative control: the same capture shows a client outside the mesh in clear."""
    server = pods.a2
    outsider = mesh.json("add-pod", "plain/outsider", "--node", "node-1", "--no-app")
    try:
        assert outsider["enrolled"] is False and outsider["phase"] == "Running"
        marker = b"UNDERPASS-MARKER-" + secrets.token_hex(16).encode()
        payload = marked_payload(marker)

        with Capture(node_netns(mesh, "node-1"), "eth0") as capture:
            reply = await sink(outsider["netns"], server.ip, TCP_PORT, payload)
            segments = capture.drain()
        assert reply == {"bytes": str(len(payload)), "sha256": sha256_hex(payload)}

        assert any(marker in s.frame for s in segments), "the capture missed a plaintext payload"
        to_app = [s for s in segments if s.dst == server.ip and s.dport == TCP_PORT]
        assert to_app and all(s.src == outsider["ip"] for s in to_app)
        assert not any(
            HBONE_PORT in (s.sport, s.dport) and s.src == outsider["ip"] for s in segments
        )
    finally:
        mesh.run("delete-pod", "plain/outsider", check=False)


# -- 4. passthrough ----------------------------------------------------------------------------


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError(f"stream ended before a line: {data!r}")
        data += chunk
    return data.partition(b"\n")[0]


async def test_destination_outside_the_mesh_is_plain_passthrough(
    mesh: LabHandle, pods: Pods
) -> None:
    http_port, tcp_port = 18080, 19000
    argv = [
        sys.executable,
        "-m",
        "underpass.cli.main",
        "lab",
        "exec",
        "--state-dir",
        str(mesh.state_dir),
        "--fabric",
        "--",
        sys.executable,
        "-m",
        "underpass.lab.sampleapp",
        "serve",
        "--http-port",
        str(http_port),
        "--tcp-port",
        str(tcp_port),
        "--pod",
        "fabric/outside",
    ]
    server = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    try:
        assert server.stdout is not None
        with trio.fail_after(TIMEOUT):
            serving = json.loads(await read_line(server.stdout))
        assert serving["event"] == "serving"
        outside = fabric_ip(mesh)
        client = pods.a1
        marks = log_marks(mesh)

        doc = mesh.app(client.ref, "http", f"http://{outside}:{http_port}/")
        assert doc["status"] == 200 and doc["pod"] == "fabric/outside"
        assert doc["client_ip"] == client.ip
        entry = await wait_access_log(
            mesh, client.node, marks[client.node], direction="outbound", src_addr=doc["local"]
        )
        assert matches(
            entry,
            protocol="passthrough",
            dst_addr=f"{outside}:{http_port}",
            src_identity=client.identity,
            dst_identity=None,
            dst_workload=None,
            outcome="ok",
        ), entry

        echo = mesh.app(client.ref, "tcp", outside, str(tcp_port), "--echo", "through, in plain")
        assert echo["match"] and echo["hello"]["peer"].startswith(f"{client.ip}:")
        entry = await wait_access_log(
            mesh, client.node, marks[client.node], direction="outbound", src_addr=echo["local"]
        )
        assert matches(entry, protocol="passthrough", dst_addr=f"{outside}:{tcp_port}"), entry
    finally:
        server.kill()
        with trio.fail_after(TIMEOUT):
            await server.wait()


# -- 5. bulk integrity -------------------------------------------------------------------------

SINK_BYTES: Final = 2 << 30
SOURCE_BYTES: Final = 1 << 30


async def test_gigabytes_arrive_intact_both_ways(mesh: LabHandle, pods: Pods) -> None:
    client, server = pods.a1, pods.a2
    marks = log_marks(mesh)

    sunk = mesh.app(client.ref, "tcp", server.ip, str(TCP_PORT), "--sink", str(SINK_BYTES))
    assert sunk["match"] and sunk["bytes"] == sunk["server_bytes"] == SINK_BYTES
    assert sunk["sha256"] == sunk["server_sha256"]
    entry = await wait_access_log(
        mesh, client.node, marks[client.node], direction="outbound", src_addr=sunk["local"]
    )
    assert entry["protocol"] == "HBONE" and entry["bytes_recv"] >= SINK_BYTES, entry

    sourced = mesh.app(client.ref, "tcp", server.ip, str(TCP_PORT), "--source", str(SOURCE_BYTES))
    assert sourced["match"] and sourced["bytes"] == sourced["server_bytes"] == SOURCE_BYTES
    assert sourced["sha256"] == sourced["server_sha256"]
    entry = await wait_access_log(
        mesh, client.node, marks[client.node], direction="outbound", src_addr=sourced["local"]
    )
    assert entry["protocol"] == "HBONE" and entry["bytes_sent"] >= SOURCE_BYTES, entry
    print(
        f"\nthroughput through the mesh {client.ref} -> {server.ref}: "
        f"sink {SINK_BYTES >> 20} MiB {sunk['mbit_per_s']} Mbit/s in {sunk['seconds']:.1f}s; "
        f"source {SOURCE_BYTES >> 20} MiB {sourced['mbit_per_s']} Mbit/s "
        f"in {sourced['seconds']:.1f}s"
    )


# -- 6. many streams, one connection --------------------------------------------------------

STREAMS: Final = 64


def established(mesh: LabHandle, pod: Pod) -> list[tuple[str, str]]:
    """(local, peer) of the established TCP connections inside the pod's netns."""
    out = mesh.run("exec", pod.ref, "--", "ss", "-Htn", "state", "established").stdout
    pairs = []
    for line in out.splitlines():
        words = line.split()
        pairs.append((words[-2], words[-1]))
    return pairs


async def test_many_concurrent_streams_share_one_hbone_connection(
    mesh: LabHandle, pods: Pods
) -> None:
    client, server = pods.a1, pods.a2
    sessions: list[Session] = []
    try:
        async with trio.open_nursery() as nursery:  # all dial at once: they share one dial

            async def open_one() -> None:
                sessions.append(await Session.open(client.netns, server.ip, TCP_PORT))

            for _ in range(STREAMS):
                nursery.start_soon(open_one)
        assert len(sessions) == STREAMS
        async with trio.open_nursery() as nursery:

            async def greet(index: int, session: Session) -> None:
                hello = hello_fields(await session.line())
                assert hello["pod"] == server.ref and hello["peer"].startswith(f"{client.ip}:")
                text = f"stream {index}\n".encode()
                await session.stream.send_all(b"ECHO\n" + text)
                assert await session.exactly(len(text)) == text

            for index, session in enumerate(sessions):
                nursery.start_soon(greet, index, session)

        # every stream is open now, through the client node's ztunnel
        live = json.loads(admin(mesh, client.node, "/connections"))
        ours = [
            c
            for c in live
            if c["direction"] == "outbound"
            and c["destination"] == f"{server.ip}:{TCP_PORT}"
            and c["source"].startswith(f"{client.ip}:")
        ]
        assert len(ours) == STREAMS and all(c["protocol"] == "HBONE" for c in ours), live
        inbound = json.loads(admin(mesh, server.node, "/connections"))
        assert sum(c["destination"] == f"{server.ip}:{TCP_PORT}" for c in inbound) == STREAMS
        pairs = established(mesh, client)
        apps = [p for p in pairs if p[1] == f"{server.ip}:{TCP_PORT}"]
        tunnels = [
            p
            for p in pairs
            if p[0].startswith(f"{client.ip}:") and p[1] == f"{server.ip}:{HBONE_PORT}"
        ]
        assert len(apps) == STREAMS, pairs
        assert len(tunnels) == 1, f"expected one pooled HBONE connection: {tunnels}"

        async with trio.open_nursery() as nursery:

            async def finish(index: int, session: Session) -> None:
                text = f"and goodbye from {index}".encode()
                await session.stream.send_all(text)
                await session.stream.send_eof()
                assert await session.until_eof() == text

            for index, session in enumerate(sessions):
                nursery.start_soon(finish, index, session)
    finally:
        for session in sessions:
            await session.aclose()


# -- 7. L4 authorization -----------------------------------------------------------------------


async def assert_denied(
    mesh: LabHandle, doc: dict[str, Any], node: str, since: int, **expected: Any
) -> dict[str, Any]:
    """The client saw a reset/closed connection and the server node logged the denial."""
    assert refused(doc), f"expected a refused connection, got {doc}"
    return await wait_log(
        mesh,
        node,
        since,
        f"'connection denied by policy' with {expected}",
        lambda e: e.get("event") == "connection denied by policy" and matches(e, **expected),
    )


def tcp_hello(mesh: LabHandle, client: Pod, server: Pod, port: int = TCP_PORT) -> dict[str, Any]:
    return mesh.app(client.ref, "tcp", server.ip, str(port), "--echo", "hi", check=False)


async def test_allow_by_principal_refuses_other_service_accounts(
    mesh: LabHandle, pods: Pods, policies: Policies
) -> None:
    server = pods.a2
    policies.apply(
        "allow-sa-a", authorization_policy("allow-sa-a", "ALLOW", [from_principals("a")])
    )
    marks = log_marks(mesh)

    assert tcp_hello(mesh, pods.a1, server)["match"]  # sa a: allowed
    doc = tcp_hello(mesh, pods.b1, server)  # sa b: refused
    entry = await assert_denied(
        mesh,
        doc,
        server.node,
        marks[server.node],
        dst_addr=f"{server.ip}:{TCP_PORT}",
        src_identity=pods.b1.identity,
    )
    assert "demo/allow-sa-a" in entry["reason"], entry


async def test_deny_by_namespace(mesh: LabHandle, pods: Pods, policies: Policies) -> None:
    server = pods.a2
    elsewhere = [{"from": [{"source": {"namespaces": ["elsewhere"]}}]}]
    policies.apply("deny-elsewhere", authorization_policy("deny-elsewhere", "DENY", elsewhere))
    assert tcp_hello(mesh, pods.a1, server)["match"]  # another namespace's DENY: no effect
    policies.delete("deny-elsewhere")

    demo = [{"from": [{"source": {"namespaces": [NAMESPACE]}}]}]
    policies.apply("deny-demo", authorization_policy("deny-demo", "DENY", demo))
    marks = log_marks(mesh)
    doc = tcp_hello(mesh, pods.a1, server)
    entry = await assert_denied(
        mesh,
        doc,
        server.node,
        marks[server.node],
        dst_addr=f"{server.ip}:{TCP_PORT}",
        src_identity=pods.a1.identity,
    )
    assert entry["policy"] == "demo/deny-demo", entry


async def test_allow_by_destination_port(mesh: LabHandle, pods: Pods, policies: Policies) -> None:
    server = pods.a2
    rules = [{"to": [{"operation": {"ports": [str(TCP_PORT)]}}]}]
    policies.apply("allow-tcp-port", authorization_policy("allow-tcp-port", "ALLOW", rules))
    marks = log_marks(mesh)

    assert tcp_hello(mesh, pods.a1, server)["match"]
    doc = mesh.app(pods.a1.ref, "http", f"http://{server.ip}:{HTTP_PORT}/", check=False)
    await assert_denied(
        mesh,
        doc,
        server.node,
        marks[server.node],
        dst_addr=f"{server.ip}:{HTTP_PORT}",
        src_identity=pods.a1.identity,
    )


async def test_deny_wins_over_a_matching_allow(
    mesh: LabHandle, pods: Pods, policies: Policies
) -> None:
    server = pods.a2
    policies.apply(
        "allow-sa-a", authorization_policy("allow-sa-a", "ALLOW", [from_principals("a")])
    )
    assert tcp_hello(mesh, pods.a1, server)["match"]
    policies.apply("deny-sa-a", authorization_policy("deny-sa-a", "DENY", [from_principals("a")]))
    marks = log_marks(mesh)

    doc = tcp_hello(mesh, pods.a1, server)
    entry = await assert_denied(
        mesh,
        doc,
        server.node,
        marks[server.node],
        dst_addr=f"{server.ip}:{TCP_PORT}",
        src_identity=pods.a1.identity,
    )
    assert entry["policy"] == "demo/deny-sa-a", entry


async def test_policy_change_closes_an_existing_connection(
    mesh: LabHandle, pods: Pods, policies: Policies
) -> None:
    client, server = pods.a1, pods.a2
    session = await Session.open(client.netns, server.ip, TCP_PORT)
    try:
        hello_fields(await session.line())
        await session.stream.send_all(b"ECHO\nstill here?")
        assert await session.exactly(len(b"still here?")) == b"still here?"
        marks = log_marks(mesh)

        rules = [{**from_principals("a"), "to": [{"operation": {"ports": [str(TCP_PORT)]}}]}]
        policies.apply("deny-open", authorization_policy("deny-open", "DENY", rules))

        # closed from the server side, without the client doing anything
        with trio.fail_after(TIMEOUT):
            try:
                leftover = await session.until_eof()
            except trio.BrokenResourceError:  # reset rather than closed: both are fine
                leftover = b""
        assert leftover == b""
        closed = await wait_log(
            mesh,
            server.node,
            marks[server.node],
            "'connection closed by policy change'",
            lambda e: (
                e.get("event") == "connection closed by policy change"
                and e.get("dst_addr") == f"{server.ip}:{TCP_PORT}"
            ),
        )
        assert closed["src_identity"] == client.identity and "demo/deny-open" in closed["reason"]
        entry = await wait_access_log(
            mesh,
            server.node,
            marks[server.node],
            direction="inbound",
            dst_addr=f"{server.ip}:{TCP_PORT}",
        )
        assert entry["outcome"].startswith("closed by policy change"), entry
    finally:
        await session.aclose()


# -- 8. PeerAuthentication ---------------------------------------------------------------------


def fabric_curl(mesh: LabHandle, url: str) -> subprocess.CompletedProcess[str]:
    return mesh.run("exec", "--fabric", "--", "curl", "-sS", "-m", "5", url, check=False)


async def test_plaintext_peers_permissive_by_default_refused_under_strict(
    mesh: LabHandle, pods: Pods, policies: Policies
) -> None:
    server = pods.a2
    url = f"http://{server.ip}:{HTTP_PORT}/"
    outside = fabric_ip(mesh)
    marks = log_marks(mesh)

    plain = fabric_curl(mesh, url)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["client_ip"] == outside
    entry = await wait_access_log(
        mesh,
        server.node,
        marks[server.node],
        direction="inbound",
        dst_addr=f"{server.ip}:{HTTP_PORT}",
    )
    assert matches(entry, protocol="TCP", src_identity=None, outcome="ok"), entry
    assert entry["src_addr"].startswith(f"{outside}:")

    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": NAMESPACE},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    policies.apply("strict", json.dumps(strict), shows_as=f"istio-system{STRICT_POLICY_SUFFIX}")
    wait_for(
        mesh,
        server.node,
        lambda d: any(p.endswith(STRICT_POLICY_SUFFIX) for p in workload_policies(d, server)),
        what=f"the STRICT policy attached to {server.ref}",
    )
    marks = log_marks(mesh)

    refused_plain = fabric_curl(mesh, url)
    assert refused_plain.returncode != 0, refused_plain.stdout
    denied = await wait_log(
        mesh,
        server.node,
        marks[server.node],
        "the plaintext peer denied",
        lambda e: (
            e.get("event") == "connection denied by policy"
            and matches(e, protocol="TCP", src_identity=None, src_addr=outside)
        ),
    )
    assert str(denied["policy"]).endswith(STRICT_POLICY_SUFFIX), denied
    # the mesh's own clients are unaffected
    doc = mesh.app(pods.a1.ref, "http", url)
    assert doc["status"] == 200 and doc["client_ip"] == pods.a1.ip


# -- 9. without the control plane (disturbs the lab: keep last) -----------------------------


def wait_exited(pid: int, timeout: float = TIMEOUT) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(int(timeout * 1000)), f"process {pid} still running after {timeout}s"
    finally:
        os.close(fd)


async def test_traffic_survives_the_control_plane_and_ztunnels_reconnect(
    mesh: LabHandle, pods: Pods
) -> None:
    record = mesh.state_dir / "procs" / "controlplane.json"
    pid = json.loads(record.read_text())["pid"]
    before = {
        node: wait_for(mesh, node, lambda d: d["xds"]["connected"], what="xDS connected")["xds"]
        for node in NODES
    }

    os.kill(pid, signal.SIGKILL)
    wait_exited(pid)
    try:
        for node in NODES:
            wait_for(mesh, node, lambda d: not d["xds"]["connected"], what="xDS disconnected")
        # the data path keeps serving from the state it has
        for server in (pods.b2, pods.b1):
            doc = mesh.app(pods.a1.ref, "http", f"http://{server.ip}:{HTTP_PORT}/")
            assert doc["status"] == 200 and doc["client_ip"] == pods.a1.ip
        echo = tcp_hello(mesh, pods.a2, pods.b1)
        assert echo["match"], echo
    finally:
        report = mesh.up()  # idempotent: restarts what is dead
    assert report["mesh"]["controlplane"] == "started", report["mesh"]
    for node in NODES:
        dump = wait_for(
            mesh,
            node,
            lambda d: d["xds"]["connected"] and d["xds"]["ready"],
            what="xDS connected again",
            timeout=45,
        )
        assert dump["xds"]["reconnects"] > before[node]["reconnects"], dump["xds"]
    doc = mesh.app(pods.a1.ref, "http", f"http://{pods.b2.ip}:{HTTP_PORT}/")
    assert doc["status"] == 200
