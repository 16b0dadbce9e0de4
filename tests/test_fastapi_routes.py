"""The middleware and the app's routes: exempt routes, CORS preflights and order, rules
that match no route (real FastAPI and Starlette's CORSMiddleware)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from ratelimit import Limiter, RateLimitMiddleware, Rule, TokenBucket
from ratelimit._types import Message
from ratelimit.fastapi import RateLimit, Refused, exempt, refused_handler


def one_a_minute(path: str = "/v1/*") -> Rule:
    """One request a minute per client address (one client here): the second is a 429."""
    return Rule(path, limits=[TokenBucket("1/minute")])


def client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")  # type: ignore[arg-type]


def ok() -> str:
    return "ok"


def pong(request: Request) -> PlainTextResponse:
    return PlainTextResponse("pong")


async def codes(app: object, *requests: tuple[str, str]) -> list[int]:
    async with client(app) as c:
        return [(await c.request(method, path)).status_code for method, path in requests]


async def test_an_exempt_router_and_route_skip_the_middlewares_rules() -> None:
    """`Depends(exempt)` on a router or a route: its requests pass a matching rule untouched."""
    health = APIRouter(prefix="/v1/health", dependencies=[Depends(exempt)])
    health.get("")(ok)
    app = FastAPI()
    app.include_router(health)
    app.get("/v1/version", dependencies=[Depends(exempt)])(ok)
    app.get("/v1/models")(ok)
    app.add_middleware(RateLimitMiddleware, rules=[one_a_minute()])
    three = [("GET", "/v1/health")] * 3 + [("GET", "/v1/version")] * 3
    assert await codes(app, *three, ("GET", "/v1/models"), ("GET", "/v1/models")) == [
        *[200] * 6,
        200,
        429,
    ]


async def test_an_exempt_route_keeps_its_own_route_limits() -> None:
    """Exempt from the middleware's rules, a route's own RateLimit still applies."""
    limiter = Limiter([one_a_minute()])
    own = RateLimit(limiter, "own", limits=[TokenBucket("2/minute")])
    app = FastAPI(exception_handlers={Refused: refused_handler})
    app.get("/v1/own", dependencies=[Depends(exempt), Depends(own)])(ok)
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    assert await codes(app, *[("GET", "/v1/own")] * 3) == [200, 200, 429]


async def test_an_exempt_route_after_another_route_of_the_same_path_exempts_nothing() -> None:
    """Routing serves the first matching route: a later exempt twin is no way around a rule."""
    app = FastAPI()
    app.get("/v1/items/{item_id}")(ok)
    app.get("/v1/items/{name}", dependencies=[Depends(exempt)])(ok)
    app.post("/v1/items/{name}", dependencies=[Depends(exempt)])(ok)
    app.add_middleware(RateLimitMiddleware, rules=[one_a_minute()])
    got = await codes(app, ("POST", "/v1/items/a"), ("POST", "/v1/items/a"), ("GET", "/v1/items/a"))
    assert got == [200, 200, 200]  # POST: only the exempt route serves it
    assert await codes(app, ("GET", "/v1/items/a")) == [429]


async def test_a_cors_preflight_spends_no_quota_even_for_every_method() -> None:
    """OPTIONS with Access-Control-Request-Method passes a rule with methods=None untouched."""
    app = FastAPI()
    app.get("/v1/models")(ok)
    app.add_middleware(RateLimitMiddleware, rules=[one_a_minute()])
    preflight = {"origin": "https://ui.example", "access-control-request-method": "GET"}
    async with client(app) as c:
        for _ in range(3):
            await c.options("/v1/models", headers=preflight)
        assert (await c.get("/v1/models")).status_code == 200
        # A plain OPTIONS is a request like any other.
        assert (await c.options("/v1/models")).status_code == 429


async def test_a_refusal_carries_cors_headers_when_cors_middleware_is_outside() -> None:
    """Added after the limiter, CORSMiddleware wraps it: a 429 keeps the CORS headers the
    browser needs to let the page read it, and preflights are answered and free."""
    app = FastAPI()
    app.get("/v1/models")(ok)
    app.add_middleware(RateLimitMiddleware, rules=[one_a_minute()])
    app.add_middleware(  # added last: the outermost
        CORSMiddleware,
        allow_origins=["https://ui.example"],
        allow_methods=["*"],
        expose_headers=["Retry-After", "RateLimit", "RateLimit-Policy"],
    )
    origin = {"origin": "https://ui.example"}
    async with client(app) as c:
        pre = await c.options(
            "/v1/models", headers={**origin, "access-control-request-method": "GET"}
        )
        first = await c.get("/v1/models", headers=origin)
        refused = await c.get("/v1/models", headers=origin)
    assert pre.status_code == 200
    assert first.status_code == 200
    assert refused.status_code == 429
    assert refused.headers["access-control-allow-origin"] == "https://ui.example"
    assert "retry-after" in refused.headers["access-control-expose-headers"].lower()


async def lifespan_startup(app: object) -> list[Message]:
    """Run `app`'s lifespan start-up and shutdown, as a server does."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    for kind in ("lifespan.startup", "lifespan.shutdown"):
        inbox.put_nowait({"type": kind})
    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send)  # type: ignore[operator]
    return sent


