"""Bare Starlette: the baseline every ratio is taken against."""

from __future__ import annotations

from _common import PATH, PROBE, hello, probe
from starlette.applications import Starlette
from starlette.routing import Route

app = Starlette(routes=[Route(PATH, hello), Route(PROBE, probe)])
