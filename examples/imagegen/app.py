"""A small image-generation API on simulated GPUs, protected by ratelimit from a TOML file.

`POST /v1/images/generations` with `x-api-key` and a JSON body
`{"prompt": "...", "steps": 25, "size": "64x64"}` runs a job of
`steps x 0.02` GPU-seconds (x4 per doubling of the side) on the fleet's
processor-sharing `GPUPool`, then answers with a PNG drawn by Pillow from the
prompt. `GET /v1/models` is cheap. `create_app(protect=False)` is the same app
without the middleware: the surge driver compares the two.

Serve it with `uvicorn examples.imagegen.app:app`, or
`uvicorn --factory examples.imagegen.app:from_env` to choose with environment
variables (see `from_env`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ratelimit import RateLimitMiddleware

from .gpus import GPUPool
from .keys import api_key, tier_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    # ignore: tomli is only installed (and only needed) on Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

#: GPUs in the whole fleet; the config's "gpus" concurrency limit must match it.
FLEET_GPUS = 8
#: GPU-seconds per denoising step of a 64x64 image: 25 steps take 0.5 s.
SECONDS_PER_STEP = 0.02
#: Sides the model renders, and the work each costs relative to 64x64.
SIZES = {"64x64": (64, 1.0), "128x128": (128, 4.0), "256x256": (256, 16.0)}
MAX_STEPS = 50
MODEL = "tiny-diffusion-1"
#: The rate-limit configuration beside this module.
CONFIG = Path(__file__).with_name("ratelimit.toml")


def work_for(steps: int, size: str) -> float:
    """GPU-seconds a generation of `steps` at `size` needs on one GPU."""
    return steps * SECONDS_PER_STEP * SIZES[size][1]


def render_png(prompt: str, side: int) -> bytes:
    """A deterministic picture of `prompt`: a background and a few discs, as PNG bytes."""
    seed = hashlib.blake2b(prompt.encode("utf-8", "replace"), digest_size=32).digest()
    image = Image.new("RGB", (side, side), (seed[0], seed[1], seed[2]))
    draw = ImageDraw.Draw(image)
    for i in range(3, 31, 4):
        x, y, r, c = seed[i : i + 4]
        cx, cy, radius = x * side // 256, y * side // 256, 2 + r * side // 1024
        colour = (c, (c * 7) % 256, (c * 13) % 256)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "detail": detail}}, status_code=status)


def _parse(body: object) -> tuple[str, int, str] | str:
    """`(prompt, steps, size)` from a request body, or what is wrong with it."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > 1000:
        return "prompt: a non-empty string of at most 1000 characters"
    steps = body.get("steps", 25)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        return f"steps: an integer from 1 to {MAX_STEPS}"
    size = body.get("size", "64x64")
    if size not in SIZES:
        return f"size: one of {', '.join(SIZES)}"
    return prompt, steps, size


def create_app(
    *,
    protect: bool = True,
    gpus: int = FLEET_GPUS,
    config: str | os.PathLike[str] | Mapping[str, Any] = CONFIG,
    redis_url: str | None = None,
    redis_prefix: str = "imagegen",
) -> Starlette:
    """The API on a pool of `gpus` simulated GPUs; behind the rate limiter if `protect`.

    `config` is the rate-limit TOML file (or the same as a dict). `redis_url`
    adds a `[backend]` table to it so every worker shares limits in Redis;
    `gpus` is then this worker's share of the fleet.
    """
    pool = GPUPool(gpus)

    async def generations(request: Request) -> Response:
        key = api_key(request.scope)
        if key is None:
            return _problem(401, "send your API key in the x-api-key header")
        try:
            parsed = _parse(await request.json())
        except (json.JSONDecodeError, UnicodeDecodeError):
            parsed = "the body must be JSON"
        if isinstance(parsed, str):
            return _problem(400, parsed)
        prompt, steps, size = parsed
        work = work_for(steps, size)
        took = await pool.run(work)
        png = render_png(prompt, SIZES[size][0])
        headers = {
            "x-gpu-seconds": f"{work:.3f}",
            "x-generation-seconds": f"{took:.3f}",
            "x-tier": tier_of(key),
        }
        return Response(png, media_type="image/png", headers=headers)

    async def models(request: Request) -> Response:
        stats = pool.statistics()
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "sizes": list(SIZES)}],
                "fleet": {"gpus": stats.gpus, "running": stats.running},
            }
        )

    app = Starlette(
        routes=[
            Route("/v1/images/generations", generations, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
    app.state.pool = pool
    if protect:
        source: Mapping[str, Any]
        if isinstance(config, Mapping):
            source = config
        else:
            with open(config, "rb") as f:
                source = tomllib.load(f)
        if redis_url is not None:
            backend = {"type": "redis", "url": redis_url, "prefix": redis_prefix}
            source = {**source, "backend": backend}
        app.add_middleware(RateLimitMiddleware.from_config(source))
    return app


def from_env() -> Starlette:
    """`create_app` configured by the environment, for `uvicorn --factory` (and its workers).

    `IMAGEGEN_PROTECT` (`1`/`0`, default 1), `IMAGEGEN_GPUS` (this worker's
    GPUs, default all of `FLEET_GPUS`), `IMAGEGEN_REDIS_URL` and
    `IMAGEGEN_REDIS_PREFIX` (share limits in Redis).
    """
    env = os.environ
    return create_app(
        protect=env.get("IMAGEGEN_PROTECT", "1") != "0",
        gpus=int(env.get("IMAGEGEN_GPUS", FLEET_GPUS)),
        redis_url=env.get("IMAGEGEN_REDIS_URL") or None,
        redis_prefix=env.get("IMAGEGEN_REDIS_PREFIX", "imagegen"),
    )


#: The protected app on the in-process backend: `uvicorn examples.imagegen.app:app`.
app = create_app()
