"""Path patterns for rules: exact paths, prefix globs and templates.

- `/v1/models`: exactly that path.
- `/v1/*`: `/v1` and everything below it.
- `/users/{id}`: one non-empty path segment per `{name}`; `{name:path}` takes the
  rest, which may be empty (`/files/` falls under `/files/{rest:path}`), as in
  Starlette's routing.

A trailing slash is ignored on both sides, so `/v1/models/` cannot slip past
a rule for `/v1/models`. Rules see the path the wrapped app routes: relative
to the scope's `root_path` (see `route_path`).
"""

from __future__ import annotations

import re

from .._errors import ConfigError

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")


def _strip(path: str) -> str:
    return path.rstrip("/") or "/"


class PathPattern:
    """A compiled path pattern; `matches(path)` is the hot-path call."""

    __slots__ = ("_exact", "_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str) or not pattern.startswith("/"):
            raise ConfigError("path", 'a path starting with "/", like "/v1/*"', pattern)
        if "*" in pattern[:-1] or (pattern.endswith("*") and not pattern.endswith("/*")):
            raise ConfigError("path", 'a glob only as a final "/*", like "/v1/*"', pattern)
        self.pattern = pattern
        self._exact: str | None = None
        self._regex: re.Pattern[str] | None = None
        body = pattern[:-2] if pattern.endswith("/*") else pattern
        has_params = "{" in body or "}" in body
        if not has_params and not pattern.endswith("/*"):
            self._exact = _strip(pattern)
            return
        parts = []
        pos = 0
        for m in _PARAM.finditer(body):
            literal = body[pos : m.start()]
            if "{" in literal or "}" in literal:
                raise ConfigError("path", 'parameters written as "{name}"', pattern)
            pos = m.end()
            if not m.group(2):
                parts.append(re.escape(literal) + "[^/]+")
            elif literal.endswith("/") and body[pos:] in ("", "/"):
                # A final `/{rest:path}` may be empty; its slash is a trailing one then.
                parts.append(re.escape(literal[:-1]) + "(?:/.*)?")
            else:
                parts.append(re.escape(literal) + ".*")
        tail = body[pos:]
        if "{" in tail or "}" in tail:
            raise ConfigError("path", 'parameters written as "{name}"', pattern)
        parts.append(re.escape(_strip(tail) if tail else ""))
        regex = "".join(parts).rstrip("/") if body != "/" else ""
        if pattern.endswith("/*"):
            regex += "(?:/.*)?"
        self._regex = re.compile(regex or "/")

    def matches(self, path: str) -> bool:
        """Whether request path `path` falls under this pattern."""
        if self._exact is not None:
            return self._exact == path or self._exact == _strip(path)
        assert self._regex is not None  # set whenever _exact is None
        return self._regex.fullmatch(_strip(path)) is not None or (
            self._regex.fullmatch(path) is not None
        )

    def __repr__(self) -> str:
        return f"PathPattern({self.pattern!r})"


def route_path(path: str, root_path: str) -> str:
    """The path an app mounted at `root_path` routes, as Starlette's routing computes it.

    `scope["path"]` includes `root_path` under `uvicorn --root-path` and inside a
    `Mount`; a path that does not start with it (a proxy that strips it, or a
    path like `/apix` under `/api`) is routed as it is.
    """
    if not path.startswith(root_path):
        return path
    end = len(root_path)
    if len(path) == end:
        return ""
    return path[end:] if path[end] == "/" else path
