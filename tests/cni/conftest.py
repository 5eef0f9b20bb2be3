"""Fixtures for the cni tests: a node made of a network namespace, pods wired by
the real CNI chain (loopback + bridge/host-local + underpass-cni) run exactly as a
container runtime runs it, a lab registry in a temporary directory, and the node
agent running in the test's trio loop. Sockets inside pods come from
:mod:`underpass.lab.sockets` (re-exported here for the test modules).

Every name created here starts with ``utc`` plus a random suffix; addresses are
in 10.250.0.0/16 and exist only inside namespaces created here. Everything is
torn down at the end of each test, on failure too; a set-up failure fails the
test loudly (never a skip).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from cni.agent import Agent, AgentConfig
from cni.zds_server import ZdsSettings
from underpass.lab.registry import LabRegistry, Namespace, Pod
from underpass.lab.sockets import (
    ZTUNNEL_MARK,
    accept_one,
    closing_all,
    connect_from,
    listener_in,
    original_dst,
)

CNI_BIN = "/usr/lib/cni"
PLUGIN = shutil.which("underpass-cni", path=os.path.dirname(sys.executable))
NETNS_DIR = "/run/netns"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def in_netns(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net={netns}", "--", *args, check=check)


@dataclass
class CniRun:
    """One plugin invocation: exit code, stdout (parsed when JSON), stderr."""

    plugin: str
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


@dataclass
class PodNs:
    """A pod: its netns, its registry record, the cached CNI result."""

    namespace: str
    name: str
    netns_name: str
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    container_id: str = field(default_factory=lambda: secrets.token_hex(16))
    result: dict[str, Any] | None = None

    @property
    def netns(self) -> str:
        return f"{NETNS_DIR}/{self.netns_name}"

    @property
    def ip(self) -> str:
        assert self.result is not None, "pod has no CNI result yet"
        return str(self.result["ips"][0]["address"].split("/")[0])

    @property
    def cni_args(self) -> str:
        return (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};"
            f"K8S_POD_NAME={self.name};K8S_POD_UID={self.uid}"
        )


class NodeLab:
    """One node netns with a bridge, its pods, a registry and the agent's sockets."""

    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.prefix = f"utc{self.suffix}"
        self.node = "node-1"
        self.node_netns_name = f"{self.prefix}-node"
        self.node_netns = f"{NETNS_DIR}/{self.node_netns_name}"
        self.bridge = f"{self.prefix}br"
        self.subnet_octet = secrets.randbelow(250) + 1
        self.subnet = f"10.250.{self.subnet_octet}.0/24"
        self.dir = Path(tempfile.mkdtemp(prefix="utc", dir="/tmp"))
        self.state = self.dir / "lab"
        self.agent_socket = str(self.dir / "agent.sock")
        self.zds_socket = str(self.dir / "zds.sock")
        self.registry = LabRegistry(self.state)
        self.pods: list[PodNs] = []
        self.netns_names: list[str] = []

    # ---- set-up / tear-down

    def up(self) -> None:
        assert PLUGIN is not None, "underpass-cni is not installed (pip install -e .)"
        self.registry.initialize()
        self._add_netns(self.node_netns_name)
        in_netns(self.node_netns, "ip", "link", "set", "lo", "up")

    def _add_netns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.netns_names.append(name)

    def down(self) -> None:
        errors = []
        for name in reversed(self.netns_names):
            proc = sh("ip", "netns", "del", name, check=False)
            if proc.returncode != 0 and os.path.exists(f"{NETNS_DIR}/{name}"):
                errors.append(proc.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not errors, errors
        left = [n for n in os.listdir(NETNS_DIR) if n.startswith(self.prefix)]
        assert not left, f"netns left behind: {left}"

    # ---- registry

    def namespace(self, name: str, ambient: bool) -> None:
        labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
        self.registry.upsert_namespace(Namespace(name, labels))

    def label_namespace(self, name: str, ambient: bool) -> None:
        value = "ambient" if ambient else None
        self.registry.set_namespace_labels(name, {"istio.io/dataplane-mode": value})

    def pod(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str] | None = None,
        register: bool = True,
    ) -> PodNs:
        pod = PodNs(namespace, name, f"{self.prefix}-{name}")
        self._add_netns(pod.netns_name)
        self.pods.append(pod)
        if register:
            self.registry.upsert_pod(
                Pod(
                    namespace=namespace,
                    name=name,
                    uid=pod.uid,
                    node=self.node,
                    ip=None,
                    service_account=f"{name}-sa",
                    labels=dict(labels or {}),
                    netns=pod.netns,
                    container_id=pod.container_id,
                    phase="Pending",
                )
            )
        return pod

    def registry_pod(self, pod: PodNs) -> Pod:
        found = self.registry.pod(pod.namespace, pod.name)
        assert found is not None
        return found

    # ---- the CNI chain, run as a runtime runs it

    def chain(self) -> list[dict[str, Any]]:
        return [
            {"type": "loopback"},
            {
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "subnet": self.subnet,
                    "dataDir": str(self.dir / "ipam"),
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            self.underpass_conf(),
        ]

    def underpass_conf(self, **extra: Any) -> dict[str, Any]:
        return {
            "type": "underpass-cni",
            "agentSocket": self.agent_socket,
            "labRegistry": str(self.state),
            "timeoutSeconds": 10,
            **extra,
        }

    def env(self, command: str, pod: PodNs | None, **overrides: str | None) -> dict[str, str]:
        assert PLUGIN is not None
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_PATH": f"{CNI_BIN}:{os.path.dirname(PLUGIN)}",
        }
        if pod is not None:
            env.update(
                CNI_CONTAINERID=pod.container_id,
                CNI_NETNS=pod.netns,
                CNI_IFNAME="eth0",
                CNI_ARGS=pod.cni_args,
            )
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    async def invoke(
        self,
        plugin: dict[str, Any] | None,
        env: Mapping[str, str],
        stdin: bytes | None = None,
        prev: dict[str, Any] | None = None,
        version: str = "1.0.0",
    ) -> CniRun:
        """Run one plugin binary in the node netns with env + stdin, as libcni does."""
        assert plugin is not None or stdin is not None
        if stdin is None:
            assert plugin is not None
            conf = {"cniVersion": version, "name": f"{self.prefix}net", **plugin}
            if prev is not None:
                conf["prevResult"] = prev
            stdin = json.dumps(conf).encode()
        kind = plugin["type"] if plugin else "underpass-cni"
        binary = PLUGIN if kind == "underpass-cni" else f"{CNI_BIN}/{kind}"
        assert binary is not None
        proc = await trio.run_process(
            ["nsenter", f"--net={self.node_netns}", "--", binary],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=dict(env),
        )
        return CniRun(kind, proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    async def add(self, pod: PodNs, *, expect_ok: bool = True) -> list[CniRun]:
        """ADD through the chain; records the final result on ``pod``; marks it Running."""
        prev: dict[str, Any] | None = None
        runs = []
        for plugin in self.chain():
            run = await self.invoke(plugin, self.env("ADD", pod), prev=prev)
            runs.append(run)
            if run.rc != 0:
                if expect_ok:
                    raise AssertionError(f"{run.plugin} ADD failed: {run.stdout} {run.stderr}")
                return runs
            prev = run.json
        pod.result = prev
        if self.registry.pod(pod.namespace, pod.name) is not None:
            self.registry.set_pod_status(pod.namespace, pod.name, phase="Running", ip=pod.ip)
        return runs

    async def check(self, pod: PodNs) -> list[CniRun]:
        return [
            await self.invoke(plugin, self.env("CHECK", pod), prev=pod.result)
            for plugin in self.chain()
        ]

    async def delete(self, pod: PodNs, **overrides: str | None) -> list[CniRun]:
        return [
            await self.invoke(plugin, self.env("DEL", pod, **overrides), prev=pod.result)
            for plugin in reversed(self.chain())
        ]

    # ---- agent

    def agent(self, probe_snat: bool = True) -> Agent:
        config = AgentConfig(
            node=self.node,
            cni_socket=self.agent_socket,
            zds_socket=self.zds_socket,
            zds=ZdsSettings(hello_timeout=5.0, ack_timeout=5.0),
            probe_snat=probe_snat,
            node_netns=self.node_netns,
        )
        return Agent(config, self.registry)

    def our_table(self, pod: PodNs) -> str:
        """Every nftables rule in the pod's netns that is ours ("" when none)."""
        out = in_netns(pod.netns, "nft", "list", "ruleset").stdout
        return out if "underpass" in out else ""


@pytest.fixture
def lab() -> Iterator[NodeLab]:
    node = NodeLab()
    try:
        node.up()
        yield node
    finally:
        node.down()


@dataclass
class RunningAgent:
    agent: Agent
    scope: trio.CancelScope
    done: trio.Event

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def start_agent(nursery: trio.Nursery, agent: Agent) -> RunningAgent:
    """Start ``agent`` in ``nursery``; ``stop()`` ends it (as a crash or SIGTERM would)."""
    done = trio.Event()
    scope = trio.CancelScope()

    async def body(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await agent.run(task_status=task_status)
        finally:
            done.set()

    await nursery.start(body)
    return RunningAgent(agent, scope, done)


@pytest.fixture
async def running_agent(lab: NodeLab, nursery: trio.Nursery) -> AsyncIterator[RunningAgent]:
    handle = await start_agent(nursery, lab.agent())
    try:
        yield handle
    finally:
        await handle.stop()


async def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a registry or ruleset read) until true, or fail."""
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await trio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


__all__ = [
    "ZTUNNEL_MARK",
    "CniRun",
    "NodeLab",
    "PodNs",
    "RunningAgent",
    "accept_one",
    "closing_all",
    "connect_from",
    "in_netns",
    "listener_in",
    "original_dst",
    "start_agent",
    "wait_for",
]
