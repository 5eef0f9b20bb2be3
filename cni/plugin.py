"""``underpass-cni``: the thin chained CNI plugin (CNI spec 1.0.0; 1.1.0's STATUS and GC too).

This module owns the plugin's whole life: it runs once per pod operation,
called by the container runtime as the last plugin of the node's chain. It

* reads the environment (``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``,
  ``CNI_IFNAME``, ``CNI_ARGS``, ``CNI_PATH``) and the network configuration on
  stdin, and validates both (bad input: CNI error JSON, nothing changed);
* on ADD asks the node agent (JSON over its unix socket, with a timeout)
  to capture the pod, then prints ``prevResult`` back unchanged;
* fails closed: when the agent cannot be reached, or fails, and the pod must be
  in the mesh, ADD fails with code 11 ("try again later") or 100 (the agent
  refused); whether a pod must be in the mesh is then read from the lab
  registry (``labRegistry``) with the same rules the agent uses. Pods outside
  the mesh are never broken by a missing agent;
* DEL is idempotent and never fails because of the agent or a missing netns;
* a container whose ``CNI_ARGS`` name no Kubernetes pod (no ``K8S_POD_NAMESPACE``
  / ``K8S_POD_NAME``) and pods in never-captured namespaces pass through without
  asking the agent.

Versions: ADD/DEL for 0.3.0-1.1.0, CHECK from 0.4.0, STATUS (is the agent
reachable: code 50 when not) and GC (nothing to collect: the agent reconciles
from the registry) for 1.1.0.

Configuration keys (besides the standard ``cniVersion``, ``name``, ``type``,
``prevResult``): ``agentSocket`` (default ``/var/run/underpass/cni.sock``),
``labRegistry`` (lab state dir), ``timeoutSeconds`` (default 10),
``meshNamespace`` (default ``istio-system``), ``excludedNamespaces`` (list).

Start-up is kept light: only the stdlib and :mod:`cni`'s small modules are
imported; the lab registry only on the cold path.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni import errors as E
from cni import wire
from cni.enrolment import Decision, Policy
from cni.errors import AgentUnreachable, PluginError, SourceError, WireError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_VERSION = "1.0.0"
DEFAULT_TIMEOUT = 10.0
MAX_STDIN = 1024 * 1024
#: The agent gets this long at most on DEL (DEL never fails because of it).
DEL_TIMEOUT = 3.0
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True, slots=True)
class CniEnv:
    """The runtime's environment variables, validated for the command."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    path: str = ""


def parse_cni_args(raw: str) -> dict[str, str]:
    """``K=V;K=V`` -> dict (``CNI_ARGS``)."""
    out: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PluginError(E.INVALID_ENVIRONMENT, f"CNI_ARGS: invalid pair {pair!r}")
        out[key] = value
    return out


def parse_env(environ: Mapping[str, str]) -> CniEnv:
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise PluginError(
            E.INVALID_ENVIRONMENT,
            f"CNI_COMMAND must be one of {', '.join(COMMANDS)}",
            f"got {command!r}",
        )
    if command in ("VERSION", "STATUS", "GC"):
        return CniEnv(command, path=environ.get("CNI_PATH", ""))
    required = ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]
    if command in ("ADD", "CHECK"):
        required.append("CNI_NETNS")
    missing = [name for name in required if not environ.get(name)]
    if missing:
        raise PluginError(
            E.INVALID_ENVIRONMENT,
            f"required environment variables missing for {command}: {', '.join(missing)}",
        )
    return CniEnv(
        command=command,
        container_id=environ["CNI_CONTAINERID"],
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ["CNI_IFNAME"],
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=environ.get("CNI_PATH", ""),
    )


@dataclass(frozen=True, slots=True)
class NetConf:
    """The network configuration this plugin reads from stdin."""

    cni_version: str
    name: str
    agent_socket: str = wire.DEFAULT_AGENT_SOCKET
    lab_registry: str = ""
    timeout: float = DEFAULT_TIMEOUT
    policy: Policy = field(default_factory=Policy)
    prev_result: dict[str, Any] | None = None


