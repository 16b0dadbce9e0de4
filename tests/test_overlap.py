"""A rule an earlier, broader rule leaves without requests is reported once at start-up."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette

from ratelimit import RateLimitMiddleware, Rule, TokenBucket
from ratelimit.policy.overlap import shadowed


def rule(path: str, methods: list[str] | None = None, name: str | None = None) -> Rule:
    return Rule(path, methods, [TokenBucket("1/second")], name=name)


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        (rule("/v1/*"), rule("/v1/images")),
        (rule("/v1/*"), rule("/v1")),
        (rule("/v1/*"), rule("/v1/images/")),
        (rule("/v1/*"), rule("/v1/images/*")),
        (rule("/v1/*"), rule("/v1/users/{id}")),
        (rule("/*"), rule("/anything/{x:path}")),
        (rule("/v1/*", ["GET", "POST"]), rule("/v1/images", ["POST"])),
        (rule("/v1/images"), rule("/v1/images/", name="again")),
        (rule("/users/{id}"), rule("/users/me")),
        (rule("/users/{id}"), rule("/users/{uid}", name="again")),
        (rule("/files/{rest:path}"), rule("/files/a/b/c")),
    ],
)
def test_a_rule_under_an_earlier_broader_rule_is_found(earlier: Rule, later: Rule) -> None:
    """Prefix globs, templates and exact paths covering a later rule, methods included."""
    assert shadowed([earlier, later]) == [(later, earlier)]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        (rule("/v1/images"), rule("/v1/*")),  # the narrower rule first: right
        (rule("/v1/*", ["GET"]), rule("/v1/images", ["POST"])),
        (rule("/v1/*", ["GET"]), rule("/v1/images")),  # the later one takes every method
        (rule("/v1/*"), rule("/v10/images")),
        (rule("/v1/*"), rule("/v1{x}")),
        (rule("/users/{id}"), rule("/users/me/photos")),
        (rule("/users/{id}"), rule("/users/{id}/photos")),
        (rule("/users/{id}/*"), rule("/users/1/photos")),  # not compared: not certain
        (rule("/a/{x}/c"), rule("/a/{x:path}")),
        (rule("/v1/images"), rule("/v1/images/{id}")),
    ],
)
def test_rules_that_can_still_apply_are_not_reported(earlier: Rule, later: Rule) -> None:
    """Only certain shadowing is reported: no false alarm."""
    assert shadowed([earlier, later]) == []


def test_the_middleware_warns_once_naming_both_rules(caplog: pytest.LogCaptureFixture) -> None:
    """One WARNING at construction names the dead rule, the rule that wins, and the fix."""
    caplog.set_level(logging.WARNING, logger="ratelimit")
    rules = [rule("/v1/*", name="all"), rule("/v1/images", ["POST"], name="images"), rule("/v2")]
    RateLimitMiddleware(Starlette(), rules=rules)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "rule 'images' (/v1/images, POST) never applies" in warnings[0]
    assert "earlier rule 'all' (/v1/*, any method)" in warnings[0]
    assert "put the narrower rule first" in warnings[0]
