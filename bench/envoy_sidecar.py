"""Envoy as a pair of mTLS sidecars inside two lab pods: the baseline the ztunnel bench compares.

Owns what the sidecar path of :mod:`bench.ztunnel_lab` needs, and nothing else:

- certificates: a throw-away :class:`identity.ca.CertificateAuthority` in a
  private directory issues one workload certificate per sidecar identity
  (:func:`issue_certificates`), written as Envoy's PEM files by
  :func:`tests.interop.envoy.write_tls_files`;
- the two bootstraps (:func:`client_sidecar_config`,
  :func:`server_sidecar_config`): the client's sidecar listens in plaintext on
  the client pod's ``127.0.0.1:<outbound port>`` and forwards (``tcp_proxy``)
  over TLS to the server pod's ``<pod ip>:<inbound port>``; the server's
  sidecar terminates TLS there and forwards to ``127.0.0.1:<app port>``. Both
  sides present their certificate, require the peer's and check its SPIFFE
  URI SAN against the one expected identity; TLS 1.3 only. One pair of
  listeners per forwarded app port;
- running one Envoy inside a pod's network namespace (:func:`run_sidecar`):
  ``nsenter`` execs Envoy (no extra process, so the pid is Envoy's own, which
  the bench reads CPU and memory from), ``--concurrency 1`` (ztunnel is one
  Python process: like with like), its admin API on a Unix socket so the
  bench can ask it things from outside the pod, stopped on exit whatever
  happens.

The configuration fragments come from :mod:`tests.interop.envoy` (the
interop tests' builders); only the parts that differ for a sidecar are here.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from identity.ca import CertificateAuthority, build_csr, generate_workload_key, validate_csr
from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from tests.interop.envoy import (
    Config,
    TlsFiles,
    bootstrap,
    downstream_tls,
    envoy_binary,
    socket_address,
    static_cluster,
    upstream_tls,
)
from underpass.hbone.headers import SocketAddress

LOOPBACK = "127.0.0.1"
#: Worker threads per sidecar: one, as ztunnel is one Python process.
SIDECAR_CONCURRENCY = 1
#: Seconds a sidecar gets from exec to ``/ready`` answering 200.
STARTUP_TIMEOUT = 30.0
#: Seconds between two readiness polls.
READY_POLL_INTERVAL = 0.05
#: Seconds a sidecar gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0


class SidecarError(RuntimeError):
    """An Envoy sidecar would not start, or its admin API misbehaved."""


@dataclass(frozen=True)
class ForwardedPort:
    """One application port as the sidecar pair carries it."""

    app_port: int  # where the server pod's application listens (reached on 127.0.0.1)
    outbound_port: int  # the client sidecar's plaintext listener, 127.0.0.1 in the client pod
    inbound_port: int  # the server sidecar's TLS listener, on the server pod's IP


# -- certificates --------------------------------------------------------------------------------


def issue_certificates(
    ca_dir: Path, identities: Iterable[SpiffeId]
) -> dict[SpiffeId, WorkloadCertificate]:
    """A new CA in ``ca_dir`` (trust domain of the first identity) and a certificate for each."""
    wanted = list(identities)
    if not wanted:
        raise ValueError("no identities to issue certificates for")
    ca = CertificateAuthority.load_or_create(ca_dir, wanted[0].trust_domain)
    issued: dict[SpiffeId, WorkloadCertificate] = {}
    for identity in wanted:
        key = generate_workload_key()
        answer = ca.sign_workload(validate_csr(build_csr(key, identity)))
        issued[identity] = WorkloadCertificate.from_ca_response(identity, key, answer.chain_pem)
    return issued


# -- configuration --------------------------------------------------------------------------------


def _without_alpn(transport_socket: Config) -> Config:
    # The interop builders advertise ALPN h2 (HBONE). A sidecar's tcp_proxy carries
    # opaque bytes, so it offers no ALPN at all rather than a protocol it doesn't speak.
    transport_socket["typed_config"]["common_tls_context"].pop("alpn_protocols", None)
    return transport_socket


def _tcp_proxy(stat_prefix: str, cluster: str) -> Config:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": stat_prefix,
            "cluster": cluster,
        },
    }


def _sidecar_bootstrap(
    node_id: str, admin_socket: Path, listeners: Sequence[Config], clusters: Sequence[Config]
) -> Config:
    config = bootstrap(listeners=listeners, clusters=clusters)
    config["node"] = {"id": node_id, "cluster": "underpass-bench"}
    # A Unix socket: the bench reaches the admin API from outside the pod's netns.
    config["admin"] = {"address": {"pipe": {"path": str(admin_socket)}}}
    return config


def client_sidecar_config(
    files: TlsFiles,
    *,
    server_identity: SpiffeId,
    server_ip: str,
    ports: Sequence[ForwardedPort],
    admin_socket: Path,
) -> Config:
    """The client pod's sidecar: plaintext on loopback in, mTLS to the server's sidecar out."""
    listeners, clusters = [], []
    for port in ports:
        cluster = f"server-sidecar-{port.app_port}"
        listeners.append(
            {
                "name": f"outbound-{port.app_port}",
                "address": socket_address((LOOPBACK, port.outbound_port)),
                "filter_chains": [{"filters": [_tcp_proxy(f"outbound_{port.app_port}", cluster)]}],
            }
        )
        clusters.append(
            static_cluster(
                cluster,
                SocketAddress.of(server_ip, port.inbound_port),
                transport_socket=_without_alpn(
                    upstream_tls(files, server_identities=[server_identity])
                ),
            )
        )
    return _sidecar_bootstrap("client-sidecar", admin_socket, listeners, clusters)


def server_sidecar_config(
    files: TlsFiles,
    *,
    client_identity: SpiffeId,
    pod_ip: str,
    ports: Sequence[ForwardedPort],
    admin_socket: Path,
) -> Config:
    """The server pod's sidecar: mTLS on the pod IP in, plaintext to the local app out."""
    listeners, clusters = [], []
    for port in ports:
        cluster = f"local-app-{port.app_port}"
        listeners.append(
            {
                "name": f"inbound-{port.app_port}",
                "address": socket_address((pod_ip, port.inbound_port)),
                "filter_chains": [
                    {
                        "transport_socket": _without_alpn(
                            downstream_tls(files, client_identities=[client_identity])
                        ),
                        "filters": [_tcp_proxy(f"inbound_{port.app_port}", cluster)],
                    }
                ],
            }
        )
        clusters.append(static_cluster(cluster, SocketAddress.of(LOOPBACK, port.app_port)))
    return _sidecar_bootstrap("server-sidecar", admin_socket, listeners, clusters)


