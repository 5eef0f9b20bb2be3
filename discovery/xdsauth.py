"""Who may read workload discovery on the TLS port: the xDS clients' authentication.

Every ``DeltaAggregatedResources`` call on the TLS port (15012) must carry
``authorization: Bearer <token>`` that the control plane's authenticator
accepts: the same :class:`~identity.auth.Authenticator` the CA uses (the lab
token file, or a Kubernetes TokenReview of a pod-bound token with audience
``istio-ca``). The caller must then identify, in its first request, a node
of its own namespace (``ztunnel~<ip>~<pod>.<namespace>~...`` or the
``NAMESPACE`` metadata): a token of one namespace does not read the mesh as
a proxy of another.

The plaintext port (15010, only when enabled) is not authenticated: bearer
tokens must not travel in clear, so anyone who can reach that port reads
every workload and policy of the mesh. Enable it only on a trusted network.

:func:`authenticate_call` and :func:`check_node` are synchronous and do no
I/O of their own (a TokenReview authenticator does: the server runs
:func:`authenticate_call` in a worker thread). A refusal is an
:class:`XdsAuthRefused` carrying the gRPC status, a bounded metric ``reason``
and a message for the operator that never contains the token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

from identity.auth import Authenticator, Caller
from identity.errors import AuthenticationFailed, AuthenticatorUnavailable, IdentityError
from identity.server import text_metadata
from underpass.xds.node import NodeInfo

# Refusal reasons (the metric's bounded label set).
NO_TOKEN: Final = "no_token"  # noqa: S105 (a metric label)
AUTHENTICATION_FAILED: Final = "authentication_failed"
AUTHENTICATOR_UNAVAILABLE: Final = "authenticator_unavailable"
NODE_NAMESPACE_MISMATCH: Final = "node_namespace_mismatch"
INTERNAL: Final = "internal"


class XdsAuthRefused(Exception):
    """An xDS call is refused; ``status`` is the gRPC status code's name."""

    def __init__(self, status: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _scrubbed(message: str, metadata: Mapping[str, str]) -> str:
    """``message`` without the token, whatever an authenticator put in it."""
    header = metadata.get("authorization", "")
    for secret in (header, *header.split()[1:]):
        if len(secret) >= 4 and secret in message:
            message = message.replace(secret, "[token]")
    return message


def authenticate_call(
    authenticator: Authenticator, metadata: Iterable[tuple[str, str | bytes]]
) -> Caller:
    """The caller of an xDS call from its gRPC metadata, or :class:`XdsAuthRefused`."""
    headers: Mapping[str, str] = {}
    try:
        headers = text_metadata(metadata)
        if "authorization" not in headers:
            raise XdsAuthRefused(
                "UNAUTHENTICATED",
                NO_TOKEN,
                "workload discovery on the TLS port needs 'authorization: Bearer <token>' "
                "(the proxy's service-account token, audience 'istio-ca'); the call carried none",
            )
        caller = authenticator.authenticate(headers)
    except XdsAuthRefused:
        raise
    except AuthenticatorUnavailable as exc:
        raise XdsAuthRefused(
            "UNAVAILABLE", AUTHENTICATOR_UNAVAILABLE, _scrubbed(str(exc), headers)
        ) from None
    except IdentityError as exc:
        raise XdsAuthRefused(
            "UNAUTHENTICATED", AUTHENTICATION_FAILED, _scrubbed(str(exc), headers)
        ) from None
    except Exception as exc:  # a broken authenticator refuses (and names no detail)
        raise XdsAuthRefused(
            "INTERNAL",
            INTERNAL,
            f"the control plane could not check the token ({type(exc).__name__}); "
            "the operator can find the cause in its log",
        ) from None
    if not isinstance(caller, Caller):  # fail closed on a misbehaving authenticator
        raise XdsAuthRefused(
            "UNAUTHENTICATED",
            AUTHENTICATION_FAILED,
            str(AuthenticationFailed("the caller could not be authenticated")),
        )
    return caller


def check_node(caller: Caller, node: NodeInfo) -> None:
    """Refuse (PERMISSION_DENIED) a node that is not of the caller's namespace."""
    namespace = caller.identity.namespace
    if node.pod_namespace != namespace:
        said = repr(node.pod_namespace) if node.pod_namespace else "no namespace"
        raise XdsAuthRefused(
            "PERMISSION_DENIED",
            NODE_NAMESPACE_MISMATCH,
            f"the caller is {caller.identity.uri} but its node {node.id!r} names {said}; a "
            f"proxy may only ask for configuration as a proxy of its own namespace "
            f"({namespace!r}): fix the proxy's POD_NAMESPACE or its token",
        )


__all__ = [
    "AUTHENTICATION_FAILED",
    "AUTHENTICATOR_UNAVAILABLE",
    "INTERNAL",
    "NODE_NAMESPACE_MISMATCH",
    "NO_TOKEN",
    "XdsAuthRefused",
    "authenticate_call",
    "check_node",
]
