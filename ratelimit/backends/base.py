"""The `Backend` protocol: the seam between policy and storage.

A backend stores state for three native kinds of check, tokens (GCRA buckets),
leases (concurrency slots) and windows (`algorithms.window`), and decides a
rule's checks together: all of them admit and consume, or none does. Keys
arrive already safe (config names plus a digest of the caller's text), so a
backend never sees raw request data.
A Redis implementation decides one rule in one script call per hash slot.

The records are NamedTuples, not dataclasses: they are built on every request
and a tuple is several times cheaper to construct than a frozen dataclass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias, runtime_checkable

from ..algorithms.leases import weight_of


class StoreKey(NamedTuple):
    """Where one limit's state for one caller lives.

    `rule` and `limit` are configuration names (a safe character set, checked
    at start-up); `caller` is a hex digest of the caller's key, or `"*"` for a
    shared (global) key. Keys with the same `(rule, caller)` may be stored
    together (one Redis hash slot). A tuple: hashing it is cheap on the hot path.
    """

    rule: str
    limit: str
    caller: str

    def __str__(self) -> str:
        return f"{self.rule}:{self.limit}:{self.caller}"


class BucketCheck(NamedTuple):
    """Take `cost` units from a GCRA bucket of `burst` units refilling one per `interval` s."""

    key: StoreKey
    interval: float
    burst: int
    cost: int


class LeaseCheck(NamedTuple):
    """Hold `weight` of `limit` slots as lease `lease_id`, expiring `ttl` s after its last
    renewal. The weight is part of the id (`algorithms.leases.weighted_id`; 1 unmarked),
    so every operation on the lease, in any store, knows it from the id alone."""

    key: StoreKey
    limit: int
    ttl: float
    lease_id: str

    @property
    def weight(self) -> int:
        """Slots this lease holds."""
        return weight_of(self.lease_id)


class WindowCheck(NamedTuple):
    """Count `cost` units in a window of at most `limit` units per `period` s.

    `strategy` is "fixed", "sliding" or "moving" (see `algorithms.window`).
    `receipt` is this request's own, empty when built: a backend that takes the
    units appends the time it took them (on its own clock), which is what
    `refund` needs to give them back to the window they went into. Built per
    request, never cached.
    """

    key: StoreKey
    limit: int
    period: float
    strategy: str
    cost: int
    receipt: list[float]


Check: TypeAlias = "BucketCheck | LeaseCheck | WindowCheck"


class QueueCheck(NamedTuple):
    """Wait in line for a slot of `lease` when its limit is full (see `algorithms.queue`).

    `lease.lease_id` is the ticket id, which becomes the lease id once a slot is
    granted; it starts with the class rank (`algorithms.queue.ticket_id`).
    """

    lease: LeaseCheck
    #: Waiters at most, fleet-wide.
    capacity: int
    #: The request's class: 0 is served first.
    rank: int
    #: The caller's digest for fair order within a class; "" for plain FIFO.
    fair: str
    #: (rank, slots) each class is guaranteed; empty without shares.
    guaranteed: tuple[tuple[int, int], ...]
    #: Refuse ("too_long") if the place in line would be past this (its wait would
    #: outlast the timeout); `capacity` for no bound, -1 to refuse any wait.
    max_position: int
    #: Seconds between appointments (service time / slots; see `algorithms.queue`);
    #: 0.0: no appointments (no fair key, or no service time observed yet).
    spacing: float = 0.0


class Entry(NamedTuple):
    """The answer to `Backend.enqueue`."""

    #: "admitted" (a slot was free after all), "queued" (waiting: call `wait`),
    #: "full" (no room in line), "too_long" (see `QueueCheck.max_position`), or
    #: "refused" (another check refused: nothing consumed, see `verdict`).
    outcome: str
    #: The checks' results, as `decide` gives them. When queued, every check but
    #: the queued lease has consumed; the lease's result reports no free slot.
    verdict: Verdict
    #: Place in line (0: next) for "queued"/"too_long"/"full"; -1 otherwise.
    position: int
    #: Waiters in line after this step.
    length: int
    #: For "full"/"too_long": seconds until the appointment the request was given
    #: (come back then and join the line); 0.0 when it was given none.
    retry_in: float = 0.0


class CheckResult(NamedTuple):
    """What one check said. For a lease, `remaining` is free slots (0 when it refuses)."""

    admitted: bool
    remaining: int
    #: Seconds until the check could admit (0 when admitted). Backends answer 0 for a
    #: refused lease: when a slot frees is not stored state; the policy layer estimates it.
    retry_after: float
    #: Seconds until the state is back to full (for headers); 0 for leases.
    reset_after: float


class Verdict(NamedTuple):
    """The answer to `Backend.decide`: `results[i]` answers `checks[i]`."""

    admitted: bool
    results: tuple[CheckResult, ...]


@runtime_checkable
class Backend(Protocol):
    """Storage for limiter state. Every method is safe under concurrent use."""

    async def decide(self, checks: Sequence[Check]) -> Verdict:
        """Evaluate every check; if all admit, consume all, else consume none.

        Every result is filled in either way, so a refusal can say how long to
        wait for each limit. When the verdict refuses, nothing is consumed and
        the results of checks that would have admitted describe the untouched
        state (their `remaining` counts no cost and no new lease).
        """
        ...

    async def refund(self, checks: Sequence[Check]) -> None:
        """Undo an admitted `decide`: give bucket and window units back, release leases.

        A window's units go back to the window they were counted in (see
        `WindowCheck.receipt`); if that window has closed, there is nothing to undo.
        A negative cost charges that many units more, past the limit if need be (a
        settlement's debt, see `core.settling`): to the window the units were
        counted in, or the one open now.
        """
        ...

    async def renew(self, leases: Sequence[LeaseCheck]) -> list[bool]:
        """Extend live leases by their ttl; False for a lease that was already gone."""
        ...

    async def release(self, lease: LeaseCheck) -> bool:
        """Free a lease's slot; False if it was not held (expired or released)."""
        ...

    async def in_use(self, key: StoreKey) -> int:
        """Slots held by live leases under `key`, weights summed (statistics, metrics, CLI)."""
        ...

    async def aclose(self) -> None:
        """Release connections and background tasks."""
        ...


@runtime_checkable
class QueueBackend(Backend, Protocol):
    """A backend that can hold waiting lines in front of concurrency slots (`queue=`)."""

    async def enqueue(self, checks: Sequence[Check], queue: QueueCheck) -> Entry:
        """Decide `checks` (which include `queue.lease`) and, if only that lease is short
        of a slot, consume the others and put the request in line, all in one step.

        A slot counts as free only when nobody waits: a newcomer never passes the line.
        A full line may shed its lowest waiter for this one (that waiter's `wait`
        then answers "shed"). Refusals consume nothing.
        """
        ...

    async def wait(self, queue: QueueCheck, timeout: float) -> str:
        """Wait up to `timeout` s for a queued request's slot: "granted", "timeout" or "shed".

        "granted": the lease `queue.lease` is held (renew and release it as usual).
        Otherwise the request has left the line and holds nothing. If the waiting
        task is cancelled, the ticket leaves the line (a slot granted in the
        meantime is released) before or shortly after the cancellation propagates.
        Only the queued lease is the backend's concern: refunding the other checks
        is the caller's.
        """
        ...

    async def appoint(self, queue: QueueCheck) -> float:
        """Give a request that left the line without a slot (timed out, shed) an
        appointment; seconds until it, 0.0 for none (see `QueueCheck.spacing`)."""
        ...

    async def queue_length(self, key: StoreKey) -> int:
        """Requests waiting in line for `key`'s slots (statistics, metrics, CLI)."""
        ...


class NowaitBackend(Backend, Protocol):
    """Optional: a backend whose state lives in this process can answer without waiting.

    `decide_nowait`, `release_nowait` and `refund_nowait` must behave exactly as
    `decide`, `release` and `refund` (which then simply return them); the engine calls them directly
    and saves a coroutine per request. Remote backends leave them out.
    """

    def decide_nowait(self, checks: Sequence[Check]) -> Verdict:
        """`decide`, answered synchronously."""
        ...

    def release_nowait(self, lease: LeaseCheck) -> bool:
        """`release`, answered synchronously."""
        ...

    def refund_nowait(self, checks: Sequence[Check]) -> None:
        """`refund`, done synchronously (a settlement then needs no task of its own)."""
        ...


class PostingBackend(Backend, Protocol):
    """Optional: a remote backend that can send a release without waiting for its answer.

    A finished request then frees its slot in the step that sends its last body
    message: nothing awaits the round trip. (Awaiting it kept every finished
    request's objects alive one round trip longer, and under load that alone
    kept the garbage collector busy.)
    """

    def post_release(self, lease: LeaseCheck) -> bool:
        """Send `release(lease)` now; False, having sent nothing, if it must be awaited.

        A failure after sending is the backend's to count and log: the lease
        then expires by itself within its ttl, as after a failed `release`.
        """
        ...


def nowait_method(backend: Backend, name: str, fast: str = "") -> Callable[..., Any] | None:
    """`backend.<name>_nowait` (or `backend.<fast>`), if the backend offers it and it
    stands for `backend.<name>`.

    A subclass that overrides `decide` (to count calls, inject faults) but not
    `decide_nowait` must keep its `decide` called: the fast method is used only
    when the class that defines `name` defines it too, and no instance
    attribute replaces either.
    """
    fast = fast or f"{name}_nowait"
    if name in getattr(backend, "__dict__", ()) or fast in getattr(backend, "__dict__", ()):
        return None
    for klass in type(backend).__mro__:
        if name in vars(klass):
            return getattr(backend, fast) if fast in vars(klass) else None
    return None
