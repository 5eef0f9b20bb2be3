"""Mode 3: one ztunnel worker process per service account on the node.

``underpass ztunnel --isolation service-account`` runs a *supervisor* that
holds the node's credential and no workload key, and a worker process per
service account with pods on the node, each holding only that service
account's key. A compromised worker cannot get, or use, another service
account's identity: it never sees the node token, and the only certificate
its supervisor will have signed for it is its own.

The supervisor (:class:`IsolatingPodManager`, in place of the shared mode's
:class:`~ztunnel.pods.PodManager`) talks ZDS to the node agent as usual; each
pod it is handed goes to its service account's worker, started on demand:

- **pods**: over a SOCK_SEQPACKET socketpair the supervisor plays the node
  agent's part of ZDS to the worker (an empty snapshot, then ``Add`` with
  the pod's netns fd, ``Del``); the worker runs the ordinary pod proxies.
  The agent's Ack waits for the worker's. The supervisor keeps a duplicate
  of each pod's netns fd, so a worker that dies is started again and given
  its pods back. A worker whose last pod left is stopped (it drains).
- **certificates**: the worker's certificate manager signs through
  :class:`SupervisorSigner`: it sends its CSR to the supervisor over a second
  socketpair; the supervisor checks that the CSR names exactly the worker's
  identity (anything else is refused and logged) and asks the CA for it with
  the node credential (impersonation). Keys stay in the worker.
- **state**: the worker reads workloads and policies through
  :class:`XdsRelay`, a gRPC relay on a unix socket (a private 0700
  directory) that forwards only ``DeltaAggregatedResources`` to the control
  plane, adding the node token on the way: a capability to read the state,
  not to call the CA.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from identity import der
from identity.certmanager import CertificateSigner
from identity.errors import (
    CertificateUnavailable,
    IdentityError,
    IdentityNotPermitted,
    InvalidCsr,
    InvalidSpiffeId,
)
from identity.spiffe import SpiffeId
from underpass import zds
from underpass.xds.types import DELTA_METHOD_PATH
from ztunnel.inpod import PodNetns
from ztunnel.pod import Shared
from ztunnel.pods import PodManager, PodSummary
from ztunnel.zygote import ForkedWorker, Zygote

if TYPE_CHECKING:
    import grpc

log = structlog.get_logger("ztunnel.isolation")

#: How long a new worker may take to say hello (it imports, then connects).
WORKER_START_TIMEOUT: Final = 30.0
#: How long the supervisor waits for a worker's Ack of one request.
WORKER_ACK_TIMEOUT: Final = 30.0
_MAX_MESSAGE: Final = 64 * 1024
_SERVICE: Final = "envoy.service.discovery.v3.AggregatedDiscoveryService"


# -- certificates: worker side ---------------------------------------------------------------


class SupervisorSigner:
    """A worker's :class:`~identity.certmanager.CertificateSigner`: its supervisor signs.

    One request at a time over the inherited socket; the answer is the chain,
    or an error the supervisor gave (refused: :class:`IdentityNotPermitted`;
    the CA failed: :class:`CertificateUnavailable`).
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._lock = trio.Lock()
        self._next = 0

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: dt.timedelta) -> list[str]:
        async with self._lock:
            self._next += 1
            request = {
                "id": self._next,
                "csr": csr_pem.decode("ascii"),
                "identity": identity.uri,
                "lifetime_s": lifetime.total_seconds(),
            }
            try:
                await self._sock.send(json.dumps(request).encode())
                data = await self._sock.recv(_MAX_MESSAGE)
            except OSError as exc:
                raise CertificateUnavailable(f"the supervisor is unreachable: {exc}") from exc
        if not data:
            raise CertificateUnavailable("the supervisor closed the signing channel")
        try:
            answer = json.loads(data)
        except ValueError as exc:
            raise CertificateUnavailable(f"the supervisor sent garbage: {exc}") from None
        if answer.get("id") != request["id"]:
            raise CertificateUnavailable("the supervisor answered another request")
        if "chain" in answer and isinstance(answer["chain"], list):
            return [str(pem) for pem in answer["chain"]]
        error = str(answer.get("error", "no reason given"))
        if answer.get("kind") == "refused":
            raise IdentityNotPermitted(f"the supervisor refused: {error}")
        raise CertificateUnavailable(f"the supervisor could not get a certificate: {error}")


# -- certificates: supervisor side -----------------------------------------------------------


