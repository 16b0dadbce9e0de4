"""Backends store limiter state: the protocol, the in-process store and Redis."""
