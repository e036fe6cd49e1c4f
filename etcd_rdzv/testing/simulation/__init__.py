"""A seeded simulation of the native rendezvous: the real rules against a model of etcd, on
a virtual clock, many seeds a second.

    python -m etcd_rdzv.testing.simulation --seconds 300 --seeds 0-199

Policy:

* **The protocol is the real one.** Each node runs the real
  :func:`~etcd_rdzv.native.decide.decide` and the real ``NodeView.after_*`` records, with an
  executor that mirrors ``node.py`` step for step (:mod:`.node`) and requests that mirror
  ``rounds.py`` (:mod:`.requests`). Only etcd and time are models.
* **etcd is a small model** (:mod:`.etcd`): revisions, MVCC history for counts at a past
  revision with ``max_create_revision``, create-only Txns, leases that expire a TTL after
  their keep-alive stops and delete their keys in one revision, and ``ctl/`` watch events
  reaching each node after its own random delays, in order. No compaction, no members: an
  outage is a node's calls failing.
* **Time is virtual** (:mod:`.clock`): no asyncio, no sleeping. Each call takes a random
  latency; 5% of calls and deliveries are slow (0.1 to 1 s), which reorders what nodes see.
  A seed replays the same run, event for event.
* **Faults** (:mod:`.faults`) come in bursts, each followed by a heal: crashes, leaves, nodes
  arriving beyond ``max_nodes``, answers lost after etcd applied the write, calls refused
  before reaching it, an unreachable etcd, keep-alives stalled past the TTL, lagging watches.
* **The driver and the invariants are the soak's** (:mod:`etcd_rdzv.testing.soak`): the same
  agent (train, poll ``num_nodes_waiting()``, rendezvous again), the same restarts, the same
  close, and the same :class:`~etcd_rdzv.testing.soak.SoakChecker` over the same events: no
  rank twice in a round, ranks in torch's order of node descriptors, one world size per
  round within ``min_nodes..max_nodes``, each rank below it, rounds increasing per node, no
  error before the close (a ``TimedOut`` or ``Failed`` step is one), liveness within
  :func:`liveness_bound` of each burst's end (every waiting node holding a join key past
  the final round), and after the close: standbys exit cleanly (``Closed(standby=True)``),
  the others with ``RunClosedError``, all within ``CLOSE_BOUND``. The simulation adds what
  only etcd shows (:mod:`.invariants`): a closed run seals no round, a waiting marker lives
  on a lease, one join key per node; and no busy loop (a node looping at one instant).
* **A violation** prints the seed and the history of its round, with the steps of the nodes
  involved and of the node that sealed the round, and their join keys in etcd then
  (:meth:`SimReport.describe`).

What the model leaves out: compaction (a rank read never meets ``CompactedError``), etcd
members, leaders and their elections (a lease is never extended by an election), the run
lease's expiry (it outlives every run here), ``RunLease``'s creation race, values written by
other programs, permissions and TLS (no ``Failed`` but a refused Txn), torch's store and its
barriers, and the client's retries (a call's outcome is drawn whole).
"""

from .config import SimConfig, liveness_bound
from .report import SimReport
from .run import simulate

__all__ = ["SimConfig", "SimReport", "liveness_bound", "simulate"]
