"""The Kubernetes API as a discovery registry: list + watch -> the model.

:class:`KubernetesRegistry` implements :class:`discovery.registry.Registry`
with the ``kubernetes`` client:

- one watcher thread per kind (:data:`MODEL_KINDS`: namespaces, nodes, pods,
  services, Gateway API ``gateways``, Istio ``authorizationpolicies`` and
  ``peerauthentications``). Each lists (in pages), then watches from the
  list's ``resourceVersion`` with bookmarks, and resumes from the last
  version it saw whenever a watch ends (the server closes watches after a few
  minutes) or breaks. ``410 Gone`` (the version is too old: the API server no
  longer has the history) means list again (resync). Every
  :attr:`~KubernetesRegistry.resync_period` (with jitter) a watcher lists
  again anyway, which bounds how long any drift could last;
- one writer thread, the only owner of state: it applies the watchers'
  lists and events in order, parses objects (:mod:`discovery.registries.objects`),
  and after each burst (everything already queued is applied first: bursts
  coalesce) builds one :class:`~discovery.model.Model`, updates the CA's
  :class:`~discovery.registries.nodeindex.ModelNodeIndex` and calls the sink.
  The first model is delivered only when every kind has been listed once: the
  control plane never serves half a cluster, and never serves workloads
  without the policies that apply to them.

API errors are classified (:func:`classify`): temporary ones (no answer,
timeouts, 429, 5xx) are retried with exponential backoff (0.5 s doubling to
30 s, jittered); permanent ones (401, 403, 404, other 4xx: RBAC, a missing
API) are logged as errors saying what to fix and retried every minute, so
that fixing RBAC needs no restart. A policy CRD that is not installed (404 on
its list) counts as "no objects of that kind" and is checked again every
minute: without the CRD no such policy can exist.

With a :class:`~discovery.registries.rootcert.RootCertPublisher` the
registry also feeds it the namespace watch and watches the
``istio-ca-root-cert`` ConfigMaps (a field selector on the name, so RBAC can
restrict it to that name).

RBAC: :data:`CLUSTER_ROLE_RULES` (and :func:`cluster_role`) is the least the
discovery process needs, including the CA's TokenReviews and the root
certificate ConfigMaps; the README shows it as YAML.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog
import yaml

from discovery.errors import ModelError
from discovery.model import Model, ModelObject
from discovery.registries.errors import ApiError, RegistryError, ResourceExpired
from discovery.registries.nodeindex import ModelNodeIndex
from discovery.registries.objects import (
    GATEWAY_GROUP,
    SECURITY_GROUP,
    is_terminating,
    parse_authorization_policy,
    parse_gateway,
    parse_namespace,
    parse_node,
    parse_peer_authentication,
    parse_pod,
    parse_service,
)
from discovery.registries.retry import Backoff
from discovery.registry import ModelSink

_log = structlog.get_logger("discovery.registries.kubernetes")

DEFAULT_RESYNC_PERIOD: Final = 600.0
#: Longest single watch request; the server ends it and the watcher resumes.
MAX_WATCH_SECONDS: Final = 300
LIST_PAGE_SIZE: Final = 500
CONNECT_TIMEOUT: Final = 10.0
LIST_READ_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 15.0
ROOT_CERT_CONFIGMAP: Final = "istio-ca-root-cert"
#: The least privilege of the discovery process (a ClusterRole's rules).
CLUSTER_ROLE_RULES: Final[tuple[Mapping[str, Any], ...]] = (
    {
        "apiGroups": [""],
        "resources": ["namespaces", "nodes", "pods", "services"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": [SECURITY_GROUP],
        "resources": ["authorizationpolicies", "peerauthentications"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": [GATEWAY_GROUP],
        "resources": ["gateways"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["authentication.k8s.io"],
        "resources": ["tokenreviews"],
        "verbs": ["create"],
    },
    # A create cannot be restricted by name (the object does not exist yet).
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    # list/watch honour resourceNames when the request selects metadata.name.
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": [ROOT_CERT_CONFIGMAP],
        "verbs": ["get", "list", "watch", "update"],
    },
)
DEFAULT_CLUSTER_ROLE_NAME: Final = "underpass-discovery"


def cluster_role(name: str = DEFAULT_CLUSTER_ROLE_NAME) -> dict[str, Any]:
    """The ClusterRole of :data:`CLUSTER_ROLE_RULES`, as a Kubernetes object."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [dict(rule) for rule in CLUSTER_ROLE_RULES],
    }


