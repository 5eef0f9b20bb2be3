"""Where the agent (and, as a fallback, the plugin) learns about pods and namespaces.

The agent is written against :class:`PodSource`, a small protocol that the
lab's ``underpass.lab.registry.LabRegistry`` satisfies (and, later, a
Kubernetes-backed source): ``snapshot()``, ``watch()`` (an async iterator of
snapshots, one per change) and ``set_pod_annotations(uid, {key: value|None})``.
:func:`view_of` turns whatever snapshot object the source returns into our own
frozen :class:`ClusterView`, so that nothing else in :mod:`cni` depends on the
registry's classes. :func:`open_lab_registry` imports the lab lazily: the plugin
needs it only on its cold path (agent unreachable).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cni.errors import SourceError


class PodSource(Protocol):
    """What the agent needs from a registry of pods and namespaces."""

    def snapshot(self) -> Any: ...

    def watch(self) -> AsyncIterator[Any]: ...

    def set_pod_annotations(self, uid: str, annotations: Mapping[str, str | None]) -> Any: ...


@dataclass(frozen=True, slots=True)
class PodView:
    """A pod as the agent sees it."""

    namespace: str
    name: str
    uid: str
    node: str = ""
    ips: tuple[str, ...] = ()
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    netns: str = ""
    container_id: str = ""
    phase: str = ""


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Namespaces (name -> labels) and pods (uid -> pod) at one point in time."""

    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    pods: Mapping[str, PodView] = field(default_factory=dict)

    def pods_on_node(self, node: str) -> list[PodView]:
        return [p for p in self.pods.values() if p.node == node]

    def pod_named(self, namespace: str, name: str) -> PodView | None:
        for pod in self.pods.values():
            if pod.namespace == namespace and pod.name == name:
                return pod
        return None


def _values(collection: Any) -> Iterable[Any]:
    if collection is None:
        return ()
    if isinstance(collection, Mapping):
        return collection.values()
    return collection  # type: ignore[no-any-return]


def _labels(obj: Any, attr: str) -> dict[str, str]:
    raw = getattr(obj, attr, None) or {}
    if not isinstance(raw, Mapping):
        raise SourceError(f"{attr} of {obj!r} is not a mapping")
    return {str(k): str(v) for k, v in raw.items()}


def _ips(pod: Any) -> tuple[str, ...]:
    ips = getattr(pod, "ips", None)
    if ips:
        return tuple(str(ip) for ip in ips)
    ip = getattr(pod, "ip", None)
    return (str(ip),) if ip else ()


def pod_view(pod: Any) -> PodView:
    """Our view of one registry pod record (attribute access, duck-typed)."""
    try:
        return PodView(
            namespace=str(pod.namespace),
            name=str(pod.name),
            uid=str(pod.uid),
            node=str(getattr(pod, "node", "") or ""),
            ips=_ips(pod),
            service_account=str(getattr(pod, "service_account", "") or "default"),
            labels=_labels(pod, "labels"),
            annotations=_labels(pod, "annotations"),
            netns=str(getattr(pod, "netns", "") or ""),
            container_id=str(getattr(pod, "container_id", "") or ""),
            phase=str(getattr(pod, "phase", "") or ""),
        )
    except AttributeError as exc:
        raise SourceError(f"registry pod record lacks a field: {exc}") from None


def view_of(snapshot: Any) -> ClusterView:
    """Our :class:`ClusterView` of a registry snapshot (or of a ClusterView)."""
    if isinstance(snapshot, ClusterView):
        return snapshot
    namespaces = {str(ns.name): _labels(ns, "labels") for ns in _values(snapshot.namespaces)}
    pods = {}
    for raw in _values(snapshot.pods):
        pod = pod_view(raw)
        pods[pod.uid] = pod
    return ClusterView(namespaces, pods)


def open_lab_registry(state_dir: str) -> PodSource:
    """The lab registry at ``state_dir`` (imported here: only the cold paths need it)."""
    try:
        from underpass.lab.registry import LabRegistry
    except ImportError as exc:
        raise SourceError(f"the lab registry is not available: {exc}") from None
    try:
        registry: PodSource = LabRegistry(Path(state_dir))
    except Exception as exc:
        raise SourceError(f"cannot open the lab registry at {state_dir}: {exc}") from None
    return registry
