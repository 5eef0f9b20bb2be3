"""``underpass ca``: run the certificate authority (placeholder until the CA service lands)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "ca", help="run the Underpass certificate authority"
    )
    p.set_defaults(func=lambda _a: 1)
