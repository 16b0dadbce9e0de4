"""Waiting in line for a concurrency slot, and estimating how long a wait is.

When the only refusal of a rule is a full concurrency limit with a `queue`,
the request joins the backend's line for it (its other limits stay consumed
meanwhile, and are refunded if it is refused in the end). It leaves the line
when granted, refused, timed out, shed, or when the client goes away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial

from .._types import Scope
from ..algorithms import queue
from ..backends.base import Check, CheckResult, LeaseCheck, QueueBackend, QueueCheck
from ..policy.keys import digest
from ..policy.limits import Concurrency
from .asking import client_timeout
from .decision import (
    ABANDONED,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    SHED,
    TOO_LONG,
    Abandon,
    EngineObserver,
    Given,
)
from .holding import Holding
from .plan import Plan

logger = logging.getLogger("ratelimit")

#: Where a check waits: (limit index in the rule, rank, fair key text or None).
Where = tuple[int, int, str | None]


class Lines:
    """An engine's way into its backend's waiting lines."""

    def __init__(self, holding: Holding, observer: EngineObserver | None) -> None:
        self.holding = holding
        self.observer = observer

    def estimate(self, plan: Plan, i: int, position: int) -> float:
        """Seconds until limit `i` has a slot for the waiter at `position` (0: next), from
        the observed service time; 0 before any slot was released."""
        service = self.holding.service.get((plan.rule.name, i), 0.0)
        if service <= 0:
            return 0.0
        limit = plan.limits[i]
        assert isinstance(limit, Concurrency)
        return queue.estimate_wait(position, limit.limit, service)

    async def line_up(
        self,
        plan: Plan,
        scope: Scope,
        checks: list[Check],
        k: int,
        where: Where,
        abandon: Abandon | None,
        given: Given | None = None,
    ) -> tuple[bool, Sequence[CheckResult], str | None, float | None]:
        """Wait in line for check `k`'s slot: (admitted, results, reason, seconds waited).

        `where` is (limit index, rank, fair key text or None), asked before deciding.
        """
        i, rank, fair_text = where
        limit = plan.limits[i]
        assert isinstance(limit, Concurrency)
        lease = checks[k]
        assert isinstance(lease, LeaseCheck)
        holding = self.holding
        backend = holding.backend
        assert isinstance(backend, QueueBackend)
        timeout = limit.timeout
        asked = client_timeout(scope, limit.deadline_header) if given is None else given.timeout
        if asked is not None and asked < timeout:
            timeout = asked
        service = holding.service.get((plan.rule.name, i), 0.0)
        fair = "" if fair_text is None else digest(fair_text)
        line = QueueCheck(
            lease,
            limit.queue,
            rank,
            fair,
            limit.guaranteed,
            queue.max_position(timeout, limit.limit, service, limit.queue),
            # Appointments need to know who comes back (a fair key) and how fast slots free.
            service / limit.limit if fair else 0.0,
        )
        entry = await backend.enqueue(checks, line)
        outcome = entry.outcome
        if outcome == "admitted":
            return True, entry.verdict.results, None, None
        if outcome == "refused":
            return False, entry.verdict.results, None, None
        results = list(entry.verdict.results)
        if outcome != "queued":
            estimate = entry.retry_in or self.estimate(plan, i, entry.position)
            results[k] = results[k]._replace(retry_after=estimate)
            return False, results, QUEUE_FULL if outcome == "full" else TOO_LONG, None
        others = [check for j, check in enumerate(checks) if j != k]
        started = time.monotonic()
        self._changed(plan, i, 1)
        try:
            outcome = await self._await_slot(backend, line, timeout, abandon)
        except BaseException:
            if others:
                holding.spawn(backend.refund(others))
            raise
        finally:
            self._changed(plan, i, -1)
        waited = time.monotonic() - started
        if outcome == "granted":
            results[k] = CheckResult(True, 0, 0.0, 0.0)
            return True, results, None, waited
        if others:
            if outcome == ABANDONED:
                holding.spawn(backend.refund(others))
            else:
                try:
                    await backend.refund(others)
                except Exception as exc:  # the refusal stands; the quota stays taken
                    logger.warning("could not refund a refused waiter's quota (%r)", exc)
        reason = {"timeout": QUEUE_TIMEOUT, "shed": SHED}.get(outcome, ABANDONED)
        estimate = 0.0
        if reason != ABANDONED and line.spacing:
            try:
                estimate = await backend.appoint(line)
            except Exception as exc:  # the refusal stands; it carries the estimate instead
                logger.warning("could not book an appointment (%r)", exc)
        estimate = estimate or self.estimate(plan, i, max(0, entry.length - 1))
        results[k] = results[k]._replace(retry_after=estimate)
        return False, results, reason, waited

    async def _await_slot(
        self, backend: QueueBackend, line: QueueCheck, timeout: float, abandon: Abandon | None
    ) -> str:
        """The backend's `wait`, cut short (ABANDONED) when `abandon()` completes first."""
        if abandon is None:
            return await backend.wait(line, timeout)
        waiter = asyncio.ensure_future(backend.wait(line, timeout))
        gone = asyncio.ensure_future(abandon())
        try:
            await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            waiter.cancel()  # the backend's wait then leaves the line
            waiter.add_done_callback(partial(self._let_go_late, backend, line))
            raise
        finally:
            if not gone.done():
                gone.cancel()
            elif not gone.cancelled():
                gone.exception()  # retrieved: a receive that failed means the client is gone
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        try:
            await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled() or _cancelling():
                raise  # this task itself is being cancelled
        else:
            # The slot came just as the client left: give it back.
            if waiter.result() == "granted":
                self.holding.spawn(backend.release(line.lease))
        return ABANDONED

    def _let_go_late(
        self, backend: QueueBackend, line: QueueCheck, waiter: asyncio.Future[str]
    ) -> None:
        """Release a slot granted to a waiter whose request was cancelled meanwhile."""
        if not waiter.cancelled() and waiter.exception() is None and waiter.result() == "granted":
            self.holding.spawn(backend.release(line.lease))

    def _changed(self, plan: Plan, i: int, delta: int) -> None:
        if self.observer is not None:
            self.observer.on_queue(plan.rule.name, plan.names[i], delta)


def _cancelling() -> bool:
    """Whether the current task has been asked to cancel (Python 3.11+; False before)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False
