"""Rules whose keys live on several hash slots: one script call per slot, undone on refusal.

A Redis Cluster runs a script only on keys of one slot. A rule's per-caller
keys share a hash tag, its shared (`*`) keys another, so a rule is decided in
a call per slot; if a later slot refuses, the slots before it are refunded (a
saga, not a transaction): between a slot's admission and its refund, another
request may see those units taken. Every result still describes the untouched
state of its check, as the protocol requires: slots other than the refusing
one are re-read in a dry run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..._errors import BackendError
from ..base import Check, CheckResult, Entry, QueueCheck, Verdict
from .calls import Calls, parse_decide, parse_enqueue
from .guard import Guard

logger = logging.getLogger("ratelimit")

#: Indices of a rule's checks, one list per script call.
Groups = list[list[int]]


class Slots:
    """Runs a rule's checks slot by slot (`split`), or all in one call."""

    def __init__(self, guard: Guard, calls: Calls, *, split: bool) -> None:
        self.guard = guard
        self.calls = calls
        self.split = split
        #: Refunds of cancelled callers, running on (referenced until done).
        self._refunds: set[asyncio.Task[Any]] = set()

    def groups(self, checks: Sequence[Check]) -> Groups:
        """Indices of `checks` per script call: per hash slot when split, else all in one."""
        if not self.split:
            return [list(range(len(checks)))]
        by_slot: dict[int, list[int]] = {}
        slot = self.calls.keys.slot
        for i, check in enumerate(checks):
            by_slot.setdefault(slot(check.key), []).append(i)
        return list(by_slot.values())

    async def decide(self, checks: Sequence[Check], groups: Groups) -> Verdict:
        """Decide slot by slot; if one refuses, refund the slots before it."""
        results: list[CheckResult | None] = [None] * len(checks)
        for g, group in enumerate(groups):
            async with self._undone_on_failure(checks, groups[:g]):
                verdict = await self._decide(checks, group, results)
            if verdict:
                continue
            await self.refund(checks, groups[:g])
            for other in groups[:g] + groups[g + 1 :]:
                await self._decide(checks, other, results, commit="0")
            return _verdict(False, results)
        return _verdict(True, results)

    async def refund(self, checks: Sequence[Check], groups: Groups) -> None:
        """Give back what admitted calls of `groups` took, one refund.lua call per slot.

        Every slot is tried; if one fails, its error is raised after the others,
        with the indices of the checks whose slots took it (`BackendError.applied`).
        """
        applied: list[int] = []
        failed: BackendError | None = None
        for group in groups:
            keys, args = self.calls.refund_args([checks[i] for i in group])
            if keys:
                try:
                    await self.guard.call(self.calls.scripts.refund, keys, args)
                except BackendError as exc:
                    failed = failed or exc
                    continue
            applied += group
        if failed is not None:
            failed.applied = tuple(sorted(applied))
            raise failed

    async def refund_quietly(self, checks: Sequence[Check], groups: Groups) -> None:
        """Best effort: undo slots already admitted when a later slot failed to answer.

        What cannot be refunded (its node down too) comes back by itself: leases
        expire within their ttl, bucket units refill.
        """
        for group in groups:
            try:
                await self.refund(checks, [group])
            except BackendError as exc:  # debug: an outage must not log once per request
                logger.debug("ratelimit: could not refund a slot after a failure (%s)", exc)

    @contextlib.asynccontextmanager
    async def _undone_on_failure(
        self, checks: Sequence[Check], taken: Groups
    ) -> AsyncIterator[None]:
        """Around a slot's call: if it fails, or its caller is cancelled, the slots
        `taken` before it are refunded (a cancelled caller does not wait for that)."""
        try:
            yield
        except BackendError:
            await self.refund_quietly(checks, taken)
            raise
        except asyncio.CancelledError:
            self._refund_later(checks, taken)
            raise

    def _refund_later(self, checks: Sequence[Check], groups: Groups) -> None:
        """A cancelled caller keeps nothing it took: its admitted slots are refunded in
        the background (the cancellation does not wait for Redis)."""
        if groups:
            task = asyncio.ensure_future(self.refund_quietly(list(checks), list(groups)))
            self._refunds.add(task)
            task.add_done_callback(self._refunds.discard)

    async def enqueue(
        self, checks: Sequence[Check], groups: Groups, index: int, queue: QueueCheck
    ) -> tuple[Entry, str]:
        """`enqueue` across hash slots: other slots first (consuming), the lease's last.

        If a slot refuses, or the lease's slot neither admits nor queues, the
        slots that consumed are refunded.
        """
        if len(groups) == 1:
            return await self.enqueue_one(checks, index, queue)
        home = next(group for group in groups if index in group)
        others = [group for group in groups if group is not home]
        results: list[CheckResult | None] = [None] * len(checks)
        done: Groups = []
        for group in others:
            async with self._undone_on_failure(checks, done):
                verdict = await self._decide(checks, group, results)
            if not verdict:
                await self._undo(checks, done, results)
                await self._decide(checks, home, results, commit="0")
                for group_left in others[len(done) + 1 :]:
                    await self._decide(checks, group_left, results, commit="0")
                length = await self.queue_length(queue)
                return Entry("refused", _verdict(False, results), -1, length), ""
            done.append(group)
        async with self._undone_on_failure(checks, done):
            entry, member = await self.enqueue_one(
                [checks[i] for i in home], home.index(index), queue
            )
        for i, result in zip(home, entry.verdict.results, strict=True):
            results[i] = result
        if entry.outcome not in ("admitted", "queued"):
            await self._undo(checks, done, results)
        admitted = entry.outcome == "admitted"
        return entry._replace(verdict=_verdict(admitted, results)), member

    async def enqueue_one(
        self, checks: Sequence[Check], index: int, queue: QueueCheck
    ) -> tuple[Entry, str]:
        """One enqueue.lua call for `checks` (one slot), queued lease `checks[index]`."""
        keys, args = self.calls.enqueue_args(checks, index, queue)
        reply = await self.guard.call(self.calls.scripts.enqueue, keys, args)
        return parse_enqueue(reply, checks)

    async def queue_length(self, queue: QueueCheck) -> int:
        """Requests waiting in the line of `queue`'s lease (live tickets)."""
        key = self.calls.keys.queue(queue.lease.key)[1]
        return int(await self.guard.call(self.calls.scripts.queue_length, [key], []))

    async def _decide(
        self,
        checks: Sequence[Check],
        group: list[int],
        results: list[CheckResult | None],
        *,
        commit: str = "1",
    ) -> bool:
        """decide.lua over `group` of `checks` (a dry run with `commit` "0"); the verdict,
        each result put in `results`."""
        some = [checks[i] for i in group]
        keys, args = self.calls.decide_args(some, commit)
        reply = await self.guard.call(self.calls.scripts.decide, keys, args)
        verdict, group_results = parse_decide(reply, some if commit == "1" else ())
        for i, result in zip(group, group_results, strict=True):
            results[i] = result
        return verdict

    async def _undo(
        self, checks: Sequence[Check], groups: Groups, results: list[CheckResult | None]
    ) -> None:
        """Refund slots that consumed, then report their untouched state (a dry run)."""
        for group in groups:
            await self.refund(checks, [group])
            await self._decide(checks, group, results, commit="0")


def _verdict(admitted: bool, results: list[CheckResult | None]) -> Verdict:
    return Verdict(admitted, tuple(r for r in results if r is not None))
