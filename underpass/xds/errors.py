"""Errors of the xDS core (:mod:`underpass.xds`).

:class:`XdsProtocolError` is the peer's fault (a malformed or out-of-order
message) and carries the gRPC status a server answers with;
:class:`ResourceRejected` is a client refusing a response's resources, whose
message becomes the NACK's ``error_detail``; :class:`XdsConnectionError` is a
stream that could not be opened or broke (worth a retry with backoff).
"""

from __future__ import annotations


class XdsError(Exception):
    """Base class of the xDS core's errors."""


class XdsProtocolError(XdsError):
    """The peer broke the Delta xDS protocol; ``grpc_status`` names the status to end with."""

    def __init__(self, message: str, grpc_status: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.grpc_status = grpc_status


class ResourceRejected(XdsError):
    """A response's resources cannot be accepted; the client NACKs it with this message."""


class XdsConnectionError(XdsError):
    """The stream to the control plane could not be opened or ended with an error."""

    def __init__(self, message: str, grpc_status: str = "UNAVAILABLE") -> None:
        super().__init__(message)
        self.grpc_status = grpc_status
