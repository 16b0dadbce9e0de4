"""Redis faults through the middleware, on real servers: each policy, bounded answers, recovery.

Redis stopped mid-load: fail="open" admits, "closed" answers 503 with
Retry-After, "local" limits in-process; never a 500, and once the circuit
breaker is open every answer takes microseconds. Redis hung (SIGSTOP): requests
pay at most the timeout until the breaker opens. Redis restarted without its
scripts: decisions resume without restarting the app. Redis busy (several
processes hammering one key on this small machine): not one failed-open
decision. The numbers measured are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
from _servers import RedisServer, free_port
from asgi_helpers import http_scope
from prometheus_client import CollectorRegistry

from ratelimit import (
    Concurrency,
    Metrics,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    keys,
)
from ratelimit._types import ASGIApp, Message, Receive, Scope, Send
from ratelimit.backends.base import StoreKey, WindowCheck
from ratelimit.backends.breaker import BreakerState
from ratelimit.policy.rules import FailPolicy

pytestmark = pytest.mark.redis

SPAWN = multiprocessing.get_context("spawn")
#: A generous bound on the answers once the breaker is open (they take microseconds);
#: asserted on the 95th percentile, since a loaded 2-core CI box stalls now and then.
OPEN_BOUND = 0.1
#: No answer at all may take this long: that would be a hang, not scheduling noise.
HANG_BOUND = 1.0


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """The protected app: answers 200 at once."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def state(backend: RedisBackend) -> str:
    """The breaker's state, read afresh (a call, so type checkers do not narrow it)."""
    return backend.breaker.state


def limited(
    backend: RedisBackend,
    fail: FailPolicy,
    *,
    burst: int = 5,
    metrics: Metrics | None = None,
    local_share: float = 1.0,
) -> RateLimitMiddleware:
    """`hello` behind a per-key token bucket and a global concurrency cap, on `backend`."""
    rule = Rule(
        "/gen",
        limits=[
            TokenBucket("1/hour", burst=burst, key=keys.header("x-api-key"), name="per-key"),
            Concurrency(64, key=keys.GLOBAL, name="gpu"),
        ],
    )
    return RateLimitMiddleware(
        hello, rules=[rule], backend=backend, fail=fail, metrics=metrics, local_share=local_share
    )


@dataclass
class Answer:
    """One request's outcome, as the load saw it."""

    key: str
    status: int
    seconds: float
    retry_after: str | None
    #: The breaker's state when the request started.
    breaker: str


async def call(app: ASGIApp, key: str) -> tuple[int, dict[bytes, bytes]]:
    """One POST /gen straight into the ASGI app (no HTTP client): status and headers."""
    scope = http_scope("/gen", "POST", headers=[(b"x-api-key", key.encode())])
    start: dict[str, Any] = {}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)

    await app(scope, receive, send)
    return int(start["status"]), dict(start.get("headers", []))


async def load(
    app: RateLimitMiddleware,
    backend: RedisBackend,
    *,
    keys_: list[str],
    seconds: float,
    fault_at: float,
    fault: Callable[[], Any],
) -> tuple[list[Answer], list[Answer]]:
    """Requests from each key in a loop through httpx; `fault()` at `fault_at` s.

    Returns the answers started before the fault, and those started after it.
    """
    before: list[Answer] = []
    after: list[Answer] = []
    faulted = False
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        started = time.monotonic()

        async def one_key(key: str) -> None:
            while time.monotonic() - started < seconds:
                breaker = state(backend)
                into = after if faulted else before
                t0 = time.perf_counter()
                r = await client.post("/gen", headers={"x-api-key": key})
                into.append(
                    Answer(
                        key,
                        r.status_code,
                        time.perf_counter() - t0,
                        r.headers.get("retry-after"),
                        breaker,
                    )
                )
                await asyncio.sleep(0.002)

        async def inject() -> None:
            nonlocal faulted
            await asyncio.sleep(fault_at)
            await asyncio.to_thread(fault)
            faulted = True

        await asyncio.gather(inject(), *(one_key(k) for k in keys_))
    return before, after


