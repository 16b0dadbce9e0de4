"""Applying overrides: the effective rules, as the overrides in force shape them (pure).

See `policy.overrides` for what an override is; `core.live` keeps every
worker's effective rules current.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import ConfigError
from .costs import BY_REQUESTS, describe
from .limits import Concurrency, Limit, TokenBucket, Window, parse_rate_string
from .overrides import _FITS, _SET_FIELDS, Override
from .quotas import Quota
from .rules import Rule

__all__ = [
    "Effective",
    "Resolution",
    "check_override",
    "describe_limit",
    "effective_rule",
    "next_expiry",
    "resolve",
]


@dataclass(frozen=True)
class Effective:
    """A rule as it stands with the overrides in force on it."""

    #: The rule to enforce: the configured one when nothing is in force (the same object).
    rule: Rule
    configured: Rule
    #: The block in force, if any: every request of the rule is refused with 503.
    block: Override | None = None
    #: The overrides that shaped this rule (valid and in force), in slot order.
    overrides: tuple[Override, ...] = ()
    #: Per limit of the rule, the override that shaped it (None: as configured).
    by_limit: tuple[Override | None, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether any override is in force on the rule."""
        return bool(self.overrides)


def check_override(override: Override, rules: Sequence[Rule]) -> Rule:
    """Check that `override` fits one of `rules`; return that rule, or raise `ConfigError`.

    Names the field that does not fit: an unknown rule or limit (with the
    names there are), a change the limit's type has no use for, or a value
    the rule refuses (a burst below the rule's cost).
    """
    by_name = {r.name: r for r in rules}
    rule = by_name.get(override.rule)
    if rule is None:
        raise ConfigError("rule", f"one of the rules {_names(by_name)}", override.rule)
    effective_rule(rule, [override], now=-math.inf)
    return rule


def effective_rule(rule: Rule, overrides: Iterable[Override], now: float) -> Effective:
    """Apply the `overrides` of `rule` that are in force at `now`; others are ignored.

    Raises `ConfigError` (naming the field) if one does not fit the rule;
    `resolve` skips such overrides instead, one at a time.
    """
    mine = sorted(
        (o for o in overrides if o.rule == rule.name and not o.expired(now)),
        key=lambda o: o.slot,
    )
    if not mine:
        return Effective(rule, rule, by_limit=(None,) * len(rule.limits))
    names = rule.limit_names()
    specific: dict[str, Override] = {}
    wide: Override | None = None
    mode: Override | None = None
    for o in mine:
        if o.kind in ("block", "shadow"):
            mode = o
        elif o.limit is None:
            wide = o
        else:
            if o.limit not in names:
                raise ConfigError(
                    "limit", f"one of the limits of rule {rule.name!r}: {names}", o.limit
                )
            specific[o.limit] = o
    if wide is not None and wide.kind == "set":
        _check_fits_some(wide, rule)
    limits: list[Limit] = []
    shaped: list[Override | None] = []
    for name, lim in zip(names, rule.limits, strict=True):
        shaper = specific.get(name, wide)
        new = lim if shaper is None else _apply(lim, shaper, strict=shaper.limit is not None)
        limits.append(new)
        shaped.append(shaper if new is not lim else None)
    shadow = rule.shadow
    block = None
    if mode is not None:
        if mode.kind == "shadow":
            assert mode.shadow is not None
            shadow = mode.shadow
        else:
            block = mode
    try:
        effective = Rule(
            rule.path,
            rule.methods,
            limits,
            rule.cost,
            name=rule.name,
            fail=rule.fail,
            shadow=shadow,
            body_limit=rule.body_limit,
        )
    except ConfigError as exc:
        raise exc.under(f"rule {rule.name!r}") from None
    return Effective(effective, rule, block, tuple(mine), tuple(shaped))


def _apply(limit: Limit, o: Override, *, strict: bool) -> Limit:
    """`limit` changed by `o`. `strict`: every field of `o` must fit (a limit-specific override)."""
    if o.kind == "factor":
        assert o.factor is not None
        if isinstance(limit, Concurrency):
            # As Concurrency.scaled, but copied: see `_concurrency`.
            slots = max(1, math.floor(limit.limit * o.factor))
            return _concurrency(limit, slots, math.floor(limit.queue * o.factor), None)
        return limit.scaled(o.factor)
    given = {name for name in _SET_FIELDS if getattr(o, name) is not None}
    fits = _fits(limit)
    if strict and given - fits:
        bad = sorted(given - fits)[0]
        raise ConfigError(
            bad,
            f"a change a {limit.kind} limit has ({', '.join(sorted(fits)) or 'none'})",
            getattr(o, bad),
        )
    if not given & fits:
        return limit
    if isinstance(limit, TokenBucket):
        rate = o.rate or limit.rate
        burst = o.burst
        if burst is None:
            burst = limit.burst
            if o.rate is not None:
                burst = min(burst, int(parse_rate_string("rate", o.rate).amount))
        changed: Limit = TokenBucket(
            rate, burst=burst, key=limit.key, name=limit.name, shared=limit.shared
        )
    elif isinstance(limit, Window):
        assert o.rate is not None
        changed = Window(
            o.rate, strategy=limit.strategy, key=limit.key, name=limit.name, shared=limit.shared
        )
    else:
        assert isinstance(limit, Concurrency)
        return _concurrency(limit, o.slots, o.queue, o.timeout)
    # What it counts carries over: a token limit given a new rate must not count requests.
    changed.counts = limit.counts
    return changed


