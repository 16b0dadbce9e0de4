"""A rule's cost (and keys) may read the JSON request body.

The body is read once, bounded (413 past the rule's `body_limit`), only for
requests whose rule reads it, and replayed to the app unchanged. A body that
is not a JSON object, or ends early, makes the request unratable: 400, never
free, nothing consumed.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import json
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from _servers import uvicorn_app
from asgi_helpers import http_scope
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from ratelimit import (
    ConfigError,
    MemoryBackend,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
    keys,
)
from ratelimit._types import Message, Scope
from ratelimit.policy.body import SCOPE_KEY, parse, takes_body
from ratelimit.policy.config import load_config

BURST = 64


def images(scope: Scope, body: dict[str, Any]) -> Any:
    """An image request costs its `n` (one image when absent)."""
    return body.get("n", 1)


def make_app(
    *, body_limit: int = 1 << 20, shadow: bool = False, extra: list[Rule] | None = None
) -> tuple[FastAPI, list[bytes]]:
    """A FastAPI image endpoint limited by `n`, recording the bytes it received."""
    app = FastAPI()
    received: list[bytes] = []

    @app.post("/v1/images/generations")
    async def generate(request: Request) -> Response:
        data = await request.body()
        received.append(data)
        return JSONResponse({"sha256": hashlib.sha256(data).hexdigest()})

    @app.post("/v1/chat")
    async def chat(request: Request) -> Response:
        received.append(await request.body())
        return JSONResponse({})

    @app.post("/upload")
    async def upload(request: Request) -> Response:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return JSONResponse({"bytes": size})

    rules = [
        Rule(
            "/v1/images/generations",
            methods=["POST"],
            limits=[TokenBucket("1/hour", burst=BURST, key=keys.header("x-api-key"))],
            cost=images,
            body_limit=body_limit,
            shadow=shadow,
        ),
        *(extra or []),
    ]
    app.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), rules=rules)
    return app, received


def remaining(response: httpx.Response) -> int:
    """`r` of the first limit in the `RateLimit` field."""
    field = response.headers["ratelimit"]
    return int(field.split(";r=")[1].split(";")[0])


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


ALICE = {"x-api-key": "alice"}


async def test_an_image_request_with_n_4_charges_4_and_16_images_charge_16() -> None:
    """The bucket loses the body's `n`: 4, then 16, then a request for more than is left
    is refused (429), and the app received exactly the bytes sent."""
    app, received = make_app()
    async with client(app) as c:
        four = await c.post(
            "/v1/images/generations", json={"n": 4, "prompt": "a cat"}, headers=ALICE
        )
        assert four.status_code == 200
        assert remaining(four) == BURST - 4
        sixteen = await c.post("/v1/images/generations", json={"n": 16}, headers=ALICE)
        assert remaining(sixteen) == BURST - 20
        too_many = await c.post("/v1/images/generations", json={"n": 45}, headers=ALICE)
        assert too_many.status_code == 429
        one = await c.post("/v1/images/generations", json={"prompt": "a dog"}, headers=ALICE)
        assert remaining(one) == BURST - 21
    assert received == [
        b'{"n":4,"prompt":"a cat"}',
        b'{"n":16}',
        b'{"prompt":"a dog"}',
    ]


async def test_the_app_receives_the_same_bytes() -> None:
    """Whitespace, key order, escapes and non-ASCII text reach the app byte for byte."""
    app, received = make_app()
    raw = '{ "prompt" : "caf\u00e9 \\u00e9 \U0001f600",\n  "n":2 ,"z":[1, 2.50]}'.encode()
    headers = {**ALICE, "content-type": "application/json; charset=utf-8"}
    async with client(app) as c:
        r = await c.post("/v1/images/generations", content=raw, headers=headers)
    assert r.status_code == 200, r.text
    assert remaining(r) == BURST - 2
    assert received == [raw]
    assert r.json()["sha256"] == hashlib.sha256(raw).hexdigest()


UNRATABLE = [
    pytest.param(b"{not json", "application/json", id="malformed"),
    pytest.param(b"", "application/json", id="empty"),
    pytest.param(b"[1, 2]", "application/json", id="array"),
    pytest.param(b'"n"', "application/json", id="string"),
    pytest.param(b'{"n": 4}', "text/plain", id="wrong-content-type"),
    pytest.param(b'{"n": 4}', "application/x-www-form-urlencoded", id="form-content-type"),
    pytest.param(b'{"n": -1}', "application/json", id="negative-n"),
    pytest.param(b'{"n": 0}', "application/json", id="zero-n"),
    pytest.param(b'{"n": 1.5}', "application/json", id="fractional-n"),
    pytest.param(b'{"n": "4"}', "application/json", id="string-n"),
    pytest.param(b'{"n": true}', "application/json", id="boolean-n"),
    pytest.param(b'{"n": NaN}', "application/json", id="nan-n"),
    pytest.param(b'{"n": 1e400}', "application/json", id="infinite-n"),
    pytest.param(b'{"n": 9007199254740993}', "application/json", id="n-past-2**53"),
    pytest.param(b"\xff\xfe{", "application/json", id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "application/json", id="deep-nesting"),
]


@pytest.mark.parametrize(("body", "content_type"), UNRATABLE)
async def test_a_body_that_cannot_be_rated_is_refused_with_400_and_consumes_nothing(
    body: bytes, content_type: str
) -> None:
    """400 problem+json, the app not run, the caller's bucket untouched."""
    app, received = make_app()
    async with client(app) as c:
        bad = await c.post(
            "/v1/images/generations",
            content=body,
            headers={**ALICE, "content-type": content_type},
        )
        assert bad.status_code == 400
        assert bad.headers["content-type"] == "application/problem+json"
        assert bad.json()["status"] == 400
        good = await c.post("/v1/images/generations", json={"n": 1}, headers=ALICE)
    assert remaining(good) == BURST - 1
    assert len(received) == 1


