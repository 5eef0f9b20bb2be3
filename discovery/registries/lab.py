"""The lab as a discovery registry: lab state (+ a policy directory) -> the model.

:class:`LabModelRegistry` implements :class:`discovery.registry.Registry` over
:class:`underpass.lab.registry.LabRegistry`. It runs one trio loop on its own
thread (``start``/``stop`` from any thread) with three tasks:

- the lab watcher: :meth:`LabRegistry.watch` (inotify on the lab's
  ``generation`` file) yields a whole consistent snapshot after each change;
- the policy watcher: reads the policy directory (below) and reads it again
  whenever inotify reports a change in it;
- the writer, the one owner of state: it keeps the latest of each, builds the
  :class:`~discovery.model.Model` (:func:`model_from_lab`), updates the CA's
  :class:`~discovery.registries.nodeindex.ModelNodeIndex` and calls the sink.
  Changes that arrive while it works are coalesced; an unchanged model is not
  delivered again. The first model goes out once both sources were read.

Mapping: lab namespaces, nodes (labels), pods (IP, node, service account,
labels, annotations, phase; ready when Running; uid) and services (VIP,
ports, selector; an empty selector selects nothing; the lab's hostname).

The policy directory
    The lab has no API for policies, so they live in files, in the Kubernetes
    YAML that ``kubectl apply`` takes: ``security.istio.io/v1``
    ``AuthorizationPolicy`` and ``PeerAuthentication``, and
    ``gateway.networking.k8s.io/v1`` ``Gateway`` (waypoints). By default the
    directory is ``<lab state dir>/policies`` (:data:`POLICY_DIR_NAME`, so it
    goes away with ``underpass lab down`` like the rest of the lab); another
    directory, or a single file, can be given. Every ``*.yaml``, ``*.yml`` or
    ``*.json`` file in it is read (hidden files are not: write a file under a
    hidden name and rename it into place to apply it atomically); a file may
    hold several documents and ``kind: List``. Each object needs
    ``metadata.namespace`` (no implicit ``default``). Adding, editing or
    removing a file takes effect at once (inotify). A file that cannot be
    read or parsed is reported (``discovery.lab_policy_file_invalid``) and,
    like an object the API server rejects, changes nothing: the objects it
    held last time it was valid stay in force until it is fixed or removed.

If the lab goes away (``underpass lab down``) the last model stays served and
the watchers retry with backoff until a lab is back at the same place.
"""

from __future__ import annotations

import contextlib
import errno
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import trio
import yaml

from discovery.errors import ModelError
from discovery.model import (
    AuthorizationPolicy,
    Gateway,
    Model,
    ModelObject,
    Namespace,
    Node,
    PeerAuthentication,
    Pod,
    PodPhase,
    Service,
    ServicePort,
)
from discovery.registries.errors import RegistryConfigError
from discovery.registries.nodeindex import ModelNodeIndex
from discovery.registries.objects import parse_object
from discovery.registries.retry import Backoff
from discovery.registry import ModelSink
from underpass import inotify
from underpass.lab.registry import LabRegistry, LabStateError, Snapshot

_log = structlog.get_logger("discovery.registries.lab")

#: The policy directory's name inside the lab state directory (the default place).
POLICY_DIR_NAME: Final = "policies"
POLICY_SUFFIXES: Final = (".yaml", ".yml", ".json")
#: The kinds a policy file may hold.
POLICY_KINDS: Final = ("AuthorizationPolicy", "PeerAuthentication", "Gateway")
MAX_POLICY_FILE_BYTES: Final = 1 << 20
STOP_TIMEOUT: Final = 10.0

_PolicyObject = AuthorizationPolicy | PeerAuthentication | Gateway
_LAB_PHASES: Final[dict[str, PodPhase]] = {
    "Pending": "Pending",
    "Running": "Running",
    "Failed": "Failed",
}


# -- the mapping (pure) ------------------------------------------------------------------


