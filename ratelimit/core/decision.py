"""What the engine answers: a `Decision`, and the `Grant` of an admitted one.

A refusal is a value, not an exception: the middleware answers it, and
`Limiter.check` returns it. `Given` is what a caller without a request gives
instead of a scope (see `core.Limiter`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from .._errors import RateLimitError
from ..backends.base import Check, CheckResult, LeaseCheck
from ..policy.costs import Cost
from ..policy.rules import Rule
from .plan import BLOCK_RETRY_AFTER, SKIPPED, BlockedPlan, LimitState, Plan


@dataclass(slots=True)
class Grant:
    """The concurrency leases an admitted request holds; released exactly once."""

    leases: tuple[LeaseCheck, ...]
    released: bool = False
    #: When the slots were taken (monotonic), for the service-time estimate.
    started: float = 0.0
    #: The plan whose limits the leases belong to.
    plan: Plan | None = None


#: Reasons a request that tried the waiting line was refused (`Decision.reason`).
QUEUE_FULL, TOO_LONG, QUEUE_TIMEOUT, SHED, ABANDONED = (
    "queue_full",
    "too_long",
    "queue_timeout",
    "shed",
    "abandoned",
)

#: `Decision.reason` of a request that needs more of a weighted `Concurrency` limit's
#: slots than it has: no retry would admit it (its refusal carries no Retry-After).
OVERSIZED = "oversized"

#: Called with nothing; completes when the client has gone away (see `Engine.decide`).
Abandon = Callable[[], Awaitable[object]]


class Settler(Protocol):
    """What settles an admitted decision's cost: the engine that decided it."""

    async def settle(self, decision: Decision, actual: Cost) -> bool: ...


class Given(NamedTuple):
    """What a caller without a request gives `Engine.decide` instead of a scope's answers
    (see `core.Limiter`): the key functions, cost, priority and deadline are not asked.
    """

    #: Caller text per limit of the rule (None: exempt). A `keys.GLOBAL` limit keeps
    #: its one key; its text is the fair key of its line, if the limit has `fair_key`.
    keys: tuple[str | None, ...]
    #: What the request costs: units of `requests`, or units per dimension.
    cost: Cost
    #: The class in each waiting line (see `Concurrency.rank`); None: no class.
    priority: object = None
    #: Seconds to wait in line at most (the limit's `timeout` if shorter); None: that.
    timeout: float | None = None


class Decision:
    """The answer for one request: admitted or refused, and why.

    Per-limit `states` are built on first use: the admitted hot path only
    needs the raw backend results, which the header fields read directly.
    """

    __slots__ = (
        "_plan",
        "_settler",
        "_states",
        "allowed",
        "checks",
        "cost",
        "grant",
        "line",
        "reason",
        "results",
        "retry_after",
        "rule",
        "status",
        "waited",
    )

    def __init__(
        self,
        rule: Rule,
        allowed: bool,
        status: int,
        retry_after: float,
        plan: Plan,
        results: list[CheckResult | None],
        grant: Grant | None = None,
        checks: Sequence[Check] = (),
        cost: Cost = 1,
        settler: Settler | None = None,
    ) -> None:
        self.rule = rule
        self.allowed = allowed
        #: 200 when allowed; 429 (the caller's own quota) or 503 (shared capacity) when refused.
        self.status = status
        #: Seconds to wait before retrying (0 when allowed), spread among callers refused
        #: together (see `core.spread`); `math.inf` when a rate limit can never admit it.
        self.retry_after = retry_after
        self.grant = grant
        #: What an admitted decision took from the backend, at the units it holds now
        #: (see `settle`; `Engine.refund`).
        self.checks = checks
        #: What the request costs as reserved (or last settled): units of `requests`, or
        #: units per dimension.
        self.cost = cost
        self._settler = settler
        #: The backend's answer per limit of the rule; None: exempt; SKIPPED: not decided.
        self.results = results
        self._plan = plan
        self._states: tuple[LimitState, ...] | None = None
        #: Seconds spent in a waiting line; None if the request never waited.
        self.waited: float | None = None
        #: The name of the limit whose line the request joined; None if it joined none.
        self.line: str | None = None
        #: Why a request that went for the line was refused (QUEUE_FULL, TOO_LONG,
        #: QUEUE_TIMEOUT, SHED, ABANDONED), or that it never can be admitted
        #: (OVERSIZED); None otherwise.
        self.reason: str | None = None

    async def settle(self, actual: Cost) -> bool:
        """Charge what the admitted request really cost: `actual` units of `requests`, or
        units per dimension (those left out keep what was reserved). A cost given per
        dimension is settled per dimension: an int is then a ConfigError, as is an
        `actual` that is not a cost.

        The difference from what it holds now is given back, or charged past the
        limits (a debt later requests wait out), in one atomic step per store hash
        slot on the store's clock; a window's units go to the window they were
        taken in. May be called again (each call sets the total). Concurrency slots
        are not changed. False if the backend failed (logged; the reservation
        stands where the call did not land); True otherwise, also when nothing was
        reserved (a refusal, an exempt or failed-open request).
        """
        if self._settler is None or not self.checks:
            return True
        return await self._settler.settle(self, actual)

    @property
    def states(self) -> tuple[LimitState, ...]:
        """How each limit of the rule stood, in the rule's order."""
        if self._states is None:
            self._states = self._plan.states(self.results)
        return self._states

    @property
    def names(self) -> tuple[str, ...]:
        """The policy name of each limit of the rule."""
        return self._plan.names

    @property
    def violated(self) -> list[str]:
        """Names of the limits that refused."""
        return [s.name for s in self.states if not s.admitted and not s.exempt and not s.skipped]

    def __repr__(self) -> str:
        return (
            f"Decision(rule={self.rule.name!r}, allowed={self.allowed}, status={self.status}, "
            f"retry_after={self.retry_after:.3f})"
        )


