"""The native protocol's decisions, without etcd: :func:`decide` on one :class:`NodeView`.

Each row of :data:`ROWS` builds a view the way the node (:mod:`etcd_rdzv.native.node`)
does (a fresh view, then the ``after_*`` records of what etcd said) and names the step
:func:`decide` must answer, with its rule. Every :class:`Rule` is covered by a row that
passes.

The sequence tests at the end play short scenarios through the same pure functions: decide,
record what etcd said as the executor would, decide again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import pytest

from etcd_rdzv.errors import CompactedError, EtcdAuthError, EtcdRendezvousError
from etcd_rdzv.native.control import ControlSnapshot
from etcd_rdzv.native.decide import (
    Admitted,
    Closed,
    Count,
    Counts,
    Failed,
    Join,
    MarkWaiting,
    NodeView,
    ReadRank,
    Rule,
    SealRound,
    Step,
    TimedOut,
    Wait,
    decide,
)
from etcd_rdzv.native.model import Admission, NativeSettings, Seal

# --- builders ---------------------------------------------------------------------------------

SETTINGS = NativeSettings(min_nodes=2, max_nodes=4, join_timeout=60, last_call_timeout=5,
                          keep_alive_interval=1)
#: Counts far apart: the last call ends before the next count.
SLOW_COUNTS = replace(SETTINGS, keep_alive_interval=10)
#: When the rendezvous began (monotonic seconds): the deadline is T0 + 60.
T0 = 1000.0
LEASE = 0x1A
NEW_LEASE = 0x2B
COMPACTED = CompactedError("round 1 was sealed at revision 100, which etcd compacted", 150)
DENIED = EtcdAuthError("etcdserver: permission denied")


def seal(round_: int, size: int = 2, sealer: str = "node-a") -> Seal:
    """The seal of ``round_``: ``size`` nodes at cutoff ``100 * round_``."""
    return Seal(round_, 100 * round_, size, 1.7e9, sealer)


def control(seals: Iterable[Seal] = (), waiting: Iterable[int] = (),
            closed: bool = False) -> ControlSnapshot:
    return ControlSnapshot({s.round: s for s in seals}, frozenset(waiting), closed, 7)


def fresh(*seals: Seal, lease: int = 0) -> NodeView:
    """A node that has not joined yet, at T0 (``lease`` 0: not granted yet)."""
    return NodeView(SETTINGS, T0, T0, control(seals), lease=lease)


def joined(round_: int, nodes: int, previous: int = 0, *, seals: Iterable[Seal] = (),
           waiting: Iterable[int] = (), at: float = T0,
           settings: NativeSettings = SETTINGS) -> NodeView:
    """A node whose join of ``round_`` (under :data:`LEASE`, at ``at``) counted ``nodes`` in
    it and ``previous`` in the round before it."""
    view = NodeView(settings, at, T0, control(seals, waiting), lease=LEASE)
    return view.after_join(round_, LEASE, Counts(nodes, previous, at))


def at(view: NodeView, now: float) -> NodeView:
    """``view`` at another time."""
    return replace(view, now=now)


def count(view: NodeView, now: float, nodes: int, previous: int = 0) -> NodeView:
    """``view`` after a count at ``now``."""
    return at(view, now).after_count(Counts(nodes, previous, now))


def watched(view: NodeView, seals: Iterable[Seal] | None = None,
            waiting: Iterable[int] | None = None, closed: bool | None = None) -> NodeView:
    """``view`` with another control snapshot (what is not given stays)."""
    old = view.control
    return replace(view, control=control(
        old.seals.values() if seals is None else seals,
        old.waiting if waiting is None else waiting,
        old.closed if closed is None else closed))


def closing(view: NodeView) -> NodeView:
    return watched(view, closed=True)


def lease_lost(view: NodeView) -> NodeView:
    """The session found the node's lease gone (``NodeSession.lost``)."""
    return replace(view, lease=0)


