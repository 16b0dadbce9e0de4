"""Fixtures that start real servers on free loopback ports (filled in by the Redis work)."""
