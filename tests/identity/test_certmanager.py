"""Tests for identity.certmanager: sharing, refresh, backoff, priorities, forgetting, roots.

Every test runs on trio's MockClock with autojump, and the wall clock handed to
both the manager and the (real, in-process) CA is derived from trio's clock, so
hours of certificate lifetime pass in milliseconds and times are exact.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random
import threading
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from identity.ca import (
    CertificateAuthority,
    ValidatedCsr,
    build_csr,
    create_root,
    generate_workload_key,
    validate_csr,
)
from identity.certmanager import (
    CaClientSigner,
    CertificateManager,
    CertificateSigner,
    LocalCaSigner,
    ManagerSettings,
    Phase,
    TrustBundle,
    refresh_time,
    retry_delay,
)
from identity.certs import WorkloadCertificate
from identity.errors import CertificateUnavailable, InvalidCsr
from identity.spiffe import SpiffeId

pytestmark = pytest.mark.unit

TD = "cluster.local"
EPOCH = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
BACKDATE = 120.0  # the CA backdates not_before by two minutes
# A one-hour certificate signed at t: valid from t-120 to t+3600, half-life at t+1740.
HALF_LIFE = (3600 + BACKDATE) / 2 - BACKDATE
LIFETIME_S = 3600 + BACKDATE

ALICE = SpiffeId(TD, "shop", "alice")
BOB = SpiffeId(TD, "shop", "bob")
CAROL = SpiffeId(TD, "shop", "carol")
DAVE = SpiffeId(TD, "shop", "dave")
ERIN = SpiffeId(TD, "shop", "erin")
MALLORY = SpiffeId(TD, "evil", "mallory")

# No jitter: the schedule is exact.
EXACT = ManagerSettings(lifetime=HOUR, refresh_jitter=0.0, retry_jitter=0.0)

ROOT1 = create_root(TD, EPOCH - dt.timedelta(days=1))
ROOT2 = create_root(TD, EPOCH - dt.timedelta(days=1))

# Offset added to the wall clock, to simulate a jump (suspend/resume).
_wall_offset = [0.0]


def wall() -> dt.datetime:
    return EPOCH + dt.timedelta(seconds=trio.current_time() + _wall_offset[0])


@pytest.fixture(autouse=True)
def _reset_wall_offset() -> Iterator[None]:
    _wall_offset[0] = 0.0
    yield
    _wall_offset[0] = 0.0


def local_ca(
    root: tuple[ec.EllipticCurvePrivateKey, Any], extra_roots: tuple[Any, ...] = ()
) -> CertificateAuthority:
    key, cert = root
    return CertificateAuthority(
        trust_domain=TD,
        signing_cert=cert,
        signing_key=key,
        intermediates=[],
        roots=[cert, *extra_roots],
        clock=wall,
    )


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


class RecordingSigner:
    """Wraps a real signer: records call times, can be slow, down for windows, or switched."""

    def __init__(self, inner: CertificateSigner, *, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.calls: list[tuple[float, SpiffeId]] = []
        self.down: list[tuple[float, float]] = []  # [start, end) windows of virtual time
        self.cancelled: list[SpiffeId] = []
        self.inflight = 0
        self.max_inflight = 0

    def times(self, identity: SpiffeId | None = None) -> list[float]:
        return [t for t, i in self.calls if identity is None or i == identity]

    def order(self) -> list[SpiffeId]:
        return [i for _, i in self.calls]

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: dt.timedelta) -> list[str]:
        now = trio.current_time()
        self.calls.append((now, identity))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.delay:
                await trio.sleep(self.delay)
        except trio.Cancelled:
            self.cancelled.append(identity)
            raise
        finally:
            self.inflight -= 1
        if any(start <= now < end for start, end in self.down):
            raise CertificateUnavailable("the CA is down (test)")
        return await self.inner.sign(csr_pem, identity, lifetime)


def open_manager(
    signer: CertificateSigner,
    settings: ManagerSettings = EXACT,
    rng: Any = None,
) -> AbstractAsyncContextManager[CertificateManager]:
    return CertificateManager.open(
        signer, settings, wall_clock=wall, rng=rng if rng is not None else FixedRandom(0.5)
    )


def same_key(cert: WorkloadCertificate) -> bool:
    pub = cert.leaf.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return pub.public_numbers() == cert.private_key.public_key().public_numbers()


# -- sharing --------------------------------------------------------------------


async def test_concurrent_gets_share_one_ca_call(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)), delay=0.1)
    got: list[WorkloadCertificate] = []

    async with open_manager(signer) as mgr:

        async def fetch(identity: SpiffeId) -> None:
            got.append(await mgr.get(identity))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(fetch, ALICE)
            nursery.start_soon(fetch, BOB)

        assert signer.order().count(ALICE) == 1
        assert signer.order().count(BOB) == 1
        alice = [c for c in got if c.identity == ALICE]
        assert len(alice) == 50
        assert all(c is alice[0] for c in alice)
        cert = alice[0]
        assert cert.is_valid_at(wall())
        assert isinstance(cert.private_key.curve, ec.SECP256R1)
        assert same_key(cert)
        # Held: later gets do not call the CA.
        assert await mgr.get(ALICE) is cert
        assert mgr.current(ALICE) is cert
        assert len(signer.calls) == 2
        assert mgr.stats().issued == 2


async def test_each_identity_has_its_own_key(autojump_clock: trio.testing.MockClock) -> None:
    async with open_manager(LocalCaSigner(local_ca(ROOT1))) as mgr:
        a = await mgr.get(ALICE)
        b = await mgr.get(BOB)
    assert a.identity == ALICE and b.identity == BOB
    assert a.private_key.private_numbers() != b.private_key.private_numbers()


# -- refresh ----------------------------------------------------------------------


async def test_refresh_at_half_life(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    async with open_manager(signer) as mgr:
        first = await mgr.get(ALICE)
        assert first.refresh_at == EPOCH + dt.timedelta(seconds=HALF_LIFE)
        status = mgr.status(ALICE)
        assert status is not None and status.phase is Phase.SCHEDULED
        assert status.next_attempt_in == pytest.approx(HALF_LIFE)

        await trio.sleep_until(HALF_LIFE - 1)
        assert await mgr.get(ALICE) is first
        await trio.sleep_until(HALF_LIFE + 1)
        second = await mgr.get(ALICE)
        assert second.serial != first.serial
        # The refresh also rotates the key.
        assert second.private_key.private_numbers() != first.private_key.private_numbers()
        assert same_key(second)

        # And again at the new certificate's half-life.
        await trio.sleep_until(2 * HALF_LIFE + 1)
        assert mgr.stats().refreshed == 2
    assert signer.times() == [0.0, HALF_LIFE, 2 * HALF_LIFE]


@pytest.mark.parametrize("u", [0.0, 0.25, 0.5, 0.999])
async def test_refresh_jitter_is_bounded(autojump_clock: trio.testing.MockClock, u: float) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    settings = ManagerSettings(lifetime=HOUR, refresh_jitter=0.01, retry_jitter=0.0)
    async with open_manager(signer, settings, rng=FixedRandom(u)) as mgr:
        await mgr.get(ALICE)
        await trio.sleep(HOUR.total_seconds())
    expected = HALF_LIFE + (2 * u - 1) * 0.01 * LIFETIME_S
    assert signer.times()[1] == pytest.approx(expected, abs=1e-3)


async def test_refresh_jitter_spreads_identities(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    settings = ManagerSettings(lifetime=HOUR, refresh_jitter=0.01)
    identities = [SpiffeId(TD, "shop", f"sa{i}") for i in range(20)]
    async with open_manager(signer, settings, rng=random.Random(7)) as mgr:
        for identity in identities:
            mgr.prefetch(identity)
        await trio.sleep(HOUR.total_seconds() - 100)
    bound = 0.01 * LIFETIME_S
    seconds = [signer.times(i)[1] for i in identities]
    assert all(HALF_LIFE - bound <= t <= HALF_LIFE + bound for t in seconds)
    assert len(set(seconds)) == len(seconds)


def test_refresh_time_is_half_life_plus_bounded_jitter() -> None:
    key = generate_workload_key()
    ca = CertificateAuthority(
        trust_domain=TD,
        signing_cert=ROOT1[1],
        signing_key=ROOT1[0],
        intermediates=[],
        roots=[ROOT1[1]],
        clock=lambda: EPOCH,
    )
    chain = ca.sign_workload(validate_csr(build_csr(key, ALICE)), HOUR).chain_pem
    cert = WorkloadCertificate.from_ca_response(ALICE, key, chain)
    assert refresh_time(cert, 0.5, 0.01) == cert.refresh_at
    assert refresh_time(cert, 0.0, 0.01) == cert.refresh_at - dt.timedelta(seconds=37.2)
    assert refresh_time(cert, 0.7, 0.0) == cert.refresh_at


# -- failures and backoff ----------------------------------------------------------


def test_retry_delay_schedule() -> None:
    assert [retry_delay(n, 0.0) for n in range(1, 13)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        32.0,
        64.0,
        128.0,
        150.0,
        150.0,
        150.0,
    ]
    with pytest.raises(ValueError):
        retry_delay(0, 0.0)


@given(failures=st.integers(1, 10_000), u=st.floats(0.0, 1.0, exclude_max=True))
def test_retry_delay_jitter_is_bounded(failures: int, u: float) -> None:
    nominal = min(150.0, 0.5 * 2.0 ** min(failures - 1, 64))
    delay = retry_delay(failures, u)
    assert 0.8 * nominal - 1e-9 <= delay <= nominal <= 150.0
    assert delay == pytest.approx(nominal * (1 - 0.2 * u))


async def test_retries_are_jittered_below_the_nominal_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    signer.down.append((0.0, 100.0))
    settings = ManagerSettings(lifetime=HOUR, retry_jitter=0.2)
    async with open_manager(signer, settings, rng=FixedRandom(0.5)) as mgr:
        mgr.prefetch(ALICE)
        await trio.sleep(200)
        assert mgr.current(ALICE) is not None
    times = signer.times()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([0.9 * 0.5 * 2**n for n in range(len(gaps))])


def backoff_times(first_failure: float, ca_back: float) -> list[float]:
    """Attempt times from the first failure up to and including the first success."""
    times = [first_failure]
    failures = 0
    while times[-1] < ca_back:
        failures += 1
        times.append(times[-1] + min(150.0, 0.5 * 2 ** (failures - 1)))
    return times


async def test_ca_outage_serves_old_certificate_backs_off_and_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    signer.down.append((1000.0, 5000.0))
    async with open_manager(signer) as mgr:
        first = await mgr.get(ALICE)

        # The refresh at half-life fails; the old certificate is still served.
        await trio.sleep_until(2000)
        assert await mgr.get(ALICE) is first
        status = mgr.status(ALICE)
        assert status is not None
        assert status.phase is Phase.BACKOFF
        assert status.failures == 10
        assert status.last_error is not None and "CA is down" in status.last_error

        # Expired and no replacement: fail closed, without an extra CA call.
        await trio.sleep_until(3600)
        calls_before = len(signer.calls)
        with pytest.raises(CertificateUnavailable, match="expired"):
            await mgr.get(ALICE)
        assert mgr.current(ALICE) is None
        assert len(signer.calls) == calls_before

        # The CA comes back; the next retry gets a fresh certificate.
        expected = [0.0, *backoff_times(HALF_LIFE, 5000.0)]
        recovered_at = expected[-1]
        await trio.sleep_until(recovered_at - 1)
        with pytest.raises(CertificateUnavailable):
            await mgr.get(ALICE)
        await trio.sleep_until(recovered_at + 1)
        second = await mgr.get(ALICE)
        assert second.serial != first.serial
        assert second.is_valid_at(wall())
        status = mgr.status(ALICE)
        assert status is not None and status.failures == 0 and status.last_error is None

        # The backoff is reset: the next CA call is the new certificate's refresh.
        await trio.sleep_until(recovered_at + HALF_LIFE - 10)
    assert signer.times() == pytest.approx(expected)
    # 500 ms doubling, capped at 150 s.
    gaps = [b - a for a, b in itertools.pairwise(expected[1:])]
    assert gaps[:10] == [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150]
    assert set(gaps[9:]) == {150.0}


async def test_expired_without_ca_fails_closed(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    signer.down.append((1.0, float("inf")))
    async with open_manager(signer) as mgr:
        cert = await mgr.get(ALICE)
        await trio.sleep_until(3599)
        assert await mgr.get(ALICE) is cert
        await trio.sleep_until(3600)
        for _ in range(3):
            with pytest.raises(CertificateUnavailable) as info:
                await mgr.get(ALICE)
            assert "CA is down" in str(info.value)
            await trio.sleep(1000)
        assert mgr.current(ALICE) is None


async def test_first_fetch_failure_fails_waiters_and_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)), delay=0.1)
    signer.down.append((0.0, 1.0))
    errors: list[str] = []
    async with open_manager(signer) as mgr:

        async def fetch() -> None:
            with pytest.raises(CertificateUnavailable) as info:
                await mgr.get(ALICE)
            errors.append(str(info.value))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(fetch)
        assert len(errors) == 5
        assert "next attempt in" in errors[0]
        # Backing off without a certificate: fail at once rather than wait.
        with pytest.raises(CertificateUnavailable):
            await mgr.get(ALICE)
        assert trio.current_time() == pytest.approx(0.1)
        await trio.sleep_until(10)
        assert (await mgr.get(ALICE)).identity == ALICE
    # 0 fails (down), 0.1+0.5 fails (down), 0.7+1.0 succeeds.
    assert signer.times() == pytest.approx([0.0, 0.6, 1.7])


class LyingSigner:
    """A real CA that first answers for the wrong identity, then for the wrong key."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.lies = ["identity", "key"]
        self.calls: list[float] = []

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: dt.timedelta) -> list[str]:
        await trio.lowlevel.checkpoint()
        self.calls.append(trio.current_time())
        validated = validate_csr(csr_pem)
        lie = self.lies.pop(0) if self.lies else None
        if lie == "identity":
            return self.ca.sign_workload(ValidatedCsr(validated.csr, MALLORY), lifetime).chain_pem
        if lie == "key":
            other = validate_csr(build_csr(generate_workload_key(), identity))
            return self.ca.sign_workload(other, lifetime).chain_pem
        return self.ca.sign_workload(validated, lifetime).chain_pem


