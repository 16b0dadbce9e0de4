"""`RateLimitMiddleware`: a pure ASGI middleware in front of an app.

Configuration is validated and precomputed in `__init__`. Per request: match
a rule (no rule: hand the request straight to the app), decide, then either
send a refusal or run the app with the rate-limit header fields added to its
response. A concurrency grant is released exactly once: when the last body
message goes out, when the client disconnects, or in a `finally` when the app
fails or the task is cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any

from .._errors import CallableError, ConfigError
from .._types import ASGIApp, Message, Receive, Scope, Send
from ..backends.base import Backend
from ..core.decision import ABANDONED, BlockedDecision, Decision, FailedDecision, Grant
from ..core.engine import Engine
from ..core.limiter import Limiter, build_backend
from ..core.metrics import DEFAULT_METRICS, DefaultMetrics
from ..core.observer import Observer
from ..policy.config import ConfigSource, Settings, load_config
from ..policy.rules import FailPolicy, Rule
from ..policy.top import TopCallers
from . import openai_style, responses
from .inbox import BodyTooLarge, Inbox
from .redirects import REDIRECTS, refund_if_slash_redirect
from .routes import routes_of
from .unrated import UNRATABLE, too_large

logger = logging.getLogger("ratelimit")

#: A refusal renderer: returns an ASGI app (e.g. a Starlette `Response`) to send.
RefuseHook = Callable[[Scope, Decision], "ASGIApp | Awaitable[ASGIApp]"]

#: Refusal bodies by `refusal_body=` name: (content type, render(decision, wait),
#: the body of a `fail="closed"` refusal).
_BODIES: dict[str, tuple[bytes, Callable[[Decision, float], bytes], Callable[[], bytes]]] = {
    "problem": (
        b"application/problem+json",
        responses.problem_body,
        responses.failed_closed_problem,
    ),
    "openai": (b"application/json", openai_style.error_body, openai_style.failed_closed_body),
}
#: Header dialects by `dialect=` name: compiles a rule's extra fields (None: none).
_DIALECTS: dict[str, Callable[[Rule], Callable[..., responses.Headers] | None]] = {
    "openai": openai_style.compile_fields,
}



class RateLimitMiddleware:
    """Apply a `Limiter`'s rules to requests; refuse with 429/503 and honest header fields.

    `RateLimitMiddleware(app, limiter=limiter)` is the ASGI face of `limiter`
    (shared with code outside HTTP: one pool, one set of overrides). Without
    `limiter=`, the keyword arguments build one: `rules`, `backend` (default
    `MemoryBackend()`), `fail`, `local_share`, `shadow`, `config`, `metrics`
    and `top` mean what they mean for `Limiter`. `on_refuse(scope, decision)`
    may return an ASGI app to render refusals your way; `Retry-After` and the
    `RateLimit` fields are added to it unless it sets them. `headers=False`
    leaves admitted responses without the fields.

    Refusals carry `Retry-After`, `retry-after-ms` and `x-should-retry` (false
    when the wait is over `should_retry_within` seconds, default 60, or the
    request can never be admitted), as the openai and anthropic SDKs read them.
    `refusal_body="openai"` sends `{"error": {"message", "type", "code"}}`
    instead of problem+json, so the openai SDK shows the limiter's message;
    `dialect="openai"` adds OpenAI's `x-ratelimit-*` fields (see
    `asgi.openai_style`). See docs/guides/clients.md.

    Live overrides are `overrides` (the limiter's), started at ASGI lifespan
    start-up, or on the first request without one, and stopped at shutdown
    when the middleware built the limiter (a limiter given is the giver's).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: Limiter | None = None,
        rules: Sequence[Rule] = (),
        backend: Backend | None = None,
        on_refuse: RefuseHook | None = None,
        fail: FailPolicy | None = None,
        headers: bool | None = None,
        metrics: Observer | DefaultMetrics | None = DEFAULT_METRICS,
        local_share: float | None = None,
        config: ConfigSource | Settings | None = None,
        shadow: bool | None = None,
        top: TopCallers | None = None,
        refusal_body: str = "problem",
        dialect: str | None = None,
        should_retry_within: float = responses.SHOULD_RETRY_WITHIN,
    ) -> None:
        self.app = app
        if refusal_body not in _BODIES:
            raise ConfigError("refusal_body", f"one of {sorted(_BODIES)}", refusal_body)
        if dialect is not None and dialect not in _DIALECTS:
            raise ConfigError("dialect", f"None or one of {sorted(_DIALECTS)}", dialect)
        if (
            not isinstance(should_retry_within, (int, float))
            or isinstance(should_retry_within, bool)
            or not should_retry_within >= 0
        ):
            raise ConfigError(
                "should_retry_within", "a number of seconds >= 0", should_retry_within
            )
        if limiter is not None:
            if not isinstance(limiter, Limiter):
                raise ConfigError("limiter", "a ratelimit Limiter", limiter)
            given = {
                "rules": rules != (),
                "backend": backend is not None,
                "fail": fail is not None,
                "metrics": metrics is not DEFAULT_METRICS,
                "local_share": local_share is not None,
                "config": config is not None,
                "shadow": shadow is not None,
                "top": top is not None,
            }
            for name, was_given in given.items():
                if was_given:
                    raise ConfigError(
                        name, f"no {name}= beside limiter= (give it to the Limiter)", ...
                    )
            self._owned = False
        else:
            if _in_litestar_route(app):
                raise ConfigError(
                    "limiter",
                    "one Limiter for the app: Litestar builds this middleware once per route "
                    "handler, each would count alone; use plugins=[RateLimitPlugin(limiter)] "
                    "(ratelimit.litestar) or DefineMiddleware(RateLimitMiddleware, "
                    "limiter=limiter)",
                )
            if config is not None and not isinstance(config, Settings):
                config = load_config(config)
            limiter = Limiter(
                rules,
                backend=backend,
                fail=fail,
                local_share=1.0 if local_share is None else local_share,
                shadow=False if shadow is None else shadow,
                config=config,
                metrics=metrics,
                top=top,
            )
            self._owned = True
        if headers is None and limiter.settings is not None:
            headers = limiter.settings.headers
        if on_refuse is not None and not callable(on_refuse):
            raise ConfigError("on_refuse", "a callable (scope, decision) -> ASGI app", on_refuse)
        #: The core this middleware is the face of.
        self.limiter = limiter
        self.engine = limiter.engine
        self.backend = limiter.backend
        self.metrics = limiter.metrics
        #: Live overrides: the limiter's own object.
        self.overrides = limiter.overrides
        self.on_refuse = on_refuse
        self.headers = True if headers is None else bool(headers)
        #: Seconds past which a refusal says `x-should-retry: false`.
        self.should_retry_within = float(should_retry_within)
        content_type, self._body, failed_body = _BODIES[refusal_body]
        self._content_type = (b"content-type", content_type)
        self._failed_closed = responses.failed_closed_reply(
            self.should_retry_within, content_type, failed_body()
        )
        self._dialect: responses.Dialect | None = (
            None if dialect is None else (dialect, _DIALECTS[dialect])
        )
        #: Per rule name: what `_compile` made of it. Keyed by name, one entry each, so
        #: rules replaced later cannot pile up.
        self._fields: dict[str, responses.Compiled] = {}
        for r in self.engine.rules:
            self._compile(r)
        #: True once `start` ran: the limiter started, the app's routes read.
        self._ready = False
        #: Whether an exempt route serves a request (None: no route is exempt).
        self._exempt: Callable[[Scope], bool] | None = None

    @classmethod
    def from_config(
        cls, source: ConfigSource, **kwargs: Any
    ) -> Callable[[ASGIApp], RateLimitMiddleware]:
        """Read a TOML file (or dict) now, failing fast; return a factory for `add_middleware`.

        `app.add_middleware(RateLimitMiddleware.from_config("ratelimit.toml"))`
        or, for a raw ASGI app, `RateLimitMiddleware.from_config(path)(app)`.
        Keyword arguments are passed on (e.g. `backend=` to override the file's).
        """
        settings = load_config(source)
        if kwargs.get("backend") is None:
            kwargs["backend"] = build_backend(settings.backend)
        return partial(cls, config=settings, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                receive = self._lifespan_receive(receive)
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        if not self._ready:
            await self.start()
        engine = self.engine
        rule = engine.match(scope)
        if (
            rule is None
            or (scope.get("method") == "OPTIONS" and _preflight(scope))
            or (self._exempt is not None and self._exempt(scope))
        ):
            await self.app(scope, receive, send)
            return
        inbox = None
        if engine.plan(rule).queued or rule.reads_body:
            # The request may wait in line (watch for the client leaving meanwhile) or
            # its cost or keys read the body: one reader, replaying to the app.
            inbox = Inbox(receive)
            receive = inbox.receive
        try:
            if inbox is not None and rule.reads_body:
                await inbox.read_json(rule, scope)
            engine, decision = await limiter.decide(
                rule, scope, inbox.until_gone if inbox is not None else None
            )
        except CallableError as exc:
            await self._unrated(rule, exc, scope, receive, send)
            return
        # The request's grant, for the app to settle its actual cost (`request.state`).
        state = scope.get("state")
        if state is None:
            scope["state"] = {"ratelimit": decision}
        else:
            state["ratelimit"] = decision
        if decision.__class__ is FailedDecision:
            if decision.allowed:
                await self.app(scope, receive, send)
            else:
                await _send_plain(scope, receive, send, 503, *self._failed_closed)
            return
        if not decision.allowed and decision.reason == ABANDONED:
            return  # the client left while waiting: nobody to answer
        if not decision.allowed and (
            not decision.rule.shadow or decision.__class__ is BlockedDecision
        ):
            await self._refuse(decision, scope, receive, send)
            return
        # A refusal in shadow mode (a block is always enforced) goes on to the app, counted
        # as a would-be refusal, holding nothing (a refusal consumed nothing), with the
        # header fields it would have had.
        fields: tuple[tuple[bytes, bytes], ...] = ()
        if self.headers:
            compiled = self._fields.get(rule.name)
            if compiled is None or compiled[0] is not rule or compiled[2].stale_at:
                compiled = self._compile(rule)
            fields = responses.admitted_fields(compiled, decision.results)
        grant = decision.grant
        if grant is None:
            # Taken units come back if the app only redirects to the path with its
            # trailing slash added or removed (see `redirects`): watch for it.
            if fields or decision.checks:
                send = _Reply(receive, send, fields, engine, scope, decision, None).send
            await self.app(scope, receive, send)
            return
        reply = _Reply(receive, send, fields, engine, scope, decision, grant)
        try:
            await self.app(scope, reply.receive, reply.send)
        finally:
            # Error, cancellation or an app that never finished its body: don't
            # await here (a cancelled scope would cancel the await too). The test
            # repeats release_soon's first line: usually the body's end released it.
            if not grant.released:
                engine.release_soon(grant)

    def _compile(self, rule: Rule) -> responses.Compiled:
        """The header fields of `rule`, compiled once per plan (see `responses.compiled`)."""
        plan = self.engine.plan(rule)
        compiled = self._fields[rule.name] = responses.compiled(plan, rule, self._dialect)
        return compiled

    # -- lifespan ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the limiter's live overrides (see `Limiter.start`) and read the app's
        routes (see `routes`); later calls return at once."""
        await self.limiter.start()
        if self._ready:
            return
        self._ready = True
        try:
            found = routes_of(self.app, self.engine.rules)
        except Exception:  # an app's routes we cannot read must not stop it serving
            logger.exception("ratelimit: could not read the app's routes")
            found = None
        if found is not None and found.any_exempt:
            self._exempt = found.exempt

    def _lifespan_receive(self, receive: Receive) -> Receive:
        """Wrap a lifespan `receive`: start the limiter at start-up; at shutdown stop the
        overrides of a limiter this middleware built.

        The app's own lifespan runs as before: it receives every message.
        """

        async def lifespan_receive() -> Message:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                await self.start()
            elif kind == "lifespan.shutdown" and self._owned:
                await self.limiter.stop()
            return message

        return lifespan_receive

    async def _unrated(
        self, rule: Rule, exc: CallableError, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A user callable failed for this request, or its body could not be read as
        JSON: 400 (a body longer than the rule reads: 413), whatever the `fail` policy.

        Nothing was consumed (the engine asks every callable before the store)
        and the store is not at fault: no breaker, no fallback, no fail-open.
        A rule in shadow mode lets the request through, as its refusals.
        """
        self.limiter.unratable(rule, exc)
        if rule.shadow:
            await self.app(scope, receive, send)
            return
        if isinstance(exc, BodyTooLarge):
            await _send_plain(scope, receive, send, *too_large(rule.body_limit))
            return
        await _send_plain(scope, receive, send, *UNRATABLE)

    async def _refuse(self, decision: Decision, scope: Scope, receive: Receive, send: Send) -> None:
        rule = decision.rule
        compiled = self._fields.get(rule.name)
        if compiled is None or compiled[0] is not rule or compiled[2].stale_at:
            compiled = self._compile(rule)
        wait = responses.told(decision, compiled[2])
        headers = responses.refusal_headers(
            decision, compiled[1][1], compiled[2], self.should_retry_within, wait
        )
        if compiled[3] is not None:
            headers.extend(compiled[3](decision.results))
        if self.on_refuse is not None:
            result = self.on_refuse(scope, decision)
            app = await result if isinstance(result, Awaitable) else result
            send = _Reply(receive, send, headers, self.engine, scope, None, None, True).send
            await app(scope, receive, send)
            return
        body = self._body(decision, wait)
        headers.append(self._content_type)
        await _send_plain(scope, receive, send, decision.status, headers, body)

    async def aclose(self) -> None:
        """Close the limiter: stop overrides and lease renewal, close the backend."""
        await self.limiter.aclose()


class _Reply:
    """The one wrapper of what an app sends through the middleware: its bound
    `send` (and, for a request holding leases, `receive`) wrap the server's.

    `send` adds `fields` to the response start (`only_missing`: those the app
    did not set) and refunds an admitted `decision` if that start is a
    trailing-slash redirect (see `redirects`). With a `grant`, it is released
    when the last body message (or the websocket's close) goes out, or when
    `receive` reads the client's disconnect. A small object rather than
    closures: with this many fields it is cheaper to build per request.
    """

    __slots__ = ("_receive", "_send", "decision", "engine", "fields", "grant", "only", "scope")

    def __init__(
        self,
        receive: Receive,
        send: Send,
        fields: Sequence[tuple[bytes, bytes]],
        engine: Engine,
        scope: Scope,
        decision: Decision | None,
        grant: Grant | None,
        only_missing: bool = False,
    ) -> None:
        self._receive = receive
        self._send = send
        self.fields = fields
        self.engine = engine
        self.scope = scope
        self.decision = decision
        self.grant = grant
        self.only = only_missing

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            decision = self.decision
            if message.get("status") in REDIRECTS and decision is not None and decision.checks:
                await refund_if_slash_redirect(self.engine, decision, self.scope, message)
            fields = self.fields
            if fields:
                # A new dict and list: the app's message is not ours to change (an app may
                # send the same dict twice). Copy, then set: cheaper than {**m, key: v}.
                start = {**message}
                if self.only:
                    start["headers"] = _missing_added(message.get("headers", ()), fields)
                else:
                    start["headers"] = [*message.get("headers", ()), *fields]
                message = start
            await self._send(message)
            return
        await self._send(message)
        grant = self.grant
        # The response is over: release, at once where the backend answers without waiting.
        if (
            grant is not None
            and (
                (message["type"] == "http.response.body" and not message.get("more_body", False))
                or message["type"] == "websocket.close"
            )
            and not grant.released
            and not self.engine.release_nowait(grant)
        ):
            await self.engine.release(grant)

    async def receive(self) -> Message:
        message = await self._receive()
        grant = self.grant
        if (
            grant is not None
            and message["type"] in ("http.disconnect", "websocket.disconnect")
            and not grant.released
            and not self.engine.release_nowait(grant)
        ):
            await self.engine.release(grant)
        return message


def _in_litestar_route(app: object) -> bool:
    """Whether `app` is a piece of a Litestar route's own middleware stack (not a Litestar app).

    Read from module names, so this module needs no Litestar import.
    """
    classes = type(app).__mro__
    if any(c.__module__ == "litestar.app" for c in classes):
        return False  # the whole app: one middleware in front of it, lifespan included
    modules = (getattr(app, "__module__", None), *(c.__module__ for c in classes))
    return any(isinstance(m, str) and m.partition(".")[0] == "litestar" for m in modules)


def _preflight(scope: Scope) -> bool:
    """Whether an OPTIONS request is a CORS preflight: it spends no quota."""
    return any(name == b"access-control-request-method" for name, _ in scope["headers"])


def _missing_added(
    headers: Iterable[tuple[bytes, bytes]], fields: Sequence[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """`headers` and those of `fields` whose names they lack (names compared in lower case)."""
    listed = list(headers)
    present = {k.lower() for k, _ in listed}
    return [*listed, *(h for h in fields if h[0] not in present)]




async def _send_plain(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    headers: responses.Headers,
    body: bytes = b"",
) -> None:
    """Send a refusal over HTTP, or deny a websocket handshake."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    if scope["type"] == "websocket":
        message = await receive()
        if message["type"] != "websocket.connect":
            return  # the client is already gone
        if "websocket.http.response" in (scope.get("extensions") or {}):
            start = {"type": "websocket.http.response.start", "status": status, "headers": headers}
            await send(start)
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            # No denial response extension: close with 1008 "policy violation".
            await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
