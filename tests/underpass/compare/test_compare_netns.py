"""``underpass compare`` end to end in real labs, through the command line (netns).

One run compares mode 2 (ztunnel per node) with mode 1b (Envoy sidecars) on
2 nodes x 2 pods and checks that the JSON holds real measurements (PSS of
every proxy process, latencies, ratios to the sidecar baseline, proof of
mTLS) and that nothing of the labs is left. Another runs the ztunnel-side
modes one after the other in one lab: 3 (a supervisor and a worker per
service account per node, all measured), 1a (our ztunnel as a sidecar in
every pod) and 4 (mode 2 plus the waypoint stand-in), each proving mTLS with
both ends' identities, and each leaving the lab fit for the next. A last run
is stopped with SIGTERM while its Envoy sidecars carry load: it must exit 130
and leave nothing behind either.

Each run gets its own ``--prefix``, so leftovers are found by name; if any
are, they are removed by force and the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.underpass.lab.labkit import ROOT, netns_names, require_root
from underpass.compare.launch import LAB_ENV
from underpass.lab.cluster import leftovers
from underpass.lab.procs import processes_mentioning

pytestmark = pytest.mark.netns


def compare_argv(prefix: str, out: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "underpass.cli.main",
        "compare",
        "--nodes",
        "2",
        "--pods-per-node",
        "2",
        "--prefix",
        prefix,
        "--out",
        str(out),
        *args,
    ]


def unique_prefix() -> str:
    return "tc" + os.urandom(3).hex()


def marked_with(prefix: str) -> list[int]:
    """Helper processes (Envoy, Fortio) of any lab whose prefix starts ``<prefix>-``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                if f"{LAB_ENV}={prefix}-".encode() in environ:
                    found.append(int(entry))
    return found


def left_behind(prefix: str, work_dirs: list[Path]) -> list[str]:
    """Anything of the comparison's labs still on the machine."""
    left = [f"netns {n}" for n in netns_names() if n.startswith(f"{prefix}-")]
    pids = set(processes_mentioning(f"lab={prefix}-")) | set(marked_with(prefix))
    for work_dir in work_dirs:
        pids |= set(processes_mentioning(str(work_dir)))
        if work_dir.exists():
            left.append(f"work dir {work_dir}")
    left += [f"process {pid}" for pid in sorted(pids)]
    return left


def check_clean(prefix: str, work_dirs: list[Path]) -> None:
    """Fail (after removing them by force) if the comparison left anything behind."""
    left = left_behind(prefix, work_dirs)
    if not left:
        return
    pids = set(processes_mentioning(f"lab={prefix}-")) | set(marked_with(prefix))
    for work_dir in work_dirs:
        pids |= set(processes_mentioning(str(work_dir)))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in netns_names():
        if name.startswith(f"{prefix}-"):
            subprocess.run(["ip", "netns", "del", name], check=False)
    for work_dir in work_dirs:
        shutil.rmtree(work_dir, ignore_errors=True)
    pytest.fail(f"underpass compare left things behind: {left}")


def work_dir_of(output: str) -> Path:
    marker = "work directory "
    line = next((x for x in output.splitlines() if marker in x), None)
    assert line is not None, f"no work directory in the output:\n{output}"
    return Path(line.split(marker, 1)[1].strip())


