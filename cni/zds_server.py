"""The node agent's ZDS server: hands enrolled pods' network namespaces to ztunnel.

This module owns the agent's side of PROTOCOLS.md section 5 on top of the
sans-IO :class:`underpass.zds.AgentProtocol`:

* :class:`ZdsHub` is the fan-out point between the agent's single writer and
  every connected ztunnel: :meth:`ZdsHub.subscribe` takes the set of enrolled
  pods and starts a change feed in one step (no await in between, so nothing
  is missed or seen twice); the writer calls :meth:`ZdsHub.publish` for each
  Add/Del and gets one :class:`trio.Event` per connection, set when that
  ztunnel acknowledged it.
* :func:`serve` listens on the SOCK_SEQPACKET socket; each connection waits
  for the hello, sends the snapshot (``Add`` with the pod netns fd in
  SCM_RIGHTS, or ``Keep`` when the netns cannot be opened any more), then
  ``SnapshotSent``, then follows the feed. An error ``Ack`` is retried with
  backoff; a connection that keeps failing, times out or breaks the protocol
  is closed (ztunnel reconnects and gets a fresh snapshot).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from underpass import zds

log = structlog.get_logger("cni.zds")


@dataclass(frozen=True, slots=True)
class ZdsPod:
    """An enrolled pod as ztunnel is told about it."""

    uid: str
    info: zds.WorkloadInfo
    netns: str


@dataclass(slots=True)
class Change:
    """One Add (``pod`` set) or Del (``uid`` only) for one connection."""

    uid: str
    pod: ZdsPod | None
    acked: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class Subscription:
    snapshot: list[ZdsPod]
    send: trio.MemorySendChannel[Change]
    receive: trio.MemoryReceiveChannel[Change]


class ZdsHub:
    """Connects the agent's writer to every ztunnel connection."""

    def __init__(self, current: Callable[[], Iterable[ZdsPod]]) -> None:
        self._current = current
        self._subs: set[Subscription] = set()

    @property
    def connections(self) -> int:
        return len(self._subs)

    def subscribe(self) -> Subscription:
        send, receive = trio.open_memory_channel[Change](math.inf)
        sub = Subscription(list(self._current()), send, receive)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        sub.send.close()

    def publish(self, uid: str, pod: ZdsPod | None) -> list[trio.Event]:
        """Queue an Add (``pod``) or a Del (``pod`` None) to every connection."""
        events = []
        for sub in self._subs:
            change = Change(uid, pod)
            sub.send.send_nowait(change)
            events.append(change.acked)
        return events

    def enrolled(self, uid: str) -> bool:
        return any(p.uid == uid for p in self._current())


@dataclass(frozen=True, slots=True)
class ZdsSettings:
    hello_timeout: float = 15.0
    ack_timeout: float = 10.0
    max_attempts: int = 6
    first_backoff: float = 0.05
    max_backoff: float = 2.0


class _Closed(Exception):
    """The connection is over (peer gone, protocol error, gave up)."""