#: Round 2 waits: round 1 was sealed full (4 = max_nodes) and its 4 members hold their keys.
STANDBY = joined(2, 1, 4, seals=[seal(1, size=4)])
#: Round 2 waits: round 1 was sealed with 2 nodes (room for 2 more), both members present.
ROOM = joined(2, 1, 2, seals=[seal(1, size=2)])
#: Round 1 had a quorum at T0, 2 nodes joined; a count at T0 + 2 found 1, at T0 + 3 two.
DIPPED = count(count(joined(1, 2), T0 + 2, 1), T0 + 3, 2)
#: The seal another node won while this one counted 3 nodes at T0 + 5 and tried to seal.
WINNER = Seal(1, 150, 3, 1.7e9, "node-b")
LOST_RACE = count(joined(1, 2), T0 + 5, 3).after_seal(WINNER)
#: A former standby: standing by at T0 + 500, a member of round 1 gone at T0 + 501.
FORMER_STANDBY = count(count(STANDBY, T0 + 500, 1, 4), T0 + 501, 1, 3)
ADMITTED = at(joined(1, 2, seals=[seal(1)]), T0 + 0.25).after_rank(Admission(1, 1, 2))


# --- the table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    name: str
    rule: Rule
    """The rule the row checks (the rule of ``step``)."""
    view: NodeView
    step: Step


