"""Concurrency leases: never more than the limit live, dead holders free their slots."""

from __future__ import annotations

from _lease_model import acquire
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.algorithms import leases


def test_acquire_up_to_limit_then_refuse() -> None:
    """`limit` leases are granted, the next is refused and changes nothing."""
    table: dict[str, float] = {}
    for i in range(3):
        assert acquire(table, f"l{i}", 0.0, 3, 10.0).admitted
    r = acquire(table, "l3", 0.0, 3, 10.0)
    assert not r.admitted
    assert r.in_use == 3
    assert "l3" not in table


def test_expired_lease_frees_its_slot() -> None:
    """A lease not renewed within its ttl no longer counts."""
    table: dict[str, float] = {}
    acquire(table, "a", 0.0, 1, 5.0)
    assert not acquire(table, "b", 4.9, 1, 5.0).admitted
    assert acquire(table, "b", 5.0, 1, 5.0).admitted


def test_renew_extends_only_live_leases() -> None:
    """Renewal pushes a live lease's expiry; a dead one cannot be revived."""
    table: dict[str, float] = {}
    acquire(table, "a", 0.0, 1, 5.0)
    assert leases.renew(table, "a", 4.0, 5.0)
    assert table["a"] == 9.0
    assert not leases.renew(table, "a", 9.0, 5.0)
    assert "a" not in table


def test_release_is_true_once() -> None:
    """Releasing reports whether the lease was held: True once, then False."""
    table: dict[str, float] = {}
    acquire(table, "a", 0.0, 1, 5.0)
    assert leases.release(table, "a")
    assert not leases.release(table, "a")


ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release", "renew", "tick"]),
        st.integers(min_value=0, max_value=9),
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(min_value=1, max_value=5), seq=ops)
def test_live_leases_never_exceed_the_limit(limit: int, seq: list[tuple[str, int]]) -> None:
    """Whatever the interleaving of acquire, release, renew and time, live <= limit."""
    table: dict[str, float] = {}
    now = 0.0
    for op, n in seq:
        lease = f"l{n}"
        if op == "acquire" and lease not in table:
            acquire(table, lease, now, limit, 3.0)
        elif op == "release":
            leases.release(table, lease)
        elif op == "renew":
            leases.renew(table, lease, now, 3.0)
        else:
            now += n / 4
        assert leases.live(table, now) <= limit
