"""The engine's hot path: cached per-caller checks and result order behave as plain ones."""

from __future__ import annotations

from typing import Any

import pytest
from asgi_helpers import http_scope

from ratelimit import Concurrency, MemoryBackend, Rule, TokenBucket, keys
from ratelimit.core import plan as plan_module
from ratelimit.core.decision import Decision
from ratelimit.core.engine import Engine
from ratelimit.core.plan import OneBucketPlan


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def summary(d: Decision) -> tuple[Any, ...]:
    return (d.allowed, d.status, d.retry_after, d.results, d.grant is not None)


def engine_with(cost: Any, clock: ManualClock) -> Engine:
    rule = Rule(
        "/x",
        limits=[
            TokenBucket("6/minute", burst=5, key=keys.header("x-api-key")),
            TokenBucket("100/minute", burst=8, key=keys.GLOBAL, name="everyone"),
        ],
        cost=cost,
    )
    return Engine([rule], MemoryBackend(clock=clock))


async def test_a_constant_cost_decides_exactly_as_a_callable_of_the_same_cost() -> None:
    """Checks cached per caller (constant cost) give the decisions of checks built per request."""
    clock = ManualClock()
    fixed, called = engine_with(2, clock), engine_with(lambda scope: 2, clock)
    for step in range(40):
        clock.now += 1.7
        who = [(b"x-api-key", f"k{step % 3}".encode())] if step % 5 else []
        scope = http_scope("/x", headers=who)
        a = await fixed.decide(fixed.rules[0], scope)
        b = await called.decide(called.rules[0], scope)
        assert summary(a) == summary(b), step


async def test_a_caller_keeps_its_state_when_the_key_cache_is_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clearing the per-caller cache (when full) forgets no quota: state lives in the backend."""
    monkeypatch.setattr(plan_module, "_KEY_CACHE", 4)
    clock = ManualClock()
    engine = Engine(
        [Rule("/x", limits=[TokenBucket("1/minute", burst=2, key=keys.header("k"))])],
        MemoryBackend(clock=clock),
    )
    rule = engine.rules[0]

    def scope(caller: str) -> dict[str, Any]:
        return http_scope("/x", headers=[(b"k", caller.encode())])

    assert (await engine.decide(rule, scope("alice"))).allowed
    for i in range(10):  # enough other callers to clear the cache twice
        assert (await engine.decide(rule, scope(f"other{i}"))).allowed
    assert (await engine.decide(rule, scope("alice"))).allowed
    assert not (await engine.decide(rule, scope("alice"))).allowed


async def test_an_exempt_limit_leaves_the_others_results_in_rule_order() -> None:
    """With a limit exempt (key None), each result still sits at its limit's index."""
    engine = Engine(
        [
            Rule(
                "/x",
                limits=[
                    TokenBucket("5/minute", burst=3, key=keys.header("x-api-key")),
                    TokenBucket("7/minute", burst=7, key=keys.client_ip()),
                    Concurrency(4, key=keys.GLOBAL),
                ],
            )
        ],
        MemoryBackend(clock=ManualClock()),
    )
    d = await engine.decide(engine.rules[0], http_scope("/x"))
    assert d.allowed
    assert d.results[0] is None
    assert [r if r is None else r.remaining for r in d.results] == [None, 6, 3]
    assert d.grant is not None
    await engine.release(d.grant)


def single_bucket_engine(cost: Any, clock: ManualClock, *, shared: bool) -> Engine:
    rule = Rule(
        "/x",
        limits=[TokenBucket("6/minute", burst=3, key=keys.header("x-api-key"), shared=shared)],
        cost=cost,
    )
    return Engine([rule], MemoryBackend(clock=clock))


@pytest.mark.parametrize("shared", [False, True])
async def test_a_one_bucket_rule_takes_the_short_path_with_the_general_paths_answers(
    shared: bool,
) -> None:
    """A rule of one per-caller bucket skips the general loop; its decisions are the same."""
    clock = ManualClock()
    short = single_bucket_engine(1, clock, shared=shared)
    general = single_bucket_engine(lambda scope: 1, clock, shared=shared)
    assert isinstance(short.plan(short.rules[0]), OneBucketPlan)
    assert not isinstance(general.plan(general.rules[0]), OneBucketPlan)
    refusals: set[int] = set()
    exempt = 0
    for step in range(60):
        clock.now += 0.9
        who = [(b"x-api-key", f"k{step % 2}".encode())] if step % 7 else []
        scope = http_scope("/x", headers=who)
        a = await short.decide(short.rules[0], scope)
        b = await general.decide(general.rules[0], scope)
        assert summary(a) == summary(b), step
        if not a.allowed:
            refusals.add(a.status)
        exempt += a.results == [None]
    # Both branches were taken: refusals (429, or 503 on a shared bucket) and exemptions.
    assert refusals == {503 if shared else 429}
    assert exempt


async def test_the_short_path_takes_keys_that_are_not_text_as_the_loop_does() -> None:
    """A sync key returning an awaitable (awaited once) or an int (its text) on the short path."""

    async def caller(scope: Any) -> str | None:
        return dict(scope["headers"]).get(b"x-api-key", b"").decode() or None

    clock = ManualClock()
    calls = 0

    def counted(key: Any) -> Any:
        def call(scope: Any) -> Any:
            nonlocal calls
            calls += 1
            return key(scope)

        return call

    for key in (lambda scope: caller(scope), lambda scope: len(scope["headers"]) or None):
        short = Engine(
            [Rule("/x", limits=[TokenBucket("6/minute", burst=2, key=counted(key))])],
            MemoryBackend(clock=clock),
        )
        short_calls = 0
        general = Engine(
            [Rule("/x", limits=[TokenBucket("6/minute", burst=2, key=key)], cost=lambda s: 1)],
            MemoryBackend(clock=clock),
        )
        assert isinstance(short.plan(short.rules[0]), OneBucketPlan)
        seen = set()
        for step in range(12):
            who = [(b"x-api-key", f"k{step % 2}".encode())] if step % 4 else []
            scope = http_scope("/x", headers=who)
            before = calls
            a = await short.decide(short.rules[0], scope)
            short_calls += calls - before
            b = await general.decide(general.rules[0], scope)
            assert summary(a) == summary(b), step
            seen.add((a.allowed, a.results == [None]))
        # The key function ran once per decision on the short path (a dropped
        # coroutine from a second call would never be awaited).
        assert short_calls == 12
        # Admitted, refused (burst 2 per caller) and exempt (no header) all occurred.
        assert seen == {(True, False), (False, False), (True, True)}
