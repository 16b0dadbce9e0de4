"""`Acquisition`: the context of `Limiter.acquire`, holding a rule's limits while its block runs.

On entry it decides (waiting in line if the rule has one) and raises
`RateLimited` when refused, so the block does not run. On exit it releases
the grant: at once when the backend allows, shielded from cancellation when
the block ended normally, in the background when it raised or was cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType

from .decision import Decision, FailedDecision, RateLimited
from .engine import Engine

#: Decides for the caller: (the engine holding the grant, the decision).
Decide = Callable[[], Awaitable[tuple[Engine, Decision]]]


class Acquisition:
    """`Limiter.acquire`'s context: decides on entry, releases the grant on exit."""

    __slots__ = ("_decide", "_engine", "decision")

    def __init__(self, decide: Decide) -> None:
        self._decide = decide
        self._engine: Engine | None = None
        #: The admitted decision, once entered.
        self.decision: Decision | None = None

    async def __aenter__(self) -> Decision:
        if self.decision is not None:
            raise RuntimeError("this acquire() was entered already; call acquire() again")
        engine, decision = await self._decide()
        if not decision.allowed and (
            not decision.rule.shadow or decision.__class__ is not Decision
        ):
            error = decision.error if isinstance(decision, FailedDecision) else None
            raise RateLimited(decision) from error
        self._engine = engine
        self.decision = decision
        return decision

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        decision, engine = self.decision, self._engine
        grant = None if decision is None else decision.grant
        if grant is None or grant.released or engine is None:
            return
        if engine.release_nowait(grant):
            return
        if kind is None:
            # Shielded: a cancellation now must not leave the slot to its lease's expiry.
            await asyncio.shield(engine.release(grant))
        else:
            engine.release_soon(grant)  # no await: the block failed or was cancelled