async def test_answer_for_wrong_identity_or_key_is_rejected_and_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = LyingSigner(local_ca(ROOT1))
    with structlog.testing.capture_logs() as logs:
        async with open_manager(signer) as mgr:
            with pytest.raises(CertificateUnavailable, match="was requested"):
                await mgr.get(ALICE)
            await trio.sleep_until(0.6)
            with pytest.raises(CertificateUnavailable, match="different key"):
                await mgr.get(ALICE)
            await trio.sleep_until(1.6)
            cert = await mgr.get(ALICE)
    assert signer.calls == [0.0, 0.5, 1.5]
    assert cert.identity == ALICE
    assert same_key(cert)
    failed = [e for e in logs if e["event"] == "certificate request failed"]
    assert [e["attempt"] for e in failed] == [1, 2]
    assert [e["delay"] for e in failed] == [0.5, 1.0]
    issued = [e for e in logs if e["event"] == "certificate issued"]
    assert len(issued) == 1 and issued[0]["attempt"] == 3
    assert issued[0]["serial"] == f"{cert.serial:x}"


class FlakySigner:
    """Fails its first call in a way the signer contract does not define, or hangs."""

    def __init__(self, inner: CertificateSigner, mode: str) -> None:
        self.inner = inner
        self.mode = mode
        self.calls: list[float] = []

    async def sign(self, csr_pem: bytes, identity: SpiffeId, lifetime: dt.timedelta) -> list[str]:
        self.calls.append(trio.current_time())
        if len(self.calls) == 1:
            if self.mode == "bug":
                raise RuntimeError("boom")
            await trio.sleep_forever()
        return await self.inner.sign(csr_pem, identity, lifetime)


