"""Transparent upstream connections inside a pod netns: ztunnel connects to the local
application with the client's source IP (``IP_TRANSPARENT`` + ``SO_MARK`` 0x539), and
the rules of :mod:`cni.redirect` bring the application's replies back to that socket
(connmark 0x111, a ``type route`` restore chain, ``fwmark 0x111 lookup 100`` with a
local route) without disturbing inbound (15006) and outbound (15001) capture.

The netns tests apply and remove the rules themselves (no agent runs): pods are wired
by the real CNI chain in a namespace outside the mesh, so nothing else touches them.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator

import pytest
import trio

from cni import redirect
from tests.cni.conftest import (
    ZTUNNEL_MARK,
    NodeLab,
    PodNs,
    accept_one,
    closing_all,
    connect_from,
    in_netns,
    listener_in,
    original_dst,
)
from underpass.netns import run_in_netns

#: A client address on no interface anywhere in the lab: only a transparent socket can use it.
FOREIGN = "10.99.0.7"
APP_PORT = 8080
CONNMARK = 0x111


# ------------------------------------------------------------------ helpers


def transparent_connect(
    netns: str, source: str, dest: tuple[str, int], timeout: float
) -> socket.socket:
    """What ztunnel's inbound path does: connect from inside the pod netns with a foreign
    source address (IP_TRANSPARENT), marked as ztunnel's own (SO_MARK 0x539)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ZTUNNEL_MARK)
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.connect(dest)
            sock.settimeout(5)
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(netns, make)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def exchange(a: socket.socket, b: socket.socket) -> None:
    """Bytes flow both ways between the two ends of one connection."""
    a.sendall(b"request")
    assert recv_exactly(b, 7) == b"request"
    b.sendall(b"reply")
    assert recv_exactly(a, 5) == b"reply"


#: The original direction's tuple: the first src/dst/sport/dport of a conntrack line.
_ORIGINAL = re.compile(r"\bsrc=(\S+) dst=(\S+) sport=\d+ dport=(\d+)")
_MARK = re.compile(r"\bmark=(\d+)")


def conntrack_marks(netns: str, src: str, dst: str, dport: int) -> list[int]:
    """The ct marks of the pod netns's conntrack entries whose original direction is
    src -> dst:dport (read from the netns's own conntrack table)."""

    def read() -> str:
        with open("/proc/thread-self/net/nf_conntrack", encoding="ascii") as f:
            return f.read()

    marks = []
    for line in run_in_netns(netns, read).splitlines():
        original = _ORIGINAL.search(line)
        if original is not None and original.groups() == (src, dst, str(dport)):
            mark = _MARK.search(line)
            assert mark is not None, f"conntrack shows no marks (CONFIG_NF_CONNTRACK_MARK?): {line}"
            marks.append(int(mark.group(1)))
    return marks


def add_duplicate_rule(netns: str) -> None:
    """Add ``pref 32764 fwmark 0x111 lookup 100`` once more, as tools that do not ask for
    an exclusive create (no NLM_F_EXCL) can: ``ip rule add`` itself would be refused."""
    rtm_newrule, fra_priority, fra_fwmark, fra_table = 32, 6, 10, 15
    request, ack, create = 0x1, 0x4, 0x400

    def attr(kind: int, value: int) -> bytes:
        return struct.pack("=HHI", 8, kind, value)

    # struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action (to table)
    body = struct.pack("=8BI", socket.AF_INET, 0, 0, 0, 100, 0, 0, 1, 0)
    body += attr(fra_priority, 32764) + attr(fra_fwmark, 0x111) + attr(fra_table, 100)
    message = struct.pack("=IHHII", 16 + len(body), rtm_newrule, request | ack | create, 1, 0)

    def send() -> int:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
            nl.settimeout(5)
            nl.send(message + body)
            answer = nl.recv(4096)
        (error,) = struct.unpack_from("=i", answer, 16)  # struct nlmsgerr after nlmsghdr
        return int(error)

    assert run_in_netns(netns, send) == 0


def raw_rules(netns: str, family: int) -> list[str]:
    """Our policy rule as ``ip`` lists it, one entry per copy (read without cni.redirect)."""
    out = in_netns(netns, "ip", f"-{family}", "rule", "show").stdout
    return [line for line in out.splitlines() if "fwmark 0x111 lookup 100" in line]


def raw_table_100(netns: str, family: int) -> str:
    proc = in_netns(netns, "ip", f"-{family}", "route", "show", "table", "100", check=False)
    # an empty IPv4 table does not exist for the kernel: ip says so and fails
    assert proc.returncode == 0 or "does not exist" in proc.stderr, proc.stderr
    return proc.stdout.strip()


