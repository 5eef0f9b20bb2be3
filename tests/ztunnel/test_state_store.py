"""StateStore: one writer, consistent snapshots, indexes, destination resolution."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ztunnel.builders import policy, service, workload
from ztunnel.errors import InvalidBatch, WriterAlreadyClaimed
from ztunnel.state import (
    Batch,
    HealthPolicy,
    LoadBalancing,
    RandomChooser,
    RoundRobinChooser,
    Scope,
    Service,
    StateStore,
    Workload,
    first_endpoint,
)

pytestmark = pytest.mark.unit

WEB = "shop/web.shop.svc.cluster.local"


def web_service(**kw: object) -> Service:
    return service(
        "web.shop.svc.cluster.local",
        "shop",
        vips=["10.96.0.20", "fd00:96::20"],
        ports=[(80, 8080), (9090, 0)],
        **kw,  # type: ignore[arg-type]
    )


def web_pod(name: str, ip: str, *, healthy: bool = True, target_9090: int = 0) -> Workload:
    ports = [(80, 0)] + ([(9090, target_9090)] if target_9090 else [])
    return workload(name, "shop", ips=[ip], services={WEB: ports}, healthy=healthy)


def store_with(*items: Workload | Service) -> StateStore:
    store = StateStore(choose=first_endpoint)
    store.claim_writer("test").apply(
        Batch(
            workloads=tuple(i for i in items if isinstance(i, Workload)),
            services=tuple(i for i in items if isinstance(i, Service)),
        )
    )
    return store


# -- snapshots ---------------------------------------------------------------------------


def test_a_held_snapshot_never_changes() -> None:
    store = StateStore(choose=first_endpoint)
    writer = store.claim_writer("test")
    writer.apply(Batch(workloads=(web_pod("a", "10.0.0.1"),), services=(web_service(),)))
    before = store.snapshot
    writer.apply(
        Batch(
            workloads=(web_pod("b", "10.0.0.2"), web_pod("a", "10.0.0.9")),
            removed_addresses=(WEB,),
        )
    )
    after = store.snapshot
    assert after is not before and after.version == before.version + 1
    # The old snapshot still answers as before, for every index.
    assert set(before.workloads) == {"c1//Pod/shop/a"}
    assert before.workload_by_ip("10.0.0.1") is not None
    assert before.workload_by_ip("10.0.0.9") is None
    assert before.service_by_vip("10.96.0.20") is not None
    assert [w.name for w in before.endpoints(WEB)] == ["a"]
    # The new one has the whole batch.
    assert set(after.workloads) == {"c1//Pod/shop/a", "c1//Pod/shop/b"}
    assert after.workload_by_ip("10.0.0.1") is None
    assert after.workload_by_ip("10.0.0.9") is not None
    assert after.service_by_vip("10.96.0.20") is None
    assert [w.name for w in after.endpoints(WEB)] == ["a", "b"]


def test_snapshot_views_are_read_only() -> None:
    snap = store_with(web_pod("a", "10.0.0.1")).snapshot
    with pytest.raises(TypeError):
        snap.workloads["x"] = web_pod("x", "10.0.0.2")  # type: ignore[index]


def test_removals_by_resource_name() -> None:
    store = store_with(web_pod("a", "10.0.0.1"), web_pod("b", "10.0.0.2"), web_service())
    writer = store._writer
    assert writer is not None
    writer.apply(Batch(policies=(policy("p", "shop"),)))
    writer.apply(
        Batch(
            removed_addresses=("c1//Pod/shop/a", "no/such-thing"),
            removed_policies=("shop/p", "shop/unknown"),
        )
    )
    snap = store.snapshot
    assert set(snap.workloads) == {"c1//Pod/shop/b"}
    assert snap.workload_by_ip("10.0.0.1") is None
    assert [w.name for w in snap.endpoints(WEB)] == ["b"]
    assert snap.policies == {}
    writer.apply(Batch(removed_addresses=(WEB, "c1//Pod/shop/b")))
    snap = store.snapshot
    assert snap.services == {} and snap.workloads == {}
    assert snap.endpoints(WEB) == () and snap.service_by_vip("10.96.0.20") is None


def test_update_moves_a_workload_between_indexes() -> None:
    store = store_with(web_pod("a", "10.0.0.1"))
    moved = workload("a", "shop", ips=["10.0.0.5"], services={"shop/other": [(1, 1)]})
    assert store._writer is not None
    snap = store._writer.apply(Batch(workloads=(moved,)))
    assert snap.workload_by_ip("10.0.0.1") is None
    assert snap.workload_by_ip("10.0.0.5") == moved
    assert snap.endpoints(WEB) == ()
    assert snap.endpoints("shop/other") == (moved,)


def test_ip_index_by_network_and_shared_ips() -> None:
    pod = workload("pod", "a", ips=["10.0.0.1"], network="n1")
    host_a = workload("host-a", "a", ips=["172.30.0.11"], host_network=True)
    host_b = workload("host-b", "a", ips=["172.30.0.11"], host_network=True)
    pod_same_ip = workload("pod-x", "a", ips=["172.30.0.11"])
    store = StateStore(network="n1")
    writer = store.claim_writer("test")
    writer.apply(Batch(workloads=(pod, host_b, host_a)))
    snap = store.snapshot
    assert snap.workload_by_ip("10.0.0.1") == pod  # this node's network by default
    assert snap.workload_by_ip("10.0.0.1", network="") is None
    assert snap.workload_by_ip(ipaddress.ip_address("::ffff:10.0.0.1")) == pod
    assert snap.workload_by_ip(ipaddress.ip_address("10.0.0.1").packed) == pod
    assert snap.workload_by_ip("172.30.0.11", network="") == host_a  # lowest uid
    assert snap.workloads_by_ip("172.30.0.11", network="") == (host_a, host_b)
    snap = writer.apply(Batch(workloads=(pod_same_ip,)))
    assert snap.workload_by_ip("172.30.0.11", network="") == pod_same_ip  # pod network wins
    snap = writer.apply(Batch(removed_addresses=(pod_same_ip.uid, host_a.uid)))
    assert snap.workloads_by_ip("172.30.0.11", network="") == (host_b,)


def test_service_lookups() -> None:
    snap = store_with(web_service()).snapshot
    svc = snap.service(WEB)
    assert svc is not None
    assert snap.service_by_host("shop", "web.shop.svc.cluster.local") is svc
    assert snap.service_by_vip("10.96.0.20") is svc
    assert snap.service_by_vip("fd00:96::20", 80) is svc
    assert snap.service_by_vip("10.96.0.20", 81) is None
    assert snap.service_by_vip("10.96.0.21") is None


def test_endpoints_healthy_first() -> None:
    snap = store_with(
        web_pod("c", "10.0.0.3"),
        web_pod("a", "10.0.0.1", healthy=False),
        web_pod("b", "10.0.0.2"),
        web_service(),
    ).snapshot
    assert [w.name for w in snap.endpoints(WEB)] == ["b", "c", "a"]


# -- resolve_destination --------------------------------------------------------------------


def test_resolve_pod_ip() -> None:
    snap = store_with(web_pod("a", "10.0.0.1"), web_service()).snapshot
    dest = snap.resolve_destination("10.0.0.1", 8080)
    assert dest.service is None and dest.workload is not None
    assert (dest.workload.name, dest.port, dest.problem) == ("a", 8080, None)


def test_resolve_vip_maps_service_port_to_target_port() -> None:
    snap = store_with(web_pod("a", "10.0.0.1"), web_service()).snapshot
    dest = snap.resolve_destination("10.96.0.20", 80)
    assert dest.service is not None and dest.service.key == WEB
    assert dest.workload is not None and dest.workload.name == "a"
    assert dest.port == 8080
    assert snap.resolve_destination("fd00:96::20", 80).port == 8080


def test_resolve_vip_endpoint_port_overrides_and_named_ports() -> None:
    # Port 9090 has target 0 in the service (a named port): only endpoints that
    # resolved it themselves can serve it.
    snap = store_with(
        web_pod("a", "10.0.0.1"),
        web_pod("b", "10.0.0.2", target_9090=9999),
        web_service(),
    ).snapshot
    dest = snap.resolve_destination("10.96.0.20", 9090)
    assert dest.workload is not None and (dest.workload.name, dest.port) == ("b", 9999)


def test_resolve_skips_unhealthy_endpoints() -> None:
    snap = store_with(
        web_pod("a", "10.0.0.1", healthy=False),
        web_pod("b", "10.0.0.2"),
        web_service(),
    ).snapshot
    seen = {
        snap.resolve_destination("10.96.0.20", 80, choose=RandomChooser(i)).workload
        for i in range(20)
    }
    assert {w.name for w in seen if w is not None} == {"b"}


def test_resolve_only_unhealthy_endpoints() -> None:
    snap = store_with(web_pod("a", "10.0.0.1", healthy=False), web_service()).snapshot
    dest = snap.resolve_destination("10.96.0.20", 80)
    assert dest.service is not None and dest.workload is None
    assert dest.problem == f"service {WEB} has no healthy endpoint for port 80"
    allow_all = web_service(load_balancing=LoadBalancing(health_policy=HealthPolicy.ALLOW_ALL))
    snap = store_with(web_pod("a", "10.0.0.1", healthy=False), allow_all).snapshot
    dest = snap.resolve_destination("10.96.0.20", 80)
    assert dest.workload is not None and dest.workload.name == "a"


def test_resolve_unknown_port_and_unknown_ip() -> None:
    snap = store_with(web_pod("a", "10.0.0.1"), web_service()).snapshot
    dest = snap.resolve_destination("10.96.0.20", 81)
    assert dest.service is not None and dest.workload is None
    assert dest.problem == f"port 81 is not a port of service {WEB}"
    dest = snap.resolve_destination("192.0.2.1", 443)
    assert (dest.service, dest.workload, dest.port) == (None, None, 443)
    assert dest.problem == "no workload or service has address 192.0.2.1"


def test_choosers() -> None:
    pods = [web_pod(n, f"10.0.0.{i}") for i, n in enumerate("abc", 1)]
    snap = store_with(*pods, web_service()).snapshot
    rr = RoundRobinChooser()
    names = [snap.resolve_destination("10.96.0.20", 80, choose=rr).workload for _ in range(6)]
    assert [w.name for w in names if w] == ["a", "b", "c", "a", "b", "c"]
    picked: list[Sequence[Workload]] = []

    def spy(svc: Service, candidates: Sequence[Workload]) -> Workload:
        picked.append(candidates)
        return candidates[-1]

    dest = snap.resolve_destination("10.96.0.20", 80, choose=spy)
    assert dest.workload is not None and dest.workload.name == "c"
    assert [w.name for w in picked[0]] == ["a", "b", "c"]


# -- policies ----------------------------------------------------------------------------------


def test_policies_for_scopes() -> None:
    store = StateStore()
    writer = store.claim_writer("test")
    pod = workload("a", "shop", policies=["shop/selected", "other/listed-elsewhere", "shop/gone"])
    writer.apply(
        Batch(
            workloads=(pod,),
            policies=(
                policy("mesh", "istio-system", scope=Scope.GLOBAL),
                policy("ns-wide", "shop", scope=Scope.NAMESPACE),
                policy("ns-other", "other", scope=Scope.NAMESPACE),
                policy("selected", "shop", scope=Scope.WORKLOAD_SELECTOR),
                policy("not-selected", "shop", scope=Scope.WORKLOAD_SELECTOR),
                policy("listed-elsewhere", "other", scope=Scope.WORKLOAD_SELECTOR),
                policy("unknown-scope", "shop", scope=None, problems=["scope: unknown value 9"]),
            ),
        )
    )
    keys = [p.key for p in store.snapshot.policies_for(pod)]
    assert keys == [
        "istio-system/mesh",
        "other/listed-elsewhere",
        "shop/ns-wide",
        "shop/selected",
        "shop/unknown-scope",
    ]
    snap = writer.apply(Batch(removed_policies=("istio-system/mesh", "shop/ns-wide")))
    assert [p.key for p in snap.policies_for(pod)] == [
        "other/listed-elsewhere",
        "shop/selected",
        "shop/unknown-scope",
    ]


def test_policy_generation_moves_only_with_policy_inputs() -> None:
    store = StateStore()
    writer = store.claim_writer("test")
    g0 = store.snapshot.policy_generation
    snap = writer.apply(Batch(policies=(policy("p", "shop"),)))
    assert snap.policy_generation == g0 + 1
    snap = writer.apply(Batch(policies=(policy("p", "shop"),)))  # same content
    assert snap.policy_generation == g0 + 1
    snap = writer.apply(Batch(services=(web_service(),)))
    assert snap.policy_generation == g0 + 1
    snap = writer.apply(Batch(workloads=(web_pod("a", "10.0.0.1"),)))
    assert snap.policy_generation == g0 + 2  # a new workload
    snap = writer.apply(Batch(workloads=(web_pod("a", "10.0.0.7"),)))  # IP only
    assert snap.policy_generation == g0 + 2
    listed = workload("a", "shop", ips=["10.0.0.7"], policies=["shop/p"])
    snap = writer.apply(Batch(workloads=(listed,)))
    assert snap.policy_generation == g0 + 3
    snap = writer.apply(Batch(removed_policies=("shop/p",)))
    assert snap.policy_generation == g0 + 4


# -- writer, batches, readiness, notification ----------------------------------------------


def test_one_writer() -> None:
    store = StateStore()
    store.claim_writer("xds")
    with pytest.raises(WriterAlreadyClaimed, match=r"already has a writer \(xds\).*local config"):
        store.claim_writer("local config")


def test_contradictory_batches_are_refused() -> None:
    a = web_pod("a", "10.0.0.1")
    with pytest.raises(InvalidBatch, match="both updated and removed"):
        Batch(workloads=(a,), removed_addresses=(a.uid,))
    with pytest.raises(InvalidBatch, match="appears twice"):
        Batch(workloads=(a, a))
    with pytest.raises(InvalidBatch, match="appears twice"):
        Batch(policies=(policy("p"), policy("p")))


def test_replace_is_a_full_replacement() -> None:
    store = StateStore()
    writer = store.claim_writer("test")
    writer.apply(Batch(workloads=(web_pod("a", "10.0.0.1"),), services=(web_service(),)))
    assert not store.ready
    snap = writer.replace(Batch(workloads=(web_pod("b", "10.0.0.2"),)))
    assert snap.ready and store.ready
    assert set(snap.workloads) == {"c1//Pod/shop/b"}
    assert snap.workload_by_ip("10.0.0.1") is None and snap.service_by_vip("10.96.0.20") is None
    assert [w.name for w in snap.endpoints(WEB)] == ["b"]


async def test_ready_and_change_notification() -> None:
    store = StateStore()
    writer = store.claim_writer("test")
    seen: list[int] = []

    async def reader(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        snap = await store.wait_ready()
        seen.append(snap.version)
        snap = await store.wait_changed(snap.version)
        seen.append(snap.version)

    async with trio.open_nursery() as nursery:
        await nursery.start(reader)
        writer.apply(Batch(workloads=(web_pod("a", "10.0.0.1"),)))
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []  # not ready yet
        writer.mark_ready()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [2]
        writer.apply(Batch(workloads=(web_pod("b", "10.0.0.2"),)))
    assert seen == [2, 3]
    assert writer.mark_ready() is store.snapshot  # already ready: no new version
    assert writer.apply(Batch()) is store.snapshot  # empty batch: nothing published


# -- incremental indexes == indexes built from scratch ---------------------------------------

UNIVERSE_IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1"]
UNIVERSE_SERVICES = ["a/s1", "a/s2", "b/s1"]


@st.composite
def workload_updates(draw: st.DrawFn) -> Workload:
    return workload(
        draw(st.sampled_from(["w1", "w2", "w3", "w4"])),
        draw(st.sampled_from(["a", "b"])),
        ips=draw(st.lists(st.sampled_from(UNIVERSE_IPS), max_size=2)),
        services={
            key: [(80, draw(st.sampled_from([0, 8080])))]
            for key in draw(st.sets(st.sampled_from(UNIVERSE_SERVICES), max_size=2))
        },
        healthy=draw(st.booleans()),
        host_network=draw(st.booleans()),
        policies=draw(st.sets(st.sampled_from(["a/p1", "b/p2"]), max_size=1)),
    )


@st.composite
def service_updates(draw: st.DrawFn) -> Service:
    namespace, hostname = draw(st.sampled_from(UNIVERSE_SERVICES)).split("/")
    return service(
        hostname,
        namespace,
        vips=draw(st.lists(st.sampled_from(["10.96.0.1", "10.96.0.2"]), max_size=2, unique=True)),
        ports=[(80, 8080)],
    )


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    workloads = draw(st.lists(workload_updates(), max_size=3, unique_by=lambda w: w.uid))
    services = draw(st.lists(service_updates(), max_size=2, unique_by=lambda s: s.key))
    policies = draw(
        st.lists(
            st.builds(
                policy,
                st.sampled_from(["p1", "p2"]),
                st.sampled_from(["a", "b"]),
                scope=st.sampled_from([Scope.GLOBAL, Scope.NAMESPACE, Scope.WORKLOAD_SELECTOR]),
            ),
            max_size=2,
            unique_by=lambda p: p.key,
        )
    )
    upserted = {w.uid for w in workloads} | {s.key for s in services}
    removable = [f"c1//Pod/{ns}/w{i}" for ns in "ab" for i in range(1, 5)] + UNIVERSE_SERVICES
    removed = draw(st.sets(st.sampled_from([r for r in removable if r not in upserted])))
    removed_policies = draw(
        st.sets(
            st.sampled_from(["a/p1", "a/p2", "b/p1", "b/p2"]).filter(
                lambda k: k not in {p.key for p in policies}
            )
        )
    )
    return Batch(
        workloads=tuple(workloads),
        services=tuple(services),
        policies=tuple(policies),
        removed_addresses=tuple(sorted(removed)),
        removed_policies=tuple(sorted(removed_policies)),
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(batches(), min_size=1, max_size=6))
def test_incremental_indexes_equal_a_fresh_build(sequence: list[Batch]) -> None:
    incremental = StateStore(choose=first_endpoint)
    writer = incremental.claim_writer("test")
    for batch in sequence:
        writer.apply(batch)
    final = incremental.snapshot
    fresh = StateStore(choose=first_endpoint)
    rebuilt = fresh.claim_writer("test").replace(
        Batch(
            workloads=tuple(final.workloads.values()),
            services=tuple(final.services.values()),
            policies=tuple(final.policies.values()),
        )
    )
    assert final._by_ip == rebuilt._by_ip
    assert final._by_vip == rebuilt._by_vip
    assert final._endpoints == rebuilt._endpoints
    for w in final.workloads.values():
        assert final.policies_for(w) == rebuilt.policies_for(w)
    for vip in ("10.96.0.1", "10.96.0.2", *UNIVERSE_IPS):
        assert final.resolve_destination(vip, 80) == rebuilt.resolve_destination(vip, 80)