ROWS = [
    # FAILED: first of all.
    Row("failed_compacted_cutoff", Rule.FAILED,
        joined(1, 2, seals=[seal(1)]).after_failure(COMPACTED), Failed(COMPACTED)),
    Row("failed_permission_denied", Rule.FAILED, fresh().after_failure(DENIED), Failed(DENIED)),
    Row("failed_before_closed", Rule.FAILED,
        closing(joined(1, 1)).after_failure(COMPACTED), Failed(COMPACTED)),
    Row("failed_before_admitted", Rule.FAILED, ADMITTED.after_failure(DENIED), Failed(DENIED)),
    Row("failed_before_timed_out", Rule.FAILED,
        at(joined(1, 1), T0 + 60).after_failure(COMPACTED), Failed(COMPACTED)),
    # CLOSED: a standby exits cleanly (torch's redundancy list), the others with an error.
    Row("closed_while_waiting", Rule.CLOSED, closing(joined(1, 1)), Closed(standby=False)),
    Row("closed_while_standing_by", Rule.CLOSED, closing(STANDBY), Closed(standby=True)),
    Row("closed_while_marked_waiting", Rule.CLOSED,
        closing(watched(ROOM.after_mark(), waiting=[2])), Closed(standby=False)),
    Row("closed_before_admitted", Rule.CLOSED, closing(ADMITTED), Closed(standby=False)),
    Row("closed_standby_after_etcd_blip", Rule.CLOSED,
        # A call etcd did not answer keeps the counts: a standby stays one (it exits
        # cleanly, as torch's redundancy list does).
        closing(at(STANDBY, T0 + 1).after_silence("etcd down")), Closed(standby=True)),
    # ADMITTED
    Row("admitted", Rule.ADMITTED, ADMITTED, Admitted(Admission(1, 1, 2))),
    Row("admitted_past_deadline", Rule.ADMITTED, at(ADMITTED, T0 + 100),
        Admitted(Admission(1, 1, 2))),
    # TIMED_OUT: join_timeout from started_at, unless the round is sealed or a standby.
    Row("timed_out_round_unsealed", Rule.TIMED_OUT, at(joined(1, 1), T0 + 60),
        TimedOut(None)),
    Row("timed_out_carries_etcd_error", Rule.TIMED_OUT,
        at(at(joined(1, 1), T0 + 59.5).after_silence("etcd down"), T0 + 60),
        TimedOut("etcd down")),
    Row("not_timed_out_round_sealed", Rule.READ_RANK, at(joined(1, 2, seals=[seal(1)]), T0 + 60),
        ReadRank(seal(1))),
    Row("standby_never_times_out", Rule.PREVIOUS_TRAINS, count(STANDBY, T0 + 10_000, 1, 4),
        Wait(T0 + 10_001, Rule.PREVIOUS_TRAINS)),
    Row("former_standby_outlives_started_at_deadline", Rule.MARK_WAITING, FORMER_STANDBY,
        MarkWaiting(2, LEASE)),
    Row("former_standby_wait_capped_by_its_deadline", Rule.PREVIOUS_TRAINS,
        count(watched(FORMER_STANDBY, waiting=[2]), T0 + 559.5, 1, 3),
        Wait(T0 + 560, Rule.PREVIOUS_TRAINS)),
    Row("former_standby_times_out_join_timeout_after_last_standby_count", Rule.TIMED_OUT,
        at(FORMER_STANDBY, T0 + 560), TimedOut(None)),
    Row("left_out_past_deadline", Rule.TIMED_OUT,
        # As torch: a node that is no participant of the complete round times out before
        # it is added anywhere (no key in round 2 that others might count).
        at(LOST_RACE.after_rank(None), T0 + 60), TimedOut(None)),
    # ETCD_AWAY: an interval, then the rules look again (counts are read afresh).
    Row("etcd_away_waits_an_interval", Rule.ETCD_AWAY,
        at(joined(1, 1), T0 + 3).after_silence("etcd down"), Wait(T0 + 4, Rule.ETCD_AWAY)),
    Row("etcd_away_then_counts_again", Rule.COUNT,
        at(at(joined(1, 1), T0 + 3).after_silence("etcd down"), T0 + 4), Count(1)),
    Row("etcd_away_wait_capped_by_deadline", Rule.ETCD_AWAY,
        at(joined(1, 1), T0 + 59.5).after_silence("etcd down"), Wait(T0 + 60, Rule.ETCD_AWAY)),
    Row("etcd_away_on_first_join", Rule.ETCD_AWAY, fresh().after_silence("etcd down"),
        Wait(T0 + 1, Rule.ETCD_AWAY)),
    Row("etcd_away_first_join_again", Rule.JOIN,
        at(fresh().after_silence("etcd down"), T0 + 1), Join(1, Rule.JOIN)),
    # JOIN: no key under the current lease; the open round, never before the node's own.
    Row("first_join", Rule.JOIN, fresh(), Join(1, Rule.JOIN)),
    Row("first_join_after_latest_sealed", Rule.JOIN, fresh(seal(3), seal(4)),
        Join(5, Rule.JOIN)),
    Row("first_join_lease_granted", Rule.JOIN, fresh(lease=LEASE), Join(1, Rule.JOIN)),
    Row("lease_expired_in_open_round", Rule.JOIN, lease_lost(joined(1, 1)), Join(1, Rule.JOIN)),
    Row("lease_changed_in_open_round", Rule.JOIN, replace(joined(1, 1), lease=NEW_LEASE),
        Join(1, Rule.JOIN)),
    Row("lease_expired_in_open_round_after_a_seal", Rule.JOIN,
        lease_lost(joined(2, 1, seals=[seal(1)])), Join(2, Rule.JOIN)),
    Row("join_failed_under_new_lease", Rule.JOIN,
        at(at(replace(joined(1, 1), lease=NEW_LEASE), T0 + 2).after_silence("etcd down"),
           T0 + 3), Join(1, Rule.JOIN)),
    Row("lease_lost_while_standing_by", Rule.JOIN, lease_lost(STANDBY), Join(2, Rule.JOIN)),
    Row("lease_lost_with_room_joins_not_marks", Rule.JOIN, lease_lost(ROOM),
        Join(2, Rule.JOIN)),
    Row("lease_lost_after_round_sealed", Rule.JOIN,
        lease_lost(joined(1, 2, seals=[seal(1)])), Join(2, Rule.JOIN)),
    # MIRROR_LAGGED: the node's round is unsealed, a later one sealed.
    Row("mirror_lagged", Rule.MIRROR_LAGGED, watched(joined(1, 1), seals=[seal(2)]),
        Join(3, Rule.MIRROR_LAGGED)),
    # A seal key another program wrote: that round can never be sealed, so it is taken.
    Row("own_round_taken_by_an_unreadable_seal", Rule.MIRROR_LAGGED,
        replace(joined(1, 1), control=replace(joined(1, 1).control, taken=frozenset({1}))),
        Join(2, Rule.MIRROR_LAGGED)),
    Row("mirror_lagged_own_seal_cleaned_up", Rule.MIRROR_LAGGED,
        watched(joined(2, 1, seals=[seal(1)]), seals=[seal(3), seal(4)]),
        Join(5, Rule.MIRROR_LAGGED)),
    # READ_RANK
    Row("own_round_sealed", Rule.READ_RANK, joined(1, 2, seals=[seal(1)]), ReadRank(seal(1))),
    Row("lost_seal_race_reads_winner_seal", Rule.READ_RANK, LOST_RACE, ReadRank(WINNER)),
    Row("lost_seal_race_stale_counts", Rule.READ_RANK, at(LOST_RACE, T0 + 7), ReadRank(WINNER)),
    # LEFT_OUT
    Row("left_out", Rule.LEFT_OUT, LOST_RACE.after_rank(None), Join(2, Rule.LEFT_OUT)),
    Row("left_out_next_round_sealed_too", Rule.LEFT_OUT,
        # Round 2 was sealed without the node too: the open round is 3.
        watched(LOST_RACE, seals=[WINNER, seal(2)]).after_rank(None), Join(3, Rule.LEFT_OUT)),
    # A count checks the node's own key and the close, ahead of the watch.
    Row("count_misses_own_key_joins_the_same_round", Rule.JOIN,
        count(joined(1, 1), T0 + 1, 0).after_count(Counts(1, 0, T0 + 1, mine=False)),
        Join(1, Rule.JOIN)),
    # Found by the simulation: a recount that misses the node's key ends its last call too,
    # so a node whose lease expired never seals a round it is not in.
    Row("recount_misses_own_key_no_seal", Rule.JOIN,
        at(joined(1, 2), T0 + 6).after_count(Counts(1, 0, T0 + 6, mine=False)),
        Join(1, Rule.JOIN)),
    Row("count_finds_the_run_closed_standby_stays_one", Rule.CLOSED,
        at(STANDBY, T0 + 1).after_count(Counts(1, 0, T0 + 1, closed=True)),
        Closed(standby=True)),
    # A join whose answer was lost may have landed: the rules check before joining again.
    Row("lost_join_answer_waits_for_etcd", Rule.ETCD_AWAY,
        fresh(lease=LEASE).after_join(1, LEASE, None, "etcd down"), Wait(T0 + 1, Rule.ETCD_AWAY)),
    Row("lost_join_answer_round_open_counts", Rule.COUNT,
        at(fresh(lease=LEASE).after_join(1, LEASE, None, "etcd down"), T0 + 1), Count(1)),
    Row("lost_join_answer_round_sealed_reads_rank", Rule.READ_RANK,
        at(watched(fresh(lease=LEASE).after_join(1, LEASE, None, "etcd down"),
                   seals=[seal(1)]), T0 + 1), ReadRank(seal(1))),
    # A new rendezvous knows the seal of its last admission, ahead of its watch.
    Row("new_rendezvous_after_the_admitted_round", Rule.JOIN,
        replace(fresh(lease=LEASE), learned_seal=seal(3)), Join(4, Rule.JOIN)),
    # COUNT
    Row("counts_stale_after_ctl_change", Rule.COUNT,
        replace(at(joined(1, 1), T0 + 0.5), changed_at=T0 + 0.5), Count(1)),
    Row("counts_older_than_interval", Rule.COUNT, at(joined(1, 1), T0 + 1), Count(1)),
    Row("count_before_marking", Rule.COUNT, at(ROOM, T0 + 1), Count(2)),
    # MARK_WAITING: under the join key's lease; one attempt per count.
    Row("previous_round_has_room", Rule.MARK_WAITING, ROOM, MarkWaiting(2, LEASE)),
    Row("previous_round_full_member_gone", Rule.MARK_WAITING,
        joined(2, 1, 3, seals=[seal(1, size=4)]), MarkWaiting(2, LEASE)),
    Row("marker_under_rejoined_key_lease", Rule.MARK_WAITING,
        at(replace(ROOM, lease=NEW_LEASE), T0 + 1).after_join(2, NEW_LEASE,
                                                               Counts(1, 2, T0 + 1)),
        MarkWaiting(2, NEW_LEASE)),
    Row("new_count_marks_again", Rule.MARK_WAITING, count(ROOM.after_mark(), T0 + 1, 1, 2),
        MarkWaiting(2, LEASE)),
    # PREVIOUS_TRAINS
    Row("previous_round_full_stands_by", Rule.PREVIOUS_TRAINS, STANDBY,
        Wait(T0 + 1, Rule.PREVIOUS_TRAINS)),
    Row("marker_already_there", Rule.PREVIOUS_TRAINS, joined(2, 1, 2, seals=[seal(1)],
                                                             waiting=[2]),
        Wait(T0 + 1, Rule.PREVIOUS_TRAINS)),
    Row("one_marker_per_count", Rule.PREVIOUS_TRAINS, ROOM.after_mark(),
        Wait(T0 + 1, Rule.PREVIOUS_TRAINS)),
    Row("new_count_marker_there", Rule.PREVIOUS_TRAINS,
        count(watched(ROOM.after_mark(), waiting=[2]), T0 + 1, 1, 2),
        Wait(T0 + 2, Rule.PREVIOUS_TRAINS)),
    Row("previous_trains_holds_back_full_round", Rule.PREVIOUS_TRAINS,
        joined(2, 4, 2, seals=[seal(1)], waiting=[2]), Wait(T0 + 1, Rule.PREVIOUS_TRAINS)),
    # SEAL
    Row("max_nodes_seals_at_once", Rule.SEAL, joined(1, 4), SealRound(1)),
    Row("more_than_max_seals_at_once", Rule.SEAL, joined(1, 5), SealRound(1)),
    Row("last_call_over", Rule.SEAL, at(count(joined(1, 2), T0 + 4.5, 2), T0 + 5),
        SealRound(1)),
    Row("last_call_over_slow_counts", Rule.SEAL, at(joined(1, 2, settings=SLOW_COUNTS), T0 + 5),
        SealRound(1)),
    Row("last_call_from_later_count_seals", Rule.SEAL, at(count(DIPPED, T0 + 7.5, 2), T0 + 8),
        SealRound(1)),
    Row("previous_round_emptied_seals", Rule.SEAL,
        at(count(count(joined(2, 2, 1, seals=[seal(1)]), T0 + 4.5, 2, 0), T0 + 9, 2, 0),
           T0 + 9.5), SealRound(2)),
    # WAIT
    Row("fewer_than_min_waits_for_next_count", Rule.WAIT, joined(1, 1), Wait(T0 + 1, Rule.WAIT)),
    Row("min_nodes_waits_for_next_count", Rule.WAIT, joined(1, 2), Wait(T0 + 1, Rule.WAIT)),
    Row("last_call_waits_until_quorum_plus_timeout", Rule.WAIT,
        count(joined(1, 2), T0 + 4.5, 2), Wait(T0 + 5, Rule.WAIT)),
    Row("last_call_slow_counts", Rule.WAIT, joined(1, 2, settings=SLOW_COUNTS),
        Wait(T0 + 5, Rule.WAIT)),
    Row("count_below_min_cancels_last_call", Rule.WAIT, count(joined(1, 2), T0 + 2, 1),
        Wait(T0 + 3, Rule.WAIT)),
    Row("count_below_min_no_seal_at_first_last_call", Rule.WAIT,
        at(count(DIPPED, T0 + 4.5, 2), T0 + 5), Wait(T0 + 5.5, Rule.WAIT)),
    Row("count_below_min_resets_last_call", Rule.WAIT, count(DIPPED, T0 + 7.5, 2),
        Wait(T0 + 8, Rule.WAIT)),
    Row("wait_capped_by_deadline", Rule.WAIT, count(joined(1, 1), T0 + 59.5, 1),
        Wait(T0 + 60, Rule.WAIT)),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_decide(row: Row) -> None:
    assert row.step.rule is row.rule, "the row names the rule of its step"
    step = decide(row.view)
    assert step == row.step
    assert step.rule is row.rule


def test_rows_cover_every_rule() -> None:
    covered = {row.rule for row in ROWS}
    assert covered == set(Rule)
    assert len({row.name for row in ROWS}) == len(ROWS), "row names are unique"


def test_marker_lease_is_the_join_key_lease() -> None:
    """Every MarkWaiting of the table names the lease of the node's join key, never none,
    and only for a node that holds that lease now."""
    marks = [(row.view, step) for row in ROWS
             if isinstance(step := decide(row.view), MarkWaiting)]
    assert marks
    for view, step in marks:
        assert step.lease == view.key_lease == view.lease != 0


def test_standby_deadline() -> None:
    assert STANDBY.standby
    assert STANDBY.deadline == math.inf
    assert STANDBY.stood_by_at == T0
    assert not FORMER_STANDBY.standby
    assert FORMER_STANDBY.stood_by_at == T0 + 500
    assert FORMER_STANDBY.deadline == T0 + 500 + SETTINGS.join_timeout
    assert joined(1, 1).deadline == T0 + SETTINGS.join_timeout


def test_room_is_no_standby() -> None:
    assert not ROOM.standby
    assert ROOM.previous_trains
    assert not joined(2, 1, 3, seals=[seal(1, size=4)]).standby
    assert not joined(2, 1, 0, seals=[seal(1, size=4)]).previous_trains


def test_a_count_without_the_nodes_key_ends_its_last_call() -> None:
    quorum = joined(1, 2)
    assert quorum.seal_due == T0 + 5
    assert quorum.after_count(Counts(1, 0, T0 + 6, mine=False)).seal_due == math.inf


def test_last_call_runs_from_the_later_count() -> None:
    assert joined(1, 2).quorum_at == T0
    assert count(joined(1, 2), T0 + 2, 1).quorum_at is None
    assert DIPPED.quorum_at == T0 + 3
    assert DIPPED.seal_due == T0 + 3 + SETTINGS.last_call_timeout


# --- sequences: decide, record what etcd said, decide again -----------------------------------

def expect(view: NodeView, step: Step) -> Step:
    got = decide(view)
    assert got == step, f"at {view.now - T0:+g} s"
    return got


def test_lone_node_lease_expires_then_two_join_admitted() -> None:
    view = fresh(lease=LEASE)
    expect(view, Join(1, Rule.JOIN))
    view = view.after_join(1, LEASE, Counts(1, 0, T0))
    expect(view, Wait(T0 + 1, Rule.WAIT))
    view = count(view, T0 + 1, 1)
    expect(view, Wait(T0 + 2, Rule.WAIT))
    # Its lease expires; the session wakes it (a change) with no lease.
    view = replace(at(view, T0 + 1.25), lease=0, changed_at=T0 + 1.25)
    expect(view, Join(1, Rule.JOIN))  # the same, open round
    view = replace(at(view, T0 + 1.5), lease=NEW_LEASE).after_join(1, NEW_LEASE,
                                                                   Counts(1, 0, T0 + 1.5))
    assert view.key_lease == NEW_LEASE
    expect(view, Wait(T0 + 2.5, Rule.WAIT))
    # Two more nodes join (their joins are ctl/-silent: the node sees them at its next count).
    view = count(view, T0 + 2.5, 3)
    expect(view, Wait(T0 + 3.5, Rule.WAIT))
    for tick in (3.5, 4.5, 5.5, 6.5):
        view = count(view, T0 + tick, 3)
        expect(view, Wait(T0 + tick + 1, Rule.WAIT))
    view = count(view, T0 + 7.5, 3)
    expect(view, SealRound(1))  # quorum at T0 + 2.5, last call over at T0 + 7.5
    own = Seal(1, 120, 3, 1.7e9, "me")
    view = count(view, T0 + 7.5, 3).after_seal(own)
    expect(view, ReadRank(own))
    view = view.after_rank(Admission(1, 2, 3))
    expect(view, Admitted(Admission(1, 2, 3)))


def test_lost_seal_race_left_out_stands_by_in_next_round() -> None:
    view = joined(1, 5)
    expect(view, SealRound(1))
    # The executor counts again and loses the create-only seal to another node, which cut
    # the roster at max_nodes; the node's watch has not seen that seal yet.
    winner = Seal(1, 140, 4, 1.7e9, "node-b")
    view = count(view, T0 + 0.25, 5).after_seal(winner)
    expect(view, ReadRank(winner))
    view = view.after_rank(None)
    expect(view, Join(2, Rule.LEFT_OUT))
    view = at(view, T0 + 0.5).after_join(2, LEASE, Counts(1, 4, T0 + 0.5))
    assert view.standby
    expect(view, Wait(T0 + 1.5, Rule.PREVIOUS_TRAINS))
    # The watch catches up; it stands by well past join_timeout.
    view = watched(view, seals=[winner])
    view = count(view, T0 + 300, 1, 4)
    expect(view, Wait(T0 + 301, Rule.PREVIOUS_TRAINS))
    expect(closing(view), Closed(standby=True))


def test_standby_member_leaves_node_marks_then_admitted() -> None:
    view = count(STANDBY, T0 + 100, 1, 4)
    expect(view, Wait(T0 + 101, Rule.PREVIOUS_TRAINS))
    view = count(view, T0 + 101, 1, 3)  # a member of round 1 is gone
    expect(view, MarkWaiting(2, LEASE))
    view = view.after_mark()
    expect(view, Wait(T0 + 102, Rule.PREVIOUS_TRAINS))
    # The marker's event wakes the node (a ctl/ change): it counts again.
    view = replace(watched(at(view, T0 + 101.25), waiting=[2]), changed_at=T0 + 101.25)
    expect(view, Count(2))
    view = count(view, T0 + 101.25, 1, 3)
    expect(view, Wait(T0 + 102.25, Rule.PREVIOUS_TRAINS))
    # The members' agents restart and join round 2: round 1 is empty, round 2 full.
    view = count(view, T0 + 102.25, 4, 0)
    assert not view.previous_trains and not view.standby
    expect(view, SealRound(2))
    sealed = Seal(2, 300, 4, 1.7e9, "me")
    view = view.after_seal(sealed)
    expect(view, ReadRank(sealed))
    expect(view.after_rank(Admission(2, 3, 4)), Admitted(Admission(2, 3, 4)))


def test_etcd_outage_then_the_round_seals() -> None:
    view = joined(1, 2)
    expect(view, Wait(T0 + 1, Rule.WAIT))
    view = at(view, T0 + 1)
    expect(view, Count(1))
    view = view.after_silence("etcd down")
    expect(view, Wait(T0 + 2, Rule.ETCD_AWAY))
    view = at(view, T0 + 2)
    expect(view, Count(1))
    view = view.after_silence("still down")
    expect(view, Wait(T0 + 3, Rule.ETCD_AWAY))
    view = count(view, T0 + 4.5, 2)
    assert view.quorum_at == T0  # the last call ran through the outage
    expect(view, Wait(T0 + 5, Rule.WAIT))
    expect(at(view, T0 + 5), SealRound(1))


def test_failure_ends_any_sequence() -> None:
    error: EtcdRendezvousError = COMPACTED
    view = joined(1, 2, seals=[seal(1)])
    expect(view, ReadRank(seal(1)))
    expect(view.after_failure(error), Failed(error))