async def test_a_missing_content_type_is_read_as_json() -> None:
    """As FastAPI reads it: a body without a content-type is parsed as JSON."""
    app, _ = make_app()
    async with client(app) as c:
        r = await c.post("/v1/images/generations", content=b'{"n": 3}', headers=ALICE)
    assert r.status_code == 200
    assert remaining(r) == BURST - 3


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_bound_is_refused_with_413_and_consumes_nothing(
    chunked: bool,
) -> None:
    """Past `body_limit` bytes: 413 problem+json, by the content-length or once read past
    it; a body of exactly the bound is read."""
    app, received = make_app(body_limit=100)
    big = json.dumps({"n": 1, "prompt": "x" * 200}).encode()
    exact = json.dumps({"n": 2, "prompt": "x" * (100 - 22)}).encode()
    assert len(exact) == 100

    async def stream(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 7):
            yield data[i : i + 7]

    async with client(app) as c:
        content: Any = stream(big) if chunked else big
        r = await c.post("/v1/images/generations", content=content, headers=ALICE)
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["title"] == "Content Too Large"
        assert "100 bytes" in r.json()["detail"]
        ok = await c.post(
            "/v1/images/generations",
            content=stream(exact) if chunked else exact,
            headers=ALICE,
        )
    assert ok.status_code == 200
    assert remaining(ok) == BURST - 2
    assert received == [exact]


async def test_a_shadow_rule_passes_an_unratable_body_to_the_app() -> None:
    """In shadow mode a malformed or too long body is let through, unchanged."""
    app, received = make_app(body_limit=10, shadow=True)
    async with client(app) as c:
        bad = await c.post("/v1/images/generations", content=b"{oops", headers=ALICE)
        long = json.dumps({"prompt": "x" * 50}).encode()
        big = await c.post("/v1/images/generations", content=long, headers=ALICE)
    assert (bad.status_code, big.status_code) == (200, 200)
    assert received == [b"{oops", long]


async def test_per_model_limits_key_by_a_body_field() -> None:
    """`keys.body_field("model")`: each model has its own bucket; a request without the
    field is exempt; a field that is not text is unratable (400)."""
    rule = Rule(
        "/v1/chat",
        methods=["POST"],
        limits=[TokenBucket("1/hour", burst=2, key=keys.body_field("model"))],
    )
    app, received = make_app(extra=[rule])
    async with client(app) as c:
        codes = [
            (await c.post("/v1/chat", json={"model": model})).status_code
            for model in ["small", "small", "small", "large", "large"]
        ]
        assert codes == [200, 200, 429, 200, 200]
        assert (await c.post("/v1/chat", json={"prompt": "hi"})).status_code == 200
        assert (await c.post("/v1/chat", json={"model": ["x"]})).status_code == 400
    assert len(received) == 5


