"""ztunnel: the per-node L4 tunnel.

Owns so far: the proxy state (:mod:`ztunnel.state`: workloads, services and
policies with one writer and consistent snapshots), the local config file
(:mod:`ztunnel.local_config`) and L4 authorization (:mod:`ztunnel.policy`).
Still to come: listeners inside each captured pod's network namespace (15001
outbound, 15006 inbound plaintext, 15008 inbound HBONE), the outbound and
inbound data paths over :mod:`underpass.hbone`, telemetry and the node-side
admin, metrics and readiness endpoints.
"""
