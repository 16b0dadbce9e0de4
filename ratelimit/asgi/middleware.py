"""`RateLimitMiddleware`: a pure ASGI middleware in front of an app.

Configuration is validated and precomputed in `__init__`. Per request: match
a rule (no rule: hand the request straight to the app), decide, then either
send a refusal or run the app with the rate-limit header fields added to its
response. A concurrency grant is released exactly once: when the last body
message goes out, when the client disconnects, or in a `finally` when the app
fails or the task is cancelled.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from time import perf_counter
from typing import Any

from .._errors import CallableError, ConfigError
from .._types import ASGIApp, Message, Receive, Scope, Send
from ..backends.base import Backend
from ..backends.memory import MemoryBackend
from ..backends.stores import override_store, top_store
from ..policy.config import ConfigSource, Settings, load_config
from ..policy.engine import ABANDONED, BlockedDecision, Decision, Engine, Grant
from ..policy.live import LiveOverrides
from ..policy.overlap import shadowed
from ..policy.overrides import Resolution
from ..policy.rules import FAIL_POLICIES, FailPolicy, Rule
from ..policy.top import TopCallers, publisher_for
from . import responses
from .metrics import Metrics
from .redirects import REDIRECTS, refund_if_slash_redirect
from .unrated import UNRATABLE, CallableErrorLog
from .workers import other_workers

logger = logging.getLogger("ratelimit")

#: A refusal renderer: returns an ASGI app (e.g. a Starlette `Response`) to send.
RefuseHook = Callable[[Scope, Decision], "ASGIApp | Awaitable[ASGIApp]"]


class RateLimitMiddleware:
    """Apply `rules` to requests; refuse with 429/503 and honest header fields.

    `backend` defaults to a `MemoryBackend`. `on_refuse(scope, decision)` may
    return an ASGI app to render refusals your way; `Retry-After` and the
    `RateLimit` fields are added to it unless it sets them. `fail` is what
    rules without their own `fail=` do when the backend errors: `"open"`
    (admit), `"closed"` (503) or `"local"` (decide in this process, each
    limit multiplied by `local_share`: set it to 1 / the number of workers).

    `shadow=True` puts every rule in shadow mode: decisions are made and
    counted, would-be refusals reach the app (see `Rule(shadow=)`). Live
    overrides are `overrides` (a `LiveOverrides` on the backend's store),
    started at ASGI lifespan start-up, or on the first request without one.
    With `top=` (a `TopCallers`) and a Redis backend, the heaviest callers
    are published for `ratelimit top` the same way (`top_publisher`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: Sequence[Rule] = (),
        backend: Backend | None = None,
        on_refuse: RefuseHook | None = None,
        fail: FailPolicy | None = None,
        headers: bool | None = None,
        metrics: Metrics | None = None,
        local_share: float = 1.0,
        config: ConfigSource | Settings | None = None,
        shadow: bool = False,
        top: TopCallers | None = None,
    ) -> None:
        self.app = app
        if config is not None:
            settings = config if isinstance(config, Settings) else load_config(config)
            rules = [*settings.rules, *rules]
            if backend is None:
                backend = _build_backend(settings.backend)
            fail = fail or settings.fail
            headers = settings.headers if headers is None else headers
        fail = fail or "open"
        if backend is None:
            backend = MemoryBackend()
        elif not isinstance(backend, Backend):
            raise ConfigError(
                "backend", "a Backend such as MemoryBackend() or RedisBackend(url)", backend
            )
        if fail not in FAIL_POLICIES:
            raise ConfigError("fail", '"open", "closed" or "local"', fail)
        if on_refuse is not None and not callable(on_refuse):
            raise ConfigError("on_refuse", "a callable (scope, decision) -> ASGI app", on_refuse)
        if not isinstance(shadow, bool):
            raise ConfigError("shadow", "true or false", shadow)
        if shadow:
            rules = [_in_shadow(r) for r in rules]
        self.shadow = shadow
        self.engine = Engine(rules, backend)
        for later, earlier in shadowed(self.engine.rules):
            logger.warning(
                "ratelimit: rule %r (%s) never applies: the earlier rule %r (%s) matches every "
                "request it would (the first matching rule wins; put the narrower rule first)",
                later.name,
                _describe(later),
                earlier.name,
                _describe(earlier),
            )
        self.backend = backend
        self.fail = fail
        self.on_refuse = on_refuse
        self.headers = True if headers is None else bool(headers)
        self._policy = {r.name: responses.policy_header(r) for r in self.engine.rules}
        #: Per rule name: the rule compiled for, its policy field, its compiled `RateLimit`
        #: field. Keyed by name, one entry each, so rules replaced later cannot pile up.
        self._fields: dict[str, tuple[Rule, tuple[bytes, bytes], responses.RateLimitField]] = {}
        for r in self.engine.rules:
            self._compile(r)
        self._failing = False
        if (
            not isinstance(local_share, (int, float))
            or isinstance(local_share, bool)
            or not 0 < local_share <= 1
        ):
            raise ConfigError("local_share", "a fraction in (0, 1], e.g. 1 / workers", local_share)
        self.local_share = float(local_share)
        self._local: Engine | None = None
        if metrics is not None and not isinstance(metrics, Metrics):
            raise ConfigError("metrics", "a ratelimit Metrics object", metrics)
        self.metrics = metrics
        if metrics is not None:
            metrics.attach(self.engine)
        #: Live overrides of the rules, in the backend's store (Redis: the fleet's).
        store = override_store(backend)
        self.overrides = LiveOverrides(self.engine.rules, store, self._apply_overrides)
        if top is not None and not isinstance(top, TopCallers):
            raise ConfigError("top", "a TopCallers", top)
        #: Publishes `top`'s windows to Redis for `ratelimit top` (None: nothing to publish).
        self.top_publisher = (
            None
            if top is None
            else publisher_for(top, top_store(backend), worker=self.overrides.worker)
        )
        #: True until the overrides are started (lifespan start-up or first request).
        self._unstarted = True
        #: Logs failing key/cost/priority functions, each at most once per 10 s.
        self.callable_errors = CallableErrorLog(logger)

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
            kwargs["backend"] = _build_backend(settings.backend)
        return partial(cls, config=settings, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                receive = self._lifespan_receive(receive)
            await self.app(scope, receive, send)
            return
        if self._unstarted:
            await self.start()
        engine = self.engine
        rule = engine.match(scope)
        if rule is None:
            await self.app(scope, receive, send)
            return
        metrics = self.metrics
        started = perf_counter() if metrics is not None else 0.0
        inbox = None
        if engine.plan(rule).queued:
            # The request may wait in line: watch for the client leaving meanwhile.
            inbox = _Inbox(receive)
            receive = inbox.receive
        try:
            decision = await engine.decide(
                rule, scope, inbox.until_gone if inbox is not None else None
            )
        except CallableError as exc:
            await self._unrated(rule, exc, scope, receive, send)
            return
        except Exception as exc:
            fail = rule.fail or self.fail
            self._note_failure(rule, fail, exc)
            if fail == "open":
                await self.app(scope, receive, send)
                return
            if fail == "closed":
                await _send_plain(scope, receive, send, 503, *_FAILED_CLOSED)
                return
            engine = self._local_engine()
            try:
                decision = await engine.decide(
                    rule, scope, inbox.until_gone if inbox is not None else None
                )
            except CallableError as exc:  # it failed this time only (it asked no store)
                await self._unrated(rule, exc, scope, receive, send)
                return
            except Exception:
                # Not the store then (e.g. a key function that raises): the limiter
                # still must not turn it into a 500, so this request is admitted.
                logger.exception("ratelimit: the in-process fallback failed too; admitting")
                await self.app(scope, receive, send)
                return
        else:
            if self._failing:
                self._failing = False
                logger.warning("ratelimit backend answers again")
        if metrics is not None:
            metrics.observe_decision(decision, perf_counter() - started)
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
            if compiled is None or compiled[0] is not rule:
                compiled = self._compile(rule)
            _, policy, field = compiled
            fields = (policy, (b"ratelimit", field.render(decision.results)))
        grant = decision.grant
        if grant is None:
            # Taken units come back if the app only redirects to the path with its
            # trailing slash added or removed (see `redirects`): watch for it.
            if fields or decision.checks:
                send = _adding(send, fields, engine, decision, scope)
            await self.app(scope, receive, send)
            return
        holder = _Holder(engine, grant, receive, send, fields, decision, scope)
        try:
            await self.app(scope, holder.receive, holder.send)
        finally:
            # Error, cancellation or an app that never finished its body: don't
            # await here (a cancelled scope would cancel the await too). The test
            # repeats release_soon's first line: usually the body's end released it.
            if not grant.released:
                engine.release_soon(grant)

    def _compile(self, rule: Rule) -> tuple[Rule, tuple[bytes, bytes], responses.RateLimitField]:
        """The header fields of `rule`, compiled (also for the `local` engine's scaled copies).

        The policy comes from the configured rule of that name, as the client
        was told; the `RateLimit` field from the rule that decided.
        """
        compiled = (
            rule,
            (b"ratelimit-policy", self._policy[rule.name]),
            responses.RateLimitField(rule),
        )
        self._fields[rule.name] = compiled
        return compiled

    # -- live overrides ---------------------------------------------------------

    async def start(self) -> None:
        """Start the live overrides: read the store, then follow it (shared stores).

        Called on lifespan start-up, or by the first request if the server
        sends no lifespan events; later calls return at once. A store that
        cannot be read does not stop the app: it serves on its configuration
        while the watcher keeps trying.
        """
        if not self._unstarted:
            return
        self._unstarted = False
        if isinstance(self.backend, MemoryBackend):
            # Later, not now: a server may still be starting the other workers.
            asyncio.get_running_loop().call_later(_WORKERS_CHECK_DELAY, _warn_if_workers)
        try:
            await self.overrides.start()
        except Exception:
            logger.exception("ratelimit: could not start live overrides; serving as configured")
        if self.top_publisher is not None:
            await self.top_publisher.start()

    def _apply_overrides(self, resolution: Resolution) -> None:
        """Enforce the effective rules of `resolution`: swap plans, headers, fallback, gauges.

        The policy field of a changed rule describes its effective limits; the
        `fail="local"` fallback follows the same overrides, scaled.
        """
        changed = set(self.engine.apply_overrides(resolution))
        for e in resolution.rules:
            if e.rule.name in changed:
                self._policy[e.rule.name] = responses.policy_header(e.rule)
                self._compile(e.rule)
        if self._local is not None:
            share = self.local_share
            local = self._local
            blocks = self.engine.blocks()
            current = {r.name: r for r in local.rules}
            local.swap_rules(
                [
                    r.scaled(share) if r.name in changed else current[r.name]
                    for r in self.engine.rules
                ],
                blocks,
            )
        if self.metrics is not None:
            self.metrics.publish_limits(self.engine)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        """Wrap a lifespan `receive`: start the overrides at start-up, stop them at shutdown.

        The app's own lifespan runs as before: it receives every message.
        """

        async def lifespan_receive() -> Message:
            message = await receive()
            kind = message["type"]
            if kind == "lifespan.startup":
                await self.start()
            elif kind == "lifespan.shutdown":
                await self._stop_overrides()
            return message

        return lifespan_receive

    async def _stop_overrides(self) -> None:
        try:
            await self.overrides.aclose()
        except Exception:
            logger.exception("ratelimit: could not stop live overrides cleanly")
        if self.top_publisher is not None:
            await self.top_publisher.aclose()

    def _note_failure(self, rule: Rule, policy: str, exc: Exception) -> None:
        """Count every failure; log only the change from answering to failing."""
        if self.metrics is not None:
            self.metrics.observe_failure(rule, policy, exc)
        if not self._failing:
            self._failing = True
            logger.error("ratelimit backend failed (%r); failing %s until it answers", exc, policy)

    async def _unrated(
        self, rule: Rule, exc: CallableError, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A user callable failed for this request: 400, whatever the `fail` policy.

        Nothing was consumed (the engine asks every callable before the store)
        and the store is not at fault: no breaker, no fallback, no fail-open.
        A rule in shadow mode lets the request through, as its refusals.
        """
        self.callable_errors.report(exc, shadow=rule.shadow)
        if self.metrics is not None:
            self.metrics.observe_invalid(rule, exc.limit)
        if rule.shadow:
            await self.app(scope, receive, send)
            return
        await _send_plain(scope, receive, send, *UNRATABLE)

    def _local_engine(self) -> Engine:
        """The in-process fallback for `fail="local"`: every limit times `local_share`."""
        if self._local is None:
            rules = [rule.scaled(self.local_share) for rule in self.engine.rules]
            local = Engine(rules, MemoryBackend())
            local.swap_rules(local.rules, self.engine.blocks())
            self._local = local
        return self._local

    async def _refuse(self, decision: Decision, scope: Scope, receive: Receive, send: Send) -> None:
        rule = decision.rule
        compiled = self._fields.get(rule.name)
        if compiled is None or compiled[0] is not rule:
            compiled = self._compile(rule)
        field = compiled[2]
        headers = responses.refusal_headers(decision, self._policy[rule.name], field)
        if self.on_refuse is not None:
            result = self.on_refuse(scope, decision)
            app = await result if isinstance(result, Awaitable) else result
            await app(scope, receive, _with_headers(send, headers, only_missing=True))
            return
        body = responses.problem_body(decision)
        headers.append((b"content-type", b"application/problem+json"))
        await _send_plain(scope, receive, send, decision.status, headers, body)

    async def aclose(self) -> None:
        """Stop background work (overrides, lease renewal) and close the backend."""
        await self._stop_overrides()
        await self.engine.aclose()
        await self.backend.aclose()


#: Seconds after start-up to look for sibling workers (see `_warn_if_workers`).
_WORKERS_CHECK_DELAY = 1.0


def _warn_if_workers() -> None:
    """Warn once if this process is one of several workers on a MemoryBackend."""
    try:
        others = other_workers()
    except Exception:  # a look at /proc must never stop the app
        return
    if others:
        logger.warning(
            "ratelimit: MemoryBackend in one of %d worker processes: each worker keeps its "
            "own limits, so each limit is allowed %d times over. Use RedisBackend(url) to "
            "share them across workers (or divide every limit by the number of workers)",
            others + 1,
            others + 1,
        )


def _describe(rule: Rule) -> str:
    methods = "any method" if rule.methods is None else ", ".join(sorted(rule.methods))
    return f"{rule.path}, {methods}"


def _in_shadow(rule: Rule) -> Rule:
    """`rule` in shadow mode: a copy, so fields added to `Rule` later carry over."""
    if rule.shadow:
        return rule
    clone = copy.copy(rule)
    clone.shadow = True
    return clone


def _adding(
    send: Send,
    fields: tuple[tuple[bytes, bytes], ...],
    engine: Engine,
    decision: Decision,
    scope: Scope,
) -> Send:
    """Wrap `send` for an admitted request without leases: add `fields` to the response
    start, and refund `decision` if that start is a trailing-slash redirect.

    A closure rather than a method of a per-request object: calling it is
    cheaper than a bound method, and this runs for every message.
    """

    async def send_with_fields(message: Message) -> None:
        if message["type"] == "http.response.start":
            if message.get("status") in REDIRECTS and decision.checks:
                await refund_if_slash_redirect(engine, decision, scope, message)
            if fields:
                # A new dict and list: the app's message is not ours to change (an app may
                # send the same dict twice). Copy, then set: cheaper than {**m, key: v}.
                start = {**message}
                start["headers"] = [*message.get("headers", ()), *fields]
                message = start
        await send(message)

    return send_with_fields


#: Body bytes a waiting request's inbox reads ahead at most (plus the message that
#: crosses it): past it the upload stays with the server, whose back-pressure holds it.
_READ_AHEAD = 64 * 1024


class _Inbox:
    """The server's `receive` for a request that may wait in line.

    While it waits, `until_gone` reads ahead to notice a disconnect, keeping what
    it reads; the app's `receive` gets the kept messages first, then reads live,
    so the app sees the body unchanged. Nothing is read ahead unless the request
    waits, and at most `_READ_AHEAD` body bytes (plus the message that crosses it):
    a 400 MiB upload must not be buffered here while it waits. Past that,
    `until_gone` stops reading: the server then stops reading the socket too
    (uvicorn pauses past 64 KiB of unread body) and notices a disconnect only
    when reading resumes, i.e. once the wait ends (admitted: the app's reads;
    timed out or refused: the answer's write).
    """

    __slots__ = ("_kept", "_read", "_receive")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._kept: list[Message] = []
        self._read = 0

    async def until_gone(self) -> None:
        """Return once the client has disconnected (a cancelled read loses nothing);
        never, once `_READ_AHEAD` bytes are kept (the wait's own timeout still applies)."""
        while self._read < _READ_AHEAD:
            message = await self._receive()
            self._kept.append(message)
            if message["type"] in ("http.disconnect", "websocket.disconnect"):
                return
            self._read += len(message.get("body") or message.get("bytes") or b"") + len(
                message.get("text") or ""
            )
        await asyncio.get_running_loop().create_future()  # cancelled when the wait ends

    async def receive(self) -> Message:
        if self._kept:
            return self._kept.pop(0)
        return await self._receive()


class _Holder:
    """Per-request state of an admitted request holding concurrency leases.

    Its bound `receive` and `send` wrap the server's: the grant is released
    when the last body message goes out or the client disconnects. A
    trailing-slash redirect gets `decision` refunded first (see `_adding`).
    """

    __slots__ = ("_receive", "_send", "decision", "engine", "fields", "grant", "scope")

    def __init__(
        self,
        engine: Engine,
        grant: Grant,
        receive: Receive,
        send: Send,
        fields: tuple[tuple[bytes, bytes], ...],
        decision: Decision,
        scope: Scope,
    ) -> None:
        self.engine = engine
        self.grant = grant
        self._receive = receive
        self._send = send
        self.fields = fields
        self.decision = decision
        self.scope = scope

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] in ("http.disconnect", "websocket.disconnect"):
            await self._release()
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if message.get("status") in REDIRECTS and self.decision.checks:
                await refund_if_slash_redirect(self.engine, self.decision, self.scope, message)
            if self.fields:
                start = {**message}  # a copy: see _adding
                start["headers"] = [*message.get("headers", ()), *self.fields]
                message = start
        await self._send(message)
        if (kind == "http.response.body" and not message.get("more_body", False)) or (
            kind == "websocket.close"
        ):
            # `_release`, inlined: this runs once per request.
            grant = self.grant
            if not grant.released and not self.engine.release_nowait(grant):
                await self.engine.release(grant)

    async def _release(self) -> None:
        grant = self.grant
        # At once where the backend answers without waiting: no coroutine to await.
        if not grant.released and not self.engine.release_nowait(grant):
            await self.engine.release(grant)


_FAILED_CLOSED: tuple[responses.Headers, bytes] = (
    [(b"retry-after", b"1"), (b"content-type", b"application/problem+json")],
    b'{"type":"https://iana.org/assignments/http-problem-types#temporary-reduced-capacity",'
    b'"title":"Request cannot be satisfied due to temporary reduced capacity","status":503,'
    b'"detail":"The rate limiter cannot reach its store; failing closed."}',
)


def _with_headers(send: Send, extra: responses.Headers, *, only_missing: bool = False) -> Send:
    """Wrap `send` to add `extra` to the response start message."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if only_missing:
                present = {k.lower() for k, _ in headers}
                headers.extend(h for h in extra if h[0] not in present)
            else:
                headers.extend(extra)
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


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


def _build_backend(spec: Mapping[str, Any] | None) -> Backend:
    """A backend from the `[backend]` table of a config file."""
    if not spec:
        return MemoryBackend()
    kind = spec.get("type", "memory")
    options = {k: v for k, v in spec.items() if k != "type"}
    try:
        if kind == "memory":
            return MemoryBackend(**options)
        if kind == "redis":
            from ..backends.redis import RedisBackend

            return RedisBackend(**options)
    except ConfigError as exc:
        raise exc.under("backend") from None
    except TypeError as exc:
        raise ConfigError("backend", f"options of the {kind} backend ({exc})", options) from None
    raise ConfigError("backend.type", '"memory" or "redis"', kind)
