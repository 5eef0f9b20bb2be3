"""Incremental translation: redo only the parts of a translation that a model change affects.

:class:`IncrementalTranslator` keeps the previous model and its parts (see
:mod:`discovery.translate`: the policies' part, one part per service and per
pod). Given the next model, it compares the two (objects are immutable, so
an unchanged object is usually the very same one and costs an identity
check), works out which parts the differences affect, translates those again
against the new model and assembles the result. The result is always the
same as :func:`discovery.translate.translate` of the new model; the property
test in tests/discovery/test_incremental.py checks it over random sequences
of changes.

What a change affects:

==========================  ===================================================================
changed                     translated again
==========================  ===================================================================
pod                         that pod
service                     that service; the pods its old or new selector selects
namespace                   its services and pods (enrolment and waypoint labels)
node                        the pods on it (locality)
gateway                     the services and pods that looked it up as their waypoint
AuthorizationPolicy         all policies (cheap); the pods the old or new version of a
                            changed workload selector selects
PeerAuthentication          the pods of its namespace; every pod for the root namespace
==========================  ===================================================================

A different :class:`~discovery.translate.TranslateConfig` means a new translator.
Used by one thread at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from discovery.model import Model, ObjectKey, Pod
from discovery.translate import (
    AddressTranslation,
    PolicyTranslation,
    TranslateConfig,
    Translation,
    TranslationContext,
    assemble,
    translate_policies,
)

K = TypeVar("K")


def changed_keys(old: Mapping[K, object], new: Mapping[K, object]) -> set[K]:
    """The keys added, removed or with a different value from ``old`` to ``new``."""
    if old is new:
        return set()
    changed = {k for k, v in new.items() if (o := old.get(k)) is not v and o != v}
    changed.update(k for k in old if k not in new)
    return changed


@dataclass(frozen=True, slots=True)
class TranslationStats:
    """What the last :meth:`IncrementalTranslator.translate` did."""

    full: bool
    pods: int  # pods translated (again)
    services: int  # services translated (again)
    policies: bool  # authorization policies translated again


class IncrementalTranslator:
    """Model -> :class:`~discovery.translate.Translation`, reusing unaffected parts."""

    def __init__(self, config: TranslateConfig | None = None) -> None:
        self.config = config or TranslateConfig()
        self._model: Model | None = None
        self._policies: PolicyTranslation | None = None
        self._services: dict[ObjectKey, AddressTranslation] = {}
        self._pods: dict[ObjectKey, AddressTranslation] = {}
        self.stats = TranslationStats(full=True, pods=0, services=0, policies=False)

    def translate(self, model: Model) -> Translation:
        try:
            return self._translate(model)
        except BaseException:
            self.reset()  # parts may be half updated: start again from scratch next time
            raise

    def reset(self) -> None:
        """Forget everything: the next :meth:`translate` translates the whole model."""
        self._model = self._policies = None
        self._services.clear()
        self._pods.clear()

    def _translate(self, model: Model) -> Translation:
        old, policies = self._model, self._policies
        redo_policies = old is None or policies is None
        if old is None or policies is None:
            policies = translate_policies(model, self.config)
            services, pods = set(model.services), set(model.pods)
        else:
            services, pods, redo_policies = self._affected(old, model)
            if redo_policies:
                new_policies = translate_policies(model, self.config)
                pods |= self._selected_by_changed_policies(model, policies, new_policies, pods)
                policies = new_policies
        context = TranslationContext(model, self.config)
        for key in services:
            svc = model.services.get(key)
            if svc is None:
                self._services.pop(key, None)
            else:
                self._services[key] = context.service(svc)
        for key in pods:
            pod = model.pods.get(key)
            part = None if pod is None else context.workload(pod, policies.selector_policies)
            if part is None:
                self._pods.pop(key, None)
            else:
                self._pods[key] = part
        self._model, self._policies = model, policies
        self.stats = TranslationStats(old is None, len(pods), len(services), redo_policies)
        return assemble(
            policies,
            [self._services[k] for k in sorted(self._services)],
            [self._pods[k] for k in sorted(self._pods)],
        )

    def _affected(self, old: Model, new: Model) -> tuple[set[ObjectKey], set[ObjectKey], bool]:
        """(services, pods) to translate again, and whether the policies changed."""
        changed_services = changed_keys(old.services, new.services)
        namespaces = changed_keys(old.namespaces, new.namespaces)
        nodes = changed_keys(old.nodes, new.nodes)
        gateways = changed_keys(old.gateways, new.gateways)
        peer_authn_namespaces = {
            key[0] for key in changed_keys(old.peer_authentications, new.peer_authentications)
        }
        services = set(changed_services)
        pods = changed_keys(old.pods, new.pods)
        if namespaces:
            services.update(k for k in new.services if k[0] in namespaces)
        if gateways:
            services.update(k for k, part in self._services.items() if part.gateway in gateways)
            pods.update(k for k, part in self._pods.items() if part.gateway in gateways)
        every_pod = self.config.root_namespace in peer_authn_namespaces
        pod_namespaces = namespaces | peer_authn_namespaces
        # The pods a changed service selects, before or after the change.
        selectors: list[tuple[str, Mapping[str, str]]] = []
        for key in changed_services:
            for svc in (old.services.get(key), new.services.get(key)):
                if svc is not None and svc.selector:
                    selectors.append((svc.namespace, svc.selector))

        def affected(pod: Pod) -> bool:
            return (
                every_pod
                or pod.namespace in pod_namespaces
                or pod.node in nodes
                or any(ns == pod.namespace and _selects(sel, pod) for ns, sel in selectors)
            )

        if every_pod or pod_namespaces or nodes or selectors:
            pods |= _matching(new.pods, pods, affected)
        redo_policies = bool(changed_keys(old.authorization_policies, new.authorization_policies))
        return services, pods, redo_policies

    @staticmethod
    def _selected_by_changed_policies(
        model: Model, old: PolicyTranslation, new: PolicyTranslation, already: set[ObjectKey]
    ) -> set[ObjectKey]:
        """The pods a workload-selector policy that changed selects (before or after)."""
        changed = set(old.selector_policies) ^ set(new.selector_policies)
        if not changed:
            return set()
        return _matching(
            model.pods,
            already,
            lambda pod: any(p.selects(pod.namespace, pod.labels) for p in changed),
        )


def _selects(selector: Mapping[str, str], pod: Pod) -> bool:
    return all(pod.labels.get(k) == v for k, v in selector.items())


def _matching(
    pods: Mapping[ObjectKey, Pod], skip: set[ObjectKey], predicate: Callable[[Pod], bool]
) -> set[ObjectKey]:
    return {key for key, pod in pods.items() if key not in skip and predicate(pod)}


__all__ = ["IncrementalTranslator", "TranslationStats", "changed_keys"]
