"""A caller's arguments to `Limiter.acquire`/`check`/`peek`, checked and made a `Given`.

Each bad argument is a `ConfigError` naming it; a per-caller limit left
without a key is one too (never a silent exemption).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._errors import ConfigError
from ..policy.costs import Cost, check_taken
from ..policy.limits import Concurrency
from .plan import Plan

#: A caller's key: one text for every per-caller limit of the rule, or one per limit name.
Key = str | Mapping[str, str | None] | None


def texts(plan: Plan, key: Key, *, leases_only: bool) -> tuple[str | None, ...]:
    """The caller's text per limit of `plan` from `key`; ConfigError naming a per-caller
    limit left without one (no silent exemption)."""
    names = plan.names
    if isinstance(key, str):
        return (key,) * plan.size
    if key is None:
        texts: tuple[str | None, ...] = (None,) * plan.size
        given: Mapping[str, Any] = {}
    elif isinstance(key, Mapping):
        for name, text in key.items():
            if name not in names:
                raise ConfigError(
                    f"key[{name!r}]", f"a limit of rule {plan.rule.name!r}: {list(names)}"
                )
            if text is not None and not isinstance(text, str):
                raise ConfigError(f"key[{name!r}]", "the caller's text, or None", text)
        texts = tuple(key.get(name) for name in names)
        given = key
    else:
        raise ConfigError("key", "the caller's text, or a mapping of limit name -> text", key)
    missing = [
        name
        for name, lim, fixed in zip(names, plan.limits, plan.fixed, strict=True)
        if fixed is None and name not in given and (not leases_only or isinstance(lim, Concurrency))
    ]
    if missing:
        raise ConfigError(
            "key",
            f"a key for the per-caller limits {missing} of rule {plan.rule.name!r} "
            "(key='caller', or key={limit name: 'caller'}; None there exempts)",
            key,
        )
    return texts


def cost(plan: Plan, cost: Cost | None) -> Cost:
    """The cost to take: `cost` checked, or the rule's when it is a constant."""
    if cost is None:
        if plan.static_cost is not None:
            return plan.static_cost
        raise ConfigError(
            "cost",
            f"a cost: rule {plan.rule.name!r} takes its cost from a request (a function)",
        )
    try:
        cost = check_taken(cost)
        plan.units(cost)
    except ValueError as exc:
        raise ConfigError("cost", f"{exc} (peek() takes nothing)", cost) from None
    return cost


def priority(plan: Plan, priority: object) -> object:
    """`priority`, checked to be a class of every waiting line of `plan`."""
    for lim, name in zip(plan.limits, plan.names, strict=True):
        if isinstance(lim, Concurrency) and lim.queued:
            try:
                lim.rank(priority)
            except ValueError as exc:
                raise ConfigError(
                    "priority", f"a class of limit {name!r}: {exc}", priority
                ) from None
    return priority


def timeout(timeout: float | None) -> float | None:
    """`timeout` checked: seconds >= 0, or None."""
    if timeout is None:
        return None
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or not 0 <= timeout < math.inf
    ):
        raise ConfigError("timeout", "seconds >= 0 to wait in line at most, or None", timeout)
    return float(timeout)
