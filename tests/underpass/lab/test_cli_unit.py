"""Unit tests of the lab's command-line pieces: tables, label syntax, exec, parsing."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from underpass.cli import lab as lab_cli
from underpass.cli import main as cli_main
from underpass.cli import table
from underpass.lab.cluster import lab_netns_names, parse_label_args, pod_netns_name
from underpass.lab.errors import InvalidObject, LabError
from underpass.lab.registry import LabConfig, LabRegistry, Node, Pod

pytestmark = pytest.mark.unit


def test_table_aligns_columns_like_istioctl() -> None:
    text = table.render(
        ["namespace", "pod name", "address"],
        [["default", "echo-1-1", "10.244.1.2"], ["kube-system", "x", None]],
    )
    assert text == (
        "NAMESPACE     POD NAME   ADDRESS\n"
        "default       echo-1-1   10.244.1.2\n"
        "kube-system   x          -\n"
    )
    assert table.render(["a", "enrolled"], []) == "A   ENROLLED\n"
    assert table.cell(True) == "yes" and table.cell(False) == "no"
    with pytest.raises(ValueError):
        table.render(["a"], [["1", "2"]])


def test_label_arguments_follow_kubectl() -> None:
    assert parse_label_args(["a=b", "c-", "example.com/d="]) == {
        "a": "b",
        "c": None,
        "example.com/d": "",
    }
    with pytest.raises(LabError):
        parse_label_args(["nonsense"])
    with pytest.raises(InvalidObject):
        parse_label_args(["bad key=1"])


def test_netns_names_are_unambiguous() -> None:
    assert pod_netns_name("t1", "default", "a.b") == "t1-pod-default.a.b"
    names = ["t1-fabric", "t1-node-1", "t1-pod-x.y", "t10-node-1", "other", "t1-nodeish"]
    assert lab_netns_names("t1", names) == ["t1-fabric", "t1-node-1", "t1-pod-x.y"]


def test_lab_is_a_registered_command() -> None:
    parser = cli_main.build_parser()
    args = parser.parse_args(["lab", "up", "--nodes", "3", "--namespaces", "a,b", "--json"])
    assert (args.nodes, args.namespaces, args.json) == (3, ("a", "b"), True)
    args = parser.parse_args(["lab", "label", "ns", "default", "k=v", "x-"])
    assert args.labels == ["k=v", "x-"]


@pytest.fixture
def fake_lab(tmp_path: Path) -> LabRegistry:
    reg = LabRegistry(tmp_path / "state")
    reg.initialize()
    pod_ns = tmp_path / "podns"
    node_ns = tmp_path / "nodens"
    pod_ns.touch()
    node_ns.touch()
    reg.write_config(
        LabConfig(
            "t",
            "172.30.0.0/24",
            "10.244.0.0/16",
            "10.96.0.0/16",
            "/run/netns/t-fabric",
            "172.30.0.1",
        )
    )
    reg.upsert_node(Node("node-1", "172.30.0.11", "10.244.1.0/24", str(node_ns)))
    reg.upsert_pod(
        Pod(
            "default",
            "echo",
            "u1",
            "node-1",
            "10.244.1.2",
            "default",
            netns=str(pod_ns),
            phase="Running",
        )
    )
    return reg


@pytest.mark.parametrize(
    ("argv", "where", "command"),
    [
        (["default/echo", "--", "ip", "addr"], "podns", ["ip", "addr"]),
        (["echo", "ip", "addr"], "podns", ["ip", "addr"]),
        (["--node", "node-1", "--", "ip", "route"], "nodens", ["ip", "route"]),
        (["--node", "node-1", "ip", "-br", "link"], "nodens", ["ip", "-br", "link"]),
        (["--fabric", "--", "ip", "link"], "/run/netns/t-fabric", ["ip", "link"]),
    ],
)
def test_exec_enters_the_right_netns(
    fake_lab: LabRegistry,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    where: str,
    command: list[str],
) -> None:
    seen: dict[str, Any] = {}

    def fake_exec(file: str, args: list[str], env: dict[str, str]) -> None:
        seen.update(file=file, args=args, env=env)

    monkeypatch.setattr(os, "execvpe", fake_exec)
    parser = cli_main.build_parser()
    args = parser.parse_args(["lab", "exec", "--state-dir", str(fake_lab.state_dir), *argv])
    args.func(args)
    path = where if where.startswith("/") else str(fake_lab.state_dir.parent / where)
    assert seen["args"] == ["nsenter", f"--net={path}", "--", *command]
    assert seen["env"]["UNDERPASS_LAB_STATE_DIR"] == str(fake_lab.state_dir)


def test_exec_unknown_pod_is_an_error(
    fake_lab: LabRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = cli_main.build_parser()
    args = parser.parse_args(
        ["lab", "exec", "--state-dir", str(fake_lab.state_dir), "default/nope", "true"]
    )
    assert args.func(args) == 1
    assert "pod default/nope not found" in capsys.readouterr().err


def test_app_subcommand_shares_the_sample_app_parser() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    lab_cli.register(sub)
    args = parser.parse_args(["lab", "app", "tcp", "10.0.0.1", "--sink", "64M"])
    assert (args.host, args.port, args.sink) == ("10.0.0.1", 9000, 64 * 1024 * 1024)


def test_mesh_is_on_unless_asked_off() -> None:
    parser = cli_main.build_parser()
    assert parser.parse_args(["lab", "up"]).mesh is None  # new lab: on; existing: unchanged
    assert parser.parse_args(["lab", "up", "--no-mesh"]).mesh is False
    assert parser.parse_args(["lab", "up", "--mesh"]).mesh is True


def test_leaf_error_unwraps_nurseries_and_prefers_ctrl_c() -> None:
    inner = LabError("agent failed")
    assert lab_cli.leaf_error(inner) is inner
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [inner])])
    assert lab_cli.leaf_error(nested) is inner
    ki = KeyboardInterrupt()
    assert lab_cli.leaf_error(BaseExceptionGroup("g", [inner, ki])) is ki


def _status(mesh: bool, agent: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "lab": {
            "prefix": "t",
            "state_dir": "/s",
            "underlay_cidr": "172.30.0.0/24",
            "fabric_ip": "172.30.0.1",
            "host_ip": None,
            "mesh": mesh,
        },
        "nodes": [
            {
                "name": "node-1",
                "underlay_ip": "172.30.0.11",
                "pod_cidr": "10.244.1.0/24",
                "pods": 0,
                "agent": agent,
                "ztunnel": agent,
                "netns": "/run/netns/t-node-1",
                "netns_present": True,
            }
        ],
        "namespaces": [],
        "pods": [],
        "services": [],
    }


def test_status_shows_each_node_agent_and_where_its_log_is() -> None:
    running = lab_cli.render_status(_status(True, {"running": True, "pid": 42}))
    assert "mesh on (logs: /s/logs/agent.NODE.log, ztunnel.NODE.log" in running
    assert "AGENT" in running and "ZTUNNEL" in running
    assert running.count("running (pid 42)") == 2
    dead = lab_cli.render_status(_status(True, {"running": False, "pid": None}))
    assert "NOT RUNNING" in dead
    off = lab_cli.render_status(_status(False, None))
    assert "mesh off" in off and "running" not in off


def test_agent_command_line_uses_the_node_paths(tmp_path: Path) -> None:
    from underpass.lab.agents import agent_argv
    from underpass.lab.registry import LabPaths

    paths = LabPaths(tmp_path)
    argv = agent_argv(paths, "node-2")
    assert argv[argv.index("--node") + 1] == "node-2"
    assert argv[argv.index("--cni-socket") + 1] == str(paths.agent_socket("node-2"))
    assert argv[argv.index("--zds-socket") + 1] == str(paths.zds_socket("node-2"))
    assert argv[argv.index("--lab-registry") + 1] == str(tmp_path)
    assert "--probe-snat" in argv and argv[argv.index("--ready-fd") + 1] == "3"
    args = cli_main.build_parser().parse_args(argv[argv.index("cni-agent") :])
    assert (args.ready_fd, args.probe_snat) == (3, True)
