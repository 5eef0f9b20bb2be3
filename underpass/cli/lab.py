"""``underpass lab``: run a cluster of network namespaces on this machine.

Owns the command-line face of :mod:`underpass.lab`: argument parsing, tables
and JSON output, and turning lab errors into one readable line and exit
status 1. The work itself is in :mod:`underpass.lab.cluster`.

    underpass lab up --nodes 2 --pods-per-node 2 [--no-mesh] [--json]
    underpass lab status
    underpass lab exec default/echo-1-1 -- python -m underpass.lab.sampleapp http http://10.244.2.2:8080/
    underpass lab exec --node node-1 -- ip route
    underpass lab label namespace default istio.io/dataplane-mode=ambient
    underpass lab add-pod default/extra --node node-2
    underpass lab delete-pod default/extra
    underpass lab down
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from underpass.cli import table
from underpass.lab import sampleapp
from underpass.lab.errors import LabError
from underpass.lab.registry import (
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    LabRegistry,
    default_state_dir,
)


def _csv(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _pod_ref(text: str) -> tuple[str, str]:
    namespace, _, name = text.rpartition("/")
    return namespace or "default", name


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "lab",
        help="a local cluster: nodes and pods made of network namespaces, wired by real CNI",
        description=(
            "The lab: nodes are network namespaces on an underlay bridge, pods are network "
            "namespaces wired by the real CNI plugins (loopback, bridge + host-local, then "
            "underpass-cni), a node agent (underpass cni-agent) runs in every node, and a "
            "registry stands in for the Kubernetes API. Label a namespace "
            "istio.io/dataplane-mode=ambient to put its pods in the mesh."
        ),
    )
    lab_sub = p.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"the lab's state directory (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")

    up = lab_sub.add_parser(
        "up", parents=[common, out], help="create (or complete) the lab; idempotent"
    )
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    up.add_argument("--pods-per-node", type=int, default=2, help="pods per node (default 2)")
    up.add_argument(
        "--namespaces",
        type=_csv,
        default=("default",),
        help="comma-separated namespaces, pods spread over them (default: default)",
    )
    up.add_argument(
        "--service-accounts",
        type=_csv,
        default=("default",),
        help="comma-separated service accounts, pods spread over them (default: default)",
    )
    up.add_argument(
        "--prefix", default=None, help="name prefix of every netns (default: underpass)"
    )
    up.add_argument("--underlay-cidr", default=None, help="default 172.30.0.0/24")
    up.add_argument(
        "--cluster-cidr", default=None, help="pod CIDRs, a /24 per node (10.244.0.0/16)"
    )
    up.add_argument("--service-cidr", default=None, help="service VIPs (default 10.96.0.0/16)")
    up.add_argument(
        "--host-link",
        action="store_true",
        default=None,
        help="also link the root netns to the underlay (the only root-netns change; "
        "removed by down)",
    )
    up.add_argument(
        "--mesh",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the mesh's capture path: a node agent per node (underpass cni-agent, log "
        "in STATE/logs/agent.NODE.log) and underpass-cni at the end of each node's CNI "
        "chain (default: on; --no-mesh gives plain pod networking; fixed for a lab's life)",
    )
    up.add_argument("--no-apps", action="store_true", help="do not start the sample app in pods")
    up.add_argument("--no-services", action="store_true", help="do not create echo services")
    up.set_defaults(func=_guard(_cmd_up))

    down = lab_sub.add_parser(
        "down", parents=[common, out], help="remove every netns, link, process and file"
    )
    down.add_argument(
        "--prefix", default=None, help="clean up by name even without (readable) state"
    )
    down.set_defaults(func=_guard(_cmd_down))

    status = lab_sub.add_parser("status", parents=[common, out], help="nodes, pods, services")
    status.set_defaults(func=_guard(_cmd_status))

    ex = lab_sub.add_parser(
        "exec",
        parents=[common],
        help="run a command in a pod's (or node's) network namespace",
        usage="underpass lab exec [--state-dir D] (NS/POD | --node NODE | --fabric) -- CMD...",
    )
    where = ex.add_mutually_exclusive_group()
    where.add_argument("--node", help="the node's netns instead of a pod's")
    where.add_argument("--fabric", action="store_true", help="the underlay's netns")
    ex.add_argument("target", nargs="?", help="pod as namespace/name (or name in default)")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="command (default: $SHELL)")
    ex.set_defaults(func=_guard(_cmd_exec))

    lb = lab_sub.add_parser(
        "label", parents=[common, out], help="set (key=value) or remove (key-) labels"
    )
    lb.add_argument("kind", choices=("namespace", "ns", "node", "pod"))
    lb.add_argument("name", help="namespace or node name, or pod as namespace/name")
    lb.add_argument("labels", nargs="+", metavar="key=value|key-")
    lb.add_argument("--overwrite", action="store_true", help="allow changing existing values")
    lb.set_defaults(func=_guard(_cmd_label))

    add = lab_sub.add_parser("add-pod", parents=[common, out], help="create a pod (CNI ADD)")
    add.add_argument("pod", help="namespace/name")
    add.add_argument("--node", required=True)
    add.add_argument("--service-account", default="default")
    add.add_argument(
        "--label", type=_label, action="append", default=[], help="key=value (repeatable)"
    )
    add.add_argument("--no-app", action="store_true", help="do not start the sample app")
    add.set_defaults(func=_guard(_cmd_add_pod))

    rm = lab_sub.add_parser("delete-pod", parents=[common, out], help="delete a pod (CNI DEL)")
    rm.add_argument("pod", help="namespace/name")
    rm.set_defaults(func=_guard(_cmd_delete_pod))

    zm = lab_sub.add_parser(
        "ztunnel-mode",
        parents=[common, out],
        help="run the nodes' ztunnels shared (mode 2) or per service account (mode 3)",
        description="Restart ztunnel on every node (or --node) in the given mode; the mode "
        "is kept for later `lab up` runs. service-account: a supervisor that holds no "
        "workload key and a worker process per service account with pods on the node.",
    )
    zm.add_argument("mode", choices=("shared", "service-account"))
    zm.add_argument("--node", action="append", help="only this node (repeatable)")
    zm.set_defaults(func=_guard(_cmd_ztunnel_mode))

    app = lab_sub.add_parser(
        "app", help="the sample app: echo servers and clients (run them with `lab exec`)"
    )
    sampleapp.add_arguments(app)
    app.set_defaults(func=sampleapp.run)


def leaf_error(exc: BaseException) -> BaseException:
    """The error inside (nested) exception groups, as trio nurseries raise them: a
    KeyboardInterrupt if there is one, else the first leaf."""
    while isinstance(exc, BaseExceptionGroup):
        interrupt, _ = exc.split(KeyboardInterrupt)
        exc = interrupt.exceptions[0] if interrupt is not None else exc.exceptions[0]
    return exc


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # pyroute2 logs every netlink message at debug: keep `--log-level debug` readable
        for noisy in ("pyroute2", "asyncio"):
            logging.getLogger(noisy).setLevel(max(logging.INFO, logging.root.level))
        try:
            return fn(args)
        except BaseExceptionGroup as group:
            exc = leaf_error(group)
            if isinstance(exc, KeyboardInterrupt):
                raise exc from None
            if not isinstance(exc, LabError):
                raise
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except LabError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else default_state_dir()


def _lab(args: argparse.Namespace) -> Any:
    from underpass.lab.cluster import Lab

    return Lab(_state_dir(args))


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- commands


def _cmd_up(args: argparse.Namespace) -> int:
    import trio

    from underpass.lab.cluster import UpOptions

    lab = _lab(args)
    opts = UpOptions(
        nodes=args.nodes,
        pods_per_node=args.pods_per_node,
        namespaces=tuple(args.namespaces),
        service_accounts=tuple(args.service_accounts),
        prefix=args.prefix,
        underlay_cidr=args.underlay_cidr,
        cluster_cidr=args.cluster_cidr,
        service_cidr=args.service_cidr,
        host_link=args.host_link,
        mesh=args.mesh,
        apps=not args.no_apps,
        services=not args.no_services,
    )
    report = trio.run(lab.up, opts)
    if args.json:
        _print_json(report)
        return 0
    _print_status(lab.status())
    changed = [p for p in report["pods"] if p["action"] != "unchanged"]
    mean = report["cni_add_ms_mean"]
    started = [n for n, action in report["agents"].items() if action != "running"]
    mesh_started = [n for n, action in report.get("mesh", {}).items() if action != "running"]
    print(
        f"\nlab {report['lab']['prefix']} up in {report['seconds']:.2f} s: "
        f"{len(report['pods'])} pods, {len(changed)} (re)created"
        + (f", mean CNI ADD {mean} ms" if mean is not None else "")
        + (f", node agents (re)started on {', '.join(started)}" if started else "")
        + (f", (re)started {', '.join(mesh_started)}" if mesh_started else "")
    )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    import trio

    lab = _lab(args)
    report = trio.run(lab.down, args.prefix)
    if args.json:
        _print_json(report)
    else:
        for warning in report["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        print(
            f"lab down in {report['seconds']:.2f} s: removed {len(report['netns'])} netns, "
            f"{report['pods']} pods (CNI DEL), {report['processes']} processes, "
            f"{len(report['links'])} root links, state {report['state_dir']}"
        )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = _lab(args).status()
    if args.json:
        _print_json(status)
    else:
        _print_status(status)
    return 0


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _agent_cell(agent: dict[str, Any] | None) -> str:
    if agent is None:
        return "-"  # no mesh in this lab
    if agent["running"]:
        return f"running (pid {agent['pid']})"
    return "NOT RUNNING"


def _print_status(status: dict[str, Any]) -> None:
    print(render_status(status), end="")


def render_status(status: dict[str, Any], *, services: bool = True) -> str:
    """``lab status`` as text: a header line, then nodes, namespaces, pods (and
    services) tables separated by blank lines."""
    lab = status["lab"]
    mesh = (
        f"mesh on (logs: {lab['state_dir']}/logs/agent.NODE.log, ztunnel.NODE.log, "
        "controlplane.log)"
        if lab["mesh"]
        else "mesh off"
    )
    parts = [
        f"lab {lab['prefix']}  state {lab['state_dir']}  underlay {lab['underlay_cidr']} "
        f"(fabric {lab['fabric_ip']}{', host ' + lab['host_ip'] if lab['host_ip'] else ''})\n"
        f"{mesh}\n",
        table.render(
            ["node", "underlay ip", "pod cidr", "pods", "agent", "ztunnel", "netns"],
            [
                [
                    n["name"],
                    n["underlay_ip"],
                    n["pod_cidr"],
                    n["pods"],
                    _agent_cell(n["agent"]),
                    _agent_cell(n.get("ztunnel")),
                    n["netns"] if n["netns_present"] else f"{n['netns']} (missing)",
                ]
                for n in status["nodes"]
            ],
        ),
        table.render(
            ["namespace", "labels"],
            [[n["name"], _labels(n["labels"])] for n in status["namespaces"]],
        ),
        render_pods(status),
    ]
    if services and status["services"]:
        parts.append(
            table.render(
                ["namespace", "service name", "service vip", "ports", "endpoints"],
                [
                    [
                        s["namespace"],
                        s["name"],
                        s["vip"],
                        ",".join(f"{p['port']}->{p['target_port']}" for p in s["ports"]),
                        len(s["endpoints"]),
                    ]
                    for s in status["services"]
                ],
            )
        )
    return "\n".join(parts)


def render_pods(status: dict[str, Any]) -> str:
    """The pods table of ``lab status``."""
    return table.render(
        [
            "namespace",
            "pod name",
            "node",
            "address",
            "service account",
            "status",
            "enrolled",
            "app",
        ],
        [
            [
                p["namespace"],
                p["name"],
                p["node"],
                p["ip"],
                p["service_account"],
                p["phase"] if p["netns_present"] else f"{p['phase']} (netns missing)",
                p["enrolled"],
                "running" if p["app_running"] else None,
            ]
            for p in status["pods"]
        ],
    )


def _cmd_exec(args: argparse.Namespace) -> int:
    registry = LabRegistry(_state_dir(args))
    command: Sequence[str] = list(args.command)
    target = args.target
    env = dict(os.environ)
    env["UNDERPASS_LAB_STATE_DIR"] = str(registry.state_dir)
    if target == "--":  # `lab exec --node n -- cmd`: argparse took "--" as the target
        target = None
    elif command and command[0] == "--":
        command = command[1:]
    if args.node:
        if target is not None:
            command = [target, *command]
        node = registry.node(args.node)
        if node is None:
            raise LabError(f"node {args.node} not found in the lab at {registry.state_dir}")
        path = node.netns
    elif args.fabric:
        if target is not None:
            command = [target, *command]
        cfg = registry.config()
        if cfg is None:
            raise LabError(f"no lab at {registry.state_dir}")
        path = cfg.fabric_netns
    else:
        if not target:
            raise LabError("name a pod (namespace/name), or use --node / --fabric")
        namespace, name = _pod_ref(target)
        pod = registry.pod(namespace, name)
        if pod is None:
            raise LabError(f"pod {namespace}/{name} not found in the lab at {registry.state_dir}")
        if not os.path.exists(pod.netns):
            raise LabError(f"pod {namespace}/{name} has no network namespace ({pod.phase})")
        path = pod.netns
        env["UNDERPASS_POD"] = f"{namespace}/{name}"
    if not command:
        command = [os.environ.get("SHELL", "/bin/sh")]
    from underpass.lab.netns import argv_in

    argv = argv_in(path, command)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)  # noqa: S606 - replacing this process is the point
    return 127  # pragma: no cover - exec does not return


def _cmd_label(args: argparse.Namespace) -> int:
    kind = "namespace" if args.kind == "ns" else args.kind
    lab = _lab(args)
    obj, changed = lab.label(kind, args.name, args.labels, overwrite=args.overwrite)
    if args.json:
        from underpass.lab.cluster import obj_dict

        _print_json({"kind": kind, "changed": changed, "object": obj_dict(obj)})
    else:
        removing = all(arg.endswith("-") and "=" not in arg for arg in args.labels)
        verb = ("unlabeled" if removing else "labeled") if changed else "not labeled"
        print(f"{kind}/{args.name} {verb}")
    return 0


def _cmd_add_pod(args: argparse.Namespace) -> int:
    import trio

    from underpass.lab.cluster import PodSpec

    namespace, name = _pod_ref(args.pod)
    spec = PodSpec(namespace, name, args.node, args.service_account, dict(args.label))
    lab = _lab(args)
    outcome = trio.run(lambda: lab.add_pod(spec, app=not args.no_app))
    if args.json:
        _print_json(outcome.to_dict())
    elif outcome.action == "unchanged":
        print(f"pod/{name} unchanged (running on {outcome.pod.node} with IP {outcome.pod.ip})")
    else:
        print(
            f"pod/{name} created in namespace {namespace} on {outcome.pod.node} with IP "
            f"{outcome.pod.ip} (CNI ADD {outcome.cni_add_ms} ms)"
        )
    return 0


def _cmd_ztunnel_mode(args: argparse.Namespace) -> int:
    import trio

    lab = _lab(args)
    actions = trio.run(lab.set_ztunnel_mode, args.mode, args.node)
    if args.json:
        _print_json(actions)
    else:
        for node, action in actions.items():
            print(f"ztunnel on {node}: {args.mode} ({action})")
    return 0


def _cmd_delete_pod(args: argparse.Namespace) -> int:
    import trio

    namespace, name = _pod_ref(args.pod)
    lab = _lab(args)
    pod = trio.run(lab.delete_pod, namespace, name)
    if args.json:
        from underpass.lab.cluster import pod_dict

        _print_json({"deleted": pod_dict(pod)})
    else:
        print(f'pod "{name}" deleted (released {pod.ip})')
    return 0
