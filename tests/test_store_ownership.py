"""The store has one owner: only backends/ talks to Redis, and only keyspace.py names keys.

These read the package's source (its syntax tree, not its text: docstrings
and comments may describe keys freely) so that a key name spelled anywhere
else, a Redis command called outside backends/, or policy/ reaching into the
Redis backend fails here rather than in review.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ratelimit"
KEYSPACE = "backends/redis/keyspace.py"

#: redis-py methods distinctive enough that a call to one is a call to Redis (generic
#: names such as get, set, delete, time or publish are left out: dicts, loops and the
#: stores' own protocols use them).
REDIS_COMMANDS = frozenset(
    {
        "evalsha",
        "hdel",
        "hget",
        "hgetall",
        "hincrby",
        "hset",
        "pexpire",
        "pipeline",
        "pubsub",
        "scan_iter",
        "zadd",
        "zrange",
        "zrangebyscore",
        "zrem",
        "zremrangebyscore",
    }
)

#: A Redis Cluster hash tag in a literal: `:{overrides}`, `:{top}`, `{rule:caller}`.
HASH_TAG = re.compile(r":\{[^}]*\}|\{[^}]*\}:")


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path))


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (free to describe key names)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                    found.add(id(stmt.value))
    return found


def key_names(tree: ast.Module) -> list[str]:
    """Literals that build a Redis key or channel name: `f"{...prefix}:..."`, or a hash tag."""
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = node.values
            for value, after in itertools.pairwise(parts):
                if (
                    isinstance(value, ast.FormattedValue)
                    and ast.unparse(value.value).endswith("prefix")
                    and isinstance(after, ast.Constant)
                    and str(after.value).startswith(":")
                ):
                    found.append(ast.unparse(node))
            text = "".join(str(p.value) if isinstance(p, ast.Constant) else "{}" for p in parts)
            if HASH_TAG.search(text.replace("{}", "x")):
                found.append(ast.unparse(node))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skip
            and HASH_TAG.search(node.value)
        ):
            found.append(repr(node.value))
    return found


def test_only_the_keyspace_spells_redis_key_names() -> None:
    """Every key and channel name is built in backends/redis/keyspace.py and nowhere else."""
    elsewhere = {
        name: names for name, tree in modules() if name != KEYSPACE and (names := key_names(tree))
    }
    assert elsewhere == {}
    assert key_names(dict(modules())[KEYSPACE])  # the guard sees the names where they are


def test_only_backends_call_redis_commands() -> None:
    """Outside backends/ no code calls a Redis command: it asks a backend's store or admin."""
    calls = {}
    for name, tree in modules():
        if name.startswith("backends/"):
            continue
        used = sorted(
            {
                node.func.attr
                for node in ast.walk(tree)
                if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in REDIS_COMMANDS
            }
        )
        if used:
            calls[name] = used
    assert calls == {}


def imports(tree: ast.Module, name: str) -> set[str]:
    """Absolute names of the modules `tree` (the module `name`) imports."""
    package = ["ratelimit", *name.removesuffix(".py").split("/")][:-1]
    if name.endswith("__init__.py"):
        package = ["ratelimit", *name.split("/")[:-1]]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


#: What the faces and the CLI may import of Redis: the backend's one public name (to build
#: a RedisBackend), never its modules (keyspace, stores, scripts).
BACKEND = ("ratelimit.backends.redis", "ratelimit.backends.redis.RedisBackend")
#: The CLI tells "Redis is down" (exit 3) from other errors by the driver's exception
#: types: reading them is not talking to Redis.
DRIVER_ERRORS = (
    "redis.exceptions",
    "redis.exceptions.ConnectionError",
    "redis.exceptions.TimeoutError",
)


def is_redis(module: str) -> bool:
    """Whether `module` is the driver or the Redis backend's code."""
    return any(
        module == root or module.startswith(root + ".")
        for root in ("redis", "ratelimit.backends.redis")
    )


@pytest.mark.parametrize(
    ("folder", "allowed"),
    [("policy/", ()), ("asgi/", BACKEND), ("core/", BACKEND), ("cli/", BACKEND + DRIVER_ERRORS)],
)
def test_redis_is_reached_only_through_the_backend(folder: str, allowed: tuple[str, ...]) -> None:
    """policy/ imports neither redis nor backends/redis; the others only `RedisBackend`."""
    reached = {}
    for name, tree in modules():
        if name.startswith(folder):
            bad = sorted(m for m in imports(tree, name) if is_redis(m) and m not in allowed)
            if bad:
                reached[name] = bad
    assert reached == {}
