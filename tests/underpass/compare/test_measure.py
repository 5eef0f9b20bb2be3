"""Reading memory and CPU time from /proc: smaps_rollup and stat parsing, the sampler (unit)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from underpass.compare.measure import (
    Memory,
    ProcessGone,
    Sampler,
    cpu_seconds,
    parse_smaps_rollup,
    parse_stat_cpu_ticks,
    read_memory,
)

pytestmark = pytest.mark.unit

# A kernel 6.x smaps_rollup, shortened (the address line and every field kept that matters).
ROLLUP = """\
55741d491000-7ffff8c34000 ---p 00000000 00:00 0                          [rollup]
Rss:               74108 kB
Pss:               41909 kB
Pss_Dirty:         39964 kB
Pss_Anon:          39500 kB
Pss_File:           2409 kB
Pss_Shmem:             0 kB
Shared_Clean:      32000 kB
Private_Dirty:     39964 kB
Swap:                  0 kB
SwapPss:               0 kB
"""


def test_parses_a_fixture_rollup() -> None:
    assert parse_smaps_rollup(ROLLUP) == Memory(
        rss_kib=74108, pss_kib=41909, pss_anon_kib=39500, pss_file_kib=2409
    )


def test_an_older_kernel_without_the_pss_split_still_parses() -> None:
    text = "\n".join(line for line in ROLLUP.splitlines() if not line.startswith("Pss_"))
    memory = parse_smaps_rollup(text)
    assert (memory.rss_kib, memory.pss_kib) == (74108, 41909)
    assert memory.pss_anon_kib is None and memory.pss_file_kib is None


@pytest.mark.parametrize(
    "text",
    ["", "Rss: 10 kB\n", "Pss: 10 kB\n", "Rss: ten kB\nPss: 1 kB\n", "Rss: 10 MB\nPss: 1 kB\n"],
)
def test_rejects_what_is_not_a_rollup(text: str) -> None:
    with pytest.raises(ValueError):
        parse_smaps_rollup(text)


def test_reads_this_process_from_proc() -> None:
    with open("/proc/self/smaps_rollup") as fh:
        text = fh.read()
    parsed = parse_smaps_rollup(text)
    assert 0 < parsed.pss_kib <= parsed.rss_kib
    # Between two readings this process's memory hardly moves: same order of magnitude.
    again = read_memory(os.getpid())
    assert again.rss_kib // 2 < parsed.rss_kib < again.rss_kib * 2
    ballast = bytearray(64 * 1024 * 1024)  # touched pages count: fill them
    ballast[::4096] = b"\1" * len(ballast[::4096])
    grown = read_memory(os.getpid())
    assert grown.rss_kib - again.rss_kib > 50 * 1024
    del ballast


def test_stat_cpu_ticks_count_from_the_last_parenthesis() -> None:
    # comm may contain spaces and ')': fields are counted after the last ')'
    fields = ["S"] + [str(n) for n in range(4, 53)]  # fields 3..52
    fields[11], fields[12] = "250", "75"  # utime, stime (fields 14, 15)
    stat = "1234 (a) b) c) " + " ".join(fields)
    assert parse_stat_cpu_ticks(stat) == 325


def test_cpu_seconds_grow_with_work() -> None:
    before = cpu_seconds(os.getpid())
    deadline = before + 0.05
    while cpu_seconds(os.getpid()) < deadline:
        sum(range(10_000))
    assert cpu_seconds(os.getpid()) >= deadline


def test_a_process_that_exited_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessGone) as raised:
        read_memory(child.pid)
    assert raised.value.pid == child.pid
    with pytest.raises(ProcessGone):
        cpu_seconds(child.pid)


def test_sampler_keeps_idle_peak_end_cpu_and_group_totals() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = os.getpid()
        sampler = Sampler({me: "node-1", sleeper.pid: "node-1"})
        sampler.start()
        sampler.sample()
        sampler.sample()
        sampler.finish()
        for pid in (me, sleeper.pid):
            usage = sampler.usage[pid]
            assert usage.idle and usage.peak and usage.end
            assert usage.peak_rss_kib >= usage.peak.rss_kib > 0
            assert usage.cpu_seconds is not None and usage.cpu_seconds >= 0
            doc = usage.to_dict()
            assert set(doc) == {"idle", "peak", "peak_rss_kib", "end", "cpu_seconds"}
        assert len(sampler.group_totals) == 3  # two samples and the one finish() takes
        peak = sampler.peak_group_pss_kib()["node-1"]
        assert peak == max(totals["node-1"] for _, totals in sampler.group_totals)
        assert peak >= max(u.idle.pss_kib for u in sampler.usage.values() if u.idle)
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(ProcessGone):
        sampler.sample()
