"""RateLimitMiddleware through real ASGI calls: statuses, header fields, leases that never leak."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from asgi_helpers import Exchange, eventually, http_scope
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.websockets import WebSocket

from ratelimit import (
    BackendError,
    Concurrency,
    ConfigError,
    MemoryBackend,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit._types import Message, Receive, Scope, Send
from ratelimit.backends.base import StoreKey


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingBackend(MemoryBackend):
    """A real MemoryBackend that counts decide() calls."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    async def decide(self, checks: Any) -> Any:
        self.calls += 1
        return await super().decide(checks)


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def starlette_app(*routes: Any) -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/images/generations", ok, methods=["POST"]),
            Route("/v1/models", ok),
            Route("/free", ok),
            *routes,
        ]
    )


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


IMAGES_RULES = [
    Rule(
        "/v1/images/generations",
        methods=["POST"],
        limits=[
            TokenBucket("5/minute", burst=3, key=keys.header("x-api-key"), name="images-per-key"),
            Concurrency(8, key=keys.GLOBAL, name="gpu"),
        ],
    )
]


async def test_unmatched_requests_pass_untouched_without_a_backend_call() -> None:
    """A request no rule matches reaches the app unchanged and costs no backend call."""
    backend = CountingBackend()
    app = RateLimitMiddleware(starlette_app(), rules=IMAGES_RULES, backend=backend)
    async with client(app) as c:
        r = await c.get("/free")
        r2 = await c.get("/v1/images/generations")  # method not in the rule
    assert r.status_code == 200
    assert "ratelimit" not in r.headers
    assert r2.status_code == 405
    assert backend.calls == 0


async def test_quota_spent_gives_429_with_retry_after_and_fields() -> None:
    """Past `burst` the caller gets 429 with Retry-After, RateLimit fields and a problem body."""
    clock = ManualClock()
    app = RateLimitMiddleware(
        starlette_app(), rules=IMAGES_RULES, backend=MemoryBackend(clock=clock)
    )
    h = {"x-api-key": "alice"}
    async with client(app) as c:
        allowed = [await c.post("/v1/images/generations", headers=h) for _ in range(3)]
        refused = await c.post("/v1/images/generations", headers=h)
    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert allowed[0].headers["ratelimit"] == '"images-per-key";r=2;t=12, "gpu";r=7'
    assert allowed[2].headers["ratelimit"].startswith('"images-per-key";r=0;t=12')
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "12"
    assert refused.headers["ratelimit-policy"] == (
        '"images-per-key";q=5;w=60, "gpu";q=8;qu="concurrent-requests"'
    )
    assert refused.headers["ratelimit"] == '"images-per-key";r=0;t=12, "gpu";r=8'
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert problem["status"] == 429
    assert problem["violated-policies"] == ["images-per-key"]


async def test_retry_after_is_the_time_remaining_rounded_up() -> None:
    """Retry-After is what is actually left (5 s of a 12 s interval), never the whole window."""
    clock = ManualClock()
    app = RateLimitMiddleware(
        starlette_app(), rules=IMAGES_RULES, backend=MemoryBackend(clock=clock)
    )
    h = {"x-api-key": "bob"}
    async with client(app) as c:
        for _ in range(3):
            await c.post("/v1/images/generations", headers=h)
        clock.now += 7.4
        r = await c.post("/v1/images/generations", headers=h)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "5"  # 4.6 s left, rounded up
        clock.now += 4.6
        assert (await c.post("/v1/images/generations", headers=h)).status_code == 200


async def test_distinct_callers_get_distinct_quotas() -> None:
    """One caller spending its quota does not touch another's."""
    app = RateLimitMiddleware(starlette_app(), rules=IMAGES_RULES, backend=MemoryBackend())
    async with client(app) as c:
        for _ in range(3):
            await c.post("/v1/images/generations", headers={"x-api-key": "a"})
        assert (
            await c.post("/v1/images/generations", headers={"x-api-key": "a"})
        ).status_code == 429
        assert (
            await c.post("/v1/images/generations", headers={"x-api-key": "b"})
        ).status_code == 200


HOSTILE = [
    "x" * 65536,
    "ключ-🔑",
    "a\x00b\x01\x7f",
    "{}",
    "*",
    "{rule}:gpu:*",
    "",
]


