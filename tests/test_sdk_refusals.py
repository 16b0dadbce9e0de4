"""Refusals the openai and anthropic SDKs understand: when to come back (spread, never
early, never a lie), `retry-after-ms`, `x-should-retry`, OpenAI-style bodies and
header fields, and the real `openai` SDK retrying against a limited endpoint."""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from typing import Any

import httpx
import httpx2
import openai
import pytest
from asgi_helpers import http_scope
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ratelimit import (
    Concurrency,
    ConfigError,
    MemoryBackend,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit._types import Receive, Scope, Send
from ratelimit.asgi.openai_style import compile_fields, duration
from ratelimit.backends.base import CheckResult
from ratelimit.core.engine import Engine


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cost_header(scope: Scope) -> int:
    return int(dict(scope["headers"]).get(b"x-cost", b"1"))


def ask(cost: int = 1, who: str = "k") -> dict[str, Any]:
    return http_scope("/x", headers=[(b"x-key", who.encode()), (b"x-cost", str(cost).encode())])


def engine_of(limit: Any, clock: ManualClock, cost: Any = cost_header) -> Engine:
    return Engine([Rule("/x", limits=[limit], cost=cost, name="x")], MemoryBackend(clock=clock))


# -- when a refused caller is told to come back ------------------------------------


async def test_callers_refused_by_a_bucket_together_are_told_one_interval_apart() -> None:
    """The k-th caller refused in one interval is told k intervals: only then can it get in."""
    clock = ManualClock()
    eng = engine_of(TokenBucket("1/second", burst=1, key=keys.header("x-key")), clock, 1)
    assert (await eng.decide(eng.rules[0], ask())).allowed
    waits = [(await eng.decide(eng.rules[0], ask())).retry_after for _ in range(3)]
    assert waits == pytest.approx([1.0, 2.0, 3.0])


async def test_every_told_caller_that_comes_back_on_time_is_admitted() -> None:
    """Never earlier than honest: callers of mixed costs refused together, each coming
    back at the time it was told (and no sooner than the one told before it), all get in."""
    rng = random.Random(15)
    for _ in range(20):
        clock = ManualClock()
        eng = engine_of(TokenBucket("10/second", burst=3, key=keys.header("x-key")), clock)
        rule = eng.rules[0]
        while (await eng.decide(rule, ask(1))).allowed:
            pass
        told = []
        for _ in range(rng.randint(2, 6)):
            cost = rng.randint(1, 3)
            d = await eng.decide(rule, ask(cost))
            assert not d.allowed
            told.append((clock.now + d.retry_after, cost))
        assert [at for at, _ in told] == sorted(at for at, _ in told)
        for at, cost in told:
            clock.now = at + 1e-9
            assert (await eng.decide(rule, ask(cost))).allowed, told


async def test_a_promise_lapses_once_its_time_has_passed() -> None:
    """Once the told instants are past, a refusal is told the store's own answer."""
    clock = ManualClock()
    eng = engine_of(TokenBucket("1/second", burst=1, key=keys.header("x-key")), clock, 1)
    await eng.decide(eng.rules[0], ask())
    for _ in range(3):
        await eng.decide(eng.rules[0], ask())
    clock.now += 3.5  # the told callers never came: nobody took the units
    await eng.decide(eng.rules[0], ask())  # admitted
    assert (await eng.decide(eng.rules[0], ask())).retry_after == pytest.approx(1.0)


async def test_a_fixed_window_spreads_its_refusals_over_the_next_window() -> None:
    """Window refusals start at the window's end and are spaced period/amount per unit."""
    clock = ManualClock()
    eng = engine_of(Window("2/minute", key=keys.header("x-key")), clock, 1)
    for _ in range(2):
        await eng.decide(eng.rules[0], ask())
    clock.now += 10
    waits = [(await eng.decide(eng.rules[0], ask())).retry_after for _ in range(3)]
    assert waits == pytest.approx([50.0, 80.0, 110.0])


async def test_a_full_pool_spreads_its_refusals_by_slot_turnover() -> None:
    """Refusals of a full pool are spaced service time / slots (the hint before any)."""
    clock = ManualClock()
    eng = engine_of(Concurrency(2, key=keys.GLOBAL, retry_after=1.0), clock, 1)
    for _ in range(2):
        assert (await eng.decide(eng.rules[0], ask())).allowed
    waits = [(await eng.decide(eng.rules[0], ask())).retry_after for _ in range(3)]
    assert waits == pytest.approx([1.0, 1.5, 2.0])


@pytest.mark.parametrize(
    "limit",
    [TokenBucket("10/second", burst=2, key=keys.header("x-key")), Window("2/minute")],
    ids=["bucket", "window"],
)
async def test_a_cost_a_limit_can_never_admit_waits_forever(limit: Any) -> None:
    """A request costing more than a rate limit's capacity is told math.inf, not a time."""
    eng = engine_of(limit, ManualClock())
    d = await eng.decide(eng.rules[0], ask(3))
    assert (d.allowed, d.retry_after) == (False, math.inf)


# -- the header fields and bodies of a refusal ---------------------------------------


async def ok(request: Request) -> Response:
    return JSONResponse({"created": 0, "data": [{"url": "https://example.invalid/1.png"}]})


def limited(limits: list[Any], clock: ManualClock | None = None, **options: Any) -> Any:
    app = Starlette(routes=[Route("/v1/images/generations", ok, methods=["POST"])])
    backend = MemoryBackend() if clock is None else MemoryBackend(clock=clock)
    rule = Rule("/v1/images/generations", limits=limits, cost=options.pop("cost", 1))
    return RateLimitMiddleware(app, rules=[rule], backend=backend, **options)


async def post(app: Any, n: int, **headers: str) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return [await c.post("/v1/images/generations", headers=headers) for _ in range(n)]


async def test_a_refusal_carries_retry_after_ms_and_says_to_retry() -> None:
    """A sub-second wait: `Retry-After: 1` (whole seconds) and the exact `retry-after-ms`."""
    app = limited([TokenBucket("2/second", burst=1, key=keys.GLOBAL)], ManualClock())
    refused = (await post(app, 2))[1]
    assert refused.status_code == 503
    h = refused.headers
    assert (h["retry-after"], h["retry-after-ms"], h["x-should-retry"]) == ("1", "500", "true")


@pytest.mark.parametrize(("within", "should"), [(None, "false"), (7200.0, "true")])
async def test_a_wait_longer_than_a_client_waits_says_not_to_retry(
    within: float | None, should: str
) -> None:
    """An hour's wait is `x-should-retry: false` by default (past 60 s), still honest."""
    options = {} if within is None else {"should_retry_within": within}
    app = limited([TokenBucket("1/hour", burst=1, key=keys.GLOBAL)], ManualClock(), **options)
    refused = (await post(app, 2))[1]
    assert refused.headers["retry-after"] == "3600"
    assert refused.headers["x-should-retry"] == should


async def test_a_request_that_can_never_be_admitted_says_so_and_promises_no_time() -> None:
    """Cost over the burst: no `Retry-After` (it would be a lie), `x-should-retry: false`."""
    app = limited([TokenBucket("10/minute", burst=2, key=keys.GLOBAL)], cost=lambda s: 3)
    refused = (await post(app, 1))[0]
    assert refused.status_code == 503
    assert "retry-after" not in refused.headers
    assert "retry-after-ms" not in refused.headers
    assert refused.headers["x-should-retry"] == "false"
    assert "never admitted" in refused.json()["detail"]


def window_of(field: str, name: str) -> int:
    match = re.search(rf'"{re.escape(name)}";r=\d+;t=(\d+)', field)
    assert match is not None, field
    return int(match.group(1))


@pytest.mark.parametrize(
    "limit",
    [
        TokenBucket("5/minute", burst=5, key=keys.GLOBAL, name="bucket"),
        Window("6/minute", strategy="sliding", key=keys.GLOBAL, name="sliding"),
        Window("7/minute", strategy="moving", key=keys.GLOBAL, name="moving"),
        Window("8/minute", strategy="fixed", key=keys.GLOBAL, name="fixed"),
    ],
    ids=lambda limit: limit.name,
)
async def test_retry_after_never_ends_before_the_refusing_limits_effective_window(
    limit: Any,
) -> None:
    """draft-11: `Retry-After` is never earlier than the `t` of the limit that refused."""
    rng = random.Random(11)
    clock = ManualClock()
    app = limited([limit], clock, cost=cost_header)
    refusals = 0
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for _ in range(200):
            clock.now += rng.choice([0.0, 0.5, 3.0, 11.0, 40.0])
            r = await c.post("/v1/images/generations", headers={"x-cost": str(rng.randint(1, 3))})
            if r.status_code == 200:
                continue
            refusals += 1
            t = window_of(r.headers["ratelimit"], limit.name)
            assert int(r.headers["retry-after"]) >= t, r.headers
    assert refusals > 20


async def test_the_openai_body_carries_the_limiters_message() -> None:
    """`refusal_body="openai"`: {"error": {"message", "type", "param", "code"}}."""
    app = limited(
        [TokenBucket("1/minute", burst=1, key=keys.header("authorization"), name="images")],
        ManualClock(),
        refusal_body="openai",
    )
    refused = (await post(app, 2, authorization="Bearer k"))[1]
    assert (refused.status_code, refused.headers["content-type"]) == (429, "application/json")
    assert refused.json() == {
        "error": {
            "message": "Rate limit reached for images. Retry in 60 seconds.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"refusal_body": "xml"}, "refusal_body"),
        ({"dialect": "anthropic"}, "dialect"),
        ({"should_retry_within": -1}, "should_retry_within"),
    ],
)
def test_unknown_refusal_options_fail_at_construction(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        limited([TokenBucket("1/minute")], **options)


# -- the OpenAI-style header dialect -------------------------------------------------


async def test_the_openai_dialect_adds_x_ratelimit_fields_to_every_limited_response() -> None:
    """`dialect="openai"`: limit, remaining and reset per unit, on admissions and refusals."""
    app = limited(
        [TokenBucket("3/minute", burst=3, key=keys.GLOBAL), Concurrency(4)],
        ManualClock(),
        dialect="openai",
    )
    first, _, _, refused = await post(app, 4)
    assert (first.headers["x-ratelimit-limit-requests"], first.headers["ratelimit"]) == (
        "3",
        '"token-bucket";r=2;t=20, "concurrency";r=3',
    )
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"] == "20s"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert not any(k.startswith("x-ratelimit-") for k in (await post(limited(
        [TokenBucket("3/minute")]), 1))[0].headers)  # fmt: skip


