"""The values the metrics read off decisions and limits (no instruments here).

A decision's `outcome` label and the limit that decided it; a limit's
capacity and sustained rate for the `limit` gauges.
"""

from __future__ import annotations

from typing import Final

from ..core.decision import BlockedDecision, Decision
from ..policy.limits import Concurrency, Limit, TokenBucket, Window
from ..policy.quotas import Quota

#: Every value of the `outcome` label: exactly one per decided request.
OUTCOMES: Final = (
    "allowed",  # admitted without waiting
    "limited",  # 429: the caller's own quota is spent
    "rejected",  # 503: a shared limit (the service) is full, its line too (or too long)
    "failed_open",  # backend failed, request admitted
    "failed_closed",  # backend failed, request refused with 503
    "shadow_limited",  # shadow mode: would have been a 429; the request went on
    "shadow_rejected",  # shadow mode: would have been a 503; the request went on
    "blocked",  # 503 from an operator's block override
    "queued",  # admitted after waiting in line
    "queue_timeout",  # 503 after waiting its whole timeout
    "shed",  # 503: pushed out of a full line by a higher class
    "abandoned",  # the client left while waiting (no response sent)
    "invalid",  # 400: a key, cost or priority function failed; nothing consumed
    "shadow_invalid",  # shadow mode: the same, the request went on
)

#: Outcomes of requests that went on to the app (in shadow mode: would-be refusals).
ADMITTED: Final = frozenset(
    {"allowed", "queued", "failed_open", "shadow_limited", "shadow_rejected", "shadow_invalid"}
)

#: Outcomes of requests refused with 429, 503 or 400: every refusal the limiter sent.
REFUSED: Final = frozenset(
    {"limited", "rejected", "failed_closed", "blocked", "queue_timeout", "shed", "invalid"}
)

#: `outcome` of a refused decision by its `Decision.reason`.
REASON_OUTCOME: Final = {
    "queue_full": "rejected",
    "too_long": "rejected",
    "queue_timeout": "queue_timeout",
    "shed": "shed",
    "abandoned": "abandoned",
}


def capacity(limit: Limit) -> int:
    """Units a limit admits at once: its slots, its burst or its window's amount."""
    if isinstance(limit, Concurrency):
        return limit.limit
    if isinstance(limit, TokenBucket):
        return limit.burst
    if isinstance(limit, Window):
        return int(limit.item.amount)
    if isinstance(limit, Quota):
        return limit.amount
    return 0


def sustained_rate(limit: Limit) -> float | None:
    """Units per second a rate limit admits in the long run; None for Concurrency."""
    if isinstance(limit, TokenBucket):
        return 1.0 / limit.interval
    if isinstance(limit, Window):
        return limit.item.amount / float(limit.item.get_expiry())
    return None


def refusal_outcome(decision: Decision) -> str:
    """The `outcome` of a refusal decided by the limits (or an operator's block)."""
    if decision.__class__ is BlockedDecision:
        return "blocked"
    outcome = "limited" if decision.status == 429 else "rejected"
    return f"shadow_{outcome}" if decision.rule.shadow else outcome


def deciding_limit(decision: Decision) -> str:
    """The limit that set a refusal's status: a per-caller one for 429, a shared one for 503."""
    shared = decision.status != 429
    first = ""
    for s in decision.states:
        if not s.admitted and not s.exempt and not s.skipped:
            if s.limit.shared == shared:
                return s.name
            first = first or s.name
    return first
