"""Config files: TOML (or a dict) into the same rules, and bad files fail naming the field."""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ratelimit import Concurrency, ConfigError, RateLimitMiddleware, TokenBucket, Window, keys
from ratelimit.policy.config import Settings, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ratelimit.toml"

#: A path element of a field path: `rules`, `[2]`.
_STEP = re.compile(r"(\w+)|\[(\d+)\]")
_DELETE = object()


def base_config() -> dict[str, Any]:
    """A valid config with three rules, the playground of the bad-config table."""
    return {
        "fail": "open",
        "backend": {"type": "memory", "max_keys": 1000},
        "rules": [
            {
                "path": "/v1/images",
                "methods": ["POST"],
                "name": "images",
                "limits": [
                    {"type": "token_bucket", "rate": "5/minute", "burst": 5, "key": "client_ip"},
                    {
                        "type": "concurrency",
                        "limit": 8,
                        "key": "global",
                        "queue": 4,
                        "timeout": 5.0,
                    },
                ],
            },
            {
                "path": "/v1/chat/*",
                "limits": [{"type": "window", "rate": "60/minute", "key": "header:x-api-key"}],
            },
            {
                "path": "/v1/models/{model}",
                "limits": [{"type": "token_bucket", "rate": "100/second", "key": "global"}],
            },
        ],
    }


def patched(field: str, value: object) -> dict[str, Any]:
    """`base_config()` with the value at `field` (e.g. `rules[2].limits[0].rate`) replaced."""
    config = copy.deepcopy(base_config())
    steps: list[str | int] = [
        m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _STEP.finditer(field)
    ]
    node: Any = config
    for step in steps[:-1]:
        node = node[step]
    if value is _DELETE:
        del node[steps[-1]]
    else:
        node[steps[-1]] = value
    return config


# -- loading -----------------------------------------------------------------


def test_example_file_loads_into_rules_and_backend() -> None:
    """examples/ratelimit.toml loads: its rules, limits, keys and backend are what it says."""
    settings = load_config(EXAMPLE)
    images, chat, models = settings.rules
    assert (images.name, images.methods, images.fail) == ("images", frozenset({"POST"}), "closed")
    bucket, pool = images.limits
    assert isinstance(bucket, TokenBucket)
    assert (bucket.burst, bucket.name, bucket.key) == (5, "images-per-key", bucket.key)
    assert isinstance(bucket.key, keys.header)
    assert bucket.key.name == "x-api-key"
    assert isinstance(pool, Concurrency)
    assert (pool.limit, pool.queue, pool.timeout, pool.key) == (8, 64, 30.0, keys.GLOBAL)
    (window,) = chat.limits
    assert isinstance(window, Window)
    assert window.strategy == "sliding"
    assert isinstance(window.key, keys.client_ip)
    assert chat.fail == "open"  # the file's default reaches rules without their own
    assert models.methods == frozenset({"GET", "HEAD"})
    assert settings.backend == {"type": "memory", "max_keys": 100000}
    assert (settings.fail, settings.headers) == ("open", True)


def test_dict_source_builds_the_same_rules_as_toml(tmp_path: Path) -> None:
    """A dict of the TOML file's shape loads to the same rules as the file."""
    text = """
        [[rules]]
        path = "/v1/images"
        methods = ["POST"]
        [[rules.limits]]
        type = "token_bucket"
        rate = "5/minute"
        key = "header:x-api-key"
    """
    path = tmp_path / "ratelimit.toml"
    path.write_text(text)
    as_dict = {
        "rules": [
            {
                "path": "/v1/images",
                "methods": ["POST"],
                "limits": [{"type": "token_bucket", "rate": "5/minute", "key": "header:x-api-key"}],
            }
        ]
    }
    from_file, from_str, from_dict = load_config(path), load_config(str(path)), load_config(as_dict)
    assert repr(from_file.rules) == repr(from_str.rules) == repr(from_dict.rules)


def test_empty_config_has_no_rules_and_the_default_backend() -> None:
    """Every top-level key is optional: {} means no rules and the memory backend."""
    assert load_config({}) == Settings()


def test_file_fail_is_the_default_and_a_rule_fail_wins() -> None:
    """The top-level `fail` applies to rules without one; a rule's own `fail` overrides it."""
    config = patched("fail", "closed")
    config["rules"][1]["fail"] = "local"
    rules = load_config(config).rules
    assert [r.fail for r in rules] == ["closed", "local", "closed"]
    assert [r.fail for r in load_config(patched("fail", _DELETE)).rules] == [None, None, None]


