"""Unit tests of the plugin's input handling (environment, CNI_ARGS, network
configuration), its fail-closed decisions and the plugin <-> agent messages."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import errors as E
from cni import plugin, wire
from cni.enrolment import Policy
from cni.errors import PluginError, WireError
from underpass.lab.registry import LabRegistry, Namespace, Pod

pytestmark = pytest.mark.unit

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/x"}],
    "ips": [{"interface": 0, "address": "10.250.1.5/24", "gateway": "10.250.1.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


def env(command: str = "ADD", **over: str | None) -> dict[str, str]:
    base = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/run/netns/utc-none",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=u-1",
    }
    for key, value in over.items():
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    return base


def conf(tmp_path: Path, **over: Any) -> bytes:
    body: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "underpass-cni",
        "agentSocket": str(tmp_path / "absent.sock"),
        "labRegistry": str(tmp_path / "lab"),
        "timeoutSeconds": 2,
        "prevResult": PREV,
    }
    body.update(over)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def error_of(result: tuple[int, str]) -> dict[str, Any]:
    code, out = result
    assert code == 1
    body: dict[str, Any] = json.loads(out)
    assert set(body) == {"cniVersion", "code", "msg", "details"}
    return body


@pytest.fixture
def registry(tmp_path: Path) -> LabRegistry:
    reg = LabRegistry(tmp_path / "lab")
    reg.initialize()
    reg.upsert_namespace(Namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    reg.upsert_namespace(Namespace("plain", {}))
    return reg


def add_pod(
    reg: LabRegistry, ns: str, name: str, uid: str, labels: dict[str, str] | None = None
) -> None:
    reg.upsert_pod(Pod(ns, name, uid, "node-1", None, "sa", labels=labels or {}))


# ------------------------------------------------------------------ environment


def test_cni_args() -> None:
    assert plugin.parse_cni_args("A=1;B=;C=x=y") == {"A": "1", "B": "", "C": "x=y"}
    assert plugin.parse_cni_args("") == {}
    for bad in ("A", "=1", "A=1;B"):
        with pytest.raises(PluginError) as info:
            plugin.parse_cni_args(bad)
        assert info.value.code == E.INVALID_ENVIRONMENT


def test_env_requirements_per_command() -> None:
    assert plugin.parse_env(env()).args["K8S_POD_NAME"] == "web"
    assert plugin.parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"
    plugin.parse_env(env("DEL", CNI_NETNS=None))  # DEL works without a netns
    for missing in ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH", "CNI_NETNS"):
        environ = env()
        del environ[missing]
        with pytest.raises(PluginError, match=missing) as info:
            plugin.parse_env(environ)
        assert info.value.code == E.INVALID_ENVIRONMENT
    with pytest.raises(PluginError) as info:
        plugin.parse_env(env("FROB"))
    assert info.value.code == E.INVALID_ENVIRONMENT


# ---------------------------------------------------------------- configuration


def test_config_defaults_and_validation(tmp_path: Path) -> None:
    parsed = plugin.parse_config(json.loads(conf(tmp_path, agentSocket=None, timeoutSeconds=None)))
    assert parsed.agent_socket == wire.DEFAULT_AGENT_SOCKET
    assert parsed.timeout == plugin.DEFAULT_TIMEOUT
    assert parsed.prev_result == PREV
    assert parsed.policy.never_captured("istio-system")
    custom = plugin.parse_config(
        json.loads(conf(tmp_path, meshNamespace="mesh", excludedNamespaces=["legacy"]))
    )
    assert custom.policy == Policy.build("mesh", ["legacy"])
    bad_values: list[dict[str, Any]] = [
        {"name": None},
        {"name": 3},
        {"cniVersion": None},
        {"agentSocket": "rel.sock"},
        {"timeoutSeconds": 0},
        {"timeoutSeconds": True},
        {"timeoutSeconds": 1000},
        {"excludedNamespaces": [1]},
        {"prevResult": []},
    ]
    for bad in bad_values:
        with pytest.raises(PluginError) as info:
            plugin.parse_config(json.loads(conf(tmp_path, **bad)))
        assert info.value.code == E.INVALID_CONFIG, bad


def test_pod_ips() -> None:
    assert plugin.pod_ips(PREV) == ("10.250.1.5",)
    assert plugin.pod_ips({}) == ()
    bad_results: list[dict[str, Any]] = [
        {"ips": {}},
        {"ips": [{"address": "10.0.0.1"}]},
        {"ips": ["x"]},
    ]
    for bad in bad_results:
        with pytest.raises(PluginError):
            plugin.pod_ips(bad)


# ----------------------------------------------------------------------- run()


def test_version_command() -> None:
    code, out = plugin.run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert code == 0
    assert json.loads(out) == {
        "cniVersion": "0.4.0",
        "supportedVersions": list(plugin.SUPPORTED_VERSIONS),
    }


def test_decode_and_version_errors(tmp_path: Path) -> None:
    assert error_of(plugin.run(env(), b"nope"))["code"] == E.DECODE_FAILURE
    assert error_of(plugin.run(env(), b"x" * (plugin.MAX_STDIN + 1)))["code"] == E.DECODE_FAILURE
    body = error_of(plugin.run(env(), conf(tmp_path, cniVersion="2.0.0")))
    assert body["code"] == E.INCOMPATIBLE_VERSION and body["cniVersion"] == "1.0.0"
    body = error_of(plugin.run(env(), conf(tmp_path, cniVersion="0.3.1", prevResult=None)))
    assert body["code"] == E.INVALID_CONFIG and body["cniVersion"] == "0.3.1"
    assert error_of(plugin.run(env("STATUS"), conf(tmp_path)))["code"] == E.INCOMPATIBLE_VERSION
    assert plugin.run(env("GC"), conf(tmp_path, cniVersion="1.1.0")) == (0, "")
    body = error_of(plugin.run(env("STATUS"), conf(tmp_path, cniVersion="1.1.0")))
    assert body["code"] == E.PLUGIN_NOT_AVAILABLE


def test_mesh_pod_fails_closed_without_agent(tmp_path: Path, registry: LabRegistry) -> None:
    add_pod(registry, "shop", "web", "u-1")
    body = error_of(plugin.run(env(), conf(tmp_path)))
    assert body["code"] == E.TRY_AGAIN_LATER
    assert "shop/web" in body["msg"] and "absent.sock" in body["details"]
    # unknown to the registry but in an ambient namespace: still fails closed
    other = env(CNI_ARGS="K8S_POD_NAMESPACE=shop;K8S_POD_NAME=new;K8S_POD_UID=u-9")
    assert error_of(plugin.run(other, conf(tmp_path)))["code"] == E.TRY_AGAIN_LATER
    # no registry configured, or not readable: cannot tell, so fail closed
    assert error_of(plugin.run(env(), conf(tmp_path, labRegistry=None)))["code"] == 11
    assert error_of(plugin.run(env(), conf(tmp_path, labRegistry="/nonexistent")))["code"] == 11


def test_pods_outside_the_mesh_pass_without_agent(tmp_path: Path, registry: LabRegistry) -> None:
    add_pod(registry, "shop", "legacy", "u-2", {"istio.io/dataplane-mode": "none"})
    add_pod(registry, "plain", "web", "u-3")
    cases = [
        "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=legacy;K8S_POD_UID=u-2",
        "K8S_POD_NAMESPACE=plain;K8S_POD_NAME=web;K8S_POD_UID=u-3",
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns",
        "K8S_POD_NAMESPACE=istio-system;K8S_POD_NAME=ztunnel",
        "",  # not a Kubernetes pod at all
    ]
    for args in cases:
        code, out = plugin.run(env(CNI_ARGS=args), conf(tmp_path))
        assert code == 0, (args, out)
        assert json.loads(out) == PREV
    assert plugin.run(env("DEL"), conf(tmp_path)) == (0, "")
    assert plugin.run(env("CHECK", CNI_ARGS=cases[1]), conf(tmp_path)) == (0, "")


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A scripted agent: answers each connection with the next canned reply."""
    path = str(tmp_path / "agent.sock")
    replies: list[bytes] = []
    requests: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                requests.append(conn.recv(65536))
                if replies:
                    conn.sendall(replies.pop(0))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield path, replies, requests
    finally:
        stop.set()
        server.close()
        thread.join(timeout=2)


