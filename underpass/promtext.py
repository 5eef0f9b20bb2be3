"""Prometheus text exposition (format 0.0.4) for the data-plane processes.

Owns :class:`Family` (one metric family and its samples), :func:`render`
(the exposition bytes), and the standard ``process_*`` and ``python_info``
families read from ``/proc``.

Why not prometheus_client here: the node-shared ztunnel is the process whose
memory the mesh is judged by, and prometheus_client brings its HTTP servers,
``urllib.request``, ``email`` and ``html`` along (about 2.5 MiB of a ~40 MiB
process, measured). ztunnel keeps its counters in plain integers anyway and
only needs to write them out when scraped, which is this module. The control
plane keeps prometheus_client; tests check this module's output with
prometheus_client's parser.

Output follows what prometheus_client's ``generate_latest`` writes: ``# HELP``
and ``# TYPE`` per family (a counter's family name gets ``_total``), label
values escaped (backslash, double quote, newline), ``+Inf``/``-Inf``/``NaN``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

MetricType = Literal["counter", "gauge"]


class ExpositionError(ValueError):
    """A family or sample that cannot be exposed (a programming error, not input)."""


@dataclass(slots=True)
class Family:
    """One metric family: its name (without ``_total``), help, type, label names and samples."""

    name: str
    help: str
    type: MetricType
    labelnames: tuple[str, ...] = ()
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def add(self, labelvalues: Sequence[str], value: float) -> None:
        if len(labelvalues) != len(self.labelnames):
            raise ExpositionError(
                f"{self.name}: {len(labelvalues)} label values for labels {self.labelnames}"
            )
        self.samples.append((tuple(labelvalues), value))


def render(families: Iterable[Family]) -> bytes:
    """The text exposition of ``families``, in order."""
    out: list[str] = []
    for family in families:
        name = family.name + "_total" if family.type == "counter" else family.name
        out.append(f"# HELP {name} {_escape_help(family.help)}\n")
        out.append(f"# TYPE {name} {family.type}\n")
        names = family.labelnames
        for values, value in family.samples:
            if names:
                labels = ",".join(
                    f'{k}="{_escape_label(v)}"' for k, v in zip(names, values, strict=True)
                )
                out.append(f"{name}{{{labels}}} {format_value(value)}\n")
            else:
                out.append(f"{name} {format_value(value)}\n")
    return "".join(out).encode("utf-8")


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (integers exactly, floats by ``repr``)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- process_* and python_info ----------------------------------------------------------

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


_BOOT_TIME: Final = _boot_time()


def process_families(proc: str = "/proc/self") -> list[Family]:
    """``process_*`` as the Prometheus client libraries name them, from ``/proc``.

    CPU seconds (user + system), resident and virtual memory, start time, open
    and maximum file descriptors. Empty where ``/proc`` cannot be read (not
    Linux): the scrape goes on without them.
    """
    try:
        with open(f"{proc}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return []
    # Fields after the command name, which is in parentheses and may hold anything.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    start_ticks = int(fields[19])
    vsize, rss_pages = int(fields[20]), int(fields[21])
    families = [
        _single(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            "counter",
            (utime + stime) / _CLOCK_TICKS,
        ),
        _single("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge", vsize),
        _single(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            rss_pages * _PAGE_SIZE,
        ),
    ]
    if _BOOT_TIME is not None:
        families.append(
            _single(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                "gauge",
                _BOOT_TIME + start_ticks / _CLOCK_TICKS,
            )
        )
    try:
        open_fds = len(os.listdir(f"{proc}/fd"))
    except OSError:
        open_fds = None
    if open_fds is not None:
        families.append(
            _single("process_open_fds", "Number of open file descriptors.", "gauge", open_fds)
        )
    max_fds = _max_open_files(proc)
    if max_fds is not None:
        families.append(
            _single("process_max_fds", "Maximum number of open file descriptors.", "gauge", max_fds)
        )
    return families


def _max_open_files(proc: str) -> int | None:
    try:
        with open(f"{proc}/limits", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    soft = line.split()[3]
                    return int(soft) if soft.isdigit() else None
    except OSError:
        return None
    return None


def python_info() -> Family:
    """``python_info``: one constant sample naming the interpreter."""
    family = Family(
        "python_info",
        "Python platform information",
        "gauge",
        ("implementation", "major", "minor", "patchlevel", "version"),
    )
    name = sys.implementation.name
    impl = {"cpython": "CPython", "pypy": "PyPy"}.get(name, name)
    v = sys.version_info
    version = sys.version.split()[0]  # what platform.python_version() says, without importing it
    family.add((impl, str(v.major), str(v.minor), str(v.micro), version), 1)
    return family


def _single(name: str, help_text: str, kind: MetricType, value: float) -> Family:
    family = Family(name, help_text, kind)
    family.add((), value)
    return family


__all__ = [
    "CONTENT_TYPE",
    "ExpositionError",
    "Family",
    "MetricType",
    "format_value",
    "process_families",
    "python_info",
    "render",
]
