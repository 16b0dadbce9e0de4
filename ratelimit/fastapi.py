"""FastAPI per-route limits: a dependency on a route or a router, deciding through a `Limiter`.

    from fastapi import Depends, FastAPI
    from ratelimit import Concurrency, Limiter, RedisBackend, TokenBucket
    from ratelimit.fastapi import RateLimit, Refused, refused_handler

    limiter = Limiter(backend=RedisBackend(url))     # shared with the middleware, workers, CLI
    images = RateLimit(
        limiter, "images",
        limits=[TokenBucket("5/minute"), Concurrency(8, queue=64, timeout=30)],
        key=lambda user: user.id, priority=lambda user: user.tier,
        who=Depends(current_user),
    )
    app = FastAPI(exception_handlers={Refused: refused_handler})

    @app.post("/v1/images", dependencies=[Depends(images)])   # or APIRouter(dependencies=[...])
    async def generate(...): ...

The limits become a `Rule` of the limiter (without a path: the middleware
never matches it), so they share its backend, live overrides, metrics and
`ratelimit status`, and are decided through its one decision path. A refusal
is `Refused`, an `HTTPException`: with `refused_handler` it answers exactly as
`RateLimitMiddleware` does; admitted responses carry the `RateLimit` fields.
Concurrency slots are held until the response has been sent (FastAPI runs a
`yield` dependency's exit after the response, streamed bodies included).
`exempt` marks a route or router exempt from the middleware's rules.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

from fastapi import Depends, HTTPException, Request, Response, params

from ._errors import CallableError, ConfigError
from .asgi import responses
from .asgi.routes import exempt
from .asgi.unrated import UNRATABLE
from .core.acquisition import Acquisition
from .core.decision import Decision, FailedDecision, RateLimited
from .core.limiter import Limiter
from .core.plan import Plan
from .policy.costs import Cost
from .policy.limits import Limit
from .policy.rules import FailPolicy, Rule

__all__ = ["Admission", "RateLimit", "Refused", "exempt", "refused_handler"]


class Admission(NamedTuple):
    """What a `RateLimit` dependency gives the route it admitted."""

    #: The admitting decision; None for a request not rated in shadow mode (a callable
    #: failed).
    decision: Decision | None
    #: The `RateLimit-Policy` and `RateLimit` fields (none when every limit was exempt).
    #: FastAPI adds them to the response the route returns as data; a route that
    #: returns a `Response` itself passes them on: `StreamingResponse(..., headers=...)`.
    headers: dict[str, str]


class Refused(HTTPException):
    """A route's limits refused the request (429, 503) or could not rate it (400).

    With `refused_handler` registered the answer is the middleware's, byte for
    byte (problem+json body, `Retry-After`, `RateLimit-Policy`, `RateLimit`);
    without it, FastAPI's `HTTPException` handler answers with the same status
    and header fields and `{"detail": ...}`. `decision` is None for a 400.
    """

    def __init__(
        self, status: int, headers: responses.Headers, body: bytes, decision: Decision | None
    ) -> None:
        fields = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        detail = json.loads(body).get("detail")
        super().__init__(status, detail, {k: v for k, v in fields.items() if k != "content-type"})
        #: The answer the middleware would send: header fields and body.
        self.fields = fields
        self.body = body
        self.decision = decision


async def refused_handler(request: Request, exc: Exception) -> Response:
    """The exception handler for `Refused`: answer as `RateLimitMiddleware` does.

    `FastAPI(exception_handlers={Refused: refused_handler})`, or
    `app.add_exception_handler(Refused, refused_handler)`.
    """
    if not isinstance(exc, Refused):
        raise exc
    return Response(exc.body, exc.status_code, headers=exc.fields)


class RateLimit:
    """A FastAPI dependency holding the limits of rule `name` of `limiter` for its route.

    `limits` become the rule `Rule(name=name, limits=limits, cost=cost, fail=fail,
    shadow=shadow)`, added to `limiter` (before it starts, so at import, beside
    the routes); without `limits`, the limiter's rule `name` (which must have no
    path) is used as it is. The same `RateLimit` on several routes, or on a
    router, is one rule: one quota per caller across them.

    `who` is a dependency (`Depends(current_user)`, or the function) whose result
    `key`, `priority` and a callable `cost` are called with (sync or async; without
    `who`, the `Request`): `key(who)` is the caller's text for the per-caller
    limits (None exempts them; a mapping of limit name -> text gives each its
    own), `priority(who)` the class in a `Concurrency` line, `cost(who)` the units
    taken. Without `key`, each limit's own `key=` (and a callable `cost`) reads
    the request's scope, as in a middleware rule. A failing `key`, `cost` or
    `priority` answers 400.
    """

    def __init__(
        self,
        limiter: Limiter,
        name: str,
        limits: Sequence[Limit] | None = None,
        *,
        key: Callable[[Any], Any] | None = None,
        cost: Cost | Callable[[Any], Any] = 1,
        priority: Callable[[Any], Any] | None = None,
        who: Any = None,
        fail: FailPolicy | None = None,
        shadow: bool = False,
    ) -> None:
        if not isinstance(limiter, Limiter):
            raise ConfigError("limiter", "a ratelimit Limiter", limiter)
        for field, func in (("key", key), ("priority", priority)):
            if func is not None and not callable(func):
                raise ConfigError(field, f"a callable (who) -> {field}", func)
        if key is None and (priority is not None or who is not None):
            raise ConfigError(
                "key",
                "a callable (who) -> the caller's text beside who= or priority= (without "
                "key=, each limit's own key= reads the request)",
                key,
            )
        if limits is None:
            plan = limiter.engine.by_name.get(name)
            if plan is None or plan.rule.path is not None:
                raise ConfigError(
                    "name",
                    "the name of a rule of the limiter without a path, or limits= to declare "
                    f"one (rules without a path: {_pathless(limiter)})",
                    name,
                )
        else:
            limiter.add_rule(Rule(name=name, limits=limits, cost=cost, fail=fail, shadow=shadow))
        rule = limiter.engine.by_name[name].rule
        if key is None and rule.reads_body:
            raise ConfigError(
                "cost",
                "a cost and keys that do not read the body here (FastAPI reads it: take the "
                "value from a dependency, who=Depends(...), cost=lambda body: body.n)",
                rule.cost,
            )
        self.limiter = limiter
        self.name = name
        self._key = key
        self._cost = cost if callable(cost) and key is not None else None
        self._priority = priority
        parameters = [
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
            inspect.Parameter("response", inspect.Parameter.KEYWORD_ONLY, annotation=Response),
        ]
        if who is not None:
            depends = who if isinstance(who, params.Depends) else Depends(who)
            parameters.append(
                inspect.Parameter("who", inspect.Parameter.KEYWORD_ONLY, default=depends)
            )
        #: What FastAPI reads to solve this dependency's own dependencies.
        self.__signature__ = inspect.Signature(parameters)

    async def __call__(
        self, *, request: Request, response: Response, who: Any = None
    ) -> AsyncIterator[Admission]:
        limiter = self.limiter
        if not limiter.started:
            await limiter.start()
        plan = limiter.engine.by_name[self.name]
        try:
            acquisition, decision = await self._enter(plan, request, who)
        except CallableError as exc:
            limiter.unratable(plan.rule, exc)
            if not plan.rule.shadow:
                raise Refused(*UNRATABLE, None) from exc
            yield Admission(None, {})
            return
        except RateLimited as exc:
            raise _refusal(limiter, exc.decision) from None
        compiled = responses.compiled(limiter.engine.plan(decision.rule), decision.rule)
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in responses.admitted_fields(compiled, decision.results)
        }
        for k, v in headers.items():
            response.headers[k] = v
        # As the middleware does: the route settles its actual cost on `request.state`.
        request.state.ratelimit = decision
        try:
            yield Admission(decision, headers)
        except BaseException as exc:
            await acquisition.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await acquisition.__aexit__(None, None, None)

    async def _enter(self, plan: Plan, request: Request, who: Any) -> tuple[Acquisition, Decision]:
        """Decide for this request: the acquisition holding its grant, and the decision.

        Raises `RateLimited` when refused, `CallableError` when a callable failed.
        """
        limiter = self.limiter
        if self._key is None:
            # Each limit's own key and the rule's cost read the request, as in the middleware.
            acquisition = Acquisition(partial(limiter.decide, plan.rule, request.scope))
            return acquisition, await acquisition.__aenter__()
        if who is None:
            who = request
        rule = plan.rule.name
        key = await _ask("key", self._key, who, rule)
        if key is None:
            key = dict.fromkeys(plan.names)  # every per-caller limit exempt; global ones hold
        elif not isinstance(key, (str, Mapping)):
            key = str(key)
        cost = None if self._cost is None else await _ask("cost", self._cost, who, rule)
        priority = None
        if self._priority is not None:
            priority = await _ask("priority", self._priority, who, rule)
        acquisition = limiter.acquire(self.name, key, cost=cost, priority=priority)
        try:
            return acquisition, await acquisition.__aenter__()
        except ConfigError as exc:
            # A value `who` gave that the rule cannot take: the request's fault.
            role = (exc.field or "key").split("[")[0]
            func = {"cost": self._cost, "priority": self._priority}.get(role, self._key)
            raise CallableError(role, func, rule, "", f"returned {exc}") from exc


async def _ask(role: str, func: Callable[[Any], Any], who: Any, rule: str) -> Any:
    """`func(who)`, awaited if it returns an awaitable; CallableError if it raises."""
    try:
        value = func(who)
        if inspect.isawaitable(value):
            value = await value
    except Exception as exc:
        raise CallableError(role, func, rule, "", f"raised {type(exc).__name__}") from exc
    return value


def _refusal(limiter: Limiter, decision: Decision) -> Refused:
    """The middleware's answer to `decision`, as a `Refused`."""
    if isinstance(decision, FailedDecision):
        return Refused(503, *responses.failed_closed_reply(), decision)
    compiled = responses.compiled(limiter.engine.plan(decision.rule), decision.rule)
    wait = responses.told(decision, compiled[2])
    headers = responses.refusal_headers(decision, compiled[1][1], compiled[2], wait=wait)
    headers.append((b"content-type", b"application/problem+json"))
    return Refused(decision.status, headers, responses.problem_body(decision, wait), decision)


def _pathless(limiter: Limiter) -> list[str]:
    return [r.name for r in limiter.engine.rules if r.path is None]
