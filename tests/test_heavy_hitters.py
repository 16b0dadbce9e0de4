"""Space-Saving against exact counts: the guarantees it gives, on any stream."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.algorithms.heavy_hitters import Counted, SpaceSaving

#: Streams of (item, weight) from a small alphabet, skewed so some items are heavy.
streams = st.lists(
    st.tuples(
        st.one_of(st.sampled_from("abc"), st.text(alphabet="defghijklmnop", max_size=2)),
        st.integers(min_value=1, max_value=5),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(stream=streams, capacity=st.integers(min_value=1, max_value=12))
def test_space_saving_guarantees_hold_against_exact_counts(
    stream: list[tuple[str, int]], capacity: int
) -> None:
    """Counts sum to N; each overestimates by at most its error <= min count <= N/k;
    every item heavier than N/k is in the table."""
    sketch = SpaceSaving(capacity)
    exact: Counter[str] = Counter()
    for item, weight in stream:
        sketch.add(item, weight)
        exact[item] += weight
    n = sum(exact.values())
    table = sketch.top()
    assert sketch.total == n
    assert len(table) == len(sketch) <= capacity
    assert sum(c.estimate for c in table) == n
    floor = sketch.min_count()
    assert floor * capacity <= n
    if len(exact) <= capacity:  # never full enough to evict: exact
        assert {c.item: c.estimate for c in table} == dict(exact)
        assert all(c.error == 0 for c in table)
    for c in table:
        assert c.estimate - c.error <= exact[c.item] <= c.estimate
        assert c.error <= floor
    for item, weight in exact.items():
        if weight * capacity > n:
            assert item in sketch, (item, weight, n, capacity)
        if item not in sketch:
            assert weight <= floor


def test_top_is_heaviest_first_and_exact_below_capacity() -> None:
    """Below capacity nothing is evicted: exact counts, heaviest first, ties by item."""
    sketch = SpaceSaving(4)
    for item in "abacab":
        sketch.add(item)
    assert sketch.top() == [Counted("a", 3, 0), Counted("b", 2, 0), Counted("c", 1, 0)]
    assert sketch.top(1) == [Counted("a", 3, 0)]
    assert sketch.get("z") is None
    assert sketch.min_count() == 0


def test_a_new_item_takes_over_the_smallest_counter() -> None:
    """Full table: the newcomer inherits the smallest count as its error."""
    sketch = SpaceSaving(2)
    sketch.add("a", 5)
    sketch.add("b", 2)
    sketch.add("b", 1)
    sketch.add("c", 1)
    assert "b" not in sketch
    assert sketch.get("c") == Counted("c", 4, 3)
    assert sketch.min_count() == 4


def test_millions_of_distinct_items_stay_in_capacity() -> None:
    """An attacker rotating keys cannot grow the table (or its heap) past capacity."""
    sketch = SpaceSaving(16)
    sketch.add("heavy", 50_000)
    for i in range(100_000):
        sketch.add(f"ip-{i}")
    assert len(sketch) == 16
    assert len(sketch._heap) == 16
    assert sketch.top(1)[0].item == "heavy"


@pytest.mark.parametrize(
    ("capacity", "weight"), [(0, 1), (-1, 1), (True, 1), (2.0, 1), (1, 0), (1, -3)]
)
def test_bad_arguments_are_refused(capacity: object, weight: int) -> None:
    """Capacity must be a positive int; weight a positive int."""
    with pytest.raises(ValueError, match="must be a positive int"):
        SpaceSaving(capacity).add("a", weight)  # type: ignore[arg-type]


def test_clear_starts_a_new_period() -> None:
    """After clear() the table is empty and counts start again from zero."""
    sketch = SpaceSaving(2)
    sketch.add("a", 3)
    sketch.clear()
    sketch.add("b")
    assert sketch.top() == [Counted("b", 1, 0)]
    assert sketch.total == 1
