"""Header fields and refusal bodies (draft-ietf-httpapi-ratelimit-headers).

`RateLimit-Policy` is static per rule and built once; `RateLimit` carries the
current state of each limit. Refusals are `application/problem+json` with the
draft's problem types. Policy names come from configuration only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence

from ..algorithms import calendar
from ..backends.base import CheckResult
from ..core.decision import OVERSIZED, BlockedDecision, Decision
from ..core.plan import SKIPPED, BlockedPlan, Plan, reset_time
from ..policy.limits import Concurrency, Limit, TokenBucket, Window
from ..policy.quotas import Quota
from ..policy.rules import Rule

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"

Headers = list[tuple[bytes, bytes]]


def policy_item(
    name: str, limit: Limit, *, blocked: bool = False, now: float | None = None
) -> str:
    """One `RateLimit-Policy` list member for `limit` (quota 0 while an operator blocks it;
    a calendar quota's `w`: the length of its period at unix time `now`, default the
    current one)."""
    if isinstance(limit, Concurrency):
        return f'"{name}";q={0 if blocked else limit.limit};qu="concurrent-requests"'
    if isinstance(limit, Quota):
        start, end = calendar.bounds(limit.per, time.time() if now is None else now)
        return f'"{name}";q={0 if blocked else limit.amount};w={end - start}'
    assert isinstance(limit, (TokenBucket, Window))
    return f'"{name}";q={0 if blocked else limit.item.amount};w={int(limit.item.get_expiry())}'


def policy_header(rule: Rule, *, blocked: bool = False, now: float | None = None) -> bytes:
    """The `RateLimit-Policy` field value of a rule; every quota is 0 while `blocked`
    (a calendar quota's period is the one at unix time `now`)."""
    items = [
        policy_item(n, lim, blocked=blocked, now=now)
        for n, lim in zip(rule.limit_names(), rule.limits, strict=True)
    ]
    return ", ".join(items).encode("ascii")


def policy_stale_at(rule: Rule, now: float | None = None) -> float:
    """When the rule's `RateLimit-Policy` changes (a monthly quota's `w`: at the month's
    end, unix time); 0.0 if it never does."""
    ends = [
        calendar.bounds("month", time.time() if now is None else now)[1]
        for lim in rule.limits
        if isinstance(lim, Quota) and lim.per == "month"
    ]
    return float(min(ends)) if ends else 0.0


def should_retry(decision: Decision) -> bool:
    """False when a refusing limit is a spent budget (`Limit.should_retry`, a `Quota`):
    the client should not retry before `Retry-After`; or when no retry would ever be
    admitted (`OVERSIZED`: more of a weighted pool than it has)."""
    if decision.reason == OVERSIZED:
        return False
    return all(
        s.limit.should_retry for s in decision.states if not (s.admitted or s.exempt or s.skipped)
    )


def seconds(value: float) -> int:
    """Whole seconds, rounded up: a client that waits this long is never early."""
    return max(0, math.ceil(value - 1e-9))


#: Renders one limit's part of the `RateLimit` field from a decision's results (b"" if
#: the limit was skipped).
_Part = Callable[[Sequence[CheckResult | None]], bytes]


class RateLimitField:
    """The `RateLimit` field of one rule, compiled: a renderer per limit.

    Built once per rule; `render` runs on every admitted request, so each
    limit's part fills a `%d` byte template instead of formatting strings and
    reads the backend's raw result positionally, without per-limit state
    objects. A rule of one limit renders with that limit's part alone: the
    commonest case pays no loop, list or join. Tests hold the bytes equal to
    `ratelimit_header`'s.
    """

    __slots__ = ("_parts", "render", "stale_at")

    def __init__(self, rule: Rule) -> None:
        #: When the rule's policy field must be compiled again (see `policy_stale_at`).
        self.stale_at = policy_stale_at(rule)
        self._parts = tuple(
            _part(i, name, lim)
            for i, (name, lim) in enumerate(zip(rule.limit_names(), rule.limits, strict=True))
        )
        #: The field value for one decision's results (`Decision.results`).
        self.render: _Part = self._parts[0] if len(self._parts) == 1 else self._render_all

    def _render_all(self, results: Sequence[CheckResult | None]) -> bytes:
        out = []
        for part in self._parts:  # a loop, not a comprehension: cheaper on Python 3.11
            text = part(results)
            if text:
                out.append(text)
        return b", ".join(out)


def _part(i: int, name: str, limit: Limit) -> _Part:
    """The renderer of `limit`'s part, the `i`-th result of a decision."""
    if limit.__class__ is Concurrency:
        slots = f'"{name}";r=%d'.encode("ascii")

        def render_slots(results: Sequence[CheckResult | None]) -> bytes:
            r = results[i]
            return b"" if r is None or r is SKIPPED else slots % r[1]

        return render_slots
    timed = f'"{name}";r=%d;t=%d'.encode("ascii")
    reset = reset_time(limit)

    def render_timed(results: Sequence[CheckResult | None]) -> bytes:
        r = results[i]
        if r is None or r is SKIPPED:
            return b""
        whole = math.ceil(reset(r) - 1e-9)  # `seconds`, inlined
        return timed % (r[1], whole if whole > 0 else 0)

    return render_timed


#: A rule's header fields, compiled: the rule, its `RateLimit-Policy` field, its `RateLimit`.
Compiled = tuple[Rule, tuple[bytes, bytes], RateLimitField]

#: The key of the compiled fields in a plan's `derived`.
_DERIVED = "asgi.fields"


def compiled(plan: Plan, rule: Rule) -> Compiled:
    """The header fields of `rule`, decided by `plan`'s engine, compiled once per plan.

    The policy describes the plan's rule (the effective rule of that name, as the
    client was told); the `RateLimit` field comes from the rule that decided (the
    `local` engine's scaled copies are compiled anew, not kept). An override swaps
    the plan, and what was compiled from it goes with it, as does a monthly quota's
    period when it ends.
    """
    fields: Compiled | None = plan.derived.get(_DERIVED) if plan.rule is rule else None
    if fields is not None and 0.0 < fields[2].stale_at <= time.time():
        fields = None  # a monthly quota's period ended: its `w` changed
    if fields is None:
        blocked = isinstance(plan, BlockedPlan)
        fields = (
            rule,
            (b"ratelimit-policy", policy_header(plan.rule, blocked=blocked)),
            RateLimitField(rule),
        )
        if plan.rule is rule:
            plan.derived[_DERIVED] = fields
    return fields


def admitted_fields(
    fields: Compiled, results: Sequence[CheckResult | None]
) -> tuple[tuple[bytes, bytes], ...]:
    """The header fields of an admitted request: none when every limit was exempt
    (no quota applied to it, so no empty `RateLimit` field)."""
    value = fields[2].render(results)
    return (fields[1], (b"ratelimit", value)) if value else ()


def retry_after(decision: Decision) -> int:
    """`Retry-After` in whole seconds, at least 1, never earlier than the true time."""
    return max(1, seconds(decision.retry_after))


def refusal_headers(
    decision: Decision, policy: bytes, field: RateLimitField | None = None
) -> Headers:
    """Headers every refusal carries, whatever renders its body. A request that can
    never be admitted (`OVERSIZED`) gets no `Retry-After`: no time would be true."""
    headers: Headers = []
    if decision.reason != OVERSIZED:
        headers.append((b"retry-after", str(retry_after(decision)).encode()))
    if not should_retry(decision):
        headers.append((b"x-should-retry", b"false"))
    if policy:
        headers.append((b"ratelimit-policy", policy))
    field = RateLimitField(decision.rule) if field is None else field
    value = field.render(decision.results)
    if value:
        headers.append((b"ratelimit", value))
    return headers


#: The draft's problem types and their titles.
_TITLES = {
    QUOTA_EXCEEDED: "Request cannot be satisfied as assigned quota has been exceeded",
    REDUCED_CAPACITY: "Request cannot be satisfied due to temporary reduced capacity",
}


def problem_body(decision: Decision) -> bytes:
    """The problem+json body of a refusal."""
    if isinstance(decision, BlockedDecision):
        # An operator's block: their words, or a plain statement of it.
        kind = REDUCED_CAPACITY
        detail = decision.message or "This endpoint is closed by its operator for now."
    elif decision.reason == OVERSIZED:
        kind = QUOTA_EXCEEDED if decision.status == 429 else REDUCED_CAPACITY
        detail = "This request needs more capacity than the limit has; it is never admitted."
    elif decision.status == 429:
        kind, detail = QUOTA_EXCEEDED, f"Retry in {retry_after(decision)} seconds."
    else:
        kind = REDUCED_CAPACITY
        detail = f"The service is at capacity. Retry in {retry_after(decision)} seconds."
    problem = {
        "type": kind,
        "title": _TITLES[kind],
        "status": decision.status,
        "detail": detail,
        "violated-policies": decision.violated,
    }
    return json.dumps(problem, separators=(",", ":")).encode()


#: Headers and body of a 503 when the store failed and the rule fails "closed".
FAILED_CLOSED: tuple[Headers, bytes] = (
    [(b"retry-after", b"1"), (b"content-type", b"application/problem+json")],
    b'{"type":"https://iana.org/assignments/http-problem-types#temporary-reduced-capacity",'
    b'"title":"Request cannot be satisfied due to temporary reduced capacity","status":503,'
    b'"detail":"The rate limiter cannot reach its store; failing closed."}',
)
