"""Header fields: the compiled `RateLimit` field renders exactly what the limits' states say."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit import Concurrency, Rule, TokenBucket, Window, keys
from ratelimit.asgi.responses import RateLimitField, seconds
from ratelimit.backends.base import CheckResult
from ratelimit.core.decision import Decision
from ratelimit.core.plan import SKIPPED, Plan
from ratelimit.policy.limits import Limit


def ratelimit_header(decision: Decision) -> bytes:
    """The reference `RateLimit` field value, from the decision's per-limit states
    (whose `reset_after` is the one reset-time formula, `core.plan.reset_after`)."""
    parts = []
    for s in decision.states:
        if s.exempt or s.skipped:
            continue
        if s.limit.__class__ is Concurrency:
            parts.append(f'"{s.name}";r={s.remaining}')
        else:
            parts.append(f'"{s.name}";r={s.remaining};t={seconds(s.reset_after)}')
    return ", ".join(parts).encode("ascii")


LIMITS: list[Limit] = [
    TokenBucket("5/minute", burst=3, key=keys.header("x-api-key"), name="per-key"),
    TokenBucket("1000000/second", key=keys.client_ip(), name="fast"),
    TokenBucket("7/hour", burst=1, name="slow"),
    Concurrency(8, key=keys.GLOBAL, name="gpu"),
    Window("10/minute", name="window"),
]

#: Times around the limits' own steps (12 s, 24 s, ~1 s), where rounding decides.
EDGES = [0.0, 5e-10, 2e-9, 1e-6, 0.5, 0.999999, 1.0, 1.0 + 5e-10, 12.0, 24.0, 24.05, 3600.0]
times = st.sampled_from(EDGES) | st.floats(min_value=0.0, max_value=1e5, allow_nan=False)
remaining = st.sampled_from([0, 1]) | st.integers(0, 10**6)
results = (
    st.none() | st.just(SKIPPED) | st.builds(CheckResult, st.booleans(), remaining, times, times)
)


def test_compiled_field_matches_the_reference_on_a_grid_of_edges() -> None:
    """Every limit kind, admitted or not, none/some left, at every edge time: same bytes."""
    for lim in LIMITS:
        rule = Rule("/x", limits=[lim])
        field, plan = RateLimitField(rule), Plan(rule)
        for admitted, remaining, retry, reset in itertools.product(
            (True, False), (0, 1, 7), EDGES, EDGES
        ):
            got: list[CheckResult | None] = [CheckResult(admitted, remaining, retry, reset)]
            reference = ratelimit_header(Decision(rule, admitted, 200, 0.0, plan, got))
            assert field.render(got) == reference, (lim, got)


@st.composite
def rule_and_results(draw: st.DrawFn) -> tuple[Rule, list[CheckResult | None]]:
    picked = draw(
        st.lists(st.sampled_from(range(len(LIMITS))), min_size=1, max_size=4, unique=True)
    )
    got = draw(st.lists(results, min_size=len(picked), max_size=len(picked)))
    return Rule("/x", limits=[LIMITS[i] for i in picked]), got


@settings(max_examples=500)
@given(rule_and_results())
def test_compiled_field_renders_the_reference_bytes(
    case: tuple[Rule, list[CheckResult | None]],
) -> None:
    """For any rule shape and any backend results, both renderings give the same bytes."""
    rule, got = case
    decision = Decision(rule, True, 200, 0.0, Plan(rule), got)
    assert RateLimitField(rule).render(decision.results) == ratelimit_header(decision)


def test_compiled_field_of_a_scaled_rule_uses_its_own_bucket() -> None:
    """A scaled copy of a rule renders `t` from its own burst and interval, as the reference."""
    rule = Rule("/x", limits=[TokenBucket("10/minute", burst=10, name="b")])
    scaled = rule.scaled(0.5)
    # Admitted with nothing left: `t` is the time until the next unit of that bucket.
    last = [CheckResult(True, 0, 0.0, 60.0)]
    assert RateLimitField(rule).render(last) == b'"b";r=0;t=6'
    assert RateLimitField(scaled).render(last) == ratelimit_header(
        Decision(scaled, True, 200, 0.0, Plan(scaled), list(last))
    )
