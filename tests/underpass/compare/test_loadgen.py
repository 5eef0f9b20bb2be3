"""Fortio command lines, its JSON result, and percentiles merged over many clients (unit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from underpass.compare.errors import LoadGenError
from underpass.compare.loadgen import (
    Bucket,
    load_argv,
    merged_percentiles,
    parse_result,
    server_argv,
)

pytestmark = pytest.mark.unit

# A real `fortio load -json` result (fields the parser reads; 37 requests through ztunnel).
BUCKETS: list[tuple[float, float, int]] = [
    (0.000934203, 0.001, 3),
    (0.001, 0.0012, 8),
    (0.0012, 0.0014, 5),
    (0.0014, 0.0016, 6),
    (0.0016, 0.0018, 1),
    (0.0018, 0.002, 2),
    (0.002, 0.0025, 5),
    (0.0025, 0.003, 4),
    (0.003, 0.0035, 1),
    (0.004, 0.0045, 1),
    (0.0045, 0.004593627, 1),
]
FORTIO_DOC: dict[str, Any] = {
    "RunType": "HTTP",
    "RequestedQPS": "12.5",
    "ActualQPS": 12.48,
    "ActualDuration": 2966000000,
    "URL": "http://10.244.2.2:8080/echo",
    "SocketCount": 1,
    "RetCodes": {"200": 36, "503": 1},
    "DurationHistogram": {
        "Count": 37,
        "Avg": 0.00178,
        "Data": [{"Start": s, "End": e, "Percent": 0, "Count": c} for s, e, c in BUCKETS],
        "Percentiles": [
            {"Percentile": 50, "Value": 0.001483},
            {"Percentile": 90, "Value": 0.002913},
            {"Percentile": 99, "Value": 0.004559},
        ],
    },
}


def value_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_load_argv_is_a_fixed_rate_keepalive_run() -> None:
    argv = load_argv(
        Path("/bin/fortio"), "http://10.0.0.1:8080/echo", qps=2.5, seconds=3, json_path=Path("r")
    )
    assert argv[:2] == ["/bin/fortio", "load"]
    assert argv[-1] == "http://10.0.0.1:8080/echo"
    assert value_of(argv, "-qps") == "2.5" and value_of(argv, "-t") == "3s"
    assert value_of(argv, "-c") == "1" and value_of(argv, "-json") == "r"
    assert value_of(argv, "-p") == "50,90,99"
    assert "-keepalive=false" not in argv
    with pytest.raises(ValueError):
        load_argv(Path("f"), "http://x/", qps=0, seconds=1, json_path=Path("r"))


def test_server_argv_serves_http_only() -> None:
    argv = server_argv(Path("/bin/fortio"), 8080)
    assert argv[1] == "server" and value_of(argv, "-http-port") == "8080"
    for other in ("-grpc-port", "-redirect-port", "-tcp-port", "-udp-port"):
        assert value_of(argv, other) == "disabled"


def test_parse_result_reads_counts_and_histogram() -> None:
    result = parse_result(FORTIO_DOC)
    assert (result.requests, result.ok, result.errors) == (37, 36, 1)
    assert result.requested_qps == 12.5 and result.sockets == 1
    assert result.duration_s == pytest.approx(2.966)
    assert result.percentiles_s[99.0] == 0.004559
    assert len(result.buckets) == len(BUCKETS)
    doc = result.to_dict()
    assert doc["p50_ms"] == 1.483 and doc["errors"] == 1
    assert doc["histogram_s"][0] == [0.000934203, 0.001, 3]


def test_parse_result_rejects_a_foreign_document() -> None:
    with pytest.raises(LoadGenError, match="unexpected Fortio JSON"):
        parse_result({"ActualQPS": 1})


def test_merged_percentiles_of_one_run_are_fortios_own() -> None:
    found = merged_percentiles([Bucket(*b) for b in BUCKETS])
    for p, value in ((50.0, 0.001483), (90.0, 0.002913), (99.0, 0.004559)):
        assert found[p] == pytest.approx(value, abs=2e-6)


def test_merged_percentiles_weigh_every_request() -> None:
    fast = [Bucket(0.001, 0.002, 90)]  # 90 requests spread over 1-2 ms
    slow = [Bucket(0.010, 0.020, 10)]  # 10 requests over 10-20 ms
    found = merged_percentiles(fast + slow, [50, 90, 95, 100])
    assert found[50] == pytest.approx(0.001 + 0.001 * 50 / 90)
    assert found[90] == pytest.approx(0.002, abs=1e-9)
    assert found[95] == pytest.approx(0.015)
    assert found[100] == pytest.approx(0.020)


def test_overlapping_buckets_of_two_runs_merge() -> None:
    # each run's first bucket starts at its own minimum
    a = [Bucket(0.0010, 0.0020, 10)]
    b = [Bucket(0.0015, 0.0020, 10)]
    found = merged_percentiles(a + b, [50])
    # CDF at x: 10*(x-1)/1 + 10*(x-1.5)/0.5 (ms) = 10 -> x = 1.6667 ms
    assert found[50] == pytest.approx(0.0016667, abs=1e-7)


def test_merged_percentiles_edge_cases() -> None:
    assert merged_percentiles([]) == {}
    assert merged_percentiles([Bucket(0.001, 0.002, 0)]) == {}
    assert merged_percentiles([Bucket(0.003, 0.003, 5)], [50]) == {50: pytest.approx(0.003)}
    with pytest.raises(ValueError):
        merged_percentiles([Bucket(0.001, 0.002, 1)], [0])
