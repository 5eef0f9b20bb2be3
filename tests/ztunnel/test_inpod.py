"""ztunnel.inpod: ports, addresses of accepted sockets, the netns handle (unit, no root).

Sockets here are real loopback connections of the test's own network
namespace: no redirection, no privileges. What needs a pod netns (listeners
inside it, SO_MARK, transparent sockets) is covered by the netns tier.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from underpass.hbone.headers import SocketAddress
from ztunnel.inpod import (
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    LOOP_GUARD_PORTS,
    OUTBOUND_PORT,
    ZTUNNEL_MARK,
    InpodError,
    PodNetns,
    accept_ready,
    local_address,
    original_destination,
    peer_address,
)

pytestmark = pytest.mark.unit


def test_ports_and_mark_are_the_protocols() -> None:
    assert (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT) == (15001, 15006, 15008)
    assert ZTUNNEL_MARK == 1337
    assert frozenset({15001, 15006, 15008}) == LOOP_GUARD_PORTS


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def connection(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """(listener, client, accepted) on loopback, nothing redirected."""
    family: socket.AddressFamily = request.param
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    listener = socket.socket(family, socket.SOCK_STREAM)
    client = socket.socket(family, socket.SOCK_STREAM)
    accepted: socket.socket | None = None
    try:
        try:
            listener.bind((host, 0))
        except OSError as exc:
            pytest.fail(f"cannot bind loopback {host} in the test's netns: {exc}")
        listener.listen(4)
        client.connect(listener.getsockname()[:2])
        accepted, _ = listener.accept()
        yield listener, client, accepted
    finally:
        for sock in (accepted, client, listener):
            if sock is not None:
                sock.close()


def test_peer_and_local_address_of_an_accepted_socket(
    connection: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    listener, client, accepted = connection
    client_host, client_port = client.getsockname()[:2]
    listen_host, listen_port = listener.getsockname()[:2]
    assert peer_address(accepted) == SocketAddress.of(client_host, client_port)
    assert local_address(accepted) == SocketAddress.of(listen_host, listen_port)
    assert peer_address(client) == local_address(accepted)


def test_original_destination_without_redirect_is_never_another_address(
    connection: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    """Without a NAT redirect there is no *other* original destination.

    Where conntrack does not track the test's netns (no netfilter rule asks
    for it: the usual case on a host), the kernel has no entry and the call
    fails with ENOENT, which the data path answers by resetting the
    connection. Where it does track, the original destination is the
    connection's own local address. Either way it is never the peer's.
    """
    _, client, accepted = connection
    try:
        found = original_destination(accepted)
    except OSError as exc:
        assert exc.errno in (errno.ENOENT, errno.ENOPROTOOPT), exc
    else:
        assert found == local_address(accepted)
        assert found != peer_address(accepted)
    # The client side was never redirected either: same rule.
    try:
        found = original_destination(client)
    except OSError as exc:
        assert exc.errno in (errno.ENOENT, errno.ENOPROTOOPT), exc
    else:
        assert found == peer_address(client)


def test_accept_ready_returns_none_on_an_empty_backlog_then_a_nonblocking_socket() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        assert accept_ready(listener) is None
        client.connect(listener.getsockname())
        client.setblocking(True)
        accepted = None
        for _ in range(1000):  # the handshake completes in the kernel; a few tries at most
            accepted = accept_ready(listener)
            if accepted is not None:
                break
        assert accepted is not None
        with accepted:
            assert accepted.getblocking() is False
            assert peer_address(accepted) == SocketAddress.of(*client.getsockname())
        assert accept_ready(listener) is None
    finally:
        client.close()
        listener.close()


def test_pod_netns_owns_its_fd_and_knows_the_namespace_inode() -> None:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    pod_netns = PodNetns(fd)
    assert pod_netns.inode == os.stat("/proc/self/ns/net").st_ino
    assert pod_netns.fd == fd
    pod_netns.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # released
    with pytest.raises(InpodError, match="already released"):
        _ = pod_netns.fd
    pod_netns.close()  # twice is harmless


def test_pod_netns_refuses_an_unusable_fd_with_an_operator_message() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    with pytest.raises(InpodError, match=f"the pod netns fd {fd} is not usable"):
        PodNetns(fd)
