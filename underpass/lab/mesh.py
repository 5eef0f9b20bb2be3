"""The mesh's own processes in a lab: the control plane and one ztunnel per node.

Owns their life cycle in a lab whose config has ``mesh`` on (the node agents
are :mod:`underpass.lab.agents`):

- the control plane: ``underpass discovery`` (xDS and the CA in one process)
  in the fabric netns, listening on the fabric bridge's address
  (``<fabric ip>:15012``, TLS with a serving certificate for that IP), its
  registry the lab itself (pods, services, namespaces, and the policy YAML
  files in ``<state>/policies``), callers authenticated by a lab token file
  holding one token per node's ztunnel (``istio-system/ztunnel``, the trusted
  node agent). Its CA state (root key 0600) lives in ``<state>/controlplane``.
- ztunnel: ``underpass ztunnel`` in each node's netns, talking ZDS to that
  node's agent, xDS and CA to the control plane with its node's token; its
  admin, metrics and readiness on the node's own 127.0.0.1:15000 / :15020 /
  :15021. It reports ready (the spawn pipe) only once it has the control
  plane's state and has processed the agent's snapshot.

Both are started the way :mod:`underpass.lab.agents` starts agents: records
in ``<state>/procs``, logs in ``<state>/logs``, readiness through a pipe (no
polling); ``lab down`` stops them with everything else. The core never
imports the components: they run as processes.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Final

import structlog

from underpass.lab import procs
from underpass.lab.errors import LabError
from underpass.lab.registry import LabConfig, LabPaths, Node, Pod

CONTROL_PLANE_KEY: Final = "controlplane"
XDS_PORT: Final = 15012
NODE_AGENT_NAMESPACE: Final = "istio-system"
NODE_AGENT_SERVICE_ACCOUNT: Final = "ztunnel"
#: The control plane generates its CA key on first start.
CONTROL_PLANE_READY_TIMEOUT: Final = 60.0
#: ztunnel is ready once it has the state and the agent's snapshot.
ZTUNNEL_READY_TIMEOUT: Final = 60.0

log = structlog.get_logger("underpass.lab.mesh")


def control_plane_dir(paths: LabPaths) -> Path:
    return paths.state_dir / "controlplane"


def root_cert_path(paths: LabPaths) -> Path:
    return control_plane_dir(paths) / "ca" / "ca-cert.pem"  # self-signed: the root


def tokens_path(paths: LabPaths) -> Path:
    return control_plane_dir(paths) / "tokens.json"


def ztunnel_token_path(paths: LabPaths, node: str) -> Path:
    return paths.node_dir(node) / "ztunnel.token"


def ztunnel_key(node: str) -> str:
    return f"ztunnel.{node}"


def ztunnel_log(paths: LabPaths, node: str) -> Path:
    return paths.logs_dir / f"ztunnel.{node}.log"


#: The environment of every proxy process (ztunnels, their per-service-account
#: workers, our sidecars and the waypoint stand-in), as a production image sets it:
#: - glibc gives each thread that allocates its own malloc arena; ztunnel's few
#:   threads (the in-pod listener threads) would each keep one. Two are plenty.
#: - PYTHONOPTIMIZE=2 (``-OO``) drops docstrings: about half of a proxy's memory is
#:   code objects, and their docstrings are 2.2 MiB of a node's ztunnel (measured
#:   with 20 pods). Proxy code never relies on ``assert`` for a check that matters.
PROXY_ENV: Final = {"MALLOC_ARENA_MAX": "2", "PYTHONOPTIMIZE": "2"}

#: How a node's ztunnel runs: ``shared`` (mode 2) or ``service-account`` (mode 3).
ZTUNNEL_MODES: Final = ("shared", "service-account")


def ztunnel_mode_path(paths: LabPaths, node: str) -> Path:
    return paths.node_dir(node) / "ztunnel-mode"


def ztunnel_mode(paths: LabPaths, node: str) -> str:
    """The node's ztunnel mode, as last set (``shared`` unless set otherwise)."""
    try:
        mode = ztunnel_mode_path(paths, node).read_text().strip()
    except FileNotFoundError:
        return "shared"
    if mode not in ZTUNNEL_MODES:
        raise LabError(f"{ztunnel_mode_path(paths, node)} says {mode!r}: not a ztunnel mode")
    return mode


async def set_ztunnel_mode(paths: LabPaths, cfg: LabConfig, node: Node, mode: str) -> str:
    """Restart the node's ztunnel in ``mode`` (kept for later ``lab up`` runs)."""
    if mode not in ZTUNNEL_MODES:
        raise LabError(f"unknown ztunnel mode {mode!r}; one of {', '.join(ZTUNNEL_MODES)}")
    ztunnel_mode_path(paths, node.name).write_text(mode + "\n")
    await stop_ztunnel(paths, node.name)
    return await ensure_ztunnel(paths, cfg, node)


