"""The ambient mesh's user-facing conventions: labels, annotations and the enrolment rule.

One definition for every component (PROTOCOLS.md section 7): the CNI node agent
decides with it which pods to capture, discovery decides with it which
workloads speak HBONE. They must agree, or ztunnel would send HBONE to a pod
nobody redirected (or plain TCP to one that only accepts HBONE).

The rule (:func:`is_enrolled`, :meth:`Enrolment.decide`):

1. ``kube-system``, the mesh's own namespace (``istio-system`` by default)
   and any namespace the deployment excludes are never captured;
2. a pod labelled ``istio.io/dataplane-mode=none`` opts out;
3. otherwise a pod is captured when its namespace is labelled
   ``istio.io/dataplane-mode=ambient``.

Pure functions, no I/O. What each component adds on top stays with it: the
node agent annotates the pods it captured (:data:`REDIRECTION_ANNOTATION`);
discovery leaves host-network pods out (nothing can be redirected inside the
node's own network namespace) and may wait for that annotation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

#: Namespace (and pod) label that joins the mesh; a pod label ``none`` opts out.
DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT: Final = "ambient"
DATAPLANE_MODE_NONE: Final = "none"

#: Pod, service or namespace label naming the waypoint (a Gateway) to use; ``none`` opts out.
USE_WAYPOINT_LABEL: Final = "istio.io/use-waypoint"
#: With :data:`USE_WAYPOINT_LABEL`: the waypoint's namespace, when not the object's own.
USE_WAYPOINT_NAMESPACE_LABEL: Final = "istio.io/use-waypoint-namespace"
#: Gateway label: what a waypoint serves (``service``, ``workload``, ``all``, ``none``).
WAYPOINT_FOR_LABEL: Final = "istio.io/waypoint-for"

#: Pod annotation the node agent sets on every pod it captured (and only it).
REDIRECTION_ANNOTATION: Final = "ambient.istio.io/redirection"
REDIRECTION_ENABLED: Final = "enabled"

DEFAULT_MESH_NAMESPACE: Final = "istio-system"
#: Namespaces that are never captured, whatever their labels.
ALWAYS_EXCLUDED_NAMESPACES: Final = frozenset({"kube-system"})


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to capture a pod, and why (for logs and error messages)."""

    enrol: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Enrolment:
    """The enrolment rule with a deployment's mesh namespace and excluded namespaces."""

    mesh_namespace: str = DEFAULT_MESH_NAMESPACE
    excluded_namespaces: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(cls, mesh_namespace: str | None = None, excluded: Iterable[str] = ()) -> Enrolment:
        """From command-line style settings (None or "" means the default mesh namespace)."""
        return cls(mesh_namespace or DEFAULT_MESH_NAMESPACE, frozenset(excluded))

    def never_captured(self, namespace: str) -> bool:
        return (
            namespace in ALWAYS_EXCLUDED_NAMESPACES
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
        if pod_labels is not None and pod_labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_NONE:
            return Decision(
                False, f"pod opts out with {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_NONE}"
            )
        if namespace_labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT:
            return Decision(
                True, f"namespace {namespace} has {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}"
            )
        return Decision(False, f"namespace {namespace} is not in the ambient mesh")

    def is_enrolled(
        self,
        namespace_labels: Mapping[str, str],
        pod_labels: Mapping[str, str] | None,
        namespace: str,
    ) -> bool:
        return self.decide(namespace, namespace_labels, pod_labels).enrol


DEFAULT_ENROLMENT: Final = Enrolment()


def is_enrolled(
    namespace_labels: Mapping[str, str],
    pod_labels: Mapping[str, str] | None,
    namespace: str,
    *,
    mesh_namespace: str = DEFAULT_MESH_NAMESPACE,
    excluded_namespaces: Iterable[str] = (),
) -> bool:
    """Whether a pod of ``namespace`` with ``pod_labels`` is in the mesh (the module's rule)."""
    rule = (
        DEFAULT_ENROLMENT
        if mesh_namespace == DEFAULT_MESH_NAMESPACE and not excluded_namespaces
        else Enrolment(mesh_namespace, frozenset(excluded_namespaces))
    )
    return rule.is_enrolled(namespace_labels, pod_labels, namespace)


def redirected(annotations: Mapping[str, str]) -> bool:
    """Whether the node agent marked a pod as captured (:data:`REDIRECTION_ANNOTATION`)."""
    return annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED


__all__ = [
    "ALWAYS_EXCLUDED_NAMESPACES",
    "DATAPLANE_MODE_AMBIENT",
    "DATAPLANE_MODE_LABEL",
    "DATAPLANE_MODE_NONE",
    "DEFAULT_ENROLMENT",
    "DEFAULT_MESH_NAMESPACE",
    "REDIRECTION_ANNOTATION",
    "REDIRECTION_ENABLED",
    "USE_WAYPOINT_LABEL",
    "USE_WAYPOINT_NAMESPACE_LABEL",
    "WAYPOINT_FOR_LABEL",
    "Decision",
    "Enrolment",
    "is_enrolled",
    "redirected",
]
