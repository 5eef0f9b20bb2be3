"""The lab for real: network namespaces, veths, the real CNI plugins (root only)."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.underpass.lab.labkit import ROOT, LabHandle, netns_names, root_links
from underpass.lab import netns, procs
from underpass.lab.cluster import host_ifname
from underpass.lab.procs import processes_mentioning

pytestmark = pytest.mark.netns


def root_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout


def node_routes(handle: LabHandle, node: str) -> str:
    out = handle.run("exec", "--node", node, "--", "ip", "-4", "route")
    return out.stdout


def node_links(handle: LabHandle, node: str) -> list[str]:
    out = handle.run("exec", "--node", node, "--", "ip", "-o", "link")
    return sorted(line.split(":")[1].strip() for line in out.stdout.splitlines())


def test_up_gives_pods_with_ips_in_their_node_cidrs(lab: LabHandle) -> None:
    snap = lab.registry.snapshot()
    assert sorted(snap.nodes) == ["node-1", "node-2"]
    assert snap.nodes["node-1"].underlay_ip == "172.30.0.11"
    assert snap.nodes["node-2"].underlay_ip == "172.30.0.12"
    pods = [p for p in snap.pods.values()]
    assert len(pods) == 4
    for pod in pods:
        node = snap.nodes[pod.node]
        assert node.pod_cidr == f"10.244.{pod.node[-1]}.0/24"
        assert pod.phase == "Running"
        assert pod.ip is not None
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(node.pod_cidr)
        assert uuid.UUID(pod.uid).version == 4
        assert pod.service_account == "default" and pod.labels == {"app": "echo"}
        assert os.path.exists(pod.netns) and len(pod.container_id) == 64
        # the address the registry records is the one the pod really has
        out = lab.run("exec", f"{pod.namespace}/{pod.name}", "--", "ip", "-4", "-o", "addr")
        assert f"inet {pod.ip}/24" in out.stdout
    assert sorted(len(snap.pods_on_node(n)) for n in snap.nodes) == [2, 2]
    # each node routes the other's pod CIDR via its underlay address; forwarding on
    assert "10.244.2.0/24 via 172.30.0.12 dev eth0" in node_routes(lab, "node-1")
    assert "10.244.1.0/24 via 172.30.0.11 dev eth0" in node_routes(lab, "node-2")
    fwd = lab.run("exec", "--node", "node-1", "--", "cat", "/proc/sys/net/ipv4/ip_forward")
    assert fwd.stdout.strip() == "1"
    # the bridge plugin made cni0 in the node netns
    assert "cni0" in node_links(lab, "node-1")
    # the conflist is where net.d would be, IPAM state is inside the state dir
    conflist = json.loads(lab.registry.paths.conflist("node-1").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "underpass-cni"]
    ipam_dir = lab.registry.paths.ipam_dir("node-1")
    assert conflist["plugins"][0]["ipam"]["dataDir"] == str(ipam_dir)
    leases = {p.name for p in (ipam_dir / "underpass-lab").iterdir()}
    assert {p.ip for p in snap.pods_on_node("node-1")} <= leases
    assert not Path("/var/lib/cni/networks/underpass-lab").exists()
    # status knows everything, in a table and as JSON
    status = lab.json("status")
    assert {(p["namespace"], p["name"], p["enrolled"]) for p in status["pods"]} == {
        ("default", f"echo-{i}-{j}", False) for i in (1, 2) for j in (1, 2)
    }
    table = lab.run("status").stdout
    assert "NAMESPACE" in table and "POD NAME" in table and "ENROLLED" in table
    assert "172.30.0.11" in table and "10.244.1.0/24" in table


def test_pod_to_pod_across_nodes_and_on_one_node_keeps_source_ip(lab: LabHandle) -> None:
    client_ip = lab.pod_ip("default", "echo-1-1")
    for server in ("echo-2-1", "echo-1-2"):  # other node, same node
        server_ip = lab.pod_ip("default", server)
        doc = lab.app("default/echo-1-1", "http", f"http://{server_ip}:8080/hello")
        assert doc["status"] == 200
        assert doc["pod"] == f"default/{server}"
        assert doc["client_ip"] == client_ip, "the server must see the client's real pod IP"
        tcp = lab.app("default/echo-1-1", "tcp", server_ip)
        assert tcp["hello"]["peer"].split(":")[0] == client_ip
        assert tcp["hello"]["pod"] == f"default/{server}"
    # the node and the fabric (control plane side) reach pods too
    node = lab.run(
        "exec",
        "--node",
        "node-2",
        "--",
        sys.executable,
        "-m",
        "underpass.lab.sampleapp",
        "http",
        f"http://{client_ip}:8080/",
    )
    assert json.loads(node.stdout)["client_ip"] == "172.30.0.12"  # node-2, via the underlay
    fabric = lab.run(
        "exec",
        "--fabric",
        "--",
        sys.executable,
        "-m",
        "underpass.lab.sampleapp",
        "http",
        f"http://{client_ip}:8080/",
    )
    assert json.loads(fabric.stdout)["client_ip"] == "172.30.0.1"


def test_large_payload_checksums_across_nodes(lab: LabHandle) -> None:
    server_ip = lab.pod_ip("default", "echo-2-2")
    size = str(64 * 1024 * 1024)
    sink = lab.app("default/echo-1-2", "tcp", server_ip, "--sink", size)
    assert sink["match"] and sink["server_bytes"] == int(size)
    assert sink["sha256"] == sink["server_sha256"]
    source = lab.app("default/echo-1-2", "tcp", server_ip, "--source", size)
    assert source["match"] and source["bytes"] == int(size)
    post = lab.app("default/echo-1-2", "http", f"http://{server_ip}:8080/", "--data-size", "8M")
    assert post["match"] and post["body_bytes"] == 8 * 1024 * 1024


def test_up_twice_changes_nothing(lab: LabHandle) -> None:
    def state() -> dict[str, Any]:
        snap = lab.registry.snapshot()
        return {
            "generation": snap.generation,
            "pods": snap.pods,
            "nodes": snap.nodes,
            "netns": sorted(n for n in netns_names() if n.startswith(lab.prefix)),
            "root_links": root_links(),
            "node_links": {n: node_links(lab, n) for n in snap.nodes},
            "routes": {n: node_routes(lab, n) for n in snap.nodes},
            "apps": sorted((p.name, p.read_text()) for p in lab.registry.paths.procs_dir.iterdir()),
            "conflists": [lab.registry.paths.conflist(n).stat().st_mtime_ns for n in snap.nodes],
        }

    before = state()
    report = lab.up()
    assert {p["action"] for p in report["pods"]} == {"unchanged"}
    assert {p["app"] for p in report["pods"]} == {"running"}
    assert state() == before


def test_add_and_delete_pod(lab: LabHandle) -> None:
    added = lab.json(
        "add-pod",
        "default/extra",
        "--node",
        "node-2",
        "--service-account",
        "extra-sa",
        "--label",
        "app=extra",
    )
    ip = added["ip"]
    assert added["action"] == "created" and added["phase"] == "Running"
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.2.0/24")
    lease = lab.registry.paths.ipam_dir("node-2") / "underpass-lab" / ip
    assert lease.exists()
    pod = lab.registry.pod("default", "extra")
    assert pod is not None and pod.service_account == "extra-sa"
    assert pod.labels == {"app": "extra"}
    doc = lab.app("default/echo-1-1", "http", f"http://{ip}:8080/")
    assert doc["pod"] == "default/extra"
    # adding it again is a no-op
    again = lab.json("add-pod", "default/extra", "--node", "node-2")
    assert again["action"] == "unchanged" and again["ip"] == ip

    deleted = lab.json("delete-pod", "default/extra")
    assert deleted["deleted"]["ip"] == ip
    assert not lease.exists(), "host-local must release the IP on CNI DEL"
    assert lab.registry.pod("default", "extra") is None
    assert not os.path.exists(pod.netns)
    assert not processes_mentioning("default/extra")
    cache = lab.registry.paths.cni_cache_dir("node-2") / "results"
    assert not [f for f in cache.iterdir() if pod.container_id in f.name]
    missing = lab.run("delete-pod", "default/extra", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr


async def test_namespace_labels_reach_watchers_as_events(lab: LabHandle) -> None:
    registry = lab.registry
    key = "test.underpass.dev/watched"  # a label the node agents do not act on
    send, recv = trio.open_memory_channel[Any](50)

    async def watch() -> None:
        async for snap in registry.watch():
            await send.send(snap)

    async def label(*args: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "underpass.cli.main",
            "lab",
            "label",
            "--state-dir",
            str(lab.state_dir),
            "namespace",
            "default",
            *args,
        ]
        await trio.run_process(argv, cwd=ROOT, capture_stdout=True, capture_stderr=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        with trio.fail_after(10):
            first = await recv.receive()
        assert key not in first.namespaces["default"].labels
        await label(f"{key}=ambient")
        with trio.fail_after(10):
            snap = await recv.receive()
        assert snap.namespaces["default"].labels[key] == "ambient"
        await label(f"{key}-")
        with trio.fail_after(10):
            snap = await recv.receive()
        assert key not in snap.namespaces["default"].labels
        with trio.move_on_after(0.5) as idle:  # no change, no event
            await recv.receive()
        assert idle.cancelled_caught
        nursery.cancel_scope.cancel()


AGENT_LIKE_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from underpass.lab.registry import LabRegistry
    reg = LabRegistry(Path(sys.argv[1]))
    for i in range(int(sys.argv[3])):
        reg.set_pod_annotations(sys.argv[2], {f"test.underpass.dev/k{i}": str(i)})
    """
)


