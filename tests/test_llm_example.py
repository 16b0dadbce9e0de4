"""The LLM example (examples/llm) through the real openai SDK: streaming with usage, token
budgets refused with 429 and Retry-After, settlement refunding unused `max_tokens` and
charging an underestimate as debt, and a client that hangs up mid-stream charged for what
was generated; on the in-process backend and a real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import httpx2
import openai
import pytest
from asgi_helpers import Exchange, http_scope
from starlette.applications import Starlette

from examples.llm import demo
from examples.llm.app import Limits, create_app
from examples.llm.model import count_prompt_tokens, estimate_prompt_tokens
from ratelimit import Backend, MemoryBackend, RedisBackend

#: The simulated model's pace in these tests: fast, so a reply takes milliseconds.
PACE = 5000.0
QUESTION = [{"role": "user", "content": "How do token buckets work?"}]


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        store: Backend = MemoryBackend()
    else:
        request.applymarker(pytest.mark.redis)
        store = RedisBackend(request.getfixturevalue("redis_url"), prefix="llm-test")
    yield store
    await store.aclose()


def app_of(backend: Backend, reply: int = 20, **limits: int) -> Starlette:
    """The example's app on `backend`; its model answers `reply` tokens (max_tokens caps)."""
    return create_app(
        limits=Limits(**limits),
        backend=backend,
        tokens_per_second=PACE,
        reply_tokens=lambda messages: reply,
    )


def sdk(app: Starlette, key: str = "sk-alice") -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t")
    return openai.AsyncOpenAI(api_key=key, base_url="http://t/v1", http_client=http, max_retries=0)


async def chat(
    client: openai.AsyncOpenAI,
    max_tokens: int | None = None,
    messages: Sequence[Any] = QUESTION,
) -> tuple[str, Any]:
    """One streamed completion read to its end: the text and the usage chunk."""
    stream = await client.chat.completions.create(
        model="sim-chat-1",
        messages=list(messages),
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=openai.omit if max_tokens is None else max_tokens,
    )
    text, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(text), usage


async def test_a_reply_streams_token_by_token_and_ends_with_usage(backend: Backend) -> None:
    """Each token is one `chat.completion.chunk`; the last chunk before `[DONE]` carries
    usage: the prompt as the model counts it and the tokens it generated."""
    app = app_of(backend, reply=37)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t")
    body = {
        "model": "sim-chat-1",
        "messages": QUESTION,
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await http.post(
        "/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-alice"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in response.text.split("\n\n") if e[6:] not in ("", "[DONE]")]
    assert [e["object"] for e in events] == ["chat.completion.chunk"] * len(events)
    tokens = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(tokens) == 37
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"] == {
        "prompt_tokens": count_prompt_tokens(QUESTION),
        "completion_tokens": 37,
        "total_tokens": count_prompt_tokens(QUESTION) + 37,
    }
    # The OpenAI dialect's fields: requests, and the scarcest token limit.
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    assert response.headers["x-ratelimit-remaining-requests"] == "59"
    assert "x-ratelimit-remaining-tokens" in response.headers

    text, usage = await chat(sdk(app), max_tokens=10)
    assert len(text.split()) == 10  # max_tokens stops the reply
    assert (usage.prompt_tokens, usage.completion_tokens) == (count_prompt_tokens(QUESTION), 10)


async def test_a_key_over_its_output_token_budget_gets_429_with_retry_after(
    backend: Backend,
) -> None:
    """A key whose replies used its output tokens is refused by `otpm` with 429 and an
    honest wait; another key is not."""
    app = app_of(backend, reply=10_000, output_tokens=1000)  # replies run to max_tokens
    alice = sdk(app)
    await chat(alice, max_tokens=800)
    with pytest.raises(openai.RateLimitError) as refused:
        await chat(alice, max_tokens=800)
    headers = refused.value.response.headers
    # 800 used of 1000: 600 more must refill at 1000/minute, 36 s.
    assert 35 <= int(headers["retry-after"]) <= 40
    assert 35_000 <= int(headers["retry-after-ms"]) <= 40_000
    assert "otpm" in refused.value.message
    assert refused.value.code == "rate_limit_exceeded"
    _, usage = await chat(sdk(app, "sk-bob"), max_tokens=800)
    assert usage.completion_tokens == 800


