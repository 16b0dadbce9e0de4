"""`python -m ratelimit.cli`: the `ratelimit` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