def test_the_dialect_names_token_limits_tokens_and_shows_the_one_met_first() -> None:
    """Limits counting token dimensions share `-tokens`; the least available quota speaks."""
    rule = Rule(
        "/v1/chat/completions",
        limits=[
            TokenBucket("60/minute", name="rpm"),
            TokenBucket("40000/minute", counts="input_tokens", name="itpm"),
            TokenBucket("8000/minute", counts="output_tokens", name="otpm"),
            Window("100/day", counts="images", name="images"),
            Concurrency(4),
        ],
        cost={"input_tokens": 1, "output_tokens": 1, "images": 1},
    )
    render = compile_fields(rule)
    assert render is not None
    results = [
        CheckResult(True, 59, 0.0, 1.0),
        CheckResult(True, 39000, 0.0, 1.5),
        CheckResult(True, 7000, 0.0, 7.5),
        CheckResult(True, 99, 0.0, 86399.0),
        CheckResult(True, 3, 0.0, 0.0),
    ]
    assert dict(render(results)) == {
        b"x-ratelimit-limit-requests": b"60",
        b"x-ratelimit-remaining-requests": b"59",
        b"x-ratelimit-reset-requests": b"1s",
        b"x-ratelimit-limit-tokens": b"8000",
        b"x-ratelimit-remaining-tokens": b"7000",
        b"x-ratelimit-reset-tokens": b"7.5s",
        b"x-ratelimit-limit-images": b"100",
        b"x-ratelimit-remaining-images": b"99",
        b"x-ratelimit-reset-images": b"23h59m59s",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, b"0s"), (0.0195, b"20ms"), (1.5, b"1.5s"), (360.0, b"6m0s"), (3725.25, b"1h2m5.25s")],
)
def test_reset_fields_are_written_as_openai_writes_them(seconds: float, text: bytes) -> None:
    assert duration(seconds) == text


