"""Errors of the discovery control plane.

:class:`DiscoveryConfigError` is an operator's mistake (a flag, a model file)
with a message saying what to fix; :class:`ModelError` is a registry object
that cannot be part of the model. Translation itself never raises for a
policy it cannot honour: it reports a :class:`~discovery.translate.Finding`
and fails closed.
"""

from __future__ import annotations


class DiscoveryError(Exception):
    """Base class of the discovery control plane's errors."""


class DiscoveryConfigError(DiscoveryError):
    """The control plane's configuration is unusable; the message says what to change."""


class ModelError(DiscoveryError):
    """A registry object could not be turned into the model (names the object and field)."""