def raw_table(netns: str) -> str:
    return in_netns(netns, "nft", "list", "ruleset").stdout


async def app_and_peer(lab: NodeLab) -> tuple[PodNs, PodNs]:
    """Two pods wired by the CNI chain, outside the mesh (the tests apply rules themselves)."""
    lab.namespace("plain", ambient=False)
    app = lab.pod("plain", "app")
    peer = lab.pod("plain", "peer")
    await lab.add(app)
    await lab.add(peer)
    return app, peer


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    """Sockets a test opens; all closed at the end, on failure too."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


# ------------------------------------------------------------------ pure


@pytest.mark.unit
def test_policy_routing_arguments() -> None:
    config = redirect.RedirectConfig()
    assert redirect.rule_args(config) == ["pref", "32764", "fwmark", "0x111", "table", "100"]
    assert redirect.local_route_args(4, config) == [
        *("local", "0.0.0.0/0", "dev", "lo", "table", "100")
    ]
    assert redirect.local_route_args(6, config)[:2] == ["local", "::/0"]
    custom = redirect.RedirectConfig(connmark=0x222, route_table=200, rule_priority=1000)
    assert redirect.rule_args(custom) == ["pref", "1000", "fwmark", "0x222", "table", "200"]
    with pytest.raises(ValueError):
        redirect.local_route_args(5, config)
    for bad in ({"route_table": 254}, {"route_table": 0}, {"rule_priority": 32766}):
        with pytest.raises(ValueError):
            redirect.RedirectConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.unit
def test_rule_and_route_listings_are_read_exactly() -> None:
    ours = {"priority": 32764, "src": "all", "fwmark": "0x111", "table": "100"}
    rules = [
        {"priority": 0, "src": "all", "table": "255"},
        ours,
        dict(ours),
        {**ours, "fwmask": "0xfff"},  # masked: not ours
        {**ours, "table": "101"},
        {**ours, "priority": 100},
        {"priority": 32766, "src": "all", "table": "254"},
    ]
    assert redirect.count_rules(rules) == 2
    assert redirect.count_rules([{**ours, "fwmask": "0xffffffff"}]) == 1
    assert redirect.count_rules([]) == 0
    local = {"type": "local", "dst": "default", "dev": "lo", "scope": "host"}
    assert redirect.has_local_route([local])
    assert not redirect.has_local_route([{**local, "dev": "eth0"}])
    assert not redirect.has_local_route([{**local, "type": "unicast"}])
    assert not redirect.has_local_route([{**local, "dst": "10.0.0.0/8"}])


@pytest.mark.unit
def test_inspection_needs_every_part() -> None:
    table = redirect.render_table()
    v4 = redirect.LocalDelivery(4, 1, True)
    v6 = redirect.LocalDelivery(6, 1, True)
    assert redirect.Inspection(table, (v4, v6), ipv6=True).complete()
    assert redirect.Inspection(table, (v4,), ipv6=False).complete()
    assert not redirect.Inspection(table, (v4,), ipv6=True).complete()
    assert not redirect.Inspection(None, (v4, v6), ipv6=True).complete()
    for broken in (
        redirect.LocalDelivery(4, 0, True),
        redirect.LocalDelivery(4, 2, True),
        redirect.LocalDelivery(4, 1, False),
    ):
        assert not redirect.Inspection(table, (broken,), ipv6=False).complete()
    old_style = table.replace("type route hook output", "type filter hook output")
    assert not redirect.Inspection(old_style, (v4,), ipv6=False).complete()
    gone = redirect.LocalDelivery(4, 0, False)
    assert redirect.Inspection(None, (gone,), ipv6=False).absent
    assert not redirect.Inspection(None, (v4,), ipv6=False).absent


# ------------------------------------------------------------------ netns


@pytest.mark.netns
async def test_transparent_socket_gets_the_applications_replies(
    lab: NodeLab, listeners: list[socket.socket]
) -> None:
    app, _ = await app_and_peer(lab)

    def check() -> None:
        server = listener_in(app.netns, APP_PORT)
        listeners.append(server)
        # Without the rules the SYN-ACK to the foreign address leaves by eth0: no connection.
        with pytest.raises(OSError):
            sock = transparent_connect(app.netns, FOREIGN, (app.ip, APP_PORT), timeout=1.0)
            sock.close()

        redirect.apply(app.netns)
        upstream = transparent_connect(app.netns, FOREIGN, (app.ip, APP_PORT), timeout=5.0)
        with closing_all(upstream):
            accepted = accept_one(server)
            with closing_all(accepted):
                assert accepted is not None, "the application accepted nothing"
                assert accepted.getpeername()[0] == FOREIGN
                assert upstream.getsockname()[0] == FOREIGN
                exchange(upstream, accepted)
                exchange(accepted, upstream)
                marks = conntrack_marks(app.netns, FOREIGN, app.ip, APP_PORT)
                assert CONNMARK in marks, marks

    await trio.to_thread.run_sync(check)


@pytest.mark.netns
async def test_inbound_plaintext_still_lands_on_15006_and_replies_reach_the_peer(
    lab: NodeLab, listeners: list[socket.socket]
) -> None:
    app, peer = await app_and_peer(lab)
    await trio.to_thread.run_sync(redirect.apply, app.netns)

    def check() -> None:
        inbound = listener_in(app.netns, 15006, mark=ZTUNNEL_MARK)
        server = listener_in(app.netns, APP_PORT)
        listeners.extend((inbound, server))
        out = connect_from(peer.netns, (app.ip, APP_PORT))
        with closing_all(out):
            captured = accept_one(inbound)
            direct = accept_one(server, timeout=0.3)
            with closing_all(captured, direct):
                assert captured is not None, "the 15006 listener got nothing"
                assert direct is None, "the connection reached the application uncaptured"
                assert original_dst(captured) == (app.ip, APP_PORT)
                exchange(out, captured)  # ztunnel's replies leave by eth0, to the peer
                marks = conntrack_marks(app.netns, peer.ip, app.ip, APP_PORT)
                assert marks and CONNMARK not in marks, marks

    await trio.to_thread.run_sync(check)


@pytest.mark.netns
async def test_outbound_capture_is_unchanged(lab: NodeLab, listeners: list[socket.socket]) -> None:
    app, peer = await app_and_peer(lab)
    await trio.to_thread.run_sync(redirect.apply, app.netns)

    def check() -> None:
        capture = listener_in(app.netns, 15001, mark=ZTUNNEL_MARK)
        remote = listener_in(peer.netns, 9090)
        listeners.extend((capture, remote))
        # an unmarked socket of the application: captured, with its original destination
        out = connect_from(app.netns, (peer.ip, 9090))
        with closing_all(out):
            captured = accept_one(capture)
            direct = accept_one(remote, timeout=0.3)
            with closing_all(captured, direct):
                assert captured is not None and direct is None
                assert original_dst(captured) == (peer.ip, 9090)
                exchange(out, captured)
        # ztunnel's own (marked) socket: straight to the peer, and the replies come back
        out = connect_from(app.netns, (peer.ip, 9090), mark=ZTUNNEL_MARK)
        with closing_all(out):
            reached = accept_one(remote)
            stray = accept_one(capture, timeout=0.3)
            with closing_all(reached, stray):
                assert reached is not None and stray is None
                exchange(out, reached)

    await trio.to_thread.run_sync(check)


@pytest.mark.netns
async def test_apply_is_idempotent_and_remove_leaves_nothing(lab: NodeLab) -> None:
    app, _ = await app_and_peer(lab)

    def check() -> None:
        redirect.remove(app.netns)  # nothing there yet: fine
        redirect.apply(app.netns)
        redirect.apply(app.netns)
        found = redirect.inspect(app.netns)
        families = (4, 6) if found.ipv6 else (4,)
        assert found.complete(), found
        assert redirect.installed(app.netns)
        for family in families:
            assert len(raw_rules(app.netns, family)) == 1, family
            assert "local default dev lo" in raw_table_100(app.netns, family)
        assert raw_table(app.netns).count("table inet underpass") == 1

        # inspection sees a missing rule; a re-apply puts it back; a duplicate is folded
        in_netns(app.netns, "ip", "-4", "rule", "del", "fwmark", "0x111", "table", "100")
        assert not redirect.installed(app.netns)
        assert redirect.inspect(app.netns).delivery[0] == redirect.LocalDelivery(4, 0, True)
        redirect.apply(app.netns)
        add_duplicate_rule(app.netns)
        assert len(raw_rules(app.netns, 4)) == 2
        assert not redirect.installed(app.netns)
        redirect.apply(app.netns)
        assert len(raw_rules(app.netns, 4)) == 1

        redirect.remove(app.netns)
        assert redirect.inspect(app.netns).absent
        assert "underpass" not in raw_table(app.netns)
        for family in families:
            assert raw_rules(app.netns, family) == []
            assert raw_table_100(app.netns, family) == ""
        redirect.remove(app.netns)  # twice: still fine
        assert not redirect.installed(app.netns)

    await trio.to_thread.run_sync(check)
