"""The measuring half of `benchmarks.redis_decisions`: runs inside the benchmark venv.

`redis_decisions` (standard library only) starts redis-server and runs this
file with the venv's python, which imports this library and every peer. Each
*subject* is one way to take one rate-limit decision on Redis (or, for the
floor, one bare round trip); an `Adapter` makes one decision for caller `i`.
Subjects are built afresh for every measured cell and closed after it, so no
peer's background work (pyrate-limiter's leaker) runs while another is timed.

    python benchmarks/_redis_worker.py SPEC.json RESULT.json

SPEC holds the port, the settings and the subjects; RESULT gets every cell,
the commands per decision, the correctness probes and the breaker costs.
Progress goes to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.metadata
import itertools
import json
import logging
import os
import re
import socket
import statistics
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import _support  # benchmarks/ is this script's directory, hence on sys.path

#: A rate no run reaches, per caller (decisions/s on one key stay far below it).
HUGE_PER_SECOND = 100_000
#: Decisions per caller that a probe's limit admits (then the next is refused).
PROBE_LIMIT = 1


@dataclass
class Adapter:
    """One subject, built: `call(i)` takes one decision for caller `i` and says if it admitted.

    Exactly one of `acall` (a coroutine, for asyncio tasks) and `call`
    (blocking, for threads) is set.
    """

    close: Callable[[], Awaitable[None]]
    acall: Callable[[int], Awaitable[bool]] | None = None
    call: Callable[[int], bool] | None = None


@dataclass(frozen=True)
class Limit:
    """`count` decisions per caller per `seconds` (1 or 60), burst `count` where there is one."""

    count: int
    seconds: int = 1

    def __post_init__(self) -> None:
        if self.seconds not in (1, 60):
            raise ValueError(f"a limit per second or per minute, not per {self.seconds} s")

    def text(self, style: str = "limits") -> str:
        """The rate as a peer spells it: limits' "5/second", throttled-py's "5/s"."""
        if style == "throttled":
            unit = "s" if self.seconds == 1 else "m"
            return f"{self.count}/{unit} burst {self.count}"
        return f"{self.count}/{'second' if self.seconds == 1 else 'minute'}"


#: Never reached in a run; the probe's: the second decision of a caller is refused.
HUGE = Limit(HUGE_PER_SECOND, 1)
PROBE = Limit(PROBE_LIMIT, 60)


@dataclass
class Ctx:
    """What a subject needs to build itself: the server, a fresh key prefix, the limit."""

    url: str
    port: int
    limit: Limit = HUGE
    prefix: str = "rd"

    @property
    def probe(self) -> bool:
        """Whether this build is a probe (its limit refuses a caller's second decision)."""
        return self.limit == PROBE

    def fresh(self, probe: bool) -> Ctx:
        """A context with a key prefix no earlier build used (no state carries over)."""
        limit = PROBE if probe else HUGE
        return Ctx(self.url, self.port, limit, f"rd{os.getpid()}x{next(_BUILDS)}")


_BUILDS = itertools.count()
Builder = Callable[[Ctx], Awaitable[Adapter]]


async def _nothing() -> None:
    return None


# -- the physical floor ---------------------------------------------------------------


async def build_ping(ctx: Ctx) -> Adapter:
    """redis-py asyncio `PING`: the cheapest round trip through the client peers use."""
    from redis.asyncio import Redis

    client = Redis.from_url(ctx.url)

    async def acall(i: int) -> bool:
        await client.ping()
        return True

    return Adapter(client.aclose, acall)


async def build_evalsha(ctx: Ctx) -> Adapter:
    """redis-py asyncio `EVALSHA` of `return 1`: the cheapest script call."""
    from redis.asyncio import Redis

    client = Redis.from_url(ctx.url)
    sha = await client.script_load("return 1")

    async def acall(i: int) -> bool:
        await client.evalsha(sha, 0)
        return True

    return Adapter(client.aclose, acall)


class _RawPipe(asyncio.Protocol):
    """One socket; every command of a loop turn goes out in one write, replies in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import hiredis

        self.loop = loop
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.out: list[bytes] = []
        self.scheduled = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's TCP transport is no asyncio.Transport subclass.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            self.waiting.popleft().set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.waiting:
            if not future.done():
                future.set_exception(ConnectionError("raw pipe closed"))

    def call(self, command: bytes) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        self.waiting.append(future)
        self.out.append(command)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        self.scheduled = False
        out, self.out = self.out, []
        assert self.transport is not None
        self.transport.write(b"".join(out))


async def build_raw_pipeline(ctx: Ctx) -> Adapter:
    """`EVALSHA` of `return 1` on one raw socket, pipelined per loop turn (hiredis parsing)."""
    loop = asyncio.get_running_loop()
    transport, pipe = await loop.create_connection(lambda: _RawPipe(loop), "127.0.0.1", ctx.port)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sha = await pipe.call(b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$8\r\nreturn 1\r\n")
    sha = sha.decode() if isinstance(sha, bytes) else sha
    command = f"*3\r\n$7\r\nEVALSHA\r\n${len(sha)}\r\n{sha}\r\n$1\r\n0\r\n".encode()

    async def acall(i: int) -> bool:
        await pipe.call(command)
        return True

    async def close() -> None:
        transport.close()

    return Adapter(close, acall)


# -- this library -----------------------------------------------------------------------


def _bucket_params(ctx: Ctx) -> tuple[float, int]:
    """(interval, burst) of the per-caller TokenBucket for `ctx.limit`."""
    return ctx.limit.seconds / ctx.limit.count, ctx.limit.count


def _backend_builder(*, lease: bool, split: bool = False) -> Builder:
    async def build(ctx: Ctx) -> Adapter:
        from ratelimit import RedisBackend
        from ratelimit.backends.base import BucketCheck, LeaseCheck, StoreKey

        backend = RedisBackend(ctx.url, prefix=ctx.prefix, split_by_slot=split)
        interval, burst = _bucket_params(ctx)
        buckets = [
            BucketCheck(StoreKey("bench", "bucket", f"{i:032x}"), interval, burst, 1)
            for i in range(256)
        ]
        decide = backend.decide
        if not lease:

            async def acall(i: int) -> bool:
                return (await decide((buckets[i],))).admitted

            return Adapter(backend.aclose, acall)

        pool = StoreKey("bench", "slots", "*")
        slots = PROBE_LIMIT if ctx.probe else 1_000_000_000
        ids = itertools.count()

        async def acall_lease(i: int) -> bool:
            # Not released: leases expire after 1 s (the set holds about 1 s of them).
            check = LeaseCheck(pool, slots, 1.0, f"{ctx.prefix}-{next(ids)}")
            return (await decide((buckets[i], check))).admitted

        return Adapter(backend.aclose, acall_lease)

    return build


def _engine_builder(*, concurrency: bool) -> Builder:
    async def build(ctx: Ctx) -> Adapter:
        from ratelimit import Concurrency, RedisBackend, Rule, TokenBucket, keys
        from ratelimit.core.engine import Engine

        backend = RedisBackend(ctx.url, prefix=ctx.prefix)
        rate = ctx.limit.text()
        limits: list[Any] = [TokenBucket(rate, burst=ctx.limit.count, key=keys.header("x-api-key"))]
        if concurrency:
            limits.append(Concurrency(PROBE_LIMIT if ctx.probe else 1_000_000, key=keys.GLOBAL))
        rule = Rule("/bench", limits=limits)
        engine = Engine([rule], backend)
        scopes = [
            {
                "type": "http",
                "method": "GET",
                "path": "/bench",
                "headers": [(b"x-api-key", f"caller-{i}".encode())],
                "client": ("127.0.0.1", 40000 + i),
            }
            for i in range(256)
        ]

        async def acall(i: int) -> bool:
            decision = await engine.decide(rule, scopes[i])
            if decision.grant is not None and not ctx.probe:
                await engine.release(decision.grant)
            return decision.allowed

        async def close() -> None:
            await engine.aclose()
            await backend.aclose()

        return Adapter(close, acall)

    return build


def _limiter_builder(*, concurrency: bool) -> Builder:
    """The public core: `Limiter.check` (a bucket), or `Limiter.acquire` (bucket + slot)."""

    async def build(ctx: Ctx) -> Adapter:
        from ratelimit import (
            Concurrency,
            Limiter,
            RateLimited,
            RedisBackend,
            Rule,
            TokenBucket,
            keys,
        )

        rate = ctx.limit.text()
        limits: list[Any] = [TokenBucket(rate, burst=ctx.limit.count, key=keys.header("x-api-key"))]
        if concurrency:
            limits.append(Concurrency(PROBE_LIMIT if ctx.probe else 1_000_000, key=keys.GLOBAL))
        limiter = Limiter(
            rules=[Rule("/bench", name="bench", limits=limits)],
            backend=RedisBackend(ctx.url, prefix=ctx.prefix),
        )
        await limiter.start()
        callers = [f"caller-{i}" for i in range(256)]

        async def acall(i: int) -> bool:
            return (await limiter.check("bench", key=callers[i])).allowed

        async def acall_acquire(i: int) -> bool:
            try:
                async with limiter.acquire("bench", key=callers[i]):
                    return True
            except RateLimited:
                return False

        return Adapter(limiter.aclose, acall_acquire if concurrency else acall)

    return build


# -- peers ------------------------------------------------------------------------------


def _limits_builder(strategy: str) -> Builder:
    async def build(ctx: Ctx) -> Adapter:
        from limits import parse
        from limits.aio import strategies
        from limits.aio.storage import RedisStorage

        # The documented async Redis storage: `limits[async-redis]`, i.e. coredis.
        storage = RedisStorage(f"async+{ctx.url}", key_prefix=ctx.prefix)
        limiter = {
            "fixed": strategies.FixedWindowRateLimiter,
            "moving": strategies.MovingWindowRateLimiter,
            "sliding": strategies.SlidingWindowCounterRateLimiter,
        }[strategy](storage)
        item = parse(ctx.limit.text())
        callers = [f"caller-{i}" for i in range(256)]
        hit = limiter.hit

        async def acall(i: int) -> bool:
            return bool(await hit(item, "bench", callers[i]))

        async def close() -> None:
            storage.bridge.storage.connection_pool.disconnect()  # type: ignore[attr-defined]

        return Adapter(close, acall)

    return build


async def build_slowapi(ctx: Ctx) -> Adapter:
    """slowapi's per-request check for one `@limiter.limit` route, on its sync Redis storage."""
    from slowapi import Limiter
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address
    from starlette.requests import Request

    limiter = Limiter(key_func=get_remote_address, storage_uri=ctx.url, key_prefix=ctx.prefix)

    async def endpoint(request: Request) -> None:
        return None

    limiter.limit(ctx.limit.text())(endpoint)
    scopes = [
        {
            "type": "http",
            "method": "GET",
            "path": "/bench",
            "headers": [],
            "query_string": b"",
            "client": (f"10.0.{i // 256}.{i % 256}", 40000),
        }
        for i in range(256)
    ]
    check = limiter._check_request_limit

    def call(i: int) -> bool:
        try:
            check(Request(dict(scopes[i])), endpoint, False)
        except RateLimitExceeded:
            return False
        return True

    async def close() -> None:
        limiter._storage.storage.connection_pool.disconnect()  # type: ignore[attr-defined]

    return Adapter(close, call=call)


async def build_fastapi_limiter(ctx: Ctx) -> Adapter:
    """fastapi-limiter 0.1.6: `RateLimiter._check`, its Lua fixed window (one EVALSHA)."""
    import redis.asyncio as aredis
    from fastapi_limiter import FastAPILimiter
    from fastapi_limiter.depends import RateLimiter

    # As its README: redis.asyncio.from_url(..., encoding="utf-8", decode_responses=True).
    client = aredis.from_url(ctx.url, encoding="utf-8", decode_responses=True)
    await FastAPILimiter.init(client, prefix=ctx.prefix)
    limiter = RateLimiter(times=ctx.limit.count, seconds=ctx.limit.seconds)
    # The key its dependency builds: prefix, identifier (ip:path), route and dependency index.
    keys = [f"{ctx.prefix}:10.0.0.{i}:/bench:0:0" for i in range(256)]
    check = limiter._check

    async def acall(i: int) -> bool:
        return bool(await check(keys[i]) == 0)

    return Adapter(client.aclose, acall)


def _throttled_builder(algorithm: str) -> Builder:
    async def build(ctx: Ctx) -> Adapter:
        from throttled.asyncio import RateLimiterType, Throttled, store

        redis_store = store.RedisStore(server=ctx.url, options={})
        using = {"token_bucket": RateLimiterType.TOKEN_BUCKET, "gcra": RateLimiterType.GCRA}
        quota = ctx.limit.text("throttled")
        throttle = Throttled(using=using[algorithm].value, quota=quota, store=redis_store)
        keys = [f"{ctx.prefix}:caller-{i}" for i in range(256)]
        limit = throttle.limit

        async def acall(i: int) -> bool:
            return not (await limit(keys[i], cost=1)).limited

        async def close() -> None:
            client = redis_store._backend.get_client()
            await client.connection_pool.disconnect()

        return Adapter(close, acall)

    return build


def _pyrate_builder(kind: str) -> Builder:
    async def build(ctx: Ctx) -> Adapter:
        from pyrate_limiter import (
            Duration,
            Limiter,
            Rate,
            RedisBucket,
            RedisStateStore,
            StateBucket,
        )
        from redis.asyncio import ConnectionPool, Redis

        # As its README: an async Redis on a ConnectionPool.from_url, one bucket key.
        client = Redis(connection_pool=ConnectionPool.from_url(ctx.url))
        # One bucket for every caller (the README's set-up), so the limit is global:
        # with the never-reached limit, big enough that the whole run never reaches it.
        count = ctx.limit.count * (100 if ctx.limit == HUGE else 1)
        rate = Rate(count, Duration.SECOND if ctx.limit.seconds == 1 else Duration.MINUTE)
        if kind == "log":
            bucket: Any = await RedisBucket.init([rate], client, f"{ctx.prefix}:bucket")
        else:
            bucket = StateBucket([rate], store=RedisStateStore(client, f"{ctx.prefix}:state"))
        limiter = Limiter(bucket)
        names = [f"caller-{i}" for i in range(256)]
        acquire = limiter.try_acquire_async

        async def acall(i: int) -> bool:
            return bool(await acquire(names[i], blocking=False))

        async def close() -> None:
            limiter.close()
            await client.aclose()

        return Adapter(close, acall)

    return build


#: Every subject by name: (builder, concurrency by threads).
BUILDERS: dict[str, tuple[Builder, bool]] = {
    "redis-py PING": (build_ping, False),
    "redis-py EVALSHA": (build_evalsha, False),
    "raw pipelined EVALSHA": (build_raw_pipeline, False),
    "RedisBackend.decide bucket": (_backend_builder(lease=False), False),
    "RedisBackend.decide bucket+lease": (_backend_builder(lease=True), False),
    "RedisBackend.decide bucket+lease split by slot": (
        _backend_builder(lease=True, split=True),
        False,
    ),
    "Engine.decide bucket": (_engine_builder(concurrency=False), False),
    "Engine.decide+release bucket+concurrency": (_engine_builder(concurrency=True), False),
    "Limiter.check bucket": (_limiter_builder(concurrency=False), False),
    "Limiter.acquire bucket+concurrency": (_limiter_builder(concurrency=True), False),
    "limits fixed window": (_limits_builder("fixed"), False),
    "limits moving window": (_limits_builder("moving"), False),
    "limits sliding window": (_limits_builder("sliding"), False),
    "slowapi": (build_slowapi, True),
    "fastapi-limiter": (build_fastapi_limiter, False),
    "throttled-py token bucket": (_throttled_builder("token_bucket"), False),
    "throttled-py GCRA": (_throttled_builder("gcra"), False),
    "pyrate-limiter RedisBucket": (_pyrate_builder("log"), False),
    "pyrate-limiter GCRA": (_pyrate_builder("gcra"), False),
}
#: Subjects whose every call admits by construction (nothing to probe).
FLOOR = ("redis-py PING", "redis-py EVALSHA", "raw pipelined EVALSHA")


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Cell:
    """One subject at one concurrency in one round."""

    subject: str
    concurrency: int
    round: int
    decisions: int = 0
    refused: int = 0
    elapsed: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    #: Cores' worth of CPU other processes used meanwhile (not this worker, not Redis).
    others: float = 0.0
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.decisions / self.elapsed if self.elapsed > 0 else 0.0


async def _drive_async(
    acall: Callable[[int], Awaitable[bool]], concurrency: int, seconds: float
) -> tuple[list[int], int, float]:
    """`concurrency` tasks on this loop, each deciding for its own caller until time is up."""
    clock = time.perf_counter_ns
    deadline = clock() + int(seconds * 1e9)
    refused = 0

    async def task(i: int) -> list[int]:
        nonlocal refused
        samples: list[int] = []
        add = samples.append
        while True:
            start = clock()
            ok = await acall(i)
            end = clock()
            add(end - start)
            if not ok:
                refused += 1
            if end >= deadline:
                return samples

    started = clock()
    parts = await asyncio.gather(*(task(i) for i in range(concurrency)))
    elapsed = (clock() - started) / 1e9
    return [x for part in parts for x in part], refused, elapsed


def _drive_threads(
    call: Callable[[int], bool], concurrency: int, seconds: float
) -> tuple[list[int], int, float]:
    """`concurrency` threads (the caller's own thread when 1), each deciding for its caller."""
    clock = time.perf_counter_ns
    deadline = clock() + int(seconds * 1e9)
    refused = [0] * concurrency

    def loop(i: int) -> list[int]:
        samples: list[int] = []
        add = samples.append
        while True:
            start = clock()
            ok = call(i)
            end = clock()
            add(end - start)
            if not ok:
                refused[i] += 1
            if end >= deadline:
                return samples

    started = clock()
    if concurrency == 1:
        parts = [loop(0)]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            parts = list(pool.map(loop, range(concurrency)))
    elapsed = (clock() - started) / 1e9
    return [x for part in parts for x in part], sum(refused), elapsed


async def drive(adapter: Adapter, concurrency: int, seconds: float) -> tuple[list[int], int, float]:
    """Run `adapter` at `concurrency` for `seconds`: (latencies in ns, refusals, elapsed s)."""
    if adapter.acall is not None:
        return await _drive_async(adapter.acall, concurrency, seconds)
    assert adapter.call is not None
    return _drive_threads(adapter.call, concurrency, seconds)


def _percentile(sorted_ns: Sequence[int], q: float) -> float:
    """The `q` quantile (0..1) of sorted nanoseconds, in microseconds (nearest rank)."""
    if not sorted_ns:
        return 0.0
    k = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[k] / 1e3


async def measure_cell(
    ctx: Ctx, name: str, concurrency: int, rnd: int, spec: dict[str, Any], redis_pid: int
) -> Cell:
    """Build `name`, warm it up, wait for a quiet machine, measure, close it.

    Measured once more if other processes used the machine meanwhile.
    """
    builder, _ = BUILDERS[name]
    cell = Cell(name, concurrency, rnd)
    for attempt in range(2):
        cell = Cell(name, concurrency, rnd)
        gc.collect()
        try:
            adapter = await _bounded(builder(ctx.fresh(probe=False)), 0)
            try:
                await _bounded(drive(adapter, concurrency, spec["warmup"]), spec["warmup"])
                _support.wait_for_quiet(max_wait=spec["quiet_wait"], window=0.1)
                me, server, busy = _cpu_now(redis_pid)
                latencies, refused, elapsed = await _bounded(
                    drive(adapter, concurrency, spec["duration"]), spec["duration"]
                )
                me2, server2, busy2 = _cpu_now(redis_pid)
            finally:
                await adapter.close()
        except Exception as exc:  # a peer failing must not sink the whole run
            cell.error = f"{type(exc).__name__}: {exc}"[:300]
            return cell
        latencies.sort()
        cell.decisions = len(latencies)
        cell.refused = refused
        cell.elapsed = elapsed
        cell.p50_us = _percentile(latencies, 0.50)
        cell.p99_us = _percentile(latencies, 0.99)
        cell.others = max(0.0, (busy2 - busy) - (me2 - me) - (server2 - server)) / elapsed
        retry_until = spec.get("retry_until")
        out_of_time = retry_until is not None and time.time() >= retry_until
        if cell.others <= spec["disturbed"] or attempt or out_of_time:
            break
        print(f"    disturbed (others used {cell.others:.2f} core): measuring again", flush=True)
    return cell


#: Seconds a cell may overrun its planned time before it is abandoned as hung.
HUNG_AFTER = 20.0


async def _bounded(work: Awaitable[Any], planned: float) -> Any:
    """`work`, failed with TimeoutError if it runs `HUNG_AFTER` s past `planned` (a hung client)."""
    try:
        return await asyncio.wait_for(work, planned + HUNG_AFTER)
    except asyncio.TimeoutError:
        raise TimeoutError(f"no answer {HUNG_AFTER:.0f} s past a {planned} s run") from None


def _cpu_now(redis_pid: int) -> tuple[float, float, float]:
    """(this process's CPU s, redis-server's CPU s, the machine's busy CPU s)."""
    return (
        _support.process_cpu_seconds(os.getpid()),
        _support.process_cpu_seconds(redis_pid),
        _support.cpu_busy_seconds(),
    )


# -- commands per decision ----------------------------------------------------------------

_MONITOR_LINE = re.compile(r'^\+?[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"')


class _Monitor:
    """Redis `MONITOR` on a raw socket, read by a thread: which commands came from where."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.buffer = b""
        self.lines: list[str] = []
        self.done = threading.Event()
        self.marker = ""
        first = self._read_line()
        if first != "+OK":
            raise RuntimeError(f"MONITOR answered {first!r}")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _read_line(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("MONITOR connection closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def start(self, marker: str) -> None:
        self.marker = marker
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                line = self._read_line()
                if self.marker in line:
                    break
                self.lines.append(line)
        finally:
            self.done.set()

    def counts(self, timeout: float = 10.0) -> tuple[Counter[str], Counter[str]]:
        """(commands sent by clients, commands run inside scripts) seen before the marker."""
        if not self.done.wait(timeout):
            raise TimeoutError("MONITOR never showed the end marker")
        self.sock.close()
        sent: Counter[str] = Counter()
        scripted: Counter[str] = Counter()
        for line in self.lines:
            m = _MONITOR_LINE.match(line)
            if not m:
                continue
            source, command = m.group(1), m.group(2).upper()
            if command in ("INFO", "ECHO"):  # the counter's own calls
                continue
            (scripted if source == "lua" else sent)[command] += 1
        return sent, scripted


def _commandstats(port: int) -> dict[str, tuple[int, int]]:
    """`INFO commandstats` as {command: (calls, microseconds)}."""
    import redis

    client = redis.Redis(port=port)
    try:
        info = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}


#: Commands of the counting itself (stats, marker, monitor, its connections' handshakes).
_OWN = ("info", "echo", "monitor", "hello", "client")


async def count_commands(ctx: Ctx, name: str, decisions: int) -> dict[str, Any]:
    """Redis commands per decision of `name`: `INFO commandstats` deltas and MONITOR's split.

    The subject is warmed up first (scripts loaded, connections open), so
    one-off set-up is not counted. Two passes: the first, unmonitored, gives
    the counts and Redis's own time per decision (MONITOR would slow scripts,
    whose inner commands it reports); the second tells which commands the
    client sent and which ran inside scripts.
    """
    import redis

    builder, _ = BUILDERS[name]
    adapter = await _bounded(builder(ctx.fresh(probe=False)), 0)
    try:
        await _bounded(drive(adapter, 1, 0.05), 0.05)
        before = _commandstats(ctx.port)
        await _bounded(_repeat(adapter, decisions), 0)
        after = _commandstats(ctx.port)
        monitor = _Monitor(ctx.port)
        marker = f"bench-end-{os.getpid()}-{time.monotonic_ns()}"
        monitor.start(marker)
        await _bounded(_repeat(adapter, decisions), 0)
        client = redis.Redis(port=ctx.port)
        client.echo(marker)
        client.close()
        sent, scripted = monitor.counts()
    finally:
        await adapter.close()
    delta = {
        cmd: (calls - before.get(cmd, (0, 0))[0], usec - before.get(cmd, (0, 0))[1])
        for cmd, (calls, usec) in after.items()
        if cmd not in _OWN and calls != before.get(cmd, (0, 0))[0]
    }
    # Redis's time per decision: the top-level commands' (a script's includes its calls).
    top = {cmd.lower() for cmd in sent} - set(_OWN)
    return {
        "commandstats": {cmd: calls / decisions for cmd, (calls, _) in delta.items()},
        "server_us": sum(usec for cmd, (_, usec) in delta.items() if cmd in top) / decisions,
        "sent": {k: v / decisions for k, v in sent.items()},
        "scripted": {k: v / decisions for k, v in scripted.items()},
    }


async def _repeat(adapter: Adapter, n: int) -> list[bool]:
    """`n` decisions in a row for caller 0: whether each admitted."""
    out = []
    for _ in range(n):
        if adapter.acall is not None:
            out.append(await adapter.acall(0))
        else:
            assert adapter.call is not None
            out.append(adapter.call(0))
    return out


async def probe(ctx: Ctx, name: str) -> list[bool]:
    """Two decisions for one caller under a limit of 1 per minute: must be [True, False]."""
    builder, _ = BUILDERS[name]
    adapter = await _bounded(builder(ctx.fresh(probe=True)), 0)
    try:
        result: list[bool] = await _bounded(_repeat(adapter, 2), 0)
        return result
    finally:
        await adapter.close()


# -- Redis dead, breaker open ------------------------------------------------------------


@dataclass
class BreakerResult:
    """The cost of deciding with Redis dead once the breaker is open."""

    decide_p50_us: float
    decide_p99_us: float
    decide_mean_us: float
    calls: int
    seconds: float
    #: Probes the breaker let through meanwhile (one per `breaker_reset` seconds).
    probes: int
    #: Calls that raised (all of them: a call that returned would mean Redis answered).
    raised: int = 0
    #: In-process ASGI requests: bare app vs behind the middleware (fail open / closed).
    asgi_bare_us: float = 0.0
    asgi_open_us: float = 0.0
    asgi_closed_us: float = 0.0
    asgi_statuses: dict[str, list[int]] = field(default_factory=dict)


async def measure_breaker(seconds: float, requests: int) -> BreakerResult:
    """Time `RedisBackend.decide` and the middleware with Redis dead and the breaker open.

    Redis is "dead" as a port nobody listens on: connections are refused at
    once, as when the server process is gone. The breaker keeps its defaults
    (3 failures, 1 s pause), so the timed span includes its periodic probes.
    """
    from ratelimit import (
        BackendError,
        Concurrency,
        RateLimitMiddleware,
        RedisBackend,
        Rule,
        TokenBucket,
        keys,
    )
    from ratelimit.backends.base import BucketCheck, StoreKey
    from ratelimit.backends.breaker import CircuitBreaker

    logging.getLogger("ratelimit").setLevel(logging.CRITICAL)  # the outage is on purpose
    dead = f"redis://127.0.0.1:{_support.free_port()}/0"
    probes = 0

    def changed(old: str, new: str) -> None:
        nonlocal probes
        probes += new == "half_open"

    backend = RedisBackend(dead, breaker=CircuitBreaker(on_change=changed))
    checks = (BucketCheck(StoreKey("bench", "bucket", "ab" * 16), 1e-5, 100_000, 1),)
    for _ in range(10):
        if backend.breaker.state == "open":
            break
        with contextlib.suppress(BackendError):
            await backend.decide(checks)
    if backend.breaker.state != "open":
        raise RuntimeError(f"breaker did not open: {backend.breaker.state}")
    probes = 0
    samples: list[int] = []
    clock = time.perf_counter_ns
    deadline = clock() + int(seconds * 1e9)
    started = clock()
    decide = backend.decide
    raised = 0
    while True:
        t0 = clock()
        try:
            await decide(checks)
        except BackendError:  # BackendUnavailable: the breaker answered
            raised += 1
        t1 = clock()
        samples.append(t1 - t0)
        if t1 >= deadline:
            break
    elapsed = (clock() - started) / 1e9
    samples.sort()
    result = BreakerResult(
        _percentile(samples, 0.5),
        _percentile(samples, 0.99),
        sum(samples) / len(samples) / 1e3,
        len(samples),
        elapsed,
        probes,
        raised,
    )

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def limited(fail: str) -> Any:
        rule = Rule(
            "/bench",
            limits=[
                TokenBucket(f"{HUGE_PER_SECOND}/second", key=keys.header("x-api-key")),
                Concurrency(10_000, key=keys.GLOBAL),
            ],
        )
        return RateLimitMiddleware(
            inner,
            rules=[rule],
            backend=RedisBackend(dead),
            fail=fail,  # type: ignore[arg-type]
        )

    apps = {"bare": inner, "open": limited("open"), "closed": limited("closed")}
    per_request: dict[str, list[float]] = {k: [] for k in apps}
    for name, app in apps.items():
        result.asgi_statuses[name] = await _asgi_statuses(app)
    for _ in range(5):  # interleaved rounds; the median round is kept
        for name, app in apps.items():
            per_request[name].append(await _asgi_drive(app, requests))
    result.asgi_bare_us = statistics.median(per_request["bare"])
    result.asgi_open_us = statistics.median(per_request["open"])
    result.asgi_closed_us = statistics.median(per_request["closed"])
    return result


_SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/bench",
    "raw_path": b"/bench",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"bench"), (b"x-api-key", b"caller")],
    "client": ("127.0.0.1", 40000),
    "server": ("127.0.0.1", 8000),
}


async def _asgi_statuses(app: Any) -> list[int]:
    """The status of the first few requests (the breaker opens on the third failure)."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(5):
        await app(dict(_SCOPE), receive, send)
    return statuses


