"""An image-generation API on simulated GPUs: the service the surge demo protects.

`app.py` is the Starlette app, `gpus.py` the processor-sharing GPU pool it runs
jobs on, `keys.py` the API-key and tier functions the rate-limit config
(`ratelimit.toml`) imports.
"""
