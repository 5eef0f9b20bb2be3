"""underpass.promtext: the text exposition, checked with prometheus_client as the oracle."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from underpass import promtext
from underpass.promtext import ExpositionError, Family

pytestmark = pytest.mark.unit


def parse(body: bytes) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Family name -> [(sample name, labels, value)], by prometheus_client's parser."""
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        out[family.name] = [(s.name, dict(s.labels), s.value) for s in family.samples]
    return out


def test_counter_and_gauge_families_as_prometheus_reads_them() -> None:
    opened = Family("conns_opened", "Connections opened.", "counter", ("reporter", "peer"))
    opened.add(("source", "a"), 3)
    opened.add(("destination", "b"), 12_345_678_901_234)  # exact, not a rounded float
    active = Family("conns_active", "Open now.", "gauge")
    active.add((), 2)
    body = promtext.render([opened, active])
    text = body.decode()
    assert "# TYPE conns_opened_total counter\n" in text
    assert "# TYPE conns_active gauge\n" in text
    assert 'conns_opened_total{reporter="destination",peer="b"} 12345678901234\n' in text
    families = parse(body)
    assert families["conns_opened"] == [
        ("conns_opened_total", {"reporter": "source", "peer": "a"}, 3.0),
        ("conns_opened_total", {"reporter": "destination", "peer": "b"}, 12345678901234.0),
    ]
    assert families["conns_active"] == [("conns_active", {}, 2.0)]


label_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
sample_value = st.one_of(
    st.integers(min_value=0, max_value=2**62),
    st.floats(allow_nan=True, allow_infinity=True),
)


#: Help texts are our own prose: no control characters, no edge whitespace.
help_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=60).map(
    str.strip
)


@given(
    values=st.lists(st.tuples(label_text, sample_value), min_size=1, max_size=5), help_=help_text
)
def test_any_label_value_and_number_survive_the_round_trip(
    values: list[tuple[str, float]], help_: str
) -> None:
    family = Family("probe", help_, "gauge", ("value",))
    for label, number in values:
        family.add((label,), number)
    (parsed,) = text_string_to_metric_families(promtext.render([family]).decode())
    assert parsed.documentation == help_
    assert len(parsed.samples) == len(values)
    for sample, (label, number) in zip(parsed.samples, values, strict=True):
        assert sample.labels == {"value": label}
        if isinstance(number, float) and math.isnan(number):
            assert math.isnan(sample.value)
        else:
            assert sample.value == number


def test_a_sample_with_the_wrong_number_of_labels_is_refused() -> None:
    family = Family("x", "x", "counter", ("a", "b"))
    with pytest.raises(ExpositionError, match="1 label values"):
        family.add(("only-one",), 1)
    assert family.samples == []


def test_special_values_are_written_as_prometheus_spells_them() -> None:
    assert promtext.format_value(math.inf) == "+Inf"
    assert promtext.format_value(-math.inf) == "-Inf"
    assert promtext.format_value(math.nan) == "NaN"
    assert promtext.format_value(True) == "1"
    assert promtext.format_value(0.25) == "0.25"


def _client_process_samples() -> dict[str, float]:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return {s.name: s.value for metric in registry.collect() for s in metric.samples}


def test_process_families_match_prometheus_clients_own_collector() -> None:
    ours = {
        name: samples[0][2]
        for name, samples in parse(promtext.render(promtext.process_families())).items()
    }
    theirs = _client_process_samples()
    assert set(ours) == {
        "process_cpu_seconds",
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
    }
    assert ours["process_max_fds"] == theirs["process_max_fds"]
    assert ours["process_start_time_seconds"] == pytest.approx(
        theirs["process_start_time_seconds"], abs=0.02
    )
    # Read a moment apart: memory and fds may move a little, never by much.
    assert ours["process_resident_memory_bytes"] == pytest.approx(
        theirs["process_resident_memory_bytes"], rel=0.05
    )
    assert abs(ours["process_open_fds"] - theirs["process_open_fds"]) <= 2
    assert 0 < ours["process_cpu_seconds"] <= theirs["process_cpu_seconds_total"] + 0.05


def test_process_families_of_a_missing_process_are_empty(tmp_path: os.PathLike[str]) -> None:
    assert promtext.process_families(str(tmp_path)) == []


def test_python_info_matches_prometheus_clients_platform_collector() -> None:
    registry = CollectorRegistry()
    PlatformCollector(registry=registry)
    (theirs,) = [s.labels for m in registry.collect() for s in m.samples]
    exposed = parse(promtext.render([promtext.python_info()]))
    (ours,) = [labels for _, labels, _ in exposed["python_info"]]
    assert ours == theirs