def decode_stdin(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_STDIN:
        raise PluginError(E.DECODE_FAILURE, f"network configuration is over {MAX_STDIN} bytes")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PluginError(
            E.DECODE_FAILURE, "network configuration is not valid JSON", str(exc)
        ) from None
    if not isinstance(obj, dict):
        raise PluginError(E.DECODE_FAILURE, "network configuration is not a JSON object")
    return obj


def check_version(obj: Mapping[str, Any]) -> str:
    version = obj.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise PluginError(E.INVALID_CONFIG, "network configuration lacks a cniVersion string")
    if version not in SUPPORTED_VERSIONS:
        raise PluginError(
            E.INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version}",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def _opt_str(obj: Mapping[str, Any], key: str, default: str = "") -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise PluginError(E.INVALID_CONFIG, f"{key} must be a string")
    return value


def parse_config(obj: Mapping[str, Any]) -> NetConf:
    """Validate a decoded network configuration (after :func:`check_version`)."""
    version = check_version(obj)
    name = _opt_str(obj, "name")
    if not name:
        raise PluginError(E.INVALID_CONFIG, "network configuration lacks a name")
    agent_socket = _opt_str(obj, "agentSocket", wire.DEFAULT_AGENT_SOCKET)
    if not agent_socket.startswith("/"):
        raise PluginError(E.INVALID_CONFIG, "agentSocket must be an absolute path")
    lab_registry = _opt_str(obj, "labRegistry")
    timeout = obj.get("timeoutSeconds", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        raise PluginError(E.INVALID_CONFIG, "timeoutSeconds must be a number in (0, 300]")
    mesh_namespace = _opt_str(obj, "meshNamespace") or None
    excluded = obj.get("excludedNamespaces", [])
    if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
        raise PluginError(E.INVALID_CONFIG, "excludedNamespaces must be a list of strings")
    prev = obj.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise PluginError(E.INVALID_CONFIG, "prevResult must be an object")
    return NetConf(
        cni_version=version,
        name=name,
        agent_socket=agent_socket,
        lab_registry=lab_registry,
        timeout=float(timeout),
        policy=Policy.build(mesh_namespace, excluded),
        prev_result=prev,
    )


def pod_ips(prev_result: Mapping[str, Any]) -> tuple[str, ...]:
    """The pod's addresses (without prefix length) from a 0.3+ result."""
    ips = prev_result.get("ips", [])
    if not isinstance(ips, list):
        raise PluginError(E.INVALID_CONFIG, "prevResult.ips must be a list")
    out = []
    for entry in ips:
        address = entry.get("address") if isinstance(entry, dict) else None
        if not isinstance(address, str) or "/" not in address:
            raise PluginError(E.INVALID_CONFIG, f"prevResult.ips has a bad entry: {entry!r}")
        out.append(address.split("/", 1)[0])
    return tuple(out)


def pod_ref(env: CniEnv, prev_result: Mapping[str, Any] | None) -> wire.PodRef | None:
    """The pod the runtime is wiring, or None when CNI_ARGS names no Kubernetes pod."""
    namespace = env.args.get("K8S_POD_NAMESPACE", "")
    name = env.args.get("K8S_POD_NAME", "")
    if not namespace or not name:
        return None
    return wire.PodRef(
        namespace=namespace,
        name=name,
        uid=env.args.get("K8S_POD_UID", ""),
        netns=env.netns,
        container_id=env.container_id,
        ifname=env.ifname,
        ips=pod_ips(prev_result) if prev_result else (),
    )


def call_agent(path: str, request: wire.AgentRequest, timeout: float) -> wire.AgentResponse:
    """One request/response exchange with the node agent, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = wire.encode_request(request)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(data)
            buf = bytearray()
            while not buf.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > wire.MAX_MESSAGE:
                    raise WireError("the agent's answer is too large")
    except TimeoutError:
        raise AgentUnreachable(
            f"node agent at {path} did not answer within {timeout:g} s"
        ) from None
    except OSError as exc:
        raise AgentUnreachable(f"cannot reach the node agent at {path}: {exc}") from None
    if not buf:
        raise AgentUnreachable(f"node agent at {path} closed the connection without answering")
    return wire.decode_response(bytes(buf))


def registry_decision(conf: NetConf, pod: wire.PodRef) -> Decision:
    """Decide from the lab registry whether ``pod`` must be captured (the cold
    path, when the agent is unreachable). Raises SourceError when it cannot tell."""
    if not conf.lab_registry:
        raise SourceError("no labRegistry is configured to tell whether the pod is in the mesh")
    from cni.source import open_lab_registry, view_of

    try:
        view = view_of(open_lab_registry(conf.lab_registry).snapshot())
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot read the lab registry: {exc}") from None
    labels = view.namespaces.get(pod.namespace)
    if labels is None:
        raise SourceError(f"namespace {pod.namespace} is not in the lab registry")
    known = view.pods.get(pod.uid) if pod.uid else None
    known = known or view.pod_named(pod.namespace, pod.name)
    return conf.policy.decide(pod.namespace, labels, known.labels if known else None)


def _unreachable(conf: NetConf, pod: wire.PodRef, why: Exception) -> None:
    """The agent is unreachable or answered garbage: pass only pods outside the mesh."""
    try:
        decision = registry_decision(conf, pod)
    except SourceError as exc:
        raise PluginError(
            E.TRY_AGAIN_LATER,
            f"node agent unavailable and cannot tell whether pod {pod.namespace}/{pod.name} "
            "is in the mesh; refusing to start it uncaptured",
            f"{why}; {exc}",
        ) from None
    if decision.enrol:
        raise PluginError(
            E.TRY_AGAIN_LATER,
            f"node agent unavailable; pod {pod.namespace}/{pod.name} must be captured "
            f"({decision.reason}); start the agent (underpass cni-agent) and retry",
            str(why),
        )
    print(
        f"underpass-cni: agent unavailable, pod not in the mesh: {decision.reason}", file=sys.stderr
    )


def cmd_add(env: CniEnv, conf: NetConf) -> str:
    if conf.prev_result is None:
        raise PluginError(
            E.INVALID_CONFIG,
            "underpass-cni must be chained after an interface plugin (no prevResult)",
        )
    out = json.dumps(conf.prev_result)
    pod = pod_ref(env, conf.prev_result)
    if pod is None or conf.policy.never_captured(pod.namespace):
        return out
    try:
        answer = call_agent(conf.agent_socket, wire.AgentRequest("ADD", pod), conf.timeout)
    except (AgentUnreachable, WireError) as exc:
        _unreachable(conf, pod, exc)
        return out
    if not answer.ok:
        raise PluginError(
            E.TRY_AGAIN_LATER if answer.temporary else E.CAPTURE_FAILED,
            f"node agent could not capture pod {pod.namespace}/{pod.name}",
            answer.error,
        )
    return out


def cmd_check(env: CniEnv, conf: NetConf) -> str:
    if _version_tuple(conf.cni_version) < (0, 4, 0):
        raise PluginError(
            E.INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0+, not {conf.cni_version}"
        )
    if conf.prev_result is None:
        raise PluginError(E.INVALID_CONFIG, "CHECK needs prevResult")
    pod = pod_ref(env, conf.prev_result)
    if pod is None or conf.policy.never_captured(pod.namespace):
        return ""
    try:
        answer = call_agent(conf.agent_socket, wire.AgentRequest("CHECK", pod), conf.timeout)
    except (AgentUnreachable, WireError) as exc:
        _unreachable(conf, pod, exc)
        return ""
    if not answer.ok:
        raise PluginError(
            E.TRY_AGAIN_LATER if answer.temporary else E.CAPTURE_FAILED,
            f"pod {pod.namespace}/{pod.name} is not captured as it should be",
            answer.error,
        )
    return ""


def cmd_del(env: CniEnv, conf: NetConf) -> str:
    pod = pod_ref(env, None)
    if pod is None or conf.policy.never_captured(pod.namespace):
        return ""
    try:
        call_agent(conf.agent_socket, wire.AgentRequest("DEL", pod), min(conf.timeout, DEL_TIMEOUT))
    except (AgentUnreachable, WireError) as exc:
        # The agent forgets the pod from the registry when it is back; rules die with the netns.
        print(f"underpass-cni: DEL not delivered to the agent: {exc}", file=sys.stderr)
    return ""


def cmd_status(conf: NetConf) -> str:
    if _version_tuple(conf.cni_version) < (1, 1, 0):
        raise PluginError(
            E.INCOMPATIBLE_VERSION, f"STATUS needs cniVersion 1.1.0, not {conf.cni_version}"
        )
    probe = wire.AgentRequest("STATUS", wire.PodRef("", ""))
    try:
        answer = call_agent(conf.agent_socket, probe, conf.timeout)
    except (AgentUnreachable, WireError) as exc:
        raise PluginError(
            E.PLUGIN_NOT_AVAILABLE, "the node agent is not available", str(exc)
        ) from None
    if not answer.ok:
        raise PluginError(E.PLUGIN_NOT_AVAILABLE, "the node agent is not ready", answer.error)
    return ""


def cmd_version(stdin: bytes) -> str:
    version = DEFAULT_VERSION
    if stdin.strip():
        obj = decode_stdin(stdin)
        requested = obj.get("cniVersion")
        if isinstance(requested, str) and requested in SUPPORTED_VERSIONS:
            version = requested
    return json.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, str]:
    """Run one plugin invocation; return (exit code, stdout text). Never raises."""
    version = DEFAULT_VERSION
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            return 0, cmd_version(stdin)
        obj = decode_stdin(stdin)
        raw_version = obj.get("cniVersion")
        if isinstance(raw_version, str) and raw_version in SUPPORTED_VERSIONS:
            version = raw_version
        conf = parse_config(obj)
        if env.command == "ADD":
            return 0, cmd_add(env, conf)
        if env.command == "DEL":
            return 0, cmd_del(env, conf)
        if env.command == "CHECK":
            return 0, cmd_check(env, conf)
        if env.command == "STATUS":
            return 0, cmd_status(conf)
        if _version_tuple(conf.cni_version) < (1, 1, 0):  # GC
            raise PluginError(
                E.INCOMPATIBLE_VERSION, f"GC needs cniVersion 1.1.0, not {conf.cni_version}"
            )
        # GC: our state lives in pod netns (gone with them) and in the agent,
        # which reconciles against the registry by itself: nothing to collect.
        return 0, ""
    except PluginError as exc:
        return 1, json.dumps(exc.to_json(version))
    except Exception as exc:  # a bug: still answer in the CNI format, never a traceback
        return 1, json.dumps(
            PluginError(E.INTERNAL_ERROR, "underpass-cni internal error", repr(exc)).to_json(
                version
            )
        )


def main() -> None:
    stdin = sys.stdin.buffer.read(MAX_STDIN + 1)
    code, out = run(os.environ, stdin)
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
