"""The lab's container runtime side of CNI (spec 1.0.0).

Owns the node's network configuration list (the chain builder) and running it
exactly as a CNI 1.0 runtime (containerd through libcni) does:

- a pod gets the loopback network first (``cni-loopback``, ``CNI_IFNAME=lo``),
  then the node's conflist (``CNI_IFNAME=eth0``): ``bridge`` (isGateway) with
  ``host-local`` IPAM, then optionally ``underpass-cni``;
- each plugin is an executable found in ``CNI_PATH``, run in the node's netns
  with ``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``,
  ``CNI_ARGS`` and ``CNI_PATH`` added to the environment, and its network config
  on stdin: the plugin entry plus the list's ``name`` and ``cniVersion`` and,
  for every plugin after the first, the previous plugin's result as ``prevResult``;
- the final ADD result is cached (as libcni caches in /var/lib/cni/results), and
  DEL runs the plugins in reverse order, each given the cached result as
  ``prevResult``; DEL succeeds when the netns is already gone;
- failures are the spec's error document (``code``, ``msg``, ``details``),
  raised as :class:`~underpass.lab.errors.CniError`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import trio

from underpass.lab import netns
from underpass.lab.errors import CniError
from underpass.lab.registry import write_json_atomic

CNI_VERSION: Final = "1.0.0"
NETWORK_NAME: Final = "underpass-lab"
BRIDGE_NAME: Final = "cni0"
DEFAULT_CNI_BIN_DIR: Final = Path("/usr/lib/cni")
UNDERPASS_CNI: Final = "underpass-cni"
PLUGIN_ENV: Final = "UNDERPASS_CNI_PLUGIN"
LOOPBACK_CONFLIST: Final[Mapping[str, Any]] = {
    "cniVersion": CNI_VERSION,
    "name": "cni-loopback",
    "plugins": [{"type": "loopback"}],
}

log = structlog.get_logger("underpass.lab.cni")


# --------------------------------------------------------------------------- chain builder


def find_underpass_cni() -> Path | None:
    """The ``underpass-cni`` executable.

    ``$UNDERPASS_CNI_PLUGIN`` (a path to a file named ``underpass-cni``: a
    development build, or a test double) wins; then the one beside this Python
    (the venv's console script); then PATH.
    """
    override = os.environ.get(PLUGIN_ENV)
    if override:
        path = Path(override)
        if path.name != UNDERPASS_CNI or not os.access(path, os.X_OK):
            raise CniError(
                UNDERPASS_CNI,
                "FIND",
                5,
                f"${PLUGIN_ENV}={override} must be an executable file named {UNDERPASS_CNI} "
                "(CNI finds plugins by their type name)",
            )
        return path
    beside = Path(sys.executable).parent / UNDERPASS_CNI
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(UNDERPASS_CNI)
    return Path(found) if found else None


def cni_path(bin_dir: Path = DEFAULT_CNI_BIN_DIR, underpass_cni: Path | None = None) -> str:
    """``CNI_PATH``: the standard plugins, then the directory of ``underpass-cni``."""
    dirs = [str(bin_dir)]
    if underpass_cni is not None and str(underpass_cni.parent) not in dirs:
        dirs.append(str(underpass_cni.parent))
    return os.pathsep.join(dirs)


def build_conflist(
    *,
    pod_cidr: str,
    ipam_dir: Path,
    underpass_cni: bool = False,
    agent_socket: Path | None = None,
    lab_registry: Path | None = None,
) -> dict[str, Any]:
    """The node's network configuration list (what /etc/cni/net.d would hold)."""
    plugins: list[dict[str, Any]] = [
        {
            "type": "bridge",
            "bridge": BRIDGE_NAME,
            "isGateway": True,
            "ipMasq": False,  # keep pod source addresses (no SNAT between pods)
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": pod_cidr}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(ipam_dir),
            },
        }
    ]
    if underpass_cni:
        if agent_socket is None or lab_registry is None:
            raise ValueError("underpass-cni needs agent_socket and lab_registry")
        plugins.append(
            {
                "type": UNDERPASS_CNI,
                "agentSocket": str(agent_socket),
                "labRegistry": str(lab_registry),
            }
        )
    return {"cniVersion": CNI_VERSION, "name": NETWORK_NAME, "plugins": plugins}


