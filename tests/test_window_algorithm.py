"""Window algorithms: against reference models that keep every admitted hit."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.algorithms import window

PERIOD = st.sampled_from([0.5, 1.0, 3.0, 60.0])
LIMIT = st.integers(1, 8)
#: (time step in periods, op, cost): op "hit" or "refund" (of an earlier admitted hit).
OPS = st.lists(
    st.tuples(
        st.floats(0, 1.5, allow_nan=False),
        st.sampled_from(["hit", "hit", "hit", "peek", "refund"]),
        st.integers(1, 4),
    ),
    min_size=1,
    max_size=40,
)


@dataclass
class History:
    """Every admitted hit: [time, units still counted]; the reference's only state."""

    hits: list[list[Any]] = field(default_factory=list)
    #: Fixed windows opened so far (start times): a window opens at a hit after the last closed.
    starts: list[float] = field(default_factory=list)


def ref_fixed(h: History, now: float, cost: int, limit: int, period: float) -> tuple[bool, int]:
    start = h.starts[-1] if h.starts and now < h.starts[-1] + period else None
    count = sum(u for t, u in h.hits if start is not None and t >= start)
    ok = cost == 0 or count + cost <= limit
    if ok and cost:
        if start is None:
            h.starts.append(now)
        h.hits.append([now, cost])
        count += cost
    return ok, limit - count


def ref_sliding(h: History, now: float, cost: int, limit: int, period: float) -> tuple[bool, int]:
    index = math.floor(now / period)
    prev = sum(u for t, u in h.hits if math.floor(t / period) == index - 1)
    cur = sum(u for t, u in h.hits if math.floor(t / period) == index)
    left = (index + 1) - now / period
    ok = cost == 0 or math.floor(prev * left + cur) + cost <= limit
    if ok and cost:
        h.hits.append([now, cost])
        cur += cost
    return ok, max(0, limit - math.floor(prev * left + cur))


def ref_moving(h: History, now: float, cost: int, limit: int, period: float) -> tuple[bool, int]:
    count = sum(u for t, u in h.hits if t > now - period)
    ok = cost == 0 or count + cost <= limit
    if ok and cost:
        h.hits.append([now, cost])
        count += cost
    return ok, limit - count


REFERENCES = {"fixed": ref_fixed, "sliding": ref_sliding, "moving": ref_moving}


@pytest.mark.parametrize("strategy", ["fixed", "sliding", "moving"])
@settings(max_examples=300, deadline=None)
@given(period=PERIOD, limit=LIMIT, ops=OPS, origin=st.floats(0, 1e6, allow_nan=False))
def test_each_strategy_admits_and_counts_as_its_reference_with_exact_refunds(
    strategy: str, period: float, limit: int, ops: list[tuple[float, str, int]], origin: float
) -> None:
    """Admission and remaining equal a model keeping every hit; a refund removes its hit."""
    step, refund, idle_at = window.STRATEGIES[strategy]
    ref = REFERENCES[strategy]
    h = History()
    state: Any = None
    now = math.floor(origin / period) * period  # a window boundary, then anywhere
    for dt, op, cost in ops:
        now += dt * period
        if op == "refund":
            if h.hits:
                hit = h.hits.pop(0)
                state = refund(state, now, hit[1], period, hit[0])
                if h.starts and not any(t >= h.starts[-1] for t, _ in h.hits):
                    h.starts.pop()  # the window's only hits were refunded: it never opened
            continue
        c = 0 if op == "peek" else cost
        r = step(state, now, c, limit, period)
        ok, remaining = ref(h, now, c, limit, period)
        assert (r.admitted, r.remaining) == (ok, remaining), (now, op, c)
        if not r.admitted:
            assert r.retry_after >= 0
            # Refused: nothing changes (an expired state may come back as None).
            assert r.state is state or r.state is None
            assert step(r.state, now, 0, limit, period) == step(state, now, 0, limit, period)
        state = r.state
        if r.admitted and c and state is not None:
            assert idle_at(state, period) > now


