"""Registries: where the model comes from.

A registry adapter implements :class:`Registry`: ``start(sink)`` delivers a
whole :class:`~discovery.model.Model` to ``sink`` once it has a consistent
view (for Kubernetes: after the initial lists), then again after every
change; ``stop()`` ends it. ``sink`` may be called from any thread and must be
called by one thread at a time, in order. The control plane coalesces models
that come in bursts, so an adapter need not batch.

:class:`MemoryRegistry` is the in-memory registry of the tests and of
``underpass discovery serve --model FILE``: its writers (any thread) are
serialised by a lock and each write delivers the new model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from discovery.model import Model, ModelObject, ObjectKey

ModelSink = Callable[[Model], None]


class Registry(Protocol):
    def start(self, sink: ModelSink) -> None: ...

    def stop(self) -> None: ...


class MemoryRegistry:
    """A registry whose model is set by its caller."""

    def __init__(self, model: Model | None = None) -> None:
        self._lock = threading.Lock()
        self._model = model or Model()
        self._sinks: list[ModelSink] = []

    @property
    def model(self) -> Model:
        return self._model

    def start(self, sink: ModelSink) -> None:
        with self._lock:
            self._sinks.append(sink)
            sink(self._model)

    def stop(self) -> None:
        with self._lock:
            self._sinks.clear()

    def update(self, change: Callable[[Model], Model]) -> Model:
        """Apply ``change`` to the model and deliver the result; returns it."""
        with self._lock:
            self._model = change(self._model)
            for sink in self._sinks:
                sink(self._model)
            return self._model

    def replace(self, model: Model) -> Model:
        return self.update(lambda _old: model)

    def upsert(self, *objects: ModelObject) -> Model:
        return self.update(lambda m: m.upsert(*objects))

    def delete(self, kind: str, *keys: str | ObjectKey) -> Model:
        return self.update(lambda m: m.delete(kind, *keys))


__all__ = ["MemoryRegistry", "ModelSink", "Registry"]