@dataclass(frozen=True)
class Sandbox:
    """What a runtime knows about the pod sandbox it wires."""

    namespace: str
    name: str
    uid: str
    container_id: str
    netns: str  # path


def cni_args(sandbox: Sandbox) -> str:
    """``CNI_ARGS`` as the kubelet's runtimes pass it."""
    return ";".join(
        [
            "IgnoreUnknown=1",
            f"K8S_POD_NAMESPACE={sandbox.namespace}",
            f"K8S_POD_NAME={sandbox.name}",
            f"K8S_POD_INFRA_CONTAINER_ID={sandbox.container_id}",
            f"K8S_POD_UID={sandbox.uid}",
        ]
    )


def cni_env(
    command: str,
    sandbox: Sandbox | None,
    ifname: str,
    path: str,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The plugin's environment: the runtime's own plus the CNI_* variables
    (``sandbox`` None: a command about no container, such as STATUS)."""
    env = dict(os.environ if base is None else base)
    env.update(CNI_COMMAND=command, CNI_PATH=path)
    if sandbox is not None:
        env.update(
            CNI_CONTAINERID=sandbox.container_id,
            CNI_NETNS=sandbox.netns,
            CNI_IFNAME=ifname,
            CNI_ARGS=cni_args(sandbox),
        )
    return env


def plugin_config(
    conflist: Mapping[str, Any], plugin: Mapping[str, Any], prev_result: Mapping[str, Any] | None
) -> dict[str, Any]:
    """One plugin's stdin: its entry plus the list's name/cniVersion (+ prevResult)."""
    conf = dict(plugin)
    conf["cniVersion"] = conflist["cniVersion"]
    conf["name"] = conflist["name"]
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    return conf


def cache_file(cache_dir: Path, network: str, container_id: str, ifname: str) -> Path:
    return cache_dir / "results" / f"{network}-{container_id}-{ifname}"


# --------------------------------------------------------------------------- runner


@dataclass
class CniRunner:
    """Runs conflists for sandboxes of one node.

    ``host_netns``: the node's netns name (plugins run there, as on a real node);
    None runs them in the current netns (tests with fake plugins).
    """

    host_netns: str | None
    cni_path: str
    cache_dir: Path
    timeout: float = 30.0

    def find_plugin(self, plugin_type: str) -> Path:
        for directory in self.cni_path.split(os.pathsep):
            candidate = Path(directory) / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise CniError(
            plugin_type,
            "FIND",
            5,
            f"plugin executable {plugin_type!r} not found in CNI_PATH {self.cni_path}",
        )

    async def exec_plugin(
        self,
        command: str,
        sandbox: Sandbox | None,
        ifname: str,
        config: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        """Run one plugin once; its parsed result (None when it printed nothing)."""
        plugin_type = str(config["type"])
        exe = self.find_plugin(plugin_type)
        argv = [str(exe)]
        if self.host_netns is not None:
            argv = netns.argv_in(netns.path_of(self.host_netns), argv)
        stdin = json.dumps(config).encode()
        started = time.perf_counter()
        try:
            with trio.fail_after(self.timeout):
                proc = await trio.run_process(
                    argv,
                    stdin=stdin,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=cni_env(command, sandbox, ifname, self.cni_path),
                )
        except trio.TooSlowError:
            raise CniError(plugin_type, command, 11, f"timed out after {self.timeout}s") from None
        elapsed_ms = (time.perf_counter() - started) * 1000
        out = proc.stdout.decode(errors="replace").strip()
        err = proc.stderr.decode(errors="replace")
        log.debug(
            "cni.exec",
            plugin=plugin_type,
            command=command,
            pod=f"{sandbox.namespace}/{sandbox.name}" if sandbox else None,
            ifname=ifname,
            rc=proc.returncode,
            ms=round(elapsed_ms, 1),
        )
        doc: Any = None
        if out:
            try:
                doc = json.loads(out)
            except json.JSONDecodeError:
                raise CniError(
                    plugin_type,
                    command,
                    999 if proc.returncode else 6,
                    f"plugin printed non-JSON output: {out[:200]!r}",
                    stderr=err,
                ) from None
        if proc.returncode != 0:
            if isinstance(doc, dict) and "code" in doc:
                error = CniError.from_output(plugin_type, command, doc)
                error.stderr = err
                raise error
            raise CniError(plugin_type, command, 999, f"exit status {proc.returncode}", stderr=err)
        if doc is not None and not isinstance(doc, dict):
            raise CniError(plugin_type, command, 6, "plugin result is not a JSON object")
        return doc

    async def add(
        self, conflist: Mapping[str, Any], sandbox: Sandbox, ifname: str
    ) -> dict[str, Any]:
        """ADD the whole list; returns (and caches) the final result."""
        prev: dict[str, Any] | None = None
        for plugin in conflist["plugins"]:
            result = await self.exec_plugin(
                "ADD", sandbox, ifname, plugin_config(conflist, plugin, prev)
            )
            if result is None:
                raise CniError(str(plugin["type"]), "ADD", 6, "plugin printed no result")
            prev = result
        if prev is None:
            raise CniError("-", "ADD", 7, f"network {conflist['name']!r} has no plugins")
        self._write_cache(conflist, sandbox, ifname, prev)
        return prev

    async def delete(self, conflist: Mapping[str, Any], sandbox: Sandbox, ifname: str) -> None:
        """DEL the list in reverse order with the cached result; drop the cache.

        The conflist the ADD used (kept in the cache) wins over ``conflist``, so
        what was set up is what is torn down even if the node's config changed.
        """
        cached_conf, cached_result = self.read_cache(str(conflist["name"]), sandbox, ifname)
        used = cached_conf if cached_conf is not None else conflist
        for plugin in reversed(list(used["plugins"])):
            await self.exec_plugin(
                "DEL", sandbox, ifname, plugin_config(used, plugin, cached_result)
            )
        with contextlib.suppress(FileNotFoundError):
            cache_file(self.cache_dir, str(used["name"]), sandbox.container_id, ifname).unlink()

    async def status(self, conflist: Mapping[str, Any], plugin_type: str) -> None:
        """CNI 1.1 STATUS of the chain's ``plugin_type`` plugin: returns when the
        plugin says it is ready for ADDs, raises :class:`CniError` otherwise.

        The node's conflist is 1.0.0 and the standard plugins predate STATUS, so
        the lab asks only the one plugin that answers it (``underpass-cni``,
        which asks its node agent), at cniVersion 1.1.0.
        """
        plugin = next((p for p in conflist["plugins"] if p.get("type") == plugin_type), None)
        if plugin is None:
            raise CniError(plugin_type, "STATUS", 7, f"not in network {conflist['name']!r}")
        config = plugin_config({**conflist, "cniVersion": "1.1.0"}, plugin, None)
        await self.exec_plugin("STATUS", None, "", config)

    def _write_cache(
        self,
        conflist: Mapping[str, Any],
        sandbox: Sandbox,
        ifname: str,
        result: Mapping[str, Any],
    ) -> None:
        path = cache_file(self.cache_dir, str(conflist["name"]), sandbox.container_id, ifname)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            path,
            {
                "kind": "cniCacheV1",
                "containerId": sandbox.container_id,
                "config": base64.b64encode(json.dumps(conflist).encode()).decode(),
                "ifName": ifname,
                "networkName": conflist["name"],
                "cniArgs": [kv.split("=", 1) for kv in cni_args(sandbox).split(";")],
                "result": dict(result),
            },
        )

    def read_cache(
        self, network: str, sandbox: Sandbox, ifname: str
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(conflist, result) cached by ADD, or (None, None)."""
        path = cache_file(self.cache_dir, network, sandbox.container_id, ifname)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            conf = json.loads(base64.b64decode(doc["config"]))
            result = doc["result"]
        except FileNotFoundError:
            return None, None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("cni.cache.corrupt", path=str(path), error=str(exc))
            return None, None
        if not isinstance(conf, dict) or not isinstance(result, dict):
            return None, None
        return conf, result


def pod_ip(result: Mapping[str, Any], ifname: str = "eth0") -> str | None:
    """The IPv4 address a CNI result gives the sandbox's ``ifname`` (without prefix)."""
    interfaces = result.get("interfaces") or []
    for ip in result.get("ips") or []:
        index = ip.get("interface")
        if (
            isinstance(index, int)
            and 0 <= index < len(interfaces)
            and interfaces[index].get("name") != ifname
        ):
            continue
        address = str(ip.get("address", ""))
        if "." in address:
            return address.split("/", 1)[0]
    return None
