"""ZDS between the node agent and a test client speaking the protocol as ztunnel
does (:class:`underpass.zds.ZdsClient`), with pods wired by the real CNI chain."""

from __future__ import annotations

import os
import socket

import pytest
import trio

from tests.cni.conftest import (
    NodeLab,
    PodNs,
    RunningAgent,
    accept_one,
    closing_all,
    connect_from,
    listener_in,
    start_agent,
)
from underpass import zds

pytestmark = pytest.mark.netns


async def receive(client: zds.ZdsClient, timeout: float = 10.0) -> zds.Received:
    with trio.fail_after(timeout):
        received = await client.receive()
    assert received is not None, "the agent closed the connection"
    return received


def same_netns(fd: int, pod: PodNs) -> bool:
    a, b = os.fstat(fd), os.stat(pod.netns)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def reachable_through_fd(fd: int, pod: PodNs, caller: PodNs) -> bool:
    """Open a listener inside the netns the fd names (setns on a thread), and
    reach it at the pod's IP from another pod: the fd really is the pod's netns."""
    listener = listener_in(fd, 15008)
    with closing_all(listener):
        out = connect_from(caller.netns, (pod.ip, 15008))
        with closing_all(out):
            conn = accept_one(listener)
            with closing_all(conn):
                return conn is not None


async def test_snapshot_then_add_and_del(lab: NodeLab, running_agent: RunningAgent) -> None:
    lab.namespace("mesh", ambient=True)
    lab.namespace("plain", ambient=False)
    caller = lab.pod("plain", "caller")
    await lab.add(caller)
    first = lab.pod("mesh", "first")
    await lab.add(first)

    client = await zds.ZdsClient.connect(lab.zds_socket)
    try:
        got = await receive(client)
        assert got.request == zds.Add(first.uid, zds.WorkloadInfo("first", "mesh", "first-sa"))
        assert got.fd is not None
        try:
            assert same_netns(got.fd, first)
            assert await trio.to_thread.run_sync(reachable_through_fd, got.fd, first, caller)
        finally:
            os.close(got.fd)
        await client.ack()
        assert (await receive(client)).request == zds.SnapshotSent()
        await client.ack()

        second = lab.pod("mesh", "second")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lab.add, second)  # ADD waits for our ack
            got = await receive(client)
            assert isinstance(got.request, zds.Add) and got.request.uid == second.uid
            assert got.fd is not None and same_netns(got.fd, second)
            os.close(got.fd)
            await client.ack()
        assert second.uid in running_agent.agent.enrolled

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lab.delete, second)
            got = await receive(client)
            assert got.request == zds.Del(second.uid) and got.fd is None
            await client.ack()

        lab.label_namespace("mesh", ambient=False)  # un-enrol by label: Del too
        got = await receive(client)
        assert got.request == zds.Del(first.uid)
        await client.ack()
    finally:
        client.close()


async def test_error_ack_is_retried(lab: NodeLab, running_agent: RunningAgent) -> None:
    lab.namespace("mesh", ambient=True)
    client = await zds.ZdsClient.connect(lab.zds_socket)
    try:
        assert (await receive(client)).request == zds.SnapshotSent()
        await client.ack("not ready yet")  # even SnapshotSent is retried
        assert (await receive(client)).request == zds.SnapshotSent()
        await client.ack()

        pod = lab.pod("mesh", "web")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lab.add, pod)
            fds = []
            for answer in ("netns busy", "still busy", ""):
                got = await receive(client)
                assert got.request == zds.Add(pod.uid, zds.WorkloadInfo("web", "mesh", "web-sa"))
                assert got.fd is not None
                fds.append(got.fd)
                await client.ack(answer)
            try:
                assert all(same_netns(fd, pod) for fd in fds)
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        client.close()


async def test_reconnect_and_agent_restart_resend_the_snapshot(
    lab: NodeLab, nursery: trio.Nursery
) -> None:
    agent = await start_agent(nursery, lab.agent())
    lab.namespace("mesh", ambient=True)
    pods = [lab.pod("mesh", f"web-{i}") for i in range(2)]
    for pod in pods:
        await lab.add(pod)

    async def snapshot() -> set[str]:
        client = await zds.ZdsClient.connect(lab.zds_socket)
        seen: set[str] = set()
        try:
            while True:
                got = await receive(client)
                await client.ack()
                if got.fd is not None:
                    os.close(got.fd)
                if isinstance(got.request, zds.SnapshotSent):
                    return seen
                assert isinstance(got.request, zds.Add)
                seen.add(got.request.uid)
        finally:
            client.close()

    expected = {p.uid for p in pods}
    assert await snapshot() == expected
    assert await snapshot() == expected  # a reconnecting ztunnel gets it again
    await agent.stop()
    agent = await start_agent(nursery, lab.agent())
    try:
        assert await snapshot() == expected  # and so after an agent restart
    finally:
        await agent.stop()


async def test_garbage_from_ztunnel_closes_only_that_connection(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    lab.namespace("mesh", ambient=True)
    bad = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with bad:
        await bad.connect(lab.zds_socket)
        await bad.send(b"\x08\x07")  # hello with an unknown version
        with trio.fail_after(5):
            assert await zds.recv_datagram(bad) is None  # closed by the agent
    good = await zds.ZdsClient.connect(lab.zds_socket)
    try:
        assert (await receive(good)).request == zds.SnapshotSent()
    finally:
        good.close()
