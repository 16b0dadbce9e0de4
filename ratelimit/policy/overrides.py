"""Live overrides: change a rule's limits at run time, for a stated while, without a redeploy.

An `Override` is a value: the rule (and limit) it targets, one kind of change,
when it lapses, and why. The functions here are pure: they validate an
override, serialise it for a store, and apply a set of overrides to the
configured `Rule` to give the effective one (`policy.effective`). Stores and the background work
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

import json
import math
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final, Literal

from .._errors import ConfigError
from .limits import Concurrency, Limit, TokenBucket, Window, check_name, parse_rate_string
from .quotas import Quota

__all__ = ["Override"]

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
    Quota: frozenset(),  # changed by a factor only
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