async def test_unexpected_signer_error_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    signer = FlakySigner(LocalCaSigner(local_ca(ROOT1)), "bug")
    async with open_manager(signer) as mgr:
        with pytest.raises(CertificateUnavailable, match="RuntimeError: boom"):
            await mgr.get(ALICE)
        await trio.sleep(1)
        assert (await mgr.get(ALICE)).identity == ALICE
    assert signer.calls == [0.0, 0.5]


async def test_hung_ca_call_times_out_and_is_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = FlakySigner(LocalCaSigner(local_ca(ROOT1)), "hang")
    settings = ManagerSettings(lifetime=HOUR, retry_jitter=0.0, sign_timeout=30.0)
    async with open_manager(signer, settings) as mgr:
        with pytest.raises(CertificateUnavailable, match="did not answer within 30 s"):
            await mgr.get(ALICE)
        await trio.sleep(1)
        assert (await mgr.get(ALICE)).identity == ALICE
    assert signer.calls == [0.0, 30.5]


async def test_wall_clock_jump_past_expiry_refetches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    async with open_manager(signer) as mgr:
        first = await mgr.get(ALICE)
        _wall_offset[0] = 2 * 3600.0  # e.g. the node was suspended
        assert mgr.current(ALICE) is None
        second = await mgr.get(ALICE)
        assert second.serial != first.serial
        assert second.is_valid_at(wall())
    assert len(signer.calls) == 2


