"""The Backend contract: the same behaviours on every backend.

Each test runs on the memory backend, on a real Redis and on a real 3-master
Redis Cluster; time is a manual clock on all of them (the Redis scripts read
it in place of TIME), so nothing sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from _servers import ManualClockRedisBackend, ManualClockRedisClusterBackend

from ratelimit.algorithms.leases import weighted_id
from ratelimit.backends.base import (
    Backend,
    BucketCheck,
    Check,
    LeaseCheck,
    StoreKey,
    WindowCheck,
)
from ratelimit.backends.memory import MemoryBackend

#: The backends every contract test runs on.
BACKENDS = ["memory", "redis", "redis-cluster"]

#: Redis runs on an epoch-scale clock (as TIME is), memory on a monotonic-scale one.
REDIS_EPOCH_US = 1_760_000_000_000_000
MEMORY_START_S = 1000.0

USER = StoreKey("api", "per-key", "0123456789abcdef0123456789abcdef")
OTHER = StoreKey("api", "per-key", "fedcba9876543210fedcba9876543210")
BURST = StoreKey("api", "burst", "0123456789abcdef0123456789abcdef")
SLOTS = StoreKey("api", "inflight", "*")
WIN = StoreKey("api", "window", "0123456789abcdef0123456789abcdef")
WIN2 = StoreKey("api", "window", "fedcba9876543210fedcba9876543210")


@dataclass
class Env:
    """A backend under test and the manual clock it runs on."""

    backend: Backend = field(init=False)
    micros: int = 0
    _redis: ManualClockRedisBackend | ManualClockRedisClusterBackend | None = None
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def advance(self, seconds: float) -> None:
        """Move the backend's clock forward."""
        self.micros += round(seconds * 1_000_000)
        if self._redis is not None:
            await self._redis.set_time(REDIS_EPOCH_US + self.micros)

    def memory_clock(self) -> float:
        return MEMORY_START_S + self.micros / 1_000_000

    def lease(
        self, limit: int = 2, ttl: float = 10.0, key: StoreKey = SLOTS, weight: int = 0
    ) -> LeaseCheck:
        """A new lease check with a fresh id; of a weighted pool when `weight` > 0."""
        lease_id = f"lease-{next(self._ids)}"
        return LeaseCheck(key, limit, ttl, weighted_id(lease_id, weight) if weight else lease_id)


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    if request.param == "memory":
        env = Env()
        env.backend = MemoryBackend(clock=env.memory_clock)
        yield env
        await env.backend.aclose()
        return
    backend: ManualClockRedisBackend | ManualClockRedisClusterBackend
    if request.param == "redis-cluster":
        backend = ManualClockRedisClusterBackend(request.getfixturevalue("redis_cluster_url"))
    else:
        backend = ManualClockRedisBackend(request.getfixturevalue("redis_url"))
    env = Env(_redis=backend)
    env.backend = backend
    await env.advance(0)
    try:
        yield env
    finally:
        await backend.aclose()


def bucket(
    key: StoreKey = USER, cost: int = 1, interval: float = 1.0, burst: int = 3
) -> BucketCheck:
    return BucketCheck(key, interval, burst, cost)


async def remaining(env: Env, check: BucketCheck) -> int:
    """Units left in `check`'s bucket, by a cost-0 peek."""
    verdict = await env.backend.decide([BucketCheck(check.key, check.interval, check.burst, 0)])
    return verdict.results[0].remaining


async def test_is_a_backend(env: Env) -> None:
    """Every backend satisfies the runtime-checkable protocol."""
    assert isinstance(env.backend, Backend)


async def test_bucket_admits_burst_then_refuses_with_exact_remaining(env: Env) -> None:
    """An idle bucket admits `burst` unit requests back to back, counting down exactly."""
    seen = []
    for _ in range(4):
        verdict = await env.backend.decide([bucket()])
        seen.append((verdict.admitted, verdict.results[0].remaining))
    assert seen == [(True, 2), (True, 1), (True, 0), (False, 0)]


async def test_refused_bucket_says_when_to_retry(env: Env) -> None:
    """A refusal's retry_after is the time until the cost fits; after it, the request admits."""
    check = bucket(cost=2, interval=0.5, burst=2)
    assert (await env.backend.decide([check])).admitted
    refused = (await env.backend.decide([check])).results[0]
    assert not refused.admitted
    assert refused.retry_after == pytest.approx(1.0)
    assert refused.reset_after == pytest.approx(1.0)
    await env.advance(0.999)
    assert not (await env.backend.decide([check])).admitted
    await env.advance(0.001)
    assert (await env.backend.decide([check])).admitted


