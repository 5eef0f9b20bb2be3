"""The ``underpass`` command: help, version, ``ca --help`` and the demo end to end."""

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

from underpass import __version__
from underpass.cli.main import main

pytestmark = pytest.mark.unit


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


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["--help"], capsys)
    assert code == 0
    for command in ("version", "ca", "demo"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["version"], capsys)
    assert (code, out.strip()) == (0, f"underpass {__version__}")


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


def test_ca_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(["ca"], capsys)
    assert code == 2 and "serve" in out


def test_demo_end_to_end() -> None:
    """``underpass demo`` as a user runs it: a real CA subprocess, then everything cleaned."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "underpass.cli.main", "demo"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a failure can take the CA child down too
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert out.count("URI spiffe://cluster.local/ns/demo/sa/sleep") == 2, out
    assert "refused, as it must be: UNAUTHENTICATED" in out
    assert "may not impersonate spiffe://cluster.local/ns/demo/sa/httpbin" in out
    assert "Demo complete." in out
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    # Clean-up: no CA process and no work directory left behind.
    ca_pid = int(re.search(r"CA process (\d+)", out).group(1))  # type: ignore[union-attr]
    assert not Path(f"/proc/{ca_pid}").exists()
    workdir = Path(re.search(r"work directory\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    assert not workdir.exists()
    # The tokens were random and never printed.
    assert "token:" not in out
