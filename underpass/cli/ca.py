"""``underpass ca``: run the certificate authority, or ask it for a certificate.

- ``underpass ca serve``: the CA's gRPC service (``IstioCertificateService``,
  TLS, default port 15012) with lab-token or Kubernetes TokenReview callers,
  plus Prometheus metrics. Prints one ``ready: address=...`` line once it
  serves and stops cleanly on SIGINT/SIGTERM.
- ``underpass ca request``: a client that generates a key in memory, sends a
  CSR (optionally impersonating a pod as a node agent) and prints the decoded
  certificate. Nothing secret is written anywhere.

:func:`describe_certificate` renders a certificate chain for people; the
demo uses it too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

DEFAULT_STATE_DIR = Path("/var/lib/underpass/ca")
DEFAULT_LISTEN = "0.0.0.0:15012"
DEFAULT_METRICS_PORT = 15014
DEFAULT_SERVING_DNS = ("istiod.istio-system.svc", "underpass-ca", "localhost")
DEFAULT_SERVING_IPS = ("127.0.0.1",)
DEFAULT_NODE_AGENTS = ("istio-system/ztunnel",)

CA_DESCRIPTION = """\
Run the Underpass certificate authority, or ask it for a certificate.

The CA signs workload certificates (SPIFFE ID spiffe://<trust-domain>/ns/<ns>/sa/<sa>)
over gRPC, as Istio's istio.v1.auth.IstioCertificateService/CreateCertificate, on TLS
port 15012 by default, with a serving certificate it issues to itself.

Network (serve):
  --listen HOST:PORT       gRPC over TLS (default 0.0.0.0:15012; port 0 = any free port)
  --serving-dns NAME       names in the CA's serving certificate, repeatable (default
                           istiod.istio-system.svc, underpass-ca, localhost)
  --serving-ip IP          IPs in it, repeatable (default 127.0.0.1 + the --listen IP)
  --metrics-port PORT      Prometheus /metrics on the --listen host (default 15014;
                           0 = any free port, -1 = off)
  --trust-domain TD        trust domain signed for (default cluster.local)
  On start it prints 'ready: address=HOST:PORT trust_domain=.. root_cert=.. metrics=..';
  SIGINT or SIGTERM stops it after in-flight calls finish ('stopped').

Signing key, one of:
  self-signed   --state-dir DIR (default /var/lib/underpass/ca): an ECDSA P-256 root
                valid 10 years is created there on first start (ca-key.pem is 0600)
                and reused afterwards; clients trust DIR/ca-cert.pem.
  plugged-in    --plugged-certs DIR holding ca-cert.pem, ca-key.pem, cert-chain.pem
                and root-cert.pem (the signing certificate may be an intermediate);
                clients trust DIR/root-cert.pem.

Who may call (--auth):
  lab           a YAML token file (--lab-tokens FILE), a list of entries
                  - {token: <at least 16 chars>, namespace: demo, service_account: sleep,
                     pod: sleep-1, node: node-1}
                Every entry is also a running pod on its node (for impersonation).
                The file must not be accessible to other users (chmod 600); it is
                re-read when it changes.
  kubernetes    pod-bound service-account tokens (audience istio-ca) checked with a
                TokenReview; pods looked up by node. Uses --kubeconfig or in-cluster
                config; needs create on tokenreviews and list on pods.

Impersonation: a trusted node agent (--trusted-node-agent, default istio-system/ztunnel)
may get the certificate of a pod running on its own node (ImpersonatedIdentity).

Examples:
  underpass ca serve --auth lab --lab-tokens /etc/underpass/lab-tokens.yaml
  underpass ca serve --listen 127.0.0.1:15012 --state-dir /tmp/ca --metrics-port 0 \\
      --auth lab --lab-tokens tokens.yaml
  underpass ca request --address localhost:15012 --root-cert /tmp/ca/ca-cert.pem \\
      --token-file sleep.token --identity spiffe://cluster.local/ns/demo/sa/sleep

