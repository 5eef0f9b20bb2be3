"""Deployment modes 1, 3 and 4 in the lab, with real traffic and mTLS (root only).

- mode 3: each node's ztunnel as a supervisor with one worker process per
  service account: traffic works with each pod's own identity, the
  supervisor holds no workload certificate, each worker holds exactly one and
  was given no credential;
- mode 1 (our own sidecar): node-2's ztunnel stopped, a dedicated ztunnel in
  each of node-2's pods, talking HBONE with node-1's ambient pods both ways;
- mode 4: a waypoint stand-in (a dedicated ztunnel acting as the waypoint)
  that the namespace's service traffic goes through.

One lab for the module; each test restores the node-shared mode it found.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.underpass.lab.labkit import LabHandle
from tests.ztunnel.meshkit import (
    NAMESPACE,
    apply_policy,
    config_dump,
    delete_policy,
    mesh_lab,
    wait_for,
)
from underpass.lab import mesh as lab_mesh
from underpass.lab.cluster import Lab
from underpass.lab.registry import Service, ServicePort

pytestmark = pytest.mark.netns

TD = "cluster.local"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    # two service accounts, so that a node has pods of both
    yield from mesh_lab(
        tmp_path_factory,
        "--nodes",
        "2",
        "--pods-per-node",
        "2",
        "--namespaces",
        NAMESPACE,
        "--service-accounts",
        "a,b",
    )


def pods(lab: LabHandle, node: str) -> list[Any]:
    return sorted(
        (p for p in lab.registry.pods() if p.node == node and p.namespace == NAMESPACE),
        key=lambda p: p.name,
    )


def http(lab: LabHandle, client: Any, server_ip: str, port: int = 8080) -> dict[str, Any]:
    return lab.app(f"{client.namespace}/{client.name}", "http", f"http://{server_ip}:{port}/")


def log_lines(path: Path, event: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in path.read_text().splitlines()
        if line.startswith("{") and f'"{event}"' in line
    ]


def last_access(path: Path, **fields: str) -> dict[str, Any]:
    found = [
        e
        for e in log_lines(path, "connection complete")
        if all(e[k] == v for k, v in fields.items())
    ]
    assert found, f"no access-log line with {fields} in {path}"
    return found[-1]


def identity(pod: Any) -> str:
    return f"spiffe://{TD}/ns/{pod.namespace}/sa/{pod.service_account}"


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def memory_contains(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the process's readable memory (/proc/<pid>/mem)."""
    with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as maps:
        regions = []
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, end))
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in regions:
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue  # a region that went away or cannot be read
    return False


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().decode().split("\0")


def ztunnel_pid(lab: LabHandle, node: str) -> int:
    record = json.loads((lab.state_dir / "procs" / f"ztunnel.{node}.json").read_text())
    pid: int = record["pid"]
    return pid


def test_mode_3_a_worker_per_service_account(lab: LabHandle) -> None:
    lab.run("ztunnel-mode", "service-account")
    try:
        node1, node2 = pods(lab, "node-1"), pods(lab, "node-2")
        accounts = {p.service_account for p in node1}
        assert accounts == {"a", "b"}
        # traffic both ways between every pair of nodes' pods, each with its own identity
        for client, server in [(node1[0], node2[0]), (node1[1], node2[1]), (node2[0], node1[1])]:
            assert server.ip is not None and client.ip is not None
            doc = http(lab, client, server.ip)
            assert doc["client_ip"] == client.ip
        log = lab.state_dir / "logs" / "ztunnel.node-1.log"
        client, server = node2[0], node1[1]
        entry = last_access(log, direction="inbound", dst_workload=f"{NAMESPACE}/{server.name}")
        assert entry["protocol"] == "HBONE"
        assert entry["src_identity"] == identity(client)
        assert entry["dst_identity"] == identity(server)
        # the supervisor holds no certificate; one worker per service account
        dump = config_dump(lab, "node-1")
        assert dump["mode"] == "supervisor (per service account)"
        assert dump["certificates"] == []
        workers = {w["identity"]: w for w in dump["workers"]}
        assert set(workers) == {identity(p) for p in node1}
        # workers are forked from the supervisor's zygote, its only child
        supervisor = ztunnel_pid(lab, "node-1")
        zygote = dump["zygote"]
        assert children(supervisor) == [zygote]
        worker_pids = sorted(w["pid"] for w in workers.values())
        assert sorted(children(zygote)) == worker_pids
        token = (lab.state_dir / "nodes" / "node-1" / "ztunnel.token").read_text().strip()
        for pid in [zygote, *worker_pids]:
            # the node token is nowhere in the zygote or a worker: not in its command
            # line, environment, open files, nor anywhere in its memory
            assert token not in " ".join(cmdline(pid))
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert token.encode() not in environ
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    assert not os.readlink(f"/proc/{pid}/fd/{fd}").endswith("ztunnel.token")
            assert memory_contains(pid, b"--isolation")  # the scan works: argv is found
            assert not memory_contains(pid, token.encode()), f"the token is in {pid}'s memory"
        issued = log_lines(log, "certificate issued")
        assert {e["identity"] for e in issued} >= {identity(p) for p in node1}
    finally:
        lab.run("ztunnel-mode", "shared")
    assert config_dump(lab, "node-1")["mode"] == "shared"


