"""Publishes the CA's root certificate into every namespace (PROTOCOLS.md section 4).

Workloads (and ztunnel) trust the mesh's CA through the ConfigMap
``istio-ca-root-cert``, key ``root-cert.pem``, in their namespace.
:class:`RootCertPublisher` keeps it there:

- created when a namespace appears (a namespace being deleted is left alone);
- corrected when someone edits or deletes it: the Kubernetes registry watches
  these ConfigMaps (a field selector on the name) and tells the publisher;
- only ``data["root-cert.pem"]`` is ours. An update re-reads the ConfigMap and
  changes that key alone (optimistic concurrency: a conflicting write makes
  it read again), so other keys, labels and annotations, and whoever manages
  them, are left as they are. A ConfigMap we create carries the label
  ``istio.io/config: "true"`` as Istio's does; writes name the field manager
  ``underpass-discovery``.

The publisher is driven by the registry's namespace watch and ConfigMap
watch (:class:`~discovery.registries.kubernetes.RootCertSink`); calls from
those threads only queue a message. One thread owns the state and makes the
API calls, so a slow API server never holds up the discovery model. It acts
once the ConfigMaps have been listed, from what the watch shows (no read per
namespace when the ConfigMap is already right). Failures are retried per
namespace with backoff (temporary: 0.5 s doubling to 30 s; permanent, e.g.
RBAC: every minute, logged as errors saying what to grant).

Root rotation: the root bundle is read from ``root_pem()`` on every check;
call :meth:`RootCertPublisher.republish` after a rotation.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from discovery.registries.errors import ApiError, RegistryError
from discovery.registries.kubernetes import (
    ROOT_CERT_CONFIGMAP,
    Changed,
    Listed,
    WatchMessage,
    classify,
)
from discovery.registries.retry import Backoff

_log = structlog.get_logger("discovery.registries.rootcert")

ROOT_CERT_KEY: Final = "root-cert.pem"
FIELD_MANAGER: Final = "underpass-discovery"
CONFIG_LABEL: Final = "istio.io/config"
REQUEST_TIMEOUT: Final = (10.0, 30.0)
STOP_TIMEOUT: Final = 15.0


@dataclass(frozen=True, slots=True)
class _Namespaces:
    active: Mapping[str, bool]
    complete: bool  # a full list (names not in it are gone)


@dataclass(frozen=True, slots=True)
class _NamespaceGone:
    name: str


@dataclass(frozen=True, slots=True)
class _Republish:
    pass


_STOP: Final = object()
_ABSENT: Final = object()  # the ConfigMap does not exist (as far as the watch shows)


class RootCertPublisher:
    """Keeps ``istio-ca-root-cert`` right in every namespace (see the module docstring)."""

    def __init__(
        self,
        api_client: Any,
        root_pem: Callable[[], str],
        *,
        skip_namespaces: frozenset[str] = frozenset(),
        namespace_filter: Callable[[str], bool] | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api_client)
        self._root_pem = root_pem
        self.skip_namespaces = skip_namespaces
        #: Publish only where this says yes (default: every namespace not skipped).
        self.namespace_filter = namespace_filter
        self._make_backoff = backoff
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # State below: the publisher thread's only.
        self._active: dict[str, bool] = {}
        self._observed: dict[str, object] = {}  # namespace -> root-cert.pem value or _ABSENT
        self._configmaps_listed = False
        self._due: dict[str, float] = {}
        self._backoffs: dict[str, Backoff] = {}
        #: Writes made (creates + updates), for tests and logs.
        self.writes = 0

    # -- driven by the registry (any thread) ----------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the root certificate publisher is already started")
        self._thread = threading.Thread(target=self._run, name="root-cert", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(STOP_TIMEOUT)
        self._thread = None
        if thread.is_alive():
            raise RegistryError("the root certificate publisher did not stop")

    def namespaces_listed(self, namespaces: Mapping[str, bool]) -> None:
        self._queue.put(_Namespaces(dict(namespaces), complete=True))

    def namespace_changed(self, name: str, active: bool) -> None:
        self._queue.put(_Namespaces({name: active}, complete=False))

    def namespace_deleted(self, name: str) -> None:
        self._queue.put(_NamespaceGone(name))

    def configmap_message(self, message: WatchMessage) -> None:
        self._queue.put(message)

    def republish(self) -> None:
        """Check every namespace again (after a root rotation)."""
        self._queue.put(_Republish())

    # -- the publisher thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            timeout = max(0.0, min(self._due.values()) - now) if self._due else None
            try:
                message = self._queue.get(timeout=timeout)
            except queue.Empty:
                message = None
            while message is not None:
                if message is _STOP:
                    return
                self._apply(message)
                try:
                    message = self._queue.get_nowait()
                except queue.Empty:
                    message = None
            if not self._configmaps_listed:
                continue  # decide from the watch's view, once there is one
            now = time.monotonic()
            for namespace in sorted(ns for ns, due in self._due.items() if due <= now):
                del self._due[namespace]
                self._reconcile(namespace)

    def _schedule(self, namespace: str, delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        if namespace not in self._due or self._due[namespace] > due:
            self._due[namespace] = due

    def _wanted(self, namespace: str) -> bool:
        return (
            self._active.get(namespace) is True
            and namespace not in self.skip_namespaces
            and (self.namespace_filter is None or self.namespace_filter(namespace))
        )

    def _check(self, namespace: str) -> None:
        if self._wanted(namespace) and self._observed.get(namespace, _ABSENT) != self._root_pem():
            self._schedule(namespace)

    def _forget(self, namespace: str) -> None:
        self._active.pop(namespace, None)
        self._due.pop(namespace, None)
        self._backoffs.pop(namespace, None)

    def _apply(self, message: object) -> None:
        if isinstance(message, _Namespaces):
            if message.complete:
                for gone in set(self._active) - set(message.active):
                    self._forget(gone)
            self._active.update(message.active)
            for namespace in message.active:
                self._check(namespace)
        elif isinstance(message, _NamespaceGone):
            self._forget(message.name)
        elif isinstance(message, _Republish):
            for namespace in self._active:
                self._check(namespace)
        elif isinstance(message, Listed):
            self._observed = {}
            for item in message.items:
                namespace, value = _observed(item)
                self._observed[namespace] = value
            self._configmaps_listed = True
            for namespace in self._active:
                self._check(namespace)
        elif isinstance(message, Changed):
            namespace, value = _observed(message.object)
            self._observed[namespace] = _ABSENT if message.type == "DELETED" else value
            self._check(namespace)

    # -- API calls -----------------------------------------------------------------------

    def _reconcile(self, namespace: str) -> None:
        if not self._wanted(namespace):
            return
        root = self._root_pem()
        try:
            if self._observed.get(namespace, _ABSENT) is _ABSENT:
                outcome = self._create(namespace, root)
                if outcome == "exists":
                    outcome = self._update(namespace, root)  # it existed after all
            else:
                outcome = self._update(namespace, root)
        except ApiError as exc:
            if exc.status == 409:  # someone wrote in between: look again now
                self._schedule(namespace)
                return
            if exc.status in (403, 404) and not self._wanted(namespace):
                return
            backoff = self._backoffs.setdefault(namespace, self._make_backoff())
            delay = backoff.next_delay(temporary=exc.temporary)
            (_log.warning if exc.temporary else _log.error)(
                "discovery.root_cert_publish_failed",
                namespace=namespace,
                error=str(exc),
                retry_in=round(delay, 2),
            )
            self._schedule(namespace, delay)
            return
        self._backoffs.pop(namespace, None)
        if outcome == "terminating":
            self._active[namespace] = False
        else:
            self._observed[namespace] = root

    def _create(self, namespace: str, root: str) -> str:
        """Create the ConfigMap: "done", "exists" or "terminating" (the namespace)."""
        from kubernetes.client.exceptions import ApiException

        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": ROOT_CERT_CONFIGMAP, "labels": {CONFIG_LABEL: "true"}},
            "data": {ROOT_CERT_KEY: root},
        }
        try:
            self._core.create_namespaced_config_map(
                namespace,
                body,
                field_manager=FIELD_MANAGER,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ).release_conn()
        except ApiException as exc:
            if exc.status == 409:
                return "exists"
            if exc.status == 403 and "being terminated" in str(exc.body or ""):
                return "terminating"
            raise classify(exc, f"create ConfigMap {namespace}/{ROOT_CERT_CONFIGMAP}") from None
        except Exception as exc:
            raise classify(exc, f"create ConfigMap {namespace}/{ROOT_CERT_CONFIGMAP}") from None
        self.writes += 1
        _log.info("discovery.root_cert_published", namespace=namespace, action="created")
        return "done"

    def _update(self, namespace: str, root: str) -> str:
        """Make ``root-cert.pem`` right in an existing ConfigMap (or create it): as _create."""
        from kubernetes.client.exceptions import ApiException

        what = f"update ConfigMap {namespace}/{ROOT_CERT_CONFIGMAP}"
        try:
            response = self._core.read_namespaced_config_map(
                ROOT_CERT_CONFIGMAP,
                namespace,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
            try:
                current = json.loads(response.data)
            finally:
                response.release_conn()
        except ApiException as exc:
            if exc.status == 404:
                outcome = self._create(namespace, root)
                if outcome == "exists":  # created and gone again meanwhile: look again
                    raise ApiError(
                        f"cannot {what}: it keeps changing", status=409, temporary=True
                    ) from None
                return outcome
            raise classify(exc, what) from None
        except Exception as exc:
            raise classify(exc, what) from None
        data = current.get("data") or {}
        if data.get(ROOT_CERT_KEY) == root:
            return "done"
        current["data"] = {**data, ROOT_CERT_KEY: root}
        try:
            self._core.replace_namespaced_config_map(
                ROOT_CERT_CONFIGMAP,
                namespace,
                current,  # carries metadata.resourceVersion: a concurrent write is a 409
                field_manager=FIELD_MANAGER,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            ).release_conn()
        except Exception as exc:
            raise classify(exc, what) from None
        self.writes += 1
        _log.info(
            "discovery.root_cert_published",
            namespace=namespace,
            action="corrected",
            other_keys=sorted(k for k in data if k != ROOT_CERT_KEY),
        )
        return "done"


def _observed(obj: Mapping[str, Any]) -> tuple[str, object]:
    meta = obj.get("metadata") or {}
    data = obj.get("data") or {}
    value = data.get(ROOT_CERT_KEY) if isinstance(data, Mapping) else None
    return str(meta.get("namespace") or ""), value


__all__ = ["CONFIG_LABEL", "FIELD_MANAGER", "ROOT_CERT_KEY", "RootCertPublisher"]
