"""Silent misconfigurations fail at construction, naming the field (in Python and TOML)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from ratelimit import Concurrency, ConfigError, Rule, TokenBucket, Window, keys
from ratelimit.policy.config import load_config


def tier(scope: Any) -> str:
    return "paid"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: Rule("/x", methods=[], limits=[TokenBucket("1/second")]),
            r"^methods: expected at least one HTTP method",
        ),
        (
            lambda: TokenBucket("10/0 seconds"),
            r"^rate: expected a rate over a period longer than 0, got '10/0 seconds'",
        ),
        (lambda: Window("10 per 0 minutes"), r"^rate: expected a rate over a period longer than 0"),
        (lambda: TokenBucket("0/second"), r"^rate: expected a rate like"),
        (lambda: TokenBucket("10/second;20/minute"), r"^rate: expected one rate"),
        (
            lambda: Concurrency(8, shares={"paid": 0.5}),
            r"^shares: expected a priority= function as well",
        ),
        (
            lambda: Concurrency(3, priority=tier, shares={"paid": 0.2, "free": 0.5}),
            r"^shares\.paid: expected a fraction worth at least one of the 3 slots \(>= 1/3",
        ),
        (lambda: Concurrency(1, lease=1e16), r"^lease: expected at most 86400 seconds \(1 day"),
        (lambda: Concurrency(1, lease=86400.5), r"^lease: expected at most 86400 seconds"),
        (lambda: Concurrency(1, lease=math.inf), r"^lease: expected a number of seconds"),
        (lambda: Concurrency(1, lease=math.nan), r"^lease: expected a number of seconds"),
    ],
    ids=[
        "methods-empty",
        "rate-zero-period",
        "window-zero-period",
        "rate-zero-amount",
        "rate-two-rates",
        "shares-without-priority",
        "share-rounds-to-zero-slots",
        "lease-1e16",
        "lease-over-a-day",
        "lease-inf",
        "lease-nan",
    ],
)
def test_a_silent_misconfiguration_fails_at_construction(build: Any, message: str) -> None:
    """Each was accepted before and misbehaved at run time."""
    with pytest.raises(ConfigError, match=message):
        build()


def test_sane_neighbours_of_the_refused_values_are_accepted() -> None:
    """A day-long lease, a share worth one slot, a 10-second period: all fine."""
    assert Concurrency(1, lease=86400).lease == 86400.0
    pool = Concurrency(4, priority=tier, shares={"paid": 0.25})
    assert pool.guaranteed == ((0, 1),)
    assert TokenBucket("10/10 seconds").period == 10.0
    assert Rule("/x", methods=["GET"], limits=[TokenBucket("1/second", key=keys.GLOBAL)]).methods


def _config(rule: dict[str, Any] | None = None, **limit: Any) -> dict[str, Any]:
    base_limit = {"type": "concurrency", "limit": 4, **limit}
    base_rule = {"path": "/x", "limits": [{"type": "token_bucket", "rate": "1/second"}, base_limit]}
    return {"rules": [{**base_rule, **(rule or {})}]}


PRIORITY = f"{__name__}:tier"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_config({"methods": []}), r"^rules\[0\]\.methods: expected at least one HTTP method"),
        (
            _config({"limits": [{"type": "token_bucket", "rate": "10/0 seconds"}]}),
            r"^rules\[0\]\.limits\[0\]\.rate: expected a rate over a period longer than 0",
        ),
        (_config(shares={"paid": 0.5}), r"^rules\[0\]\.limits\[1\]\.shares: expected a priority="),
        (
            _config(priority=PRIORITY, shares={"paid": 0.1}),
            r"^rules\[0\]\.limits\[1\]\.shares\.paid: expected a fraction worth at least one",
        ),
        (_config(lease=1e16), r"^rules\[0\]\.limits\[1\]\.lease: expected at most 86400"),
        (_config(lease=math.inf), r"^rules\[0\]\.limits\[1\]\.lease: expected a number"),
    ],
    ids=[
        "methods-empty",
        "rate-zero-period",
        "shares-without-priority",
        "share-zero",
        "lease",
        "lease-inf",
    ],
)
def test_the_toml_path_gives_the_same_errors_under_the_field_path(
    config: dict[str, Any], message: str
) -> None:
    """From a config mapping, the same check fires, its field placed under rules[i]."""
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_a_toml_file_with_no_methods_fails_naming_the_field(tmp_path: Path) -> None:
    """The same through a real TOML file."""
    path = tmp_path / "ratelimit.toml"
    path.write_text(
        '[[rules]]\npath = "/x"\nmethods = []\n[[rules.limits]]\ntype = "token_bucket"\n'
        'rate = "10/second"\n'
    )
    with pytest.raises(ConfigError, match=r"^rules\[0\]\.methods: expected at least one"):
        load_config(path)
