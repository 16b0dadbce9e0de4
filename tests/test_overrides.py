"""Override values and their application to rules: pure, no I/O, no clock."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from ratelimit import Concurrency, ConfigError, Rule, TokenBucket, Window, keys
from ratelimit.policy.effective import (
    check_override,
    describe_limit,
    effective_rule,
    next_expiry,
    resolve,
)
from ratelimit.policy.overrides import Override

NOW = 1_700_000_000.0


def images() -> Rule:
    """A rule with one limit of each kind."""
    return Rule(
        "/v1/images",
        limits=[
            TokenBucket("100/day", burst=20, key=keys.header("x-api-key"), name="per-key"),
            Concurrency(8, queue=16, timeout=30.0, name="gpu"),
            Window("600/minute", name="window"),
        ],
        name="images",
    )


def ov(rule: str = "images", limit: str | None = None, **fields: Any) -> Override:
    fields.setdefault("expires_at", NOW + 3600)
    return Override(rule, limit, **fields)


# -- the value ----------------------------------------------------------------------------


BAD_OVERRIDES = [
    ({"rule": "no spaces", "rate": "1/minute"}, r"^rule: expected a name"),
    ({"limit": "{x}", "rate": "1/minute"}, r"^limit: expected a name"),
    ({"rate": "5 per fortnight"}, r"^rate: expected a rate like"),
    ({"burst": 0}, r"^burst: expected a positive integer, got 0$"),
    ({"burst": True}, r"^burst: expected a positive integer, got True$"),
    ({"slots": -1}, r"^slots: expected a positive integer"),
    ({"queue": -1}, r"^queue: expected an integer >= 0"),
    ({"timeout": math.inf}, r"^timeout: expected a number of seconds >= 0"),
    ({"factor": 0}, r"^factor: expected a number > 0 and <= 1000"),
    ({"factor": 1e6}, r"^factor: expected a number > 0 and <= 1000"),
    ({"factor": "half"}, r"^factor: expected a number"),
    ({}, r"^override: expected one change: rate/burst, slots/queue/timeout, factor, block"),
    ({"rate": "1/minute", "factor": 0.5}, r"^override: expected one kind of change per override"),
    ({"block": True, "shadow": True}, r"^override: expected one kind of change per override"),
    ({"limit": "gpu", "block": True}, r"^limit: expected no limit name: block applies to the"),
    ({"limit": "gpu", "shadow": True}, r"^limit: expected no limit name: shadow applies"),
    ({"factor": 0.5, "message": "down"}, r"^message: expected a message only with block=True"),
    ({"block": True, "message": "a\nb"}, r"^message: expected one line of text"),
    ({"rate": "1/minute", "reason": "x" * 501}, r"^reason: expected one line of text, 1 to 500"),
    ({"rate": "1/minute", "reason": "\x1b[31mred"}, r"^reason: expected one line of text"),
    ({"rate": "1/minute", "expires_at": -5}, r"^expires_at: expected seconds since the epoch"),
    ({"rate": "1/minute", "expires_at": math.nan}, r"^expires_at: expected seconds since"),
    ({"rate": "1/minute", "expires_at": "tomorrow"}, r"^expires_at: expected seconds since"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_OVERRIDES)
def test_bad_override_names_its_field(fields: dict[str, Any], message: str) -> None:
    """A malformed override raises ConfigError whose message starts with the bad field."""
    rule = fields.pop("rule", "images")
    limit = fields.pop("limit", None)
    with pytest.raises(ConfigError, match=message):
        ov(rule, limit, **fields)


def test_expiry_must_be_stated() -> None:
    """`expires_at` has no default: "until cleared" is written `expires_at=None`."""
    with pytest.raises(TypeError, match="expires_at"):
        Override("images", rate="1/minute")  # type: ignore[call-arg]
    assert Override("images", rate="1/minute", expires_at=None).expires_at is None


@pytest.mark.parametrize(
    ("fields", "kind", "slot", "text"),
    [
        ({"limit": "per-key", "rate": "3/day"}, "set", "images/per-key", "rate=3/day"),
        ({"rate": "3/day", "burst": 2}, "set", "images/*", "rate=3/day burst=2"),
        ({"limit": "gpu", "slots": 4, "timeout": 5}, "set", "images/gpu", "slots=4 timeout=5"),
        ({"factor": 0.5}, "factor", "images/*", "x0.5"),
        ({"block": True, "message": "maintenance"}, "block", "images/!", "block"),
        ({"shadow": True}, "shadow", "images/!", "shadow"),
        ({"shadow": False}, "shadow", "images/!", "enforce"),
    ],
)
def test_kind_slot_and_description(fields: dict[str, Any], kind: str, slot: str, text: str) -> None:
    """Each override has one kind, a storage slot by target, and a short description."""
    limit = fields.pop("limit", None)
    o = ov("images", limit, **fields)
    assert (o.kind, o.slot, o.describe()) == (kind, slot, text)


def test_time_left_and_expired() -> None:
    """An override is in force strictly before `expires_at`; until-cleared ones never lapse."""
    o = ov(rate="1/minute", expires_at=NOW + 10)
    assert o.time_left(NOW) == 10
    assert not o.expired(NOW + 9.999)
    assert o.expired(NOW + 10)
    assert o.time_left(NOW + 20) == 0
    forever = ov(rate="1/minute", expires_at=None)
    assert forever.time_left(NOW) is None
    assert not forever.expired(math.inf)


def test_json_round_trip_is_compact_and_exact() -> None:
    """The stored form is compact JSON without unset fields, and reads back equal."""
    o = ov(
        "images", "per-key", rate="3/day", burst=3, reason="free tier", created_at=NOW,
        created_by="ops@host",
    )  # fmt: skip
    text = o.to_json()
    assert " " not in text.replace("free tier", "")
    assert json.loads(text) == {
        "v": 1, "rule": "images", "limit": "per-key", "rate": "3/day", "burst": 3,
        "expires_at": NOW + 3600, "reason": "free tier", "created_at": NOW,
        "created_by": "ops@host",
    }  # fmt: skip
    assert Override.from_json(text) == o
    block = ov(block=True, message="GPU maintenance", expires_at=None)
    assert json.loads(block.to_json())["expires_at"] is None
    assert Override.from_json(block.to_json()) == block


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"^override: expected JSON"),
        ("[1, 2]", r"^override: expected a JSON object"),
        ('{"v":1,"rule":"images","rate":"1/minute"}', r"^expires_at: expected a value; the field"),
        ('{"v":2,"rule":"images","rate":"1/minute","expires_at":null}', r"^v: expected format"),
        (
            '{"v":1,"rule":"images","rate":"1/minute","expires_at":null,"ratio":2}',
            r"^ratio: expected a field of a stored override",
        ),
        ('{"v":1,"rule":"images","burst":"3","expires_at":null}', r"^burst: expected a positive"),
    ],
)
def test_bad_stored_form_is_refused_naming_the_field(text: str, message: str) -> None:
    """Whatever is in a store, reading it back validates exactly as constructing does."""
    with pytest.raises(ConfigError, match=message):
        Override.from_json(text)


# -- applying to a rule ---------------------------------------------------------------------


def numbers(rule: Rule) -> list[dict[str, Any]]:
    out = []
    for lim in rule.limits:
        d = describe_limit(lim)
        d.pop("per_second", None)
        d.pop("shared", None)
        out.append(d)
    return out


def test_no_override_gives_the_configured_rule_itself() -> None:
    """Without overrides in force the effective rule is the configured object (no rebuild)."""
    rule = images()
    e = effective_rule(rule, [ov("other", rate="1/minute")], NOW)
    assert e.rule is rule
    assert not e.changed
    assert e.by_limit == (None, None, None)


def test_rate_override_caps_the_burst_at_the_new_amount() -> None:
    """Tightening "100/day" burst 20 to "3/day" gives burst 3; the other limits are untouched."""
    e = effective_rule(images(), [ov(limit="per-key", rate="3/day")], NOW)
    assert numbers(e.rule) == [
        {"kind": "token-bucket", "rate": "3/day", "burst": 3},
        {"kind": "concurrency", "limit": 8, "queue": 16, "timeout": 30.0},
        {"kind": "window", "rate": "600/minute", "strategy": "fixed"},
    ]
    assert e.rule.limits[1] is e.configured.limits[1]
    assert e.by_limit[0] is not None
    assert e.by_limit[1:] == (None, None)


def test_loosening_a_rate_never_raises_the_burst_implicitly() -> None:
    """A higher rate keeps the configured burst; an explicit burst sets it."""
    e = effective_rule(images(), [ov(limit="per-key", rate="1000/day")], NOW)
    assert numbers(e.rule)[0] == {"kind": "token-bucket", "rate": "1000/day", "burst": 20}
    e = effective_rule(images(), [ov(limit="per-key", rate="1000/day", burst=50)], NOW)
    assert numbers(e.rule)[0]["burst"] == 50
    e = effective_rule(images(), [ov(limit="per-key", burst=5)], NOW)
    assert numbers(e.rule)[0] == {"kind": "token-bucket", "rate": "100/day", "burst": 5}


def test_concurrency_override_sets_slots_queue_and_timeout() -> None:
    """Halving the GPU pool by number; queue and timeout too; the key and lease are kept."""
    rule = images()
    e = effective_rule(rule, [ov(limit="gpu", slots=4, queue=0, timeout=2.5)], NOW)
    gpu = e.rule.limits[1]
    assert isinstance(gpu, Concurrency)
    assert (gpu.limit, gpu.queue, gpu.timeout) == (4, 0, 2.5)
    conf = rule.limits[1]
    assert isinstance(conf, Concurrency)
    assert (gpu.key, gpu.lease, gpu.shared, gpu.name) == (conf.key, conf.lease, True, "gpu")


def test_factor_scales_every_limit_of_the_rule_from_its_configured_value() -> None:
    """x0.5 on the rule halves every limit; rates read in the configured period."""
    e = effective_rule(images(), [ov(factor=0.5)], NOW)
    assert numbers(e.rule) == [
        {"kind": "token-bucket", "rate": "50/day", "burst": 10},
        {"kind": "concurrency", "limit": 4, "queue": 8, "timeout": 30.0},
        {"kind": "window", "rate": "300/minute", "strategy": "fixed"},
    ]
    odd = Rule("/x", limits=[TokenBucket("5/minute")], name="odd")
    assert describe_limit(effective_rule(odd, [ov("odd", factor=0.5)], NOW).rule.limits[0]) == {
        "kind": "token-bucket", "rate": "2.5/minute", "burst": 2, "per_second": 2.5 / 60,
        "shared": False,
    }  # fmt: skip


def test_limit_specific_override_wins_over_the_rule_wide_one() -> None:
    """Per limit, one override applies: its own if any, else the rule's; they never compound."""
    e = effective_rule(images(), [ov(factor=0.5), ov(limit="gpu", slots=2)], NOW)
    assert [d.get("limit", d.get("burst")) for d in numbers(e.rule)] == [10, 2, None]
    assert e.by_limit[1] is not None
    assert e.by_limit[1].slot == "images/gpu"


