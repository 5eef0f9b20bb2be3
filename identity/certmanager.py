"""One key and certificate per service account, fetched, shared and rotated.

ztunnel holds the identity of every pod on its node. For each SPIFFE ID it
needs, this module generates an ECDSA P-256 key in the process (never written
anywhere, never logged), asks the CA to sign it, keeps the answer in memory,
refreshes it at half-life and forgets it when the last pod using it leaves.

Shape of the machinery (everything runs in one trio nursery, see :meth:`run`):

- One **scheduler** task owns time: a heap of timers (refresh at half-life,
  retry after a failure) and a priority queue of identities waiting for the
  CA. It starts at most ``max_concurrent`` **signing** tasks at once, taking
  on-demand requests (:meth:`CertificateManager.get`, a connection is waiting)
  before prefetches (:meth:`~CertificateManager.prefetch` /
  :meth:`~CertificateManager.retain`, a pod arrived) and background refreshes.
- All state is mutated on the trio thread between two checkpoints, so a reader
  (the data path calling ``get``/``current``) never sees half an update. Public
  methods must be called from the trio thread.
- Two clocks: scheduling uses trio's clock (so tests run hours of virtual time
  with ``trio.testing.MockClock``), certificate validity uses an injected wall
  clock (aware UTC datetimes), as the CA does.

Failure policy (PROTOCOLS.md section 4): retry with exponential backoff from
500 ms doubling up to 150 s, with a bounded downward jitter; keep serving the
previous certificate until it expires; once it has expired, ``get`` fails
closed with :class:`~identity.errors.CertificateUnavailable`. While an identity
is backing off without a valid certificate, ``get`` fails at once instead of
waiting for the next attempt: a connection must not hang for up to 150 s, and
connections must not turn into extra load on a CA that is already failing.

Lifetime of an identity: two styles, use one per caller.

- Reference counted (what ztunnel uses): :meth:`retain` when a pod with that
  identity arrives on the node, :meth:`release` when it leaves; the identity is
  forgotten when its count drops to zero. ztunnel then needs no bookkeeping of
  its own about which pods share a service account.
- Explicit: :meth:`prefetch` / :meth:`get` create an identity that stays until
  :meth:`forget`. ``forget`` drops an identity whatever its count.

Trust bundle: the union of the roots (last element of each CA answer, several
during a root rotation) over every certificate currently held, deduplicated.
An old root therefore stays trusted until the last certificate whose chain
named it has been refreshed (at most one half-life after the CA dropped it).
"""

from __future__ import annotations

import datetime as dt
import enum
import heapq
import itertools
import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog
import trio

from identity import der, keys
from identity.certs import DEFAULT_WORKLOAD_LIFETIME, WorkloadCertificate
from identity.errors import CertificateUnavailable, IdentityError, InvalidCsr
from identity.spiffe import SpiffeId

if TYPE_CHECKING:
    from cryptography import x509

    from identity.ca import CertificateAuthority

log = structlog.get_logger("identity.certmanager")

WallClock = Callable[[], dt.datetime]

INITIAL_RETRY_DELAY = 0.5  # seconds
MAX_RETRY_DELAY = 150.0  # seconds
RETRY_JITTER = 0.2  # a retry waits between 80 % and 100 % of the nominal delay
REFRESH_JITTER = 0.01  # refresh within +-1 % of the lifetime around half-life
DEFAULT_MAX_CONCURRENT = 8
DEFAULT_SIGN_TIMEOUT = 30.0  # seconds; the gRPC client has its own, shorter timeout
# A CA handing out certificates already past half-life must not make us spin.
MIN_REFRESH_DELAY = 1.0  # seconds
DEFAULT_CA_THREADS = 16


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- signing backends -------------------------------------------------------


class CertificateSigner(Protocol):
    """Where certificates come from: the CA over gRPC, or an in-process CA."""

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: dt.timedelta) -> list[str]:
        """Have ``csr_pem`` signed for ``identity``; return the chain, leaf first, roots last.

        Raises an :class:`~identity.errors.IdentityError` subclass on refusal or
        when the CA cannot be reached.
        """
        ...


