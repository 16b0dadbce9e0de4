"""Space-Saving against exact counts: the guarantees it gives, on any stream."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.algorithms.heavy_hitters import Counted, SpaceSaving, Summary, merge

#: (item, weight) from a small alphabet, skewed so some items are heavy.
weighted = st.tuples(
    st.one_of(st.sampled_from("abc"), st.text(alphabet="defghijklmnop", max_size=2)),
    st.integers(min_value=1, max_value=5),
)
#: Streams of them.
streams = st.lists(weighted, max_size=300)


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


@settings(max_examples=300, deadline=None)
@given(
    stream=st.lists(st.tuples(weighted, st.integers(0, 2)), max_size=300),
    capacity=st.integers(min_value=1, max_value=8),
    k=st.one_of(st.none(), st.integers(min_value=1, max_value=8)),
)
def test_merged_summaries_keep_the_guarantees_of_one_table(
    stream: list[tuple[tuple[str, int], int]], capacity: int, k: int | None
) -> None:
    """Three workers' tables, cut to k, merged: totals add up; count >= true >= count - error;
    an item left out weighed at most the sum of the floors."""
    sketches = [SpaceSaving(capacity) for _ in range(3)]
    exact: Counter[str] = Counter()
    for (item, weight), worker in stream:
        sketches[worker].add(item, weight)
        exact[item] += weight
    summaries = [s.summary(k) for s in sketches]
    total, merged = merge(summaries)
    assert total == sum(exact.values())
    floors = sum(s.floor for s in summaries)
    for c in merged:
        assert c.estimate - c.error <= exact[c.item] <= c.estimate
    assert [c.estimate for c in merged] == sorted((c.estimate for c in merged), reverse=True)
    shown = {c.item for c in merged}
    for item, weight in exact.items():
        if item not in shown:
            assert weight <= floors


def test_merging_uncut_tables_below_capacity_is_exact() -> None:
    """No table full, none cut: floors are 0 and merged counts are the exact sums."""
    a, b = SpaceSaving(4), SpaceSaving(4)
    for item in "aab":
        a.add(item)
    for item in "abcc":
        b.add(item)
    assert a.summary() == Summary(3, 0, (Counted("a", 2, 0), Counted("b", 1, 0)))
    assert merge([a.summary(), b.summary()]) == (
        7,
        [Counted("a", 3, 0), Counted("b", 2, 0), Counted("c", 2, 0)],
    )


def test_a_cut_summary_charges_its_floor_to_the_items_it_left_out() -> None:
    """Worker a shows only its heaviest; b's item unseen in a may have had up to a's floor there."""
    a, b = SpaceSaving(4), SpaceSaving(4)
    a.add("x", 5)
    a.add("y", 2)
    b.add("y", 3)
    b.add("z", 1)
    assert a.summary(1) == Summary(7, 2, (Counted("x", 5, 0),))
    assert merge([a.summary(1), b.summary()]) == (
        11,
        [Counted("x", 5, 0), Counted("y", 5, 2), Counted("z", 3, 2)],
    )
