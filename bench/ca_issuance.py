"""Benchmark: how fast the identity layer makes keys and certificates.

Measures, in one run:

- P-256 key generation and CSR building (what every ztunnel does per identity);
- CSR validation + signing inside the CA (no network);
- certificates issued per second over the real gRPC API (``underpass ca serve``
  as its own process, TLS, lab-token authentication), with 1, 4 and 16
  concurrent callers, with request latency p50/p90/p99;
- as the peer, OpenSSL's raw ECDSA P-256 signing rate (``openssl speed``), so
  the table shows how much of a signature's cost our CA adds around it.

Writes JSON (``--out``) and prints a table. It asserts nothing about speed.

    .venv/bin/python -m bench.ca_issuance [--seconds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from identity.ca import (
    CertificateAuthority,
    build_csr,
    generate_workload_key,
    validate_csr,
)
from identity.client import CaClient
from identity.spiffe import SpiffeId

TRUST_DOMAIN = "cluster.local"
IDENTITY = SpiffeId(TRUST_DOMAIN, "bench", "client")
IDENTITY_LIFETIME = dt.timedelta(hours=24)
TOKEN = secrets.token_urlsafe(24)  # a throwaway lab token for a throwaway CA


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def time_operation(fn: Callable[[], object], seconds: float) -> dict[str, float]:
    """Run ``fn`` repeatedly for about ``seconds``; per-call times in microseconds."""
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 10:
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return {
        "count": len(samples),
        "per_second": len(samples) / (sum(samples) / 1e6),
        "p50_us": percentile(samples, 50),
        "p99_us": percentile(samples, 99),
        "mean_us": statistics.fmean(samples),
    }


def openssl_ecdsa_p256_signs_per_second(seconds: float) -> float | None:
    """OpenSSL's own ECDSA P-256 signing rate on this machine (the peer figure)."""
    try:
        out = subprocess.run(
            ["openssl", "speed", "-seconds", str(max(1, round(seconds))), "ecdsap256"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # "256 bits ecdsa (nistp256)   0.0000s   0.0001s  40000.0  12000.0"
    match = re.search(r"256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)", out)
    return float(match.group(1)) if match else None


@contextmanager
def ca_process(state_dir: Path) -> Iterator[str]:
    """``underpass ca serve`` on a free loopback port; yields its address."""
    tokens = state_dir / "tokens.yaml"
    fd = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f"- token: {TOKEN}\n  namespace: {IDENTITY.namespace}\n"
            f"  service_account: {IDENTITY.service_account}\n  pod: bench-1\n  node: node-1\n"
        )
    cmd = [
        sys.executable, "-m", "underpass.cli.main", "--log-level", "warning",
        "ca", "serve", "--state-dir", str(state_dir / "ca"), "--listen", "127.0.0.1:0",
        "--metrics-port", "0", "--auth", "lab", "--lab-tokens", str(tokens),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = re.search(r"ready: address=(\S+)", line)
            if match:
                yield match.group(1)
                break
        else:
            raise RuntimeError(f"the CA exited before it was ready (exit {proc.wait()})")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def grpc_issuance(address: str, root_pem: bytes, callers: int, seconds: float) -> dict[str, Any]:
    """``callers`` threads, each with its own channel, issuing for ``seconds``."""
    csr = build_csr(generate_workload_key(), IDENTITY)
    latencies: list[list[float]] = [[] for _ in range(callers)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(callers + 1)
    stop_at = [0.0]

    def worker(slot: list[float]) -> None:
        with CaClient(address, root_pem, TOKEN, server_name="localhost") as client:
            client.create_certificate(csr, IDENTITY_LIFETIME)  # warm the channel
            start_line.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    client.create_certificate(csr, IDENTITY_LIFETIME)
                except Exception as exc:
                    errors.append(exc)
                    return
                slot.append((time.perf_counter() - t0) * 1e6)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in latencies]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    start_line.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"issuance failed: {errors[0]}")
    flat = [x for slot in latencies for x in slot]
    return {
        "callers": callers,
        "issued": len(flat),
        "per_second": len(flat) / elapsed,
        "p50_us": percentile(flat, 50),
        "p90_us": percentile(flat, 90),
        "p99_us": percentile(flat, 99),
    }


def run(seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {"seconds_per_case": seconds}
    print("==> key generation and CSR", file=sys.stderr)
    results["keygen_p256"] = time_operation(generate_workload_key, seconds)
    key = generate_workload_key()
    results["build_csr"] = time_operation(lambda: build_csr(key, IDENTITY), seconds)
    with tempfile.TemporaryDirectory(prefix="underpass-bench-ca-") as tmp:
        ca = CertificateAuthority.load_or_create(Path(tmp) / "local", TRUST_DOMAIN)
        csr = build_csr(key, IDENTITY)
        print("==> CSR validation + signing in process", file=sys.stderr)
        results["validate_and_sign"] = time_operation(
            lambda: ca.sign_workload(validate_csr(csr), IDENTITY_LIFETIME), seconds
        )
        print("==> OpenSSL raw ECDSA P-256 signing (peer)", file=sys.stderr)
        results["openssl_ecdsa_p256_signs_per_second"] = openssl_ecdsa_p256_signs_per_second(
            seconds
        )
        with ca_process(Path(tmp)) as address:
            root_pem = (Path(tmp) / "ca" / "ca-cert.pem").read_bytes()
            results["grpc"] = []
            for callers in (1, 4, 16):
                print(f"==> gRPC issuance, {callers} concurrent caller(s)", file=sys.stderr)
                results["grpc"].append(grpc_issuance(address, root_pem, callers, seconds))
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("operation", "per second", "p50", "p99", "ratio")]
    peer = results.get("openssl_ecdsa_p256_signs_per_second")

    def ratio(rate: float) -> str:
        return f"{rate / peer:.2f}x openssl sign" if peer else "-"

    for name in ("keygen_p256", "build_csr", "validate_and_sign"):
        r = results[name]
        rows.append(
            (name, f"{r['per_second']:.0f}", f"{r['p50_us']:.0f} us", f"{r['p99_us']:.0f} us",
             ratio(r["per_second"]) if name == "validate_and_sign" else "-")
        )  # fmt: skip
    for r in results["grpc"]:
        rows.append(
            (f"grpc issue x{r['callers']}", f"{r['per_second']:.0f}", f"{r['p50_us']:.0f} us",
             f"{r['p99_us']:.0f} us", ratio(r["per_second"]))
        )  # fmt: skip
    if peer:
        rows.append(("openssl ecdsa p256 sign (peer)", f"{peer:.0f}", "-", "-", "1.00x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per case (default 3)")
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)
    results = run(args.seconds)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