# -- priorities and concurrency -----------------------------------------------------


async def test_get_is_served_before_queued_prefetches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)), delay=1.0)
    settings = ManagerSettings(lifetime=HOUR, max_concurrent=1)
    async with open_manager(signer, settings) as mgr:
        for identity in (ALICE, BOB, CAROL, DAVE):
            mgr.prefetch(identity)
        await trio.sleep(0.5)  # ALICE is at the CA, the rest are queued
        assert mgr.stats().queued == 3
        cert = await mgr.get(ERIN)
        assert cert.identity == ERIN
        assert trio.current_time() == 2.0
        await trio.sleep(10)
    assert signer.order() == [ALICE, ERIN, BOB, CAROL, DAVE]
    assert signer.times() == [0.0, 1.0, 2.0, 3.0, 4.0]


async def test_waiting_promotes_a_queued_prefetch(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)), delay=1.0)
    settings = ManagerSettings(lifetime=HOUR, max_concurrent=1)
    async with open_manager(signer, settings) as mgr:
        for identity in (ALICE, BOB, CAROL, DAVE):
            mgr.prefetch(identity)
        await trio.sleep(0.5)
        cert = await mgr.get(CAROL)
        assert cert.identity == CAROL
        assert trio.current_time() == 2.0
        await trio.sleep(10)
    assert signer.order() == [ALICE, CAROL, BOB, DAVE]


