"""A simulated OpenAI-compatible chat API that streams tokens, limited by requests and tokens.

`POST /v1/chat/completions` with `Authorization: Bearer <key>` and an OpenAI
chat body (`{"model", "messages", "max_tokens", "stream": true, ...}`) streams
the simulated model's reply as server-sent events, `tokens_per_second` tokens
a second (50 by default, about what a hosted model streams), one
`chat.completion.chunk` per token, then `data: [DONE]`; with
`stream_options: {"include_usage": true}` a last chunk carries `usage`, as
OpenAI's does. `stream: false` answers one `chat.completion` at the end.

One `Rule` limits it as the providers do (see `rule`): per API key, requests,
input tokens and output tokens per minute; fleet-wide, tokens per minute. At
admission a request reserves its *estimate* (`estimate`: the prompt's length
/ 4, and `max_tokens`); when the reply ends, or the client hangs up mid-stream,
the endpoint settles what the model really used, and the store refunds the
difference (or charges it, putting the key in debt). The official `openai`
SDK works against it unchanged (`base_url="http://127.0.0.1:8000/v1"`).

    python -m examples.llm                 # serve on 127.0.0.1:8000
    python -m examples.llm --demo          # three callers against it, a table of what happened
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ratelimit import Backend, Decision, RateLimitMiddleware, Rule, TokenBucket, keys

from .model import count_prompt_tokens, estimate_prompt_tokens, reply, reply_length

logger = logging.getLogger("examples.llm")

MODEL = "sim-chat-1"
#: Tokens a second the simulated model streams to each caller.
TOKENS_PER_SECOND = 50.0
#: Prompt tokens a second the model reads before its first token (time to first token).
PREFILL_PER_SECOND = 5000.0
#: What a request without `max_tokens` may generate, and so reserves.
DEFAULT_MAX_TOKENS = 1024
#: The most `max_tokens` may ask for (the simulated model's output window).
MAX_OUTPUT_TOKENS = 4096
#: Accounts the endpoint keeps (the oldest are dropped: a server runs for long).
LEDGER_SIZE = 100_000

#: Chooses how long the reply to `messages` would be (the model's own choice).
ReplyLength = Callable[[Sequence[Mapping[str, Any]]], int]


@dataclass(frozen=True)
class Limits:
    """The rule's numbers: per API key, and for the whole fleet (each per minute)."""

    requests: int = 60
    input_tokens: int = 40_000
    output_tokens: int = 8_000
    fleet_tokens: int = 400_000


def bearer(scope: Scope) -> str | None:
    """The caller's API key from `Authorization: Bearer <key>`; None without one (401)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def max_tokens_of(body: Mapping[str, Any]) -> int | None:
    """The reply's bound from `max_completion_tokens` (OpenAI's newer name) or `max_tokens`;
    the default when both are absent; None when the value is not a valid bound."""
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_OUTPUT_TOKENS:
        return value
    return None


def estimate(scope: Scope, body: Mapping[str, Any]) -> dict[str, int]:
    """The rule's cost, read from the JSON body before the model runs.

    One request; the prompt's characters / 4 as input tokens; `max_tokens`
    (the most the reply can use) as output tokens. A body the endpoint will
    reject still costs its request and the default reply (never free); the
    endpoint then settles its tokens to zero.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        messages = []
    return {
        "requests": 1,
        "input_tokens": estimate_prompt_tokens(messages),
        "output_tokens": max_tokens_of(body) or DEFAULT_MAX_TOKENS,
    }


def rule(limits: Limits = Limits()) -> Rule:
    """Everything the endpoint is limited by, in one rule: all or nothing at admission.

    Token buckets, as Anthropic documents its limits: a key that has been idle
    may use a minute's worth at once, then refills continuously.
    """
    api_key = bearer
    return Rule(
        "/v1/chat/completions",
        methods=["POST"],
        name="chat",
        cost=estimate,
        limits=[
            TokenBucket(f"{limits.requests}/minute", key=api_key, name="rpm"),
            TokenBucket(
                f"{limits.input_tokens}/minute", key=api_key, name="itpm", counts="input_tokens"
            ),
            TokenBucket(
                f"{limits.output_tokens}/minute",
                key=api_key,
                name="otpm",
                counts="output_tokens",
            ),
            TokenBucket(
                f"{limits.fleet_tokens}/minute",
                key=keys.GLOBAL,
                name="fleet-tpm",
                counts={"input_tokens": 1, "output_tokens": 1},
            ),
        ],
    )


@dataclass
class Record:
    """One admitted request's account: what it reserved, what it used, how it ended."""

    key: str
    reserved_input: int
    reserved_output: int
    used_input: int = 0
    used_output: int = 0
    #: "stop" (the reply ended), "length" (max_tokens reached), "disconnected", "error".
    ended: str = "running"
    #: Whether the store took the settlement (None: nothing to settle, no limiter).
    settled: bool | None = None