@pytest.mark.parametrize(
    ("key", "check"),
    [
        ("global", lambda k: k is keys.GLOBAL),
        ({"type": "global"}, lambda k: k is keys.GLOBAL),
        ("client_ip", lambda k: isinstance(k, keys.client_ip) and k.ipv6_prefix == 64),
        (
            {"type": "client_ip", "trusted_proxies": ["10.0.0.0/8"], "ipv6_prefix": 48},
            lambda k: isinstance(k, keys.client_ip) and k.ipv6_prefix == 48,
        ),
        ("header:X-API-Key", lambda k: isinstance(k, keys.header) and k.name == "x-api-key"),
        (
            {"type": "header", "name": "x-api-key", "default": "anon"},
            lambda k: isinstance(k, keys.header) and k.default == "anon",
        ),
    ],
)
def test_key_forms_build_the_built_in_keys(key: object, check: Any) -> None:
    """Each documented key form gives the matching built-in key function."""
    limit = load_config(patched("rules[0].limits[0].key", key)).rules[0].limits[0]
    assert check(limit.key)


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """An importable module `cfg_helpers` with a custom key, cost and priority."""
    module = types.ModuleType("cfg_helpers")

    def tenant(scope: Any) -> str:
        return "tenant"

    def cost(scope: Any) -> int:
        return 2

    def priority(scope: Any) -> int:
        return 1

    module.tenant = tenant  # type: ignore[attr-defined]
    module.costs = types.SimpleNamespace(double=cost)  # type: ignore[attr-defined]
    module.priority = priority  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cfg_helpers", module)
    return module


def test_import_strings_give_custom_key_cost_and_priority(helpers: types.ModuleType) -> None:
    """`module:attr.path` strings import the key, cost and priority functions at load."""
    config = patched("rules[0].limits[0].key", "cfg_helpers:tenant")
    config["rules"][0]["cost"] = "cfg_helpers:costs.double"
    config["rules"][0]["limits"][1]["priority"] = "cfg_helpers:priority"
    rule = load_config(config).rules[0]
    assert rule.limits[0].key is helpers.tenant
    assert rule.cost is helpers.costs.double
    pool = rule.limits[1]
    assert isinstance(pool, Concurrency)
    assert pool.priority is helpers.priority


def test_dict_source_accepts_callables_where_import_strings_go() -> None:
    """From a dict, a function may stand in for an import string."""

    def tenant(scope: Any) -> str:
        return "t"

    config = patched("rules[0].limits[0].key", tenant)
    config["rules"][0]["cost"] = lambda scope: 1
    rule = load_config(config).rules[0]
    assert rule.limits[0].key is tenant
    assert callable(rule.cost)