def model_from_lab(snapshot: Snapshot, policies: Iterable[ModelObject] = ()) -> Model:
    """The model of a lab snapshot plus policy objects."""
    pods = []
    for p in snapshot.pods.values():
        pods.append(
            Pod(
                namespace=p.namespace,
                name=p.name,
                node=p.node,
                ips=(p.ip,) if p.ip else (),
                service_account=p.service_account,
                labels=p.labels,
                annotations=p.annotations,
                phase=_LAB_PHASES.get(p.phase, "Unknown"),
                ready=p.phase == "Running",
                uid=p.uid,
            )
        )
    services = [
        Service(
            namespace=s.namespace,
            name=s.name,
            vips=(s.vip,) if s.vip else (),
            ports=tuple(
                ServicePort(
                    port=sp.port, target_port=sp.target_port, protocol=sp.protocol, name=sp.name
                )
                for sp in s.ports
            ),
            selector=dict(s.selector) or None,
            hostname=s.hostname,
        )
        for s in snapshot.services.values()
    ]
    by_kind: dict[type, list[Any]] = {AuthorizationPolicy: [], PeerAuthentication: [], Gateway: []}
    for obj in policies:
        by_kind[type(obj)].append(obj)
    return Model.of(
        namespaces=[Namespace(n.name, n.labels) for n in snapshot.namespaces.values()],
        nodes=[Node(n.name, n.labels) for n in snapshot.nodes.values()],
        pods=pods,
        services=services,
        gateways=by_kind[Gateway],
        authorization_policies=by_kind[AuthorizationPolicy],
        peer_authentications=by_kind[PeerAuthentication],
    )


# -- the policy directory ------------------------------------------------------------------


def parse_policy_documents(docs: Iterable[Any], source: str) -> list[_PolicyObject]:
    """The policy objects of a file's YAML documents; :class:`ModelError` names the bad one."""
    out: list[_PolicyObject] = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        items = [doc]
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ModelError(f"{source}, document {i}: a List's items must be a list")
        for item in items:
            problems: list[str] = []
            try:
                obj = parse_object(item, problems, kinds=POLICY_KINDS)
            except ModelError as exc:
                raise ModelError(f"{source}, document {i}: {exc}") from None
            assert isinstance(obj, AuthorizationPolicy | PeerAuthentication | Gateway)
            for problem in problems:
                _log.warning(
                    "discovery.lab_policy_problem",
                    file=source,
                    object=f"{type(obj).__name__} {obj.namespace}/{obj.name}",
                    problem=problem,
                )
            out.append(obj)
    return out


