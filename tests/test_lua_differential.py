"""The Lua scripts against the pure algorithms: same inputs, bit-identical answers.

Hypothesis generates sequences of clock steps and operations (decide, dry run,
refund, renew, release, in_use) with random rates, bursts, costs, limits and
ttls. Each runs through `RedisBackend` on a real server, its scripts on the
manual clock prelude (tests/manual_clock.lua, in place of TIME), and through
`Model`, which is the scripts' contract written with `gcra` and `leases`.
Every result, every stored value and every key ttl asked for must be equal,
floats included, bit for bit.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from _lease_model import acquire
from _servers import TTL_KEY, ManualClockRedisBackend, RedisServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ratelimit.algorithms import gcra, leases
from ratelimit.backends.base import BucketCheck, Check, CheckResult, LeaseCheck, StoreKey
from ratelimit.backends.redis.calls import parse_decide

pytestmark = pytest.mark.redis

CALLER = "0123456789abcdef0123456789abcdef"


@dataclass
class Model:
    """What the scripts must compute, from the pure algorithms.

    A bucket's state is (sec, offset): tat = sec + offset, and every call runs
    `gcra.gcra` in the frame whose origin is the clock's whole second, as
    decide.lua does. Leases run on absolute time.
    """

    buckets: dict[StoreKey, tuple[int, float]] = field(default_factory=dict)
    tables: dict[StoreKey, dict[str, float]] = field(default_factory=dict)
    ttls: dict[StoreKey, int] = field(default_factory=dict)

    def _tat(self, key: StoreKey, sec: int) -> float | None:
        state = self.buckets.get(key)
        return None if state is None else (state[0] - sec) + state[1]

    def decide(
        self, checks: list[Check], sec: int, usec: int, commit: bool = True
    ) -> tuple[bool, list[CheckResult]]:
        t = usec / 1e6
        now = sec + usec / 1e6
        results: list[CheckResult] = []
        steps: list[gcra.BucketResult | None] = []
        for check in checks:
            if isinstance(check, BucketCheck):
                r = gcra.gcra(self._tat(check.key, sec), t, check.cost, check.interval, check.burst)
                steps.append(r)
                results.append(CheckResult(r.admitted, r.remaining, r.retry_after, r.reset_after))
            else:
                table = self.tables.setdefault(check.key, {})
                leases.prune(table, now)
                in_use, need = leases.held(table), check.weight
                ok = in_use + need <= check.limit
                steps.append(None)
                results.append(CheckResult(ok, check.limit - in_use - need if ok else 0, 0.0, 0.0))
        verdict = all(r.admitted for r in results)
        if not (verdict and commit):
            for i, check in enumerate(checks):
                if not results[i].admitted:
                    continue
                if isinstance(check, BucketCheck):
                    tat = self._tat(check.key, sec)
                    peek = gcra.gcra(tat, t, 0, check.interval, check.burst)
                    results[i] = CheckResult(True, peek.remaining, 0.0, peek.reset_after)
                else:
                    results[i] = CheckResult(True, results[i].remaining + check.weight, 0.0, 0.0)
            return verdict, results
        for check, step in zip(checks, steps, strict=True):
            if isinstance(check, BucketCheck):
                assert step is not None
                if check.cost > 0:
                    self.buckets[check.key] = (sec, step.tat)
                    self.ttls[check.key] = max(1, math.ceil(step.reset_after * 1000))
            else:
                table = self.tables[check.key]
                acquire(table, check.lease_id, now, check.limit, check.ttl)
                self._keep_alive(check.key, math.ceil(check.ttl * 1000))
        return verdict, results

    def refund(self, checks: list[Check], sec: int, usec: int) -> None:
        t = usec / 1e6
        for check in checks:
            if isinstance(check, BucketCheck):
                tat = self._tat(check.key, sec)
                if (tat is None and check.cost >= 0) or check.cost == 0:
                    continue
                new_tat = gcra.refund(tat, t, check.cost, check.interval)
                if new_tat is None:
                    self.buckets.pop(check.key, None)
                else:
                    self.buckets[check.key] = (sec, new_tat)
                    self.ttls[check.key] = max(1, math.ceil((new_tat - t) * 1000))
            else:
                leases.release(self.tables.setdefault(check.key, {}), check.lease_id)

    def renew(self, batch: list[LeaseCheck], sec: int, usec: int) -> list[bool]:
        now = sec + usec / 1e6
        out = []
        for lease in batch:
            ok = leases.renew(self.tables.setdefault(lease.key, {}), lease.lease_id, now, lease.ttl)
            if ok:
                self._keep_alive(lease.key, math.ceil(lease.ttl * 1000))
            out.append(ok)
        return out

    def release(self, lease: LeaseCheck, sec: int, usec: int) -> bool:
        expiry = self.tables.setdefault(lease.key, {}).pop(lease.lease_id, None)
        return expiry is not None and expiry > sec + usec / 1e6

    def in_use(self, key: StoreKey, sec: int, usec: int) -> int:
        return leases.live(self.tables.get(key, {}), sec + usec / 1e6)

    def _keep_alive(self, key: StoreKey, ms: int) -> None:
        if self.ttls.get(key, -1) < ms:
            self.ttls[key] = ms


# -- generated scenarios ------------------------------------------------------------

#: Round values make boundaries (expiry == now, free / interval == k) happen exactly.
ROUND_SECONDS = [0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 1 / 3, 0.7]
intervals = st.one_of(
    st.floats(min_value=1e-4, max_value=1e5, allow_nan=False, allow_infinity=False),
    st.sampled_from([*ROUND_SECONDS, 12.0, 60 / 7, 3600 / 11, 86.4]),
)
bucket_specs = st.tuples(intervals, st.integers(1, 40))
lease_specs = st.tuples(
    st.integers(1, 6),
    st.one_of(st.floats(min_value=0.001, max_value=120.0), st.sampled_from(ROUND_SECONDS)),
)
steps_us = st.one_of(
    st.just(0),
    st.integers(0, 1_000),
    st.integers(0, 2_000_000),
    st.integers(0, 600_000_000),
    st.sampled_from([round(x * 1_000_000) for x in ROUND_SECONDS]),
)
decide_op = st.tuples(
    st.just("decide"),
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 45)), min_size=1, max_size=5),
    st.booleans(),
)
operations = st.lists(
    st.tuples(
        steps_us,
        st.one_of(
            decide_op,
            decide_op,
            decide_op,
            st.tuples(st.just("refund"), st.integers(0, 1_000)),
            st.tuples(st.just("renew"), st.lists(st.integers(0, 1_000), min_size=1, max_size=4)),
            st.tuples(st.just("release"), st.integers(0, 1_000)),
            st.tuples(st.just("in_use"), st.integers(0, 1)),
        ),
    ),
    min_size=1,
    max_size=30,
)


@dataclass
class Harness:
    """One event loop and one manual-clock backend for every generated example."""

    loop: asyncio.AbstractEventLoop
    backend: ManualClockRedisBackend
    rules: Iterator[int] = field(default_factory=itertools.count)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def harness(redis_server: RedisServer) -> Iterator[Harness]:
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flushall()
    loop = asyncio.new_event_loop()
    backend = ManualClockRedisBackend(redis_server.url)
    try:
        yield Harness(loop, backend)
    finally:
        loop.run_until_complete(backend.aclose())
        loop.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start_sec=st.integers(1_600_000_000, 2_100_000_000),
    start_usec=st.integers(0, 999_999),
    buckets=st.lists(bucket_specs, min_size=3, max_size=3),
    tables=st.lists(lease_specs, min_size=2, max_size=2),
    ops=operations,
)
# Exactly at a lease's expiry (now == granted + ttl): dead for renew, release, in_use, acquire.
@example(
    start_sec=1_760_000_000,
    start_usec=250_000,
    buckets=[(1.0, 1)] * 3,
    tables=[(1, 1.0), (2, 1.0)],
    ops=[
        (0, ("decide", [(3, 0), (4, 0)], True)),
        (1_000_000, ("renew", [0])),
        (0, ("release", 1)),
        (0, ("in_use", 1)),
        (0, ("decide", [(3, 0)], True)),
        (1_000_000, ("decide", [(3, 0)], True)),
    ],
)
# free / interval lands 5e-7 below a whole unit: EPSILON (1e-9) must not round it up.
@example(
    start_sec=1_760_000_000,
    start_usec=0,
    buckets=[(1.0000005, 2)] * 3,
    tables=[(1, 1.0)] * 2,
    ops=[(0, ("decide", [(0, 2)], True)), (1_000_000, ("decide", [(0, 0)], True))],
)
def test_scripts_match_the_pure_algorithms(
    harness: Harness,
    start_sec: int,
    start_usec: int,
    buckets: list[tuple[float, int]],
    tables: list[tuple[int, float]],
    ops: list[tuple[int, tuple[Any, ...]]],
) -> None:
    """Every answer, stored state and key ttl of the scripts equals the model's, exactly."""
    harness.run(_scenario(harness, start_sec, start_usec, buckets, tables, ops))


