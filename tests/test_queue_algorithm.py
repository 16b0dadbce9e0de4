"""The waiting line's pure rules: order, fairness, shares, shedding and the wait estimate."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.algorithms import queue
from ratelimit.algorithms.queue import QueueState


def line(*entries: tuple[int, str, str]) -> QueueState:
    """A line with waiters (rank, fair, ticket) inserted in this order."""
    state = QueueState()
    for rank, fair, ticket in entries:
        state.insert(rank, fair, ticket)
    return state


def drain(state: QueueState, guaranteed: dict[int, int] | None = None) -> list[str]:
    """Tickets in the order freed slots would go to them (nothing returns in between)."""
    out = []
    while state:
        out.append(state.pop_next({}, guaranteed or {}).ticket)
    return out


def test_one_class_without_a_fair_key_is_first_in_first_out() -> None:
    state = line(*((0, "", f"t{i}") for i in range(6)))
    assert drain(state) == [f"t{i}" for i in range(6)]


def test_a_higher_class_goes_first_and_fifo_holds_within_each_class() -> None:
    state = line((1, "", "free1"), (0, "", "paid1"), (1, "", "free2"), (0, "", "paid2"))
    assert drain(state) == ["paid1", "paid2", "free1", "free2"]


def test_a_callers_backlog_does_not_push_others_behind_it() -> None:
    """A fires 5, then B and C one each: B's and C's first requests come after A's first,
    before A's second."""
    state = line(*((0, "A", f"a{i}") for i in range(1, 6)), (0, "B", "b1"), (0, "C", "c1"))
    assert drain(state) == ["a1", "b1", "c1", "a2", "a3", "a4", "a5"]


def test_fairness_keeps_its_round_as_the_line_moves() -> None:
    """After A's first is served, a new caller D slots in after the round's due requests."""
    state = line((0, "A", "a1"), (0, "A", "a2"), (0, "A", "a3"), (0, "B", "b1"))
    assert state.pop_next({}, {}).ticket == "a1"
    state.insert(0, "D", "d1")
    assert drain(state) == ["b1", "a2", "d1", "a3"]


def test_an_empty_line_starts_its_counters_afresh() -> None:
    state = line((0, "A", "a1"))
    state.pop_next({}, {})
    assert (state.seq, state.rounds, state.counts) == (0, {}, {})


def test_a_freed_slot_goes_first_to_a_class_below_its_guarantee() -> None:
    """paid (rank 0) holds 6 of 8, free (rank 1) holds 0 of its 2 guaranteed: free is next."""
    state = line((0, "", "paid1"), (1, "", "free1"), (0, "", "paid2"))
    guaranteed = {0: 6, 1: 2}
    assert state.pop_next({0: 6, 1: 0}, guaranteed).ticket == "free1"
    assert state.pop_next({0: 6, 1: 1}, guaranteed).ticket == "paid1"
    # At its guarantee, free waits behind paid again.
    state.insert(1, "", "free2")
    assert state.pop_next({0: 5, 1: 2}, guaranteed).ticket == "paid2"


def test_a_full_line_sheds_its_lowest_class_for_a_higher_newcomer() -> None:
    state = line((0, "", "paid1"), (1, "", "free1"), (1, "", "free2"))
    step = queue.enqueue(
        state, ticket="paid2", rank=0, fair="", capacity=3, max_position=3,
        in_use={}, guaranteed={},
    )  # fmt: skip
    assert step.outcome == "queued"
    assert step.shed is not None
    assert step.shed.ticket == "free2"
    assert step.position == 1
    assert drain(state) == ["paid1", "paid2", "free1"]


def test_a_full_line_refuses_a_newcomer_of_the_lowest_class() -> None:
    state = line((0, "", "paid1"), (1, "", "free1"))
    step = queue.enqueue(
        state, ticket="free2", rank=1, fair="", capacity=2, max_position=2,
        in_use={}, guaranteed={},
    )  # fmt: skip
    assert (step.outcome, step.shed, step.position, step.length) == ("full", None, 2, 2)
    assert [w.ticket for w in state.waiters] == ["paid1", "free1"]


