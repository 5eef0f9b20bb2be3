"""The lab runs the mesh's capture path by default: a node agent per node and
``underpass-cni`` in every chain; labels enrol and release running pods (root only).

Everything goes through the lab's command line (``underpass lab ...``) as a user
would drive it; waits are on registry events (inotify), never sleeps.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
from typing import Any

import pytest
import trio

from tests.underpass.lab.labkit import LabHandle
from underpass.lab import netns
from underpass.lab.procs import processes_mentioning
from underpass.lab.registry import REDIRECTION_ANNOTATION, Snapshot

pytestmark = pytest.mark.netns

MODE = "istio.io/dataplane-mode"
OUR_TABLE = "table inet underpass {"


def ruleset(handle: LabHandle, pod: str) -> str:
    """``nft list ruleset`` run inside the pod's network namespace."""
    return handle.run("exec", pod, "--", "nft", "list", "ruleset").stdout


def probe_snat(handle: LabHandle, node: str) -> str:
    out = handle.run("exec", "--node", node, "--", "nft", "list", "table", "ip", "underpass_node")
    return out.stdout


async def until_enrolled(
    handle: LabHandle, pods: list[tuple[str, str]], enrolled: bool, timeout: float = 30
) -> Snapshot:
    """Wait (on registry events) until every pod's annotation says ``enrolled``."""

    def done(snap: Snapshot) -> bool:
        return all(k in snap.pods and snap.pods[k].enrolled is enrolled for k in pods)

    with trio.fail_after(timeout):
        return await handle.registry.until(done)


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().decode().split("\0")


def agent_processes(handle: LabHandle) -> list[int]:
    """The node agents of this lab (by command line: tracked or not)."""
    return [
        pid
        for pid in processes_mentioning(f"--lab-registry {handle.state_dir} ")
        if "cni-agent" in cmdline(pid)
    ]


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Wait until ``pid`` has exited (its pidfd polls readable), or fail."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(timeout * 1000), f"process {pid} still running after {timeout}s"
    finally:
        os.close(fd)


def app_pids(handle: LabHandle) -> dict[str, int]:
    procs_dir = handle.registry.paths.procs_dir
    return {
        p.stem: json.loads(p.read_text())["pid"]
        for p in procs_dir.glob("app.*.json")
        if not p.name.startswith(".")
    }


def test_up_runs_a_ready_agent_per_node_before_any_pod(lab: LabHandle) -> None:
    status = lab.json("status")
    assert status["lab"]["mesh"] is True
    pods = status["pods"]
    assert len(pods) == 4 and all(p["phase"] == "Running" for p in pods)
    nodes = {n["name"]: n for n in status["nodes"]}
    assert sorted(nodes) == ["node-1", "node-2"]
    for pod in pods:
        cidr = ipaddress.ip_network(nodes[pod["node"]]["pod_cidr"])
        assert ipaddress.ip_address(pod["ip"]) in cidr
    assert sorted(p["node"] for p in pods) == ["node-1", "node-1", "node-2", "node-2"]
    paths = lab.registry.paths
    for name, node in nodes.items():
        agent = node["agent"]
        assert agent["running"] and agent["socket_present"], agent
        assert agent["socket"] == str(paths.agent_socket(name))
        # the agent lives in its node's netns, with the node's sockets and probe SNAT
        assert os.stat(f"/proc/{agent['pid']}/ns/net").st_ino == netns.inode(node["netns"])
        argv = cmdline(agent["pid"])
        for arg in ("cni-agent", str(paths.zds_socket(name)), "--probe-snat"):
            assert arg in argv
        assert paths.zds_socket(name).is_socket()
        # every pod's CNI ADD went through this node's agent, after it was ready
        events = [json.loads(line) for line in paths.agent_log(name).read_text().splitlines()]
        names = [e["event"] for e in events]
        assert "cni agent ready" in names
        adds = [e for e in events if e["event"] == "cni add"]
        assert sorted(e["pod"] for e in adds) == sorted(
            f"{p['namespace']}/{p['name']}" for p in pods if p["node"] == name
        )
        assert names.index("cni agent ready") < names.index("cni add")
        assert not any(e["enrol"] for e in adds)  # namespace default is not in the mesh
    conflist = json.loads(paths.conflist("node-2").read_text())
    assert conflist["plugins"][-1] == {
        "type": "underpass-cni",
        "agentSocket": str(paths.agent_socket("node-2")),
        "labRegistry": str(lab.state_dir),
    }
    table = lab.run("status").stdout
    assert "mesh on (logs: " in table and "/logs/agent.NODE.log" in table
    assert table.count("running (pid ") == 4  # an agent and a ztunnel per node


