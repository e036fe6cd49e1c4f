"""``python -m etcd_rdzv.testing.simulation``: play seeds, print the failures, exit 1 on one."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from . import SimConfig, simulate

__all__ = ["main", "seeds"]


def seeds(text: str) -> list[int]:
    """``3``, ``0-199`` or ``1,5,9-12``."""
    found: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        found += range(int(low), int(high or low) + 1)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="virtual seconds of faults per seed (default 300)")
    parser.add_argument("--seed", "--seeds", dest="seeds", type=seeds, default=[0],
                        help="seeds: 3, 0-199 or 1,5,9-12 (default 0)")
    parser.add_argument("--verbose", action="store_true", help="print every run's summary")
    args = parser.parse_args(argv)
    failed, started = 0, time.perf_counter()
    for seed in args.seeds:
        report = simulate(SimConfig.for_seed(args.seconds, seed))
        if not report.ok:
            failed += 1
            print(report.describe(), flush=True)
        elif args.verbose:
            print(report.summary(), flush=True)
    took = time.perf_counter() - started
    print(f"{len(args.seeds)} seeds, {failed} failed, {took:.1f} s "
          f"({len(args.seeds) / took:.1f} seeds/s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
