"""Run records, summaries, ratios to the baseline, table, JSON shape and chart (unit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from underpass.compare import report
from underpass.compare.errors import CompareError
from underpass.compare.measure import Memory, ProcessUsage, Sampler
from underpass.compare.modes import NodeMode, ProxyProcess, SidecarEnvoyMode
from underpass.compare.runner import CompareOptions, run_record

pytestmark = pytest.mark.unit

BASELINE = "sidecar-envoy"
MIB = 1024


def client(p50: float, count: int = 100, errors: int = 0) -> dict[str, Any]:
    # one bucket of `count` requests spread over [p50/2, 1.5*p50] (seconds)
    return {
        "client": "compare/echo-1-1",
        "server": "compare/echo-2-1",
        "requests": count,
        "ok": count - errors,
        "actual_qps": 10.0,
        "histogram_s": [[p50 / 2, p50 * 1.5, count]],
    }


def fake_run(
    mode: str, pods_per_node: int, pss_per_proxy_mib: float, proxies_per_node: int, cpu: float
) -> dict[str, Any]:
    proxies = []
    for node in (1, 2):
        for i in range(proxies_per_node):
            usage = ProcessUsage(
                peak=Memory(rss_kib=int(2 * pss_per_proxy_mib * MIB), pss_kib=0),
                peak_rss_kib=int(2 * pss_per_proxy_mib * MIB),
                cpu_start=0.0,
                cpu_end=cpu,
            )
            proxies.append(
                {"pid": 1000 + i, "role": mode, "node": f"node-{node}", "usage": usage.to_dict()}
            )
    per_node = int(pss_per_proxy_mib * MIB * proxies_per_node)
    run: dict[str, Any] = {
        "pods_per_node": pods_per_node,
        "nodes": 2,
        "mode": mode,
        "proxies": proxies,
        "node_peak_pss_kib": {"node-1": per_node, "node-2": per_node},
        "load": {"clients": [client(0.001), client(0.003, errors=2)]},
    }
    run["summary"] = report.summarize(run)
    return run


def runs() -> list[dict[str, Any]]:
    found = [
        fake_run("node", 5, 40, 1, 0.5),
        fake_run(BASELINE, 5, 20, 5, 0.1),
        fake_run("node", 20, 44, 1, 1.0),
        fake_run(BASELINE, 20, 18, 20, 0.1),
    ]
    report.add_ratios(found, BASELINE)
    return found


def test_summary_per_node_per_pod_cpu_and_latency() -> None:
    summary = fake_run(BASELINE, 5, 20, 5, 0.1)["summary"]
    assert summary["proxies"] == 10
    assert summary["pss_per_node_kib"] == 100 * MIB
    assert summary["pss_per_pod_kib"] == 20 * MIB
    assert summary["rss_per_node_kib"] == 200 * MIB  # each proxy's peak RSS, summed per node
    assert summary["cpu_seconds"] == pytest.approx(1.0)
    assert (summary["requests"], summary["errors"]) == (200, 2)
    assert summary["cpu_ms_per_request"] == pytest.approx(5.0)
    # half the requests in 0.5-1.5 ms, half in 1.5-4.5 ms: the median is 1.5 ms
    assert summary["p50_ms"] == pytest.approx(1.5)
    assert summary["p50_ms"] < summary["p90_ms"] < summary["p99_ms"] <= 4.5


def test_ratios_are_against_the_baseline_at_the_same_pod_count() -> None:
    found = runs()
    node5, side5, node20, side20 = (r["summary"]["vs_baseline"] for r in found)
    assert side5["pss_per_node"] == 1.0 and side20["pss_per_node"] == 1.0
    assert node5["pss_per_node"] == pytest.approx(40 / 100, abs=1e-4)
    assert node20["pss_per_node"] == pytest.approx(44 / 360, abs=1e-4)
    assert node20["cpu_seconds"] == pytest.approx(2.0 / 4.0, abs=1e-4)
    lonely = [fake_run("node", 5, 40, 1, 0.5)]
    report.add_ratios(lonely, BASELINE)
    assert lonely[0]["summary"]["vs_baseline"]["pss_per_node"] is None


def test_table_has_a_row_per_run_and_the_ratio_column() -> None:
    text = report.render_table(runs(), BASELINE)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["PODS/NODE", "MODE", "PROXIES"]
    assert "PSS VS SIDECAR-ENVOY" in lines[0]
    assert len(lines) == 5
    node20 = lines[3].split()
    assert node20[:3] == ["20", "node", "2"]
    assert "44.0" in node20 and node20[-1] == "12%"
    assert lines[4].split()[-1] == "100%"
    assert "2/200" in lines[1]  # errors of requests
    lonely = [fake_run("node", 5, 40, 1, 0.5)]
    report.add_ratios(lonely, BASELINE)
    assert report.render_table(lonely, BASELINE).splitlines()[1].split()[-1] == "-"


def test_the_proxies_column_says_what_they_are_when_a_mode_runs_several_kinds() -> None:
    run = fake_run("waypoint", 5, 40, 1, 0.5)
    for proxy in run["proxies"]:
        proxy["role"] = "ztunnel"
    run["proxies"].append({**run["proxies"][0], "pid": 7, "role": "waypoint-stand-in"})
    run["summary"] = report.summarize(run)
    assert run["summary"]["proxy_roles"] == {"ztunnel": 2, "waypoint-stand-in": 1}
    assert report.proxies_cell(run["summary"]) == "3 = 2 ztunnel + 1 waypoint"
    assert "3 = 2 ztunnel + 1 waypoint" in report.render_table([run], BASELINE)
    workers = fake_run("service-account", 5, 30, 2, 0.5)
    for index, proxy in enumerate(workers["proxies"]):
        proxy["role"] = "ztunnel-supervisor" if index in (0, 2) else "ztunnel-worker"
    assert report.proxies_cell(report.summarize(workers)) == "4 = 2 supervisor + 2 worker"
    assert report.proxies_cell(fake_run("node", 5, 40, 1, 0.5)["summary"]) == "2"
    # a JSON written before roles were counted still renders
    assert report.proxies_cell({"proxies": 6}) == "6"


def test_percent_and_mib_formatting() -> None:
    assert report.percent(0.0412) == "4.1%"
    assert report.percent(0.5) == "50%"
    assert report.percent(None) is None
    assert report.mib(1536) == "1.5 MiB"


def test_target_lines_say_what_was_measured() -> None:
    lines = report.target_lines(runs(), BASELINE)
    assert lines == [
        "5 pods/node: node proxy memory per node is 40% of sidecar-envoy's (misses the 5% target)",
        "20 pods/node: node proxy memory per node is 12% of sidecar-envoy's (misses the 5% target)",
    ]
    good = [fake_run("node", 50, 10, 1, 0.1), fake_run(BASELINE, 50, 10, 50, 0.1)]
    report.add_ratios(good, BASELINE)
    assert report.target_lines(good, BASELINE)[0].endswith("(meets the 5% target)")


def test_run_record_from_a_real_sampler_has_the_json_shape() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proxies = [
            ProxyProcess(os.getpid(), "ztunnel", "node-1"),
            ProxyProcess(sleeper.pid, "ztunnel", "node-2"),
        ]
        sampler = Sampler({p.pid: p.node for p in proxies})
        sampler.start()
        sampler.sample()
        sampler.finish()
    finally:
        sleeper.kill()
        sleeper.wait()
    run = run_record(
        pods_per_node=2,
        nodes=2,
        mode=NodeMode(),
        setup_seconds=0.25,
        proxies=proxies,
        sampler=sampler,
        clients=[client(0.002)],
        verification={"node-1": {"mtls_inbound_connections": 2}},
        rps=50,
        duration=3,
    )
    doc = json.loads(json.dumps(run))  # JSON-clean: no dataclasses, no tuples left
    assert set(doc) == {
        "pods_per_node",
        "nodes",
        "mode",
        "title",
        "setup_seconds",
        "proxies",
        "node_peak_pss_kib",
        "node_pss_samples_kib",
        "load",
        "verification",
        "summary",
    }
    assert doc["mode"] == "node" and doc["title"] == NodeMode.title
    for proxy in doc["proxies"]:
        assert set(proxy) == {"pid", "role", "node", "pod", "identity", "usage"}
        for reading in ("idle", "peak", "end"):
            assert proxy["usage"][reading]["pss_kib"] > 0
        assert proxy["usage"]["cpu_seconds"] >= 0
    assert set(doc["node_peak_pss_kib"]) == {"node-1", "node-2"}
    assert all(set(s) == {"t_s", "node-1", "node-2"} for s in doc["node_pss_samples_kib"])
    summary = doc["summary"]
    assert summary["proxies"] == 2 and summary["pss_per_node_kib"] > 0
    assert summary["proxy_roles"] == {"ztunnel": 2}
    assert summary["pss_per_pod_kib"] == pytest.approx(summary["pss_per_node_kib"] / 2, abs=0.1)
    assert summary["p50_ms"] == pytest.approx(2.0)
    report.add_ratios([doc], BASELINE)
    assert doc["summary"]["vs_baseline"]["baseline"] == BASELINE


def test_chart_files_are_written_and_hold_a_line_per_mode(tmp_path: Path) -> None:
    titles = {"node": NodeMode.title, BASELINE: SidecarEnvoyMode().title}
    paths = report.write_chart(runs(), titles, tmp_path / "out", BASELINE)
    assert {p.name for p in paths} == {"compare.svg", "compare.png"}
    png = (tmp_path / "out" / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    svg = (tmp_path / "out" / "compare.svg").read_text()
    root = ET.fromstring(svg)  # noqa: S314 - our own file: is it well-formed?
    assert root.tag.endswith("svg")
    for title in titles.values():
        assert title.replace("'", "&#39;") in svg or title in svg  # legend text, kept as text
    assert "pods per node" in svg
    again = report.write_chart(runs(), titles, tmp_path / "again", BASELINE)
    assert again[0].read_text() == svg  # reproducible: no date, fixed ids


def test_chart_labels_of_close_values_are_spread_apart() -> None:
    assert report.spread_labels([10.0, 100.0], 9) == [10.0, 100.0]  # far apart: unchanged
    # two Envoy modes within 1% of each other, given in any order
    assert report.spread_labels([50.5, 50.0, 200.0], 9) == [59.0, 50.0, 200.0]
    placed = report.spread_labels([5.0, 1.0, 3.0, 2.0], 4)
    assert sorted(placed) == [1.0, 5.0, 9.0, 13.0] and placed[1] == 1.0


def test_chart_refuses_runs_without_memory(tmp_path: Path) -> None:
    empty = fake_run("node", 5, 40, 1, 0.5)
    empty["summary"]["pss_per_node_kib"] = None
    with pytest.raises(ValueError):
        report.write_chart([empty], {}, tmp_path, BASELINE)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nodes": 0}, "--nodes"),
        ({"pods_per_node": ()}, "--pods-per-node"),
        ({"pods_per_node": (5, 5)}, "twice"),
        ({"pods_per_node": (300,)}, "250"),
        ({"nodes": 1, "pods_per_node": (1,)}, "two pods"),
        ({"rps": 0}, "--rps"),
        ({"prefix": "Bad"}, "--prefix"),
        ({"prefix": "a" * 16}, "--prefix"),
    ],
)
def test_options_are_checked(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    options = CompareOptions(out_dir=tmp_path, **changes)
    with pytest.raises(CompareError, match=message):
        options.check()
    CompareOptions(out_dir=tmp_path, prefix="cmp-ok1").check()
