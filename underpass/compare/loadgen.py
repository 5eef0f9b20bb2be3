"""The load generator: Fortio, built once from the Go module proxy and cached.

Owns everything about Fortio that a measurement needs, and nothing about labs:

- :func:`ensure_fortio`: the ``fortio`` binary at :data:`FORTIO_VERSION` in
  :data:`TOOLS_DIR` (``~/.cache/underpass/bin``), built with the machine's Go
  (``go install``, through the configured module proxy) when missing;
- command lines: :func:`server_argv` (``fortio server``: the HTTP echo used as
  every pod's application; it answers at once, unlike the lab's Python sample
  app, whose headers and body leave in two writes and meet delayed ACKs) and
  :func:`load_argv` (``fortio load`` at a fixed rate on keep-alive
  connections, its JSON result written to a file);
- :func:`parse_result`: a :class:`LoadResult` from Fortio's JSON, with the
  latency histogram's buckets;
- :func:`merged_percentiles`: percentiles over the buckets of many runs (many
  client pods), interpolating linearly inside a bucket as Fortio itself does.

The bench (``bench/``) may use it too: it imports no lab code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from underpass.compare.errors import LoadGenError

FORTIO_MODULE: Final = "fortio.org/fortio"
# Newer releases need grol.io/grol, which the module proxy here does not serve.
FORTIO_VERSION: Final = "v1.66.0"
TOOLS_DIR: Final = Path.home() / ".cache" / "underpass" / "bin"
#: Histogram resolution in seconds: 10 us, so that sub-millisecond latencies resolve.
RESOLUTION_S: Final = 0.00001
PERCENTILES: Final = (50.0, 90.0, 99.0)
#: A request slower than this counts as an error.
REQUEST_TIMEOUT_S: Final = 5.0
_GO_FALLBACK: Final = Path("/usr/local/go/bin/go")


# --------------------------------------------------------------------------- the binary


def fortio_version(binary: Path) -> str | None:
    """What ``fortio version`` prints (e.g. ``1.66.0``), None if it does not run."""
    try:
        out = subprocess.run(
            [str(binary), "version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def ensure_fortio(progress: Callable[[str], None] = lambda _text: None) -> Path:
    """Fortio at :data:`FORTIO_VERSION`: the cached binary, else built once with Go."""
    binary = TOOLS_DIR / "fortio"
    wanted = FORTIO_VERSION.lstrip("v")
    if binary.exists() and fortio_version(binary) == wanted:
        return binary
    go = shutil.which("go") or (str(_GO_FALLBACK) if _GO_FALLBACK.exists() else None)
    if go is None:
        raise LoadGenError(
            "the load generator (Fortio) is built with Go and no `go` is on PATH: install Go "
            f"(https://go.dev/dl/), or put a fortio {FORTIO_VERSION} binary at {binary}"
        )
    progress(f"building fortio {FORTIO_VERSION} with {go} into {TOOLS_DIR} (once; ~2 min cold)")
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(
        [go, "install", f"{FORTIO_MODULE}@{FORTIO_VERSION}"],
        env={**os.environ, "GOBIN": str(TOOLS_DIR)},
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0 or fortio_version(binary) != wanted:
        raise LoadGenError(
            f"`go install {FORTIO_MODULE}@{FORTIO_VERSION}` failed (exit {built.returncode}); "
            f"check GOPROXY and the network. Go said:\n{built.stderr[-2000:]}"
        )
    return binary


# --------------------------------------------------------------------------- command lines


def server_argv(fortio: Path, http_port: int) -> list[str]:
    """``fortio server`` as an HTTP echo on ``http_port`` only (every other server off)."""
    return [
        str(fortio),
        "server",
        "-loglevel",
        "Warning",
        "-http-port",
        str(http_port),
        "-grpc-port",
        "disabled",
        "-redirect-port",
        "disabled",
        "-tcp-port",
        "disabled",
        "-udp-port",
        "disabled",
    ]


def load_argv(
    fortio: Path,
    url: str,
    *,
    qps: float,
    seconds: float,
    json_path: Path,
    connections: int = 1,
) -> list[str]:
    """``fortio load``: ``qps`` requests per second for ``seconds`` on keep-alive
    connections (a warm-up request each first, not counted); JSON to ``json_path``."""
    if qps <= 0 or seconds <= 0 or connections < 1:
        raise ValueError("qps and seconds must be positive, connections at least 1")
    return [
        str(fortio),
        "load",
        "-quiet",
        "-json",
        str(json_path),
        "-r",
        f"{RESOLUTION_S:g}",
        "-p",
        ",".join(f"{p:g}" for p in PERCENTILES),
        "-c",
        str(connections),
        "-qps",
        f"{qps:g}",
        "-t",
        f"{seconds:g}s",
        "-timeout",
        f"{REQUEST_TIMEOUT_S:g}s",
        # many clients start together: +-10% on each wait keeps them from firing in lockstep
        "-jitter",
        url,
    ]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Bucket:
    """A histogram bucket: ``count`` requests took between ``start`` and ``end`` seconds."""

    start: float
    end: float
    count: int


@dataclass(frozen=True)
class LoadResult:
    """One ``fortio load`` run, as measured by Fortio."""

    url: str
    requests: int
    ok: int  # answered 200
    requested_qps: float
    actual_qps: float
    duration_s: float
    avg_s: float
    percentiles_s: Mapping[float, float]
    buckets: tuple[Bucket, ...]
    sockets: int

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "requested_qps": self.requested_qps,
            "actual_qps": round(self.actual_qps, 2),
            "duration_s": round(self.duration_s, 3),
            "avg_ms": round(self.avg_s * 1000, 3),
            **{f"p{p:g}_ms": round(v * 1000, 3) for p, v in self.percentiles_s.items()},
            "sockets": self.sockets,
            "histogram_s": [[b.start, b.end, b.count] for b in self.buckets],
        }


def parse_result(doc: Mapping[str, Any]) -> LoadResult:
    """A :class:`LoadResult` from the JSON ``fortio load -json`` writes."""
    try:
        histogram = doc["DurationHistogram"]
        codes = {str(k): int(v) for k, v in (doc.get("RetCodes") or {}).items()}
        buckets = tuple(
            Bucket(float(b["Start"]), float(b["End"]), int(b["Count"]))
            for b in histogram.get("Data") or ()
        )
        percentiles = {
            float(p["Percentile"]): float(p["Value"]) for p in histogram.get("Percentiles") or ()
        }
        return LoadResult(
            url=str(doc.get("URL", "")),
            requests=int(histogram["Count"]),
            ok=codes.get("200", 0),
            requested_qps=float(doc.get("RequestedQPS") or 0),
            actual_qps=float(doc["ActualQPS"]),
            duration_s=float(doc["ActualDuration"]) / 1e9,
            avg_s=float(histogram.get("Avg") or 0.0),
            percentiles_s=percentiles,
            buckets=buckets,
            sockets=int(doc.get("SocketCount") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadGenError(f"unexpected Fortio JSON result ({type(exc).__name__}: {exc})") from None


def merged_percentiles(
    buckets: Iterable[Bucket], percentiles: Sequence[float] = PERCENTILES
) -> dict[float, float]:
    """Percentiles (seconds) of the union of histogram buckets; empty if there are none.

    Each bucket's requests are taken as spread evenly over ``[start, end]``
    (Fortio's own assumption), so the merged distribution function is
    piecewise linear; each percentile is found by bisection on it. Buckets
    of different runs may overlap (each run's first and last bucket start at
    its own minimum and end at its own maximum).
    """
    data = [b for b in buckets if b.count > 0]
    count = sum(b.count for b in data)
    if count == 0:
        return {}

    def at_or_below(x: float) -> float:
        n = 0.0
        for b in data:
            if x >= b.end:
                n += b.count
            elif x > b.start:
                n += b.count * (x - b.start) / (b.end - b.start)
        return n

    low, high = min(b.start for b in data), max(b.end for b in data)
    found: dict[float, float] = {}
    for p in percentiles:
        if not 0 < p <= 100:
            raise ValueError(f"percentile {p} is not in (0, 100]")
        target = count * p / 100
        lo, hi = low, high
        for _ in range(64):
            mid = (lo + hi) / 2
            if at_or_below(mid) >= target:
                hi = mid
            else:
                lo = mid
        found[p] = hi
    return found
