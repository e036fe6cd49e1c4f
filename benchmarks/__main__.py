"""``python -m benchmarks``: every benchmark, written up as docs/benchmarks.md (see run_all)."""

from __future__ import annotations

import sys

from .run_all import main

if __name__ == "__main__":
    sys.exit(main())
