"""Unit tests of the lab registry: model, on-disk format, locking, watch."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from underpass.lab.registry import (
    REDIRECTION_ANNOTATION,
    FrozenMap,
    InvalidObject,
    LabRegistry,
    LabStateError,
    Namespace,
    Node,
    ObjectNotFound,
    Pod,
    Service,
    ServicePort,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]


def make_pod(name: str = "a", **kw: object) -> Pod:
    fields: dict[str, object] = {
        "namespace": "default",
        "name": name,
        "uid": f"uid-{name}",
        "node": "node-1",
        "ip": None,
        "service_account": "default",
        "labels": {"app": "echo"},
        "annotations": {},
        "netns": f"/run/netns/x-pod-default.{name}",
        "container_id": "c" * 64,
        "phase": "Pending",
    }
    fields.update(kw)
    return Pod(**fields)  # type: ignore[arg-type]


@pytest.fixture
def reg(tmp_path: Path) -> LabRegistry:
    registry = LabRegistry(tmp_path / "state")
    registry.initialize()
    return registry


def test_roundtrip_every_kind(reg: LabRegistry) -> None:
    node = Node("node-1", "172.30.0.11", "10.244.1.0/24", "/run/netns/x-node-1", {"k": "v"})
    ns = Namespace("default", {"istio.io/dataplane-mode": "ambient"})
    pod = make_pod(
        ip="10.244.1.2", phase="Running", annotations={REDIRECTION_ANNOTATION: "enabled"}
    )
    svc = Service(
        "default",
        "echo",
        "echo.default.svc.cluster.local",
        "10.96.0.10",
        (ServicePort(80, 8080, "TCP", "http"),),
        {"app": "echo"},
    )
    assert reg.upsert_node(node) and reg.upsert_namespace(ns)
    assert reg.upsert_pod(pod) and reg.upsert_service(svc)
    assert reg.node("node-1") == node
    assert reg.namespace("default") == ns
    assert reg.pod("default", "a") == pod
    assert reg.pod_by_uid("uid-a") == pod
    assert reg.service("default", "echo") == svc
    assert reg.pod("default", "missing") is None
    loaded = reg.pod("default", "a")
    assert loaded is not None and loaded.enrolled
    assert loaded.labels == {"app": "echo"}  # FrozenMap compares equal to a dict
    assert hash(loaded) == hash(pod)  # objects are hashable (labels are FrozenMaps)
    snap = reg.snapshot()
    assert snap.nodes == {"node-1": node}
    assert snap.pods[("default", "a")] == pod
    assert snap.pods_on_node("node-1") == [pod]
    assert snap.pods_on_node("node-2") == []
    assert snap.endpoints(svc) == [pod]
    assert snap.pod_by_ip("10.244.1.2") == pod


def test_upsert_unchanged_does_not_bump_generation(reg: LabRegistry) -> None:
    pod = make_pod()
    assert reg.upsert_pod(pod)
    gen = reg.generation
    assert not reg.upsert_pod(make_pod())
    assert reg.generation == gen
    assert reg.upsert_pod(make_pod(service_account="other"))
    assert reg.generation == gen + 1


def test_transaction_bumps_generation_once(reg: LabRegistry) -> None:
    gen = reg.generation
    with reg.transaction():
        for i in range(5):
            reg.upsert_pod(make_pod(f"p{i}"))
    assert reg.generation == gen + 1
    assert len(reg.snapshot().pods) == 5


def test_annotations_and_status_do_not_clobber_each_other(reg: LabRegistry) -> None:
    reg.upsert_pod(make_pod())
    reg.set_pod_annotations("uid-a", {REDIRECTION_ANNOTATION: "enabled", "x": "1"})
    pod = reg.set_pod_status("default", "a", phase="Running", ip="10.244.1.2")
    assert pod.annotations == {REDIRECTION_ANNOTATION: "enabled", "x": "1"}
    assert (pod.phase, pod.ip) == ("Running", "10.244.1.2")
    pod = reg.set_pod_annotations("uid-a", {"x": None, "absent": None})
    assert pod.annotations == {REDIRECTION_ANNOTATION: "enabled"}
    with pytest.raises(ObjectNotFound):
        reg.set_pod_annotations("no-such-uid", {"x": "1"})


def test_namespace_labels_like_kubectl(reg: LabRegistry) -> None:
    reg.upsert_namespace(Namespace("demo"))
    ns = reg.set_namespace_labels("demo", {"istio.io/dataplane-mode": "ambient"})
    assert ns.labels == {"istio.io/dataplane-mode": "ambient"}
    ns = reg.set_namespace_labels("demo", {"istio.io/dataplane-mode": None})
    assert ns.labels == {}
    with pytest.raises(ObjectNotFound):
        reg.set_namespace_labels("nope", {"a": "b"})


def test_delete(reg: LabRegistry) -> None:
    reg.upsert_pod(make_pod())
    assert reg.delete_pod("default", "a")
    assert not reg.delete_pod("default", "a")
    assert reg.pod("default", "a") is None


def test_has_running_pod_is_the_ca_node_index(reg: LabRegistry) -> None:
    reg.upsert_pod(make_pod("p1", service_account="sa1", phase="Pending"))
    reg.upsert_pod(make_pod("p2", service_account="sa2", phase="Running"))
    reg.upsert_pod(make_pod("p3", service_account="sa3", phase="Failed"))
    assert reg.has_running_pod("node-1", "default", "sa1")  # Pending: CNI ADD in progress
    assert reg.has_running_pod("node-1", "default", "sa2")
    assert not reg.has_running_pod("node-1", "default", "sa3")
    assert not reg.has_running_pod("node-2", "default", "sa2")
    assert not reg.has_running_pod("node-1", "other", "sa2")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: make_pod(name="Bad_Name"), "invalid pod name"),
        (lambda: make_pod(namespace="a.b"), "invalid namespace name"),
        (lambda: make_pod(phase="Dancing"), "invalid pod phase"),
        (lambda: make_pod(labels={"bad key!": "v"}), "invalid label key"),
        (lambda: make_pod(labels={"k": "-bad"}), "invalid value"),
        (lambda: Namespace("../etc"), "invalid namespace name"),
        (lambda: Node("node/1", "1.2.3.4", "10.0.0.0/24", "/x"), "invalid node name"),
    ],
)
def test_invalid_objects_are_rejected(factory: object, message: str) -> None:
    with pytest.raises(InvalidObject, match=message):
        factory()  # type: ignore[operator]


def test_frozen_map() -> None:
    m = FrozenMap({"a": "1"})
    assert m == {"a": "1"} and hash(m) == hash(FrozenMap({"a": "1"}))
    assert m.updated({"b": "2", "a": None}) == {"b": "2"}
    assert m == {"a": "1"}  # unchanged
    with pytest.raises(TypeError):
        m["a"] = "2"  # type: ignore[index]


def test_missing_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    reg = LabRegistry(tmp_path / "nothing")
    with pytest.raises(LabStateError, match="run `underpass lab up`"):
        reg.snapshot()
    with pytest.raises(LabStateError):
        reg.upsert_namespace(Namespace("x"))
    assert not (tmp_path / "nothing").exists()  # readers and writers never create it


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"apiVersion": "underpass.dev/lab/v1", "kind": "Node", "name": "a"}', "expected"),
        ('{"apiVersion": "underpass.dev/lab/v1", "kind": "Pod", "name": "a"}', "missing field"),
    ],
)
def test_corrupt_object_file_is_a_clear_error(reg: LabRegistry, content: str, message: str) -> None:
    reg.upsert_pod(make_pod())
    path = reg.paths.objects / "pods" / "default.a.json"
    path.write_text(content)
    with pytest.raises(LabStateError, match=message) as info:
        reg.snapshot()
    assert str(path) in str(info.value)


def test_object_in_the_wrong_file_is_detected(reg: LabRegistry) -> None:
    reg.upsert_pod(make_pod())
    src = reg.paths.objects / "pods" / "default.a.json"
    shutil.copy(src, src.with_name("default.b.json"))
    with pytest.raises(LabStateError, match="not its file name"):
        reg.snapshot()


def test_wrong_field_type_and_corrupt_generation(reg: LabRegistry) -> None:
    reg.upsert_pod(make_pod())
    path = reg.paths.objects / "pods" / "default.a.json"
    doc = json.loads(path.read_text())
    doc["labels"] = {"a": 1}
    path.write_text(json.dumps(doc))
    with pytest.raises(LabStateError, match="labels"):
        reg.pod("default", "a")
    (reg.state_dir / "generation").write_text("banana")
    with pytest.raises(LabStateError, match="generation"):
        reg.snapshot()


def test_temporary_files_are_ignored(reg: LabRegistry) -> None:
    reg.upsert_pod(make_pod())
    (reg.paths.objects / "pods" / ".default.b.json.1.2.tmp").write_text("{partial")
    assert list(reg.snapshot().pods) == [("default", "a")]


def test_initialize_reports_created_dirs(tmp_path: Path) -> None:
    reg = LabRegistry(tmp_path / "x" / "y" / "state")
    created = reg.initialize()
    assert created == [tmp_path / "x", tmp_path / "x" / "y", tmp_path / "x" / "y" / "state"]
    assert reg.initialize() == []


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from underpass.lab.registry import LabRegistry
    reg = LabRegistry(Path(sys.argv[1]))
    who, n = sys.argv[2], int(sys.argv[3])
    for i in range(n):
        if who == "agent":
            reg.set_pod_annotations("uid-a", {f"agent/k{i}": str(i)})
        elif who == "cli":
            reg.set_namespace_labels("default", {f"cli{i}": str(i)})
        else:
            reg.set_pod_status("default", "a", phase="Running", ip=f"10.244.1.{i % 200 + 2}")
            reg.set_pod_labels("default", "a", {f"lbl{i}": "x"})
    """
)


