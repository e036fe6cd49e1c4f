"""The faults a simulated run injects, drawn from the run's seeded :class:`random.Random`.

Each fault hits one node (drawn among the started live ones; a leave among the training
ones) or adds one:

* ``crash``: the node stops; its lease expires a TTL after its last renewal. It is replaced.
* ``leave``: a training node leaves (``leave()``): its lease is revoked at once. Replaced.
* ``arrive``: a node beyond :attr:`~.run.SimConfig.nodes` arrives (at most
  :data:`~etcd_rdzv.testing.soak.EXTRA_NODES` extra): a standby when the round is full.
* ``lost``: the node's next call of a kind (:data:`ARMED_CALLS`) is applied by etcd but its
  answer is lost: the node records etcd's silence.
* ``refused``: the node's next call of a kind fails before it reaches etcd (silence too).
* ``unreachable``: every call of the node fails, and its keep-alive too, for
  :data:`UNREACHABLE_SECONDS` (longer than a TTL: its lease may expire).
* ``stall``: the node's keep-alive stalls for longer than its lease's TTL (by
  :data:`STALL_BEYOND_TTL`): the lease expires while it waits or trains; when the keep-alive
  resumes the session loses it (lease 0) and wakes the node.
* ``lag``: the node's watch lags for :data:`LAG_SECONDS`: each change reaches its view
  :data:`LAG_DELAY` late, in order.

When a burst ends, armed ``lost``/``refused`` faults are disarmed; the windows above run out
on their own (:func:`longest_fault` bounds them, for the liveness bound), and the heal is
not called before they have (:attr:`Faults.until`): a lease that expires in a stall's last
second must not be found after the run was called settled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from typing import TYPE_CHECKING

from ..soak import EXTRA_NODES, SoakEvent

if TYPE_CHECKING:
    from .config import SimConfig
    from .run import Simulation

__all__ = [
    "ARMED_CALLS",
    "FAULT_WEIGHTS",
    "LAG_DELAY",
    "LAG_SECONDS",
    "STALL_BEYOND_TTL",
    "UNREACHABLE_SECONDS",
    "Faults",
    "longest_fault",
]

#: The faults and how often each is drawn (weights). Lost and refused calls weigh most:
#: one hits one call, and the calls whose loss matters (a join, a seal) are few.
FAULT_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("crash", 2.0), ("leave", 1.5), ("arrive", 1.0), ("lost", 3.0), ("refused", 2.0),
    ("unreachable", 1.5), ("stall", 1.5), ("lag", 1.5))
#: The calls a ``lost`` or ``refused`` fault is armed for (``any``: the next call at all).
ARMED_CALLS = ("join", "count", "mark", "seal", "rank", "grant", "delete", "any")
#: How long an unreachable etcd lasts for a node: from a blip to longer than a TTL (2 s).
UNREACHABLE_SECONDS = (0.2, 3.0)
#: A stalled keep-alive stops for the TTL and this much more: the lease always expires.
STALL_BEYOND_TTL = (0.1, 2.0)
#: How long a node's watch lags, and how late each change reaches it meanwhile.
LAG_SECONDS = (0.5, 4.0)
LAG_DELAY = (0.2, 2.0)


def longest_fault(config: SimConfig) -> float:
    """How long a fault's effect may outlast its burst, virtual seconds."""
    ttl = config.settings().node_ttl
    return max(UNREACHABLE_SECONDS[1], ttl + STALL_BEYOND_TTL[1] + config.keep_alive_interval,
               LAG_SECONDS[1] + LAG_DELAY[1])


class Faults:
    """The faults of one run."""

    lag_delay = LAG_DELAY

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.counts: Counter[str] = Counter()
        self.until = 0.0
        """When the last fault's window (a stall, a lag, an outage) ends, and its node has
        noticed (a keep-alive tick later): no heal is called before."""

    def burst(self, seconds: float) -> Generator[float, None, None]:
        sim = self.sim
        kinds = [kind for kind, _ in sim.config.faults]
        weights = [weight for _, weight in sim.config.faults]
        stop = sim.clock.now + seconds
        while sim.clock.now < stop and kinds:
            yield sim.rng.uniform(*sim.config.fault_gap)
            kind = sim.rng.choices(kinds, weights)[0]
            self.inject(kind, sim.rng.random())
        for node in sim.nodes.values():
            node.armed.clear()
        sim.note("note", detail="faults stopped")

    def inject(self, kind: str, choice: float) -> None:
        """One fault of ``kind``; ``choice`` in [0, 1) picks the target."""
        sim, now = self.sim, self.sim.clock.now
        if kind == "arrive":
            if sim.population() < sim.config.nodes + EXTRA_NODES:
                self.counts[kind] += 1
                sim.note("fault", detail="an extra node arrives")
                sim.spawn()
            return
        live = [label for label in sim.checker.live_nodes if sim.nodes[label].started]
        if kind == "leave":
            live = [label for label in live if sim.checker.status(label) == "training"]
        if not live:
            return
        label = live[int(choice * len(live))]
        node = sim.nodes[label]
        self.counts[kind] += 1
        if kind == "crash":
            round_ = sim.round_of(label)
            node.crash()
            sim.record(SoakEvent(now, "crash", label, detail=f"while "
                                 f"{sim.checker.status(label)}" + (f" in round {round_}"
                                                                    if round_ else "")))
            if round_:
                sim.member_gone(label, round_)
        elif kind == "leave":
            sim.record(SoakEvent(now, "leave", label,
                                 detail=f"leave() in round {sim.round_of(label)}"))
            node.leave()
        elif kind in ("lost", "refused"):
            call = sim.rng.choice(ARMED_CALLS)
            node.armed[call] = kind
            sim.note("fault", label, f"{kind}: its next {call} call")
        elif kind == "unreachable":
            seconds = sim.rng.uniform(*UNREACHABLE_SECONDS)
            node.unreachable_until = now + seconds
            node.stall(seconds)
            self._lasts(seconds)
            sim.note("fault", label, f"etcd unreachable for {seconds:.2f} s")
        elif kind == "stall":
            seconds = sim.settings.node_ttl + sim.rng.uniform(*STALL_BEYOND_TTL)
            node.stall(seconds)
            self._lasts(seconds)
            sim.note("fault", label, f"keep-alive stalls for {seconds:.2f} s")
        elif kind == "lag":
            seconds = sim.rng.uniform(*LAG_SECONDS)
            node.lag_until = now + seconds
            self._lasts(seconds + LAG_DELAY[1])
            sim.note("fault", label, f"watch lags for {seconds:.2f} s")
        else:
            raise ValueError(f"no such fault: {kind!r}")
        if kind in ("crash", "leave") and sim.population() < sim.config.nodes:
            sim.spawn()

    def _lasts(self, seconds: float) -> None:
        sim = self.sim
        self.until = max(self.until, sim.clock.now + seconds + sim.config.keep_alive_interval)