def test_settings_are_frozen_and_the_backend_table_read_only() -> None:
    """Settings cannot be changed after loading, nor can its backend table."""
    settings = load_config(base_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.fail = "closed"  # type: ignore[misc]
    assert settings.backend is not None
    with pytest.raises(TypeError):
        settings.backend["type"] = "redis"  # type: ignore[index]


# -- bad configs ---------------------------------------------------------------

RATE = r'expected a rate like "10/minute" or "100 per hour"'

BAD_CONFIGS = [
    # (field to replace, bad value, pinned message)
    ("rules[2].limits[0].rate", "10 per fortnight",
     rf"^rules\[2\]\.limits\[0\]\.rate: {RATE}, got '10 per fortnight'$"),
    ("rules[0].limits[0].brust", 5,
     r"^rules\[0\]\.limits\[0\]\.brust: expected one of the keys of a token_bucket limit "
     r'\(burst, counts, key, name, rate, shared, type\); did you mean "burst"\?$'),
    ("rule", [], r'^rule: expected one of the keys of the top level \(backend, fail, headers, '
     r'metrics, rules, shadow\); did you mean "rules"\?$'),
    ("rules[1].paht", "/x", r'^rules\[1\]\.paht: expected one of the keys of a rule .*"path"'),
    ("fail", "sometimes", r"""^fail: expected "open", "closed" or "local", got 'sometimes'$"""),
    ("fail", True, r"^fail: expected .*, got True$"),
    ("rules[0].fail", "clsoed", r'^rules\[0\]\.fail: expected .* \(did you mean "closed"\?\)'),
    ("headers", "yes", r"^headers: expected true or false, got 'yes'$"),
    ("backend", "memory", r"^backend: expected a table \[backend\], got 'memory'$"),
    ("backend.type", "postgres", r"^backend\.type: expected \"memory\" or \"redis\", got"),
    ("backend.type", _DELETE, r'^backend\.type: expected "memory" or "redis"; the key is missing$'),
    ("backend.max_key", 5, r'^backend\.max_key: expected one of the keys of a memory backend '
     r'\(max_keys, type\); did you mean "max_keys"\?$'),
    ("rules", {"path": "/x"}, r"^rules: expected an array of tables \[\[rules\]\], got a table$"),
    ("rules[1]", "/v1/chat", r"^rules\[1\]: expected a table \[\[rules\]\], got '/v1/chat'$"),
    ("rules[0].path", _DELETE, r"^rules\[0\]\.path: expected a path .*; the key is missing$"),
    ("rules[0].path", "v1/images", r'^rules\[0\]\.path: expected a path starting with "/"'),
    ("rules[0].methods", "POST", r"^rules\[0\]\.methods: expected an array of HTTP methods"),
    ("rules[0].methods", 7, r"^rules\[0\]\.methods: expected an array of HTTP methods"),
    ("rules[0].methods[0]", "FETCH", r"^rules\[0\]\.methods\[0\]: expected an HTTP method"),
    ("rules[0].name", "bad name!", r"^rules\[0\]\.name: expected a name of letters"),
    ("rules[1].name", "images", r"^rules\[1\]\.name: expected a name unused by rules\[0\]"),
    ("rules[0].cost", -1, r"^rules\[0\]\.cost: expected an integer from 0 to 2\*\*53"),
    ("rules[0].cost", 10, r"^rules\[0\]\.limits\[0\]\.burst: expected at least the rule's cost 10"),
    ("rules[0].cost", "two",
     r'^rules\[0\]\.cost: expected an import string "module\.path:callable", got \'two\'$'),
    ("rules[0].cost", 1.5,
     r"^rules\[0\]\.cost: expected an integer >= 0, a table of dimension = units, or an "
     r"import string .*, got 1\.5$"),
    ("rules[0].limits", [], r"^rules\[0\]\.limits: expected at least one \[\[rules\.limits\]\]"),
    ("rules[0].limits", _DELETE, r"^rules\[0\]\.limits: expected .*; the key is missing$"),
    ("rules[0].limits[1]", 8, r"^rules\[0\]\.limits\[1\]: expected a table"),
    ("rules[0].limits[0].type", "token-bucket",
     r'^rules\[0\]\.limits\[0\]\.type: expected .* \(did you mean "token_bucket"\?\)'),
    ("rules[0].limits[0].type", _DELETE, r"^rules\[0\]\.limits\[0\]\.type: .*the key is missing$"),
    ("rules[0].limits[0].rate", _DELETE, rf"^rules\[0\]\.limits\[0\]\.rate: {RATE}; the key is"),
    ("rules[0].limits[0].burst", 0, r"^rules\[0\]\.limits\[0\]\.burst: expected a positive"),
    ("rules[0].limits[0].burst", "5", r"^rules\[0\]\.limits\[0\]\.burst: .*, got '5'$"),
    ("rules[0].limits[0].shared", "no", r"^rules\[0\]\.limits\[0\]\.shared: expected true or"),
    ("rules[0].limits[0].name", "", r"^rules\[0\]\.limits\[0\]\.name: expected a name"),
    ("rules[0].limits[1].limit", _DELETE, r"^rules\[0\]\.limits\[1\]\.limit: expected a positive"),
    ("rules[0].limits[1].queue", -1, r"^rules\[0\]\.limits\[1\]\.queue: expected an integer >= 0"),
    ("rules[0].limits[1].timeout", "30s", r"^rules\[0\]\.limits\[1\]\.timeout: expected a number"),
    ("rules[0].limits[1].lease", 0.5, r"^rules\[0\]\.limits\[1\]\.lease: expected at least 1"),
    ("rules[0].limits[1].rate", "5/minute",
     r"^rules\[0\]\.limits\[1\]\.rate: expected one of the keys of a concurrency limit \(clas"),
    ("rules[0].limits[1].priority", 3,
     r"^rules\[0\]\.limits\[1\]\.priority: expected an import string .*, got 3$"),
    ("rules[1].limits[0].strategy", "rolling", r"^rules\[1\]\.limits\[0\]\.strategy: expected"),
    ("rules[0].limits[0].key", "ip", r'^rules\[0\]\.limits\[0\]\.key: expected "global", '),
    ("rules[0].limits[0].key", "globl", r'\.key: expected .* \(did you mean "global"\?\)'),
    ("rules[0].limits[0].key", 42, r"^rules\[0\]\.limits\[0\]\.key: expected .*, got 42$"),
    ("rules[0].limits[0].key", "header:",
     r"""^rules\[0\]\.limits\[0\]\.key: expected a header key like "header:x-api-key", got"""),
    ("rules[0].limits[0].key", {"type": "client_ip", "trusted_proxies": ["10.0.0.0/8", "nope"]},
     r"^rules\[0\]\.limits\[0\]\.key\.trusted_proxies\[1\]: expected an IP address"),
    ("rules[0].limits[0].key", {"type": "client_ip", "ipv6_prefix": 200},
     r"^rules\[0\]\.limits\[0\]\.key\.ipv6_prefix: expected an integer from 1 to 128"),
    ("rules[0].limits[0].key", {"type": "client_ip", "header": 5},
     r"^rules\[0\]\.limits\[0\]\.key\.header: expected"),
    ("rules[0].limits[0].key", {"type": "header"},
     r"^rules\[0\]\.limits\[0\]\.key\.name: expected a header name .*; the key is missing$"),
    ("rules[0].limits[0].key", {"type": "header", "name": "x", "defualt": "a"},
     r'^rules\[0\]\.limits\[0\]\.key\.defualt: expected .*; did you mean "default"\?$'),
    ("rules[0].limits[0].key", {"type": "header", "name": "x", "default": 1},
     r"^rules\[0\]\.limits\[0\]\.key\.default: expected a string"),
    ("rules[0].limits[0].key", {"type": "cookie"}, r"^rules\[0\]\.limits\[0\]\.key\.type: "),
    ("rules[0].limits[0].key", "no_such_module_xyz:key",
     r"^rules\[0\]\.limits\[0\]\.key: expected an import string .* whose module imports "
     r"\(ModuleNotFoundError: No module named 'no_such_module_xyz'\), got"),
    ("rules[0].limits[0].key", "os.path:no_such_function",
     r"^rules\[0\]\.limits\[0\]\.key: expected .* naming an attribute of os\.path "
     r"\(no 'no_such_function'\)"),
    ("rules[0].limits[0].key", "os:sep", r"\.key: expected .* naming a callable, not str"),
    ("rules[0].limits[1].priority", "no_such_module_xyz:p",
     r"^rules\[0\]\.limits\[1\]\.priority: expected an import string"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"), BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v, _ in BAD_CONFIGS]
)
def test_bad_config_names_its_field(field: str, value: object, message: str) -> None:
    """Each bad value fails at load with its full field path and what was expected."""
    with pytest.raises(ConfigError, match=message):
        load_config(patched(field, value))


def test_a_rule_may_hold_several_windows_numbered_by_name() -> None:
    """Windows are native checks (refundable, all or nothing): a rule may hold several."""
    config = base_config()
    config["rules"][1]["limits"].append({"type": "window", "rate": "1/second"})
    config["rules"][1]["limits"].append({"type": "window", "rate": "50/hour"})
    rules = load_config(config).rules
    assert rules[1].limit_names()[-2:] == ["window-2", "window-3"]


def test_config_error_is_a_value_error_with_the_field() -> None:
    """ConfigError is a ValueError carrying the field path, what was expected and the value."""
    with pytest.raises(ValueError, match=r"^rules\[2\]") as info:
        load_config(patched("rules[2].limits[0].rate", "10 per fortnight"))
    assert isinstance(info.value, ConfigError)
    assert (info.value.field, info.value.got) == ("rules[2].limits[0].rate", "10 per fortnight")


def test_failed_import_keeps_the_import_error_as_cause() -> None:
    """An import string that fails keeps the ImportError as `__cause__` for the traceback."""
    with pytest.raises(ConfigError) as info:
        load_config(patched("rules[0].limits[0].key", "no_such_module_xyz:key"))
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize(
    ("field", "prefix", "expected"),
    [
        ("rate", "rules[2].limits[0]", "rules[2].limits[0].rate"),
        ("limits[1].burst", "rules[0]", "rules[0].limits[1].burst"),
        ("[3]", "methods", "methods[3]"),
        ("", "rules[0]", "rules[0]"),
        ("rate", "", "rate"),
    ],
)
def test_config_error_under_composes_field_paths(field: str, prefix: str, expected: str) -> None:
    """`.under(prefix)` joins with a dot, indexes without one, and an empty side adds nothing."""
    error = ConfigError(field, "a thing", 1).under(prefix)
    assert (error.field, str(error)) == (expected, f"{expected}: expected a thing, got 1")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A path that does not exist names the file and says why."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: expected a readable TOML file \(No such"):
        load_config(missing)


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    """A directory instead of a file is refused, not a crash."""
    with pytest.raises(ConfigError, match=r"expected a readable TOML file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('fail = "open"\n[[rules]]\npath = \n',
         r"bad\.toml:3:8: expected valid TOML \(Invalid value\)$"),
        ('[[rules]]\npath = "/x"\n[rules]\n',
         r"bad\.toml:3:7: expected valid TOML \(Cannot declare"),
        ('fail = "open', r"bad\.toml: expected valid TOML \(Unterminated string at the end of"),
    ],
)  # fmt: skip
def test_toml_syntax_error_names_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    """A TOML syntax error is a ConfigError pointing at file:line:column with the parser's words."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert info.value.__cause__ is not None


def test_file_not_in_utf8_is_a_config_error(tmp_path: Path) -> None:
    """TOML is UTF-8; other bytes fail with a ConfigError naming the file."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('fail = "ouvert é"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: expected "):
        load_config(path)


