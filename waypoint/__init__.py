"""waypoint: the optional remote L7 proxy.

Will own: HBONE termination for namespaces and services that ask for L7
handling, HTTP/1.1 and HTTP/2 proxying, HTTPRoute routing, HTTP-aware
authorization, retries and request telemetry.
"""
