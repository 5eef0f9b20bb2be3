"""Proof of mTLS from ztunnel metrics and access logs, and the modes' checks built on it (unit).

The modes' ``verify`` is what makes a run fail when the traffic bypassed the
proxies being measured; here it is fed the records a ztunnel writes
(Prometheus text, JSON access-log lines) for a load that did go through them,
and for loads that did not (a pair missing, plaintext, the wrong identity).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.underpass.compare.test_modes import workload
from underpass.compare import evidence, modes
from underpass.compare.errors import CompareError
from underpass.compare.evidence import Link
from underpass.compare.modes import (
    ModeContext,
    Pair,
    ServiceAccountMode,
    SidecarZtunnelMode,
    WaypointMode,
    free_vip,
    gateway_manifest,
    identity_of,
    key_of,
    pair_link,
)
from underpass.lab import mesh
from underpass.lab.cluster import Lab

pytestmark = pytest.mark.unit

TD = "spiffe://cluster.local"


def opened(reporter: str, policy: str, src: str, dst: str, value: float, **extra: str) -> str:
    labels = {
        "reporter": reporter,
        "connection_security_policy": policy,
        "source_workload_namespace": "compare",
        "source_workload": src,
        "destination_workload_namespace": "compare",
        "destination_workload": dst,
        "source_principal": f"{TD}/ns/compare/sa/{src}",
        "destination_principal": f"{TD}/ns/compare/sa/{dst}",
        **extra,
    }
    text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"istio_tcp_connections_opened_total{{{text}}} {value}\n"


def test_mtls_links_count_per_link_and_reporter_only_mutual_tls() -> None:
    text = (
        "# TYPE istio_tcp_connections_opened_total counter\n"
        + opened("destination", "mutual_tls", "a", "b", 2)
        + opened("destination", "mutual_tls", "a", "b", 3, response_flags="x")  # same link
        + opened("destination", "none", "c", "b", 7)
        + opened("source", "mutual_tls", "b", "a", 5)
        + "# TYPE istio_tcp_connections_closed_total counter\n"
        + opened("destination", "mutual_tls", "a", "b", 11).replace("opened", "closed")
    )
    ab = Link("compare/a", "compare/b", f"{TD}/ns/compare/sa/a", f"{TD}/ns/compare/sa/b")
    assert evidence.mtls_links(text, "destination") == Counter({ab: 5})
    (source,) = evidence.mtls_links(text, "source")
    assert source.source == "compare/b" and source.destination_identity.endswith("/sa/a")
    assert evidence.mtls_links("", "source") == Counter()


def access(direction: str, src: Any, dst: Any, protocol: str = "HBONE", **extra: str) -> str:
    return json.dumps(
        {
            "direction": direction,
            "protocol": protocol,
            "src_workload": key_of(src),
            "dst_workload": key_of(dst),
            "src_identity": identity_of(src).uri,
            "dst_identity": identity_of(dst).uri,
            "outcome": "ok",
            "event": "connection complete",
            **extra,
        }
    )


def test_log_lines_are_read_from_an_offset_and_a_half_written_line_waits(tmp_path: Path) -> None:
    pair = workload(2, 1).pairs[0]
    log = tmp_path / "ztunnel.log"
    assert evidence.read_log_lines(log, 0) == ([], 0)  # not written yet
    log.write_text(
        '{"event": "ztunnel started"}\nTraceback (most recent call last):\n'
        + access("inbound", pair.client, pair.server)
        + "\n{not json\n"
        + access("outbound", pair.client, pair.server)[:20]
    )
    entries, offset = evidence.read_log_lines(log, 0)
    assert [e["event"] for e in entries] == ["ztunnel started", "connection complete"]
    assert offset < log.stat().st_size  # the unfinished line is left for the next read
    with log.open("a") as fh:
        fh.write(access("outbound", pair.client, pair.server)[20:] + "\n")
    more, end = evidence.read_log_lines(log, offset)
    assert [e["direction"] for e in more] == ["outbound"] and end == log.stat().st_size
    assert evidence.read_log_lines(log, end) == ([], end)


def test_hbone_links_keep_only_hbone_of_the_direction() -> None:
    pair = workload(2, 1).pairs[0]
    entries = [
        json.loads(access("inbound", pair.client, pair.server)),
        json.loads(access("inbound", pair.client, pair.server)),
        json.loads(access("inbound", pair.client, pair.server, protocol="TCP")),
        json.loads(access("outbound", pair.client, pair.server)),
        {"event": "certificate issued"},
    ]
    link = pair_link(pair)
    assert evidence.hbone_links(entries, "inbound") == Counter({link: 2})
    assert evidence.hbone_links(entries, "outbound") == Counter({link: 1})
    other = pair_link(Pair(pair.server, pair.client))
    assert evidence.missing([link, other], evidence.hbone_links(entries, "inbound")) == [other]
    assert "and 2 more" in evidence.describe([link] * 5)


def test_pair_links_name_both_workloads_and_identities() -> None:
    pair = workload(2, 2).pairs[1]
    link = pair_link(pair)
    assert link.source == f"compare/{pair.client.name}"
    assert link.destination == f"compare/{pair.server.name}"
    assert link.source_identity == f"{TD}/ns/compare/sa/{pair.client.service_account}"
    assert link.destination_identity == f"{TD}/ns/compare/sa/{pair.server.service_account}"


# --------------------------------------------------------------------------- mode 3


def context(tmp_path: Path, nodes: int = 2, per_node: int = 2) -> ModeContext:
    return ModeContext(Lab(tmp_path / "lab"), workload(nodes, per_node), tmp_path / "work")


def write_log(ctx: ModeContext, node: str, lines: list[str]) -> None:
    path = mesh.ztunnel_log(ctx.lab.paths, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.writelines(line + "\n" for line in lines)


def the_load(ctx: ModeContext, skip: Pair | None = None, **extra: str) -> None:
    """Each pair's access-log lines: inbound on the server's node, outbound on the client's."""
    for pair in ctx.workload.pairs:
        if pair is skip:
            continue
        write_log(ctx, pair.server.node, [access("inbound", pair.client, pair.server, **extra)])
        write_log(ctx, pair.client.node, [access("outbound", pair.client, pair.server, **extra)])


