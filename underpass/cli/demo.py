"""``underpass demo``: the CA end to end, as a real process on loopback.

Steps (each announced with a progress line):

1. a temporary directory with a CA state dir and a lab token file (mode 0600)
   holding a sample pod ``demo/sleep`` (pod ``sleep-1`` on ``node-1``), a node
   agent ``istio-system/ztunnel`` on ``node-1`` and a pod ``demo/httpbin`` on
   ``node-2``; the tokens are random and live only in that directory;
2. ``underpass ca serve`` started as a subprocess on 127.0.0.1 with port 0, its
   ready line read for the bound address;
3. the sample pod asks for its own identity with its own token;
4. the node agent asks for the same identity by impersonation;
5. the node agent asks for ``demo/httpbin``, whose only pod runs on another
   node, and the CA refuses (UNAUTHENTICATED) with its message;
6. the CA's metrics and audit lines, then a clean stop.

Each certificate is checked as ztunnel would (our key, exactly the identity
asked for) and printed decoded. The subprocess and the temporary files are
removed on every exit path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

TRUST_DOMAIN = "cluster.local"
READY_TIMEOUT = 60.0


class DemoFailed(Exception):
    """A demo step did not give the expected result."""


@dataclass(frozen=True)
class LabPod:
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


def _step(number: int, total: int, text: str) -> None:
    print(f"\n==> [{number}/{total}] {text}", flush=True)


def _info(text: str) -> None:
    print(f"    {text}", flush=True)


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only from the first byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that the clean-up below runs for it too."""

    def on_term(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CaProcess:
    """``underpass ca serve`` as a child process; stopped and reaped on exit."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self._log = log_path.open("w")
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

    def wait_ready(self, timeout: float) -> dict[str, str]:
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


def _issue(
    address: str,
    root_pem: bytes,
    token: str,
    identity: Any,
    impersonate: Any = None,
) -> Any:
    """Ask the CA for ``identity``; return the checked :class:`WorkloadCertificate` + chain."""
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


def _print_tail(path: Path, lines: int = 20) -> None:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines()[-lines:]:
            print(f"    | {line}", file=sys.stderr)


def run_demo(keep: bool = False) -> int:
    from identity.errors import AuthenticationFailed, IdentityError
    from identity.spiffe import SpiffeId
    from underpass.cli.ca import describe_certificate

    total = 6
    color = sys.stdout.isatty()
    workdir = Path(tempfile.mkdtemp(prefix="underpass-demo-"))
    ca: CaProcess | None = None
    log_path = workdir / "ca.log"
    try:
        _step(1, total, "Preparing a CA state directory and a lab token file")
        sleep = LabPod("demo", "sleep", "sleep-1", "node-1", secrets.token_urlsafe(32))
        ztunnel = LabPod(
            "istio-system", "ztunnel", "ztunnel-node-1", "node-1", secrets.token_urlsafe(32)
        )
        httpbin = LabPod("demo", "httpbin", "httpbin-1", "node-2", secrets.token_urlsafe(32))
        tokens = workdir / "lab-tokens.yaml"
        _write_private(tokens, json.dumps([p.entry() for p in (sleep, ztunnel, httpbin)], indent=2))
        _info(f"work directory   {workdir}")
        _info(f"lab token file   {tokens} (mode 0600, random tokens)")
        for p in (sleep, ztunnel, httpbin):
            _info(
                f"  pod {p.namespace + '/' + p.pod:<30} "
                f"service account {p.service_account:<8} on {p.node}"
            )

        _step(2, total, "Starting the CA: underpass ca serve --listen 127.0.0.1:0 --auth lab")
        ca = CaProcess(
            [
                "ca", "serve",
                "--state-dir", str(workdir / "ca"),
                "--trust-domain", TRUST_DOMAIN,
                "--listen", "127.0.0.1:0",
                "--serving-dns", "localhost",
                "--serving-ip", "127.0.0.1",
                "--metrics-port", "0",
                "--auth", "lab",
                "--lab-tokens", str(tokens),
            ],
            log_path,
        )  # fmt: skip
        ready = ca.wait_ready(READY_TIMEOUT)
        address, root_path = ready["address"], Path(ready["root_cert"])
        root_pem = root_path.read_bytes()
        _info(f"CA process {ca.proc.pid} serving on {address} (TLS)")
        _info(f"root certificate {root_path}")

        identity = SpiffeId(TRUST_DOMAIN, sleep.namespace, sleep.service_account)
        _step(
            3,
            total,
            f"Pod {sleep.namespace}/{sleep.pod} asks for its own identity with its own token",
        )
        chain = _issue(address, root_pem, sleep.token, identity)
        _info(f"granted {identity.uri}:")
        print(textwrap.indent(describe_certificate(chain, color=color), "    "), flush=True)

        _step(
            4, total,
            f"ztunnel on {ztunnel.node} asks for {identity.uri} by impersonation "
            f"({sleep.pod} runs on {sleep.node})",
        )  # fmt: skip
        chain = _issue(address, root_pem, ztunnel.token, identity, impersonate=identity)
        _info(f"granted {identity.uri} to the node agent:")
        print(textwrap.indent(describe_certificate(chain, color=color), "    "), flush=True)

        other = SpiffeId(TRUST_DOMAIN, httpbin.namespace, httpbin.service_account)
        _step(
            5, total,
            f"ztunnel on {ztunnel.node} asks for {other.uri} (its only pod runs on {httpbin.node})",
        )  # fmt: skip
        try:
            _issue(address, root_pem, ztunnel.token, other, impersonate=other)
        except AuthenticationFailed as exc:
            _info("refused, as it must be: UNAUTHENTICATED")
            _info(f"the CA says: {exc}")
        else:
            raise DemoFailed(f"the CA granted {other.uri} to a node agent on another node")

        _step(6, total, "The CA's metrics and audit log, then a clean stop")
        metrics_url = ready.get("metrics", "off")
        if metrics_url.startswith("http://"):
            with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 (our own loopback URL)
                for line in response.read().decode().splitlines():
                    if line.startswith("underpass_ca_") and "_total" in line:
                        _info(line)
        code = ca.stop()
        ca = None
        audit = []
        for line in log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "ca.certificate_issued":
                    audit.append(event)
        _info(f"{len(audit)} audit lines (event ca.certificate_issued):")
        for event in audit:
            _info(
                f"  {event['identity']} serial {event['serial']} for {event['caller']} "
                f"(pod {event['caller_pod']} on {event['node']}), not after {event['not_after']}"
            )
        if code != 0:
            raise DemoFailed(f"the CA exited with code {code} on SIGTERM")
        _info("CA stopped cleanly")
        print("\nDemo complete.", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the CA and removing the work directory", file=sys.stderr)
        raise
    except (DemoFailed, IdentityError, OSError) as exc:
        print(f"\ndemo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if log_path.exists():
            print("last lines of the CA's log:", file=sys.stderr)
            _print_tail(log_path)
        return 1
    finally:
        if ca is not None:
            ca.stop()
        if keep:
            print(f"(kept {workdir})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace) -> int:
    with _terminate_on_sigterm():
        return run_demo(keep=args.keep)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run the demo: the CA issuing workload certificates over gRPC",
        description="Start the CA as a subprocess on 127.0.0.1 with a temporary lab, issue a "
        "certificate to a pod with its own token and by node-agent impersonation, show that "
        "impersonation for a pod on another node is refused, then clean up.",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (CA state, token file, CA log) for inspection",
    )
    p.set_defaults(func=_run)