def test_concurrent_writers_lose_nothing(reg: LabRegistry) -> None:
    reg.upsert_pod(make_pod())
    reg.upsert_namespace(Namespace("default"))
    n = 150
    gen0 = reg.generation
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(reg.state_dir), who, str(n)], cwd=ROOT)
        for who in ("agent", "cli", "status")
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    pod = reg.pod("default", "a")
    ns = reg.namespace("default")
    assert pod is not None and ns is not None
    assert {k for k in pod.annotations if k.startswith("agent/")} == {
        f"agent/k{i}" for i in range(n)
    }
    assert {k for k in pod.labels if k.startswith("lbl")} == {f"lbl{i}" for i in range(n)}
    assert set(ns.labels) == {f"cli{i}" for i in range(n)}
    assert pod.phase == "Running"
    # one generation per write transaction, none lost either
    assert reg.generation == gen0 + 4 * n


async def test_watch_is_event_driven(reg: LabRegistry) -> None:
    reg.upsert_namespace(Namespace("default"))
    seen: list[int] = []
    async with trio.open_nursery() as nursery:
        send, recv = trio.open_memory_channel[object](100)

        async def consume() -> None:
            async for snap in reg.watch():
                seen.append(snap.generation)
                await send.send(snap)

        nursery.start_soon(consume)
        first = await recv.receive()
        assert first.namespaces["default"].labels == {}  # type: ignore[attr-defined]
        # nothing changes: nothing arrives (no timer-driven polling)
        with trio.move_on_after(0.3) as idle:
            await recv.receive()
        assert idle.cancelled_caught
        reg.set_namespace_labels("default", {"istio.io/dataplane-mode": "ambient"})
        with trio.fail_after(5):
            snap = await recv.receive()
        assert snap.namespaces["default"].labels == {  # type: ignore[attr-defined]
            "istio.io/dataplane-mode": "ambient"
        }
        # a burst of changes coalesces: the consumer never sees a stale state at the end
        with reg.transaction():
            reg.upsert_pod(make_pod("p1"))
            reg.upsert_pod(make_pod("p2"))
        with trio.fail_after(5):
            snap = await recv.receive()
        assert set(snap.pods) == {("default", "p1"), ("default", "p2")}  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()
    assert seen == sorted(set(seen))