async def test_service_account_mode_finds_each_pair_in_the_logs_after_the_snapshot(
    tmp_path: Path,
) -> None:
    ctx = context(tmp_path)
    mode = ServiceAccountMode()
    the_load(ctx)  # before the snapshot: must not count
    before = await mode.snapshot(ctx)
    the_load(ctx)
    report = await mode.verify(ctx, before)
    assert report["node-1"]["hbone_inbound_connections"] == 2
    assert report["node-2"]["hbone_outbound_connections"] == 2


@pytest.mark.parametrize(
    "fault",
    ["missing pair", "plaintext", "old lines only"],
)
async def test_service_account_mode_fails_when_a_pair_did_not_use_hbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    monkeypatch.setattr(modes, "ACCESS_LOG_TIMEOUT", 0.3)
    ctx = context(tmp_path)
    mode = ServiceAccountMode()
    if fault == "old lines only":
        the_load(ctx)
    before = await mode.snapshot(ctx)
    if fault == "missing pair":
        the_load(ctx, skip=ctx.workload.pairs[-1])
    elif fault == "plaintext":
        the_load(ctx, protocol="TCP")
    with pytest.raises(CompareError, match=r"no (inbound|outbound) HBONE \(mTLS\) access-log"):
        await mode.verify(ctx, before)


# --------------------------------------------------------------------------- mode 1a


