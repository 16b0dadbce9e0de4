"""Header fields and refusal bodies (draft-ietf-httpapi-ratelimit-headers-11).

`RateLimit-Policy` is static per rule and built once; `RateLimit` carries the
service limit of each limit: its available quota (`r`) and effective window
(`t`). Refusals carry `Retry-After` (never earlier than a refusing limit's `t`),
`retry-after-ms` and `x-should-retry` as the openai and anthropic SDKs read
them, and an `application/problem+json` body with the draft's problem types,
or an OpenAI-style error body (see `bodies`). Policy names come from
configuration only.
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
from ..policy.costs import BY_REQUESTS, describe
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
    current one). A limit counting other units than requests names them in `qu`
    (`qu="input_tokens"`, `qu="input_tokens+4*output_tokens"`; a weighted pool its slots'
    unit), so each dimension's policy reads on its own."""
    if isinstance(limit, Concurrency):
        unit = describe(limit.counts) if limit.weighted else "concurrent-requests"
        return f'"{name}";q={0 if blocked else limit.limit};qu="{unit}"'
    unit = "" if limit.counts is BY_REQUESTS else f';qu="{describe(limit.counts)}"'
    if isinstance(limit, Quota):
        start, end = calendar.bounds(limit.per, time.time() if now is None else now)
        return f'"{name}";q={0 if blocked else limit.amount};w={end - start}{unit}'
    assert isinstance(limit, (TokenBucket, Window))
    window = int(limit.item.get_expiry())
    return f'"{name}";q={0 if blocked else limit.item.amount};w={window}{unit}'


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
    """The `RateLimit` field of one rule, compiled: a renderer per limit, each giving
    its service limit, the available quota `r` and the effective window `t`.

    Built once per rule; `render` runs on every admitted request, so each
    limit's part fills a `%d` byte template instead of formatting strings and
    reads the backend's raw result positionally, without per-limit state
    objects. A rule of one limit renders with that limit's part alone: the
    commonest case pays no loop, list or join. Tests hold the bytes equal to
    `ratelimit_header`'s.
    """

    __slots__ = ("_parts", "_windows", "render", "stale_at")

    def __init__(self, rule: Rule) -> None:
        #: When the rule's policy field must be compiled again (see `policy_stale_at`).
        self.stale_at = policy_stale_at(rule)
        self._parts = tuple(
            _part(i, name, lim)
            for i, (name, lim) in enumerate(zip(rule.limit_names(), rule.limits, strict=True))
        )
        #: (index, effective-window formula) of each limit whose part has a `t`.
        self._windows = tuple(
            (i, reset_time(lim))
            for i, lim in enumerate(rule.limits)
            if not isinstance(lim, Concurrency)
        )
        #: The field value for one decision's results (`Decision.results`).
        self.render: _Part = self._parts[0] if len(self._parts) == 1 else self._render_all

    def refused_window(self, results: Sequence[CheckResult | None]) -> float:
        """The longest effective window (`t`, unrounded) among the limits that refused:
        a `Retry-After` must not end before it (draft-11, section 6)."""
        longest = 0.0
        for i, window in self._windows:
            r = results[i]
            if r is None or r is SKIPPED or r.admitted:
                continue
            t = window(r)
            if t > longest:
                longest = t
        return longest

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


#: A rule's extra header fields in a dialect (see `asgi.openai_style`): renders them from
#: a decision's results; None when the dialect has nothing to say about the rule.
DialectFields = Callable[[Sequence[CheckResult | None]], "Headers"]
#: Compiles a rule's dialect fields, by dialect name.
Dialect = tuple[str, Callable[[Rule], "DialectFields | None"]]
#: A rule's header fields, compiled: the rule, its `RateLimit-Policy` field, its
#: `RateLimit` field and its dialect fields (None without a dialect).
Compiled = tuple[Rule, tuple[bytes, bytes], RateLimitField, "DialectFields | None"]

#: The key of the compiled fields in a plan's `derived` (a dialect's name is appended).
_DERIVED = "asgi.fields"


def compiled(plan: Plan, rule: Rule, dialect: Dialect | None = None) -> Compiled:
    """The header fields of `rule`, decided by `plan`'s engine, compiled once per plan.

    The policy describes the plan's rule (the effective rule of that name, as the
    client was told); the `RateLimit` field comes from the rule that decided (the
    `local` engine's scaled copies are compiled anew, not kept). An override swaps
    the plan, and what was compiled from it goes with it, as does a monthly quota's
    period when it ends.
    """
    key = _DERIVED if dialect is None else f"{_DERIVED}.{dialect[0]}"
    fields: Compiled | None = plan.derived.get(key) if plan.rule is rule else None
    if fields is not None and 0.0 < fields[2].stale_at <= time.time():
        fields = None  # a monthly quota's period ended: its `w` changed
    if fields is None:
        blocked = isinstance(plan, BlockedPlan)
        fields = (
            rule,
            (b"ratelimit-policy", policy_header(plan.rule, blocked=blocked)),
            RateLimitField(rule),
            None if dialect is None else dialect[1](rule),
        )
        if plan.rule is rule:
            plan.derived[key] = fields
    return fields


