"""Logging failures of user callables (key, cost, priority, fair_key functions).

The engine raises `CallableError` before asking the backend, so nothing was
consumed and the store is not at fault. The `Limiter` logs the error through
a `CallableErrorLog`: at ERROR, naming the callable, rule and limit, at most
once per callable every `every` seconds, so a flood of bad requests cannot
flood the log.
"""

from __future__ import annotations

import logging
import time

from .._errors import CallableError
from .._types import Clock


class CallableErrorLog:
    """Logs each `CallableError` at ERROR, at most once per callable every `every` seconds.

    The first error of a callable (its rule, limit and role) is logged at once
    with its traceback; later ones within `every` seconds are counted, and the
    next one logged after that says how many were suppressed. Memory is one
    entry per configured callable that ever failed.
    """

    __slots__ = ("_clock", "_logger", "_seen", "every")

    def __init__(
        self, logger: logging.Logger, every: float = 10.0, clock: Clock = time.monotonic
    ) -> None:
        self._logger = logger
        self.every = every
        self._clock = clock
        #: (role, callable, rule, limit) -> [time of the last record, errors suppressed since]
        self._seen: dict[tuple[str, str, str, str], list[float]] = {}

    def report(self, exc: CallableError, *, shadow: bool = False) -> bool:
        """Log `exc` unless its callable was logged less than `every` seconds ago;
        return whether it was logged."""
        now = self._clock()
        key = (exc.role, exc.callable, exc.rule, exc.limit)
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.every:
            seen[1] += 1
            return False
        suppressed = 0 if seen is None else int(seen[1])
        self._seen[key] = [now, 0]
        outcome = "passed on (shadow mode)" if shadow else "refused with 400"
        more = (
            f" ({suppressed} more like it in the last {now - seen[0]:.0f} s not logged)"
            if seen is not None and suppressed
            else ""
        )
        self._logger.error(
            "ratelimit: %s; the request was %s, nothing consumed (not a backend failure)%s",
            exc,
            outcome,
            more,
            exc_info=exc,
        )
        return True
