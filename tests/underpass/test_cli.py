"""The ``underpass`` command: help, version, ``ca --help`` (unit) and the demo end to
end, as ``make demo`` runs it (netns: root)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from tests.underpass.lab.labkit import require_root
from underpass import __version__
from underpass.cli.main import main
from underpass.lab.cluster import leftovers
from underpass.lab.procs import processes_mentioning


def run_cli(argv: list[str]) -> int:
    """``main()`` in process. It configures logging for a whole process (bound to the
    current, captured stderr), so that is undone before anything else logs."""
    saved = structlog.get_config()
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        return main(argv)
    finally:
        structlog.configure(**saved)
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


REPO = Path(__file__).resolve().parents[2]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = run_cli(argv)
    except SystemExit as exc:  # argparse's --help
        code = int(exc.code or 0)
    return code, capsys.readouterr().out


@pytest.mark.unit
def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["--help"], capsys)
    assert code == 0
    for command in ("version", "ca", "demo"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), out


@pytest.mark.unit
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["version"], capsys)
    assert (code, out.strip()) == (0, f"underpass {__version__}")


@pytest.mark.unit
def test_ca_help_explains_how_to_run_the_ca(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["ca", "--help"], capsys)
    assert code == 0
    for needle in (
        "serve",
        "request",
        "/var/lib/underpass/ca",
        "--plugged-certs",
        "15012",
        "--auth",
        "--lab-tokens",
        "kubernetes",
        "istio-system/ztunnel",
        "chmod 600",
    ):
        assert needle in out, needle


@pytest.mark.unit
def test_ca_serve_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["ca", "serve", "--help"], capsys)
    assert code == 0
    for option in (
        "--state-dir",
        "--plugged-certs",
        "--trust-domain",
        "--listen",
        "--serving-dns",
        "--serving-ip",
        "--auth",
        "--lab-tokens",
        "--trusted-node-agent",
        "--metrics-port",
        "--cluster-id",
    ):
        assert option in out, option


@pytest.mark.unit
def test_ca_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["ca"], capsys)
    assert code == 2 and "serve" in out


def start_demo() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "underpass.cli.main", "demo"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ctrl-C is sent to the group
    )


def found(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match is not None, f"{pattern!r} not in:\n{text}"
    return match.group(1)


def assert_nothing_left(out: str) -> None:
    """No netns, process, socket or file of the demo's lab, CA or work directory."""
    workdir = Path(found(r"work directory (/\S+)\)", out))
    prefix = found(r"\(prefix (demo-[0-9a-f]+),", out)
    left = leftovers(prefix, workdir / "lab")
    if left:  # force it clean, then fail loudly
        subprocess.run(
            [sys.executable, "-m", "underpass.cli.main", "lab", "down", "--prefix", prefix,
             "--state-dir", str(workdir / "lab")],
            check=False,
        )  # fmt: skip
    assert left == []
    assert not workdir.exists()
    assert not [pid for pid in processes_mentioning(str(workdir)) if pid != os.getpid()]


@pytest.mark.netns
def test_demo_end_to_end() -> None:
    """``underpass demo`` as ``make demo`` runs it: a two-node lab, live enrolment and
    release, traffic through ztunnel with mTLS and a deny policy, the CA fed from the lab;
    then nothing left."""
    require_root()
    proc = start_demo()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    for step in range(1, 11):
        assert f"==> [{step}/10]" in out
    assert re.search(r"NODE .* AGENT .*\n.*node-1 .* running \(pid \d+\)", out)
    # (b) the server saw the client's pod IP, across nodes and on one node
    client_ip = found(r"demo/echo-1-1 \((10\.244\.1\.\d+)\) -> demo/echo-2-1", out)
    assert out.count(f"the server saw the client as {client_ip}: the client's own pod IP") >= 3
    assert ", on one node: HTTP 200," in out
    # (c) enrolled live: the annotation and our table inside the pod's netns
    assert "the node agents enrolled the 4 running pods in" in out
    assert "ambient.istio.io/redirection: enabled" in out
    assert "    | table inet underpass {" in out and "redirect to :15001" in out
    assert re.search(r"demo +echo-2-2 +node-2 .* Running +yes", out)
    assert re.search(r"outside +legacy +node-2 .* Running +no", out)
    assert ", across nodes, through both ztunnels: HTTP 200," in out
    assert (
        "spiffe://cluster.local/ns/demo/sa/echo -> spiffe://cluster.local/ns/demo/sa/echo, HBONE"
        in out
    )
    assert re.search(r"demo +echo-2-1 +10\.244\.2\.\d+ +node-2 +- +HBONE", out)
    assert re.search(r"spiffe://cluster.local/ns/demo/sa/echo +Leaf +SCHEDULED +yes", out)
    assert 'reporter="destination",source_principal="spiffe://cluster.local/ns/demo/sa/echo"' in out
    assert "took it on 15006 (no identity) and allowed it" in out
    assert "demo/echo-1-1 -> demo/echo-2-1: refused (the connection is reset)" in out
    assert "denied by demo/deny-echo-1-1" in out
    assert ", allowed again: HTTP 200," in out
    assert "169.254.7.127: the agent SNATs the node's own traffic" in out
    # (d) released: rules gone, traffic again
    assert "the node agents released the 4 pods in" in out
    assert "nft list ruleset inside demo/echo-1-1: (empty)" in out
    # (e) identities from the lab registry
    assert out.count("URI spiffe://cluster.local/ns/demo/sa/echo") == 2
    assert "refused, as it must be: UNAUTHENTICATED" in out
    assert "may not impersonate spiffe://cluster.local/ns/outside/sa/legacy" in out
    assert '"token"' not in out  # the tokens were random and never printed
    ca_pid = int(found(r"CA process (\d+)", out))
    assert not Path(f"/proc/{ca_pid}").exists()
    # (f) nothing left
    assert "nothing left: no network namespace demo-" in out
    assert re.search(r"Demo complete in \d+\.\d s\.", out)
    assert_nothing_left(out)


@pytest.mark.netns
def test_demo_cleans_up_on_ctrl_c() -> None:
    """Ctrl-C (SIGINT to the process group) while the pods are in the mesh: exit 130,
    and the lab, the agents and the work directory are gone."""
    require_root()
    proc = start_demo()
    assert proc.stdout is not None
    out = ""
    try:
        for line in proc.stdout:  # event: the demo's own progress line
            out += line
            if line.startswith("==> [4/10]"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
        out += rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, f"stdout:\n{out}\nstderr:\n{err}"
    assert "interrupted: cleaning up" in err and "Traceback" not in err
    assert "Demo complete" not in out
    assert_nothing_left(out)