async def _scenario(
    harness: Harness,
    start_sec: int,
    start_usec: int,
    buckets: list[tuple[float, int]],
    tables: list[tuple[int, float]],
    ops: list[tuple[int, tuple[Any, ...]]],
) -> None:
    backend = harness.backend
    rule = f"diff{next(harness.rules)}"
    # Keys 0-2 are buckets, 3-4 lease tables; bucket 2 is shared (caller "*").
    keys = [
        StoreKey(rule, "a", CALLER),
        StoreKey(rule, "b", CALLER),
        StoreKey(rule, "c", "*"),
        StoreKey(rule, "slots", CALLER),
        StoreKey(rule, "slots", "*"),
    ]
    model = Model()
    micros = start_sec * 1_000_000 + start_usec
    lease_ids = itertools.count()
    granted: list[list[Check]] = []
    issued: list[LeaseCheck] = []
    for step, op in ops:
        micros += step
        sec, usec = divmod(micros, 1_000_000)
        await backend.set_time(micros)
        kind = op[0]
        if kind == "decide":
            checks: list[Check] = []
            for index, cost in dict(op[1]).items():  # one check per key
                if index < 3:
                    interval, burst = buckets[index]
                    checks.append(BucketCheck(keys[index], interval, burst, cost))
                else:
                    limit, ttl = tables[index - 3]
                    lease_id = f"l{next(lease_ids)}"
                    if index == 4:  # the shared pool is weighted: the cost is the weight
                        lease_id = leases.weighted_id(lease_id, cost % 4 + 1)
                    lease = LeaseCheck(keys[index], limit, ttl, lease_id)
                    issued.append(lease)
                    checks.append(lease)
            commit = op[2]
            if commit:
                got = await backend.decide(checks)
                expected = model.decide(checks, sec, usec)
                assert (got.admitted, list(got.results)) == expected, (op, sec, usec)
                if got.admitted:
                    granted.append(checks)
            else:
                got_dry = await _dry_run(backend, checks)
                assert got_dry == model.decide(checks, sec, usec, commit=False), (op, sec, usec)
        elif kind == "refund" and granted:
            checks = granted.pop(op[1] % len(granted))
            if op[1] % 3 == 0:
                # A settlement's debt: the buckets charged as much again, past the burst.
                checks = [
                    c._replace(cost=-c.cost) if isinstance(c, BucketCheck) else c for c in checks
                ]
            await backend.refund(checks)
            model.refund(checks, sec, usec)
        elif kind == "renew" and issued:
            batch = [issued[i % len(issued)] for i in op[1]]
            batch = list({lease.lease_id: lease for lease in batch}.values())
            assert await backend.renew(batch) == model.renew(batch, sec, usec)
        elif kind == "release" and issued:
            lease = issued[op[1] % len(issued)]
            assert await backend.release(lease) == model.release(lease, sec, usec)
        elif kind == "in_use":
            key = keys[3 + op[1]]
            assert await backend.in_use(key) == model.in_use(key, sec, usec)
        await _assert_same_state(backend, model, keys)