async def test_watch_ends_loudly_when_the_lab_goes_away(reg: LabRegistry) -> None:
    with trio.fail_after(5):
        agen = reg.watch()
        await agen.__anext__()
        shutil.rmtree(reg.state_dir)
        with pytest.raises(LabStateError):
            await agen.__anext__()
        await agen.aclose()


def test_update_pod_rejects_rename(reg: LabRegistry) -> None:
    reg.upsert_pod(make_pod())
    with pytest.raises(InvalidObject):
        reg.update_pod("default", "a", lambda p: dataclasses.replace(p, name="b"))


def test_files_are_written_by_rename(reg: LabRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    replaced: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        replaced.append((os.path.basename(src), os.path.basename(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    reg.upsert_pod(make_pod())
    assert [d for _, d in replaced] == ["default.a.json", "generation"]
    assert all(s.startswith(".") and s.endswith(".tmp") for s, _ in replaced)


def test_a_lab_made_before_node_agents_reads_its_chain_setting(reg: LabRegistry) -> None:
    from underpass.lab.registry import LabConfig, encode_config

    config = LabConfig("t", "172.30.0.0/24", "10.244.0.0/16", "10.96.0.0/16", "/f", "172.30.0.1")
    assert config.mesh is True
    doc = encode_config(config)
    del doc["mesh"]
    for old, mesh in ((True, True), (False, False)):
        reg.paths.lab_file.write_text(json.dumps({**doc, "underpass_cni": old}))
        loaded = reg.config()
        assert loaded is not None and loaded.mesh is mesh


async def test_until_waits_for_the_change_it_is_told_about(reg: LabRegistry) -> None:
    reg.upsert_namespace(Namespace("ns"))

    async def label_later() -> None:
        await trio.to_thread.run_sync(reg.set_namespace_labels, "ns", {"a": "1"})
        await trio.to_thread.run_sync(reg.set_namespace_labels, "ns", {"b": "2"})

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(label_later)
            snap = await reg.until(lambda s: "b" in s.namespaces["ns"].labels)
    assert dict(snap.namespaces["ns"].labels) == {"a": "1", "b": "2"}