@dataclass
class Completion:
    """A reply being generated: the counts the endpoint settles, whatever happens."""

    record: Record
    decision: Decision | None
    messages: list[Mapping[str, Any]]
    length: int
    max_tokens: int
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def finish_reason(self) -> str:
        return "length" if self.length >= self.max_tokens else "stop"

    async def settle(self, ended: str) -> None:
        """Report what the model used to the limiter, once; shielded from cancellation
        (a client that hangs up cancels the stream, and its tokens must still count)."""
        record = self.record
        if record.ended == "running":
            record.ended = ended
        if record.settled is not None or self.decision is None:
            return
        actual = {"input_tokens": record.used_input, "output_tokens": record.used_output}
        with anyio.CancelScope(shield=True):
            record.settled = await self.decision.settle(actual)
        if not record.settled:
            logger.warning("settling %s failed; its reservation stands", self.id)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def _parse(body: object) -> tuple[list[Mapping[str, Any]], int, bool, bool] | str:
    """`(messages, max_tokens, stream, include_usage)` from a chat body, or what is wrong."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages)
    ):
        return "messages: a non-empty list of {role, content} objects"
    max_tokens = max_tokens_of(body)
    if max_tokens is None:
        return f"max_tokens: an integer from 1 to {MAX_OUTPUT_TOKENS}"
    options = body.get("stream_options")
    include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
    return messages, max_tokens, body.get("stream") is True, include_usage


class ChatCompletions:
    """The endpoint, as a plain ASGI app: its `try`/`finally` wraps the whole stream, so
    whatever ends it (the last token, a client hanging up, a cancelled task) settles."""

    def __init__(self, tokens_per_second: float, reply_tokens: ReplyLength) -> None:
        self.interval = 1.0 / tokens_per_second
        self.reply_tokens = reply_tokens
        #: The latest admitted requests' accounts, in arrival order (the demo reads them).
        self.ledger: deque[Record] = deque(maxlen=LEDGER_SIZE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        decision: Decision | None = getattr(request.state, "ratelimit", None)
        key = bearer(scope)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ClientDisconnect):
            body = None
        reserved = estimate(scope, body) if isinstance(body, dict) else None
        record = Record(
            key or "",
            reserved["input_tokens"] if reserved else 0,
            reserved["output_tokens"] if reserved else 0,
        )
        parsed = _parse(body) if key is not None else "send your API key: Authorization: Bearer"
        if isinstance(parsed, str):
            # Nothing was generated: the request counts, its tokens are given back.
            completion = Completion(record, decision, [], 0, 1)
            await completion.settle("error")
            if key is None:
                status, kind = 401, "authentication_error"
            else:
                status, kind = 400, "invalid_request_error"
            await _error(status, parsed, kind)(scope, receive, send)
            return
        messages, max_tokens, stream, include_usage = parsed
        length = min(max(1, self.reply_tokens(messages)), max_tokens)
        completion = Completion(record, decision, messages, length, max_tokens)
        record.used_input = count_prompt_tokens(messages)
        self.ledger.append(record)
        try:
            response: Response
            if stream:
                response = StreamingResponse(
                    self._events(completion, include_usage), media_type="text/event-stream"
                )
            else:
                async for _ in self._generate(completion):
                    pass
                await completion.settle(completion.finish_reason)
                response = JSONResponse(_whole(completion))
            await response(scope, receive, send)
        except ClientDisconnect:
            pass  # an ASGI 2.4 server's word for a client that hung up mid-stream
        finally:
            # Still unsettled: the stream stopped before its end (the client hung up, the
            # task was cancelled, the server failed). Charge what was generated.
            await completion.settle("disconnected")

    async def _generate(self, completion: Completion) -> AsyncIterator[str]:
        """The reply's tokens at the model's pace, each counted as it is made."""
        record = completion.record
        loop = asyncio.get_running_loop()
        await asyncio.sleep(record.used_input / PREFILL_PER_SECOND)
        start = loop.time()
        for i, token in enumerate(reply(completion.messages, completion.length)):
            delay = start + (i + 1) * self.interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            record.used_output += 1
            yield token

    async def _events(self, completion: Completion, include_usage: bool) -> AsyncIterator[bytes]:
        """The server-sent events of a streamed reply, settling before its last chunk: a
        client that has read `usage` finds the limiter already charged exactly that."""
        yield _event(_chunk(completion, {"role": "assistant", "content": ""}))
        async for token in self._generate(completion):
            yield _event(_chunk(completion, {"content": token}))
        await completion.settle(completion.finish_reason)
        yield _event(_chunk(completion, {}, completion.finish_reason))
        if include_usage:
            yield _event({**_chunk(completion, {}), "choices": [], "usage": _usage(completion)})
        yield b"data: [DONE]\n\n"


def _event(data: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _chunk(
    completion: Completion, delta: Mapping[str, str], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": completion.id,
        "object": "chat.completion.chunk",
        "created": completion.created,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _usage(completion: Completion) -> dict[str, int]:
    used_in, used_out = completion.record.used_input, completion.record.used_output
    return {
        "prompt_tokens": used_in,
        "completion_tokens": used_out,
        "total_tokens": used_in + used_out,
    }


def _whole(completion: Completion) -> dict[str, Any]:
    text = "".join(reply(completion.messages, completion.length))
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": _usage(completion),
    }


async def _models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


def create_app(
    *,
    limits: Limits = Limits(),
    backend: Backend | None = None,
    tokens_per_second: float = TOKENS_PER_SECOND,
    reply_tokens: ReplyLength = reply_length,
    protect: bool = True,
) -> Starlette:
    """The API behind the rate limiter (unless `protect` is false), on `backend` (default:
    in process; a `RedisBackend` shares the limits across workers and hosts).

    `reply_tokens(messages)` is how long the model would answer (tests fix it).
    The endpoint's ledger of admitted requests is `app.state.completions.ledger`.
    """
    if not tokens_per_second > 0:
        raise ValueError(f"tokens_per_second must be > 0, not {tokens_per_second!r}")
    completions = ChatCompletions(tokens_per_second, reply_tokens)
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", _models, methods=["GET"]),
        ]
    )
    app.state.completions = completions
    if protect:
        app.add_middleware(
            RateLimitMiddleware,
            rules=[rule(limits)],
            backend=backend,
            # The openai SDK reads OpenAI's header names and error body.
            dialect="openai",
            refusal_body="openai",
        )
    return app