Run 'underpass ca serve --help' or 'underpass ca request --help' for every option.
"""


# -- rendering certificates -----------------------------------------------------

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}
_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [f"{days}d" if days else "", f"{hours}h" if hours else "", f"{minutes}m"]
    return " ".join(p for p in parts if p)


def _name(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty)"


def _public_key(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name} ({key.key_size} bits)"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    return type(key).__name__


def _extension_lines(cert: x509.Certificate, highlight: tuple[str, str]) -> list[tuple[str, str]]:
    """SAN, key usage, EKU and basic constraints, in that order, one row per value."""
    start, end = highlight
    sections: dict[str, list[tuple[str, str]]] = {"san": [], "ku": [], "eku": [], "bc": []}
    for ext in cert.extensions:
        crit = " (critical)" if ext.critical else ""
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            for i, general in enumerate(value):
                label = f"SAN{crit}" if i == 0 else ""
                if isinstance(general, x509.UniformResourceIdentifier):
                    text = f"{start}URI {general.value}{end}   <== workload identity (SPIFFE ID)"
                elif isinstance(general, x509.DNSName):
                    text = f"DNS {general.value}"
                elif isinstance(general, x509.IPAddress):
                    text = f"IP {general.value}"
                else:
                    text = f"{type(general).__name__} {general.value}"
                sections["san"].append((label, text))
        elif isinstance(value, x509.KeyUsage):
            used = [_camel(u) for u in _KEY_USAGES if getattr(value, u)]
            sections["ku"].append(("Key usage", ", ".join(used) + crit))
        elif isinstance(value, x509.ExtendedKeyUsage):
            names = [_EKU_NAMES.get(o, o.dotted_string) for o in value]
            sections["eku"].append(("Ext. key usage", ", ".join(names) + crit))
        elif isinstance(value, x509.BasicConstraints):
            sections["bc"].append(("Basic constr.", f"CA:{str(value.ca).upper()}{crit}"))
    return [row for rows in sections.values() for row in rows]


def describe_certificate(chain_pem: Sequence[str], *, color: bool = False) -> str:
    """A readable summary of a CA answer (leaf first, roots last), one field a line."""
    elements = [x509.load_pem_x509_certificates(e.encode()) for e in chain_pem]
    certs = [c for element in elements for c in element]
    if not certs:
        return "  (no certificate)"
    leaf = certs[0]
    highlight = ("\x1b[1;32m", "\x1b[0m") if color else ("", "")
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    rows: list[tuple[str, str]] = [
        ("Subject", _name(leaf.subject)),
        ("Issuer", _name(leaf.issuer)),
        ("Serial", format(leaf.serial_number, "x")),
        ("Not before", f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"),
        (
            "Not after",
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC  (lifetime {_duration(lifetime)})",
        ),
        *_extension_lines(leaf, highlight),
        ("Public key", _public_key(leaf)),
        (
            "Chain",
            f"{len(certs)} certificates: leaf, "
            + ", ".join(
                f"{'root' if c.issuer == c.subject else 'intermediate'} ({_name(c.subject)})"
                for c in certs[1:]
            ),
        ),
    ]
    return "\n".join(f"  {label:<17}{value}" for label, value in rows)


# -- small parsers ---------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """``"3600"``, ``"90m"``, ``"24h"``, ``"7d"`` -> timedelta (argparse type)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 3600, 90m, 24h or 7d")
    return dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


# -- serve -----------------------------------------------------------------------


def _root_cert_path(args: argparse.Namespace) -> Path:
    from identity.ca import CA_CERT_FILE, ROOT_CERT_FILE

    directory: Path = args.plugged_certs or args.state_dir
    plugged = directory / ROOT_CERT_FILE
    return plugged if plugged.exists() else directory / CA_CERT_FILE


def _build_auth(args: argparse.Namespace) -> tuple[Any, Any]:
    """(authenticator, node index) for ``--auth``."""
    from identity.auth import (
        KubernetesNodeIndex,
        KubernetesTokenReviewAuthenticator,
        LabTokenAuthenticator,
    )
    from identity.errors import CaConfigError

    if args.auth == "lab":
        if args.lab_tokens is None:
            raise CaConfigError("--auth lab needs --lab-tokens FILE")
        lab = LabTokenAuthenticator(args.lab_tokens, args.trust_domain)
        return lab, lab
    from kubernetes import client, config

    try:
        if args.kubeconfig:
            config.load_kube_config(config_file=str(args.kubeconfig))  # type: ignore[no-untyped-call]
        else:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise CaConfigError(
            f"cannot configure the Kubernetes client ({type(exc).__name__}: {exc}); "
            "run in a pod or pass --kubeconfig"
        ) from None
    return (
        KubernetesTokenReviewAuthenticator(client.AuthenticationV1Api(), args.trust_domain),
        KubernetesNodeIndex(client.CoreV1Api()),
    )


