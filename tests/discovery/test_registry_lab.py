"""The lab registry adapter against a real LabRegistry in a temporary state directory.

Objects are written through the lab registry's own API (no network namespaces);
the adapter's inotify watches deliver models to a recording sink on the
adapter's thread. Every wait is on a condition the sink signals; nothing sleeps.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from discovery.errors import ModelError
from discovery.model import Model, Namespace, Node, Pod, Service, ServicePort
from discovery.registries.errors import RegistryConfigError
from discovery.registries.lab import (
    POLICY_DIR_NAME,
    LabModelRegistry,
    PolicyDirectory,
    model_from_lab,
    parse_policy_documents,
)
from discovery.registries.objects import UNREADABLE_MODE
from discovery.registries.retry import Backoff
from discovery.server import DiscoveryServer
from discovery.translate import TranslateConfig, translate
from identity.ca import build_csr, generate_workload_key
from identity.client import CaClient
from identity.errors import IdentityError
from identity.spiffe import SpiffeId
from tests.discovery.test_server import Client
from underpass.lab import registry as lab
from underpass.proto import workload_pb2
from underpass.xds.grpc_client import CHANNEL_OPTIONS
from underpass.xds.types import ADDRESS_TYPE_URL

pytestmark = pytest.mark.unit

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
TIMEOUT = 10.0


class Recorder:
    """A sink that keeps every model and wakes waiters."""

    def __init__(self) -> None:
        self.models: list[Model] = []
        self.threads: set[str] = set()
        self.cond = threading.Condition()

    def __call__(self, model: Model) -> None:
        with self.cond:
            self.models.append(model)
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[Model], bool], timeout: float = TIMEOUT) -> Model:
        with self.cond:
            ok = self.cond.wait_for(
                lambda: bool(self.models) and predicate(self.models[-1]), timeout
            )
            assert ok, f"no model satisfied the condition; last: {self.models[-1:]}"
            return self.models[-1]

    @property
    def count(self) -> int:
        with self.cond:
            return len(self.models)


def lab_pod(name: str, *, ns: str = "demo", node: str = "node-1", **kw: object) -> lab.Pod:
    fields: dict[str, object] = {
        "namespace": ns,
        "name": name,
        "uid": f"uid-{name}",
        "node": node,
        "ip": "10.244.1.5",
        "service_account": "sleep",
        "labels": {"app": "sleep"},
        "annotations": {},
        "netns": f"/run/netns/t-pod-{ns}.{name}",
        "container_id": "c" * 64,
        "phase": "Running",
    }
    fields.update(kw)
    return lab.Pod(**fields)  # type: ignore[arg-type]


def lab_service(name: str = "sleep", ns: str = "demo", **kw: object) -> lab.Service:
    fields: dict[str, object] = {
        "namespace": ns,
        "name": name,
        "hostname": f"{name}.{ns}.svc.cluster.local",
        "vip": "10.96.0.10",
        "ports": (lab.ServicePort(80, 8080, "TCP", "http"),),
        "selector": {"app": "sleep"},
    }
    fields.update(kw)
    return lab.Service(**fields)  # type: ignore[arg-type]


@pytest.fixture
def state(tmp_path: Path) -> lab.LabRegistry:
    registry = lab.LabRegistry(tmp_path / "state")
    registry.initialize()
    registry.upsert_node(lab.Node("node-1", "172.30.0.11", "10.244.1.0/24", "/run/netns/n1"))
    registry.upsert_namespace(lab.Namespace("demo"))
    return registry


@pytest.fixture
def running(state: lab.LabRegistry) -> Iterator[tuple[LabModelRegistry, Recorder]]:
    adapter = LabModelRegistry(state)
    sink = Recorder()
    adapter.start(sink)
    try:
        yield adapter, sink
    finally:
        adapter.stop()
    assert not any(t.name == "lab-registry" for t in threading.enumerate())


def write_atomic(path: Path, text: str) -> None:
    """As a careful writer applies a file: write a hidden name, rename into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


