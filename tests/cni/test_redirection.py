"""Redirection inside pod network namespaces, with real traffic between pods wired by
the real CNI chain and captured by the node agent (PROTOCOLS.md section 6)."""

from __future__ import annotations

import pytest
import trio

from cni import redirect
from tests.cni.conftest import (
    ZTUNNEL_MARK,
    NodeLab,
    PodNs,
    RunningAgent,
    accept_one,
    closing_all,
    connect_from,
    in_netns,
    listener_in,
    original_dst,
    start_agent,
    wait_for,
)

pytestmark = pytest.mark.netns

PROBE = "169.254.7.127"


async def mesh_and_plain(lab: NodeLab) -> tuple[PodNs, PodNs]:
    """A captured client in namespace ``mesh`` and an uncaptured server in ``plain``."""
    lab.namespace("mesh", ambient=True)
    lab.namespace("plain", ambient=False)
    client = lab.pod("mesh", "client")
    server = lab.pod("plain", "server")
    await lab.add(client)
    await lab.add(server)
    return client, server


def assert_outbound_captured(client: PodNs, server: PodNs, port: int = 8080) -> None:
    app = listener_in(server.netns, port)
    capture = listener_in(client.netns, 15001, mark=ZTUNNEL_MARK)
    conn = direct = None
    with closing_all(app, capture):
        out = connect_from(client.netns, (server.ip, port))
        with closing_all(out):
            conn = accept_one(capture)
            direct = accept_one(app, timeout=0.3)
            with closing_all(conn, direct):
                assert conn is not None, "the 15001 listener got nothing"
                assert direct is None, "the connection reached the server uncaptured"
                assert original_dst(conn) == (server.ip, port)
                out.sendall(b"ping")
                assert conn.recv(4) == b"ping"


def assert_outbound_direct(client: PodNs, server: PodNs, port: int = 8080, mark: int = 0) -> None:
    app = listener_in(server.netns, port)
    capture = listener_in(client.netns, 15001, mark=ZTUNNEL_MARK)
    with closing_all(app, capture):
        out = connect_from(client.netns, (server.ip, port), mark=mark)
        with closing_all(out):
            conn = accept_one(app)
            captured = accept_one(capture, timeout=0.3)
            with closing_all(conn, captured):
                assert conn is not None, "the server got nothing"
                assert captured is None, "the connection was captured"


