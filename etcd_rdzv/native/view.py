"""What one node knows: :class:`NodeView`, the input of :func:`~.decide.decide`.

A frozen record of facts (the time, the node's lease and join key, the last counts of its
round, the ``ctl/`` keys its watch saw, what etcd last said), the few facts derived from them
(the standby test, the deadline, when to seal, when to count again), and one ``after_*``
method per kind of answer etcd gives, which returns the view after it. All pure: the node
(:mod:`.node`) calls them with what etcd said; the tests call them with what they invent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import EtcdRendezvousError
from .control import ControlSnapshot
from .model import Admission, NativeSettings, Seal

__all__ = ["Counts", "NodeView", "Unreachable"]


@dataclass(frozen=True)
class Counts:
    """Join keys counted in the node's round and in the round before it."""

    joined: int
    """Nodes in the node's round."""
    previous: int
    """Nodes still in the round before it."""
    read_at: float
    """When the read was sent (monotonic seconds): a ``ctl/`` change after it makes it old."""
    mine: bool = True
    """The node's own key was in its round, under its lease (a key etcd lost, or a join
    whose answer was lost and that never landed, shows here)."""
    closed: bool = False
    """The run was closed when counted (the node's watch may not show it yet)."""


@dataclass(frozen=True)
class Unreachable:
    """etcd did not answer the node's last call."""

    at: float
    """When (monotonic seconds)."""
    error: str


