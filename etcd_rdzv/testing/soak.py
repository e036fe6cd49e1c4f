"""A randomized fault soak of the native rendezvous against a real 3-member etcd cluster.

    python -m etcd_rdzv.testing.soak --seconds 120 --seed 1 [--verbose]

Prints the report (faults by kind, rounds, admissions) and, on a violation, the seed and the
history of the offending round; exits 1 when there is a violation. From Python:
:func:`run_soak` (or :func:`soak` on a running loop) returns a :class:`SoakReport`.

Policy:

* **One OS process per node.** Each node is ``python -m etcd_rdzv.testing.soak --node ...``
  with its own :class:`~etcd_rdzv.EtcdClient` and :class:`~etcd_rdzv.AsyncNativeRendezvous`,
  speaking JSON lines with the driver (commands on stdin, events on stdout, its log on
  stderr, kept in a file). A crash is ``SIGKILL``: exactly what etcd sees when an agent's
  host dies. The gRPC connection drops, no keep-alive, ``leave()`` or ``finally`` block
  runs, and the node's lease is left to expire. A thread with its own event loop cannot be
  killed: stopping its loop runs cancellations and ``finally`` blocks that a crash never
  runs, and its channel is closed politely. So threads would test a gentler fault than the
  one that happens. torchrun's agents are processes, too.
* **Nodes are driven as torch's agent drives a handler**: ``next_rendezvous()``, then
  "training", polling ``num_nodes_waiting()`` every 0.2 to 0.5 s, and rendezvous again when
  it turns positive. When a member of a round dies (crash, graceful leave) or rendezvouses
  again, the workers of the round's other members fail their collectives and their agents
  rendezvous again; the driver, which knows what it killed and who left, tells them to do
  so after a small random delay. A rank nobody holds (its node died before it said so)
  fails the collectives the same way: the driver tells that round's members after
  :data:`MISSING_RANK_AFTER`.
* **Faults**, drawn from a :class:`random.Random` seeded with the seed: a node crashed
  and replaced by a new one; a training node leaving gracefully (``leave()``: torch's
  ``shutdown()`` closes the run for everyone) and replaced; an extra node beyond
  ``max_nodes`` (a standby); the etcd leader killed and restarted; a member paused (SIGSTOP)
  for 0.5 to 3 s, longer than a node's lease TTL (2 s), so the leases of the nodes whose
  client talks to that member may expire. One etcd fault at a time (the cluster keeps a
  quorum); node faults overlap with it. Each node prefers one member (its endpoints start
  there), drawn at random. The faults are planned from the seed alone before the soak
  starts (:func:`plan_bursts`): a seed gives the same faults in the same order (kinds,
  gaps, durations, members, bursts), but which node a crash hits depends on the state the
  timing made, so a seed makes runs alike, not identical.
* **Invariants** (:class:`SoakChecker`), checked on every admission: no rank held twice in a
  round; ranks in torch's order of node descriptors (``(addr, pid, local_id)``: within a
  round, ``a < b`` implies ``rank(a) < rank(b)``); one world size per round, within
  ``min_nodes..max_nodes``; each rank below the world size; rounds strictly increasing per
  node; no exception escaping ``next_rendezvous`` (``RunClosedError`` and
  ``StandbyExitError`` only after the driver closed the run).
* **Liveness**: faults come in bursts (:attr:`SoakConfig.burst_seconds`), some of them
  of etcd faults only (:attr:`SoakConfig.etcd_only_bursts`). Within :func:`liveness_bound`
  seconds of a burst's end (its docstring gives the sum) the run must settle: every live
  node that is not a standby a member of one final round with ranks ``0..W-1``, every
  other live node a standby beside a full round. The driver then looks once into etcd
  (:class:`EtcdLook`), at what no call of the API shows: each waiting node must hold a
  join key past the final round (else ``num_nodes_waiting()`` can never count it, and it
  waits for nothing); a member of the final round without its join key (its lease lapsed
  while it trained) leaves room, so nobody may wait beside it; no join key or waiting
  marker may be without a lease (nothing would ever delete it).
* **The end**: the rank-0 member closes the run (``shutdown()``) and the other members
  rendezvous again, as torch's agents do when a member's workers stop. The standbys must then
  get :class:`~etcd_rdzv.StandbyExitError`, the members
  :class:`~etcd_rdzv.RunClosedError`, the closer a clean ``shutdown()``, all within
  :data:`CLOSE_BOUND`.

A violation names its kind and round; the report's :meth:`SoakReport.describe` prints the seed
and the events (joins, admissions, faults, with times since the start) of the offending
round, and the log tails of the nodes involved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from .cluster import EtcdCluster

T = TypeVar("T")

__all__ = [
    "CLOSE_BOUND",
    "CRASH_NOTICE_DELAY",
    "MISSING_RANK_AFTER",
    "POLL_INTERVAL",
    "Burst",
    "EtcdLook",
    "FaultKind",
    "PlannedFault",
    "SoakChecker",
    "SoakConfig",
    "SoakEvent",
    "SoakReport",
    "Violation",
    "liveness_bound",
    "main",
    "plan_bursts",
    "run_soak",
    "soak",
]

#: How often a training node polls ``num_nodes_waiting()``, seconds: torchrun's agent polls
#: once per monitor interval; 0.2 to 0.5 s keeps the soak's rounds short and the pollers
#: out of step.
POLL_INTERVAL = (0.2, 0.5)
#: How long the survivors of a round take to notice a dead member, seconds: torch's
#: collectives fail on a closed connection at once, or on the next step.
CRASH_NOTICE_DELAY = (0.1, 1.0)
#: After this many seconds a round whose ranks are not all held (a member died before it
#: reported its rank) is restarted, as its members' collectives would time out: longer
#: than a live member takes to read its rank after the seal, even across a paused member
#: (``request_timeout``, then the next one) or a leader election.
MISSING_RANK_AFTER = 5.0
#: The settled state must hold this long before the soak calls it final: longer than a
#: node's wake-up (a keep-alive tick) plus an agent's poll, so a node about to ask for a
#: new round has asked.
QUIET_SECONDS = 3.0
#: What an etcd fault may still cost once it ended, seconds: a restarted member rejoins and
#: a leader is elected (etcd's default election timeout is 1 s; a few elections may fail).
ELECTION_SLACK = 5.0
#: A replacement node's process start (Python, grpc, the first connection) on a busy machine.
NODE_START_SLACK = 5.0
#: etcd revokes an expired lease on the leader's next expiry sweep (every 0.5 s), through raft.
LEASE_REVOKE_SLACK = 1.0
#: Rounds the liveness bound allows after the faults: the round that absorbs the last fault
#: and one more, which a standby promoted into a gap (or a node joining late) may need.
LIVENESS_ROUNDS = 2
#: Once the run is closed, every node must have exited within this many seconds: a member
#: is told within a second and sees ``closed`` on its watch; a standby sees it at once.
CLOSE_BOUND = 15.0
#: How long the first round may take to form: every node's process starting at once on a
#: busy machine, then one round.
FIRST_ROUND_BOUND = 60.0
#: At most this many nodes beyond :attr:`SoakConfig.nodes` (extra standbys) live at once.
EXTRA_NODES = 2
#: The addresses nodes use, drawn at random: several nodes share one, so the process id
#: orders them too, and their lexical order differs from their numeric one (``10.0.0.10``
#: before ``10.0.0.2``; ``-`` before ``.``).
ADDRESSES = ("10.0.0.1", "10.0.0.10", "10.0.0.2", "host", "host-b", "host.b")
#: Where the soak's runs keep their keys in etcd (each run has an id of its own).
KEY_PREFIX = "/etcd-rdzv-soak"
#: The most events printed for one violation (the latest ones).
HISTORY_LINES = 400
#: A node's own events shown for a violation that names it (the latest ones).
NODE_EVENT_LINES = 60
#: Lines of a node's log shown for a violation that names it.
LOG_TAIL_LINES = 25

#: A fault the soak injects: a node killed (and replaced), a training node leaving (and
#: replaced), an extra node, the etcd leader killed and restarted, a member paused.
FaultKind = Literal["crash", "leave", "standby", "leader", "pause"]
#: How often each fault is drawn (weights). Pauses most: they are the subtle fault, live
#: nodes losing their leases; crashes next, each a new round; a standby is rarer, since
#: extra nodes stay until a crash or a leave takes one.
FAULT_WEIGHTS: tuple[tuple[FaultKind, float], ...] = (
    ("crash", 3.0), ("leave", 2.0), ("standby", 1.0), ("leader", 1.5), ("pause", 3.5))
_CLUSTER_FAULTS = frozenset({"leader", "pause"})


# --- what happened, and the checker ------------------------------------------------------

@dataclass(frozen=True)
class SoakEvent:
    """One thing that happened in a soak: a node's step, a fault, the driver's action."""

    at: float
    """Seconds since the soak started."""
    kind: str
    """``spawn``, ``hello``, ``joining``, ``admitted``, ``waiting`` (num_nodes_waiting()
    turned positive), ``restart`` (the driver told it a member died), ``crash``, ``leave``,
    ``left``, ``exit`` (next_rendezvous raised), ``died`` (the process ended unasked),
    ``fault`` (an etcd fault), ``missing-rank``, ``close``, ``shutdown``, ``note``."""
    node: str = ""
    """The node's label (``n3``); empty for the cluster's and the driver's events."""
    round: int = 0
    """For ``admitted``: the round (0 otherwise)."""
    rank: int = -1
    """For ``admitted``: the rank."""
    world_size: int = 0
    """For ``admitted``: the world size."""
    node_id: tuple[str, int, int] | None = None
    """For ``hello`` and ``admitted``: the node's descriptor, ``(addr, pid, local_id)``."""
    error: str = ""
    """For ``exit``: the exception's class name."""
    detail: str = ""
    """Free text: the error message, the fault's target, a count."""

    def __str__(self) -> str:
        text = f"{self.at:9.3f}s  {self.kind:<12} {self.node:<5}"
        if self.kind == "admitted":
            text += f" round {self.round} rank {self.rank} of {self.world_size}"
        if self.node_id is not None:
            text += f" {self.node_id[0]}_{self.node_id[1]}_{self.node_id[2]}"
        if self.error:
            text += f" {self.error}"
        if self.detail:
            text += f" {self.detail}"
        return text.rstrip()


