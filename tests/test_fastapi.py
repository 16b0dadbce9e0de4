"""Per-route limits in FastAPI (`ratelimit.fastapi.RateLimit`), through real FastAPI apps."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated

import httpx
import pytest
from asgi_helpers import Exchange, http_scope
from fastapi import APIRouter, Depends, FastAPI, Header
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry

from ratelimit import (
    Concurrency,
    ConfigError,
    Limiter,
    Metrics,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    keys,
)
from ratelimit.fastapi import Admission, RateLimit, Refused, refused_handler


@dataclass
class User:
    id: str
    tier: str = "free"


async def current_user(x_user: str = Header(), x_tier: str = Header("free")) -> User:
    """The app's own authentication: the limiter sees only its result."""
    return User(x_user, x_tier)


async def until(probe: Callable[[], object], want: object = True) -> None:
    """Wait (5 s at most) until `probe()` (awaited if need be) returns `want`."""
    for _ in range(500):
        got = probe()
        if inspect.isawaitable(got):
            got = await got
        if got == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still {got!r}, not {want!r}")


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def per_user(limiter: Limiter, rate: str = "2/minute") -> RateLimit:
    return RateLimit(
        limiter,
        "images",
        limits=[TokenBucket(rate, name="per-user")],
        key=lambda user: user.id,
        who=Depends(current_user),
    )


def images_app(images: RateLimit, *, handler: bool = True) -> FastAPI:
    app = FastAPI(exception_handlers={Refused: refused_handler} if handler else None)

    @app.post("/v1/images", dependencies=[Depends(images)])
    async def generate() -> dict[str, str]:
        return {"ok": "yes"}

    return app


async def test_a_route_limits_each_user_by_the_key_of_a_dependency() -> None:
    """The key comes from the app's `current_user`: alice's third call is refused, bob's pass."""
    app = images_app(per_user(Limiter()))
    async with client(app) as c:
        alice = [(await c.post("/v1/images", headers={"x-user": "alice"})) for _ in range(3)]
        bob = await c.post("/v1/images", headers={"x-user": "bob"})
    assert [r.status_code for r in alice] == [200, 200, 429]
    assert bob.status_code == 200
    assert alice[0].json() == {"ok": "yes"}
    assert alice[0].headers["ratelimit-policy"] == '"per-user";q=2;w=60'
    assert alice[0].headers["ratelimit"] == '"per-user";r=1;t=30'


async def test_a_refusal_is_the_middlewares_answer_byte_for_byte() -> None:
    """Status, Retry-After, RateLimit-Policy, RateLimit, content type and body are the
    middleware's for the same limits."""
    route_app = images_app(per_user(Limiter(), "1/minute"))
    rule = Rule(
        "/v1/images",
        limits=[TokenBucket("1/minute", name="per-user", key=keys.header("x-user"))],
        name="images",
    )
    mw_app = FastAPI()
    mw_app.add_middleware(RateLimitMiddleware, rules=[rule])
    mw_app.post("/v1/images")(lambda: {"ok": "yes"})
    answers = []
    for app in (route_app, mw_app):
        async with client(app) as c:
            await c.post("/v1/images", headers={"x-user": "alice"})
            answers.append(await c.post("/v1/images", headers={"x-user": "alice"}))
    route, middleware = answers
    assert route.status_code == middleware.status_code == 429
    assert route.content == middleware.content
    names = ("retry-after", "ratelimit-policy", "ratelimit", "content-type", "content-length")
    assert {n: route.headers[n] for n in names} == {n: middleware.headers[n] for n in names}
    assert route.headers["content-type"] == "application/problem+json"


async def test_without_the_handler_fastapi_answers_with_the_same_status_and_fields() -> None:
    """Refused is an HTTPException: FastAPI's own handler keeps status and header fields."""
    app = images_app(per_user(Limiter(), "1/minute"), handler=False)
    async with client(app) as c:
        await c.post("/v1/images", headers={"x-user": "alice"})
        refused = await c.post("/v1/images", headers={"x-user": "alice"})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60"
    assert refused.headers["ratelimit"] == '"per-user";r=0;t=60'
    assert refused.json() == {"detail": "Rate limit reached for per-user. Retry in 60 seconds."}


async def test_a_router_dependency_is_one_quota_across_its_routes() -> None:
    """`APIRouter(dependencies=[Depends(limit)])`: one bucket per caller for all its routes."""
    limit = per_user(Limiter())
    router = APIRouter(prefix="/v1", dependencies=[Depends(limit)])
    router.get("/a")(lambda: "a")
    router.get("/b")(lambda: "b")
    app = FastAPI(exception_handlers={Refused: refused_handler})
    app.include_router(router)
    async with client(app) as c:
        codes = [
            (await c.get(p, headers={"x-user": "alice"})).status_code
            for p in ("/v1/a", "/v1/b", "/v1/a")
        ]
    assert codes == [200, 200, 429]