# -- the real openai SDK -------------------------------------------------------------


class Recorder:
    """An ASGI app in front of the limited one: when each request came and each answer went."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        entry = {
            "client": headers.get(b"x-client", b"").decode(),
            "try": int(headers.get(b"x-stainless-retry-count", b"0")),
            "came": time.monotonic(),
        }
        self.seen.append(entry)

        async def record(message: Any) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
                entry["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
                entry["went"] = time.monotonic()
            await send(message)

        await self.app(scope, receive, record)

    def sdk(self, client: str, retries: int) -> openai.AsyncOpenAI:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self), base_url="http://t")
        return openai.AsyncOpenAI(
            api_key="sk-shared",
            base_url="http://t/v1",
            http_client=http,
            max_retries=retries,
            default_headers={"x-client": client},
        )


async def test_two_openai_clients_refused_together_are_told_apart_and_both_get_in() -> None:
    """Two SDK clients on one key, refused at once: different waits, each retry lands
    after its advertised time, and both succeed with a single retry each."""
    app = Recorder(
        limited(
            [TokenBucket("2/second", burst=2, key=keys.header("authorization"))],
            refusal_body="openai",
        )
    )
    a, b = app.sdk("a", retries=1), app.sdk("b", retries=1)
    await asyncio.gather(*(a.images.generate(prompt="drain") for _ in range(2)))
    got = await asyncio.gather(a.images.generate(prompt="cat"), b.images.generate(prompt="dog"))
    assert all(r.data for r in got)
    refusals = [e for e in app.seen if e["status"] != 200]
    assert len(refusals) == 2
    waits = [int(e["headers"]["retry-after-ms"]) for e in refusals]
    assert waits[0] != waits[1]
    for refusal in refusals:
        retry = next(e for e in app.seen if e["client"] == refusal["client"] and e["try"] == 1)
        assert retry["status"] == 200
        assert retry["came"] - refusal["went"] >= int(refusal["headers"]["retry-after-ms"]) / 1000


async def test_the_openai_sdk_shows_the_limiters_message_when_retries_run_out() -> None:
    """With the openai body, the SDK's exception says what the limiter said, not only 429."""
    app = Recorder(
        limited(
            [TokenBucket("1/minute", burst=1, key=keys.header("authorization"), name="images")],
            refusal_body="openai",
        )
    )
    client = app.sdk("a", retries=0)
    await client.images.generate(prompt="cat")
    with pytest.raises(openai.RateLimitError) as refused:
        await client.images.generate(prompt="dog")
    assert "Rate limit reached for images. Retry in 60 seconds." in str(refused.value)
    assert refused.value.code == "rate_limit_exceeded"