def test_cli_and_agent_writers_do_not_lose_updates(lab: LabHandle) -> None:
    pod = lab.registry.pod("default", "echo-2-1")
    assert pod is not None
    n_agent, n_cli = 150, 8
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT_LIKE_WRITER, str(lab.state_dir), pod.uid, str(n_agent)],
        cwd=ROOT,
    )
    try:
        for i in range(n_cli):
            lab.run("label", "namespace", "default", f"test-{i}=v{i}")
            lab.run("label", "pod", "default/echo-2-1", f"test-{i}=v{i}")
    finally:
        assert agent.wait(timeout=120) == 0
    after = lab.registry.pod("default", "echo-2-1")
    ns = lab.registry.namespace("default")
    assert after is not None and ns is not None
    assert {f"test.underpass.dev/k{i}" for i in range(n_agent)} <= set(after.annotations)
    assert {f"test-{i}" for i in range(n_cli)} <= set(after.labels)
    assert {f"test-{i}" for i in range(n_cli)} <= set(ns.labels)
    assert (after.ip, after.phase, after.uid) == (pod.ip, pod.phase, pod.uid)
    # undo, for the other tests sharing this lab
    lab.registry.set_pod_annotations(pod.uid, {k: None for k in after.annotations})
    lab.registry.set_pod_labels("default", "echo-2-1", {f"test-{i}": None for i in range(n_cli)})
    lab.registry.set_namespace_labels("default", {f"test-{i}": None for i in range(n_cli)})