async def test_concurrent_ca_calls_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)), delay=1.0)
    identities = [SpiffeId(TD, "shop", f"sa{i}") for i in range(10)]
    settings = ManagerSettings(lifetime=HOUR, max_concurrent=3)
    async with open_manager(signer, settings) as mgr:
        for identity in identities:
            mgr.prefetch(identity)
        await trio.sleep(0.5)
        assert mgr.stats().signing == 3
        await trio.sleep(10)
        assert all(mgr.current(i) is not None for i in identities)
    assert signer.max_inflight == 3
    assert signer.times() == [0.0] * 3 + [1.0] * 3 + [2.0] * 3 + [3.0]


# -- forgetting -------------------------------------------------------------------------


async def test_forget_drops_identity_and_stops_refresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    async with open_manager(signer) as mgr:
        first = await mgr.get(ALICE)
        await mgr.get(BOB)
        mgr.forget(ALICE)
        assert mgr.status(ALICE) is None
        assert mgr.current(ALICE) is None
        assert [s.identity for s in mgr.identities()] == [BOB]
        mgr.forget(ALICE)  # idempotent

        await trio.sleep(3 * 3600)
        assert signer.order().count(ALICE) == 1
        assert signer.order().count(BOB) > 1

        # Asking again starts from scratch, with a new key.
        again = await mgr.get(ALICE)
        assert again.serial != first.serial
        assert again.private_key.private_numbers() != first.private_key.private_numbers()
    assert signer.order().count(ALICE) == 2


async def test_forget_cancels_call_in_flight_and_fails_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)), delay=5.0)
    async with open_manager(signer) as mgr:

        async def wait_for_alice() -> None:
            with pytest.raises(CertificateUnavailable, match="forgotten"):
                await mgr.get(ALICE)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_alice)
            await trio.sleep(1)
            mgr.forget(ALICE)
        assert trio.current_time() == 1.0
        await trio.sleep(1)
        assert signer.cancelled == [ALICE]
        assert mgr.stats().signing == 0
        assert mgr.status(ALICE) is None


