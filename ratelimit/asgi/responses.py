"""Header fields and refusal bodies (draft-ietf-httpapi-ratelimit-headers).

`RateLimit-Policy` is static per rule and built once; `RateLimit` carries the
current state of each limit. Refusals are `application/problem+json` with the
draft's problem types. Policy names come from configuration only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence

from ..backends.base import CheckResult
from ..core.decision import BlockedDecision, Decision
from ..core.plan import SKIPPED
from ..policy.limits import Concurrency, Limit, TokenBucket, Window
from ..policy.rules import Rule

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"

Headers = list[tuple[bytes, bytes]]


def policy_item(name: str, limit: Limit) -> str:
    """One `RateLimit-Policy` list member for `limit`."""
    if isinstance(limit, Concurrency):
        return f'"{name}";q={limit.limit};qu="concurrent-requests"'
    assert isinstance(limit, (TokenBucket, Window))
    return f'"{name}";q={limit.item.amount};w={int(limit.item.get_expiry())}'


def policy_header(rule: Rule) -> bytes:
    """The `RateLimit-Policy` field value of a rule."""
    items = [policy_item(n, lim) for n, lim in zip(rule.limit_names(), rule.limits, strict=True)]
    return ", ".join(items).encode("ascii")


def seconds(value: float) -> int:
    """Whole seconds, rounded up: a client that waits this long is never early."""
    return max(0, math.ceil(value - 1e-9))


_RATE, _BUCKET, _SLOTS = 0, 1, 2


class RateLimitField:
    """The `RateLimit` field of one rule, compiled: a byte template per limit.

    Built once per rule; `render` runs on every admitted request, so it fills
    `%d` templates instead of formatting strings and reads the backend's raw
    results positionally, without per-limit state objects.
    """

    __slots__ = ("_parts", "render")

    def __init__(self, rule: Rule) -> None:
        parts = []
        for name, lim in zip(rule.limit_names(), rule.limits, strict=True):
            if lim.__class__ is Concurrency:
                parts.append((_SLOTS, f'"{name}";r=%d'.encode("ascii"), 0.0))
            elif isinstance(lim, TokenBucket):
                # `core.plan.reset_after`'s time until the next unit, precomputed (the same
                # operation).
                parts.append(
                    (_BUCKET, f'"{name}";r=%d;t=%d'.encode("ascii"), (lim.burst - 1) * lim.interval)
                )
            else:
                parts.append((_RATE, f'"{name}";r=%d;t=%d'.encode("ascii"), 0.0))
        self._parts = tuple(parts)
        #: The field value for one decision's results (`Decision.results`).
        self.render: Callable[[Sequence[CheckResult | None]], bytes] = (
            self._render_one if len(parts) == 1 else self._render_all
        )

    # The two renderers repeat one small computation instead of sharing a helper:
    # a Python call costs as much as the rest of a part here. Both are held byte
    # for byte to the limits' states (`Decision.states`, whose `t` is the one formula,
    # `core.plan.reset_after`) by tests/test_responses.py.

    def _render_all(self, results: Sequence[CheckResult | None]) -> bytes:
        out = []
        # Not zip(strict=True): its keyword costs more than the loop. A decision has
        # one result per limit of its rule, which these parts were compiled from.
        for (kind, template, next_unit), r in zip(self._parts, results):  # noqa: B905
            if r is None or r is SKIPPED:
                continue
            admitted, remaining, retry, reset = r
            if kind == _SLOTS:
                out.append(template % remaining)
                continue
            # `core.plan.reset_after` and `seconds`, inlined (conditionals, not max():
            # the same values, at a fraction of a builtin call's cost).
            if remaining or kind == _RATE:
                t = reset
            elif not admitted:
                t = retry
            else:
                t = reset - next_unit
                t = t if t > 0.0 else 0.0
            whole = math.ceil(t - 1e-9)
            out.append(template % (remaining, whole if whole > 0 else 0))
        return b", ".join(out)

    def _render_one(self, results: Sequence[CheckResult | None]) -> bytes:
        # The commonest rule, one limit: no loop, no list, no join.
        r = results[0]
        if r is None or r is SKIPPED:
            return b""
        kind, template, next_unit = self._parts[0]
        admitted, remaining, retry, reset = r
        if kind == _SLOTS:
            return template % remaining
        if remaining or kind == _RATE:
            t = reset
        elif not admitted:
            t = retry
        else:
            t = reset - next_unit
            t = t if t > 0.0 else 0.0
        whole = math.ceil(t - 1e-9)
        return template % (remaining, whole if whole > 0 else 0)


def retry_after(decision: Decision) -> int:
    """`Retry-After` in whole seconds, at least 1, never earlier than the true time."""
    return max(1, seconds(decision.retry_after))


def refusal_headers(
    decision: Decision, policy: bytes, field: RateLimitField | None = None
) -> Headers:
    """Headers every refusal carries, whatever renders its body."""
    headers: Headers = [(b"retry-after", str(retry_after(decision)).encode())]
    if policy:
        headers.append((b"ratelimit-policy", policy))
    field = RateLimitField(decision.rule) if field is None else field
    value = field.render(decision.results)
    if value:
        headers.append((b"ratelimit", value))
    return headers


def problem_body(decision: Decision) -> bytes:
    """The problem+json body of a refusal."""
    violated = decision.violated
    if isinstance(decision, BlockedDecision):
        # An operator's block: their words, or a plain statement of it.
        detail = decision.message or "This endpoint is closed by its operator for now."
        problem = {
            "type": REDUCED_CAPACITY,
            "title": "Request cannot be satisfied due to temporary reduced capacity",
            "status": decision.status,
            "detail": detail,
            "violated-policies": violated,
        }
    elif decision.status == 429:
        problem = {
            "type": QUOTA_EXCEEDED,
            "title": "Request cannot be satisfied as assigned quota has been exceeded",
            "status": 429,
            "detail": f"Retry in {retry_after(decision)} seconds.",
            "violated-policies": violated,
        }
    else:
        problem = {
            "type": REDUCED_CAPACITY,
            "title": "Request cannot be satisfied due to temporary reduced capacity",
            "status": decision.status,
            "detail": f"The service is at capacity. Retry in {retry_after(decision)} seconds.",
            "violated-policies": violated,
        }
    return json.dumps(problem, separators=(",", ":")).encode()
