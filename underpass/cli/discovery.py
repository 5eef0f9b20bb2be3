"""``underpass discovery``: run the control plane (Delta ADS + the CA in one process).

``underpass discovery serve`` serves workload discovery
(``envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources``)
over TLS on 15012 with the certificate authority's ``IstioCertificateService``
on the same port, and plaintext xDS on 15010 only with ``--plaintext-listen``.
On 15012 every xDS call and every CA call must carry a bearer token that
``--auth`` accepts (lab token file or TokenReview, see
:mod:`discovery.xdsauth`); the plaintext port authenticates nobody.
The registry (``--registry``) says what exists:

- ``model``: a static model file (``--model``, YAML; see
  :mod:`discovery.modelfile`), or nothing;
- ``lab``: the lab's state directory (``--lab-state-dir``) plus its policy
  directory (``--lab-policies``; see :mod:`discovery.registries.lab`); the CA
  authenticates lab tokens (``--lab-tokens``) and checks impersonation
  against the lab's pods;
- ``kubernetes``: the API server (in a pod, or ``--kubeconfig``); the CA
  authenticates with TokenReviews and checks impersonation against the
  watched pods; the CA's root certificate is published into every namespace
  (``istio-ca-root-cert``) unless ``--no-root-cert-configmaps``.

Prints one ``ready:`` line once it serves; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

DEFAULT_STATE_DIR = Path("/var/lib/underpass/ca")
DEFAULT_METRICS_PORT = 15014
DEFAULT_NODE_AGENTS = ("istio-system/ztunnel",)

DESCRIPTION = """\
Run the Underpass control plane: workload discovery over Delta ADS (what ztunnel
subscribes to) and the certificate authority, in one process.

  TLS 15012      xDS + CA (serving certificate issued by the CA itself); every call
                 must carry 'authorization: Bearer <token>' accepted by --auth, and an
                 xDS client's node must be of its token's namespace
  plaintext      xDS only, when --plaintext-listen is given (e.g. 0.0.0.0:15010);
                 NOT authenticated (tokens never travel in clear): whoever reaches it
                 reads every workload and policy, so bind it to a trusted address
  metrics        Prometheus /metrics on --metrics-port (default 15014)

Registries (--registry): model (a static YAML file, --model), lab (the lab's state
directory and policy directory), kubernetes (list + watch of the API server; needs the
ClusterRole shown in the README).

Translation follows Istio ambient: namespaces labelled istio.io/dataplane-mode=ambient
are in the mesh; istio.io/use-waypoint picks waypoints; AuthorizationPolicy and
PeerAuthentication become L4 Authorization resources, failing closed (and logged)
where a field cannot be enforced at L4.
"""


def _kube_client(args: argparse.Namespace) -> Any:
    """An ``ApiClient`` from --kubeconfig, else the pod's in-cluster configuration."""
    from kubernetes import client, config

    from discovery.registries.errors import RegistryConfigError

    configuration = client.Configuration()
    try:
        if args.kubeconfig:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(args.kubeconfig), client_configuration=configuration
            )
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except Exception as exc:
        raise RegistryConfigError(
            f"cannot configure the Kubernetes client ({type(exc).__name__}: {exc}); "
            "run in a pod or pass --kubeconfig"
        ) from None
    # One long-lived connection per watch, plus TokenReviews and ConfigMap writes.
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


def _build_registry(args: argparse.Namespace, kube: Any, ca: Any) -> tuple[Any, Any]:
    """(Registry, its NodeIndex or None)."""
    from discovery.modelfile import load_model
    from discovery.registry import MemoryRegistry

    if args.registry == "lab":
        from discovery.registries.lab import LabModelRegistry
        from underpass.lab.registry import default_state_dir

        lab = LabModelRegistry(
            args.lab_state_dir or default_state_dir(), policies=args.lab_policies
        )
        lab.check()  # before anything else starts
        return lab, lab.node_index
    if args.registry == "kubernetes":
        from discovery.registries.kubernetes import KubernetesRegistry
        from discovery.registries.rootcert import RootCertPublisher

        publisher = None
        if not args.no_root_cert_configmaps:
            publisher = RootCertPublisher(kube, lambda: str(ca.root_bundle_pem))
        k8s = KubernetesRegistry(
            kube, resync_period=args.resync_period, root_cert_publisher=publisher
        )
        return k8s, k8s.node_index
    return MemoryRegistry(load_model(args.model) if args.model else None), None


