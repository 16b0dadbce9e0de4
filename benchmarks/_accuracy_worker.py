"""The hammering half of `benchmarks.accuracy`: one of several processes on one key.

`accuracy` (standard library only) starts redis-server and N copies of this
file, each with a venv's python: the bench venv (this library and the peers
that coexist with it) or asgi-ratelimit's own (it installs a top-level
`ratelimit`). Every process gets the same schedule: for each subject a wall
clock start time, a duration and a key prefix shared by all processes, so
they all hit the same key at the same time. Each process reports what it
saw; the parent adds the processes up.

Rate subjects are the adapters of `_redis_worker` (the same set-up as the
decisions benchmark, here with a limit that is reached at once) plus
asgi-ratelimit's two Redis backends. The concurrency subject holds each
admitted slot for a while and counts the slots in flight on a separate Redis
counter (INCR after admission, DECR before release), so the maximum it sees
never exceeds the true number in flight.

    python benchmarks/_accuracy_worker.py SPEC.json RESULT.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import _redis_worker  # benchmarks/ is this script's directory, hence on sys.path
from _redis_worker import Adapter, Ctx, Limit


@dataclass
class Tally:
    """What one process saw of one subject."""

    subject: str
    admitted: int = 0
    refused: int = 0
    #: Calls that raised: neither admitted nor refused.
    failed: int = 0
    #: Wall-clock time before this process's first call and after its last return.
    first: float = 0.0
    last: float = 0.0
    #: Concurrency subjects: the most slots this process saw in flight (fleet-wide).
    max_in_flight: int = 0
    error: str | None = None


# -- asgi-ratelimit (its own venv) --------------------------------------------------------


def _asgi_ratelimit_builder(sliding: bool) -> Callable[[Ctx], Awaitable[Adapter]]:
    async def build(ctx: Ctx) -> Adapter:
        from ratelimit.backends.slidingredis import SlidingRedisBackend
        from redis.asyncio import StrictRedis

        from ratelimit import Rule  # asgi-ratelimit's module, in its own venv
        from ratelimit.backends.redis import RedisBackend

        # As its README: `RedisBackend(StrictRedis())`; the middleware admits a
        # request when `backend.retry_after(path, user, rule)` returns 0.
        client = StrictRedis.from_url(ctx.url)
        backend = (SlidingRedisBackend if sliding else RedisBackend)(client)
        per = "second" if ctx.limit.seconds == 1 else "minute"
        rule = Rule(**{per: ctx.limit.count})
        user = f"{ctx.prefix}-caller-0"
        retry_after = backend.retry_after

        async def acall(i: int) -> bool:
            return await retry_after("/bench", user, rule) == 0

        return Adapter(client.aclose, acall)

    return build


ISOLATED_BUILDERS = {
    "asgi-ratelimit fixed window": _asgi_ratelimit_builder(sliding=False),
    "asgi-ratelimit sliding window": _asgi_ratelimit_builder(sliding=True),
}


# -- this library's concurrency limit ----------------------------------------------------


async def hammer_concurrency(ctx: Ctx, item: dict[str, Any], tasks: int) -> Tally:
    """`Concurrency(limit, key=GLOBAL)` through `Engine`: each admitted task holds its slot."""
    from redis.asyncio import Redis

    from ratelimit import Concurrency, RedisBackend, Rule, keys
    from ratelimit.core.engine import Engine

    backend = RedisBackend(ctx.url, prefix=ctx.prefix)
    rule = Rule("/bench", limits=[Concurrency(item["limit"], key=keys.GLOBAL)])
    engine = Engine([rule], backend)
    observer = Redis.from_url(ctx.url)
    counter = f"{ctx.prefix}:observed-in-flight"
    scope = {"type": "http", "method": "GET", "path": "/bench", "headers": [], "client": None}
    hold = item["hold"]
    tally = Tally(item["name"])

    async def one() -> None:
        decision = await engine.decide(rule, scope)
        if not decision.allowed:
            tally.refused += 1
            return
        tally.admitted += 1
        try:
            seen = await observer.incr(counter)
            tally.max_in_flight = max(tally.max_in_flight, int(seen))
            await asyncio.sleep(hold)
            await observer.decr(counter)
        finally:
            if decision.grant is not None:
                await engine.release(decision.grant)

    try:
        await _until(item, tasks, one, tally)
    finally:
        await engine.aclose()
        await backend.aclose()
        await observer.aclose()
    return tally


# -- hammering ------------------------------------------------------------------------------


async def _until(
    item: dict[str, Any], tasks: int, one: Callable[[], Awaitable[None]], tally: Tally
) -> None:
    """`tasks` asyncio tasks calling `one()` from `item["start"]` for `item["duration"]` s."""
    await _sleep_until(item["start"])
    deadline = item["start"] + item["duration"]

    async def task() -> None:
        while time.time() < deadline:
            try:
                await one()
            except Exception as exc:
                tally.failed += 1
                tally.error = tally.error or f"{type(exc).__name__}: {exc}"[:300]

    tally.first = time.time()
    await asyncio.gather(*(task() for _ in range(tasks)))
    tally.last = time.time()


async def _sleep_until(when: float) -> None:
    delay = when - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def hammer_rate(ctx: Ctx, item: dict[str, Any], tasks: int) -> Tally:
    """One rate subject: every task asks for caller 0 again and again until time is up."""
    builder = ISOLATED_BUILDERS.get(item["name"]) or _redis_worker.BUILDERS[item["name"]][0]
    adapter = await builder(ctx)
    tally = Tally(item["name"])
    try:
        if adapter.acall is not None:
            acall = adapter.acall

            async def one() -> None:
                if await acall(0):
                    tally.admitted += 1
                else:
                    tally.refused += 1

            await _until(item, tasks, one, tally)
        else:
            assert adapter.call is not None
            await _sleep_until(item["start"])
            _threads(adapter.call, item, tasks, tally)
    finally:
        await adapter.close()
    return tally


def _threads(call: Callable[[int], bool], item: dict[str, Any], tasks: int, tally: Tally) -> None:
    """A synchronous library: `tasks` threads instead of asyncio tasks."""
    deadline = item["start"] + item["duration"]
    lock = threading.Lock()

    def loop() -> None:
        admitted = refused = failed = 0
        error = None
        while time.time() < deadline:
            try:
                if call(0):
                    admitted += 1
                else:
                    refused += 1
            except Exception as exc:
                failed += 1
                error = error or f"{type(exc).__name__}: {exc}"[:300]
        with lock:
            tally.admitted += admitted
            tally.refused += refused
            tally.failed += failed
            tally.error = tally.error or error

    tally.first = time.time()
    threads = [threading.Thread(target=loop) for _ in range(tasks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.last = time.time()


async def main_async(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every subject of the schedule in turn, each at its start time."""
    url = f"redis://127.0.0.1:{spec['port']}/0"
    out = []
    for item in spec["schedule"]:
        ctx = Ctx(url, spec["port"], Limit(item["count"], item["seconds"]), item["prefix"])
        try:
            if item["kind"] == "concurrency":
                tally = await hammer_concurrency(ctx, item, spec["tasks"])
            else:
                tally = await hammer_rate(ctx, item, spec["tasks"])
        except Exception as exc:  # a peer failing must not sink the others
            tally = Tally(item["name"], error=f"{type(exc).__name__}: {exc}"[:300])
        out.append(asdict(tally))
    return out


def main(argv: Sequence[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = asyncio.run(main_async(spec))
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