async def test_a_key_of_none_exempts_and_sends_no_empty_field() -> None:
    """A caller the key exempts is not limited and gets no `RateLimit` field at all."""
    limiter = Limiter()
    limit = RateLimit(
        limiter,
        "images",
        limits=[TokenBucket("1/minute")],
        key=lambda user: None if user.tier == "internal" else user.id,
        who=current_user,
    )
    async with client(images_app(limit)) as c:
        answers = [
            await c.post("/v1/images", headers={"x-user": "ci", "x-tier": "internal"})
            for _ in range(3)
        ]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert "ratelimit" not in answers[0].headers
    assert "ratelimit-policy" not in answers[0].headers


async def test_a_failing_key_answers_400_and_spends_nothing() -> None:
    """A key function that raises is the request's fault: 400, as in the middleware."""
    limiter = Limiter()
    limit = RateLimit(
        limiter, "images", limits=[TokenBucket("1/minute")], key=lambda user: user.missing
    )
    async with client(images_app(limit)) as c:
        bad = await c.post("/v1/images")
    assert bad.status_code == 400
    assert bad.json()["title"] == "Bad Request"


async def test_without_key_the_limits_own_keys_read_the_request() -> None:
    """No `key=`: each limit's own key function reads the scope, as in a middleware rule."""
    limit = RateLimit(
        Limiter(), "images", limits=[TokenBucket("1/minute", key=keys.header("x-api-key"))]
    )
    async with client(images_app(limit)) as c:
        codes = [
            (await c.post("/v1/images", headers={"x-api-key": k})).status_code
            for k in ("a", "a", "b")
        ]
    assert codes == [200, 429, 200]


async def test_the_rule_is_the_limiters_shares_metrics_and_overrides() -> None:
    """The route's limits are a rule of the limiter: counted in its metrics, changed by
    its live overrides, reported like any rule (what `ratelimit status` reads)."""
    registry = CollectorRegistry()
    limiter = Limiter(
        [Rule("/v1/chat", limits=[TokenBucket("9/minute")])],
        metrics=Metrics(registry=registry),
    )
    app = images_app(per_user(limiter, "5/minute"))
    async with client(app) as c:
        await c.post("/v1/images", headers={"x-user": "alice"})
        await limiter.overrides.set("images", rate="1/minute", burst=1, expires_in=60)
        after = await c.post("/v1/images", headers={"x-user": "bob"})
        refused = await c.post("/v1/images", headers={"x-user": "bob"})
    assert after.headers["ratelimit-policy"] == '"per-user";q=1;w=60'
    assert refused.status_code == 429
    allowed = registry.get_sample_value(
        "ratelimit_decisions_total", {"rule": "images", "limit": "", "outcome": "allowed"}
    )
    assert allowed == 2
    report = limiter.overrides.describe()["rules"]
    assert set(report) == {"v1.chat", "images"}
    assert report["images"]["path"] is None
    await limiter.aclose()


async def test_a_route_and_the_middleware_share_one_redis_limiter(redis_url: str) -> None:
    """One Limiter on Redis: a route's rule and a middleware rule both decide in it."""
    limiter = Limiter(
        [Rule("/v1/chat", limits=[TokenBucket("1/minute")])], backend=RedisBackend(redis_url)
    )
    app = images_app(per_user(limiter, "1/minute"))
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    app.post("/v1/chat")(lambda: "chat")
    async with client(app) as c:
        images = [
            (await c.post("/v1/images", headers={"x-user": "u"})).status_code for _ in range(2)
        ]
        chat = [(await c.post("/v1/chat")).status_code for _ in range(2)]
    # Through the middleware too, the route's rule is decided once per request.
    assert images == [200, 429]
    assert chat == [200, 429]
    # `ratelimit status` lists it from the worker's report, like the middleware's rule.
    await asyncio.sleep(0.05)  # the first report
    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ratelimit", "status", "--redis", redis_url, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=30,
        check=True,
    )
    rules = {r["name"]: r for r in json.loads(status.stdout)["rules"]}
    assert set(rules) == {"v1.chat", "images"}
    assert rules["images"]["limits"][0]["configured"]["rate"] == "1/minute"
    await limiter.aclose()


async def test_rules_are_added_only_before_start_and_under_unused_names() -> None:
    """A rule added after start-up (or under a used name) is a ConfigError naming it."""
    limiter = Limiter([Rule("/v1/chat", limits=[TokenBucket("9/minute")], name="chat")])
    with pytest.raises(ConfigError, match=r"rule.name: expected a name unused"):
        RateLimit(limiter, "chat", limits=[TokenBucket("1/minute")])
    with pytest.raises(ConfigError, match=r"name: expected the name of a rule .* without a path"):
        RateLimit(limiter, "chat")  # a rule with a path is the middleware's
    await limiter.start()
    with pytest.raises(ConfigError, match=r"rule: expected a rule added before the limiter starts"):
        RateLimit(limiter, "late", limits=[TokenBucket("1/minute")])
    await limiter.aclose()


async def test_a_route_may_name_a_pathless_rule_of_the_limiter() -> None:
    """`RateLimit(limiter, name)` without limits uses the limiter's rule; `acquire` shares it."""
    limiter = Limiter([Rule(name="images", limits=[TokenBucket("2/minute")])])
    limit = RateLimit(limiter, "images", key=lambda user: user.id, who=current_user)
    async with client(images_app(limit)) as c:
        assert (await c.post("/v1/images", headers={"x-user": "a"})).status_code == 200
        await limiter.check("images", key="a")  # a worker spends the last unit
        assert (await c.post("/v1/images", headers={"x-user": "a"})).status_code == 429