def _resolve_registry_options(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on --registry; refuse contradictions."""
    from discovery.registries.errors import RegistryConfigError

    if args.registry is None:
        args.registry = "model"
    if args.model is not None and args.registry != "model":
        raise RegistryConfigError(
            f"--model is for --registry model, not --registry {args.registry}"
        )
    lab_only = [f for f in ("lab_state_dir", "lab_policies") if getattr(args, f) is not None]
    if lab_only and args.registry != "lab":
        flags = ", ".join("--" + f.replace("_", "-") for f in lab_only)
        raise RegistryConfigError(f"{flags} are for --registry lab")
    if args.auth is None:
        args.auth = "kubernetes" if args.registry == "kubernetes" else "lab"
    if args.resync_period <= 0:
        raise RegistryConfigError("--resync-period must be positive")


def _load_ca(args: argparse.Namespace) -> Any:
    from identity.ca import CertificateAuthority

    if args.plugged_certs:
        return CertificateAuthority.from_plugged_files(args.plugged_certs, args.trust_domain)
    return CertificateAuthority.load_or_create(args.state_dir, args.trust_domain)


def _build_authenticator(args: argparse.Namespace, node_index: Any, kube: Any) -> tuple[Any, Any]:
    """(Authenticator, NodeIndex): who the callers are, for xDS on the TLS port and the CA.

    ``node_index`` is the registry's (None: derive one from the auth mode).
    """
    from identity.auth import LabTokenAuthenticator
    from identity.errors import CaConfigError

    if args.auth == "lab":
        if args.lab_tokens is None:
            raise CaConfigError(
                "--auth lab needs --lab-tokens FILE: it authenticates the xDS clients on the "
                "TLS port and the CA's callers"
            )
        lab = LabTokenAuthenticator(args.lab_tokens, args.trust_domain)
        # The registry's live pods when it has them, else the token file's entries.
        return lab, node_index or lab
    from kubernetes import client

    from identity.auth import KubernetesNodeIndex, KubernetesTokenReviewAuthenticator

    assert kube is not None
    authenticator = KubernetesTokenReviewAuthenticator(
        client.AuthenticationV1Api(kube), args.trust_domain
    )
    # The watched pods when the registry is Kubernetes, else a list per request.
    return authenticator, node_index or KubernetesNodeIndex(client.CoreV1Api(kube))


def _build_ca_servicer(
    args: argparse.Namespace, metrics_registry: Any, authenticator: Any, node_index: Any, ca: Any
) -> Any:
    """The CA's servicer (None: not served)."""
    from identity.auth import Authorizer, parse_node_agent
    from identity.server import CaMetrics, CaServicer

    if args.no_ca_service:
        return None
    agents = [parse_node_agent(a) for a in args.trusted_node_agent or DEFAULT_NODE_AGENTS]
    return CaServicer(
        ca,
        authenticator,
        Authorizer(args.trust_domain, node_index, agents),
        cluster_id=args.cluster_id,
        metrics=CaMetrics(metrics_registry),
    )


def _serve(args: argparse.Namespace) -> int:
    import prometheus_client

    from discovery.errors import DiscoveryError
    from discovery.server import DiscoveryServer
    from discovery.translate import TranslateConfig
    from identity.errors import IdentityError
    from identity.server import split_host_port

    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server: DiscoveryServer | None = None
    metrics: Any = None
    kube: Any = None
    try:
        try:
            registry = prometheus_client.CollectorRegistry()
            _resolve_registry_options(args)
            if args.registry == "kubernetes" or args.auth == "kubernetes":
                kube = _kube_client(args)
            ca = _load_ca(args)
            source, node_index = _build_registry(args, kube, ca)
            authenticator, node_index = _build_authenticator(args, node_index, kube)
            servicer = _build_ca_servicer(args, registry, authenticator, node_index, ca)
            config = TranslateConfig(
                cluster_id=args.cluster_id,
                trust_domain=args.trust_domain,
                domain_suffix=args.domain_suffix,
                root_namespace=args.root_namespace,
                mesh_namespace=args.mesh_namespace,
                excluded_namespaces=frozenset(args.exclude_namespace or ()),
                network=args.network,
            )
            server = DiscoveryServer(
                source,
                config=config,
                ca=ca,
                ca_servicer=servicer,
                xds_authenticator=authenticator,
                listen=args.listen,
                plaintext_listen=args.plaintext_listen,
                serving_dns_names=args.serving_dns or ("istiod.istio-system.svc", "localhost"),
                serving_ips=args.serving_ip or ("127.0.0.1",),
                metrics_registry=registry,
                quiet=args.debounce,
                max_delay=args.debounce_max,
            )
            server.start()
            metrics_text = "off"
            if args.metrics_port >= 0:
                host, _ = split_host_port(args.listen or args.plaintext_listen)
                metrics, _thread = prometheus_client.start_http_server(
                    args.metrics_port, host, registry
                )
                metrics_text = f"http://{host}:{metrics.server_port}/metrics"
        except (DiscoveryError, IdentityError, OSError) as exc:
            print(f"underpass discovery serve: error: {exc}", file=sys.stderr)
            return 1
        print(
            f"ready: tls={server.tls_address if server.tls_port else 'off'} "
            f"plaintext={server.plaintext_address if server.plaintext_port else 'off'} "
            f"ca={'on' if servicer is not None else 'off'} metrics={metrics_text} "
            f"registry={args.registry}",
            flush=True,
        )
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)
        stop.wait()
        print("stopping: signal received", flush=True)
    finally:
        if server is not None:
            server.stop(grace=args.grace)
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        if kube is not None:
            kube.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("stopped", flush=True)
    return 0


