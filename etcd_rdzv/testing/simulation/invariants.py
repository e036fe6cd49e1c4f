"""The invariants the simulation checks in etcd itself, beside the soak's checker (which
sees only what the nodes say):

* **A closed run seals no round** (torch's handler admits nobody once closed).
* **A waiting marker lives on a lease** (``MarkWaiting``'s contract: it goes when its node
  does); one on no lease never goes.
* **One join key per node**: the join Txn moves it (it deletes every key the node may
  hold). A node holds two only while its join's answer is lost and it has not joined again
  (:data:`KEYS_GRACE`); longer, one was left behind, and counts in a round its node is not
  in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from etcd_rdzv.native.model import Seal

from ..soak import EtcdLook

if TYPE_CHECKING:
    from .run import Simulation

__all__ = ["KEYS_CHECK", "KEYS_GRACE", "EtcdChecks"]

#: How long a node may hold two join keys, virtual seconds: while its join's answer is lost
#: (up to SILENCE_SECONDS, 2 s), the interval before it looks again and its next join, with
#: room to spare.
KEYS_GRACE = 5.0
#: The driver checks the join keys every this many seconds while it waits for a heal.
KEYS_CHECK = 1.0


class EtcdChecks:
    """The checks of one run; violations go to its checker."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.closed_at = 0
        """The revision ``ctl/closed`` was written at (0: open)."""
        self._flagged_keys: set[tuple[str | int, ...]] = set()
        self._two_keys: dict[tuple[str | int, ...], float] = {}
        self.sealers: dict[int, str] = {}
        """The node that sealed each round (its label), for a violation's history."""
        sim.etcd.watch(self, self._written)

    def _written(self, revision: int, key: bytes, value: bytes | None) -> None:
        """etcd's side of the invariants: a closed run seals no round; a waiting marker
        lives on its node's lease, so it goes when the node does (``MarkWaiting``'s
        contract); one on no lease never goes."""
        sim = self.sim
        if value is not None and key == sim.keys.closed and not self.closed_at:
            self.closed_at = revision
        parsed = sim.keys.parse_native(key) if value is not None else None
        if parsed is not None and parsed.kind == "seal":
            sealer = Seal.decode(value or b"").sealer
            labels = tuple(label for label, node in sim.nodes.items() if str(node.id) == sealer)
            self.sealers.update((parsed.round, label) for label in labels)
            if self.closed_at:
                sim.checker.flag("closed", f"round {parsed.round} was sealed at revision "
                                 f"{revision} by {sealer}, after the run was closed at "
                                 f"revision {self.closed_at}", sim.clock.now, parsed.round,
                                 labels)
                sim.seen()
        if value is not None and key.startswith(sim.keys.waiting_prefix) and \
                not sim.etcd.lease_of(key):
            sim.checker.flag("marker", f"{key.decode()} was written at revision {revision} "
                             f"by {value.decode(errors='replace')} on no lease: it outlives "
                             "its node", sim.clock.now,
                             nodes=tuple(label for label, node in sim.nodes.items()
                                         if node.name == value))
            sim.seen()

    def join_keys(self) -> dict[str, list[int]]:
        """The rounds of each live node's join keys in etcd."""
        sim = self.sim
        labels = {sim.nodes[label].name: label for label in sim.checker.live_nodes}
        found: dict[str, list[int]] = {}
        for key in sim.etcd.live(sim.keys.rounds_prefix):
            parsed = sim.keys.parse_native(key)
            if parsed is not None and parsed.node_name in labels:
                found.setdefault(labels[parsed.node_name], []).append(parsed.round)
        return found

    def look(self) -> EtcdLook:
        """What the soak's driver reads of etcd at a heal: each live node's join keys, and
        the join keys and waiting markers on no lease."""
        sim = self.sim
        unleased = sorted(key[len(sim.keys.native_prefix):].decode(errors="replace")
                          for prefix in (sim.keys.rounds_prefix, sim.keys.waiting_prefix)
                          for key in sim.etcd.live(prefix) if not sim.etcd.lease_of(key))
        return EtcdLook({label: tuple(rounds) for label, rounds in self.join_keys().items()},
                        tuple(unleased))

    def check_keys(self) -> None:
        """One join key per node: the join Txn moves it. A node may hold two while its join's
        answer is lost and it has not joined again (:data:`KEYS_GRACE`); longer, one was
        left behind (flagged once per node and rounds)."""
        sim = self.sim
        now, held_now = sim.clock.now, set[tuple[str | int, ...]]()
        for label, rounds in self.join_keys().items():
            if len(rounds) > 1:
                held: tuple[str | int, ...] = (label, *sorted(rounds))
                held_now.add(held)
                since = self._two_keys.setdefault(held, now)
                if now - since >= KEYS_GRACE and held not in self._flagged_keys:
                    self._flagged_keys.add(held)
                    sim.checker.flag("keys", f"{label} holds join keys in rounds "
                                     f"{sorted(rounds)} since {since:.3f}s: one was left "
                                     "behind", now, max(rounds), (label,))
                    sim.seen()
        self._two_keys = {held: since for held, since in self._two_keys.items()
                          if held in held_now}
