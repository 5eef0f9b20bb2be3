"""A synchronous client for the CA's gRPC API (``IstioCertificateService``).

:class:`CaClient` is what the certificate manager calls, from a worker thread,
to turn a CSR into a certificate chain. It speaks TLS to the CA (verified with
the CA's root bundle), sends ``authorization: Bearer <token>`` and ``clusterid``
metadata on every call, and ``ImpersonatedIdentity`` in the request metadata
when a node agent asks on behalf of a pod. gRPC failures come back as the
identity errors the rest of :mod:`identity` handles, with the CA's message:

======================================= ==================================
gRPC status                             raised
======================================= ==================================
UNAUTHENTICATED                         :class:`AuthenticationFailed`
PERMISSION_DENIED                       :class:`IdentityNotPermitted`
INVALID_ARGUMENT                        :class:`InvalidCsr`
UNAVAILABLE, DEADLINE_EXCEEDED, others  :class:`CertificateUnavailable`
======================================= ==================================
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from types import TracebackType

import grpc
from google.protobuf import struct_pb2

from identity.auth import DEFAULT_CLUSTER_ID, IMPERSONATED_IDENTITY_KEY
from identity.errors import (
    AuthenticationFailed,
    CertificateUnavailable,
    IdentityError,
    IdentityNotPermitted,
    InvalidCsr,
    InvalidRequest,
)
from identity.proto import ca_pb2, ca_pb2_grpc
from identity.spiffe import SpiffeId

TokenSource = str | Callable[[], str]

_ERRORS: dict[grpc.StatusCode, type[IdentityError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationFailed,
    grpc.StatusCode.PERMISSION_DENIED: IdentityNotPermitted,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidCsr,
}


def error_from_rpc(exc: grpc.RpcError, address: str) -> IdentityError:
    """The identity error for a failed call, keeping the CA's message."""
    code = exc.code()
    details = exc.details() or ""
    error_type = _ERRORS.get(code)
    if error_type is not None:
        return error_type(details or f"the CA refused the request ({code.name})")
    # UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, ...: worth a retry later.
    return CertificateUnavailable(
        f"the CA at {address} could not issue a certificate ({code.name}): {details}"
    )


class CaClient:
    """Asks the CA at ``address`` to sign CSRs.

    ``root_pem`` verifies the CA's serving certificate; ``server_name`` overrides
    the name checked against it (default: the host of ``address``). ``token`` is
    the bearer token, or a zero-argument callable returning the current one
    (projected tokens rotate; it is called once per request). Thread-safe.
    """

    def __init__(
        self,
        address: str,
        root_pem: bytes | str,
        token: TokenSource,
        *,
        server_name: str | None = None,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.cluster_id = cluster_id
        self.timeout = timeout
        self._token = token
        roots = root_pem.encode() if isinstance(root_pem, str) else root_pem
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        self._closed = False

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
        if not token or any(c.isspace() for c in token):
            raise AuthenticationFailed(
                "the token to present to the CA is empty or contains whitespace"
            )
        return token

    def create_certificate(
        self,
        csr_pem: bytes,
        validity: dt.timedelta,
        impersonate: SpiffeId | None = None,
    ) -> list[str]:
        """Have ``csr_pem`` signed for ``validity``; returns the PEM chain, leaf first.

        ``impersonate`` asks for another identity (a node agent acting for a pod
        on its node); the CSR must name that identity. Raises the identity
        errors listed in the module documentation.
        """
        if self._closed:
            raise CertificateUnavailable(f"the client for the CA at {self.address} is closed")
        if validity < dt.timedelta(0):
            raise InvalidRequest(f"the requested validity {validity} is negative")
        metadata = struct_pb2.Struct()
        if impersonate is not None:
            metadata.update({IMPERSONATED_IDENTITY_KEY: impersonate.uri})
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode("ascii", errors="replace"),
            validity_duration=int(validity.total_seconds()),
            metadata=metadata,
        )
        call_metadata = (
            ("authorization", f"Bearer {self._current_token()}"),
            ("clusterid", self.cluster_id),
        )
        try:
            response = self._stub.CreateCertificate(
                request, timeout=self.timeout, metadata=call_metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.address) from None
        except ValueError as exc:  # grpc raises this for a channel closed meanwhile
            raise CertificateUnavailable(f"cannot call the CA at {self.address}: {exc}") from None
        chain = list(response.cert_chain)
        if not chain:
            raise CertificateUnavailable(f"the CA at {self.address} answered an empty chain")
        return chain

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> CaClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
