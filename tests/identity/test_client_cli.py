"""``underpass ca serve`` as a process and ``underpass ca request`` against a CA."""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import structlog
import yaml
from prometheus_client import CollectorRegistry

from identity.auth import Authorizer, LabTokenAuthenticator
from identity.ca import CertificateAuthority
from identity.server import CaServer
from underpass.cli.ca import parse_duration
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


TD = "cluster.local"
SLEEP_TOKEN = "tok-sleep-0123456789abcdef"
AGENT_TOKEN = "tok-agent-0123456789abcdef"
SLEEP_URI = "spiffe://cluster.local/ns/demo/sa/sleep"


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # umask may have removed bits we asked for
    return path


def lab_tokens(path: Path, mode: int = 0o600) -> Path:
    doc = [
        {
            "token": SLEEP_TOKEN,
            "namespace": "demo",
            "service_account": "sleep",
            "pod": "sleep-1",
            "node": "node-1",
        },
        {
            "token": AGENT_TOKEN,
            "namespace": "istio-system",
            "service_account": "ztunnel",
            "pod": "zt",
            "node": "node-2",
        },
    ]
    return write_private(path, yaml.safe_dump(doc), mode)


# -- ca request (in process, against an in-process server) ---------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[CaServer, Path]]:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", TD)
    auth = LabTokenAuthenticator(lab_tokens(tmp_path / "tokens.yaml"), TD)
    srv = CaServer(
        ca, auth, Authorizer(TD, auth), listen="127.0.0.1:0", registry=CollectorRegistry()
    )
    srv.start()
    try:
        yield srv, tmp_path / "state" / "ca-cert.pem"
    finally:
        srv.stop(grace=0)


def request(
    capsys: pytest.CaptureFixture[str], server: tuple[CaServer, Path], token: Path, *extra: str
) -> tuple[int, str, str]:
    srv, root = server
    code = run_cli(
        [
            "ca",
            "request",
            "--address",
            srv.address,
            "--root-cert",
            str(root),
            "--token-file",
            str(token),
            *extra,
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_request_prints_the_decoded_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: tuple[CaServer, Path]
) -> None:
    token = write_private(tmp_path / "sleep.token", SLEEP_TOKEN + "\n")
    before = set(tmp_path.rglob("*"))
    code, out, err = request(
        capsys, server, token, "--identity", SLEEP_URI, "--validity", "2h", "--pem"
    )
    assert code == 0, err
    assert f"URI {SLEEP_URI}" in out
    assert "serverAuth, clientAuth" in out
    assert "lifetime 2h 2m" in out  # 2 h asked, backdated 2 min for clock skew
    assert "BEGIN CERTIFICATE" in out and "PRIVATE KEY" not in out
    assert SLEEP_TOKEN not in out + err
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_request_refusal_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: tuple[CaServer, Path]
) -> None:
    token = write_private(tmp_path / "agent.token", AGENT_TOKEN)
    code, out, err = request(capsys, server, token, "--impersonate", SLEEP_URI)
    assert code == 1
    assert "refused (AuthenticationFailed)" in err and "no running pod" in err
    assert AGENT_TOKEN not in out + err


def test_request_needs_an_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: tuple[CaServer, Path]
) -> None:
    token = write_private(tmp_path / "t", SLEEP_TOKEN)
    code, _, err = request(capsys, server, token)
    assert code == 2 and "--identity or --impersonate" in err


def test_parse_duration() -> None:
    assert parse_duration("90").total_seconds() == 90
    assert parse_duration("90m").total_seconds() == 5400
    assert parse_duration("24h").total_seconds() == 86400
    assert parse_duration("7d").days == 7
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("1w")


# -- ca serve (a real process) -------------------------------------------------------


class Process:
    """A child ``underpass`` process whose stdout lines are read in a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "underpass.cli.main", "--log-format", "json", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"process exited before {prefix!r}: {self.stderr()}")
            if line.startswith(prefix):
                return line

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            return "(running)"
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def serve_args(tmp_path: Path, tokens: Path) -> list[str]:
    return [
        "ca",
        "serve",
        "--state-dir",
        str(tmp_path / "state"),
        "--listen",
        "127.0.0.1:0",
        "--metrics-port",
        "-1",
        "--lab-tokens",
        str(tokens),
    ]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_prints_ready_serves_and_stops_on_signal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sig: signal.Signals
) -> None:
    tokens = lab_tokens(tmp_path / "tokens.yaml")
    ca = Process(*serve_args(tmp_path, tokens))
    try:
        ready = ca.wait_for("ready:")
        fields = dict(f.split("=", 1) for f in ready.split()[1:])
        assert fields["trust_domain"] == TD and fields["metrics"] == "off"
        assert Path(fields["root_cert"]) == tmp_path / "state" / "ca-cert.pem"
        token = write_private(tmp_path / "sleep.token", SLEEP_TOKEN)
        code = run_cli(
            [
                "ca",
                "request",
                "--address",
                fields["address"],
                "--root-cert",
                fields["root_cert"],
                "--token-file",
                str(token),
                "--identity",
                SLEEP_URI,
            ]
        )
        assert code == 0, capsys.readouterr().err
        assert f"URI {SLEEP_URI}" in capsys.readouterr().out
        ca.proc.send_signal(sig)
        ca.wait_for("stopped")
        assert ca.proc.wait(timeout=30) == 0
        log = ca.stderr()
        assert '"event": "ca.certificate_issued"' in log
        assert SLEEP_TOKEN not in log
    finally:
        ca.kill()


def test_serve_refuses_a_world_readable_token_file(tmp_path: Path) -> None:
    tokens = lab_tokens(tmp_path / "tokens.yaml", mode=0o644)
    ca = Process(*serve_args(tmp_path, tokens))
    try:
        assert ca.proc.wait(timeout=60) == 1
        err = ca.stderr()
        assert "chmod 600" in err and "accessible to other users" in err
    finally:
        ca.kill()


def test_serve_reports_a_port_in_use(tmp_path: Path, server: tuple[CaServer, Path]) -> None:
    tokens = lab_tokens(tmp_path / "tokens2.yaml")
    args = serve_args(tmp_path, tokens)
    args[args.index("127.0.0.1:0")] = server[0].address
    ca = Process(*args)
    try:
        assert ca.proc.wait(timeout=60) == 1
        assert "cannot listen" in ca.stderr()
    finally:
        ca.kill()
