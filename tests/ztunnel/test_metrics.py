"""ztunnel.metrics: Istio TCP labels and counters, operator gauges, exposition (unit)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from identity.certmanager import IdentityStatus, Phase
from identity.spiffe import SpiffeId
from ztunnel.metrics import TCP_LABEL_NAMES, TcpLabels, ZtunnelMetrics
from ztunnel.state import Batch, StateStore, Workload

from .builders import policy, service, workload

pytestmark = pytest.mark.unit

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: ZtunnelMetrics) -> Samples:
    """Every sample of the exposition, keyed by (sample name, sorted labels)."""
    body, _ = metrics.render()
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: ZtunnelMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


def label_items(labels: TcpLabels) -> dict[str, str]:
    return dataclasses.asdict(labels)


def pod(
    name: str, namespace: str, *, canonical: str = "", revision: str = "", workload_name: str = ""
) -> Workload:
    return dataclasses.replace(
        workload(name, namespace, ips=["10.244.1.5"], sa=f"{name}-sa"),
        canonical_name=canonical,
        canonical_revision=revision,
        workload_name=workload_name,
    )


# -- labels -----------------------------------------------------------------------------


def test_labels_default_to_unknown_like_istio() -> None:
    labels = TcpLabels()
    for name in TCP_LABEL_NAMES:
        expected = {"request_protocol": "tcp", "response_flags": "-"}.get(name, "unknown")
        assert getattr(labels, name) == expected, name
    assert len(TCP_LABEL_NAMES) == 19


def test_labels_from_model_objects() -> None:
    client = pod("sleep-7d9", "demo", canonical="sleep", revision="v1", workload_name="sleep")
    server = pod("echo-0", "shop", canonical="echo", revision="v2", workload_name="echo")
    svc = service("echo.shop.svc.cluster.local", "shop")
    labels = TcpLabels.for_connection(
        reporter="destination",
        source=client,
        source_principal=client.identity.uri,
        destination=server,
        destination_service=svc,
        destination_principal=server.identity.uri,
        mtls=True,
    )
    assert labels == TcpLabels(
        reporter="destination",
        source_workload="sleep",
        source_canonical_service="sleep",
        source_canonical_revision="v1",
        source_workload_namespace="demo",
        source_principal="spiffe://cluster.local/ns/demo/sa/sleep-7d9-sa",
        source_app="sleep",
        destination_workload="echo",
        destination_canonical_service="echo",
        destination_canonical_revision="v2",
        destination_workload_namespace="shop",
        destination_principal="spiffe://cluster.local/ns/shop/sa/echo-0-sa",
        destination_app="echo",
        destination_service="echo.shop.svc.cluster.local",
        destination_service_namespace="shop",
        destination_service_name="echo",
        request_protocol="tcp",
        response_flags="-",
        connection_security_policy="mutual_tls",
    )


def test_labels_for_unknown_ends_and_plaintext() -> None:
    server = pod("echo-0", "shop")  # no canonical name, revision nor workload name
    labels = TcpLabels.for_connection(
        reporter="source",
        source=None,
        source_principal=None,
        destination=server,
        destination_service=None,
        destination_principal=None,
        mtls=False,
        response_flags="CONNECT_FAILED",
    )
    assert labels.source_workload == "unknown"
    assert labels.source_workload_namespace == "unknown"
    assert labels.source_principal == "unknown"
    # Without a workload name the pod name stands in; canonical labels stay unknown.
    assert labels.destination_workload == "echo-0"
    assert labels.destination_canonical_service == "unknown"
    assert labels.destination_canonical_revision == "unknown"
    assert labels.destination_app == "unknown"
    assert labels.destination_service == "unknown"
    assert labels.connection_security_policy == "none"
    assert labels.response_flags == "CONNECT_FAILED"
    assert labels.reporter == "source"


def test_labels_refuse_an_unknown_reporter() -> None:
    with pytest.raises(ValueError, match="reporter"):
        TcpLabels.for_connection("client", None, None, None, None, None, True)


# -- TCP counters -------------------------------------------------------------------------


def test_tcp_counters_increment_per_label_set() -> None:
    metrics = ZtunnelMetrics(process_metrics=False)
    a = TcpLabels(reporter="source", source_workload="sleep")
    b = TcpLabels(reporter="destination", source_workload="sleep")
    metrics.connection_opened(a)
    metrics.connection_opened(a)
    metrics.connection_opened(b)
    metrics.bytes_transferred(a, received=100, sent=20)
    metrics.bytes_transferred(a, received=5, sent=7)
    metrics.connection_closed(a)

    la, lb = label_items(a), label_items(b)
    assert value(metrics, "istio_tcp_connections_opened_total", **la) == 2
    assert value(metrics, "istio_tcp_connections_opened_total", **lb) == 1
    assert value(metrics, "istio_tcp_connections_closed_total", **la) == 1
    assert value(metrics, "istio_tcp_connections_closed_total", **lb) == 0
    assert value(metrics, "istio_tcp_received_bytes_total", **la) == 105
    assert value(metrics, "istio_tcp_sent_bytes_total", **la) == 27
    assert value(metrics, "istio_tcp_received_bytes_total", **lb) == 0


def test_tcp_counters_carry_every_istio_label() -> None:
    metrics = ZtunnelMetrics(process_metrics=False)
    metrics.connection_opened(TcpLabels(reporter="source"))
    found = [
        labels
        for (name, labels) in samples(metrics)
        if name == "istio_tcp_connections_opened_total"
    ]
    assert len(found) == 1
    assert [k for k, _ in found[0]] == sorted(TCP_LABEL_NAMES)


def test_byte_counts_only_grow() -> None:
    metrics = ZtunnelMetrics(process_metrics=False)
    with pytest.raises(ValueError, match="only grow"):
        metrics.bytes_transferred(TcpLabels(), received=-1, sent=0)


def test_registries_are_private() -> None:
    one = ZtunnelMetrics(process_metrics=False)
    two = ZtunnelMetrics(process_metrics=False)
    labels = TcpLabels(reporter="source")
    one.connection_opened(labels)
    assert value(one, "istio_tcp_connections_opened_total", **label_items(labels)) == 1
    assert value(two, "istio_tcp_connections_opened_total", **label_items(labels)) is None
    assert REGISTRY.get_sample_value("underpass_ztunnel_pods") is None


# -- operator metrics -----------------------------------------------------------------------


def test_operator_gauges_and_counters() -> None:
    metrics = ZtunnelMetrics(process_metrics=False)
    metrics.set_pods(3)
    metrics.set_xds_connected(True)
    metrics.xds_nack()
    metrics.xds_nack()
    metrics.policy_denied("deny_policy")
    metrics.policy_denied("deny_policy")
    metrics.policy_denied("no_allow_match")
    metrics.adjust_active_connections("inbound", 1)
    metrics.adjust_active_connections("inbound", 1)
    metrics.adjust_active_connections("inbound", -1)
    metrics.set_active_connections("outbound", 5)

    assert value(metrics, "underpass_ztunnel_pods") == 3
    assert value(metrics, "underpass_ztunnel_xds_connected") == 1
    assert value(metrics, "underpass_ztunnel_xds_nacks_total") == 2
    assert value(metrics, "underpass_ztunnel_policy_denials_total", reason="deny_policy") == 2
    assert value(metrics, "underpass_ztunnel_policy_denials_total", reason="no_allow_match") == 1
    assert value(metrics, "underpass_ztunnel_connections_active", direction="inbound") == 1
    assert value(metrics, "underpass_ztunnel_connections_active", direction="outbound") == 5
    metrics.set_xds_connected(False)
    assert value(metrics, "underpass_ztunnel_xds_connected") == 0


def test_active_connections_start_at_zero_and_refuse_unknown_directions() -> None:
    metrics = ZtunnelMetrics(process_metrics=False)
    assert value(metrics, "underpass_ztunnel_connections_active", direction="inbound") == 0
    assert value(metrics, "underpass_ztunnel_connections_active", direction="outbound") == 0
    with pytest.raises(ValueError, match="direction"):
        metrics.adjust_active_connections("sideways", 1)


def test_state_sizes_from_a_snapshot() -> None:
    store = StateStore()
    writer = store.claim_writer("test")
    snapshot = writer.replace(
        Batch(
            workloads=(workload("a", ips=["10.0.0.1"]), workload("b", ips=["10.0.0.2"])),
            services=(service("s.default.svc.cluster.local", vips=["10.96.0.1"]),),
            policies=(policy("p1"), policy("p2"), policy("p3")),
        )
    )
    metrics = ZtunnelMetrics(process_metrics=False)
    metrics.observe_snapshot(snapshot)
    assert value(metrics, "underpass_ztunnel_workloads") == 2
    assert value(metrics, "underpass_ztunnel_services") == 1
    assert value(metrics, "underpass_ztunnel_policies") == 3


def _status(name: str, phase: Phase) -> IdentityStatus:
    return IdentityStatus(
        identity=SpiffeId("cluster.local", "demo", name),
        phase=phase,
        references=1,
        serial=None,
        not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        failures=0,
        last_error=None,
        next_attempt_in=None,
    )


def test_certificates_by_state_are_read_at_scrape_time() -> None:
    statuses = [_status("a", Phase.SCHEDULED), _status("b", Phase.SCHEDULED)]
    metrics = ZtunnelMetrics(process_metrics=False)
    assert value(metrics, "underpass_ztunnel_certificates", state="scheduled") is None
    metrics.set_certificate_source(lambda: statuses)
    assert value(metrics, "underpass_ztunnel_certificates", state="scheduled") == 2
    assert value(metrics, "underpass_ztunnel_certificates", state="backoff") == 0
    statuses.append(_status("c", Phase.BACKOFF))
    assert value(metrics, "underpass_ztunnel_certificates", state="backoff") == 1
    for phase in Phase:
        assert value(metrics, "underpass_ztunnel_certificates", state=phase.value) is not None


def test_a_failing_certificate_source_does_not_break_the_scrape() -> None:
    def broken() -> list[IdentityStatus]:
        raise RuntimeError("manager gone")

    metrics = ZtunnelMetrics(certificates=broken, process_metrics=False)
    metrics.set_pods(1)
    assert value(metrics, "underpass_ztunnel_pods") == 1
    assert value(metrics, "underpass_ztunnel_certificates", state="scheduled") is None


# -- exposition ---------------------------------------------------------------------------


def test_render_has_every_name_and_process_metrics() -> None:
    metrics = ZtunnelMetrics()
    metrics.connection_opened(TcpLabels(reporter="source"))
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    for name in (
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "underpass_ztunnel_pods",
        "underpass_ztunnel_workloads",
        "underpass_ztunnel_services",
        "underpass_ztunnel_policies",
        "underpass_ztunnel_xds_connected",
        "underpass_ztunnel_xds_nacks_total",
        "underpass_ztunnel_connections_active",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "python_info",
    ):
        assert f"\n{name}" in text, name
    # The TCP counters are exported without _created series (cardinality).
    assert "istio_tcp_connections_opened_created" not in text
    resident = value(metrics, "process_resident_memory_bytes")
    assert resident is not None and resident > 1_000_000
