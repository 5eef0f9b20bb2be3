"""The discovery server on loopback (grpc.aio, TLS + plaintext) with real Delta ADS clients.

Clients are :class:`underpass.xds.grpc_client.DeltaStream` (grpcio, a thread each)
driving :class:`underpass.xds.client.DeltaClient`, as ztunnel will. Every wait is
on a condition the client or the server signals; nothing sleeps.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import structlog
import yaml
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from discovery.errors import DiscoveryConfigError
from discovery.model import Model, Namespace, Pod
from discovery.registry import MemoryRegistry
from discovery.server import DiscoveryServer
from identity.auth import Authorizer, LabTokenAuthenticator
from identity.ca import CertificateAuthority, build_csr, generate_workload_key
from identity.client import CaClient
from identity.server import CaMetrics, CaServicer
from identity.spiffe import SpiffeId
from underpass.proto import workload_pb2
from underpass.xds.client import ClientEvent, DeltaClient, ResourcesReceived, ResponseRejected
from underpass.xds.errors import ResourceRejected
from underpass.xds.grpc_client import CHANNEL_OPTIONS, DeltaStream
from underpass.xds.node import build_node
from underpass.xds.types import ADDRESS_TYPE_URL, DELTA_METHOD_PATH, WORKLOAD_TYPE_URLS

pytestmark = pytest.mark.unit

TD = "cluster.local"
A = ADDRESS_TYPE_URL
TOKEN = "tok-sleep-0123456789abcdef"
ZTUNNEL_TOKEN = "tok-ztunnel-0123456789abcdef"
MESH_NS = "istio-system"


def uid(name: str) -> str:
    return f"Kubernetes//Pod/demo/{name}"


def pods(*names: str, content: str = "10.0.0.1") -> list[Pod]:
    return [Pod("demo", n, node="node-1", ips=(content,)) for n in names]


@dataclass
class Env:
    ca: CertificateAuthority
    registry: MemoryRegistry
    server: DiscoveryServer
    metrics: CollectorRegistry
    tokens: Path

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, labels) or 0.0

    def channel(self, *, plaintext: bool = False) -> grpc.Channel:
        if plaintext:
            return grpc.insecure_channel(self.server.plaintext_address, options=CHANNEL_OPTIONS)
        credentials = grpc.ssl_channel_credentials(self.ca.root_bundle_pem.encode())
        options = [("grpc.ssl_target_name_override", "localhost"), *CHANNEL_OPTIONS]
        return grpc.secure_channel(self.server.tls_address, credentials, options=options)


def write_tokens(path: Path) -> Path:
    doc = [
        {
            "token": TOKEN,
            "namespace": "demo",
            "service_account": "sleep",
            "pod": "s-1",
            "node": "n1",
        },
        {
            "token": ZTUNNEL_TOKEN,
            "namespace": MESH_NS,
            "service_account": "ztunnel",
            "pod": "ztunnel-1",
            "node": "n1",
        },
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(doc))
    return path


@pytest.fixture
def env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    quiet: float = getattr(request, "param", 0.05)  # the debounce window
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    tokens = write_tokens(tmp_path / "tokens.yaml")
    auth = LabTokenAuthenticator(tokens, TD)
    metrics = CollectorRegistry()
    registry = MemoryRegistry(
        Model.of(
            namespaces=[Namespace("demo", {"istio.io/dataplane-mode": "ambient"})],
            pods=pods("a", "b"),
        )
    )
    server = DiscoveryServer(
        registry,
        ca=ca,
        ca_servicer=CaServicer(ca, auth, Authorizer(TD, auth), metrics=CaMetrics(metrics)),
        listen="127.0.0.1:0",
        plaintext_listen="127.0.0.1:0",
        serving_dns_names=["localhost"],
        metrics_registry=metrics,
        quiet=quiet,
    )
    server.start()
    server.wait_for_snapshot(lambda s: s.version >= 1)
    try:
        yield Env(ca, registry, server, metrics, tokens)
    finally:
        server.stop(grace=0)


class Client:
    """A Delta ADS client on its own thread; records events and the state they build.

    It sends ``token`` as its bearer token (as ztunnel does over TLS) and names
    a node in ``namespace``.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        name: str = "zt",
        delta: DeltaClient | None = None,
        reject: Callable[[workload_pb2.Address], bool] | None = None,
        *,
        token: str | None = ZTUNNEL_TOKEN,
        namespace: str = MESH_NS,
    ) -> None:
        def decode(data: bytes) -> workload_pb2.Address:
            address = workload_pb2.Address.FromString(data)
            if reject is not None and reject(address):
                raise ResourceRejected(f"refusing {address.workload.name}")
            return address

        node = build_node(
            ip="10.0.0.9",
            pod=name,
            namespace=namespace,
            node_name="n1",
            cluster_id="Kubernetes",
        )
        self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self.delta = delta or DeltaClient(
            node,
            WORKLOAD_TYPE_URLS,
            decoders={
                A: decode,
                WORKLOAD_TYPE_URLS[1]: DeltaClient(node, WORKLOAD_TYPE_URLS)._decoders[
                    WORKLOAD_TYPE_URLS[1]
                ],
            },
        )
        self.channel = channel
        self.events: list[ClientEvent] = []
        self.state: dict[str, workload_pb2.Address] = {}
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.stream: DeltaStream | None = None
        self.thread: threading.Thread | None = None

    def on_event(self, event: ClientEvent) -> None:
        with self.cond:
            self.events.append(event)
            if isinstance(event, ResourcesReceived) and event.type_url == A:
                for r in event.updated:
                    assert isinstance(r.message, workload_pb2.Address)
                    self.state[r.name] = r.message
                for name in event.removed:
                    self.state.pop(name, None)
            self.cond.notify_all()

    def start(self) -> Client:
        self.stream = DeltaStream(self.channel, self.delta, self.on_event, metadata=self.metadata)

        def run() -> None:
            assert self.stream is not None
            try:
                self.stream.run()
            except BaseException as exc:
                self.error = exc
            with self.cond:
                self.cond.notify_all()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.thread is not None:
            self.thread.join(10)
            assert not self.thread.is_alive()

    def wait(self, predicate: Callable[[Client], bool], timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self) or self.error is not None, timeout)
        assert self.error is None, self.error

    def address_events(self) -> list[ResourcesReceived]:
        with self.cond:
            return [e for e in self.events if isinstance(e, ResourcesReceived) and e.type_url == A]


