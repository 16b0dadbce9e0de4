"""`Quota`: a per-key allowance per UTC calendar day or month, for budgets.

Beside the rates of a rule (`TokenBucket`, `Window`), a quota caps what a
caller may spend in a calendar period: `Quota("100000/day", counts="tokens")`
or `Quota(1_000_000, per="month")`. The day starts at midnight UTC, the month
at 00:00 UTC on the 1st (see `algorithms.calendar`). It is decided with the
rule's other limits, all or nothing, and refunded as they are. A refusal is a
429 that tells clients not to retry before the allowance returns
(`x-should-retry: false`, `Retry-After` the seconds until the period's end).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .._errors import ConfigError
from .._types import KeyFunc
from ..algorithms.calendar import UNITS
from . import keys
from .costs import MAX_COST
from .limits import Limit

#: "100000/day", "1000000 per month" (one unit of a day or a month, nothing else).
_ALLOWANCE = re.compile(r"^\s*(\d+)\s*(?:/|\bper\b)\s*(day|month)\s*$", re.IGNORECASE)
#: The longest period of each unit, in seconds (for expiries of state and sanity checks).
LONGEST = {"day": 86400.0, "month": 31 * 86400.0}
_EXPECTED = 'an allowance like "100000/day" or "1000000/month", or an integer with per='


class Quota(Limit):
    """At most `allowance` units per UTC calendar `per` ("day" or "month") per key.

    `allowance` is a string (`"100000/day"`, `"1000000 per month"`) or an
    integer with `per=`. `key` defaults to the client's IP, `counts` to
    requests. Refusals are 429 (the caller's budget is spent) even on a shared
    key, unless `shared=True` is given.
    """

    kind = "quota"
    #: A refused client should not retry before `Retry-After` (the period's end).
    should_retry = False
    __slots__ = ("amount", "per")

    def __init__(
        self,
        allowance: str | int,
        per: str | None = None,
        *,
        key: KeyFunc | None = None,
        name: str | None = None,
        shared: bool | None = None,
        counts: str | Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(
            keys.client_ip() if key is None else key,
            name,
            False if shared is None else shared,
            counts,
        )
        if isinstance(allowance, str):
            match = _ALLOWANCE.match(allowance)
            if match is None or per is not None:
                raise ConfigError("allowance", _EXPECTED, allowance)
            amount, unit = int(match.group(1)), match.group(2).lower()
        else:
            amount, unit = allowance, per
            if unit not in UNITS:
                raise ConfigError("per", '"day" or "month"', per)
        if not isinstance(amount, int) or isinstance(amount, bool) or not 1 <= amount <= MAX_COST:
            raise ConfigError("allowance", "a positive integer of at most 2**53", allowance)
        #: Units allowed per period.
        self.amount: int = amount
        #: "day" or "month".
        self.per: str = unit

    @property
    def strategy(self) -> str:
        """The calendar unit, as the window strategy the backends count it by."""
        return self.per

    def scaled(self, share: float) -> Quota:
        clone = Quota(
            max(1, math.floor(self.amount * share)),
            self.per,
            key=self.key,
            name=self.name,
            shared=self.shared,
        )
        clone.counts = self.counts
        return clone

    def __repr__(self) -> str:
        return f"Quota({self.amount}, per={self.per!r}, key={self.key!r})"
