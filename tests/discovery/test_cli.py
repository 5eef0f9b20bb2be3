"""``underpass discovery serve`` as a real process, with a real Delta ADS client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from tests.discovery.test_pipeline import MODEL_FILE
from underpass.cli.main import build_parser
from underpass.xds.client import ClientEvent, DeltaClient
from underpass.xds.errors import XdsConnectionError
from underpass.xds.grpc_client import CHANNEL_OPTIONS, DeltaStream
from underpass.xds.node import build_node
from underpass.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WORKLOAD_TYPE_URLS

pytestmark = pytest.mark.unit


def test_help_lists_the_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["discovery", "serve", "--plaintext-listen", "127.0.0.1:0"])
    assert args.listen == "0.0.0.0:15012" and args.plaintext_listen == "127.0.0.1:0"


ZTUNNEL_TOKEN = "ztunnel-token-0123456789abcdef"


def test_serve_a_model_file_over_tls_and_plaintext(tmp_path: Path) -> None:
    """Plaintext xDS serves anyone; TLS xDS only a caller whose token --auth accepts."""
    model = tmp_path / "model.yaml"
    model.write_text(MODEL_FILE)
    tokens = tmp_path / "tokens.yaml"
    fd = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f"- {{token: {ZTUNNEL_TOKEN}, namespace: istio-system, service_account: ztunnel, "
            "pod: ztunnel-1, node: node-1}\n"
        )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "underpass.cli.main",
            "--log-format",
            "json",
            "discovery",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--plaintext-listen",
            "127.0.0.1:0",
            "--serving-dns",
            "localhost",
            "--state-dir",
            str(tmp_path / "ca"),
            "--no-ca-service",
            "--lab-tokens",
            str(tokens),
            "--metrics-port",
            "-1",
            "--model",
            str(model),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready: tls=127.0.0.1:"), ready
        fields = dict(part.split("=", 1) for part in ready.split()[1:])
        assert fields["ca"] == "off"
        node = build_node(
            ip="10.0.0.9", pod="zt", namespace="istio-system", node_name="n", cluster_id="c"
        )

        def fetch(channel: grpc.Channel, token: str | None) -> dict[str, set[str]]:
            """One stream until in sync: what it received; raises what ended it before."""
            client = DeltaClient(node, WORKLOAD_TYPE_URLS)
            done = threading.Event()
            received: dict[str, set[str]] = {t: set() for t in WORKLOAD_TYPE_URLS}
            errors: list[BaseException] = []

            def on_event(event: ClientEvent) -> None:
                for r in getattr(event, "updated", ()):
                    received[event.type_url].add(r.name)
                if client.in_sync():
                    done.set()

            metadata = [("authorization", f"Bearer {token}")] if token else []
            stream = DeltaStream(channel, client, on_event, metadata=metadata)

            def run() -> None:
                try:
                    stream.run()
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    done.set()

            runner = threading.Thread(target=run, daemon=True)
            runner.start()
            assert done.wait(20)
            stream.close()
            runner.join(10)
            if errors:
                raise errors[0]
            return received

        expected = {
            ADDRESS_TYPE_URL: {"Kubernetes//Pod/demo/sleep-1", "demo/sleep.demo.svc.cluster.local"},
            AUTHORIZATION_TYPE_URL: {
                "demo/allow-sleep",
                "demo/converted_peer_authentication_ports",
            },
        }
        with grpc.insecure_channel(fields["plaintext"], options=CHANNEL_OPTIONS) as channel:
            assert fetch(channel, None) == expected
        root = (tmp_path / "ca" / "ca-cert.pem").read_bytes()
        with grpc.secure_channel(
            fields["tls"],
            grpc.ssl_channel_credentials(root),
            options=[("grpc.ssl_target_name_override", "localhost"), *CHANNEL_OPTIONS],
        ) as channel:
            with pytest.raises(XdsConnectionError, match="UNAUTHENTICATED"):
                fetch(channel, None)
            with pytest.raises(XdsConnectionError, match="UNAUTHENTICATED"):
                fetch(channel, "someone-else-0123456789abcdef")
            assert fetch(channel, ZTUNNEL_TOKEN) == expected
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_bad_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("widgets: []\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "underpass.cli.main",
            "discovery",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "ca"),
            "--no-ca-service",
            "--metrics-port",
            "-1",
            "--model",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "unknown kind 'widgets'" in result.stderr