def _add_serve(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve workload discovery (Delta ADS) and the CA",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mesh = p.add_argument_group("mesh")
    mesh.add_argument("--cluster-id", default="Kubernetes", help="default: %(default)s")
    mesh.add_argument("--trust-domain", default="cluster.local", help="default: %(default)s")
    mesh.add_argument("--domain-suffix", default="cluster.local", help="default: %(default)s")
    mesh.add_argument(
        "--root-namespace",
        default="istio-system",
        help="policies here apply mesh-wide (default: %(default)s)",
    )
    mesh.add_argument(
        "--mesh-namespace",
        default="istio-system",
        help="the mesh's own namespace, never captured (default: %(default)s)",
    )
    mesh.add_argument(
        "--exclude-namespace", action="append", metavar="NS", help="never capture NS (repeatable)"
    )
    mesh.add_argument("--network", default="", help="network name of this cluster's addresses")
    reg = p.add_argument_group("registry (what exists)")
    reg.add_argument(
        "--registry",
        choices=("model", "lab", "kubernetes"),
        help="model: a static file (--model) or nothing; lab: the lab's state; kubernetes: "
        "the API server (default: model)",
    )
    reg.add_argument(
        "--model", type=Path, metavar="FILE", help="static model (YAML) to serve (registry model)"
    )
    reg.add_argument(
        "--lab-state-dir",
        type=Path,
        metavar="DIR",
        help="the lab's state directory (default: $UNDERPASS_LAB_STATE_DIR or /run/underpass/lab)",
    )
    reg.add_argument(
        "--lab-policies",
        type=Path,
        metavar="PATH",
        help="directory (or file) of AuthorizationPolicy, PeerAuthentication and Gateway YAML "
        "for the lab (default: <lab state dir>/policies)",
    )
    reg.add_argument(
        "--resync-period",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="kubernetes: list every kind again this often (default: %(default)s)",
    )
    reg.add_argument(
        "--no-root-cert-configmaps",
        action="store_true",
        help="kubernetes: do not publish the root certificate (ConfigMap istio-ca-root-cert)",
    )
    net = p.add_argument_group("network")
    net.add_argument(
        "--listen",
        default="0.0.0.0:15012",
        metavar="HOST:PORT",
        help="xDS + CA over TLS; port 0 picks a free one (default: %(default)s)",
    )
    net.add_argument(
        "--plaintext-listen",
        metavar="HOST:PORT",
        help="also serve xDS (not the CA) in plaintext here, e.g. 0.0.0.0:15010; "
        "unauthenticated: bind it to a trusted address only",
    )
    net.add_argument("--serving-dns", action="append", metavar="NAME", help="serving cert DNS SAN")
    net.add_argument("--serving-ip", action="append", metavar="IP", help="serving cert IP SAN")
    net.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="Prometheus port on the listen host; -1 disables (default: %(default)s)",
    )
    net.add_argument(
        "--debounce",
        type=float,
        default=0.1,
        help="seconds of registry quiet before a push (default: %(default)s)",
    )
    net.add_argument(
        "--debounce-max",
        type=float,
        default=1.0,
        help="longest a push waits during a stream of changes (default: %(default)s)",
    )
    net.add_argument("--grace", type=float, default=5.0, help="stop grace (default: %(default)s)")
    net.add_argument(
        "--ready-fd",
        type=int,
        default=None,
        metavar="FD",
        help="also write the ready line to this inherited descriptor, then close it "
        "(how `underpass lab up` waits for the control plane)",
    )
    ca = p.add_argument_group("certificate authority")
    ca.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="CA state directory")
    ca.add_argument("--plugged-certs", type=Path, metavar="DIR", help="plugged-in CA files")
    ca.add_argument(
        "--no-ca-service",
        action="store_true",
        help="do not serve the CA's API (its key still issues the serving certificate)",
    )
    ca.add_argument(
        "--auth",
        choices=("lab", "kubernetes"),
        help="how xDS clients on the TLS port and CA callers are authenticated: lab token "
        "file or TokenReview (default: kubernetes with --registry kubernetes, else lab)",
    )
    ca.add_argument(
        "--lab-tokens",
        type=Path,
        metavar="FILE",
        help="lab token file (--auth lab: authenticates xDS clients and CA callers)",
    )
    ca.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig for --registry/--auth kubernetes (default: in-cluster configuration)",
    )
    ca.add_argument(
        "--trusted-node-agent",
        action="append",
        metavar="NS/SA",
        help=f"may impersonate pods on its node (default: {', '.join(DEFAULT_NODE_AGENTS)})",
    )
    p.set_defaults(func=_serve)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "discovery",
        help="run the control plane (workload discovery over Delta ADS, plus the CA)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d_sub = p.add_subparsers(dest="discovery_command", metavar="SUBCOMMAND")
    _add_serve(d_sub)

    def no_subcommand(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_subcommand)
