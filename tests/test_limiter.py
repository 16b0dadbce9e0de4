"""`Limiter`: the core without HTTP — check, peek, acquire, statistics, overrides, failures.

Run on the memory backend, a real redis-server and (acquire/check) a real
3-master Redis Cluster.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import free_port
from asgi_helpers import eventually
from prometheus_client import CollectorRegistry

from ratelimit import (
    BackendError,
    Concurrency,
    ConfigError,
    Limiter,
    LimitStatistics,
    MemoryBackend,
    Metrics,
    RateLimited,
    RateLimitError,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit.backends.base import Backend

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["memory", "redis", "redis-cluster"]


def quota(rate: str = "3/minute", **kw: Any) -> Rule:
    """A per-caller token bucket named `quota`."""
    return Rule("/chat", name="chat", limits=[TokenBucket(rate, key=keys.header("x-key"))], **kw)


def pool(slots: int = 2, **kw: Any) -> Rule:
    """A global pool of `slots` named `jobs`, with a per-caller quota before it."""
    return Rule(
        "/jobs",
        name="jobs",
        limits=[
            TokenBucket("100/second", key=keys.header("x-key"), name="per-key"),
            Concurrency(slots, key=keys.GLOBAL, name="gpu", **kw),
        ],
    )


def make_backend(kind: str, request: pytest.FixtureRequest) -> Backend:
    if kind == "memory":
        return MemoryBackend()
    if kind == "redis-cluster":
        return RedisBackend(request.getfixturevalue("redis_cluster_url"), cluster=True)
    return RedisBackend(request.getfixturevalue("redis_url"))


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind != "memory":
        request.applymarker(pytest.mark.redis)
    return kind


@pytest.fixture
async def limiter(backend_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    line = Rule("/line", name="line", limits=[Concurrency(1, queue=4, timeout=10.0)])
    rules = [quota(), pool(2), line]
    async with Limiter(rules=rules, backend=make_backend(backend_kind, request)) as lim:
        yield lim


async def in_flight(limiter: Limiter, rule: str = "jobs") -> int:
    return sum(s.in_flight for s in await limiter.statistics(rule, key="x"))


async def waiting(limiter: Limiter, rule: str = "line") -> int:
    return sum(s.waiting for s in await limiter.statistics(rule))


# -- check and peek -------------------------------------------------------------------


async def test_check_consumes_when_allowed_and_refuses_with_retry_after(limiter: Limiter) -> None:
    """Three of a 3/minute quota are admitted, each taking one; the fourth is a 429 value."""
    remaining = []
    for _ in range(3):
        decision = await limiter.check("chat", key="alice")
        assert decision.allowed
        remaining.append(decision.states[0].remaining)
    assert remaining == [2, 1, 0]
    refused = await limiter.check("chat", key="alice")
    assert (refused.allowed, refused.status, refused.violated) == (False, 429, ["token-bucket"])
    assert 0 < refused.retry_after <= 20
    assert (await limiter.check("chat", key="bob")).allowed  # another caller, another bucket


async def test_check_takes_the_cost_given(limiter: Limiter) -> None:
    """`cost=` units are taken from the bucket; a cost over what is left is refused whole."""
    assert (await limiter.check("chat", key="alice", cost=2)).states[0].remaining == 1
    refused = await limiter.check("chat", key="alice", cost=2)
    assert not refused.allowed
    assert (await limiter.check("chat", key="alice")).allowed  # the refusal took nothing


@pytest.mark.parametrize("backend_kind", ["memory", "redis"], indirect=True)
async def test_peek_consumes_nothing_and_answers_as_check_would(limiter: Limiter) -> None:
    """Peeking any number of times leaves the quota whole; its answer matches check's."""
    for _ in range(5):
        peeked = await limiter.peek("chat", key="alice")
        assert (peeked.allowed, peeked.states[0].remaining) == (True, 3)
    assert not (await limiter.peek("chat", key="alice", cost=4)).allowed  # over the burst
    for _ in range(3):
        assert (await limiter.check("chat", key="alice")).allowed
    peeked = await limiter.peek("chat", key="alice")
    refused = await limiter.check("chat", key="alice")
    assert (peeked.allowed, peeked.status) == (False, 429)
    assert peeked.retry_after == pytest.approx(refused.retry_after, abs=0.5)


