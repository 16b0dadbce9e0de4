"""Pure state transitions: no I/O, no clock reads; time is always passed in.

These functions are the single source of truth. The memory backend runs them
directly; the Redis Lua scripts are tested against them on the same inputs.
"""