async def test_settling_refunds_unused_max_tokens_so_more_requests_fit(backend: Backend) -> None:
    """Each request reserves max_tokens=500 of an output budget of 1000 (two at a time by
    the estimate) and uses 20: settling gives back 480 each time, so ten fit."""
    app = app_of(backend, reply=20, output_tokens=1000)
    alice = sdk(app)
    for _ in range(10):
        _, usage = await chat(alice, max_tokens=500)
        assert usage.completion_tokens == 20
    ledger = app.state.completions.ledger
    assert [(r.reserved_output, r.used_output, r.settled) for r in ledger] == [(500, 20, True)] * 10


async def test_reservations_in_flight_count_until_they_settle(backend: Backend) -> None:
    """Two streams in flight reserve 2 x 500 of 1000: a third is refused while they run
    and admitted once they have settled."""
    app = create_app(
        limits=Limits(output_tokens=1000),
        backend=backend,
        tokens_per_second=200.0,  # 20 tokens: 0.1 s in flight
        reply_tokens=lambda messages: 20,
    )
    alice = sdk(app)
    running = [asyncio.ensure_future(chat(alice, max_tokens=500)) for _ in range(2)]
    await asyncio.sleep(0.03)
    with pytest.raises(openai.RateLimitError):
        await chat(alice, max_tokens=500)
    await asyncio.gather(*running)
    _, usage = await chat(alice, max_tokens=500)
    assert usage.completion_tokens == 20


async def test_a_prompt_longer_than_its_estimate_is_charged_as_debt(backend: Backend) -> None:
    """The estimate (characters / 4) undercounts a prompt of punctuation, one token per
    character: settling charges the rest, past the limit, and the key waits it out."""
    prompt = [{"role": "user", "content": "!" * 200}]
    estimate, actual = estimate_prompt_tokens(prompt), count_prompt_tokens(prompt)
    assert (estimate, actual) == (57, 207)
    app = app_of(backend, reply=1, input_tokens=400)
    alice = sdk(app)
    await chat(alice, max_tokens=1, messages=prompt)  # 207 charged
    await chat(alice, max_tokens=1, messages=prompt)  # 57 fits; settled to 414 of 400
    with pytest.raises(openai.RateLimitError) as refused:
        await chat(alice, max_tokens=1, messages=prompt)
    # The debt (14) and this estimate (57) refill at 400/minute: 10.65 s.
    assert 10_000 <= int(refused.value.response.headers["retry-after-ms"]) <= 12_000
    assert "itpm" in refused.value.message


async def test_a_rejected_body_gives_its_tokens_back(backend: Backend) -> None:
    """A body the API rejects (400) reserved the default 1024 output tokens; the endpoint
    settles them to zero, so the key's budget is whole for the next request."""
    app = app_of(backend, output_tokens=1024)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t")
    bad = {"model": "sim-chat-1", "messages": QUESTION, "max_tokens": "lots"}
    response = await http.post(
        "/v1/chat/completions", json=bad, headers={"authorization": "Bearer sk-alice"}
    )
    assert response.status_code == 400
    _, usage = await chat(sdk(app), max_tokens=1024)
    assert usage.completion_tokens == 20


async def events_until(exchange: Exchange, tokens: int) -> None:
    """Wait until the app has sent `tokens` content chunks."""
    while True:
        sent = [m.get("body", b"") for m in exchange.sent if m["type"] == "http.response.body"]
        if sum(b.count(b'"content":"') for b in sent) - 1 >= tokens:  # less the role chunk
            return
        await asyncio.sleep(0.005)


