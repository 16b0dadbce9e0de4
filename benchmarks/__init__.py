"""Benchmarks of `ratelimit` beside its peers; never part of the test suite.

Each benchmark module exposes `run(...)` returning its rows and a `main()`,
so a single `python -m benchmarks` runner can fold them together later. The
scripts themselves use only the standard library: the code under test runs
in virtual environments they create (`benchmarks/.venv-*`), so a peer that
installs its own top-level `ratelimit` module never shadows this library.
"""