async def test_mode_1_our_own_sidecars_talk_hbone_with_ambient_pods(lab: LabHandle) -> None:
    state = Lab(lab.state_dir)
    cfg = state.config()
    node2 = pods(lab, "node-2")
    node1 = pods(lab, "node-1")
    try:
        assert await lab_mesh.stop_ztunnel(state.paths, "node-2")
        for pod in node2:
            assert await lab_mesh.ensure_sidecar(state.paths, cfg, pod) == "started"
        for pod in node2:
            # the sidecar serves the pod it runs in, with that pod's identity only
            out = lab.run(
                "exec",
                f"{pod.namespace}/{pod.name}",
                "--",
                "curl",
                "-sS",
                "http://127.0.0.1:15000/config_dump",
            ).stdout
            dump = json.loads(out)
            assert dump["mode"] == "dedicated"
            assert [c["identity"] for c in dump["certificates"]] == [identity(pod)]
        # ambient (node-1's ztunnel) -> sidecar, and sidecar -> ambient
        client, server = node1[0], node2[0]
        assert server.ip is not None and client.ip is not None
        assert http(lab, client, server.ip)["client_ip"] == client.ip
        sidecar_log = lab.state_dir / "logs" / f"sidecar.{NAMESPACE}.{server.name}.log"
        entry = last_access(sidecar_log, direction="inbound")
        assert entry["protocol"] == "HBONE" and entry["src_identity"] == identity(client)
        assert http(lab, server, client.ip)["client_ip"] == server.ip
        entry = last_access(sidecar_log, direction="outbound")
        assert entry["protocol"] == "HBONE" and entry["dst_identity"] == identity(client)
        # sidecar -> sidecar on the same node
        other = node2[1]
        assert other.ip is not None
        assert http(lab, server, other.ip)["client_ip"] == server.ip
    finally:
        for pod in node2:
            await lab_mesh.stop_sidecar(state.paths, pod)
        lab.up()
    assert config_dump(lab, "node-2")["mode"] == "shared"


GATEWAY = f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: {NAMESPACE}
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"""


async def test_mode_4_traffic_goes_through_the_waypoint_stand_in(lab: LabHandle) -> None:
    state = Lab(lab.state_dir)
    cfg = state.config()
    registry = lab.registry
    client = pods(lab, "node-1")[0]
    try:
        apply_policy(lab, "waypoint-gateway", GATEWAY)
        lab.run(
            "add-pod",
            f"{NAMESPACE}/waypoint",
            "--node",
            "node-2",
            "--service-account",
            "waypoint",
            "--label",
            "gateway.networking.k8s.io/gateway-name=waypoint",
            "--label",
            "istio.io/dataplane-mode=none",
            "--no-app",
        )
        waypoint_pod = registry.pod(NAMESPACE, "waypoint")
        assert waypoint_pod is not None and waypoint_pod.ip is not None
        with registry.transaction():
            config = registry.config()
            assert config is not None
            used = {s.vip for s in registry.snapshot().services.values()}
            network = ipaddress.ip_network(config.service_cidr)
            vip = next(str(a) for a in list(network.hosts())[20:] if str(a) not in used)
            registry.upsert_service(
                Service(
                    namespace=NAMESPACE,
                    name="waypoint",
                    hostname=f"waypoint.{NAMESPACE}.svc.cluster.local",
                    vip=vip,
                    ports=(ServicePort(15008, 15008, "TCP", "mesh"),),
                    selector={"gateway.networking.k8s.io/gateway-name": "waypoint"},
                )
            )
        assert (
            await lab_mesh.ensure_sidecar(state.paths, cfg, waypoint_pod, waypoint_stand_in=True)
            == "started"
        )
        lab.run("label", "namespace", NAMESPACE, "istio.io/use-waypoint=waypoint")
        echo = next(
            s
            for s in registry.snapshot().services.values()
            if s.namespace == NAMESPACE and s.name == "echo"
        )
        wait_for(
            lab,
            "node-1",
            lambda d: any(
                s["name"] == "echo" and s.get("waypoint") is not None for s in d["services"]
            ),
            what="the echo service going through the waypoint",
        )
        doc = lab.app(f"{client.namespace}/{client.name}", "http", f"http://{echo.vip}:80/")
        assert doc["status"] == 200
        waypoint_log = lab.state_dir / "logs" / f"sidecar.{NAMESPACE}.waypoint.log"
        entry = last_access(waypoint_log, protocol="waypoint->HBONE")
        assert entry["src_identity"] == identity(client)
        out = last_access(
            lab.state_dir / "logs" / "ztunnel.node-1.log",
            direction="outbound",
            dst_workload=f"{NAMESPACE}/waypoint",
        )
        assert out["dst_identity"] == f"spiffe://{TD}/ns/{NAMESPACE}/sa/waypoint"
    finally:
        lab.run("label", "namespace", NAMESPACE, "istio.io/use-waypoint-", check=False)
        delete_policy(lab, "waypoint-gateway")
        registry.delete_service(NAMESPACE, "waypoint")
        pod = registry.pod(NAMESPACE, "waypoint")
        if pod is not None:
            await lab_mesh.stop_sidecar(state.paths, pod)
        lab.run("delete-pod", f"{NAMESPACE}/waypoint", check=False)
