"""Four agents meet through torch's own rendezvous handler over etcd v3.

    python examples/rendezvous_demo.py

An embedded etcd (:class:`etcd_rdzv.testing.EtcdServer`) on loopback, then four agent
processes (:func:`etcd_rdzv.testing.agents.run_agents`): each builds torch's
``DynamicRendezvousHandler`` through this project's plug-in, calls ``next_rendezvous()``
and reports its rank, world size, round and how long the call took. Exits non-zero unless
the ranks are exactly 0..3 in one world of size 4 and one round.
"""

from __future__ import annotations

import signal
import sys
import time
import uuid
from types import FrameType

from etcd_rdzv.testing import EtcdServer
from etcd_rdzv.testing.agents import AgentError, run_agents

AGENTS = 4


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that the finally clauses stop etcd and the agents


def main() -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    with EtcdServer() as server:
        run_id = f"demo-{uuid.uuid4().hex[:8]}"
        print(f"etcd is serving on {server.get_endpoint()}; {AGENTS} agents join run "
              f"{run_id!r}, min_nodes = max_nodes = {AGENTS}", flush=True)
        try:
            results = run_agents(server.get_endpoint(), run_id, AGENTS, timeout=60.0)
        except AgentError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    print(f"{'agent':>5}  {'pid':>7}  {'rank':>4}  {'world':>5}  {'round':>5}  "
          f"{'next_rendezvous':>15}")
    for result in sorted(results, key=lambda r: r.rank):
        print(f"{result.index:>5}  {result.pid:>7}  {result.rank:>4}  {result.world_size:>5}  "
              f"{result.round:>5}  {result.seconds:>13.2f} s")
    print(f"MASTER_ADDR:MASTER_PORT from the rendezvous store: "
          f"{results[0].master_addr}:{results[0].master_port}")
    print(f"total wall time: {time.monotonic() - started:.1f} s (etcd start, agents, "
          "rendezvous, shutdown, etcd stop)")
    ranks = sorted(result.rank for result in results)
    one_world = {(r.world_size, r.round, r.master_addr, r.master_port) for r in results}
    if ranks != list(range(AGENTS)) or len(one_world) != 1 or results[0].world_size != AGENTS:
        print(f"FAILED: ranks {ranks}, (world size, round, master) {sorted(one_world)}",
              file=sys.stderr)
        return 1
    print(f"OK: ranks {ranks}, world size {AGENTS}, round {results[0].round}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
