"""The identities ztunnel holds for the pods on its node, as TLS contexts for the data path.

A down-scoped handle over :class:`identity.certmanager.CertificateManager`:
the data path can ask for the server or client context of an identity a pod
on this node has, and nothing else; it never sees the CA or keys. Pods are
counted per identity (:meth:`retain` on ZDS Add prefetches the certificate,
:meth:`release` on Del forgets it at zero), so ztunnel holds exactly one key
per service account with a pod on the node, and none for pods elsewhere.
"""

from __future__ import annotations

import ssl

from identity.certmanager import CertificateManager
from identity.spiffe import SpiffeId
from identity.tls import ContextCache, TrustBundle


class NodeIdentities:
    """Contexts for the identities of this node's pods (see the module docstring)."""

    def __init__(self, manager: CertificateManager) -> None:
        self._manager = manager
        self._contexts = ContextCache()
        self._bundle: TrustBundle | None = None
        self._bundle_version = -1
        self._held: dict[SpiffeId, int] = {}

    @property
    def manager(self) -> CertificateManager:
        return self._manager

    def held(self) -> dict[SpiffeId, int]:
        """Identities with pods on the node, and how many pods each."""
        return dict(self._held)

    def retain(self, identity: SpiffeId) -> None:
        """A pod of ``identity`` arrived: count it, prefetch the certificate."""
        self._held[identity] = self._held.get(identity, 0) + 1
        self._manager.retain(identity)

    def release(self, identity: SpiffeId) -> None:
        """A pod of ``identity`` left; at zero its key and contexts are dropped."""
        count = self._held.get(identity, 0)
        if count == 0:
            return
        if count == 1:
            del self._held[identity]
            self._contexts.discard(identity)
        else:
            self._held[identity] = count - 1
        self._manager.release(identity)

    def trust_bundle(self) -> TrustBundle:
        snapshot = self._manager.trust_bundle
        if self._bundle is None or snapshot.version != self._bundle_version:
            self._bundle = TrustBundle(snapshot.roots_der)
            self._bundle_version = snapshot.version
        return self._bundle

    async def server_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """Present ``identity`` to HBONE clients (raises ``CertificateUnavailable``)."""
        self._check_held(identity)
        cert = await self._manager.get(identity)
        return self._contexts.server(cert, self.trust_bundle())

    async def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        """Dial HBONE as ``identity`` (raises ``CertificateUnavailable``)."""
        self._check_held(identity)
        cert = await self._manager.get(identity)
        return self._contexts.client(cert, self.trust_bundle())

    def _check_held(self, identity: SpiffeId) -> None:
        if identity not in self._held:
            # Only identities of pods on this node: anything else is a bug
            # that must not turn into a certificate request.
            raise PermissionError(f"no pod on this node has identity {identity.uri}")
