"""The control plane's Prometheus metrics (registered on a given registry)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


class DiscoveryMetrics:
    """xDS serving and translation metrics; tests pass their own ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.clients = Gauge("underpass_xds_clients", "Delta ADS streams open", registry=registry)
        self.pushes = Counter(
            "underpass_xds_pushes",
            "Delta ADS responses sent, by type URL",
            ["type_url"],
            registry=registry,
        )
        self.resources_sent = Counter(
            "underpass_xds_resources_sent",
            "Resources sent (updated or removed), by type URL",
            ["type_url"],
            registry=registry,
        )
        self.nacks = Counter(
            "underpass_xds_nacks",
            "Responses rejected by clients (NACK), by type URL",
            ["type_url"],
            registry=registry,
        )
        self.auth_refused = Counter(
            "underpass_xds_auth_refused",
            "Delta ADS calls refused on the TLS port (no or bad token, node of another "
            "namespace, authenticator unavailable), by reason",
            ["reason"],
            registry=registry,
        )
        self.protocol_errors = Counter(
            "underpass_xds_protocol_errors",
            "Streams ended because the client broke the protocol",
            registry=registry,
        )
        self.snapshots = Counter(
            "underpass_discovery_snapshots",
            "Snapshots published (one per coalesced burst of registry changes)",
            registry=registry,
        )
        self.snapshot_resources = Gauge(
            "underpass_discovery_resources",
            "Resources in the current snapshot, by type URL",
            ["type_url"],
            registry=registry,
        )
        self.translate_seconds = Histogram(
            "underpass_discovery_translate_seconds",
            "Time to translate the model and prepare a snapshot",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.translated = Counter(
            "underpass_discovery_translated",
            "Pods and services translated (again) because a change affected them, by kind",
            ["kind"],
            registry=registry,
        )
        self.unsupported = Counter(
            "underpass_discovery_unsupported",
            "Policy fields or references that could not be honoured (failed closed), by reason",
            ["reason"],
            registry=registry,
        )