@dataclass(frozen=True)
class Violation:
    """An invariant that did not hold."""

    kind: str
    """``rank-twice``, ``order``, ``world-size``, ``rank-range``, ``round-order``,
    ``exception`` (an error escaped next_rendezvous before the close), ``died``,
    ``liveness``, ``close``."""
    message: str
    """What was seen."""
    at: float
    """When it was seen, seconds since the start."""
    round: int = 0
    """The offending round (0: none in particular)."""
    nodes: tuple[str, ...] = ()
    """The nodes involved."""
    window: tuple[float, float] = (0.0, 0.0)
    """The span of the history that shows it, seconds since the start."""

    def __str__(self) -> str:
        where = f" (round {self.round})" if self.round else ""
        return f"[{self.kind}]{where} at {self.at:.3f}s: {self.message}"


@dataclass(frozen=True)
class EtcdLook:
    """What the driver reads of a run's keys in etcd once the run looks settled: its one
    look inside, at what no call of the API shows."""

    join_keys: Mapping[str, tuple[int, ...]]
    """Each node's join keys, by round."""
    unleased: tuple[str, ...] = ()
    """Join keys and waiting markers without a lease (every one should be on its node's)."""


class _Round:
    """What the checker knows of one round."""

    def __init__(self, at: float) -> None:
        self.world_sizes: set[int] = set()
        self.ranks: dict[int, str] = {}
        self.first_at = at
        self.last_at = at