async def test_bucket_refills_one_unit_per_interval(env: Env) -> None:
    """Capacity comes back at one unit per interval, never above burst."""
    for _ in range(3):
        await env.backend.decide([bucket()])
    await env.advance(1.0)
    assert await remaining(env, bucket()) == 1
    await env.advance(10.0)
    assert await remaining(env, bucket()) == 3


async def test_reset_after_is_time_until_full(env: Env) -> None:
    """reset_after counts the time until the bucket is full again."""
    result = (await env.backend.decide([bucket(cost=2, interval=0.25, burst=4)])).results[0]
    assert result.reset_after == pytest.approx(0.5)


async def test_cost_zero_peeks_without_consuming(env: Env) -> None:
    """A cost-0 check admits and takes nothing."""
    for _ in range(5):
        assert (await env.backend.decide([bucket(cost=0)])).admitted
    assert await remaining(env, bucket()) == 3


async def test_cost_above_burst_is_never_admitted(env: Env) -> None:
    """A request bigger than the bucket is refused even when the bucket is full."""
    verdict = await env.backend.decide([bucket(cost=4)])
    assert not verdict.admitted
    assert verdict.results[0].remaining == 3


async def test_callers_do_not_share_buckets(env: Env) -> None:
    """Spending one caller's bucket leaves another caller's full."""
    for _ in range(3):
        await env.backend.decide([bucket(USER)])
    assert not (await env.backend.decide([bucket(USER)])).admitted
    assert (await env.backend.decide([bucket(OTHER)])).admitted


async def test_refused_verdict_consumes_nothing(env: Env) -> None:
    """If one check refuses, no check consumes: the others' state is untouched."""
    for _ in range(3):
        await env.backend.decide([bucket(BURST)])
    lease = env.lease()
    verdict = await env.backend.decide([bucket(USER), lease, bucket(BURST)])
    assert not verdict.admitted
    assert [r.admitted for r in verdict.results] == [True, True, False]
    assert await remaining(env, bucket(USER)) == 3
    assert await env.backend.in_use(SLOTS) == 0
    assert not await env.backend.release(lease)


async def test_refused_verdict_reports_untouched_state(env: Env) -> None:
    """Checks that would admit in a refused verdict count no cost and no new lease."""
    await env.backend.decide([bucket(USER)])
    await env.backend.decide([env.lease()])
    verdict = await env.backend.decide([bucket(USER), env.lease(), bucket(BURST, cost=9)])
    user, lease, burst = verdict.results
    assert (user.remaining, user.retry_after) == (2, 0.0)
    assert user.reset_after == pytest.approx(1.0)
    assert (lease.admitted, lease.remaining) == (True, 1)
    assert not burst.admitted


async def test_admitted_verdict_consumes_every_check(env: Env) -> None:
    """When all admit, all consume: units taken and the lease held."""
    lease = env.lease()
    verdict = await env.backend.decide([bucket(USER, cost=2), lease])
    assert verdict.admitted
    assert [r.remaining for r in verdict.results] == [1, 1]
    assert await remaining(env, bucket(USER)) == 1
    assert await env.backend.in_use(SLOTS) == 1


async def test_lease_limit_holds(env: Env) -> None:
    """At most `limit` leases are live; the next is refused with no free slot."""
    results = [(await env.backend.decide([env.lease(limit=2)])).results[0] for _ in range(3)]
    assert [(r.admitted, r.remaining) for r in results] == [(True, 1), (True, 0), (False, 0)]
    assert await env.backend.in_use(SLOTS) == 2


async def test_concurrent_decisions_admit_exactly_the_limit(env: Env) -> None:
    """Many concurrent decisions on one key admit exactly what the limits allow."""
    buckets = await asyncio.gather(*(env.backend.decide([bucket(burst=5)]) for _ in range(20)))
    leases = await asyncio.gather(*(env.backend.decide([env.lease(limit=4)]) for _ in range(20)))
    assert sum(v.admitted for v in buckets) == 5
    assert sum(v.admitted for v in leases) == 4
    assert await env.backend.in_use(SLOTS) == 4


async def test_release_frees_the_slot_exactly_once(env: Env) -> None:
    """release answers True once, then False; the slot is free again."""
    lease = env.lease(limit=1)
    assert (await env.backend.decide([lease])).admitted
    assert not (await env.backend.decide([env.lease(limit=1)])).admitted
    assert await env.backend.release(lease) is True
    assert await env.backend.release(lease) is False
    assert (await env.backend.decide([env.lease(limit=1)])).admitted


async def test_release_of_unknown_lease_is_false(env: Env) -> None:
    """Releasing a lease that was never granted answers False."""
    assert await env.backend.release(env.lease()) is False