@pytest.mark.parametrize("backend_kind", ["memory", "redis"], indirect=True)
@pytest.mark.parametrize("strategy", ["fixed", "moving", "sliding"])
async def test_peek_at_a_window_consumes_nothing(
    backend_kind: str, strategy: str, request: pytest.FixtureRequest
) -> None:
    """A window peeked at stays whole; once spent, peek says refused with the wait."""
    rule = Rule("/w", name="w", limits=[Window("3/minute", strategy=strategy, key=keys.GLOBAL)])
    async with Limiter(rules=[rule], backend=make_backend(backend_kind, request)) as limiter:
        assert [(await limiter.peek("w")).states[0].remaining for _ in range(3)] == [3, 3, 3]
        assert [(await limiter.check("w")).allowed for _ in range(4)] == [True] * 3 + [False]
        peeked = await limiter.peek("w")
        assert not peeked.allowed
        assert 0 < peeked.retry_after <= 60


async def test_check_and_peek_refuse_rules_with_slots(limiter: Limiter) -> None:
    """A slot must be given back: check and peek name acquire for rules with Concurrency."""
    with pytest.raises(ConfigError, match=r"^rule: expected a rule without Concurrency.*acquire"):
        await limiter.check("jobs", key="alice")
    with pytest.raises(ConfigError, match=r"^rule: "):
        await limiter.peek("jobs", key="alice")


async def test_keys_given_by_the_caller_are_checked() -> None:
    """A per-caller limit without a key is an error naming it; a mapping keys limits by name."""
    async with Limiter(rules=[quota(), pool(2)]) as limiter:
        with pytest.raises(
            ConfigError, match=r"^key: expected a key for the per-caller limits \['token-bucket'\]"
        ):
            await limiter.check("chat")
        with pytest.raises(ConfigError, match=r"^key\['nope'\]: expected a limit of rule 'chat'"):
            await limiter.check("chat", key={"nope": "alice"})
        with pytest.raises(ConfigError, match=r"^rule: expected the name of a rule"):
            await limiter.check("nope", key="alice")
        for bad in (0, -1, 2**53 + 1):  # the range a cost must be in, whatever was wrong
            with pytest.raises(ConfigError, match=r"^cost: expected an integer from 1 to 2\*\*53"):
                await limiter.check("chat", key="alice", cost=bad)
        for _ in range(3):
            assert (await limiter.check("chat", key={"token-bucket": "alice"})).allowed
        assert not (await limiter.check("chat", key="alice")).allowed  # one key, two spellings
        exempt = await limiter.check("chat", key={"token-bucket": None})
        assert exempt.allowed
        assert exempt.states[0].exempt


# -- acquire --------------------------------------------------------------------------


async def test_acquire_holds_a_slot_of_the_global_pool_whoever_the_caller(
    limiter: Limiter,
) -> None:
    """Two slots: two callers hold them; a third caller is refused with RateLimited (503)."""
    async with limiter.acquire("jobs", key="alice") as first:
        assert first.allowed
        assert first.grant is not None
        async with limiter.acquire("jobs", key="bob"):
            assert await in_flight(limiter) == 2
            with pytest.raises(RateLimited) as refused:
                async with limiter.acquire("jobs", key="carol"):
                    pytest.fail("a refused acquire must not run its block")
    error = refused.value
    assert isinstance(error, RateLimitError)
    assert error.decision.status == 503
    assert error.decision.violated == ["gpu"]
    assert error.retry_after == error.decision.retry_after > 0
    assert await in_flight(limiter) == 0


