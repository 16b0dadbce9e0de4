"""Calendar quotas: a per-key allowance per UTC day or month, beside the rates.

The period comes from the unix time (midnight UTC; the 1st 00:00 UTC), the
Lua computes the same as `algorithms.calendar` on the same inputs, a quota is
decided all or nothing with its rule's other limits on memory and Redis, and
a refusal is a 429 with `x-should-retry: false` and the seconds until the
allowance returns.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import TTL_KEY, ManualClockRedisBackend, RedisServer
from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ratelimit import (
    ConfigError,
    Limiter,
    MemoryBackend,
    Quota,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    keys,
)
from ratelimit.algorithms import calendar
from ratelimit.backends.base import StoreKey, WindowCheck
from ratelimit.policy.config import load_config

UTC = dt.timezone.utc


def unix(*date: int) -> int:
    return int(dt.datetime(*date, tzinfo=UTC).timestamp())  # type: ignore[misc]


def _datetime_bounds(unit: str, now: float) -> tuple[int, int]:
    """The period from the standard library's calendar, to check ours against."""
    day = dt.datetime.fromtimestamp(math.floor(now), UTC).replace(hour=0, minute=0, second=0)
    if unit == "day":
        start = day
        end = day + dt.timedelta(days=1)
    else:
        start = day.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    return int(start.timestamp()), int(end.timestamp())


#: Edges: month and year ends, Feb 28/29 of leap, common and century years.
EDGES = [
    unix(2024, 2, 28, 23, 59, 59),
    unix(2024, 2, 29),
    unix(2024, 2, 29, 23, 59, 59),
    unix(2024, 3, 1),
    unix(2023, 2, 28, 23, 59, 59),
    unix(2023, 3, 1),
    unix(2000, 2, 29, 12),
    unix(2100, 2, 28, 12),
    unix(2100, 3, 1),
    unix(2025, 12, 31, 23, 59, 59),
    unix(2026, 1, 1),
    unix(2026, 4, 30, 23, 59, 59),
    unix(2025, 11, 30, 23, 59, 59),
    unix(1970, 1, 1),
]


@pytest.mark.parametrize("unit", ["day", "month"])
@pytest.mark.parametrize("now", EDGES)
def test_the_period_is_the_utc_day_or_month_at_its_edges(unit: str, now: int) -> None:
    """Each edge, a microsecond before and after: the standard library's period."""
    for t in (now - 1e-6, float(now), now + 1e-6):
        assert calendar.bounds(unit, t) == _datetime_bounds(unit, t), (unit, t)


@given(st.integers(0, unix(2200, 1, 1)), st.sampled_from(["day", "month"]))
def test_the_period_agrees_with_the_standard_library(now: int, unit: str) -> None:
    assert calendar.bounds(unit, now) == _datetime_bounds(unit, now)


@pytest.mark.parametrize(
    ("date", "days"),
    [((2024, 2, 10), 29), ((2023, 2, 10), 28), ((2100, 2, 1), 28), ((2000, 2, 1), 29),
     ((2024, 12, 31), 31), ((2024, 4, 30), 30)],
)  # fmt: skip
def test_a_month_lasts_its_calendar_length(date: tuple[int, int, int], days: int) -> None:
    start, end = calendar.bounds("month", unix(*date))
    assert end - start == days * 86400


def test_a_step_admits_up_to_the_allowance_and_a_new_period_starts_afresh() -> None:
    """Refusals change nothing and wait for the period's end; the next period counts anew."""
    now = unix(2024, 2, 29, 23, 59, 0) + 0.5
    r = calendar.quota(None, now, 2, 3, "day")
    assert (r.admitted, r.remaining, r.reset_after) == (True, 1, 59.5)
    refused = calendar.quota(r.state, now, 2, 3, "day")
    assert (refused.admitted, refused.state, refused.retry_after) == (False, r.state, 59.5)
    fresh = calendar.quota(r.state, unix(2024, 3, 1), 3, 3, "day")
    assert (fresh.admitted, fresh.remaining) == (True, 0)
    assert calendar.refund_quota(r.state, now, 2, "day", now) is None
    assert calendar.refund_quota(r.state, unix(2024, 3, 1), 2, "day", now) is None


# -- the Lua against the algorithm --------------------------------------------------

KEY = StoreKey("q", "quota", "0123456789abcdef0123456789abcdef")
#: Microsecond offsets from a few boundaries: around them, and well inside periods.
TIMES = st.builds(
    lambda edge, offset: edge * 1_000_000 + offset,
    st.sampled_from(EDGES[:-1]),  # not 1970: the manual clock holds no negative time
    st.integers(-90_000_000_000, 90_000_000_000) | st.integers(-2_000_000, 2_000_000),
)


