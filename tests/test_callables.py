"""A key, cost, priority or fair_key function that fails refuses its request with 400.

Whatever the rule's `fail` policy: the request is not admitted for free, nothing
is consumed (the next good request sees the full quota), the error is logged in
the callable's name (not as a backend failure) and the breaker never hears of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from asgi_helpers import http_scope
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ratelimit import (
    Backend,
    CallableError,
    Concurrency,
    MemoryBackend,
    Metrics,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit._types import Scope
from ratelimit.backends.base import QueueBackend, StoreKey
from ratelimit.core.callables import CallableErrorLog
from ratelimit.core.engine import Engine

BAD = b"x-bad"


def _bad(scope: Scope) -> bool:
    return any(name == BAD for name, _ in scope["headers"])


def _header(scope: Scope, name: bytes) -> str:
    return next(v.decode() for k, v in scope["headers"] if k == name)


@dataclass(frozen=True)
class Case:
    """One way a callable fails: which role, and what it does for a bad request."""

    id: str
    role: str  # "key", "cost", "priority", "fair_key"
    #: Called for a bad request: raises, or returns the bad value.
    misbehave: Callable[[], Any]
    #: The rule under test: one token bucket only (the engine's short path).
    single: bool = False
    is_async: bool = False


def _int_of_abc() -> Any:
    return int("abc")


CASES = [
    Case("key-raises", "key", _int_of_abc),
    Case("key-raises-single-bucket", "key", _int_of_abc, single=True),
    Case("async-key-raises", "key", _int_of_abc, is_async=True),
    Case("cost-raises", "cost", _int_of_abc),
    Case("cost-minus-1", "cost", lambda: -1),
    Case("cost-0", "cost", lambda: 0),
    Case("cost-1.5", "cost", lambda: 1.5),
    Case("cost-True", "cost", lambda: True),
    Case("cost-str-3", "cost", lambda: "3"),
    Case("cost-None", "cost", lambda: None),
    Case("cost-2**53+1", "cost", lambda: 2**53 + 1),
    Case("cost-10**400", "cost", lambda: 10**400),
    Case("priority-raises", "priority", _int_of_abc),
    Case("priority-unknown-class", "priority", lambda: "platinum"),
    Case("priority-float", "priority", lambda: 1.5),
    Case("fair-key-raises", "fair_key", _int_of_abc),
]


def _callables(case: Case) -> dict[str, Callable[[Scope], Any]]:
    """The four callables of the rule: good for good requests, `case`'s role misbehaving."""

    def api_key(scope: Scope) -> Any:
        if case.role == "key" and _bad(scope):
            return case.misbehave()
        return _header(scope, b"x-api-key")

    async def async_api_key(scope: Scope) -> Any:
        return api_key(scope)

    def cost(scope: Scope) -> Any:
        return case.misbehave() if case.role == "cost" and _bad(scope) else 1

    def tier(scope: Scope) -> Any:
        return case.misbehave() if case.role == "priority" and _bad(scope) else "paid"

    def caller(scope: Scope) -> Any:
        return case.misbehave() if case.role == "fair_key" and _bad(scope) else "someone"

    return {
        "key": async_api_key if case.is_async else api_key,
        "cost": cost,
        "priority": tier,
        "fair_key": caller,
    }


def _rule(case: Case, fail: str) -> Rule:
    """A bucket of 2 per API key and one GPU slot with a line (all four callables)."""
    f = _callables(case)
    if case.single:
        return Rule("/gen", limits=[TokenBucket("2/minute", key=f["key"], name="per-key")])
    return Rule(
        "/gen",
        limits=[
            TokenBucket("2/minute", key=f["key"], name="per-key"),
            Concurrency(
                1,
                key=keys.GLOBAL,
                queue=4,
                timeout=5.0,
                priority=f["priority"],
                classes=["paid", "free"],
                fair_key=f["fair_key"],
                name="gpu",
            ),
        ],
        cost=f["cost"],
        fail=fail,  # type: ignore[arg-type]
    )


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_backend(request: pytest.FixtureRequest) -> Callable[[], Backend]:
    """A fresh backend: a MemoryBackend, or a RedisBackend whose breaker opens on the
    first failure it counts (so any counted failure shows)."""
    if request.param == "memory":
        return MemoryBackend
    url = request.getfixturevalue("redis_url")
    return lambda: RedisBackend(url, breaker_failures=1, breaker_reset=60.0)


class Served:
    """The app behind the limiter, counting the requests it ran."""

    def __init__(self) -> None:
        self.runs = 0

    async def gen(self, request: Request) -> Response:
        self.runs += 1
        return PlainTextResponse("ok")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/gen", self.gen)])