async def test_labels_enrol_and_release_running_pods_without_restarts(lab: LabHandle) -> None:
    keys = [(p.namespace, p.name) for p in lab.registry.pods()]
    assert len(keys) == 4
    apps_before = app_pids(lab)
    netns_before = {p.name: netns.inode(p.netns) for p in lab.registry.pods()}
    try:
        lab.run("label", "namespace", "default", f"{MODE}=ambient")
        snap = await until_enrolled(lab, keys, True)
        for pod in snap.pods.values():
            assert pod.annotations[REDIRECTION_ANNOTATION] == "enabled"
            rules = ruleset(lab, f"{pod.namespace}/{pod.name}")
            assert rules.count(OUR_TABLE) == 1, rules
            assert rules.count("redirect to :15001") == 1 and "redirect to :15006" in rules
            assert pod.ip is not None and pod.ip in probe_snat(lab, pod.node)  # probe SNAT
        # no restart: same app processes, same network namespaces
        assert app_pids(lab) == apps_before
        assert {p.name: netns.inode(p.netns) for p in lab.registry.pods()} == netns_before
        # captured and carried by the nodes' ztunnels: the server still sees the client's IP
        server_ip = lab.pod_ip("default", "echo-2-1")
        tunnelled = lab.app("default/echo-1-1", "http", f"http://{server_ip}:8080/")
        assert tunnelled["client_ip"] == lab.pod_ip("default", "echo-1-1")
        log = (lab.state_dir / "logs" / "ztunnel.node-2.log").read_text()
        assert '"protocol": "HBONE"' in log and '"direction": "inbound"' in log

        lab.run("label", "namespace", "default", f"{MODE}-")
        snap = await until_enrolled(lab, keys, False)
        for pod in snap.pods.values():
            assert REDIRECTION_ANNOTATION not in pod.annotations
            assert OUR_TABLE not in ruleset(lab, f"{pod.namespace}/{pod.name}")
        doc = lab.app("default/echo-1-1", "http", f"http://{server_ip}:8080/")
        assert doc["client_ip"] == lab.pod_ip("default", "echo-1-1")
        assert app_pids(lab) == apps_before
    finally:
        lab.run("label", "namespace", "default", f"{MODE}-", check=False)
        await until_enrolled(lab, keys, False)


async def test_add_pod_into_an_ambient_namespace_comes_up_enrolled(lab: LabHandle) -> None:
    try:
        first = lab.json("add-pod", "mesh/first", "--node", "node-1", "--no-app")
        assert first["enrolled"] is False  # namespace mesh is new: not in the mesh yet
        lab.run("label", "namespace", "mesh", f"{MODE}=ambient")
        await until_enrolled(lab, [("mesh", "first")], True)

        second = lab.json("add-pod", "mesh/second", "--node", "node-2", "--no-app")
        assert second["enrolled"] is True and second["phase"] == "Running"
        assert second["annotations"] == {REDIRECTION_ANNOTATION: "enabled"}
        assert ruleset(lab, "mesh/second").count(OUR_TABLE) == 1
        assert second["ip"] in probe_snat(lab, "node-2")
        # CNI DEL reaches the agent, which releases the pod from the node side too
        lab.json("delete-pod", "mesh/second")
        assert second["ip"] not in probe_snat(lab, "node-2")
    finally:
        for pod in ("mesh/second", "mesh/first"):
            lab.run("delete-pod", pod, check=False)
        lab.run("label", "namespace", "mesh", f"{MODE}-", check=False)


async def test_a_dead_agent_fails_closed_and_up_reconciles(make_lab: Any) -> None:
    handle: LabHandle = make_lab("--nodes", "1", "--pods-per-node", "2")
    handle.up()
    keys = [("default", "echo-1-1"), ("default", "echo-1-2")]
    handle.run("label", "namespace", "default", f"{MODE}=ambient")
    await until_enrolled(handle, keys, True)

    (agent,) = [n["agent"] for n in handle.json("status")["nodes"]]
    os.kill(agent["pid"], signal.SIGKILL)
    wait_gone(agent["pid"])
    assert "NOT RUNNING" in handle.run("status").stdout
    # meanwhile, someone adds a rule to our table in a captured pod
    junk = ["nft", "add", "rule", "inet", "underpass", "outbound", "counter"]
    handle.run("exec", "default/echo-1-1", "--", *junk)

    # fail closed: a pod that must be captured does not start without its agent...
    late = handle.run("add-pod", "default/late", "--node", "node-1", "--no-app", check=False)
    assert late.returncode == 1
    assert "code 11" in late.stderr and "must be captured" in late.stderr, late.stderr
    assert "`underpass lab up" in late.stderr  # and the lab says how to get it back
    failed = handle.registry.pod("default", "late")
    assert failed is not None and failed.phase == "Failed" and netns.inode(failed.netns) is None
    # ...while a pod outside the mesh is never broken by a missing agent
    plain = handle.json("add-pod", "plain/p", "--node", "node-1", "--no-app")
    assert plain["phase"] == "Running" and plain["enrolled"] is False

    report = handle.up()
    assert report["agents"] == {"node-1": "restarted"}
    (new,) = agent_processes(handle)
    assert new != agent["pid"]
    for key in keys:
        pod = handle.registry.pod(*key)
        assert pod is not None and pod.enrolled
        rules = ruleset(handle, "/".join(key))
        assert rules.count(OUR_TABLE) == 1 and rules.count("redirect to :15001") == 1
        assert "counter" not in rules  # replaced atomically on reconcile: no duplicates
    assert OUR_TABLE not in ruleset(handle, "plain/p")
    repaired = handle.json("add-pod", "default/late", "--node", "node-1", "--no-app")
    assert repaired["action"] == "repaired" and repaired["enrolled"] is True

    # up again: idempotent, the same agent
    assert handle.up()["agents"] == {"node-1": "running"}
    assert agent_processes(handle) == [new]
    # an agent whose record was lost is replaced, never doubled
    (handle.registry.paths.procs_dir / "agent.node-1.json").unlink()
    assert handle.up()["agents"] == {"node-1": "restarted"}
    wait_gone(new)
    (newest,) = agent_processes(handle)
    assert newest != new
    rules = ruleset(handle, "default/echo-1-1")
    assert rules.count(OUR_TABLE) == 1 and rules.count("redirect to :15001") == 1
