"""ztunnel robustness in a real mesh lab: takeover, malformed HBONE, identities, pod removal.

One mesh lab (two nodes, two enrolled pods each) for the module. Every test
undoes what it changed: pods it added are deleted, a ztunnel it started is
stopped and the lab's own one brought back.

- Takeover: a second ztunnel for node-2, started by hand with the running
  one's arguments, binds the in-pod listeners beside it (SO_REUSEPORT); the
  old one, on SIGTERM, closes its listeners at once, lets open connections
  run until the drain deadline (5 s in the lab) and then resets them, while
  new connections keep succeeding through the new one.
- Malformed HBONE: raw clients on the fabric netns against a pod's 15008,
  with certificates from the lab's own CA (and from strangers); in every case
  the listener the CONNECT would have reached accepted nothing.
- Wrong identities: a client from another trust domain is refused by the
  server; and ztunnel as a client, dialing a pod whose 15008 answers with a
  certificate for an unexpected identity, sends nothing and fails closed.
- Pod removal: ``lab delete-pod`` with sessions open through the pod.

Talking to a process in another namespace has no event to wait on from
here, so waits on another process's state are bounded polls; waits on our
own threads and on a process's exit (pidfd) are events.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from cryptography.hazmat.primitives import serialization

from identity.ca import (
    CertificateAuthority,
    build_csr,
    create_root,
    generate_workload_key,
    validate_csr,
)
from identity.spiffe import SpiffeId
from identity.tls import load_cert_chain_in_memory
from tests.underpass.lab.labkit import ROOT, LabHandle
from tests.ztunnel.meshkit import (
    NAMESPACE,
    config_dump,
    mesh_lab,
    wait_for,
    ztunnel_log,
)
from underpass.netns import run_in_netns

pytestmark = pytest.mark.netns

DRAIN_TIMEOUT = 5.0  # the lab runs ztunnel with --drain-timeout 5
SPARE_PORT = 9999  # nothing listens there but our own sentinel listeners
CLUSTER = "cluster.local"
CLIENT_ID = f"spiffe://{CLUSTER}/ns/{NAMESPACE}/sa/default"

PemPair = tuple[bytes, bytes]  # (certificate chain, private key)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    yield from mesh_lab(tmp_path_factory)


# -- namespaces, sockets, processes -------------------------------------------------------


def pod_netns(handle: LabHandle, name: str) -> str:
    pod = handle.registry.pod(NAMESPACE, name)
    assert pod is not None and pod.netns, f"pod {NAMESPACE}/{name} has no netns"
    return pod.netns


def node_netns(handle: LabHandle, node: str) -> str:
    found = handle.registry.node(node)
    assert found is not None, f"node {node} is not in the lab"
    return found.netns


def fabric_netns(handle: LabHandle) -> str:
    cfg = handle.registry.config()
    assert cfg is not None
    return cfg.fabric_netns


def fabric_ip(handle: LabHandle) -> str:
    cfg = handle.registry.config()
    assert cfg is not None
    return cfg.fabric_ip


def socket_in(netns: str, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A TCP socket created inside ``netns`` (it stays there, used from this thread)."""
    return run_in_netns(netns, lambda: socket.socket(family, socket.SOCK_STREAM))


