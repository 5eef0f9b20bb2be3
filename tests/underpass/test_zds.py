"""Unit tests of the ZDS protocol core (:mod:`underpass.zds`): codec, both sans-IO
state machines in memory, Hypothesis over message sequences, and the SOCK_SEQPACKET
+ SCM_RIGHTS adapters over real (unprivileged) unix sockets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from underpass import zds
from underpass.proto import zds_pb2

pytestmark = pytest.mark.unit

INFO = zds.WorkloadInfo("web-0", "shop", "web")


# ------------------------------------------------------------------------------ codec


@pytest.mark.parametrize(
    "request_",
    [zds.Add("u1", INFO), zds.Add("u2"), zds.Keep("u3"), zds.Del("u4"), zds.SnapshotSent()],
)
def test_request_round_trip(request_: zds.Request) -> None:
    assert zds.decode_request(zds.encode_request(request_)) == request_


def test_wire_bytes_match_the_schema() -> None:
    assert zds.encode_hello(zds.Hello()) == b"\x08\x01"
    assert zds.encode_ack(zds.Ack()) == b"\x0a\x00"
    assert zds.encode_request(zds.SnapshotSent()) == b"\x1a\x00"
    req = zds_pb2.WorkloadRequest()
    req.ParseFromString(zds.encode_request(zds.Del("abc")))
    assert getattr(req, "del").uid == "abc"
    assert zds.decode_ack(zds.encode_ack(zds.Ack("boom"))) == zds.Ack("boom")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xff\xff",
        b"\x0a\x03\x0a\x01",
        zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload()).SerializeToString(),
    ],
)
def test_bad_requests_are_rejected(data: bytes) -> None:
    with pytest.raises(zds.RemoteProtocolError):
        zds.decode_request(data)


def test_bad_hello_and_ack() -> None:
    with pytest.raises(zds.RemoteProtocolError, match="version"):
        zds.decode_hello(b"")
    with pytest.raises(zds.RemoteProtocolError, match="version"):
        zds.decode_hello(b"\x08\x07")
    with pytest.raises(zds.RemoteProtocolError):
        zds.decode_ack(b"\x08\x01")  # a hello is not an ack
    with pytest.raises(zds.RemoteProtocolError, match="over 1024"):
        zds.decode_ack(b"\x0a\x00" + b"\x00" * 1024)


def test_oversized_request_is_refused_locally() -> None:
    with pytest.raises(zds.LocalProtocolError, match="over 1024"):
        zds.encode_request(zds.Add("u", zds.WorkloadInfo("x" * 1100, "ns", "sa")))


# ---------------------------------------------------------------- state machines (pair)


def _exchange(
    agent: zds.AgentProtocol, tunnel: zds.ZtunnelProtocol, request: zds.Request, error: str = ""
) -> zds.Acked:
    out = agent.send(request)
    fds = [42] if out.wants_fd else []
    received = tunnel.receive(out.data, fds)
    assert received.request == request
    assert received.fd == (42 if isinstance(request, zds.Add) else None)
    event = agent.receive(tunnel.ack(error))
    assert isinstance(event, zds.Acked)
    return event


def test_full_flow_in_memory() -> None:
    agent, tunnel = zds.AgentProtocol(), zds.ZtunnelProtocol()
    assert agent.receive(tunnel.hello()) == zds.Hello(zds.VERSION_V1)
    assert {agent.phase, tunnel.phase} == {zds.Phase.SNAPSHOT}
    assert _exchange(agent, tunnel, zds.Add("a", INFO)).ack.ok
    assert _exchange(agent, tunnel, zds.Keep("b")).ack.ok
    assert _exchange(agent, tunnel, zds.SnapshotSent()).ack.ok
    assert {agent.phase, tunnel.phase} == {zds.Phase.LIVE}
    assert _exchange(agent, tunnel, zds.Add("c", INFO)).ack.ok
    assert _exchange(agent, tunnel, zds.Del("a")).ack.ok


def test_error_ack_is_retried_with_the_same_bytes() -> None:
    agent, tunnel = zds.AgentProtocol(), zds.ZtunnelProtocol()
    agent.receive(tunnel.hello())
    first = agent.send(zds.Add("a", INFO))
    tunnel.receive(first.data, [7])
    event = agent.receive(tunnel.ack("netns busy"))
    assert isinstance(event, zds.Acked)
    assert not event.ack.ok and event.ack.error == "netns busy"
    assert agent.failed == zds.Add("a", INFO)
    again = agent.retry()
    assert again == first
    tunnel.receive(again.data, [8])
    event = agent.receive(tunnel.ack())
    assert isinstance(event, zds.Acked) and event.ack.ok
    assert agent.failed is None
    with pytest.raises(zds.LocalProtocolError):
        agent.retry()


def test_snapshot_sent_error_keeps_the_snapshot_open() -> None:
    agent, tunnel = zds.AgentProtocol(), zds.ZtunnelProtocol()
    agent.receive(tunnel.hello())
    tunnel.receive(agent.send(zds.SnapshotSent()).data)
    agent.receive(tunnel.ack("not ready"))
    assert {agent.phase, tunnel.phase} == {zds.Phase.SNAPSHOT}
    assert _exchange(agent, tunnel, zds.SnapshotSent()).ack.ok
    assert {agent.phase, tunnel.phase} == {zds.Phase.LIVE}


def test_agent_local_misuse() -> None:
    agent = zds.AgentProtocol()
    with pytest.raises(zds.LocalProtocolError, match="hello"):
        agent.send(zds.Add("a"))
    agent.receive(zds.encode_hello(zds.Hello()))
    with pytest.raises(zds.LocalProtocolError, match="snapshot"):
        agent.send(zds.Del("a"))
    agent.send(zds.Add("a"))
    with pytest.raises(zds.LocalProtocolError, match="not acknowledged"):
        agent.send(zds.Add("b"))
    agent.receive(zds.encode_ack(zds.Ack()))
    agent.send(zds.SnapshotSent())
    agent.receive(zds.encode_ack(zds.Ack()))
    for late in (zds.Keep("a"), zds.SnapshotSent()):
        with pytest.raises(zds.LocalProtocolError, match="only allowed in the snapshot"):
            agent.send(late)


@pytest.mark.parametrize(
    ("data", "nfds", "truncated", "match"),
    [
        (b"\x08\x01", 1, False, "fd"),
        (b"\x08\x01", 0, True, "truncated"),
        (b"\x0a\x00", 0, False, "version"),  # an ack before the hello
        (b"garbage!", 0, False, None),
    ],
)
def test_agent_fails_closed_on_bad_hello(
    data: bytes, nfds: int, truncated: bool, match: str | None
) -> None:
    agent = zds.AgentProtocol()
    with pytest.raises(zds.RemoteProtocolError, match=match):
        agent.receive(data, nfds, truncated)
    assert agent.phase is zds.Phase.BROKEN
    with pytest.raises(zds.LocalProtocolError, match="broken"):
        agent.send(zds.Add("a"))
    with pytest.raises(zds.LocalProtocolError, match="broken"):
        agent.receive(b"\x08\x01")


def test_agent_rejects_unsolicited_ack() -> None:
    agent = zds.AgentProtocol()
    agent.receive(b"\x08\x01")
    with pytest.raises(zds.RemoteProtocolError, match="nothing to acknowledge"):
        agent.receive(zds.encode_ack(zds.Ack()))
    assert agent.phase is zds.Phase.BROKEN


def _tunnel_in(phase: zds.Phase) -> zds.ZtunnelProtocol:
    tunnel = zds.ZtunnelProtocol()
    tunnel.hello()
    if phase is zds.Phase.LIVE:
        tunnel.receive(zds.encode_request(zds.SnapshotSent()))
        tunnel.ack()
    return tunnel


@pytest.mark.parametrize(
    ("phase", "request_", "fds", "match"),
    [
        (zds.Phase.SNAPSHOT, zds.Add("a"), [], "exactly one"),
        (zds.Phase.SNAPSHOT, zds.Add("a"), [3, 4], "exactly one"),
        (zds.Phase.SNAPSHOT, zds.Keep("a"), [3], "only Add"),
        (zds.Phase.SNAPSHOT, zds.SnapshotSent(), [3], "only Add"),
        (zds.Phase.LIVE, zds.Del("a"), [3], "only Add"),
        (zds.Phase.SNAPSHOT, zds.Del("a"), [], "before the snapshot"),
        (zds.Phase.LIVE, zds.Keep("a"), [], "after the snapshot"),
        (zds.Phase.LIVE, zds.SnapshotSent(), [], "after the snapshot"),
    ],
)
def test_ztunnel_fails_closed(
    phase: zds.Phase, request_: zds.Request, fds: list[int], match: str
) -> None:
    tunnel = _tunnel_in(phase)
    with pytest.raises(zds.RemoteProtocolError, match=match):
        tunnel.receive(zds.encode_request(request_), fds)
    assert tunnel.phase is zds.Phase.BROKEN
    with pytest.raises(zds.LocalProtocolError):
        tunnel.ack()


def test_ztunnel_rejects_a_second_request_before_its_ack_and_truncation() -> None:
    tunnel = _tunnel_in(zds.Phase.SNAPSHOT)
    tunnel.receive(zds.encode_request(zds.Keep("a")))
    with pytest.raises(zds.RemoteProtocolError, match="before"):
        tunnel.receive(zds.encode_request(zds.Keep("b")))
    tunnel = _tunnel_in(zds.Phase.SNAPSHOT)
    with pytest.raises(zds.RemoteProtocolError, match="truncated"):
        tunnel.receive(b"\x1a\x00", truncated=True)
    with pytest.raises(zds.LocalProtocolError):
        zds.ZtunnelProtocol().receive(b"\x1a\x00")
    with pytest.raises(zds.LocalProtocolError, match="nothing"):
        _tunnel_in(zds.Phase.LIVE).ack()
    tunnel = zds.ZtunnelProtocol()
    tunnel.hello()
    with pytest.raises(zds.LocalProtocolError, match="already"):
        tunnel.hello()


# ----------------------------------------------------------------------- Hypothesis

requests = st.one_of(
    st.builds(zds.Add, st.sampled_from(["a", "b"]), st.none() | st.just(INFO)),
    st.builds(zds.Keep, st.sampled_from(["a", "b"])),
    st.builds(zds.Del, st.sampled_from(["a", "b"])),
    st.just(zds.SnapshotSent()),
)
steps = st.lists(
    st.tuples(requests, st.integers(0, 2), st.booleans(), st.sampled_from(["", "err"])),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_ztunnel_matches_a_reference_model(seq: list[tuple[zds.Request, int, bool, str]]) -> None:
    """Every datagram is accepted exactly when the protocol allows it; once it is
    not, the machine is broken for good (it fails closed)."""
    tunnel = zds.ZtunnelProtocol()
    tunnel.hello()
    live = False
    for request, nfds, answer, error in seq:
        fds = list(range(10, 10 + nfds))
        allowed = (
            (nfds == 1 if isinstance(request, zds.Add) else nfds == 0)
            and not (live and isinstance(request, zds.Keep | zds.SnapshotSent))
            and not (not live and isinstance(request, zds.Del))
        )
        if not allowed:
            with pytest.raises(zds.RemoteProtocolError):
                tunnel.receive(zds.encode_request(request), fds)
            with pytest.raises(zds.LocalProtocolError):
                tunnel.receive(zds.encode_request(zds.Add("a")), [1])
            return
        assert tunnel.receive(zds.encode_request(request), fds).request == request
        if not answer:  # the agent breaks the rules: a second request before the ack
            with pytest.raises(zds.RemoteProtocolError):
                tunnel.receive(zds.encode_request(zds.Add("a")), [1])
            return
        tunnel.ack(error)
        if isinstance(request, zds.SnapshotSent) and not error:
            live = True
        assert tunnel.phase is (zds.Phase.LIVE if live else zds.Phase.SNAPSHOT)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=40), st.integers(0, 2), st.booleans()), max_size=8))
def test_agent_survives_arbitrary_datagrams(seq: list[tuple[bytes, int, bool]]) -> None:
    """Garbage from ztunnel only ever raises ZdsError, and then the machine stays broken."""
    agent = zds.AgentProtocol()
    for data, nfds, truncated in seq:
        if agent.phase is not zds.Phase.HELLO and agent.in_flight is None:
            agent.send(zds.Add("a"))
        try:
            agent.receive(data, nfds, truncated)
        except zds.RemoteProtocolError:
            assert agent.phase is zds.Phase.BROKEN
            with pytest.raises(zds.LocalProtocolError):
                agent.receive(b"\x0a\x00")
            return
        assert nfds == 0 and not truncated


# ---------------------------------------------------- SOCK_SEQPACKET and SCM_RIGHTS


async def test_datagrams_carry_fds_and_truncation_is_seen(tmp_path: Path) -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        marker = tmp_path / "marker"
        marker.write_text("netns stand-in")
        fd = os.open(marker, os.O_RDONLY)
        try:
            await zds.send_datagram(a, zds.encode_request(zds.Add("a", INFO)), fd)
        finally:
            os.close(fd)
        got = await zds.recv_datagram(b)
        assert got is not None and not got.truncated and len(got.fds) == 1
        try:
            assert os.read(got.fds[0], 100) == b"netns stand-in"
        finally:
            got.close_fds()
        await a.send(b"\x1a\x00" + b"\x00" * 2000)  # over the limit: arrives truncated
        got = await zds.recv_datagram(b)
        assert got is not None and got.truncated and len(got.data) == zds.MAX_DATAGRAM
        with pytest.raises(zds.LocalProtocolError):
            await zds.send_datagram(a, b"\x00" * 1025)
        a.close()
        assert await zds.recv_datagram(b) is None


async def test_client_against_a_scripted_agent(tmp_path: Path) -> None:
    path = str(tmp_path / "zds.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with listener:
        await listener.bind(path)
        listener.listen(1)
        client = await zds.ZdsClient.connect(path)
        conn, _ = await listener.accept()
        with conn:
            agent = zds.AgentProtocol()
            hello = await zds.recv_datagram(conn)
            assert hello is not None
            assert agent.receive(hello.data) == zds.Hello()
            fd = os.open(tmp_path, os.O_RDONLY)
            try:
                await zds.send_datagram(conn, agent.send(zds.Add("a", INFO)).data, fd)
            finally:
                os.close(fd)
            received = await client.receive()
            assert received is not None and received.request == zds.Add("a", INFO)
            assert received.fd is not None
            os.close(received.fd)
            await client.ack()
            ack = await zds.recv_datagram(conn)
            assert ack is not None
            assert agent.receive(ack.data) == zds.Acked(zds.Add("a", INFO), zds.Ack())
            # an fd on a Keep: the client closes the fd and the connection, and raises
            fd = os.open(tmp_path, os.O_RDONLY)
            try:
                await zds.send_datagram(conn, zds.encode_request(zds.Keep("b")), fd)
            finally:
                os.close(fd)
            with pytest.raises(zds.RemoteProtocolError, match="only Add"):
                await client.receive()
            assert await zds.recv_datagram(conn) is None


async def test_client_connect_retries_until_the_agent_listens(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    with pytest.raises(FileNotFoundError):
        await zds.ZdsClient.connect(path)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with listener:

        async def bind_late() -> None:
            await trio.sleep(0.3)
            await listener.bind(path)
            listener.listen(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bind_late)
            client = await zds.ZdsClient.connect(path, retry_for=5)
        conn, _ = await listener.accept()
        with conn:
            hello = await zds.recv_datagram(conn)
            assert hello is not None and zds.decode_hello(hello.data) == zds.Hello()
        client.close()
