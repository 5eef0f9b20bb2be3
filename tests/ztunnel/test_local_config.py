"""--local-config: YAML -> state, errors that name the field, reload keeping the last good state."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import structlog.testing
import trio
import trio.testing

from tests.ztunnel.builders import full_workload
from underpass.proto import authorization_pb2 as apb
from underpass.proto import workload_pb2 as wpb
from ztunnel.errors import LocalConfigError
from ztunnel.local_config import (
    LocalConfigSource,
    load_local_config,
    parse_local_config,
)
from ztunnel.state import (
    StateStore,
    authorization_from_proto,
    service_from_proto,
    workload_from_proto,
)

pytestmark = pytest.mark.unit

FULL = textwrap.dedent(
    """\
    workloads:
      - uid: c1//Pod/shop/web-0
        name: web-0
        namespace: shop
        addresses: ["10.244.1.5", "fd00::5"]
        hostname: web-0.shop
        network: net1
        tunnel_protocol: HBONE
        trust_domain: example.org
        service_account: web
        waypoint:
          hostname: {namespace: shop, hostname: wp.shop.svc}
          hbone_mtls_port: 15008
        network_gateway:
          address: {network: net2, address: "172.30.0.1"}
          hbone_mtls_port: 15008
        node: node-1
        canonical_name: web
        canonical_revision: v1
        workload_type: POD
        workload_name: web
        native_tunnel: true
        application_tunnel: {protocol: PROXY, port: 15088}
        services:
          shop/web.shop.svc.cluster.local:
            ports: [{service_port: 80, target_port: 8080, app_protocol: HTTP11}]
        authorization_policies: [shop/allow]
        status: UNHEALTHY
        cluster_id: c1
        locality: {region: r, zone: z, subzone: s}
        network_mode: HOST_NETWORK
    services:
      - name: web
        namespace: shop
        hostname: web.shop.svc.cluster.local
        addresses:
          - {address: "10.96.0.20"}
          - {network: n, address: "fd00::20", length: 128}
        ports: [{service_port: 80, target_port: 8080, app_protocol: TCP}]
        subject_alt_names: ["spiffe://cluster.local/ns/shop/sa/web"]
        waypoint: {address: {address: "10.0.0.9"}, hbone_mtls_port: 15008}
        load_balancing:
          routing_preference: [NODE, ZONE]
          mode: FAILOVER
          health_policy: ALLOW_ALL
        ip_families: DUAL
    policies:
      - name: allow
        namespace: shop
        scope: WORKLOAD_SELECTOR
        action: DENY
        dry_run: true
        rules:
          - clauses:
              - matches:
                  - namespaces: [{exact: shop}]
                    not_namespaces: [{prefix: kube-}]
                    principals: [{suffix: /sa/frontend}]
                    not_principals: [{presence: {}}]
                    source_ips: ["10.1.2.3/8"]
                    not_source_ips: ["fd00::/16"]
                    destination_ips: ["10.244.1.5/32"]
                    not_destination_ips: ["10.244.1.6"]
                    destination_ports: [80, 443]
                    not_destination_ports: [8080]
                    service_accounts: [{namespace: shop, serviceAccount: fe}]
                    not_service_accounts: [{namespace: evil, service_account: x}]
    """
)


def test_yaml_equals_the_proto_conversion() -> None:
    config = parse_local_config(FULL)
    assert config.workloads == (workload_from_proto(full_workload()),)
    service = wpb.Service(
        name="web",
        namespace="shop",
        hostname="web.shop.svc.cluster.local",
        addresses=[
            wpb.NetworkAddress(address=bytes([10, 96, 0, 20])),
            wpb.NetworkAddress(
                network="n", address=bytes.fromhex("fd00" + "00" * 13 + "20"), length=128
            ),
        ],
        ports=[wpb.Port(service_port=80, target_port=8080, app_protocol=wpb.TCP)],
        subject_alt_names=["spiffe://cluster.local/ns/shop/sa/web"],
        waypoint=wpb.GatewayAddress(
            address=wpb.NetworkAddress(address=bytes([10, 0, 0, 9])), hbone_mtls_port=15008
        ),
        load_balancing=wpb.LoadBalancing(
            routing_preference=[wpb.LoadBalancing.NODE, wpb.LoadBalancing.ZONE],
            mode=wpb.LoadBalancing.FAILOVER,
            health_policy=wpb.LoadBalancing.ALLOW_ALL,
        ),
        ip_families=wpb.DUAL,
    )
    assert config.services == (service_from_proto(service),)
    from tests.ztunnel.test_state_convert import every_field_match

    policy = apb.Authorization(
        name="allow",
        namespace="shop",
        scope=apb.WORKLOAD_SELECTOR,
        action=apb.DENY,
        dry_run=True,
        rules=[apb.Rule(clauses=[apb.Clause(matches=[every_field_match()])])],
    )
    assert config.policies == (authorization_from_proto(policy),)


def test_defaults_and_derived_uid() -> None:
    config = parse_local_config(
        "workloads: [{name: a, namespace: b}, {name: c, namespace: b, cluster_id: east}]"
    )
    a, c = config.workloads
    assert a.uid == "Kubernetes//Pod/b/a" and c.uid == "east//Pod/b/c"
    assert a.identity.uri == "spiffe://cluster.local/ns/b/sa/default"
    assert parse_local_config("") == parse_local_config("{}")
    assert parse_local_config("").batch().empty


def test_presence_spellings() -> None:
    for spelling in ("{}", "null", "true"):
        doc = f"""
        policies:
          - name: p
            namespace: n
            scope: GLOBAL
            action: ALLOW
            rules: [{{clauses: [{{matches: [{{principals: [{{presence: {spelling}}}]}}]}}]}}]
        """
        (policy,) = parse_local_config(textwrap.dedent(doc)).policies
        assert str(policy.rules[0].clauses[0].matches[0].principals[0]) == "*"


WORKLOAD = "workloads:\n  - name: a\n    namespace: b\n"
POLICY = "policies:\n  - name: p\n    namespace: n\n    scope: GLOBAL\n    action: ALLOW\n"
MATCH = POLICY + "    rules: [{clauses: [{matches: [MATCH]}]}]\n"
M = "policies[0].rules[0].clauses[0].matches[0]"


@pytest.mark.parametrize(
    ("document", "path", "words"),
    [
        ("- 1\n", "", "expected a mapping, got a list"),
        ("workload: []\n", "workload", "did you mean 'workloads'?"),
        ("workloads: {a: 1}\n", "workloads", "expected a list, got a mapping"),
        ("workloads: [{namespace: b}]\n", "workloads[0].name", "is required"),
        (WORKLOAD + "    nme: x\n", "workloads[0].nme", "did you mean 'name'?"),
        (
            WORKLOAD + "    addresses: ['10.0.0.1', '10.0.0.256']\n",
            "workloads[0].addresses[1]",
            "'10.0.0.256' is not an IPv4 or IPv6 address",
        ),
        (WORKLOAD + "    addresses: [10]\n", "workloads[0].addresses[0]", "as a string"),
        (
            WORKLOAD + "    tunnel_protocol: HBONEE\n",
            "workloads[0].tunnel_protocol",
            "unknown value 'HBONEE'; expected one of NONE, HBONE",
        ),
        (WORKLOAD + "    native_tunnel: 'yes'\n", "workloads[0].native_tunnel", "true or false"),
        (WORKLOAD + "    node: 12\n", "workloads[0].node", "expected a string, got a number"),
        (
            WORKLOAD
            + "    services: {'shop/web': {ports: [{service_port: 80, target_port: -1}]}}\n",
            "workloads[0].services['shop/web'].ports[0].target_port",
            "expected a port number (0..65535), got -1",
        ),
        (
            WORKLOAD + "    services: {web: {ports: []}}\n",
            "workloads[0].services['web']",
            "'<namespace>/<hostname>'",
        ),
        (
            WORKLOAD + "    waypoint: {hbone_mtls_port: 15008}\n",
            "workloads[0].waypoint",
            "exactly one of 'hostname' and 'address'",
        ),
        (
            WORKLOAD + "    service_account: Bad_SA!\n",
            "workloads[0].trust_domain/namespace/service_account",
            "not a valid SPIFFE ID",
        ),
        (
            WORKLOAD + "    authorization_policies: [allow]\n",
            "workloads[0].authorization_policies[0]",
            "'<namespace>/<name>'",
        ),
        (
            "workloads: [{name: a, namespace: b}, {name: a, namespace: b}]\n",
            "workloads[1]",
            "workload uid 'Kubernetes//Pod/b/a' is already used by workloads[0]",
        ),
        (
            "services: [{namespace: a, hostname: h, addresses: [{address: x}]}]\n",
            "services[0].addresses[0].address",
            "'x' is not an IPv4 or IPv6 address",
        ),
        (
            "services: [{namespace: a, hostname: h,"
            " ports: [{service_port: 1}, {service_port: 1}]}]",
            "services[0].ports[1]",
            "service port 1 is listed twice",
        ),
        (
            "services: [{namespace: a, hostname: h, load_balancing: {mode: RANDOM}}]",
            "services[0].load_balancing.mode",
            "expected one of UNSPECIFIED_MODE, STRICT, FAILOVER, PASSTHROUGH",
        ),
        (
            "policies: [{name: p, namespace: n, action: ALLOW}]\n",
            "policies[0].scope",
            "is required",
        ),
        (POLICY.replace("ALLOW", "AUDIT"), "policies[0].action", "expected one of ALLOW, DENY"),
        (POLICY + "    dry_run: 1\n", "policies[0].dry_run", "true or false"),
        (POLICY + "    rules: [{clause: []}]\n", "policies[0].rules[0].clause", "'clauses'"),
        (
            MATCH.replace("MATCH", "{nmespaces: []}"),
            f"{M}.nmespaces",
            "did you mean 'namespaces'?",
        ),
        (
            MATCH.replace("MATCH", "{principals: [{exact: a, prefix: b}]}"),
            f"{M}.principals[0]",
            "exactly one of exact, prefix, suffix, presence",
        ),
        (
            MATCH.replace("MATCH", "{principals: [{regex: a}]}"),
            f"{M}.principals[0].regex",
            "unknown field 'regex'",
        ),
        (
            MATCH.replace("MATCH", "{not_source_ips: ['10.0.0.0/33']}"),
            f"{M}.not_source_ips[0]",
            "'10.0.0.0/33' is not an IP address or CIDR",
        ),
        (
            MATCH.replace("MATCH", "{destination_ports: [0]}"),
            f"{M}.destination_ports[0]",
            "expected a port number (1..65535), got 0",
        ),
        (
            MATCH.replace("MATCH", "{service_accounts: [{service_account: x}]}"),
            f"{M}.service_accounts[0].namespace",
            "is required",
        ),
        (
            MATCH.replace("MATCH", "{not_namespaces: [{presence: 1}]}"),
            f"{M}.not_namespaces[0].presence",
            "presence takes {}",
        ),
        (
            "policies: [{name: a/b, namespace: n, scope: GLOBAL, action: DENY}]",
            "policies[0]",
            "cannot contain '/'",
        ),
    ],
)
def test_errors_name_the_field(document: str, path: str, words: str) -> None:
    with pytest.raises(LocalConfigError) as info:
        parse_local_config(document, "/etc/ztunnel/local.yaml")
    error = info.value
    assert error.path == path
    assert words in error.problem
    assert str(error.file) == "/etc/ztunnel/local.yaml"
    assert f"at {path}: " in str(error) if path else ": " in str(error)
    assert "keeps the last good configuration" in str(error)


def test_errors_carry_the_line() -> None:
    document = WORKLOAD + "    addresses:\n      - 10.0.0.1\n      - nope\n"
    with pytest.raises(LocalConfigError) as info:
        parse_local_config(document, "local.yaml")
    assert info.value.line == 6
    assert str(info.value).startswith("local config local.yaml:6 at workloads[0].addresses[1]")


def test_yaml_syntax_and_duplicate_keys() -> None:
    with pytest.raises(
        LocalConfigError, match=r"local.yaml:4: not valid YAML: duplicate key 'name'"
    ):
        parse_local_config(WORKLOAD + "    name: c\n", "local.yaml")
    with pytest.raises(LocalConfigError, match="not valid YAML"):
        parse_local_config("workloads: [", "local.yaml")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(LocalConfigError, match="cannot be read: No such file"):
        load_local_config(tmp_path / "missing.yaml")


# -- reload -------------------------------------------------------------------------------

GOOD = WORKLOAD + "    addresses: ['10.0.0.1']\n"
BAD = WORKLOAD + "    addresses: ['10.0.0.300']\n"
GOOD2 = "workloads:\n  - name: z\n    namespace: b\n    addresses: ['10.0.0.2']\n"


def replace_file(path: Path, text: str) -> None:
    """Write as an operator or a ConfigMap update would: a new file renamed over the old."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_reload_keeps_the_last_good_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "local.yaml"
    path.write_text(GOOD)
    store = StateStore()
    source = LocalConfigSource(path, store.claim_writer("local config"), poll_interval=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        assert store.ready
        good = store.snapshot
        assert good.workload_by_ip("10.0.0.1") is not None

        with structlog.testing.capture_logs() as logs:
            replace_file(path, BAD)
            result = await source.wait_attempt(0)
        assert not result.applied and result.error is not None
        assert result.error.path == "workloads[0].addresses[0]"
        assert store.snapshot is good  # the last good state keeps serving
        assert source.last_error is result.error
        (entry,) = [e for e in logs if e["log_level"] == "error"]
        assert "keeping the last good configuration" in entry["event"]
        assert "workloads[0].addresses[0]" in entry["error"]

        replace_file(path, GOOD2)
        result = await source.wait_attempt(1)
        assert result.applied and source.last_error is None
        snap = store.snapshot
        assert set(snap.workloads) == {"Kubernetes//Pod/b/z"}  # a full replacement
        assert snap.workload_by_ip("10.0.0.1") is None and snap.ready

        path.unlink()
        result = await source.wait_attempt(2)
        assert not result.applied and result.error is not None
        assert "cannot be read" in result.error.problem
        assert store.snapshot is snap

        replace_file(path, GOOD2)  # back, same content as the state: nothing to apply
        # Two whole checks after the write: the second one surely started after it.
        await source.wait_checked(source.checks + 1)
        assert source.attempts == 3 and store.snapshot is snap
        assert source.last_error is None
        nursery.cancel_scope.cancel()


async def test_touching_the_file_does_not_reapply(tmp_path: Path) -> None:
    path = tmp_path / "local.yaml"
    path.write_text(GOOD)
    store = StateStore()
    source = LocalConfigSource(path, store.claim_writer("local config"))
    source.load()
    before = store.snapshot
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert await source.check() is None
    assert await source.check() is None
    assert store.snapshot is before and source.attempts == 0


async def test_a_bad_file_at_start_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "local.yaml"
    path.write_text(BAD)
    store = StateStore()
    source = LocalConfigSource(path, store.claim_writer("local config"))
    with pytest.raises(LocalConfigError, match=r"workloads\[0\]\.addresses\[0\]"):
        await source.run()  # raises before it would report started
    assert not store.ready


async def test_a_change_is_seen_by_inotify_not_the_timer(tmp_path: Path) -> None:
    # Real clock and an hour-long safety timer: only the inotify watch can wake the reload.
    path = tmp_path / "local.yaml"
    path.write_text(GOOD)
    store = StateStore()
    source = LocalConfigSource(path, store.claim_writer("local config"), poll_interval=3600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        replace_file(path, GOOD2)
        with trio.fail_after(10):
            result = await source.wait_attempt(0)
        assert result.applied
        assert set(store.snapshot.workloads) == {"Kubernetes//Pod/b/z"}
        nursery.cancel_scope.cancel()