async def test_priority_comes_from_the_dependency() -> None:
    """`priority(who)` ranks the caller in a Concurrency line; one no class allows is a 400."""
    limiter = Limiter()
    gate = asyncio.Event()
    limit = RateLimit(
        limiter,
        "images",
        limits=[Concurrency(1, queue=4, timeout=5, classes=["pro", "free"])],
        key=lambda user: user.id,
        priority=lambda user: user.tier,
        who=current_user,
    )
    app = FastAPI(exception_handlers={Refused: refused_handler})
    order: list[str] = []

    @app.post("/v1/images", dependencies=[Depends(limit)])
    async def generate(user: Annotated[User, Depends(current_user)]) -> str:
        order.append(user.id)
        await gate.wait()
        return user.id

    async with client(app) as c:

        async def call(user: str, tier: str) -> int:
            r = await c.post("/v1/images", headers={"x-user": user, "x-tier": tier})
            return r.status_code

        async def waiting() -> int:
            return (await limiter.statistics("images"))[0].waiting

        first = asyncio.create_task(call("holder", "free"))
        await until(lambda: bool(order))
        late_free = asyncio.create_task(call("free-1", "free"))
        await until(waiting, 1)
        late_pro = asyncio.create_task(call("pro-1", "pro"))
        await until(waiting, 2)
        assert await call("x", "gold") == 400
        gate.set()
        assert await asyncio.gather(first, late_free, late_pro) == [200, 200, 200]
    assert order == ["holder", "pro-1", "free-1"]


def streaming_app(limiter: Limiter, release: asyncio.Event) -> FastAPI:
    limit = RateLimit(limiter, "stream", limits=[Concurrency(1)], key=lambda r: "all")
    app = FastAPI(exception_handlers={Refused: refused_handler})

    @app.get("/stream")
    # A default, not Annotated: the annotations are strings here, and `limit` is local.
    async def stream(admission: Admission = Depends(limit)) -> StreamingResponse:  # noqa: B008
        async def body() -> AsyncIterator[bytes]:
            yield b"first "
            await release.wait()
            yield b"last"

        return StreamingResponse(body(), headers=admission.headers)

    return app


async def test_a_slot_is_held_until_the_streamed_body_ends() -> None:
    """A Concurrency slot of a route is released when the streamed body's last part is sent."""
    limiter = Limiter()
    release = asyncio.Event()
    app = streaming_app(limiter, release)
    ex = Exchange(app, http_scope("/stream"))
    ex.start()
    await ex.started.wait()
    assert dict(ex.sent[0]["headers"])[b"ratelimit"] == b'"concurrency";r=0'
    assert (await limiter.statistics("stream"))[0].in_flight == 1
    release.set()
    assert ex.task is not None
    await ex.task
    assert (await limiter.statistics("stream"))[0].in_flight == 0


async def test_a_client_leaving_mid_stream_gives_the_slot_back() -> None:
    """A disconnect mid-stream ends the response and releases the slot: no leak."""
    limiter = Limiter()
    app = streaming_app(limiter, asyncio.Event())  # never released: only the disconnect ends it
    ex = Exchange(app, http_scope("/stream"))
    ex.start()
    await ex.started.wait()
    assert (await limiter.statistics("stream"))[0].in_flight == 1
    ex.disconnect()
    assert ex.task is not None
    await asyncio.wait_for(ex.task, 5)

    async def in_flight() -> int:
        return (await limiter.statistics("stream"))[0].in_flight

    await until(in_flight, 0)


def test_importing_ratelimit_does_not_import_fastapi() -> None:
    """The face is opt-in: `import ratelimit` works without FastAPI installed."""
    code = "import sys, ratelimit; assert 'fastapi' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_under_uvicorn_a_streamed_route_holds_its_slot_to_the_end_and_not_past_a_hang_up() -> None:
    """Real sockets: the slot is held while the body streams, freed when it ends, and freed
    when the client hangs up mid-stream."""
    import socket
    import time

    from _servers import uvicorn_app

    def in_flight(url: str) -> int:
        return int(httpx.get(f"{url}/state", timeout=2).json()["in_flight"])

    def until_free(url: str) -> None:
        deadline = time.monotonic() + 5
        while in_flight(url) != 0:
            assert time.monotonic() < deadline, "the slot was not released"
            time.sleep(0.05)

    with uvicorn_app("apps.fastapi_stream_app:app") as (url, _):
        with httpx.stream("GET", f"{url}/stream", timeout=10) as r:
            assert r.status_code == 200
            assert r.headers["ratelimit"] == '"concurrency";r=0'
            assert in_flight(url) == 1
            busy = httpx.get(f"{url}/stream", timeout=5)
            assert busy.status_code == 503
            assert busy.headers["content-type"] == "application/problem+json"
            r.read()
        until_free(url)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            assert in_flight(url) == 1
        until_free(url)