@pytest.mark.redis
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    unit=st.sampled_from(["day", "month"]),
    limit=st.integers(1, 6),
    steps=st.lists(
        st.tuples(TIMES, st.sampled_from(["hit", "hit", "peek", "refund"]), st.integers(1, 3)),
        min_size=1,
        max_size=20,
    ),
)
@example(
    unit="month",
    limit=2,
    steps=[
        (unix(2024, 2, 29, 23, 59, 59) * 1_000_000 + 999_999, "hit", 2),
        (unix(2024, 2, 29, 23, 59, 59) * 1_000_000 + 999_999, "hit", 1),
        (unix(2024, 3, 1) * 1_000_000, "hit", 2),
    ],
)
async def test_lua_quotas_equal_the_algorithm_bit_for_bit(
    redis_url: str, unit: str, limit: int, steps: list[tuple[int, str, int]]
) -> None:
    """Same clock (the manual prelude), same checks: decide.lua and refund.lua answer
    what `algorithms.calendar` answers, and ask for a key ttl ending with the period."""
    backend = ManualClockRedisBackend(redis_url, prefix="diffquota")
    step, undo, idle = calendar.STRATEGIES[unit]
    state: Any = None
    taken: list[WindowCheck] = []
    name = backend.keys.window(KEY)
    try:
        await backend.client.delete(name, TTL_KEY)
        for micros, op, cost in sorted(steps):  # time runs forward
            await backend.set_time(micros)
            sec, usec = divmod(micros, 1_000_000)
            now = sec + usec / 1e6
            if op == "refund":
                if taken:
                    check = taken.pop(0)
                    await backend.refund([check])
                    state = undo(state, now, check.cost, 0.0, check.receipt[-1])
                continue
            c = 0 if op == "peek" else cost
            check = WindowCheck(KEY, limit, 86400.0, unit, c, [])
            got = (await backend.decide([check])).results[0]
            want = step(state, now, c, limit, 0.0)
            assert (got.admitted, got.remaining, got.retry_after, got.reset_after) == (
                want.admitted,
                want.remaining,
                want.retry_after,
                want.reset_after,
            )
            if want.admitted and c:
                state = want.state
                assert check.receipt == [now]
                taken.append(check)
                asked = int(await backend.client.hget(TTL_KEY, name))
                assert asked == max(1, math.ceil((idle(state, 0.0) - now) * 1000))
    finally:
        await backend.aclose()


# -- decided with the rule's other limits ---------------------------------------------


def _rule(**quota: Any) -> Rule:
    return Rule(
        "/v1/chat",
        limits=[
            TokenBucket("1/day", burst=5, key=keys.header("x-api-key")),
            Quota("3/day", key=keys.header("x-api-key"), **quota),
        ],
        name="chat",
    )


class WallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_a_quota_is_all_or_nothing_with_the_rule_and_returns_at_midnight_utc(
    where: str, request: pytest.FixtureRequest
) -> None:
    """The quota refuses the 4th request of the day and the bucket keeps its units; a
    bucket refusal leaves the quota untouched; after midnight UTC the quota is back."""
    clock = WallClock(unix(2024, 2, 29, 22))
    backend: Any
    if where == "memory":
        backend = MemoryBackend(wall_clock=clock)
    else:
        backend = ManualClockRedisBackend(request.getfixturevalue("redis_url"), prefix="qa")
        await backend.client.flushdb()

    async def at(t: float) -> None:
        clock.now = t
        if where == "redis":
            await backend.set_time(int(t * 1_000_000))

    limiter = Limiter([_rule()], backend=backend)
    try:
        await at(clock.now)
        for _ in range(3):
            assert (await limiter.check("chat", key="alice")).allowed
        refused = await limiter.check("chat", key="alice")
        bucket, quota = refused.states
        assert (refused.status, quota.admitted, bucket.admitted) == (429, False, True)
        assert bucket.remaining == 2  # the bucket's units were not taken
        assert refused.retry_after == pytest.approx(7200.0, abs=1.0)
        await at(unix(2024, 3, 1) + 1)  # a new day; the bucket has 2 units left
        assert (await limiter.check("chat", key="alice", cost=2)).allowed
        short = await limiter.check("chat", key="alice")
        assert [s.admitted for s in short.states] == [False, True]
        assert short.states[1].remaining == 1  # the quota's unit was not taken
    finally:
        await limiter.aclose()
        await backend.aclose()