# -- hand-built receive: what exactly the app sees ----------------------------------


def _recorder() -> tuple[Callable[..., Any], list[Message]]:
    """An ASGI app that reads every message until the disconnect, then answers."""
    seen: list[Message] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message)
            if message["type"] == "http.disconnect":
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app, seen


def _scripted(messages: list[Message]) -> Callable[[], Any]:
    queue = list(messages)

    async def receive() -> Message:
        if not queue:
            await asyncio.Event().wait()  # nothing more: the client is idle
        return queue.pop(0)

    return receive


def _middleware(app: Any, **rule: Any) -> RateLimitMiddleware:
    return RateLimitMiddleware(
        app,
        backend=MemoryBackend(),
        rules=[
            Rule(
                "/v1/images",
                limits=[TokenBucket("1/hour", burst=BURST, key=keys.GLOBAL)],
                cost=images,
                **rule,
            )
        ],
    )


async def test_every_message_is_replayed_with_its_flags_and_the_disconnect() -> None:
    """The app receives the very messages the server sent, in order: each chunk with its
    `more_body`, then `http.disconnect`."""
    app, seen = _recorder()
    messages: list[Message] = [
        {"type": "http.request", "body": b'{"n": ', "more_body": True},
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": b"3}", "more_body": False},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = _middleware(app)
    scope = http_scope("/v1/images", "POST")
    await middleware(scope, _scripted(list(messages)), send)
    assert seen == messages
    assert sent[0]["status"] == 200
    assert scope[SCOPE_KEY] == {"n": 3}


async def test_a_client_leaving_mid_upload_is_unratable_and_runs_nothing() -> None:
    """A body cut short by a disconnect: 400 (sent into the void), the app never runs,
    nothing taken from the bucket."""
    app, seen = _recorder()
    middleware = _middleware(app)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    cut = [
        {"type": "http.request", "body": b'{"n": 6', "more_body": True},
        {"type": "http.disconnect"},
    ]
    await middleware(http_scope("/v1/images", "POST"), _scripted(cut), send)
    assert seen == []
    assert sent[0]["status"] == 400
    decision = await middleware.limiter.peek("v1.images", cost=1)
    assert decision.states[0].remaining == BURST


@pytest.mark.parametrize("path", ["/elsewhere", "/v1/plain"])
async def test_a_100_mib_upload_to_a_route_whose_rule_does_not_read_the_body_streams_through(
    path: str,
) -> None:
    """Unmatched, or matched by a rule with a constant cost: the middleware reads
    nothing before the app (which gets the first chunk first) and memory stays bounded."""
    chunk = b"x" * (64 * 1024)
    total = 100 * 1024 * 1024
    state = {"sent": 0, "read_before_app": -1}

    async def receive() -> Message:
        state["sent"] += len(chunk)
        # A fresh bytes object each time, as a server's would be.
        return {"type": "http.request", "body": bytes(chunk), "more_body": state["sent"] < total}

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        state["read_before_app"] = state["sent"]
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message["body"])
            more = message["more_body"]
        assert size == total
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = RateLimitMiddleware(
        app,
        backend=MemoryBackend(),
        rules=[
            Rule("/v1/images", limits=[TokenBucket("1/hour", key=keys.GLOBAL)], cost=images),
            Rule("/v1/plain", limits=[TokenBucket("10/hour", key=keys.GLOBAL)], cost=2),
        ],
    )

    async def send(message: Message) -> None:
        pass

    gc.collect()
    tracemalloc.start()
    try:
        await middleware(http_scope(path, "POST"), receive, send)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert state["read_before_app"] == 0
    assert peak < 4 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


# -- the contract: which cost functions read the body --------------------------------


class _Pricer:
    def __call__(self, scope: Scope, body: dict[str, Any]) -> int:
        return 1


async def _async_cost(scope: Scope, body: dict[str, Any]) -> int:
    return 1


def _three(scope: Scope, body: dict[str, Any], extra: int) -> int:
    return 1


