"""ZDS: the node agent -> ztunnel pod handoff (PROTOCOLS.md section 5).

This module owns the protocol core shared by the CNI node agent (the server,
which hands pod network namespaces over) and ztunnel (the client, which
serves them):

* the message model (:class:`Hello`, :class:`Add`, :class:`Keep`, :class:`Del`,
  :class:`SnapshotSent`, :class:`Ack`) and its protobuf codec, one message per
  datagram, at most :data:`MAX_DATAGRAM` bytes;
* two sans-IO state machines, :class:`AgentProtocol` and :class:`ZtunnelProtocol`:
  they take the bytes (and the number of passed fds) of each received
  datagram and return events; they turn requests into bytes to send. They do
  no I/O and never own a file descriptor;
* thin trio adapters for SOCK_SEQPACKET with SCM_RIGHTS fd passing:
  :func:`send_datagram`, :func:`recv_datagram` and :class:`ZdsClient` (what
  ztunnel uses to connect, say hello and receive pods).

The flow: ztunnel connects and sends ``ZdsHello{V1}``; the agent sends its whole
set of pods as ``Add`` (exactly one netns fd each) or ``Keep`` (no fd), then
``SnapshotSent``; after that only ``Add`` and ``Del``. Every request is answered
by one ``Ack`` before the next is sent; an ``Ack`` with a non-empty ``error`` is a
failure the agent retries. Anything else (garbage, an unexpected message, an fd
on anything but ``Add``, a truncated or oversized datagram) is a protocol error
and the connection is dead: both machines fail closed, every later call raises.

Errors: :class:`RemoteProtocolError` (the peer broke the protocol) and
:class:`LocalProtocolError` (our caller tried something the protocol forbids),
both :class:`ZdsError`.
"""

from __future__ import annotations

import array
import contextlib
import enum
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from google.protobuf.message import DecodeError

from underpass.proto import zds_pb2

if TYPE_CHECKING:
    import trio

#: Default path of the agent's ZDS socket.
DEFAULT_SOCKET = "/var/run/ztunnel/ztunnel.sock"
#: Largest datagram either side may send or accept.
MAX_DATAGRAM = 1024
#: Most fds we make room for when receiving; more than one is already an error,
#: the spare room lets us see (and close) extra fds instead of losing them.
_MAX_FDS = 8
VERSION_V1 = zds_pb2.V1


class ZdsError(Exception):
    """Base class of every ZDS protocol error."""


class RemoteProtocolError(ZdsError):
    """The peer broke the protocol; the connection must be closed."""


class LocalProtocolError(ZdsError):
    """Our own caller asked for something the protocol forbids (a bug here)."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """What ztunnel needs to know about a pod to serve it."""

    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Hello:
    """ztunnel's first message: the protocol version it speaks."""

    version: int = VERSION_V1


@dataclass(frozen=True, slots=True)
class Add:
    """Serve this pod; the datagram carries exactly one netns fd."""

    uid: str
    info: WorkloadInfo | None = None


@dataclass(frozen=True, slots=True)
class Keep:
    """Snapshot only: keep serving a pod ztunnel already has (no fd)."""

    uid: str


@dataclass(frozen=True, slots=True)
class Del:
    """Stop serving this pod."""

    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    """The snapshot is complete."""


Request = Add | Keep | Del | SnapshotSent


@dataclass(frozen=True, slots=True)
class Ack:
    """ztunnel's answer to one request; ``error`` empty means success."""

    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


# ------------------------------------------------------------------------------ codec


def _check_size(data: bytes, what: str) -> bytes:
    if len(data) > MAX_DATAGRAM:
        raise LocalProtocolError(f"{what} encodes to {len(data)} bytes, over {MAX_DATAGRAM}")
    return data


def encode_hello(hello: Hello) -> bytes:
    msg = zds_pb2.ZdsHello()
    msg.version = cast("zds_pb2.Version", hello.version)
    return _check_size(msg.SerializeToString(), "hello")


