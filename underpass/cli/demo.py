"""``underpass demo``: the main demo (placeholder until the CA service lands)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("demo", help="run the demo")
    p.set_defaults(func=lambda _a: 1)