@pytest.mark.parametrize(
    ("func", "reads"),
    [
        (lambda scope: 1, False),
        (lambda scope, body: 1, True),
        (lambda scope, body=None: 1, False),
        (lambda *args: 1, True),
        (lambda scope, *args: 1, True),
        (_async_cost, True),
        (_Pricer(), True),
        (functools.partial(_three, extra=1), True),
        (len, False),
    ],
)
def test_a_cost_function_reads_the_body_when_it_takes_scope_and_body(
    func: Callable[..., Any], reads: bool
) -> None:
    """Decided once from the signature: two required positional parameters."""
    assert takes_body(func) is reads
    rule = Rule("/x", limits=[TokenBucket("1/second")], cost=func)
    assert rule.reads_body is reads


def test_a_rule_reads_the_body_only_when_its_cost_or_a_key_does() -> None:
    """A constant cost and scope keys read nothing; a body key does."""
    plain = Rule("/x", limits=[TokenBucket("3/second", key=keys.header("x-k"))], cost=3)
    keyed = Rule("/x", limits=[TokenBucket("1/second", key=keys.body_field("model"))])
    assert (plain.reads_body, keyed.reads_body) == (False, True)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1MiB"])
def test_body_limit_must_be_a_positive_number_of_bytes(bad: object) -> None:
    with pytest.raises(ConfigError, match="body_limit: expected a positive number of bytes"):
        Rule("/x", limits=[TokenBucket("1/second")], cost=images, body_limit=bad)  # type: ignore[arg-type]


def test_a_config_file_sets_body_limit_and_a_body_key() -> None:
    settings = load_config(
        {
            "rules": [
                {
                    "path": "/v1/chat",
                    "body_limit": 4096,
                    "limits": [{"type": "token_bucket", "rate": "5/minute", "key": "body:model"}],
                }
            ]
        }
    )
    rule = settings.rules[0]
    assert (rule.body_limit, rule.reads_body) == (4096, True)
    assert repr(rule.limits[0].key) == "keys.body_field('model')"


@pytest.mark.parametrize(
    ("data", "content_type", "problem"),
    [
        (b'{"a": 1}', "application/vnd.api+json", None),
        (b'{"a": 1}', "APPLICATION/JSON ; charset=utf-8", None),
        (b'{"a": 1}', "text/json", "content-type"),
        (b"null", None, "not an object"),
    ],
)
def test_parse_accepts_json_objects_of_json_media_types(
    data: bytes, content_type: str | None, problem: str | None
) -> None:
    if problem is None:
        assert parse(data, content_type) == {"a": 1}
    else:
        with pytest.raises(ValueError, match=problem):
            parse(data, content_type)


# -- a real uvicorn: a chunked upload, and a client leaving mid-upload ----------------


def _post_chunked(port: int, chunks: list[bytes], *, finish: bool) -> bytes:
    """POST /v1/images as alice with a chunked body; without `finish`, hang up mid-upload."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/images HTTP/1.1\r\nHost: x\r\nx-api-key: alice\r\nConnection: close\r\n"
            b"content-type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for chunk in chunks:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            time.sleep(0.02)
        if not finish:
            return b""
        s.sendall(b"0\r\n\r\n")
        answer = b""
        while data := s.recv(65536):
            answer += data
        return answer


@pytest.mark.slow
def test_under_uvicorn_a_chunked_upload_is_charged_by_n_and_a_cut_one_is_not() -> None:
    """A chunked body with n=4 costs 4 and reaches the app intact; a client that hangs up
    mid-upload takes nothing and never reaches the app."""
    with uvicorn_app("apps.body_app:app") as (url, _):
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"n": 4, "prompt": "p" * 5000}).encode()
        chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        answer = _post_chunked(port, chunks, finish=True)
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["sha256"] == hashlib.sha256(body).hexdigest()
        assert httpx.get(f"{url}/state").json() == {"served": 1, "remaining": BURST - 4}
        _post_chunked(port, [b'{"n": 8, "prompt": "', b"q" * 1000], finish=False)
        time.sleep(0.3)  # the server notices the hang-up
        assert httpx.get(f"{url}/state").json() == {"served": 1, "remaining": BURST - 4}