class SoakChecker:
    """The invariants of a soak over its history of :class:`SoakEvent`.

    :meth:`record` each event as it happens; admissions and exits are checked at once.
    :meth:`unsettled` says why the run is not (yet) in its final state, :meth:`check_liveness`
    records that as a violation, :meth:`begin_close` fixes who must exit how,
    :meth:`check_closed` flags the nodes that did not exit. A node is live from ``spawn``
    until ``crash``, ``leave``, ``left``, ``exit``, ``died`` or ``shutdown``.

    Args:
        min_nodes: the run's ``min_nodes``.
        max_nodes: the run's ``max_nodes``.
    """

    def __init__(self, min_nodes: int, max_nodes: int) -> None:
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.history: list[SoakEvent] = []
        self.violations: list[Violation] = []
        self.rounds: dict[int, _Round] = {}
        self._ids: dict[str, tuple[str, int, int]] = {}
        #: starting, joining, training, leaving, gone
        self._status: dict[str, str] = {}
        self._admission: dict[str, SoakEvent] = {}
        self._closing = False
        self._standbys: frozenset[str] = frozenset()
        self.closer: str | None = None

    # --- recording -------------------------------------------------------------------------

    def record(self, event: SoakEvent) -> list[Violation]:
        """Append ``event`` and check it; returns the violations it revealed."""
        self.history.append(event)
        before = len(self.violations)
        node, kind = event.node, event.kind
        if event.node_id is not None:
            self._ids.setdefault(node, event.node_id)
        if kind == "spawn":
            self._status[node] = "starting"
        elif kind in ("joining", "waiting", "restart") and self.live(node):
            self._status[node] = "joining"
        elif kind == "admitted":
            self._admit(event)
            if self.live(node):
                self._status[node] = "training"
        elif kind == "leave":
            self._status[node] = "leaving"
        elif kind in ("crash", "left", "died", "shutdown", "exit"):
            if kind == "exit":
                self._exit(event)
            if kind == "shutdown" and event.detail != "ok":
                self.flag("close", f"{node}'s shutdown() failed: {event.detail}",
                          event.at, nodes=(node,))
            self._status[node] = "gone"
        return self.violations[before:]

    def live(self, node: str) -> bool:
        """Whether ``node`` was spawned and has not gone (nor been asked to leave)."""
        return self._status.get(node) in ("starting", "joining", "training")

    @property
    def live_nodes(self) -> list[str]:
        return sorted((n for n in self._status if self.live(n)), key=_label_order)

    def node_id(self, node: str) -> tuple[str, int, int] | None:
        """``node``'s descriptor, once it said hello."""
        return self._ids.get(node)

    def status(self, node: str) -> str:
        """``starting``, ``joining``, ``training``, ``leaving``, ``gone`` or ``unknown``."""
        return self._status.get(node, "unknown")

    def admission(self, node: str) -> SoakEvent | None:
        """``node``'s latest admission."""
        return self._admission.get(node)

    def training_in(self, round_: int) -> list[str]:
        """The live nodes training in ``round_``."""
        return [n for n in self.live_nodes if self._status[n] == "training"
                and self._admission[n].round == round_]

    @property
    def latest_round(self) -> int:
        return max(self.rounds, default=0)

    # --- the invariants of an admission ----------------------------------------------------

    def _admit(self, event: SoakEvent) -> None:
        node, round_, rank, size = event.node, event.round, event.rank, event.world_size
        previous = self._admission.get(node)
        if previous is not None and round_ <= previous.round:
            self.flag("round-order", f"{node} was admitted to round {round_} after round "
                      f"{previous.round}", event.at, round_, (node,))
        self._admission[node] = event
        record = self.rounds.setdefault(round_, _Round(event.at))
        record.last_at = event.at
        if not self.min_nodes <= size <= self.max_nodes:
            self.flag("world-size", f"{node} got a world of {size}, outside min_nodes="
                      f"{self.min_nodes}..max_nodes={self.max_nodes}", event.at, round_,
                      (node,))
        if record.world_sizes and size not in record.world_sizes:
            self.flag("world-size", f"{node} got a world of {size}, others of "
                      f"{sorted(record.world_sizes)}", event.at, round_,
                      (node, *record.ranks.values()))
        record.world_sizes.add(size)
        if not 0 <= rank < size:
            self.flag("rank-range", f"{node} got rank {rank} in a world of {size}",
                      event.at, round_, (node,))
        holder = record.ranks.get(rank)
        if holder is not None and holder != node:
            self.flag("rank-twice", f"rank {rank} is held by {holder} and by {node}",
                      event.at, round_, (holder, node))
        mine = self._ids.get(node)
        for other_rank, other in sorted(record.ranks.items()):
            theirs = self._ids.get(other)
            if other == node or mine is None or theirs is None or other_rank == rank:
                continue
            # torch sorts _NodeDesc(addr, pid, local_id) as tuples: that is the rank order.
            if (mine < theirs) != (rank < other_rank):
                self.flag("order", f"{node} {_show_id(mine)} has rank {rank} and {other} "
                          f"{_show_id(theirs)} rank {other_rank}: not torch's order of "
                          "node descriptors", event.at, round_, (node, other))
        if holder is None:
            record.ranks[rank] = node

    def _exit(self, event: SoakEvent) -> None:
        node = event.node
        if not self._closing:
            self.flag("exception", f"{event.error} escaped {node}'s rendezvous before the "
                      f"run was closed: {event.detail}", event.at, nodes=(node,))
            return
        expected = "StandbyExitError" if node in self._standbys else "RunClosedError"
        if event.error != expected:
            role = "a standby" if node in self._standbys else "not a standby"
            self.flag("close", f"{node} ({role}) got {event.error or 'no error'} from "
                      f"next_rendezvous after the close, not {expected}: {event.detail}",
                      event.at, nodes=(node,))

    def flag(self, kind: str, message: str, at: float, round_: int = 0,
             nodes: tuple[str, ...] = ()) -> Violation:
        """Record a violation the driver saw (a node's process dying, say)."""
        violation = Violation(kind, message, at, round_, nodes, self._window(round_, at))
        self.violations.append(violation)
        return violation

    def _window(self, round_: int, at: float) -> tuple[float, float]:
        """From the previous round's first admission to the end of ``round_`` (or ``at``);
        without a round, the 30 s before ``at``."""
        if round_ and round_ in self.rounds:
            earlier = [r for r in self.rounds if r < round_]
            start = self.rounds[max(earlier)].first_at if earlier else 0.0
            return start, max(at, self.rounds[round_].last_at)
        return max(0.0, at - 30.0), at

    # --- liveness and the end --------------------------------------------------------------

    def unsettled(self, look: EtcdLook | None = None) -> list[str]:
        """Why the run is not in a final state (empty when it is): every live node a member
        of one latest round, its ranks ``0..W-1``; any other live node waiting, as a
        standby of a full round.

        With ``look``, the run's keys in etcd: a waiting node must hold a join key past the
        final round, or no member can ever count it (``num_nodes_waiting()``) and it waits
        for nothing; a member whose join key is gone (its lease lapsed while it trained)
        leaves room in a full round, which a waiting node must then be admitted to; and no
        join key or waiting marker may be without a lease, or nothing ever deletes it.
        """
        live = self.live_nodes
        if not live:
            return ["no node is live"]
        problems = [f"{n} has not joined yet" for n in live if self._status[n] == "starting"]
        training = [n for n in live if self._status[n] == "training"]
        if not training:
            return [*problems, "no live node is training"]
        final = max(self._admission[n].round for n in training)
        members = [n for n in training if self._admission[n].round == final]
        size = self._admission[members[0]].world_size
        problems += [f"{n} still trains in round {self._admission[n].round} while round "
                     f"{final} is the latest" for n in training if n not in members]
        ranks = sorted(self._admission[n].rank for n in members)
        if ranks != list(range(size)):
            problems.append(f"round {final}'s live members hold ranks {ranks} of a world of "
                            f"{size}")
        waiting = [n for n in live if self._status[n] == "joining"]
        if size < self.max_nodes:
            problems += [f"{n} waits while round {final} has room ({size} < max_nodes="
                         f"{self.max_nodes})" for n in waiting]
        if look is not None:
            held = look.join_keys
            problems += [f"{n} waits with no join key in etcd past round {final} (it holds "
                         f"{_rounds(held.get(n, ()))}): no member can count it"
                         for n in waiting if not any(r > final for r in held.get(n, ()))]
            gone = [m for m in members if final not in held.get(m, ())]
            if waiting and gone and size >= self.max_nodes:
                problems += [f"{n} waits while round {final} has room: {', '.join(gone)} "
                             f"{'holds' if len(gone) == 1 else 'hold'} no join key in it"
                             for n in waiting]
            problems += [f"{key} has no lease in etcd: nothing ever deletes it"
                         for key in look.unleased]
        return problems

    def standbys(self) -> list[str]:
        """The live nodes waiting beside a full final round."""
        training = [n for n in self.live_nodes if self._status[n] == "training"]
        if not training:
            return []
        final = max(self._admission[n].round for n in training)
        sizes = self.rounds[final].world_sizes
        if max(sizes, default=0) < self.max_nodes:
            return []
        return [n for n in self.live_nodes if self._status[n] == "joining"]

    def check_liveness(self, at: float, bound: float, since: str = "the faults stopped",
                       look: EtcdLook | None = None) -> list[Violation]:
        """Record the run's not having settled within ``bound`` seconds of ``since`` as a
        violation (``look`` as for :meth:`unsettled`)."""
        problems = self.unsettled(look)
        if not problems:
            return []
        round_ = self.latest_round
        stuck = tuple(n for n in self.live_nodes
                      if n not in self.training_in(round_))
        violation = Violation("liveness", f"not settled {bound:.0f} s after {since}: "
                              + "; ".join(problems), at, round_, stuck,
                              (self._window(round_, at)[0], at))
        self.violations.append(violation)
        return [violation]

    def begin_close(self, at: float, closer: str) -> SoakEvent:
        """The driver closes the run through ``closer``: the current standbys must get
        StandbyExitError, every other live node RunClosedError."""
        self._closing = True
        self._standbys = frozenset(self.standbys())
        self.closer = closer
        event = SoakEvent(at, "close", closer,
                          detail=f"standbys: {', '.join(sorted(self._standbys)) or 'none'}")
        self.record(event)
        return event

    def check_closed(self, at: float) -> list[Violation]:
        """The nodes still live once every node should have exited."""
        found = [self.flag("close", f"{n} ({self._status[n]}) did not exit after the "
                           "run was closed", at, nodes=(n,)) for n in self.live_nodes]
        return found

    # --- presenting ------------------------------------------------------------------------

    def events_between(self, start: float, end: float) -> list[SoakEvent]:
        return [e for e in self.history if start <= e.at <= end]

    def counts(self) -> tuple[int, int]:
        """Rounds with an admission, and admissions."""
        return len(self.rounds), sum(e.kind == "admitted" for e in self.history)


