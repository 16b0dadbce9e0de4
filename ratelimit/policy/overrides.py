"""Live overrides: change a rule's limits at run time, for a stated while, without a redeploy.

An `Override` is a value: the rule (and limit) it targets, one kind of change,
when it lapses, and why. The functions here are pure: they validate an
override, serialise it for a store, and apply a set of overrides to the
configured `Rule` to give the effective one. Stores and the background work
that keeps every worker current live in `core.live`.

Kinds of change (exactly one per override):

    rate / burst            a TokenBucket's rate and burst, a Window's rate
    slots / queue / timeout a Concurrency's limit, queue length and queue wait
    factor                  every number of the limit times `factor` (0.5 halves it)
    block                   refuse every request of the rule: 503 with `message`
    shadow                  True: decide and count but refuse nothing; False: enforce
                            a rule configured with shadow=True

Targets, and which override shapes a limit:

    rule/limit   one limit, by its policy name (as in headers and metrics)
    rule/*       every limit of the rule the change fits (a rate fits buckets and
                 windows, slots fit concurrency limits, a factor fits all)
    rule/!       the rule as a whole: block or shadow

A limit-specific override wins over the rule-wide one; overrides never
compound: each applies to the configured value, so clearing one gives the
configuration back. A rate without a burst keeps the configured burst, capped
at the new rate's amount, so tightening "100/day" to "3/day" also caps the
burst at 3, while loosening never raises a burst implicitly.

Every override has `expires_at` (seconds since the epoch, on the store's
clock), and it is required: a temporary measure must not become permanent by
accident, so "until cleared" is said explicitly with `expires_at=None`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final, Literal

from .._errors import ConfigError
from .limits import Concurrency, Limit, TokenBucket, Window, check_name, parse_rate_string
from .rules import Rule

__all__ = [
    "Effective",
    "Override",
    "Resolution",
    "check_override",
    "describe_limit",
    "effective_rule",
    "next_expiry",
    "resolve",
]

#: The version of the serialised form; a reader refuses forms it does not know.
FORMAT: Final = 1
#: Longest `reason`, `message` or `created_by` text (they are shown in tables and bodies).
MAX_TEXT: Final = 500
#: Largest factor: a factor is a temporary adjustment, not a way to write "unlimited".
MAX_FACTOR: Final = 1000.0

OverrideKind = Literal["set", "factor", "block", "shadow"]

_SET_FIELDS: Final = ("rate", "burst", "slots", "queue", "timeout")
#: Which set-fields fit each limit type.
_FITS: Final[dict[type[Limit], frozenset[str]]] = {
    TokenBucket: frozenset({"rate", "burst"}),
    Window: frozenset({"rate"}),
    Concurrency: frozenset({"slots", "queue", "timeout"}),
}
_JSON_KEYS: Final = frozenset(
    {
        "v",
        "rule",
        "limit",
        *_SET_FIELDS,
        "factor",
        "block",
        "message",
        "shadow",
        "expires_at",
        "reason",
        "created_at",
        "created_by",
    }
)


@dataclass(frozen=True, slots=True)
class Override:
    """One live change to a rule, valid until `expires_at` (None: until cleared).

    Fields are checked at construction and a bad one raises `ConfigError`
    naming it. Whether the change fits the rule (a rate for a concurrency
    limit does not) is checked against the rules by `check_override`.
    """

    rule: str
    #: The limit's policy name; None targets the rule (every limit it fits, or the rule's mode).
    limit: str | None = None
    _: KW_ONLY
    rate: str | None = None
    burst: int | None = None
    slots: int | None = None
    queue: int | None = None
    timeout: float | None = None
    factor: float | None = None
    block: bool = False
    #: What refused callers read (the problem body's `detail`) while a block is in force.
    message: str | None = None
    shadow: bool | None = None
    #: Seconds since the epoch on the store's clock; None: until cleared. Required.
    expires_at: float | None
    #: Why, for operators (never sent to callers).
    reason: str | None = None
    created_at: float | None = None
    created_by: str | None = None
    kind: OverrideKind = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_name("rule", self.rule)
        if self.limit is not None:
            check_name("limit", self.limit)
        if self.rate is not None:
            parse_rate_string("rate", self.rate)
        _set(self, "burst", _positive_int("burst", self.burst))
        _set(self, "slots", _positive_int("slots", self.slots))
        if self.queue is not None and (
            not isinstance(self.queue, int) or isinstance(self.queue, bool) or self.queue < 0
        ):
            raise ConfigError("queue", "an integer >= 0", self.queue)
        _set(self, "timeout", _number("timeout", self.timeout, "a number of seconds >= 0", 0.0))
        factor = _number("factor", self.factor, f"a number > 0 and <= {MAX_FACTOR:g}", None)
        if factor is not None and not 0 < factor <= MAX_FACTOR:
            raise ConfigError("factor", f"a number > 0 and <= {MAX_FACTOR:g}", self.factor)
        _set(self, "factor", factor)
        if not isinstance(self.block, bool):
            raise ConfigError("block", "true or false", self.block)
        if self.shadow is not None and not isinstance(self.shadow, bool):
            raise ConfigError("shadow", "true, false or None", self.shadow)
        kinds: list[OverrideKind] = []
        if any(getattr(self, name) is not None for name in _SET_FIELDS):
            kinds.append("set")
        if self.factor is not None:
            kinds.append("factor")
        if self.block:
            kinds.append("block")
        if self.shadow is not None:
            kinds.append("shadow")
        if not kinds:
            raise ConfigError(
                "override",
                "one change: rate/burst, slots/queue/timeout, factor, block or shadow",
            )
        if len(kinds) > 1:
            raise ConfigError(
                "override",
                "one kind of change per override (set it as separate overrides)",
                kinds,
            )
        kind = kinds[0]
        _set(self, "kind", kind)
        if kind in ("block", "shadow") and self.limit is not None:
            raise ConfigError(
                "limit", f"no limit name: {kind} applies to the whole rule", self.limit
            )
        if self.message is not None and not self.block:
            raise ConfigError("message", "a message only with block=True", self.message)
        _text("message", self.message)
        _text("reason", self.reason)
        _text("created_by", self.created_by)
        _set(self, "expires_at", _number("expires_at", self.expires_at, _EPOCH, None))
        if self.expires_at is not None and self.expires_at <= 0:
            raise ConfigError("expires_at", _EPOCH, self.expires_at)
        _set(self, "created_at", _number("created_at", self.created_at, _EPOCH, None))

    # -- identity and time --------------------------------------------------------

    @property
    def slot(self) -> str:
        """Where it is stored: `rule/limit`, `rule/*` (rule-wide change) or `rule/!` (mode).

        Setting an override replaces the one in the same slot.
        """
        if self.kind in ("block", "shadow"):
            return f"{self.rule}/!"
        return f"{self.rule}/{self.limit or '*'}"

    def expired(self, now: float) -> bool:
        """Whether it has lapsed at `now` (seconds since the epoch)."""
        return self.expires_at is not None and now >= self.expires_at

    def time_left(self, now: float) -> float | None:
        """Seconds until it lapses (0 once lapsed); None until cleared."""
        return None if self.expires_at is None else max(0.0, self.expires_at - now)

    def describe(self) -> str:
        """The change in a few words, for tables and logs: `rate=3/day burst=3`, `x0.5`."""
        if self.kind == "factor":
            return f"x{self.factor:g}"
        if self.kind == "block":
            return "block"
        if self.kind == "shadow":
            return "shadow" if self.shadow else "enforce"
        parts = []
        for name in _SET_FIELDS:
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
        return " ".join(parts)

    # -- serialised form ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The stored form as a dict: unset fields left out, `expires_at` always present."""
        data: dict[str, Any] = {"v": FORMAT, "rule": self.rule}
        for name in ("limit", *_SET_FIELDS, "factor", "message", "shadow"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        if self.block:
            data["block"] = True
        data["expires_at"] = self.expires_at
        for name in ("reason", "created_at", "created_by"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data

    def to_json(self) -> str:
        """Compact JSON of `to_dict` (what a store keeps)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Override:
        """Read the stored form back; `ConfigError` names a missing, unknown or bad field."""
        if not isinstance(data, Mapping):
            raise ConfigError("override", "a JSON object", data)
        unknown = sorted(str(k) for k in data if k not in _JSON_KEYS)
        if unknown:
            raise ConfigError(
                unknown[0], "a field of a stored override (written by a newer version?)"
            )
        if data.get("v") != FORMAT:
            raise ConfigError("v", f"format version {FORMAT}", data.get("v"))
        for key in ("rule", "expires_at"):
            if key not in data:
                raise ConfigError(key, "a value; the field is missing")
        options = {k: v for k, v in data.items() if k != "v"}
        return cls(**options)

    @classmethod
    def from_json(cls, text: str | bytes) -> Override:
        """Parse `to_json`'s output; malformed JSON is a `ConfigError` too."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError("override", f"JSON ({exc})", text) from None
        return cls.from_dict(data)


_EPOCH = "seconds since the epoch (a number > 0), or None for until cleared"


def _set(obj: Override, name: str, value: object) -> None:
    """Normalise a field of the frozen dataclass during __post_init__."""
    object.__setattr__(obj, name, value)


def _positive_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(name, "a positive integer", value)
    return value


def _number(name: str, value: object, expected: str, minimum: float | None) -> float | None:
    if value is None:
        return None
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
    ):
        raise ConfigError(name, expected, value)
    return float(value)


def _text(name: str, value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_TEXT
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise ConfigError(
            name, f"one line of text, 1 to {MAX_TEXT} characters, no control characters", value
        )


# -- applying overrides ---------------------------------------------------------------


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
        return TokenBucket(rate, burst=burst, key=limit.key, name=limit.name, shared=limit.shared)
    if isinstance(limit, Window):
        assert o.rate is not None
        return Window(
            o.rate, strategy=limit.strategy, key=limit.key, name=limit.name, shared=limit.shared
        )
    assert isinstance(limit, Concurrency)
    return _concurrency(limit, o.slots, o.queue, o.timeout)


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
    """A limit's numbers as plain data, for status tables, reports and `--json`.

    Rates are given per the configured period from the limit's actual
    interval, so a halved "5/minute" reads "2.5/minute".
    """
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
    return {"kind": limit.kind}  # pragma: no cover - the three types above are all there is


def rate_text(amount: float, limit: TokenBucket | Window) -> str:
    """`"2.5/minute"`, `"100/2 hours"`: `amount` per the limit's configured period."""
    multiples = int(limit.item.multiples)
    unit = str(limit.item.GRANULARITY.name)
    number = f"{amount:.4g}" if amount != int(amount) else str(int(amount))
    if multiples == 1:
        return f"{number}/{unit}"
    return f"{number}/{multiples} {unit}s"