def test_node_and_envoy_sidecars_measured_side_by_side(tmp_path: Path) -> None:
    require_root()
    prefix = unique_prefix()
    out = tmp_path / "out"
    argv = compare_argv(
        prefix, out, "--modes", "node,sidecar-envoy", "--duration", "3", "--rps", "50"
    )
    work_dirs: list[Path] = []
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=150, cwd=ROOT, check=False
        )
        work_dirs.append(work_dir_of(proc.stdout))
    finally:
        check_clean(prefix, work_dirs)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"

    doc: dict[str, Any] = json.loads((out / "compare.json").read_text())
    assert doc["complete"] is True and doc["baseline"] == "sidecar-envoy"
    assert doc["machine"]["cpus"] >= 1 and doc["tools"]["fortio"]
    (lab,) = doc["labs"]
    assert lab["prefix"] == f"{prefix}-2"
    assert leftovers(lab["prefix"], Path(lab["state_dir"])) == []
    runs = {r["mode"]: r for r in doc["runs"]}
    assert list(runs) == ["node", "sidecar-envoy"]

    node, envoy = runs["node"], runs["sidecar-envoy"]
    # mode 2: one ztunnel per node; mode 1b: one Envoy per pod, each in its pod
    assert sorted(p["node"] for p in node["proxies"]) == ["node-1", "node-2"]
    assert {p["role"] for p in node["proxies"]} == {"ztunnel"}
    assert sorted(p["pod"] for p in envoy["proxies"]) == [
        "compare/echo-1-1",
        "compare/echo-1-2",
        "compare/echo-2-1",
        "compare/echo-2-2",
    ]
    assert len({p["pid"] for p in envoy["proxies"]}) == 4
    for run in (node, envoy):
        for proxy in run["proxies"]:
            usage = proxy["usage"]
            for reading in ("idle", "peak", "end"):
                assert 0 < usage[reading]["pss_kib"] <= usage[reading]["rss_kib"], proxy
            assert usage["cpu_seconds"] is not None and usage["cpu_seconds"] >= 0
        summary = run["summary"]
        assert summary["pss_per_node_kib"] > 0 and summary["rss_per_node_kib"] > 0
        assert summary["pss_per_pod_kib"] == pytest.approx(summary["pss_per_node_kib"] / 2, 0.01)
        assert summary["requests"] >= 100 and summary["errors"] == 0  # 50 rps x 3 s, minus ramp
        assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] < 1000
        assert len(run["load"]["clients"]) == 4
        for client in run["load"]["clients"]:
            assert client["client_node"] != client["server_node"]  # across nodes
            assert client["sockets"] >= 1 and client["histogram_s"]
    # the traffic really went through each mode's proxies, with mTLS
    assert all(
        v["mtls_inbound_connections"] >= v["expected_at_least"] == 2
        for v in node["verification"].values()
    )
    assert all(
        v["mtls_handshakes"]["inbound"] >= 1 and v["mtls_handshakes"]["outbound"] >= 1
        for v in envoy["verification"].values()
    )
    assert all(c["url"].startswith("http://127.0.0.1:") for c in envoy["load"]["clients"])
    assert not any(c["url"].startswith("http://127.") for c in node["load"]["clients"])
    # ratios to the sidecar baseline
    ratio = node["summary"]["vs_baseline"]["pss_per_node"]
    expected = node["summary"]["pss_per_node_kib"] / envoy["summary"]["pss_per_node_kib"]
    assert ratio == pytest.approx(expected, abs=1e-3) and ratio > 0
    assert envoy["summary"]["vs_baseline"]["pss_per_node"] == 1.0

    table = (out / "compare.txt").read_text()
    assert "node" in table and "sidecar-envoy" in table and "100%" in table
    assert "PSS/NODE" in proc.stdout  # the table printed too
    for chart in ("compare.svg", "compare.png"):
        assert (out / chart).stat().st_size > 1000


def run_compare(prefix: str, out: Path, *args: str, timeout: float) -> str:
    """Run ``underpass compare``; fail (after the leak check) unless it exits 0; its stdout."""
    argv = compare_argv(prefix, out, *args)
    work_dirs: list[Path] = []
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
        )
        work_dirs.append(work_dir_of(proc.stdout))
    finally:
        check_clean(prefix, work_dirs)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


SPIFFE = "spiffe://cluster.local/ns/compare/sa"
PODS = ["compare/echo-1-1", "compare/echo-1-2", "compare/echo-2-1", "compare/echo-2-2"]


def check_measured(run: dict[str, Any]) -> None:
    """Every proxy measured (PSS, CPU), every request answered, latencies in order."""
    for proxy in run["proxies"]:
        usage = proxy["usage"]
        for reading in ("idle", "peak", "end"):
            assert 0 < usage[reading]["pss_kib"] <= usage[reading]["rss_kib"], proxy
        assert usage["cpu_seconds"] is not None and usage["cpu_seconds"] >= 0
    summary = run["summary"]
    assert summary["requests"] >= 100 and summary["errors"] == 0, summary
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] < 1000
    assert len(run["load"]["clients"]) == 4