def _node_name(node_id: tuple[str, int, int]) -> bytes:
    """The node's name in its join keys."""
    from etcd_rdzv import NodeId

    return NodeId(*node_id).name


def _show_id(node_id: tuple[str, int, int]) -> str:
    return f"{node_id[0]}_{node_id[1]}_{node_id[2]}"


def _rounds(rounds: Iterable[int]) -> str:
    shown = sorted(rounds)
    return "keys of rounds " + ", ".join(map(str, shown)) if shown else "none"


def _label_order(label: str) -> tuple[int, str]:
    digits = label.lstrip("n")
    return (int(digits), label) if digits.isdigit() else (-1, label)


# --- configuration and report -----------------------------------------------------------------

@dataclass(frozen=True)
class SoakConfig:
    """One soak's shape. :meth:`for_seed` draws the per-seed parts."""

    seconds: float
    """How long faults are injected."""
    seed: int
    """Seeds the settings drawn here and every fault draw."""
    nodes: int = 7
    """Nodes kept alive: one more than ``max_nodes``, so that a standby always waits."""
    min_nodes: int = 3
    """Low, so rounds form in spite of the crashes; drawn 3 or 4 by :meth:`for_seed`."""
    max_nodes: int = 6
    """Below ``nodes``, so rounds fill and nodes stand by."""
    keep_alive_interval: float = 0.5
    """Short, so a member paused for a few seconds outlasts a node's lease."""
    keep_alive_max_attempt: int = 4
    """With the interval, a node's lease TTL: ``ceil(0.5 * 3) = ceil(0.5 * 4) = 2`` s."""
    last_call_timeout: float = 0.75
    """Short, so rounds form within the bursts; drawn 0.5 to 1 s by :meth:`for_seed`."""
    join_timeout: float = 60.0
    """Long enough not to fire under the faults, short enough that a stuck node fails."""
    heartbeat_timeout: float = 1.0
    """The deadline of one keep-alive, twice the interval."""
    close_timeout: float = 10.0
    """How long closing the run may take (torch's default is 30 s; etcd is healthy then)."""
    ttl: int = 120
    """The run lease's TTL: longer than any etcd fault, so the run's keys outlive them."""
    read_timeout: float = 30.0
    """A node's deadline for one etcd operation, retries included."""
    request_timeout: float = 3.0
    """One attempt's deadline: a waiting node on a paused member moves to the next member
    after this long, longer than its lease's TTL, so that a long pause expires the leases
    of waiting nodes too, not only of training ones (which send no request to move on)."""
    pause_seconds: tuple[float, float] = (0.5, 3.0)
    """How long a paused member stays paused."""
    leader_down_seconds: tuple[float, float] = (0.5, 3.0)
    """How long a killed leader stays dead before it is restarted."""
    fault_gap: tuple[float, float] = (0.5, 2.5)
    """Seconds between two faults' starts."""
    burst_seconds: tuple[float, float] = (10.0, 20.0)
    """Faults come in bursts this long, each followed by a heal: no fault until the run
    has settled (within :func:`liveness_bound`). A state the faults left stuck then shows
    where it arose, instead of being undone by the next fault (a replacement node joining,
    say) and never seen."""
    etcd_only_bursts: float = 0.35
    """The share of bursts with etcd faults only (leader kills, pauses) and no node fault:
    nodes that lost their leases to a pause are then left to recover by themselves, as
    when etcd has trouble and the job does not."""

    def __post_init__(self) -> None:
        if self.nodes < self.min_nodes or self.max_nodes < self.min_nodes:
            raise ValueError(f"A soak needs nodes >= min_nodes <= max_nodes, got nodes="
                             f"{self.nodes}, min_nodes={self.min_nodes}, max_nodes="
                             f"{self.max_nodes}.")

    @classmethod
    def for_seed(cls, seconds: float, seed: int, **overrides: Any) -> SoakConfig:
        """The soak's default shape, with ``min_nodes`` (3 or 4), ``keep_alive_max_attempt``
        (3 or 4) and ``last_call_timeout`` (0.5 to 1 s) drawn from ``seed``."""
        draw = random.Random(f"soak-config-{seed}")
        drawn: dict[str, Any] = {
            "min_nodes": draw.choice((3, 4)),
            "keep_alive_max_attempt": draw.choice((3, 4)),
            "last_call_timeout": round(draw.uniform(0.5, 1.0), 2),
        }
        return cls(seconds=seconds, seed=seed, **{**drawn, **overrides})

    @property
    def node_ttl(self) -> int:
        """A node's lease TTL, as the rendezvous computes it (whole seconds, at least 1)."""
        return max(1, math.ceil(self.keep_alive_interval * self.keep_alive_max_attempt))

    def settings(self) -> dict[str, float]:
        """The :class:`~etcd_rdzv.NativeSettings` arguments."""
        return {"min_nodes": self.min_nodes, "max_nodes": self.max_nodes,
                "join_timeout": self.join_timeout, "last_call_timeout": self.last_call_timeout,
                "close_timeout": self.close_timeout, "heartbeat_timeout": self.heartbeat_timeout,
                "keep_alive_interval": self.keep_alive_interval,
                "keep_alive_max_attempt": self.keep_alive_max_attempt, "ttl": self.ttl}


@dataclass(frozen=True)
class PlannedFault:
    """One fault of the plan a seed draws (:func:`plan_bursts`)."""

    after: float
    """Seconds after the previous fault of the burst (or its start)."""
    kind: FaultKind
    """What happens."""
    target: float
    """Which node a crash or a leave hits: this fraction into the eligible nodes, in the
    order of their labels, when it strikes."""
    seconds: float
    """How long a paused member stays paused, or a killed leader dead."""
    member: int
    """The member a pause hits (a leader kill hits whichever member leads then)."""


@dataclass(frozen=True)
class Burst:
    """Faults in a row, then a heal."""

    seconds: float
    """How long the burst lasts, nominally (a fault may wait for the etcd fault before it)."""
    etcd_only: bool
    """Whether it has etcd faults only."""
    faults: tuple[PlannedFault, ...]
    """The faults, in order."""


