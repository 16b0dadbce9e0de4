"""`Rule`: which requests a set of limits applies to, and what each costs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from .._errors import ConfigError
from .._types import CostFunc
from .body import BODY_LIMIT, reads_body, takes_body
from .costs import MAX_COST, Cost, check_cost, check_static, units
from .limits import Concurrency, Limit, TokenBucket, check_name
from .paths import PathPattern

FailPolicy = Literal["open", "closed", "local"]
FAIL_POLICIES = ("open", "closed", "local")
__all__ = ["FAIL_POLICIES", "MAX_COST", "FailPolicy", "Rule", "derive_name", "routed_methods"]
_HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class Rule:
    """Limits applied together (all or nothing) to requests matching `path` and `methods`.

    `path` is exact (`/v1/models`), a prefix glob (`/v1/*`) or a template
    (`/users/{id}`), matched against the path the wrapped app routes (relative
    to `root_path`). A rule without a path (`Rule(name="images", limits=...)`)
    matches no request: it is decided by name only, by a route's dependency
    (`ratelimit.fastapi.RateLimit`) or `Limiter.acquire`. `methods=None`
    matches every method (and websockets);
    `"GET"` also matches HEAD, which routing answers with the GET endpoint.
    `cost` is units taken from each token bucket and window: an int, or a
    callable of the scope (sync or async), or of `(scope, body)` to read the JSON
    request body (see `policy.body`): the middleware then reads at most
    `body_limit` bytes of it (larger: 413) before deciding, as it does for a
    limit keyed by `keys.body_field`. `fail` says what to do when the
    backend cannot answer (None: the middleware's default). `shadow=True`
    decides and counts requests as usual but lets would-be refusals through
    (metrics count them as `shadow_limited` / `shadow_rejected`): to try a new
    rule on real traffic before enforcing it.
    """

    __slots__ = (
        "body_limit",
        "cost",
        "cost_reads_body",
        "fail",
        "limits",
        "methods",
        "name",
        "path",
        "pattern",
        "reads_body",
        "shadow",
    )

    def __init__(
        self,
        path: str | None = None,
        methods: Iterable[str] | None = None,
        limits: Sequence[Limit] = (),
        cost: Cost | CostFunc = 1,
        *,
        name: str | None = None,
        fail: FailPolicy | None = None,
        shadow: bool = False,
        body_limit: int = BODY_LIMIT,
    ) -> None:
        self.path = path
        #: None for a rule decided by name only.
        self.pattern = None if path is None else PathPattern(path)
        if path is None and methods is not None:
            raise ConfigError(
                "methods", "None for a rule without a path (it is decided by name)", methods
            )
        if path is None and name is None:
            raise ConfigError("name", "a name for a rule without a path", name)
        if methods is None:
            self.methods: frozenset[str] | None = None
        else:
            if isinstance(methods, str):
                raise ConfigError("methods", 'a list of HTTP methods like ["POST"]', methods)
            methods = list(methods)
            if not methods:
                raise ConfigError(
                    "methods", "at least one HTTP method (or None for every method)", methods
                )
            upper = []
            for i, m in enumerate(methods):
                if not isinstance(m, str) or m.upper() not in _HTTP_METHODS:
                    raise ConfigError(f"methods[{i}]", "an HTTP method like POST", m)
                upper.append(m.upper())
            self.methods = frozenset(upper)
        if isinstance(limits, Limit) or not isinstance(limits, Sequence) or not limits:
            raise ConfigError(
                "limits", "a non-empty list of TokenBucket, Concurrency, Window, Quota", limits
            )
        for i, lim in enumerate(limits):
            if not isinstance(lim, Limit):
                raise ConfigError(
                    f"limits[{i}]", "a TokenBucket, Concurrency, Window or Quota", lim
                )
        self.limits = tuple(limits)
        #: Whether the cost function takes `(scope, body)` (decided once, here).
        self.cost_reads_body = False
        if callable(cost):
            self.cost: Cost | CostFunc = cost
            self.cost_reads_body = takes_body(cost)
        else:
            try:
                self.cost = check_cost(cost)
            except ValueError as exc:
                raise ConfigError("cost", f"{exc}, or a callable (scope) -> cost", cost) from None
            for i, lim in enumerate(self.limits):
                if isinstance(lim, Concurrency) and not lim.weighted:
                    continue
                check_static(f"limits[{i}].counts", lim.counts, self.cost)
                taken = units(lim.counts, self.cost)
                if isinstance(lim, TokenBucket) and taken > lim.burst:
                    raise ConfigError(
                        f"limits[{i}].burst",
                        f"at least the rule's cost {taken} (else no request is ever admitted)",
                        lim.burst,
                    )
                if isinstance(lim, Concurrency) and taken > lim.limit:
                    raise ConfigError(
                        f"limits[{i}].limit",
                        f"at least the {taken} slots each request holds (else no request "
                        "is ever admitted)",
                        lim.limit,
                    )
        if not isinstance(body_limit, int) or isinstance(body_limit, bool) or body_limit < 1:
            raise ConfigError("body_limit", "a positive number of bytes", body_limit)
        #: Bytes of request body read at most for a rule that reads the body.
        self.body_limit = body_limit
        #: Whether the face must read the JSON body before deciding (cost or a key reads it).
        self.reads_body = self.cost_reads_body or any(reads_body(lim.key) for lim in self.limits)
        if name is None and path is not None:
            self.name = derive_name(path)
        else:
            self.name = check_name("name", name)
        if fail is not None and fail not in FAIL_POLICIES:
            raise ConfigError("fail", '"open", "closed" or "local"', fail)
        self.fail = fail
        if not isinstance(shadow, bool):
            raise ConfigError("shadow", "true or false", shadow)
        self.shadow = shadow

    def scaled(self, share: float) -> Rule:
        """This rule with every limit multiplied by `share` (for per-process fallbacks)."""
        return Rule(
            self.path,
            self.methods,
            [lim.scaled(share) for lim in self.limits],
            self.cost,
            name=self.name,
            fail=self.fail,
            shadow=self.shadow,
            body_limit=self.body_limit,
        )

    def limit_names(self) -> list[str]:
        """Each limit's policy name: its own, or its kind numbered when repeated."""
        names: list[str] = []
        for lim in self.limits:
            base = lim.name or lim.default_name()
            name, n = base, 1
            while name in names:
                n += 1
                name = f"{base}-{n}"
            names.append(name)
        return names

    def __repr__(self) -> str:
        methods = sorted(self.methods) if self.methods else None
        shadow = ", shadow=True" if self.shadow else ""
        return f"Rule({self.path!r}, methods={methods}, limits={list(self.limits)!r}{shadow})"


def derive_name(path: str) -> str:
    """A stable rule name from its path: `/v1/images/*` -> `v1.images`."""
    text = re.sub(r"[{}*:]", "", path).strip("/").replace("/", ".")
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    text = re.sub(r"\.+", ".", text).strip(".") or "root"
    if not text[0].isalnum():
        text = "r" + text
    return text[:64]


def routed_methods(methods: frozenset[str] | None) -> frozenset[str] | None:
    """The methods a rule matches: `methods`, and HEAD with GET (Starlette, like most
    routers, runs a GET endpoint for HEAD requests)."""
    if methods is not None and "GET" in methods:
        return methods | {"HEAD"}
    return methods


def has_leases(rule: Rule) -> bool:
    """Whether the rule holds concurrency slots while requests run."""
    return any(isinstance(lim, Concurrency) for lim in rule.limits)