class _Connection:
    def __init__(self, sock: trio.socket.SocketType, hub: ZdsHub, settings: ZdsSettings) -> None:
        self.sock = sock
        self.hub = hub
        self.settings = settings
        self.protocol = zds.AgentProtocol()
        self.hello = trio.Event()
        self.acks_send, self.acks = trio.open_memory_channel[zds.Acked](1)
        self.reason = "closed"

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, nursery.cancel_scope)
            try:
                await self._writer()
            except _Closed as exc:
                self.reason = str(exc)
            nursery.cancel_scope.cancel()

    async def _reader(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                datagram = await zds.recv_datagram(self.sock)
                if datagram is None:
                    self.reason = "ztunnel closed the connection"
                    break
                fds = len(datagram.fds)
                datagram.close_fds()
                event = self.protocol.receive(datagram.data, fds, datagram.truncated)
                if isinstance(event, zds.Hello):
                    self.hello.set()
                else:
                    self.acks_send.send_nowait(event)  # at most one in flight
        except (zds.ZdsError, OSError) as exc:
            self.reason = f"connection dropped: {exc}"
        scope.cancel()

    async def _writer(self) -> None:
        with trio.move_on_after(self.settings.hello_timeout) as scope:
            await self.hello.wait()
        if scope.cancelled_caught:
            raise _Closed("no hello from ztunnel in time")
        sub = self.hub.subscribe()
        try:
            log.info("zds snapshot", pods=len(sub.snapshot))
            for pod in sub.snapshot:
                await self._deliver(pod.uid, pod, snapshot=True)
            await self._deliver("", None, snapshot=True)
            log.info("zds snapshot sent", pods=len(sub.snapshot))
            async for change in sub.receive:
                await self._deliver(change.uid, change.pod, snapshot=False)
                change.acked.set()
        finally:
            self.hub.unsubscribe(sub)

    async def _deliver(self, uid: str, pod: ZdsPod | None, *, snapshot: bool) -> None:
        """Send one request until ztunnel acknowledges it without error."""
        settings = self.settings
        for attempt in range(1, settings.max_attempts + 1):
            fd: int | None = None
            request: zds.Request
            if pod is not None:
                try:
                    fd = os.open(pod.netns, os.O_RDONLY | os.O_CLOEXEC)
                    request = zds.Add(uid, pod.info)
                except OSError as exc:
                    if not snapshot:  # the pod is gone; its Del follows
                        log.info("zds add skipped: netns gone", uid=uid, error=str(exc))
                        return
                    request = zds.Keep(uid)  # ztunnel may still hold it
            elif snapshot:
                request = zds.SnapshotSent()
            else:
                request = zds.Del(uid)
            try:
                out = self.protocol.send(request)
                await zds.send_datagram(self.sock, out.data, fd if out.wants_fd else None)
            except (zds.ZdsError, OSError) as exc:
                raise _Closed(f"cannot send {type(request).__name__}: {exc}") from None
            finally:
                if fd is not None:
                    os.close(fd)
            with trio.move_on_after(settings.ack_timeout):
                acked = await self.acks.receive()
                if acked.ack.ok:
                    log.debug("zds acked", request=type(request).__name__, uid=uid)
                    return
                log.warning(
                    "zds error ack; retrying",
                    request=type(request).__name__,
                    uid=uid,
                    error=acked.ack.error,
                    attempt=attempt,
                )
                await trio.sleep(
                    min(settings.max_backoff, settings.first_backoff * 2 ** (attempt - 1))
                )
                if pod is not None and not snapshot and not self.hub.enrolled(uid):
                    return  # un-enrolled meanwhile: a Del is queued
                continue
            raise _Closed(
                f"no ack for {type(request).__name__} {uid} within {settings.ack_timeout:g} s"
            )
        raise _Closed(f"ztunnel refused {uid or 'SnapshotSent'} {settings.max_attempts} times")


async def handle_connection(
    sock: trio.socket.SocketType, hub: ZdsHub, settings: ZdsSettings = ZdsSettings()
) -> None:
    """Serve one ztunnel connection until it ends; never raises for the peer's faults."""
    conn = _Connection(sock, hub, settings)
    with sock:
        log.info("ztunnel connected")
        try:
            await conn.run()
        except Exception:  # a bug here must not take the agent (and other connections) down
            log.exception("zds connection crashed")
            conn.reason = "internal error"
    log.info("ztunnel disconnected", reason=conn.reason)


async def bind_seqpacket(path: str) -> trio.socket.SocketType:
    """A listening SOCK_SEQPACKET unix socket at ``path`` (a stale file is replaced)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    path: str,
    hub: ZdsHub,
    settings: ZdsSettings = ZdsSettings(),
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``path`` and serve every ztunnel that connects."""
    listener = await bind_seqpacket(path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            log.info("zds listening", socket=path)
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(handle_connection, conn, hub, settings)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
