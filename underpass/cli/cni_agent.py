"""``underpass cni-agent``: run the CNI node agent of one node (see :mod:`cni.agent`)."""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "cni-agent",
        help="run the CNI node agent: capture mesh pods on this node, serve ZDS to ztunnel",
        description=(
            "Decide which pods on the node join the ambient mesh, install the "
            "redirection rules inside their network namespaces, record "
            "ambient.istio.io/redirection on them, and hand their namespaces to "
            "ztunnel over ZDS. Reacts to namespace/pod label changes without restarts."
        ),
    )
    p.add_argument("--node", required=True, help="name of the node this agent serves")
    p.add_argument(
        "--lab-registry",
        metavar="DIR",
        default=None,
        help="lab state directory to read pods from "
        "(default: $UNDERPASS_LAB_STATE_DIR or /run/underpass/lab)",
    )
    p.add_argument(
        "--cni-socket",
        metavar="PATH",
        default=None,
        help="unix socket the underpass-cni plugin talks to (its agentSocket; default: "
        "the lab's per-node DIR/nodes/NODE/agent.sock)",
    )
    p.add_argument(
        "--zds-socket",
        metavar="PATH",
        default=None,
        help="SOCK_SEQPACKET socket ztunnel connects to (default: the lab's per-node "
        "DIR/nodes/NODE/ztunnel.sock)",
    )
    p.add_argument(
        "--mesh-namespace",
        default="istio-system",
        help="the mesh's own namespace, never captured (default: istio-system)",
    )
    p.add_argument(
        "--exclude-namespace",
        action="append",
        default=[],
        metavar="NS",
        help="a namespace never captured (repeatable; kube-system always is)",
    )
    p.add_argument(
        "--probe-snat",
        action="store_true",
        help="SNAT the node's own TCP to captured pods (kubelet probes) to 169.254.7.127 "
        "with a table in the node's netns (off by default: it changes the node's tables)",
    )
    p.add_argument(
        "--node-netns",
        metavar="PATH",
        default=None,
        help="the node's netns for --probe-snat (default: the netns the agent runs in)",
    )
    p.add_argument(
        "--ready-fd",
        type=int,
        default=None,
        metavar="FD",
        help="write 'ready' and a newline to this inherited descriptor, then close it, once "
        "both sockets accept connections (how `underpass lab up` waits for the agent)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import structlog
    import trio

    from cni.agent import Agent, AgentConfig, lab_source
    from cni.enrolment import Policy
    from cni.errors import CniError

    log = structlog.get_logger("cni.agent")
    state_dir = args.lab_registry or os.environ.get("UNDERPASS_LAB_STATE_DIR", "/run/underpass/lab")
    node_dir = os.path.join(state_dir, "nodes", args.node)
    cni_socket = args.cni_socket or os.path.join(node_dir, "agent.sock")
    zds_socket = args.zds_socket or os.path.join(node_dir, "ztunnel.sock")
    try:
        source = lab_source(state_dir)
    except CniError as exc:
        log.error("cannot start the cni agent", error=str(exc))
        return 1
    config = AgentConfig(
        node=args.node,
        cni_socket=cni_socket,
        zds_socket=zds_socket,
        policy=Policy.build(args.mesh_namespace, args.exclude_namespace),
        probe_snat=args.probe_snat,
        node_netns=args.node_netns,
    )
    agent = Agent(config, source)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            if args.ready_fd is not None:
                os.write(args.ready_fd, b"ready\n")
                os.close(args.ready_fd)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("cni agent stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0
