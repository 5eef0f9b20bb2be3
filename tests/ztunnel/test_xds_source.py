"""ztunnel's XdsSource against the real discovery server (grpc.aio) on loopback.

The control plane is :class:`discovery.server.DiscoveryServer` fed by a
:class:`discovery.registry.MemoryRegistry` whose model the tests change; the
state arrives through the real translation, Delta ADS (ztunnel's side over
:mod:`underpass.grpclite`, no grpcio, no thread) and ztunnel's conversion. On
the TLS port the server authenticates xDS clients with the lab token file
written here. Every wait is on the store (``wait_changed`` / ``wait_ready``)
or on the source's status (``wait_until``), bounded by ``trio.fail_after``;
only the server's client gauge, which has no event, is polled.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
import trio
import yaml
from cryptography.hazmat.primitives import serialization
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from prometheus_client import CollectorRegistry

from discovery.model import (
    AuthorizationPolicy,
    Model,
    Namespace,
    Pod,
    Rule,
    Service,
    ServicePort,
    Source,
)
from discovery.registry import MemoryRegistry
from discovery.server import DiscoveryServer
from identity.auth import LabTokenAuthenticator
from identity.ca import CertificateAuthority
from underpass.proto import workload_pb2
from underpass.xds.client import ResourcesReceived, ResponseRejected
from underpass.xds.types import (
    ADDRESS_TYPE_URL,
    ADS_SERVICE,
    DELTA_METHOD,
    WORKLOAD_TYPE_URLS,
)
from ztunnel.isolation import XdsRelay
from ztunnel.state import (
    Action,
    AppProtocol,
    Batch,
    Port,
    Scope,
    Snapshot,
    StateStore,
    StateWriter,
    StringMatch,
    TunnelProtocol,
    xds_decoders,
)
from ztunnel.xds_source import (
    Backoff,
    XdsSource,
    XdsSourceError,
    XdsTls,
    ZtunnelNode,
    _CheckedClient,
)

pytestmark = pytest.mark.unit

NS = "shop"
TD = "cluster.local"
WAIT = 10.0
FAST = Backoff(initial=0.02, maximum=0.1)
NODE = ZtunnelNode(
    node_name="node-1",
    pod_name="ztunnel-abc",
    pod_namespace="istio-system",
    pod_ip="10.244.1.1",
    cluster_id="Kubernetes",
)
AUTHORIZATION_TYPE_URL = WORKLOAD_TYPE_URLS[1]
#: The lab token of NODE's ztunnel (its namespace is the node's: the server checks that).
ZTUNNEL_TOKEN = "tok-ztunnel-0123456789abcdef"


def uid(name: str) -> str:
    return f"Kubernetes//Pod/{NS}/{name}"


def pod(name: str, ip: str, *, sa: str = "default", app: str = "") -> Pod:
    return Pod(
        NS, name, node="node-1", ips=(ip,), service_account=sa, labels={"app": app} if app else {}
    )


WEB_HOST = f"web.{NS}.svc.cluster.local"
WEB_KEY = f"{NS}/{WEB_HOST}"


def shop_model(*, policies: bool = True) -> Model:
    return Model.of(
        namespaces=[Namespace(NS, {"istio.io/dataplane-mode": "ambient"})],
        pods=[
            pod("web-0", "10.244.1.5", sa="web", app="web"),
            pod("client-0", "10.244.1.6", sa="client"),
        ],
        services=[
            Service(
                NS,
                "web",
                vips=("10.96.0.20",),
                ports=(ServicePort(80, 8080, app_protocol="http"),),
                selector={"app": "web"},
            )
        ],
        authorization_policies=(
            [
                AuthorizationPolicy(
                    NS,
                    "allow-client",
                    selector={"app": "web"},
                    rules=(Rule(sources=(Source(principals=(f"{TD}/ns/{NS}/sa/client",)),)),),
                )
            ]
            if policies
            else []
        ),
    )


# -- fixtures -------------------------------------------------------------------------------


class Servers:
    """Starts discovery servers for a test and stops every one of them at the end."""

    def __init__(self, ca: CertificateAuthority, authenticator: LabTokenAuthenticator) -> None:
        self.ca = ca
        self.authenticator = authenticator
        self.running: list[DiscoveryServer] = []
        self.metrics: dict[DiscoveryServer, CollectorRegistry] = {}

    def metric(self, server: DiscoveryServer, name: str, **labels: str) -> float:
        return self.metrics[server].get_sample_value(name, labels) or 0.0

    def plaintext(self, registry: MemoryRegistry, port: int = 0) -> DiscoveryServer:
        server = DiscoveryServer(
            registry,
            listen=None,
            plaintext_listen=f"127.0.0.1:{port}",
            quiet=0.01,
            metrics_registry=(metrics := CollectorRegistry()),
        )
        self.metrics[server] = metrics
        return self._start(server)

    def tls(self, registry: MemoryRegistry) -> DiscoveryServer:
        # The certificate names localhost only: reaching 127.0.0.1 needs the name override.
        server = DiscoveryServer(
            registry,
            ca=self.ca,
            xds_authenticator=self.authenticator,
            listen="127.0.0.1:0",
            serving_dns_names=["localhost"],
            serving_ips=[],
            quiet=0.01,
            metrics_registry=(metrics := CollectorRegistry()),
        )
        self.metrics[server] = metrics
        return self._start(server)

    def _start(self, server: DiscoveryServer) -> DiscoveryServer:
        server.start()
        self.running.append(server)
        return server

    def stop(self, server: DiscoveryServer) -> None:
        server.stop(grace=0)
        self.running.remove(server)

    def stop_all(self) -> None:
        for server in list(self.running):
            self.stop(server)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", TD)


@pytest.fixture
def tokens(tmp_path: Path) -> LabTokenAuthenticator:
    """The control plane's authenticator: one token, NODE's ztunnel."""
    entry = {
        "token": ZTUNNEL_TOKEN,
        "namespace": NODE.pod_namespace,
        "service_account": "ztunnel",
        "pod": NODE.pod_name,
        "node": NODE.node_name,
    }
    path = tmp_path / "tokens.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump([entry]))
    return LabTokenAuthenticator(path, TD)


@pytest.fixture
def servers(ca: CertificateAuthority, tokens: LabTokenAuthenticator) -> Iterator[Servers]:
    servers = Servers(ca, tokens)
    try:
        yield servers
    finally:
        servers.stop_all()


class RecordingWriter(StateWriter):
    """The store's writer, recording what the source asks of it (in order)."""

    def __init__(self, store: StateStore) -> None:
        super().__init__(store, "xds (recorded)")
        self.calls: list[tuple[str, Batch | None, bool]] = []

    def apply(self, batch: Batch) -> Snapshot:
        snapshot = super().apply(batch)
        self.calls.append(("apply", batch, snapshot.ready))
        return snapshot

    def replace(self, batch: Batch, *, ready: bool = True) -> Snapshot:
        raise AssertionError("Delta xDS responses must be applied, never replace the state")

    def mark_ready(self) -> Snapshot:
        snapshot = super().mark_ready()
        self.calls.append(("mark_ready", None, snapshot.ready))
        return snapshot

    def applied(self) -> list[Batch]:
        return [batch for call, batch, _ in self.calls if call == "apply" and batch is not None]


