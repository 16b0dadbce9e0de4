"""A circuit breaker: after repeated failures, stop calling a dead store for a while.

With the store down, every request would otherwise pay a connection attempt
or a timeout. Open, the breaker answers "don't call" in a microsecond; after
`reset_after` seconds it lets one probe through (half-open), and the probe's
outcome closes it again or re-opens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from .._errors import ConfigError
from .._types import Clock

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed -> (`failures` in a row) -> open -> (`reset_after` s) -> half-open -> one probe."""

    __slots__ = (
        "_clock",
        "_failures",
        "_listeners",
        "_opened_at",
        "_probing",
        "failures",
        "on_change",
        "reset_after",
        "state",
    )

    def __init__(
        self,
        *,
        failures: int = 3,
        reset_after: float = 1.0,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if not isinstance(failures, int) or isinstance(failures, bool) or failures < 1:
            raise ConfigError("failures", "a positive integer", failures)
        if (
            not isinstance(reset_after, (int, float))
            or isinstance(reset_after, bool)
            or not (0 < reset_after < 3600)
        ):
            raise ConfigError("reset_after", "seconds in (0, 3600)", reset_after)
        self.failures = failures
        self.reset_after = float(reset_after)
        self._clock = clock
        #: Called on every state change with (old, new), then each listener.
        self.on_change = on_change
        self._listeners: list[Callable[[BreakerState, BreakerState], None]] = []
        self.state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    def add_listener(self, listener: Callable[[BreakerState, BreakerState], None]) -> None:
        """Have `listener(old, new)` called on every state change (before `on_change`)."""
        self._listeners.append(listener)

    def allow(self) -> bool:
        """Whether a call may go to the store now (claims the probe when half-open)."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            if self._clock() - self._opened_at < self.reset_after:
                return False
            self._set("half_open")
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        """A call answered: the store is alive."""
        self._failures = 0
        self._probing = False
        if self.state != "closed":
            self._set("closed")

    def failure(self) -> None:
        """A call failed to reach the store (refused, reset or timed out)."""
        self._probing = False
        self._failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and self._failures >= self.failures
        ):
            self._opened_at = self._clock()
            self._set("open")

    def _set(self, state: BreakerState) -> None:
        old, self.state = self.state, state
        if old == state:
            return
        for listener in self._listeners:
            listener(old, state)
        if self.on_change is not None:
            self.on_change(old, state)
