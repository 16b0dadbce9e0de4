"""MemoryBackend: all or nothing, bounded memory, no lock held across an await."""

from __future__ import annotations

import asyncio
import gc
import os
import statistics
import time
from collections.abc import Sequence

import psutil
import pytest
from asgi_helpers import http_scope

from ratelimit import Concurrency, ConfigError, MemoryBackend, Rule, TokenBucket, Window, keys
from ratelimit.backends.base import (
    Backend,
    BucketCheck,
    Check,
    LeaseCheck,
    StoreKey,
    Verdict,
    nowait_method,
)
from ratelimit.core.engine import Engine


class ManualClock:
    """A clock tests move by hand instead of sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def bucket(caller: str = "c", cost: int = 1, burst: int = 2, interval: float = 1.0) -> BucketCheck:
    return BucketCheck(StoreKey("r", "tb", caller), interval, burst, cost)


def lease(lease_id: str, limit: int = 1, caller: str = "*") -> LeaseCheck:
    return LeaseCheck(StoreKey("r", "cc", caller), limit, 10.0, lease_id)


def test_memory_backend_satisfies_the_protocol() -> None:
    """MemoryBackend is a Backend (runtime-checkable protocol)."""
    assert isinstance(MemoryBackend(), Backend)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_max_keys_must_be_a_positive_integer(bad: object) -> None:
    """A bad max_keys names the field."""
    with pytest.raises(ConfigError, match=r"^max_keys: expected a positive integer"):
        MemoryBackend(max_keys=bad)  # type: ignore[arg-type]


async def test_all_or_nothing_when_the_lease_refuses() -> None:
    """A bucket that would admit consumes nothing when the lease of the same rule refuses."""
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    assert (await b.decide([bucket(), lease("a")])).admitted
    v = await b.decide([bucket(), lease("b")])
    assert not v.admitted
    assert v.results[0].admitted
    assert v.results[0].remaining == 1  # untouched: 1 unit left
    assert not v.results[1].admitted
    # Proof nothing was consumed: one more unit is still there.
    assert (await b.decide([bucket()])).admitted
    assert not (await b.decide([bucket()])).admitted


async def test_all_or_nothing_when_the_bucket_refuses() -> None:
    """A lease that would admit is not taken when the bucket refuses."""
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    assert (await b.decide([bucket(cost=2), lease("a", limit=5)])).admitted
    v = await b.decide([bucket(), lease("b", limit=5)])
    assert not v.admitted
    assert await b.in_use(StoreKey("r", "cc", "*")) == 1
    assert v.results[0].retry_after == pytest.approx(1.0)


async def test_refund_restores_consumed_units_and_leases() -> None:
    """Refund undoes an admitted decision exactly."""
    b = MemoryBackend(clock=ManualClock())
    checks = [bucket(cost=2), lease("a")]
    assert (await b.decide(checks)).admitted
    await b.refund(checks)
    assert await b.in_use(StoreKey("r", "cc", "*")) == 0
    assert (await b.decide([bucket(cost=2)])).admitted


async def test_release_twice_reports_false_and_dead_leases_expire() -> None:
    """release() is True once; a lease not renewed frees its slot after its ttl."""
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    assert (await b.decide([lease("a")])).admitted
    assert await b.release(lease("a"))
    assert not await b.release(lease("a"))
    assert (await b.decide([lease("b")])).admitted
    clock.now += 9.9
    assert await b.renew([lease("b")]) == [True]
    clock.now += 9.9
    assert not (await b.decide([lease("c")])).admitted
    clock.now += 0.2
    assert (await b.decide([lease("c")])).admitted
    assert await b.renew([lease("b")]) == [False]


async def test_full_buckets_are_swept_away() -> None:
    """Buckets back to full carry no information and do not stay in memory."""
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    for i in range(5000):
        await b.decide([bucket(caller=str(i))])
    clock.now += 10  # every bucket is full again
    for i in range(5000, 10000):
        await b.decide([bucket(caller=str(i))])
    assert len(b) < 6000


async def test_key_count_is_capped_with_lru_eviction() -> None:
    """Past max_keys the least recently used bucket goes; the table never grows past the cap."""
    clock = ManualClock()
    b = MemoryBackend(max_keys=100, clock=clock)
    for i in range(1000):
        await b.decide([bucket(caller=str(i), interval=1e6)])
        assert len(b) <= 100
    assert b.evictions == 900


def _seconds_per_decision(b: MemoryBackend, checks: Sequence[BucketCheck]) -> float:
    decide = b.decide_nowait
    started = time.perf_counter()
    for check in checks:
        decide((check,))
    return (time.perf_counter() - started) / len(checks)


@pytest.mark.parametrize("max_keys", [100_000, 50_000], ids=["sweeping", "evicting"])
def test_a_key_flood_costs_at_most_3x_a_steady_decision(max_keys: int) -> None:
    """With 60,000-80,000 distinct live keys held, a decision costs at most 3x a steady one.

    Steady: a few hot callers on a backend of their own (in the flooded one they would
    pay for the flood too: the sweep runs every few writes, whoever writes).
    """
    b = MemoryBackend(max_keys=max_keys)
    quiet = MemoryBackend(max_keys=max_keys)

    def check(caller: str) -> BucketCheck:
        # Admitted every time; non-full for 12 s after each hit, so nothing is swept.
        return BucketCheck(StoreKey("r", "tb", caller), 12.0, 10**9, 1)

    flood = [check(f"{i:032x}") for i in range(80_000)]
    hot = [check(f"hot{i % 8}") for i in range(4_000)]
    for c in flood[:60_000]:
        b.decide_nowait((c,))
    steady, flooded = [], []
    for r in range(5):  # interleaved rounds, the median of each: a shared machine is noisy
        steady.append(_seconds_per_decision(quiet, hot))
        flooded.append(_seconds_per_decision(b, flood[60_000 + r * 4_000 :][:4_000]))
    assert len(b) <= max_keys
    ratio = statistics.median(flooded) / statistics.median(steady)
    assert ratio <= 3.0, f"{ratio:.1f}x the steady state: {flooded} vs {steady}"


@pytest.mark.slow
async def test_a_million_distinct_keys_cannot_grow_memory_without_bound() -> None:
    """1,000,000 distinct callers (an attacker rotating IPs) leave RSS bounded by the cap."""
    clock = ManualClock()
    b = MemoryBackend(max_keys=20_000, clock=clock)
    proc = psutil.Process(os.getpid())
    for i in range(20_000):
        await b.decide([bucket(caller=f"{i:032x}", interval=3600.0)])
    gc.collect()
    rss_full = proc.memory_info().rss
    for i in range(20_000, 1_000_000):
        await b.decide([bucket(caller=f"{i:032x}", interval=3600.0)])
    gc.collect()
    growth = proc.memory_info().rss - rss_full
    assert len(b) <= 20_000
    # 980,000 more keys than the cap: unbounded storage would add hundreds of MB.
    assert growth < 20 * 1024 * 1024, growth


async def test_concurrent_decisions_are_not_serialised_behind_a_lock() -> None:
    """Decisions on one key interleave with other work: decide() never parks on a lock.

    Many decisions run in a gather alongside a task that counts event-loop
    turns; each decision completes without yielding, so none waits for another.
    """
    b = MemoryBackend(clock=ManualClock())
    checks = [bucket(burst=1000, interval=1e-6)]

    async def one() -> bool:
        return (await b.decide(checks)).admitted

    coros = [one() for _ in range(500)]
    # Every coroutine finishes at its first step: no await inside decide() suspends.
    for coro in coros:
        with pytest.raises(StopIteration) as done:
            coro.send(None)
        assert done.value.value is True


async def test_exactly_the_limit_is_admitted_under_concurrency() -> None:
    """N concurrent decisions on one key: exactly `burst` are admitted."""
    b = MemoryBackend(clock=ManualClock())
    results = await asyncio.gather(
        *(b.decide([bucket(burst=7, interval=60.0)]) for _ in range(100))
    )
    assert sum(v.admitted for v in results) == 7


async def test_remaining_counts_only_live_leases() -> None:
    """A dead lease frees its slot in `remaining` as soon as it expires, not only at the limit."""
    clock = ManualClock()
    b = MemoryBackend(clock=clock)
    assert (await b.decide([lease("a", limit=5)])).admitted
    clock.now += 5.0
    assert (await b.decide([lease("b", limit=5)])).results[0].remaining == 3
    clock.now += 5.5  # "a" is dead, "b" lives
    v = await b.decide([lease("c", limit=5)])
    assert v.results[0].remaining == 3
    assert await b.in_use(StoreKey("r", "cc", "*")) == 2


async def test_nowait_twins_answer_exactly_as_the_coroutines() -> None:
    """`decide_nowait`/`release_nowait` (the engine's shortcut) are `decide`/`release`."""
    a, b = MemoryBackend(clock=ManualClock()), MemoryBackend(clock=ManualClock())
    for checks in ([bucket()], [bucket(), lease("x", limit=2)], [lease("y", limit=2)]) * 3:
        assert b.decide_nowait(checks) == await a.decide(checks)
    assert b.release_nowait(lease("x")) == await a.release(lease("x"))
    assert b.release_nowait(lease("x")) == await a.release(lease("x"))


class CountingBackend(MemoryBackend):
    """Overrides the coroutines only, as a test double or a fault injector would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def decide(self, checks: Sequence[Check]) -> Verdict:
        self.calls.append("decide")
        return await super().decide(checks)

    async def release(self, lease: LeaseCheck) -> bool:
        self.calls.append("release")
        return await super().release(lease)


def test_the_shortcut_is_taken_only_where_it_stands_for_the_coroutine() -> None:
    """A subclass or instance overriding `decide`/`release` keeps them called."""
    plain = MemoryBackend()
    assert nowait_method(plain, "decide") == plain.decide_nowait
    assert nowait_method(plain, "release") == plain.release_nowait
    assert nowait_method(CountingBackend(), "decide") is None
    assert nowait_method(CountingBackend(), "release") is None
    patched = MemoryBackend()
    patched.decide = CountingBackend().decide  # type: ignore[method-assign]
    assert nowait_method(patched, "decide") is None
    assert nowait_method(patched, "release") == patched.release_nowait


async def test_the_engine_calls_an_overridden_decide_and_release() -> None:
    """Through the engine, an override of the coroutines sees every decision and release."""
    backend = CountingBackend()
    engine = Engine(
        [Rule("/x", limits=[TokenBucket("5/minute"), Concurrency(2, key=keys.GLOBAL)])], backend
    )
    decision = await engine.decide(engine.rules[0], http_scope("/x"))
    assert decision.grant is not None
    await engine.release(decision.grant)
    assert backend.calls == ["decide", "release"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fixed", "moving", "sliding"])
async def test_window_state_holds_at_most_max_keys(strategy: str) -> None:
    """200,000 distinct Window callers against max_keys=100,000 leave at most 100,000 keys."""
    backend = MemoryBackend(max_keys=100_000)
    rule = Rule("/w", limits=[Window("5/minute", strategy=strategy, key=keys.header("x-k"))])
    engine = Engine([rule], backend)

    def scope(caller: int) -> dict[str, object]:
        return http_scope("/w", headers=[(b"x-k", str(caller).encode())])

    for i in range(200_000):
        assert (await engine.decide(rule, scope(i))).allowed
        if not i % 10_000:
            held = len(backend._windows)
            assert held <= 100_000, held
    held = len(backend._windows)
    assert 99_000 <= held <= 100_000
    assert len(backend) == held
    # The newest callers are the ones kept: the last one has 4 of its 5 hits left.
    assert [(await engine.decide(rule, scope(199_999))).allowed for _ in range(5)] == [
        True,
        True,
        True,
        True,
        False,
    ]