def synced(c: Client) -> bool:
    return c.delta.in_sync()


def test_several_clients_get_the_state_then_the_same_deltas(env: Env) -> None:
    channels = [env.channel() for _ in range(3)] + [env.channel(plaintext=True)]
    # The plaintext client sends no token, as ztunnel does: that port is not authenticated.
    tokens = [ZTUNNEL_TOKEN] * 3 + [None]
    clients = [
        Client(ch, f"zt-{i}", token=token).start()
        for i, (ch, token) in enumerate(zip(channels, tokens, strict=True))
    ]
    try:
        for c in clients:
            c.wait(synced)
            assert set(c.state) == {uid("a"), uid("b")}
        env.registry.upsert(*pods("c"))
        env.registry.delete("pods", ("demo", "a"))
        for c in clients:
            c.wait(lambda c: uid("c") in c.state and uid("a") not in c.state)
            deltas = c.address_events()[1:]
            updated = {r.name for e in deltas for r in e.updated}
            removed = {n for e in deltas for n in e.removed}
            assert updated == {uid("c")} and removed == {uid("a")}  # only the change travels
        assert env.metric("underpass_xds_clients") == 4
        assert env.metric("underpass_xds_pushes_total", type_url="istio.workload.Address") >= 8
    finally:
        for c in clients:
            c.stop()
        for ch in channels:
            ch.close()