async def wait_for_state(store: StateStore, condition: Callable[[Snapshot], bool]) -> Snapshot:
    with trio.fail_after(WAIT):
        snapshot = store.snapshot
        while not condition(snapshot):
            snapshot = await store.wait_changed(snapshot.version)
        return snapshot


async def wait_for_source(source: XdsSource, condition: Callable[[XdsSource], bool]) -> None:
    with trio.fail_after(WAIT):
        await source.wait_until(condition)


@contextlib.contextmanager
def threads_started_here() -> Iterator[list[threading.Thread]]:
    """Threads started from this (the trio) thread while the block runs.

    The servers' own threads start from their threads (or before the block).
    """
    started: list[threading.Thread] = []
    original = threading.Thread.start
    here = threading.current_thread()

    def start(thread: threading.Thread) -> None:
        if threading.current_thread() is here:
            started.append(thread)
        original(thread)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threading.Thread, "start", start)
        yield started


async def wait_for_clients(servers: Servers, server: DiscoveryServer, count: int) -> None:
    """Until the server counts ``count`` xDS clients (a gauge: polled, bounded)."""
    with trio.fail_after(WAIT):
        while servers.metric(server, "underpass_xds_clients") != count:  # noqa: ASYNC110
            await trio.sleep(0.01)


# -- full state, deltas, readiness ----------------------------------------------------------