def _concurrency(
    limit: Concurrency, slots: int | None, queue: int | None, timeout: float | None
) -> Concurrency:
    """A copy of `limit` with new slots, queue or timeout (validated by `Override`).

    Copied rather than constructed, so every other field (and any the type
    gains later) carries over unchanged.
    """
    new = copy.copy(limit)
    if slots is not None:
        new.limit = slots
    if queue is not None:
        new.queue = queue
    if timeout is not None:
        new.timeout = timeout
    return new


def _fits(limit: Limit) -> frozenset[str]:
    """The set-fields that mean something for `limit`'s type."""
    for klass, names in _FITS.items():
        if isinstance(limit, klass):
            return names
    return frozenset()  # pragma: no cover - every limit type is in _FITS


def _check_fits_some(o: Override, rule: Rule) -> None:
    """A rule-wide change must fit at least one limit of the rule, field by field."""
    fits: set[str] = set()
    for lim in rule.limits:
        fits |= _fits(lim)
    for name in _SET_FIELDS:
        if getattr(o, name) is not None and name not in fits:
            kinds = sorted({lim.kind for lim in rule.limits})
            raise ConfigError(
                name,
                f"a change some limit of rule {rule.name!r} has "
                f"(its limits are {', '.join(kinds)})",
                getattr(o, name),
            )


@dataclass(frozen=True)
class Resolution:
    """Every rule's effective form, and the overrides that could not apply (with why)."""

    rules: tuple[Effective, ...]
    #: Overrides that name no rule here or do not fit theirs; they are ignored.
    problems: tuple[tuple[Override, ConfigError], ...] = ()

    def by_name(self) -> dict[str, Effective]:
        return {e.rule.name: e for e in self.rules}


def resolve(rules: Sequence[Rule], overrides: Iterable[Override], now: float) -> Resolution:
    """Apply every override in force at `now` to `rules`, skipping those that do not fit.

    A store is shared: it may hold overrides for rules another app defines,
    or that an older configuration had. Those are reported in `problems`,
    never raised, so one bad entry cannot keep the good ones from applying.
    """
    live = [o for o in overrides if not o.expired(now)]
    by_rule: dict[str, list[Override]] = {}
    for o in live:
        by_rule.setdefault(o.rule, []).append(o)
    problems: list[tuple[Override, ConfigError]] = []
    known = {r.name for r in rules}
    for name, items in by_rule.items():
        if name not in known:
            for o in items:
                problems.append(
                    (o, ConfigError("rule", f"one of the rules {_names(known)}", o.rule))
                )
    out: list[Effective] = []
    for rule in rules:
        good = []
        for o in by_rule.get(rule.name, ()):
            try:
                effective_rule(rule, [o], now)
            except ConfigError as exc:
                problems.append((o, exc))
            else:
                good.append(o)
        try:
            out.append(effective_rule(rule, good, now))
        except ConfigError as exc:  # pragma: no cover - each fits alone, so together too
            problems.extend((o, exc) for o in good)
            out.append(effective_rule(rule, (), now))
    return Resolution(tuple(out), tuple(problems))


def next_expiry(overrides: Iterable[Override], now: float) -> float | None:
    """The earliest `expires_at` after `now`: when the effective rules next change by themselves."""
    times = [o.expires_at for o in overrides if o.expires_at is not None and o.expires_at > now]
    return min(times, default=None)


def _names(names: Iterable[str]) -> str:
    listed = sorted(names)
    return ", ".join(repr(n) for n in listed) if listed else "(none configured)"


# -- describing limits ------------------------------------------------------------------


def describe_limit(limit: Limit) -> dict[str, Any]:
    """A limit's numbers as plain data, for status tables, reports and `--json`, with
    what it counts (`counts`) when that is not requests.

    Rates are given per the configured period from the limit's actual
    interval, so a halved "5/minute" reads "2.5/minute".
    """
    described = _numbers(limit)
    if limit.counts is not BY_REQUESTS:
        described["counts"] = describe(limit.counts)
    return described


def _numbers(limit: Limit) -> dict[str, Any]:
    if isinstance(limit, Concurrency):
        return {
            "kind": limit.kind,
            "limit": limit.limit,
            "queue": limit.queue,
            "timeout": limit.timeout,
            "shared": limit.shared,
        }
    if isinstance(limit, TokenBucket):
        return {
            "kind": limit.kind,
            "rate": rate_text(limit.period / limit.interval, limit),
            "burst": limit.burst,
            "per_second": 1.0 / limit.interval,
            "shared": limit.shared,
        }
    if isinstance(limit, Window):
        amount = float(limit.item.amount)
        return {
            "kind": limit.kind,
            "rate": rate_text(amount, limit),
            "strategy": limit.strategy,
            "per_second": amount / float(limit.item.get_expiry()),
            "shared": limit.shared,
        }
    if isinstance(limit, Quota):
        return {
            "kind": limit.kind,
            "allowance": limit.amount,
            "per": limit.per,
            "shared": limit.shared,
        }
    return {"kind": limit.kind}  # pragma: no cover - the three types above are all there is


def rate_text(amount: float, limit: TokenBucket | Window) -> str:
    """`"2.5/minute"`, `"100/2 hours"`: `amount` per the limit's configured period."""
    multiples = int(limit.item.multiples)
    unit = str(limit.item.GRANULARITY.name)
    number = f"{amount:.4g}" if amount != int(amount) else str(int(amount))
    if multiples == 1:
        return f"{number}/{unit}"
    return f"{number}/{multiples} {unit}s"
