"""ztunnel's Prometheus metrics: Istio's TCP telemetry plus operator gauges.

Owns :class:`ZtunnelMetrics` (every value ztunnel exports, in plain integers
of its own: no process-global registry), :class:`TcpLabels` (the label set of
one connection, as Istio names it: PROTOCOLS.md section 8) and
:class:`CertificateCollector`.

- TCP metrics (``istio_tcp_connections_opened_total``,
  ``istio_tcp_connections_closed_total``, ``istio_tcp_received_bytes_total``,
  ``istio_tcp_sent_bytes_total``) are plain integers in a dict keyed by the
  frozen :class:`TcpLabels`, exported by a custom collector at scrape time.
  The data path pays one dict lookup and an addition per call: no lock, no
  per-call label validation, and no ``_created`` series doubling the
  (high-cardinality) output. Istio's meaning of the byte counters:
  *received* is the request direction (client to server), *sent* the
  response direction (server to client), whichever side reports.
- Operator metrics (``underpass_ztunnel_*``): pods handled, state sizes, xDS
  connectivity and NACKs, policy denials by reason, active connections by
  direction, and certificates by state, read through a callback when scraped.
- Process CPU and memory (``process_*``) and the Python platform
  (``python_info``), named as the Prometheus client libraries name them.

The exposition is written by :mod:`underpass.promtext`, not prometheus_client,
whose HTTP servers and their imports would cost this process ~2.5 MiB for
nothing (see there).

Every method is meant to be called from the trio thread (the data path and
the admin server live there); the certificate callback is called by
:meth:`ZtunnelMetrics.render`, so render on the thread the callback expects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import astuple, dataclass, fields
from typing import Final

import structlog

from identity.certmanager import IdentityStatus, Phase
from underpass import promtext
from underpass.promtext import Family
from ztunnel.state.model import Service, Workload
from ztunnel.state.store import Snapshot

log = structlog.get_logger("ztunnel.metrics")

UNKNOWN: Final = "unknown"
REPORTERS: Final = ("source", "destination")
DIRECTIONS: Final = ("inbound", "outbound")
MUTUAL_TLS: Final = "mutual_tls"
NO_TLS: Final = "none"


@dataclass(frozen=True, slots=True)
class TcpLabels:
    """The Istio label set of one TCP connection, as reported by one side.

    Values default to ``"unknown"`` as in Istio; ``response_flags`` is ``"-"``
    for a connection without trouble, else a short reason (``"DENY"``,
    ``"CONNECT_FAILED"``...). Build it with :meth:`for_connection` and keep
    it for the connection's lifetime: it is the key of its counters.
    """

    reporter: str = UNKNOWN
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = UNKNOWN

    @classmethod
    def for_connection(
        cls,
        reporter: str,
        source: Workload | None,
        source_principal: str | None,
        destination: Workload | None,
        destination_service: Service | None,
        destination_principal: str | None,
        mtls: bool,
        *,
        response_flags: str = "-",
    ) -> TcpLabels:
        """Labels from the model objects of both ends (None: not known, ``"unknown"``).

        ``reporter`` is ``"source"`` (ztunnel on the client's node, outbound)
        or ``"destination"`` (the server's node, inbound). Principals are
        SPIFFE URIs (``spiffe://cluster.local/ns/X/sa/Y``), as Istio reports
        them. A workload's ``app`` is its canonical name, and its workload
        label falls back to the pod name when the control plane sent no
        workload name.
        """
        if reporter not in REPORTERS:
            raise ValueError(f"reporter must be one of {REPORTERS}, not {reporter!r}")
        src = _WorkloadLabels.of(source)
        dst = _WorkloadLabels.of(destination)
        service = destination_service
        return cls(
            reporter=reporter,
            source_workload=src.workload,
            source_canonical_service=src.canonical_service,
            source_canonical_revision=src.canonical_revision,
            source_workload_namespace=src.namespace,
            source_principal=source_principal or UNKNOWN,
            source_app=src.canonical_service,
            destination_workload=dst.workload,
            destination_canonical_service=dst.canonical_service,
            destination_canonical_revision=dst.canonical_revision,
            destination_workload_namespace=dst.namespace,
            destination_principal=destination_principal or UNKNOWN,
            destination_app=dst.canonical_service,
            destination_service=service.hostname if service else UNKNOWN,
            destination_service_namespace=service.namespace if service else UNKNOWN,
            destination_service_name=(service.name or UNKNOWN) if service else UNKNOWN,
            request_protocol="tcp",
            response_flags=response_flags or "-",
            connection_security_policy=MUTUAL_TLS if mtls else NO_TLS,
        )


TCP_LABEL_NAMES: Final = tuple(f.name for f in fields(TcpLabels))


@dataclass(frozen=True, slots=True)
class _WorkloadLabels:
    workload: str
    canonical_service: str
    canonical_revision: str
    namespace: str

    @classmethod
    def of(cls, workload: Workload | None) -> _WorkloadLabels:
        if workload is None:
            return cls(UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
        return cls(
            workload=workload.workload_name or workload.name,
            canonical_service=workload.canonical_name or UNKNOWN,
            canonical_revision=workload.canonical_revision or UNKNOWN,
            namespace=workload.namespace,
        )


class _TcpCounts:
    """Mutable counters of one label set: [opened, closed, received bytes, sent bytes]."""

    __slots__ = ("closed", "opened", "received", "sent")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.received = 0
        self.sent = 0


class _TcpCollector:
    """Exports the TCP counters kept in plain integers (see the module docstring)."""

    def __init__(self) -> None:
        self.counts: dict[TcpLabels, _TcpCounts] = {}

    def get(self, labels: TcpLabels) -> _TcpCounts:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = _TcpCounts()
        return counts

    def collect(self) -> Iterator[Family]:
        def counter(name: str, help_text: str) -> Family:
            return Family(name, help_text, "counter", TCP_LABEL_NAMES)

        opened = counter(
            "istio_tcp_connections_opened", "TCP connections opened, per reporter and both ends."
        )
        closed = counter(
            "istio_tcp_connections_closed", "TCP connections closed, per reporter and both ends."
        )
        received = counter(
            "istio_tcp_received_bytes", "Bytes in the request direction (client to server)."
        )
        sent = counter(
            "istio_tcp_sent_bytes", "Bytes in the response direction (server to client)."
        )
        # A copy: the data path may add a label set while a scrape iterates.
        for labels, counts in list(self.counts.items()):
            values = astuple(labels)
            opened.add(values, counts.opened)
            closed.add(values, counts.closed)
            received.add(values, counts.received)
            sent.add(values, counts.sent)
        yield from (opened, closed, received, sent)


CertificateSource = Callable[[], Iterable[IdentityStatus]]


class CertificateCollector:
    """``underpass_ztunnel_certificates{state}``: identities per certificate manager phase.

    ``source`` is called at scrape time (e.g. ``CertificateManager.identities``);
    every phase is exported, with 0 when no identity is in it, so that alerts
    on ``state="backoff"`` see a series from the start. A failing source is
    logged and yields no sample rather than failing the whole scrape.
    """

    def __init__(self, source: CertificateSource | None = None) -> None:
        self.source = source

    def collect(self) -> Iterator[Family]:
        source = self.source
        if source is None:
            return
        try:
            statuses = list(source())
        except Exception:
            log.exception("the certificate status callback failed; no certificate metrics")
            return
        counts = dict.fromkeys((phase.value for phase in Phase), 0)
        for status in statuses:
            counts[status.phase.value] += 1
        family = Family(
            "underpass_ztunnel_certificates",
            "Identities held by the certificate manager, per state "
            "(queued, signing, scheduled = holds a certificate, backoff = last attempt failed).",
            "gauge",
            ("state",),
        )
        for state, count in counts.items():
            family.add((state,), count)
        yield family


class ZtunnelMetrics:
    """Everything ztunnel exports on ``/metrics``, kept in plain integers of its own."""

    def __init__(
        self,
        *,
        certificates: CertificateSource | None = None,
        process_metrics: bool = True,
    ) -> None:
        self._tcp = _TcpCollector()
        self._certificates = CertificateCollector(certificates)
        self._process_metrics = process_metrics
        self._python_info = promtext.python_info() if process_metrics else None
        self._pods = 0
        self._workloads = 0
        self._services = 0
        self._policies = 0
        self._xds_connected = 0
        self._xds_nacks = 0
        self._denials: dict[str, int] = {}
        # Both directions exist from the start so that dashboards see zeros.
        self._active: dict[str, int] = dict.fromkeys(DIRECTIONS, 0)

    # -- TCP (Istio) ----------------------------------------------------------

    def connection_opened(self, labels: TcpLabels) -> None:
        self._tcp.get(labels).opened += 1

    def bytes_transferred(self, labels: TcpLabels, received: int, sent: int) -> None:
        """Add bytes moved since the last call: ``received`` client->server, ``sent`` back.

        Call it periodically for long connections and once more at close.
        """
        if received < 0 or sent < 0:
            raise ValueError(f"byte counts only grow; got received={received} sent={sent}")
        counts = self._tcp.get(labels)
        counts.received += received
        counts.sent += sent

    def connection_closed(self, labels: TcpLabels) -> None:
        self._tcp.get(labels).closed += 1

    # -- operator metrics -----------------------------------------------------

    def set_pods(self, count: int) -> None:
        self._pods = count

    def set_state_sizes(self, *, workloads: int, services: int, policies: int) -> None:
        self._workloads = workloads
        self._services = services
        self._policies = policies

    def observe_snapshot(self, snapshot: Snapshot) -> None:
        """Set the state-size gauges from a newly published snapshot."""
        self.set_state_sizes(
            workloads=len(snapshot.workloads),
            services=len(snapshot.services),
            policies=len(snapshot.policies),
        )

    def set_xds_connected(self, connected: bool) -> None:
        self._xds_connected = 1 if connected else 0

    def xds_nack(self) -> None:
        self._xds_nacks += 1

    def policy_denied(self, reason: str) -> None:
        """Count a refused connection; keep ``reason`` to a small fixed vocabulary."""
        self._denials[reason] = self._denials.get(reason, 0) + 1

    def set_active_connections(self, direction: str, count: int) -> None:
        self._check_direction(direction)
        self._active[direction] = count

    def adjust_active_connections(self, direction: str, delta: int) -> None:
        """+1 when a connection starts, -1 when it ends."""
        self._check_direction(direction)
        self._active[direction] += delta

    def set_certificate_source(self, source: CertificateSource | None) -> None:
        """Where ``underpass_ztunnel_certificates`` reads from (the manager may start later)."""
        self._certificates.source = source

    @staticmethod
    def _check_direction(direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")

    # -- exposition -----------------------------------------------------------

    def families(self) -> list[Family]:
        """Every metric family, with its samples as of now."""

        def gauge(name: str, help_text: str, value: int) -> Family:
            family = Family(name, help_text, "gauge")
            family.add((), value)
            return family

        families = [*self._tcp.collect(), *self._certificates.collect()]
        if self._process_metrics:
            families.extend(promtext.process_families())
        if self._python_info is not None:
            families.append(self._python_info)
        families += [
            gauge("underpass_ztunnel_pods", "Pods this ztunnel handles (captured).", self._pods),
            gauge("underpass_ztunnel_workloads", "Workloads in the proxy state.", self._workloads),
            gauge("underpass_ztunnel_services", "Services in the proxy state.", self._services),
            gauge(
                "underpass_ztunnel_policies",
                "Authorization policies in the proxy state.",
                self._policies,
            ),
            gauge(
                "underpass_ztunnel_xds_connected",
                "1 while the xDS stream to the control plane is up, else 0.",
                self._xds_connected,
            ),
        ]
        nacks = Family(
            "underpass_ztunnel_xds_nacks",
            "xDS responses rejected (NACKed) by this ztunnel.",
            "counter",
        )
        nacks.add((), self._xds_nacks)
        denials = Family(
            "underpass_ztunnel_policy_denials",
            "Connections refused by L4 authorization, per reason.",
            "counter",
            ("reason",),
        )
        for reason, count in sorted(self._denials.items()):
            denials.add((reason,), count)
        active = Family(
            "underpass_ztunnel_connections_active",
            "Connections open right now, per direction.",
            "gauge",
            ("direction",),
        )
        for direction, count in self._active.items():
            active.add((direction,), count)
        families += [nacks, denials, active]
        return families

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return promtext.render(self.families()), promtext.CONTENT_TYPE


__all__ = [
    "DIRECTIONS",
    "MUTUAL_TLS",
    "NO_TLS",
    "REPORTERS",
    "TCP_LABEL_NAMES",
    "UNKNOWN",
    "CertificateCollector",
    "CertificateSource",
    "TcpLabels",
    "ZtunnelMetrics",
]