def connect_from(netns: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    sock = socket_in(netns)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def sentinel_listener(netns: str, port: int, ip: str = "0.0.0.0") -> socket.socket:  # noqa: S104
    """A non-blocking listener of our own inside a pod: it tells whether anything arrived."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(netns, make)


def accepted_peers(listener: socket.socket) -> list[str]:
    """Accept (and close) whatever is queued; the peers' addresses."""
    peers: list[str] = []
    while True:
        try:
            conn, peer = listener.accept()
        except BlockingIOError:
            return peers
        conn.close()
        peers.append(f"{peer[0]}:{peer[1]}")


def netns_run(netns: str, *argv: str) -> str:
    """A command in ``netns`` (a path, or /proc/<pid>/fd/<n>); its stdout."""
    proc = subprocess.run(
        ["nsenter", f"--net={netns}", *argv], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, f"{argv} in {netns} failed: {proc.stderr}"
    return proc.stdout


@dataclass(frozen=True)
class Listening:
    port: int
    pid: int | None


def listeners(netns: str) -> list[Listening]:
    """TCP listeners in ``netns`` with their owning process (``ss -ltnp``)."""
    found = []
    for line in netns_run(netns, "ss", "-Hltnp").splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        port = int(fields[3].rsplit(":", 1)[1])
        owner = re.search(r"pid=(\d+)", line)
        found.append(Listening(port, int(owner.group(1)) if owner else None))
    return found


def ztunnel_listeners(netns: str) -> dict[int, list[int | None]]:
    """Port -> owning pids, for ztunnel's three in-pod ports."""
    out: dict[int, list[int | None]] = {15001: [], 15006: [], 15008: []}
    for entry in listeners(netns):
        if entry.port in out:
            out[entry.port].append(entry.pid)
    return out


def listener_pids(netns: str) -> set[int | None]:
    return {pid for pids in ztunnel_listeners(netns).values() for pid in pids}


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Poll another process's state until ``condition``; the time it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def wait_exit(pid: int, timeout: float) -> bool:
    """True once process ``pid`` has exited (its pidfd polls readable), False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def http_status(netns: str, port: int, path: str) -> int | None:
    """The status of ``GET http://127.0.0.1:<port><path>`` in ``netns`` (None: no answer)."""
    try:
        sock = connect_from(netns, ("127.0.0.1", port), timeout=2.0)
    except OSError:
        return None
    with sock:
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = sock.recv(64)
        except OSError:
            return None
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(match.group(1)) if match else None


def log_lines(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """JSON lines of a log file from byte ``offset`` on."""
    with path.open("rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def seconds_between(earlier: dict[str, Any], later: dict[str, Any]) -> float:
    """Between two log lines' timestamps (ISO 8601, one clock: the machine's)."""
    start = dt.datetime.fromisoformat(earlier["timestamp"])
    end = dt.datetime.fromisoformat(later["timestamp"])
    return (end - start).total_seconds()


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# -- the echo app -----------------------------------------------------------------------


class EchoSession:
    """A long raw-TCP session with the sample app's ECHO mode, one line per ping."""

    def __init__(self, netns: str, address: tuple[str, int]) -> None:
        self.sock = connect_from(netns, address, timeout=5.0)
        self._buffer = b""
        self.greeting = self._line()
        assert self.greeting.startswith(b"HELLO "), self.greeting
        self._count = 0

    def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("the session was closed")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def ping(self) -> None:
        # ECHO must arrive with its first payload: the app ends an ECHO without one.
        payload = b"ping %d" % self._count
        self.sock.sendall((b"ECHO\n" if self._count == 0 else b"") + payload + b"\n")
        echoed = self._line()
        assert echoed == payload, (echoed, payload)
        self._count += 1

    def close(self) -> None:
        self.sock.close()


@dataclass
class SessionTimeline:
    """What a pinging session saw, in monotonic time."""

    last_ok: float = 0.0
    ended: float | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def keep_pinging(session: EchoSession, timeline: SessionTimeline, stop: threading.Event) -> None:
    """Ping every 0.2 s until the session breaks (or ``stop``)."""
    try:
        while not stop.is_set():
            session.ping()
            timeline.last_ok = time.monotonic()
            stop.wait(0.2)
    except (OSError, EOFError, AssertionError) as exc:
        timeline.ended = time.monotonic()
        timeline.error = exc
    finally:
        timeline.done.set()


@dataclass
class ShortConnections:
    """Many short echo connections in a loop (bounded in count and time)."""

    netns: str
    address: tuple[str, int]
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _progress: threading.Condition = field(default_factory=threading.Condition)

    def wait_ok(self, count: int, timeout: float) -> bool:
        """Until ``count`` connections have succeeded (False on timeout)."""
        with self._progress:
            return self._progress.wait_for(lambda: self.ok >= count, timeout)

    def one(self, index: int) -> None:
        payload = b"short %d" % index
        with connect_from(self.netns, self.address, timeout=5.0) as sock:
            sock.sendall(b"ECHO\n" + payload)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while data := sock.recv(4096):
                received += data
        head, _, echoed = received.partition(b"\n")
        if not head.startswith(b"HELLO ") or echoed != payload:
            raise AssertionError(f"unexpected answer {received!r}")

    def run(self, stop: threading.Event, limit: int = 5000, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        for index in range(limit):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self.one(index)
                with self._progress:
                    self.ok += 1
                    self._progress.notify_all()
            except (OSError, AssertionError) as exc:
                self.failures.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
            stop.wait(0.01)


@contextlib.contextmanager
def background(*targets: Callable[[threading.Event], None]) -> Iterator[threading.Event]:
    """Run ``targets(stop)`` in threads; ``stop`` is set and they are joined on the way out."""
    stop = threading.Event()
    threads = [threading.Thread(target=t, args=(stop,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    try:
        yield stop
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not any(t.is_alive() for t in threads), "a background client hung"


# -- certificates and a raw HBONE client --------------------------------------------------


def lab_ca(handle: LabHandle, trust_domain: str = CLUSTER) -> CertificateAuthority:
    """The lab's CA (its root key is in the control plane's state), for ``trust_domain``."""
    ca = CertificateAuthority.load_or_create(handle.state_dir / "controlplane" / "ca", CLUSTER)
    if trust_domain == CLUSTER:
        return ca
    # The same root signing for another trust domain: a valid chain, a foreign identity.
    return CertificateAuthority(
        trust_domain=trust_domain,
        signing_cert=ca.signing_cert,
        signing_key=ca._signing_key,  # test-only: forge with the real root
        intermediates=[],
        roots=ca.roots,
    )


def stranger_ca() -> CertificateAuthority:
    """A CA of the same trust domain under a root the mesh does not trust."""
    key, root = create_root(CLUSTER, dt.datetime.now(dt.UTC))
    return CertificateAuthority(
        trust_domain=CLUSTER, signing_cert=root, signing_key=key, intermediates=[], roots=[root]
    )


def issue(ca: CertificateAuthority, uri: str) -> PemPair:
    key = generate_workload_key()
    issued = ca.sign_workload(validate_csr(build_csr(key, SpiffeId.parse(uri))))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return issued.chain_pem[0].encode(), key_pem  # the leaf: the root is the peer's to have


def client_tls_context(identity: PemPair | None) -> ssl.SSLContext:
    """An HBONE-shaped client context; the server is not verified (the server is the subject)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    if identity is not None:
        load_cert_chain_in_memory(ctx, *identity)
    return ctx


@dataclass
class Refusal:
    """How a connection that should be refused ended; ``data`` is what came before the end."""

    how: str  # "tls alert", "eof", "reset", "handshake failed"
    detail: str
    data: bytes


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> Refusal:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ssl.SSLError as exc:
        return Refusal("tls alert", str(exc), data)
    except ConnectionResetError as exc:
        return Refusal("reset", str(exc), data)
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {timeout} s (got {data!r})")
    return Refusal("eof", "", data)


def tls_attempt(fabric: str, ip: str, identity: PemPair | None) -> Refusal:
    """A TLS client on ``ip``:15008 that expects to be refused; how it was."""
    raw = connect_from(fabric, (ip, 15008))
    try:
        tls = client_tls_context(identity).wrap_socket(raw)
    except (ssl.SSLError, ConnectionResetError) as exc:
        return Refusal("handshake failed", str(exc), b"")
    with tls:
        # TLS 1.3: the client finishes first; the server's verdict arrives on the first read.
        with contextlib.suppress(OSError):
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        return read_until_closed(tls)


class RawHbone:
    """An HTTP/2 client over mTLS to a pod's 15008 that sends whatever it is told to."""

    def __init__(self, fabric: str, ip: str, identity: PemPair) -> None:
        raw = connect_from(fabric, (ip, 15008))
        try:
            self.tls = client_tls_context(identity).wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        assert self.tls.selected_alpn_protocol() == "h2"
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.h2.initiate_connection()
        self.tls.sendall(self.h2.data_to_send())

    def request(self, headers: list[tuple[bytes, bytes]]) -> list[h2.events.Event]:
        self.h2.send_headers(1, headers)
        self.tls.sendall(self.h2.data_to_send())
        return self.events_until_answer()

    def send_raw(self, data: bytes) -> list[h2.events.Event]:
        self.tls.sendall(data)
        return self.events_until_answer()

    def events_until_answer(self, timeout: float = 5.0) -> list[h2.events.Event]:
        """Events up to the first answer that settles stream 1 or the connection."""
        self.tls.settimeout(timeout)
        events: list[h2.events.Event] = []
        settled = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)
        while True:
            try:
                data = self.tls.recv(65536)
            except TimeoutError:
                pytest.fail(f"no answer from ztunnel within {timeout} s; events so far {events}")
            if not data:
                return events
            for event in self.h2.receive_data(data):
                events.append(event)
            with contextlib.suppress(OSError):
                self.tls.sendall(self.h2.data_to_send())
            if any(isinstance(e, settled) for e in events):
                return events
            if any(
                isinstance(e, h2.events.ResponseReceived) and _status(e) == b"200" for e in events
            ):
                return events

    def __enter__(self) -> RawHbone:
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()


def _status(event: h2.events.ResponseReceived) -> bytes | None:
    return dict(event.headers or []).get(b":status")


def status_of(events: list[h2.events.Event]) -> bytes | None:
    for event in events:
        if isinstance(event, h2.events.ResponseReceived):
            return _status(event)
    return None


def goaway_of(events: list[h2.events.Event]) -> h2.events.ConnectionTerminated | None:
    for event in events:
        if isinstance(event, h2.events.ConnectionTerminated):
            return event
    return None


def connect_headers(authority: str, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"CONNECT"), (b":authority", authority.encode()), *extra]


# -- 1. malformed HBONE input -------------------------------------------------------------


@dataclass
class HboneTarget:
    """echo-2-1's 15008 as the victim, echo-2-2 as "another pod", sentinels in both."""

    fabric: str
    fabric_ip: str
    ip: str
    other_ip: str
    identity: PemPair
    sentinels: dict[str, socket.socket]

    def nothing_arrived(self) -> None:
        arrived = {pod: accepted_peers(s) for pod, s in self.sentinels.items()}
        assert arrived == {pod: [] for pod in self.sentinels}, f"forwarded to the app: {arrived}"


@pytest.fixture(scope="module")
def hbone_target(lab: LabHandle) -> Iterator[HboneTarget]:
    sentinels: dict[str, socket.socket] = {}
    try:
        for pod in ("echo-2-1", "echo-2-2"):
            sentinels[pod] = sentinel_listener(pod_netns(lab, pod), SPARE_PORT)
        yield HboneTarget(
            fabric=fabric_netns(lab),
            fabric_ip=fabric_ip(lab),
            ip=lab.pod_ip(NAMESPACE, "echo-2-1"),
            other_ip=lab.pod_ip(NAMESPACE, "echo-2-2"),
            identity=issue(lab_ca(lab), CLIENT_ID),
            sentinels=sentinels,
        )
    finally:
        for sock in sentinels.values():
            sock.close()


@pytest.fixture
def target(hbone_target: HboneTarget) -> Iterator[HboneTarget]:
    """The module's target, checked empty before and after each test."""
    hbone_target.nothing_arrived()
    yield hbone_target
    hbone_target.nothing_arrived()


def test_valid_connect_reaches_the_sentinel_so_its_silence_means_something(
    target: HboneTarget,
) -> None:
    with RawHbone(target.fabric, target.ip, target.identity) as client:
        events = client.request(connect_headers(f"{target.ip}:{SPARE_PORT}"))
        assert status_of(events) == b"200", events
        # ztunnel answers 200 only once its upstream connection is made.
        sentinel = target.sentinels["echo-2-1"]
        readable, _, _ = select.select([sentinel], [], [], 5.0)
        assert readable, "the sentinel never saw the tunnelled connection"
        peers = accepted_peers(sentinel)
    # Exactly one connection, from the client's own address (the fabric's), spoofed.
    assert [p.rsplit(":", 1)[0] for p in peers] == [target.fabric_ip], peers


def test_garbage_instead_of_tls_is_closed_without_an_answer(target: HboneTarget) -> None:
    with connect_from(target.fabric, (target.ip, 15008)) as sock:
        sock.sendall(b"\x00\x01garbage, not a TLS ClientHello\r\n" * 20)
        refusal = read_until_closed(sock)
    assert refusal.how in ("eof", "reset"), refusal
    # At most a TLS alert record (content type 21); never HTTP/2 or app bytes.
    assert refusal.data == b"" or refusal.data[0] == 21, refusal


def test_tls_without_a_client_certificate_is_refused(target: HboneTarget) -> None:
    refusal = tls_attempt(target.fabric, target.ip, None)
    assert refusal.how in ("tls alert", "handshake failed"), refusal
    assert "CERTIFICATE_REQUIRED" in refusal.detail.upper(), refusal
    assert refusal.data == b""


def test_client_certificate_from_another_root_is_refused(target: HboneTarget) -> None:
    refusal = tls_attempt(target.fabric, target.ip, issue(stranger_ca(), CLIENT_ID))
    assert refusal.how in ("tls alert", "handshake failed"), refusal
    assert "UNKNOWN_CA" in refusal.detail.upper(), refusal
    assert refusal.data == b""


def test_client_from_another_trust_domain_is_refused_after_the_handshake(
    lab: LabHandle, target: HboneTarget
) -> None:
    """A chain the mesh trusts, but a SPIFFE ID of spiffe://other.domain: not one of ours."""
    foreign = issue(lab_ca(lab, "other.domain"), "spiffe://other.domain/ns/demo/sa/default")
    refusal = tls_attempt(target.fabric, target.ip, foreign)
    # The chain is fine, so the handshake completes; the trust-domain check then closes
    # the connection before a single HTTP/2 byte is sent.
    assert refusal.how in ("eof", "reset", "tls alert"), refusal
    assert refusal.data == b"", refusal


def test_http2_garbage_after_the_preface_gets_goaway_protocol_error(
    target: HboneTarget,
) -> None:
    with RawHbone(target.fabric, target.ip, target.identity) as client:
        # A DATA frame on stream 0: a connection error (RFC 9113 6.1).
        events = client.send_raw(b"\x00\x00\x05\x00\x00\x00\x00\x00\x00hello")
    goaway = goaway_of(events)
    assert goaway is not None, events
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_http2_frame_of_a_wrong_size_gets_goaway_frame_size_error(target: HboneTarget) -> None:
    with RawHbone(target.fabric, target.ip, target.identity) as client:
        events = client.send_raw(b"\x00\x00\x01\x04\x00\x00\x00\x00\x00x")  # SETTINGS of 1 byte
    goaway = goaway_of(events)
    assert goaway is not None, events
    assert goaway.error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


def test_get_instead_of_connect_is_400(target: HboneTarget) -> None:
    with RawHbone(target.fabric, target.ip, target.identity) as client:
        events = client.request(
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", b"/"),
                (b":authority", f"{target.ip}:{SPARE_PORT}".encode()),
            ]
        )
    assert status_of(events) == b"400", events


@pytest.mark.parametrize(
    "authority",
    ["not-an-address", "{ip}", "{ip}:99999", "{ip}:0", "[{ip}]:9999", "{ip}:99x"],
)
def test_connect_with_a_malformed_authority_is_400(target: HboneTarget, authority: str) -> None:
    with RawHbone(target.fabric, target.ip, target.identity) as client:
        events = client.request(connect_headers(authority.format(ip=target.ip)))
    assert status_of(events) == b"400", events


def test_connect_to_another_pods_ip_is_400(target: HboneTarget) -> None:
    with RawHbone(target.fabric, target.ip, target.identity) as client:
        events = client.request(connect_headers(f"{target.other_ip}:{SPARE_PORT}"))
    assert status_of(events) == b"400", events


@pytest.mark.parametrize("port", [15008, 15001, 15006])
def test_connect_to_ztunnels_own_ports_is_400(target: HboneTarget, port: int) -> None:
    with RawHbone(target.fabric, target.ip, target.identity) as client:
        events = client.request(connect_headers(f"{target.ip}:{port}"))
    assert status_of(events) == b"400", events


def test_oversized_headers_get_goaway_enhance_your_calm(target: HboneTarget) -> None:
    """A 64 KiB header value, beyond the 16 KiB header list ztunnel accepts: the connection
    is closed with GOAWAY ENHANCE_YOUR_CALM (h2's answer to an oversized header list)."""
    with RawHbone(target.fabric, target.ip, target.identity) as client:
        events = client.request(
            connect_headers(f"{target.ip}:{SPARE_PORT}", (b"x-padding", b"a" * 65536))
        )
    assert status_of(events) is None, events
    goaway = goaway_of(events)
    assert goaway is not None, events
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_ztunnel_still_serves_after_the_abuse(lab: LabHandle, target: HboneTarget) -> None:
    report = lab.app("demo/echo-1-1", "tcp", target.ip, "--echo", "still alive")
    assert report["match"] is True, report


# -- 2. ztunnel as a client: the server must be who the state says ------------------------


class RogueHboneServer:
    """A TLS server on ``ip``:15008 inside a pod that presents someone else's identity.

    Bound to the pod's own IP with SO_REUSEPORT beside ztunnel's wildcard
    listener, it gets every connection to that IP (the kernel prefers the
    more specific address). It records the handshakes and whether the client
    sent anything at all after it: a client that checks the server's identity
    sends nothing.
    """

    def __init__(self, netns: str, ip: str, identity: PemPair) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((ip, 15008))
                sock.listen(16)
            except BaseException:
                sock.close()
                raise
            return sock

        self.listener = run_in_netns(netns, make)
        self.listener.settimeout(0.2)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.set_alpn_protocols(["h2"])
        load_cert_chain_in_memory(self.context, *identity)
        self.handshakes = 0
        self.handshaken = threading.Event()
        self.received = b""
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    self.handshaken.set()
                    while data := tls.recv(65536):
                        self.received += data
            except (OSError, ssl.SSLError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()


@contextlib.contextmanager
def extra_pod(lab: LabHandle, name: str, *, app: bool = True) -> Iterator[str]:
    """A pod added on node-2 for one test (enrolled, known to both ztunnels); its IP."""
    lab.run("add-pod", f"{NAMESPACE}/{name}", "--node", "node-2", *(() if app else ("--no-app",)))
    try:
        ip = lab.pod_ip(NAMESPACE, name)
        wait_for(
            lab,
            "node-2",
            lambda dump: any(p["name"] == name for p in dump["pods"]),
            what=f"pod {name} served",
        )
        wait_for(
            lab,
            "node-1",
            lambda dump: any(
                ip in w["addresses"] and w["tunnel_protocol"] == "HBONE" for w in dump["workloads"]
            ),
            what=f"workload {name} on HBONE",
        )
        yield ip
    finally:
        if lab.registry.pod(NAMESPACE, name) is not None:
            lab.run("delete-pod", f"{NAMESPACE}/{name}")


def test_ztunnel_refuses_a_server_presenting_an_unexpected_identity(lab: LabHandle) -> None:
    log_before = log_size(lab.state_dir / "logs" / "ztunnel.node-1.log")
    rogue_id = f"spiffe://{CLUSTER}/ns/{NAMESPACE}/sa/rogue"
    with extra_pod(lab, "rogue-target", app=False) as ip:
        rogue = RogueHboneServer(pod_netns(lab, "rogue-target"), ip, issue(lab_ca(lab), rogue_id))
        try:
            with connect_from(pod_netns(lab, "echo-1-1"), (ip, 9000), timeout=10) as sock:
                refusal = read_until_closed(sock, timeout=15)
            assert rogue.handshaken.wait(5), f"ztunnel never reached the rogue: {rogue.errors}"
        finally:
            rogue.close()
    # ztunnel dialled the rogue (a valid chain from the mesh's own CA)...
    assert rogue.handshakes >= 1, rogue.errors
    # ...found an identity it did not expect, and sent nothing: no preface, no CONNECT.
    assert rogue.received == b"", rogue.received[:200]
    # The pod's connection was closed without a byte of the app's (no HELLO).
    assert refusal.data == b"", refusal
    assert refusal.how in ("eof", "reset"), refusal
    lines = log_lines(lab.state_dir / "logs" / "ztunnel.node-1.log", log_before)
    failures = [e for e in lines if e.get("event") == "outbound hbone failed"]
    assert failures, "node-1's ztunnel logged no failed HBONE dial"
    assert any("sa/rogue" in e["error"] and "PeerIdentityError" in e["error"] for e in failures)
    completed = [
        e
        for e in lines
        if e.get("event") == "connection complete" and e["dst_addr"] == f"{ip}:9000"
    ]
    assert completed and completed[-1]["outcome"].startswith("hbone connect failed"), completed


# -- 3. a restarted ztunnel takes over -----------------------------------------------------


@dataclass
class HandStartedZtunnel:
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DRAIN_TIMEOUT + 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_second_ztunnel(lab: LabHandle, node: str) -> HandStartedZtunnel:
    record = json.loads((lab.state_dir / "procs" / f"ztunnel.{node}.json").read_text())
    argv: list[str] = list(record["argv"])
    at = argv.index("--ready-fd")
    del argv[at : at + 2]
    argv += [
        "--admin-address",
        "127.0.0.1:15100",
        "--metrics-address",
        "0.0.0.0:15120",
        "--readiness-address",
        "0.0.0.0:15121",
    ]
    log = lab.state_dir / "logs" / f"ztunnel.{node}.second.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["nsenter", f"--net={node_netns(lab, node)}", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    return HandStartedZtunnel(process, log)


def snapshot_of_pod_rules(netns: str) -> tuple[str, str]:
    tables = netns_run(netns, "nft", "list", "tables")
    rules = netns_run(netns, "ip", "rule", "show")
    return tables, rules


def test_second_ztunnel_takes_over_while_the_first_drains(lab: LabHandle) -> None:
    node = "node-2"
    record = json.loads((lab.state_dir / "procs" / f"ztunnel.{node}.json").read_text())
    old_pid = int(record["pid"])
    old_log = lab.state_dir / "logs" / f"ztunnel.{node}.log"
    node_pods = ("echo-2-1", "echo-2-2")
    rules_before = {p: snapshot_of_pod_rules(pod_netns(lab, p)) for p in node_pods}
    for tables, _ in rules_before.values():
        assert tables.count("table inet underpass") == 1, tables

    ip = {p: lab.pod_ip(NAMESPACE, p) for p in ("echo-1-1", "echo-1-2", *node_pods)}
    netns = {p: pod_netns(lab, p) for p in ip}
    second: HandStartedZtunnel | None = None
    try:
        # Long sessions through the old ztunnel: inbound (node-1 -> echo-2-1) and
        # outbound (echo-2-2 -> node-1).
        inbound = EchoSession(netns["echo-1-1"], (ip["echo-2-1"], 9000))
        outbound = EchoSession(netns["echo-2-2"], (ip["echo-1-2"], 9000))
        inbound.ping()
        outbound.ping()

        second = start_second_ztunnel(lab, node)
        wait_until(
            lambda: http_status(node_netns(lab, node), 15121, "/healthz/ready") == 200,
            timeout=30,
            what="the second ztunnel ready",
        )
        assert second.process.poll() is None
        for pod in node_pods:
            owners = ztunnel_listeners(netns[pod])
            assert {port: sorted(p or 0 for p in pids) for port, pids in owners.items()} == {
                port: sorted([old_pid, second.pid]) for port in owners
            }, f"{pod}: both ztunnels should listen side by side: {owners}"

        loops = [
            ShortConnections(netns["echo-1-1"], (ip["echo-2-1"], 9000)),  # inbound at node-2
            ShortConnections(netns["echo-2-1"], (ip["echo-1-2"], 9000)),  # outbound at node-2
        ]
        timelines = {"inbound": SessionTimeline(), "outbound": SessionTimeline()}
        with background(*(loop.run for loop in loops)) as stop_loops:
            with background(
                functools.partial(keep_pinging, inbound, timelines["inbound"]),
                functools.partial(keep_pinging, outbound, timelines["outbound"]),
            ):
                for loop in loops:
                    assert loop.wait_ok(5, 20), f"no traffic to {loop.address}: {loop.failures}"
                sigterm = time.monotonic()
                os.kill(old_pid, signal.SIGTERM)
                closed_after = wait_until(
                    lambda: all(old_pid not in listener_pids(netns[p]) for p in node_pods),
                    timeout=DRAIN_TIMEOUT,
                    what="the old ztunnel closing its in-pod listeners",
                )
                assert wait_exit(old_pid, DRAIN_TIMEOUT + 10), "the old ztunnel did not exit"
                exited_after = time.monotonic() - sigterm
                for timeline in timelines.values():
                    assert timeline.done.wait(10), "a long session outlived the old ztunnel"
            # A little more traffic through the new ztunnel alone.
            for loop in loops:
                assert loop.wait_ok(loop.ok + 5, 20), f"{loop.address}: {loop.failures[-3:]}"
            stop_loops.set()
        inbound.close()
        outbound.close()

        # The old one closed its listeners at once, well before the deadline...
        assert closed_after < DRAIN_TIMEOUT / 2, closed_after
        # ...kept the long sessions until the drain deadline, then reset them.
        for direction, timeline in timelines.items():
            assert timeline.ended is not None and timeline.error is not None
            assert isinstance(timeline.error, ConnectionResetError | EOFError), (
                direction,
                timeline.error,
            )
            assert timeline.last_ok - sigterm > DRAIN_TIMEOUT - 1.0, (direction, timeline)
            assert DRAIN_TIMEOUT - 1.0 < timeline.ended - sigterm < DRAIN_TIMEOUT + 3.0, (
                direction,
                timeline.ended - sigterm,
            )
        assert DRAIN_TIMEOUT - 0.5 < exited_after < DRAIN_TIMEOUT + 5.0, exited_after
        # New connections never failed, before, during or after the handover.
        for loop in loops:
            assert loop.failures == [], (loop.address, loop.ok, loop.failures[:5])
            assert loop.ok >= 20, loop.ok

        old_lines = [e for e in ztunnel_log(lab, node) if e.get("event")]
        drained = [
            e
            for e in old_lines
            if e.get("event") == "connection complete"
            and e["outcome"] == "closed: pod drain deadline passed"
        ]
        assert {e["dst_addr"] for e in drained} >= {
            f"{ip['echo-2-1']}:9000",
            f"{ip['echo-1-2']}:9000",
        }, drained
        assert old_lines[-1]["event"] == "ztunnel stopped", old_lines[-3:]
        assert "Traceback" not in old_log.read_text().split('"ztunnel draining"')[-1]

        # Afterwards: one listener per port in each pod, the new process's; the pods'
        # redirection (the agent's, not ztunnel's) untouched.
        for pod in node_pods:
            out = lab.run("exec", f"{NAMESPACE}/{pod}", "--", "ss", "-Hltnp").stdout
            after: dict[int, list[int]] = {}
            for line in out.splitlines():
                port = int(line.split()[3].rsplit(":", 1)[1])
                owner = re.search(r"pid=(\d+)", line)
                if port in (15001, 15006, 15008):
                    after.setdefault(port, []).append(int(owner.group(1)) if owner else -1)
            assert after == {15001: [second.pid], 15006: [second.pid], 15008: [second.pid]}, out
            assert snapshot_of_pod_rules(netns[pod]) == rules_before[pod]
    finally:
        if second is not None:
            second.stop()
        lab.up()  # the lab's own ztunnel for node-2 again (a no-op if it never stopped)
        wait_for(
            lab, node, lambda dump: len(dump["pods"]) == 2, what="the lab's ztunnel serving again"
        )
    second_log = second.log.read_text() if second is not None else ""
    assert "Traceback" not in second_log, second_log[-3000:]


# -- 4. pod removal drains -----------------------------------------------------------------


def test_deleting_a_pod_ends_its_sessions_within_the_drain_and_removes_its_listeners(
    lab: LabHandle,
) -> None:
    node = "node-2"
    agent_log = lab.state_dir / "logs" / f"agent.{node}.log"
    zt_log = lab.state_dir / "logs" / f"ztunnel.{node}.log"
    with extra_pod(lab, "drain-me") as ip:
        pod = lab.registry.pod(NAMESPACE, "drain-me")
        assert pod is not None
        # Keep the netns alive after `lab delete-pod` unmounts it, to look inside.
        held = os.open(pod.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            inside = f"/proc/{os.getpid()}/fd/{held}"
            assert set(ztunnel_listeners(inside)) == {15001, 15006, 15008}
            assert all(ztunnel_listeners(inside).values())
            # One session to the app, one to a server of ours in the pod that outlives
            # the app: only ztunnel can end that one.
            mine = sentinel_listener(pod.netns, 9100)
            mine.setblocking(True)
            mine.settimeout(10)
            try:
                app_session = EchoSession(pod_netns(lab, "echo-1-1"), (ip, 9000))
                app_session.ping()
                own = connect_from(pod_netns(lab, "echo-1-1"), (ip, 9100), timeout=30)
                upstream, _ = mine.accept()
                own.sendall(b"x")
                assert upstream.recv(1) == b"x"
                agent_before, zt_before = log_size(agent_log), log_size(zt_log)

                started = time.monotonic()
                lab.run("delete-pod", f"{NAMESPACE}/drain-me")
                deleted_after = time.monotonic() - started
                with pytest.raises((OSError, EOFError)):
                    app_session.ping()  # the app is gone with its pod
                app_ended_after = time.monotonic() - started
                wait_until(
                    lambda: not any(ztunnel_listeners(inside).values()),
                    timeout=DRAIN_TIMEOUT,
                    what="the deleted pod's listeners gone",
                )
                wait_until(
                    lambda: any(
                        e.get("event") == "connection complete" and e["dst_addr"] == f"{ip}:9100"
                        for e in log_lines(zt_log, zt_before)
                    ),
                    timeout=DRAIN_TIMEOUT + 3,
                    what="ztunnel ending the session to our own server",
                )
                own.close()
                upstream.close()
                app_session.close()
            finally:
                mine.close()
        finally:
            os.close(held)
    assert app_ended_after < DRAIN_TIMEOUT + 2.0, app_ended_after
    assert deleted_after < DRAIN_TIMEOUT + 10.0, deleted_after

    zt_lines = log_lines(zt_log, zt_before)
    [own_line] = [
        e
        for e in zt_lines
        if e.get("event") == "connection complete" and e["dst_addr"] == f"{ip}:9100"
    ]
    agent_lines = log_lines(agent_log, agent_before)
    [cni_del] = [e for e in agent_lines if e.get("event") == "cni del"]
    removed = [e for e in zt_lines if e.get("event") == "pod removed" and e["uid"] == pod.uid]
    assert removed, "ztunnel never finished removing the pod"
    # Ended by ztunnel (its workload left the state, or the drain deadline), in time:
    # both the connection and the pod's whole drain within the drain timeout of the Del.
    assert own_line["direction"] == "inbound"
    assert own_line["outcome"].startswith("closed"), own_line
    assert seconds_between(cni_del, own_line) < DRAIN_TIMEOUT + 0.5, (cni_del, own_line)
    assert seconds_between(cni_del, removed[0]) < DRAIN_TIMEOUT + 0.5, (cni_del, removed)
    assert not [e for e in zt_lines if e.get("event") == "ZDS request failed"]
    trouble = {
        "zds error ack; retrying",
        "ztunnel did not acknowledge in time",
        "ztunnel disconnected",
    }
    assert not [e for e in agent_lines if e.get("event") in trouble], agent_lines
    assert sorted(p["name"] for p in config_dump(lab, node)["pods"]) == ["echo-2-1", "echo-2-2"]
