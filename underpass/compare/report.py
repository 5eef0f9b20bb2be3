"""The comparison's results: per-run summary, ratios to sidecar mode, table, chart.

Owns turning raw measurements into what people read, without I/O except
the chart file:

- :func:`summarize`: one run (a mode at a pod count) -> proxy memory per
  node and per pod (PSS and RSS), CPU seconds, latency percentiles, errors;
- :func:`add_ratios`: each run's PSS, RSS and CPU as a fraction of the
  baseline mode's (Envoy sidecars) at the same pod count;
- :func:`render_table`: the plain-text table;
- :func:`write_chart`: proxy memory (PSS) per node against pods per node,
  one line per mode (matplotlib, Agg backend), as SVG and PNG.

Memory per node is the highest total PSS of the node's proxies in any one
sample during the load (not a sum of per-process peaks), averaged over the
nodes; RSS per node sums each proxy's highest RSS (an upper bound: shared
pages counted in full for every process).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from underpass.cli.table import render
from underpass.compare.loadgen import PERCENTILES, Bucket, merged_percentiles

KIB_PER_MIB: Final = 1024
#: The issue's target: mode 2's proxy memory per node at most this share of sidecars'.
TARGET_SHARE: Final = 0.05
CHART_NAME: Final = "compare"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(run: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one run (see the module docstring); input is the run's raw JSON."""
    nodes = int(run["nodes"])
    pods_per_node = int(run["pods_per_node"])
    proxies = run["proxies"]
    node_peaks = run["node_peak_pss_kib"]
    pss_per_node = _mean([float(node_peaks.get(f"node-{i}", 0)) for i in range(1, nodes + 1)])
    rss_total = sum(int(p["usage"]["peak_rss_kib"]) for p in proxies)
    cpu = [p["usage"]["cpu_seconds"] for p in proxies]
    cpu_seconds = round(sum(cpu), 3) if cpu and None not in cpu else None
    clients = run["load"]["clients"]
    buckets = [Bucket(*b) for c in clients for b in c["histogram_s"]]
    latency = merged_percentiles(buckets, PERCENTILES)
    requests = sum(int(c["requests"]) for c in clients)
    ok = sum(int(c["ok"]) for c in clients)
    roles: dict[str, int] = {}
    for proxy in proxies:
        roles[str(proxy["role"])] = roles.get(str(proxy["role"]), 0) + 1
    return {
        "proxies": len(proxies),
        "proxy_roles": roles,
        "pss_per_node_kib": round(pss_per_node, 1) if pss_per_node is not None else None,
        "rss_per_node_kib": round(rss_total / nodes, 1),
        "pss_per_pod_kib": (
            round(pss_per_node / pods_per_node, 1) if pss_per_node is not None else None
        ),
        "rss_per_pod_kib": round(rss_total / nodes / pods_per_node, 1),
        "cpu_seconds": cpu_seconds,
        "cpu_ms_per_request": (
            round(cpu_seconds * 1000 / requests, 3)
            if cpu_seconds is not None and requests
            else None
        ),
        "requests": requests,
        "ok": ok,
        "errors": requests - ok,
        "actual_rps": round(sum(float(c["actual_qps"]) for c in clients), 1),
        **{f"p{p:g}_ms": round(v * 1000, 3) for p, v in latency.items()},
    }


