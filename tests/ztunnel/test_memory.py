"""ztunnel's import diet: never grpcio nor prometheus_client (nor YAML unless a file is its source).

Checked in a fresh interpreter (this test process has loaded grpcio already):
the ``underpass`` command's modules and :mod:`ztunnel.app` are imported, then
ztunnel's two gRPC clients are exercised (the Delta ADS stream and a CSR,
each against a closed port, so that they fail after having run their whole
client path), and ``sys.modules`` is inspected.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

#: Modules the ztunnel process must not load (grpcio and its test tooling, the
#: Kubernetes client, the netlink library of the node agent, prometheus_client
#: and the HTTP servers it brings: ztunnel writes its metrics with
#: underpass.promtext).
FORBIDDEN = ("grpc", "grpc_tools", "kubernetes", "pyroute2", "prometheus_client", "http.server")

PROBE = textwrap.dedent(
    """
    import json, socket, sys
    import underpass.cli.main, ztunnel.app
    underpass.cli.main.build_parser("ztunnel")  # as `underpass ztunnel` builds it
    after_import = sorted(sys.modules)

    import datetime as dt
    import trio
    from identity.ca import CertificateAuthority, build_csr, generate_workload_key
    from identity.errors import CertificateUnavailable
    from identity.spiffe import SpiffeId
    from ztunnel.app import _ca_signer
    from ztunnel.state.store import StateStore
    from ztunnel.xds_source import Backoff, XdsSource, XdsTls, ZtunnelNode

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening: refused

    async def main():
        import tempfile
        from pathlib import Path
        from ztunnel.app import CaSettings, XdsSettings, ZtunnelConfig
        from ztunnel.pod import ProxySettings

        ca = CertificateAuthority.load_or_create(Path(tempfile.mkdtemp()) / "ca", "cluster.local")
        root = ca.root_bundle_pem.encode()
        config = ZtunnelConfig(
            proxy=ProxySettings(node="node-1", cluster="Kubernetes", trust_domain="cluster.local"),
            xds=XdsSettings(address=closed, root_pem=root),
            ca=CaSettings(closed, root, lambda: "token-0123456789abcdef"),
        )
        identity = SpiffeId("cluster.local", "demo", "sleep")
        csr = build_csr(generate_workload_key(), identity)
        try:
            await _ca_signer(config, impersonate=True).sign(csr, identity, dt.timedelta(hours=1))
        except CertificateUnavailable:
            pass
        store = StateStore()
        node = ZtunnelNode("node-1", "zt", "istio-system", "10.0.0.1", "Kubernetes")
        source = XdsSource(
            closed,
            store.claim_writer("xds"),
            node,
            tls=XdsTls(root),
            token=lambda: "token-0123456789abcdef",
            backoff=Backoff(0.01, 0.01),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run)
            await source.wait_until(lambda s: s.reconnects >= 1)
            nursery.cancel_scope.cancel()
        return source.last_error

    error = trio.run(main)
    from ztunnel.metrics import ZtunnelMetrics
    ZtunnelMetrics().render()  # a scrape, process metrics included
    print(json.dumps({"after_import": after_import, "after_run": sorted(sys.modules),
                      "xds_error": error}))
    """
)


def loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_the_ztunnel_process_never_loads_grpc_nor_prometheus_client() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The probe did run both clients to the end of their path.
    assert "UNAVAILABLE" in report["xds_error"] and "cannot connect" in report["xds_error"]
    for phase in ("after_import", "after_run"):
        modules = report[phase]
        found = [name for name in FORBIDDEN if loaded(modules, name)]
        assert found == [], f"{phase}: the ztunnel process loaded {found}"
        # YAML is for --local-config only (and the lab/CA commands, which run elsewhere).
        assert not loaded(modules, "yaml"), f"{phase}: yaml was loaded"
    # Sanity: the probe really loaded ztunnel and its own gRPC client.
    assert loaded(report["after_run"], "underpass.grpclite")
    assert loaded(report["after_run"], "ztunnel.xds_source")