def three_routers_app(rules: list[Rule]) -> FastAPI:
    images = APIRouter(prefix="/v1/images")
    images.post("/generations")(ok)
    chat = APIRouter(prefix="/v1/chat")
    chat.post("/completions")(ok)
    users = APIRouter(prefix="/v2/users")  # was /v1/users: its rule below is stale
    users.get("/{user_id:int}")(ok)
    app = FastAPI()
    for router in (images, chat, users):
        app.include_router(router)
    app.mount("/static", Starlette())  # a mounted app with no routes: anything below it
    app.add_middleware(RateLimitMiddleware, rules=rules)
    return app


async def test_at_start_up_each_rule_matching_no_route_is_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three routers, one prefix changed: exactly its rule is named, once, at lifespan start."""
    rules = [
        Rule("/v1/images/generations", methods=["POST"], limits=[TokenBucket("5/minute")]),
        Rule("/v1/chat/*", limits=[TokenBucket("5/minute")]),
        Rule("/v1/users/{id}", limits=[TokenBucket("5/minute")], name="users"),
        Rule("/v2/users/{id}", methods=["GET"], limits=[TokenBucket("5/minute")]),
        Rule("/v1/images/generations", methods=["GET"], limits=[TokenBucket("5/minute")]),
        Rule("/static/logo.png", limits=[TokenBucket("5/minute")]),
        Rule(name="pathless", limits=[TokenBucket("5/minute")]),
    ]
    rules[4].name = "images-get"
    app = three_routers_app(rules)
    with caplog.at_level(logging.WARNING, logger="ratelimit"):
        sent = await lifespan_startup(app)
        async with client(app) as c:
            await c.post("/v1/chat/completions")
    assert sent[0]["type"] == "lifespan.startup.complete"
    warned = [r.getMessage() for r in caplog.records if "matches none" in r.getMessage()]
    assert len(warned) == 2, warned
    assert "'users' (/v1/users/{id}, any method)" in warned[0]
    assert "'images-get' (/v1/images/generations, GET)" in warned[1]


async def test_without_lifespan_the_first_request_reads_the_routes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server without lifespan events: the routes are read before the first decision."""
    app = Starlette(routes=[Mount("/api", routes=[Route("/ping", pong)])])
    wrapped = RateLimitMiddleware(app, rules=[one_a_minute("/ping")])
    with caplog.at_level(logging.WARNING, logger="ratelimit"):
        assert await codes(wrapped, ("GET", "/api/ping")) == [200]
    assert any("'ping' (/ping, any method)" in r.getMessage() for r in caplog.records)


async def test_a_request_every_limit_exempts_gets_no_empty_ratelimit_field() -> None:
    """A key of None exempts: the admitted response carries no `RateLimit` field at all,
    and an unmatched request none either."""
    rule = Rule("/v1/*", limits=[TokenBucket("1/minute", key=lambda scope: None)])
    app = FastAPI()
    app.get("/v1/models")(ok)
    app.get("/other")(ok)
    app.add_middleware(RateLimitMiddleware, rules=[rule])
    async with client(app) as c:
        exempted = await c.get("/v1/models")
        unmatched = await c.get("/other")
    for response in (exempted, unmatched):
        assert response.status_code == 200
        assert "ratelimit" not in response.headers
        assert "ratelimit-policy" not in response.headers