def test_exec_errors_are_clear(lab: LabHandle) -> None:
    proc = lab.run("exec", "default/nope", "--", "true", check=False)
    assert proc.returncode == 1 and "pod default/nope not found" in proc.stderr
    proc = lab.run("exec", "--node", "node-9", "--", "true", check=False)
    assert proc.returncode == 1 and "node node-9 not found" in proc.stderr
    proc = lab.run("exec", "default/echo-1-1", "--", "sh", "-c", "exit 7", check=False)
    assert proc.returncode == 7  # the command's own status comes through


def test_down_leaves_nothing_behind(make_lab: Any) -> None:
    handle: LabHandle = make_lab()
    before_netns, before_links, before_nft = netns_names(), root_links(), root_ruleset()
    report = handle.up("--nodes", "2", "--pods-per-node", "1", "--namespaces", "a,b")
    assert len(report["pods"]) == 2
    handle.run("label", "namespace", "a", "istio.io/dataplane-mode=ambient")
    mine = {n for n in netns_names() if n.startswith(f"{handle.prefix}-")}
    assert len(mine) == 1 + 2 + 2  # fabric, nodes, pods
    agents = [n["agent"] for n in handle.json("status")["nodes"]]
    assert all(a["running"] and a["socket_present"] for a in agents), agents
    sockets = [Path(a["socket"]) for a in agents]
    sockets += [handle.registry.paths.zds_socket(n) for n in ("node-1", "node-2")]
    assert all(s.is_socket() for s in sockets)
    assert root_ruleset() == before_nft  # the agents touch only node and pod netns
    inodes = {i for i in (netns.inode(netns.path_of(n)) for n in mine) if i is not None}
    # a process the lab did not start itself, living in a node netns (like a node agent)
    stray = subprocess.Popen(
        ["nsenter", f"--net={netns.path_of(f'{handle.prefix}-node-1')}", "sleep", "600"]
    )
    try:
        assert procs.pids_in(inodes)
        down = handle.down()
        assert stray.wait(timeout=10) != 0  # killed by down
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
    assert sorted(down["netns"]) == sorted(mine)
    assert down["processes"] >= 5  # two apps, two node agents and the stray
    assert [a["pid"] for a in agents if procs.starttime(a["pid"]) is not None] == []  # or zombies
    assert [s for s in sockets if s.exists()] == []
    assert handle.leftovers() == []
    assert {n for n in netns_names() if n.startswith(f"{handle.prefix}-")} == set()
    assert netns_names() - before_netns == set()
    assert root_links() - before_links == set()
    assert procs.pids_in(inodes) == []
    assert not handle.state_dir.exists()
    # down again is a no-op
    again = handle.down()
    assert again["netns"] == [] and again["processes"] == 0


