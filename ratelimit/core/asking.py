"""Asking a request's callables: key, cost, priority, fair key and the client's deadline.

Every callable is asked before the backend, so one that fails (raises, or
returns what its role does not allow) raises `CallableError` having consumed
nothing.
"""

from __future__ import annotations

import inspect
import math
import reprlib
from collections.abc import Callable
from typing import Any

from .._errors import CallableError
from .._types import Scope
from ..policy import keys
from ..policy.body import body_of
from ..policy.costs import MAX_COST, Cost, check_taken
from ..policy.limits import Concurrency
from ..policy.rules import Rule
from .plan import Plan


def raised(role: str, func: object, plan: Plan, i: int, exc: Exception) -> CallableError:
    """The error for limit `i`'s `role` callable having raised `exc` (its cause)."""
    name = plan.names[i]
    return CallableError(role, func, plan.rule.name, name, f"raised {type(exc).__name__}")


async def ask(role: str, func: Callable[[Scope], Any], plan: Plan, i: int, scope: Scope) -> Any:
    """Limit `i`'s `role` callable (sync or async) asked for `scope`."""
    try:
        value = func(scope)
        if inspect.isawaitable(value):
            value = await value
    except Exception as exc:
        raise raised(role, func, plan, i, exc) from exc
    return value


async def rank(plan: Plan, i: int, scope: Scope) -> int:
    """The request's class in limit `i`'s line (0 without a priority function)."""
    limit = plan.limits[i]
    assert isinstance(limit, Concurrency)
    if limit.priority is None:
        return 0
    value = await ask("priority", limit.priority, plan, i, scope)
    try:
        return limit.rank(value)
    except ValueError as exc:
        problem = f"returned {reprlib.repr(value)}, {exc}"
        raise CallableError(
            "priority", limit.priority, plan.rule.name, plan.names[i], problem
        ) from None


async def fair_text(plan: Plan, i: int, scope: Scope) -> str | None:
    """Limit `i`'s fair key for `scope` as text; None without one (or when it says None)."""
    limit = plan.limits[i]
    assert isinstance(limit, Concurrency)
    if limit.fair_key is None:
        return None
    value = await ask("fair_key", limit.fair_key, plan, i, scope)
    try:
        return None if value is None else str(value)
    except Exception as exc:
        raise raised("fair_key", limit.fair_key, plan, i, exc) from exc


def client_timeout(scope: Scope, headers: tuple[keys.header, ...]) -> float | None:
    """Seconds the client says it will wait (the shortest of its `deadline_header`s),
    or None if none is present and readable."""
    shortest = None
    for header in headers:
        text = header(scope)
        if text is None:
            continue
        try:
            seconds = float(text)
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0 and (shortest is None or seconds < shortest):
            shortest = seconds
    return shortest


async def cost(rule: Rule, scope: Scope) -> Cost:
    """The rule's cost callable asked for `scope`: an integer from 1 to `MAX_COST`, or
    units per dimension (see `policy.costs.check_taken`), else CallableError.

    Not 0: a cost of nothing would admit the request without taking from
    any bucket (an exemption is a key function's None). Not past `MAX_COST`: a
    cost read from the request (`?n=4611686018427387904`) must not make the store
    fail, which `fail="open"` would turn into a free admission. A cost of
    `(scope, body)` gets the body the face parsed (see `policy.body`).
    """
    func: Callable[..., Any] = rule.cost  # type: ignore[assignment]  # callable: not an int
    try:
        value = func(scope, body_of(scope)) if rule.cost_reads_body else func(scope)
        cost = await value if inspect.isawaitable(value) else value
    except Exception as exc:
        raise CallableError("cost", func, rule.name, "", f"raised {type(exc).__name__}") from exc
    if cost.__class__ is int and 1 <= cost <= MAX_COST:
        return cost
    try:
        return check_taken(cost)
    except ValueError as exc:
        problem = f"returned {reprlib.repr(cost)}, not {exc}"
        raise CallableError("cost", func, rule.name, "", problem) from None
