"""ztunnel's proxy state: what the data path knows about the mesh.

- :mod:`ztunnel.state.model`: immutable Workload, Service and Authorization
  dataclasses (PROTOCOLS.md section 3) with defaults applied;
- :mod:`ztunnel.state.convert`: the generated protos and Delta xDS responses
  -> model objects and batches;
- :mod:`ztunnel.state.store`: :class:`StateStore` with one writer and
  consistent, indexed snapshots for readers.

The data path reads ``store.snapshot`` once per decision and calls
``workload_by_ip``, ``service_by_vip``, ``resolve_destination`` and
``policies_for`` on it; only the updater (xDS client or local config) writes.
"""

from ztunnel.state.convert import (
    address_from_proto,
    authorization_from_proto,
    batch_from_xds,
    service_from_proto,
    workload_from_proto,
    xds_decoders,
)
from ztunnel.state.model import (
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
    Action,
    Address,
    ApplicationTunnel,
    ApplicationTunnelProtocol,
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthPolicy,
    IPAddress,
    IPFamilies,
    LoadBalancing,
    LoadBalancingMode,
    LoadBalancingScope,
    Locality,
    Match,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Port,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
    TunnelProtocol,
    Workload,
    WorkloadStatus,
    WorkloadType,
    parse_ip,
)
from ztunnel.state.store import (
    Batch,
    Destination,
    EndpointChooser,
    RandomChooser,
    RoundRobinChooser,
    Snapshot,
    StateStore,
    StateWriter,
    first_endpoint,
)

__all__ = [
    "DEFAULT_SERVICE_ACCOUNT",
    "DEFAULT_TRUST_DOMAIN",
    "Action",
    "Address",
    "AppProtocol",
    "ApplicationTunnel",
    "ApplicationTunnelProtocol",
    "Authorization",
    "Batch",
    "Clause",
    "Destination",
    "EndpointChooser",
    "GatewayAddress",
    "HealthPolicy",
    "IPAddress",
    "IPFamilies",
    "LoadBalancing",
    "LoadBalancingMode",
    "LoadBalancingScope",
    "Locality",
    "Match",
    "NamespacedHostname",
    "NetworkAddress",
    "NetworkMode",
    "Port",
    "RandomChooser",
    "RoundRobinChooser",
    "Rule",
    "Scope",
    "Service",
    "ServiceAccountMatch",
    "Snapshot",
    "StateStore",
    "StateWriter",
    "StringMatch",
    "StringMatchKind",
    "TunnelProtocol",
    "Workload",
    "WorkloadStatus",
    "WorkloadType",
    "address_from_proto",
    "authorization_from_proto",
    "batch_from_xds",
    "first_endpoint",
    "parse_ip",
    "service_from_proto",
    "workload_from_proto",
    "xds_decoders",
]
