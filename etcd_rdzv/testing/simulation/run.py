"""One simulated run: its driver (the soak's, on the virtual clock) and :func:`simulate`.

:func:`simulate` plays one seed: the nodes start and form a first round, then bursts of
faults each followed by a heal (the run must settle within :func:`~.config.liveness_bound`),
then the close. The driver is the soak's (:mod:`etcd_rdzv.testing.soak`): the same agent, the
same restarts when a member dies or a rank never comes, the same close, and the same
:class:`~etcd_rdzv.testing.soak.SoakChecker`, fed the same :class:`SoakEvent`s; beside it,
the checks in etcd itself (:mod:`.invariants`). One addition to the soak's driver: a node
admitted to a round that a member has already left is restarted at once (its collectives
fail), as the members' news came before it was admitted.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Generator
from functools import partial
from typing import Any

from etcd_rdzv.keys import RunKeys
from etcd_rdzv.native.decide import decide
from etcd_rdzv.native.model import NodeId

from ..soak import (
    ADDRESSES,
    CLOSE_BOUND,
    CRASH_NOTICE_DELAY,
    FIRST_ROUND_BOUND,
    MISSING_RANK_AFTER,
    QUIET_SECONDS,
    SoakChecker,
    SoakEvent,
)
from .clock import Clock
from .config import Rules, SimConfig, liveness_bound
from .etcd import EtcdModel
from .faults import Faults
from .invariants import KEYS_CHECK, EtcdChecks
from .keys import SimKeys
from .node import SimNode
from .process import SimProcess
from .report import SimReport, describe_violations

__all__ = ["SETTLE_POLL", "Simulation", "simulate"]

#: How often the driver looks whether the run has settled, virtual seconds: the soak's
#: pace, fine next to a keep-alive interval.
SETTLE_POLL = 0.1


class Simulation:
    """The world of one run: clock, etcd, nodes, driver, checker."""

    def __init__(self, config: SimConfig, rules: Rules) -> None:
        self.config = config
        self.rules = rules
        self.settings = config.settings()
        self.clock = Clock()
        self.rng = random.Random(config.seed)
        """The faults' draws."""
        self.jitter = random.Random(config.seed * 7919 + 17)
        """Delays only: a fault's draw does not shift them."""
        self.keys: RunKeys = SimKeys(f"sim-{config.seed}")
        self.etcd = EtcdModel(self.clock, self.keys.control_prefix, self.jitter)
        self.run_lease = self.etcd.grant(3600)
        self.etcd.renewing(self.run_lease)  # every node renews it; it outlives the run
        self.etcd.write(puts=[(self.keys.run_lease, b"%x" % self.run_lease, self.run_lease)])
        self.checker = SoakChecker(config.min_nodes, config.max_nodes)
        self.nodes: dict[str, SimNode] = {}
        self.faults = Faults(self)
        self.closing = False
        self._pids: set[int] = set()
        self.checks = EtcdChecks(self)
        self.keys_when: dict[int, str] = {}
        """The join keys in etcd when each violation was seen (by its id)."""

    # --- what nodes ask of the world ----------------------------------------------------------

    def latency(self) -> float:
        return self._delay(self.config.latency)

    def watch_delay(self, lagging: bool) -> float:
        if lagging:
            return self.jitter.uniform(*self.faults.lag_delay)
        return self._delay(self.config.watch_delay)

    def _delay(self, usual: tuple[float, float]) -> float:
        if self.jitter.random() < self.config.slow_share:
            return self.jitter.uniform(*self.config.slow)
        return self.jitter.uniform(*usual)

    def uniform(self, low: float, high: float) -> float:
        return self.jitter.uniform(low, high)

    def record(self, event: SoakEvent) -> None:
        self.checker.record(event)
        self.seen()

    def seen(self) -> None:
        """Keep the join keys in etcd for each violation not yet seen."""
        for violation in self.checker.violations[-3:]:
            if id(violation) not in self.keys_when:
                self.keys_when[id(violation)] = "join keys in etcd then: " + ", ".join(
                    f"{label}: rounds {sorted(rounds)}"
                    for label, rounds in sorted(self.checks.join_keys().items()))

    def note(self, kind: str, node: str = "", detail: str = "") -> None:
        self.record(SoakEvent(self.clock.now, kind, node, detail=detail))

    def emit(self, node: SimProcess, kind: str, **fields: Any) -> None:
        """A node's event, as the soak's driver takes it from a node process."""
        now, label = self.clock.now, node.label
        if kind == "admitted":
            admission = fields["admission"]
            round_ = admission.round
            record = self.checker.rounds.get(round_)
            training = self.checker.training_in(round_)
            gone = sorted(member for member in (record.ranks.values() if record else ())
                          if member not in training)
            self.record(SoakEvent(now, kind, label, round_, admission.rank,
                                  admission.world_size, _ident(node.id)))
            if record is None:
                self.clock.after(MISSING_RANK_AFTER, lambda: self._missing(round_))
            if gone:  # too late for the members' news: its collectives fail at once
                self.notify(label, round_, f"{', '.join(gone)} left round {round_} before")
        elif kind == "exit":
            self.record(SoakEvent(now, kind, label, error=fields["error"],
                                  detail=fields["detail"]))
            if not self.closing:
                self.replace_if_needed()
        elif kind == "shutdown":
            self.record(SoakEvent(now, kind, label, detail="ok"))
        elif kind == "left":
            round_ = self.round_of(label)
            self.record(SoakEvent(now, kind, label))
            if round_:
                self.member_gone(label, round_)
        else:
            round_ = self.round_of(label) if kind in ("waiting", "joining") else 0
            detail = f"{fields['count']} waiting" if kind == "waiting" else ""
            self.record(SoakEvent(now, kind, label, detail=detail))
            if round_:
                self.member_gone(label, round_, "rendezvouses again")
    def spin(self, node: SimProcess) -> None:
        self.checker.flag("spin", f"{node.label} looped {node.trace[-1][1]} at one instant",
                          self.clock.now, nodes=(node.label,))
        self.seen()
        node.crash()

    # --- nodes ---------------------------------------------------------------------------------

    def spawn(self) -> SimNode:
        label = f"n{len(self.nodes)}"
        pid = self.rng.randrange(1, 1 << 22)
        while pid in self._pids:
            pid = self.rng.randrange(1, 1 << 22)
        self._pids.add(pid)
        node_id = NodeId(self.rng.choice(ADDRESSES), pid, self.rng.randrange(3))
        node = self.nodes[label] = SimNode(self, label, node_id)
        self.note("spawn", label)
        self.record(SoakEvent(self.clock.now, "hello", label, node_id=_ident(node_id)))
        self.clock.after(self.jitter.uniform(0.05, 0.5), node.start)
        return node

    def round_of(self, label: str) -> int:
        admission = self.checker.admission(label)
        training = self.checker.status(label) in ("training", "leaving")
        return admission.round if admission is not None and training else 0

    def population(self) -> int:
        return len(self.checker.live_nodes)

    def replace_if_needed(self) -> None:
        if self.population() < self.config.nodes and not self.closing:
            self.spawn()

    def member_gone(self, label: str, round_: int, what: str = "is gone") -> None:
        """A member of ``round_`` died, left or restarted: its peers' collectives fail."""
        for other in self.checker.training_in(round_):
            if other != label:
                self.notify(other, round_, f"{label} of round {round_} {what}")

    def notify(self, label: str, round_: int, why: str) -> None:
        """Tell ``label`` to restart after :data:`CRASH_NOTICE_DELAY`: its collectives failed."""
        self.clock.after(self.jitter.uniform(*CRASH_NOTICE_DELAY),
                         partial(self.tell_restart, label, round_, why))

    def tell_restart(self, label: str, round_: int, why: str) -> None:
        if self.checker.status(label) == "training" and self.round_of(label) == round_:
            self.record(SoakEvent(self.clock.now, "restart", label, detail=why))
            self.nodes[label].restart()

    def _missing(self, round_: int) -> None:
        """The soak's watchdog: a latest round whose ranks are not all held is restarted."""
        record = self.checker.rounds[round_]
        size = max(record.world_sizes)
        if round_ != self.checker.latest_round or len(record.ranks) >= size:
            return
        missing = sorted(set(range(size)) - set(record.ranks))
        self.record(SoakEvent(self.clock.now, "missing-rank", "", round_,
                              detail=f"ranks {missing} of round {round_} never reported"))
        for member in self.checker.training_in(round_):
            self.notify(member, round_, f"ranks {missing} never came")

    def settle(self, bound: float, since: str) -> Generator[float, None, float | None]:
        """Until the run has settled and stayed so :data:`QUIET_SECONDS`: the seconds it
        took, or None after ``bound`` (a liveness violation)."""
        began, quiet_since = self.clock.now, None
        seen, unsettled, keys_checked = -1, True, -math.inf
        while True:
            now = self.clock.now
            if now - keys_checked >= KEYS_CHECK:
                self.checks.check_keys()
                keys_checked = now
            if len(self.checker.history) != seen:  # only an event changes the answer
                seen, unsettled = len(self.checker.history), bool(self.checker.unsettled())
            if unsettled or now < self.faults.until:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= QUIET_SECONDS:
                invisible = self.checker.unsettled(self.checks.look())
                if not invisible:
                    return quiet_since - began
                self.note("note", detail="; ".join(invisible))
                quiet_since = None
            if now - began > bound:
                self.checker.check_liveness(now, bound, since, self.checks.look())
                self.seen()
                return None
            yield SETTLE_POLL

    def close(self) -> Generator[float, None, None]:
        """Close the run through the final round's rank 0, as the soak does."""
        self.closing = True
        live = self.checker.live_nodes
        ranked = sorted((admission.round, -admission.rank, label) for label in live
                        if self.checker.status(label) == "training"
                        and (admission := self.checker.admission(label)) is not None)
        final = ranked[-1][0] if ranked else 0
        members = [label for round_, _, label in reversed(ranked) if round_ == final]
        if not live:
            return
        closer = members[0] if members else live[0]
        self.checker.begin_close(self.clock.now, closer)
        self.nodes[closer].leave(close_first=True)
        deadline = self.clock.now + CLOSE_BOUND
        while self.checker.live(closer) and self.clock.now < deadline:
            yield SETTLE_POLL
        for member in members[1:]:
            self.notify(member, final, f"{closer} shut the run down")
        for label in live:
            if label not in members and self.checker.status(label) == "training":
                self.nodes[label].restart()
        while self.checker.live_nodes and self.clock.now < deadline:
            yield SETTLE_POLL
        self.checker.check_closed(self.clock.now)
        self.seen()

    def phases(self) -> Generator[float, None, tuple[int, float | None]]:
        """The whole run; the heals and the slowest (None: one did not settle)."""
        config = self.config
        for _ in range(config.nodes):
            self.spawn()
        healed = (yield from self.settle(FIRST_ROUND_BOUND, "the start")) is not None
        settled: list[float] = []
        left = config.seconds
        while healed and left > 0:
            burst = min(left, self.rng.uniform(*config.burst_seconds))
            left -= burst
            self.note("note", detail=f"a burst of faults for {burst:.1f} s")
            yield from self.faults.burst(burst)
            took = yield from self.settle(liveness_bound(config), "the faults stopped")
            healed = took is not None
            if took is not None:
                settled.append(took)
            self.note("note", detail=f"settled after {took:.1f} s" if took is not None
                      else "did not settle")
        yield from self.close()
        return len(settled), (max(settled, default=0.0) if healed else None)

    def run(self) -> SimReport:
        phases = self.phases()
        outcome: list[tuple[int, float | None]] = []

        def resume() -> None:
            try:
                delay = next(phases)
            except StopIteration as done:
                outcome.append(done.value)
                self.clock.stop()
                return
            self.clock.after(delay, resume)

        self.clock.after(0.0, resume)
        self.clock.run()
        heals, slowest = outcome[0] if outcome else (0, math.nan)
        rounds, admissions = self.checker.counts()
        return SimReport(self.config, dict(Counter(self.faults.counts)), rounds, admissions,
                         tuple(self.checker.violations), heals, slowest, self.clock.now,
                         self.clock.events, describe_violations(self))


def simulate(config: SimConfig, rules: Rules = decide) -> SimReport:
    """Play ``config``'s seed; ``rules`` is the protocol (a variant, to show that the
    simulation catches a broken rule)."""
    return Simulation(config, rules).run()


def _ident(node_id: NodeId) -> tuple[str, int, int]:
    return (node_id.addr, node_id.pid, node_id.local_id)
