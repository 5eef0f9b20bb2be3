"""ztunnel.connections.ConnectionTracker: metrics, access log, policy re-checks, drains (unit)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from identity.spiffe import SpiffeId
from ztunnel.connections import ConnectionTracker, PolicyCheck, TrackedConnection
from ztunnel.metrics import TcpLabels, ZtunnelMetrics
from ztunnel.policy import Connection
from ztunnel.state import Action, Authorization, Batch, StateStore, Workload
from ztunnel.state.store import Snapshot

from .builders import policy, when, workload

pytestmark = pytest.mark.unit

WEB = workload("web-0", "shop", ips=["10.244.2.5"], sa="web")
CLIENT = workload("sleep-0", "demo", ips=["10.244.1.2"], sa="sleep")
EVIL = SpiffeId("cluster.local", "bad", "evil")
GOOD = SpiffeId("cluster.local", "demo", "sleep")
INBOUND = TcpLabels(reporter="destination", destination_workload="web-0")
OUTBOUND = TcpLabels(reporter="source", source_workload="sleep-0")


def samples(metrics: ZtunnelMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def tcp(metrics: ZtunnelMetrics, name: str, labels: TcpLabels) -> float | None:
    """One Istio TCP counter for one label set (None: the series does not exist)."""
    wanted = tuple(sorted(dataclasses.asdict(labels).items()))
    return samples(metrics).get((f"istio_tcp_{name}_total", wanted))


def active(metrics: ZtunnelMetrics, direction: str) -> float | None:
    return samples(metrics).get(
        ("underpass_ztunnel_connections_active", (("direction", direction),))
    )


def facts(identity: SpiffeId | None, port: int = 8080) -> Connection:
    return Connection(identity, "10.244.1.2", "10.244.2.5", port)  # type: ignore[arg-type]


def inbound(
    tracker: ConnectionTracker,
    *,
    pod: str = "uid-web",
    identity: SpiffeId | None = GOOD,
    destination_uid: str = WEB.uid,
) -> Any:
    """The ``track()`` context of an inbound HBONE connection to WEB."""
    return tracker.track(
        pod=pod,
        direction="inbound",
        protocol="HBONE",
        source="10.244.1.2:40000",
        destination="10.244.2.5:8080",
        source_workload=CLIENT,
        destination_workload=WEB,
        source_identity=identity.uri if identity is not None else None,
        destination_identity=WEB.identity.uri,
        labels=INBOUND,
        policy=PolicyCheck(facts(identity), destination_uid),
    )


def outbound(tracker: ConnectionTracker, *, pod: str = "uid-sleep") -> Any:
    return tracker.track(
        pod=pod,
        direction="outbound",
        protocol="HBONE",
        source="10.244.1.2:40000",
        destination="10.244.2.5:8080",
        source_workload=CLIENT,
        destination_workload=WEB,
        source_identity=GOOD.uri,
        destination_identity=WEB.identity.uri,
        labels=OUTBOUND,
    )


def state_with(*workloads: Workload, deny: tuple[str, ...] = ()) -> Snapshot:
    store = StateStore()
    policies: tuple[Authorization, ...] = ()
    if deny:
        policies = (policy("deny-some", "shop", action=Action.DENY, rules=[when(principals=deny)]),)
    store.claim_writer("test").apply(Batch(workloads=workloads, policies=policies))
    return store.snapshot


@pytest.fixture
def access_log() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog events while the test runs, whatever level another test configured."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**saved)


def completions(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "connection complete"]


# -- metrics -----------------------------------------------------------------------------


def test_open_and_close_update_the_counters_and_the_active_gauge() -> None:
    metrics = ZtunnelMetrics(process_metrics=False)
    tracker = ConnectionTracker(metrics)
    assert active(metrics, "inbound") == 0
    with inbound(tracker) as conn:
        assert isinstance(conn, TrackedConnection)
        assert len(tracker) == 1
        assert tcp(metrics, "connections_opened", INBOUND) == 1
        assert tcp(metrics, "connections_closed", INBOUND) == 0
        assert active(metrics, "inbound") == 1
        assert active(metrics, "outbound") == 0
        with outbound(tracker):
            assert active(metrics, "outbound") == 1
            assert len(tracker) == 2
        conn.counters.a_to_b = 1000  # what the relay counts: client -> server
        conn.counters.b_to_a = 42
    assert len(tracker) == 0
    assert tcp(metrics, "connections_closed", INBOUND) == 1
    assert tcp(metrics, "connections_closed", OUTBOUND) == 1
    assert tcp(metrics, "received_bytes", INBOUND) == 1000
    assert tcp(metrics, "sent_bytes", INBOUND) == 42
    assert active(metrics, "inbound") == 0
    assert active(metrics, "outbound") == 0


async def test_long_connections_reach_the_metrics_while_open_and_are_not_counted_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = ZtunnelMetrics(process_metrics=False)
    tracker = ConnectionTracker(metrics, flush_interval=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        with inbound(tracker) as conn:
            conn.counters.a_to_b = 300
            conn.counters.b_to_a = 20
            await trio.sleep(5.5)
            assert tcp(metrics, "received_bytes", INBOUND) == 300
            assert tcp(metrics, "sent_bytes", INBOUND) == 20
            assert tcp(metrics, "connections_closed", INBOUND) == 0
            conn.counters.a_to_b = 500
        # The close flushes only what the periodic flush had not reported.
        assert tcp(metrics, "received_bytes", INBOUND) == 500
        assert tcp(metrics, "sent_bytes", INBOUND) == 20
        await trio.sleep(10)  # a later flush finds nothing left to add
        assert tcp(metrics, "received_bytes", INBOUND) == 500
        nursery.cancel_scope.cancel()


def test_as_json_and_for_pod_list_live_connections() -> None:
    tracker = ConnectionTracker(ZtunnelMetrics(process_metrics=False))
    with inbound(tracker, pod="uid-web") as first, outbound(tracker, pod="uid-sleep"):
        first.counters.a_to_b = 7
        listed = {c["id"]: c for c in tracker.as_json()}
        assert set(listed) == {c.id for c in tracker.connections()}
        entry = listed[first.id]
        assert entry["pod"] == "uid-web"
        assert entry["direction"] == "inbound"
        assert entry["source_workload"] == "demo/sleep-0"
        assert entry["destination_workload"] == "shop/web-0"
        assert entry["source_identity"] == GOOD.uri
        assert entry["bytes_received"] == 7
        assert [c.id for c in tracker.for_pod("uid-web")] == [first.id]
    assert tracker.as_json() == []


# -- access log --------------------------------------------------------------------------


def test_one_access_log_line_per_connection_with_who_bytes_and_outcome(
    access_log: list[MutableMapping[str, Any]],
) -> None:
    tracker = ConnectionTracker(ZtunnelMetrics(process_metrics=False))
    with inbound(tracker) as conn:
        conn.counters.a_to_b = 11
        conn.counters.b_to_a = 74
        assert completions(access_log) == []  # only when it ends
    [line] = completions(access_log)
    assert line["log_level"] == "info"
    duration = line.pop("duration_ms")
    assert isinstance(duration, float) and 0 <= duration < 5_000
    expected = {
        "event": "connection complete",
        "log_level": "info",
        "direction": "inbound",
        "protocol": "HBONE",
        "src_addr": "10.244.1.2:40000",
        "dst_addr": "10.244.2.5:8080",
        "src_workload": "demo/sleep-0",
        "dst_workload": "shop/web-0",
        "src_identity": GOOD.uri,
        "dst_identity": WEB.identity.uri,
        "bytes_sent": 74,
        "bytes_recv": 11,
        "outcome": "ok",
    }
    assert line == expected


def test_access_log_outcome_names_the_relay_error_or_what_ended_the_connection(
    access_log: list[MutableMapping[str, Any]],
) -> None:
    tracker = ConnectionTracker(ZtunnelMetrics(process_metrics=False))
    with inbound(tracker) as failed:
        failed.counters.error = ConnectionResetError("peer reset")
    with inbound(tracker) as ended:
        ended.counters.error = ConnectionResetError("follows from the outcome")
        ended.outcome = "closed: pod drain deadline passed"
    outcomes = [line["outcome"] for line in completions(access_log)]
    assert outcomes == [
        "error: ConnectionResetError: peer reset",
        "closed: pod drain deadline passed",
    ]


def test_plaintext_peer_is_logged_without_identity(
    access_log: list[MutableMapping[str, Any]],
) -> None:
    tracker = ConnectionTracker(ZtunnelMetrics(process_metrics=False))
    with inbound(tracker, identity=None):
        pass
    [line] = completions(access_log)
    assert line["src_identity"] is None
    assert line["dst_identity"] == WEB.identity.uri


# -- policy re-checks and drains ---------------------------------------------------------


async def hold(
    context: Any, *, task_status: trio.TaskStatus[TrackedConnection] = trio.TASK_STATUS_IGNORED
) -> None:
    """Play a relay: stay open inside the connection's cancel scope until cancelled."""
    with context as conn, conn.cancel_scope:
        task_status.started(conn)
        await trio.sleep_forever()


