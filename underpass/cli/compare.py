"""``underpass compare``: proxy memory and cost of the deployment modes, measured in the lab.

Owns the command line only: options, signal handling and what is printed;
the work is :mod:`underpass.compare` (``--kube``, the same question asked of a
real cluster, is :mod:`underpass.compare.kube`, with its own options). The lab
comparison needs root (it builds labs). SIGINT
and SIGTERM interrupt it like Ctrl-C, and the clean-up (``lab down`` of every
lab it built, its work directory removed) then runs with both ignored, so
that it finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (inside trio too), so the clean-up
    runs for both; also when started with SIGINT ignored (a background job)."""

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        signal.raise_signal(signal.SIGINT)

    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up, so that clean-up finishes."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 5,10,20, got {text!r}") from None
    if not counts:
        raise argparse.ArgumentTypeError("no pod counts given")
    return counts


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def run_compare(args: argparse.Namespace) -> int:
    import trio

    from underpass.cli.lab import leaf_error
    from underpass.compare.errors import CompareError
    from underpass.compare.report import render_table, target_lines
    from underpass.compare.runner import CompareOptions, Comparison
    from underpass.lab.errors import LabError

    if os.geteuid() != 0:
        print(
            "underpass compare builds labs from network namespaces: run it as root", file=sys.stderr
        )
        return 1
    out_dir = args.out or Path(f"compare-{dt.datetime.now():%Y%m%d-%H%M%S}")
    options = CompareOptions(
        out_dir=out_dir.resolve(),
        nodes=args.nodes,
        pods_per_node=args.pods_per_node,
        modes=args.modes,
        rps=args.rps,
        duration=args.duration,
        service_accounts=args.service_accounts,
        keep_lab=args.keep_lab,
        prefix=args.prefix,
    )
    try:
        comparison = Comparison(options)
    except CompareError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(comparison.run)
        paths = comparison.finish()
        print()
        print(render_table(comparison.runs, comparison.document["baseline"]), end="")
        for line in target_lines(comparison.runs, comparison.document["baseline"]):
            print(line)
        for mode in comparison.document["modes"]:
            for note in mode["notes"]:
                print(f"note ({mode['name']}): {note}")
        print()
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0
    except BaseException as raised:  # trio nurseries wrap errors in groups: unwrap
        error = leaf_error(raised)
        if isinstance(error, KeyboardInterrupt):
            print("\ninterrupted: cleaning up (lab down)", file=sys.stderr)
            return 130
        expected = (CompareError, LabError, OSError, subprocess.SubprocessError, trio.TooSlowError)
        if not isinstance(error, expected):
            raise
        print(f"\ncompare failed: {type(error).__name__}: {error}", file=sys.stderr)
        if comparison.runs:
            print(f"(partial results in {options.out_dir / 'compare.json'})", file=sys.stderr)
        return 1
    finally:
        with _uninterruptible():
            for problem in comparison.cleanup():
                print(problem, file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from underpass import log

    if getattr(args, "kube", False):  # a real cluster: underpass.compare.kube, no lab, no root
        from underpass.compare import kube

        return kube.run_kube(args)
    if not args.verbose:
        log.configure("warning", args.log_format)  # progress lines only, unless asked
    with _signals_interrupt():
        return run_compare(args)


def register(sub: Any) -> None:
    from underpass.compare import kube
    from underpass.compare.catalog import AVAILABLE, DEFAULT_MODES, PLANNED

    p: argparse.ArgumentParser = sub.add_parser(
        "compare",
        help="measure proxy memory, CPU and latency of the deployment modes side by side (root)",
        description="For each pod count, build a lab of its own, set up each deployment mode "
        "in it in turn, drive the same HTTP traffic with Fortio from every pod to a pod on "
        "the next node, and measure every proxy process: PSS and RSS (smaps_rollup), CPU "
        "seconds, request latency. Prints a table with the ratio to Envoy sidecars, writes "
        "compare.json, compare.txt and a chart (compare.svg, compare.png). Needs root; "
        "cleans up on every exit path, Ctrl-C and SIGTERM included.",
    )
    p.add_argument("--nodes", type=int, default=2, help="nodes per lab (default 2)")
    p.add_argument(
        "--pods-per-node",
        type=_counts,
        default=(5, 20),
        metavar="N[,N...]",
        help="pod counts per node, one lab each (default 5,20; e.g. 5,10,20,50)",
    )
    planned = ", ".join(f"{name} ({what.split(',')[0]})" for name, what in PLANNED.items())
    p.add_argument(
        "--modes",
        type=_names,
        default=DEFAULT_MODES,
        metavar="MODE[,MODE...]",
        help=f"modes to compare, in order: {', '.join(AVAILABLE)} (default "
        f"{','.join(DEFAULT_MODES)})" + (f"; planned: {planned}" if planned else ""),
    )
    p.add_argument(
        "--rps", type=float, default=100.0, help="total requests per second (default 100)"
    )
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds of load per mode (default 10)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for compare.json, compare.txt, compare.svg/.png "
        "(default ./compare-<date>-<time>)",
    )
    p.add_argument(
        "--service-accounts",
        type=int,
        default=2,
        help="service accounts the pods are spread over (default 2)",
    )
    p.add_argument(
        "--keep-lab",
        action="store_true",
        help="leave the labs up (also after a failure) and print how to remove them",
    )
    p.add_argument(
        "--prefix",
        default=None,
        help="netns name prefix of the labs (<prefix>-<pods per node>; default random cmpXXXX)",
    )
    p.add_argument("--verbose", action="store_true", help="also show info-level logs")
    kube.add_kube_arguments(p)
    p.set_defaults(func=_run)
