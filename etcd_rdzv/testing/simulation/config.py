"""A simulated run's shape (:class:`SimConfig`) and how long it may take to heal
(:func:`liveness_bound`)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from etcd_rdzv.native.decide import NodeView, Step
from etcd_rdzv.native.model import NativeSettings

from ..soak import (
    CRASH_NOTICE_DELAY,
    LIVENESS_ROUNDS,
    MISSING_RANK_AFTER,
    POLL_INTERVAL,
    QUIET_SECONDS,
)
from .etcd import EXPIRY_SWEEP
from .faults import FAULT_WEIGHTS, longest_fault
from .process import SILENCE_SECONDS

__all__ = ["Rules", "SimConfig", "liveness_bound"]

#: The protocol: :func:`~etcd_rdzv.native.decide.decide`, or a variant a test passes.
Rules = Callable[[NodeView], Step]


@dataclass(frozen=True)
class SimConfig:
    """One simulated run's shape. :meth:`for_seed` draws the per-seed parts."""

    seed: int
    """Seeds every draw: the shape (in :meth:`for_seed`), the faults, the delays."""
    seconds: float = 300.0
    """Virtual seconds of faults, in bursts."""
    nodes: int = 7
    """Nodes kept alive (more than ``max_nodes``: standbys wait)."""
    min_nodes: int = 3
    max_nodes: int = 6
    keep_alive_interval: float = 0.5
    keep_alive_max_attempt: int = 4
    """With the interval, a node's lease TTL: 2 s, the soak's."""
    last_call_timeout: float = 0.75
    join_timeout: float = 60.0
    """Longer than :func:`liveness_bound`: a node that times out was stuck."""
    latency: tuple[float, float] = (0.0005, 0.02)
    """One way of a call, virtual seconds: a loopback etcd's."""
    watch_delay: tuple[float, float] = (0.001, 0.05)
    """A ``ctl/`` change's way to a node's view."""
    slow_share: float = 0.05
    """The share of calls and deliveries that take :attr:`slow` instead: a busy member, a
    garbage-collecting node, which reorder what nodes see."""
    slow: tuple[float, float] = (0.1, 1.0)
    fault_gap: tuple[float, float] = (0.3, 2.0)
    """Between two faults."""
    burst_seconds: tuple[float, float] = (10.0, 20.0)
    """Faults come in bursts this long, each followed by a heal."""
    faults: tuple[tuple[str, float], ...] = FAULT_WEIGHTS
    """Fault kinds and their weights (:mod:`.faults`); fewer kinds to minimise a failure."""

    def __post_init__(self) -> None:
        if self.nodes < self.min_nodes or self.max_nodes < self.min_nodes:
            raise ValueError(f"A simulation needs nodes >= min_nodes <= max_nodes, got nodes="
                             f"{self.nodes}, min_nodes={self.min_nodes}, max_nodes="
                             f"{self.max_nodes}.")

    @classmethod
    def for_seed(cls, seconds: float, seed: int, **overrides: Any) -> SimConfig:
        """A shape drawn from ``seed``: ``min_nodes`` 1 to 4, ``max_nodes`` up to 3 more,
        one node fewer than ``max_nodes`` to two more, the TTL's attempts 3 or 4 and a
        ``last_call_timeout`` of 0.25 to 1.5 s, so rounds seal both ways (full, last call)
        and standbys come and go."""
        draw = random.Random(f"sim-config-{seed}")
        min_nodes = draw.randint(1, 4)
        max_nodes = min_nodes + draw.randint(0, 3)
        drawn: dict[str, Any] = {
            "min_nodes": min_nodes, "max_nodes": max_nodes,
            "nodes": max(min_nodes, max_nodes + draw.randint(-1, 2)),
            "keep_alive_max_attempt": draw.choice((3, 4)),
            "last_call_timeout": round(draw.uniform(0.25, 1.5), 2),
        }
        return cls(seed=seed, seconds=seconds, **{**drawn, **overrides})

    def settings(self) -> NativeSettings:
        return NativeSettings(
            min_nodes=self.min_nodes, max_nodes=self.max_nodes, join_timeout=self.join_timeout,
            last_call_timeout=self.last_call_timeout,
            keep_alive_interval=self.keep_alive_interval,
            keep_alive_max_attempt=self.keep_alive_max_attempt)


def liveness_bound(config: SimConfig) -> float:
    """Virtual seconds from the end of a burst until the run must have settled.

    The last fault's effect may outlast the burst (:func:`~.faults.longest_fault`: a stalled
    keep-alive, a lagging watch, an unreachable etcd); a dead member's rank may stay unheld
    (:data:`MISSING_RANK_AFTER`). Then each of :data:`LIVENESS_ROUNDS` rounds takes at most:
    a dead member's lease running out (the TTL and the expiry sweep), the survivors told
    (:data:`CRASH_NOTICE_DELAY`) or polling (:data:`POLL_INTERVAL`), a call etcd did not
    answer (:data:`SILENCE_SECONDS`, and the interval before the node looks again), the last
    call and two keep-alive ticks, each step slow (:attr:`SimConfig.slow`, twice: a call and
    a delivery). The settled state must then hold :data:`QUIET_SECONDS` (counted from the end
    of the last fault's effect). 34.5 s with the default shape, 36 s at most for the shapes
    :meth:`SimConfig.for_seed` draws; ``join_timeout`` is 60 s, so a stuck node shows here
    before it times out.
    """
    settings = config.settings()
    per_round = (settings.node_ttl + EXPIRY_SWEEP + CRASH_NOTICE_DELAY[1] + POLL_INTERVAL[1]
                 + SILENCE_SECONDS[1] + config.keep_alive_interval
                 + config.last_call_timeout + 2 * config.keep_alive_interval
                 + 2 * config.slow[1])
    return (longest_fault(config) + MISSING_RANK_AFTER + LIVENESS_ROUNDS * per_round
            + QUIET_SECONDS)
