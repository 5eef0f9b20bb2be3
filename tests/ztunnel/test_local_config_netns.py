"""A lab node's ztunnel fed by ``--local-config`` instead of the control plane (root only).

node-2's ztunnel is replaced by one reading a YAML file written from the lab
registry; traffic from node-1 (fed by the control plane) to node-2's pods
works over HBONE; then the file is deleted and the last state keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tests.underpass.lab.labkit import LabHandle
from tests.ztunnel.meshkit import NAMESPACE, mesh_lab, wait_for
from underpass.lab import mesh as lab_mesh
from underpass.lab import procs
from underpass.lab.cluster import Lab

pytestmark = pytest.mark.netns

NODE = "node-2"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    yield from mesh_lab(tmp_path_factory)


def local_config(lab: LabHandle) -> dict[str, Any]:
    """The lab's pods and services in the local config's shape (as discovery would send)."""
    snapshot = lab.registry.snapshot()
    workloads = []
    for pod in snapshot.pods.values():
        if pod.namespace != NAMESPACE or pod.ip is None:
            continue
        workloads.append(
            {
                "name": pod.name,
                "namespace": pod.namespace,
                "addresses": [pod.ip],
                "tunnel_protocol": "HBONE",
                "service_account": pod.service_account,
                "node": pod.node,
            }
        )
    return {"workloads": workloads, "services": [], "policies": []}


def test_local_config_serves_and_outlives_its_file(lab: LabHandle, tmp_path: Path) -> None:
    state = Lab(lab.state_dir)
    cfg = state.config()
    node = state.registry.node(NODE)
    assert node is not None
    config_file = tmp_path / "ztunnel-local.yaml"
    config_file.write_text(yaml.safe_dump(local_config(lab)))
    argv = lab_mesh.ztunnel_argv(state.paths, cfg, node)
    at = argv.index("--xds-address")
    argv[at : at + 2] = [
        "--local-config",
        str(config_file),
        "--ca-address",
        lab_mesh.control_plane_address(cfg),
    ]
    key = "ztunnel-local.node-2"
    client = next(p for p in lab.registry.pods() if p.node == "node-1")
    server = next(p for p in lab.registry.pods() if p.node == NODE)
    assert client.ip is not None and server.ip is not None

    async def swap() -> None:
        await lab_mesh.stop_ztunnel(state.paths, NODE)
        await procs.spawn(
            state.paths.procs_dir,
            key,
            argv,
            netns_path=node.netns,
            log_path=state.paths.logs_dir / f"{key}.log",
            ready_timeout=lab_mesh.ZTUNNEL_READY_TIMEOUT,
        )

    try:
        trio.run(swap)
        dump = wait_for(
            lab, NODE, lambda d: len(d["pods"]) == 2, what="its two pods from the agent"
        )
        assert "local_config" in dump and "xds" not in dump
        assert {w["name"] for w in dump["workloads"]} == {
            p.name for p in lab.registry.pods() if p.namespace == NAMESPACE
        }
        doc = lab.app(f"{client.namespace}/{client.name}", "http", f"http://{server.ip}:8080/")
        assert doc["client_ip"] == client.ip
        log = state.paths.logs_dir / f"{key}.log"
        lines = [
            json.loads(x) for x in log.read_text().splitlines() if '"connection complete"' in x
        ]
        assert lines and lines[-1]["protocol"] == "HBONE"
        assert lines[-1]["src_identity"].endswith(f"/sa/{client.service_account}")
        # the file goes away: ztunnel notices, and the last good state keeps serving
        config_file.unlink()
        dump = wait_for(
            lab,
            NODE,
            lambda d: d["local_config"]["last_error"] is not None,
            what="noticed that its local config file is gone",
        )
        assert len(dump["workloads"]) == 4
        doc = lab.app(f"{client.namespace}/{client.name}", "http", f"http://{server.ip}:8080/")
        assert doc["client_ip"] == client.ip
    finally:

        async def restore() -> None:
            await procs.stop(state.paths.procs_dir, key, timeout=10.0)

        trio.run(restore)
        lab.up()
