"""A long linearizability soak: 16 clients on one rendezvous state of a 3-member cluster
while members are killed, restarted and paused; the history is then checked.

    python -m benchmarks.linearizability_soak [--seconds 120] [--clients 16] [--seed 1]

Prints operations, faults injected and violations (the run fails if there is any).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

from etcd_rdzv import AsyncEtcdRendezvousBackend, EtcdClient, EtcdConfig
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.testing import EtcdCluster
from etcd_rdzv.testing.faults import Faults
from etcd_rdzv.testing.history import History, run_clients


async def soak(seconds: float, clients: int, seed: int) -> int:
    rng = random.Random(seed)
    with EtcdCluster(3) as cluster:
        config = EtcdConfig(endpoints=parse_endpoints(cluster.get_endpoint()),
                            read_timeout=15, request_timeout=1)
        made = [EtcdClient(config) for _ in range(clients)]
        try:
            backends = [AsyncEtcdRendezvousBackend(c, "soak") for c in made]
            initial = await backends[0].set_state(b"initial")
            assert initial is not None
            history = History()
            faults = Faults(cluster)
            await asyncio.gather(run_clients(history, backends, seconds, initial[1]),
                                 faults.at_random(seconds, rng))
        finally:
            for client in made:
                await client.close()
    violations = history.check(initial=(b"initial", initial[1]))
    counts = history.counts
    print(f"operations checked: {counts['operations']:,} ({counts['sets']:,} set_state, "
          f"{counts['gets']:,} get_state; {counts['successful_sets']:,} successful writes, "
          f"{counts['errors']:,} calls with an unknown outcome or error)")
    print(f"faults injected: {len(faults.log)} ({', '.join(faults.log)})")
    print(f"violations: {len(violations)}")
    for violation in violations[:20]:
        print("  ", violation)
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    return asyncio.run(soak(args.seconds, args.clients, args.seed))


if __name__ == "__main__":
    sys.exit(main())
