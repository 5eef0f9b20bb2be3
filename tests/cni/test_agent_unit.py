"""Unit tests of the node agent's logic with a rules double (no root, no netns):
enrolment decisions, reconcile on start and on registry changes, CNI requests
over the real socket, ZDS over a real SOCK_SEQPACKET socket; plus the rules
rendering and the enrolment policy."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from cni import plugin, redirect, wire
from cni.agent import Agent, AgentConfig
from cni.enrolment import Policy
from cni.errors import NetnsGone, RedirectError
from tests.cni.conftest import wait_for
from underpass import zds
from underpass.lab.registry import LabRegistry, Namespace, Pod

pytestmark = pytest.mark.unit

ANN = "ambient.istio.io/redirection"


@dataclass
class FakeRules:
    """Records what the agent asks for; ``fail`` makes apply() raise."""

    tables: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: bool = False

    def apply(self, netns: str) -> None:
        self.calls.append(("apply", netns))
        if not Path(netns).exists():
            raise NetnsGone(netns)
        if self.fail:
            raise RedirectError("nft: simulated failure")
        self.tables.add(netns)

    def remove(self, netns: str) -> None:
        self.calls.append(("remove", netns))
        self.tables.discard(netns)

    def installed(self, netns: str) -> bool:
        return netns in self.tables


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.registry = LabRegistry(tmp / "lab")
        self.registry.initialize()
        self.rules = FakeRules()
        self.config = AgentConfig(
            node="node-1",
            cni_socket=str(tmp / "agent.sock"),
            zds_socket=str(tmp / "zds.sock"),
            zds_ack_wait=2.0,
        )

    def netns(self, name: str) -> str:
        path = self.tmp / f"netns-{name}"
        path.write_text(name)  # a stand-in: the agent only needs a path it can open
        return str(path)

    def pod(self, ns: str, name: str, node: str = "node-1", **kw: object) -> Pod:
        pod = Pod(
            ns,
            name,
            f"uid-{name}",
            node,
            "10.250.9.9",
            f"{name}-sa",
            netns=self.netns(name),
            phase="Running",
            **kw,  # type: ignore[arg-type]
        )
        self.registry.upsert_pod(pod)
        return pod

    def annotation(self, name: str, ns: str = "mesh") -> str | None:
        pod = self.registry.pod(ns, name)
        assert pod is not None
        return pod.annotations.get(ANN)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.registry.upsert_namespace(Namespace("mesh", {"istio.io/dataplane-mode": "ambient"}))
    w.registry.upsert_namespace(Namespace("plain", {}))
    return w


@pytest.fixture
async def agent(world: World, nursery: trio.Nursery) -> AsyncIterator[Agent]:
    a = Agent(world.config, world.registry, world.rules)
    await nursery.start(a.run)
    yield a


async def eventually(what: str, predicate: Callable[[], bool]) -> None:
    await wait_for(what, predicate, timeout=5.0)


def add_request(pod: Pod, command: str = "ADD") -> wire.AgentRequest:
    return wire.AgentRequest(
        command, wire.PodRef(pod.namespace, pod.name, pod.uid, pod.netns, "cid", "eth0")
    )


async def test_start_up_reconciles(world: World, nursery: trio.Nursery) -> None:
    meshed = world.pod("mesh", "web")
    elsewhere = world.pod("mesh", "far", node="node-2")
    stale = world.pod("plain", "old", annotations={ANN: "enabled"})
    opted_out = world.pod("mesh", "legacy", labels={"istio.io/dataplane-mode": "none"})
    agent = Agent(world.config, world.registry, world.rules)
    await nursery.start(agent.run)
    assert set(agent.enrolled) == {meshed.uid}
    assert world.rules.tables == {meshed.netns}
    assert ("remove", stale.netns) in world.rules.calls
    assert ("remove", opted_out.netns) in world.rules.calls
    assert all(netns != elsewhere.netns for _, netns in world.rules.calls)
    assert world.annotation("web") == "enabled"
    assert world.annotation("old", "plain") is None


async def test_cni_add_decisions(world: World, agent: Agent) -> None:
    web = world.pod("mesh", "web")
    response, _ = await agent.submit(add_request(web))
    assert response == wire.AgentResponse(True, enrolled=True, reason=response.reason)
    plain = world.pod("plain", "box")
    response, _ = await agent.submit(add_request(plain))
    assert response.ok and not response.enrolled
    assert plain.netns not in world.rules.tables
    # an unknown namespace is an error (fail closed), not a guess
    ghost = wire.PodRef("nowhere", "x", "uid-x", world.netns("x"))
    response, _ = await agent.submit(wire.AgentRequest("ADD", ghost))
    assert not response.ok and response.temporary
    # a pod the registry does not list yet is captured from the CNI request alone
    early = wire.PodRef("mesh", "early", "uid-early", world.netns("early"), ips=("10.250.9.1",))
    response, _ = await agent.submit(wire.AgentRequest("ADD", early))
    assert response.enrolled and agent.enrolled["uid-early"].pod.ips == ("10.250.9.1",)
    # CHECK agrees; STATUS answers
    response, _ = await agent.submit(add_request(web, "CHECK"))
    assert response.ok and response.enrolled
    world.rules.tables.discard(web.netns)
    response, _ = await agent.submit(add_request(web, "CHECK"))
    assert not response.ok and not response.temporary
    assert (await agent.submit(wire.AgentRequest("STATUS", wire.PodRef("", ""))))[0].ok


async def test_capture_failure_is_an_error(world: World, agent: Agent) -> None:
    world.rules.fail = True
    web = world.pod("mesh", "web")
    response, _ = await agent.submit(add_request(web))
    assert not response.ok and "simulated" in response.error and response.temporary
    assert web.uid not in agent.enrolled


async def test_registry_changes_enrol_and_release(world: World, agent: Agent) -> None:
    box = world.pod("plain", "box")
    world.registry.set_namespace_labels("plain", {"istio.io/dataplane-mode": "ambient"})
    await eventually("capture", lambda: box.uid in agent.enrolled)
    await eventually("annotation", lambda: world.annotation("box", "plain") == "enabled")
    world.registry.set_pod_labels("plain", "box", {"istio.io/dataplane-mode": "none"})
    await eventually("release", lambda: box.uid not in agent.enrolled)
    assert box.netns not in world.rules.tables
    await eventually("annotation cleared", lambda: world.annotation("box", "plain") is None)
    # a deleted pod is dropped
    world.registry.set_pod_labels("plain", "box", {"istio.io/dataplane-mode": None})
    await eventually("capture again", lambda: box.uid in agent.enrolled)
    world.registry.delete_pod("plain", "box")
    await eventually("drop", lambda: box.uid not in agent.enrolled)


async def test_plugin_to_agent_over_the_socket(world: World, agent: Agent) -> None:
    """The real plugin code path (run() in a thread) against the running agent."""
    web = world.pod("mesh", "web")
    conf = {
        "cniVersion": "1.0.0",
        "name": "net",
        "type": "underpass-cni",
        "agentSocket": world.config.cni_socket,
        "prevResult": {"ips": [{"address": "10.250.9.9/24"}]},
    }
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "cid",
        "CNI_NETNS": web.netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web;K8S_POD_UID={web.uid}",
    }
    code, out = await trio.to_thread.run_sync(plugin.run, env, json.dumps(conf).encode())
    assert code == 0 and json.loads(out) == conf["prevResult"]
    assert web.uid in agent.enrolled
    code, out = await trio.to_thread.run_sync(
        plugin.run, env | {"CNI_COMMAND": "DEL"}, json.dumps(conf).encode()
    )
    assert (code, out) == (0, "")
    assert web.uid not in agent.enrolled


async def test_garbage_on_the_cni_socket(world: World, agent: Agent) -> None:
    def exchange(data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(world.config.cni_socket)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(65536)

    for data in (b"hello\n", b'{"v": 1, "command": "ADD"}\n', b"\x00" * 10):
        answer = wire.decode_response(await trio.to_thread.run_sync(exchange, data))
        assert not answer.ok and not answer.temporary and "bad request" in answer.error
    assert (await agent.submit(wire.AgentRequest("STATUS", wire.PodRef("", ""))))[0].ok


async def test_zds_add_waits_for_the_ack(world: World, agent: Agent) -> None:
    client = await zds.ZdsClient.connect(world.config.zds_socket)
    try:
        got = await client.receive()
        assert got is not None and got.request == zds.SnapshotSent()
        await client.ack()
        web = world.pod("mesh", "web")
        async with trio.open_nursery() as nursery:
            results: list[wire.AgentResponse] = []

            async def add() -> None:
                response, waiters = await agent.submit(add_request(web))
                for event in waiters:
                    await event.wait()
                results.append(response)

            nursery.start_soon(add)
            got = await client.receive()
            assert got is not None and isinstance(got.request, zds.Add) and got.fd is not None
            try:
                assert os.read(got.fd, 10) == b"web"  # the stand-in netns file itself
            finally:
                os.close(got.fd)
            assert not results
            await client.ack()
        assert results and results[0].enrolled
    finally:
        client.close()


# ---------------------------------------------------------------- rules rendering


def test_rendered_table() -> None:
    text = redirect.render_table()
    assert text.startswith("table inet underpass {")
    assert 'comment "underpass ambient redirection"' in text
    inbound = text.split("chain inbound {")[1].split("}")[0]
    outbound = text.split("chain outbound {")[1].split("}")[0]
    assert "type nat hook prerouting priority dstnat" in inbound
    for rule in (
        "meta mark 0x539 accept",
        "ip saddr 169.254.7.127 accept",
        "ip daddr 127.0.0.1 accept",
        "tcp dport 15008 accept",
        "meta l4proto tcp redirect to :15006",
    ):
        assert rule in inbound
    assert inbound.index("meta mark 0x539") < inbound.index("redirect")
    # 15006-redirected connections must not get the transparent-socket connmark
    assert "ct mark set" not in inbound
    assert "type nat hook output" in outbound
    for rule in ('oifname "lo" accept', "ct mark 0x111 accept", "ip daddr 169.254.7.127 accept"):
        assert outbound.index(rule) < outbound.index("redirect to :15001")
    marking = text.split("chain mark_transparent {")[1].split("}")[0]
    assert "type filter hook prerouting priority mangle" in marking
    assert "meta mark 0x539 ct mark set 0x111" in marking
    restore = text.split("chain restore_mark {")[1].split("}")[0]
    assert "type route hook output priority mangle" in restore  # route: re-routed on change
    assert "ct mark 0x111 meta mark set ct mark" in restore


def test_apply_replaces_and_remove_is_idempotent() -> None:
    apply = redirect.render_apply().splitlines()
    assert apply[:2] == ["table inet underpass", "delete table inet underpass"]
    assert apply[2] == "table inet underpass {"
    assert redirect.render_remove() == "table inet underpass\ndelete table inet underpass\n"


def test_rules_config_is_validated() -> None:
    custom = redirect.RedirectConfig(outbound_port=25001, ztunnel_mark=0x10)
    assert "redirect to :25001" in redirect.render_table(custom)
    assert "meta mark 0x10 accept" in redirect.render_table(custom)
    bad_configs: list[dict[str, Any]] = [
        {"inbound_port": 0},
        {"hbone_port": 70000},
        {"connmark": 0},
        {"probe_address": "not-an-ip"},
        {"ztunnel_mark": 2**32},
    ]
    for bad in bad_configs:
        with pytest.raises(ValueError):
            redirect.RedirectConfig(**bad)


def test_missing_netns_is_reported() -> None:
    with pytest.raises(NetnsGone):
        redirect.apply("/run/netns/utc-does-not-exist")


# ------------------------------------------------------------------- enrolment


def test_policy() -> None:
    ambient = {"istio.io/dataplane-mode": "ambient"}
    policy = Policy.build("mesh-system", ["legacy"])
    assert policy.decide("shop", ambient, {}).enrol
    assert policy.decide("shop", ambient, None).enrol  # pod unknown: no opt-out seen
    assert not policy.decide("shop", ambient, {"istio.io/dataplane-mode": "none"}).enrol
    assert not policy.decide("shop", {}, {}).enrol
    assert not policy.decide("shop", {"istio.io/dataplane-mode": "none"}, {}).enrol
    for never in ("kube-system", "mesh-system", "legacy"):
        decision = policy.decide(never, ambient, {})
        assert not decision.enrol and "never captured" in decision.reason
    assert Policy().never_captured("istio-system")


# --------------------------------------------------------------------- the command


def _exist(*paths: str) -> list[bool]:
    return [Path(p).exists() for p in paths]


async def test_cni_agent_command_serves_and_stops_cleanly(world: World) -> None:
    """``underpass cni-agent`` as a process: both sockets up, answers STATUS, and
    SIGTERM stops it with its socket files removed."""
    import functools
    import signal
    import sys

    sockets = (world.config.cni_socket, world.config.zds_socket)
    cmd = [
        sys.executable, "-m", "underpass.cli.main", "--log-format", "json", "cni-agent",
        "--node", "node-1", "--lab-registry", str(world.tmp / "lab"),
        "--cni-socket", sockets[0], "--zds-socket", sockets[1],
    ]  # fmt: skip
    async with trio.open_nursery() as nursery:
        run = functools.partial(trio.run_process, cmd, check=False, capture_stderr=True)
        proc: trio.Process = await nursery.start(run)
        try:
            await wait_for("sockets", lambda: all(_exist(*sockets)))
            conf = {"cniVersion": "1.1.0", "name": "n", "agentSocket": sockets[0]}
            code, out = await trio.to_thread.run_sync(
                plugin.run, {"CNI_COMMAND": "STATUS"}, json.dumps(conf).encode()
            )
            assert (code, out) == (0, "")
        finally:
            proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await proc.wait()
    assert proc.returncode == 0
    assert _exist(*sockets) == [False, False]
