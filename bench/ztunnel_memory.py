"""Benchmark: where a ztunnel process's memory goes, layer by layer, against its budget.

``underpass compare`` measures the whole process in the lab; this splits it.
A fresh interpreter, started as the lab starts a proxy (``PYTHONOPTIMIZE=2``,
``MALLOC_ARENA_MAX=2``, ``-m`` from the venv), imports ztunnel's dependencies
one layer at a time and reads its own ``/proc/self/smaps_rollup`` after each:

    interpreter -> trio -> ssl, h2 (HBONE) -> structlog -> protobuf + our
    messages -> xds-protos (Delta ADS messages) -> h11 (admin) -> cryptography
    -> ztunnel itself (every module ``underpass ztunnel`` loads)

For each layer: RSS, anonymous memory and PSS added, and the size of the code
objects the layer's modules hold (unmarshalled bytecode: most of a Python
process's private memory). A second run with ``PYTHONOPTIMIZE=0`` shows what
dropping docstrings saves. With ``--sidecar-pss-mib`` (or ``--compare`` and
the ``compare.json`` of an ``underpass compare`` run) it prints the budget
that "mode 2 at most 5% of the Envoy sidecars' PSS at 20 pods per node" leaves,
and the layer at which the budget is spent.

Runs as any user, needs no lab. PSS here is the process alone (its file
pages shared with fewer processes than in the lab), so totals are a little
above the lab's; the anonymous memory is the same. Asserts nothing.

    .venv/bin/python -m bench.ztunnel_memory [--compare DIR/compare.json] [--pods-per-node 20]
        [--out ztunnel_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: (layer, modules it imports), in order; each layer's figures are what it adds.
LAYERS: list[tuple[str, list[str]]] = [
    ("interpreter (venv, site)", []),
    ("trio", ["trio"]),
    ("ssl + h2 (HBONE)", ["ssl", "h2.connection", "h2.config", "h2.events"]),
    ("structlog", ["structlog"]),
    (
        "protobuf + our messages",
        ["underpass.proto.workload_pb2", "underpass.proto.authorization_pb2", "underpass.zds"],
    ),
    (
        "xds-protos (Delta ADS)",
        ["envoy.service.discovery.v3.discovery_pb2", "envoy.config.core.v3.base_pb2"],
    ),
    ("h11 (admin HTTP)", ["h11"]),
    (
        "identity (keys via libcrypto, DER)",
        ["identity.keys", "identity.der", "identity.certmanager"],
    ),
    ("ztunnel (every module it loads)", ["underpass.cli.ztunnel", "ztunnel.app"]),
]

#: The child: imports each layer, reports memory and the code size of new modules.
PROBE = r"""
import json, marshal, sys, importlib, importlib.util
layers = json.loads(sys.argv[1])

def rollup():
    out = {}
    with open("/proc/self/smaps_rollup") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key.strip()] = int(parts[0])
    return {"rss": out["Rss"], "anon": out["Anonymous"], "pss": out["Pss"]}

def code_kib(names):
    # Bytecode as it is held in memory: the size marshal writes is a close,
    # stable proxy (the in-memory objects are somewhat larger).
    total = 0
    for name in names:
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            source = open(spec.origin, "rb").read()
            code = compile(source, spec.origin, "exec", optimize=sys.flags.optimize)
        except (OSError, SyntaxError):
            continue
        total += len(marshal.dumps(code))
    return total // 1024

import gc
rows = []
for label, modules in layers:
    before = set(sys.modules)
    for name in modules:
        importlib.import_module(name)
    if label.startswith("ztunnel"):
        import underpass.cli.main
        underpass.cli.main.build_parser("ztunnel")
    gc.collect()
    new = sorted(set(sys.modules) - before)
    rows.append({"layer": label, "modules": new, **rollup()})
# Code sizes last: compiling allocates, and would be counted in the next layer.
for row in rows:
    row["code_kib"] = code_kib(row["modules"])
    row["modules"] = len(row["modules"])
print(json.dumps(rows))
"""


def measure(optimize: int) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONOPTIMIZE=str(optimize), MALLOC_ARENA_MAX="2")
    if optimize == 0:
        env.pop("PYTHONOPTIMIZE")
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(LAYERS)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        raise SystemExit(f"the probe failed:\n{result.stderr[-3000:]}")
    rows: list[dict[str, Any]] = json.loads(result.stdout.strip().splitlines()[-1])
    return rows


def sidecar_pss_from_compare(path: Path, pods_per_node: int) -> float:
    """PSS per node (MiB) of the Envoy sidecars at ``pods_per_node`` in a compare.json."""
    data = json.loads(path.read_text())
    for run in data["runs"]:
        if run["mode"] == "sidecar-envoy" and run["pods_per_node"] == pods_per_node:
            peaks = [float(v) for v in run["node_peak_pss_kib"].values()]
            return sum(peaks) / len(peaks) / 1024
    raise SystemExit(f"{path}: no sidecar-envoy run at {pods_per_node} pods per node")


def table(rows: list[dict[str, Any]], plain: list[dict[str, Any]], budget: float | None) -> str:
    head = (
        f"{'LAYER':36} {'MODULES':>7} {'+CODE':>8} {'+ANON':>8} {'+PSS':>8} "
        f"{'PSS':>9} {'ANON':>9} {'ANON -O0':>9}"
    )
    lines = [head]
    prev: dict[str, Any] | None = None
    spent = None
    for row, row0 in zip(rows, plain, strict=True):

        def add(key: str, row: dict[str, Any] = row, prev: dict[str, Any] | None = prev) -> str:
            value = row[key] - (prev[key] if prev else 0)
            return f"{value / 1024:7.1f}M"

        lines.append(
            f"{row['layer']:36} {row['modules']:>7} {row['code_kib'] / 1024:7.1f}M "
            f"{add('anon')} {add('pss')} {row['pss'] / 1024:8.1f}M "
            f"{row['anon'] / 1024:8.1f}M {row0['anon'] / 1024:8.1f}M"
        )
        if budget is not None and spent is None and row["pss"] / 1024 > budget:
            spent = row["layer"]
        prev = row
    if budget is not None:
        lines.append("")
        lines.append(
            f"budget (5% of the Envoy sidecars' PSS per node): {budget:.1f} MiB; "
            + (f"spent at layer: {spent}" if spent else "not spent by the whole ztunnel")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--compare", type=Path, help="compare.json of an `underpass compare` run")
    parser.add_argument("--pods-per-node", type=int, default=20)
    parser.add_argument(
        "--sidecar-pss-mib", type=float, help="Envoy sidecars' PSS per node (instead of --compare)"
    )
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    sidecars = args.sidecar_pss_mib
    if args.compare is not None:
        sidecars = sidecar_pss_from_compare(args.compare, args.pods_per_node)
    budget = sidecars * 0.05 if sidecars is not None else None
    optimized = measure(2)
    plain = measure(0)
    print(table(optimized, plain, budget))
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "python": sys.version.split()[0],
                    "sidecar_pss_mib": sidecars,
                    "budget_mib": budget,
                    "layers_optimize_2": optimized,
                    "layers_optimize_0": plain,
                },
                indent=2,
            )
        )
        print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
