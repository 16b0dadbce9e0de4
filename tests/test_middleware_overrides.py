"""Live overrides through the middleware: plans swapped, header fields, blocks, gauges, lifespan."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from asgi_helpers import Exchange, eventually, http_scope
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ratelimit import (
    BackendError,
    Concurrency,
    ConfigError,
    MemoryBackend,
    Metrics,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    Window,
    keys,
)
from ratelimit._types import Message, Receive, Scope, Send
from ratelimit.backends.base import StoreKey
from ratelimit.backends.redis.overrides import RedisOverrideStore
from ratelimit.backends.stores import MemoryOverrideStore


class CountingBackend(MemoryBackend):
    """A real MemoryBackend that counts decide() calls."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    async def decide(self, checks: Any) -> Any:
        self.calls += 1
        return await super().decide(checks)


class FailingBackend(MemoryBackend):
    """A backend whose store is down: every decision raises BackendError."""

    async def decide(self, checks: Any) -> Any:
        raise BackendError("store is down")


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def rules() -> list[Rule]:
    return [
        Rule(
            "/images",
            limits=[
                TokenBucket("1/hour", burst=10, key=keys.header("x-api-key"), name="per-key"),
                Concurrency(8, name="gpu"),
            ],
            name="images",
        ),
        Rule("/chat", limits=[TokenBucket("1/hour", burst=5, key=keys.GLOBAL)], name="chat"),
    ]


def app_with(backend: Any = None, **options: Any) -> RateLimitMiddleware:
    inner = Starlette(routes=[Route("/images", ok), Route("/chat", ok), Route("/free", ok)])
    return RateLimitMiddleware(inner, rules=rules(), backend=backend, **options)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def codes(app: Any, path: str, n: int, key: str = "k") -> list[int]:
    async with client(app) as c:
        return [(await c.get(path, headers={"x-api-key": key})).status_code for _ in range(n)]


async def test_memory_backend_uses_the_in_process_store() -> None:
    """With the memory backend, `overrides` keeps overrides in this process."""
    app = app_with()
    assert isinstance(app.overrides.store, MemoryOverrideStore)


async def test_tightened_bucket_is_enforced_and_the_configuration_returns_on_clear() -> None:
    """An override tightens a bucket for the next request; clearing it gives the burst back."""
    app = app_with()
    await app.overrides.set("images", "per-key", burst=2, until_cleared=True)
    assert await codes(app, "/images", 3, key="a") == [200, 200, 429]
    await app.overrides.clear("images")
    # The bucket's state carried over (2 used of the configured 10): 8 more, then 429.
    assert await codes(app, "/images", 9, key="a") == [200] * 8 + [429]


async def test_only_changed_rules_are_recompiled() -> None:
    """Rules an override does not touch keep their compiled plan (and its caches)."""
    app = app_with()
    chat_plan = app.engine.plan(app.engine.rules[1])
    images_before = app.engine.plan(app.engine.rules[0])
    await app.overrides.set("images", factor=0.5, expires_in=60)
    assert app.engine.plan(app.engine.rules[1]) is chat_plan
    assert app.engine.plan(app.engine.rules[0]) is not images_before
    assert app.engine.rules[1] is app.overrides.rules[1]


async def test_policy_field_describes_the_effective_limit() -> None:
    """`RateLimit-Policy` (and `RateLimit`) follow an override, and return after it lapses."""
    app = app_with()
    async with client(app) as c:
        before = await c.get("/chat")
        await app.overrides.set("chat", burst=2, expires_in=0.2)
        during = await c.get("/chat")
        # Lapsed: the timer put the configured rule back.
        await eventually(lambda: app.engine.rules[1] is app.overrides.rules[1], timeout=3)
        after = await c.get("/chat")
    assert before.headers["ratelimit-policy"] == '"token-bucket";q=1;w=3600'
    assert during.headers["ratelimit-policy"] == '"token-bucket";q=1;w=3600'
    assert during.headers["ratelimit"] == '"token-bucket";r=0;t=3600'
    # 3 of 5 used: 2 available, and the effective window ends with the next unit back.
    assert after.headers["ratelimit"] == '"token-bucket";r=2;t=3600'
    await app.aclose()