async def test_renew_extends_live_leases(env: Env) -> None:
    """A renewed lease lives `ttl` past the renewal, not past its grant."""
    lease = env.lease(limit=1, ttl=10.0)
    await env.backend.decide([lease])
    await env.advance(8.0)
    assert await env.backend.renew([lease]) == [True]
    await env.advance(8.0)
    assert await env.backend.in_use(SLOTS) == 1
    assert not (await env.backend.decide([env.lease(limit=1)])).admitted


async def test_renew_reports_lost_leases(env: Env) -> None:
    """renew answers per lease, False for one released or expired."""
    live, released, expired = env.lease(limit=3, ttl=10.0), env.lease(limit=3), env.lease(limit=3)
    other = env.lease(limit=3, ttl=10.0, key=StoreKey("api", "inflight", USER.caller))
    await env.backend.decide([live])
    await env.backend.decide([released])
    await env.backend.decide([other])
    await env.backend.release(released)
    assert await env.backend.renew([live, released, expired, other]) == [True, False, False, True]


async def test_dead_leases_expire_and_free_their_slots(env: Env) -> None:
    """A lease not renewed within its ttl is dead: its slot is free, renew says False."""
    crashed = env.lease(limit=1, ttl=2.0)
    assert (await env.backend.decide([crashed])).admitted
    await env.advance(1.999)
    assert not (await env.backend.decide([env.lease(limit=1)])).admitted
    await env.advance(0.001)
    assert await env.backend.in_use(SLOTS) == 0
    assert (await env.backend.decide([env.lease(limit=1)])).admitted
    assert await env.backend.renew([crashed]) == [False]


@pytest.mark.parametrize(
    "env",
    [
        "memory",
        "redis",
        "redis-cluster",
    ],
    indirect=True,
)
async def test_release_of_expired_lease_is_false(env: Env) -> None:
    """A lease that expired was not held any more: releasing it answers False."""
    lease = env.lease(limit=1, ttl=2.0)
    await env.backend.decide([lease])
    await env.advance(3.0)
    assert await env.backend.release(lease) is False


async def test_refund_gives_back_units_and_leases(env: Env) -> None:
    """refund undoes an admitted decide: units return and leases are released."""
    lease = env.lease(limit=1)
    checks: list[Check] = [bucket(USER, cost=2), lease]
    assert (await env.backend.decide(checks)).admitted
    await env.backend.refund(checks)
    assert await remaining(env, bucket(USER)) == 3
    assert await env.backend.in_use(SLOTS) == 0
    assert await env.backend.release(lease) is False


async def test_refund_after_refill_never_overfills(env: Env) -> None:
    """A refund after the bucket refilled leaves it full, not above burst."""
    checks = [bucket(USER, cost=2)]
    await env.backend.decide(checks)
    await env.advance(1.5)
    await env.backend.refund(checks)
    assert await remaining(env, bucket(USER)) == 3
    for _ in range(3):
        assert (await env.backend.decide([bucket(USER)])).admitted
    assert not (await env.backend.decide([bucket(USER)])).admitted


async def test_empty_decide_admits(env: Env) -> None:
    """No checks: nothing to refuse."""
    verdict = await env.backend.decide([])
    assert verdict.admitted
    assert verdict.results == ()


def window(strategy: str, cost: int = 1, limit: int = 2, key: StoreKey = WIN) -> WindowCheck:
    """A window check of `limit` units per minute, with a fresh receipt."""
    return WindowCheck(key, limit, 60.0, strategy, cost, [])


STRATEGIES = pytest.mark.parametrize("strategy", ["fixed", "sliding", "moving"])


@STRATEGIES
async def test_window_admits_its_limit_per_period(env: Env, strategy: str) -> None:
    """A window admits `limit` units, refuses the next, and admits again a period later."""
    seen = []
    for _ in range(3):
        verdict = await env.backend.decide([window(strategy)])
        seen.append((verdict.admitted, verdict.results[0].remaining))
    assert seen == [(True, 1), (True, 0), (False, 0)]
    refused = (await env.backend.decide([window(strategy)])).results[0]
    assert refused.retry_after > 0
    await env.advance(120.0)
    assert (await env.backend.decide([window(strategy)])).admitted


@STRATEGIES
async def test_window_and_bucket_are_all_or_nothing(env: Env, strategy: str) -> None:
    """A window refusal takes nothing from the bucket; a bucket refusal nothing from the window."""
    full = window(strategy, limit=1)
    assert (await env.backend.decide([full])).admitted
    verdict = await env.backend.decide([bucket(), window(strategy, limit=1)])
    assert [r.admitted for r in verdict.results] == [True, False]
    assert await remaining(env, bucket()) == 3
    for _ in range(3):
        await env.backend.decide([bucket(BURST)])
    other = window(strategy, key=WIN2)
    verdict = await env.backend.decide([other, bucket(BURST)])
    assert not verdict.admitted
    assert verdict.results[0].remaining == 2  # the untouched window
    assert (await env.backend.decide([window(strategy, cost=0, key=WIN2)])).results[
        0
    ].remaining == 2


