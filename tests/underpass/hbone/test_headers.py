"""HBONE request headers: strict authority, lenient informational headers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from underpass.hbone.errors import BadRequest, LocalProtocolError
from underpass.hbone.headers import (
    Baggage,
    ConnectRequest,
    Forwarded,
    SocketAddress,
    TraceParent,
    build_request_headers,
    parse_authority,
    parse_baggage,
    parse_forwarded,
    parse_traceparent,
)

pytestmark = pytest.mark.unit


def _not_mapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not isinstance(ip, ipaddress.IPv6Address) or ip.ipv4_mapped is None


_ips = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6).filter(_not_mapped),
)
_ports = st.integers(1, 65535)


@given(_ips, _ports)
def test_authority_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    address = SocketAddress(ip, port)
    text = str(address)
    assert text.startswith("[") == (ip.version == 6)
    assert parse_authority(text) == address
    assert parse_authority(text.encode()) == address


@given(st.binary(max_size=64))
def test_authority_parser_raises_only_bad_request(value: bytes) -> None:
    try:
        address = parse_authority(value)
    except BadRequest as exc:
        assert exc.status == 400
    else:
        assert parse_authority(str(address)) == address


def test_mapped_ipv6_is_stored_as_ipv4() -> None:
    assert parse_authority("[::ffff:10.1.2.3]:80") == SocketAddress.of("10.1.2.3", 80)
    assert SocketAddress.of("::ffff:10.1.2.3", 80).ip.version == 4


@pytest.mark.parametrize(
    ("ip", "port"), [("10.0.0.1", 0), ("10.0.0.1", 65536), ("10.0.0.1", True), ("x", 1)]
)
def test_socket_address_refuses_bad_values(ip: str, port: int) -> None:
    with pytest.raises(LocalProtocolError):
        SocketAddress.of(ip, port)


def test_socket_address_refuses_zone_ids() -> None:
    with pytest.raises(LocalProtocolError, match="zone"):
        SocketAddress.of("fe80::1%eth0", 80)


# -- forwarded ------------------------------------------------------------------------------


@given(
    _ips,
    _ports,
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,4}", fullmatch=True),
)
def test_forwarded_round_trip(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, host: str
) -> None:
    host = host.rstrip("-") or "a"
    forwarded = Forwarded(SocketAddress(ip, port), host)
    assert parse_forwarded(forwarded.header_value()) == forwarded
    assert parse_forwarded(Forwarded(SocketAddress(ip, port)).header_value()) == Forwarded(
        SocketAddress(ip, port)
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b'for="10.0.0.2:4000";host=a.b', Forwarded(SocketAddress.of("10.0.0.2", 4000), "a.b")),
        (b'For="[fd00::2]:4000"', Forwarded(SocketAddress.of("fd00::2", 4000))),
        (b'for="10.0.0.2:4000", for=10.9.9.9', Forwarded(SocketAddress.of("10.0.0.2", 4000))),
        (b"for=unknown;host=x.y", Forwarded(None, "x.y")),
        (b"for=unknown", None),
        (b"for=", None),
        (b'for="10.0.0.2:4000', None),
        (b"for=a;for=b", None),
        (b"\xff", None),
        (b"", None),
    ],
)
def test_forwarded_parsing(value: bytes, expected: Forwarded | None) -> None:
    assert parse_forwarded(value) == expected


def test_forwarded_refuses_what_it_cannot_send() -> None:
    with pytest.raises(LocalProtocolError):
        Forwarded(None, "bad host;x").header_value()
    with pytest.raises(LocalProtocolError):
        Forwarded().header_value()


# -- baggage --------------------------------------------------------------------------------

_texts = st.text(max_size=40)


@given(
    _texts, _texts, st.sampled_from(["deployment", "pod", "statefulset"]), _texts, _texts, _texts
)
def test_baggage_round_trip(
    cluster: str, namespace: str, kind: str, name: str, service: str, version: str
) -> None:
    baggage = Baggage(cluster, namespace, kind if name else "", name, service, version)
    value = baggage.header_value()
    assert value.isascii()
    parsed = parse_baggage(value)
    assert parsed == (baggage if value else None)  # an empty baggage is not sent


def test_baggage_parsing_is_lenient() -> None:
    assert parse_baggage(b"k8s.namespace.name=shop;prop=1 , other=x,service.name=cart%20v") == (
        Baggage(namespace="shop", service_name="cart v")
    )
    assert parse_baggage(b"no-equals-sign") is None
    assert parse_baggage(b"bad key=1") is None
    assert parse_baggage(b"k=%ff") is None  # not UTF-8 once decoded
    assert parse_baggage(b"k=" + b"a" * 9000) is None


@given(st.binary(max_size=200))
def test_informational_parsers_never_raise(value: bytes) -> None:
    parse_baggage(value)
    parse_forwarded(value)
    parse_traceparent(value)


# -- traceparent ----------------------------------------------------------------------------


def test_traceparent() -> None:
    value = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    trace = parse_traceparent(value)
    assert trace == TraceParent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", 1)
    assert trace.header_value() == value
    fresh = TraceParent.new()
    assert parse_traceparent(fresh.header_value()) == fresh
    assert fresh != TraceParent.new()


@pytest.mark.parametrize(
    "value",
    [
        b"00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace ID
        b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero parent ID
        b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
    ],
)
def test_invalid_traceparents_are_ignored(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_future_traceparent_versions_are_read() -> None:
    value = b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more"
    assert parse_traceparent(value) is not None


def test_build_request_headers() -> None:
    headers = build_request_headers(ConnectRequest(SocketAddress.of("fd00::5", 9080)))
    assert headers[:2] == [(b":method", b"CONNECT"), (b":authority", b"[fd00::5]:9080")]
    assert [name for name, _ in headers[2:]] == [b"traceparent"]
    with pytest.raises(LocalProtocolError):
        build_request_headers(ConnectRequest("10.0.0.1:80"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="kind"):
        Baggage(workload_kind="Deployment", workload_name="x").header_value()
