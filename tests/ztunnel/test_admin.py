"""ztunnel.admin: the admin, metrics and readiness servers over real loopback TCP (unit)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import h11
import pytest
import structlog
import trio
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import LogCapture

from underpass import log as logsetup
from ztunnel.admin import (
    HttpLimits,
    serve_admin,
    serve_http,
    serve_metrics,
    serve_readiness,
)
from ztunnel.dump import config_dump
from ztunnel.metrics import TcpLabels, ZtunnelMetrics
from ztunnel.state import Batch, StateStore

from .builders import service, workload

pytestmark = pytest.mark.unit

LOOPBACK = ("127.0.0.1", 0)
TIMEOUT = 10  # seconds; a bound on every wait, never expected to be reached


class FakeProvider:
    """An admin provider over a real state snapshot."""

    def __init__(self) -> None:
        store = StateStore()
        self.snapshot = store.claim_writer("test").replace(
            Batch(
                workloads=(workload("echo-0", "demo", ips=["10.244.1.2"]),),
                services=(service("echo.demo.svc.cluster.local", "demo", vips=["10.96.0.5"]),),
            )
        )
        self.unmet = ["no configuration yet: waiting for the control plane"]
        self.shutdowns = 0
        self.shutdown_called = trio.Event()
        self.fail = False

    def config_dump(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("provider broke")
        return config_dump(self.snapshot, [])

    def connections(self) -> list[dict[str, Any]]:
        return [{"id": 1, "direction": "inbound", "protocol": "HBONE", "bytes_sent": 10}]

    def unmet_readiness(self) -> list[str]:
        return list(self.unmet)

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.shutdown_called.set()


class Client:
    """An HTTP/1.1 client on one TCP connection (h11), for keep-alive and raw bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> Client:
        return cls(await trio.open_tcp_stream(*address))

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("Host", "localhost"), ("Content-Length", str(len(body))), *(headers or [])]
        data = self.conn.send(h11.Request(method=method, target=target, headers=all_headers))
        data = (data or b"") + (self.conn.send(h11.Data(data=body)) or b"") if body else data or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        with trio.fail_after(TIMEOUT):
            head = await self._next()
            assert isinstance(head, h11.Response), head
            body = b""
            while True:
                event = await self._next()
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
        headers = {k.decode().lower(): v.decode() for k, v in head.headers}
        return head.status_code, headers, body

    async def _next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def get(
    address: tuple[str, int], method: str, target: str
) -> tuple[int, dict[str, str], bytes]:
    client = await Client.connect(address)
    try:
        return await client.request(method, target)
    finally:
        await client.aclose()