@pytest.mark.parametrize(
    "value", HOSTILE, ids=["64KiB", "unicode", "control", "braces", "star", "keylike", "empty"]
)
async def test_hostile_header_values_never_500_and_never_share_a_bucket(value: str) -> None:
    """Hostile key text gets its own bucket, and cannot touch other callers' or the global pool."""
    backend = MemoryBackend()
    app = RateLimitMiddleware(starlette_app(), rules=IMAGES_RULES, backend=backend)
    raw = value.encode("utf-8")
    async with client(app) as c:
        statuses = []
        for _ in range(4):
            ex = Exchange(app, http_scope("/v1/images/generations", "POST", [(b"x-api-key", raw)]))
            await ex.start()
            statuses.append(ex.status)
        other = await c.post("/v1/images/generations", headers={"x-api-key": "innocent"})
    assert statuses == [200, 200, 200, 429]
    assert other.status_code == 200
    assert other.headers["ratelimit"].startswith('"images-per-key";r=2')
    # The global pool was never confused with a caller bucket named "*".
    assert await backend.in_use(StoreKey("v1.images.generations", "gpu", "*")) == 0


async def test_exactly_the_burst_is_admitted_under_concurrency() -> None:
    """N concurrent requests on one key: exactly `burst` are admitted."""
    rules = [Rule("/v1/models", limits=[TokenBucket("10/hour", burst=10, key=keys.GLOBAL)])]
    app = RateLimitMiddleware(starlette_app(), rules=rules)
    async with client(app) as c:
        responses = await asyncio.gather(*(c.get("/v1/models") for _ in range(100)))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10
    assert codes.count(503) == 90  # a GLOBAL bucket is shared capacity: 503


def gate_app(gate: asyncio.Event, entered: list[int]) -> Any:
    """A raw ASGI app that holds its request open until `gate` is set."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.append(1)
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    return app


async def test_concurrency_admits_exactly_the_limit_and_refuses_the_rest_with_503() -> None:
    """With 5 slots and 40 concurrent requests, exactly 5 run; the rest get 503 at once."""
    gate = asyncio.Event()
    entered: list[int] = []
    backend = MemoryBackend()
    rules = [Rule("/gen", limits=[Concurrency(5, key=keys.GLOBAL, name="gpu")])]
    app = RateLimitMiddleware(gate_app(gate, entered), rules=rules, backend=backend)
    exchanges = [Exchange(app, http_scope("/gen")) for _ in range(40)]
    for ex in exchanges:
        ex.start()
    await eventually(lambda: sum(ex.status == 503 for ex in exchanges) == 35)
    assert len(entered) == 5
    assert await backend.in_use(StoreKey("gen", "gpu", "*")) == 5
    refused = next(ex for ex in exchanges if ex.status == 503)
    assert json.loads(refused.body)["type"].endswith("#temporary-reduced-capacity")
    assert refused.header(b"retry-after") == b"1"
    gate.set()
    await asyncio.gather(*(ex.task for ex in exchanges if ex.task))
    await eventually(lambda: len(app.engine.holding.held) == 0)
    assert await backend.in_use(StoreKey("gen", "gpu", "*")) == 0


async def test_per_key_concurrency_refusal_is_429() -> None:
    """A caller over its own concurrency limit is refused with 429, not 503."""
    gate = asyncio.Event()
    rules = [Rule("/gen", limits=[Concurrency(1, key=keys.header("x-api-key"), name="per-key")])]
    app = RateLimitMiddleware(gate_app(gate, []), rules=rules)
    first = Exchange(app, http_scope("/gen", headers=[(b"x-api-key", b"k")]))
    first.start()
    await asyncio.sleep(0.01)
    second = Exchange(app, http_scope("/gen", headers=[(b"x-api-key", b"k")]))
    await second.start()
    assert second.status == 429
    gate.set()
    await first.task  # type: ignore[misc]


def streaming_app(chunks: int, pause: asyncio.Event | None = None) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(chunks):
            if pause is not None and i == 1:
                await pause.wait()
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def one_slot(app: Any, backend: MemoryBackend, lease: float = 30.0) -> RateLimitMiddleware:
    rules = [Rule("/gen", limits=[Concurrency(1, key=keys.GLOBAL, name="gpu", lease=lease)])]
    return RateLimitMiddleware(app, rules=rules, backend=backend)


GPU = StoreKey("gen", "gpu", "*")


async def test_streamed_response_holds_its_lease_until_the_last_chunk() -> None:
    """The slot stays taken while chunks flow and is free right after the final one."""
    pause = asyncio.Event()
    backend = MemoryBackend()
    sent_before_release: list[int] = []
    app = one_slot(streaming_app(5, pause), backend)
    ex = Exchange(app, http_scope("/gen"))
    ex.start()
    await ex.started.wait()
    await asyncio.sleep(0.01)
    assert await backend.in_use(GPU) == 1
    blocked = Exchange(app, http_scope("/gen"))
    await blocked.start()
    assert blocked.status == 503
    sent_before_release.append(len(ex.sent))
    pause.set()
    await ex.task  # type: ignore[misc]
    assert ex.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert await backend.in_use(GPU) == 0  # released as the last chunk went out, not later
    assert len(app.engine.holding.held) == 0


async def test_disconnect_mid_stream_frees_the_slot() -> None:
    """A client that disconnects while the response streams gives its slot back at once."""
    backend = MemoryBackend()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        await asyncio.sleep(3600)  # the app keeps going; the slot must not wait for it

    mw = one_slot(app, backend)
    ex = Exchange(mw, http_scope("/gen"))
    ex.start()
    await ex.started.wait()
    assert await backend.in_use(GPU) == 1
    ex.disconnect()
    await eventually(lambda: len(mw.engine.holding.held) == 0)
    assert await backend.in_use(GPU) == 0
    assert ex.task is not None
    ex.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ex.task


async def test_cancelled_task_frees_the_slot() -> None:
    """Cancelling the request task mid-response releases its lease exactly once."""
    backend = MemoryBackend()
    pause = asyncio.Event()
    mw = one_slot(streaming_app(3, pause), backend)
    ex = Exchange(mw, http_scope("/gen"))
    task = ex.start()
    await ex.started.wait()
    assert await backend.in_use(GPU) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: len(mw.engine.holding.held) == 0)
    assert await backend.in_use(GPU) == 0


async def test_app_exception_frees_the_slot_and_propagates() -> None:
    """An app that raises still gives its slot back; the error is the app's, not ours."""
    backend = MemoryBackend()

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("app bug")

    mw = one_slot(broken, backend)
    with pytest.raises(RuntimeError, match="app bug"):
        await mw(http_scope("/gen"), Exchange(mw, {}).receive, Exchange(mw, {}).send)
    await eventually(lambda: len(mw.engine.holding.held) == 0)
    assert await backend.in_use(GPU) == 0


