"""Errors of the registry adapters.

:class:`RegistryConfigError` is an operator's mistake found at start-up (no
lab state, no kubeconfig, an unreadable policy file): the message says what
to fix and the control plane does not start. :class:`ApiError` is a failed
Kubernetes API call, classified so that callers know whether to retry soon
(:attr:`ApiError.temporary`) or to report a problem only an operator can fix
(RBAC, a missing API) and retry slowly.
"""

from __future__ import annotations

from discovery.errors import DiscoveryConfigError, DiscoveryError


class RegistryError(DiscoveryError):
    """Base class of the registry adapters' errors."""


class RegistryConfigError(RegistryError, DiscoveryConfigError):
    """The registry cannot be set up as configured; the message says what to change."""


class ApiError(RegistryError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, *, status: int = 0, temporary: bool) -> None:
        super().__init__(message)
        self.status = status
        self.temporary = temporary


class ResourceExpired(ApiError):
    """410 Gone: the resourceVersion to resume from is too old; list again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=410, temporary=True)


__all__ = ["ApiError", "RegistryConfigError", "RegistryError", "ResourceExpired"]