def control_plane_address(cfg: LabConfig) -> str:
    return f"{cfg.fabric_ip}:{XDS_PORT}"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by the owner only from the first byte (replacing atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _token_entries(paths: LabPaths) -> list[dict[str, str]]:
    try:
        entries: list[dict[str, str]] = json.loads(tokens_path(paths).read_text())
    except FileNotFoundError:
        return []
    return entries


def write_tokens(paths: LabPaths, nodes: list[Node]) -> None:
    """One fresh token per node's ztunnel: its own file, and the CA's token table
    (tokens of sidecars already in the table are kept)."""
    entries = [e for e in _token_entries(paths) if e["namespace"] != NODE_AGENT_NAMESPACE]
    for node in nodes:
        token = secrets.token_urlsafe(32)
        _write_private(ztunnel_token_path(paths, node.name), token + "\n")
        entries.append(
            {
                "token": token,
                "namespace": NODE_AGENT_NAMESPACE,
                "service_account": NODE_AGENT_SERVICE_ACCOUNT,
                "pod": f"ztunnel-{node.name}",
                "node": node.name,
            }
        )
    _write_private(tokens_path(paths), json.dumps(entries, indent=2))


def control_plane_argv(paths: LabPaths, cfg: LabConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "underpass.cli.main",
        "--log-format",
        "json",
        "discovery",
        "serve",
        "--registry",
        "lab",
        "--lab-state-dir",
        str(paths.state_dir),
        "--auth",
        "lab",
        "--lab-tokens",
        str(tokens_path(paths)),
        "--state-dir",
        str(control_plane_dir(paths) / "ca"),
        "--listen",
        control_plane_address(cfg),
        "--serving-ip",
        cfg.fabric_ip,
        "--metrics-port",
        "15014",
        "--ready-fd",
        str(procs.READY_FD),
    ]


def ztunnel_argv(paths: LabPaths, cfg: LabConfig, node: Node) -> list[str]:
    return [
        sys.executable,
        "-m",
        "underpass.cli.main",
        "--log-format",
        "json",
        "ztunnel",
        "--node",
        node.name,
        "--zds-socket",
        str(paths.zds_socket(node.name)),
        "--xds-address",
        control_plane_address(cfg),
        "--ca-root-cert",
        str(root_cert_path(paths)),
        "--token-file",
        str(ztunnel_token_path(paths, node.name)),
        "--pod-name",
        f"ztunnel-{node.name}",
        "--pod-ip",
        node.underlay_ip,
        "--drain-timeout",
        "5",
        "--isolation",
        ztunnel_mode(paths, node.name),
        "--ready-fd",
        str(procs.READY_FD),
    ]


async def ensure_control_plane(paths: LabPaths, cfg: LabConfig, nodes: list[Node]) -> str:
    """The control plane running (``running`` or ``started``); tokens for every node."""
    record = procs.read_record(paths.procs_dir, CONTROL_PLANE_KEY)
    if record is not None and procs.is_alive(record):
        if all(ztunnel_token_path(paths, n.name).exists() for n in nodes):
            return "running"
        # A node was added: new tokens, and the CA re-reads its token file by itself.
        write_tokens(paths, nodes)
        return "running"
    if record is not None:
        await procs.stop(paths.procs_dir, CONTROL_PLANE_KEY)
    write_tokens(paths, nodes)
    log_path = paths.logs_dir / "controlplane.log"
    started = await procs.spawn(
        paths.procs_dir,
        CONTROL_PLANE_KEY,
        control_plane_argv(paths, cfg),
        netns_path=cfg.fabric_netns,
        log_path=log_path,
        ready_timeout=CONTROL_PLANE_READY_TIMEOUT,
    )
    if not root_cert_path(paths).exists():
        await procs.stop(paths.procs_dir, CONTROL_PLANE_KEY)
        raise LabError(
            f"the control plane started but wrote no root certificate at "
            f"{root_cert_path(paths)}; its log is {log_path}"
        )
    log.info("lab.controlplane.started", pid=started.pid, address=control_plane_address(cfg))
    return "started"


async def ensure_ztunnel(paths: LabPaths, cfg: LabConfig, node: Node) -> str:
    """The node's ztunnel running and ready (``running``, ``started`` or ``restarted``)."""
    key = ztunnel_key(node.name)
    record = procs.read_record(paths.procs_dir, key)
    if record is not None and procs.is_alive(record):
        return "running"
    if record is not None:
        await procs.stop(paths.procs_dir, key)
    log_path = ztunnel_log(paths, node.name)
    started = await procs.spawn(
        paths.procs_dir,
        key,
        ztunnel_argv(paths, cfg, node),
        env=PROXY_ENV,
        netns_path=node.netns,
        log_path=log_path,
        ready_timeout=ZTUNNEL_READY_TIMEOUT,
    )
    log.info("lab.ztunnel.started", node=node.name, pid=started.pid, log=str(log_path))
    return "restarted" if record is not None else "started"


# -- sidecars (mode 1 with our own proxy; mode 4's waypoint stand-in) ----------------------


def sidecar_key(pod: Pod) -> str:
    return f"sidecar.{pod.namespace}.{pod.name}"


def sidecar_token_path(paths: LabPaths, pod: Pod) -> Path:
    return paths.node_dir(pod.node) / f"{sidecar_key(pod)}.token"


def _add_pod_token(paths: LabPaths, pod: Pod) -> None:
    """A token for the pod itself in the CA's table (it asks for its own identity)."""
    token = secrets.token_urlsafe(32)
    _write_private(sidecar_token_path(paths, pod), token + "\n")
    entries = [
        e
        for e in _token_entries(paths)
        if not (e["namespace"] == pod.namespace and e["pod"] == pod.name)
    ]
    entries.append(
        {
            "token": token,
            "namespace": pod.namespace,
            "service_account": pod.service_account,
            "pod": pod.name,
            "node": pod.node,
        }
    )
    _write_private(tokens_path(paths), json.dumps(entries, indent=2))


def sidecar_argv(
    paths: LabPaths, cfg: LabConfig, pod: Pod, *, waypoint_stand_in: bool = False
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "underpass.cli.main",
        "--log-format",
        "json",
        "ztunnel",
        "--node",
        pod.node,
        "--dedicated",
        f"{pod.namespace}/{pod.name}",
        "--service-account",
        pod.service_account,
        "--xds-address",
        control_plane_address(cfg),
        "--ca-root-cert",
        str(root_cert_path(paths)),
        "--token-file",
        str(sidecar_token_path(paths, pod)),
        "--pod-name",
        pod.name,
        "--pod-namespace",
        pod.namespace,
        "--pod-ip",
        pod.ip or "127.0.0.1",
        "--admin-address",
        "127.0.0.1:15000",
        "--metrics-address",
        "127.0.0.1:15020",
        "--readiness-address",
        "127.0.0.1:15021",
        "--drain-timeout",
        "5",
        "--ready-fd",
        str(procs.READY_FD),
    ]
    if waypoint_stand_in:
        argv.append("--waypoint-stand-in")
    return argv


async def ensure_sidecar(
    paths: LabPaths, cfg: LabConfig, pod: Pod, *, waypoint_stand_in: bool = False
) -> str:
    """Our own proxy inside ``pod``'s netns, serving only that pod, with its own token.

    The pod must be captured by the agent (its namespace enrolled) for traffic
    to reach it, and its node's ztunnel must not serve it too: run sidecars on
    nodes whose ztunnel is stopped (:func:`stop_ztunnel`).
    """
    key = sidecar_key(pod)
    record = procs.read_record(paths.procs_dir, key)
    if record is not None and procs.is_alive(record):
        return "running"
    if record is not None:
        await procs.stop(paths.procs_dir, key)
    _add_pod_token(paths, pod)
    await procs.spawn(
        paths.procs_dir,
        key,
        sidecar_argv(paths, cfg, pod, waypoint_stand_in=waypoint_stand_in),
        env=PROXY_ENV,
        netns_path=pod.netns,
        log_path=paths.logs_dir / f"{key}.log",
        ready_timeout=ZTUNNEL_READY_TIMEOUT,
    )
    return "started" if record is None else "restarted"


async def stop_sidecar(paths: LabPaths, pod: Pod) -> bool:
    """Stop the pod's sidecar and revoke its token (the CA re-reads its table)."""
    stopped = await procs.stop(paths.procs_dir, sidecar_key(pod), timeout=10.0)
    entries = _token_entries(paths)
    kept = [e for e in entries if not (e["namespace"] == pod.namespace and e["pod"] == pod.name)]
    if len(kept) != len(entries):
        _write_private(tokens_path(paths), json.dumps(kept, indent=2))
    sidecar_token_path(paths, pod).unlink(missing_ok=True)
    return stopped


async def stop_ztunnel(paths: LabPaths, node: str) -> bool:
    return await procs.stop(paths.procs_dir, ztunnel_key(node), timeout=10.0)


def state(paths: LabPaths, node: str) -> dict[str, Any]:
    """The node's ztunnel as ``lab status`` shows it."""
    record = procs.read_record(paths.procs_dir, ztunnel_key(node))
    running = record is not None and procs.is_alive(record)
    return {
        "running": running,
        "pid": record.pid if record is not None and running else None,
        "mode": ztunnel_mode(paths, node),
        "log": str(ztunnel_log(paths, node)),
    }