async def _dry_run(
    backend: ManualClockRedisBackend, checks: list[Check]
) -> tuple[bool, list[CheckResult]]:
    """decide.lua with ARGV[1] = "0", as the backend runs it for slots it must not touch."""
    keys, args = backend.calls.decide_args(checks, "0")
    return parse_decide(await backend.guard.call(backend.scripts.decide, keys, args))


async def _assert_same_state(
    backend: ManualClockRedisBackend, model: Model, keys: list[StoreKey]
) -> None:
    """Stored tats, lease tables and asked-for ttls equal the model's, bit for bit."""
    pipe = backend.client.pipeline(transaction=False)
    for key in keys[:3]:
        pipe.get(backend.keys.bucket(key))
        pipe.hget(TTL_KEY, backend.keys.bucket(key))
    for key in keys[3:]:
        pipe.zrange(backend.keys.leases(key), 0, -1, withscores=True)
    replies = await pipe.execute()
    for i, key in enumerate(keys[:3]):
        raw, ttl = replies[2 * i], replies[2 * i + 1]
        if raw is None:
            assert key not in model.buckets
            continue
        sec, offset = raw.split()
        assert (int(sec), float(offset)) == model.buckets[key]
        assert int(ttl) == model.ttls[key]
    for key, members in zip(keys[3:], replies[6:], strict=True):
        assert {m.decode(): score for m, score in members} == model.tables.get(key, {})


@pytest.mark.parametrize("interval", [0.2, 0.7])
def test_remaining_is_exact_at_epoch_scale(interval: float) -> None:
    """gcra measures from `now`: with epoch-scale times (one ulp is 2.4e-7 s, above
    EPSILON), one take from a full bucket of 5 still reports 4 left, as in decide.lua's frame."""
    usec = 123_457
    absolute = gcra.gcra(None, 1_760_000_000 + usec / 1e6, 1, interval, 5)
    framed = gcra.gcra(None, usec / 1e6, 1, interval, 5)
    assert (absolute.remaining, framed.remaining) == (4, 4)
