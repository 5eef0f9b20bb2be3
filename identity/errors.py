"""Errors raised by :mod:`identity`.

Every error carries a message an operator can act on. Errors that travel back
to a CA caller carry the gRPC status they map to, so the server translates
them in one place (:mod:`identity.server`).
"""

from __future__ import annotations

from enum import Enum


class GrpcCode(Enum):
    """The subset of gRPC status codes the CA answers with (values match grpc)."""

    INVALID_ARGUMENT = 3
    PERMISSION_DENIED = 7
    UNAUTHENTICATED = 16
    UNAVAILABLE = 14
    INTERNAL = 13


class IdentityError(Exception):
    """Base class for every error in :mod:`identity`."""

    grpc_code: GrpcCode = GrpcCode.INTERNAL


class InvalidSpiffeId(IdentityError, ValueError):
    """A string is not a valid SPIFFE ID (or not the workload ``ns/sa`` form)."""

    grpc_code = GrpcCode.INVALID_ARGUMENT


class CaConfigError(IdentityError):
    """The CA's key material is missing, unreadable or inconsistent."""


class InvalidCsr(IdentityError):
    """A certificate signing request is malformed, badly signed or asks for too much."""

    grpc_code = GrpcCode.INVALID_ARGUMENT


class InvalidRequest(IdentityError):
    """A CA request is malformed in a way other than its CSR (lifetime, metadata)."""

    grpc_code = GrpcCode.INVALID_ARGUMENT


class AuthenticationFailed(IdentityError):
    """The caller could not be authenticated (missing, unknown or rejected token)."""

    grpc_code = GrpcCode.UNAUTHENTICATED


class ImpersonationDenied(IdentityError):
    """The caller asked for another identity it may not act for.

    Answered as UNAUTHENTICATED, as Istio's CA does for the same case.
    """

    grpc_code = GrpcCode.UNAUTHENTICATED


class IdentityNotPermitted(IdentityError):
    """The caller is authenticated but may not hold the identity its CSR names."""

    grpc_code = GrpcCode.PERMISSION_DENIED


class CertificateUnavailable(IdentityError):
    """No valid certificate can be had for an identity right now (CA down, expired)."""

    grpc_code = GrpcCode.UNAVAILABLE


class PeerIdentityError(IdentityError):
    """A TLS peer's certificate does not carry an acceptable SPIFFE identity."""


class AuthenticatorUnavailable(CertificateUnavailable):
    """The CA cannot check callers right now (token file unusable, API server unreachable).

    Answered as UNAVAILABLE: nobody is authenticated until the operator fixes it,
    and callers retry with backoff.
    """
