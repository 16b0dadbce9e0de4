"""What a command runs against: its options, the config file, the backend's stores."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError
from ..policy import keys
from ..policy.config import Settings, load_config
from ..policy.limits import Concurrency, Limit, TokenBucket, Window
from ..policy.quotas import Quota
from ..policy.rules import Rule
from .output import Out, plural
from .parser import DEFAULT_PREFIX, usage

if TYPE_CHECKING:
    from ..backends.redis import RedisBackend
    from ..backends.stores import OverrideStore


class Refused(Exception):
    """Input the command will not act on: printed as `ratelimit: <message>`, exit code 1.

    `field` is the field path of the configuration error behind it, if any.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unreachable(Exception):
    """Redis did not answer: exit code 3."""


class Context:
    """What a command runs against: options, the config (if any), Redis (when needed)."""

    def __init__(self, args: argparse.Namespace, out: Out) -> None:
        self.args = args
        self.out = out
        self.settings: Settings | None = None
        config = getattr(args, "config", None)
        if config:
            self.settings = _load(config)
        backend = dict(self.settings.backend or {}) if self.settings else {}
        from_file = backend if backend.get("type") == "redis" else {}
        self.url: str | None = (
            args.redis or os.environ.get("RATELIMIT_REDIS_URL") or from_file.get("url")
        )
        self.prefix: str = args.prefix or from_file.get("prefix") or DEFAULT_PREFIX
        self._backend: RedisBackend | None = None
        self._store: OverrideStore | None = None

    def backend(self) -> RedisBackend:
        """A RedisBackend on the URL and prefix: its stores are what the commands read."""
        if self._backend is None:
            if not self.url:
                usage(
                    f"{self.args.command}: no Redis: give --redis URL, set RATELIMIT_REDIS_URL, "
                    "or a --config whose [backend] is redis"
                )
            from ..backends.redis import RedisBackend

            try:
                self._backend = RedisBackend(
                    self.url, prefix=self.prefix, timeout=5.0, connect_timeout=5.0
                )
            except ConfigError as exc:
                raise Refused(f"--redis/--prefix: {exc}") from None
        return self._backend

    def store(self) -> OverrideStore:
        """The fleet's override store (the backend's)."""
        if self._store is None:
            self._store = self.backend().override_store()
        return self._store

    async def aclose(self) -> None:
        if self._backend is not None:
            await self._backend.aclose()


def _load(path: str) -> Settings:
    """The config file's settings; `Refused` naming the field when it is not valid.

    Its `module:callable` entries name the app's own code, found from the current
    directory as uvicorn and gunicorn find an app: the installed `ratelimit` script
    starts with its own folder on `sys.path`, not the current directory.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return load_config(path)
    except ConfigError as exc:
        raise Refused(f"{path}: {exc}", exc.field) from None


def rules_from_reports(reports: Mapping[str, Mapping[str, Any]]) -> list[Rule]:
    """The rules the running workers enforce, rebuilt from their reports (numbers only).

    Key functions are not reported (they are code), so each limit gets a
    stand-in key of the right sharedness: enough to check an override.
    """
    rules: dict[str, Rule] = {}
    for report in sorted(reports.values(), key=lambda r: str(r.get("worker"))):
        for name, spec in dict(report.get("rules") or {}).items():
            if name in rules:
                continue
            try:
                limits = [
                    _limit_from(lname, d["configured"]) for lname, d in spec["limits"].items()
                ]
                cost = spec.get("cost")
                rules[name] = Rule(
                    spec["path"],
                    limits=limits,
                    cost=cost if isinstance(cost, int) else 0,
                    name=name,
                    shadow=bool(spec.get("shadow")),
                )
            except (ConfigError, KeyError, TypeError):
                continue  # a report this version cannot read: skip that rule
    return list(rules.values())


def _limit_from(name: str, d: Mapping[str, Any]) -> Limit:
    shared = bool(d.get("shared"))
    key = keys.GLOBAL if shared else keys.client_ip()
    kind = d["kind"]
    if kind == "token-bucket":
        return TokenBucket(d["rate"], burst=d["burst"], key=key, name=name, shared=shared)
    if kind == "concurrency":
        return Concurrency(
            d["limit"], key=key, queue=d["queue"], timeout=d["timeout"], name=name, shared=shared
        )
    if kind == "quota":
        return Quota(d["allowance"], d["per"], key=key, name=name, shared=shared)
    return Window(d["rate"], strategy=d.get("strategy", "fixed"), key=key, name=name, shared=shared)


async def known_rules(ctx: Context) -> tuple[list[Rule] | None, str]:
    """The rules to check against, and where they came from."""
    if ctx.settings is not None:
        return list(ctx.settings.rules), f"the rules of {ctx.args.config}"
    reports = await ctx.store().reports()
    if reports:
        return rules_from_reports(reports), f"the rules of {plural(len(reports), 'running worker')}"
    return None, ""
