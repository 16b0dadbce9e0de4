"""The circuit breaker: open after repeated failures, one probe after the pause."""

from __future__ import annotations

import pytest

from ratelimit import ConfigError
from ratelimit.backends.breaker import CircuitBreaker


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only() -> None:
    """Failures interrupted by a success do not open it; `failures` in a row do."""
    b = CircuitBreaker(failures=3, clock=ManualClock())
    b.failure()
    b.failure()
    b.success()
    b.failure()
    b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open"
    assert not b.allow()


def test_half_open_lets_exactly_one_probe_through() -> None:
    """After `reset_after`, one call may probe; others are still refused until it answers."""
    clock = ManualClock()
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker(
        failures=1, reset_after=2.0, clock=clock, on_change=lambda a, z: changes.append((a, z))
    )
    b.failure()
    clock.now = 1.9
    assert not b.allow()
    clock.now = 2.0
    assert b.allow()
    assert b.state == "half_open"
    assert not b.allow()
    b.success()
    assert b.state == "closed"
    assert b.allow()
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_probe_reopens_for_another_pause() -> None:
    """A probe that fails opens the breaker again from that moment."""
    clock = ManualClock()
    b = CircuitBreaker(failures=1, reset_after=1.0, clock=clock)
    b.failure()
    clock.now = 1.0
    assert b.allow()
    b.failure()
    assert b.state == "open"
    clock.now = 1.5
    assert not b.allow()
    clock.now = 2.0
    assert b.allow()


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"failures": 0}, "failures"), ({"reset_after": 0}, "reset_after")]
)
def test_bad_settings_name_the_field(kwargs: dict[str, float], field: str) -> None:
    """Bad breaker settings fail at construction naming the field."""
    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
