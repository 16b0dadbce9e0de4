"""GCRA: exact against a token-bucket reference, and the bugs peers shipped."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.algorithms.gcra import EPSILON, gcra, gcra_tuple, refund


class ReferenceBucket:
    """The textbook token bucket GCRA must be equivalent to."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval = interval
        self.burst = burst
        self.tokens = float(burst)
        self.last: float | None = None

    def take(self, now: float, cost: int) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) / self.interval)
        self.last = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


def test_burst_is_requests_admissible_back_to_back_from_idle() -> None:
    """`burst` unit requests at one instant are admitted, the next is refused."""
    tat = None
    for i in range(5):
        r = gcra(tat, 100.0, 1, 12.0, 5)
        assert r.admitted, i
        assert r.remaining == 4 - i
        tat = r.tat
    r = gcra(tat, 100.0, 1, 12.0, 5)
    assert not r.admitted
    assert r.retry_after == pytest.approx(12.0)


def test_refused_request_consumes_nothing() -> None:
    """A refusal returns the state unchanged."""
    r1 = gcra(None, 0.0, 3, 1.0, 3)
    r2 = gcra(r1.tat, 0.0, 1, 1.0, 3)
    assert not r2.admitted
    assert r2.tat == r1.tat


def test_retry_after_is_the_time_actually_remaining() -> None:
    """After waiting exactly `retry_after`, the request is admitted; a hair earlier it is not."""
    tat = gcra(None, 0.0, 5, 12.0, 5).tat
    r = gcra(tat, 7.0, 1, 12.0, 5)  # 7 s into a 12 s interval: 5 s left, not a whole window
    assert not r.admitted
    assert r.retry_after == pytest.approx(5.0)
    assert not gcra(tat, 7.0 + r.retry_after - 0.001, 1, 12.0, 5).admitted
    assert gcra(tat, 7.0 + r.retry_after, 1, 12.0, 5).admitted


@pytest.mark.parametrize(
    ("interval", "burst"),
    [(0.1, 1), (0.001, 2), (0.25, 1), (0.4, 1)],
    ids=["10/s-burst1", "1000/s-burst2", "4/s-burst1", "2.5/s-burst1"],
)
def test_bucket_shorter_than_half_a_second_still_limits(interval: float, burst: int) -> None:
    """A bucket whose burst x interval is under 0.5 s still refuses the extra request.

    (A peer expired such keys before they were read, admitting everything.)
    """
    tat = None
    for _ in range(burst):
        r = gcra(tat, 50.0, 1, interval, burst)
        assert r.admitted
        tat = r.tat
    assert not gcra(tat, 50.0, 1, interval, burst).admitted


def test_fractional_refill_is_exact() -> None:
    """3/second refills one unit every third of a second, not in whole-second steps."""
    interval = 1 / 3
    tat = gcra(None, 0.0, 3, interval, 3).tat  # empty
    assert not gcra(tat, 0.3, 1, interval, 3).admitted
    r = gcra(tat, 1 / 3, 1, interval, 3)
    assert r.admitted
    assert r.remaining == 0
    r = gcra(tat, 0.5, 0, interval, 3)  # peek: 1.5 units back, one whole
    assert r.remaining == 1


def test_remaining_and_reset_after_admission() -> None:
    """`remaining` counts whole units left; `reset_after` is the time until full."""
    r = gcra(None, 10.0, 2, 6.0, 10)
    assert r.remaining == 8
    assert r.reset_after == pytest.approx(12.0)


def test_cost_zero_peeks_without_consuming() -> None:
    """Cost 0 is always admitted and leaves the state as it was."""
    tat = gcra(None, 0.0, 3, 1.0, 3).tat
    r = gcra(tat, 0.0, 0, 1.0, 3)
    assert r.admitted
    assert r.tat == tat
    assert r.remaining == 0


def test_refund_gives_units_back_and_drops_full_state() -> None:
    """Refund undoes an admission; a refund to full returns None (no state to keep)."""
    tat = gcra(None, 0.0, 2, 1.0, 5).tat
    assert refund(tat, 0.0, 1, 1.0) == pytest.approx(1.0)
    assert refund(tat, 0.0, 2, 1.0) is None


