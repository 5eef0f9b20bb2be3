"""The ztunnel process: one per node, wiring state, identities, pods, telemetry and admin.

:func:`run_ztunnel` is ``underpass ztunnel``. In one trio nursery it runs:

- the state source, the store's one writer: the control plane over Delta ADS
  (:class:`~ztunnel.xds_source.XdsSource`) or a local file
  (:class:`~ztunnel.local_config.LocalConfigSource`);
- the certificate manager, signing through the CA with impersonation, behind
  :class:`~ztunnel.identities.NodeIdentities` (the data path's only handle);
- the pods (:class:`~ztunnel.pods.PodManager`): ZDS with the node agent and a
  proxy per pod;
- the connection tracker and a task that re-checks open connections against
  each new state (a policy change applies to existing connections);
- the admin (127.0.0.1:15000), metrics (15020) and readiness (15021) servers.

It is ready (``/healthz/ready``) once it has configuration and has processed
the agent's ZDS snapshot. SIGTERM (or ``/quitquitquit``) drains every pod,
gracefully then forced at the drain deadline, and exits; a restarted ztunnel
binds the same in-pod ports beside the old one (SO_REUSEPORT) before the old
one goes.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from identity.certmanager import CertificateManager, CertificateSigner
from identity.spiffe import SpiffeId
from underpass.zds import WorkloadInfo
from ztunnel import dump
from ztunnel.admin import serve_admin, serve_metrics, serve_readiness
from ztunnel.ca_signer import GrpcLiteCaSigner
from ztunnel.connections import ConnectionTracker
from ztunnel.dedicated import DedicatedPod
from ztunnel.identities import NodeIdentities
from ztunnel.isolation import IsolatingPodManager, SupervisorSigner, XdsRelay, worker_command
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.pod import ProxySettings, Shared
from ztunnel.pods import PodManager
from ztunnel.state.store import StateStore
from ztunnel.xds_source import XdsSource, XdsTls, ZtunnelNode
from ztunnel.zygote import Zygote

if TYPE_CHECKING:
    from ztunnel.local_config import LocalConfigSource

log = structlog.get_logger("ztunnel")


@dataclass(frozen=True)
class CaSettings:
    """How to reach the CA: ``address`` (host:port), its root (PEM) and our token."""

    address: str
    root_pem: bytes
    token: Callable[[], str]
    server_name: str | None = None


@dataclass(frozen=True)
class XdsSettings:
    address: str
    root_pem: bytes | None  # None: plaintext (15010)
    token: Callable[[], str] | None = None
    server_name: str | None = None
    pod_name: str = "ztunnel"
    pod_namespace: str = "istio-system"
    pod_ip: str = "127.0.0.1"


@dataclass(frozen=True)
class ZtunnelConfig:
    """Everything ``underpass ztunnel`` is told on its command line."""

    proxy: ProxySettings
    zds_socket: str = "/var/run/ztunnel/ztunnel.sock"
    local_config: Path | None = None
    xds: XdsSettings | None = None
    ca: CaSettings | None = None
    #: None: that endpoint is off (a per-service-account worker serves none).
    admin_address: tuple[str, int] | None = ("127.0.0.1", 15000)
    metrics_address: tuple[str, int] | None = ("0.0.0.0", 15020)  # noqa: S104 (Prometheus scrapes from off the node)
    readiness_address: tuple[str, int] | None = ("0.0.0.0", 15021)  # noqa: S104 (kubelet probes from the node)
    #: For tests: sign locally instead of through ``ca``.
    signer: CertificateSigner | None = field(default=None, compare=False)
    #: Mode 3 (``--isolation service-account``): the supervisor starts a worker per
    #: service account with this command line (plus state and worker options).
    isolation: str = "shared"
    worker_base_argv: tuple[str, ...] = ()
    #: A mode-3 worker: its identity and the sockets inherited from its supervisor.
    worker: WorkerSettings | None = None
    #: Mode 3's supervisor: where workers are forked from (None: a new interpreter each).
    zygote: Zygote | None = None
    #: Mode 1 (our own sidecar) / mode 4's waypoint stand-in: serve the pod this
    #: process runs in, with that pod's own token.
    dedicated: WorkloadInfo | None = None


@dataclass(frozen=True)
class WorkerSettings:
    identity: SpiffeId
    zds_fd: int
    signer_fd: int


@dataclass(frozen=True)
class Bound:
    """What a started ztunnel listens on (ports resolved when 0 was asked; None: off)."""

    admin: tuple[str, int] | None
    metrics: tuple[str, int] | None
    readiness: tuple[str, int] | None


class Ztunnel:
    """The running process's parts, for the admin endpoints and for tests."""

    def __init__(self, config: ZtunnelConfig) -> None:
        if (config.xds is None) == (config.local_config is None):
            raise ValueError("ztunnel needs exactly one state source: xDS or --local-config")
        if config.ca is None and config.signer is None and config.worker is None:
            raise ValueError("ztunnel needs a CA to get its pods' certificates (--ca-address)")
        if config.isolation not in ("shared", "service-account"):
            raise ValueError(f"unknown isolation {config.isolation!r}: shared or service-account")
        self.config = config
        self.store = StateStore()
        self.metrics = ZtunnelMetrics()
        self.tracker = ConnectionTracker(self.metrics)
        self.xds: XdsSource | None = None
        self.local: LocalConfigSource | None = None
        self.pods: PodManager | None = None
        self.identities: NodeIdentities | None = None
        self._shutdown = trio.Event()
        self._started = trio.Event()
        self.bound: Bound | None = None

    @property
    def mode(self) -> str:
        config = self.config
        if config.dedicated is not None:
            return "waypoint-stand-in" if config.proxy.waypoint_stand_in else "dedicated"
        if config.worker is not None:
            return f"worker for {config.worker.identity.uri}"
        return "shared" if config.isolation == "shared" else "supervisor (per service account)"

    # -- admin provider ------------------------------------------------------------------

    def config_dump(self) -> dict[str, Any]:
        snapshot = self.store.snapshot
        certificates: list[dict[str, Any]] = []
        if self.identities is not None:
            manager = self.identities.manager
            for status in manager.identities():
                certificates.append(dump.certificate_json(status, manager.current(status.identity)))
        result = dump.config_dump(snapshot, certificates)
        result["node"] = self.config.proxy.node
        result["mode"] = self.mode
        if isinstance(self.pods, IsolatingPodManager):
            result["workers"] = self.pods.workers()
            result["zygote"] = self.pods.zygote_pid
        result["pods"] = [
            {
                "uid": p.uid,
                "name": p.name,
                "namespace": p.namespace,
                "service_account": p.service_account,
                "identity": p.identity,
            }
            for p in (self.pods.pods() if self.pods is not None else [])
        ]
        if self.xds is not None:
            result["xds"] = self.xds.status()
        if self.local is not None:
            result["local_config"] = {
                "path": str(self.local.path),
                "last_error": str(self.local.last_error) if self.local.last_error else None,
            }
        return result

    def connections(self) -> list[dict[str, Any]]:
        return self.tracker.as_json()

    def unmet_readiness(self) -> list[str]:
        unmet = []
        if not self.store.ready:
            source = "the control plane" if self.xds is not None else "the local config file"
            unmet.append(f"no configuration yet: waiting for {source}")
        if self.pods is None or not self.pods.snapshot_processed:
            unmet.append(
                f"ZDS snapshot not processed yet: waiting for the node agent at "
                f"{self.config.zds_socket}"
            )
        return unmet

    def shutdown(self) -> None:
        self._shutdown.set()

    async def wait_ready(self) -> None:
        """Until ``/healthz/ready`` would answer 200: state and the ZDS snapshot are in."""
        await self._started.wait()
        assert self.pods is not None
        await self.store.wait_ready()
        await self.pods.snapshot_event.wait()

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        signer: CertificateSigner
        if config.worker is not None:
            channel = socket.socket(fileno=config.worker.signer_fd)
            signer = SupervisorSigner(trio.socket.from_stdlib_socket(channel))
        else:
            signer = config.signer or _ca_signer(config, impersonate=config.dedicated is None)
        relay: XdsRelay | None = None
        async with CertificateManager.open(signer) as manager:
            self.identities = NodeIdentities(manager)
            self.metrics.set_certificate_source(manager.identities)
            shared = Shared(
                settings=config.proxy,
                store=self.store,
                identities=self.identities,
                tracker=self.tracker,
                metrics=self.metrics,
            )
            if config.dedicated is not None:
                self.pods = DedicatedPod(shared, config.dedicated)
            elif config.worker is not None:
                supervisor = socket.socket(fileno=config.worker.zds_fd)
                self.pods = PodManager(
                    shared,
                    "",
                    supervisor=trio.socket.from_stdlib_socket(supervisor),
                    on_supervisor_gone=self.shutdown,
                )
            elif config.isolation == "service-account":
                argv = list(config.worker_base_argv)
                if config.local_config is not None:
                    argv += ["--local-config", str(config.local_config)]
                else:
                    assert config.xds is not None
                    relay = XdsRelay(
                        config.xds.address,
                        root_pem=config.xds.root_pem,
                        server_name=config.xds.server_name,
                        token=config.xds.token,
                    )
                    relay.start()
                    argv += ["--xds-address", relay.address, "--xds-plaintext"]
                self.pods = IsolatingPodManager(
                    shared,
                    config.zds_socket,
                    node_signer=_ca_signer(config, impersonate=True),
                    worker_argv=worker_command(argv),
                    zygote=config.zygote,
                )
            else:
                self.pods = PodManager(shared, config.zds_socket)
            try:
                await self._serve(config, task_status)
            finally:
                if relay is not None:
                    relay.stop()
        log.info("ztunnel stopped")

    async def _serve(self, config: ZtunnelConfig, task_status: trio.TaskStatus[Bound]) -> None:
        assert self.pods is not None
        async with trio.open_nursery() as nursery:
            await self._start_state_source(nursery)
            admin = metrics = ready = None
            if config.admin_address is not None:
                admin = await nursery.start(serve_admin, config.admin_address, self)
            if config.metrics_address is not None:
                metrics = await nursery.start(serve_metrics, config.metrics_address, self.metrics)
            if config.readiness_address is not None:
                ready = await nursery.start(serve_readiness, config.readiness_address, self)
            await nursery.start(self.tracker.run)
            nursery.start_soon(self._follow_state)
            await nursery.start(self.pods.run)
            self.bound = Bound(admin, metrics, ready)
            log.info(
                "ztunnel started",
                node=config.proxy.node,
                mode=self.mode,
                admin=_text(admin),
                metrics=_text(metrics),
                readiness=_text(ready),
                state_source="xds" if config.xds is not None else "local config",
            )
            self._started.set()
            task_status.started(self.bound)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as waiters:

                    async def on_signal() -> None:
                        async for signum in signals:
                            log.info("signal received", signal=signal.Signals(signum).name)
                            self._shutdown.set()
                            return

                    waiters.start_soon(on_signal)
                    await self._shutdown.wait()
                    waiters.cancel_scope.cancel()
            log.info("ztunnel draining", drain_timeout_s=config.proxy.drain_timeout)
            await self.pods.shutdown(config.proxy.drain_timeout)
            nursery.cancel_scope.cancel()

    async def _start_state_source(self, nursery: trio.Nursery) -> None:
        config = self.config
        if config.local_config is not None:
            # Imported here: the file format (YAML) is loaded only when a file is the source.
            from ztunnel.local_config import LocalConfigSource

            self.local = LocalConfigSource(config.local_config, self.store.claim_writer("local"))
            await nursery.start(self.local.run)
            return
        assert config.xds is not None
        xds = config.xds
        tls = XdsTls(xds.root_pem, xds.server_name) if xds.root_pem is not None else None
        node = ZtunnelNode(
            node_name=config.proxy.node,
            pod_name=xds.pod_name,
            pod_namespace=xds.pod_namespace,
            pod_ip=xds.pod_ip,
            cluster_id=config.proxy.cluster,
        )
        self.xds = XdsSource(
            xds.address, self.store.claim_writer("xds"), node, tls=tls, token=xds.token
        )
        await nursery.start(self.xds.run)
        nursery.start_soon(self._follow_xds, self.xds)

    async def _follow_xds(self, xds: XdsSource) -> None:
        """The control-plane connection's gauge and NACK counter follow the source."""
        nacks = 0
        while True:
            connected = xds.connected
            self.metrics.set_xds_connected(connected)
            for _ in range(xds.nacks - nacks):
                self.metrics.xds_nack()
            nacks = xds.nacks
            seen = (connected, nacks)

            def changed(source: XdsSource, seen: tuple[bool, int] = seen) -> bool:
                return (source.connected, source.nacks) != seen

            await xds.wait_until(changed)

    async def _follow_state(self) -> None:
        """Each new state: gauges, and open connections re-checked against its policies."""
        version = -1
        while True:
            snapshot = await self.store.wait_changed(version)
            version = snapshot.version
            self.metrics.observe_snapshot(snapshot)
            closed = self.tracker.recheck(snapshot)
            if closed:
                log.info("policy change closed connections", closed=closed)


def _text(address: tuple[str, int] | None) -> str:
    return "off" if address is None else f"{address[0]}:{address[1]}"


def _ca_signer(config: ZtunnelConfig, *, impersonate: bool) -> CertificateSigner:
    """The CA through gRPC: as the node (impersonating pods) or as the pod itself."""
    if config.ca is None:
        raise ValueError("no CA configured (--ca-address)")
    ca = config.ca
    return GrpcLiteCaSigner(
        ca.address,
        ca.root_pem,
        ca.token,
        server_name=ca.server_name,
        cluster_id=config.proxy.cluster,
        impersonate=impersonate,
    )


async def run_ztunnel(
    config: ZtunnelConfig, *, task_status: trio.TaskStatus[Ztunnel] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a ztunnel until SIGTERM/SIGINT or ``/quitquitquit``."""
    ztunnel = Ztunnel(config)

    async def run(*, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        await ztunnel.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run)
        task_status.started(ztunnel)