def _serve(args: argparse.Namespace) -> int:
    import prometheus_client

    from identity.auth import Authorizer, parse_node_agent
    from identity.ca import CertificateAuthority
    from identity.errors import IdentityError
    from identity.server import CaServer, split_host_port

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server: CaServer | None = None
    metrics: Any = None
    try:
        try:
            agents = [parse_node_agent(a) for a in args.trusted_node_agent]
            if args.plugged_certs:
                ca = CertificateAuthority.from_plugged_files(args.plugged_certs, args.trust_domain)
            else:
                ca = CertificateAuthority.load_or_create(args.state_dir, args.trust_domain)
            authenticator, node_index = _build_auth(args)
            registry = prometheus_client.CollectorRegistry()
            server = CaServer(
                ca,
                authenticator,
                Authorizer(args.trust_domain, node_index, agents),
                listen=args.listen,
                serving_dns_names=args.serving_dns,
                serving_ips=args.serving_ip,
                cluster_id=args.cluster_id,
                registry=registry,
            )
            server.start()
            metrics_text = "off"
            if args.metrics_port >= 0:
                host, _ = split_host_port(args.listen)
                metrics, _thread = prometheus_client.start_http_server(
                    args.metrics_port, host, registry
                )
                bracketed = f"[{host}]" if ":" in host else host
                metrics_text = f"http://{bracketed}:{metrics.server_port}/metrics"
        except (IdentityError, OSError) as exc:
            print(f"underpass ca serve: error: {exc}", file=sys.stderr)
            return 1
        print(
            f"ready: address={server.address} trust_domain={ca.trust_domain} "
            f"root_cert={_root_cert_path(args)} metrics={metrics_text}",
            flush=True,
        )
        stop.wait()
        print("stopping: signal received, finishing in-flight requests", flush=True)
    finally:
        if server is not None:
            server.stop(grace=args.grace)
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("stopped", flush=True)
    return 0


# -- request ---------------------------------------------------------------------


def _request(args: argparse.Namespace) -> int:
    from identity.ca import build_csr, generate_workload_key
    from identity.certs import WorkloadCertificate
    from identity.client import CaClient
    from identity.errors import IdentityError
    from identity.spiffe import SpiffeId

    try:
        impersonate = SpiffeId.parse(args.impersonate) if args.impersonate else None
        identity = SpiffeId.parse(args.identity) if args.identity else impersonate
        if identity is None:
            print("underpass ca request: error: give --identity or --impersonate", file=sys.stderr)
            return 2
        root_pem = args.root_cert.read_bytes()
    except (IdentityError, OSError) as exc:
        print(f"underpass ca request: error: {exc}", file=sys.stderr)
        return 2
    token_file: Path = args.token_file

    def token() -> str:
        return token_file.read_text()

    key = generate_workload_key()  # in memory only
    try:
        with CaClient(
            args.address,
            root_pem,
            token,
            server_name=args.server_name,
            cluster_id=args.cluster_id,
            timeout=args.timeout,
        ) as client:
            chain = client.create_certificate(build_csr(key, identity), args.validity, impersonate)
        # Check the answer as ztunnel would: our key, exactly the identity asked for.
        WorkloadCertificate.from_ca_response(identity, key, chain)
    except IdentityError as exc:
        print(f"refused ({type(exc).__name__}): {exc}", file=sys.stderr)
        return 1
    how = " (impersonated by the caller)" if impersonate else ""
    print(f"certificate for {identity.uri}{how}:")
    print(describe_certificate(chain, color=sys.stdout.isatty()))
    if args.pem:
        print("".join(chain), end="")
    return 0


# -- argparse --------------------------------------------------------------------


