"""The CNI node agent: one per node, the only writer of capture state on it.

This module owns enrolment on a node: which pods are captured, the
redirection rules inside their network namespaces (via :mod:`cni.redirect`),
the ``ambient.istio.io/redirection`` annotation on them, and the stream of
Add/Del changes ztunnel receives over ZDS (via :mod:`cni.zds_server`).

Structure (trio): one *writer* task owns :attr:`Agent.enrolled` and applies,
one at a time, (a) CNI requests from the plugin (JSON over a unix stream
socket, :mod:`cni.wire`) and (b) registry changes (``PodSource.watch()``, one
snapshot per change, coalesced while the writer is busy). Blocking work
(``nft`` through nsenter, registry reads and writes) runs in threads.
Everything else only reads.

Behaviour:

* CNI ADD: decide (:mod:`cni.enrolment`) from a fresh registry read; capture =
  install rules, record the pod, publish a ZDS Add, annotate; reply, after
  waiting a bounded time for connected ztunnels to acknowledge. Any failure to
  capture a pod that must be captured is an error reply (the plugin then
  fails the ADD: fail closed).
* Registry changes: labelling a namespace (or removing a pod's opt-out)
  captures its running pods; removing the label un-captures them (rules
  removed, Del sent, annotation cleared); a deleted pod or netns is dropped.
  No pod restarts.
* Start-up reconciles: every pod on the node gets its rules replaced
  atomically (enrolled) or removed (not enrolled), stale annotations are
  cleared, and each ztunnel that connects gets the snapshot.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import structlog
import trio

from cni import redirect, wire
from cni.enrolment import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED, Decision, Policy
from cni.errors import AgentError, CaptureMismatch, NetnsGone, RedirectError, SourceError, WireError
from cni.source import ClusterView, PodSource, PodView, view_of
from cni.zds_server import ZdsHub, ZdsPod, ZdsSettings
from cni.zds_server import serve as serve_zds
from underpass import zds

log = structlog.get_logger("cni.agent")


class Rules(Protocol):
    """What the agent needs to capture a pod (the nft implementation, or a test double)."""

    def apply(self, netns: str) -> None: ...

    def remove(self, netns: str) -> None: ...

    def installed(self, netns: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class NftRules:
    """:mod:`cni.redirect`'s nftables table, with one configuration."""

    config: redirect.RedirectConfig = field(default_factory=redirect.RedirectConfig)

    def apply(self, netns: str) -> None:
        redirect.apply(netns, self.config)

    def remove(self, netns: str) -> None:
        redirect.remove(netns)

    def installed(self, netns: str) -> bool:
        return redirect.installed(netns, self.config)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    cni_socket: str = wire.DEFAULT_AGENT_SOCKET
    zds_socket: str = zds.DEFAULT_SOCKET
    policy: Policy = field(default_factory=Policy)
    #: How long a CNI ADD waits for connected ztunnels to acknowledge the pod.
    zds_ack_wait: float = 5.0
    #: How long the agent waits for one CNI request to arrive in full.
    request_timeout: float = 5.0
    zds: ZdsSettings = field(default_factory=ZdsSettings)
    #: Node side: SNAT the node's own TCP to captured pods (kubelet probes) to
    #: 169.254.7.127, in ``node_netns`` (None: the netns the agent runs in).
    probe_snat: bool = False
    node_netns: str | None = None
    redirect: redirect.RedirectConfig = field(default_factory=redirect.RedirectConfig)


@dataclass(slots=True)
class Enrolled:
    pod: PodView
    netns: str
    #: Whether the registry has shown this pod (a pod only known from CNI ADD is
    #: not dropped because the registry does not list it yet).
    seen: bool
    annotated: bool = False


@dataclass(slots=True)
class _CniCall:
    request: wire.AgentRequest
    reply: trio.MemorySendChannel[tuple[wire.AgentResponse, list[trio.Event]]]