async def test_sidecar_ztunnel_mode_wants_both_ends_of_every_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path)
    mode = SidecarZtunnelMode()
    empty = {
        (key_of(p), r): Counter[Link]()
        for p in ctx.workload.pods
        for r in ("destination", "source")
    }
    after = {k: Counter(v) for k, v in empty.items()}
    for pair in ctx.workload.pairs:
        after[(key_of(pair.server), "destination")][pair_link(pair)] += 1
        after[(key_of(pair.client), "source")][pair_link(pair)] += 1

    async def links(_ctx: ModeContext) -> dict[tuple[str, str], Counter[Link]]:
        return after

    monkeypatch.setattr(mode, "_links", links)
    report = await mode.verify(ctx, empty)
    assert all(
        v == {"mtls_inbound_connections": 1, "mtls_outbound_connections": 1}
        for v in report.values()
    )
    # the same counts before and after: the load went elsewhere
    with pytest.raises(CompareError, match="saw no inbound mTLS connection"):
        await mode.verify(ctx, after)
    # a server that accepted the client under another identity does not count
    pair = ctx.workload.pairs[0]
    wrong = pair_link(pair)._replace(source_identity=f"{TD}/ns/compare/sa/intruder")
    after[(key_of(pair.server), "destination")] = Counter({wrong: 1})
    with pytest.raises(CompareError, match=f"sidecar of {key_of(pair.server)} saw no inbound"):
        await mode.verify(ctx, empty)


# --------------------------------------------------------------------------- mode 4


def test_waypoint_gateway_and_addresses() -> None:
    gateway = gateway_manifest("compare")
    assert gateway["kind"] == "Gateway" and gateway["metadata"]["name"] == "waypoint"
    assert gateway["metadata"]["labels"] == {"istio.io/waypoint-for": "service"}
    assert gateway["spec"]["gatewayClassName"] == "istio-waypoint"
    assert gateway["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    assert free_vip("10.96.0.0/16", {"10.96.0.10", "10.96.0.11"}) == "10.96.0.12"
    with pytest.raises(CompareError, match="no free service address"):
        free_vip("10.96.0.0/29", set())


def test_waypoint_mode_sends_to_the_service_vip_and_says_so(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    mode = WaypointMode()
    mode.vip = "10.96.0.10"
    pair = ctx.workload.pairs[0]
    assert mode.url(ctx, pair) == "http://10.96.0.10:80/echo"
    assert mode.destination(ctx, pair) == ("compare/echo (service VIP, through the waypoint)", None)
    assert any("stand-in" in note and "L7" in note for note in mode.notes)
    assert "stand-in" in mode.title


async def test_waypoint_mode_wants_every_client_at_the_waypoint_and_the_servers_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = context(tmp_path)
    mode = WaypointMode()
    waypoint_id = f"{TD}/ns/compare/sa/waypoint"
    at_waypoint: Counter[Link] = Counter()
    at_servers: Counter[Link] = Counter()
    for pair in ctx.workload.pairs:
        link = pair_link(pair)
        at_waypoint[link] += 1
        at_servers[link._replace(source="compare/waypoint", source_identity=waypoint_id)] += 1
    before = {"waypoint": Counter[Link](), "node-1": Counter[Link](), "node-2": Counter[Link]()}
    after = {"waypoint": at_waypoint, "node-1": Counter[Link](), "node-2": at_servers}

    async def links(_ctx: ModeContext) -> dict[str, Counter[Link]]:
        return after

    monkeypatch.setattr(mode, "_links", links)
    report = await mode.verify(ctx, before)
    assert report["waypoint"]["mtls_inbound_connections"] == 4
    assert report["node-2"]["mtls_inbound_connections_from_waypoint"] == 4
    # servers reached straight from the clients, not from the waypoint
    after["node-2"] = Counter({pair_link(p): 1 for p in ctx.workload.pairs})
    with pytest.raises(CompareError, match="0 mTLS connections from the waypoint"):
        await mode.verify(ctx, before)
    # a client that never reached the waypoint
    after["node-2"] = at_servers
    after["waypoint"] = Counter({pair_link(p): 1 for p in ctx.workload.pairs[1:]})
    with pytest.raises(CompareError, match="no mTLS connection from 1 clients"):
        await mode.verify(ctx, before)
