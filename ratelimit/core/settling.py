"""Settling an admitted request at its actual cost (see `Decision.settle`).

At admission a request reserves its estimated cost in every bucket and window
of its rule; `settle` moves each to the units the actual cost gives it: the
excess goes back, a shortfall is charged past the limit (a debt later
requests wait out). One `Backend.refund` call carries every change (a
negative cost charges), one script call per hash slot on Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, TypeAlias

from .._errors import BackendError, ConfigError
from ..backends.base import Backend, BucketCheck, Check, WindowCheck, nowait_method
from ..policy.costs import Cost, check_cost, settled
from ..policy.limits import Window
from ..policy.quotas import Quota
from .decision import Decision, EngineObserver
from .plan import Plan

logger = logging.getLogger("ratelimit")


#: What a settlement changes: the units of a bucket or a window (never a lease).
Change: TypeAlias = "BucketCheck | WindowCheck"


def changes(
    decision: Decision, actual: Cost, current: Plan | None = None
) -> tuple[tuple[Check, ...], list[Change], list[int], Cost]:
    """What settling `decision` at `actual` takes: its checks at their new units, the
    changes to send (each check's cost the units to give back), the index among the
    checks of each change, and the settled cost.

    `current` is the rule's plan in force now, if an override swapped the one that
    decided: a window's change is sent with its period and kind, as the decisions
    made since read the window (on the old period, a sliding window's state was
    rewritten for another index, and a fixed one read as closed was deleted, each
    forgetting every unit taken since). A bucket's keeps the interval its units were
    taken at: that is the time they hold.

    ConfigError for an `actual` that is not a cost, or lacks a dimension counted
    that was not reserved either.

    A moving window is charged at most its `limit` more than the request holds: it
    keeps one entry per unit, all of one charge at one instant, so a charge of its
    limit refuses everything for a whole period, as any larger one would; a larger
    one only cost the store time and memory (10**8 units held Redis for 40 s).
    """
    plan = decision._plan
    try:
        cost = settled(decision.cost, check_cost(actual))
        taken = plan.units(cost)
    except ValueError as exc:
        raise ConfigError("actual", str(exc), actual) from None
    held: list[Check] = []
    sent: list[Change] = []
    where: list[int] = []
    for check in decision.checks:
        if isinstance(check, (BucketCheck, WindowCheck)):
            units = taken[plan.positions[check.key.limit]]
            if isinstance(check, WindowCheck) and check.strategy == "moving":
                units = min(units, check.cost + check.limit)
            if units != check.cost:
                change: Change | None = check._replace(cost=check.cost - units)
                if isinstance(change, WindowCheck) and current is not None:
                    change = _as_now(change, current)
                if change is not None:
                    sent.append(change)
                    where.append(len(held))
                check = check._replace(cost=units)
        held.append(check)
    return tuple(held), sent, where, cost


def _as_now(check: WindowCheck, current: Plan) -> WindowCheck | None:
    """`check` with the period and kind its limit has in `current` (if it still has it);
    None for units to give back to a sliding window whose period changed: its counts
    are by period index, so the new period counted afresh, without them."""
    i = current.positions.get(check.key.limit)
    if i is None or not isinstance(current.limits[i], (Window, Quota)):
        return check
    _, period, strategy = current.params[i][0]
    if strategy == "sliding" and period != check.period and check.cost > 0:
        return None
    return check._replace(period=period, strategy=strategy)


class Settlements:
    """Sends settlements to one backend (an engine's): each in one `refund` call (done
    synchronously by an in-process store; a remote store's in a task of its own,
    shielded from the caller's cancellation), its outcome told to `observer`."""

    def __init__(
        self,
        backend: Backend,
        observer: EngineObserver | None,
        running: set[asyncio.Task[Any]],
    ) -> None:
        self.backend = backend
        self.observer = observer
        #: Settlements in flight (the engine's background work: `aclose` awaits them).
        self.running = running
        #: The backend's synchronous refund, if it has one (see `NowaitBackend`).
        self._nowait = nowait_method(backend, "refund")

    async def settle(self, decision: Decision, actual: Cost, current: Plan | None) -> bool:
        """Settle `decision` at `actual`; False (logged) if the backend failed. `current`
        is the rule's plan in force now (see `changes`).

        The decision takes its new units before the call, so a settle made meanwhile
        counts from them; the checks whose change the store did not take (all, or
        those of the hash slots that failed: `BackendError.applied`) get back what
        they had, unless another settle changed them since, so settling again sends
        exactly what is missing. A remote store's call is shielded: a request cancelled as
        it settles (its client left mid-stream, and anyio cancels every await of the
        app's `finally`) still has its settlement reach the store, then the
        cancellation goes on. An in-process store answers without suspending, so
        nothing can cancel it.
        """
        before = decision.checks
        held, sent, where, cost = changes(decision, actual, current)
        decision.checks, decision.cost = held, cost
        if not sent:
            return True

        def landed(error: Exception | None) -> bool:
            applied: Sequence[int] = range(len(sent))
            if error is not None:
                logger.warning(
                    "settling rule %r failed; the reservation stands where it did not land",
                    decision.rule.name,
                    exc_info=error,
                )
                applied = error.applied if isinstance(error, BackendError) else ()
                if decision.checks is held:
                    kept = list(held)
                    for k, i in enumerate(where):
                        if k not in applied:
                            kept[i] = before[i]
                    decision.checks = tuple(kept)
            if self.observer is not None:
                for k in applied:
                    check = sent[k]
                    self.observer.on_settle(check.key.rule, check.key.limit, -check.cost)
            return error is None

        if self._nowait is not None:
            try:
                self._nowait(sent)
            except Exception as exc:
                return landed(exc)
            return landed(None)

        async def send() -> bool:
            try:
                await self.backend.refund(sent)
            except Exception as exc:
                return landed(exc)
            return landed(None)

        task = asyncio.ensure_future(send())
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return await asyncio.shield(task)