class PolicyDirectory:
    """Reads the policy files; remembers each file's last valid objects (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._good: dict[Path, tuple[bytes, list[_PolicyObject]]] = {}
        self._reported: dict[Path, str] = {}

    def files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(
                p
                for p in self.path.iterdir()
                if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
        return [self.path] if self.path.is_file() else []

    def read(self) -> list[_PolicyObject]:
        """Every policy object now in force (later files win over earlier ones on a clash)."""
        files = self.files()
        for gone in set(self._good) - set(files):
            del self._good[gone]
            self._reported.pop(gone, None)
        merged: dict[tuple[type, str, str], tuple[Path, _PolicyObject]] = {}
        for path in files:
            for obj in self._read_file(path):
                key = (type(obj), obj.namespace, obj.name)
                if key in merged:
                    _log.warning(
                        "discovery.lab_policy_duplicate",
                        object=f"{type(obj).__name__} {obj.namespace}/{obj.name}",
                        used=str(path),
                        ignored=str(merged[key][0]),
                    )
                merged[key] = (path, obj)
        return [obj for _, obj in merged.values()]

    def _read_file(self, path: Path) -> list[_PolicyObject]:
        try:
            with path.open("rb") as f:
                data = f.read(MAX_POLICY_FILE_BYTES + 1)
            if len(data) > MAX_POLICY_FILE_BYTES:
                raise ModelError(f"larger than {MAX_POLICY_FILE_BYTES} bytes")
            good = self._good.get(path)
            if good is not None and good[0] == data:
                return good[1]
            try:
                docs = list(yaml.safe_load_all(data))
            except yaml.YAMLError as exc:
                raise ModelError(f"not valid YAML: {exc}") from None
            objects = parse_policy_documents(docs, str(path))
        except FileNotFoundError:
            self._good.pop(path, None)
            return []
        except (OSError, ModelError) as exc:
            problem = str(exc) if isinstance(exc, ModelError) else (exc.strerror or str(exc))
            if self._reported.get(path) != problem:
                self._reported[path] = problem
                kept = len(self._good[path][1]) if path in self._good else 0
                _log.error(
                    "discovery.lab_policy_file_invalid",
                    file=str(path),
                    problem=problem,
                    kept_objects=kept,
                    fix="correct or remove the file; its last valid objects stay in force",
                )
            return self._good[path][1] if path in self._good else []
        if path in self._reported:
            del self._reported[path]
            _log.info("discovery.lab_policy_file_fixed", file=str(path))
        self._good[path] = (data, objects)
        return objects


# -- the registry --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LabChanged:
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class _PoliciesChanged:
    objects: tuple[_PolicyObject, ...]


_Message = _LabChanged | _PoliciesChanged

_PARENT_EVENTS: Final = (
    inotify.IN_CREATE
    | inotify.IN_MOVED_TO
    | inotify.IN_MOVED_FROM
    | inotify.IN_DELETE
    | inotify.IN_CLOSE_WRITE
    | inotify.IN_DELETE_SELF
    | inotify.IN_MOVE_SELF
    | inotify.IN_ONLYDIR
)
_DIR_EVENTS: Final = (
    inotify.IN_CREATE
    | inotify.IN_MOVED_TO
    | inotify.IN_MOVED_FROM
    | inotify.IN_DELETE
    | inotify.IN_CLOSE_WRITE
    | inotify.IN_ONLYDIR
)
_GONE: Final = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_IGNORED


class _WatchedPathGone(Exception):
    pass


class LabModelRegistry:
    """The lab as a :class:`~discovery.registry.Registry` (see the module docstring)."""

    def __init__(
        self,
        lab: LabRegistry | Path,
        *,
        policies: Path | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.lab = lab if isinstance(lab, LabRegistry) else LabRegistry(Path(lab))
        self.policy_path = (
            Path(policies) if policies is not None else self.lab.state_dir / POLICY_DIR_NAME
        )
        self.node_index = ModelNodeIndex()
        self._backoff = backoff or Backoff()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._running = threading.Event()
        self._stopping = False
        self._model: Model | None = None

    @property
    def model(self) -> Model | None:
        """The last model delivered (None before the first)."""
        return self._model

    # -- Registry -------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse to start without a lab (:class:`RegistryConfigError` says what to do)."""
        if not self.lab.exists():
            raise RegistryConfigError(
                f"no lab state at {self.lab.state_dir}: run `underpass lab up` first, or "
                "give the lab's state directory (--lab-state-dir)"
            )
        if not self.policy_path.parent.is_dir():
            raise RegistryConfigError(
                f"the policy path {self.policy_path} is in a directory that does not exist; "
                "create it or give another --lab-policies"
            )

    def start(self, sink: ModelSink) -> None:
        """Check the lab is there, then watch it on a thread; the first model follows."""
        if self._thread is not None:
            raise RuntimeError("the lab registry is already started")
        self.check()
        self._stopping = False
        self._running.clear()
        self._thread = threading.Thread(
            target=self._run, args=(sink,), name="lab-registry", daemon=True
        )
        self._thread.start()
        _log.info(
            "discovery.lab_registry_started",
            state_dir=str(self.lab.state_dir),
            policies=str(self.policy_path),
        )

    def stop(self) -> None:
        """Stop watching and wait for the thread (idempotent)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._running.wait(STOP_TIMEOUT)
        token, scope = self._token, self._scope
        if token is not None and scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("the lab registry's thread did not stop")
        self._thread = self._token = self._scope = None

    # -- the trio side ----------------------------------------------------------------------

    def _run(self, sink: ModelSink) -> None:
        try:
            trio.run(self._main, sink)
        except BaseException:
            _log.exception("discovery.lab_registry_crashed")
            raise
        finally:
            self._running.set()

    async def _main(self, sink: ModelSink) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            self._token = trio.lowlevel.current_trio_token()
            self._running.set()
            if self._stopping:
                return
            send, receive = trio.open_memory_channel[_Message](math.inf)
            async with trio.open_nursery() as nursery, send:
                nursery.start_soon(self._watch_lab, send.clone())
                nursery.start_soon(self._watch_policies, send.clone())
                nursery.start_soon(self._writer, receive, sink)

    async def _writer(self, receive: trio.MemoryReceiveChannel[_Message], sink: ModelSink) -> None:
        snapshot: Snapshot | None = None
        policies: tuple[_PolicyObject, ...] | None = None
        async with receive:
            async for message in receive:
                while True:  # coalesce whatever else is already queued
                    if isinstance(message, _LabChanged):
                        snapshot = message.snapshot
                    else:
                        policies = message.objects
                    try:
                        message = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                if snapshot is None or policies is None:
                    continue  # not both read yet: no partial first model
                model = model_from_lab(snapshot, policies)
                if model == self._model:
                    continue
                self.node_index.update(model)
                self._model = model
                _log.debug(
                    "discovery.lab_model",
                    generation=snapshot.generation,
                    pods=len(model.pods),
                    services=len(model.services),
                    policies=len(policies),
                )
                try:
                    sink(model)
                except Exception:  # the sink's problem; keep watching
                    _log.exception("discovery.lab_sink_failed")

    async def _watch_lab(self, send: trio.MemorySendChannel[_Message]) -> None:
        backoff = Backoff(self._backoff.initial, self._backoff.maximum)
        async with send:
            while True:
                try:
                    async with contextlib.aclosing(self.lab.watch()) as snapshots:
                        async for snap in snapshots:
                            backoff.reset()
                            await send.send(_LabChanged(snap))
                except (LabStateError, OSError) as exc:
                    delay = backoff.next_delay()
                    _log.error(
                        "discovery.lab_unavailable",
                        state_dir=str(self.lab.state_dir),
                        problem=str(exc),
                        retry_in=round(delay, 2),
                        effect="the last model stays served",
                    )
                    await trio.sleep(delay)

    async def _watch_policies(self, send: trio.MemorySendChannel[_Message]) -> None:
        backoff = Backoff(self._backoff.initial, self._backoff.maximum)
        directory = PolicyDirectory(self.policy_path)
        async with send:
            while True:
                try:
                    await self._follow_policies(directory, send, backoff)
                except (OSError, _WatchedPathGone) as exc:
                    delay = backoff.next_delay()
                    _log.error(
                        "discovery.lab_policies_unavailable",
                        path=str(self.policy_path),
                        problem=str(exc) or "its directory went away",
                        retry_in=round(delay, 2),
                    )
                    await trio.sleep(delay)

    async def _follow_policies(
        self,
        directory: PolicyDirectory,
        send: trio.MemorySendChannel[_Message],
        backoff: Backoff,
    ) -> None:
        path = self.policy_path
        with inotify.Inotify() as ino:
            parent_wd = ino.add_watch(path.parent, _PARENT_EVENTS)
            dir_wd: int | None = None
            while True:
                if dir_wd is None and path.is_dir():
                    try:
                        dir_wd = ino.add_watch(path, _DIR_EVENTS)
                    except OSError as exc:
                        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                            raise
                await send.send(_PoliciesChanged(tuple(directory.read())))
                backoff.reset()
                while True:
                    events = await ino.read_events()
                    if any(e.wd == parent_wd and e.mask & _GONE for e in events):
                        raise _WatchedPathGone
                    relevant = False
                    for event in events:
                        if event.mask & inotify.IN_Q_OVERFLOW or (
                            event.wd == parent_wd and event.name == path.name
                        ):
                            relevant = True
                        elif dir_wd is not None and event.wd == dir_wd:
                            relevant = True
                            if event.mask & inotify.IN_IGNORED:
                                dir_wd = None  # the directory itself went away
                    if relevant:
                        break

    # -- for tests and readiness ----------------------------------------------------------

    def __enter__(self) -> LabModelRegistry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


__all__ = [
    "MAX_POLICY_FILE_BYTES",
    "POLICY_DIR_NAME",
    "POLICY_KINDS",
    "LabModelRegistry",
    "PolicyDirectory",
    "model_from_lab",
    "parse_policy_documents",
]
