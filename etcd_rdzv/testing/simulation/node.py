"""One simulated node: the real rules, executed against the etcd model on the virtual clock.

:class:`SimNode` mirrors :class:`~etcd_rdzv.native.AsyncNativeRendezvous` with callbacks
instead of coroutines. Its loop builds the :class:`~etcd_rdzv.native.decide.NodeView` as
``_observe`` does (the time, its watch's :class:`~etcd_rdzv.native.ControlSnapshot`, its
session's lease), asks the rules (the real :func:`~etcd_rdzv.native.decide.decide` unless a
test passes a variant), does the step's requests (:mod:`.requests`) and records the answer
with the view's real ``after_*`` methods, exactly where ``node.py`` does: a lost lease makes
it join again, etcd's silence is :meth:`~etcd_rdzv.native.decide.NodeView.after_silence`,
the seal counts again and re-checks ``now >= seal_due`` on the fresh view first.

Its process (calls, session, watch) is :class:`~.process.SimProcess`. Its agent is the
soak's (:mod:`etcd_rdzv.testing.soak`): rendezvous, then train while polling
``num_nodes_waiting()`` (positive when ``ctl/wait/<round + 1>`` is in the view and that
round holds keys), and rendezvous again when it turns positive or the driver says a member
of its round died. It polls only while the marker is in its view: without it the answer is
0 without a read, so the skipped polls change nothing.
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
        self.member_key: bytes | None = None
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
        self.view = NodeView(self.world.settings, now, now, self.control.snapshot())
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
            self.admission = step.admission
            self._admitted(step.admission)
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
            read_at, round_ = world.clock.now, step.round
            self._call("count", lambda: requests.count(etcd, keys, round_),
                       lambda r: self._continue(view.after_count(Counts(r[0], r[1], read_at))),
                       silence)
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
            assert self.member_key is not None
            key, sealed = self.member_key, step.seal
            self._call("rank", lambda: requests.rank(etcd, keys, sealed, key),
                       lambda admission: self._continue(view.after_rank(admission)), silence)
        else:
            raise AssertionError(f"not a step with I/O: {step}")

    def _join(self, step: Join, view: NodeView, lease: int) -> None:
        world = self.world
        old_key, read_at = self.member_key, world.clock.now

        def joined(counts: tuple[int, int]) -> None:
            self.member_key = world.keys.member(step.round, self.name)
            self._continue(view.after_join(step.round, lease, Counts(*counts, read_at)))

        def lease_gone() -> None:
            self._lost(lease)  # the rules join again, with a new lease
            self._continue(view)

        def refused(error: str) -> None:  # not transient: the rendezvous ends
            self._continue(view.after_failure(EtcdConnectionError(error)))

        self._call("join", lambda: requests.join(world.etcd, world.keys, step.round, self.name,
                                                 lease, old_key),
                   joined, lambda error: self._continue(view.after_silence(error)), lease_gone,
                   refused)

    def _seal(self, round_: int, view: NodeView) -> None:
        """Count again; if the fresh view still says so, cap and seal (``node._seal``)."""
        world, etcd, keys = self.world, self.world.etcd, self.world.keys
        read_at = world.clock.now

        def silence(error: str) -> None:
            self._continue(view.after_silence(error))

        def counted(result: tuple[int, int, int]) -> None:
            joined, previous, revision = result
            fresh = replace(view, now=world.clock.now).after_count(
                Counts(joined, previous, read_at))
            if fresh.now < fresh.seal_due:
                self._continue(fresh)  # fewer nodes now, or members came back
            elif joined > world.settings.max_nodes:
                cap(revision, fresh)
            else:
                create(revision, joined, fresh)

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

        self._call("count", lambda: requests.count(etcd, keys, round_), counted, silence)

    def _delete(self, key: bytes, then: Callable[[], None],
                failed: Callable[[], None] | None = None) -> None:
        """Delete ``key``; ``then`` (``failed`` when etcd did not answer: errors suppressed)."""
        self._call("delete", lambda: requests.delete(self.world.etcd, key), lambda _: then(),
                   lambda _: (failed or then)())

    def _give_up(self, step: Closed | TimedOut | Failed) -> None:
        """Leave the round, then end the process with the error (as the soak's node does)."""
        if isinstance(step, Failed):
            error = type(step.error).__name__
        elif isinstance(step, TimedOut):
            error = "JoinTimeoutError"
        else:
            error = "StandbyExitError" if step.standby else "RunClosedError"

        def done() -> None:
            self.member_key = None
            self.world.emit(self, "exit", error=error, detail=str(step))
            self._end()

        if self.member_key is None:
            done()
        else:
            self._delete(self.member_key, done)

    # --- the agent -----------------------------------------------------------------------------

    def rendezvous(self) -> None:
        self.training = self._polling = False
        self.world.emit(self, "joining")
        self.next_rendezvous()

    def restart(self) -> None:
        """The driver: a member of this node's round died; its collectives fail."""
        if self.training:
            self.rendezvous()

    def _admitted(self, admission: Admission) -> None:
        self.training = True
        self.world.emit(self, "admitted", admission=admission)
        self._maybe_poll()

    def _changed(self, change: ControlChange) -> None:
        if change == "waiting":
            self._maybe_poll()

    def _maybe_poll(self) -> None:
        if (self.training and not self._polling and self.admission is not None
                and self.admission.round + 1 in self.control.waiting):
            self._polling = True
            self._later(self.world.uniform(0, POLL_INTERVAL[1]), self._poll)

    def _poll(self) -> None:
        """``num_nodes_waiting()``, and a new rendezvous when it is positive."""
        assert self.admission is not None
        world, next_round = self.world, self.admission.round + 1
        if next_round not in self.control.waiting:
            self._last_waiting, self._polling = 0, False
            return
        prefix = world.keys.round_prefix(next_round)

        def counted(waiting: int) -> None:
            self._last_waiting = waiting
            polled()

        def polled() -> None:
            if self._last_waiting > 0:
                world.emit(self, "waiting", count=self._last_waiting)
                self.rendezvous()
            else:
                self._later(world.uniform(*POLL_INTERVAL), self._poll)

        self._call("poll", lambda: world.etcd.count(prefix, prefix_end(prefix)), counted,
                   lambda _: polled())

    def leave(self, close_first: bool = False) -> None:
        """``leave()`` (``shutdown()`` with ``close_first``): revoke the lease at once."""
        world, lease = self.world, self.lease
        self._epoch += 1
        self._waiting = self.training = False
        self.member_key = self.admission = None

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
