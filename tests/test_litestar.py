"""Litestar through the real framework: one limiter per app, whatever the number of routes.

Litestar builds app-level middleware once per route handler (4 routes and the
OpenAPI pages made 28 limiters, and "3/minute" admitted 7 of 7); `RateLimitPlugin`
puts one `Limiter` behind all of them and ties it to the app's lifespan.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import redis.asyncio as aioredis
from _servers import uvicorn_app
from asgi_helpers import Exchange, eventually, http_scope
from litestar import Litestar, asgi, get
from litestar.middleware import DefineMiddleware
from litestar.response import Stream
from litestar.types import Receive, Scope, Send

from ratelimit import (
    Concurrency,
    ConfigError,
    Limiter,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    Window,
    keys,
)
from ratelimit._types import ASGIApp, Message
from ratelimit.backends.base import Backend
from ratelimit.litestar import RateLimitPlugin

#: Set by a test to end the streamed response (a new one per test: see `fresh_gate`).
gate = asyncio.Event()


@get("/v1/a")
async def route_a() -> str:
    return "a"


@get("/v1/b")
async def route_b() -> str:
    return "b"


@get("/v1/c")
async def route_c() -> str:
    return "c"


@get("/v1/d")
async def route_d() -> str:
    return "d"


@get("/health")
async def health() -> str:
    return "ok"


@get("/stream")
async def stream() -> Stream:
    async def body() -> AsyncIterator[bytes]:
        yield b"first\n"
        await gate.wait()
        yield b"last\n"

    return Stream(body())


HANDLERS = [route_a, route_b, route_c, route_d, health, stream]
ROUTES = ["/v1/a", "/v1/b", "/v1/c", "/v1/d"]


def rules() -> list[Rule]:
    """One rule over the four routes ("3/minute" per caller), one slot for /stream."""
    return [
        Rule("/stream", name="stream", limits=[Concurrency(1, key=keys.GLOBAL, name="slot")]),
        Rule("/v1/*", name="v1", limits=[Window("3/minute", key=keys.client_ip(), name="all")]),
    ]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return MemoryBackend()
    request.applymarker(pytest.mark.redis)
    return RedisBackend(request.getfixturevalue("redis_url"))


@pytest.fixture
async def limiter(backend: Backend) -> AsyncIterator[Limiter]:
    lim = Limiter(rules(), backend=backend)
    try:
        yield lim
    finally:
        await lim.aclose()


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[list[str]]:
    """Run the app's ASGI lifespan by hand: start-up on entry, shutdown on exit; yields the
    types of the messages the app sent."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[str] = []
    done = asyncio.Event()

    async def send(message: Message) -> None:
        sent.append(message["type"])
        done.set()

    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send)
    )
    await inbox.put({"type": "lifespan.startup"})
    await asyncio.wait_for(done.wait(), 5)
    done.clear()
    try:
        yield sent
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 5)


async def watchers(backend: RedisBackend) -> int:
    """Limiters following the live overrides on this Redis (one per started limiter)."""
    r = aioredis.Redis.from_url(backend.url)
    try:
        channel = backend.keys.overrides_channel
        return int(dict(await r.pubsub_numsub(channel))[channel.encode()])
    finally:
        await r.aclose()


def test_a_middleware_building_its_own_limiter_per_route_is_refused() -> None:
    """`DefineMiddleware(RateLimitMiddleware, rules=...)` fails at construction, naming the
    fix: Litestar would build one limiter per handler, each counting alone."""
    with pytest.raises(ConfigError, match=r"^limiter: expected one Limiter for the app.*Plugin"):
        Litestar(HANDLERS, middleware=[DefineMiddleware(RateLimitMiddleware, rules=rules())])


@asgi("/files", is_mount=True, copy_scope=True)
async def files(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"file"})


async def test_a_middleware_in_front_of_the_whole_app_limits_mounts_by_their_full_path() -> None:
    """Wrapping the Litestar app itself (one middleware, one limiter, lifespan included) is
    allowed, and its rules see full paths, those of mounted ASGI apps too."""
    limit = Rule("/files/*", limits=[Window("1/minute", key=keys.client_ip())])
    app = RateLimitMiddleware(Litestar([files]), rules=[limit])
    async with client(app) as c:
        codes = [(await c.get(path)).status_code for path in ("/files/a", "/files/b")]
    assert codes == [200, 429]


async def test_the_plugin_admits_exactly_the_limit_across_routes(limiter: Limiter) -> None:
    """ "3/minute" under one rule admits exactly 3 requests over 4 routes; refusals are 429s
    with Retry-After and the RateLimit fields; unlimited routes pass."""
    app = Litestar(HANDLERS, plugins=[RateLimitPlugin(limiter)])
    async with client(app) as c:
        replies = [await c.get(ROUTES[i % 4]) for i in range(8)]
        assert (await c.get("/health")).status_code == 200
    assert [r.status_code for r in replies] == [200] * 3 + [429] * 5
    assert replies[0].headers["ratelimit-policy"] == '"all";q=3;w=60'
    assert replies[0].headers["ratelimit"].startswith('"all";r=2;t=')
    refused = replies[3]
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-policy"] == '"all";q=3;w=60'
    assert refused.headers["ratelimit"].startswith('"all";r=0;t=')
    assert refused.headers["content-type"] == "application/problem+json"


