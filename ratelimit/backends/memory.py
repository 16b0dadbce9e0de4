"""The in-process backend: the pure algorithms over dicts, on a monotonic clock.

Safe under asyncio concurrency without a lock: `decide` never awaits between
reading and writing state, so each decision is atomic on the event loop and
concurrent decisions are never serialised behind a lock held across an await.

Memory is bounded. A bucket whose state is back to full carries no
information and is dropped by an incremental sweep; past `max_keys` the (approximately)
least recently used bucket is dropped even if not full (its caller gets a fresh
bucket: memory stays bounded at the price of occasionally forgiving the
oldest idle caller). Lease tables are dropped when their last lease goes.
Window states are bounded by `max_keys` too (least recently used evicted).
Calendar quotas (`algorithms.calendar`) count UTC days and months, so they
alone read the wall clock (`wall_clock`); everything else, the monotonic one.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from .._errors import ConfigError
from .._types import Clock
from ..algorithms import calendar, gcra, leases, queue, window
from .base import (
    BucketCheck,
    Check,
    CheckResult,
    Entry,
    LeaseCheck,
    QueueCheck,
    StoreKey,
    Verdict,
    WindowCheck,
)
from .memory_stores import MemoryAdmin
from .memory_tables import LeaseTable, Line
from .stores import MemoryOverrideStore

#: Builds a NamedTuple from a tuple in C: half the cost of calling the class,
#: whose generated `__new__` is a Python function (these run per request).
_new = tuple.__new__

#: Buckets examined per sweep step, one step every `_SWEEP_EVERY` writes: two looks per
#: write, so full buckets are dropped faster than new keys arrive.
_SWEEP_BATCH = 32
_SWEEP_EVERY = 16
#: Seconds between a waiter's own looks at its line: a safety net for slots freed by
#: lease expiry rather than a release (releases hand slots over at once).
_WAIT_POLL = 1.0
#: Every window strategy: the rolling ones on the monotonic clock, the calendar ones
#: (`algorithms.calendar`) on the wall clock.
_WINDOWS = {**window.STRATEGIES, **calendar.STRATEGIES}


class MemoryBackend:
    """Limiter state in this process: the default, and the `local` fallback for Redis."""

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        if not isinstance(max_keys, int) or isinstance(max_keys, bool) or max_keys < 1:
            raise ConfigError("max_keys", "a positive integer", max_keys)
        self.max_keys = max_keys
        self._clock = clock
        #: Unix time, for calendar quotas only (their periods are UTC days and months).
        self._wall = wall_clock
        #: The clock every decision reads (the core keeps its own times on it too).
        self.clock = clock
        #: Least recently used first. An OrderedDict, not a dict: taking a dict's first
        #: key after many deletions at its front walks their empty slots (O(deleted)),
        #: which made each decision of a key flood 6-25x dearer.
        self._buckets: OrderedDict[StoreKey, float] = OrderedDict()
        self._leases: dict[StoreKey, LeaseTable] = {}
        #: Non-empty waiting lines; a key with a line admits nobody past it.
        self._lines: dict[StoreKey, Line] = {}
        #: Appointments per key (see `algorithms.queue.Book`); dropped when empty.
        self._books: dict[StoreKey, queue.Book] = {}
        #: Ticket id -> the future its waiter awaits: "granted" or "shed".
        self._tickets: dict[str, asyncio.Future[str]] = {}
        self._writes = 0
        #: Window states (`algorithms.window`) and when each is empty again, least
        #: recently used first.
        self._windows: OrderedDict[StoreKey, tuple[Any, float]] = OrderedDict()
        #: Buckets (and window states) dropped before they were full because of `max_keys`.
        self.evictions = 0

    def __len__(self) -> int:
        """Keys held right now (buckets, lease tables and window states)."""
        return len(self._buckets) + len(self._leases) + len(self._windows)

    async def decide(self, checks: Sequence[Check]) -> Verdict:
        """All-or-nothing over `checks`, atomically (no await inside)."""
        return self.decide_nowait(checks)

    def decide_nowait(self, checks: Sequence[Check]) -> Verdict:
        """`decide` without the coroutine (see `NowaitBackend`): the engine's hot path."""
        now = self._clock()
        buckets = self._buckets
        if len(checks) == 1 and checks[0].__class__ is BucketCheck:
            # The commonest rule, one rate limit: no bookkeeping for all-or-nothing.
            key, interval, burst, cost = checks[0]
            # Popped, not read: put back below at the most recently used end, which
            # is what `_store_bucket` does, for one dict lookup less.
            old = buckets.pop(key, None)
            ok, tat, remaining, retry, reset = gcra.gcra_tuple(old, now, cost, interval, burst)
            if old is None:
                if ok:
                    self._store_bucket(key, tat, now)
            else:
                buckets[key] = tat if ok else old
                self._writes += 1
                if not self._writes % _SWEEP_EVERY:
                    self._sweep(now)
            return _new(Verdict, (ok, (_new(CheckResult, (ok, remaining, retry, reset)),)))
        results: list[CheckResult] = []
        # What to commit if every check admits: new bucket states, leases to add.
        new_tats: list[tuple[StoreKey, float]] = []
        new_leases: list[LeaseCheck] = []
        new_windows: list[tuple[WindowCheck, Any]] = []
        admitted = True
        for check in checks:
            if isinstance(check, BucketCheck):
                key, interval, burst, cost = check
                ok, tat, remaining, retry, reset = gcra.gcra_tuple(
                    buckets.get(key), now, cost, interval, burst
                )
                results.append(_new(CheckResult, (ok, remaining, retry, reset)))
                new_tats.append((key, tat))
            elif isinstance(check, WindowCheck):
                key, limit, period, strategy, cost, _ = check
                step = _WINDOWS[strategy][0](
                    self._window_state(key), self._when(strategy, now), cost, limit, period
                )
                ok = step.admitted
                results.append(
                    _new(CheckResult, (ok, step.remaining, step.retry_after, step.reset_after))
                )
                new_windows.append((check, step.state))
            else:
                table = self._leases.get(check.key)
                # `prune` inlined up to its cheap test: most decisions need no pruning.
                if table is not None and now >= table.earliest:
                    table.prune(now)
                in_use = len(table) if table else 0
                need = 1
                if "*" in check.lease_id:  # a weighted pool's lease (leases.MARK)
                    need = leases.weight_of(check.lease_id)
                    if table:
                        in_use = leases.held(table)
                limit = check.limit
                # Nobody passes a waiting line (`_lines` is empty unless queues are used).
                ok = in_use + need <= limit and not (self._lines and check.key in self._lines)
                # Free slots after this step (0 when refused).
                results.append(
                    _new(CheckResult, (ok, limit - in_use - need if ok else 0, 0.0, 0.0))
                )
                new_leases.append(check)
            if not ok:
                admitted = False
        if not admitted:
            # Nothing is consumed: report the untouched state of the checks that would admit.
            for i, check in enumerate(checks):
                if not results[i].admitted:
                    continue
                if isinstance(check, BucketCheck):
                    r = gcra.gcra(self._buckets.get(check.key), now, 0, check.interval, check.burst)
                    results[i] = CheckResult(True, r.remaining, 0.0, r.reset_after)
                elif isinstance(check, WindowCheck):
                    w = _WINDOWS[check.strategy][0](
                        self._window_state(check.key),
                        self._when(check.strategy, now),
                        0,
                        check.limit,
                        check.period,
                    )
                    results[i] = CheckResult(True, w.remaining, 0.0, w.reset_after)
                else:
                    free = results[i].remaining + leases.weight_of(check.lease_id)
                    results[i] = CheckResult(True, free, 0.0, 0.0)
        else:
            # Commit what the first pass computed: nothing awaited in between.
            for key, tat in new_tats:
                self._store_bucket(key, tat, now)
            for wcheck, state in new_windows:
                if wcheck.cost > 0:
                    at = self._when(wcheck.strategy, now)
                    idle_at = _WINDOWS[wcheck.strategy][2](state, wcheck.period)
                    self._store_window(wcheck.key, state, idle_at - at + now, now)
                    wcheck.receipt.append(at)
            for lease in new_leases:
                table = self._leases.get(lease.key)
                if table is None:
                    table = self._leases[lease.key] = LeaseTable()
                # LeaseTable.add, inlined: once per admitted request holding a slot.
                expiry = table[lease.lease_id] = now + lease.ttl
                if expiry < table.earliest:
                    table.earliest = expiry
        return _new(Verdict, (admitted, tuple(results)))

    async def refund(self, checks: Sequence[Check]) -> None:
        """Give back what an admitted `decide` of `checks` took (a negative cost: charge
        that much more, a settlement's debt)."""
        self.refund_nowait(checks)

    def refund_nowait(self, checks: Sequence[Check]) -> None:
        """`refund` without the coroutine (see `NowaitBackend`)."""
        now = self._clock()
        for check in checks:
            if isinstance(check, BucketCheck):
                tat = self._buckets.get(check.key)
                if tat is None and check.cost >= 0:
                    continue
                new_tat = gcra.refund(tat, now, check.cost, check.interval)
                if new_tat is None:
                    self._buckets.pop(check.key, None)
                else:
                    self._store_bucket(check.key, new_tat, now)
            elif isinstance(check, WindowCheck):
                state = self._window_state(check.key)
                charge = check.cost < 0
                if not charge and (state is None or not check.receipt):
                    continue
                _, undo, idle = _WINDOWS[check.strategy]
                at = self._when(check.strategy, now)
                hit = check.receipt[-1] if check.receipt else at
                state = undo(state, at, check.cost, check.period, hit)
                idle_at = 0.0 if state is None else idle(state, check.period) - at + now
                self._store_window(check.key, state, idle_at, now)
            else:
                self.release_nowait(check)

    async def renew(self, leases_: Sequence[LeaseCheck]) -> list[bool]:
        """Extend each live lease to now + its ttl."""
        now = self._clock()
        out = []
        for lease in leases_:
            table = self._leases.get(lease.key)
            out.append(table is not None and leases.renew(table, lease.lease_id, now, lease.ttl))
        return out

    async def release(self, lease: LeaseCheck) -> bool:
        """Free a slot; False if it was not held (never granted, released, or expired)."""
        return self.release_nowait(lease)

    def release_nowait(self, lease: LeaseCheck) -> bool:
        """`release` without the coroutine (see `NowaitBackend`)."""
        table = self._leases.get(lease.key)
        if table is None:
            return False
        expiry = table.pop(lease.lease_id, None)
        if not table:
            del self._leases[lease.key]
        if self._lines and lease.key in self._lines:
            self._hand_off(lease.key)
        return expiry is not None and expiry > self._clock()

    async def in_use(self, key: StoreKey) -> int:
        """Slots held under `key` by live leases (weights summed)."""
        table = self._leases.get(key)
        return leases.live(table, self._clock()) if table else 0

    async def enqueue(self, checks: Sequence[Check], queue_check: QueueCheck) -> Entry:
        """Decide `checks`; if only the queued lease lacks a slot, consume the rest and wait."""
        return self.enqueue_nowait(checks, queue_check)

    def enqueue_nowait(self, checks: Sequence[Check], queue_check: QueueCheck) -> Entry:
        """`enqueue` without the coroutine: one atomic step on the event loop."""
        lease = queue_check.lease
        key = lease.key
        verdict = self.decide_nowait(checks)
        line = self._lines.get(key)
        if verdict.admitted:
            return Entry("admitted", verdict, -1, len(line.state) if line else 0)
        index = next(i for i, check in enumerate(checks) if check is lease)
        if not all(r.admitted for i, r in enumerate(verdict.results) if i != index):
            return Entry("refused", verdict, -1, len(line.state) if line else 0)
        guaranteed = dict(queue_check.guaranteed)
        fresh = line is None
        if line is None:
            line = Line(lease.limit, lease.ttl, guaranteed)
        else:
            line.limit, line.ttl, line.guaranteed = lease.limit, lease.ttl, guaranteed
        now = self._clock()
        book = self._books.get(key) if queue_check.spacing > 0 else None
        if book is None and queue_check.spacing > 0 and queue_check.fair:
            book = self._books[key] = queue.Book()
        step = queue.enqueue(
            line.state,
            ticket=lease.lease_id,
            rank=queue_check.rank,
            fair=queue_check.fair,
            capacity=queue_check.capacity,
            max_position=queue_check.max_position,
            in_use=self._in_use_by_rank(key) if guaranteed else {},
            guaranteed=guaranteed,
            book=book,
            now=now,
            spacing=queue_check.spacing,
        )
        if book is not None and not book:
            del self._books[key]
        if step.outcome != "queued":
            retry_in = step.due - now if step.due else 0.0
            return Entry(step.outcome, verdict, step.position, step.length, retry_in)
        if fresh:
            self._lines[key] = line
        results = list(verdict.results)
        others = [check for i, check in enumerate(checks) if i != index]
        if others:
            # Nothing was awaited since the first pass: these admit as they did then.
            taken = self.decide_nowait(others).results
            results[:index], results[index + 1 :] = taken[:index], taken[index:]
        self._tickets[lease.lease_id] = asyncio.get_running_loop().create_future()
        if step.shed is not None:
            self._settle(step.shed.ticket, "shed")
        # A slot may be free (the line was only passing through): serve the head now.
        self._hand_off(key)
        return Entry("queued", Verdict(False, tuple(results)), step.position, step.length)

    async def wait(self, queue_check: QueueCheck, timeout: float) -> str:
        """Wait for the hand-off of a slot, up to `timeout` s (see `QueueBackend.wait`)."""
        ticket = queue_check.lease.lease_id
        future = self._tickets.get(ticket)
        if future is None:
            return "shed"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not future.done():
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.wait((future,), timeout=min(left, _WAIT_POLL))
                if not future.done():
                    # Safety net: slots freed by a lease's expiry, not a release.
                    self._hand_off(queue_check.lease.key)
            if future.done():
                return future.result()
            self._leave(queue_check)
            return "timeout"
        except BaseException:
            self._leave(queue_check)
            raise
        finally:
            self._tickets.pop(ticket, None)

    def _leave(self, queue_check: QueueCheck) -> None:
        """Take a ticket out of line; if it was granted a slot meanwhile, give the slot back."""
        lease = queue_check.lease
        line = self._lines.get(lease.key)
        if line is not None and line.state.remove(lease.lease_id) is not None:
            if not line.state:
                del self._lines[lease.key]
            return
        future = self._tickets.get(lease.lease_id)
        if future is not None and future.done() and future.result() == "granted":
            self.release_nowait(lease)

    def _settle(self, ticket: str, outcome: str) -> None:
        future = self._tickets.get(ticket)
        if future is not None and not future.done():
            future.set_result(outcome)

    def _in_use_by_rank(self, key: StoreKey) -> dict[int, int]:
        table = self._leases.get(key)
        if not table:
            return {}
        table.prune(self._clock())
        return queue.in_use_by_rank(table)

    def _hand_off(self, key: StoreKey) -> None:
        """Give free slots of `key` to the head of its line, in the queue's order."""
        line = self._lines[key]
        now = self._clock()
        table = self._leases.get(key)
        if table is not None:
            table.prune(now)
        for waiter in queue.hand_off(line.state, table or (), line.limit, line.guaranteed):
            if table is None:
                table = self._leases[key] = LeaseTable()
            table.add(waiter.ticket, now + line.ttl)
            self._settle(waiter.ticket, "granted")
        if not line.state:
            del self._lines[key]

    async def appoint(self, queue_check: QueueCheck) -> float:
        """An appointment for a request that left the line without a slot (see the protocol)."""
        if not (queue_check.spacing > 0 and queue_check.fair):
            return 0.0
        key = queue_check.lease.key
        now = self._clock()
        book = self._books.get(key)
        if book is None:
            book = self._books[key] = queue.Book()
        book.prune(now, queue.grace_for(queue_check.spacing))
        line = self._lines.get(key)
        first_free = now + ((len(line.state) if line else 0) + 1) * queue_check.spacing
        due = book.give(queue_check.fair, queue_check.rank, now, first_free, queue_check.spacing)
        if not book:
            del self._books[key]
        return due - now if due else 0.0

    async def queue_length(self, key: StoreKey) -> int:
        """Requests waiting in `key`'s line."""
        line = self._lines.get(key)
        return len(line.state) if line else 0

    async def aclose(self) -> None:
        """Drop all state."""
        self._buckets.clear()
        self._leases.clear()
        self._lines.clear()
        self._books.clear()
        for future in self._tickets.values():
            if not future.done():
                future.set_result("shed")
        self._windows.clear()

    def _store_bucket(self, key: StoreKey, tat: float, now: float) -> None:
        buckets = self._buckets
        # Pop and re-insert: this moves the key to the most recently used end
        # (as cheap as move_to_end, and one call whether or not the key is there).
        if (
            buckets.pop(key, None) is None
            and len(buckets) >= self.max_keys
            and buckets.popitem(last=False)[1] > now  # the least recently used goes
        ):
            self.evictions += 1
        buckets[key] = tat
        self._writes += 1
        if not self._writes % _SWEEP_EVERY:
            self._sweep(now)

    def _when(self, strategy: str, now: float) -> float:
        """The time a window of `strategy` is stepped at: `now`, or unix time for a
        calendar quota (its state and receipts are in unix seconds)."""
        return self._wall() if strategy in calendar.STRATEGIES else now

    def _window_state(self, key: StoreKey) -> Any:
        held = self._windows.get(key)
        return None if held is None else held[0]

    def _store_window(self, key: StoreKey, state: Any, idle_at: float, now: float) -> None:
        """Keep a window's state until `idle_at`, most recently used last; past `max_keys`
        the least recently used goes (an eviction if it still counted something)."""
        windows = self._windows
        if state is None:
            windows.pop(key, None)
            return
        if (
            windows.pop(key, None) is None
            and len(windows) >= self.max_keys
            and windows.popitem(last=False)[1][1] > now
        ):
            self.evictions += 1
        windows[key] = (state, idle_at)

    def _sweep(self, now: float) -> None:
        """Drop full buckets from the least recently used end, a batch at a time."""
        buckets = self._buckets
        for _ in range(min(_SWEEP_BATCH, len(buckets))):
            key, tat = buckets.popitem(last=False)
            if tat > now:
                # Not full yet: rotate it so the next step looks at others. This
                # makes the eviction order only approximately least-recently-used.
                buckets[key] = tat

    # -- the stores beside limiter state (see `backends.stores`) ------------------

    def override_store(self) -> MemoryOverrideStore:
        """Overrides of this process only (a new store each call, as each app's own)."""
        return MemoryOverrideStore()

    def top_store(self) -> None:
        """None: one process has nothing to share (`top_app` shows its tables)."""
        return None

    def admin(self) -> MemoryAdmin:
        """Reads and resets over this process's callers."""
        return MemoryAdmin(self._buckets, self._leases, self._lines, self.in_use, self.queue_length)