# Dyadic intervals and times make every float operation exact, so GCRA and the
# reference must agree on every single decision, boundaries included.
dyadic_interval = st.sampled_from([0.125, 0.25, 0.5, 1.0, 2.0, 4.0])
arrivals = st.lists(
    st.tuples(st.integers(min_value=0, max_value=40), st.integers(min_value=0, max_value=4)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(interval=dyadic_interval, burst=st.integers(min_value=1, max_value=6), seq=arrivals)
def test_gcra_decides_exactly_like_a_token_bucket(
    interval: float, burst: int, seq: list[tuple[int, int]]
) -> None:
    """On exact (dyadic) times GCRA and the reference bucket agree on every decision."""
    ref = ReferenceBucket(interval, burst)
    tat: float | None = None
    now = 0.0
    for step, cost in seq:
        now += step / 8
        r = gcra(tat, now, cost, interval, burst)
        assert r.admitted == ref.take(now, cost), (now, cost)
        if r.admitted:
            tat = r.tat
        assert r.remaining == math.floor(ref.tokens + 1e-12)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.01, max_value=1000.0),
    burst=st.integers(min_value=1, max_value=50),
    seq=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=5.0), st.integers(min_value=0, max_value=5)),
        min_size=1,
        max_size=80,
    ),
)
def test_admitted_cost_never_exceeds_burst_plus_rate_times_elapsed(
    rate: float, burst: int, seq: list[tuple[float, int]]
) -> None:
    """Over any span between two admissions, admitted cost <= burst + rate x span."""
    interval = 1.0 / rate
    tat: float | None = None
    now = 0.0
    admitted: list[tuple[float, int]] = []
    for gap, cost in seq:
        now += gap
        r = gcra(tat, now, cost, interval, burst)
        if r.admitted:
            tat = r.tat
            admitted.append((now, cost))
        else:
            assert r.tat == (tat if tat is not None else now)
            assert r.retry_after > 0
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            span = admitted[j][0] - admitted[i][0]
            assert total <= burst + span * rate + 1e-6 + EPSILON * rate


@settings(max_examples=200, deadline=None)
@given(
    interval=st.floats(min_value=0.001, max_value=100.0),
    burst=st.integers(min_value=1, max_value=20),
    used=st.integers(min_value=1, max_value=20),
    at=st.floats(min_value=0.0, max_value=50.0),
)
def test_waiting_retry_after_always_admits(
    interval: float, burst: int, used: int, at: float
) -> None:
    """Whenever a request is refused, retrying after `retry_after` admits it."""
    tat = gcra(None, 0.0, min(used, burst), interval, burst).tat
    r = gcra(tat, at, 1, interval, burst)
    if not r.admitted:
        assert gcra(tat, at + r.retry_after, 1, interval, burst).admitted


def _bits(values: tuple[object, ...]) -> list[object]:
    """Each field with its type, floats by their IEEE bits (so -0.0 differs from 0.0)."""
    return [(type(v), struct.pack("<d", v) if isinstance(v, float) else v) for v in values]


times = st.floats(min_value=0.0, max_value=1e9) | st.sampled_from([0.0, 1e-9, 1.0, 12.0])


@settings(max_examples=500, deadline=None)
@given(
    tat=st.none() | times,
    now=times,
    cost=st.integers(min_value=0, max_value=100),
    interval=st.floats(min_value=1e-9, max_value=1e6) | st.sampled_from([1e-6, 0.125, 12.0]),
    burst=st.integers(min_value=1, max_value=10**6),
)
def test_gcra_tuple_is_gcra_bit_for_bit(
    tat: float | None, now: float, cost: int, interval: float, burst: int
) -> None:
    """The memory backend's plain-tuple step returns exactly `gcra`'s fields."""
    assert _bits(gcra_tuple(tat, now, cost, interval, burst)) == _bits(
        tuple(gcra(tat, now, cost, interval, burst))
    )


def test_gcra_tuple_follows_gcra_through_a_sequence() -> None:
    """Fed its own state back, the tuple step keeps agreeing with `gcra` (admits and refusals)."""
    tat_a: float | None = None
    tat_b: float | None = None
    for i in range(200):
        now, cost = i * 0.37, i % 4
        a, b = gcra(tat_a, now, cost, 0.5, 5), gcra_tuple(tat_b, now, cost, 0.5, 5)
        assert _bits(b) == _bits(tuple(a))
        tat_a, tat_b = a.tat, b[1]


@pytest.mark.parametrize("now", [0.0, 3.3, 12345.678, 98765.4321, 777777.7, 1.76e9 + 0.123457])
@pytest.mark.parametrize("interval", [0.001, 0.2, 12.0, 3.1e7, 3.1e9])
def test_a_burst_sized_request_from_idle_is_admitted_whatever_the_clock_reads(
    now: float, interval: float
) -> None:
    """A full bucket admits `burst` units at once, however large the clock and interval."""
    for burst in (1, 3, 7, 100):
        if burst * interval > 3.2e9:
            continue
        assert gcra(None, now, burst, interval, burst).admitted
        assert gcra(now - 1.0, now, burst, interval, burst).admitted