def test_host_link_is_explicit_and_removed_by_down(make_lab: Any) -> None:
    handle: LabHandle = make_lab()
    third = secrets.randbelow(200) + 20
    handle.up(
        "--no-mesh",
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
        "--host-link",
        "--underlay-cidr",
        f"172.31.{third}.0/24",
        "--cluster-cidr",
        f"10.{third}.0.0/16",
        "--service-cidr",
        f"10.{third + 1}.0.0/16",
    )
    ifname = host_ifname(handle.prefix)
    assert ifname in root_links()
    # without the mesh: plain pod networking, no node agents
    conflist = json.loads(handle.registry.paths.conflist("node-1").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["bridge"]
    assert [n["agent"] for n in handle.json("status")["nodes"]] == [None, None]
    assert processes_mentioning(f"cni-agent --node node-1 --lab-registry {handle.state_dir}") == []
    pod_ip = handle.pod_ip("default", "echo-2-1")
    from underpass.lab.sampleapp import http_request

    doc = http_request(f"http://{pod_ip}:8080/")
    assert doc["client_ip"] == f"172.31.{third}.254"
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert f"10.{third}.2.0/24 via 172.31.{third}.12 dev {ifname}" in routes
    handle.down()
    assert ifname not in root_links()
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    assert ifname not in routes and f"172.31.{third}." not in routes


def test_up_refuses_a_clashing_prefix_or_changed_settings(make_lab: Any, tmp_path: Path) -> None:
    first: LabHandle = make_lab()
    first.up("--nodes", "1", "--pods-per-node", "0")
    twin = LabHandle(first.prefix, tmp_path / "twin-state")
    proc = twin.run("up", "--prefix", first.prefix, "--nodes", "1", check=False)
    assert proc.returncode == 1 and "another lab uses this prefix" in proc.stderr
    assert not twin.state_dir.exists()
    proc = first.run("up", "--prefix", "other", check=False)
    assert proc.returncode == 1 and "lab down" in proc.stderr
    proc = first.run("up", "--no-mesh", check=False)
    assert proc.returncode == 1 and "mesh=True, not False" in proc.stderr


FAKE_CHAINED = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
with open({log!r}, "a") as log:
    env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
    log.write(json.dumps({{"env": env, "conf": conf}}) + "\\n")
if os.environ["CNI_COMMAND"] == "ADD":
    print(json.dumps(conf["prevResult"]))
"""


def test_chain_with_a_chained_plugin_gets_bridge_result(make_lab: Any, tmp_path: Path) -> None:
    """With the mesh the chained plugin runs last, with bridge's result; before any
    pod, the lab asks it for a CNI 1.1 STATUS (the node agent's readiness)."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    plugin = plugin_dir / "underpass-cni"
    log = tmp_path / "calls.jsonl"
    plugin.write_text(FAKE_CHAINED.format(python=sys.executable, log=str(log)))
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    handle: LabHandle = make_lab()
    handle.extra_env["UNDERPASS_CNI_PLUGIN"] = str(plugin)
    handle.up("--nodes", "1", "--pods-per-node", "1", "--no-apps")
    pod = handle.registry.pod("default", "echo-1-1")
    assert pod is not None and pod.phase == "Running"
    status, add = [json.loads(line) for line in log.read_text().splitlines()]
    assert status["env"]["CNI_COMMAND"] == "STATUS" and "CNI_CONTAINERID" not in status["env"]
    assert status["conf"]["cniVersion"] == "1.1.0" and "prevResult" not in status["conf"]
    env, conf = add["env"], add["conf"]
    assert env["CNI_COMMAND"] == "ADD" and env["CNI_IFNAME"] == "eth0"
    assert env["CNI_PATH"] == f"/usr/lib/cni:{plugin_dir}"
    assert env["CNI_NETNS"] == pod.netns and env["CNI_CONTAINERID"] == pod.container_id
    assert env["CNI_ARGS"].split(";")[0] == "IgnoreUnknown=1"
    assert f"K8S_POD_UID={pod.uid}" in env["CNI_ARGS"].split(";")
    assert conf["agentSocket"] == str(handle.registry.paths.agent_socket("node-1"))
    assert conf["labRegistry"] == str(handle.state_dir)
    assert conf["name"] == "underpass-lab" and conf["cniVersion"] == "1.0.0"
    prev = conf["prevResult"]  # the real bridge plugin's result
    assert prev["ips"][0]["address"] == f"{pod.ip}/24"
    assert any(i.get("sandbox") == pod.netns for i in prev["interfaces"])
    handle.down()
    dels = [json.loads(line) for line in log.read_text().splitlines()][2:]
    assert [d["env"]["CNI_COMMAND"] for d in dels] == ["DEL"]
    assert dels[0]["conf"]["prevResult"] == prev  # DEL gets the cached ADD result


def test_corrupt_state_is_a_clear_error_and_down_still_cleans_up(make_lab: Any) -> None:
    handle: LabHandle = make_lab()
    handle.up("--nodes", "1", "--pods-per-node", "1")
    pod_file = handle.registry.paths.objects / "pods" / "default.echo-1-1.json"
    pod_file.write_text('{"oops')
    proc = handle.run("status", check=False)
    assert proc.returncode == 1
    assert f"corrupt lab state file {pod_file}" in proc.stderr
    handle.registry.paths.lab_file.write_text("{")
    proc = handle.run("status", check=False)
    assert proc.returncode == 1 and "lab.json" in proc.stderr
    down = handle.down()  # the prefix is recovered from the node objects
    assert down["warnings"] and down["processes"] >= 1
    assert handle.leftovers() == []
