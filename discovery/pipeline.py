"""Registry models in, xDS snapshots out: the control plane's one writer of state.

- :class:`Debouncer` (no I/O, explicit clock): a burst of registry changes
  becomes one rebuild, once the registry has been quiet for ``quiet`` seconds
  or at the latest ``max_delay`` seconds after the burst's first change.
- :class:`SnapshotBuilder`: translates a model, incrementally by default
  (:class:`~discovery.incremental.IncrementalTranslator`: only the pods and
  services a change affects), and prepares every resource once
  (:class:`~underpass.xds.wire.PreparedResource`): a resource whose message
  is the one of the previous build keeps its prepared bytes without being
  serialised again, one whose content did not change keeps them too. It
  returns the successor snapshot with its change set, and reports each *new*
  finding once (a structlog line and ``underpass_discovery_unsupported_total``).
- :class:`Pipeline`: the asyncio task that runs them. :meth:`Pipeline.submit`
  may be called from any thread (registry watchers); models are coalesced
  (only the latest counts), translated in a worker thread so that streams keep
  being served, and the snapshot is handed to ``publish`` on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from google.protobuf.message import Message

from discovery.findings import Finding
from discovery.incremental import IncrementalTranslator
from discovery.metrics import DiscoveryMetrics
from discovery.model import Model
from discovery.translate import TranslateConfig, translate
from underpass.xds.server import Snapshot
from underpass.xds.types import TYPE_URL_PREFIX
from underpass.xds.wire import PreparedResource, content_version

_log = structlog.get_logger("discovery.pipeline")

DEFAULT_QUIET = 0.1
DEFAULT_MAX_DELAY = 1.0


@dataclass
class Debouncer:
    """When to rebuild after changes (see the module docstring). Times are seconds."""

    quiet: float = DEFAULT_QUIET
    max_delay: float = DEFAULT_MAX_DELAY
    _first: float | None = None
    _last: float | None = None

    def changed(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now

    @property
    def pending(self) -> bool:
        return self._first is not None

    def deadline(self) -> float | None:
        """When the pending changes are due (None: nothing pending)."""
        if self._first is None or self._last is None:
            return None
        return min(self._last + self.quiet, self._first + self.max_delay)

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def fire(self) -> None:
        """The pending changes are being handled."""
        self._first = self._last = None


class SnapshotBuilder:
    """Model -> next :class:`Snapshot` (see the module docstring). Used by one task.

    ``incremental=False`` translates the whole model every time (the reference
    the benchmark compares against).
    """

    def __init__(
        self,
        config: TranslateConfig,
        metrics: DiscoveryMetrics | None = None,
        *,
        incremental: bool = True,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.incremental = incremental
        self.translator = IncrementalTranslator(config)
        self.snapshot = Snapshot.empty()
        self.findings: frozenset[Finding] = frozenset()
        # The messages of the previous build, by type URL and name (identity reuse).
        self._messages: dict[str, Mapping[str, Message]] = {}

    def build(self, model: Model) -> Snapshot:
        started = time.perf_counter()
        if self.incremental:
            translation = self.translator.translate(model)
        else:
            translation = translate(model, self.config)
        named_by_type = translation.resources()
        resources: dict[str, dict[str, PreparedResource]] = {}
        for type_url, named in named_by_type.items():
            resources[type_url] = self._prepare(type_url, named)
        snapshot = self.snapshot.successor(resources)
        self.snapshot = snapshot
        self._messages = named_by_type
        self._report(translation.findings)
        if self.metrics is not None:
            self.metrics.translate_seconds.observe(time.perf_counter() - started)
            if self.incremental:
                stats = self.translator.stats
                self.metrics.translated.labels(kind="pod").inc(stats.pods)
                self.metrics.translated.labels(kind="service").inc(stats.services)
            for type_url, prepared in resources.items():
                label = type_url.removeprefix(TYPE_URL_PREFIX)
                self.metrics.snapshot_resources.labels(type_url=label).set(len(prepared))
        return snapshot

    def _prepare(self, type_url: str, named: Mapping[str, Message]) -> dict[str, PreparedResource]:
        previous = self.snapshot.of_type(type_url)
        messages = self._messages.get(type_url, {})
        out: dict[str, PreparedResource] = {}
        for name, message in named.items():
            old = previous.get(name)
            if old is not None:
                if messages.get(name) is message:  # not translated again: same content
                    out[name] = old
                    continue
                payload = message.SerializeToString(deterministic=True)
                if old.version == content_version(payload):
                    out[name] = old
                    continue
            out[name] = PreparedResource.prepare(name, message, type_url)
        return out

    def _report(self, findings: tuple[Finding, ...]) -> None:
        current = frozenset(findings)
        for finding in sorted(current - self.findings):
            _log.warning("discovery.unsupported", **finding.log_fields())
            if self.metrics is not None:
                self.metrics.unsupported.labels(reason=finding.reason).inc()
        for finding in sorted(self.findings - current):
            _log.info("discovery.unsupported_resolved", **finding.log_fields())
        self.findings = current


class Pipeline:
    """The asyncio side: coalesce submitted models, build snapshots, publish them."""

    def __init__(
        self,
        builder: SnapshotBuilder,
        publish: Callable[[Snapshot], None],
        *,
        debouncer: Debouncer | None = None,
    ) -> None:
        self.builder = builder
        self._publish = publish
        self.debouncer = debouncer or Debouncer()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._latest: Model | None = None
        self._wake: asyncio.Event | None = None
        self.metrics = builder.metrics

    def submit(self, model: Model) -> None:
        """Hand over the registry's latest model (any thread)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the pipeline is not running")
        loop.call_soon_threadsafe(self._changed, model)

    def _changed(self, model: Model) -> None:
        assert self._loop is not None and self._wake is not None
        self._latest = model
        self.debouncer.changed(self._loop.time())
        self._wake.set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the loop that will :meth:`run` (before any :meth:`submit`)."""
        self._loop = loop
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Run until cancelled."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._wake is None:
            self.bind(loop)
        assert self._wake is not None
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            while (deadline := self.debouncer.deadline()) is not None and not self.debouncer.due(
                loop.time()
            ):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), deadline - loop.time())
                wake.clear()
            model = self._latest
            self.debouncer.fire()
            if model is None:
                continue
            try:
                snapshot = await loop.run_in_executor(None, self.builder.build, model)
            except Exception:
                _log.exception("discovery.translate_failed")
                continue
            if self.metrics is not None:
                self.metrics.snapshots.inc()
            self._publish(snapshot)


__all__ = [
    "DEFAULT_MAX_DELAY",
    "DEFAULT_QUIET",
    "Debouncer",
    "Pipeline",
    "SnapshotBuilder",
]