async def test_policy_field_shows_a_new_rate() -> None:
    """A new rate shows in `RateLimit-Policy`'s quota at once."""
    app = app_with()
    await app.overrides.set("chat", rate="3/minute", until_cleared=True)
    async with client(app) as c:
        r = await c.get("/chat")
    assert r.headers["ratelimit-policy"] == '"token-bucket";q=3;w=60'


async def test_block_refuses_with_503_and_the_operators_message_without_a_backend_call() -> None:
    """A block answers 503 with the message as the problem detail; the store is never asked."""
    backend = CountingBackend()
    app = app_with(backend)
    await app.overrides.set(
        "images", block=True, message="Image generation is paused.", expires_in=120
    )
    async with client(app) as c:
        r = await c.get("/images", headers={"x-api-key": "a"})
        free = await c.get("/chat")
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    body = json.loads(r.content)
    assert body["detail"] == "Image generation is paused."
    assert body["status"] == 503
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert backend.calls == 1  # only /chat reached the backend
    assert free.status_code == 200
    await app.overrides.clear("images")
    assert await codes(app, "/images", 10, key="a") == [200] * 10  # nothing was consumed


async def test_block_without_a_message_says_so_plainly() -> None:
    """A block with no message still tells the caller what happened."""
    app = app_with()
    await app.overrides.set("chat", block=True, until_cleared=True)
    async with client(app) as c:
        r = await c.get("/chat")
    assert r.status_code == 503
    assert "closed by its operator" in json.loads(r.content)["detail"]


async def test_a_block_shows_every_quota_as_zero_in_the_policy_field() -> None:
    """While blocked, `RateLimit-Policy` says q=0 for each limit (as the gauges say 0);
    cleared, the configured quotas come back."""
    app = app_with()
    await app.overrides.set("images", block=True, until_cleared=True)
    async with client(app) as c:
        blocked = await c.get("/images", headers={"x-api-key": "a"})
        await app.overrides.clear("images")
        cleared = await c.get("/images", headers={"x-api-key": "a"})
    assert blocked.status_code == 503
    assert blocked.headers["ratelimit-policy"] == (
        '"per-key";q=0;w=3600, "gpu";q=0;qu="concurrent-requests"'
    )
    assert cleared.status_code == 200
    assert cleared.headers["ratelimit-policy"] == (
        '"per-key";q=1;w=3600, "gpu";q=8;qu="concurrent-requests"'
    )


async def test_a_lease_granted_before_an_override_is_released_after_it() -> None:
    """A request holding a slot under the old plan frees it when it ends under the new one."""
    backend = MemoryBackend()
    gate = asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    app = RateLimitMiddleware(slow, rules=rules(), backend=backend)
    running = Exchange(app, http_scope("/images", headers=[(b"x-api-key", b"a")]))
    running.start()
    gpu = StoreKey("images", "gpu", "*")
    await eventually(lambda: len(app.engine.holding.held) == 1)
    assert await backend.in_use(gpu) == 1
    await app.overrides.set("images", "gpu", slots=1, until_cleared=True)
    second = Exchange(app, http_scope("/images", headers=[(b"x-api-key", b"b")]))
    await second.start()
    assert second.status == 503  # the one slot left is the running request's
    gate.set()
    assert running.task is not None
    await running.task
    assert running.status == 200
    assert await backend.in_use(gpu) == 0
    assert len(app.engine.holding.held) == 0


async def test_limit_gauges_follow_overrides_and_show_a_block_as_zero() -> None:
    """After each apply the effective-limit gauges show the override (0 while blocked)."""
    registry = CollectorRegistry()
    app = app_with(metrics=Metrics(registry))

    def gauge(rule: str, limit: str) -> float | None:
        return registry.get_sample_value("ratelimit_limit", {"rule": rule, "limit": limit})

    assert gauge("images", "gpu") == 8
    await app.overrides.set("images", "gpu", slots=3, until_cleared=True)
    assert gauge("images", "gpu") == 3
    assert gauge("images", "per-key") == 10
    await app.overrides.set("chat", block=True, until_cleared=True)
    assert gauge("chat", "token-bucket") == 0
    await app.overrides.clear("chat")
    await app.overrides.clear("images")
    assert gauge("chat", "token-bucket") == 5
    assert gauge("images", "gpu") == 8