async def test_long_response_keeps_its_lease_alive_past_the_lease_time() -> None:
    """A request running 2.5x its lease ttl still holds its slot: the lease is renewed."""
    backend = MemoryBackend()
    pause = asyncio.Event()
    mw = one_slot(streaming_app(3, pause), backend, lease=1.0)
    ex = Exchange(mw, http_scope("/gen"))
    ex.start()
    await ex.started.wait()
    for _ in range(5):
        await asyncio.sleep(0.5)
        assert await backend.in_use(GPU) == 1
    intruder = Exchange(mw, http_scope("/gen"))
    await intruder.start()
    assert intruder.status == 503
    pause.set()
    await ex.task  # type: ignore[misc]
    assert await backend.in_use(GPU) == 0


async def test_releasing_a_grant_twice_raises() -> None:
    """Misuse is an error: the same grant cannot be released twice."""
    from ratelimit import LeaseError

    mw = one_slot(streaming_app(1), MemoryBackend())
    decision = await mw.engine.decide(mw.engine.rules[0], http_scope("/gen"))
    assert decision.grant is not None
    await mw.engine.release(decision.grant)
    with pytest.raises(LeaseError):
        await mw.engine.release(decision.grant)


async def test_window_refusal_refunds_the_rules_other_limits() -> None:
    """All or nothing: when the Window refuses, the token bucket gets its unit back."""
    clock = ManualClock()
    rules = [
        Rule(
            "/v1/models",
            limits=[
                TokenBucket("100/minute", burst=10, key=keys.GLOBAL, name="bucket"),
                Window("2/minute", key=keys.client_ip(), name="window"),
            ],
        )
    ]
    app = RateLimitMiddleware(starlette_app(), rules=rules, backend=MemoryBackend(clock=clock))
    async with client(app) as c:
        codes = [(await c.get("/v1/models")).status_code for _ in range(5)]
        assert codes == [200, 200, 429, 429, 429]
        r = await c.get("/v1/models")
    assert r.headers["ratelimit"].startswith('"bucket";r=8;')  # only the 2 admitted consumed