async def test_retain_and_release_count_pods(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    async with open_manager(signer) as mgr:
        mgr.retain(ALICE)  # first pod: prefetched without anyone asking
        mgr.retain(ALICE)  # second pod with the same service account
        await trio.sleep(1)
        assert len(signer.calls) == 1
        status = mgr.status(ALICE)
        assert status is not None and status.references == 2 and status.serial is not None
        mgr.release(ALICE)
        assert mgr.current(ALICE) is not None
        mgr.release(ALICE)
        assert mgr.status(ALICE) is None
        mgr.release(ALICE)  # one too many: logged, ignored
        await trio.sleep(2 * 3600)
    assert len(signer.calls) == 1


# -- trust bundle ------------------------------------------------------------------------


async def test_trust_bundle_follows_root_rotation(autojump_clock: trio.testing.MockClock) -> None:
    root1, root2 = ROOT1[1], ROOT2[1]
    rotating = LocalCaSigner(local_ca(ROOT1, extra_roots=(root2,)))  # root-cert.pem: both
    rotated = LocalCaSigner(local_ca(ROOT2))  # old root dropped
    signer = RecordingSigner(rotating)
    observed: list[tuple[float, TrustBundle]] = []

    async with open_manager(signer) as mgr:
        assert mgr.trust_bundle == TrustBundle(0, ())
        await mgr.get(ALICE)  # t=0
        bundle = mgr.trust_bundle
        assert bundle.version == 1
        assert bundle.roots == (root1, root2)
        pem = bundle.pem()
        assert pem.count(b"BEGIN CERTIFICATE") == 2

        await trio.sleep_until(600)
        await mgr.get(BOB)  # same roots: no change, and no duplicates
        assert mgr.trust_bundle is bundle

        signer.inner = rotated

        async def watch() -> None:
            current = bundle
            while True:
                current = await mgr.wait_trust_bundle(current.version)
                observed.append((trio.current_time(), current))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            # ALICE refreshes at 1740 under the new root; BOB still names root1.
            await trio.sleep_until(2000)
            assert observed == []
            alice = await mgr.get(ALICE)
            alice.leaf.verify_directly_issued_by(root2)
            assert alice.roots == (root2,)
            # BOB refreshes at 600 + 1740: root1 is no longer named by anyone.
            await trio.sleep_until(2400)
            nursery.cancel_scope.cancel()

        root2_der = root2.public_bytes(Encoding.DER)
        assert observed == [(600 + HALF_LIFE, TrustBundle(2, (root2_der,)))]
        assert await mgr.wait_trust_bundle(1) == TrustBundle(2, (root2_der,))

        mgr.forget(ALICE)
        mgr.forget(BOB)
        assert mgr.trust_bundle == TrustBundle(3, ())


# -- lifecycle, backends, secrecy -----------------------------------------------------


async def test_get_needs_a_running_manager(autojump_clock: trio.testing.MockClock) -> None:
    mgr = CertificateManager(LocalCaSigner(local_ca(ROOT1)), EXACT, wall_clock=wall)
    mgr.prefetch(ALICE)  # allowed before run: queued
    with pytest.raises(RuntimeError, match="start the CertificateManager"):
        await mgr.get(ALICE)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.run)
        await trio.sleep(1)
        assert mgr.current(ALICE) is not None
        with pytest.raises(RuntimeError, match="only once"):
            await mgr.run()
        nursery.cancel_scope.cancel()
    # Stopped: keys dropped, nothing handed out any more.
    assert mgr.current(ALICE) is None
    assert mgr.identities() == []
    with pytest.raises(CertificateUnavailable, match="stopped"):
        await mgr.get(ALICE)
    with pytest.raises(CertificateUnavailable, match="stopped"):
        await mgr.wait_trust_bundle(5)


async def test_stopping_fails_waiters(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)), delay=100.0)
    mgr = CertificateManager(signer, EXACT, wall_clock=wall)
    failed: list[str] = []

    async def wait_for_alice() -> None:
        with pytest.raises(CertificateUnavailable) as info:
            await mgr.get(ALICE)
        failed.append(str(info.value))

    async with trio.open_nursery() as outer, trio.open_nursery() as inner:
        await inner.start(mgr.run)
        outer.start_soon(wait_for_alice)
        await trio.sleep(1)
        inner.cancel_scope.cancel()
    assert len(failed) == 1 and "stopped" in failed[0]
    assert signer.cancelled == [ALICE]


async def test_open_reraises_the_body_error_unwrapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(KeyError):
        async with open_manager(LocalCaSigner(local_ca(ROOT1))):
            raise KeyError("body")


