"""The `ratelimit` command: check a config file, and operate a live fleet through its Redis.

    ratelimit check CONFIG
    ratelimit status [--config CONFIG] [--watch SECONDS]
    ratelimit override set RULE [LIMIT] CHANGE (--for DURATION | --until-cleared) [--reason TEXT]
        CHANGE: --rate R --burst B (either or both) | --slots N --queue Q --timeout S (any)
                | --factor F | --block [--message TEXT] | --shadow | --enforce
    ratelimit override list
    ratelimit override clear RULE [LIMIT]
    ratelimit reset KEY [--rule RULE [--limit LIMIT]]
    ratelimit top [NAME] [-n N] [--watch SECONDS]

Every command takes `--json` (one stable JSON document on stdout, for
scripts), `--redis URL` (default: $RATELIMIT_REDIS_URL, else the `[backend]`
table of `--config`) and `--prefix` (default: the config file's, else
"ratelimit"). Tables are aligned for people; colours only on a terminal, and
never with $NO_COLOR set. `ratelimit --version` prints the installed version.
A config file's `module:callable` entries are imported from the current
directory, as uvicorn imports an app.

Exit codes: 0 done; 1 refused (a config file or an override that is not
valid, checked before anything is written); 2 usage (argparse's); 3 Redis
could not be reached.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Sequence

from .check import cmd_check
from .context import Context, Refused
from .output import Out, clean, human_seconds
from .overrides import cmd_override_clear, cmd_override_list, cmd_override_set
from .parser import OK, REFUSED, UNREACHABLE, USAGE, build_parser, parse_duration
from .reset import cmd_reset
from .status import cmd_status
from .top import cmd_top

__all__ = [
    "OK",
    "REFUSED",
    "UNREACHABLE",
    "USAGE",
    "Out",
    "build_parser",
    "human_seconds",
    "main",
    "parse_duration",
]


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

    from .._errors import BackendError

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