async def test_recheck_cancels_only_inbound_connections_the_new_policy_denies(
    access_log: list[MutableMapping[str, Any]],
) -> None:
    tracker = ConnectionTracker(ZtunnelMetrics(process_metrics=False))
    async with trio.open_nursery() as nursery:
        denied = await nursery.start(hold, inbound(tracker, identity=EVIL))
        allowed = await nursery.start(hold, inbound(tracker, identity=GOOD))
        plaintext = await nursery.start(hold, inbound(tracker, identity=None))
        out = await nursery.start(hold, outbound(tracker))

        # Nothing denies yet: nothing is closed.
        assert tracker.recheck(state_with(WEB, CLIENT)) == 0
        assert len(tracker) == 4

        assert tracker.recheck(state_with(WEB, CLIENT, deny=(EVIL.principal,))) == 1
        assert denied.cancel_scope.cancel_called
        assert not allowed.cancel_scope.cancel_called
        assert not plaintext.cancel_scope.cancel_called
        assert not out.cancel_scope.cancel_called
        await trio.testing.wait_all_tasks_blocked()
        assert {c.id for c in tracker.connections()} == {allowed.id, plaintext.id, out.id}
        assert tracker.closed_by_policy == 1

        # The same state again closes nothing more.
        assert tracker.recheck(state_with(WEB, CLIENT, deny=(EVIL.principal,))) == 0
        nursery.cancel_scope.cancel()
    [evil_line] = [e for e in completions(access_log) if e["src_identity"] == EVIL.uri]
    assert evil_line["outcome"].startswith("closed by policy change: ")
    assert "shop/deny-some" in evil_line["outcome"]
    [notice] = [e for e in access_log if e["event"] == "connection closed by policy change"]
    assert notice["id"] == denied.id
    assert notice["src_identity"] == EVIL.uri