def test_rule_wide_rate_changes_the_rate_limits_and_leaves_concurrency_alone() -> None:
    """A rule-wide `rate` fits token buckets and windows only."""
    e = effective_rule(images(), [ov(rate="10/minute")], NOW)
    assert [d.get("rate") for d in numbers(e.rule)] == ["10/minute", None, "10/minute"]
    assert e.by_limit[1] is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (ov("imgs", rate="1/minute"), r"^rule: expected one of the rules 'images', got 'imgs'$"),
        (ov(limit="cpu", slots=2), r"^limit: expected one of the limits of rule 'images'"),
        (ov(limit="gpu", rate="1/minute"), r"^rate: expected a change a concurrency limit has "),
        (ov(limit="window", burst=3), r"^burst: expected a change a window limit has \(rate\)"),
    ],
)
def test_override_that_does_not_fit_the_rule_is_refused(override: Override, message: str) -> None:
    """check_override names the field that does not fit, before anything is stored."""
    with pytest.raises(ConfigError, match=message):
        check_override(override, [images()])


def test_rule_wide_change_must_fit_some_limit() -> None:
    """`slots` on a rule without a concurrency limit is refused, naming the limits it has."""
    rule = Rule("/x", limits=[TokenBucket("5/minute")], name="x")
    with pytest.raises(ConfigError, match=r"^slots: expected a change some limit of rule 'x' has"):
        check_override(ov("x", slots=3), [rule])


