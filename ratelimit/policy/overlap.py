"""Rules that can never apply: an earlier rule matches every request they would.

The first matching rule wins, so `Rule("/v1/*")` before `Rule("/v1/images")`
(with the same or fewer methods) leaves the second one dead. `shadowed`
finds such pairs from the rules' path strings and methods alone, and only
where it is certain: an exact path or a template under an earlier prefix
glob, an exact path an earlier template matches, the same pattern twice
(templates compared with their parameter names ignored). Anything less
plain (a template against a template of another shape) is left alone.
"""

from __future__ import annotations

import re

from .paths import PathPattern
from .rules import Rule

_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(:path)?\}")


def _strip(path: str) -> str:
    return path.rstrip("/") or "/"


def _shape(path: str) -> str:
    """A path pattern with its parameter names dropped: `/u/{id}` and `/u/{uid}` agree."""
    return _PARAM.sub(lambda m: "{:path}" if m.group(1) else "{}", _strip(path))


def _covers_path(earlier: str, later: str) -> bool:
    """Whether every request path `later` matches is matched by `earlier` (when certain)."""
    if earlier.endswith("/*"):
        base = _strip(earlier[:-2]) if earlier != "/*" else ""
        if "{" in base:
            return False  # a glob under a template: not compared
        if base == "":
            return True  # "/*": every path
        body = later[:-2] if later.endswith("/*") else later
        literal = body.split("{", 1)[0]
        if "{" in body:
            # A template: each path it matches starts with its text before the first "{".
            return literal.startswith(base + "/")
        body = _strip(body)
        return body == base or body.startswith(base + "/")
    if "{" not in earlier:  # an exact path covers only itself
        return "{" not in later and not later.endswith("/*") and _strip(later) == _strip(earlier)
    if later.endswith("/*"):
        return False
    if "{" not in later:
        return PathPattern(earlier).matches(_strip(later))
    return _shape(earlier) == _shape(later)


def _covers_methods(earlier: Rule, later: Rule) -> bool:
    if earlier.methods is None:
        return True
    return later.methods is not None and later.methods <= earlier.methods


def shadowed(rules: list[Rule] | tuple[Rule, ...]) -> list[tuple[Rule, Rule]]:
    """(later, earlier) for each rule an earlier rule certainly leaves without requests."""
    found = []
    # Rules without a path match no request.
    routed = [(r, r.path) for r in rules if r.path is not None]
    for j, (later, later_path) in enumerate(routed):
        for earlier, earlier_path in routed[:j]:
            if _covers_methods(earlier, later) and _covers_path(earlier_path, later_path):
                found.append((later, earlier))
                break
    return found
