"""The native protocol's decisions: what one node knows in, its next step out.

:func:`decide` is a pure function of a :class:`NodeView`: no I/O, no asyncio, no clock (the
view carries the time). The node (:mod:`.node`) runs the loop: it builds the view, asks
:func:`decide`, does the step's etcd I/O, records what etcd said with one of the view's
``after_*`` methods (pure too), and asks again. Every rule of the protocol is one of
:class:`Rule`'s members, applied in this order (the first that applies wins):

1. ``FAILED``: a failure waiting cannot heal (permissions, TLS, a compacted cutoff): give up.
2. ``CLOSED``: the run is closed: leave; a standby exits cleanly, the others with an error.
3. ``ADMITTED``: the node's rank in a sealed round is known: done.
4. ``TIMED_OUT``: ``join_timeout`` passed, and no sealed round may hold the node (its round
   is open, or its roster left it out). A standby has
   no deadline (torch's redundancy list), and gets a whole ``join_timeout`` from the moment
   it stops standing by.
5. ``ETCD_AWAY``: etcd did not answer the last call: wait a ``keep_alive_interval``, then
   count again.
6. ``JOIN``: the node has no key under its current lease (its first join; its lease expired
   or a join failed): join the open round, which may be the round it was in.
7. ``MIRROR_LAGGED``: a later round than the node's was sealed: join the open round.
8. ``READ_RANK`` / ``LEFT_OUT``: the node's round is sealed: read its rank at the cutoff; if
   the roster left it out (it joined after the cutoff, or beyond ``max_nodes``), join the
   open round.
9. ``COUNT``: the counts of the node's round are older than an interval or than the last
   ``ctl/`` change: count again.
10. ``MARK_WAITING`` / ``PREVIOUS_TRAINS``: the previous round is sealed and its members
    still hold their keys: one round trains at a time, so the node waits; if that round
    has room (fewer than ``max_nodes``, or a member gone) it marks its round as awaited
    (the members' agents restart), else it stands by.
11. ``SEAL``: ``max_nodes`` joined, or ``min_nodes`` did ``last_call_timeout`` ago: seal.
12. ``WAIT``: nothing to do until the next count, the seal's time or the deadline (or a
    ``ctl/`` change, which the node's loop wakes for).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

from ..errors import EtcdRendezvousError
from .control import ControlSnapshot
from .model import Admission, NativeSettings, Seal

__all__ = [
    "Admitted",
    "Closed",
    "Count",
    "Counts",
    "Failed",
    "Join",
    "MarkWaiting",
    "NodeView",
    "ReadRank",
    "Rule",
    "SealRound",
    "Step",
    "TimedOut",
    "Wait",
    "decide",
]


class Rule(enum.Enum):
    """The rules of the protocol, in the order :func:`decide` applies them."""

    FAILED = "a failure that waiting cannot heal ends the rendezvous"
    CLOSED = "a closed run admits nobody; a standby exits cleanly"
    ADMITTED = "a node whose rank is known is done"
    TIMED_OUT = "no round admitted the node within join_timeout (standbys wait on)"
    ETCD_AWAY = "etcd did not answer: look again after an interval"
    JOIN = "a node with no key under its current lease joins the open round"
    MIRROR_LAGGED = "a later round was sealed: join the open round"
    READ_RANK = "the node's round is sealed: read its rank at the cutoff"
    LEFT_OUT = "the roster left the node out: join the open round"
    COUNT = "counts older than an interval or a ctl/ change are read again"
    MARK_WAITING = "the previous round trains and has room: ask its members over"
    PREVIOUS_TRAINS = "the previous round trains: wait (stand by when it is full)"
    SEAL = "max_nodes joined, or min_nodes did last_call_timeout ago: seal"
    WAIT = "nothing to do before the next count, the seal or the deadline"


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
        if not counts.mine:
            return replace(self, key_lease=0, counts=counts, unreachable=None)
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


# --- the steps ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Join:
    """Put the node's key in ``round`` (under a new lease if it has none), leave its old key,
    and count the round and the previous one: one Txn."""

    round: int
    rule: Rule


@dataclass(frozen=True)
class Count:
    """Count the join keys of ``round`` and of the round before it: one read."""

    round: int
    rule: Rule = Rule.COUNT


@dataclass(frozen=True)
class MarkWaiting:
    """Create ``ctl/wait/<round>`` under ``lease``, the lease of the node's join key (never
    none: the marker must go when the node does)."""

    round: int
    lease: int
    rule: Rule = Rule.MARK_WAITING


@dataclass(frozen=True)
class SealRound:
    """Count ``round`` again and, with enough nodes, seal it (create-only)."""

    round: int
    rule: Rule = Rule.SEAL


@dataclass(frozen=True)
class ReadRank:
    """Read the node's rank in the roster of ``seal``'s round, at its cutoff."""

    seal: Seal
    rule: Rule = Rule.READ_RANK


@dataclass(frozen=True)
class Wait:
    """Nothing to do until ``until`` (monotonic seconds) or a ``ctl/`` change."""

    until: float
    rule: Rule


@dataclass(frozen=True)
class Admitted:
    """Done: the node's place in its round."""

    admission: Admission
    rule: Rule = Rule.ADMITTED