def test_override_the_rule_itself_refuses_is_refused() -> None:
    """A burst below the rule's cost would admit nothing: refused like the constructor does."""
    rule = Rule("/x", limits=[TokenBucket("5/minute", burst=5)], cost=3, name="x")
    with pytest.raises(ConfigError, match=r"^rule 'x'\.limits\[0\]\.burst: expected at least"):
        check_override(ov("x", burst=2), [rule])


def test_shadow_and_enforce_switch_the_rule_mode() -> None:
    """shadow=True puts a rule in shadow mode; shadow=False enforces a configured shadow rule."""
    assert effective_rule(images(), [ov(shadow=True)], NOW).rule.shadow is True
    trial = Rule("/t", limits=[TokenBucket("1/minute")], name="trial", shadow=True)
    assert effective_rule(trial, [ov("trial", shadow=False)], NOW).rule.shadow is False


def test_block_is_reported_and_leaves_the_limits_as_they_are() -> None:
    """A block is carried beside the rule (the engine refuses with 503), limits unchanged."""
    e = effective_rule(images(), [ov(block=True, message="maintenance"), ov(factor=0.5)], NOW)
    assert e.block is not None
    assert e.block.message == "maintenance"
    assert numbers(e.rule)[1]["limit"] == 4


def test_lapsed_overrides_are_ignored() -> None:
    """At `expires_at` an override stops applying: the configured limit is back."""
    o = ov(limit="gpu", slots=1, expires_at=NOW + 5)
    assert numbers(effective_rule(images(), [o], NOW + 4.9).rule)[1]["limit"] == 1
    assert effective_rule(images(), [o], NOW + 5).changed is False


