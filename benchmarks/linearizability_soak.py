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
import time

from etcd_rdzv import AsyncEtcdRendezvousBackend, EtcdClient, EtcdConfig
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.testing import EtcdCluster
from etcd_rdzv.testing.history import History, run_clients


async def inject_faults(cluster: EtcdCluster, seconds: float, rng: random.Random,
                        faults: list[str]) -> None:
    stop = time.monotonic() + seconds
    while time.monotonic() < stop - 3:
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        kind = rng.choice(["kill", "pause", "pause-leader"])
        if kind == "kill":
            victim = rng.randrange(len(cluster.members))
            await asyncio.to_thread(cluster.kill, victim)
            faults.append(f"kill {victim}")
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            await asyncio.to_thread(cluster.restart, victim)
            faults.append(f"restart {victim}")
        else:
            victim = await asyncio.to_thread(cluster.leader_index) if kind == "pause-leader" \
                else rng.randrange(len(cluster.members))
            cluster.pause(victim)
            faults.append(f"pause {victim}")
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            cluster.resume(victim)
            faults.append(f"resume {victim}")


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
            faults: list[str] = []
            await asyncio.gather(run_clients(history, backends, seconds, initial[1]),
                                 inject_faults(cluster, seconds, rng, faults))
        finally:
            for client in made:
                await client.close()
    violations = history.check(initial=(b"initial", initial[1]))
    counts = history.counts
    print(f"operations checked: {counts['operations']:,} ({counts['sets']:,} set_state, "
          f"{counts['gets']:,} get_state; {counts['successful_sets']:,} successful writes, "
          f"{counts['errors']:,} calls with an unknown outcome or error)")
    print(f"faults injected: {len(faults)} ({', '.join(faults)})")
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
