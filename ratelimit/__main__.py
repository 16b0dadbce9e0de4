"""`python -m ratelimit`: the `ratelimit` command (see `ratelimit.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
