"""The routes of the app a middleware wraps: exempt routes, and rules that match none.

Starlette and FastAPI keep their routes on the router (`app.routes`, a
`Mount`'s `routes`, a `Host`'s). At start-up the middleware walks them once,
flattened to full paths compiled by Starlette's own `compile_path`, to

- skip its rules for requests that a route marked with the `exempt` dependency
  serves (`Depends(exempt)` on the route, its router or the app), and
- warn about each path rule that matches none of the routes: a router's prefix
  changed or a typo, and the rule silently never fires.

Nothing here imports Starlette until routes are found (it is then installed):
routes are read by their attributes.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .._types import Scope
from ..policy.paths import route_path
from ..policy.rules import Rule, routed_methods

logger = logging.getLogger("ratelimit")

__all__ = ["Leaf", "Routes", "exempt", "find_routes"]

#: How many wrapping layers (`.app`) to look through for the router.
_DEPTH = 64
#: Sample texts for a route's path parameter: the first its convertor's regex takes.
_SAMPLES = ("1", "x", "00000000-0000-0000-0000-000000000000")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")


def exempt() -> None:
    """A FastAPI dependency that marks its route (or router) exempt from the middleware's
    rules: `dependencies=[Depends(exempt)]`. It does nothing when called; the
    middleware finds it in the app's routes at start-up.

    A route's own `RateLimit` dependencies still apply.
    """


class Leaf(NamedTuple):
    """One route, flattened: its full path, compiled as Starlette routes it."""

    path: str
    regex: re.Pattern[str]
    #: The methods it serves (HEAD with GET); None: any (websockets, mounted apps).
    methods: frozenset[str] | None
    exempt: bool
    #: A path it serves (each parameter replaced by a text its convertor takes).
    sample: str


def find_routes(app: object) -> list[Any] | None:
    """The routes of the first router found through `app`'s wrapping layers (`.app`)."""
    for _ in range(_DEPTH):
        if app is None:
            return None
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        app = getattr(app, "app", None)
    return None


def flatten(routes: Iterable[Any], prefix: str = "") -> list[Leaf]:
    """Every route under `routes` in routing order, mounts and hosts walked into."""
    from starlette.routing import compile_path

    # FastAPI (0.120 and later) keeps an included router as one lazy route; its
    # `iter_route_contexts` (as its OpenAPI uses) gives each route with its full path
    # and the router's dependencies.
    expand = getattr(sys.modules.get("fastapi.routing"), "iter_route_contexts", None)
    if expand is not None:
        routes = list(expand(list(routes)))
    leaves: list[Leaf] = []
    for route in routes:
        inner = getattr(route, "routes", None)
        path = getattr(route, "path", None)
        if isinstance(inner, list) and (inner or path is None):
            leaves.extend(flatten(inner, prefix + (path or "")))  # a Mount or a Host
            continue
        if not isinstance(path, str):
            path = "/{path:path}"  # a route of a kind we cannot read: it may serve anything
        elif inner is not None or not hasattr(route, "path_format"):
            path = path + "/{path:path}"  # a mounted app without routes: all below it
        full = prefix + path
        regex, _, convertors = compile_path(full)
        methods = getattr(route, "methods", None)
        leaves.append(
            Leaf(
                full,
                regex,
                None if methods is None else frozenset(methods),
                _marked(getattr(route, "dependant", None)),
                _sample(full, convertors),
            )
        )
    return leaves


def _marked(dependant: Any, depth: int = 0) -> bool:
    """Whether a FastAPI dependant (or one of its dependencies) is `exempt`."""
    if dependant is None or depth > _DEPTH:
        return False
    if getattr(dependant, "call", None) is exempt:
        return True
    return any(_marked(d, depth + 1) for d in getattr(dependant, "dependencies", ()))


def _sample(path: str, convertors: dict[str, Any]) -> str:
    def text(m: re.Match[str]) -> str:
        pattern = getattr(convertors.get(m.group(1)), "regex", ".*")
        return next((s for s in _SAMPLES if re.fullmatch(pattern, s)), "x")

    return _PARAM.sub(text, path)


def _rule_sample(rule: Rule) -> str:
    """A path `rule` matches: its own, without a final glob, each parameter as "1"."""
    path = rule.path or "/"
    if path.endswith("/*"):
        path = path[:-2] or "/"
    return _PARAM.sub("1", path)


class Routes:
    """An app's routes, flattened once: which requests an exempt route serves, and
    which rules match no route."""

    __slots__ = ("_exempt", "leaves")

    def __init__(self, leaves: Sequence[Leaf]) -> None:
        self.leaves = tuple(leaves)
        #: (index, leaf) of the exempt routes.
        self._exempt = tuple((i, leaf) for i, leaf in enumerate(self.leaves) if leaf.exempt)

    @property
    def any_exempt(self) -> bool:
        """Whether a route is marked exempt."""
        return bool(self._exempt)

    def exempt(self, scope: Scope) -> bool:
        """Whether the route that serves `scope` is marked exempt: an exempt route matches
        it and no route before it does (routing takes the first match)."""
        path = scope["path"]
        root = scope.get("root_path")
        if root:
            path = route_path(path, root)
        method = scope.get("method")
        for i, leaf in self._exempt:
            if _serves(leaf, path, method):
                return not any(_serves(other, path, method) for other in self.leaves[:i])
        return False

    def unmatched(self, rules: Iterable[Rule]) -> list[Rule]:
        """The rules with a path that match none of the routes (a request to a route
        never meets them)."""
        found = []
        for rule in rules:
            if rule.pattern is None:
                continue
            methods = routed_methods(rule.methods)
            sample = _rule_sample(rule)
            if not any(
                (methods is None or leaf.methods is None or methods & leaf.methods)
                and (rule.pattern.matches(leaf.sample) or leaf.regex.match(sample))
                for leaf in self.leaves
            ):
                found.append(rule)
        return found


def _serves(leaf: Leaf, path: str, method: str | None) -> bool:
    return leaf.regex.match(path) is not None and (
        leaf.methods is None or method is None or method in leaf.methods
    )


def routes_of(app: object, rules: Iterable[Rule]) -> Routes | None:
    """The routes of `app` (None if it has no router), warning once for each rule of
    `rules` that matches none of them."""
    found = find_routes(app)
    if not found:
        return None
    routes = Routes(flatten(found))
    for rule in routes.unmatched(rules):
        methods = "any method" if rule.methods is None else ", ".join(sorted(rule.methods))
        logger.warning(
            "ratelimit: rule %r (%s, %s) matches none of the app's routes, so it never "
            "applies: did a router's prefix change, or is the path mistyped?",
            rule.name,
            rule.path,
            methods,
        )
    return routes