async def test_in_flight_gauge_stays_exact_across_an_override() -> None:
    """Slots granted under a new plan count in `in_flight` and come back out on release."""
    registry = CollectorRegistry()
    app = app_with(metrics=Metrics(registry))
    await app.overrides.set("images", "gpu", slots=4, until_cleared=True)
    assert await codes(app, "/images", 3) == [200] * 3
    labels = {"rule": "images", "limit": "gpu"}
    assert registry.get_sample_value("ratelimit_in_flight", labels) == 0


async def test_local_fallback_follows_overrides() -> None:
    """Under fail="local" the in-process engine enforces the override (and a block) too."""
    app = app_with(FailingBackend(), fail="local")
    assert await codes(app, "/chat", 1) == [200]  # builds the local engine
    await app.overrides.set("chat", burst=2, until_cleared=True)
    assert await codes(app, "/chat", 2) == [200, 503]  # keys.GLOBAL: a shared limit
    await app.overrides.set("images", block=True, until_cleared=True)
    assert await codes(app, "/images", 1) == [503]


async def test_local_fallback_built_during_a_block_enforces_it() -> None:
    """A fallback engine first built while a block is in force starts with the block."""
    app = app_with(FailingBackend(), fail="local")
    await app.overrides.set("images", block=True, until_cleared=True)
    assert await codes(app, "/images", 1) == [503]


async def test_window_override_applies() -> None:
    """A Window's rate can be overridden too."""
    inner = Starlette(routes=[Route("/w", ok)])
    app = RateLimitMiddleware(
        inner, rules=[Rule("/w", limits=[Window("10/minute", key=keys.GLOBAL)], name="w")]
    )
    await app.overrides.set("w", rate="2/minute", until_cleared=True)
    assert await codes(app, "/w", 3) == [200, 200, 503]


def test_swap_rules_refuses_other_rule_names() -> None:
    """The engine swaps effective rules of the same names only."""
    app = app_with()
    with pytest.raises(ConfigError, match=r"^rules: expected the rules \['images', 'chat'\]"):
        app.engine.swap_rules(list(reversed(app.engine.rules)))


# -- starting and stopping ------------------------------------------------------------


async def test_lifespan_starts_overrides_and_the_apps_own_lifespan_still_runs(
    redis_url: str,
) -> None:
    """Lifespan start-up starts the watcher; the app's start-up and shutdown still run."""
    events: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                events.append("app startup")
                await send({"type": "lifespan.startup.complete"})
            else:
                events.append("app shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return

    backend = RedisBackend(redis_url, prefix="lifespan")
    app = RateLimitMiddleware(inner, rules=rules(), backend=backend)
    assert isinstance(app.overrides.store, RedisOverrideStore)
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    task = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await eventually(lambda: len(sent) == 1)
    assert app.overrides.started
    assert app.overrides._task is not None
    assert not app.overrides._task.done()
    await inbox.put({"type": "lifespan.shutdown"})
    await task
    assert events == ["app startup", "app shutdown"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert app.overrides._task is None
    await app.aclose()


async def test_first_request_starts_overrides_without_lifespan(redis_url: str) -> None:
    """A server without lifespan events: the first request reads the store before deciding."""
    writer = app_with(RedisBackend(redis_url, prefix="lazy"))
    await writer.overrides.set("chat", burst=1, until_cleared=True)
    app = app_with(RedisBackend(redis_url, prefix="lazy"))
    try:
        assert not app.overrides.started
        assert await codes(app, "/chat", 2) == [200, 503]  # keys.GLOBAL: a shared limit
        assert app.overrides.started
    finally:
        await app.aclose()
        await writer.aclose()


async def test_a_change_in_another_process_reaches_this_one(redis_url: str) -> None:
    """An override set through one middleware's store applies in another watching it."""
    a = app_with(RedisBackend(redis_url, prefix="pair"))
    b = app_with(RedisBackend(redis_url, prefix="pair"))
    try:
        await a.start()
        await b.start()
        await a.overrides.set("chat", block=True, message="closed", expires_in=60)
        await eventually(lambda: bool(b.engine.blocks()), timeout=3)
        assert await codes(b, "/chat", 1) == [503]
        await a.overrides.clear("chat")
        await eventually(lambda: not b.engine.blocks(), timeout=3)
        assert await codes(b, "/chat", 1) == [200]
    finally:
        await a.aclose()
        await b.aclose()
