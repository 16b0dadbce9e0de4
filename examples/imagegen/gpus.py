"""Simulated GPUs that slow down together when overloaded: a processor-sharing pool.

A fleet of `G` GPUs running `N` jobs gives each job `min(1, G/N)` of a GPU: up
to `G` jobs run at full speed, and past that every job slows down at once.
That is what happens to a real inference fleet that accepts more work than it
has accelerators (time-slicing, batching, memory pressure): latency grows for
everyone, clients time out, and the work they abandoned keeps the GPUs busy.

`ProcessorSharing` is the pure model: it is told the time and never reads a
clock, so tests check exact finishing times. `GPUPool` drives it on the event
loop: `await pool.run(work)` returns when the job's GPU-seconds are done.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

#: Slack when deciding that a job has finished, so floating-point residue
#: (1e-16 GPU-seconds left) never costs one more timer round.
_EPSILON = 1e-9


#: How the caller names its jobs.
J = TypeVar("J", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Finished(Generic[J]):
    """A job that finished, and the time it did."""

    job: J
    at: float


class ProcessorSharing(Generic[J]):
    """`N` jobs on `gpus` GPUs, each progressing at `min(1, gpus/N)` GPU-seconds per second.

    All running jobs progress at the same rate, so the model keeps a single
    counter, `attained`: the service each running job has received since the
    pool began. A job of `work` GPU-seconds added when the counter is `a`
    finishes when the counter reaches `a + work`; a heap of those targets gives
    the next finish in O(log N) whatever `N` is.

    Every method that changes the pool takes `now` (never earlier than the
    previous call's), first brings the pool to `now`, and returns the jobs that
    finished on the way, in the order they finished, with their exact times.
    """

    def __init__(self, gpus: int, now: float = 0.0) -> None:
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
            raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
        self.gpus = gpus
        self._now = now
        self._attained = 0.0
        #: (target of `attained`, sequence number, job); cancelled jobs are left to go stale.
        self._heap: list[tuple[float, int, J]] = []
        #: Running job -> (its target, its sequence number).
        self._live: dict[J, tuple[float, int]] = {}
        self._seq = itertools.count()

    @property
    def now(self) -> float:
        """The time the pool was last brought to."""
        return self._now

    @property
    def running(self) -> int:
        """Jobs in the pool right now."""
        return len(self._live)

    def rate(self) -> float:
        """GPU-seconds per second each running job receives now (1.0 when idle)."""
        n = len(self._live)
        return 1.0 if n <= self.gpus else self.gpus / n

    def remaining(self, job: J) -> float:
        """GPU-seconds `job` still needs, as of `now`."""
        target, _ = self._live[job]
        return max(0.0, target - self._attained)

    def add(self, job: J, work: float, now: float) -> list[Finished[J]]:
        """Start `job`, needing `work` GPU-seconds, at `now`."""
        if job in self._live:
            raise ValueError(f"job {job!r} is already running")
        if not work >= 0:
            raise ValueError(f"work must be a number of GPU-seconds >= 0, got {work!r}")
        done = self.advance(now)
        seq = next(self._seq)
        target = self._attained + work
        self._live[job] = (target, seq)
        heapq.heappush(self._heap, (target, seq, job))
        # A job of no work finishes at once.
        return done + self.advance(now)

    def cancel(self, job: J, now: float) -> list[Finished[J]]:
        """Stop `job` at `now` (if it is still running): the others speed up."""
        done = self.advance(now)
        self._live.pop(job, None)
        return done

    def next_finish(self) -> float | None:
        """When the next job finishes if nothing is added or cancelled (None when idle)."""
        self._drop_stale()
        if not self._heap:
            return None
        target = self._heap[0][0]
        return self._now + max(0.0, target - self._attained) / self.rate()

    def advance(self, now: float) -> list[Finished[J]]:
        """Bring the pool to `now`; return the jobs that finished on the way."""
        if now < self._now:
            raise ValueError(f"time runs forward: {now!r} is before {self._now!r}")
        done: list[Finished[J]] = []
        while True:
            self._drop_stale()
            if not self._heap:
                break
            target, _, job = self._heap[0]
            # The rate is constant until the next finish, where N drops by one.
            at = self._now + max(0.0, target - self._attained) / self.rate()
            if at > now + _EPSILON:
                break
            heapq.heappop(self._heap)
            del self._live[job]
            self._attained = max(self._attained, target)
            self._now = min(max(self._now, at), now)
            done.append(Finished(job, self._now))
        if self._live:
            self._attained += self.rate() * (now - self._now)
        self._now = now
        return done

    def _drop_stale(self) -> None:
        """Pop heap entries of cancelled jobs."""
        heap, live = self._heap, self._live
        while heap:
            _, seq, job = heap[0]
            entry = live.get(job)
            if entry is not None and entry[1] == seq:
                return
            heapq.heappop(heap)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What a `GPUPool` is doing: for tests and for the app's `/v1/models` answer."""

    gpus: int
    running: int
    finished: int
    #: GPU-seconds of work completed.
    gpu_seconds: float


class GPUPool:
    """Processor-sharing GPUs on the event loop: `await run(work)` returns when it is done.

    One timer is armed for the next finish; adding or cancelling a job moves
    it. A job whose awaiting task is cancelled leaves the pool. A client that
    merely disconnects cancels nothing: a plain Starlette endpoint under uvicorn
    runs to the end, so the GPUs keep working on a job nobody waits for any
    more, which is how overload turns into wasted work.
    `clock` is in seconds (default `time.monotonic`).
    """

    def __init__(self, gpus: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._model: ProcessorSharing[int] = ProcessorSharing(gpus, clock())
        self._waiters: dict[int, asyncio.Future[float]] = {}
        self._ids = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._finished = 0
        self._gpu_seconds = 0.0
        self._work: dict[int, float] = {}

    @property
    def gpus(self) -> int:
        """How many GPUs the pool simulates."""
        return self._model.gpus

    def statistics(self) -> PoolStats:
        """A snapshot of the pool."""
        return PoolStats(self.gpus, self._model.running, self._finished, self._gpu_seconds)

    async def run(self, work: float) -> float:
        """Run a job of `work` GPU-seconds; return the wall-clock seconds it took."""
        loop = asyncio.get_running_loop()
        job = next(self._ids)
        future: asyncio.Future[float] = loop.create_future()
        self._waiters[job] = future
        self._work[job] = work
        started = self._clock()
        self._settle(self._model.add(job, work, max(started, self._model.now)))
        self._arm(loop)
        try:
            finished_at = await future
        finally:
            if not future.done() or future.cancelled():
                # Our task was cancelled: the job stops using its share.
                self._waiters.pop(job, None)
                self._work.pop(job, None)
                self._settle(self._model.cancel(job, self._now()))
                self._arm(loop)
        return finished_at - started

    def _now(self) -> float:
        return max(self._clock(), self._model.now)

    def _settle(self, done: list[Finished[int]]) -> None:
        for finished in done:
            self._finished += 1
            self._gpu_seconds += self._work.pop(finished.job, 0.0)
            future = self._waiters.pop(finished.job, None)
            if future is not None and not future.done():
                future.set_result(finished.at)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set the one timer for the next finish (or none when idle)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self._model.next_finish()
        if at is not None:
            self._timer = loop.call_later(max(0.0, at - self._clock()), self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._settle(self._model.advance(self._now()))
        self._arm(loop)
