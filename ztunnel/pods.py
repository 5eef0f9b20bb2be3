"""The pods ztunnel serves: the ZDS conversation with the node agent, and a proxy per pod.

:class:`PodManager` connects to the node agent's ZDS socket (PROTOCOLS.md
section 5), retrying with backoff for as long as ztunnel runs: the pods it
already serves keep being served while the agent is away or restarts.

- ``Add`` (with the pod's netns fd): open the three listeners inside the pod,
  start a :class:`~ztunnel.pod.PodProxy`, prefetch the pod's certificate.
  The same pod added again in the same netns (the agent's retry, or the
  snapshot after a reconnect) is a no-op; in a new netns (the pod's sandbox
  was recreated) the old proxy is drained and replaced.
- ``Keep``: still served; during a snapshot only.
- ``SnapshotSent``: pods that were not in the snapshot are drained; from now
  on ztunnel counts as having processed the snapshot (readiness).
- ``Del``: the pod's proxy drains in the background (graceful, then forced
  at the deadline) and its certificate is released once it is gone; the Ack
  does not wait for the drain.

Every request is answered with an Ack; a failure (netns gone, a port taken,
no workload info) is an Ack carrying the error, which the agent retries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog
import trio

from underpass.zds import Add, Del, Keep, SnapshotSent, ZdsClient, ZdsError
from ztunnel.inpod import InpodError, PodNetns
from ztunnel.pod import PodProxy, Shared

log = structlog.get_logger("ztunnel.pods")

#: Backoff between ZDS connection attempts (the agent may be restarting).
ZDS_RETRY_INITIAL: Final = 0.1
ZDS_RETRY_MAX: Final = 5.0


@dataclass(frozen=True, slots=True)
class PodSummary:
    uid: str
    name: str
    namespace: str
    service_account: str
    identity: str
    netns_inode: int


class PodManager:
    """Owns every :class:`PodProxy` of the node (see the module docstring)."""

    def __init__(
        self,
        shared: Shared,
        zds_socket: str,
        *,
        supervisor: trio.socket.SocketType | None = None,
        on_supervisor_gone: Callable[[], None] | None = None,
    ) -> None:
        self._shared = shared
        self._zds_socket = zds_socket
        # A per-service-account worker talks ZDS to its supervisor over an
        # inherited socket, once: when the supervisor goes, so does the worker.
        self._supervisor = supervisor
        self._on_supervisor_gone = on_supervisor_gone
        self._pods: dict[str, PodProxy] = {}
        self._nursery: trio.Nursery | None = None
        self._client: ZdsClient | None = None
        self.snapshot_processed = False
        self.snapshot_event = trio.Event()  # set once the first snapshot is processed
        self.zds_connected = False
        self._draining: set[PodProxy] = set()
        self._zds_scope = trio.CancelScope()

    def pods(self) -> list[PodSummary]:
        return [
            PodSummary(
                uid,
                p.info.name,
                p.info.namespace,
                p.info.service_account,
                p.identity.uri,
                p.netns.inode,
            )
            for uid, p in sorted(self._pods.items())
        ]

    def pod(self, uid: str) -> PodProxy | None:
        return self._pods.get(uid)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Talk ZDS until cancelled; pods are served in this task's nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            with self._zds_scope:
                await self._zds_forever()
            await trio.sleep_forever()  # pods go on until shutdown() or cancellation

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop talking ZDS, then every pod (drained concurrently, within ``drain_timeout``)."""
        self._zds_scope.cancel()
        pods, self._pods = list(self._pods.values()), {}
        async with trio.open_nursery() as nursery:
            for proxy in [*pods, *self._draining]:
                nursery.start_soon(self._retire, proxy, drain_timeout)

    # -- ZDS -----------------------------------------------------------------------------

    async def _zds_forever(self) -> None:
        if self._supervisor is not None:
            client = await ZdsClient.adopt(self._supervisor)
            self.zds_connected = True
            try:
                await self._converse(client)
            except (ZdsError, OSError) as exc:
                log.error("ZDS with the supervisor failed", error=str(exc))
            finally:
                self.zds_connected = False
                client.close()
            log.info("the supervisor closed the ZDS connection; stopping")
            if self._on_supervisor_gone is not None:
                self._on_supervisor_gone()
            return
        delay = ZDS_RETRY_INITIAL
        while True:
            try:
                client = await ZdsClient.connect(self._zds_socket)
            except OSError as exc:
                log.info(
                    "waiting for the node agent",
                    socket=self._zds_socket,
                    error=exc.strerror or str(exc),
                    retry_in_s=round(delay, 2),
                )
                await trio.sleep(delay)
                delay = min(delay * 2, ZDS_RETRY_MAX)
                continue
            delay = ZDS_RETRY_INITIAL
            self._client = client
            self.zds_connected = True
            log.info("connected to the node agent", socket=self._zds_socket)
            try:
                await self._converse(client)
                log.warning("the node agent closed the ZDS connection; reconnecting")
            except trio.ClosedResourceError:
                return  # shutdown() closed the socket: stop talking ZDS, never reconnect
            except ZdsError as exc:
                log.error("ZDS protocol error; reconnecting", error=str(exc))
            except OSError as exc:
                log.warning("ZDS connection failed; reconnecting", error=str(exc))
            finally:
                self.zds_connected = False
                self._client = None
                client.close()
            await trio.sleep(delay)

    async def _converse(self, client: ZdsClient) -> None:
        in_snapshot: set[str] | None = set()
        while (received := await client.receive()) is not None:
            request = received.request
            error = ""
            if isinstance(request, Add):
                assert received.fd is not None  # the protocol checked it
                error = await self._add(request, received.fd)
                if in_snapshot is not None and not error:
                    in_snapshot.add(request.uid)
            elif isinstance(request, Keep):
                if request.uid in self._pods:
                    if in_snapshot is not None:
                        in_snapshot.add(request.uid)
                else:
                    # The agent sends Keep when it can no longer open the pod's netns
                    # (the pod is going away). A ztunnel that never served it has
                    # nothing to keep; an error would only make the agent retry.
                    log.warning("Keep for a pod this ztunnel does not serve", uid=request.uid)
            elif isinstance(request, SnapshotSent):
                assert in_snapshot is not None
                for uid in [u for u in self._pods if u not in in_snapshot]:
                    log.info("pod not in the agent's snapshot; removing", uid=uid)
                    self._remove(uid)
                in_snapshot = None
                self.snapshot_processed = True
                self.snapshot_event.set()
                log.info("ZDS snapshot processed", pods=len(self._pods))
            elif isinstance(request, Del):
                self._remove(request.uid)
            if error:
                log.warning("ZDS request failed", request=type(request).__name__, error=error)
            await client.ack(error)

    # -- pods ----------------------------------------------------------------------------

    async def _add(self, request: Add, fd: int) -> str:
        if request.info is None:
            with contextlib.suppress(OSError):
                PodNetns(fd).close()
            return f"Add for pod {request.uid} carries no workload info (name, namespace, SA)"
        try:
            pod_netns = PodNetns(fd)
        except InpodError as exc:
            return str(exc)
        existing = self._pods.get(request.uid)
        if existing is not None:
            if existing.netns.inode == pod_netns.inode:
                pod_netns.close()
                return ""
            log.info("pod re-added with a new netns; replacing its proxy", uid=request.uid)
            self._remove(request.uid)
        try:
            listeners = await trio.to_thread.run_sync(pod_netns.open_listeners)
        except InpodError as exc:
            pod_netns.close()
            return str(exc)
        proxy = PodProxy(request.uid, request.info, pod_netns, listeners, self._shared)
        self._shared.identities.retain(proxy.identity)
        assert self._nursery is not None
        try:
            await self._nursery.start(self._serve, proxy)
        except Exception as exc:  # the proxy could not start: report, free everything
            self._shared.identities.release(proxy.identity)
            return f"cannot serve pod {request.info.namespace}/{request.info.name}: {exc}"
        self._pods[request.uid] = proxy
        self._shared.metrics.set_pods(len(self._pods))
        log.info(
            "pod added",
            uid=request.uid,
            pod=f"{request.info.namespace}/{request.info.name}",
            identity=proxy.identity.uri,
        )
        return ""

    async def _serve(
        self, proxy: PodProxy, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await proxy.run(task_status=task_status)
        except Exception:
            # One pod's failure must not take the node's other pods down.
            log.exception("pod proxy failed", uid=proxy.uid)

    def _remove(self, uid: str) -> None:
        proxy = self._pods.pop(uid, None)
        if proxy is None:
            return
        self._shared.metrics.set_pods(len(self._pods))
        assert self._nursery is not None
        self._nursery.start_soon(self._retire, proxy, None)

    async def _retire(self, proxy: PodProxy, drain_timeout: float | None) -> None:
        self._draining.add(proxy)
        try:
            await proxy.stop(drain_timeout)
        finally:
            self._draining.discard(proxy)
            self._shared.identities.release(proxy.identity)
            log.info("pod removed", uid=proxy.uid, pod=f"{proxy.info.namespace}/{proxy.info.name}")


__all__ = ["PodManager", "PodSummary"]
