"""The Envoy sidecar's generated bootstrap, TLS files and stats reading (unit)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from identity.ca import CertificateAuthority
from identity.spiffe import SpiffeId
from underpass.compare import envoy
from underpass.compare.errors import EnvoyError
from underpass.compare.modes import issue

pytestmark = pytest.mark.unit

TD = "cluster.local"
ME = SpiffeId(TD, "compare", "sa-1")
CALLER = SpiffeId(TD, "compare", "sa-2")
PEER = SpiffeId(TD, "compare", "sa-3")


def spec(tmp_path: Path, *, callers: tuple[SpiffeId, ...] = (CALLER,)) -> envoy.SidecarSpec:
    return envoy.SidecarSpec(
        pod="compare/echo-1-1",
        pod_ip="10.244.1.2",
        identity=ME,
        app_port=8080,
        inbound_port=16008,
        callers=callers,
        destinations=(
            envoy.Destination("compare/echo-2-1", "10.244.2.2", 16008, PEER, 15101),
            envoy.Destination("compare/echo-2-2", "10.244.2.3", 16008, CALLER, 15102),
        ),
        files=envoy.TlsFiles(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "r.pem"),
        admin_socket=tmp_path / "admin.sock",
    )


def tls_of(doc: dict[str, Any]) -> dict[str, Any]:
    context: dict[str, Any] = doc["typed_config"]["common_tls_context"]
    return context


def test_inbound_listener_terminates_mtls_on_the_pod_ip_for_the_callers_only(
    tmp_path: Path,
) -> None:
    config = envoy.bootstrap(spec(tmp_path))
    listeners = {x["name"]: x for x in config["static_resources"]["listeners"]}
    inbound = listeners["inbound-tls"]
    assert inbound["address"]["socket_address"] == {"address": "10.244.1.2", "port_value": 16008}
    chain = inbound["filter_chains"][0]
    socket = chain["transport_socket"]
    assert socket["typed_config"]["@type"].endswith("DownstreamTlsContext")
    assert socket["typed_config"]["require_client_certificate"] is True
    context = tls_of(socket)
    assert context["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    validation = context["validation_context"]
    assert validation["trusted_ca"] == {"filename": str(tmp_path / "r.pem")}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": CALLER.uri}}
    ]
    assert context["tls_certificates"][0]["private_key"] == {"filename": str(tmp_path / "k.pem")}
    proxy = chain["filters"][0]["typed_config"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    app = clusters[proxy["cluster"]]
    endpoint = app["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    assert "transport_socket" not in app


def test_one_plaintext_outbound_listener_per_destination_with_mtls_upstream(
    tmp_path: Path,
) -> None:
    config = envoy.bootstrap(spec(tmp_path))
    listeners = {x["name"]: x for x in config["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for port, ip, identity in ((15101, "10.244.2.2", PEER), (15102, "10.244.2.3", CALLER)):
        listener = listeners[f"outbound-{port}"]
        assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": port}
        chain = listener["filter_chains"][0]
        assert "transport_socket" not in chain  # the app speaks plaintext to its sidecar
        cluster = clusters[chain["filters"][0]["typed_config"]["cluster"]]
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"] == {"address": ip, "port_value": 16008}
        upstream = cluster["transport_socket"]
        assert upstream["typed_config"]["@type"].endswith("UpstreamTlsContext")
        sans = tls_of(upstream)["validation_context"]["match_typed_subject_alt_names"]
        assert sans == [{"san_type": "URI", "matcher": {"exact": identity.uri}}]
    assert config["admin"]["address"]["pipe"]["path"] == str(tmp_path / "admin.sock")
    assert len(listeners) == 3 and len(clusters) == 3


def test_no_known_caller_means_any_identity_of_the_trust_domain(tmp_path: Path) -> None:
    config = envoy.bootstrap(spec(tmp_path, callers=()))
    inbound = config["static_resources"]["listeners"][0]
    sans = tls_of(inbound["filter_chains"][0]["transport_socket"])["validation_context"]
    assert sans["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
    ]


def test_an_admin_socket_path_too_long_for_the_kernel_is_refused(tmp_path: Path) -> None:
    long_dir = tmp_path / ("x" * 120)
    base = spec(tmp_path)
    too_long = envoy.SidecarSpec(**{**base.__dict__, "admin_socket": long_dir / "admin.sock"})
    with pytest.raises(EnvoyError, match="longer than a Unix socket path"):
        envoy.bootstrap(too_long)


def test_tls_files_are_private_and_hold_the_issued_identity(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    cert = issue(ca, ME)
    files = envoy.write_tls_files(tmp_path / "pod", cert)
    assert stat.S_IMODE(os.stat(tmp_path / "pod").st_mode) == 0o700
    for path in (files.chain, files.key, files.roots):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert b"PRIVATE KEY" in files.key.read_bytes()
    assert files.chain.read_bytes() == cert.chain_pem()
    assert files.roots.read_bytes() == ca.root_bundle_pem.encode()
    with pytest.raises(FileExistsError):  # never overwrites a key in place
        envoy.write_tls_files(tmp_path / "pod", cert)


def test_argv_sets_one_worker_unless_told_otherwise(tmp_path: Path) -> None:
    one = envoy.envoy_argv(Path("/e"), tmp_path / "b.yaml", concurrency=1)
    assert one[one.index("--concurrency") + 1] == "1"
    assert "--disable-hot-restart" in one
    default = envoy.envoy_argv(Path("/e"), tmp_path / "b.yaml", concurrency=None)
    assert "--concurrency" not in default


def test_handshakes_split_inbound_and_outbound() -> None:
    stats = {
        "stats": [
            {"name": "listener.10.244.1.2_16008.ssl.handshake", "value": 3},
            {"name": "cluster.outbound|16008||echo-2-1.compare.ssl.handshake", "value": 2},
            {"name": "cluster.outbound|16008||echo-2-2.compare.ssl.handshake", "value": 1},
            {"name": "cluster.outbound|16008||echo-2-1.compare.ssl.connection_error", "value": 9},
            {"name": "listener.admin.ssl.handshake", "value": "n/a"},
        ]
    }
    assert envoy.handshakes(stats) == {"inbound": 3, "outbound": 3}


def test_the_installed_envoy_is_found() -> None:
    binary = envoy.envoy_binary()
    assert binary.name == "envoy" and os.access(binary, os.X_OK)
