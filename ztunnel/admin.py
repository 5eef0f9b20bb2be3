"""ztunnel's node-side HTTP endpoints: admin (15000), metrics (15020), readiness (15021).

Owns three small HTTP/1.1 servers on trio, each started in a nursery with
``host, port = await nursery.start(serve_admin, ("127.0.0.1", 15000), provider)``
(likewise :func:`serve_metrics` and :func:`serve_readiness`); ``task_status``
reports the bound address, so tests bind port 0. What they serve comes from the process
through :class:`AdminProvider` / :class:`ReadinessProvider` and a
:class:`MetricsSource` (:class:`ztunnel.metrics.ZtunnelMetrics` is one).

- admin, loopback only (it can stop the process and change its log level):
  ``GET /config_dump``, ``GET /connections``, ``GET /logging``,
  ``POST /logging?level=debug|info|warning|error|critical``,
  ``POST /quitquitquit``, ``GET /`` (the list of endpoints).
- metrics: ``GET /metrics`` and ``GET /stats/prometheus``.
- readiness: ``GET /healthz/ready``: 200 ``ready`` when nothing is unmet,
  else 503 with one unmet condition per line.

HTTP is parsed by h11 (sans-IO: bytes in, events out); :class:`_HttpConnection`
is the thin trio adapter, one task per connection. Robustness: the request
head is limited (431 past it), the body too (413), each request must arrive
within a read timeout (408, or a quiet close if the client sent nothing),
connections are kept alive between requests, malformed bytes get a 400 and a
close, and a failing handler answers 500: no client can take a server down.
Unknown paths are 404, known paths with another method 405 (with ``Allow``).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, urlsplit

import h11
import structlog
import trio

from underpass import log as logsetup

log = structlog.get_logger("ztunnel.admin")

DEFAULT_ADMIN_ADDRESS: Final = ("127.0.0.1", 15000)
# Scraped from outside the node / probed by the kubelet: all interfaces.
DEFAULT_METRICS_ADDRESS: Final = ("0.0.0.0", 15020)  # noqa: S104
DEFAULT_READINESS_ADDRESS: Final = ("0.0.0.0", 15021)  # noqa: S104

JSON_TYPE: Final = "application/json"
TEXT_TYPE: Final = "text/plain; charset=utf-8"
_RECEIVE_SIZE: Final = 16384
_DRAIN_LIMIT: Final = 65536


# -- what the process provides -------------------------------------------------------


class ReadinessProvider(Protocol):
    def unmet_readiness(self) -> list[str]:
        """Conditions still unmet (``"no xDS state yet"``...); empty when ready."""
        ...


class AdminProvider(ReadinessProvider, Protocol):
    """What the admin endpoints read from, and how they stop the process.

    Every method is called on the trio thread that runs the server and must
    not block.
    """

    def config_dump(self) -> dict[str, Any]:
        """The JSON of ``/config_dump`` (see :func:`ztunnel.dump.config_dump`)."""
        ...

    def connections(self) -> list[dict[str, Any]]:
        """The JSON list of ``/connections`` (one dict per tracked connection)."""
        ...

    def shutdown(self) -> None:
        """Begin a graceful shutdown; called after the ``/quitquitquit`` answer is sent."""
        ...


class MetricsSource(Protocol):
    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        ...


# -- requests, responses, routes ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-connection limits of every server here."""

    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    read_timeout: float = 10.0  # seconds for a whole request (and for idle keep-alive)
    write_timeout: float = 10.0  # seconds for the client to take a whole response
    max_connections: int = 64  # concurrent connections per server; more are closed at once
    drain_timeout: float = 1.0  # after an error: how long to read what the client still sends


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False
    # Runs once the response has been sent (or failed to send): /quitquitquit.
    after_send: Callable[[], None] | None = None


def text(status: int, message: str, **kwargs: Any) -> Response:
    return Response(status, (message.rstrip("\n") + "\n").encode(), TEXT_TYPE, **kwargs)