def _ms(values: list[float]) -> str:
    if not values:
        return "none"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    p50, p99, top = q[49] * 1e3, q[98] * 1e3, max(values) * 1e3
    return f"n={len(values)} p50={p50:.2f} ms p99={p99:.2f} ms max={top:.2f} ms"


# -- Redis stopped mid-load -------------------------------------------------------------


@pytest.mark.parametrize("fail", ["open", "closed", "local"])
async def test_redis_stopped_mid_load_follows_the_policy_never_500(
    private_redis: RedisServer, fail: FailPolicy
) -> None:
    """Redis stopped under load: open admits, closed 503s with Retry-After, local limits here."""
    backend = RedisBackend(private_redis.url, breaker_reset=30.0)
    app = limited(backend, fail, burst=5, local_share=0.5)
    callers = [f"caller-{i}" for i in range(6)]
    try:
        before, after = await load(
            app, backend, keys_=callers, seconds=1.0, fault_at=0.3, fault=private_redis.stop
        )
    finally:
        await app.aclose()
    everything = before + after
    assert {a.status for a in everything} <= {200, 429, 503}, "never a 500"
    # Before the fault Redis decided: 5 per caller, then 429.
    for key in callers:
        assert [a.status for a in before if a.key == key][:6] == [200] * 5 + [429]
    opened = [a for a in after if a.breaker != "closed"]
    assert len(opened) > 20
    if fail == "open":
        assert {a.status for a in after} == {200}
    elif fail == "closed":
        assert {a.status for a in after} == {503}
        assert {a.retry_after for a in after} == {"1"}
    else:  # Redis's 5, then from the failure on an in-process bucket: burst 5 x 0.5 = 2
        for key in callers:
            statuses = [a.status for a in everything if a.key == key]
            assert statuses.count(200) == 5 + 2
            assert statuses[-3:] == [429] * 3
    assert p95([a.seconds for a in opened]) < OPEN_BOUND
    assert max(a.seconds for a in everything) < backend.timeout + HANG_BOUND
    print(
        f"\nfail={fail}: before the stop {_ms([a.seconds for a in before])}; "
        f"breaker open {_ms([a.seconds for a in opened])} (httpx client included)"
    )


async def test_breaker_open_cost_per_request_is_microseconds(private_redis: RedisServer) -> None:
    """With Redis dead and the breaker open, each policy adds microseconds per request."""
    backend = RedisBackend(private_redis.url, breaker_reset=60.0)
    apps = {fail: limited(backend, fail) for fail in ("open", "closed", "local")}
    n = 3000
    try:
        private_redis.stop()
        while state(backend) == "closed":
            await call(apps["open"], "k")
        timings: dict[str, list[float]] = {}
        contenders: list[tuple[str, ASGIApp]] = [("bare app", hello), *apps.items()]
        for name, app in contenders:
            await call(app, "warm-up")
            seconds = []
            for i in range(n):
                t0 = time.perf_counter()
                status, _ = await call(app, f"caller-{i % 50}")
                seconds.append(time.perf_counter() - t0)
                assert status in (200, 429, 503)
            timings[name] = seconds
    finally:
        for app in apps.values():
            await app.aclose()
    bare = statistics.median(timings["bare app"])
    report = ", ".join(
        f"{name} {(statistics.median(s) - bare) * 1e6:.1f} us"
        for name, s in timings.items()
        if name != "bare app"
    )
    print(f"\nadded per request with the breaker open (median of {n}, vs bare): {report}")
    for seconds in timings.values():
        assert p95(seconds) < OPEN_BOUND
        assert max(seconds) < HANG_BOUND


# -- Redis hung (SIGSTOP) ---------------------------------------------------------------


