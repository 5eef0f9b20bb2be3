"""Evidence that a mode's traffic went through its proxies with mTLS: who reached whom, as whom.

Owns reading the two records a ztunnel keeps of its connections, without
any I/O but reading a log file:

- its Prometheus metrics (``istio_tcp_connections_opened_total`` with
  ``connection_security_policy="mutual_tls"``): :func:`mtls_links` counts the
  mTLS connections per :class:`Link` (source and destination workload, and
  the SPIFFE identity each end proved) for one reporter;
- its JSON access log (one ``connection complete`` line per connection):
  :func:`read_log_lines` reads the lines written after an offset (for the
  processes that serve no metrics: a mode-3 worker), and :func:`hbone_links`
  counts the HBONE (mTLS) ones per :class:`Link`.

:func:`missing` then says which client -> server pairs of a workload have no
such connection: a mode whose traffic bypassed its proxies (or went in
plaintext) has some, and the comparison fails rather than measure a proxy
that carried nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

from prometheus_client.parser import text_string_to_metric_families

OPENED: Final = "istio_tcp_connections_opened_total"
ACCESS_EVENT: Final = "connection complete"
HBONE: Final = "HBONE"


class Link(NamedTuple):
    """One end-to-end relation: workloads as ``<namespace>/<name>``, identities as SPIFFE URIs."""

    source: str
    destination: str
    source_identity: str
    destination_identity: str


def mtls_links(metrics_text: str, reporter: str) -> Counter[Link]:
    """mTLS connections opened, per link, as ``reporter`` saw them (``source``: the
    client's proxy, ``destination``: the server's)."""
    found: Counter[Link] = Counter()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name != OPENED
                or labels.get("reporter") != reporter
                or labels.get("connection_security_policy") != "mutual_tls"
            ):
                continue
            link = Link(
                f"{labels.get('source_workload_namespace')}/{labels.get('source_workload')}",
                f"{labels.get('destination_workload_namespace')}/"
                f"{labels.get('destination_workload')}",
                labels.get("source_principal", ""),
                labels.get("destination_principal", ""),
            )
            found[link] += int(sample.value)
    return found


def read_log_lines(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The JSON lines written to ``path`` after byte ``offset``, and the offset to read on from.

    A line still being written (no newline yet) is left for the next read;
    lines that are not JSON objects (a traceback) are skipped.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    entries = []
    for raw in complete.splitlines():
        if not raw.startswith(b"{"):
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries, offset + len(complete)


def hbone_links(entries: Iterable[dict[str, Any]], direction: str) -> Counter[Link]:
    """HBONE connections per link among access-log ``entries`` of ``direction``
    (``inbound`` or ``outbound``)."""
    found: Counter[Link] = Counter()
    for entry in entries:
        if (
            entry.get("event") == ACCESS_EVENT
            and entry.get("direction") == direction
            and entry.get("protocol") == HBONE
        ):
            found[
                Link(
                    str(entry.get("src_workload")),
                    str(entry.get("dst_workload")),
                    str(entry.get("src_identity")),
                    str(entry.get("dst_identity")),
                )
            ] += 1
    return found


def missing(wanted: Sequence[Link], seen: Counter[Link]) -> list[Link]:
    """The links of ``wanted`` that ``seen`` holds no connection of."""
    return [link for link in wanted if seen[link] <= 0]


def describe(links: Sequence[Link], limit: int = 3) -> str:
    """A short list for an error message: ``a -> b (as x, to y)``, and how many more."""
    shown = [
        f"{link.source} -> {link.destination} (as {link.source_identity}, "
        f"to {link.destination_identity})"
        for link in links[:limit]
    ]
    more = f" and {len(links) - limit} more" if len(links) > limit else ""
    return "; ".join(shown) + more
