"""Configuration files: the same `Rule` and limit objects, written in TOML.

`load_config(path_or_mapping)` reads a TOML file (or a dict of the same shape)
and returns `Settings`. Everything is checked up front: a bad file raises
`ConfigError` naming the full field path and what was expected, e.g.
``rules[2].limits[0].rate: expected a rate like "10/minute" or "100 per hour",
got '10 per fortnight'``. Unknown keys are errors too, so a typo never
silently falls back to a default. The schema (every key optional unless
marked *required*; see ``examples/ratelimit.toml`` for a commented file)::

    fail = "open"          # "open" | "closed" | "local": what this file's rules do
                           # when the backend fails, unless a rule sets its own
    headers = true         # send the RateLimit header fields on allowed responses
    metrics = true         # false: no Prometheus metrics (default: on, global registry)
    shadow = false         # true: every rule of this file in shadow mode (decide and
                           # count, refuse nothing) unless a rule sets its own

    [backend]              # omitted: the in-process MemoryBackend
    type = "memory"        # required: "memory" (option: max_keys) or "redis"
                           # (options: url, prefix, ...: passed to RedisBackend)

    [[rules]]              # first matching rule wins
    path = "/v1/images"    # required: exact, prefix glob "/v1/*" or template "/users/{id}"
    methods = ["POST"]     # omitted: every method
    name = "images"        # omitted: derived from the path
    cost = 1               # an integer >= 0, a table like {input_tokens = 100}, or
                           # "module:callable" of the scope
    fail = "closed"        # overrides the top-level fail for this rule
    shadow = true          # shadow mode: would-be refusals are counted, not sent

    [[rules.limits]]       # required, at least one; all admit or none consumes
    type = "token_bucket"  # required: "token_bucket" | "concurrency" | "window"
    ...                    # the keyword arguments of TokenBucket, Concurrency or
                           # Window: rate, burst, limit, queue, timeout, lease,
                           # retry_after, strategy, name, shared, key, priority,
                           # classes, shares (a table class = fraction), fair_key
                           # (a key), deadline_header;
                           # key omitted: client_ip (global for concurrency)

A limit's `key` is ``"global"``, ``"client_ip"``, ``"header:NAME"``, a table
(``{type = "client_ip", trusted_proxies = ["10.0.0.0/8"], ipv6_prefix = 64}``,
``{type = "header", name = "x-api-key", default = "anonymous"}``,
``{type = "global"}``) or an import string ``"module.path:callable"`` for a
custom key function. Import strings also give a rule's `cost` and a
concurrency limit's `priority`; they are imported when the file loads (so a
config file is code, like an app path given to uvicorn). From a dict, a
callable may stand wherever an import string may.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeAlias, cast

from .._errors import ConfigError
from .._types import KeyFunc
from . import keys
from .limits import Concurrency, Limit, TokenBucket, Window
from .quotas import Quota
from .rules import FAIL_POLICIES, FailPolicy, Rule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    # ignore: mypy checks this branch (python_version 3.10) but tomli is only installed there
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["Settings", "load_config"]

_TOP_KEYS = frozenset({"fail", "headers", "metrics", "shadow", "backend", "rules"})
_RULE_KEYS = frozenset(
    {"path", "methods", "name", "cost", "fail", "shadow", "limits", "body_limit"}
)
_LIMIT_COMMON = frozenset({"type", "key", "name", "shared", "counts"})
_LIMIT_KEYS: dict[str, frozenset[str]] = {
    "token_bucket": _LIMIT_COMMON | {"rate", "burst"},
    "concurrency": _LIMIT_COMMON
    | {
        "limit",
        "queue",
        "timeout",
        "priority",
        "classes",
        "shares",
        "fair_key",
        "deadline_header",
        "lease",
        "retry_after",
    },
    "window": _LIMIT_COMMON | {"rate", "strategy"},
    "quota": _LIMIT_COMMON | {"allowance", "per"},
}
_LIMIT_REQUIRED = {
    "token_bucket": ("rate", 'a rate like "10/minute" or "100 per hour"'),
    "concurrency": ("limit", "a positive integer"),
    "window": ("rate", 'a rate like "10/minute" or "100 per hour"'),
    "quota": ("allowance", 'an allowance like "100000/day" or "1000000/month"'),
}
_KEY_TABLE_KEYS: dict[str, frozenset[str]] = {
    "global": frozenset({"type"}),
    "client_ip": frozenset({"type", "trusted_proxies", "ipv6_prefix", "header"}),
    "header": frozenset({"type", "name", "default"}),
}
#: Options a file may give each backend; None: checked by the backend's constructor.
_BACKEND_KEYS: dict[str, frozenset[str] | None] = {
    "memory": frozenset({"type", "max_keys"}),
    "redis": None,
}
_KEY_EXPECTED = (
    '"global", "client_ip", "header:NAME", "body:FIELD", a "module.path:callable" import string '
    'or a table like {type = "client_ip"}'
)
_IMPORT_EXPECTED = 'an import string "module.path:callable"'
_IMPORT_RE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


#: Where a configuration comes from: a TOML file's path, or the same data as a dict.
ConfigSource: TypeAlias = "str | os.PathLike[str] | Mapping[str, Any]"


@dataclass(frozen=True)
class Settings:
    """What a config file describes: rules, a backend spec and middleware defaults.

    `backend` is the `[backend]` table (None: the default MemoryBackend);
    `fail` and `headers` are None when the file does not set them; `metrics`
    False when it turns them off. `fail` is
    already applied to every rule of the file that has no `fail` of its own,
    and the top-level `shadow` to every rule without a `shadow` of its own.
    """

    rules: tuple[Rule, ...] = ()
    backend: Mapping[str, Any] | None = None
    fail: FailPolicy | None = None
    headers: bool | None = None
    metrics: bool = True


def load_config(source: ConfigSource) -> Settings:
    """Read and validate a TOML file (path) or a mapping of the same shape.

    Raises `ConfigError` naming the field path for anything wrong: a missing
    or unreadable file, a TOML syntax error (with its line and column), an
    unknown key, a value of the wrong type, or an import string that fails.
    """
    if isinstance(source, Mapping):
        data: Mapping[str, Any] = source
    elif isinstance(source, (str, os.PathLike)):
        data = _read_toml(source)
    else:
        raise ConfigError("config", "a path to a TOML file or a mapping", source)
    return _settings(data)


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse the file at `path`, turning I/O and syntax errors into `ConfigError`."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
            return data
    except OSError as exc:
        raise ConfigError(name, f"a readable TOML file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(name, f"a TOML file in UTF-8 ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        where, message = _syntax_error_position(exc)
        raise ConfigError(f"{name}{where}", f"valid TOML ({message})") from exc


def _syntax_error_position(exc: ValueError) -> tuple[str, str]:
    """`(":3:7", "Invalid value")` from a TOML parser error, whatever its version."""
    lineno, colno = getattr(exc, "lineno", None), getattr(exc, "colno", None)
    message = getattr(exc, "msg", None)
    if isinstance(lineno, int) and isinstance(colno, int) and isinstance(message, str):
        return f":{lineno}:{colno}", message
    text = str(exc)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", text)
    if m:
        return f":{m.group(1)}:{m.group(2)}", text[: m.start()]
    m = re.search(r"\s*\(at end of document\)$", text)
    if m:
        return "", text[: m.start()] + " at the end of the file"
    return "", text


@contextmanager
def _under(prefix: str) -> Iterator[None]:
    """Re-raise a `ConfigError` from the block with its field placed under `prefix`."""
    try:
        yield
    except ConfigError as exc:
        raise exc.under(prefix) from exc.__cause__


def _settings(data: Mapping[str, Any]) -> Settings:
    _check_keys(data, _TOP_KEYS, "the top level")
    fail = _fail("fail", data.get("fail"))
    headers = data.get("headers")
    if headers is not None and not isinstance(headers, bool):
        raise _wrong("headers", "true or false", headers)
    metrics = data.get("metrics", True)
    if not isinstance(metrics, bool):
        raise _wrong("metrics", "true or false", metrics)
    shadow = data.get("shadow", False)
    if not isinstance(shadow, bool):
        raise _wrong("shadow", "true or false", shadow)
    backend = _backend(data["backend"]) if "backend" in data else None
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(
        _array("rules", data.get("rules", ()), "an array of tables [[rules]]")
    ):
        with _under(f"rules[{i}]"):
            rule = _rule(table, fail, shadow)
            if rule.name in seen:
                raise ConfigError(
                    "name",
                    f"a name unused by rules[{seen[rule.name]}] (set name = ... on one of them)",
                    rule.name,
                )
        seen[rule.name] = i
        rules.append(rule)
    return Settings(
        rules=tuple(rules), backend=backend, fail=fail, headers=headers, metrics=metrics
    )


def _fail(field: str, value: object) -> FailPolicy | None:
    if value is None:
        return None
    if isinstance(value, str) and value in FAIL_POLICIES:
        return cast("FailPolicy", value)
    raise _wrong(field, '"open", "closed" or "local"', value, FAIL_POLICIES)


def _backend(value: object) -> Mapping[str, Any]:
    with _under("backend"):
        table = _table("", value, "a table [backend]")
        kind = _required(table, "type", '"memory" or "redis"')
        if not isinstance(kind, str) or kind not in _BACKEND_KEYS:
            raise _wrong("type", '"memory" or "redis"', kind)
        allowed = _BACKEND_KEYS[kind]
        if allowed is not None:
            _check_keys(table, allowed, f"a {kind} backend")
        return MappingProxyType(dict(table))


def _rule(value: object, default_fail: FailPolicy | None, default_shadow: bool) -> Rule:
    table = _table("", value, "a table [[rules]]")
    _check_keys(table, _RULE_KEYS, "a rule")
    path = _required(table, "path", 'a path like "/v1/images" or "/v1/*"')
    limit_tables = _array(
        "limits",
        _required(table, "limits", "an array of tables [[rules.limits]]"),
        "an array of tables [[rules.limits]]",
    )
    if not limit_tables:
        raise ConfigError("limits", "at least one [[rules.limits]] table", [])
    limits: list[Limit] = []
    for j, limit_table in enumerate(limit_tables):
        with _under(f"limits[{j}]"):
            limits.append(_limit(limit_table))
    methods = table.get("methods")
    if methods is not None:
        methods = _array("methods", methods, 'an array of HTTP methods like ["POST"]')
    cost = table.get("cost", 1)
    if isinstance(cost, str):
        cost = _import("cost", cost)
    elif not callable(cost) and not isinstance(cost, dict) and (
        not isinstance(cost, int) or isinstance(cost, bool)
    ):
        raise _wrong(
            "cost", f"an integer >= 0, a table of dimension = units, or {_IMPORT_EXPECTED}", cost
        )
    fail = _fail("fail", table.get("fail")) or default_fail
    shadow = table.get("shadow", default_shadow)
    if not isinstance(shadow, bool):
        raise _wrong("shadow", "true or false", shadow)
    options = {"body_limit": table["body_limit"]} if "body_limit" in table else {}
    return Rule(
        path, methods, limits, cost, name=table.get("name"), fail=fail, shadow=shadow, **options
    )


def _limit(value: object) -> Limit:
    table = _table("", value, "a table [[rules.limits]]")
    kinds = '"token_bucket", "concurrency", "window" or "quota"'
    kind = _required(table, "type", kinds)
    if not isinstance(kind, str) or kind not in _LIMIT_KEYS:
        raise _wrong("type", kinds, kind, _LIMIT_KEYS)
    _check_keys(table, _LIMIT_KEYS[kind], f"a {kind} limit")
    field, expected = _LIMIT_REQUIRED[kind]
    _required(table, field, expected)
    options = {k: v for k, v in table.items() if k != "type"}
    if "key" in options:
        with _under("key"):
            options["key"] = _key(options["key"])
    if "priority" in options:
        priority = options["priority"]
        if not isinstance(priority, str) and not callable(priority):
            raise _wrong("priority", f"{_IMPORT_EXPECTED} of a function (scope) -> class", priority)
        if isinstance(priority, str):
            options["priority"] = _import("priority", priority)
    if "fair_key" in options:
        with _under("fair_key"):
            options["fair_key"] = _key(options["fair_key"])
    if "shared" in options and not isinstance(options["shared"], bool):
        raise _wrong("shared", "true or false", options["shared"])
    if kind == "token_bucket":
        return TokenBucket(**options)
    if kind == "concurrency":
        return Concurrency(**options)
    if kind == "quota":
        return Quota(**options)
    return Window(**options)


def _key(value: object) -> KeyFunc:
    """A key function from its config form; errors name fields relative to the key."""
    if isinstance(value, str):
        if value == "global":
            return keys.GLOBAL
        if value == "client_ip":
            return keys.client_ip()
        if value.startswith("header:"):
            try:
                return keys.header(value[len("header:") :])
            except ConfigError:
                raise ConfigError("", 'a header key like "header:x-api-key"', value) from None
        if value.startswith("body:"):
            try:
                return keys.body_field(value[len("body:") :])
            except ConfigError:
                raise ConfigError("", 'a body key like "body:model"', value) from None
        if _IMPORT_RE.match(value):
            return _import("", value)
        raise _wrong("", _KEY_EXPECTED, value, ("global", "client_ip", "header:", "body:"))
    if isinstance(value, Mapping):
        kind = _required(value, "type", '"global", "client_ip" or "header"')
        if not isinstance(kind, str) or kind not in _KEY_TABLE_KEYS:
            raise _wrong("type", '"global", "client_ip" or "header"', kind, _KEY_TABLE_KEYS)
        _check_keys(value, _KEY_TABLE_KEYS[kind], f"a {kind} key")
        options = {k: v for k, v in value.items() if k != "type"}
        if kind == "global":
            return keys.GLOBAL
        if kind == "header":
            name = _required(value, "name", 'a header name like "x-api-key"')
            default = options.get("default")
            if default is not None and not isinstance(default, str):
                raise _wrong(
                    "default", "a string (the key of requests without the header)", default
                )
            return keys.header(name, default=default)
        forwarded = options.get("header", "x-forwarded-for")
        if not isinstance(forwarded, str):
            raise _wrong("header", '"x-forwarded-for" or "forwarded"', forwarded)
        return keys.client_ip(**options)
    if callable(value):
        return value  # a dict source may pass the function itself
    raise _wrong("", _KEY_EXPECTED, value)


def _import(field: str, spec: str) -> Callable[..., Any]:
    """Import `"package.module:attribute"`, naming the field when it fails."""
    expected = _IMPORT_EXPECTED
    if not _IMPORT_RE.match(spec):
        raise ConfigError(field, expected, spec)
    module_name, _, attribute = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            field, f"{expected} whose module imports ({type(exc).__name__}: {exc})", spec
        ) from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                field, f"{expected} naming an attribute of {module_name} (no {part!r})", spec
            ) from None
    if not callable(obj):
        raise ConfigError(field, f"{expected} naming a callable, not {type(obj).__name__}", spec)
    return obj  # type: ignore[no-any-return]


def _table(field: str, value: object, expected: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _wrong(field, expected, value)
    return value


def _array(field: str, value: object, expected: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise _wrong(field, expected, value)
    return value


def _required(table: Mapping[str, Any], key: str, expected: str) -> Any:
    if key not in table:
        raise ConfigError(key, f"{expected}; the key is missing")
    return table[key]


def _check_keys(table: Mapping[str, Any], allowed: frozenset[str], what: str) -> None:
    """Refuse keys outside `allowed`, naming the key, the allowed set and a near miss."""
    for key in table:
        if key in allowed:
            continue
        text = str(key)
        close = difflib.get_close_matches(text, sorted(allowed), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        raise ConfigError(text, f"one of the keys of {what} ({', '.join(sorted(allowed))}){hint}")


def _wrong(field: str, expected: str, value: object, choices: Iterable[object] = ()) -> ConfigError:
    """A type or value error; tables and arrays are named by kind, not dumped."""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
        if close:
            expected += f' (did you mean "{close[0]}"?)'
    if isinstance(value, Mapping):
        return ConfigError(field, f"{expected}, got a table")
    if isinstance(value, (list, tuple)):
        return ConfigError(field, f"{expected}, got an array")
    return ConfigError(field, expected, value)
