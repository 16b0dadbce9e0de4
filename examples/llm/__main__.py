"""`python -m examples.llm`: serve the simulated chat API, or `--demo` three callers against it.

    python -m examples.llm                           # http://127.0.0.1:8000/v1
    python -m examples.llm --redis redis://127.0.0.1:6379/0 --port 8001
    python -m examples.llm --demo                    # about 20 s, then a table

Then point any OpenAI client at it:
`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-anything")`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from ratelimit import Backend, RedisBackend

from .app import TOKENS_PER_SECOND, Limits, create_app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="python -m examples.llm",
        description="A simulated OpenAI-compatible streaming chat API, limited by requests "
        "and tokens per API key and by tokens for the whole fleet.",
    )
    parser.add_argument("--demo", action="store_true", help="play three callers, print a table")
    parser.add_argument("--duration", type=float, default=20.0, help="--demo seconds (20)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis", metavar="URL", help="keep the limits in this Redis")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=TOKENS_PER_SECOND,
        help=f"the model's streaming pace per reply (default {TOKENS_PER_SECOND:g})",
    )
    parser.add_argument("--rpm", type=int, default=defaults.requests, help="requests/min/key")
    parser.add_argument(
        "--itpm", type=int, default=defaults.input_tokens, help="input tokens/min/key"
    )
    parser.add_argument(
        "--otpm", type=int, default=defaults.output_tokens, help="output tokens/min/key"
    )
    parser.add_argument(
        "--fleet-tpm", type=int, default=defaults.fleet_tokens, help="tokens/min, all keys"
    )
    args = parser.parse_args(argv)
    if args.tokens_per_second <= 0 or args.duration <= 0:
        parser.error("--tokens-per-second and --duration must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    backend: Backend | None = RedisBackend(args.redis, prefix="llm") if args.redis else None
    if args.demo:
        from .demo import run

        try:
            played = asyncio.run(
                run(
                    duration=args.duration,
                    backend=backend,
                    tokens_per_second=args.tokens_per_second,
                )
            )
        except KeyboardInterrupt:
            return 130
        print("\n".join(played.lines))
        return 0
    import uvicorn

    limits = Limits(args.rpm, args.itpm, args.otpm, args.fleet_tpm)
    app = create_app(limits=limits, backend=backend, tokens_per_second=args.tokens_per_second)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
