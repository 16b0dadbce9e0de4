"""Benchmarks of `ratelimit` beside its peers; never part of the test suite.

`python3 -m benchmarks` (see `__main__.py`) runs them all in one run and
rewrites RESULTS.md; each module also runs alone (`python3 -m
benchmarks.accuracy`, ...) and writes its own section. The orchestrating
modules use only the standard library: the code under test runs in virtual
environments they create (`benchmarks/.venv-*`), so a peer that installs its
own top-level `ratelimit` module never shadows this library.
"""