async def test_on_refuse_hook_renders_the_refusal_and_keeps_retry_after() -> None:
    """A custom refusal response still carries Retry-After and the RateLimit fields."""

    def render(scope: Scope, decision: Any) -> Response:
        return JSONResponse(
            {"error": "slow down", "limits": decision.violated}, status_code=decision.status
        )

    app = RateLimitMiddleware(starlette_app(), rules=IMAGES_RULES, on_refuse=render)
    async with client(app) as c:
        for _ in range(3):
            await c.post("/v1/images/generations", headers={"x-api-key": "k"})
        r = await c.post("/v1/images/generations", headers={"x-api-key": "k"})
    assert r.status_code == 429
    assert r.json() == {"error": "slow down", "limits": ["images-per-key"]}
    assert r.headers["retry-after"] == "12"
    assert "ratelimit" in r.headers


async def test_cost_callable_takes_more_units_for_bigger_requests() -> None:
    """A rule's cost callable decides how many units a request takes."""
    rules = [
        Rule(
            "/v1/images/generations",
            methods=["POST"],
            limits=[TokenBucket("10/minute", key=keys.GLOBAL)],
            cost=lambda scope: 4,
        )
    ]
    app = RateLimitMiddleware(starlette_app(), rules=rules)
    async with client(app) as c:
        codes = [(await c.post("/v1/images/generations")).status_code for _ in range(3)]
    assert codes == [200, 200, 503]


class FailingBackend(MemoryBackend):
    """A backend whose store is down: every decision raises BackendError."""

    async def decide(self, checks: Any) -> Any:
        raise BackendError("store is down")


@pytest.mark.parametrize(("fail", "status"), [("open", 200), ("closed", 503)])
async def test_backend_failure_follows_the_fail_policy_never_500(fail: str, status: int) -> None:
    """A failing backend admits (open) or refuses with 503 (closed), never a 500."""
    app = RateLimitMiddleware(
        starlette_app(), rules=IMAGES_RULES, backend=FailingBackend(), fail=fail
    )  # type: ignore[arg-type]
    async with client(app) as c:
        r = await c.post("/v1/images/generations", headers={"x-api-key": "k"})
    assert r.status_code == status
    if status == 503:
        assert r.headers["retry-after"] == "1"


