"""The `ratelimit` command: check a config file, and operate a live fleet through its Redis.

    ratelimit check CONFIG
    ratelimit status [--config CONFIG] [--watch SECONDS]
    ratelimit override set RULE [LIMIT] CHANGE (--for DURATION | --until-cleared) [--reason TEXT]
    ratelimit override list
    ratelimit override clear RULE [LIMIT]
    ratelimit reset KEY [--rule RULE [--limit LIMIT]]
    ratelimit top [NAME] [-n N] [--watch SECONDS]

Every command takes `--json` (one stable JSON document on stdout, for
scripts), `--redis URL` (default: $RATELIMIT_REDIS_URL, else the `[backend]`
table of `--config`) and `--prefix` (default: the config file's, else
"ratelimit"). Tables are aligned for people; colours only on a terminal, and
never with $NO_COLOR set.

Exit codes: 0 done; 1 refused (a config file or an override that is not
valid, checked before anything is written); 2 usage (argparse's); 3 Redis
could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from ._errors import ConfigError
from .policy import keys
from .policy.config import Settings, load_config
from .policy.engine import _digest
from .policy.limits import Concurrency, Limit, TokenBucket, Window
from .policy.live import removed, snapshot
from .policy.overrides import Override, check_override, describe_limit, resolve
from .policy.rules import Rule
from .policy.top import read_fleet

if TYPE_CHECKING:
    from .backends.redis import RedisBackend
    from .backends.stores import OverrideStore

#: Exit codes (see the module docstring).
OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3

DEFAULT_PREFIX = "ratelimit"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class Refused(Exception):
    """Input the command will not act on: printed as `ratelimit: <message>`, exit code 1.

    `field` is the field path of the configuration error behind it, if any.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unreachable(Exception):
    """Redis did not answer: exit code 3."""


