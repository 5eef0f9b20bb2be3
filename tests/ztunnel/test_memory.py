"""ztunnel's import diet: what the node's ztunnel process never loads.

Not grpcio, not prometheus_client (with its HTTP servers), not the
``cryptography`` package, not YAML unless a file is its source: each costs
the process megabytes (bench.ztunnel_memory) for work it does otherwise.

Checked in a fresh interpreter (this test process has loaded all of them):
the ``underpass ztunnel`` command's modules and :mod:`ztunnel.app` are
imported, then ztunnel's whole certificate path runs (a key and CSR made in
the probe, signed by a real CA in this test process, the CA's answer checked,
TLS contexts built from it, the config dump's certificate view), its two
gRPC clients run (the Delta ADS stream and a CSR, each against a closed port,
so that they fail after having run their whole client path) and a metrics
scrape is rendered; then ``sys.modules`` is inspected.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from identity.ca import CertificateAuthority, validate_csr

pytestmark = pytest.mark.unit

#: Modules the ztunnel process must not load (grpcio and its test tooling, the
#: Kubernetes client, the netlink library of the node agent, prometheus_client
#: and the HTTP servers it brings, the cryptography package: ztunnel writes its
#: metrics with underpass.promtext and makes keys with identity.keys).
FORBIDDEN = (
    "grpc",
    "grpc_tools",
    "kubernetes",
    "pyroute2",
    "prometheus_client",
    "http.server",
    "cryptography",
)

PROBE = textwrap.dedent(
    """
    import json, socket, sys
    import underpass.cli.main, ztunnel.app
    underpass.cli.main.build_parser("ztunnel")  # as `underpass ztunnel` builds it
    after_import = sorted(sys.modules)

    import datetime as dt
    import trio
    from identity import keys, tls
    from identity.errors import CertificateUnavailable
    from identity.spiffe import SpiffeId
    from ztunnel import dump
    from ztunnel.app import _ca_signer
    from ztunnel.metrics import ZtunnelMetrics
    from ztunnel.state.store import StateStore
    from ztunnel.xds_source import Backoff, XdsSource, XdsTls, ZtunnelNode

    from identity.certmanager import CertificateManager
    from ztunnel.identities import NodeIdentities

    identity = SpiffeId("cluster.local", "demo", "sleep")
    answers = []

    class ParentSigner:
        # The CA is the test process: the CSR goes out on stdout, its answer comes on stdin.

        async def sign(self, csr_pem, asked, lifetime):
            print(json.dumps({"csr": csr_pem.decode()}), flush=True)
            answers.append(json.loads(sys.stdin.readline()))
            return answers[-1]["chain"]

    async def certificates():
        # The data path's whole certificate path: the manager makes the key and CSR,
        # checks the answer; NodeIdentities builds both TLS contexts from it.
        async with CertificateManager.open(ParentSigner()) as manager:
            node = NodeIdentities(manager)
            node.retain(identity)
            await node.server_context(identity)
            await node.client_context(identity)
            status = manager.status(identity)
            return dump.certificate_json(status, manager.current(identity))

    certificate_view = trio.run(certificates)
    tls.TrustBundle.from_pem(answers[-1]["root"])
    _, csr = keys.new_key_and_csr(identity)

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = f"127.0.0.1:{probe.getsockname()[1]}"  # bound, never listening: refused
    root = answers[-1]["root"].encode()

    async def main():
        from ztunnel.app import CaSettings, XdsSettings, ZtunnelConfig
        from ztunnel.pod import ProxySettings

        config = ZtunnelConfig(
            proxy=ProxySettings(node="node-1", cluster="Kubernetes", trust_domain="cluster.local"),
            xds=XdsSettings(address=closed, root_pem=root),
            ca=CaSettings(closed, root, lambda: "token-0123456789abcdef"),
        )
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
    ZtunnelMetrics().render()  # a scrape, process metrics included
    print(json.dumps({"after_import": after_import, "after_run": sorted(sys.modules),
                      "xds_error": error, "certificate": certificate_view}))
    """
)


def loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_the_ztunnel_process_loads_neither_grpc_prometheus_client_nor_cryptography(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    with subprocess.Popen(
        [sys.executable, "-c", PROBE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as probe:
        assert probe.stdin is not None and probe.stdout is not None
        request: dict[str, str] = {}
        for line in probe.stdout:  # the probe's own log lines may come first
            if line.startswith('{"csr"'):
                request = json.loads(line)
                break
        assert "csr" in request, probe.communicate(timeout=60)[1][-3000:]
        issued = ca.sign_workload(validate_csr(request["csr"]), dt.timedelta(hours=1))
        answer = {"chain": list(issued.chain_pem), "root": ca.root_bundle_pem}
        out, err = probe.communicate(json.dumps(answer) + "\n", timeout=120)
    assert probe.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    # The probe did run its paths to the end: the CA's answer was accepted and shown,
    # both gRPC clients ran until the connection failed.
    view = report["certificate"]
    assert view["identity"] == "spiffe://cluster.local/ns/demo/sa/sleep" and view["valid"]
    assert next(c["type"] for c in view["chain"]) == "Leaf" and len(view["chain"]) >= 2
    assert "UNAVAILABLE" in report["xds_error"] and "cannot connect" in report["xds_error"]
    for phase in ("after_import", "after_run"):
        modules = report[phase]
        found = [name for name in FORBIDDEN if loaded(modules, name)]
        assert found == [], f"{phase}: the ztunnel process loaded {found}"
        # YAML is for --local-config only (and the lab/CA commands, which run elsewhere).
        assert not loaded(modules, "yaml"), f"{phase}: yaml was loaded"
    # Sanity: the probe really loaded ztunnel, its gRPC client and its key maker.
    assert loaded(report["after_run"], "underpass.grpclite")
    assert loaded(report["after_run"], "ztunnel.xds_source")
    assert loaded(report["after_run"], "identity.keys")