def encode_request(request: Request) -> bytes:
    msg = zds_pb2.WorkloadRequest()
    if isinstance(request, Add):
        if not request.uid:
            raise LocalProtocolError("Add needs a pod uid")
        msg.add.uid = request.uid
        if request.info is not None:
            msg.add.workload_info.name = request.info.name
            msg.add.workload_info.namespace = request.info.namespace
            msg.add.workload_info.service_account = request.info.service_account
    elif isinstance(request, Keep):
        if not request.uid:
            raise LocalProtocolError("Keep needs a pod uid")
        msg.keep.uid = request.uid
    elif isinstance(request, Del):
        if not request.uid:
            raise LocalProtocolError("Del needs a pod uid")
        getattr(msg, "del").uid = request.uid
    elif isinstance(request, SnapshotSent):
        msg.snapshot_sent.SetInParent()
    else:  # pragma: no cover - the type system rules this out
        raise LocalProtocolError(f"not a ZDS request: {request!r}")
    return _check_size(msg.SerializeToString(), type(request).__name__)


def encode_ack(ack: Ack) -> bytes:
    msg = zds_pb2.WorkloadResponse()
    msg.ack.error = ack.error
    return _check_size(msg.SerializeToString(), "Ack")


def _parse(
    msg: zds_pb2.ZdsHello | zds_pb2.WorkloadRequest | zds_pb2.WorkloadResponse, data: bytes
) -> None:
    if len(data) > MAX_DATAGRAM:
        raise RemoteProtocolError(f"datagram of {len(data)} bytes is over {MAX_DATAGRAM}")
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise RemoteProtocolError(f"undecodable {type(msg).__name__}: {exc}") from None


def decode_hello(data: bytes) -> Hello:
    msg = zds_pb2.ZdsHello()
    _parse(msg, data)
    if msg.version != VERSION_V1:
        raise RemoteProtocolError(f"unsupported ZDS version {msg.version} (want V1)")
    return Hello(version=msg.version)


def decode_request(data: bytes) -> Request:
    msg = zds_pb2.WorkloadRequest()
    _parse(msg, data)
    kind = msg.WhichOneof("payload")
    if kind == "add":
        if not msg.add.uid:
            raise RemoteProtocolError("Add without a pod uid")
        info = None
        if msg.add.HasField("workload_info"):
            wi = msg.add.workload_info
            info = WorkloadInfo(wi.name, wi.namespace, wi.service_account)
        return Add(msg.add.uid, info)
    if kind == "keep":
        if not msg.keep.uid:
            raise RemoteProtocolError("Keep without a pod uid")
        return Keep(msg.keep.uid)
    if kind == "del":
        uid = getattr(msg, "del").uid
        if not uid:
            raise RemoteProtocolError("Del without a pod uid")
        return Del(uid)
    if kind == "snapshot_sent":
        return SnapshotSent()
    raise RemoteProtocolError("WorkloadRequest without a known payload")


def decode_ack(data: bytes) -> Ack:
    msg = zds_pb2.WorkloadResponse()
    _parse(msg, data)
    if msg.WhichOneof("payload") != "ack":
        raise RemoteProtocolError("WorkloadResponse without an Ack")
    return Ack(msg.ack.error)


# ---------------------------------------------------------------------- state machines


class Phase(enum.Enum):
    """Where a connection is, the same names on both sides."""

    HELLO = "hello"  # agent: waiting for ztunnel's hello; ztunnel: not said it yet
    SNAPSHOT = "snapshot"  # Add / Keep until SnapshotSent is acknowledged
    LIVE = "live"  # Add / Del
    BROKEN = "broken"  # a protocol error happened; nothing more is allowed


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One datagram to send; ``wants_fd``: attach the pod's netns fd (Add only)."""

    data: bytes
    wants_fd: bool = False


@dataclass(frozen=True, slots=True)
class Acked:
    """Agent side: ztunnel answered ``request``; ``ack.ok`` tells whether it worked."""

    request: Request
    ack: Ack


class _Machine:
    phase: Phase

    def _fail(self, message: str) -> RemoteProtocolError:
        self.phase = Phase.BROKEN
        return RemoteProtocolError(message)

    def _alive(self) -> None:
        if self.phase is Phase.BROKEN:
            raise LocalProtocolError("the ZDS connection is broken; close it")


