"""Header fields and refusal bodies (draft-ietf-httpapi-ratelimit-headers).

`RateLimit-Policy` is static per rule and built once; `RateLimit` carries the
current state of each limit. Refusals are `application/problem+json` with the
draft's problem types. Policy names come from configuration only.
"""

from __future__ import annotations

import json
import math

from ..policy.engine import SKIPPED, Decision, reset_after
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


def ratelimit_header(decision: Decision) -> bytes:
    """The `RateLimit` field value: remaining quota and reset time per limit.

    Read straight from the backend's results (no per-limit state objects):
    this runs on every admitted request.
    """
    parts = []
    for lim, name, r in zip(decision.rule.limits, decision.names, decision.results, strict=True):
        if r is None or r is SKIPPED:
            continue
        if lim.__class__ is Concurrency:
            parts.append(f'"{name}";r={r.remaining}')
        else:
            t = reset_after(lim, r)
            parts.append(f'"{name}";r={r.remaining};t={max(0, math.ceil(t - 1e-9))}')
    return ", ".join(parts).encode("ascii")


def retry_after(decision: Decision) -> int:
    """`Retry-After` in whole seconds, at least 1, never earlier than the true time."""
    return max(1, seconds(decision.retry_after))


def refusal_headers(decision: Decision, policy: bytes) -> Headers:
    """Headers every refusal carries, whatever renders its body."""
    headers: Headers = [(b"retry-after", str(retry_after(decision)).encode())]
    if policy:
        headers.append((b"ratelimit-policy", policy))
    value = ratelimit_header(decision)
    if value:
        headers.append((b"ratelimit", value))
    return headers


def problem_body(decision: Decision) -> bytes:
    """The problem+json body of a refusal."""
    violated = decision.violated
    if decision.status == 429:
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