async def test_outbound_lands_on_15001_with_its_original_destination(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    client, server = await mesh_and_plain(lab)
    await trio.to_thread.run_sync(assert_outbound_captured, client, server)
    # a second destination port, to be sure the original destination is per connection
    await trio.to_thread.run_sync(assert_outbound_captured, client, server, 9090)


async def test_inbound_lands_on_15006_and_15008_is_left_alone(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    outsider, _ = await mesh_and_plain(lab)
    lab.namespace("plain", ambient=False)
    caller = lab.pod("plain", "caller")
    await lab.add(caller)
    target = outsider  # captured pod

    def check() -> None:
        inbound = listener_in(target.netns, 15006, mark=ZTUNNEL_MARK)
        app = listener_in(target.netns, 8080)
        hbone = listener_in(target.netns, 15008, mark=ZTUNNEL_MARK)
        with closing_all(inbound, app, hbone):
            out = connect_from(caller.netns, (target.ip, 8080))
            with closing_all(out):
                conn = accept_one(inbound)
                direct = accept_one(app, timeout=0.3)
                with closing_all(conn, direct):
                    assert conn is not None and direct is None
                    assert original_dst(conn) == (target.ip, 8080)
                    out.sendall(b"in")
                    assert conn.recv(2) == b"in"
            out = connect_from(caller.netns, (target.ip, 15008))
            with closing_all(out):
                conn = accept_one(hbone)
                redirected = accept_one(inbound, timeout=0.3)
                with closing_all(conn, redirected):
                    assert conn is not None and redirected is None

    await trio.to_thread.run_sync(check)


async def test_ztunnel_marked_sockets_are_not_captured(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    client, server = await mesh_and_plain(lab)
    await trio.to_thread.run_sync(lambda: assert_outbound_direct(client, server, mark=ZTUNNEL_MARK))


async def test_a_pod_talking_to_itself_is_not_captured(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    client, _ = await mesh_and_plain(lab)

    def check() -> None:
        capture = listener_in(client.netns, 15001, mark=ZTUNNEL_MARK)
        inbound = listener_in(client.netns, 15006, mark=ZTUNNEL_MARK)
        app = listener_in(client.netns, 8080)
        with closing_all(capture, inbound, app):
            for dst in (client.ip, "127.0.0.1"):
                out = connect_from(client.netns, (dst, 8080))
                with closing_all(out):
                    conn = accept_one(app)
                    stray = accept_one(capture, timeout=0.2) or accept_one(inbound, timeout=0.2)
                    with closing_all(conn, stray):
                        assert conn is not None and stray is None, dst

    await trio.to_thread.run_sync(check)


async def test_kubelet_probes_are_snatted_and_not_captured(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    """The node's own connections to a captured pod (kubelet probes) leave the node
    from 169.254.7.127 (node-side SNAT), which the pod's rules let through."""
    client, server = await mesh_and_plain(lab)
    node_rules = in_netns(lab.node_netns, "nft", "list", "table", "ip", "underpass_node").stdout
    assert client.ip in node_rules and server.ip not in node_rules

    def probe(target: PodNs) -> tuple[str, bool]:
        inbound = listener_in(target.netns, 15006, mark=ZTUNNEL_MARK)
        app = listener_in(target.netns, 8080)
        with closing_all(inbound, app):
            out = connect_from(lab.node_netns, (target.ip, 8080))
            with closing_all(out):
                conn = accept_one(app, timeout=2)
                stray = accept_one(inbound, timeout=0.3)
                with closing_all(conn, stray):
                    assert conn is not None and stray is None
                    out.sendall(b"ok")
                    assert conn.recv(2) == b"ok"  # and the reply made it back
                    peer = conn.getpeername()[0]
                    return peer, stray is None

    assert await trio.to_thread.run_sync(probe, client) == (PROBE, True)
    # an uncaptured pod sees the node's own address: only captured pods are SNATed
    peer, _ = await trio.to_thread.run_sync(probe, server)
    assert peer.startswith("10.250.")
    lab.label_namespace("mesh", ambient=False)
    await wait_for(
        "probe SNAT entry removed",
        lambda: (
            client.ip
            not in in_netns(lab.node_netns, "nft", "list", "table", "ip", "underpass_node").stdout
        ),
    )


async def test_labels_enrol_and_release_running_pods(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    lab.namespace("plain", ambient=False)
    server = lab.pod("plain", "server")
    await lab.add(server)
    lab.namespace("later", ambient=False)
    client = lab.pod("later", "client")
    await lab.add(client)
    assert lab.our_table(client) == ""
    await trio.to_thread.run_sync(assert_outbound_direct, client, server)

    def annotation() -> str | None:
        return lab.registry_pod(client).annotations.get("ambient.istio.io/redirection")

    lab.label_namespace("later", ambient=True)  # no pod restart
    await wait_for("capture", lambda: annotation() == "enabled")
    assert "redirect to :15001" in lab.our_table(client)
    await trio.to_thread.run_sync(assert_outbound_captured, client, server)

    lab.label_namespace("later", ambient=False)
    await wait_for("release", lambda: annotation() is None)
    assert lab.our_table(client) == ""  # every rule of ours is gone
    assert client.uid not in running_agent.agent.enrolled
    await trio.to_thread.run_sync(assert_outbound_direct, client, server)

    lab.label_namespace("later", ambient=True)
    await wait_for("capture again", lambda: annotation() == "enabled")
    lab.registry.set_pod_labels("later", "client", {"istio.io/dataplane-mode": "none"})
    await wait_for("opt-out", lambda: annotation() is None)
    assert lab.our_table(client) == ""


async def test_restart_reconciles(lab: NodeLab, nursery: trio.Nursery) -> None:
    first = await start_agent(nursery, lab.agent())
    client, server = await mesh_and_plain(lab)
    await first.stop()
    # while the agent is down: junk in our table of a captured pod, a stale table
    # in an uncaptured one, and a lost annotation
    in_netns(client.netns, "nft", "add", "rule", "inet", "underpass", "outbound", "counter")
    await trio.to_thread.run_sync(redirect.apply, server.netns)
    lab.registry.set_pod_annotations(client.uid, {"ambient.istio.io/redirection": None})
    assert "counter" in lab.our_table(client)

    second = await start_agent(nursery, lab.agent())
    try:
        table = lab.our_table(client)
        assert "counter" not in table
        assert table.count("table inet underpass") == 1
        assert table.count("redirect to :15001") == 1
        assert lab.our_table(server) == ""
        ann = lab.registry_pod(client).annotations.get("ambient.istio.io/redirection")
        assert ann == "enabled"
        await trio.to_thread.run_sync(assert_outbound_captured, client, server)
    finally:
        await second.stop()