@STRATEGIES
async def test_window_refund_gives_the_units_back(env: Env, strategy: str) -> None:
    """A refund of an admitted decide puts the window (and bucket) back as they were."""
    checks: list[Check] = [window(strategy, cost=2), bucket()]
    assert (await env.backend.decide(checks)).admitted
    assert not (await env.backend.decide([window(strategy)])).admitted
    await env.backend.refund(checks)
    peek = (await env.backend.decide([window(strategy, cost=0)])).results[0]
    assert (peek.remaining, peek.reset_after) == (2, 0.0)
    assert await remaining(env, bucket()) == 3
    await env.backend.refund([window(strategy)])  # took nothing (no receipt): nothing to undo


async def test_fixed_window_refund_after_the_window_closed_gives_nothing(env: Env) -> None:
    """Units go back to the window they were taken from, never to a later one."""
    first = window("fixed", cost=2)
    assert (await env.backend.decide([first])).admitted
    await env.advance(61.0)
    assert (await env.backend.decide([window("fixed", cost=2)])).admitted
    await env.backend.refund([first])
    assert not (await env.backend.decide([window("fixed")])).admitted


@STRATEGIES
async def test_concurrent_decisions_on_one_window_admit_exactly_the_limit(
    env: Env, strategy: str
) -> None:
    """40 concurrent decisions on a window of 7 (with a bucket beside it) admit exactly 7."""
    verdicts = await asyncio.gather(
        *(
            env.backend.decide([window(strategy, limit=7), bucket(OTHER, burst=100)])
            for _ in range(40)
        )
    )
    assert sum(v.admitted for v in verdicts) == 7
    assert await remaining(env, bucket(OTHER, burst=100)) == 93


# -- weighted slots ----------------------------------------------------------------------


async def test_weighted_lease_needs_its_weight_in_free_slots(env: Env) -> None:
    """In a pool of 8 holding 4 + 3, a lease of 2 is refused and one of 1 takes the last."""
    assert (await env.backend.decide([env.lease(8, weight=4)])).results[0].remaining == 4
    assert (await env.backend.decide([env.lease(8, weight=3)])).results[0].remaining == 1
    refused = await env.backend.decide([env.lease(8, weight=2)])
    assert (refused.admitted, refused.results[0].remaining) == (False, 0)
    assert (await env.backend.decide([env.lease(8, weight=1)])).results[0].remaining == 0
    assert await env.backend.in_use(SLOTS) == 8


async def test_weighted_lease_is_all_or_nothing(env: Env) -> None:
    """A weighted lease that does not fit takes nothing from the bucket beside it, and a
    bucket that refuses adds no weighted lease; the untouched state is reported."""
    await env.backend.decide([env.lease(8, weight=6)])
    verdict = await env.backend.decide([bucket(USER), env.lease(8, weight=3)])
    assert [r.admitted for r in verdict.results] == [True, False]
    assert await remaining(env, bucket(USER)) == 3
    for _ in range(3):
        await env.backend.decide([bucket(BURST)])
    verdict = await env.backend.decide([env.lease(8, weight=2), bucket(BURST)])
    assert [(r.admitted, r.remaining) for r in verdict.results] == [(True, 2), (False, 0)]
    assert await env.backend.in_use(SLOTS) == 6


async def test_weighted_leases_give_back_their_weight(env: Env) -> None:
    """Released, refunded or expired, a lease of weight w frees w slots."""
    released, refunded = env.lease(8, weight=3), env.lease(8, weight=2)
    expiring = env.lease(8, ttl=2.0, weight=3)
    for lease in (released, refunded, expiring):
        assert (await env.backend.decide([lease])).admitted
    assert await env.backend.in_use(SLOTS) == 8
    assert await env.backend.release(released) is True
    assert await env.backend.in_use(SLOTS) == 5
    await env.backend.refund([refunded])
    assert await env.backend.in_use(SLOTS) == 3
    await env.advance(2.0)
    assert await env.backend.in_use(SLOTS) == 0
    assert (await env.backend.decide([env.lease(8, weight=8)])).admitted


async def test_concurrent_weighted_decisions_never_exceed_the_pool(env: Env) -> None:
    """Concurrent leases of mixed weights on a pool of 8 hold at most 8 slots."""
    weights = [1, 4, 2, 3, 1, 4, 2, 1, 3, 4] * 3
    checks = [env.lease(8, weight=w) for w in weights]
    verdicts = await asyncio.gather(*(env.backend.decide([c]) for c in checks))
    held = sum(c.weight for c, v in zip(checks, verdicts, strict=True) if v.admitted)
    assert held <= 8
    assert await env.backend.in_use(SLOTS) == held
