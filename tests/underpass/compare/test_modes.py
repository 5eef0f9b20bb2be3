"""Deployment modes: who talks to whom, sidecar plans, the mode registry, ztunnel metrics (unit)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from underpass.compare import catalog
from underpass.compare.errors import CompareError
from underpass.compare.modes import (
    MODES,
    SIDECAR_INBOUND_PORT,
    SIDECAR_OUTBOUND_BASE,
    NodeMode,
    SidecarEnvoyMode,
    Workload,
    identity_of,
    mtls_inbound_connections,
    plan_pairs,
    resolve_modes,
    sidecar_specs,
)
from underpass.lab.registry import Node, Pod

pytestmark = pytest.mark.unit


def pod(node: int, index: int, sa: str = "sa-1") -> Pod:
    return Pod(
        namespace="compare",
        name=f"echo-{node}-{index}",
        uid=f"uid-{node}-{index}",
        node=f"node-{node}",
        ip=f"10.244.{node}.{index + 1}",
        service_account=sa,
        netns=f"/run/netns/t-pod-compare.echo-{node}-{index}",
        phase="Running",
    )


def layout(nodes: int, per_node: int) -> dict[str, list[Pod]]:
    return {
        f"node-{n}": [pod(n, i, f"sa-{i % 2 + 1}") for i in range(1, per_node + 1)]
        for n in range(1, nodes + 1)
    }


def workload(nodes: int, per_node: int) -> Workload:
    by_node = layout(nodes, per_node)
    pods = tuple(p for n in sorted(by_node) for p in by_node[n])
    node_objs = tuple(
        Node(f"node-{n}", f"172.30.0.{10 + n}", f"10.244.{n}.0/24", f"/run/netns/t-node-{n}")
        for n in range(1, nodes + 1)
    )
    return Workload("compare", node_objs, pods, tuple(plan_pairs(by_node)))


@pytest.mark.parametrize(("nodes", "per_node"), [(2, 2), (2, 20), (3, 5)])
def test_every_pod_is_client_once_and_server_once_across_nodes(nodes: int, per_node: int) -> None:
    pairs = plan_pairs(layout(nodes, per_node))
    assert len(pairs) == nodes * per_node
    assert Counter(p.client.key for p in pairs) == Counter(p.server.key for p in pairs)
    assert all(v == 1 for v in Counter(p.client.key for p in pairs).values())
    assert all(p.client.node != p.server.node for p in pairs)
    # pod j talks to pod j of the next node, also past nine pods (sorted by name)
    by_client = {p.client.name: p.server.name for p in pairs}
    assert by_client["echo-1-1"] == "echo-2-1"
    assert by_client[f"echo-{nodes}-{per_node}"] == f"echo-1-{per_node}"


def test_one_node_pairs_pods_in_a_ring() -> None:
    pairs = plan_pairs(layout(1, 3))
    assert [(p.client.name, p.server.name) for p in pairs] == [
        ("echo-1-1", "echo-1-2"),
        ("echo-1-2", "echo-1-3"),
        ("echo-1-3", "echo-1-1"),
    ]


def test_plans_that_cannot_work_are_refused() -> None:
    with pytest.raises(CompareError, match="at least two pods"):
        plan_pairs(layout(1, 1))
    uneven = layout(2, 2)
    uneven["node-2"].pop()
    with pytest.raises(CompareError, match="different pod counts"):
        plan_pairs(uneven)
    with pytest.raises(CompareError):
        plan_pairs({})


def test_sidecar_specs_follow_the_pairs(tmp_path: Path) -> None:
    load = workload(2, 3)
    specs = sidecar_specs(load, tmp_path)
    assert set(specs) == {f"compare/{p.name}" for p in load.pods}
    for pair in load.pairs:
        client = specs[f"compare/{pair.client.name}"]
        server = specs[f"compare/{pair.server.name}"]
        (dest,) = client.destinations
        assert (dest.ip, dest.port, dest.identity) == (
            pair.server.ip,
            SIDECAR_INBOUND_PORT,
            identity_of(pair.server),
        )
        assert dest.outbound_port == SIDECAR_OUTBOUND_BASE
        assert server.callers == (identity_of(pair.client),)
        assert server.pod_ip == pair.server.ip and server.inbound_port == SIDECAR_INBOUND_PORT
    directories = {s.files.chain.parent for s in specs.values()}
    assert len(directories) == len(specs)  # a directory (and key) per pod
    assert all(s.admin_socket.parent == s.files.key.parent for s in specs.values())


def test_urls_captured_modes_go_to_the_pod_sidecars_to_their_own_listener(tmp_path: Path) -> None:
    load = workload(2, 2)
    pair = load.pairs[0]
    assert NodeMode().url(None, pair) == f"http://{pair.server.ip}:8080/echo"  # type: ignore[arg-type]
    sidecars = SidecarEnvoyMode()
    from underpass.compare.modes import _Sidecar

    sidecars.sidecars = {
        key: _Sidecar(next(p for p in load.pods if f"compare/{p.name}" == key), spec)
        for key, spec in sidecar_specs(load, tmp_path).items()
    }
    url = sidecars.url(None, pair)  # type: ignore[arg-type]
    assert url == f"http://127.0.0.1:{SIDECAR_OUTBOUND_BASE}/echo"


def test_the_catalog_names_the_registered_modes_in_order() -> None:
    assert tuple(MODES) == catalog.AVAILABLE
    assert set(catalog.DEFAULT_MODES) <= set(MODES)
    assert catalog.BASELINE in MODES
    assert not set(catalog.PLANNED) & set(MODES)
    # without --modes, every deployment mode of issue 6 runs
    names = {name: MODES[name]().issue_mode for name in catalog.DEFAULT_MODES}
    assert set(names.values()) == {"1a", "1b", "2", "3", "4"}
    assert {m.name for m in (f() for f in MODES.values())} == set(MODES)


def test_a_planned_mode_is_named_as_not_available_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(catalog.PLANNED, "l7-waypoint", "4b, the waypoint as an L7 proxy")
    with pytest.raises(CompareError, match=r"issue 6 mode 4b.*not available yet"):
        resolve_modes(["l7-waypoint"])


def test_resolve_modes() -> None:
    modes = resolve_modes(["sidecar-envoy", "node", "sidecar-envoy-default"])
    assert [m.name for m in modes] == ["sidecar-envoy", "node", "sidecar-envoy-default"]
    assert isinstance(modes[2], SidecarEnvoyMode) and modes[2].concurrency is None
    assert isinstance(modes[0], SidecarEnvoyMode) and modes[0].concurrency == 1
    issue_modes = [m.issue_mode for m in resolve_modes(list(catalog.AVAILABLE))]
    assert issue_modes == ["2", "3", "4", "1a", "1b", "1b"]
    with pytest.raises(CompareError, match="unknown mode 'nope'"):
        resolve_modes(["nope"])
    with pytest.raises(CompareError, match="named twice"):
        resolve_modes(["node", "node"])
    with pytest.raises(CompareError, match="no modes"):
        resolve_modes([])


def sample(policy: str, namespace: str, reporter: str, value: float, extra: str = "") -> str:
    labels = (
        f'connection_security_policy="{policy}",destination_workload_namespace="{namespace}",'
        f'reporter="{reporter}"{extra}'
    )
    return f"istio_tcp_connections_opened_total{{{labels}}} {value}\n"


METRICS = (
    "# HELP istio_tcp_connections_opened_total The total number of TCP connections opened.\n"
    "# TYPE istio_tcp_connections_opened_total counter\n"
    + sample("mutual_tls", "compare", "destination", 3.0)
    + sample("mutual_tls", "compare", "source", 7.0)
    + sample("none", "compare", "destination", 5.0)
    + sample("mutual_tls", "other", "destination", 11.0)
    + sample("mutual_tls", "compare", "destination", 2.0, ',source_workload="b"')
)


def test_mtls_inbound_connections_count_only_hbone_into_the_namespace() -> None:
    assert mtls_inbound_connections(METRICS, "compare") == 5
    assert mtls_inbound_connections(METRICS, "other") == 11
    assert mtls_inbound_connections("", "compare") == 0
