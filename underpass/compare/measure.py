"""What a process costs, read from ``/proc``: memory (RSS, PSS) and CPU seconds.

Owns reading and parsing ``/proc/<pid>/smaps_rollup`` and ``/proc/<pid>/stat``,
and sampling a set of processes over a run (:class:`Sampler`).

PSS (proportional set size) charges each shared page to the processes that
map it in equal parts: N Envoys mapping the same 100 MB binary are charged
100/N MB each for it, which RSS would count N times. That makes PSS the fair
figure for "memory this mode costs the node"; RSS is kept alongside as the
upper bound. CPU seconds are user + system time of all the process's threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
#: smaps_rollup fields kept (kB in the file, KiB here).
_FIELDS: Final = {
    "Rss": "rss_kib",
    "Pss": "pss_kib",
    "Pss_Anon": "pss_anon_kib",
    "Pss_File": "pss_file_kib",
}


class ProcessGone(LookupError):
    """The process exited (or never existed) while it was being measured."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"process {pid} is gone")
        self.pid = pid


@dataclass(frozen=True)
class Memory:
    """One reading of a process's memory, in KiB."""

    rss_kib: int
    pss_kib: int
    pss_anon_kib: int | None = None  # kernels before 5.x do not split PSS
    pss_file_kib: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {
            "rss_kib": self.rss_kib,
            "pss_kib": self.pss_kib,
            "pss_anon_kib": self.pss_anon_kib,
            "pss_file_kib": self.pss_file_kib,
        }


def parse_smaps_rollup(text: str) -> Memory:
    """The :class:`Memory` in the text of an ``smaps_rollup`` file.

    Raises ``ValueError`` when Rss or Pss is missing (not an smaps_rollup file,
    or a kernel thread, whose rollup is empty).
    """
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        name = _FIELDS.get(key.strip())
        if not sep or name is None:
            continue
        parts = rest.split()
        if len(parts) != 2 or parts[1] != "kB" or not parts[0].isdigit():
            raise ValueError(f"unexpected smaps_rollup line {line!r}")
        found[name] = int(parts[0])
    if "rss_kib" not in found or "pss_kib" not in found:
        raise ValueError("no Rss/Pss lines: not an smaps_rollup file of a user process")
    return Memory(
        rss_kib=found["rss_kib"],
        pss_kib=found["pss_kib"],
        pss_anon_kib=found.get("pss_anon_kib"),
        pss_file_kib=found.get("pss_file_kib"),
    )


def read_memory(pid: int) -> Memory:
    """The process's memory now; :class:`ProcessGone` if it exited."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    if not text:  # a zombie: its address space is gone already
        raise ProcessGone(pid)
    return parse_smaps_rollup(text)


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may hold spaces or ')',
    so fields are counted from the last ')'.
    """
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (all its threads) has used so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(pid) from None
    return parse_stat_cpu_ticks(stat) / CLOCK_TICKS


@dataclass
class ProcessUsage:
    """What one process used during a run."""

    idle: Memory | None = None  # before the load started
    peak: Memory | None = None  # highest PSS seen during the load (with its RSS)
    peak_rss_kib: int = 0  # highest RSS seen (maybe at another moment)
    end: Memory | None = None  # right after the load
    cpu_start: float | None = None
    cpu_end: float | None = None

    @property
    def cpu_seconds(self) -> float | None:
        if self.cpu_start is None or self.cpu_end is None:
            return None
        return round(self.cpu_end - self.cpu_start, 3)

    def to_dict(self) -> dict[str, object]:
        return {
            "idle": self.idle.to_dict() if self.idle else None,
            "peak": self.peak.to_dict() if self.peak else None,
            "peak_rss_kib": self.peak_rss_kib,
            "end": self.end.to_dict() if self.end else None,
            "cpu_seconds": self.cpu_seconds,
        }


@dataclass
class Sampler:
    """Samples a fixed set of processes: idle reading, CPU start, samples, end.

    Every sample also records the PSS total per group (a node), so that the
    peak of the *sum* is known, not only the sum of per-process peaks.
    """

    pids: Mapping[int, str]  # pid -> group (node name)
    usage: dict[int, ProcessUsage] = field(default_factory=dict)
    group_totals: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.usage = {pid: ProcessUsage() for pid in self.pids}

    def start(self) -> None:
        """Idle memory and the CPU counters, just before the load."""
        for pid, usage in self.usage.items():
            usage.idle = read_memory(pid)
            usage.cpu_start = cpu_seconds(pid)
        self._t0 = time.monotonic()

    def sample(self) -> None:
        totals: dict[str, int] = dict.fromkeys(self.pids.values(), 0)
        for pid, usage in self.usage.items():
            memory = read_memory(pid)
            if usage.peak is None or memory.pss_kib > usage.peak.pss_kib:
                usage.peak = memory
            usage.peak_rss_kib = max(usage.peak_rss_kib, memory.rss_kib)
            totals[self.pids[pid]] += memory.pss_kib
        self.group_totals.append((round(time.monotonic() - self._t0, 3), totals))

    def finish(self) -> None:
        """CPU counters and the end reading, right after the load."""
        for pid, usage in self.usage.items():
            usage.cpu_end = cpu_seconds(pid)
        self.sample()
        for pid, usage in self.usage.items():
            usage.end = read_memory(pid)

    def peak_group_pss_kib(self) -> dict[str, int]:
        """Per group, the highest PSS total seen in one sample."""
        peaks: dict[str, int] = dict.fromkeys(self.pids.values(), 0)
        for _, totals in self.group_totals:
            for group, total in totals.items():
                peaks[group] = max(peaks[group], total)
        return peaks