def long_stream(backend: Backend) -> tuple[Starlette, dict[str, Any], bytes]:
    """The app with a 1000-token output budget, and a streaming request reserving 900 of
    it whose reply would run 10,000 tokens at 10 ms each: cut short, it lands mid-reply."""
    app = create_app(
        limits=Limits(output_tokens=1000),
        backend=backend,
        tokens_per_second=100.0,
        reply_tokens=lambda messages: 10_000,
    )
    body = json.dumps(
        {"model": "sim-chat-1", "messages": QUESTION, "max_tokens": 900, "stream": True}
    ).encode()
    scope = http_scope(
        "/v1/chat/completions",
        "POST",
        headers=[(b"authorization", b"Bearer sk-alice"), (b"content-type", b"application/json")],
    )
    return app, scope, body


async def test_a_client_that_hangs_up_mid_stream_is_charged_what_was_generated(
    backend: Backend,
) -> None:
    """A stream of max_tokens=900 from a budget of 1000, cut after 5 tokens: the endpoint
    settles the tokens generated, so another 900 fits at once."""
    app, scope, body = long_stream(backend)
    exchange = Exchange(app, scope, body)
    task = exchange.start()
    await asyncio.wait_for(events_until(exchange, 5), timeout=10)
    exchange.disconnect()
    await asyncio.wait_for(task, timeout=10)
    [record] = app.state.completions.ledger
    assert record.ended == "disconnected"
    assert record.settled is True
    assert 5 <= record.used_output < 20
    assert not any(m.get("body", b"").endswith(b"[DONE]\n\n") for m in exchange.sent)
    app.state.completions.interval = 1 / PACE  # the next reply need not take 9 s
    _, usage = await chat(sdk(app), max_tokens=900)
    assert usage.completion_tokens == 900


def with_time_limit(app: Starlette, seconds: float) -> Any:
    """A request time-out as servers and middleware impose it: the app runs in an anyio
    scope cancelled after `seconds` (cancellation is level-triggered there: every later
    await inside the scope is cancelled too)."""

    async def limited(scope: Any, receive: Any, send: Any) -> None:
        with anyio.move_on_after(seconds):
            await app(scope, receive, send)

    return limited


async def test_a_stream_cut_by_a_time_out_still_settles(backend: Backend) -> None:
    """A time-out cancels the request mid-stream: the endpoint's settle is shielded from
    the cancelled scope, reaches the store, and charges what was generated."""
    app, scope, body = long_stream(backend)
    exchange = Exchange(with_time_limit(app, 0.1), scope, body)
    await asyncio.wait_for(exchange.start(), timeout=10)
    [record] = app.state.completions.ledger
    assert record.ended == "disconnected"
    assert record.settled is True
    assert 3 <= record.used_output < 20
    app.state.completions.interval = 1 / PACE
    _, usage = await chat(sdk(app), max_tokens=900)
    assert usage.completion_tokens == 900


@pytest.mark.slow
async def test_the_demo_serves_refuses_and_settles_through_uvicorn() -> None:
    """`python -m examples.llm --demo`, shortened: real HTTP and hang-ups; the greedy key
    gets more replies than its budget holds at max_tokens each; every request settled."""
    played = await demo.run(duration=3.0, tokens_per_second=500.0)
    greedy = played.tallies["sk-greedy"]
    assert greedy.refused, "the greedy key met its output-token bucket"
    budget = demo.DEMO_LIMITS.output_tokens * (1 + 10 / 60)
    assert greedy.completed > budget // 1024
    impatient = [r for r in played.ledger if r.key == "sk-impatient"]
    assert any(r.ended == "disconnected" for r in impatient)
    assert all(r.used_output < 400 for r in impatient)
    assert all(r.settled is True for r in played.ledger)
    assert any("sk-greedy" in line for line in played.lines)