# -- parsing ---------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """`"6h"`, `"90m"`, `"1h30m"`, `"45s"`, `"1d"` or plain seconds -> seconds (> 0)."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(value):
            if m.start() != pos and value[pos : m.start()].strip():
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos == 0 or value[pos:].strip():
            raise argparse.ArgumentTypeError(
                f"invalid duration {text!r}: use e.g. 6h, 90m, 1h30m, 45s, 2d or seconds"
            ) from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be more than 0")
    return seconds


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--redis, --prefix, --json: accepted before or after the command."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=default,
        help="Redis URL (default: $RATELIMIT_REDIS_URL, else the config file's [backend] url)",
    )
    parser.add_argument(
        "--prefix",
        default=default,
        help=f"the RedisBackend's key prefix (default: the config file's, else {DEFAULT_PREFIX})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print one JSON document (stable, for scripts) instead of tables",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `ratelimit` command."""
    parser = argparse.ArgumentParser(
        prog="ratelimit",
        description="Check ratelimit configuration; operate live overrides and state in Redis.",
        epilog="Exit codes: 0 done, 1 refused input, 2 usage, 3 Redis unreachable.",
    )
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _common(common, suppress=True)

    check = commands.add_parser(
        "check", parents=[common], help="validate a config file and print the rules as understood"
    )
    check.add_argument("config", metavar="CONFIG", help="a TOML config file")

    status = commands.add_parser(
        "status",
        parents=[common],
        help="effective limits, overrides in force and slots in use, per rule and limit",
    )
    status.add_argument(
        "--config", help="the app's config file (default: the rules the running workers report)"
    )
    status.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted"
    )

    override = commands.add_parser("override", help="set, list or clear live overrides")
    actions = override.add_subparsers(dest="action", required=True, metavar="ACTION")
    set_ = actions.add_parser(
        "set",
        parents=[common],
        help="override a rule or one of its limits, for a while",
        description=(
            "Override RULE (every limit the change fits) or its LIMIT. Give one change "
            "and how long it lasts. The override is checked (and against the rules, from "
            "--config or the running workers) before anything is written."
        ),
    )
    set_.add_argument("rule", metavar="RULE")
    set_.add_argument("limit", metavar="LIMIT", nargs="?", help="a limit's policy name")
    change = set_.add_argument_group("the change (one kind)")
    change.add_argument("--rate", help='token bucket or window rate, e.g. "3/day"')
    change.add_argument("--burst", type=int, help="token bucket burst")
    change.add_argument(
        "--limit", "--slots", dest="slots", type=int, metavar="N", help="concurrency slots"
    )
    change.add_argument("--queue", type=int, help="concurrency queue length")
    change.add_argument("--timeout", type=float, metavar="SECONDS", help="concurrency queue wait")
    change.add_argument("--factor", type=float, help="multiply every number of the limit(s)")
    change.add_argument("--block", action="store_true", help="refuse the whole rule with 503")
    change.add_argument("--message", help="with --block: the text refused callers read")
    change.add_argument(
        "--shadow", action="store_true", help="shadow mode: count would-be refusals, refuse none"
    )
    change.add_argument(
        "--enforce", action="store_true", help="enforce a rule configured as shadow"
    )
    lasting = set_.add_mutually_exclusive_group(required=True)
    lasting.add_argument(
        "--for", dest="duration", type=parse_duration, metavar="DURATION", help="e.g. 6h, 30m"
    )
    lasting.add_argument("--until-cleared", action="store_true", help="no expiry: clear it by hand")
    set_.add_argument("--reason", help="why (shown in list and status; never sent to callers)")
    set_.add_argument("--config", help="check against this config file's rules")

    list_ = actions.add_parser("list", parents=[common], help="the overrides in force")
    del list_
    clear = actions.add_parser(
        "clear", parents=[common], help="remove the overrides of a rule, or of one of its limits"
    )
    clear.add_argument("rule", metavar="RULE")
    clear.add_argument("limit", metavar="LIMIT", nargs="?")

    reset = commands.add_parser(
        "reset",
        parents=[common],
        help="forgive one caller: delete its token-bucket state",
        description=(
            "Delete the token-bucket state of the caller whose key text is KEY (the value the "
            "limit's key function returns: the API key of keys.header, the address of "
            "keys.client_ip, an IPv6 client as its network like 2001:db8::/64), in every "
            "rule and limit, or only --rule (and --limit). The key is hashed exactly as the "
            "engine does. Concurrency slots of running requests and Window counters are not "
            "touched."
        ),
    )
    reset.add_argument("key", metavar="KEY", help="the caller's key text")
    reset.add_argument("--rule", help="only this rule")
    reset.add_argument("--limit", help="only this limit of --rule")
    reset.add_argument("--config", help="check --rule and --limit against this config file")

    top = commands.add_parser(
        "top",
        parents=[common],
        help="the heaviest callers right now, merged over the live workers",
        description=(
            "The heaviest callers of each tracked key (TopCallers.track) over the fleet: "
            "each live worker's last window (the `every` seconds, default 5, before its "
            "last publish), summed. A caller's COUNT never undercounts and overcounts by "
            "at most ERROR; SHARE is COUNT over the requests of the name. Callers are the "
            "backend's digests unless every worker tracking the name has show_keys=True. "
            "Needs RateLimitMiddleware(top=...) on a RedisBackend."
        ),
    )
    top.add_argument("name", metavar="NAME", nargs="?", help="only this tracked name")
    top.add_argument("-n", type=int, default=10, metavar="N", help="callers per name (default 10)")
    top.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted"
    )
    return parser


# -- output ----------------------------------------------------------------------------------


class Out:
    """Where a command writes: tables and colours for people, one JSON document for scripts."""

    def __init__(self, stream: TextIO, *, as_json: bool) -> None:
        self.stream = stream
        self.json = as_json
        self.color = (
            not as_json
            and stream.isatty()
            and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb"
        )

    def paint(self, text: str, style: str) -> str:
        codes = {"bold": "1", "red": "31", "yellow": "33", "cyan": "36", "dim": "2", "green": "32"}
        if not self.color or not text:
            return text
        return f"\x1b[{codes[style]}m{text}\x1b[0m"

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def document(self, data: Any) -> None:
        json.dump(data, self.stream, indent=2, sort_keys=True, ensure_ascii=False)
        self.stream.write("\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
        """Aligned columns (widths from the plain text, so colours never misalign them)."""
        plain = [[c if isinstance(c, str) else c[0] for c in row] for row in rows]
        widths = [len(h) for h in header]
        for texts in plain:
            for i, text in enumerate(texts):
                widths[i] = max(widths[i], len(text))
        self.line(
            "  ".join(
                self.paint(h.ljust(w), "bold") for h, w in zip(header, widths, strict=True)
            ).rstrip()
        )
        for row in rows:
            cells: list[str] = []
            for cell, w in zip(row, widths, strict=True):
                text, style = (cell, "") if isinstance(cell, str) else cell
                padded = text.ljust(w)
                cells.append(self.paint(padded, style) if style else padded)
            self.line("  ".join(cells).rstrip())


#: A table cell: text, or (text, style).
Cell = str | tuple[str, str]


def clean(text: str) -> str:
    """Text from a store, safe to print on a terminal (no control characters)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def human_seconds(seconds: float | None) -> str:
    """`None` -> "until cleared"; 5430 -> "1h30m"; 42 -> "42s"."""
    if seconds is None:
        return "until cleared"
    s = int(seconds + 0.999)
    if s >= 86400:
        return f"{s // 86400}d{(s % 86400) // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def limit_numbers(desc: Mapping[str, Any]) -> str:
    """A described limit in a few characters: `5/minute b5`, `8 slots q64`."""
    if desc.get("kind") == "concurrency":
        text = f"{desc['limit']} slots"
        if desc.get("queue"):
            text += f" q{desc['queue']} {desc.get('timeout', 0):g}s"
        return text
    text = str(desc.get("rate", "?"))
    if "burst" in desc:
        text += f" b{desc['burst']}"
    if desc.get("strategy") not in (None, "fixed"):
        text += f" {desc['strategy']}"
    return text


# -- context -------------------------------------------------------------------------------


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
                _usage(
                    f"{self.args.command}: no Redis: give --redis URL, set RATELIMIT_REDIS_URL, "
                    "or a --config whose [backend] is redis"
                )
            from .backends.redis import RedisBackend

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
    try:
        return load_config(path)
    except ConfigError as exc:
        raise Refused(f"{path}: {exc}", exc.field) from None


def _rules_from_reports(reports: Mapping[str, Mapping[str, Any]]) -> list[Rule]:
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
    return Window(d["rate"], strategy=d.get("strategy", "fixed"), key=key, name=name, shared=shared)


async def _known_rules(ctx: Context) -> tuple[list[Rule] | None, str]:
    """The rules to check against, and where they came from."""
    if ctx.settings is not None:
        return list(ctx.settings.rules), f"the rules of {ctx.args.config}"
    reports = await ctx.store().reports()
    if reports:
        return _rules_from_reports(reports), f"the rules of {len(reports)} running worker(s)"
    return None, ""


# -- commands --------------------------------------------------------------------------------


def cmd_check(ctx: Context) -> int:
    settings = ctx.settings
    assert settings is not None
    data = {
        "ok": True,
        "config": ctx.args.config,
        "backend": dict(settings.backend) if settings.backend else {"type": "memory"},
        "fail": settings.fail,
        "headers": settings.headers,
        "rules": [_rule_data(r) for r in settings.rules],
    }
    out = ctx.out
    if out.json:
        out.document(data)
        return OK
    backend = data["backend"]
    out.line(
        f"{ctx.args.config}: {out.paint('ok', 'green')}, {len(settings.rules)} rule(s), "
        f"backend {backend.get('type')}" + (f" {backend['url']}" if backend.get("url") else "")
    )
    rows: list[list[Cell]] = []
    for r in data["rules"]:
        for i, lim in enumerate(r["limits"]):
            first = i == 0
            rows.append(
                [
                    r["name"] if first else "",
                    r["path"] if first else "",
                    ",".join(r["methods"] or ["*"]) if first else "",
                    str(r["cost"]) if first else "",
                    (r["fail"] or "-") if first else "",
                    (("shadow", "yellow") if r["shadow"] else "") if first else "",
                    lim["name"],
                    lim["kind"],
                    limit_numbers(lim),
                    lim["key"],
                ]
            )
    out.table(
        ["RULE", "PATH", "METHODS", "COST", "FAIL", "MODE", "LIMIT", "KIND", "NUMBERS", "KEY"],
        rows,
    )
    return OK


def _rule_data(rule: Rule) -> dict[str, Any]:
    limits = []
    for name, lim in zip(rule.limit_names(), rule.limits, strict=True):
        d = describe_limit(lim)
        d["name"] = name
        d["key"] = repr(lim.key)
        if isinstance(lim, Concurrency):
            d["lease"] = lim.lease
        limits.append(d)
    return {
        "name": rule.name,
        "path": rule.path,
        "methods": sorted(rule.methods) if rule.methods else None,
        "cost": rule.cost if isinstance(rule.cost, int) else repr(rule.cost),
        "fail": rule.fail,
        "shadow": rule.shadow,
        "limits": limits,
    }


async def cmd_override_set(ctx: Context) -> int:
    a = ctx.args
    kinds = []
    if any(v is not None for v in (a.rate, a.burst, a.slots, a.queue, a.timeout)):
        kinds.append("--rate/--burst/--limit/--queue/--timeout")
    if a.factor is not None:
        kinds.append("--factor")
    if a.block:
        kinds.append("--block")
    if a.shadow or a.enforce:
        kinds.append("--shadow/--enforce" if not (a.shadow and a.enforce) else "--shadow --enforce")
    if len(kinds) != 1 or (a.shadow and a.enforce):
        _usage(
            "override set: give exactly one kind of change: --rate [--burst], --burst, "
            "--limit/--queue/--timeout, --factor, --block, --shadow or --enforce"
            + (f" (got {', '.join(kinds)})" if kinds else "")
        )
    if a.message is not None and not a.block:
        _usage("override set: --message goes with --block")
    store = ctx.store()
    try:
        now = await store.sync_clock()
        override = Override(
            a.rule,
            a.limit,
            rate=a.rate,
            burst=a.burst,
            slots=a.slots,
            queue=a.queue,
            timeout=a.timeout,
            factor=a.factor,
            block=a.block,
            message=a.message,
            shadow=True if a.shadow else (False if a.enforce else None),
            expires_at=None if a.until_cleared else now + a.duration,
            reason=a.reason,
            created_at=now,
            created_by=_who(),
        )
    except ConfigError as exc:
        raise Refused(f"override refused: {exc}", exc.field) from None
    rules, source = await _known_rules(ctx)
    if rules is not None:
        try:
            check_override(override, rules)
        except ConfigError as exc:
            raise Refused(
                f"override refused: {exc} (checked against {source})", exc.field
            ) from None
    version = await store.put(override.slot, override.to_json())
    out = ctx.out
    if out.json:
        out.document(
            {"override": _override_data(override, now), "version": version, "checked": bool(rules)}
        )
        return OK
    target = f"{override.rule}/{override.limit}" if override.limit else override.rule
    out.line(
        f"set {out.paint(target, 'bold')}: {out.paint(override.describe(), 'cyan')} "
        f"{_lasting(override, now)} (version {version})"
    )
    if rules is None:
        out.line(
            out.paint(
                "note: not checked against the rules (no --config, and no worker reports)", "dim"
            )
        )
    return OK


def _lasting(o: Override, now: float) -> str:
    if o.expires_at is None:
        return "until cleared"
    return f"for {human_seconds(o.time_left(now))} (until {iso(o.expires_at)})"


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name (a container without passwd): the host is still useful
        user = "?"
    return f"{user}@{socket.gethostname()}"


def _override_data(o: Override, now: float) -> dict[str, Any]:
    data = o.to_dict()
    data.pop("v", None)
    data["slot"] = o.slot
    data["kind"] = o.kind
    data["change"] = o.describe()
    data["time_left"] = o.time_left(now)
    data["expires"] = iso(o.expires_at)
    return data


async def cmd_override_list(ctx: Context) -> int:
    store = ctx.store()
    stored = snapshot(await store.load())
    now = store.now()
    live = [o for o in stored.overrides if not o.expired(now)]
    out = ctx.out
    if out.json:
        out.document(
            {
                "version": stored.version,
                "overrides": [_override_data(o, now) for o in live],
                "unreadable": [{"slot": s, "error": str(e)} for s, e in stored.unreadable],
            }
        )
        return OK
    if not live:
        out.line("no overrides in force")
    else:
        out.table(
            ["RULE", "LIMIT", "CHANGE", "LEFT", "REASON", "BY"],
            [
                [
                    o.rule,
                    o.limit or ("*" if o.kind in ("set", "factor") else "-"),
                    (o.describe(), "red" if o.kind == "block" else "cyan"),
                    human_seconds(o.time_left(now)),
                    clean(o.reason or ""),
                    clean(o.created_by or ""),
                ]
                for o in live
            ],
        )
    for slot, exc in stored.unreadable:
        out.line(out.paint(f"unreadable entry {clean(slot)}: {clean(str(exc))}", "red"))
    return OK


async def cmd_override_clear(ctx: Context) -> int:
    a = ctx.args
    store = ctx.store()
    gone, version = await store.clear(a.rule, a.limit)
    cleared = removed(gone)
    now = store.now()
    out = ctx.out
    if out.json:
        out.document({"removed": [_override_data(o, now) for o in cleared], "version": version})
        return OK
    target = f"{a.rule}/{a.limit}" if a.limit else a.rule
    if not cleared:
        out.line(f"no override on {clean(target)}")
    for o in cleared:
        out.line(f"cleared {o.slot}: {o.describe()}")
    return OK


async def status_data(ctx: Context) -> dict[str, Any]:
    """Everything `status` shows, as its `--json` document."""
    store = ctx.store()
    reports = await store.reports()
    stored = snapshot(await store.load())
    now = store.now()
    source: str
    if ctx.settings is not None:
        rules = list(ctx.settings.rules)
        source = "config"
    else:
        rules = _rules_from_reports(reports)
        source = "workers"
    resolution = resolve(rules, stored.overrides, now)
    admin = ctx.backend().admin()
    data_rules = []
    for e in resolution.rules:
        limits = []
        names = e.configured.limit_names()
        for name, conf, eff, shaper in zip(
            names, e.configured.limits, e.rule.limits, e.by_limit, strict=True
        ):
            item: dict[str, Any] = {
                "name": name,
                "kind": conf.kind,
                "configured": describe_limit(conf),
                "effective": describe_limit(eff),
                "override": None if shaper is None else _override_data(shaper, now),
            }
            if isinstance(conf, Concurrency):
                item["in_use"] = await admin.in_use(e.rule.name, name, conf.shared)
                item["waiting"] = await admin.waiting(e.rule.name, name, conf.shared)
            limits.append(item)
        data_rules.append(
            {
                "name": e.rule.name,
                "path": e.rule.path,
                "shadow": e.rule.shadow,
                "blocked": e.block is not None,
                "block": None if e.block is None else _override_data(e.block, now),
                "limits": limits,
            }
        )
    current = sum(1 for r in reports.values() if r.get("version") == stored.version)
    return {
        "redis": _redact(ctx.url or ""),
        "prefix": ctx.prefix,
        "time": iso(now),
        "version": stored.version,
        "rules_from": source,
        "workers": {
            "live": len(reports),
            "current": current,
            "ids": sorted(reports),
        },
        "rules": data_rules,
        "problems": [{"slot": o.slot, "error": str(exc)} for o, exc in resolution.problems]
        + [{"slot": s, "error": str(exc)} for s, exc in stored.unreadable],
    }


def _redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", url)


def print_status(out: Out, data: Mapping[str, Any]) -> None:
    workers = data["workers"]
    live, current = workers["live"], workers["current"]
    state = f"{current}/{live} at this version" if live else "no worker reports"
    out.line(
        f"{data['redis']} prefix {data['prefix']}  version {data['version'] or '-'}  "
        f"workers: {out.paint(state, 'green' if live and live == current else 'yellow')}"
    )
    rows: list[list[Cell]] = []
    for r in data["rules"]:
        mode: Cell = ""
        if r["blocked"]:
            b = r["block"]
            mode = (f"BLOCKED {human_seconds(b['time_left'])}", "red")
        elif r["shadow"]:
            mode = ("shadow", "yellow")
        for i, lim in enumerate(r["limits"]):
            o = lim["override"]
            effective = limit_numbers(lim["effective"])
            rows.append(
                [
                    r["name"] if i == 0 else "",
                    mode if i == 0 else "",
                    lim["name"],
                    limit_numbers(lim["configured"]),
                    (effective, "cyan") if o else effective,
                    f"{o['change']} ({o['slot']})" if o else "",
                    human_seconds(o["time_left"]) if o else "",
                    str(lim["in_use"]) if "in_use" in lim else "",
                    str(lim["waiting"]) if "waiting" in lim else "",
                    clean(o.get("reason") or "") if o else "",
                ]
            )
    if rows:
        out.table(
            ["RULE", "MODE", "LIMIT", "CONFIGURED", "EFFECTIVE", "OVERRIDE", "LEFT", "IN USE",
             "WAITING", "REASON"],
            rows,
        )  # fmt: skip
    else:
        out.line("no rules known: pass --config, or start the app (its workers report their rules)")
    for p in data["problems"]:
        out.line(out.paint(f"ignored {clean(p['slot'])}: {clean(p['error'])}", "red"))


async def cmd_status(ctx: Context) -> int:
    out = ctx.out
    every = ctx.args.watch
    if every is not None and not every > 0:
        _usage("status: --watch takes a number of seconds > 0")
    while True:
        data = await status_data(ctx)
        if out.json:
            json.dump(data, out.stream, sort_keys=True, ensure_ascii=False)
            out.line()
        else:
            if every is not None and out.stream.isatty():
                out.stream.write("\x1b[H\x1b[2J")
            print_status(out, data)
        out.stream.flush()
        if every is None:
            return OK
        await asyncio.sleep(every)


async def cmd_reset(ctx: Context) -> int:
    a = ctx.args
    if a.limit and not a.rule:
        _usage("reset: --limit needs --rule")
    for field, value in (("--rule", a.rule), ("--limit", a.limit)):
        if value is not None:
            try:
                from .policy.limits import check_name

                check_name(field, value)
            except ConfigError as exc:
                raise Refused(str(exc)) from None
    if ctx.settings is not None and a.rule:
        by_name = {r.name: r for r in ctx.settings.rules}
        if a.rule not in by_name:
            raise Refused(f"--rule: expected one of the rules {sorted(by_name)}, got {a.rule!r}")
        if a.limit and a.limit not in by_name[a.rule].limit_names():
            raise Refused(
                f"--limit: expected one of {by_name[a.rule].limit_names()}, got {a.limit!r}"
            )
    digest = _digest(a.key)
    deleted = await ctx.backend().admin().forget(digest, a.rule or None, a.limit or None)
    out = ctx.out
    if out.json:
        out.document({"caller": digest, "deleted": deleted})
        return OK
    if deleted:
        for key in deleted:
            out.line(f"deleted {key}")
    else:
        out.line(
            "nothing stored for that caller (its buckets are full already, or the key text "
            "differs from what the key function returns)"
        )
    return OK


async def top_data(ctx: Context) -> dict[str, Any]:
    """Everything `top` shows, as its `--json` document."""
    a = ctx.args
    fleet = await read_fleet(ctx.backend().top_store(), name=a.name, n=a.n)
    tables: dict[str, Any] = {}
    for name, t in fleet.tables.items():
        tables[name] = {
            "total": t.total,
            "workers": t.workers,
            "keys_shown": t.keys_shown,
            "callers": [
                {
                    "caller": c.item,
                    "count": c.estimate,
                    "error": c.error,
                    "share": round(c.estimate / t.total, 4) if t.total else 0.0,
                }
                for c in t.callers
            ],
        }
    workers = [
        {
            "id": w.get("worker"),
            "pid": w.get("pid"),
            "every": w.get("every"),
            "window_start": iso(w.get("start")),
            "window_end": iso(w.get("end")),
            "age": None if w.get("end") is None else round(max(0.0, fleet.time - w["end"]), 3),
        }
        for w in fleet.workers
    ]
    return {
        "redis": _redact(ctx.url or ""),
        "prefix": ctx.prefix,
        "time": iso(fleet.time),
        "workers": sorted(workers, key=lambda w: str(w["id"])),
        "tables": tables,
    }


def print_top(out: Out, data: Mapping[str, Any]) -> None:
    workers = data["workers"]
    if not workers:
        out.line(
            "no worker publishes its heaviest callers: track keys with TopCallers and pass "
            "RateLimitMiddleware(top=...) with a RedisBackend"
        )
        return
    ages = [w["age"] for w in workers if w["age"] is not None]
    every = sorted({w["every"] for w in workers if w["every"] is not None})
    window = "/".join(f"{e:g}s" for e in every) or "?"
    line = f"{data['redis']} prefix {data['prefix']}  {len(workers)} workers, windows of {window}"
    if ages:
        line += f" ended {min(ages):.1f}-{max(ages):.1f}s ago"
    out.line(line)
    for name, t in data["tables"].items():
        out.line()
        what = "keys" if t["keys_shown"] else "key digests"
        out.line(
            f"{out.paint(clean(name), 'bold')}: {t['total']} requests over {t['workers']} "
            f"workers ({what})"
        )
        if not t["callers"]:
            out.line(out.paint("  no callers in this window", "dim"))
            continue
        out.table(
            ["CALLER", "COUNT", "±ERROR", "SHARE"],
            [
                [
                    clean(c["caller"]),
                    str(c["count"]),
                    str(c["error"]),
                    f"{100 * c['share']:.1f}%",
                ]
                for c in t["callers"]
            ],
        )


async def cmd_top(ctx: Context) -> int:
    out = ctx.out
    a = ctx.args
    if a.n < 1:
        _usage("top: -n takes a number of callers >= 1")
    if a.watch is not None and not a.watch > 0:
        _usage("top: --watch takes a number of seconds > 0")
    while True:
        data = await top_data(ctx)
        if a.watch is None and a.name is not None and data["workers"] and not data["tables"]:
            raise Refused(f"no live worker tracks {a.name!r}")
        if out.json:
            json.dump(data, out.stream, sort_keys=True, ensure_ascii=False)
            out.line()
        else:
            if a.watch is not None and out.stream.isatty():
                out.stream.write("\x1b[H\x1b[2J")
            print_top(out, data)
        out.stream.flush()
        if a.watch is None:
            return OK
        await asyncio.sleep(a.watch)


def _usage(message: str) -> NoReturn:
    build_parser().error(message)


# -- entry point -----------------------------------------------------------------------------


async def _run(ctx: Context) -> int:
    a = ctx.args
    try:
        if a.command == "check":
            return cmd_check(ctx)
        if a.command == "status":
            return await cmd_status(ctx)
        if a.command == "reset":
            return await cmd_reset(ctx)
        if a.command == "top":
            return await cmd_top(ctx)
        if a.action == "set":
            return await cmd_override_set(ctx)
        if a.action == "list":
            return await cmd_override_list(ctx)
        return await cmd_override_clear(ctx)
    finally:
        await ctx.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Out(sys.stdout, as_json=bool(args.json))
    try:
        ctx = Context(args, out)
        return asyncio.run(_run(ctx))
    except Refused as exc:
        _fail(out, "refused", str(exc), exc.field)
        return REFUSED
    except KeyboardInterrupt:
        return OK
    except BrokenPipeError:
        # The reader went away (`ratelimit status --json | head`): stop quietly, and
        # keep Python from complaining again while it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return REFUSED
    except Exception as exc:
        if _is_unreachable(exc):
            _fail(out, "unreachable", f"cannot reach Redis: {type(exc).__name__}: {exc}")
            return UNREACHABLE
        raise


def _fail(out: Out, kind: str, message: str, field: str | None = None) -> None:
    """An error: on stderr for people; also as a JSON document on stdout with --json."""
    print(f"ratelimit: {clean(message)}", file=sys.stderr)
    if out.json:
        out.document({"ok": False, "error": kind, "field": field, "message": message})


def _is_unreachable(exc: BaseException) -> bool:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from ._errors import BackendError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(
            seen,
            (RedisConnectionError, RedisTimeoutError, BackendError, ConnectionRefusedError,
             TimeoutError, socket.gaierror),
        ):  # fmt: skip
            return True
        seen = seen.__cause__ or seen.__context__
    return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
