"""Interop tier: Underpass against real, independent peers (Envoy, OpenSSL, curl)."""
