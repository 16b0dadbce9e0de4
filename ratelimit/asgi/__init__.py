"""The ASGI face: the middleware, refusal responses and header fields, metrics."""
