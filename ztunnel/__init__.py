"""ztunnel: the per-node L4 tunnel.

Will own: listeners inside each captured pod's network namespace (15001
outbound, 15006 inbound plaintext, 15008 inbound HBONE), the outbound and
inbound data paths, HBONE connection pools, L4 authorization, telemetry and
the node-side admin, metrics and readiness endpoints.
"""
