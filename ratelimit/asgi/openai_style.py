"""OpenAI-style rate-limit headers and error bodies, for clients written against that API.

The header dialect (`RateLimitMiddleware(dialect="openai")`) adds, beside the
draft's fields, `x-ratelimit-limit-<unit>`, `x-ratelimit-remaining-<unit>` and
`x-ratelimit-reset-<unit>` per unit a rule's rate limits count: `requests` for
limits counting requests (the default), `tokens` for limits counting only
token dimensions (`input_tokens`, `output_tokens`, a weighted sum of them),
else the one dimension counted (`images`; `_` written `-`). When several
limits share a unit, the one with the least available quota speaks (the one
the caller meets first). The limit is a bucket's burst or a window's amount
(what the remaining count counts down from); the reset is the time until the
limit is back to full, in the text OpenAI sends (`20ms`, `1.5s`, `6m0s`).
Concurrency limits, calendar quotas and limits counting a mix of other
dimensions are not shown: the dialect speaks of rates only.

The error body (`RateLimitMiddleware(refusal_body="openai")`) is
`{"error": {"message", "type", "param", "code"}}`, which the openai SDK turns
into an exception carrying the limiter's message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

from ..backends.base import CheckResult
from ..core.decision import Decision
from ..core.plan import SKIPPED
from ..policy.costs import REQUESTS
from ..policy.limits import Limit, TokenBucket, Window
from ..policy.rules import Rule
from .responses import FAILED_CLOSED_MESSAGE, Headers, refusal_message

#: Renders a rule's dialect fields from a decision's results.
Render = Callable[[Sequence[CheckResult | None]], Headers]


def unit(limit: Limit) -> str | None:
    """The dialect's name for what `limit` counts (see the module docstring); None: not shown."""
    if not isinstance(limit, (TokenBucket, Window)):
        return None  # concurrency, calendar quotas: the dialect speaks of rates
    names = [name for name, _ in limit.counts]
    if names == [REQUESTS]:
        return "requests"
    if all(name.endswith("tokens") for name in names):
        return "tokens"
    if len(names) == 1:
        return names[0].replace("_", "-")
    return None


def duration(seconds: float) -> bytes:
    """A wait as OpenAI's reset fields write it (Go's duration text), rounded up to
    the millisecond: `0s`, `20ms`, `1.5s`, `6m0s`, `1h2m5.25s`."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return b"0s"
    if ms < 1000:
        return b"%dms" % ms
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    text = f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}".encode("ascii")
    if minutes:
        return f"{minutes}m{text}".encode("ascii")
    return text.encode("ascii")


def _capacity(limit: Limit) -> int:
    if isinstance(limit, TokenBucket):
        return limit.burst
    assert isinstance(limit, Window)
    return int(limit.item.amount)


def compile_fields(rule: Rule) -> Render | None:
    """The renderer of `rule`'s dialect fields; None when no limit of it is shown."""
    groups: dict[str, list[tuple[int, bytes]]] = {}
    for i, limit in enumerate(rule.limits):
        name = unit(limit)
        if name is not None:
            groups.setdefault(name, []).append((i, b"%d" % _capacity(limit)))
    if not groups:
        return None
    compiled = tuple(
        (
            members,
            f"x-ratelimit-limit-{name}".encode("ascii"),
            f"x-ratelimit-remaining-{name}".encode("ascii"),
            f"x-ratelimit-reset-{name}".encode("ascii"),
        )
        for name, members in groups.items()
    )

    def render(results: Sequence[CheckResult | None]) -> Headers:
        out: Headers = []
        for members, limit_name, remaining_name, reset_name in compiled:
            best: tuple[bytes, CheckResult] | None = None
            for i, capacity in members:
                r = results[i]
                if r is None or r is SKIPPED:
                    continue
                if best is None or r[1] < best[1][1]:
                    best = (capacity, r)
            if best is not None:
                capacity, r = best
                out.append((limit_name, capacity))
                out.append((remaining_name, b"%d" % r[1]))
                out.append((reset_name, duration(r[3])))
        return out

    return render


def error_body(decision: Decision, wait: float) -> bytes:
    """An OpenAI-style error body for a refusal (`wait`: the seconds it is told)."""
    if decision.status == 429:
        # OpenAI's own 429s say which unit ran out as the type: "requests" or "tokens".
        refused = [s.limit for s in decision.states if not (s.admitted or s.exempt or s.skipped)]
        kind = next((u for u in map(unit, refused) if u is not None), "requests")
        code: str | None = "rate_limit_exceeded"
    else:
        kind, code = "server_error", "service_unavailable"
    error = {
        "message": refusal_message(decision, wait),
        "type": kind,
        "param": None,
        "code": code,
    }
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def failed_closed_body() -> bytes:
    """The OpenAI-style body of a `fail="closed"` refusal (built once per middleware)."""
    error = {
        "message": FAILED_CLOSED_MESSAGE,
        "type": "server_error",
        "param": None,
        "code": "service_unavailable",
    }
    return json.dumps({"error": error}, separators=(",", ":")).encode()
