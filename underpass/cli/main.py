"""Entry point of the ``underpass`` console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from underpass import __version__, log
from underpass.cli import ca, cni_agent, compare, demo, discovery, lab, zc, ztunnel

COMMAND_MODULES = (ca, demo, cni_agent, lab, discovery, ztunnel, zc, compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="underpass",
        description=(
            "Underpass: a node-shared (ambient) service mesh. One ztunnel per node gives "
            "every pod mTLS with its own SPIFFE identity; waypoints add L7 only where asked."
        ),
    )
    parser.add_argument(
        "--log-level", default="info", choices=log.LEVELS, help="log level (default: info)"
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=None,
        help="log format (default: console on a terminal, else json)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser("version", help="print the Underpass version")
    version.set_defaults(func=lambda _args: print(f"underpass {__version__}") or 0)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    log.configure(args.log_level, args.log_format)
    try:
        result: int | None = args.func(args)
    except KeyboardInterrupt:
        return 130
    return result or 0


if __name__ == "__main__":
    sys.exit(main())