def plan_bursts(config: SoakConfig, members: int = 3) -> tuple[Burst, ...]:
    """Every fault of a soak, drawn from ``config.seed`` alone, before it starts: the same
    seed makes the same faults in the same order, whatever the timing."""
    draw = random.Random(config.seed)
    bursts: list[Burst] = []
    left = config.seconds
    while left > 0:
        seconds = draw.uniform(*config.burst_seconds)
        if left - seconds < config.burst_seconds[0]:
            seconds = left  # the last burst takes what is left rather than leave a stub
        left -= seconds
        etcd_only = draw.random() < config.etcd_only_bursts
        allowed = [(kind, weight) for kind, weight in FAULT_WEIGHTS
                   if kind in _CLUSTER_FAULTS or not etcd_only]
        kinds, weights = [kind for kind, _ in allowed], [weight for _, weight in allowed]
        faults: list[PlannedFault] = []
        elapsed = draw.uniform(*config.fault_gap)
        gap = elapsed
        while elapsed <= seconds:
            kind = draw.choices(kinds, weights)[0]
            span = config.pause_seconds if kind == "pause" else config.leader_down_seconds
            faults.append(PlannedFault(gap, kind, draw.random(), draw.uniform(*span),
                                       draw.randrange(members)))
            gap = draw.uniform(*config.fault_gap)
            elapsed += gap
        bursts.append(Burst(seconds, etcd_only, tuple(faults)))
    return tuple(bursts)


def liveness_bound(config: SoakConfig) -> float:
    """Seconds from the end of the faults until the run must have settled.

    The last fault may leave: an etcd member just restarted, a leader being elected
    (:data:`ELECTION_SLACK`); a replacement node starting (:data:`NODE_START_SLACK`); a dead
    member's rank unheld (:data:`MISSING_RANK_AFTER`). Then each of :data:`LIVENESS_ROUNDS`
    rounds takes at most: the dead member's lease running out (``node_ttl``, plus
    :data:`LEASE_REVOKE_SLACK` for etcd's expiry sweep), the survivors told
    (:data:`CRASH_NOTICE_DELAY`) or polling (:data:`POLL_INTERVAL`), the last call
    (``last_call_timeout``) and two keep-alive ticks, at which a waiting node looks again.
    The settled state must then hold :data:`QUIET_SECONDS`. With the default shape: about
    31 s, half of ``join_timeout``, so a node that cannot rejoin shows as stuck here before
    its own timeout fires.
    """
    per_round = (config.node_ttl + LEASE_REVOKE_SLACK + CRASH_NOTICE_DELAY[1]
                 + POLL_INTERVAL[1] + config.last_call_timeout + 2 * config.keep_alive_interval)
    return (ELECTION_SLACK + NODE_START_SLACK + MISSING_RANK_AFTER
            + LIVENESS_ROUNDS * per_round + QUIET_SECONDS)


@dataclass(frozen=True)
class SoakReport:
    """What a soak did and found."""

    config: SoakConfig
    """The soak's shape (its seed, settings and durations)."""
    faults: Mapping[FaultKind, int]
    """Faults injected, by kind."""
    rounds_sealed: int
    """Rounds some node was admitted to."""
    admissions: int
    """``next_rendezvous`` calls that returned."""
    violations: tuple[Violation, ...]
    """Every invariant that did not hold, in the order seen."""
    heals: int
    """Bursts of faults the run healed from (settled after)."""
    settled_after: float | None
    """The slowest heal: seconds from the end of a burst to the settled state that then
    held (None: some heal did not settle within the bound)."""
    elapsed: float
    """Wall-clock seconds of the whole soak, etcd's start to its stop."""
    details: str = ""
    """For each violation, the history of its round and the logs of the nodes involved."""

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def seconds(self) -> float:
        return self.config.seconds

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        faults = ", ".join(f"{kind} {count}" for kind, count in sorted(self.faults.items()))
        settled = "never" if self.settled_after is None else f"{self.settled_after:.1f} s"
        settled = f"healed {self.heals} time(s), the slowest after {settled}"
        config = self.config
        return (f"native soak seed={config.seed}: {config.seconds:g} s of faults "
                f"({sum(self.faults.values())}: {faults or 'none'}), {self.rounds_sealed} "
                f"rounds sealed, {self.admissions} admissions, {settled}, "
                f"{len(self.violations)} violation(s); {self.elapsed:.0f} s in all "
                f"[min_nodes={config.min_nodes} max_nodes={config.max_nodes} "
                f"nodes={config.nodes} keep_alive_max_attempt={config.keep_alive_max_attempt} "
                f"last_call_timeout={config.last_call_timeout:g}]")

    def describe(self) -> str:
        """The summary, and for a failed soak the seed, each violation and its history."""
        if self.ok:
            return self.summary()
        lines = [self.summary(), f"FAILED with seed {self.seed} (rerun: python -m "
                 f"etcd_rdzv.testing.soak --seconds {self.seconds:g} --seed {self.seed})",
                 *(f"  {v}" for v in self.violations), self.details]
        return "\n".join(lines)


# --- the node process ------------------------------------------------------------------------

class _RelativeTime(logging.Filter):
    """Stamps log records with seconds since the soak's start, the history's clock."""

    def __init__(self, started: float) -> None:
        super().__init__()
        self._started = started

    def filter(self, record: logging.LogRecord) -> bool:
        record.since_start = record.created - self._started
        return True


def _emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": kind, **fields}) + "\n")
    sys.stdout.flush()


def _read_commands(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str]) -> None:
    """The driver's commands, one a line; ``eof`` when the driver is gone."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.strip())
    loop.call_soon_threadsafe(queue.put_nowait, "eof")


async def _run_node(spec: Mapping[str, Any]) -> int:
    """One node, driven as torch's agent drives a handler; see the module docstring."""
    from etcd_rdzv import (
        AsyncNativeRendezvous,
        Endpoint,
        EtcdClient,
        EtcdConfig,
        NativeSettings,
        NodeId,
        RunKeys,
    )

    endpoints = tuple(Endpoint(host, int(port)) for host, port in
                      (text.rsplit(":", 1) for text in spec["endpoints"]))
    config = EtcdConfig(endpoints=endpoints, read_timeout=spec["read_timeout"],
                        request_timeout=spec["request_timeout"], connect_timeout=5.0)
    node = NodeId(spec["addr"], os.getpid(), 0)
    rng = random.Random(spec["seed"])
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    threading.Thread(target=_read_commands, args=(loop, commands), daemon=True).start()
    client = EtcdClient(config)
    rdzv = AsyncNativeRendezvous(client, RunKeys(spec["run_id"], spec["key_prefix"]),
                                 NativeSettings(**spec["settings"]), node)
    _emit("hello", node_id=[node.addr, node.pid, node.local_id])

    async def obey(command: str, joining: asyncio.Task[Any] | None) -> bool:
        """Act on a leave, shutdown or eof; True when the node is done."""
        if command == "eof":
            os._exit(0)  # the driver is gone: vanish as a crash would
        if command not in ("leave", "shutdown"):
            return False
        if joining is not None:
            joining.cancel()
            await asyncio.gather(joining, return_exceptions=True)
        if command == "leave":
            await rdzv.leave()
            _emit("left")
        else:
            _emit("shutdown", ok=await rdzv.shutdown())
        return True

    while True:
        _emit("joining")
        joining = asyncio.ensure_future(rdzv.next_rendezvous())
        while not joining.done():
            next_command = asyncio.ensure_future(commands.get())
            await asyncio.wait({joining, next_command}, return_when=asyncio.FIRST_COMPLETED)
            if not next_command.done():
                next_command.cancel()
            elif await obey(next_command.result(), None if joining.done() else joining):
                return 0
        try:
            admission = joining.result()
        except Exception as exc:
            _emit("exit", error=type(exc).__name__, message=str(exc))
            return 0
        _emit("admitted", round=admission.round, rank=admission.rank,
              world_size=admission.world_size, node_id=[node.addr, node.pid, node.local_id])
        while True:  # training
            try:
                command = await asyncio.wait_for(commands.get(), rng.uniform(*POLL_INTERVAL))
            except asyncio.TimeoutError:
                try:
                    waiting = await rdzv.num_nodes_waiting()
                except Exception as exc:
                    _emit("exit", error=type(exc).__name__,
                          message=f"num_nodes_waiting() raised: {exc}")
                    return 0
                if waiting > 0:
                    _emit("waiting", count=waiting)
                    break
                continue
            if command == "restart":
                break
            if await obey(command, None):
                return 0