def _share(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return round(value / base, 4)


def add_ratios(runs: Sequence[dict[str, Any]], baseline: str) -> None:
    """Set ``summary['vs_baseline']`` on every run: its PSS, RSS and CPU over the
    baseline mode's at the same pod count (None where there is no baseline run)."""
    base = {r["pods_per_node"]: r["summary"] for r in runs if r["mode"] == baseline}
    for run in runs:
        summary = run["summary"]
        ref = base.get(run["pods_per_node"])
        summary["vs_baseline"] = {
            "baseline": baseline,
            "pss_per_node": _share(summary["pss_per_node_kib"], ref and ref["pss_per_node_kib"]),
            "rss_per_node": _share(summary["rss_per_node_kib"], ref and ref["rss_per_node_kib"]),
            "cpu_seconds": _share(summary["cpu_seconds"], ref and ref["cpu_seconds"]),
        }


def mib(kib: float | None) -> str | None:
    return None if kib is None else f"{kib / KIB_PER_MIB:.1f} MiB"


def percent(share: float | None) -> str | None:
    if share is None:
        return None
    return f"{share * 100:.1f}%" if share < 0.1 else f"{share * 100:.0f}%"


#: Shorter names of proxy roles in the table's proxies column.
_ROLE_LABELS: Final = {
    "ztunnel-supervisor": "supervisor",
    "ztunnel-zygote": "zygote",
    "ztunnel-worker": "worker",
    "waypoint-stand-in": "waypoint",
}


def proxies_cell(summary: Mapping[str, Any]) -> str:
    """The proxies column: the count, and what they are when a mode runs several kinds
    (``3 = 2 ztunnel + 1 waypoint``)."""
    total = str(summary["proxies"])
    roles: Mapping[str, int] = summary.get("proxy_roles") or {}
    if len(roles) < 2:
        return total
    parts = " + ".join(f"{count} {_ROLE_LABELS.get(role, role)}" for role, count in roles.items())
    return f"{total} = {parts}"


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def render_table(runs: Sequence[Mapping[str, Any]], baseline: str) -> str:
    """One row per (pod count, mode), in run order; ``-`` where a figure is missing."""
    headers = [
        "pods/node",
        "mode",
        "proxies",
        "PSS/node",
        "RSS/node",
        "PSS/pod",
        "CPU s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "errors",
        f"PSS vs {baseline}",
    ]
    rows = []
    for run in runs:
        s = run["summary"]
        ratios = s.get("vs_baseline") or {}
        rows.append(
            [
                run["pods_per_node"],
                run["mode"],
                proxies_cell(s),
                mib(s["pss_per_node_kib"]),
                mib(s["rss_per_node_kib"]),
                mib(s["pss_per_pod_kib"]),
                None if s["cpu_seconds"] is None else f"{s['cpu_seconds']:.2f}",
                _ms(s.get("p50_ms")),
                _ms(s.get("p90_ms")),
                _ms(s.get("p99_ms")),
                f"{s['errors']}/{s['requests']}",
                percent(ratios.get("pss_per_node")),
            ]
        )
    return render(headers, rows)


def target_lines(runs: Sequence[Mapping[str, Any]], baseline: str, mode: str = "node") -> list[str]:
    """What was measured against the issue's target (mode 2 at most 5% of sidecars)."""
    lines = []
    for run in runs:
        if run["mode"] != mode:
            continue
        share = (run["summary"].get("vs_baseline") or {}).get("pss_per_node")
        if share is None:
            continue
        verdict = "meets" if share <= TARGET_SHARE else "misses"
        lines.append(
            f"{run['pods_per_node']} pods/node: {mode} proxy memory per node is "
            f"{percent(share)} of {baseline}'s ({verdict} the {TARGET_SHARE:.0%} target)"
        )
    return lines


def spread_labels(positions: Sequence[float], gap: float) -> list[float]:
    """Label positions (same units as ``positions``, any order) moved apart to at least
    ``gap`` from each other, each as little as possible upwards, in the input's order."""
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    placed = [0.0] * len(positions)
    floor = float("-inf")
    for i in order:
        placed[i] = max(positions[i], floor + gap)
        floor = placed[i]
    return placed


def _one_two_five(low: float, high: float) -> list[float]:
    """1, 2, 5, 10, 20, 50... between ``low`` and ``high`` (tick marks of a log axis)."""
    ticks = []
    decade = 10.0 ** math.floor(math.log10(max(low, 1e-9)))
    while decade <= high:
        ticks += [m * decade for m in (1, 2, 5) if low <= m * decade <= high]
        decade *= 10
    return ticks


#: Vertical room (points) for a value label on the chart.
LABEL_GAP_PT: Final = 9.0


def write_chart(
    runs: Sequence[Mapping[str, Any]], titles: Mapping[str, str], out_dir: Path, baseline: str
) -> list[Path]:
    """``compare.svg`` and ``compare.png`` in ``out_dir``: PSS per node against pods
    per node, one line per mode, each point labelled with its value; returns the
    paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    from matplotlib.figure import Figure

    by_mode: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        pss = run["summary"]["pss_per_node_kib"]
        if pss is not None:
            by_mode.setdefault(run["mode"], []).append((int(run["pods_per_node"]), pss / 1024))
    if not by_mode:
        raise ValueError("no run has a memory figure to chart")
    figure = Figure(figsize=(7.5, 5.4), dpi=110)
    axes = figure.add_subplot()
    colors: dict[str, Any] = {}
    for mode, points in by_mode.items():
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        (line,) = axes.plot(xs, ys, marker="o", label=titles.get(mode, mode))
        colors[mode] = line.get_color()
    if baseline in by_mode:
        points = sorted(by_mode[baseline])
        axes.plot(
            [p[0] for p in points],
            [p[1] * TARGET_SHARE for p in points],
            linestyle="--",
            color="grey",
            label=f"target: {TARGET_SHARE:.0%} of {baseline}",
        )
    values = [y for points in by_mode.values() for _, y in points]
    if max(values) / max(min(values), 1e-9) > 5:
        axes.set_yscale("log")  # ztunnel and a hundred sidecars on one readable chart
        low, high = axes.get_ylim()
        ticks = _one_two_five(low, high)
        axes.set_yticks(ticks, [f"{t:g}" for t in ticks])
        axes.set_yticks([], minor=True)
    else:
        axes.set_ylim(bottom=0)
    axes.margins(x=0.1)  # room for the value labels at both ends
    axes.set_xticks(sorted({x for points in by_mode.values() for x, _ in points}))
    axes.set_xlabel("pods per node")
    axes.set_ylabel("proxy memory per node, PSS (MiB)")
    axes.set_title("Proxy memory per node: ambient vs sidecar")
    axes.grid(True, which="both", alpha=0.3)
    # below the plot: with six modes, a legend inside would hide lines
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.tight_layout()
    # Value labels right of each point; at one pod count, close values (two Envoy
    # modes within 1%) are spread apart so that each stays readable.
    points_per_pt = figure.dpi / 72
    by_x: dict[int, list[tuple[str, float]]] = {}
    for mode, points in by_mode.items():
        for x, y in points:
            by_x.setdefault(x, []).append((mode, y))
    for x, labels in by_x.items():
        heights = [float(axes.transData.transform((x, y))[1]) / points_per_pt for _, y in labels]
        for (mode, y), height, placed in zip(
            labels, heights, spread_labels(heights, LABEL_GAP_PT), strict=True
        ):
            axes.annotate(
                f"{y:.0f}",
                (x, y),
                textcoords="offset points",
                xytext=(7, placed - height - 3),
                fontsize=8,
                color=colors[mode],
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": CHART_NAME}):
        for suffix in ("svg", "png"):
            path = out_dir / f"{CHART_NAME}.{suffix}"
            figure.savefig(
                path,
                format=suffix,
                bbox_inches="tight",
                metadata={"Date": None} if suffix == "svg" else {},
            )
            written.append(path)
    return written
