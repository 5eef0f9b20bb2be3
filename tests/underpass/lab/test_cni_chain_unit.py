"""Unit tests of the CNI chain builder and runner (fake plugins, no root needed)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from underpass.lab import cni_runner
from underpass.lab.cni_runner import (
    LOOPBACK_CONFLIST,
    CniRunner,
    Sandbox,
    build_conflist,
    cni_args,
    cni_env,
    cni_path,
    plugin_config,
    pod_ip,
)
from underpass.lab.errors import CniError

pytestmark = pytest.mark.unit

SANDBOX = Sandbox("web", "api-1", "8c1e6a4e-0000-4000-8000-000000000001", "ab" * 32, "/run/netns/t")

# A fake plugin: records what the runtime gave it, answers like a CNI 1.0 plugin.
FAKE = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
name = os.path.basename(sys.argv[0])
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({{"plugin": name, "env": env, "conf": conf}}) + "\\n")
if os.environ.get("FAKE_FAIL") == name:
    print(json.dumps({{"cniVersion": "1.0.0", "code": 7, "msg": "bad config", "details": "x"}}))
    sys.exit(1)
if env["CNI_COMMAND"] == "DEL":
    sys.exit(0)
prev = conf.get("prevResult")
if prev is not None:
    result = dict(prev)
    result.setdefault("seen_by", []).append(name)
else:
    result = {{"cniVersion": "1.0.0",
              "interfaces": [{{"name": "cni0"}}, {{"name": "eth0", "sandbox": env["CNI_NETNS"]}}],
              "ips": [{{"interface": 1, "address": "10.244.1.7/24", "gateway": "10.244.1.1"}}]}}
print(json.dumps(result))
"""


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bridge", "underpass-cni", "loopback"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    return bin_dir


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_default_chain_is_bridge_with_host_local(tmp_path: Path) -> None:
    conf = build_conflist(pod_cidr="10.244.3.0/24", ipam_dir=tmp_path / "ipam")
    assert conf["cniVersion"] == "1.0.0" and conf["name"] == "underpass-lab"
    (bridge,) = conf["plugins"]
    assert bridge["type"] == "bridge" and bridge["bridge"] == "cni0"
    assert bridge["isGateway"] is True and bridge["ipMasq"] is False
    assert bridge["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.3.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(tmp_path / "ipam"),
    }


def test_underpass_cni_is_chained_behind_an_option(tmp_path: Path) -> None:
    conf = build_conflist(
        pod_cidr="10.244.1.0/24",
        ipam_dir=tmp_path,
        underpass_cni=True,
        agent_socket=Path("/run/lab/nodes/node-1/agent.sock"),
        lab_registry=Path("/run/lab"),
    )
    assert [p["type"] for p in conf["plugins"]] == ["bridge", "underpass-cni"]
    assert conf["plugins"][1] == {
        "type": "underpass-cni",
        "agentSocket": "/run/lab/nodes/node-1/agent.sock",
        "labRegistry": "/run/lab",
    }
    with pytest.raises(ValueError):
        build_conflist(pod_cidr="10.244.1.0/24", ipam_dir=tmp_path, underpass_cni=True)