async def test_acquire_releases_when_the_block_raises(limiter: Limiter) -> None:
    """An exception inside the block propagates and the slot comes back."""
    with pytest.raises(KeyError):
        async with limiter.acquire("jobs", key="alice"):
            raise KeyError("job failed")
    assert await _eventually_async(lambda: in_flight(limiter), 0)


async def test_acquire_releases_when_cancelled_while_holding(limiter: Limiter) -> None:
    """A task cancelled inside the block gives its slot back."""
    holding = asyncio.Event()

    async def job() -> None:
        async with limiter.acquire("jobs", key="alice"):
            holding.set()
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(job())
    await holding.wait()
    assert await in_flight(limiter) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _eventually_async(lambda: in_flight(limiter), 0)


async def test_acquire_waits_in_line_and_runs_when_a_slot_frees(limiter: Limiter) -> None:
    """A full pool with a line: the caller waits in it, then holds the freed slot."""
    release = asyncio.Event()

    async def holder() -> None:
        async with limiter.acquire("line", key="alice"):
            await release.wait()

    first = asyncio.ensure_future(holder())
    await _eventually_async(lambda: in_flight(limiter, "line"), 1)
    second = asyncio.ensure_future(_acquired(limiter, "line"))
    assert await _eventually_async(lambda: waiting(limiter), 1)
    release.set()
    decision = await second
    assert decision.allowed
    assert decision.waited is not None
    assert decision.line == "concurrency"
    await first