def json_response(status: int, value: Any) -> Response:
    return Response(status, (json.dumps(value, indent=2) + "\n").encode(), JSON_TYPE)


Handler = Callable[[Request], Response]
#: path -> method -> handler
Routes = Mapping[str, Mapping[str, Handler]]


def route(routes: Routes, request: Request) -> Response:
    """Dispatch ``request``: 404 for an unknown path, 405 (with ``Allow``) for a wrong method."""
    methods = routes.get(request.path)
    if methods is None:
        return text(404, f"no such endpoint: {request.path} (GET / lists them)")
    handler = methods.get(request.method)
    if handler is None:
        allowed = ", ".join(sorted(methods))
        return text(
            405,
            f"{request.method} is not allowed on {request.path}; use {allowed}",
            headers=[("Allow", allowed)],
        )
    return handler(request)


# -- the connection adapter (trio <-> h11) --------------------------------------------


class _RequestError(Exception):
    """A request we answer with an error status, then close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _HttpConnection:
    def __init__(
        self, stream: trio.abc.Stream, routes: Routes, limits: HttpLimits, server: str
    ) -> None:
        self.stream = stream
        self.routes = routes
        self.limits = limits
        self.server = server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head_bytes)

    async def serve(self) -> None:
        """Answer requests until the client closes, times out, or must be closed."""
        while True:
            request: Request | None = None
            error: _RequestError | None = None
            with trio.move_on_after(self.limits.read_timeout) as timer:
                try:
                    request = await self._read_request()
                except _RequestError as exc:
                    error = exc
            if timer.cancelled_caught:
                if self._idle():
                    return  # an idle keep-alive connection: close quietly
                error = _RequestError(408, "the request did not arrive in time")
            if error is not None:
                await self._fail(error)
                return
            if request is None:
                return  # the client closed between requests
            response = self._respond(request)
            try:
                # A client that stops reading must not hold a connection slot forever.
                with trio.move_on_after(self.limits.write_timeout) as writing:
                    await self._send(response)
            finally:
                if response.after_send is not None:
                    _run_after_send(response.after_send, self.server)
            if writing.cancelled_caught:
                log.info("client too slow to take the response", server=self.server)
                return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    def _idle(self) -> bool:
        received, _closed = self.conn.trailing_data
        return self.conn.their_state is h11.IDLE and not received

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 431:
                    raise _RequestError(
                        431, f"the request head is larger than {self.limits.max_head_bytes} bytes"
                    ) from None
                raise _RequestError(status, f"malformed HTTP request: {exc}") from None
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            self.conn.receive_data(bytes(data))

    async def _read_request(self) -> Request | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise _RequestError(400, "expected an HTTP request")
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers
        )
        # h11 bounds only a head still incomplete; one that arrived whole in a
        # single read is measured here (the request line, and each header line).
        head_size = len(event.method) + len(event.target) + 12
        head_size += sum(len(name) + len(value) + 4 for name, value in headers)
        if head_size > self.limits.max_head_bytes:
            raise _RequestError(
                431, f"the request head is larger than {self.limits.max_head_bytes} bytes"
            )
        length = _content_length(headers)
        if length is not None and length > self.limits.max_body_bytes:
            raise _RequestError(
                413, f"the request body is larger than {self.limits.max_body_bytes} bytes"
            )
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self.limits.max_body_bytes:
                    raise _RequestError(
                        413, f"the request body is larger than {self.limits.max_body_bytes} bytes"
                    )
            elif isinstance(part, h11.EndOfMessage):
                break
            else:  # ConnectionClosed in the middle of a body
                raise _RequestError(400, "the connection closed in the middle of the request")
        target = event.target.decode("latin-1")
        split = urlsplit(target)
        return Request(
            method=event.method.decode("latin-1").upper(),
            path=split.path or "/",
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=bytes(body),
        )

    def _respond(self, request: Request) -> Response:
        try:
            response = route(self.routes, request)
        except Exception:
            log.exception(
                "admin handler failed", server=self.server, method=request.method, path=request.path
            )
            return text(500, f"internal error while serving {request.path}; see ztunnel's log")
        log.debug(
            "http request",
            server=self.server,
            method=request.method,
            path=request.path,
            status=response.status,
        )
        return response

    async def _send(self, response: Response) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        if response.close:
            headers.append(("Connection", "close"))
        data = self.conn.send(
            h11.Response(status_code=response.status, headers=headers, reason=_reason(response))
        )
        data = (data or b"") + (self.conn.send(h11.Data(data=response.body)) or b"")
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def _fail(self, error: _RequestError) -> None:
        """Answer ``error`` if the protocol still allows an answer, then close gracefully."""
        log.info("bad http request", server=self.server, status=error.status, error=error.message)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            response = text(error.status, error.message, close=True)
            try:
                try:
                    await self._send(response)
                except h11.LocalProtocolError:
                    # No request head was parsed (garbage, a timeout half-way):
                    # h11 will not frame an answer, so frame this one ourselves.
                    await self.stream.send_all(_raw_response(response))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        await self._drain()

    async def _drain(self) -> None:
        # Closing a socket with unread input makes the kernel send a reset that
        # can destroy the answer before the client reads it: stop sending, and
        # read (briefly, boundedly) what the client still had in flight.
        send_eof = getattr(self.stream, "send_eof", None)
        try:
            if send_eof is not None:
                await send_eof()
            drained = 0
            with trio.move_on_after(self.limits.drain_timeout):
                while drained < _DRAIN_LIMIT:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        break
                    drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _content_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value)  # h11 has already checked that it is a number
    return None


def _reason(response: Response) -> str:
    try:
        return HTTPStatus(response.status).phrase
    except ValueError:
        return ""


def _raw_response(response: Response) -> bytes:
    head = (
        f"HTTP/1.1 {response.status} {_reason(response)}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + response.body


def _run_after_send(callback: Callable[[], None], server: str) -> None:
    try:
        callback()
    except Exception:
        log.exception("admin post-response action failed", server=server)


# -- serving ------------------------------------------------------------------------


async def serve_http(
    routes: Routes,
    address: tuple[str, int],
    *,
    name: str,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``address`` until cancelled; reports the bound ``(host, port)``.

    The host is a literal IP address (one listener, so port 0 means one port).
    """
    host, port = address
    limits = limits or HttpLimits()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"the {name} server needs a literal IP address to bind, not {host!r}"
        ) from None
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot listen on {host}:{port} for the {name} endpoint: {exc.strerror}; "
            "is another ztunnel (or another program) using the port?",
        ) from exc
    bound: tuple[str, int] = listeners[0].socket.getsockname()[:2]
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        if active >= limits.max_connections:
            log.warning("too many connections; closing a new one", server=name)
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            await _HttpConnection(stream, routes, limits, name).serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("http connection failed", server=name)
        finally:
            active -= 1
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        log.info("http endpoint listening", server=name, address=f"{bound[0]}:{bound[1]}")
        task_status.started(bound)


