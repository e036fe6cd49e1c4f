"""The native protocol's decisions: what one node knows in, its next step out.

:func:`decide` is a pure function of a :class:`~.view.NodeView` (re-exported here, with
:class:`~.view.Counts`, as the rules' input): no I/O, no asyncio, no clock (the view
carries the time). The node (:mod:`.node`) runs the loop: it builds the view, asks
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
from dataclasses import dataclass

from ..errors import EtcdRendezvousError
from .model import Admission, Seal
from .view import Counts, NodeView

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
