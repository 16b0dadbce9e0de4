"""Shared fixtures: real servers (redis-server, cluster) in _servers.py; a limiter per
store kind in _limiters.py."""

from __future__ import annotations

from _limiters import closing, make_backend  # noqa: F401 - fixtures, discovered by name
from _servers import *  # noqa: F403 - fixtures are discovered by name
