"""Who is captured: the enrolment rules of PROTOCOLS.md section 7.

A pod is in the mesh when its namespace carries ``istio.io/dataplane-mode=ambient``
and the pod does not opt out with ``istio.io/dataplane-mode=none``. ``kube-system``,
the mesh's own namespace and any configured excluded namespace are never
captured. Pure functions, no I/O: shared by the node agent (which decides) and
the CNI plugin (which must know, when the agent is unreachable, whether a pod
may start without it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
AMBIENT = "ambient"
NONE = "none"
#: Set by the agent on every pod it captured (and only by it).
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
DEFAULT_MESH_NAMESPACE = "istio-system"
#: Namespaces that are never captured, whatever their labels.
ALWAYS_EXCLUDED = frozenset({"kube-system"})


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to capture a pod, and why (for logs and CNI error messages)."""

    enrol: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Policy:
    """The enrolment rules, with the deployment's mesh namespace and exclusions."""

    mesh_namespace: str = DEFAULT_MESH_NAMESPACE
    excluded_namespaces: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(cls, mesh_namespace: str | None = None, excluded: Iterable[str] = ()) -> Policy:
        return cls(mesh_namespace or DEFAULT_MESH_NAMESPACE, frozenset(excluded))

    def never_captured(self, namespace: str) -> bool:
        return (
            namespace in ALWAYS_EXCLUDED
            or namespace == self.mesh_namespace
            or namespace in self.excluded_namespaces
        )

    def decide(
        self,
        namespace: str,
        namespace_labels: Mapping[str, str],
        pod_labels: Mapping[str, str] | None,
    ) -> Decision:
        """Decide for a pod; ``pod_labels`` None means "not known" (no opt-out seen)."""
        if self.never_captured(namespace):
            return Decision(False, f"namespace {namespace} is never captured")
        if pod_labels is not None and pod_labels.get(DATAPLANE_MODE_LABEL) == NONE:
            return Decision(False, f"pod opts out with {DATAPLANE_MODE_LABEL}={NONE}")
        if namespace_labels.get(DATAPLANE_MODE_LABEL) == AMBIENT:
            return Decision(True, f"namespace {namespace} has {DATAPLANE_MODE_LABEL}={AMBIENT}")
        return Decision(False, f"namespace {namespace} is not in the ambient mesh")
