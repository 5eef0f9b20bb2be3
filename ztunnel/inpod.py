"""Sockets inside a pod's network namespace: ztunnel's listeners and its connections there.

In shared (in-pod) mode ztunnel runs on the node but serves each pod from
inside the pod's own netns (PROTOCOLS.md sections 1 and 6): its listeners on
15001 (outbound capture), 15006 (inbound plaintext) and 15008 (inbound HBONE)
live there, and so do the sockets it opens on the pod's behalf (HBONE to a
peer, passthrough, the upstream connection to the application). A socket
belongs to the netns it was created in for its whole life, so only creation
needs the netns; reading and writing happen on trio's thread as usual.

This module owns that creation, for one pod (:class:`PodNetns`, which owns
the netns fd the node agent handed over):

- listeners are created on a fresh worker thread that enters the netns
  (:func:`underpass.netns.run_in_netns`): rare, and a thread that fails half
  way leaves trio's thread untouched;
- per-connection sockets are created on trio's own thread, which enters the
  netns for the one ``socket()`` call and leaves at once (12 us measured,
  against 150 us for a thread hop per connection). Nothing else can run on
  that thread in between (no await), and a failure to return to the node's
  netns is fatal: the process aborts rather than serve from the wrong place.

Every socket ztunnel makes in a pod carries ``SO_MARK`` 0x539 so that the
pod's redirection rules never capture it again; listeners set
``SO_REUSEPORT`` so that a restarted ztunnel can take them over while the old
one drains; the upstream socket to the application sets ``IP_TRANSPARENT``
and binds to the client's address, so the application sees the real peer.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Final

import structlog

from underpass import netns
from underpass.hbone.headers import IPAddress, SocketAddress
from ztunnel.errors import ZtunnelError

log = structlog.get_logger("ztunnel.inpod")

#: ztunnel's mark on its own sockets in a pod (PROTOCOLS.md section 6).
ZTUNNEL_MARK: Final = 0x539
OUTBOUND_PORT: Final = 15001
INBOUND_PLAINTEXT_PORT: Final = 15006
INBOUND_HBONE_PORT: Final = 15008
#: Never valid upstream targets: a connection to them would loop through ztunnel.
LOOP_GUARD_PORTS: Final = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT})

_SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h
_IP6T_SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv6/ip6_tables.h
_IP_TRANSPARENT: Final = getattr(socket, "IP_TRANSPARENT", 19)
_LISTEN_BACKLOG: Final = 1024


class InpodError(ZtunnelError):
    """A socket could not be made inside a pod's netns (the netns is gone, a setsockopt failed)."""


@dataclass(frozen=True, slots=True)
class PodListeners:
    """The three listening sockets ztunnel holds in one pod's netns."""

    outbound: socket.socket
    inbound_plaintext: socket.socket
    inbound_hbone: socket.socket

    def all(self) -> tuple[socket.socket, ...]:
        return (self.outbound, self.inbound_plaintext, self.inbound_hbone)


class PodNetns:
    """A pod's network namespace, by the fd the node agent sent with the ZDS Add.

    Owns the fd: :meth:`close` releases it (the namespace itself lives on
    while the pod or another holder keeps it).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        try:
            self.inode = os.fstat(fd).st_ino
        except OSError as exc:
            raise InpodError(f"the pod netns fd {fd} is not usable: {exc.strerror}") from None

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise InpodError("the pod netns was already released")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    # -- listeners (worker thread) -------------------------------------------------------

    def open_listeners(
        self,
        *,
        outbound_port: int = OUTBOUND_PORT,
        inbound_plaintext_port: int = INBOUND_PLAINTEXT_PORT,
        inbound_hbone_port: int = INBOUND_HBONE_PORT,
    ) -> PodListeners:
        """Bind the three listeners inside the pod (blocking: call from a worker thread)."""

        def make() -> PodListeners:
            made: list[socket.socket] = []
            try:
                for port in (outbound_port, inbound_plaintext_port, inbound_hbone_port):
                    made.append(_listener(port))
            except BaseException:
                for sock in made:
                    sock.close()
                raise
            return PodListeners(*made)

        try:
            return netns.run_in_netns(self.fd, make)
        except OSError as exc:
            raise InpodError(f"cannot open ztunnel's listeners in the pod netns: {exc}") from exc

    # -- per-connection sockets (trio's thread) --------------------------------------------

    def tcp_socket(self, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
        """A fresh non-blocking, marked TCP socket created inside the pod's netns."""
        sock = self._create(family)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        except OSError as exc:
            sock.close()
            raise InpodError(f"cannot mark a socket in the pod netns: {exc}") from exc
        return sock

    def transparent_socket(self, source: IPAddress) -> socket.socket:
        """A marked socket bound to ``source`` (not an address of the pod): spoofing.

        The application then sees the client's own address. The pod's rules
        route the replies back to this socket (connmark 0x111, table 100).
        """
        family = socket.AF_INET6 if source.version == 6 else socket.AF_INET
        sock = self.tcp_socket(family)
        try:
            level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.SOL_IP
            sock.setsockopt(level, _IP_TRANSPARENT, 1)
            sock.bind((str(source), 0))
        except OSError as exc:
            sock.close()
            raise InpodError(
                f"cannot bind a transparent socket to {source} in the pod netns "
                f"(needs CAP_NET_ADMIN): {exc}"
            ) from exc
        return sock

    def _create(self, family: socket.AddressFamily) -> socket.socket:
        own = _home_netns()
        try:
            netns.setns(self.fd)
        except OSError as exc:
            raise InpodError(f"cannot enter the pod netns: {exc}") from exc
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            _return_home(own)


_home = threading.local()


def _home_netns() -> int:
    """The calling thread's own netns, opened once per thread (not once per connection)."""
    fd: int | None = getattr(_home, "fd", None)
    if fd is None:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        _home.fd = fd
    return fd


def _return_home(own: int) -> None:
    try:
        netns.setns(own)
    except BaseException:
        # trio's thread stuck in a pod's netns would serve every later
        # connection from the wrong place: there is no safe way on.
        log.critical("cannot return to the node's netns after creating a pod socket; aborting")
        os.abort()


def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
        sock.bind(("0.0.0.0", port))  # noqa: S104 (inside the pod netns)
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def original_destination(sock: socket.socket) -> SocketAddress:
    """Where a redirected connection was going (``SO_ORIGINAL_DST``, IPv4 or IPv6)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, _IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return SocketAddress.of(socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return SocketAddress.of(socket.inet_ntoa(packed), port)


def peer_address(sock: socket.socket) -> SocketAddress:
    host, port = sock.getpeername()[:2]
    return SocketAddress.of(host.split("%", 1)[0], port)


def local_address(sock: socket.socket) -> SocketAddress:
    host, port = sock.getsockname()[:2]
    return SocketAddress.of(host.split("%", 1)[0], port)


def accept_ready(listener: socket.socket) -> socket.socket | None:
    """One pending connection, or None when the backlog is empty (non-blocking)."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        # The client gave up before we accepted: not the listener's failure.
        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
            return None
        raise
    conn.setblocking(False)
    return conn