@pytest.mark.parametrize("strategy", ["fixed", "sliding", "moving"])
@settings(max_examples=200, deadline=None)
@given(period=PERIOD, limit=LIMIT, ops=OPS)
def test_a_refused_request_is_admitted_just_after_retry_after_and_not_before(
    strategy: str, period: float, limit: int, ops: list[tuple[float, str, int]]
) -> None:
    """retry_after is when the same request would be admitted, the counts being as they are."""
    step = window.STRATEGIES[strategy][0]
    state: Any = None
    now = 1000.0 * period
    for dt, _, cost in ops:
        now += dt * period
        r = step(state, now, cost, limit, period)
        if r.admitted:
            state = r.state
            continue
        if cost > limit:
            continue  # never admitted; retry_after is only a hint
        slack = 1e-6 * period
        assert step(state, now + r.retry_after + slack, cost, limit, period).admitted
        if r.retry_after > 2 * slack:
            assert not step(state, now + r.retry_after - slack, cost, limit, period).admitted


@pytest.mark.parametrize("strategy", ["fixed", "sliding", "moving"])
def test_the_state_is_empty_again_at_idle_at(strategy: str) -> None:
    """At idle_at nothing is counted: the store may drop the key then."""
    step, _, idle_at = window.STRATEGIES[strategy]
    r = step(None, 12.3, 2, 5, 10.0)
    later = idle_at(r.state, 10.0)
    peek = step(r.state, later, 0, 5, 10.0)
    assert (peek.remaining, peek.reset_after) == (5, 0.0)


def test_fixed_window_opens_at_the_first_hit_and_resets_a_period_later() -> None:
    """As `limits`' fixed window: reset = first hit + period, remaining = limit - count."""
    r = window.fixed(None, 100.0, 1, 3, 60.0)
    assert (r.admitted, r.remaining, r.reset_after) == (True, 2, 60.0)
    r = window.fixed(r.state, 130.0, 2, 3, 60.0)
    assert (r.admitted, r.remaining, r.reset_after) == (True, 0, 30.0)
    refused = window.fixed(r.state, 150.0, 1, 3, 60.0)
    assert (refused.admitted, refused.retry_after, refused.reset_after) == (False, 10.0, 10.0)
    assert window.fixed(r.state, 160.0, 3, 3, 60.0).admitted


def test_sliding_window_weights_the_previous_window_by_what_is_left_of_it() -> None:
    """`limits`' sliding window counter: 10 hits last window, 25% into this one -> 7.5 counted."""
    state: Any = None
    for _ in range(10):
        state = window.sliding(state, 0.0, 1, 10, 60.0).state
    r = window.sliding(state, 75.0, 0, 10, 60.0)
    assert r.remaining == 10 - 7
    assert window.sliding(state, 75.0, 3, 10, 60.0).admitted
    assert not window.sliding(state, 75.0, 4, 10, 60.0).admitted


def test_moving_window_counts_the_last_period_exactly() -> None:
    """Hits leave the moving window one period after they were made, each on its own."""
    state: Any = None
    for t in (0.0, 1.0, 2.0):
        state = window.moving(state, t, 1, 3, 10.0).state
    refused = window.moving(state, 5.0, 1, 3, 10.0)
    assert (refused.admitted, refused.retry_after, refused.reset_after) == (False, 5.0, 5.0)
    assert window.moving(state, 10.5, 1, 3, 10.0).admitted


def test_a_refund_after_the_window_closed_gives_nothing_to_the_next_window() -> None:
    """A hit's units go back to its own window, never to a later one."""
    a = window.fixed(None, 0.0, 3, 3, 10.0).state
    b = window.fixed(a, 15.0, 3, 3, 10.0).state  # a new window, full
    assert window.refund_fixed(b, 16.0, 3, 10.0, 0.0) == b
    s = window.sliding(None, 0.0, 3, 3, 10.0).state
    s = window.sliding(s, 25.0, 3, 3, 10.0).state
    assert window.refund_sliding(s, 26.0, 3, 10.0, 0.0) == s
