"""``underpass demo``: the lab demo, what ``make demo`` runs (as root).

Steps, each announced with a numbered progress line:

1. a two-node lab of its own (a random prefix, its state under a temporary
   directory, so it never meets a lab of yours): two pods per node in
   namespace ``demo``, one pod in ``outside``, a node agent per node;
2. pod-to-pod traffic with the sample app across nodes and on one node: the
   server sees the client's real pod IP;
3. namespace ``demo`` labelled ``istio.io/dataplane-mode=ambient``: the node
   agents enrol its running pods live, no restart (the status table, the nft
   table inside a pod's netns, the annotation);
4. traffic through ztunnel: HBONE with mTLS between the pods' own identities,
   the server still seeing the client's IP; the access logs of both
   ztunnels, ``underpass zc workloads`` and ``certificates``, the metrics with
   both principals; a plaintext client outside the mesh still allowed
   (PERMISSIVE);
5. a DENY AuthorizationPolicy (written to the lab's policy directory, pushed
   by the control plane) refuses one client's connections at L4; removed,
   traffic flows again;
6. the label removed: rules gone, traffic flows again;
7. the CA started as a process, its callers taken from the lab registry;
8. a pod's certificate with its own token, then by its node agent's impersonation;
9. impersonation of a pod on another node refused; the CA's audit lines;
10. ``lab down``, and a check that nothing is left.

Every claim the demo prints is checked first; a failed check ends the demo
with exit status 1. Clean-up (CA stopped, ``lab down``, work directory
removed) runs on every exit path, Ctrl-C and SIGTERM included, and cannot
itself be interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from underpass.cli.demo_ca import (
    NODE_AGENT_NAMESPACE,
    TRUST_DOMAIN,
    CaProcess,
    DemoFailed,
    LabPod,
    issue,
    lab_callers,
    write_token_file,
)

TOTAL = 10
MODE_LABEL = "istio.io/dataplane-mode"
DEMO_NS = "demo"
OUTSIDE_NS = "outside"
OUTSIDE_POD = "legacy"
APP_PORT = 8080
PROBE_ADDRESS = "169.254.7.127"
ENROL_TIMEOUT = 30.0
CLIENT = f"{DEMO_NS}/echo-1-1"  # node-1
SERVER = f"{DEMO_NS}/echo-2-1"  # node-2
OUTSIDER = f"{OUTSIDE_NS}/{OUTSIDE_POD}"  # node-2
CNI_PLUGINS = ("loopback", "bridge", "host-local")
POLICY_TEMPLATE = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-echo-1-1
  namespace: {namespace}
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["{client_ip}/32"]
    to:
    - operation:
        ports: ["8080"]
"""


def _step(number: int, text: str) -> None:
    print(f"\n==> [{number}/{TOTAL}] {text}", flush=True)


def _info(text: str = "") -> None:
    print(f"    {text}".rstrip(), flush=True)


def _block(text: str, prefix: str = "    ") -> None:
    print(textwrap.indent(text.rstrip("\n"), prefix), flush=True)


