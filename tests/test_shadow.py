"""Shadow mode: decisions are made and counted, would-be refusals pass to the app."""

from __future__ import annotations

import asyncio
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
    Concurrency,
    ConfigError,
    MemoryBackend,
    Metrics,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    keys,
)
from ratelimit._types import Receive, Scope, Send
from ratelimit.backends.base import StoreKey


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def inner() -> Starlette:
    return Starlette(routes=[Route("/work", ok), Route("/shared", ok)])


def per_key_rule(*, shadow: bool) -> Rule:
    limit = TokenBucket("1/hour", burst=2, key=keys.header("x-api-key"), name="per-key")
    return Rule("/work", limits=[limit], name="work", shadow=shadow)


def shared_rule() -> Rule:
    return Rule("/shared", limits=[TokenBucket("1/hour", burst=1, key=keys.GLOBAL, name="fleet")])


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def statuses(app: Any, path: str, n: int) -> list[httpx.Response]:
    async with client(app) as c:
        return [await c.get(path, headers={"x-api-key": "k"}) for _ in range(n)]


def decisions(registry: CollectorRegistry, rule: str, limit: str, outcome: str) -> float | None:
    labels = {"rule": rule, "limit": limit, "outcome": outcome}
    return registry.get_sample_value("ratelimit_decisions_total", labels)


async def test_shadow_rule_passes_traffic_and_counts_would_be_refusals_by_limit() -> None:
    """Every request reaches the app; refusals it would have made count as shadow_limited."""
    registry = CollectorRegistry()
    app = RateLimitMiddleware(inner(), rules=[per_key_rule(shadow=True)], metrics=Metrics(registry))
    replies = await statuses(app, "/work", 5)
    assert [r.status_code for r in replies] == [200] * 5
    assert decisions(registry, "work", "", "allowed") == 2  # admissions consumed the burst
    assert decisions(registry, "work", "per-key", "shadow_limited") == 3
    assert decisions(registry, "work", "per-key", "limited") == 0


async def test_shadow_responses_carry_the_fields_a_caller_would_have_seen() -> None:
    """A would-be refusal passes with `RateLimit` at r=0, but no `Retry-After`."""
    app = RateLimitMiddleware(inner(), rules=[per_key_rule(shadow=True)])
    replies = await statuses(app, "/work", 3)
    assert replies[0].headers["ratelimit"] == '"per-key";r=1;t=3600'
    assert replies[2].headers["ratelimit"].startswith('"per-key";r=0;')
    assert replies[2].headers["ratelimit-policy"] == '"per-key";q=1;w=3600'
    assert "retry-after" not in replies[2].headers


async def test_global_shadow_puts_every_rule_in_shadow_mode() -> None:
    """`shadow=True` on the middleware: shared-limit refusals pass too, as shadow_rejected."""
    registry = CollectorRegistry()
    app = RateLimitMiddleware(
        inner(),
        rules=[per_key_rule(shadow=False), shared_rule()],
        shadow=True,
        metrics=Metrics(registry),
    )
    assert all(r.shadow for r in app.engine.rules)
    assert [r.status_code for r in await statuses(app, "/shared", 3)] == [200] * 3
    assert [r.status_code for r in await statuses(app, "/work", 3)] == [200] * 3
    assert decisions(registry, "shared", "fleet", "shadow_rejected") == 2
    assert decisions(registry, "work", "per-key", "shadow_limited") == 1


def test_global_shadow_copies_rules_and_leaves_the_callers_alone() -> None:
    """`shadow=True` works on copies: a Rule the caller also uses elsewhere stays enforcing."""
    mine = per_key_rule(shadow=False)
    app = RateLimitMiddleware(inner(), rules=[mine], shadow=True)
    assert app.engine.rules[0] is not mine
    assert app.engine.rules[0].limits == mine.limits
    assert not mine.shadow


def test_shadow_must_be_a_bool() -> None:
    """A non-bool `shadow=` fails at construction naming the field."""
    with pytest.raises(ConfigError, match=r"^shadow: expected true or false, got 'yes'$"):
        RateLimitMiddleware(inner(), rules=[per_key_rule(shadow=False)], shadow="yes")  # type: ignore[arg-type]


async def test_shadow_concurrency_lets_the_extra_request_run_without_a_slot() -> None:
    """A shadow request over a full pool runs holding nothing; in_flight counts real slots."""
    registry = CollectorRegistry()
    backend = MemoryBackend()
    gate = asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    rule = Rule("/gpu", limits=[Concurrency(1, name="gpu")], name="gpu", shadow=True)
    app = RateLimitMiddleware(slow, rules=[rule], backend=backend, metrics=Metrics(registry))
    first, second = (Exchange(app, http_scope("/gpu")) for _ in range(2))
    first.start()
    await eventually(lambda: len(app.engine.holding.held) == 1)
    second.start()
    await eventually(lambda: decisions(registry, "gpu", "gpu", "shadow_rejected") == 1)
    assert await backend.in_use(StoreKey("gpu", "gpu", "*")) == 1
    assert registry.get_sample_value("ratelimit_in_flight", {"rule": "gpu", "limit": "gpu"}) == 1
    gate.set()
    assert first.task is not None
    assert second.task is not None
    await asyncio.gather(first.task, second.task)
    assert (first.status, second.status) == (200, 200)
    assert await backend.in_use(StoreKey("gpu", "gpu", "*")) == 0


async def test_override_puts_a_rule_in_shadow_mode_and_back() -> None:
    """A `shadow` override lets refusals through; clearing it enforces the rule again."""
    registry = CollectorRegistry()
    app = RateLimitMiddleware(
        inner(), rules=[per_key_rule(shadow=False)], metrics=Metrics(registry)
    )
    await app.overrides.set("work", shadow=True, expires_in=60)
    assert [r.status_code for r in await statuses(app, "/work", 3)] == [200, 200, 200]
    await app.overrides.clear("work")
    assert [r.status_code for r in await statuses(app, "/work", 1)] == [429]
    assert decisions(registry, "work", "per-key", "shadow_limited") == 1
    assert decisions(registry, "work", "per-key", "limited") == 1


async def test_enforce_override_enforces_a_shadow_rule() -> None:
    """`shadow=False` as an override enforces a rule configured in shadow mode."""
    app = RateLimitMiddleware(inner(), rules=[per_key_rule(shadow=True)])
    await app.overrides.set("work", shadow=False, until_cleared=True)
    assert [r.status_code for r in await statuses(app, "/work", 3)] == [200, 200, 429]


async def test_a_block_is_enforced_even_in_shadow_mode() -> None:
    """An operator's block is explicit: shadow mode does not let blocked requests through."""
    registry = CollectorRegistry()
    app = RateLimitMiddleware(
        inner(), rules=[per_key_rule(shadow=True)], shadow=True, metrics=Metrics(registry)
    )
    await app.overrides.set("work", block=True, message="paused", until_cleared=True)
    assert [r.status_code for r in await statuses(app, "/work", 2)] == [503, 503]
    assert decisions(registry, "work", "", "blocked") == 2


def test_config_file_shadow_reaches_the_middleware() -> None:
    """`shadow = true` at the top of a config file puts its rules in shadow mode."""
    config = {
        "shadow": True,
        "rules": [{"path": "/work", "limits": [{"type": "token_bucket", "rate": "1/hour"}]}],
    }
    app = RateLimitMiddleware(inner(), config=config)
    assert [r.shadow for r in app.engine.rules] == [True]
