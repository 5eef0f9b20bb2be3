"""Errors of ``underpass compare``: each says what failed and where to look.

Owns the comparison's error types; every error it raises on purpose is a
:class:`CompareError`, which the command prints (without a traceback) before
it cleans up and exits 1.
"""

from __future__ import annotations


class CompareError(RuntimeError):
    """The comparison could not set up, drive or measure a mode."""


class LaunchError(CompareError):
    """A helper process (Envoy, Fortio) did not start, or exited before it was ready."""


class LoadGenError(CompareError):
    """Fortio is missing and cannot be built, or a load run failed."""


class EnvoyError(CompareError):
    """Envoy is not installed, or a sidecar misbehaved."""