async def test_the_openai_sdk_does_not_retry_what_can_never_be_admitted() -> None:
    """`x-should-retry: false` is obeyed: one attempt, though retries are allowed."""
    app = Recorder(
        limited([TokenBucket("10/minute", burst=2, key=keys.GLOBAL)], cost=lambda s: 3)
    )
    with pytest.raises(openai.InternalServerError):
        await app.sdk("a", retries=2).images.generate(prompt="cat")
    assert len(app.seen) == 1
    assert app.seen[0]["headers"]["x-should-retry"] == "false"


async def test_the_anthropic_sdk_does_not_sleep_through_a_wait_past_should_retry_within() -> None:
    """The anthropic SDK obeys any `Retry-After` (an hour: it would sleep an hour);
    `x-should-retry: false` past 60 s makes it raise at once instead."""
    import anthropic

    app = Recorder(
        limited(
            [TokenBucket("1/hour", burst=1, key=keys.GLOBAL)],
            refusal_body="openai",
        )
    )
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t")
    await http.post("/v1/images/generations")  # takes the hour's one request
    client = anthropic.AsyncAnthropic(
        api_key="sk-ant", base_url="http://t", http_client=http, max_retries=2
    )
    with pytest.raises(anthropic.InternalServerError):
        await asyncio.wait_for(
            client.post("/v1/images/generations", cast_to=object, body={}), timeout=10
        )
    assert [e["status"] for e in app.seen] == [200, 503]
    assert app.seen[1]["headers"]["retry-after"] == "3600"