async def test_recheck_closes_connections_whose_workload_left_the_state() -> None:
    tracker = ConnectionTracker(ZtunnelMetrics(process_metrics=False))
    async with trio.open_nursery() as nursery:
        orphan = await nursery.start(hold, inbound(tracker, destination_uid="c1//Pod/shop/gone"))
        kept = await nursery.start(hold, inbound(tracker))
        assert tracker.recheck(state_with(WEB, CLIENT)) == 1
        assert orphan.cancel_scope.cancel_called
        assert orphan.outcome == "closed by policy change: its workload left the state"
        assert not kept.cancel_scope.cancel_called
        nursery.cancel_scope.cancel()


async def test_cancel_pod_ends_that_pods_connections_and_keeps_an_earlier_outcome(
    access_log: list[MutableMapping[str, Any]],
) -> None:
    tracker = ConnectionTracker(ZtunnelMetrics(process_metrics=False))
    async with trio.open_nursery() as nursery:
        first = await nursery.start(hold, inbound(tracker, pod="uid-web"))
        second = await nursery.start(hold, inbound(tracker, pod="uid-web"))
        other = await nursery.start(hold, inbound(tracker, pod="uid-other"))
        second.outcome = "closed by policy change: already decided"
        assert tracker.cancel_pod("uid-web", "closed: pod drain deadline passed") == 2
        await trio.testing.wait_all_tasks_blocked()
        assert [c.id for c in tracker.connections()] == [other.id]
        assert first.outcome == "closed: pod drain deadline passed"
        assert second.outcome == "closed by policy change: already decided"
        assert not other.cancel_scope.cancel_called
        assert tracker.cancel_pod("uid-nobody", "closed") == 0
        nursery.cancel_scope.cancel()
    outcomes = [line["outcome"] for line in completions(access_log)]
    # trio runs the two cancelled tasks in either order
    assert sorted(outcomes[:2]) == [
        "closed by policy change: already decided",
        "closed: pod drain deadline passed",
    ]