ALLOW_SLEEP = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: demo}
spec:
  selector: {matchLabels: {app: sleep}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]
    to: [{operation: {ports: ["8080"]}}]
"""

STRICT_AND_WAYPOINT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


# -- the mapping ------------------------------------------------------------------------


def test_a_lab_snapshot_becomes_the_model(state: lab.LabRegistry) -> None:
    state.set_node_labels("node-1", {"topology.kubernetes.io/zone": "z1"})
    state.upsert_pod(lab_pod("sleep-1", annotations={"ambient.istio.io/redirection": "enabled"}))
    state.upsert_pod(lab_pod("starting", ip=None, phase="Pending"))
    state.upsert_service(lab_service())
    state.upsert_service(lab_service("manual", selector={}))
    model = model_from_lab(state.snapshot())
    assert model.namespaces["demo"] == Namespace("demo")
    assert model.nodes["node-1"] == Node("node-1", {"topology.kubernetes.io/zone": "z1"})
    assert model.pods["demo", "sleep-1"] == Pod(
        namespace="demo",
        name="sleep-1",
        node="node-1",
        ips=("10.244.1.5",),
        service_account="sleep",
        labels={"app": "sleep"},
        annotations={"ambient.istio.io/redirection": "enabled"},
        phase="Running",
        ready=True,
        uid="uid-sleep-1",
    )
    starting = model.pods["demo", "starting"]
    assert starting.ips == () and starting.phase == "Pending" and not starting.ready
    assert model.services["demo", "sleep"] == Service(
        namespace="demo",
        name="sleep",
        vips=("10.96.0.10",),
        ports=(ServicePort(80, 8080, "TCP", "http"),),
        selector={"app": "sleep"},
        hostname="sleep.demo.svc.cluster.local",
    )
    assert model.services["demo", "manual"].selector is None  # selects nothing


def test_policy_documents_are_parsed_with_their_kinds() -> None:
    import yaml

    objects = parse_policy_documents(
        yaml.safe_load_all(ALLOW_SLEEP + "---\n" + STRICT_AND_WAYPOINT), "f.yaml"
    )
    kinds = sorted(type(o).__name__ for o in objects)
    assert kinds == ["AuthorizationPolicy", "Gateway", "PeerAuthentication"]
    listed = parse_policy_documents(
        [{"apiVersion": "v1", "kind": "List", "items": list(yaml.safe_load_all(ALLOW_SLEEP))}],
        "list.yaml",
    )
    assert [o.name for o in listed] == ["allow-sleep"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "d"}},
            "v1 Pod",
        ),
        (
            {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "x"}},
            "no metadata.namespace",
        ),
        ({"kind": "AuthorizationPolicy"}, "apiVersion"),
    ],
)  # fmt: skip
def test_a_bad_policy_document_names_the_file_and_document(
    doc: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelError, match=message) as info:
        parse_policy_documents([None, doc], "p.yaml")
    assert "p.yaml, document 2" in str(info.value)


# -- the running adapter ------------------------------------------------------------------


def test_changes_reach_the_sink_event_driven(
    state: lab.LabRegistry, running: tuple[LabModelRegistry, Recorder]
) -> None:
    adapter, sink = running
    first = sink.wait(lambda m: "demo" in m.namespaces)
    assert first.pods == {} and sink.threads == {"lab-registry"}

    state.upsert_pod(lab_pod("sleep-1", phase="Pending", ip=None))
    sink.wait(lambda m: ("demo", "sleep-1") in m.pods)
    state.set_pod_status("demo", "sleep-1", phase="Running", ip="10.244.1.7")
    model = sink.wait(lambda m: m.pods["demo", "sleep-1"].ips == ("10.244.1.7",))
    assert model.pods["demo", "sleep-1"].ready

    # Labelling the namespace switches its workloads to HBONE.
    assert translate(model).workloads["Kubernetes//Pod/demo/sleep-1"].tunnel_protocol == (
        workload_pb2.NONE
    )
    state.set_namespace_labels("demo", AMBIENT)
    model = sink.wait(lambda m: m.namespaces["demo"].labels == AMBIENT)
    assert translate(model).workloads["Kubernetes//Pod/demo/sleep-1"].tunnel_protocol == (
        workload_pb2.HBONE
    )

    state.delete_pod("demo", "sleep-1")
    sink.wait(lambda m: ("demo", "sleep-1") not in m.pods)
    assert adapter.model is sink.models[-1]


def test_a_transaction_is_one_model(
    state: lab.LabRegistry, running: tuple[LabModelRegistry, Recorder]
) -> None:
    _, sink = running
    sink.wait(lambda m: "demo" in m.namespaces)
    before = sink.count
    with state.transaction():
        state.upsert_pod(lab_pod("a"))
        state.upsert_pod(lab_pod("b"))
        state.upsert_service(lab_service())
    sink.wait(lambda m: len(m.pods) == 2 and len(m.services) == 1)
    assert sink.count == before + 1
    # A write that changes nothing the model shows (a lab-only field) delivers nothing new.
    state.update_pod("demo", "a", lambda p: dataclasses.replace(p, container_id="d" * 64))
    state.upsert_pod(lab_pod("c"))
    sink.wait(lambda m: len(m.pods) == 3)
    assert sink.count == before + 2


def test_the_node_index_follows_the_live_pods(
    state: lab.LabRegistry, running: tuple[LabModelRegistry, Recorder]
) -> None:
    adapter, sink = running
    index = adapter.node_index
    sink.wait(lambda m: "demo" in m.namespaces)
    assert index.ready and not index.has_running_pod("node-1", "demo", "sleep")
    state.upsert_pod(lab_pod("sleep-1", phase="Pending", ip=None))
    sink.wait(lambda m: ("demo", "sleep-1") in m.pods)
    assert index.has_running_pod("node-1", "demo", "sleep")  # Pending counts (CNI ADD)
    assert not index.has_running_pod("node-2", "demo", "sleep")
    assert not index.has_running_pod("node-1", "demo", "other")
    state.set_pod_status("demo", "sleep-1", phase="Failed")
    sink.wait(lambda m: m.pods["demo", "sleep-1"].phase == "Failed")
    assert not index.has_running_pod("node-1", "demo", "sleep")


def test_policies_in_the_lab_policy_directory(
    state: lab.LabRegistry, running: tuple[LabModelRegistry, Recorder]
) -> None:
    adapter, sink = running
    sink.wait(lambda m: "demo" in m.namespaces)
    assert adapter.policy_path == state.state_dir / POLICY_DIR_NAME
    directory = adapter.policy_path
    directory.mkdir()  # created after the adapter started: noticed too
    write_atomic(directory / "allow.yaml", ALLOW_SLEEP)
    model = sink.wait(lambda m: ("demo", "allow-sleep") in m.authorization_policies)
    policy = model.authorization_policies["demo", "allow-sleep"]
    assert policy.selector == {"app": "sleep"} and policy.action == "ALLOW"
    assert policy.rules[0].sources[0].principals == ("cluster.local/ns/demo/sa/sleep",)
    assert policy.rules[0].operations[0].ports == ("8080",)

    write_atomic(directory / "mesh.yml", STRICT_AND_WAYPOINT)
    model = sink.wait(lambda m: ("istio-system", "default") in m.peer_authentications)
    assert model.peer_authentications["istio-system", "default"].mode == "STRICT"
    assert model.gateways["demo", "waypoint"].gateway_class == "istio-waypoint"

    # Editing in place (not atomically) is noticed when the writer closes the file. A
    # reload that runs while the file is truncated may see it empty for a moment (why
    # the module docstring says to rename files into place): wait for the end state.
    (directory / "allow.yaml").write_text(ALLOW_SLEEP.replace("action: ALLOW", "action: DENY"))
    sink.wait(
        lambda m: (
            getattr(m.authorization_policies.get(("demo", "allow-sleep")), "action", None) == "DENY"
        )
    )

    # Files that are not policy files are not read.
    write_atomic(directory / "notes.txt", "not yaml: [")
    (directory / ".hidden.yaml").write_text("{")
    assert [p.name for p in PolicyDirectory(directory).files()] == ["allow.yaml", "mesh.yml"]

    # An invalid file changes nothing: its last valid objects stay in force.
    write_atomic(directory / "allow.yaml", "kind: [unclosed")
    write_atomic(directory / "marker.yaml", ALLOW_SLEEP.replace("allow-sleep", "marker"))
    model = sink.wait(lambda m: ("demo", "marker") in m.authorization_policies)
    assert model.authorization_policies["demo", "allow-sleep"].action == "DENY"

    (directory / "allow.yaml").unlink()
    model = sink.wait(lambda m: ("demo", "allow-sleep") not in m.authorization_policies)
    shutil.rmtree(directory)
    model = sink.wait(lambda m: not m.authorization_policies and not m.gateways)
    assert not model.peer_authentications


def test_a_policy_file_given_explicitly(state: lab.LabRegistry, tmp_path: Path) -> None:
    state.upsert_pod(lab_pod("sleep-1"))
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(STRICT_AND_WAYPOINT.replace("STRICT", "SOMETIMES"))
    adapter = LabModelRegistry(state.state_dir, policies=policy_file)
    sink = Recorder()
    adapter.start(sink)
    try:
        model = sink.wait(lambda m: bool(m.peer_authentications))
        # As written; translation enforces an unknown mode as STRICT and reports it.
        assert model.peer_authentications["istio-system", "default"].mode == "SOMETIMES"
        write_atomic(policy_file, STRICT_AND_WAYPOINT.replace("mode: STRICT", "mode: 7"))
        model = sink.wait(
            lambda m: m.peer_authentications["istio-system", "default"].mode == UNREADABLE_MODE
        )
        assert any(f.field == "mtls.mode" for f in translate(model).findings)
    finally:
        adapter.stop()


def test_the_lab_going_away_and_coming_back(tmp_path: Path) -> None:
    state = lab.LabRegistry(tmp_path / "state")
    state.initialize()
    adapter = LabModelRegistry(state, backoff=Backoff(initial=0.01, maximum=0.05))
    sink = Recorder()
    adapter.start(sink)
    try:
        sink.wait(lambda m: m.namespaces == {})
        state.upsert_namespace(lab.Namespace("one"))
        sink.wait(lambda m: "one" in m.namespaces)
        shutil.rmtree(state.state_dir)  # `underpass lab down`
        state.initialize()  # `underpass lab up` again, same place
        state.upsert_namespace(lab.Namespace("two"))
        model = sink.wait(lambda m: "two" in m.namespaces)
        assert "one" not in model.namespaces
    finally:
        adapter.stop()


def test_start_refuses_a_missing_lab(tmp_path: Path) -> None:
    adapter = LabModelRegistry(tmp_path / "nothing")
    with pytest.raises(RegistryConfigError, match="underpass lab up"):
        adapter.start(Recorder())
    state = lab.LabRegistry(tmp_path / "state")
    state.initialize()
    adapter = LabModelRegistry(state, policies=tmp_path / "no" / "such" / "dir")
    with pytest.raises(RegistryConfigError, match="--lab-policies"):
        adapter.start(Recorder())
    adapter.stop()  # never started: nothing to do


def test_stop_right_after_start(state: lab.LabRegistry) -> None:
    for _ in range(3):
        adapter = LabModelRegistry(state)
        adapter.start(Recorder())
        adapter.stop()
        adapter.stop()
    assert not any(t.name == "lab-registry" for t in threading.enumerate())


def test_the_discovery_server_serves_the_lab(state: lab.LabRegistry) -> None:
    """The adapter inside the real control plane: lab writes become xDS snapshots."""
    state.set_namespace_labels("demo", AMBIENT)
    state.upsert_pod(lab_pod("sleep-1"))
    state.upsert_service(lab_service())
    server = DiscoveryServer(
        LabModelRegistry(state),
        config=TranslateConfig(),
        listen=None,
        plaintext_listen="127.0.0.1:0",
        quiet=0.01,
    )
    server.start()
    try:
        uid = "Kubernetes//Pod/demo/sleep-1"
        snapshot = server.wait_for_snapshot(lambda s: uid in s.of_type(ADDRESS_TYPE_URL))
        resource = snapshot.of_type(ADDRESS_TYPE_URL)[uid].to_message()
        address = workload_pb2.Address.FromString(resource.resource.value)
        assert address.workload.tunnel_protocol == workload_pb2.HBONE
        assert "demo/sleep.demo.svc.cluster.local" in address.workload.services
        state.delete_pod("demo", "sleep-1")
        server.wait_for_snapshot(lambda s: uid not in s.of_type(ADDRESS_TYPE_URL))
    finally:
        server.stop(grace=0)


# -- the command ------------------------------------------------------------------------------

ZTUNNEL_TOKEN = "ztunnel-node-1-token-0123456789abcdef"


def serve_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "underpass.cli.main",
        "--log-format",
        "json",
        "discovery",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--serving-dns",
        "localhost",
        "--state-dir",
        str(tmp_path / "ca"),
        "--metrics-port",
        "-1",
        *extra,
    ]


def test_discovery_serve_with_the_lab_registry(state: lab.LabRegistry, tmp_path: Path) -> None:
    """``--registry lab``: the lab's workloads over xDS, and the CA checks impersonation
    against the lab's pods (the token file only authenticates)."""
    state.set_namespace_labels("demo", AMBIENT)
    state.upsert_pod(lab_pod("sleep-1", node="node-1"))
    state.upsert_pod(lab_pod("db-1", node="node-2", service_account="db"))
    tokens = tmp_path / "tokens.yaml"
    fd = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f"- {{token: {ZTUNNEL_TOKEN}, namespace: istio-system, service_account: ztunnel, "
            "pod: ztunnel-1, node: node-1}\n"
        )
    proc = subprocess.Popen(
        serve_argv(
            tmp_path,
            "--registry", "lab", "--lab-state-dir", str(state.state_dir),
            "--lab-tokens", str(tokens), "--debounce", "0.02",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready: tls="), ready
        fields = dict(part.split("=", 1) for part in ready.split()[1:])
        assert (fields["ca"], fields["registry"]) == ("on", "lab")
        root = (tmp_path / "ca" / "ca-cert.pem").read_text()
        with grpc.secure_channel(
            fields["tls"],
            grpc.ssl_channel_credentials(root.encode()),
            options=[("grpc.ssl_target_name_override", "localhost"), *CHANNEL_OPTIONS],
        ) as channel:
            mesh = Client(channel, token=ZTUNNEL_TOKEN).start()
            try:
                uid = "Kubernetes//Pod/demo/sleep-1"
                mesh.wait(lambda c: uid in c.state)
                assert mesh.state[uid].workload.tunnel_protocol == workload_pb2.HBONE
            finally:
                mesh.stop()

        def issue(service_account: str) -> list[str]:
            identity = SpiffeId("cluster.local", "demo", service_account)
            csr = build_csr(generate_workload_key(), identity)
            with CaClient(fields["tls"], root, ZTUNNEL_TOKEN, server_name="localhost") as ca:
                return ca.create_certificate(csr, dt.timedelta(hours=1), impersonate=identity)

        assert len(issue("sleep")) >= 2  # a sleep pod runs on the ztunnel's node
        with pytest.raises(IdentityError, match="node-1"):
            issue("db")  # the db pod runs on node-2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--registry", "lab", "--model", "m.yaml"], "--model is for --registry model"),
        (["--lab-policies", "p"], "--lab-policies are for --registry lab"),
        (["--registry", "lab", "--lab-state-dir", "/nonexistent/lab"], "underpass lab up"),
        (["--registry", "lab", "--lab-state-dir", "STATE"], "--lab-tokens"),
    ],
)
def test_discovery_serve_refuses_contradictions(
    state: lab.LabRegistry, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [str(state.state_dir) if a == "STATE" else a for a in args]
    result = subprocess.run(
        serve_argv(tmp_path, *args), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