@dataclass(frozen=True)
class Closed:
    """Leave the round: the run is closed (``standby``: the node only stood by)."""

    standby: bool
    rule: Rule = Rule.CLOSED


@dataclass(frozen=True)
class TimedOut:
    """Leave the round: no round admitted the node within ``join_timeout``."""

    unreachable: str | None
    """What etcd last said, if it did not answer."""
    rule: Rule = Rule.TIMED_OUT


@dataclass(frozen=True)
class Failed:
    """Leave the round and raise ``error``."""

    error: EtcdRendezvousError
    rule: Rule = Rule.FAILED


Step = (Join | Count | MarkWaiting | SealRound | ReadRank | Wait | Admitted | Closed | TimedOut
        | Failed)


def decide(view: NodeView) -> Step:
    """The node's next step, by the first of the rules (:class:`Rule`) that applies."""
    now, settings, counts = view.now, view.settings, view.counts
    if view.failure is not None:
        return Failed(view.failure)
    if view.control.closed or view.closed_seen:
        return Closed(view.standby)
    if view.admission is not None:
        return Admitted(view.admission)
    own_seal = view.seal_of(view.round) if view.round else None
    in_sealed_round = own_seal is not None and view.left_out_of != view.round
    deadline = view.deadline
    if now >= deadline and not in_sealed_round:
        return TimedOut(view.unreachable.error if view.unreachable is not None else None)
    if view.unreachable is not None and now < view.unreachable.at + settings.keep_alive_interval:
        return Wait(min(view.unreachable.at + settings.keep_alive_interval, deadline),
                    Rule.ETCD_AWAY)
    if not view.lease or view.key_lease != view.lease:
        return Join(view.open_round, Rule.JOIN)
    if own_seal is None and view.latest_round >= view.round:
        return Join(view.open_round, Rule.MIRROR_LAGGED)
    if own_seal is not None:
        if view.left_out_of == view.round:
            return Join(view.open_round, Rule.LEFT_OUT)
        return ReadRank(own_seal)
    if counts is None or now >= view.next_count:
        return Count(view.round)
    if view.previous_trains:
        if (not view.standby and view.round not in view.control.waiting
                and view.marked_at != counts.read_at):
            return MarkWaiting(view.round, view.key_lease)
        return Wait(min(view.next_count, deadline), Rule.PREVIOUS_TRAINS)
    seal_due = view.seal_due
    if now >= seal_due:
        return SealRound(view.round)
    return Wait(min(view.next_count, seal_due, deadline), Rule.WAIT)
