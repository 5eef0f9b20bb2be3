"""``underpass zc`` against a real admin server (ztunnel.admin on loopback, in a thread) (unit)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import trio
import yaml

from identity.certmanager import IdentityStatus, Phase
from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from tests.identity.pki import DAY, ec_key, make_leaf, make_pki
from tests.ztunnel.builders import policy, service, workload
from underpass.cli import zc
from underpass.cli.main import main
from ztunnel.admin import serve_admin, serve_metrics
from ztunnel.dump import certificate_json, config_dump
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.state import (
    Action,
    Batch,
    GatewayAddress,
    NamespacedHostname,
    Scope,
    StateStore,
    TunnelProtocol,
)

pytestmark = pytest.mark.unit

ECHO = "demo/echo.demo.svc.cluster.local"
SLEEP_ID = SpiffeId("cluster.local", "demo", "sleep")
WEB_ID = SpiffeId("cluster.local", "shop", "web")
NOW = dt.datetime.now(dt.UTC)


def _certificate(identity: SpiffeId) -> WorkloadCertificate:
    pki = make_pki(depth=1, now=NOW)
    key = ec_key()
    leaf = make_leaf(pki.signer, spiffe_id=identity, key=key, now=NOW, lifetime=DAY)
    return WorkloadCertificate.from_parts(identity, key, (leaf.cert, *pki.chain), (pki.root.cert,))


def _status(identity: SpiffeId, phase: Phase, cert: WorkloadCertificate | None) -> IdentityStatus:
    return IdentityStatus(
        identity=identity,
        phase=phase,
        references=1,
        serial=cert.serial if cert else None,
        not_after=cert.not_after if cert else None,
        failures=0 if cert else 2,
        last_error=None if cert else "the CA is unreachable",
        next_attempt_in=10.0,
    )


class Provider:
    """Real model objects in a real snapshot, certificates from a real chain."""

    def __init__(self) -> None:
        waypoint = GatewayAddress(NamespacedHostname("demo", "waypoint.demo.svc.cluster.local"))
        echo_0 = dataclasses.replace(
            workload("echo-0", "demo", ips=["10.244.1.2"], services={ECHO: [(80, 8080)]}),
            node="node-1",
            tunnel_protocol=TunnelProtocol.HBONE,
            waypoint=waypoint,
        )
        echo_1 = dataclasses.replace(
            workload("echo-1", "demo", ips=["10.244.2.2"], services={ECHO: [(80, 8080)]}),
            node="node-2",
            tunnel_protocol=TunnelProtocol.HBONE,
        )
        web = dataclasses.replace(workload("web-0", "shop", ips=["10.244.1.9"]), node="node-1")
        store = StateStore()
        self.snapshot = store.claim_writer("test").replace(
            Batch(
                workloads=(echo_0, echo_1, web),
                services=(
                    service("echo.demo.svc.cluster.local", "demo", vips=["10.96.0.5"]),
                    service("lonely.shop.svc.cluster.local", "shop", vips=["10.96.0.9"]),
                ),
                policies=(
                    policy("allow-sleep", "demo", action=Action.ALLOW, scope=Scope.NAMESPACE),
                    policy(
                        "deny-all", "shop", action=Action.DENY, scope=Scope.GLOBAL, dry_run=True
                    ),
                ),
            )
        )
        self.cert = _certificate(SLEEP_ID)
        self.certificates = [
            certificate_json(_status(SLEEP_ID, Phase.SCHEDULED, self.cert), self.cert),
            certificate_json(_status(WEB_ID, Phase.BACKOFF, None), None),
        ]
        started = time.time()
        self.connections_list: list[dict[str, Any]] = [
            {
                "id": 1,
                "pod": "uid-1",
                "direction": "outbound",
                "protocol": "HBONE",
                "source": "10.244.1.3:40000",
                "destination": "10.244.1.2:8080",
                "source_workload": "demo/sleep-0",
                "destination_workload": "demo/echo-0",
                "source_identity": SLEEP_ID.uri,
                "destination_identity": "spiffe://cluster.local/ns/demo/sa/default",
                "bytes_sent": 2048,
                "bytes_received": 10,
                "started": started - 75,
            },
            {
                "id": 2,
                "pod": "uid-9",
                "direction": "inbound",
                "protocol": "TCP",
                "source": "10.244.2.7:5000",
                "destination": "10.244.1.9:9090",
                "source_workload": None,
                "destination_workload": "shop/web-0",
                "source_identity": None,
                "destination_identity": WEB_ID.uri,
                "bytes_sent": 0,
                "bytes_received": 3 * 1024 * 1024,
                "started": started - 3,
            },
        ]

    def config_dump(self) -> dict[str, Any]:
        return config_dump(self.snapshot, self.certificates)

    def connections(self) -> list[dict[str, Any]]:
        return self.connections_list

    def unmet_readiness(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def provider() -> Provider:
    return Provider()


def _serve_in_thread(start: Any) -> Iterator[tuple[str, int]]:
    """Run ``start(task_status=...)`` in a trio loop of its own thread; yield its address."""
    results: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        async def serve() -> None:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(start)
                results.put((address, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

        try:
            trio.run(serve)
        except BaseException as exc:
            results.put(exc)

    thread = threading.Thread(target=run, name="admin server", daemon=True)
    thread.start()
    started = results.get(timeout=10)
    if isinstance(started, BaseException):
        raise RuntimeError("the admin server did not start") from started
    address, token, scope = started
    try:
        yield address
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the admin server thread did not stop"


@pytest.fixture(scope="module")
def admin(provider: Provider) -> Iterator[str]:
    def start(task_status: trio.TaskStatus[tuple[str, int]]) -> Any:
        return serve_admin(("127.0.0.1", 0), provider, task_status=task_status)

    for host, port in _serve_in_thread(start):
        yield f"{host}:{port}"


def run_zc(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``underpass zc ...`` in process; main() reconfigures logging, which is undone."""
    saved = structlog.get_config()
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        code = main(["zc", *argv])
    finally:
        structlog.configure(**saved)
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.rstrip("\n").splitlines()
    rows = [re.split(r" {3,}", line.rstrip()) for line in lines]
    return rows[0], rows[1:]