class AgentProtocol(_Machine):
    """The node agent's side of one ztunnel connection (sans-IO).

    Call :meth:`receive` with each datagram read (its bytes, how many fds came
    with it, whether it was truncated); call :meth:`send` for each request and
    put the returned :class:`Outgoing` on the wire (with the pod's netns fd
    when ``wants_fd``). One request is in flight at a time. After an error
    :class:`Ack`, :meth:`retry` gives the same datagram again.
    """

    def __init__(self) -> None:
        self.phase = Phase.HELLO
        self.in_flight: Request | None = None
        self.failed: Request | None = None

    def receive(self, data: bytes, nfds: int = 0, truncated: bool = False) -> Hello | Acked:
        self._alive()
        if truncated:
            raise self._fail("truncated datagram from ztunnel")
        if nfds:
            raise self._fail(f"ztunnel sent {nfds} fd(s); it never sends any")
        try:
            if self.phase is Phase.HELLO:
                hello = decode_hello(data)
                self.phase = Phase.SNAPSHOT
                return hello
            if self.in_flight is None:
                raise RemoteProtocolError("unexpected message from ztunnel: nothing to acknowledge")
            ack = decode_ack(data)
        except RemoteProtocolError as exc:
            raise self._fail(str(exc)) from None
        request, self.in_flight = self.in_flight, None
        if ack.ok:
            self.failed = None
            if isinstance(request, SnapshotSent):
                self.phase = Phase.LIVE
        else:
            self.failed = request
        return Acked(request, ack)

    def send(self, request: Request) -> Outgoing:
        self._alive()
        if self.phase is Phase.HELLO:
            raise LocalProtocolError("ztunnel has not said hello yet")
        if self.in_flight is not None:
            raise LocalProtocolError(f"{self.in_flight!r} is not acknowledged yet")
        if self.phase is Phase.LIVE and isinstance(request, Keep | SnapshotSent):
            raise LocalProtocolError(f"{type(request).__name__} is only allowed in the snapshot")
        if self.phase is Phase.SNAPSHOT and isinstance(request, Del):
            raise LocalProtocolError("Del is not allowed in the snapshot (leave the pod out)")
        out = Outgoing(encode_request(request), wants_fd=isinstance(request, Add))
        self.in_flight = request
        self.failed = None
        return out

    def retry(self) -> Outgoing:
        """Send again the request ztunnel answered with an error."""
        if self.failed is None:
            raise LocalProtocolError("no failed request to retry")
        return self.send(self.failed)


@dataclass(frozen=True, slots=True)
class Received:
    """ztunnel side: a request from the agent; ``fd`` is the pod netns (Add only)."""

    request: Request
    fd: int | None = None


class ZtunnelProtocol(_Machine):
    """ztunnel's side of the connection (sans-IO).

    :meth:`hello` first; then :meth:`receive` each datagram with the fds that
    came with it, act on the :class:`Received` request, and answer with
    :meth:`ack`. The machine never closes fds: on :class:`RemoteProtocolError`
    the caller closes every fd of that datagram (and the connection).
    """

    def __init__(self) -> None:
        self.phase = Phase.HELLO
        self.unanswered: Request | None = None

    def hello(self) -> bytes:
        self._alive()
        if self.phase is not Phase.HELLO:
            raise LocalProtocolError("hello was already sent")
        self.phase = Phase.SNAPSHOT
        return encode_hello(Hello())

    def receive(self, data: bytes, fds: Sequence[int] = (), truncated: bool = False) -> Received:
        self._alive()
        if self.phase is Phase.HELLO:
            raise LocalProtocolError("say hello before receiving")
        if truncated:
            raise self._fail("truncated datagram from the agent")
        if self.unanswered is not None:
            raise self._fail(f"agent sent another request before {self.unanswered!r} was acked")
        try:
            request = decode_request(data)
        except RemoteProtocolError as exc:
            raise self._fail(str(exc)) from None
        if isinstance(request, Add):
            if len(fds) != 1:
                raise self._fail(f"Add must carry exactly one netns fd, got {len(fds)}")
        elif fds:
            raise self._fail(f"{type(request).__name__} carried {len(fds)} fd(s); only Add may")
        if self.phase is Phase.SNAPSHOT and isinstance(request, Del):
            raise self._fail("Del before the snapshot was sent")
        if self.phase is Phase.LIVE and isinstance(request, Keep | SnapshotSent):
            raise self._fail(f"{type(request).__name__} after the snapshot")
        self.unanswered = request
        return Received(request, fds[0] if isinstance(request, Add) else None)

    def ack(self, error: str = "") -> bytes:
        """Answer the request received last; a non-empty ``error`` asks for a retry."""
        self._alive()
        if self.unanswered is None:
            raise LocalProtocolError("nothing to acknowledge")
        data = encode_ack(Ack(error))
        if not error and isinstance(self.unanswered, SnapshotSent):
            self.phase = Phase.LIVE
        self.unanswered = None
        return data