class CertificateClient(Protocol):
    """The part of :class:`identity.client.CaClient` the manager uses (blocking)."""

    def create_certificate(
        self,
        csr_pem: bytes,
        validity: dt.timedelta,
        impersonate: SpiffeId | None = None,
    ) -> list[str]: ...


class CaClientSigner:
    """Signs through the CA's gRPC service with a blocking :class:`CaClient`.

    Each call runs in a worker thread (grpcio blocks). With ``impersonate`` (the
    node ztunnel's case) the request names the pod's identity in the
    ``ImpersonatedIdentity`` metadata, so that one node credential can obtain
    the identities of the pods on its node.

    Cancellation abandons the thread rather than waiting for it: the client's
    own timeout ends it. Threads come from a limiter of our own so that a hung
    CA cannot exhaust trio's default thread limiter for the rest of the process.
    """

    def __init__(
        self,
        client: CertificateClient,
        *,
        impersonate: bool = True,
        max_threads: int = DEFAULT_CA_THREADS,
    ) -> None:
        self._client = client
        self._impersonate = impersonate
        self._max_threads = max_threads
        self._limiter: trio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"CaClientSigner({self._client!r}, impersonate={self._impersonate})"

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: dt.timedelta) -> list[str]:
        if self._limiter is None:
            # Created lazily: a CapacityLimiter belongs to the running trio loop.
            self._limiter = trio.CapacityLimiter(self._max_threads)
        impersonate = identity if self._impersonate else None
        client = self._client

        def call() -> list[str]:
            return client.create_certificate(csr_pem, lifetime, impersonate)

        return await trio.to_thread.run_sync(
            call,
            thread_name=f"ca sign {identity.principal}",
            abandon_on_cancel=True,
            limiter=self._limiter,
        )


class LocalCaSigner:
    """Signs with an in-process :class:`CertificateAuthority` (dedicated mode, tests).

    There is no caller to authenticate, but the CSR must still name the
    identity asked for, as the CA service would insist.
    """

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    def __repr__(self) -> str:
        return f"LocalCaSigner(trust_domain={self.ca.trust_domain!r})"

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: dt.timedelta) -> list[str]:
        from identity.ca import validate_csr  # the CA side's cryptography, only here

        # Signing one ECDSA certificate takes well under a millisecond: no thread.
        await trio.lowlevel.checkpoint()
        validated = validate_csr(csr_pem)
        if validated.identity != identity:
            raise InvalidCsr(
                f"the CSR names {validated.identity.uri} but {identity.uri} was requested"
            )
        return list(self.ca.sign_workload(validated, lifetime).chain_pem)


# -- timing policy ------------------------------------------------------------


def retry_delay(
    failures: int,
    u: float,
    *,
    initial: float = INITIAL_RETRY_DELAY,
    maximum: float = MAX_RETRY_DELAY,
    jitter: float = RETRY_JITTER,
) -> float:
    """Seconds to wait after ``failures`` (>= 1) consecutive failures; ``u`` in [0, 1).

    Nominal delays double from ``initial`` and stop at ``maximum``. Jitter only
    shortens a delay (by up to ``jitter`` of it), so the cap is never exceeded
    while a herd of identities that failed together still spreads out.
    """
    if failures < 1:
        raise ValueError(f"failures must be at least 1, got {failures}")
    # The exponent is bounded so that a CA down for weeks cannot overflow a float.
    nominal = min(maximum, initial * 2.0 ** min(failures - 1, 64))
    return nominal * (1.0 - jitter * u)


def refresh_time(
    cert: WorkloadCertificate, u: float, jitter: float = REFRESH_JITTER
) -> dt.datetime:
    """Half-life of ``cert`` moved by up to ``jitter`` of its lifetime either way; ``u`` in [0, 1).

    The jitter spreads the refreshes of certificates issued together (every pod
    of a node after a restart) so that they do not hit the CA in one burst.
    """
    lifetime = cert.not_after - cert.not_before
    return cert.refresh_at + lifetime * (jitter * (2.0 * u - 1.0))


