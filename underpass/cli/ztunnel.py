"""``underpass ztunnel``: run the node's L4 tunnel (see :mod:`ztunnel.app`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_TOKEN_FILE = "/var/run/secrets/tokens/istio-token"  # noqa: S105 (a path)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "ztunnel",
        help="run ztunnel, the node-shared L4 mTLS tunnel (one per node)",
        description=(
            "Serve every captured pod on this node: take pods from the node agent over ZDS, "
            "listen inside each pod's network namespace (15001 outbound, 15006 inbound "
            "plaintext, 15008 inbound HBONE), carry their traffic over mTLS with each pod's "
            "own SPIFFE identity and enforce L4 authorization. State comes from the control "
            "plane (--xds-address) or a local file (--local-config); certificates from the "
            "CA with node impersonation."
        ),
    )
    env = os.environ.get
    p.add_argument(
        "--node",
        default=env("NODE_NAME"),
        required=env("NODE_NAME") is None,
        help="name of this node (default: $NODE_NAME)",
    )
    p.add_argument(
        "--zds-socket",
        default="/var/run/ztunnel/ztunnel.sock",
        metavar="PATH",
        help="the node agent's ZDS socket (default: %(default)s)",
    )
    state = p.add_argument_group("state (exactly one)")
    state.add_argument(
        "--xds-address",
        metavar="HOST:PORT",
        help="control plane (Delta ADS), e.g. discovery.istio-system:15012",
    )
    state.add_argument(
        "--local-config",
        type=Path,
        metavar="FILE",
        help="workloads, services and policies from this YAML file, reloaded when it changes",
    )
    state.add_argument(
        "--xds-plaintext",
        action="store_true",
        help="talk to the control plane without TLS (its port 15010; no token is sent)",
    )
    identity = p.add_argument_group("identity")
    identity.add_argument(
        "--ca-address",
        metavar="HOST:PORT",
        help="the CA (default: the --xds-address, as the control plane serves both)",
    )
    identity.add_argument(
        "--ca-root-cert",
        type=Path,
        metavar="FILE",
        help="root certificate(s) that sign the CA's and control plane's serving certificate "
        "(required, except for a per-service-account worker)",
    )
    identity.add_argument(
        "--token-file",
        type=Path,
        default=Path(env("UNDERPASS_TOKEN_FILE", DEFAULT_TOKEN_FILE)),
        metavar="FILE",
        help="this ztunnel's bearer token (re-read on every use, so rotation works; "
        "default: %(default)s)",
    )
    identity.add_argument(
        "--server-name",
        metavar="NAME",
        help="name the control plane's certificate carries, when the address is not it",
    )
    identity.add_argument("--trust-domain", default="cluster.local", help="default: %(default)s")
    identity.add_argument("--cluster-id", default="Kubernetes", help="default: %(default)s")
    ports = p.add_argument_group("node-side endpoints")
    ports.add_argument(
        "--admin-address", default="127.0.0.1:15000", help="admin (default: %(default)s)"
    )
    ports.add_argument(
        "--metrics-address", default="0.0.0.0:15020", help="Prometheus (default: %(default)s)"
    )
    ports.add_argument(
        "--readiness-address", default="0.0.0.0:15021", help="readiness (default: %(default)s)"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long connections may finish when a pod leaves or ztunnel stops "
        "(default: %(default)s)",
    )
    modes = p.add_argument_group("deployment modes (default: shared, one ztunnel per node)")
    modes.add_argument(
        "--isolation",
        choices=("shared", "service-account"),
        default="shared",
        help="service-account: a supervisor that holds no workload key and starts one "
        "worker process per service account on the node, each holding only that key "
        "(mode 3)",
    )
    modes.add_argument(
        "--dedicated",
        metavar="NS/POD",
        help="serve only the pod whose network namespace this process runs in, as its own "
        "proxy (mode 1: a sidecar), with the pod's own token (--token-file)",
    )
    modes.add_argument(
        "--service-account",
        default="default",
        help="with --dedicated: the pod's service account (default: %(default)s)",
    )
    modes.add_argument(
        "--waypoint-stand-in",
        action="store_true",
        help="with --dedicated: act as a plain L4 waypoint (mode 4 until the L7 waypoint "
        "exists): tunnels arriving on 15008 are forwarded to their authority over HBONE",
    )
    p.add_argument("--worker-identity", help=argparse.SUPPRESS)
    p.add_argument("--worker-zds-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-signer-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pod-name", default=env("POD_NAME", "ztunnel"), help=argparse.SUPPRESS)
    p.add_argument(
        "--pod-namespace", default=env("POD_NAMESPACE", "istio-system"), help=argparse.SUPPRESS
    )
    p.add_argument("--pod-ip", default=env("INSTANCE_IP", "127.0.0.1"), help=argparse.SUPPRESS)
    p.add_argument(
        "--ready-fd",
        type=int,
        default=None,
        metavar="FD",
        help="write 'ready' and a newline to this inherited descriptor once the listeners are "
        "up (how `underpass lab up` waits for it)",
    )
    p.set_defaults(func=run)


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SystemExit(f"underpass ztunnel: {what} must be HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (the default for an unspecified host)


def _token_reader(path: Path) -> Callable[[], str]:
    def read() -> str:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise RuntimeError(f"cannot read the token file {path}: {exc.strerror}") from None

    return read


def _worker_base_argv(args: argparse.Namespace) -> list[str]:
    """How a mode-3 supervisor starts its workers: this program, the node's settings,
    no credential (the supervisor adds the state source and the worker's sockets)."""
    return [
        sys.executable,
        "-m",
        "underpass.cli.main",
        "--log-format",
        "json",
        "ztunnel",
        "--node",
        args.node,
        "--trust-domain",
        args.trust_domain,
        "--cluster-id",
        args.cluster_id,
        "--drain-timeout",
        str(args.drain_timeout),
        "--pod-name",
        args.pod_name,
        "--pod-namespace",
        args.pod_namespace,
        "--pod-ip",
        args.pod_ip,
        "--token-file",
        os.devnull,
    ]


def run(args: argparse.Namespace) -> int:
    import structlog
    import trio

    from identity.spiffe import SpiffeId
    from underpass.zds import WorkloadInfo
    from ztunnel.app import CaSettings, WorkerSettings, XdsSettings, ZtunnelConfig, run_ztunnel
    from ztunnel.pod import ProxySettings

    log = structlog.get_logger("ztunnel")
    if (args.xds_address is None) == (args.local_config is None):
        log.error("give exactly one state source: --xds-address or --local-config")
        return 2
    worker = None
    if args.worker_identity is not None:
        worker = WorkerSettings(
            SpiffeId.parse(args.worker_identity), args.worker_zds_fd, args.worker_signer_fd
        )
    dedicated = None
    if args.dedicated is not None:
        namespace, slash, name = args.dedicated.partition("/")
        if not slash or not namespace or not name:
            log.error("--dedicated takes NS/POD", got=args.dedicated)
            return 2
        dedicated = WorkloadInfo(name, namespace, args.service_account)
    if args.waypoint_stand_in and dedicated is None:
        log.error("--waypoint-stand-in runs as a dedicated proxy: give --dedicated NS/POD too")
        return 2
    ca_address = args.ca_address or args.xds_address
    root_pem = b""
    ca = None
    if worker is None:
        if ca_address is None:
            log.error("--ca-address is needed with --local-config (the pods' certificates)")
            return 2
        if args.ca_root_cert is None:
            log.error("--ca-root-cert is required")
            return 2
        try:
            root_pem = args.ca_root_cert.read_bytes()
        except OSError as exc:
            log.error("cannot read --ca-root-cert", path=str(args.ca_root_cert), error=exc.strerror)
            return 1
    token = _token_reader(args.token_file)
    if worker is None:
        ca = CaSettings(ca_address, root_pem, token, server_name=args.server_name)
    xds = None
    if args.xds_address is not None:
        plaintext = args.xds_plaintext or worker is not None
        xds = XdsSettings(
            address=args.xds_address,
            root_pem=None if plaintext else root_pem,
            token=None if plaintext else token,
            server_name=args.server_name,
            pod_name=args.pod_name,
            pod_namespace=args.pod_namespace,
            pod_ip=args.pod_ip,
        )
    endpoints_on = worker is None
    zygote = None
    if args.isolation == "service-account" and worker is None and dedicated is None:
        from ztunnel.zygote import Zygote

        # Workers are forked from a zygote that shares this process's imported modules.
        # Now, before any thread, event loop or credential: the zygote copies what we hold.
        zygote = Zygote.fork()
    config = ZtunnelConfig(
        proxy=ProxySettings(
            node=args.node,
            cluster=args.cluster_id,
            trust_domain=args.trust_domain,
            drain_timeout=args.drain_timeout,
            waypoint_stand_in=args.waypoint_stand_in,
        ),
        zds_socket=args.zds_socket,
        local_config=args.local_config,
        xds=xds,
        ca=ca,
        admin_address=_host_port(args.admin_address, "--admin-address") if endpoints_on else None,
        metrics_address=(
            _host_port(args.metrics_address, "--metrics-address") if endpoints_on else None
        ),
        readiness_address=(
            _host_port(args.readiness_address, "--readiness-address") if endpoints_on else None
        ),
        isolation=args.isolation,
        worker_base_argv=tuple(_worker_base_argv(args)),
        worker=worker,
        dedicated=dedicated,
        zygote=zygote,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def serve(
                *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
            ) -> None:
                try:
                    await run_ztunnel(config, task_status=task_status)
                finally:
                    # Stopped (e.g. a worker whose supervisor went before it was ready):
                    # nothing is left to wait for.
                    nursery.cancel_scope.cancel()

            ztunnel = await nursery.start(serve)
            await ztunnel.wait_ready()
            log.info("ztunnel ready")
            if args.ready_fd is not None:
                os.write(args.ready_fd, b"ready\n")
                os.close(args.ready_fd)

    try:
        trio.run(main)
    except OSError as exc:
        log.error("ztunnel cannot start", error=str(exc))
        return 1
    return 0