@pytest.fixture
def served() -> Served:
    return Served()


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


GOOD = {"x-api-key": "alice"}
BAD_HEADERS = {**GOOD, "x-bad": "1"}


@pytest.mark.parametrize("fail", ["open", "closed", "local"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_a_failing_callable_refuses_with_400_and_consumes_nothing(
    case: Case,
    fail: str,
    make_backend: Callable[[], Backend],
    served: Served,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """400 problem+json, app not run, whatever `fail`; then the full quota (2) is there,
    the error is logged naming the callable, and no backend failure is recorded."""
    backend = make_backend()
    rule = _rule(case, fail)
    limiter = RateLimitMiddleware(served.app(), rules=[rule], backend=backend, fail=fail)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="ratelimit")
    try:
        async with _client(limiter) as c:
            bad = await c.get("/gen", headers=BAD_HEADERS)
            assert bad.status_code == 400
            assert bad.headers["content-type"] == "application/problem+json"
            problem = bad.json()
            assert (problem["status"], problem["title"]) == (400, "Bad Request")
            assert "abc" not in bad.text
            assert "platinum" not in bad.text
            assert served.runs == 0
            codes = [(await c.get("/gen", headers=GOOD)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]  # the whole bucket of 2 was still there
        assert served.runs == 2
    finally:
        await limiter.aclose()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    message = errors[0].getMessage()
    role = "key" if case.role == "key" else case.role
    assert f"{role} function " in message
    assert "_callables.<locals>." in message  # the callable's __qualname__
    assert "rule 'gen'" in message
    if case.role != "cost":
        assert ("limit 'per-key'" if role == "key" else "limit 'gpu'") in message
    assert "backend" not in message.replace("not a backend failure", "")
    assert not any("backend failed" in r.getMessage() for r in caplog.records)
    assert limiter.limiter.failing is False
    if isinstance(backend, RedisBackend):
        assert backend.breaker.state == "closed"


async def test_a_fair_key_that_fails_while_the_slot_is_taken_raises_before_queueing(
    make_backend: Callable[[], Backend],
) -> None:
    """With the one slot held, a bad fair key raises CallableError at once: the request
    joins no line and takes nothing; the holder's release then admits a good request."""
    case = next(c for c in CASES if c.id == "fair-key-raises")
    rule = _rule(case, "open")
    engine = Engine([rule], make_backend())
    good = http_scope("/gen", headers=[(b"x-api-key", b"alice")])
    bad = http_scope("/gen", headers=[(b"x-api-key", b"bob"), (BAD, b"1")])
    try:
        holder = await engine.decide(rule, good)
        assert holder.allowed
        assert holder.grant is not None
        with pytest.raises(CallableError, match=r"^fair_key function .*caller of rule 'gen'"):
            await engine.decide(rule, bad)
        gpu = StoreKey("gen", "gpu", "*")
        backend = engine.backend
        assert isinstance(backend, QueueBackend)
        assert (await backend.queue_length(gpu), await backend.in_use(gpu)) == (0, 1)
        await engine.release(holder.grant)
        again = await engine.decide(rule, good)
        assert again.allowed
        assert again.grant is not None
        await engine.release(again.grant)
    finally:
        await engine.aclose()
        await engine.backend.aclose()


async def test_failing_callables_are_logged_once_per_ten_seconds_with_a_count() -> None:
    """A flood of bad requests logs one record per callable per 10 s; the next one says
    how many were left out."""
    now = [100.0]
    logged: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record)

    log = logging.getLogger("ratelimit-test-throttle")
    log.addHandler(Keep())
    log.propagate = False
    errors = CallableErrorLog(log, clock=lambda: now[0])

    def cost(scope: Scope) -> int:
        return int("abc")

    def other(scope: Scope) -> int:
        return int("abc")

    def failed(func: Any) -> CallableError:
        try:
            func({})
        except ValueError as exc:
            err = CallableError("cost", func, "gen", "", "raised ValueError")
            err.__cause__ = exc
            return err
        raise AssertionError

    assert errors.report(failed(cost))
    assert [errors.report(failed(cost)) for _ in range(5)] == [False] * 5
    assert errors.report(failed(other))  # another callable has its own allowance
    now[0] += 10.0
    assert errors.report(failed(cost))
    assert len(logged) == 3
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert "5 more like it" in logged[2].getMessage()
    assert "failed.<locals>" not in logged[0].getMessage()
    assert "test_failing_callables_are_logged_once_per_ten_seconds_with_a_count.<locals>.cost" in (
        logged[0].getMessage()
    )


async def test_a_flood_of_bad_requests_logs_one_error(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """50 bad requests in a row: 50 refusals, one ERROR record."""
    case = CASES[0]
    limiter = RateLimitMiddleware(served.app(), rules=[_rule(case, "open")])
    caplog.set_level(logging.INFO, logger="ratelimit")
    async with _client(limiter) as c:
        codes = {(await c.get("/gen", headers=BAD_HEADERS)).status_code for _ in range(50)}
    assert codes == {400}
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


async def test_failing_callables_are_counted_as_invalid(served: Served) -> None:
    """Metrics count the outcome `invalid`, by the limit whose callable failed ("" for the
    cost); no backend error is counted."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    key_case = next(c for c in CASES if c.id == "key-raises")
    cost_case = next(c for c in CASES if c.id == "cost-0")
    rules = [_rule(key_case, "open")]
    rules.append(
        Rule("/gen", limits=[TokenBucket("2/minute")], cost=_callables(cost_case)["cost"], name="c")
    )
    limiter = RateLimitMiddleware(served.app(), rules=rules[:1], metrics=metrics)
    async with _client(limiter) as c:
        for _ in range(3):
            assert (await c.get("/gen", headers=BAD_HEADERS)).status_code == 400
    other = CollectorRegistry()
    cost_limiter = RateLimitMiddleware(served.app(), rules=rules[1:], metrics=Metrics(other))
    async with _client(cost_limiter) as c:
        assert (await c.get("/gen", headers=BAD_HEADERS)).status_code == 400

    def value(reg: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
        return reg.get_sample_value(name, labels)

    counted = value(
        registry,
        "ratelimit_decisions_total",
        {"rule": "gen", "limit": "per-key", "outcome": "invalid"},
    )
    assert counted == 3
    assert (
        value(other, "ratelimit_decisions_total", {"rule": "c", "limit": "", "outcome": "invalid"})
        == 1
    )
    assert value(registry, "ratelimit_backend_errors_total", {"operation": "decide"}) == 0
    await limiter.aclose()
    await cost_limiter.aclose()


async def test_a_failing_callable_of_a_shadow_rule_lets_the_request_through(
    served: Served,
) -> None:
    """Shadow mode never refuses: the request reaches the app, counted `shadow_invalid`."""
    registry = CollectorRegistry()
    case = next(c for c in CASES if c.id == "cost-raises")
    limiter = RateLimitMiddleware(
        served.app(), rules=[_rule(case, "open")], shadow=True, metrics=Metrics(registry)
    )
    async with _client(limiter) as c:
        assert (await c.get("/gen", headers=BAD_HEADERS)).status_code == 200
    assert served.runs == 1
    labels = {"rule": "gen", "limit": "", "outcome": "shadow_invalid"}
    assert registry.get_sample_value("ratelimit_decisions_total", labels) == 1
    await limiter.aclose()


async def test_the_problem_body_is_valid_json_without_request_data(served: Served) -> None:
    """The body names the problem, not the exception or what the request sent."""
    case = next(c for c in CASES if c.id == "priority-unknown-class")
    limiter = RateLimitMiddleware(served.app(), rules=[_rule(case, "open")])
    async with _client(limiter) as c:
        r = await c.get("/gen", headers=BAD_HEADERS)
    body = json.loads(r.content)
    assert set(body) == {"type", "title", "status", "detail"}
    assert "rated" in body["detail"]
    assert int(r.headers["content-length"]) == len(r.content)


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_a_huge_cost_read_from_the_request_is_refused_not_a_backend_failure(
    fail: str, make_backend: Callable[[], Backend], served: Served
) -> None:
    """A cost of 2**62 (`?n=4611686018427387904`) against a Window gets 400 and runs
    nothing: on Redis the window's INCRBY once refused it, and fail="open" admitted it."""
    backend = make_backend()
    rule = Rule(
        "/gen",
        limits=[Window("2/minute", key=keys.header("x-api-key"), name="per-key")],
        cost=lambda scope: int(scope["query_string"].split(b"=")[1]),
    )
    limiter = RateLimitMiddleware(served.app(), rules=[rule], backend=backend, fail=fail)  # type: ignore[arg-type]
    try:
        async with _client(limiter) as c:
            huge = [(await c.get(f"/gen?n={2**62}", headers=GOOD)).status_code for _ in range(3)]
            assert served.runs == 0
            assert huge == [400, 400, 400]
            codes = [(await c.get("/gen?n=1", headers=GOOD)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
    finally:
        await limiter.aclose()