def test_toml_values_of_the_wrong_type_name_their_field(tmp_path: Path) -> None:
    """Type errors found in a real file carry the same field paths as from a dict."""
    path = tmp_path / "ratelimit.toml"
    path.write_text('[[rules]]\npath = "/x"\n[[rules.limits]]\ntype = "concurrency"\nlimit = "8"\n')
    with pytest.raises(ConfigError, match=r"^rules\[0\]\.limits\[0\]\.limit: .*, got '8'$"):
        load_config(path)


def test_source_of_another_type_is_a_config_error() -> None:
    """Only a path or a mapping is a config source."""
    with pytest.raises(ConfigError, match=r"^config: expected a path to a TOML file or a mapping"):
        load_config(42)  # type: ignore[arg-type]


# -- end to end ---------------------------------------------------------------


async def generate(request: Request) -> PlainTextResponse:
    return PlainTextResponse("generated")


def starlette_app() -> Starlette:
    return Starlette(routes=[Route("/v1/images", generate, methods=["GET", "POST"])])


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_from_config_dict_limits_a_starlette_app() -> None:
    """`app.add_middleware(RateLimitMiddleware.from_config(dict))` refuses past the burst."""
    app = starlette_app()
    app.add_middleware(
        RateLimitMiddleware.from_config(
            {
                "rules": [
                    {
                        "path": "/v1/images",
                        "methods": ["POST"],
                        "limits": [
                            {
                                "type": "token_bucket",
                                "rate": "2/minute",
                                "burst": 2,
                                "key": "header:x-api-key",
                                "name": "images-per-key",
                            }
                        ],
                    }
                ]
            }
        )
    )
    async with client(app) as http:
        alice = {"x-api-key": "alice"}
        statuses = [(await http.post("/v1/images", headers=alice)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        refused = await http.post("/v1/images", headers=alice)
        assert refused.headers["ratelimit-policy"] == '"images-per-key";q=2;w=60'
        assert int(refused.headers["retry-after"]) > 0
        bob = await http.post("/v1/images", headers={"x-api-key": "bob"})
        assert bob.status_code == 200  # another caller, another bucket
        assert (await http.get("/v1/images")).status_code == 200  # GET matches no rule


async def test_from_config_example_file_limits_per_api_key() -> None:
    """The example file, loaded by path, admits its burst of 5 per key and refuses the 6th."""
    app = Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware.from_config(EXAMPLE))
    async with client(app) as http:
        key = {"x-api-key": "alice"}
        statuses = [
            (await http.post("/v1/images/generations", headers=key)).status_code for _ in range(6)
        ]
    assert statuses == [200] * 5 + [429]


def test_from_config_fails_before_the_app_is_built() -> None:
    """A bad config raises at `from_config`, at start-up, not at the first request."""
    with pytest.raises(ConfigError, match=r"^rules\[0\]\.limits\[0\]\.brust: "):
        RateLimitMiddleware.from_config(patched("rules[0].limits[0].brust", 5))


async def test_headers_false_turns_off_header_fields_on_allowed_responses() -> None:
    """`headers = false` in the file leaves allowed responses without RateLimit fields."""
    app = starlette_app()
    config = {
        "headers": False,
        "rules": [{"path": "/v1/images", "limits": [{"type": "token_bucket", "rate": "9/second"}]}],
    }
    app.add_middleware(RateLimitMiddleware.from_config(config))
    async with client(app) as http:
        response = await http.post("/v1/images")
    assert response.status_code == 200
    assert "ratelimit" not in response.headers