@dataclass(frozen=True)
class NodeView:
    """What one node knows at one moment: every fact :func:`decide` reads."""

    settings: NativeSettings
    now: float
    """Monotonic seconds."""
    started_at: float
    """When this rendezvous began (monotonic seconds)."""
    control: ControlSnapshot
    """The run's ``ctl/`` keys as the node's watch last saw them."""
    lease: int = 0
    """The node's lease now (0: none: not granted yet, or lost)."""
    round: int = 0
    """The round the node's join key was last put in (0: none yet)."""
    key_lease: int = 0
    """The lease that join key was put under (0: no key)."""
    counts: Counts | None = None
    """The last count of the node's round (None: none since it joined)."""
    quorum_at: float | None = None
    """When a count of the node's round first showed ``min_nodes`` (and no previous round
    training): the last call runs from then."""
    stood_by_at: float | None = None
    """When a count last showed the node standing by (its deadline runs from then)."""
    marked_at: float | None = None
    """:attr:`Counts.read_at` of the count after which the node last marked its round as
    awaited: one marker attempt per count."""
    changed_at: float = -math.inf
    """When the node last saw a ``ctl/`` change (or was woken: a lost lease)."""
    learned_seal: Seal | None = None
    """A seal the node learned from its own seal attempt, ahead of its watch."""
    left_out_of: int = 0
    """The last round whose roster left this node out."""
    admission: Admission | None = None
    """The node's place in its sealed round, once read."""
    unreachable: Unreachable | None = None
    """etcd's silence on the node's last call (None: it answered)."""
    failure: EtcdRendezvousError | None = None
    """A failure that waiting cannot heal."""
    closed_seen: bool = False
    """A read found the run closed, ahead of the node's watch."""

    # --- facts derived from the view ----------------------------------------------------

    def seal_of(self, round_: int) -> Seal | None:
        """The seal of ``round_``, if the node knows it."""
        seal = self.control.seals.get(round_)
        if seal is None and self.learned_seal is not None and self.learned_seal.round == round_:
            return self.learned_seal
        return seal

    @property
    def latest_round(self) -> int:
        """The latest round the node knows sealed (0: none)."""
        learned = self.learned_seal.round if self.learned_seal is not None else 0
        return max(self.control.latest_round, learned)

    @property
    def open_round(self) -> int:
        """The round a node joins: after the latest sealed one, and never before its own
        (a node whose key was lost joins the round it was in)."""
        return max(self.latest_round + 1, self.round)

    @property
    def previous_trains(self) -> bool:
        """The previous round is sealed and members still hold their keys in it."""
        return (self.seal_of(self.round - 1) is not None and self.counts is not None
                and self.counts.previous > 0)

    @property
    def standby(self) -> bool:
        """The node stands by (torch's redundancy list): the previous round trains and is
        full, with every member present."""
        previous = self.seal_of(self.round - 1)
        if previous is None or self.counts is None or not self.previous_trains:
            return False
        room = previous.size < self.settings.max_nodes or self.counts.previous < previous.size
        return not room

    @property
    def deadline(self) -> float:
        """When the node gives up waiting (infinity while it stands by)."""
        if self.standby:
            return math.inf
        since = max(self.started_at, self.stood_by_at if self.stood_by_at is not None
                    else -math.inf)
        return since + self.settings.join_timeout

    @property
    def seal_due(self) -> float:
        """When the node's round should be sealed (infinity: not on what it knows)."""
        counts = self.counts
        if counts is None or self.previous_trains:
            return math.inf
        if counts.joined >= self.settings.max_nodes:
            return counts.read_at
        if self.quorum_at is not None:
            return self.quorum_at + self.settings.last_call_timeout
        return math.inf

    @property
    def next_count(self) -> float:
        """When the node's counts grow old: at once after a ``ctl/`` change or a call
        etcd did not answer."""
        if (self.counts is None or self.counts.read_at < self.changed_at
                or self.unreachable is not None):
            return -math.inf
        return self.counts.read_at + self.settings.keep_alive_interval

    # --- what the node learned: each returns the view after it -------------------------------

    def after_join(self, round_: int, lease: int, counts: Counts | None,
                   error: str | None = None) -> NodeView:
        """The node's key is in ``round_`` under ``lease``; the join counted ``counts``.
        With ``error`` (etcd's answer was lost: the join may or may not have landed) the
        node takes the key as put, and the rules check: a count or the rank read at the
        round's cutoff finds it, or not."""
        joined = replace(self, round=round_, key_lease=lease, counts=None, quorum_at=None,
                         marked_at=None, left_out_of=0, unreachable=None)
        if error is not None:
            return joined.after_silence(error)
        assert counts is not None
        return joined.after_count(counts)

    def after_count(self, counts: Counts) -> NodeView:
        """The node counted its round and the previous one. A count that finds the run
        closed is not taken (the close decides; a standby stays one), and one that misses
        the node's own key leaves it with no key."""
        if counts.closed:
            return replace(self, closed_seen=True, unreachable=None)
        if not counts.mine:  # no key: no last call of its own either (it joins again)
            return replace(self, key_lease=0, counts=counts, quorum_at=None, unreachable=None)
        view = replace(self, counts=counts, unreachable=None)
        quorum = counts.joined >= self.settings.min_nodes and not view.previous_trains
        quorum_at = (self.quorum_at if self.quorum_at is not None else counts.read_at) \
            if quorum else None
        return replace(view, quorum_at=quorum_at,
                       stood_by_at=counts.read_at if view.standby else self.stood_by_at)

    def after_mark(self) -> NodeView:
        """The node tried to mark its round as awaited (a create-only write)."""
        assert self.counts is not None
        return replace(self, marked_at=self.counts.read_at, unreachable=None)

    def after_seal(self, seal: Seal) -> NodeView:
        """The round is sealed: by this node, or by the node that won the race."""
        return replace(self, learned_seal=seal, unreachable=None)

    def after_rank(self, admission: Admission | None) -> NodeView:
        """The node read its rank: ``admission``, or None when the roster left it out."""
        if admission is None:
            return replace(self, left_out_of=self.round, unreachable=None)
        return replace(self, admission=admission, unreachable=None)

    def after_silence(self, error: str) -> NodeView:
        """etcd did not answer (a transient failure). The counts are kept, so a standby
        stays one, but counted again before they are acted on."""
        return replace(self, unreachable=Unreachable(self.now, error))

    def after_failure(self, error: EtcdRendezvousError) -> NodeView:
        """A failure that waiting cannot heal."""
        return replace(self, failure=error)