async def test_lifespan_passes_through() -> None:
    """Lifespan events reach the app untouched."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    mw = RateLimitMiddleware(app, rules=IMAGES_RULES)
    await mw({"type": "lifespan"}, Exchange(mw, {}).receive, Exchange(mw, {}).send)
    assert seen == ["lifespan"]


async def ws_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("hi")
    await websocket.close()


async def test_websocket_refused_with_denial_response_when_supported() -> None:
    """With the denial extension, a refused websocket gets an HTTP 503 with Retry-After."""
    rules = [Rule("/ws", limits=[Concurrency(1, key=keys.GLOBAL, name="ws")])]
    gate = asyncio.Event()

    async def holder(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await gate.wait()
        await send({"type": "websocket.close", "code": 1000})

    backend = MemoryBackend()
    mw = RateLimitMiddleware(holder, rules=rules, backend=backend)
    sent_a: list[Message] = []
    sent_b: list[Message] = []
    ws_scope = {"type": "websocket", "path": "/ws", "headers": [], "client": ("1.2.3.4", 1)}

    async def recv() -> Message:
        return {"type": "websocket.connect"}

    async def send_a(m: Message) -> None:
        sent_a.append(m)

    async def send_b(m: Message) -> None:
        sent_b.append(m)

    first = asyncio.create_task(mw(dict(ws_scope), recv, send_a))
    await eventually(lambda: bool(sent_a))
    assert await backend.in_use(StoreKey("ws", "ws", "*")) == 1
    await mw({**ws_scope, "extensions": {"websocket.http.response": {}}}, recv, send_b)
    assert sent_b[0]["type"] == "websocket.http.response.start"
    assert sent_b[0]["status"] == 503
    assert (b"retry-after", b"1") in sent_b[0]["headers"]
    sent_c: list[Message] = []

    async def send_c(m: Message) -> None:
        sent_c.append(m)

    await mw(dict(ws_scope), recv, send_c)
    assert sent_c == [{"type": "websocket.close", "code": 1008}]
    gate.set()
    await first
    assert await backend.in_use(StoreKey("ws", "ws", "*")) == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TokenBucket("10 per fortnight"), r'^rate: expected a rate like "10/minute"'),
        (lambda: TokenBucket("5/minute", burst=0), r"^burst: expected a positive integer"),
        (lambda: Concurrency(0), r"^limit: expected a positive integer"),
        (lambda: Concurrency(2, lease=0.5), r"^lease: expected at least 1 second"),
        (lambda: Window("5/minute", strategy="leaky"), r'^strategy: expected "fixed"'),
        (lambda: Rule("/x", limits=[]), r"^limits: expected a non-empty list"),
        (lambda: Rule("/x", methods="POST", limits=[Concurrency(1)]), r"^methods: expected"),
        (
            lambda: Rule("/x", limits=[TokenBucket("5/minute", burst=2)], cost=3),
            r"^limits\[0\]\.burst",
        ),
        (lambda: TokenBucket("5/minute", name="has space"), r"^name: expected a name"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_field(make: Any, message: str) -> None:
    """Misconfiguration is caught at start-up with the field and what was expected."""
    with pytest.raises(ConfigError, match=message):
        make()


def test_duplicate_rule_names_are_refused() -> None:
    """Two rules that would share storage keys are a configuration error."""
    rules = [
        Rule("/a", limits=[Concurrency(1)]),
        Rule("/a", methods=["POST"], limits=[Concurrency(1)]),
    ]
    with pytest.raises(
        ConfigError, match=r"^rules\[1\]\.name: expected a name unused by rules\[0\]"
    ):
        RateLimitMiddleware(starlette_app(), rules=rules)


async def test_fail_local_decides_in_process_with_the_configured_share() -> None:
    """With the store down, fail="local" limits in-process at `local_share` of each limit."""
    rules = [
        Rule(
            "/v1/models",
            limits=[TokenBucket("4/minute", key=keys.header("x-api-key"), name="per-key")],
            fail="local",
        )
    ]
    app = RateLimitMiddleware(
        starlette_app(), rules=rules, backend=FailingBackend(), local_share=0.5
    )
    async with client(app) as c:
        codes = [
            (await c.get("/v1/models", headers={"x-api-key": "k"})).status_code for _ in range(4)
        ]
        other = await c.get("/v1/models", headers={"x-api-key": "other"})
    assert codes == [200, 200, 429, 429]  # 4/minute x 0.5 = 2 per process
    assert other.status_code == 200
    refused_rate = app.limiter.local_engine().rules[0].limits[0]
    assert isinstance(refused_rate, TokenBucket)
    assert refused_rate.interval == pytest.approx(30.0)


async def test_fail_local_leases_are_released_to_the_local_store() -> None:
    """A concurrency slot taken from the local fallback is given back to it."""
    gate = asyncio.Event()
    rules = [Rule("/gen", limits=[Concurrency(2, key=keys.GLOBAL, name="gpu")], fail="local")]
    mw = RateLimitMiddleware(
        gate_app(gate, []), rules=rules, backend=FailingBackend(), local_share=0.5
    )
    first = Exchange(mw, http_scope("/gen"))
    first.start()
    await eventually(lambda: len(mw.limiter.local_engine().holding.held) == 1)
    second = Exchange(mw, http_scope("/gen"))
    await second.start()
    assert second.status == 503
    gate.set()
    await first.task  # type: ignore[misc]
    await eventually(lambda: len(mw.limiter.local_engine().holding.held) == 0)
    third = Exchange(mw, http_scope("/gen"))
    gate.set()
    await third.start()
    assert third.status == 200


def test_local_share_must_be_a_fraction() -> None:
    """local_share outside (0, 1] is refused at construction."""
    with pytest.raises(ConfigError, match=r"^local_share: expected a fraction"):
        RateLimitMiddleware(starlette_app(), rules=IMAGES_RULES, local_share=2)


async def test_fail_local_refuses_with_400_when_a_key_function_raises() -> None:
    """A key function that raises under fail="local" is the request's fault: 400, not a
    fallback, not an admission, never a 500 (tests/test_callables.py has every case)."""

    def broken_key(scope: Scope) -> str:
        raise RuntimeError("key function bug")

    rules = [Rule("/v1/models", limits=[TokenBucket("1/minute", key=broken_key)], fail="local")]
    app = RateLimitMiddleware(starlette_app(), rules=rules)
    async with client(app) as c:
        codes = [(await c.get("/v1/models")).status_code for _ in range(3)]
    assert codes == [400, 400, 400]
