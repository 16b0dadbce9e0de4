"""The `ratelimit` command line: its arguments, durations, usage errors."""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from typing import Any, NoReturn

#: Exit codes (see `ratelimit.cli`).
OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3

DEFAULT_PREFIX = "ratelimit"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
    set_.add_argument(
        "limit", metavar="LIMIT", nargs="?", help="a limit's name (default: every one that fits)"
    )
    change = set_.add_argument_group("the change (one kind)")
    change.add_argument("--rate", help='token bucket or window rate, e.g. "3/day"')
    change.add_argument("--burst", type=int, help="token bucket burst")
    change.add_argument("--slots", type=int, metavar="N", help="concurrency slots")
    # --slots' first name, still accepted but not shown: beside the positional LIMIT (a
    # limit's name) "--limit 4" read as naming a limit rather than giving it 4 slots.
    change.add_argument("--limit", dest="slots", type=int, help=argparse.SUPPRESS)
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


def _version() -> str:
    """The installed distribution's version (`surgelimit`), else the source tree's."""
    try:
        return metadata.version("surgelimit")
    except metadata.PackageNotFoundError:
        from .. import __version__

        return f"{__version__} (not installed)"


def usage(message: str) -> NoReturn:
    build_parser().error(message)