async def test_the_full_state_arrives_with_its_fields(servers: Servers) -> None:
    server = servers.plaintext(MemoryRegistry(shop_model()))
    store = StateStore()
    source = XdsSource(server.plaintext_address, store.claim_writer("xds"), NODE, backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with trio.fail_after(WAIT):
            snapshot = await store.wait_ready()

        web = snapshot.workload(uid("web-0"))
        assert web is not None
        assert (web.name, web.namespace, web.service_account) == ("web-0", NS, "web")
        assert web.addresses == (ipaddress.ip_address("10.244.1.5"),)
        assert web.tunnel_protocol is TunnelProtocol.HBONE
        assert web.node == "node-1" and web.cluster_id == "Kubernetes"
        assert dict(web.services) == {WEB_KEY: (Port(80, 8080, AppProtocol.HTTP11),)}
        assert web.authorization_policies == (f"{NS}/allow-client",)
        assert snapshot.workload(uid("client-0")) is not None
        assert set(snapshot.workloads) == {uid("web-0"), uid("client-0")}

        service = snapshot.service(WEB_KEY)
        assert service is not None
        assert (service.name, service.namespace, service.hostname) == ("web", NS, WEB_HOST)
        assert [a.address for a in service.addresses] == [ipaddress.ip_address("10.96.0.20")]
        assert service.ports == (Port(80, 8080, AppProtocol.HTTP11),)
        assert [w.uid for w in snapshot.endpoints(WEB_KEY)] == [uid("web-0")]

        policy = snapshot.policy(f"{NS}/allow-client")
        assert policy is not None
        assert (policy.scope, policy.action, policy.problems) == (
            Scope.WORKLOAD_SELECTOR,
            Action.ALLOW,
            (),
        )
        [rule] = policy.rules
        [clause] = rule.clauses
        [match] = clause.matches
        assert match.principals == (StringMatch.exact(f"{TD}/ns/{NS}/sa/client"),)

        status = source.status()
        assert status["address"] == server.plaintext_address
        assert status["connected"] is True and status["ready"] is True
        assert status["resources"] == {
            "istio.workload.Address": 3,
            "istio.security.Authorization": 1,
        }
        assert status["acks"] == 2 and status["nacks"] == 0 and status["reconnects"] == 0
        assert status["last_error"] is None
        assert isinstance(status["last_response_time"], str)
        nursery.cancel_scope.cancel()


async def test_the_store_is_ready_only_after_both_types_arrived(servers: Servers) -> None:
    server = servers.plaintext(MemoryRegistry(shop_model()))
    store = StateStore()
    writer = RecordingWriter(store)
    source = XdsSource(server.plaintext_address, writer, NODE, backoff=FAST)
    assert not store.ready
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with trio.fail_after(WAIT):
            await store.wait_ready()
        nursery.cancel_scope.cancel()

    ready_at = [call for call, _, _ in writer.calls].index("mark_ready")
    before = writer.calls[:ready_at]
    # Both types were applied first, and nothing was ready before the mark.
    assert any(batch is not None and batch.workloads for _, batch, _ in before)
    assert any(batch is not None and batch.policies for _, batch, _ in before)
    assert not any(ready for _, _, ready in before)
    assert writer.calls.count(("mark_ready", None, True)) == 1


async def test_no_policies_at_all_still_makes_the_store_ready(servers: Servers) -> None:
    # The server answers the Authorization subscription with nothing: still in sync.
    server = servers.plaintext(MemoryRegistry(shop_model(policies=False)))
    store = StateStore()
    source = XdsSource(server.plaintext_address, store.claim_writer("xds"), NODE, backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with trio.fail_after(WAIT):
            snapshot = await store.wait_ready()
        assert len(snapshot.workloads) == 2 and not snapshot.policies
        assert source.status()["resources"] == {
            "istio.workload.Address": 3,
            "istio.security.Authorization": 0,
        }
        nursery.cancel_scope.cancel()


async def test_an_update_and_a_delete_arrive_as_deltas(servers: Servers) -> None:
    registry = MemoryRegistry(shop_model())
    server = servers.plaintext(registry)
    store = StateStore()
    writer = RecordingWriter(store)
    source = XdsSource(server.plaintext_address, writer, NODE, backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with trio.fail_after(WAIT):
            await store.wait_ready()
        applied_before = len(writer.applied())

        registry.update(
            lambda m: m.upsert(pod("client-0", "10.244.1.9", sa="client")).delete(
                "authorization_policies", (NS, "allow-client")
            )
        )
        snapshot = await wait_for_state(
            store,
            lambda s: (
                s.policy(f"{NS}/allow-client") is None
                and (w := s.workload(uid("client-0"))) is not None
                and w.addresses == (ipaddress.ip_address("10.244.1.9"),)
            ),
        )
        # web-0 lost the policy that selected it: its workload changed too.
        web = snapshot.workload(uid("web-0"))
        assert web is not None and web.authorization_policies == ()
        registry.delete("pods", (NS, "web-0"))
        snapshot = await wait_for_state(store, lambda s: s.workload(uid("web-0")) is None)

        # Untouched resources stay; the service lost its only endpoint.
        assert snapshot.service(WEB_KEY) is not None
        assert snapshot.endpoints(WEB_KEY) == ()
        assert set(snapshot.workloads) == {uid("client-0")}
        assert snapshot.ready
        # Only the changes travelled, as deltas applied on top of the state.
        deltas = writer.applied()[applied_before:]
        assert sorted(w.uid for b in deltas for w in b.workloads) == [
            uid("client-0"),
            uid("web-0"),
        ]
        assert not [s for b in deltas for s in b.services]
        assert [n for b in deltas for n in b.removed_addresses] == [uid("web-0")]
        assert [n for b in deltas for n in b.removed_policies] == [f"{NS}/allow-client"]
        assert source.status()["resources"] == {
            "istio.workload.Address": 2,
            "istio.security.Authorization": 0,
        }
        nursery.cancel_scope.cancel()


# -- NACKs ----------------------------------------------------------------------------------


async def test_a_rejected_resource_is_nacked_and_the_stream_goes_on(servers: Servers) -> None:
    registry = MemoryRegistry(shop_model())
    server = servers.plaintext(registry)
    store = StateStore()
    source = XdsSource(server.plaintext_address, store.claim_writer("xds"), NODE, backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with trio.fail_after(WAIT):
            ready = await store.wait_ready()

        # ztunnel refuses a service that lists one port twice; the control plane sends it.
        bad = Service(
            NS,
            "bad",
            vips=("10.96.0.21",),
            ports=(ServicePort(80, 8080, name="a"), ServicePort(80, 9090, name="b")),
        )
        with structlog.testing.capture_logs() as logs:
            registry.upsert(bad)
            await wait_for_source(source, lambda s: s.nacks == 1)
        assert store.snapshot is ready  # the state is untouched
        assert store.snapshot.service(f"{NS}/bad.{NS}.svc.cluster.local") is None
        status = source.status()
        assert status["connected"] is True and status["reconnects"] == 0
        assert "service port 80 is listed twice" in str(status["last_error"])
        [nack_log] = [e for e in logs if "NACK" in e["event"]]
        assert nack_log["log_level"] == "warning"
        assert "service port 80 is listed twice" in nack_log["error"]
        assert nack_log["type_url"] == "istio.workload.Address"

        # The same stream still delivers: a good update applies, the bad one stays out.
        registry.upsert(pod("late-0", "10.244.1.7"))
        snapshot = await wait_for_state(store, lambda s: s.workload(uid("late-0")) is not None)
        assert snapshot.service(f"{NS}/bad.{NS}.svc.cluster.local") is None
        assert set(snapshot.workloads) == {uid("web-0"), uid("client-0"), uid("late-0")}
        assert source.nacks == 1 and source.reconnects == 0 and source.connected

        # Fixing the object brings it in.
        registry.upsert(Service(NS, "bad", vips=("10.96.0.21",), ports=(ServicePort(80, 8080),)))
        await wait_for_state(
            store, lambda s: s.service(f"{NS}/bad.{NS}.svc.cluster.local") is not None
        )
        nursery.cancel_scope.cancel()


def _address_response(nonce: str, name: str, workload_uid: str) -> Any:
    address = workload_pb2.Address(
        workload=workload_pb2.Workload(
            uid=workload_uid,
            name="web-0",
            namespace=NS,
            addresses=[ipaddress.ip_address("10.244.1.5").packed],
        )
    )
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=ADDRESS_TYPE_URL,
        nonce=nonce,
        resources=[
            discovery_pb2.Resource(
                name=name,
                version="v1",
                resource=any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=address.SerializeToString()),
            )
        ],
    )


def test_a_resource_named_unlike_its_content_is_nacked_before_anything_is_kept() -> None:
    client = _CheckedClient(NODE.to_proto(), WORKLOAD_TYPE_URLS, decoders=xds_decoders())
    client.start_stream()
    event, answer = client.receive(_address_response("n1", uid("other"), uid("web-0")))
    assert isinstance(event, ResponseRejected)
    assert answer.response_nonce == "n1" and answer.error_detail.code == 3
    assert repr(uid("web-0")) in answer.error_detail.message
    assert client.versions(ADDRESS_TYPE_URL) == {}  # not remembered: it will be sent again
    event, answer = client.receive(_address_response("n2", uid("web-0"), uid("web-0")))
    assert isinstance(event, ResourcesReceived) and not answer.HasField("error_detail")
    assert client.versions(ADDRESS_TYPE_URL) == {uid("web-0"): "v1"}


# -- losing and regaining the control plane -------------------------------------------------


async def test_the_last_state_survives_the_control_plane_and_reconnects(
    servers: Servers,
) -> None:
    registry = MemoryRegistry(shop_model())
    server = servers.plaintext(registry)
    port = server.plaintext_port
    assert port is not None
    store = StateStore()
    source = XdsSource(server.plaintext_address, store.claim_writer("xds"), NODE, backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with trio.fail_after(WAIT):
            ready = await store.wait_ready()

        await trio.to_thread.run_sync(servers.stop, server)
        await wait_for_source(source, lambda s: not s.connected)
        # It keeps trying (with backoff) while serving the last state, untouched.
        await wait_for_source(source, lambda s: s.reconnects >= 2)
        assert store.snapshot is ready and store.ready
        assert source.status()["connected"] is False
        assert source.status()["last_error"] is not None

        # Changes made while the control plane is down arrive once it is back.
        registry.update(
            lambda m: m.upsert(pod("late-0", "10.244.1.7")).delete("pods", (NS, "client-0"))
        )
        await trio.to_thread.run_sync(servers.plaintext, registry, port)
        snapshot = await wait_for_state(
            store,
            lambda s: s.workload(uid("late-0")) is not None and s.workload(uid("client-0")) is None,
        )
        await wait_for_source(source, lambda s: s.connected)
        assert snapshot.ready
        assert set(snapshot.workloads) == {uid("web-0"), uid("late-0")}
        assert snapshot.policy(f"{NS}/allow-client") is not None
        status = source.status()
        assert status["nacks"] == 0 and isinstance(status["reconnects"], int)
        assert status["reconnects"] >= 2
        nursery.cancel_scope.cancel()


# -- TLS and the bearer token ---------------------------------------------------------------


async def test_tls_with_the_mesh_root_and_the_name_override(
    servers: Servers, ca: CertificateAuthority
) -> None:
    server = servers.tls(MemoryRegistry(shop_model()))
    store = StateStore()
    tls = XdsTls(ca.root_bundle_pem.encode(), server_name="localhost")
    source = XdsSource(
        server.tls_address, store.claim_writer("xds"), NODE, tls=tls, token=lambda: ZTUNNEL_TOKEN
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with trio.fail_after(WAIT):
            snapshot = await store.wait_ready()
        assert set(snapshot.workloads) == {uid("web-0"), uid("client-0")}
        assert source.status()["tls"] is True
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("case", ["other root", "no name override"])
async def test_tls_fails_closed_on_a_certificate_it_cannot_verify(
    servers: Servers, ca: CertificateAuthority, tmp_path: Path, case: str
) -> None:
    server = servers.tls(MemoryRegistry(shop_model()))
    if case == "other root":
        other = CertificateAuthority.load_or_create(tmp_path / "other-ca", TD)
        tls = XdsTls(other.root_bundle_pem.encode(), server_name="localhost")
    else:  # the certificate names localhost, not 127.0.0.1
        tls = XdsTls(ca.root_bundle_pem.encode())
    store = StateStore()
    source = XdsSource(server.tls_address, store.claim_writer("xds"), NODE, tls=tls, backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        await wait_for_source(source, lambda s: s.reconnects >= 2)
        assert not source.connected and source.acks == 0
        assert not store.ready and not store.snapshot.workloads
        assert "UNAVAILABLE" in str(source.last_error)
        nursery.cancel_scope.cancel()


class MetadataRecorder:
    """A TLS gRPC server whose ADS method records the caller's metadata and refuses the call."""

    def __init__(self, ca: CertificateAuthority) -> None:
        key, serving = ca.issue_serving_certificate(["localhost"], [])
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        credentials = grpc.ssl_server_credentials(
            [(key_pem, "".join(serving.chain_pem[:-1]).encode())]
        )
        self.metadata: list[dict[str, str | bytes]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(2))
        handler = grpc.stream_stream_rpc_method_handler(
            self._refuse,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ADS_SERVICE, {DELTA_METHOD: handler}),)
        )
        self.port = self._server.add_secure_port("127.0.0.1:0", credentials)

    def _refuse(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        with self._lock:
            self.metadata.append(dict(context.invocation_metadata()))
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "the test refuses every caller")

    def tokens(self) -> list[str | bytes | None]:
        with self._lock:
            return [m.get("authorization") for m in self.metadata]

    def __enter__(self) -> MetadataRecorder:
        self._server.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.stop(grace=None).wait()


async def test_the_bearer_token_is_sent_fresh_per_stream_and_never_logged(
    ca: CertificateAuthority,
) -> None:
    issued: list[str] = []

    def token() -> str:
        issued.append(f"secret-token-{len(issued)}")
        return issued[-1]

    store = StateStore()
    with MetadataRecorder(ca) as recorder, structlog.testing.capture_logs() as logs:
        source = XdsSource(
            f"127.0.0.1:{recorder.port}",
            store.claim_writer("xds"),
            NODE,
            tls=XdsTls(ca.root_bundle_pem.encode(), server_name="localhost"),
            token=token,
            backoff=FAST,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await wait_for_source(
                source, lambda s: len(recorder.tokens()) >= 2 and s.reconnects >= 2
            )
            nursery.cancel_scope.cancel()
    tokens = recorder.tokens()
    assert tokens[:2] == ["Bearer secret-token-0", "Bearer secret-token-1"]
    assert "UNAUTHENTICATED" in str(source.last_error) and not store.ready
    assert logs and not any("secret-token" in repr(entry) for entry in logs)
    assert "secret-token" not in repr(source.status())


async def test_a_failing_token_source_is_retried_and_never_logged(
    servers: Servers, ca: CertificateAuthority
) -> None:
    server = servers.tls(MemoryRegistry(shop_model()))
    attempts: list[int] = []

    def token() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("cannot read /var/run/secrets/tokens/secret-detail")
        return ZTUNNEL_TOKEN

    store = StateStore()
    with structlog.testing.capture_logs() as logs:
        source = XdsSource(
            server.tls_address,
            store.claim_writer("xds"),
            NODE,
            tls=XdsTls(ca.root_bundle_pem.encode(), server_name="localhost"),
            token=token,
            backoff=FAST,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            with trio.fail_after(WAIT):
                await store.wait_ready()
            nursery.cancel_scope.cancel()
    assert len(attempts) == 3 and source.reconnects == 2
    assert "bearer token" in str(source.last_error)
    assert not any("secret-detail" in repr(e) or ZTUNNEL_TOKEN in repr(e) for e in logs)


def test_settings_are_checked_when_built(ca: CertificateAuthority) -> None:
    store = StateStore()
    writer = store.claim_writer("xds")
    with pytest.raises(XdsSourceError, match="must not travel in clear"):
        XdsSource("127.0.0.1:15010", writer, NODE, token=lambda: "t")
    with pytest.raises(XdsSourceError, match="<host>:<port>"):
        XdsSource("istiod.istio-system.svc", writer, NODE)
    with pytest.raises(XdsSourceError, match="not PEM certificates"):
        XdsTls(b"not a certificate")
    with pytest.raises(XdsSourceError, match="0 < initial <= maximum"):
        Backoff(initial=2, maximum=1)
    with pytest.raises(XdsSourceError, match="not an IPv4 or IPv6 address"):
        ZtunnelNode("node-1", "zt", "istio-system", "not-an-ip", "Kubernetes")
    assert NODE.id == "ztunnel~10.244.1.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    metadata = {k: v.string_value for k, v in NODE.to_proto().metadata.fields.items()}
    assert metadata == {
        "NAME": "ztunnel-abc",
        "NAMESPACE": "istio-system",
        "INSTANCE_IPS": "10.244.1.1",
        "NODE_NAME": "node-1",
        "CLUSTER_ID": "Kubernetes",
    }
    XdsSource("[fd00::1]:15012", writer, NODE, tls=XdsTls(ca.root_bundle_pem.encode()))


# -- stopping -------------------------------------------------------------------------------


async def test_cancel_closes_the_stream_and_starts_no_thread(servers: Servers) -> None:
    server = servers.plaintext(MemoryRegistry(shop_model()))
    store = StateStore()
    source = XdsSource(server.plaintext_address, store.claim_writer("xds"), NODE, backoff=FAST)
    with threads_started_here() as started:
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            with trio.fail_after(WAIT):
                await store.wait_ready()
            await wait_for_clients(servers, server, 1)
            nursery.cancel_scope.cancel()
    # The stream ran in the trio task itself: no worker thread, no grpcio threads.
    assert started == []
    assert not source.connected and not source.status()["connected"]
    # The cancel reached the server: it lets the stream go.
    await wait_for_clients(servers, server, 0)
    # The state stays as it was; a new run continues from it.
    assert store.ready and len(store.snapshot.workloads) == 2


async def test_cancel_during_backoff_returns_at_once(servers: Servers) -> None:
    registry = MemoryRegistry(shop_model())
    server = servers.plaintext(registry)
    address = server.plaintext_address
    servers.stop(server)  # nothing listens: every attempt fails, then waits a long backoff
    store = StateStore()
    source = XdsSource(address, store.claim_writer("xds"), NODE, backoff=Backoff(60, 60))
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await source.wait_until(lambda s: s.last_error is not None)
            nursery.cancel_scope.cancel()
    assert "UNAVAILABLE" in str(source.last_error) and not store.ready
    assert "connect" in str(source.last_error)


async def test_run_twice_at_once_is_refused(servers: Servers) -> None:
    server = servers.plaintext(MemoryRegistry(shop_model()))
    store = StateStore()
    source = XdsSource(server.plaintext_address, store.claim_writer("xds"), NODE, backoff=FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        with pytest.raises(XdsSourceError, match="already running"):
            await source.run()
        nursery.cancel_scope.cancel()
    assert not source.connected


# -- transport specifics ----------------------------------------------------------------------


async def test_a_token_the_control_plane_refuses_is_reported_never_logged(
    servers: Servers, ca: CertificateAuthority
) -> None:
    server = servers.tls(MemoryRegistry(shop_model()))
    store = StateStore()
    refused = "tok-unknown-0123456789abcdef"
    with structlog.testing.capture_logs() as logs:
        source = XdsSource(
            server.tls_address,
            store.claim_writer("xds"),
            NODE,
            tls=XdsTls(ca.root_bundle_pem.encode(), server_name="localhost"),
            token=lambda: refused,
            backoff=FAST,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await wait_for_source(source, lambda s: s.reconnects >= 1)
            nursery.cancel_scope.cancel()
    # The server's own refusal arrives, percent-decoded, as the stream's error.
    error = str(source.last_error)
    assert "UNAUTHENTICATED" in error and "lab token file" in error
    assert not store.ready and source.acks == 0
    assert refused not in error and not any(refused in repr(e) for e in logs)
    refusals = servers.metric(
        server, "underpass_xds_auth_refused_total", reason="authentication_failed"
    )
    assert refusals >= 1


async def test_through_the_isolation_relay_on_a_unix_socket(servers: Servers) -> None:
    """A mode-3 worker's path: unix:<path> to the supervisor's grpcio relay, plaintext."""
    server = servers.plaintext(MemoryRegistry(shop_model()))
    relay = XdsRelay(server.plaintext_address, root_pem=None, server_name=None, token=None)
    relay.start()
    try:
        assert relay.address.startswith("unix:")
        store = StateStore()
        source = XdsSource(relay.address, store.claim_writer("xds"), NODE, backoff=FAST)
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            with trio.fail_after(WAIT):
                snapshot = await store.wait_ready()
            assert set(snapshot.workloads) == {uid("web-0"), uid("client-0")}
            assert source.connected and source.status()["address"] == relay.address
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(relay.stop)


class GarbageServer:
    """A TCP server that answers anything with bytes that are not HTTP/2."""

    def __init__(self) -> None:
        self.listener = trio.socket.socket()
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with self.listener:
            await self.listener.bind(("127.0.0.1", 0))
            self.listener.listen()
            task_status.started(self.listener.getsockname()[1])
            while True:
                conn, _ = await self.listener.accept()
                self.connections += 1
                with conn:
                    await conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    while await conn.recv(65536):  # until the client hangs up
                        pass


async def test_a_server_that_does_not_speak_http2_fails_the_stream_cleanly() -> None:
    garbage = GarbageServer()
    store = StateStore()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(garbage.serve)
        source = XdsSource(f"127.0.0.1:{port}", store.claim_writer("xds"), NODE, backoff=FAST)
        await nursery.start(source.run)
        await wait_for_source(source, lambda s: s.reconnects >= 2)
        nursery.cancel_scope.cancel()
    assert garbage.connections >= 2
    assert "INTERNAL" in str(source.last_error) and "HTTP/2" in str(source.last_error)
    assert not source.connected and not store.ready
