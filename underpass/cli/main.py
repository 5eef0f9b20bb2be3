"""Entry point of the ``underpass`` console script."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from underpass import __version__, log

#: Each command and the module that registers it. Only the module of the command
#: being run is imported (a ztunnel should not carry the lab's or compare's code).
COMMANDS: dict[str, str] = {
    "ca": "underpass.cli.ca",
    "demo": "underpass.cli.demo",
    "cni-agent": "underpass.cli.cni_agent",
    "lab": "underpass.cli.lab",
    "discovery": "underpass.cli.discovery",
    "ztunnel": "underpass.cli.ztunnel",
    "zc": "underpass.cli.zc",
    "compare": "underpass.cli.compare",
}
_GLOBAL_OPTIONS_WITH_VALUE = ("--log-level", "--log-format")


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word in ``argv`` (skipping the global options), if any."""
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in _GLOBAL_OPTIONS_WITH_VALUE:
            skip = True
            continue
        if word.startswith("-"):
            continue
        return word
    return None


def _modules(command: str | None) -> list[ModuleType]:
    names = [COMMANDS[command]] if command in COMMANDS else list(COMMANDS.values())
    return [importlib.import_module(name) for name in names]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or only ``command``'s (what ``main`` runs)."""
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
    for module in _modules(command):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(words))
    args = parser.parse_args(words)
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