def test_a_nack_is_counted_and_the_stream_stays_up(env: Env) -> None:
    with env.channel() as channel:
        client = Client(channel, reject=lambda a: a.workload.name == "evil").start()
        try:
            client.wait(synced)
            env.registry.upsert(*pods("evil"))
            client.wait(lambda c: any(isinstance(e, ResponseRejected) for e in c.events))
            assert uid("evil") not in client.state
            # The stream is still up: the next change arrives on it.
            env.registry.upsert(*pods("good"))
            client.wait(lambda c: uid("good") in c.state)
            assert uid("evil") not in client.state  # the rejected version was not resent
            assert client.stream is not None and client.thread is not None
            assert client.thread.is_alive() and client.error is None
            assert env.metric("underpass_xds_nacks_total", type_url="istio.workload.Address") == 1
        finally:
            client.stop()


def test_reconnect_sends_only_what_changed(env: Env) -> None:
    with env.channel() as channel:
        first = Client(channel).start()
        first.wait(synced)
        first.stop()
        delta = first.delta  # the same client state reconnects, as ztunnel would
        env.registry.update(
            lambda m: m.upsert(*pods("b", content="10.0.0.2"), *pods("new")).delete(
                "pods", ("demo", "a")
            )
        )
        env.server.wait_for_snapshot(lambda s: uid("new") in s.of_type(A))
        second = Client(channel, delta=delta).start()
        try:
            second.wait(synced)
            [initial] = second.address_events()[:1]
            assert initial.first
            assert sorted(r.name for r in initial.updated) == [uid("b"), uid("new")]
            assert initial.removed == (uid("a"),)
            assert set(delta.versions(A)) == {uid("b"), uid("new")}
        finally:
            second.stop()


@pytest.mark.parametrize("env", [0.3], indirect=True)  # a window no scheduler hiccup exceeds
def test_a_burst_of_changes_is_one_push_per_client(env: Env) -> None:
    with env.channel() as channel:
        client = Client(channel).start()
        try:
            client.wait(synced)
            before = env.metric("underpass_discovery_snapshots_total")
            for name in ("p1", "p2", "p3", "p4", "p5"):  # in quick succession
                env.registry.upsert(*pods(name))
            client.wait(lambda c: uid("p5") in c.state)
            env.registry.upsert(*pods("sentinel"))
            client.wait(lambda c: uid("sentinel") in c.state)
            pushes = [sorted(r.name for r in e.updated) for e in client.address_events()[1:]]
            assert pushes == [[uid(f"p{i}") for i in range(1, 6)], [uid("sentinel")]]
            assert env.metric("underpass_discovery_snapshots_total") == before + 2
        finally:
            client.stop()


