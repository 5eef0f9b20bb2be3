"""ztunnel's way to the CA: ``CreateCertificate`` over :mod:`underpass.grpclite`.

Owns :class:`GrpcLiteCaSigner`, the :class:`~identity.certmanager.CertificateSigner`
that ztunnel's certificate manager signs through. It does on trio, without
grpcio and without a thread, what :class:`identity.client.CaClient` (behind
:class:`~identity.certmanager.CaClientSigner`) does: TLS to the CA verified
with the mesh roots (and a server-name override), ``authorization: Bearer``
and ``clusterid`` metadata on every call, ``ImpersonatedIdentity`` in the
request's metadata when the node asks for a pod's identity, and the same
mapping of gRPC failures to :mod:`identity.errors`:

======================================= ==================================
gRPC status                             raised
======================================= ==================================
UNAUTHENTICATED                         :class:`AuthenticationFailed`
PERMISSION_DENIED                       :class:`IdentityNotPermitted`
INVALID_ARGUMENT                        :class:`InvalidCsr`
UNAVAILABLE, DEADLINE_EXCEEDED, others  :class:`CertificateUnavailable`
======================================= ==================================

Each CSR is one short connection (the certificate manager signs rarely: at a
pod's arrival and at half-life), so a restarted CA is reached at once and no
connection, task or PING lingers between signatures. The token is read for
every call (projected tokens rotate) and never logged.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Final

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from identity.errors import (
    AuthenticationFailed,
    CertificateUnavailable,
    IdentityError,
    IdentityNotPermitted,
    InvalidCsr,
    InvalidRequest,
)
from identity.proto import ca_pb2
from identity.spiffe import SpiffeId
from underpass import grpclite

# The values identity.auth defines (IMPERSONATED_IDENTITY_KEY, DEFAULT_CLUSTER_ID); not
# imported from there: identity.auth loads YAML and the Kubernetes glue, which ztunnel does
# not need (tests/ztunnel/test_ca_signer.py checks they agree).
IMPERSONATED_IDENTITY_KEY: Final = "ImpersonatedIdentity"
DEFAULT_CLUSTER_ID: Final = "Kubernetes"

_SERVICE = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
#: ``/istio.v1.auth.IstioCertificateService/CreateCertificate``
CREATE_CERTIFICATE_PATH: Final = (
    f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['CreateCertificate'].name}"
)

_ERRORS: Final[dict[grpclite.StatusCode, type[IdentityError]]] = {
    grpclite.StatusCode.UNAUTHENTICATED: AuthenticationFailed,
    grpclite.StatusCode.PERMISSION_DENIED: IdentityNotPermitted,
    grpclite.StatusCode.INVALID_ARGUMENT: InvalidCsr,
}

TokenSource = str | Callable[[], str]


def identity_error(error: grpclite.GrpcError, address: str) -> IdentityError:
    """The identity error for a failed call, keeping the CA's message."""
    error_type = _ERRORS.get(error.code)
    if error_type is not None:
        return error_type(error.details or f"the CA refused the request ({error.code.name})")
    # UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, ...: worth a retry later.
    return CertificateUnavailable(
        f"the CA at {address} could not issue a certificate ({error.code.name}): {error.details}"
    )


class GrpcLiteCaSigner:
    """Signs CSRs through the CA at ``address`` (``host:port``) over TLS.

    ``root_pem`` verifies the CA's serving certificate; ``server_name``
    overrides the name it must carry (default: the host of ``address``).
    ``token`` is the bearer token or a callable returning the current one.
    With ``impersonate`` (the node ztunnel) each request names the identity
    asked for in ``ImpersonatedIdentity``; without it (a dedicated proxy with
    the pod's own token) the CA signs for the caller. ``timeout`` bounds a
    call, connecting included.
    """

    def __init__(
        self,
        address: str,
        root_pem: bytes | str,
        token: TokenSource,
        *,
        server_name: str | None = None,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        impersonate: bool = True,
        timeout: float = 10.0,
    ) -> None:
        try:
            self._target = grpclite.Target.parse(address)
        except ValueError as exc:
            raise ValueError(f"the CA address is unusable: {exc}") from None
        roots = root_pem.encode() if isinstance(root_pem, str) else root_pem
        self._tls = grpclite.TlsSettings(roots, server_name)
        self._tls.context()  # unusable roots fail here, not at the first signature
        if not cluster_id or not all(" " < c <= "~" for c in cluster_id):
            raise ValueError(f"the cluster id {cluster_id!r} must be printable ASCII, no spaces")
        self.address = address
        self.cluster_id = cluster_id
        self.timeout = timeout
        self._token = token
        self._impersonate = impersonate

    def __repr__(self) -> str:
        return f"GrpcLiteCaSigner({self.address!r}, impersonate={self._impersonate})"

    def _current_token(self) -> str:
        if isinstance(self._token, str):
            token = self._token
        else:
            try:
                token = self._token()
            except Exception as exc:
                # The exception text (a file name, an errno) is safe; a token never is in it.
                raise AuthenticationFailed(
                    f"cannot obtain the token to present to the CA: {type(exc).__name__}: {exc}"
                ) from None
        token = token.strip()
        if not token or not all(" " < c <= "~" for c in token):
            raise AuthenticationFailed(
                "the token to present to the CA is empty or contains whitespace or non-ASCII"
            )
        return token

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: dt.timedelta) -> list[str]:
        """Have ``csr_pem`` signed for ``lifetime``; the PEM chain, leaf first.

        Raises the identity errors listed in the module documentation.
        """
        if lifetime < dt.timedelta(0):
            raise InvalidRequest(f"the requested validity {lifetime} is negative")
        metadata = struct_pb2.Struct()
        if self._impersonate:
            metadata.update({IMPERSONATED_IDENTITY_KEY: identity.uri})
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode("ascii", errors="replace"),
            validity_duration=int(lifetime.total_seconds()),
            metadata=metadata,
        )
        call_metadata = (
            ("authorization", f"Bearer {self._current_token()}"),
            ("clusterid", self.cluster_id),
        )
        try:
            payload = await grpclite.unary_call(
                self._target,
                CREATE_CERTIFICATE_PATH,
                request.SerializeToString(),
                tls=self._tls,
                metadata=call_metadata,
                timeout=self.timeout,
            )
        except grpclite.GrpcError as exc:
            raise identity_error(exc, self.address) from None
        try:
            response = ca_pb2.IstioCertificateResponse.FromString(payload)
        except DecodeError as exc:
            raise CertificateUnavailable(
                f"the CA at {self.address} answered something that is not a certificate "
                f"response ({exc})"
            ) from None
        chain = list(response.cert_chain)
        if not chain:
            raise CertificateUnavailable(f"the CA at {self.address} answered an empty chain")
        return chain


__all__ = [
    "CREATE_CERTIFICATE_PATH",
    "DEFAULT_CLUSTER_ID",
    "IMPERSONATED_IDENTITY_KEY",
    "GrpcLiteCaSigner",
    "TokenSource",
    "identity_error",
]
