"""Plain-text tables for the command line, in the style of ``istioctl ztunnel-config``.

Owns only rendering: upper-case headers, left-aligned columns padded to the
widest cell, columns separated by spaces, ``-`` for missing values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

GAP = 3  # spaces between columns


def cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The table as text (ends with a newline); headers are upper-cased."""
    head = [h.upper() for h in headers]
    body = [[cell(v) for v in row] for row in rows]
    for row in body:
        if len(row) != len(head):
            raise ValueError(f"row has {len(row)} cells, the table {len(head)} columns")
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(head)]
    lines = []
    for row in [head, *body]:
        padded = [text.ljust(widths[i]) for i, text in enumerate(row)]
        lines.append((" " * GAP).join(padded).rstrip())
    return "\n".join(lines) + "\n"
