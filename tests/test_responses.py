"""Header fields: the compiled `RateLimit` field renders exactly what the limits' states say."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit import Concurrency, Rule, TokenBucket, Window, keys
from ratelimit.asgi.responses import RateLimitField, policy_header, seconds
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


def test_each_dimension_reads_as_its_own_policy_with_its_unit() -> None:
    """Limits counting tokens or weighted slots say their unit in `qu`; requests stay plain."""
    key = keys.header("x-api-key")
    rule = Rule(
        "/v1/chat",
        limits=[
            TokenBucket("60/minute", key=key, name="rpm"),
            TokenBucket("40000/minute", key=key, name="itpm", counts="input_tokens"),
            Window(
                "1000000/hour",
                key=keys.GLOBAL,
                name="fleet",
                counts={"input_tokens": 1, "output_tokens": 4},
            ),
            Concurrency(8, name="gpus", counts="gpus"),
            Concurrency(4, name="streams"),
        ],
        cost={"input_tokens": 10, "output_tokens": 5, "gpus": 1},
    )
    assert policy_header(rule).decode() == (
        '"rpm";q=60;w=60, "itpm";q=40000;w=60;qu="input_tokens", '
        '"fleet";q=1000000;w=3600;qu="input_tokens+4*output_tokens", '
        '"gpus";q=8;qu="gpus", "streams";q=4;qu="concurrent-requests"'
    )