async def _asgi_drive(app: Any, n: int) -> float:
    """Microseconds per request of `n` requests straight through the ASGI callable."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    gc.collect()
    start = time.perf_counter_ns()
    for _ in range(n):
        await app(dict(_SCOPE), receive, send)
    return (time.perf_counter_ns() - start) / n / 1e3


# -- the run ------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {}
    for dist in (
        "surgelimit", "redis", "hiredis", "limits", "coredis", "slowapi", "fastapi-limiter",
        "throttled-py", "pyrate-limiter", "uvloop", "starlette",
    ):  # fmt: skip
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


async def main_async(spec: dict[str, Any]) -> dict[str, Any]:
    """Probes, command counts, the interleaved rounds, then the breaker."""
    ctx = Ctx(f"redis://127.0.0.1:{spec['port']}/0", spec["port"])
    names: list[str] = list(spec["subjects"])
    out: dict[str, Any] = {"versions": _versions(), "probes": {}, "commands": {}, "errors": {}}
    print("probes (limit 1/minute: the second decision must be refused) ...", flush=True)
    for name in names:
        if name in FLOOR:
            continue
        try:
            out["probes"][name] = await probe(ctx, name)
        except Exception as exc:
            out["errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  {name}: FAILED {out['errors'][name]}", flush=True)
    print("commands per decision (INFO commandstats, MONITOR) ...", flush=True)
    for name in names:
        if name in out["errors"]:
            continue
        try:
            out["commands"][name] = await count_commands(ctx, name, spec["count_decisions"])
        except Exception as exc:
            out["errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  {name}: FAILED {out['errors'][name]}", flush=True)
    live = [n for n in names if n not in out["errors"]]
    cells: list[Cell] = []
    for rnd in range(spec["rounds"]):
        shift = rnd % len(live) if live else 0
        for name in live[shift:] + live[:shift]:
            for concurrency in spec["concurrencies"]:
                cell = await measure_cell(ctx, name, concurrency, rnd, spec, spec["redis_pid"])
                cells.append(cell)
                flag = f"  ({cell.refused} refused!)" if cell.refused else ""
                if cell.error:
                    flag += f"  FAILED {cell.error}"
                if cell.others > spec["disturbed"]:
                    flag += f"  (disturbed: {cell.others:.2f} core)"
                print(
                    f"round {rnd + 1}/{spec['rounds']}  {name:<48} c={concurrency:<3}"
                    f"{cell.rate:>9.0f}/s  p50 {cell.p50_us:7.1f} us  p99 {cell.p99_us:7.1f} us"
                    f"{flag}",
                    flush=True,
                )
    out["cells"] = [asdict(c) for c in cells]
    print("Redis dead, breaker open ...", flush=True)
    try:
        out["breaker"] = asdict(
            await measure_breaker(spec["breaker_seconds"], spec["breaker_requests"])
        )
    except Exception as exc:
        out["errors"]["breaker"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def main(argv: Sequence[str]) -> int:
    """Read the spec, run on the loop it names (asyncio or uvloop), write the result."""
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("loop") == "uvloop":
        import uvloop

        result = uvloop.run(main_async(spec))
    else:
        result = asyncio.run(main_async(spec))
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