def admitted_fields(
    fields: Compiled, results: Sequence[CheckResult | None]
) -> tuple[tuple[bytes, bytes], ...]:
    """The header fields of an admitted request: none when every limit was exempt
    (no quota applied to it, so no empty `RateLimit` field)."""
    value = fields[2].render(results)
    if not value:
        return ()
    extra = fields[3]
    if extra is None:
        return (fields[1], (b"ratelimit", value))
    return (fields[1], (b"ratelimit", value), *extra(results))


#: Longest wait (seconds) a refused client is told to retry after by default: past it,
#: `x-should-retry: false` (the SDKs' own backoff would retry far too early).
SHOULD_RETRY_WITHIN = 60.0


def told(decision: Decision, field: RateLimitField) -> float:
    """Seconds a refused caller is told to wait: the decision's (spread, see
    `core.spread`), never before the end of a refusing limit's effective window
    (draft-11, section 6); `math.inf` when it can never be admitted."""
    wait = decision.retry_after
    window = field.refused_window(decision.results)
    return window if window > wait else wait


def retry_seconds(wait: float) -> int:
    """`Retry-After` in whole seconds, at least 1, never earlier than `wait`."""
    return max(1, seconds(wait))


def retry_fields(wait: float, within: float = SHOULD_RETRY_WITHIN) -> Headers:
    """`Retry-After`, `retry-after-ms` and `x-should-retry` for a wait of `wait` seconds.

    The openai and anthropic SDKs read `retry-after-ms` first (a GCRA wait is
    often a fraction of a second), and obey `x-should-retry` exactly as
    `true`/`false`: false past `within` seconds, and with no `Retry-After` at
    all when the wait is `math.inf` (the request can never be admitted).
    """
    if wait == math.inf:
        return [(b"x-should-retry", b"false")]
    ms = math.ceil(wait * 1000 - 1e-6)
    return [
        (b"retry-after", b"%d" % retry_seconds(wait)),
        (b"retry-after-ms", b"%d" % (ms if ms > 1 else 1)),
        (b"x-should-retry", b"false" if wait > within else b"true"),
    ]


def refusal_headers(
    decision: Decision,
    policy: bytes,
    field: RateLimitField | None = None,
    within: float = SHOULD_RETRY_WITHIN,
    wait: float | None = None,
) -> Headers:
    """Headers every refusal carries, whatever renders its body (`wait`: `told`'s)."""
    field = RateLimitField(decision.rule) if field is None else field
    wait = told(decision, field) if wait is None else wait
    headers = retry_fields(wait, within if should_retry(decision) else -1.0)
    if policy:
        headers.append((b"ratelimit-policy", policy))
    value = field.render(decision.results)
    if value:
        headers.append((b"ratelimit", value))
    return headers


#: The draft's problem types and their titles.
_TITLES = {
    QUOTA_EXCEEDED: "Request cannot be satisfied as assigned quota has been exceeded",
    REDUCED_CAPACITY: "Request cannot be satisfied due to temporary reduced capacity",
}


def _in(wait: float) -> str:
    n = retry_seconds(wait)
    return f"Retry in {n} second{'' if n == 1 else 's'}."


def refusal_message(decision: Decision, wait: float) -> str:
    """What a refused caller reads, in any body: the operator's words for a block,
    else which limits refused and when to retry (the `Retry-After` it carries)."""
    if isinstance(decision, BlockedDecision):
        return decision.message or "This endpoint is closed by its operator for now."
    names = ", ".join(decision.violated) or decision.rule.name
    if wait == math.inf:
        return (
            f"This request needs more than {names} can ever hold: "
            "it is never admitted as sent; do not retry it."
        )
    if decision.status == 429:
        return f"Rate limit reached for {names}. {_in(wait)}"
    return f"The service is at capacity ({names}). {_in(wait)}"


def problem_body(decision: Decision, wait: float | None = None) -> bytes:
    """The problem+json body of a refusal (`wait`: `told`'s)."""
    if wait is None:
        wait = told(decision, RateLimitField(decision.rule))
    if isinstance(decision, BlockedDecision) or decision.status != 429:
        kind = REDUCED_CAPACITY
    else:
        kind = QUOTA_EXCEEDED
    problem = {
        "type": kind,
        "title": _TITLES[kind],
        "status": decision.status,
        "detail": refusal_message(decision, wait),
        "violated-policies": decision.violated,
    }
    return json.dumps(problem, separators=(",", ":")).encode()


#: What a caller refused because the store is unreachable (`fail="closed"`) reads.
FAILED_CLOSED_MESSAGE = "The rate limiter cannot reach its store; failing closed."


def failed_closed_problem() -> bytes:
    """The problem+json body of a `fail="closed"` refusal (built once per middleware)."""
    problem = {
        "type": REDUCED_CAPACITY,
        "title": _TITLES[REDUCED_CAPACITY],
        "status": 503,
        "detail": FAILED_CLOSED_MESSAGE,
    }
    return json.dumps(problem, separators=(",", ":")).encode()


def failed_closed_reply(
    within: float = SHOULD_RETRY_WITHIN,
    content_type: bytes = b"application/problem+json",
    body: bytes | None = None,
) -> tuple[Headers, bytes]:
    """Headers and body of a 503 when the store failed and the rule fails "closed"."""
    headers = [*retry_fields(1.0, within), (b"content-type", content_type)]
    return headers, failed_closed_problem() if body is None else body