class RandomSource(Protocol):
    """What the manager needs from an RNG (``random.Random`` fits)."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class ManagerSettings:
    """Tunables of a :class:`CertificateManager` (durations in seconds unless a timedelta)."""

    lifetime: dt.timedelta = DEFAULT_WORKLOAD_LIFETIME
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    refresh_jitter: float = REFRESH_JITTER
    retry_initial: float = INITIAL_RETRY_DELAY
    retry_max: float = MAX_RETRY_DELAY
    retry_jitter: float = RETRY_JITTER
    sign_timeout: float = DEFAULT_SIGN_TIMEOUT

    def __post_init__(self) -> None:
        if self.lifetime <= dt.timedelta(0):
            raise ValueError(f"lifetime must be positive, got {self.lifetime}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {self.max_concurrent}")
        for name in ("refresh_jitter", "retry_jitter"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {value}")
        if not 0.0 < self.retry_initial <= self.retry_max:
            raise ValueError(
                f"need 0 < retry_initial <= retry_max, got {self.retry_initial} and "
                f"{self.retry_max}"
            )
        if self.sign_timeout <= 0:
            raise ValueError(f"sign_timeout must be positive, got {self.sign_timeout}")


# -- public views -------------------------------------------------------------


@dataclass(frozen=True)
class TrustBundle:
    """The roots (DER) to verify peers with; ``version`` grows by one at each change."""

    version: int
    roots_der: tuple[bytes, ...]

    def pem(self) -> bytes:
        return b"".join(der.to_pem(r) for r in self.roots_der)

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """The roots as ``cryptography`` certificates (imported on first use)."""
        from cryptography import x509

        return tuple(x509.load_der_x509_certificate(r) for r in self.roots_der)


class Phase(enum.Enum):
    """Where an identity is in its fetch cycle."""

    QUEUED = "queued"  # waiting for a free CA slot
    SIGNING = "signing"  # a CA call is in flight
    SCHEDULED = "scheduled"  # holds a certificate; refresh timer running
    BACKOFF = "backoff"  # last attempt failed; retry timer running


@dataclass(frozen=True)
class IdentityStatus:
    """One identity as seen from outside (admin dumps, tests). No key material."""

    identity: SpiffeId
    phase: Phase
    references: int
    serial: int | None
    not_after: dt.datetime | None
    failures: int
    last_error: str | None
    next_attempt_in: float | None  # seconds until the refresh/retry timer fires


@dataclass(frozen=True)
class ManagerStats:
    identities: int
    queued: int
    signing: int
    issued: int
    refreshed: int
    failed: int


# -- the manager ----------------------------------------------------------------


class _Priority(enum.IntEnum):
    ON_DEMAND = 0  # someone is waiting in get()
    BACKGROUND = 1  # prefetch, refresh, retry


class _Entry:
    """Mutable per-identity state; only the manager touches it."""

    __slots__ = (
        "cert",
        "changed",
        "due",
        "failures",
        "forgotten",
        "identity",
        "last_error",
        "phase",
        "priority",
        "refs",
        "scope",
        "token",
        "waiters",
    )

    def __init__(self, identity: SpiffeId) -> None:
        self.identity = identity
        self.refs = 0
        self.cert: WorkloadCertificate | None = None
        self.phase = Phase.QUEUED
        self.priority = _Priority.BACKGROUND
        # Bumped at every phase change: a heap item carrying an older token is
        # stale (promoted, rescheduled or forgotten) and is skipped when popped.
        self.token = 0
        self.due: float | None = None
        self.failures = 0
        self.last_error: str | None = None
        self.changed = trio.Event()
        self.scope: trio.CancelScope | None = None
        self.waiters = 0
        self.forgotten = False

    def __repr__(self) -> str:
        serial = None if self.cert is None else f"{self.cert.serial:x}"
        return f"<_Entry {self.identity} {self.phase.value} refs={self.refs} serial={serial}>"


_TimerItem = tuple[float, int, int, _Entry]  # (trio deadline, seq, token, entry)
_ReadyItem = tuple[int, int, int, _Entry]  # (priority, seq, token, entry)


class CertificateManager:
    """Keys and certificates for many identities, shared by every caller in the process.

    Use it inside a nursery::

        async with CertificateManager.open(CaClientSigner(client)) as certs:
            certs.retain(pod_identity)             # pod arrived: prefetch, low priority
            cert = await certs.get(pod_identity)   # connection: high priority
            certs.release(pod_identity)            # pod left: forgotten at zero

    or ``await nursery.start(manager.run)``.
    """

    def __init__(
        self,
        signer: CertificateSigner,
        settings: ManagerSettings | None = None,
        *,
        wall_clock: WallClock = _utcnow,
        rng: RandomSource | None = None,
    ) -> None:
        self._signer = signer
        self._settings = settings or ManagerSettings()
        self._wall = wall_clock
        # Jitter is not a secret; the RNG is injectable so tests can pin it.
        self._rng: RandomSource = rng if rng is not None else random.Random()  # noqa: S311
        self._entries: dict[SpiffeId, _Entry] = {}
        self._timers: list[_TimerItem] = []
        self._ready: list[_ReadyItem] = []
        self._seq = itertools.count()
        self._signing = 0
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._closed = False
        self._bundle = TrustBundle(0, ())
        self._bundle_set: frozenset[bytes] = frozenset()
        self._bundle_changed = trio.Event()
        self._issued = 0
        self._refreshed = 0
        self._failed = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return (
            f"<CertificateManager {state} identities={len(self._entries)} "
            f"signing={self._signing} signer={self._signer!r}>"
        )

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        signer: CertificateSigner,
        settings: ManagerSettings | None = None,
        *,
        wall_clock: WallClock = _utcnow,
        rng: RandomSource | None = None,
    ) -> AsyncIterator[CertificateManager]:
        """Run a manager for the duration of the ``async with`` block."""
        manager = cls(signer, settings, wall_clock=wall_clock, rng=rng)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.run)
                try:
                    yield manager
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # run() never fails on its own, so a group here holds the body's
            # exception alone; hand it back as raised rather than wrapped.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Ready at once: identities queued earlier start now."""
        if self._started:
            raise RuntimeError("a CertificateManager can run only once")
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._scheduler, name="certmanager scheduler")
                task_status.started()
        finally:
            self._nursery = None
            self._stop()

    # -- the data path's API ------------------------------------------------

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        """A valid certificate for ``identity``, fetching it with high priority if needed.

        Returns at once when a valid certificate is held (even while a refresh is
        pending or failing). Concurrent callers share one CA call. Raises
        :class:`CertificateUnavailable` when the fetch fails, when the identity
        is backing off without a valid certificate, when it is forgotten while
        waiting, or when the manager stops.
        """
        if not self._started:
            raise RuntimeError("start the CertificateManager (run or open) before get()")
        while True:
            if self._closed:
                raise CertificateUnavailable(
                    f"no certificate for {identity.uri}: the certificate manager has stopped"
                )
            entry = self._entries.get(identity)
            if entry is None:
                entry = self._new_entry(identity)
                self._enqueue(entry, _Priority.ON_DEMAND)
            cert = entry.cert
            if cert is not None and self._wall() < cert.not_after:
                return cert
            if entry.phase is Phase.BACKOFF:
                raise self._unavailable(entry)
            if entry.phase is Phase.SCHEDULED:
                # Held certificate expired before its refresh (the wall clock
                # jumped, e.g. after a suspend): fetch now.
                self._enqueue(entry, _Priority.ON_DEMAND)
            elif entry.phase is Phase.QUEUED and entry.priority is not _Priority.ON_DEMAND:
                log.debug("prefetch promoted", identity=identity.uri)
                self._enqueue(entry, _Priority.ON_DEMAND)
            changed = entry.changed
            entry.waiters += 1
            try:
                await changed.wait()
            finally:
                entry.waiters -= 1
            if self._entries.get(identity) is not entry and not self._closed:
                raise CertificateUnavailable(
                    f"{identity.uri} was forgotten while waiting for its certificate"
                )

    def current(self, identity: SpiffeId) -> WorkloadCertificate | None:
        """The held certificate if it is valid now, without waiting or fetching."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None or self._wall() >= entry.cert.not_after:
            return None
        return entry.cert

    # -- the pod lifecycle's API ----------------------------------------------

    def prefetch(self, identity: SpiffeId) -> None:
        """Start fetching ``identity`` in the background (low priority); never blocks.

        The identity stays until :meth:`forget` (or, if retained, its last
        :meth:`release`). A no-op for an identity already known.
        """
        if self._closed or identity in self._entries:
            return
        self._enqueue(self._new_entry(identity), _Priority.BACKGROUND)

    def retain(self, identity: SpiffeId) -> None:
        """Count one more user (a pod) of ``identity``, prefetching it if new."""
        if self._closed:
            return
        self.prefetch(identity)
        self._entries[identity].refs += 1

    def release(self, identity: SpiffeId) -> None:
        """Count one user fewer; at zero the identity is forgotten."""
        entry = self._entries.get(identity)
        if entry is None or entry.refs == 0:
            # Already forgotten (forget() wins over counts) or released too often:
            # nothing to drop, and a pod-removal path must not crash over it.
            log.warning("release without retain", identity=identity.uri)
            return
        entry.refs -= 1
        if entry.refs == 0:
            self.forget(identity)

    def forget(self, identity: SpiffeId) -> None:
        """Drop ``identity`` now: its key, certificate, refresh and any CA call in flight.

        Callers still waiting in :meth:`get` get :class:`CertificateUnavailable`.
        Certificates already handed out stay usable by their holders; the
        manager keeps no reference to the key.
        """
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        entry.forgotten = True
        entry.token += 1  # invalidates its timer or queue item
        if entry.scope is not None:
            entry.scope.cancel()
        entry.cert = None
        self._notify(entry)
        self._update_trust_bundle()
        log.info("identity forgotten", identity=identity.uri)

    # -- trust bundle -------------------------------------------------------

    @property
    def trust_bundle(self) -> TrustBundle:
        """Roots from every held certificate's chain, deduplicated (empty before the first)."""
        return self._bundle

    async def wait_trust_bundle(self, after: int = 0) -> TrustBundle:
        """The trust bundle once its version is greater than ``after``.

        Watch changes with::

            bundle = certs.trust_bundle
            while True:
                bundle = await certs.wait_trust_bundle(bundle.version)
                ...rebuild TLS contexts from bundle.roots_der...
        """
        while self._bundle.version <= after:
            if self._closed:
                raise CertificateUnavailable("the certificate manager has stopped")
            await self._bundle_changed.wait()
        return self._bundle

    # -- introspection ----------------------------------------------------------

    def status(self, identity: SpiffeId) -> IdentityStatus | None:
        entry = self._entries.get(identity)
        return None if entry is None else self._status_of(entry)

    def identities(self) -> list[IdentityStatus]:
        return [self._status_of(e) for e in self._entries.values()]

    def stats(self) -> ManagerStats:
        return ManagerStats(
            identities=len(self._entries),
            queued=sum(1 for e in self._entries.values() if e.phase is Phase.QUEUED),
            signing=self._signing,
            issued=self._issued,
            refreshed=self._refreshed,
            failed=self._failed,
        )

    def _status_of(self, entry: _Entry) -> IdentityStatus:
        next_in = None
        if entry.due is not None and entry.phase in (Phase.SCHEDULED, Phase.BACKOFF):
            next_in = max(0.0, entry.due - trio.current_time())
        return IdentityStatus(
            identity=entry.identity,
            phase=entry.phase,
            references=entry.refs,
            serial=None if entry.cert is None else entry.cert.serial,
            not_after=None if entry.cert is None else entry.cert.not_after,
            failures=entry.failures,
            last_error=entry.last_error,
            next_attempt_in=next_in,
        )

    # -- state transitions (trio thread only, no checkpoints inside) ------------

    def _new_entry(self, identity: SpiffeId) -> _Entry:
        entry = _Entry(identity)
        self._entries[identity] = entry
        return entry

    def _enqueue(self, entry: _Entry, priority: _Priority) -> None:
        entry.token += 1
        entry.phase = Phase.QUEUED
        entry.priority = priority
        entry.due = None
        heapq.heappush(self._ready, (priority, next(self._seq), entry.token, entry))
        self._kick()

    def _schedule(self, entry: _Entry, phase: Phase, delay: float) -> None:
        entry.token += 1
        entry.phase = phase
        entry.due = trio.current_time() + delay
        heapq.heappush(self._timers, (entry.due, next(self._seq), entry.token, entry))
        self._kick()  # the scheduler may need to wake earlier than it planned

    def _notify(self, entry: _Entry) -> None:
        entry.changed.set()
        entry.changed = trio.Event()

    def _kick(self) -> None:
        self._wakeup.set()

    def _unavailable(self, entry: _Entry) -> CertificateUnavailable:
        retry = ""
        if entry.due is not None:
            retry = f"; next attempt in {max(0.0, entry.due - trio.current_time()):.1f} s"
        expired = ""
        if entry.cert is not None:
            expired = f"; the last certificate expired at {entry.cert.not_after.isoformat()}"
        return CertificateUnavailable(
            f"no valid certificate for {entry.identity.uri} after {entry.failures} failed "
            f"attempt(s): {entry.last_error}{expired}{retry}. Check that the CA is reachable "
            "and allows this node to act for the identity"
        )

    def _stop(self) -> None:
        self._closed = True
        # Drop every key with the manager's last task: nothing can be handed out
        # any more, and waiters wake to find the manager closed.
        entries, self._entries = self._entries, {}
        for entry in entries.values():
            entry.forgotten = True
            entry.token += 1
            entry.cert = None
            self._notify(entry)
        self._bundle_changed.set()

    # -- the scheduler -----------------------------------------------------------

    async def _scheduler(self) -> None:
        while True:
            # A fresh event before looking at the state: any change made while
            # we wait below sets it, so no wake-up is lost.
            self._wakeup = trio.Event()
            self._fire_due_timers()
            self._dispatch()
            self._compact()
            deadline = self._timers[0][0] if self._timers else math.inf
            with trio.move_on_at(deadline):
                await self._wakeup.wait()

    def _fire_due_timers(self) -> None:
        now = trio.current_time()
        while self._timers and self._timers[0][0] <= now:
            _, _, token, entry = heapq.heappop(self._timers)
            if token != entry.token:
                continue
            priority = _Priority.ON_DEMAND if entry.waiters else _Priority.BACKGROUND
            self._enqueue(entry, priority)

    def _dispatch(self) -> None:
        nursery = self._nursery
        assert nursery is not None
        while self._signing < self._settings.max_concurrent and self._ready:
            _, _, token, entry = heapq.heappop(self._ready)
            if token != entry.token:
                continue
            entry.token += 1
            entry.phase = Phase.SIGNING
            # Created here, not in the task, so that forget() can cancel a call
            # whose task has not started yet.
            entry.scope = trio.CancelScope()
            self._signing += 1
            nursery.start_soon(self._sign_task, entry, name=f"certmanager sign {entry.identity}")

    def _compact(self) -> None:
        # Stale heap items are skipped lazily; drop them when they pile up
        # (many pods coming and going between two refreshes).
        limit = 2 * len(self._entries) + 64
        if len(self._timers) > limit:
            self._timers = [t for t in self._timers if t[2] == t[3].token]
            heapq.heapify(self._timers)
        if len(self._ready) > limit:
            self._ready = [r for r in self._ready if r[2] == r[3].token]
            heapq.heapify(self._ready)

    # -- one CA call --------------------------------------------------------------

    async def _sign_task(self, entry: _Entry) -> None:
        scope = entry.scope
        assert scope is not None
        try:
            with scope:
                await self._sign_once(entry)
        finally:
            if entry.scope is scope:
                entry.scope = None
            self._signing -= 1
            self._kick()

    async def _sign_once(self, entry: _Entry) -> None:
        identity = entry.identity
        attempt = entry.failures + 1
        # A new key for every request: a refresh also rotates the key, and an
        # answer for an older request can never match the key we hold.
        try:
            key, csr = keys.new_key_and_csr(identity)
            with trio.fail_after(self._settings.sign_timeout):
                chain = await self._signer.sign(csr, identity, self._settings.lifetime)
            cert = WorkloadCertificate.from_ca_response(identity, key, chain)
            if cert.not_after <= self._wall():
                raise CertificateUnavailable(
                    f"the CA returned a certificate that expired at {cert.not_after.isoformat()}; "
                    "check the CA's and this node's clocks"
                )
        except trio.TooSlowError:
            error = f"the CA did not answer within {self._settings.sign_timeout:g} s"
        except IdentityError as exc:
            error = str(exc)
        except Exception as exc:
            # Not an error the signer contract defines (a bug, or an untranslated
            # transport error). Treat it as a failed attempt: retrying keeps this
            # identity failing closed without taking down the other identities.
            log.exception("certificate signer raised an unexpected error", identity=identity.uri)
            error = f"{type(exc).__name__}: {exc}"
        else:
            if not entry.forgotten:
                self._installed(entry, cert, attempt)
            return
        if not entry.forgotten:
            self._failed_attempt(entry, error, attempt)

    def _installed(self, entry: _Entry, cert: WorkloadCertificate, attempt: int) -> None:
        first = entry.cert is None
        entry.cert = cert
        entry.failures = 0
        entry.last_error = None
        refresh = refresh_time(cert, self._rng.random(), self._settings.refresh_jitter)
        delay = max((refresh - self._wall()).total_seconds(), MIN_REFRESH_DELAY)
        self._schedule(entry, Phase.SCHEDULED, delay)
        if first:
            self._issued += 1
        else:
            self._refreshed += 1
        self._update_trust_bundle()
        self._notify(entry)
        log.info(
            "certificate issued" if first else "certificate refreshed",
            identity=entry.identity.uri,
            serial=f"{cert.serial:x}",
            not_after=cert.not_after.isoformat(),
            attempt=attempt,
            refresh_in=round(delay, 3),
        )

    def _failed_attempt(self, entry: _Entry, error: str, attempt: int) -> None:
        entry.failures += 1
        entry.last_error = error
        s = self._settings
        delay = retry_delay(
            entry.failures,
            self._rng.random(),
            initial=s.retry_initial,
            maximum=s.retry_max,
            jitter=s.retry_jitter,
        )
        self._schedule(entry, Phase.BACKOFF, delay)
        self._failed += 1
        self._notify(entry)
        cert = entry.cert
        valid = cert is not None and self._wall() < cert.not_after
        log.warning(
            "certificate request failed",
            identity=entry.identity.uri,
            attempt=attempt,
            delay=round(delay, 3),
            error=error,
            serving=f"{cert.serial:x}" if valid and cert is not None else None,
            not_after=cert.not_after.isoformat() if cert is not None else None,
        )

    def _update_trust_bundle(self) -> None:
        # Insertion-ordered and deduplicated by DER.
        roots: dict[bytes, None] = {}
        for entry in self._entries.values():
            if entry.cert is not None:
                for root in entry.cert.roots_der:
                    roots.setdefault(root, None)
        as_set = frozenset(roots)
        if as_set == self._bundle_set:
            return
        self._bundle_set = as_set
        self._bundle = TrustBundle(self._bundle.version + 1, tuple(roots))
        self._bundle_changed.set()
        self._bundle_changed = trio.Event()
        log.info(
            "trust bundle changed",
            version=self._bundle.version,
            roots=[der.display_name(der.parse_certificate(r).subject) for r in roots],
        )


__all__ = [
    "CaClientSigner",
    "CertificateClient",
    "CertificateManager",
    "CertificateSigner",
    "IdentityStatus",
    "LocalCaSigner",
    "ManagerSettings",
    "ManagerStats",
    "Phase",
    "RandomSource",
    "TrustBundle",
    "refresh_time",
    "retry_delay",
]
