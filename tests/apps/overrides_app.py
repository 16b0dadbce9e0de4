"""An app for the fleet tests of live overrides: run by `uvicorn --factory --workers 2`.

Configured by environment variables: `OVERRIDES_APP_REDIS_URL` (required) and
`OVERRIDES_APP_PREFIX` (the RedisBackend's key prefix). Every response carries
the answering worker's pid in `x-pid` (added outside the middleware), so a test
can tell which worker enforced what.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ratelimit import Concurrency, RateLimitMiddleware, RedisBackend, Rule, TokenBucket, keys
from ratelimit._types import ASGIApp, Message, Receive, Scope, Send

PID = str(os.getpid()).encode()


def rules() -> list[Rule]:
    """The app's rules (the tests check overrides against the same ones)."""
    return [
        Rule(
            "/work",
            limits=[
                TokenBucket("1000/hour", key=keys.header("x-api-key"), name="per-key"),
                Concurrency(100, name="slots"),
            ],
            name="fleet",
        ),
        # Requests without x-api-key are exempt: they reach no store, so a probe can
        # poll as fast as it likes and only a block (or a new policy) changes its answer.
        Rule(
            "/probe", limits=[TokenBucket("10/second", key=keys.header("x-api-key"))], name="probe"
        ),
    ]


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app() -> ASGIApp:
    """The app with the middleware on the Redis of the environment, and the pid wrapper."""
    backend = RedisBackend(
        os.environ["OVERRIDES_APP_REDIS_URL"],
        prefix=os.environ.get("OVERRIDES_APP_PREFIX", "ratelimit"),
    )
    inner = Starlette(routes=[Route("/work", ok), Route("/probe", ok)])
    limited = RateLimitMiddleware(inner, rules=rules(), backend=backend)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-pid", PID)]
                message = {**message, "headers": headers}
            await send(message)

        await limited(scope, receive, send_pid)

    return app