# -- the process ----------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket (Envoy's admin ``pipe`` address)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Sidecar:
    """One running Envoy sidecar: its pid, admin API, stats and log."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], directory: Path) -> None:
        self.name = name
        self.process = process
        self.directory = directory
        self.admin_socket = directory / "admin.sock"
        self.log_path = directory / "envoy.log"
        self.output_path = directory / "envoy.out"

    @property
    def pid(self) -> int:
        return self.process.pid

    def admin_get(self, target: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
        """``GET target`` on the admin API: (status, body)."""
        connection = _UnixHTTPConnection(self.admin_socket, timeout)
        try:
            connection.request("GET", target)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with ``prefix``."""
        status, body = self.admin_get("/stats?format=json")
        if status != 200:
            raise SidecarError(f"{self.name}: GET /stats answered {status}: {body[:200]!r}")
        found: dict[str, int] = {}
        for stat in json.loads(body).get("stats", []):
            name, value = stat.get("name"), stat.get("value")
            if isinstance(name, str) and isinstance(value, int) and name.startswith(prefix):
                found[name] = value
        return found

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for path in (self.output_path, self.log_path):
            with contextlib.suppress(FileNotFoundError):
                text += path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll ``/ready`` until 200; fail with Envoy's log if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SidecarError(
                    f"{self.name} (Envoy) exited with status {self.process.returncode} before "
                    f"it was ready; its log:\n{self.log_tail()}"
                )
            try:
                status, _ = self.admin_get("/ready", timeout=1.0)
            except OSError:
                status = 0
            if status == 200:
                return
            if time.monotonic() > deadline:
                raise SidecarError(
                    f"{self.name} (Envoy) was not ready after {timeout:g} s; its log:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(READY_POLL_INTERVAL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def run_sidecar(
    name: str, config: Config, directory: Path, netns_path: str, *, log_level: str = "warning"
) -> Iterator[Sidecar]:
    """Run Envoy with bootstrap ``config`` inside the netns at ``netns_path`` for the block.

    ``directory`` (private, the caller's to delete) receives the bootstrap, the
    admin socket and the log. Envoy is stopped on exit, also on errors and Ctrl-C.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    config_path = directory / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        "nsenter",
        f"--net={netns_path}",
        "--",
        str(envoy_binary()),
        "--config-path",
        str(config_path),
        "--log-path",
        str(directory / "envoy.log"),
        "--log-level",
        log_level,
        "--concurrency",
        str(SIDECAR_CONCURRENCY),
        # No shared memory region: several Envoys on one machine never collide.
        "--disable-hot-restart",
    ]
    with open(directory / "envoy.out", "wb") as output:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    sidecar = Sidecar(name, process, directory)
    try:
        sidecar.wait_ready()
        yield sidecar
    finally:
        sidecar.stop()


def describe(config: Config) -> dict[str, Any]:
    """The listeners and clusters of a bootstrap, for the bench's report."""
    resources = config["static_resources"]
    return {
        "listeners": [
            {
                "name": listener["name"],
                "address": listener["address"]["socket_address"],
                "tls": "transport_socket" in listener["filter_chains"][0],
            }
            for listener in resources["listeners"]
        ],
        "clusters": [
            {
                "name": cluster["name"],
                "endpoint": cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
                    "endpoint"
                ]["address"]["socket_address"],
                "tls": "transport_socket" in cluster,
            }
            for cluster in resources["clusters"]
        ],
    }