async def serve_signing(
    sock: trio.socket.SocketType, identity: SpiffeId, node_signer: CertificateSigner
) -> None:
    """Answer one worker's CSRs: only for ``identity``, signed through the node's signer.

    The supervisor reads the identity a CSR asks for (:func:`csr_identity`);
    everything else about the CSR (its signature, key type) is the CA's to check.
    """
    while True:
        data = await sock.recv(_MAX_MESSAGE)
        if not data:
            return
        answer: dict[str, Any]
        request_id: object = None
        try:
            request = json.loads(data)
            request_id = request.get("id")
            asked, checked_csr = csr_identity(str(request["csr"]))
            if asked != identity:
                raise IdentityNotPermitted(f"the worker for {identity.uri} asked for {asked.uri}")
            lifetime = dt.timedelta(seconds=float(request["lifetime_s"]))
            # The CA gets exactly the request that was checked, not the worker's text.
            chain = await node_signer.sign(checked_csr, identity, lifetime)
            answer = {"id": request_id, "chain": chain}
        except IdentityNotPermitted as exc:
            log.warning("worker certificate request refused", worker=identity.uri, error=str(exc))
            answer = {"id": request_id, "kind": "refused", "error": str(exc)}
        except (IdentityError, ValueError, KeyError, TypeError, AttributeError) as exc:
            kind = "refused" if not isinstance(exc, IdentityError) else "unavailable"
            answer = {"id": request_id, "kind": kind, "error": f"{type(exc).__name__}: {exc}"}
        await sock.send(json.dumps(answer).encode())


#: A workload CSR is well under 1 KiB; anything much larger is not one.
MAX_CSR_TEXT = 8192


def csr_identity(csr_pem: str) -> tuple[SpiffeId, bytes]:
    """The one SPIFFE ID a PEM CSR asks for, and the CSR re-encoded from what was read.

    The text must be one ``CERTIFICATE REQUEST`` block and nothing else, of the
    one shape a workload CSR has (:func:`identity.der.csr_uri_sans`) with exactly
    one URI SAN; the caller forwards the re-encoded request, so the CA reads
    the very bytes checked here. :class:`InvalidCsr` for anything else.
    """
    if len(csr_pem) > MAX_CSR_TEXT:
        raise InvalidCsr(f"a CSR of {len(csr_pem)} characters; at most {MAX_CSR_TEXT}")
    try:
        blocks = der.pem_blocks(csr_pem, "CERTIFICATE REQUEST", exclusive=True)
        if len(blocks) != 1:
            raise der.DerError(f"{len(blocks)} requests in one message")
        uris = der.csr_uri_sans(blocks[0])
    except der.DerError as exc:
        raise InvalidCsr(f"not one PEM certificate request: {exc}") from None
    if len(uris) != 1:
        raise InvalidCsr(f"a workload CSR asks for exactly one URI SAN, this one for {len(uris)}")
    try:
        identity = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise InvalidCsr(f"the CSR's URI SAN is not a workload SPIFFE ID: {exc}") from None
    return identity, der.to_pem(blocks[0], "CERTIFICATE REQUEST")


# -- state: the xDS relay --------------------------------------------------------------------