def test_the_ca_is_served_on_the_tls_port_only(env: Env) -> None:
    identity = SpiffeId(TD, "demo", "sleep")
    key = generate_workload_key()
    with CaClient(
        env.server.tls_address, env.ca.root_bundle_pem, TOKEN, server_name="localhost"
    ) as ca_client:
        chain = ca_client.create_certificate(build_csr(key, identity), dt.timedelta(hours=1))
    assert len(chain) >= 2
    with grpc.insecure_channel(env.server.plaintext_address) as channel:
        method = channel.unary_unary(
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as info:
            method(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_first_request_without_node_ends_the_stream(env: Env) -> None:
    with env.channel(plaintext=True) as channel:
        method = channel.stream_stream(
            DELTA_METHOD_PATH,
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )
        call = method(iter([discovery_pb2.DeltaDiscoveryRequest(type_url=A)]), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "node" in (info.value.details() or "")
    assert env.metric("underpass_xds_protocol_errors_total") == 1


def test_unsupported_policy_fields_are_counted(env: Env) -> None:
    from discovery.model import AuthorizationPolicy, Operation, Rule

    policy = AuthorizationPolicy(
        "demo", "p", rules=(Rule(operations=(Operation(methods=("GET",)),)),)
    )
    env.registry.upsert(policy)
    env.server.wait_for_snapshot(lambda s: "demo/p" in s.of_type(WORKLOAD_TYPE_URLS[1]))
    assert env.metric("underpass_discovery_unsupported_total", reason="http_only_field") == 1
    env.registry.upsert(*pods("unrelated"))  # the same finding is not counted again
    env.server.wait_for_snapshot(lambda s: uid("unrelated") in s.of_type(A))
    assert env.metric("underpass_discovery_unsupported_total", reason="http_only_field") == 1


# -- authentication of xDS clients on the TLS port ------------------------------------------------


def first_request(namespace: str = MESH_NS) -> discovery_pb2.DeltaDiscoveryRequest:
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=A)
    request.node.CopyFrom(
        build_node(ip="10.0.0.9", pod="zt", namespace=namespace, node_name="n1", cluster_id="c")
    )
    return request


def call_refused(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], namespace: str = MESH_NS
) -> grpc.RpcError:
    """Open a Delta ADS call; it must end with an error before any response."""
    method = channel.stream_stream(
        DELTA_METHOD_PATH,
        request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
    )
    call = method(iter([first_request(namespace)]), metadata=metadata, timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        responses = list(call)
        pytest.fail(f"the call was served: {len(responses)} responses")
    return info.value


@pytest.mark.parametrize(
    ("metadata", "reason", "message"),
    [
        ((), "no_token", "needs 'authorization: Bearer <token>'"),
        (
            (("authorization", "Bearer not-a-known-token-0123456789"),),
            "authentication_failed",
            "not in the CA's lab token file",
        ),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "authentication_failed", "Bearer"),
        (
            (("authorization", f"Bearer {ZTUNNEL_TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
            "authentication_failed",
            "repeats 'authorization'",
        ),
    ],
    ids=["no token", "unknown token", "not bearer", "two tokens"],
)
def test_tls_xds_refuses_a_call_without_a_token_the_authenticator_accepts(
    env: Env, metadata: tuple[tuple[str, str], ...], reason: str, message: str
) -> None:
    with structlog.testing.capture_logs() as logs, env.channel() as channel:
        error = call_refused(channel, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in (error.details() or "")
    assert env.metric("underpass_xds_auth_refused_total", reason=reason) == 1
    assert env.metric("underpass_xds_clients") == 0  # never registered as a client
    refusals = [e for e in logs if e["event"] == "xds.auth_refused"]
    assert [e["reason"] for e in refusals] == [reason]
    for _, value in metadata:  # no token (nor header) in the log or the answer
        secret = value.split()[-1]
        assert not any(secret in repr(e) for e in logs)
        assert secret not in (error.details() or "")


def test_tls_xds_serves_a_caller_with_a_good_token(env: Env) -> None:
    with env.channel() as channel:
        client = Client(channel, token=ZTUNNEL_TOKEN).start()
        try:
            client.wait(synced)
            assert set(client.state) == {uid("a"), uid("b")}
        finally:
            client.stop()
    assert env.metric("underpass_xds_auth_refused_total", reason="no_token") == 0


def test_a_node_of_another_namespace_than_the_token_is_refused(env: Env) -> None:
    """The demo/sleep token may not read the mesh as a proxy of istio-system."""
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with env.channel() as channel:
        error = call_refused(channel, metadata, namespace=MESH_NS)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        details = error.details() or ""
        assert "spiffe://cluster.local/ns/demo/sa/sleep" in details and "'istio-system'" in details
        assert env.metric("underpass_xds_auth_refused_total", reason="node_namespace_mismatch") == 1
        # The same token for a node of its own namespace is served.
        client = Client(channel, token=TOKEN, namespace="demo").start()
        try:
            client.wait(synced)
        finally:
            client.stop()


def test_an_unusable_token_file_makes_tls_xds_unavailable_until_fixed(env: Env) -> None:
    env.tokens.chmod(0o644)  # readable by others: the authenticator refuses to use it
    with env.channel() as channel:
        error = call_refused(channel, (("authorization", f"Bearer {ZTUNNEL_TOKEN}"),))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert env.metric("underpass_xds_auth_refused_total", reason="authenticator_unavailable")
        env.tokens.chmod(0o600)
        client = Client(channel).start()
        try:
            client.wait(synced)
        finally:
            client.stop()


def test_tls_is_not_served_without_an_authenticator(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    with pytest.raises(DiscoveryConfigError, match="needs an authenticator"):
        DiscoveryServer(MemoryRegistry(), ca=ca, listen="127.0.0.1:0")