# -- tables ------------------------------------------------------------------------------


def test_workloads_table(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_zc(["workloads", "--admin", admin], capsys)
    assert code == 0, err
    header, rows = parse_table(out)
    assert header == ["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    assert rows == [
        ["demo", "echo-0", "10.244.1.2", "node-1", "waypoint", "HBONE"],
        ["demo", "echo-1", "10.244.2.2", "node-2", "-", "HBONE"],
        ["shop", "web-0", "10.244.1.9", "node-1", "-", "TCP"],
    ]


def test_services_table_counts_endpoints(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_zc(["services", "--admin", admin], capsys)
    assert code == 0
    header, rows = parse_table(out)
    assert header == ["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"]
    assert rows == [
        ["demo", "echo", "10.96.0.5", "-", "2"],
        ["shop", "lonely", "10.96.0.9", "-", "0"],
    ]


def test_policies_table(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_zc(["policies", "--admin", admin], capsys)
    assert code == 0
    header, rows = parse_table(out)
    assert header == ["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"]
    assert rows == [
        ["demo", "allow-sleep", "ALLOW", "NAMESPACE"],
        ["shop", "deny-all", "DENY (dry run)", "GLOBAL"],
    ]


def test_certificates_table_has_a_row_per_chain_certificate(
    admin: str, provider: Provider, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_zc(["certificates", "--admin", admin], capsys)
    assert code == 0
    header, rows = parse_table(out)
    assert header == [
        "CERTIFICATE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL",
        "NOT AFTER",
        "NOT BEFORE",
    ]
    cert = provider.cert
    leaf, intermediate = cert.chain
    (root,) = cert.roots
    assert rows == [
        [
            SLEEP_ID.uri,
            kind,
            "SCHEDULED",
            "yes",
            f"{c.serial_number:x}",
            c.not_valid_after_utc.isoformat(),
            c.not_valid_before_utc.isoformat(),
        ]
        for kind, c in (("Leaf", leaf), ("Intermediate", intermediate), ("Root", root))
    ] + [[WEB_ID.uri, "-", "BACKOFF", "no", "-", "-", "-"]]


def test_connections_table(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_zc(["connections", "--admin", admin], capsys)
    assert code == 0
    header, rows = parse_table(out)
    assert header == [
        "SOURCE",
        "DESTINATION",
        "SOURCE IDENTITY",
        "DESTINATION IDENTITY",
        "DIRECTION",
        "PROTOCOL",
        "BYTES SENT/RECV",
        "AGE",
    ]
    assert len(rows) == 2
    first, second = rows  # oldest first
    assert first[:7] == [
        "10.244.1.3:40000",
        "10.244.1.2:8080",
        "cluster.local/ns/demo/sa/sleep",
        "cluster.local/ns/demo/sa/default",
        "outbound",
        "HBONE",
        "2.0KiB/10B",
    ]
    assert re.fullmatch(r"1m1[5-9]s", first[7]), first[7]
    assert second[:7] == [
        "10.244.2.7:5000",
        "10.244.1.9:9090",
        "-",
        "cluster.local/ns/shop/sa/web",
        "inbound",
        "TCP",
        "0B/3.0MiB",
    ]
    assert re.fullmatch(r"[3-9]s", second[7]), second[7]


def test_namespace_filter(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    for view, expected in (
        ("workloads", {"web-0"}),
        ("services", {"lonely"}),
        ("policies", {"deny-all"}),
    ):
        code, out, _ = run_zc([view, "--admin", admin, "-n", "shop"], capsys)
        assert code == 0
        _, rows = parse_table(out)
        assert {row[1] for row in rows} == expected, view
    code, out, _ = run_zc(["certificates", "--admin", admin, "--namespace", "shop"], capsys)
    assert {row[0] for row in parse_table(out)[1]} == {WEB_ID.uri}
    code, out, _ = run_zc(["connections", "--admin", admin, "-n", "shop"], capsys)
    assert [row[1] for row in parse_table(out)[1]] == ["10.244.1.9:9090"]


# -- raw output --------------------------------------------------------------------------


@pytest.mark.parametrize("view", ["workloads", "services", "policies", "certificates"])
def test_json_and_yaml_round_trip(
    view: str, admin: str, provider: Provider, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = json.loads(json.dumps(provider.config_dump()[view]))
    code, out, _ = run_zc([view, "--admin", admin, "-o", "json"], capsys)
    assert code == 0 and json.loads(out) == expected
    code, out, _ = run_zc([view, "--admin", admin, "-o", "yaml"], capsys)
    assert code == 0 and yaml.safe_load(out) == expected


def test_connections_json(
    admin: str, provider: Provider, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_zc(["connections", "--admin", admin, "-o", "json"], capsys)
    assert code == 0 and json.loads(out) == provider.connections_list


# -- errors --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


def test_unreachable_admin_exits_1_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    code, out, err = run_zc(["workloads", "--admin", f"127.0.0.1:{port}"], capsys)
    assert code == 1 and out == ""
    assert (
        f"cannot reach ztunnel admin at 127.0.0.1:{port}: is ztunnel running? "
        "(`underpass lab status`)" in err
    )


def test_an_error_answer_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    def start(task_status: trio.TaskStatus[tuple[str, int]]) -> Any:
        return serve_metrics(
            ("127.0.0.1", 0), ZtunnelMetrics(process_metrics=False), task_status=task_status
        )

    for host, port in _serve_in_thread(start):
        code, out, err = run_zc(["policies", "--admin", f"{host}:{port}"], capsys)
        assert code == 1 and "POLICY NAME" not in out  # (out may hold the server's log)
        assert "answered 404" in err and "/config_dump" in err


def test_admin_address_parsing() -> None:
    assert zc.parse_admin_address("127.0.0.1:15000") == ("127.0.0.1", 15000)
    assert zc.parse_admin_address("[::1]:15000") == ("::1", 15000)
    assert zc.parse_admin_address("localhost:1") == ("localhost", 1)
    for bad in ("127.0.0.1", ":15000", "host:port", "host:70000", "host:0"):
        with pytest.raises(Exception, match="HOST:PORT"):
            zc.parse_admin_address(bad)


def test_zc_is_a_registered_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["zc", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for view in ("workloads", "services", "policies", "certificates", "connections"):
        assert view in out
    assert "127.0.0.1:15000" in out


def test_small_formatters() -> None:
    assert zc.bytes_text(0) == "0B" and zc.bytes_text(1536) == "1.5KiB"
    assert zc.bytes_text(5 * 1024**4) == "5120.0GiB"
    assert [zc.age_text(s) for s in (0, 59, 61, 3600 + 120, 2 * 86400 + 3 * 3600)] == [
        "0s",
        "59s",
        "1m01s",
        "1h02m",
        "2d03h",
    ]
    assert zc.identity_namespace("spiffe://cluster.local/ns/demo/sa/x") == "demo"
    assert zc.identity_namespace("spiffe://cluster.local/other") is None
