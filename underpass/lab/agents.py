"""The node agents the lab runs: one ``underpass cni-agent`` per node (the mesh's capture path).

Owns the agents' life cycle in a lab whose config has ``mesh`` on:

- start: inside the node's netns (as a host-network DaemonSet pod runs on a
  real node), with the node's sockets (:meth:`LabPaths.agent_socket`, the one
  the node's conflist names, and :meth:`LabPaths.zds_socket`), ``--probe-snat``,
  and its log in ``<state>/logs/agent.<node>.log``. It is ready when it writes
  ``ready`` on its readiness pipe (both sockets accept connections) *and* the
  chain's ``underpass-cni`` answers a CNI STATUS through it; both are events,
  nothing is polled;
- ensure (``lab up``): a running agent is left alone; a dead one is started
  again (it reconciles its node on start: rules replaced atomically, stale ones
  removed); an agent running in the node's netns without a record (its record
  lost) is stopped first, so that a node never has two;
- stop: SIGTERM (SIGKILL if it lingers), then its sockets are removed;
- state: what ``lab status`` shows.

The agent itself is :mod:`cni.agent`; the lab only runs it as a process (the
core never imports a component).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Final

import structlog

from underpass.lab import netns, procs
from underpass.lab.cni_runner import UNDERPASS_CNI, CniRunner
from underpass.lab.errors import CniError, LabError
from underpass.lab.registry import LabPaths, Node

#: Agent start-up includes reconciling every pod of the node (one nft run each).
READY_TIMEOUT: Final = 60.0

log = structlog.get_logger("underpass.lab.agents")


def agent_key(node: str) -> str:
    """The agent's process record key (``<state>/procs/agent.<node>.json``)."""
    return f"agent.{node}"


def agent_argv(paths: LabPaths, node: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "underpass.cli.main",
        "--log-format",
        "json",
        "cni-agent",
        "--node",
        node,
        "--lab-registry",
        str(paths.state_dir),
        "--cni-socket",
        str(paths.agent_socket(node)),
        "--zds-socket",
        str(paths.zds_socket(node)),
        "--probe-snat",
        "--ready-fd",
        str(procs.READY_FD),
    ]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def untracked_agents(paths: LabPaths, node: Node) -> list[int]:
    """Agents of this lab running in the node's netns that no live record names."""
    inode = netns.inode(node.netns)
    if inode is None:
        return []
    record = procs.read_record(paths.procs_dir, agent_key(node.name))
    tracked = record.pid if record is not None and procs.is_alive(record) else None
    found = []
    for pid in procs.pids_in({inode}):
        argv = _cmdline(pid)
        if pid != tracked and "cni-agent" in argv and str(paths.state_dir) in argv:
            found.append(pid)
    return found


def remove_sockets(paths: LabPaths, node: str) -> list[Path]:
    """Remove the node's agent and ZDS sockets; the ones that were there."""
    removed = []
    for path in (paths.agent_socket(node), paths.zds_socket(node)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


async def ensure(paths: LabPaths, node: Node, runner: CniRunner, conflist: Any) -> str:
    """Make sure the node's agent runs and answers; ``running``, ``started`` or ``restarted``."""
    key = agent_key(node.name)
    record = procs.read_record(paths.procs_dir, key)
    if record is not None and procs.is_alive(record):
        return "running"
    strays = untracked_agents(paths, node)
    if strays:
        log.warning("lab.agent.untracked", node=node.name, pids=strays)
        await procs.terminate(strays)
    if record is not None:
        log.warning("lab.agent.dead", node=node.name, pid=record.pid)
        await procs.stop(paths.procs_dir, key)  # drops the stale record
    remove_sockets(paths, node.name)
    log_path = paths.agent_log(node.name)
    started = await procs.spawn(
        paths.procs_dir,
        key,
        agent_argv(paths, node.name),
        netns_path=node.netns,
        log_path=log_path,
        ready_timeout=READY_TIMEOUT,
    )
    try:
        await runner.status(conflist, UNDERPASS_CNI)
    except CniError as exc:
        await stop(paths, node.name)
        raise LabError(
            f"the node agent of {node.name} started but does not answer underpass-cni's "
            f"STATUS: {exc}. Its log is {log_path}"
        ) from exc
    action = "restarted" if record is not None or strays else "started"
    log.info("lab.agent." + action, node=node.name, pid=started.pid, log=str(log_path))
    return action


async def stop(paths: LabPaths, node: str) -> bool:
    """Stop the node's agent and remove its sockets; False if none was running."""
    running = await procs.stop(paths.procs_dir, agent_key(node))
    remove_sockets(paths, node)
    return running


def state(paths: LabPaths, node: str) -> dict[str, Any]:
    """The node's agent as ``lab status`` shows it."""
    record = procs.read_record(paths.procs_dir, agent_key(node))
    running = record is not None and procs.is_alive(record)
    return {
        "running": running,
        "pid": record.pid if record is not None and running else None,
        "socket": str(paths.agent_socket(node)),
        "socket_present": paths.agent_socket(node).exists(),
        "log": str(paths.agent_log(node)),
    }
