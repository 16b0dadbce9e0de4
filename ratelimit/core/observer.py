"""`Observer`: what a `Limiter` tells the code watching it (metrics, logging, tracing).

One interface, given at construction (`Limiter(metrics=...)`): the limiter and
its engine call it; nothing is patched onto objects already built. `Metrics`
implements it. Every method must be cheap and must not raise.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..policy.rules import Rule
from .decision import Decision, EngineObserver, Grant
from .engine import Engine


@runtime_checkable
class Observer(EngineObserver, Protocol):
    """Told of every decision, release, line change, failure and limit change of a `Limiter`."""

    def on_start(self, engine: Engine) -> None:
        """The limiter's engine is built: its rules and backend are final (once)."""
        ...

    def on_limits(self, engine: Engine) -> None:
        """The limits `engine` enforces changed (a live override applied)."""
        ...

    def on_decision(self, decision: Decision, seconds: float) -> None:
        """A decision was made in `seconds` (waiting in line included)."""
        ...

    def on_release(self, grant: Grant) -> None:
        """`grant`'s slots were released."""
        ...

    def on_queue(self, rule: str, limit: str, delta: int) -> None:
        """A request joined (+1) or left (-1) the line of `limit` of `rule`."""
        ...

    def on_settle(self, rule: str, limit: str, units: int) -> None:
        """A settlement charged `units` more (negative: gave them back) to `limit` of `rule`."""
        ...

    def on_failure(self, rule: Rule, policy: str, exc: BaseException) -> None:
        """The backend failed deciding for `rule`; `policy` ("open", "closed", "local") applies."""
        ...

    def on_invalid(self, rule: Rule, limit: str) -> None:
        """A key, cost, priority or fair_key function of `rule` (its limit `limit`) failed."""
        ...
