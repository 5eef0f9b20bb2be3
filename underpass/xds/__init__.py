"""The xDS core shared by the control plane (server) and ztunnel (client).

Workload discovery is Envoy's incremental ("Delta") Aggregated Discovery
Service carrying Istio's workload and authorization resources (PROTOCOLS.md
section 3). This package owns the protocol, free of I/O:

- :mod:`underpass.xds.types`: type URLs, resource names, message classes;
- :mod:`underpass.xds.node`: the client's node id and metadata;
- :mod:`underpass.xds.wire`: resources serialised once and versioned by
  content hash, and the response encoder that reuses those bytes;
- :mod:`underpass.xds.server`: :class:`~underpass.xds.server.DeltaServerStream`,
  one client stream's subscriptions, versions, nonces, ACKs and NACKs, and
  :class:`~underpass.xds.server.Snapshot`, what the server has;
- :mod:`underpass.xds.client`: :class:`~underpass.xds.client.DeltaClient`,
  the client's requests, response checks, ACK/NACK and reconnect versions;
- :mod:`underpass.xds.grpc_client`: a blocking grpcio transport for the client
  (the server's transport is the control plane's, in :mod:`discovery.server`);
- :mod:`underpass.xds.stubgen`: type stubs for the untyped ``xds-protos``;
- :mod:`underpass.xds.errors`: this package's errors.
"""
