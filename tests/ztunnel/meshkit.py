"""Helpers for netns tests of the whole mesh: a lab with the control plane and ztunnels.

A mesh lab is an ordinary lab (:mod:`tests.underpass.lab.labkit`) whose
``lab up`` also starts the control plane (discovery + CA in the fabric netns)
and one ztunnel per node. These helpers reach a node's ztunnel the way an
operator would: its admin endpoint on the node's own 127.0.0.1:15000, its
metrics on :15020, its JSON log in ``<state>/logs/ztunnel.<node>.log``; and
they write policies as YAML files into ``<state>/policies``, which the
control plane watches.

Waiting for the control plane to push a change is a bounded wait on a
condition read from the admin endpoint: the state lives in another process,
so there is no event to wait on from here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.underpass.lab.labkit import LabHandle, new_handle, require_root, teardown

NAMESPACE = "demo"
AMBIENT = "istio.io/dataplane-mode=ambient"


def mesh_lab(
    tmp_path_factory: pytest.TempPathFactory, *up_args: str, ambient: bool = True
) -> Iterator[LabHandle]:
    """A 2-node lab with the mesh, namespace ``demo`` enrolled; torn down after."""
    require_root()
    args = up_args or ("--nodes", "2", "--pods-per-node", "2", "--namespaces", NAMESPACE)
    handle = new_handle(tmp_path_factory.mktemp("meshlab"), *args)
    try:
        handle.up()
        if ambient:
            handle.run("label", "namespace", NAMESPACE, AMBIENT)
            for node in ("node-1", "node-2"):
                wait_for(
                    handle,
                    node,
                    lambda dump: (
                        len(dump["pods"]) == 2
                        and sum(w["tunnel_protocol"] == "HBONE" for w in dump["workloads"]) >= 4
                    ),
                    what="both pods of the node served and every workload on HBONE",
                )
        yield handle
    finally:
        teardown(handle)


def node_exec(handle: LabHandle, node: str, *argv: str, check: bool = True) -> str:
    return handle.run("exec", "--node", node, "--", *argv, check=check).stdout


def admin(handle: LabHandle, node: str, path: str, method: str = "GET") -> str:
    """A request to the node's ztunnel admin endpoint (127.0.0.1:15000 in the node netns)."""
    return node_exec(
        handle, node, "curl", "-sS", "-m", "5", "-X", method, f"http://127.0.0.1:15000{path}"
    )


def config_dump(handle: LabHandle, node: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(admin(handle, node, "/config_dump"))
    return doc


def metrics(handle: LabHandle, node: str) -> str:
    return node_exec(handle, node, "curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics")


def wait_for(
    handle: LabHandle,
    node: str,
    condition: Callable[[dict[str, Any]], bool],
    *,
    what: str,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """The node's config dump once ``condition`` holds (bounded; fails with the last dump)."""
    deadline = time.monotonic() + timeout
    dump: dict[str, Any] = {}
    while True:
        dump = config_dump(handle, node)
        if condition(dump):
            return dump
        if time.monotonic() > deadline:
            pytest.fail(f"{node}'s ztunnel never had {what} within {timeout}s; last dump: {dump}")
        time.sleep(0.1)


def ztunnel_log(handle: LabHandle, node: str) -> list[dict[str, Any]]:
    """The node's ztunnel log, one JSON object per line."""
    path = handle.state_dir / "logs" / f"ztunnel.{node}.log"
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def access_logs(handle: LabHandle, node: str) -> list[dict[str, Any]]:
    return [e for e in ztunnel_log(handle, node) if e.get("event") == "connection complete"]


def policy_dir(handle: LabHandle) -> Path:
    return handle.state_dir / "policies"


def apply_policy(handle: LabHandle, name: str, text: str) -> Path:
    """Write a policy YAML file the control plane picks up (atomically)."""
    directory = policy_dir(handle)
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.yaml"
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)
    return path


def delete_policy(handle: LabHandle, name: str) -> None:
    (policy_dir(handle) / f"{name}.yaml").unlink(missing_ok=True)


def policy_names(dump: dict[str, Any]) -> set[str]:
    return {f"{p['namespace']}/{p['name']}" for p in dump["policies"]}


__all__ = [
    "AMBIENT",
    "NAMESPACE",
    "access_logs",
    "admin",
    "apply_policy",
    "config_dump",
    "delete_policy",
    "mesh_lab",
    "metrics",
    "node_exec",
    "policy_names",
    "teardown",
    "wait_for",
    "ztunnel_log",
]