async def test_acquire_cancelled_while_waiting_leaves_the_line(limiter: Limiter) -> None:
    """Cancelled in line: it leaves the line, holds nothing, and the holder is untouched."""
    async with limiter.acquire("line", key="alice"):
        task = asyncio.ensure_future(_acquired(limiter, "line"))
        assert await _eventually_async(lambda: waiting(limiter), 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _eventually_async(lambda: waiting(limiter), 0)
        assert await in_flight(limiter, "line") == 1
    assert await _eventually_async(lambda: in_flight(limiter, "line"), 0)


async def test_acquire_priority_orders_the_line() -> None:
    """A "paid" waiter that came later gets the freed slot before a "free" one."""
    gpu = Concurrency(
        1, queue=4, timeout=10.0, priority=lambda scope: None, classes=["paid", "free"]
    )
    async with Limiter(rules=[Rule("/g", name="g", limits=[gpu])]) as limiter:
        order: list[str] = []

        async def wait(cls: str) -> None:
            async with limiter.acquire("g", priority=cls):
                order.append(cls)

        async with limiter.acquire("g", priority="free"):
            free = asyncio.ensure_future(wait("free"))
            assert await _eventually_async(lambda: waiting(limiter, "g"), 1)
            paid = asyncio.ensure_future(wait("paid"))
            assert await _eventually_async(lambda: waiting(limiter, "g"), 2)
        await asyncio.gather(free, paid)
        assert order == ["paid", "free"]
        with pytest.raises(
            ConfigError, match=r"^priority: expected a class of limit 'concurrency'"
        ):
            async with limiter.acquire("g", priority="gold"):
                pass


async def test_acquire_timeout_refuses_after_waiting_that_long(limiter: Limiter) -> None:
    """`timeout=` bounds the wait: RateLimited with reason queue_timeout, nothing held."""
    async with limiter.acquire("line", key="alice"):
        with pytest.raises(RateLimited) as refused:
            async with limiter.acquire("line", key="bob", timeout=0.2):
                pytest.fail("timed out: must not run")
    assert refused.value.decision.reason == "queue_timeout"
    assert await _eventually_async(lambda: in_flight(limiter, "line"), 0)


@pytest.mark.parametrize("backend_kind", ["memory", "redis"], indirect=True)
async def test_statistics_are_a_frozen_record_per_concurrency_limit(limiter: Limiter) -> None:
    """statistics() names each concurrency limit with its total, in-flight and waiting counts."""
    async with limiter.acquire("jobs", key="alice"):
        stats = await limiter.statistics("jobs")
    assert stats == (LimitStatistics("jobs", "gpu", 2, 1, 0),)
    with pytest.raises(AttributeError):
        stats[0].in_flight = 5  # type: ignore[misc]


@pytest.mark.redis
async def test_statistics_and_slots_are_fleet_wide_on_redis(redis_url: str) -> None:
    """A slot held through one Limiter is seen, and counted against, by another on the Redis."""
    async with (
        Limiter(rules=[pool(1)], backend=RedisBackend(redis_url)) as one,
        Limiter(rules=[pool(1)], backend=RedisBackend(redis_url)) as other,
        one.acquire("jobs", key="alice"),
    ):
        assert [s.in_flight for s in await other.statistics("jobs")] == [1]
        with pytest.raises(RateLimited):
            async with other.acquire("jobs", key="bob"):
                pass


# -- overrides ------------------------------------------------------------------------


async def test_an_override_to_one_slot_is_followed_by_acquire() -> None:
    """The operator sets 1 slot: the next acquires run one at a time (the issue's complaint)."""
    async with Limiter(rules=[pool(6)]) as limiter:
        await limiter.overrides.set("jobs", "gpu", slots=1, until_cleared=True)
        async with limiter.acquire("jobs", key="a"):
            with pytest.raises(RateLimited):
                async with limiter.acquire("jobs", key="b"):
                    pass
        assert await limiter.statistics("jobs") == (LimitStatistics("jobs", "gpu", 1, 0, 0),)


@pytest.mark.redis
async def test_an_override_set_elsewhere_is_followed_by_another_limiter(redis_url: str) -> None:
    """One slot set through one Limiter on Redis: another Limiter on it runs 1 job, not 6."""
    async with (
        Limiter(rules=[pool(6)], backend=RedisBackend(redis_url)) as operator,
        Limiter(rules=[pool(6)], backend=RedisBackend(redis_url)) as worker,
    ):
        await operator.overrides.set("jobs", "gpu", slots=1, until_cleared=True)
        await eventually(lambda: worker.engine.rules[0].limits[1].limit == 1, timeout=5)
        assert await _max_running(worker, 6) == 1


@pytest.mark.redis
async def test_an_override_set_with_the_cli_is_followed(redis_url: str) -> None:
    """`ratelimit override set jobs gpu --limit 1`: a running Limiter runs 1 job at a time."""
    async with Limiter(rules=[pool(6)], backend=RedisBackend(redis_url)) as worker:
        await worker.overrides._report()  # what the CLI checks the override against
        environ = {**os.environ, "RATELIMIT_REDIS_URL": redis_url}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ratelimit", "override", "set", "jobs", "gpu",
            "--limit", "1", "--until-cleared", env=environ, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        await eventually(lambda: worker.engine.rules[0].limits[1].limit == 1, timeout=5)
        assert await _max_running(worker, 6) == 1


# -- failures, metrics, middleware ----------------------------------------------------


def dead_backend() -> RedisBackend:
    """A Redis backend whose server is not there: every call fails at once."""
    return RedisBackend(f"redis://127.0.0.1:{free_port()}/0")


@pytest.mark.redis
async def test_fail_policies_apply_to_check_and_acquire() -> None:
    """open admits, closed refuses (RateLimited 503, the backend error as cause), local
    decides in this process."""
    opened = Limiter(rules=[pool(2)], backend=dead_backend(), fail="open")
    async with opened, opened.acquire("jobs", key="a") as decision:
        assert decision.reason == "failed_open"
        assert decision.grant is None
    async with Limiter(rules=[quota(), pool(2)], backend=dead_backend(), fail="closed") as closed:
        assert not (await closed.check("chat", key="a")).allowed
        with pytest.raises(RateLimited) as refused:
            async with closed.acquire("jobs", key="a"):
                pass
        assert refused.value.decision.status == 503
        assert isinstance(refused.value.__cause__, BackendError)
    async with Limiter(rules=[pool(1)], backend=dead_backend(), fail="local") as local:
        async with local.acquire("jobs", key="a") as decision:
            assert decision.grant is not None
            assert len(local.local_engine().holding.held) == 1
            with pytest.raises(RateLimited):
                async with local.acquire("jobs", key="b"):
                    pass
        assert len(local.local_engine().holding.held) == 0


async def test_metrics_count_limiter_decisions_as_requests() -> None:
    """The same series as HTTP: decisions by outcome, slots in flight while a block runs."""
    registry = CollectorRegistry()
    async with Limiter(rules=[quota("1/minute"), pool(1)], metrics=Metrics(registry)) as limiter:
        await limiter.check("chat", key="a")
        await limiter.check("chat", key="a")
        async with limiter.acquire("jobs", key="a"):
            held = registry.get_sample_value(
                "ratelimit_in_flight", {"rule": "jobs", "limit": "gpu"}
            )
        after = registry.get_sample_value("ratelimit_in_flight", {"rule": "jobs", "limit": "gpu"})

    def count(rule: str, limit: str, outcome: str) -> float | None:
        labels = {"rule": rule, "limit": limit, "outcome": outcome}
        return registry.get_sample_value("ratelimit_decisions_total", labels)

    assert count("chat", "", "allowed") == 1
    assert count("chat", "token-bucket", "limited") == 1
    assert count("jobs", "", "allowed") == 1
    assert (held, after) == (1, 0)


async def test_middleware_is_the_face_of_the_limiter() -> None:
    """One pool: a slot held by a worker's acquire makes the HTTP request a 503; the
    middleware's overrides are the limiter's; conflicting arguments are refused."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limiter = Limiter(rules=[pool(1)])
    mw = RateLimitMiddleware(app, limiter=limiter)
    assert mw.overrides is limiter.overrides
    assert mw.engine is limiter.engine
    with pytest.raises(ConfigError, match=r"^rules: expected no rules= beside limiter="):
        RateLimitMiddleware(app, limiter=limiter, rules=[quota()])
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        headers = {"x-key": "web"}
        async with limiter.acquire("jobs", key="worker"):
            assert (await client.get("/jobs", headers=headers)).status_code == 503
        assert (await client.get("/jobs", headers=headers)).status_code == 200
    await limiter.aclose()


async def test_a_shadow_rule_runs_the_block_of_a_would_be_refusal() -> None:
    """shadow=True: a refused acquire runs its block anyway, holding nothing."""
    async with Limiter(rules=[quota("1/minute")], shadow=True) as limiter:
        async with limiter.acquire("chat", key="a"):
            pass
        async with limiter.acquire("chat", key="a") as decision:
            assert not decision.allowed
            assert decision.rule.shadow


# -- helpers --------------------------------------------------------------------------


async def _acquired(limiter: Limiter, rule: str) -> Any:
    async with limiter.acquire(rule, key="waiter") as decision:
        return decision


async def _eventually_async(read: Any, want: int, timeout: float = 5.0) -> bool:
    """Poll the awaitable `read()` until it returns `want`; True then (else AssertionError)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await read()) != want:
        if loop.time() > deadline:
            raise AssertionError(f"still {got}, not {want}")
        await asyncio.sleep(0.01)
    return True


async def _max_running(limiter: Limiter, n: int) -> int:
    """Start `n` jobs at once, each holding its slot briefly; the most running together."""
    running = peak = 0

    async def job(i: int) -> None:
        nonlocal running, peak
        try:
            async with limiter.acquire("jobs", key=f"job-{i}"):
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.05)
                running -= 1
        except RateLimited:
            pass

    await asyncio.gather(*(job(i) for i in range(n)))
    return peak