class _ViewChanged:
    pass


class Agent:
    """The node agent. ``await agent.run()`` (or ``nursery.start(agent.run)``)."""

    def __init__(self, config: AgentConfig, source: PodSource, rules: Rules | None = None) -> None:
        self.config = config
        self.source = source
        self.rules: Rules = rules or NftRules(config.redirect)
        self.enrolled: dict[str, Enrolled] = {}
        self.hub = ZdsHub(self._zds_pods)
        self._commands_send, self._commands = trio.open_memory_channel[_CniCall | _ViewChanged](
            math.inf
        )
        self._latest: ClusterView | None = None
        self._view_pending = False
        #: netns paths whose rules could not be removed yet (retried on each change).
        self._cleanup: dict[str, str] = {}
        #: uid -> netns of pods whose sandbox the runtime tore down (CNI DEL): not
        #: captured again from the registry until a new ADD, even if the pod record
        #: and its netns linger.
        self._torn_down: dict[str, str] = {}
        #: The pod IPs the node-side probe SNAT table holds (None: not written yet).
        self._probe_ips: frozenset[str] | None = None

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        view = await self._initial_view()
        await self._reconcile(view, initial=True)
        await self._sync_probe_snat()
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_zds, self.config.zds_socket, self.hub, self.config.zds)
            nursery.start_soon(self._writer)
            nursery.start_soon(self._watch)
            await nursery.start(self._serve_cni)
            log.info(
                "cni agent ready",
                node=self.config.node,
                cni_socket=self.config.cni_socket,
                zds_socket=self.config.zds_socket,
                enrolled=len(self.enrolled),
            )
            task_status.started()

    async def _initial_view(self) -> ClusterView:
        delay = 0.1
        while True:
            try:
                return await self._read_view()
            except SourceError as exc:
                log.warning("registry not readable yet; retrying", error=str(exc))
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _read_view(self) -> ClusterView:
        try:
            snapshot = await trio.to_thread.run_sync(self.source.snapshot)
            return view_of(snapshot)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"cannot read the pod registry: {exc}") from exc

    async def _watch(self) -> None:
        """Feed registry snapshots to the writer, coalescing while it is busy."""
        delay = 0.1
        while True:
            try:
                async for snapshot in self.source.watch():
                    self._latest = view_of(snapshot)
                    delay = 0.1
                    if not self._view_pending:
                        self._view_pending = True
                        self._commands_send.send_nowait(_ViewChanged())
            except Exception as exc:
                log.warning("registry watch failed; restarting", error=str(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _writer(self) -> None:
        async for command in self._commands:
            if isinstance(command, _ViewChanged):
                self._view_pending = False
                if self._latest is not None:
                    try:
                        await self._reconcile(self._latest)
                    except AgentError as exc:
                        log.error("reconcile failed", error=str(exc))
                await self._sync_probe_snat()
                continue
            try:
                result = await self._handle(command.request)
            except AgentError as exc:
                log.warning(
                    "cni request failed",
                    command=command.request.command,
                    pod=command.request.pod.name,
                    error=str(exc),
                )
                result = (
                    wire.AgentResponse(False, error=str(exc), temporary=exc.temporary),
                    [],
                )
            except Exception as exc:  # a bug: answer (fail closed) and keep serving
                log.exception("cni request crashed", command=command.request.command)
                result = (wire.AgentResponse(False, error=f"agent error: {exc!r}"), [])
            await self._sync_probe_snat()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                command.reply.send_nowait(result)

    # --------------------------------------------------------------- CNI socket

    async def _serve_cni(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        path = self.config.cni_socket
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(64)
            listener = trio.SocketListener(sock)
        except BaseException:
            sock.close()
            raise
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._cni_connection, stream)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _cni_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(self.config.request_timeout):
                    data = await _read_line(stream)
                request = wire.decode_request(data)
            except (WireError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                log.warning("bad CNI request", error=str(exc) or type(exc).__name__)
                with contextlib.suppress(Exception):
                    bad = wire.AgentResponse(False, error=f"bad request: {exc}", temporary=False)
                    await stream.send_all(wire.encode_response(bad))
                return
            response, waiters = await self.submit(request)
            if waiters:
                with trio.move_on_after(self.config.zds_ack_wait) as scope:
                    for event in waiters:
                        await event.wait()
                if scope.cancelled_caught:
                    log.warning("ztunnel did not acknowledge in time", pod=request.pod.name)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(wire.encode_response(response))

    async def submit(
        self, request: wire.AgentRequest
    ) -> tuple[wire.AgentResponse, list[trio.Event]]:
        """Hand a CNI request to the writer and wait for its answer."""
        send, receive = trio.open_memory_channel[tuple[wire.AgentResponse, list[trio.Event]]](1)
        await self._commands_send.send(_CniCall(request, send))
        async with receive:
            return await receive.receive()

    # ---------------------------------------------------- writer: CNI requests

    async def _handle(
        self, request: wire.AgentRequest
    ) -> tuple[wire.AgentResponse, list[trio.Event]]:
        pod = request.pod
        if request.command == "STATUS":
            return wire.AgentResponse(True, reason="ready"), []
        if request.command == "DEL":
            return await self._cni_del(pod), []
        view = await self._read_view()  # fresh; _latest stays the watch's (monotonic)
        known = (view.pods.get(pod.uid) if pod.uid else None) or view.pod_named(
            pod.namespace, pod.name
        )
        uid = pod.uid or (known.uid if known else "")
        if not uid:
            raise SourceError(
                f"pod {pod.namespace}/{pod.name} has no uid and is not in the registry"
            )
        decision = self._decide(pod.namespace, view, known)
        if request.command == "CHECK":
            return await self._cni_check(uid, pod, decision), []
        # ADD
        log.info(
            "cni add",
            pod=f"{pod.namespace}/{pod.name}",
            uid=uid,
            enrol=decision.enrol,
            reason=decision.reason,
        )
        if not decision.enrol:
            if uid in self.enrolled:
                await self._unenrol(uid, view)
            return wire.AgentResponse(True, enrolled=False, reason=decision.reason), []
        self._torn_down.pop(uid, None)
        merged = self._merge(uid, pod, known)
        waiters = await self._enrol(merged, pod.netns or merged.netns, seen=known is not None)
        return wire.AgentResponse(True, enrolled=True, reason=decision.reason), waiters

    def _decide(self, namespace: str, view: ClusterView, pod: PodView | None) -> Decision:
        labels = view.namespaces.get(namespace)
        policy = self.config.policy
        if labels is None and not policy.never_captured(namespace):
            # Unknown namespace: the registry lags or is wrong; do not guess.
            raise SourceError(f"namespace {namespace} is not in the registry yet")
        return policy.decide(namespace, labels or {}, pod.labels if pod else None)

    @staticmethod
    def _merge(uid: str, ref: wire.PodRef, known: PodView | None) -> PodView:
        base = known or PodView(ref.namespace, ref.name, uid)
        return replace(
            base,
            uid=uid,
            netns=ref.netns or base.netns,
            ips=ref.ips or base.ips,
            container_id=ref.container_id or base.container_id,
        )

    async def _cni_check(
        self, uid: str, pod: wire.PodRef, decision: Decision
    ) -> wire.AgentResponse:
        netns = pod.netns or (self.enrolled[uid].netns if uid in self.enrolled else "")
        if decision.enrol:
            if uid not in self.enrolled:
                raise CaptureMismatch(
                    f"pod {pod.namespace}/{pod.name} should be captured but is not"
                )
            if not await trio.to_thread.run_sync(self.rules.installed, netns):
                raise CaptureMismatch(f"redirection rules missing in {netns}")
            return wire.AgentResponse(True, enrolled=True, reason=decision.reason)
        captured = bool(netns) and await trio.to_thread.run_sync(self.rules.installed, netns)
        if captured:
            raise CaptureMismatch(f"pod {pod.namespace}/{pod.name} is captured but should not be")
        return wire.AgentResponse(True, enrolled=False, reason=decision.reason)

    async def _cni_del(self, pod: wire.PodRef) -> wire.AgentResponse:
        uid = pod.uid
        if not uid:
            uid = next(
                (
                    u
                    for u, e in self.enrolled.items()
                    if e.pod.namespace == pod.namespace and e.pod.name == pod.name
                ),
                "",
            )
        if uid:
            self._torn_down[uid] = pod.netns
        if uid in self.enrolled:
            log.info("cni del", pod=f"{pod.namespace}/{pod.name}", uid=uid)
            await self._unenrol(uid, None)
        return wire.AgentResponse(True, enrolled=False, reason="deleted")

    # ------------------------------------------------------ writer: reconcile

    async def _reconcile(self, view: ClusterView, initial: bool = False) -> None:
        """Bring captures on this node in line with ``view``."""
        await self._retry_cleanup()
        desired: dict[str, PodView] = {}
        unwanted: list[PodView] = []
        for uid in list(self._torn_down):
            if uid not in view.pods or not _netns_exists(view.pods[uid].netns):
                del self._torn_down[uid]
        for pod in view.pods_on_node(self.config.node):
            if not pod.netns or not _netns_exists(pod.netns) or pod.phase == "Failed":
                continue
            if pod.uid in self._torn_down:
                continue
            decision = self._decide_quietly(pod.namespace, view, pod)
            if decision is not None and decision.enrol:
                desired[pod.uid] = pod
            elif decision is not None:
                unwanted.append(pod)
        for uid in list(self.enrolled):
            if uid in desired:
                continue
            entry = self.enrolled[uid]
            in_view = uid in view.pods
            if not in_view and not entry.seen and _netns_exists(entry.netns):
                continue  # known from CNI ADD only; the registry has not caught up
            await self._unenrol(uid, view)
        for pod in unwanted:
            if initial or pod.annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_ENABLED:
                await self._remove_rules(pod.uid, pod.netns)  # stale rules from an earlier run
                await self._annotate(pod.uid, None, view)
        for uid, pod in desired.items():
            current = self.enrolled.get(uid)
            if current is None or current.netns != pod.netns:
                try:
                    await self._enrol(pod, pod.netns, seen=True)
                except NetnsGone:
                    continue
                except RedirectError as exc:
                    log.error(
                        "cannot capture pod", pod=f"{pod.namespace}/{pod.name}", error=str(exc)
                    )
                    continue
            else:
                current.pod = replace(pod, netns=current.netns, ips=pod.ips or current.pod.ips)
                current.seen = True
                if pod.annotations.get(REDIRECTION_ANNOTATION) != REDIRECTION_ENABLED:
                    await self._annotate(uid, REDIRECTION_ENABLED, view)

    def _decide_quietly(self, namespace: str, view: ClusterView, pod: PodView) -> Decision | None:
        try:
            return self._decide(namespace, view, pod)
        except SourceError:
            return None  # namespace not known: leave the pod as it is

    # ------------------------------------------------ writer: enrol / unenrol

    async def _enrol(self, pod: PodView, netns: str, *, seen: bool) -> list[trio.Event]:
        if not netns:
            raise RedirectError(f"pod {pod.namespace}/{pod.name} has no network namespace")
        await trio.to_thread.run_sync(self.rules.apply, netns)
        self._cleanup.pop(pod.uid, None)
        previous = self.enrolled.get(pod.uid)
        self.enrolled[pod.uid] = Enrolled(
            replace(pod, netns=netns), netns, seen or bool(previous and previous.seen)
        )
        waiters: list[trio.Event] = []
        if previous is None or previous.netns != netns:
            # No await between recording and publishing: a ztunnel that subscribes
            # sees the pod either in its snapshot or as this Add, never both or neither.
            waiters = self.hub.publish(pod.uid, self._zds_pod(self.enrolled[pod.uid]))
            log.info("pod captured", pod=f"{pod.namespace}/{pod.name}", uid=pod.uid, netns=netns)
        if pod.annotations.get(REDIRECTION_ANNOTATION) != REDIRECTION_ENABLED or not seen:
            await self._annotate(pod.uid, REDIRECTION_ENABLED, None)
        return waiters

    async def _unenrol(self, uid: str, view: ClusterView | None) -> None:
        entry = self.enrolled.pop(uid)
        await self._remove_rules(uid, entry.netns)
        self.hub.publish(uid, None)
        log.info("pod released", pod=f"{entry.pod.namespace}/{entry.pod.name}", uid=uid)
        await self._annotate(uid, None, view)

    async def _remove_rules(self, uid: str, netns: str) -> None:
        if not netns or not _netns_exists(netns):
            self._cleanup.pop(uid, None)
            return
        try:
            await trio.to_thread.run_sync(self.rules.remove, netns)
            self._cleanup.pop(uid, None)
        except NetnsGone:
            self._cleanup.pop(uid, None)
        except RedirectError as exc:
            log.error("cannot remove redirection rules; will retry", netns=netns, error=str(exc))
            self._cleanup[uid] = netns

    async def _retry_cleanup(self) -> None:
        for uid, netns in list(self._cleanup.items()):
            if uid not in self.enrolled:
                await self._remove_rules(uid, netns)

    async def _annotate(self, uid: str, value: str | None, view: ClusterView | None) -> None:
        """Record (or clear) the redirection annotation; failures are logged, not fatal
        (the pod's capture does not depend on it; the next reconcile retries)."""
        if view is not None:
            pod = view.pods.get(uid)
            if pod is None or pod.annotations.get(REDIRECTION_ANNOTATION) == value:
                return
        try:
            result = await trio.to_thread.run_sync(
                self.source.set_pod_annotations, uid, {REDIRECTION_ANNOTATION: value}
            )
            if inspect.isawaitable(result):
                await result
            if uid in self.enrolled:
                self.enrolled[uid].annotated = value == REDIRECTION_ENABLED
        except Exception as exc:
            log.info("annotation not recorded", uid=uid, value=value, error=str(exc))

    async def _sync_probe_snat(self) -> None:
        """Keep the node-side probe SNAT set equal to the captured pods' IPs."""
        if not self.config.probe_snat:
            return
        ips = frozenset(ip for e in self.enrolled.values() for ip in e.pod.ips)
        if ips == self._probe_ips:
            return
        try:
            await trio.to_thread.run_sync(
                redirect.apply_node, self.config.node_netns, ips, self.config.redirect
            )
            self._probe_ips = ips
        except RedirectError as exc:
            log.error("cannot update the node probe SNAT", error=str(exc))

    # ----------------------------------------------------------------- readers

    def _zds_pods(self) -> list[ZdsPod]:
        return [self._zds_pod(e) for e in self.enrolled.values()]

    @staticmethod
    def _zds_pod(entry: Enrolled) -> ZdsPod:
        pod = entry.pod
        return ZdsPod(
            pod.uid, zds.WorkloadInfo(pod.name, pod.namespace, pod.service_account), entry.netns
        )


def _netns_exists(path: str) -> bool:
    """A stat of an nsfs bind mount: instant, fine on the event loop."""
    return os.path.exists(path)


async def _read_line(stream: trio.SocketStream) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > wire.MAX_MESSAGE:
            raise WireError(f"request over {wire.MAX_MESSAGE} bytes")
    return bytes(buf)


def lab_source(state_dir: str) -> PodSource:
    """The lab registry as a pod source (fails loudly when the lab is not there)."""
    from cni.source import open_lab_registry

    return open_lab_registry(state_dir)