class XdsRelay:
    """Forwards workers' Delta ADS streams to the control plane with the node's token.

    Serves on ``unix:<dir>/xds.sock`` in a private directory; only the one
    method is relayed (anything else: UNIMPLEMENTED). Blocking gRPC: it runs
    on grpcio's own threads, outside trio. grpcio is imported only when a relay
    is made: the other modes never load it.
    """

    def __init__(
        self,
        upstream: str,
        *,
        root_pem: bytes | None,
        server_name: str | None,
        token: Callable[[], str] | None,
        max_workers: int = 64,
    ) -> None:
        import grpc

        from underpass.xds.grpc_client import CHANNEL_OPTIONS

        self._directory = tempfile.mkdtemp(prefix="ztunnel-relay-")
        self.address = f"unix:{self._directory}/xds.sock"
        options = list(CHANNEL_OPTIONS)
        if root_pem is not None:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
            self._channel = grpc.secure_channel(upstream, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(upstream, options=options)
        self._method = self._channel.stream_stream(
            DELTA_METHOD_PATH, request_serializer=None, response_deserializer=None
        )
        self._token = token
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="xds-relay")
        )
        handler = grpc.method_handlers_generic_handler(
            _SERVICE,
            {"DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(self._relay)},
        )
        self._server.add_generic_rpc_handlers((handler,))
        self._server.add_insecure_port(self.address)

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _relay(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        import grpc  # loaded by __init__ already

        metadata: tuple[tuple[str, str | bytes], ...] = ()
        if self._token is not None:
            metadata = (("authorization", f"Bearer {self._token()}"),)
        call = self._method(requests, metadata=metadata)
        context.add_callback(call.cancel)
        try:
            yield from call
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNAVAILABLE
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            context.abort(code, f"relayed: {details}")


# -- pods: the supervisor --------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    identity: SpiffeId
    process: trio.Process | ForkedWorker
    channel: trio.socket.SocketType
    protocol: zds.AgentProtocol = field(default_factory=zds.AgentProtocol)
    lock: trio.Lock = field(default_factory=trio.Lock)
    pods: dict[str, tuple[zds.WorkloadInfo, int]] = field(default_factory=dict)  # uid -> fd
    stopping: bool = False


WorkerArgv = Callable[[SpiffeId, int, int], list[str]]


class IsolatingPodManager(PodManager):
    """The supervisor's pod handling: each pod goes to its service account's worker."""

    def __init__(
        self,
        shared: Shared,
        zds_socket: str,
        *,
        node_signer: CertificateSigner,
        worker_argv: WorkerArgv,
        zygote: Zygote | None = None,
    ) -> None:
        super().__init__(shared, zds_socket)
        self._node_signer = node_signer
        self._worker_argv = worker_argv
        self._zygote = zygote
        self._zygote_reading = False
        self._workers: dict[SpiffeId, _Worker] = {}
        self._starting: dict[SpiffeId, trio.Event] = {}
        self._pod_owner: dict[str, SpiffeId] = {}

    @property
    def zygote_pid(self) -> int | None:
        """The process workers are forked from (None: each worker is a new interpreter)."""
        return self._zygote.pid if self._zygote is not None else None

    def workers(self) -> list[dict[str, Any]]:
        return [
            {"identity": w.identity.uri, "pid": w.process.pid, "pods": sorted(w.pods)}
            for w in self._workers.values()
        ]

    def pods(self) -> list[PodSummary]:
        found = []
        for worker in self._workers.values():
            for uid, (info, fd) in sorted(worker.pods.items()):
                found.append(
                    PodSummary(
                        uid,
                        info.name,
                        info.namespace,
                        info.service_account,
                        worker.identity.uri,
                        os.fstat(fd).st_ino,
                    )
                )
        return found

    async def shutdown(self, drain_timeout: float) -> None:
        self._zds_scope.cancel()
        async with trio.open_nursery() as nursery:
            for worker in list(self._workers.values()):
                nursery.start_soon(self._stop_worker, worker, drain_timeout)
        if self._zygote is not None:
            self._zygote.close()

    # -- requests from the agent ------------------------------------------------------

    async def _add(self, request: zds.Add, fd: int) -> str:
        if request.info is None:
            os.close(fd)
            return f"Add for pod {request.uid} carries no workload info (name, namespace, SA)"
        info = request.info
        identity = SpiffeId(
            self._shared.settings.trust_domain, info.namespace, info.service_account or "default"
        )
        try:
            PodNetns(fd)  # checks the fd is a namespace we can use
            worker = await self._worker_for(identity)
            error = await self._send(worker, zds.Add(request.uid, info), fd)
        except Exception as exc:
            os.close(fd)
            return f"cannot hand pod {info.namespace}/{info.name} to its worker: {exc}"
        if error:
            os.close(fd)
            return error
        old = worker.pods.pop(request.uid, None)
        if old is not None:
            os.close(old[1])
        worker.pods[request.uid] = (info, fd)  # kept to re-add after a worker restart
        self._pod_owner[request.uid] = identity
        self._shared.metrics.set_pods(len(self._pod_owner))
        return ""

    def _remove(self, uid: str) -> None:
        identity = self._pod_owner.pop(uid, None)
        if identity is None:
            return
        self._shared.metrics.set_pods(len(self._pod_owner))
        assert self._nursery is not None
        self._nursery.start_soon(self._remove_from_worker, identity, uid)

    async def _remove_from_worker(self, identity: SpiffeId, uid: str) -> None:
        worker = self._workers.get(identity)
        if worker is None:
            return
        held = worker.pods.pop(uid, None)
        if held is not None:
            os.close(held[1])
        try:
            error = await self._send(worker, zds.Del(uid), None)
            if error:
                log.warning("worker refused Del", worker=identity.uri, uid=uid, error=error)
        except Exception as exc:
            log.warning("cannot tell the worker a pod left", worker=identity.uri, error=str(exc))
        if not worker.pods:
            await self._stop_worker(worker, self._shared.settings.drain_timeout)

    # -- workers -----------------------------------------------------------------------

    async def _worker_for(self, identity: SpiffeId) -> _Worker:
        while True:
            worker = self._workers.get(identity)
            if worker is not None and not worker.stopping:
                return worker
            starting = self._starting.get(identity)
            if starting is not None:
                await starting.wait()
                continue
            event = trio.Event()
            self._starting[identity] = event
            try:
                return await self._start_worker(identity)
            finally:
                del self._starting[identity]
                event.set()

    async def _start_worker(self, identity: SpiffeId) -> _Worker:
        zds_ours, zds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sign_ours, sign_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = self._worker_argv(identity, zds_theirs.fileno(), sign_theirs.fileno())
            process: trio.Process | ForkedWorker
            if self._zygote is not None:
                if not self._zygote_reading:
                    self._zygote_reading = True  # before the await: one reader, ever
                    assert self._nursery is not None
                    await self._nursery.start(self._zygote.run)
                process = await self._zygote.spawn(
                    argv, (zds_theirs.fileno(), sign_theirs.fileno())
                )
            else:
                process = await trio.lowlevel.open_process(
                    argv,
                    pass_fds=(zds_theirs.fileno(), sign_theirs.fileno()),
                    stdin=subprocess.DEVNULL,
                )
        except BaseException:
            zds_ours.close()
            sign_ours.close()
            raise
        finally:
            zds_theirs.close()
            sign_theirs.close()
        worker = _Worker(identity, process, trio.socket.from_stdlib_socket(zds_ours))
        signing = trio.socket.from_stdlib_socket(sign_ours)
        try:
            with trio.fail_after(WORKER_START_TIMEOUT):
                hello = await zds.recv_datagram(worker.channel)
                if hello is None:
                    raise OSError("the worker exited before saying hello")
                worker.protocol.receive(hello.data, len(hello.fds), hello.truncated)
                error = await self._exchange(worker, zds.SnapshotSent(), None)
                if error:
                    raise OSError(f"the worker refused its snapshot: {error}")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            if isinstance(process, ForkedWorker):
                process.close()
            worker.channel.close()
            signing.close()
            raise
        self._workers[identity] = worker
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_worker, worker, signing)
        log.info("worker started", identity=identity.uri, pid=process.pid)
        return worker

    async def _watch_worker(self, worker: _Worker, signing: trio.socket.SocketType) -> None:
        """Serve the worker's CSRs until it exits; restart it if it died while needed."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_signing, signing, worker.identity, self._node_signer)
                await worker.process.wait()
                nursery.cancel_scope.cancel()
        finally:
            signing.close()
            worker.channel.close()
            if isinstance(worker.process, ForkedWorker):
                worker.process.close()
        if self._workers.get(worker.identity) is worker:
            del self._workers[worker.identity]
        if worker.stopping or not worker.pods:
            log.info("worker stopped", identity=worker.identity.uri, pid=worker.process.pid)
            for _info, fd in worker.pods.values():
                os.close(fd)
            return
        log.error(
            "worker died; starting it again",
            identity=worker.identity.uri,
            returncode=worker.process.returncode,
            pods=len(worker.pods),
        )
        try:
            replacement = await self._worker_for(worker.identity)
            for uid, (info, fd) in list(worker.pods.items()):
                error = await self._send(replacement, zds.Add(uid, info), fd)
                if error:
                    log.error("restarted worker refused a pod", uid=uid, error=error)
                    os.close(fd)
                    continue
                replacement.pods[uid] = (info, fd)
        except Exception as exc:
            log.error("cannot restart the worker", identity=worker.identity.uri, error=str(exc))

    async def _stop_worker(self, worker: _Worker, drain_timeout: float) -> None:
        worker.stopping = True
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(drain_timeout + 5.0):
                await worker.process.wait()
            if worker.process.returncode is None:
                log.warning("worker did not stop in time; killing it", pid=worker.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()

    # -- the supervisor -> worker ZDS link ---------------------------------------------

    async def _send(self, worker: _Worker, request: zds.Request, fd: int | None) -> str:
        async with worker.lock:
            return await self._exchange(worker, request, fd)

    async def _exchange(self, worker: _Worker, request: zds.Request, fd: int | None) -> str:
        out = worker.protocol.send(request)
        with trio.fail_after(WORKER_ACK_TIMEOUT):
            await zds.send_datagram(worker.channel, out.data, fd if out.wants_fd else None)
            answer = await zds.recv_datagram(worker.channel)
        if answer is None:
            raise OSError("the worker closed the ZDS connection")
        acked = worker.protocol.receive(answer.data, len(answer.fds), answer.truncated)
        assert isinstance(acked, zds.Acked)
        return acked.ack.error


def worker_command(base: list[str]) -> WorkerArgv:
    """Worker command lines: ``base`` (``python -m underpass.cli.main ... ztunnel ...``
    options shared with the supervisor) plus the worker's own."""

    def argv(identity: SpiffeId, zds_fd: int, signer_fd: int) -> list[str]:
        return [
            *base,
            "--worker-identity",
            identity.uri,
            "--worker-zds-fd",
            str(zds_fd),
            "--worker-signer-fd",
            str(signer_fd),
        ]

    return argv


__all__ = [
    "IsolatingPodManager",
    "SupervisorSigner",
    "XdsRelay",
    "serve_signing",
    "worker_command",
]