def cluster_role_yaml(name: str = DEFAULT_CLUSTER_ROLE_NAME) -> str:
    return yaml.safe_dump(cluster_role(name), sort_keys=False, default_flow_style=None)


# -- error classification -------------------------------------------------------------------

_TEMPORARY_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})


def classify(exc: BaseException, what: str) -> ApiError:
    """An exception of the client (or the transport) as an :class:`ApiError`."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        reason = str(exc.reason or "").strip()
        return api_error(status, reason, what)
    return ApiError(
        f"cannot {what}: {type(exc).__name__}: {str(exc)[:300]} (is the API server reachable?)",
        temporary=True,
    )


def api_error(status: int, reason: str, what: str) -> ApiError:
    """An :class:`ApiError` for an HTTP status (also the ``code`` of a watch ERROR event)."""
    if status == 410:
        return ResourceExpired(f"cannot {what}: 410 {reason or 'Gone'}: list again")
    if status in (401, 403):
        hint = (
            "the discovery process's credentials are not accepted"
            if status == 401
            else "its service account lacks RBAC: grant the ClusterRole in the README "
            "(discovery.registries.kubernetes.CLUSTER_ROLE_RULES)"
        )
        return ApiError(f"cannot {what}: {status} {reason}: {hint}", status=status, temporary=False)
    if status in _TEMPORARY_STATUSES or status == 0:
        return ApiError(f"cannot {what}: {status} {reason}", status=status, temporary=True)
    return ApiError(f"cannot {what}: {status} {reason}", status=status, temporary=False)


# -- kinds ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of object to list and watch."""

    #: The resource (plural), e.g. "pods"; also the watcher's name.
    resource: str
    group: str
    version: str
    #: The model field it fills (None: not part of the model, e.g. ConfigMaps).
    model_field: str | None
    parse: Callable[[Any, list[str] | None], ModelObject] | None
    #: A custom resource: a 404 on its list means its CRD is not installed.
    custom: bool = False
    field_selector: str | None = None

    @property
    def display(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource

    def list_function(self, api_client: Any) -> Callable[..., Any]:
        from kubernetes import client

        if self.custom:
            api = client.CustomObjectsApi(api_client)

            def custom(**kwargs: Any) -> Any:
                return api.list_cluster_custom_object(
                    self.group, self.version, self.resource, **kwargs
                )

            return custom
        core = client.CoreV1Api(api_client)
        functions: dict[str, Callable[..., Any]] = {
            "namespaces": core.list_namespace,
            "nodes": core.list_node,
            "pods": core.list_pod_for_all_namespaces,
            "services": core.list_service_for_all_namespaces,
            "configmaps": core.list_config_map_for_all_namespaces,
        }
        return functions[self.resource]


NAMESPACES: Final = Kind("namespaces", "", "v1", "namespaces", parse_namespace)
NODES: Final = Kind("nodes", "", "v1", "nodes", parse_node)
PODS: Final = Kind("pods", "", "v1", "pods", parse_pod)
SERVICES: Final = Kind("services", "", "v1", "services", parse_service)
GATEWAYS: Final = Kind("gateways", GATEWAY_GROUP, "v1", "gateways", parse_gateway, custom=True)
AUTHORIZATION_POLICIES: Final = Kind(
    "authorizationpolicies",
    SECURITY_GROUP,
    "v1",
    "authorization_policies",
    parse_authorization_policy,
    custom=True,
)
PEER_AUTHENTICATIONS: Final = Kind(
    "peerauthentications",
    SECURITY_GROUP,
    "v1",
    "peer_authentications",
    parse_peer_authentication,
    custom=True,
)
ROOT_CERT_CONFIGMAPS: Final = Kind(
    "configmaps",
    "",
    "v1",
    None,
    None,
    field_selector=f"metadata.name={ROOT_CERT_CONFIGMAP}",
)
MODEL_KINDS: Final = (
    NAMESPACES,
    NODES,
    PODS,
    SERVICES,
    GATEWAYS,
    AUTHORIZATION_POLICIES,
    PEER_AUTHENTICATIONS,
)


# -- messages from watchers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listed:
    """A watcher's full list of its kind (replaces what was known)."""

    kind: Kind
    items: list[dict[str, Any]]
    #: False when the kind's API is not installed (the list is then empty).
    installed: bool = True


@dataclass(frozen=True, slots=True)
class Changed:
    """One watch event: ``type`` is ADDED, MODIFIED or DELETED."""

    kind: Kind
    type: str
    object: dict[str, Any]


WatchMessage = Listed | Changed
Deliver = Callable[[WatchMessage], None]


@dataclass
class WatchStats:
    """What a watcher did (for tests, logs and readiness)."""

    lists: int = 0
    events: int = 0
    expired: int = 0
    errors: int = 0
    watches: int = 0


def _lines(response: Any) -> Iterator[bytes]:
    """The newline-delimited JSON lines of a watch response, as they arrive."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=True):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


class Watcher:
    """Lists and watches one kind on its own thread, delivering :data:`WatchMessage` values."""

    def __init__(
        self,
        kind: Kind,
        api_client: Any,
        deliver: Deliver,
        *,
        resync_period: float = DEFAULT_RESYNC_PERIOD,
        backoff: Backoff | None = None,
        stopping: threading.Event,
    ) -> None:
        self.kind = kind
        self.deliver = deliver
        self.resync_period = resync_period
        self.stats = WatchStats()
        self._api_client = api_client
        self._list_function = kind.list_function(api_client)
        self._backoff = backoff or Backoff()
        self._stopping = stopping
        self._lock = threading.Lock()
        self._response: Any = None
        self._interrupted = False
        self._resume_from: str | None = None
        #: The resourceVersion to resume from (None: list first).
        self._version: str | None = None
        self._installed: bool | None = None
        self._thread: threading.Thread | None = None
        self._random = random.SystemRandom()
        self._log = _log.bind(kind=kind.display)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{self.kind.resource}", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """End the current watch request now (used by stop and :meth:`interrupt`)."""
        with self._lock:
            response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def interrupt(self, resume_from: str | None = None) -> None:
        """Break the current watch, as a lost connection would; it resumes by itself.

        ``resume_from`` replaces the resourceVersion it resumes from: a version
        the API server no longer has makes it answer ``410 Gone``, as after a
        long disconnection (tests use this to exercise the resync path).
        """
        with self._lock:
            self._interrupted = True
            self._resume_from = resume_from
        self.wake()

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        resync_at = 0.0
        while not self._stopping.is_set():
            try:
                if self._version is None:
                    self._version = self._list()
                    self._backoff.reset()
                    resync_at = time.monotonic() + self.resync_period * self._random.uniform(
                        0.8, 1.0
                    )
                self._watch(resync_at)
                if time.monotonic() >= resync_at:
                    self._log.debug("discovery.k8s_resync")
                    self._version = None
            except ResourceExpired as exc:
                self.stats.expired += 1
                self._log.info("discovery.k8s_watch_expired", detail=str(exc), action="list again")
                self._version = None
            except Exception as exc:
                if self._stopping.is_set():
                    break
                error = classify(exc, f"list/watch {self.kind.display}")
                if self._version is None and self.kind.custom and error.status == 404:
                    try:
                        self._not_installed()
                        continue
                    except Exception as check:
                        error = classify(check, f"check whether {self.kind.display} is served")
                self.stats.errors += 1
                delay = self._backoff.next_delay(temporary=error.temporary)
                log = self._log.warning if error.temporary else self._log.error
                log(
                    "discovery.k8s_api_error",
                    error=str(error),
                    status=error.status,
                    temporary=error.temporary,
                    retry_in=round(delay, 2),
                )
                self._stopping.wait(delay)

    def _not_installed(self) -> None:
        """A 404 on a custom kind's list: no such objects, unless only our version is missing.

        Without the API group at all (or with the group but not this resource)
        none of these objects can exist, and an empty list is the truth. If the
        group is served in other versions only, objects may well exist: that is
        a permanent error (fail closed: policies that cannot be read are not
        taken for absent ones).
        """
        versions = self._served_versions()
        if versions and self.kind.version not in versions:
            raise ApiError(
                f"cannot list {self.kind.display}: the API server serves {self.kind.group} "
                f"only in {', '.join(versions)}, not {self.kind.version}; upgrade its CRDs",
                status=404,
                temporary=False,
            )
        if self._installed is not False:
            self._log.warning(
                "discovery.k8s_kind_not_installed",
                detail=f"{self.kind.display}/{self.kind.version} is not served (is its CRD "
                "installed?): no such object can exist; checking again every "
                f"{self._backoff.permanent:.0f} s",
            )
        self._installed = False
        self.stats.lists += 1
        self.deliver(Listed(self.kind, [], installed=False))
        self._stopping.wait(self._backoff.permanent)

    def _served_versions(self) -> list[str]:
        """The versions the API server serves of this kind's group ([]: the group is absent)."""
        from kubernetes import client

        apis: Any = client.ApisApi(self._api_client)
        response = apis.get_api_versions(
            _preload_content=False, _request_timeout=(CONNECT_TIMEOUT, LIST_READ_TIMEOUT)
        )
        try:
            groups = json.loads(response.data).get("groups") or []
        finally:
            response.release_conn()
        for group in groups:
            if isinstance(group, dict) and group.get("name") == self.kind.group:
                return [str(v.get("version")) for v in group.get("versions") or ()]
        return []

    def _call(self, **kwargs: Any) -> Any:
        if self.kind.field_selector:
            kwargs["field_selector"] = self.kind.field_selector
        return self._list_function(_preload_content=False, **kwargs)

    def _list(self) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "limit": LIST_PAGE_SIZE,
                "_request_timeout": (CONNECT_TIMEOUT, LIST_READ_TIMEOUT),
            }
            if token:
                kwargs["_continue"] = token
            response = self._call(**kwargs)
            try:
                page = json.loads(response.data)
            finally:
                response.release_conn()
            if not isinstance(page, dict) or not isinstance(page.get("items"), list):
                raise ApiError(f"the list of {self.kind.display} is not a List", temporary=True)
            items += [i for i in page["items"] if isinstance(i, dict)]
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                version = str(meta.get("resourceVersion") or "")
                break
        if self._installed is False:
            self._log.info("discovery.k8s_kind_installed")
        self._installed = True
        self.stats.lists += 1
        self._log.debug("discovery.k8s_listed", items=len(items), resource_version=version)
        self.deliver(Listed(self.kind, items))
        return version

    def _watch(self, resync_at: float) -> None:
        """One watch request, from ``self._version``; returns when it ends."""
        with self._lock:
            self._interrupted = False
            if self._resume_from is not None:
                self._version, self._resume_from = self._resume_from, None
        seconds = int(max(1.0, min(MAX_WATCH_SECONDS, resync_at - time.monotonic())))
        response = self._call(
            watch=True,
            resource_version=self._version,
            allow_watch_bookmarks=True,
            timeout_seconds=seconds,
            _request_timeout=(CONNECT_TIMEOUT, seconds + 30.0),
        )
        self.stats.watches += 1
        with self._lock:
            self._response = response
        try:
            if self._stopping.is_set():
                return
            for line in _lines(response):
                self._event(json.loads(line))
            self._backoff.reset()
        except ResourceExpired:
            raise
        except Exception:
            with self._lock:
                interrupted = self._interrupted
            if interrupted or self._stopping.is_set():
                return  # we broke the connection ourselves
            raise
        finally:
            with self._lock:
                self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()

    def _event(self, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise ApiError("a watch event without an object", temporary=True)
        if kind == "ERROR":
            code = obj.get("code")
            raise api_error(
                code if isinstance(code, int) else 0,
                str(obj.get("message") or obj.get("reason") or ""),
                f"watch {self.kind.display}",
            )
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.stats.events += 1
            self.deliver(Changed(self.kind, kind, obj))
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if isinstance(version, str) and version:
            self._version = version


# -- the writer ------------------------------------------------------------------------------


class RootCertSink(Protocol):
    """What the registry tells the root certificate publisher (from its threads)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def namespaces_listed(self, namespaces: Mapping[str, bool]) -> None:
        """Every namespace, name -> active (False: being deleted)."""

    def namespace_changed(self, name: str, active: bool) -> None: ...

    def namespace_deleted(self, name: str) -> None: ...

    def configmap_message(self, message: WatchMessage) -> None:
        """A list or event of the root certificate ConfigMaps' watch."""


_STOP: Final = object()
_MODEL_FIELDS: Final = tuple(k.model_field for k in MODEL_KINDS if k.model_field)


@dataclass
class _State:
    buckets: dict[str, dict[Any, ModelObject]] = field(default_factory=dict)
    synced: set[str] = field(default_factory=set)
    dirty: bool = False


def _key(obj: ModelObject) -> Any:
    return getattr(obj, "key", None) or obj.name


class KubernetesRegistry:
    """The Kubernetes API as a :class:`~discovery.registry.Registry` (see the module docstring)."""

    def __init__(
        self,
        api_client: Any,
        *,
        resync_period: float = DEFAULT_RESYNC_PERIOD,
        backoff: Callable[[], Backoff] = Backoff,
        root_cert_publisher: RootCertSink | None = None,
        kinds: Sequence[Kind] = MODEL_KINDS,
    ) -> None:
        if resync_period <= 0:
            raise RegistryError("the resync period must be positive")
        self.api_client = api_client
        self.resync_period = resync_period
        self.node_index = ModelNodeIndex()
        self.publisher = root_cert_publisher
        self.kinds = tuple(kinds)
        self._make_backoff = backoff
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._watchers: dict[str, Watcher] = {}
        self._writer: threading.Thread | None = None
        self._synced = threading.Event()
        self._model: Model | None = None
        self._sink: ModelSink | None = None

    @property
    def model(self) -> Model | None:
        """The last model delivered (None before the first)."""
        return self._model

    def watcher(self, resource: str) -> Watcher:
        return self._watchers[resource]

    def wait_synced(self, timeout: float) -> bool:
        """Block until the first model was delivered (every kind listed once)."""
        return self._synced.wait(timeout)

    # -- Registry ------------------------------------------------------------------------

    def start(self, sink: ModelSink) -> None:
        if self._writer is not None:
            raise RuntimeError("the Kubernetes registry is already started")
        self._stopping.clear()
        self._sink = sink
        self._writer = threading.Thread(target=self._write, name="k8s-registry", daemon=True)
        self._writer.start()
        kinds = list(self.kinds)
        if self.publisher is not None:
            self.publisher.start()
        for kind in kinds:
            self._watchers[kind.resource] = Watcher(
                kind,
                self.api_client,
                self._queue.put,
                resync_period=self.resync_period,
                backoff=self._make_backoff(),
                stopping=self._stopping,
            )
        if self.publisher is not None:
            self._watchers[ROOT_CERT_CONFIGMAPS.resource] = Watcher(
                ROOT_CERT_CONFIGMAPS,
                self.api_client,
                self.publisher.configmap_message,
                resync_period=self.resync_period,
                backoff=self._make_backoff(),
                stopping=self._stopping,
            )
        _log.info(
            "discovery.k8s_registry_started",
            kinds=[k.display for k in kinds],
            root_cert=self.publisher is not None,
            resync_period=self.resync_period,
        )
        for watcher in self._watchers.values():
            watcher.start()

    def stop(self) -> None:
        """Stop every thread (idempotent); raises if one does not stop in time."""
        if self._writer is None:
            return
        self._stopping.set()
        for watcher in self._watchers.values():
            watcher.wake()
        stuck = [w.kind.display for w in self._watchers.values() if not w.join(STOP_TIMEOUT)]
        self._queue.put(_STOP)
        self._writer.join(STOP_TIMEOUT)
        if self._writer.is_alive():
            stuck.append("writer")
        if self.publisher is not None:
            self.publisher.stop()
        self._watchers.clear()
        self._writer = None
        if stuck:
            raise RegistryError(f"Kubernetes registry threads did not stop: {', '.join(stuck)}")
        _log.info("discovery.k8s_registry_stopped")

    # -- the writer thread ---------------------------------------------------------------

    def _write(self) -> None:
        state = _State()
        required = {k.resource for k in self.kinds}
        while True:
            message = self._queue.get()
            if message is _STOP:
                return
            self._apply(state, message)
            while True:  # coalesce what is already queued
                try:
                    message = self._queue.get_nowait()
                except queue.Empty:
                    break
                if message is _STOP:
                    return
                self._apply(state, message)
            if state.dirty and required <= state.synced:
                self._deliver(state)

    def _deliver(self, state: _State) -> None:
        fields: dict[str, Any] = {name: state.buckets.get(name, {}) for name in _MODEL_FIELDS}
        model = Model(**fields)
        state.dirty = False
        self.node_index.update(model)
        self._model = model
        sink = self._sink
        if sink is not None:
            try:
                sink(model)
            except Exception:
                _log.exception("discovery.k8s_sink_failed")
        if not self._synced.is_set():
            self._synced.set()
            _log.info(
                "discovery.k8s_synced",
                namespaces=len(model.namespaces),
                pods=len(model.pods),
                services=len(model.services),
                policies=len(model.authorization_policies) + len(model.peer_authentications),
            )

    def _parse(
        self, kind: Kind, raw: dict[str, Any], previous: ModelObject | None = None
    ) -> ModelObject | None:
        """Parse; problems are logged only for an object that changed (not on every resync)."""
        assert kind.parse is not None
        problems: list[str] = []
        try:
            obj = kind.parse(raw, problems)
        except ModelError as exc:
            _log.warning("discovery.k8s_object_unusable", kind=kind.display, problem=str(exc))
            return None
        if problems and obj != previous:
            _log.warning(
                "discovery.k8s_object_problems",
                kind=kind.display,
                object=f"{getattr(obj, 'namespace', '')}/{obj.name}".lstrip("/"),
                problems=problems,
            )
        return obj

    def _apply(self, state: _State, message: object) -> None:
        if isinstance(message, Listed):
            self._apply_list(state, message)
        elif isinstance(message, Changed):
            self._apply_change(state, message)

    def _apply_list(self, state: _State, message: Listed) -> None:
        kind = message.kind
        assert kind.model_field is not None
        old = state.buckets.get(kind.model_field, {})
        new: dict[Any, ModelObject] = {}
        for raw in message.items:
            key = _raw_key(raw, namespaced=kind.resource not in ("namespaces", "nodes"))
            obj = self._parse(kind, raw, old.get(key))
            if obj is not None:
                new[_key(obj)] = obj
        if new != old or kind.model_field not in state.buckets:
            state.buckets[kind.model_field] = new
            state.dirty = True
        state.synced.add(kind.resource)
        if kind is NAMESPACES and self.publisher is not None:
            active = {_raw_name(r): not is_terminating(r) for r in message.items}
            self.publisher.namespaces_listed(active)

    def _apply_change(self, state: _State, message: Changed) -> None:
        kind = message.kind
        assert kind.model_field is not None
        bucket = state.buckets.setdefault(kind.model_field, {})
        raw = message.object
        if message.type == "DELETED":
            key = _raw_key(raw, namespaced=kind.resource not in ("namespaces", "nodes"))
            if bucket.pop(key, None) is not None:
                state.dirty = True
            if kind is NAMESPACES and self.publisher is not None:
                self.publisher.namespace_deleted(_raw_name(raw))
            return
        key = _raw_key(raw, namespaced=kind.resource not in ("namespaces", "nodes"))
        obj = self._parse(kind, raw, bucket.get(key))
        if obj is not None and bucket.get(_key(obj)) != obj:
            bucket[_key(obj)] = obj
            state.dirty = True
        if kind is NAMESPACES and self.publisher is not None:
            self.publisher.namespace_changed(_raw_name(raw), not is_terminating(raw))


def _raw_name(raw: Mapping[str, Any]) -> str:
    return str((raw.get("metadata") or {}).get("name") or "")


def _raw_key(raw: Mapping[str, Any], *, namespaced: bool) -> Any:
    meta = raw.get("metadata") or {}
    name = str(meta.get("name") or "")
    return (str(meta.get("namespace") or ""), name) if namespaced else name


__all__ = [
    "AUTHORIZATION_POLICIES",
    "CLUSTER_ROLE_RULES",
    "DEFAULT_CLUSTER_ROLE_NAME",
    "DEFAULT_RESYNC_PERIOD",
    "GATEWAYS",
    "MODEL_KINDS",
    "NAMESPACES",
    "NODES",
    "PEER_AUTHENTICATIONS",
    "PODS",
    "ROOT_CERT_CONFIGMAP",
    "ROOT_CERT_CONFIGMAPS",
    "SERVICES",
    "Changed",
    "Kind",
    "KubernetesRegistry",
    "Listed",
    "RootCertSink",
    "WatchMessage",
    "WatchStats",
    "Watcher",
    "api_error",
    "classify",
    "cluster_role",
    "cluster_role_yaml",
]