def test_shedding_spares_a_waiter_its_guarantee_covers() -> None:
    """free holds 0 of its 2 guaranteed slots: its waiter is not shed for a paid newcomer."""
    state = line((0, "", "paid1"), (1, "", "free1"))
    step = queue.enqueue(
        state, ticket="paid2", rank=0, fair="", capacity=2, max_position=2,
        in_use={0: 6, 1: 0}, guaranteed={0: 6, 1: 2},
    )  # fmt: skip
    assert step.outcome == "full"


def test_a_newcomer_with_a_guarantee_claim_sheds_a_borrowing_waiter() -> None:
    """A line full of paid (over its share) and free below its share: free gets in."""
    state = line((0, "", "paid1"), (0, "", "paid2"))
    step = queue.enqueue(
        state, ticket="free1", rank=1, fair="", capacity=2, max_position=2,
        in_use={0: 8, 1: 0}, guaranteed={0: 6, 1: 2},
    )  # fmt: skip
    assert step.outcome == "queued"
    assert step.shed is not None
    assert step.shed.ticket == "paid2"


def test_a_wait_that_would_outlast_the_timeout_is_refused_at_once() -> None:
    state = line(*((0, "", f"t{i}") for i in range(5)))
    # 4 slots, 2 s each: slots free every 0.5 s; a 1.5 s timeout covers places 0..2.
    bound = queue.max_position(1.5, 4, 2.0, capacity=10)
    assert bound == 2
    step = queue.enqueue(
        state, ticket="new", rank=0, fair="", capacity=10, max_position=bound,
        in_use={}, guaranteed={},
    )  # fmt: skip
    assert (step.outcome, step.position) == ("too_long", 5)
    assert len(state) == 5
    assert queue.estimate_wait(5, 4, 2.0) == 3.0


def test_no_estimate_means_no_bound_and_a_hopeless_wait_refuses_even_the_head() -> None:
    assert queue.max_position(1.0, 4, 0.0, capacity=16) == 16
    assert queue.max_position(1.0, 1, 20.0, capacity=16) == -1


def test_ticket_ids_carry_their_class() -> None:
    ids = [queue.ticket_id(3, "abc-1"), queue.ticket_id(0, "abc-2"), "plain-lease"]
    assert [queue.rank_of(t) for t in ids] == [3, 0, -1]
    assert queue.in_use_by_rank(ids) == {3: 1, 0: 1, -1: 1}


waiters = st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["", "A", "B", "C"])), max_size=30)


@settings(max_examples=200, deadline=None)
@given(arrivals=waiters, capacity=st.integers(1, 12), pops=st.lists(st.booleans(), max_size=40))
def test_the_line_stays_bounded_sorted_and_loses_no_one(
    arrivals: list[tuple[int, str]], capacity: int, pops: list[bool]
) -> None:
    """Whatever arrives and leaves: never more than capacity, always in sort order, and every
    ticket ends exactly one way (served, shed, refused or still waiting)."""
    state = QueueState()
    served: list[str] = []
    shed: list[str] = []
    refused: list[str] = []
    steps = iter(pops)
    for n, (rank, fair) in enumerate(arrivals):
        ticket = f"t{n}"
        step = queue.enqueue(
            state, ticket=ticket, rank=rank, fair=fair, capacity=capacity,
            max_position=capacity, in_use={}, guaranteed={},
        )  # fmt: skip
        if step.outcome == "queued":
            if step.shed is not None:
                assert step.shed.rank > rank
                shed.append(step.shed.ticket)
        else:
            assert step.outcome == "full"
            refused.append(ticket)
        assert len(state) <= capacity
        assert state.waiters == sorted(state.waiters)
        assert sum(state.counts.values()) == len(state)
        if next(steps, False) and state:
            head = state.waiters[0]
            assert state.pop_next({}, {}) == head
            served.append(head.ticket)
    waiting = [w.ticket for w in state.waiters]
    everyone = served + shed + refused + waiting
    assert sorted(everyone) == sorted(f"t{n}" for n in range(len(arrivals)))