def test_next_expiry_is_the_earliest_future_lapse() -> None:
    """The next time the effective rules change by themselves; None with nothing to lapse."""
    items = [ov(slots=1, expires_at=NOW + 9), ov(factor=2, expires_at=NOW + 3),
             ov(block=True, expires_at=None)]  # fmt: skip
    assert next_expiry(items, NOW) == NOW + 3
    assert next_expiry(items, NOW + 3) == NOW + 9
    assert next_expiry(items, NOW + 9) is None


def test_resolve_applies_what_fits_and_reports_the_rest() -> None:
    """One bad stored override (unknown rule, misfit) never keeps the good ones from applying."""
    other = Rule("/y", limits=[TokenBucket("10/minute")], name="other")
    good = ov(limit="gpu", slots=2)
    misfit = ov(limit="per-key", slots=2)
    stray = ov("gone", factor=0.5)
    res = resolve([images(), other], [good, misfit, stray], NOW)
    by_name = res.by_name()
    assert numbers(by_name["images"].rule)[1]["limit"] == 2
    assert by_name["images"].overrides == (good,)
    assert not by_name["other"].changed
    assert {(o.slot, e.field) for o, e in res.problems} == {("images/per-key", "slots"),
                                                            ("gone/*", "rule")}  # fmt: skip


def test_window_rate_override_keeps_the_strategy() -> None:
    """A window's new rate keeps its strategy and key."""
    rule = Rule("/w", limits=[Window("10/minute", strategy="moving", key=keys.GLOBAL)], name="w")
    lim = effective_rule(rule, [ov("w", rate="2/second")], NOW).rule.limits[0]
    assert isinstance(lim, Window)
    assert (lim.rate, lim.strategy, lim.key) == ("2/second", "moving", keys.GLOBAL)
    assert lim.shared