class BlockedDecision(Decision):
    """A refusal by an operator's block: 503, the operator's `message`, no limit consulted.

    Its `Retry-After` is the time until the block lapses, at most
    `BLOCK_RETRY_AFTER` (a block "until cleared" says that much).
    """

    __slots__ = ("block", "message")

    def __init__(self, plan: BlockedPlan) -> None:
        block = plan.block
        wait = BLOCK_RETRY_AFTER
        if block.expires_at is not None:
            # A hint on this process's clock; the store's decides when the block lapses.
            wait = min(wait, max(1.0, block.expires_at - time.time()))
        super().__init__(plan.rule, False, 503, wait, plan, [SKIPPED] * plan.size)
        self.block = block
        #: What the refused caller reads (None: the standard text).
        self.message = block.message


class EngineObserver(Protocol):
    """What an engine tells its observer (see `core.Observer`, which extends it)."""

    def on_release(self, grant: Grant) -> None:
        """`grant`'s slots were released (metrics count the slots in flight)."""
        ...

    def on_queue(self, rule: str, limit: str, delta: int) -> None:
        """A request joined (+1) or left (-1) the line of `limit` of `rule`."""
        ...

    def on_settle(self, rule: str, limit: str, units: int) -> None:
        """A settlement charged `units` more (negative: gave them back) to `limit` of `rule`."""
        ...


#: `Decision.reason` of a decision the rule's fail policy made (the backend failed).
FAILED_OPEN, FAILED_CLOSED = "failed_open", "failed_closed"


class FailedDecision(Decision):
    """The backend failed and the rule's `fail` policy answered: "open" admits (holding
    nothing), "closed" refuses with 503. `error` is the backend's exception."""

    __slots__ = ("error",)

    def __init__(self, plan: Plan, admit: bool, error: BaseException) -> None:
        if admit:
            super().__init__(plan.rule, True, 200, 0.0, plan, [None] * plan.size)
        else:
            super().__init__(plan.rule, False, 503, 1.0, plan, [SKIPPED] * plan.size)
        self.reason = FAILED_OPEN if admit else FAILED_CLOSED
        self.error = error


class RateLimited(RateLimitError):
    """`Limiter.acquire` was refused: its block did not run and holds nothing.

    `retry_after` is the seconds to wait before trying again (`math.inf`: never,
    the cost is more than a rate limit can hold); `decision` says
    which limits refused (`decision.violated`, `decision.states`) and, for a
    request that waited in line, why it left it (`decision.reason`). A refusal
    because the backend failed and the rule fails "closed" has status 503 and
    reason "failed_closed", with the backend's error as `__cause__`.
    """

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.retry_after = decision.retry_after
        why = decision.reason or ", ".join(decision.violated) or "refused"
        super().__init__(
            f"rule {decision.rule.name!r}: {why} ({decision.status}); "
            f"retry after {decision.retry_after:.3g} s"
        )