def _node_main(spec_text: str) -> int:
    spec = json.loads(spec_text)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RelativeTime(float(spec["started"])))
    handler.setFormatter(logging.Formatter(
        f"%(since_start)9.3fs {spec['label']} %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("etcd_rdzv").setLevel(logging.DEBUG)
    return asyncio.run(_run_node(spec))


# --- the driver ---------------------------------------------------------------------------------

class _Node:
    """The driver's handle on one node process."""

    def __init__(self, label: str, member: int, log_path: Path) -> None:
        self.label = label
        self.member = member
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.killed = False
        self.reader: asyncio.Task[None] | None = None

    def send(self, command: str) -> None:
        process = self.process
        if process is None or process.stdin is None or process.returncode is not None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            process.stdin.write(command.encode() + b"\n")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The log's last ``lines`` lines, runs of lines alike but for their numbers (a
        waiting node's ticks) shown once, with their count."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        kept: list[tuple[str, str, int]] = []  # (line, its shape, how many alike)
        for line in text.splitlines():
            shape = re.sub(r"[0-9a-f]*[0-9][0-9a-f.]*", "#", line)
            if kept and kept[-1][1] == shape:
                kept[-1] = (line, shape, kept[-1][2] + 1)
            else:
                kept.append((line, shape, 1))
        return "\n".join(line if alike == 1 else f"{line}  [and {alike - 1} lines alike before]"
                         for line, _, alike in kept[-lines:])


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")  # handed to the child process, closed right after


class _Driver:
    def __init__(self, config: SoakConfig, cluster: EtcdCluster, workdir: Path,
                 progress: Callable[[str], None] | None) -> None:
        self.config = config
        self.cluster = cluster
        self.workdir = workdir
        self.progress = progress
        #: The nodes: the member each prefers, its address, its poll's seed (spawns happen
        #: when the timing says, so they must not shift the fault draws).
        self.nodes_rng = random.Random(f"soak-nodes-{config.seed}")
        #: Delays only, drawn as the timing says, for the same reason.
        self.jitter = random.Random(f"soak-jitter-{config.seed}")
        self.checker = SoakChecker(config.min_nodes, config.max_nodes)
        self.nodes: dict[str, _Node] = {}
        self.faults: Counter[FaultKind] = Counter()
        self.started = time.monotonic()
        self.wall_started = time.time()
        self.run_id = f"soak-{config.seed}-{uuid.uuid4().hex[:6]}"
        self.tasks: set[asyncio.Future[Any]] = set()
        self.restarted_for_missing: set[int] = set()
        self.closing = False
        #: The run's keys in etcd when the run did not settle, for the report.
        self.etcd_keys = ""
        #: The cluster calls running in threads (kills, restarts).
        self.threads: set[asyncio.Future[Any]] = set()
        #: Set (and replaced) on every event.
        self.changed = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self.started

    def record(self, event: SoakEvent) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
        for violation in self.checker.record(event):
            if self.progress is not None:
                self.progress(f"VIOLATION {violation}")
        if self.progress is not None:
            self.progress(str(event))

    async def wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait, event by event, until ``done()`` or the ``deadline`` (soak seconds)."""
        while not done():
            remaining = deadline - self.now()
            if remaining <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True

    def note(self, kind: str, node: str = "", detail: str = "") -> None:
        self.record(SoakEvent(self.now(), kind, node, detail=detail))

    def background(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coroutine`` as a task that :meth:`run` cancels and awaits at the end."""
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- nodes --------------------------------------------------------------------------------

    async def spawn(self) -> _Node:
        label = f"n{len(self.nodes)}"
        members = len(self.cluster.members)
        member = self.nodes_rng.randrange(members)
        node = _Node(label, member, self.workdir / f"{label}.log")
        self.nodes[label] = node
        endpoints = [self.cluster.members[(member + i) % members].endpoint
                     for i in range(members)]
        spec = {"label": label, "endpoints": endpoints, "run_id": self.run_id,
                "key_prefix": KEY_PREFIX, "settings": self.config.settings(),
                "read_timeout": self.config.read_timeout,
                "request_timeout": self.config.request_timeout,
                "addr": self.nodes_rng.choice(ADDRESSES),
                "seed": self.nodes_rng.randrange(2**32),
                "started": self.wall_started}
        self.note("spawn", label, f"prefers etcd member {member}")
        log = _open_log(node.log_path)
        try:
            node.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "etcd_rdzv.testing.soak", "--node", json.dumps(spec),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            log.close()
        node.reader = asyncio.ensure_future(self.read(node))
        return node

    async def read(self, node: _Node) -> None:
        process = node.process
        assert process is not None and process.stdout is not None
        async for raw in process.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue  # not ours (a library printing): the protocol is JSON lines
            self.on_message(node, message)
        code = await process.wait()
        label = node.label
        if self.checker.live(label) or self.checker.status(label) == "leaving":
            if node.killed:
                return
            round_ = self.round_of(label)
            self.record(SoakEvent(self.now(), "died", label, detail=f"exit code {code}"))
            self.checker.flag("died", f"{label}'s process ended without a word (exit code "
                              f"{code})", self.now(), nodes=(label,))
            if round_:
                self.member_gone(label, round_)
            self.replace_if_needed()

    def on_message(self, node: _Node, message: Mapping[str, Any]) -> None:
        kind, label, now = str(message.get("event")), node.label, self.now()
        node_id = message.get("node_id")
        ident = (str(node_id[0]), int(node_id[1]), int(node_id[2])) if node_id else None
        if kind == "admitted":
            self.record(SoakEvent(now, kind, label, int(message["round"]),
                                  int(message["rank"]), int(message["world_size"]), ident))
        elif kind == "exit":
            self.record(SoakEvent(now, kind, label, error=str(message["error"]),
                                  detail=str(message["message"])))
            if not self.closing:
                self.replace_if_needed()
        elif kind == "shutdown":
            self.record(SoakEvent(now, kind, label,
                                  detail="ok" if message.get("ok") else "returned False"))
        elif kind == "left":
            round_ = self.round_of(label)
            self.record(SoakEvent(now, kind, label))
            if round_:
                self.member_gone(label, round_)
        else:
            # A member that leaves its round to rendezvous again stops its workers: the
            # collectives of the round's other members fail, and their agents follow.
            round_ = self.round_of(label) if kind in ("waiting", "joining") else 0
            detail = f"{message.get('count')} waiting" if kind == "waiting" else ""
            self.record(SoakEvent(now, kind, label, node_id=ident, detail=detail))
            if round_:
                self.member_gone(label, round_, "rendezvouses again")

    def round_of(self, label: str) -> int:
        """The round ``label`` trains in (0: it is not training)."""
        admission = self.checker.admission(label)
        training = self.checker.status(label) in ("training", "leaving")
        return admission.round if admission is not None and training else 0

    def population(self) -> int:
        return len(self.checker.live_nodes)

    def replace_if_needed(self) -> None:
        if self.population() < self.config.nodes and not self.closing:
            self.background(self.spawn())

    def member_gone(self, label: str, round_: int, what: str = "is gone") -> None:
        """A member of ``round_`` died, left or restarted: its peers' collectives fail."""
        for other in self.checker.training_in(round_):
            if other != label:
                self.background(self.tell_restart(other, round_, f"{label} of round "
                                                  f"{round_} {what}"))

    async def tell_restart(self, label: str, round_: int, why: str) -> None:
        await asyncio.sleep(self.jitter.uniform(*CRASH_NOTICE_DELAY))
        if self.checker.status(label) == "training" and self.round_of(label) == round_:
            self.nodes[label].send("restart")
            self.record(SoakEvent(self.now(), "restart", label, detail=why))

    async def watch_missing_ranks(self) -> None:
        """A round whose ranks are not all held after MISSING_RANK_AFTER is restarted."""
        while True:
            await asyncio.sleep(0.5)
            round_ = self.checker.latest_round
            record = self.checker.rounds.get(round_)
            if record is None or round_ in self.restarted_for_missing:
                continue
            size = max(record.world_sizes)
            if len(record.ranks) < size and \
                    self.now() - record.first_at > MISSING_RANK_AFTER:
                self.restarted_for_missing.add(round_)
                missing = sorted(set(range(size)) - set(record.ranks))
                self.record(SoakEvent(self.now(), "missing-rank", "", round_, detail=f"ranks "
                                      f"{missing} of round {round_} never reported"))
                for member in self.checker.training_in(round_):
                    self.background(self.tell_restart(member, round_,
                                                      f"ranks {missing} never came"))

    def crash(self, label: str) -> None:
        node = self.nodes[label]
        round_ = self.round_of(label)
        node.killed = True
        if node.process is not None and node.process.returncode is None:
            node.process.send_signal(signal.SIGKILL)
        self.record(SoakEvent(self.now(), "crash", label,
                              detail=f"SIGKILL while {self.checker.status(label)}"
                              + (f" in round {round_}" if round_ else "")))
        if round_:
            self.member_gone(label, round_)

    # --- faults -------------------------------------------------------------------------------

    async def inject_faults(self, burst: Burst) -> None:
        """The faults of ``burst``, each when its gap says; see the module's policy."""
        cluster_fault: asyncio.Future[None] | None = None
        for fault in burst.faults:
            await asyncio.sleep(fault.after)
            kind = fault.kind
            if kind in _CLUSTER_FAULTS:
                if cluster_fault is not None:
                    await cluster_fault  # one etcd fault at a time: the cluster keeps quorum
                cluster_fault = self.background(
                    self.cluster_fault(kind, fault.member, fault.seconds))
                continue
            if kind == "standby":
                if self.population() < self.config.nodes + EXTRA_NODES:
                    self.faults[kind] += 1
                    self.note("fault", detail="an extra node (a standby)")
                    await self.spawn()
                continue
            live = [n for n in self.checker.live_nodes if self.checker.status(n) != "starting"]
            if kind == "leave":
                live = [n for n in live if self.checker.status(n) == "training"]
            if not live:
                continue
            target = live[int(fault.target * len(live))]
            self.faults[kind] += 1
            if kind == "crash":
                self.crash(target)
            else:
                self.record(SoakEvent(self.now(), "leave", target, detail=f"leave() in round "
                                      f"{self.round_of(target)}"))
                self.nodes[target].send("leave")
            if self.population() < self.config.nodes:
                await self.spawn()
        if cluster_fault is not None:
            await cluster_fault

    async def cluster_fault(self, kind: FaultKind, member: int, seconds: float) -> None:
        """Pause ``member``, or kill the leader, for ``seconds``."""
        self.faults[kind] += 1
        if kind == "pause":
            self.cluster.pause(member)
            self.note("fault", detail=f"pause etcd member {member} for {seconds:.2f} s")
            try:
                await asyncio.sleep(seconds)
            finally:
                self.cluster.resume(member)
                self.note("fault", detail=f"resumed etcd member {member}")
            return
        leader = await self.blocking(self.cluster.leader_index)
        await self.blocking(self.cluster.kill, leader)
        self.note("fault", detail=f"kill etcd leader (member {leader}) for {seconds:.2f} s")
        await asyncio.sleep(seconds)
        await self.blocking(self.cluster.restart, leader)
        self.note("fault", detail=f"restarted etcd member {leader}")

    async def blocking(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a thread, which :meth:`run` awaits even when this task is
        cancelled: a restart left running would start a member after the cluster stopped."""
        thread = asyncio.ensure_future(asyncio.to_thread(call, *args))
        self.threads.add(thread)
        return await asyncio.shield(thread)

    # --- phases -------------------------------------------------------------------------------

    async def settle(self, bound: float, since: str) -> float | None:
        """Wait until the run has settled and stayed so QUIET_SECONDS; the seconds it took,
        or None after ``bound`` seconds (recorded as a liveness violation)."""
        began = self.now()
        quiet_since: float | None = None
        said = ""
        while True:
            now = self.now()
            if self.checker.unsettled():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= QUIET_SECONDS:
                invisible = self.checker.unsettled(await self.look())
                if not invisible:
                    return quiet_since - began
                if "; ".join(invisible) != said:
                    said = "; ".join(invisible)
                    self.note("note", detail=said)
                quiet_since = None
            if now - began > bound:
                self.checker.check_liveness(now, bound, since, await self.look())
                self.etcd_keys = await self.dump_keys()
                return None
            await asyncio.sleep(0.1)

    async def dump_keys(self) -> str:
        """The run's native keys as etcd holds them, with their leases: for the report."""
        from etcd_rdzv import Deadline, EtcdClient, RunKeys

        keys = RunKeys(self.run_id, KEY_PREFIX)
        try:
            async with EtcdClient(self.cluster.client_config(read_timeout=10)) as client:
                response = await client.get_prefix(keys.native_prefix, Deadline.after(10))
        except Exception as exc:
            return f"(etcd did not answer: {exc})"
        start = len(keys.native_prefix)
        return "\n".join(
            f"  {bytes(kv.key)[start:].decode(errors='replace')}  lease "
            f"{f'{kv.lease:x}' if kv.lease else 'none'}  {bytes(kv.value)[:80]!r}"
            for kv in response.kvs)

    async def look(self) -> EtcdLook:
        """The run's join keys and waiting markers in etcd (read by the driver)."""
        from etcd_rdzv import Deadline, EtcdClient, RunKeys

        keys = RunKeys(self.run_id, KEY_PREFIX)
        labels: dict[bytes, str] = {}
        for label in self.checker.live_nodes:
            ident = self.checker.node_id(label)
            if ident is not None:
                labels[_node_name(ident)] = label
        found: dict[str, list[int]] = {}
        unleased: list[str] = []
        async with EtcdClient(self.cluster.client_config(read_timeout=10)) as client:
            response = await client.get_prefix(keys.native_prefix, Deadline.after(10))
        for kv in response.kvs:
            key = bytes(kv.key)
            parsed = keys.parse_native(key)
            if parsed is None or parsed.kind not in ("member", "waiting"):
                continue
            if not kv.lease:
                unleased.append(key[len(keys.native_prefix):].decode(errors="replace"))
            if parsed.kind == "member" and parsed.node_name in labels:
                found.setdefault(labels[parsed.node_name], []).append(parsed.round)
        return EtcdLook({label: tuple(rounds) for label, rounds in found.items()},
                        tuple(unleased))

    async def close(self) -> None:
        """Close the run through the final round's rank 0; the others learn of it."""
        self.closing = True
        live = self.checker.live_nodes
        ranked = sorted((admission.round, -admission.rank, label) for label in live
                        if self.checker.status(label) == "training"
                        and (admission := self.checker.admission(label)) is not None)
        final = ranked[-1][0] if ranked else 0
        members = [label for round_, _, label in reversed(ranked) if round_ == final]
        if not members and not live:
            return
        closer = members[0] if members else live[0]
        self.etcd_keys = self.etcd_keys or await self.dump_keys()
        self.checker.begin_close(self.now(), closer)
        self.nodes[closer].send("shutdown")
        deadline = self.now() + CLOSE_BOUND
        await self.wait_until(lambda: not self.checker.live(closer), deadline)
        for member in members[1:]:
            self.background(self.tell_restart(member, final, f"{closer} shut the run down"))
        for label in live:
            if label not in members and self.checker.status(label) == "training":
                self.nodes[label].send("restart")  # an older round's member: it rejoins too
        await self.wait_until(lambda: not self.checker.live_nodes, deadline)
        self.checker.check_closed(self.now())

    async def run(self) -> SoakReport:
        config = self.config
        watchdog = asyncio.ensure_future(self.watch_missing_ranks())
        settled: list[float] = []
        healed = True
        try:
            for _ in range(config.nodes):
                await self.spawn()
            self.note("note", detail="waiting for the first round")
            healed = await self.settle(FIRST_ROUND_BOUND, "the start") is not None
            for burst in plan_bursts(config, len(self.cluster.members)) if healed else ():
                self.note("note", detail=f"a burst of {len(burst.faults)} "
                          f"{'etcd ' if burst.etcd_only else ''}faults over {burst.seconds:.1f} s")
                await self.inject_faults(burst)
                self.note("note", detail="faults stopped")
                took = await self.settle(liveness_bound(config), "the faults stopped")
                healed = took is not None
                if took is not None:
                    settled.append(took)
                self.note("note", detail=f"settled after {took:.1f} s" if took is not None
                          else "did not settle")
                if not healed:
                    break
            await self.close()
        finally:
            tasks = [watchdog, *self.tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.stop_nodes()
            await asyncio.gather(*self.threads, return_exceptions=True)
        rounds, admissions = self.checker.counts()
        return SoakReport(config, dict(self.faults), rounds, admissions,
                          tuple(self.checker.violations), len(settled),
                          max(settled, default=0.0) if healed else None, 0.0, self.details())

    async def stop_nodes(self) -> None:
        for node in self.nodes.values():
            process = node.process
            if process is not None and process.returncode is None:
                node.killed = True
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)
        for node in self.nodes.values():
            if node.process is not None:
                await node.process.wait()
            if node.reader is not None:
                await asyncio.gather(node.reader, return_exceptions=True)

    def details(self) -> str:
        """Each violation's history and the log tails of its nodes."""
        parts: list[str] = []
        if self.etcd_keys:
            parts += [f"the run's native keys in etcd when it did not settle, or else when "
                      f"it was closed ({KEY_PREFIX}/{self.run_id}/native/...):",
                      self.etcd_keys]
        shown: set[str] = set()
        for violation in self.checker.violations:
            start, end = violation.window
            events = self.checker.events_between(start, end)
            left_out = max(0, len(events) - HISTORY_LINES)
            parts.append(f"--- {violation}\nhistory {start:.3f}s..{end:.3f}s"
                         + (f" ({left_out} earlier events left out)" if left_out else "")
                         + ":")
            parts += [f"  {event}" for event in events[left_out:]]
            for label in violation.nodes:
                if label in shown:
                    parts.append(f"{label}'s events and log: above")
                    continue
                shown.add(label)
                own = [e for e in self.checker.history if e.node == label]
                parts.append(f"{label}'s own events ({len(own)}, the last "
                             f"{min(len(own), NODE_EVENT_LINES)}):")
                parts += [f"  {event}" for event in own[-NODE_EVENT_LINES:]]
                if label in self.nodes:
                    parts.append(f"log of {label} ({self.nodes[label].log_path}), last lines:")
                    parts.append(self.nodes[label].log_tail())
        return "\n".join(parts)


async def soak(config: SoakConfig, *, progress: Callable[[str], None] | None = None,
               workdir: str | os.PathLike[str] | None = None) -> SoakReport:
    """Run one soak on the running event loop: a fresh 3-member etcd cluster, the nodes,
    the faults, the checks. ``progress`` gets each event as it happens; the nodes' logs go
    to ``workdir`` (a temporary directory, kept only when a violation was found)."""
    from .cluster import EtcdCluster

    started = time.monotonic()
    own_dir = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="etcd-rdzv-soak-")) if workdir is None \
        else Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    # Started and stopped on the loop's thread: nothing else runs yet, or any more, and an
    # interrupt then stops the members instead of leaving a thread to start them.
    with EtcdCluster(3) as cluster:
        report = await _Driver(config, cluster, directory, progress).run()
    report = replace(report, elapsed=time.monotonic() - started)
    if own_dir and report.ok:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
    return report


def run_soak(config: SoakConfig, *, progress: Callable[[str], None] | None = None,
             workdir: str | os.PathLike[str] | None = None) -> SoakReport:
    """:func:`soak` on a loop of its own."""
    return asyncio.run(soak(config, progress=progress, workdir=workdir))


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: etcd's members and the nodes are stopped


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="how long faults are injected (default 120)")
    parser.add_argument("--seed", type=int, action="append",
                        help="the seed (repeat for several soaks; default 1)")
    parser.add_argument("--verbose", action="store_true", help="print every event")
    parser.add_argument("--workdir", help="keep the nodes' logs here")
    parser.add_argument("--node", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node is not None:
        return _node_main(args.node)
    failed = False
    for seed in args.seed or [1]:
        progress = (lambda line: print(line, file=sys.stderr, flush=True)) \
            if args.verbose else None
        report = run_soak(SoakConfig.for_seed(args.seconds, seed), progress=progress,
                          workdir=args.workdir)
        print(report.describe(), flush=True)
        failed = failed or not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
