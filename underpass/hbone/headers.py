"""The HBONE request: ``:authority`` and the headers the client sends with it.

PROTOCOLS.md section 2: a CONNECT's ``:authority`` is ``ip:port`` of the real
target (``[ip]:port`` for IPv6); the client adds

- ``forwarded: for="<client ip:port>"`` plus ``;host=<hostname>`` when known
  (RFC 7239; an IPv6 node is ``"[ip]:port"``),
- ``baggage: k8s.cluster.name=..,k8s.namespace.name=..,k8s.<kind>.name=..,
  service.name=..,service.version=..`` (W3C Baggage, values percent-encoded),
- ``traceparent: 00-<32 hex>-<16 hex>-<2 hex>`` (W3C Trace Context).

Parsing the authority is strict, because the server's decisions rest on it
(:func:`parse_authority` raises :class:`~underpass.hbone.errors.BadRequest`,
the 400). The other three are information about the caller, never trusted for
security (the caller's identity comes from its TLS certificate): their
parsers are lenient and return ``None`` for anything malformed, so a bad
``baggage`` does not fail a tunnel. Building headers from Python values is
strict: a value that cannot be put on the wire raises
:class:`~underpass.hbone.errors.LocalProtocolError` and nothing is built.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
from dataclasses import dataclass
from urllib.parse import quote, unquote

from underpass.hbone.errors import BadRequest, LocalProtocolError, show

__all__ = [
    "Baggage",
    "ConnectRequest",
    "Forwarded",
    "IPAddress",
    "RequestInfo",
    "SocketAddress",
    "TraceParent",
    "build_request_headers",
    "parse_authority",
    "parse_baggage",
    "parse_forwarded",
    "parse_traceparent",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Header = tuple[bytes, bytes]

_PORT = re.compile(r"[0-9]{1,5}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
_MAX_BAGGAGE_BYTES = 8192  # W3C Baggage: a platform must propagate at least this much
# Baggage values: what may stay unencoded (RFC 3986 unreserved); everything else
# is percent-encoded, which W3C Baggage allows for any octet.
_BAGGAGE_SAFE = "-._~"
_BAGGAGE_KINDS = re.compile(r"[a-z][a-z0-9]{0,62}")


def _normalise(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address it carries; others unchanged."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """An IP address and a TCP port, the form of ``:authority`` and ``for=``.

    IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``) are stored as the IPv4
    address, so the same endpoint always compares equal. Zone IDs (``%eth0``)
    are refused: they mean nothing to the peer.
    """

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise LocalProtocolError(f"{self.ip!r} is not an ipaddress.IPv4Address/IPv6Address")
        if isinstance(self.ip, ipaddress.IPv6Address) and self.ip.scope_id:
            raise LocalProtocolError(f"{self.ip} carries a zone ID, which HBONE cannot send")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise LocalProtocolError(f"port {self.port!r} is not an integer")
        if not 0 < self.port < 65536:
            raise LocalProtocolError(f"port {self.port} is outside 1..65535")
        object.__setattr__(self, "ip", _normalise(self.ip))

    @classmethod
    def of(cls, ip: str | IPAddress, port: int) -> SocketAddress:
        """From an address in any form ``ipaddress.ip_address`` takes, and a port."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError as exc:
            raise LocalProtocolError(f"{ip!r} is not an IP address: {exc}") from exc
        return cls(address, port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    def as_sockaddr(self) -> tuple[str, int]:
        """``(host, port)`` for ``socket.connect``."""
        return (str(self.ip), self.port)


def parse_authority(value: bytes | str) -> SocketAddress:
    """``ip:port`` or ``[ipv6]:port`` as sent in ``:authority``; anything else is a 400.

    Strict on purpose: no host names, no zone IDs, no IPv6 without brackets,
    no IPv4 in brackets, port 1-65535 in ASCII digits.
    """
    text = _ascii(value, ":authority")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise BadRequest(f":authority {show(text)} is not [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
        if ":" not in host:
            raise BadRequest(f":authority {show(text)} puts a non-IPv6 host in brackets")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise BadRequest(
                f":authority {show(text)} is not ip:port (IPv6 addresses need brackets)"
            )
    if "%" in host:
        raise BadRequest(f":authority {show(text)} carries a zone ID")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadRequest(f":authority {show(text)} does not name an IP address") from None
    if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise BadRequest(f":authority {show(text)} has no valid port (1-65535)")
    return SocketAddress(ip, int(port_text))


def _ascii(value: bytes | str, what: str) -> str:
    if isinstance(value, str):
        if not value.isascii():
            raise BadRequest(f"{what} {show(value)} is not ASCII")
        return value
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} {show(value)} is not ASCII") from None


# -- forwarded ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The first element of ``forwarded``: the client's address and the service host."""

    for_: SocketAddress | None = None
    host: str | None = None

    def header_value(self) -> bytes:
        parts = []
        if self.for_ is not None:
            parts.append(f'for="{self.for_}"')
        if self.host is not None:
            if not _HOSTNAME.fullmatch(self.host):
                raise LocalProtocolError(f"host {self.host!r} is not a DNS host name")
            parts.append(f"host={self.host}")
        if not parts:
            raise LocalProtocolError("a forwarded header needs for= or host=")
        return ";".join(parts).encode("ascii")


def parse_forwarded(value: bytes | str) -> Forwarded | None:
    """``for`` and ``host`` of the first forwarded element; ``None`` when malformed.

    ``for`` is kept only when it is an ``ip:port`` (obfuscated identifiers such
    as ``unknown`` or ``_hidden`` give ``for_=None``).
    """
    try:
        text = _ascii(value, "forwarded")
    except BadRequest:
        return None
    element = _split_quoted(text, ",")[0]
    found: dict[str, str] = {}
    for pair in _split_quoted(element, ";"):
        name, sep, raw = pair.strip().partition("=")
        name = name.strip().lower()
        if not sep or not name or name in found:
            return None
        parsed = _unquote_token(raw.strip())
        if parsed is None:
            return None
        found[name] = parsed
    for_: SocketAddress | None = None
    if "for" in found:
        try:
            for_ = parse_authority(found["for"])
        except BadRequest:
            for_ = None
    host = found.get("host")
    if host is not None and not _HOSTNAME.fullmatch(host):
        host = None
    if for_ is None and host is None:
        return None
    return Forwarded(for_, host)


def _split_quoted(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (backslash escapes inside quotes)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def _unquote_token(raw: str) -> str | None:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        out, escaped = [], False
        for ch in raw[1:-1]:
            if escaped:
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                return None
            else:
                out.append(ch)
        return None if escaped else "".join(out)
    if raw and all(ch in _TOKEN_CHARS for ch in raw):
        return raw
    return None


# -- baggage --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Baggage:
    """The Kubernetes facts about the caller that HBONE carries in ``baggage``.

    ``workload_kind`` is the lower-case kind of the owning workload
    (``deployment``, ``statefulset``, ``pod``, ...): the key is
    ``k8s.<kind>.name``. Empty fields are left out of the header.
    """

    cluster: str = ""
    namespace: str = ""
    workload_kind: str = ""
    workload_name: str = ""
    service_name: str = ""
    service_version: str = ""

    def header_value(self) -> bytes:
        if self.workload_name and not _BAGGAGE_KINDS.fullmatch(self.workload_kind):
            raise LocalProtocolError(
                f"workload kind {self.workload_kind!r} is not a lower-case Kubernetes kind"
            )
        members = [
            (key, value)
            for key, value in (
                ("k8s.cluster.name", self.cluster),
                ("k8s.namespace.name", self.namespace),
                (f"k8s.{self.workload_kind}.name", self.workload_name),
                ("service.name", self.service_name),
                ("service.version", self.service_version),
            )
            if value
        ]
        text = ",".join(f"{key}={quote(value, safe=_BAGGAGE_SAFE)}" for key, value in members)
        if len(text) > _MAX_BAGGAGE_BYTES:
            raise LocalProtocolError(f"baggage of {len(text)} bytes exceeds {_MAX_BAGGAGE_BYTES}")
        return text.encode("ascii")


def parse_baggage(value: bytes | str) -> Baggage | None:
    """The known keys of a ``baggage`` header; ``None`` when malformed or too long.

    Unknown keys and member properties (``;...``) are ignored.
    """
    if len(value) > _MAX_BAGGAGE_BYTES:
        return None
    try:
        text = _ascii(value, "baggage")
    except BadRequest:
        return None
    fields: dict[str, str] = {}
    kind = name = ""
    for member in text.split(","):
        pair = member.split(";", 1)[0]
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or any(ch not in _TOKEN_CHARS for ch in key):
            return None
        try:
            decoded = unquote(raw.strip(), errors="strict")
        except UnicodeDecodeError:
            return None
        parts = key.split(".")
        if key in _BAGGAGE_FIELDS:
            fields[_BAGGAGE_FIELDS[key]] = decoded
        elif (
            len(parts) == 3
            and parts[0] == "k8s"
            and parts[2] == "name"
            and _BAGGAGE_KINDS.fullmatch(parts[1])
        ):
            kind, name = parts[1], decoded
    return Baggage(workload_kind=kind, workload_name=name, **fields)


_BAGGAGE_FIELDS = {
    "k8s.cluster.name": "cluster",
    "k8s.namespace.name": "namespace",
    "service.name": "service_name",
    "service.version": "service_version",
}


# -- traceparent ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A W3C ``traceparent`` (version 00): trace ID, parent span ID, flags."""

    trace_id: str  # 32 lower-case hex digits, not all zero
    parent_id: str  # 16 lower-case hex digits, not all zero
    flags: int = 0

    def __post_init__(self) -> None:
        if not _hex(self.trace_id, 32) or not _hex(self.parent_id, 16):
            raise LocalProtocolError(
                "a traceparent needs a 32-hex-digit trace ID and a 16-hex-digit parent ID, "
                "lower case, not all zero"
            )
        if not 0 <= self.flags <= 0xFF:
            raise LocalProtocolError(f"trace flags {self.flags} do not fit one byte")

    @classmethod
    def new(cls, sampled: bool = False) -> TraceParent:
        """A fresh random trace and span."""
        while True:
            raw = os.urandom(24)
            trace, span = raw[:16].hex(), raw[16:].hex()
            if int(trace, 16) and int(span, 16):
                return cls(trace, span, 1 if sampled else 0)

    def header_value(self) -> bytes:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags:02x}".encode("ascii")


def _hex(text: str, digits: int) -> bool:
    return (
        isinstance(text, str)
        and len(text) == digits
        and all(ch in "0123456789abcdef" for ch in text)
        and text != "0" * digits
    )


def parse_traceparent(value: bytes | str) -> TraceParent | None:
    """A valid ``traceparent``; ``None`` otherwise (W3C: ignore an invalid one)."""
    try:
        text = _ascii(value, "traceparent").strip()
    except BadRequest:
        return None
    match = _TRACEPARENT.fullmatch(text)
    if match is None:
        return None
    version, trace, parent, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if not _hex(trace, 32) or not _hex(parent, 16):
        return None
    return TraceParent(trace, parent, int(flags, 16))


# -- the request, both sides ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What a client puts in one HBONE CONNECT.

    ``authority`` is the real target; ``client`` the original source address
    (``forwarded: for=``); ``host`` the service host name when the caller
    addressed a service; ``traceparent`` defaults to a fresh random one when
    the headers are built.
    """

    authority: SocketAddress
    client: SocketAddress | None = None
    host: str | None = None
    baggage: Baggage | None = None
    traceparent: TraceParent | None = None


def build_request_headers(request: ConnectRequest) -> list[Header]:
    """The CONNECT header block for ``request`` (pseudo-headers first)."""
    if not isinstance(request.authority, SocketAddress):
        raise LocalProtocolError(f"authority {request.authority!r} is not a SocketAddress")
    headers: list[Header] = [
        (b":method", b"CONNECT"),
        (b":authority", str(request.authority).encode("ascii")),
    ]
    if request.client is not None or request.host is not None:
        headers.append((b"forwarded", Forwarded(request.client, request.host).header_value()))
    if request.baggage is not None:
        baggage = request.baggage.header_value()
        if baggage:
            headers.append((b"baggage", baggage))
    trace = request.traceparent if request.traceparent is not None else TraceParent.new()
    headers.append((b"traceparent", trace.header_value()))
    return headers


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A validated CONNECT as the server hands it to its handler.

    ``authority`` passed every check; the informational headers are ``None``
    when absent or malformed. ``headers`` is the raw header block (h2 has
    lower-cased the names). ``stream_id`` identifies the tunnel on its
    connection.
    """

    stream_id: int
    authority: SocketAddress
    forwarded: Forwarded | None
    baggage: Baggage | None
    traceparent: TraceParent | None
    headers: tuple[Header, ...]

    @property
    def client(self) -> SocketAddress | None:
        """The original client address from ``forwarded: for=``, if given."""
        return self.forwarded.for_ if self.forwarded is not None else None
