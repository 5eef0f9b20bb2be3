"""The connections ztunnel is carrying: tracking, policy re-checks, telemetry and access logs.

Every proxied connection (outbound or inbound, HBONE or plain TCP) is
registered here for its lifetime with :meth:`ConnectionTracker.track`. The
tracker owns what follows from that:

- the live list the admin endpoint shows (``/connections``, ``underpass zc
  connections``), with bytes counted as the relay copies them;
- the TCP metrics of PROTOCOLS.md section 8 (opened, closed, bytes each way,
  flushed every few seconds for long connections and at the end);
- one structured access-log line per connection when it ends: who talked to
  whom, identities, bytes each way, duration and outcome;
- re-checking authorization when policy changes: an inbound connection whose
  facts a new policy now denies is cancelled (both ends reset), so a deny
  applies to connections already open, not only to new ones;
- draining by pod: cancelling what is left of a pod's connections once its
  grace period is over.

Bytes follow Istio's meaning: *received* is what the client sent (request
direction), *sent* what went back to it.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
import trio

from underpass.hbone.relay import RelayResult
from ztunnel.metrics import TcpLabels, ZtunnelMetrics
from ztunnel.policy import Connection, authorize
from ztunnel.state.model import Workload
from ztunnel.state.store import Snapshot

log = structlog.get_logger("ztunnel.connections")
access_log = structlog.get_logger("ztunnel.access")

#: How often long-lived connections' byte counts reach the metrics.
METRICS_FLUSH_INTERVAL: Final = 5.0


@dataclass(frozen=True, slots=True)
class PolicyCheck:
    """What re-checking an inbound connection needs: its facts and the pod it serves."""

    facts: Connection
    destination_uid: str  # the local workload's uid in the state


@dataclass(eq=False, slots=True)
class TrackedConnection:
    """One proxied connection. ``counters`` is handed to the relay, which fills it live."""

    id: int
    pod: str  # the ZDS uid of the pod this connection belongs to
    direction: str  # "inbound" | "outbound"
    protocol: str  # "HBONE" | "TCP" | "passthrough"
    source: str
    destination: str
    source_workload: Workload | None
    destination_workload: Workload | None
    source_identity: str | None
    destination_identity: str | None
    labels: TcpLabels
    policy: PolicyCheck | None
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    counters: RelayResult = field(default_factory=RelayResult)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    outcome: str | None = None  # set when something other than the peers ended it
    reported_received: int = 0
    reported_sent: int = 0

    @property
    def bytes_received(self) -> int:
        """Client -> server bytes (for outbound the pod is the client)."""
        return self.counters.a_to_b

    @property
    def bytes_sent(self) -> int:
        return self.counters.b_to_a

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pod": self.pod,
            "direction": self.direction,
            "protocol": self.protocol,
            "source": self.source,
            "destination": self.destination,
            "source_workload": _workload_name(self.source_workload),
            "destination_workload": _workload_name(self.destination_workload),
            "source_identity": self.source_identity,
            "destination_identity": self.destination_identity,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "started": self.started,
        }


def _workload_name(workload: Workload | None) -> str | None:
    return None if workload is None else f"{workload.namespace}/{workload.name}"


class ConnectionTracker:
    """Registry of live connections; see the module docstring."""

    def __init__(
        self,
        metrics: ZtunnelMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        flush_interval: float = METRICS_FLUSH_INTERVAL,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._flush_interval = flush_interval
        self._live: dict[int, TrackedConnection] = {}
        self._ids = itertools.count(1)
        self.closed_by_policy = 0

    def __len__(self) -> int:
        return len(self._live)

    def connections(self) -> list[TrackedConnection]:
        return list(self._live.values())

    def as_json(self) -> list[dict[str, Any]]:
        return [c.as_json() for c in self._live.values()]

    def for_pod(self, pod: str) -> list[TrackedConnection]:
        return [c for c in self._live.values() if c.pod == pod]

    @contextlib.contextmanager
    def track(
        self,
        *,
        pod: str,
        direction: str,
        protocol: str,
        source: str,
        destination: str,
        source_workload: Workload | None,
        destination_workload: Workload | None,
        source_identity: str | None,
        destination_identity: str | None,
        labels: TcpLabels,
        policy: PolicyCheck | None = None,
    ) -> Iterator[TrackedConnection]:
        """Register a connection for the ``with`` block; run its relay inside
        ``conn.cancel_scope`` with ``result=conn.counters``."""
        conn = TrackedConnection(
            id=next(self._ids),
            pod=pod,
            direction=direction,
            protocol=protocol,
            source=source,
            destination=destination,
            source_workload=source_workload,
            destination_workload=destination_workload,
            source_identity=source_identity,
            destination_identity=destination_identity,
            labels=labels,
            policy=policy,
        )
        self._live[conn.id] = conn
        self._metrics.connection_opened(labels)
        self._metrics.set_active_connections(direction, self._count(direction))
        try:
            yield conn
        finally:
            del self._live[conn.id]
            self._flush(conn)
            self._metrics.connection_closed(labels)
            self._metrics.set_active_connections(direction, self._count(direction))
            self._log_access(conn)

    def _count(self, direction: str) -> int:
        return sum(1 for c in self._live.values() if c.direction == direction)

    def _flush(self, conn: TrackedConnection) -> None:
        received = conn.bytes_received - conn.reported_received
        sent = conn.bytes_sent - conn.reported_sent
        if received or sent:
            self._metrics.bytes_transferred(conn.labels, received=received, sent=sent)
            conn.reported_received += received
            conn.reported_sent += sent

    def _log_access(self, conn: TrackedConnection) -> None:
        error = conn.counters.error
        if conn.outcome is not None:
            outcome = conn.outcome
        elif error is not None:
            outcome = f"error: {type(error).__name__}: {error}"
        else:
            outcome = "ok"
        access_log.info(
            "connection complete",
            direction=conn.direction,
            protocol=conn.protocol,
            src_addr=conn.source,
            dst_addr=conn.destination,
            src_workload=_workload_name(conn.source_workload),
            dst_workload=_workload_name(conn.destination_workload),
            src_identity=conn.source_identity,
            dst_identity=conn.destination_identity,
            bytes_sent=conn.bytes_sent,
            bytes_recv=conn.bytes_received,
            duration_ms=round((time.monotonic() - conn.started_mono) * 1000, 1),
            outcome=outcome,
        )

    # -- policy re-checks ---------------------------------------------------------------

    def recheck(self, snapshot: Snapshot) -> int:
        """Cancel inbound connections the policies of ``snapshot`` now deny; how many."""
        closed = 0
        for conn in list(self._live.values()):
            check = conn.policy
            if check is None or conn.cancel_scope.cancel_called:
                continue
            workload = snapshot.workload(check.destination_uid)
            if workload is None:
                reason = "its workload left the state"
                allowed = False
            else:
                decision = authorize(snapshot.policies_for(workload), check.facts)
                allowed, reason = decision.allowed, decision.reason
            if not allowed:
                conn.outcome = f"closed by policy change: {reason}"
                conn.cancel_scope.cancel()
                closed += 1
                self.closed_by_policy += 1
                log.info(
                    "connection closed by policy change",
                    id=conn.id,
                    src_addr=conn.source,
                    dst_addr=conn.destination,
                    src_identity=conn.source_identity,
                    reason=reason,
                )
        return closed

    def cancel_pod(self, pod: str, outcome: str) -> int:
        """Cancel every connection of ``pod`` (the forced end of a drain)."""
        found = self.for_pod(pod)
        for conn in found:
            if conn.outcome is None:
                conn.outcome = outcome
            conn.cancel_scope.cancel()
        return len(found)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush long connections' byte counts to the metrics every few seconds."""
        task_status.started()
        while True:
            await trio.sleep(self._flush_interval)
            for conn in list(self._live.values()):
                self._flush(conn)