def test_ztunnel_side_modes_measured_with_mtls_one_after_the_other(tmp_path: Path) -> None:
    require_root()
    prefix = unique_prefix()
    out = tmp_path / "out"
    modes = "service-account,sidecar-ztunnel,waypoint"
    stdout = run_compare(
        prefix, out, "--modes", modes, "--duration", "3", "--rps", "50", timeout=150
    )
    doc: dict[str, Any] = json.loads((out / "compare.json").read_text())
    assert doc["complete"] is True and doc["tools"]["git"]["commit"]
    runs = {r["mode"]: r for r in doc["runs"]}
    assert list(runs) == modes.split(",")
    for run in runs.values():
        check_measured(run)

    # mode 3: per node a supervisor and one worker per service account, each measured
    # and charged to its node; every pair's connection over HBONE with both identities
    sa = runs["service-account"]
    assert sa["summary"]["proxy_roles"] == {
        "ztunnel-supervisor": 2,
        "ztunnel-zygote": 2,
        "ztunnel-worker": 4,
    }
    for node in ("node-1", "node-2"):
        mine = [p for p in sa["proxies"] if p["node"] == node]
        workers = {p["identity"]: p["pid"] for p in mine if p["role"] == "ztunnel-worker"}
        assert set(workers) == {f"{SPIFFE}/sa-1", f"{SPIFFE}/sa-2"}
        assert sa["verification"][node]["workers"] == workers
        assert sa["verification"][node]["hbone_inbound_connections"] >= 2
        assert sa["verification"][node]["hbone_outbound_connections"] >= 2
        supervisor = next(p for p in mine if p["role"] == "ztunnel-supervisor")
        others = [p for p in mine if p["role"] != "ztunnel-supervisor"]
        # the node's figure holds the zygote and the workers too, not the supervisor alone
        assert sa["node_peak_pss_kib"][node] > supervisor["usage"]["peak"]["pss_kib"] + min(
            p["usage"]["peak"]["pss_kib"] for p in others
        )
    assert len({p["pid"] for p in sa["proxies"]}) == 8

    # mode 1a: one ztunnel per pod, holding that pod's identity; both ends of every pair
    side = runs["sidecar-ztunnel"]
    assert sorted(p["pod"] for p in side["proxies"]) == PODS
    assert {p["role"] for p in side["proxies"]} == {"ztunnel-sidecar"}
    for proxy in side["proxies"]:
        index = PODS.index(proxy["pod"])  # the lab alternates the two service accounts
        assert proxy["identity"] == f"{SPIFFE}/sa-{index % 2 + 1}"
    assert set(side["verification"]) == set(PODS)
    for counts in side["verification"].values():
        assert counts["mtls_inbound_connections"] >= 1, side["verification"]
        assert counts["mtls_outbound_connections"] >= 1, side["verification"]
    # the nodes' shared ztunnels were stopped meanwhile, and back for the next mode
    sidecar_pids = {p["pid"] for p in side["proxies"]}
    ztunnels = [p for p in runs["waypoint"]["proxies"] if p["role"] == "ztunnel"]
    assert len(ztunnels) == 2 and not sidecar_pids & {p["pid"] for p in ztunnels}

    # mode 4: the waypoint counted as a proxy of its node; all clients through it
    way = runs["waypoint"]
    assert way["summary"]["proxy_roles"] == {"ztunnel": 2, "waypoint-stand-in": 1}
    (stand_in,) = [p for p in way["proxies"] if p["role"] == "waypoint-stand-in"]
    assert stand_in["identity"] == f"{SPIFFE}/waypoint" and stand_in["node"] == "node-1"
    check = way["verification"]
    assert check["waypoint"]["mtls_inbound_connections"] >= 4
    assert set(check["waypoint"]["destinations_by_client"]) == set(PODS)
    assert (
        sum(check[n]["mtls_inbound_connections_from_waypoint"] for n in ("node-1", "node-2")) >= 4
    )
    assert all("service VIP" in c["server"] for c in way["load"]["clients"])
    assert any("L4 stand-in" in note for note in doc["modes"][2]["notes"])
    # the output says what the waypoint is, and what each mode runs
    assert "3 = 2 ztunnel + 1 waypoint" in stdout
    assert "8 = 2 supervisor + 2 zygote + 4 worker" in stdout
    assert "note (waypoint): the waypoint is a plain L4 stand-in" in stdout


def read_until(proc: subprocess.Popen[bytes], needle: str, timeout: float) -> str:
    """The process's stdout up to the line containing ``needle`` (bounded)."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            pytest.fail(f"no {needle!r} from underpass compare (exit {proc.poll()}):\n{seen!r}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            seen += os.read(proc.stdout.fileno(), 65536)
    return seen.decode(errors="replace")


def test_sigterm_during_the_load_cleans_everything_up(tmp_path: Path) -> None:
    require_root()
    prefix = unique_prefix()
    argv = compare_argv(
        prefix, tmp_path / "out", "--modes", "sidecar-envoy", "--duration", "60", "--rps", "20"
    )
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, start_new_session=True
    )
    work_dirs: list[Path] = []
    try:
        seen = read_until(proc, "mode sidecar-envoy: load", timeout=90)
        work_dirs.append(work_dir_of(seen))
        envoys = [
            pid for pid in marked_with(prefix) if Path(f"/proc/{pid}/exe").resolve().name == "envoy"
        ]
        assert len(envoys) == 4, f"expected the 4 sidecars running, found {envoys}"
        apps = [pid for pid in marked_with(prefix) if pid not in envoys]
        assert len(apps) == 4, f"expected the 4 pods' Fortio servers, found {apps}"
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("underpass compare did not finish within 60 s of SIGTERM")
        assert proc.returncode == 130, stderr.decode(errors="replace")
        assert b"interrupted: cleaning up" in stderr
        for pid in envoys + apps:  # stopped and reaped
            assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still there"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        check_clean(prefix, work_dirs)
