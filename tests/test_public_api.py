"""The public namespace: what DESIGN.md promises, and nothing accidental."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import ratelimit

DESIGN_NAMES = [
    "RateLimitMiddleware",
    "Rule",
    "TokenBucket",
    "Concurrency",
    "Window",
    "MemoryBackend",
    "RedisBackend",
    "keys",
    "metrics_app",
    "RateLimitError",
    "Limiter",
    "RateLimited",
]


def test_all_is_sorted_and_unique() -> None:
    """`__all__` is sorted so additions show up cleanly in diffs."""
    assert ratelimit.__all__ == sorted(set(ratelimit.__all__))


def test_all_lists_every_public_attribute() -> None:
    """Every public name defined in the package namespace is in `__all__`, and vice versa."""
    public = {
        name
        for name, value in vars(ratelimit).items()
        if not name.startswith("_") and not (hasattr(value, "__path__") and name != "keys")
    }
    # cli: the command; gunicorn: hooks a gunicorn config file imports (ratelimit.gunicorn);
    # litestar: the Litestar plugin (ratelimit.litestar), which imports Litestar;
    # uvicorn: `python -m ratelimit.uvicorn`; multiproc: the metrics directory helpers of both;
    # fastapi: per-route limits (ratelimit.fastapi), which imports FastAPI.
    public -= {
        *("algorithms", "backends", "policy", "asgi", "annotations", "cli"),
        *("gunicorn", "litestar", "uvicorn", "multiproc", "fastapi"),
    }
    assert public == set(ratelimit.__all__)


def test_every_design_name_imports() -> None:
    """The names of DESIGN.md's sketch import from the top-level package."""
    for name in DESIGN_NAMES:
        assert name in ratelimit.__all__
        assert getattr(ratelimit, name) is not None
    from ratelimit import keys

    assert callable(keys.GLOBAL)
    assert callable(keys.header("x-api-key"))
    assert callable(keys.client_ip(trusted_proxies=["10.0.0.0/8"]))


def test_design_sketch_names_match_the_shared_design() -> None:
    """The sketch in ../shared/DESIGN.md (when present) imports nothing we lack."""
    design = Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md"
    if not design.exists():
        return  # the shared folder is not beside this checkout (e.g. an sdist)
    block = re.search(r"from ratelimit import \((.*?)\)", design.read_text(), re.S)
    assert block is not None
    names = [n.strip() for n in block.group(1).replace("\n", " ").split(",") if n.strip()]
    assert set(names) <= set(ratelimit.__all__)


def test_errors_share_one_root() -> None:
    """Every exception we export derives from RateLimitError; ConfigError is a ValueError."""
    for name in ratelimit.__all__:
        value = getattr(ratelimit, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, ratelimit.RateLimitError)
    assert issubclass(ratelimit.ConfigError, ValueError)


def test_private_modules_are_private() -> None:
    """Implementation modules are importable but prefixed or nested, not top-level API."""
    module = importlib.import_module("ratelimit._errors")
    assert module.RateLimitError is ratelimit.RateLimitError