def _preflight() -> None:
    """Fail early, with what to do, when the machine cannot run the lab."""
    if os.geteuid() != 0:
        raise DemoFailed(
            "the demo builds nodes and pods from network namespaces: run it as root "
            "(sudo make demo)"
        )
    missing = [t for t in ("nsenter", "nft", "ip") if shutil.which(t) is None]
    plugins = [f"/usr/lib/cni/{p}" for p in CNI_PLUGINS]
    missing += [p for p in plugins if not os.access(p, os.X_OK)]
    if missing:
        raise DemoFailed(
            f"missing {', '.join(missing)}: `make demo` installs them "
            "(apt-get install util-linux nftables iproute2 containernetworking-plugins)"
        )


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """SIGINT and SIGTERM interrupt the demo like Ctrl-C (inside trio too), so that
    the clean-up runs for them; also when started with SIGINT ignored (a
    background job of a non-interactive shell, nohup).

    (Children forked without exec, pyroute2's helpers, get the default handlers
    back: see :mod:`underpass.lab.netns`.)
    """

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        signal.raise_signal(signal.SIGINT)

    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up, so that clean-up finishes."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Demo:
    """One run of the demo; every resource it makes is released by :meth:`cleanup`."""

    def __init__(self, workdir: Path, *, color: bool) -> None:
        from underpass.lab import netns
        from underpass.lab.cluster import Lab

        self.workdir = workdir
        self.state_dir = workdir / "lab"
        while True:  # clean-up removes namespaces by prefix: never share one
            self.prefix = f"demo-{secrets.token_hex(3)}"
            if not any(n.startswith(f"{self.prefix}-") for n in netns.list_names()):
                break
        self.lab = Lab(self.state_dir)
        self.color = color
        self.lab_made = False
        self.ca: CaProcess | None = None
        self.callers: list[LabPod] = []

    # ------------------------------------------------------------------ helpers

    def pod(self, namespace: str, name: str) -> Any:
        pod = self.lab.registry.pod(namespace, name)
        if pod is None or pod.ip is None:
            raise DemoFailed(f"pod {namespace}/{name} is not running with an IP")
        return pod

    def node(self, name: str) -> Any:
        node = self.lab.registry.node(name)
        if node is None:
            raise DemoFailed(f"node {name} is not in the lab")
        return node

    def in_netns(self, netns_path: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        from underpass.lab.netns import argv_in

        return subprocess.run(
            argv_in(netns_path, argv), capture_output=True, text=True, timeout=60, check=False
        )

    def http(self, client: Any, server: Any) -> dict[str, Any]:
        """The sample app's HTTP client, run inside ``client``'s netns (a pod or a
        node), against ``server``'s echo server; its JSON once checked."""
        url = f"http://{server.ip}:{APP_PORT}/demo"
        argv = [sys.executable, "-m", "underpass.lab.sampleapp", "http", url]
        proc = self.in_netns(client.netns, argv)
        try:
            doc: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise DemoFailed(f"sample app client printed no JSON: {proc.stderr[-300:]}") from None
        want = f"{server.namespace}/{server.name}"
        if proc.returncode != 0 or doc.get("status") != 200 or doc.get("pod") != want:
            raise DemoFailed(f"{url} from {client.name}: expected HTTP 200 from {want}, got {doc}")
        return doc

    def ruleset(self, pod: Any) -> str:
        proc = self.in_netns(pod.netns, ["nft", "list", "ruleset"])
        if proc.returncode != 0:
            raise DemoFailed(f"nft list ruleset in {pod.name}: {proc.stderr.strip()}")
        return proc.stdout

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.lab.status()
        return status

    def app_pids(self) -> dict[str, int]:
        from underpass.lab import procs

        records = procs.read_records(self.lab.paths.procs_dir)
        return {r.key: r.pid for r in records if r.key.startswith("app.") and procs.is_alive(r)}

    def until_enrolled(self, pods: list[Any], enrolled: bool) -> float:
        """Wait for the agents (on registry events) to (un)annotate every pod; seconds."""
        import trio

        keys = [p.key for p in pods]

        async def wait() -> None:
            with trio.fail_after(ENROL_TIMEOUT):
                await self.lab.registry.until(
                    lambda s: all(k in s.pods and s.pods[k].enrolled is enrolled for k in keys)
                )

        started = time.perf_counter()
        try:
            trio.run(wait)
        except trio.TooSlowError:
            raise DemoFailed(
                f"the node agents did not {'enrol' if enrolled else 'release'} the pods within "
                f"{ENROL_TIMEOUT:.0f} s (their logs: {self.state_dir}/logs/agent.*.log)"
            ) from None
        return time.perf_counter() - started

    # -------------------------------------------------------------------- steps

    def bring_up(self) -> None:
        import trio

        from underpass.cli.lab import render_status
        from underpass.lab.cluster import PodSpec, UpOptions

        _step(1, "A two-node lab: nodes and pods are network namespaces, wired by the real CNI")
        _info("chain (loopback, bridge + host-local, underpass-cni), a node agent in every node")
        _info(f"$ underpass lab up --nodes 2 --pods-per-node 2 --namespaces {DEMO_NS} ...")
        _info(f"  (prefix {self.prefix}, state in {self.state_dir}: a lab of its own)")
        self.lab_made = True  # from here on, clean-up runs `lab down`
        options = UpOptions(
            nodes=2,
            pods_per_node=2,
            namespaces=(DEMO_NS,),
            service_accounts=("echo",),
            prefix=self.prefix,
        )
        report = trio.run(self.lab.up, options)
        _info(f"$ underpass lab add-pod {OUTSIDE_NS}/{OUTSIDE_POD} --node node-2 ...")
        spec = PodSpec(OUTSIDE_NS, OUTSIDE_POD, "node-2", OUTSIDE_POD, {"app": "echo"})
        extra = trio.run(self.lab.add_pod, spec)
        status = self.status()
        pods = status["pods"]
        if len(pods) != 5 or any(p["phase"] != "Running" or not p["ip"] for p in pods):
            raise DemoFailed(f"expected 5 running pods with IPs, got {pods}")
        if not all(n["agent"] and n["agent"]["running"] for n in status["nodes"]):
            raise DemoFailed(f"a node agent is not running: {status['nodes']}")
        print()
        _block(render_status(status, services=False))
        adds = [p["cni_add_ms"] for p in report["pods"]] + [extra.cni_add_ms]
        mean = sum(adds) / len(adds)
        _info()
        _info(f"lab up in {report['seconds']:.1f} s; CNI ADD per pod {mean:.0f} ms on average")
        _info("(loopback, then bridge + host-local + underpass-cni, asking the node's agent)")

    def traffic(self, pairs: list[tuple[str, str, str]]) -> None:
        """HTTP from each (client, server) pod, checking the server saw the client's IP."""
        for client, server, where in pairs:
            src, dst = self.pod(*client.split("/")), self.pod(*server.split("/"))
            doc = self.http(src, dst)
            if doc["client_ip"] != src.ip:
                raise DemoFailed(f"{server} saw {doc['client_ip']}, not {client}'s {src.ip}")
            _info(f"{client} ({src.ip}) -> {server} ({dst.ip}){where}: HTTP 200,")
            _info(f"  the server saw the client as {doc['client_ip']}: the client's own pod IP")

    def enrol(self) -> None:
        from underpass.cli.lab import render_pods
        from underpass.lab.registry import REDIRECTION_ANNOTATION

        _step(3, f"Label namespace {DEMO_NS} {MODE_LABEL}=ambient: its running pods join the mesh")
        demo_pods = [p for p in self.lab.registry.pods() if p.namespace == DEMO_NS]
        apps = self.app_pids()
        _info(f"$ underpass lab label namespace {DEMO_NS} {MODE_LABEL}=ambient")
        self.lab.label("namespace", DEMO_NS, [f"{MODE_LABEL}=ambient"])
        seconds = self.until_enrolled(demo_pods, True)
        if self.app_pids() != apps:
            raise DemoFailed("a pod's app process changed while the pods were enrolled")
        _info(f"the node agents enrolled the {len(demo_pods)} running pods in {seconds:.2f} s,")
        _info("live: the same app processes and network namespaces, no restart")
        print()
        _block(render_pods(self.status()))
        pod = self.pod(DEMO_NS, "echo-1-1")
        rules = self.ruleset(pod)
        for needle in ("table inet underpass", "redirect to :15001", "redirect to :15006"):
            if needle not in rules:
                raise DemoFailed(f"{needle!r} missing from the ruleset in {pod.name}:\n{rules}")
        _info()
        _info(f"annotation on {DEMO_NS}/{pod.name}, set by its node agent:")
        _info(f"  {REDIRECTION_ANNOTATION}: {pod.annotations[REDIRECTION_ANNOTATION]}")
        _info(f"nft list ruleset, run inside {DEMO_NS}/{pod.name}'s network namespace:")
        print(textwrap.indent(rules.rstrip("\n"), "    | ", lambda _line: True), flush=True)
        outsider = self.pod(OUTSIDE_NS, OUTSIDE_POD)
        if outsider.enrolled or "underpass" in self.ruleset(outsider):
            raise DemoFailed(f"{OUTSIDE_NS}/{OUTSIDE_POD} was captured")
        _info(f"{OUTSIDE_NS}/{OUTSIDE_POD} (namespace not labelled): not enrolled, no rules")

    def admin(self, node: Any, path: str) -> str:
        """GET ``path`` from the node's ztunnel admin endpoint (its own 127.0.0.1:15000)."""
        proc = self.in_netns(
            node.netns, ["curl", "-sS", "-m", "5", f"http://127.0.0.1:15000{path}"]
        )
        if proc.returncode != 0:
            raise DemoFailed(f"ztunnel admin on {node.name} did not answer: {proc.stderr}")
        return proc.stdout

    def zc(self, node: Any, view: str) -> str:
        proc = self.in_netns(node.netns, [sys.executable, "-m", "underpass.cli.main", "zc", view])
        if proc.returncode != 0:
            raise DemoFailed(f"underpass zc {view} failed on {node.name}: {proc.stderr}")
        return proc.stdout

    def until_state(self, node: Any, what: str, check: Any) -> float:
        """Wait (bounded) until the node's ztunnel state satisfies ``check``; seconds taken."""
        started = time.perf_counter()
        while True:
            dump = json.loads(self.admin(node, "/config_dump"))
            if check(dump):
                return time.perf_counter() - started
            if time.perf_counter() - started > ENROL_TIMEOUT:
                raise DemoFailed(f"{node.name}'s ztunnel never had {what}")
            time.sleep(0.1)

    def access_log(self, node: Any, src_ip: str) -> dict[str, Any]:
        """The newest access-log line of the node's ztunnel for a client IP."""
        path = self.lab.paths.logs_dir / f"ztunnel.{node.name}.log"
        found: dict[str, Any] | None = None
        for line in path.read_text().splitlines():
            if '"connection complete"' in line:
                entry: dict[str, Any] = json.loads(line)
                if entry["src_addr"].startswith(f"{src_ip}:"):
                    found = entry
        if found is None:
            raise DemoFailed(f"no access-log line from {src_ip} in {path}")
        return found

    def through_ztunnel(self) -> None:
        _step(4, "Pods talk through ztunnel: HBONE with mTLS, each pod with its own identity")
        client, server = self.pod(*CLIENT.split("/")), self.pod(*SERVER.split("/"))
        node1, node2 = self.node(client.node), self.node(server.node)
        for each in (node1, node2):
            self.until_state(
                each,
                "the enrolled pods",
                lambda d: (
                    len(d["pods"]) == 2
                    and all(
                        w["tunnel_protocol"] == "HBONE"
                        for w in d["workloads"]
                        if w["namespace"] == DEMO_NS
                    )
                ),
            )
        self.traffic([(CLIENT, SERVER, ", across nodes, through both ztunnels")])
        out = self.access_log(node1, client.ip)
        inn = self.access_log(node2, client.ip)
        if out["protocol"] != "HBONE" or inn["protocol"] != "HBONE":
            raise DemoFailed(f"the connection did not go over HBONE: {out} / {inn}")
        _info(f"access log of ztunnel on {node1.name} (outbound):")
        _info(f"  {out['src_identity']} -> {out['dst_identity']}, {out['protocol']},")
        _info(f"  {out['bytes_recv']} bytes sent by the client, {out['bytes_sent']} back")
        _info(f"access log of ztunnel on {node2.name} (inbound, mTLS peer verified):")
        _info(f"  {inn['src_identity']} -> {inn['dst_addr']} ({inn['dst_workload']})")
        print()
        _info(f"$ underpass zc workloads   (ztunnel on {node1.name})")
        _block(self.zc(node1, "workloads"))
        _info(f"$ underpass zc certificates   (ztunnel on {node1.name}: one per service account)")
        _block(self.zc(node1, "certificates"))
        metrics = self.in_netns(
            node2.netns, ["curl", "-sS", "-m", "5", "http://127.0.0.1:15020/metrics"]
        ).stdout
        opened = [
            line
            for line in metrics.splitlines()
            if line.startswith("istio_tcp_connections_opened_total{")
            and 'connection_security_policy="mutual_tls"' in line
        ]
        if not opened:
            raise DemoFailed(f"no mutual_tls connection in {node2.name}'s metrics")
        _info(f"metrics of ztunnel on {node2.name} (:15020/metrics), labels abridged:")
        for line in opened[:2]:
            labels = dict(
                item.split("=", 1)
                for item in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            keep = ("reporter", "source_principal", "destination_principal")
            shown = ",".join(f"{k}={labels[k]}" for k in keep if k in labels)
            _info(f"  istio_tcp_connections_opened_total{{{shown}}} {line.rsplit(' ', 1)[1]}")
        self.traffic([(OUTSIDER, CLIENT, ", a plaintext client outside the mesh (PERMISSIVE)")])
        plain = self.access_log(node1, self.pod(*OUTSIDER.split("/")).ip)
        if plain["protocol"] != "TCP" or plain["src_identity"] is not None:
            raise DemoFailed(f"the outsider's connection was not plaintext inbound: {plain}")
        _info(f"  ztunnel on {node1.name} took it on 15006 (no identity) and allowed it")
        doc = self.http(node1, client)
        if doc["client_ip"] != PROBE_ADDRESS:
            raise DemoFailed(f"a probe from {node1.name} arrived from {doc['client_ip']}")
        _info(f"{node1.name} -> {CLIENT}:{APP_PORT}, as a kubelet probe: HTTP 200; the server saw")
        _info(f"  {PROBE_ADDRESS}: the agent SNATs the node's own traffic to captured pods to")
        _info("  that address, which the pod's rules let through without ztunnel")

    def deny_policy(self) -> None:
        _step(5, "An AuthorizationPolicy denies, enforced by ztunnel at L4; then removed")
        server = self.pod(*SERVER.split("/"))
        node2 = self.node(server.node)
        policy_dir = self.state_dir / "policies"
        policy_dir.mkdir(exist_ok=True)
        path = policy_dir / "deny-echo-1-1.yaml"
        client = self.pod(*CLIENT.split("/"))
        text = POLICY_TEMPLATE.format(namespace=DEMO_NS, client_ip=client.ip)
        path.write_text(text)
        _info(f"$ cat {path}")
        print(textwrap.indent(text.rstrip("\n"), "    | ", lambda _line: True), flush=True)
        seconds = self.until_state(
            node2,
            "the policy",
            lambda d: any(p["name"] == "deny-echo-1-1" for p in d["policies"]),
        )
        _info(f"the control plane pushed it to ztunnel on {node2.name} in {seconds:.2f} s")
        src, dst = client, server
        proc = self.in_netns(
            src.netns,
            [
                sys.executable,
                "-m",
                "underpass.lab.sampleapp",
                "http",
                f"http://{dst.ip}:{APP_PORT}/demo",
                "--timeout",
                "5",
            ],
        )
        if proc.returncode == 0:
            raise DemoFailed(f"{CLIENT} -> {SERVER} still worked under the deny policy")
        _info(f"{CLIENT} -> {SERVER}: refused (the connection is reset)")
        log_path = self.lab.paths.logs_dir / f"ztunnel.{node2.name}.log"
        denied = [
            json.loads(line)
            for line in log_path.read_text().splitlines()
            if '"connection denied by policy"' in line
        ]
        if not denied:
            raise DemoFailed(f"no denial in {log_path}")
        last = denied[-1]
        _info(f"  ztunnel on {node2.name}: denied by {last['policy']}: {last['reason']}")
        self.traffic([(f"{DEMO_NS}/echo-1-2", SERVER, ", another pod: still allowed")])
        path.unlink()
        self.until_state(
            node2,
            "the policy removed",
            lambda d: not any(p["name"] == "deny-echo-1-1" for p in d["policies"]),
        )
        _info(f"$ rm {path}")
        self.traffic([(CLIENT, SERVER, ", allowed again")])

    def release(self) -> None:
        from underpass.cli.lab import render_pods
        from underpass.lab.registry import REDIRECTION_ANNOTATION

        _step(6, "Remove the label: the pods leave the mesh, traffic flows again")
        demo_pods = [p for p in self.lab.registry.pods() if p.namespace == DEMO_NS]
        _info(f"$ underpass lab label namespace {DEMO_NS} {MODE_LABEL}-")
        self.lab.label("namespace", DEMO_NS, [f"{MODE_LABEL}-"])
        seconds = self.until_enrolled(demo_pods, False)
        _info(f"the node agents released the {len(demo_pods)} pods in {seconds:.2f} s")
        print()
        _block(render_pods(self.status()))
        pod = self.pod(DEMO_NS, "echo-1-1")
        if REDIRECTION_ANNOTATION in pod.annotations:
            raise DemoFailed(f"{pod.name} still has {REDIRECTION_ANNOTATION}")
        for each in demo_pods:
            if "underpass" in self.ruleset(each):
                raise DemoFailed(f"rules left in {each.name}:\n{self.ruleset(each)}")
        rules = self.ruleset(pod)
        _info()
        _info(f"annotation {REDIRECTION_ANNOTATION} on {DEMO_NS}/{pod.name}: removed")
        _info(f"nft list ruleset inside {DEMO_NS}/{pod.name}: {rules.strip() or '(empty)'}")
        self.traffic([(CLIENT, SERVER, ""), (OUTSIDER, CLIENT, "")])

    def start_ca(self) -> tuple[str, bytes]:
        _step(7, "The CA, its callers taken from the lab registry")
        self.callers = lab_callers(self.lab.registry.snapshot())
        tokens = self.workdir / "lab-tokens.yaml"
        write_token_file(tokens, self.callers)
        _info(f"lab token file {tokens} (mode 0600): a random token, never")
        _info("printed, for every pod in the lab registry and every node's agent:")
        width = max(len(f"{c.namespace}/{c.pod}") for c in self.callers)
        for c in self.callers:
            _info(
                f"  {c.namespace + '/' + c.pod:<{width}}   service account "
                f"{c.service_account:<8} on {c.node}"
            )
        _info("$ underpass ca serve --listen 127.0.0.1:0 --auth lab --lab-tokens ... &")
        self.ca = CaProcess(self.workdir, tokens)
        ready = self.ca.wait_ready()
        address, root_path = ready["address"], Path(ready["root_cert"])
        _info(f"CA process {self.ca.proc.pid} serving on {address} (TLS)")
        _info(f"root certificate {root_path}")
        return address, root_path.read_bytes()

    def caller(self, namespace: str, pod: str) -> LabPod:
        found = next((c for c in self.callers if c.namespace == namespace and c.pod == pod), None)
        if found is None:
            raise DemoFailed(f"no caller {namespace}/{pod} in the token file")
        return found

    def certificates(self, address: str, root_pem: bytes) -> None:
        from identity.spiffe import SpiffeId
        from underpass.cli.ca import describe_certificate

        pod = self.caller(DEMO_NS, "echo-1-1")
        agent = self.caller(NODE_AGENT_NAMESPACE, f"ztunnel-{pod.node}")
        identity = SpiffeId(TRUST_DOMAIN, pod.namespace, pod.service_account)
        _step(8, f"Pod {pod.namespace}/{pod.pod} asks for its identity, then its node agent does")
        chain = issue(address, root_pem, pod.token, identity)
        _info(f"with the pod's own token: granted {identity.uri}:")
        _block(describe_certificate(chain, color=self.color), "      ")
        chain = issue(address, root_pem, agent.token, identity, impersonate=identity)
        _info(f"ztunnel on {agent.node}, by impersonation ({pod.pod} runs on {pod.node}):")
        _info(f"granted {identity.uri}:")
        _block(describe_certificate(chain, color=self.color), "      ")

    def refusal(self, address: str, root_pem: bytes) -> None:
        from identity.errors import AuthenticationFailed
        from identity.spiffe import SpiffeId

        target = self.caller(OUTSIDE_NS, OUTSIDE_POD)
        agent = self.caller(NODE_AGENT_NAMESPACE, "ztunnel-node-1")
        if target.node == agent.node:
            raise DemoFailed("the outside pod must run on another node for this step")
        other = SpiffeId(TRUST_DOMAIN, target.namespace, target.service_account)
        _step(9, f"ztunnel on {agent.node} asks for {other.uri}")
        _info(f"(its only pod, {target.namespace}/{target.pod}, runs on {target.node})")
        try:
            issue(address, root_pem, agent.token, other, impersonate=other)
        except AuthenticationFailed as exc:
            _info("refused, as it must be: UNAUTHENTICATED")
            _info(f"the CA says: {exc}")
        else:
            raise DemoFailed(f"the CA granted {other.uri} to a node agent on another node")
        assert self.ca is not None
        code = self.ca.stop()
        audit = self.ca.audit()
        self.ca = None
        if code != 0:
            raise DemoFailed(f"the CA exited with code {code} on SIGTERM")
        _info(f"the CA's audit log: {len(audit)} certificates issued")
        for event in audit:
            _info(
                f"  {event['identity']} serial {event['serial'][:16]}... to {event['caller']} "
                f"(pod {event['caller_pod']} on {event['node']})"
            )
        _info("CA stopped cleanly")

    def tear_down(self) -> None:
        import trio

        from underpass.lab.cluster import leftovers

        _step(10, "Tear down")
        _info("$ underpass lab down")
        report = trio.run(self.lab.down, self.prefix)
        self.lab_made = False
        _info(
            f"removed {len(report['netns'])} network namespaces, {report['pods']} pods (CNI "
            f"DEL), {report['processes']} processes in {report['seconds']:.1f} s"
        )
        left = leftovers(self.prefix, self.state_dir)
        if left:
            raise DemoFailed(f"lab down left things behind: {left}")
        shutil.rmtree(self.workdir)
        if self.workdir.exists():
            raise DemoFailed(f"{self.workdir} is still there")
        _info(f"nothing left: no network namespace {self.prefix}-*, no lab process (node")
        _info("agents, sample apps, CA), no socket, no state or work directory")

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        self.bring_up()
        _step(2, "Pod-to-pod traffic with the sample app (an HTTP echo server in every pod)")
        self.traffic(
            [
                (CLIENT, SERVER, ", across nodes"),
                (CLIENT, f"{DEMO_NS}/echo-1-2", ", on one node"),
                (OUTSIDER, CLIENT, ", across nodes"),
            ]
        )
        self.enrol()
        self.through_ztunnel()
        self.deny_policy()
        self.release()
        address, root_pem = self.start_ca()
        self.certificates(address, root_pem)
        self.refusal(address, root_pem)
        self.tear_down()

    def cleanup(self, keep: bool) -> None:
        """Release whatever is still held; safe to call after any step."""
        import trio

        with _uninterruptible():
            if self.ca is not None:
                self.ca.stop()
                self.ca = None
            logs = self.lab.paths.logs_dir
            if keep and logs.is_dir():  # lab down removes them with the state directory
                shutil.copytree(logs, self.workdir / "lab-logs", dirs_exist_ok=True)
            if self.lab_made:
                try:
                    trio.run(self.lab.down, self.prefix)
                    self.lab_made = False
                except Exception as exc:
                    print(
                        f"clean-up failed: {exc}\nremove the lab with: underpass lab down "
                        f"--state-dir {self.state_dir} --prefix {self.prefix}",
                        file=sys.stderr,
                    )
            if keep and self.workdir.exists():
                print(f"(kept {self.workdir})", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def run_demo(keep: bool = False) -> int:
    from identity.errors import IdentityError
    from underpass.cli.lab import leaf_error
    from underpass.lab.errors import LabError

    started = time.perf_counter()
    try:
        _preflight()
    except DemoFailed as failed:
        print(f"demo cannot run: {failed}", file=sys.stderr)
        return 1
    demo = Demo(Path(tempfile.mkdtemp(prefix="underpass-demo-")), color=sys.stdout.isatty())
    print(f"Underpass demo (work directory {demo.workdir})", flush=True)
    try:
        demo.run()
        print(f"\nDemo complete in {time.perf_counter() - started:.1f} s.", flush=True)
        return 0
    except BaseException as raised:  # trio nurseries wrap errors in groups: unwrap
        error = leaf_error(raised)
        if isinstance(error, KeyboardInterrupt):
            print("\ninterrupted: cleaning up (stopping the CA, lab down)", file=sys.stderr)
            return 130
        expected = (DemoFailed, LabError, IdentityError, OSError, subprocess.SubprocessError)
        if not isinstance(error, expected):
            raise
        print(f"\ndemo failed: {type(error).__name__}: {error}", file=sys.stderr)
        if demo.ca is not None:
            print("last lines of the CA's log:", file=sys.stderr)
            for line in demo.ca.tail():
                print(f"    | {line}", file=sys.stderr)
        return 1
    finally:
        demo.cleanup(keep)


def _run(args: argparse.Namespace) -> int:
    from underpass import log

    if not args.verbose:
        log.configure("warning", args.log_format)  # progress lines only, unless asked
    with _sigterm_as_sigint():
        return run_demo(keep=args.keep)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run the demo (root): a two-node lab, pods joining the mesh live, identities",
        description="Bring up a two-node lab of its own, show pod-to-pod traffic, enrol a "
        "namespace in the mesh and release it again (no pod restarts), issue SPIFFE "
        "certificates to the lab's pods from the CA (own token, node-agent impersonation, "
        "a refusal), then tear everything down. Needs root; cleans up on every exit path.",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory (CA state and log, token file, the lab's logs in "
        "lab-logs/); the lab itself is always removed",
    )
    p.add_argument("--verbose", action="store_true", help="also show info-level logs")
    p.set_defaults(func=_run)
