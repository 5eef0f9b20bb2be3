"""The CA's node index over a registry's live model.

A trusted node agent (ztunnel) may get a certificate for a workload identity
only if a live pod with that identity runs on its own node (PROTOCOLS.md
section 4). The discovery process already watches every pod, so
:class:`ModelNodeIndex` answers that question from the registry's latest
:class:`~discovery.model.Model` instead of asking the API server on each
request. It implements :class:`identity.auth.NodeIndex`.

The registry's writer calls :meth:`ModelNodeIndex.update` with each model
before handing it on; readers (CA request threads) see one complete index or
the next, never half of one (the index is replaced by one assignment).
Before the first model every answer is "no" (fail closed). The index is as
fresh as the registry's watch: a pod scheduled a moment ago may not be in it
yet, and ztunnel retries with backoff (PROTOCOLS.md section 4).
"""

from __future__ import annotations

from discovery.model import Model
from identity.auth import ACTIVE_POD_PHASES

_Key = tuple[str, str, str]  # (node, namespace, service account)


class ModelNodeIndex:
    """:class:`identity.auth.NodeIndex` over the latest model (see the module docstring)."""

    def __init__(self) -> None:
        self._live: frozenset[_Key] = frozenset()
        self._ready = False

    @property
    def ready(self) -> bool:
        """Whether a model has been seen (before that, every answer is False)."""
        return self._ready

    def update(self, model: Model) -> None:
        """Index ``model``'s live pods (Pending or Running, with a node)."""
        self._live = frozenset(
            (pod.node, pod.namespace, pod.service_account)
            for pod in model.pods.values()
            if pod.node and pod.phase in ACTIVE_POD_PHASES
        )
        self._ready = True

    def has_running_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return (node, namespace, service_account) in self._live


__all__ = ["ModelNodeIndex"]