async def raw_exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` and read everything until the server closes."""
    stream = await trio.open_tcp_stream(*address)
    try:
        if data:
            await stream.send_all(data)
        received = b""
        with trio.fail_after(TIMEOUT):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received
    finally:
        await stream.aclose()


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def captured_logs() -> Iterator[LogCapture]:
    """structlog capturing to a list at level info; the process's config restored after."""
    saved = structlog.get_config()
    root_level = logging.root.level
    capture = LogCapture()
    structlog.configure(
        processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
    )
    try:
        yield capture
    finally:
        structlog.configure(**saved)
        logging.root.setLevel(root_level)


# -- admin ------------------------------------------------------------------------------


async def test_admin_index_lists_the_endpoints(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    assert address[0] == "127.0.0.1" and address[1] > 0
    status, headers, body = await get(address, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for path in ("/config_dump", "/connections", "/logging", "/quitquitquit"):
        assert path in body.decode()


async def test_admin_config_dump_and_connections(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    status, headers, body = await get(address, "GET", "/config_dump")
    assert status == 200 and headers["content-type"] == "application/json"
    dump = json.loads(body)
    assert dump == provider.config_dump()
    assert [w["name"] for w in dump["workloads"]] == ["echo-0"]
    status, _, body = await get(address, "GET", "/connections")
    assert status == 200 and json.loads(body) == provider.connections()


async def test_admin_unknown_path_and_wrong_method(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    status, _, body = await get(address, "GET", "/nope")
    assert status == 404 and b"/nope" in body
    status, headers, body = await get(address, "GET", "/quitquitquit")
    assert status == 405 and headers["allow"] == "POST"
    assert provider.shutdowns == 0
    status, headers, _ = await get(address, "DELETE", "/logging")
    assert status == 405 and headers["allow"] == "GET, POST"


async def test_admin_quitquitquit_calls_shutdown_after_answering(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    status, _, body = await get(address, "POST", "/quitquitquit")
    assert (status, body) == (200, b"OK\n")
    with trio.fail_after(TIMEOUT):
        await provider.shutdown_called.wait()
    assert provider.shutdowns == 1


async def test_logging_level_changes_structlog_filtering(
    nursery: trio.Nursery, provider: FakeProvider, captured_logs: LogCapture
) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    probe = structlog.get_logger("test.probe")

    def probes() -> list[str]:
        return [e["event"] for e in captured_logs.entries if str(e["event"]).startswith("probe")]

    status, _, body = await get(address, "GET", "/logging")
    assert status == 200 and json.loads(body) == {"level": "info"}
    probe.debug("probe 1 hidden at info")
    assert probes() == []

    status, _, body = await get(address, "POST", "/logging?level=debug")
    assert status == 200 and json.loads(body) == {"level": "debug", "previous": "info"}
    assert logsetup.current_level() == "debug"
    probe.debug("probe 2 shown at debug")
    assert probes() == ["probe 2 shown at debug"]

    status, _, body = await get(address, "POST", "/logging?level=ERROR")
    assert status == 200 and json.loads(body)["level"] == "error"
    probe.warning("probe 3 hidden at error")
    probe.error("probe 4 shown at error")
    assert probes() == ["probe 2 shown at debug", "probe 4 shown at error"]
    assert logging.root.level == logging.ERROR  # libraries' stdlib logging follows

    status, _, body = await get(address, "GET", "/logging")
    assert json.loads(body) == {"level": "error"}


async def test_logging_refuses_bad_levels(
    nursery: trio.Nursery, provider: FakeProvider, captured_logs: LogCapture
) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    status, _, body = await get(address, "POST", "/logging?level=loud")
    assert status == 400 and b"unknown log level 'loud'" in body and b"debug" in body
    status, _, body = await get(address, "POST", "/logging")
    assert status == 400 and b"level=" in body
    status, _, body = await get(address, "GET", "/logging?level=debug")
    assert status == 400 and b"POST" in body
    assert logsetup.current_level() == "info"


async def test_admin_refuses_a_non_loopback_address(provider: FakeProvider) -> None:
    with pytest.raises(ValueError, match="loopback"):
        await serve_admin(("0.0.0.0", 0), provider)  # noqa: S104  # refused, never bound


async def test_a_failing_provider_answers_500_and_the_server_goes_on(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    provider.fail = True
    status, _, body = await get(address, "GET", "/config_dump")
    assert status == 500 and b"log" in body
    provider.fail = False
    status, _, _ = await get(address, "GET", "/config_dump")
    assert status == 200


# -- HTTP robustness ------------------------------------------------------------------------


async def test_keep_alive_serves_two_requests_on_one_connection(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    client = await Client.connect(address)
    try:
        first = await client.request("GET", "/connections")
        second = await client.request("GET", "/logging")
    finally:
        await client.aclose()
    assert first[0] == 200 and json.loads(first[2])[0]["id"] == 1
    assert second[0] == 200 and "level" in json.loads(second[2])


async def test_garbage_gets_400_and_a_close(nursery: trio.Nursery, provider: FakeProvider) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    answer = await raw_exchange(address, b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"connection: close" in answer.lower()
    # The server is still there for the next client.
    status, _, _ = await get(address, "GET", "/")
    assert status == 200


async def test_request_head_limit(nursery: trio.Nursery, provider: FakeProvider) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    answer = await raw_exchange(address, big)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


async def test_request_body_limit(nursery: trio.Nursery, provider: FakeProvider) -> None:
    address = await nursery.start(serve_admin, LOOPBACK, provider)
    declared = b"POST /logging?level=info HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n"
    answer = await raw_exchange(address, declared + b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    chunked = (
        b"POST /logging?level=info HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"8000\r\n"
        + b"y" * 0x8000
        + b"\r\n"
    ) * 1
    more = b"8000\r\n" + b"y" * 0x8000 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n"
    answer = await raw_exchange(address, chunked + more)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]


async def test_slow_request_gets_408_and_idle_connection_closes(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    limits = HttpLimits(read_timeout=0.3)
    address = await nursery.start(
        lambda task_status: serve_admin(LOOPBACK, provider, limits=limits, task_status=task_status)
    )
    answer = await raw_exchange(address, b"GET /config_dump HTTP/1.1\r\nHost:")
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert await raw_exchange(address, b"") == b""  # idle: closed without a word


async def test_connection_limit(nursery: trio.Nursery, provider: FakeProvider) -> None:
    limits = HttpLimits(max_connections=1)
    address = await nursery.start(
        lambda task_status: serve_admin(LOOPBACK, provider, limits=limits, task_status=task_status)
    )
    first = await Client.connect(address)
    try:
        assert (await first.request("GET", "/"))[0] == 200  # the first is being served
        assert await raw_exchange(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        assert (await first.request("GET", "/"))[0] == 200
    finally:
        await first.aclose()


async def test_serve_http_needs_a_literal_address() -> None:
    with pytest.raises(ValueError, match="literal IP"):
        await serve_http({}, ("localhost", 0), name="test")


# -- metrics and readiness ------------------------------------------------------------------


async def test_metrics_endpoints(nursery: trio.Nursery) -> None:
    metrics = ZtunnelMetrics()
    metrics.connection_opened(TcpLabels(reporter="destination", source_workload="sleep"))
    address = await nursery.start(serve_metrics, LOOPBACK, metrics)
    for path in ("/metrics", "/stats/prometheus"):
        status, headers, body = await get(address, "GET", path)
        assert status == 200
        assert headers["content-type"] == metrics.render()[1]
        found = {
            (sample.name, sample.labels.get("reporter"), sample.labels.get("source_workload")): (
                sample.value
            )
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }
        assert found[("istio_tcp_connections_opened_total", "destination", "sleep")] == 1
        assert found[("process_resident_memory_bytes", None, None)] > 0
    status, _, _ = await get(address, "GET", "/config_dump")
    assert status == 404


async def test_readiness_flips_from_503_to_200(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    address = await nursery.start(serve_readiness, LOOPBACK, provider)
    provider.unmet = ["no configuration yet", "ZDS snapshot not processed yet"]
    status, _, body = await get(address, "GET", "/healthz/ready")
    assert status == 503
    assert body.decode().splitlines() == provider.unmet
    provider.unmet = []
    status, _, body = await get(address, "GET", "/healthz/ready")
    assert (status, body) == (200, b"ready\n")


async def test_a_client_that_stops_reading_loses_its_connection(
    nursery: trio.Nursery, provider: FakeProvider
) -> None:
    big = "x" * (32 * 1024 * 1024)  # far more than both sockets' buffers hold
    provider.connections = lambda: [{"payload": big}]  # type: ignore[method-assign]
    limits = HttpLimits(max_connections=1, write_timeout=0.3)
    address = await nursery.start(
        lambda task_status: serve_admin(LOOPBACK, provider, limits=limits, task_status=task_status)
    )
    stalled = await trio.open_tcp_stream(*address)
    try:
        await stalled.send_all(b"GET /connections HTTP/1.1\r\nHost: x\r\n\r\n")
        # The one connection slot is taken until the write timeout frees it.
        with trio.fail_after(TIMEOUT):
            while True:
                client = await Client.connect(address)
                try:
                    status, _, _ = await client.request("GET", "/logging")
                    break
                except (h11.RemoteProtocolError, trio.BrokenResourceError):
                    await trio.sleep(0.05)  # refused: the slot is still taken
                finally:
                    await client.aclose()
        assert status == 200
    finally:
        await stalled.aclose()