def test_cni_args_and_env_as_a_runtime_passes_them() -> None:
    args = cni_args(SANDBOX)
    assert args.split(";") == [
        "IgnoreUnknown=1",
        "K8S_POD_NAMESPACE=web",
        "K8S_POD_NAME=api-1",
        f"K8S_POD_INFRA_CONTAINER_ID={'ab' * 32}",
        "K8S_POD_UID=8c1e6a4e-0000-4000-8000-000000000001",
    ]
    env = cni_env("ADD", SANDBOX, "eth0", "/usr/lib/cni:/venv/bin", base={"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "ab" * 32,
        "CNI_NETNS": "/run/netns/t",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": args,
        "CNI_PATH": "/usr/lib/cni:/venv/bin",
    }


def test_cni_path_puts_underpass_cni_after_the_standard_plugins() -> None:
    assert cni_path(Path("/usr/lib/cni")) == "/usr/lib/cni"
    assert (
        cni_path(Path("/usr/lib/cni"), Path("/work/.venv/bin/underpass-cni"))
        == "/usr/lib/cni:/work/.venv/bin"
    )


def test_plugin_config_injects_name_version_and_prev_result() -> None:
    plugin: dict[str, Any] = {"type": "a", "x": 1}
    conflist: dict[str, Any] = {"cniVersion": "1.0.0", "name": "net", "plugins": [plugin]}
    first = plugin_config(conflist, plugin, None)
    assert first == {"type": "a", "x": 1, "cniVersion": "1.0.0", "name": "net"}
    later = plugin_config(conflist, {"type": "b"}, {"ips": []})
    assert later["prevResult"] == {"ips": []}


def test_pod_ip_from_result() -> None:
    result = {
        "interfaces": [{"name": "cni0"}, {"name": "vethx"}, {"name": "eth0", "sandbox": "/x"}],
        "ips": [{"interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
    }
    assert pod_ip(result) == "10.244.1.2"
    assert pod_ip({"ips": []}) is None
    assert (
        pod_ip(
            {"interfaces": [{"name": "lo"}], "ips": [{"interface": 0, "address": "127.0.0.1/8"}]}
        )
        is None
    )


async def test_runner_chains_prev_result_caches_and_deletes_in_reverse(
    tmp_path: Path, fake_bin: Path
) -> None:
    runner = CniRunner(host_netns=None, cni_path=str(fake_bin), cache_dir=tmp_path / "cache")
    conflist = build_conflist(
        pod_cidr="10.244.1.0/24",
        ipam_dir=tmp_path / "ipam",
        underpass_cni=True,
        agent_socket=tmp_path / "agent.sock",
        lab_registry=tmp_path,
    )
    await runner.add(LOOPBACK_CONFLIST, SANDBOX, "lo")
    result = await runner.add(conflist, SANDBOX, "eth0")
    assert result["seen_by"] == ["underpass-cni"]  # the chained plugin got bridge's result
    assert pod_ip(result) == "10.244.1.7"
    log = calls(tmp_path)
    assert [(c["plugin"], c["env"]["CNI_IFNAME"]) for c in log] == [
        ("loopback", "lo"),
        ("bridge", "eth0"),
        ("underpass-cni", "eth0"),
    ]
    for call in log:
        assert call["env"]["CNI_COMMAND"] == "ADD"
        assert call["env"]["CNI_CONTAINERID"] == SANDBOX.container_id
        assert call["env"]["CNI_NETNS"] == SANDBOX.netns
        assert call["env"]["CNI_PATH"] == str(fake_bin)
        assert call["env"]["CNI_ARGS"] == cni_args(SANDBOX)
        assert call["conf"]["cniVersion"] == "1.0.0"
    assert "prevResult" not in log[0]["conf"] and "prevResult" not in log[1]["conf"]
    assert log[1]["conf"]["name"] == "underpass-lab"
    assert log[2]["conf"]["prevResult"]["ips"][0]["address"] == "10.244.1.7/24"
    assert log[2]["conf"]["agentSocket"] == str(tmp_path / "agent.sock")

    cache = cni_runner.cache_file(tmp_path / "cache", "underpass-lab", SANDBOX.container_id, "eth0")
    cached = json.loads(cache.read_text())
    assert cached["kind"] == "cniCacheV1" and cached["result"] == result
    conf, cached_result = runner.read_cache("underpass-lab", SANDBOX, "eth0")
    assert conf == conflist and cached_result == result

    (tmp_path / "calls.jsonl").unlink()
    # the node's config changed since: DEL still tears down what ADD set up
    await runner.delete(
        build_conflist(pod_cidr="10.244.1.0/24", ipam_dir=tmp_path), SANDBOX, "eth0"
    )
    log = calls(tmp_path)
    assert [c["plugin"] for c in log] == ["underpass-cni", "bridge"]
    assert all(c["env"]["CNI_COMMAND"] == "DEL" for c in log)
    assert all(c["conf"]["prevResult"] == result for c in log)
    assert not cache.exists()


async def test_del_without_cache_uses_current_config(tmp_path: Path, fake_bin: Path) -> None:
    runner = CniRunner(host_netns=None, cni_path=str(fake_bin), cache_dir=tmp_path / "cache")
    await runner.delete(
        build_conflist(pod_cidr="10.244.1.0/24", ipam_dir=tmp_path), SANDBOX, "eth0"
    )
    (call,) = calls(tmp_path)
    assert call["plugin"] == "bridge" and "prevResult" not in call["conf"]


async def test_plugin_error_document_becomes_cni_error(
    tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "bridge")
    runner = CniRunner(host_netns=None, cni_path=str(fake_bin), cache_dir=tmp_path / "cache")
    conflist = build_conflist(pod_cidr="10.244.1.0/24", ipam_dir=tmp_path)
    with pytest.raises(CniError) as info:
        await runner.add(conflist, SANDBOX, "eth0")
    assert (info.value.plugin, info.value.command, info.value.code) == ("bridge", "ADD", 7)
    assert info.value.msg == "bad config" and info.value.details == "x"
    assert not (tmp_path / "cache").exists()  # nothing cached for a failed ADD


async def test_missing_plugin_is_a_clear_error(tmp_path: Path) -> None:
    runner = CniRunner(host_netns=None, cni_path=str(tmp_path), cache_dir=tmp_path)
    with pytest.raises(CniError, match="not found in CNI_PATH"):
        await runner.add(LOOPBACK_CONFLIST, SANDBOX, "lo")


def test_find_underpass_cni_prefers_the_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exe = tmp_path / "underpass-cni"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert cni_runner.find_underpass_cni() == exe
    exe.chmod(0o644)
    monkeypatch.setenv("PATH", os.defpath)
    assert cni_runner.find_underpass_cni() != exe  # not executable: not used


def test_status_env_names_no_container() -> None:
    env = cni_runner.cni_env("STATUS", None, "", "/usr/lib/cni", base={})
    assert env == {"CNI_COMMAND": "STATUS", "CNI_PATH": "/usr/lib/cni"}