def _add_serve(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the CA's gRPC service",
        description="Run the CA's gRPC service (istio.v1.auth.IstioCertificateService) over "
        "TLS. Prints 'ready: address=HOST:PORT ...' once serving; SIGINT/SIGTERM stop it.",
    )
    key = p.add_argument_group("signing key")
    key.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="directory of the self-signed root, created on first start (default: %(default)s)",
    )
    key.add_argument(
        "--plugged-certs",
        type=Path,
        metavar="DIR",
        help="use ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem from DIR instead",
    )
    key.add_argument(
        "--trust-domain", default="cluster.local", help="trust domain (default: %(default)s)"
    )
    net = p.add_argument_group("network")
    net.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="gRPC/TLS listen address; port 0 picks a free one (default: %(default)s)",
    )
    net.add_argument(
        "--serving-dns",
        action="append",
        metavar="NAME",
        help="DNS name in the CA's serving certificate, repeatable "
        f"(default: {', '.join(DEFAULT_SERVING_DNS)})",
    )
    net.add_argument(
        "--serving-ip",
        action="append",
        metavar="IP",
        help="IP address in the CA's serving certificate, repeatable "
        f"(default: {', '.join(DEFAULT_SERVING_IPS)}, plus the --listen host if it is an IP)",
    )
    net.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="Prometheus /metrics port on the --listen host; 0 picks a free one, -1 disables "
        "(default: %(default)s)",
    )
    net.add_argument(
        "--cluster-id",
        default="Kubernetes",
        help="cluster served; calls with another 'clusterid' are refused (default: %(default)s)",
    )
    net.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds in-flight calls get to finish on stop (default: %(default)s)",
    )
    auth = p.add_argument_group("callers")
    auth.add_argument(
        "--auth",
        choices=("lab", "kubernetes"),
        default="lab",
        help="how callers are authenticated (default: %(default)s)",
    )
    auth.add_argument(
        "--lab-tokens",
        type=Path,
        metavar="FILE",
        help="lab token file (YAML list of {token, namespace, service_account, pod, node}; "
        "mode 600)",
    )
    auth.add_argument("--kubeconfig", type=Path, help="kubeconfig for --auth kubernetes")
    auth.add_argument(
        "--trusted-node-agent",
        action="append",
        metavar="NS/SA",
        help="service account allowed to impersonate pods on its node, repeatable "
        f"(default: {', '.join(DEFAULT_NODE_AGENTS)})",
    )
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import ipaddress

    from identity.server import split_host_port

    args.serving_dns = args.serving_dns or list(DEFAULT_SERVING_DNS)
    if not args.serving_ip:
        args.serving_ip = list(DEFAULT_SERVING_IPS)
        try:
            host, _ = split_host_port(args.listen)
            address = ipaddress.ip_address(host)
            if not address.is_unspecified and str(address) not in args.serving_ip:
                args.serving_ip.append(str(address))
        except ValueError:
            pass  # a host name (or a malformed address, reported by the server)
    args.trusted_node_agent = args.trusted_node_agent or list(DEFAULT_NODE_AGENTS)
    return _serve(args)


def _add_request(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "request",
        help="ask a CA for a certificate and print it decoded",
        description="Generate a key in memory, send a CSR to the CA and print the decoded "
        "certificate. Nothing secret is written to disk.",
    )
    p.add_argument(
        "--address",
        default="localhost:15012",
        metavar="HOST:PORT",
        help="the CA (default: %(default)s)",
    )
    p.add_argument(
        "--root-cert", type=Path, required=True, help="PEM root bundle that signed the CA"
    )
    p.add_argument(
        "--token-file", type=Path, required=True, help="file holding the caller's bearer token"
    )
    p.add_argument("--identity", metavar="SPIFFE_ID", help="identity to ask for")
    p.add_argument(
        "--impersonate",
        metavar="SPIFFE_ID",
        help="ask as a node agent for this pod identity (also the default --identity)",
    )
    p.add_argument(
        "--validity",
        type=parse_duration,
        default=dt.timedelta(hours=24),
        help="requested lifetime: seconds or 90m, 24h, 7d (default: 24h)",
    )
    p.add_argument("--server-name", help="name to verify in the CA's certificate")
    p.add_argument(
        "--cluster-id", default="Kubernetes", help="clusterid sent (default: %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default: %(default)s)")
    p.add_argument("--pem", action="store_true", help="also print the PEM chain")
    p.set_defaults(func=_request)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "ca",
        help="run the Underpass certificate authority (serve) or ask it for a certificate",
        description=CA_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ca_sub = p.add_subparsers(dest="ca_command", metavar="SUBCOMMAND")
    _add_serve(ca_sub)
    _add_request(ca_sub)

    def no_subcommand(_args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_subcommand)
