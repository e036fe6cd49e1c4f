"""One simulated node: the real rules, executed against the etcd model on the virtual clock.

:class:`SimNode` mirrors :class:`~etcd_rdzv.native.AsyncNativeRendezvous` with callbacks
instead of coroutines. Its loop builds the :class:`~etcd_rdzv.native.decide.NodeView` as
``_observe`` does (the time, its watch's :class:`~etcd_rdzv.native.ControlSnapshot`, its
session's lease), asks the rules (the real :func:`~etcd_rdzv.native.decide.decide` unless a
test passes a variant), does the step's requests (:mod:`.requests`) and records the answer
with the view's real ``after_*`` methods, exactly where ``node.py`` does: a lost lease makes
it join again, etcd's silence is :meth:`~etcd_rdzv.native.decide.NodeView.after_silence`
(but for a join's: it may have landed, so the node takes the key as put, with
``after_join(..., error)``, and adds it to the keys it may hold), every join deletes all
the keys the node may hold but its new one, and leaving the round deletes them all; the
rank read uses the key of the view's round; the seal counts again and gives up on the
fresh view when the count found the run closed or ``now < seal_due``. A new rendezvous
starts with the seal of the node's last admission as its learned seal.

Its process (calls, session, watch) is :class:`~.process.SimProcess`. Its agent is the
soak's (:mod:`etcd_rdzv.testing.soak`): rendezvous, then train while polling
``num_nodes_waiting()``, and rendezvous again when it turns positive or the driver says a
member of its round died. ``num_nodes_waiting()`` is at least 1 without a read when the
node's lease is no longer the one it was admitted with, or its view shows a round sealed
after its own; otherwise it counts round + 1 when ``ctl/wait/<round + 1>`` is in the view,
and is 0 without a read when it is not. So the agent polls only while one of those three
holds (it looks when its lease is lost and when its watch shows a seal or a marker): the
polls it skips would change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from etcd_rdzv.errors import EtcdConnectionError
from etcd_rdzv.native.control import ControlChange, ControlSnapshot
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
    SealRound,
    Step,
    TimedOut,
    Wait,
)
from etcd_rdzv.native.model import Admission, NodeId, Seal

from ..soak import POLL_INTERVAL
from . import requests
from .etcd import prefix_end
from .process import SimProcess, World

__all__ = ["SPIN_LIMIT", "SimNode"]

#: Loops of one node at one virtual instant that make a busy loop (a violation): a step
#: with I/O takes time, and every Wait the rules ask for ends in the future.
SPIN_LIMIT = 50


class SimNode(SimProcess):
    """One node: its process (:class:`SimProcess`), its rendezvous and its agent."""

    def __init__(self, world: World, label: str, node_id: NodeId) -> None:
        super().__init__(world, label, node_id)
        self.held_keys: set[bytes] = set()
        """The join keys this node may hold: its last, and any a join whose answer was lost
        may have put (``AsyncNativeRendezvous._held_keys``)."""
        self._admitted: tuple[Seal, int] | None = None
        """The seal and the lease of the node's last admission."""
        self.view: NodeView | None = None
        self._waiting = False
        self._wait_token = 0
        self._spin_at, self._spins = -1.0, 0
        self._polling = False
        self._last_waiting = 0

    def _wake(self) -> None:
        """A waiting node looks again at once (``ControlFeed.wake``)."""
        if self._waiting and self.view is not None:
            self._waiting = False
            self._wait_token += 1
            self.view = replace(self.view, changed_at=self.world.clock.now)
            self._later(0.0, self._loop)

    # --- the rendezvous: node.py's loop --------------------------------------------------------

    def next_rendezvous(self) -> None:
        self._epoch += 1
        self._waiting = False
        self.admission = None
        now = self.world.clock.now
        self.view = NodeView(self.world.settings, now, now, self.control.snapshot(),
                             learned_seal=self._admitted[0] if self._admitted else None)
        self._loop()

    def _loop(self) -> None:
        world, now = self.world, self.world.clock.now
        self._spins = self._spins + 1 if now == self._spin_at else 0
        self._spin_at = now
        if self._spins > SPIN_LIMIT:
            world.spin(self)
            return
        assert self.view is not None
        view = _observed(self.view, now, self.control.snapshot(), self.lease)
        step = world.rules(view)
        self.view = view
        self.note(step)
        if isinstance(step, Admitted):
            seal = view.seal_of(step.admission.round)
            assert seal is not None
            self.admission, self._admitted = step.admission, (seal, view.key_lease)
            self._train(step.admission)
        elif isinstance(step, Closed | TimedOut | Failed):
            self._give_up(step)
        elif isinstance(step, Wait):
            self._waiting = True
            self._wait_token += 1
            token = self._wait_token
            if step.until != math.inf:
                self._later(max(0.0, step.until - now), lambda: self._wait_over(token))
        else:
            self._run(step, view)

    def _wait_over(self, token: int) -> None:
        if self._waiting and token == self._wait_token:
            self._waiting = False
            self._loop()

    def _continue(self, view: NodeView) -> None:
        self.view = view
        self._loop()

    def _run(self, step: Step, view: NodeView) -> None:
        """The step's I/O, then the view after it (``AsyncNativeRendezvous._run``)."""
        world, etcd, keys = self.world, self.world.etcd, self.world.keys

        def silence(error: str) -> None:
            self._continue(view.after_silence(error))

        if isinstance(step, Join):
            if self.lease:
                self._join(step, view, self.lease)
                return

            def granted(lease: int) -> None:
                self._take(lease)
                self._join(step, view, lease)

            self._call("grant", lambda: etcd.grant(world.settings.node_ttl), granted, silence)
        elif isinstance(step, Count):
            read_at, round_, lease = world.clock.now, step.round, view.key_lease
            self._call("count", lambda: requests.count(etcd, keys, round_, self.name, lease,
                                                       read_at),
                       lambda counted: self._continue(view.after_count(counted[0])), silence)
        elif isinstance(step, MarkWaiting):
            mark = step

            def lease_gone() -> None:
                self._lost(mark.lease)
                self._continue(view)

            self._call("mark", lambda: requests.mark_waiting(etcd, keys, mark.round, self.name,
                                                             mark.lease),
                       lambda _: self._continue(view.after_mark()), silence, lease_gone)
        elif isinstance(step, SealRound):
            self._seal(step.round, view)
        elif isinstance(step, ReadRank):
            key, sealed = keys.member(view.round, self.name), step.seal
            self._call("rank", lambda: requests.rank(etcd, keys, sealed, key),
                       lambda admission: self._continue(view.after_rank(admission)), silence)
        else:
            raise AssertionError(f"not a step with I/O: {step}")

    def _join(self, step: Join, view: NodeView, lease: int) -> None:
        world = self.world
        key, read_at = world.keys.member(step.round, self.name), world.clock.now
        held = frozenset(self.held_keys)  # the Txn is built when it is sent

        def joined(counts: Counts) -> None:
            self.held_keys = {key}
            self._continue(view.after_join(step.round, lease, counts))

        def silence(error: str) -> None:  # it may have landed: the rules check
            self.held_keys.add(key)
            self._continue(view.after_join(step.round, lease, None, error))

        def lease_gone() -> None:
            self._lost(lease)  # the rules join again, with a new lease
            self._continue(view)

        def refused(error: str) -> None:  # not transient: the rendezvous ends
            self._continue(view.after_failure(EtcdConnectionError(error)))

        self._call("join", lambda: requests.join(world.etcd, world.keys, step.round, self.name,
                                                 lease, held, read_at),
                   joined, silence, lease_gone, refused)

    def _seal(self, round_: int, view: NodeView) -> None:
        """Count again; if the fresh view still says so, cap and seal (``node._seal``)."""
        world, etcd, keys = self.world, self.world.etcd, self.world.keys
        read_at, lease = world.clock.now, view.key_lease

        def silence(error: str) -> None:
            self._continue(view.after_silence(error))

        def counted(result: tuple[Counts, int]) -> None:
            counts, revision = result
            fresh = replace(view, now=world.clock.now).after_count(counts)
            if fresh.closed_seen or fresh.now < fresh.seal_due:
                self._continue(fresh)  # closed, fewer nodes now, or members came back
            elif counts.joined > world.settings.max_nodes:
                cap(revision, fresh)
            else:
                create(revision, counts.joined, fresh)

        def cap(revision: int, fresh: NodeView) -> None:
            self._call("seal", lambda: requests.cap(etcd, keys, round_, revision,
                                                    world.settings.max_nodes),
                       lambda found: create(found[0], found[1], fresh), silence)

        def create(cutoff: int, size: int, fresh: NodeView) -> None:
            mine = Seal(round_, cutoff, size, world.clock.now, str(self.id))

            def created(held: Seal | None) -> None:
                if held is not None:
                    self._continue(fresh.after_seal(held))
                    return
                then = lambda: self._continue(fresh.after_seal(mine))  # noqa: E731
                self._delete(keys.seal(round_ - 2), lambda: self._delete(keys.waiting(round_),
                                                                          then), then)

            self._call("seal", lambda: requests.seal(etcd, keys, mine, world.run_lease),
                       created, silence)

        self._call("count", lambda: requests.count(etcd, keys, round_, self.name, lease,
                                                   read_at), counted, silence)

    def _delete(self, key: bytes, then: Callable[[], None],
                failed: Callable[[], None] | None = None) -> None:
        """Delete ``key``; ``then`` (``failed`` when etcd did not answer: errors suppressed)."""
        self._call("delete", lambda: requests.delete(self.world.etcd, key), lambda _: then(),
                   lambda _: (failed or then)())

    def _give_up(self, step: Closed | TimedOut | Failed) -> None:
        """Leave the round (delete every key the node may hold, in key order, each whether
        or not etcd answers), then end the process with the error (as the soak's node
        does)."""
        if isinstance(step, Failed):
            error = type(step.error).__name__
        elif isinstance(step, TimedOut):
            error = "JoinTimeoutError"
        else:
            error = "StandbyExitError" if step.standby else "RunClosedError"

        def done() -> None:
            self.world.emit(self, "exit", error=error, detail=str(step))
            self._end()

        def leave(held: list[bytes]) -> None:
            if held:
                self._delete(held[0], lambda: leave(held[1:]))
            else:
                done()

        held, self.held_keys = sorted(self.held_keys), set()
        leave(held)

    # --- the agent -----------------------------------------------------------------------------

    def rendezvous(self) -> None:
        self.training = self._polling = False
        self.world.emit(self, "joining")
        self.next_rendezvous()

    def restart(self) -> None:
        """The driver: a member of this node's round died; its collectives fail."""
        if self.training:
            self.rendezvous()

    def _train(self, admission: Admission) -> None:
        self.training = True
        self.world.emit(self, "admitted", admission=admission)
        self._maybe_poll()

    def _changed(self, change: ControlChange) -> None:
        if change in ("waiting", "sealed"):
            self._maybe_poll()

    def _lost(self, lease: int) -> None:
        super()._lost(lease)
        self._maybe_poll()

    def _out_of_round(self) -> bool:
        """``num_nodes_waiting()``'s first test: the node's lease is no longer the one it
        was admitted with, or a later round than its own was sealed."""
        assert self._admitted is not None
        seal, lease = self._admitted
        return self.lease != lease or self.control.latest_round > seal.round

    def _maybe_poll(self) -> None:
        """Start polling when ``num_nodes_waiting()`` may be positive."""
        if (self.training and not self._polling and self.admission is not None
                and self._admitted is not None
                and (self._out_of_round() or self.admission.round + 1 in self.control.waiting)):
            self._polling = True
            self._later(self.world.uniform(0, POLL_INTERVAL[1]), self._poll)

    def _poll(self) -> None:
        """``num_nodes_waiting()``, and a new rendezvous when it is positive."""
        assert self.admission is not None
        world, next_round = self.world, self.admission.round + 1

        def polled(waiting: int) -> None:
            if waiting > 0:
                world.emit(self, "waiting", count=waiting)
                self.rendezvous()
            else:
                self._later(world.uniform(*POLL_INTERVAL), self._poll)

        if self._out_of_round():  # its agent must restart it, as for a waiting node
            polled(max(1, self._last_waiting))
            return
        if next_round not in self.control.waiting:
            self._last_waiting, self._polling = 0, False
            return
        prefix = world.keys.round_prefix(next_round)

        def counted(waiting: int) -> None:
            self._last_waiting = waiting
            polled(waiting)

        self._call("poll", lambda: world.etcd.count(prefix, prefix_end(prefix)), counted,
                   lambda _: polled(self._last_waiting))

    def leave(self, close_first: bool = False) -> None:
        """``leave()`` (``shutdown()`` with ``close_first``): revoke the lease at once."""
        world, lease = self.world, self.lease
        self._epoch += 1
        self._waiting = self.training = False
        self.held_keys, self.admission, self._admitted = set(), None, None

        def revoke() -> None:
            self._call("leave", lambda: world.etcd.revoke(lease), lambda _: left(),
                       lambda _: left(), faultless=True)

        def left() -> None:
            self._end()
            world.emit(self, "shutdown" if close_first else "left")

        if close_first:
            closed = world.keys.closed
            self._call("close", lambda: world.etcd.write(
                puts=[(closed, self.name, world.run_lease)]), lambda _: revoke(),
                lambda _: revoke(), faultless=True)
        else:
            revoke()


def _observed(view: NodeView, now: float, control: ControlSnapshot, lease: int) -> NodeView:
    """``replace(view, now=now, control=control, lease=lease)``, without its cost: the
    simulation builds a view per step, and NodeView has no ``__post_init__`` to run."""
    observed = object.__new__(NodeView)
    observed.__dict__.update(view.__dict__, now=now, control=control, lease=lease)
    return observed