# -- the three servers -----------------------------------------------------------------

_ADMIN_ENDPOINTS: Final = (
    ("GET", "/config_dump", "workloads, services, policies and certificates (JSON)"),
    ("GET", "/connections", "connections open now (JSON)"),
    ("GET", "/logging", "the current log level"),
    ("POST", "/logging?level=LEVEL", f"change the log level ({'|'.join(logsetup.LEVELS)})"),
    ("POST", "/quitquitquit", "shut ztunnel down gracefully"),
)


def admin_routes(provider: AdminProvider) -> dict[str, dict[str, Handler]]:
    """The admin endpoints (exposed for tests and for embedding in another server)."""

    def index(_: Request) -> Response:
        lines = ["ztunnel admin endpoints:"]
        lines += [f"  {method:<5} {path:<22} {what}" for method, path, what in _ADMIN_ENDPOINTS]
        return text(200, "\n".join(lines))

    def get_config_dump(_: Request) -> Response:
        return json_response(200, provider.config_dump())

    def get_connections(_: Request) -> Response:
        return json_response(200, provider.connections())

    def get_logging(request: Request) -> Response:
        if "level" in request.query:
            return text(400, "GET only reads the level; change it with POST /logging?level=LEVEL")
        return json_response(200, {"level": logsetup.current_level()})

    def post_logging(request: Request) -> Response:
        values = request.query.get("level", [])
        if len(values) != 1 or not values[0]:
            return text(400, f"give one level: POST /logging?level={'|'.join(logsetup.LEVELS)}")
        wanted = values[0].lower()
        if wanted not in logsetup.LEVELS:
            return text(
                400, f"unknown log level {values[0]!r}; use one of {', '.join(logsetup.LEVELS)}"
            )
        previous = logsetup.current_level()
        logsetup.set_level(wanted)
        log.warning("log level changed", previous=previous, level=wanted)
        return json_response(200, {"level": logsetup.current_level(), "previous": previous})

    def quit_quit_quit(_: Request) -> Response:
        log.warning("shutdown requested through the admin endpoint")
        return Response(200, b"OK\n", TEXT_TYPE, close=True, after_send=provider.shutdown)

    return {
        "/": {"GET": index},
        "/config_dump": {"GET": get_config_dump},
        "/connections": {"GET": get_connections},
        "/logging": {"GET": get_logging, "POST": post_logging},
        "/quitquitquit": {"POST": quit_quit_quit},
    }