def test_agent_verdicts(tmp_path: Path, registry: LabRegistry, fake_agent: Any) -> None:
    path, replies, requests = fake_agent
    add_pod(registry, "shop", "web", "u-1")
    ok = wire.encode_response(wire.AgentResponse(True, enrolled=True, reason="ambient"))
    replies.append(ok)
    assert plugin.run(env(), conf(tmp_path, agentSocket=path)) == (0, json.dumps(PREV))
    sent = wire.decode_request(requests[-1])
    assert sent.command == "ADD"
    assert sent.pod == wire.PodRef(
        "shop", "web", "u-1", "/run/netns/utc-none", "c0ffee", "eth0", ("10.250.1.5",)
    )
    replies.append(wire.encode_response(wire.AgentResponse(False, error="nft failed")))
    body = error_of(plugin.run(env(), conf(tmp_path, agentSocket=path)))
    assert body["code"] == E.TRY_AGAIN_LATER and body["details"] == "nft failed"
    replies.append(wire.encode_response(wire.AgentResponse(False, error="no", temporary=False)))
    assert error_of(plugin.run(env(), conf(tmp_path, agentSocket=path)))["code"] == 100
    replies.append(b"garbage\n")  # garbage from the agent is treated as no agent: fail closed
    assert error_of(plugin.run(env(), conf(tmp_path, agentSocket=path)))["code"] == 11
    # no reply at all (the agent closed): same
    assert error_of(plugin.run(env(), conf(tmp_path, agentSocket=path)))["code"] == 11


# ------------------------------------------------------------------------ wire


def test_wire_round_trip_and_rejects() -> None:
    request = wire.AgentRequest("ADD", wire.PodRef("ns", "p", "u", "/n", "c", "eth0", ("1.2.3.4",)))
    assert wire.decode_request(wire.encode_request(request)) == request
    for response in (
        wire.AgentResponse(True, enrolled=True, reason="r"),
        wire.AgentResponse(False, error="e", temporary=False),
    ):
        assert wire.decode_response(wire.encode_response(response)) == response
    bad_requests = [
        b"",
        b"[]",
        b'{"v": 2}',
        b'{"v": 1, "command": "RM", "pod": {}}',
        b'{"v": 1, "command": "ADD", "pod": []}',
        b'{"v": 1, "command": "ADD", "pod": {"namespace": "a"}}',
        b'{"v": 1, "command": "ADD", "pod": {"namespace": "a", "name": "b", "ips": [1]}}',
        b'{"v": 1, "command": "ADD", "pod": {"namespace": "a", "name": 3}}',
        b"{" + b" " * wire.MAX_MESSAGE + b"}",
    ]
    for data in bad_requests:
        with pytest.raises(WireError):
            wire.decode_request(data)
    for data in (b'{"v": 1}', b'{"v": 1, "ok": true}', b'{"v": 1, "ok": false, "error": ""}'):
        with pytest.raises(WireError):
            wire.decode_response(data)
