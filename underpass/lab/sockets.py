"""TCP sockets made inside a lab network namespace, for looking at capture from outside.

Owns the small probes the demo and the tests use to see what the redirection
rules do to a connection: a listener or a connection created *inside* a pod's
(or node's) netns by :func:`underpass.netns.run_in_netns` (a socket keeps the
namespace it was made in, wherever it is used afterwards), optionally with
ztunnel's ``SO_MARK``, and ``SO_ORIGINAL_DST`` of a redirected connection.
Blocking calls with timeouts; call them from a thread in trio code.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from typing import Final

from underpass.netns import run_in_netns

SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h
#: The mark ztunnel puts on its own sockets in a pod (PROTOCOLS.md section 6).
ZTUNNEL_MARK: Final = 0x539


def listener_in(netns: str | int, port: int, host: str = "", mark: int = 0) -> socket.socket:
    """A listening TCP socket that lives in the netns (a path or an fd)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.bind((host, port))
            sock.listen(8)
            sock.settimeout(5)
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(netns, make)


def connect_from(
    netns: str, addr: tuple[str, int], mark: int = 0, timeout: float = 5.0
) -> socket.socket:
    """A TCP connection made from inside the netns (optionally with ``SO_MARK``)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(netns, make)


def original_dst(conn: socket.socket) -> tuple[str, int]:
    """``SO_ORIGINAL_DST`` of an accepted (redirected) connection: (ip, port)."""
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def accept_one(listener: socket.socket, timeout: float = 5.0) -> socket.socket | None:
    """Accept one connection within ``timeout``; None when none came."""
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        return None
    conn.settimeout(5)
    return conn


@contextlib.contextmanager
def closing_all(*socks: socket.socket | None) -> Iterator[None]:
    """Close every given socket (None: skipped) when the block ends."""
    try:
        yield
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()
