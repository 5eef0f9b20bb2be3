"""ztunnel.dump: JSON views of workloads, services, policies and certificates (unit)."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives import serialization

from identity.certmanager import IdentityStatus, Phase
from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from tests.identity.pki import DAY, T0, YEAR, ec_key, make_leaf, make_pki
from ztunnel.dump import (
    certificate_json,
    certificates_json,
    config_dump,
    policy_json,
    service_json,
    workload_json,
)
from ztunnel.state import (
    Action,
    Address,
    Batch,
    GatewayAddress,
    HealthPolicy,
    IPFamilies,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Match,
    NamespacedHostname,
    NetworkAddress,
    Port,
    Scope,
    Service,
    ServiceAccountMatch,
    StateStore,
    StringMatch,
    workload_from_proto,
)
from ztunnel.state.model import AppProtocol

from .builders import clause, full_workload, policy, rule, service, workload

pytestmark = pytest.mark.unit

IDENTITY = SpiffeId("cluster.local", "demo", "sleep")


def test_workload_json_has_every_field() -> None:
    assert workload_json(workload_from_proto(full_workload())) == {
        "uid": "c1//Pod/shop/web-0",
        "name": "web-0",
        "namespace": "shop",
        "addresses": ["10.244.1.5", "fd00::5"],
        "hostname": "web-0.shop",
        "network": "net1",
        "tunnel_protocol": "HBONE",
        "trust_domain": "example.org",
        "service_account": "web",
        "identity": "spiffe://example.org/ns/shop/sa/web",
        "waypoint": {
            "hostname": {"namespace": "shop", "hostname": "wp.shop.svc"},
            "hbone_mtls_port": 15008,
        },
        "network_gateway": {
            "address": {"network": "net2", "address": "172.30.0.1", "length": None},
            "hbone_mtls_port": 15008,
        },
        "node": "node-1",
        "canonical_name": "web",
        "canonical_revision": "v1",
        "workload_type": "POD",
        "workload_name": "web",
        "native_tunnel": True,
        "application_tunnel": {"protocol": "PROXY", "port": 15088},
        "services": {
            "shop/web.shop.svc.cluster.local": [
                {"service_port": 80, "target_port": 8080, "app_protocol": "HTTP11"}
            ]
        },
        "authorization_policies": ["shop/allow"],
        "status": "UNHEALTHY",
        "cluster_id": "c1",
        "locality": {"region": "r", "zone": "z", "subzone": "s"},
        "network_mode": "HOST_NETWORK",
    }


def test_workload_json_of_a_minimal_workload() -> None:
    out = workload_json(workload("sleep-0", "demo"))
    assert out["addresses"] == []
    assert out["waypoint"] is None and out["network_gateway"] is None
    assert out["application_tunnel"] is None and out["locality"] is None
    assert out["tunnel_protocol"] == "NONE"
    assert out["identity"] == "spiffe://cluster.local/ns/demo/sa/default"
    json.dumps(out)  # JSON-able as is


def test_service_json_has_every_field() -> None:
    svc = Service(
        name="web",
        namespace="shop",
        hostname="web.shop.svc.cluster.local",
        addresses=(NetworkAddress("", "10.96.0.10"), NetworkAddress("net1", "fd00::a", 128)),  # type: ignore[arg-type]
        ports=(Port(80, 8080, AppProtocol.HTTP2), Port(443)),
        subject_alt_names=("spiffe://cluster.local/ns/shop/sa/web",),
        waypoint=GatewayAddress(NetworkAddress("", "10.96.0.99"), 15008),  # type: ignore[arg-type]
        load_balancing=LoadBalancing(
            (LoadBalancingScope.NODE, LoadBalancingScope.ZONE),
            LoadBalancingMode.FAILOVER,
            HealthPolicy.ALLOW_ALL,
        ),
        ip_families=IPFamilies.DUAL,
    )
    assert service_json(svc) == {
        "key": "shop/web.shop.svc.cluster.local",
        "name": "web",
        "namespace": "shop",
        "hostname": "web.shop.svc.cluster.local",
        "addresses": [
            {"network": "", "address": "10.96.0.10", "length": None},
            {"network": "net1", "address": "fd00::a", "length": 128},
        ],
        "ports": [
            {"service_port": 80, "target_port": 8080, "app_protocol": "HTTP2"},
            {"service_port": 443, "target_port": 0, "app_protocol": "UNKNOWN"},
        ],
        "subject_alt_names": ["spiffe://cluster.local/ns/shop/sa/web"],
        "waypoint": {
            "address": {"network": "", "address": "10.96.0.99", "length": None},
            "hbone_mtls_port": 15008,
        },
        "load_balancing": {
            "routing_preference": ["NODE", "ZONE"],
            "mode": "FAILOVER",
            "health_policy": "ALLOW_ALL",
        },
        "ip_families": "DUAL",
    }


def test_service_waypoint_by_hostname() -> None:
    svc = Service(
        name="web",
        namespace="shop",
        hostname="web.shop.svc.cluster.local",
        waypoint=GatewayAddress(NamespacedHostname("shop", "waypoint.shop.svc.cluster.local")),
    )
    out = service_json(svc)
    assert out["waypoint"] == {
        "hostname": {"namespace": "shop", "hostname": "waypoint.shop.svc.cluster.local"},
        "hbone_mtls_port": 0,
    }
    assert out["load_balancing"] is None


def test_policy_json_rules_and_matches() -> None:
    match = Match(
        namespaces=(StringMatch.exact("demo"), StringMatch.prefix("team-")),
        not_principals=(StringMatch.suffix("/sa/bad"), StringMatch.presence()),
        source_ips=(Address.parse("10.0.0.0/8"),),
        not_destination_ips=(Address.parse("fd00::1"),),
        destination_ports=(8080, 9090),
        service_accounts=(ServiceAccountMatch("demo", "sleep"),),
    )
    pol = policy(
        "allow-sleep",
        "shop",
        action=Action.DENY,
        scope=Scope.WORKLOAD_SELECTOR,
        rules=[rule(clause(match, Match())), rule(problems=["uses HTTP methods"])],
        dry_run=True,
    )
    assert policy_json(pol) == {
        "key": "shop/allow-sleep",
        "name": "allow-sleep",
        "namespace": "shop",
        "scope": "WORKLOAD_SELECTOR",
        "action": "DENY",
        "dry_run": True,
        "rules": [
            {
                "clauses": [
                    {
                        "matches": [
                            {
                                "namespaces": [{"exact": "demo"}, {"prefix": "team-"}],
                                "not_principals": [{"suffix": "/sa/bad"}, {"presence": True}],
                                "source_ips": ["10.0.0.0/8"],
                                "not_destination_ips": ["fd00::1/128"],
                                "destination_ports": [8080, 9090],
                                "service_accounts": [
                                    {"namespace": "demo", "service_account": "sleep"}
                                ],
                            },
                            {},
                        ]
                    }
                ],
                "problems": [],
            },
            {"clauses": [], "problems": ["uses HTTP methods"]},
        ],
        "problems": [],
    }


def test_policy_json_with_unknown_scope_and_action() -> None:
    out = policy_json(policy("odd", action=None, scope=None, problems=["unknown action 7"]))
    assert (out["action"], out["scope"]) == (None, None)
    assert out["problems"] == ["unknown action 7"]


# -- certificates -----------------------------------------------------------------------


def workload_certificate() -> WorkloadCertificate:
    pki = make_pki(depth=1)
    key = ec_key()
    leaf = make_leaf(pki.signer, spiffe_id=IDENTITY, key=key, lifetime=DAY)
    return WorkloadCertificate.from_parts(
        identity=IDENTITY,
        private_key=key,
        chain=(leaf.cert, *pki.chain),
        roots=(pki.root.cert,),
    )


def status(phase: Phase, cert: WorkloadCertificate | None, **overrides: object) -> IdentityStatus:
    fields: dict[str, object] = {
        "identity": IDENTITY,
        "phase": phase,
        "references": 2,
        "serial": cert.serial if cert else None,
        "not_after": cert.not_after if cert else None,
        "failures": 0,
        "last_error": None,
        "next_attempt_in": 3600.0,
    }
    fields.update(overrides)
    return IdentityStatus(**fields)  # type: ignore[arg-type]


def test_certificate_json_describes_the_whole_chain() -> None:
    cert = workload_certificate()
    out = certificate_json(status(Phase.SCHEDULED, cert), cert, now=T0)
    leaf, intermediate = cert.chain
    (root,) = cert.roots
    assert out["identity"] == "spiffe://cluster.local/ns/demo/sa/sleep"
    assert out["state"] == "SCHEDULED"
    assert out["references"] == 2
    assert out["serial"] == f"{leaf.serial_number:x}"
    assert out["not_before"] == leaf.not_valid_before_utc.isoformat()
    assert out["not_after"] == leaf.not_valid_after_utc.isoformat()
    assert dt.datetime.fromisoformat(out["not_after"]).tzinfo is not None
    assert out["valid"] is True
    assert [c["type"] for c in out["chain"]] == ["Leaf", "Intermediate", "Root"]
    for entry, x509cert in zip(out["chain"], (leaf, intermediate, root), strict=True):
        assert entry["serial"] == f"{x509cert.serial_number:x}"
        assert entry["subject"] == x509cert.subject.rfc4514_string()
        assert entry["issuer"] == x509cert.issuer.rfc4514_string()
        assert entry["not_before"] == x509cert.not_valid_before_utc.isoformat()
        assert entry["not_after"] == x509cert.not_valid_after_utc.isoformat()
        assert entry["valid"] is True
    assert "Test Root CA" in out["chain"][2]["subject"]


def test_certificate_validity_follows_the_clock() -> None:
    cert = workload_certificate()
    later = certificate_json(status(Phase.SCHEDULED, cert), cert, now=T0 + 2 * DAY)
    assert later["valid"] is False
    assert [c["valid"] for c in later["chain"]] == [False, True, True]
    much_later = certificate_json(status(Phase.SCHEDULED, cert), cert, now=T0 + 20 * YEAR)
    assert [c["valid"] for c in much_later["chain"]] == [False, False, False]


def test_certificate_json_without_a_certificate() -> None:
    out = certificate_json(
        status(Phase.BACKOFF, None, failures=3, last_error="the CA refused: UNAUTHENTICATED"),
        None,
        now=T0,
    )
    assert out["state"] == "BACKOFF"
    assert out["chain"] == []
    assert out["serial"] is None and out["not_before"] is None and out["not_after"] is None
    assert out["valid"] is False
    assert out["failures"] == 3
    assert out["last_error"] == "the CA refused: UNAUTHENTICATED"


def test_no_key_material_in_any_certificate_dump() -> None:
    cert = workload_certificate()
    out = json.dumps(
        [
            certificate_json(status(Phase.SCHEDULED, cert), cert, now=T0),
            config_dump(
                StateStore().snapshot, [certificate_json(status(Phase.SIGNING, cert), cert)]
            ),
        ]
    )
    assert "PRIVATE KEY" not in out
    der = cert.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Not even a base64 fragment of the key's encoding.
    assert base64.b64encode(der)[40:80].decode() not in out
    secret = cert.private_key.private_numbers().private_value
    assert f"{secret:x}" not in out and str(secret) not in out


def test_certificates_json_sorted_with_lookup() -> None:
    cert = workload_certificate()
    other = SpiffeId("cluster.local", "alpha", "web")
    statuses = [status(Phase.SCHEDULED, cert), status(Phase.QUEUED, None, identity=other)]
    asked: list[SpiffeId] = []

    def lookup(identity: SpiffeId) -> WorkloadCertificate | None:
        asked.append(identity)
        return cert if identity == IDENTITY else None

    out = certificates_json(statuses, lookup, now=T0)
    assert [c["identity"] for c in out] == [other.uri, IDENTITY.uri]
    assert [c["state"] for c in out] == ["QUEUED", "SCHEDULED"]
    assert len(out[1]["chain"]) == 3 and out[0]["chain"] == []
    assert set(asked) == {IDENTITY, other}


# -- the whole dump -----------------------------------------------------------------------


def test_config_dump_of_a_snapshot() -> None:
    store = StateStore()
    writer = store.claim_writer("test")
    key = "demo/echo.demo.svc.cluster.local"
    snapshot = writer.replace(
        Batch(
            workloads=(
                workload("echo-1", "demo", ips=["10.244.1.3"], services={key: [(80, 8080)]}),
                workload("echo-0", "demo", ips=["10.244.1.2"], services={key: [(80, 8080)]}),
            ),
            services=(service("echo.demo.svc.cluster.local", "demo", vips=["10.96.0.5"]),),
            policies=(policy("deny-all", "demo", action=Action.DENY),),
        )
    )
    certificates = [{"identity": "spiffe://cluster.local/ns/demo/sa/default", "chain": []}]
    out = config_dump(snapshot, certificates)
    assert set(out) == {"workloads", "services", "policies", "certificates", "version", "ready"}
    assert out["version"] == snapshot.version and out["ready"] is True
    assert [w["name"] for w in out["workloads"]] == ["echo-0", "echo-1"]  # sorted by uid
    assert out["services"] == [service_json(snapshot.services[key])]
    assert [p["key"] for p in out["policies"]] == ["demo/deny-all"]
    assert out["certificates"] is certificates
    assert json.loads(json.dumps(out)) == out


def test_config_dump_of_the_empty_state() -> None:
    out = config_dump(StateStore().snapshot, [])
    assert out == {
        "version": 0,
        "ready": False,
        "workloads": [],
        "services": [],
        "policies": [],
        "certificates": [],
    }