async def test_a_hung_redis_costs_the_timeout_until_the_breaker_opens(
    private_redis: RedisServer,
) -> None:
    """Redis stopped answering: requests wait at most the timeout, then microseconds."""
    # A short timeout, so the breaker opens early in the 1 s of load.
    backend = RedisBackend(private_redis.url, timeout=0.1, breaker_reset=0.5)
    app = limited(backend, "open", burst=1000)
    pid = private_redis.pid
    assert pid is not None
    try:
        before, after = await load(
            app,
            backend,
            keys_=[f"caller-{i}" for i in range(16)],
            seconds=1.2,
            fault_at=0.2,
            fault=lambda: os.kill(pid, signal.SIGSTOP),
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        assert {a.status for a in before + after} == {200}
        waited = [a for a in after if a.seconds > 0.02]
        opened = [a for a in after if a.breaker == "open"]
        probes = [a for a in opened if a.seconds >= OPEN_BOUND]
        fast = [a for a in opened if a.seconds < OPEN_BOUND]
        # Paid: the calls in flight on each of breaker_failures timed-out connections,
        # and one probe per pause (1 s of load, 0.5 s pauses); the rest answered at once.
        assert max(a.seconds for a in after) < backend.connect_timeout + backend.timeout + 0.5
        assert len(waited) <= 16 * backend.breaker.failures + 3
        assert len(probes) <= 3
        assert len(fast) > 100
        print(
            f"\nhung Redis: {len(waited)} of {len(after)} requests waited "
            f"({_ms([a.seconds for a in waited])}), {len(probes)} of them probes; "
            f"breaker open {_ms([a.seconds for a in fast])}"
        )
        # Redis answers again: a probe closes the breaker within a pause or two (the ghost
        # undos of the calls lost meanwhile probe too; one sent just before Redis came
        # back may have failed and re-opened it for another pause).
        deadline = time.monotonic() + 3 * backend.breaker.reset_after + 1
        while True:
            status, headers = await call(app, "after")
            assert status == 200
            if b"ratelimit" in headers:  # decided by Redis, not failed open
                break
            assert time.monotonic() < deadline, "the breaker never closed"
            await asyncio.sleep(0.05)
        assert state(backend) == "closed"
    finally:
        await app.aclose()


# -- Redis restarted, scripts flushed ---------------------------------------------------


@pytest.fixture
async def admin(private_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(private_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_script_flush_mid_load_fails_no_decision(
    private_redis: RedisServer, admin: redis.asyncio.Redis
) -> None:
    """SCRIPT FLUSH under load: NOSCRIPT reloads each script in place; nothing fails."""
    registry = CollectorRegistry()
    backend = RedisBackend(private_redis.url)
    app = limited(backend, "closed", burst=1000, metrics=Metrics(registry))

    async def flush() -> None:
        for _ in range(5):
            await asyncio.sleep(0.1)
            await admin.script_flush()

    try:
        flushing = asyncio.ensure_future(flush())
        before, after = await load(
            app, backend, keys_=["a", "b", "c", "d"], seconds=0.8, fault_at=0.0, fault=lambda: None
        )
        await flushing
    finally:
        await app.aclose()
    assert {a.status for a in before + after} == {200}
    failed = registry.get_sample_value(
        "ratelimit_decisions_total", {"rule": "gen", "limit": "", "outcome": "failed_closed"}
    )
    assert not failed
    assert registry.get_sample_value("ratelimit_breaker_open") == 0


async def test_decisions_resume_after_a_restart_without_restarting_the_app(
    private_redis: RedisServer,
) -> None:
    """Redis restarted (no state, no scripts): once it answers, Redis decides again."""
    backend = RedisBackend(private_redis.url, breaker_reset=0.2)
    app = limited(backend, "closed", burst=3)
    try:
        assert [(await call(app, "k"))[0] for _ in range(4)] == [200, 200, 200, 429]
        private_redis.stop()
        while state(backend) == "closed":
            assert (await call(app, "k"))[0] == 503
        private_redis.start()
        deadline = time.monotonic() + backend.breaker.reset_after + 1.0
        statuses: list[int] = []
        while time.monotonic() < deadline and statuses[-4:] != [200, 200, 200, 429]:
            statuses.append((await call(app, "k"))[0])
            await asyncio.sleep(0.01)
        # The fresh Redis has a full bucket for "k": three admitted, then its 429.
        assert statuses[-4:] == [200, 200, 200, 429]
        assert set(statuses[:-4]) <= {503}
        assert state(backend) == "closed"
        assert private_redis.info("number_of_cached_scripts") >= 1
    finally:
        await app.aclose()


# -- a busy Redis is not a dead one -----------------------------------------------------

PROCESSES = 6
TASKS = 32
SECONDS = 2.0
INTERVAL = 0.005
BURST = 20


def _busy_worker(url: str, barrier: Barrier, results: Any) -> None:
    results.put(asyncio.run(_hammer(url, barrier)))


async def _hammer(url: str, barrier: Barrier) -> dict[str, Any]:
    """TASKS concurrent requests in a loop, through the middleware with fail="open"."""
    registry = CollectorRegistry()
    backend = RedisBackend(url)
    changes: list[str] = []
    app = RateLimitMiddleware(
        hello,
        rules=[
            Rule(
                "/gen",
                limits=[TokenBucket(f"{1 / INTERVAL:g}/second", burst=BURST, key=keys.GLOBAL)],
            )
        ],
        backend=backend,
        fail="open",
        metrics=Metrics(registry),
    )
    previous = backend.breaker.on_change

    def record(old: BreakerState, new: BreakerState) -> None:
        changes.append(new)
        if previous is not None:
            previous(old, new)

    backend.breaker.on_change = record
    await call(app, "warm")  # connected, scripts loaded
    counts = {"admitted": 0, "refused": 0, "slowest": 0.0}
    barrier.wait(timeout=60)
    barrier.wait(timeout=10)
    deadline = time.monotonic() + SECONDS

    async def task() -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            status, _ = await call(app, "hammer")
            counts["slowest"] = max(counts["slowest"], time.perf_counter() - t0)
            if status == 200:
                counts["admitted"] += 1
            else:
                counts["refused"] += 1

    await asyncio.gather(*(task() for _ in range(TASKS)))
    await app.aclose()

    def outcome(name: str) -> float:
        return (
            registry.get_sample_value(
                "ratelimit_decisions_total", {"rule": "gen", "limit": "", "outcome": name}
            )
            or 0.0
        )

    return {
        **counts,
        "failed_open": outcome("failed_open"),
        "allowed_metric": outcome("allowed"),
        "errors": registry.get_sample_value(
            "ratelimit_backend_errors_total", {"operation": "decide"}
        ),
        "breaker_changes": changes,
    }


async def _server_time(url: str) -> float:
    client = redis.asyncio.Redis.from_url(url)
    try:
        sec, usec = await client.time()
        return sec + usec / 1e6
    finally:
        await client.aclose()


def test_a_busy_redis_never_fails_open(private_redis: RedisServer) -> None:
    """Six processes x 32 concurrent requests on one key (2 cores): no failed-open decision."""
    barrier = SPAWN.Barrier(PROCESSES + 1)
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_busy_worker, args=(private_redis.url, barrier, results))
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=60)
        started = asyncio.run(_server_time(private_redis.url))
        barrier.wait(timeout=10)
        outcomes = [results.get(timeout=60) for _ in procs]
        ended = asyncio.run(_server_time(private_redis.url))
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failed_open = sum(o["failed_open"] for o in outcomes)
    admitted = sum(o["admitted"] for o in outcomes)
    decisions = admitted + sum(o["refused"] for o in outcomes)
    allowed = BURST + (ended - started) / INTERVAL
    print(
        f"\n{PROCESSES} processes x {TASKS} tasks: {decisions} decisions in "
        f"{ended - started:.2f}s ({decisions / (ended - started):.0f}/s), {admitted} admitted "
        f"(at most {allowed:.0f}), failed open {failed_open:.0f}, slowest "
        f"{max(o['slowest'] for o in outcomes) * 1e3:.1f} ms"
    )
    assert failed_open == 0
    assert [o["breaker_changes"] for o in outcomes] == [[]] * PROCESSES
    assert all(not o["errors"] for o in outcomes)
    assert admitted == sum(o["allowed_metric"] for o in outcomes) - PROCESSES  # minus warm-ups
    assert admitted <= allowed + 1e-6
    assert decisions > 3 * admitted  # the key was contended


# -- over real HTTP -------------------------------------------------------------------


def test_real_uvicorn_answers_503_when_redis_is_killed_then_recovers(
    private_redis: RedisServer,
) -> None:
    """Under uvicorn, Redis SIGKILLed: 503 with Retry-After, never a 500; restarted: decided."""
    root = Path(__file__).resolve().parents[1]
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{root / 'tests'}{os.pathsep}{root}",
        "RATELIMIT_REDIS_URL": private_redis.url,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "apps.redis_fault_app:app", "--port", str(port),
         "--host", "127.0.0.1", "--log-level", "critical"],
        env=env,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    first = client.post("/gen", headers={"x-api-key": "a"})
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, "uvicorn exited"
                    assert time.monotonic() < deadline, "uvicorn did not start"
                    time.sleep(0.05)
            assert first.status_code == 200
            private_redis.kill()
            refused = []
            for _ in range(50):
                t0 = time.perf_counter()
                r = client.post("/gen", headers={"x-api-key": "a"})
                refused.append(
                    (r.status_code, r.headers.get("retry-after"), time.perf_counter() - t0)
                )
            assert {(status, retry) for status, retry, _ in refused} == {(503, "1")}
            assert max(seconds for _, _, seconds in refused) < 0.5
            private_redis.start()
            deadline = time.monotonic() + 5
            statuses: list[int] = []
            while statuses[-4:] != [200, 200, 200, 429]:
                assert time.monotonic() < deadline, statuses
                statuses.append(client.post("/gen", headers={"x-api-key": "b"}).status_code)
                time.sleep(0.02)
            assert set(statuses) <= {200, 429, 503}
        print(
            "\nuvicorn, Redis killed: 50 refusals over HTTP, slowest "
            f"{max(s for _, _, s in refused) * 1e3:.1f} ms"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


PROBE = StoreKey("w", "window", "*")


async def test_window_limits_go_through_the_breaker(private_redis: RedisServer) -> None:
    """A Window on Redis is a check of the backend's scripts, behind its breaker: with Redis
    stopped, window decisions open it, then fail at once without a connection attempt,
    and a restarted Redis closes it."""
    from ratelimit import BackendError, BackendUnavailable, Window

    backend = RedisBackend(private_redis.url, breaker_reset=0.3)
    app = RateLimitMiddleware(
        hello,
        rules=[Rule("/w", limits=[Window("100/minute", key=keys.GLOBAL)])],
        backend=backend,
        fail="closed",
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            assert (await c.get("/w")).status_code == 200
            private_redis.stop()
            codes = [(await c.get("/w")).status_code for _ in range(backend.breaker.failures)]
            assert codes == [503] * backend.breaker.failures  # failed closed, never 500
            assert state(backend) == "open"
            started = time.perf_counter()
            with pytest.raises(BackendUnavailable):
                await backend.decide([WindowCheck(PROBE, 100, 60.0, "fixed", 1, [])])
            assert time.perf_counter() - started < OPEN_BOUND
            private_redis.start()
            await asyncio.sleep(0.35)
            assert (await c.get("/w")).status_code == 200  # the probe closes the breaker
            assert state(backend) == "closed"
            assert issubclass(BackendUnavailable, BackendError)
    finally:
        await app.aclose()