def test_settings_are_checked() -> None:
    for bad in (
        {"max_concurrent": 0},
        {"lifetime": dt.timedelta(0)},
        {"refresh_jitter": 0.6},
        {"retry_jitter": -0.1},
        {"retry_initial": 200.0},
        {"sign_timeout": 0.0},
    ):
        with pytest.raises(ValueError):
            ManagerSettings(**bad)


async def test_local_signer_refuses_csr_for_another_identity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    csr = build_csr(generate_workload_key(), MALLORY)
    with pytest.raises(InvalidCsr, match="was requested"):
        await LocalCaSigner(local_ca(ROOT1)).sign(csr, ALICE, HOUR)


class FakeCaClient:
    """Stands in for identity.client.CaClient (blocking), backed by a real CA."""

    def __init__(self, ca: CertificateAuthority, gate: threading.Event | None = None) -> None:
        self.ca = ca
        self.gate = gate
        self.calls: list[tuple[bool, dt.timedelta, SpiffeId | None]] = []

    def create_certificate(
        self, csr_pem: bytes, validity: dt.timedelta, impersonate: SpiffeId | None = None
    ) -> list[str]:
        on_main = threading.current_thread() is threading.main_thread()
        self.calls.append((on_main, validity, impersonate))
        if self.gate is not None:
            self.gate.wait(timeout=10)
        return list(self.ca.sign_workload(validate_csr(csr_pem), validity).chain_pem)


def fixed_time_ca() -> CertificateAuthority:
    key, cert = ROOT1
    return CertificateAuthority(
        trust_domain=TD,
        signing_cert=cert,
        signing_key=key,
        intermediates=[],
        roots=[cert],
        clock=lambda: EPOCH,
    )


@pytest.mark.parametrize("impersonate", [True, False])
async def test_ca_client_signer_calls_client_in_a_thread(impersonate: bool) -> None:
    client = FakeCaClient(fixed_time_ca())
    signer = CaClientSigner(client, impersonate=impersonate)
    key = generate_workload_key()
    chain = await signer.sign(build_csr(key, ALICE), ALICE, HOUR)
    assert client.calls == [(False, HOUR, ALICE if impersonate else None)]
    assert WorkloadCertificate.from_ca_response(ALICE, key, chain).identity == ALICE


async def test_manager_with_ca_client_signer() -> None:
    client = FakeCaClient(fixed_time_ca())
    async with CertificateManager.open(
        CaClientSigner(client), ManagerSettings(lifetime=HOUR), wall_clock=lambda: EPOCH
    ) as mgr:
        cert = await mgr.get(ALICE)
    assert cert.identity == ALICE
    assert client.calls == [(False, HOUR, ALICE)]


async def test_ca_client_signer_abandons_a_hung_call_on_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = threading.Event()
    client = FakeCaClient(fixed_time_ca(), gate)
    signer = CaClientSigner(client)
    try:
        with trio.move_on_after(5) as scope:
            await signer.sign(build_csr(generate_workload_key(), ALICE), ALICE, HOUR)
        assert scope.cancelled_caught
    finally:
        gate.set()


@contextmanager
def no_key_material_in(texts: list[str], *keys: ec.EllipticCurvePrivateKey) -> Iterator[None]:
    yield
    blob = "\n".join(texts)
    assert "PRIVATE KEY" not in blob
    for key in keys:
        assert str(key.private_numbers().private_value) not in blob
        assert f"{key.private_numbers().private_value:x}" not in blob


async def test_key_never_in_logs_or_repr(autojump_clock: trio.testing.MockClock) -> None:
    signer = RecordingSigner(LocalCaSigner(local_ca(ROOT1)))
    signer.down.append((1000.0, 1800.0))
    texts: list[str] = []
    with structlog.testing.capture_logs() as logs:
        async with open_manager(signer) as mgr:
            first = await mgr.get(ALICE)
            await trio.sleep_until(2000)
            second = await mgr.get(ALICE)
            texts += [repr(mgr), repr(mgr.identities()), repr(first), repr(second)]
            texts += [repr(e) for e in mgr._entries.values()]
            texts.append(repr(mgr.stats()))
    texts += [repr(e) for e in logs]
    events = {e["event"] for e in logs}
    assert {"certificate issued", "certificate request failed", "certificate refreshed"} <= events
    with no_key_material_in(texts, first.private_key, second.private_key):
        pass