async def test_define_middleware_over_one_limiter_counts_and_starts_once(
    limiter: Limiter,
) -> None:
    """Litestar's many middleware instances over one given `Limiter` share its state and
    start it once (on Redis: one overrides watcher however many routes served)."""
    app = Litestar(HANDLERS, middleware=[DefineMiddleware(RateLimitMiddleware, limiter=limiter)])
    async with client(app) as c:
        codes = [(await c.get(ROUTES[i % 4])).status_code for i in range(8)]
    assert codes == [200] * 3 + [429] * 5
    if isinstance(limiter.backend, RedisBackend):
        await eventually(lambda: limiter.overrides.started)
        assert await watchers(limiter.backend) == 1


class CountingLimiter(Limiter):
    """A real `Limiter` that counts how often it is closed."""

    closes = 0

    async def aclose(self) -> None:
        self.closes += 1
        await super().aclose()


@pytest.mark.redis
async def test_the_plugin_starts_the_limiter_at_startup_and_closes_it_once(
    redis_url: str,
) -> None:
    """The app's start-up starts the limiter (its overrides watcher subscribes before any
    request); its shutdown closes it once, after the app's own shutdown hooks."""
    limiter = CountingLimiter(rules(), backend=RedisBackend(redis_url))
    seen: list[bool] = []

    async def own_hook() -> None:
        seen.append(limiter.closes == 0)

    app = Litestar(HANDLERS, plugins=[RateLimitPlugin(limiter)], on_shutdown=[own_hook])
    async with lifespan(app) as sent:
        assert sent == ["lifespan.startup.complete"]
        assert limiter.started
        for _ in range(100):
            if await watchers(limiter.backend) == 1:
                break
            await asyncio.sleep(0.02)
        assert await watchers(limiter.backend) == 1
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert limiter.closes == 1
    assert seen == [True]
    assert await watchers(limiter.backend) == 0


async def in_use(limiter: Limiter) -> int:
    return sum(s.in_flight for s in await limiter.statistics("stream"))


@pytest.fixture
def fresh_gate() -> Iterator[asyncio.Event]:
    """A gate of this test's event loop for /stream."""
    global gate
    gate = asyncio.Event()
    yield gate
    gate.set()


async def test_a_streamed_response_holds_its_slot_until_its_last_chunk(
    limiter: Limiter, fresh_gate: asyncio.Event
) -> None:
    """The slot is held while the body streams (a second caller gets 503) and released
    when the last chunk goes out."""
    app = Litestar(HANDLERS, plugins=[RateLimitPlugin(limiter)])
    first = Exchange(app, http_scope("/stream"))
    first.start()
    await asyncio.wait_for(first.started.wait(), 5)
    assert await in_use(limiter) == 1
    async with client(app) as c:
        blocked = await c.get("/stream")
    assert blocked.status_code == 503
    assert blocked.headers["retry-after"] == "1"
    fresh_gate.set()
    await eventually(
        lambda: first.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    )
    assert first.status == 200
    assert first.body == b"first\nlast\n"
    assert await in_use(limiter) == 0  # at the last chunk: before the server's disconnect
    first.disconnect()  # what a server sends once the response is complete
    assert first.task is not None
    await asyncio.wait_for(first.task, 5)


async def test_a_client_leaving_mid_stream_gives_its_slot_back(
    limiter: Limiter, fresh_gate: asyncio.Event
) -> None:
    """A client that disconnects while the body streams frees the slot; the next gets in."""
    app = Litestar(HANDLERS, plugins=[RateLimitPlugin(limiter)])
    first = Exchange(app, http_scope("/stream"))
    first.start()
    await asyncio.wait_for(first.started.wait(), 5)
    assert await in_use(limiter) == 1
    first.disconnect()
    assert first.task is not None
    await asyncio.wait_for(first.task, 5)
    assert await in_use(limiter) == 0
    fresh_gate.set()
    async with client(app) as c:
        assert (await c.get("/stream")).status_code == 200


def test_a_real_uvicorn_serves_one_limit_for_the_app() -> None:
    """Under a real uvicorn (lifespan on): exactly 3 of 6 requests over 4 routes pass."""
    with (
        uvicorn_app("apps.litestar_app:app", probe="/health") as (url, _),
        httpx.Client(base_url=url) as c,
    ):
        replies = [c.get(ROUTES[i % 4]) for i in range(6)]
    assert [r.status_code for r in replies] == [200] * 3 + [429] * 3
    assert replies[-1].headers["ratelimit-policy"] == '"all";q=3;w=60'
    # The window reopens within 60 s; refusals at the same moment are spread over it
    # (see core.spread): the third is told two more of its 20 s shares later.
    assert 0 < int(replies[-1].headers["retry-after"]) <= 60 + 2 * 20


def test_importing_ratelimit_does_not_import_litestar() -> None:
    """The Litestar face is a module of its own: `import ratelimit` leaves Litestar out."""
    code = "import sys, ratelimit; assert 'litestar' not in sys.modules, 'litestar imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