# ------------------------------------------------------------ SOCK_SEQPACKET + SCM_RIGHTS


@dataclass(slots=True)
class Datagram:
    """One received datagram; the receiver owns (and must close) ``fds``."""

    data: bytes
    fds: list[int]
    truncated: bool

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def fds_from_ancdata(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """Every fd passed with SCM_RIGHTS in a ``recvmsg`` result."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(payload) - (len(payload) % arr.itemsize)
            arr.frombytes(payload[:usable])
            fds.extend(arr)
    return fds


def scm_rights(fd: int | None) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes ``fd`` (none when ``fd`` is None)."""
    if fd is None:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]


async def send_datagram(sock: trio.socket.SocketType, data: bytes, fd: int | None = None) -> None:
    """Send one datagram, with ``fd`` in SCM_RIGHTS when given."""
    if len(data) > MAX_DATAGRAM:
        raise LocalProtocolError(f"datagram of {len(data)} bytes is over {MAX_DATAGRAM}")
    await sock.sendmsg([data], scm_rights(fd))


async def recv_datagram(sock: trio.socket.SocketType) -> Datagram | None:
    """Receive one datagram; None when the peer closed the connection."""
    data, ancdata, flags, _ = await sock.recvmsg(
        MAX_DATAGRAM, socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
    )
    fds = fds_from_ancdata(ancdata)
    truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
    if not data and not fds and not truncated:
        return None
    return Datagram(data, fds, truncated)


class ZdsClient:
    """ztunnel's trio end of a ZDS connection.

    ``client = await ZdsClient.connect(path)`` sends the hello; then loop on
    ``received = await client.receive()`` (None at end of stream), act, and
    ``await client.ack()`` / ``await client.ack("why")``. The fd of an ``Add``
    belongs to the caller from then on. On a protocol error the connection is
    closed, the fds of the offending datagram are closed and the error raised.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.protocol = ZtunnelProtocol()

    @classmethod
    async def adopt(cls, sock: trio.socket.SocketType) -> ZdsClient:
        """Say hello on an already connected socket (a supervisor's socketpair end)."""
        client = cls(sock)
        try:
            await send_datagram(sock, client.protocol.hello())
        except BaseException:
            sock.close()
            raise
        return client

    @classmethod
    async def connect(cls, path: str, *, retry_for: float = 0.0) -> ZdsClient:
        """Connect and say hello; while the agent is not there yet (no socket, refused),
        retry with backoff for up to ``retry_for`` seconds (ztunnel uses 15)."""
        import trio

        deadline = trio.current_time() + retry_for
        delay = 0.05
        while True:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                await sock.connect(path)
                client = cls(sock)
                await send_datagram(sock, client.protocol.hello())
                return client
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if trio.current_time() + delay > deadline:
                    raise
            except BaseException:
                sock.close()
                raise
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def receive(self) -> Received | None:
        datagram = await recv_datagram(self.sock)
        if datagram is None:
            return None
        try:
            return self.protocol.receive(datagram.data, datagram.fds, datagram.truncated)
        except ZdsError:
            datagram.close_fds()
            self.close()
            raise

    async def ack(self, error: str = "") -> None:
        await send_datagram(self.sock, self.protocol.ack(error))

    def close(self) -> None:
        self.sock.close()
