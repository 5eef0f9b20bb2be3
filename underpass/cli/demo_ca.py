"""The identity half of ``underpass demo``: the CA as a real process, fed from the lab.

Owns:

- the CA's lab token file, built from the lab registry: one random token for
  every running pod (namespace, service account, pod, node as the registry has
  them) and one for every node's agent (``istio-system/ztunnel``, the trusted
  node agent). Written mode 0600 from the first byte; tokens are never printed;
- ``underpass ca serve`` as a child process on 127.0.0.1 (port 0), its
  ``ready:`` line read for the bound address, stopped and reaped on exit;
- asking it for a certificate (:func:`issue`), checked as ztunnel would check
  it (our key, exactly the identity asked for);
- the audit lines it logged (``ca.certificate_issued``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from underpass.lab.registry import Snapshot

TRUST_DOMAIN = "cluster.local"
READY_TIMEOUT = 60.0
NODE_AGENT_NAMESPACE = "istio-system"
NODE_AGENT_SERVICE_ACCOUNT = "ztunnel"


class DemoFailed(Exception):
    """A demo step did not give the expected result."""


@dataclass(frozen=True)
class LabPod:
    """One entry of the CA's lab token file."""

    namespace: str
    service_account: str
    pod: str
    node: str
    token: str

    def entry(self) -> dict[str, str]:
        return {
            "token": self.token,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "pod": self.pod,
            "node": self.node,
        }


def lab_callers(snapshot: Snapshot) -> list[LabPod]:
    """Every running pod of the lab, then a node agent per node, each with a fresh token."""
    pods = sorted(
        (p for p in snapshot.pods.values() if p.phase == "Running"),
        key=lambda p: (p.namespace, p.name),
    )
    callers = [
        LabPod(p.namespace, p.service_account, p.name, p.node, secrets.token_urlsafe(32))
        for p in pods
    ]
    callers += [
        LabPod(
            NODE_AGENT_NAMESPACE,
            NODE_AGENT_SERVICE_ACCOUNT,
            f"ztunnel-{node}",
            node,
            secrets.token_urlsafe(32),
        )
        for node in sorted(snapshot.nodes)
    ]
    return callers


def write_token_file(path: Path, callers: Iterable[LabPod]) -> None:
    """The token file (JSON is YAML), readable by its owner only from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps([c.entry() for c in callers], indent=2))


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


class CaProcess:
    """``underpass ca serve`` as a child process; stopped and reaped on exit."""

    def __init__(self, workdir: Path, tokens: Path) -> None:
        self.log_path = workdir / "ca.log"
        self._log = self.log_path.open("w")
        args = [
            "ca", "serve",
            "--state-dir", str(workdir / "ca"),
            "--trust-domain", TRUST_DOMAIN,
            "--listen", "127.0.0.1:0",
            "--serving-dns", "localhost",
            "--serving-ip", "127.0.0.1",
            "--metrics-port", "-1",
            "--auth", "lab",
            "--lab-tokens", str(tokens),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "underpass.cli.main", "--log-format", "json", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        assert self.proc.stdout is not None
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(self.proc.stdout, self.lines), daemon=True).start()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, str]:
        """Fields of the ``ready:`` line; :class:`DemoFailed` if the CA exits or times out."""
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout)
        while True:
            left = (deadline - dt.datetime.now(dt.UTC)).total_seconds()
            try:
                line = self.lines.get(timeout=max(left, 0.0))
            except queue.Empty:
                raise DemoFailed(f"the CA did not report ready within {timeout:.0f} s") from None
            if line is None:
                raise DemoFailed(f"the CA exited before it was ready (code {self.proc.wait()})")
            if line.startswith("ready:"):
                return dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def audit(self) -> list[dict[str, Any]]:
        """The CA's audit lines (event ``ca.certificate_issued``) so far."""
        events = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "ca.certificate_issued":
                    events.append(event)
        return events

    def tail(self, lines: int = 20) -> list[str]:
        try:
            return self.log_path.read_text().splitlines()[-lines:]
        except OSError:
            return []


def issue(
    address: str,
    root_pem: bytes,
    token: str,
    identity: Any,
    impersonate: Any = None,
) -> Any:
    """Ask the CA for ``identity``; return the chain once checked as ztunnel checks it."""
    from identity.ca import build_csr, generate_workload_key
    from identity.certs import WorkloadCertificate
    from identity.client import CaClient

    key = generate_workload_key()
    with CaClient(address, root_pem, token, server_name="localhost") as client:
        chain = client.create_certificate(
            build_csr(key, identity), dt.timedelta(hours=24), impersonate
        )
    WorkloadCertificate.from_ca_response(identity, key, chain)
    return chain