def metrics_routes(metrics: MetricsSource) -> dict[str, dict[str, Handler]]:
    def scrape(_: Request) -> Response:
        body, content_type = metrics.render()
        return Response(200, body, content_type)

    return {"/metrics": {"GET": scrape}, "/stats/prometheus": {"GET": scrape}}


def readiness_routes(provider: ReadinessProvider) -> dict[str, dict[str, Handler]]:
    def ready(_: Request) -> Response:
        unmet = provider.unmet_readiness()
        if unmet:
            return text(503, "\n".join(unmet))
        return text(200, "ready")

    return {"/healthz/ready": {"GET": ready}}


async def serve_admin(
    address: tuple[str, int],
    provider: AdminProvider,
    *,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The admin server (default :data:`DEFAULT_ADMIN_ADDRESS`); loopback addresses only.

    It can stop the process and change its log level, so any other address is
    refused with ValueError rather than served.
    """
    host = address[0]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the admin endpoint only listens on a loopback address (127.0.0.1 or ::1), "
            f"not {host!r}: it can stop ztunnel and change its log level"
        )
    await serve_http(
        admin_routes(provider), address, name="admin", limits=limits, task_status=task_status
    )


async def serve_metrics(
    address: tuple[str, int],
    metrics: MetricsSource,
    *,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Prometheus ``/metrics`` and ``/stats/prometheus`` (default: ``DEFAULT_METRICS_ADDRESS``)."""
    await serve_http(
        metrics_routes(metrics), address, name="metrics", limits=limits, task_status=task_status
    )


async def serve_readiness(
    address: tuple[str, int],
    provider: ReadinessProvider,
    *,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``/healthz/ready`` for the kubelet (default :data:`DEFAULT_READINESS_ADDRESS`)."""
    await serve_http(
        readiness_routes(provider),
        address,
        name="readiness",
        limits=limits,
        task_status=task_status,
    )


__all__ = [
    "DEFAULT_ADMIN_ADDRESS",
    "DEFAULT_METRICS_ADDRESS",
    "DEFAULT_READINESS_ADDRESS",
    "AdminProvider",
    "HttpLimits",
    "MetricsSource",
    "ReadinessProvider",
    "Request",
    "Response",
    "Routes",
    "admin_routes",
    "metrics_routes",
    "readiness_routes",
    "route",
    "serve_admin",
    "serve_http",
    "serve_metrics",
    "serve_readiness",
]