@pytest.mark.redis
async def test_a_rule_with_a_quota_is_one_script_call_and_its_key_expires_at_the_period_end(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Bucket + quota: one EVALSHA per decision; the quota key's ttl ends at month's end."""
    import redis

    backend = ManualClockRedisBackend(redis_url, prefix="qone")
    limiter = Limiter(
        [Rule("/x", limits=[TokenBucket("5/second", key=keys.GLOBAL), Quota(9, per="month",
                                                                                 key=keys.GLOBAL)],
              name="x")],
        backend=backend,
    )  # fmt: skip
    now = unix(2024, 2, 29, 23, 0, 0)
    await backend.set_time(now * 1_000_000)
    try:
        assert (await limiter.check("x")).allowed
        with redis.Redis(port=redis_server.port) as client:
            before = int(client.info("commandstats")["cmdstat_evalsha"]["calls"])
            assert (await limiter.check("x")).allowed
            after = int(client.info("commandstats")["cmdstat_evalsha"]["calls"])
        assert after - before == 1
        name = backend.keys.window(StoreKey("x", "quota", "*"))
        assert int(await backend.client.hget(TTL_KEY, name)) == 3600 * 1000
    finally:
        await limiter.aclose()
        await backend.aclose()


# -- the HTTP face ----------------------------------------------------------------------


async def test_a_spent_quota_is_a_429_that_says_do_not_retry_before_it_returns() -> None:
    """429, `x-should-retry: false`, `Retry-After` to the month's end, the policy item
    (q = allowance, w = this month's seconds) and the `RateLimit` item (r, t)."""
    now = unix(2024, 2, 29, 12)
    app = FastAPI()

    @app.post("/v1/chat")
    async def chat() -> dict[str, str]:
        return {}

    backend = MemoryBackend(wall_clock=lambda: now)
    quota = Quota(2, per="month", key=keys.header("x-api-key"))
    app.add_middleware(
        RateLimitMiddleware, backend=backend, rules=[Rule("/v1/chat", limits=[quota])]
    )
    start, end = calendar.bounds("month", dt.datetime.now(UTC).timestamp())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers={"x-api-key": "a"}
    ) as c:
        ok = await c.post("/v1/chat")
        assert ok.headers["ratelimit-policy"] == f'"quota";q=2;w={end - start}'
        assert ok.headers["ratelimit"] == '"quota";r=1;t=43200'
        assert "x-should-retry" not in ok.headers
        await c.post("/v1/chat")
        refused = await c.post("/v1/chat")
    assert refused.status_code == 429
    assert refused.headers["x-should-retry"] == "false"
    assert refused.headers["retry-after"] == "43200"
    assert refused.headers["ratelimit"] == '"quota";r=0;t=43200'
    assert refused.json()["violated-policies"] == ["quota"]


async def test_a_rate_refusal_beside_a_quota_may_be_retried() -> None:
    """Only a spent quota says `x-should-retry: false`."""
    app = FastAPI()

    @app.get("/x")
    async def x() -> dict[str, str]:
        return {}

    rule = Rule("/x", limits=[TokenBucket("1/minute"), Quota("10/day")])
    app.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), rules=[rule])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.get("/x")
        refused = await c.get("/x")
    assert refused.status_code == 429
    assert refused.headers["x-should-retry"] == "true"  # a minute's wait: retry then


# -- declaring one ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "want"),
    [
        (("100000/day",), {}, (100000, "day")),
        (("1000000 per month",), {}, (1000000, "month")),
        ((5,), {"per": "month"}, (5, "month")),
    ],
)
def test_a_quota_is_an_allowance_per_day_or_month(
    args: tuple[Any, ...], kwargs: dict[str, Any], want: tuple[int, str]
) -> None:
    q = Quota(*args, **kwargs)
    assert (q.amount, q.per, q.shared, q.kind) == (*want, False, "quota")


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("100/hour",), {}, "allowance"),
        (("100/2 days",), {}, "allowance"),
        (("100/day",), {"per": "day"}, "allowance"),
        ((100,), {}, "per"),
        ((100,), {"per": "week"}, "per"),
        ((0,), {"per": "day"}, "allowance"),
        ((True,), {"per": "day"}, "allowance"),
    ],
)
def test_a_bad_quota_names_its_field(
    args: tuple[Any, ...], kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        Quota(*args, **kwargs)


CONFIG = """
[[rules]]
path = "/v1/chat"
name = "chat"
[[rules.limits]]
type = "token_bucket"
rate = "60/minute"
key = "header:x-api-key"
[[rules.limits]]
type = "quota"
allowance = "100000/day"
key = "header:x-api-key"
counts = "requests"
"""


def test_a_config_file_declares_a_quota_and_status_shows_it(tmp_path: Path) -> None:
    """`type = "quota"` loads; `ratelimit status --config` lists it (configured, effective)."""
    rule = load_config({"rules": [{
        "path": "/x",
        "limits": [{"type": "quota", "allowance": 500, "per": "month", "key": "global"}],
    }]}).rules[0]  # fmt: skip
    assert (rule.limits[0].amount, rule.limits[0].per) == (500, "month")  # type: ignore[attr-defined]
    path = tmp_path / "ratelimit.toml"
    path.write_text(CONFIG)
    assert "quota" in subprocess.run(
        [sys.executable, "-m", "ratelimit", "check", str(path)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip


@pytest.mark.redis
def test_status_shows_a_quota(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "ratelimit.toml"
    path.write_text(CONFIG)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "ratelimit", "status", "--config", str(path), "--json"],
        capture_output=True, text=True, timeout=30, check=False, cwd=root,
        env={"RATELIMIT_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    limits = json.loads(proc.stdout)["rules"][0]["limits"]
    assert limits[1]["configured"] == {
        "kind": "quota", "allowance": 100000, "per": "day", "shared": False,
    }  # fmt: skip
    table = subprocess.run(
        [sys.executable, "-m", "ratelimit", "status", "--config", str(path)],
        capture_output=True, text=True, timeout=30, check=False, cwd=root,
        env={"RATELIMIT_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    ).stdout  # fmt: skip
    assert "100000/day (UTC)" in table
